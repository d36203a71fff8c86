"""A private Postfix instance for the integration tests (standard library only).

The approach of bench/compare-queue (bench/mtapeer.py): its own configuration, queue,
data directory and log under a fresh work directory; the system's Postfix (its
/etc/postfix, its queue, its master) is never touched. The copies of /etc/postfix's
main.cf and master.cf are edited with `postconf -c DIR`:

- the inet smtpd listens on 127.0.0.1:PORT only (the default port-25 service is
  commented out), IPv4, no chroot;
- mynetworks = 127.0.0.0/8 may relay; mydestination = localhost;
- relay_port: every other domain goes to relayhost = [127.0.0.1]:relay_port, without
  DNS (smtp_dns_support_level = disabled, an address literal). None: delivery
  deferred (defer_transports = smtp);
- the log goes to WORKDIR/maillog through postlogd (maillog_file).

Postfix's daemons run as the `postfix` user, so the work directory is made under
/tmp with mode 0755 (pytest's tmp_path is 0700 and they could not reach it).

Stopping: `postfix -c DIR stop`, then the master's PID (from the queue's
pid/master.pid) is waited for and killed if it is still there; then the work
directory is removed. Every wait is bounded.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import phtest

SBIN_PATHS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin", "/usr/lib/postfix/sbin")


def find_tool(name):
    p = shutil.which(name)
    if p:
        return p
    for d in SBIN_PATHS:
        c = os.path.join(d, name)
        if os.access(c, os.X_OK):
            return c
    return None


def unavailable():
    """None when a private Postfix can be run here, else the reason why not."""
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (its daemons switch to the postfix user)"
    for t in ("postfix", "postconf"):
        if not find_tool(t):
            return "%s is not installed" % t
    for f in ("main.cf", "master.cf"):
        if not os.path.isfile(os.path.join("/etc/postfix", f)):
            return "/etc/postfix/%s is missing (needed as the template)" % f
    try:
        import pwd
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no 'postfix' user"
    return None


class PostfixError(Exception):
    """Postfix could not be set up or started (the message says which step, with output)."""


class Postfix:
    """A private Postfix on 127.0.0.1:self.port. Use as a context manager or call
    start() and stop()."""

    def __init__(self, relay_port=None, extra=(), start_timeout=30.0):
        self.relay_port = relay_port
        self.extra = list(extra)
        self.start_timeout = start_timeout
        self.dir = None
        self.port = None
        self.started = False

    # ---- paths
    @property
    def etc(self):
        return os.path.join(self.dir, "etc")

    @property
    def maillog(self):
        return os.path.join(self.dir, "maillog")

    def settings(self):
        d = self.dir
        s = ["queue_directory = %s/spool" % d, "data_directory = %s/data" % d,
             "inet_interfaces = 127.0.0.1", "inet_protocols = ipv4",
             "mynetworks = 127.0.0.0/8", "mydestination = localhost",
             "default_transport = smtp", "relay_transport = smtp",
             "smtp_dns_support_level = disabled", "smtp_host_lookup = native",
             "smtpd_relay_restrictions = permit_mynetworks, reject",
             "default_process_limit = 100", "myhostname = postfix.test.invalid",
             "compatibility_level = 3.6", "biff = no",
             "maillog_file_prefixes = /var, /tmp", "maillog_file = %s" % self.maillog]
        if self.relay_port is None:
            s += ["relayhost = [127.0.0.1]:9", "defer_transports = smtp"]
        else:
            s += ["relayhost = [127.0.0.1]:%d" % self.relay_port]
        return s + self.extra

    def _run(self, argv, what, timeout=60):
        try:
            p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise PostfixError("%s: `%s` did not finish within %d s" % (what, " ".join(argv), timeout))
        out = p.stdout.decode("utf-8", "replace")
        if p.returncode != 0:
            raise PostfixError("%s: `%s` exited %d:\n%s" % (what, " ".join(argv), p.returncode, out[-3000:]))
        return out

    # ---- life cycle
    def start(self):
        self.dir = tempfile.mkdtemp(prefix="ph-postfix-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        for sub in ("etc", "spool", "data"):
            os.makedirs(os.path.join(self.dir, sub))
        for f in ("main.cf", "master.cf"):
            shutil.copy(os.path.join("/etc/postfix", f), os.path.join(self.etc, f))
        self._run(["chown", "-R", "postfix:postfix", os.path.join(self.dir, "data")], "chown data")
        self.port = phtest.free_port()
        pc = [find_tool("postconf"), "-c", self.etc]
        self._run(pc + ["-e"] + self.settings(), "postconf -e")
        self._run(pc + ["-M#", "smtp/inet"], "postconf -M# smtp/inet")
        self._run(pc + ["-M", "127.0.0.1:%d/inet = 127.0.0.1:%d inet n - n - - smtpd"
                        % (self.port, self.port)], "postconf -M (listener)")
        self._run(pc + ["-F", "*/*/chroot = n"], "postconf -F chroot")
        self.started = True  # from here on stop() has something to stop
        self._run([find_tool("postfix"), "-c", self.etc, "start"], "postfix start")
        self._wait_ready()
        return self

    def _wait_ready(self):
        deadline = time.monotonic() + self.start_timeout
        last = None
        for _ in range(100000):
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            except OSError as e:
                last = e
            else:
                try:
                    s.settimeout(10)
                    buf = b""
                    for _ in range(20):
                        d = s.recv(4096)
                        if not d:
                            break
                        buf += d
                        if buf.endswith(b"\n"):
                            break
                    if buf.startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
                    last = "greeting %r" % buf
                finally:
                    s.close()
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        raise PostfixError("postfix: nothing answers on 127.0.0.1:%d within %.0f s (last: %r); log:\n%s"
                           % (self.port, self.start_timeout, last, self.log_text(3000)))

    def master_pid(self):
        try:
            with open(os.path.join(self.dir, "spool", "pid", "master.pid")) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError, TypeError):
            return None

    def stop(self):
        if not self.dir:
            return
        if self.started:
            pid = self.master_pid()
            try:
                subprocess.run([find_tool("postfix"), "-c", self.etc, "stop"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=60)
            except subprocess.TimeoutExpired:
                pass
            if pid:
                deadline = time.monotonic() + 15
                gone = False
                for _ in range(1000):
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        gone = True
                        break
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
                if not gone:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()
        return False

    # ---- observation
    def log_text(self, limit=None):
        try:
            with open(self.maillog, "rb") as f:
                t = f.read().decode("utf-8", "replace")
        except (OSError, TypeError):
            return ""
        return t if limit is None else t[-limit:]

    def sent_count(self, relay_port=None):
        """Deliveries logged with status=sent (to [127.0.0.1]:relay_port when given)."""
        n = 0
        want = None if relay_port is None else "relay=127.0.0.1[127.0.0.1]:%d," % relay_port
        for ln in self.log_text().splitlines():
            if "status=sent" in ln and (want is None or want in ln):
                n += 1
        return n

    def queue_ids(self):
        """The queue ids in Postfix's queue (postqueue -j, one JSON object per line)."""
        tool = find_tool("postqueue")
        if not tool:
            return None
        p = subprocess.run([tool, "-c", self.etc, "-j"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=60)
        return re.findall(r'"queue_id":\s*"([^"]+)"', p.stdout.decode("utf-8", "replace"))
