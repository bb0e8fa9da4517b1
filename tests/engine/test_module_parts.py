"""Engine parts a distiller relies on: the multistep schedule, and an averaged copy of the training module (EMA)
that shares the frozen teacher instead of copying it."""

import copy

import pytest
import torch

from pand.distillers import Distiller
from pand.engine.module import DistillationModule
from pand.students import build_student


class _Trainer:
    max_epochs = 10


def _module(**optim):
    module = DistillationModule(Distiller(build_student("resnet8", 3, source="cifar", pretrained=False), 3),
                                optim={"name": "sgd", "lr": 1.0, **optim})
    module._trainer = _Trainer()  # configure_optimizers reads trainer.max_epochs
    return module


def test_multistep_decays_at_each_milestone():
    out = _module(scheduler="multistep", milestones=[3, 7], gamma=0.1).configure_optimizers()
    factor = out["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert [factor(e) for e in (0, 2, 3, 6, 7, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_a_copy_of_the_module_shares_the_teacher_and_copies_the_student():
    teacher = torch.nn.Linear(4, 4)
    module = DistillationModule(Distiller(build_student("resnet8", 3, source="cifar", pretrained=False), 3), teacher)
    clone = copy.deepcopy(module)
    assert clone.teacher_source is teacher
    assert clone.distiller.student is not module.distiller.student
    assert not any(k.startswith("teacher") or "_teacher" in k for k in module.state_dict())
