"""Delivery limits and real peers: the daemon (build/mta/posthaste/posthaste) delivering
to `posthaste-bench sink`, Postfix's `smtp-sink` and a private Postfix relay.

- a destination's concurrency (the sink's max_concurrent), message rate and connection
  rate (the accounting log's delivery times), messages per connection (the sink's
  connection count);
- Postfix's smtp-sink as the destination; a private Postfix as the next hop
  (Posthaste -> Postfix -> sink);
- kill -9 in the middle of a delivery run and a restart on the same spool: every
  accepted message is delivered at least once, with few duplicates, and the queue
  ends empty.

The limits are per worker (docs/delivery.md, "Shared nothing"): the exact checks run
the daemon with one worker; one check runs two workers against the documented bound.

Every wait is bounded; every process started here is stopped by its PID at teardown
(Postfix by `postfix stop` and its master's PID: tests/integration/postfixtest.py).

Run inside a private network namespace, as root:

    POSTHASTE_BUILD=$PWD/build unshare -n sh -c 'ip link set lo up && exec \
        /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/integration/test_delivery_limits.py'
"""
import datetime
import json
import os
import re
import signal
import subprocess
import time

import pytest

import phtest
import postfixtest

POSTHASTE = os.path.join(phtest.BUILD_DIR, "mta", "posthaste", "posthaste")
DOMAIN = "d.test"
RCPT = "u@" + DOMAIN


@pytest.fixture(scope="session")
def posthaste():
    if not (os.path.isfile(POSTHASTE) and os.access(POSTHASTE, os.X_OK)):
        pytest.skip("the posthaste daemon is not built: %s is missing (build with `ninja -C %s` "
                    "or set POSTHASTE_BUILD)" % (POSTHASTE, phtest.BUILD_DIR))
    return POSTHASTE


# --------------------------------------------------------------------------- the daemon


class Relay:
    """One posthaste process that delivers (or, with delivery=False, only queues),
    listening on 127.0.0.1:<free port>, running in tmpdir (relative default paths land
    there), with a configuration file made of `config` lines plus an accounting log
    and short retry times."""

    def __init__(self, binary, tmpdir, spool, acct, config=(), workers=1, routes=(),
                 delivery=True, tag="ph"):
        self.binary = binary
        self.tmpdir = str(tmpdir)
        self.spool = str(spool)
        self.acct = str(acct)
        self.port = phtest.free_port()
        n = 0
        for n in range(1, 10000):
            base = os.path.join(self.tmpdir, "%s-%d" % (tag, n))
            if not os.path.exists(base + ".err"):
                break
        self.conf = base + ".conf"
        self.err_path = base + ".err"
        with open(self.conf, "w") as f:
            f.write("accounting_log = %s\nretry_min = 1s\nretry_max = 2s\n" % self.acct)
            for ln in config:
                f.write(ln + "\n")
        self.cmd = [binary, "--config", self.conf, "--listen", "127.0.0.1:%d" % self.port,
                    "--spool", self.spool, "--workers", str(workers)]
        for dom, hosts in routes:
            self.cmd += ["--route", "%s=%s" % (dom, hosts)]
        if not delivery:
            self.cmd.append("--no-delivery")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self._err,
                                     stdin=subprocess.DEVNULL, cwd=self.tmpdir)
        self.pid = self.proc.pid
        try:
            s = phtest.wait_connectable("127.0.0.1", self.port, proc=self.proc,
                                        what="posthaste (%s)" % " ".join(self.cmd))
        except AssertionError as e:
            self.kill()
            raise AssertionError("%s\nlog:\n%s" % (e, self.log(4000)))
        try:
            buf = phtest.read_greeting(s)
            assert buf.startswith(b"220"), "posthaste greeting: %r" % buf
            s.sendall(b"QUIT\r\n")
            s.recv(4096)
        finally:
            s.close()

    def log(self, limit=None):
        try:
            with open(self.err_path, "rb") as f:
                t = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return t if limit is None else t[-limit:]

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=phtest.STOP_TIMEOUT, expect_rc=0):
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            phtest.stop_process(self.proc, signal.SIGKILL)
            raise AssertionError("posthaste (pid %d) did not exit within %.0f s of signal %d; log:\n%s"
                                 % (self.pid, timeout, sig, self.log(4000)))
        self._close()
        if expect_rc is not None:
            assert rc == expect_rc, ("posthaste exited with status %s after signal %d (expected %s); "
                                     "log:\n%s" % (rc, sig, expect_rc, self.log(4000)))
        return rc

    def kill9(self):
        return self.stop(signal.SIGKILL, expect_rc=None)

    def _close(self):
        try:
            self._err.close()
        except OSError:
            pass

    def kill(self):
        phtest.stop_process(self.proc, signal.SIGTERM, 10.0)
        self._close()


@pytest.fixture
def relay(posthaste, tmp_path):
    """Factory: relay(spool, **kw) -> Relay; every one still running at teardown is
    stopped by PID."""
    started = []

    def start(spool, **kw):
        kw.setdefault("acct", tmp_path / "accounting.jsonl")
        r = Relay(posthaste, tmp_path, spool, **kw)
        started.append(r)
        return r

    yield start
    for r in started:
        r.kill()


@pytest.fixture
def spool(tmp_path):
    p = tmp_path / "spool"
    # the control socket (SPOOL/control.sock) must fit in a Unix socket address
    assert len(str(p / "control.sock")) <= 107, "tmp_path too long for the control socket: %s" % p
    return str(p)


# --------------------------------------------------------------------------- helpers


def send(procs, port, n, ids_file=None, connections=10, size="1k", to=RCPT, timeout=120.0):
    """posthaste-bench send of n messages to `to`; every one must be accepted."""
    cmd = [phtest.BENCH, "send", "--server", "127.0.0.1:%d" % port, "--connections", str(connections),
           "--messages", str(n), "--size", str(size), "--to", to, "--json", "--timeout", "60"]
    if ids_file:
        cmd += ["--ids-file", str(ids_file)]
    rc, out, err = procs.run(cmd, timeout=timeout)
    js = phtest.parse_send_json(rc, out, err)
    assert rc == 0 and js["accepted"] == n, "send: %d of %d accepted (exit %s): %r\nstderr:\n%s" % (
        js["accepted"], n, rc, js, err[-2000:])
    return js


def read_ids(path):
    with open(path) as f:
        ids = [ln.strip().upper() for ln in f if ln.strip()]
    for i in ids:
        assert re.fullmatch(r"[0-9A-F]{16}", i), "not a queue id in %s: %r" % (path, i)
    return ids


def events(acct, kind=None):
    """The accounting log's objects (of event `kind`); a torn last line is skipped."""
    out = []
    try:
        with open(acct, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return out
    for ln in data.split(b"\n"):
        if not ln.strip():
            continue
        try:
            o = json.loads(ln)
        except ValueError:
            continue
        if kind is None or o.get("event") == kind:
            out.append(o)
    return out


def delivered_ids(acct):
    return {o["queue_id"].upper() for o in events(acct, "delivery")}


def not_delivered(acct):
    """The accounting log's failure events (transient_failure, bounce, expiry), a few."""
    bad = [o for o in events(acct) if o.get("event") in ("transient_failure", "bounce", "expiry")]
    return bad[:5]


def wait_for(cond, timeout, what, diag=lambda: "", interval=0.05, alive=None):
    """Polls cond() until it is true; fails after timeout with what + diag()."""
    deadline = time.monotonic() + timeout
    for _ in range(10 ** 7):
        v = cond()
        if v:
            return v
        if alive is not None and not alive():
            raise AssertionError("%s: a process exited while waiting\n%s" % (what, diag()))
        if time.monotonic() > deadline:
            raise AssertionError("%s: not reached within %.0f s\n%s" % (what, timeout, diag()))
        time.sleep(interval)


def wait_delivered(r, acct, ids, timeout=60.0):
    ids = set(ids)

    def diag():
        got = delivered_ids(acct)
        return ("%d of %d delivered; failures: %r\nposthaste log:\n%s"
                % (len(ids & got), len(ids), not_delivered(acct), r.log(3000)))

    wait_for(lambda: ids <= delivered_ids(acct), timeout, "every message delivered", diag,
             alive=r.alive)


def queue_list(spool):
    p = subprocess.run([POSTHASTE, "queue", "list", "--json", "--spool", spool], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=60)
    assert p.returncode == 0, "posthaste queue list exited %d: %s" % (p.returncode, p.stderr[-2000:])
    return [json.loads(ln) for ln in p.stdout.decode().splitlines() if ln.strip()]


def ts(o):
    """The event's time (UTC, ms precision) in seconds since the epoch."""
    t = o["time"]
    assert t.endswith("Z"), t
    d = datetime.datetime.strptime(t[:-1], "%Y-%m-%dT%H:%M:%S.%f")
    return d.replace(tzinfo=datetime.timezone.utc).timestamp()


def preload(relay, procs, spool, n, tmp_path, workers=1):
    """n messages to RCPT queued by a daemon without delivery, then stopped: the next
    daemon on the spool starts with all n ready at once, so what it does is set by its
    limits and not by the pace of the reception. Returns the queue ids."""
    ids_file = tmp_path / "preload-ids.txt"
    r = relay(spool, delivery=False, tag="preload", acct=tmp_path / "preload.jsonl", workers=workers)
    send(procs, r.port, n, ids_file=ids_file, connections=10)
    r.stop()
    ids = read_ids(ids_file)
    assert len(ids) == n and len(set(ids)) == n
    return ids


def route(sink_or_port):
    port = sink_or_port if isinstance(sink_or_port, int) else sink_or_port.port
    return [(DOMAIN, "[127.0.0.1]:%d" % port)]


# --------------------------------------------------------------------------- a. concurrency


@pytest.mark.parametrize("concurrency,workers,n", [(2, 1, 300), (8, 1, 300), (2, 2, 300)],
                         ids=["c2", "c8", "c2-2workers"])
def test_concurrency(relay, sink, procs, spool, tmp_path, concurrency, workers, n):
    """destination.DOMAIN = concurrency=N: the sink never sees more than N connections
    at once (N x workers: the limit is per worker); with N = 8 it does see more than 2,
    so the check can fail."""
    # with 2 workers each gets part of the messages (its own spool segments)
    ids = preload(relay, procs, spool, n, tmp_path, workers=workers)
    s = sink("--workers", 1, "--quiet")
    acct = tmp_path / "accounting.jsonl"
    r = relay(spool, workers=workers, routes=route(s),
              config=["destination.%s = concurrency=%d" % (DOMAIN, concurrency)])
    wait_delivered(r, acct, ids, timeout=60)
    r.stop()
    st = s.stop()
    print("concurrency=%d workers=%d: sink %r" % (concurrency, workers, st))
    assert "max_concurrent" in st, "the sink's stats lack max_concurrent: %r" % st
    assert st["messages"] == n, "sink got %d messages, %d sent: %r" % (st["messages"], n, st)
    bound = concurrency * workers
    assert st["max_concurrent"] <= bound, (
        "destination concurrency=%d with %d worker(s): the sink saw %d connections at once (at "
        "most %d allowed)" % (concurrency, workers, st["max_concurrent"], bound))
    if concurrency > 2:
        assert st["max_concurrent"] > 2, (
            "concurrency=%d with %d queued messages never opened more than 2 connections at once: "
            "%r" % (concurrency, n, st))
    assert queue_list(spool) == []


# --------------------------------------------------------------------------- b. rates


def bucket_burst(rate):
    """The tokens a full bucket holds (mta/relay/relay.c, bucket_init): one plus 20 ms
    worth; the first ones go at once."""
    return 1.0 + rate * 0.020


def span_check(acct, ids, rate, what):
    burst = bucket_burst(rate)
    ev = [o for o in events(acct, "delivery") if o["queue_id"].upper() in set(ids)]
    assert len(ev) == len(ids), "%s: %d delivery events for %d messages" % (what, len(ev), len(ids))
    times = sorted(ts(o) for o in ev)
    span = times[-1] - times[0]
    # the first `burst` go at once (a full bucket at the start), then one per 1/rate
    expected = (len(ids) - burst) / rate
    print("%s: %d deliveries in %.3f s (expected %.3f s at %g/s, burst %g: %.1f%% off)"
          % (what, len(ids), span, expected, rate, burst, 100.0 * (span - expected) / expected))
    assert abs(span - expected) <= 0.10 * expected, (
        "%s: %d deliveries took %.3f s from the first to the last, expected %.3f s +- 10%% "
        "(%g/s after a burst of %g)" % (what, len(ids), span, expected, rate, burst))


def test_message_rate(relay, sink, procs, spool, tmp_path):
    """rate=100/s: 300 queued messages leave in (300 - burst) / 100 s, within 10%."""
    n, rate = 300, 100.0
    ids = preload(relay, procs, spool, n, tmp_path)
    s = sink("--workers", 1, "--quiet")
    acct = tmp_path / "accounting.jsonl"
    r = relay(spool, routes=route(s), config=["destination.%s = rate=100/s" % DOMAIN])
    wait_delivered(r, acct, ids, timeout=30)
    r.stop()
    st = s.stop()
    assert st["messages"] == n, st
    span_check(acct, ids, rate, "rate=100/s")


def test_connection_rate(relay, sink, procs, spool, tmp_path):
    """connection_rate=50/s with messages_per_connection=1: 100 messages need 100
    connections, which open at 50/s: (100 - burst) / 50 s, within 10%."""
    n, rate = 100, 50.0
    ids = preload(relay, procs, spool, n, tmp_path)
    s = sink("--workers", 1, "--quiet")
    acct = tmp_path / "accounting.jsonl"
    r = relay(spool, routes=route(s),
              config=["destination.%s = connection_rate=50/s messages_per_connection=1" % DOMAIN])
    wait_delivered(r, acct, ids, timeout=30)
    r.stop()
    st = s.stop()
    assert st["messages"] == n, st
    assert st["connections"] - s.probes == n, "one message per connection: %r" % st
    span_check(acct, ids, rate, "connection_rate=50/s")


# --------------------------------------------------------------------------- c. messages per connection


def test_messages_per_connection(relay, sink, procs, spool, tmp_path):
    """messages_per_connection=5, concurrency=1: 50 messages take at least 10 connections."""
    n = 50
    ids = preload(relay, procs, spool, n, tmp_path)
    s = sink("--workers", 1, "--quiet")
    acct = tmp_path / "accounting.jsonl"
    r = relay(spool, routes=route(s),
              config=["destination.%s = concurrency=1 messages_per_connection=5" % DOMAIN])
    wait_delivered(r, acct, ids, timeout=30)
    r.stop()
    st = s.stop()
    conns = st["connections"] - s.probes
    print("messages_per_connection=5: %d messages over %d connections (%r)" % (n, conns, st))
    assert st["messages"] == n, st
    assert conns >= n // 5, ("messages_per_connection=5: %d messages went over only %d connections"
                             % (n, conns))
    assert st["max_concurrent"] <= 1, st


# --------------------------------------------------------------------------- d. Postfix's smtp-sink


SMTP_SINK_COUNTS = re.compile(r"sess=(\d+) quit=(\d+) mesg=(\d+)")


def test_smtp_sink_peer(relay, procs, tool, spool, tmp_path):
    """Delivery to Postfix's smtp-sink (a real, independent SMTP server): every message
    is delivered by the accounting log, and smtp-sink counts as many."""
    smtp_sink = tool("smtp-sink")
    n = 200
    port = phtest.free_port()
    out_path = tmp_path / "smtp-sink.out"
    with open(out_path, "wb") as out, open(tmp_path / "smtp-sink.err", "wb") as err:
        # -c: counters on stdout (sess= quit= mesg=, updated at each end of session,
        # QUIT and "."); -u root: required as root; runs in the foreground
        p = procs.spawn([smtp_sink, "-c", "-u", "root", "127.0.0.1:%d" % port, "100"],
                        stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    phtest.wait_connectable("127.0.0.1", port, proc=p, what="smtp-sink").close()

    def counts():
        with open(out_path, "rb") as f:
            m = SMTP_SINK_COUNTS.findall(f.read().decode("ascii", "replace"))
        return tuple(int(x) for x in m[-1]) if m else (0, 0, 0)

    acct = tmp_path / "accounting.jsonl"
    r = relay(spool, routes=route(port), workers=2)
    ids_file = tmp_path / "ids.txt"
    send(procs, r.port, n, ids_file=ids_file)
    ids = read_ids(ids_file)
    wait_delivered(r, acct, ids, timeout=60)
    wait_for(lambda: counts()[2] >= n, 20, "smtp-sink counting %d messages" % n,
             lambda: "smtp-sink counters %r" % (counts(),))
    r.stop()
    sess, quit_, mesg = counts()
    print("smtp-sink: sess=%d quit=%d mesg=%d" % (sess, quit_, mesg))
    assert mesg == n, "smtp-sink counted %d messages, %d delivered" % (mesg, n)
    ev = [o for o in events(acct, "delivery") if o["queue_id"].upper() in set(ids)]
    assert len(ev) == n, "%d delivery events for %d messages" % (len(ev), n)
    for o in ev:
        assert o["remote_host"] == "[127.0.0.1]:%d" % port and o["status"].startswith("2."), o
    assert queue_list(spool) == []
    phtest.stop_process(p)


# --------------------------------------------------------------------------- e. Postfix as the next hop


@pytest.fixture
def postfix():
    """Factory: postfix(relay_port=PORT) -> a started postfixtest.Postfix (stopped at
    teardown); skips when Postfix cannot run here for a reason outside the repository."""
    started = []

    def start(**kw):
        why = postfixtest.unavailable()
        if why:
            pytest.skip(why)
        pf = postfixtest.Postfix(**kw)
        started.append(pf)
        try:
            pf.start()
        except postfixtest.PostfixError as e:
            pytest.skip("a private Postfix could not start here: %s" % e)
        return pf

    yield start
    for pf in started:
        pf.stop()


def test_postfix_next_hop(relay, sink, postfix, procs, spool, tmp_path):
    """Posthaste -> Postfix (relayhost = the sink, mynetworks = 127.0.0.0/8) -> sink:
    everything Posthaste delivers to Postfix reaches the sink, once."""
    n = 100
    s = sink("--quiet")
    pf = postfix(relay_port=s.port)
    acct = tmp_path / "accounting.jsonl"
    r = relay(spool, routes=route(pf.port), workers=2)
    ids_file = tmp_path / "ids.txt"
    send(procs, r.port, n, ids_file=ids_file)
    ids = read_ids(ids_file)
    wait_delivered(r, acct, ids, timeout=60)
    for o in events(acct, "delivery"):
        assert o["remote_host"] == "[127.0.0.1]:%d" % pf.port, o
    wait_for(lambda: pf.sent_count(s.port) >= n, 60, "Postfix relaying %d messages to the sink" % n,
             lambda: "Postfix sent %d; its queue: %r; its log:\n%s"
             % (pf.sent_count(s.port), pf.queue_ids(), pf.log_text(3000)), interval=0.2)
    r.stop()
    st = s.stop()
    print("Posthaste -> Postfix -> sink: %r; Postfix status=sent: %d" % (st, pf.sent_count(s.port)))
    assert st["messages"] == n, "the sink got %d of %d messages through Postfix: %r" % (st["messages"], n, st)
    assert queue_list(spool) == []


# --------------------------------------------------------------------------- f. kill -9 mid-run


def test_kill9_during_delivery(relay, sink, procs, spool, tmp_path):
    """500 messages to a slow destination (the sink holds each final reply 50 ms), the
    daemon killed with SIGKILL while deliveries are in flight and restarted on the same
    spool: every accepted message is delivered at least once, the duplicates are few
    (at most the messages in flight, plus those whose DELIVERED record was not yet
    written), and the queue ends empty."""
    n, workers, concurrency = 500, 2, 4
    s = sink("--delay", "EOM:50", "--quiet")
    acct = tmp_path / "accounting.jsonl"
    cfg = ["destination.%s = concurrency=%d" % (DOMAIN, concurrency)]
    r = relay(spool, routes=route(s), workers=workers, config=cfg)
    ids_file = tmp_path / "ids.txt"
    send(procs, r.port, n, ids_file=ids_file, connections=20)
    ids = read_ids(ids_file)
    assert len(set(ids)) == n

    def progress():
        return len(delivered_ids(acct))

    wait_for(lambda: progress() >= 100, 30, "100 deliveries before the kill",
             lambda: "delivered %d; log:\n%s" % (progress(), r.log(2000)), interval=0.01,
             alive=r.alive)
    r.kill9()
    at_kill = progress()
    print("killed with %d of %d delivered (by the accounting log)" % (at_kill, n))
    assert at_kill < n, "everything was delivered before the kill: the test did not test a restart"

    r2 = relay(spool, routes=route(s), workers=workers, config=cfg)
    wait_delivered(r2, acct, ids, timeout=60)
    wait_for(lambda: queue_list(spool) == [], 20, "the queue empty after the deliveries",
             lambda: "queue: %r" % (queue_list(spool)[:5],), interval=0.2)
    r2.stop()
    assert queue_list(spool) == []
    st = s.stop()
    dups = st["messages"] - n
    in_flight = workers * concurrency  # one message per connection at a time (relay.c)
    bound = 2 * in_flight
    print("kill -9 mid-run: sink %r; duplicates %d (in flight at most %d, bound asserted %d)"
          % (st, dups, in_flight, bound))
    assert st["messages"] >= n, "the sink got %d messages for %d accepted" % (st["messages"], n)
    assert dups <= bound, ("%d duplicates after a kill -9 with at most %d messages in flight "
                           "(bound %d): %r" % (dups, in_flight, bound, st))
    missing = set(ids) - delivered_ids(acct)
    assert not missing, "accepted but never delivered: %r" % sorted(missing)[:10]
