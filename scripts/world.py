#!/usr/bin/env python3
"""The test world: PostgreSQL, Redis and six real Synapse homeservers on
loopback (one in worker mode, two federating with each other over TLS),
described once (PROCESSES below) and shared by the integration
tests (scripts/test.sh), the bench (bench/run.sh) and anyone working on them.
The demo (`cargo run --release`) needs none of it: it embeds SQLite.

    python3 scripts/world.py up              start a world, or reuse the running one
    python3 scripts/world.py run [--reuse] -- CMD [ARG...]
                                             up, run CMD with the world's
                                             SKW_TEST_* variables, tear down,
                                             exit with CMD's status
    python3 scripts/world.py down            stop the world `up` left running
    python3 scripts/world.py status          is it there and healthy?
    python3 scripts/world.py env             the path of its environment file

What to install first: `bash scripts/install.sh` (scripts/test.sh does).

Working on the integration tests: bring a world up once and run the tests
against it as often as needed, either

    python3 scripts/world.py up && . target/world/env
    cargo test --test api differential::          # as often as needed
    python3 scripts/world.py down

or let every run reuse it (the first one brings it up and leaves it):

    SKW_WORLD_REUSE=1 bash scripts/test.sh differential::

The second form also stops whatever the tests leave running (see below).

The world
  Each entry of PROCESSES is a named process: the config files it writes
  (all are written before anything starts), its command, what it waits for
  (`after`), the loopback ports it takes, how to tell it is ready
  (pg_isready, Redis' PING, Synapse's /health) or, for a one-shot job, that
  it succeeded, a deadline for that, and its signal to stop. Its output
  goes to `<state>/<name>.log`. Processes start as soon as what they wait
  for is ready: initdb, Redis, the signing key and the federation TLS
  certificate together, then the six Synapses and the SQLite schema
  together, then the worker-mode Synapse's three workers. A Synapse worker is one more entry (synapse_worker() writes
  them for the worker-mode homeserver), e.g.

    Proc("synapse-worker1", after=("synapse",), ports=("synapse-worker1",),
         write=lambda w: w.path("synapse-worker1.yaml").write_text(
             "worker_app: synapse.app.generic_worker\nworker_name: worker1\n"
             f"worker_log_config: {w.path('synapse-log.yaml')}\nworker_listeners:\n"
             f"  - {{type: http, port: {w.port('synapse-worker1')}, "
             "bind_addresses: ['127.0.0.1'], resources: [{names: [client]}]}\n"),
         cmd=lambda w: [VPY, "-m", "synapse.app.generic_worker", "-c",
                        w.path("synapse.yaml"), "-c", w.path("synapse-worker1.yaml")],
         ready=health("synapse-worker1")),

  and a second homeserver one more `synapse(...)` call, with its database
  added to create_databases().

  The state directory (configs, logs, data) is a fresh temporary directory;
  everything binds to 127.0.0.1 on ports free when the world was made.
  `<state>/env` has the exported SKW_TEST_* variables (see test_env()),
  `<state>/world.json` the processes, ports and secrets. `up` points the
  symlink target/world at it.

Stopping
  Every process gets a session (and process group) of its own: Ctrl-C in
  the terminal reaches the command being run, not PostgreSQL under it, and
  the manager stops the world in order (Synapses, then Redis and
  PostgreSQL: leader first, then what is left of its group). The manager is
  a child subreaper: whatever CMD starts and leaves behind (a Synapse a test
  started with a config under the state directory, a Prometheus) becomes
  its child when its parent exits, and is stopped with the world, on exit,
  SIGINT, SIGTERM or SIGHUP alike. Should the manager itself be killed,
  CMD gets SIGTERM and the processes of a world `run` owns SIGKILL.
  SKW_KEEP_STATE=1 keeps the state directory.

  A world left by `up` (or `run --reuse`) lives on without a manager; `down`
  or the next reuse finds it through target/world. It is reused only if its
  processes are the ones recorded, all ready, and it was made by this very
  file for the same server name and venv; otherwise it is replaced. What
  commands run outside the manager start (`cargo test` after `. env`) is
  theirs to stop; `run --reuse` stops it as above.

Knobs: SKW_TEST_SERVER_NAME (default hs.test.invalid), SKW_KEEP_STATE=1,
SKW_WORLD_REUSE=1 (as --reuse).

Why Python, and why this shape: a world is several long-lived processes
with dependencies between them, readiness to poll against deadlines,
configs to template, and signals to handle; Python's standard library
has all of that (sessions, process groups, user switching in subprocess,
prctl through ctypes), with no inline scripts and no /proc scans, and the
host has python3 (3.11) wherever Synapse runs. Installing stays in bash
(scripts/install.sh): it is apt-get and pip calls.
"""

import argparse
import ctypes
import fcntl
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
# The Synapse every homeserver of the world runs: the pinned one, or another
# venv that scripts/install.sh built (SKW_SYNAPSE_VENV=target/synapse-venv-1.136.0
# runs the version-window suites against the oldest Synapse we read). The
# test tools stay in the pinned venv.
TOOLS_VENV = ROOT / "target" / "synapse-venv"
VENV = ROOT / os.environ.get("SKW_SYNAPSE_VENV", "target/synapse-venv")
VPY = VENV / "bin" / "python"
VENV_MARKER = VENV / ".skw-synapse-spec"
CURRENT = ROOT / "target" / "world"  # symlink to the world `up` leaves running
LOCK = ROOT / "target" / "world.lock"
IS_ROOT = os.geteuid() == 0
LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


def log(msg):
    print(f"== {msg}", flush=True)


class Failed(Exception):
    pass


class Interrupted(Exception):
    def __init__(self, signum):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


# ------------------------------------------------------------------ tools ---
def pg_bindir():
    found = []
    for d in Path("/usr/lib/postgresql").glob("*/bin"):
        if all(os.access(d / b, os.X_OK) for b in ("initdb", "postgres", "pg_isready", "psql")):
            found.append((tuple(int(p) for p in d.parent.name.split(".") if p.isdigit()), d))
    return max(found)[1] if found else None


@dataclass
class Tools:
    pg: Path
    redis: str
    prometheus: str

    @staticmethod
    def find():
        pg, redis, prom = pg_bindir(), shutil.which("redis-server"), shutil.which("prometheus")
        missing = [n for n, v in [("PostgreSQL", pg), ("redis-server", redis), ("prometheus", prom)] if not v]
        if not VENV_MARKER.exists():
            missing.append(f"the venv {VENV.relative_to(ROOT)}")
        if missing:
            raise Failed(f"missing {', '.join(missing)}: run `bash scripts/install.sh`")
        return Tools(pg, redis, prom)


# ------------------------------------------------------------------ world ---
class World:
    """One world's state directory, ports, secrets and processes."""

    def __init__(self, dir, server_name, ports, values, procs=None, env=None, fingerprint=""):
        self.dir = Path(dir)
        self.server_name = server_name
        self.ports = ports
        self.values = values
        self.procs = procs or {}  # name -> {"pid", "start", "job"}
        self.env = env or {}
        self.fingerprint = fingerprint
        self.tools = None

    def path(self, name):
        return self.dir / name

    def port(self, name):
        return self.ports[name]

    def url(self, name):
        return f"http://127.0.0.1:{self.ports[name]}"

    def save(self):
        data = {k: getattr(self, k) for k in ("server_name", "ports", "values", "procs", "env", "fingerprint")}
        tmp = self.path("world.json.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.path("world.json"))

    @staticmethod
    def load(dir):
        data = json.loads((Path(dir) / "world.json").read_text())
        return World(dir, **data)


def secret():
    return secrets.token_hex(32)


def free_ports(names):
    """Distinct free loopback ports, one per name (all bound at once, then released)."""
    socks = []
    try:
        for _ in names:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return {n: s.getsockname()[1] for n, s in zip(names, socks)}
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------- readiness checks ---
def is_ready(proc, w):
    try:
        return bool(proc.ready(w))
    except OSError:
        return False


def http_ok(url):
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200 and r.read().strip() == b"OK"
    except OSError:
        return False


def health(*ports):
    """Ready when every named port answers Synapse's /health with OK."""
    return lambda w: all(http_ok(w.url(p)) for p in ports)


def redis_tls_cmd(w):
    """A CA (alone in `redis-tls/ca/`, usable as a file or as a directory),
    and the server's and a client's certificates signed by it."""
    d = w.path("redis-tls")
    ssl = "/usr/bin/openssl"
    key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    script = f"""set -e
mkdir -p {d}/ca && cd {d}
{ssl} req -x509 {key} -days 7 -keyout ca.key -out ca/ca.crt -subj /CN=skw-test-redis-ca
for who in server client; do
  {ssl} req {key} -keyout $who.key -out $who.csr -subj /CN=localhost
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > $who.ext
  {ssl} x509 -req -in $who.csr -CA ca/ca.crt -CAkey ca.key -CAcreateserial -days 7 -extfile $who.ext -out $who.crt
done
"""
    return ["/bin/sh", "-c", script]


def redis_pong(w):
    try:
        with socket.create_connection(("127.0.0.1", w.port("redis")), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def pg_ready(w):
    cmd = [str(w.tools.pg / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(w.port("postgres"))]
    return subprocess.run(cmd, stdin=subprocess.DEVNULL).returncode == 0


def sqlite_tables(w):
    try:
        con = sqlite3.connect(f"file:{w.path('synapse-schema.db')}?mode=ro", uri=True)
        with con:
            have = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        con.close()
    except sqlite3.Error:
        return False
    return {"devices", "e2e_device_keys_json", "access_tokens"} <= have


# ---------------------------------------------------------------- configs ---
LOG_YAML = """\
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: $log
    encoding: utf8
loggers:
  synapse.storage.SQL:
    level: INFO
root:
  level: INFO
  handlers: [file]
disable_existing_loggers: false
"""

HOMESERVER_YAML = """\
server_name: "$server_name"
pid_file: $dir/$name.pid
report_stats: false
signing_key_path: $dir/signing.key
log_config: $dir/$name-log.yaml
media_store_path: $dir/media
form_secret: "$form_secret"
enable_registration: $registration
enable_registration_without_verification: true
suppress_key_server_warning: true
trusted_key_servers: []
# Passwords hashed cheaply: every registration and login hashes one, and
# the bench makes a thousand of each (Synapse's default is 12 rounds).
bcrypt_rounds: 4

database:
  name: psycopg2
  args:
    user: synapse
    database: $database
    host: 127.0.0.1
    port: $pg_port
    cp_min: 1
    cp_max: 5

listeners:
  - type: http
    port: $port
    bind_addresses: ['127.0.0.1']
    tls: false
    x_forwarded: false
    resources:
      - names: [client, federation, keys]
        compress: false
  - type: http
    port: $repl_port
    bind_addresses: ['127.0.0.1']
    tls: false
    resources:
      - names: [replication]

worker_replication_secret: "$repl_secret"
instance_map:
  main:
    host: 127.0.0.1
    port: $repl_port
$instances
redis:
  enabled: true
  host: 127.0.0.1
  port: $redis_port

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
rc_message: $rl
rc_registration: $rl
rc_registration_token_validity: $rl
rc_login:
  address: $rl
  account: $rl
  failed_attempts: $rl
rc_admin_redaction: $rl
rc_joins:
  local: $rl
  remote: $rl
rc_joins_per_room: $rl
rc_key_requests: $rl
rc_3pid_validation: $rl
rc_invites:
  per_room: $rl
  per_user: $rl
  per_issuer: $rl
rc_third_party_invite: $rl
rc_media_create: $rl
rc_presence:
  per_user: $rl
rc_delayed_event_mgmt: $rl
rc_room_creation: $rl
rc_reports: $rl
rc_user_directory: $rl
rc_profile: $rl
rc_federation:
  window_size: 1000
  sleep_limit: 10000
  sleep_delay: 0
  reject_limit: 100000
  concurrent: 1000
federation_rr_transactions_per_room_per_second: 10000
"""


def write(path, template, **values):
    path.write_text(string.Template(template).substitute(values))


def write_appservice(w, file, id, localpart, regex, url="null"):
    """An application service (a bridge) registration; returns its as_token."""
    token = secret()
    w.path(file).write_text(
        f"id: {id}\nurl: {url}\nas_token: \"{token}\"\nhs_token: \"{secret()}\"\n"
        f"sender_localpart: {localpart}\nnamespaces:\n  users:\n    - regex: '{regex}'\n      exclusive: true\n"
    )
    return token


def write_homeserver(w, name, server_name, database, extra, registration=True, instances=()):
    """`<name>.yaml` and `<name>-log.yaml`: a Synapse logging to `<name>.log`;
    `instances` are more `instance_map` entries: (worker name, its port's name)."""
    write(w.path(f"{name}-log.yaml"), LOG_YAML, log=w.path(f"{name}.log"))
    write(w.path(f"{name}.yaml"), HOMESERVER_YAML, server_name=server_name, dir=w.dir, name=name,
          form_secret=secret(), registration=str(registration).lower(), database=database,
          pg_port=w.port("postgres"), port=w.port(name), repl_port=w.port(f"{name}-replication"),
          repl_secret=w.values["replication_secret"], redis_port=w.port("redis"),
          rl="{per_second: 10000, burst_count: 100000}",
          instances="".join(f"  {i}:\n    host: 127.0.0.1\n    port: {w.port(p)}\n" for i, p in instances))
    with w.path(f"{name}.yaml").open("a") as f:
        f.write(extra + "\n")


# -------------------------------------------------------------- processes ---
@dataclass
class Proc:
    name: str
    cmd: Callable[[World], list]
    ready: Callable[[World], bool]  # for a job: checked once it exited 0
    after: tuple = ()
    ports: tuple = ()  # loopback ports it takes, by name
    write: Callable[[World], None] | None = None  # writes its config files
    job: bool = False  # runs to completion (and must exit 0)
    timeout: float = 120.0  # seconds from its start to ready
    stop: int = signal.SIGTERM
    as_postgres: bool = False  # as the postgres OS user when we are root
    cwd: Callable[[World], Path] | None = None


def synapse(name, server_name, database, extra, registration=True, ports=(), instances=()):
    """A Synapse homeserver with a client/federation and a replication listener."""
    return Proc(
        name,
        after=("databases", "redis", "signing-key"),
        ports=(name, f"{name}-replication", *ports),
        write=lambda w: write_homeserver(w, name, server_name(w), database, extra(w), registration, instances),
        cmd=lambda w: [VPY, "-m", "synapse.app.homeserver", "-c", w.path(f"{name}.yaml")],
        ready=health(name, f"{name}-replication"),
    )


def synapse_worker(main, worker, *resources):
    """A generic worker of the homeserver `main`, named `worker` (in
    `instance_map`, `stream_writers`), with one HTTP listener per resource
    (each also serves /health) on the port `<main>-<worker>-<resource>`."""
    name = f"{main}-{worker}"
    ports = tuple(f"{name}-{r}" for r in resources)

    def write_worker(w):
        write(w.path(f"{name}-log.yaml"), LOG_YAML, log=w.path(f"{name}.log"))
        w.path(f"{name}.yaml").write_text(
            f"worker_app: synapse.app.generic_worker\nworker_name: {worker}\n"
            f"worker_log_config: {w.path(f'{name}-log.yaml')}\nworker_listeners:\n" + "".join(
                f"  - {{type: http, port: {w.port(p)}, bind_addresses: ['127.0.0.1'], resources: [{{names: [{r}]}}]}}\n"
                for r, p in zip(resources, ports)))

    return Proc(name, after=(main,), ports=ports, write=write_worker,
                cmd=lambda w: [VPY, "-m", "synapse.app.generic_worker", "-c", w.path(f"{main}.yaml"),
                               "-c", w.path(f"{name}.yaml")],
                ready=health(*ports))


def workers_synapse_extra(w):
    # Device lists are written by two workers, not the main process: main
    # hands each change to one of them at random (notify_device_update),
    # and the first (dl1) alone takes resyncs and federation's device-list
    # EDUs. Its own server name keeps its Redis channels apart.
    return "stream_writers:\n  device_lists: [dl1, dl2]"


def write_postgres_dirs(w):
    for d in ("pg", "pgsock"):
        w.path(d).mkdir()
        if IS_ROOT:
            shutil.chown(w.path(d), "postgres", "postgres")


def main_synapse_extra(w):
    # Guest macaroons are keyed with registration_shared_secret_path's file
    # (no macaroon_secret_key), as Synapse derives them.
    w.path("registration.secret").write_text(secret() + "\n")
    w.values["as_token"] = write_appservice(w, "synapse-appservice.yaml", "test-bridge", "bridgebot", "@bridged_.*")
    return (f"app_service_config_files: ['{w.path('synapse-appservice.yaml')}']\n"
            f"registration_shared_secret_path: {w.path('registration.secret')}\n"
            "allow_guest_access: true")


def variant_synapse_extra(w):
    # Settings the main one leaves at their defaults: MSC4263, a federation
    # domain whitelist, account validity, no registration secret, MSC3984
    # (its bridge is asked for its users' keys; a test serves its URL).
    write_appservice(w, "synapse-variant-appservice.yaml", "keys-bridge", "keysbot", "@kbridge_.*",
                     url=f'"{w.url("synapse-variant-appservice")}"')
    return ("experimental_features: {msc4263_limit_key_queries_to_users_who_share_rooms: true, "
            "msc3984_appservice_key_query: true}\n"
            f"app_service_config_files: ['{w.path('synapse-variant-appservice.yaml')}']\n"
            "federation_domain_whitelist: ['allowed.test.invalid']\n"
            "account_validity: {enabled: true, period: 30d}\n"
            "allow_guest_access: true")


def mas_synapse_extra(w):
    # Delegates auth to Matrix Authentication Service: the tests serve a MAS
    # stand-in on the "mas" port (Synapse only calls it when a token needs
    # introspecting). MAS requires registration and password login off; its
    # bridge checks application-service tokens under delegated auth.
    w.path("mas.secret").write_text(secret() + "\n")
    write_appservice(w, "synapse-mas-appservice.yaml", "mas-bridge", "masbot", "@mbridge_.*")
    return ("matrix_authentication_service:\n"
            "  enabled: true\n"
            f"  endpoint: {w.url('mas')}/\n"
            f"  secret_path: {w.path('mas.secret')}\n"
            "password_config: {enabled: false}\n"
            f"app_service_config_files: ['{w.path('synapse-mas-appservice.yaml')}']")


def write_sqlite_config(w):
    w.path("sqlite-db.yaml").write_text(
        f'server_name: "{w.server_name}"\nreport_stats: false\nsigning_key_path: {w.path("signing.key")}\n'
        f"media_store_path: {w.path('media')}\n"
        f"database:\n  name: sqlite3\n  args:\n    database: {w.path('synapse-schema.db')}\n")


def create_databases(w):
    psql = [w.tools.pg / "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
            "-p", w.port("postgres"), "-U", "synapse", "-d", "postgres"]
    for db in ("synapse", "synapse_variant", "synapse_mas", "synapse_workers", *FEDERATION_DATABASES):
        psql += ["-c", f"CREATE DATABASE {db} OWNER synapse ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"]
    return psql


PG_SETTINGS = ["listen_addresses=127.0.0.1", "max_connections=300", "fsync=off",
               "synchronous_commit=off", "full_page_writes=off"]

PROCESSES = [
    Proc("postgres-init", job=True, as_postgres=True, timeout=60, write=write_postgres_dirs,
         cmd=lambda w: [w.tools.pg / "initdb", "-D", w.path("pg"), "-A", "trust", "-U", "synapse",
                        "--encoding=UTF8", "--locale=C"],
         ready=lambda w: w.path("pg/PG_VERSION").exists()),
    Proc("postgres", after=("postgres-init",), ports=("postgres",), as_postgres=True, timeout=60,
         stop=signal.SIGINT,  # fast shutdown: don't wait for clients to leave
         cmd=lambda w: [w.tools.pg / "postgres", "-D", w.path("pg"), "-p", w.port("postgres"),
                        "-k", w.path("pgsock"), *(a for s in PG_SETTINGS for a in ("-c", s))],
         ready=pg_ready),
    Proc("databases", job=True, after=("postgres",), timeout=30, cmd=create_databases, ready=lambda w: True),
    Proc("redis-tls-certificates", job=True, timeout=30, cmd=redis_tls_cmd,
         ready=lambda w: w.path("redis-tls/client.key").stat().st_size > 0),
    # Synapse talks to Redis on the plain port; the tests also reach the
    # same Redis over TLS (client certificates required) and a UNIX socket,
    # as Synapse's `redis` section can configure them.
    Proc("redis", after=("redis-tls-certificates",), ports=("redis", "redis-tls"), timeout=30,
         cmd=lambda w: [w.tools.redis, "--port", w.port("redis"), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", w.dir,
                        "--tls-port", w.port("redis-tls"), "--tls-auth-clients", "yes",
                        "--tls-cert-file", w.path("redis-tls/server.crt"),
                        "--tls-key-file", w.path("redis-tls/server.key"),
                        "--tls-ca-cert-file", w.path("redis-tls/ca/ca.crt"),
                        "--unixsocket", w.path("redis.sock"), "--unixsocketperm", "700"],
         ready=redis_pong),
    # One signing key for every homeserver (the main config names it).
    Proc("signing-key", job=True,
         cmd=lambda w: [VPY, "-m", "synapse.app.homeserver", "-c", w.path("synapse.yaml"), "--generate-keys"],
         ready=lambda w: w.path("signing.key").stat().st_size > 0),
    synapse("synapse", lambda w: w.server_name, "synapse", main_synapse_extra),
    synapse("synapse-variant", lambda w: f"variant.{w.server_name}", "synapse_variant", variant_synapse_extra,
            ports=("synapse-variant-appservice",)),
    synapse("synapse-mas", lambda w: f"mas.{w.server_name}", "synapse_mas", mas_synapse_extra,
            registration=False, ports=("mas",)),
    # Worker mode: a main process, two device-list writers and a client reader.
    synapse("synapse-workers", lambda w: f"workers.{w.server_name}", "synapse_workers", workers_synapse_extra,
            instances=(("dl1", "synapse-workers-dl1-replication"), ("dl2", "synapse-workers-dl2-replication"))),
    # The writers serve the client API too, so a test can pick the writer
    # of a change by where it sends the request.
    synapse_worker("synapse-workers", "dl1", "replication", "client"),
    synapse_worker("synapse-workers", "dl2", "replication", "client"),
    synapse_worker("synapse-workers", "client_reader", "client"),
    # The SQLite store's tests read a schema made by Synapse itself.
    Proc("sqlite-schema", job=True, after=("signing-key",), timeout=300, write=write_sqlite_config,
         cwd=lambda w: w.dir,
         cmd=lambda w: [VPY, "-m", "synapse._scripts.update_synapse_database",
                        "--database-config", w.path("sqlite-db.yaml")],
         ready=sqlite_tables),
]


# ------------------------------------------------------- real federation ---
# Two homeservers federating with each other over TLS on loopback:
# "synapse-fed" (the one our service serves in tests/api/federation.rs) and
# "synapse-remote" (its users are the remote users). Each one's server name
# is "localhost:<its federation port>": a name with an explicit port is
# used as is by server discovery (no well-known or SRV lookup). localhost
# resolves to 127.0.0.1 and, depending on the resolver and the hosts file,
# ::1; the whitelist opens both (Synapse, and we, refuse a name if any of
# its addresses is blocked). Not an IP literal: Synapse checks
# an IP-literal server name against ip_range_blacklist alone, whitelist or
# not (BlocklistingAgentWrapper), so 127.0.0.1:<port> would be refused
# under the default blocklist. The federation
# listener (federation and keys) speaks TLS with a self-signed certificate
# made at world start; the other listeners are the usual plain ones.
# Certificates are not verified (federation_verify_certificates: false, in
# the shared template), and trusted_key_servers is empty, so each fetches
# the other's signing key from the other itself, over that TLS listener.
# Unlike the other homeservers, these two keep Synapse's default
# ip_range_blacklist (which blocks loopback): loopback is reachable only
# because ip_range_whitelist names it.
def fed_server_name(name):
    return lambda w: f"localhost:{w.port(f'{name}-federation')}"


def tls_certificate_cmd(w):
    return ["/usr/bin/openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7",
            "-keyout", w.path("federation-tls.key"), "-out", w.path("federation-tls.crt"),
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]


def federating_synapse(name, database):
    def extra(w):
        # A registration secret of its own, so tests can make server admins
        # (register_new_matrix_user --admin) for the device-list health API.
        w.path(f"{name}-registration.secret").write_text(secret() + "\n")
        return (f"tls_certificate_path: {w.path('federation-tls.crt')}\n"
                f"tls_private_key_path: {w.path('federation-tls.key')}\n"
                f"registration_shared_secret_path: {w.path(f'{name}-registration.secret')}")
    proc = synapse(name, fed_server_name(name), database, extra, ports=(f"{name}-federation",))
    plain = proc.write

    def write_federating(w):
        plain(w)
        config = w.path(f"{name}.yaml")
        text = config.read_text()
        start = text.index("ip_range_blacklist:\n")
        end = text.index("ip_range_whitelist:")
        tls_listener = (f"listeners:\n  - type: http\n    port: {w.port(f'{name}-federation')}\n"
                        "    bind_addresses: ['127.0.0.1']\n    tls: true\n"
                        "    resources:\n      - names: [federation, keys]\n")
        text = text[:start] + text[end:].replace("ip_range_whitelist: ['127.0.0.1']", "ip_range_whitelist: ['127.0.0.1', '::1']", 1)
        config.write_text(text.replace("listeners:\n", tls_listener, 1))

    proc.write = write_federating
    proc.after = (*proc.after, "tls-certificate")
    proc.ready = lambda w: health(name, f"{name}-replication")(w) and tls_listening(w, f"{name}-federation")
    return proc


def tls_listening(w, port_name):
    try:
        with socket.create_connection(("127.0.0.1", w.port(port_name)), timeout=2):
            return True
    except OSError:
        return False


FEDERATION_PROCESSES = [
    Proc("tls-certificate", job=True, timeout=30, cmd=tls_certificate_cmd,
         ready=lambda w: w.path("federation-tls.crt").stat().st_size > 0),
    federating_synapse("synapse-fed", "synapse_fed"),
    federating_synapse("synapse-remote", "synapse_remote"),
]
PROCESSES += FEDERATION_PROCESSES
FEDERATION_DATABASES = ("synapse_fed", "synapse_remote")


def federation_test_env(w):
    return {
        # The homeserver our service serves (its users are the local ones).
        "SKW_TEST_FED_SYNAPSE_URL": w.url("synapse-fed"),
        "SKW_TEST_FED_HOMESERVER_YAML": w.path("synapse-fed.yaml"),
        "SKW_TEST_FED_SERVER_NAME": fed_server_name("synapse-fed")(w),
        "SKW_TEST_FED_PG_URL": f"postgres://synapse@127.0.0.1:{w.port('postgres')}/synapse_fed",
        "SKW_TEST_FED_LOG": w.path("synapse-fed.log"),
        # The remote homeserver, federating with it over TLS.
        "SKW_TEST_REMOTE_SYNAPSE_URL": w.url("synapse-remote"),
        "SKW_TEST_REMOTE_SERVER_NAME": fed_server_name("synapse-remote")(w),
        "SKW_TEST_REMOTE_FEDERATION_URL": f"https://localhost:{w.port('synapse-remote-federation')}",
        "SKW_TEST_REMOTE_LOG": w.path("synapse-remote.log"),
    }


def synapse_version():
    out = subprocess.run([VPY, "-c", "import importlib.metadata as m; print(m.version('matrix-synapse'))"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_env(w):
    """What the tests read (tests/api): names and meanings are a contract."""
    return {
        "SKW_TEST_SYNAPSE_URL": w.url("synapse"),
        "SKW_TEST_HOMESERVER_YAML": w.path("synapse.yaml"),
        "SKW_TEST_PG_URL": f"postgres://synapse@127.0.0.1:{w.port('postgres')}/synapse",
        "SKW_TEST_REDIS_URL": f"redis://127.0.0.1:{w.port('redis')}",
        # The same Redis over TLS (client certificates required; the CA,
        # server and client files in this directory) and a UNIX socket.
        "SKW_TEST_REDIS_TLS_PORT": w.port("redis-tls"),
        "SKW_TEST_REDIS_TLS_DIR": w.path("redis-tls"),
        "SKW_TEST_REDIS_SOCKET": w.path("redis.sock"),
        "SKW_TEST_SQLITE_SCHEMA_DB": w.path("synapse-schema.db"),
        "SKW_TEST_SERVER_NAME": w.server_name,
        "SKW_TEST_STATE_DIR": w.dir,
        "SKW_TEST_SYNAPSE_PID": w.procs["synapse"]["pid"],
        "SKW_TEST_SYNAPSE_PYTHON": VPY,
        "SKW_TEST_REPLICATION_URL": w.url("synapse-replication"),
        "SKW_TEST_REPLICATION_SECRET": w.values["replication_secret"],
        # The venv's bin dir: python with jsonschema and matplotlib,
        # hadolint, openapi-spec-validator, schemathesis.
        "SKW_TEST_VENV_BIN": TOOLS_VENV / "bin",
        # The Synapse release the world runs (e.g. 1.163.2).
        "SKW_TEST_SYNAPSE_VERSION": synapse_version(),
        "SKW_TEST_AS_TOKEN": w.values["as_token"],
        "SKW_TEST_VARIANT_SYNAPSE_URL": w.url("synapse-variant"),
        "SKW_TEST_VARIANT_HOMESERVER_YAML": w.path("synapse-variant.yaml"),
        "SKW_TEST_MAS_SYNAPSE_URL": w.url("synapse-mas"),
        "SKW_TEST_MAS_HOMESERVER_YAML": w.path("synapse-mas.yaml"),
        "SKW_TEST_MAS_PORT": w.port("mas"),
        "SKW_TEST_PROMETHEUS": w.tools.prometheus,
        # Worker mode (stream_writers.device_lists: [dl1, dl2]); its
        # database is on the same PostgreSQL.
        "SKW_TEST_WORKERS_SYNAPSE_URL": w.url("synapse-workers"),
        "SKW_TEST_WORKERS_HOMESERVER_YAML": w.path("synapse-workers.yaml"),
        "SKW_TEST_WORKERS_CLIENT_READER_URL": w.url("synapse-workers-client_reader-client"),
        "SKW_TEST_WORKERS_DL1_REPLICATION_URL": w.url("synapse-workers-dl1-replication"),
        "SKW_TEST_WORKERS_DL2_REPLICATION_URL": w.url("synapse-workers-dl2-replication"),
        "SKW_TEST_WORKERS_DL1_CLIENT_URL": w.url("synapse-workers-dl1-client"),
        "SKW_TEST_WORKERS_DL2_CLIENT_URL": w.url("synapse-workers-dl2-client"),
        "SKW_TEST_WORKERS_PG_URL": f"postgres://synapse@127.0.0.1:{w.port('postgres')}/synapse_workers",
        "SKW_TEST_WORKERS_SERVER_NAME": f"workers.{w.server_name}",
        # The reverse proxy of the client test (tests/client); empty if
        # nginx is not installed (that test then fails and says so).
        "SKW_TEST_NGINX": nginx_bin(),
        **federation_test_env(w),
    }


def nginx_bin():
    """nginx's path: on PATH, or /usr/sbin (not on a non-root PATH), or ""."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    return found or ""


# ------------------------------------------------------- process handling ---
def proc_start_time(pid):
    """The kernel's start time of `pid` (to tell it from a reused pid), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie: collect it if it is ours
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return None
    return int(fields[19])


def alive(record):
    return record.get("pid") is not None and proc_start_time(record["pid"]) == record["start"]


def signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def our_children():
    pids = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            pass
    return pids


def stop_pids(signals, grace, sessions=False):
    """Send each pid its signal, wait up to `grace` seconds for all to
    exit, then SIGKILL the rest. With `sessions` (the pids lead sessions we
    made), what is left of each session's group is killed too."""
    records = [{"pid": p, "start": proc_start_time(p)} for p in signals]
    records = [r for r in records if r["start"] is not None]
    for r in records:
        try:
            os.kill(r["pid"], signals[r["pid"]])
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while any(alive(r) for r in records) and time.monotonic() < deadline:
        time.sleep(0.05)
    for r in records:
        if alive(r):
            if sessions:
                signal_group(r["pid"], signal.SIGKILL)
            try:
                os.kill(r["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        elif sessions:
            signal_group(r["pid"], signal.SIGKILL)  # e.g. PostgreSQL backends
        try:
            os.waitpid(r["pid"], 0)
        except ChildProcessError:
            pass


def reap_orphans(keep=()):
    """Stop our children that are not world processes: what a command left
    behind, reparented to us as its subreaper. Repeats, since stopping one
    orphans its children in turn."""
    for _ in range(20):
        stray = our_children() - set(keep)
        if not stray:
            return
        log(f"stopping {len(stray)} process(es) left behind: {sorted(stray)}")
        stop_pids(dict.fromkeys(stray, signal.SIGTERM), grace=5.0)


def layers(procs):
    """Process names grouped by depth in the `after` graph (roots first)."""
    by_name = {p.name: p for p in procs}
    depth = {}

    def d(name):
        if name not in depth:
            deps = [a for a in by_name[name].after if a in by_name]
            depth[name] = 1 + max((d(a) for a in deps), default=-1)
        return depth[name]

    out = {}
    for p in procs:
        out.setdefault(d(p.name), []).append(p.name)
    return [out[k] for k in sorted(out)]


def stop_world(w):
    """Stop the world's recorded processes, most dependent first, each layer together."""
    by_name = {p.name: p for p in PROCESSES}
    for layer in reversed(layers(PROCESSES)):
        running = {w.procs[n]["pid"]: by_name[n].stop for n in layer if n in w.procs and alive(w.procs[n])}
        if running:
            stop_pids(running, grace=15.0, sessions=True)


# ------------------------------------------------------------- bringing up ---
def fingerprint(server_name, tools):
    h = hashlib.sha256(Path(__file__).read_bytes())
    for part in (server_name, VENV_MARKER.read_text(), tools.pg, tools.redis, tools.prometheus):
        h.update(str(part).encode() + b"\0")
    return h.hexdigest()


def die_with_parent(parent, sig=signal.SIGKILL):
    """For Popen's preexec_fn: the child gets `sig` when the manager dies."""
    def preexec():
        LIBC.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
    return preexec


def spawn(w, proc, owned):
    logf = open(w.path(f"{proc.name}.log"), "ab")
    try:
        kwargs = {}
        if proc.as_postgres and IS_ROOT:  # initdb and postgres refuse to run as root
            kwargs = dict(user="postgres", group="postgres", extra_groups=[])
        cwd = proc.cwd(w) if proc.cwd else ("/" if proc.as_postgres else None)
        return subprocess.Popen(
            [str(a) for a in proc.cmd(w)], stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            cwd=cwd, start_new_session=True, preexec_fn=die_with_parent(os.getpid()) if owned else None,
            **kwargs)
    finally:
        logf.close()


def tail(path, n=40):
    try:
        lines = Path(path).read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return
    print(f"---- last {len(lines)} lines of {path} ----\n" + "\n".join(lines) + "\n----", flush=True)


def start(w, owned, jobs):
    """Start every process as soon as what it waits for is ready; at most
    `jobs` starting at once. Raises Failed on an exit or a missed deadline."""
    pending = list(PROCESSES)
    starting = {}  # name -> (Popen, deadline, t0)
    ready = set()
    t_all = time.monotonic()
    while pending or starting:
        for proc in list(pending):
            if len(starting) >= jobs:
                break
            if all(a in ready for a in proc.after):
                pending.remove(proc)
                popen = spawn(w, proc, owned)
                w.procs[proc.name] = {"pid": popen.pid, "start": proc_start_time(popen.pid), "job": proc.job}
                w.save()
                starting[proc.name] = (popen, time.monotonic() + proc.timeout, time.monotonic())
        for name, (popen, deadline, t0) in list(starting.items()):
            proc = next(p for p in PROCESSES if p.name == name)
            rc = popen.poll()
            if proc.job and rc == 0:
                if not is_ready(proc, w):
                    tail(w.path(f"{name}.log"))
                    raise Failed(f"{name} finished but its check failed")
            elif rc is not None:
                tail(w.path(f"{name}.log"))
                raise Failed(f"{name} exited with status {rc}")
            elif proc.job or not is_ready(proc, w):
                if time.monotonic() > deadline:
                    tail(w.path(f"{name}.log"))
                    raise Failed(f"{name} not ready after {proc.timeout:.0f}s")
                continue
            del starting[name]
            ready.add(name)
            log(f"{name} {'done' if proc.job else 'ready'} in {time.monotonic() - t0:.1f}s")
        if pending or starting:
            time.sleep(0.1)
    log(f"world up in {time.monotonic() - t_all:.1f}s: {w.dir}")


def bring_up(owned, jobs):
    """A new world in a fresh state directory; torn down again if it fails."""
    server_name = os.environ.get("SKW_TEST_SERVER_NAME") or "hs.test.invalid"
    tools = Tools.find()
    dir = Path(tempfile.mkdtemp(prefix="skw-test."))
    dir.chmod(0o711)  # the postgres user must be able to reach its subdirectories
    names = [n for p in PROCESSES for n in p.ports]
    w = World(dir, server_name, free_ports(names), {"replication_secret": secret()},
              fingerprint=fingerprint(server_name, tools))
    w.tools = tools
    try:
        w.path("media").mkdir()
        for proc in PROCESSES:
            if proc.write:
                proc.write(w)
        w.save()
        start(w, owned, jobs)
        w.env = {k: str(v) for k, v in test_env(w).items()}
        w.path("env").write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in w.env.items()))
        w.save()
        return w
    except BaseException:
        teardown(w, keep_state=os.environ.get("SKW_KEEP_STATE") == "1")
        raise


def teardown(w, keep_state):
    with signals_deferred():
        stop_world(w)
        reap_orphans()
        if keep_state:
            log(f"state kept in {w.dir}")
        else:
            shutil.rmtree(w.dir, ignore_errors=True)


def healthy(w, tools):
    """Whether a recorded world can be reused: same definition, same processes, all ready."""
    if w.fingerprint != fingerprint(w.server_name, tools):
        return "made by another version of scripts/world.py, server name or venv"
    w.tools = tools
    for proc in PROCESSES:
        r = w.procs.get(proc.name)
        if r is None:
            return f"{proc.name} never started"
        if not proc.job and not alive(r):
            return f"{proc.name} is not running"
        if not is_ready(proc, w):
            return f"{proc.name} is not ready"
    return None


def current():
    """The world `up` left (target/world), or None; a stale link is removed."""
    if not CURRENT.is_symlink():
        return None
    dir = CURRENT.resolve()
    try:
        return World.load(dir)
    except (OSError, ValueError):
        CURRENT.unlink()
        return None


def reuse_or_up(jobs):
    """The current world if healthy, else a new one made current."""
    tools = Tools.find()
    w = current()
    if w is not None:
        why = healthy(w, tools)
        if why is None:
            log(f"reusing the world in {w.dir}")
            return w
        log(f"replacing the world in {w.dir}: {why}")
        teardown(w, keep_state=False)
        CURRENT.unlink()
    w = bring_up(owned=False, jobs=jobs)
    tmp = CURRENT.with_name("world.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(w.dir)
    tmp.replace(CURRENT)
    return w


class world_lock:
    """Serialises up/down/reuse of the shared world between concurrent callers."""

    def __enter__(self):
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(LOCK, "w")
        fcntl.flock(self.f, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        self.f.close()


# ---------------------------------------------------------------- signals ---
class Signals:
    command = None  # the running command: signals are passed on to it
    received = None  # the first signal received
    deferred = False


def on_signal(signum, frame):
    if Signals.received is None:
        Signals.received = signum
    cmd = Signals.command
    if cmd is not None and cmd.poll() is None:
        try:
            os.kill(cmd.pid, signum)
        except ProcessLookupError:
            pass
    elif not Signals.deferred:
        raise Interrupted(signum)


class signals_deferred:
    """Within: signals are noted, not raised (teardown runs to its end)."""

    def __enter__(self):
        self.was, Signals.deferred = Signals.deferred, True

    def __exit__(self, *exc):
        Signals.deferred = self.was


def run_command(w, argv):
    env = dict(os.environ, **w.env)
    log(f"running {shlex.join(argv)}")
    try:
        cmd = subprocess.Popen(argv, env=env, preexec_fn=die_with_parent(os.getpid(), signal.SIGTERM))
    except OSError as e:
        raise Failed(f"cannot run {argv[0]}: {e}")
    Signals.command = cmd
    signalled_at = None
    while True:
        try:
            rc = cmd.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        if Signals.received is not None:
            signalled_at = signalled_at or time.monotonic()
            if time.monotonic() - signalled_at > 15:
                log(f"{argv[0]} still running 15s after {signal.Signals(Signals.received).name}: killing it")
                cmd.kill()
    Signals.command = None
    if Signals.received is not None:
        return 128 + Signals.received
    return 128 - rc if rc < 0 else rc


# --------------------------------------------------------------- commands ---
def cmd_up(args):
    with world_lock():
        w = reuse_or_up(args.jobs)
    print(f"world: {w.dir}\nenvironment: . {w.path('env')}   (or . target/world/env)\n"
          "stop it: python3 scripts/world.py down", flush=True)
    return 0


def cmd_down(args):
    with world_lock():
        dir = Path(args.state) if args.state else (CURRENT.resolve() if CURRENT.is_symlink() else None)
        if dir is None or not (dir / "world.json").exists():
            log("no world to stop")
            if CURRENT.is_symlink() and not args.state:
                CURRENT.unlink()
            return 0
        teardown(World.load(dir), keep_state=os.environ.get("SKW_KEEP_STATE") == "1")
        if CURRENT.is_symlink() and CURRENT.resolve() == dir.resolve():
            CURRENT.unlink()
        log(f"stopped the world in {dir}")
    return 0


def cmd_status(args):
    w = current()
    if w is None:
        print("no world (python3 scripts/world.py up)")
        return 1
    why = healthy(w, Tools.find())
    for proc in PROCESSES:
        r = w.procs.get(proc.name, {})
        state = "done" if proc.job else ("running" if r and alive(r) else "stopped")
        print(f"{proc.name:30} pid {r.get('pid', '-'):<8} {state:8} {w.path(proc.name + '.log')}")
    print(f"world {w.dir}: {'healthy' if why is None else why}")
    return 0 if why is None else 1


def cmd_env(args):
    w = current()
    if w is None:
        print("no world (python3 scripts/world.py up)", file=sys.stderr)
        return 1
    print(w.path("env"))
    return 0


def cmd_run(args):
    argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not argv:
        raise Failed("run: no command (world.py run -- CMD...)")
    reuse = args.reuse or os.environ.get("SKW_WORLD_REUSE") == "1"
    rc = 1
    w = None
    try:
        if reuse:
            with world_lock():
                w = reuse_or_up(args.jobs)
        else:
            w = bring_up(owned=True, jobs=args.jobs)
        rc = run_command(w, argv)
        if rc != 0:
            tail(w.path("synapse.log"), 50)
    finally:
        with signals_deferred():
            reap_orphans(keep=[] if w is None else [r["pid"] for r in w.procs.values()])
            if w is not None and not reuse:
                teardown(w, keep_state=os.environ.get("SKW_KEEP_STATE") == "1")
            elif w is not None:
                log(f"the world stays up in {w.dir} (python3 scripts/world.py down)")
    return rc


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=len(PROCESSES),
                        help="processes starting at once (default: all that can)")
    parser.add_argument("--started-at", type=float, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start a world, or reuse the running one, and leave it running")
    run = sub.add_parser("run", help="run CMD in a world, then tear it down")
    run.add_argument("--reuse", action="store_true",
                     help="use (or leave) the world in target/world instead of a private one")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    down = sub.add_parser("down", help="stop the world `up` left")
    down.add_argument("state", nargs="?", help="a state directory (default: target/world)")
    sub.add_parser("status", help="the current world's processes and health")
    sub.add_parser("env", help="print the path of the current world's env file")
    args = parser.parse_args()

    t0 = args.started_at or time.time()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log("warning: cannot become a subreaper; processes left behind by a command may outlive it")
    try:
        rc = globals()[f"cmd_{args.command}"](args)
    except Failed as e:
        print(f"!! {e}", file=sys.stderr, flush=True)
        rc = 1
    except Interrupted as e:
        print(f"!! {e}", file=sys.stderr, flush=True)
        rc = 128 + e.signum
    if Signals.received is not None and rc == 0:
        rc = 128 + Signals.received
    if args.command == "run":
        log(f"finished in {time.time() - t0:.0f}s (exit {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
