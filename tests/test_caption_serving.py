"""The captioning serving graph: in-graph decoding gives the CLI's pixels, each image of a batch
is checked and answered on its own, and images over the pixel limit are refused unread.

Every test runs the tf.functions that `export` writes into the SavedModel (`decode_images`,
`serving_function`, `attention_function`) in-process on the session's tiny captioning run.
"""

import io
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from seq2seq.tasks.captioning import image_graph as graph
from seq2seq.tasks.captioning.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from test_images import png_with_declared_size

IMAGES = tf.TensorSpec([None], tf.string)


def encode(image, format_name, **options):
    buffer = io.BytesIO()
    image.save(buffer, format=format_name, **options)
    return buffer.getvalue()


def quadrants(width=48, height=24):
    """Red left third, blue top right, green bottom right: every flip and turn moves a colour."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 3] = (255, 0, 0)
    pixels[: height // 2, width // 3 :] = (0, 0, 255)
    pixels[height // 2 :, width // 3 :] = (0, 200, 0)
    return Image.fromarray(pixels)


def exif_block(orientation, byte_order=">"):
    exif = Image.Exif()
    exif.endian = byte_order  # "<": TIFF "II", ">": "MM"
    exif[0x010F] = "camera"  # another IFD0 entry before the orientation
    exif[0x0112] = orientation
    return exif.tobytes()


def exif_jpeg(orientation, byte_order):
    return encode(quadrants(), "JPEG", quality=95, exif=exif_block(orientation, byte_order))


def half_transparent_rgba():
    pixels = np.zeros((20, 30, 4), np.uint8)
    pixels[..., 0] = 200
    pixels[..., 3] = np.linspace(0, 255, 30).astype(np.uint8)[None]  # transparent to opaque, left to right
    return Image.fromarray(pixels, "RGBA")


def palette_with_transparency():
    palette = quadrants().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    return palette, palette.getpixel((0, 0))


def sixteen_bit_gray_png():
    values = (np.arange(24 * 48).reshape(24, 48) * 56).astype(np.uint16)
    return encode(Image.fromarray(values), "PNG")


def same_files():
    """The files both decoders must read alike: EXIF orientations, transparency of every kind, and modes."""
    palette, transparent_index = palette_with_transparency()
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((120, 90))
    files = {f"jpeg orientation {k} {order}": exif_jpeg(k, order) for k in range(1, 9) for order in "<>"}
    files.update({
        "transparent rgba png": encode(half_transparent_rgba(), "PNG"),
        "gray + alpha png": encode(half_transparent_rgba().convert("LA"), "PNG"),
        "palette png with tRNS": encode(palette, "PNG", transparency=transparent_index),
        "palette gif with transparency": encode(palette, "GIF", transparency=transparent_index),
        "transparent webp": encode(half_transparent_rgba(), "WEBP", lossless=True),
        "png with exif orientation 6": encode(quadrants(), "PNG", exif=exif_block(6)),
        "webp with exif orientation 8": encode(quadrants(), "WEBP", lossless=True, exif=exif_block(8, "<")),
        "grayscale png": encode(quadrants().convert("L"), "PNG"),
        "grayscale jpeg": encode(quadrants().convert("L"), "JPEG"),
        "1-bit png": encode(quadrants().convert("1"), "PNG"),
        "16-bit grayscale png": sixteen_bit_gray_png(),
        "cmyk jpeg": encode(quadrants().convert("CMYK"), "JPEG"),
        "bmp": encode(quadrants(), "BMP"),
        "photo jpeg (resized)": encode(noisy, "JPEG", quality=90),
        "photo png (resized)": encode(noisy, "PNG"),
        "large jpeg (decoded at 1/8 scale)": encode(noisy.resize((640, 480)), "JPEG"),
    })
    return files


@pytest.fixture(scope="module")
def captioner(tiny_caption_run):
    from seq2seq.tasks.captioning.pipeline import CaptionRun

    run = CaptionRun.load(tiny_caption_run)
    return run.captioner(run.load_model())


@pytest.fixture(scope="module")
def decode(captioner):
    return tf.function(captioner.decode_images, input_signature=[IMAGES])


@pytest.fixture(scope="module")
def serve(captioner):
    return captioner.serving_function(beam_size=2)


@pytest.fixture(scope="module")
def decoded_same_files(decode):
    files = same_files()
    pixels, errors = decode(tf.constant(list(files.values())))
    return {name: (files[name], pixels[row].numpy(), errors[row].numpy().decode()) for row, name in enumerate(files)}


@pytest.fixture(scope="module")
def squashing_captioner(captioner):
    """The tiny run's model (trained with image_fit "pad") served squashing, the default."""
    from seq2seq.tasks.captioning.captioner import Captioner

    return Captioner(captioner.model, captioner.vocab, captioner.tokenizer, captioner.image_size,
                     captioner.grid_size, image_fit="squash")


@pytest.fixture(scope="module")
def decode_squashed(squashing_captioner):
    return tf.function(squashing_captioner.decode_images, input_signature=[IMAGES])


@pytest.fixture(scope="module")
def squashed_same_files(decode_squashed):
    files = same_files()
    pixels, errors = decode_squashed(tf.constant(list(files.values())))
    return {name: (files[name], pixels[row].numpy(), errors[row].numpy().decode()) for row, name in enumerate(files)}


@pytest.mark.parametrize("fit", ["pad", "squash"])
@pytest.mark.parametrize("name", list(same_files()))
def test_graph_decodes_to_the_pixels_the_cli_loads(request, captioner, name, fit):
    """The CLI's load_image(size=(S, S), fit=...) and the graph agree: EXIF orientation, transparency
    on white, JPEG DCT and draft scale, padding to a square with edge pixels (fit "pad", the tiny
    run's) or none, bilinear resize (rounded between its two passes, as Pillow's)."""
    decoded = request.getfixturevalue("decoded_same_files" if fit == "pad" else "squashed_same_files")
    assert captioner.image_fit == "pad"
    data, pixels, error = decoded[name]
    size = captioner.image_size
    expected = load_image(data, size=(size, size), fit=fit).astype(int)
    difference = np.abs(pixels.astype(int) - expected)
    assert error == ""
    assert difference.max() <= 1, name  # Pillow's fixed-point resize weights: one level at most
    assert difference.mean() < 0.02, name


@pytest.mark.parametrize("height, width", [(3, 8), (8, 3), (4, 7), (7, 4), (5, 5), (1, 6)])
def test_pad_to_square_repeats_the_edges_alike_in_the_graph_and_the_cli(height, width):
    from seq2seq.tasks.captioning.images import pad_to_square

    pixels = np.random.default_rng(height * 10 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    padded = pad_to_square(pixels)
    side = max(height, width)
    assert padded.shape == (side, side, 3)
    top, left = (side - height) // 2, (side - width) // 2
    np.testing.assert_array_equal(padded[top : top + height, left : left + width], pixels)
    np.testing.assert_array_equal(padded[:top + 1, left : left + width], np.broadcast_to(pixels[:1], (top + 1, width, 3)))
    np.testing.assert_array_equal(padded[top + height - 1 :, left : left + width],
                                  np.broadcast_to(pixels[-1:], (side - top - height + 1, width, 3)))
    np.testing.assert_array_equal(padded[top : top + height, : left + 1], np.broadcast_to(pixels[:, :1], (height, left + 1, 3)))
    np.testing.assert_array_equal(graph.pad_to_square(tf.constant(pixels)).numpy(), padded)


def test_padding_keeps_a_wide_image_in_shape_where_squashing_does_not(captioner, decode, decode_squashed):
    """A 64x32 white image with a black 16x16 square in the middle: padded, the square
    stays square in the model input; squashed, it comes out twice as tall as wide."""
    pixels = np.full((32, 64, 3), 255, np.uint8)
    pixels[8:24, 24:40] = 0
    data = encode(Image.fromarray(pixels), "PNG")
    size = captioner.image_size

    def dark_extent(served):
        dark = served.max(axis=-1) < 128
        return dark.any(axis=1).sum(), dark.any(axis=0).sum()  # rows, columns

    padded = decode(tf.constant([data]))[0][0].numpy()
    squashed = decode_squashed(tf.constant([data]))[0][0].numpy()
    rows, columns = dark_extent(padded)
    assert abs(rows - columns) <= 1 and abs(columns - size // 4) <= 1, (rows, columns)
    rows, columns = dark_extent(squashed)
    assert abs(rows - 2 * columns) <= 2 and abs(columns - size // 4) <= 1, (rows, columns)
    np.testing.assert_array_equal(padded, load_image(data, size=(size, size), fit="pad"))
    np.testing.assert_array_equal(squashed, load_image(data, size=(size, size), fit="squash"))


def test_exif_orientation_and_transparency_change_the_pixels(decoded_same_files):
    """The cases above are not trivially equal: orientation 6 moves the red third from the left edge
    to the top, and transparent pixels come out white, not black."""
    _, upright, _ = decoded_same_files["jpeg orientation 1 <"]
    _, turned, _ = decoded_same_files["jpeg orientation 6 >"]
    assert upright[16, 0, 0] > 200 and upright[0, 31, 0] < 50  # red on the left
    assert turned[0, 16, 0] > 200 and turned[31, 16, 0] < 50  # red on top
    _, transparent, _ = decoded_same_files["transparent rgba png"]
    assert transparent[:, 0].min() >= 250  # the transparent left edge is white
    _, gif, _ = decoded_same_files["palette gif with transparency"]
    assert gif[:, 0].min() >= 250


def jpeg_declaring(width, height):
    data = bytearray(encode(quadrants(), "JPEG"))
    start = data.index(b"\xff\xc0")  # SOF0: marker, length, precision, height, width
    data[start + 5 : start + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_declaring(width, height):
    data = bytearray(encode(quadrants(), "WEBP", lossless=True))
    assert data[12:16] == b"VP8L"
    bits = struct.unpack("<I", data[21:25])[0]
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    data[21:25] = struct.pack("<I", bits)
    return bytes(data)


def patched(data, offset, fields, values):
    data = bytearray(data)
    data[offset : offset + struct.calcsize(fields)] = struct.pack(fields, *values)
    return bytes(data)


def test_images_over_the_pixel_limit_are_refused_unread(serve):
    """A 20000x20000 PNG (a small file: the issue's decompression bomb) and every other format
    declaring too many pixels are refused from their headers, each with its size."""
    bombs = {
        "20000x20000": png_with_declared_size(20_000, 20_000),
        "30000x20000": jpeg_declaring(30_000, 20_000),
        "60000x60000": patched(encode(quadrants(), "GIF"), 6, "<HH", (60_000, 60_000)),
        "20000x30000": patched(encode(quadrants(), "BMP"), 18, "<ii", (20_000, -30_000)),
        "16384x16384": webp_declaring(16_384, 16_384),
    }
    good = encode(quadrants(), "PNG")
    out = serve(images=tf.constant([good, *bombs.values()]))
    errors = [error.decode() for error in out["errors"].numpy()]
    assert errors[0] == "" and out["captions"].numpy()[0]
    for size, error in zip(bombs, errors[1:]):
        assert error == f"image of {size} pixels is over the limit of {DEFAULT_MAX_PIXELS:,} pixels"
    assert out["captions"].numpy()[1:].tolist() == [b""] * len(bombs)


def test_the_graph_and_the_cli_have_one_pixel_limit(captioner):
    """The default limit is the CLI's; another limit refuses exactly what load_image refuses with it."""
    assert captioner.max_pixels == DEFAULT_MAX_PIXELS and int(captioner.info()["max_pixels"]) == DEFAULT_MAX_PIXELS
    at_limit, over_limit = encode(Image.new("RGB", (40, 25)), "PNG"), encode(Image.new("RGB", (41, 25)), "PNG")
    assert graph.refusal(tf.constant(at_limit), 1_000)[0].numpy() == b""
    refused = graph.refusal(tf.constant(over_limit), 1_000)[0].numpy()
    assert refused == b"image of 41x25 pixels is over the limit of 1,000 pixels"
    assert load_image(at_limit, max_pixels=1_000).shape == (25, 40, 3)
    with pytest.raises(ImageError, match="41x25 = 1,025 pixels exceeds the limit of 1,000"):
        load_image(over_limit, max_pixels=1_000)


def corrupt_png():
    """A PNG whose header is fine and whose image data is not (zlib stream garbled)."""
    data = bytearray(encode(quadrants(), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start + 2 : start + 40] = bytes(range(38))
    return bytes(data)


def test_each_image_gets_its_own_status_and_the_good_ones_their_captions(serve):
    good = [encode(quadrants(), "PNG"), encode(quadrants().rotate(180), "JPEG")]
    bad = {
        b"": "empty input",
        b"<html><body>404 not found</body></html>": "not a JPEG, PNG, GIF, BMP or WebP image",
        good[0][:100]: "corrupt or truncated image data",  # a valid header, cut in its image data
        good[1][: len(good[1]) // 2]: "corrupt or truncated image data",
        corrupt_png(): "corrupt or truncated image data",
        encode(quadrants().convert("P"), "BMP"): "unsupported BMP (only uncompressed 24- and 32-bit BMPs are read)",
        patched(good[0], 16, ">II", (0, 24)): "image has zero size (0x24)",
    }
    batch = [good[0], *bad, good[1]]
    out = serve(images=tf.constant(batch))
    alone = serve(images=tf.constant(good))
    assert [error.decode() for error in out["errors"].numpy()] == ["", *bad.values(), ""]
    captions = out["captions"].numpy().tolist()
    assert [captions[0], captions[-1]] == alone["captions"].numpy().tolist() and captions[0] and captions[-1]
    assert captions[1:-1] == [b""] * len(bad) and out["scores"].numpy()[1:-1].tolist() == [0.0] * len(bad)
    np.testing.assert_allclose(out["scores"].numpy()[[0, -1]], alone["scores"].numpy(), rtol=1e-5)


def test_attention_signature_reports_errors_and_blank_rows(captioner):
    detailed = captioner.attention_function()
    out = detailed(images=tf.constant([b"junk", encode(quadrants(), "PNG")]), beam_size=tf.constant(1))
    assert out["errors"].numpy().tolist() == [b"not a JPEG, PNG, GIF, BMP or WebP image", b""]
    assert out["lengths"].numpy()[0] == 0 and out["lengths"].numpy()[1] > 0
    assert not out["tokens"].numpy()[0].any() and not out["attention"].numpy()[0].any()


def test_an_empty_batch_gives_empty_outputs(serve, captioner):
    out = serve(images=tf.constant([], tf.string))
    assert {key: value.shape[0] for key, value in out.items()} == {"captions": 0, "scores": 0, "errors": 0}
    size = captioner.image_size
    pixels = captioner.caption(tf.zeros([0, size, size, 3], tf.uint8), tf.constant(1), tf.constant(0.0))
    assert pixels["captions"].shape[0] == 0 and pixels["attention"].shape[0] == 0


def test_malformed_exif_reads_as_upright():
    """A cut Exif segment or an unknown byte order reads as orientation 1 (as stored), never an error."""

    def orientation(data):
        data = tf.constant(data)
        return int(graph.exif_orientation(data, *graph.jpeg_exif(data)))

    whole = exif_jpeg(6, "<")
    start = whole.index(b"Exif")
    assert orientation(whole) == 6
    for data in (whole[: start + 12], whole.replace(b"II*\x00", b"XX*\x00", 1), encode(quadrants(), "JPEG")):
        assert orientation(data) == 1


def prefixes_from(captioner):
    """Prefixes of real caption words (the tiny model's own vocabulary): two words, none, one."""
    words = [token for token in captioner.vocab.tokens if token.isalpha()][:3]
    return [" ".join(words[:2]), "", words[2]]


@pytest.mark.parametrize("beam_size", [1, 2])
def test_captions_start_with_their_prefix_and_an_empty_prefix_changes_nothing(captioner, beam_size):
    size = captioner.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    prefixes = prefixes_from(captioner)
    forced = captioner.caption_with_prefix(
        tf.constant(pixels), tf.constant(prefixes), tf.constant(beam_size), tf.constant(0.0)
    )
    free = captioner.caption(tf.constant(pixels), tf.constant(beam_size), tf.constant(0.0))
    captions = [c.decode() for c in forced["captions"].numpy()]
    for caption, prefix in zip(captions, prefixes):
        assert caption.split()[: len(prefix.split())] == prefix.split(), (caption, prefix)
    assert forced["captions"].numpy()[1] == free["captions"].numpy()[1]
    np.testing.assert_allclose(forced["scores"].numpy()[1], free["scores"].numpy()[1], atol=1e-5)


def test_the_prefix_signature_answers_bad_images_alone(captioner):
    signature = captioner.prefix_function()
    prefixes = prefixes_from(captioner)
    good = encode(quadrants(), "PNG")
    out = signature(images=tf.constant([good, b"junk", good]), prefixes=tf.constant([prefixes[0], "", prefixes[2]]),
                    beam_size=tf.constant(2))
    assert out["errors"].numpy().tolist() == [b"", b"not a JPEG, PNG, GIF, BMP or WebP image", b""]
    first, bad, last = [c.decode() for c in out["captions"].numpy()]
    assert first.startswith(prefixes[0]) and last.startswith(prefixes[2]) and bad == ""


def test_a_prefix_count_other_than_the_image_count_stops_the_graph(captioner):
    size = captioner.image_size
    pixels = np.zeros((3, size, size, 3), np.uint8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="needs one prefix each"):
        captioner.caption_with_prefix(tf.constant(pixels), tf.constant(["", ""]), tf.constant(2), tf.constant(0.0))
