"""End-to-end delivery by the posthaste daemon, with real peers:

- a private dnsmasq (dnstest.Dnsmasq) holds every MX/A/AAAA record; each daemon gets
  --resolver pointing at it, so the system resolver is never asked;
- `posthaste-bench sink` processes on 127.0.x.y:25 and [::1]:25 play the MX hosts
  (distinct addresses per host; port 25, as delivery by MX uses it), some with
  failure injection (--fail CMD:CODE:PERCENT);
- the sender's domain local.test is a local domain, so bounces (DSNs) land in a
  Maildir under the test's directory, where the `email` module parses them;
- the accounting log (JSON lines) says what happened to each recipient.

Every wait polls with a deadline; every process is stopped by PID at teardown.
Run inside a private network namespace, as root (port 25, 127/8 addresses):

    POSTHASTE_BUILD=$PWD/build unshare -n sh -c 'ip link set lo up && exec \
        /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/integration/test_delivery.py'
"""
import email
import email.policy
import glob
import json
import os
import re
import signal
import smtplib
import subprocess
import time

import pytest

import dnstest
import phtest

POSTHASTE = os.path.join(phtest.BUILD_DIR, "mta", "posthaste", "posthaste")
QUEUED_RE = re.compile(r"^2\.0\.0 Ok: queued as ([0-9A-F]{16})$")
ID_RE = re.compile(r"^[0-9A-F]{16}$")

LOCAL = "local.test"
ALICE = "alice@local.test"      # the usual sender: its bounces land in its Maildir
CAROL = "carol@local.test"
USERS = (ALICE, CAROL, "postmaster@local.test")

DELIVERY_TIMEOUT = 30.0   # one message through DNS, a connection and a sink (or a Maildir)
PORT25 = 25


# --------------------------------------------------------------------------- helpers


def wait_for(pred, timeout, what, diag=lambda: ""):
    """Polls pred() (every 20 ms) until it returns something true; returns that.
    Fails with `what` and diag() after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    for _ in range(1000000):
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    raise AssertionError("timed out after %.0f s waiting for %s\n%s" % (timeout, what, diag()))


class Relay:
    """One posthaste daemon that delivers: a configuration file (below, plus `extra`
    lines), a spool, an accounting log and a mailbox root in its own directory,
    listening on 127.0.0.1:<free port>."""

    def __init__(self, tmpdir, resolver, routes=(), extra="", workers=2, name="relay",
                 restart=False):
        """restart: the directory exists already; its spool, log and Maildirs are kept."""
        self.dir = os.path.join(str(tmpdir), name)
        os.makedirs(self.dir, exist_ok=restart)
        self.spool = os.path.join(self.dir, "spool")
        self.mail = os.path.join(self.dir, "mail")
        self.acct = os.path.join(self.dir, "accounting.jsonl")
        self.users = os.path.join(self.dir, "users")
        with open(self.users, "w") as f:
            f.write("# local users\n")
            for u in USERS:
                f.write("%s:*\n" % u)
        self.port = phtest.free_port()
        self.workers = workers
        lines = [
            "listen = 127.0.0.1:%d" % self.port,
            "spool_dir = %s" % self.spool,
            "workers = %d" % workers,
            "hostname = relay.posthaste.test",
            "resolver = %s" % resolver,
            "local_domains = %s" % LOCAL,
            "users_file = %s" % self.users,
            "mailbox_root = %s" % self.mail,
            "accounting_log = %s" % self.acct,
            "retry_min = 200ms",
            "retry_max = 1s",
            "connect_timeout = 5s",
            "delivery_idle_timeout = 300ms",
            "log_level = debug",
        ]
        lines += ["route.%s = %s" % (d, h) for d, h in routes]
        self.conf = os.path.join(self.dir, "posthaste.conf")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n" + extra)
        self.cmd = [POSTHASTE, "--config", self.conf]
        for n in range(1, 1000):
            self.err_path = os.path.join(self.dir, "posthaste-%d.err" % n)
            if not os.path.exists(self.err_path):
                break
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self._err,
                                     stderr=self._err)
        self.pid = self.proc.pid
        self.returncode = None
        try:
            s = phtest.wait_connectable("127.0.0.1", self.port, proc=self.proc,
                                        what="posthaste (%s)" % " ".join(self.cmd))
        except AssertionError as e:
            raise AssertionError("%s\nlog:\n%s" % (e, self.log(4000)))
        try:
            buf = phtest.read_greeting(s)
            assert buf.startswith(b"220"), "posthaste greeting: %r" % buf
            s.sendall(b"QUIT\r\n")
            s.recv(4096)
        finally:
            s.close()

    # -- the daemon

    def log(self, limit=6000):
        try:
            with open(self.err_path, "rb") as f:
                t = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return t[-limit:]

    def diag(self):
        return "accounting log:\n%s\ndaemon log (tail):\n%s" % (
            "\n".join(json.dumps(e) for e in self.events()[-40:]), self.log())

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=phtest.STOP_TIMEOUT):
        """SIGTERM by PID; the exit status must be 0."""
        if self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            phtest.stop_process(self.proc, signal.SIGKILL)
            raise AssertionError("posthaste (pid %d) did not exit within %.0f s of SIGTERM; "
                                 "log:\n%s" % (self.pid, timeout, self.log()))
        self._err.close()
        assert self.returncode == 0, "posthaste exited with status %s; log:\n%s" % (
            self.returncode, self.log())
        return self.returncode

    def kill(self):
        phtest.stop_process(self.proc, signal.SIGTERM, 5.0)
        try:
            self._err.close()
        except OSError:
            pass

    # -- sending

    def send(self, sender, rcpts, msg, mail_opts=(), rcpt_opts=None):
        """One message over smtplib; every recipient must be accepted. Its queue id.
        rcpt_opts: {recipient: [RCPT parameters]}."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as s:
            code, text = s.ehlo("client.posthaste.test")
            assert code == 250, (code, text)
            code, text = s.mail(sender, list(mail_opts))
            assert code == 250, "MAIL FROM:<%s>: %s %r" % (sender, code, text)
            for r in rcpts:
                code, text = s.rcpt(r, (rcpt_opts or {}).get(r, []))
                assert code == 250, "RCPT TO:<%s>: %s %r" % (r, code, text)
            code, text = s.data(msg)
            m = QUEUED_RE.match(text.decode("utf-8", "replace").strip())
            assert code == 250 and m, "DATA: %s %r" % (code, text)
            return m.group(1)

    # -- the accounting log

    def events(self, qid=None, event=None):
        """The accounting log's JSON objects (a partial last line is left for later)."""
        try:
            with open(self.acct, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        out = []
        for ln in data.split(b"\n")[:-1]:
            if not ln.strip():
                continue
            try:
                e = json.loads(ln)
            except ValueError as ex:
                raise AssertionError("accounting log line is not JSON (%s): %r" % (ex, ln))
            if qid is not None and e.get("queue_id") != qid:
                continue
            if event is not None and e.get("event") != event:
                continue
            out.append(e)
        return out

    def wait_event(self, qid, event, n=1, timeout=DELIVERY_TIMEOUT, pred=None):
        """Waits until the log holds n `event` lines for qid (matching pred); returns them."""
        def got():
            ev = [e for e in self.events(qid, event) if pred is None or pred(e)]
            return ev if len(ev) >= n else None
        return wait_for(got, timeout, "%d %r event(s) for %s" % (n, event, qid), self.diag)

    # -- the queue and the spool

    def queue_list(self):
        p = subprocess.run([POSTHASTE, "queue", "list", "--json", "--spool", self.spool],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=60)
        assert p.returncode == 0, "queue list: exit %d: %s" % (p.returncode, p.stderr[-2000:])
        return [json.loads(ln) for ln in p.stdout.decode().splitlines() if ln.strip()]

    def segments(self):
        return sorted(glob.glob(os.path.join(self.spool, "w*", "seg-*.log")))

    def assert_drained(self, timeout=DELIVERY_TIMEOUT):
        """Once every message is final: `queue list` prints nothing, and after the
        daemon's stop no segment file is left."""
        def empty():
            p = subprocess.run([POSTHASTE, "queue", "list", "--json", "--spool", self.spool],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=60)
            assert p.returncode == 0, "queue list: exit %d: %s" % (p.returncode, p.stderr[-2000:])
            self._last_list = p.stdout.decode("utf-8", "replace")
            return p.stdout == b""
        wait_for(empty, timeout, "an empty queue (`posthaste queue list --json` printing "
                 "nothing)", lambda: "queue list:\n%s\n%s" % (self._last_list[-3000:], self.diag()))
        assert self.segments(), "no segment file in %s while the daemon runs" % self.spool
        self.stop()
        left = self.segments()
        assert not left, ("segment files left in the spool after every message was final and "
                          "the daemon stopped: %r\n%s" % (left, self.diag()))

    # -- Maildirs

    def maildir_new(self, user):
        local, dom = user.split("@")
        return os.path.join(self.mail, dom, local, "Maildir", "new")

    def mailbox(self, user):
        """The files in user's Maildir new/, oldest name first."""
        d = self.maildir_new(user)
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out.append(f.read())
        return out

    def wait_mail(self, user, n=1, timeout=DELIVERY_TIMEOUT):
        return wait_for(lambda: (lambda m: m if len(m) >= n else None)(self.mailbox(user)),
                        timeout, "%d message(s) in the Maildir of %s" % (n, user), self.diag)


@pytest.fixture(scope="module")
def posthaste():
    if not (os.path.isfile(POSTHASTE) and os.access(POSTHASTE, os.X_OK)):
        pytest.skip("the posthaste daemon is not built: %s is missing" % POSTHASTE)
    if not dnstest.available():
        pytest.skip("dnsmasq is not installed (%s)" % dnstest.DNSMASQ)
    return POSTHASTE


class World:
    """Everything one test starts: dnsmasq, sinks, daemons; stopped by PID at teardown."""

    def __init__(self, bench, tmp_path):
        self.bench = bench
        self.tmp = tmp_path
        self.dns = None
        self.sinks = []
        self.relays = []
        self.servfails = []

    def servfail(self):
        sf = dnstest.ServfailServer()
        self.servfails.append(sf)
        return sf

    def dnsmasq(self, **kw):
        self.dns = dnstest.Dnsmasq(self.tmp, **kw)
        return self.dns

    def sink(self, host, *args):
        """A sink on HOST:25 (the MX port)."""
        s = phtest.Sink(self.bench, [str(a) for a in args] + ["--workers", "1", "--quiet"],
                        self.tmp, host=host, port=PORT25)
        self.sinks.append(s)
        return s

    def relay(self, restart=None, **kw):
        """A new daemon; restart=R: another daemon on R's directory (R stopped first)."""
        kw.setdefault("resolver", self.dns.server)
        if restart is not None:
            assert not restart.alive(), "restart needs the old daemon stopped"
            kw.setdefault("workers", restart.workers)
            r = Relay(self.tmp, name=os.path.basename(restart.dir), restart=True, **kw)
        else:
            r = Relay(self.tmp, name="relay%d" % len(self.relays), **kw)
        self.relays.append(r)
        return r

    def cleanup(self):
        for r in self.relays:
            r.kill()
        for s in self.sinks:
            s.kill()
        if self.dns:
            self.dns.stop()
        for sf in self.servfails:
            sf.close()


@pytest.fixture
def world(posthaste, bench, tmp_path):
    w = World(bench, tmp_path)
    yield w
    w.cleanup()


def message(subject, body_lines=("hello",), sender=ALICE, to="someone@example.test",
            msgid=None):
    msgid = msgid or "<%s@client.posthaste.test>" % re.sub(r"\W", ".", subject)
    lines = ["From: <%s>" % sender, "To: <%s>" % to, "Subject: %s" % subject,
             "Message-ID: %s" % msgid, "", *body_lines]
    return ("\r\n".join(lines) + "\r\n").encode()


def split_maildir_file(data):
    """(Return-Path, Delivered-To, the rest) of a delivered Maildir file."""
    m = re.match(rb"Return-Path: <([^>\r\n]*)>\r\nDelivered-To: ([^\r\n]*)\r\n", data)
    assert m, "a Maildir file must start with Return-Path and Delivered-To: %r" % data[:300]
    return m.group(1).decode(), m.group(2).decode(), data[m.end():]


def strip_received(rest):
    """The stored message after the daemon's Received: trace header (one field, folded or not)."""
    m = re.match(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", rest)
    assert m, "the message does not start with the daemon's Received: header: %r" % rest[:300]
    return m.group(0), rest[m.end():]


def parse_dsn(data, sender=ALICE):
    """Parses one bounce from a Maildir file; checks the RFC 3464 structure.
    Returns (the message, per-message fields, [per-recipient fields], the returned part)."""
    rp, dt, rest = split_maildir_file(data)
    assert rp == "", "a DSN comes from the null sender, Return-Path is <%s>" % rp
    assert dt == sender, "the DSN went to %s, not to the sender %s" % (dt, sender)
    # generated here, not received: no Received: trace header of its own (tolerated)
    raw = strip_received(rest)[1] if rest.startswith(b"Received: ") else rest
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    assert msg.get_param("report-type") == "delivery-status", msg.get("Content-Type")
    assert msg.get("Auto-Submitted", "").startswith("auto-replied"), msg.items()
    assert sender in msg.get("To", ""), "DSN To: %r" % msg.get("To")
    parts = msg.get_payload()
    assert isinstance(parts, list) and len(parts) >= 2, "DSN parts: %r" % parts
    types = [p.get_content_type() for p in parts]
    assert types[0] == "text/plain", types
    assert types[1] == "message/delivery-status", types
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 2, \
        "message/delivery-status needs a per-message and a per-recipient block: %r" % blocks
    per_msg, per_rcpt = blocks[0], blocks[1:]
    assert per_msg.get("Reporting-MTA", "").startswith("dns;"), per_msg.items()
    for b in per_rcpt:
        assert b.get("Final-Recipient", "").startswith("rfc822;"), b.items()
        assert b.get("Action") and b.get("Status"), b.items()
    returned = parts[2] if len(parts) > 2 else None
    return msg, per_msg, per_rcpt, returned


def returned_headers(part):
    """The original message's header fields from the third part of a DSN."""
    assert part is not None, "the DSN does not return the original message"
    ct = part.get_content_type()
    if ct == "message/rfc822":
        inner = part.get_payload()
        inner = inner[0] if isinstance(inner, list) else inner
        return inner
    assert ct == "text/rfc822-headers", ct
    return email.message_from_string(part.get_payload(), policy=email.policy.compat32)


def final_rcpt(block):
    return block.get("Final-Recipient").split(";", 1)[1].strip()


def check_dsn_for(relay, qid, failed, status_re, sender=ALICE, subject=None, n_mail=1):
    """The bounce of qid: one 'dsn' event to the sender, delivered into its Maildir
    (message n_mail of that mailbox), listing exactly `failed` with a Status matching
    status_re. Returns the parsed DSN."""
    ev = relay.wait_event(qid, "dsn")
    assert len(ev) == 1, "one DSN per attempt with failures, got %r" % ev
    assert ev[0]["recipient"] == sender, ev
    dsn_id = ev[0]["dsn_queue_id"]
    assert ID_RE.match(dsn_id) and dsn_id != qid, ev
    # the DSN itself is a message from <> to the sender, delivered locally
    d = relay.wait_event(dsn_id, "delivery")
    assert d[0]["sender"] == "" and d[0]["recipient"] == sender and d[0]["remote_host"] == "local", d
    mails = relay.wait_mail(sender, n_mail)
    assert len(mails) == n_mail, "expected %d message(s) for %s, found %d" % (n_mail, sender, len(mails))
    found = [parse_dsn(m, sender) for m in mails if b"X-Posthaste-Queue-ID: " + qid.encode() in m]
    assert len(found) == 1, "exactly one DSN for %s in the Maildir of %s, found %d" % (
        qid, sender, len(found))
    msg, per_msg, per_rcpt, returned = found[0]
    assert per_msg.get("X-Posthaste-Queue-ID") == qid, per_msg.items()
    got = sorted(final_rcpt(b) for b in per_rcpt)
    assert got == sorted(failed), "the DSN lists %r, expected only %r" % (got, sorted(failed))
    for b in per_rcpt:
        assert b.get("Action") == "failed", b.items()
        assert re.match(status_re, b.get("Status", "")), "Status %r !~ %r" % (b.get("Status"), status_re)
    if subject is not None:
        h = returned_headers(returned)
        assert h.get("Subject") == subject, "returned Subject %r" % h.get("Subject")
        assert h.get("Message-ID"), "the returned header lacks the Message-ID: %r" % h.items()
    return msg, per_msg, per_rcpt, returned


# --------------------------------------------------------------------------- a. MX selection


def test_mx_preference_fallback_implicit_mx_and_ipv6(world):
    dns = world.dnsmasq(
        mx=[("alpha.test", "mx1.alpha.test", 10), ("alpha.test", "mx2.alpha.test", 20),
            ("alpha.test", "mx3.alpha.test", 30),
            ("beta.test", "mx1.beta.test", 5), ("beta.test", "mx2.beta.test", 10),
            ("beta.test", "mx3.beta.test", 20),
            ("delta.test", "mx1.delta.test", 10), ("delta.test", "mx2.delta.test", 20),
            ("v6.test", "mx.v6.test", 10)],
        hosts=[("mx1.alpha.test", "127.0.1.1"), ("mx2.alpha.test", "127.0.1.2"),
               ("mx3.alpha.test", "127.0.1.3"),
               ("mx1.beta.test", "127.0.1.4"),  # nothing listens there
               ("mx2.beta.test", "127.0.1.5"), ("mx3.beta.test", "127.0.1.6"),
               ("gamma.test", "127.0.1.7"),     # no MX: the implicit MX (RFC 5321 5.1)
               ("mx1.delta.test", "127.0.1.8"),  # greets with 421: not a session
               ("mx2.delta.test", "127.0.1.9"),
               ("mx.v6.test", "::1")])          # reachable over IPv6 only
    # the records are as meant
    rc, ans = dns.query("alpha.test", dnstest.T_MX)
    assert rc == 0 and len(ans) == 3, (rc, ans)
    rc, ans = dns.query("gamma.test", dnstest.T_MX)
    assert rc == 0 and ans == [], (rc, ans)
    rc, _ = dns.query("nosuch.test", dnstest.T_MX)
    assert rc == dnstest.RCODE_NXDOMAIN, rc

    sinks = {h: world.sink(h) for h in ("127.0.1.1", "127.0.1.2", "127.0.1.3", "127.0.1.5",
                                          "127.0.1.6", "127.0.1.7", "127.0.1.9", "::1")}
    sinks["127.0.1.8"] = world.sink("127.0.1.8", "--fail", "CONNECT:421:100")
    relay = world.relay()
    want = {"alpha.test": "[127.0.1.1]:25", "beta.test": "[127.0.1.5]:25",
            "gamma.test": "[127.0.1.7]:25", "delta.test": "[127.0.1.9]:25",
            "v6.test": "[::1]:25"}
    ids = {}
    for dom in want:
        ids[dom] = relay.send(ALICE, ["user@%s" % dom], message("to %s" % dom))
    for dom, remote in want.items():
        ev = relay.wait_event(ids[dom], "delivery")
        assert len(ev) == 1, ev
        e = ev[0]
        assert e["recipient"] == "user@%s" % dom and e["destination"] == dom, e
        assert e["remote_host"].endswith(remote), "%s went to %s, expected %s" % (
            dom, e["remote_host"], remote)
        assert e["status"].startswith("2."), e
        assert e["sender"] == ALICE and e["attempt"] >= 1, e
        assert e["message_id"] == "<to.alpha.test@client.posthaste.test>".replace(
            "alpha.test", dom), e
    for dom in want:
        assert relay.events(ids[dom], "transient_failure") == [], \
            "%s: an MX that does not answer or greets with 421 is skipped within the " \
            "attempt, not a failure:\n%s" % (dom, relay.diag())
    recv = relay.events(event="reception")
    assert sorted(e["queue_id"] for e in recv) == sorted(ids.values()), recv

    # the most preferred MX of alpha.test goes down: the next one gets the mail
    st = sinks["127.0.1.1"].stop()
    phtest.assert_stats(st, messages=1, recipients=1)
    qid = relay.send(ALICE, ["other@alpha.test"], message("alpha again"))
    ev = relay.wait_event(qid, "delivery")
    assert ev[0]["remote_host"].endswith("[127.0.1.2]:25"), ev

    relay.assert_drained()
    counts = {h: s.stop()["messages"] for h, s in sinks.items() if h != "127.0.1.1"}
    assert counts == {"127.0.1.2": 1, "127.0.1.3": 0, "127.0.1.5": 1, "127.0.1.6": 0,
                      "127.0.1.7": 1, "127.0.1.8": 0, "127.0.1.9": 1, "::1": 1}, counts


# --------------------------------------------------------------------------- b. null MX


def test_null_mx_bounces_at_once_to_the_local_sender(world):
    world.dnsmasq(null_mx=["void.test"])
    relay = world.relay()
    subject = "to a domain that takes no mail"
    qid = relay.send(ALICE, ["nobody@void.test"], message(subject, to="nobody@void.test"))
    ev = relay.wait_event(qid, "bounce")
    assert len(ev) == 1 and ev[0]["recipient"] == "nobody@void.test", ev
    assert ev[0]["status"] == "5.1.10", ev
    assert ev[0]["attempt"] == 1, "a null MX bounces at the first attempt: %r" % ev
    assert "null MX" in ev[0]["reply"], ev
    assert relay.events(qid, "transient_failure") == [], relay.diag()
    msg, per_msg, per_rcpt, returned = check_dsn_for(
        relay, qid, ["nobody@void.test"], r"^5\.1\.10$", subject=subject)
    assert "null MX" in per_rcpt[0].get("Diagnostic-Code", ""), per_rcpt[0].items()
    assert msg.get("From", "").lower().find("mailer-daemon@") >= 0, msg.get("From")

    # the null sender never gets a DSN: the message just ends bounced
    qid2 = relay.send("", ["nobody@void.test"], message("bounce of a bounce", sender="x"))
    ev = relay.wait_event(qid2, "bounce")
    assert ev[0]["status"] == "5.1.10" and ev[0]["sender"] == "", ev
    relay.assert_drained()
    assert relay.events(qid2, "dsn") == [], "a DSN was sent for a message from <>:\n%s" % relay.diag()
    assert len(relay.mailbox(ALICE)) == 1, "a new message appeared after the null sender's bounce"
    assert len(relay.events(event="dsn")) == 1, relay.diag()


# --------------------------------------------------------------------------- c. retries


def test_transient_failures_are_retried_until_delivered(world):
    world.dnsmasq(mx=[("retry.test", "mx.retry.test", 10)], hosts=[("mx.retry.test", "127.0.3.1")])
    failing = world.sink("127.0.3.1", "--fail", "RCPT:450:100")
    relay = world.relay()
    qid = relay.send(ALICE, ["user@retry.test"], message("retried"))
    ev = relay.wait_event(qid, "transient_failure", n=3)
    attempts = [e["attempt"] for e in ev]
    assert attempts == sorted(set(attempts)) and attempts[:3] == [1, 2, 3], \
        "each retry is a new attempt: %r" % attempts
    for e in ev:
        assert e["status"].startswith("4.") and "450" in e["reply"], e
        assert e["remote_host"].endswith("[127.0.3.1]:25"), e
    # on schedule: retry_min = 200ms doubling (jitter 0.75x..1.25x) up to retry_max = 1s
    t = [e["received_ms"] + e["delay_ms"] for e in ev]
    gaps = [b - a for a, b in zip(t, t[1:])]
    assert all(g >= 140 for g in gaps), "retries came sooner than retry_min allows: %r ms" % gaps
    assert all(g <= 5000 for g in gaps), "retries much later than retry_max: %r ms" % gaps
    # meanwhile it is in the queue
    assert qid in [m.get("queue_id") for m in relay.queue_list()], relay.queue_list()
    assert relay.events(qid, "delivery") == [] and relay.events(qid, "bounce") == []

    st = failing.stop()
    assert st["messages"] == 0 and st["injected_failures"] >= 3, st
    good = world.sink("127.0.3.1")
    ev = relay.wait_event(qid, "delivery")
    tf = relay.events(qid, "transient_failure")
    assert ev[0]["attempt"] > max(e["attempt"] for e in tf), (ev, tf)
    assert ev[0]["remote_host"].endswith("[127.0.3.1]:25"), ev
    assert relay.events(qid, "bounce") == [] and relay.events(qid, "dsn") == [], relay.diag()
    relay.assert_drained()
    phtest.assert_stats(good.stop(), messages=1, recipients=1)


# --------------------------------------------------------------------------- d. 5xx


def test_permanent_failure_bounces_to_the_local_sender(world):
    world.dnsmasq(mx=[("perm.test", "mx.perm.test", 10)], hosts=[("mx.perm.test", "127.0.4.1")])
    sink = world.sink("127.0.4.1", "--fail", "RCPT:550:100")
    relay = world.relay()
    subject = "refused by the remote"
    qid = relay.send(ALICE, ["user@perm.test"], message(subject))
    ev = relay.wait_event(qid, "bounce")
    assert ev[0]["status"].startswith("5."), ev
    assert ev[0]["reply"].startswith("550"), ev
    assert ev[0]["remote_host"].endswith("[127.0.4.1]:25"), ev
    _, _, per_rcpt, _ = check_dsn_for(relay, qid, ["user@perm.test"], r"^5\.\d+\.\d+$",
                                      subject=subject)
    assert "550" in per_rcpt[0].get("Diagnostic-Code", ""), per_rcpt[0].items()
    assert relay.events(qid, "transient_failure") == [] and relay.events(qid, "delivery") == []
    relay.assert_drained()
    st = sink.stop()
    assert st["messages"] == 0 and st["injected_failures"] == 1, st


# --------------------------------------------------------------------------- e. mixed results


def test_mixed_recipients_one_delivered_one_bounced(world):
    world.dnsmasq()  # routes only; the resolver is there but never needed
    ok = world.sink("127.0.5.1")
    bad = world.sink("127.0.5.2", "--fail", "RCPT:550:100")
    relay = world.relay(routes=[("ok.test", "[127.0.5.1]:25"), ("bad.test", "127.0.5.2")])
    subject = "half of it"
    qid = relay.send(ALICE, ["good@ok.test", "gone@bad.test"], message(subject))
    d = relay.wait_event(qid, "delivery")
    b = relay.wait_event(qid, "bounce")
    check_dsn_for(relay, qid, ["gone@bad.test"], r"^5\.\d+\.\d+$", subject=subject)
    relay.assert_drained()
    d, b = relay.events(qid, "delivery"), relay.events(qid, "bounce")
    assert [e["recipient"] for e in d] == ["good@ok.test"], d
    assert [e["recipient"] for e in b] == ["gone@bad.test"], b
    assert d[0]["remote_host"].endswith("[127.0.5.1]:25"), d
    assert b[0]["remote_host"].endswith("[127.0.5.2]:25"), b
    assert len(relay.events(qid, "dsn")) == 1 and len(relay.mailbox(ALICE)) == 1, relay.diag()
    assert relay.events(qid, "transient_failure") == [], relay.diag()
    phtest.assert_stats(ok.stop(), messages=1, recipients=1)
    st = bad.stop()
    assert st["messages"] == 0 and st["injected_failures"] == 1, st


# --------------------------------------------------------------------------- f. max age


def test_max_queue_age_bounds(posthaste, tmp_path):
    def check():
        p = subprocess.run([POSTHASTE, "--check-config", "--config", str(conf)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=30)
        return p.returncode, p.stdout.decode(), p.stderr.decode()
    conf = tmp_path / "age.conf"
    for value, ok in (("1s", True), ("1000ms", True), ("999ms", False), ("0", False),
                      ("365d", True), ("366d", False)):
        conf.write_text("max_queue_age = %s\n" % value)
        rc, out, err = check()
        assert (rc == 0) == ok, "max_queue_age = %s: exit %d %s" % (value, rc, err)
        if ok:
            assert re.search(r"^max_queue_age = \S+", out, re.M), out
        else:
            assert "max_queue_age" in err, err


def test_expiry_after_max_queue_age(world):
    world.dnsmasq(mx=[("slow.test", "mx.slow.test", 10), ("down.test", "mx.down.test", 10)],
                  hosts=[("mx.slow.test", "127.0.6.1"),
                         ("mx.down.test", "127.0.6.2")])  # nothing listens there
    sink = world.sink("127.0.6.1", "--fail", "EOM:451:100")
    relay = world.relay(extra="max_queue_age = 1s\n")
    subject = "never accepted"
    qid = relay.send(ALICE, ["user@slow.test"], message(subject))
    qid2 = relay.send(ALICE, ["user@down.test"], message("nobody home"))
    ev = relay.wait_event(qid, "expiry")
    assert len(ev) == 1 and ev[0]["status"] == "4.4.7", ev
    assert ev[0]["delay_ms"] >= 1000, "expired before max_queue_age: %r" % ev
    assert "451" in ev[0]["reply"], ev
    tf = relay.events(qid, "transient_failure")
    assert tf and all("451" in e["reply"] for e in tf), relay.diag()
    _, _, per_rcpt, _ = check_dsn_for(relay, qid, ["user@slow.test"], r"^4\.4\.7$",
                                      subject=subject, n_mail=2)
    assert "451" in per_rcpt[0].get("Diagnostic-Code", ""), per_rcpt[0].items()
    assert relay.events(qid, "delivery") == [], relay.diag()
    # connection refused at the only MX: deferred the same way, then expired
    ev = relay.wait_event(qid2, "expiry")
    assert ev[0]["status"] == "4.4.7" and ev[0]["delay_ms"] >= 1000, ev
    assert relay.events(qid2, "transient_failure"), relay.diag()
    check_dsn_for(relay, qid2, ["user@down.test"], r"^4\.4\.7$", subject="nobody home", n_mail=2)
    relay.assert_drained()
    st = sink.stop()
    assert st["messages"] == 0 and st["injected_failures"] >= 1, st


# --------------------------------------------------------------------------- g. local delivery


def test_local_delivery_to_maildir(world):
    world.dnsmasq()
    relay = world.relay()
    msg = (b"From: <alice@local.test>\r\nTo: <carol@local.test>\r\nSubject: local\r\n"
           b"Message-ID: <local.1@client.posthaste.test>\r\n\r\nline one\r\n"
           b".leading dot\r\n..two dots\r\n\r\n  indented\r\nlast line\r\n")
    qid = relay.send(ALICE, [CAROL], msg)
    ev = relay.wait_event(qid, "delivery")
    assert ev[0]["remote_host"] == "local" and ev[0]["recipient"] == CAROL, ev
    mails = relay.wait_mail(CAROL)
    assert len(mails) == 1
    rp, dt, rest = split_maildir_file(mails[0])
    assert (rp, dt) == (ALICE, CAROL), (rp, dt)
    received, body = strip_received(rest)
    assert qid.encode() in received, received
    assert body == msg, "the Maildir copy differs from what was sent:\n%r\n%r" % (body, msg)
    name = os.listdir(relay.maildir_new(CAROL))[0]
    assert name.endswith(",S=%d" % len(mails[0])), name
    assert os.listdir(os.path.join(os.path.dirname(relay.maildir_new(CAROL)), "tmp")) == []

    # an unknown local user is refused at RCPT
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as ei:
            s.sendmail(ALICE, ["nobody@local.test"], b"Subject: x\r\n\r\nx\r\n")
        code, text = ei.value.recipients["nobody@local.test"]
        assert code == 550 and text.startswith(b"5.1.1"), (code, text)
        # with a known one next to it, only the unknown one is refused
        refused = s.sendmail(ALICE, ["nobody@local.test", CAROL], b"Subject: y\r\n\r\ny\r\n")
        assert list(refused) == ["nobody@local.test"] and refused["nobody@local.test"][0] == 550, refused
    mails = relay.wait_mail(CAROL, 2)
    assert len(mails) == 2 and mails[1].endswith(b"\r\n\r\ny\r\n"), mails[1][-200:]
    assert relay.mailbox("nobody@local.test") == []
    assert relay.events(event="bounce") == [] and relay.events(event="dsn") == [], relay.diag()
    relay.assert_drained()


# --------------------------------------------------------------------------- DNS outcomes


def test_dns_outcomes_nxdomain_no_address_and_tempfail(world):
    sf = world.servfail()  # flaky.test is forwarded there: SERVFAIL
    dns = world.dnsmasq(mx=[("ghost.test", "nowhere.ghost.test", 10)],
                        extra=["--server=/flaky.test/127.0.0.1#%d" % sf.port])
    assert dns.query("flaky.test", dnstest.T_MX)[0] == 2, "dnsmasq should pass SERVFAIL on"
    relay = world.relay()
    qid = relay.send(ALICE, ["a@nosuch.test", "b@ghost.test", "c@flaky.test"], message("dns"))
    b = relay.wait_event(qid, "bounce", n=2)
    st = {e["recipient"]: e["status"] for e in b}
    assert st == {"a@nosuch.test": "5.1.2", "b@ghost.test": "5.1.2"}, b
    tf = relay.wait_event(qid, "transient_failure", n=2)
    assert all(e["recipient"] == "c@flaky.test" and e["status"] == "4.4.3" for e in tf), tf
    assert [e["attempt"] for e in tf[:2]] == [1, 2], tf
    # one bounce for both failed recipients, sent once (not again at every retry)
    check_dsn_for(relay, qid, ["a@nosuch.test", "b@ghost.test"], r"^5\.1\.2$")
    relay.wait_event(qid, "transient_failure", n=3)
    assert len(relay.events(qid, "dsn")) == 1 and len(relay.events(qid, "bounce")) == 2, relay.diag()
    assert [m["queue_id"] for m in relay.queue_list()] == [qid]
    relay.stop()


# --------------------------------------------------------------------------- restart


def test_deferred_recipient_survives_a_restart_without_duplicates(world):
    world.dnsmasq(mx=[("now.test", "mx.now.test", 10), ("later.test", "mx.later.test", 10)],
                  hosts=[("mx.now.test", "127.0.8.1"), ("mx.later.test", "127.0.8.2")])
    now = world.sink("127.0.8.1")
    later = world.sink("127.0.8.2", "--fail", "RCPT:451:100")
    relay = world.relay()
    qid = relay.send(ALICE, ["a@now.test", "b@later.test"], message("restart"))
    d = relay.wait_event(qid, "delivery")
    relay.wait_event(qid, "transient_failure", n=2)
    assert [e["recipient"] for e in d] == ["a@now.test"], d
    relay.stop()
    last = max(e["attempt"] for e in relay.events(qid, "transient_failure"))
    assert [m["queue_id"] for m in relay.queue_list()] == [qid], "the deferred message must " \
        "stay queued across the stop"
    later.stop()
    later = world.sink("127.0.8.2")

    relay2 = world.relay(restart=relay)
    m = re.search(r"recovered (\d+) queued messages", relay2.log())
    assert m and m.group(1) == "1", relay2.log()
    d = relay2.wait_event(qid, "delivery", n=2)
    assert [e["recipient"] for e in d] == ["a@now.test", "b@later.test"], \
        "after the restart only the deferred recipient is delivered: %r" % d
    assert d[1]["attempt"] > last, "the attempt counter must survive the restart: " \
        "%d after %d" % (d[1]["attempt"], last)
    relay2.assert_drained()
    phtest.assert_stats(now.stop(), messages=1, recipients=1)
    phtest.assert_stats(later.stop(), messages=1, recipients=1)


# --------------------------------------------------------------------------- remote sender


def test_bounce_to_a_remote_sender_goes_out_by_mx(world):
    world.dnsmasq(mx=[("remote.test", "mx.remote.test", 10), ("refuse.test", "mx.refuse.test", 10)],
                  hosts=[("mx.remote.test", "127.0.9.1"), ("mx.refuse.test", "127.0.9.2")])
    home = world.sink("127.0.9.1")
    refuse = world.sink("127.0.9.2", "--fail", "RCPT:550:100")
    relay = world.relay()
    qid = relay.send("bob@remote.test", ["x@refuse.test"], message("remote", sender="bob@remote.test"))
    relay.wait_event(qid, "bounce")
    ev = relay.wait_event(qid, "dsn")
    assert ev[0]["recipient"] == "bob@remote.test", ev
    d = relay.wait_event(ev[0]["dsn_queue_id"], "delivery")
    assert d[0]["sender"] == "" and d[0]["remote_host"].endswith("[127.0.9.1]:25"), d
    relay.assert_drained()
    phtest.assert_stats(home.stop(), messages=1, recipients=1)
    assert refuse.stop()["messages"] == 0


# --------------------------------------------------------------------------- volume


def test_many_messages_each_recipient_delivered_once(world):
    doms = ["d%d.test" % i for i in range(4)]
    world.dnsmasq(mx=[(d, "mx.%s" % d, 10) for d in doms],
                  hosts=[("mx.%s" % d, "127.0.10.%d" % (i + 1)) for i, d in enumerate(doms)])
    sinks = [world.sink("127.0.10.%d" % (i + 1)) for i in range(len(doms))]
    relay = world.relay()
    want = [0] * len(doms)
    ids = []
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as s:
        s.ehlo("bulk.posthaste.test")
        for i in range(40):
            rc = ["u%d.%d@%s" % (i, k, doms[(i + k) % len(doms)]) for k in range(1 + i % 3)]
            rc.append(CAROL)
            for r in rc[:-1]:
                want[doms.index(r.split("@")[1])] += 1
            s.mail(ALICE)
            for r in rc:
                assert s.rcpt(r)[0] == 250
            code, text = s.data(message("bulk %d" % i, ["x" * (i * 37 % 900)] * (i % 5)))
            m = QUEUED_RE.match(text.decode().strip())
            assert code == 250 and m, (code, text)
            ids.append(m.group(1))
    total = sum(want) + len(ids)
    wait_for(lambda: len(relay.events(event="delivery")) >= total, 60,
             "%d deliveries" % total, relay.diag)
    dl = relay.events(event="delivery")
    keys = [(e["queue_id"], e["recipient"]) for e in dl]
    assert len(keys) == len(set(keys)) == total, "duplicate or missing deliveries"
    assert len(relay.mailbox(CAROL)) == len(ids)
    assert relay.events(event="transient_failure") == [] and relay.events(event="bounce") == []
    relay.assert_drained()
    got = [s.stop()["recipients"] for s in sinks]
    assert got == want, "recipients per MX %r, expected %r" % (got, want)


def test_more_recipients_than_one_transaction_takes(world):
    """150 recipients of one domain: more than the SMTP client sends in one
    transaction (100), so the relay must split them over several transactions."""
    world.dnsmasq(mx=[("bulk.test", "mx.bulk.test", 10)], hosts=[("mx.bulk.test", "127.0.11.1")])
    sink = world.sink("127.0.11.1")
    relay = world.relay()
    rcpts = ["r%03d@bulk.test" % i for i in range(150)]
    qid = relay.send(ALICE, rcpts, message("many recipients"))
    d = relay.wait_event(qid, "delivery", n=150, timeout=20)
    assert sorted(e["recipient"] for e in d) == rcpts
    relay.assert_drained()
    st = sink.stop()
    assert st["recipients"] == 150 and st["messages"] == 2, st


def test_interleaved_domains_grouped_per_domain(world):
    """190 recipients of two domains, interleaved and in mixed case: each domain's
    recipients go together whatever their order (130 to one: two transactions of at
    most 100; 60 to the other: one), every recipient once."""
    world.dnsmasq(mx=[("mix.test", "mx.mix.test", 10), ("other.test", "mx.other.test", 10)],
                  hosts=[("mx.mix.test", "127.0.11.2"), ("mx.other.test", "127.0.11.3")])
    mix, other = world.sink("127.0.11.2"), world.sink("127.0.11.3")
    relay = world.relay()
    rcpts = []
    for i in range(130):
        rcpts.append("m%03d@%s" % (i, ("mix.test", "MIX.test", "Mix.TEST")[i % 3]))
        if i < 120 and i % 2 == 0:
            rcpts.append("o%03d@%s" % (i, ("other.test", "Other.Test")[i % 4 == 0]))
    assert len(rcpts) == 190
    qid = relay.send(ALICE, rcpts, message("interleaved"))
    d = relay.wait_event(qid, "delivery", n=190, timeout=20)
    assert sorted(e["recipient"] for e in d) == sorted(rcpts)
    relay.assert_drained()
    st = mix.stop()
    assert st["recipients"] == 130 and st["messages"] == 2, st
    st = other.stop()
    assert st["recipients"] == 60 and st["messages"] == 1, st


# --------------------------------------------------------------------------- DSN parameters


def test_dsn_notify_ret_envid_orcpt(world):
    world.dnsmasq(null_mx=["void.test"])
    relay = world.relay()
    subject = "dsn parameters"
    qid = relay.send(ALICE, ["x@void.test", "y@void.test"], message(subject),
                     mail_opts=["RET=HDRS", "ENVID=QQ+2B314"],
                     rcpt_opts={"x@void.test": ["NOTIFY=FAILURE", "ORCPT=rfc822;orig+2Bx@void.test"],
                                "y@void.test": ["NOTIFY=NEVER"]})
    relay.wait_event(qid, "bounce", n=2)
    _, per_msg, per_rcpt, returned = check_dsn_for(relay, qid, ["x@void.test"], r"^5\.1\.10$")
    assert per_msg.get("Original-Envelope-Id") == "QQ+314", per_msg.items()
    assert per_rcpt[0].get("Original-Recipient") == "rfc822; orig+x@void.test", per_rcpt[0].items()
    assert returned is not None and returned.get_content_type() == "text/rfc822-headers", \
        "RET=HDRS returns the header section only"
    assert returned_headers(returned).get("Subject") == subject
    assert "hello" not in returned.get_payload(), "RET=HDRS returned the body"
    # NOTIFY=NEVER alone: a bounce event, no DSN
    qid2 = relay.send(ALICE, ["z@void.test"], message("never"),
                      rcpt_opts={"z@void.test": ["NOTIFY=NEVER"]})
    relay.wait_event(qid2, "bounce")
    relay.assert_drained()
    assert relay.events(qid2, "dsn") == [] and len(relay.mailbox(ALICE)) == 1, relay.diag()


def test_double_bounce_ends_without_a_loop(world):
    """The sender's own domain has a null MX: its bounce bounces, and that is the end."""
    world.dnsmasq(null_mx=["void.test"], mx=[("perm.test", "mx.perm.test", 10)],
                  hosts=[("mx.perm.test", "127.0.12.1")])
    refuse = world.sink("127.0.12.1", "--fail", "RCPT:550:100")
    relay = world.relay()
    qid = relay.send("bob@void.test", ["x@perm.test"], message("double", sender="bob@void.test"))
    ev = relay.wait_event(qid, "dsn")
    dsn_id = ev[0]["dsn_queue_id"]
    b = relay.wait_event(dsn_id, "bounce")
    assert b[0]["sender"] == "" and b[0]["recipient"] == "bob@void.test" and b[0]["status"] == "5.1.10", b
    relay.assert_drained()
    assert len(relay.events(event="dsn")) == 1, relay.diag()
    assert len(relay.events(event="bounce")) == 2, relay.diag()
    assert refuse.stop()["messages"] == 0


def test_per_recipient_results_in_one_transaction(world):
    """One domain, one transaction: the remote refuses one recipient (550) and takes
    at most 2 recipients per message (452 for the rest, retried later)."""
    world.dnsmasq(mx=[("one.test", "mx.one.test", 10)], hosts=[("mx.one.test", "127.0.13.1")])
    sink = world.sink("127.0.13.1", "--fail-rcpt", "gone:550", "--max-recipients", "2")
    relay = world.relay()
    rcpts = ["a@one.test", "gone@one.test", "b@one.test", "c@one.test", "d@one.test"]
    qid = relay.send(ALICE, rcpts, message("per recipient"))
    d = relay.wait_event(qid, "delivery", n=4)
    assert sorted(e["recipient"] for e in d) == ["a@one.test", "b@one.test", "c@one.test",
                                                 "d@one.test"], d
    b = relay.events(qid, "bounce")
    assert [e["recipient"] for e in b] == ["gone@one.test"] and b[0]["reply"].startswith("550"), b
    tf = relay.events(qid, "transient_failure")
    assert tf and all(e["reply"].startswith("452") for e in tf), tf
    check_dsn_for(relay, qid, ["gone@one.test"], r"^5\.\d+\.\d+$")
    relay.assert_drained()
    assert len(relay.events(qid, "delivery")) == 4 and len(relay.events(qid, "dsn")) == 1
    st = sink.stop()
    assert st["recipients"] == 4, "each recipient delivered once: %r" % st


def test_smtputf8_bounce_is_a_global_dsn(world):
    world.dnsmasq(null_mx=["void.test"])
    relay = world.relay()
    rcpt = "j\u00fcrgen@void.test"
    msg = "From: <alice@local.test>\r\nSubject: gr\u00fc\u00dfe\r\n\r\nso\u00f1o\r\n".encode()
    qid = relay.send(ALICE, [rcpt], msg, mail_opts=["SMTPUTF8", "BODY=8BITMIME"])
    b = relay.wait_event(qid, "bounce")
    assert b[0]["recipient"] == rcpt, b
    relay.wait_event(qid, "dsn")
    data = relay.wait_mail(ALICE)[0]
    _, _, raw = split_maildir_file(data)
    m = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert m.get_content_type() == "multipart/report", m.get_content_type()
    assert m.get_param("report-type") == "global-delivery-status", m.get("Content-Type")
    parts = m.get_payload()
    assert parts[1].get_content_type() == "message/global-delivery-status", \
        [p.get_content_type() for p in parts]
    # the parser does not split message/global-delivery-status into blocks: read it raw
    sections = raw.split(b"--" + m.get_boundary().encode())
    status = sections[2].split(b"\r\n\r\n", 1)[1].decode("utf-8")
    assert "Final-Recipient: utf-8; %s" % rcpt in status, status
    assert re.search(r"^Status: 5\.1\.10", status, re.M), status
    relay.assert_drained()


def test_recipient_the_client_cannot_send_is_not_stuck(world):
    world.dnsmasq(mx=[("odd.test", "mx.odd.test", 10)], hosts=[("mx.odd.test", "127.0.14.1")])
    world.sink("127.0.14.1")
    relay = world.relay()
    d = phtest.Dialogue("127.0.0.1", relay.port)
    try:
        d.cmd(b"EHLO client.posthaste.test\r\n", "250")
        d.cmd(b"MAIL FROM:<alice@local.test> SMTPUTF8\r\n", "250")
        r = d.cmd(b"RCPT TO:<x@odd.test> ORCPT=\xc3\xbc;x@odd.test\r\n")
        if r.code >= 500:
            return  # refused at RCPT: nothing to deliver (a fine outcome)
        assert r.code == 250, r
        d.cmd(b"DATA\r\n", "354")
        qid = QUEUED_RE.match(d.cmd(b"Subject: odd\r\n\r\nx\r\n.\r\n", "250").text).group(1)
        d.cmd(b"QUIT\r\n", "221")
    finally:
        d.close()
    # whatever the outcome, the recipient gets one within a few seconds
    wait_for(lambda: [e for e in relay.events(qid) if e["event"] != "reception"], 5,
             "an outcome for %s" % qid, relay.diag)
