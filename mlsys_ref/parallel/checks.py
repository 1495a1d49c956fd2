"""Tour rows for parallelism: the schedule simulator's bubble, TP=2 and ZeRO-2 on 2 gloo ranks (see mlsys_ref/tour.py).

The two distributed rows share one spawned world of 2 CPU processes (gloo), whatever the tour's
device: spawning costs seconds, and the NCCL versions are the ``gpu``-marked tests.
"""

from __future__ import annotations

import functools

import torch

from mlsys_ref.parallel.schedule_sim import gpipe_bubble, simulate
from mlsys_ref.testing import tolerance
from mlsys_ref.tour import Check


def _bubble_formula(device: torch.device) -> tuple[float, float]:
    worst = 0.0
    for schedule in ("gpipe", "1f1b"):
        for p, m in ((2, 3), (4, 8), (8, 5)):
            worst = max(worst, abs(simulate(schedule, p, m).bubble - gpipe_bubble(p, m)))
    return worst, tolerance(torch.float64).atol


@functools.lru_cache(maxsize=1)
def _two_ranks() -> list[dict]:
    from mlsys_ref.parallel.verify import Job, launch

    jobs = [Job(tp=2, steps=2), Job("zero", dp=2, zero_stage=2, steps=2)]
    return launch(jobs, 2, timeout_s=30.0, join_timeout_s=120.0)[0]


def _tp2_against_reference(device: torch.device) -> tuple[float, float]:
    return _two_ranks()[0]["max_rel_error"], tolerance(torch.float32).rtol


def _zero_against_adamw(device: torch.device) -> tuple[float, float]:
    return _two_ranks()[1]["max_rel_error"], tolerance(torch.float32).rtol


CHECKS = [
    Check("pipeline bubble (p-1)/(m+p-1), GPipe and 1F1B (simulator)", "Narayanan et al. 2021 §2.2", _bubble_formula),
    Check("tensor parallel TP=2 model, 2 steps vs reference (gloo)", "Shoeybi et al. 2019 §3", _tp2_against_reference),
    Check("ZeRO-2 AdamW, dp=2, 2 steps vs AdamW (gloo)", "Rajbhandari et al. 2020 §5", _zero_against_adamw),
]
