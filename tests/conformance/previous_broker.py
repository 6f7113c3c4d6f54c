#!/usr/bin/env python3
"""The previous release's broker, as the bytes it answers, for this version's clients.

The previous release (0.1.0, main at dc6b6c9, before the contract of issue #12)
cannot be built here, so its broker is played from its golden fixtures
(tests/fixtures/golden/0.1.0-dc6b6c9/): a ROUTER that answers each request type
that release knew with that release's own reply bytes (only `req_id` changed),
and refuses what that release refused, as it did:

- a request type it did not know (`resubmit`): `unknown_type`;
- a key it did not know inside `job`, `job.loras[]`, `job.inputs[]` or `filter`
  (it decoded them with `deny_unknown_fields`): `invalid_field`.

Every refusal is also printed to stderr as `REFUSED <why>`, so a test can tell
a client that sent what an older broker cannot read from one that was refused
for a reason of its own. The endpoint is printed on stdout's first line; the
script serves until it is killed. Plain pyzmq + msgpack.
"""

import os
import sys

import msgpack
import zmq

TAG = b"KILN1"
HERE = os.path.dirname(os.path.abspath(__file__))
OLD = os.path.join(HERE, "..", "fixtures", "golden", "0.1.0-dc6b6c9")


def old(name):
    with open(os.path.join(OLD, name + ".msgpack"), "rb") as f:
        return msgpack.unpackb(f.read(), raw=False)


# The reply of that release to each request type it knew.
REPLIES = {
    "hello": "reply.welcome",
    "submit": "reply.accepted",
    "get": "reply.job",
    "list": "reply.jobs",
    "cancel": "reply.cancelled",
    "fetch": "reply.chunk",
    "workers": "reply.workers",
    "models": "reply.models",
    "health": "reply.health",
    "ping": "reply.pong",
}

# The keys that release's strict types knew: its `JobSpec` (the fields of its
# submit fixture, plus `workflow` and `template`, which the fixture leaves out as
# null), `LoraRef`, `InputFile` and `ListFilter`.
SUBMIT = old("request.submit")["job"]
JOB_KEYS = set(SUBMIT) | {"workflow", "template"}
LORA_KEYS = {"name", "strength"}
INPUT_KEYS = {"name", "media_type", "data"}
FILTER_KEYS = {"states", "backend", "client", "worker", "limit"}


def unknown_keys(body):
    """The first key of `body` that release refused, as a dotted field, or None."""
    job = body.get("job")
    if body.get("type") == "submit" and isinstance(job, dict):
        for k in job:
            if k not in JOB_KEYS:
                return f"job.{k}"
        for name, allowed in (("loras", LORA_KEYS), ("inputs", INPUT_KEYS)):
            for i, entry in enumerate(job.get(name) or []):
                for k in entry:
                    if k not in allowed:
                        return f"job.{name}[{i}].{k}"
    flt = body.get("filter")
    if body.get("type") == "list" and isinstance(flt, dict):
        for k in flt:
            if k not in FILTER_KEYS:
                return f"filter.{k}"
    return None


def error(req_id, code, message, field=None):
    err = {"code": code, "message": message}
    if field is not None:
        err["field"] = field
    return {"type": "error", "req_id": req_id, "error": err}


def answer(body):
    kind = body.get("type")
    req_id = body.get("req_id")
    if kind not in REPLIES:
        print(f"REFUSED unknown request type {kind!r}", file=sys.stderr, flush=True)
        return error(req_id, "unknown_type", f"unknown request type `{kind}`")
    field = unknown_keys(body)
    if field is not None:
        print(f"REFUSED unknown field {field}", file=sys.stderr, flush=True)
        return error(req_id, "invalid_field", f"unknown field `{field}`", field)
    reply = old(REPLIES[kind])
    reply["req_id"] = req_id
    return reply


def main():
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    print(f"tcp://127.0.0.1:{port}", flush=True)
    while True:
        frames = router.recv_multipart()
        if len(frames) != 3 or frames[1] != TAG:
            continue
        body = msgpack.unpackb(frames[2], raw=False)
        print(f"REQUEST {body.get('type')}", file=sys.stderr, flush=True)
        reply = answer(body)
        router.send_multipart([frames[0], TAG, msgpack.packb(reply, use_bin_type=True)])


if __name__ == "__main__":
    main()
