"""The sweep's plot: throughput and p99 latency against parallelism (needs the `plot` extra, matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from gym_collect.tune import TuneReport


def plot_sweep(report: TuneReport, path: Path) -> None:
    """Write a PNG: rollouts/s (left axis) and p99 latency in seconds (right axis) against parallelism on
    a log2 axis, with the knee and the recommendation marked."""
    levels = [s.parallelism for s in report.steps]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(levels, [s.rollouts_per_s for s in report.steps], "o-", color="tab:blue", label="rollouts/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("num_samples_in_parallel")
    ax.set_ylabel("rollouts/s", color="tab:blue")
    right = ax.twinx()
    right.plot(levels, [s.p99_s for s in report.steps], "s--", color="tab:red", label="p99 latency")
    right.set_ylabel("p99 latency (s)", color="tab:red")
    ax.axvline(report.knee, color="gray", linestyle=":", label=f"knee {report.knee}")
    ax.axvline(report.recommended, color="tab:green", linestyle="-.", label=f"recommended {report.recommended}")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("tune_parallelism sweep")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
