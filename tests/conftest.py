import logging
import os
import tempfile

import pytest
import torch

# Tests never reach a model hub: fail fast instead of retrying a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Image-verification records go to a throw-away folder, never the user's ~/.cache.
os.environ.setdefault("PAND_CACHE_DIR", tempfile.mkdtemp(prefix="pand-tests-"))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_teacher():
    from pand.teachers import load_clip_teacher

    torch.manual_seed(0)
    return load_clip_teacher("pand-tiny-vit", "random")


@pytest.fixture
def cub_root(tmp_path):
    """A tiny CUB-200-2011 in its official layout: 3 classes, 6 train + 2 test images each."""
    from tests.fixtures.datasets import make_cub

    return make_cub(tmp_path / "data", n_classes=3, per_class=6, test_per_class=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same tiny CUB-200-2011 shared by a module's tests (export, text tower): trained on once per module."""
    from tests.fixtures.datasets import make_cub

    return make_cub(tmp_path_factory.mktemp("data"), n_classes=3, per_class=6, test_per_class=2)


@pytest.fixture(autouse=True)
def _pand_logger_restored():
    """The command line's logging set-up stops the "pand" logger from propagating to the root, where pytest's caplog
    listens, and a library's ``logging.config.dictConfig`` (import-linter's, in test_layers) disables every logger it
    does not name: a test that ran either must not change what a later test's caplog sees."""
    log = logging.getLogger("pand")
    state = (log.propagate, log.level, list(log.handlers))
    disabled = {name: logger.disabled for name, logger in logging.root.manager.loggerDict.items()
                if name.split(".")[0] == "pand" and isinstance(logger, logging.Logger)}
    yield
    log.propagate, log.level = state[0], state[1]
    log.handlers[:] = state[2]
    for name, logger in logging.root.manager.loggerDict.items():
        if name.split(".")[0] == "pand" and isinstance(logger, logging.Logger):
            logger.disabled = disabled.get(name, False)
