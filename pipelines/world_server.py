"""A loopback HTTP server for the demo world: its images, and urls that fail on purpose.

GET /images/<name>.<ext> serves world_dir/images/<name>.<ext> (jpg, png, gif, webp, or bin as
image/jpeg: the bad-input corpus of the tests). Under /fail/<kind>/<n>.jpg:
404 and 500 answer with that status; timeout stalls (up to timeout_delay, cut short at shutdown)
and then answers 504; truncated promises a real jpeg's length and sends half of it; html answers
200 with Content-Type image/jpeg and an HTML page, as misconfigured web servers do; redirect
answers 302 to itself, a redirect loop.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

IMAGE_NAME = re.compile(r"^[A-Za-z0-9_-]+\.(jpg|png|gif|webp|bin)$")  # no path tricks: a bare file name
CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png", "gif": "image/gif", "webp": "image/webp", "bin": "image/jpeg"}
HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Access denied</title></head>\n"
             b"<body><h1>Access denied</h1><p>Please enable cookies to view this image.</p></body></html>\n")


class WorldServer(ThreadingHTTPServer):
    daemon_threads = True  # a stalled handler never blocks shutdown
    request_queue_size = 1024  # a few hundred downloader threads connect at once

    def handle_error(self, request, client_address) -> None:
        pass  # clients that hang up (timeouts, truncation) are expected here, not news


class IPv6WorldServer(WorldServer):
    address_family = socket.AF_INET6


class WorldHandler(BaseHTTPRequestHandler):
    server: WorldServer

    def log_message(self, format: str, *args) -> None:
        pass  # no access log on stderr

    def do_GET(self) -> None:
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        try:
            if len(parts) == 2 and parts[0] == "images":
                self.send_image(parts[1])
            elif len(parts) == 3 and parts[0] == "fail":
                self.send_failure(parts[1], parts[2])
            else:
                self.send_error(404)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up first

    def send_image(self, name: str) -> None:
        path = os.path.join(self.server.world_dir, "images", name)
        if not IMAGE_NAME.match(name) or not os.path.isfile(path):
            self.send_error(404)
            return
        with open(path, "rb") as f:
            self.send_body(f.read(), CONTENT_TYPES[name.rsplit(".", 1)[1]])

    def send_failure(self, kind: str, name: str) -> None:
        if kind in ("404", "500"):
            self.send_error(int(kind))
        elif kind == "timeout":
            if not self.server.stop.wait(self.server.timeout_delay):
                self.send_error(504)
            self.close_connection = True
        elif kind == "truncated":
            data = some_jpeg(self.server.world_dir, name)
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True  # the rest never comes
        elif kind == "html":
            self.send_body(HTML_PAGE, "image/jpeg")
        elif kind == "redirect":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)

    def send_body(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def some_jpeg(world_dir: str, name: str) -> bytes | None:
    """A real jpeg of the world: images/<n>.jpg for /fail/truncated/<n>.jpg when it exists, else the first."""
    number = name.split(".")[0]
    candidates = [f"{int(number):07d}.jpg"] if number.isdigit() else []
    for candidate in candidates + ["0000000.jpg"]:
        path = os.path.join(world_dir, "images", candidate)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read()
    return None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:  # a name: every address it resolves to must be loopback
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


@contextlib.contextmanager
def serve_world(world_dir: str, host: str = "127.0.0.1", port: int = 0,
                timeout_delay: float = 30.0) -> Iterator[str]:
    """Serve world_dir in a background thread; yields the base url, e.g. http://127.0.0.1:43117."""
    if not is_loopback(host):
        raise ValueError(f"world.host={host!r}: the demo world is served on loopback addresses only "
                         "(127.0.0.1, ::1, localhost)")
    if not os.path.isdir(world_dir):
        raise FileNotFoundError(f"{world_dir}: no such world directory; build the world first")
    server_class = IPv6WorldServer if ":" in host else WorldServer
    server = server_class((host, port), WorldHandler)
    server.world_dir, server.timeout_delay, server.stop = world_dir, timeout_delay, threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name="world-server", daemon=True)
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    try:
        yield f"http://{shown}:{bound_port}"
    finally:
        server.stop.set()  # wakes stalled "timeout" handlers at once
        server.shutdown()
        server.server_close()
        thread.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a demo world directory on loopback until Ctrl-C.")
    parser.add_argument("world_dir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--timeout-delay", type=float, default=30.0, help="seconds a timeout url stalls")
    args = parser.parse_args(argv)
    with serve_world(args.world_dir, args.host, args.port, args.timeout_delay) as base_url:
        print(f"serving {args.world_dir} at {base_url} (Ctrl-C to stop)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
