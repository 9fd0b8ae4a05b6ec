"""Images of every bit depth and mode load as the grey values they mean, or are refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from common.errors import DataError
from common.images import read_grey, read_rgb, to_grey8


def _ramp(high: int, dtype) -> np.ndarray:
    return np.linspace(0, high, 64, dtype=np.float64).round().astype(dtype).reshape(8, 8)


def test_16_bit_png_is_rescaled_not_clipped(tmp_path):
    path = tmp_path / "twelve_bit.png"
    Image.fromarray(_ramp(4095, np.uint16)).save(path)  # a 12-bit radiograph in a 16-bit PNG
    assert Image.open(path).mode.startswith("I")
    grey = np.asarray(read_grey(path))
    assert grey.min() == 0 and grey.max() == 255
    np.testing.assert_array_equal(grey, np.round(_ramp(4095, np.uint16) / 4095 * 255).astype(np.uint8))
    assert len(np.unique(grey)) > 60  # contrast kept, where convert("L") gives a white image


def test_alpha_is_composited_over_black():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = [[255, 0], [128, 255]]
    grey = to_grey8(Image.fromarray(rgba, "RGBA"))
    np.testing.assert_array_equal(grey, [[200, 0], [100, 200]])
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    np.testing.assert_array_equal(to_grey8(la), [[200, 0], [100, 200]])


def test_float_and_constant_images():
    values = np.array([[-1.0, 0.0], [0.5, 1.0]], np.float32)
    np.testing.assert_array_equal(to_grey8(Image.fromarray(values, "F")), [[0, 128], [191, 255]])
    assert to_grey8(Image.fromarray(np.full((3, 3), 7, np.uint16))).max() == 0
    rgb = Image.fromarray(np.full((2, 2, 3), [255, 0, 0], np.uint8), "RGB")
    assert to_grey8(rgb)[0, 0] == np.asarray(rgb.convert("L"))[0, 0]


def test_unreadable_and_unsupported(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="does not decode"):
        read_grey(tmp_path / "x.png")
    with pytest.raises(DataError, match="not found"):
        read_grey(tmp_path / "missing.png")
    class Unknown:
        mode = "BGR;24"

    with pytest.raises(DataError, match="unsupported image mode 'BGR;24'"):
        to_grey8(Unknown(), "odd.png")


def test_rgb_reading_rescales_16_bit_composites_alpha_and_refuses_bombs(tmp_path, monkeypatch):
    path = tmp_path / "tile16.png"
    Image.fromarray(_ramp(4095, np.uint16)).save(path)
    rgb = np.asarray(read_rgb(path))
    expected = np.round(_ramp(4095, np.uint16) / 4095 * 255).astype(np.uint8)
    assert rgb.shape == (8, 8, 3) and all(np.array_equal(rgb[..., c], expected) for c in range(3))
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 100, [[255, 0]]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.asarray(read_rgb(tmp_path / "a.png", background=255))[0, :, 0].tolist() == [100, 255]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)  # an 8 x 8 image is then four times the limit
    with pytest.raises(DataError, match="more pixels than PIL's safety limit") as info:
        read_rgb(path)
    assert info.value.source == str(path)
    with pytest.raises(DataError, match="more pixels than PIL's safety limit"):
        read_grey(path)
