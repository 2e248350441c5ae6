"""Reward model: the Bradley-Terry stage (:mod:`.stage`), scoring (:mod:`.score`) and HF export
(:mod:`.export`); the scalar head is :mod:`tulu3.model.scalar_head`."""
