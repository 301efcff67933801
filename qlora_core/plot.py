"""`plot_metrics(metrics.jsonl, out.png)`: the loss curve of a run as a PNG.

With matplotlib installed: a labelled figure (train loss per step, eval loss points). Without it: a plain
640x400 PNG drawn here (axes, train loss in blue, eval loss in red, no text), written with zlib, so the main job
still leaves a plot on a machine that has only the core dependencies.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path


def read_metrics(path) -> tuple[list, list]:
    """([(step, loss)], [(step, eval_loss)]) from a metrics.jsonl (skipped steps have no loss)."""
    train, evals = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("loss") is not None:
            train.append((rec["step"], rec["loss"]))
        if rec.get("eval_loss") is not None:
            evals.append((rec["step"], rec["eval_loss"]))
    return train, evals


def plot_metrics(metrics_path, png_path, title: str = "training loss") -> Path | None:
    """Plot train loss per step and eval loss points from metrics.jsonl into png_path; returns png_path, or None
    (and writes nothing) when no step has a loss.

    matplotlib (log y axis, labels) when installed, else render() + write_png without text. The PNG is written in
    place, not atomically; FileNotFoundError when metrics_path is missing.
    """
    train, evals = read_metrics(metrics_path)
    if not train:
        print(f"no losses in {metrics_path}; no plot")
        return None
    png_path = Path(png_path)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: writing a plain plot without labels (pip install matplotlib for one "
              "with axes labels)")
        write_png(png_path, *render(train, evals))
        return png_path
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss", color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy per response token")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def render(train, evals, w: int = 640, h: int = 400):
    """An RGB canvas (list of bytearrays) with the curves; y is log-scaled like the matplotlib version."""
    import math
    img = [bytearray(b"\xff" * (3 * w)) for _ in range(h)]
    m = 40
    pts = train + evals
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    ys = [math.log(max(p[1], 1e-6)) for p in pts]
    y0, y1 = min(ys), max(ys)
    sx = lambda x: m + (x - x0) * (w - 2 * m) / max(x1 - x0, 1)  # noqa: E731
    sy = lambda y: h - m - (math.log(max(y, 1e-6)) - y0) * (h - 2 * m) / max(y1 - y0, 1e-9)  # noqa: E731

    def put(x, y, c):
        x, y = int(round(x)), int(round(y))
        if 0 <= x < w and 0 <= y < h:
            img[y][3 * x:3 * x + 3] = bytes(c)

    def line(a, b, c):
        n = int(max(abs(b[0] - a[0]), abs(b[1] - a[1]))) + 1
        for i in range(n + 1):
            t = i / n
            put(a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1]), c)

    line((m, h - m), (w - m, h - m), (0, 0, 0))
    line((m, m), (m, h - m), (0, 0, 0))
    for series, color in ((train, (31, 119, 180)), (evals, (214, 39, 40))):
        xy = [(sx(s), sy(v)) for s, v in series]
        for a, b in zip(xy, xy[1:]):
            line(a, b, color)
        if series is evals:
            for x, y in xy:
                for dx in range(-2, 3):
                    for dy in range(-2, 3):
                        put(x + dx, y + dy, color)
    return img, w, h


def write_png(path, img, w: int, h: int) -> None:
    """Write `img` (h rows of 3*w RGB bytes, as render() returns) to `path` as an 8-bit RGB PNG.

    No row filter, zlib level 6; a plain write, not atomic.
    """
    raw = b"".join(b"\x00" + bytes(row) for row in img)  # filter type 0 per scanline

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    Path(path).write_bytes(data)
