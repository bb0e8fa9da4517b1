"""open_rgb / to_rgb: every PIL mode decodes to the 8-bit RGB pixels it shows, the same way everywhere pand reads.

Each test builds its image here (PIL / numpy, or a hand-written PNG where PIL cannot write the mode), saves it in a
format that keeps the mode, and compares the decoded pixels with values computed independently of pand.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import PIL.Image
import pytest
import torch

from pand.data.base import FileDataset, open_rgb, to_rgb
from pand.data.image_ops import to_uint8_chw
from pand.data.transforms import AugmentConfig, ReplayableAugment, eval_transform, view_generator
from pand.data.unlabelled import unlabelled_folder
from pand.data.verify import _decode_error, verify_images
from pand.errors import CorruptImageError, DatasetNotFoundError

# A 256 x 256 image holding every 16-bit value once, row-major: pixel (r, c) = 256 * r + c.
RAMP16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)
# Independent of the implementation's shift: 8-bit value = floor(v / 256), the high byte.
RAMP8 = (np.arange(65536) // 256).astype(np.uint8).reshape(256, 256)


def _rgb(path) -> np.ndarray:
    image = open_rgb(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def _grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _write_png16(path, array: np.ndarray, colour_type: int) -> None:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB): colour type 0 grey, 2 RGB."""
    h, w = array.shape[:2]
    rows = b"".join(b"\x00" + np.ascontiguousarray(array[y]).astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows))
                     + _png_chunk(b"IEND", b""))


# -- 16-bit and other high-bit-depth modes ---------------------------------------------------------------------------


def test_16bit_grey_png_ramp_decodes_to_the_8bit_ramp(tmp_path):
    path = tmp_path / "ramp16.png"
    PIL.Image.fromarray(RAMP16).save(path)
    with PIL.Image.open(path) as im:
        assert im.mode == "I;16"  # what this Pillow hands over for a 16-bit grey PNG
    np.testing.assert_array_equal(_rgb(path), _grey3(RAMP8))


def test_16bit_values_below_256_are_scaled_by_the_bit_depth_not_stretched(tmp_path):
    path = tmp_path / "dark16.png"
    PIL.Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16)).save(path)
    np.testing.assert_array_equal(_rgb(path), np.zeros((16, 16, 3), np.uint8))


def test_six_different_16bit_images_decode_to_six_different_images(tmp_path):
    rng = np.random.default_rng(0)
    decoded = []
    for k in range(6):
        scan = rng.integers(256 * (10 * k + 1), 256 * (10 * k + 40), size=(8, 8)).astype(np.uint16)
        path = tmp_path / f"scan{k}.png"
        PIL.Image.fromarray(scan).save(path)
        with PIL.Image.open(path) as im:
            assert np.all(np.asarray(im.convert("RGB")) == 255)  # PIL's own convert: all six white
        got = _rgb(path)
        np.testing.assert_array_equal(got, _grey3((scan // 256).astype(np.uint8)))
        decoded.append(got.tobytes())
    assert len(set(decoded)) == 6


def test_16bit_rgb_png_decodes_like_the_same_16bit_grey_png(tmp_path):
    # PIL loads a 48-bit RGB PNG as 8-bit RGB by keeping the high byte; grey must agree with it.
    _write_png16(tmp_path / "rgb16.png", np.stack([RAMP16] * 3, axis=2), colour_type=2)
    _write_png16(tmp_path / "grey16.png", RAMP16, colour_type=0)
    rgb16 = _rgb(tmp_path / "rgb16.png")
    np.testing.assert_array_equal(rgb16, _grey3(RAMP8))
    np.testing.assert_array_equal(_rgb(tmp_path / "grey16.png"), rgb16)


@pytest.mark.parametrize("mode", ["I;16B", "I;16L"])
def test_16bit_tiff_in_either_byte_order(tmp_path, mode):
    dtype = ">u2" if mode == "I;16B" else "<u2"
    image = PIL.Image.frombytes(mode, (256, 256), RAMP16.astype(dtype).tobytes())
    path = tmp_path / "ramp16.tif"
    image.save(path)
    with PIL.Image.open(path) as im:
        assert im.mode in ("I;16B", "I;16")
    np.testing.assert_array_equal(_rgb(path), _grey3(RAMP8))


def test_32bit_integer_tiff_is_read_as_16bit_data_and_clipped(tmp_path):
    values = np.array([[-5, 0, 255, 256, 32768, 65535, 70000]], dtype=np.int32)
    path = tmp_path / "int32.tif"
    PIL.Image.fromarray(values).save(path)
    with PIL.Image.open(path) as im:
        assert im.mode == "I"
    np.testing.assert_array_equal(_rgb(path)[0, :, 0], [0, 0, 0, 1, 128, 255, 255])


def test_float_tiff_is_read_as_0_to_1_and_clipped(tmp_path):
    values = np.array([[np.nan, -1.0, 0.0, 0.25, 0.5, 1.0, 7.0]], dtype=np.float32)
    path = tmp_path / "float.tif"
    PIL.Image.fromarray(values).save(path)
    with PIL.Image.open(path) as im:
        assert im.mode == "F"
    # round(v * 255): 0.25 -> 63.75 -> 64, 0.5 -> 127.5 -> 128
    np.testing.assert_array_equal(_rgb(path)[0, :, 0], [0, 0, 0, 64, 128, 255, 255])


# -- 8-bit modes: PIL's convert("RGB"), as before -------------------------------------------------------------------


def test_palette_png_with_a_transparent_entry_keeps_the_palette_colour(tmp_path):
    image = PIL.Image.new("P", (3, 1))
    image.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0])
    image.putdata([0, 1, 2])
    path = tmp_path / "palette.png"
    image.save(path, transparency=1)
    with PIL.Image.open(path) as im:
        assert im.mode == "P" and im.info["transparency"] == 1
    np.testing.assert_array_equal(_rgb(path)[0], [[10, 20, 30], [200, 100, 50], [0, 255, 0]])


def test_palette_with_alpha_drops_the_alpha(tmp_path):
    image = PIL.Image.new("PA", (2, 1))
    image.putpalette([10, 20, 30, 200, 100, 50])
    image.putdata([(0, 255), (1, 0)])
    path = tmp_path / "pa.tif"
    image.save(path)
    with PIL.Image.open(path) as im:
        assert im.mode == "PA"
    np.testing.assert_array_equal(_rgb(path)[0], [[10, 20, 30], [200, 100, 50]])


def test_grey_with_alpha_drops_the_alpha(tmp_path):
    image = PIL.Image.frombytes("LA", (3, 1), bytes([0, 255, 90, 0, 255, 17]))
    path = tmp_path / "la.png"
    image.save(path)
    with PIL.Image.open(path) as im:
        assert im.mode == "LA"
    np.testing.assert_array_equal(_rgb(path)[0], [[0, 0, 0], [90, 90, 90], [255, 255, 255]])


def test_rgba_drops_the_alpha_and_keeps_the_colour_under_it(tmp_path):
    pixels = np.array([[[255, 0, 0, 255], [0, 128, 255, 0], [7, 8, 9, 100]]], dtype=np.uint8)
    path = tmp_path / "rgba.png"
    PIL.Image.fromarray(pixels).save(path)
    with PIL.Image.open(path) as im:
        assert im.mode == "RGBA"
    np.testing.assert_array_equal(_rgb(path), pixels[:, :, :3])


def test_cmyk_jpeg_with_adobe_inverted_cmyk(tmp_path):
    c, m, y, k = 10, 60, 200, 40
    path = tmp_path / "cmyk.jpg"
    PIL.Image.new("CMYK", (16, 16), (c, m, y, k)).save(path, quality=100)
    with PIL.Image.open(path) as im:
        # PIL writes CMYK JPEGs the Adobe way (inverted, with an APP14 marker) and un-inverts them when decoding
        assert im.mode == "CMYK" and "adobe" in im.info
    want = [round((255 - v) * (255 - k) / 255) for v in (c, m, y)]
    got = _rgb(path).reshape(-1, 3)
    assert np.abs(got.astype(int) - want).max() <= 1


def test_bilevel_decodes_to_black_and_white(tmp_path):
    bits = np.array([[True, False, True, True]])
    path = tmp_path / "bits.png"
    PIL.Image.fromarray(bits).save(path)
    with PIL.Image.open(path) as im:
        assert im.mode == "1"
    np.testing.assert_array_equal(_rgb(path)[0, :, 0], [255, 0, 255, 255])
    np.testing.assert_array_equal(_rgb(path), _grey3(np.where(bits, 255, 0).astype(np.uint8)))


def test_grey_decodes_to_three_equal_channels(tmp_path):
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = tmp_path / "grey.png"
    PIL.Image.fromarray(grey).save(path)
    np.testing.assert_array_equal(_rgb(path), _grey3(grey))


def test_ycbcr_tiff_uses_the_bt601_conversion(tmp_path):
    y, cb, cr = 120, 90, 200
    path = tmp_path / "ycc.tif"
    PIL.Image.new("YCbCr", (4, 4), (y, cb, cr)).save(path)
    with PIL.Image.open(path) as im:
        assert im.mode == "YCbCr"
    want = [y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)]
    got = _rgb(path)[0, 0].astype(float)
    assert np.abs(got - want).max() <= 1


def test_rgb_is_returned_as_stored(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    path = tmp_path / "rgb.png"
    PIL.Image.fromarray(pixels).save(path)
    np.testing.assert_array_equal(_rgb(path), pixels)


def test_exif_orientation_is_not_applied(tmp_path):
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.png"
    PIL.Image.new("RGB", (4, 2), (1, 2, 3)).save(path, exif=exif)
    assert open_rgb(path).size == (4, 2)


# -- errors ----------------------------------------------------------------------------------------------------------


def test_missing_and_truncated_16bit_files_keep_their_error_types(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="image file not found: .*nope.png"):
        open_rgb(tmp_path / "nope.png")
    path = tmp_path / "cut16.png"
    PIL.Image.fromarray(RAMP16).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptImageError, match=f"cannot decode image {path}"):
        open_rgb(path)
    reason = _decode_error(path)  # verification decodes the same way and reports the same failure
    assert reason and str(path) not in reason


# -- the same pixels everywhere pand reads an image ------------------------------------------------------------------


@pytest.fixture
def ramp_file(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    PIL.Image.fromarray(RAMP16).save(folder / "ramp16.png")
    return folder / "ramp16.png"


def test_training_paths_read_a_16bit_png_as_open_rgb_does(ramp_file, tmp_path):
    expected = PIL.Image.fromarray(_grey3(RAMP8))
    ds = FileDataset("ramp", "train", ["a"], ramp_file.parent, [ramp_file.name], [0])
    loaded = ds.load_image(0)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(open_rgb(ramp_file)))

    evaluate = eval_transform(32, 40)
    assert torch.equal(evaluate(loaded), evaluate(expected))
    augment = ReplayableAugment(AugmentConfig(image_size=32, resize_size=40))
    params = augment.sample(view_generator(0, 0, 0), (256, 256))
    assert torch.equal(augment.apply(loaded, params), augment.apply(expected, params))

    # an image handed over in memory, still 16-bit, goes through the same conversion as a file
    with PIL.Image.open(ramp_file) as raw:
        assert raw.mode == "I;16"
        assert torch.equal(to_uint8_chw(raw), to_uint8_chw(expected))
        assert torch.equal(evaluate(raw), evaluate(expected))
    np.testing.assert_array_equal(np.asarray(to_rgb(PIL.Image.fromarray(RAMP16))), np.asarray(expected))

    unlabelled = unlabelled_folder(ramp_file.parent, ["a"], "ramp")
    np.testing.assert_array_equal(np.asarray(unlabelled.load_image(0)), np.asarray(expected))
    verify_images(ds, memo_dir=tmp_path / "memo", progress=False)


def test_decoded_image_cache_stores_a_16bit_png_as_open_rgb_decodes_it(ramp_file, tmp_path):
    from pand.cache.images import DecodedImageCache

    ds = FileDataset("ramp", "train", ["a"], ramp_file.parent, [ramp_file.name], [0])
    cache = DecodedImageCache.build(ds, tmp_path / "cache", 64, progress=False)
    evaluate = eval_transform(32, 64)
    assert torch.equal(evaluate(cache.image(0)), evaluate(PIL.Image.fromarray(_grey3(RAMP8))))


def test_predict_reads_a_16bit_png_as_open_rgb_does(ramp_file, tmp_path, monkeypatch):
    from pand.predict import predict

    seen = []

    class Loaded:
        class_names = ["a", "b"]

        @staticmethod
        def preprocess(image):
            seen.append(np.asarray(image).copy())
            return torch.zeros(3, 2, 2)

        @staticmethod
        def model(batch):
            return torch.zeros(len(batch), 2)

    monkeypatch.setattr("pand.predict.load_student", lambda *a, **k: Loaded)
    ckpt = tmp_path / "student.ckpt"  # never read: load_student is replaced
    ckpt.write_bytes(b"")
    rows = predict(ckpt, ramp_file, topk=1, device="cpu", progress=False)
    assert len(rows) == 1 and len(seen) == 1
    np.testing.assert_array_equal(seen[0], _grey3(RAMP8))
