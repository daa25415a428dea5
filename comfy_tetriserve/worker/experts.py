"""Two-expert jobs (Wan 2.2 A14B): a high-noise and a low-noise model switched at a sigma boundary.

A job names its (high-noise) model as usual and, in ``SamplingJob.extra["expert"]``, the low-noise
model and the boundary: ``{"model": NAME, "boundary": SIGMA}``. Each step runs on the high-noise
model while the step's starting sigma is >= the boundary, on the low-noise model after, as two
ComfyUI samplers split at that step would (KSamplerAdvanced end_at_step / start_at_step; the
expert is chosen per step, so a multi-evaluation sampler step stays on one model). Both experts
must be loaded (every worker holds every loaded model, so any group can run either); they must
share family, latent channels and text width. The planner prices the job as its named model: the
Wan 2.2 A14B experts have the same architecture, so the price is the same either side of the
boundary.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.experts import check_experts, parse_expert  # noqa: F401 (re-exported)


def model_for_step(traj, cond, default: str) -> str:
    """The model that runs ``traj``'s next step."""
    expert = getattr(cond, "expert", None)
    if expert is None:
        return default
    low, boundary = expert
    return default if float(traj.sigmas[traj.step_index]) >= boundary else low


def step_with_experts(runner_for: Callable[[str], Any], trajs: list, conds: list, vote: float,
                      default: str) -> tuple[list, object]:
    """One step of every trajectory, each on its expert: trajectories that need the same model
    share one batched step (``runner_for(name)`` gives that model's StepRunner). Every rank of a
    group holds the same trajectories, so all take the same branches in the same order."""
    names = [model_for_step(t, c, default) for t, c in zip(trajs, conds)]
    if len(set(names)) == 1:
        return runner_for(names[0]).step(trajs, conds, vote)
    out: list = [None] * len(trajs)
    signal = False
    for name in dict.fromkeys(names):
        idx = [i for i, n in enumerate(names) if n == name]
        # every sub-step carries the same vote, so any one's stop signal (a bool, or the group's votes
        # tensor read later without a host sync) speaks for the whole step
        new, signal = runner_for(name).step([trajs[i] for i in idx], [conds[i] for i in idx], vote)
        for i, t in zip(idx, new):
            out[i] = t
    return out, signal
