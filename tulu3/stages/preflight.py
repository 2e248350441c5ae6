"""What ``tulu3.train`` checks before it builds anything (and all ``--dry-run`` checks).

In this order, so that the first error is the one to fix first: the recipe (done by
:func:`tulu3.config.load_config`), the parallel layout, the paths (data, tokenizer, model.load,
the stage's other checkpoints, a writable run_dir), then a scan of every data row (schema, RLVR
dataset names against the registered verifiers; SFT skips it when the tokenization cache already
holds these files' contents, see :func:`cached_scan`). Each failure is a one-line
:class:`~tulu3.config.ConfigError` naming the key, or the file and line. Nothing here starts a
process group or imports megatron: on a 405B job these checks take seconds, not the minutes of
256 GPUs that building and loading the model costs.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from tulu3.config import Config, ConfigError, UserError, describe_error

DATA_KIND = {"sft": "sft", "dpo": "dpo", "rm": "dpo", "rlvr": "rlvr"}
"""Stage -> the row format of its data (the RM trains on preference pairs)."""


def preflight(cfg: Config, stage: str, world_size: int | None = None) -> list[str]:
    """Check ``cfg`` for ``stage`` before any model is built; returns notes for the log (row
    counts). Raises :class:`ConfigError` (or the data's ``RowError``) on the first problem."""
    from tulu3.parallel.layout import make_layout

    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    layout = make_layout(cfg, world)
    if stage == "rlvr":  # the RLVR settings the loop would refuse after the model build
        from tulu3.stages.rlvr.settings import validate_rlvr

        validate_rlvr(cfg, layout)
    check_paths(cfg, stage)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return []  # one scan per node: the data is the same for every rank; a bad row stops
        # local rank 0, and torchrun then ends the node's other ranks
    return scan_data(cfg, stage)


def _exists(key: str, value: str | None) -> None:
    if value and not Path(value).exists():
        raise ConfigError(f"{key}={value}: not found (from {os.getcwd()})")


def check_paths(cfg: Config, stage: str) -> None:
    """data.train / data.eval, data.tokenizer, model.load and the stage's other checkpoints exist
    and can be read; train.run_dir can be written."""
    from tulu3.data.loading import data_files, parse_mixture

    data = cfg.data
    if data.train is None:
        raise ConfigError("data.train is not set: give a data file, a directory or a mixture")
    for key in ("train", "eval"):
        spec = getattr(data, key)
        try:
            for source in parse_mixture(spec) if spec is not None else ():
                data_files(source.path)
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(f"data.{key}: {describe_error(err)}") from err
    check_tokenizer(data.tokenizer)
    checkpoints = {"model.load": cfg.model.load}
    if stage == "dpo":
        checkpoints["dpo.reference"] = cfg.dpo.reference
    if stage == "rlvr":
        checkpoints["rlvr.value_model"] = cfg.rlvr.value_model
    for key, path in checkpoints.items():
        check_checkpoint(key, path)
    check_writable("train.run_dir", cfg.train.run_dir)


def check_tokenizer(path: str | None) -> None:
    """data.tokenizer is set, exists, is not empty and loads."""
    from tulu3.data.tokenizer import load_tokenizer

    if not path:
        raise ConfigError("data.tokenizer is not set (a tokenizer.model, a sentencepiece .model "
                          "or an HF model directory)")
    _exists("data.tokenizer", path)
    try:
        load_tokenizer(path)
    except Exception as err:
        raise ConfigError(f"data.tokenizer={path}: cannot be loaded: "
                          f"{describe_error(err)}") from err


def check_checkpoint(key: str, path: str | None) -> None:
    """The checkpoint at ``path`` (if set) exists and its metadata reads (tulu3.json, config.json);
    the weights are read later, by the ranks that need them."""
    if not path:
        return
    _exists(key, path)
    # imports torch's DCP: only when needed
    from tulu3.checkpoint.dcp_io import DistReader
    from tulu3.checkpoint.format import MODEL_DIR
    from tulu3.checkpoint.load import checkpoint_shape, detect_format, resolve_checkpoint_dir

    try:
        checkpoint_shape(path)
        resolved = resolve_checkpoint_dir(path)
        if detect_format(resolved) == "tulu3":  # sizes of its shards: a truncated copy
            DistReader(resolved / MODEL_DIR).check_complete()
    except Exception as err:
        raise ConfigError(f"{key}={path}: {describe_error(err)}") from err


def check_writable(key: str, folder: str) -> None:
    """``folder`` (or its nearest existing parent, where it will be created) is writable."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={folder}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={folder}: {existing} is not writable; pick another {key}")


def scan_data(cfg: Config, stage: str) -> list[str]:
    """Every row of data.train / data.eval checked for the stage's format; RLVR rows must name a
    registered verifier. Returns one note per data set with the rows read and skipped."""
    from tulu3.data.dataset import scan_rows

    verifiers = None
    if stage == "rlvr":
        from tulu3.rewards import registered_datasets

        verifiers = registered_datasets()
    notes = []
    for key in ("train", "eval"):
        spec = getattr(cfg.data, key)
        if spec is None:
            continue
        stats = cached_scan(cfg, stage, spec)
        if stats is None:
            stats = scan_rows(DATA_KIND[stage], spec, cfg.train.seed, cfg.data.skip_bad_rows,
                              verifiers)
        if not stats["rows_ok"]:
            raise UserError(f"data.{key}: none of its {stats['rows_read']} rows is usable "
                            f"({stats['bad_rows']} malformed, skipped by data.skip_bad_rows)")
        if stats["identical_pairs"] == stats["rows_ok"] and stage in ("dpo", "rm"):
            raise UserError(f"data.{key}: all {stats['rows_ok']} pairs have the same chosen "
                            "and rejected reply: nothing to learn from")
        notes.append(f"data.{key}: {stats['rows_read']} rows read, {stats['bad_rows']} "
                     "malformed skipped")
    return notes


def cached_scan(cfg: Config, stage: str, spec: object) -> Counter | None:
    """The scan's counts without reading a row, when the loop's tokenization cache already holds
    an intact entry for exactly these files (its key hashes their contents): that entry was saved
    only after every row passed the same checks (a bad row stops the build). None otherwise.

    SFT without data.skip_bad_rows only: DPO / RM's identical-pair check and RLVR's verifier
    names are not enforced by the build, and with skip_bad_rows the build also counts rows that
    fail to tokenize, so its skipped count is not the scan's."""
    from tulu3.data.cache import intact_meta
    from tulu3.data.dataset import dataset_key
    from tulu3.data.tokenizer import load_tokenizer

    data = cfg.data
    if stage != "sft" or data.skip_bad_rows:
        return None
    try:  # the key the SFT loop computes (stages/supervised.py): the entry it will read
        tok = load_tokenizer(data.tokenizer, bos=data.bos, eos=data.eos, pad=data.pad)
        key, _, _ = dataset_key("sft", spec, tok.name, data.max_len, data.add_bos,
                                cfg.train.seed, data.skip_bad_rows)
    except Exception:  # noqa: BLE001 - reported as before: by the scan, or by the loop
        return None
    meta = intact_meta(cfg.tokenization_cache, key)
    if meta is None:
        return None
    rows = meta.get("stats", {}).get("rows_read")
    if not isinstance(rows, int):
        return None
    return Counter(rows_read=rows, rows_ok=rows, bad_rows=0)  # every row read passed
