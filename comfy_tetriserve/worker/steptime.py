"""Step times without a host sync per step.

On CUDA a step's kernels are queued and the host runs ahead; waiting for them after every step
(to time it) leaves the GPU idle while the next step is launched. ``StepTimer`` records a CUDA
event pair per step instead and reads the times once they are done (``ready``, non-blocking) or
at the end of the assignment (``finish``, one sync). On other devices it uses the wall clock.

The stop vote of a multi-device step is a tensor on the device: reading it is a sync too. On CUDA
the worker reads the previous step's votes after queuing the next step (``DeferredVote``), so
a stop takes effect one step later there (every rank reads the same gathered votes: they still
agree); elsewhere it takes effect after the current step.
"""
from __future__ import annotations

import time

import torch


class StepTimer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._open: list = []  # CUDA: (start, end) events of steps not yet read
        self._unread: list[float] = []  # elsewhere: times of steps not yet read
        self._t0 = 0.0
        self._start = None
        self.times: list[float] = []  # seconds of the steps read so far, in step order

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._open.append((self._start, end))
        else:
            self._unread.append(time.perf_counter() - self._t0)

    def ready(self) -> list[tuple[int, float]]:
        """(step number from 0, seconds) of the steps finished since the last call, in order, without waiting."""
        done = self._unread
        self._unread = []
        while self._open and self._open[0][1].query():
            start, end = self._open.pop(0)
            done.append(start.elapsed_time(end) / 1e3)
        first = len(self.times)
        self.times.extend(done)
        return [(first + i, t) for i, t in enumerate(done)]

    def finish(self) -> list[tuple[int, float]]:
        """Wait for every recorded step; the ones not yet read, as ``ready``."""
        if self._open:
            self._open[-1][1].synchronize()
        return self.ready()


class DeferredVote:
    """The group's agreed stop, read one step late on CUDA (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.defer = device.type == "cuda"
        self._pending = None

    def agreed(self, signal: bool | torch.Tensor) -> bool:
        """Pass this step's signal (a bool, or the gathered votes); whether to stop now."""
        if isinstance(signal, bool):
            return signal
        if not self.defer:
            return bool((signal > 0).any().item())
        previous, self._pending = self._pending, signal
        return previous is not None and bool((previous > 0).any().item())
