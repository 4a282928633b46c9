"""OpenTelemetry: a launched server exports its spans to an OTLP receiver this test runs in-process."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import requests
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from .conftest import free_port


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.spans: list[tuple[str, object]] = []  # (service.name, span)
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 — gRPC method name
        with self.lock:
            for rs in request.resource_spans:
                service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
                for ss in rs.scope_spans:
                    self.spans.extend((service, s) for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_request_spans_arrive_with_the_clients_parent(launch):
    receiver = Receiver()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, grpc_server)
    port = free_port()
    grpc_server.add_insecure_port(f"127.0.0.1:{port}")
    grpc_server.start()
    try:
        server = launch("--otlp-endpoint", f"http://127.0.0.1:{port}", "--otlp-service-name", "loom-test.router")
        trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        r = requests.post(f"{server.url}/generate", json={"inputs": "Trace me", "parameters": {"max_new_tokens": 4}},
                          headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
        assert r.status_code == 200
        deadline = time.monotonic() + 30
        names = set()
        while time.monotonic() < deadline and not {"generate", "inference", "engine_request"} <= names:
            time.sleep(0.3)
            with receiver.lock:
                names = {s.name for _, s in receiver.spans if s.trace_id.hex() == trace_id}
        with receiver.lock:
            spans = {s.name: (svc, s) for svc, s in receiver.spans if s.trace_id.hex() == trace_id}
    finally:
        grpc_server.stop(0)
    assert {"generate", "validation", "queue", "inference", "engine_request"} <= set(spans), set(spans)
    service, root = spans["generate"]
    assert service == "loom-test.router"
    assert root.parent_span_id.hex() == parent_id  # the client's traceparent is honoured
    for child in ("validation", "queue", "inference"):
        assert spans[child][1].parent_span_id == root.span_id
        assert spans[child][1].end_time_unix_nano >= spans[child][1].start_time_unix_nano
    engine_service, engine_span = spans["engine_request"]
    assert engine_service == "loom-test.server"
    assert engine_span.parent_span_id == root.span_id  # engine-side span linked to the router's
    assert root.end_time_unix_nano - root.start_time_unix_nano > 0
    attrs = {a.key for a in root.attributes}
    assert {"total_time", "validation_time", "queue_time", "inference_time", "time_per_token"} <= attrs
