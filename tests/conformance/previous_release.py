#!/usr/bin/env python3
"""The previous release's client and worker, as the bytes it sends, against this broker.

The previous release (0.1.0, main at dc6b6c9, before the contract of issue #12)
cannot be built here, so its peers are played from its golden fixtures
(tests/fixtures/golden/0.1.0-dc6b6c9/): a worker registers with the release's own
`register` bytes and beats with its `heartbeat`; a client says `hello` and submits
the release's own `submit` bytes; the worker answers the `assign` with the
release's `upload` and `finished` (job id, attempt and hash filled in); the client
then sends every other request of that release (`get`, `list`, `fetch`,
`workers`, `models`, `health`, `ping`, `cancel`). Each answer must be one the
release can read: a message type it knows, the fields it requires (its types
without a default), no unknown key where it refused them (`limits` in `welcome`,
the spec in `assign`), and values of the kinds it reads. Plain pyzmq + msgpack.

Environment: KILN_BROKER, KILN_BACKEND (worker endpoint). The broker has
client token `secret` and worker token `worker-secret`, as the fixtures carry.
"""

import hashlib
import os
import sys
import time

import msgpack
import zmq

TAG = b"KILN1"
HERE = os.path.dirname(os.path.abspath(__file__))
OLD = os.path.join(HERE, "..", "fixtures", "golden", "0.1.0-dc6b6c9")
ctx = zmq.Context.instance()

passed, failed = [], []


def check(name, cond, detail=""):
    (passed if cond else failed).append(name)
    if not cond:
        print(f"FAIL {name}: {detail}", file=sys.stderr)


def raw(name):
    with open(os.path.join(OLD, name + ".msgpack"), "rb") as f:
        return f.read()


def old(name):
    return msgpack.unpackb(raw(name), raw=False)


# What the previous release requires in each message it reads (its fields
# without a serde default), by message type; nested under "job"/"jobs"/... as
# dotted paths, `[]` for every element.
SNAPSHOT = ["job_id", "seq", "state", "backend", "task", "priority", "client",
            "attempt", "max_attempts", "created_ms"]
REQUIRED = {
    "registered": ["heartbeat_ms", "liveness", "chunk_bytes"],
    "assign": ["job_id", "attempt", "job", "job.backend", "job.task"],
    "result_ack": ["job_id", "attempt"],
    "heartbeat": [],
    "welcome": ["req_id", "version", "client", "limits"],
    "accepted": ["req_id", "job_id", "state"],
    "job": ["req_id", "job"] + ["job." + k for k in SNAPSHOT],
    "jobs": ["req_id", "jobs"] + ["jobs[]." + k for k in SNAPSHOT],
    "chunk": ["req_id", "artifact_id", "offset", "total", "sha256", "media_type",
              "name", "data", "eof"],
    "workers": ["req_id", "workers"] + ["workers[]." + k for k in [
        "worker_id", "hostname", "state", "gpu", "backends", "labels", "jobs_done",
        "last_seen_ms", "version"]],
    "models": ["req_id", "models"],
    "health": ["req_id", "health"] + ["health." + k for k in [
        "version", "uptime_s", "durable", "workers_online", "workers_idle",
        "workers_busy", "workers_unhealthy", "queued", "running", "finished",
        "protocol_errors"]],
    "pong": ["req_id"],
    "cancelled": ["req_id", "job_id", "state"],
    "error": ["error", "error.code", "error.message"],
}
# Where the previous release refused unknown keys.
STRICT = {"welcome": ["limits"], "assign": ["job", "job.loras[]", "job.inputs[]"]}
# The sample of each type the previous release wrote.
SAMPLE = {
    "registered": "broker.registered", "assign": "broker.assign",
    "result_ack": "broker.result_ack", "heartbeat": "broker.heartbeat",
    "welcome": "reply.welcome", "accepted": "reply.accepted", "job": "reply.job",
    "jobs": "reply.jobs", "chunk": "reply.chunk", "workers": "reply.workers",
    "models": "reply.models", "health": "reply.health", "pong": "reply.pong",
    "cancelled": "reply.cancelled", "error": "reply.error",
}


def at(value, path):
    """The values at a dotted path (`jobs[].seq`); a list of matches."""
    found = [value]
    for part in path.split("."):
        many = part.endswith("[]")
        key = part[:-2] if many else part
        nxt = []
        for v in found:
            if isinstance(v, dict) and key in v:
                nxt.extend(v[key] if many and isinstance(v[key], list) else [v[key]])
        found = nxt
    return found


def kind(v):
    if v is None:
        return "nil"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "str"
    if isinstance(v, bytes):
        return "bin"
    if isinstance(v, list):
        return "list"
    return "map"


def shape_problems(sample, value, path, strict):
    out = []
    if sample is None or value is None:
        return out
    ks, kv = kind(sample), kind(value)
    if ks == "float" and kv == "int":
        return out
    if ks != kv:
        return [f"{path or 'message'} was {ks}, is {kv}"]
    if ks == "map":
        if path in strict:
            extra = sorted(set(value) - set(sample))
            if extra:
                out.append(f"unknown keys {extra} in {path}, which the previous release refuses")
        for k in set(sample) & set(value):
            out += shape_problems(sample[k], value[k], f"{path}.{k}" if path else k, strict)
    if ks == "list" and sample and value:
        for item in value:
            out += shape_problems(sample[0], item, f"{path}[]", strict)
    return out


def readable(msg, where):
    """Whether the previous release can read `msg`; records the check."""
    t = msg.get("type")
    if t not in SAMPLE:
        check(f"{where}: type {t!r} known to the previous release", False, msg)
        return False
    missing = [p for p in REQUIRED[t] if not at(msg, p)]
    problems = shape_problems(old(SAMPLE[t]), msg, "", STRICT.get(t, []))
    ok = not missing and not problems
    check(f"{where}: `{t}` readable by the previous release", ok,
          f"missing {missing}, {problems}: {msg}")
    return ok


def recv(sock, timeout_ms=10_000):
    if not sock.poll(timeout_ms):
        return None
    frames = sock.recv_multipart()
    if frames[0] != TAG:
        return {"type": "?", "frames": frames}
    return msgpack.unpackb(frames[1], raw=False)


def send(sock, body):
    sock.send_multipart([TAG, body if isinstance(body, bytes) else msgpack.packb(body, use_bin_type=True)])


def main():
    worker = ctx.socket(zmq.DEALER)
    worker.setsockopt(zmq.LINGER, 0)
    worker.connect(os.environ["KILN_BACKEND"])
    send(worker, raw("worker.register"))  # the release's bytes, unchanged
    reg = recv(worker)
    check("the previous worker's register is answered", reg is not None and reg.get("type") == "registered", reg)
    if reg is None:
        return
    readable(reg, "register")
    beat = old("worker.heartbeat")
    beat["current"] = None
    last_beat = time.monotonic()
    beats_checked = False

    def worker_step(timeout_ms=200):
        """Beats like the release did; returns the next message that is not a beat."""
        nonlocal last_beat, beats_checked
        if time.monotonic() - last_beat > 0.3:
            send(worker, beat)
            last_beat = time.monotonic()
        msg = recv(worker, timeout_ms)
        if msg is not None and msg.get("type") == "heartbeat":
            if not beats_checked:
                readable(msg, "heartbeat")
                beats_checked = True
            return None
        return msg

    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(os.environ["KILN_BROKER"])
    send(client, raw("request.hello"))
    welcome = recv(client)
    check("the previous client's hello is welcomed", welcome is not None and welcome.get("type") == "welcome", welcome)
    if welcome is None:
        return
    readable(welcome, "hello")
    send(client, raw("request.submit"))
    accepted = recv(client)
    check("the previous client's submit is accepted", accepted is not None and accepted.get("type") == "accepted", accepted)
    if not accepted or accepted.get("type") != "accepted":
        return
    readable(accepted, "submit")
    job_id = accepted["job_id"]

    # The assignment, and the release's own result for it.
    assign = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and assign is None:
        msg = worker_step()
        if msg is not None and msg.get("type") == "assign":
            assign = msg
        elif msg is not None and msg.get("type") == "result_ack":
            readable(msg, "unacked result")  # the fixture's stale `unacked` j42
    check("the previous worker gets the previous client's job", assign is not None and assign.get("job_id") == job_id, assign)
    if assign is None:
        return
    readable(assign, "assign")
    check("the spec arrives as the previous client sent it",
          assign["job"].get("params") == old("request.submit")["job"]["params"]
          and assign["job"].get("inputs", [{}])[0].get("data") == b"\x89PNG", assign["job"])
    attempt = assign["attempt"]
    beat["current"] = {"job_id": job_id, "attempt": attempt}
    upload = old("worker.upload")
    upload.update(job_id=job_id, attempt=attempt)
    send(worker, upload)
    finished = old("worker.finished")
    finished.update(job_id=job_id, attempt=attempt)
    finished["outcome"]["outputs"][0]["sha256"] = hashlib.sha256(upload["data"]).hexdigest()
    send(worker, finished)
    ack = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and ack is None:
        msg = worker_step()
        if msg is not None and msg.get("type") == "result_ack" and msg.get("job_id") == job_id:
            ack = msg
    check("the previous worker's result is acknowledged", ack is not None, ack)
    if ack is not None:
        readable(ack, "finished")
    beat["current"] = None

    # Every other request of the release, its ids pointed at this job.
    def ask(name, **changes):
        req = old(name)
        req.update(changes)
        send(client, req)
        while True:
            reply = recv(client)
            worker_step(0)
            if reply is None or reply.get("req_id") == req["req_id"]:
                return reply

    job = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        job = ask("request.get", job_id=job_id)
        if job and job.get("type") == "job" and job["job"]["state"] == "succeeded":
            break
        time.sleep(0.1)
    check("the previous client sees its job succeed", job and job.get("job", {}).get("state") == "succeeded", job)
    if job:
        readable(job, "get")
    art = f"{job_id}.0"
    chunk = ask("request.fetch", artifact_id=art)
    check("the previous client fetches the previous worker's output",
          chunk is not None and chunk.get("data") == b"\x01\x02\x03\x04", chunk)
    if chunk:
        readable(chunk, "fetch")
    listed = ask("request.list", filter={**old("request.list")["filter"], "states": ["succeeded"]})
    check("the previous client's list finds the job",
          listed is not None and any(j.get("job_id") == job_id for j in listed.get("jobs", [])), listed)
    if listed:
        readable(listed, "list")
    for name in ["request.workers", "request.models", "request.health", "request.ping"]:
        reply = ask(name)
        check(f"{name} is answered", reply is not None, reply)
        if reply:
            readable(reply, name)
    cancelled = ask("request.cancel", job_id=job_id)
    check("a cancel of a finished job gets an answer the release reads", cancelled is not None, cancelled)
    if cancelled:
        readable(cancelled, "cancel")
    send(worker, raw("worker.goodbye"))


main()
print(f"previous release: {len(passed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
