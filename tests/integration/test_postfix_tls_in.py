"""Postfix relaying into Posthaste over TLS (issue 5): the inbound side of
docs/tls.md "SMTP", driven by a real MTA's SMTP client.

A private Postfix (postfixtest.Postfix, its own configuration and queue under
/tmp) takes mail on its own port and relays everything to a Posthaste daemon on
a loopback port (relayhost = [127.0.0.1]:PORT, no DNS). Posthaste offers
STARTTLS with a certificate for mx.ph.test signed by a CA that the test makes
with `openssl` (both P-256); it delivers local.test to a Maildir and routes
d.test to a `posthaste-bench sink`. Checked for each case:

- every message arrives: Postfix logs status=sent with Posthaste's queue ids,
  those ids are in Posthaste's accounting log, the sink counts the d.test
  copies, the local.test copy is in the Maildir;
- Postfix's log says it used TLS ("... TLS connection established to
  127.0.0.1[127.0.0.1]:PORT: TLSv1.x ..."), at the trust level the policy asks;
- Posthaste's Received header says so: `with ESMTPS (version=TLSv1.x
  cipher=... bits=N)`, `ESMTPSA` after AUTH.

Cases: smtp_tls_security_level = encrypt (the certificate is not checked:
"Untrusted"), and the control case where Posthaste offers no STARTTLS (Postfix
defers, "TLS is required, but was not offered", nothing reaches Posthaste);
verify and secure with the test's CA as smtp_tls_CAfile ("Verified"), and secure
with a name the certificate does not carry (deferred, nothing received); and
smtp_tls_wrappermode = yes to Posthaste's implicit-TLS submissions listener
(RFC 8314; AUTH is required there, so Postfix logs in with SASL PLAIN from a
static password map, and the mail is from the user's own address).

    POSTHASTE_BUILD=$PWD/build unshare -n sh -c 'ip link set lo up && exec \
        /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/integration/test_postfix_tls_in.py'
"""
import os
import re
import shutil
import smtplib
import subprocess
import tempfile

import pytest

import phtest
import postfixtest
from test_delivery import CAROL, POSTHASTE, USERS, Relay, message, split_maildir_file, \
    strip_received, wait_for

MX_NAME = "mx.ph.test"          # the name in Posthaste's certificate
LOCAL_RCPT = CAROL              # carol@local.test: Posthaste's Maildir
REMOTE_RCPT = "u@d.test"        # routed by Posthaste to a bench sink
SENDER = "bob@postfix.example"  # not local to either MTA
AUTH_USER, AUTH_PASSWORD = "relay@local.test", "s3cret-relay-pw"
NO_DNS = "127.0.0.1:9"          # Posthaste's resolver: nothing answers (no lookup is made)
WAIT = 60.0                     # Postfix's queue manager and a TLS handshake on a loaded box

TLS_LINE = r"(Anonymous|Untrusted|Trusted|Verified) TLS connection established to " \
           r"127\.0\.0\.1\[127\.0\.0\.1\]:%d: (TLSv1\.[23]) "
RECEIVED_TLS = rb"with (ESMTPSA?) \(version=(TLSv1\.[23]) cipher=\S+ bits=\d+\)"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def posthaste():
    if not (os.path.isfile(POSTHASTE) and os.access(POSTHASTE, os.X_OK)):
        pytest.skip("the posthaste daemon is not built: %s is missing" % POSTHASTE)
    if not shutil.which("openssl"):
        pytest.skip("openssl (the command) is not installed: no certificate can be made")
    why = postfixtest.unavailable()
    if why:
        pytest.skip(why)
    return POSTHASTE


def openssl(*args):
    p = subprocess.run(["openssl"] + [str(a) for a in args], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert p.returncode == 0, "openssl %s: %s" % (" ".join(str(a) for a in args),
                                                  p.stdout.decode("utf-8", "replace"))


@pytest.fixture(scope="module")
def pki(posthaste):
    """A CA and a server certificate for mx.ph.test signed by it, in a directory every
    user may read (Postfix's smtp client reads the CA as the postfix user).
    Returns {"ca": path, "cert": path, "key": path}."""
    d = tempfile.mkdtemp(prefix="ph-pki-", dir="/tmp")
    os.chmod(d, 0o755)
    p = {n: os.path.join(d, n) for n in ("ca.crt", "ca.key", "mx.crt", "mx.key", "mx.csr", "ext")}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=Posthaste Test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", p["ca.key"], "-out", p["ca.crt"])
    openssl("req", "-new", *ec, "-subj", "/CN=" + MX_NAME, "-keyout", p["mx.key"],
            "-out", p["mx.csr"])
    with open(p["ext"], "w") as f:
        f.write("subjectAltName = DNS:%s\nbasicConstraints = CA:FALSE\n"
                "keyUsage = critical, digitalSignature\nextendedKeyUsage = serverAuth\n" % MX_NAME)
    openssl("x509", "-req", "-in", p["mx.csr"], "-CA", p["ca.crt"], "-CAkey", p["ca.key"],
            "-set_serial", "2", "-days", "2", "-extfile", p["ext"], "-out", p["mx.crt"])
    for n in ("ca.crt", "mx.crt", "mx.key"):
        os.chmod(p[n], 0o644)
    yield {"ca": p["ca.crt"], "cert": p["mx.crt"], "key": p["mx.key"]}
    shutil.rmtree(d, ignore_errors=True)


class World:
    """The sink, the Posthaste daemon and the Postfix of one test, stopped at teardown
    (Posthaste and the sink by PID, Postfix with `postfix stop` and its master's PID)."""

    def __init__(self, bench, tmp_path, pki):
        self.bench = bench
        self.tmp = tmp_path
        self.pki = pki
        self.sinks, self.relays, self.postfixes = [], [], []

    def sink(self):
        s = phtest.Sink(self.bench, ["--workers", "1", "--quiet"], self.tmp)
        self.sinks.append(s)
        return s

    def posthaste(self, sink, tls=True, submissions=False):
        """Posthaste: local.test to its Maildir, d.test to the sink; STARTTLS with the
        mx.ph.test certificate (tls), and an implicit-TLS submissions listener
        (submissions: self.subs_port, AUTH as AUTH_USER)."""
        users = os.path.join(str(self.tmp), "users-%d" % len(self.relays))
        with open(users, "w") as f:
            f.write("".join("%s:*\n" % u for u in USERS))
        p = subprocess.run([POSTHASTE, "user", "add", AUTH_USER, "--users", users,
                            "--password-stdin"], input=(AUTH_PASSWORD + "\n").encode(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        assert p.returncode == 0, p.stdout
        extra = "users_file = %s\n" % users  # the last one wins over Relay's own
        if tls:
            extra += "tls_cert = %s\ntls_key = %s\n" % (self.pki["cert"], self.pki["key"])
        if submissions:
            self.subs_port = phtest.free_port()
            extra += "submissions_listen = 127.0.0.1:%d\n" % self.subs_port
        r = Relay(self.tmp, NO_DNS, routes=[("d.test", "[127.0.0.1]:%d" % sink.port)],
                  extra=extra, workers=1, name="posthaste%d" % len(self.relays))
        self.relays.append(r)
        if submissions:
            phtest.wait_connectable("127.0.0.1", self.subs_port, proc=r.proc,
                                    what="posthaste's submissions listener").close()
        return r

    def postfix(self, relay_port, settings):
        """A private Postfix relaying everything to [127.0.0.1]:relay_port, its smtp
        client configured by `settings` (main.cf lines), TLS logged (loglevel 1)."""
        pf = postfixtest.Postfix(relay_port=relay_port,
                                 extra=["smtp_tls_loglevel = 1"] + list(settings))
        self.postfixes.append(pf)
        try:
            pf.start()
        except postfixtest.PostfixError as e:
            pytest.fail("the private Postfix did not start: %s" % e)
        return pf

    def cleanup(self):
        for pf in self.postfixes:
            pf.stop()
        for r in self.relays:
            r.kill()
        for s in self.sinks:
            s.kill()


@pytest.fixture
def world(posthaste, bench, tmp_path, pki):
    w = World(bench, tmp_path, pki)
    yield w
    w.cleanup()


# --------------------------------------------------------------------------- helpers


def submit(pf, n, tag, sender=SENDER):
    """n messages into Postfix (plain SMTP on its port) from sender, each to both
    recipients. Returns their subjects."""
    subjects = []
    with smtplib.SMTP("127.0.0.1", pf.port, timeout=30) as s:
        s.ehlo("client.posthaste.test")
        for i in range(n):
            subj = "%s %d" % (tag, i)
            refused = s.sendmail(sender, [LOCAL_RCPT, REMOTE_RCPT],
                                 message(subj, ["over TLS through Postfix", "line %d" % i],
                                         sender=sender, to=LOCAL_RCPT))
            assert refused == {}, refused
            subjects.append(subj)
    return subjects


def postfix_sent_ids(pf, port):
    """Posthaste queue ids from Postfix's status=sent lines for [127.0.0.1]:port
    ("... status=sent (250 2.0.0 Ok: queued as 1A2B...)"), one per line, in order."""
    want = "relay=127.0.0.1[127.0.0.1]:%d," % port
    return [m.group(1) for ln in pf.log_text().splitlines() if want in ln and "status=sent" in ln
            for m in [re.search(r"queued as ([0-9A-F]{16})\)", ln)] if m]


def diag(pf, r):
    return "Postfix log:\n%s\n%s" % (pf.log_text(6000), r.diag())


def wait_delivered(pf, r, port, n):
    """Waits for n messages (2 recipients each) sent by Postfix to Posthaste on port,
    and for Posthaste's deliveries of them; returns Posthaste's queue ids."""
    ids = wait_for(lambda: (lambda v: v if len(v) >= 2 * n else None)(postfix_sent_ids(pf, port)),
                   WAIT, "%d status=sent lines in Postfix's log for port %d" % (2 * n, port),
                   lambda: diag(pf, r))
    # both recipients of a message went in one transaction: one Posthaste queue id each
    qids = sorted(set(ids))
    assert len(qids) == n and len(ids) == 2 * n, (ids, pf.log_text(4000))
    recv = {e["queue_id"] for e in r.events(event="reception")}
    assert set(qids) <= recv, "Postfix's queue ids %r, Posthaste's receptions %r" % (qids, recv)
    for q in qids:
        d = r.wait_event(q, "delivery", n=2)
        assert sorted(e["recipient"] for e in d) == sorted([LOCAL_RCPT, REMOTE_RCPT]), d
    return qids


def tls_lines(pf, port):
    return re.findall(TLS_LINE % port, pf.log_text())


def check_received_over_tls(r, subjects, proto="ESMTPS", sender=SENDER):
    """Each subject's copy in carol's Maildir starts with Posthaste's Received header
    naming Postfix and the TLS it used. Returns the TLS versions seen there."""
    mails = r.wait_mail(LOCAL_RCPT, len(subjects))
    seen, versions = set(), set()
    for m in mails:
        rp, dt, rest = split_maildir_file(m)
        assert (rp, dt) == (sender, LOCAL_RCPT), (rp, dt)
        received, body = strip_received(rest)
        subj = re.search(rb"^Subject: (.*)\r$", body, re.M).group(1).decode()
        got = re.search(RECEIVED_TLS, received)
        assert got, "no TLS in Posthaste's Received header: %r" % received
        assert got.group(1).decode() == proto, received
        versions.add(got.group(2).decode())
        assert received.startswith(b"Received: from postfix.test.invalid "), received
        assert b"[127.0.0.1]" in received and b"by relay.posthaste.test (Posthaste)" in received, \
            received
        seen.add(subj)
    assert seen == set(subjects), (seen, subjects)
    return versions


# --------------------------------------------------------------------------- encrypt


def test_postfix_encrypt_relays_over_starttls(world):
    """smtp_tls_security_level = encrypt: Postfix must use TLS (or defer); the
    certificate is not checked, so Postfix calls the connection Untrusted (it has no
    CA for it)."""
    sink = world.sink()
    r = world.posthaste(sink)
    pf = world.postfix(r.port, ["smtp_tls_security_level = encrypt"])
    subjects = submit(pf, 3, "encrypt")
    wait_delivered(pf, r, r.port, 3)
    lines = tls_lines(pf, r.port)
    assert lines, "no 'TLS connection established to' line:\n%s" % pf.log_text(4000)
    assert all(level in ("Untrusted", "Anonymous") for level, _ in lines), lines
    print("Postfix:", [ln for ln in pf.log_text().splitlines() if "TLS connection" in ln])
    assert check_received_over_tls(r, subjects) == {v for _, v in lines}, lines
    assert "TLS is required" not in pf.log_text(), pf.log_text(4000)
    r.stop()
    phtest.assert_stats(sink.stop(), messages=3, recipients=3)


def test_postfix_encrypt_without_starttls_defers(world):
    """The control case: Posthaste without a certificate offers no STARTTLS; Postfix
    with encrypt defers the mail and Posthaste gets none of it."""
    sink = world.sink()
    r = world.posthaste(sink, tls=False)
    pf = world.postfix(r.port, ["smtp_tls_security_level = encrypt"])
    submit(pf, 1, "plain refused")
    wait_for(lambda: re.search(r"status=deferred .*TLS is required, but was not offered",
                               pf.log_text()),
             WAIT, "a deferral for the missing STARTTLS in Postfix's log", lambda: diag(pf, r))
    assert postfix_sent_ids(pf, r.port) == [] and not tls_lines(pf, r.port), pf.log_text(4000)
    assert r.events(event="reception") == [], r.diag()
    r.stop()
    assert sink.stop()["messages"] == 0


# --------------------------------------------------------------------------- verify, secure


@pytest.mark.parametrize("level", ["verify", "secure"])
def test_postfix_verifies_posthaste_certificate(world, level):
    """verify / secure with the test's CA: the chain and the name mx.ph.test (the
    relayhost is an address literal, so the name to match is given explicitly)."""
    sink = world.sink()
    r = world.posthaste(sink)
    pf = world.postfix(r.port, ["smtp_tls_security_level = %s" % level,
                                "smtp_tls_CAfile = %s" % world.pki["ca"],
                                "smtp_tls_%s_cert_match = %s" % (level, MX_NAME)])
    subjects = submit(pf, 2, level)
    wait_delivered(pf, r, r.port, 2)
    lines = tls_lines(pf, r.port)
    assert lines and all(lvl == "Verified" for lvl, _ in lines), \
        "expected only 'Verified TLS connection' lines: %r\n%s" % (lines, pf.log_text(4000))
    assert check_received_over_tls(r, subjects) == {v for _, v in lines}, lines
    r.stop()
    phtest.assert_stats(sink.stop(), messages=2, recipients=2)


def test_postfix_secure_with_another_name_defers(world):
    """The same CA, but Postfix expects a name the certificate does not carry: the
    handshake completes, the verification fails, the mail stays in Postfix's queue
    and Posthaste receives nothing."""
    sink = world.sink()
    r = world.posthaste(sink)
    pf = world.postfix(r.port, ["smtp_tls_security_level = secure",
                                "smtp_tls_CAfile = %s" % world.pki["ca"],
                                "smtp_tls_secure_cert_match = other.ph.test"])
    submit(pf, 1, "wrong name")
    wait_for(lambda: re.search(r"status=deferred .*Server certificate not verified",
                               pf.log_text()),
             WAIT, "a deferral for the unverified certificate in Postfix's log",
             lambda: diag(pf, r))
    assert postfix_sent_ids(pf, r.port) == [], pf.log_text(4000)
    assert r.events(event="reception") == [], r.diag()
    r.stop()
    assert sink.stop()["messages"] == 0


# --------------------------------------------------------------------------- implicit TLS


def test_postfix_wrappermode_to_the_submissions_listener(world):
    """smtp_tls_wrappermode = yes: TLS from the first octet to Posthaste's port-465
    style listener, where AUTH is required (Postfix: SASL PLAIN over the TLS
    session, credentials from a static map); the Received header says ESMTPSA."""
    sink = world.sink()
    r = world.posthaste(sink, submissions=True)
    port = world.subs_port
    pf = world.postfix(port, ["smtp_tls_wrappermode = yes",
                              "smtp_tls_security_level = encrypt",
                              "smtp_sasl_auth_enable = yes",
                              "smtp_sasl_password_maps = static:%s:%s" % (AUTH_USER, AUTH_PASSWORD),
                              "smtp_sasl_security_options = noanonymous",
                              "smtp_sasl_tls_security_options = noanonymous"])
    # after AUTH, Posthaste takes only the user's own address as the sender
    subjects = submit(pf, 2, "wrappermode", sender=AUTH_USER)
    wait_delivered(pf, r, port, 2)
    lines = tls_lines(pf, port)
    assert lines and all(lvl in ("Untrusted", "Anonymous") for lvl, _ in lines), \
        "%r\n%s" % (lines, pf.log_text(4000))
    assert check_received_over_tls(r, subjects, proto="ESMTPSA", sender=AUTH_USER) == \
        {v for _, v in lines}, lines
    assert "STARTTLS" not in pf.log_text(), pf.log_text(4000)
    r.stop()
    phtest.assert_stats(sink.stop(), messages=2, recipients=2)
