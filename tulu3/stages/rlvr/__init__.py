"""RLVR: PPO / GRPO loss math (:mod:`.losses`), the stages (:mod:`.stage`), the value and
reference models (:mod:`.models`) and the loop (:mod:`.loop`); rollouts are :mod:`tulu3.rollout`."""
