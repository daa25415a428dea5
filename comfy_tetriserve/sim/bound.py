"""Offline upper bound on SAR: a mixed-integer program over rounds, solved by HiGHS (scipy).

Formulation. Cut time into rounds of length tau (r = 0..R-1, round r = [t0 + r tau, t0 + (r+1) tau)).
For request i with steps S_i, arrival a_i, deadline D_i and step time T_ik at degree k:

    x_i        in {0, 1}   request i finishes by its deadline
    z_irk      in [0, 1]   share of round r during which i runs at degree k

    maximise   sum_i x_i
    s.t.       sum_i sum_k k z_irk <= N                       (GPU capacity, every round r)
               sum_k z_irk <= f_ir x_i                        (one group at a time, inside its window)
               sum_r sum_k z_irk tau / T_ik >= S_i x_i        (all steps done by the deadline)

where f_ir is the share of round r that lies inside [a_i, D_i] (z_irk does not exist where f_ir = 0).

Why this bounds every schedule our engine can produce (round-based or not, any placement): take
any schedule and let z_irk be the time i spends at degree k during round r, divided by tau. At
any instant the running degrees sum to at most N and a request runs on one group, so the first
two constraints hold round by round; the steps a request completes inside its window equal
sum z tau / T_ik, so an on-time request satisfies the third. Hence (x, z) is feasible and the
optimum is at least that schedule's on-time count. The program relaxes what real schedules must
also respect (whole steps, aligned groups, dispatch overheads) and knows the future, so it is an
upper bound, not an achievable target. Dropping a request's work when it does not finish
(sum_k z <= f x) loses nothing and tightens the relaxation. The finer tau, the tighter the
round structure; every tau gives a valid bound.

Instantaneous patterns (``patterns=True``, the default). The capacity row above only bounds a
round's *average* GPU use, so it accepts rounds no schedule can run: a 256 px request at degree 1
all round and two 1024 px requests at degree 4 for 100 % and 75 % of it average 8 GPUs, but for
75 % of the round they need 9. At any instant the running degrees form a multiset of allowed
degrees summing to at most N; extend it to a *maximal* one (no further allowed degree fits), a
pattern p with m_p(k) slots of degree k (N = 8 with degrees 1, 2, 4, 8: the ten partitions of 8,
{8}, {4,4}, {4,2,2}, ..., {1 x 8}). With w_rp the share of round r spent in pattern p:

               sum_p w_rp <= 1                                       (every round r)
               sum_{k in K} z_irk <= sum_{p: p has a slot in K} w_rp  (every set K of degrees:
                                                                       i holds one slot at a time)
               sum_i z_irk <= sum_p m_p(k) w_rp                       (every degree k: the k slots)

Any schedule gives a feasible point (w from its patterns over time, z as
before), so the bound stays valid; it only removes rounds that no instant-by-instant packing
can realise.

Event rounds (``event_rounds=True``, the default). Rounds need not be of equal length: the proof
above holds for any partition of time, with a round's steps counted over its own length. The
uniform grid is refined by every arrival and every deadline, so no round straddles one. On a
uniform grid a request arriving inside a round may use its share f_ir of that round's
*averaged* capacity, in effect GPUs that were idle before it arrived (a burst arriving just
after a quiet stretch). With the events as round ends f_ir is 0 or 1. The refined partition
contains the uniform one, and every point of the refined program sums round by round to a point of the
coarse one, so the refined optimum is never larger: a tighter bound, still a valid one.

Batched pairs (``pairs=True``, the default). The engine may run two requests of one shape as one
batched step (TetriServe's selective batching pairs them), which advances both for one step time of
the doubled batch: on one GPU two 256 px requests take 2.68 s together and 3.06 s one after the
other. Without it the program bounds only schedules that never batch. For every two requests i, j of
one (model, size, batch) whose windows share round r, y_ijrk in [0, 1] is the share of round r they
run together at degree k. It holds one group of degree k (capacity and pattern rows), counts in the
one-group row of both i and j (neither runs elsewhere meanwhile, and it exists only where both are
counted), and adds tau / T2_k steps to both, T2_k the step time of the doubled batch. Any schedule
of single and paired steps then gives a feasible point as before, so the optimum bounds it. (Larger
batches of one shape are not modelled; the planner forms pairs only.)
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..cost import CostModel
from ..types import GenRequest


@dataclass(frozen=True)
class BoundResult:
    num_requests: int
    num_on_time: int
    sar: float
    tau_s: float
    status: str
    mip_gap: float
    solve_s: float
    on_time_ids: tuple[str, ...]


def degree_patterns(degrees: Sequence[int], num_gpus: int) -> tuple[dict[int, int], ...]:
    """The maximal multisets of ``degrees`` summing to at most ``num_gpus`` (as {degree: count}):
    every set of groups running at one instant fits in one of them."""
    ds = sorted({int(k) for k in degrees if 1 <= k <= num_gpus}, reverse=True)
    if not ds:
        return ()
    smallest = ds[-1]
    out: list[dict[int, int]] = []

    def extend(index: int, left: int, counts: dict[int, int]) -> None:
        if index == len(ds):
            if left < smallest:  # maximal: no allowed degree fits any more
                out.append({k: c for k, c in counts.items() if c})
            return
        k = ds[index]
        for c in range(left // k, -1, -1):
            counts[k] = c
            extend(index + 1, left - c * k, counts)
        counts[k] = 0

    extend(0, num_gpus, {})
    return tuple(out)


def sar_upper_bound(trace: Sequence[GenRequest], cost: CostModel, num_gpus: int = 8, *, tau_s: float = 0.25,
                    time_limit_s: float = 60.0, mip_rel_gap: float = 0.0,
                    max_degree: int | None = None, patterns: bool = True,
                    event_rounds: bool = True, pairs: bool = True) -> BoundResult:
    """Solve the program above for ``trace`` (requests without a deadline are ignored). ``max_degree``
    caps a request's degree below ``num_gpus`` (several boxes pooled: a group never exceeds one box).
    ``patterns=False`` drops the instantaneous-pattern rows, ``event_rounds=False`` the round ends at
    arrivals and deadlines (each gives a looser program, still a bound); ``pairs=False`` the batched
    pairs (then it bounds only schedules that never batch two requests)."""
    import time

    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    reqs = [r for r in trace if r.deadline_at is not None]
    if not reqs:
        return BoundResult(0, 0, float("nan"), tau_s, "empty", 0.0, 0.0, ())
    t0 = min(r.arrival_at for r in reqs)
    t_end = max(r.deadline_at for r in reqs)
    num_rounds = int(math.ceil((t_end - t0) / tau_s)) + 1
    edges = [t0 + rd * tau_s for rd in range(num_rounds + 1)]
    if event_rounds:  # rounds also end at every arrival and deadline: a request's window is whole rounds
        edges = sorted(set(edges) | {r.arrival_at for r in reqs} | {r.deadline_at for r in reqs})
        merged = [edges[0]]
        for e in edges[1:]:
            if e - merged[-1] > 1e-9:
                merged.append(e)
        edges = merged
    # variable layout: x_0..x_{n-1}, then z variables
    n = len(reqs)
    #: (requests, round, degree, steps per full round): one request, or a pair batched in each step
    z_index: list[tuple[tuple[int, ...], int, int, float]] = []
    share: dict[tuple[int, int], float] = {}
    degrees_of: dict[int, list[int]] = {}
    rounds_of: dict[int, list[int]] = {}
    for i, r in enumerate(reqs):
        degrees = degrees_of[i] = [k for k in cost.allowed_degrees(r.model)
                                   if k <= min(num_gpus, max_degree or num_gpus)]
        times = {k: cost.step_time_s(r.model, r.height, r.width, r.batch, k) for k in degrees}
        first = max(bisect.bisect_right(edges, r.arrival_at + 1e-12) - 1, 0)
        for rd in range(first, len(edges) - 1):
            start, end = edges[rd], edges[rd + 1]
            if start >= r.deadline_at - 1e-12:
                break
            lo = max(start, r.arrival_at)
            hi = min(end, r.deadline_at)
            f = (hi - lo) / (end - start)
            if f <= 1e-9:
                continue
            share[(i, rd)] = f
            rounds_of.setdefault(i, []).append(rd)
            for k in degrees:
                z_index.append(((i,), rd, k, (end - start) / times[k]))
    if pairs:  # two requests of one shape may share every step (the engine batches them)
        by_shape: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            by_shape.setdefault((r.model, r.height, r.width, r.batch), []).append(i)
        for (model, height, width, batch), members in by_shape.items():
            times2 = None
            for a_pos, i in enumerate(members):
                for j in members[a_pos + 1:]:
                    both = [rd for rd in rounds_of.get(i, ()) if (j, rd) in share]
                    if not both:
                        continue
                    if times2 is None:
                        times2 = {k: cost.step_time_s(model, height, width, 2 * batch, k) for k in degrees_of[i]}
                    for rd in both:
                        for k in degrees_of[i]:
                            z_index.append(((i, j), rd, k, (edges[rd + 1] - edges[rd]) / times2[k]))
    nz = len(z_index)
    nv = n + nz
    c = np.zeros(nv)
    c[:n] = -1.0
    rows, cols, vals = [], [], []
    lb, ub = [], []
    row = 0
    # capacity per round
    by_round: dict[int, list[int]] = {}
    for j, (_, rd, k, _) in enumerate(z_index):
        by_round.setdefault(rd, []).append(j)
    for rd, js in by_round.items():
        for j in js:
            rows.append(row), cols.append(n + j), vals.append(float(z_index[j][2]))
        lb.append(-np.inf), ub.append(float(num_gpus))
        row += 1
    # one group at a time within the window, and only for counted requests
    by_req_round: dict[tuple[int, int], list[int]] = {}
    for j, (members, rd, k, _) in enumerate(z_index):
        for i in members:
            by_req_round.setdefault((i, rd), []).append(j)
    for (i, rd), js in by_req_round.items():
        for j in js:
            rows.append(row), cols.append(n + j), vals.append(1.0)
        rows.append(row), cols.append(i), vals.append(-share[(i, rd)])
        lb.append(-np.inf), ub.append(0.0)
        row += 1
    # progress
    by_req: dict[int, list[int]] = {}
    for j, (members, rd, k, steps) in enumerate(z_index):
        for i in members:
            by_req.setdefault(i, []).append(j)
    for i, r in enumerate(reqs):
        for j in by_req.get(i, ()):
            rows.append(row), cols.append(n + j), vals.append(z_index[j][3])
        rows.append(row), cols.append(i), vals.append(-float(r.num_steps))
        lb.append(0.0), ub.append(np.inf)
        row += 1
    if patterns:
        row, nv = _pattern_rows(z_index, n, num_gpus, rows, cols, vals, lb, ub, row, nv)
    c = np.concatenate([c, np.zeros(nv - len(c))])
    a = coo_matrix((vals, (rows, cols)), shape=(row, nv)).tocsr()
    integrality = np.zeros(nv)
    integrality[:n] = 1
    started = time.perf_counter()
    res = milp(c, constraints=LinearConstraint(a, lb, ub), integrality=integrality,
               bounds=Bounds(np.zeros(nv), np.ones(nv)),
               options={"time_limit": time_limit_s, "mip_rel_gap": mip_rel_gap, "disp": False})
    solve_s = time.perf_counter() - started
    if res.x is None:
        raise RuntimeError(f"bound MILP failed: {res.message}")
    x = res.x[:n]
    on_time = tuple(r.request_id for r, v in zip(reqs, x) if v > 0.5)
    # with a time limit the incumbent may not be optimal: report the proven dual bound instead
    dual = getattr(res, "mip_dual_bound", None)
    best = len(on_time)
    bound_count = -dual if dual is not None and math.isfinite(dual) else float(best)
    gap = float(getattr(res, "mip_gap", 0.0) or 0.0)
    count = best if res.status == 0 else math.floor(bound_count + 1e-6)
    return BoundResult(n, count, count / n, tau_s, res.message if res.status != 0 else "optimal", gap,
                       solve_s, on_time)


def _pattern_rows(z_index: list[tuple[tuple[int, ...], int, int, float]], first: int, num_gpus: int,
                  rows: list, cols: list, vals: list, lb: list, ub: list, row: int, nv: int) -> tuple[int, int]:
    """Append the instantaneous-pattern rows (module docstring) for the z variables in ``z_index``
    (z_j is variable ``first + j``); the w variables start at ``nv``. Returns (rows, variables)."""
    inf = float("inf")
    pats = degree_patterns({k for _, _, k, _ in z_index}, num_gpus)
    by_round_degree: dict[tuple[int, int], list[int]] = {}
    for j, (_, rd, k, _) in enumerate(z_index):
        by_round_degree.setdefault((rd, k), []).append(j)
    w_of: dict[tuple[int, int], int] = {}  # (round, pattern) -> variable
    for rd in sorted({rd for _, rd, _, _ in z_index}):
        for p in range(len(pats)):
            w_of[(rd, p)] = nv
            nv += 1
            rows.append(row), cols.append(w_of[(rd, p)]), vals.append(1.0)
        lb.append(-inf), ub.append(1.0)
        row += 1
    # one request at the degrees of a set K only while the pattern has a slot of a degree in K
    # (at one instant a request holds one slot): every K that some pattern misses
    all_degrees = sorted({k for _, _, k, _ in z_index})
    subsets = []
    for mask in range(1, 1 << len(all_degrees)):
        ks = {k for b, k in enumerate(all_degrees) if mask >> b & 1}
        having = [p for p, pat in enumerate(pats) if ks & set(pat)]
        if len(having) < len(pats):
            subsets.append((ks, having))
    by_request_round: dict[tuple[int, int], dict[int, list[int]]] = {}
    for j, (members, rd, k, _) in enumerate(z_index):
        for i in members:
            by_request_round.setdefault((i, rd), {}).setdefault(k, []).append(j)
    for (i, rd), of_degree in by_request_round.items():
        for ks, having in subsets:
            if not ks <= of_degree.keys():  # a K beyond i's degrees repeats a smaller K's row
                continue
            js = [j for k in ks for j in of_degree[k]]
            for j in js:
                rows.append(row), cols.append(first + j), vals.append(1.0)
            for p in having:
                rows.append(row), cols.append(w_of[(rd, p)]), vals.append(-1.0)
            lb.append(-inf), ub.append(0.0)
            row += 1
    for (rd, k), js in by_round_degree.items():
        slots = [(w_of[(rd, p)], pat.get(k, 0)) for p, pat in enumerate(pats) if pat.get(k, 0)]
        # all of them share the k slots
        for j in js:
            rows.append(row), cols.append(first + j), vals.append(1.0)
        for w, m in slots:
            rows.append(row), cols.append(w), vals.append(-float(m))
        lb.append(-inf), ub.append(0.0)
        row += 1
    return row, nv


def isolated_bound(trace: Sequence[GenRequest], cost: CostModel, num_gpus: int = 8, *,
                   overhead_s: float = 0.0) -> float:
    """Share of the requests with a deadline that could meet it alone on the whole box: arrival +
    ``overhead_s`` + steps x the fastest step over the degrees that fit ``num_gpus`` <= deadline.
    No schedule does better on a request than running it alone, so no policy's SAR on ``trace``
    exceeds this (a much looser bound than the program above, but free to compute)."""
    reqs = [r for r in trace if r.deadline_at is not None]
    if not reqs:
        return float("nan")
    fastest: dict[tuple, float] = {}
    ok = 0
    for r in reqs:
        key = (r.model, r.height, r.width, r.batch)
        if key not in fastest:
            fastest[key] = min(cost.step_time_s(r.model, r.height, r.width, r.batch, k)
                               for k in cost.allowed_degrees(r.model) if k <= num_gpus)
        ok += r.arrival_at + overhead_s + r.num_steps * fastest[key] <= r.deadline_at + 1e-9
    return ok / len(reqs)
