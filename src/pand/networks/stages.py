"""Intermediate (stage) features of any model, captured by forward hooks during its ordinary forward pass.

Methods such as OFA, NRKD and PAT read the feature maps (or token sequences) of named stages. pand never rewrites a
model's ``forward`` to get them: :class:`StageTap` registers forward hooks on the named submodules, so one normal
forward pass yields the logits and the stage features together, for any timm, torchvision or pand model.

Stage names are submodule paths (``layer3``, ``stages.2``, ``features.6``); ``method.stages`` names them, checked by
:func:`check_stage_names`. :func:`default_stages` finds them without per-architecture tables, in the network a pand
Student keeps under ``backbone`` (and open_clip's timm image tower under ``trunk``), in this order:

1. timm's ``feature_info`` (its own list of stages). Its deepest entry is replaced by the map the model pools when
   that is a later module at the same resolution: timm's EfficientNets and MobileNetV2s list ``blocks.6``, then run
   ``conv_head`` and ``bn2`` before pooling, so their deepest stage is ``bn2`` (1280 channels, not 320). Every
   method then reads what the classifier reads, and the open-vocabulary conv head projects the pooled map.
2. ``layer1..4`` (torchvision ResNets) and ``stage1..4`` (pand's CIFAR networks, torchvision's ShuffleNet).
3. A dry run of the model's top-level blocks, for any other CNN (torchvision's MobileNets, EfficientNets, ConvNeXt,
   RegNet, VGG, DenseNet, MNASNet, a plain ``nn.Module``): its children, one level inside the ``nn.Sequential`` /
   ``nn.ModuleList`` among them whose children change resolution (``features``, ``trunk_output``, ``blocks``), up
   to the global pool or classifier. One forward pass of zeros at the input size (the run's when known, else 64 px,
   then 224), in eval mode without gradients on the model's device, train modes and random state restored after,
   records each block's output size; a stage is the last block of each resolution, the deepest one the map the model
   pools. Resolutions must shrink, so a channels-last network (torchvision's Swin) is refused, not misread; maps that
   turn into tokens (a ViT's patch embedding) leave the model to rule 4.
4. Transformers (open_clip's visual tower, torchvision's ViT, block lists without ``feature_info``): four blocks spread
   over ``blocks``, ``transformer.resblocks``, ``resblocks`` or ``encoder.layers``, the last included.

Shapes are discovered by :func:`stage_shapes` with a dry run at the real input size.

Every stage feature comes out as a CNN map ``[B, C, H, W]`` or tokens ``[B, N, C]``, whatever the model's own layout.
One rule per stage, read from the nearest enclosing module that declares a layout: timm's ``output_fmt == "NHWC"``
(Swin, MambaOut, Sequencer keep maps channels-last) permutes 4-D outputs to ``[B, C, H, W]``; ``batch_first is False``
(a sequence-first open_clip ``Transformer``) transposes 3-D outputs ``[N, B, C]`` to ``[B, N, C]``.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
from torch import nn

from pand.errors import ConfigError

_CONVENTIONS = (("layer1", "layer2", "layer3", "layer4"), ("stage1", "stage2", "stage3", "stage4"))
# Block lists of transformers that have neither feature_info nor numbered stages (open_clip's ViT, torchvision's ViT).
_BLOCK_LISTS = ("blocks", "transformer.resblocks", "resblocks", "encoder.layers")
_NUM_BLOCK_STAGES = 4
# Containers holding a network's blocks; a child of the model of one of these types is looked into.
_CONTAINERS = (nn.Sequential, nn.ModuleList)
# The model's children where the head begins: the trunk ends at the first of them that runs.
_HEAD_NAMES = frozenset({"avgpool", "global_pool", "head", "heads", "classifier", "fc", "head_drop", "fc_norm",
                         "pre_logits", "flatten"})
_HEAD_TYPES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Linear)
# Blocks that hand on their input in eval mode (timm's final_conv placeholder): never a stage of their own. An
# in-place activation hands on its input too, but as the last word on that tensor it is the stage.
_PASSTHROUGH = (nn.Identity, nn.modules.dropout._DropoutNd)
# Input sides of the dry run when the model's input size is unknown: small, and then what every ImageNet CNN takes.
_DRY_RUN_SIDES = (64, 224)
# The key of the extra module a dry run watches (no submodule path has a space).
_WATCH = " watch"

# Stage layouts that need rearranging (see the module docstring).
CHANNELS_LAST = "NHWC"
SEQUENCE_FIRST = "NBC"


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The network whose blocks are the stages, and its path in ``model``: pand's Student keeps it under
    ``backbone``, open_clip's timm image tower under ``trunk``."""
    prefix = ""
    for attr in ("backbone", "trunk"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            model, prefix = inner, f"{prefix}{attr}."
    return model, prefix


def _spread(items: list) -> list:
    """Four (or all, if fewer) evenly spaced items, the last always included: its output is what the head reads."""
    n, k = len(items), min(_NUM_BLOCK_STAGES, len(items))
    return [items[(i + 1) * n // k - 1] for i in range(k)]


def _input_sizes(model: nn.Module, inner: nn.Module, input_size) -> list[tuple[int, int, int]]:
    """The input sizes ``(C, H, W)`` to try a dry run at: the given one, the model's own, else small then 224 px."""
    for size in (input_size, getattr(model, "input_size", None), getattr(inner, "image_size", None)):
        if size is None:
            continue
        size = (int(size),) * 2 if isinstance(size, int) else tuple(int(s) for s in size)
        return [size if len(size) == 3 else (3, *size[-2:])]
    return [(3, side, side) for side in _DRY_RUN_SIDES]


def _dry_run(model: nn.Module, modules: dict[str, nn.Module], size: Sequence[int]) -> list[tuple[str, tuple, bool]]:
    """One eval-mode forward of zeros without gradients: ``(path, output shape, output is its input)`` of each of
    ``modules`` in the order they finished. Train modes and random states are left as they were."""
    ran: list[tuple[str, tuple, bool]] = []

    def keeper(path: str):
        def keep(module, args, output) -> None:
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            shape = tuple(out.shape) if torch.is_tensor(out) else ()
            ran.append((path, shape, bool(args) and out is args[0]))

        return keep

    tensor = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    dtype = tensor.dtype if tensor is not None else torch.float32
    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(keeper(p)) for p, m in modules.items()]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            model.eval()
            model(torch.zeros(1, *size, device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    return ran


def _is_head(name: str, module: nn.Module) -> bool:
    return name in _HEAD_NAMES or isinstance(module, _HEAD_TYPES)


def _trunk_blocks(model: nn.Module, size: Sequence[int], watch: str | None = None
                  ) -> tuple[list[tuple[str, tuple[int, int] | None]], tuple | None]:
    """The top-level blocks of ``model`` up to its head, in the order they ran, each with its output's ``(H, W)``;
    and the output shape of the module ``watch`` if it ran before the last of them ended. The first block whose output
    is not a 4-D map (a transformer's tokens) ends the list with None for its size."""
    children = dict(model.named_children())
    watched = {} if watch is None else {_WATCH: model.get_submodule(watch)}
    inside = {f"{name}.{sub}": (name, m) for name, child in children.items() if isinstance(child, _CONTAINERS)
              for sub, m in child.named_children()}
    ran = _dry_run(model, {**children, **{p: m for p, (_, m) in inside.items()}, **watched}, size)
    # A container is looked into when its children change resolution (torchvision's features, timm's stages); one
    # whose children share one (a ResNet layer, a ConvNeXt stage) is a block itself. A ModuleList never runs itself.
    sides: dict[str, set] = {}
    for path, shape, _ in ran:
        if path in inside and len(shape) == 4:
            sides.setdefault(inside[path][0], set()).add(shape[-2:])
    opened = {name for name, child in children.items() if not _is_head(name, child) and (
        isinstance(child, nn.ModuleList) or (isinstance(child, _CONTAINERS) and len(sides.get(name, ())) > 1))}
    blocks, last_ended = [], -1
    for index, (path, shape, passthrough) in enumerate(ran):
        if path in inside:
            parent, module = inside[path]
            if parent not in opened:
                continue
        elif path in children and path not in opened:
            module = children[path]
            if _is_head(path, module):
                break
        else:
            continue  # an opened container's own output (its blocks came first), or the watched module
        if passthrough and isinstance(module, _PASSTHROUGH):  # the block before it holds the same tensor
            continue
        if len(shape) != 4:
            blocks.append((path, None))
            break
        blocks.append((path, tuple(shape[-2:])))
        last_ended = index
    watched = [shape for path, shape, _ in ran[:last_ended + 1] if path == _WATCH]
    return blocks, (watched[0] if watched else None)


def _last_of_each_resolution(blocks: list[tuple[str, tuple[int, int] | None]]) -> list[str] | None:
    """The last block of each resolution, or None unless resolutions shrink from block to block."""
    sides = [hw for _, hw in blocks]
    if None in sides:
        return None  # maps turned into tokens: a transformer (maybe on a conv stem), whose blocks are its stages
    if any(b[0] > a[0] or b[1] > a[1] for a, b in zip(sides, sides[1:])):
        return None  # growing maps: not a CNN trunk (or one laid out channels-last, whose "width" is its channels)
    return [path for i, (path, hw) in enumerate(blocks) if i == len(blocks) - 1 or sides[i + 1] != hw]


def _resolution_stages(model: nn.Module, sizes: list[tuple[int, int, int]]) -> tuple[list[str] | None, str]:
    """The dry-run stages of ``model`` (None if it has fewer than two resolutions) and why none were found."""
    reason = ""
    for size in sizes:
        try:
            blocks, _ = _trunk_blocks(model, size)
        except Exception as err:  # noqa: BLE001 - a model refuses an input in many ways; the next size may fit
            reason = f"a dry run at {size[-2]} x {size[-1]} px failed: {type(err).__name__}: {err}"
            continue
        found = _last_of_each_resolution(blocks)
        if found is not None and len(found) >= 2:
            return found, ""
        return None, "its top-level blocks do not shrink maps in steps"
    return None, reason


def _pooled_map(model: nn.Module, last: str, sizes: list[tuple[int, int, int]]) -> str:
    """``last`` (timm's deepest listed stage), or the later top-level block at its resolution that the model pools."""
    if getattr(model, "output_fmt", "NCHW") != "NCHW":
        return last  # channels-last maps: the dry run's resolutions would be misread
    try:
        blocks, shape = _trunk_blocks(model, sizes[0], watch=last)
    except Exception:  # noqa: BLE001 - timm's own list stands when the model does not run at this size
        return last
    if blocks and shape is not None and len(shape) == 4 and blocks[-1][1] == tuple(shape[-2:]):
        return blocks[-1][0]
    return last


def default_stages(model: nn.Module, input_size: int | Sequence[int] | None = None) -> list[str]:
    """Submodule paths of ``model``'s stages, shallow to deep (relative to ``model`` itself).

    ``input_size`` (``(C, H, W)``, ``(H, W)`` or a side) sizes the dry run when one is needed; without it the model's
    ``input_size`` (a pand Student built for the run's size) or ``image_size`` (open_clip's tower), else 64 px.
    """
    inner, prefix = _unwrap(model)
    names = dict(inner.named_modules())
    sizes = _input_sizes(model, inner, input_size)
    info = getattr(inner, "feature_info", None)
    if info is not None:
        entries = [e for e in (info.info if hasattr(info, "info") else info) if e.get("module") in names]
        if len({e.get("reduction") for e in entries}) == 1 and len(entries) > _NUM_BLOCK_STAGES:
            # A flat ViT / Mixer lists every block at one resolution: four spread over the depth, as for block lists.
            return [prefix + e["module"] for e in _spread(entries)]
        if entries:
            found = [e["module"] for e in entries]
            found[-1] = _pooled_map(inner, found[-1], sizes)
            return [prefix + n for n in found]
    for convention in _CONVENTIONS:
        found = [n for n in convention if n in names]
        if len(found) >= 2:
            return [prefix + n for n in found]
    found, reason = _resolution_stages(inner, sizes)
    if found:
        return [prefix + n for n in found]
    for path in _BLOCK_LISTS:
        blocks = names.get(path)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks):
            return [f"{prefix}{path}.{i}" for i in _spread(list(range(len(blocks))))]
    example = ",".join(prefix + n for n in list(dict(inner.named_children()))[:2]) or "layer2,layer3"
    raise ConfigError(
        f"cannot tell the stages of {type(inner).__name__} ({reason or 'no stages found'}): name them, e.g. "
        f"method.stages=[{example}] (submodule paths as in model.named_modules())"
    )


def _near(name: str, paths: list[str], limit: int = 12) -> list[str]:
    """Paths close to ``name``: similar spellings, then the children of its deepest existing parent."""
    parts = name.split(".")
    parent = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in paths), "")
    children = [p for p in paths if p and p.rpartition(".")[0] == parent]
    near = dict.fromkeys(difflib.get_close_matches(name, paths, n=5, cutoff=0.6) + children)
    return [p for p in near if p][:limit]


def check_stage_names(model: nn.Module, names, setting: str = "stage names") -> list[str]:
    """``names`` (the value of ``setting``) as a list of submodule paths of ``model``; a :class:`ConfigError` naming
    the unknown ones, with the paths near each, otherwise."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{setting} must be a list of submodule paths, e.g. [backbone.layer2,backbone.layer3]; "
                          f"got {names!r}")
    paths = [p for p, _ in model.named_modules()]
    known = set(paths)
    unknown = [n for n in names if n not in known]
    if unknown:
        which = ", ".join(repr(n) for n in unknown)
        hints = "; ".join(f"near {n!r}: {', '.join(_near(n, paths)) or '(none)'}" for n in unknown)
        raise ConfigError(f"{setting}: {type(model).__name__} has no submodule {which} ({hints}); stage names are "
                          "paths from model.named_modules()")
    return list(names)


def _stage_layout(modules: dict[str, nn.Module], name: str) -> str | None:
    """The layout flag of the nearest module enclosing stage ``name``, or None for pand's own layout."""
    parts = name.split(".")
    # Enclosing modules only: open_clip's Transformer is sequence-first inside, yet returns batch-first tokens itself.
    for depth in range(len(parts) - 1, -1, -1):
        parent = modules.get(".".join(parts[:depth]))
        fmt, batch_first = getattr(parent, "output_fmt", None), getattr(parent, "batch_first", None)
        if isinstance(fmt, str):
            return CHANNELS_LAST if fmt == CHANNELS_LAST else None
        if isinstance(batch_first, bool):
            return None if batch_first else SEQUENCE_FIRST
    return None


def to_pand_layout(feature: torch.Tensor, layout: str | None) -> torch.Tensor:
    """A stage tensor in ``layout`` (None, :data:`CHANNELS_LAST` or :data:`SEQUENCE_FIRST`) as ``[B, C, H, W]`` /
    ``[B, N, C]`` (a view)."""
    if layout == CHANNELS_LAST and feature.dim() == 4:
        return feature.permute(0, 3, 1, 2)
    if layout == SEQUENCE_FIRST and feature.dim() == 3:
        return feature.transpose(0, 1)
    return feature


class StageTap:
    """Forward hooks that keep the outputs of ``names`` from the latest forward pass of ``model``.

    Use as ``with StageTap(model, names) as tap: logits = model(x); feats = tap.features``; or keep one open for a
    module's lifetime and call :meth:`close` when done. Features are kept as ``[B, C, H, W]`` maps or ``[B, N, C]``
    tokens (channels-last maps are permuted, sequence-first tokens transposed: views, no copies).
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.names = check_stage_names(model, names)
        modules = dict(model.named_modules())
        self.features: dict[str, torch.Tensor] = {}
        self.enabled = True  # a module that reads stages only in training steps turns this off in between
        self.layouts = {n: _stage_layout(modules, n) for n in self.names}
        self._handles = [modules[n].register_forward_hook(self._keeper(n)) for n in self.names]

    def _keeper(self, name: str):
        layout = self.layouts[name]

        def keep(module: nn.Module, args, output) -> None:
            if self.enabled:
                # Some blocks return (features, extras); the features come first.
                feature = output[0] if isinstance(output, (tuple, list)) else output
                self.features[name] = to_pand_layout(feature, layout)

        return keep

    def take(self) -> list[torch.Tensor]:
        """The stage features of the latest forward pass, in stage order, and forget them."""
        missing = [n for n in self.names if n not in self.features]
        if missing:
            raise RuntimeError(f"stage {missing[0]!r} did not run in the last forward pass")
        out = [self.features.pop(n) for n in self.names]
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> StageTap:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pair_deepest(student: Sequence, teacher: Sequence) -> tuple[list, list]:
    """Student and teacher stages paired deepest first: the last ``n`` of each, ``n`` the smaller count."""
    n = min(len(student), len(teacher))
    return list(student[len(student) - n:]), list(teacher[len(teacher) - n:])


def require_input_size(student: nn.Module, method: str) -> tuple[int, ...]:
    """The student's ``input_size`` (3, H, W), which methods with stage heads need for their dry run."""
    size = getattr(student, "input_size", None)
    if size is None:
        raise ConfigError(f"{method} sizes its modules with a dry run at the input size: build the student with "
                          "image_size=... (or set student.input_size = (3, H, W))")
    return tuple(size)


def stage_shapes(model: nn.Module, names: Sequence[str], input_size: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-sample shapes of the stage features at ``input_size`` (C, H, W), found with one dry run in eval mode.

    Maps come as ``(C, H, W)``, tokens as ``(N, C)``, in :class:`StageTap`'s layout.
    """
    was_training = model.training
    model.eval()
    try:
        with StageTap(model, names) as tap, torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(1, *input_size, device=device))
            return [tuple(f.shape[1:]) for f in tap.take()]
    finally:
        model.train(was_training)
