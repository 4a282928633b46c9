"""Command line: `loom launch` (the server), and the internal `engine` / `router` process entry points."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loom.run_config import RunConfig

USAGE = """usage: loom <command> [options]

commands:
  launch     serve a model with TGI's HTTP API (same flags as text-generation-launcher); `loom launch --help`
  bench      load-test a TGI/OpenAI-compatible server (TTFT, TPOT, throughput); `loom bench --help`
  shard      run one tensor-parallel rank > 0 that joins a server's engine (multi-node); `loom shard --help`
  engine     (internal) run the engine process (rank 0) of a launched server
  router     (internal) run the HTTP router process of a launched server
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "launch":
        from loom.launcher import launch

        return launch(rest)
    if command == "bench":
        from loom.bench.cli import main as bench_main

        return bench_main(rest)
    if command == "shard":
        return run_shard(rest)
    if command in ("engine", "router"):
        ap = argparse.ArgumentParser(prog=f"loom {command}")
        ap.add_argument("--config", required=True, help="run config written by the launcher")
        from loom.run_config import RunConfigError, load

        try:
            config = load(ap.parse_args(rest).config)
        except RunConfigError as err:
            raise SystemExit(f"error: {err}") from err
        return run_engine(config) if command == "engine" else run_router(config)
    print(f"loom: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def launcher_main() -> int:
    """`text-generation-launcher`: TGI's launcher name, same flags as `loom launch`."""
    from loom.launcher import launch

    return launch(sys.argv[1:])


def run_engine(config: RunConfig) -> int:
    import msgspec.structs

    from loom import tracing
    from loom.config import EngineConfig
    from loom.engine.core import EngineCore
    from loom.engine.server import serve
    from loom.logs import setup_logging

    setup_logging(config.json_output)
    tracing.setup(config.otlp_endpoint, config.otlp_service_name.removesuffix(".router") + ".server")
    world = config.num_shard
    if world > 1:
        from loom.distributed.comm import DistributedConfig, init_distributed

        init_distributed(DistributedConfig(0, world, config.master_addr, config.master_port, 0, config.local_shards))
    try:
        engine = EngineCore(config.model_dir, config.dtype, EngineConfig(**msgspec.structs.asdict(config.engine)),
                            quantize=config.quantize)
        serve(engine, config.endpoint)
    finally:
        tracing.shutdown()
        if world > 1:
            _stop_shards()
    return 0


def _stop_shards() -> None:
    """Rank 0 leaving: the other ranks stop too (if the group still works: a dead peer is why we may be here)."""
    from loom.distributed.comm import RankFailure, destroy_distributed
    from loom.worker.tp_worker import stop_workers

    try:
        stop_workers()
    except RankFailure:
        pass
    destroy_distributed()


def run_shard(argv: list[str]) -> int:
    """A tensor-parallel rank > 0: joins rank 0's group (torchrun's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    LOCAL_RANK environment variables) and runs its shard of whatever model rank 0 loads."""
    import os

    from loom.distributed.comm import DistributedConfig
    from loom.logs import setup_logging
    from loom.worker.tp_worker import serve_rank

    ap = argparse.ArgumentParser(prog="loom shard", description=run_shard.__doc__)
    ap.add_argument("--model-id", default=None, help="this host's copy of the model: a local directory or a Hub id "
                    "(default: rank 0's path, which must then exist here too)")
    ap.add_argument("--revision", default=None, help="Hub revision of --model-id")
    ap.add_argument("--json-output", action="store_true", help="log one JSON object per line")
    args = ap.parse_args(argv)
    setup_logging(args.json_output or os.environ.get("JSON_OUTPUT", "").lower() in ("1", "true"))
    config = DistributedConfig.from_env()
    if config.rank == 0:
        raise SystemExit("error: `loom shard` runs ranks > 0; rank 0 is the engine that `loom launch` starts")
    model_dir = None
    if args.model_id is not None:
        from loom.launcher import resolve_model

        model_dir = str(resolve_model(args.model_id, args.revision)[1])
    serve_rank(config, model_dir=model_dir)
    return 0


def run_router(config: RunConfig) -> int:
    import logging

    import msgspec.structs

    from loom import tracing
    from loom.logs import setup_logging
    from loom.router.app import create_app
    from loom.router.config import RouterConfig
    from loom.router.server import serve

    setup_logging(config.json_output)
    tracing.setup(config.otlp_endpoint, config.otlp_service_name)
    router_config = RouterConfig(**msgspec.structs.asdict(config.router))
    app = create_app(router_config, config.endpoint)
    _start_prometheus_listener(app, router_config.hostname, config.prometheus_port)
    try:
        serve(app, router_config.hostname, router_config.port, config.graceful_termination_timeout)
    finally:
        tracing.shutdown()
    logging.getLogger("loom.router").info("router stopped")
    return 0


def _start_prometheus_listener(app, host: str, port: int) -> None:
    """TGI also serves the metrics on a separate port; a busy port only costs that listener (warned)."""
    import logging
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CONTENT_TYPE_LATEST

    from loom.router.metrics import render

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 — http.server's naming
            body = render(app.state.loom.metrics.registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    def serve_when_ready() -> None:
        while getattr(app.state, "loom", None) is None:
            time.sleep(0.1)
        try:
            ThreadingHTTPServer((host, port), Handler).serve_forever()
        except OSError as err:
            logging.getLogger("loom.router").warning("prometheus listener on port %d not started: %s", port, err)

    threading.Thread(target=serve_when_ready, name="prometheus", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
