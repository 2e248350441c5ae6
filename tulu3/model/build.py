"""ModelConfig -> megatron TransformerConfig -> one TuluGPTModel per (virtual) pipeline stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from tulu3.config import ModelConfig
from tulu3.model.gpt import TuluGPTModel
from tulu3.model.presets import padded_vocab, resolve_shape
from tulu3.model.specs import has_transformer_engine, layer_spec
from tulu3.parallel.groups import ProcessGroups
from tulu3.parallel.layout import ParallelLayout

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise", "mxfp8": "mxfp8"}


def transformer_config(cfg: ModelConfig, layout: ParallelLayout,
                       per_token_loss: bool = True) -> TransformerConfig:
    """The one place ModelConfig becomes megatron's TransformerConfig."""
    shape = resolve_shape(cfg)
    dtype = DTYPES[cfg.dtype]
    on_gpu = torch.cuda.is_available()
    fp8 = {}
    if cfg.fp8 != "none":
        if cfg.spec != "te" or not has_transformer_engine():
            raise ValueError(f"model.fp8={cfg.fp8} needs model.spec=te and Transformer Engine")
        fp8 = dict(fp8="hybrid", fp8_recipe=FP8_RECIPES[cfg.fp8],
                   first_last_layers_bf16=cfg.fp8_bf16_edges)
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
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
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
            transformer_layer_spec=layer_spec(cfg.spec, config, vp),
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
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
