"""Loopback overload test of the Serve deployment: how fast overload is shed, how long admitted requests wait.

Deploys the default application (``pipeline.serve:build_app`` with no arguments but ``aligner``,
none by default: the inspector is the gate under test) on a local Ray cluster, then opens
``--clients`` concurrent connections on 127.0.0.1 that each send ``--rounds`` one-pair requests
back to back (pairs from examples/chat_logs.jsonl), all at once. Prints, per status code, the count
and p50/p95/max latency: the 503s should come back at once, the admitted requests (200) within the
scoring budget, and nothing should time out.

    python benchmarks/bench_overload.py                        # 300 clients x 2 rounds
    python benchmarks/bench_overload.py --clients 600 --rounds 1 --set inspector_tokens_per_s=3000

Bounded: ``--clients`` x ``--rounds`` requests, ``--max-seconds`` overall, loopback only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


async def overload(url: str, pairs: list[dict], clients: int, rounds: int, max_seconds: float) -> dict:
    import httpx

    lat: dict[str, list[float]] = defaultdict(list)
    deadline = time.perf_counter() + max_seconds
    start = asyncio.Event()

    async def client(k: int, http):
        await start.wait()
        for r in range(rounds):
            if time.perf_counter() > deadline:
                return
            t = time.perf_counter()
            try:
                resp = await http.post(url, json=pairs[(k * rounds + r) % len(pairs)],
                                       timeout=max(1.0, deadline - t))
                code = str(resp.status_code)
            except Exception as exc:  # noqa: BLE001 - counted
                code = type(exc).__name__
            lat[code].append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as http:
        tasks = [asyncio.create_task(client(k, http)) for k in range(clients)]
        await asyncio.sleep(0.2)
        t0 = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    import numpy as np

    out = {"seconds": round(wall, 2), "codes": {}}
    for code, xs in sorted(lat.items()):
        ms = np.array(xs) * 1e3
        out["codes"][code] = {"n": len(xs), "p50_ms": round(float(np.percentile(ms, 50)), 1),
                              "p95_ms": round(float(np.percentile(ms, 95)), 1),
                              "max_ms": round(float(ms.max()), 1)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=300, help="concurrent connections, all started at once")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client, back to back")
    ap.add_argument("--max-seconds", type=float, default=120, help="overall limit of the load phase")
    ap.add_argument("--data", type=Path, default=REPO / "examples" / "chat_logs.jsonl")
    ap.add_argument("--aligner", default="none", help="aligner of the app (default none: the inspector is the gate)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="other ServeSettings for the app (repeatable), e.g. inspector_tokens_per_s=3000")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs for ray.init (default: all)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.rounds < 1 or args.clients * args.rounds > 5000:
        sys.exit("--clients x --rounds must be between 1 and 5000")

    import httpx
    import ray
    from ray import serve

    from pipeline.serve import build_app
    from pipeline.settings import ServeSettings

    app_args = {"aligner": args.aligner, **dict(kv.split("=", 1) for kv in args.set)}
    settings = ServeSettings.model_validate(app_args)
    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = [{"query": r["query"], "answer": r["answer"]} for r in rows
             if isinstance(r.get("query"), str) and isinstance(r.get("answer"), str)]

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        serve.run(build_app(app_args), name="default", route_prefix="/")
        print(f"deployed in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for p in pairs[:8]:  # warm: the first requests pay the inspector's lazy start
            httpx.post(f"{base}/v1/moderate", json=p, timeout=60)
        result = asyncio.run(overload(f"{base}/v1/moderate", pairs, args.clients, args.rounds, args.max_seconds))
        health = httpx.get(f"{base}/healthz", timeout=30)
        result["healthz_after"] = health.status_code
    finally:
        serve.shutdown()
        ray.shutdown()

    ongoing, queued = settings.ingress_limits()
    print(f"\n{args.clients} clients x {args.rounds} one-pair requests at once on 127.0.0.1; ingress "
          f"max_ongoing_requests={ongoing}, max_queued_requests={queued}, scoring capacity "
          f"{settings.inspector_capacity_tokens()} estimated tokens, inspector_timeout_s="
          f"{settings.inspector_timeout_s}, request timeout {settings.effective_request_timeout_s()} s")
    print(f"{'status':>22} {'n':>6} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}")
    for code, r in result["codes"].items():
        print(f"{code:>22} {r['n']:6d} {r['p50_ms']:9.1f} {r['p95_ms']:9.1f} {r['max_ms']:9.1f}")
    print(f"load phase {result['seconds']} s; /healthz afterwards: {result['healthz_after']}")
    if args.json:
        args.json.write_text(json.dumps({"result": result, "args": {k: str(v) for k, v in vars(args).items()}},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
