"""Unlabelled images in a base-to-novel run, under a named protocol (``data.novel_protocol``): strict keeps only
base-class images, transductive keeps every image with its label hidden, a folder is a generic corpus. Under none
does training or model selection read a novel label or a novel class name."""

import json

import pytest

from pand.cli import main
from pand.config import compose, to_plain
from pand.data import base_novel_classes, get_dataset
from pand.data.assembly import NOVEL_PROTOCOLS, UNLABELLED_SPLIT, load_splits, novel_protocol
from pand.data.unlabelled import UNLABELLED
from pand.engine.config_checks import validate_train_config
from pand.engine.module import DistillationModule
from pand.errors import ConfigError
from pand.teachers.clip import ClipTeacher
from tests.engine.conftest import tiny_overrides
from tests.fixtures.datasets import make_cub, write_image


@pytest.fixture
def cub4(tmp_path):
    return make_cub(tmp_path / "data", n_classes=4, per_class=5, test_per_class=3)


def _config(root, run, *extra):
    return to_plain(compose("train", tiny_overrides(root, run, "method=openvocab", "data.num_classes=4",
                                                    "data.class_split=base_novel", "data.samples_per_class=2",
                                                    "data.val_fraction=0.5", *extra)))


def _true_classes(root, dataset):
    """The real class name of each image of ``dataset`` (labels hidden or not), looked up by sample id."""
    full = get_dataset("cub", root, "train", val_fraction=0.0, num_classes=4)
    by_id = {full.sample_id(i): full.classes[y] for i, y in enumerate(full.targets)}
    return [by_id[dataset.sample_id(i)] for i in range(len(dataset))]


def _base_and_novel_names(root):
    names = get_dataset("cub", root, "test", num_classes=4).classes
    base, novel = base_novel_classes(4, 0)
    return [names[c] for c in base], [names[c] for c in novel]


@pytest.mark.parametrize(("protocol", "novel_images"), [("strict", 0), ("transductive", 6)])
def test_the_protocol_chooses_which_unlabelled_images_and_hides_every_novel_label_and_name(cub4, tmp_path, protocol,
                                                                                          novel_images):
    config = _config(cub4, tmp_path / "run", "data.unlabelled=rest", f"data.novel_protocol={protocol}")
    splits = load_splits(config["data"])
    base, novel = _base_and_novel_names(cub4)
    unlabelled = splits[UNLABELLED_SPLIT]
    assert unlabelled.classes == base  # the only names a training step can read
    assert set(unlabelled.targets) == {UNLABELLED}
    seen = _true_classes(cub4, unlabelled)
    assert sum(c in novel for c in seen) == novel_images  # 4 classes x 5 images, 2 per class labelled: 3 left each
    assert sum(c in base for c in seen) == 6
    assert novel_protocol(config["data"]) == protocol
    for name in ("train", "val"):
        assert splits[name].classes == base and set(_true_classes(cub4, splits[name])) <= set(base)


def test_a_folder_of_unlabelled_images_is_a_generic_corpus(cub4, tmp_path):
    folder = tmp_path / "corpus"
    for i in range(4):
        write_image(folder / f"{i}.png", i, 4)
    config = _config(cub4, tmp_path / "run", f"data.unlabelled={folder}")
    splits = load_splits(config["data"])
    assert novel_protocol(config["data"]) == "generic" and len(splits[UNLABELLED_SPLIT]) == 4
    assert splits[UNLABELLED_SPLIT].classes == _base_and_novel_names(cub4)[0]


def test_a_label_free_base_to_novel_run_keeps_base_images_and_names_under_strict(cub4, tmp_path):
    config = _config(cub4, tmp_path / "run", "data.samples_per_class=0")
    splits = load_splits(config["data"])
    base, _ = _base_and_novel_names(cub4)
    assert len(splits["train"]) == 0
    for name in ("val", UNLABELLED_SPLIT):
        assert splits[name].classes == base and set(splits[name].targets) == {UNLABELLED}
        assert set(_true_classes(cub4, splits[name])) <= set(base)
    assert len(splits["val"]) + len(splits[UNLABELLED_SPLIT]) == 10  # every base-class training image


@pytest.mark.parametrize(("extra", "message"), [
    (("data.class_split=null", "data.unlabelled=rest", "data.novel_protocol=transductive"),
     "data.novel_protocol=transductive is set, but there is no class split"),
    (("data.novel_protocol=transductive",), "with no unlabelled images it chooses nothing"),
    (("data.novel_protocol=inductive",), "data.novel_protocol='inductive' is not allowed: expected one of 'strict', "
                                         "'transductive'"),
])
def test_a_protocol_that_would_be_ignored_is_refused(cub4, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        validate_train_config(_config(cub4, tmp_path / "run", *extra))


def test_a_transductive_run_never_reads_a_novel_label_or_name_while_it_trains_and_reports_its_protocol(
        cub4, tmp_path, monkeypatch):
    base, novel = _base_and_novel_names(cub4)
    phase, names_read, labels_seen = ["train"], [], set()
    real_embeddings, real_step = ClipTeacher.class_embeddings, DistillationModule.training_step
    real_report = __import__("pand.engine.run", fromlist=["open_vocab_report"]).open_vocab_report

    def class_embeddings(self, classnames, templates):
        names_read.extend((phase[0], n) for n in classnames)
        return real_embeddings(self, classnames, templates)

    def training_step(self, batch, batch_idx):
        labels_seen.update(batch["label"].tolist())
        assert self.distiller.text_embeds.shape[0] == len(base)  # the vocabulary trained against: base names only
        return real_step(self, batch, batch_idx)

    def report(*args, **kwargs):
        phase[0] = "report"  # after training and selection: the novel names are read for the first time here
        return real_report(*args, **kwargs)

    monkeypatch.setattr(ClipTeacher, "class_embeddings", class_embeddings)
    monkeypatch.setattr(DistillationModule, "training_step", training_step)
    monkeypatch.setattr("pand.engine.run.open_vocab_report", report)
    run = tmp_path / "run"
    overrides = tiny_overrides(cub4, run, "method=openvocab", "data.num_classes=4", "data.class_split=base_novel",
                               "data.samples_per_class=2", "data.val_fraction=0.5", "data.unlabelled=rest",
                               "data.novel_protocol=transductive", "trainer.max_epochs=1")
    assert main(["train", *overrides]) == 0
    assert labels_seen <= {UNLABELLED, 0, 1} and UNLABELLED in labels_seen
    trained_on = {n for p, n in names_read if p == "train"}
    assert trained_on == set(base)
    assert set(novel) <= {n for p, n in names_read if p == "report"}
    summary = json.loads((run / "summary.json").read_text())
    split = summary["open_vocab"]["class_split"]
    assert split["protocol"] == "transductive" and split["note"] == NOVEL_PROTOCOLS["transductive"]
    assert summary["unlabelled_images"] == 12
