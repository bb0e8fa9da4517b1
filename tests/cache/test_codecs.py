import warnings

import numpy as np
import pytest
import torch

from pand.cache.codecs import INT8_MAX, decode_bf16_rows, decode_int8_rows, encode_bf16_rows, encode_int8_rows


def _rows(seed: int = 0) -> np.ndarray:
    """Rows of the kinds a cache stores: unit embeddings, wide logits, and a few with one large value."""
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((64, 512))
    embeds /= np.linalg.norm(embeds, axis=-1, keepdims=True)
    logits = 12 * rng.standard_normal((64, 512))
    spiky = rng.standard_normal((64, 512)) * 1e-3
    spiky[:, 7] = 40.0
    return np.concatenate([embeds, logits, spiky]).astype(np.float32)


# -- int8 rows ------------------------------------------------------------------------------------------------------
def test_int8_hand_computed_row_with_an_exact_float16_scale():
    # max 3.96875 = 127 * 2^-5: the scale is exactly 2^-5; 0.015625 is half a step (a tie, rounded to the even 0)
    # and 0.046875 one and a half steps (a tie, rounded to the even 2)
    x = np.array([[3.96875, -1.0, 0.5, 0.015625, 0.046875]], dtype=np.float32)
    q, scale = encode_int8_rows(x)
    assert q.tolist() == [[127, -32, 16, 0, 2]]
    assert scale.dtype == np.float16 and scale.tolist() == [[0.03125]]
    assert decode_int8_rows(q, scale).tolist() == [[3.96875, -1.0, 0.5, 0.0, 0.0625]]


def test_int8_float16_scale_is_rounded_up_so_nothing_is_clipped():
    # max / 127 = 1 + 2^-12, which float16 rounds DOWN to 1; stored: the next float16 up, 1 + 2^-10
    top = np.float32(127 * (1 + 2**-12))
    x = np.array([[top, -top, 0.5]], dtype=np.float32)
    q, scale = encode_int8_rows(x)
    assert scale.item() == 1 + 2**-10
    assert q.tolist() == [[127, -127, 0]]
    assert np.all(np.abs(x - decode_int8_rows(q, scale)) <= scale.astype(np.float32) / 2)


def test_int8_float32_scale_hand_computed():
    x = np.array([[-2.54, 1.0, 0.0]], dtype=np.float32)
    q, scale = encode_int8_rows(x, scale_dtype=np.float32)
    assert scale.dtype == np.float32 and scale.item() == pytest.approx(0.02)
    assert q.tolist() == [[-127, 50, 0]]


@pytest.mark.parametrize("scale_dtype", [np.float16, np.float32])
def test_int8_round_trip_is_within_half_a_step_of_every_value(scale_dtype):
    x = _rows()
    q, scale = encode_int8_rows(x, scale_dtype=scale_dtype)
    step = scale.astype(np.float32)
    assert np.all(step >= np.abs(x).max(-1, keepdims=True) / INT8_MAX)
    assert np.all(np.abs(x - decode_int8_rows(q, scale)) <= step / 2)
    assert np.abs(q).max() == INT8_MAX and q.min() >= -INT8_MAX  # -128 is never used


def test_int8_zero_and_tiny_rows():
    x = np.zeros((3, 4), dtype=np.float32)
    x[1] = [1e-12, -1e-12, 0, 5e-13]  # max / 127 underflows float16: the scale becomes its smallest subnormal
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division-by-zero warning for a zero row
        q, scale = encode_int8_rows(x)
        qt, scale_t = encode_int8_rows(torch.from_numpy(x))
    assert scale[0].item() == 0 and scale[2].item() == 0 and not q[0].any()
    assert scale[1].item() == np.float32(2**-24)
    assert decode_int8_rows(q, scale)[[0, 2]].tolist() == np.zeros((2, 4)).tolist()
    assert np.all(np.abs(x - decode_int8_rows(q, scale)) <= scale.astype(np.float32) / 2)
    assert np.array_equal(qt.numpy(), q) and np.array_equal(scale_t.numpy(), scale)


def test_int8_dtypes_and_shapes_numpy_and_torch():
    x = _rows()[:30].reshape(2, 3, 5, 512)
    q, scale = encode_int8_rows(x)
    assert (q.dtype, q.shape, scale.dtype, scale.shape) == (np.int8, x.shape, np.float16, (2, 3, 5, 1))
    assert decode_int8_rows(q, scale).dtype == np.float32
    qt, scale_t = encode_int8_rows(torch.from_numpy(x), scale_dtype=torch.float32)
    assert (qt.dtype, tuple(qt.shape), scale_t.dtype, tuple(scale_t.shape)) == \
        (torch.int8, x.shape, torch.float32, (2, 3, 5, 1))
    out = decode_int8_rows(qt, scale_t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    # float16 input is read as float32
    q16, scale16 = encode_int8_rows(x.astype(np.float16))
    assert q16.dtype == np.int8 and scale16.shape == scale.shape


def test_int8_is_deterministic_and_numpy_and_torch_agree_bit_for_bit():
    x = _rows(seed=3)
    q1, s1 = encode_int8_rows(x)
    q2, s2 = encode_int8_rows(x.copy())
    qt, st = encode_int8_rows(torch.from_numpy(x))
    assert np.array_equal(q1, q2) and np.array_equal(s1.view(np.uint16), s2.view(np.uint16))
    assert np.array_equal(qt.numpy(), q1) and np.array_equal(st.numpy().view(np.uint16), s1.view(np.uint16))
    assert np.array_equal(decode_int8_rows(qt, st).numpy(), decode_int8_rows(q1, s1))


def test_int8_refuses_what_it_cannot_store():
    with pytest.raises(ValueError, match="finite"):
        encode_int8_rows(np.array([[1.0, np.nan]], dtype=np.float32))
    with pytest.raises(ValueError, match="finite"):
        encode_int8_rows(torch.tensor([[1.0, float("inf")]]))
    big = np.array([[127 * 70000.0, 1.0]], dtype=np.float32)
    with pytest.raises(ValueError, match="float32"):
        encode_int8_rows(big)
    q, scale = encode_int8_rows(big, scale_dtype=np.float32)
    assert np.all(np.abs(big - decode_int8_rows(q, scale)) <= scale / 2)
    with pytest.raises(ValueError, match="scale_dtype"):
        encode_int8_rows(big, scale_dtype=np.int16)
    with pytest.raises(ValueError, match="D >= 1"):
        encode_int8_rows(np.zeros((3, 0), dtype=np.float32))


# -- bfloat16 rows --------------------------------------------------------------------------------------------------
def test_bf16_hand_computed_bits():
    # bfloat16 keeps 7 mantissa bits: 1 + 2^-8 is half a step above 1 (a tie, rounded to the even 1.0), 1 + 3 * 2^-8
    # one and a half steps (a tie, rounded to the even 1 + 2^-6); 1 + 2^-8 + 2^-20 is just above the tie (up)
    x = np.array([1.0, -2.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 0.0, -0.0], dtype=np.float32)
    bits = encode_bf16_rows(x)
    assert bits.dtype == np.uint16
    assert bits.tolist() == [0x3F80, 0xC000, 0x3F80, 0x3F82, 0x3F81, 0x0000, 0x8000]
    assert decode_bf16_rows(bits).tolist() == [1.0, -2.0, 1.0, 1 + 2**-6, 1 + 2**-7, 0.0, -0.0]


def test_bf16_matches_torch_and_is_within_half_a_step():
    x = np.concatenate([_rows().ravel(), np.array([3.4e38, -3.4e38, 1e-40, np.inf, -np.inf], dtype=np.float32)])
    bits = encode_bf16_rows(x)
    torch_bits = encode_bf16_rows(torch.from_numpy(x))
    assert torch_bits.dtype == torch.uint16
    assert np.array_equal(bits, torch_bits.numpy())
    assert np.array_equal(decode_bf16_rows(torch_bits).numpy(), decode_bf16_rows(bits))
    finite = np.isfinite(decode_bf16_rows(bits)) & (np.abs(x) > 1e-37)
    rel = np.abs(decode_bf16_rows(bits)[finite] - x[finite]) / np.abs(x[finite])
    assert rel.max() <= 2**-8  # half a step of a 7-bit mantissa, relative to the value
    assert decode_bf16_rows(bits).dtype == np.float32 and bits.shape == x.shape


def test_bf16_keeps_nan_and_is_exact_on_bfloat16_values():
    x = np.array([np.nan, -np.nan, 1.0], dtype=np.float32)
    assert np.isnan(decode_bf16_rows(encode_bf16_rows(x))[:2]).all()
    exact = decode_bf16_rows(np.arange(0, 0x7F80, 97, dtype=np.uint16))  # finite positive bfloat16 values
    assert np.array_equal(decode_bf16_rows(encode_bf16_rows(exact)), exact)
    assert np.array_equal(encode_bf16_rows(exact), encode_bf16_rows(exact.copy()))
