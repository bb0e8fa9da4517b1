"""Where this process stands in a launch of several: its global rank and the number of processes, read from the
variables a launcher sets, before Lightning's trainer exists (the teacher cache is built, or opened, before it).

Launches whose every process is started from outside (the processes exist before any of them trains):

* ``torchrun`` (and other launchers setting ``RANK`` and ``WORLD_SIZE``);
* a cluster launcher starting one process per node with ``NODE_RANK`` (and ``MASTER_ADDR`` / ``MASTER_PORT``) for a
  run with ``trainer.num_nodes > 1`` and one device per node, which is what Lightning's own environment reads.

With several devices per node and no ``RANK``, Lightning starts the other local processes itself when training
begins: only one process exists before that, so it builds the whole cache and the others open it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from pand.errors import ConfigError


def launched_ranks(config: Mapping[str, Any] | None = None) -> tuple[int, int] | None:
    """``(rank, world_size)`` of an outside launch of several processes, else None."""
    if os.environ.get("RANK") not in (None, "") and os.environ.get("WORLD_SIZE") not in (None, ""):
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return (rank, world) if world > 1 else None
    trainer = (config or {}).get("trainer") or {}
    nodes = int(trainer.get("num_nodes") or 1)
    if nodes > 1 and os.environ.get("NODE_RANK") not in (None, "") and str(trainer.get("devices")) in ("1", "[0]"):
        node = int(os.environ["NODE_RANK"])
        if not 0 <= node < nodes:
            raise ConfigError(f"NODE_RANK={node} is outside the run's trainer.num_nodes={nodes} nodes (0..{nodes - 1})")
        return node, nodes
    return None


def join_launch(rank: int, world: int) -> None:
    """Join the launch's process group (gloo on CPU, NCCL on GPUs) unless this process already has; Lightning's
    trainer then uses that group instead of opening its own."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(key):
            raise ConfigError(f"a launch of {world} processes needs {key} (the address and port of the process of "
                              "rank 0), which the launcher sets; set it in the environment of every process")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, rank=rank, world_size=world)


def all_ok(ok: bool = True) -> bool:
    """A barrier that also tells every process whether all of them got there without an error."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
