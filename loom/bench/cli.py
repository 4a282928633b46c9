"""`loom bench`: load a TGI- or OpenAI-compatible server and report TTFT, TPOT, ITL, end-to-end latency and
throughput; optionally against a second server in the same invocation, alternating, with ratios. With --image or
--image-file every request also carries images, for vision-language models."""

from __future__ import annotations

import argparse
import asyncio
import json
import urllib.request

from loom.bench.client import BenchPrompt
from loom.bench.images import RequestImages, parse_size
from loom.bench.prompts import dataset_prompts, random_prompts
from loom.bench.report import plot, print_ratios, print_table, workload_lines, write_json
from loom.bench.runner import LoadSpec, run_load


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="loom bench", description=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:3000", help="server to load (default: a local Loom)")
    ap.add_argument("--compare", help="a second server to run the same load against, alternating")
    ap.add_argument("--api", choices=["openai", "chat", "tgi"], default=None,
                    help="openai: streaming /v1/completions; chat: /v1/chat/completions (the prompt as the user's "
                         "message); tgi: /generate_stream (default: openai, or chat when images are sent: "
                         "/v1/completions takes no images, so --api openai with an image flag is refused)")
    ap.add_argument("--model", default=None, help="`model` field for OpenAI servers (default: from /v1/models)")
    ap.add_argument("--tokenizer", help="tokenizer directory or hub id for exact prompt lengths "
                                        "(default: the model directory /info reports, if local)")
    ap.add_argument("--concurrency", type=int, nargs="+", help="closed-loop client counts (a sweep if several)")
    ap.add_argument("--request-rate", type=float, nargs="+", help="open-loop Poisson arrival rates (req/s)")
    ap.add_argument("--num-prompts", type=int, help="requests per load level (default: 4 × concurrency, min 8)")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="prompt length in tokens (default 256; with --dataset: the prompts as they are)")
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--shared-prefix-tokens", type=int, default=0, help="tokens every prompt starts with")
    ap.add_argument("--dataset", help="prompts file: one per line, or JSONL with a `prompt` field")
    ap.add_argument("--no-ignore-eos", action="store_true", help="let generations stop at EOS")
    ap.add_argument("--warmup", type=int, default=1, help="requests sent before measuring")
    ap.add_argument("--api-key")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--plot", help="write a latency-vs-throughput PNG to this file")
    ap.add_argument("--no-progress", action="store_true")
    vision = ap.add_argument_group(
        "images (vision-language models)",
        "Every request carries image(s): chat content parts before the text (--api chat, the default then), or "
        "markdown ![](data:...) before the text (--api tgi). --prompt-tokens counts the text only; the image "
        "tokens come on top (the report's mean_server_prompt_tokens is the server's own count).")
    source = vision.add_mutually_exclusive_group()
    source.add_argument("--image", type=parse_size, metavar="WxH",
                        help="a synthetic RGB PNG of this size (e.g. 448x448), a different one for every image of "
                             "every request (seeded by --seed), so the server's prefix cache cannot reuse one "
                             "image's KV for another request; deterministic between runs")
    source.add_argument("--image-file", action="append", metavar="PATH",
                        help="send this image file, the same for every request (prefix-cache hits possible); "
                             "repeat to cycle through several")
    vision.add_argument("--images-per-request", type=int, metavar="N",
                        help="images in each request (default 1 with --image or --image-file)")
    return ap


def _resolve_images(ap: argparse.ArgumentParser, args) -> RequestImages | None:
    """The request images the flags ask for (None: text only), and the API that can carry them."""
    wanted = args.image is not None or bool(args.image_file)
    if not wanted:
        if args.images_per_request is not None:
            ap.error("--images-per-request needs --image WxH or --image-file PATH")
        args.api = args.api or "openai"
        return None
    if args.images_per_request is not None and args.images_per_request < 1:
        ap.error("--images-per-request must be >= 1")
    if args.api == "openai":
        ap.error("--api openai (/v1/completions) takes no images: use --api chat (the default with images), "
                 "which sends them as image_url content parts, or --api tgi (markdown images)")
    args.api = args.api or "chat"
    return RequestImages(args.images_per_request or 1, size=args.image, files=args.image_file)


def speculation_counters(url: str) -> tuple[float, float] | None:
    """(draft tokens verified, accepted) from a Loom server's /metrics; None for a server without them."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:  # noqa: S310 — benchmark target
            text = resp.read().decode()
    except Exception:  # noqa: BLE001 — a peer without /metrics
        return None
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("loom_spec_decode_draft_tokens", "loom_spec_decode_accepted_tokens"):
            values[name] = float(value)
    if len(values) != 2:
        return None
    return values["loom_spec_decode_draft_tokens"], values["loom_spec_decode_accepted_tokens"]


def acceptance(before: tuple[float, float] | None, after: tuple[float, float] | None) -> dict:
    """The speculation figures of one load level: draft tokens verified and the share accepted."""
    if before is None or after is None or after[0] == before[0]:
        return {"spec_draft_tokens": 0, "spec_acceptance": None}
    drafted = after[0] - before[0]
    return {"spec_draft_tokens": int(drafted), "spec_acceptance": (after[1] - before[1]) / drafted}


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 — user-given benchmark target
        return json.loads(resp.read())


def _tokenizer(args, url: str):
    from transformers import AutoTokenizer

    name = args.tokenizer
    if name is None:
        name = _get_json(f"{url}/info")["model_id"]
        from loom.demo import local_model_dir

        local = local_model_dir(name)
        if local is not None:
            name = str(local)
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # noqa: BLE001
        raise SystemExit(f"could not load tokenizer {name!r} ({err}); pass --tokenizer DIR") from err


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    images = _resolve_images(ap, args)
    if not args.concurrency and not args.request_rate:
        args.concurrency = [1]
    urls = [args.url.rstrip("/")] + ([args.compare.rstrip("/")] if args.compare else [])
    tokenizer = _tokenizer(args, urls[0])
    models = [args.model or (_get_json(f"{u}/v1/models")["data"][0]["id"] if args.api != "tgi" else "")
              for u in urls]
    levels = [("c", c) for c in args.concurrency or []] + [("r", r) for r in args.request_rate or []]
    results: list[list[dict]] = [[] for _ in urls]
    for i, (kind, value) in enumerate(levels):
        n = args.num_prompts or (max(4 * value, 8) if kind == "c" else 32)
        if args.dataset:
            prompts = dataset_prompts(args.dataset, tokenizer, n, args.prompt_tokens, args.seed + i)
        else:
            prompts = random_prompts(tokenizer, n, args.prompt_tokens or 256, args.shared_prefix_tokens,
                                     args.seed + i)
        warmup_prompts = prompts[: args.warmup]
        if images is not None:  # built (and encoded, once each) before the level's clock starts
            warmup_prompts = [BenchPrompt(p, urls) for p, urls in
                              zip(warmup_prompts, images.for_requests(len(warmup_prompts), args.seed + i, True))]
            prompts = [BenchPrompt(p, urls) for p, urls in zip(prompts, images.for_requests(n, args.seed + i))]
        for k, url in enumerate(urls):  # alternate servers at each level so drift affects both alike
            spec = LoadSpec(url, args.api, models[k], args.output_tokens, not args.no_ignore_eos,
                            concurrency=value if kind == "c" else None,
                            request_rate=value if kind == "r" else None, api_key=args.api_key, seed=args.seed)
            if args.warmup:
                warm = LoadSpec(url, args.api, models[k], 4, True, concurrency=1, api_key=args.api_key)
                asyncio.run(run_load(warm, warmup_prompts, show_progress=False))
            before = speculation_counters(url)
            summary = asyncio.run(run_load(spec, prompts, not args.no_progress)).summary()
            summary.update(acceptance(before, speculation_counters(url)))
            results[k].append(summary)
    flat = [s for runs in results for s in runs]
    meta = {"prompt_tokens": args.prompt_tokens if args.dataset else args.prompt_tokens or 256,
            "output_tokens": args.output_tokens, "shared_prefix_tokens": args.shared_prefix_tokens, "api": args.api,
            "images": images.settings() if images is not None else None}
    if images is not None:
        meta["prompt_tokens_note"] = ("prompt_tokens counts the text only (the bench's tokenizer); the images' "
                                      "tokens come on top: runs[].mean_server_prompt_tokens is the server's count")
    print_table(flat, workload_lines(meta, images.describe() if images is not None else None))
    if args.compare:
        print_ratios(results[0], results[1])
    if args.json:
        write_json(args.json, flat, meta)
    if args.plot:
        plot(args.plot, {f"{i}: {u}": runs for i, (u, runs) in enumerate(zip(urls, results))})
    return 0
