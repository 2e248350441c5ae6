"""Parallel-layout planner: memory and step-time model for Megatron layouts (docs/PLANNER.md).

The CLI is ``python -m tulu3.plan``; this package is the model behind it:
hardware (GPU table) -> problem (what to train) -> pipeline (schedule facts) -> memory, timing
(estimates) -> search (enumerate, fit, rank).
"""

from tulu3.parallel.layout import ParallelLayout
from tulu3.planner.hardware import GIB, GPUS, GPUSpec
from tulu3.planner.memory import ActivationTerms, Memory, peak_memory
from tulu3.planner.problem import STAGES, UNEVEN_KEYS, PlanError, Problem
from tulu3.planner.search import Candidate, choose, evaluate, plan, search
from tulu3.planner.timing import StepTime, step_time

__all__ = [
    "GIB", "GPUS", "STAGES", "UNEVEN_KEYS", "ActivationTerms", "Candidate", "GPUSpec", "Memory",
    "ParallelLayout", "PlanError", "Problem", "StepTime", "choose", "evaluate", "peak_memory",
    "plan", "search", "step_time",
]
