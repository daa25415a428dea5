"""Scheduling policies: pure functions of (SchedulerView, CostModel) -> RoundPlan."""
