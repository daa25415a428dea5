"""The small optimisations inside a TetriServe round, as pure functions (tested on their own)."""
from __future__ import annotations

import heapq
from collections.abc import Sequence

from .common import EPS


def group_knapsack(items: list[tuple[int, list[tuple[int, int]]]], capacity: int) -> list[int]:
    """Pick at most one option per item, total GPUs <= capacity, maximising total value.

    ``items``: (value of running nothing, [(gpus, value), ...]) each, values non-negative ints.
    Returns, per item, the index of its chosen option or -1 for nothing. Dynamic programme over
    "exactly c GPUs used" (the paper's Algorithm 1), O(items x capacity x options), plan rebuilt
    from back-pointers. Ties: the first item order that reaches the value wins, and among equal
    values the fewest GPUs (idle GPUs then go to scale-up).
    """
    neg = -1
    dp = [0] + [neg] * capacity
    back: list[list[int]] = []
    for none_value, options in items:
        new = [v + none_value if v >= 0 else neg for v in dp]
        pick = [-1] * (capacity + 1)
        for oi, (k, val) in enumerate(options):
            for c in range(k, capacity + 1):
                prev = dp[c - k]
                if prev >= 0 and prev + val > new[c]:
                    new[c] = prev + val
                    pick[c] = oi
        dp = new
        back.append(pick)
    c = max(range(capacity + 1), key=lambda c: (dp[c], -c))
    out = [-1] * len(items)
    for i in range(len(items) - 1, -1, -1):
        oi = back[i][c]
        out[i] = oi
        if oi >= 0:
            c -= items[i][1][oi][0]
    return out


def choose_round_end(rows: Sequence[tuple[int, float, int]], tau: float, max_frac: float = 1.5,
                     overhead_s: float = 0.001) -> float:
    """A common end E for a round's assignments, each given as (GPUs, step time, most steps).

    Every assignment then runs min(most steps, floor(E / step time)) steps and its GPUs idle until
    E. Candidates are tau and the ends of whole steps of the slow-step assignments (step >= tau / 8)
    between the longest single step and max_frac x tau; the winner minimises idle GPU seconds plus
    ``overhead_s`` per GPU of every assignment (the dispatch cost of a round), per second of round.
    A request stepping 0.22 s in a 0.58 s round would otherwise idle a quarter of it.
    """
    lo = max(t for _, t, _ in rows)
    hi = max(lo, max_frac * tau)
    cands = {tau} if tau >= lo - EPS else {lo}
    for _, t, cap in rows:
        if t >= tau / 8:
            for q in range(max(1, int(lo / t - EPS)), cap + 1):
                e = q * t
                if e > hi + EPS:
                    break
                if e >= lo - EPS:
                    cands.add(e)
    overhead = overhead_s * sum(k for k, _, _ in rows)

    def idle_rate(e: float) -> float:
        waste = sum(k * (e - min(cap, int(e / t + EPS)) * t) for k, t, cap in rows)
        return (waste + overhead) / e

    return min(sorted(cands), key=idle_rate)


def admit_by_deadline(jobs: Sequence[tuple[float, float, bool]], capacity_gpus: float, now: float) -> set[int]:
    """Moore-Hodgson over GPU time: which jobs to drop so that the rest can finish together.

    ``jobs``: (deadline, GPU seconds still needed, droppable) each. In deadline order, add each
    job's work; whenever the work due by a deadline exceeds ``capacity_gpus`` x the time until
    it, drop the droppable job with the most work so far (equal work to 0.1 GPU s: the later
    deadline). Returns the indices dropped. Maximises the number kept on a single pooled machine
    of ``capacity_gpus`` GPUs (a fluid model: any job may use any share of the GPUs at any time).
    """
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i][0], not jobs[i][2], i))
    heap: list[tuple[float, float, float, int]] = []
    cum = 0.0
    dropped: set[int] = set()
    for i in order:
        d, w, droppable = jobs[i]
        cum += w
        if droppable:
            heapq.heappush(heap, (-round(w, 1), -d, w, i))
        while heap and cum > capacity_gpus * (d - now) + EPS:
            _, _, w_j, j = heapq.heappop(heap)
            cum -= w_j
            dropped.add(j)
    return dropped
