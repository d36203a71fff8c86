"""Outbound TLS of the relay (docs/tls.md, docs/delivery.md "TLS"): the daemon
(build/mta/posthaste/posthaste) delivering over STARTTLS.

- to a private Postfix offering STARTTLS (a self-signed certificate made with
  `openssl req` at test time): Postfix logs "TLS connection established from", the
  accounting log's delivery line has "tls": "TLSv1.x <cipher>";
- to `posthaste-bench sink --tls CERT KEY` with tls=require: delivered over TLS;
- tls=require to a plain sink: deferred with 4.7.5 ("TLS required but not offered"),
  the sink never gets the message;
- tls=require verify=name against a self-signed certificate for another name:
  deferred with 4.7.5 (certificate verification failed);
- tls=may to a server whose handshake fails: the same host again in plaintext
  (once), delivered with "tls": "none"; tls=require to it: deferred with 4.7.5.

No DNS: every destination is a route to an address literal, and the resolver is an
address where nothing answers. Every process started here is stopped by its PID.

    POSTHASTE_BUILD=$PWD/build unshare -n sh -c 'ip link set lo up && exec \
        /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/integration/test_delivery_tls.py'
"""
import os
import shutil
import socket
import subprocess
import tempfile
import threading

import pytest

import phtest
import postfixtest
from test_delivery import ALICE, POSTHASTE, Relay, message, wait_for

DOMAIN = "d.test"
RCPT = "u@" + DOMAIN
NO_DNS = "127.0.0.1:9"  # nothing answers there: a DNS lookup would fail (none is made)


@pytest.fixture(scope="module")
def posthaste():
    if not (os.path.isfile(POSTHASTE) and os.access(POSTHASTE, os.X_OK)):
        pytest.skip("the posthaste daemon is not built: %s is missing" % POSTHASTE)
    if not shutil.which("openssl"):
        pytest.skip("openssl (the command) is not installed: no certificate can be made")
    return POSTHASTE


@pytest.fixture(scope="module")
def certs():
    """Self-signed P-256 certificates (openssl req), in a directory every user may
    read (Postfix's smtpd reads them): name -> (cert path, key path)."""
    d = tempfile.mkdtemp(prefix="ph-tls-certs-", dir="/tmp")
    os.chmod(d, 0o755)
    out = {}
    for cn in ("postfix.test.invalid", "mx.d.test", "other.example"):
        cert, key = os.path.join(d, cn + ".crt"), os.path.join(d, cn + ".key")
        p = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                            "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj",
                            "/CN=" + cn, "-keyout", key, "-out", cert],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=60)
        assert p.returncode == 0, "openssl req: %s" % p.stdout.decode("utf-8", "replace")
        os.chmod(cert, 0o644)
        os.chmod(key, 0o644)
        out[cn] = (cert, key)
    yield out
    shutil.rmtree(d, ignore_errors=True)


class World:
    """The daemons and sinks of one test, stopped by PID at teardown."""

    def __init__(self, bench, tmp_path):
        self.bench = bench
        self.tmp = tmp_path
        self.relays = []
        self.sinks = []

    def sink(self, *args):
        s = phtest.Sink(self.bench, [str(a) for a in args] + ["--workers", "1", "--quiet"],
                        self.tmp)
        self.sinks.append(s)
        return s

    def relay(self, port, dest="", extra=""):
        """A daemon routing d.test to [127.0.0.1]:port, with destination.d.test = dest."""
        lines = extra
        if dest:
            lines += "destination.%s = %s\n" % (DOMAIN, dest)
        r = Relay(self.tmp, NO_DNS, routes=[(DOMAIN, "[127.0.0.1]:%d" % port)], extra=lines,
                  workers=1, name="relay%d" % len(self.relays))
        self.relays.append(r)
        return r

    def cleanup(self):
        for r in self.relays:
            r.kill()
        for s in self.sinks:
            s.kill()


@pytest.fixture
def world(posthaste, bench, tmp_path):
    w = World(bench, tmp_path)
    yield w
    w.cleanup()


def delivered_over_tls(r, qid):
    ev = r.wait_event(qid, "delivery")[0]
    assert ev["status"].startswith("2."), ev
    assert ev["tls"].startswith("TLSv1.2 ") or ev["tls"].startswith("TLSv1.3 "), ev
    assert len(ev["tls"].split()) == 2, ev  # "TLSv1.3 TLS_AES_128_GCM_SHA256"
    assert ev["tls_verified"] is False, ev  # self-signed, verify=none: still delivered
    return ev


# --------------------------------------------------------------------------- Postfix


@pytest.fixture
def postfix():
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


def test_starttls_to_postfix(world, postfix, certs):
    """Default policy (tls=may): Postfix offers STARTTLS, Posthaste takes it; both
    sides say so (Postfix's log, the accounting log); a second connection resumes."""
    cert, key = certs["postfix.test.invalid"]
    pf = postfix(extra=["smtpd_tls_cert_file = %s" % cert, "smtpd_tls_key_file = %s" % key,
                        "smtpd_tls_security_level = may", "smtpd_tls_loglevel = 1"])
    r = world.relay(pf.port, extra="delivery_messages_per_connection = 1\n")
    q1 = r.send(ALICE, [RCPT], message("tls 1", to=RCPT))
    ev = delivered_over_tls(r, q1)
    assert ev["remote_host"] == "[127.0.0.1]:%d" % pf.port, ev
    q2 = r.send(ALICE, [RCPT], message("tls 2", to=RCPT))
    delivered_over_tls(r, q2)
    wait_for(lambda: pf.log_text().count("TLS connection established from") >= 2, 20,
             "two 'TLS connection established from' lines in Postfix's log",
             lambda: pf.log_text(3000))
    print("Postfix:", [ln for ln in pf.log_text().splitlines() if "TLS connection" in ln])
    # the second connection resumed the session the first one left (per site)
    assert "TLS %s (resumed)" % ev["tls"] in r.log(20000), r.log()
    r.stop()


# --------------------------------------------------------------------------- the bench sink


def test_require_to_a_starttls_sink(world, certs):
    cert, key = certs["mx.d.test"]
    s = world.sink("--tls", cert, key)
    r = world.relay(s.port, dest="tls=require")
    qid = r.send(ALICE, [RCPT], message("required", to=RCPT))
    delivered_over_tls(r, qid)
    r.stop()
    assert s.stop()["messages"] == 1


def test_require_to_a_plain_sink_defers(world):
    s = world.sink()
    r = world.relay(s.port, dest="tls=require")
    qid = r.send(ALICE, [RCPT], message("no tls there", to=RCPT))
    ev = r.wait_event(qid, "transient_failure")[0]
    assert ev["status"] == "4.7.5", ev
    assert "TLS required but not offered" in ev["reply"], ev
    r.stop()
    assert s.stop()["messages"] == 0


def test_verify_name_with_a_certificate_for_another_name_defers(world, certs):
    cert, key = certs["other.example"]
    s = world.sink("--tls", cert, key)
    r = world.relay(s.port, dest="tls=require verify=name")
    qid = r.send(ALICE, [RCPT], message("wrong name", to=RCPT))
    ev = r.wait_event(qid, "transient_failure")[0]
    assert ev["status"] == "4.7.5", ev
    assert "certificate verification failed" in ev["reply"], ev
    r.stop()
    assert s.stop()["messages"] == 0


def test_verify_none_accepts_the_same_certificate(world, certs):
    """The same sink and certificate with verify=none (the default): delivered."""
    cert, key = certs["other.example"]
    s = world.sink("--tls", cert, key)
    r = world.relay(s.port, dest="tls=require verify=none")
    qid = r.send(ALICE, [RCPT], message("any name", to=RCPT))
    delivered_over_tls(r, qid)
    r.stop()
    assert s.stop()["messages"] == 1


def test_tls_none_never_starts_tls(world, certs):
    cert, key = certs["mx.d.test"]
    s = world.sink("--tls", cert, key)
    r = world.relay(s.port, dest="tls=none")
    qid = r.send(ALICE, [RCPT], message("plain", to=RCPT))
    ev = r.wait_event(qid, "delivery")[0]
    assert ev["tls"] == "none", ev
    r.stop()
    assert s.stop()["messages"] == 1


# --------------------------------------------------------------------------- a broken handshake


class BrokenTLSServer:
    """An SMTP server on 127.0.0.1 that offers STARTTLS, answers it with 220 and then
    sends junk instead of a TLS record (the client's handshake fails); in plaintext it
    accepts mail. Counts connections, STARTTLS commands and messages."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.conns = self.starttls = self.messages = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping:
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.conns += 1
            try:
                self._session(c)
            except OSError:
                pass
            finally:
                c.close()

    def _session(self, c):
        c.settimeout(10)
        f = c.makefile("rb")
        c.sendall(b"220 broken.test ESMTP\r\n")
        while True:
            ln = f.readline()
            if not ln:
                return
            cmd = ln.strip().upper()
            if cmd.startswith(b"EHLO"):
                c.sendall(b"250-broken.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
            elif cmd == b"STARTTLS":
                self.starttls += 1
                c.sendall(b"220 2.0.0 go ahead\r\n")
                c.sendall(b"this is not a TLS record\r\n" * 4)
                return
            elif cmd.startswith(b"MAIL") or cmd.startswith(b"RCPT"):
                c.sendall(b"250 2.1.0 ok\r\n")
            elif cmd == b"DATA":
                c.sendall(b"354 go on\r\n")
                while True:
                    d = f.readline()
                    if not d or d == b".\r\n":
                        break
                self.messages += 1
                c.sendall(b"250 2.0.0 Ok: queued as BROKEN%d\r\n" % self.messages)
            elif cmd == b"QUIT":
                c.sendall(b"221 2.0.0 bye\r\n")
                return
            elif cmd == b"RSET" or cmd == b"NOOP":
                c.sendall(b"250 2.0.0 ok\r\n")
            else:
                c.sendall(b"502 5.5.1 no\r\n")

    def close(self):
        self.stopping = True
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def broken():
    b = BrokenTLSServer()
    yield b
    b.close()


def test_may_retries_in_plaintext_after_a_failed_handshake(world, broken):
    r = world.relay(broken.port)  # default: tls=may
    qid = r.send(ALICE, [RCPT], message("fallback", to=RCPT))
    ev = r.wait_event(qid, "delivery")[0]
    assert ev["tls"] == "none", ev
    assert broken.messages == 1 and broken.starttls == 1, vars(broken)
    assert "trying again without TLS" in r.log(20000), r.log()
    r.stop()


def test_require_defers_after_a_failed_handshake(world, broken):
    r = world.relay(broken.port, dest="tls=require")
    qid = r.send(ALICE, [RCPT], message("no fallback", to=RCPT))
    ev = r.wait_event(qid, "transient_failure")[0]
    assert ev["status"] == "4.7.5", ev
    assert "TLS handshake failed" in ev["reply"], ev
    assert broken.messages == 0, vars(broken)
    r.stop()
