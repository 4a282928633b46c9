"""Soak: a Loom server under mixed load for a given time, sampled every interval — RSS of every process, KV blocks in
use, request latency percentiles, errors — then checked when the load stops: every block back, the integrity
check passed, RSS flat after warm-up, p99 stable, no 5xx.

    python benchmarks/soak.py --model-id /work/bench-models/llama-360m --minutes 30
    python benchmarks/soak.py --minutes 2 --interval 10           # a quick look, the default model

The load (closed loop, `--concurrency` clients): TGI /generate and /generate_stream, OpenAI chat (streamed or not)
and completions, JSON-schema grammars, stop sequences, tool calls, streams cancelled after a few tokens, and
invalid requests (422 expected); prompt lengths and output lengths drawn at random. Writes `soak.json` (every
sample and the verdict) and `soak.png` (RSS, KV blocks, latency over time) to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over a lazy dog while seven bright stars shine above quiet hills and rivers "
         "carry cold water past old towns where people talk about weather markets music and distant lands").split()


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


# ------------------------------------------------------------------------------------------------ processes


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def process_tree(launcher: int) -> dict[str, int]:
    """role → pid: the launcher, and its children named by their command line (engine rank(s), router)."""
    tree = {"launcher": launcher}
    for pid in children(launcher):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        role = "router" if "router" in cmd else "engine" if "engine" in cmd or "shard" in cmd else f"child {pid}"
        if role in tree:
            role = f"{role} {pid}"
        tree[role] = pid
    return tree


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def process_jiffies(pids: list[int]) -> int:
    """utime + stime of the processes (their threads included)."""
    out = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out += int(stat[11]) + int(stat[12])
        except OSError:
            pass
    return out


class OtherLoad:
    """The share of the machine's CPU that neither the server nor this script used in each interval: other
    programs running beside the soak make its latencies noisy, and this says when."""

    def __init__(self, pids: list[int]):
        self.pids = pids + [os.getpid()]
        self._last = (*cpu_jiffies(), process_jiffies(self.pids))

    def share(self) -> float:
        busy, total = cpu_jiffies()
        ours = process_jiffies(self.pids)
        b0, t0, o0 = self._last
        self._last = (busy, total, ours)
        return max(0.0, (busy - b0) - (ours - o0)) / max(1, total - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ load


@dataclass
class Outcome:
    kind: str
    end: float  # monotonic
    seconds: float
    status: int
    ok: bool  # the status and body the kind expects
    detail: str = ""


def prompt(rng: random.Random, low: int = 16, high: int = 400) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "count"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 12}},
                                               "required": ["city"]}}}]


async def one_request(client: httpx.AsyncClient, kind: str, rng: random.Random) -> tuple[int, bool, str]:
    """Send one request of `kind`; (status, as expected, what was wrong)."""
    n = rng.randint(8, 64)
    if kind == "generate":
        r = await client.post("/generate", json={"inputs": prompt(rng), "parameters": {
            "max_new_tokens": n, "details": True, "decoder_input_details": rng.random() < 0.2}})
        return r.status_code, r.status_code == 200 and "generated_text" in r.json(), r.text[:200]
    if kind == "grammar":
        r = await client.post("/generate", json={"inputs": prompt(rng, 8, 64), "parameters": {
            "max_new_tokens": 48, "grammar": {"type": "json", "value": SCHEMA}}})
        return r.status_code, r.status_code == 200, r.text[:200]
    if kind == "stop":
        r = await client.post("/generate", json={"inputs": prompt(rng), "parameters": {
            "max_new_tokens": n, "stop": ["the", "water"], "do_sample": True, "temperature": 0.9,
            "repetition_penalty": 1.1}})
        return r.status_code, r.status_code == 200, r.text[:200]
    if kind == "invalid":
        r = await client.post("/generate", json={"inputs": prompt(rng, 4, 8), "parameters": {"temperature": -1}})
        return r.status_code, r.status_code == 422 and r.json().get("error_type") == "validation", r.text[:200]
    if kind == "chat":
        r = await client.post("/v1/chat/completions", json={
            "model": "tgi", "messages": [{"role": "user", "content": prompt(rng, 8, 200)}], "max_tokens": n})
        return r.status_code, r.status_code == 200 and r.json()["choices"], r.text[:200]
    if kind == "tools":
        r = await client.post("/v1/chat/completions", json={
            "model": "tgi", "messages": [{"role": "user", "content": "Weather in " + prompt(rng, 1, 4)}],
            "max_tokens": 48, "tools": TOOLS, "tool_choice": "required"})
        return r.status_code, r.status_code == 200, r.text[:200]
    # streams: TGI native, OpenAI chat and completions, and cancelled ones (the client leaves after a few events)
    if kind == "generate_stream" or kind == "cancel":
        path, body = "/generate_stream", {"inputs": prompt(rng), "parameters": {"max_new_tokens": n}}
    elif kind == "chat_stream":
        path, body = "/v1/chat/completions", {"model": "tgi", "stream": True, "max_tokens": n,
                                              "messages": [{"role": "user", "content": prompt(rng, 8, 200)}]}
    else:
        path, body = "/v1/completions", {"model": "tgi", "stream": True, "max_tokens": n, "prompt": prompt(rng)}
    leave_after = rng.randint(1, 6) if kind == "cancel" else None
    events, error = 0, ""
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return r.status_code, False, (await r.aread()).decode(errors="replace")[:200]
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            if '"error"' in data and "error" in json.loads(data):
                error = data[:200]
                break
            events += 1
            if leave_after is not None and events >= leave_after:
                break  # closing the stream here disconnects: the server aborts the request
    return r.status_code, not error and events > 0, error


KINDS = {  # kind → weight in the mix
    "generate": 3, "generate_stream": 3, "chat": 2, "chat_stream": 2, "completions_stream": 2, "grammar": 1,
    "stop": 1, "tools": 1, "cancel": 2, "invalid": 1,
}


async def client_loop(base_url: str, seed: int, deadline: float, outcomes: list[Outcome]) -> None:
    rng = random.Random(seed)
    kinds, weights = list(KINDS), list(KINDS.values())
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(300.0)) as client:
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            start = time.monotonic()
            try:
                status, ok, detail = await one_request(client, kind, rng)
            except (httpx.HTTPError, json.JSONDecodeError, KeyError) as err:
                status, ok, detail = 0, False, f"{type(err).__name__}: {err}"
            end = time.monotonic()
            outcomes.append(Outcome(kind, end, end - start, status, bool(ok), "" if ok else detail))


# ------------------------------------------------------------------------------------------------ sampling


def scrape(base_url: str) -> dict[str, float]:
    text = httpx.get(base_url + "/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


@dataclass
class Sample:
    minute: float  # since the load started
    rss_mb: dict[str, float]
    kv_used: float
    kv_cached: float
    running: float
    waiting: float
    completed: int  # requests finished in the interval (any kind)
    unexpected: int  # of those, not as expected (5xx, wrong body, ...)
    latency_p50: float | None  # seconds, non-streamed generations of the interval
    latency_p99: float | None
    stream_p50: float | None  # seconds, complete streams
    stream_p99: float | None
    other_cpu: float  # share of the machine's CPU used by other programs during the interval


GENERATIONS = {"generate", "chat", "grammar", "stop", "tools"}
STREAMS = {"generate_stream", "chat_stream", "completions_stream"}


def sample(base_url: str, tree: dict[str, int], start: float, window: list[Outcome], other: OtherLoad) -> Sample:
    m = scrape(base_url)
    gens = [o.seconds for o in window if o.ok and o.kind in GENERATIONS]
    streams = [o.seconds for o in window if o.ok and o.kind in STREAMS]
    return Sample(
        minute=(time.monotonic() - start) / 60,
        rss_mb={role: v for role, pid in tree.items() if (v := rss_mb(pid)) is not None},
        kv_used=m.get('loom_kv_cache_blocks{state="used"}', float("nan")),
        kv_cached=m.get('loom_kv_cache_blocks{state="cached"}', float("nan")),
        running=m.get("tgi_batch_current_size", float("nan")), waiting=m.get("tgi_queue_size", float("nan")),
        completed=len(window), unexpected=sum(1 for o in window if not o.ok),
        latency_p50=percentile(gens, 0.5), latency_p99=percentile(gens, 0.99),
        stream_p50=percentile(streams, 0.5), stream_p99=percentile(streams, 0.99), other_cpu=other.share(),
    )


@dataclass
class Verdict:
    rss_growth_after_warmup: dict[str, float] = field(default_factory=dict)  # fraction, per process
    kv_used_when_idle: float = float("nan")
    integrity_checks_passed: float = 0
    integrity_checks_failed: float = 0
    # per-interval p99 after warm-up, worst over median, over the quiet intervals (other programs < 10% CPU)
    p99_max_over_median: float | None = None  # non-streamed generations
    stream_p99_max_over_median: float | None = None  # complete streams
    quiet_intervals: int = 0
    requests: int = 0
    unexpected: int = 0
    server_errors: int = 0  # 5xx
    unexpected_examples: list[str] = field(default_factory=list)
    health_after: int = 0
    clean_exit: bool = False

    @property
    def passed(self) -> bool:
        return (all(g < 0.05 for g in self.rss_growth_after_warmup.values()) and self.kv_used_when_idle == 0
                and self.integrity_checks_failed == 0 and self.integrity_checks_passed > 0
                and self.server_errors == 0 and self.unexpected == 0 and self.health_after == 200 and self.clean_exit)


def ratio_max_over_median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) / statistics.median(vals) if len(vals) >= 2 else None


QUIET = 0.10  # an interval is quiet when other programs took less than this share of the CPU


def steady_state(verdict: Verdict, samples: list[Sample], warmup: int) -> None:
    """RSS growth from the end of warm-up to the last sample, per process; p99 stability over quiet intervals."""
    if len(samples) > warmup:
        base = samples[warmup - 1].rss_mb if warmup else samples[0].rss_mb
        last = samples[-1].rss_mb
        verdict.rss_growth_after_warmup = {r: last[r] / base[r] - 1 for r in base if r in last}
    quiet = [s for s in samples[warmup:] if s.other_cpu < QUIET]
    verdict.quiet_intervals = len(quiet)
    verdict.p99_max_over_median = ratio_max_over_median([s.latency_p99 for s in quiet])
    verdict.stream_p99_max_over_median = ratio_max_over_median([s.stream_p99 for s in quiet])


def plot(samples: list[Sample], path: Path, title: str, interval_minutes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.minute for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    roles = sorted({r for s in samples for r in s.rss_mb})
    for role in roles:
        axes[0].plot(minutes, [s.rss_mb.get(role, float("nan")) for s in samples], marker=".", label=role)
    axes[0].set_ylabel("RSS (MB)")
    axes[0].legend(loc="center right")
    axes[0].set_ylim(bottom=0)
    axes[1].plot(minutes, [s.kv_used for s in samples], marker=".", label="used")
    axes[1].plot(minutes, [s.kv_cached for s in samples], marker=".", label="cached (prefix cache)")
    axes[1].set_ylabel("KV blocks")
    axes[1].legend(loc="center right")
    for attr, label in (("latency_p50", "generate p50"), ("latency_p99", "generate p99"),
                        ("stream_p50", "stream p50"), ("stream_p99", "stream p99")):
        axes[2].plot(minutes, [getattr(s, attr) if getattr(s, attr) is not None else float("nan") for s in samples],
                     marker=".", label=label)
    noisy = [s.minute for s in samples if s.other_cpu > 0.1]
    for m in noisy:  # intervals where other programs took more than a tenth of the CPU
        axes[2].axvspan(m - interval_minutes, m, color="0.9")
    axes[2].set_ylabel("request latency (s)" + ("\n(grey: other programs >10% CPU)" if noisy else ""))
    axes[2].set_xlabel("minutes of load")
    axes[2].legend(loc="center right")
    axes[2].set_ylim(bottom=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# ------------------------------------------------------------------------------------------------ main


def wait_healthy(base_url: str, proc: subprocess.Popen | None, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(base_url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit("the server did not become healthy")


async def run_load(base_url: str, tree: dict[str, int], args: argparse.Namespace) -> tuple[list[Sample], list[Outcome]]:
    outcomes: list[Outcome] = []
    start = time.monotonic()
    deadline = start + args.minutes * 60
    clients = [asyncio.create_task(client_loop(base_url, args.seed + i, deadline, outcomes))
               for i in range(args.concurrency)]
    samples: list[Sample] = []
    other = OtherLoad(list(tree.values()))
    seen = 0
    next_at = start + args.interval
    while not all(c.done() for c in clients):
        await asyncio.sleep(min(1.0, max(0.0, next_at - time.monotonic())))
        if time.monotonic() >= next_at and time.monotonic() < deadline + args.interval / 2:
            window, seen = outcomes[seen:], len(outcomes)
            s = await asyncio.to_thread(sample, base_url, tree, start, window, other)
            samples.append(s)
            print(f"[{s.minute:5.1f} min] rss {' '.join(f'{k}={v:.0f}MB' for k, v in s.rss_mb.items())} "
                  f"kv used={s.kv_used:.0f} cached={s.kv_cached:.0f} running={s.running:.0f} "
                  f"waiting={s.waiting:.0f} done={s.completed} unexpected={s.unexpected} "
                  f"p50/p99 gen={_f(s.latency_p50)}/{_f(s.latency_p99)}s "
                  f"stream={_f(s.stream_p50)}/{_f(s.stream_p99)}s other-cpu={s.other_cpu:.0%}", flush=True)
            next_at += args.interval
    for c in clients:
        c.result()  # a client loop that raised is a defect of this script: show it
    return samples, outcomes


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def analyze(path: Path, warmup: int) -> None:
    result = json.loads(path.read_text())
    samples = [Sample(**s) for s in result["samples"]]
    fields = {k: v for k, v in result["verdict"].items() if k != "passed"}
    verdict = Verdict(**fields)
    steady_state(verdict, samples, warmup)
    result["verdict"] = {**asdict(verdict), "passed": verdict.passed}
    result["warmup_samples"] = warmup
    path.write_text(json.dumps(result, indent=1))
    interval = samples[1].minute - samples[0].minute if len(samples) > 1 else 1.0
    plot(samples, path.with_suffix(".png"), result["title"], interval)
    print(json.dumps(result["verdict"], indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-id", default=None, help="model for `loom launch` (default: Loom's default model)")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--interval", type=float, default=60, help="seconds between samples")
    ap.add_argument("--warmup-samples", type=int, default=5,
                    help="samples before the RSS baseline (the KV cache's pages become resident as its blocks are "
                         "first used: warm-up lasts until every block has been)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak")
    ap.add_argument("--kv-tokens", type=int, default=32768,
                    help="--max-batch-total-tokens of the server: the engine maps its KV cache lazily (pages become "
                         "resident as blocks are first used), so a bounded cache is fully touched during warm-up "
                         "and RSS growth after it means a leak")
    ap.add_argument("--launch-arg", action="append", default=[], help="extra `loom launch` argument (repeatable)")
    ap.add_argument("--analyze", type=Path, default=None,
                    help="a soak.json of an earlier run: recompute its steady-state verdict (with --warmup-samples) "
                         "and its plot, without running anything")
    args = ap.parse_args()
    if args.analyze is not None:
        analyze(args.analyze, args.warmup_samples)
        return
    args.out.mkdir(parents=True, exist_ok=True)

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "loom.cli", "launch", "--port", str(port), "--hostname", "127.0.0.1",
           "--prometheus-port", str(free_port()), *(["--model-id", args.model_id] if args.model_id else []),
           "--max-batch-total-tokens", str(args.kv_tokens), *args.launch_arg]
    log = open(args.out / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(base_url, proc)
        time.sleep(2)  # the children are named in /proc once started
        tree = process_tree(proc.pid)
        print(f"server up: {' '.join(f'{k}={v}' for k, v in tree.items())}; {args.concurrency} clients for "
              f"{args.minutes} min on {lscpu_model()} ({os.cpu_count()} CPUs)", flush=True)
        before = scrape(base_url)
        samples, outcomes = asyncio.run(run_load(base_url, tree, args))

        verdict = Verdict(requests=len(outcomes), unexpected=sum(1 for o in outcomes if not o.ok),
                          server_errors=sum(1 for o in outcomes if o.status >= 500))
        verdict.unexpected_examples = [f"{o.kind} {o.status}: {o.detail}" for o in outcomes if not o.ok][:10]
        deadline = time.monotonic() + 120
        while True:  # the load has stopped: wait for the engine's idle report
            m = scrape(base_url)
            checks = m.get('loom_kv_cache_integrity_checks{result="passed"}', 0)
            if checks > before.get('loom_kv_cache_integrity_checks{result="passed"}', 0) and \
                    m.get("tgi_batch_current_size") == 0 and m.get("tgi_queue_size") == 0:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(1)
        verdict.kv_used_when_idle = m.get('loom_kv_cache_blocks{state="used"}', float("nan"))
        verdict.integrity_checks_passed = checks
        verdict.integrity_checks_failed = m.get('loom_kv_cache_integrity_checks{result="failed"}', 0)
        verdict.health_after = httpx.get(base_url + "/health", timeout=60).status_code
        steady_state(verdict, samples, args.warmup_samples)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
    verdict.clean_exit = proc.returncode == 0
    title = (f"Loom soak: {args.model_id or 'default model'}, {args.concurrency} clients, {args.minutes:g} min, "
             f"{lscpu_model()} ({os.cpu_count()} CPUs)")
    result = {"title": title, "command": " ".join(sys.argv), "warmup_samples": args.warmup_samples,
              "samples": [asdict(s) for s in samples],
              "verdict": {**asdict(verdict), "passed": verdict.passed},
              "requests_by_kind": {k: sum(1 for o in outcomes if o.kind == k) for k in KINDS}}
    (args.out / "soak.json").write_text(json.dumps(result, indent=1))
    plot(samples, args.out / "soak.png", title, args.interval / 60)
    print(json.dumps(result["verdict"], indent=1))
    print(f"wrote {args.out / 'soak.json'} and {args.out / 'soak.png'}")
    raise SystemExit(0 if verdict.passed else 1)


if __name__ == "__main__":
    main()
