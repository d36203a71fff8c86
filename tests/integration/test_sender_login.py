"""The sender check of authenticated sessions (`smtp_sender_login_check`, docs/auth.md).

After a successful AUTH, MAIL FROM must be the user's own address, one of its aliases
(the users file's 4th field), or either with a +subaddress; anything else gets
`553 5.7.1 <addr>: Sender address rejected: not owned by user <login>`. The null sender
is allowed. Sessions without AUTH are not checked. The daemon runs with `smtp_auth =
yes` and `smtp_auth_without_tls = yes` (tests only), no delivery; clients are raw
dialogues, smtplib and swaks.

    POSTHASTE_BUILD=build unshare -n sh -c 'ip link set lo up && exec /usr/bin/python3 \
        -m pytest -q -p no:cacheprovider tests/integration/test_sender_login.py'
"""
import base64
import os
import shutil
import smtplib
import subprocess

import pytest

import phtest

POSTHASTE = os.path.join(phtest.BUILD_DIR, "mta", "posthaste", "posthaste")
RUN_TIMEOUT = 60.0
USER, PASSWORD = "alice@example.org", "correct horse battery staple"
BOB, BOB_PASSWORD = "bob@example.org", "bobs own password"


def not_owned(addr, login=USER):
    return "553 5.7.1 <%s>: Sender address rejected: not owned by user %s" % (addr, login)


@pytest.fixture(scope="module")
def users(tmp_path_factory):
    """alice (aliases sales@ and info@example.org), bob, and alice+vip as a user of its own."""
    if not os.access(POSTHASTE, os.X_OK):
        pytest.skip("posthaste is not built: %s" % POSTHASTE)
    path = tmp_path_factory.mktemp("users") / "users"
    path.write_text("")
    for user, pw in ((USER, PASSWORD), (BOB, BOB_PASSWORD)):
        p = subprocess.run([POSTHASTE, "user", "add", user, "--users", str(path),
                            "--password-stdin"], input=(pw + "\n").encode(),
                           capture_output=True, timeout=RUN_TIMEOUT)
        assert p.returncode == 0, p
    # aliases are the 4th field: alice's line gets an empty maildir field and two aliases
    lines = path.read_text().splitlines()
    lines = [ln + "::sales@example.org,Info@Example.org" if ln.startswith(USER + ":") else ln
             for ln in lines]
    lines.append("alice+vip@example.org:*")
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    def __init__(self, tmp_path, users, extra):
        self.port = phtest.free_port()
        base = tmp_path / ("d%d" % self.port)
        base.mkdir()
        conf = base / "posthaste.conf"
        conf.write_text("listen = 127.0.0.1:%d\nspool_dir = %s\nusers_file = %s\n"
                        "delivery = no\nworkers = 2\naccounting_log = none\nsmtp_auth = yes\n"
                        "smtp_auth_without_tls = yes\n%s" % (self.port, base / "spool", users,
                                                             extra))
        self.err_path = base / "stderr"
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen([POSTHASTE, "--config", str(conf)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._err)
        try:
            phtest.wait_connectable("127.0.0.1", self.port, proc=self.proc,
                                    what="posthaste").close()
        except AssertionError as e:
            self.kill()
            raise AssertionError("%s\nstderr:\n%s" % (e, self.log()))

    def log(self):
        return self.err_path.read_bytes().decode("utf-8", "replace")

    def dialogue(self):
        return phtest.Dialogue("127.0.0.1", self.port)

    def stop(self):
        rc = phtest.stop_process(self.proc, timeout=phtest.STOP_TIMEOUT)
        self._err.close()
        assert rc == 0, "posthaste exited with %s; log:\n%s" % (rc, self.log())

    def kill(self):
        phtest.stop_process(self.proc)
        if not self._err.closed:
            self._err.close()


@pytest.fixture
def daemon(tmp_path, users):
    started = []

    def start(extra=""):
        d = Daemon(tmp_path, users, extra)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


def plain(user=USER, password=PASSWORD):
    return base64.b64encode(("\0%s\0%s" % (user, password)).encode()).decode()


def logged_in(d, user=USER, password=PASSWORD):
    c = d.dialogue()
    c.cmd("EHLO client.test", "250")
    c.cmd("AUTH PLAIN " + plain(user, password), "235 2.7.0")
    return c


# (sender, accepted) for alice
SENDERS = [
    ("alice@example.org", True),
    ("ALICE@Example.ORG", True),
    ("alice+lists@example.org", True),
    ("sales@example.org", True),
    ("Sales+q3@example.org", True),
    ("info@example.org", True),
    ("", True),  # the null sender
    ("bob@example.org", False),
    ("bob+alice@example.org", False),
    ("alice+vip@example.org", False),  # an exact entry of another user wins
    ("alice@example.net", False),
    ("mallory@example.org", False),
    ("alice@[127.0.0.1]", False),
]


def test_senders_of_an_authenticated_user(daemon):
    d = daemon()
    c = logged_in(d)
    for sender, ok in SENDERS:
        r = c.cmd("MAIL FROM:<%s>" % sender)
        if ok:
            assert r.code == 250, (sender, r)
            c.cmd("RSET", "250")
        else:
            assert r.raw.decode() == not_owned(sender) + "\r\n", (sender, r)
    # a refusal is not a protocol error: many of them do not end the session
    for _ in range(25):
        c.cmd("MAIL FROM:<bob@example.org>", "553 5.7.1")
    # the RCPT and DATA pipelined after a refused MAIL get 503
    c.send(b"MAIL FROM:<bob@example.org>\r\nRCPT TO:<x@example.net>\r\nDATA\r\nNOOP\r\n")
    c.expect("553 5.7.1")
    c.expect("503 5.5.1")
    c.expect("503 5.5.1")
    c.expect("250")
    # the whole way with an owned address
    c.cmd("MAIL FROM:<alice+x@example.org>", "250")
    c.cmd("RCPT TO:<someone@example.net>", "250")
    c.cmd("DATA", "354")
    c.send(b"Subject: mine\r\n\r\nhi\r\n.\r\n")
    c.expect("250")
    c.cmd("QUIT", "221")
    c.close()

    # another user: its own address only
    c = logged_in(d, BOB, BOB_PASSWORD)
    c.cmd("MAIL FROM:<bob+x@example.org>", "250")
    c.cmd("RSET", "250")
    r = c.cmd("MAIL FROM:<sales@example.org>", "553")
    assert r.raw.decode() == not_owned("sales@example.org", BOB) + "\r\n", r
    c.cmd("QUIT", "221")
    c.close()
    d.stop()


def test_login_case_and_unauthenticated_sessions(daemon):
    d = daemon()
    # the login as typed (another case) still owns its addresses; the reply names it as typed
    c = logged_in(d, "Alice@Example.ORG")
    c.cmd("MAIL FROM:<alice@example.org>", "250")
    c.cmd("RSET", "250")
    r = c.cmd("MAIL FROM:<bob@example.org>", "553")
    assert r.raw.decode() == not_owned("bob@example.org", "Alice@Example.ORG") + "\r\n", r
    c.cmd("QUIT", "221")
    c.close()
    # without AUTH: no sender check (relay access is decided at RCPT)
    c = d.dialogue()
    c.cmd("EHLO client.test", "250")
    c.cmd("MAIL FROM:<bob@example.org>", "250")
    c.cmd("RSET", "250")
    c.cmd("MAIL FROM:<alice@example.org>", "250")
    # AUTH is refused inside the transaction; after RSET it works and the check begins
    c.cmd("RSET", "250")
    c.cmd("AUTH PLAIN " + plain(), "235")
    c.cmd("MAIL FROM:<bob@example.org>", "553 5.7.1")
    c.cmd("QUIT", "221")
    c.close()
    d.stop()


def test_check_can_be_turned_off(daemon):
    d = daemon("smtp_sender_login_check = no\n")
    c = logged_in(d)
    c.cmd("MAIL FROM:<bob@example.org>", "250")
    c.cmd("RSET", "250")
    c.cmd("MAIL FROM:<anyone@anywhere.example>", "250")
    c.cmd("QUIT", "221")
    c.close()
    d.stop()


def test_submission_mode(daemon):
    d = daemon("smtp_auth_required = yes\n")
    c = d.dialogue()
    c.cmd("EHLO client.test", "250")
    c.cmd("MAIL FROM:<bob@example.org>", "530 5.7.0")  # AUTH first, then the sender
    c.cmd("AUTH PLAIN " + plain(), "235")
    c.cmd("MAIL FROM:<bob@example.org>", "553 5.7.1")
    c.cmd("MAIL FROM:<sales@example.org>", "250")
    c.cmd("QUIT", "221")
    c.close()
    d.stop()


def test_smtplib(daemon):
    d = daemon()
    with smtplib.SMTP("127.0.0.1", d.port, timeout=phtest.REPLY_TIMEOUT) as s:
        s.ehlo("client.test")
        s.login(USER, PASSWORD)
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            s.sendmail(BOB, ["someone@example.net"], b"Subject: forged\r\n\r\nhi\r\n")
        assert e.value.smtp_code == 553
        assert e.value.smtp_error.decode() == not_owned(BOB)[4:]
        assert s.sendmail("sales+x@example.org", ["someone@example.net"],
                          b"Subject: as an alias\r\n\r\nhi\r\n") == {}
        assert s.sendmail("", ["someone@example.net"], b"Subject: null\r\n\r\nhi\r\n") == {}
    d.stop()


def test_swaks(daemon):
    swaks = shutil.which("swaks")
    if not swaks:
        pytest.skip("swaks is not installed")
    d = daemon()

    def run(sender):
        return subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(d.port),
                               "--from", sender, "--to", "someone@example.net", "-a", "PLAIN",
                               "--auth-user", USER, "--auth-password", PASSWORD,
                               "--helo", "client.test"],
                              capture_output=True, timeout=RUN_TIMEOUT)
    p = run(USER)
    assert p.returncode == 0, p
    p = run(BOB)
    assert p.returncode != 0, p
    assert not_owned(BOB).encode() in p.stdout, p.stdout
    d.stop()


def test_check_config(daemon, tmp_path):
    p = subprocess.run([POSTHASTE, "--check-config"], capture_output=True, timeout=RUN_TIMEOUT)
    assert p.returncode == 0 and b"smtp_sender_login_check = yes\n" in p.stdout, p
