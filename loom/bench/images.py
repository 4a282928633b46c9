"""Images sent with benchmark requests, for vision-language models.

`--image WxH`: a synthetic RGB PNG of that size, a different one for every image of every request (seeded by
`--seed`, the load level, the request and the image's place in it; warm-up requests get images of their own), so a
server's prefix cache, which keys cached KV by the image's content, cannot reuse one request's image for another.
Deterministic: the same flags give the same bytes (a second run against the same live server needs another --seed,
as for text prompts). The content is smooth (per-channel waves, an inverted disc, a stamp of seeded pixels in the
top row that makes every image distinct), so the PNGs are smaller than a photo's (~110 KB at 448x448): the image
tokens, not the request bytes, are what the bench loads the server with.

`--image-file PATH` (repeatable): those files' bytes, the same for every request, cycled over the image slots
when several are given.

Every distinct image is encoded (PNG, base64 data URL) exactly once and the string is shared by the requests that
send it; the synthetic ones are built before each load level starts, outside the measured time.
"""

from __future__ import annotations

import argparse
import base64
import io
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

STAMP_PIXELS = 8  # seeded pixels in the top-left of every synthetic image: 192 random bits


def parse_size(text: str) -> tuple[int, int]:
    """`448x448` -> (448, 448); an argparse `type`."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, e.g. 448x448 (got {text!r})")
    return int(m.group(1)), int(m.group(2))


def synthetic_image(width: int, height: int, seed: int | tuple[int, ...]):
    """A deterministic RGB PIL image: smooth seeded waves per channel, an inverted disc, a row of seeded pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    fx, fy = x / max(width - 1, 1), y / max(height - 1, 1)
    freq = rng.uniform(0.5, 3.0, size=(3, 2))
    phase = rng.uniform(0, 2 * math.pi, size=3)
    img = np.stack([127.5 * (1 + np.sin(2 * math.pi * (freq[c, 0] * fx + freq[c, 1] * fy) + phase[c]))
                    for c in range(3)], axis=-1)
    cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    disc = (x - cx) ** 2 + (y - cy) ** 2 < (0.25 * min(width, height)) ** 2
    img[disc] = 255 - img[disc]
    img = img.astype(np.uint8)
    stamp = rng.integers(0, 256, size=(min(STAMP_PIXELS, width), 3), dtype=np.uint8)
    img[0, : len(stamp)] = stamp
    return Image.fromarray(img, mode="RGB")


def synthetic_png(width: int, height: int, seed: int | tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    synthetic_image(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@dataclass(frozen=True)
class ImageFile:
    path: str
    url: str  # the data URL, encoded once
    width: int
    height: int
    nbytes: int


def load_image_file(path: str) -> ImageFile:
    """The file as a data URL with its own mime type; refuses what PIL cannot read as an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            fmt, (width, height) = im.format, im.size
    except (OSError, UnidentifiedImageError) as err:
        raise SystemExit(f"--image-file {path}: not a readable image ({err})") from err
    mime = Image.MIME.get(fmt or "", "application/octet-stream")
    return ImageFile(path, data_url(data, mime), width, height, len(data))


class RequestImages:
    """The images of every request of a load level, and the settings to record in the report."""

    def __init__(self, per_request: int, size: tuple[int, int] | None = None, files: list[str] | None = None):
        if per_request < 1:
            raise ValueError("images per request must be >= 1")
        if (size is None) == (not files):
            raise ValueError("give either a synthetic size or image files")
        self.per_request = per_request
        self.size = size
        self.files = [load_image_file(p) for p in files or []]
        self._sent_bytes: list[int] = []  # encoded sizes of the synthetic images built so far

    def for_requests(self, num: int, seed: int, warmup: bool = False) -> list[tuple[str, ...]]:
        """`num` tuples of `per_request` data URLs. Synthetic: all distinct, seeded by (seed, request, slot), and
        the warm-up requests' by their own stream, so that warming up does not cache a measured request's image;
        files: the same strings, cycled over the slots."""
        if self.files:
            n = len(self.files)
            return [tuple(self.files[(j * self.per_request + k) % n].url for k in range(self.per_request))
                    for j in range(num)]
        width, height = self.size
        out = []
        for j in range(num):
            pngs = [synthetic_png(width, height, (seed, int(warmup), j, k)) for k in range(self.per_request)]
            if not warmup:
                self._sent_bytes.extend(len(p) for p in pngs)
            out.append(tuple(data_url(p, "image/png") for p in pngs))
        return out

    def settings(self) -> dict:
        """The image settings as the JSON report records them."""
        if self.files:
            sizes = sorted({f"{f.width}x{f.height}" for f in self.files})
            return {"source": "file", "files": [f.path for f in self.files],
                    "size": sizes[0] if len(sizes) == 1 else sizes, "per_request": self.per_request,
                    "distinct_per_request": False, "mean_bytes": statistics.fmean(f.nbytes for f in self.files)}
        return {"source": "synthetic", "size": f"{self.size[0]}x{self.size[1]}", "per_request": self.per_request,
                "distinct_per_request": True,
                "mean_bytes": statistics.fmean(self._sent_bytes) if self._sent_bytes else None}

    def describe(self) -> str:
        """One line for the text report."""
        s = self.settings()
        size = s["size"] if isinstance(s["size"], str) else "/".join(s["size"])
        kb = "" if s["mean_bytes"] is None else f", {s['mean_bytes'] / 1024:.1f} KB each"
        if s["source"] == "file":
            return (f"{s['per_request']} image(s) per request: {size} from {len(s['files'])} file(s), "
                    f"the same for every request{kb}")
        return f"{s['per_request']} image(s) per request: synthetic {size} PNG, distinct per request{kb}"
