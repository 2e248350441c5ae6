"""Fixes for megatron-core 0.16.1's DistributedOptimizer on the torch-optimizer path.

Without Apex or Transformer Engine (CPU, and GPUs without them), megatron's DistributedOptimizer
wraps ``torch.optim.AdamW``, and its checkpoint code has three bugs (DESIGN.md), all caught by
the exact-resume test (tests/trainer/test_resume.py):

1. ``state_dict()`` of a never-stepped optimizer asserts ``len(steps) == 1`` (there is no state).
2. ``_set_main_param_and_optimizer_states`` copies every key of the live Adam state, ``step``
   included, from the loaded tensors, which have no ``step``: KeyError.
3. ``load_state_dict`` gives every parameter ONE shared ``step`` tensor; torch's Adam increments
   it in place once per parameter, so after a resume the bias correction is wrong (measured: loss
   5.2975 instead of 5.2733 one step later).

:func:`install` patches the three methods once; with Apex/TE present it does nothing.
"""

from __future__ import annotations

from typing import Any

_INSTALLED = False


def install() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.optimizer import distrib_optimizer as module

    if getattr(module, "HAVE_APEX_OR_TE", True):
        _INSTALLED = True
        return
    cls = module.DistributedOptimizer
    for name in ("state_dict", "load_state_dict", "_set_main_param_and_optimizer_states"):
        if not hasattr(cls, name):
            raise RuntimeError(f"megatron moved DistributedOptimizer.{name}")
    original_state_dict = cls.state_dict
    original_load = cls.load_state_dict

    def state_dict(self: Any) -> dict:
        if self.optimizer.state:
            return original_state_dict(self)
        inner = self.optimizer.state_dict()
        out = {"optimizer": {k: v for k, v in inner.items() if k != "state"}}
        for group in out["optimizer"]["param_groups"]:
            del group["params"]
            group["step"] = 0
        if self.grad_scaler:
            out["grad_scaler"] = self.grad_scaler.state_dict()
        return out

    def load_state_dict(self: Any, state: dict) -> None:
        original_load(self, state)
        for param_state in self.optimizer.state.values():
            if "step" in param_state:  # one tensor per parameter, not one shared
                param_state["step"] = param_state["step"].detach().clone()

    def set_states(self: Any, model_param: Any, tensors: dict) -> None:
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destination = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            destination[key].copy_(value)

    cls.state_dict = state_dict
    cls.load_state_dict = load_state_dict
    cls._set_main_param_and_optimizer_states = set_states
    _INSTALLED = True
