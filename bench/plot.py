"""Draws BENCHMARKS.md's picture from a bench run's JSON (bench/bench.py):
throughput and p99 latency against concurrency for Synapse, this service and
the ceiling server, scenario (a). Runs with the test venv's matplotlib.

    python bench/plot.py target/bench/results.json docs/bench.png"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

WHO = [("ceiling", "ceiling (fixed answer)", "#888888"), ("ours", "synapse-keys-worker", "#1f77b4"),
       ("Synapse", "Synapse", "#d62728")]


def main(src, dst):
    data = json.load(open(src))
    sweep = data["sweep"]
    if not sweep:
        raise SystemExit(f"{src}: no concurrency sweep")
    conns = [row["connections"] for row in sweep]
    fig, (rps, p99) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, colour in WHO:
        rps.plot(conns, [row[key]["rps"] for row in sweep], marker="o", label=label, color=colour)
        p99.plot(conns, [row[key]["p99"] for row in sweep], marker="o", label=label, color=colour)
    for ax, title, unit in ((rps, "Throughput", "requests/s"), (p99, "p99 latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(conns, [str(c) for c in conns])
        ax.set_xlabel("concurrent connections (wrk)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    rps.legend()
    fig.suptitle(f"/keys/query, 10 local users, warm: {data['seconds']} s per point, {data['nproc']} cores shared by all")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


main(*sys.argv[1:3])
