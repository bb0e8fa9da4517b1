"""Two-way caption retrieval (COCO protocol, clip_benchmark's names): the metric on a similarity worked out by hand
(an image with several captions), against a plain loop on random ones, and end to end: ``pand train data=captions
method=openvocab`` reports both directions for the student and the teacher, and ``pand eval`` scores its val."""

import json

import pytest
import torch

from pand.cli import main
from pand.engine.caption_retrieval import flatten, format_caption_retrieval, retrieval_recalls
from tests.data.test_captions import make_pairs

# 3 images, 5 captions: image 0 has captions 0 and 1, image 1 has 2 and 3, image 2 has caption 4.
OWNER = torch.tensor([0, 0, 1, 1, 2])
SIM = torch.tensor([
    # c0   c1   c2   c3   c4
    [0.1, 0.9, 0.8, 0.2, 0.0],  # image 0: its best caption is c1, its own (second) caption -> hit at 1
    [0.7, 0.1, 0.3, 0.4, 0.6],  # image 1: c0, c4, then its own c3 (rank 3) -> miss at 1 and 2, hit at 5
    [0.2, 0.3, 0.9, 0.1, 0.5],  # image 2: c2, then its own c4 (rank 2) -> miss at 1, hit at 2
])


def test_recalls_of_a_hand_worked_similarity():
    got = retrieval_recalls(SIM, OWNER, ks=(1, 2, 5, 10))
    # image -> text: hits at 1: image 0 only; at 2: images 0 and 2; from 5 on (beyond 5 captions: all): every image
    assert got["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert got["text_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert got["text_retrieval_recall@5"] == got["text_retrieval_recall@10"] == 1.0
    # text -> image, the columns: c0 [.1 .7 .2] best image 1 (miss), c1 [.9 .1 .3] image 0 (hit), c2 [.8 .3 .9]
    # image 2 (miss), c3 [.2 .4 .1] image 1 (hit), c4 [0 .6 .5] image 1 (miss); at 2: c0 misses (0.1 is last),
    # c2 misses (0.3 is last), c4 hits
    assert got["image_retrieval_recall@1"] == pytest.approx(2 / 5)
    assert got["image_retrieval_recall@2"] == pytest.approx(3 / 5)
    assert got["image_retrieval_recall@5"] == got["image_retrieval_recall@10"] == 1.0
    assert set(retrieval_recalls(SIM, OWNER)) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text")
                                                  for k in (1, 5, 10)}


def _by_loop(sim, owner, k):
    n, m = len(sim), len(sim[0])
    image_hits = [owner[j] in sorted(range(n), key=lambda i: -sim[i][j])[:k] for j in range(m)]
    text_hits = [any(owner[j] == i for j in sorted(range(m), key=lambda j: -sim[i][j])[:k]) for i in range(n)]
    return sum(image_hits) / m, sum(text_hits) / n


def test_recalls_match_a_plain_loop_on_random_similarities():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(7, 19, generator=g)
    owner = torch.randint(0, 7, (19,), generator=g)
    got = retrieval_recalls(sim, owner, ks=(1, 3, 5))
    for k in (1, 3, 5):
        image, text = _by_loop(sim.tolist(), owner.tolist(), k)
        assert got[f"image_retrieval_recall@{k}"] == pytest.approx(image)
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx(text)


def test_captions_are_flattened_in_image_order_and_a_caption_must_belong_to_an_image():
    texts, owner = flatten([("a", "b"), ("c",), ("d", "e", "f")])
    assert texts == ["a", "b", "c", "d", "e", "f"] and owner.tolist() == [0, 0, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="each of the 5 captions an image among 3"):
        retrieval_recalls(SIM, torch.tensor([0, 0, 1, 3, 2]))


def test_the_report_lines_show_both_directions_for_both_models():
    r = retrieval_recalls(SIM, OWNER)
    lines = format_caption_retrieval({"captions": {"split": "test", "images": 3, "captions": 5},
                                      "student": {"captions": r}, "teacher": {"captions": r}})
    assert "3 images, 5 captions" in lines[0] and "text->image R@1" in lines[1] and "image->text R@10" in lines[1]
    assert lines[2].split()[:3] == ["student", "40.0", "100.0"] and lines[3].split()[0] == "teacher"


def _train(root, run, *extra):
    return ["train", "data=captions", f"data.root={root}", "data.val_fraction=0.2", "data.image_size=32",
            "data.resize_size=36", "data.batch_size=4", "data.num_workers=0", "teacher=tiny",
            "student.pretrained=false", "trainer=cpu", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1", "optim.lr=1e-3", f"run_dir={run}", "method=openvocab", *extra]


def test_a_captions_run_reports_both_retrieval_directions_for_student_and_teacher(tmp_path, capsys):
    root, run = make_pairs(tmp_path / "pairs"), tmp_path / "run"
    assert main(_train(root, run, "method.caption_weight=1.0")) == 0
    report = json.loads((run / "open_vocab.json").read_text())
    keys = {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert report["captions"]["images"] == 4 and report["captions"]["captions"] == 6  # even test images have 2
    for who in ("student", "teacher"):
        assert set(report[who]["captions"]) == keys
        assert all(0.0 <= v <= 1.0 for v in report[who]["captions"].values())
    records = [r for r in report["clip_benchmark"] if r["task"] == "zeroshot_retrieval"]
    assert [r["model"] for r in records] == ["pand-openvocab-resnet18", "pand-tiny-vit"]
    assert all(set(r["metrics"]) == keys for r in records)
    summary = json.loads((run / "summary.json").read_text())
    # no labelled image, every training image unlabelled; val scored by its captions; test only by retrieval
    assert summary["labelled_images"] == 0 and summary["unlabelled_images"] == 8
    assert summary["val_acc1"] is not None and summary["test_acc1"] is None
    assert summary["open_vocab"]["student"]["captions"] == report["student"]["captions"]
    assert "train/caption" in (run / "metrics.csv").read_text().splitlines()[0]
    capsys.readouterr()

    best = run / "checkpoints" / "best.ckpt"
    # the default splits: val scored by its captions, test (no class) left to the caption retrieval, with the reason
    assert main(["eval", f"ckpt_path={best}", f"out={tmp_path / 'e.json'}", "data.num_workers=0"]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["val_size"] == 2 and set(result["open_vocab"]["teacher"]["captions"]) == keys
    assert "test_acc1" not in result and "caption retrieval" in result["test_skipped"]
    # the same weights, images and captions: the same figures as at the end of training (up to the student's
    # float path: its weights are those selected on val either way)
    assert result["open_vocab"]["teacher"]["captions"] == report["teacher"]["captions"]
