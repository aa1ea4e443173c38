#!/usr/bin/env bash
# Benchmarks this service's /keys/query against Synapse's own, on the same
# database and machine, in one run, and prints throughput and p50/p99 side
# by side with ratios. The test world (scripts/world.py) brings up
# PostgreSQL, Redis and Synapse (loopback only), wrk makes the load.
#   bash bench/run.sh            # default: 15 s per measurement
#   BENCH_SECONDS=30 bash bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh system venv wrk
cargo build --release --locked --bins --example ceiling --example loadgen
# bench.py: throughput and latency against Synapse and the ceiling;
# memory.py: scenario (i), resident size with 100,000 users cached.
exec "${SKW_PYTHON:-python3}" scripts/world.py run -- bash -c '"$1" bench/bench.py && "$1" bench/memory.py' run "${SKW_PYTHON:-python3}"
