"""Plots of the figures in ``bench/results/*.json`` (the PNGs BENCHMARKS.md shows).

    python bench/plot.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent / "results"


def bars(ax: Any, figures: dict[str, float], title: str, unit: str) -> None:
    names = list(figures)
    ax.barh(names, [figures[n] for n in names], color=["#d62728" if n == "rerankq" else "#7f7f7f" for n in names])
    ax.invert_yaxis()
    ax.set_title(title)
    ax.set_xlabel(unit)
    for y, name in enumerate(names):
        ax.text(figures[name], y, f" {figures[name]:.0f}", va="center")


def main() -> None:
    peers = json.loads((RESULTS / "peers.json").read_text())
    overhead = json.loads((RESULTS / "overhead.json").read_text())
    scaleout = json.loads((RESULTS / "scaleout.json").read_text())

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    bars(axes[0], peers["pairs_per_s"], "Saturation, MiniLM cross-encoder, CPU", "pairs/s")
    bars(axes[1], overhead["jobs_per_s"], "Zero-cost ranker: queue overhead", "jobs/s")
    replicas = [int(n) for n in scaleout["jobs_per_s"]]
    rate = list(scaleout["jobs_per_s"].values())
    axes[2].plot(replicas, rate, "o-", color="#d62728", label="rerankq")
    axes[2].plot(replicas, [rate[0] * n / replicas[0] for n in replicas], "--", color="#7f7f7f",
                 label="N x one replica")
    axes[2].set_title("Scale-out, simulated GPU ranker")
    axes[2].set_xlabel("worker replicas")
    axes[2].set_ylabel("jobs/s")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "throughput.png", dpi=100)

    loads = list(peers["latency_ms"]["rerankq"])
    fig, axes = plt.subplots(1, len(loads), figsize=(6 * len(loads), 4), squeeze=False)
    for ax, load in zip(axes[0], loads, strict=True):
        names = [n for n, by_load in peers["latency_ms"].items() if load in by_load]
        for offset, (q, colour) in enumerate([("p50", "#1f77b4"), ("p95", "#ff7f0e"), ("p99", "#2ca02c")]):
            ax.bar([i + 0.27 * (offset - 1) for i in range(len(names))],
                   [peers["latency_ms"][n][load][q] for n in names], width=0.27, label=q, color=colour)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("ms")
        ax.set_title(f"Latency, open-loop Poisson arrivals at {load}" if load[0].isdigit()
                     else f"Latency, requests {load}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "latency.png", dpi=100)
    overload = json.loads((RESULTS / "overload.json").read_text())
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), sharey=True)
    colours = {"simulated": "#d62728", "fast": "#1f77b4", "passthrough": "#2ca02c"}
    for ax, (name, run) in zip(axes, overload["runs"].items(), strict=True):
        for kind, colour in colours.items():
            points = [(n, ms / 1000) for n, (ms, ranker) in enumerate(zip(run["latency_ms"], run["rankers"],
                                                                          strict=True)) if ranker == kind]
            if points:
                ax.scatter(*zip(*points, strict=True), s=4, color=colour,
                           label="GPU (simulated)" if kind == "simulated" else kind)
        ax.set_title(f"{overload['offered_jobs_per_s'] / overload['gpu_jobs_per_s']:.0f}x overload, {name}")
        ax.set_xlabel("job, in arrival order")
        ax.legend(markerscale=3)
    axes[0].set_ylabel("latency, s")
    fig.tight_layout()
    fig.savefig(RESULTS / "overload.png", dpi=100)
    print(f"wrote throughput.png, latency.png and overload.png in {RESULTS}")


if __name__ == "__main__":
    main()
