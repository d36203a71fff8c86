"""Delayed-delivery DSNs (RFC 3461 NOTIFY=DELAY, RFC 3464 Action: delayed;
docs/bounces.md "Delay warnings"): a message whose recipients are still deferred
once it is `delay_warning_time` old gets ONE report listing them, and never a
second one, also not after a restart.

Every destination is a route to a `posthaste-bench sink` on a loopback port, the
sink failing RCPT with 451 (`--fail RCPT:451:100`) until the test replaces it.
The sender alice@local.test is local, so the reports land in her Maildir where
the `email` module parses them; one case uses a remote sender whose domain is
routed to a sink of its own. The durations are the test clock: retry_min 200ms,
retry_max 1s, delay_warning_time 1s, so the warning is due after three or four
attempts, within about two seconds.

    POSTHASTE_BUILD=$PWD/build unshare -n sh -c 'ip link set lo up && exec \
        /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/integration/test_delay_dsn.py'
"""
import email.utils
import json
import os
import re
import subprocess
import time

import pytest

import phtest
from test_delivery import ALICE, POSTHASTE, Relay, final_rcpt, message, parse_dsn, wait_for

NO_DNS = "127.0.0.1:9"  # routes only: the resolver is never asked
WARN = "delay_warning_time = 1s\n"
AGE = "max_queue_age = 60s\n"  # no expiry during a test unless it asks for one


@pytest.fixture(scope="module")
def posthaste():
    if not (os.path.isfile(POSTHASTE) and os.access(POSTHASTE, os.X_OK)):
        pytest.skip("the posthaste daemon is not built: %s is missing" % POSTHASTE)
    return POSTHASTE


class World:
    """Sinks and daemons of one test, stopped by PID at teardown."""

    def __init__(self, bench, tmp_path):
        self.bench = bench
        self.tmp = tmp_path
        self.sinks, self.relays = [], []

    def sink(self, *args, port=None):
        s = phtest.Sink(self.bench, [str(a) for a in args] + ["--workers", "1", "--quiet"],
                        self.tmp, port=port)
        self.sinks.append(s)
        return s

    def relay(self, routes, extra, restart=None):
        """A daemon with these routes ({domain: sink}); restart=R: R's directory again."""
        kw = dict(routes=[(d, "[127.0.0.1]:%d" % s.port) for d, s in routes.items()],
                  extra=extra, workers=1)
        if restart is not None:
            assert not restart.alive()
            r = Relay(self.tmp, NO_DNS, name=os.path.basename(restart.dir), restart=True, **kw)
        else:
            r = Relay(self.tmp, NO_DNS, name="relay%d" % len(self.relays), **kw)
        self.relays.append(r)
        return r

    def cleanup(self):
        for r in self.relays:
            r.kill()
        for s in self.sinks:
            s.kill()


@pytest.fixture
def world(posthaste, bench, tmp_path):
    w = World(bench, tmp_path)
    yield w
    w.cleanup()


def delay_reports(relay, qid):
    """The reports about qid in alice's Maildir, parsed: [(msg, per_msg, per_rcpt, returned)]."""
    return [parse_dsn(m) for m in relay.mailbox(ALICE)
            if b"X-Posthaste-Queue-ID: " + qid.encode() in m]


def wait_attempts(relay, qid, n):
    """Waits until qid has had n more transient failures than now (retries go on)."""
    have = len(relay.events(qid, "transient_failure"))
    relay.wait_event(qid, "transient_failure", n=have + n)


def check_delay_report(relay, qid, rcpts, max_queue_age_s=60):
    """Exactly one report about qid: from <> to alice, Action: delayed for `rcpts`
    (and nobody else), Status 4.x.x, the sink's 451 as Diagnostic-Code,
    Will-Retry-Until = arrival + max_queue_age, the header section returned."""
    ev = relay.wait_event(qid, "dsn")
    assert len(ev) == 1 and ev[0]["recipient"] == ALICE, ev
    assert ev[0]["delayed"] == len(rcpts) and ev[0]["failed"] == 0, ev
    d = relay.wait_event(ev[0]["dsn_queue_id"], "delivery")
    assert d[0]["sender"] == "" and d[0]["remote_host"] == "local", d
    reports = wait_for(lambda: delay_reports(relay, qid), 10, "the report in alice's Maildir",
                       relay.diag)
    assert len(reports) == 1, "exactly one report for %s, found %d" % (qid, len(reports))
    msg, per_msg, per_rcpt, returned = reports[0]
    assert msg.get("Subject") == "Delayed Mail (still being retried)", msg.get("Subject")
    assert sorted(final_rcpt(b) for b in per_rcpt) == sorted(rcpts), per_rcpt
    received_ms = relay.events(qid, "transient_failure")[0]["received_ms"]
    for b in per_rcpt:
        assert b.get("Action") == "delayed", b.items()
        assert re.match(r"^4\.\d{1,3}\.\d{1,3}$", b.get("Status", "")), b.items()
        assert "451" in b.get("Diagnostic-Code", ""), b.items()
        until = email.utils.parsedate_to_datetime(b.get("Will-Retry-Until")).timestamp()
        arrival = email.utils.parsedate_to_datetime(per_msg.get("Arrival-Date")).timestamp()
        assert abs(until - (arrival + max_queue_age_s)) <= 1, (b.items(), per_msg.items())
        assert abs(arrival - received_ms / 1000.0) <= 1, per_msg.items()
    assert returned is not None and returned.get_content_type() == "text/rfc822-headers", \
        "a delay report returns the header section only"
    return msg, per_msg, per_rcpt


# --------------------------------------------------------------------------- one warning


def test_one_delay_dsn_then_delivery(world):
    """A deferred recipient without NOTIFY: one delay report once the message is 1 s
    old, none at the retries after it, nor after an offline hold and release and a
    restart; then it is delivered, and no other report follows."""
    failing = world.sink("--fail", "RCPT:451:100")
    relay = world.relay({"slow.test": failing}, WARN + AGE)
    subject = "slow one"
    t0 = time.time()
    qid = relay.send(ALICE, ["user@slow.test"], message(subject, to="user@slow.test"))
    ev = relay.wait_event(qid, "dsn")
    assert time.time() - t0 >= 1.0 - 0.05, "the warning came before delay_warning_time"
    tf = relay.events(qid, "transient_failure")
    assert tf and tf[-1]["delay_ms"] >= 1000, tf  # the attempt that sent it was past 1 s
    check_delay_report(relay, qid, ["user@slow.test"])
    # more retries, no second report
    wait_attempts(relay, qid, 3)
    assert len(relay.events(qid, "dsn")) == 1, relay.diag()
    listed = relay.queue_list()
    assert [m["queue_id"] for m in listed] == [qid]
    assert listed[0]["delay_warned"] is True, listed
    relay.stop()
    # held and released with the daemon stopped: those records keep the fact too
    for verb in ("hold", "release"):
        p = subprocess.run([POSTHASTE, "queue", verb, qid, "--spool", relay.spool],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=60)
        assert p.returncode == 0, "queue %s: %s" % (verb, p.stdout)
    p = subprocess.run([POSTHASTE, "queue", "list", "--json", "--spool", relay.spool],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert [json.loads(l)["delay_warned"] for l in p.stdout.splitlines()] == [True], p.stdout

    # the fact that it was sent survives a restart
    relay2 = world.relay({"slow.test": failing}, WARN + AGE, restart=relay)
    wait_attempts(relay2, qid, 3)
    assert len(relay2.events(qid, "dsn")) == 1, relay2.diag()
    assert len(relay2.mailbox(ALICE)) == 1, "a second report after the restart"
    # the destination comes back: delivered, and nothing more is reported
    port = failing.port
    failing.stop()
    good = world.sink(port=port)
    d = relay2.wait_event(qid, "delivery")
    assert d[0]["recipient"] == "user@slow.test", d
    relay2.assert_drained()
    assert len(relay2.events(qid, "dsn")) == 1 and len(relay2.mailbox(ALICE)) == 1, relay2.diag()
    phtest.assert_stats(good.stop(), messages=1, recipients=1)


def test_delay_then_expiry_sends_the_failure_dsn_too(world):
    """The delay report first (1 s), then at max_queue_age (3 s) the normal failure
    report with 4.4.7: two reports in all, one of each."""
    failing = world.sink("--fail", "RCPT:451:100")
    relay = world.relay({"slow.test": failing}, WARN + "max_queue_age = 3s\n")
    qid = relay.send(ALICE, ["user@slow.test"], message("slow then gone", to="user@slow.test"))
    relay.wait_event(qid, "expiry", timeout=30)
    ev = relay.wait_event(qid, "dsn", n=2)
    assert len(ev) == 2, ev
    assert (ev[0]["delayed"], ev[0]["failed"]) == (1, 0), ev
    assert (ev[1]["delayed"], ev[1]["failed"]) == (0, 1), ev
    relay.assert_drained()
    reports = delay_reports(relay, qid)
    assert len(reports) == 2, "a delay report and a failure report, found %d" % len(reports)
    actions = [[b.get("Action") for b in r[2]] for r in reports]
    assert sorted(actions) == [["delayed"], ["failed"]], actions
    for msg, per_msg, per_rcpt, returned in reports:
        b = per_rcpt[0]
        if b.get("Action") == "delayed":
            assert msg.get("Subject") == "Delayed Mail (still being retried)"
            until = email.utils.parsedate_to_datetime(b.get("Will-Retry-Until")).timestamp()
            arrival = email.utils.parsedate_to_datetime(per_msg.get("Arrival-Date")).timestamp()
            assert abs(until - (arrival + 3)) <= 1, b.items()
        else:
            assert msg.get("Subject") == "Undelivered Mail Returned to Sender"
            assert b.get("Status") == "4.4.7" and "Will-Retry-Until" not in b, b.items()
    assert failing.stop()["messages"] == 0


# --------------------------------------------------------------------------- who gets one


def test_notify_decides_who_is_listed(world):
    """One message to four deferred recipients: no NOTIFY and NOTIFY=DELAY are
    listed, NOTIFY=NEVER and NOTIFY=SUCCESS,FAILURE are not. A message whose only
    recipient says NEVER, one whose only recipient says SUCCESS,FAILURE, and one
    from the null sender get no report at all."""
    failing = world.sink("--fail", "RCPT:451:100")
    relay = world.relay({"slow.test": failing}, WARN + AGE)
    rc = ["plain@slow.test", "never@slow.test", "sf@slow.test", "delay@slow.test"]
    opts = {"never@slow.test": ["NOTIFY=NEVER"], "sf@slow.test": ["NOTIFY=SUCCESS,FAILURE"],
            "delay@slow.test": ["NOTIFY=DELAY"]}
    mixed = relay.send(ALICE, rc, message("mixed notify"), rcpt_opts=opts)
    never = relay.send(ALICE, ["never@slow.test"], message("never"),
                       rcpt_opts={"never@slow.test": ["NOTIFY=NEVER"]})
    sf = relay.send(ALICE, ["sf@slow.test"], message("success,failure"),
                    rcpt_opts={"sf@slow.test": ["NOTIFY=SUCCESS,FAILURE"]})
    null = relay.send("", ["plain@slow.test"], message("from the null sender", sender="x"))
    check_delay_report(relay, mixed, ["plain@slow.test", "delay@slow.test"])
    # the others are as old and have been retried past the warning time
    for q in (never, sf, null):
        wait_for(lambda q=q: [e for e in relay.events(q, "transient_failure")
                              if e["delay_ms"] >= 1000], 30,
                 "an attempt of %s past delay_warning_time" % q, relay.diag)
        wait_attempts(relay, q, 2)
        assert relay.events(q, "dsn") == [], relay.diag()
    assert len(relay.events(event="dsn")) == 1, relay.diag()
    assert len(relay.mailbox(ALICE)) == 1, "only the mixed message's report"
    relay.stop()
    assert failing.stop()["messages"] == 0


def test_zero_turns_delay_warnings_off(world):
    failing = world.sink("--fail", "RCPT:451:100")
    relay = world.relay({"slow.test": failing}, "delay_warning_time = 0\n" + AGE)
    qid = relay.send(ALICE, ["user@slow.test"], message("no warnings"))
    wait_for(lambda: [e for e in relay.events(qid, "transient_failure")
                      if e["delay_ms"] >= 1500], 30, "an attempt 1.5 s after arrival", relay.diag)
    assert relay.events(qid, "dsn") == [] and relay.mailbox(ALICE) == [], relay.diag()
    relay.stop()
    assert failing.stop()["messages"] == 0


def test_delay_dsn_to_a_remote_sender_arrives_at_its_domain(world):
    """The sender bob@home.test is remote: the report goes out through the route of
    home.test and exactly one message from <> arrives at that sink; the sink of the
    slow destination gets nothing."""
    failing = world.sink("--fail", "RCPT:451:100")
    home = world.sink()
    relay = world.relay({"slow.test": failing, "home.test": home}, WARN + AGE)
    qid = relay.send("bob@home.test", ["user@slow.test"],
                     message("remote sender", sender="bob@home.test"))
    ev = relay.wait_event(qid, "dsn")
    assert ev[0]["recipient"] == "bob@home.test" and ev[0]["delayed"] == 1, ev
    d = relay.wait_event(ev[0]["dsn_queue_id"], "delivery")
    assert d[0]["sender"] == "" and d[0]["recipient"] == "bob@home.test", d
    assert d[0]["remote_host"].endswith("[127.0.0.1]:%d" % home.port), d
    wait_attempts(relay, qid, 3)
    assert len(relay.events(event="dsn")) == 1, relay.diag()
    relay.stop()
    phtest.assert_stats(home.stop(), messages=1, recipients=1)
    assert failing.stop()["messages"] == 0
