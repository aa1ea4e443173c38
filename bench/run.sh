#!/usr/bin/env bash
# Benchmarks this service's /keys/query against Synapse's own, on the same
# database and machine, in one run, and prints throughput and p50/p99 side
# by side with ratios. Uses the test harness to bring up PostgreSQL, Redis
# and Synapse (loopback only), wrk for the load.
#   bash bench/run.sh            # default: 15 s per measurement
#   BENCH_SECONDS=30 bash bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null; then
  apt-get install -y -q wrk >/dev/null
fi
cargo build --release --locked
SKW_TEST_CMD='python3 bench/bench.py' bash scripts/test.sh
