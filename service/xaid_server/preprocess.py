"""Encoded images to model input tensors, and input tensors back to pictures to draw on.

Images come from clients, so decoding treats the bytes as hostile: the declared size is checked
before any pixel data is decompressed, and every decoder failure becomes one short
InvalidArgument instead of a Pillow exception that would name internals.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from xaid_server.errors import InvalidArgument
from xaid_server.model_config import ImageConfig

# MPO is what Pillow calls a JPEG that carries extra frames (many phone cameras write these);
# it is opened by the JPEG decoder and its first frame is an ordinary JPEG picture.
_FORMATS = ("PNG", "JPEG")
_ACCEPTED = frozenset({*_FORMATS, "MPO"})
# 16-bit greyscale PNGs: Pillow's own conversion to L clips at 255 instead of rescaling.
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_UNDECODABLE = "image: not a decodable PNG or JPEG image"


def decode_image(
    data: bytes, config: ImageConfig, *, max_pixels: int = 50_000_000
) -> tuple[npt.NDArray[np.float32], Image.Image]:
    """Decode PNG/JPEG bytes into a [1, C, H, W] or [1, H, W, C] float32 tensor for the model.

    Also returns the decoded picture at its own size in RGB, so that explanations can be drawn
    over what the client sent rather than over the resized model input. Pillow's own
    decompression-bomb limit (Image.MAX_IMAGE_PIXELS) still applies when max_pixels is larger.
    """
    if not data:
        raise InvalidArgument("image: empty", field="image")
    image = _open_checked(data, max_pixels)
    try:
        image.load()
    except MemoryError:
        raise
    except Exception:  # any decoder failure on client bytes is the client's to fix
        raise InvalidArgument(_UNDECODABLE, field="image") from None
    image = _to_8bit(image)
    model_image = image.convert("L" if config.channels == 1 else "RGB")
    original = model_image if model_image.mode == "RGB" else image.convert("RGB")
    resized = model_image.resize((config.width, config.height), Image.Resampling.BILINEAR)

    x = np.array(resized, dtype=np.float32)  # a writable copy: normalised in place below
    if x.ndim == 2:
        x = x[:, :, None]
    x /= np.float32(config.scale)
    if config.mean:
        x -= np.asarray(config.mean, dtype=np.float32)
    if config.std:
        x /= np.asarray(config.std, dtype=np.float32)
    if config.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[None], dtype=np.float32), original


def tensor_to_image(
    x: npt.NDArray[Any], config: ImageConfig | None, layout: str = "NCHW"
) -> Image.Image:
    """Turn one model input ([C, H, W] or [H, W, C], no batch dim) back into an RGB picture.

    Inputs sent as raw tensors have no original image to draw a heatmap over; this recovers one.
    With a config the normalisation is undone exactly; without one, the values are stretched to
    the full 0..255 range since their units are unknown. [H, W] is taken as one channel.
    """
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be NCHW or NHWC, not {layout!r}")
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    elif arr.ndim == 3:
        if layout == "NCHW":
            arr = arr.transpose(1, 2, 0)
    else:
        raise ValueError(f"expected one example of 2 or 3 dimensions, got shape {arr.shape}")
    if arr.shape[2] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {arr.shape[2]}")
    if arr.size == 0:
        raise ValueError(f"cannot draw an empty tensor of shape {arr.shape}")

    channels = arr.shape[2]
    if config is not None:
        for name, values in (("mean", config.mean), ("std", config.std)):
            if values and len(values) != channels:
                raise ValueError(f"config has {len(values)} {name} values for {channels} channels")
        if config.std:
            arr = arr * np.asarray(config.std, dtype=np.float64)
        if config.mean:
            arr = arr + np.asarray(config.mean, dtype=np.float64)
        arr = np.nan_to_num(arr * config.scale, nan=0.0, posinf=255.0, neginf=0.0)
    else:
        arr = _stretch(arr)
    pixels = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return Image.fromarray(pixels)


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and refuse oversized images before their pixels are decompressed."""
    limit = max_pixels
    if Image.MAX_IMAGE_PIXELS is not None:
        limit = min(limit, Image.MAX_IMAGE_PIXELS)
    too_large = InvalidArgument(
        f"image: larger than the {limit} pixels this server accepts", field="image"
    )
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than raises) between its limit and twice that; both mean
            # an image far beyond anything a model needs, so both are refused. catch_warnings
            # swaps the process-wide filter list (not thread-local before Python 3.14): other
            # threads see this one extra filter meanwhile, and a filter they add may be lost.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_large from None
    except MemoryError:
        raise
    except Exception:  # malformed headers raise many exception types
        raise InvalidArgument(_UNDECODABLE, field="image") from None
    if image.format not in _ACCEPTED:
        raise InvalidArgument(_UNDECODABLE, field="image")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidArgument("image: has no pixels", field="image")
    if width * height > max_pixels:
        raise too_large
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """Bring decoded images into modes whose conversion to RGB/L keeps their tones."""
    if image.mode in _WIDE_GREY_MODES:
        wide = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8))
    if "transparency" in image.info:
        # Palette/keyed transparency cannot be dropped directly without a Pillow warning;
        # going through RGBA makes the alpha explicit, and converting on discards it.
        return image.convert("RGBA")
    return image


def _stretch(arr: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Min-max scale to 0..255 over the finite values; non-finite values get the minimum."""
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros_like(arr)
    lo = float(arr[finite].min())
    hi = float(arr[finite].max())
    arr = np.where(finite, arr, lo)
    if hi <= lo:
        return np.zeros_like(arr)
    out: npt.NDArray[np.float64] = (arr - lo) * (255.0 / (hi - lo))
    return out
