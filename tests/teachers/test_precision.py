"""Low-precision teacher passes: the autocast context, the agreement measurement and the check that refuses."""

import json
import math

import pytest
import torch

from pand.errors import ConfigError, PandError, PrecisionError
from pand.teachers.precision import (
    DEFAULT_TOLERANCE,
    PRECISIONS,
    AgreementProbe,
    check_agreement,
    check_precision,
    measure_agreement,
    teacher_autocast,
)


def test_precisions_and_default():
    assert PRECISIONS[0] == "fp32" and set(PRECISIONS) == {"fp32", "bf16", "fp16"}
    assert DEFAULT_TOLERANCE == 0.02


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_changes_the_dtype_inside_only(precision, dtype):
    a = torch.randn(4, 8)
    with teacher_autocast("cpu", precision):
        assert (a @ a.t()).dtype == dtype
    assert (a @ a.t()).dtype == torch.float32
    with teacher_autocast(torch.device("cpu"), precision):
        assert torch.nn.functional.linear(a, a).dtype == dtype


def test_fp32_leaves_everything_untouched():
    a = torch.randn(4, 8)
    with teacher_autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
        assert (a @ a.t()).dtype == torch.float32


def test_unknown_precision_is_a_config_error_with_the_closest_name():
    with pytest.raises(ConfigError, match=r"precision='bf61' is not allowed: expected one of 'fp32', 'bf16', 'fp16' "
                                          r"\(did you mean 'bf16'\?\)"):
        teacher_autocast("cpu", "bf61")
    with pytest.raises(ConfigError, match="cache.precision=32"):
        check_precision(32, "cache.precision")


def test_measure_agreement_against_hand_computed_values():
    ref = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    low = torch.tensor([[3.0, 4.5], [0.0, 1.0]])
    stats = measure_agreement(ref, low)
    # row 0: |(0, 0.5)| / 5 = 0.1; row 1: |(-1, 1)| / 1 = sqrt(2)
    assert stats["max_rel_error"] == pytest.approx(math.sqrt(2))
    # row 0: 27 / (5 * sqrt(29.25)); row 1: orthogonal
    assert stats["min_cosine"] == pytest.approx(0.0, abs=1e-7)
    assert stats["max_abs_error"] == pytest.approx(1.0)
    # 3, 4, 1 and 0 are exact in float16: storage makes no error and the ratio is undefined
    assert stats["float16_storage_rel_error"] == 0.0 and stats["ratio_to_float16_storage"] is None
    assert stats["rows"] == 2 and stats["nonfinite"] == 0
    json.dumps(stats, allow_nan=False)  # plain numbers

    one = measure_agreement(ref[:1], low[:1])
    assert one["max_rel_error"] == pytest.approx(0.1)
    assert one["min_cosine"] == pytest.approx(27 / (5 * math.sqrt(29.25)))


def test_float16_storage_error_is_measured_on_the_reference():
    # float16(1/3) = 1365 * 2**-12, off by 2**-12 relative to 1/3 (to float32 rounding)
    ref = torch.tensor([[1 / 3, 0.0]])
    low = torch.tensor([[1 / 3 * (1 + 4e-3), 0.0]])
    stats = measure_agreement(ref, low)
    assert stats["float16_storage_rel_error"] == pytest.approx(2**-12, rel=1e-3)
    assert stats["max_rel_error"] == pytest.approx(4e-3, rel=1e-4)
    assert stats["ratio_to_float16_storage"] == pytest.approx(4e-3 / 2**-12, rel=1e-3)


def test_measure_agreement_counts_nonfinite_and_refuses_other_shapes():
    ref = torch.ones(3, 4)
    low = ref.clone()
    low[1, 2] = float("nan")
    low[2, 0] = float("inf")
    assert measure_agreement(ref, low)["nonfinite"] == 2
    with pytest.raises(ValueError, match="one shape"):
        measure_agreement(ref, ref[:, :2])
    with pytest.raises(ValueError, match="one shape"):
        measure_agreement(ref[0], ref[0])


def test_check_agreement_passes_within_and_refuses_beyond_the_tolerance():
    ref = torch.tensor([[1 / 3, 0.0], [0.0, 1.0]])
    low = torch.tensor([[1 / 3 * (1 + 4e-3), 0.0], [0.0, 1.0]])
    stats = measure_agreement(ref, low)
    check_agreement(stats, 0.02, "the test pass")
    with pytest.raises(PrecisionError) as refused:
        check_agreement(stats, 1e-9, "the test pass", precision="bf16", setting="cache")
    message = str(refused.value)
    assert isinstance(refused.value, PandError)
    assert message.startswith("the test pass: the bf16 pass does not agree with fp32")
    assert "0.004 > tolerance cache.precision_tolerance=1e-09" in message
    assert "min cosine" in message and "float16 storage alone makes 0.000244" in message
    assert "cache.precision=fp32" in message and "cache.precision=fp16" in message
    assert "raise cache.precision_tolerance knowingly" in message


def test_nonfinite_output_is_refused_whatever_the_tolerance():
    ref = torch.ones(2, 3)
    low = ref.clone()
    low[0, 0] = float("inf")
    with pytest.raises(PrecisionError, match="1 NaN or infinite values on the probe batch of 2 rows"):
        check_agreement(measure_agreement(ref, low), 1e9, "x", precision="fp16")
    low[0, 0] = float("nan")
    with pytest.raises(PrecisionError, match="NaN or infinite"):
        check_agreement(measure_agreement(ref, low), float("inf"), "x")


def test_probe_compares_the_first_batch_only_and_returns_the_low_precision_result():
    calls = []
    weight = torch.randn(16, 8)

    def compute(precision, x):
        calls.append(precision)
        with teacher_autocast("cpu", precision):
            return torch.nn.functional.linear(x, weight)

    probe = AgreementProbe("bf16", what="the test pass")
    x = torch.randn(5, 8)
    first = probe(lambda p: compute(p, x))
    assert first.dtype == torch.bfloat16 and calls == ["bf16", "fp32"]
    assert probe.stats["precision"] == "bf16" and probe.stats["tolerance"] == 0.02
    assert 0 < probe.stats["max_rel_error"] < 0.02 and probe.stats["rows"] == 5
    probe(lambda p: compute(p, x))
    assert calls == ["bf16", "fp32", "bf16"]  # later batches: no fp32 pass

    exact = AgreementProbe("fp32", what="the test pass")
    assert exact(lambda p: compute(p, x)).dtype == torch.float32 and exact.stats is None
    assert calls[-1] == "fp32" and len(calls) == 4


def test_probe_refuses_a_later_nonfinite_batch_and_bad_settings():
    probe = AgreementProbe("fp16", what="the test pass", setting="features")
    probe(lambda p: torch.ones(2, 2))
    with pytest.raises(PrecisionError, match="features.precision=fp32"):
        probe(lambda p: torch.full((2, 2), float("nan")))
    with pytest.raises(ConfigError, match="features.precision_tolerance=0.0 is not allowed"):
        AgreementProbe("bf16", 0, what="x", setting="features")
    with pytest.raises(ConfigError, match="prompts.precision='half'"):
        AgreementProbe("half", what="x", setting="prompts")
