"""Scheduling policies: pure functions of (SchedulerView, CostModel) -> RoundPlan.

A policy object carries only its configuration; ``plan_round`` reads the view and the cost model
and returns a plan, with no clock, no I/O, no torch and no state kept between calls. The engine
validates every plan (comfy_tetriserve.plan.validate_plan).

``make_policy(name, **options)`` builds a policy by its registered name; each module registers
its policies in ``REGISTRY`` as name -> (module, factory attribute).
"""
from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

from ..cost import CostModel
from ..errors import InvalidRequest
from ..types import RoundPlan, SchedulerView


@runtime_checkable
class Policy(Protocol):
    name: str

    def plan_round(self, view: SchedulerView, cost: CostModel) -> RoundPlan: ...


#: name -> (module inside comfy_tetriserve.policy, factory callable name)
REGISTRY: dict[str, tuple[str, str]] = {
    "tetriserve": ("tetris", "make_tetriserve"),
    "tetriserve-boxes": ("boxes", "make_tetriserve_boxes"),
    "sp1": ("baselines", "make_sp1"),
    "sp2": ("baselines", "make_sp2"),
    "sp4": ("baselines", "make_sp4"),
    "sp8": ("baselines", "make_sp8"),
    "rssp": ("baselines", "make_rssp"),
    "rssp-paper": ("baselines", "make_rssp_paper"),
    "edf": ("baselines", "make_edf"),
    "sp1-admit": ("baselines", "make_sp1_admit"),
    "sp2-admit": ("baselines", "make_sp2_admit"),
    "sp4-admit": ("baselines", "make_sp4_admit"),
    "sp8-admit": ("baselines", "make_sp8_admit"),
    "rssp-admit": ("baselines", "make_rssp_admit"),
    "edf-admit": ("baselines", "make_edf_admit"),
}


def policy_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def make_policy(name: str, **options: Any) -> Policy:
    """Build a registered policy; unknown names raise InvalidRequest listing the known ones."""
    try:
        module_name, factory = REGISTRY[name]
    except KeyError:
        known = ", ".join(REGISTRY) or "none registered"
        raise InvalidRequest(f"unknown policy {name!r} (known: {known})") from None
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, factory)(**options)
