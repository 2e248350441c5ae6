"""DPO: the losses (registry, :mod:`.losses`), the stage (:mod:`.stage`), reference log-probs
(:mod:`.reference`) and the loop (:mod:`.loop`)."""
