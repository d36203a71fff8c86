"""Live queue control: `posthaste queue hold|release|delete|flush` against a running daemon,
over its control socket (mta/posthaste/control.h), as postqueue/postsuper talk to Postfix.

- Delivery off (--no-delivery): the workers change their spool entries directly; the
  offline reader (`queue list`) must see the state records the daemon wrote.
- Delivery on: a route to a `posthaste-bench sink --fail RCPT:450:100` keeps a message
  deferred (retry_min = 1h, so only a flush or a release makes it be tried again);
  --resolver 127.0.0.1:1 keeps the system resolver out of it. The accounting log
  (a temporary file) says when it was tried.
- The socket's own protocol: bad requests, a too-long line, its mode.

Every process is stopped by PID at teardown; every wait has a deadline. Run inside a
private network namespace (only 127.0.0.1 is used):

    POSTHASTE_BUILD=$PWD/build unshare -n sh -c 'ip link set lo up && exec \\
        /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/integration/test_queue_live.py'
"""
import json
import os
import re
import signal
import smtplib
import socket
import stat
import subprocess
import time

import pytest

import phtest

POSTHASTE = os.path.join(phtest.BUILD_DIR, "mta", "posthaste", "posthaste")
QUEUED_RE = re.compile(r"queued as ([0-9A-F]{16})\b")
RUN_TIMEOUT = 60.0
WAIT = 10.0  # for a state record to reach the disk, or an event the log


@pytest.fixture(scope="module")
def posthaste():
    if not (os.path.isfile(POSTHASTE) and os.access(POSTHASTE, os.X_OK)):
        pytest.skip("the posthaste daemon is not built: %s is missing" % POSTHASTE)
    return POSTHASTE


def wait_for(pred, timeout, what, diag=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0f s waiting for %s\n%s"
                                 % (timeout, what, diag()))
        time.sleep(0.02)


class Daemon:
    """One posthaste on 127.0.0.1:<free port>, with a configuration file in `dir`."""

    def __init__(self, dir_, extra=(), args=(), workers=2):
        self.dir = str(dir_)
        self.spool = os.path.join(self.dir, "spool")
        self.acct = os.path.join(self.dir, "accounting.jsonl")
        self.sock = os.path.join(self.spool, "control.sock")
        self.port = phtest.free_port()
        self.conf = os.path.join(self.dir, "posthaste.conf")
        with open(self.conf, "w") as f:
            f.write("\n".join(["listen = 127.0.0.1:%d" % self.port,
                               "spool_dir = %s" % self.spool,
                               "workers = %d" % workers,
                               "hostname = relay.posthaste.test",
                               "accounting_log = %s" % self.acct] + list(extra)) + "\n")
        for n in range(1, 1000):
            self.err_path = os.path.join(self.dir, "posthaste-%d.err" % n)
            if not os.path.exists(self.err_path):
                break
        self._err = open(self.err_path, "wb")
        self.cmd = [POSTHASTE, "--config", self.conf] + list(args)
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self._err,
                                     stderr=self._err)
        try:
            s = phtest.wait_connectable("127.0.0.1", self.port, proc=self.proc,
                                        what="posthaste")
            s.close()
        except AssertionError as e:
            self.kill()
            raise AssertionError("%s\nlog:\n%s" % (e, self.log()))

    def log(self):
        try:
            with open(self.err_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-6000:]
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            rc = self.proc.wait(phtest.STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("posthaste (pid %d) ignored SIGTERM; log:\n%s"
                                 % (self.proc.pid, self.log()))
        self._err.close()
        assert rc == 0, "posthaste exited with %s; log:\n%s" % (rc, self.log())

    def kill(self):
        phtest.stop_process(self.proc, signal.SIGKILL, 5.0)
        if not self._err.closed:
            self._err.close()

    def send(self, rcpt, subject):
        with smtplib.SMTP("127.0.0.1", self.port, timeout=phtest.REPLY_TIMEOUT) as c:
            c.ehlo("client.test")
            code, resp = c.mail("alice@example.org")
            assert code == 250, (code, resp)
            code, resp = c.rcpt(rcpt)
            assert code == 250, (code, resp)
            code, resp = c.data(b"Subject: %s\r\n\r\nhello\r\n" % subject.encode())
            assert code == 250, (code, resp)
            m = QUEUED_RE.search(resp.decode("ascii", "replace"))
            assert m, resp
            return m.group(1)

    def queue(self, *args, check=None):
        """`posthaste queue ARGS --config CONF`: (rc, stdout text, stderr text)."""
        p = subprocess.run([POSTHASTE, "queue"] + [str(a) for a in args] + ["--config", self.conf],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
        out, err = p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")
        if check is not None:
            assert p.returncode == check, "queue %s: exit %d (expected %d)\nout: %s\nerr: %s\n%s" % (
                " ".join(map(str, args)), p.returncode, check, out, err, self.log())
        return p.returncode, out, err

    def listed(self):
        """{queue id: queue_name} from `queue list --json` (the offline reader)."""
        _, out, _ = self.queue("list", "--json", check=0)
        return {o["queue_id"]: o["queue_name"]
                for o in (json.loads(ln) for ln in out.splitlines() if ln.strip())}

    def wait_listed(self, want):
        """Waits until the spool on disk says `want` (the answer may precede the write)."""
        return wait_for(lambda: self.listed() == want, WAIT, "queue list == %r" % want,
                        lambda: "listed: %r\nlog:\n%s" % (self.listed(), self.log()))

    def events(self, qid, event):
        try:
            with open(self.acct, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        out = []
        for ln in data.split(b"\n")[:-1]:
            if ln.strip():
                e = json.loads(ln)
                if e.get("queue_id") == qid and e.get("event") == event:
                    out.append(e)
        return out

    def wait_event(self, qid, event, n, timeout=WAIT):
        return wait_for(lambda: (lambda ev: ev if len(ev) >= n else None)(self.events(qid, event)),
                        timeout, "%d %s event(s) for %s" % (n, event, qid),
                        lambda: "log:\n%s" % self.log())

    def request(self, data, timeout=10.0, eof=False):
        """Raw bytes to the control socket (then EOF if eof); the answer (until EOF)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.sock)
            s.sendall(data)
            if eof:
                s.shutdown(socket.SHUT_WR)
            buf = b""
            while True:
                b = s.recv(4096)
                if not b:
                    return buf
                buf += b
        finally:
            s.close()


@pytest.fixture
def daemons(posthaste):
    started = []

    def start(dir_, **kw):
        d = Daemon(dir_, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


# --------------------------------------------------------------------------- delivery off


def test_live_hold_release_delete_without_delivery(daemons, tmp_path):
    d = daemons(tmp_path, args=["--no-delivery"])
    ids = [d.send("r%d@example.com" % i, "m%d" % i) for i in range(4)]
    d.wait_listed({i: "active" for i in ids})

    _, out, err = d.queue("hold", ids[0], check=0)
    assert err == "" and out == "posthaste queue hold: held 1 message\n"
    want = {i: "active" for i in ids}
    want[ids[0]] = "hold"
    d.wait_listed(want)  # the daemon's state record, read back from the disk

    # refusals, per id, with the offline path's words; exit 1
    _, out, err = d.queue("hold", ids[0].lower(), check=1)
    assert err.strip() == "posthaste queue hold: %s is on hold already" % ids[0].lower()
    assert out == "posthaste queue hold: held 0 messages\n"
    _, _, err = d.queue("release", ids[1], check=1)
    assert err.strip() == "posthaste queue release: %s is not on hold" % ids[1]
    missing = "%016X" % (int(ids[0], 16) ^ 0x8000)
    for verb in ("hold", "release", "delete", "flush"):
        _, _, err = d.queue(verb, missing, check=1)
        assert err.strip() == "posthaste queue %s: no message %s in the queue" % (verb, missing)
    _, _, err = d.queue("delete", "nothex", check=1)
    assert "no message nothex in the queue" in err
    # one good id, one bad: the good one is done, the exit says one failed
    _, out, err = d.queue("release", missing, ids[0], check=1)
    assert out == "posthaste queue release: released 1 message\n" and missing in err
    want[ids[0]] = "active"
    d.wait_listed(want)

    _, out, _ = d.queue("delete", ids[2], check=0)
    assert out == "posthaste queue delete: deleted 1 message\n"
    del want[ids[2]]
    d.wait_listed(want)
    _, _, err = d.queue("delete", ids[2], check=1)
    assert "no message %s in the queue" % ids[2] in err

    # nothing delivers: a flush has nothing to hurry
    _, out, _ = d.queue("flush", check=0)
    assert out == "posthaste queue flush: flushed 0 messages\n"

    # ALL, over every worker
    _, out, _ = d.queue("hold", ids[1], check=0)
    _, out, _ = d.queue("hold", "ALL", check=0)
    assert out == "posthaste queue hold: held 2 messages\n"  # ids[1] was held already
    d.wait_listed({i: "hold" for i in want})
    _, _, err = d.queue("flush", ids[3], check=1)
    assert "on hold; release it first" in err

    # a hold survives a restart (the daemon recovers it as held)
    d.stop()
    assert not os.path.exists(d.sock)
    d = daemons(tmp_path, args=["--no-delivery"])
    assert re.search(r"recovered 0 queued messages from \d+ segments in \d+ ms, 3 held",
                     d.log()), d.log()
    _, out, _ = d.queue("release", "ALL", check=0)
    assert out == "posthaste queue release: released 3 messages\n"
    d.wait_listed({i: "active" for i in want})
    _, out, _ = d.queue("release", "ALL", check=0)
    assert out == "posthaste queue release: released 0 messages\n"
    _, out, _ = d.queue("delete", "ALL", check=0)
    assert out == "posthaste queue delete: deleted 3 messages\n"
    d.wait_listed({})
    # and messages that arrive later are known to ALL too
    late = d.send("late@example.com", "late")
    _, out, _ = d.queue("delete", "ALL", check=0)
    assert out == "posthaste queue delete: deleted 1 message\n", late
    d.wait_listed({})
    d.stop()
    d = daemons(tmp_path, args=["--no-delivery"])
    assert re.search(r"recovered 0 queued messages", d.log()), d.log()
    d.stop()


def test_control_socket_protocol(daemons, tmp_path):
    d = daemons(tmp_path, args=["--no-delivery"], workers=3)
    st = os.stat(d.sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    qid = d.send("r@example.com", "proto")
    cases = [
        (b"hold %s\n" % qid.encode(), b"ok 1\n"),
        (b"hold %s\r\n" % qid.encode(), b"error already on hold\n"),
        (b"release ALL\n", b"ok 1\n"),
        (b"release ALL\n", b"ok 0\n"),
        (b"flush\n", b"ok 0\n"),
        (b"flush ALL\n", b"ok 0\n"),
        (b"hold\n", b"error a queue id or ALL is required\n"),
        (b"hold 12\n", b"error bad queue id (16 hex digits expected)\n"),
        (b"hold ALL ALL\n", b"error one queue id or ALL expected\n"),
        (b"frobnicate ALL\n", b"error unknown command\n"),
        (b"\n", b"error empty request\n"),
        (b"hold " + b"A" * 600 + b"\n", b"error request too long\n"),
        (b"delete %s\n" % qid.encode(), b"ok 1\n"),
        (b"delete %s\n" % qid.encode(), b"error no such message\n"),
    ]
    for req, want in cases:
        assert d.request(req) == want, (req, d.log())
    qid = d.send("r@example.com", "eof")
    assert d.request(b"hold %s" % qid.encode(), eof=True) == b"ok 1\n"  # EOF ends the line
    assert d.request(b"", eof=True) == b""  # nothing asked, nothing answered
    # a client that says nothing is dropped after a few seconds, with a reason
    t0 = time.monotonic()
    assert d.request(b"", timeout=15.0) == b"error timed out waiting for the request\n"
    assert time.monotonic() - t0 < 10.0
    # ... and a connection left open does not hold up the daemon's stop
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(d.sock)
        t0 = time.monotonic()
        d.stop()
        assert time.monotonic() - t0 < 3.0
    finally:
        s.close()
    assert not os.path.exists(d.sock)


def test_control_socket_from_the_configuration(daemons, tmp_path):
    sock = str(tmp_path / "ctl.sock")
    d = daemons(tmp_path, args=["--no-delivery"], extra=["control_socket = %s" % sock])
    d.sock = sock
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert not os.path.exists(os.path.join(d.spool, "control.sock"))
    qid = d.send("r@example.com", "conf")
    _, out, _ = d.queue("hold", qid, check=0)  # --config: the file names the socket
    assert out == "posthaste queue hold: held 1 message\n"
    d.wait_listed({qid: "hold"})
    d.stop()
    assert not os.path.exists(sock)


# --------------------------------------------------------------------------- delivery on


def delivering(daemons, bench, tmp_path, sink_port):
    return daemons(tmp_path, extra=[
        "resolver = 127.0.0.1:1",  # never asked: the route is an address literal
        "route.slow.test = [127.0.0.1]:%d" % sink_port,
        "retry_min = 1h",
        "retry_max = 2h",
        "connect_timeout = 5s",
        "delivery_idle_timeout = 300ms",
        "log_level = debug",
    ])


def control_retrying_busy(d, *args):
    """A control verb, again while the message is being delivered (bounded)."""
    deadline = time.monotonic() + WAIT
    while True:
        rc, out, err = d.queue(*args)
        if rc == 0 or "being delivered" not in err or time.monotonic() > deadline:
            return rc, out, err
        time.sleep(0.05)


def test_live_control_with_delivery(daemons, bench, sink, tmp_path):
    s = sink("--fail", "RCPT:450:100", "--workers", "1", "--quiet")
    d = delivering(daemons, bench, tmp_path, s.port)
    qid = d.send("user@slow.test", "deferred")
    ev = d.wait_event(qid, "transient_failure", 1)
    assert ev[0]["attempt"] == 1 and "450" in ev[0]["reply"], ev
    time.sleep(0.3)
    assert len(d.events(qid, "transient_failure")) == 1  # retry_min = 1h: it waits

    # flush (all): tried again at once
    rc, out, err = control_retrying_busy(d, "flush")
    assert rc == 0 and out == "posthaste queue flush: flushed 1 message\n", (out, err)
    ev = d.wait_event(qid, "transient_failure", 2, timeout=5.0)
    assert ev[1]["attempt"] == 2, ev
    # flush ID: the same for one message
    rc, out, err = control_retrying_busy(d, "flush", qid)
    assert rc == 0 and out == "posthaste queue flush: flushed 1 message\n", (out, err)
    ev = d.wait_event(qid, "transient_failure", 3, timeout=5.0)
    assert ev[2]["attempt"] == 3, ev

    # hold of a deferred message: on hold on disk, not tried by a flush
    rc, out, err = control_retrying_busy(d, "hold", qid)
    assert rc == 0 and out == "posthaste queue hold: held 1 message\n", (out, err)
    d.wait_listed({qid: "hold"})
    _, out, _ = d.queue("flush", check=0)
    assert out == "posthaste queue flush: flushed 0 messages\n"
    _, _, err = d.queue("flush", qid, check=1)
    assert "on hold; release it first" in err
    time.sleep(0.3)
    assert len(d.events(qid, "transient_failure")) == 3
    # release: due now
    _, out, _ = d.queue("release", qid, check=0)
    assert out == "posthaste queue release: released 1 message\n"
    ev = d.wait_event(qid, "transient_failure", 4, timeout=5.0)
    assert ev[3]["attempt"] == 4, ev

    # ALL with a second message
    qid2 = d.send("other@slow.test", "second")
    d.wait_event(qid2, "transient_failure", 1)
    rc, out, err = control_retrying_busy(d, "hold", "ALL")
    assert rc == 0, (out, err)
    n = int(re.match(r"posthaste queue hold: held (\d+) messages?\n", out).group(1))
    if n < 2:  # one was being delivered: ALL skips it; once more
        time.sleep(0.2)
        d.queue("hold", "ALL", check=0)
    d.wait_listed({qid: "hold", qid2: "hold"})
    _, out, _ = d.queue("release", "ALL", check=0)
    assert out == "posthaste queue release: released 2 messages\n"
    d.wait_event(qid, "transient_failure", 5, timeout=5.0)
    d.wait_event(qid2, "transient_failure", 2, timeout=5.0)
    d.wait_listed({qid: "active", qid2: "active"})

    # delete of a deferred message: gone, logged, and not back after a restart
    rc, out, err = control_retrying_busy(d, "delete", qid)
    assert rc == 0 and out == "posthaste queue delete: deleted 1 message\n", (out, err)
    d.wait_event(qid, "deleted", 1)
    d.wait_listed({qid2: "active"})
    tries = len(d.events(qid, "transient_failure"))
    rc, out, err = control_retrying_busy(d, "delete", "ALL")
    assert rc == 0 and out == "posthaste queue delete: deleted 1 message\n", (out, err)
    d.wait_listed({})
    d.stop()
    d = delivering(daemons, bench, tmp_path, s.port)
    assert re.search(r"recovered 0 queued messages", d.log()), d.log()
    _, out, _ = d.queue("flush", check=0)
    assert out == "posthaste queue flush: flushed 0 messages\n"
    time.sleep(0.5)
    assert len(d.events(qid, "transient_failure")) == tries
    assert d.listed() == {}
    d.stop()
    s.stop()
