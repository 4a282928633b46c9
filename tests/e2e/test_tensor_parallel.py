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
        assert resp.headers["x-compute-type"] == "2-cpu"
        return [t["id"] for t in resp.json()["details"]["tokens"]]

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # concurrent: batched together on both ranks
        got = list(pool.map(generate, PROMPTS))
    assert got == expected
    assert "tensor parallel over 2 ranks" in sharded.logs()


def test_killing_one_rank_takes_the_server_down(sharded):
    """Streams in flight end with a clean error event; the launcher exits non-zero within seconds, naming the rank."""
    import json
    import threading

    roles = ["engine rank 0", "engine rank 1", "router"]
    pids = {role: sharded.child_pid(role) for role in roles}
    endings: list[object] = []
    streaming = threading.Barrier(3)

    def stream() -> None:
        body = {"inputs": "Killed", "parameters": {"max_new_tokens": 400, "ignore_eos": True}}
        last: object = "no event"
        try:
            with requests.post(f"{sharded.url}/generate_stream", json=body, stream=True, timeout=60) as r:
                lines = (ln for ln in r.iter_lines() if ln.startswith(b"data:"))
                last = json.loads(next(lines)[5:])
                streaming.wait(30)
                for line in lines:
                    last = json.loads(line[5:])
        except requests.RequestException as err:
            last = f"connection error: {err}"
        endings.append(last)

    clients = [threading.Thread(target=stream) for _ in range(2)]
    for c in clients:
        c.start()
    streaming.wait(60)
    start = time.monotonic()
    os.kill(pids["engine rank 1"], signal.SIGKILL)
    try:
        code = sharded.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError("launcher kept running after a rank died:\n" + sharded.logs())
    elapsed = time.monotonic() - start
    for c in clients:
        c.join(30)
    assert endings == [{"error": "Request failed during generation: the engine process exited",
                        "error_type": "generation"}] * 2
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


@pytest.mark.slow  # another two-rank server
def test_a_rank_started_by_hand_joins_as_on_another_host(llama_dir, tmp_path):
    """--local-shards 1: the launcher starts rank 0 only; rank 1 joins with `loom shard` and torchrun's variables,
    the way a rank on a second host does, and leaves when the server stops."""
    port = free_port()
    server = Server(llama_dir, tmp_path / "launcher.log", "--num-shard", "2", "--local-shards", "1",
                    "--master-addr", "127.0.0.1", "--master-port", str(port))
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    with open(tmp_path / "shard.log", "w") as log:
        shard = subprocess.Popen([sys.executable, "-m", "loom.cli", "shard", "--model-id", str(llama_dir)], env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
        try:
            server.wait_ready()
            body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 20, "details": True}}
            resp = requests.post(f"{server.url}/generate", json=body, timeout=60)
            llm = LLM(llama_dir, dtype="float32", max_batch_total_tokens=4096)
            expected = llm.generate(PROMPTS[0], SamplingParams(max_new_tokens=20))[0].token_ids
            assert [t["id"] for t in resp.json()["details"]["tokens"]] == expected
            assert "waiting for rank 1 to join" in server.logs()
            assert server.stop(timeout=30) == 0
            assert shard.wait(timeout=15) == 0  # told to stop by rank 0
        finally:
            server.stop()
            if shard.poll() is None:
                shard.kill()
                shard.wait()
    assert "rank 1: shutting down" in (tmp_path / "shard.log").read_text()


def test_a_shard_count_the_heads_cannot_split_fails_at_start(llama_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "loom.cli", "launch", "--model-id", str(llama_dir), "--num-shard", "3",
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode != 0
    assert "--num-shard 3: LlamaForCausalLM has 4 attention heads" in proc.stderr
    assert "started engine" not in proc.stderr  # refused before any process started
