"""Image inputs of vision-language prompts: the `![](url)` markdown images TGI finds in a prompt, each loaded into
its bytes and a decoded RGB image, refused with TGI's 422 messages (router/src/validation.rs::fetch_image).

Which message when (TGI's mapping, `Input validation error: ` before each):

    url neither http(s):// nor data:                   invalid image content: ![](<url>)
    data URL not `data:<mime>;base64,<payload>`        invalid image content: <the part that does not fit>
    payload not base64                                 base64 encoding is invalid: <e>
    more bytes than --max-image-fetch-size             Image size <n> bytes exceeds maximum allowed size of <max> bytes
    no connection, non-2xx status, timeout, redirects  Could not fetch image: <e>
    the body breaks off while being read               Failed to read image data: <e>
    bytes that are no image, or a corrupt one, a decompression bomb, a zero-sized one    invalid image: <e>

Differences from TGI: a non-2xx answer is `Could not fetch image` (TGI decodes the error page as an image and says
`invalid image`); the size limit also holds for a data URL's decoded bytes (TGI bounds only fetches); a fetch has
an overall deadline (`timeout`, TGI's reqwest client 30 s per request).
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
from dataclasses import dataclass

import httpx
from PIL import Image, UnidentifiedImageError

from loom.multimodal import ImagePrompt, ImagePromptBuilder
from loom.router.errors import ValidationError, scrub

MARKDOWN_IMAGE = re.compile(r"!\[\]\([^\)]*\)")  # TGI's regex: an empty alt text, a url without `)`

# A data URL's mime type → the only format its bytes may be decoded as (TGI's format_from_mimetype); other types
# are guessed from the bytes.
_MIME_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/gif": "GIF",
                 "image/webp": "WEBP", "image/tiff": "TIFF"}
# NOTE: the formats PIL may try when guessing, the common ones TGI's `image` crate recognizes by their magic bytes.
# Never EPS (PIL decodes it by running Ghostscript), nor formats without magic bytes (TGA) that arbitrary data can
# pass for.
_GUESSED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP", "ICO", "PPM", "QOI")
_FORMAT_MIMES = {"MPO": "image/jpeg"}  # PIL's name for a JPEG with extra frames; other formats: Image.MIME
_MAX_REDIRECTS = 10  # what TGI's reqwest client follows
_DEFAULT_MAX_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS, if someone set it to None


@dataclass(frozen=True, slots=True)
class ImageRef:
    url: str
    start: int  # span of the whole `![](url)` in the text: text[start:end]
    end: int


@dataclass(frozen=True, slots=True)
class FetchedImage:
    data: bytes  # the encoded bytes as received
    mimetype: str  # the data URL's type, else the format PIL decoded, else the HTTP Content-Type
    image: Image.Image  # decoded, fully loaded, RGB


def find_markdown_images(text: str) -> list[ImageRef]:
    """Every `![](url)` in the text, in order. `![alt](url)` and an unclosed `![](url` are text, as in TGI."""
    return [ImageRef(m.group()[len("![]("):-1], m.start(), m.end()) for m in MARKDOWN_IMAGE.finditer(text)]


async def load_image(url: str, *, max_bytes: int, timeout: float = 10.0) -> FetchedImage:
    """The image a `![](url)` names: an http(s) URL fetched (at most `max_bytes`, within `timeout` seconds) or a
    base64 data URL, decoded off the event loop. Raises ValidationError with TGI's messages (module docstring)."""
    if url.startswith(("http://", "https://")):
        data, content_type = await _fetch(url, max_bytes, timeout)
        mimetype, formats = None, _GUESSED_FORMATS
    elif url.startswith("data:"):
        mimetype, data = _parse_data_url(url[len("data:"):], max_bytes)
        content_type = None
        formats = (_MIME_FORMATS[mimetype],) if mimetype in _MIME_FORMATS else _GUESSED_FORMATS
    else:
        # NOTE: security. Only http(s) and data URLs: a file://, ftp:// or bare-path url is refused without being
        # opened, so that no request makes the server read its own files (or anything a path reaches) into a prompt.
        raise ValidationError(f"invalid image content: ![]({url})")
    image, fmt = await asyncio.to_thread(_decode, data, formats)
    if mimetype is None:
        mimetype = _FORMAT_MIMES.get(fmt) or Image.MIME.get(fmt) or content_type or "application/octet-stream"
    return FetchedImage(data, mimetype, image)


def _too_large(size: int, max_bytes: int) -> ValidationError:
    return ValidationError(f"Image size {size} bytes exceeds maximum allowed size of {max_bytes} bytes")


def _reason(err: BaseException) -> str:
    return scrub(str(err), first_line=True) or type(err).__name__


def _parse_data_url(content: str, max_bytes: int) -> tuple[str, bytes]:
    """`<mime>;base64,<payload>` (what follows `data:`) → (mime, decoded bytes), with TGI's checks in its order."""
    parts = content.split(";")
    if len(parts) != 2:
        raise ValidationError(f"invalid image content: {content}")
    mimetype, payload = parts
    if not payload.startswith("base64,"):
        raise ValidationError(f"invalid image content: {payload}")
    try:  # strict like TGI's base64 STANDARD engine: no whitespace, no characters outside the alphabet
        data = base64.b64decode(payload[len("base64,"):], validate=True)
    except ValueError as err:  # binascii.Error, or non-ASCII text
        raise ValidationError(f"base64 encoding is invalid: {_reason(err)}") from err
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes)
    return mimetype, data


async def _fetch(url: str, max_bytes: int, timeout: float) -> tuple[bytes, str | None]:
    """The body of a GET (redirects followed), refused as soon as it is known to exceed `max_bytes`: from its
    Content-Length, else counted as it arrives (never buffered past the limit). → (body, Content-Type)."""
    body = bytearray()
    reading = False  # past the status line and headers: failures are then the body's
    try:
        async with asyncio.timeout(timeout):  # overall deadline; httpx's timeout is per connect/read
            async with httpx.AsyncClient(follow_redirects=True, max_redirects=_MAX_REDIRECTS, timeout=timeout,
                                         headers={"accept-encoding": "identity"}) as client:
                async with client.stream("GET", url) as response:
                    response.raise_for_status()
                    length = response.headers.get("content-length", "")
                    if length.isdigit() and int(length) > max_bytes:
                        raise _too_large(int(length), max_bytes)
                    reading = True
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            raise _too_large(len(body), max_bytes)
                    content_type = response.headers.get("content-type", "").split(";")[0].strip() or None
    except ValidationError:
        raise
    except (TimeoutError, httpx.HTTPError, httpx.InvalidURL) as err:
        reason = f"timed out after {timeout:g} s" if isinstance(err, TimeoutError) else _reason(err)
        prefix = "Failed to read image data" if reading else "Could not fetch image"
        raise ValidationError(f"{prefix}: {reason}") from err
    return bytes(body), content_type


def _decode(data: bytes, formats: tuple[str, ...]) -> tuple[Image.Image, str]:
    """Decode fully and convert to RGB (in a worker thread). → (image, PIL's format name). Whatever the decoder
    raises is the image's fault: a 422, never a 500."""
    try:
        with Image.open(io.BytesIO(data), formats=formats) as raw:
            width, height = raw.size
            if width <= 0 or height <= 0:
                raise ValidationError(f"invalid image: the image has a zero dimension ({width}x{height})")
            # PIL only warns between its limit and twice it (and raises DecompressionBombError above): refuse both.
            limit = Image.MAX_IMAGE_PIXELS or _DEFAULT_MAX_PIXELS
            if width * height > limit:
                raise ValidationError(f"invalid image: Image size ({width * height} pixels) exceeds limit of "
                                      f"{limit} pixels, could be decompression bomb DOS attack.")
            raw.load()
            return raw.convert("RGB"), raw.format or ""
    except ValidationError:
        raise
    except UnidentifiedImageError as err:
        reason = "The image format could not be determined" if len(formats) > 1 else \
            f"the data is not a valid {formats[0]} image"
        raise ValidationError(f"invalid image: {reason}") from err
    except Exception as err:  # noqa: BLE001 — any decoder failure (OSError, SyntaxError, DecompressionBomb*, ...)
        raise ValidationError(f"invalid image: {_reason(err)}") from err


@dataclass(slots=True)
class VisionInputs:
    """A vision-language model's prompts: markdown images loaded, then the text and images turned into prompt ids
    and `ImageInput`s by the checkpoint's processor (off the event loop)."""

    builder: ImagePromptBuilder
    max_image_fetch_size: int
    fetch_timeout: float = 10.0

    async def prompt(self, text: str, add_special_tokens: bool) -> ImagePrompt | None:
        """None for a prompt without images (tokenized as text)."""
        refs = find_markdown_images(text)
        if not refs:
            return None
        fetched = await asyncio.gather(*(load_image(r.url, max_bytes=self.max_image_fetch_size,
                                                    timeout=self.fetch_timeout) for r in refs))
        pieces: list = []
        at = 0
        for ref, image in zip(refs, fetched):
            pieces.extend([text[at : ref.start], image.image])
            at = ref.end
        pieces.append(text[at:])
        pieces = [p for p in pieces if not isinstance(p, str) or p]
        try:
            return await asyncio.to_thread(self.builder.build, pieces, add_special_tokens)
        except ValueError as err:
            raise ValidationError(f"invalid image content: {scrub(str(err), first_line=True)}") from err
