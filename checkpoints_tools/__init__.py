"""Checkpoint tools: HF safetensors <-> tulu3 (megatron torch_dist) checkpoints, any TP/PP/VPP.

One concern per file:
- ``hf_io``: lazy safetensors reader and planned, streaming sharded safetensors writer.
- ``hf_config``: HF ``config.json`` <-> :class:`tulu3.model.presets.LlamaShape`, tokenizer files.
- ``dcp_io``: streaming reader/writer of megatron's torch_dist (PyTorch DCP) files, no processes.
- ``format``: the tulu3 checkpoint directory (``tulu3.json`` + ``model/``), shared with the trainer.
- ``hf_to_megatron`` / ``megatron_to_hf`` / ``reshard``: the command-line converters.
- ``load`` / ``export``: in-process loading (``model.load=``) and HF export from a training run.
"""


class ConversionError(ValueError):
    """Bad input to a conversion (missing file or tensor, wrong shape, bad layout); the message
    names the offending item. Raised before any expensive work where possible."""
