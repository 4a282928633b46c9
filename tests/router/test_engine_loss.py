"""When the engine goes away, the router fails what is in flight with an error the client can read (an SSE error
event, a 424), reports unhealthy, and fails new requests at once instead of hanging."""

from __future__ import annotations

import json
import threading
import uuid

from fastapi.testclient import TestClient

from loom.config import EngineConfig
from loom.engine.core import EngineCore
from loom.engine.server import EngineServer
from loom.router.app import create_app
from loom.router.config import RouterConfig


def test_engine_exit_fails_streams_and_new_requests(llama_dir, tmp_path):
    engine = EngineCore(llama_dir, "float32", EngineConfig(max_batch_total_tokens=4096, max_total_tokens=1024))
    server = EngineServer(engine, f"ipc://{tmp_path}/loom-{uuid.uuid4().hex[:8]}")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    config = RouterConfig(model_id="loom-test/tiny-llama", model_dir=str(llama_dir))
    with TestClient(create_app(config, server.endpoint, connect_timeout=30)) as client:
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 900, "ignore_eos": True}}
        events = []
        with client.stream("POST", "/generate_stream", json=body) as response:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                events.append(json.loads(line[len("data:"):]))
                if len(events) == 3:
                    server.stop()  # the engine loop ends and closes its sockets, as a dead process's would
        thread.join(timeout=10)
        assert "token" in events[0]
        assert events[-1] == {"error": "Request failed during generation: the engine process exited",
                              "error_type": "generation"}
        assert client.get("/health").status_code == 503
        r = client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 424
        assert r.json()["error"] == "Request failed during generation: the engine process exited"
