"""What the shard stage's download tasks add to img2dataset: a guard on where urls may connect, and a
decoder bounded in memory.

Url lists are untrusted. Validation (urllist.internal_host) refuses literal internal hosts;
`PublicDownloader` wraps img2dataset's Downloader so that, in the worker, every
connection (redirects included) is made only to a public address that a name resolved to: a name
that resolves to 10.0.0.5 or a redirect to 127.0.0.1 is refused before any byte is sent.
`BoundedResizer` is img2dataset's Resizer with a pixel limit read from the image header before decoding.
"""

from __future__ import annotations

import http.client
import io
import socket
import urllib.request
import warnings

import numpy as np
from img2dataset.resizer import Resizer
from PIL import Image

from pipelines.urllist import internal_ip

REFUSED = "resolves to an internal address"  # in img2dataset's error_message; failure_reason groups it


# ---------------------------------------------------------------- connecting only to public addresses
class InternalAddressError(OSError):
    pass


def public_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
    """socket.create_connection, but only to the public addresses the name resolves to.

    Connecting to the address checked (not resolving twice) leaves no window for DNS rebinding.
    """
    host, port = address
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    public = [info for info in infos if not internal_ip(info[4][0])]
    if not public:
        raise InternalAddressError(f"refused: {host} {REFUSED}")
    error = None
    for family, kind, proto, _, sockaddr in public:
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            error = err
            sock.close()
    raise error


class PublicHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._create_connection = public_connection  # http.client sets it per instance


class PublicHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._create_connection = public_connection


def proxied(req: urllib.request.Request) -> bool:
    # Through a proxy the socket goes to the proxy, which resolves the name: only the literal check applies.
    return req.has_proxy() or bool(getattr(req, "_tunnel_host", None))


class PublicHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(http.client.HTTPConnection if proxied(req) else PublicHTTPConnection, req)


class PublicHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        kw = {"context": self._context}
        if hasattr(self, "_check_hostname"):  # Python < 3.12
            kw["check_hostname"] = self._check_hostname
        return self.do_open(http.client.HTTPSConnection if proxied(req) else PublicHTTPSConnection, req, **kw)


def public_opener() -> urllib.request.OpenerDirector:
    """urllib's default opener (redirects, proxies from the environment) with the guarded connections."""
    return urllib.request.build_opener(PublicHTTPHandler, PublicHTTPSHandler)


class PublicDownloader:
    """img2dataset's Downloader, run with the guarded opener unless private urls are allowed.

    img2dataset downloads with `urllib.request.urlopen`, which uses the process's installed opener;
    installing it in each task (not once) is right on a long-lived cluster shared by runs.
    """

    def __init__(self, downloader, allow_private: bool):
        self.downloader, self.allow_private = downloader, allow_private

    def __call__(self, row):
        urllib.request.install_opener(None if self.allow_private else public_opener())
        return self.downloader(row)


# ---------------------------------------------------------------- decoding within memory bounds
warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides, below


class BoundedResizer(Resizer):
    """img2dataset's Resizer (OpenCV), with what it lacks for web bytes:

    - a pixel limit checked on the header before decoding (OpenCV's own limit is 2^30 pixels, ~3 GB
      decoded, per download thread); PIL reads the header, OpenCV still decodes;
    - an empty body is a clear reason, not an OpenCV assertion; a JPEG cut short is refused;
    - a 16-bit PNG is scaled to 8 bits (OpenCV's JPEG encoder saturates 16-bit values instead).
    """

    def __init__(self, *args, max_decode_pixels: int, **kw):  # the default lives in shard.max_decode_pixels
        super().__init__(*args, **kw)
        self.max_decode_pixels = max_decode_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        data = img_stream.getvalue() if isinstance(img_stream, io.BytesIO) else img_stream.read()
        if not data:
            return None, None, None, None, None, "empty response (0 bytes)"
        try:
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
        except Image.DecompressionBombError:  # over twice PIL's own limit
            pixels = float("inf")
        except Exception:  # not an image PIL knows: OpenCV decides (it says "Image decoding error")
            pixels = 0
        else:
            pixels = width * height
        if pixels > self.max_decode_pixels:
            return None, None, None, None, None, "image too large to decode (over shard.max_decode_pixels)"
        # A JPEG cut short decodes with a grey remainder (libjpeg only warns): its end marker must follow the scan.
        if data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9") < data.find(b"\xff\xda"):
            return None, None, None, None, None, "truncated image (the JPEG stops before its end marker)"
        if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24 and data[24] == 16:
            data = png_to_8bit(data)
        return super().__call__(io.BytesIO(data), blurring_bbox_list)


def png_to_8bit(data: bytes) -> bytes:
    import cv2

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.dtype != np.uint16:
        return data  # let the resizer report it
    return cv2.imencode(".png", (image >> 8).astype(np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes()
