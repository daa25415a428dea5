"""Reliability drills against a real service: worker faults, a soak, hostile input.

``comfy-tetriserve reliability`` (command.py) runs them; docs/reliability.md has the numbers.
"""
