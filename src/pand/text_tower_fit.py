"""``pand teacher text-tower``: a small text tower distilled from the teacher of an open-vocabulary run, and how often
the student's zero-shot predictions with it agree with its predictions with the teacher's own text tower.

An open-vocabulary student (``method=openvocab``) classifies names through a text tower. The teacher's can be many
times the student's size; the tower made here is open_clip's ``TextTransformer`` at a fraction of the teacher's width
and depth (:mod:`pand.teachers.text_tower`), fitted to reproduce the teacher's text embeddings (TinyCLIP's and
CLIP-KD's recipe on the text side), and exported with the student by ``pand export format=open_clip text_tower=DIR``.

**Training texts** (the corpus; ``text_tower.json`` counts each part under ``corpus``), every text once:

a. the run's prompt templates filled with its training classes: in a base-to-novel run (``data.class_split``) the
   base classes only, as for the image student, never a held-out class name;
b. the training images' captions, where the run has them (``data=captions``, ``data.unlabelled=captions:...``);
c. a generic corpus that needs no download: the words of the teacher tokenizer's vocabulary
   (:func:`~pand.teachers.text_tower.vocabulary_words`), each in one of the templates (chosen by the word's hash, so
   the corpus grows with the vocabulary, not with vocabulary x templates). **Every word of every held-out class name
   is removed from it**, so that the agreement on novel classes measures names the tower never saw; how many were
   removed is recorded, not which;
d. ``corpus=FILE``: the file's non-empty lines.

A caption or a line of the file holding a word of a held-out class name (other than the templates' own words, which
every class prompt has) is left out too, and counted. One text in twenty, chosen by the text's hash (so the same
texts whatever the seed or the rest of the corpus), is the val part; the class prompts of (a) always train. The
tower is selected on the val part, never on an image.

**Fitting**: the teacher embeds every text once (no gradient, L2-normalised); the loss is
:func:`pand.losses.text_distill_loss`, ``mean (1 - cos(s, t)) + contrastive_weight x`` the symmetric InfoNCE of the
student's against the teacher's embeddings within the batch, at ``temperature`` (default: the inverse of the
teacher's own learned logit scale). AdamW, linear warm-up then a cosine schedule, seeded (the same seed, device,
thread count and library versions give the same weights). The class prompts join every batch when they are at most
a quarter of it: a few names among thousands of words would otherwise be seen a few times in a whole fit.
``warm_start`` starts the token and position embeddings from the teacher's, projected to the tower's width
(:func:`~pand.teachers.text_tower.warm_start`): most words of the val part, and every held-out name, are tokens that
no training text has, which only the warm start gives more than a random embedding. The val part is scored ten times
over the fit and at its start (its loss, the mean cosine with the teacher's embeddings, and top-1 matching: the share
of val texts closer to their own teacher embedding than to any other val text's); the weights with the lowest val
loss are kept. Not the highest val cosine: on pand's Fashion-MNIST teacher, whose embeddings of the template filled
with any word are alike (mean cosine 0.87), the val cosine peaks early (step 200 of 2,000) and then falls, while the
val loss keeps falling as the agreement on class names rises (``benchmarks/README.md``, "A distilled text tower").

**Agreement report** (``agreement``), on the run's val and test images (the run's dataset and evaluation
preprocessing, loaded as ``pand eval`` loads them), with the student's image embeddings from the checkpoint: the
zero-shot argmax over the class names (template ensemble) with the teacher's text tower and with the distilled one,
per part of the split (``base``: base images among the base classes, ``novel``: novel images among the novel
classes, ``all``: every image of the split among every class; without a class split ``all`` only): ``agreement``
(the share of images whose two argmaxes are the same class), the student's top-1 with each tower, and the mean
cosine of the two towers' embeddings of each class. Test images are reported; nothing is chosen on them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import pand
from pand.config import with_data_overrides
from pand.data.assembly import NOVEL_TEST
from pand.deploy import LoadedStudent
from pand.engine.data import EvalItems, PandDataModule
from pand.errors import ConfigError, PandError
from pand.export_open_clip import load_for_open_clip, teacher_model_cfg
from pand.io import atomic_write_bytes, atomic_write_json, file_digest, mark_output_folder
from pand.losses import text_distill_loss
from pand.rules import TEXT_TOWER_RECORD, TEXT_TOWER_WEIGHTS, resolve_device, validate_text_tower_options
from pand.teachers.clip import ClipTeacher
from pand.teachers.clip_training import clip_optimizer, warmup_cosine
from pand.teachers.text_tower import (
    DistilledTextTower,
    build_tower,
    check_tokenizer,
    param_count,
    tower_meta,
    tower_text_cfg,
    vocabulary_words,
    warm_start,
    weights_bytes,
)

log = logging.getLogger("pand")

#: The options of ``pand teacher text-tower`` that are not the size (width, heads and layers default to a share of
#: the teacher's, :func:`pand.teachers.text_tower.default_size`), with their defaults.
DEFAULTS: dict[str, Any] = {"steps": 2000, "batch_size": 256, "lr": 1e-3, "seed": 0, "warm_start": True,
                            "contrastive_weight": 1.0, "temperature": None, "corpus": None, "device": "auto"}
#: One text in this many is a val text.
VAL_ONE_IN = 20
#: Times the val part is scored over a fit (and once before it).
EVALUATIONS = 10
#: The class prompts join every batch when they are at most this share of it (1 / 4): a few names among thousands of
#: words would otherwise be seen a few times in a whole fit.
EVERY_BATCH_SHARE = 4
WEIGHT_DECAY = 0.01
#: Texts per forward when embeddings are computed without gradient.
_TEXTS_PER_FORWARD = 1024
_WORDS = re.compile(r"[a-z0-9]+")
SOURCES = ("class_prompts", "captions", "words", "corpus_file")


def words_of(text: str) -> set[str]:
    """The words of a text as the held-out rule reads them: lower-case runs of letters and digits."""
    return set(_WORDS.findall(text.lower()))


def _hash(salt: str, text: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{salt}|{text}".encode(), digest_size=8).digest(), "little")


# -- the corpus ----------------------------------------------------------------------------------------------------
@dataclass
class Corpus:
    """The training texts and the val texts, and what each part contributed."""

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        texts = json.dumps({"train": self.train, "val": self.val}, ensure_ascii=False)
        return hashlib.sha256(texts.encode()).hexdigest()

    def record(self) -> dict[str, Any]:
        return {**self.counts, "train": len(self.train), "val": len(self.val), "sha256": self.sha256,
                "val_rule": f"one text in {VAL_ONE_IN} by its blake2b hash; the class prompts always train"}


def build_corpus(training_names: Sequence[str], templates: Sequence[str], held_out_names: Sequence[str] = (), *,
                 words: Sequence[str] = (), captions: Sequence[str] = (), user_texts: Sequence[str] = ()) -> Corpus:
    """The corpus of (a) ``training_names`` x ``templates``, (b) ``captions``, (c) ``words`` each in one template and
    (d) ``user_texts``, with the words of ``held_out_names`` kept out of (b), (c) and (d) (see the module)."""
    templates = list(templates)
    held_out = set().union(*(words_of(n) for n in held_out_names)) if held_out_names else set()
    # A template's own words are in every class prompt, the training ones included: they cannot mark a held-out text.
    marking = held_out - set().union(*(words_of(t.replace("{}", " ")) for t in templates))
    corpus = Corpus(counts={**{s: 0 for s in SOURCES}, "held_out_words_removed": 0, "held_out_texts_removed": 0,
                            "duplicates": 0})
    seen: set[str] = set()

    def add(source: str, text: str, always_train: bool = False) -> None:
        if text in seen:
            corpus.counts["duplicates"] += 1
            return
        seen.add(text)
        corpus.counts[source] += 1
        (corpus.train if always_train or _hash("val", text) % VAL_ONE_IN else corpus.val).append(text)

    for name in training_names:
        for template in templates:
            add("class_prompts", template.format(name), always_train=True)

    def add_unless_held_out(source: str, text: str) -> None:
        if words_of(text) & marking:
            corpus.counts["held_out_texts_removed"] += 1
        else:
            add(source, text)

    for text in captions:
        add_unless_held_out("captions", text)
    for word in words:
        if word in held_out:
            corpus.counts["held_out_words_removed"] += 1
        else:
            add("words", templates[_hash("template", word) % len(templates)].format(word))
    for text in user_texts:
        add_unless_held_out("corpus_file", text)
    return corpus


def read_corpus_file(path: str | os.PathLike) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"corpus={path} is not UTF-8 text (at byte {err.start})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def run_vocabulary(data: PandDataModule) -> tuple[list[str], list[str]]:
    """The run's training class names and its held-out ones (the novel classes of a base-to-novel run). A captions
    run has no training class: its "classes" are its val captions, which only select."""
    training = [] if data.caption_vocabulary else list(data.classes)
    held_out = list(data.splits[NOVEL_TEST].classes) if NOVEL_TEST in data.splits else []
    return training, held_out


def run_corpus(data: PandDataModule, templates: Sequence[str], tokenizer: Any,
               corpus_file: str | os.PathLike | None = None) -> Corpus:
    training, held_out = run_vocabulary(data)
    table = data.caption_table
    return build_corpus(training, templates, held_out, words=vocabulary_words(tokenizer),
                        captions=list(table.texts) if table is not None else (),
                        user_texts=read_corpus_file(corpus_file) if corpus_file is not None else ())


# -- fitting -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _embed(encode, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.cat([F.normalize(encode(tokens[i:i + _TEXTS_PER_FORWARD].to(device)).float(), dim=-1)
                      for i in range(0, len(tokens), _TEXTS_PER_FORWARD)])


@torch.no_grad()
def _val_scores(tower: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, batch_size: int,
                contrastive_weight: float, temperature: float) -> dict[str, float]:
    """On the val part: the mean cosine of the tower's embeddings with the teacher's, the loss in fixed batches, and
    top-1 matching (the share of val texts whose embedding is closer to their own teacher embedding than to any other
    val text's)."""
    embeds = _embed(tower, tokens, targets.device)
    cosine = float((embeds * targets).sum(-1).mean())
    total = sum(float(text_distill_loss(embeds[i:i + batch_size], targets[i:i + batch_size], contrastive_weight,
                                        temperature)) * len(targets[i:i + batch_size])
                for i in range(0, len(targets), batch_size))
    matched = sum(int((embeds[i:i + _TEXTS_PER_FORWARD] @ targets.t()).argmax(1).eq(
        torch.arange(i, min(i + _TEXTS_PER_FORWARD, len(targets)), device=targets.device)).sum())
        for i in range(0, len(targets), _TEXTS_PER_FORWARD))
    return {"val_cosine": cosine, "val_loss": total / len(targets), "val_top1": matched / len(targets)}


def fit_tower(tower: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, val_tokens: torch.Tensor,
              val_targets: torch.Tensor, *, steps: int, batch_size: int, lr: float, seed: int,
              contrastive_weight: float, temperature: float, every_batch: int = 0) -> dict[str, Any]:
    """Fit ``tower`` to the teacher's embeddings ``targets`` of ``tokens`` (on the targets' device); keeps the
    weights with the lowest val loss and returns the history. The first ``every_batch`` texts are in every batch,
    the others drawn in a seeded order, epoch by epoch."""
    device = targets.device
    generator = torch.Generator().manual_seed(int(seed))
    always = torch.arange(every_batch)
    n, bs = len(tokens) - every_batch, max(1, min(int(batch_size) - every_batch, len(tokens) - every_batch))
    optimizer = clip_optimizer(tower, lr, WEIGHT_DECAY)
    every = max(1, steps // EVALUATIONS)

    def score(step: int, train_loss: float | None) -> dict[str, Any]:
        tower.eval()
        scores = _val_scores(tower, val_tokens, val_targets, int(batch_size), contrastive_weight, temperature)
        tower.train()
        return {"step": step, "train_loss": train_loss, **scores, "seconds": round(time.perf_counter() - start, 2)}

    start = time.perf_counter()
    history = [score(0, None)]
    best, best_state = history[0], {k: v.detach().clone() for k, v in tower.state_dict().items()}
    order, position, running, counted = torch.randperm(n, generator=generator), 0, 0.0, 0
    tower.train()
    for step in range(steps):
        if position + bs > n:  # a new epoch: a new order, the last partial batch dropped
            order, position = torch.randperm(n, generator=generator), 0
        batch = torch.cat([always, every_batch + order[position:position + bs]])
        position += bs
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, lr=lr, total=steps)
        loss = text_distill_loss(tower(tokens[batch].to(device)), targets[batch], contrastive_weight, temperature)
        if not torch.isfinite(loss):
            raise PandError(f"the text tower's loss is {float(loss)} at step {step + 1}; try a lower lr= (now {lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running, counted = running + float(loss.detach()), counted + 1
        if (step + 1) % every == 0 or step + 1 == steps:
            history.append(score(step + 1, running / counted))
            running, counted = 0.0, 0
            if history[-1]["val_loss"] < best["val_loss"]:
                best = history[-1]
                best_state = {k: v.detach().clone() for k, v in tower.state_dict().items()}
            log.info("text tower step %d/%d: train loss %.4f, val loss %.4f, val cosine %.4f, val top-1 %.4f",
                     step + 1, steps, history[-1]["train_loss"], history[-1]["val_loss"], history[-1]["val_cosine"],
                     history[-1]["val_top1"])
    tower.load_state_dict(best_state)
    tower.eval()
    return {"seconds": round(time.perf_counter() - start, 2), "best_step": best["step"],
            **{k: best[k] for k in ("val_loss", "val_cosine", "val_top1")}, "history": history}


# -- the agreement report ------------------------------------------------------------------------------------------
@torch.no_grad()
def _similarities(student: nn.Module, dataset, transform, texts: Sequence[torch.Tensor], device: torch.device,
                  batch_size: int, workers: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``[N, C]`` cosines of the student's image embeddings with each text matrix of ``texts`` (the backbone runs
    once per image), and the images' labels."""
    loader = DataLoader(EvalItems(dataset, transform), batch_size=batch_size, num_workers=workers)
    sims: list[list[torch.Tensor]] = [[] for _ in texts]
    for batch in loader:
        tokens = student.visual_tokens(batch["image"].to(device))
        for out, text in zip(sims, texts):
            out.append(student.similarity(tokens, text.to(device)).float().cpu())
    return [torch.cat(s) for s in sims], torch.as_tensor(list(dataset.targets), dtype=torch.long)


def _part(teacher_sims: torch.Tensor, tower_sims: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    ours, theirs = teacher_sims.argmax(1), tower_sims.argmax(1)
    labelled = bool(len(labels)) and bool((labels >= 0).all())
    return {"images": len(labels), "agreement": float((ours == theirs).float().mean()) if len(labels) else None,
            "top1_teacher_tower": float((ours == labels).float().mean()) if labelled else None,
            "top1_distilled_tower": float((theirs == labels).float().mean()) if labelled else None}


def agreement_report(student: nn.Module, tower: DistilledTextTower, teacher: ClipTeacher, data: PandDataModule,
                     templates: Sequence[str], device: torch.device) -> dict[str, Any]:
    """How often the student's zero-shot argmax with the distilled tower is the one with the teacher's (see the
    module), on the val and test images of the run."""
    splits = data.splits
    batch_size, workers = int(data.cfg["batch_size"]), int(data.cfg.get("num_workers", 0))
    split_mode = NOVEL_TEST in splits

    def vocabulary(names: Sequence[str], captions: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # A captions run's val "classes" are sentences, embedded as they are, as the run scores them.
        if captions:
            return teacher.caption_embeddings(names), tower.encode_texts(names)
        return teacher.class_embeddings(names, templates).cpu(), tower.class_embeddings(names, templates).cpu()

    report: dict[str, Any] = {}
    student.eval()
    if data.caption_vocabulary:  # no class anywhere but the val captions; the test split is scored by captions
        names = list(splits["val"].classes)
        t_text, d_text = vocabulary(names, captions=True)
        (t_sims, d_sims), labels = _similarities(student, splits["val"], data.eval_transform, (t_text, d_text),
                                                  device, batch_size, workers)
        report["val"] = {"all": _part(t_sims, d_sims, labels)}
        report["test_skipped"] = "a captions test split has no classes; its captions were not used"
        report["classes"] = {"all": len(names)}
        report["class_embedding_cosine"] = {"all": float((t_text * d_text).sum(-1).mean())}
        return report
    base = list(data.classes)
    novel = list(splits[NOVEL_TEST].classes) if split_mode else []
    names = base + novel
    t_text, d_text = vocabulary(names, captions=False)
    cosines = (t_text * d_text).sum(-1)
    report["classes"] = {"base": base, "novel": novel} if split_mode else {"all": names}
    report["class_embedding_cosine"] = {"all": float(cosines.mean())}
    if split_mode:
        report["class_embedding_cosine"].update(base=float(cosines[:len(base)].mean()),
                                                novel=float(cosines[len(base):].mean()))
    rows_base, rows_novel = list(range(len(base))), list(range(len(base), len(names)))
    sims = {}
    for split in ("val", "test", NOVEL_TEST):
        if split in splits and len(splits[split]):
            sims[split] = _similarities(student, splits[split], data.eval_transform, (t_text, d_text), device,
                                        batch_size, workers)
    for split in ("val", "test"):
        if split not in sims:
            continue
        (t_sims, d_sims), labels = sims[split]
        if not split_mode:
            report[split] = {"all": _part(t_sims, d_sims, labels)}
            continue
        # val and test hold base images; the novel test images are their own split, labelled among the novel classes
        parts = {"base": _part(t_sims[:, rows_base], d_sims[:, rows_base], labels)}
        all_t, all_d, all_y = [t_sims], [d_sims], [labels]
        if split == "test" and NOVEL_TEST in sims:
            (nt, nd), ny = sims[NOVEL_TEST]
            parts["novel"] = _part(nt[:, rows_novel], nd[:, rows_novel], ny)
            all_t, all_d, all_y = all_t + [nt], all_d + [nd], all_y + [torch.where(ny >= 0, ny + len(base), ny)]
        parts["all"] = _part(torch.cat(all_t), torch.cat(all_d), torch.cat(all_y))
        report[split] = parts
    report["note"] = ("zero-shot argmax of the student's image embeddings over the class names (template ensemble) "
                      "with the teacher's text tower vs the distilled one; base: base images among the base classes, "
                      "novel: novel images among the novel classes, all: the split's images among every class. Test "
                      "images are reported, never used to choose")
    return report


def format_report(record: Mapping[str, Any]) -> str:
    """The fit and the agreement as a few aligned lines (what the command prints on stderr)."""
    cfg, fit = record["text_cfg"], record["fit"]
    lines = [f"text tower {cfg['width']} wide x {cfg['layers']} layers x {cfg['heads']} heads: "
             f"{record['params'] / 1e6:.2f} M parameters (the teacher's text tower: "
             f"{record['teacher_text_params'] / 1e6:.2f} M), {fit['seconds']:.0f} s; chosen at step "
             f"{fit['best_step']} of {record['options']['steps']}: val loss {fit['val_loss']:.4f}, val cosine "
             f"{fit['val_cosine']:.4f}, val top-1 matching {100 * fit['val_top1']:.1f} %",
             "  agreement with the teacher's text tower (%), and the student's top-1 (%) with the teacher's / the "
             "distilled tower"]
    agreement = record["agreement"]
    for split in ("val", "test"):
        for part, r in (agreement.get(split) or {}).items():
            top1 = ("" if r["top1_teacher_tower"] is None else
                    f"   top-1 {100 * r['top1_teacher_tower']:6.2f} / {100 * r['top1_distilled_tower']:6.2f}")
            shown = "-" if r["agreement"] is None else f"{100 * r['agreement']:6.2f}"
            lines.append(f"  {split:<5} {part:<6} {r['images']:>6} images   agreement {shown}{top1}")
    lines.append("  class embedding cosine, teacher's vs distilled tower: " + ", ".join(
        f"{k} {v:.4f}" for k, v in agreement["class_embedding_cosine"].items()))
    return "\n".join(lines)


# -- the command ---------------------------------------------------------------------------------------------------
def _refuse_student(ckpt_path: Path):
    def check(loaded: LoadedStudent) -> None:
        model, config = loaded.model, loaded.config
        if not hasattr(model, "vocabulary"):
            raise ConfigError(f"no text tower can be distilled for {ckpt_path}: it holds a closed-set student "
                              f"(method={config['method']['name']}), which classifies its training classes with "
                              "its own classifier; a text tower serves an open-vocabulary student (method=openvocab), "
                              "which turns class names into its classifier with one")
        if model.fusion_kind == "cross_attention":
            raise ConfigError(f"no text tower can be distilled for {ckpt_path}: its method.fusion=cross_attention "
                              "attends over the per-token features of the teacher's text tower, which a distilled "
                              "tower does not reproduce (it is fitted on the pooled embedding); train with "
                              "method.fusion=none or film")
    return check


def _teacher_text_params(model: nn.Module) -> int:
    return int(sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("visual.", "logit_"))))


def fit_text_tower(ckpt_path: str | os.PathLike, out: str | os.PathLike, *, width: int | None = None,
                   heads: int | None = None, layers: int | None = None,
                   data_overrides: Mapping[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    """Distil the text tower of the teacher of ``ckpt_path`` (an open-vocabulary run) into ``out``; returns the
    record written to ``out/text_tower.json``. ``options``: those of :data:`DEFAULTS`; ``data_overrides``: changes
    to the run's ``data`` section (``{"root": ...}`` when the data moved)."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown text tower option(s) {', '.join(unknown)}; known: width, heads, layers, "
                          f"{', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **options}
    size = {k: v for k, v in (("width", width), ("heads", heads), ("layers", layers)) if v is not None}
    validate_text_tower_options({**opts, **size, "ckpt_path": ckpt_path, "out": out})
    ckpt_path, out = Path(ckpt_path), Path(out).expanduser().absolute()
    created = not out.exists()
    loaded, teacher = load_for_open_clip(
        ckpt_path, None, check=_refuse_student(ckpt_path),
        refusal=lambda reason: ConfigError(f"no text tower can be distilled for {ckpt_path}: {reason}"))
    student, config = loaded.model, with_data_overrides(loaded.config, data_overrides)
    check_tokenizer(teacher.tokenizer)
    teacher_cfg = teacher_model_cfg(config)
    text_cfg = tower_text_cfg(teacher_cfg["text_cfg"], width=width, heads=heads, layers=layers)
    embed_dim, quick_gelu = int(teacher.embed_dim), bool(teacher_cfg.get("quick_gelu", False))
    if int(student.embed_dim) != embed_dim:
        raise PandError(f"the teacher embeds in {embed_dim} dimensions, the student in {student.embed_dim}: the "
                        "teacher is not the one the student was trained with")
    device = torch.device(resolve_device(opts["device"]))
    templates = list(config["data"]["templates"])
    data = PandDataModule(config["data"], seed=int(config["seed"]))
    corpus = run_corpus(data, templates, teacher.tokenizer, opts["corpus"])
    if not corpus.val or len(corpus.train) < 2:
        raise ConfigError(f"the corpus has {len(corpus.train)} training and {len(corpus.val)} val texts; a fit needs "
                          "at least 2 and 1 (add texts with corpus=FILE)")
    counts = ", ".join(f"{k} {v}" for k, v in corpus.counts.items() if v)
    log.info("text tower corpus: %d training + %d val texts (%s)", len(corpus.train), len(corpus.val), counts)

    teacher.to(device)
    started = time.perf_counter()
    tokens, val_tokens = teacher.tokenizer(corpus.train), teacher.tokenizer(corpus.val)
    targets, val_targets = _embed(teacher.model.encode_text, tokens, device), _embed(teacher.model.encode_text,
                                                                                    val_tokens, device)
    teacher_seconds = time.perf_counter() - started
    temperature = opts["temperature"]
    if temperature is None:
        temperature = 1.0 / float(teacher.model.logit_scale.exp())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(opts["seed"]))
        tower = build_tower(text_cfg, embed_dim, quick_gelu).to(device)
    warm = warm_start(tower, teacher.model) if opts["warm_start"] else None
    log.info("fitting a text tower of %s parameters (the teacher's: %s) for %d steps", f"{param_count(tower):,}",
             f"{_teacher_text_params(teacher.model):,}", opts["steps"])
    prompts = corpus.counts["class_prompts"]  # first in corpus.train
    every_batch = prompts if prompts <= int(opts["batch_size"]) // EVERY_BATCH_SHARE else 0
    fit = fit_tower(tower, tokens, targets, val_tokens, val_targets, steps=int(opts["steps"]),
                    batch_size=int(opts["batch_size"]), lr=float(opts["lr"]), seed=int(opts["seed"]),
                    contrastive_weight=float(opts["contrastive_weight"]), temperature=float(temperature),
                    every_batch=every_batch)
    fit["class_prompts_in_every_batch"] = every_batch
    fit["teacher_embedding_seconds"] = round(teacher_seconds, 2)
    meta = tower_meta(teacher, text_cfg, embed_dim, quick_gelu, corpus.sha256)
    distilled = DistilledTextTower(tower, teacher.tokenizer, meta)
    started = time.perf_counter()
    agreement = agreement_report(student.to(device), distilled, teacher, data, templates, device)
    agreement["seconds"] = round(time.perf_counter() - started, 2)

    record = {
        "kind": "pand text tower",
        **meta,
        "tokenizer": type(teacher.tokenizer).__name__,
        "params": param_count(tower),
        "teacher_text_params": _teacher_text_params(teacher.model),
        "checkpoint": {"path": str(ckpt_path.absolute()), "blake2b": file_digest(ckpt_path)},
        "options": {"width": text_cfg["width"], "heads": text_cfg["heads"], "layers": text_cfg["layers"],
                    **{k: v for k, v in opts.items() if k not in ("device", "corpus")},
                    "temperature": float(temperature), "device": str(device),
                    "corpus": None if opts["corpus"] is None else str(opts["corpus"])},
        "warm_start": warm,
        "corpus": corpus.record(),
        "fit": fit,
        "agreement": agreement,
        "files": [TEXT_TOWER_WEIGHTS, TEXT_TOWER_RECORD],
        "load": f"pand export ckpt_path={ckpt_path} format=open_clip out=DIR text_tower={out}",
        "versions": {"pand": pand.__version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
                     "torch_threads": torch.get_num_threads()},
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / TEXT_TOWER_WEIGHTS, weights_bytes(tower, meta))
    atomic_write_json(out / TEXT_TOWER_RECORD, record)  # last: a folder with the new record has the new weights
    if created:
        mark_output_folder(out, "text-tower")
    log.info("%s", format_report(record))
    return record
