"""PNG plots of a run's curves from ``metrics.jsonl`` (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from tulu3.metrics import read_metrics

# Figure name -> metric keys drawn on it (the ones present are drawn). Accuracies (0..1) and
# margins (unbounded) get separate figures: on one axis the accuracy curve would be a flat line.
FIGURES = {
    "loss": ("loss", "eval/loss"),
    "lr": ("lr",),
    "grad_norm": ("grad_norm",),
    "dpo_rewards": ("rewards/accuracy", "eval/rewards/accuracy"),
    "dpo_margin": ("rewards/margin", "eval/rewards/margin"),
    "dpo_logps": ("rewards/chosen", "rewards/rejected"),
    "rm": ("accuracy", "eval/accuracy"),
    "rm_margin": ("margin", "eval/margin"),
    "rlvr_reward": ("reward", "verified", "no_eos"),
    "rlvr_kl": ("kl", "entropy"),
}


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw every figure of FIGURES that has data; returns the PNG paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    written = []
    for figure, keys in FIGURES.items():
        series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
                  for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, points in series.items():
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, ms=3, label=key)
        ax.set_xlabel("step")
        ax.set_title(f"{run_dir.name}: {figure}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = run_dir / f"{figure}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
