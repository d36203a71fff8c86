"""A private DNS server for the integration tests: dnsmasq on 127.0.0.1 and a free
port, answering only from the records given on its command line (standard library only).

    dns = Dnsmasq(tmpdir, mx=[("a.test", "mx1.a.test", 10)],
                  hosts=[("mx1.a.test", "127.0.1.1")], null_mx=["n.test"])
    ... posthaste --resolver dns.server ...
    dns.stop()

- Never forwards anything (--no-resolv --no-hosts, -C /dev/null): names under the
  `local` zones (default: .test) that have no record answer NXDOMAIN, so the daemon
  under test can never reach the system's resolver through it.
- Runs with --keep-in-foreground (not --no-daemon: in debug mode dnsmasq serves TCP in
  its main process and stops answering UDP while a client keeps a TCP connection open,
  which c-ares does).
- query(name, qtype) is a tiny UDP client: (rcode, [(type, rdata bytes)]), for
  readiness and for checking the records themselves.
"""
import os
import random
import signal
import socket
import struct
import subprocess
import threading
import time

import phtest

DNSMASQ = "/usr/sbin/dnsmasq"

T_A, T_MX, T_AAAA = 1, 15, 28
RCODE_NOERROR, RCODE_NXDOMAIN = 0, 3


def available():
    return os.path.isfile(DNSMASQ) and os.access(DNSMASQ, os.X_OK)


def _qname(name):
    out = b""
    for label in name.rstrip(".").split("."):
        b = label.encode("ascii")
        out += bytes([len(b)]) + b
    return out + b"\x00"


def _skip_name(msg, off):
    for _ in range(256):
        n = msg[off]
        if n == 0:
            return off + 1
        if n & 0xC0 == 0xC0:
            return off + 2
        off += 1 + n
    raise ValueError("name too long")


def query(server, port, name, qtype, timeout=2.0):
    """One UDP query; returns (rcode, [(type, rdata)]) of the answer section."""
    qid = random.randrange(1, 65535)
    pkt = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + _qname(name) + struct.pack(">HH", qtype, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(pkt, (server, port))
        deadline = time.monotonic() + timeout
        for _ in range(100):
            s.settimeout(max(0.01, deadline - time.monotonic()))
            msg, _ = s.recvfrom(4096)
            if len(msg) >= 12 and struct.unpack(">H", msg[:2])[0] == qid:
                break
        else:
            raise socket.timeout("no matching answer")
    finally:
        s.close()
    _, flags, qd, an, _, _ = struct.unpack(">HHHHHH", msg[:12])
    off = 12
    for _ in range(qd):
        off = _skip_name(msg, off) + 4
    answers = []
    for _ in range(an):
        off = _skip_name(msg, off)
        rtype, _cls, _ttl, rdlen = struct.unpack(">HHIH", msg[off:off + 10])
        off += 10
        answers.append((rtype, msg[off:off + rdlen]))
        off += rdlen
    return flags & 0xF, answers


class Dnsmasq:
    """dnsmasq serving fixed records on 127.0.0.1:<free port>.

    mx:      (domain, host, preference) triples (--mx-host)
    hosts:   (name, address[, address...]) tuples, IPv4 and/or IPv6 (--host-record)
    null_mx: domains with the RFC 7505 null MX "0 ." (--dns-rr=D,15,000000)
    local:   zones answered only here (unknown names: NXDOMAIN)
    """

    def __init__(self, tmpdir, mx=(), hosts=(), null_mx=(), local=("test",), ttl=300,
                 extra=(), ready_timeout=10.0):
        if not available():
            raise AssertionError("%s is not installed (Debian: dnsmasq-base)" % DNSMASQ)
        self.host = "127.0.0.1"
        self.port = phtest.free_port(self.host, udp=True)  # dnsmasq: UDP and TCP
        self.server = "%s:%d" % (self.host, self.port)
        args = [DNSMASQ, "--keep-in-foreground", "--pid-file=", "--no-resolv", "--no-hosts",
                "--bind-interfaces", "--listen-address=%s" % self.host, "--port=%d" % self.port,
                "-C", "/dev/null", "--local-ttl=%d" % ttl, "--log-facility=-"]
        for z in local:
            args.append("--local=/%s/" % z)
        for dom, host, pref in mx:
            args.append("--mx-host=%s,%s,%d" % (dom, host, pref))
        for h in hosts:
            args.append("--host-record=%s" % ",".join(h))
        for dom in null_mx:
            # MX RDATA: preference 0 (2 octets) + the root name (1 zero octet)
            args.append("--dns-rr=%s,15,000000" % dom)
        args.extend(extra)
        self.cmd = args
        self.err_path = os.path.join(str(tmpdir), "dnsmasq-%d.err" % self.port)
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._err,
                                     stderr=self._err)
        self.pid = self.proc.pid
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        last = None
        for _ in range(100000):
            if self.proc.poll() is not None:
                raise AssertionError("dnsmasq exited with status %s at start:\n%s\ncommand: %s"
                                     % (self.proc.returncode, self.log(), " ".join(self.cmd)))
            try:
                # any name of the local zone: NXDOMAIN (or an answer) means it is serving
                rcode, _ = self.query("ready-probe.test", T_A, timeout=0.5)
                if rcode in (RCODE_NOERROR, RCODE_NXDOMAIN):
                    return
            except OSError as e:
                last = e
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError("dnsmasq did not answer on %s within %.0f s (last error %r):\n%s"
                             % (self.server, timeout, last, self.log()))

    def query(self, name, qtype, timeout=2.0):
        return query(self.host, self.port, name, qtype, timeout)

    def log(self, limit=4000):
        try:
            with open(self.err_path, "rb") as f:
                return f.read()[-limit:].decode("utf-8", "replace")
        except OSError:
            return ""

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=10.0):
        """SIGTERM by PID, wait (SIGKILL after timeout)."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        try:
            self._err.close()
        except OSError:
            pass
        return self.proc.returncode


class ServfailServer:
    """A UDP 'DNS server' on 127.0.0.1:<free port> that answers every query with
    SERVFAIL (rcode 2): give it to dnsmasq as the server of one zone
    (--server=/zone/127.0.0.1#PORT) to make lookups there fail temporarily at once
    (dnsmasq does not answer at all when its upstream is unreachable, and the client
    then waits for its own timeouts). A thread; close() stops it."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.queries = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                msg, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            if len(msg) < 12:
                continue
            self.queries += 1
            # same id and question, QR=1, RD/RA, rcode 2; no answer, authority or additional
            flags = 0x8000 | (struct.unpack(">H", msg[2:4])[0] & 0x0100) | 0x0080 | 2
            qd = struct.unpack(">H", msg[4:6])[0]
            try:
                end = _skip_name(msg, 12) + 4 if qd else 12
            except (IndexError, ValueError):
                continue
            reply = msg[:2] + struct.pack(">HHHHH", flags, qd, 0, 0, 0) + msg[12:end]
            try:
                self.sock.sendto(reply, peer)
            except OSError:
                pass

    def close(self):
        self._stop.set()
        self._t.join(5)
        self.sock.close()
