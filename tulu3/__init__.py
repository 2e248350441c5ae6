"""tulu3: Tülu 3 post-training (SFT -> DPO -> RLVR) for Llama 3.1 on Megatron-Core."""

__version__ = "0.1.0"
