"""Procedural shape images with object masks, numpy only.

They are the training data of the bundled shapes model and the ground truth for checking that an
explanation points at the object: the label depends on the outline alone, while colours, textures,
clutter and noise are random, so a model can only score well by looking at the shape.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

# Every class is a solid shape whose centre lies on the object: where the evidence for a ring is
# partly its hole, "the explanation points at the object" would not be well defined.
CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart", "pentagon")

Floats = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]

# Shape radius in pixels for a 64 px image; the diameter spans about 20 to 40 px.
_RADIUS = (10.5, 18.5)
# Per-axis stretch, so that circles and squares are not all perfect.
_ASPECT = (0.88, 1.13)
# RGB distance between the two background colours.
_BACKGROUND_CONTRAST = (30.0, 130.0)
# Least RGB distance between the object and each background colour, so the object stays visible.
_MIN_CONTRAST = 90.0


def _circle(u: Floats, v: Floats, rng: np.random.Generator) -> Mask:
    return u * u + v * v <= 0.9**2


def _square(u: Floats, v: Floats, rng: np.random.Generator) -> Mask:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.7


def _regular(u: Floats, v: Floats, sides: int, radius: float) -> Mask:
    # Inside every edge; the vertices lie at angles 2 pi k / sides, the edge normals halfway.
    apothem = radius * np.cos(np.pi / sides)
    inside = np.ones(u.shape, dtype=bool)
    for k in range(sides):
        angle = (2 * k + 1) * np.pi / sides
        inside &= u * np.cos(angle) + v * np.sin(angle) <= apothem
    return inside


def _triangle(u: Floats, v: Floats, rng: np.random.Generator) -> Mask:
    return _regular(u, v, 3, 1.0)


def _pentagon(u: Floats, v: Floats, rng: np.random.Generator) -> Mask:
    return _regular(u, v, 5, 0.95)


def _star(u: Floats, v: Floats, rng: np.random.Generator) -> Mask:
    # Five points: fold the angle into one half-sector, then test against the edge from the
    # outer tip (1, 0) to the inner vertex at angle pi/5.
    sector = 2 * np.pi / 5
    inner = rng.uniform(0.42, 0.5)
    rho = np.hypot(u, v)
    phi = np.mod(np.arctan2(v, u), sector)
    phi = np.minimum(phi, sector - phi)
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    dx, dy = inner * np.cos(sector / 2) - 1.0, inner * np.sin(sector / 2)
    inside: Mask = dx * py - dy * (px - 1.0) >= 0
    return inside


def _cross(u: Floats, v: Floats, rng: np.random.Generator) -> Mask:
    half_width = rng.uniform(0.26, 0.34)
    au, av = np.abs(u), np.abs(v)
    return ((au <= half_width) & (av <= 0.95)) | ((av <= half_width) & (au <= 0.95))


def _heart(u: Floats, v: Floats, rng: np.random.Generator) -> Mask:
    # The sextic heart (x^2 + y^2 - 1)^3 <= x^2 y^3, centred on its bounding box, radius 0.95.
    k = 1.337 / 0.95
    x, y = u * k, v * k + 0.118
    inside: Mask = (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    return inside


_SHAPES: tuple[Callable[[Floats, Floats, np.random.Generator], Mask], ...] = (
    _circle,
    _square,
    _triangle,
    _star,
    _cross,
    _heart,
    _pentagon,
)
assert len(_SHAPES) == len(CLASSES)


def _normalise(t: Floats) -> Floats:
    lo, hi = float(t.min()), float(t.max())
    return (t - lo) / (hi - lo) if hi > lo else np.zeros_like(t)


def _stripes(rng: np.random.Generator, yy: Floats, xx: Floats, size: int) -> Floats:
    angle = rng.uniform(0, np.pi)
    cycles = rng.uniform(1.5, 8.0)
    wave: Floats = np.sin(
        2 * np.pi * cycles * (xx * np.cos(angle) + yy * np.sin(angle)) / size
        + rng.uniform(0, 2 * np.pi)
    )
    if rng.random() < 0.5:  # hard-edged stripes: strong straight edges the model must ignore
        wave = np.sign(wave)
    stripes: Floats = 0.5 + 0.5 * wave
    return stripes


def _blobs(rng: np.random.Generator, yy: Floats, xx: Floats, size: int) -> Floats:
    t = np.zeros_like(xx)
    for _ in range(int(rng.integers(3, 9))):
        cy, cx = rng.uniform(0, size, 2)
        sigma = rng.uniform(0.05, 0.18) * size
        t += rng.uniform(-1, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    return _normalise(t)


def _gradient(rng: np.random.Generator, yy: Floats, xx: Floats, size: int) -> Floats:
    angle = rng.uniform(0, 2 * np.pi)
    return _normalise(xx * np.cos(angle) + yy * np.sin(angle)) ** rng.uniform(0.5, 2.0)


def _value_noise(rng: np.random.Generator, yy: Floats, xx: Floats, size: int) -> Floats:
    cells = int(rng.integers(3, 20))
    grid = rng.random((cells + 1, cells + 1))
    pos = np.linspace(0, cells, size, endpoint=False)
    if rng.random() < 0.3:  # blocky, like a coarse checkerboard
        idx = pos.astype(np.intp)
        blocky: Floats = grid[np.ix_(idx, idx)]
        return blocky
    i0 = pos.astype(np.intp)
    f = pos - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]
    smooth: Floats = rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
    return smooth


_TEXTURES: tuple[Callable[[np.random.Generator, Floats, Floats, int], Floats], ...] = (
    _stripes,
    _blobs,
    _gradient,
    _value_noise,
)


def _background_colours(rng: np.random.Generator) -> tuple[Floats, Floats]:
    """Two colours a moderate distance apart: busy, but less salient than the object."""
    low = rng.uniform(0, 255, 3)
    direction = rng.normal(size=3)
    direction /= max(float(np.linalg.norm(direction)), 1e-6)
    high = np.clip(low + direction * rng.uniform(*_BACKGROUND_CONTRAST), 0, 255)
    return low, high


def _object_colour(rng: np.random.Generator, background: tuple[Floats, Floats]) -> Floats:
    """A random colour far from both background colours (the farthest of a few if none is)."""
    candidates = rng.uniform(0, 255, (32, 3))
    distance = np.minimum(
        np.linalg.norm(candidates - background[0], axis=1),
        np.linalg.norm(candidates - background[1], axis=1),
    )
    good = np.flatnonzero(distance >= _MIN_CONTRAST)
    colour: Floats = candidates[good[0] if good.size else int(np.argmax(distance))]
    return colour


def _clutter(rng: np.random.Generator, image: Floats, yy: Floats, xx: Floats, size: int) -> None:
    """Thin line segments and small dots: edges and colour spots that carry no label."""
    for _ in range(int(rng.integers(0, 5))):
        y0, x0 = rng.uniform(0, size, 2)
        angle = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.1, 0.45) * size
        width = rng.uniform(0.6, 1.4)
        dy, dx = np.sin(angle), np.cos(angle)
        box = _box(
            min(y0, y0 + length * dy),
            max(y0, y0 + length * dy),
            min(x0, x0 + length * dx),
            max(x0, x0 + length * dx),
            width,
            size,
        )
        ys, xs = yy[box], xx[box]
        along = np.clip((ys - y0) * dy + (xs - x0) * dx, 0, length)
        dist = np.hypot(ys - (y0 + along * dy), xs - (x0 + along * dx))
        image[box][dist <= width] = rng.uniform(0, 255, 3)
    for _ in range(int(rng.integers(0, 4))):
        cy, cx = rng.uniform(0, size, 2)
        radius = rng.uniform(1.0, 0.05 * size)
        box = _box(cy, cy, cx, cx, radius, size)
        inside = (yy[box] - cy) ** 2 + (xx[box] - cx) ** 2 <= radius**2
        image[box][inside] = rng.uniform(0, 255, 3)


def _box(
    y_lo: float, y_hi: float, x_lo: float, x_hi: float, pad: float, size: int
) -> tuple[slice, slice]:
    """The pixel rows and columns within `pad` of a bounding box, so clutter costs little."""
    return (
        slice(max(int(y_lo - pad), 0), min(int(y_hi + pad) + 1, size)),
        slice(max(int(x_lo - pad), 0), min(int(x_hi + pad) + 1, size)),
    )


def generate(
    rng: np.random.Generator, n: int, size: int = 64
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """`n` images [n, size, size, 3] uint8 RGB, labels [n] int64 (indices into CLASSES) and
    object masks [n, size, size] bool; the same generator state gives the same images."""
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, len(CLASSES), n).astype(np.int64)
    masks = np.empty((n, size, size), dtype=bool)
    grid = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    yy, xx = grid[0], grid[1]
    scale = size / 64.0
    for i in range(n):
        low, high = _background_colours(rng)
        texture = _TEXTURES[int(rng.integers(len(_TEXTURES)))](rng, yy, xx, size)
        image = low + texture[..., None] * (high - low)
        _clutter(rng, image, yy, xx, size)

        radius = rng.uniform(*_RADIUS) * scale
        aspect = rng.uniform(*_ASPECT)
        rx, ry = radius * aspect, radius / aspect
        reach = max(rx, ry) + 1.0
        cy, cx = rng.uniform(reach, size - reach, 2)
        angle = rng.uniform(0, 2 * np.pi)
        cos, sin = np.cos(angle), np.sin(angle)
        u = ((xx - cx) * cos + (yy - cy) * sin) / rx
        v = (-(xx - cx) * sin + (yy - cy) * cos) / ry
        mask = _SHAPES[labels[i]](u, v, rng)

        colour = _object_colour(rng, (low, high))
        light = rng.uniform(-0.2, 0.2, 2)  # a soft shading ramp across the object
        shade = 1.0 + light[0] * u + light[1] * v
        image[mask] = colour * shade[mask][:, None]
        noise = rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(2.0, 16.0)
        images[i] = np.clip(image + noise + 0.5, 0, 255).astype(np.uint8)
        masks[i] = mask
    return images, labels, masks
