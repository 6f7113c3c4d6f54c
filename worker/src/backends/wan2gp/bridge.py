#!/usr/bin/env python3
"""Kiln's Wan2GP bridge: one long-lived WanGP session driven over JSON lines.

The Kiln worker embeds this script, writes it out at start and runs it with
Wan2GP's own Python:

    python kiln_wan2gp_bridge.py --root /opt/Wan2GP --config-dir DIR --output-dir DIR
        --ipc-fd 3 [--heartbeat-s 5] [--progress-interval-s 0.5] -- <Wan2GP flags>

It uses WanGP's in-process API (`shared.api`), so the loaded model stays warm
between jobs while they use the same model type, profile and config. It runs one
job at a time; queueing belongs to the worker.

Channels. Commands arrive on stdin, one JSON object per line. Messages go out on
the private descriptor given by --ipc-fd, never through sys.stdout: WanGP swaps
sys.stdout and sys.stderr for the whole process during jobs, and C extensions,
CUDA and ffmpeg write straight to descriptor 1. Descriptor 1 is pointed at
stderr before WanGP is imported, so all stray output lands in the worker's log.

Every message has "v": 1 and a "type"; unknown fields and types are ignored.
Previews are not forwarded: `want_preview` is accepted and ignored for now.

  worker -> bridge: submit {job_id, settings, want_preview}, cancel {job_id},
      query {req_id, op, args} (op: list_models, model_schema, default_settings,
      list_loras, availability, model_info, inventory), warmup {job_id, model_type},
      unload {req_id}, ping {req_id}, shutdown {grace_s}.
  bridge -> worker: ready, init_failed, accepted, rejected, progress, status,
      info, log, cancel_ack, result, error, cancelled (exactly one of the last
      three after each accepted), heartbeat, reply, pong, bye.

Kiln uses WanGP by DeepBeepMeep under the WanGP Community License.
"""

import argparse
import collections
import io
import json
import os
import random
import re
import sys
import threading
import time
import traceback

PROTOCOL = 1
OOM_TEXTS = ("unsufficient VRAM", "unsufficient RAM", "out of memory")
FATAL_TEXTS = ("illegal memory access", "device-side assert", "CUDA error")
CANCELLED_TEXT = "Generation was cancelled"
BUSY_TEXT = "already has a generation in progress"
LOG_LINES_PER_S = 20
TAIL_LINES = 40


class Channel:
    """The protected descriptor messages travel on; safe to use from any thread."""

    def __init__(self, fd):
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, type_, **fields):
        msg = {"v": PROTOCOL, "type": type_}
        msg.update(fields)
        data = (json.dumps(msg, default=str, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            view = memoryview(data)
            try:
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
            except (BrokenPipeError, OSError):
                # The worker is gone; nobody is left to report to.
                os._exit(0)


def jsonable(value, depth=0):
    """Plain JSON data from WanGP's records (anything else becomes a string)."""
    if depth > 20:
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v, depth + 1) for v in value]
    return str(value)


def rss_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def counter(pattern, text):
    m = re.search(pattern, text or "")
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


class Active:
    """The job in flight."""

    def __init__(self, job_id, job, settings):
        self.job_id = job_id
        self.job = job
        self.settings = settings
        self.started = time.monotonic()
        self.cancel_requested = False
        self.last_phase = None
        self.last_progress = 0.0
        self.tail = collections.deque(maxlen=TAIL_LINES)
        self.log_window = 0.0
        self.log_count = 0
        self.log_dropped = 0


class Bridge:
    def __init__(self, chan, api, session, args):
        self.chan = chan
        self.api = api
        self.session = session
        self.args = args
        self.lock = threading.Lock()
        self.active = None
        self.unloaded = False
        self.idle = threading.Event()
        self.idle.set()

    # ----- facts -------------------------------------------------------------

    def loaded_model(self):
        # `transformer_type` alone is not the truth: WanGP sets it at import
        # (the last model of its config, or "t2v") and release_model() leaves it.
        # Weights are on the GPU only while `wan_model` is set.
        if self.unloaded:
            return None
        wgp = sys.modules.get("wgp")
        if wgp is None or getattr(wgp, "wan_model", None) is None:
            return None
        value = getattr(wgp, "transformer_type", None)
        return str(value) if value else None

    def ready_info(self):
        wgp = sys.modules.get("wgp")
        info = {
            "wangp_version": getattr(wgp, "WanGP_version", None),
            "settings_version": getattr(wgp, "settings_version", None),
            "pid": os.getpid(),
            "cuda_device_name": None,
            "vram_total_mb": None,
            "cli_args": list(self.args.cli_args),
        }
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_available():
                info["cuda_device_name"] = torch.cuda.get_device_name(0)
                info["vram_total_mb"] = torch.cuda.get_device_properties(0).total_memory // (1024 * 1024)
        except Exception:
            pass
        return info

    # ----- commands ----------------------------------------------------------

    def serve(self, stdin):
        handlers = {
            "submit": self.on_submit,
            "cancel": self.on_cancel,
            "query": self.on_query,
            "warmup": self.on_warmup,
            "unload": self.on_unload,
            "ping": self.on_ping,
            "shutdown": self.on_shutdown,
        }
        for raw in stdin:
            line = raw.strip()
            if not line:
                continue
            try:
                cmd = json.loads(line)
            except ValueError:
                log("ignoring a command that is not JSON: %r" % line[:200])
                continue
            handler = handlers.get(cmd.get("type")) if isinstance(cmd, dict) else None
            if handler is None:
                log("ignoring an unknown command: %r" % (cmd.get("type") if isinstance(cmd, dict) else cmd))
                continue
            try:
                handler(cmd)
            except Exception:
                log("command %s failed:\n%s" % (cmd.get("type"), traceback.format_exc()))
                if "req_id" in cmd:
                    self.chan.send("reply", req_id=cmd["req_id"], error="bridge error: %s" % traceback.format_exc(limit=1))
        # End of input: the worker is gone. Stop the job and leave.
        self.stop(grace=0)

    def on_submit(self, cmd):
        job_id = str(cmd.get("job_id") or "")
        settings = cmd.get("settings")
        if not job_id or not isinstance(settings, dict) or not settings.get("model_type"):
            self.chan.send("rejected", job_id=job_id, reason="bad_request",
                           message="submit needs a job_id and settings with a model_type")
            return
        self.start_job(job_id, dict(settings))

    def prepare(self, job_id, settings):
        # The test double reads `_fake`; a real WanGP must never see it.
        if not getattr(self.api, "KILN_TEST_DOUBLE", False):
            settings.pop("_fake", None)
        # "PG" (WanGP's default) turns every paragraph into its own generation,
        # which the API rejects for a single task: keep blank lines in one prompt.
        settings.setdefault("multi_prompts_gen_type", "FG")
        settings["client_id"] = job_id
        settings.setdefault("output_filename", job_id)
        if settings.get("seed") in (None, -1):
            settings["seed"] = random.randint(0, 2**31 - 1)
        return settings

    def start_job(self, job_id, settings):
        with self.lock:
            if self.active is not None:
                self.chan.send("rejected", job_id=job_id, reason="busy",
                               message="job %s is still running" % self.active.job_id)
                return
            settings = self.prepare(job_id, settings)
            try:
                job = self.session.submit_task(settings)
            except (TypeError, ValueError) as e:
                self.chan.send("rejected", job_id=job_id, reason="bad_request", message=str(e))
                return
            except Exception as e:
                # Every submit gets an answer: anything else would leave the
                # worker waiting out its stall watchdog. Only WanGP's own
                # one-job-at-a-time RuntimeError means busy.
                busy = isinstance(e, RuntimeError) and BUSY_TEXT in str(e)
                self.chan.send("rejected", job_id=job_id, reason="busy" if busy else "error",
                               message="%s: %s" % (type(e).__name__, e) if not busy else str(e))
                return
            active = Active(job_id, job, settings)
            self.active = active
            self.unloaded = False
            self.idle.clear()
            # Accepted goes out before the drain thread can send anything.
            self.chan.send("accepted", job_id=job_id)
        threading.Thread(target=self.drain, args=(active,), name="kiln-drain", daemon=True).start()

    def on_cancel(self, cmd):
        job_id = cmd.get("job_id")
        with self.lock:
            active = self.active
        # The ack first, so it always precedes the job's terminal message.
        self.chan.send("cancel_ack", job_id=job_id)
        if active is not None and active.job_id == job_id:
            active.cancel_requested = True
            active.job.cancel()

    def on_warmup(self, cmd):
        job_id = str(cmd.get("job_id") or "warmup")
        model_type = cmd.get("model_type")
        settings = {"model_type": model_type, "prompt": "warm-up", "num_inference_steps": 1, "seed": 0}
        try:
            schema = (self.session.get_model_schema(model_type) or {}).get("metadata", {})
        except Exception:
            schema = {}
        if schema.get("frames_minimum"):
            settings["video_length"] = schema["frames_minimum"]
        self.start_job(job_id, settings)

    def on_query(self, cmd):
        req_id = cmd.get("req_id")
        with self.lock:
            busy = self.active is not None
        if busy:
            self.chan.send("reply", req_id=req_id, error="busy: queries are answered between jobs")
            return
        op = QUERIES.get(cmd.get("op"))
        if op is None:
            self.chan.send("reply", req_id=req_id, error="unknown query %r" % cmd.get("op"))
            return
        try:
            data = op(self, cmd.get("args") or {})
        except BaseException as e:
            self.chan.send("reply", req_id=req_id, error="%s: %s" % (type(e).__name__, e))
            return
        self.chan.send("reply", req_id=req_id, data=jsonable(data))

    def on_unload(self, cmd):
        with self.lock:
            busy = self.active is not None
            if not busy:
                self.session.close()
                self.unloaded = True
        if busy:
            self.chan.send("reply", req_id=cmd.get("req_id"), error="busy")
        else:
            self.chan.send("reply", req_id=cmd.get("req_id"), data={"unloaded": True})

    def on_ping(self, cmd):
        self.chan.send("pong", req_id=cmd.get("req_id"))

    def on_shutdown(self, cmd):
        self.stop(grace=float(cmd.get("grace_s") or 0))

    def stop(self, grace):
        with self.lock:
            active = self.active
        if active is not None:
            active.cancel_requested = True
            active.job.cancel()
            self.idle.wait(timeout=max(grace, 0))
        self.chan.send("bye")
        os._exit(0)

    # ----- the job -----------------------------------------------------------

    def drain(self, active):
        job = active.job
        errors = []
        result = None
        try:
            # get(timeout) rather than iter(): iter() never returns on a hung job.
            while True:
                ev = job.events.get(timeout=0.2)
                if ev is None:
                    if getattr(job.events, "closed", False):
                        break
                    continue
                kind, data = ev.kind, ev.data
                if kind == "progress":
                    self.forward_progress(active, data)
                elif kind in ("status", "info"):
                    self.chan.send(kind, job_id=active.job_id, text=str(data))
                elif kind == "stream":
                    self.forward_log(active, data)
                elif kind == "error":
                    errors.append(data)
                elif kind == "completed":
                    result = data
                    break
            # The session clears its own job a moment after `completed`.
            try:
                result = job.result(timeout=30) or result
            except Exception:
                pass
            self.finish(active, result, errors)
        except BaseException:
            text = traceback.format_exc()
            log(text)
            self.end(active, "error", stage="runtime", message="the bridge failed while following the job: %s" % text[-2000:],
                     oom=False, fatal=True, log_tail=list(active.tail))
            os._exit(70)

    def forward_progress(self, active, p):
        phase = getattr(p, "phase", None)
        step = getattr(p, "current_step", None)
        total = getattr(p, "total_steps", None)
        status = getattr(p, "status", None) or ""
        now = time.monotonic()
        last_step = step is not None and total is not None and step >= total
        if phase == active.last_phase and not last_step and now - active.last_progress < self.args.progress_interval_s:
            return
        active.last_phase = phase
        active.last_progress = now
        sample, samples = counter(r"Sample (\d+)/(\d+)", status)
        window, windows = counter(r"Sliding Window (\d+)/(\d+)", status)
        self.chan.send("progress", job_id=active.job_id, phase=phase, raw_phase=getattr(p, "raw_phase", None),
                       status=status, pct=getattr(p, "progress", None), step=step, total_steps=total,
                       sample=sample, total_samples=samples, window=window, total_windows=windows, ts=time.time())

    def forward_log(self, active, msg):
        text = str(getattr(msg, "text", msg)).rstrip()
        if not text:
            return
        active.tail.append(text[:500])
        now = time.monotonic()
        if now - active.log_window >= 1.0:
            if active.log_dropped:
                self.chan.send("log", job_id=active.job_id, stream="bridge",
                               text="(%d lines not forwarded)" % active.log_dropped)
            active.log_window, active.log_count, active.log_dropped = now, 0, 0
        active.log_count += 1
        if active.log_count > LOG_LINES_PER_S:
            active.log_dropped += 1
            return
        self.chan.send("log", job_id=active.job_id, stream=getattr(msg, "stream", "stdout"), text=text[:2000])

    def finish(self, active, result, errors):
        errors = list(getattr(result, "errors", None) or errors)
        elapsed = round(time.monotonic() - active.started, 3)
        if result is not None and getattr(result, "success", False):
            files = [os.path.abspath(f) for f in getattr(result, "generated_files", [])]
            self.end(active, "result", ok=True, files=files, elapsed_s=elapsed,
                     loaded_model=self.loaded_model(), seed=active.settings.get("seed"))
            return
        was_cancelled = bool(getattr(result, "cancelled", False)) or any(
            getattr(e, "stage", None) == "cancelled" or getattr(e, "message", "") == CANCELLED_TEXT for e in errors)
        if was_cancelled or (active.cancel_requested and not errors):
            self.end(active, "cancelled")
            return
        if errors:
            first = errors[0]
            message = str(getattr(first, "message", first))
            stage = getattr(first, "stage", None) or "generation"
        else:
            message, stage = "WanGP ended the job without a result", "runtime"
        oom = any(t in message for t in OOM_TEXTS)
        # WanGP reports every exception that escapes a task as stage "runtime",
        # a bad setting's TypeError as much as a broken CUDA context; only a CUDA
        # fault poisons the process.
        fatal = not oom and any(t in message for t in FATAL_TEXTS)
        self.end(active, "error", stage=stage, message=message, oom=oom, fatal=fatal, log_tail=list(active.tail)[-10:])
        if fatal:
            # The CUDA context is poisoned: every later job would fail. Let the
            # supervisor start a fresh process.
            os._exit(70)

    def end(self, active, type_, **fields):
        # Clear the slot first: the worker may submit the next job the moment it
        # reads the terminal message.
        with self.lock:
            if self.active is active:
                self.active = None
            self.idle.set()
        self.chan.send(type_, job_id=active.job_id, **fields)

    # ----- heartbeat ---------------------------------------------------------

    def heartbeat(self):
        while True:
            time.sleep(self.args.heartbeat_s)
            with self.lock:
                active = self.active
            self.chan.send("heartbeat", busy=active is not None, job_id=active.job_id if active else None,
                           loaded_model=self.loaded_model(), rss_mb=rss_mb(), ts=time.time())


# ----- discovery ---------------------------------------------------------------

def q_list_models(bridge, args):
    return bridge.session.list_model_defs(**{k: v for k, v in args.items() if v is not None})


def model_type_arg(args):
    model_type = args.get("model_type")
    if not model_type:
        raise ValueError("model_type is required")
    return model_type


def q_model_schema(bridge, args):
    return bridge.session.get_model_schema(model_type_arg(args))


def q_default_settings(bridge, args):
    return bridge.session.get_default_settings(model_type_arg(args))


def q_list_loras(bridge, args):
    return bridge.session.list_loras(model_type_arg(args))


def q_availability(bridge, args):
    return bridge.session.get_model_availability(model_type_arg(args))


def q_model_info(bridge, args):
    """Schema, defaults, LoRAs and availability of one model type in one answer."""
    model_type = model_type_arg(args)
    schema = bridge.session.get_model_schema(model_type)
    if schema is None:
        raise ValueError("Unknown model_type: %s" % model_type)
    try:
        loras = bridge.session.list_loras(model_type)
    except Exception as e:
        loras = {"supported": False, "loras": [], "error": str(e)}
    return {
        "metadata": schema.get("metadata", {}),
        "defaults": bridge.session.get_default_settings(model_type),
        "loras": loras,
        "availability": bridge.session.get_model_availability(model_type),
    }


def q_inventory(bridge, args):
    """Every model type with whether its weights are present, and the LoRAs of
    those that are."""
    defs = bridge.session.list_model_defs()
    types = [str(d.get("model_type")) for d in defs if d.get("model_type")]
    try:
        avail = {a["model_type"]: a for a in bridge.session.list_model_availability()}
    except Exception:
        avail = {t: bridge.session.get_model_availability(t) for t in types}
    models = []
    # LoRA ids are paths relative to each family's LoRA folder, subfolders
    # included: the same id in two families is two LoRAs, so each keeps its family.
    loras = {}
    for d in defs:
        t = str(d.get("model_type") or "")
        if not t:
            continue
        a = avail.get(t, {})
        present = bool(a.get("available"))
        metadata = d.get("metadata", {}) or {}
        models.append({"model_type": t, "name": d.get("name"), "family": metadata.get("family"),
                       "main_output": metadata.get("main_output"), "status": a.get("status"), "available": present})
        if present:
            try:
                listed = bridge.session.list_loras(t)
            except Exception:
                continue
            if listed.get("supported", True):
                family = str(metadata.get("family") or t)
                loras.setdefault(family, set()).update(str(x) for x in listed.get("loras", []))
    return {"models": models, "loras": [{"family": f, "name": n} for f in sorted(loras) for n in sorted(loras[f])]}


QUERIES = {
    "list_models": q_list_models,
    "model_schema": q_model_schema,
    "default_settings": q_default_settings,
    "list_loras": q_list_loras,
    "availability": q_availability,
    "model_info": q_model_info,
    "inventory": q_inventory,
}


class InitOutput:
    """sys.stdout during WanGP's start-up: passes writes on, keeps the last lines."""

    def __init__(self, stream):
        self.stream = stream
        self.lines = collections.deque(maxlen=20)
        self._buf = ""

    def write(self, text):
        self.stream.write(text)
        self._buf += text
        *done, self._buf = self._buf.replace("\r", "\n").split("\n")
        self.lines.extend(line.strip() for line in done if line.strip())
        return len(text)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def log(text):
    # sys.__stderr__: WanGP may have swapped sys.stderr for a job.
    stream = sys.__stderr__ or sys.stderr
    try:
        stream.write("kiln-bridge: %s\n" % text)
        stream.flush()
    except Exception:
        pass


def parse_args(argv):
    p = argparse.ArgumentParser(description="Kiln's Wan2GP bridge")
    p.add_argument("--root", required=True)
    p.add_argument("--config-dir", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--ipc-fd", type=int, required=True)
    p.add_argument("--heartbeat-s", type=float, default=5.0)
    p.add_argument("--progress-interval-s", type=float, default=0.5)
    p.add_argument("cli_args", nargs="*")
    if "--" in argv:
        i = argv.index("--")
        args = p.parse_args(argv[:i])
        args.cli_args = argv[i + 1:]
    else:
        args = p.parse_args(argv)
    return args


def main(argv):
    args = parse_args(argv)
    chan = Channel(args.ipc_fd)
    os.set_inheritable(args.ipc_fd, False)  # not for ffmpeg and friends
    # From here on, anything written to descriptor 1 lands in stderr (the log).
    os.dup2(2, 1)
    stdin = io.open(0, "rb", closefd=False)
    root = os.path.abspath(args.root)
    config_dir = os.path.abspath(args.config_dir)
    output_dir = os.path.abspath(args.output_dir)
    os.makedirs(config_dir, exist_ok=True)
    os.makedirs(output_dir, exist_ok=True)
    # The working directory is process-wide state the API changes around its
    # calls; settle it once.
    os.chdir(root)
    if root not in sys.path:
        sys.path.insert(0, root)
    # WanGP explains most start-up failures on stdout (then calls exit()): keep
    # the last lines for the report.
    tee = InitOutput(sys.stdout)
    sys.stdout = tee
    try:
        from shared import api
        session = api.init(root=root, config_path=os.path.join(config_dir, "wgp_config.json"),
                           output_dir=output_dir, cli_args=list(args.cli_args),
                           console_output=False, console_isatty=False)
    except BaseException as e:  # SystemExit too: a wrong mmgp version calls exit()
        log(traceback.format_exc())
        message = "%s: %s" % (type(e).__name__, e)
        if tee.lines:
            message += " (WanGP said: %s)" % " | ".join(list(tee.lines)[-3:])
        chan.send("init_failed", message=message)
        os._exit(3)
    finally:
        sys.stdout = tee.stream
    bridge = Bridge(chan, api, session, args)
    chan.send("ready", **bridge.ready_info())
    threading.Thread(target=bridge.heartbeat, name="kiln-heartbeat", daemon=True).start()
    bridge.serve(stdin)


if __name__ == "__main__":
    main(sys.argv[1:])
