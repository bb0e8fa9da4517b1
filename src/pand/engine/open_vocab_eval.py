"""The open-vocabulary report of a run whose student embeds images in the teacher's space (``method=openvocab``).

Written to ``open_vocab.json`` in the run folder and into ``summary.json`` under ``open_vocab``, for the student
(best-on-val weights) and, on the same images and class names, for the teacher's own zero-shot classifier:

* classification by cosine against the teacher's text embeddings of the class names (template ensemble). With
  ``data.class_split=base_novel`` (CoOp / CoCoOp protocol: the novel classes' labels and names are never used for
  training or model selection; their images are never seen either under the default ``strict`` protocol, and the
  report names the protocol, ``data.novel_protocol``): top-1 on the base test images among the
  base classes, on the novel test images among the novel classes, their harmonic mean ``2 b n / (b + n)``, and top-1
  of all test images among all classes. Without a class split: top-1 on the test split among its classes.
* the same classification as clip_benchmark reports it (``acc1``, ``acc5``, ``mean_per_class_recall`` per test
  part under ``zeroshot``, and under ``clip_benchmark`` as the records clip_benchmark's ``eval`` writes, one per
  model, test part and task: :func:`clip_benchmark_records`; ``pand eval`` writes each to a file of its own);
* text -> image retrieval on the test split (all its images, every class's prompt embedding as one query; an image
  is relevant when it shows that class): R@K is the share of queries with a relevant image among the K most similar
  images, mAP the mean over queries of the average precision of the whole ranking.
* when the test images have captions (``data=captions``): two-way caption retrieval, clip_benchmark's
  ``image_retrieval_recall@K`` / ``text_retrieval_recall@K`` under ``captions``
  (:mod:`pand.engine.caption_retrieval`); a captions test split has no class, so it has nothing else.

The teacher sees the images with its own evaluation preprocessing (as in ``pand features``); the student with the
run's. A student with text fusion scores each (image, class) pair with its fused embedding ``e(x | t_c) . T_c``,
for classification and for retrieval alike.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from pand.data import ClassificationDataset
from pand.data.assembly import NOVEL_PROTOCOLS, NOVEL_TEST, novel_protocol
from pand.data.captions import captions_of, has_class_labels
from pand.engine.caption_retrieval import add_caption_retrieval, format_caption_retrieval
from pand.engine.data import EvalItems, eval_batch_size
from pand.errors import ConfigError
from pand.io import atomic_write_json
from pand.stage1.features import extract_features

log = logging.getLogger("pand")

RECALL_AT = (1, 5, 10)


def harmonic_mean(base: float, novel: float) -> float:
    return 0.0 if base + novel <= 0 else 2 * base * novel / (base + novel)


def top1(similarity: torch.Tensor, labels: torch.Tensor) -> float:
    return float((similarity.argmax(1) == labels).float().mean()) if len(labels) else float("nan")


def zero_shot_metrics(similarity: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Zero-shot classification as clip_benchmark reports it: ``acc1``, ``acc5`` (the true class among the 5 most
    similar; among all of them when there are fewer) and ``mean_per_class_recall`` (the recall of each class present,
    averaged: balanced accuracy, which a class-imbalanced test split needs)."""
    labels = labels.long()
    if not len(labels):
        return {}
    k = min(5, similarity.shape[1])
    in_top = (similarity.float().topk(k, dim=1).indices == labels.unsqueeze(1))
    hit1 = in_top[:, 0].float()
    recalls = [float(hit1[labels == c].mean()) for c in sorted(set(labels.tolist()))]
    return {"acc1": float(hit1.mean()), "acc5": float(in_top.any(1).float().mean()),
            "mean_per_class_recall": sum(recalls) / len(recalls)}


#: The fields of a clip_benchmark result file, in its order: the ``dump`` that ``clip_benchmark eval`` writes
#: (``clip_benchmark/cli.py``, ``run``); it adds ``classnames`` / ``templates`` only with ``--dump_classnames`` /
#: ``--dump_templates``, which are off by default.
CLIP_BENCHMARK_KEYS = ("dataset", "model", "pretrained", "task", "metrics", "language")
#: clip_benchmark's metric names per task (``metrics/zeroshot_classification.py``, ``metrics/zeroshot_retrieval.py``).
CLIP_BENCHMARK_METRICS = {
    "zeroshot_classification": re.compile(r"acc1|acc5|mean_per_class_recall"),
    "zeroshot_retrieval": re.compile(r"(image|text)_retrieval_recall@\d+"),
}
#: The student's ``pretrained`` when the report is not told which checkpoint holds its weights (the report of a
#: training run is computed from the weights in memory, those selected on val).
RUN_SELECTED_WEIGHTS = "selected-on-val"


def clip_benchmark_models(config: Mapping[str, Any], student_weights: str | os.PathLike | None = None
                          ) -> dict[str, tuple[str, str]]:
    """``(model, pretrained)`` of the student and the teacher as clip_benchmark names a model: the teacher by its
    open_clip architecture and pretrained tag (or weight file), so that its records meet clip_benchmark's own of the
    same model; the student by pand's method and backbone, and the checkpoint its weights come from."""
    teacher = config["teacher"]
    weights = RUN_SELECTED_WEIGHTS if student_weights is None else os.fspath(student_weights)
    return {"student": (f"pand-{config['method']['name']}-{config['student']['name']}", weights),
            "teacher": (str(teacher.get("model")), str(teacher.get("pretrained")))}


def clip_benchmark_records(report: Mapping[str, Any], dataset: str, models: Mapping[str, tuple[str, str]],
                           language: str = "en") -> list[dict[str, Any]]:
    """The report's figures as the result files clip_benchmark writes (fields :data:`CLIP_BENCHMARK_KEYS`), so that
    a folder of pand's and clip_benchmark's results aggregates alike (``clip_benchmark build``).

    ``models`` gives the student's and the teacher's ``(model, pretrained)`` (:func:`clip_benchmark_models`).
    Zero-shot classification gives one record per model and test part; ``dataset`` is suffixed with the part
    (``/base``, ``/novel``, ``/all``) in a base-to-novel run. A model section with caption retrieval (``captions``:
    ``image_retrieval_recall@K`` / ``text_retrieval_recall@K``, and optionally the caption set's ``dataset``) gives a
    ``zeroshot_retrieval`` record too. The class-prompt retrieval (``retrieval``) is left out: clip_benchmark's
    retrieval ranks captions of single images, a different quantity.
    """
    records = []
    for who in ("student", "teacher"):
        model, pretrained = models[who]
        section = report[who]
        for part, metrics in (section.get("zeroshot") or {}).items():
            name = dataset if part == "all" and "class_split" not in report else f"{dataset}/{part}"
            metrics = _clip_benchmark_metrics("zeroshot_classification", metrics)
            size = _part_size(report, part)
            if size is not None and size < 5 and "acc5" in metrics:
                # clip_benchmark leaves acc5 undefined below 5 classes (it writes NaN, which strict JSON lacks);
                # pand's own acc5 there is the trivial 1.
                metrics["acc5"] = None
            records.append(_clip_benchmark_record(name, model, pretrained, "zeroshot_classification", metrics,
                                                  language))
        captions = section.get("captions")
        if isinstance(captions, Mapping):
            metrics = _clip_benchmark_metrics("zeroshot_retrieval", captions)
            if metrics:
                name = captions["dataset"] if isinstance(captions.get("dataset"), str) else dataset
                records.append(_clip_benchmark_record(name, model, pretrained, "zeroshot_retrieval", metrics,
                                                      language))
    return records


def _clip_benchmark_metrics(task: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    names = CLIP_BENCHMARK_METRICS[task]
    return {k: v if v is None else float(v) for k, v in metrics.items() if names.fullmatch(k)}


def _clip_benchmark_record(dataset: str, model: str, pretrained: str, task: str, metrics: dict[str, Any],
                           language: str) -> dict[str, Any]:
    values = {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics,
              "language": language}
    return {k: values[k] for k in CLIP_BENCHMARK_KEYS}


def _part_size(report: Mapping[str, Any], part: str) -> int | None:
    """The number of classes a test part is classified among, where the report says."""
    split = report.get("class_split") or {}
    names = split.get(part) if part in ("base", "novel") else report.get("classes")
    return None if names is None else len(names)


def clip_benchmark_file_name(record: Mapping[str, Any]) -> str:
    """The name clip_benchmark gives a result file by default,
    ``{dataset}_{pretrained}_{model}_{language}_{task}.json``: the dataset's slashes become underscores and a
    pretrained weight file counts by its base name (as there); the other parts' slashes too, since here they would
    make folders (open_clip's ``hf-hub:org/name`` models)."""
    pretrained = str(record["pretrained"])
    if os.path.isfile(pretrained):
        pretrained = os.path.basename(pretrained)
    parts = (record["dataset"], pretrained, record["model"], record["language"], record["task"])
    return "_".join(str(p).replace("/", "_").replace(os.sep, "_") for p in parts) + ".json"


def write_clip_benchmark(records: Sequence[Mapping[str, Any]], folder: str | os.PathLike) -> list[Path]:
    """One clip_benchmark result file per record in ``folder`` (created if missing), each written atomically."""
    folder = Path(folder)
    paths = [folder / clip_benchmark_file_name(r) for r in records]
    if len(set(paths)) != len(paths):
        raise ConfigError(f"two clip_benchmark records would share a file name in {folder}: "
                          f"{sorted(p.name for p in paths if paths.count(p) > 1)[0]}")
    folder.mkdir(parents=True, exist_ok=True)
    for path, record in zip(paths, records):
        atomic_write_json(path, dict(record))
    return paths


def retrieval_metrics(similarity: torch.Tensor, labels: torch.Tensor, queries: Sequence[int] | None = None,
                      ks: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """Text -> image retrieval from an ``[N images, C classes]`` similarity: column ``c`` is the query of class ``c``
    ranking all N images, relevant where ``labels == c``. Queries default to every class with a relevant image."""
    sim = similarity.float()
    labels = labels.long()
    if queries is None:
        queries = sorted(set(labels.tolist()))
    out: dict[str, float] = {}
    if not len(queries):
        return out
    q = torch.as_tensor(list(queries), dtype=torch.long)
    order = sim[:, q].argsort(dim=0, descending=True)  # [N, Q]: images by decreasing similarity, per query
    relevant = (labels[order] == q.unsqueeze(0)).float()  # [N, Q]
    for k in ks:
        out[f"R@{k}"] = float(relevant[:k].amax(0).mean())
    hits = relevant.cumsum(0)
    ranks = torch.arange(1, len(labels) + 1, dtype=torch.float32).unsqueeze(1)
    ap = (relevant * hits / ranks).sum(0) / relevant.sum(0).clamp_min(1)
    out["mAP"] = float(ap.mean())
    return out


@torch.no_grad()
def _student_similarities(student, dataset: ClassificationDataset, transform, text: tuple, device: torch.device,
                          batch_size: int, num_workers: int) -> torch.Tensor:
    """``[N, C]`` cosine similarities of the student for a text set ``(embeds, tokens, mask)``."""

    loader = DataLoader(EvalItems(dataset, transform), batch_size=batch_size, num_workers=num_workers)
    text = tuple(None if t is None else t.to(device) for t in text)
    return torch.cat([student.similarity(student.visual_tokens(batch["image"].to(device)), *text).float().cpu()
                      for batch in loader])


def vocabulary_for(teacher, names: Sequence[str], templates: Sequence[str], student=None) -> tuple:
    """``(text_embeds, tokens, mask)`` of class ``names`` from the teacher's text tower (template ensemble), ready
    for ``student.set_vocabulary(*...)``; per-token features only for a student with cross-attention fusion."""
    text = teacher.class_embeddings(list(names), list(templates)).float().cpu()
    if getattr(student, "fusion_kind", "none") != "cross_attention":
        return text, None, None
    tokens, mask = teacher.class_token_features(list(names), list(templates))
    return text, tokens, mask


def open_vocab_report(student, data, config: Mapping[str, Any], teacher=None, *,
                      load_teacher: Callable[[], Any] | None = None,
                      student_weights: str | os.PathLike | None = None) -> dict[str, Any]:
    """Base / novel / harmonic-mean top-1 (or closed-set top-1) and retrieval, for the student and the teacher.

    ``student`` is an :class:`~pand.students.open_vocab.OpenVocabStudent` (its vocabulary is left as it was);
    ``data`` the run's :class:`~pand.engine.data.PandDataModule`; ``teacher`` the live CLIP teacher, or
    ``load_teacher`` to load it (its text tower makes the class text matrices, its image tower the reference);
    ``student_weights`` the checkpoint the student's weights come from, the ``pretrained`` of its clip_benchmark
    records.
    """

    teacher = teacher if teacher is not None else load_teacher()
    if not hasattr(teacher, "class_embeddings"):
        raise ConfigError("the open-vocabulary report needs a CLIP teacher (its text tower)")
    splits = data.splits
    templates = list(config["data"]["templates"])
    batch_size, workers = eval_batch_size(config["data"]), int(config["data"].get("num_workers", 0))
    test_captions = captions_of(splits["test"])
    if test_captions is not None and not has_class_labels(splits["test"]):
        # image-caption pairs without classes: the test split is scored by caption retrieval alone
        retrieval: dict[str, Any] = {"student": {"zeroshot": {}}, "teacher": {"zeroshot": {}}}
        add_caption_retrieval(retrieval, student, teacher, splits["test"], test_captions, data.eval_transform,
                              split="test", batch_size=batch_size, num_workers=workers)
        retrieval["clip_benchmark"] = clip_benchmark_records(retrieval, str(config["data"]["name"]),
                                                             clip_benchmark_models(config, student_weights))
        return retrieval
    split_mode = NOVEL_TEST in splits
    # All class names (base then novel: no metric depends on the order), and the rows of each test part in them.
    if split_mode:
        base_ds, novel_ds = splits["test"], splits[NOVEL_TEST]
        names = list(base_ds.classes) + list(novel_ds.classes)
        parts = {"base": (base_ds, list(range(len(base_ds.classes)))),
                 "novel": (novel_ds, list(range(len(base_ds.classes), len(names))))}
    else:
        names = list(splits["test"].classes)
        parts = {"all": (splits["test"], list(range(len(names))))}
    everything = vocabulary_for(teacher, names, templates, student)
    text = everything[0]

    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    sims: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
    labels: dict[str, torch.Tensor] = {}
    try:
        for part, (ds, rows) in parts.items():
            # Every class's score depends on that class's text alone (fused or not), so the scores among the part's
            # own classes are columns of the scores among all classes.
            s_all = _student_similarities(student, ds, data.eval_transform, everything, device, batch_size, workers)
            t_img, y = extract_features(teacher, ds, batch_size=batch_size, num_workers=workers, progress=False)
            sims["student"][part], sims["student"][part + "/all"] = s_all[:, rows], s_all
            t_all = t_img.float() @ text.t()
            sims["teacher"][part], sims["teacher"][part + "/all"] = t_all[:, rows], t_all
            labels[part] = y.long()
            labels[part + "/all"] = torch.as_tensor(rows, dtype=torch.long)[y.long()]
    finally:
        student.train(was_training)

    report: dict[str, Any] = {
        "classes": names,
        "templates": templates,
        "retrieval_queries": "one per class: its template-ensemble text embedding; gallery: every test image",
    }
    if split_mode:
        protocol = novel_protocol(config["data"])
        report["class_split"] = {"base": [names[i] for i in parts["base"][1]],
                                 "novel": [names[i] for i in parts["novel"][1]],
                                 "seed": int(config["data"].get("class_split_seed", 0)),
                                 "protocol": protocol, "note": NOVEL_PROTOCOLS[protocol]}
    for who in ("student", "teacher"):
        r: dict[str, Any] = {}
        r["zeroshot"] = {}
        for part in parts:
            r[part] = top1(sims[who][part], labels[part])
            r["zeroshot"][part] = zero_shot_metrics(sims[who][part], labels[part])
        if split_mode:
            r["hm"] = harmonic_mean(r["base"], r["novel"])
            gallery = torch.cat([sims[who]["base/all"], sims[who]["novel/all"]])
            gallery_labels = torch.cat([labels["base/all"], labels["novel/all"]])
            r["all"] = top1(gallery, gallery_labels)
            r["zeroshot"]["all"] = zero_shot_metrics(gallery, gallery_labels)
            r["retrieval"] = retrieval_metrics(gallery, gallery_labels)
            r["retrieval_novel"] = retrieval_metrics(gallery, gallery_labels, queries=parts["novel"][1])
        else:
            r["retrieval"] = retrieval_metrics(sims[who]["all/all"], labels["all/all"])
        report[who] = r
    if test_captions is not None:
        add_caption_retrieval(report, student, teacher, splits["test"], test_captions, data.eval_transform,
                              split="test", batch_size=batch_size, num_workers=workers)
    report["clip_benchmark"] = clip_benchmark_records(report, str(config["data"]["name"]),
                                                      clip_benchmark_models(config, student_weights))
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """The report as a few aligned lines (what ``pand train`` prints at the end)."""
    if "classes" not in report:  # a captions test split: caption retrieval only
        return "\n".join(format_caption_retrieval(report))
    split = "class_split" in report
    cols = ["base", "novel", "hm", "all"] if split else ["all"]
    head = "open-vocabulary top-1 (%)   " + "  ".join(f"{c:>6}" for c in cols)
    head += "   retrieval   R@1    R@5   R@10    mAP"
    lines = [head]
    for who in ("student", "teacher"):
        r = report[who]
        row = f"  {who:<25} " + "  ".join(f"{100 * r[c]:6.2f}" for c in cols)
        ret = r["retrieval"]
        row += "             " + " ".join(f"{100 * ret[k]:5.1f}" for k in ("R@1", "R@5", "R@10")) + \
            f"  {100 * ret['mAP']:5.1f}"
        lines.append(row)
    if split:
        cs = report["class_split"]
        lines.append(f"  base classes: {', '.join(cs['base'])}")
        lines.append(f"  novel classes (never trained on): {', '.join(cs['novel'])}")
        lines.append(f"  protocol: {cs['protocol']} ({cs['note']})")
    return "\n".join(lines + format_caption_retrieval(report))
