"""The ingress's work budget, in estimated inspector tokens: what a pair costs (from its characters
alone: no tokenizer in the ingress), how a request is cut into bounded scoring calls, and the gate
that admits work up to what the inspector drains in time and refuses the rest at once."""
from __future__ import annotations

import math
from typing import Sequence

from .http import RequestError, StageError

# the bundled inspector's PairRecipe (tests/test_serve_core.py keeps the two equal)
DEFAULT_RECIPE = {"max_length": 256, "max_query_tokens": 64, "stride": 32, "max_chunks": 16, "edge_length": 128}
CHARS_PER_TOKEN = 3  # English word pieces average ~4.5 characters: 3 errs on the side of cost


def estimate_tokens(text: str) -> int:
    """Word pieces a text costs, from its characters alone (no tokenizer in the ingress): one per
    ``CHARS_PER_TOKEN`` ASCII characters, one per other character (CJK, symbols, look-alikes)."""
    if text.isascii():
        return -(-len(text) // CHARS_PER_TOKEN)
    n_ascii = len(text.encode("ascii", "ignore"))
    return -(-n_ascii // CHARS_PER_TOKEN) + (len(text) - n_ascii)


def pair_cost(query: str, answer: str, recipe: dict | None = None) -> int:
    """Estimated encoder tokens the inspector spends on a pair: the query (cut to
    ``max_query_tokens``) with the answer in one window, or up to ``max_chunks`` full windows
    (``inspector.encoder``: long answers are split into overlapping windows, at most max_chunks),
    plus two edge windows when the answer is longer than one holds (``edge_length``, 0 = none)."""
    r = {**DEFAULT_RECIPE, **(recipe or {})}
    q = min(estimate_tokens(query), r["max_query_tokens"])
    a = estimate_tokens(answer)
    edge = r.get("edge_length", 0)
    edges = 2 * edge if edge and a > edge - q - 3 else 0
    room = r["max_length"] - q - 3
    if a <= room:
        return q + a + 3 + edges
    windows = min(r["max_chunks"], -(-(a - r["stride"]) // max(1, room - r["stride"])))
    return windows * r["max_length"] + edges


def slice_pairs(pairs: Sequence[tuple[str, str]], budget: int, max_pairs: int,
                recipe: dict | None = None) -> list[tuple[list[tuple[str, str]], int]]:
    """Consecutive slices of at most ``budget`` estimated tokens and ``max_pairs`` pairs, each with
    its cost: the units of work the Inspector batches. A pair alone above the budget is a slice of
    its own, counted at the budget (its real cost is bounded by ``max_chunks`` windows)."""
    out: list[tuple[list[tuple[str, str]], int]] = []
    cur: list[tuple[str, str]] = []
    cost = 0
    for q, a in pairs:
        c = min(pair_cost(q, a, recipe), budget)
        if cur and (cost + c > budget or len(cur) >= max_pairs):
            out.append((cur, cost))
            cur, cost = [], 0
        cur.append((q, a))
        cost += c
    if cur:
        out.append((cur, cost))
    return out


class Admission:
    """The ingress's gate for scoring work, in estimated tokens (``pair_cost``).

    ``check_size`` refuses a request larger than the per-request budget (413). ``admit`` lets a
    request in only while the work already admitted plus its own fits ``capacity`` (what the
    inspector drains within the scoring budget, ``ServeSettings.inspector_capacity_tokens``);
    otherwise it is refused at once (503 with Retry-After) rather than queued to time out. A
    request larger than the capacity is admitted only when nothing else is in the works."""

    def __init__(self, capacity_tokens: int, max_request_tokens: int, drain_tokens_per_s: float):
        self.capacity, self.max_request = int(capacity_tokens), int(max_request_tokens)
        self.drain = float(drain_tokens_per_s)
        self.outstanding = 0
        self.admitted = self.refused = 0

    def check_size(self, cost: int) -> None:
        if cost > self.max_request:
            raise RequestError(413, f"this request would cost the inspector about {cost} tokens of work "
                                    f"(estimated from its characters); the limit per request is "
                                    f"{self.max_request}: send fewer or shorter pairs per request")

    def ensure_room(self, cost: int) -> None:
        """Refuse (503 with Retry-After) when ``cost`` more would not fit; hold nothing. A streamed
        request calls it before asking the upstream: overload is refused at once, as for the others."""
        if self.outstanding and self.outstanding + cost > self.capacity:
            self.refused += 1
            wait = (self.outstanding + cost - self.capacity) / self.drain
            raise StageError("admission", f"overloaded: about {self.outstanding} tokens of scoring work are "
                                          f"already in the works (capacity {self.capacity}); retry later",
                             status=503, retry_after_s=max(1, math.ceil(wait)))

    def admit(self, cost: int, force: bool = False) -> "_Ticket":
        """Hold ``cost`` while the work runs. ``force``: counted but never refused (a check of a
        stream already admitted: shedding it would cut an answer half-way)."""
        if not force:
            self.ensure_room(cost)
        self.outstanding += cost
        self.admitted += 1
        return _Ticket(self, cost)

    def state(self) -> dict:
        return {"outstanding_tokens": self.outstanding, "capacity_tokens": self.capacity,
                "max_request_tokens": self.max_request, "admitted": self.admitted, "refused": self.refused}


class _Ticket:
    def __init__(self, gate: Admission, cost: int):
        self.gate, self.cost = gate, cost

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.gate.outstanding -= self.cost
        self.cost = 0
        return False
