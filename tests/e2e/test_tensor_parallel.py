"""`loom launch --num-shard 2`: the server's greedy tokens equal one rank's, and a dead rank takes it all down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from loom import LLM, SamplingParams

from .conftest import Server, free_port
from .test_lifecycle import _alive, _port_free

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog, and then", "1 2 3"]


@pytest.fixture(scope="module")
def sharded(llama_dir, tmp_path_factory):
    server = Server(llama_dir, tmp_path_factory.mktemp("tp") / "launcher.log", "--num-shard", "2",
                    "--master-port", str(free_port()))
    yield server.wait_ready()
    server.stop()


def test_two_shards_serve_the_one_rank_greedy_tokens(sharded, llama_dir):
    llm = LLM(llama_dir, dtype="float32", max_batch_total_tokens=4096)
    expected = [r.token_ids for r in llm.generate(PROMPTS, SamplingParams(max_new_tokens=20))]

    def generate(prompt: str) -> list[int]:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 20, "details": True}}
        resp = requests.post(f"{sharded.url}/generate", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        return [t["id"] for t in resp.json()["details"]["tokens"]]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: batched together on both ranks
        got = list(pool.map(generate, PROMPTS))
    assert got == expected
    assert "tensor parallel over 2 ranks" in sharded.logs()


def test_killing_one_rank_takes_the_server_down(sharded):
    roles = ["engine rank 0", "engine rank 1", "router"]
    pids = {role: sharded.child_pid(role) for role in roles}
    start = time.monotonic()
    os.kill(pids["engine rank 1"], signal.SIGKILL)
    try:
        code = sharded.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError("launcher kept running after a rank died:\n" + sharded.logs())
    elapsed = time.monotonic() - start
    assert code != 0
    assert elapsed < 10, elapsed
    assert "engine rank 1 exited unexpectedly (killed by SIGKILL)" in sharded.logs()
    assert not [role for role, pid in pids.items() if _alive(pid)]
    assert _port_free(sharded.port)


def test_sigterm_stops_every_rank(llama_dir, tmp_path):
    server = Server(llama_dir, tmp_path / "launcher.log", "--num-shard", "2", "--master-port", str(free_port()),
                    "--graceful-termination-timeout", "10").wait_ready()
    pids = [server.child_pid(role) for role in ("engine rank 0", "engine rank 1", "router")]
    assert server.stop(timeout=30) == 0
    assert not [pid for pid in pids if _alive(pid)]
    logs = server.log_path.read_text()
    assert "rank 1: shutting down" in logs  # it followed rank 0's shutdown rather than being killed
    assert "engine rank 1 exited with code 0" in logs, logs


def test_a_shard_count_the_heads_cannot_split_fails_at_start(llama_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "loom.cli", "launch", "--model-id", str(llama_dir), "--num-shard", "3",
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode != 0
    assert "--num-shard 3: LlamaForCausalLM has 4 attention heads" in proc.stderr
    assert "started engine" not in proc.stderr  # refused before any process started
