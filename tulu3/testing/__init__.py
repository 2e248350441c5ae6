"""Test helpers shipped with the library: one way to run a function on N gloo processes
(:mod:`.distributed`) and tiny Hugging Face Llama oracles (:mod:`.hf`)."""

from tulu3.testing.distributed import free_port, run_distributed_test, run_in_child
from tulu3.testing.hf import hf_llama_config, tiny_hf_llama

__all__ = ["free_port", "hf_llama_config", "run_distributed_test", "run_in_child",
           "tiny_hf_llama"]
