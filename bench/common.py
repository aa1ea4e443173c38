"""What bench.py and memory.py share: HTTP calls, free loopback ports and
waiting for a server to come up. Loopback only."""

import json
import socket
import time
import urllib.request

QUERY = "/_matrix/client/v3/keys/query"


def call(url, body=None, token=None, method="POST", full=False, timeout=60):
    """A JSON request; its JSON answer, or (headers, bytes) with `full`."""
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        data = r.read()
        return (r.getheaders(), data) if full else json.loads(data or b"null")


def metrics(url):
    """A server's /metrics text."""
    return call(url + "/metrics", method="GET", full=True)[1].decode()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_ready(url, proc, ready, limit=30):
    """Polls `ready(url)` until true; fails if `proc` exits or `limit` s pass."""
    deadline = time.time() + limit
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: exited with {proc.returncode}")
        try:
            if ready(url):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not become ready")
