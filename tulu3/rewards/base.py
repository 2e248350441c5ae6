"""The verifier contract: :class:`VerifyResult`, the registry, :func:`verify` and the RLVR reward.

A verifier is a plain function ``(response, ground_truth) -> VerifyResult | bool`` registered
under a dataset name. Built-in ones (gsm8k, math, ifeval) register themselves when
``tulu3.rewards`` is imported; a user adds one with a single decorator::

    @register_verifier("my_code_tests")
    def verify_code(response: str, ground_truth: str) -> bool:
        ...

Verifiers must be defined at module level in an importable module: :class:`~tulu3.rewards.sandbox.
VerifierPool` workers find them by ``(module, qualname)``, so a worker imports the module (which
registers the verifier there too) rather than receiving pickled code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = [
    "VerifyResult",
    "as_result",
    "get_verifier",
    "register_verifier",
    "registered_datasets",
    "rlvr_reward",
    "verify",
]


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of verifying one response.

    Attributes:
        correct: whether the response satisfies the ground truth.
        extracted: the answer the verifier read from the response (None when none was found, or the
            verifier does not extract one, e.g. IFEval).
        reason: a short human-readable why; the pool uses exactly ``"timeout"`` and
            ``"error: ..."`` for items it could not score.
    """

    correct: bool
    extracted: str | None = None
    reason: str = ""

    @property
    def timed_out(self) -> bool:
        """True when the item hit its time limit (counted as incorrect)."""
        return self.reason == "timeout"

    @property
    def errored(self) -> bool:
        """True when the verifier raised or its worker died (counted as incorrect)."""
        return self.reason.startswith("error:")


VerifierFn = Callable[[str, str], VerifyResult | bool]
F = TypeVar("F", bound=VerifierFn)

_REGISTRY: dict[str, VerifierFn] = {}


def _key(name: str) -> str:
    """Dataset names compare case-insensitively ("MATH" in Tülu 3's RLVR rows is "math")."""
    return name.strip().lower()


def register_verifier(name: str) -> Callable[[F], F]:
    """Decorator that registers ``fn(response, ground_truth)`` as the verifier for ``name``.

    The function is returned unchanged so it stays picklable by reference. Registering a different
    function under a taken name raises (a silent override would change rewards without notice);
    re-registering the same function (a module imported twice) is allowed.
    """
    key = _key(name)

    def decorator(fn: F) -> F:
        old = _REGISTRY.get(key)
        if old is not None and _ref(old) != _ref(fn):
            raise ValueError(f"a verifier is already registered for {name!r}: {_ref(old)}")
        _REGISTRY[key] = fn
        return fn

    return decorator


def _ref(fn: Callable) -> tuple[str, str]:
    return (fn.__module__, fn.__qualname__)


def registered_datasets() -> list[str]:
    """The dataset names that have a verifier, sorted."""
    return sorted(_REGISTRY)


def get_verifier(dataset: str) -> VerifierFn:
    """The verifier registered for ``dataset`` (case-insensitive); ValueError when there is none."""
    fn = _REGISTRY.get(_key(dataset))
    if fn is None:
        known = ", ".join(registered_datasets())
        raise ValueError(f"no verifier for dataset {dataset!r}; known datasets: {known}")
    return fn


def as_result(value: VerifyResult | bool) -> VerifyResult:
    """Accept a verifier's bool as well as a full :class:`VerifyResult`."""
    if isinstance(value, VerifyResult):
        return value
    if isinstance(value, bool):
        return VerifyResult(correct=value, extracted=None, reason="pass" if value else "fail")
    raise TypeError(f"a verifier must return VerifyResult or bool, got {type(value).__name__}")


def verify(dataset: str, response: str, ground_truth: str) -> VerifyResult:
    """Verify one response in this process (no time limit: use VerifierPool for model output).

    Args:
        dataset: "gsm8k", "math", "ifeval" or any registered name, case-insensitive.
        response: the model's response text (the assistant turn only).
        ground_truth: the row's ``ground_truth`` string.
    """
    return as_result(get_verifier(dataset)(response, ground_truth))


def rlvr_reward(result: VerifyResult, has_eos: bool, correct_reward: float = 10.0,
                no_eos_penalty: float = -10.0) -> float:
    """Tülu 3's RLVR reward: ``correct_reward`` if verified else 0, and ``no_eos_penalty`` instead
    of either when the response was cut off before its eos (open-instruct replaces the score, it
    does not add to it)."""
    if not has_eos:
        return float(no_eos_penalty)
    return float(correct_reward) if result.correct else 0.0
