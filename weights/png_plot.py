"""PNG output without dependencies beyond numpy: image grids and a loss-curve plot.

`write_png` writes an 8-bit RGB or grey PNG with zlib alone. `image_grid` tiles N x 3 x H x W
uint8 images. `plot_curves` draws loss curves with matplotlib when it is installed (axes, labels,
legend) and otherwise with a small hand-written rasteriser (log-scale y, no text: the card that
shows the PNG says what the axes are), so the recipes run on machines without matplotlib.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from typing import Sequence

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_png(path: str, image: np.ndarray) -> None:
    """image: H x W x 3 (RGB) or H x W (grey), uint8."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"write_png wants uint8, got {image.dtype}")
    if image.ndim == 2:
        color_type, channels = 0, 1
    elif image.ndim == 3 and image.shape[2] == 3:
        color_type, channels = 2, 3
    else:
        raise ValueError(f"write_png wants H x W or H x W x 3, got {image.shape}")
    height, width = image.shape[:2]
    rows = image.reshape(height, width * channels)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    data = PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def read_png_size(path: str) -> tuple[int, int]:
    """(width, height) of a PNG file; raises ValueError if it is not one."""
    with open(path, "rb") as f:
        head = f.read(24)
    if not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        raise ValueError(f"{path}: not a PNG file")
    return struct.unpack(">II", head[16:24])


def image_grid(images: np.ndarray, columns: int, pad: int = 2, scale: int = 1,
               background: int = 255) -> np.ndarray:
    """N x 3 x H x W uint8 -> one H' x W' x 3 uint8 image, row-major, `pad` pixels between."""
    images = np.asarray(images)
    n, c, h, w = images.shape
    assert c == 3 and images.dtype == np.uint8
    if scale > 1:
        images = images.repeat(scale, axis=2).repeat(scale, axis=3)
        h, w = h * scale, w * scale
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), background, np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i].transpose(1, 2, 0)
    return grid


def to_uint8(x: np.ndarray, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """Floats in [low, high] -> uint8 [0, 255], clipped and rounded."""
    scaled = (np.asarray(x, dtype=np.float64) - low) / (high - low)
    return np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def plot_curves(path: str, x: Sequence[float], curves: dict[str, Sequence[float]], title: str,
                xlabel: str, ylabel: str, log_y: bool = True, use_matplotlib: bool | None = None) -> str:
    """Plots curves sharing the x values; returns which renderer drew it ("matplotlib"/"builtin")."""
    x = np.asarray(x, dtype=np.float64)
    if use_matplotlib is None or use_matplotlib:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            if use_matplotlib:
                raise
        else:
            fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
            for name, y in curves.items():
                ax.plot(x, np.asarray(y, dtype=np.float64), label=name, linewidth=1.2)
            if log_y:
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
            ax.legend()
            fig.tight_layout()
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fig.savefig(path)
            plt.close(fig)
            return "matplotlib"
    write_png(path, _rasterise(x, curves, log_y))
    return "builtin"


def _rasterise(x: np.ndarray, curves: dict[str, Sequence[float]], log_y: bool,
               width: int = 640, height: int = 360, margin: int = 24) -> np.ndarray:
    canvas = np.full((height, width, 3), 255, np.uint8)
    ys = {k: np.asarray(v, dtype=np.float64) for k, v in curves.items()}
    finite = np.concatenate([v[np.isfinite(v) & ((v > 0) if log_y else True)] for v in ys.values()] or [np.zeros(0)])
    if x.size < 1 or finite.size < 1:
        return canvas
    tf = (lambda v: np.log10(v)) if log_y else (lambda v: v)
    lo, hi = tf(finite.min()), tf(finite.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 1, hi + 1
    x_lo, x_hi = float(x.min()), float(x.max())
    if x_hi - x_lo < 1e-12:
        x_hi = x_lo + 1
    plot_w, plot_h = width - 2 * margin, height - 2 * margin
    canvas[margin : height - margin + 1, margin] = 0  # y axis
    canvas[height - margin, margin : width - margin + 1] = 0  # x axis
    if log_y:  # light grid lines at each power of ten
        for decade in range(math.ceil(lo), math.floor(hi) + 1):
            row = int(round(height - margin - (decade - lo) / (hi - lo) * plot_h))
            canvas[row, margin + 1 : width - margin : 4] = 180

    def pixel(xv, yv):
        return (margin + (xv - x_lo) / (x_hi - x_lo) * plot_w,
                height - margin - (tf(yv) - lo) / (hi - lo) * plot_h)

    for index, (_, y) in enumerate(ys.items()):
        colour = COLOURS[index % len(COLOURS)]
        previous = None
        for xv, yv in zip(x, y):
            if not np.isfinite(yv) or (log_y and yv <= 0):
                previous = None
                continue
            point = pixel(xv, yv)
            if previous is not None:
                _line(canvas, previous, point, colour)
            previous = point
    return canvas


def _line(canvas: np.ndarray, a, b, colour) -> None:
    steps = int(max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)) * 2
    xs = np.round(np.linspace(a[0], b[0], steps + 1)).astype(int)
    ys = np.round(np.linspace(a[1], b[1], steps + 1)).astype(int)
    h, w = canvas.shape[:2]
    for dy in (0, 1):
        keep = (xs >= 0) & (xs < w) & (ys + dy >= 0) & (ys + dy < h)
        canvas[ys[keep] + dy, xs[keep]] = colour
