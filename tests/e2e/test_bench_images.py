"""`loom bench` with images: synthetic PNGs (deterministic, distinct per request), image files (encoded once,
cycled), the request bodies of each API, and the bench CLI against a tiny vision-language model under the real
launcher: every request succeeds and the server's prompt-token count includes the image tokens."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from loom.bench.cli import main as bench_main
from loom.bench.client import BenchPrompt, request_body
from loom.bench.images import RequestImages, parse_size, synthetic_png
from loom.testing.vlm_checkpoints import build_tiny_vlm
from tests.e2e.conftest import Server


def test_synthetic_images_are_deterministic_distinct_and_sized():
    assert parse_size("448x448") == (448, 448) and parse_size("32X24") == (32, 24)
    png = synthetic_png(32, 24, (0, 0, 1, 0))
    assert png == synthetic_png(32, 24, (0, 0, 1, 0))
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.size == (32, 24) and im.mode == "RGB"
    images = RequestImages(2, size=(32, 24))
    level = images.for_requests(5, seed=7)
    assert len(level) == 5 and all(len(urls) == 2 for urls in level)
    flat = [u for urls in level for u in urls]
    assert len(set(flat)) == 10 and all(u.startswith("data:image/png;base64,") for u in flat)
    assert images.for_requests(5, seed=7) == level  # the same flags, the same images
    assert not set(flat) & {u for urls in images.for_requests(5, seed=8) for u in urls}  # another level
    assert not set(flat) & {u for urls in images.for_requests(2, seed=7, warmup=True) for u in urls}
    s = images.settings()
    assert s["source"] == "synthetic" and s["size"] == "32x24" and s["per_request"] == 2 and s["mean_bytes"] > 0


def test_image_files_are_encoded_once_and_cycled(tmp_path):
    paths = []
    for name, size in (("a.png", (20, 10)), ("b.jpg", (16, 16))):
        paths.append(str(tmp_path / name))
        Image.new("RGB", size, (200, 10, 10)).save(paths[-1])
    images = RequestImages(3, files=paths)
    level = images.for_requests(2, seed=0)
    a, b = images.files[0].url, images.files[1].url
    assert a.startswith("data:image/png;base64,") and b.startswith("data:image/jpeg;base64,")
    assert all(x is y for x, y in zip(level[0] + level[1], (a, b, a, b, a, b)))  # shared strings, cycled
    assert images.settings()["size"] == ["16x16", "20x10"] and images.settings()["per_request"] == 3
    (tmp_path / "not.png").write_text("text")
    with pytest.raises(SystemExit, match="not a readable image"):
        RequestImages(1, files=[str(tmp_path / "not.png")])


def test_request_bodies_carry_the_images():
    prompt = BenchPrompt(" the house", ("data:image/png;base64,AAA", "data:image/png;base64,BBB"))
    path, body = request_body("chat", prompt, 4, "m", True)
    assert path == "/v1/chat/completions"
    assert body["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,BBB"}},
        {"type": "text", "text": " the house"}]
    path, body = request_body("tgi", prompt, 4, "", True)
    assert path == "/generate_stream"
    assert body["inputs"] == "![](data:image/png;base64,AAA)![](data:image/png;base64,BBB) the house"
    assert request_body("chat", " the house", 4, "m", True)[1]["messages"][0]["content"] == " the house"
    with pytest.raises(ValueError, match="no images"):
        request_body("openai", prompt, 4, "m", True)


@pytest.mark.parametrize("flags, message", [
    (["--api", "openai", "--image", "8x8"], "--api openai (/v1/completions) takes no images"),
    (["--images-per-request", "2"], "--images-per-request needs --image"),
    (["--image", "8x8", "--images-per-request", "0"], "must be >= 1"),
    (["--image", "8"], "expected WIDTHxHEIGHT"),
])
def test_bad_image_flags_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_main(["--url", "http://127.0.0.1:9", *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture(scope="module")
def vlm_server(tmp_path_factory):
    model_dir = build_tiny_vlm("idefics3", tmp_path_factory.mktemp("idefics3"))
    server = Server(model_dir, tmp_path_factory.mktemp("vlm") / "launcher.log")
    try:
        yield server.wait_ready(), model_dir
    finally:
        server.stop()


def test_bench_with_images_against_a_vlm_server(vlm_server, tmp_path, capsys):
    server, model_dir = vlm_server
    common = ["--url", server.url, "--tokenizer", str(model_dir), "--concurrency", "2", "--num-prompts", "4",
              "--prompt-tokens", "16", "--output-tokens", "4", "--no-progress"]

    def bench(*flags: str) -> dict:
        out = tmp_path / "bench.json"
        assert bench_main([*common, "--json", str(out), *flags]) == 0
        report = json.loads(out.read_text())
        (run,) = report["runs"]
        assert run["completed"] == run["requests"] == 4 and run["failed"] == 0, run["errors"]
        assert run["output_tokens"] == 4 * 4
        return report

    text = bench("--api", "chat")["runs"][0]["mean_server_prompt_tokens"]
    report = bench("--image", "32x24")  # --api chat is the default with images
    assert report["api"] == "chat" and report["prompt_tokens"] == 16
    assert report["images"]["size"] == "32x24" and report["images"]["per_request"] == 1
    assert "image tokens come on top" in capsys.readouterr().out
    with_image = report["runs"][0]["mean_server_prompt_tokens"]
    assert with_image > text > 16  # the chat template's tokens, then the image's on top
    image_tokens = with_image - text
    # TGI markdown images before the text, two per request: the server counts both (details.input_length)
    report = bench("--api", "tgi", "--image", "32x24", "--images-per-request", "2")
    assert report["images"]["per_request"] == 2
    assert report["runs"][0]["mean_server_prompt_tokens"] == 16 + 2 * image_tokens
