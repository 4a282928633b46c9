"""A vision-language model served by the real launcher, through the clients people use: `openai` chat with a
data-URL image, `huggingface_hub.InferenceClient.chat_completion` with an image fetched over http from a loopback
server, markdown images in `/generate`; bad images get TGI's 422s. Outputs equal offline `loom.LLM` on the same
prompt and image (which equals transformers: tests/models/test_vlm_parity.py)."""

from __future__ import annotations

import base64
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
import requests
from huggingface_hub import InferenceClient

from loom import LLM, SamplingParams
from loom.testing.vlm_checkpoints import build_tiny_vlm, test_image as make_image
from tests.e2e.conftest import Server


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


IMAGE = _png(make_image(40, 30, seed=3))
DATA_URL = "data:image/png;base64," + base64.b64encode(IMAGE).decode()


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return build_tiny_vlm("idefics3", tmp_path_factory.mktemp("idefics3"))


@pytest.fixture(scope="module")
def vlm_server(vlm_dir, tmp_path_factory):
    server = Server(vlm_dir, tmp_path_factory.mktemp("vlm") / "launcher.log", "--max-image-fetch-size", "60000")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def offline(vlm_dir):
    return LLM(vlm_dir, dtype="float32", max_batch_total_tokens=2048)


@pytest.fixture(scope="module")
def image_host():
    """Serves the PNG at http://127.0.0.1:<port>/cat.png."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path != "/cat.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(IMAGE)))
            self.end_headers()
            self.wfile.write(IMAGE)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _expected(offline: LLM, before: str, after: str, n: int = 8):
    from PIL import Image

    image = Image.open(io.BytesIO(IMAGE)).convert("RGB")
    return offline.generate([[before, image, after]], SamplingParams(max_new_tokens=n))[0]


def test_openai_chat_with_a_data_url_image(vlm_server, offline):
    client = openai.OpenAI(base_url=f"{vlm_server.url}/v1", api_key="-")
    content = [{"type": "text", "text": "What is this? "}, {"type": "image_url", "image_url": {"url": DATA_URL}}]
    r = client.chat.completions.create(model="tgi", messages=[{"role": "user", "content": content}], max_tokens=8,
                                       temperature=0)
    want = _expected(offline, "<|im_start|>user\nWhat is this? ", "<|im_end|>\n<|im_start|>assistant\n")
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)  # the image's tokens are counted
    assert r.usage.completion_tokens == len(want.token_ids)
    stream = client.chat.completions.create(model="tgi", messages=[{"role": "user", "content": content}],
                                            max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text


def test_inference_client_chat_with_an_http_image(vlm_server, offline, image_host):
    client = InferenceClient(base_url=vlm_server.url)
    content = [{"type": "image_url", "image_url": {"url": f"{image_host}/cat.png"}},
               {"type": "text", "text": " Describe it."}]
    out = client.chat_completion(messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0)
    want = _expected(offline, "<|im_start|>user\n", " Describe it.<|im_end|>\n<|im_start|>assistant\n")
    assert out.choices[0].message.content == want.text


def test_generate_with_a_markdown_image(vlm_server, offline, image_host):
    for url in (DATA_URL, f"{image_host}/cat.png"):
        r = requests.post(f"{vlm_server.url}/generate", timeout=60, json={
            "inputs": f"Look: ![]({url}) and tell.", "parameters": {"max_new_tokens": 8, "details": True}})
        assert r.status_code == 200, r.text
        want = _expected(offline, "Look: ", " and tell.")
        assert [t["id"] for t in r.json()["details"]["tokens"]] == want.token_ids
    # two images, and the prompt-token count of /tokenize-free validation: a prompt too long with its images
    r = requests.post(f"{vlm_server.url}/generate", timeout=60, json={
        "inputs": f"![]({DATA_URL})![]({DATA_URL})", "parameters": {"max_new_tokens": 500}})
    assert r.status_code == 422 and "must be <= 512" in r.json()["error"]


@pytest.mark.parametrize("url, message", [
    ("data:image/png;base64,@@@not-base64", "Input validation error: base64 encoding is invalid"),
    ("data:image/png;base64," + base64.b64encode(b"no image here").decode(), "Input validation error: invalid image"),
    ("file:///etc/passwd", "Input validation error: invalid image content: ![](file:///etc/passwd)"),
    ("http://127.0.0.1:9/none.png", "Input validation error: Could not fetch image"),
    ("data:image/png;base64," + base64.b64encode(b"\0" * 70000).decode(),
     "Input validation error: Image size 70000 bytes exceeds maximum allowed size of 60000 bytes"),
])
def test_bad_images_are_422_with_tgi_messages(vlm_server, url, message):
    chat = requests.post(f"{vlm_server.url}/v1/chat/completions", timeout=60, json={
        "model": "tgi", "max_tokens": 4,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
    assert chat.status_code == 422 and chat.json()["error"].startswith(message), chat.text
    assert chat.json()["error_type"] == "validation"
    gen = requests.post(f"{vlm_server.url}/generate", timeout=60,
                        json={"inputs": f"x ![]({url})", "parameters": {"max_new_tokens": 4}})
    assert gen.status_code == 422 and gen.json()["error"].startswith(message), gen.text
    # the server is fine afterwards
    ok = requests.post(f"{vlm_server.url}/generate", timeout=60,
                       json={"inputs": "text only", "parameters": {"max_new_tokens": 2}})
    assert ok.status_code == 200


def test_truncation_keeps_whole_images_and_a_literal_image_token_is_refused(vlm_server, offline):
    from PIL import Image

    def generate(inputs: str, **parameters):
        return requests.post(f"{vlm_server.url}/generate", timeout=60, json={
            "inputs": inputs, "parameters": {"max_new_tokens": 2, **parameters}})

    text_after = " and then a long tail of words that follows the picture for a while, more and more words here"
    image = Image.open(io.BytesIO(IMAGE)).convert("RGB")
    prompt = offline._image_prompt(["Before ", image, text_after])
    n, (placed,) = len(prompt.token_ids), prompt.images
    # keeping only tokens after the image drops it whole; a cut inside its tokens is refused; before it, kept
    assert generate(f"Before ![]({DATA_URL}){text_after}", truncate=n - placed.end).status_code == 200
    through = generate(f"Before ![]({DATA_URL}){text_after}", truncate=n - placed.offset - 1)
    assert through.status_code == 422 and "`truncate` cuts through an image" in through.json()["error"]
    whole = generate(f"Before ![]({DATA_URL}){text_after}", truncate=n - placed.offset, details=True)
    assert whole.status_code == 200, whole.text
    literal = generate("a literal <image> token and no picture")
    assert literal.status_code == 422 and "image tokens that belong to no image" in literal.json()["error"]


def _odd_images() -> dict[str, bytes]:
    """Images a processor may choke on: tiny, extreme aspect ratios, other modes, animation, truncated files."""
    from PIL import Image

    def encoded(image, fmt="PNG", **kw) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kw)
        return buf.getvalue()

    base = make_image(40, 30, seed=9)
    frames = [make_image(20, 20, seed=s) for s in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    return {
        "1x1": encoded(Image.new("RGB", (1, 1), "red")),
        "1x400": encoded(Image.new("RGB", (1, 400), "blue")),
        "600x2": encoded(Image.new("RGB", (600, 2), "green")),
        "grey": encoded(base.convert("L")),
        "rgba": encoded(base.convert("RGBA")),
        "palette": encoded(base.convert("P")),
        "16-bit": encoded(Image.new("I;16", (30, 20), 40000)),
        "cmyk jpeg": encoded(base.convert("CMYK"), "JPEG"),
        "animated gif": gif.getvalue(),
        "truncated png": encoded(base)[:100],
    }


def test_odd_images_are_served_or_refused_never_a_500(vlm_server):
    for name, data in _odd_images().items():
        url = f"data:image/{'jpeg' if 'jpeg' in name else 'gif' if 'gif' in name else 'png'};base64," + \
            base64.b64encode(data).decode()
        r = requests.post(f"{vlm_server.url}/generate", timeout=60,
                          json={"inputs": f"![]({url}) what?", "parameters": {"max_new_tokens": 2}})
        assert r.status_code in (200, 422), (name, r.status_code, r.text)
        if r.status_code == 422:
            assert r.json()["error_type"] == "validation", name
    assert requests.get(f"{vlm_server.url}/health", timeout=30).status_code == 200


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3"])
def test_every_family_processor_takes_odd_images_or_says_why(family, tmp_path):
    """The processor step of each family on the same odd images: a prompt, or a ValueError (the router's 422)."""
    from PIL import Image

    from loom.config import ModelConfig
    from loom.multimodal import ImagePromptBuilder

    path = build_tiny_vlm(family, tmp_path)
    builder = ImagePromptBuilder(path, ModelConfig.from_dir(path, "float32").hf_config)
    for name, data in _odd_images().items():
        if name == "truncated png":
            continue  # refused before the processor (the router's decoder)
        image = Image.open(io.BytesIO(data))
        image.load()
        try:
            prompt = builder.build(["Look ", image.convert("RGB"), " now"])
        except ValueError:
            continue
        assert prompt.images and prompt.images[0].num_embeds > 0, (family, name)
