"""A teacher ensemble (``teacher=ensemble``): several frozen teachers, each a full teacher config of kind ``clip`` or
``classifier``, distilled as one.

Each member m gives class logits ``z_m`` over the run's classes, exactly as it would alone: a classifier its own, a
CLIP teacher its zero-shot ones (``s_m * norm(f_img) @ T_m^T``, its own class text matrix ``T_m`` from the data's
templates and its own logit scale ``s_m``), each on its own view of the batch (its input size and normalisation, as
:class:`~pand.teachers.source.LiveTeacherSource` converts the batch for it alone). The ensemble provides

* ``logits``: ``log sum_m w_m softmax(z_m)``, the log of the members' averaged class distribution (averaged AFTER
  the softmax, as MobileCLIP's and Apple's dataset reinforcement average their teachers), so ``softmax(logits)`` is
  the mean distribution; every logit method (kd, dkd, LS, ofa, nrkd without its feature term) reads this average.
  ``w`` is ``teacher.member_weights`` normalised to sum 1 (equal when null). A method's temperature then softens the
  average (``softmax(logits / T)``, the average raised to ``1/T`` and renormalised);
* ``member_logits``: ``[B, M, C]``, every member's ``z_m`` side by side, for methods that distil from each member
  (``method=kd method.members=each``).

The average is computed in float32 with autocast off, whatever precision the members ran in (a low-precision pass,
:mod:`pand.teachers.precision`, lowers the members' networks only, as it lowers a CLIP teacher's image tower and
not its zero-shot logits).

A member is written as the name of a teacher config (``fmnist_clip``: exactly ``teacher=fmnist_clip``) or as a
mapping: ``{kind: classifier, ckpt: X}`` gets the kind's defaults (``teacher=classifier teacher.ckpt=X``),
``{teacher: vit_b16, logit_scale: learned}`` a named config's (``teacher=vit_b16 teacher.logit_scale=learned``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pand.config import group_option
from pand.config_catalogue import CONFIGS_DIR, config_groups
from pand.errors import ConfigError, WeightsUnavailableError, close_matches, did_you_mean
from pand.rules import raise_option_errors, show
from pand.teachers.frozen import FrozenTeacher
from pand.teachers.outputs import IMAGE_EMBEDS, LOGITS, MEMBER_LOGITS
from pand.teachers.registry import TeacherKind, get_teacher_kind, register_teacher_kind, teacher_kind_names
from pand.teachers.source import LiveTeacherSource

#: The kind's name (``teacher.kind=ensemble``, ``teacher=ensemble``).
KIND = "ensemble"
#: The key of a member mapping that names the teacher config it starts from (``{teacher: vit_b16, ...}``).
PRESET_KEY = "teacher"
#: Member settings that would be ignored: an ensemble reads neither learned text features nor stage features.
_UNUSED = {"text_features": "learned CoOp text features (members give zero-shot logits from the data's templates)",
           "stages": "stage features (an ensemble provides logits and member_logits only)"}
_EXAMPLE = "{kind: classifier, ckpt: runs/<run>/checkpoints/best.ckpt}"


def average_log_probs(member_logits: torch.Tensor,
                      weights: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    """``log sum_m w_m softmax(z_m)`` over dim 1 of ``member_logits`` ``[B, M, C]``: ``[B, C]`` float32.

    ``weights`` (M, positive, summing to 1; None: equal) weight the members. Computed as a log-sum-exp of the
    members' log-probabilities, in float32 with autocast off, so that no probability underflows to a log of 0.
    """
    with torch.autocast(member_logits.device.type, enabled=False):
        log_p = F.log_softmax(member_logits.float(), dim=-1)
        m = log_p.shape[1]
        if weights is None:
            log_w = log_p.new_full((m,), -math.log(m))
        else:
            log_w = torch.as_tensor(weights, dtype=torch.float32, device=log_p.device).log()
        return torch.logsumexp(log_p + log_w.view(1, m, 1), dim=1)


class EnsembleMember(nn.Module):
    """One member as the ensemble runs it: its own view of the batch, and its class logits.

    ``mean``/``std`` are the normalisation of the images the ensemble receives; the member's
    :class:`~pand.teachers.source.LiveTeacherSource` converts them to its own size and normalisation, as it would for
    the member alone. A member with a text tower (``text_embeds``, C x D, with ``logit_scale``) gives its zero-shot
    logits; one without gives its own ``logits``.
    """

    def __init__(self, teacher: FrozenTeacher, mean: Sequence[float], std: Sequence[float],
                 text_embeds: torch.Tensor | None = None, logit_scale: float | None = None) -> None:
        super().__init__()
        self.source = LiveTeacherSource(teacher, mean, std)
        # Derived from the frozen member: moves with the module, never saved in a checkpoint.
        self.register_buffer("text_embeds", None if text_embeds is None else text_embeds.detach().float().clone(),
                             persistent=False)
        self.logit_scale = None if logit_scale is None else float(logit_scale)

    @property
    def teacher(self) -> FrozenTeacher:
        return self.source.teacher

    @property
    def num_classes(self) -> int:
        return int(self.text_embeds.shape[0]) if self.text_embeds is not None else int(self.teacher.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.text_embeds is None:
            return self.source({"image": images}, {LOGITS})[LOGITS].float()
        embeds = self.source({"image": images}, {IMAGE_EMBEDS})[IMAGE_EMBEDS]
        # The zero-shot classifier in float32 (the expression of ZeroShotLogits), as the member alone computes it.
        with torch.autocast(images.device.type, enabled=False):
            return self.logit_scale * embeds.float() @ self.text_embeds.t()


class EnsembleTeacher(FrozenTeacher):
    """Frozen members as one teacher: ``member_logits`` ``[B, M, C]`` and their average after the softmax.

    Its own normalisation (``mean``/``std``) is the data's and it has no input size: every member converts the batch
    to its own (see :class:`EnsembleMember`).
    """

    provides = frozenset({LOGITS, MEMBER_LOGITS})

    def __init__(self, members: Sequence[EnsembleMember], weights: Sequence[float] | None = None, *,
                 mean: Sequence[float], std: Sequence[float], identity: Mapping[str, Any]) -> None:
        super().__init__()
        if not members:
            raise ConfigError("a teacher ensemble needs at least one member (teacher.members)")
        self.members = nn.ModuleList(members)
        counts = sorted({m.num_classes for m in members})
        if len(counts) > 1:
            raise ConfigError(f"the members of a teacher ensemble give logits over different class counts {counts}; "
                              "every member must answer over the run's classes")
        self.num_classes = counts[0]
        self.weights = normalised_weights(weights, len(members))
        self.image_size = None
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.identity = dict(identity)
        self.freeze()

    @property
    def stage_root(self) -> nn.Module:
        raise ConfigError("a teacher ensemble gives no stage features (it provides logits and member_logits); "
                          "use one of its members as the teacher for a method reading stage features")

    def outputs(self, images: torch.Tensor, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        keys = set(keys)
        if not keys & self.provides:
            return {}
        member_logits = torch.stack([member(images) for member in self.members], dim=1)
        out = {}
        if MEMBER_LOGITS in keys:
            out[MEMBER_LOGITS] = member_logits
        if LOGITS in keys:
            out[LOGITS] = average_log_probs(member_logits, self.weights)
        return out


class MemberAverage(nn.Module):
    """A source of ``member_logits`` (an ensemble's teacher cache) that also serves their average as ``logits``,
    exactly as the live ensemble computes it (:func:`average_log_probs`)."""

    def __init__(self, inner: nn.Module, weights: Sequence[float]) -> None:
        super().__init__()
        self.inner, self.weights = inner, list(weights)

    @property
    def provides(self) -> frozenset[str]:
        return frozenset({LOGITS, MEMBER_LOGITS})

    def forward(self, batch: dict[str, torch.Tensor], keys: Iterable[str]) -> dict[str, torch.Tensor]:
        keys = set(keys)
        members = self.inner(batch, {MEMBER_LOGITS})[MEMBER_LOGITS]
        out = {MEMBER_LOGITS: members} if MEMBER_LOGITS in keys else {}
        if LOGITS in keys:
            out[LOGITS] = average_log_probs(members, self.weights)
        return out


def normalised_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """``teacher.member_weights`` divided by their sum (equal weights when None)."""
    if weights is None:
        return [1.0 / count] * count
    errors = weight_errors(weights, count)
    if errors:
        raise ConfigError(errors[0])
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def weight_errors(weights: Any, count: int) -> list[str]:
    """Why ``teacher.member_weights`` is not null or ``count`` finite positive numbers (empty when it is)."""
    if weights is None:
        return []
    ok = isinstance(weights, Sequence) and not isinstance(weights, str) and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0 for w in weights)
    if not ok or len(weights) != count:
        return [f"teacher.member_weights={show(weights)} is not allowed: expected null (equal weights) or a list of "
                f"{count} numbers > 0, one per member of teacher.members (they are divided by their sum)"]
    return []


# ------------------------------------------------------------------------------------------- members' settings
@lru_cache(maxsize=None)
def _teacher_configs() -> dict[str, dict[str, Any]]:
    """Every option of the ``teacher`` config group as ``teacher=NAME`` composes it, the kinds' defaults included."""
    names = list(config_groups().get("teacher", []))
    for kind in teacher_kind_names():
        option = get_teacher_kind(kind).defaults_option or kind
        if option not in names and (CONFIGS_DIR / "teacher" / f"{option}.yaml").is_file():
            names.append(option)
    return {name: group_option("teacher", name) for name in names}


def _kind_keys(kind: str) -> tuple[set[str], set[str]]:
    """The settings a member of ``kind`` may have (every key of the kind's configs) and those it must give (the keys
    every selectable config of the kind has and its defaults lack: a CLIP teacher's model and pretrained)."""
    configs = _teacher_configs()
    allowed = set().union(*(c.keys() for c in configs.values() if c.get("kind") == kind)) | {"kind"}
    defaults = configs.get(get_teacher_kind(kind).defaults_option or kind, {})
    selectable = [set(c) for name, c in configs.items() if c.get("kind") == kind and not name.startswith("_")]
    return allowed, (set.intersection(*selectable) - set(defaults) if selectable else set())


def written(entry: Any) -> str:
    """A member as the user wrote it, for messages: ``fmnist_clip`` or ``{kind: classifier, ckpt: a.ckpt}``."""
    if isinstance(entry, Mapping):
        return "{" + ", ".join(f"{k}: {v if isinstance(v, str) else show(v)}" for k, v in entry.items()) + "}"
    return entry if isinstance(entry, str) else show(entry)


def _presets() -> list[str]:
    """The teacher configs a member may name: every ``teacher=NAME`` but the ensemble's."""
    configs = _teacher_configs()
    return [n for n in config_groups().get("teacher", []) if configs[n].get("kind") != KIND]


def _base(where: str, entry: Any, given: dict[str, Any], preset: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The settings member ``entry`` starts from (a named teacher config's, else its kind's defaults), or why none."""
    configs, presets = _teacher_configs(), _presets()
    nested = f"{where}={written(entry)}: a teacher ensemble cannot be a member of another; list its members here"
    if preset is not None:
        if isinstance(preset, str) and preset in configs and configs[preset].get("kind") == KIND:
            return None, nested
        if not isinstance(preset, str) or preset not in presets:
            hint = did_you_mean([repr(m) for m in close_matches(str(preset), presets)])
            return None, (f"{where}={written(entry)}: {show(preset)} is not a teacher config{hint}; teacher configs: "
                          f"{', '.join(presets)}")
        base = configs[preset]
        if "kind" in given and given["kind"] != base.get("kind"):
            return None, (f"{where}={written(entry)}: teacher config {preset!r} is of kind {base.get('kind')!r}, not "
                          f"{show(given['kind'])}")
        return dict(base), None
    name = given.get("kind")
    if name is None:
        return None, (f"{where}={written(entry)} does not say its kind: write {{kind: clip, model: ..., pretrained: "
                      f"...}}, {_EXAMPLE}, or the name of a teacher config ({', '.join(presets)})")
    if name == KIND:
        return None, nested
    kinds = [k for k in teacher_kind_names() if k != KIND]
    if name not in kinds:
        return None, (f"{where}.kind={show(name)} is not allowed: expected one of {', '.join(map(repr, kinds))}"
                      f"{did_you_mean([repr(m) for m in close_matches(str(name), kinds)])}")
    kind = get_teacher_kind(name)
    option = kind.defaults_option or kind.name
    if option not in configs:
        return None, f"{where}: teacher kind {kind.name!r} has no config teacher/{option}.yaml to fill a member from"
    return dict(configs[option]), None


def _member(index: int, entry: Any) -> tuple[TeacherKind | None, dict[str, Any], list[str]]:
    """Member ``index``: its kind, its settings with the defaults filled in, and what is wrong with them."""
    where = f"teacher.members[{index}]"
    if isinstance(entry, str):
        given: dict[str, Any] = {}
        preset: Any = entry
    elif isinstance(entry, Mapping):
        given = {str(k): v for k, v in entry.items()}
        preset = given.pop(PRESET_KEY, None)
    else:
        return None, {}, [f"{where}={written(entry)} is not a teacher: expected the name of a teacher config "
                          f"({', '.join(_presets())}) or a mapping such as {_EXAMPLE}"]
    base, error = _base(where, entry, given, preset)
    if base is None:
        return None, {}, [error]
    kind = get_teacher_kind(str(base.get("kind")))
    errors = []
    if LOGITS not in kind.provides:
        errors.append(f"{where}={written(entry)}: a {kind.name} teacher gives no class logits to average")
    allowed, required = _kind_keys(kind.name)
    for key in sorted(set(given) - allowed):
        hint = did_you_mean([f"{where}.{m}" for m in close_matches(key, sorted(allowed))])
        errors.append(f"{where}.{key}: a {kind.name} teacher has no such setting{hint}; its settings: "
                      f"{', '.join(sorted(allowed))}")
    settings = {**base, **given}
    missing = sorted(required - set(settings))
    if missing:
        named = [n for n in _presets() if _teacher_configs()[n].get("kind") == kind.name]
        errors.append(f"{where}={written(entry)} does not give {' and '.join(missing)}, which every {kind.name} "
                      f"teacher config sets: give them, or start from a teacher config ({', '.join(named)}) by its "
                      f"name alone or as {{{PRESET_KEY}: NAME, ...}}")
    for key, what in _UNUSED.items():
        if settings.get(key) is not None:
            errors.append(f"{where}.{key}={show(settings[key])} is set, but a member of a teacher ensemble reads no "
                          f"{what}; remove it")
    if not errors:  # the kind's own checks, on settings that are complete
        errors += [f"{where} ({written(entry)}): {e}" for e in kind.setting_errors(settings)]
    return kind, settings, errors


def members_of(teacher: Mapping[str, Any]) -> tuple[list[tuple[TeacherKind, dict[str, Any]]], list[str]]:
    """The members of an ensemble's ``teacher`` settings (kind, settings with the defaults filled in) and every
    problem with them or with ``teacher.member_weights``."""
    entries = teacher.get("members")
    if isinstance(entries, (str, Mapping)) or not isinstance(entries, Sequence) or not entries:
        return [], [f"teacher.members={show(entries)}: a teacher ensemble needs a non-empty list of teachers, e.g. "
                    f"'teacher.members=[{_EXAMPLE},{{kind: classifier, ckpt: runs/<other>/checkpoints/best.ckpt}}]' "
                    "or names of teacher configs ([fmnist_clip, ...])"]
    members, errors = [], []
    for i, entry in enumerate(entries):
        kind, settings, problems = _member(i, entry)
        errors += problems
        if kind is not None:
            members.append((kind, settings))
    return members, errors + weight_errors(teacher.get("member_weights"), len(entries))


def checked_members(teacher: Mapping[str, Any]) -> list[tuple[TeacherKind, dict[str, Any]]]:
    """:func:`members_of`, refusing (:class:`ConfigError`, every problem listed) an ensemble with any problem."""
    members, errors = members_of(teacher)
    raise_option_errors(errors, "teacher ensemble setting")
    return members


def load_ensemble_teacher(teacher: Mapping[str, Any], *, classes: Sequence[str], data: Mapping[str, Any],
                          device: str | torch.device = "cpu") -> EnsembleTeacher:
    """The ensemble of a ``teacher=ensemble`` config over the run's ``classes``: every member loaded as its kind
    loads it alone (a member for other classes is refused by its own kind, named by its place in the list)."""
    entries = list(teacher["members"] or []) if "members" in teacher else []
    members = []
    for i, (kind, settings) in enumerate(checked_members(teacher)):
        try:
            model = kind.load(settings, data=data, classes=classes, device=device)
        except (ConfigError, WeightsUnavailableError) as err:
            raise type(err)(f"teacher.members[{i}] ({written(entries[i])}): {err}") from err
        text, scale = None, None
        if kind.has_text:
            text = model.class_embeddings(list(classes), list(data.get("templates") or ()))
            scale = model.logit_scale
        members.append(EnsembleMember(model, data["mean"], data["std"], text, scale))
    identity = {"kind": KIND, "members": [dict(m.teacher.identity) for m in members]}
    ensemble = EnsembleTeacher(members, teacher.get("member_weights"), mean=data["mean"], std=data["std"],
                               identity=identity)
    if ensemble.num_classes != len(classes):
        raise ConfigError(f"the members of the teacher ensemble give logits over {ensemble.num_classes} classes; this "
                          f"run has {len(classes)}")
    return ensemble.to(device)


@register_teacher_kind(KIND)
class EnsembleKind(TeacherKind):
    """Several clip / classifier teachers as one: the average of their class distributions as ``logits``, and each
    member's logits as ``member_logits``.

    Its teacher cache stores the members' logits side by side (``member_logits``), never their average alone, so a
    run from the cache serves both, the average computed with the run's ``teacher.member_weights``; the data's
    templates are part of the cache's record, since its CLIP members read them.
    """

    provides = frozenset({LOGITS, MEMBER_LOGITS})
    cached = frozenset({MEMBER_LOGITS})
    served_from_cache = frozenset({LOGITS, MEMBER_LOGITS})
    reads_templates = True

    def load(self, teacher: Mapping[str, Any], *, data: Mapping[str, Any], classes: Sequence[str] | None,
             device: str | torch.device) -> EnsembleTeacher:
        if classes is None:
            raise ConfigError("a teacher ensemble is loaded for a run's classes; none were given")
        return load_ensemble_teacher(teacher, classes=classes, data=data, device=device)

    def spec(self, teacher: Mapping[str, Any]) -> dict[str, Any]:
        """The members' specs in order: a cache is refused when any member changes. The member weights are not
        part of it: they combine the members' logits, which is all a cache would store."""
        return {"kind": self.name,
                "members": [kind.spec(settings) for kind, settings in checked_members(teacher)]}

    def setting_errors(self, teacher: Mapping[str, Any]) -> list[str]:
        return members_of(teacher)[1]

    def context(self, teacher: FrozenTeacher) -> dict[str, Any]:
        return {**super().context(teacher), "num_classes": teacher.num_classes,
                "member_weights": list(teacher.weights)}

    def cache_contents(self, teacher: FrozenTeacher, classes: Sequence[str],
                       templates: Sequence[str] | None) -> tuple[torch.Tensor | None, dict[str, Any]]:
        return None, {"num_members": len(teacher.members)}

    def from_cache(self, source: nn.Module, teacher: Mapping[str, Any]) -> nn.Module:
        count = len(checked_members(teacher))
        return MemberAverage(source, normalised_weights(teacher.get("member_weights"), count))

    def context_from_cache(self, meta: Mapping[str, Any], teacher: Mapping[str, Any]) -> dict[str, Any]:
        count = len(teacher.get("members") or [])
        return {**super().context_from_cache(meta, teacher), "num_classes": len(meta["classes"]),
                "member_weights": normalised_weights(teacher.get("member_weights"), count)}
