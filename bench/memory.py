"""Scenario (i), memory: the service's resident size against the bytes its
caches hold, with every user of a large homeserver cached, and under churn.

Builds a database of its own in the test world's PostgreSQL
(`skw_bench_memory`: Synapse's schema copied from the world's homeserver
database with pg_dump, no rows; never Synapse's live one): MEM_USERS users
(default 100,000) with two or three devices each (2.5 on average), realistic
device keys and a cross-signing key pair per user. Starts the release
binary on it (no Redis: the stream tables are polled), asks for every user
in queries of 1,000, then reads VmRSS and our cache_weighted_bytes. Then
MEM_CYCLES (default 5) rounds of churn: a tenth of the users get new device
keys (written with device-list stream rows, as Synapse would), the service
drops them through its poller, every user is asked for again, and the
resident size is read again. Prints a table and writes JSON
(MEM_OUT, default target/bench/memory.json). Loopback only."""

import glob
import json
import os
import re
import subprocess
import tempfile
import time
import urllib.parse

from common import QUERY, call, free_port, metrics, wait_ready

HERE = os.path.dirname(os.path.abspath(__file__))
USERS = int(os.environ.get("MEM_USERS", "100000"))
CYCLES = int(os.environ.get("MEM_CYCLES", "5"))
BINARY = os.environ.get("BENCH_BINARY", os.path.join(HERE, "..", "target", "release", "synapse-keys-worker"))
OUT = os.environ.get("MEM_OUT", os.path.join(HERE, "..", "target", "bench", "memory.json"))
SERVER = "bench.test"
TOKEN = "syt_bench_memory_requester"
WORK = tempfile.mkdtemp(prefix="skw-memory-")
PG = urllib.parse.urlsplit(os.environ["SKW_TEST_PG_URL"])
DB = "skw_bench_memory"
BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]


def psql(database, *args, stdin=None):
    cmd = [os.path.join(BIN, "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", PG.hostname, "-p", str(PG.port),
           "-U", PG.username, "-d", database, *args]
    env = dict(os.environ, PGOPTIONS="-c client_min_messages=warning")
    subprocess.run(cmd, input=stdin, check=True, text=True, stdout=subprocess.DEVNULL, env=env, timeout=900)


def copy(table, columns, rows, before=(), after=()):
    """Bulk-loads `rows` (tuples of text) into `table`, in one session with
    the statements `before` and `after`."""
    path = os.path.join(WORK, f"{table}.tsv")
    with open(path, "w") as f:
        for row in rows:
            f.write("\t".join(str(v).replace("\\", "\\\\") for v in row) + "\n")
    statements = [*before, f"\\copy {table} ({', '.join(columns)}) FROM '{path}'", *after]
    psql(DB, *(a for st in statements for a in ("-c", st)))


def user(i):
    return f"@user{i}:{SERVER}"


def devices_of(i):
    return [f"DEVICE{i}X{d}" for d in range(2 + i % 2)]


def key_json(uid, dev, generation):
    return json.dumps({
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "device_id": dev,
        "keys": {f"curve25519:{dev}": f"{generation:04d}" + "C" * 39, f"ed25519:{dev}": "E" * 43},
        "signatures": {uid: {f"ed25519:{dev}": f"{generation:04d}" + "S" * 82}},
        "user_id": uid,
    })


def cross_signing(uid, keytype):
    public = (keytype[:2].upper() + uid).ljust(43, "K")[:43]
    return json.dumps({"keys": {f"ed25519:{public}": public}, "usage": [keytype], "user_id": uid,
                       "signatures": {uid: {f"ed25519:{uid}": "M" * 86}}})


def build():
    psql("postgres", "-c", f"DROP DATABASE IF EXISTS {DB}", "-c",
         f"CREATE DATABASE {DB} OWNER {PG.username} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    schema = subprocess.run([os.path.join(BIN, "pg_dump"), "--schema-only", "--no-owner", "-h", PG.hostname,
                             "-p", str(PG.port), "-U", PG.username, PG.path.lstrip("/")],
                            check=True, capture_output=True, text=True, timeout=300).stdout
    psql(DB, stdin=schema)
    # Synapse's record of the schema, which the service checks at start-up.
    record = subprocess.run([os.path.join(BIN, "pg_dump"), "--data-only", "--no-owner", "-t", "schema_version",
                             "-t", "schema_compat_version", "-t", "applied_schema_deltas", "-h", PG.hostname,
                             "-p", str(PG.port), "-U", PG.username, PG.path.lstrip("/")],
                            check=True, capture_output=True, text=True, timeout=300).stdout
    psql(DB, stdin=record)
    asker = "@asker:" + SERVER
    copy("users", ["name", "creation_ts"], [(asker, 0)] + [(user(i), 0) for i in range(USERS)])
    copy("access_tokens", ["id", "user_id", "device_id", "token"], [(1, asker, "ASKER", TOKEN)])
    copy("devices", ["user_id", "device_id", "display_name"],
         [(asker, "ASKER", "asker")] + [(user(i), d, f"{d}'s name") for i in range(USERS) for d in devices_of(i)])
    copy("e2e_device_keys_json", ["user_id", "device_id", "ts_added_ms", "key_json"],
         ((user(i), d, 0, key_json(user(i), d, 0)) for i in range(USERS) for d in devices_of(i)))
    copy("e2e_cross_signing_keys", ["user_id", "keytype", "keydata", "stream_id"],
         ((user(i), t, cross_signing(user(i), t), 2 * i + n) for i in range(USERS) for n, t in enumerate(("master", "self_signing"))))
    psql(DB, "-c", f"INSERT INTO device_lists_stream (stream_id, user_id, device_id, instance_name) VALUES (1, '{user(0)}', 'X', 'master')",
         "-c", "DELETE FROM stream_positions", "-c", "INSERT INTO stream_positions VALUES ('device_lists_stream', 'master', 1)",
         "-c", "SELECT setval('device_lists_sequence', 1)")


def ask_everyone(url, generation):
    """Every user, 1,000 a query; checks a sample of the answers."""
    for start in range(0, USERS, 1000):
        ids = range(start, min(start + 1000, USERS))
        answer = call(url + QUERY, {"device_keys": {user(i): [] for i in ids}}, TOKEN, timeout=120)
        first = user(start)
        got = answer["device_keys"][first]
        if sorted(got) != sorted(devices_of(start)):
            raise SystemExit(f"{first}: devices {sorted(got)}")
        if generation is not None and not of_generation(got, start, generation):
            raise SystemExit(f"{first}: not the keys of generation {generation}")


def of_generation(devices, i, generation):
    """Whether user `i`'s first device in an answer has that round's keys."""
    first = devices_of(i)[0]
    return devices[first]["keys"][f"curve25519:{first}"].startswith(f"{generation:04d}")


def measure(url, pid):
    with open(f"/proc/{pid}/status") as f:
        rss_kb = int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))
    text = metrics(url)
    weights = {m.group(1): float(m.group(2)) for m in re.finditer(r'cache_weighted_bytes\{cache="([a-z_]+)"\} ([\d.e+]+)', text)}
    entries = {m.group(1): float(m.group(2)) for m in re.finditer(r'cache_entries\{cache="([a-z_]+)"\} ([\d.e+]+)', text)}
    # The token and user caches count entries, not bytes; they hold one each here.
    cached = sum(v for k, v in weights.items() if k not in ("tokens", "known_users"))
    return {"rss_mb": rss_kb / 1024, "cached_mb": cached / 2**20, "entries": entries}


def churn(cycle, url, proc):
    """A tenth of the users get new keys, as Synapse writes them: the key rows,
    then a device-list stream row each and the writer's position."""
    generation = cycle + 1
    ids = [i for i in range(USERS) if i % 10 == cycle % 10]
    copy("churn", ["user_id", "device_id", "key_json"],
         ((user(i), d, key_json(user(i), d, generation)) for i in ids for d in devices_of(i)),
         before=["CREATE TEMP TABLE churn (user_id TEXT, device_id TEXT, key_json TEXT)"],
         after=["UPDATE e2e_device_keys_json k SET key_json = c.key_json FROM churn c "
                "WHERE k.user_id = c.user_id AND k.device_id = c.device_id"])
    head = 1 + cycle * len(ids)
    copy("device_lists_stream", ["stream_id", "user_id", "device_id", "instance_name"],
         ((head + 1 + n, user(i), devices_of(i)[0], "master") for n, i in enumerate(ids)))
    psql(DB, "-c", f"SELECT setval('device_lists_sequence', {head + len(ids)})",
         "-c", f"UPDATE stream_positions SET stream_id = {head + len(ids)} WHERE stream_name = 'device_lists_stream'")
    # The service follows the stream: the churned users' new keys show.
    sample = ids[0]
    wait_ready(url, proc, lambda u: of_generation(
        call(u + QUERY, {"device_keys": {user(sample): []}}, TOKEN)["device_keys"][user(sample)], sample, generation), limit=60)


def main():
    started = time.time()
    build()
    print(f"database: {USERS} users, {sum(2 + i % 2 for i in range(USERS))} devices, {time.time() - started:.0f} s", flush=True)
    yaml = os.path.join(WORK, "homeserver.yaml")
    with open(yaml, "w") as f:
        f.write(f"server_name: {SERVER}\ndatabase:\n  name: psycopg2\n  args:\n    user: {PG.username}\n"
                f"    database: {DB}\n    host: {PG.hostname}\n    port: {PG.port}\n")
    url = f"http://127.0.0.1:{free_port()}"
    env = dict(os.environ, RUST_LOG="warn", SYNAPSE_KEYS_WORKER_CACHE_MAX_BYTES=str(8 * 2**30),
               SYNAPSE_KEYS_WORKER_POLL_INTERVAL_MS="100")
    p = subprocess.Popen([BINARY, "-c", yaml, "--listen", url.removeprefix("http://")], env=env, stdout=subprocess.DEVNULL)
    try:
        wait_ready(url, p, lambda u: call(u + "/ready", method="GET")["replication"]["caught_up"], limit=60)
        idle = measure(url, p.pid)
        ask_everyone(url, 0)
        rows = [{"cycle": 0, **measure(url, p.pid)}]
        for cycle in range(CYCLES):
            churn(cycle, url, p)
            ask_everyone(url, None)
            rows.append({"cycle": cycle + 1, **measure(url, p.pid)})
    finally:
        p.terminate()
        p.wait(timeout=30)
    print(f"\nidle: RSS {idle['rss_mb']:.1f} MB")
    print("\n| after | RSS MB | cached MB (weigher) | RSS / (1.5 × cached + 64 MB) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        what = "filling every user" if r["cycle"] == 0 else f"churn cycle {r['cycle']}"
        print(f"| {what} | {r['rss_mb']:.1f} | {r['cached_mb']:.1f} | {r['rss_mb'] / (1.5 * r['cached_mb'] + 64):.2f} |")
    growth = rows[-1]["rss_mb"] / rows[0]["rss_mb"] - 1
    print(f"\nRSS after {CYCLES} churn cycles against after filling: {100 * growth:+.1f}%")
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({"users": USERS, "idle": idle, "rows": rows}, f, indent=1)
    print(f"written to {os.path.normpath(OUT)}")


main()
