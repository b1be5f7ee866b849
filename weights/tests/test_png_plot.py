"""png_plot.py: the dependency-free PNG writer and the loss plot (no PyTorch)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from png_plot import image_grid, plot_curves, read_png_size, to_uint8, write_png


def decode_png(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour = header[:4]
    channels = {0: 1, 2: 3}[colour]
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * channels)
    assert (raw[:, 0] == 0).all()  # filter type 0 on every row
    return raw[:, 1:].reshape(height, width, channels).squeeze()


def test_write_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    write_png(str(tmp_path / "rgb.png"), rgb)
    np.testing.assert_array_equal(decode_png(str(tmp_path / "rgb.png")), rgb)
    grey = rng.integers(0, 256, (4, 9), dtype=np.uint8)
    write_png(str(tmp_path / "grey.png"), grey)
    np.testing.assert_array_equal(decode_png(str(tmp_path / "grey.png")), grey)
    assert read_png_size(str(tmp_path / "grey.png")) == (9, 4)
    with pytest.raises(ValueError):
        write_png(str(tmp_path / "bad.png"), rgb.astype(np.float32))


def test_image_grid_and_scaling():
    images = np.stack([np.full((3, 2, 2), i * 40, np.uint8) for i in range(5)])
    grid = image_grid(images, columns=3, pad=1, scale=2)
    assert grid.shape == (2 * (4 + 1) + 1, 3 * (4 + 1) + 1, 3)
    assert (grid[1:5, 1:5] == 0).all() and (grid[1:5, 6:10] == 40).all()
    assert (grid[6:10, 11:15] == 255).all()  # the empty sixth cell stays background
    assert to_uint8(np.array([-2.0, -1.0, 0.0, 1.0])).tolist() == [0, 0, 128, 255]


def test_builtin_plot(tmp_path):
    x = np.arange(1, 101)
    used = plot_curves(str(tmp_path / "loss.png"), x, {"a": 1.0 / x, "b": np.where(x % 7 == 0, np.nan, 2.0 / x)},
                       "t", "step", "loss", use_matplotlib=False)
    assert used == "builtin"
    image = decode_png(str(tmp_path / "loss.png"))
    assert image.shape == (360, 640, 3)
    assert (image != 255).any(axis=2).sum() > 500  # something was drawn


def test_matplotlib_plot(tmp_path):
    pytest.importorskip("matplotlib")
    used = plot_curves(str(tmp_path / "loss.png"), [1, 2, 3], {"a": [3.0, 2.0, 1.0]}, "t", "x", "y")
    assert used == "matplotlib"
    assert read_png_size(str(tmp_path / "loss.png"))[0] > 100
