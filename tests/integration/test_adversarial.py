"""Hostile and broken clients. After each, a normal smtplib client must still get a
message through, the sink's counts must be exact and its memory bounded."""
import random
import resource
import selectors
import socket
import threading
import time

import phtest
from phtest import MiB, assert_stats

SMALL = b"Subject: t\r\n\r\nhello\r\n"


def check_normal_client(s):
    """A well-behaved smtplib client still works; returns (messages, recipients, bytes)."""
    assert s.alive(), "the sink died (status %s); stderr:\n%s" % (s.proc.returncode, s.stderr_text())
    return phtest.smtplib_send(s.host, s.port, n=2, rcpts=("a@example.com", "b@example.com"))


class Drain(threading.Thread):
    """Reads and parses replies from a Dialogue's socket in the background."""

    def __init__(self, d, want=None, timeout=120.0):
        super().__init__(daemon=True)
        self.d, self.want, self.timeout = d, want, timeout
        self.replies, self.error = [], None

    def run(self):
        deadline = time.monotonic() + self.timeout
        try:
            for _ in range(10 ** 6):
                if self.want is not None and len(self.replies) >= self.want:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    self.error = "timeout after %d replies" % len(self.replies)
                    return
                self.replies.append(self.d.read_reply(timeout=left))
        except phtest.ConnectionClosed:
            self.error = "closed"
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = repr(e)


def send_all(sock, data, chunk=256 * 1024, timeout=60.0):
    """Sends data in chunks; returns the number of octets sent before the peer closed."""
    sock.settimeout(timeout)
    sent = 0
    for off in range(0, len(data), chunk):
        try:
            sock.sendall(data[off: off + chunk])
        except (BrokenPipeError, ConnectionResetError):
            return sent
        sent += len(data[off: off + chunk])
    return sent


# ------------------------------------------------------------------ oversized input


def test_10mb_without_line_end_in_command_mode(sink, dialogue):
    s = sink()
    d = dialogue(s)
    d.cmd("EHLO big.example", "250")
    with phtest.RssSampler(s.pid) as rss:
        blob = b"A" * (10 * MiB)
        n = send_all(d.sock, blob)
        assert n == len(blob), "server closed the connection after %d octets of a long line\n%s" % (n, d.dump())
        d.send(b"\r\n")
        d.expect("500 5.5.2", timeout=60)
        d.no_reply(1.0)
        d.cmd("NOOP", "250")
        d.run([("MAIL FROM:<a@example.com>", "250"), ("RCPT TO:<b@example.com>", "250"), ("DATA", "354"),
               (SMALL + b".\r\n", "250"), ("QUIT", "221")])
    assert rss.max_kb < phtest.rss_limit_kb(200), "sink RSS peaked at %d KiB reading a 10 MB line" % rss.max_kb
    m, r, b = check_normal_client(s)
    st = s.stop()
    assert_stats(st, messages=m + 1, recipients=r + 1, bytes=b + len(SMALL), connections=s.conns(2))


def test_10mb_line_in_data_is_rejected(sink, dialogue):
    s = sink()
    d = dialogue(s)
    d.run([("EHLO big.example", "250"), ("MAIL FROM:<a@example.com>", "250"), ("RCPT TO:<b@example.com>", "250"),
           ("DATA", "354")])
    with phtest.RssSampler(s.pid) as rss:
        n = send_all(d.sock, b"Subject: long\r\n\r\n" + b"B" * (10 * MiB))
        assert n > 0
        d.send(b"\r\n.\r\n")
        d.expect("552|554 5.6|5.3", timeout=60)
        d.cmd("NOOP", "250")
    assert rss.max_kb < phtest.rss_limit_kb(200), "sink RSS peaked at %d KiB" % rss.max_kb
    m, r, b = check_normal_client(s)
    st = s.stop()
    assert_stats(st, messages=m, recipients=r, bytes=b)


def test_message_over_default_64mib_limit(sink, dialogue):
    s = sink()
    d = dialogue(s)
    d.run([("EHLO big.example", "250"), ("MAIL FROM:<a@example.com>", "250"), ("RCPT TO:<b@example.com>", "250"),
           ("DATA", "354")])
    line = b"x" * 998 + b"\r\n"   # 1000 octets: legal lines
    with phtest.RssSampler(s.pid) as rss:
        n = send_all(d.sock, line * 67200, timeout=120)   # 67,200,000 octets > 64 MiB
        assert n > 0
        d.send(b".\r\n")
        d.expect("552 5.3.4", timeout=120)
    assert rss.max_kb < phtest.rss_limit_kb(200), "sink RSS peaked at %d KiB for a discarded 64 MiB message" % rss.max_kb
    d.cmd("NOOP", "250")
    m, r, b = check_normal_client(s)
    st = s.stop()
    assert_stats(st, messages=m, recipients=r, bytes=b)


def test_10mb_random_garbage(sink, dialogue):
    s = sink()
    d = dialogue(s)
    drain = Drain(d, timeout=120)
    drain.start()
    garbage = random.Random(20231218).randbytes(10 * MiB)
    with phtest.RssSampler(s.pid) as rss:
        send_all(d.sock, garbage)
        try:
            d.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        drain.join(120)
    assert not drain.is_alive(), "the server neither answered nor closed within 120 s"
    odd = [r for r in drain.replies if r.code // 100 not in (4, 5)]
    assert not odd, "garbage got non-error replies: %r" % odd[:5]
    assert rss.max_kb < phtest.rss_limit_kb(200), "sink RSS peaked at %d KiB" % rss.max_kb
    d.abort()
    m, r, b = check_normal_client(s)
    st = s.stop()
    assert_stats(st, messages=m, recipients=r, bytes=b)


# ------------------------------------------------------------------ many recipients


def test_10000_pipelined_rcpts(sink, dialogue):
    s = sink()
    d = dialogue(s)
    d.cmd("EHLO many.example", "250")
    n = 10000
    drain = Drain(d, want=n + 2, timeout=120)
    drain.start()
    d.send(b"MAIL FROM:<a@example.com>\r\n" + b"".join(b"RCPT TO:<r%05d@example.com>\r\n" % i for i in range(n))
           + b"DATA\r\n")
    drain.join(130)
    got = drain.replies
    assert len(got) == n + 2, "got %d of %d replies (%s)\n%s" % (len(got), n + 2, drain.error, d.dump())
    assert got[0].code == 250, got[0]
    acc = [r for r in got[1:1001] if not phtest.reply_matches(r, "250")]
    assert not acc, "the first 1000 RCPTs must be accepted; e.g. %r" % acc[:3]
    rej = [r for r in got[1001:n + 1] if not phtest.reply_matches(r, "452 4.5.3")]
    assert not rej, "RCPTs over 1000 must get 452 4.5.3; %d did not, e.g. %r" % (len(rej), rej[:3])
    assert got[n + 1].code == 354, got[n + 1]
    d.send(SMALL + b".\r\n")
    d.expect("250", timeout=60)
    d.cmd("QUIT", "221")
    m, r, b = check_normal_client(s)
    st = s.stop()
    assert_stats(st, messages=m + 1, recipients=r + 1000, bytes=b + len(SMALL), connections=s.conns(2))


# ------------------------------------------------------------------ many connections


def _raise_nofile(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def test_1000_idle_connections(sink):
    n = 1000
    limit = _raise_nofile(4096)
    assert limit >= n + 100, "RLIMIT_NOFILE %d too low for %d connections" % (limit, n)
    s = sink("--timeout", "600")   # started after the raise: inherits the limit
    socks = []
    try:
        for i in range(n):
            socks.append(phtest.connect(s.host, s.port, timeout=30))
        sel = selectors.DefaultSelector()
        bufs = {}
        for c in socks:
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ)
            bufs[c] = b""
        greeted = 0
        deadline = time.monotonic() + 90
        while greeted < n and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1.0):
                c = key.fileobj
                try:
                    data = c.recv(4096)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(c)
                    bufs[c] += b"<EOF>"
                    continue
                bufs[c] += data
                if bufs[c].endswith(b"\r\n"):
                    sel.unregister(c)
                    greeted += 1
        sel.close()
        bad = [b for b in bufs.values() if not b.startswith(b"220 ")]
        assert not bad, "%d of %d idle connections did not get a 220 greeting, e.g. %r" % (len(bad), n, bad[:3])
        m, r, b = check_normal_client(s)
    finally:
        for c in socks:
            c.close()
    st = s.stop()
    assert_stats(st, messages=m, recipients=r, bytes=b, connections=s.conns(n + 1))


def test_client_that_never_reads(sink):
    """50,000+ pipelined NOOPs (up to 64 MB) from a client that never reads: the sink must
    stop reading (back-pressure) rather than buffer replies without bound, and keep serving."""
    s = sink()
    c = phtest.connect(s.host, s.port, timeout=30)
    c.recv(4096)  # greeting; never read again
    chunk = b"NOOP\r\n" * 50000  # 300 KB, 50,000 NOOPs
    sent = 0
    base = s.rss_kb()
    with phtest.RssSampler(s.pid) as rss:
        c.setblocking(False)
        deadline = time.monotonic() + 45
        stalled_since = None
        view = memoryview(chunk)
        off = 0
        while sent < 64 * MiB and time.monotonic() < deadline:
            try:
                k = c.send(view[off:])
            except BlockingIOError:
                k = 0
            except (BrokenPipeError, ConnectionResetError):
                break
            if k:
                sent += k
                off = (off + k) % len(chunk)
                stalled_since = None
                continue
            now = time.monotonic()
            if stalled_since is None:
                stalled_since = now
            elif now - stalled_since > 3.0:
                break  # the server stopped reading: back-pressure works
            time.sleep(0.01)
        assert sent >= 300000, "could not even send 50,000 NOOPs (%d octets)" % sent
        m, r, b = check_normal_client(s)
    try:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    finally:
        c.close()
    grown = rss.max_kb - base
    assert rss.max_kb < phtest.rss_limit_kb(200) and grown < phtest.rss_limit_kb(100), (
        "sink RSS peaked at %d KiB (+%d KiB) after %d octets of NOOPs from a non-reading client"
        % (rss.max_kb, grown, sent))
    st = s.stop()
    assert_stats(st, messages=m, recipients=r, bytes=b, connections=s.conns(2))


def test_2000_rapid_connect_disconnect(sink):
    s = sink()
    n = 2000
    for i in range(n):
        c = phtest.connect(s.host, s.port, timeout=30)
        c.close()
    phtest.wait_accept_queue_empty(s.port)
    # and some that reset at once
    for i in range(200):
        c = phtest.connect(s.host, s.port, timeout=30)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.close()
    phtest.wait_accept_queue_empty(s.port)
    m, r, b = check_normal_client(s)
    st = s.stop()
    assert_stats(st, messages=m, recipients=r, bytes=b)
    assert s.conns(n + 1) <= st["connections"] <= s.conns(n + 201), st


# ------------------------------------------------------------------ half-closed and slow


def test_half_close_mid_data_is_not_counted(sink, dialogue):
    s = sink()
    d = dialogue(s)
    d.run([("EHLO half.example", "250"), ("MAIL FROM:<a@example.com>", "250"), ("RCPT TO:<b@example.com>", "250"),
           ("DATA", "354"), (b"Subject: half\r\n\r\nthis message never ends\r\n", None)])
    d.sock.shutdown(socket.SHUT_WR)
    d.expect_closed(20, allowed="4xx|5xx")
    d2 = dialogue(s)
    d2.run([("EHLO half.example", "250"), ("MAIL FROM:<a@example.com>", "250"), ("RCPT TO:<b@example.com>", "250"),
            (b"BDAT 100 LAST\r\nonly part of the chunk", None)])
    d2.sock.shutdown(socket.SHUT_WR)
    d2.expect_closed(20, allowed="4xx|5xx")
    m, r, b = check_normal_client(s)
    st = s.stop()
    assert_stats(st, messages=m, recipients=r, bytes=b, connections=s.conns(3))


def test_half_close_after_complete_pipeline_is_answered(sink, dialogue):
    s = sink()
    d = dialogue(s)
    d.send(b"EHLO half.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    d.run([(None, ["250", "250", "250", "354"])])
    d.send(SMALL + b".\r\nQUIT\r\n")
    d.sock.shutdown(socket.SHUT_WR)
    d.run([(None, ["250", "221"]), (None, phtest.CLOSED)])
    st = s.stop()
    assert_stats(st, messages=1, recipients=1, bytes=len(SMALL), connections=s.conns(1))


def test_one_byte_at_a_time(sink, dialogue):
    s = sink()
    d = dialogue(s)
    wire = b"Subject: slow\r\n\r\n..dot\r\nline\r\n"
    script = (b"EHLO slow.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    drain = Drain(d, want=4, timeout=60)
    drain.start()
    for i in range(len(script)):
        d.sock.sendall(script[i:i + 1])
        time.sleep(0.002)
    drain.join(60)
    assert [r.code for r in drain.replies] == [250, 250, 250, 354], (drain.replies, drain.error)
    tail = wire + b".\r\nQUIT\r\n"
    drain = Drain(d, want=2, timeout=60)
    drain.start()
    for i in range(len(tail)):
        d.sock.sendall(tail[i:i + 1])
        time.sleep(0.002)
    drain.join(60)
    assert [r.code for r in drain.replies] == [250, 221], (drain.replies, drain.error)
    st = s.stop()
    assert_stats(st, messages=1, recipients=1, bytes=len(phtest.dot_unstuff(wire)), connections=s.conns(1))


def test_many_idle_connections_all_time_out(sink):
    """--timeout 2: 200 silent clients each get 421 4.4.2 and are closed."""
    s = sink("--timeout", "2")
    n = 200
    socks = [phtest.connect(s.host, s.port, timeout=30) for _ in range(n)]
    try:
        sel = selectors.DefaultSelector()
        bufs = {}
        for c in socks:
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ)
            bufs[c] = b""
        open_ = n
        deadline = time.monotonic() + 60
        while open_ and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1.0):
                c = key.fileobj
                try:
                    data = c.recv(4096)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                if not data:
                    sel.unregister(c)
                    open_ -= 1
                    continue
                bufs[c] += data
        sel.close()
        assert open_ == 0, "%d of %d idle connections still open 60 s after a 2 s timeout" % (open_, n)
        bad = [b for b in bufs.values() if not (b.startswith(b"220 ") and b"\r\n421 4.4.2" in b)]
        assert not bad, "%d connections closed without 220 then 421 4.4.2, e.g. %r" % (len(bad), bad[:3])
    finally:
        for c in socks:
            c.close()
    m, r, b = check_normal_client(s)
    st = s.stop()
    assert_stats(st, messages=m, recipients=r, bytes=b, connections=s.conns(n + 1))


def test_timeout_inside_bdat_chunk(sink, dialogue):
    s = sink("--timeout", "2")
    d = dialogue(s)
    d.run([("EHLO slow.example", "250"), ("MAIL FROM:<a@example.com>", "250"), ("RCPT TO:<b@example.com>", "250"),
           (b"BDAT 1000 LAST\r\nonly a few octets", None)])
    r = d.read_reply(timeout=20)
    assert phtest.reply_matches(r, "421 4.4.2"), "%r\n%s" % (r, d.dump())
    d.expect_closed(10)
    st = s.stop()
    assert_stats(st, messages=0, recipients=0, bytes=0, connections=s.conns(1))


def test_connection_table_full_gets_421_not_silence(sink):
    """Over the per-worker connection limit a client is told 421 4.3.2, never closed silently;
    a slot freed by a closing client is usable again."""
    s = sink("--workers", "1", "--max-connections", "5")
    held = []
    try:
        for _ in range(5):
            c = phtest.connect(s.host, s.port, timeout=30)
            c.settimeout(30)
            assert c.recv(4096).startswith(b"220 ")
            held.append(c)
        extra = phtest.connect(s.host, s.port, timeout=30)
        extra.settimeout(30)
        got = b""
        for _ in range(100):
            data = extra.recv(4096)
            if not data:
                break
            got += data
        extra.close()
        assert got.startswith(b"421 4.3.2"), "refused connection got %r" % got
        held.pop().close()
        deadline = time.monotonic() + 10
        greeted = False
        while time.monotonic() < deadline and not greeted:
            c = phtest.connect(s.host, s.port, timeout=30)
            c.settimeout(30)
            greeted = c.recv(4096).startswith(b"220 ")
            c.close()
            if not greeted:
                time.sleep(0.1)
        assert greeted, "no connection accepted after a slot was freed"
        for c in held:
            c.close()
        held.clear()
        # the server frees slots when it sees the closes: wait until it has, so the
        # normal client below is not refused for a table still full of closed peers
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            c = phtest.connect(s.host, s.port, timeout=30)
            c.settimeout(30)
            ok = c.recv(4096).startswith(b"220 ")
            c.close()
            if ok:
                break
            time.sleep(0.1)
        time.sleep(0.2)
        m, r, b = check_normal_client(s)
    finally:
        for c in held:
            c.close()
    st = s.stop()
    assert st["messages"] == m and st["recipients"] == r and st["bytes"] == b
