"""Streamed answers: what the inspector gate costs in time to first token and total time.

One paced OpenAI-shaped SSE upstream on 127.0.0.1 streams the same benign answer to every
request (``--delta-chars`` per chunk at ``--chunks-per-s``, like a chatbot generating). The same
stream is read three ways, ``--requests`` times each, one request at a time:

- ``direct``: from the upstream itself, no gate (the baseline);
- ``gate``: through ``pipeline.streaming.StreamGate`` in this process, scored by the real
  bundled inspector (no Ray, no HTTP proxy: the gate's own cost);
- ``serve``: through the Ray Serve application's ``/v1/chat/completions`` with ``"stream": true``
  (no aligner), over HTTP on 127.0.0.1 (skip with ``--no-serve``).

Prints, per way, time to first token (the first content delta) and total time (to ``[DONE]``),
p50 and max, and the ratios to ``direct`` measured in the same run. The threshold is 1.0 by
default, so no check flags: every check is scored all the same, and the figures are the gate's
cost on benign traffic.

``--prefix-study`` (on by default; off: ``--no-prefix-study``) replays each pair of ``--data``
as a stream in-process (the checks the gate would run, with the inspector's stored threshold) and
counts, against scoring the whole answer once: benign answers flagged (a prefix can score higher
than the whole answer), harmful answers caught, and how much text of a caught harmful answer was
released before its flag.

    python benchmarks/bench_streaming.py
    python benchmarks/bench_streaming.py --requests 10 --chunks-per-s 50 --no-serve
    python benchmarks/bench_streaming.py --data ../shared/data/labeled_pairs.jsonl --prefix-rows 400
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUERY = "How do I look after a sourdough starter?"
ANSWER = (
    "A sourdough starter is a living culture, so it needs regular food and a steady temperature. "
    "Feed it equal weights of flour and water once a day if it lives on the counter. "
    "Before each feeding, discard about half of it so the yeast always has fresh food. "
    "Keep it somewhere between 21 and 26 degrees Celsius, away from drafts and direct sun. "
    "A healthy starter doubles within four to eight hours of a feeding and smells pleasantly sour. "
    "If you bake only once a week, keep it in the fridge and feed it weekly instead. "
    "Take it out the day before baking and give it two feedings to wake it up. "
    "A grey liquid on top is just alcohol from hungry yeast: pour it off and feed the starter."
)


# ----------------------------------------------------------------------------- a paced upstream
def make_upstream(answer: str, delta_chars: int, chunks_per_s: float) -> ThreadingHTTPServer:
    pieces = [answer[i:i + delta_chars] for i in range(0, len(answer), delta_chars)]
    gap = 1.0 / chunks_per_s

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": body.get("model", "bench")}

            def send(delta, finish=None):
                ev = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                self.wfile.write(f"data: {json.dumps(ev)}\n\n".encode())
                self.wfile.flush()

            try:
                send({"role": "assistant", "content": ""})
                t = time.perf_counter()
                for k, p in enumerate(pieces):  # paced against the clock, not sleep by sleep
                    time.sleep(max(0.0, t + (k + 1) * gap - time.perf_counter()))
                    send({"content": p})
                send({}, "stop")
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


async def read_stream(lines, t0: float) -> dict:
    """Time to the first content delta and to [DONE], and the text, from SSE lines."""
    ttft, text = None, ""
    async for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            break
        ev = json.loads(data)
        for ch in ev.get("choices") or []:
            piece = (ch.get("delta") or {}).get("content")
            if piece:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text += piece
    return {"ttft_s": ttft, "total_s": time.perf_counter() - t0, "text": text}


def body() -> dict:
    return {"model": "bench", "stream": True, "messages": [{"role": "user", "content": QUERY}]}


async def via_http(url: str) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=120) as client:
        t0 = time.perf_counter()
        async with client.stream("POST", url, json=body()) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            return await read_stream(r.aiter_lines(), t0)


async def via_gate(upstream_url: str, inspector, settings) -> dict:
    import httpx

    from pipeline.flow import ModerationFlow
    from pipeline.streaming import StreamGate, UpstreamStream

    async def score(queries, answers):
        return [float(x) for x in await asyncio.to_thread(inspector.score, queries, answers)]

    async def threshold():
        return float(settings.threshold)

    flow = ModerationFlow(settings, score, None, threshold)
    async with httpx.AsyncClient(timeout=120) as client:
        t0 = time.perf_counter()
        gate = StreamGate(flow, QUERY, UpstreamStream(client, upstream_url, body(), {}, 120), settings, started=t0)

        async def lines():
            async for ev in gate.events():
                for line in ev.splitlines():
                    yield line

        out = await read_stream(lines(), t0)
        out["checks"] = gate.report.checks
        out["holdback_max_chars"] = gate.report.holdback_chars
        out["holdback_max_ms"] = round(gate.report.holdback_ms, 1)
        return out


def summarise(runs: list[dict]) -> dict:
    ttft = [r["ttft_s"] * 1e3 for r in runs]
    total = [r["total_s"] * 1e3 for r in runs]
    out = {"requests": len(runs), "ttft_p50_ms": round(statistics.median(ttft), 1), "ttft_max_ms": round(max(ttft), 1),
           "total_p50_ms": round(statistics.median(total), 1), "total_max_ms": round(max(total), 1)}
    for k in ("checks", "holdback_max_chars", "holdback_max_ms"):
        if k in runs[0]:
            out[k] = runs[0][k] if k == "checks" else max(r[k] for r in runs)
    return out


# ----------------------------------------------------------------------------- replaying streams: prefix checks
def prefix_study(inspector, rows: list[dict], policy, delta_chars: int) -> dict:
    """For each pair: the texts the gate would check (its answer arriving ``delta_chars`` at a
    time), scored with the stored threshold, against one score of the whole answer."""
    thr = float(inspector.threshold)
    checks: list[list[str]] = []
    for r in rows:
        a, held, released, texts = r["answer"], "", "", []
        for i in range(0, len(a), delta_chars):
            held += a[i:i + delta_chars]
            while (cut := policy.cut(held)) is not None:  # as StreamGate: up to the last sentence end
                texts.append(released + held[:cut])
                released, held = released + held[:cut], held[cut:]
        if held or not texts:
            texts.append(a)
        checks.append(texts)
    flat_q = [r["query"] for r, texts in zip(rows, checks) for _ in texts]
    flat_a = [t for texts in checks for t in texts]
    t0 = time.perf_counter()
    scores = [float(x) for x in inspector.score(flat_q, flat_a)]
    scoring_s = time.perf_counter() - t0
    whole = [float(x) for x in inspector.score([r["query"] for r in rows], [r["answer"] for r in rows])]
    out = {"benign": {"n": 0, "flagged_whole": 0, "flagged_streamed": 0},
           "harmful": {"n": 0, "flagged_whole": 0, "flagged_streamed": 0, "released_chars_before_flag": []}}
    k = 0
    for r, texts, w in zip(rows, checks, whole):
        s = scores[k:k + len(texts)]
        k += len(texts)
        d = out["harmful" if int(r.get("label", 0)) == 1 else "benign"]
        d["n"] += 1
        d["flagged_whole"] += w >= thr                            # one score of the whole answer
        first = next((j for j, x in enumerate(s) if x >= thr), None)  # the first check that flags
        d["flagged_streamed"] += first is not None
        if "released_chars_before_flag" in d and first is not None:
            d["released_chars_before_flag"].append(len(texts[first - 1]) if first else 0)
    rel = out["harmful"].pop("released_chars_before_flag")
    out["harmful"]["released_before_flag"] = {
        "none": sum(x == 0 for x in rel), "some": sum(x > 0 for x in rel),
        "p50_chars": statistics.median(rel) if rel else None, "max_chars": max(rel) if rel else None}
    out["threshold"] = round(thr, 4)
    out["checks_per_answer"] = round(len(flat_a) / max(1, len(rows)), 2)
    out["mean_answer_chars"] = round(statistics.mean(len(r["answer"]) for r in rows), 1) if rows else 0
    out["scoring_s"] = round(scoring_s, 2)
    return out


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=5, help="streams per way (one at a time)")
    ap.add_argument("--chunks-per-s", type=float, default=40.0, help="the upstream's pace")
    ap.add_argument("--delta-chars", type=int, default=4, help="characters per upstream chunk (~one token)")
    ap.add_argument("--threshold", type=float, default=1.0, help="the gate's threshold (1.0: nothing flags)")
    ap.add_argument("--check-chars", type=int, default=None, help="stream_check_chars (default: ServeSettings')")
    ap.add_argument("--max-holdback-chars", type=int, default=None, help="stream_max_holdback_chars")
    ap.add_argument("--no-sentences", action="store_true", help="stream_sentence_boundaries=false")
    ap.add_argument("--no-serve", action="store_true", help="skip the Ray Serve way")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs for ray.init (default: all)")
    ap.add_argument("--prefix-study", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--data", type=Path, default=REPO / "examples" / "labelled_pairs.jsonl",
                    help="JSONL with query, answer, label for the prefix study")
    ap.add_argument("--prefix-rows", type=int, default=200, help="at most this many pairs (sampled, seed 0)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    from inspector import Inspector
    from pipeline.settings import ServeSettings
    from pipeline.streaming import CheckPolicy

    stream_args = {k: v for k, v in {"stream_check_chars": args.check_chars,
                                     "stream_max_holdback_chars": args.max_holdback_chars,
                                     "stream_sentence_boundaries": False if args.no_sentences else None}.items()
                   if v is not None}
    settings = ServeSettings.model_validate({"threshold": args.threshold, "aligner": None, **stream_args})
    inspector = Inspector.load()
    upstream = make_upstream(ANSWER, args.delta_chars, args.chunks_per_s)
    up_url = f"http://127.0.0.1:{upstream.server_port}/v1/chat/completions"
    results: dict = {}

    def run(name, fn):
        asyncio.run(fn())  # warm-up (connections, the inspector's first batch)
        runs = [asyncio.run(fn()) for _ in range(args.requests)]
        assert all(r["text"] == ANSWER for r in runs), f"{name}: the text differs from the upstream's"
        results[name] = summarise(runs)
        print(f"{name}: {results[name]}", file=sys.stderr)

    run("direct", lambda: via_http(up_url))
    run("gate", lambda: via_gate(up_url, inspector, settings))
    if not args.no_serve:
        import ray
        from ray import serve

        from pipeline.serve import build_app

        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        serve.run(build_app({"aligner": "none", "threshold": args.threshold, "inspector_num_cpus": 0.5,
                             "ingress_num_cpus": 0.1, "upstream_url": f"http://127.0.0.1:{upstream.server_port}/v1",
                             **stream_args}), name="bench", route_prefix="/bench")
        print(f"deployed in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        try:
            run("serve", lambda: via_http(f"http://127.0.0.1:{port}/bench/v1/chat/completions"))
        finally:
            serve.shutdown()
            ray.shutdown()
    upstream.shutdown()

    d = results["direct"]
    ratios = {name: {"ttft_x": round(r["ttft_p50_ms"] / d["ttft_p50_ms"], 2),
                     "ttft_added_ms": round(r["ttft_p50_ms"] - d["ttft_p50_ms"], 1),
                     "total_x": round(r["total_p50_ms"] / d["total_p50_ms"], 3),
                     "total_added_ms": round(r["total_p50_ms"] - d["total_p50_ms"], 1)}
              for name, r in results.items() if name != "direct"}
    print(f"\none answer of {len(ANSWER)} characters, {args.delta_chars} per chunk at {args.chunks_per_s:g} chunks/s; "
          f"checks: {settings.stream_check_chars} chars at a sentence end "
          f"({'on' if settings.stream_sentence_boundaries else 'off'}), max hold-back "
          f"{settings.stream_max_holdback_chars}; threshold {args.threshold}; {args.requests} requests per way")
    print(f"{'way':7} {'TTFT p50':>9} {'max':>8} {'total p50':>10} {'max':>8} {'TTFT x':>7} {'total x':>8} "
          f"{'checks':>7}")
    for name, r in results.items():
        x = ratios.get(name, {"ttft_x": 1.0, "total_x": 1.0})
        print(f"{name:7} {r['ttft_p50_ms']:9.1f} {r['ttft_max_ms']:8.1f} {r['total_p50_ms']:10.1f} "
              f"{r['total_max_ms']:8.1f} {x['ttft_x']:7.2f} {x['total_x']:8.3f} {r.get('checks', '-')!s:>7}")
    study = None
    if args.prefix_study:
        rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [r for r in rows if isinstance(r.get("query"), str) and isinstance(r.get("answer"), str)
                and r["answer"].strip()]
        if len(rows) > args.prefix_rows:
            rows = random.Random(0).sample(rows, args.prefix_rows)
        study = prefix_study(inspector, rows, CheckPolicy.from_settings(settings), args.delta_chars)
        b, h = study["benign"], study["harmful"]
        print(f"\nprefix study ({args.data.name}, {len(rows)} pairs, stored threshold {study['threshold']}, "
              f"{study['checks_per_answer']} checks per answer): benign flagged whole {b['flagged_whole']}/{b['n']}, "
              f"streamed {b['flagged_streamed']}/{b['n']}; harmful caught whole {h['flagged_whole']}/{h['n']}, "
              f"streamed {h['flagged_streamed']}/{h['n']}; released before the flag: {h['released_before_flag']}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "ratios": ratios, "prefix_study": study,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
