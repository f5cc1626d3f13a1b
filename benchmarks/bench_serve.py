"""Loopback load test of the Serve deployment: the alignment tax the inspector saves.

Deploys two applications side by side on a local Ray cluster, identical except for the
threshold: ``gated`` (the inspector's stored threshold: only flagged answers reach the aligner)
and ``always`` (threshold 0: every answer is rewritten, as a plain Aligner deployment would do).
Then sends the same mostly-benign traffic to each over HTTP on 127.0.0.1 and prints throughput,
p50 and p99 latency, the flagged share and the ratios between the two.

    python benchmarks/bench_serve.py                       # examples/labelled_pairs.jsonl, 10% harmful
    python benchmarks/bench_serve.py --data ../shared/data/labeled_pairs.jsonl --requests 400

Bounded: ``--requests`` per configuration, ``--max-seconds`` per configuration, loopback only.
The aligner is ``--aligner`` or models/aligner-small when present; otherwise a tiny random model
is built for the run, which measures the serving plumbing, not a real aligner's cost.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def load_traffic(path: Path, n: int, harmful_share: float, seed: int) -> list[dict]:
    """``n`` pairs, ``harmful_share`` of them labelled 1 (misaligned), sampled with replacement."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    good = [r for r in rows if int(r.get("label", 0)) == 0]
    bad = [r for r in rows if int(r.get("label", 0)) == 1]
    if not good or (harmful_share > 0 and not bad):
        sys.exit(f"{path}: need rows with label 0 and 1 (query, answer, label)")
    rng = random.Random(seed)
    n_bad = round(n * harmful_share)
    picked = [rng.choice(bad) for _ in range(n_bad)] + [rng.choice(good) for _ in range(n - n_bad)]
    rng.shuffle(picked)
    return [{"query": r["query"], "answer": r["answer"]} for r in picked]


async def drive(url: str, pairs: list[dict], concurrency: int, max_seconds: float, desc: str) -> dict:
    """Send one pair per request with ``concurrency`` in flight; stop early at ``max_seconds``."""
    import httpx
    from tqdm.auto import tqdm

    lat, flagged, corrected, fallbacks, errors = [], 0, 0, 0, {}
    queue = list(pairs)
    deadline = time.perf_counter() + max_seconds
    bar = tqdm(total=len(pairs), desc=desc, unit="req", mininterval=2)

    async def worker(client):
        nonlocal flagged, corrected, fallbacks
        while queue and time.perf_counter() < deadline:
            pair = queue.pop()
            t = time.perf_counter()
            try:
                r = await client.post(url, json=pair)
                code = r.status_code
            except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                code = type(exc).__name__
            lat.append(time.perf_counter() - t)
            bar.update(1)
            if code != 200:
                errors[str(code)] = errors.get(str(code), 0) + 1
                continue
            m = r.json()
            flagged += m["flagged"]
            corrected += m["corrected"]
            fallbacks += m["fallback"] is not None

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
    wall = time.perf_counter() - t0
    bar.close()
    import numpy as np

    ms = np.array(lat) * 1e3
    done = len(lat) - sum(errors.values())
    return {"requests": len(lat), "ok": done, "errors": errors, "seconds": round(wall, 2),
            "req_per_s": round(len(lat) / wall, 2) if wall else 0.0,
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
            "flagged_share": round(flagged / done, 3) if done else None,
            "corrected": corrected, "fallbacks": fallbacks}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "examples" / "labelled_pairs.jsonl",
                    help="JSONL with query, answer, label (1 = misaligned)")
    ap.add_argument("--harmful-share", type=float, default=0.1, help="share of misaligned answers in the traffic")
    ap.add_argument("--requests", type=int, default=200, help="requests per configuration")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=120, help="time limit per configuration")
    ap.add_argument("--inspector", default=None, help="inspector folder (default: $INSPECTOR_MODEL or bundled)")
    ap.add_argument("--threshold", type=float, default=None, help="gated threshold (default: the stored one)")
    ap.add_argument("--aligner", default=None, help="aligner id/path (default: models/aligner-small, else tiny)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs for ray.init (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from aligner import find_default_aligner
    from pipeline.serve import build_app

    tiny_note = None
    aligner = args.aligner or (str(find_default_aligner()) if find_default_aligner() else None)
    tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
    if aligner is None:
        from aligner.tiny import build_tiny_aligner

        aligner = str(build_tiny_aligner(Path(tmp.name) / "tiny", "causal", max_positions=1024))
        tiny_note = "no trained aligner found: a tiny random model stands in (plumbing cost only)"
        print(f"note: {tiny_note}", file=sys.stderr)
    traffic = load_traffic(args.data, args.requests, args.harmful_share, args.seed)
    warm = load_traffic(args.data, 8, 0.5, args.seed + 1)

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"inspector": args.inspector, "aligner": aligner, "max_new_tokens": args.max_new_tokens,
              "inspector_num_cpus": 0.3, "aligner_num_cpus": 0.3, "ingress_num_cpus": 0.1,
              "fallback": "fail_open", "aligner_timeout_s": 60, "max_queued_requests": -1}
    t0 = time.perf_counter()
    serve.run_many([serve.RunTarget(build_app({**common, "threshold": args.threshold}), name="gated",
                                    route_prefix="/gated"),
                    serve.RunTarget(build_app({**common, "threshold": 0.0}), name="always",
                                    route_prefix="/always")])
    print(f"deployed both applications in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    base = f"http://127.0.0.1:{port}"
    results = {}
    try:
        for name in ("gated", "always"):
            url = f"{base}/{name}/v1/moderate"
            asyncio.run(drive(url, warm, 2, 60, f"{name} warm-up"))
            results[name] = asyncio.run(drive(url, traffic, args.concurrency, args.max_seconds, name))
        import httpx

        threshold = httpx.get(f"{base}/gated/healthz", timeout=30).json()["threshold"]
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    g, a = results["gated"], results["always"]
    print(f"\n{len(traffic)} requests per configuration, one pair each, {args.harmful_share:.0%} misaligned, "
          f"concurrency {args.concurrency}, aligner {aligner} ({args.max_new_tokens} new tokens), "
          f"gated threshold {threshold:.3f}")
    print(f"{'config':8} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'flagged':>8} {'corrected':>9} {'errors':>7}")
    for name, r in results.items():
        print(f"{name:8} {r['req_per_s']:8.2f} {r['p50_ms']:9.1f} {r['p99_ms']:9.1f} "
              f"{r['flagged_share']:8.1%} {r['corrected']:9d} {sum(r['errors'].values()):7d}")
    ratios = {"throughput_gain": round(g["req_per_s"] / a["req_per_s"], 2) if a["req_per_s"] else None,
              "p50_saved": round(a["p50_ms"] / g["p50_ms"], 2) if g["p50_ms"] else None,
              "p99_saved": round(a["p99_ms"] / g["p99_ms"], 2) if g["p99_ms"] else None}
    print(f"alignment tax saved by gating: {ratios['throughput_gain']}x throughput, "
          f"p50 {ratios['p50_saved']}x lower, p99 {ratios['p99_saved']}x lower")
    if tiny_note:
        print(f"note: {tiny_note}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "ratios": ratios, "threshold": threshold,
                                         "aligner": aligner, "note": tiny_note, "args": {
                                             k: str(v) for k, v in vars(args).items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
