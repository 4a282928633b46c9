"""The launcher supervises: SIGTERM stops everything in time; a dead child takes the server down."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except (FileNotFoundError, ProcessLookupError):
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_sigterm_stops_every_child_within_the_timeout(launch):
    server = launch("--graceful-termination-timeout", "10")
    pids = [server.child_pid("engine"), server.child_pid("router")]
    start = time.monotonic()
    code = server.stop(timeout=30)
    assert code == 0
    assert time.monotonic() - start < 25
    assert not any(_alive(p) for p in pids)
    assert _port_free(server.port)


def test_killing_the_engine_takes_the_server_down(launch):
    server = launch()
    engine, router = server.child_pid("engine"), server.child_pid("router")
    os.kill(engine, signal.SIGKILL)
    try:
        code = server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError("launcher kept running after its engine died:\n" + server.logs())
    assert code != 0
    assert "engine exited unexpectedly" in server.logs()
    deadline = time.monotonic() + 10
    while _alive(router) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(router)
    assert _port_free(server.port)


def test_unreachable_hub_model_is_a_clear_error(tmp_path):
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "loom.cli", "launch", "--model-id", "no-such-org/no-such-model", "--port", "0"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode != 0
    assert "could not get model 'no-such-org/no-such-model'" in proc.stderr
    assert "local model directory" in proc.stderr


def test_sigterm_drains_streams_in_flight(launch):
    """Accepted streams run to completion, new requests get 503 meanwhile, the launcher exits 0."""
    import json
    import threading

    import requests

    server = launch("--graceful-termination-timeout", "60")
    results: list[dict] = []
    started = threading.Barrier(3)

    def stream():
        with requests.post(f"{server.url}/generate_stream", stream=True, timeout=120,
                           json={"inputs": "Drain", "parameters": {"max_new_tokens": 300, "ignore_eos": True}}) as r:
            lines = (ln for ln in r.iter_lines() if ln)
            first = next(lines)
            started.wait()
            events = [json.loads(first[5:])] + [json.loads(ln[5:]) for ln in lines]
            results.append(events[-1])

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for t in threads:
        t.start()
    started.wait(timeout=60)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    r = requests.post(f"{server.url}/generate", json={"inputs": "late", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 503 and r.json()["error_type"] == "unavailable"
    assert requests.get(f"{server.url}/health").status_code == 503
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 2
    assert all(e["details"] is None and e["generated_text"] is not None for e in results)  # each ended normally
    assert server.proc.wait(timeout=60) == 0
