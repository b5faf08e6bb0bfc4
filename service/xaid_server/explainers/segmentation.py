"""Image segmentations for surrogate explanations: SLIC, quickshift and a regular grid.

SLIC and quickshift (scikit-image) run on the picture in display space, [H, W, 3] in [0, 1], so
their colour distances mean what they mean for a photo whatever the model's normalisation.
Quickshift takes the `lime` package's settings (kernel 4, max distance 200, ratio 0.2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from xaid_server.errors import InvalidArgument

ALGORITHMS = ("slic", "quickshift", "grid")
SLIC_SEGMENTS = 50
SLIC_COMPACTNESS = 10.0
GRID_CELLS_PER_SIDE = 8  # the default cell: an eighth of the shorter side
QUICKSHIFT = {"kernel_size": 4, "max_dist": 200, "ratio": 0.2, "rng": 42}


@dataclass(frozen=True)
class SegmentationParams:
    """The proto's `Segmentation` message; `resolve_segmentation` fills every field it uses."""

    algorithm: str = ""
    n_segments: int | None = None
    cell_size: int | None = None


def resolve_segmentation(
    given: SegmentationParams | Mapping[str, Any] | None, size: tuple[int, int], where: str
) -> SegmentationParams:
    """Defaults filled in for an image of `size` (H, W): SLIC with 50 segments.

    `where` names the field in errors ("lime.segmentation").
    """
    if isinstance(given, SegmentationParams):
        params = given
    else:
        values = dict(given or {})
        known = set(SegmentationParams.__dataclass_fields__)
        for key in values:
            if key not in known:
                raise InvalidArgument(
                    f"{where}.{key}: unknown parameter; known: {sorted(known)}",
                    field=f"{where}.{key}",
                )
        params = SegmentationParams(**values)
    algorithm = params.algorithm or "slic"
    if algorithm not in ALGORITHMS:
        raise InvalidArgument(
            f"{where}.algorithm: {algorithm!r} is not one of {list(ALGORITHMS)}",
            field=f"{where}.algorithm",
        )
    n_segments = _positive(params.n_segments, f"{where}.n_segments")
    cell_size = _positive(params.cell_size, f"{where}.cell_size")
    if algorithm == "slic":
        return SegmentationParams(algorithm, n_segments or SLIC_SEGMENTS, None)
    if n_segments is not None:
        raise InvalidArgument(
            f"{where}.n_segments: only slic takes a segment count", field=f"{where}.n_segments"
        )
    if algorithm == "quickshift":
        if cell_size is not None:
            raise InvalidArgument(
                f"{where}.cell_size: only grid takes a cell size", field=f"{where}.cell_size"
            )
        return SegmentationParams(algorithm)
    if cell_size is None:
        cell_size = max(1, round(min(size) / GRID_CELLS_PER_SIDE))
    if cell_size > min(size):
        raise InvalidArgument(
            f"{where}.cell_size: {cell_size} is larger than the image ({size[0]}x{size[1]})",
            field=f"{where}.cell_size",
        )
    return SegmentationParams(algorithm, None, cell_size)


def expected_segments(params: SegmentationParams, size: tuple[int, int]) -> int:
    """The segment count a resolved segmentation aims at (exact for the grid)."""
    if params.algorithm == "grid":
        assert params.cell_size is not None
        return -(-size[0] // params.cell_size) * -(-size[1] // params.cell_size)
    return params.n_segments or SLIC_SEGMENTS


def segment(picture: np.ndarray, params: SegmentationParams) -> np.ndarray:
    """Segment ids 0..M-1, int32 [H, W], for a [H, W, C] picture in [0, 1]."""
    height, width = picture.shape[:2]
    if params.algorithm == "grid":
        assert params.cell_size is not None
        rows = np.arange(height) // params.cell_size
        cols = np.arange(width) // params.cell_size
        labels = rows[:, None] * (-(-width // params.cell_size)) + cols[None, :]
    else:
        from skimage.segmentation import quickshift, slic

        rgb = np.repeat(picture, 3, axis=2) if picture.shape[2] == 1 else picture
        if params.algorithm == "slic":
            labels = slic(
                rgb,
                n_segments=params.n_segments,
                compactness=SLIC_COMPACTNESS,
                start_label=0,
                channel_axis=-1,
            )
        else:
            labels = quickshift(rgb, **QUICKSHIFT)  # type: ignore[no-untyped-call]
    _, contiguous = np.unique(labels, return_inverse=True)
    return contiguous.reshape(height, width).astype(np.int32)


def _positive(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InvalidArgument(f"{field}: expected a positive integer, got {value!r}", field=field)
    return int(value)
