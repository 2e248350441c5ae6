"""HF ``config.json`` <-> :class:`LlamaShape`, the HF tensor list of a shape, tokenizer files.

Rope: Llama 3.1 configs carry ``rope_theta`` + ``rope_scaling`` ({"rope_type": "llama3", factor,
low_freq_factor, high_freq_factor, original_max_position_embeddings}); transformers 5 writes the
same numbers as ``rope_parameters``. Both are read; exports write the Llama 3.1 (legacy) keys,
which transformers 4/5 and vLLM all read, with the source's values when the source had a config.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tulu3.checkpoint.errors import ConversionError, read_json
from tulu3.model.presets import LlamaShape

# A reward model (LlamaForSequenceClassification, one label) has the same backbone.
ARCHITECTURES = ("LlamaForCausalLM", "LlamaForSequenceClassification")
# What tulu3's model (megatron's RotaryEmbedding with rope_scaling=True) implements.
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")
# Llama 3 <|begin_of_text|> / <|end_of_text|>: used when a shape has no source config.
LLAMA3_BOS, LLAMA3_EOS = 128000, 128001


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json (is this an HF model directory?)")
    return read_json(path)


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope scaling dict or None) from either config style."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    return float(theta), (None if kind == "default" else dict(scaling))


def shape_from_hf_config(cfg: dict[str, Any]) -> LlamaShape:
    """The LlamaShape of an HF Llama config; raises ConversionError for other architectures."""
    archs = cfg.get("architectures") or []
    if not any(a in ARCHITECTURES for a in archs):
        raise ConversionError(f"config.json: unknown architecture {archs} (model_type "
                              f"{cfg.get('model_type')!r}); tulu3 converts {list(ARCHITECTURES)}")
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ConversionError(f"config.json: head_dim={head_dim} x heads={heads} != "
                              f"hidden={hidden}; tulu3 derives head_dim = hidden / heads")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConversionError("config.json: attention_bias/mlp_bias are not supported (Llama has "
                              "no biases)")
    theta, scaling = _rope(cfg)
    return LlamaShape(
        layers=cfg["num_hidden_layers"], hidden=hidden, heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads, ffn_hidden=cfg["intermediate_size"],
        vocab=cfg["vocab_size"], norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), rope_theta=theta,
        rope_scaling=scaling is not None, tied_embeddings=bool(cfg.get("tie_word_embeddings")),
        max_seq_len=cfg.get("max_position_embeddings", 131072))


def rope_warning(cfg: dict[str, Any]) -> str | None:
    """A note when the config's rope scaling is not the Llama 3.1 scaling tulu3's model runs.

    Weights convert unchanged either way and exports restore the source's config.json; only a
    tulu3 training/forward run would use Llama 3.1's numbers instead.
    """
    _, scaling = _rope(cfg)
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    differs = {k: scaling.get(k) for k, v in LLAMA31_ROPE.items()
               if k != "rope_type" and float(scaling.get(k, -1)) != v}
    if kind == "llama3" and not differs:
        return None
    return (f"config.json rope scaling {scaling} is not Llama 3.1's {LLAMA31_ROPE}: the weights "
            "convert unchanged and config.json round-trips, but tulu3's model applies Llama 3.1 "
            "scaling when it runs this checkpoint")


def expected_hf_shapes(shape: LlamaShape, head: str = "lm") -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF LlamaForCausalLM of ``shape`` and its shape, in HF order
    (``head="scalar"``: a LlamaForSequenceClassification with one label)."""
    h, d = shape.hidden, shape.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab, h)}
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (shape.heads * d, h),
            p + "self_attn.k_proj.weight": (shape.kv_heads * d, h),
            p + "self_attn.v_proj.weight": (shape.kv_heads * d, h),
            p + "self_attn.o_proj.weight": (h, shape.heads * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (shape.ffn_hidden, h),
            p + "mlp.up_proj.weight": (shape.ffn_hidden, h),
            p + "mlp.down_proj.weight": (h, shape.ffn_hidden),
        })
    out["model.norm.weight"] = (h,)
    if head == "scalar":
        out["score.weight"] = (1, h)
    elif not shape.tied_embeddings:
        out["lm_head.weight"] = (shape.vocab, h)
    return out


def hf_config_for(shape: LlamaShape, dtype: str, base: dict[str, Any] | None = None,
                  head: str = "lm") -> dict[str, Any]:
    """config.json for an export: the source config (``base``) when known, with the shape's
    fields, Llama 3.1-style rope keys and ``dtype`` ("bfloat16" | "float32") written over it.
    ``head="scalar"``: a one-label LlamaForSequenceClassification (a reward model)."""
    cfg = dict(base or {})
    theta, scaling = _rope(cfg) if base else (shape.rope_theta, None)
    if scaling is None and shape.rope_scaling:
        scaling = dict(LLAMA31_ROPE)
    cfg.pop("rope_parameters", None)
    cfg.update(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=shape.hidden,
        intermediate_size=shape.ffn_hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, vocab_size=shape.vocab, rms_norm_eps=shape.norm_eps,
        rope_theta=theta, rope_scaling=scaling, tie_word_embeddings=shape.tied_embeddings,
        max_position_embeddings=shape.max_seq_len, hidden_act="silu", attention_bias=False,
        mlp_bias=False, torch_dtype=dtype)
    cfg.pop("dtype", None)  # transformers 5's name for torch_dtype; keep one, the portable one
    if base is None and shape.vocab >= LLAMA3_EOS + 1:
        cfg.update(bos_token_id=LLAMA3_BOS, eos_token_id=LLAMA3_EOS)
    if head == "scalar":
        cfg.update(architectures=["LlamaForSequenceClassification"], num_labels=1,
                   id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return cfg


def generation_config_for(config: dict[str, Any], base: dict[str, Any] | None = None
                          ) -> dict[str, Any]:
    """generation_config.json: the source's when known, else bos/eos from ``config``."""
    if base:
        return dict(base)
    out = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if config.get(k) is not None}
    return out


def read_optional_json(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files found in ``src`` (HF directory) to ``dst``; returns their names.
    A ``.model`` file path (tiktoken / sentencepiece) is copied as ``tokenizer.model``."""
    src, dst = Path(src), Path(dst)
    if src.is_file():
        shutil.copyfile(src, dst / "tokenizer.model")
        return ["tokenizer.model"]
    if not src.is_dir():
        raise ConversionError(f"--tokenizer-dir {src}: not a directory or tokenizer file")
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    if (src / "original" / "tokenizer.model").is_file() and "tokenizer.model" not in copied:
        (dst / "original").mkdir(exist_ok=True)
        shutil.copyfile(src / "original" / "tokenizer.model", dst / "original" / "tokenizer.model")
        copied.append("original/tokenizer.model")
    if not copied:
        raise ConversionError(f"--tokenizer-dir {src}: no tokenizer files ({TOKENIZER_FILES})")
    return copied
