"""`loom launch`: resolve the model, start the engine and router processes, wait until they serve, supervise them,
and tear everything down in order on a signal or when either dies.

    launcher ──spawn──▶ engine process  (loom.cli engine --config run.json)
             ──spawn──▶ router process  (loom.cli router --config run.json)
Both children read one frozen run config the launcher writes. The engine endpoint is an ipc socket in a
directory unique to this launcher, so several servers can run on one machine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loom.config import EngineConfig
from loom.router.config import RouterConfig

logger = logging.getLogger("loom.launcher")
READY_POLL_SECONDS = 0.25
SHUTDOWN_SLACK_SECONDS = 10


def resolve_model(model_id: str | None, revision: str | None) -> tuple[str, Path]:
    """(name to report, local directory). A local directory is used as is; anything else is a hub id."""
    if model_id is None:
        from loom.demo import DEMO_MODEL_ID, ensure_demo_model

        return DEMO_MODEL_ID, ensure_demo_model()
    path = Path(model_id).expanduser()
    if path.is_dir():
        return model_id, path.resolve()
    return model_id, download(model_id, revision)


def download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
    logger.info("resolving %s from the Hugging Face Hub", repo_id)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as err:
        raise SystemExit(
            f"error: could not get model {repo_id!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Without network access, pass a local model directory as --model-id."
        ) from err


def build_run_config(args: dict[str, Any], model_id: str, model_dir: Path, run_dir: Path) -> dict[str, Any]:
    engine = EngineConfig(
        max_batch_prefill_tokens=args["max_batch_prefill_tokens"] or 4096,
        max_batch_total_tokens=args["max_batch_total_tokens"],
        max_batch_size=args["max_batch_size"] or 256,
        max_total_tokens=args["max_total_tokens"],
    )
    router = RouterConfig(
        model_id=model_id, model_dir=str(model_dir), hostname=args["hostname"], port=args["port"],
        max_concurrent_requests=args["max_concurrent_requests"], max_best_of=args["max_best_of"],
        max_stop_sequences=args["max_stop_sequences"], max_top_n_tokens=args["max_top_n_tokens"],
        max_input_tokens=args["max_input_tokens"], max_total_tokens=args["max_total_tokens"],
        max_client_batch_size=args["max_client_batch_size"], validation_workers=args["validation_workers"],
        api_key=args["api_key"], cors_allow_origin=tuple(args["cors_allow_origin"] or ()),
        payload_limit=args["payload_limit"], enable_prefill_logprobs=bool(args["enable_prefill_logprobs"]),
        tokenizer_config_path=args["tokenizer_config_path"],
        disable_grammar_support=bool(args["disable_grammar_support"]), json_output=bool(args["json_output"]),
    )
    return {
        "model_dir": str(model_dir), "dtype": args["dtype"] or "auto", "endpoint": f"ipc://{run_dir}/engine",
        "engine": asdict(engine), "router": asdict(router), "prometheus_port": args["prometheus_port"],
        "graceful_termination_timeout": args["graceful_termination_timeout"], "json_output": bool(args["json_output"]),
        "otlp_endpoint": args["otlp_endpoint"], "otlp_service_name": args["otlp_service_name"],
    }


class Launcher:
    def __init__(self, args: dict[str, Any]):
        self.args = args
        self.children: dict[str, subprocess.Popen] = {}
        self.stopping = False
        self.run_dir = Path(tempfile.mkdtemp(prefix="loom-"))

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            model_id, model_dir = resolve_model(self.args["model_id"], self.args["revision"])
            config = build_run_config(self.args, model_id, model_dir, self.run_dir)
            config_path = self.run_dir / "run.json"
            config_path.write_text(json.dumps(config, indent=2))
            self._spawn("engine", config_path)
            self._spawn("router", config_path)
            return self._supervise(f"http://127.0.0.1:{self.args['port']}/health")
        finally:
            self._shutdown()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _spawn(self, role: str, config_path: Path) -> None:
        cmd = [sys.executable, "-m", "loom.cli", role, "--config", str(config_path)]
        # Own process group: a Ctrl-C in the terminal reaches the launcher only, which then stops children in order.
        self.children[role] = subprocess.Popen(cmd, start_new_session=True)
        logger.info("started %s (pid %d)", role, self.children[role].pid)

    def _supervise(self, health_url: str) -> int:
        ready = False
        while not self.stopping:
            for role, proc in self.children.items():
                code = proc.poll()
                if code is not None:
                    logger.error("%s exited unexpectedly with code %s; shutting down", role, code)
                    return 1
            if not ready and _healthy(health_url):
                ready = True
                logger.info("Loom is ready on http://%s:%d", self.args["hostname"], self.args["port"])
            time.sleep(READY_POLL_SECONDS)
        return 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        self.stopping = True

    def _shutdown(self) -> None:
        """Router first (it drains: in-flight requests finish within the graceful timeout), then the engine."""
        timeout = self.args["graceful_termination_timeout"]
        for role in ("router", "engine"):
            proc = self.children.get(role)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                # the router may use the whole timeout to drain, plus a few seconds to close connections
                proc.wait(timeout + SHUTDOWN_SLACK_SECONDS)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not exit within %ss; killing it", role, timeout)
                proc.kill()
                proc.wait()
            logger.info("%s exited with code %s", role, proc.returncode)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def launch(argv: list[str] | None = None) -> int:
    from loom.launcher_args import resolve
    from loom.logs import setup_logging

    args = resolve(argv)
    setup_logging(bool(args["json_output"]))
    if args["huggingface_hub_cache"]:
        os.environ["HF_HUB_CACHE"] = args["huggingface_hub_cache"]
    return Launcher(args).run()
