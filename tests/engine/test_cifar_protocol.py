"""The 32-px CIFAR-100 protocol end to end on a tiny fixture: a CIFAR teacher trained by pand, then DKD or OFA into a
CIFAR student (resnet32x4 -> resnet8x4, as in the KD tables)."""

import json

import pytest

from pand.cli import main
from tests.fixtures.datasets import make_cifar100


def _args(root, run, *extra):
    return ["train", "data=cifar100", f"data.root={root}", "data.num_classes=5", "data.batch_size=4",
            "data.num_workers=0", "data.val_fraction=0.25", "student=cifar", "trainer=cpu", "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false", "optim=sgd", "optim.lr=0.05", f"run_dir={run}", *extra]


@pytest.mark.parametrize("method", ["dkd", "ofa", "nrkd"])
def test_cifar_teacher_then_distilled_student(tmp_path, method):
    root = make_cifar100(tmp_path / "data", n_classes=5, per_class=8, test_per_class=2)
    teacher_run, student_run = tmp_path / "teacher", tmp_path / "student"
    assert main(_args(root, teacher_run, "method=ce", "student.name=resnet32x4", "test=false")) == 0
    ckpt = teacher_run / "checkpoints" / "best.ckpt"
    assert main(_args(root, student_run, f"method={method}", "student.name=resnet8x4", "teacher=classifier",
                      f"teacher.ckpt={ckpt}")) == 0
    summary = json.loads((student_run / "summary.json").read_text())
    assert summary["method"] == method and summary["student"] == "resnet8x4" and summary["test_acc1"] is not None
