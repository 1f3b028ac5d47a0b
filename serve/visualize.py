"""A PNG showing what was pruned: the kept slices, kept tokens bright, pruned tokens dimmed.

Pure PIL + numpy (no display, no matplotlib state), safe to call from worker threads.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

TILE_PX = 192  # longest side of one slice tile
MAX_TILES = 16
KEPT_RGB = (40, 220, 90)  # outline of kept tokens
PRUNED_DIM = 0.3  # brightness factor of pruned tokens
BACKGROUND = (16, 16, 16)


def _tile(slice_rgb: np.ndarray, kept: Sequence[int], grid: tuple[int, int] | None) -> Image.Image:
    """One slice (h, w, 3) uint8 with its kept-token overlay, scaled to TILE_PX."""
    h, w = slice_rgb.shape[:2]
    scale = TILE_PX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    base = np.asarray(Image.fromarray(slice_rgb).resize(size, Image.BILINEAR), dtype=np.float32)
    if grid is None:
        return Image.fromarray(base.astype(np.uint8))
    rows, cols = grid
    mask = np.zeros(rows * cols, dtype=bool)
    valid = [t for t in kept if 0 <= t < rows * cols]
    mask[valid] = True
    mask = mask.reshape(rows, cols)  # (rows, cols) raster order
    # Upsample the token mask to pixels: (H', W') booleans.
    ys = np.minimum((np.arange(size[1]) * rows) // size[1], rows - 1)
    xs = np.minimum((np.arange(size[0]) * cols) // size[0], cols - 1)
    pixel_kept = mask[ys][:, xs]
    base[~pixel_kept] *= PRUNED_DIM
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    cell_w, cell_h = size[0] / cols, size[1] / rows
    for r, c in zip(*np.nonzero(mask), strict=True):
        x0, y0 = c * cell_w, r * cell_h
        draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + cell_h - 1], outline=KEPT_RGB)
    return img


def render_kept_tokens(slices: np.ndarray | None, kept_slices: Sequence[int],
                       kept_tokens: Sequence[Sequence[int]], grid: tuple[int, int] | None, *,
                       title: str = "", max_tiles: int = MAX_TILES) -> bytes:
    """PNG bytes of up to ``max_tiles`` kept slices with their kept tokens highlighted.

    Args:
        slices: (k, h, w, 3) uint8, the kept slices in the order of ``kept_slices``.
        kept_slices: original slice numbers (labels).
        kept_tokens: per kept slice, the kept LLM-token indices (raster order in ``grid``).
        grid: (rows, cols) LLM tokens per slice; None draws the slices without overlay.
        title: a caption line (e.g. the answer), truncated.
    Raises:
        ValueError: ``slices`` missing or not (k, h, w, 3).
    """
    if slices is None or slices.ndim != 4 or slices.shape[-1] != 3:
        shape = None if slices is None else slices.shape
        raise ValueError(f"slices must be (k, h, w, 3) uint8, got {shape}")
    count = min(len(slices), max_tiles)
    tiles = [_tile(np.asarray(slices[i], dtype=np.uint8),
                   kept_tokens[i] if i < len(kept_tokens) else [], grid) for i in range(count)]
    cols = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / cols))
    tw = max((t.width for t in tiles), default=TILE_PX)
    th = max((t.height for t in tiles), default=TILE_PX)
    header, label = 22, 14
    canvas = Image.new("RGB", (cols * (tw + 4) + 4, header + rows * (th + label + 4) + 4),
                       BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    caption = f"{len(slices)} kept slices (showing {count})"
    if title:
        caption += " | " + " ".join(title.split())
    draw.text((4, 4), caption[:120], fill=(235, 235, 235))
    for i, tile in enumerate(tiles):
        x = 4 + (i % cols) * (tw + 4)
        y = header + (i // cols) * (th + label + 4)
        number = kept_slices[i] if i < len(kept_slices) else i
        tokens = len(kept_tokens[i]) if i < len(kept_tokens) else 0
        draw.text((x, y), f"slice {number}: {tokens} tokens", fill=(200, 200, 200))
        canvas.paste(tile, (x, y + label))
    out = io.BytesIO()
    canvas.save(out, format="PNG", optimize=False)
    return out.getvalue()
