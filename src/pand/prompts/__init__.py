"""Prompt learning (PAND stage 1, PSC): CoOp context vectors trained on cached teacher image features."""

from pand.prompts.coop import CoopResult, train_coop
from pand.prompts.learner import PromptLearner

__all__ = ["CoopResult", "PromptLearner", "train_coop"]
