"""End-to-end fixtures: the real launcher (`python -m loom.cli launch`) on a tiny checkpoint, on free ports."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path | None, log_path: Path, *extra: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        model = ["--model-id", str(model_dir)] if model_dir is not None else []  # None: the default model
        cmd = [sys.executable, "-m", "loom.cli", "launch", *model, "--port", str(self.port),
               "--prometheus-port", str(free_port()), "--hostname", "127.0.0.1", "--dtype", "float32",
               "--max-batch-total-tokens", "8192", "--max-total-tokens", "512", *extra]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 180) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def child_pid(self, role: str) -> int:
        match = re.search(rf"started {role} \(pid (\d+)\)", self.logs())
        assert match, self.logs()
        return int(match.group(1))

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def launch(llama_dir, tmp_path_factory):
    servers: list[Server] = []

    def start(*extra: str) -> Server:
        server = Server(llama_dir, tmp_path_factory.mktemp("launch") / "launcher.log", *extra)
        servers.append(server)
        return server.wait_ready()

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def server(launch) -> Server:
    return launch("--max-concurrent-requests", "3")
