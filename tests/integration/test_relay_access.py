"""Relay access control: never an open relay.

A client in `mynetworks` (or an authenticated one) may send anywhere; any other client
only to `local_domains` and `relay_domains`, else 550 5.7.1 at RCPT time. The daemon
listens on 0.0.0.0 inside the test's network namespace with `mynetworks =
127.0.0.1/32`; the "outside" client binds to 127.0.0.2. Delivery is off (nothing is
resolved or sent); what matters is what the daemon accepts.
"""
import os
import smtplib
import subprocess

import pytest

import phtest

POSTHASTE = os.path.join(phtest.BUILD_DIR, "mta", "posthaste", "posthaste")
INSIDE, OUTSIDE = "127.0.0.1", "127.0.0.2"


@pytest.fixture
def daemon(tmp_path):
    if not os.access(POSTHASTE, os.X_OK):
        pytest.skip("posthaste is not built: %s" % POSTHASTE)
    users = tmp_path / "users"
    users.write_text("bob@local.test::\n")
    port = phtest.free_port()
    conf = tmp_path / "posthaste.conf"
    conf.write_text("listen = 0.0.0.0:%d\nspool_dir = %s\nmynetworks = 127.0.0.1/32\n"
                    "local_domains = local.test\nusers_file = %s\nmailbox_root = %s\n"
                    "relay_domains = backup.test\ndelivery = no\naccounting_log = none\n"
                    "workers = 1\n" % (port, tmp_path / "spool", users, tmp_path / "mail"))
    err = open(tmp_path / "stderr", "wb")
    proc = subprocess.Popen([POSTHASTE, "--config", str(conf)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=err)
    try:
        phtest.wait_connectable(INSIDE, port, proc=proc, what="posthaste").close()
        yield port
    finally:
        phtest.stop_process(proc)
        err.close()


def rcpt(port, source, addr):
    """(code, text) of RCPT TO:<addr> from source."""
    with smtplib.SMTP(INSIDE, port, timeout=10,
                      source_address=(source, 0)) as s:
        s.ehlo("client.test")
        code, _ = s.mail("sender@outside.example")
        assert code == 250
        code, text = s.rcpt(addr)
        s.rset()
        return code, text.decode()


@pytest.mark.parametrize("addr", ["user@foreign.example", "x@FOREIGN.example",
                                  "postmaster@elsewhere.test", "a@b@c.example"])
def test_outside_client_cannot_relay(daemon, addr):
    code, text = rcpt(daemon, OUTSIDE, addr)
    assert code >= 500, (code, text)  # 550 5.7.1, or 501 for a malformed address


def test_outside_relay_denied_text(daemon):
    code, text = rcpt(daemon, OUTSIDE, "user@foreign.example")
    assert (code, text[:5]) == (550, "5.7.1") and "Relay access denied" in text


def test_outside_client_may_send_to_local_and_relay_domains(daemon):
    assert rcpt(daemon, OUTSIDE, "bob@local.test")[0] == 250
    assert rcpt(daemon, OUTSIDE, "bob@LOCAL.test")[0] == 250
    assert rcpt(daemon, OUTSIDE, "anyone@backup.test")[0] == 250
    code, text = rcpt(daemon, OUTSIDE, "nobody@local.test")
    assert (code, text[:5]) == (550, "5.1.1")


def test_mynetworks_client_may_relay(daemon):
    assert rcpt(daemon, INSIDE, "user@foreign.example")[0] == 250


def test_whole_message_from_outside_is_refused(daemon):
    with smtplib.SMTP(INSIDE, daemon, timeout=10, source_address=(OUTSIDE, 0)) as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            s.sendmail("sender@outside.example", ["victim@foreign.example"],
                       b"Subject: relay?\r\n\r\nno\r\n")
        code, text = e.value.recipients["victim@foreign.example"]
        assert code == 550 and text.startswith(b"5.7.1")
