"""Option rules (:mod:`pand.rules`): each names the range it allows; a device is refused where this machine lacks it."""

import pytest

from pand.rules import Rule, integer, number


def test_rules_describe_their_range():
    assert integer(1).describe() == "an integer >= 1"
    assert number(0, 1, high_open=True).describe() == "a number >= 0 and < 1"
    assert Rule("floats", low=0, low_open=True, length=3).describe() == "a list of 3 numbers, each > 0"
    assert integer(1).problem(2.5) and integer(1).problem(True) and not integer(1).problem(3)
    assert number(0).problem(float("nan")) and number(0).problem("1")


# ---------------------------------------------------------------------------------------------------- devices
@pytest.mark.parametrize(("gpus", "device", "problem"), [
    (0, "cuda", "device='cuda' is not available: this machine has no CUDA GPU"),
    (0, "cuda:0", "device='cuda:0' is not available: this machine has no CUDA GPU"),
    (1, "cuda", None), (1, "cuda:0", None),
    (1, "cuda:1", "device='cuda:1' is not available: this machine has 1 CUDA device(s), cuda:0"),
    (4, "cuda:3", None),
    (4, "cuda:4", "device='cuda:4' is not available: this machine has 4 CUDA device(s), cuda:0 to cuda:3"),
    (0, "cpu", None), (0, "auto", None),
    (0, "cuda:01", "device='cuda:01' is not allowed: expected auto, cpu, cuda, cuda:N or mps"),
    (0, 1, "device=1 is not allowed: expected auto, cpu, cuda, cuda:N or mps"),
])
def test_a_device_is_refused_where_this_machine_lacks_it(gpus, device, problem, monkeypatch):
    import torch

    from pand.rules import device_errors

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    errors = device_errors("device", device)
    assert (errors == []) if problem is None else (len(errors) == 1 and errors[0].startswith(problem)), errors


def test_mps_is_refused_where_torch_has_no_apple_gpu(monkeypatch):
    import torch

    from pand.rules import device_errors

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert device_errors("--device", "mps") == [
        "--device='mps' is not available: torch finds no Apple GPU (MPS) on this machine; use --device=cpu or "
        "--device=auto"]
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert device_errors("--device", "mps") == []
