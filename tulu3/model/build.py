"""ModelConfig -> megatron TransformerConfig -> one TuluGPTModel per (virtual) pipeline stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from tulu3.config import ModelConfig
from tulu3.model import fusions
from tulu3.model.fp8_recipe import check_fp8, check_te_version, te_fp8_args
from tulu3.model.gpt import TuluGPTModel
from tulu3.model.presets import padded_vocab, resolve_shape
from tulu3.model.specs import PACKED_FORMATS, has_transformer_engine, layer_spec
from tulu3.parallel.groups import ProcessGroups
from tulu3.parallel.layout import ParallelLayout

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def transformer_config(cfg: ModelConfig, layout: ParallelLayout,
                       per_token_loss: bool = True) -> TransformerConfig:
    """The one place ModelConfig becomes megatron's TransformerConfig."""
    shape = resolve_shape(cfg)
    dtype = DTYPES[cfg.dtype]
    on_gpu = torch.cuda.is_available()
    check_fp8(cfg, layout.pp)  # again: a ModelConfig built in code skips load_config
    fp8 = te_fp8_args(cfg)  # the torch spec's FP8 lives in its layer spec (tulu3/model/fp8.py)
    if fp8 and has_transformer_engine():  # without TE, layer_spec refuses the te spec
        from transformer_engine import __version__ as te_version

        check_te_version(cfg, te_version)
    recompute = {}
    if cfg.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=1)
    elif cfg.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    return TransformerConfig(
        num_layers=shape.layers,
        hidden_size=shape.hidden,
        num_attention_heads=shape.heads,
        num_query_groups=shape.kv_heads,
        ffn_hidden_size=shape.ffn_hidden,
        kv_channels=shape.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        **layout.transformer_config_args(),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        calculate_per_token_loss=per_token_loss,
        # Micro-batches are padded to their own longest sequence.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # unused (dense); allgather rejects the above
        # gloo swaps same-tag batched sends to one peer (PP=2): wrong numbers, silently.
        batch_p2p_comm=on_gpu,
        use_cpu_initialization=not on_gpu,
        **fusions.transformer_config_args(cfg),  # model.fused: decided in tulu3/model/fusions.py
        **fp8,
        **recompute,
    )


def build_model_chunks(cfg: ModelConfig, layout: ParallelLayout, groups: ProcessGroups,
                       per_token_loss: bool = True,
                       model_class: type[TuluGPTModel] = TuluGPTModel) -> list[TuluGPTModel]:
    """Build this rank's model: one chunk per virtual pipeline stage (one without VPP).

    Call after :func:`tulu3.parallel.init.init_model_parallel`; ``groups`` says which pipeline
    rank this is. Weights are on the GPU when present, else on the CPU. ``model_class``: a
    TuluGPTModel subclass with another head (:class:`tulu3.model.scalar_head.ScalarHeadModel`).
    """
    shape = resolve_shape(cfg)
    config = transformer_config(cfg, layout, per_token_loss)
    vocab = padded_vocab(shape.vocab, layout.tp)
    chunks = []
    for vp_stage, (pre, post) in enumerate(layout.chunk_ends(groups.pp_rank)):
        vp = vp_stage if layout.vpp > 1 else None
        model = model_class(
            config=config,
            transformer_layer_spec=layer_spec(cfg.spec, config, vp, cfg, groups.pp_rank),
            vocab_size=vocab,
            max_sequence_length=shape.max_seq_len,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=shape.tied_embeddings,
            position_embedding_type="rope",
            rotary_base=int(shape.rope_theta),
            rope_scaling=shape.rope_scaling,
            vp_stage=vp,
        )
        model.packed_format = PACKED_FORMATS[cfg.spec]
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
