"""The long fuzzing run: every POST route of a live server's OpenAPI document, over HTTP, with the strategies of
tests/router/test_fuzz.py (loom.testing.fuzz), collecting every violation instead of stopping at the first.

    loom launch --model-id <model dir> --port 3000 &
    python scripts/fuzz.py --url http://127.0.0.1:3000 --examples 3000 --out /tmp/fuzz

Checks after every request: the response's invariants (loom.testing.fuzz.violations) and `/health` == 200. Each
kind of violation is printed once with a count, and up to three reproducers per kind are written to --out as JSON
(`path`, `content_type`, `body_b64`). Exit status 1 if anything was found.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
from hypothesis import HealthCheck, Phase, given, seed, settings

from loom.testing.fuzz import FuzzCase, FuzzLimits, cases, findings, post_routes, violations

HEALTH_WAIT_SECONDS = 30.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="base URL of a running server, e.g. http://127.0.0.1:3000")
    p.add_argument("--examples", type=int, default=2000, help="requests in all, spread evenly over the routes")
    p.add_argument("--routes", nargs="*", help="only these POST routes (default: all in the OpenAPI document)")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed (the same seed replays the same requests)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request before it counts as a hang")
    p.add_argument("--payload-limit", type=int, default=2_000_000, help="the server's --payload-limit")
    p.add_argument("--api-key", help="sent as `Authorization: Bearer <key>`")
    p.add_argument("--out", type=Path, help="directory for reproducers")
    return p.parse_args(argv)


class Campaign:
    """Sends cases and keeps the tally; one instance per run."""

    def __init__(self, client: httpx.Client, out: Path | None):
        self.client = client
        self.out = out
        self.sent = 0
        self.statuses: dict[str, Counter] = defaultdict(Counter)
        self.kinds: Counter = Counter()
        self.found: dict[str, list[FuzzCase]] = defaultdict(list)
        self.counts: Counter = Counter()

    def run_case(self, case: FuzzCase) -> None:
        headers = {"content-type": case.content_type} if case.content_type is not None else {}
        try:
            r = self.client.post(case.path, content=case.body, headers=headers)
            problems = violations(r.status_code, r.headers.get("content-type", ""), r.content, case.body, case.path)
            self.statuses[case.path][r.status_code] += 1
        except httpx.TimeoutException:
            problems = [f"no response within {self.client.timeout.read}s"]
        except httpx.TransportError as err:
            problems = [f"connection failed: {type(err).__name__}: {err}"]
        self.sent += 1
        self.kinds[case.kind] += 1
        if not self.healthy():
            problems.append("/health not 200 after this request")
        for problem in problems:
            key = f"{case.path}: {problem[:120]}"
            self.counts[key] += 1
            if len(self.found[key]) < 3:
                self.found[key].append(case)
                self.save(key, case)
                print(f"\n!! {problem[:300]}\n   {case.describe()[:400]}", flush=True)

    def healthy(self) -> bool:
        deadline = time.monotonic() + HEALTH_WAIT_SECONDS
        while True:
            try:
                if self.client.get("/health").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)

    def save(self, key: str, case: FuzzCase) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        n = sum(len(v) for v in self.found.values())
        record = {"problem": key, "path": case.path, "kind": case.kind, "content_type": case.content_type,
                  "body_b64": base64.b64encode(case.body).decode()}
        (self.out / f"case-{n:03d}.json").write_text(json.dumps(record, indent=1))

    def report(self, elapsed: float) -> None:
        print(f"\n{self.sent} requests in {elapsed:.0f} s ({self.sent / max(elapsed, 1e-9):.1f}/s); "
              f"kinds: {dict(self.kinds)}")
        for path, statuses in sorted(self.statuses.items()):
            print(f"  {path}: " + ", ".join(f"{s}×{n}" for s, n in sorted(statuses.items())))
        if not self.counts:
            print("no violations")
            return
        print(f"{len(self.counts)} kind(s) of violation:")
        for key, n in self.counts.most_common():
            print(f"  {n:5d}  {key}")


def fuzz_route(campaign: Campaign, path: str, schema: dict, limits: FuzzLimits, examples: int, seed_: int) -> None:
    @seed(seed_)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(cases(path, schema, limits))
    def run(case: FuzzCase) -> None:
        campaign.run_case(case)

    run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, timeout=args.timeout, headers=headers) as client:
        doc = client.get("/api-doc/openapi.json").json()
        limits = FuzzLimits.from_info(client.get("/info").json(), payload_limit=args.payload_limit,
                                      enormous=200_000, max_depth=80)
        routes = post_routes(doc)
        selected = args.routes or sorted(routes)
        per_route = math.ceil(args.examples / len(selected))
        print(f"fuzzing {len(selected)} routes × {per_route} examples against {args.url}", flush=True)
        campaign = Campaign(client, args.out)
        start = time.monotonic()
        for path in selected:
            before = campaign.sent
            for body in findings(routes[path]):  # what fuzzing found before, first
                campaign.run_case(FuzzCase(path, body, kind="finding"))
            fuzz_route(campaign, path, routes[path], limits, per_route, args.seed)
            print(f"{path}: {campaign.sent - before} requests, {time.monotonic() - start:.0f} s", flush=True)
        campaign.report(time.monotonic() - start)
    return 1 if campaign.counts else 0


if __name__ == "__main__":
    sys.exit(main())
