"""The router's image inputs (loom/router/images.py): `![](url)` parsing, data URLs, fetches from a loopback HTTP
server, decoding, and TGI's 422 messages; and `--max-image-fetch-size` reaching the router's config."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import socket
import struct
import threading
import time
import zlib

import msgspec
import pytest
from PIL import Image

from loom import run_config
from loom.launcher import build_run_config
from loom.launcher_args import build_parser, resolve
from loom.router.config import RouterConfig
from loom.router.errors import ValidationError
from loom.router.images import FetchedImage, ImageRef, find_markdown_images, load_image

MiB = 1 << 20


def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


PNG = encode(Image.new("RGBA", (7, 5), (10, 20, 30, 128)), "PNG")
JPEG = encode(Image.new("L", (16, 8), 200), "JPEG")
GIF = encode(Image.new("P", (3, 4), 1), "GIF")


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def load(url: str, max_bytes: int = MiB, timeout: float = 5.0) -> FetchedImage:
    return asyncio.run(load_image(url, max_bytes=max_bytes, timeout=timeout))


def refused(url: str, **kwargs) -> str:
    """The client-facing message of the 422 that loading `url` gives, without the `Input validation error: `."""
    with pytest.raises(ValidationError) as info:
        load(url, **kwargs)
    err = info.value
    assert err.status == 422 and err.body()["error_type"] == "validation"
    assert err.message.startswith("Input validation error: ")
    return err.message.removeprefix("Input validation error: ")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG written row by row: 200 M pixels compress to a few tens of KB."""
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------------------------
# Markdown


def test_markdown_images_in_order_with_their_spans():
    text = "Look: ![](https://a.example/cat.png) and ![](data:image/png;base64,AAAA)then text ![]()"
    refs = find_markdown_images(text)
    assert [r.url for r in refs] == ["https://a.example/cat.png", "data:image/png;base64,AAAA", ""]
    for ref in refs:
        assert text[ref.start:ref.end] == f"![]({ref.url})"
    assert text[refs[0].end:refs[1].start] == " and "
    assert text[refs[1].end:refs[2].start] == "then text "
    assert refs[0] == ImageRef("https://a.example/cat.png", 6, 36)


@pytest.mark.parametrize("text", ["no images", "![alt](https://a.example/x.png)", "![](https://a.example/x.png",
                                  "![] (https://a.example/x.png)", "[](x.png)", "!\\[\\](x)"])
def test_malformed_markdown_is_text(text):
    assert find_markdown_images(text) == []


def test_url_stops_at_the_first_closing_parenthesis():
    """TGI's regex `!\\[\\]\\([^\\)]*\\)`: a `)` in the url ends it."""
    refs = find_markdown_images("![](https://a.example/a(b).png)")
    assert [r.url for r in refs] == ["https://a.example/a(b"]
    assert (refs[0].start, refs[0].end) == (0, len("![](https://a.example/a(b)"))


# ------------------------------------------------------------------------------------------------------------------
# Data URLs


def test_png_data_url_round_trip():
    got = load(data_url(PNG))
    assert got.data == PNG and got.mimetype == "image/png"
    assert got.image.size == (7, 5) and got.image.mode == "RGB"
    assert got.image.getpixel((0, 0)) == (10, 20, 30)


def test_jpeg_data_url_round_trip():
    got = load(data_url(JPEG, "image/jpeg"))
    assert got.data == JPEG and got.mimetype == "image/jpeg"
    assert got.image.size == (16, 8) and got.image.mode == "RGB"
    assert load(data_url(JPEG, "image/jpg")).image.size == (16, 8)  # TGI's alias


def test_unknown_mime_type_is_guessed_from_the_bytes_and_kept():
    got = load(data_url(GIF, "image/x-whatever"))
    assert got.mimetype == "image/x-whatever" and got.image.size == (3, 4) and got.image.mode == "RGB"


def test_a_known_mime_type_decodes_only_that_format():
    assert refused(data_url(PNG, "image/jpeg")) == "invalid image: the data is not a valid JPEG image"


@pytest.mark.parametrize("payload", ["@@@@", "abc", "YWJj\nZA==", "é"])
def test_bad_base64(payload):
    assert refused(f"data:image/png;base64,{payload}").startswith("base64 encoding is invalid: ")


@pytest.mark.parametrize("url, message", [
    ("data:image/png,AAAA", "invalid image content: image/png,AAAA"),
    ("data:image/png;charset=utf-8;base64,AAAA", "invalid image content: image/png;charset=utf-8;base64,AAAA"),
    ("data:image/png;utf8,AAAA", "invalid image content: utf8,AAAA"),
])
def test_malformed_data_urls(url, message):
    assert refused(url) == message


@pytest.mark.parametrize("data, mime, reason", [
    (b"not an image at all", "image/png", "the data is not a valid PNG image"),
    (b"not an image at all", "application/octet-stream", "The image format could not be determined"),
    (b"", "image/x-empty", "The image format could not be determined"),
])
def test_undecodable_bytes(data, mime, reason):
    assert refused(data_url(data, mime)) == f"invalid image: {reason}"


def test_truncated_image():
    big = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    assert refused(data_url(big[: len(big) // 2])).startswith("invalid image: ")


def test_zero_sized_image():
    ihdr = struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"")) + \
        png_chunk(b"IEND", b"")
    assert refused(data_url(png)).startswith("invalid image: ")


def test_postscript_is_never_handed_to_ghostscript():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    for mime in ("application/postscript", "image/eps"):
        assert refused(data_url(eps, mime)) == "invalid image: The image format could not be determined"


def test_oversize_data_url():
    n = len(PNG)
    assert refused(data_url(PNG), max_bytes=n - 1) == \
        f"Image size {n} bytes exceeds maximum allowed size of {n - 1} bytes"
    assert load(data_url(PNG), max_bytes=n).data == PNG  # the limit itself is allowed


# ------------------------------------------------------------------------------------------------------------------
# Decompression bombs


def test_decompression_bomb_is_refused():
    bomb = bilevel_png(20_000, 10_000)  # 2e8 pixels: over twice PIL's limit (DecompressionBombError)
    assert len(bomb) < 200_000
    message = refused(data_url(bomb))
    assert message.startswith("invalid image: Image size (200000000 pixels) exceeds limit of")
    assert "decompression bomb" in message


@pytest.mark.parametrize("action", ["warn", "ignore", "error"])
def test_images_over_pils_warning_limit_are_refused_too(monkeypatch, action):
    """Between PIL's limit and twice it PIL only warns (or raises the warning under `-W error`): a 422 either way."""
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    image = data_url(encode(Image.new("RGB", (40, 30)), "PNG"))  # 1200 pixels
    expected = "invalid image: Image size (1200 pixels) exceeds limit of 1000 pixels, could be decompression bomb " \
        "DOS attack."
    if action == "warn":
        with pytest.warns(Image.DecompressionBombWarning):
            assert refused(image) == expected
    else:
        with warnings.catch_warnings():
            warnings.simplefilter(action, Image.DecompressionBombWarning)
            assert refused(image) == expected
    assert load(data_url(encode(Image.new("RGB", (40, 25)), "PNG"))).image.size == (40, 25)  # 1000: allowed


# ------------------------------------------------------------------------------------------------------------------
# Fetches from a loopback server


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked bodies
    sent: dict[str, int] = {}

    def do_GET(self):  # noqa: N802 — http.server's naming
        route = getattr(self, "route_" + self.path.strip("/").replace("-", "_"), None)
        if route is None:
            self.send_error(404)
            return
        try:
            route()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up, as it should on an oversize body

    def reply(self, body: bytes, content_type: str = "image/png", length: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def route_cat_png(self):
        self.reply(PNG, "application/octet-stream")  # a wrong type: the bytes say PNG

    def route_cat_jpg(self):
        self.reply(JPEG, "image/jpeg; charset=binary")

    def route_redirect(self):
        self.send_response(302)
        self.send_header("Location", "/cat-png")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_text(self):
        self.reply(b"<html>hello</html>", "text/html")

    def route_endless_chunked(self):
        """No Content-Length: chunks until the client hangs up (64 MiB at most)."""
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = bytes(16 * 1024)
        Handler.sent["chunked"] = 0
        for _ in range(4096):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            Handler.sent["chunked"] += len(chunk)
        self.wfile.write(b"0\r\n\r\n")

    def route_huge_length(self):
        self.reply(b"\x89PNG", length=1_000_000_000)

    def route_truncated(self):
        self.reply(PNG[:20], length=len(PNG))
        self.close_connection = True

    def route_slow_headers(self):
        time.sleep(2)
        self.reply(PNG)

    def route_slow_body(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG[:10])
        self.wfile.flush()
        time.sleep(2)
        self.wfile.write(PNG[10:])

    def log_message(self, *_args) -> None:
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_an_image(server):
    got = load(f"{server}/cat-png")
    assert got.data == PNG and got.mimetype == "image/png"  # from the decoded format, not the wrong Content-Type
    assert got.image.size == (7, 5) and got.image.mode == "RGB"
    jpeg = load(f"{server}/cat-jpg")
    assert jpeg.mimetype == "image/jpeg" and jpeg.image.size == (16, 8)


def test_redirects_are_followed(server):
    assert load(f"{server}/redirect").data == PNG


def test_not_found(server):
    message = refused(f"{server}/missing.png")
    assert message.startswith("Could not fetch image: ") and "404" in message
    assert "\n" not in message


def test_an_answer_that_is_no_image(server):
    assert refused(f"{server}/text") == "invalid image: The image format could not be determined"


def test_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert refused(f"http://127.0.0.1:{port}/cat.png").startswith("Could not fetch image: ")


def test_chunked_body_is_cut_off_at_the_limit(server):
    message = refused(f"{server}/endless-chunked", max_bytes=100_000)
    assert message.startswith("Image size ") and message.endswith(" exceeds maximum allowed size of 100000 bytes")
    received = int(message.split()[2])
    assert 100_000 < received < 100_000 + 1 * MiB  # stopped as soon as it passed the limit, not read to the end


def test_content_length_over_the_limit_is_refused_before_reading(server):
    assert refused(f"{server}/huge-length", max_bytes=1000) == \
        "Image size 1000000000 bytes exceeds maximum allowed size of 1000 bytes"


def test_body_that_breaks_off(server):
    assert refused(f"{server}/truncated").startswith("Failed to read image data: ")


def test_slow_server_times_out(server):
    start = time.monotonic()
    assert refused(f"{server}/slow-headers", timeout=0.3) == "Could not fetch image: timed out after 0.3 s"
    assert refused(f"{server}/slow-body", timeout=0.3) == "Failed to read image data: timed out after 0.3 s"
    assert time.monotonic() - start < 1.8


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/cat.png", "/etc/passwd", "cat.png", "",
                                 "HTTP://127.0.0.1/cat.png", " https://a.example/cat.png"])
def test_other_schemes_are_refused(url):
    assert refused(url) == f"invalid image content: ![]({url})"


def test_local_files_are_never_read(tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(PNG)  # a real image: had it been read, it would decode
    for url in (f"file://{path}", str(path)):
        assert refused(url) == f"invalid image content: ![]({url})"


# ------------------------------------------------------------------------------------------------------------------
# --max-image-fetch-size


def test_launcher_flag_reaches_the_router_config(tmp_path):
    assert resolve([], environ={})["max_image_fetch_size"] == 1_073_741_824
    assert resolve([], environ={"MAX_IMAGE_FETCH_SIZE": "77"})["max_image_fetch_size"] == 77
    args = resolve(["--max-image-fetch-size", "1234"], environ={"MAX_IMAGE_FETCH_SIZE": "77"})
    assert args["max_image_fetch_size"] == 1234
    config = build_run_config(args, "org/model", tmp_path / "model", tmp_path / "run")
    path = tmp_path / "run.json"
    run_config.dump(config, path)
    router = RouterConfig(**msgspec.structs.asdict(run_config.load(path).router))  # as `loom router` builds it
    assert router.max_image_fetch_size == 1234
    default = build_run_config(resolve([], environ={}), "org/model", tmp_path, tmp_path).router
    assert RouterConfig(**msgspec.structs.asdict(default)).max_image_fetch_size == 1_073_741_824
    assert RouterConfig(model_id="m", model_dir="d").max_image_fetch_size == 1_073_741_824
    with pytest.raises(SystemExit, match="`max_image_fetch_size` must be >= 0"):
        resolve(["--max-image-fetch-size", "-1"], environ={})
    help_text = " ".join(build_parser().format_help().split())
    assert "--max-image-fetch-size MAX_IMAGE_FETCH_SIZE Maximum image fetch size in bytes" in help_text
    assert "(default: 1073741824) [env: MAX_IMAGE_FETCH_SIZE]" in help_text
