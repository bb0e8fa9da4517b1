"""Weight files: a state dict read from ``.safetensors`` or a torch file, for students and classifier teachers alike."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pand.errors import WeightsUnavailableError

#: Wrapper keys timm's ``load_state_dict`` does not unwrap: PyTorch's tutorial checkpoints keep the weights here.
_EXTRA_WRAPPER_KEYS = ("model_state_dict",)


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file, never unpickling arbitrary objects.

    Reading is timm's ``timm.models.load_state_dict``: ``.safetensors`` through safetensors, other files through
    ``torch.load(weights_only=True)``; it unwraps training checkpoints (``{'state_dict': ...}``, ``{'model': ...}``)
    and strips the ``module.`` (DistributedDataParallel) and ``_orig_mod.`` (torch.compile) prefixes. pand keeps:

    * ``weights_only=True`` passed explicitly, so a user's file is never unpickled whatever timm's default is (a timm
      whose ``load_state_dict`` has no ``weights_only`` is refused rather than used); timm adds only
      ``argparse.Namespace`` to torch's weights-only allowlist, for its own training checkpoints;
    * ``use_ema=False``: the trained weights themselves, as pand always loaded, not an EMA copy stored beside them;
    * its own messages: a missing file is named (timm raises a bare ``FileNotFoundError``), a file that is not a
      plain state dict is refused with the reason (pickled objects are named; timm's text advises
      ``weights_only=False``, which pand never does), and a checkpoint with no tensors at the top is refused with its
      keys;
    * unwrapping ``model_state_dict``, which timm does not know.

    Key mismatches with the model are reported by the callers, which know which keys (the classifier) they replace.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {path} does not exist")
    import inspect

    import timm
    from timm.models import load_state_dict

    if "weights_only" not in inspect.signature(load_state_dict).parameters:
        raise WeightsUnavailableError(
            f"cannot load {path} safely: timm {timm.__version__} reads weights files without torch.load's "
            "weights_only=True; upgrade timm (pip install -U timm)"
        )
    try:
        state = load_state_dict(str(path), use_ema=False, device="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any refusal to read becomes one clear message
        raise WeightsUnavailableError(
            f"could not load {path} as a plain state dict: {_unreadable_reason(path, err)}. Save the weights with "
            "torch.save(model.state_dict(), path) or safetensors.torch.save_file(model.state_dict(), path)"
        ) from err
    for key in _EXTRA_WRAPPER_KEYS:
        if isinstance(state.get(key), dict):
            from timm.models import clean_state_dict

            state = clean_state_dict(state[key])
    # A module's get_extra_state() may be any object; every other entry of a state dict is a tensor.
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor) and not k.endswith("_extra_state")]
    if not_tensors:
        listed = ", ".join(map(repr, not_tensors[:5])) + (", ..." if len(not_tensors) > 5 else "")
        raise WeightsUnavailableError(
            f"{path} is not a plain state dict: its entries {listed} are not tensors (pand unwraps checkpoints that "
            "keep the weights under 'state_dict', 'model' or 'model_state_dict'). Save the weights with "
            "torch.save(model.state_dict(), path)"
        )
    return state


def _unreadable_reason(path: Path, err: Exception) -> str:
    import pickle

    unpickling = next((e for e in (err, err.__cause__, err.__context__) if isinstance(e, pickle.UnpicklingError)), None)
    if unpickling is None:
        if isinstance(err, AttributeError) and "items" in str(err):
            return "it holds no dict of tensors"
        return f"it is not a torch.save or .safetensors file, or it is damaged ({type(err).__name__}: {err})"
    names: list[str] = []
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - not a zip checkpoint (a plain pickle, or no pickle at all)
        pass
    text = str(unpickling)
    if names or "Unsupported global" in text:
        objects = f" ({', '.join(names[:5])})" if names else ""
        return (f"it holds pickled Python objects{objects} besides tensors, and pand never unpickles objects from a "
                "weights file, since unpickling can run arbitrary code")
    # torch's text: "... WeightsUnpickler error: <the reason>\n\nCheck the documentation ..."
    core = text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip() or text
    return (f"torch.load(weights_only=True) cannot read it ({core}): it is not a file written by torch.save, or it "
            "holds pickled Python objects, which pand never unpickles since unpickling can run arbitrary code")
