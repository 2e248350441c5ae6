"""The one mapping between Hugging Face Llama weights and megatron's GPTModel, both directions.

Three layouts are involved:
- HF: ``model.layers.{i}.self_attn.q_proj.weight`` ..., one tensor per projection.
- megatron *global* (the TP1 layout, and what dist_checkpointing stores): fused ``linear_qkv``
  with, per query group g, rows [q heads of g; k_g; v_g]; ``linear_fc1`` = [gate; up]; vocabulary
  rows padded to a multiple of 128 x TP.
- megatron *shard* (one TP rank): qkv and vocab split by contiguous rows (whole query groups),
  fc1 as [gate_rank; up_rank], row-parallel linears split by columns.

Converters, the in-memory loader and HF export all go through :data:`TABLE` and the functions
below, so a fix here fixes every direction.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tulu3.model.presets import LlamaShape


@dataclass(frozen=True)
class Rule:
    """One parameter: megatron name pattern, HF name patterns, and how TP splits it."""

    megatron: str
    hf: tuple[str, ...]
    kind: str  # replicated | vocab | qkv | fc1 | row


# ``{i}`` is the global layer number. Norm names differ between the te spec (fused into the
# following linear) and the local/torch specs.
TABLE: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"),
    Rule("decoder.layers.{i}.input_layernorm.weight",
         ("model.layers.{i}.input_layernorm.weight",), "replicated"),
    Rule("decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",
         ("model.layers.{i}.input_layernorm.weight",), "replicated"),
    Rule("decoder.layers.{i}.self_attention.linear_qkv.weight",
         ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
          "model.layers.{i}.self_attn.v_proj.weight"), "qkv"),
    Rule("decoder.layers.{i}.self_attention.linear_proj.weight",
         ("model.layers.{i}.self_attn.o_proj.weight",), "row"),
    Rule("decoder.layers.{i}.pre_mlp_layernorm.weight",
         ("model.layers.{i}.post_attention_layernorm.weight",), "replicated"),
    Rule("decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight",
         ("model.layers.{i}.post_attention_layernorm.weight",), "replicated"),
    Rule("decoder.layers.{i}.mlp.linear_fc1.weight",
         ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), "fc1"),
    Rule("decoder.layers.{i}.mlp.linear_fc2.weight",
         ("model.layers.{i}.mlp.down_proj.weight",), "row"),
)

# Reward / value models (tulu3.model.scalar_head): the scalar head is HF's
# LlamaForSequenceClassification ``score`` (one label). Not in TABLE: a causal LM has no such
# tensor.
SCALAR_HEAD = Rule("value_head.weight", ("score.weight",), "replicated")


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


_MEGATRON = [(_pattern(rule.megatron), rule) for rule in (*TABLE, SCALAR_HEAD)]


def match_megatron(name: str) -> tuple[Rule, int | None]:
    """The rule for a megatron parameter name and its layer number (None outside layers)."""
    for pattern, rule in _MEGATRON:
        found = pattern.match(name)
        if found:
            return rule, int(found.group(1)) if found.groups() else None
    raise KeyError(f"no HF mapping for megatron parameter {name!r}")


def hf_names(rule: Rule, layer: int | None, tied: bool = False) -> list[str]:
    """HF tensor names of one rule; with tied embeddings the output layer reads the embedding
    (HF has no ``lm_head.weight``; megatron's last stage holds a copy when PP > 1)."""
    if tied and rule.megatron == "output_layer.weight":
        return ["model.embed_tokens.weight"]
    return [n.replace("{i}", str(layer)) for n in rule.hf]


# --- HF <-> megatron global ----------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Rows ``[src, src + rows)`` of HF tensor ``source`` are rows ``[dst, dst + rows)`` of the
    megatron global tensor (elements for 1-D tensors). Rows no placement covers are vocabulary
    padding (zeros). Streaming converters read these row ranges straight from the file."""

    source: int
    src: int
    rows: int
    dst: int


def placements(rule: Rule, shape: LlamaShape, hf_rows: list[int]) -> list[Placement]:
    """Where each HF tensor's rows go in the global tensor; ``hf_rows``: first dim of each."""
    if rule.kind == "qkv":
        d, groups = shape.head_dim, shape.kv_heads
        per_group = shape.heads // groups
        out = []
        for g in range(groups):  # per query group: [q heads of g; k_g; v_g]
            base = g * (per_group + 2) * d
            out += [Placement(0, g * per_group * d, per_group * d, base),
                    Placement(1, g * d, d, base + per_group * d),
                    Placement(2, g * d, d, base + (per_group + 1) * d)]
        return out
    if rule.kind == "fc1":  # [gate; up]
        return [Placement(0, 0, hf_rows[0], 0), Placement(1, 0, hf_rows[1], hf_rows[0])]
    return [Placement(0, 0, hf_rows[0], 0)]


def global_shape(rule: Rule, hf_shapes: list[tuple[int, ...]], padded_vocab: int
                 ) -> tuple[int, ...]:
    """Shape of the megatron global tensor built from HF tensors of ``hf_shapes``."""
    rows = sum(s[0] for s in hf_shapes)
    if rule.kind == "vocab":
        rows = max(rows, padded_vocab)
    return (rows, *hf_shapes[0][1:])


def to_global(rule: Rule, hf: list[torch.Tensor], shape: LlamaShape,
              padded_vocab: int) -> torch.Tensor:
    """HF tensors of one rule -> the megatron global (TP1) tensor."""
    plan = placements(rule, shape, [t.shape[0] for t in hf])
    size = global_shape(rule, [tuple(t.shape) for t in hf], padded_vocab)
    if len(plan) == 1 and size == tuple(hf[0].shape):
        return hf[0]  # identity: no copy
    out = hf[0].new_zeros(size)
    for p in plan:
        out[p.dst:p.dst + p.rows] = hf[p.source][p.src:p.src + p.rows]
    return out


def from_global(rule: Rule, tensor: torch.Tensor, shape: LlamaShape,
                vocab: int) -> list[torch.Tensor]:
    """Megatron global tensor of one rule -> its HF tensors (vocabulary padding dropped)."""
    if rule.kind == "qkv":
        d, groups = shape.head_dim, shape.kv_heads
        per_group = shape.heads // groups
        grouped = tensor.reshape(groups, (per_group + 2) * d, -1)
        q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
        return [t.reshape(-1, tensor.shape[-1]).contiguous() for t in (q, k, v)]
    if rule.kind == "fc1":
        return [t.contiguous() for t in torch.chunk(tensor, 2, dim=0)]
    if rule.kind == "vocab":
        return [tensor[:vocab].contiguous()]
    return [tensor]


# --- megatron global <-> TP shards ---------------------------------------------------------


def shard(rule: Rule, tensor: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's piece of a megatron global tensor."""
    if rule.kind == "replicated" or tp == 1:
        return tensor
    if rule.kind in ("vocab", "qkv"):
        return torch.chunk(tensor, tp, dim=0)[tp_rank]
    if rule.kind == "row":
        return torch.chunk(tensor, tp, dim=1)[tp_rank]
    if rule.kind == "fc1":
        gate, up = torch.chunk(tensor, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp)[tp_rank], torch.chunk(up, tp)[tp_rank]], dim=0)
    raise ValueError(rule.kind)


def unshard(rule: Rule, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`shard` given every TP rank's piece in rank order."""
    if rule.kind == "replicated" or len(shards) == 1:
        return shards[0]
    if rule.kind in ("vocab", "qkv"):
        return torch.cat(shards, dim=0)
    if rule.kind == "row":
        return torch.cat(shards, dim=1)
    if rule.kind == "fc1":
        pairs = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([p[0] for p in pairs] + [p[1] for p in pairs], dim=0)
    raise ValueError(rule.kind)


# --- whole-model helpers -------------------------------------------------------------------


def chunk_layer_offset(model: torch.nn.Module) -> int:
    """Global index of the first transformer layer held by a model chunk."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def _local_to_global(name: str, offset: int) -> str:
    return re.sub(r"^decoder\.layers\.(\d+)\.",
                  lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)


def load_hf_into_chunk(model: torch.nn.Module, get_hf: Callable[[str], torch.Tensor],
                       shape: LlamaShape, tp_rank: int, tp: int) -> None:
    """Copy HF weights (fetched by name with ``get_hf``) into one megatron model chunk."""
    offset = chunk_layer_offset(model)
    padded = model.vocab_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            rule, layer = match_megatron(_local_to_global(name, offset))
            hf = [get_hf(n) for n in hf_names(rule, layer, shape.tied_embeddings)]
            piece = shard(rule, to_global(rule, hf, shape, padded), tp_rank, tp)
            if piece.shape != param.shape:
                raise ValueError(f"{name}: HF gives shape {tuple(piece.shape)}, the model "
                                 f"expects {tuple(param.shape)}")
            param.copy_(piece.to(param.dtype))


def chunk_global_names(model: torch.nn.Module) -> dict[str, str]:
    """Local parameter name -> global megatron name (layer numbers across PP/VPP)."""
    offset = chunk_layer_offset(model)
    return {name: _local_to_global(name, offset) for name, _ in model.named_parameters()}
