"""Execution: the round loop (engine.py, torch-free) and the workers that run DiT steps (torch)."""
