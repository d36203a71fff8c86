"""Black-box tests of SMTP AUTH (RFC 4954: PLAIN, LOGIN) and `posthaste user`.

The daemon runs with `smtp_auth = yes` and, since TLS is not wired yet,
`smtp_auth_without_tls = yes` (a key for tests only), one worker (the failed-AUTH
table is per worker), no delivery, and a users file written by `posthaste user add`.
Clients: raw dialogues (phtest.Dialogue), Python smtplib (PLAIN, LOGIN with and
without an initial response), swaks (-a PLAIN / -a LOGIN) and curl (smtp://, --user).

Run inside a private network namespace (only 127.0.0.1 is used):

    unshare -n sh -c 'ip link set lo up && python3 -m pytest -q -p no:cacheprovider \
        tests/integration/test_auth.py'
"""
import base64
import ctypes
import ctypes.util
import os
import select
import shutil
import signal
import smtplib
import stat
import subprocess
import time

import pytest

import phtest

POSTHASTE = os.path.join(phtest.BUILD_DIR, "mta", "posthaste", "posthaste")
RUN_TIMEOUT = 60.0
USER, PASSWORD = "alice@example.org", "correct horse battery staple"
AUTH_FAILED = "535 5.7.8"


@pytest.fixture(scope="module")
def posthaste():
    if not (os.path.isfile(POSTHASTE) and os.access(POSTHASTE, os.X_OK)):
        pytest.skip("the posthaste daemon is not built: %s is missing (build with `ninja -C %s` "
                    "or set POSTHASTE_BUILD)" % (POSTHASTE, phtest.BUILD_DIR))
    return POSTHASTE


def user_cmd(*args, password=None, check=None):
    """Runs `posthaste user ARGS` with password on stdin; returns (rc, stdout, stderr)."""
    p = subprocess.run([POSTHASTE, "user"] + [str(a) for a in args],
                       input=(password + "\n").encode() if password is not None else b"",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
    out, err = p.stdout.decode(), p.stderr.decode()
    if check is not None:
        assert p.returncode == check, "posthaste user %s: exit %d (want %d)\n%s%s" % (
            " ".join(map(str, args)), p.returncode, check, out, err)
    return p.returncode, out, err


class Daemon:
    """One posthaste on 127.0.0.1:<free port> with a configuration file."""

    def __init__(self, tmpdir, users, extra=""):
        self.port = phtest.free_port()
        base = os.path.join(str(tmpdir), "d%d" % self.port)
        os.makedirs(base)
        self.conf = os.path.join(base, "posthaste.conf")
        with open(self.conf, "w") as f:
            f.write("listen = 127.0.0.1:%d\nspool_dir = %s/spool\nusers_file = %s\n"
                    "delivery = no\nworkers = 1\naccounting_log = none\n"
                    "smtp_auth = yes\n%s" % (self.port, base, users, extra))
        self.err_path = os.path.join(base, "stderr")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen([POSTHASTE, "--config", self.conf], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._err)
        try:
            s = phtest.wait_connectable("127.0.0.1", self.port, proc=self.proc, what="posthaste")
            s.close()
        except AssertionError as e:
            self.kill()
            raise AssertionError("%s\nstderr:\n%s" % (e, self.log()))

    def log(self):
        with open(self.err_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def dialogue(self, name="client"):
        return phtest.Dialogue("127.0.0.1", self.port, name=name)

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        rc = self.proc.wait(phtest.STOP_TIMEOUT)
        self._err.close()
        assert rc == 0, "posthaste exited with %s; log:\n%s" % (rc, self.log())

    def kill(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if not self._err.closed:
            self._err.close()


@pytest.fixture
def users(posthaste, tmp_path):
    """A users file with USER (added by `posthaste user add`) and a comment."""
    path = tmp_path / "users"
    path.write_text("# logins for the AUTH tests\nbob@example.org:*\n")
    user_cmd("add", USER, "--users", path, "--password-stdin", password=PASSWORD, check=0)
    return path


@pytest.fixture
def daemon(posthaste, tmp_path):
    """Factory: daemon(users, extra_config) -> a running Daemon, killed by PID at teardown."""
    started = []

    def start(users, extra="smtp_auth_without_tls = yes\n"):
        d = Daemon(tmp_path, users, extra)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


def b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def plain(user=USER, password=PASSWORD, authzid=""):
    return b64("%s\0%s\0%s" % (authzid, user, password))


def ehlo(d):
    return d.cmd("EHLO client.test", "250")


# ---------------------------------------------------------------- advertising


def test_ehlo_advertises_auth_without_tls_only_for_tests(daemon, users):
    d = daemon(users)
    c = d.dialogue()
    r = ehlo(c)
    assert "AUTH PLAIN LOGIN" in r.lines, r
    c.cmd("QUIT", "221")
    c.close()
    d.stop()

    # the default: AUTH needs TLS, which this connection lacks
    d = daemon(users, extra="")
    c = d.dialogue()
    r = ehlo(c)
    assert "AUTH" not in r.keywords, r
    c.cmd("AUTH PLAIN " + plain(), "538 5.7.11")
    c.cmd("QUIT", "221")
    c.close()
    d.stop()


def test_auth_disabled_and_config_checks(daemon, tmp_path, users):
    d = daemon(users, extra="smtp_auth = no\n")
    c = d.dialogue()
    r = ehlo(c)
    assert "AUTH" not in r.keywords, r
    c.cmd("AUTH PLAIN " + plain(), "503 5.5.1")
    c.cmd("QUIT", "221")
    c.close()
    d.stop()

    conf = tmp_path / "c.conf"
    conf.write_text("smtp_auth = yes\n")
    p = subprocess.run([POSTHASTE, "--config", conf, "--check-config"], capture_output=True,
                       timeout=RUN_TIMEOUT)
    assert p.returncode == 1 and b"smtp_auth: needs users_file" in p.stderr, p
    conf.write_text("smtp_auth_without_tls = yes\n")
    p = subprocess.run([POSTHASTE, "--config", conf, "--check-config"], capture_output=True,
                       timeout=RUN_TIMEOUT)
    assert p.returncode == 1 and b"smtp_auth_without_tls: needs smtp_auth = yes" in p.stderr, p
    conf.write_text("users_file = %s\nsmtp_auth = yes\nsmtp_auth_without_tls = yes\n"
                    "smtp_auth_required = yes\n" % users)
    p = subprocess.run([POSTHASTE, "--config", conf, "--check-config"], capture_output=True,
                       timeout=RUN_TIMEOUT)
    assert p.returncode == 0, p
    for line in (b"smtp_auth = yes\n", b"smtp_auth_required = yes\n",
                 b"smtp_auth_without_tls = yes\n"):
        assert line in p.stdout, p.stdout


# ---------------------------------------------------------------- raw dialogues


def test_plain_with_and_without_initial_response(daemon, users):
    d = daemon(users)
    c = d.dialogue()
    ehlo(c)
    c.cmd("AUTH PLAIN " + plain(), "235 2.7.0")
    c.cmd("AUTH PLAIN " + plain(), "503 5.5.1")  # one AUTH per session
    c.cmd("QUIT", "221")
    c.close()

    c = d.dialogue()
    ehlo(c)
    r = c.cmd("AUTH PLAIN", "334")
    assert r.raw == b"334 \r\n", r
    c.cmd(plain(authzid=USER), "235 2.7.0")
    c.cmd("MAIL FROM:<%s>" % USER, "250")
    c.cmd("RCPT TO:<someone@example.net>", "250")
    c.cmd("QUIT", "221")
    c.close()
    d.stop()


def test_login_mechanism_and_cancel(daemon, users):
    d = daemon(users)
    c = d.dialogue()
    ehlo(c)
    r = c.cmd("AUTH LOGIN", "334")
    assert r.lines == ["VXNlcm5hbWU6"], r
    r = c.cmd(b64(USER), "334")
    assert r.lines == ["UGFzc3dvcmQ6"], r
    c.cmd(b64(PASSWORD), "235 2.7.0")
    c.close()

    c = d.dialogue()
    ehlo(c)
    c.cmd("AUTH LOGIN " + b64(USER), "334")  # the user name as initial response
    c.cmd("*", "501 5.0.0")
    c.cmd("AUTH PLAIN", "334")
    c.cmd("*", "501 5.0.0")
    c.cmd("AUTH PLAIN *", "501 5.0.0")
    c.cmd("AUTH PLAIN", "334")
    c.cmd("not base64!", "501 5.5.2")
    c.cmd("AUTH CRAM-MD5", "504 5.5.4")
    c.cmd("AUTH", "501")
    c.cmd("AUTH LOGIN " + b64(USER), "334")
    c.cmd(b64(PASSWORD), "235 2.7.0")  # cancels and errors are not failed logins
    c.cmd("QUIT", "221")
    c.close()
    d.stop()


def test_auth_sequence_errors(daemon, users):
    d = daemon(users)
    c = d.dialogue()
    c.cmd("AUTH PLAIN " + plain(), "503 5.5.1")  # before EHLO
    c.cmd("HELO client.test", "250")
    c.cmd("AUTH PLAIN " + plain(), "503 5.5.1")  # HELO: no extensions
    ehlo(c)
    c.cmd("MAIL FROM:<x@example.net>", "250")
    c.cmd("AUTH PLAIN " + plain(), "503 5.5.1")  # inside a transaction
    c.cmd("RSET", "250")
    c.cmd("AUTH PLAIN " + plain(), "235 2.7.0")
    c.cmd("QUIT", "221")
    c.close()
    d.stop()


def test_wrong_password_and_unknown_user(daemon, users):
    d = daemon(users)
    c = d.dialogue()
    ehlo(c)
    c.cmd("AUTH PLAIN " + plain(password="Wr0ng-Passw0rd"), AUTH_FAILED)
    c.cmd("AUTH PLAIN " + plain(user="nobody@example.org"), AUTH_FAILED)
    c.cmd("QUIT", "221")
    c.close()
    c = d.dialogue()
    ehlo(c)
    # a user who may not log in (hash "*"), an authzid naming someone else
    c.cmd("AUTH PLAIN " + plain(user="bob@example.org", password="*"), AUTH_FAILED)
    c.cmd("QUIT", "221")
    c.close()
    d.stop()
    assert "AUTH failed for alice@example.org" in d.log()
    assert PASSWORD not in d.log() and "Wr0ng-Passw0rd" not in d.log()


def test_authzid_must_be_the_user(daemon, users):
    d = daemon(users)
    c = d.dialogue()
    ehlo(c)
    c.cmd("AUTH PLAIN " + plain(authzid="bob@example.org"), AUTH_FAILED)
    c.cmd("QUIT", "221")
    c.close()
    d.stop()


def test_rate_limit_per_address_and_session_drop(daemon, users):
    d = daemon(users)
    c = d.dialogue()
    ehlo(c)
    for _ in range(3):
        c.cmd("AUTH PLAIN " + plain(password="wrong"), AUTH_FAILED)
    # the address had 3 failures within 60 s: even the right password is not checked
    c.cmd("AUTH PLAIN " + plain(), "454 4.7.0")
    c.cmd("QUIT", "221")
    c.close()

    # a new connection from the same address is limited too; the 5th failure drops it
    c = d.dialogue()
    ehlo(c)
    for _ in range(4):
        c.cmd("AUTH PLAIN " + plain(), "454 4.7.0")
    c.send("AUTH PLAIN " + plain())
    c.expect("454 4.7.0")
    c.expect("421 4.7.0")
    c.expect_closed()
    c.close()

    # mail without AUTH still flows (the limit is on AUTH only)
    with smtplib.SMTP("127.0.0.1", d.port, timeout=phtest.REPLY_TIMEOUT) as s:
        s.ehlo("client.test")
        s.sendmail("x@example.net", ["postmaster@example.net"], b"Subject: t\r\n\r\nhi\r\n")
    d.stop()


def test_five_failures_close_the_session(daemon, users, tmp_path):
    # a higher per-address limit is not configurable: a fresh daemon shows the session bound
    d = daemon(users)
    c = d.dialogue()
    ehlo(c)
    for _ in range(3):
        c.cmd("AUTH PLAIN " + plain(password="bad"), AUTH_FAILED)
    c.cmd("AUTH PLAIN " + plain(), "454 4.7.0")
    c.send("AUTH PLAIN " + plain())
    c.expect("454 4.7.0")
    c.expect("421 4.7.0")
    c.expect_closed()
    c.close()
    d.stop()


def test_submission_requires_auth(daemon, users):
    d = daemon(users, extra="smtp_auth_without_tls = yes\nsmtp_auth_required = yes\n")
    c = d.dialogue()
    ehlo(c)
    c.cmd("MAIL FROM:<%s>" % USER, "530 5.7.0")
    c.cmd("AUTH PLAIN " + plain(), "235 2.7.0")
    c.cmd("MAIL FROM:<%s>" % USER, "250")
    c.cmd("RCPT TO:<someone@example.net>", "250")
    c.cmd("DATA", "354")
    c.send(b"Subject: submitted\r\n\r\nhello\r\n.\r\n")
    c.expect("250")
    c.cmd("QUIT", "221")
    c.close()
    d.stop()


# ---------------------------------------------------------------- checks off the worker

SLOW, BUSY = "slow@example.org", "busy@example.org"


def yescrypt_hash(password, cost):
    """A yescrypt hash at `cost` (crypt_gensalt's count: `posthaste user` uses 5, ~20 ms;
    each step doubles time and memory), through libcrypt with ctypes."""
    name = ctypes.util.find_library("crypt") or "libcrypt.so.1"
    try:
        lib = ctypes.CDLL(name)
        lib.crypt_gensalt.restype = ctypes.c_char_p
        lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p,
                                      ctypes.c_int]
        lib.crypt.restype = ctypes.c_char_p
        lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    except (OSError, AttributeError) as e:
        pytest.skip("no libxcrypt to make a costly hash with: %s" % e)
    setting = lib.crypt_gensalt(b"$y$", cost, None, 0)
    h = lib.crypt(password.encode(), setting) if setting else None
    if not h or not h.startswith(b"$y$"):
        pytest.skip("this libcrypt has no yescrypt")
    return h.decode()


@pytest.fixture(scope="module")
def costly_hashes():
    """SLOW: cost 8 (~150 ms, 128 MiB), BUSY: cost 7 (~75 ms), both with PASSWORD."""
    return {SLOW: yescrypt_hash(PASSWORD, 8), BUSY: yescrypt_hash(PASSWORD, 7)}


@pytest.fixture
def costly_users(users, costly_hashes):
    with open(users, "a") as f:
        for user, h in costly_hashes.items():
            f.write("%s:%s\n" % (user, h))
    return users


def single_thread_daemon(daemon, users):
    # one worker holds every connection; one hashing thread makes the checks queue up
    return daemon(users, extra="smtp_auth_without_tls = yes\nauth_threads = 1\n")


def test_password_check_does_not_hold_the_worker(daemon, costly_users):
    d = single_thread_daemon(daemon, costly_users)
    # the cost of one check of SLOW's hash, alone
    c = d.dialogue()
    ehlo(c)
    t0 = time.monotonic()
    c.cmd("AUTH PLAIN " + plain(user=SLOW), "235 2.7.0")
    t_auth = time.monotonic() - t0
    c.close()
    if t_auth < 0.05:
        pytest.skip("a cost-8 yescrypt check took only %.3f s here: too fast to tell" % t_auth)

    # three clients authenticate at once (three checks in a row on one thread) while
    # another client of the same worker goes on with NOOPs
    authing = [d.dialogue(name="auth%d" % i) for i in range(3)]
    other = d.dialogue(name="noop")
    for x in authing + [other]:
        ehlo(x)
    for x in authing:
        x.send("AUTH PLAIN " + plain(user=SLOW))
    t_send = time.monotonic()
    rtts, done_at, pending = [], [], list(authing)
    while pending and time.monotonic() < t_send + 60:
        t = time.monotonic()
        other.cmd("NOOP", "250")
        rtts.append(time.monotonic() - t)
        ready, _, _ = select.select([x.sock for x in pending], [], [], 0)
        for x in [x for x in pending if x.sock in ready]:
            x.expect("235 2.7.0")
            done_at.append(time.monotonic() - t_send)
            pending.remove(x)
    assert not pending, "AUTH answers missing after 60 s"
    rtts.sort()
    median, worst = rtts[len(rtts) // 2], rtts[-1]
    info = "one check %.3f s, all three %.3f s; %d NOOPs, median %.4f s, worst %.4f s" % (
        t_auth, max(done_at), len(rtts), median, worst)
    # a check on the worker would hold each NOOP for up to a whole check
    assert len(rtts) >= 10, info
    assert median < t_auth / 10 and worst < t_auth / 2, info
    for x in authing + [other]:
        x.cmd("QUIT", "221")
        x.close()
    d.stop()


def test_full_check_queue_answers_454_at_once(daemon, costly_users):
    # one thread: 1 check running + 32 waiting; the rest is refused without waiting
    d = single_thread_daemon(daemon, costly_users)
    n = 40
    conns = [d.dialogue(name="c%d" % i) for i in range(n)]
    for c in conns:
        ehlo(c)
    for c in conns:
        c.send("AUTH PLAIN " + plain(user=BUSY))
    t_send = time.monotonic()
    arrived, pending = {}, list(conns)
    while pending and time.monotonic() < t_send + 120:
        ready, _, _ = select.select([c.sock for c in pending], [], [], 1.0)
        for c in [c for c in pending if c.sock in ready]:
            r = c.read_reply()
            arrived[c] = (r.code, time.monotonic() - t_send, r)
            pending.remove(c)
    assert not pending, "AUTH answers missing after 120 s"
    codes = [v[0] for v in arrived.values()]
    assert set(codes) <= {235, 454}, arrived
    refused = [v for v in arrived.values() if v[0] == 454]
    accepted = [v for v in arrived.values() if v[0] == 235]
    # 32 wait, plus the one running if the thread took it before the 33rd AUTH arrived
    # (it may not have: the AUTHs arrive together)
    assert refused and 32 <= len(accepted) <= 33, codes
    for _, _, r in refused:
        assert r.lines[0].startswith("4.7.0"), r
    # the refusals did not wait for the checks ahead of them
    last_ok = max(t for _, t, _ in accepted)
    assert max(t for _, t, _ in refused) < last_ok / 4, sorted((c, round(t, 3)) for c, t, _ in
                                                               arrived.values())
    # a 454 is not a failed login: the same address still logs in
    conns[0].close()
    c = d.dialogue()
    ehlo(c)
    c.cmd("AUTH PLAIN " + plain(), "235 2.7.0")
    c.close()
    for x in conns[1:]:
        x.close()
    d.stop()
    assert "password-check queue is full" in d.log()


def test_disconnect_and_stop_with_checks_in_flight(daemon, costly_users):
    d = single_thread_daemon(daemon, costly_users)
    # clients that leave while their checks wait or run
    for i in range(3):
        c = d.dialogue(name="gone%d" % i)
        ehlo(c)
        c.send("AUTH PLAIN " + plain(user=SLOW))
        c.abort() if i % 2 else c.close()
    waiting = []
    for i in range(2):
        c = d.dialogue(name="waiting%d" % i)
        ehlo(c)
        c.send("AUTH PLAIN " + plain(user=SLOW))
        waiting.append(c)
    other = d.dialogue()
    ehlo(other)
    other.cmd("NOOP", "250")
    # SIGTERM with five checks queued: the waiting sessions get their answer, then 421
    d.stop()  # exit 0: nothing leaked or used after free (the sanitizer build checks)
    for c in waiting:
        got = c.expect_closed(allowed="xxx")
        assert [r.code for r in got] == [235, 421], got
        c.close()
    other.expect_closed(allowed="421")
    other.close()


def test_stop_cancels_checks_still_queued(daemon, users):
    # more checks queued than the shutdown grace (5 s) can run: at its end the connections
    # are cut and the worker cancels the rest (the running one finishes on its thread)
    glacial = "glacial@example.org"
    with open(users, "a") as f:
        f.write("%s:%s\n" % (glacial, yescrypt_hash(PASSWORD, 9)))  # ~0.4 s, 256 MiB
    d = single_thread_daemon(daemon, users)
    c = d.dialogue()
    ehlo(c)
    t0 = time.monotonic()
    c.cmd("AUTH PLAIN " + plain(user=glacial), "235 2.7.0")
    t_auth = time.monotonic() - t0
    c.close()
    n = min(33, int(8.0 / t_auth) + 2)  # 1 running + at most 32 waiting
    if n * t_auth < 7.0:
        pytest.skip("checks too fast here (%.3f s) to outlast the shutdown grace" % t_auth)
    conns = [d.dialogue(name="c%d" % i) for i in range(n)]
    for c in conns:
        ehlo(c)
    for c in conns:
        c.send("AUTH PLAIN " + plain(user=glacial))
    time.sleep(0.2)
    t0 = time.monotonic()
    d.stop()  # exit 0: nothing leaked or used after free (the sanitizer build checks)
    assert time.monotonic() - t0 < 15
    answered = cut = 0
    for c in conns:
        got = [r.code for r in c.expect_closed(allowed="xxx")]
        assert got in ([235, 421], []), got
        answered += got == [235, 421]
        cut += got == []
        c.close()
    assert answered >= 1 and cut >= 1, (answered, cut)


# ---------------------------------------------------------------- real clients


def test_smtplib_plain_and_login(daemon, users):
    d = daemon(users)
    with smtplib.SMTP("127.0.0.1", d.port, timeout=phtest.REPLY_TIMEOUT) as s:
        s.ehlo("client.test")
        assert s.has_extn("auth") and "PLAIN" in s.esmtp_features["auth"].split()
        code, resp = s.login(USER, PASSWORD)  # picks PLAIN
        assert code == 235, (code, resp)
        s.sendmail(USER, ["someone@example.net"], b"Subject: smtplib\r\n\r\nhi\r\n")
    for ir in (True, False):
        with smtplib.SMTP("127.0.0.1", d.port, timeout=phtest.REPLY_TIMEOUT) as s:
            s.ehlo("client.test")
            s.user, s.password = USER, PASSWORD
            code, resp = s.auth("LOGIN", s.auth_login, initial_response_ok=ir)
            assert code == 235, (code, resp)
    with smtplib.SMTP("127.0.0.1", d.port, timeout=phtest.REPLY_TIMEOUT) as s:
        s.ehlo("client.test")
        s.user, s.password = USER, PASSWORD
        code, resp = s.auth("PLAIN", s.auth_plain, initial_response_ok=False)
        assert code == 235, (code, resp)
    with smtplib.SMTP("127.0.0.1", d.port, timeout=phtest.REPLY_TIMEOUT) as s:
        s.ehlo("client.test")
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login(USER, "not the password")
        assert e.value.smtp_code == 535 and e.value.smtp_error.startswith(b"5.7.8"), e.value
    d.stop()


def test_swaks_plain_and_login(daemon, users):
    swaks = shutil.which("swaks")
    if not swaks:
        pytest.skip("swaks is not installed")
    d = daemon(users)
    for mech in ("PLAIN", "LOGIN"):
        p = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(d.port),
                            "--from", USER, "--to", "someone@example.net", "-a", mech,
                            "--auth-user", USER, "--auth-password", PASSWORD,
                            "--header", "Subject: swaks " + mech],
                           capture_output=True, timeout=RUN_TIMEOUT)
        out = p.stdout.decode("utf-8", "replace")
        assert p.returncode == 0, out
        assert "235 2.7.0" in out and "queued as" in out, out
    p = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(d.port), "--from", USER,
                        "--to", "someone@example.net", "-a", "LOGIN", "--auth-user", USER,
                        "--auth-password", "wrong"], capture_output=True, timeout=RUN_TIMEOUT)
    out = p.stdout.decode("utf-8", "replace")
    assert p.returncode != 0 and "535 5.7.8" in out, out
    d.stop()


def test_curl_user(daemon, users, tmp_path):
    curl = shutil.which("curl")
    if not curl:
        pytest.skip("curl is not installed")
    d = daemon(users)
    msg = tmp_path / "msg.txt"
    msg.write_bytes(b"From: <%s>\r\nSubject: curl\r\n\r\nhello from curl\r\n" % USER.encode())
    for opts in ([], ["--login-options", "AUTH=PLAIN"], ["--login-options", "AUTH=LOGIN"]):
        p = subprocess.run([curl, "-sS", "-v", "smtp://127.0.0.1:%d" % d.port, "--user",
                            "%s:%s" % (USER, PASSWORD), "--mail-from", USER, "--mail-rcpt",
                            "someone@example.net", "--upload-file", str(msg)] + opts,
                           capture_output=True, timeout=RUN_TIMEOUT)
        err = p.stderr.decode("utf-8", "replace")
        assert p.returncode == 0, err
        assert "235 2.7.0" in err, err
    p = subprocess.run([curl, "-sS", "smtp://127.0.0.1:%d" % d.port, "--user", USER + ":nope",
                        "--mail-from", USER, "--mail-rcpt", "someone@example.net",
                        "--upload-file", str(msg)], capture_output=True, timeout=RUN_TIMEOUT)
    assert p.returncode == 67, p  # CURLE_LOGIN_DENIED
    d.stop()


# ---------------------------------------------------------------- posthaste user


def login_code(port, user, password):
    with smtplib.SMTP("127.0.0.1", port, timeout=phtest.REPLY_TIMEOUT) as s:
        s.ehlo("client.test")
        try:
            return s.login(user, password)[0]
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code


def test_user_add_passwd_del_round_trip(daemon, posthaste, tmp_path):
    path = tmp_path / "users"
    original = ("# users of example.org\n\n"
                "bob@example.org:*:/srv/mail/bob:bobby@example.org\n"
                "  # an indented comment \n")
    path.write_text(original)
    os.chmod(path, 0o644)
    rc, out, _ = user_cmd("add", "Carol@Example.org", "--users", path, "--password-stdin",
                          password="first pass", check=0)
    assert "carol@example.org added to" in out
    text = path.read_text()
    assert text.startswith(original), text
    line = text[len(original):]
    assert line.startswith("carol@example.org:$y$") and line.endswith("\n") and \
        line.count("\n") == 1, line
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".users.")]

    d = daemon(path)
    assert login_code(d.port, "carol@example.org", "first pass") == 235
    assert login_code(d.port, "CAROL@example.org", "first pass") == 235
    assert login_code(d.port, "bobby@example.org", "first pass") == 535  # an alias: no login
    d.stop()

    # passwd: only the hash changes
    user_cmd("passwd", "carol@example.org", "--users", path, password="second pass", check=0)
    text2 = path.read_text()
    assert text2.startswith(original) and text2 != text
    d = daemon(path)
    assert login_code(d.port, "carol@example.org", "first pass") == 535
    d.stop()
    d = daemon(path)  # a fresh failure table
    assert login_code(d.port, "carol@example.org", "second pass") == 235
    d.stop()

    # passwd of a user without a hash gives it one; the other fields stay
    user_cmd("passwd", "bob@example.org", "--users", path, password="bob pass", check=0)
    bob = [ln for ln in path.read_text().splitlines() if ln.startswith("bob@")][0]
    assert bob.startswith("bob@example.org:$y$") and \
        bob.endswith(":/srv/mail/bob:bobby@example.org"), bob

    # refusals
    rc, _, err = user_cmd("add", "carol@example.org", "--users", path, password="x", check=1)
    assert "carol@example.org exists already" in err
    rc, _, err = user_cmd("add", "bobby@example.org", "--users", path, password="x", check=1)
    assert "exists already as an alias of bob@example.org" in err
    rc, _, err = user_cmd("passwd", "nobody@example.org", "--users", path, password="x", check=1)
    assert "no user nobody@example.org" in err
    rc, _, err = user_cmd("del", "nobody@example.org", "--users", path, check=1)
    assert "no user nobody@example.org" in err
    rc, _, err = user_cmd("add", "new@example.org", "--users", path, password="", check=1)
    assert "empty password" in err
    user_cmd("add", "not-an-address", "--users", path, password="x", check=2)

    # del: the line goes, everything else stays
    user_cmd("del", "carol@example.org", "--users", path, check=0)
    after = path.read_text()
    assert "carol@" not in after and after.startswith("# users of example.org\n\n")
    assert "  # an indented comment \n" in after
    d = daemon(path)
    assert login_code(d.port, "carol@example.org", "second pass") == 535
    d.stop()


def test_user_cmd_with_config_and_new_file(posthaste, tmp_path):
    path = tmp_path / "sub" / "users"
    os.makedirs(path.parent)
    conf = tmp_path / "p.conf"
    conf.write_text("users_file = %s\n" % path)
    user_cmd("add", "dave@example.org", "--config", conf, password="dave pw", check=0)
    assert path.read_text().startswith("dave@example.org:$y$")
    rc, _, err = user_cmd("add", "x@example.org", password="x")
    assert rc == 2 and "no users file" in err
    # a broken file is never rewritten
    path.write_text("this is not a users line\n")
    rc, _, err = user_cmd("add", "e@example.org", "--users", path, password="x", check=1)
    assert "fix the file first" in err
    assert path.read_text() == "this is not a users line\n"
