"""Through the router: a request whose own part of a step raises gets TGI's 424 (or an SSE error event) while the
requests batched with it complete, and the server stays healthy."""

from __future__ import annotations

import json
import threading

from loom.worker import sampler as sampler_module
from loom.worker.sampler import _Warper


def _inject_typical_p_fault(monkeypatch) -> None:
    def fail(*_args) -> None:
        raise RuntimeError("injected fault")

    warpers = list(sampler_module._WARPERS)
    warpers[3] = _Warper(warpers[3].value, fail)  # typical_p: only the faulty request uses it
    monkeypatch.setattr(sampler_module, "_WARPERS", tuple(warpers))


FAULTY = {"max_new_tokens": 5, "do_sample": True, "typical_p": 0.5}
ERROR = "Request failed during generation: Server error: injected fault"


def test_the_faulty_request_gets_424_and_the_batch_goes_on(client, monkeypatch):
    _inject_typical_p_fault(monkeypatch)
    events: list[dict] = []
    streaming = threading.Event()

    def stream() -> None:
        body = {"inputs": "A long neighbour", "parameters": {"max_new_tokens": 60, "ignore_eos": True}}
        with client.stream("POST", "/generate_stream", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    streaming.set()

    neighbour = threading.Thread(target=stream)
    neighbour.start()
    assert streaming.wait(30)
    r = client.post("/generate", json={"inputs": "Faulty", "parameters": FAULTY})
    assert r.status_code == 424
    assert r.json() == {"error": ERROR, "error_type": "generation"}
    with client.stream("POST", "/generate_stream", json={"inputs": "Faulty", "parameters": FAULTY}) as s:
        last = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:")][-1]
    assert last == {"error": ERROR, "error_type": "generation"}
    neighbour.join(60)
    assert len(events) == 60 and events[-1]["generated_text"] is not None  # every token, then the end
    assert client.get("/health").status_code == 200  # one request's failure is not the engine's
    metrics = client.get("/metrics").text
    assert 'tgi_request_failure{err="generation"} 2.0' in metrics
