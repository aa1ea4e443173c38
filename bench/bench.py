"""Runs in the test world (scripts/world.py run): creates users and keys through
Synapse, starts the release binary, and measures Synapse and us with wrk on
the same requests. Prints a table; figures are ratios against Synapse from
the same run. Loopback only; every run is bounded in time."""

import json
import os
import re
import socket
import subprocess
import time
import urllib.request

SYNAPSE = os.environ["SKW_TEST_SYNAPSE_URL"]
YAML = os.environ["SKW_TEST_HOMESERVER_YAML"]
SERVER = os.environ["SKW_TEST_SERVER_NAME"]
SECONDS = int(os.environ.get("BENCH_SECONDS", "15"))
HERE = os.path.dirname(os.path.abspath(__file__))
BINARY = os.environ.get("BENCH_BINARY", os.path.join(HERE, "..", "target", "release", "synapse-keys-worker"))


def call(url, body=None, token=None, method="POST"):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"null")


def user(i):
    name = f"bench{i}-{os.getpid()}"
    r = call(f"{SYNAPSE}/_matrix/client/v3/register",
             {"username": name, "password": "pw-" + name, "auth": {"type": "m.login.dummy"}})
    uid, tok, dev = r["user_id"], r["access_token"], r["device_id"]
    keys = {"user_id": uid, "device_id": dev, "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {f"ed25519:{dev}": "A" * 43, f"curve25519:{dev}": "B" * 43}, "signatures": {uid: {f"ed25519:{dev}": "S" * 86}}}
    call(f"{SYNAPSE}/_matrix/client/v3/keys/upload", {"device_keys": keys}, tok)
    return uid, tok


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_worker(extra_env):
    port = free_port()
    env = dict(os.environ, RUST_LOG="warn", **extra_env)
    p = subprocess.Popen([BINARY, "-c", YAML, "--listen", f"127.0.0.1:{port}"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            ready = call(url + "/ready", method="GET")
            if ready["database"]["ok"] and (extra_env or ready["replication"]["caught_up"]):
                return p, url
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit("the service did not become ready")


def wrk(url, token, body, connections=16):
    env = dict(os.environ, BENCH_TOKEN=token, BENCH_BODY=json.dumps(body))
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{SECONDS}s", "--latency", "-s",
                          os.path.join(HERE, "keys_query.lua"), url + "/_matrix/client/v3/keys/query"],
                         env=env, capture_output=True, text=True, timeout=SECONDS + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise SystemExit(f"errors during the run:\n{out}")

    def pct(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    return rps, pct(50), pct(99)


def main():
    users = [user(i) for i in range(20)]
    asker = users[0][1]
    ten = {"device_keys": {u: [] for u, _ in users[:10]}}
    big = {"device_keys": {**{u: [] for u, _ in users}, **{f"@nobody{i}:{SERVER}": [] for i in range(1000 - len(users))}}}
    assert len(big["device_keys"]) == 1000
    workers = []
    cached, cached_url = start_worker({})
    uncached, uncached_url = start_worker({"SYNAPSE_KEYS_WORKER_CACHES_ENABLED": "false"})
    workers += [cached, uncached]
    # Same answers before measuring.
    assert call(cached_url + "/_matrix/client/v3/keys/query", ten, asker) == call(SYNAPSE + "/_matrix/client/v3/keys/query", ten, asker)
    rows = []
    try:
        for name, body, conns in [("10 local users, warm", ten, 16), ("1000-user query", big, 4)]:
            s = wrk(SYNAPSE, asker, body, conns)
            o = wrk(cached_url, asker, body, conns)
            u = wrk(uncached_url, asker, body, conns)
            rows.append((name, s, o, u))
    finally:
        for p in workers:
            p.terminate()
    print(f"\n{'scenario':28} {'who':18} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}   ratios vs Synapse")
    for name, s, o, u in rows:
        print(f"{name:28} {'Synapse':18} {s[0]:9.1f} {s[1]:8.2f} {s[2]:8.2f}")
        for who, r in [("ours, caches on", o), ("ours, caches off", u)]:
            print(f"{'':28} {who:18} {r[0]:9.1f} {r[1]:8.2f} {r[2]:8.2f}   throughput x{r[0] / s[0]:.1f}, p99 1/{s[2] / r[2]:.1f}")
    print(f"\n{SECONDS} s per measurement, wrk -t2, same database and machine, one run.")


main()
