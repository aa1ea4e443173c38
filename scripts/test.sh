#!/usr/bin/env bash
# The project's test command: `bash scripts/test.sh [cargo test args...]`.
#
# A full run (no arguments) first checks formatting, clippy with warnings
# denied and cargo deny. Then it installs what is missing
# (scripts/install.sh: Debian packages, the pinned Synapse in a venv under
# target/) and runs `cargo test --locked` in a throw-away test world
# (scripts/world.py: PostgreSQL, Redis and four Synapses on loopback, the
# SKW_TEST_* variables the tests read), torn down afterwards; a full run
# then runs the client test (tests/client: matrix-rust-sdk through nginx,
# a crate of its own) in the same world, and the integration suite again
# in a world of the oldest Synapse we read. Works from any cwd.
#
# Environment knobs:
#   SKW_TEST_SERVER_NAME  Synapse server_name (default hs.test.invalid)
#   SKW_KEEP_STATE=1      keep the world's state dir (configs, logs, databases)
#   SKW_WORLD_REUSE=1     run in the world left by an earlier run, or leave
#                         this one up for the next (stop: scripts/world.py down)
#   SKW_PYTHON            host interpreter: creates the venv, runs the world
#                         manager (default python3)
#   SKW_TEST_CMD          if set, run this shell command (via `bash -c`, with
#                         the script's arguments as "$@") instead of cargo,
#                         e.g. SKW_TEST_CMD='env | grep SKW_TEST_'
set -euo pipefail
cd "$(dirname "$0")/.."
started=$EPOCHSECONDS
# The client test's crate; it builds into the same target dir as the
# service, so what the two share is built once.
CLIENT=tests/client/Cargo.toml
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# One build per run: incremental state would only take disk (gigabytes).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

if [ -z "${SKW_TEST_CMD:-}" ] && [ "$#" -eq 0 ]; then
    echo "== cargo fmt --check; cargo clippy --all-targets -- -D warnings; cargo deny (the service, then $CLIENT)"
    cargo fmt --check || { echo "!! run cargo fmt" >&2; exit 1; }
    cargo clippy --locked --all-targets -- -D warnings
    cargo fmt --check --manifest-path "$CLIENT" || { echo "!! run cargo fmt --manifest-path $CLIENT" >&2; exit 1; }
    cargo clippy --locked --all-targets --manifest-path "$CLIENT" -- -D warnings
    bash scripts/install.sh deny
    # The advisory database is out of reach here (no internet beyond the
    # package registries), so `advisories` is not checked: said, not hidden.
    target/tools/bin/cargo-deny check bans licenses sources
    target/tools/bin/cargo-deny --manifest-path "$CLIENT" check bans licenses sources
fi

bash scripts/install.sh system venv
world=("${SKW_PYTHON:-python3}" scripts/world.py --started-at "$started" run --)
if [ -n "${SKW_TEST_CMD:-}" ]; then
    exec "${world[@]}" bash -c "$SKW_TEST_CMD" skw-test "$@"
fi
if [ "$#" -gt 0 ]; then
    exec "${world[@]}" cargo test --locked "$@"
fi
# The heavy tests (load, faults, memory, fuzzing from the spec) never run
# beside the tests that assert a time bound: the main suite skips them, and
# they run afterwards, one at a time (faults also asserts time bounds of
# its own). The fleet tests of the device-list health API join them: they
# mark every user of the federating world's remote server stale, other
# tests' users too.
HEAVY=(faults:: bounded:: dashboard:: tooling::schemathesis device_health::fleet_)
skip_heavy=()
for t in "${HEAVY[@]}"; do skip_heavy+=(--skip "$t"); done
# A full run: the main suite, the heavy tests, then the client test, then a smoke run of the
# bench (bench/bench.py: every scenario for a second, on the debug builds;
# bench/memory.py with 1,000 users), so the bench command keeps working, in
# one world.
smoke="BENCH_SECONDS=1 BENCH_ROUNDS=1 BENCH_USERS=20 BENCH_REAL_USERS=12 BENCH_REAL_RATES=20 BENCH_TOKENS=10 BENCH_SWEEP=1,2 BENCH_RATES=20 BENCH_BURST=20
    BENCH_BINARY=$CARGO_TARGET_DIR/debug/synapse-keys-worker BENCH_CEILING=$CARGO_TARGET_DIR/debug/examples/ceiling
    BENCH_LOADGEN=$CARGO_TARGET_DIR/debug/examples/loadgen MEM_USERS=1000 MEM_CYCLES=2
    MEM_OUT=$CARGO_TARGET_DIR/bench/memory-smoke.json
    BENCH_OUT=$CARGO_TARGET_DIR/bench/smoke.json"
"${world[@]}" bash -c 'cargo test --locked -- $3 && cargo test --locked --test api -- --test-threads=1 $4 &&
    cargo test --locked --manifest-path "$1" &&
    cargo build --locked --example ceiling --example loadgen && env $2 "${SKW_PYTHON:-python3}" bench/bench.py &&
    env $2 "${SKW_PYTHON:-python3}" bench/memory.py' skw-test "$CLIENT" "$smoke" "${skip_heavy[*]}" "${HEAVY[*]}"
# The other end of the Synapse versions we read (src/schema_window.rs): the
# integration suite again, in a second world whose every homeserver runs
# Synapse 1.136.0 (scripts/install.sh old). The tests that do not depend on
# Synapse's version (tooling, packaging, the demo) and the heavy ones run
# once, above.
bash scripts/install.sh old
old_venv="target/synapse-venv-$(sed -n 's/^OLD_SYNAPSE_VERSION=//p' scripts/install.sh)"
echo "== the integration suite against the Synapse in $old_venv"
SKW_SYNAPSE_VENV="$old_venv" exec "${world[@]}" cargo test --locked --test api -- "${skip_heavy[@]}" \
    --skip tooling:: --skip packaging:: --skip demo::
