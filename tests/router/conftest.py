"""Router tests: a real engine (tiny Llama, fp32) serving on an ipc socket from a thread of the test process, and
the FastAPI app driven through Starlette's TestClient (which runs the app's lifespan: it connects to the engine)."""

from __future__ import annotations

import threading
import uuid

import pytest
from fastapi.testclient import TestClient

from loom.config import EngineConfig
from loom.engine.core import EngineCore
from loom.engine.server import EngineServer
from loom.router.app import create_app
from loom.router.config import RouterConfig


@pytest.fixture(scope="session")
def engine_server(llama_dir, tmp_path_factory):
    engine = EngineCore(llama_dir, "float32", EngineConfig(max_batch_total_tokens=4096, max_total_tokens=512))
    endpoint = f"ipc://{tmp_path_factory.mktemp('ipc')}/loom-{uuid.uuid4().hex[:8]}"
    server = EngineServer(engine, endpoint)
    thread = threading.Thread(target=server.run, name="engine", daemon=True)
    thread.start()
    yield server
    server.stop()
    thread.join(timeout=5)


@pytest.fixture()
def make_client(engine_server, llama_dir):
    """A TestClient for a router with the given RouterConfig overrides (one engine shared by all)."""
    clients = []

    def make(**overrides) -> TestClient:
        config = RouterConfig(model_id="loom-test/tiny-llama", model_dir=str(llama_dir), **overrides)
        client = TestClient(create_app(config, engine_server.endpoint, connect_timeout=30))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)
    engine_server.engine.check_integrity()


@pytest.fixture()
def client(make_client) -> TestClient:
    return make_client()
