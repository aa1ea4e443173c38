"""Users as real users look, made through Synapse's client API: several
devices each (2 to 6, named), every device's keys signed by the device, the
user's master, self-signing and user-signing keys, every device signed by
its owner's self-signing key, and the requester's user-signing signature on
every other user's master key. Real ed25519 signatures (Synapse checks
them), so it runs with the test world's Synapse venv python (signedjson).

    python population.py SYNAPSE_URL COUNT TAG    prints JSON:
    {"requester": {...}, "users": [{"user_id", "token", "devices"}...]}

The requester is the first user. Loopback only."""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json

from common import call

CLIENTS = ["phone", "laptop", "web", "tablet", "desktop", "work laptop"]


def key(user_id):
    """A signing key whose key ID is its public key, as cross-signing keys' are."""
    k = generate_signing_key("x")
    k.version = encode_verify_key_base64(get_verify_key(k))
    return k


def cross_signing_key(user_id, usage, k):
    return {"user_id": user_id, "usage": [usage], "keys": {f"ed25519:{k.version}": k.version}}


def person(synapse, i, tag):
    name = f"real{i}-{tag}"
    password = "pw-" + name
    first = call(f"{synapse}/_matrix/client/v3/register",
                 {"username": name, "password": password, "auth": {"type": "m.login.dummy"},
                  "initial_device_display_name": CLIENTS[0]})
    user_id, token = first["user_id"], first["access_token"]
    sessions = [(first["device_id"], token)]
    for n in range(1, 2 + i % 5):
        r = call(f"{synapse}/_matrix/client/v3/login",
                 {"type": "m.login.password", "password": password, "identifier": {"type": "m.id.user", "user": user_id},
                  "initial_device_display_name": CLIENTS[n]})
        sessions.append((r["device_id"], r["access_token"]))
    devices = []
    for device_id, tok in sessions:
        dk = generate_signing_key(device_id)
        keys = {"user_id": user_id, "device_id": device_id,
                "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
                "keys": {f"ed25519:{device_id}": encode_verify_key_base64(get_verify_key(dk)),
                         f"curve25519:{device_id}": encode_verify_key_base64(get_verify_key(generate_signing_key("c")))}}
        keys = sign_json(keys, user_id, dk)
        call(f"{synapse}/_matrix/client/v3/keys/upload", {"device_keys": keys}, tok)
        devices.append(keys)
    master, self_signing, user_signing = key(user_id), key(user_id), key(user_id)
    call(f"{synapse}/_matrix/client/v3/keys/device_signing/upload", {
        "master_key": cross_signing_key(user_id, "master", master),
        "self_signing_key": sign_json(cross_signing_key(user_id, "self_signing", self_signing), user_id, master),
        "user_signing_key": sign_json(cross_signing_key(user_id, "user_signing", user_signing), user_id, master),
    }, token)
    signed = {}
    for keys in devices:
        plain = {k: v for k, v in keys.items() if k not in ("signatures", "unsigned")}
        signed[keys["device_id"]] = sign_json(plain, user_id, self_signing)
    call(f"{synapse}/_matrix/client/v3/keys/signatures/upload", {user_id: signed}, token)
    return {"user_id": user_id, "token": token, "devices": len(devices), "master": cross_signing_key(user_id, "master", master),
            "user_signing": user_signing}


def main():
    synapse, count, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with ThreadPoolExecutor(8) as pool:
        people = list(pool.map(lambda i: person(synapse, i, tag), range(count)))
    requester = people[0]
    # The requester has verified every other user: its user-signing key on
    # their master keys.
    signed = {}
    for p in people[1::2]:
        public = next(iter(p["master"]["keys"].values()))
        signed[p["user_id"]] = {public: sign_json(p["master"], requester["user_id"], requester["user_signing"])}
    if signed:
        call(f"{synapse}/_matrix/client/v3/keys/signatures/upload", signed, requester["token"])
    strip = lambda p: {k: p[k] for k in ("user_id", "token", "devices")}
    json.dump({"requester": strip(requester), "users": [strip(p) for p in people]}, sys.stdout)


if __name__ == "__main__":
    main()
