"""Helpers for the posthaste-bench integration tests (standard library only).

- Sink: one `posthaste-bench sink` process; stop() sends SIGTERM and returns the
  parsed JSON stats line.
- Dialogue: a raw-socket SMTP client that sends exact bytes and reads full
  (multi-line) replies with deadlines, keeping a transcript for failure messages.
- Reply specs: "250", "503 5.5.1", "503|554", "5xx", "552|554 5.3|5.6"
  (codes separated by |, x = any digit; optional enhanced-code prefixes).
"""
import json
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time

BUILD_DIR = os.environ.get("POSTHASTE_BUILD", "/work/main/build")
BENCH = os.path.join(BUILD_DIR, "bench", "posthaste-bench")

CRLF = b"\r\n"
SINK_KEYS = ("messages", "recipients", "bytes", "connections", "injected_failures", "injected_delays")
SEND_KEYS = ("sent", "accepted", "rejected_temp", "rejected_perm", "recipients_accepted",
             "recipients_rejected", "connections", "connect_errors", "bytes", "elapsed_s",
             "msgs_per_s", "latency_ms")
LATENCY_KEYS = ("p50", "p90", "p99", "p999", "max")

# Generous limits for a loaded 2-core machine.
READY_TIMEOUT = 20.0
REPLY_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0

MiB = 1024 * 1024

_sanitized = {}


def is_sanitized(path=None):
    """True when the binary is built with AddressSanitizer (its RSS is inflated by
    shadow memory and the quarantine, so memory bounds are scaled)."""
    path = path or BENCH
    if path not in _sanitized:
        found = False
        try:
            with open(path, "rb") as f:
                tail = b""
                for _ in range(100000):
                    blk = f.read(1 << 20)
                    if not blk:
                        break
                    if b"__asan_init" in tail + blk:
                        found = True
                        break
                    tail = blk[-16:]
        except OSError:
            pass
        _sanitized[path] = found
    return _sanitized[path]


def rss_limit_kb(mb=200):
    """A memory bound of `mb` MiB, times 5 for sanitizer builds."""
    return mb * 1024 * (5 if is_sanitized() else 1)


# --------------------------------------------------------------------------- ports


def _ephemeral_low():
    """The lowest port the kernel hands out for bind(0) and connect() here (the range
    is per network namespace)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORT_FLOOR = 10000
_handed_out = set()


def _bindable(host, port, udp):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)
    socks = []
    try:
        for kind in kinds:
            s = socket.socket(fam, kind)
            socks.append(s)
            s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def free_port(host="127.0.0.1", udp=False):
    """A port that was free a moment ago (for UDP too when udp), for a server the
    test starts next.

    It is chosen below the kernel's ephemeral range: a port taken from that range
    (bind 0) can be handed out again, in the moment before the server binds it, as
    the local port of any client socket the test opens meanwhile (a readiness probe,
    a client bound to a source address), and the server then fails with EADDRINUSE.
    Ports are not handed out twice in one process."""
    low = _ephemeral_low()
    if low - _PORT_FLOOR >= 1000:
        for _ in range(1000):
            port = random.randrange(_PORT_FLOOR, low)
            if port not in _handed_out and _bindable(host, port, udp):
                _handed_out.add(port)
                return port
    # A range that leaves no room below it: fall back to the kernel's choice.
    for _ in range(200):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _handed_out and _bindable(host, port, udp):
            _handed_out.add(port)
            return port
    raise AssertionError("no free port on %s" % host)


def hostport(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def connect(host, port, timeout=10.0, source=None):
    """A connected socket; from the address source (bound first) when given."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        if source is not None:
            s.bind((source, 0))
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


def wait_connectable(host, port, timeout=READY_TIMEOUT, proc=None, what="server", source=None):
    """Polls connect() (from source, when given) until it succeeds; returns the
    connected socket. Fails early if proc exits."""
    deadline = time.monotonic() + timeout
    last = None
    for _ in range(100000):
        if proc is not None and proc.poll() is not None:
            raise AssertionError("%s exited with status %s before listening on %s"
                                 % (what, proc.returncode, hostport(host, port)))
        try:
            return connect(host, port, timeout=2.0, source=source)
        except OSError as e:
            last = e
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError("%s not accepting on %s within %.0f s (last error: %r)"
                         % (what, hostport(host, port), timeout, last))


def _proc_net_tcp_rows():
    rows = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            p = ln.split()
            if len(p) < 5:
                continue
            rows.append(p)
    return rows


def accept_queue_len(port):
    """Connections waiting in the accept queue of the listening socket(s) on port
    (the rx_queue of LISTEN sockets in /proc/net/tcp*)."""
    total = 0
    for p in _proc_net_tcp_rows():
        lport = int(p[1].rsplit(":", 1)[1], 16)
        if lport == port and p[3] == "0A":
            total += int(p[4].split(":")[1], 16)
    return total


def wait_accept_queue_empty(port, timeout=30.0):
    deadline = time.monotonic() + timeout
    for _ in range(100000):
        n = accept_queue_len(port)
        if n == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError("%d connections still not accepted on port %d after %.0f s"
                                 % (n, port, timeout))
        time.sleep(0.05)


# --------------------------------------------------------------------------- /proc


def _children_map():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                st = f.read()
        except OSError:
            continue
        ppid = int(st.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def process_tree(pid):
    kids = _children_map()
    out, todo = [], [pid]
    for _ in range(10000):
        if not todo:
            break
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def rss_kb(pid):
    """VmRSS of pid and all its descendants, in KiB (0 for vanished processes)."""
    total = 0
    for p in process_tree(pid):
        try:
            with open("/proc/%d/status" % p) as f:
                for ln in f:
                    if ln.startswith("VmRSS:"):
                        total += int(ln.split()[1])
                        break
        except OSError:
            pass
    return total


class RssSampler:
    """Samples rss_kb(pid) every `interval` s in a thread; .max_kb is the peak."""

    def __init__(self, pid, interval=0.05):
        self.pid = pid
        self.interval = interval
        self.max_kb = rss_kb(pid)
        self.start_kb = self.max_kb
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.max_kb = max(self.max_kb, rss_kb(self.pid))

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(5)
        self.max_kb = max(self.max_kb, rss_kb(self.pid))
        return False


# --------------------------------------------------------------------------- processes


def read_greeting(s, timeout=10.0):
    """Reads the server's first reply line(s) from a fresh connection (bounded)."""
    s.settimeout(timeout)
    buf = b""
    for _ in range(100):
        d = s.recv(4096)
        if not d:
            break
        buf += d
        if buf.endswith(b"\n"):
            break
    return buf


def stop_process(proc, sig=signal.SIGTERM, timeout=10.0):
    """terminate (by PID), wait with a timeout, then kill."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return proc.wait(10)


class Processes:
    """Spawns helper processes and kills leftovers at teardown."""

    def __init__(self, tmpdir):
        self.tmpdir = str(tmpdir)
        self.procs = []
        self.n = 0

    def spawn(self, cmd, **kw):
        p = subprocess.Popen(cmd, **kw)
        self.procs.append(p)
        return p

    def run(self, cmd, timeout=120.0, input_bytes=None):
        """Runs cmd to completion (killed after timeout). Returns (rc, stdout, stderr) as text."""
        self.n += 1
        out_path = os.path.join(self.tmpdir, "run%d.out" % self.n)
        err_path = os.path.join(self.tmpdir, "run%d.err" % self.n)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            p = self.spawn(cmd, stdout=out, stderr=err,
                           stdin=subprocess.PIPE if input_bytes is not None else subprocess.DEVNULL)
            try:
                if input_bytes is not None:
                    p.communicate(input_bytes, timeout=timeout)
                else:
                    p.wait(timeout)
            except subprocess.TimeoutExpired:
                stop_process(p, signal.SIGKILL)
                raise AssertionError("%s did not finish within %.0f s" % (" ".join(cmd), timeout))
        with open(out_path, "rb") as f:
            o = f.read().decode("utf-8", "replace")
        with open(err_path, "rb") as f:
            e = f.read().decode("utf-8", "replace")
        return p.returncode, o, e

    def cleanup(self):
        for p in self.procs:
            stop_process(p, signal.SIGTERM, 5.0)


class Sink:
    """A running `posthaste-bench sink`. The readiness probe is one full TCP
    connection (connect, read greeting, QUIT), counted in .probes."""

    def __init__(self, bench, args, tmpdir, host="127.0.0.1", ready=True, port=None):
        self.host = host
        self.port = port or free_port(host)
        self.addr = hostport(host, self.port)
        self.args = list(args)
        self.cmd = [bench, "sink", "--listen", self.addr] + self.args
        self.tmpdir = str(tmpdir)
        tag = "sink-%s-%d" % (host.replace(":", "_"), self.port)
        for n in range(2, 10000):  # the same address again (a restarted sink): new files
            if not os.path.exists(os.path.join(self.tmpdir, tag + ".out")):
                break
            tag = "sink-%s-%d-%d" % (host.replace(":", "_"), self.port, n)
        self.out_path = os.path.join(self.tmpdir, tag + ".out")
        self.err_path = os.path.join(self.tmpdir, tag + ".err")
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self.probes = 0
        self.stats = None
        self.returncode = None
        if ready:
            self.wait_ready()

    def wait_ready(self):
        s = wait_connectable(self.host, self.port, proc=self.proc,
                             what="posthaste-bench sink (%s)" % " ".join(self.cmd))
        self.probes += 1
        try:
            buf = read_greeting(s)
            if buf.startswith(b"220"):
                s.sendall(b"QUIT\r\n")
                s.recv(4096)
        except OSError:
            pass
        finally:
            s.close()

    def conns(self, n):
        """Expected `connections` for n test connections plus the probe(s)."""
        return n + self.probes

    def alive(self):
        return self.proc.poll() is None

    def rss_kb(self):
        return rss_kb(self.pid)

    def stderr_text(self, limit=4000):
        try:
            with open(self.err_path, "rb") as f:
                return f.read()[-limit:].decode("utf-8", "replace")
        except OSError:
            return ""

    def send_signal(self, sig=signal.SIGTERM):
        os.kill(self.pid, sig)

    def stop(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT):
        """Signals the sink, waits for it to exit, parses the JSON stats line."""
        if self.stats is not None:
            return self.stats
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc, signal.SIGKILL)
            raise AssertionError("sink (pid %d) did not exit within %.0f s of signal %d; stderr:\n%s"
                                 % (self.pid, timeout, sig, self.stderr_text()))
        self._out.close()
        self._err.close()
        # a clean stop exits 0 (a sanitizer report at exit, e.g. a leak, shows up here)
        assert self.returncode == 0, ("sink exited with status %s after signal %d; stderr:\n%s"
                                      % (self.returncode, sig, self.stderr_text()))
        with open(self.out_path, "rb") as f:
            out = f.read().decode("utf-8", "replace")
        lines = [ln for ln in out.splitlines() if ln.strip()]
        assert len(lines) == 1, ("sink must print exactly one JSON line on stdout at exit, got %d:\n%s\n"
                                 "exit status %s; stderr:\n%s"
                                 % (len(lines), out[-2000:], self.returncode, self.stderr_text()))
        try:
            st = json.loads(lines[0])
        except ValueError as e:
            raise AssertionError("sink stats line is not JSON (%s): %r" % (e, lines[0]))
        missing = [k for k in SINK_KEYS if k not in st]
        assert not missing, "sink stats lack %s: %r" % (missing, st)
        for k in SINK_KEYS:
            assert isinstance(st[k], int) and st[k] >= 0, "sink stat %s is not a count: %r" % (k, st)
        self.stats = st
        return st

    def kill(self):
        stop_process(self.proc, signal.SIGTERM, 5.0)
        for f in (self._out, self._err):
            try:
                f.close()
            except OSError:
                pass


def assert_stats(st, **want):
    bad = {k: (v, st.get(k)) for k, v in want.items() if st.get(k) != v}
    assert not bad, "sink stats differ (key: (expected, got)): %r\nfull stats: %r" % (bad, st)


def parse_send_json(rc, out, err):
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines, "posthaste-bench send printed nothing on stdout (exit %s); stderr:\n%s" % (rc, err[-3000:])
    try:
        js = json.loads(lines[-1])
    except ValueError as e:
        raise AssertionError("send --json output is not JSON (%s): %r; stderr:\n%s" % (e, lines[-1], err[-2000:]))
    missing = [k for k in SEND_KEYS if k not in js]
    assert not missing, "send --json lacks %s: %r" % (missing, js)
    lat = js["latency_ms"]
    assert isinstance(lat, dict) and all(k in lat for k in LATENCY_KEYS), "bad latency_ms: %r" % (lat,)
    return js


# --------------------------------------------------------------------------- reply specs

_ENH_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


def parse_spec(spec):
    parts = spec.split(None, 1)
    codes = parts[0].split("|")
    enh = parts[1].split("|") if len(parts) > 1 else None
    return codes, enh


def _code_ok(code, pat):
    c = "%03d" % code
    return len(pat) == 3 and all(p in ("x", "X") or p == d for p, d in zip(pat, c))


def _enh_ok(enh, prefix):
    if enh is None:
        return False
    want = prefix.split(".")
    return list(enh[: len(want)]) == want


def reply_matches(reply, spec):
    codes, enhs = parse_spec(spec)
    if not any(_code_ok(reply.code, c) for c in codes):
        return False
    if enhs is not None and not any(_enh_ok(reply.enhanced, e) for e in enhs):
        return False
    return True


# --------------------------------------------------------------------------- dialogue


class Reply:
    def __init__(self, code, lines, raw):
        self.code = code
        self.lines = lines  # text after "NNN-" / "NNN " of each line
        self.raw = raw

    @property
    def text(self):
        return self.lines[0] if self.lines else ""

    @property
    def enhanced(self):
        m = _ENH_RE.match(self.text)
        return (m.group(1), m.group(2), m.group(3)) if m else None

    @property
    def keywords(self):
        """EHLO: the upper-cased first word of each line after the first."""
        return [ln.split()[0].upper() for ln in self.lines[1:] if ln.split()]

    def __repr__(self):
        return "<Reply %s>" % " / ".join("%d %s" % (self.code, ln) for ln in self.lines)


class DialogueError(AssertionError):
    pass


class ConnectionClosed(DialogueError):
    pass


class ReplyTimeout(DialogueError):
    pass


NOREPLY = "<no reply expected>"
CLOSED = "<connection closed>"


def _show(data, limit=300):
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if len(data) > limit:
        return "%r ... (%d bytes)" % (data[:limit], len(data))
    return repr(data)


class Dialogue:
    """A raw SMTP client over one TCP connection.

    send(str) sends the line plus CRLF; send(bytes) sends the bytes as they are.
    """

    MAX_LINE = 64 * 1024

    def __init__(self, host, port, timeout=REPLY_TIMEOUT, greeting="220", sock=None, name="client"):
        self.host, self.port = host, port
        self.timeout = timeout
        self.name = name
        self.sock = sock or connect(host, port, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.transcript = []
        self.eof = False
        self.greeting = None
        if greeting is not None:
            self.greeting = self.expect(greeting)

    # -- transcript
    def _log(self, who, what):
        self.transcript.append("%s %s" % (who, what))
        if len(self.transcript) > 400:
            del self.transcript[:100]
            self.transcript.insert(0, "... (earlier lines dropped)")

    def dump(self):
        return "dialogue with %s:%d (%s):\n  " % (self.host, self.port, self.name) + "\n  ".join(self.transcript[-80:])

    def fail(self, msg):
        raise DialogueError("%s\n%s" % (msg, self.dump()))

    # -- output
    def send(self, data):
        if isinstance(data, str):
            data = data.encode("utf-8") + CRLF
        self._log("C:", _show(data))
        try:
            self.sock.sendall(data)
        except OSError as e:
            self._log("!!", "send failed: %r" % e)
            raise ConnectionClosed("send failed: %r\n%s" % (e, self.dump()))

    # -- input
    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout()
        self.sock.settimeout(remaining)
        try:
            d = self.sock.recv(262144)
        except ConnectionResetError:
            d = b""
            self._log("!!", "connection reset by server")
        if not d:
            self.eof = True
            return False
        self.buf += d
        return True

    def _line(self, deadline):
        for _ in range(10 ** 7):
            i = self.buf.find(b"\n")
            if i >= 0:
                ln = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return ln
            if len(self.buf) > self.MAX_LINE:
                self.fail("server sent a line over %d octets: %s" % (self.MAX_LINE, _show(bytes(self.buf))))
            if self.eof:
                return None
            try:
                if not self._fill(deadline):
                    if not self.buf:
                        return None
            except socket.timeout:
                raise ReplyTimeout("no complete reply within the time limit; partial %s\n%s"
                                   % (_show(bytes(self.buf)), self.dump()))
        self.fail("line loop bound reached")

    def read_reply(self, timeout=None):
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        lines, raw, code = [], b"", None
        for _ in range(10000):
            ln = self._line(deadline)
            if ln is None:
                if raw:
                    self._log("S:", _show(raw) + " [then EOF mid-reply]")
                self._log("!!", "EOF")
                raise ConnectionClosed("connection closed by the server while waiting for a reply\n%s" % self.dump())
            raw += ln
            if not ln.endswith(b"\r\n"):
                self.fail("reply line not terminated by CRLF: %s" % _show(ln))
            m = re.match(rb"^(\d{3})([ -]|\r\n)", ln)
            if not m:
                self.fail("malformed reply line: %s" % _show(ln))
            c = int(m.group(1))
            if code is not None and c != code:
                self.fail("multi-line reply changes code %d -> %d: %s" % (code, c, _show(raw)))
            code = c
            lines.append(ln[4:-2].decode("utf-8", "replace") if len(ln) > 5 else "")
            if m.group(2) != b"-":
                break
        r = Reply(code, lines, raw)
        for ln in raw.split(b"\r\n")[:-1]:
            self._log("S:", ln.decode("utf-8", "replace"))
        return r

    def expect(self, spec, timeout=None):
        r = self.read_reply(timeout)
        if not reply_matches(r, spec):
            self.fail("expected a reply matching %r, got %r" % (spec, r))
        return r

    def cmd(self, line, spec=None, timeout=None):
        self.send(line)
        return self.expect(spec, timeout) if spec else self.read_reply(timeout)

    def no_reply(self, wait=1.0):
        """Asserts that nothing arrives within `wait` seconds."""
        if self.buf:
            self.fail("unexpected bytes from server: %s" % _show(bytes(self.buf)))
        try:
            got = self._fill(time.monotonic() + wait)
        except socket.timeout:
            return
        if got:
            self.fail("expected no reply yet, got %s" % _show(bytes(self.buf)))
        self.fail("expected no reply yet, but the server closed the connection")

    def expect_closed(self, timeout=15.0, allowed="xxx"):
        """Reads until EOF (or reset); every reply before it must match `allowed`.
        Returns those replies."""
        deadline = time.monotonic() + timeout
        got = []
        for _ in range(100000):
            try:
                r = self.read_reply(max(0.01, deadline - time.monotonic()))
            except ConnectionClosed:
                return got
            except ReplyTimeout:
                self.fail("server did not close the connection within %.0f s" % timeout)
            if not reply_matches(r, allowed):
                self.fail("while waiting for close: unexpected reply %r (allowed %r)" % (r, allowed))
            got.append(r)
        self.fail("too many replies while waiting for close")

    def run(self, steps):
        """Runs (send, expect) steps; expect is a spec, a list of specs
        (pipelined replies in order), None (read nothing), NOREPLY or CLOSED."""
        out = []
        for send, exp in steps:
            if send is not None:
                self.send(send)
            if exp is None:
                continue
            if exp is NOREPLY:
                self.no_reply(1.0)
            elif exp is CLOSED:
                self.expect_closed(15.0)
            elif isinstance(exp, (list, tuple)):
                out.extend(self.expect(s) for s in exp)
            else:
                out.append(self.expect(exp))
        return out

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self):
        """Close with RST (SO_LINGER 0): never blocks on unsent data."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        self.close()


# --------------------------------------------------------------------------- smtplib helpers


def smtplib_body(msg):
    """The body octets a server receives from smtplib's sendmail(msg):
    str: lone CR/LF -> CRLF; CRLF appended when missing. (Dot-stuffing is undone by the server.)"""
    if isinstance(msg, str):
        b = re.sub(r"(?:\r\n|\n|\r(?!\n))", "\r\n", msg).encode("ascii")
    else:
        b = bytes(msg)
    if not b.endswith(CRLF):
        b += CRLF
    return b


def smtplib_send(host, port, n=1, rcpts=("rcpt@example.com",), timeout=60.0):
    """Sends n small messages in one smtplib session; returns (messages, recipients, bytes)."""
    import smtplib
    total = 0
    with smtplib.SMTP(host, port, timeout=timeout) as s:
        s.ehlo("check.example")
        for i in range(n):
            msg = "Subject: check %d\r\nFrom: <probe@example.com>\r\n\r\nstill alive %d\r\n.dot line\r\n" % (i, i)
            refused = s.sendmail("probe@example.com", list(rcpts), msg)
            assert refused == {}, "recipients refused: %r" % (refused,)
            total += len(smtplib_body(msg))
    return n, n * len(rcpts), total


def dot_unstuff(wire):
    """The body a server stores for DATA `wire` (without the final '.CRLF')."""
    out = []
    for ln in wire.split(b"\r\n"):
        out.append(ln[1:] if ln.startswith(b".") else ln)
    return b"\r\n".join(out)
