"""Several processes building one teacher cache: an error in one stops all of them, none waits forever."""

import shutil
from collections import namedtuple

import torch.distributed as dist
import torch.multiprocessing as mp

from tests.engine.conftest import tiny_overrides


def _worker(rank, world, init_file, cub_root, cache_dir, results):
    from pand.config import compose, to_plain
    from pand.engine.data import PandDataModule
    from pand.engine.launch import all_ok as _all_ok
    from pand.engine.teacher_side import open_or_build_cache
    from pand.teachers.registry import load_teacher

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if rank == 0:  # only process 0 prepares the folder, and it finds no room there
            usage = namedtuple("usage", "total used free")
            shutil.disk_usage = lambda path: usage(10**9, 10**9 - 10, 10)
        config = to_plain(compose("train", tiny_overrides(cub_root, "unused", f"cache.dir={cache_dir}", "cache.views=2")))
        data = PandDataModule(config["data"], seed=0)
        try:
            open_or_build_cache(config, data, load_teacher(config, "cpu"), rank=rank, world_size=world,
                                barrier=_all_ok)
            results[rank] = "built"
        except Exception as err:  # noqa: BLE001 - the test reports what each process raised
            results[rank] = f"{type(err).__name__}: {err}"
    finally:
        dist.destroy_process_group()


def test_an_error_in_process_0_stops_every_process(cub_root, tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(cub_root), str(tmp_path / "cache"), results), nprocs=2,
             join=True)
    assert "not enough free space for the teacher cache" in results[0]
    assert "process 0 could not prepare the teacher cache" in results[1]
