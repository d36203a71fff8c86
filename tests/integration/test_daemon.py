"""Black-box tests of the posthaste daemon (build/mta/posthaste/posthaste).

Every 250 must mean "durable in the spool": the spool's files are read back with
spool_reader, an independent Python reader of the on-disk format.

Run inside a private network namespace (only 127.0.0.1 is used), as root for the
disk-full tests (they mount a small tmpfs in a private mount namespace):

    unshare -n sh -c 'ip link set lo up && python3 -m pytest -q -p no:cacheprovider \
        tests/integration/test_daemon.py'

POSTHASTE_CRASH_SEED=N repeats the crash test's kill instants.
"""
import email.utils
import os
import random
import re
import shutil
import signal
import smtplib
import subprocess
import time

import pytest

import phtest
import spool_reader

POSTHASTE = os.path.join(phtest.BUILD_DIR, "mta", "posthaste", "posthaste")

QUEUED_RE = re.compile(r"^2\.0\.0 Ok: queued as ([0-9A-Fa-f]{16})$")
RECOVERED_RE = re.compile(r"spool: (.*): recovered (\d+) queued messages from (\d+) segments in (\d+) ms")

MiB = 1024 * 1024


@pytest.fixture(scope="session")
def posthaste():
    if not (os.path.isfile(POSTHASTE) and os.access(POSTHASTE, os.X_OK)):
        pytest.skip("the posthaste daemon is not built: %s is missing (build with `ninja -C %s` "
                    "or set POSTHASTE_BUILD)" % (POSTHASTE, phtest.BUILD_DIR))
    return POSTHASTE


# --------------------------------------------------------------------------- the daemon


class Daemon:
    """One posthaste process listening on 127.0.0.1:<free port>.

    prefix: a command that runs the daemon (nsenter ...), exec'ing it so that the
    Popen PID is the daemon's own."""

    def __init__(self, binary, tmpdir, spool, args=(), workers=2, port=None, prefix=(),
                 ready=True, procs=None):
        self.binary = binary
        self.tmpdir = str(tmpdir)
        self.spool = str(spool)
        self.port = port or phtest.free_port()
        self.addr = "127.0.0.1:%d" % self.port
        self.cmd = list(prefix) + [binary, "--listen", self.addr, "--spool", self.spool,
                                   "--workers", str(workers), "--no-delivery"] + [str(a) for a in args]
        n = 0
        for n in range(1, 10000):
            self.err_path = os.path.join(self.tmpdir, "posthaste-%d-%d.err" % (self.port, n))
            if not os.path.exists(self.err_path):
                break
        self.out_path = self.err_path[:-4] + ".out"
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL)
        if procs is not None:
            procs.procs.append(self.proc)
        self.pid = self.proc.pid
        self.returncode = None
        if ready:
            self.wait_ready()

    def wait_ready(self):
        try:
            s = phtest.wait_connectable("127.0.0.1", self.port, proc=self.proc,
                                        what="posthaste (%s)" % " ".join(self.cmd))
        except AssertionError as e:
            raise AssertionError("%s\nstderr:\n%s" % (e, self.log()))
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

    def recovered(self):
        """(messages, segments) from the start-up line; fails if it is missing."""
        m = RECOVERED_RE.search(self.log())
        assert m, "no 'spool: DIR: recovered N queued messages from M segments in T ms' line " \
                  "in the log:\n%s" % self.log(4000)
        return int(m.group(2)), int(m.group(3))

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=phtest.STOP_TIMEOUT, expect_rc=0):
        """Signals the daemon and waits for it; checks the exit status (None: no check)."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            phtest.stop_process(self.proc, signal.SIGKILL)
            raise AssertionError("posthaste (pid %d) did not exit within %.0f s of signal %d; "
                                 "log:\n%s" % (self.pid, timeout, sig, self.log(4000)))
        self._close()
        if expect_rc is not None:
            assert self.returncode == expect_rc, (
                "posthaste exited with status %s after signal %d (expected %s); log:\n%s"
                % (self.returncode, sig, expect_rc, self.log(4000)))
        return self.returncode

    def kill9(self):
        return self.stop(signal.SIGKILL, expect_rc=None)

    def _close(self):
        for f in (self._out, self._err):
            try:
                f.close()
            except OSError:
                pass

    def kill(self):
        phtest.stop_process(self.proc, signal.SIGTERM, 5.0)
        self._close()


@pytest.fixture
def daemon(posthaste, tmp_path):
    """Factory: daemon(spool, *args, **kw) -> Daemon; every one still running at teardown
    is stopped by PID."""
    started = []

    def start(spool, *args, **kw):
        d = Daemon(posthaste, tmp_path, spool, args, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


def queued_id(code, text, what="message"):
    """The queue id of a `250 2.0.0 Ok: queued as <16 hex>` reply (text without the code)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = text.strip()
    m = QUEUED_RE.match(text)
    assert code == 250 and m, ("%s: expected '250 2.0.0 Ok: queued as <16 hex digits>', got "
                               "%r" % (what, "%s %s" % (code, text)))
    return m.group(1).upper()


def reply_id(r, what="message"):
    return queued_id(r.code, r.text, what)


def config_file(tmp_path, text, name="posthaste.conf"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def check_config_values(out):
    """{key: [values]} of `key = value` lines (# comments and config quoting removed)."""
    vals = {}
    for ln in out.splitlines():
        s = ln.strip()
        if not s or s.startswith("#") or "=" not in s:
            continue
        k, v = s.split("=", 1)
        k, v = k.strip(), v.strip()
        if v.startswith('"'):
            out_v, i = [], 1
            while i < len(v) and v[i] != '"':
                if v[i] == "\\" and i + 1 < len(v):
                    i += 1
                out_v.append(v[i])
                i += 1
            v = "".join(out_v)
        else:
            v = re.sub(r"\s+#.*$", "", v)
        vals.setdefault(k, []).append(v)
    return vals


TRACE_RE = re.compile(
    r"^Received: from (?P<helo>\S+) \(\[(?P<peer>[0-9.]+)\]\) by (?P<by>\S+) \(Posthaste\) "
    r"with (?P<proto>SMTP|ESMTP|UTF8SMTP) id (?P<id>[0-9A-F]{16})(?: for <(?P<for>[^>]*)>)?; "
    r"(?P<date>.+)$")


def split_trace(m, helo=None):
    """The daemon prepends one Received: trace header (RFC 5321 4.4) to the message it
    stores. Checks that header against m's envelope and returns the rest of the stored
    body: the message octets as received (after dot-unstuffing)."""
    body = m.body
    assert body.startswith(b"Received: "), "%s: the stored body does not begin with a " \
        "Received: header: %r" % (m.id, body[:200])
    end = 0
    for _ in range(100):
        i = body.find(b"\r\n", end)
        assert i >= 0, "%s: unterminated Received: header" % m.id
        end = i + 2
        if body[end:end + 1] not in (b" ", b"\t"):
            break
    field = body[:end - 2]
    text = re.sub(r"\r\n[ \t]+", " ", field.decode("utf-8", "replace"))
    t = TRACE_RE.match(text)
    assert t, "%s: malformed trace header %r" % (m.id, field)
    assert t.group("id") == m.id, "%s: the trace header names id %s" % (m.id, t.group("id"))
    assert t.group("peer") == m.peer.decode(), "%s: trace header peer %s, envelope %r" % (
        m.id, t.group("peer"), m.peer)
    if helo is not None:
        assert t.group("helo") == helo.decode(), "%s: trace header HELO %r, sent %r" % (
            m.id, t.group("helo"), helo)
    if t.group("for") is not None:
        assert [t.group("for").encode("utf-8")] == m.recipients, (
            "%s: trace header 'for <%s>' but recipients %r" % (m.id, t.group("for"), m.recipients))
    want_proto = ("UTF8SMTP" if m.flags & spool_reader.ENV_SMTPUTF8 else
                  "ESMTP" if m.flags & spool_reader.ENV_ESMTP else "SMTP")
    assert t.group("proto") == want_proto, "%s: 'with %s', expected %s" % (
        m.id, t.group("proto"), want_proto)
    try:
        when = email.utils.parsedate_to_datetime(t.group("date")).timestamp()
    except (TypeError, ValueError):
        raise AssertionError("%s: trace header date %r does not parse" % (m.id, t.group("date")))
    assert abs(when - m.received_ms / 1000.0) < 120, "%s: trace date %r, received %d ms" % (
        m.id, t.group("date"), m.received_ms)
    return body[end:]


def scan_ok(spool, **kw):
    """spool_reader.scan with the checks that hold for every spool the daemon wrote."""
    sc = spool_reader.scan(spool, **kw)
    assert not sc.bad_envelopes, "records with a valid checksum but a bad envelope: %r" % (
        sc.bad_envelopes[:10],)
    return sc


def assert_no_damage(sc):
    assert not sc.bad, "damaged records after a clean stop: %r" % (sc.bad[:10],)
    assert not sc.duplicates, "queue ids found in more than one record: %r" % (sc.duplicates[:10],)
    bad_segs = [s for s in sc.segments if s.error]
    assert not bad_segs, "bad segment headers: %r" % (bad_segs,)


# --------------------------------------------------------------------------- defaults + flags


def _data_message(i):
    """(sender, recipients, msg bytes, mail options) for smtplib message i."""
    nr = 3 if i % 4 == 0 else 2 if i % 4 == 1 else 1
    rcpts = ["rcpt%d.%d@example.org" % (i, k) for k in range(nr)]
    sender = "sender%d@example.com" % i
    lines = [b"Subject: message %d" % i, b"From: <%s>" % sender.encode(), b"",
             b"token msg-%03d" % i]
    if i % 3 == 0:
        lines += [b".leading dot", b"..two leading dots", b"."]  # dot-stuffed by smtplib
    if i % 5 == 0:
        lines += [b"x" * 990]
    lines += [b"line %d of message %d" % (k, i) for k in range(i % 7)]
    msg = b"\r\n".join(lines)
    if i % 2:
        msg += b"\r\n"
    opts = []
    if i == 7:
        sender = ""  # the null sender
    if i == 9:
        msg = b""  # an empty message: the server stores CRLF
    if i == 11:
        opts = ["BODY=8BITMIME"]
        msg = "Subject: 8 bit\r\n\r\nd\u00e9j\u00e0 vu, na\u00efve caf\u00e9\r\n".encode("utf-8")
    return sender, rcpts, msg, opts


def test_defaults_and_flags(daemon, tmp_path):
    spool = tmp_path / "spool"
    d = daemon(spool, workers=2)
    n, segs = d.recovered()
    assert (n, segs) == (0, 0), "a new spool recovered %d messages from %d segments" % (n, segs)

    sent = {}  # id -> dict(sender, rcpts, body, flags that must be set, helo)

    def record(qid, **kw):
        assert qid not in sent, "queue id %s given twice" % qid
        sent[qid] = kw

    # 48 messages over smtplib, one session
    with smtplib.SMTP("127.0.0.1", d.port, timeout=60) as s:
        code, _ = s.ehlo("client.example")
        assert code == 250
        assert s.has_extn("smtputf8") and s.has_extn("chunking") and s.has_extn("dsn"), \
            "EHLO lacks SMTPUTF8/CHUNKING/DSN: %r" % (s.esmtp_features,)
        for i in range(46):
            sender, rcpts, msg, opts = _data_message(i)
            code, text = s.mail(sender, opts)
            assert code == 250, "MAIL %d: %s %r" % (i, code, text)
            for r in rcpts:
                code, text = s.rcpt(r)
                assert code == 250, "RCPT %d: %s %r" % (i, code, text)
            code, text = s.data(msg)
            flags = spool_reader.ENV_ESMTP | (spool_reader.ENV_8BITMIME if opts else 0)
            record(queued_id(code, text, "message %d" % i), sender=sender.encode(),
                   rcpts=[r.encode() for r in rcpts], body=phtest.smtplib_body(msg),
                   flags=flags, helo=b"client.example", envid=b"")
        # SMTPUTF8: UTF-8 addresses and body
        u_from, u_to = "s\u00e9nder@b\u00fccher.example", "j\u00fcrgen@b\u00fccher.example"
        u_msg = "Subject: gr\u00fc\u00dfe\r\n\r\nso\u00f1o \u65e5\u672c\r\n".encode("utf-8")
        code, text = s.mail(u_from, ["SMTPUTF8", "BODY=8BITMIME"])
        assert code == 250, "MAIL SMTPUTF8: %s %r" % (code, text)
        code, text = s.rcpt(u_to)
        assert code == 250, "RCPT SMTPUTF8: %s %r" % (code, text)
        code, text = s.data(u_msg)
        record(queued_id(code, text, "the SMTPUTF8 message"), sender=u_from.encode("utf-8"),
               rcpts=[u_to.encode("utf-8")], body=phtest.smtplib_body(u_msg),
               flags=spool_reader.ENV_SMTPUTF8 | spool_reader.ENV_8BITMIME | spool_reader.ENV_ESMTP,
               helo=b"client.example", envid=b"")
        s.command_encoding = "ascii"
        # DSN parameters
        dsn_msg = b"Subject: dsn\r\n\r\nwith DSN parameters\r\n"
        code, text = s.mail("dsn@example.com", ["RET=HDRS", "ENVID=env-42"])
        assert code == 250, "MAIL RET ENVID: %s %r" % (code, text)
        code, text = s.rcpt("dsn-rcpt@example.org",
                            ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;orig@example.org"])
        assert code == 250, "RCPT NOTIFY ORCPT: %s %r" % (code, text)
        code, text = s.data(dsn_msg)
        qid = queued_id(code, text, "the DSN message")
        record(qid, sender=b"dsn@example.com", rcpts=[b"dsn-rcpt@example.org"],
               body=phtest.smtplib_body(dsn_msg),
               flags=spool_reader.ENV_RET_HDRS | spool_reader.ENV_ESMTP,
               helo=b"client.example", envid=b"env-42", dsn=True)
    assert len(sent) == 48

    # one over DATA with explicit dot-stuffing on a raw socket
    dlg = phtest.Dialogue("127.0.0.1", d.port)
    try:
        dlg.cmd("EHLO raw.example", "250")
        dlg.cmd("MAIL FROM:<raw@example.com>", "250")
        dlg.cmd("RCPT TO:<raw1@example.org>", "250")
        dlg.cmd("RCPT TO:<raw2@example.org>", "250")
        dlg.cmd("DATA", "354")
        wire = (b"Subject: raw\r\n\r\n..one dot\r\n...two dots\r\n.x\r\nmid.dle\r\n"
                b"..\r\nend\r\n")
        dlg.send(wire + b".\r\n")
        record(reply_id(dlg.expect("250"), "the raw DATA message"), sender=b"raw@example.com",
               rcpts=[b"raw1@example.org", b"raw2@example.org"], body=phtest.dot_unstuff(wire),
               flags=spool_reader.ENV_ESMTP, helo=b"raw.example", envid=b"")
        # and one over BDAT, in two chunks: stored as sent, dots and all
        c1 = b"Subject: bdat\r\n\r\n.\r\n..not unstuffed\r\n" + b"y" * 500 + b"\r\n"
        c2 = b"second chunk\r\n.\r\n"
        dlg.cmd("MAIL FROM:<bdat@example.com>", "250")
        dlg.cmd("RCPT TO:<bdat@example.org>", "250")
        dlg.send(b"BDAT %d\r\n" % len(c1) + c1)
        dlg.expect("250")
        dlg.send(b"BDAT %d LAST\r\n" % len(c2) + c2)
        record(reply_id(dlg.expect("250"), "the BDAT message"), sender=b"bdat@example.com",
               rcpts=[b"bdat@example.org"], body=c1 + c2,
               flags=spool_reader.ENV_CHUNKED | spool_reader.ENV_ESMTP, helo=b"raw.example",
               envid=b"")
        dlg.cmd("QUIT", "221")
    finally:
        dlg.close()
    assert len(sent) == 50

    d.stop(signal.SIGTERM)  # exit status 0 is checked

    sc = scan_ok(str(spool))
    assert_no_damage(sc)
    assert sc.ids == set(sent), ("spool ids differ from the acknowledged ones: missing %r, "
                                 "unexpected %r" % (sorted(set(sent) - sc.ids),
                                                    sorted(sc.ids - set(sent))))
    assert len(sc.records) == 50, sc.summary()
    for qid, want in sent.items():
        m = sc.messages[qid]
        assert m.sender == want["sender"], "%s: sender %r, expected %r" % (qid, m.sender, want["sender"])
        assert m.recipients == want["rcpts"], "%s: recipients %r, expected %r" % (
            qid, m.recipients, want["rcpts"])
        msg = split_trace(m, want["helo"])
        assert msg == want["body"], "%s: body differs:\n stored   %r\n expected %r" % (
            qid, msg[:300], want["body"][:300])
        assert m.body_len == len(m.body)
        assert m.helo == want["helo"], "%s: helo %r, expected %r" % (qid, m.helo, want["helo"])
        assert m.peer == b"127.0.0.1", "%s: peer %r" % (qid, m.peer)
        assert m.envid == want["envid"], "%s: envid %r, expected %r" % (qid, m.envid, want["envid"])
        assert m.flags & want["flags"] == want["flags"], "%s: envelope flags 0x%x lack 0x%x" % (
            qid, m.flags, want["flags"])
        if not want["flags"] & spool_reader.ENV_SMTPUTF8:
            assert not m.flags & spool_reader.ENV_SMTPUTF8, "%s: SMTPUTF8 flag set" % qid
        if not want["flags"] & spool_reader.ENV_CHUNKED:
            assert not m.flags & spool_reader.ENV_CHUNKED, "%s: CHUNKED flag set" % qid
        if want.get("dsn"):
            addr, notify, orcpt = m.rcpts[0]
            assert notify != 0, "%s: NOTIFY=SUCCESS,FAILURE stored as 0" % qid
            assert b"orig@example.org" in orcpt, "%s: ORCPT stored as %r" % (qid, orcpt)
        else:
            assert all(r[2] == b"" for r in m.rcpts), "%s: ORCPT without one: %r" % (qid, m.rcpts)
        # received: a sane unix time in ms
        assert abs(m.received_ms / 1000.0 - time.time()) < 3600, "%s: received %d" % (
            qid, m.received_ms)

    d2 = daemon(spool, workers=2)
    n, segs = d2.recovered()
    assert n == 50, "restart: recovered %d messages, expected 50; log:\n%s" % (n, d2.log(3000))
    assert segs >= 1
    d2.stop(signal.SIGTERM)
    sc2 = scan_ok(str(spool), cache=False)
    assert_no_damage(sc2)
    assert sc2.ids == set(sent) and len(sc2.records) == 50, "after a restart: " + sc2.summary()


# --------------------------------------------------------------------------- --check-config


def run_check(posthaste, procs, tmp_path, *args):
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    cmd = [posthaste] + [str(a) for a in args]
    p = procs.spawn(cmd, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    stdin=subprocess.DEVNULL)
    try:
        out, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        phtest.stop_process(p, signal.SIGKILL)
        raise AssertionError("%s did not exit within 30 s" % " ".join(cmd))
    return p.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def test_check_config_defaults(posthaste, procs, tmp_path):
    rc, out, err = run_check(posthaste, procs, tmp_path, "--check-config")
    assert rc == 0, "--check-config: status %s\nstdout:\n%s\nstderr:\n%s" % (rc, out, err)
    v = check_config_values(out)
    assert v.get("listen") == ["127.0.0.1:2525"], "listen lines: %r\n%s" % (v.get("listen"), out)
    assert v.get("spool_dir") == ["./var/spool"], "spool_dir: %r\n%s" % (v.get("spool_dir"), out)
    assert v.get("durability") == ["fsync"], out
    assert re.search(r"^listen = 127\.0\.0\.1:2525$", out, re.M), out
    assert re.search(r'^spool_dir = "?\./var/spool"?$', out, re.M), out
    # a check creates nothing
    assert not (tmp_path / "cwd" / "var").exists(), "--check-config created ./var"


def test_check_config_bad_line(posthaste, procs, tmp_path):
    cases = [
        ("# a comment\nworkers = 2\nthis line is not a setting\n", 3),
        ("workers = 2\n\nno_such_key = 1\n", 3),
        ("\n\n\n\nworkers = many\n", 5),
        ('listen = 127.0.0.1:2600\nspool_dir = "unterminated\n', 2),
        ("durability = sometimes\n", 1),
    ]
    for k, (text, line) in enumerate(cases):
        path = config_file(tmp_path, text, "bad%d.conf" % k)
        for args in (["--config", path, "--check-config"], ["--config", path]):
            rc, out, err = run_check(posthaste, procs, tmp_path, *args)
            assert rc == 1, "%s with %r: status %s, expected 1\nstdout:\n%s\nstderr:\n%s" % (
                args, text, rc, out, err)
            assert "%s:%d" % (path, line) in err, (
                "%s with %r: the error does not name %s:%d:\n%s" % (args, text, path, line, err))
    rc, out, err = run_check(posthaste, procs, tmp_path, "--config", str(tmp_path / "missing.conf"),
                             "--check-config")
    assert rc == 1 and "missing.conf" in err, (rc, err)


def test_check_config_file_and_flags(posthaste, procs, tmp_path):
    path = config_file(tmp_path, (
        "# test configuration\n"
        "listen = 127.0.0.1:2600\n"
        "listen = 127.0.0.1:2601\n"
        "spool_dir = /file/spool\n"
        "durability = batch\n"
        "workers = 3\n"
        "hostname = file.example\n"
        "spool_reserve = 4M\n"))
    rc, out, err = run_check(posthaste, procs, tmp_path, "--config", path, "--check-config")
    assert rc == 0, (rc, out, err)
    v = check_config_values(out)
    assert v["listen"] == ["127.0.0.1:2600", "127.0.0.1:2601"], out
    assert v["spool_dir"] == ["/file/spool"], out
    assert v["durability"] == ["batch"], out
    assert v["workers"] == ["3"], out
    assert v["hostname"] == ["file.example"], out

    # flags win over the file, wherever they stand on the command line
    for args in (["--config", path, "--spool", "/flag/spool", "--workers", "5", "--durability",
                  "none", "--hostname", "flag.example", "--check-config"],
                 ["--check-config", "--spool", "/flag/spool", "--workers", "5", "--durability",
                  "none", "--hostname", "flag.example", "--config", path]):
        rc, out, err = run_check(posthaste, procs, tmp_path, *args)
        assert rc == 0, (args, rc, out, err)
        v = check_config_values(out)
        assert v["listen"] == ["127.0.0.1:2600", "127.0.0.1:2601"], (args, out)
        assert v["spool_dir"] == ["/flag/spool"], (args, out)
        assert v["workers"] == ["5"], (args, out)
        assert v["durability"] == ["none"], (args, out)
        assert v["hostname"] == ["flag.example"], (args, out)

    # --listen flags replace the file's listeners
    rc, out, err = run_check(posthaste, procs, tmp_path, "--config", path, "--listen",
                             "127.0.0.1:2700", "--listen", "127.0.0.1:2701", "--check-config")
    assert rc == 0, (rc, out, err)
    v = check_config_values(out)
    assert v["listen"] == ["127.0.0.1:2700", "127.0.0.1:2701"], out
    assert v["spool_dir"] == ["/file/spool"], out

    # a bad flag value: status 1, naming the flag
    rc, out, err = run_check(posthaste, procs, tmp_path, "--config", path, "--durability", "often",
                             "--check-config")
    assert rc == 1 and "durability" in err, (rc, out, err)


# --------------------------------------------------------------------------- the spool lock


def test_two_daemons_one_spool(daemon, posthaste, tmp_path):
    spool = tmp_path / "spool"
    d1 = daemon(spool)
    d2 = Daemon(posthaste, tmp_path, spool, ready=False)
    try:
        t0 = time.monotonic()
        try:
            rc = d2.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            raise AssertionError("a second daemon on the same spool is still running after 5 s; "
                                 "log:\n%s" % d2.log(3000))
        assert rc == 1, "second daemon: exit status %s, expected 1; log:\n%s" % (rc, d2.log(3000))
        assert "in use by another posthaste" in d2.log(), (
            "second daemon's message lacks 'in use by another posthaste':\n%s" % d2.log(3000))
        assert time.monotonic() - t0 < 5.0
    finally:
        d2.kill()
    # the first one still works
    assert d1.alive(), "the first daemon died: %s" % d1.log(3000)
    with smtplib.SMTP("127.0.0.1", d1.port, timeout=30) as s:
        s.ehlo("client.example")
        s.mail("a@example.com")
        s.rcpt("b@example.org")
        code, text = s.data(b"Subject: still here\r\n\r\nfirst daemon\r\n")
        qid = queued_id(code, text)
    d1.stop()
    sc = scan_ok(str(spool))
    assert_no_damage(sc)
    assert sc.ids == {qid} and len(sc.records) == 1, sc.summary()


# --------------------------------------------------------------------------- durability none


def test_durability_none_warns(daemon, tmp_path):
    spool = tmp_path / "spool"
    d = daemon(spool, "--durability", "none")
    lines = [ln for ln in d.log().splitlines() if "durability = none" in ln]
    assert lines, "no log line contains 'durability = none':\n%s" % d.log(3000)
    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
        s.ehlo("client.example")
        s.mail("a@example.com")
        s.rcpt("b@example.org")
        code, text = s.data(b"Subject: none\r\n\r\nnot synced\r\n")
        qid = queued_id(code, text)
    d.stop()
    sc = scan_ok(str(spool))
    assert sc.ids == {qid}, sc.summary()


# --------------------------------------------------------------------------- disk full


class PrivateTmpfs:
    """A tmpfs of `size` mounted on `mnt` in a private mount namespace, held by a
    `sleep` process. Commands run in it via prefix; the test reaches its files
    through /proc/<holder>/root/<mnt>. Killing the holder (by PID) ends it."""

    def __init__(self, procs, mnt, size="24m"):
        self.mnt = str(mnt)
        os.makedirs(self.mnt, exist_ok=True)
        unshare = shutil.which("unshare") or "/usr/bin/unshare"
        self.proc = procs.spawn(
            [unshare, "-m", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs -o size=%s,mode=0700 tmpfs "$1" && echo ready && exec sleep 3600'
             % size, "sh", self.mnt],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        line = self.proc.stdout.readline()  # EOF (b"") if the mount fails
        if line.strip() != b"ready":
            err = b""
            try:
                _, err = self.proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                phtest.stop_process(self.proc, signal.SIGKILL)
            raise AssertionError("cannot mount a tmpfs in a private mount namespace: %s"
                                 % err.decode("utf-8", "replace"))
        self.root = "/proc/%d/root%s" % (self.proc.pid, os.path.abspath(self.mnt))
        nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"
        self.prefix = [nsenter, "-t", str(self.proc.pid), "-m", "--"]
        st = os.statvfs(self.root)
        assert st.f_blocks * st.f_frsize <= 64 * MiB, "the tmpfs is not mounted at %s" % self.root

    def path(self, *parts):
        """The test's path to mnt/parts (through the holder's root)."""
        return os.path.join(self.root, *parts)

    def free(self):
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fill(self, leave):
        """Writes filler files until about `leave` octets stay free; returns their paths."""
        files = []
        chunk = b"\xaa" * MiB
        for k in range(100):
            free = self.free()
            if free <= leave:
                break
            p = self.path("filler-%d" % k)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            files.append(p)
            try:
                want = free - leave
                for _ in range(100000):
                    n = min(len(chunk), want)
                    if n <= 0:
                        break
                    try:
                        w = os.write(fd, chunk[:n])
                    except OSError:
                        break
                    if w <= 0:
                        break
                    want -= w
            finally:
                os.close(fd)
        return files

    def stop(self):
        phtest.stop_process(self.proc, signal.SIGKILL, 5.0)


def _need_root_tools():
    if os.geteuid() != 0:
        pytest.skip("the disk-full tests mount a tmpfs: run as root")
    for t in ("unshare", "nsenter"):
        if not (shutil.which(t) or os.access("/usr/bin/" + t, os.X_OK)):
            pytest.skip("%s is not installed" % t)


def _body(token, size):
    """A message of about `size` octets: headers, then 76-character lines; unique by token."""
    head = b"Subject: %s\r\nX-Token: %s\r\n\r\n" % (token, token)
    line = b"%s " % token
    line = (line * (76 // len(line) + 1))[:76] + b"\r\n"
    n = max(1, (size - len(head)) // len(line))
    return head + line * n


def _send_raw(dlg, sender, rcpt, body):
    """MAIL, RCPT, DATA, body. Returns ("mail"|"data", Reply): the first non-2xx/3xx reply,
    or the final reply."""
    r = dlg.cmd("MAIL FROM:<%s>" % sender)
    if r.code != 250:
        return "mail", r
    r = dlg.cmd("RCPT TO:<%s>" % rcpt)
    if r.code != 250:
        dlg.cmd("RSET", "250")
        return "rcpt", r
    r = dlg.cmd("DATA")
    if r.code != 354:
        dlg.cmd("RSET", "250")
        return "data-cmd", r
    assert not re.search(rb"(^|\n)\.", body), "test body needs dot-stuffing"
    dlg.send(body + b".\r\n")
    return "data", dlg.read_reply(60)


def _open(port):
    d = phtest.Dialogue("127.0.0.1", port, timeout=60)
    d.cmd("EHLO full.example", "250")
    return d


def test_disk_full_at_end_of_data(daemon, procs, tmp_path):
    """A spool on a 24 MiB tmpfs with no reserve: filled up, writes fail with ENOSPC:
    452 4.3.1 at the end of data; service resumes by itself once space is freed; every
    250 survives a restart, nothing refused is in the spool."""
    _need_root_tools()
    fs = PrivateTmpfs(procs, tmp_path / "mnt", "24m")
    try:
        spool_in_ns = os.path.join(fs.mnt, "spool")
        conf = config_file(tmp_path, "spool_reserve = 0\n")
        d = daemon(spool_in_ns, "--config", conf, "--durability", "fsync", prefix=fs.prefix)
        exe = os.readlink("/proc/%d/exe" % d.pid)
        assert os.path.basename(exe).startswith("posthaste"), "the PID is not the daemon's: %s" % exe
        spool = fs.path("spool")

        acked = {}  # id -> body
        refused = []  # (size, where, reply)
        fillers = fs.fill(leave=1 * MiB)
        sizes = [1024, 4096, 16384, 65536, 262144]
        dlg = _open(d.port)
        try:
            k = 0
            first_452 = None
            for k in range(400):
                size = sizes[k % len(sizes)]
                body = _body(b"full-%04d" % k, size)
                where, r = _send_raw(dlg, "a@example.com", "b@example.org", body)
                if r.code == 250:
                    assert where == "data", (where, r)
                    acked[reply_id(r, "message %d" % k)] = body
                    continue
                refused.append((size, where, r))
                assert where == "data" and phtest.reply_matches(r, "452 4.3.1"), (
                    "disk full, no reserve: expected 452 4.3.1 at the end of data, got %r at %s"
                    "\nlog:\n%s" % (r, where, d.log(3000)))
                if first_452 is None:
                    first_452 = k
                if k - first_452 >= 15:
                    break
            assert first_452 is not None, (
                "400 messages (up to 256 KiB) into a full 24 MiB tmpfs and no 452; %d MiB free"
                % (fs.free() // MiB))
            assert acked, "not a single 250 before the disk filled up"
            assert d.alive()

            # free the space: 250 again within a few seconds, with no restart
            for p in fillers:
                os.unlink(p)
            deadline = time.monotonic() + 10.0
            back = None
            for j in range(1000):
                body = _body(b"back-%04d" % j, 65536)
                where, r = _send_raw(dlg, "a@example.com", "b@example.org", body)
                if r.code == 250:
                    acked[reply_id(r, "after freeing space")] = body
                    back = time.monotonic()
                    break
                refused.append((65536, where, r))
                assert time.monotonic() < deadline, (
                    "still %r 10 s after space was freed (%d MiB free); log:\n%s"
                    % (r, fs.free() // MiB, d.log(3000)))
                time.sleep(0.2)
            assert back is not None
            for j in range(10):
                body = _body(b"more-%04d" % j, sizes[j % len(sizes)])
                where, r = _send_raw(dlg, "a@example.com", "b@example.org", body)
                acked[reply_id(r, "message %d after recovery (%s)" % (j, where))] = body
            dlg.cmd("QUIT", "221")
        finally:
            dlg.close()
        d.stop(signal.SIGTERM)

        d2 = daemon(spool_in_ns, "--config", conf, prefix=fs.prefix)
        n, _ = d2.recovered()
        sc = scan_ok(spool, cache=False)
        d2.stop(signal.SIGTERM)
        assert not sc.duplicates, sc.duplicates[:10]
        missing = set(acked) - sc.ids
        assert not missing, "acknowledged (250) but not in the spool: %r" % sorted(missing)
        extra = sc.ids - set(acked)
        assert not extra, "in the spool but never acknowledged: %r" % sorted(extra)
        assert len(sc.records) == len(acked), sc.summary()
        for qid, body in acked.items():
            assert split_trace(sc.messages[qid], b"full.example") == body, "%s: body differs" % qid
        # nothing refused made it in: every body in the spool carries an acknowledged token
        assert n == len(acked), "restart recovered %d, %d were acknowledged; log:\n%s" % (
            n, len(acked), d2.log(3000))
    finally:
        fs.stop()


def test_disk_full_reserve_at_mail(daemon, procs, tmp_path):
    """spool_reserve = 4M on a 24 MiB tmpfs: below it MAIL gets 452 4.3.1 (within the
    0.5 s check period, with slack); above it again, mail is accepted."""
    _need_root_tools()
    fs = PrivateTmpfs(procs, tmp_path / "mnt", "24m")
    try:
        spool_in_ns = os.path.join(fs.mnt, "spool")
        conf = config_file(tmp_path, "spool_reserve = 4M\n")
        d = daemon(spool_in_ns, "--config", conf, prefix=fs.prefix)
        spool = fs.path("spool")
        acked = {}
        dlg = _open(d.port)
        try:
            body = _body(b"before", 4096)
            where, r = _send_raw(dlg, "a@example.com", "b@example.org", body)
            acked[reply_id(r, "with space (%s)" % where)] = body

            fillers = fs.fill(leave=2 * MiB)
            assert fs.free() < 4 * MiB
            deadline = time.monotonic() + 5.0
            got = None
            for _ in range(1000):
                r = dlg.cmd("MAIL FROM:<a@example.com>")
                if r.code != 250:
                    got = r
                    break
                # still accepted: finish it (it must fit: 2 MiB are free)
                dlg.cmd("RCPT TO:<b@example.org>", "250")
                dlg.cmd("DATA", "354")
                body = _body(b"late-%d" % len(acked), 1024)
                dlg.send(body + b".\r\n")
                acked[reply_id(dlg.expect("250"), "below the reserve, not yet noticed")] = body
                assert time.monotonic() < deadline, (
                    "MAIL still accepted 5 s after free space fell to %d KiB (reserve 4 MiB)"
                    % (fs.free() // 1024))
                time.sleep(0.1)
            assert phtest.reply_matches(got, "452 4.3.1"), (
                "below the reserve: MAIL got %r, expected 452 4.3.1" % (got,))
            # it stays refused while below the reserve
            for _ in range(3):
                time.sleep(0.3)
                dlg.cmd("MAIL FROM:<a@example.com>", "452 4.3.1")

            for p in fillers:
                os.unlink(p)
            deadline = time.monotonic() + 5.0
            for _ in range(1000):
                r = dlg.cmd("MAIL FROM:<a@example.com>")
                if r.code == 250:
                    break
                assert phtest.reply_matches(r, "452 4.3.1"), r
                assert time.monotonic() < deadline, (
                    "MAIL still refused 5 s after space was freed (%d MiB free)"
                    % (fs.free() // MiB))
                time.sleep(0.1)
            dlg.cmd("RCPT TO:<b@example.org>", "250")
            dlg.cmd("DATA", "354")
            body = _body(b"after", 4096)
            dlg.send(body + b".\r\n")
            acked[reply_id(dlg.expect("250"), "after freeing space")] = body
            dlg.cmd("QUIT", "221")
        finally:
            dlg.close()
        d.stop(signal.SIGTERM)
        sc = scan_ok(spool, cache=False)
        assert_no_damage(sc)
        assert sc.ids == set(acked) and len(sc.records) == len(acked), (
            "spool %s; acknowledged %r" % (sc.summary(), sorted(acked)))
    finally:
        fs.stop()


# --------------------------------------------------------------------------- queue ids


def test_queue_ids_unique_across_restarts(daemon, tmp_path):
    """A queue id names one message for the life of the spool, also when the daemon
    restarts (cleanly or not) within the same second as its predecessor's last id."""
    spool = tmp_path / "spool"
    ids = []

    def one(d):
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
            s.ehlo("client.example")
            s.mail("a@example.com")
            s.rcpt("b@example.org")
            code, text = s.data(b"Subject: id\r\n\r\nrestart %d\r\n" % len(ids))
            ids.append(queued_id(code, text))

    same_second = False
    for attempt in range(5):
        time.sleep(1.02 - time.time() % 1.0)  # just after the start of a second
        t0 = int(time.time())
        d = daemon(spool, workers=1)
        one(d)
        d.kill9()
        d = daemon(spool, workers=1)
        one(d)
        d.stop()
        d = daemon(spool, workers=1)
        one(d)
        d.stop()
        if int(time.time()) == t0:
            same_second = True
            break
    assert same_second, "could not run three daemons within one second in 5 attempts"
    sc = scan_ok(str(spool), cache=False)
    dup = sorted(i for i in set(ids) if ids.count(i) > 1)
    assert not dup and not sc.duplicates, (
        "queue ids given to more than one message across restarts within one second: "
        "acknowledged %r; ids in more than one spool record: %r" % (ids, sc.duplicates))
    assert set(ids) <= sc.ids


# --------------------------------------------------------------------------- damage


def test_damaged_spool_recovery(daemon, tmp_path):
    """A bad checksum in the middle of a segment and a torn tail: the daemon and
    spool_reader both skip exactly those two records and keep every other one."""
    spool = tmp_path / "spool"
    d = daemon(spool, workers=1)
    ids = []
    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
        s.ehlo("client.example")
        for i in range(20):
            s.mail("a@example.com")
            s.rcpt("b@example.org")
            code, text = s.data(b"Subject: %d\r\n\r\n" % i + b"damage test line\r\n" * (i + 1))
            ids.append(queued_id(code, text))
    d.stop()
    sc = scan_ok(str(spool), cache=False)
    assert_no_damage(sc)
    assert sorted(m.id for m in sc.records) == sorted(ids), sc.summary()
    seg = sc.records[0].segment
    assert all(m.segment == seg for m in sc.records)
    # flip one body octet of record 7, cut the last record short
    m7, last = sc.records[7], sc.records[-1]
    with open(seg, "r+b") as f:
        f.seek(m7.offset + spool_reader.RECORD_HEADER.size + 60)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))
        f.truncate(last.offset + spool_reader.RECORD_HEADER.size + 10)
    want = set(ids) - {m7.id, last.id}
    sc2 = scan_ok(str(spool), cache=False)
    assert sc2.ids == want and len(sc2.records) == 18, sc2.summary()
    assert len(sc2.bad) == 2, sc2.bad
    d2 = daemon(spool, workers=1)
    n, _ = d2.recovered()
    assert n == 18, "recovered %d after damaging 2 of 20 records; log:\n%s" % (n, d2.log(3000))
    d2.stop()
    sc3 = scan_ok(str(spool), cache=False)
    assert sc3.ids == want and len(sc3.records) == 18, sc3.summary()


# --------------------------------------------------------------------------- crash


def read_ids(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.decode("ascii", "replace").split("\n")
    assert lines[-1] == "", "the ids file ends with a partial line: %r" % lines[-1][:100]
    bad = [ln for ln in lines[:-1] if not re.match(r"^[0-9A-Fa-f]{16}$", ln)]
    assert not bad, "lines of the ids file that are not queue ids: %r" % bad[:10]
    return [ln.upper() for ln in lines[:-1]]


def test_crash_rounds(daemon, bench, procs, tmp_path):
    """5 rounds: load with posthaste-bench send (20 connections, 1 KiB), kill -9 the daemon
    at a random instant, restart it on the same spool. Every acknowledged id must be in
    the spool; the spool holds no more messages than were ever sent; the daemon's
    'recovered N' is spool_reader's count."""
    seed = int(os.environ.get("POSTHASTE_CRASH_SEED", str(int(time.time() * 1000) % 1000000)))
    rng = random.Random(seed)
    spool = tmp_path / "spool"
    ids_file = str(tmp_path / "ids.txt")
    total_sent = total_accepted = 0
    history = []
    index = spool_reader.SpoolIndex(str(spool))
    d = daemon(spool, "--durability", "fsync", workers=2)
    assert d.recovered()[0] == 0
    for rnd in range(5):
        out = str(tmp_path / ("send-%d.out" % rnd))
        err = str(tmp_path / ("send-%d.err" % rnd))
        with open(out, "wb") as fo, open(err, "wb") as fe:
            send = procs.spawn([bench, "send", "--server", d.addr, "--connections", "20",
                                "--duration", "3", "--size", "1024", "--ids-file", ids_file,
                                "--timeout", "10", "--json"],
                               stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
        delay = rng.uniform(0.5, 2.5)
        time.sleep(delay)
        assert d.alive(), "round %d: the daemon died before the kill; log:\n%s" % (rnd, d.log(3000))
        d.kill9()
        try:
            send.wait(60)
        except subprocess.TimeoutExpired:
            phtest.stop_process(send, signal.SIGKILL)
            raise AssertionError("round %d: send did not end within 60 s" % rnd)
        with open(out) as f:
            o = f.read()
        with open(err) as f:
            e = f.read()
        js = phtest.parse_send_json(send.returncode, o, e)
        total_sent += js["sent"]
        total_accepted += js["accepted"]
        acked = read_ids(ids_file)

        d = daemon(spool, "--durability", "fsync", workers=2)
        n, segs = d.recovered()
        sc = index.refresh()
        history.append("round %d (seed %d): kill at %.2f s, sent %d, accepted %d, spool %s, "
                       "daemon recovered %d" % (rnd, seed, delay, js["sent"], js["accepted"],
                                                sc.summary(), n))
        ctx = "\n".join(history)
        assert js["accepted"] > 0, "round %d: nothing accepted before the kill\n%s" % (rnd, ctx)
        assert len(acked) == len(set(acked)), "an id was acknowledged twice\n" + ctx
        assert not sc.bad_envelopes, "records with a valid checksum but a bad envelope: %r\n%s" % (
            sc.bad_envelopes[:10], ctx)
        lost = [i for i in acked if int(i, 16) not in sc]
        assert not lost, "acknowledged but not in the spool: %d, e.g. %r\n%s" % (
            len(lost), lost[:10], ctx)
        assert sc.records <= total_sent, (
            "the spool holds %d messages, only %d were ever sent\n%s"
            % (sc.records, total_sent, ctx))
        assert n == sc.records, (
            "the daemon recovered %d messages, spool_reader finds %d\n%s\nlog:\n%s"
            % (n, sc.records, ctx, d.log(3000)))
        assert not sc.duplicates, "queue ids used twice: %r\n%s" % (sc.duplicates[:10], ctx)
        # the ids file agrees with send's own count of accepted messages
        assert len(acked) == total_accepted, (
            "send accepted %d messages in all, its --ids-file holds %d ids\n%s"
            % (total_accepted, len(acked), ctx))
    d.stop(signal.SIGTERM)
