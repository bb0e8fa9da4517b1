"""Two processes acting as two nodes over the loopback (NODE_RANK, MASTER_ADDR and MASTER_PORT set as a cluster
launcher sets them, trainer.num_nodes=2): each builds its share of the teacher cache's shards and trains on its own
shards only; the cache they build together is byte-identical to the one a single process builds."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from pand.cli import main
from tests.engine.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted((folder / "shards").rglob("*")) if p.is_file()}


def test_two_nodes_build_their_shares_and_train_on_their_own_shards(cub_root, tmp_path):
    cache = tmp_path / "cache"
    overrides = tiny_overrides(cub_root, tmp_path / "run", f"cache.dir={cache}", "cache.views=2",
                               "cache.shard_size=4", "cache.local_shards=true", "trainer.max_epochs=1",
                               "data.drop_last=false",
                               "trainer.num_nodes=2", "trainer.devices=1", "trainer.strategy=ddp")
    port = _free_port()
    nodes = []
    for node in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PAND_RUN_DIR")}
        env.update(NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        nodes.append(subprocess.Popen([sys.executable, "-m", "pand", "train", *overrides], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    logs = []
    for proc in nodes:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        logs.append(err)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "done" and summary["test_acc1"] is not None

    meta = json.loads((cache / "meta.json").read_text())
    assert meta["complete"] and meta["num_shards"] == 4  # 15 training images in shards of 4
    read = {}
    for node, err in enumerate(logs):
        assert f"teacher cache: process {node} of 2 builds 2 of 4 shards: {node},{node + 2}" in err, err[-3000:]
        found = re.search(rf"teacher cache: process {node} of 2 read \d+ of its 4 shards: ([\d,]+)", err)
        assert found, err[-3000:]
        read[node] = {int(s) for s in found.group(1).split(",")}
    # each node trained on the shards it built (s % 2 == node) and opened no other
    assert read == {0: {0, 2}, 1: {1, 3}}

    # the same cache as one process builds
    alone = tmp_path / "alone"
    one = [o.replace(str(cache), str(alone)) for o in overrides if not o.startswith("trainer.")]
    assert main(["cache", "build", *one]) == 0
    assert _files(alone) == _files(cache)
    stored = json.loads((alone / "meta.json").read_text())
    assert {k: v for k, v in stored.items() if k != "agreement"} == {k: v for k, v in meta.items() if k != "agreement"}
