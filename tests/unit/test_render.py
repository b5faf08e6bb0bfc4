"""Heatmaps: right size, right colours for the sign, right place, and no crash on odd maps."""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from xaid_server.render import MIN_SIDE, SEQUENTIAL_ANCHORS, aggregate, heatmap_png


def _decode(png: bytes) -> npt.NDArray[np.int64]:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    assert image.mode == "RGB"
    return np.asarray(image, dtype=np.int64)


def _grey(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (128, 128, 128))


def test_aggregate_sums_over_channels_in_either_layout() -> None:
    nchw = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    map2d, how = aggregate(nchw, "NCHW")
    assert how == "sum over channels"
    assert map2d.dtype == np.float64
    assert map2d.shape == (3, 4)
    np.testing.assert_allclose(map2d, nchw.sum(axis=0))

    nhwc = nchw.transpose(1, 2, 0)
    np.testing.assert_allclose(aggregate(nhwc, "NHWC")[0], map2d)
    np.testing.assert_allclose(aggregate(nchw[None], "NCHW")[0], map2d)
    np.testing.assert_allclose(aggregate(map2d)[0], map2d)


def test_aggregate_rejects_other_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        aggregate(np.zeros(5))
    with pytest.raises(ValueError, match="shape"):
        aggregate(np.zeros((2, 3, 4, 4)))
    with pytest.raises(ValueError, match="layout"):
        aggregate(np.zeros((3, 4, 4)), "CHW")


@pytest.mark.parametrize("size", [(50, 30), (7, 7), (300, 200)])
def test_output_has_the_background_size(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    pixels = _decode(heatmap_png(rng.normal(size=(10, 12)), _grey(*size)))
    assert pixels.shape == (size[1], size[0], 3)


def test_signed_map_is_red_where_positive_and_blue_where_negative() -> None:
    map2d = np.zeros((8, 8))
    map2d[2, 5] = 3.0
    map2d[6, 1] = -2.0
    pixels = _decode(heatmap_png(map2d, _grey(8, 8)))
    red, green, blue = pixels[2, 5]
    assert red > green + 40
    assert red > blue + 40
    red, green, blue = pixels[6, 1]
    assert blue > red + 40
    assert blue > green + 10
    # Zero is neutral: the background's grey, lightened toward white, with no hue.
    red, green, blue = pixels[0, 0]
    assert max(red, green, blue) - min(red, green, blue) <= 2


def test_signed_colours_survive_upsampling() -> None:
    map2d = np.zeros((4, 4))
    map2d[0, 3] = 1.0
    map2d[3, 0] = -1.0
    pixels = _decode(heatmap_png(map2d, _grey(40, 40)))
    red, green, blue = pixels[5, 35]
    assert red > max(green, blue) + 40
    red, green, blue = pixels[35, 5]
    assert blue > max(red, green) + 10


def test_signed_scale_is_symmetric_around_zero() -> None:
    map2d = np.array([[-1.0, 0.0, 4.0]])
    pixels = _decode(heatmap_png(map2d, signed=True))
    # -1 is a quarter of the way to the most negative colour, so it stays pale.
    red, green, blue = pixels[0, 0]
    assert blue > red
    assert min(red, green, blue) > 150


@pytest.mark.parametrize(
    ("map_shape", "peak", "size"),
    [((10, 10), (3, 7), (100, 100)), ((6, 12), (4, 2), (240, 60)), ((16, 16), (8, 8), (16, 16))],
)
def test_maximum_lands_in_the_right_place(
    map_shape: tuple[int, int], peak: tuple[int, int], size: tuple[int, int]
) -> None:
    map2d = np.zeros(map_shape)
    map2d[peak] = 5.0
    map2d[0, 0] = 1.0  # a lesser bump must not win
    pixels = _decode(heatmap_png(map2d, _grey(*size), alpha=1.0))
    brightness = pixels.sum(axis=2)
    row, col = np.unravel_index(int(brightness.argmax()), brightness.shape)
    cell_h = size[1] / map_shape[0]
    cell_w = size[0] / map_shape[1]
    assert peak[0] * cell_h <= row < (peak[0] + 1) * cell_h
    assert peak[1] * cell_w <= col < (peak[1] + 1) * cell_w


def test_non_negative_map_uses_the_sequential_ramp() -> None:
    map2d = np.zeros((8, 8))
    map2d[4, 4] = 2.0
    pixels = _decode(heatmap_png(map2d))
    factor = MIN_SIDE // 8
    assert tuple(pixels[0, 0]) == SEQUENTIAL_ANCHORS[0][1]
    assert tuple(pixels[4 * factor, 4 * factor]) == SEQUENTIAL_ANCHORS[-1][1]


@pytest.mark.parametrize(
    "map2d",
    [
        pytest.param(np.zeros((5, 7)), id="zeros"),
        pytest.param(np.full((5, 7), np.nan), id="all-nan"),
        pytest.param(np.full((5, 7), np.inf), id="all-inf"),
        pytest.param(np.array([[np.nan, -np.inf], [np.inf, 1.0]]), id="mixed"),
        pytest.param(np.full((5, 7), 1e-320), id="subnormal"),
        pytest.param(np.array([[1e308, -1e308]]), id="huge"),
    ],
)
@pytest.mark.parametrize("with_background", [False, True])
def test_degenerate_maps_still_render(
    map2d: npt.NDArray[np.float64], with_background: bool
) -> None:
    background = _grey(20, 10) if with_background else None
    with np.errstate(all="raise"):
        pixels = _decode(heatmap_png(map2d, background))
    if with_background:
        assert pixels.shape == (10, 20, 3)


def test_all_zero_map_with_signed_colouring_is_white() -> None:
    pixels = _decode(heatmap_png(np.zeros((3, 3)), signed=True))
    assert (pixels > 240).all()


def test_small_bare_maps_are_upscaled_by_whole_cells() -> None:
    pixels = _decode(heatmap_png(np.arange(8.0).reshape(2, 4)))
    assert pixels.shape == (MIN_SIDE, 2 * MIN_SIDE, 3)
    assert (pixels[: MIN_SIDE // 2, : MIN_SIDE // 2] == pixels[0, 0]).all()
    assert _decode(heatmap_png(np.ones((100, 80)))).shape == (100, 80, 3)


def test_alpha_zero_shows_only_the_background() -> None:
    background = Image.fromarray(np.full((6, 9, 3), (10, 200, 30), dtype=np.uint8))
    pixels = _decode(heatmap_png(np.ones((3, 3)), background, alpha=0.0))
    assert (pixels == (10, 200, 30)).all()


def test_non_rgb_backgrounds_are_accepted() -> None:
    for background in (Image.new("L", (12, 8), 90), Image.new("RGBA", (12, 8), (1, 2, 3, 4))):
        assert _decode(heatmap_png(np.ones((4, 6)), background)).shape == (8, 12, 3)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="alpha"):
        heatmap_png(np.ones((2, 2)), alpha=1.5)
    with pytest.raises(ValueError, match="2-D"):
        heatmap_png(np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="2-D"):
        heatmap_png(np.ones((0, 3)))
