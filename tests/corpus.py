"""The bad-input corpus: every awkward image, caption and url the shard stage must account for.

Generated, not checked in: each file is a few bytes to 60 kB, made the same way every time.
`write_images(folder)` writes the images that the world server serves from `<folder>/images/`;
`url_rows(base_url)` is the url list (CC12M order: url, caption) with what each row must become:
a sample (and the colour its stored image must have) or a failure with its reason.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

RED, GREEN = (200, 30, 40), (20, 160, 60)
HUGE_SIDE = 20_000  # 4e8 pixels: over the default shard.max_decode_pixels (PIL's limit, 8.9e7)
BOMB_SIDE = 32_000  # 1.02e9 pixels: just under OpenCV's own limit (2^30), ~3 GB decoded, from a 1 kB file


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(side: int) -> bytes:
    """A valid 1-bit greyscale PNG of side x side, all black: 50 MB of pixels in ~60 kB, streamed through zlib."""
    compressor, row, parts = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8), []
    for _ in range(side // 1000):
        parts.append(compressor.compress(row * 1000))
    parts.append(compressor.compress(row * (side % 1000)) + compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", b"".join(parts))
            + png_chunk(b"IEND", b""))


def jpeg_bomb(side: int) -> bytes:
    """An 8x8 JPEG whose frame header is patched to claim side x side: what a decoder allocates, not what is sent."""
    data = bytearray(encode(Image.new("RGB", (8, 8), RED), "JPEG"))
    sof = data.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    data[sof + 5:sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def png16(rgb16: tuple[int, int, int] | None = None, grey16: int | None = None) -> bytes:
    import cv2

    if grey16 is not None:
        array = np.full((48, 64), grey16, np.uint16)
    else:
        array = np.zeros((48, 64, 3), np.uint16)
        array[...] = rgb16[::-1]  # OpenCV is BGR
    return cv2.imencode(".png", array)[1].tobytes()


def palette_with_transparency() -> bytes:
    """Left half transparent (palette index 0 in tRNS), right half opaque red."""
    image = Image.new("P", (64, 48), 0)
    image.putpalette([0, 0, 0, *RED] + [0] * 762)
    image.paste(1, (32, 0, 64, 48))
    return encode(image, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (64, 48), c) for c in (RED, GREEN)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def images() -> dict[str, bytes]:
    """name -> bytes, each one awkward kind of image the web serves."""
    plain = encode(Image.new("RGB", (64, 48), GREEN), "JPEG", quality=95)
    # An image whose scan stops halfway: libjpeg would fill the rest grey; we refuse it.
    progressive = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)), "JPEG")
    return {
        "good.jpg": plain,  # the control: an ordinary baseline JPEG
        "cmyk.jpg": encode(Image.new("RGB", (64, 48), RED).convert("CMYK"), "JPEG", quality=95),  # print-ready CMYK
        "grey16.png": png16(grey16=40_000),  # 16-bit greyscale: must be scaled to 8 bits, not saturated
        "rgb16.png": png16(rgb16=(60_000, 1_000, 30_000)),  # 16-bit colour, same
        "palette.png": palette_with_transparency(),  # palette + tRNS: transparent parts become white
        "animated.gif": animated_gif(),  # the first frame is the image
        "photo.webp": encode(Image.new("RGB", (64, 48), RED), "WEBP", lossless=True),  # WebP
        "truncated.jpg": progressive[: len(progressive) // 2],  # served whole, but the file itself is cut
        "empty.jpg": b"",  # 200 with zero bytes
        "bomb.jpg": jpeg_bomb(BOMB_SIDE),  # decompression bomb: 1 kB claiming 1e9 pixels
        "huge.png": huge_png(HUGE_SIDE),  # a real, valid 20000 x 20000 image
    }


# What the stored image of each decodable kind must look like (RGB, after alpha on white): region -> colour.
EXPECTED_COLOURS = {
    "good.jpg": {"all": GREEN},
    "cmyk.jpg": {"all": RED},
    "grey16.png": {"all": (156, 156, 156)},  # 40000 >> 8
    "rgb16.png": {"all": (234, 3, 117)},
    "palette.png": {"left": (255, 255, 255), "right": RED},
    "animated.gif": {"all": RED},
    "photo.webp": {"all": RED},
}

LONG_CAPTION = "a red square on a green field " * 3400  # ~100 kB: kept whole
SCRIPT_CAPTION = '<script>alert("caption")</script><img src=x onerror=alert(1)> a red square'
RTL_EMOJI_CAPTION = "صورة مربع أحمر 🟥 ריבוע אדום \u202egnp.exe\u202c 👨‍👩‍👧 a red square"
PATH_CAPTION = "../../../../tmp/escaped /etc/passwd"


def url_rows(base: str) -> list[tuple[bytes, tuple[str, str | None]]]:
    """(a TSV line as bytes, (status, reason)); the reason as the shard summary groups it (failure_reason)."""
    ok = ("success", None)
    rows = [
        # images of every kind, captions of every kind (decodable images succeed)
        (f"{base}/images/good.jpg\ta plain green image", ok),
        (f"{base}/images/cmyk.jpg\ta cmyk jpeg", ok),
        (f"{base}/images/grey16.png\ta 16-bit grey png", ok),
        (f"{base}/images/rgb16.png\ta 16-bit colour png", ok),
        (f"{base}/images/palette.png\ta palette png with transparency", ok),
        (f"{base}/images/animated.gif\tan animated gif", ok),
        (f"{base}/images/photo.webp\ta webp", ok),
        (f"{base}/images/good.jpg?long\t{LONG_CAPTION}", ok),  # same image, another url: a 100 kB caption
        (f"{base}/images/good.jpg?script\t{SCRIPT_CAPTION}", ok),  # HTML and script: stored as text
        (f"{base}/images/good.jpg?rtl\t{RTL_EMOJI_CAPTION}", ok),  # right-to-left, bidi override, emoji ZWJ
        (f"{base}/images/good.jpg?path\t{PATH_CAPTION}", ok),  # a caption that looks like a path
        # images that must fail in the resizer, with a reason
        (f"{base}/images/truncated.jpg\ta truncated jpeg", ("failed_to_resize", "truncated image")),
        (f"{base}/images/empty.jpg\tzero bytes", ("failed_to_resize", "empty response")),
        (f"{base}/images/bomb.jpg\ta decompression bomb", ("failed_to_resize", "image too large to decode")),
        (f"{base}/images/huge.png\ta 20000 x 20000 image", ("failed_to_resize", "image too large to decode")),
        (f"{base}/fail/html/1.jpg\tHTML served as image/jpeg", ("failed_to_resize", "not an image")),
        # urls that fail at download
        (f"{base}/fail/404/1.jpg\tgone", ("failed_to_download", "http 404")),
        (f"{base}/fail/500/1.jpg\tbroken server", ("failed_to_download", "http 500")),
        (f"{base}/fail/timeout/1.jpg\tslow server", ("failed_to_download", "timeout")),
        (f"{base}/fail/redirect/1.jpg\tredirects to itself", ("failed_to_download", "redirect loop")),
        (f"{base}/images/../../../etc/passwd\ta path escape in the url", ("failed_to_download", "http 404")),
        # rows refused before download (urllist.validate_rows)
        (f"ftp://{base.split('://')[1]}/images/good.jpg\tftp", ("failed_to_validate", "unsupported url scheme")),
        ("file:///etc/passwd\ta local file", ("failed_to_validate", "unsupported url scheme")),
        ("data:image/png;base64,iVBORw0KGgo=\ta data url", ("failed_to_validate", "unsupported url scheme")),
        ("javascript:alert(1)\ta script url", ("failed_to_validate", "unsupported url scheme")),
        (f"{base}/images/cmyk.jpg?empty\t   ", ("failed_to_validate", "empty caption")),
        (f"{base}/images/good.jpg?ragged\tone\ttoo many", ("failed_to_validate", "malformed row (expected 2 tab-separated fields)")),
        (f"{base}/images/good.jpg\tthe same url again", ("failed_to_validate", "duplicate url")),
    ]
    lines = [(line.encode("utf-8"), expected) for line, expected in rows]
    lines.append((f"{base}/images/good.jpg?latin1\t".encode() + "café".encode("latin-1"),
                  ("failed_to_validate", "caption is not valid UTF-8")))  # not UTF-8
    return lines
