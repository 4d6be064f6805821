"""Encoded images to pixels inside a TF graph, as the CLI's Pillow loading gives them.

For the same file, `decode_rgb` gives the pixels `images.load_image` gives: the EXIF
orientation of JPEGs, PNGs and WebPs is applied, transparency is composited onto white, and
JPEGs are decoded with libjpeg's accurate DCT at the reduced scale Pillow's `draft` picks.
`refusal` checks an image from its header before anything is decoded: recognised format,
declared size at most `max_pixels` (the CLI's limit), non-empty. Stock TensorFlow string
ops only, so that the graph runs in TF Serving.
"""

import tensorflow as tf

EMPTY_INPUT = "empty input"
NOT_AN_IMAGE = "not a JPEG, PNG, GIF, BMP or WebP image"
CORRUPT_IMAGE = "corrupt or truncated image data"
UNSUPPORTED_BMP = "unsupported BMP (only uncompressed 24- and 32-bit BMPs are read)"

# Format numbers. tf.io.decode_image also reads JPEG XL; it is refused here, as the CLI's
# Pillow cannot read it.
UNKNOWN, JPEG, PNG, GIF, BMP, WEBP = range(6)
MAGIC_BYTES = {JPEG: b"\xff\xd8\xff", PNG: b"\x89PNG\r\n\x1a\n", GIF: b"GIF8", BMP: b"BM"}
HEADER_BYTES = 32  # every fixed-offset header field read here lies in the first 32 bytes
JPEG_SCALES = (1, 2, 4, 8)  # the reduced scales libjpeg decodes at, as Pillow's `draft` picks them
EXIF_ORIENTATION_TAG = 0x0112
MAX_EXIF_BYTES = 65_536  # an APP1 segment holds at most 64 KiB
MAX_EXIF_ENTRIES = 512  # IFD0 entries read looking for the orientation tag
MAX_BLOCKS = 4096  # JPEG segments, PNG chunks or GIF blocks walked before giving up on a header search
DECODE_PARALLELISM = 2  # images of a batch decoded at once (each may take ~30 bytes per declared pixel)
ALL_BYTES = bytes(range(256))  # substr(ALL_BYTES, b, 1) is the one-byte string of byte value b


def read_bytes(data, offset, size):
    """`size` bytes of the scalar string `data` from `offset`, as int64 [size]; zeros past its end."""
    length = tf.strings.length(data, unit="BYTE")
    offset = tf.clip_by_value(tf.cast(offset, tf.int64), 0, tf.cast(length, tf.int64))
    size = tf.cast(size, tf.int64)
    values = tf.cast(tf.io.decode_raw(tf.strings.substr(data, offset, size), tf.uint8), tf.int64)
    return tf.pad(values, [[0, size - tf.size(values, out_type=tf.int64)]])


def unsigned(values, offset, size, little_endian):
    """The unsigned integers of `size` bytes at `offset` (int64, any shape) in the byte vector
    `values`; offsets past its end read zeros."""
    positions = tf.cast(offset, tf.int64)[..., None] + tf.range(size, dtype=tf.int64)
    inside = (positions >= 0) & (positions < tf.size(values, out_type=tf.int64))
    last = tf.size(values, out_type=tf.int64) - 1
    picked = tf.where(inside, tf.gather(values, tf.clip_by_value(positions, 0, last)), 0)
    weights = [256**k for k in range(size)]
    return tf.reduce_sum(picked * tf.constant(weights if little_endian else weights[::-1], tf.int64), axis=-1)


def starts_with(values, prefix, offset=0):
    """Whether the byte vector `values` holds `prefix` (bytes) at the static `offset`."""
    return tf.reduce_all(tf.equal(values[offset : offset + len(prefix)], tf.constant(list(prefix), tf.int64)))


def image_format(data, header):
    """JPEG, PNG, GIF, BMP, WEBP or UNKNOWN (int32) from the magic bytes, as tf.io.decode_image tells them apart."""
    kind = tf.constant(UNKNOWN)
    riff = starts_with(header, b"RIFF") & starts_with(header, b"WEBP", 8) & (tf.strings.length(data) > 12)
    kind = tf.where(riff, WEBP, kind)
    for number in (BMP, GIF, PNG, JPEG):  # JPEG wins over all, as in decode_image
        kind = tf.where(starts_with(header, MAGIC_BYTES[number]), number, kind)
    return kind


def declared_size(data, kind, header):
    """(width, height, readable) that the header declares (int64, int64, bool), before any pixel data is decoded.

    JPEG: its SOF marker, read by tf.io.extract_jpeg_shape (which fails on a corrupt header);
    PNG: IHDR (big-endian); GIF: the logical screen (little-endian); BMP: the info header (a
    negative height means rows stored top-down); WebP: the VP8, VP8L or VP8X header."""

    def little(offset, size):
        return unsigned(header, offset, size, little_endian=True)

    def big(offset, size):
        return unsigned(header, offset, size, little_endian=False)

    def size(width, height, readable=True):
        return tf.stack([width, height]), tf.convert_to_tensor(readable)

    def unknown():
        return size(tf.constant(0, tf.int64), tf.constant(0, tf.int64), False)

    def jpeg():
        shape = tf.io.extract_jpeg_shape(data, output_type=tf.int64)
        return size(shape[1], shape[0])

    def png():
        return size(big(16, 4), big(20, 4), starts_with(header, b"IHDR", 12))

    def gif():
        return size(little(6, 2), little(8, 2))

    def bmp():
        width, height = little(18, 4), little(22, 4)
        height = tf.abs(tf.where(height >= 2**31, height - 2**32, height))
        return size(width, height, width < 2**31)

    def webp():
        lossy = starts_with(header, b"VP8 ", 12) & starts_with(header, b"\x9d\x01\x2a", 23)
        lossless = starts_with(header, b"VP8L", 12) & tf.equal(header[20], 0x2F)
        extended = starts_with(header, b"VP8X", 12)
        bits = little(21, 4)  # VP8L: 14 bits width - 1, 14 bits height - 1
        width = tf.where(lossy, little(26, 2) % 2**14, tf.where(lossless, bits % 2**14 + 1, little(24, 3) + 1))
        height = tf.where(lossy, little(28, 2) % 2**14, tf.where(lossless, bits // 2**14 % 2**14 + 1, little(27, 3) + 1))
        return size(width, height, lossy | lossless | extended)

    dimensions, readable = tf.switch_case(kind, [unknown, jpeg, png, gif, bmp, webp])
    return dimensions[0], dimensions[1], readable


def refusal(data, max_pixels):
    """(reason, format, width, height) of an encoded image (scalar string): reason says why it cannot
    be captioned, or is "" when it may be decoded; all read from the header, no pixel data decoded."""
    header = read_bytes(data, 0, HEADER_BYTES)
    kind = image_format(data, header)
    width, height, readable = declared_size(data, kind, header)
    bits_per_pixel = unsigned(header, 28, 2, little_endian=True)
    bmp_supported = ((bits_per_pixel == 24) | (bits_per_pixel == 32)) & tf.equal(unsigned(header, 30, 4, True), 0)
    dimensions = tf.strings.join([tf.strings.as_string(width), "x", tf.strings.as_string(height)])
    reasons = [  # the first that applies is given
        (tf.equal(tf.strings.length(data), 0), EMPTY_INPUT),
        (tf.equal(kind, UNKNOWN), NOT_AN_IMAGE),
        (tf.logical_not(readable), CORRUPT_IMAGE),
        (tf.equal(kind, BMP) & tf.logical_not(bmp_supported), UNSUPPORTED_BMP),
        (tf.equal(width, 0) | tf.equal(height, 0), tf.strings.join(["image has zero size (", dimensions, ")"])),
        (width * height > max_pixels,
         tf.strings.join(["image of ", dimensions, f" pixels is over the limit of {max_pixels:,} pixels"])),
    ]
    reason = tf.constant("")
    for applies, text in reversed(reasons):
        reason = tf.where(applies, text, reason)
    return reason, kind, width, height


def walk_blocks(data, start, step, targets=1):
    """Follows a chain of blocks (JPEG segments, PNG or RIFF chunks) from offset `start`.

    `step(offset)` -> (next offset, found [targets] bool, stop): returns the offsets (int64
    [targets]) of the first block where each target was found, -1 where none was. The walk
    stops when told to, when every target is found, at the end of the data, or after MAX_BLOCKS."""
    length = tf.cast(tf.strings.length(data), tf.int64)

    def searching(offset, found_at, done):
        return tf.logical_not(done)

    def next_block(offset, found_at, done):
        following, found, stop = step(offset)
        found_at = tf.where(found & (found_at < 0), offset, found_at)
        return following, found_at, stop | tf.reduce_all(found_at >= 0) | (following >= length)

    start = (tf.constant(start, tf.int64), tf.fill([targets], tf.constant(-1, tf.int64)), tf.constant(False))
    return tf.while_loop(searching, next_block, start, maximum_iterations=MAX_BLOCKS)[1]


def exif_orientation(data, start, size):
    """The EXIF Orientation (int32, 1..8 when set) in the TIFF-structured EXIF block of `size`
    bytes at `start` of `data`: tag 0x0112 (a SHORT, or a LONG) of IFD0, in the block's byte
    order ("II" little-endian, "MM" big-endian). 1 when start < 0 or the tag cannot be read."""

    def tagged():
        tiff = read_bytes(data, start, tf.clip_by_value(size, 0, MAX_EXIF_BYTES))  # its offsets count from here
        little = starts_with(tiff, b"II")

        def read(offset, width):
            return tf.where(little, unsigned(tiff, offset, width, True), unsigned(tiff, offset, width, False))

        directory = read(4, 4)
        entries = directory + 2 + 12 * tf.range(tf.minimum(read(directory, 2), MAX_EXIF_ENTRIES))
        entries = entries[entries + 12 <= tf.size(tiff, out_type=tf.int64)]
        types = read(entries + 2, 2)
        short, long = read(entries + 8, 2), read(entries + 8, 4)
        values = tf.where(tf.equal(types, 3), short, tf.where(tf.equal(types, 4), long, 1))
        found = tf.concat([tf.boolean_mask(values, tf.equal(read(entries, 2), EXIF_ORIENTATION_TAG)), [1]], 0)
        return tf.where(little | starts_with(tiff, b"MM"), found[0], 1)

    return tf.cast(tf.cond(start >= 0, tagged, lambda: tf.constant(1, tf.int64)), tf.int32)


def jpeg_exif(data):
    """(start, size) of a JPEG's EXIF block, as Pillow's getexif finds it: the first APP1 segment
    that starts with "Exif\\0\\0" (segments walked up to SOS); start -1 when there is none."""

    def segment(offset):
        marker = read_bytes(data, offset, 10)  # FF, code, length (2 bytes), then the segment's first bytes
        exif = tf.equal(marker[1], 0xE1) & starts_with(marker, b"Exif\0\0", 4)
        stop = (marker[0] != 0xFF) | tf.equal(marker[1], 0xDA) | tf.equal(marker[1], 0xD9)
        return offset + 2 + unsigned(marker, 2, 2, little_endian=False), exif[None], stop

    app1 = walk_blocks(data, 2, segment)[0]
    length = unsigned(read_bytes(data, app1 + 2, 2), 0, 2, little_endian=False)  # with its 2 bytes and the Exif header
    return tf.where(app1 >= 0, app1 + 10, -1), length - 8


def png_chunks(data):
    """(tRNS found, start, size of the eXIf chunk's data or -1): the PNG chunks Pillow reads before the image data."""

    def chunk(offset):
        fields = read_bytes(data, offset, 8)  # data length (4 bytes, big-endian), type
        image_data = starts_with(fields, b"IDAT", 4) | starts_with(fields, b"IEND", 4)
        found = tf.stack([starts_with(fields, b"tRNS", 4), starts_with(fields, b"eXIf", 4)])
        return offset + 12 + unsigned(fields, 0, 4, little_endian=False), found, image_data

    transparency, exif = tf.unstack(walk_blocks(data, 8, chunk, targets=2))
    size = unsigned(read_bytes(data, exif, 4), 0, 4, little_endian=False)
    return transparency >= 0, tf.where(exif >= 0, exif + 8, -1), size


def webp_exif(data):
    """(start, size) of a WebP's EXIF chunk data (after an "Exif\\0\\0" prefix, if any), start -1 when none."""

    def chunk(offset):
        fields = read_bytes(data, offset, 8)  # FourCC, data length (4 bytes, little-endian); data padded to even
        size = unsigned(fields, 4, 4, little_endian=True)
        return offset + 8 + size + size % 2, starts_with(fields, b"EXIF")[None], tf.constant(False)

    exif = walk_blocks(data, 12, chunk)[0]
    size = unsigned(read_bytes(data, exif + 4, 4), 0, 4, little_endian=True)
    prefix = tf.where(starts_with(read_bytes(data, exif + 8, 6), b"Exif\0\0"), tf.constant(6, tf.int64), 0)
    return tf.where(exif >= 0, exif + 8 + prefix, -1), size - prefix


def apply_orientation(image, orientation):
    """Rotates/flips an image [H, W, C] as EXIF orientation 2..8 says (Pillow's exif_transpose); 1 and
    any other value leave it as stored."""

    def transpose(pixels):
        return tf.transpose(pixels, [1, 0, 2])

    transforms = [
        lambda: image,
        lambda: image[:, ::-1],  # mirrored
        lambda: image[::-1, ::-1],  # rotated 180
        lambda: image[::-1],  # flipped
        lambda: transpose(image),
        lambda: tf.image.rot90(image, 3),  # stored turned 90 degrees counter-clockwise
        lambda: transpose(image[::-1, ::-1]),  # transverse
        lambda: tf.image.rot90(image, 1),  # stored turned 90 degrees clockwise
    ]
    index = tf.where((orientation >= 1) & (orientation <= 8), orientation - 1, 0)
    return tf.switch_case(index, transforms)


def composite_on_white(rgba):
    """uint8 RGBA [H, W, 4] over opaque white -> RGB uint8 [H, W, 3], in the integer arithmetic of
    Pillow's alpha_composite (equal to the CLI's to the last bit); an opaque image is only sliced."""

    def composited():
        pixels = tf.cast(rgba, tf.int32)
        colour, alpha = pixels[..., :3], pixels[..., 3:]
        scaled = 128 * (colour * alpha + 255 * (255 - alpha) + 128)
        return tf.cast((scaled // 256 + scaled) // 256 // 128, tf.uint8)

    return tf.cond(tf.reduce_all(tf.equal(rgba[..., 3], 255)), lambda: rgba[..., :3], composited)


def replace_bytes(data, offset, replacement):
    """The scalar string `data` with the bytes from `offset` on replaced by the string `replacement`."""
    length = tf.cast(tf.strings.length(data), tf.int64)
    end = tf.minimum(offset + tf.cast(tf.strings.length(replacement), tf.int64), length)
    rest = length - end
    start = tf.strings.substr(data, tf.constant(0, tf.int64), offset)
    return tf.strings.join([start, replacement, tf.strings.substr(data, end, rest)])


def gif_transparency_on_white(data):
    """A GIF whose first frame's transparent colour is made opaque white: the transparency flag of
    the frame's Graphic Control Extension is cleared and that entry of the frame's colour table set
    to white, so that decoding gives what compositing onto white gives. Other GIFs come back as
    they are."""
    length = tf.cast(tf.strings.length(data), tf.int64)

    def searching(offset, in_sub_blocks, control, image, done):
        return tf.logical_not(done)

    def next_block(offset, in_sub_blocks, control, image, done):
        """At the top level: an extension (0x21, label, then sub-blocks) or the first image (0x2C);
        inside an extension: a sub-block (size byte, data) or the terminator (size 0)."""
        fields = read_bytes(data, offset, 2)
        top_level = tf.logical_not(in_sub_blocks)
        extension = top_level & tf.equal(fields[0], 0x21)
        control = tf.where(extension & tf.equal(fields[1], 0xF9), offset, control)
        image = tf.where(top_level & tf.equal(fields[0], 0x2C), offset, image)
        done = (top_level & tf.logical_not(extension)) | (offset >= length)
        following = tf.where(in_sub_blocks, offset + 1 + fields[0], offset + 2)
        return following, tf.where(in_sub_blocks, fields[0] > 0, extension), control, image, done

    screen = read_bytes(data, 0, 13)
    global_table = tf.where(screen[10] >= 0x80, tf.constant(13, tf.int64), -1)
    after_table = 13 + tf.where(global_table >= 0, 3 * 2 ** (screen[10] % 8 + 1), 0)
    start = (after_table, tf.constant(False), tf.constant(-1, tf.int64), tf.constant(-1, tf.int64), tf.constant(False))
    _, _, control, image, _ = tf.while_loop(searching, next_block, start, maximum_iterations=MAX_BLOCKS)

    extension = read_bytes(data, control, 8)  # 21 F9 04, flags, delay (2 bytes), transparent index, 00
    descriptor = read_bytes(data, image, 10)  # 2C, left, top, width, height (2 bytes each), flags
    local_table = descriptor[9] >= 0x80
    table = tf.where(local_table, image + 10, global_table)
    entries = 2 ** tf.where(local_table, descriptor[9] % 8 + 1, screen[10] % 8 + 1)
    transparent = (control >= 0) & (image > control) & (extension[3] % 2 == 1) & (table >= 0)
    transparent = transparent & (extension[6] < entries)

    def made_white():
        opaque = replace_bytes(data, control + 3, tf.strings.substr(tf.constant(ALL_BYTES), extension[3] - 1, 1))
        return replace_bytes(opaque, table + 3 * extension[6], tf.constant(b"\xff\xff\xff"))

    return tf.cond(transparent, made_white, lambda: data)


def decode_rgb(data, kind, width, height, image_size):
    """An image that passed `refusal` -> RGB uint8 [h, w, 3], as Pillow loads it for the CLI.

    JPEG: accurate integer DCT at the reduced scale Pillow's draft(size) picks (the largest of
    1/2, 1/4, 1/8 that keeps both sides at least image_size); PNG, WebP: alpha and tRNS
    transparency composited onto white, 16-bit grayscale scaled by 1/257; GIF: the first frame,
    its transparent colour white; BMP: as stored. JPEG, PNG and WebP are then turned as their
    EXIF orientation says."""
    header = read_bytes(data, 0, HEADER_BYTES)

    def jpeg():
        scale = tf.minimum(width // image_size, height // image_size)
        index = tf.reduce_sum(tf.cast(scale >= tf.constant(JPEG_SCALES[1:], tf.int64), tf.int32))
        decoders = [
            lambda ratio=ratio: tf.io.decode_jpeg(data, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE")
            for ratio in JPEG_SCALES
        ]
        return tf.switch_case(index, decoders), exif_orientation(data, *jpeg_exif(data))

    def png():
        transparency, *exif = png_chunks(data)

        def sixteen_bit_gray():  # Pillow's mode I;16, whose transparency the CLI ignores
            values = tf.cast(tf.io.decode_png(data, channels=1, dtype=tf.uint16), tf.float32)
            return tf.tile(tf.cast(tf.round(values / 257.0), tf.uint8), [1, 1, 3])

        def with_alpha():
            return composite_on_white(tf.io.decode_png(data, channels=4))

        def low_bit_depth():  # TF gives a 1-, 2- or 4-bit PNG without tRNS an alpha of 2**bits - 1, not 255
            return tf.cond(transparency, with_alpha, lambda: tf.io.decode_png(data, channels=3))

        depth, colour_type = header[24], header[25]  # from IHDR
        gray16 = tf.equal(depth, 16) & tf.equal(colour_type, 0)
        image = tf.cond(gray16, sixteen_bit_gray, lambda: tf.cond(depth < 8, low_bit_depth, with_alpha))
        return image, exif_orientation(data, *exif)

    def gif():
        return tf.io.decode_image(gif_transparency_on_white(data), channels=3, expand_animations=False), 1

    def bmp():
        return tf.io.decode_bmp(data, channels=3), 1

    def webp():
        image = tf.io.decode_image(data, expand_animations=False)  # RGB, or RGBA with alpha
        image = tf.cond(tf.equal(tf.shape(image)[2], 4), lambda: composite_on_white(image), lambda: image[..., :3])
        return image, exif_orientation(data, *webp_exif(data))

    def unknown():
        return tf.zeros([0, 0, 3], tf.uint8), 1

    image, orientation = tf.switch_case(kind, [unknown, jpeg, png, gif, bmp, webp])
    return tf.ensure_shape(apply_orientation(image, orientation), [None, None, 3])


def pad_to_square(image):
    """image [H, W, C] -> [L, L, C], L = max(H, W): the shorter side extended with copies of its
    edge pixels, (L - side) // 2 before and the rest after, as `images.pad_to_square` (the CLI's)."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    side = tf.maximum(height, width)
    rows = tf.clip_by_value(tf.range(side) - (side - height) // 2, 0, height - 1)
    columns = tf.clip_by_value(tf.range(side) - (side - width) // 2, 0, width - 1)
    return tf.gather(tf.gather(image, rows, axis=0), columns, axis=1)
