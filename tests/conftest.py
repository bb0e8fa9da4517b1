import os

import pytest
import torch

# Tests never reach a model hub: fail fast instead of retrying a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_teacher():
    from pand.teachers import load_clip_teacher

    torch.manual_seed(0)
    return load_clip_teacher("pand-tiny-vit", "random")
