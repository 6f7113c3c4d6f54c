#!/usr/bin/env python3
"""Submit a job to a Kiln broker, follow its progress, download its outputs.

Plain pyzmq + msgpack, no Kiln code: everything here follows docs/protocol.md.

    pip install pyzmq msgpack
    python examples/submit.py --prompt "a kiln at dusk" --out outputs/

Environment: KILN_BROKER (default tcp://127.0.0.1:5555), KILN_EVENTS
(default tcp://127.0.0.1:5557), KILN_TOKEN (when the broker requires one).
With CURVE (docs/security.md): KILN_BROKER_KEY (the broker's public key, Z85 or
its `.key` file) and KILN_CURVE_KEY (this client's `.key_secret` file from
`kiln keys generate`, its public key listed in broker.curve_client_keys).
"""

import argparse
import hashlib
import os
import sys
import time
import uuid

import msgpack
import zmq

TAG = b"KILN1"
TERMINAL = {"succeeded", "failed", "cancelled"}


class Broker:
    """A DEALER to the broker's frontend. Every request carries a req_id that the
    reply echoes; this simple client has one request in flight at a time.

    A login belongs to one connection. When the broker answers `unauthenticated` to
    a request after a successful `hello` (it restarted, and the DEALER reconnected
    underneath), the client opens a fresh connection, says `hello` again and resends
    the request, as docs/protocol.md says a client must."""

    def __init__(self, ctx, endpoint, timeout_s=15.0, curve=None):
        self.ctx = ctx
        self.curve = curve
        self.endpoint = endpoint
        self.timeout_ms = int(timeout_s * 1000)
        self.next_id = 1
        self.hello = None
        self.sock = None
        self._connect()

    def _connect(self):
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = self.ctx.socket(zmq.DEALER)
        if self.curve:
            self.curve(self.sock)
        # Never set ZMQ_HEARTBEAT_* options: the broker's zeromq stack treats ZMTP
        # PINGs as errors. Liveness is handled by the protocol itself.
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)

    def login(self, **hello):
        """Says `hello` (with the token, if any) and remembers it for re-logins."""
        self.hello = hello
        return self._call("hello", hello)

    def request(self, kind, **fields):
        try:
            return self._call(kind, fields)
        except BrokerError as e:
            if e.code != "unauthenticated" or self.hello is None:
                raise
        except TimeoutError:
            # A request in flight when the broker died is lost with it. Reads are
            # safe to repeat and a submit carries its idempotency key, so resend
            # once on a fresh connection.
            if self.hello is None:
                raise
        # The broker forgot this connection's login (or it restarted): log in
        # again and resend once.
        self._connect()
        self._call("hello", self.hello)
        return self._call(kind, fields)

    def _call(self, kind, fields):
        req_id = self.next_id
        self.next_id += 1
        body = dict(fields, type=kind, req_id=req_id)
        self.sock.send_multipart([TAG, msgpack.packb(body, use_bin_type=True)])
        while True:
            if not self.sock.poll(self.timeout_ms):
                raise TimeoutError(f"no reply to {kind} within {self.timeout_ms} ms")
            header, raw = self.sock.recv_multipart()
            if header != TAG:
                raise RuntimeError(f"unexpected header {header!r}")
            reply = msgpack.unpackb(raw, raw=False)
            if reply.get("req_id") != req_id:
                continue  # a late reply to an earlier request
            if reply["type"] == "error":
                raise BrokerError(reply["error"])
            return reply


class BrokerError(RuntimeError):
    """A typed error reply: `code`, `message` and the offending `field`, if any."""

    def __init__(self, err):
        self.code = err["code"]
        self.field = err.get("field")
        super().__init__(f"{err['code']}: {err['message']} (field {self.field})")


def submit(broker, job, tries=6):
    """Submits, retrying with the same idempotency key while the broker is away or
    `unavailable` (its store cannot write): a retry never creates a second job."""
    delay = 1.0
    for attempt in range(tries):
        try:
            # `client` repeats hello's name: a broker that restarted (and forgot
            # the login) answers `unauthenticated` instead of filing the job under
            # another name, where its idempotency key would not match.
            return broker.request("submit", job=job, client=(broker.hello or {}).get("client"))
        except (TimeoutError, BrokerError) as e:
            retryable = isinstance(e, TimeoutError) or e.code == "unavailable"
            if not retryable or attempt == tries - 1:
                raise
            print(f"submit not taken yet ({e}); retrying in {delay:.0f} s", file=sys.stderr)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


def follow(broker, sub, job_id, resync_s=1.0):
    """Yields snapshots of the job until it ends. Events carry a per-job seq; a gap
    or a quiet spell is repaired with a `get` snapshot (the Clone pattern)."""
    snap = broker.request("get", job_id=job_id)["job"]
    yield snap
    while snap["state"] not in TERMINAL:
        if sub.poll(int(resync_s * 1000)):
            topic, header, raw = sub.recv_multipart()
            event = msgpack.unpackb(raw, raw=False)
            seq = event.get("seq", 0)
            if seq <= snap["seq"]:
                continue
            if seq == snap["seq"] + 1 and event["type"] == "job_progress":
                snap["seq"] = seq
                snap["progress"] = {k: event.get(k) for k in ("pct", "step", "steps", "stage")}
                yield snap
                continue
        # A state change, a gap, or silence: take the broker's snapshot.
        fresh = broker.request("get", job_id=job_id)["job"]
        if fresh["seq"] > snap["seq"]:
            snap = fresh
            yield snap


def download(broker, artifact, out_dir):
    """Fetches an artifact chunk by chunk and checks its sha256."""
    data = bytearray()
    digest = hashlib.sha256()
    while True:
        chunk = broker.request("fetch", artifact_id=artifact["id"], offset=len(data))
        data += chunk["data"]
        digest.update(chunk["data"])
        if chunk["eof"]:
            break
    if digest.hexdigest() != artifact["sha256"]:
        raise RuntimeError(f"sha256 mismatch for {artifact['id']}")
    path = os.path.join(out_dir, artifact["name"])
    with open(path, "wb") as f:
        f.write(data)
    return path


def curve_setup(broker_key, secret_file):
    """Returns a function that makes a socket a CURVE client, or None."""
    if not broker_key:
        return None
    import zmq.auth

    if os.path.exists(broker_key):
        broker_key = zmq.auth.load_certificate(broker_key)[0]
    public, secret = zmq.auth.load_certificate(secret_file)

    def apply(sock):
        sock.curve_serverkey = broker_key.encode() if isinstance(broker_key, str) else broker_key
        sock.curve_publickey = public
        sock.curve_secretkey = secret

    return apply


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default=os.environ.get("KILN_BROKER", "tcp://127.0.0.1:5555"))
    p.add_argument("--events", default=os.environ.get("KILN_EVENTS", "tcp://127.0.0.1:5557"))
    p.add_argument("--token", default=os.environ.get("KILN_TOKEN"))
    p.add_argument("--broker-key", default=os.environ.get("KILN_BROKER_KEY"))
    p.add_argument("--key", default=os.environ.get("KILN_CURVE_KEY"))
    p.add_argument("--backend", default="sim")
    p.add_argument("--task", default="text_to_image")
    p.add_argument("--prompt", default="a kiln glowing at dusk")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=".")
    args = p.parse_args()

    ctx = zmq.Context()
    curve = curve_setup(args.broker_key, args.key)
    broker = Broker(ctx, args.broker, curve=curve)
    hello = {"client": "submit-py"}
    if args.token:
        hello["token"] = args.token
    welcome = broker.login(**hello)
    print(f"connected to kiln {welcome['version']} as {welcome['client']}", file=sys.stderr)

    job = {
        "backend": args.backend,
        "task": args.task,
        "params": {"prompt": args.prompt, "steps": args.steps, "seed": args.seed},
        # A retry of this submit with the same key (from the same client name, see
        # hello) returns the same job; the same key with another job is an
        # `idempotency_conflict` error.
        "idempotency_key": str(uuid.uuid4()),
    }
    accepted = submit(broker, job)
    job_id = accepted["job_id"]
    print(f"submitted {job_id}", file=sys.stderr)

    sub = ctx.socket(zmq.SUB)
    if curve:
        curve(sub)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(args.events)
    sub.setsockopt_string(zmq.SUBSCRIBE, f"job/{job_id}/")

    started = time.monotonic()
    last = None
    for snap in follow(broker, sub, job_id):
        prog = snap.get("progress") or {}
        line = f"{job_id} {snap['state']:>9} seq={snap['seq']} {prog.get('pct', 0):5.1f}% {prog.get('stage', '')}"
        if line != last:
            print(line, file=sys.stderr)
            last = line
    if snap["state"] != "succeeded":
        err = snap.get("error") or {}
        print(f"{job_id} {snap['state']}: {err.get('message', '')}", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    for artifact in snap["artifacts"]:
        path = download(broker, artifact, args.out)
        print(path)
    print(f"done in {time.monotonic() - started:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
