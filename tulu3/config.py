"""Run configuration: dataclasses loaded from a YAML recipe plus ``--set key=value`` overrides.

Every field below is a recipe key (``model.hidden``, ``dpo.beta``, ...). Unknown keys and values of
the wrong type are rejected with the dotted path and the closest valid name, before any expensive
work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
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
    """none | delayed | current | mxfp8 (needs Transformer Engine and the te spec)."""
    fp8_bf16_edges: bool = False
    """Keep the first and last transformer layer in BF16 when FP8 is on."""
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
    """Context-parallel size (needs Transformer Engine attention)."""
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
    log_every: int = 1
    eval_every: int = 0
    plots: bool = True
    tensorboard: bool = False
    wandb: str | None = None
    """W&B project name; logging is on when set and wandb is installed."""


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
    rollout_backend: str = "inprocess"
    """inprocess (the trainer's own weights). vllm is reserved: not implemented yet (refused)."""


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


def _dpo_losses() -> tuple[str, ...]:
    """The registered preference losses, looked up only when ``dpo.loss`` is set (the registry
    imports torch; this module stays cheap to import)."""
    from tulu3.stages.dpo.losses import loss_names

    return loss_names()


CHOICES: dict[str, tuple[str, ...] | typing.Callable[[], tuple[str, ...]]] = {
    "model.spec": ("te", "torch", "local"),
    "model.dtype": ("fp32", "bf16"),
    "model.fp8": ("none", "delayed", "current", "mxfp8"),
    "model.recompute": ("none", "selective", "full"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "optim.schedule": ("linear", "cosine", "constant"),
    "sft.loss_reduction": ("sum", "mean"),
    "dpo.loss": _dpo_losses,
    "dpo.reference_mode": ("cached", "online"),
    "rlvr.algo": ("ppo", "grpo"),
    "rlvr.rollout_backend": ("inprocess", "vllm"),
}


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
            setattr(node, name, value)
            return
        node = getattr(node, name)


def parse_override(text: str) -> list[tuple[str, Any]]:
    """Parse one ``--set`` argument: ``a.b=1`` or several space-separated pairs ``a=1 b=2``."""
    pairs = []
    for chunk in text.split() or [text]:
        if "=" not in chunk:
            raise ConfigError(f"--set {text!r}: expected key=value")
        key, raw = chunk.split("=", 1)
        pairs.append((key.strip(), yaml.safe_load(raw) if raw != "" else None))
    return pairs


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a Config from a YAML recipe (optional) and ``--set`` overrides, validated."""
    cfg = Config()
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
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
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
