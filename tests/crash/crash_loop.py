#!/usr/bin/env python3
"""Crash loop: kill -9 the posthaste daemon under load, again and again, and check
that no acknowledged message is ever lost and that nothing appears that was never sent.

Each round:
  1. posthaste-bench send loads the daemon (--connections C, --size BYTES,
     --duration S) and appends the queue id of every 250 it gets to an ids file;
  2. at a random instant the daemon is killed with SIGKILL;
  3. when send has ended, the daemon is restarted on the same spool, and the spool
     is read back with tests/integration/spool_reader.py (independent of the C code):
       lost   acknowledged ids (all rounds so far) missing from the spool
       extra  message records beyond the number of messages send ever started
     and the daemon's "recovered N" must equal spool_reader's count of records,
     and no queue id may appear in two records.
The restarted daemon is the next round's target.

Prints one line per round, then "rounds R, acknowledged A, lost L, extra E".
Exit status: 0 when L == 0 and E == 0 and every other check held; 1 otherwise;
2 when the run itself could not go on (the daemon would not start, ...).

Runs as root: it re-executes itself under `unshare -n` (a private network
namespace with only loopback up) and uses 127.0.0.1 only.

usage: tests/crash/crash_loop.py [--rounds 100] [--seconds 3] [--connections 20]
           [--size 1024] [--workers 2] [--durability fsync] [--build DIR]
           [--dir DIR] [--keep] [--seed N]
"""
import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import phtest  # noqa: E402
import spool_reader  # noqa: E402

NETNS_ENV = "PH_CRASH_NETNS"


def stop(proc, sig=signal.SIGTERM, timeout=20.0):
    """Signals proc by PID, waits, SIGKILLs after timeout. Returns the exit status."""
    return phtest.stop_process(proc, sig, timeout)


class Fatal(Exception):
    pass


class Daemon:
    def __init__(self, binary, spool, workers, durability, log_path):
        self.port = phtest.free_port()
        self.addr = "127.0.0.1:%d" % self.port
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.cmd = [binary, "--listen", self.addr, "--spool", spool, "--no-delivery", "--workers", str(workers),
                    "--durability", durability]
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=self._log,
                                     stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self._wait_ready()

    def _wait_ready(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        last = None
        for _ in range(100000):
            if self.proc.poll() is not None:
                raise Fatal("posthaste exited with status %s at start-up; log:\n%s"
                            % (self.proc.returncode, self.log(3000)))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.settimeout(10)
                    greeting = s.recv(4096)
                    if greeting.startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        s.recv(4096)
                        return
                    last = greeting
            except OSError as e:
                last = e
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise Fatal("posthaste not ready on %s within %.0f s (%r); log:\n%s"
                    % (self.addr, timeout, last, self.log(3000)))

    def log(self, limit=None):
        self._log.flush()
        try:
            with open(self.log_path, "rb") as f:
                t = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return t if limit is None else t[-limit:]

    def recovered(self):
        import re
        m = re.search(r"spool: .*: recovered (\d+) queued messages from (\d+) segments in (\d+) ms",
                      self.log())
        if not m:
            raise Fatal("no 'recovered N queued messages' line in the log:\n%s" % self.log(3000))
        return int(m.group(1)), int(m.group(2)), int(m.group(3))

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM):
        rc = stop(self.proc, sig)
        self._log.close()
        return rc


class IdsFile:
    """Reads the ids that send appended since the last call (whole lines only)."""

    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.bad = []

    def new_ids(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        out = []
        for ln in data[:end].split(b"\n")[:-1]:
            try:
                if len(ln) != 16:
                    raise ValueError
                out.append(int(ln, 16))
            except ValueError:
                self.bad.append(ln[:80])
        return out


def reexec_in_netns():
    if os.environ.get(NETNS_ENV) == "1":
        return
    if os.geteuid() != 0:
        sys.exit("crash_loop: run as root (it creates a network namespace with unshare -n)")
    env = dict(os.environ, **{NETNS_ENV: "1"})
    os.execvpe("unshare", ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
                           sys.executable] + sys.argv, env)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=3.0, help="send --duration per round")
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--size", default="1024", help="message size (send --size)")
    ap.add_argument("--workers", type=int, default=2, help="daemon workers")
    ap.add_argument("--durability", default="fsync", choices=("fsync", "batch", "none"))
    ap.add_argument("--build", default=os.environ.get("POSTHASTE_BUILD", os.path.join(ROOT, "build")))
    ap.add_argument("--dir", help="work directory (default: a new one under $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (kept anyway "
                    "when a check fails)")
    ap.add_argument("--seed", type=int, help="seed of the kill instants (default: from the clock)")
    a = ap.parse_args()
    if a.rounds < 1 or a.seconds <= 0:
        ap.error("--rounds and --seconds must be positive")

    reexec_in_netns()

    daemon_bin = os.path.join(a.build, "mta", "posthaste", "posthaste")
    bench = os.path.join(a.build, "bench", "posthaste-bench")
    for p in (daemon_bin, bench):
        if not os.access(p, os.X_OK):
            sys.exit("crash_loop: %s is missing (ninja -C %s)" % (p, a.build))
    seed = a.seed if a.seed is not None else int(time.time() * 1000) % 1000000
    rng = random.Random(seed)
    kill_min = min(0.5, a.seconds / 6)
    kill_max = max(kill_min, a.seconds - 0.5)

    work = a.dir or tempfile.mkdtemp(prefix="posthaste-crash-")
    os.makedirs(work, exist_ok=True)
    spool = os.path.join(work, "spool")
    ids = IdsFile(os.path.join(work, "ids.txt"))
    index = spool_reader.SpoolIndex(spool)
    print("crash loop: %d rounds of %g s, %d connections, %s-octet messages, durability %s, "
          "seed %d, work dir %s" % (a.rounds, a.seconds, a.connections, a.size, a.durability,
                                     seed, work), flush=True)

    acked = set()
    lost_ever = set()
    extra_max = 0
    problems = []  # other failed checks
    total_sent = total_accepted = 0
    rounds_done = 0
    daemon = send = None
    status = 2
    try:
        daemon = Daemon(daemon_bin, spool, a.workers, a.durability, os.path.join(work, "daemon-0.log"))
        for rnd in range(1, a.rounds + 1):
            out_path = os.path.join(work, "send-%d.out" % rnd)
            err_path = os.path.join(work, "send-%d.err" % rnd)
            with open(out_path, "wb") as fo, open(err_path, "wb") as fe:
                send = subprocess.Popen(
                    [bench, "send", "--server", daemon.addr, "--connections", str(a.connections),
                     "--duration", "%g" % a.seconds, "--size", a.size, "--ids-file", ids.path,
                     "--timeout", "10", "--json"],
                    stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
            delay = rng.uniform(kill_min, kill_max)
            time.sleep(delay)
            if not daemon.alive():
                raise Fatal("round %d: the daemon died by itself (status %s) before the kill; "
                            "log:\n%s" % (rnd, daemon.proc.returncode, daemon.log(3000)))
            daemon.stop(signal.SIGKILL)
            try:
                send.wait(a.seconds + 120)
            except subprocess.TimeoutExpired:
                stop(send, signal.SIGKILL)
                raise Fatal("round %d: send did not end within %.0f s of the kill"
                            % (rnd, a.seconds + 120))
            send = None
            with open(out_path, "rb") as f:
                lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            try:
                js = json.loads(lines[-1])
                sent, accepted = int(js["sent"]), int(js["accepted"])
            except (IndexError, ValueError, KeyError, TypeError):
                with open(err_path, "rb") as f:
                    err = f.read().decode("utf-8", "replace")
                raise Fatal("round %d: no JSON result from send; stdout %r; stderr:\n%s"
                            % (rnd, lines[-3:], err[-2000:]))
            total_sent += sent
            total_accepted += accepted
            new = ids.new_ids()
            if len(new) != accepted:
                problems.append("round %d: send accepted %d messages but wrote %d ids"
                                % (rnd, accepted, len(new)))
            dup_acks = [i for i in new if i in acked]
            if dup_acks or len(set(new)) != len(new):
                problems.append("round %d: the daemon acknowledged the same queue id twice "
                                "(e.g. %s)" % (rnd, spool_reader.format_id((dup_acks or new)[0])))
            acked.update(new)

            daemon = Daemon(daemon_bin, spool, a.workers, a.durability,
                            os.path.join(work, "daemon-%d.log" % rnd))
            recovered, segments, ms = daemon.recovered()
            index.refresh()
            lost = [i for i in acked if i not in index]
            lost_ever.update(lost)
            extra = max(0, index.records - total_sent)
            extra_max = max(extra_max, extra)
            notes = []
            if recovered != index.records:
                problems.append("round %d: the daemon recovered %d messages, spool_reader finds %d"
                                % (rnd, recovered, index.records))
                notes.append("RECOVERED %d != %d" % (recovered, index.records))
            dups = index.duplicates
            if dups:
                problems.append("round %d: %d queue ids in more than one record, e.g. %s"
                                % (rnd, len(dups), dups[:5]))
                notes.append("DUPLICATE IDS %d" % len(dups))
            if index.bad_envelopes:
                problems.append("round %d: %d records with a good checksum but a bad envelope: %r"
                                % (rnd, len(index.bad_envelopes), index.bad_envelopes[:3]))
                notes.append("BAD ENVELOPES %d" % len(index.bad_envelopes))
            if lost:
                notes.append("LOST e.g. %s" % ", ".join(spool_reader.format_id(i) for i in lost[:5]))
            rounds_done = rnd
            print("round %d/%d: kill at %.2f s; sent %d, accepted %d; spool %d messages in %d "
                  "segments (%d damaged records skipped), daemon recovered %d in %d ms; "
                  "lost %d, extra %d%s" % (rnd, a.rounds, delay, sent, accepted, index.records,
                                           len(index.segments), len(index.bad), recovered, ms,
                                           len(lost), extra,
                                           ("; " + "; ".join(notes)) if notes else ""),
                  flush=True)
        rc = daemon.stop(signal.SIGTERM)
        if rc != 0:
            problems.append("the daemon exited with status %s after SIGTERM; log:\n%s"
                            % (rc, daemon.log(2000)))
        daemon = None
        status = 0 if not lost_ever and extra_max == 0 and not problems and not ids.bad else 1
    except Fatal as e:
        print("crash loop stopped: %s" % e, flush=True)
        status = 2
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        status = 2
    finally:
        if send is not None:
            stop(send, signal.SIGKILL)
        if daemon is not None:
            daemon.stop(signal.SIGTERM)
    if ids.bad:
        problems.append("lines of the ids file that are not 16-hex-digit queue ids: %r" % ids.bad[:5])
    for p in problems:
        print("FAILED: " + p)
    print("sent %d, accepted %d in all; spool %s" % (total_sent, total_accepted, index.summary()))
    print("rounds %d, acknowledged %d, lost %d, extra %d"
          % (rounds_done, len(acked), len(lost_ever), extra_max), flush=True)
    if status == 0 and not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print("work directory kept: %s" % work)
    return status


if __name__ == "__main__":
    sys.exit(main())
