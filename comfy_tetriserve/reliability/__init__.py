"""Reliability drills against a real service: worker faults, a soak, hostile input (``comfy-tetriserve reliability``)."""
