"""Shared by bench/compare-queue and bench/compare-relay: the processes they run.

- enter_netns(): re-execute the calling script under `unshare -n` with loopback up,
  so that nothing it does leaves the machine (needs root).
- Postfix: a private Postfix instance (its own config, queue, data and log under a
  work directory; the system's Postfix is not touched), either accepting with
  delivery deferred (compare-queue) or relaying everything to [127.0.0.1]:PORT
  (compare-relay).
- Posthaste: the daemon, on a fresh port, with the arguments the caller gives.
- Sink: `posthaste-bench sink`, whose JSON counts are read at SIGTERM.
- send(): `posthaste-bench send`, and Sender, the same in the background.

Every process started here is stopped by its PID (Postfix by `postfix stop`, then its
master's PID from the queue's pid/master.pid), every wait is bounded in time.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def enter_netns(name):
    """Re-execute the running script in a fresh network namespace, loopback up."""
    if os.environ.get("PH_COMPARE_NETNS") == "1":
        return
    if os.geteuid() != 0:
        sys.exit(f"{name}: run as root (network namespace, private Postfix instance)")
    env = dict(os.environ, PH_COMPARE_NETNS="1")
    os.execvpe("unshare", ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
                           sys.executable] + sys.argv, env)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, deadline=20.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def stop_pid(proc, sig=signal.SIGTERM, timeout=60):
    """Signal a Popen child and reap it; SIGKILL after `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def send_argv(bench, port, messages, size, connections=50, extra=()):
    return [bench, "send", "--server", f"127.0.0.1:{port}", "--connections", str(connections),
            "--messages", str(messages), "--size", str(size), "--json", "--timeout", "120", *extra]


def parse_send(out, messages):
    r = json.loads(out.decode().strip().splitlines()[-1])
    if r["accepted"] != messages:
        raise RuntimeError(f"only {r['accepted']} of {messages} accepted: {r}")
    return r


def send(bench, port, messages, size, extra=(), connections=50):
    p = subprocess.run(send_argv(bench, port, messages, size, connections, extra),
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=3600)
    return parse_send(p.stdout, messages)


class Sender:
    """`posthaste-bench send` in the background: start(), running(), result()."""

    def __init__(self, bench, port, messages, size, connections=50, extra=()):
        self.argv = send_argv(bench, port, messages, size, connections, extra)
        self.messages = messages

    def __enter__(self):
        self.out = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.argv, stdout=self.out, stderr=subprocess.DEVNULL)
        return self

    def running(self):
        return self.proc.poll() is None

    def result(self, timeout):
        self.proc.wait(timeout=timeout)
        self.out.seek(0)
        return parse_send(self.out.read(), self.messages)

    def __exit__(self, *exc):
        stop_pid(self.proc, signal.SIGKILL, timeout=10)
        self.out.close()


class Sink:
    """`posthaste-bench sink` on a free loopback port; .stats after exit (its JSON)."""

    def __init__(self, bench, extra=()):
        self.bench, self.extra = bench, list(extra)

    def __enter__(self):
        self.port = free_port()
        self.out = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([self.bench, "sink", "--listen", f"127.0.0.1:{self.port}", "--quiet",
                                      *self.extra], stdout=self.out, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def __exit__(self, *exc):
        stop_pid(self.proc, timeout=15)
        self.out.seek(0)
        lines = [l for l in self.out.read().decode(errors="replace").splitlines() if l.startswith("{")]
        self.out.close()
        self.stats = json.loads(lines[-1]) if lines else None


class Postfix:
    """A private Postfix instance accepting on 127.0.0.1:port.

    relay_port None: delivery deferred (defer_transports = smtp). Otherwise every
    non-local domain is relayed to [127.0.0.1]:relay_port (relayhost), with
    default_destination_concurrency_limit = concurrency when given. Its log goes to
    self.maillog (maillog_file, written by postlogd).
    """

    def __init__(self, workdir, relay_port=None, concurrency=None):
        self.dir = os.path.join(workdir, "postfix")
        self.relay_port, self.concurrency = relay_port, concurrency
        self.maillog = os.path.join(self.dir, "maillog")

    def settings(self):
        d = self.dir
        s = [f"queue_directory = {d}/spool", f"data_directory = {d}/data",
             "inet_interfaces = 127.0.0.1", "inet_protocols = ipv4",
             "mynetworks = 127.0.0.0/8", "mydestination = localhost",
             "default_transport = smtp", "relay_transport = smtp",
             "smtp_dns_support_level = disabled", "smtp_host_lookup = native",
             "smtpd_relay_restrictions = permit_mynetworks, reject",
             "default_process_limit = 200", "myhostname = bench.invalid",
             f"maillog_file_prefixes = /var, {d}", f"maillog_file = {self.maillog}"]
        if self.relay_port is None:
            s += ["relayhost = [127.0.0.1]:9", "defer_transports = smtp"]
        else:
            s += [f"relayhost = [127.0.0.1]:{self.relay_port}"]
            if self.concurrency:
                s += [f"default_destination_concurrency_limit = {self.concurrency}"]
        return s

    def __enter__(self):
        d = self.dir
        shutil.rmtree(d, ignore_errors=True)
        for sub in ("etc", "spool", "data"):
            os.makedirs(os.path.join(d, sub))
        for f in ("main.cf", "master.cf"):
            shutil.copy(os.path.join("/etc/postfix", f), os.path.join(d, "etc", f))
        subprocess.run(["chown", "-R", "postfix:postfix", os.path.join(d, "data")], check=True)
        self.port = free_port()
        etc = os.path.join(d, "etc")
        pc = ["postconf", "-c", etc]
        subprocess.run(pc + ["-e"] + self.settings(), check=True)
        subprocess.run(pc + ["-M#", "smtp/inet"], check=True)
        subprocess.run(pc + ["-M", f"127.0.0.1:{self.port}/inet = 127.0.0.1:{self.port} inet n - n - - smtpd"],
                       check=True)
        subprocess.run(pc + ["-F", "*/*/chroot = n"], check=True)
        subprocess.run(["postfix", "-c", etc, "start"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def master_pid(self):
        try:
            with open(os.path.join(self.dir, "spool", "pid", "master.pid")) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def __exit__(self, *exc):
        pid = self.master_pid()
        subprocess.run(["postfix", "-c", os.path.join(self.dir, "etc"), "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        end = time.monotonic() + 15
        while pid and time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(1)  # its children notice the master is gone and exit
        shutil.rmtree(self.dir, ignore_errors=True)


class Posthaste:
    """The daemon on a free loopback port. `args` replaces the default --no-delivery;
    `config` (text) is written to WORKDIR/posthaste.conf and passed with --config.
    It runs in `workdir`, so relative default paths land there. .text: its stderr."""

    def __init__(self, build, workdir, durability="fsync", args=("--no-delivery",), config=None):
        self.bin = os.path.join(build, "mta", "posthaste", "posthaste")
        self.workdir = workdir
        self.spool = os.path.join(workdir, "spool")
        self.durability = durability
        self.args, self.config = list(args), config

    def __enter__(self):
        self.port = free_port()
        self.log = tempfile.TemporaryFile()
        argv = [self.bin, "--listen", f"127.0.0.1:{self.port}", "--spool", self.spool,
                "--durability", self.durability] + self.args
        if self.config is not None:
            path = os.path.join(self.workdir, "posthaste.conf")
            with open(path, "w") as f:
                f.write(self.config)
            argv += ["--config", path]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log, cwd=self.workdir)
        try:
            wait_port(self.port)
        except RuntimeError:
            self.__exit__()
            raise RuntimeError(f"posthaste did not start: {self.text[-2000:]}")
        return self

    def alive(self):
        return self.proc.poll() is None

    def __exit__(self, *exc):
        stop_pid(self.proc, timeout=60)
        self.log.seek(0)
        self.text = self.log.read().decode(errors="replace")
        self.log.close()
