"""Runs in the test world (scripts/world.py run): creates users, devices and
keys through Synapse's client API, starts the release binary (caches on, and
caches off) and the bench's ceiling server, and measures Synapse, us and the
ceiling with wrk on the same requests, in alternating rounds. Prints a table
(median and spread of the rounds; ratios against Synapse and the ceiling from
the same run) and writes it as JSON. Loopback only; every run is bounded.

Environment: BENCH_SECONDS (per measurement, default 10), BENCH_ROUNDS
(default 3), BENCH_USERS (users in the big query, default 1000), BENCH_TOKENS
(requesters in the many-tokens scenario, default 1000), BENCH_SWEEP (the
concurrency levels of the sweep), BENCH_RATES (the fixed request rates of the
latency runs, default 200,2000,8000), BENCH_BINARY, BENCH_CEILING and
BENCH_LOADGEN (the builds to measure and load with), BENCH_OUT (the JSON
file), BENCH_SCENARIOS (the scenarios to run, default a,b,c,d,e,f,g,h,j,k; an
empty BENCH_SWEEP or BENCH_RATES skips the sweep or the fixed rates),
BENCH_REAL_USERS (the realistic population of (j) and (k), default 100),
BENCH_REAL_RATES (the fixed request rates of (j), default 8000)."""

import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import resync
from common import QUERY, call, free_port, metrics, wait_ready

SYNAPSE = os.environ["SKW_TEST_SYNAPSE_URL"]
YAML = os.environ["SKW_TEST_HOMESERVER_YAML"]
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
USERS = int(os.environ.get("BENCH_USERS", "1000"))
TOKENS = int(os.environ.get("BENCH_TOKENS", "1000"))
HERE = os.path.dirname(os.path.abspath(__file__))
RELEASE = os.path.join(HERE, "..", "target", "release")
BINARY = os.environ.get("BENCH_BINARY", os.path.join(RELEASE, "synapse-keys-worker"))
CEILING = os.environ.get("BENCH_CEILING", os.path.join(RELEASE, "examples", "ceiling"))
LOADGEN = os.environ.get("BENCH_LOADGEN", os.path.join(RELEASE, "examples", "loadgen"))
OUT = os.environ.get("BENCH_OUT", os.path.join(RELEASE, "..", "bench", "results.json"))
WORK = tempfile.mkdtemp(prefix="skw-bench-")
SCENARIOS = os.environ.get("BENCH_SCENARIOS", "a,b,c,d,e,f,g,h,j,k").split(",")
REAL_USERS = int(os.environ.get("BENCH_REAL_USERS", "100"))


def ints(name, default):
    """The comma-separated integers of environment variable `name`."""
    return [int(v) for v in os.environ.get(name, default).split(",") if v.strip()]


def register(i, synapse=SYNAPSE):
    """A user with one device and its keys, through Synapse's client API."""
    name = f"bench{i}-{os.getpid()}"
    r = call(f"{synapse}/_matrix/client/v3/register",
             {"username": name, "password": "pw-" + name, "auth": {"type": "m.login.dummy"}})
    uid, tok, dev = r["user_id"], r["access_token"], r["device_id"]
    keys = {"user_id": uid, "device_id": dev, "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
            "keys": {f"ed25519:{dev}": "A" * 43, f"curve25519:{dev}": "B" * 43}, "signatures": {uid: {f"ed25519:{dev}": "S" * 86}}}
    call(f"{synapse}/_matrix/client/v3/keys/upload", {"device_keys": keys}, tok)
    return {"user_id": uid, "token": tok, "device_id": dev, "password": "pw-" + name}


def realistic():
    """(j) and (k)'s population (bench/population.py, run with the world's
    Synapse python for its ed25519 signing): the requester's token, and
    the bodies of (j), its first 10 users, and (k), all of them."""
    run = subprocess.run([os.environ["SKW_TEST_SYNAPSE_PYTHON"], os.path.join(HERE, "population.py"), SYNAPSE,
                          str(max(REAL_USERS, 10)), str(os.getpid())], capture_output=True, text=True, timeout=600)
    if run.returncode:
        raise SystemExit(f"bench/population.py failed:\n{run.stderr}")
    pop = json.loads(run.stdout)
    query = lambda users: {"device_keys": {u["user_id"]: [] for u in users}}
    return pop["requester"]["token"], query(pop["users"][:10]), query(pop["users"])


def login(user):
    r = call(f"{SYNAPSE}/_matrix/client/v3/login", {"type": "m.login.password", "password": user["password"],
                                                      "identifier": {"type": "m.id.user", "user": user["user_id"]}})
    return r["access_token"]


def start_worker(extra_env, *yamls):
    url = f"http://127.0.0.1:{free_port()}"
    env = dict(os.environ, RUST_LOG="warn", **extra_env)
    configs = [a for y in (yamls or [YAML]) for a in ("-c", y)]
    p = subprocess.Popen([BINARY, *configs, "--listen", url.removeprefix("http://")], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ready(url):
        r = call(url + "/ready", method="GET")
        return r["database"]["ok"] and (extra_env or r["replication"]["caught_up"])

    wait_ready(url, p, ready)
    return p, url


def start_ceiling(answer_of):
    """The ceiling answering every request with the headers and body `answer_of`
    (a worker's URL, token and body) gets from the service."""
    url, token, body = answer_of
    headers, data = call(url + QUERY, body, token, full=True)
    skip = {"content-length", "date", "connection", "transfer-encoding"}
    answer = {"headers": [[k, v] for k, v in headers if k.lower() not in skip], "body": data.decode()}
    path = os.path.join(WORK, f"answer-{free_port()}.json")
    with open(path, "w") as f:
        json.dump(answer, f)
    url = f"http://127.0.0.1:{free_port()}"
    p = subprocess.Popen([CEILING, url.removeprefix("http://"), path], stdout=subprocess.DEVNULL)
    wait_ready(url, p, lambda u: call(u + QUERY, body, token, full=True)[1] == data)
    return p, url


def wrk(url, tokens, body, connections):
    env = dict(os.environ, BENCH_TOKENS=tokens, BENCH_BODY=json.dumps(body))
    run = subprocess.run(["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{SECONDS}s", "--latency", "-s",
                          os.path.join(HERE, "keys_query.lua"), url + QUERY],
                         env=env, capture_output=True, text=True, timeout=SECONDS + 60)
    out = run.stdout
    if run.returncode or re.search(r"Non-2xx or 3xx responses|Socket errors", out) or "Requests/sec" not in out:
        raise SystemExit(f"errors during the run against {url}:\n{out}{run.stderr}")

    def pct(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": pct(50), "p99": pct(99)}


def rounds(targets, tokens, body, connections):
    """ROUNDS rounds over `targets` (name -> URL), the order reversed every
    other round; per target the median and spread of the rounds."""
    seen = {name: [] for name in targets}
    for r in range(ROUNDS):
        for name in (list(targets) if r % 2 == 0 else list(reversed(targets))):
            seen[name].append(wrk(targets[name], tokens, body, connections))
    out = {}
    for name, runs in seen.items():
        rps = [x["rps"] for x in runs]
        out[name] = {"rps": statistics.median(rps), "rps_min": min(rps), "rps_max": max(rps),
                     "p50": statistics.median(x["p50"] for x in runs), "p99": statistics.median(x["p99"] for x in runs)}
    return out


def remote_users(procs):
    """Scenario (f)'s world: 10 users of the second homeserver
    ("synapse-remote", keys uploaded there) join a room of a user of the
    first ("synapse-fed") over federation, so that Synapse's device-list
    cache holds them. Returns a worker of ours on "synapse-fed", the asker's
    token and the query, once both answer it alike with every device."""
    fed, remote = os.environ["SKW_TEST_FED_SYNAPSE_URL"], os.environ["SKW_TEST_REMOTE_SYNAPSE_URL"]
    asker = register("asker", fed)
    with ThreadPoolExecutor(8) as pool:
        members = list(pool.map(lambda i: register(f"r{i}", remote), range(10)))
    room = call(f"{fed}/_matrix/client/v3/createRoom",
                {"preset": "private_chat", "invite": [m["user_id"] for m in members]}, asker["token"])["room_id"]
    for m in members:
        call(f"{remote}/_matrix/client/v3/rooms/{room}/join", {}, m["token"])
    body = {"device_keys": {m["user_id"]: [] for m in members}}
    worker, ours = start_worker({}, os.environ["SKW_TEST_FED_HOMESERVER_YAML"])
    procs.append(worker)
    deadline = time.time() + 60
    while True:
        theirs = call(fed + QUERY, body, asker["token"])
        complete = all(theirs["device_keys"].get(m["user_id"]) for m in members) and not theirs["failures"]
        if complete and call(ours + QUERY, body, asker["token"]) == theirs:
            return ours, asker["token"], body
        if time.time() > deadline:
            raise SystemExit(f"remote users' devices not in both answers within 60 s: {json.dumps(theirs)[:400]}")
        time.sleep(0.5)


def cache_counts(url, cache):
    """Our hits and misses of one cache, from /metrics."""
    text = metrics(url)
    count = lambda kind: sum(float(m) for m in re.findall(rf'cache_{kind}_total{{cache="{cache}"}} ([\d.e+]+)', text))
    return count("hits"), count("misses")


def token_file(tokens):
    path = os.path.join(WORK, f"tokens-{len(tokens)}-{free_port()}.txt")
    with open(path, "w") as f:
        f.write("\n".join(tokens) + "\n")
    return path


def main():
    started = time.time()
    with ThreadPoolExecutor(8) as pool:
        users = list(pool.map(register, range(max(USERS, 10))))
        requesters = list(pool.map(login, (users[1 + i % (len(users) - 1)] for i in range(TOKENS))))
    print(f"set-up: {len(users)} users with keys, {len(requesters)} more devices, {time.time() - started:.0f} s", flush=True)
    asker = users[0]["token"]
    one, many = token_file([asker]), token_file(requesters)
    ten = {"device_keys": {u["user_id"]: [] for u in users[:10]}}
    single = {"device_keys": {users[1]["user_id"]: [users[1]["device_id"]]}}
    big = {"device_keys": {u["user_id"]: [] for u in users[:USERS]}}
    procs = []
    try:
        cached, ours = start_worker({})
        uncached, ours_off = start_worker({"SYNAPSE_KEYS_WORKER_CACHES_ENABLED": "false"})
        procs += [cached, uncached]
        for body in (ten, single, big):
            assert call(ours + QUERY, body, asker) == call(SYNAPSE + QUERY, body, asker), "not Synapse's answer"
            assert call(ours_off + QUERY, body, asker) == call(SYNAPSE + QUERY, body, asker), "not Synapse's answer"
        remote_ours, remote_asker, remote_ten = remote_users(procs) if "f" in SCENARIOS else (None, None, None)
        remote_token = token_file([remote_asker]) if remote_asker else None
        real_asker, real_ten, real_all = realistic() if {"j", "k"} & set(SCENARIOS) else (None, None, None)
        real_one = token_file([real_asker]) if real_asker else None
        for body in (real_ten, real_all) if real_asker else ():
            assert call(ours + QUERY, body, real_asker) == call(SYNAPSE + QUERY, body, real_asker), "not Synapse's answer"
        scenarios = [
            # key, what, ours, tokens, body, connections, the requester
            ("a", "10 local users, all devices, warm", ours, one, ten, 16, asker),
            ("b", "one user, one device, warm", ours, one, single, 16, asker),
            ("c", f"{USERS} existing users in one query, warm", ours, one, big, 4, asker),
            ("d", "10 local users, caches off", ours_off, one, ten, 16, asker),
            ("e", f"10 local users, {TOKENS} requesters cycling", ours, many, ten, 16, asker),
            ("f", "10 remote users in Synapse's device-list cache, warm", remote_ours, remote_token, remote_ten, 16, remote_asker),
            ("j", "10 realistic users (2–6 devices, cross-signed, verified), warm", ours, real_one, real_ten, 16, real_asker),
            ("k", f"{max(REAL_USERS, 10)} realistic users in one query, warm", ours, real_one, real_all, 4, real_asker),
        ]
        scenarios = [s for s in scenarios if s[0] in SCENARIOS]
        results = []
        sweep = concurrency_sweep(ours, asker, one, ten, procs)
        best = {n: max((row[n]["rps"] for row in sweep), default=float("inf")) for n in ("Synapse", "ours", "ceiling")}
        # A fixed rate of thousands a second stands for many devices; from
        # one token, Synapse's per-device limit (10 at once) would queue it.
        unlimited, ours_unlimited = start_worker({"SYNAPSE_KEYS_WORKER_MAX_CONCURRENT_QUERIES_PER_DEVICE": "100000"})
        procs.append(unlimited)
        fixed = fixed_rate(ours_unlimited, asker, one, ten, procs, best)
        for key, what, url, tokens, body, conns, who in scenarios:
            synapse = os.environ["SKW_TEST_FED_SYNAPSE_URL"] if key == "f" else SYNAPSE
            answer = json.loads(call(url + QUERY, body, who, full=True)[1])
            size = {"answer_bytes": len(json.dumps(answer, separators=(",", ":"))),
                    "devices": sum(len(d) for d in answer["device_keys"].values())}
            ceiling, ceiling_url = start_ceiling((url, who, body))
            procs.append(ceiling)
            before = cache_counts(url, "remote_devices")
            r = rounds({"Synapse": synapse, "ours": url, "ceiling": ceiling_url}, tokens, body, conns)
            after = cache_counts(url, "remote_devices")
            r["ours"]["remote_cache"] = {"hits": after[0] - before[0], "misses": after[1] - before[1]}
            ceiling.terminate()
            ceiling.wait(timeout=30)
            results.append({"key": key, "scenario": what, "connections": conns, **size, **r})
            print(f"({key}) {what}: ours {r['ours']['rps']:.0f} req/s, Synapse {r['Synapse']['rps']:.0f}, "
                  f"ceiling {r['ceiling']['rps']:.0f}", flush=True)
        real = next((r for r in results if r["key"] == "j"), None)
        if real:
            best = {n: real[n]["rps"] for n in ("Synapse", "ours", "ceiling")}
            fixed += fixed_rate(ours_unlimited, real_asker, real_one, real_ten, procs, best, "j", ints("BENCH_REAL_RATES", "8000"))
        bursts = stale_remote_user(procs)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
    report(results, sweep, fixed, bursts)


def stale_remote_user(procs):
    """Scenarios (g) and (h) (bench/resync.py): a worker of ours on
    "synapse-fed" with its real writer, and one whose writer hangs. All the
    queries come from one device, so Synapse's per-device limit (10 at
    once) is lifted for them."""
    if not {"g", "h"} & set(SCENARIOS):
        return {}
    pair = resync.Pair(register)
    limit = {"SYNAPSE_KEYS_WORKER_MAX_CONCURRENT_QUERIES_PER_DEVICE": str(resync.BURST)}
    fed_yaml = os.environ["SKW_TEST_FED_HOMESERVER_YAML"]
    out = {}
    if "g" in SCENARIOS:
        worker, url = start_worker(limit, fed_yaml)
        procs.append(worker)
        out["g"] = resync.scenario_g(pair, url, ROUNDS)
    if "h" in SCENARIOS:
        hung = resync.hanging_listener()
        override = os.path.join(WORK, "hanging-writer.yaml")
        with open(override, "w") as f:
            f.write(f"instance_map:\n  main:\n    host: 127.0.0.1\n    port: {hung.getsockname()[1]}\n")
        worker, url = start_worker(limit, fed_yaml, override)
        procs.append(worker)
        out["h"] = resync.scenario_h(pair, url, ROUNDS)
        hung.close()
    return out


def fixed_rate(ours, asker, tokens, body, procs, best, key="a", rates=None):
    """Scenario `key` at fixed request rates (bench/loadgen.rs: open loop,
    latency from when each request was due), one round per rate and server;
    `ours` has the per-device limit lifted (one token stands for many devices).
    A server whose best throughput (`best`, by name) is under 1.5 times a
    rate is not asked to sustain it (it would only queue)."""
    ceiling, ceiling_url = start_ceiling((ours, asker, body))
    procs.append(ceiling)
    body_file = os.path.join(WORK, f"body-{free_port()}.json")
    with open(body_file, "w") as f:
        json.dump(body, f)
    out = []
    for rate in rates if rates is not None else ints("BENCH_RATES", "200,2000,8000"):
        row = {"scenario": key, "rate": rate}
        for name, url in (("Synapse", SYNAPSE), ("ours", ours), ("ceiling", ceiling_url)):
            if best[name] < 1.5 * rate:
                row[name] = None
                continue
            run = subprocess.run([LOADGEN, url + QUERY, str(rate), str(SECONDS), tokens, body_file],
                                 capture_output=True, text=True, timeout=SECONDS + 90)
            if run.returncode:
                raise SystemExit(f"loadgen against {url} failed:\n{run.stdout}{run.stderr}")
            r = json.loads(run.stdout)
            if r["errors"]:
                # Overloaded, not broken: reported with the latencies of
                # the answered ones, and the run goes on.
                print(f"({key}) {name} at {rate} req/s: {r['errors']} of {r['sent']} failed: {r['error_kinds']}", flush=True)
            row[name] = r
        out.append(row)
        print(f"({key}) fixed rate {rate} req/s, p99: " + ", ".join(
            f"{n} {row[n]['p99']:.2f} ms" if row[n] else f"{n} -" for n in ("Synapse", "ours", "ceiling")), flush=True)
    ceiling.terminate()
    ceiling.wait(timeout=30)
    return out


def concurrency_sweep(ours, asker, tokens, body, procs):
    """Scenario (a) at growing concurrency: one round per level, for the plot."""
    ceiling, ceiling_url = start_ceiling((ours, asker, body))
    procs.append(ceiling)
    levels = ints("BENCH_SWEEP", "1,4,16,64")
    out = []
    for c in levels:
        row = {"connections": c}
        for name, url in (("Synapse", SYNAPSE), ("ours", ours), ("ceiling", ceiling_url)):
            row[name] = wrk(url, tokens, body, c)
        out.append(row)
        print(f"sweep, {c} connections: " + ", ".join(f"{n} {row[n]['rps']:.0f} req/s" for n in ("Synapse", "ours", "ceiling")),
              flush=True)
    ceiling.terminate()
    ceiling.wait(timeout=30)
    return out


def report(results, sweep, fixed, bursts):
    print("\n| scenario | answer | who | req/s median (min–max) | p50 ms | p99 ms | ours / Synapse | ours / ceiling |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        ours, syn, ceil = r["ours"], r["Synapse"], r["ceiling"]
        for who in ("Synapse", "ours", "ceiling"):
            x = r[who]
            ratios = (f"×{ours['rps'] / syn['rps']:.1f} req/s, p99 1/{syn['p99'] / ours['p99']:.0f}",
                      f"{100 * ours['rps'] / ceil['rps']:.0f}% req/s") if who == "ours" else ("", "")
            size = f"{r['answer_bytes'] / 1000:.1f} KB, {r['devices']} devices" if who == "Synapse" else ""
            print(f"| {'(' + r['key'] + ') ' + r['scenario'] if who == 'Synapse' else ''} | {size} | {who} "
                  f"| {x['rps']:.0f} ({x['rps_min']:.0f}–{x['rps_max']:.0f}) | {x['p50']:.2f} | {x['p99']:.2f} "
                  f"| {ratios[0]} | {ratios[1]} |")
    print(f"\n{ROUNDS} alternating rounds of {SECONDS} s per target, wrk -t2, same database and machine, one run.")
    for r in results:
        if r["key"] == "f":
            c = r["ours"]["remote_cache"]
            print(f"(f): our remote-device cache during its rounds: {c['hits']:.0f} hits, {c['misses']:.0f} misses")
    print("\n| scenario | rate req/s | who | p50 ms | p99 ms | p99.9 ms | max ms | generator lag ms |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for row in fixed:
        for who in ("Synapse", "ours", "ceiling"):
            x = row[who]
            cells = (f"{x['p50']:.2f} | {x['p99']:.2f} | {x['p999']:.2f} | {x['max']:.2f} | {x['lag_ms']:.1f}" if x
                     else "cannot sustain it | | | |")
            if x and x["errors"]:
                kinds = ", ".join(f"{k}: {n}" for k, n in x["error_kinds"].items())
                cells += f" {x['errors']} of {x['sent']} failed ({kinds})"
            print(f"| ({row['scenario']}) | {row['rate']} | {who} | {cells} |")
    if bursts:
        print(f"\n| scenario | round | queries | 200 | with the devices | writer calls | remote calls | p50 ms | p99 ms | max ms | later than timeout + 100 ms |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, rows in bursts.items():
        for i, x in enumerate(rows, 1):
            print(f"| ({key}) | {i} | {x['queries']} | {x['ok']} | {x['with_devices']} | {x.get('writer_calls', '-')} "
                  f"| {x.get('remote_calls', '-')} | {x['p50']:.0f} | {x['p99']:.0f} | {x['max']:.0f} | {x.get('late', '-')} |")
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({"seconds": SECONDS, "rounds": ROUNDS, "nproc": os.cpu_count(), "results": results, "sweep": sweep,
                   "fixed_rate": fixed, "bursts": bursts},
                  f, indent=1)
    print(f"written to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
