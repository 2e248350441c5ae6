"""launch/*.sh and launch/slurm/*.sbatch: shellcheck, the torchrun line they build, logs."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STAGES = ("sft", "dpo", "rlvr")
SCRIPTS = sorted(REPO.glob("launch/*.sh")) + sorted(REPO.glob("launch/slurm/*.sbatch"))


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)


@pytest.fixture
def sandbox(tmp_path: Path) -> dict:
    """A clean environment (no NNODES, SLURM_*, ... from the caller) with a stub bin dir first
    on PATH; nvidia-smi there finds no GPU unless a test replaces it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "nvidia-smi", "exit 9")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {preset: tiny}\n")
    env = {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
           "HOME": str(tmp_path), "LOG_DIR": str(tmp_path / "logs")}
    return {"env": env, "bin": bin_dir, "recipe": str(recipe), "tmp": tmp_path}


def _run(script: str, args: list[str], env: dict, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / script), *args], env={**env, **extra}, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def _torchrun(stage: str, recipe: str, *, nnodes: int, rank: int, nproc: int, addr: str,
              port: int, rest: tuple[str, ...] = ()) -> list[str]:
    return ["torchrun", "--nnodes", str(nnodes), "--node-rank", str(rank), "--nproc-per-node",
            str(nproc), "--master-addr", addr, "--master-port", str(port), "-m", "tulu3.train",
            "--stage", stage, "--config", recipe, *rest]


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    assert len(SCRIPTS) == 8, SCRIPTS  # common.sh, three stages, gpu_check, three sbatch files
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=REPO,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("stage", STAGES)
def test_dry_run_multi_node(sandbox, stage):
    out = _run(f"launch/{stage}.sh", [sandbox["recipe"], "--set", "parallel.tp=8 parallel.pp=2",
                                      "--set", "train.max_steps=5"], sandbox["env"],
               NNODES="4", NODE_RANK="2", MASTER_ADDR="10.1.2.3", MASTER_PORT="6001",
               GPUS_PER_NODE="8", DRY_RUN="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1  # exactly the torchrun line
    assert shlex.split(out.stdout) == _torchrun(
        stage, sandbox["recipe"], nnodes=4, rank=2, nproc=8, addr="10.1.2.3", port=6001,
        rest=("--set", "parallel.tp=8 parallel.pp=2", "--set", "train.max_steps=5"))
    for line in ("CUDA_DEVICE_MAX_CONNECTIONS=1", "NCCL_IB_TIMEOUT=22",
                 "TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "OMP_NUM_THREADS=",
                 "TORCH_NCCL_DUMP_ON_TIMEOUT=1", "TORCH_NCCL_TRACE_BUFFER_SIZE=2000"):
        assert line in out.stderr
    # the flight recorder's per-rank dumps land beside the node logs
    assert f"TORCH_NCCL_DEBUG_INFO_TEMP_FILE={sandbox['env']['LOG_DIR']}/nccl_trace/rank_" \
        in out.stderr, out.stderr


def test_defaults_one_node_four_cpu_processes(sandbox):
    out = _run("launch/sft.sh", [], sandbox["env"], RECIPE=sandbox["recipe"], DRY_RUN="1")
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout) == _torchrun("sft", sandbox["recipe"], nnodes=1, rank=0,
                                                nproc=4, addr="127.0.0.1", port=29500)


def test_gpus_per_node_from_nvidia_smi(sandbox):
    listing = "".join(f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})'\n" for i in range(8))
    _stub(sandbox["bin"], "nvidia-smi", listing)
    out = _run("launch/dpo.sh", [sandbox["recipe"]], sandbox["env"], DRY_RUN="1")
    assert "--nproc-per-node 8" in out.stdout
    out = _run("launch/dpo.sh", [sandbox["recipe"]], sandbox["env"], DRY_RUN="1",
               CUDA_VISIBLE_DEVICES="0,3")
    assert "--nproc-per-node 2" in out.stdout


def test_user_environment_wins(sandbox):
    out = _run("launch/rlvr.sh", [sandbox["recipe"]], sandbox["env"], DRY_RUN="1",
               NCCL_IB_TIMEOUT="18", OMP_NUM_THREADS="3")
    assert "NCCL_IB_TIMEOUT=18" in out.stderr and "OMP_NUM_THREADS=3" in out.stderr


@pytest.mark.parametrize("args, extra, message", [
    ([], {}, "usage: launch/sft.sh RECIPE.yaml"),
    (["/no/such/recipe.yaml"], {}, "recipe not found: /no/such/recipe.yaml"),
    (["RECIPE"], {"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2 must be below NNODES=2"),
    (["RECIPE"], {"GPUS_PER_NODE": "eight"}, "GPUS_PER_NODE must be an integer >= 1"),
])
def test_bad_environment_one_line(sandbox, args, extra, message):
    args = [sandbox["recipe"] if a == "RECIPE" else a for a in args]
    out = _run("launch/sft.sh", args, sandbox["env"], DRY_RUN="1", **extra)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"launch: {message}") and out.stderr.count("\n") == 1


def test_log_per_node_and_exit_status(sandbox):
    """A fake launcher stands in for torchrun: its output lands in LOG_DIR/node1.log and its
    exit status is the script's."""
    _stub(sandbox["bin"], "fake-torchrun", 'echo "fake torchrun $*"; exit 3')
    out = _run("launch/sft.sh", [sandbox["recipe"]], sandbox["env"], TORCHRUN="fake-torchrun",
               NNODES="2", NODE_RANK="1", GPUS_PER_NODE="2")
    assert out.returncode == 3
    log = (sandbox["tmp"] / "logs" / "node1.log").read_text()
    assert (sandbox["tmp"] / "logs" / "nccl_trace").is_dir()  # where NCCL dumps on a timeout
    assert log.startswith("fake torchrun --nnodes 2 --node-rank 1 --nproc-per-node 2")
    assert "fake torchrun" in out.stdout  # tee: the terminal sees it too


@pytest.mark.parametrize("stage", STAGES)
def test_sbatch_runs_one_task_per_node(sandbox, stage):
    """Stub scontrol/srun: srun runs the task as node 1; a stale NODE_RANK from the submitting
    shell must not leak into the tasks. scontrol lists more hosts than a pipe buffer holds, so
    taking the first with `| head -n 1` under pipefail would die of SIGPIPE (exit 141)."""
    _stub(sandbox["bin"], "scontrol", 'echo nodeA; seq -f "node%06g" 20000')
    _stub(sandbox["bin"], "srun", 'while [[ $1 == -* ]]; do shift; done\n'
                                  'SLURM_NODEID=1 exec "$@"')
    out = _run(f"launch/slurm/{stage}.sbatch", [sandbox["recipe"], "--set", "a=1"],
               sandbox["env"], SLURM_JOB_NODELIST="nodeA,nodeB", SLURM_NNODES="2",
               SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(REPO), NODE_RANK="7", DRY_RUN="1")
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout) == _torchrun(stage, sandbox["recipe"], nnodes=2, rank=1,
                                                nproc=8, addr="nodeA", port=24242,
                                                rest=("--set", "a=1"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
def test_torchrun_starts_four_cpu_ranks(sandbox):
    """The real launcher on CPU: 4 gloo processes resolve the tiny recipe (--dry-run, ~10 s)."""
    recipe = REPO / "launch/recipes/tiny-sft.yaml"
    if not recipe.exists():
        pytest.skip("launch/recipes/tiny-sft.yaml is not there yet")
    from tulu3.demo.data import make_tiny_data  # --dry-run checks that the data is there

    data = make_tiny_data(sandbox["tmp"] / "data", n_sft=16, n_dpo=8, n_rlvr=8, n_eval=8, n_rm=8)
    sets = (f"train.micro_batch=4 data.tokenizer={data['tokenizer']} data.train={data['sft']} "
            f"data.eval={data['sft_eval']} train.run_dir={sandbox['tmp'] / 'run'}")
    out = _run("launch/sft.sh", [str(recipe), "--dry-run", "--set", sets],
               sandbox["env"], GPUS_PER_NODE="4", MASTER_PORT=str(_free_port()))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "layout: TP2xPP2xDP1 on 4 ranks" in out.stdout
    assert "layout: TP2xPP2xDP1" in (sandbox["tmp"] / "logs" / "node0.log").read_text()


@pytest.mark.distributed
@pytest.mark.skipif(os.environ.get("TULU3_E2E") != "1",
                    reason="about 60 s on 2 CPU cores; set TULU3_E2E=1 to run")
def test_tiny_sft_end_to_end_on_cpu(sandbox):
    from tulu3.demo.data import make_tiny_data

    data = make_tiny_data(sandbox["tmp"] / "data")
    run_dir = sandbox["tmp"] / "run"
    sets = (f"data.tokenizer={data['tokenizer']} data.train={data['sft']} "
            f"data.eval={data['sft_eval']} train.run_dir={run_dir} train.max_steps=3 "
            "train.save_every=0 train.plots=false")
    out = _run("launch/sft.sh", ["launch/recipes/tiny-sft.yaml", "--set", sets], sandbox["env"],
               GPUS_PER_NODE="4", MASTER_PORT=str(_free_port()))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
