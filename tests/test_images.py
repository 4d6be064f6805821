"""load_image / load_images on every awkward image kind met in real caption corpora."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from seq2seq.tasks.captioning.images import ImageError, load_image, load_images

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def save(image, path, format_name=None, **options):
    image.save(path, format=format_name, **options)
    return str(path)


def two_colour_rgb(width=40, height=20):
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2 :] = BLUE
    return Image.fromarray(pixels)


def png_with_declared_size(width, height, idat_rows=None):
    """A 1-bit grayscale PNG declaring width x height; only idat_rows rows of data (all when None)."""
    signature = b"\x89PNG\r\n\x1a\n"

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    rows = height if idat_rows is None else idat_rows
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(rows)) + compressor.flush()
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_rgb_png_round_trips_exactly(tmp_path):
    original = two_colour_rgb()
    result = load_image(save(original, tmp_path / "plain.png"))
    assert result.dtype == np.uint8 and result.shape == (20, 40, 3)
    np.testing.assert_array_equal(result, np.asarray(original))


def test_raw_bytes_are_accepted(tmp_path):
    buffer = io.BytesIO()
    two_colour_rgb().save(buffer, format="PNG")
    result = load_image(buffer.getvalue())
    assert result.shape == (20, 40, 3)
    assert tuple(result[0, 0]) == RED and tuple(result[0, -1]) == BLUE


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk_red = Image.new("CMYK", (16, 12), (0, 255, 255, 0))
    path = save(cmyk_red, tmp_path / "cmyk.jpg", "JPEG", quality=100)
    assert Image.open(path).mode == "CMYK"
    result = load_image(path)
    assert result.shape == (12, 16, 3)
    np.testing.assert_allclose(result[6, 8], RED, atol=8)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 65535], [128 * 257, 64 * 257]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I;16")
    result = load_image(path)
    assert result.shape == (2, 2, 3)
    np.testing.assert_array_equal(result[..., 0], [[0, 255], [128, 64]])
    np.testing.assert_array_equal(result[..., 0], result[..., 2])


def test_thirty_two_bit_integer_mode_uses_sixteen_bit_range(tmp_path):
    values = np.array([[0, 65535, 257 * 200]], dtype=np.int32)
    path = save(Image.fromarray(values), tmp_path / "deep.tif", "TIFF")
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(load_image(path)[0, :, 1], [0, 255, 200])


def test_palette_png_with_transparency_composites_on_white(tmp_path):
    palette_image = Image.new("P", (4, 2), 0)
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette_image.putpixel((3, 1), 1)
    path = save(palette_image, tmp_path / "palette.png", transparency=0)
    result = load_image(path)
    assert tuple(result[0, 0]) == WHITE
    assert tuple(result[1, 3]) == RED


def test_rgba_composites_half_transparent_red_on_white(tmp_path):
    rgba = Image.new("RGBA", (3, 3), (255, 0, 0, 128))
    result = load_image(save(rgba, tmp_path / "alpha.png"))
    np.testing.assert_allclose(result[1, 1], (255, 127, 127), atol=1)


def test_grayscale_with_alpha_composites_on_white(tmp_path):
    transparent_black = Image.new("LA", (2, 2), (0, 0))
    assert tuple(load_image(save(transparent_black, tmp_path / "la.png"))[0, 0]) == WHITE


def test_grayscale_and_one_bit_become_three_equal_channels(tmp_path):
    gray = Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8))
    np.testing.assert_array_equal(load_image(save(gray, tmp_path / "gray.png"))[0], [[0] * 3, [100] * 3, [255] * 3])
    one_bit = Image.new("1", (2, 1), 0)
    one_bit.putpixel((1, 0), 1)
    np.testing.assert_array_equal(load_image(save(one_bit, tmp_path / "bits.png"))[0], [[0] * 3, [255] * 3])


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    path = save(frames[0], tmp_path / "anim.gif", "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(path).n_frames == 2
    result = load_image(path)
    assert result.shape == (8, 8, 3)
    np.testing.assert_allclose(result[4, 4], RED, atol=3)


def test_webp_lossless(tmp_path):
    original = two_colour_rgb()
    result = load_image(save(original, tmp_path / "image.webp", "WEBP", lossless=True))
    np.testing.assert_array_equal(result, np.asarray(original))


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    path = save(two_colour_rgb(40, 20), tmp_path / "rotated.jpg", "JPEG", quality=95, exif=exif.tobytes())
    result = load_image(path)
    assert result.shape == (40, 20, 3)  # height and width swapped
    np.testing.assert_allclose(result[5, 10], RED, atol=30)  # left half is now the top half
    np.testing.assert_allclose(result[35, 10], BLUE, atol=30)


def test_exif_orientation_applies_before_resize(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(two_colour_rgb(400, 200), tmp_path / "rotated_big.jpg", "JPEG", exif=exif.tobytes())
    result = load_image(path, size=(30, 60))
    assert result.shape == (60, 30, 3)
    np.testing.assert_allclose(result[5, 15], RED, atol=30)
    np.testing.assert_allclose(result[55, 15], BLUE, atol=30)


def test_resize_to_width_height(tmp_path):
    result = load_image(save(two_colour_rgb(40, 20), tmp_path / "wide.png"), size=(10, 30))
    assert result.shape == (30, 10, 3)
    assert tuple(result[15, 0]) == RED and tuple(result[15, -1]) == BLUE


def test_huge_declared_size_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_declared_size(10_000, 10_000, idat_rows=10))
    assert path.stat().st_size < 10_000
    with pytest.raises(ImageError, match=r"bomb\.png.*100,000,000 pixels.*limit of 50,000,000") as error:
        load_image(str(path))
    assert "truncated" not in str(error.value)


def test_complete_decompression_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb20k.png"
    path.write_bytes(png_with_declared_size(20_000, 20_000))
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageError, match=r"bomb20k\.png.*400000000 pixels.*decompression bomb"):
        load_image(str(path))


def test_max_pixels_is_configurable(tmp_path):
    path = save(Image.new("RGB", (100, 100), RED), tmp_path / "medium.png")
    with pytest.raises(ImageError, match=r"100x100 = 10,000 pixels exceeds the limit of 9,999"):
        load_image(path, max_pixels=9_999)
    assert load_image(path, max_pixels=10_000).shape == (100, 100, 3)


def test_truncated_jpeg(tmp_path):
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noisy.save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg: corrupt or truncated"):
        load_image(str(path))


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "page.jpg"
    path.write_text("<html><body>404 Not Found</body></html>")
    with pytest.raises(ImageError, match=r"page\.jpg: not a recognised image"):
        load_image(str(path))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ImageError, match=r"absent\.png: image file not found"):
        load_image(str(tmp_path / "absent.png"))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png: image file is empty"):
        load_image(str(tmp_path / "empty.png"))


def test_bad_bytes_are_named_in_the_message():
    with pytest.raises(ImageError, match=r"<5 bytes of image data>: not a recognised image"):
        load_image(b"hello")
    with pytest.raises(ImageError, match=r"^coco 42: not a recognised image"):
        load_image(b"hello", name="coco 42")


def make_mixed_folder(tmp_path):
    """Eight good images of different sizes and modes, two bad ones."""
    paths = []
    for index in range(8):
        mode = ("RGB", "L", "RGBA", "P")[index % 4]
        paths.append(save(Image.new(mode, (10 + index, 20)), tmp_path / f"good{index}.png"))
    bad_text = tmp_path / "notes.png"
    bad_text.write_text("not an image")
    paths.insert(3, str(bad_text))
    paths.append(str(tmp_path / "gone.jpg"))
    return paths


def test_load_images_skip_mode_warns_once_per_file_and_counts(tmp_path):
    paths = make_mixed_folder(tmp_path)
    messages = []
    batch, kept, failures = load_images(paths, size=(16, 12), warn=messages.append)
    assert batch.shape == (8, 12, 16, 3) and batch.dtype == np.uint8
    assert kept == [path for path in paths if "good" in path]
    assert [path for path, _ in failures] == [paths[3], paths[-1]]
    assert "not a recognised image" in failures[0][1] and "not found" in failures[1][1]
    assert len(messages) == 3
    assert "notes.png" in messages[0] and "gone.jpg" in messages[1]
    assert messages[-1] == "skipped 2 of 10 images: notes.png, gone.jpg"


def test_load_images_default_warning_goes_to_stderr(tmp_path, capsys):
    load_images(make_mixed_folder(tmp_path), size=(8, 8))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 3 and "skipped 2 of 10 images" in captured.err


def test_load_images_raise_mode_raises_for_first_bad_file(tmp_path):
    with pytest.raises(ImageError, match=r"notes\.png"):
        load_images(make_mixed_folder(tmp_path), size=(8, 8), on_error="raise")


def test_load_images_without_size_needs_equal_shapes(tmp_path):
    same = [save(Image.new("RGB", (5, 4), RED), tmp_path / f"same{index}.png") for index in range(2)]
    batch, _, _ = load_images(same, size=None)
    assert batch.shape == (2, 4, 5, 3)
    different = same + [save(Image.new("RGB", (6, 4)), tmp_path / "other.png")]
    with pytest.raises(ImageError, match=r"other\.png.*pass size="):
        load_images(different, size=None)


def test_load_images_rejects_unknown_mode():
    with pytest.raises(ValueError, match="on_error"):
        load_images([], size=(4, 4), on_error="ignore")
