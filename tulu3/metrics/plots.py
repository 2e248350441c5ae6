"""PNG plots of a run's curves from ``metrics.jsonl`` (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from tulu3.metrics.records import read_metrics

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
RIGHT_AXIS = {"rlvr_reward": ("verified", "no_eos"), "rlvr_kl": ("entropy",)}
"""Keys drawn on a second y axis (right) of their figure: another scale (fractions in [0, 1]
beside a reward of +-10; entropy in nats beside a KL near 0)."""


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw every figure of FIGURES that has data; returns the PNG paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

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
        right = [k for k in series if k in RIGHT_AXIS.get(figure, ())]
        axes = {k: ax for k in series}
        if right and len(right) < len(series):
            twin = ax.twinx()
            twin.set_ylabel(", ".join(right))
            axes.update({k: twin for k in right})
        for n, (key, points) in enumerate(series.items()):
            steps, values = zip(*points, strict=True)
            axes[key].plot(steps, values, marker="o" if len(points) < 30 else None, ms=3,
                           label=key, color=f"C{n}")
        ax.set_ylabel(", ".join(k for k in series if axes[k] is ax))
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_title(f"{run_dir.name}: {figure}")
        ax.grid(alpha=0.3)
        fig.legend(loc="lower center", ncol=len(series), fontsize="small")
        fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend under the axes
        path = run_dir / f"{figure}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
