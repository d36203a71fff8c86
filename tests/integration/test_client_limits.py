"""Per-client-address limits (docs/smtp-server.md, "Client limits").

`client_connection_limit` (open connections), `client_connection_rate` (new
connections) and `client_message_rate` (MAIL commands) per client address, counted in
one table shared by every worker; `mynetworks` clients are exempt unless
`client_limit_exempt_mynetworks = no`. The daemon listens on 0.0.0.0 (and [::1]) inside
the test's network namespace with `mynetworks = 127.0.0.1/32` and four workers, so one
address's connections land on several workers; "outside" clients bind to 127.0.0.2 and
127.0.0.3. Delivery is off. Clients: raw dialogues, smtplib and swaks.

    POSTHASTE_BUILD=build unshare -n sh -c 'ip link set lo up && exec /usr/bin/python3 \
        -m pytest -q -p no:cacheprovider tests/integration/test_client_limits.py'
"""
import os
import shutil
import smtplib
import socket
import subprocess
import time

import pytest

import phtest

POSTHASTE = os.path.join(phtest.BUILD_DIR, "mta", "posthaste", "posthaste")
INSIDE, OUTSIDE, OUTSIDE2 = "127.0.0.1", "127.0.0.2", "127.0.0.3"
# the readiness probe's address: its connection is counted too, and released only when
# the daemon has seen it close, so it must not share a count with any test's clients
PROBE = "127.0.0.250"
HOST = "mx.test"
RUN_TIMEOUT = 60.0


class Daemon:
    def __init__(self, tmp_path, extra, v6=False):
        self.port = phtest.free_port()
        self.port6 = phtest.free_port("::1") if v6 else None
        base = tmp_path / ("d%d" % self.port)
        base.mkdir()
        listen6 = "listen = [::1]:%d\n" % self.port6 if v6 else ""
        self.conf = base / "posthaste.conf"
        self.conf.write_text(
            "listen = 0.0.0.0:%d\n%sspool_dir = %s\nmynetworks = 127.0.0.1/32\n"
            "relay_domains = relay.test\nhostname = %s\ndelivery = no\naccounting_log = none\n"
            "workers = 4\n%s"
            % (self.port, listen6, base / "spool", HOST, extra))
        self.err_path = base / "stderr"
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen([POSTHASTE, "--config", str(self.conf)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._err)
        try:
            phtest.wait_connectable(INSIDE, self.port, proc=self.proc, what="posthaste",
                                    source=PROBE).close()
        except AssertionError as e:
            self.kill()
            raise AssertionError("%s\nstderr:\n%s" % (e, self.log()))

    def log(self):
        return self.err_path.read_bytes().decode("utf-8", "replace")

    def open(self, source, greeting="220", host=INSIDE, port=None):
        """A Dialogue from source (bound), after its first reply matched greeting."""
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(phtest.REPLY_TIMEOUT)
        try:
            s.bind((source, 0))
            s.connect((host, port or self.port))
        except BaseException:
            s.close()
            raise
        return phtest.Dialogue(host, port or self.port, sock=s, greeting=greeting,
                               name="from %s" % source)

    def stop(self):
        rc = phtest.stop_process(self.proc, timeout=phtest.STOP_TIMEOUT)
        self._err.close()
        assert rc == 0, "posthaste exited with %s; log:\n%s" % (rc, self.log())

    def kill(self):
        phtest.stop_process(self.proc)
        if not self._err.closed:
            self._err.close()


@pytest.fixture
def daemon(tmp_path):
    """Factory: daemon(extra_config, v6=False) -> a running Daemon, stopped at teardown."""
    if not os.access(POSTHASTE, os.X_OK):
        pytest.skip("posthaste is not built: %s" % POSTHASTE)
    started = []

    def start(extra, v6=False):
        d = Daemon(tmp_path, extra, v6)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


def too_many(addr):
    return "421 4.7.0 %s Error: too many connections from %s" % (HOST, addr)


def refused(d, source, host=INSIDE, port=None):
    """Connects from source and expects the 421 instead of the greeting, then the close."""
    c = d.open(source, greeting="421 4.7.0", host=host, port=port)
    assert c.greeting.raw.decode() == too_many(source) + "\r\n", c.greeting
    c.expect_closed()
    c.close()


def open_when_admitted(d, source, attempts=100):
    """Connects until the greeting is 220 (a closed connection is released at once, but
    asynchronously): bounded."""
    for _ in range(attempts):
        c = d.open(source, greeting=None)
        r = c.read_reply()
        if r.code == 220:
            return c
        assert r.code == 421, r
        c.close()
        time.sleep(0.05)
    raise AssertionError("%s was not admitted again after %d attempts" % (source, attempts))


def quit(c):
    c.cmd("QUIT", "221")
    c.close()


# ---------------------------------------------------------------- concurrency


def test_connection_limit_is_per_address_and_global(daemon):
    d = daemon("client_connection_limit = 3\n")
    # four workers: the three connections spread over them, the count is one
    held = [d.open(OUTSIDE) for _ in range(3)]
    for _ in range(3):
        refused(d, OUTSIDE)
    # another address has its own count; mynetworks is exempt
    other = [d.open(OUTSIDE2) for _ in range(3)]
    refused(d, OUTSIDE2)
    inside = [d.open(INSIDE) for _ in range(12)]
    # the held sessions still work
    held[0].cmd("EHLO client.test", "250")
    held[0].cmd("MAIL FROM:<a@outside.example>", "250")
    # one leaves: one more may come, not two
    quit(held.pop())
    held.append(open_when_admitted(d, OUTSIDE))
    refused(d, OUTSIDE)
    for c in held + other + inside:
        quit(c)
    # everything closed: the address gets its three again
    held = [open_when_admitted(d, OUTSIDE) for _ in range(3)]
    refused(d, OUTSIDE)
    for c in held:
        c.close()  # a drop without QUIT releases its slot too
    held = [open_when_admitted(d, OUTSIDE) for _ in range(3)]
    for c in held:
        quit(c)
    d.stop()
    log = d.log()
    assert "connection from 127.0.0.2 refused: client_connection_limit" in log, log


def test_mynetworks_not_exempt_when_told(daemon):
    d = daemon("client_connection_limit = 2\nclient_limit_exempt_mynetworks = no\n")
    held = [d.open(INSIDE) for _ in range(2)]
    refused(d, INSIDE)
    for c in held:
        quit(c)
    d.stop()


def test_connection_limit_ipv6(daemon):
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback in this namespace")
    d = daemon("client_connection_limit = 2\n", v6=True)
    held = [d.open("::1", host="::1", port=d.port6) for _ in range(2)]
    refused(d, "::1", host="::1", port=d.port6)
    for c in held:
        quit(c)
    d.stop()


def test_no_limit(daemon):
    d = daemon("client_connection_limit = 0\n")
    held = [d.open(OUTSIDE) for _ in range(60)]  # over the default 50
    for c in held:
        quit(c)
    d.stop()


def test_default_limit_is_50(daemon):
    d = daemon("")
    held = [d.open(OUTSIDE) for _ in range(50)]
    refused(d, OUTSIDE)
    for c in held:
        quit(c)
    d.stop()


# ---------------------------------------------------------------- rates


def test_connection_rate(daemon):
    # 3 a minute: a burst of 3, then the 4th is refused (and takes nothing)
    d = daemon("client_connection_limit = 0\nclient_connection_rate = 3/m\n")
    for _ in range(3):
        quit(d.open(OUTSIDE))
    for _ in range(3):
        refused(d, OUTSIDE)
    quit(d.open(OUTSIDE2))  # its own bucket
    for _ in range(5):
        quit(d.open(INSIDE))  # exempt
    d.stop()
    assert "connection from 127.0.0.2 refused: client_connection_rate" in d.log()


def test_connection_rate_refills(daemon):
    # 2 per second: one more every 500 ms
    d = daemon("client_connection_rate = 2/s\n")
    for _ in range(2):
        quit(d.open(OUTSIDE))
    refused(d, OUTSIDE)
    time.sleep(0.6)
    quit(d.open(OUTSIDE))
    d.stop()


def test_message_rate(daemon):
    d = daemon("client_message_rate = 2/m\n")
    c = d.open(OUTSIDE)
    c.cmd("EHLO client.test", "250")
    for _ in range(2):
        c.cmd("MAIL FROM:<a@outside.example>", "250 2.1.0")
        c.cmd("RSET", "250")
    r = c.cmd("MAIL FROM:<a@outside.example>", "450 4.7.1")
    assert r.raw == b"450 4.7.1 Error: too much mail from 127.0.0.2\r\n", r
    # the RCPT pipelined after the refused MAIL: 503, not counted as an error
    c.send(b"MAIL FROM:<a@outside.example>\r\nRCPT TO:<someone@relay.test>\r\nNOOP\r\n")
    c.expect("450 4.7.1")
    c.expect("503 5.5.1")
    c.expect("250")
    # a new connection of the same address shares the bucket (and the other workers do)
    c2 = d.open(OUTSIDE)
    c2.cmd("EHLO client.test", "250")
    c2.cmd("MAIL FROM:<a@outside.example>", "450 4.7.1")
    quit(c2)
    quit(c)
    # smtplib sees the sender refused
    with smtplib.SMTP(INSIDE, d.port, timeout=phtest.REPLY_TIMEOUT,
                      source_address=(OUTSIDE, 0)) as s:
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            s.sendmail("a@outside.example", ["someone@relay.test"], b"Subject: t\r\n\r\nhi\r\n")
        assert e.value.smtp_code == 450
    # another address, and mynetworks, are not limited
    with smtplib.SMTP(INSIDE, d.port, timeout=phtest.REPLY_TIMEOUT,
                      source_address=(OUTSIDE2, 0)) as s:
        s.sendmail("a@outside.example", ["someone@relay.test"], b"Subject: t\r\n\r\nhi\r\n")
    with smtplib.SMTP(INSIDE, d.port, timeout=phtest.REPLY_TIMEOUT) as s:
        for _ in range(5):
            s.sendmail("a@inside.example", ["someone@example.net"],
                       b"Subject: t\r\n\r\nhi\r\n")
    d.stop()
    assert "MAIL from 127.0.0.2 refused: client_message_rate" in d.log()


def test_message_rate_with_swaks(daemon):
    swaks = shutil.which("swaks")
    if not swaks:
        pytest.skip("swaks is not installed")
    d = daemon("client_message_rate = 2/h\n")

    def run():
        return subprocess.run([swaks, "--server", INSIDE, "--port", str(d.port),
                               "--local-interface", OUTSIDE, "--from", "a@outside.example",
                               "--to", "someone@relay.test", "--helo", "client.test"],
                              capture_output=True, timeout=RUN_TIMEOUT)
    for _ in range(2):
        p = run()
        assert p.returncode == 0, p
    p = run()
    assert p.returncode != 0, p
    assert b"450 4.7.1 Error: too much mail from 127.0.0.2" in p.stdout, p.stdout
    d.stop()


def test_check_config_and_errors(daemon, tmp_path):
    if not os.access(POSTHASTE, os.X_OK):
        pytest.skip("posthaste is not built")
    p = subprocess.run([POSTHASTE, "--check-config"], capture_output=True, timeout=RUN_TIMEOUT)
    assert p.returncode == 0, p
    for line in (b"client_connection_limit = 50\n", b"client_connection_rate = unlimited\n",
                 b"client_message_rate = unlimited\n",
                 b"client_limit_exempt_mynetworks = yes\n"):
        assert line in p.stdout, p.stdout
    conf = tmp_path / "c.conf"
    for text, err in (("client_connection_rate = 10\n", b"client_connection_rate: invalid rate"),
                      ("client_connection_limit = -1\n", b"client_connection_limit:"),
                      ("client_message_rate = 5/0s\n", b"client_message_rate:")):
        conf.write_text(text)
        p = subprocess.run([POSTHASTE, "--config", conf, "--check-config"], capture_output=True,
                           timeout=RUN_TIMEOUT)
        assert p.returncode == 1 and err in p.stderr, (text, p)
