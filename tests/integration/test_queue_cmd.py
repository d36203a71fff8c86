"""Black-box tests of `posthaste queue` (list, list --json, show; the control verbs offline,
and their way to a running daemon; test_queue_live.py tests live control in depth).

A daemon is started on 127.0.0.1:<free port> with a temporary spool; messages are sent
with smtplib (a null sender, three recipients, an SMTPUTF8 message with UTF-8
addresses, a body with a dot-stuffed line) and their "queued as" ids collected from the
replies. The queue tool must list them while the daemon runs (it reads the spool
read-only, without the lock) and the same after the daemon stopped; `show` must give
back each body octet for octet.

Run inside a private network namespace (only 127.0.0.1 is used):

    unshare -n sh -c 'ip link set lo up && python3 -m pytest -q -p no:cacheprovider \
        tests/integration/test_queue_cmd.py'
"""
import json
import os
import re
import signal
import smtplib
import subprocess
import threading
import time

import pytest

import phtest

POSTHASTE = os.path.join(phtest.BUILD_DIR, "mta", "posthaste", "posthaste")
QUEUED_RE = re.compile(r"queued as ([0-9A-F]{16})\b")
NOT_RUNNING = "the daemon is not running: nothing to flush"
RECOVERED_RE = re.compile(r"recovered (\d+) queued messages from (\d+) segments in (\d+) ms"
                          r"(?:, (\d+) held)?")
RUN_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def posthaste():
    if not (os.path.isfile(POSTHASTE) and os.access(POSTHASTE, os.X_OK)):
        pytest.skip("the posthaste daemon is not built: %s is missing (build with `ninja -C %s` "
                    "or set POSTHASTE_BUILD)" % (POSTHASTE, phtest.BUILD_DIR))
    return POSTHASTE


class Daemon:
    """One posthaste on 127.0.0.1:<free port>; stop() sends SIGTERM to its PID and waits."""

    def __init__(self, binary, tmpdir, spool, workers=2):
        self.port = phtest.free_port()
        self.err_path = os.path.join(str(tmpdir), "posthaste-%d.err" % self.port)
        self._err = open(self.err_path, "wb")
        self.cmd = [binary, "--listen", "127.0.0.1:%d" % self.port, "--spool", str(spool),
                    "--workers", str(workers), "--no-delivery"]
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._err)
        try:
            s = phtest.wait_connectable("127.0.0.1", self.port, proc=self.proc,
                                        what="posthaste")
            s.close()
        except AssertionError as e:
            self.kill()
            raise AssertionError("%s\nstderr:\n%s" % (e, self.log()))

    def log(self):
        with open(self.err_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            rc = self.proc.wait(phtest.STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("posthaste (pid %d) ignored SIGTERM; log:\n%s"
                                 % (self.proc.pid, self.log()))
        self._err.close()
        assert rc == 0, "posthaste exited with %s; log:\n%s" % (rc, self.log())

    def kill(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if not self._err.closed:
            self._err.close()


@pytest.fixture
def daemon(posthaste, tmp_path):
    """Factory: daemon(spool) -> a running Daemon; leftovers are killed by PID at teardown."""
    started = []

    def start(spool, **kw):
        d = Daemon(posthaste, tmp_path, spool, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


def queue(*args, check=None):
    """Runs `posthaste queue ARGS`; returns (rc, stdout bytes, stderr text)."""
    p = subprocess.run([POSTHASTE, "queue"] + [str(a) for a in args], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=RUN_TIMEOUT)
    err = p.stderr.decode("utf-8", "replace")
    if check is not None:
        assert p.returncode == check, "posthaste queue %s: exit %d (expected %d)\nstderr: %s" % (
            " ".join(map(str, args)), p.returncode, check, err)
    return p.returncode, p.stdout, err


def send(port, sender, rcpts, body, utf8=False):
    """One transaction; returns the queue id of the 250 after the data."""
    with smtplib.SMTP("127.0.0.1", port, timeout=phtest.REPLY_TIMEOUT) as c:
        c.ehlo("client.test")
        code, resp = c.mail(sender, ["SMTPUTF8"] if utf8 else [])
        assert code == 250, (code, resp)
        for r in rcpts:
            code, resp = c.rcpt(r)
            assert code == 250, (r, code, resp)
        code, resp = c.data(body)
        assert code == 250, (code, resp)
        m = QUEUED_RE.search(resp.decode("ascii", "replace"))
        assert m, "no queue id in %r" % resp
        return m.group(1)


# Bodies as stored: CRLF lines, ending in CRLF, one line that smtplib dot-stuffs.
MESSAGES = [
    ("alice@example.org", ["bob@example.com"],
     b"Subject: plain\r\nFrom: alice@example.org\r\n\r\nHello Bob.\r\n.dotted line\r\n", False),
    ("", ["postmaster@example.com"],
     b"Subject: a bounce\r\n\r\nundeliverable\r\n", False),
    ("list@example.org", ["one@example.com", "two@example.net", "three@example.org"],
     b"Subject: three\r\n\r\n" + (b"x" * 75 + b"\r\n") * 40, False),
    ("j\u00fcrgen@b\u00fccher.example", ["\u7528\u6237@\u4f8b\u5b50.cn"],
     "Subject: UTF-8\r\nFrom: j\u00fcrgen@b\u00fccher.example\r\n\r\nGr\u00fc\u00dfe\r\n"
     .encode("utf-8"), True),
]


def send_all(port):
    sent = {}
    for sender, rcpts, body, utf8 in MESSAGES:
        qid = send(port, sender, rcpts, body, utf8)
        assert qid not in sent
        sent[qid] = (sender, rcpts, body)
    return sent


def json_lines(out):
    objs = []
    for line in out.decode("utf-8").splitlines():
        objs.append(json.loads(line))
    return objs


def check_json(objs, sent, stored, t0):
    assert sorted(o["queue_id"] for o in objs) == sorted(sent)
    for o in objs:
        sender, rcpts, body = sent[o["queue_id"]]
        assert o["queue_name"] == "active"
        assert o["sender"] == sender
        assert [r["address"] for r in o["recipients"]] == rcpts
        assert o["message_size"] == len(stored[o["queue_id"]])
        assert isinstance(o["arrival_time"], int)
        assert t0 - 2 <= o["arrival_time"] <= time.time() + 2
        assert o["client_address"] == "127.0.0.1"
        assert o["delay_warned"] is False
        assert o["envid"] is None


def check_text(out, sent, stored):
    text = out.decode("utf-8")
    lines = text.splitlines()
    assert lines[0].split() == ["-Queue", "ID-------", "--Size--", "----Arrival", "Time----",
                                "-Sender/Recipient-------"]
    total = sum(len(b) for b in stored.values())
    assert lines[-1] == "-- %d Kbytes in %d Requests." % ((total + 1023) // 1024, len(sent))
    col = lines[0].index("-Sender/Recipient")
    for qid, (sender, rcpts, body) in sent.items():
        i = next(k for k, ln in enumerate(lines) if ln.startswith(qid + " "))
        head = lines[i]
        assert head.split()[1] == str(len(stored[qid]))
        assert head[col:] == (sender or "<>"), head
        for k, r in enumerate(rcpts):
            assert lines[i + 1 + k] == " " * col + r
        assert lines[i + 1 + len(rcpts)] == ""


def show_body(spool, qid):
    """(envelope lines, stored message) from `queue show`."""
    _, out, err = queue("show", qid, "--spool", spool, check=0)
    assert err == ""
    head, sep, rest = out.partition(("*** MESSAGE CONTENTS %s ***\n" % qid.upper()).encode())
    assert sep, out[:2000]
    return head.decode("utf-8").splitlines(), rest


def check_stored(sent_body, stored):
    """The stored message is what was sent, after the daemon's Received: header."""
    assert stored.endswith(sent_body)
    trace = stored[:len(stored) - len(sent_body)]
    assert trace == b"" or (trace.startswith(b"Received: ") and trace.endswith(b"\r\n")), trace


def test_list_and_show_while_running_and_after(daemon, tmp_path):
    spool = tmp_path / "spool"
    d = daemon(spool)
    t0 = time.time()
    sent = send_all(d.port)

    stored = {}
    for qid, (sender, rcpts, body) in sent.items():
        env, stored[qid] = show_body(spool, qid)
        check_stored(body, stored[qid])
        assert show_body(spool, qid.lower()) == (env, stored[qid])  # either case of the id
        assert env[0] == "*** ENVELOPE %s ***" % qid
        assert "sender: <%s>" % sender in env
        assert "client: 127.0.0.1" in env
        assert "helo: client.test" in env
        assert "size: %d" % len(stored[qid]) in env
        assert [ln for ln in env if ln.startswith("recipient: ")] == \
            ["recipient: <%s>" % r for r in rcpts]
        flags = next(ln for ln in env if ln.startswith("flags: ")).split()[1:]
        assert "ESMTP" in flags
        assert ("SMTPUTF8" in flags) == any(ord(ch) > 127 for ch in sender)

    _, out_text, err = queue("list", "--spool", spool, check=0)
    assert err == ""
    check_text(out_text, sent, stored)
    _, out_json, err = queue("list", "--json", "--spool", spool, check=0)
    assert err == ""
    check_json(json_lines(out_json), sent, stored, t0)

    d.stop()
    _, off_text, err = queue("list", "--spool", spool, check=0)
    assert err == ""
    assert off_text == out_text
    _, off_json, _ = queue("list", "--json", "--spool", spool, check=0)
    assert off_json == out_json
    for qid in sent:
        assert show_body(spool, qid)[1] == stored[qid]


def test_notify_orcpt_envid(daemon, tmp_path):
    """DSN parameters reach the envelope and `show` prints them."""
    spool = tmp_path / "spool"
    d = daemon(spool)
    with smtplib.SMTP("127.0.0.1", d.port, timeout=phtest.REPLY_TIMEOUT) as c:
        c.ehlo("dsn.test")
        if not c.has_extn("dsn"):
            pytest.skip("the daemon does not offer DSN")
        assert c.mail("a@example.org", ["RET=HDRS", "ENVID=QQ314159"])[0] == 250
        assert c.rcpt("b@example.com", ["NOTIFY=SUCCESS,FAILURE",
                                        "ORCPT=rfc822;b@example.com"])[0] == 250
        code, resp = c.data(b"Subject: dsn\r\n\r\nx\r\n")
        assert code == 250
        qid = QUEUED_RE.search(resp.decode()).group(1)
    _, out, _ = queue("show", qid, "--spool", spool, check=0)
    env = out.decode().split("*** MESSAGE CONTENTS")[0].splitlines()
    assert "envid: QQ314159" in env
    rc = next(ln for ln in env if ln.startswith("recipient: "))
    assert rc.startswith("recipient: <b@example.com> NOTIFY=SUCCESS,FAILURE ORCPT="), rc
    assert "RET=HDRS" in next(ln for ln in env if ln.startswith("flags: "))
    objs = json_lines(queue("list", "--json", "--spool", spool, check=0)[1])
    assert [o["envid"] for o in objs] == ["QQ314159"]
    d.stop()


def test_list_during_load(daemon, tmp_path):
    """Lists taken while messages are being written: never an error, never a warning
    (the torn tail of a write in progress is skipped silently), counts only grow."""
    spool = tmp_path / "spool"
    d = daemon(spool)
    n_send = 150
    errors = []

    def sender():
        try:
            with smtplib.SMTP("127.0.0.1", d.port, timeout=phtest.REPLY_TIMEOUT) as c:
                for i in range(n_send):
                    c.sendmail("load@example.org", ["r%d@example.com" % i],
                               b"Subject: load\r\n\r\n" + b"y" * 76 + b"\r\n" * (i * 7 % 300))
        except Exception as e:  # reported by the main thread
            errors.append(e)

    th = threading.Thread(target=sender)
    th.start()
    counts = []
    try:
        for _ in range(1000):
            if not th.is_alive() and len(counts) >= 5:
                break
            _, out, err = queue("list", "--json", "--spool", spool, check=0)
            assert err == "", err
            counts.append(len(json_lines(out)))
    finally:
        th.join(120)
    assert not errors, errors
    assert counts == sorted(counts), counts
    _, out, err = queue("list", "--json", "--spool", spool, check=0)
    assert err == ""
    assert len(json_lines(out)) == n_send
    d.stop()


def test_config_file_and_empty_queue(posthaste, tmp_path):
    spool = tmp_path / "cfgspool"
    (spool / "w0").mkdir(parents=True)
    cfg = tmp_path / "posthaste.conf"
    cfg.write_text("spool_dir = %s\n" % spool)
    _, out, err = queue("list", "--config", cfg, check=0)
    assert out == b"Mail queue is empty\n", (out, err)
    _, out, _ = queue("list", "--json", "--config", cfg, check=0)
    assert out == b""
    # --spool wins over the file
    other = tmp_path / "other"
    rc, out, err = queue("list", "--config", cfg, "--spool", other)
    assert rc == 1 and "other" in err
    rc, _, err = queue("list", "--config", tmp_path / "missing.conf")
    assert rc == 1 and "missing.conf" in err


def test_unknown_id_and_control_verbs(daemon, tmp_path):
    spool = tmp_path / "spool"
    d = daemon(spool)
    qid = send(d.port, "a@example.org", ["b@example.com"], b"Subject: one\r\n\r\nx\r\n")
    missing = "%016X" % (int(qid, 16) ^ 1)
    for bad in (missing, "nothex", qid + "0"):
        _, out, err = queue("show", bad, "--spool", spool, check=1)
        assert out == b""
        assert "no message %s in the queue" % bad in err
    # the daemon runs (without delivery): the control verbs go to it over its socket
    _, out, err = queue("flush", qid, "--spool", spool, check=0)
    assert err == "" and out == b"posthaste queue flush: flushed 0 messages\n"
    for verb in ("hold", "release", "delete"):
        _, out, err = queue(verb, missing, "--spool", spool, check=1)
        assert err.strip() == "posthaste queue %s: no message %s in the queue" % (verb, missing)
    # the message is still there, untouched
    check_stored(b"Subject: one\r\n\r\nx\r\n", show_body(spool, qid)[1])
    d.stop()
    # stopped: flush has nothing to do, and says so
    _, out, err = queue("flush", "--spool", spool, check=1)
    assert out == b""
    assert err.strip() == "posthaste queue flush: %s" % NOT_RUNNING


def recovered(d):
    """(queued, held) from the daemon's recovery line."""
    m = RECOVERED_RE.search(d.log())
    assert m, "no recovery line in the log:\n" + d.log()
    return int(m.group(1)), int(m.group(4) or 0)


def segment_files(spool):
    return sorted(str(p) for p in spool.glob("w*/seg-*.log"))


def listed(spool):
    """{queue id: held?} from `queue list`, and the JSON queue names."""
    _, out, err = queue("list", "--spool", spool, check=0)
    assert err == ""
    ids = {}
    for ln in out.decode("utf-8").splitlines():
        m = re.match(r"([0-9A-F]{16})([ !])", ln)
        if m:
            ids[m.group(1)] = m.group(2) == "!"
    objs = json_lines(queue("list", "--json", "--spool", spool, check=0)[1])
    names = {o["queue_id"]: o["queue_name"] for o in objs}
    assert set(names) == set(ids)
    for qid, held in ids.items():
        assert names[qid] == ("hold" if held else "active"), (qid, names)
    return ids


def test_hold_release_delete_offline(daemon, tmp_path):
    spool = tmp_path / "spool"
    d = daemon(spool)
    ids = [send(d.port, "a@example.org", ["r%d@example.com" % i],
                b"Subject: %d\r\n\r\nx\r\n" % i) for i in range(5)]
    d.stop()
    first_segments = segment_files(spool)
    assert first_segments

    _, out, err = queue("hold", ids[0], "--spool", spool, check=0)
    assert err == "" and b"held 1 message" in out
    _, out, err = queue("delete", ids[1].lower(), "--spool", spool, check=0)
    assert err == "" and b"deleted 1 message" in out
    # operations that make no sense are refused, per id, and change nothing
    _, _, err = queue("hold", ids[0], ids[2], "--spool", spool, check=1)
    assert "posthaste queue hold: %s is on hold already" % ids[0] in err
    _, _, err = queue("release", ids[3], "--spool", spool, check=1)
    assert "posthaste queue release: %s is not on hold" % ids[3] in err
    _, _, err = queue("delete", ids[1], "--spool", spool, check=1)
    assert "no message %s in the queue" % ids[1] in err
    # ids[2] was held by the first of those (valid), so release it again
    queue("release", ids[2], "--spool", spool, check=0)

    shown = listed(spool)
    assert shown == {ids[0]: True, ids[2]: False, ids[3]: False, ids[4]: False}
    _, _, err = queue("show", ids[1], "--spool", spool, check=1)
    assert "no message %s in the queue" % ids[1] in err

    d = daemon(spool)
    assert recovered(d) == (3, 1), d.log()
    assert re.search(r"recovered 3 queued messages from \d+ segments in \d+ ms, 1 held", d.log())
    d.stop()
    assert listed(spool) == shown

    queue("release", ids[0], "--spool", spool, check=0)
    assert listed(spool) == {ids[0]: False, ids[2]: False, ids[3]: False, ids[4]: False}
    d = daemon(spool)
    assert recovered(d) == (4, 0), d.log()
    assert ", 0 held" not in d.log() and " held" not in d.log().split("recovered", 1)[1]
    d.stop()

    queue("hold", ids[3], "--spool", spool, check=0)
    _, out, err = queue("delete", "ALL", "--spool", spool, check=0)
    assert err == "" and b"deleted 4 messages" in out
    assert listed(spool) == {}
    _, out, _ = queue("list", "--spool", spool, check=0)
    assert out == b"Mail queue is empty\n"
    d = daemon(spool)
    assert recovered(d) == (0, 0), d.log()
    d.stop()
    for path in first_segments:
        assert not os.path.exists(path), (path, segment_files(spool))
    assert segment_files(spool) == []  # the state segments went with their messages


def test_control_while_running_then_offline_and_unknown_ids(daemon, tmp_path):
    spool = tmp_path / "spool"
    d = daemon(spool)
    qid = send(d.port, "a@example.org", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n")
    # running: the daemon does it (tests/integration/test_queue_live.py has the rest)
    _, out, err = queue("hold", qid, "--spool", spool, check=0)
    assert err == "" and out == b"posthaste queue hold: held 1 message\n"
    _, out, err = queue("release", qid, "--spool", spool, check=0)
    assert err == "" and out == b"posthaste queue release: released 1 message\n"
    d.stop()
    assert not (spool / "control.sock").exists()  # removed at exit
    before = segment_files(spool)
    missing = "%016X" % (int(qid, 16) ^ 1)
    for bad in (missing, "nothex"):
        _, _, err = queue("hold", bad, "--spool", spool, check=1)
        assert "posthaste queue hold: no message %s in the queue" % bad in err
    assert segment_files(spool) == before  # nothing to write: no new segment
    # a good id beside a bad one: the good one is done, the exit says one failed
    _, out, err = queue("hold", missing, qid, "--spool", spool, check=1)
    assert b"held 1 message" in out
    assert listed(spool) == {qid: True}


def test_control_stale_socket_falls_back_offline(daemon, tmp_path):
    """A socket file nobody listens on (a killed daemon's) means: not running."""
    spool = tmp_path / "spool"
    d = daemon(spool)
    qid = send(d.port, "a@example.org", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n")
    d.kill()  # SIGKILL: the socket file stays behind
    assert (spool / "control.sock").exists()
    _, out, err = queue("hold", qid, "--spool", spool, check=0)
    assert err == "" and b"held 1 message" in out
    assert listed(spool) == {qid: True}
    _, _, err = queue("flush", qid, "--spool", spool, check=1)
    assert NOT_RUNNING in err
    # the next daemon replaces the stale socket and answers on it
    d = daemon(spool)
    _, out, err = queue("release", qid, "--spool", spool, check=0)
    assert err == "" and b"released 1 message" in out
    d.stop()


@pytest.mark.parametrize("args", [
    [],
    ["frobnicate"],
    ["show"],
    ["show", "A", "B"],
    ["list", "extra"],
    ["list", "--bogus"],
    ["show", "--json", "0000000000000000"],
    ["hold"],
    ["list", "--spool"],
], ids=lambda a: " ".join(a) or "none")
def test_bad_usage(posthaste, args):
    _, out, err = queue(*args, check=2)
    assert "usage: posthaste queue" in err
    assert out == b""


def test_help(posthaste):
    _, out, _ = queue("--help", check=0)
    assert out.startswith(b"usage: posthaste queue list")
