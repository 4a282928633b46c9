"""`loom launch`: resolve the model, start the engine and router processes, wait until they serve, supervise them,
and tear everything down in order on a signal or when any of them dies.

    launcher ──spawn──▶ engine process  (loom.cli engine --config run.json)       tensor-parallel rank 0
             ──spawn──▶ shard processes (loom.cli shard, RANK=1..N-1 in the env)  only with --num-shard N > 1
             ──spawn──▶ router process  (loom.cli router --config run.json)
The engine and router read one frozen run config the launcher writes (run.json, a loom.run_config.RunConfig);
shards get torchrun's environment variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK) and follow
rank 0. The engine endpoint is an ipc socket in a directory unique to this launcher, so several servers can run on
one machine.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from loom import run_config
from loom.config import ModelConfig
from loom.run_config import EngineSettings, RouterSettings, RunConfig

logger = logging.getLogger("loom.launcher")
READY_POLL_SECONDS = 0.25
SHUTDOWN_SLACK_SECONDS = 10
FAILURE_GRACE_SECONDS = 5  # after a child died: the others get this long to exit on SIGTERM, then SIGKILL


def resolve_model(model_id: str | None, revision: str | None,
                  weights_override: str | None = None) -> tuple[str, Path]:
    """(name to report, local directory). A local directory is used as is; anything else is a hub id.
    `weights_override` (TGI's --weights-cache-override): the directory the files are in, whatever the id."""
    if weights_override is not None:
        override = Path(weights_override).expanduser()
        if not override.exists():
            raise SystemExit(f"error: --weights-cache-override {weights_override}: no such file or directory")
        from loom.models.gguf_checkpoint import GGUFError, model_directory

        try:
            return model_id or str(override), model_directory(override.resolve())
        except GGUFError as err:
            raise SystemExit(f"error: {err}") from err
    if model_id is None:
        from loom.demo import default_model

        return default_model()
    path = Path(model_id).expanduser()
    if path.exists():  # a model directory, a GGUF file, or a directory holding one GGUF file
        from loom.models.gguf_checkpoint import GGUFError, model_directory

        try:
            return model_id, model_directory(path.resolve())
        except GGUFError as err:
            raise SystemExit(f"error: {err}") from err
    return model_id, download(model_id, revision)


def base_of_speculator(model_dir: Path) -> Path:
    """The directory of the model that serves: `model_dir`, or for a Medusa / MLP-speculator directory its base
    model (fetched from the hub when it is a hub id not cached yet), whose config and tokenizer the checks and
    the router read. The engine gets the speculator directory and finds the base the same way."""
    from loom.config import base_model_path, read_speculator

    spec = read_speculator(model_dir) if model_dir.is_dir() else None
    if spec is None:
        return model_dir
    try:
        return base_model_path(spec)
    except ValueError:
        name = spec.config.get("base_model_name_or_path")
        if not name:
            raise SystemExit(f"error: {model_dir}/config.json: a speculator needs `base_model_name_or_path`")
        return download(str(name), None)


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


def resolve_lora_adapters(spec: str | None) -> tuple[tuple[str, str], ...]:
    """TGI's --lora-adapters: `id` (a hub id or local directory, which is also the id requests use) or
    `id=path`, comma-separated; each resolved to a local directory."""
    if not spec:
        return ()
    out = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, path = item.partition("=")
        local = Path(path or name).expanduser()
        out.append((name, str(local.resolve() if local.exists() else download(path or name, None))))
    return tuple(out)


def build_run_config(args: dict[str, Any], model_id: str, model_dir: Path, run_dir: Path,
                     tokenizer_dir: Path | None = None, draft_dir: Path | None = None) -> RunConfig:
    """The run config the engine and router read, from the resolved launcher flags (launcher_args.resolve).
    `tokenizer_dir`: where the router reads the tokenizer when it is not `model_dir` (a speculator's base)."""
    engine = EngineSettings(
        max_batch_prefill_tokens=args["max_batch_prefill_tokens"],
        max_batch_total_tokens=args["max_batch_total_tokens"],
        max_batch_size=args["max_batch_size"] or 256,
        max_total_tokens=args["max_total_tokens"],
        speculate=args["speculate"] or 0,
        draft_model=str(draft_dir) if draft_dir is not None else None,
        watermark_gamma=args["watermark_gamma"] if args["watermark_gamma"] is not None else 0.5,
        watermark_delta=args["watermark_delta"] if args["watermark_delta"] is not None else 2.0,
        rope_scaling=args["rope_scaling"], rope_factor=args["rope_factor"],
        trust_remote_code=bool(args["trust_remote_code"]),
        kv_cache_dtype=args["kv_cache_dtype"],
        lora_adapters=resolve_lora_adapters(args["lora_adapters"]),
    )
    router = RouterSettings(
        model_id=model_id, model_dir=str(tokenizer_dir or model_dir), hostname=args["hostname"], port=args["port"],
        max_concurrent_requests=args["max_concurrent_requests"], max_best_of=args["max_best_of"],
        max_stop_sequences=args["max_stop_sequences"], max_top_n_tokens=args["max_top_n_tokens"],
        max_input_tokens=args["max_input_tokens"], max_total_tokens=args["max_total_tokens"],
        max_client_batch_size=args["max_client_batch_size"], validation_workers=args["validation_workers"],
        api_key=args["api_key"], cors_allow_origin=tuple(args["cors_allow_origin"] or ()),
        payload_limit=args["payload_limit"], max_image_fetch_size=args["max_image_fetch_size"],
        enable_prefill_logprobs=bool(args["enable_prefill_logprobs"]),
        tokenizer_config_path=args["tokenizer_config_path"],
        disable_grammar_support=bool(args["disable_grammar_support"]), json_output=bool(args["json_output"]),
    )
    return RunConfig(
        model_dir=str(model_dir), endpoint=f"ipc://{run_dir}/engine", router=router, engine=engine,
        dtype=args["dtype"] or "auto", quantize=args["quantize"], prometheus_port=args["prometheus_port"],
        graceful_termination_timeout=args["graceful_termination_timeout"], json_output=bool(args["json_output"]),
        otlp_endpoint=args["otlp_endpoint"], otlp_service_name=args["otlp_service_name"],
        num_shard=args["num_shard"], local_shards=args["local_shards"], master_addr=args["master_addr"],
        master_port=args["master_port"],
    )


def check_shards(args: dict[str, Any], model_dir: Path) -> None:
    """Refuse a shard count the model cannot be split into before starting any process."""
    from loom.models.registry import check_tensor_parallel

    if args["num_shard"] == 1:
        return
    try:
        check_tensor_parallel(ModelConfig.from_dir(model_dir), args["num_shard"])
    except ValueError as err:
        raise SystemExit(f"error: --num-shard {args['num_shard']}: {err}") from err


def check_quantize(args: dict[str, Any], model_dir: Path) -> None:
    """Refuse a --quantize value that does not apply to the checkpoint before starting any process."""
    if args.get("quantize") is None:
        return
    try:
        ModelConfig.from_dir(model_dir, quantize=args["quantize"])
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Launcher:
    def __init__(self, args: dict[str, Any]):
        self.args = args
        self.children: dict[str, subprocess.Popen] = {}  # in start order: engine rank(s), then the router
        self.stopping = False
        self.failed = False
        self.run_dir = Path(tempfile.mkdtemp(prefix="loom-"))

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            model_id, model_dir = resolve_model(self.args["model_id"], self.args["revision"],
                                                self.args["weights_cache_override"])
            base_dir = base_of_speculator(model_dir)
            check_quantize(self.args, base_dir)
            check_shards(self.args, base_dir)
            draft_dir = resolve_model(self.args["draft_model_id"], None)[1] if self.args["draft_model_id"] else None
            config = build_run_config(self.args, model_id, model_dir, self.run_dir, base_dir, draft_dir)
            config_path = self.run_dir / "run.json"
            run_config.dump(config, config_path)
            self._spawn_engine(config_path)
            # TGI's launcher sets "{num_shard}-{gpu name}"; on CPU the device is "cpu". An explicit COMPUTE_TYPE wins.
            compute = {"COMPUTE_TYPE": os.environ.get("COMPUTE_TYPE", f"{self.args['num_shard'] or 1}-cpu")}
            self._spawn("router", ["router", "--config", str(config_path)], compute)
            return self._supervise(f"http://127.0.0.1:{self.args['port']}/health")
        finally:
            self._shutdown()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _spawn_engine(self, config_path: Path) -> None:
        """Rank 0 (the engine), then this host's other ranks as `loom shard` processes."""
        world, local = self.args["num_shard"], self.args["local_shards"]
        kernels = {"LOOM_DISABLE_CPU_KERNELS": "1"} if self.args["disable_custom_kernels"] else {}
        if world == 1:
            self._spawn("engine", ["engine", "--config", str(config_path)], kernels)
            return
        self._spawn("engine rank 0", ["engine", "--config", str(config_path)], kernels)
        for rank in range(1, local):
            env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": str(local), "MASTER_ADDR": self.args["master_addr"],
                   "MASTER_PORT": str(self.args["master_port"]), **kernels}
            shard_args = ["shard", "--json-output"] if self.args["json_output"] else ["shard"]
            self._spawn(f"engine rank {rank}", shard_args, env)
        if local < world:
            missing = f"rank {local}" if local == world - 1 else f"ranks {local}..{world - 1}"
            logger.info("waiting for %s to join at %s:%d (`loom shard` on their hosts)", missing,
                        self.args["master_addr"], self.args["master_port"])

    def _spawn(self, role: str, args: list[str], env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "loom.cli", *args]
        # Own process group: a Ctrl-C in the terminal reaches the launcher only, which then stops children in order.
        self.children[role] = subprocess.Popen(cmd, start_new_session=True,
                                               env={**os.environ, **env} if env else None)
        logger.info("started %s (pid %d)", role, self.children[role].pid)

    def _supervise(self, health_url: str) -> int:
        ready = False
        while not self.stopping:
            dead = [(role, proc.returncode) for role, proc in self.children.items() if proc.poll() is not None]
            if dead:
                for role, code in dead:
                    logger.error("%s exited unexpectedly (%s); shutting down", role, describe_exit(code))
                self.failed = True
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
        """Router first (it drains: in-flight requests finish within the graceful timeout), then the engine (rank 0,
        which tells the other ranks to stop), then any other rank still running. After a child died there is nothing
        to drain: every child gets SIGTERM at once and a few seconds."""
        if self.failed:
            self._stop(list(self.children), FAILURE_GRACE_SECONDS)
            return
        timeout = self.args["graceful_termination_timeout"]
        ranks = [role for role in self.children if role != "router"]
        # the router may use the whole timeout to drain, plus a few seconds to close connections
        self._stop(["router"], timeout + SHUTDOWN_SLACK_SECONDS)
        self._stop(ranks[:1], timeout + SHUTDOWN_SLACK_SECONDS)
        self._stop(ranks[1:], SHUTDOWN_SLACK_SECONDS, signal_first=False)

    def _stop(self, roles: list[str], timeout: float, signal_first: bool = True) -> None:
        """Stop these children together: SIGTERM (or, for ranks that exit by themselves, a wait first), then
        SIGKILL for any still running at the deadline."""
        procs = {r: self.children[r] for r in roles if r in self.children}
        if signal_first:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for role, proc in procs.items():
            if not _wait(proc, deadline) and not signal_first:
                proc.send_signal(signal.SIGTERM)  # a rank that did not follow rank 0's shutdown
                _wait(proc, time.monotonic() + 1)
            if proc.poll() is None:
                logger.warning("%s did not exit within %ss; killing it", role, timeout)
                proc.kill()
                proc.wait()
            logger.info("%s exited with code %s", role, proc.returncode)


def _wait(proc: subprocess.Popen, deadline: float) -> bool:
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
        return True
    except subprocess.TimeoutExpired:
        return False


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
