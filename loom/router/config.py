"""The router's settings (TGI's router flags). Frozen: written once by the launcher, read by every handler."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RouterConfig:
    model_id: str  # as the user named it (hub id or path); reported by /info and /v1/models
    model_dir: str  # resolved local directory (tokenizer, configs)
    hostname: str = "0.0.0.0"
    port: int = 3000
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int | None = None  # None → max_total_tokens - 1
    max_total_tokens: int | None = None  # None → the engine's limit
    max_client_batch_size: int = 4
    validation_workers: int = 2
    api_key: str | None = None
    cors_allow_origin: tuple[str, ...] = field(default_factory=tuple)
    payload_limit: int = 2_000_000
    max_image_fetch_size: int = 1_073_741_824  # bytes of one image input, fetched or from a data URL (images.py)
    enable_prefill_logprobs: bool = False
    tokenizer_config_path: str | None = None
    disable_grammar_support: bool = False
    json_output: bool = False
    model_pipeline_tag: str | None = None
    model_sha: str | None = None
