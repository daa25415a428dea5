"""Simulation: seeded workloads, the engine on a virtual clock, the offline bound, reports."""
