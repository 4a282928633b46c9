"""The run config: what `loom launch` tells its engine and router processes, written once as `run.json` in the
launcher's run directory and read back by `loom engine --config` / `loom router --config`.

One frozen, typed struct: the launcher builds a `RunConfig` from its flags (launcher.build_run_config) and `dump`s
it; each child `load`s it, and a missing, unknown or mistyped key is an error naming the key. Imports only the
standard library and msgspec, so that any process (the router included) can read it without loading the model stack.

The two sections mirror the settings types their process builds from them: `engine` → loom.config.EngineConfig,
`router` → loom.router.config.RouterConfig (same field names and defaults; tests/unit/test_run_config.py checks).
"""

from __future__ import annotations

from pathlib import Path

import msgspec


class RunConfigError(ValueError):
    """run.json is unreadable, or does not match RunConfig (the message names the key)."""


class EngineSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The engine's scheduling and memory limits that the launcher's flags set (the rest: EngineConfig's defaults)."""

    max_batch_prefill_tokens: int | None = None  # tokens per engine step; None → inferred from this machine's speed
    max_batch_total_tokens: int | None = None  # KV cache capacity in tokens; None → from available memory
    max_batch_size: int = 256  # most sequences in one engine step
    max_total_tokens: int | None = None  # longest request (prompt + generated); None → the model's context
    speculate: int = 0  # most draft tokens verified per request and step; 0 = no speculative decoding
    draft_model: str | None = None  # local directory of the draft model that proposes the drafts
    watermark_gamma: float = 0.5  # green-list share of `watermark: true` requests
    watermark_delta: float = 2.0  # green-list logit bias
    rope_scaling: str | None = None  # RoPE scaling override: linear or dynamic
    rope_factor: float | None = None  # its factor (alone: linear)
    trust_remote_code: bool = False  # a checkpoint's own modeling code may run
    kv_cache_dtype: str | None = None  # fp8_e4m3fn or fp8_e5m2; None: the model's dtype
    lora_adapters: tuple[tuple[str, str], ...] = ()  # (adapter id, local directory)


class RouterSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The router's settings (TGI's router flags), as RouterConfig takes them."""

    model_id: str  # as the user named it (hub id or path); reported by /info and /v1/models
    model_dir: str  # resolved local model directory (tokenizer, configs)
    hostname: str = "0.0.0.0"  # address the HTTP server listens on
    port: int = 3000  # HTTP port
    max_concurrent_requests: int = 128  # in-flight requests before new ones get 429
    max_best_of: int = 2  # largest `best_of` a request may ask
    max_stop_sequences: int = 4  # most stop sequences per request
    max_top_n_tokens: int = 5  # largest `top_n_tokens` a request may ask
    max_input_tokens: int | None = None  # longest prompt; None → max_total_tokens - 1
    max_total_tokens: int | None = None  # longest prompt + generation; None → the engine's limit
    max_client_batch_size: int = 4  # most prompts in one /v1/completions request
    validation_workers: int = 2  # reported by /info
    api_key: str | None = None  # when set, generation routes require `Authorization: Bearer <key>`
    cors_allow_origin: tuple[str, ...] = ()  # allowed CORS origins; empty → any
    payload_limit: int = 2_000_000  # largest request body in bytes
    max_image_fetch_size: int = 1_073_741_824  # largest image input in bytes (fetched or a data URL's)
    enable_prefill_logprobs: bool = False  # allow `decoder_input_details` (prompt logprobs)
    tokenizer_config_path: str | None = None  # tokenizer_config.json to take the chat template from
    disable_grammar_support: bool = False  # refuse `grammar` / `response_format` requests
    json_output: bool = False  # log one JSON object per line


class RunConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the engine (rank 0) and router processes of one `loom launch` read."""

    model_dir: str  # resolved local model directory the engine loads
    endpoint: str  # the engine's ipc:// address, unique to this launcher; the router connects to it
    router: RouterSettings  # the router process's settings
    engine: EngineSettings = msgspec.field(default_factory=EngineSettings)  # the engine process's limits
    dtype: str = "auto"  # float32, bfloat16, float16, or auto (the checkpoint's)
    quantize: str | None = None  # --quantize method or expected checkpoint format; None → as the checkpoint is
    prometheus_port: int = 9000  # port of the router's separate /metrics listener
    graceful_termination_timeout: int = 90  # seconds the router may drain in-flight requests after SIGTERM
    json_output: bool = False  # both processes log one JSON object per line
    otlp_endpoint: str | None = None  # OTLP/gRPC trace collector; None → tracing off
    otlp_service_name: str = "text-generation-inference.router"  # router's service.name (engine: ….server)
    num_shard: int = 1  # tensor-parallel world size (rank 0 is the engine)
    local_shards: int = 1  # ranks started on this host (0..local_shards-1); the others join from other hosts
    master_addr: str = "localhost"  # torch.distributed master address (num_shard > 1)
    master_port: int = 29500  # torch.distributed master port (num_shard > 1)


def encode(config: RunConfig) -> bytes:
    """The run file's bytes: indented JSON, every field written (defaults included)."""
    return msgspec.json.format(msgspec.json.encode(config), indent=2)


def decode(data: bytes | str, source: str = "run config") -> RunConfig:
    try:
        return msgspec.json.decode(data, type=RunConfig)
    except msgspec.DecodeError as err:  # ValidationError included: "Object missing required field `x` - at `$.router`"
        raise RunConfigError(f"{source}: {err}") from err


def dump(config: RunConfig, path: str | Path) -> None:
    Path(path).write_bytes(encode(config))


def load(path: str | Path) -> RunConfig:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise RunConfigError(f"cannot read run config {path}: {err}") from err
    return decode(data, f"run config {path}")
