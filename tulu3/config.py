"""Run configuration: dataclasses loaded from a YAML recipe plus ``--set key=value`` overrides.

Every field below is a recipe key (``model.hidden``, ``dpo.beta``, ...). Unknown keys and values of
the wrong type are rejected with the dotted path and the closest valid name, before any expensive
work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class UserError(ValueError):
    """A failure the user can fix (bad recipe, layout, data, tokenizer, checkpoint, path, disk):
    the message is one line naming the file and line, or the field, and what to do.
    :func:`run_command` prints it on rank 0 without a traceback."""


class RunFault(UserError):
    """A fault that ends a run loudly (a diverging loss, failing verifiers, a stalled rank)."""


class ConfigError(UserError):
    """A recipe or override that cannot be applied; the message names the key."""


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """tiny | llama3.1-8b | llama3.1-70b | llama3.1-405b; the fields below override the preset."""
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    ffn_hidden: int | None = None
    vocab: int | None = None
    """Vocabulary size of the tokenizer (before padding to a multiple of 128 x TP)."""
    norm_eps: float | None = None
    rope_theta: float | None = None
    rope_scaling: bool | None = None
    """Llama 3.1 rope scaling (factor 8, low 1, high 4, original context 8192)."""
    tied_embeddings: bool | None = None
    max_seq_len: int | None = None
    load: str | None = None
    """An HF model directory or a tulu3/Megatron checkpoint; the format is detected."""
    spec: str = "torch"
    """Layer spec: te (Transformer Engine) | torch (SDPA attention, packed sequences) | local."""
    dtype: str = "fp32"
    """Parameter/compute dtype: fp32 | bf16 (bf16 keeps fp32 master weights in the optimizer)."""
    fp8: str = "none"
    """none | current (= tensorwise) | delayed | tensorwise | blockwise | mxfp8: the FP8 recipe
    (Transformer Engine's with model.spec=te; model.spec=torch takes current/tensorwise, through
    torch._scaled_mm). Combinations are checked by tulu3/model/fp8_recipe.py when loaded."""
    fp8_format: str = "hybrid"
    """hybrid (e4m3 activations/weights, e5m2 gradients) | e4m3 (everything e4m3)."""
    fp8_granularity: str = "tensorwise"
    """Scales of the torch spec's FP8 matmuls: tensorwise | rowwise (one per row/column; needs
    fp8_format=e4m3 and dtype=bf16, as torch's CUDA row-wise kernel)."""
    fp8_amax_history_len: int = 1
    """Delayed scaling only: amax history window (megatron's default 1; TE's own 1024)."""
    fp8_amax_algo: str = "most_recent"
    """Delayed scaling only: most_recent | max amax of the history window."""
    fp8_margin: int = 0
    """Delayed scaling only: scale = fp8_max / amax / 2^margin."""
    fp8_param: bool = False
    """Keep the GEMM weights in FP8 (Transformer Engine only; saves memory)."""
    fp8_bf16_edges: bool = False
    """Keep the first and last transformer layers in BF16 when FP8 is on."""
    fp8_bf16_first_layers: int = 1
    """With fp8_bf16_edges: how many layers at the start stay BF16."""
    fp8_bf16_last_layers: int = 1
    """With fp8_bf16_edges: how many layers at the end stay BF16."""
    fused: str = "auto"
    """Fused layers: auto (where kernels exist: TE/apex on GPU; the torch spec's Triton RMSNorm,
    SwiGLU, RoPE with CUDA) | all (an error where the torch spec's kernels cannot run) | none.
    (Not on/off: YAML reads those as booleans.)"""
    fused_logprobs: bool = True
    """Compute log-probs / cross entropy with the fused kernel (never materializes full logits)."""
    init_std: float = 0.02
    recompute: str = "none"
    """Activation recomputation: none | selective | full."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int = 1
    """Virtual pipeline stages per pipeline rank (interleaved 1F1B when > 1)."""
    cp: int = 1
    """Context-parallel size: each row cut into 2 x cp chunks, rank r holding chunks r and
    2 cp - 1 - r (tulu3/parallel/context.py); model.spec torch (K/V all-gathered) or te (TE's
    CP attention, unpacked rows only). Not for RLVR (generation feeds whole sequences)."""
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    """Shard optimizer state and fp32 master weights across data-parallel ranks (ZeRO-1)."""
    account_for_embedding_in_pipeline_split: bool = False
    """Count the embedding as one layer when splitting layers over pipeline stages (Megatron;
    405B's 126 layers + embedding + loss = 128 units split evenly over PP8 x VPP2)."""
    account_for_loss_in_pipeline_split: bool = False
    """Count the output layer + loss as one layer when splitting layers over pipeline stages."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl with CUDA, else gloo) | nccl | gloo."""
    overlap_grad_reduce: bool = True
    """Reduce (or reduce-scatter) each gradient bucket while backward goes on (megatron DDP's
    asynchronous collectives); the result equals the non-overlapped reduction exactly."""
    overlap_param_gather: bool = True
    """With parallel.distributed_optimizer: all-gather the updated parameters bucket by bucket
    in the next forward instead of at the end of the optimizer step (no effect without it)."""
    bucket_size: int | None = None
    """Gradient bucket size in parameters (megatron's default: max(40M, 1M x DP) when
    overlapping, one bucket otherwise); smaller buckets start communication earlier."""


@dataclass
class DataConfig:
    tokenizer: str | None = None
    """A tiktoken Llama-3 tokenizer.model, a sentencepiece .model, or an HF directory with one."""
    train: Any = None
    """A file, a directory, or a mixture list of {path, fraction | count}."""
    eval: Any = None
    """Held-out data in the same formats; its loss (or stage metric) is reported."""
    max_len: int = 4096
    """Tokens per sequence (per packed row when data.pack)."""
    pack: bool = False
    add_bos: bool = True
    """Start every sequence with bos; false reproduces open-instruct's Tülu 3 runs."""
    bos: str | None = None
    eos: str | None = None
    """eos token text; default <|end_of_text|> (Tülu 3's choice)."""
    pad: str | None = None
    skip_bad_rows: bool = False
    """Skip and count malformed rows instead of stopping with file and line."""
    cache_dir: str | None = None
    """Tokenization cache directory; default RUN_DIR/../.cache/tokenized."""


@dataclass
class TrainConfig:
    global_batch: int = 8
    """Sequences (SFT), pairs (DPO) or prompts (RLVR) per optimizer step, over all DP ranks."""
    micro_batch: int = 1
    max_steps: int | None = None
    """Optimizer steps; default: epochs x examples / global_batch."""
    epochs: int = 1
    seed: int = 1234
    run_dir: str = "runs/default"
    save_every: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    resume: str = "auto"
    """auto (latest checkpoint in run_dir if any) | none | a checkpoint directory."""
    skip_nan: bool = False
    """Skip an optimizer step whose loss is NaN/inf instead of stopping."""
    max_skipped_nan: int = 5
    """With skip_nan: stop (non-zero exit) after this many consecutive skipped steps (0: no cap)."""
    collective_timeout_min: float = 30.0
    """Minutes a collective may wait for a stalled rank before the job ends (torch.distributed's
    process-group timeout); the tiny recipes set a few minutes, clusters keep 30."""
    log_every: int = 1
    eval_every: int = 0
    plots: bool = True
    tensorboard: bool = False
    wandb: str | None = None
    """W&B project name; logging is on when set and wandb is installed."""
    async_save: bool = False
    """Write checkpoints in a background thread: training goes on while a save is written;
    ``latest`` moves only when it is complete (tulu3/checkpoint/async_save.py)."""
    profile: str | None = None
    """START:END: a torch.profiler trace (CPU and CUDA) of optimizer steps START+1..END, written
    to RUN_DIR/profile/ (open it in Perfetto or chrome://tracing)."""
    memory_snapshot: bool = False
    """On CUDA out-of-memory, dump the allocator's history to RUN_DIR/memory_snapshot.pickle
    (open it at pytorch.org/memory_viz)."""
    exit_after_minutes: float | None = None
    """Save and exit 0 once this many minutes of wall-clock time have passed since the start
    (a SLURM time limit); resume with the same command."""
    stop_at_step: int | None = None
    """Save and stop after this optimizer step; the LR schedule still spans train.max_steps
    (a later run with the same recipe continues it unchanged)."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup: float = 0.03
    """Warm-up steps; a value < 1 is a fraction of the run's steps (Tülu 3: 0.03 SFT, 0.1 DPO)."""
    schedule: str = "linear"
    """linear (warm-up then linear decay, Tülu 3) | cosine | constant."""
    weight_decay: float = 0.0
    clip: float = 1.0
    """Gradient clipping by global norm (0: off)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class SFTConfig:
    loss_reduction: str = "sum"
    """sum (Tülu 3's runs: token losses summed, divided by sequences) | mean (per token)."""


@dataclass
class DPOConfig:
    loss: str = "dpo_norm"
    """dpo | dpo_norm (length-normalized, Tülu 3) | simpo | wpo | ipo: the names of the registry
    ``LOSSES`` in tulu3/stages/dpo/losses.py."""
    beta: float = 5.0
    """Inverse temperature of the loss (Tülu 3: 5 with dpo_norm; IPO's tau)."""
    gamma_beta_ratio: float = 0.3
    """SimPO's target margin gamma / beta."""
    label_smoothing: float = 0.0
    """cDPO's label-flip probability (dpo, dpo_norm, wpo, simpo), in [0, 0.5)."""
    reference: str | None = None
    """Reference checkpoint (HF dir, tulu3 checkpoint, or a run's checkpoints/ dir); default:
    the model being trained, as loaded."""
    reference_mode: str = "cached"
    """cached (pre-pass, one model in memory) | online (a frozen copy)."""


@dataclass
class RMConfig:
    margin: float = 0.0
    """Bradley-Terry margin: the loss is -log sigmoid(r_chosen - r_rejected - margin)."""
    center_coef: float = 0.0
    """Reward-centering coefficient: adds coef * (r_chosen + r_rejected)^2."""


@dataclass
class RLVRConfig:
    algo: str = "ppo"
    """ppo (Tülu 3) | grpo."""
    samples_per_prompt: int = 1
    max_new_tokens: int = 2048
    temperature: float = 1.0
    top_p: float = 1.0
    correct_reward: float = 10.0
    no_eos_penalty: float = -10.0
    kl_beta: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    vf_coef: float = 0.1
    value_clip: float = 0.2
    ppo_epochs: int = 4
    mini_batches: int = 1
    whiten_advantages: bool = True
    value_model: str | None = None
    """Checkpoint that initialises PPO's value model (e.g. a reward model); default: the policy."""
    verifier_timeout_s: float = 5.0
    verifier_workers: int = 2
    max_verify_fail_frac: float = 0.5
    """A step where more than this fraction of verifications time out or crash warns ..."""
    max_verify_fail_steps: int = 3
    """... and this many such steps in a row stop the run (0: warn only)."""
    rollout_backend: str = "inprocess"
    """inprocess (the trainer's own weights). vllm is reserved: not implemented yet (refused)."""
    generation_tokens: int | None = None
    """KV-cache slots (prompt + new tokens, x rows) per generation micro-batch: a DP rank's
    prompts are generated in micro-batches of at most this many ``rows x (longest prompt +
    max_new_tokens)``; with PP > 1, pp of them decode at once, one per pipeline stage (their
    caches are held together). Default: all of a rank's prompts in one batch."""
    total_episodes: int | None = None
    """Episodes (prompts x samples_per_prompt) of the run, open-instruct's ``total_episodes``:
    steps = total_episodes // (train.global_batch x samples_per_prompt), taking as many epochs
    over the prompts as that needs; sets the LR schedule (train.epochs is then unused;
    train.max_steps still caps the run). Default: train.epochs over the prompts."""
    kl_estimator: str | None = None
    """kl1 | kl2 | kl3, open-instruct's ``kl_estimator`` of KL(pi || pi_ref) per token (with
    d = log pi - log pi_ref: kl1 = d, kl2 = d^2 / 2, kl3 = exp(-d) - 1 + d), used in PPO's reward
    penalty and GRPO's loss term. Default: kl1 for ppo, kl3 for grpo."""
    stop_strings: list[str] = field(default_factory=list)
    """A sample's generation stops when its decoded response ends with one of these (as
    open-instruct's ``stop_strings``); the response keeps the token that completed it, counts
    as stopped (no no_eos_penalty), and the verifier sees the text up to the string's end."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    rlvr: RLVRConfig = field(default_factory=RLVRConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tokenization_cache(self) -> str:
        """``data.cache_dir``, or its default beside the run directory (shared by runs)."""
        return self.data.cache_dir or f"{self.train.run_dir}/../.cache/tokenized"


def _dpo_losses() -> tuple[str, ...]:
    """The registered preference losses, looked up only when ``dpo.loss`` is set (the registry
    imports torch; this module stays cheap to import)."""
    from tulu3.stages.dpo.losses import loss_names

    return loss_names()


CHOICES: dict[str, tuple[str, ...] | typing.Callable[[], tuple[str, ...]]] = {
    "model.spec": ("te", "torch", "local"),
    "model.dtype": ("fp32", "bf16"),
    "model.fp8": ("none", "delayed", "current", "tensorwise", "blockwise", "mxfp8"),
    "model.fp8_format": ("hybrid", "e4m3"),
    "model.fp8_granularity": ("tensorwise", "rowwise"),
    "model.fp8_amax_algo": ("most_recent", "max"),
    "model.fused": ("auto", "all", "none"),
    "model.recompute": ("none", "selective", "full"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "optim.schedule": ("linear", "cosine", "constant"),
    "sft.loss_reduction": ("sum", "mean"),
    "dpo.loss": _dpo_losses,
    "dpo.reference_mode": ("cached", "online"),
    "rlvr.algo": ("ppo", "grpo"),
    "rlvr.rollout_backend": ("inprocess", "vllm"),
    "rlvr.kl_estimator": ("kl1", "kl2", "kl3"),
}


_POS, _NONNEG, _UNIT = (0, False, None), (0, True, None), (0, True, 1)
RANGES: dict[str, tuple[float, bool, float | None]] = {
    **{f"model.{k}": (1, True, None) for k in (
        "layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab", "max_seq_len")},
    "model.norm_eps": _POS, "model.rope_theta": _POS, "model.init_std": _POS,
    "model.fp8_amax_history_len": (1, True, None), "model.fp8_margin": _NONNEG,
    "model.fp8_bf16_first_layers": _NONNEG, "model.fp8_bf16_last_layers": _NONNEG,
    **{f"parallel.{k}": (1, True, None) for k in ("tp", "pp", "vpp", "cp")},
    "data.max_len": (1, True, None),
    "train.global_batch": _POS, "train.micro_batch": _POS, "train.max_steps": (1, True, None),
    "train.epochs": (1, True, None), "train.save_every": _NONNEG, "train.keep_last": _NONNEG,
    "train.log_every": (1, True, None), "train.eval_every": _NONNEG,
    "train.max_skipped_nan": _NONNEG, "train.collective_timeout_min": _POS,
    "parallel.bucket_size": (1, True, None), "train.exit_after_minutes": _POS,
    "train.stop_at_step": (1, True, None),
    "optim.lr": _NONNEG, "optim.min_lr": _NONNEG, "optim.warmup": _NONNEG,
    "optim.weight_decay": _NONNEG, "optim.clip": _NONNEG, "optim.beta1": (0, True, 0.999999),
    "optim.beta2": (0, True, 0.999999), "optim.eps": _POS,
    "dpo.beta": _POS, "dpo.gamma_beta_ratio": _NONNEG, "dpo.label_smoothing": (0, True, 0.4999),
    "rm.center_coef": _NONNEG,
    "rlvr.samples_per_prompt": (1, True, None), "rlvr.max_new_tokens": (1, True, None),
    "rlvr.temperature": _NONNEG, "rlvr.top_p": (0, False, 1), "rlvr.kl_beta": _NONNEG,
    "rlvr.gamma": _UNIT, "rlvr.lam": _UNIT, "rlvr.clip": _NONNEG, "rlvr.vf_coef": _NONNEG,
    "rlvr.value_clip": _NONNEG, "rlvr.ppo_epochs": (1, True, None),
    "rlvr.mini_batches": (1, True, None), "rlvr.verifier_timeout_s": _POS,
    "rlvr.verifier_workers": (1, True, None), "rlvr.max_verify_fail_frac": _UNIT,
    "rlvr.max_verify_fail_steps": _NONNEG,
    "rlvr.generation_tokens": (2, True, None), "rlvr.total_episodes": (1, True, None),
}
"""Key -> (lowest value, whether the lowest is allowed, highest allowed or None): numeric keys
outside their range are refused when set (a batch of 0 or a negative LR fails late or trains
nothing)."""


def _check_range(path: str, value: Any) -> None:
    if path not in RANGES or value is None:
        return
    low, inclusive, high = RANGES[path]
    if value < low or (value == low and not inclusive) or (high is not None and value > high):
        bound = f"{'>=' if inclusive else '>'} {low}" + (f" and <= {high}" if high else "")
        raise ConfigError(f"{path}={value!r} is out of range: it must be {bound}")


def _field_names(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _check_type(path: str, value: Any, annotation: Any) -> Any:
    """Return value converted to the field's type, or raise ConfigError naming path."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(o for o in options if o is not type(None))
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typing.get_origin(hint) is list and isinstance(value, list):  # e.g. rlvr.stop_strings
        (item,) = typing.get_args(hint)
        return [_check_type(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    raise ConfigError(f"{path}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _set(cfg: Config, path: str, value: Any) -> None:
    node: Any = cfg
    parts = path.split(".")
    for depth, name in enumerate(parts):
        names = _field_names(node)
        if name not in names:
            where = ".".join(parts[:depth])
            close = difflib.get_close_matches(name, names, n=1)
            guess = ".".join([*parts[:depth], *close[:1], *parts[depth + 1:]])
            hint = f"; did you mean '{guess}'?" if close else ""
            raise ConfigError(f"unknown config key '{path}'{hint}"
                              + ("" if hint else f" (valid under '{where or 'top'}': {names})"))
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(node, name)):
                if not isinstance(value, dict):
                    raise ConfigError(f"{path}: expected a mapping of keys, got {value!r}")
                for key, sub in value.items():
                    _set(cfg, f"{path}.{key}", sub)
                return
            hints = typing.get_type_hints(type(node))
            value = _check_type(path, value, hints[name])
            if path in CHOICES:
                choices = CHOICES[path]
                choices = choices() if callable(choices) else choices
                if value not in choices:
                    raise ConfigError(f"{path}: {value!r} is not one of {choices}")
            _check_range(path, value)
            setattr(node, name, value)
            return
        node = getattr(node, name)


_NEXT_PAIR = re.compile(r"\s+(?=[A-Za-z_][\w.]*=)")
"""Whitespace that starts another ``key=`` pair; other whitespace belongs to the value."""


def parse_override(text: str) -> list[tuple[str, Any]]:
    """Parse one ``--set`` argument: ``a.b=1`` or several space-separated pairs ``a=1 b=2``; a
    value may hold spaces (``train.run_dir=my runs/x``)."""
    pairs = []
    for chunk in _NEXT_PAIR.split(text.strip()) or [text]:
        if "=" not in chunk:
            raise ConfigError(f"--set {text!r}: expected key=value")
        key, raw = chunk.split("=", 1)
        # YAML 1.1 reads 2:4 as the base-60 number 124: keep START:END (train.profile) text
        value = raw if re.fullmatch(r"\d+(:\d+)+", raw) else yaml.safe_load(raw) if raw else None
        pairs.append((key.strip(), value))
    return pairs


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (a second ``train:`` block
    would silently replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{key_node.start_mark.name}:{line}: key '{key}' given twice "
                                  f"(first on line {seen[key]}); merge the two")
            seen[key] = line
        return super().construct_mapping(node, deep)


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a Config from a YAML recipe (optional) and ``--set`` overrides, validated."""
    cfg = Config()
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe not found: {path}")
        try:
            with path.open(encoding="utf-8") as stream:  # marks carry the file name
                data = yaml.load(stream, _UniqueKeyLoader) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from err
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        for key, value in data.items():
            try:
                _set(cfg, key, value)
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}") from err
    for text in overrides or []:
        for key, value in parse_override(text):
            _set(cfg, key, value)
    from tulu3.model.fp8_recipe import check_fp8  # cross-key FP8 checks; imports no torch

    check_fp8(cfg.model, cfg.parallel.pp)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --- the one error path of every command ------------------------------------------------------

DEBUG_ENV = "TULU3_DEBUG"
"""Set to 1 (or pass ``--debug``) for the Python traceback of a failing command."""


COLLECTIVE_FAILURES = ("timed out", "timeout", "connection closed by peer",
                       "connection reset by peer")
"""How a collective's failure reads: its own timeout (gloo "Timed out", NCCL's watchdog
"collective operation timeout"), or (gloo) a peer whose own timeout fired first closing the
connection, or a peer that died."""


def is_collective_failure(err: BaseException) -> bool:
    """A collective (or the store) gave up on another rank: timed out, or its peer went away."""
    text = str(err).lower()
    return (any(marker in text for marker in COLLECTIVE_FAILURES)
            or "timeout" in type(err).__name__.lower())


def describe_error(err: BaseException) -> str:
    """One line for a failed command: the message of a :class:`UserError`, "no space left on
    <dir>" for a full disk anywhere in the exception's chain, the file of an OS error, else the
    exception type and message with the hint to get the traceback."""
    chain: BaseException | None = err
    while chain is not None:
        if isinstance(chain, OSError) and chain.errno == errno.ENOSPC:
            where = os.path.dirname(os.fspath(chain.filename)) if chain.filename else "the disk"
            return f"no space left on {where or '.'}: free space (or move the run) and rerun"
        chain = chain.__cause__ or chain.__context__
    text = " ".join(str(err).split())
    if isinstance(err, UserError):
        return text
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or text}"
    if isinstance(err, (FileNotFoundError, UnicodeDecodeError)):
        return text
    if is_collective_failure(err):
        return (f"a collective timed out: another rank stalled or died (see its log); "
                f"train.collective_timeout_min sets the wait ({text[:300]})")
    return (f"{type(err).__name__}: {text[:500]} (rerun with {DEBUG_ENV}=1 or --debug for the "
            f"traceback)")


def _reports() -> bool:
    """Whether this process prints a command's failure: rank 0 of a process group or of
    torchrun's ranks; a process started alone (``WORLD_SIZE=256 RANK=255 ... --dry-run``) too."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0 or "LOCAL_RANK" not in os.environ


def run_command(main: Callable[[list[str]], Any], prog: str, argv: list[str] | None = None
                ) -> int:
    """Run ``main(argv)`` as the command ``prog``; returns the exit status for ``sys.exit``.

    Any failure prints one line ``prog: error: <what and where>`` on stderr of rank 0 (the other
    ranks exit quietly with the same status): 2 for a :class:`UserError` or an OS error (a
    missing file, a full disk), 1 for anything else.
    ``--debug`` (taken out of argv) or ``TULU3_DEBUG=1`` lets the exception through instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ[DEBUG_ENV] = "1"
    try:
        result = main(argv)
    except SystemExit as stop:  # argparse (already printed) or a message string
        if isinstance(stop.code, str):
            if _reports():
                print(stop.code if stop.code.startswith(prog) else f"{prog}: {stop.code}",
                      file=sys.stderr)
            return 1
        return int(stop.code or 0)
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # torch's DCP CheckpointException is a BaseException
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        if _reports():
            print(f"{prog}: error: {describe_error(err)}", file=sys.stderr)
        # input the user can fix: a UserError, a missing / unreadable file, a full disk
        return 2 if isinstance(err, (UserError, OSError, UnicodeDecodeError)) else 1
    return result if isinstance(result, int) else 0
