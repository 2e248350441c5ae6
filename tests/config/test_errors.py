"""The one error path: recipe checks (duplicate keys, ranges, --set values with spaces),
:func:`run_command`'s one line per failure, and ``tulu3.train``'s checks before any model is
built (``--dry-run`` runs the same checks), each naming the key or the file and line."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
from pathlib import Path

import pytest

from tulu3.config import ConfigError, UserError, load_config, parse_override, run_command
from tulu3.testing import run_in_child
from tulu3.train import main as train_main

RECIPE = "launch/recipes/tiny-sft.yaml"


def test_duplicate_section_and_key_are_refused_with_the_line(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  global_batch: 4\noptim:\n  lr: 0.1\ntrain:\n  seed: 3\n")
    with pytest.raises(ConfigError, match=r"r.yaml:5: key 'train' given twice \(first on "
                                          r"line 1\)"):
        load_config(recipe)
    recipe.write_text("train:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"r.yaml:3: key 'seed' given twice"):
        load_config(recipe)


@pytest.mark.parametrize("override, message", [
    ("train.global_batch=0", "train.global_batch=0 is out of range: it must be > 0"),
    ("train.micro_batch=-2", "train.micro_batch=-2 is out of range: it must be > 0"),
    ("train.max_steps=-1", "train.max_steps=-1 is out of range: it must be >= 1"),
    ("train.epochs=0", "train.epochs=0 is out of range"),
    ("train.save_every=-1", "train.save_every=-1 is out of range: it must be >= 0"),
    ("optim.lr=-0.001", "optim.lr=-0.001 is out of range: it must be >= 0"),
    ("data.max_len=0", "data.max_len=0 is out of range"),
    ("rlvr.top_p=1.5", "rlvr.top_p=1.5 is out of range: it must be > 0 and <= 1"),
    ("dpo.label_smoothing=0.5", "dpo.label_smoothing=0.5 is out of range"),
    ("parallel.tp=0", "parallel.tp=0 is out of range"),
])
def test_values_out_of_range_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(RECIPE, [override])
    assert message in str(err.value)


def test_in_range_edges_are_accepted() -> None:
    cfg = load_config(RECIPE, ["train.save_every=0", "optim.lr=0", "train.max_steps=1",
                               "rlvr.top_p=1", "train.max_steps=null"])
    assert cfg.train.save_every == 0 and cfg.optim.lr == 0.0 and cfg.train.max_steps is None


def test_set_value_with_spaces() -> None:
    assert parse_override("train.run_dir=my runs/x a.b=1") == [("train.run_dir", "my runs/x"),
                                                              ("a.b", 1)]
    cfg = load_config(RECIPE, ["train.run_dir=/tmp/a b c"])
    assert cfg.train.run_dir == "/tmp/a b c"


def _fail(err: BaseException):
    def main(argv: list[str]) -> None:
        raise err
    return main


def test_run_command_prints_one_line_and_exits_non_zero(capsys, monkeypatch) -> None:
    monkeypatch.delenv("TULU3_DEBUG", raising=False)
    monkeypatch.setenv("RANK", "0")
    assert run_command(_fail(UserError("f.jsonl:3: bad row")), "prog", []) == 2
    assert capsys.readouterr().err == "prog: error: f.jsonl:3: bad row\n"
    assert run_command(_fail(KeyError("x")), "prog", []) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "KeyError: 'x'" in err and "TULU3_DEBUG=1" in err
    full = OSError(errno.ENOSPC, "No space left on device", "/data/run/ckpt/x.distcp")
    wrapped = RuntimeError("unexpected pos 123")
    wrapped.__cause__ = full
    assert run_command(_fail(wrapped), "prog", []) == 1
    assert "no space left on /data/run/ckpt:" in capsys.readouterr().err
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y.json")
    assert run_command(_fail(missing), "prog", []) == 2
    assert capsys.readouterr().err == "prog: error: /x/y.json: No such file or directory\n"
    assert run_command(_fail(SystemExit("prog: stopped by signal 15")), "prog", []) == 1
    assert capsys.readouterr().err == "prog: stopped by signal 15\n"


def test_run_command_other_ranks_are_quiet_and_debug_raises(capsys, monkeypatch) -> None:
    # setenv then delenv: monkeypatch records the variable, so the --debug below (which sets it
    # for the process) is undone at teardown and cannot reach later tests in this worker
    monkeypatch.setenv("TULU3_DEBUG", "0")
    monkeypatch.delenv("TULU3_DEBUG")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")  # a torchrun rank
    assert run_command(_fail(UserError("bad")), "prog", []) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("LOCAL_RANK")  # started alone as rank 1 (a dry run of one rank): prints
    assert run_command(_fail(UserError("bad")), "prog", []) == 2
    assert capsys.readouterr().err == "prog: error: bad\n"
    seen = []
    assert run_command(lambda argv: seen.append(argv), "prog", ["--debug", "a"]) == 0
    assert seen == [["a"]] and os.environ["TULU3_DEBUG"] == "1"  # monkeypatch restores it
    with pytest.raises(UserError):
        run_command(_fail(UserError("bad")), "prog", [])


def _captured_train(argv: list[str]) -> tuple[int, str, str]:
    """``tulu3.train`` as rank 0 of 1 with its output captured -> (status, stderr, stdout)."""
    os.environ.update(RANK="0", WORLD_SIZE="1")
    os.environ.pop("TULU3_DEBUG", None)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = train_main(argv)
    return status, err.getvalue(), out.getvalue()


@pytest.fixture
def dry_run(tiny_data: dict, tmp_path: Path):
    """``tulu3.train --dry-run`` (no process group) -> (status, stderr, stdout), in a forked
    child: the dry run builds megatron's model on the meta device, which installs megatron's CPU
    patches, and those must stay out of the pytest process (tests/conftest.py)."""

    def run(stage: str = "sft", **keys: str) -> tuple[int, str, str]:
        base = {"parallel.tp": "1", "parallel.pp": "1", "data.tokenizer": tiny_data["tokenizer"],
                "data.train": tiny_data["sft"], "data.eval": "null", "model.load": "null",
                "train.run_dir": str(tmp_path / "run"), "train.global_batch": "8",
                "train.micro_batch": "1"}
        sets = [f"{k}={v}" for k, v in {**base, **keys}.items()]
        return run_in_child(_captured_train, ["--stage", stage, "--config",
                                              f"launch/recipes/tiny-{stage}.yaml", "--dry-run",
                                              "--set", *sets])
    return run


def _one_line(result: tuple[int, str, str], *parts: str) -> None:
    status, err, _ = result
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("tulu3.train: error: "), err
    for part in parts:
        assert part in err, err


def test_dry_run_passes_and_counts_rows(dry_run) -> None:
    status, err, out = dry_run()
    assert status == 0, err
    assert "# data.train: 16 rows read, 0 malformed skipped" in out


def test_dry_run_checks_paths_before_anything(dry_run, tmp_path: Path) -> None:
    _one_line(dry_run(**{"data.train": str(tmp_path / "nope.jsonl")}), "data.train",
              "nope.jsonl")
    _one_line(dry_run(**{"model.load": str(tmp_path / "ckpt")}), "model.load=", "not found")
    empty = tmp_path / "empty.model"
    empty.write_text("")
    _one_line(dry_run(**{"data.tokenizer": str(empty)}), "data.tokenizer=", "is empty")
    _one_line(dry_run(**{"data.tokenizer": "null"}), "data.tokenizer is not set")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"hidden_size": 64,')  # truncated
    (hf / "model.safetensors").write_bytes(b"")
    _one_line(dry_run(**{"model.load": str(hf)}), f"model.load={hf}",
              f"{hf / 'config.json'}: corrupt JSON")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        _one_line(dry_run(**{"train.run_dir": str(locked / "run")}), "is not writable")


def test_dry_run_scans_every_row(dry_run, tiny_data: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    rows = Path(tiny_data["sft"]).read_text().splitlines()
    bad.write_text("\n".join(rows[:3] + ['{"messages": [}'] + rows[3:]) + "\n")
    _one_line(dry_run(**{"data.train": str(bad)}), f"{bad}:4: bad JSON")
    bad.write_bytes(b'{"messages": []}\n\xff\xfe\n')
    _one_line(dry_run(**{"data.train": str(bad)}), f"{bad}:2: not UTF-8")
    rlvr = tmp_path / "rlvr.jsonl"
    row = json.loads(Path(tiny_data["rlvr"]).read_text().splitlines()[0])
    rlvr.write_text(json.dumps(row) + "\n" + json.dumps({**row, "dataset": "gsm9k"}) + "\n")
    _one_line(dry_run("rlvr", **{"data.train": str(rlvr)}),
              f"{rlvr}:2: no verifier for dataset 'gsm9k'")
    _one_line(dry_run("rlvr", **{"data.train": tiny_data["rlvr"],
                                 "rlvr.rollout_backend": "vllm"}),
              "rlvr.rollout_backend=vllm is not implemented")
    _one_line(dry_run("rlvr", **{"data.train": tiny_data["rlvr"], "rlvr.algo": "grpo",
                                 "rlvr.samples_per_prompt": "1"}),
              "rlvr.algo=grpo needs rlvr.samples_per_prompt >= 2")
    pair = json.loads(Path(tiny_data["dpo"]).read_text().splitlines()[0])
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({**pair, "rejected": pair["chosen"]}) + "\n")
    _one_line(dry_run("dpo", **{"data.train": str(same)}),
              "all 1 pairs have the same chosen and rejected reply")
