"""Aligner throughput: pairs/s and new tokens/s of ``Aligner.correct_detailed`` by batch size.

    python benchmarks/bench_aligner.py                      # models/aligner-small if built, else a tiny random model
    python benchmarks/bench_aligner.py --model ID_OR_PATH --device cuda --batch-sizes 1 8 32 --n 64

Prints one JSON line per batch size. Inputs are made-up pairs of mixed length (60-400 tokens), so
the figures include the length-grouped batching and left padding the real workload pays.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligner import Aligner, find_default_aligner  # noqa: E402

WORDS = ("the a to of and you can it is this that for with your be not on are as if or but how "
         "safe step help make use people should would could information time need way risk").split()


def made_up_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    qs = [" ".join(rng.choices(WORDS, k=rng.randint(8, 40))) + "?" for _ in range(n)]
    ans = [" ".join(rng.choices(WORDS, k=rng.randint(40, 300))) + "." for _ in range(n)]
    return qs, ans


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="aligner folder or HF id (default: models/aligner-small)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--n", type=int, default=32, help="pairs per batch size")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    model = args.model or find_default_aligner()
    label = str(model) if model else "tiny random seq2seq (no models/aligner-small; run `make aligner`)"
    if model is None:
        from aligner.tiny import build_tiny_aligner

        model = build_tiny_aligner(Path(tempfile.mkdtemp()) / "tiny", "seq2seq", hidden=64)
    al = Aligner.load(model, device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens)
    qs, ans = made_up_pairs(args.n)
    al.correct_detailed(qs[:2], ans[:2], batch_size=2)  # warm-up
    rows = []
    for bs in args.batch_sizes:
        t0 = time.perf_counter()
        res = al.correct_detailed(qs, ans, batch_size=bs)
        dt = time.perf_counter() - t0
        new = sum(r.new_tokens for r in res)
        rec = {"model": label, "device": str(al.device), "dtype": str(al.model.dtype).replace("torch.", ""),
               "batch_size": bs, "pairs": len(qs), "seconds": round(dt, 2),
               "pairs_per_s": round(len(qs) / dt, 2), "new_tokens_per_s": round(new / dt, 1),
               "ms_per_pair": round(1000 * dt / len(qs), 1),
               "mean_new_tokens": round(statistics.mean(r.new_tokens for r in res), 1),
               "degenerate_rate": round(sum(not r.ok for r in res) / len(res), 3),
               "shortened_inputs": sum("input shortened" in r.notes for r in res)}
        print(json.dumps(rec), flush=True)
        rows.append(rec)
    return rows


if __name__ == "__main__":
    main()
