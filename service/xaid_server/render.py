"""Attribution heatmaps as PNG, drawn over the input so a person can see where the evidence lies.

Colour maps are a handful of anchor colours expanded to 256-entry lookup tables at import, so
rendering needs neither matplotlib nor float RGB arrays the size of the picture.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

# Diverging, for signed maps: blue (most negative) through white (zero) to red (most positive),
# so the sign reads at a glance and zero stays neutral.
DIVERGING_ANCHORS: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (0.00, (33, 102, 172)),
    (0.25, (103, 169, 207)),
    (0.50, (247, 247, 247)),
    (0.75, (239, 138, 98)),
    (1.00, (178, 24, 43)),
)
# Sequential, for non-negative maps: an inferno-like ramp whose brightness rises monotonically,
# so magnitude still reads without colour vision or in greyscale.
SEQUENTIAL_ANCHORS: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (0.00, (0, 0, 4)),
    (0.25, (87, 16, 110)),
    (0.50, (188, 55, 84)),
    (0.75, (249, 142, 9)),
    (1.00, (252, 255, 164)),
)
MIN_SIDE = 64  # a bare map smaller than this is upscaled so its cells stay visible
# zlib level 1 encodes a photo-sized heatmap about 4x faster than Pillow's default of 6, for
# output about a third larger: encoding dominates render time, and a client is waiting.
PNG_COMPRESS_LEVEL = 1
OUTLINE_COLOUR = (32, 32, 32)  # segment borders: dark on both colour maps' light ends


def _lookup_table(anchors: tuple[tuple[float, tuple[int, int, int]], ...]) -> npt.NDArray[np.uint8]:
    positions = np.array([p for p, _ in anchors], dtype=np.float64)
    colours = np.array([c for _, c in anchors], dtype=np.float64)
    levels = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(levels, positions, colours[:, k]) for k in range(3)], axis=1)
    return np.rint(table).astype(np.uint8)


_DIVERGING = _lookup_table(DIVERGING_ANCHORS)
_SEQUENTIAL = _lookup_table(SEQUENTIAL_ANCHORS)


def aggregate(
    attribution: npt.NDArray[Any], layout: str = "NCHW"
) -> tuple[npt.NDArray[np.float64], str]:
    """Reduce one example's attribution to a 2-D map that can be drawn over the picture.

    Summing keeps the sign, so evidence for and against the class can still be told apart; the
    returned description says how the map was made, for whoever reads it. A leading batch
    dimension of size 1 is tolerated since callers often slice it off late.
    """
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be NCHW or NHWC, not {layout!r}")
    arr = np.asarray(attribution, dtype=np.float64)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3:
        arr = arr.sum(axis=0 if layout == "NCHW" else 2)
    elif arr.ndim != 2:
        raise ValueError(f"expected [C, H, W], [H, W, C] or [H, W], got shape {arr.shape}")
    return arr, "sum over channels"


def heatmap_png(
    map2d: npt.NDArray[Any],
    background: Image.Image | None = None,
    *,
    signed: bool | None = None,
    alpha: float = 0.55,
    outlines: npt.NDArray[Any] | None = None,
) -> bytes:
    """Colour a 2-D attribution map and blend it over the background; return PNG bytes.

    The map is stretched bilinearly to the background's size so it lines up with the picture the
    client sees. Signed maps are scaled symmetrically by their largest magnitude so that zero is
    always white; non-negative maps run from dark (zero) to bright (maximum). signed=None picks
    diverging exactly when the map has a negative value. NaN counts as 0 and infinities as the
    largest finite value of their sign, so degenerate attributions still render. `outlines`, a
    segment id per element of the map, draws the segment borders so region weights read as regions.
    """
    m = np.asarray(map2d, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"expected a non-empty 2-D map, got shape {m.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], not {alpha}")
    m = _finite(m)
    if signed is None:
        signed = bool((m < 0).any())

    peak = float(np.abs(m).max())
    if peak > 0:
        m = m / peak  # into [-1, 1] first, so the arithmetic below cannot overflow
    if signed:
        level = 0.5 + 0.5 * m
        table = _DIVERGING
    else:
        lo, hi = min(0.0, float(m.min())), float(m.max())
        level = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
        table = _SEQUENTIAL
    level32 = np.clip(level, 0.0, 1.0).astype(np.float32)

    height, width = m.shape
    if background is not None:
        # Keyed transparency must become alpha before it can be dropped without a warning.
        base = background.convert("RGBA") if "transparency" in background.info else background
        base = base.convert("RGB")
        if base.size != (width, height):
            # Interpolating the level is the same as interpolating the map: the two are affine.
            stretched = Image.fromarray(level32).resize(base.size, Image.Resampling.BILINEAR)
            level32 = np.clip(np.asarray(stretched, dtype=np.float32), 0.0, 1.0)
    else:
        base = None
        factor = max(1, math.ceil(MIN_SIDE / min(height, width)))
        level32 = np.repeat(np.repeat(level32, factor, axis=0), factor, axis=1)

    index = np.rint(level32 * np.float32(255)).astype(np.uint8)
    heat = Image.fromarray(table[index])
    out = heat if base is None else Image.blend(base, heat, alpha)
    if outlines is not None:
        out = _outline(out, outlines)
    buffer = io.BytesIO()
    out.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _outline(image: Image.Image, segments: npt.NDArray[Any]) -> Image.Image:
    """Darken the pixels where the segment (scaled to the picture, nearest) changes."""
    ids = Image.fromarray(np.asarray(segments, dtype=np.int32)).resize(
        image.size, Image.Resampling.NEAREST
    )
    grid = np.asarray(ids)
    border = np.zeros(grid.shape, dtype=bool)
    border[:, 1:] |= grid[:, 1:] != grid[:, :-1]
    border[1:, :] |= grid[1:, :] != grid[:-1, :]
    pixels = np.array(image.convert("RGB"))
    pixels[border] = OUTLINE_COLOUR
    return Image.fromarray(pixels)


def _finite(m: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Replace NaN by 0 and infinities by the largest finite value of the same sign (or 0)."""
    finite = np.isfinite(m)
    if finite.all():
        return m
    values = m[finite]
    hi = max(0.0, float(values.max())) if values.size else 0.0
    lo = min(0.0, float(values.min())) if values.size else 0.0
    return np.nan_to_num(m, nan=0.0, posinf=hi, neginf=lo)
