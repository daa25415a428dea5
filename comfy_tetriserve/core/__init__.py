"""Torch-free core: the round state machine, the executor protocol and the simulated executor."""
