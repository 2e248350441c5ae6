"""The tulu3 checkpoint directory, shared by the converters and the trainer.

    CKPT/
      tulu3.json   format version, model shape, vocab (+ padded), layout saved with, dtype, step,
                   tokenizer, and the source HF config.json / generation_config.json (for export)
      model/       megatron dist_checkpointing (torch_dist) of the model's sharded state dict
      optimizer/   ... (the trainer's; converters never write it, reshard does not carry it)

``model/`` holds megatron's *global* tensors: layer tensors are stacked on a leading layer axis
(``decoder.layers.self_attention.linear_qkv.weight`` is [layers, (heads + 2 kv) x d, hidden]) and
every rank's shard is a chunk of it, so the directory does not depend on TP/PP/VPP: megatron
loads it at any layout. Two things depend on TP: the embedding/output rows (vocab padded to
128 x TP; megatron loads them with ``allow_shape_mismatch``, zero-filling or cutting padding
rows) and how the stored chunks are cut (one per TP shard, so a load at the saved TP reads only
its own bytes).

Trainer use: ``save_model(chunks, ckpt)`` + ``write_meta(ckpt, make_meta(...))`` on rank 0;
``load_model(chunks, ckpt)`` (or ``tulu3.checkpoint.load.load_into_chunks``) to read it back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tulu3.checkpoint.dcp_io import DistReader
from tulu3.checkpoint.errors import ConversionError, parse_json
from tulu3.checkpoint.hf_config import expected_hf_shapes
from tulu3.fileio import atomic_open
from tulu3.model.hf_mapping import SCALAR_HEAD, TABLE, Rule, hf_names
from tulu3.model.presets import LlamaShape, padded_vocab
from tulu3.parallel.layout import UNEVEN_KEYS, LayoutError, ParallelLayout

FORMAT_NAME = "tulu3"
FORMAT_VERSION = 1
META_FILE = "tulu3.json"
MODEL_DIR = "model"
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEADS = ("lm", "scalar")

# megatron's local spec maps its norms to the TE names in sharded_state_dict
# (``sharded_state_dict_keys_map``), so on disk the TE names are the only ones.
_LOCAL_ONLY = {"decoder.layers.{i}.input_layernorm.weight",
               "decoder.layers.{i}.pre_mlp_layernorm.weight"}
DISK_RULES: tuple[Rule, ...] = tuple(r for r in TABLE if r.megatron not in _LOCAL_ONLY)


@dataclass
class CheckpointMeta:
    """``tulu3.json``: what a reader needs besides the tensors."""

    shape: LlamaShape
    vocab: int
    padded_vocab: int
    tp: int
    pp: int
    vpp: int
    dtype: str  # fp32 | bf16
    step: int = 0
    tokenizer: str | None = None
    hf_config: dict[str, Any] | None = None
    hf_generation_config: dict[str, Any] | None = None
    created_by: str = ""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    notes: list[str] = field(default_factory=list)
    head: str = "lm"
    """lm (an LM output layer) | scalar (a reward/value model: ``value_head`` [1, hidden])."""
    account_for_embedding_in_pipeline_split: bool = False
    """The layout's uneven pipeline split (megatron's flags; absent in older files: False)."""
    account_for_loss_in_pipeline_split: bool = False

    def layout(self) -> ParallelLayout:
        """The layout recorded (one data-parallel replica)."""
        return converter_layout(self.tp, self.pp, self.vpp,
                                self.account_for_embedding_in_pipeline_split,
                                self.account_for_loss_in_pipeline_split)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "") -> CheckpointMeta:
        data = parse_json(text, where)
        if data.get("format") != FORMAT_NAME:
            raise ConversionError(f"{where}: not a tulu3 checkpoint (format {data.get('format')})")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ConversionError(f"{where}: format version {data['format_version']} is newer "
                                  f"than this code's {FORMAT_VERSION}")
        data["shape"] = LlamaShape(**data["shape"])
        return cls(**data)


def make_meta(shape: LlamaShape, tp: int, pp: int, vpp: int, dtype: str, step: int = 0,
              tokenizer: str | None = None, created_by: str = "tulu3.train",
              hf_config: dict | None = None, hf_generation_config: dict | None = None,
              head: str = "lm", account_for_embedding_in_pipeline_split: bool = False,
              account_for_loss_in_pipeline_split: bool = False) -> CheckpointMeta:
    """The metadata of a checkpoint of ``shape`` saved at TP ``tp`` (vocab = ``shape.vocab``)
    and the pipeline split given by megatron's ``account_for_*_in_pipeline_split`` flags."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r}: expected one of {list(DTYPE_NAMES)}")
    if head not in HEADS:
        raise ValueError(f"head {head!r}: expected one of {HEADS}")
    return CheckpointMeta(shape=shape, vocab=shape.vocab,
                          padded_vocab=padded_vocab(shape.vocab, tp), tp=tp, pp=pp, vpp=vpp,
                          dtype=dtype, step=step, tokenizer=tokenizer, hf_config=hf_config,
                          hf_generation_config=hf_generation_config, created_by=created_by,
                          head=head,
                          account_for_embedding_in_pipeline_split=(
                              account_for_embedding_in_pipeline_split),
                          account_for_loss_in_pipeline_split=account_for_loss_in_pipeline_split)


def is_tulu3_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def write_meta(ckpt_dir: str | Path, meta: CheckpointMeta) -> None:
    """Write ``tulu3.json`` (atomically: a reader never sees half a file). Rank 0 only."""
    with atomic_open(Path(ckpt_dir) / META_FILE) as f:
        f.write(meta.to_json())


def read_meta(ckpt_dir: str | Path) -> CheckpointMeta:
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise ConversionError(f"{ckpt_dir}: no {META_FILE}: not a tulu3 checkpoint")
    return CheckpointMeta.from_json(path.read_text(), str(path))


# --- what is on disk ------------------------------------------------------------------------


def disk_plan(shape: LlamaShape, head: str = "lm") -> list[tuple[Rule, int | None]]:
    """Every (rule, layer) stored in ``model/``, in HF order (embedding, layers, norm, head).

    ``head="scalar"`` (reward/value models): ``value_head`` instead of the output layer."""
    plan: list[tuple[Rule, int | None]] = []
    layer_rules = [r for r in DISK_RULES if "{i}" in r.megatron]
    plan.append((_rule("embedding.word_embeddings.weight"), None))
    for i in range(shape.layers):
        plan += [(r, i) for r in layer_rules]
    plan.append((_rule("decoder.final_layernorm.weight"), None))
    if head == "scalar":
        plan.append((SCALAR_HEAD, None))
    elif not shape.tied_embeddings:  # tied: the last stage's copy is stored under the embedding
        plan.append((_rule("output_layer.weight"), None))
    return plan


def _rule(name: str) -> Rule:
    return next(r for r in TABLE if r.megatron == name)


def sharded_key(rule: Rule) -> str:
    """The ShardedTensor key: layer tensors drop the layer number (it becomes an axis)."""
    return rule.megatron.replace("decoder.layers.{i}.", "decoder.layers.")


def disk_shape(global_shape: tuple[int, ...], layer: int | None, layers: int
               ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(stored global shape, offset prefix) of one layer's tensor: a leading layer axis."""
    if layer is None:
        return global_shape, ()
    return (layers, *global_shape), (layer,)


def tp_regions(rule: Rule, global_shape: tuple[int, ...], tp: int
               ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The (offsets, sizes) of the chunks megatron stores for one global tensor at ``tp``.

    Mirrors :func:`tulu3.model.hf_mapping.shard`: vocab/qkv split rows, ``row`` linears split
    columns, ``fc1`` stores gate and up pieces separately (megatron's swiglu factory: 2 x TP
    chunks, also at TP 1), replicated tensors are one chunk.
    """
    rows = global_shape[0]
    rest = tuple(global_shape[1:])
    zeros = (0,) * len(rest)
    if rule.kind == "replicated" or (tp == 1 and rule.kind != "fc1"):
        return [((0, *zeros), tuple(global_shape))]
    if rule.kind in ("vocab", "qkv"):
        step = rows // tp
        return [((r * step, *zeros), (step, *rest)) for r in range(tp)]
    if rule.kind == "fc1":
        step = rows // (2 * tp)
        return [((r * step, *zeros), (step, *rest)) for r in range(2 * tp)]
    if rule.kind == "row":
        cols = rest[0] // tp
        return [((0, c * cols), (rows, cols)) for c in range(tp)]
    raise ValueError(rule.kind)


def converter_layout(tp: int, pp: int, vpp: int = 1, account_for_embedding: bool = False,
                     account_for_loss: bool = False) -> ParallelLayout:
    """The layout of one model replica (tp x pp ranks) the converters write for; a bad size is
    a ConversionError naming the command-line flag."""
    try:
        return ParallelLayout(world_size=max(tp, 1) * max(pp, 1), tp=tp, pp=pp, vpp=vpp,
                              account_for_embedding_in_pipeline_split=account_for_embedding,
                              account_for_loss_in_pipeline_split=account_for_loss)
    except LayoutError as err:
        raise ConversionError(_as_flags(str(err))) from None


def check_layout(shape: LlamaShape, layout: ParallelLayout) -> None:
    """Raise ConversionError when ``layout`` cannot split ``shape``: the trainer's own checks
    (:meth:`ParallelLayout.check_model`, uneven pipeline splits included), named by flag."""
    try:
        layout.check_model(shape.heads, shape.kv_heads, shape.layers)
    except LayoutError as err:
        raise ConversionError(_as_flags(str(err))) from None
    if shape.ffn_hidden % layout.tp:
        raise ConversionError(f"--tp={layout.tp} does not divide ffn_hidden={shape.ffn_hidden}")


def split_flags(layout: ParallelLayout) -> dict[str, bool]:
    """Megatron's uneven pipeline-split flags of ``layout`` (as make_meta's keywords)."""
    return {key: getattr(layout, key) for key in UNEVEN_KEYS}


def _as_flags(message: str) -> str:
    """``parallel.account_for_loss_in_pipeline_split`` -> ``--account-for-loss-in-pipeline-split``
    (the converters' names for the recipe keys the trainer's checks name)."""
    return re.sub(r"parallel\.([\w*]+)", lambda m: "--" + m.group(1).replace("_", "-"), message)


# --- reading and writing directories -------------------------------------------------------


def check_output(out: Path, force: bool) -> None:
    """Refuse a non-empty ``out`` unless ``force`` (before any expensive work)."""
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConversionError(f"--out {out} is not empty (use --force to overwrite)")


@contextmanager
def staged_output(out: Path, force: bool, ours: Callable[[Path], list[Path]]) -> Iterator[Path]:
    """Write a conversion into a hidden sibling of ``out``; replace ``out``'s files only when
    the body succeeds. A source that turns out corrupt half-way, a full disk or Ctrl-C leave
    ``out`` exactly as it was (an old export included) and no partial directory behind.

    ``ours(out)`` lists what a previous run of the same tool wrote there: with ``force`` those
    paths are removed just before the new files move in; nothing else in ``out`` is touched.
    """
    check_output(out, force)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    out.mkdir(parents=True, exist_ok=True)
    for path in ours(out):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for item in stage.iterdir():
        os.replace(item, out / item.name)
    stage.rmdir()


def model_files(out: Path) -> list[Path]:
    """What a converter writes in a tulu3 checkpoint directory (``--force`` replaces these)."""
    return [out / MODEL_DIR, out / META_FILE]


def check_checkpoint(reader: DistReader, meta: CheckpointMeta) -> None:
    """Raise, naming the tensor, when ``model/`` lacks a tensor or has a wrong global shape."""
    shape = meta.shape
    hf = expected_hf_shapes(shape, meta.head)
    for rule, layer in disk_plan(shape, meta.head):
        key = sharded_key(rule)
        got = reader.global_shape(key)  # raises when missing
        names = hf_names(rule, layer, shape.tied_embeddings)
        want = [sum(hf[n][0] for n in names), *hf[names[0]][1:]]
        if layer is not None:
            want = [shape.layers, *want]
        if rule.kind == "vocab":  # stored rows: vocab padded for the TP it was saved at
            ok = got[0] >= shape.vocab and list(got[1:]) == want[1:]
        else:
            ok = list(got) == want
        if not ok:
            raise ConversionError(f"{reader.dir}: tensor {key!r} has global shape {list(got)}; "
                                  f"tulu3.json's shape implies {want}")


def read_global(reader: DistReader, rule: Rule, layer: int | None, vocab_rows: int
                ) -> torch.Tensor:
    """One layer's (or a non-layer) megatron global tensor from ``model/``; vocab tensors are
    cut to ``min(vocab_rows, stored rows)`` rows (padding rows never read for an export)."""
    key = sharded_key(rule)
    full = reader.global_shape(key)
    if layer is not None:
        return reader.read(key, (layer, *[0] * (len(full) - 1)), (1, *full[1:])).view(full[1:])
    if rule.kind == "vocab":
        full = (min(vocab_rows, full[0]), *full[1:])
    return reader.read(key, (0,) * len(full), full)


# --- megatron save/load (collective: every rank of the model calls these) ---------------------


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """The sharded state dict of this rank's model chunks (one per virtual stage).

    Each chunk's ShardedTensor keys are already global (megatron's TransformerBlock puts the
    global layer number, VPP included, in the layer-axis offset), so chunks are only nested
    under ``chunk{i}`` to keep their local names apart.
    """
    return {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def save_model(chunks: list[torch.nn.Module], ckpt_dir: str | Path) -> None:
    """``dist_checkpointing.save`` of the chunks into ``CKPT/model`` (every rank calls it)."""
    from megatron.core import dist_checkpointing

    model_dir = Path(ckpt_dir) / MODEL_DIR
    if torch.distributed.get_rank() == 0:
        model_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(model_dir))


def load_model(chunks: list[torch.nn.Module], ckpt_dir: str | Path,
               ignore: tuple[str, ...] = ()) -> None:
    """Load ``CKPT/model`` into the chunks, at this process's layout (every rank calls it).

    Weights only: ``_extra_state`` objects (TE's FP8 scaling state) are loaded when present and
    left at their defaults when not (converted checkpoints have none). Parameters named in
    ``ignore`` (local names, e.g. ``value_head.weight``) are neither requested nor set. Any other
    missing or unexpected parameter is an error.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_dir = Path(ckpt_dir) / MODEL_DIR
    _check_head(chunks, ckpt_dir, ignore)
    reader = DistReader(model_dir)
    reader.check_complete()  # a truncated shard named here, not deep inside torch's DCP
    stored_objects = set(reader.objects)
    request = model_sharded_state_dict(chunks)
    for sub in request.values():
        for name in [n for n, v in sub.items() if isinstance(v, ShardedObject)
                     and n.endswith("_extra_state") and v.unique_key not in stored_objects]:
            del sub[name]
        for name in ignore:
            sub.pop(name, None)
    loaded = dist_checkpointing.load(request, str(model_dir))
    for i, chunk in enumerate(chunks):
        result = chunk.load_state_dict(loaded[f"chunk{i}"], strict=False)
        missing = [k for k in result.missing_keys
                   if not k.endswith("_extra_state") and k not in ignore]
        if missing or result.unexpected_keys:
            raise ConversionError(f"{ckpt_dir}: chunk {i}: missing {missing}, unexpected "
                                  f"{result.unexpected_keys}")


def _check_head(chunks: list[torch.nn.Module], ckpt_dir: str | Path,
                ignore: tuple[str, ...]) -> None:
    """A reward-model checkpoint has no LM output layer, a policy one no ``value_head``: say
    so instead of megatron's missing-key error."""
    if not is_tulu3_checkpoint(ckpt_dir):
        return
    stored = read_meta(ckpt_dir).head
    wanted = getattr(chunks[0], "head_kind", "lm")
    if stored == wanted or (wanted == "scalar" and "value_head.weight" in ignore):
        return
    hint = ("load it with tulu3.model.scalar_head.load_scalar_weights (e.g. as "
            "rlvr.value_model)" if stored == "scalar" else
            "tulu3.model.scalar_head.load_scalar_weights initialises the head")
    raise ConversionError(f"{ckpt_dir}: a checkpoint with head {stored!r} cannot be loaded into "
                          f"a model with head {wanted!r}; {hint}")
