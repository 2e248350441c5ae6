"""Evaluation commands: ``python -m tulu3.eval`` (generate + verify, :mod:`.generate`) and
``python -m tulu3.eval_preferences`` (a reward model on preference pairs, :mod:`.preferences`),
with their shared set-up (layout, threads, output) in :mod:`.common`."""

from tulu3.eval.generate import evaluate, main, parse_args

__all__ = ["evaluate", "main", "parse_args"]
