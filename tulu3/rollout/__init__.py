"""RLVR generation from the current policy, in-process on the trainer's own megatron chunks.

    from tulu3.rollout import SamplingParams, generate

``generate`` (engine.py) runs prefill + KV-cached decoding (kv_cache.py) through any TP / PP /
VPP layout and samples with per-sample seeded generators (sampling.py). There is no vLLM
backend: ``rlvr.rollout_backend=vllm`` is rejected with an explanation (tulu3/loops/rlvr.py).
"""

from tulu3.rollout.engine import GenerationResult, PipelineComm, generate, generation_mode
from tulu3.rollout.kv_cache import kv_cache
from tulu3.rollout.sampling import SamplingParams

__all__ = ["GenerationResult", "PipelineComm", "SamplingParams", "generate", "generation_mode",
           "kv_cache"]
