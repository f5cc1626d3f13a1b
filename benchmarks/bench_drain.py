"""The Inspector's drain rate in the ingress's units: estimated tokens (``pipeline.admission.pair_cost``)
scored per second by ``InspectorService.score_pairs``, the call an Inspector replica makes, on
scoring calls shaped as the deployment batches them under load. This is the figure to set as
``inspector_tokens_per_s`` (the admission control's assumed drain rate) for a replica on this machine.

    .venv/bin/python benchmarks/bench_drain.py                       # torch threads 1 and 2
    .venv/bin/python benchmarks/bench_drain.py --threads 4 --data ../shared/data/labeled_pairs.jsonl

How the calls are shaped: under load every request is a slice of its own (one-pair chat requests),
and the Inspector's ``@serve.batch`` gathers slices up to ``inspector_batch_tokens`` estimated
tokens (default 4096) per call. So the pairs (shuffled, seed 0) are cut into consecutive calls of at
most ``--batch-tokens`` estimated tokens (``admission.slice_pairs``), and each call is timed. The
rate is the calls' estimated tokens over their total time (one warm-up call not counted).

Threads: a replica's torch uses its ``num_cpus`` (Ray sets ``OMP_NUM_THREADS`` from it) unless
``torch_threads`` is set, so measure with the thread count the replica will have, on an otherwise
idle machine; on a box that also runs the HTTP proxy, the ingress and other replicas, expect less.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "labeled_pairs.jsonl"


def load_pairs(path: Path, n: int, seed: int = 0) -> list[tuple[str, str]]:
    from bench_inspector import load_pairs as load_columns  # benchmarks/ is on sys.path as a script

    return list(zip(*load_columns(path, n, seed)))


def drain(service, pairs, batch_tokens: int, max_seconds: float) -> dict:
    from pipeline.admission import slice_pairs

    calls = slice_pairs(pairs, batch_tokens, max_pairs=10**9)
    warm, calls = calls[0], calls[1:]
    service.score_pairs(warm[0])
    ms, tokens, n_pairs = [], 0, 0
    t_end = time.perf_counter() + max_seconds
    for chunk, cost in calls:
        t = time.perf_counter()
        service.score_pairs(chunk)
        ms.append((time.perf_counter() - t) * 1e3)
        tokens += cost
        n_pairs += len(chunk)
        if time.perf_counter() > t_end:
            break
    seconds = sum(ms) / 1e3
    ms.sort()
    return {"calls": len(ms), "pairs": n_pairs, "estimated_tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "pairs_per_s": round(n_pairs / seconds, 1),
            "tokens_per_pair": round(tokens / n_pairs, 1),
            "call_ms_p50": round(ms[len(ms) // 2], 1), "call_ms_max": round(ms[-1], 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=SHARED if SHARED.exists() else ROOT / "examples" / "chat_logs.jsonl",
                    help="JSONL of pairs (default: ../shared/data/labeled_pairs.jsonl, else examples/chat_logs.jsonl)")
    ap.add_argument("--pairs", type=int, default=600, help="pairs to score per thread count")
    ap.add_argument("--batch-tokens", type=int, default=4096, help="estimated tokens per call (inspector_batch_tokens)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to measure")
    ap.add_argument("--inspector", default=None, help="inspector folder (default: $INSPECTOR_MODEL or the bundled one)")
    ap.add_argument("--int8", action="store_true", help="the int8-quantised encoder (inspector_int8)")
    ap.add_argument("--max-seconds", type=float, default=120, help="per thread count")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    import torch

    from pipeline.services import InspectorService

    pairs = load_pairs(args.data, args.pairs)
    service = InspectorService(args.inspector, int8=args.int8)
    out = {"data": str(args.data), "batch_tokens": args.batch_tokens, "int8": args.int8,
           "cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in os.getloadavg()], "runs": {}}
    for n in args.threads:
        torch.set_num_threads(n)
        out["runs"][str(n)] = drain(service, pairs, args.batch_tokens, args.max_seconds)
        print(f"threads {n}: {json.dumps(out['runs'][str(n)])}", file=sys.stderr)
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
