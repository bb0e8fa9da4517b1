"""cache.storage=int8: the outputs as int8 rows with a per-row float16 scale, read back within half a step of the
float16 cache's values; a run asking for the other storage refuses the cache."""

import numpy as np
import pytest
import torch

from pand.config import compose, to_plain
from pand.engine.config_checks import validate_train_config
from pand.engine.data import PandDataModule
from pand.engine.teacher_side import open_or_build_cache
from pand.errors import ConfigError, MismatchError
from tests.cache.test_classifier_cache import _config as _classifier_config
from tests.engine.conftest import tiny_overrides


def _config(cub_root, folder, *extra):
    return to_plain(compose("train", tiny_overrides(cub_root, folder / "run", f"cache.dir={folder / 'cache'}",
                                                    "cache.views=2", "cache.shard_size=8", *extra)))


@pytest.mark.parametrize("teacher", ["clip", "classifier"])
def test_int8_rows_decode_within_half_a_step_of_the_float16_cache(cub_root, tmp_path, teacher):
    if teacher == "clip":
        configs = [_config(cub_root, tmp_path / s, f"cache.storage={s}") for s in ("float16", "int8")]
        name = "embeds"
    else:
        configs = [_classifier_config(cub_root, tmp_path / s, f"cache.storage={s}") for s in ("float16", "int8")]
        name = "logits"
    data = PandDataModule(configs[0]["data"], seed=0)
    exact, small = (open_or_build_cache(c, data) for c in configs)
    assert small.meta["storage"] == "int8" and "storage" not in exact.meta
    q, scale = small.array(name), small.array(f"{name}_scale")
    assert q.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == (*q.shape[:2], 1)
    assert "int8 rows" in small.describe_outputs()
    n = len(data.splits["train"])
    index, view = np.repeat(np.arange(n), 2), np.tile(np.arange(2), n)
    read = getattr(small, name)(torch.from_numpy(index), torch.from_numpy(view)).numpy()
    reference = getattr(exact, name)(torch.from_numpy(index), torch.from_numpy(view)).numpy()
    step = scale[index, view].astype(np.float32)
    assert np.all(np.abs(read - reference) <= step / 2 + 1e-7)
    assert np.abs(read - reference).max() > 0  # it is a lossy storage, and the test sees it

    with pytest.raises(MismatchError, match="storage"):  # a float16 run never trains on int8 rows, nor the reverse
        open_or_build_cache({**configs[1], "cache": {**configs[1]["cache"], "storage": "float16"}}, data)


def test_int8_with_topk_is_refused(cub_root, tmp_path):
    config = _classifier_config(cub_root, tmp_path, "cache.storage=int8", "cache.topk=2")
    with pytest.raises(ConfigError, match="cache.storage=int8 and cache.topk=2 are both set"):
        validate_train_config(config)
