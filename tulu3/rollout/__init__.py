"""RLVR generation from the current policy, in-process on the trainer's own megatron chunks.

    from tulu3.rollout import SamplingParams, generate

``generate`` (engine.py) runs prefill + KV-cached decoding (kv_cache.py) through any TP / PP /
VPP layout (with CP: without it, the CP ranks splitting the prompts) in generation
micro-batches (decode.py), several in flight over the pipeline stages
(pipeline.py), stops rows at eos or stop strings (stop.py) and samples with per-sample seeded
generators (sampling.py). There is no vLLM backend: ``rlvr.rollout_backend=vllm`` is rejected
with an explanation (tulu3/stages/rlvr/settings.py).
"""

from tulu3.rollout.engine import GenerationResult, PipelineComm, generate, generation_mode
from tulu3.rollout.kv_cache import kv_cache
from tulu3.rollout.sampling import SamplingParams
from tulu3.rollout.stop import StopStrings

__all__ = ["GenerationResult", "PipelineComm", "SamplingParams", "StopStrings", "generate",
           "generation_mode", "kv_cache"]
