"""Loss curves as PNG without a plotting dependency: line charts rasterized in numpy, written with zlib.

Axis ticks are labelled with a built-in 3×5 digit font; a legend strip maps colours to series.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
_FONT = {  # 3x5 glyphs, rows top to bottom, 3 bits each
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111101110011", "k": "100101110101101", " ": "000000000000000",
}


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """image [H, W, 3] uint8 -> an 8-bit RGB PNG."""
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def _text(img: np.ndarray, x: int, y: int, s: str, scale: int = 2, color=(0, 0, 0)) -> None:
    for ch in s:
        glyph = _FONT.get(ch, _FONT[" "])
        for i, bit in enumerate(glyph):
            if bit == "1":
                r, c = divmod(i, 3)
                y0, x0 = y + r * scale, x + c * scale
                img[max(y0, 0):y0 + scale, max(x0, 0):x0 + scale] = color
        x += 4 * scale


def _line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.linspace(x0, x1, n).round().astype(int)
    ys = np.linspace(y0, y1, n).round().astype(int)
    h, w, _ = img.shape
    for dy in (0, 1):  # 2-pixel-thick lines
        ok = (xs >= 0) & (xs < w) & (ys + dy >= 0) & (ys + dy < h)
        img[ys[ok] + dy, xs[ok]] = color


def _fmt(v: float) -> str:
    if v >= 1000:
        return f"{v / 1000:.0f}k" if v % 1000 == 0 or v >= 10000 else f"{v / 1000:.1f}k"
    return f"{v:.2f}".rstrip("0").rstrip(".") if v < 100 else f"{v:.0f}"


def line_chart(series: dict[str, tuple[list[float], list[float]]], path: str | os.PathLike,
               width: int = 800, height: int = 480, log_y: bool = False) -> Path:
    """Draw ``{name: (xs, ys)}`` as lines on one chart and write it as PNG. Colours follow COLORS in
    the order of ``series``; the legend shows colour swatches in that order (names go in the docs)."""
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 70, 20, 30, 40
    pw, ph = width - left - right, height - top - bottom
    xs_all = [x for xs, _ in series.values() for x in xs]
    ys_all = [y for _, ys in series.values() for y in ys if np.isfinite(y)]
    if not xs_all or not ys_all:
        write_png(path, img)
        return Path(path)
    f = (lambda v: np.log(max(v, 1e-9))) if log_y else (lambda v: v)
    x_lo, x_hi = min(xs_all), max(xs_all)
    y_lo, y_hi = f(min(ys_all)), f(max(ys_all))
    if x_hi == x_lo:
        x_hi = x_lo + 1
    if y_hi == y_lo:
        y_hi = y_lo + 1

    def px(x):
        return left + (x - x_lo) / (x_hi - x_lo) * pw

    def py(y):
        return top + ph - (f(y) - y_lo) / (y_hi - y_lo) * ph

    for i in range(5):  # grid and tick labels
        gy = top + ph * i / 4
        img[int(gy), left:left + pw] = (225, 225, 225)
        yv = np.exp(y_hi - (y_hi - y_lo) * i / 4) if log_y else y_hi - (y_hi - y_lo) * i / 4
        _text(img, 4, int(gy) - 5, _fmt(float(yv)))
        gx = left + pw * i / 4
        img[top:top + ph, int(gx)] = (225, 225, 225)
        _text(img, int(gx) - 10, top + ph + 10, _fmt(x_lo + (x_hi - x_lo) * i / 4))
    img[top:top + ph + 1, left] = 0
    img[top + ph, left:left + pw + 1] = 0
    for k, (name, (xs, ys)) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        pts = [(px(x), py(y)) for x, y in zip(xs, ys) if np.isfinite(y)]
        for (a, b), (c, d) in zip(pts, pts[1:]):
            _line(img, a, b, c, d, color)
        img[8:18, left + 10 + 30 * k:left + 30 + 30 * k] = color  # legend swatch
    write_png(path, img)
    return Path(path)


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Training loss (blue) and eval loss (red) against step from a metrics.jsonl."""
    train, evals = ([], []), ([], [])
    with open(metrics_path, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            train[0].append(rec["step"])
            train[1].append(rec["loss"])
            if rec.get("eval_loss") is not None:
                evals[0].append(rec["step"])
                evals[1].append(rec["eval_loss"])
    series = {"train": _smooth(train)}
    if evals[0]:
        series["eval"] = evals
    return line_chart(series, png_path, log_y=True)


def _smooth(xy: tuple[list, list], window: int = 20) -> tuple[list, list]:
    xs, ys = xy
    if len(ys) < window * 2:
        return xs, ys
    kernel = np.ones(window) / window
    sm = np.convolve(np.asarray(ys, dtype=np.float64), kernel, mode="valid")
    return xs[window - 1:], sm.tolist()


def plot_phases(run_dir: str | os.PathLike, phases: list[str], png_path: str | os.PathLike) -> Path:
    """One chart for a multi-phase run (``run_dir/<phase>/metrics.jsonl``): each phase's smoothed
    training loss in its own colour (COLORS in phase order), then the eval loss of all phases in the
    next colour, against the global step (each phase's steps offset by the phases before it)."""
    series, evals, offset = {}, ([], []), 0
    for name in phases:
        train = ([], [])
        with open(Path(run_dir) / name / "metrics.jsonl", encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                train[0].append(offset + rec["step"])
                train[1].append(rec["loss"])
                if rec.get("eval_loss") is not None:
                    evals[0].append(offset + rec["step"])
                    evals[1].append(rec["eval_loss"])
        series[name] = _smooth(train)
        offset = train[0][-1] if train[0] else offset
    series["eval"] = evals
    return line_chart(series, png_path, log_y=True)
