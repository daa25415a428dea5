"""The two small optimisations inside a TetriServe round, as pure functions (tested on their own)."""
from __future__ import annotations

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
