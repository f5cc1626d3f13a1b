"""Inspector throughput: ``Inspector.score`` beside raw ``SentenceTransformer.encode`` on the same
pairs, in one run (the machine is noisy, so the ratio is the figure), what the edge windows cost
(the same model scored without them), plus the batch job's rows/s,
and the int8-quantised inspector (``Inspector.load(int8=True)``): its speed and how far its scores
and flags move from the float32 ones on the same pairs.

    .venv/bin/python benchmarks/bench_inspector.py [--pairs 512] [--batch-size 32]

Pairs come from examples/chat_logs.jsonl, repeated to ``--pairs``; with ``--data FILE`` (e.g.
../shared/data/labeled_pairs.jsonl) real answers are used instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_pairs(path: Path, n: int, seed: int | None = None) -> tuple[list[str], list[str]]:
    """``n`` readable pairs of a JSONL file, repeated if it has fewer; shuffled first with ``seed``."""
    import random

    from pipeline.tables import extract_pair

    pairs = []
    for line in path.open(encoding="utf-8"):
        try:
            pairs.append(extract_pair(json.loads(line)))
        except ValueError:
            continue
    if seed is not None:
        random.Random(seed).shuffle(pairs)
    pairs = (pairs * (n // max(1, len(pairs)) + 1))[:n]
    return [q for q, _ in pairs], [a for _, a in pairs]


def timed(fn, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--data", type=Path, default=ROOT / "examples" / "chat_logs.jsonl")
    ap.add_argument("--inspector", default=None)
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 comparison")
    args = ap.parse_args()

    import torch

    from inspector import Inspector
    from pipeline.batch import run_batch
    from pipeline.core import ModerationPipeline

    queries, answers = load_pairs(args.data, args.pairs)
    insp = Inspector.load(args.inspector)
    insp.encoder.batch_size = args.batch_size
    st = insp.encoder.model
    sep = f" {insp.encoder.tokenizer.sep_token} "
    texts = [q + sep + a for q, a in zip(queries, answers)]

    insp.score(queries[:64], answers[:64])  # warm-up
    t_raw = timed(lambda: st.encode(texts, batch_size=args.batch_size))
    t_insp = timed(lambda: insp.score(queries, answers))
    t_one = timed(lambda: [insp.score([q], [a]) for q, a in zip(queries[:32], answers[:32])], 1) / 32
    edges = {}
    if insp.encoder.recipe.edge_length:  # what the edge windows (dilution defence) cost, same run
        import dataclasses

        recipe = insp.encoder.recipe
        insp.encoder.recipe = dataclasses.replace(recipe, edge_length=0)
        t_plain = timed(lambda: insp.score(queries, answers))
        insp.encoder.recipe = recipe
        edges = {"without_edge_windows_pairs_per_s": round(len(queries) / t_plain, 1),
                 "edge_windows_time_ratio": round(t_insp / t_plain, 3)}

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "logs.jsonl"
        with src.open("w") as f:
            for q, a in zip(queries, answers):
                f.write(json.dumps({"query": q, "answer": a}) + "\n")
        pipe = ModerationPipeline(insp)
        summary = run_batch(src, Path(tmp) / "out.jsonl", pipe, show_progress=False)

    n = len(queries)
    int8 = {}
    if not args.no_int8:
        q8 = Inspector.load(args.inspector, int8=True)
        q8.encoder.batch_size = args.batch_size
        q8.score(queries[:64], answers[:64])
        t_q8 = timed(lambda: q8.score(queries, answers))
        # agreement on distinct pairs (the input is repeated to --pairs)
        uq = list(dict.fromkeys(zip(queries, answers)))
        s32 = insp.score([q for q, _ in uq], [a for _, a in uq])
        s8 = q8.score([q for q, _ in uq], [a for _, a in uq])
        int8 = {"int8_score_pairs_per_s": round(n / t_q8, 1), "int8_vs_float32_speedup": round(t_insp / t_q8, 3),
                "int8_distinct_pairs_compared": len(uq),
                "int8_max_abs_score_diff": round(float(abs(s32 - s8).max()), 4),
                "int8_mean_abs_score_diff": round(float(abs(s32 - s8).mean()), 4),
                "int8_flag_agreement": round(float(((s32 >= insp.threshold) == (s8 >= insp.threshold)).mean()), 4)}
    result = {
        "pairs": n, "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
        "raw_encode_pairs_per_s": round(n / t_raw, 1),
        "inspector_score_pairs_per_s": round(n / t_insp, 1),
        "inspector_vs_raw_ratio": round(t_raw / t_insp, 3),
        "inspector_single_pair_ms": round(t_one * 1e3, 1),
        **edges,
        "batch_job_rows_per_s": round(summary.rows / summary.seconds, 1),
        "batch_vs_raw_ratio": round((summary.rows / summary.seconds) / (n / t_raw), 3),
        **int8,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
