"""Pretrained weights on machines without network: honour ``HF_HUB_OFFLINE`` and say how to go on.

Teachers (open_clip tags, ``hf-hub:`` models) and students (timm, torchvision) fetch their pretrained weights through
Hugging Face hub or torch hub. Offline, Hugging Face hub retries every request five times with back-off, and open_clip
and timm each try two file names, so a run used to spend about 50 s in retries (every log line printed twice) before
pand's own message. pand therefore:

* never sets or clears ``HF_HUB_OFFLINE`` itself (the user's choice wins, in both directions);
* treats ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``, which huggingface_hub also reads) as "this machine is
  offline" for every pretrained weight, torch hub ones included: a weight that is not in the local cache is refused at
  once, before any library is asked to download it, with a message naming the model, the tag and the cache folder;
* when a download does fail for a network reason, suggests ``HF_HUB_OFFLINE=1`` (so the next run fails at once) and a
  local weights file.

The cache look-ups use the libraries' own functions (``huggingface_hub.try_to_load_from_cache``, ``torch.hub.get_dir``)
and the file names open_clip, timm and torch hub download to; they only decide whether to fail fast, never which file
is loaded: that stays with the library.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path

_TRUE = {"1", "ON", "YES", "TRUE"}

#: What pand tells a user whose download failed for a network reason.
OFFLINE_SUGGESTION = (
    "If this machine has no network access, set HF_HUB_OFFLINE=1: pand then refuses weights that are not in the "
    "local cache at once instead of trying to download them (Hugging Face hub retries for about a minute)"
)


def hub_offline() -> bool:
    """Whether the user asked for offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``).

    Read from the environment now, and from huggingface_hub, which reads it once at import: either saying offline is
    enough (if huggingface_hub is offline it will refuse to download anyway; if only the variable is set, the user set
    it after the import and still means it).
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hf_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder Hugging Face hub downloads go to: ``cache_dir`` if given, else huggingface_hub's ``HF_HUB_CACHE``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hf_cached(repo_id: str, filenames: Iterable[str], cache_dir: str | os.PathLike | None = None,
              revision: str | None = None) -> str | None:
    """The first of ``filenames`` of the hub repo ``repo_id`` that is in the local cache, else None; never networks."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, cache_dir=str(hf_cache_dir(cache_dir)), revision=revision)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def hub_file_names(filename: str, default: tuple[str, str], twins: tuple[str, ...]) -> list[str]:
    """The files a library tries for a hub repo's weights ``filename``, in its order: the ``.safetensors`` twin first.

    open_clip and timm both prefer safetensors: the twin of their default file is a fixed name (``default`` is
    ``(pickle name, safetensors name)``), that of any other file with a suffix in ``twins`` swaps the suffix.
    """
    if filename == default[0]:
        return [default[1], filename]
    for suffix in twins:
        if filename.endswith(suffix):
            return [filename[: -len(suffix)] + ".safetensors", filename]
    return [filename]


def torch_hub_checkpoint(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` (torchvision's and timm's url weights) keeps ``url``'s file."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(url).path)


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend((e.__cause__, e.__context__))


# Transport errors of the HTTP clients huggingface_hub and timm may use (httpx, its fork httpx2, requests), matched by
# name so that none of them has to be imported.
_TRANSPORT_NAMES = {"TransportError", "ConnectError", "ConnectTimeout", "ReadTimeout", "NetworkError", "ProxyError",
                    "OfflineModeIsEnabled"}


def is_network_error(err: BaseException) -> bool:
    """Whether ``err`` (or anything it was raised from) says the network could not be reached."""
    for e in _chain(err):
        if isinstance(e, urllib.error.HTTPError):
            continue  # the server answered (404, 401, ...): not a connectivity problem
        if isinstance(e, (ConnectionError, TimeoutError, socket.gaierror, socket.timeout, urllib.error.URLError)):
            return True
        if any(cls.__name__ in _TRANSPORT_NAMES for cls in type(e).__mro__):
            return True
    return False


def root_reason(err: BaseException) -> str:
    """The innermost error of ``err``'s chain, as ``Type: message``: the actual cause, without the wrappers' text."""
    inner, seen = err, {id(err)}
    while (nxt := inner.__cause__ or inner.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        inner = nxt
    return f"{type(inner).__name__}: {inner}"


def offline_refusal(missing: str, advice: str, err: BaseException | None = None) -> str:
    """pand's one message for weights that ``HF_HUB_OFFLINE=1`` keeps from being downloaded, for teachers and
    students alike: ``missing`` says which weights are not where (``"the weights of ... are not in the local cache
    ..."``), ``err`` (if any) is the library's refusal, ``advice`` how to go on offline."""
    reason = f" ({root_reason(err)})" if err is not None else ""
    return f"{missing}, and HF_HUB_OFFLINE=1 forbids downloading them{reason}. Offline, {advice}"


def unreachable_refusal(attempt: str, advice: str, err: BaseException) -> str:
    """pand's one message for a download that failed for a network reason (``attempt``: ``"could not download ..."``):
    the cause, the suggestion to set ``HF_HUB_OFFLINE=1`` and ``advice`` for going on offline."""
    return f"{attempt}: the network cannot be reached ({root_reason(err)}). {OFFLINE_SUGGESTION}. Offline, {advice}"
