"""Scenarios (g) and (h): a remote user whose device list has to be fetched,
hit by many queries at once, on the world's federating pair ("synapse-fed",
whose main process is the device-lists writer, and "synapse-remote", TLS on
loopback).

Each round makes a new user on "synapse-remote" (with device keys) who joins
a public room of "synapse-fed" over federation: "synapse-fed" now tracks his
device list but has never fetched it, so the first query for him needs a
resync. Then BENCH_BURST (default 1,000) queries for him are sent at once,
each on its own connection, released together.

(g) The writer is the real one: we count the writer's resyncs of the user
    (its "Resync for" log lines), his server's `/user/devices` requests (its
    access log) and our `resyncs_total`; the target is exactly one writer
    call, however many queries.
(h) The writer hangs (a listener that accepts and never answers stands in
    for it in `instance_map`); the queries carry `timeout` BENCH_H_TIMEOUT_MS
    (default 2,000): every answer is due within `timeout` + 100 ms, and must
    still hold the user's devices (asked of his server directly).

Loopback only."""

import json
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse

from common import QUERY, call, metrics

FED = os.environ.get("SKW_TEST_FED_SYNAPSE_URL")
REMOTE = os.environ.get("SKW_TEST_REMOTE_SYNAPSE_URL")
BURST = int(os.environ.get("BENCH_BURST", "1000"))
LOADGEN = os.environ.get("BENCH_LOADGEN", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release",
                                                        "examples", "loadgen"))
H_TIMEOUT_MS = int(os.environ.get("BENCH_H_TIMEOUT_MS", "2000"))


def burst(url, token, body, n):
    """`n` copies of one query, each on a connection of its own opened
    beforehand, sent together by `bench/loadgen.rs --burst` (async, one
    thread: answers that arrive together are read as they come; a thread
    per query in Python took seconds of its own to read a thousand, charged
    to the server). [(status, latency ms, answer)]."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(body, f)
        f.flush()
        run = subprocess.run([LOADGEN, "--burst", url + QUERY, str(n), token, f.name],
                             capture_output=True, text=True, timeout=300)
    if run.returncode:
        raise SystemExit(f"loadgen --burst against {url} failed:\n{run.stdout}{run.stderr}")
    return [(status, ms, data.encode()) for status, ms, data in json.loads(run.stdout)]


def hanging_listener():
    """A TCP port that accepts connections and never answers: a hung writer."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1024)
    held = []

    def accept():
        while True:
            try:
                held.append(s.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return s


def count_lines(path, *needles):
    with open(path, errors="replace") as f:
        return sum(1 for line in f if all(n in line for n in needles))


def resyncs(url):
    text = metrics(url)
    return {o: float(v) for o, v in re.findall(r'resyncs_total\{outcome="(\w+)"\} ([\d.e+]+)', text)}


class Pair:
    """A user of "synapse-fed" with a public room, and new users of
    "synapse-remote" joining it."""

    def __init__(self, register):
        self.register = register
        self.asker = register("stale-asker", FED)
        self.room = call(f"{FED}/_matrix/client/v3/createRoom", {"preset": "public_chat"}, self.asker["token"])["room_id"]
        self.n = 0

    def fresh_remote_user(self):
        """A new remote user in the room, whose devices nobody fetched yet."""
        self.n += 1
        user = self.register(f"stale{self.n}", REMOTE)
        server = urllib.parse.quote(os.environ["SKW_TEST_FED_SERVER_NAME"])
        call(f"{REMOTE}/_matrix/client/v3/join/{urllib.parse.quote(self.room)}?server_name={server}", {}, user["token"])
        return user


def summary(results, user, timeout_ms=None):
    """Statuses, answers holding the user's device, and latencies."""
    lat = sorted(r[1] for r in results)
    complete = 0
    for status, _, data in results:
        if status == 200 and json.loads(data)["device_keys"].get(user["user_id"], {}).get(user["device_id"]):
            complete += 1
    pct = lambda p: lat[min(len(lat) - 1, int(p / 100 * len(lat)))]
    out = {"queries": len(results), "ok": sum(1 for r in results if r[0] == 200), "with_devices": complete,
           "p50": pct(50), "p99": pct(99), "max": lat[-1]}
    if timeout_ms is not None:
        out["late"] = sum(1 for x in lat if x > timeout_ms + 100)
    return out


def writer_calls_for(user):
    return count_lines(os.environ["SKW_TEST_FED_LOG"], "Resync for", user["user_id"])


def remote_calls_for(user):
    path = "GET /_matrix/federation/v1/user/devices/" + urllib.parse.quote(user["user_id"])
    return count_lines(os.environ["SKW_TEST_REMOTE_LOG"], path)


def settle(count, limit=10):
    """Polls a log count until it stops rising (Synapse writes a line once
    its answer is sent): its value, at least one unless `limit` s passed."""
    deadline = time.time() + limit
    last = count()
    while time.time() < deadline:
        time.sleep(0.2)
        now = count()
        if now == last and now >= 1:
            return now
        last = now
    return last


def scenario_g(pair, ours, rounds):
    """(g): BURST queries for a user needing a resync; the real writer."""
    out = []
    for _ in range(rounds):
        user = pair.fresh_remote_user()
        before = resyncs(ours)
        results = burst(ours, pair.asker["token"], {"device_keys": {user["user_id"]: []}}, BURST)
        after = resyncs(ours)
        row = summary(results, user)
        row["writer_calls"] = settle(lambda: writer_calls_for(user))
        row["remote_calls"] = settle(lambda: remote_calls_for(user))
        row["resyncs"] = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        out.append(row)
        print(f"(g) {BURST} queries for a user to resync: {row['ok']} answered 200, {row['with_devices']} with his device, "
              f"writer calls {row['writer_calls']}, remote calls {row['remote_calls']}, "
              f"p50 {row['p50']:.0f} ms, max {row['max']:.0f} ms", flush=True)
    return out


def scenario_h(pair, ours, rounds):
    """(h): the same with the writer hanging, `timeout` H_TIMEOUT_MS."""
    out = []
    for _ in range(rounds):
        user = pair.fresh_remote_user()
        body = {"device_keys": {user["user_id"]: []}, "timeout": H_TIMEOUT_MS}
        row = summary(burst(ours, pair.asker["token"], body, BURST), user, H_TIMEOUT_MS)
        row["timeout_ms"] = H_TIMEOUT_MS
        row["remote_calls"] = settle(lambda: remote_calls_for(user))
        out.append(row)
        print(f"(h) {BURST} queries, writer hanging, timeout {H_TIMEOUT_MS} ms: {row['ok']} answered 200, "
              f"{row['with_devices']} with his device, remote calls {row['remote_calls']}, p50 {row['p50']:.0f} ms, "
              f"p99 {row['p99']:.0f} ms, max {row['max']:.0f} ms, {row['late']} later than timeout + 100 ms", flush=True)
    return out
