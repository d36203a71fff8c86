"""Black-box tests of TLS in the SMTP server: STARTTLS (RFC 3207) on the relay and
submission listeners, implicit TLS (RFC 8314) on the submissions listener, AUTH
required on both submission roles (RFC 6409), the Received header, the STARTTLS
command-injection defence (CVE-2011-0411), and the certificate reload on SIGHUP.

The certificate is made at test time by the `openssl` command (P-256, self-signed,
CN=localhost with a subjectAltName). Clients: openssl s_client, swaks, curl, Python
smtplib and raw dialogues over Python's ssl module.

Run inside a private network namespace (only 127.0.0.1 is used):

    unshare -n sh -c 'ip link set lo up && python3 -m pytest -q -p no:cacheprovider \
        tests/integration/test_tls.py'
"""
import os
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import time

import pytest

import phtest

POSTHASTE = os.path.join(phtest.BUILD_DIR, "mta", "posthaste", "posthaste")
RUN_TIMEOUT = 60.0
USER, PASSWORD = "alice@example.org", "correct horse battery staple"
QUEUED_RE = re.compile(r"queued as ([0-9A-Fa-f]{16})")
MESSAGE = ("From: alice@example.org\r\nTo: bob@example.net\r\nSubject: over TLS\r\n"
           "Message-ID: <tls-test@example.org>\r\n\r\nsent over TLS\r\n")


def make_cert(directory, name="cert"):
    """A self-signed P-256 certificate for localhost; returns (cert path, key path)."""
    cert = os.path.join(str(directory), name + ".pem")
    key = os.path.join(str(directory), name + ".key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=RUN_TIMEOUT)
    return cert, key


def der_of(cert_path):
    with open(cert_path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def client_ctx(cafile, check_hostname=True):
    """Verifies the chain against the test certificate (and the name localhost)."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = check_hostname
    return ctx


def user_cmd(*args, password=None):
    p = subprocess.run([POSTHASTE, "user"] + [str(a) for a in args],
                       input=(password + "\n").encode() if password is not None else b"",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
    assert p.returncode == 0, (p.stdout, p.stderr)


class Daemon:
    """posthaste with a relay listener (STARTTLS), submission and submissions listeners."""

    def __init__(self, base, users, cert, key, tls=True):
        self.port = phtest.free_port()
        self.sub_port = phtest.free_port()
        self.subs_port = phtest.free_port()
        self.base = os.path.join(str(base), "d%d" % self.port)
        os.makedirs(self.base)
        self.spool = os.path.join(self.base, "spool")
        self.conf = os.path.join(self.base, "posthaste.conf")
        extra = ""
        if tls:
            extra = ("tls_cert = %s\ntls_key = %s\nsubmission_listen = 127.0.0.1:%d\n"
                     "submissions_listen = 127.0.0.1:%d\n" % (cert, key, self.sub_port,
                                                              self.subs_port))
        with open(self.conf, "w") as f:
            f.write("listen = 127.0.0.1:%d\nspool_dir = %s\nusers_file = %s\n"
                    "delivery = no\nworkers = 1\naccounting_log = none\nsmtp_auth = yes\n"
                    "hostname = mx.test\n%s" % (self.port, self.spool, users, extra))
        self.err_path = os.path.join(self.base, "stderr")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen([POSTHASTE, "--config", self.conf], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._err)
        try:
            for p in ([self.port, self.sub_port, self.subs_port] if tls else [self.port]):
                s = phtest.wait_connectable("127.0.0.1", p, proc=self.proc, what="posthaste")
                s.close()
        except AssertionError as e:
            self.kill()
            raise AssertionError("%s\nstderr:\n%s" % (e, self.log()))

    def log(self):
        with open(self.err_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def dialogue(self, port=None):
        return phtest.Dialogue("127.0.0.1", port or self.port)

    def kill(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if not self._err.closed:
            self._err.close()

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        rc = self.proc.wait(phtest.STOP_TIMEOUT)
        self._err.close()
        assert rc == 0, "posthaste exited with %s; log:\n%s" % (rc, self.log())

    def show(self, qid):
        p = subprocess.run([POSTHASTE, "queue", "show", qid, "--spool", self.spool],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
        assert p.returncode == 0, p.stderr
        return p.stdout.decode("utf-8", "replace")

    def wait_show(self, qid, timeout=10.0):
        """`queue show` of qid (the daemon said 250 after the commit: it is there)."""
        return self.show(qid)


@pytest.fixture(scope="module")
def posthaste():
    if not (os.path.isfile(POSTHASTE) and os.access(POSTHASTE, os.X_OK)):
        pytest.skip("the posthaste daemon is not built: %s is missing" % POSTHASTE)
    if not shutil.which("openssl"):
        pytest.skip("the openssl command is missing")
    return POSTHASTE


@pytest.fixture
def env(posthaste, tmp_path):
    """(users file, cert, key)."""
    users = tmp_path / "users"
    users.write_text("")
    user_cmd("add", USER, "--users", users, "--password-stdin", password=PASSWORD)
    cert, key = make_cert(tmp_path)
    return str(users), cert, key


@pytest.fixture
def daemon(env, tmp_path):
    started = []

    def start(tls=True):
        users, cert, key = env
        d = Daemon(tmp_path, users, cert, key, tls=tls)
        d.cert, d.key = cert, key
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


def starttls(c, cafile, ehlo=True):
    """EHLO, STARTTLS on a Dialogue; wraps its socket. Returns the EHLO reply after TLS."""
    if ehlo:
        r = c.cmd("EHLO client.test", "250")
        assert "STARTTLS" in r.lines, r
    c.cmd("STARTTLS", "220 2.0.0")
    assert not c.buf, c.buf
    c.sock = client_ctx(cafile).wrap_socket(c.sock, server_hostname="localhost")
    return c.cmd("EHLO client.test", "250")


def plain_b64():
    import base64
    return base64.b64encode(("\0%s\0%s" % (USER, PASSWORD)).encode()).decode()


def sent_qid(resp):
    m = QUEUED_RE.search(resp if isinstance(resp, str) else resp.decode("ascii", "replace"))
    assert m, resp
    return m.group(1)


# ---------------------------------------------------------------- advertising and errors


def test_ehlo_offers_starttls_and_auth_only_after_it(daemon):
    d = daemon()
    for port in (d.port, d.sub_port):
        c = d.dialogue(port)
        r = c.cmd("EHLO client.test", "250")
        assert "STARTTLS" in r.lines, r
        assert not any(l.startswith("AUTH") for l in r.lines), r
        r = starttls(c, d.cert, ehlo=False)
        assert "STARTTLS" not in r.lines, r
        assert "AUTH PLAIN LOGIN" in r.lines, r
        c.cmd("STARTTLS", "503 5.5.1")  # already active
        c.cmd("QUIT", "221")
        c.close()


def test_starttls_errors(daemon):
    d = daemon()
    c = d.dialogue()
    c.cmd("EHLO client.test", "250")
    c.cmd("STARTTLS now", "501 5.5.4")
    c.cmd("NOOP", "250")
    c.close()
    d2 = daemon(tls=False)
    c = d2.dialogue()
    r = c.cmd("EHLO client.test", "250")
    assert "STARTTLS" not in r.lines, r
    c.cmd("STARTTLS", "502 5.5.1")
    c.cmd("QUIT", "221")
    c.close()


def test_session_is_reset_after_starttls(daemon):
    d = daemon()
    c = d.dialogue()
    c.cmd("EHLO client.test", "250")
    c.cmd("MAIL FROM:<a@example.org>", "250")
    c.cmd("STARTTLS", "220")
    c.sock = client_ctx(d.cert).wrap_socket(c.sock, server_hostname="localhost")
    c.cmd("MAIL FROM:<a@example.org>", "503 5.5.1")  # no EHLO after the switch
    c.cmd("EHLO client.test", "250")
    c.cmd("RCPT TO:<b@example.net>", "503 5.5.1")  # the transaction is gone
    c.cmd("QUIT", "221")
    c.close()


def test_starttls_command_injection_is_discarded(daemon):
    """CVE-2011-0411: plaintext pipelined after STARTTLS must never be executed."""
    d = daemon()
    for inject in (b"RSET\r\n", b"RSET\r\nMAIL FROM:<evil@example.org>\r\nNOOP"):
        c = d.dialogue()
        c.cmd("EHLO client.test", "250")
        c.send(b"STARTTLS\r\n" + inject)
        c.expect("220 2.0.0")
        assert not c.buf, c.buf
        c.sock = client_ctx(d.cert).wrap_socket(c.sock, server_hostname="localhost")
        r = c.cmd("EHLO client.test", "250")
        assert r.lines[0] == "mx.test", r  # the first reply is the one to our EHLO
        c.no_reply(0.5)
        c.cmd("MAIL FROM:<a@example.org>", "250 2.1.0")  # no injected MAIL
        c.cmd("QUIT", "221")
        c.close()


# ---------------------------------------------------------------- submission rules


def test_submission_requires_tls_then_auth(daemon):
    d = daemon()
    c = d.dialogue(d.sub_port)
    c.cmd("EHLO client.test", "250")
    c.cmd("AUTH PLAIN " + plain_b64(), "538 5.7.11")
    c.cmd("MAIL FROM:<alice@example.org>", "530 5.7.0")
    starttls(c, d.cert, ehlo=False)
    c.cmd("MAIL FROM:<alice@example.org>", "530 5.7.0")
    c.cmd("AUTH PLAIN " + plain_b64(), "235 2.7.0")
    c.cmd("MAIL FROM:<alice@example.org>", "250")
    c.cmd("RCPT TO:<bob@example.net>", "250")
    c.cmd("DATA", "354")
    c.send(MESSAGE.encode() + b".\r\n")
    qid = sent_qid(c.expect("250").text)
    c.cmd("QUIT", "221")
    c.close()
    shown = d.show(qid)
    assert re.search(r"with ESMTPSA \(version=TLSv1\.[23] cipher=\S+ bits=\d+\)", shown), shown


def test_submissions_requires_auth(daemon):
    d = daemon()
    sock = client_ctx(d.cert).wrap_socket(phtest.connect("127.0.0.1", d.subs_port),
                                          server_hostname="localhost")
    c = phtest.Dialogue("127.0.0.1", d.subs_port, sock=sock)
    r = c.cmd("EHLO client.test", "250")
    assert "AUTH PLAIN LOGIN" in r.lines and "STARTTLS" not in r.lines, r
    c.cmd("STARTTLS", "503 5.5.1")
    c.cmd("MAIL FROM:<alice@example.org>", "530 5.7.0")
    c.cmd("AUTH PLAIN " + plain_b64(), "235")
    c.cmd("MAIL FROM:<alice@example.org>", "250")
    c.cmd("QUIT", "221")
    c.close()


def test_relay_listener_accepts_tls_mail_into_spool(daemon):
    d = daemon()
    c = d.dialogue()
    starttls(c, d.cert)
    c.cmd("MAIL FROM:<alice@example.org>", "250")
    c.cmd("RCPT TO:<bob@example.net>", "250")
    c.cmd("DATA", "354")
    c.send(MESSAGE.encode() + b".\r\n")
    qid = sent_qid(c.expect("250").text)
    c.cmd("QUIT", "221")
    c.close()
    shown = d.show(qid)
    assert re.search(r"with ESMTPS \(version=TLSv1\.3 cipher=TLS_\S+ bits=\d+\)", shown), shown
    assert "sent over TLS" in shown


# ---------------------------------------------------------------- openssl s_client


def s_client(args, stdin=b"", timeout=30):
    p = subprocess.run(["openssl", "s_client"] + args, input=stdin, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def test_openssl_s_client_starttls(daemon):
    d = daemon()
    for ver in ("-tls1_2", "-tls1_3"):
        rc, out, err = s_client(["-starttls", "smtp", "-connect", "127.0.0.1:%d" % d.port,
                                 "-servername", "localhost", "-CAfile", d.cert, "-crlf",
                                 "-ign_eof", ver], b"EHLO again.test\nQUIT\n")
        assert rc == 0, (out, err)
        want = "TLSv1.2" if ver == "-tls1_2" else "TLSv1.3"
        assert re.search(r"Protocol\s*: %s" % re.escape(want), out) or \
            ("New, %s" % want) in out, out
        assert "Verify return code: 0 (ok)" in out, out
        # after the handshake our EHLO is answered again (s_client prints only what
        # came over TLS): AUTH now offered, STARTTLS no longer; then QUIT
        assert "250-mx.test" in out and "250 DSN" in out, out
        assert "250-AUTH PLAIN LOGIN" in out and "STARTTLS" not in out, out
        assert "221 2.0.0" in out, out


def test_openssl_s_client_implicit_tls(daemon):
    d = daemon()
    rc, out, err = s_client(["-connect", "127.0.0.1:%d" % d.subs_port, "-servername", "localhost",
                             "-CAfile", d.cert, "-crlf", "-ign_eof"],
                            b"EHLO client.test\nQUIT\n")
    assert rc == 0, (out, err)
    assert "220 mx.test ESMTP" in out, out
    assert re.search(r"Protocol\s*: TLSv1\.3", out), out
    assert "250-AUTH PLAIN LOGIN" in out and "221 2.0.0" in out, out


def test_tls_1_1_is_refused(daemon):
    d = daemon()
    for args in (["-connect", "127.0.0.1:%d" % d.subs_port],
                 ["-starttls", "smtp", "-connect", "127.0.0.1:%d" % d.port]):
        rc, out, err = s_client(args + ["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"])
        assert rc != 0, (out, err)
        assert "Cipher is (NONE)" in out, out
        assert re.search(r"alert protocol version|unsupported protocol|handshake failure|"
                         r"wrong version|no protocols available", err), err
    # the daemon is fine
    c = d.dialogue()
    c.cmd("EHLO client.test", "250")
    c.close()


# ---------------------------------------------------------------- swaks, curl, smtplib


def swaks(args):
    if not shutil.which("swaks"):
        pytest.skip("swaks is missing")
    p = subprocess.run(["swaks", "--from", USER, "--to", "bob@example.net", "--helo",
                        "client.test", "--timeout", "30", "--body", "via swaks"] + args,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
    return p.returncode, p.stdout.decode("utf-8", "replace") + p.stderr.decode("utf-8", "replace")


def test_swaks_starttls_relay(daemon):
    d = daemon()
    rc, out = swaks(["--server", "127.0.0.1:%d" % d.port, "--tls"])
    assert rc == 0, out
    assert "<-  220 2.0.0 Ready to start TLS" in out, out
    assert re.search(r"TLS started with cipher TLSv1\.[23]:", out), out
    d.show(sent_qid(out))


def test_swaks_tls_auth_submission(daemon):
    d = daemon()
    rc, out = swaks(["--server", "127.0.0.1:%d" % d.sub_port, "-tls", "-a", "PLAIN",
                     "-au", USER, "-ap", PASSWORD])
    assert rc == 0, out
    assert "235 2.7.0" in out, out
    assert "ESMTPSA" in d.show(sent_qid(out))


def test_swaks_implicit_tls_submissions(daemon):
    d = daemon()
    rc, out = swaks(["--server", "127.0.0.1:%d" % d.subs_port, "--tlsc", "--tls-protocol",
                     "tlsv1_2", "-a", "LOGIN", "-au", USER, "-ap", PASSWORD])
    assert rc == 0, out
    assert re.search(r"TLS started with cipher TLSv1\.2:", out), out
    assert "ESMTPSA (version=TLSv1.2" in d.show(sent_qid(out))


def test_smtplib_starttls_login_and_smtp_ssl(daemon):
    d = daemon()
    ctx = client_ctx(d.cert, check_hostname=False)  # smtplib sends the IP as the name
    with smtplib.SMTP("127.0.0.1", d.sub_port, timeout=30) as s:
        s.ehlo("client.test")
        assert s.has_extn("starttls") and not s.has_extn("auth")
        s.starttls(context=ctx)
        s.ehlo("client.test")
        assert s.has_extn("auth")
        s.login(USER, PASSWORD)
        refused = s.sendmail(USER, ["bob@example.net"], MESSAGE)
        assert refused == {}
    with smtplib.SMTP_SSL("127.0.0.1", d.subs_port, timeout=30, context=ctx) as s:
        s.ehlo("client.test")
        s.login(USER, PASSWORD)
        refused = s.sendmail(USER, ["bob@example.net"], MESSAGE)
        assert refused == {}
    # wrong password: refused, and the connection stays usable
    with smtplib.SMTP_SSL("127.0.0.1", d.subs_port, timeout=30, context=ctx) as s:
        s.ehlo("client.test")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login(USER, "wrong")


def test_curl_ssl_reqd(daemon, tmp_path):
    if not shutil.which("curl"):
        pytest.skip("curl is missing")
    d = daemon()
    msg = tmp_path / "msg.eml"
    msg.write_bytes(MESSAGE.encode())
    for url in ("smtp://127.0.0.1:%d" % d.sub_port, "smtps://127.0.0.1:%d" % d.subs_port):
        p = subprocess.run(["curl", "-sS", "-v", "--ssl-reqd", "--insecure", url, "--user",
                            "%s:%s" % (USER, PASSWORD), "--mail-from", USER, "--mail-rcpt",
                            "bob@example.net", "-T", str(msg)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
        err = p.stderr.decode("utf-8", "replace")
        assert p.returncode == 0, err
        assert "235 2.7.0" in err, err
        assert "ESMTPSA" in d.show(sent_qid(err))


# ---------------------------------------------------------------- reload


def test_sighup_reloads_the_certificate(daemon, tmp_path):
    d = daemon()
    old_der = der_of(d.cert)
    # an open TLS session from before the reload
    c = d.dialogue()
    starttls(c, d.cert)
    assert c.sock.getpeercert(binary_form=True) == old_der
    # new files in place (same paths), then SIGHUP
    new_cert, new_key = make_cert(tmp_path, "new")
    shutil.copyfile(new_cert, d.cert)
    shutil.copyfile(new_key, d.key)
    new_der = der_of(d.cert)
    assert new_der != old_der
    os.kill(d.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "TLS certificate reloaded" in d.log(), d.log()
    assert d.proc.poll() is None
    # new connections see the new certificate, on both kinds of listener
    c2 = d.dialogue()
    starttls(c2, new_cert)
    assert c2.sock.getpeercert(binary_form=True) == new_der
    c2.cmd("QUIT", "221")
    c2.close()
    sock = client_ctx(new_cert).wrap_socket(phtest.connect("127.0.0.1", d.subs_port),
                                            server_hostname="localhost")
    assert sock.getpeercert(binary_form=True) == new_der
    sock.close()
    rc, out, _ = s_client(["-connect", "127.0.0.1:%d" % d.subs_port, "-showcerts"])
    pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n", out, re.S)
    assert pem and ssl.PEM_cert_to_DER_cert(pem.group(0)) == new_der, out
    # the old session still works
    c.cmd("NOOP", "250")
    c.cmd("MAIL FROM:<alice@example.org>", "250")
    c.cmd("RCPT TO:<bob@example.net>", "250")
    c.cmd("DATA", "354")
    c.send(MESSAGE.encode() + b".\r\n")
    c.expect("250")
    c.cmd("QUIT", "221")
    c.close()
    # a broken reload keeps the current certificate
    with open(d.key, "w") as f:
        f.write("not a key\n")
    os.kill(d.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "not reloaded" not in d.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "not reloaded" in d.log(), d.log()
    c3 = d.dialogue()
    starttls(c3, new_cert)
    assert c3.sock.getpeercert(binary_form=True) == new_der
    c3.close()
    d.stop()


# ---------------------------------------------------------------- configuration


def test_config_checks(posthaste, env, tmp_path):
    users, cert, key = env
    cases = [
        ("submission_listen = 127.0.0.1:0\nusers_file = %s\n" % users,
         "submission_listen: needs tls_cert and tls_key"),
        ("submissions_listen = 127.0.0.1:0\ntls_cert = %s\ntls_key = %s\n" % (cert, key),
         "submissions_listen: needs users_file"),
        ("tls_cert = %s\n" % cert, "tls_cert: needs tls_key too"),
        ("tls_cert = %s\ntls_key = %s\n" % (cert, cert), "tls_cert"),
    ]
    for i, (text, want) in enumerate(cases):
        conf = tmp_path / ("c%d.conf" % i)
        conf.write_text("listen = 127.0.0.1:%d\nspool_dir = %s\ndelivery = no\n"
                        "accounting_log = none\n%s" % (phtest.free_port(), tmp_path / "sp", text))
        p = subprocess.run([POSTHASTE, "--config", str(conf)], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
        assert p.returncode == 1, (text, p.stderr)
        assert want in p.stderr.decode(), (text, p.stderr)
