"""Training checkpoints: model + optimizer + scheduler + RNG + data position, written atomically.

    RUN_DIR/checkpoints/
      step_N/            tulu3.json + model/ (tulu3.checkpoint.format), and
        optimizer/       megatron dist_checkpointing of the optimizer (reshardable)
        trainer.json     step, scheduler, sampler position, counters (rank 0); the extra models'
                         schedulers under "extra": {NAME: {"scheduler": ...}}
        rng/rank_R.pt    every RNG this rank draws from
        NAME/            each extra trained model of the loop (PPO: value/): its own tulu3.json +
                         model/ + optimizer/, a checkpoint ``model.load`` / ``rlvr.value_model``
                         can read on its own
      latest             text: "step_N"
      .tmp_step_N/       a save in progress; renamed to step_N only when complete

A save that dies half-way (kill -9) leaves only ``.tmp_*``; ``latest`` still names the previous
complete checkpoint, and the next start deletes the leftovers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# torch's DCP errors derive from BaseException, not Exception.
from torch.distributed.checkpoint.api import CheckpointException

from tulu3.checkpoint.dcp_io import DistReader
from tulu3.checkpoint.errors import ConversionError, read_json
from tulu3.checkpoint.format import (
    META_FILE,
    MODEL_DIR,
    load_model,
    make_meta,
    read_meta,
    split_flags,
    write_meta,
)
from tulu3.config import UserError
from tulu3.fileio import atomic_open, fsync_tree
from tulu3.model.presets import LlamaShape
from tulu3.parallel.ddp import unwrap
from tulu3.parallel.layout import ParallelLayout

OPTIMIZER_DIR = "optimizer"
TRAINER_FILE = "trainer.json"
LATEST = "latest"
# Megatron's default DistributedOptimizer sharding cannot be saved by torch_dist; this one can,
# and it reshards across layouts.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
# After a failed optimizer load, how long each rank reads the shards back to name a corrupt one
# (the failure path only; a 405B optimizer state is terabytes, so the search is bounded).
VERIFY_S = 60.0


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit this run."""


@dataclass
class TrainedModel:
    """One trained model of a checkpoint: the policy, or an extra one of the loop (PPO's value
    model, ``Loop.extra_models``)."""

    chunks: list
    """This rank's DDP-wrapped chunks."""
    optimizer: Any
    scheduler: Any
    shape: LlamaShape
    load_key: str = "model.load"
    """The recipe key that starts a new run from this model's weights (named in errors)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _any_rank(flag: bool) -> bool:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    from tulu3.step import any_rank

    return any_rank(flag)


def _model_sharded(ddp_chunks: list) -> dict:
    from tulu3.checkpoint.format import model_sharded_state_dict

    return model_sharded_state_dict([unwrap(c) for c in ddp_chunks])


def rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, policy: TrainedModel, trainer_state: dict,
                    layout: ParallelLayout, dtype: str, tokenizer: str | None = None,
                    keep_last: int = 2, extra: dict[str, TrainedModel] | None = None) -> Path:
    """Save everything needed to resume at ``step``: the policy in ``step_N/``, each extra
    model in ``step_N/NAME/``; collective (every rank calls it). Returns when it is complete."""
    pending = start_checkpoint(run_dir, step, policy, trainer_state, layout, dtype, tokenizer,
                               keep_last, extra, background=False)
    return pending.finish()


def start_checkpoint(run_dir: str | Path, step: int, policy: TrainedModel, trainer_state: dict,
                     layout: ParallelLayout, dtype: str, tokenizer: str | None = None,
                     keep_last: int = 2, extra: dict[str, TrainedModel] | None = None,
                     background: bool = True) -> PendingSave:
    """Begin a save (collective); the files are written by a background thread when
    ``background``, and the checkpoint becomes ``step_N`` / ``latest`` in
    :meth:`PendingSave.finish`.

    What blocks: megatron dist_checkpointing's save planning (collective), the common state,
    and a copy of every tensor this rank writes (so training may change the weights and the
    optimizer state at once); the thread only writes this rank's files (no collectives).
    """
    root = Path(run_dir) / "checkpoints"
    tmp = root / f".tmp_step_{step}"
    extra = extra or {}
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    requests = _save_trained(policy, tmp)
    for name, model in extra.items():
        requests += _save_trained(model, tmp / name)
    torch.save(rng_state(), tmp / "rng" / f"rank_{_rank()}.pt")
    if _rank() == 0:
        full_state = {**trainer_state, "step": step, "scheduler": policy.scheduler.state_dict(),
                      "layout": layout.checkpoint_record()}
        if extra:
            full_state["extra"] = {name: {"scheduler": m.scheduler.state_dict()}
                                   for name, m in extra.items()}
        (tmp / TRAINER_FILE).write_text(json.dumps(full_state, indent=1))
        for folder, model in [(tmp, policy), *((tmp / n, m) for n, m in extra.items())]:
            head = getattr(unwrap(model.chunks[0]), "head_kind", "lm")  # scalar: reward/value
            write_meta(folder, make_meta(model.shape, layout.tp, layout.pp, layout.vpp, dtype,
                                         step=step, tokenizer=tokenizer, head=head,
                                         **split_flags(layout.for_layers(model.shape.layers))))
    pending = PendingSave(root, step, requests, keep_last)
    pending.start(background)
    return pending


class PendingSave:
    """A checkpoint whose files are being written; :meth:`finish` (collective) completes it.

    Until then only ``.tmp_step_N/`` exists and ``latest`` names the previous checkpoint: a
    process killed while the thread writes (``kill -9``) leaves the last complete one loadable.
    """

    def __init__(self, root: Path, step: int, requests: list, keep_last: int) -> None:
        self.root, self.step, self.requests, self.keep_last = root, step, requests, keep_last
        self.final = root / f"step_{step}"
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, background: bool) -> None:
        if not background:
            self._write()
            return
        self._thread = threading.Thread(target=self._write, name=f"tulu3-save-{self.step}",
                                        daemon=True)
        self._thread.start()

    def _write(self) -> None:
        try:
            for index, write in enumerate(self.requests):
                write.run()
                if index == 0:
                    _fault_point("save", self.step)  # the policy's weights are on disk
        except BaseException as err:  # noqa: BLE001 - re-raised by finish() in the main thread
            self._error = err

    def written(self) -> bool:
        """Whether this rank's files are written (not collective)."""
        return self._thread is None or not self._thread.is_alive()

    def finish(self) -> Path:
        """Wait for this rank's writes, then (every rank) write the metadata, rename
        ``.tmp_step_N`` to ``step_N``, move ``latest`` and prune old checkpoints."""
        if self._thread is not None:
            self._thread.join()
        if _any_rank(self._error is not None):  # every rank stops, none waits in finalize
            error = self._error or "on another rank"
            raise CheckpointError(f"writing {self.final} failed: {error}") from self._error
        for write in self.requests:
            for finalize in write.finalize_fns:  # collective: global metadata, barrier
                finalize()
        tmp = self.root / f".tmp_step_{self.step}"
        # each rank: the pages it wrote are in its own node's cache; a crash after `latest`
        # moves must not leave it pointing at lost data
        fsync_tree(tmp)
        _barrier()
        if _rank() == 0:
            shutil.rmtree(self.final, ignore_errors=True)
            tmp.rename(self.final)  # atomic on one file system: a reader sees all of it or none
            _write_latest(self.root, self.final.name)
            _prune(self.root, self.keep_last)
        _barrier()
        return self.final


def _save_trained(model: TrainedModel, folder: Path) -> list:
    """Plan ``folder/model`` (weights) and ``folder/optimizer`` (reshardable) saves
    (collective); returns the writes still to do, their tensors already copied."""
    from tulu3.checkpoint.format import model_sharded_state_dict

    requests = []
    for sub, state in ((MODEL_DIR, lambda: model_sharded_state_dict(
                            [unwrap(c) for c in model.chunks])),
                       (OPTIMIZER_DIR, lambda: model.optimizer.sharded_state_dict(
                            _model_sharded(model.chunks), is_loading=False,
                            metadata=OPTIMIZER_METADATA))):
        target = folder / sub
        if _rank() == 0:
            target.mkdir(parents=True)
        _barrier()
        requests.append(_staged_request(state(), target))
    return requests


@dataclass
class _Write:
    """One dist_checkpointing save (megatron's AsyncRequest) whose tensors are copied: ``run``
    writes this rank's files (no collectives); ``finalize_fns`` then run on every rank."""

    function: Any
    args: list
    kwargs: dict
    finalize_fns: list

    def run(self) -> None:
        if self.function is not None:
            self.function(*self.args, **self.kwargs)


def _staged_request(sharded_state: dict, target: Path) -> _Write:
    """``dist_checkpointing.save(..., async_sharded_save=True)`` with every tensor to write
    copied now: megatron's staging (``preload_fn``) moves GPU tensors to the host, but on the
    host ``.to("cpu")`` is the tensor itself, which the next optimizer step would change while
    the thread writes it."""
    from megatron.core import dist_checkpointing

    request = dist_checkpointing.save(sharded_state, str(target), async_sharded_save=True)
    args = list(request.async_fn_args)
    if request.preload_fn is not None:
        staged = request.preload_fn() if torch.cuda.is_available() else args[1]
        # Copy what staging left shared with the live state (every tensor on a CPU-only host;
        # host-resident ones with CUDA), never a GPU tensor's fresh host copy twice.
        live = {id(t) for _, _, (_, tensors) in args[1] for _, t in tensors if not t.is_cuda}
        args[1] = [(name, key, (data, [(item, t.detach().clone() if id(t) in live else t)
                                       for item, t in tensors]))
                   for name, key, (data, tensors) in staged]
    return _Write(request.async_fn, args, dict(request.async_fn_kwargs),
                  list(request.finalize_fns))


def _fault_point(where: str, step: int) -> None:
    """Crash like ``kill -9`` here when TULU3_FAULT=where:step (tests of atomic saves)."""
    if os.environ.get("TULU3_FAULT") == f"{where}:{step}":
        os._exit(137)


def _write_latest(root: Path, name: str) -> None:
    """``root/latest`` = ``name``, replaced atomically and durably (after the checkpoint's own
    fsync, so a crash cannot leave it naming lost data)."""
    with atomic_open(root / LATEST) as f:
        f.write(name + "\n")


def _last_line(err: BaseException) -> str:
    """``Type: last line of the message`` (at most 300 characters): torch DCP's messages carry
    every rank's traceback, of which the last line says what failed."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[-1][:300] if text else ''}"


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    done = sorted((p for p in root.glob("step_*") if p.is_dir()),
                  key=lambda p: int(p.name.split("_")[1]))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def find_resume(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from for ``train.resume`` (auto | none | a directory)."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / TRAINER_FILE).is_file():
            raise CheckpointError(f"train.resume={resume}: not a complete tulu3 training "
                                  f"checkpoint (no {TRAINER_FILE})")
        return path
    root = Path(run_dir) / "checkpoints"
    latest = root / LATEST
    if not latest.is_file():
        return None
    path = root / latest.read_text().strip()
    if not (path / TRAINER_FILE).is_file():
        raise CheckpointError(f"{latest} names {path.name}, which is missing or incomplete")
    return path


def clean_partial_saves(run_dir: str | Path) -> None:
    """Remove ``.tmp_step_*`` left by a save that was killed (rank 0, before training)."""
    if _rank() == 0:
        for leftover in (Path(run_dir) / "checkpoints").glob(".tmp_step_*"):
            shutil.rmtree(leftover, ignore_errors=True)
    _barrier()


def load_checkpoint(path: Path, policy: TrainedModel, layout: ParallelLayout,
                    extra: dict[str, TrainedModel] | None = None) -> dict:
    """Restore the policy and each extra model (weights, optimizer, scheduler) and the RNG;
    returns trainer.json's state."""
    extra = extra or {}
    state = read_json(path / TRAINER_FILE)
    saved = state.get("extra", {})
    for name in extra:
        # No silent restart: a PPO run whose value model restarts is not the run that stopped.
        if name not in saved or not (path / name / META_FILE).is_file():
            raise CheckpointError(
                f"cannot resume from {path}: it holds no {name!r} model ({path / name} is "
                f"missing: a checkpoint saved before extra models were checkpointed, or by a "
                f"run without one). Start a new run from its weights with model.load={path} "
                f"instead.")
    _load_trained(path, policy, state["layout"], layout)
    policy.scheduler.load_state_dict(state["scheduler"])
    for name, model in extra.items():
        _load_trained(path / name, model, state["layout"], layout)
        model.scheduler.load_state_dict(saved[name]["scheduler"])
    rng_file = path / "rng" / f"rank_{_rank()}.pt"
    # RNG streams are per rank: restore them only where every rank is the same rank as before.
    if rng_file.is_file() and layout.same_ranks(state["layout"]):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def _load_trained(folder: Path, model: TrainedModel, saved_layout: dict,
                  layout: ParallelLayout) -> None:
    """Weights from ``folder/model``, optimizer state from ``folder/optimizer``; collective."""
    from megatron.core import dist_checkpointing

    try:
        meta = read_meta(folder)
    except ConversionError as err:
        raise CheckpointError(f"cannot resume from {folder}: {err}") from err
    if meta.shape != model.shape:
        raise CheckpointError(f"cannot resume from {folder}: it holds a model of shape "
                              f"{meta.shape}, this run builds {model.shape}")
    try:
        load_model([unwrap(c) for c in model.chunks], folder)
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - name the checkpoint
        raise CheckpointError(f"{folder}: the model weights cannot be read: the checkpoint is "
                              f"corrupt or incomplete ({_last_line(err)})") from err
    optimizer_dir = folder / OPTIMIZER_DIR
    try:  # a missing or truncated shard named here, not deep inside torch's DCP
        DistReader(optimizer_dir).check_complete()
    except ConversionError as err:
        raise CheckpointError(f"cannot resume from {folder}: the optimizer state: {err}") from err
    request = model.optimizer.sharded_state_dict(_model_sharded(model.chunks), is_loading=True,
                                                 metadata=OPTIMIZER_METADATA)
    try:
        loaded = dist_checkpointing.load(request, str(optimizer_dir))
        model.optimizer.load_state_dict(loaded)
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - name both layouts
        # torch DCP's message is every rank's traceback: name the damaged file when there is one
        damaged = DistReader(optimizer_dir).first_damaged(VERIFY_S)
        if damaged is not None:
            raise CheckpointError(f"cannot resume from {folder}: the optimizer state: "
                                  f"{damaged}") from err
        raise CheckpointError(
            f"{folder}: the optimizer state saved at {saved_layout} cannot be loaded at "
            f"{layout.describe()} ({_last_line(err)}). Start a new run from its "
            f"weights with {model.load_key}={folder} instead.") from err
