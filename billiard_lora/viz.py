"""Pictures of results: labelled image grids, PNGs saved atomically with their settings inside, loss curves."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .io import normal_mode

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PAD = 3  # pixels around label text
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


def _font(cell_width: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font, sized to the cells (no font files to ship or find)."""
    size = max(10, min(22, cell_width // 18))
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag|")
    return bottom + 2


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; words longer than a line are split by characters."""
    lines: list[str] = []
    for paragraph in str(text).splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
            while font.getlength(line) > width and len(line) > 1:  # an overlong word: cut it
                cut = len(line) - 1
                while cut > 1 and font.getlength(line[:cut]) > width:
                    cut -= 1
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def _draw_text_block(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, font) -> None:
    """Wrapped text, centred horizontally, from the top of ``box`` (x0, y0, x1, y1); clipped by the box height."""
    x0, y0, x1, y1 = box
    lh = _line_height(font)
    y = y0 + PAD
    for line in _wrap(text, font, max(1, x1 - x0 - 2 * PAD)):
        if y + lh > y1 + 1:
            break
        w = font.getlength(line)
        draw.text((x0 + max(PAD, (x1 - x0 - w) / 2), y), line, fill=TEXT, font=font)
        y += lh


def _text_height(texts: Sequence[str | None], font, width: int) -> int:
    lines = max((len(_wrap(t, font, max(1, width - 2 * PAD))) for t in texts if t), default=0)
    return lines * _line_height(font) + 2 * PAD if lines else 0


def image_grid(
    images: Sequence[Image.Image],
    rows: int,
    cols: int,
    labels: Sequence[str | None] | None = None,
    *,
    label_height: int | None = None,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
) -> Image.Image:
    """Paste images row by row into rows x cols cells of the first image's size, with optional captions and headers."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    if len(images) > rows * cols:
        raise ValueError(f"{len(images)} images do not fit in {rows} x {cols} cells")
    if labels is not None and len(labels) > len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    if col_labels is not None and len(col_labels) != cols:
        raise ValueError(f"{len(col_labels)} column labels for {cols} columns")

    w, h = images[0].size
    font = _font(w)
    if labels is None:
        lh = 0
    else:
        lh = label_height if label_height is not None else _text_height(labels, font, w)
    left = 0
    if row_labels is not None:
        widest = max(font.getlength(t) for t in row_labels) + 2 * PAD
        left = int(min(widest, max(w, 64)))  # long row labels wrap instead of widening the grid without end
    top = _text_height(col_labels, font, w) if col_labels is not None else 0

    grid = Image.new("RGB", (left + cols * w, top + rows * (h + lh)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        x, y = left + c * w, top + r * (h + lh)
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.LANCZOS)
        grid.paste(img.convert("RGB"), (x, y))
        if labels is not None and i < len(labels) and labels[i] and lh:
            _draw_text_block(draw, (x, y + h, x + w, y + h + lh), labels[i], font)
    for c, text in enumerate(col_labels or []):
        _draw_text_block(draw, (left + c * w, 0, left + (c + 1) * w, top), text, font)
    for r, text in enumerate(row_labels or []):
        y = top + r * (h + lh)
        block = len(_wrap(text, font, max(1, left - 2 * PAD))) * _line_height(font) + 2 * PAD
        _draw_text_block(draw, (0, y + max(0, (h - block) // 2), left, y + h), text, font)
    return grid


def save_image(img: Image.Image, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write a PNG atomically (temp file, fsync, rename), with ``metadata`` as PNG text chunks (non-strings as JSON)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_image writes PNG; {path} should end in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), value if isinstance(value, str) else json.dumps(value, default=str))
    # A crash or a full disk mid-write leaves the old file (or none), never half a PNG that looks finished.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        normal_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def ema(values: Sequence[float], smoothing: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing); NaN/inf points are skipped."""
    out, avg, n = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):  # one diverged step should not blank the rest of the curve
            out.append(float("nan"))
            continue
        n += 1
        avg = smoothing * avg + (1 - smoothing) * v
        out.append(avg / (1 - smoothing**n) if smoothing > 0 else v)
    return out


def plot_loss(
    history: Sequence[dict[str, Any]], path: str | Path | None = None, *, smoothing: float = 0.9
) -> Figure:
    """Loss per step (raw and EMA-smoothed), learning rate on a second axis; saves a PNG when ``path`` is given."""
    # Figure() directly, not pyplot: no global backend or figure state, works headless, and a notebook shows the
    # returned figure as it is.
    from matplotlib.figure import Figure

    rows = [r for r in history if "loss" in r and r["loss"] is not None]
    steps = [r.get("step", i) for i, r in enumerate(rows)]
    losses = [float(r["loss"]) for r in rows]
    fig = Figure(figsize=(7, 3.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if rows:
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
        ax.plot(steps, ema(losses, smoothing), color="tab:blue", linewidth=2, label=f"loss (EMA {smoothing})")
        legend_ax = ax
        lrs = [(s, r["lr"]) for s, r in zip(steps, rows) if r.get("lr") is not None]
        if lrs:
            ax2 = ax.twinx()
            ax2.plot([s for s, _ in lrs], [v for _, v in lrs], color="tab:orange", linewidth=1, label="lr")
            ax2.set_ylabel("learning rate", color="tab:orange")
            ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            legend_ax = ax2  # the twin axis is drawn on top: its legend is not hidden under the lr line
        handles = ax.get_lines() + (legend_ax.get_lines() if legend_ax is not ax else [])
        legend_ax.legend(handles=handles, loc="best", fontsize="small", framealpha=0.9)
    else:
        ax.text(0.5, 0.5, "no loss values yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if path is not None:
        from .io import atomic_path

        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    return fig


def tensor_to_image(pixels: Any) -> Image.Image:
    """A (3, H, W) tensor in [-1, 1] (what the trainer feeds the VAE) back to a PIL image."""
    arr = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def plot_counts(counts: dict[str, int], *, title: str = "", highlight: str | None = None, top: int | None = None) -> Figure:
    """A horizontal bar chart of counts (e.g. images per class), largest first, one bar optionally highlighted."""
    from matplotlib.figure import Figure

    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    fig = Figure(figsize=(7, max(2.0, 0.16 * len(items) + 0.8)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    names, values = [k for k, _ in items][::-1], [v for _, v in items][::-1]
    colors = ["tab:red" if n == highlight else "tab:blue" for n in names]
    ax.barh(names, values, color=colors)
    ax.tick_params(axis="y", labelsize=6 if len(items) > 30 else 9)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return fig


def plot_histograms(series: dict[str, Sequence[float]], *, bins: int = 20, title: str = "") -> Figure:
    """One histogram per named series, side by side (e.g. widths, heights, aspect ratios)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(series), 2.8), dpi=100, layout="constrained")
    for i, (name, values) in enumerate(series.items()):
        ax = fig.add_subplot(1, len(series), i + 1)
        ax.hist(list(values), bins=bins, color="tab:blue")
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig
