"""Robust image loading for captioning: any common file becomes uint8 RGB [H, W, 3].

Real caption corpora contain CMYK JPEGs, 16-bit PNGs, palette images with transparency,
EXIF-rotated photos, truncated downloads and the occasional HTML error page saved as
`.jpg`. `load_image` turns each of those into either a clean RGB array or an `ImageError`
that names the file and the problem, so a training run fails early and clearly (or skips
the file, with `load_images(on_error="skip")`).
"""

from __future__ import annotations

import io
import os
import struct
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The largest declared width x height decoded, here and (the export's default) in the captioning
# SavedModel's graph, which refuses larger images from their headers too.
DEFAULT_MAX_PIXELS = 50_000_000
WHITE = (255, 255, 255)
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})

ImageSource = str | os.PathLike | bytes | bytearray | memoryview

# How an image whose shape differs from the model's square input is made to fit it: "pad"
# extends its shorter side to a square with copies of the edge pixels, half on each side, then
# resizes (its objects keep their shapes and relative places); "squash" resizes each side.
IMAGE_FITS = ("pad", "squash")


class ImageError(ValueError):
    """An image file is missing, unreadable, corrupt, or too large to decode safely."""


def describe_source(path_or_bytes: ImageSource) -> str:
    """A short human name for an image source, used in error messages."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return f"<{len(path_or_bytes)} bytes of image data>"
    return os.fspath(path_or_bytes)


def load_image(
    path_or_bytes: ImageSource,
    *,
    size: tuple[int, int] | None = None,
    fit: str = "squash",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> np.ndarray:
    """Decode one image file (path or raw bytes) to a uint8 RGB array [H, W, 3].

    Handles JPEG, PNG, GIF (first frame) and WebP; applies the EXIF orientation; converts
    grayscale, palette, CMYK, 1-bit and 16-bit images to 8-bit RGB, and composites any
    transparency onto white. The declared pixel count is checked against `max_pixels`
    from the header, before any pixel data is decoded. `size` is (width, height); when
    given, the result is resized to it with bilinear filtering, after `pad_to_square` with
    fit="pad" (which needs a square size; see IMAGE_FITS). `name` replaces the
    file name in error messages (useful for in-memory bytes).
    """
    label = name or describe_source(path_or_bytes)
    target_size = _check_size_argument(size)
    check_fit(fit, target_size)
    with _open(path_or_bytes, label) as image:
        _check_pixel_count(image, label, max_pixels)
        if target_size is not None and image.format == "JPEG":
            # Let libjpeg decode at a reduced scale that is still at least the target size
            # in both orientations (EXIF rotation may swap width and height).
            largest_side = max(target_size)
            image.draft("RGB", (largest_side, largest_side))
        try:
            image.load()
            rgb = _to_rgb(_apply_exif_orientation(image))
        except ImageError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
            raise ImageError(f"{label}: corrupt or truncated image data ({exc})") from exc
    if target_size is not None and rgb.size != target_size:
        if fit == "pad" and rgb.width != rgb.height:
            rgb = Image.fromarray(pad_to_square(np.asarray(rgb, dtype=np.uint8).reshape(rgb.height, rgb.width, 3)))
        rgb = rgb.resize(target_size, Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8).reshape(rgb.height, rgb.width, 3)


def pad_to_square(pixels: np.ndarray) -> np.ndarray:
    """[H, W, C] -> [L, L, C], L = max(H, W): the shorter side extended with copies of its edge
    pixels, (L - side) // 2 before and the rest after (as `image_graph.pad_to_square`)."""
    height, width = pixels.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return np.pad(pixels, ((top, side - height - top), (left, side - width - left), (0, 0)), mode="edge")


def check_fit(fit: str, size: tuple[int, int] | None = None) -> str:
    if fit not in IMAGE_FITS:
        raise ValueError(f"image fit must be one of {IMAGE_FITS}, got {fit!r}")
    if fit == "pad" and size is not None and size[0] != size[1]:
        raise ValueError(f"fit='pad' pads to a square, so size must be square, got {size[0]}x{size[1]}")
    return fit


def load_images(
    paths: Iterable[str | os.PathLike],
    *,
    size: tuple[int, int] | None,
    fit: str = "squash",
    on_error: Literal["skip", "raise"] = "skip",
    warn: Callable[[str], None] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Load many images into one batch [N, H, W, 3] uint8.

    Returns (images, kept_paths, failures) where failures lists (path, reason) for every
    file that could not be loaded. With on_error="skip", each bad file is reported once
    through `warn` (default: print to stderr) followed by a final count line; with
    on_error="raise", the first bad file raises its ImageError. `size` may be None only
    when every image already has the same dimensions.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    report = warn if warn is not None else _print_to_stderr
    path_list = [os.fspath(path) for path in paths]
    arrays: list[np.ndarray] = []
    kept_paths: list[str] = []
    failures: list[tuple[str, str]] = []
    for path in path_list:
        try:
            array = load_image(path, size=size, fit=fit, max_pixels=max_pixels)
        except ImageError as exc:
            if on_error == "raise":
                raise
            failures.append((path, str(exc)))
            report(f"warning: skipping image: {exc}")
            continue
        if arrays and array.shape != arrays[0].shape:
            raise ImageError(
                f"{path}: shape {array.shape} differs from {arrays[0].shape} of "
                f"{kept_paths[0]}; pass size=(width, height) to resize all images"
            )
        arrays.append(array)
        kept_paths.append(path)
    if failures:
        report(_skip_summary(failures, len(path_list)))
    if arrays:
        batch = np.stack(arrays)
    elif size is not None:
        batch = np.zeros((0, size[1], size[0], 3), dtype=np.uint8)
    else:
        batch = np.zeros((0, 0, 0, 3), dtype=np.uint8)
    return batch, kept_paths, failures


def _print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _skip_summary(failures: Sequence[tuple[str, str]], total: int) -> str:
    """'skipped 2 of 10 images: a.jpg, b.png' (listing at most five names)."""
    shown = [os.path.basename(path) or path for path, _ in failures[:5]]
    more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
    return f"skipped {len(failures)} of {total} images: {', '.join(shown)}{more}"


def _check_size_argument(size: tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        width, height = (int(side) for side in size)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"size must be (width, height), got {size!r}") from exc
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive (width, height), got {size!r}")
    return width, height


def _open(path_or_bytes: ImageSource, label: str) -> Image.Image:
    """Open (header only) with Pillow, turning every failure into an ImageError."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        if len(path_or_bytes) == 0:
            raise ImageError(f"{label}: empty image data")
        source = io.BytesIO(bytes(path_or_bytes))
    else:
        path = os.fspath(path_or_bytes)
        if not os.path.exists(path):
            raise ImageError(f"{label}: image file not found")
        if not os.path.isfile(path):
            raise ImageError(f"{label}: not a regular file")
        if os.path.getsize(path) == 0:
            raise ImageError(f"{label}: image file is empty (0 bytes)")
        source = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(source)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{label}: refused as a possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"{label}: not a recognised image file (expected JPEG, PNG, GIF or WebP)"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"{label}: cannot read image header ({exc})") from exc


def _check_pixel_count(image: Image.Image, label: str, max_pixels: int) -> None:
    """Refuse images whose declared size exceeds max_pixels, before decoding any pixels."""
    width, height = image.size
    pixels = width * height
    if pixels > max_pixels:
        image.close()
        raise ImageError(
            f"{label}: declared size {width}x{height} = {pixels:,} pixels exceeds the limit "
            f"of {max_pixels:,} pixels (possible decompression bomb)"
        )
    if pixels == 0:
        image.close()
        raise ImageError(f"{label}: image has zero size ({width}x{height})")


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says; a malformed EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, struct.error):
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency onto white."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(image)
    if mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image
    return image.convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit grayscale (0..65535) to 8 bits by value / 257, rounded.

    Mode "I" is 32-bit in Pillow but in image files it comes from 16-bit sources, so it
    is read with the same 0..65535 range (values outside it are clipped).
    """
    values = np.asarray(image, dtype=np.float64)
    scaled = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
    return Image.fromarray(np.stack([scaled] * 3, axis=-1))
