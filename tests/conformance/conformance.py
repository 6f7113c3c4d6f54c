#!/usr/bin/env python3
"""Kiln protocol conformance suite: plain pyzmq + msgpack, no Kiln code.

Written from docs/protocol.md alone, as a third-party client would be. It walks
every request type and every documented error code, including each case of
issue #12, against a real broker with sim workers (started by
broker/tests/conformance.rs, which also restarts the broker between the phases).

    conformance.py before STATE_FILE     # everything; remembers jobs in STATE_FILE
    conformance.py after STATE_FILE      # after a broker restart: idempotency, seq
    conformance.py auth STATE_FILE       # against a broker with a client token
    conformance.py store_full STATE_FILE # against a broker whose disk is full
                                         # (broker/tests/disk_full.rs)

With a client token (and no authenticating transport) the broker keeps its events
port closed, so the main phases run without one and `auth` checks the token rules.

Environment: KILN_BROKER, KILN_EVENTS, KILN_TOKEN. The broker is configured with
max_list = 5, max_queued_per_client = 6 and max_message_bytes = 2 MiB, and has two
sim workers with faults allowed.
"""

import hashlib
import json
import math
import os
import sys
import time
import uuid

import msgpack
import zmq

TAG = b"KILN1"
TERMINAL = {"succeeded", "failed", "cancelled"}
ctx = zmq.Context.instance()
FRONTEND = os.environ["KILN_BROKER"]
EVENTS = os.environ["KILN_EVENTS"]
TOKEN = os.environ.get("KILN_TOKEN")

passed = []
failed = []


def check(name, cond, detail=""):
    (passed if cond else failed).append(name)
    if not cond:
        print(f"FAIL {name}: {detail}", file=sys.stderr)


class Conn:
    """One DEALER connection; raw frames in and out."""

    def __init__(self, name=None, hello=True):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(FRONTEND)
        self.next_id = 100
        self.welcome = None
        if hello:
            fields = {"client": name} if name else {}
            if TOKEN:
                fields["token"] = TOKEN
            self.welcome = self.call("hello", **fields)

    def send_frames(self, frames):
        self.sock.send_multipart(frames)

    def recv(self, timeout_s=10.0):
        if not self.sock.poll(int(timeout_s * 1000)):
            raise TimeoutError("no reply")
        frames = self.sock.recv_multipart()
        assert frames[0] == TAG, frames
        return msgpack.unpackb(frames[1], raw=False)

    def raw(self, body_bytes, timeout_s=10.0):
        """Sends a body as given; returns the first reply."""
        self.send_frames([TAG, body_bytes])
        return self.recv(timeout_s)

    def call(self, kind, **fields):
        req_id = self.next_id
        self.next_id += 1
        body = dict(fields, type=kind, req_id=req_id)
        self.send_frames([TAG, msgpack.packb(body, use_bin_type=True)])
        while True:
            reply = self.recv()
            if reply.get("req_id") == req_id:
                return reply

    def close(self):
        self.sock.close()


def error_of(reply):
    return reply["error"] if reply.get("type") == "error" else {}


def expect_error(name, reply, code, field=None, limit=None):
    err = error_of(reply)
    ok = err.get("code") == code
    if field is not None:
        ok = ok and err.get("field") == field
    if limit is not None:
        ok = ok and err.get("limit") == limit
    check(name, ok, f"wanted {code} {field} {limit}, got {reply}")
    return err


def job(prompt="a kiln at dusk", **extra):
    j = {"backend": "sim", "task": "text_to_image", "params": {"prompt": prompt, "steps": 2, "width": 64, "height": 64}}
    j.update(extra)
    return j


def wait(conn, job_id, timeout_s=30.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        snap = conn.call("get", job_id=job_id)["job"]
        if snap["state"] in TERMINAL:
            return snap
        time.sleep(0.05)
    raise TimeoutError(f"{job_id} did not finish")


def frames_and_headers():
    c = Conn("frames")
    ping = msgpack.packb({"type": "ping", "req_id": 1})
    c.send_frames([b"HTTP/1.1", ping])
    expect_error("foreign tag is foreign_protocol", c.recv(), "foreign_protocol")
    c.send_frames([b"KILN9", ping])
    expect_error("another version is unsupported_version", c.recv(), "unsupported_version")
    c.send_frames([TAG])
    expect_error("one frame is malformed", c.recv(), "malformed")
    c.send_frames([b"", TAG, ping])
    err = expect_error("a REQ delimiter is malformed", c.recv(), "malformed")
    check("the REQ refusal says to use a DEALER", "DEALER" in err.get("message", ""), err)
    r = c.raw(b"\xc1\xc1\xc1")
    expect_error("not msgpack is malformed", r, "malformed")
    check("undecodable request gets req_id nil", r.get("req_id") is None, r)
    r = c.raw(msgpack.packb(["ping", 905]))
    expect_error("a positional array body is malformed", r, "malformed")
    r = c.raw(msgpack.packb({"type": "explode", "req_id": 3}))
    expect_error("unknown type", r, "unknown_type")
    check("unknown type echoes req_id", r.get("req_id") == 3, r)
    r = c.raw(msgpack.packb({"type": "ping", "req_id": "7"}))
    expect_error("a string req_id is invalid_field", r, "invalid_field", field="req_id")
    check("a string req_id is answered with req_id nil", r.get("req_id") is None, r)
    r = c.raw(msgpack.packb({"type": "ping", "req_id": 8, "future_key": True}))
    check("unknown top-level request keys are ignored", r.get("type") == "pong" and r.get("req_id") == 8, r)
    big = msgpack.packb({"type": "ping", "req_id": 9, "pad": b"x" * (3 << 20)}, use_bin_type=True)
    expect_error("a body over max_message_bytes", c.raw(big), "message_too_large")
    r = c.raw(msgpack.packb({"type": "submit", "req_id": 10, "job": ["sim", "text_to_image"]}))
    expect_error("a nested positional array is refused naming it", r, "invalid_field", field="job")
    c.close()


def authentication():
    if not TOKEN:
        return
    c = Conn(hello=False)
    r = c.call("ping")
    expect_error("no hello with a token configured", r, "unauthenticated")
    c.close()
    c = Conn(hello=False)
    r = c.call("hello", token="wrong", client="x")
    expect_error("a wrong token", r, "unauthenticated")
    c.close()


def hello_and_views():
    c = Conn("viewer")
    w = c.welcome
    check("welcome names the client", w.get("type") == "welcome" and w.get("client") == "viewer", w)
    limits = w.get("limits", {})
    check("welcome carries the limits in force", limits.get("max_list") == 5 and limits.get("max_queued_per_client") == 6, limits)
    feats = w.get("features", [])
    check("welcome lists the contract's features",
          {"idempotency_per_client", "list_cursor", "param_schemas"} <= set(feats), feats)
    r = c.call("hello", client="has space")
    err = expect_error("a bad client name", r, "invalid_field", field="client")
    check("the name rule states the configured limit", f"1 to {limits.get('max_label_len')} characters" in err.get("message", ""), err)
    check("ping", c.call("ping").get("type") == "pong")
    workers = c.call("workers")["workers"]
    check("two sim workers", len(workers) == 2, workers)
    schema = workers[0]["backends"][0].get("params") if workers else None
    names = {p["name"] for s in (schema or {}).get("sets", []) for p in s["params"]}
    check("workers describe their parameters", {"steps", "width", "seed", "fault"} <= names, schema)
    steps = [p for s in (schema or {}).get("sets", []) for p in s["params"] if p["name"] == "steps"]
    check("a parameter has type and range", steps and steps[0]["type"] == "integer" and steps[0]["max"] == 10000, steps)
    models = c.call("models")["models"]
    check("models lists the sim models", any(m["name"] == "sim-sd15" for m in models), models)
    h = c.call("health")["health"]
    check("health", h.get("workers_online") == 2 and isinstance(h.get("finished"), int), h)
    c.close()


def null_and_absent():
    c = Conn("nulls")
    nulls = dict(job("nulls"), model=None, loras=None, min_vram_mb=None, labels=None, priority=None,
                 queue_timeout_s=None, run_timeout_s=None, max_attempts=None, inputs=None,
                 workflow=None, template=None, idempotency_key=None, allow_degrade=None)
    r = c.call("submit", job=nulls)
    check("null for every optional job field is accepted", r.get("type") == "accepted", r)
    r = c.call("submit", job=dict(job(), params=None))
    check("params: null is accepted (no params)", r.get("type") == "accepted", r)
    r = c.call("list", filter=None)
    check("filter: null is no filter", r.get("type") == "jobs", r)
    r = c.call("list", filter={"states": None, "backend": None, "client": None, "worker": None, "limit": None})
    check("null filter keys are absent keys", r.get("type") == "jobs", r)
    # The sim workers have no LoRAs: a null strength decodes, then the LoRA itself
    # is refused at submit, as an unknown model is.
    r = c.call("submit", job=job(loras=[{"name": "ink", "strength": None}]))
    expect_error("loras[].strength: null is accepted; a LoRA no worker has is unschedulable",
                 r, "unschedulable", field="job.loras[0]")
    r = c.call("submit", job=job(template="no-such-template"))
    expect_error("a template no worker has is unschedulable", r, "unschedulable", field="job.template")
    c.close()


def field_errors():
    c = Conn("fields")
    bad = [
        ("missing backend names job.backend", {"task": "text_to_image"}, "invalid_field", "job.backend", None),
        ("a typo names the unknown key", job(priorty=3), "invalid_field", "job.priorty", None),
        ("params of the wrong type", dict(job(), params=7), "invalid_field", "job.params", None),
        ("priority out of range", job(priority=99), "invalid_field", "job.priority", 10),
        ("max_attempts out of range", job(max_attempts=11), "invalid_field", "job.max_attempts", 10),
        ("a zero timeout", job(run_timeout_s=0), "invalid_field", "job.run_timeout_s", None),
        ("a label with a space", job(labels=["a b"]), "invalid_field", "job.labels[0]", None),
        ("an input escaping its folder", job(inputs=[{"name": "../x", "data": b"1"}]), "invalid_field", "job.inputs[0].name", None),
        ("a prompt over its limit", job("x" * 20000), "field_too_large", "job.params.prompt", 16384),
        ("an unknown backend", job(backend="dalle"), "invalid_field", "job.backend", None),
        ("steps = abc", job(params={"prompt": "x", "steps": "abc"}), "invalid_field", "job.params.steps", None),
        ("width = 100000", job(params={"prompt": "x", "width": 100000}), "invalid_field", "job.params.width", None),
        ("a negative seed", job(params={"prompt": "x", "seed": -1}), "invalid_field", "job.params.seed", None),
        ("an unknown parameter", job(params={"prompt": "x", "stepz": 10}), "invalid_field", "job.params.stepz", None),
        ("a fault the sim does not know", job(params={"prompt": "x", "fault": "explode"}), "invalid_field", "job.params.fault", None),
    ]
    for name, j, code, field, limit in bad:
        expect_error(name, c.call("submit", job=j), code, field=field, limit=limit)
    for value in (math.nan, math.inf, -math.inf):
        r = c.call("submit", job=job(params={"prompt": "x", "steps": value}))
        expect_error(f"params steps = {value} is refused", r, "invalid_field", field="job.params.steps")
    r = c.call("submit", job=job(min_vram_mb=10_000_000))
    expect_error("a job no worker could run", r, "unschedulable")
    mine = c.call("list", filter={"client": "fields"})["jobs"]
    check("nothing refused was queued", mine == [], mine)
    r = c.call("get", job_id="j999999")
    expect_error("get of an unknown job", r, "not_found")
    r = c.call("get", job_id="job-1")
    expect_error("a malformed job id", r, "invalid_field", field="job_id")
    c.close()


def idempotency(state):
    alice, bob = Conn("alice"), Conn("bob")
    first = alice.call("submit", job=job("a fox", idempotency_key="1"))
    check("alice's first submit", first.get("type") == "accepted" and not first.get("duplicate"), first)
    alice2 = Conn("alice")
    again = alice2.call("submit", job=job("a fox", idempotency_key="1"))
    check("the same client's retry is the same job", again.get("job_id") == first.get("job_id") and again.get("duplicate") is True, again)
    other = bob.call("submit", job=job("a fox", idempotency_key="1"))
    check("another client's key is its own", other.get("type") == "accepted" and other.get("job_id") != first.get("job_id") and not other.get("duplicate"), other)
    r = alice.call("submit", job=job("a wolf", idempotency_key="1"))
    err = expect_error("the same key for another job", r, "idempotency_conflict", field="job.idempotency_key")
    check("the conflict names what differs", "job.params.prompt differs" in err.get("message", ""), err)
    r = alice.call("submit", job=job("a fox", idempotency_key="1"), client="alice")
    check("a submit may name its hello's client", r.get("job_id") == first.get("job_id") and r.get("duplicate") is True, r)
    r = alice.call("submit", job=job("a fox", idempotency_key="1"), client="bob")
    expect_error("a submit naming a client the connection is not logged in as", r, "unauthenticated")
    r = alice.call("submit", job=job("a fox", idempotency_key="1"), client="")
    expect_error("a submit naming no valid client name", r, "invalid_field", field="client")
    r = alice.call("ping")
    check("the connection still works after that refusal", r.get("type") == "pong", r)
    state["alice"] = first.get("job_id")
    state["bob"] = other.get("job_id")
    wait(alice, state["alice"])
    wait(bob, state["bob"])
    for conn in (alice, alice2, bob):
        conn.close()


def run_and_fetch(state):
    c = Conn("fetcher")
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(EVENTS)
    sub.setsockopt(zmq.SUBSCRIBE, b"job/")
    # A SUB's subscription reaches the PUB asynchronously and PUB is lossy (the
    # doc's Clone pattern): run the job again until its events are seen.
    for _ in range(20):
        acc = c.call("submit", job=job("fetch me", params={"prompt": "fetch me", "steps": 3, "width": 96, "height": 64},
                                       run_timeout_s=120, allow_degrade=True))
        job_id = acc["job_id"]
        snap = wait(c, job_id)
        seqs, ended = [], False
        while sub.poll(1000):
            topic, header, raw = sub.recv_multipart()
            ev = msgpack.unpackb(raw, raw=False)
            if ev.get("job_id") == job_id:
                check("event topics are job/<id>/...", topic.decode().startswith(f"job/{job_id}/"), topic)
                seqs.append(ev["seq"])
            if ev.get("state") in TERMINAL and ev.get("job_id") == job_id:
                ended = True
                break
        if ended:
            break
    check("the job succeeds", snap["state"] == "succeeded", snap)
    check("the snapshot counts tries", snap.get("tries") == 1 and snap.get("attempt") >= 1, snap)
    check("a get reply says how the job was asked for",
          snap.get("options") == {"run_timeout_s": 120, "allow_degrade": True} and snap["params"]["width"] == 96,
          (snap.get("options"), snap.get("params")))
    check("events were published with increasing seq", seqs == sorted(seqs) and len(seqs) >= 1, seqs)
    check("the snapshot's seq is the last event's", snap["seq"] == max(seqs or [-1]), (snap["seq"], seqs))
    sub.close()
    art = snap["artifacts"][0]
    expect_error("fetch max_len 0", c.call("fetch", artifact_id=art["id"], max_len=0), "invalid_field", field="max_len")
    expect_error("fetch past the end", c.call("fetch", artifact_id=art["id"], offset=art["size"] + 1), "invalid_field", field="offset")
    data, offset = b"", 0
    while True:
        ch = c.call("fetch", artifact_id=art["id"], offset=offset, max_len=1000)
        data += ch["data"]
        offset += len(ch["data"])
        if ch["eof"]:
            break
    check("chunks add up to the artifact", len(data) == art["size"] and hashlib.sha256(data).hexdigest() == art["sha256"], art)
    whole = c.call("fetch", artifact_id=art["id"])
    check("fetch defaults: from 0, up to max_chunk_bytes", whole.get("offset") == 0 and whole.get("data") == data and whole.get("eof"), whole.get("offset"))
    expect_error("fetch of an unknown artifact", c.call("fetch", artifact_id=f"{job_id}.9"), "not_found")
    expect_error("cancel a finished job", c.call("cancel", job_id=job_id), "invalid_state")
    # resubmit: the broker's copy of the whole job, as a new job of this client.
    check("welcome lists resubmit", "resubmit" in c.welcome.get("features", []), c.welcome)
    again = c.call("resubmit", job_id=job_id, idempotency_key="again-1")
    check("resubmit makes a new job", again.get("type") == "accepted" and again.get("job_id") != job_id and not again.get("duplicate"), again)
    twice = c.call("resubmit", job_id=job_id, idempotency_key="again-1")
    check("a resubmit retried with its key is the same job", twice.get("job_id") == again.get("job_id") and twice.get("duplicate") is True, twice)
    copy = wait(c, again["job_id"])
    check("the copy has the job's parameters", copy.get("params") == snap.get("params") and copy["state"] == "succeeded", copy)
    check("the copy's history says where it came from", copy["history"][0]["note"] == f"resubmitted from {job_id}", copy["history"][0])
    expect_error("resubmit of an unknown job", c.call("resubmit", job_id="j999999"), "not_found")
    state["finished"] = {"job_id": job_id, "seq": snap["seq"]}
    c.close()


def paging():
    c = Conn("pager")
    ids = [c.call("submit", job=job(f"page {i}", params={"prompt": f"page {i}", "steps": 0, "count": 0}))["job_id"] for i in range(12)]
    for i in ids:
        wait(c, i)
    seen, cursor, pages = [], None, 0
    while True:
        fields = {"filter": {"client": "pager"}}
        if cursor:
            fields["cursor"] = cursor
        r = c.call("list", **fields)
        pages += 1
        check("a page holds at most max_list jobs", len(r["jobs"]) <= 5, len(r["jobs"]))
        seen += [j["job_id"] for j in r["jobs"]]
        cursor = r.get("next_cursor")
        if not cursor or pages > 10:
            break
    check("paging walks every job once, newest first", seen == list(reversed(ids)), (seen, ids))
    check("12 jobs in 3 pages of 5", pages == 3, pages)
    expect_error("a cursor not from a reply", c.call("list", cursor="page-2"), "invalid_field", field="cursor")
    expect_error("filter limit 0", c.call("list", filter={"limit": 0}), "invalid_field", field="filter.limit")
    expect_error("an unknown filter key", c.call("list", filter={"colour": "red"}), "invalid_field", field="filter.colour")
    c.close()


def queue_full_and_cancel():
    c = Conn("filler")
    hung = [c.call("submit", job=job("hang", params={"prompt": "hang", "fault": "hang"}))["job_id"] for _ in range(2)]
    deadline = time.time() + 10
    while time.time() < deadline and not all(c.call("get", job_id=j)["job"]["state"] == "running" for j in hung):
        time.sleep(0.05)
    queued = [c.call("submit", job=job(f"q{i}"))["job_id"] for i in range(6)]
    r = c.call("submit", job=job("one too many"))
    expect_error("a client's queue over its limit", r, "queue_full", limit=6)
    r = c.call("cancel", job_id=queued[0])
    check("cancel of a queued job is immediate", r.get("state") == "cancelled", r)
    r = c.call("cancel", job_id=queued[0])
    check("cancelling a cancelled job is not an error", r.get("state") == "cancelled", r)
    # The queued ones first: a worker freed by a cancel would take the next.
    for j in queued[1:]:
        c.call("cancel", job_id=j)
    r = c.call("cancel", job_id=hung[0])
    check("cancel of a running job waits for its worker", r.get("state") == "running", r)
    snap = c.call("get", job_id=hung[0])["job"]
    check("the running job shows cancel_requested", snap.get("cancel_requested") is True, snap)
    c.call("cancel", job_id=hung[1])
    for j in hung + queued:
        check(f"{j} ends cancelled", wait(c, j)["state"] == "cancelled")
    c.close()


def after_restart(state):
    alice, bob = Conn("alice"), Conn("bob")
    r = alice.call("submit", job=job("a fox", idempotency_key="1"))
    check("after a restart the retry is still the same job", r.get("job_id") == state["alice"] and r.get("duplicate") is True, r)
    r = bob.call("submit", job=job("a fox", idempotency_key="1"))
    check("after a restart bob's key is still his", r.get("job_id") == state["bob"] and r.get("duplicate") is True, r)
    r = alice.call("submit", job=job("a wolf", idempotency_key="1"))
    expect_error("after a restart a conflict is still a conflict", r, "idempotency_conflict")
    fin = state["finished"]
    snap = alice.call("get", job_id=fin["job_id"])["job"]
    check("a finished job's seq survives the restart", snap["seq"] == fin["seq"], (snap["seq"], fin))
    h = alice.call("health")["health"]
    check("health.finished survives the restart", h["finished"] >= state["finished_count"], (h, state["finished_count"]))
    alice.close()
    bob.close()


def store_full():
    """`unavailable`: the broker's store cannot write; writes are refused with the
    cause, reads are answered."""
    c = Conn("disk-full")
    r = c.call("submit", job=job("no room", idempotency_key=f"full-{uuid.uuid4()}"))
    err = expect_error("a submit while the store cannot write is unavailable", r, "unavailable")
    check("unavailable names the cause", "No space left on device" in err.get("message", ""), err)
    check("list is answered during the outage", c.call("list").get("type") == "jobs")
    check("health is answered during the outage", c.call("health").get("type") == "health")
    c.close()


def main():
    phase, state_file = sys.argv[1], sys.argv[2]
    if phase == "before":
        state = {}
        frames_and_headers()
        hello_and_views()
        null_and_absent()
        field_errors()
        idempotency(state)
        run_and_fetch(state)
        paging()
        queue_full_and_cancel()
        c = Conn("counter")
        state["finished_count"] = c.call("health")["health"]["finished"]
        c.close()
        with open(state_file, "w") as f:
            json.dump(state, f)
    elif phase == "auth":
        authentication()
    elif phase == "store_full":
        store_full()
    else:
        with open(state_file) as f:
            state = json.load(f)
        after_restart(state)
    print(f"{phase}: {len(passed)} checks passed, {len(failed)} failed")
    if failed:
        print("failed: " + "; ".join(failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
