"""Usage reports from the job history (history.py), for ``GET /v1/usage`` and the usage page.

A report covers the jobs submitted in ``[since, until)`` (unix seconds), grouped by tenant or by
model: jobs by outcome, device-hours, SAR and latency percentiles per group, and per UTC day (of
submission) the device-hours per group, the SAR and the latency percentiles. SAR counts the jobs
that had a deadline and finished, failed or were lost in a restart (cancelled ones do not count),
as the metrics do. Latency is submission to finish, of finished jobs.

Queries run on a read-only connection of their own (``report`` is meant for a worker thread), so
the service's event loop and its writes go on meanwhile (SQLite in WAL mode lets readers and the
writer work at once).
"""
from __future__ import annotations

import datetime as dt
import math
import sqlite3
from collections import defaultdict

from ..errors import InvalidRequest
from .history import connect

GROUPINGS = ("tenant", "model")
DEFAULT_SPAN_S = 7 * 86400.0
PERCENTILES = (50, 90, 99)
_DEADLINE_ENDED = "deadline_at IS NOT NULL AND status IN ('finished', 'failed', 'lost')"


def parse_time(raw: str | None, default: float, what: str) -> float:
    """A query time: unix seconds, or an ISO 8601 date or date-time (UTC unless it says otherwise)."""
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        try:
            parsed = dt.datetime.fromisoformat(raw)
        except ValueError:
            raise InvalidRequest(f"{what} must be unix seconds or an ISO 8601 date (2026-01-31 or "
                                 f"2026-01-31T12:00:00Z), got {raw[:40]!r}") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.timezone.utc)
        return parsed.timestamp()
    if not math.isfinite(value) or not 0 <= value < 1e11:
        raise InvalidRequest(f"{what} must be unix seconds between 0 and 1e11")
    return value


def percentiles(values: list[float]) -> dict[str, float | None]:
    """Nearest-rank percentiles of ``values`` (sorted or not); None when empty."""
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for p in PERCENTILES:
        out[f"p{p}_s"] = ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)] if ordered else None
    return out


def _sar(num_met: int, num_deadline: int) -> float | None:
    return num_met / num_deadline if num_deadline else None


def _day(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d")


def empty_report(since: float, until: float, by: str) -> dict:
    return {"since": since, "until": until, "by": by, "history": False, "num_jobs": 0, "gpu_hours": 0.0,
            "sar": None, "latency": percentiles([]), "groups": [], "days": []}


def report(path: str | None, since: float, until: float, by: str) -> dict:
    """The usage report (see the module docstring); an empty one without a history file."""
    if by not in GROUPINGS:
        raise InvalidRequest(f"by must be one of {', '.join(GROUPINGS)}, got {by[:40]!r}")
    if until <= since:
        raise InvalidRequest("until must be later than since")
    if path is None:
        return empty_report(since, until, by)
    try:
        db = connect(path, readonly=True)
    except sqlite3.Error:
        return empty_report(since, until, by)
    try:
        return _report(db, since, until, by)
    except sqlite3.OperationalError:  # no jobs table yet (a history opened but never written)
        return empty_report(since, until, by)
    finally:
        db.close()


def _report(db: sqlite3.Connection, since: float, until: float, by: str) -> dict:
    window = "submitted_at >= ? AND submitted_at < ?"
    rows = db.execute(
        f"SELECT {by}, CAST(submitted_at / 86400 AS INTEGER) AS day, COUNT(*), "
        "SUM(status = 'finished'), SUM(status = 'failed'), SUM(status = 'cancelled'), SUM(status = 'lost'), "
        f"SUM(status IS NULL), SUM(gpu_s), SUM({_DEADLINE_ENDED}), SUM(met_deadline = 1) "
        f"FROM jobs WHERE {window} GROUP BY {by}, day", (since, until)).fetchall()
    latencies = db.execute(
        f"SELECT {by}, CAST(submitted_at / 86400 AS INTEGER), ended_at - submitted_at FROM jobs "
        f"WHERE {window} AND status = 'finished'", (since, until)).fetchall()

    counters = ("num_jobs", "num_finished", "num_failed", "num_cancelled", "num_lost", "num_open")
    groups: dict[str, dict] = defaultdict(lambda: dict.fromkeys(counters + ("gpu_s", "num_deadline", "num_met"), 0))
    days: dict[int, dict] = defaultdict(lambda: {"gpu_s": defaultdict(float), "num_jobs": 0, "num_deadline": 0,
                                                 "num_met": 0})
    for key, day, n, fin, failed, cancelled, lost, still_open, gpu_s, n_deadline, n_met in rows:
        g = groups[key]
        for name, value in zip(counters, (n, fin, failed, cancelled, lost, still_open)):
            g[name] += value or 0
        g["gpu_s"] += gpu_s or 0.0
        g["num_deadline"] += n_deadline or 0
        g["num_met"] += n_met or 0
        d = days[day]
        d["gpu_s"][key] += gpu_s or 0.0
        d["num_jobs"] += n
        d["num_deadline"] += n_deadline or 0
        d["num_met"] += n_met or 0
    by_group: dict[str, list[float]] = defaultdict(list)
    by_day: dict[int, list[float]] = defaultdict(list)
    for key, day, latency in latencies:
        by_group[key].append(latency)
        by_day[day].append(latency)

    group_list = []
    for key in sorted(groups, key=lambda k: -groups[k]["gpu_s"]):
        g = groups[key]
        group_list.append({
            "key": key, **{name: g[name] for name in counters}, "gpu_hours": g["gpu_s"] / 3600.0,
            "num_deadline_jobs": g["num_deadline"], "num_met": g["num_met"],
            "sar": _sar(g["num_met"], g["num_deadline"]), "latency": percentiles(by_group[key]),
        })
    day_list = []
    for day in sorted(days):
        d = days[day]
        day_list.append({
            "day": _day(day * 86400.0), "num_jobs": d["num_jobs"],
            "gpu_hours": {k: v / 3600.0 for k, v in sorted(d["gpu_s"].items())},
            "num_deadline_jobs": d["num_deadline"], "num_met": d["num_met"], "sar": _sar(d["num_met"], d["num_deadline"]),
            "latency": percentiles(by_day[day]),
        })
    total_deadline = sum(g["num_deadline"] for g in groups.values())
    total_met = sum(g["num_met"] for g in groups.values())
    return {
        "since": since, "until": until, "by": by, "history": True,
        "num_jobs": sum(g["num_jobs"] for g in groups.values()),
        "gpu_hours": sum(g["gpu_s"] for g in groups.values()) / 3600.0,
        "sar": _sar(total_met, total_deadline), "latency": percentiles([x for v in by_group.values() for x in v]),
        "groups": group_list, "days": day_list,
    }
