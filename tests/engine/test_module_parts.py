"""Engine parts a distiller relies on: the configured optimizer and schedule, and an averaged copy of the training module (EMA)
that shares the frozen teacher instead of copying it."""

import copy

import pytest
import torch

from pand.distillers import Distiller
from pand.engine.module import DistillationModule
from pand.students import build_student


class _Trainer:
    max_epochs = 10
    estimated_stepping_batches = 10


def test_the_module_builds_the_configured_optimizer_and_schedule():
    module = DistillationModule(Distiller(build_student("resnet8", 3, source="cifar", pretrained=False), 3),
                                optim={"_target_": "torch.optim.SGD", "lr": 1.0},
                                scheduler={"_target_": "torch.optim.lr_scheduler.MultiStepLR", "milestones": [3, 7],
                                           "gamma": 0.1, "interval": "epoch", "warmup_epochs": 0})
    module._trainer = _Trainer()  # configure_optimizers reads trainer.max_epochs
    out = module.configure_optimizers()
    optimizer, scheduler = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.SGD) and out["lr_scheduler"]["interval"] == "epoch"
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [rates[e] for e in (0, 2, 3, 6, 7, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_a_copy_of_the_module_shares_the_teacher_and_copies_the_student():
    teacher = torch.nn.Linear(4, 4)
    module = DistillationModule(Distiller(build_student("resnet8", 3, source="cifar", pretrained=False), 3), teacher)
    clone = copy.deepcopy(module)
    assert clone.teacher_source is teacher
    assert clone.distiller.student is not module.distiller.student
    assert not any(k.startswith("teacher") or "_teacher" in k for k in module.state_dict())
