"""Scripted SMTP dialogues against `posthaste-bench sink`.

Each case: a name, the sink's arguments, a list of steps (send, expect) and the
stats the sink must report at the end. send: str = one line (CRLF added),
bytes = exact octets. expect: a reply spec ("250", "503 5.5.1", "552|554 5.3|5.6",
"5xx"), a list of specs (pipelined replies, in order), None, NOREPLY or CLOSED.
"""
import signal
import socket
import time

import pytest

import phtest
from phtest import CLOSED, NOREPLY, assert_stats

EHLO = ("EHLO client.example", "250")
MAIL = ("MAIL FROM:<sender@example.com>", "250")
RCPT = ("RCPT TO:<rcpt@example.com>", "250")
DATA = ("DATA", "354")
TXN = [MAIL, RCPT, DATA]


def body(wire, spec="250"):
    """DATA body step: wire octets plus the end marker."""
    return (wire + b".\r\n", spec)


def stored(wire):
    """Body octets the sink counts for DATA wire octets (without the end marker)."""
    return len(phtest.dot_unstuff(wire))


class Case:
    def __init__(self, name, steps, args=(), stats=None, greeting="220"):
        self.name = name
        self.steps = steps
        self.args = list(args)
        # default: nothing accepted
        self.stats = {"messages": 0, "recipients": 0, "bytes": 0} if stats is None else stats
        self.greeting = greeting


SMALL = b"Subject: t\r\n\r\nhello\r\n"
DOTS = b"Subject: dots\r\n\r\n..one\r\n...two\r\n.x\r\n..\r\nend\r\n"
L998 = b"Subject: l\r\n\r\n" + b"a" * 998 + b"\r\n"
L998_STUFFED = b"Subject: l\r\n\r\n.." + b"a" * 997 + b"\r\n"   # 999 on the wire, 998 stored
L1001 = b"Subject: l\r\n\r\n" + b"a" * 1001 + b"\r\n"
UTF8 = "Subject: caf\u00e9\r\n\r\nd\u00e9j\u00e0 vu\r\n".encode("utf-8")
LONG_REJECT = "552|554 5.6|5.3"
SMUGGLE = (b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
           b"Subject: smuggled\r\n\r\nevil\r\n")

CASES = [
    Case("quit", [EHLO, ("QUIT", "221"), (None, CLOSED)]),
    Case("helo_then_transaction", [("HELO old.example", "250"), *TXN, body(SMALL)],
         stats=dict(messages=1, recipients=1, bytes=len(SMALL))),
    Case("lower_case_verbs", [("ehlo low.example", "250"), ("mail from:<a@example.com>", "250"),
                              ("rcpt to:<b@example.com>", "250"), ("data", "354"), body(SMALL)],
         stats=dict(messages=1, recipients=1, bytes=len(SMALL))),
    Case("space_after_colon", [EHLO, ("MAIL FROM: <a@example.com>", "250"), ("RCPT TO: <b@example.com>", "250")]),
    Case("second_ehlo_resets_transaction",
         [EHLO, MAIL, RCPT, ("EHLO again.example", "250"), ("DATA", "503|554"),
          ("RCPT TO:<x@example.com>", "503 5.5.1"), MAIL, RCPT, DATA, body(SMALL)],
         stats=dict(messages=1, recipients=1, bytes=len(SMALL))),
    Case("mail_before_ehlo", [("MAIL FROM:<a@example.com>", "250|503")]),
    Case("rcpt_before_mail", [EHLO, ("RCPT TO:<a@example.com>", "503 5.5.1")]),
    Case("data_before_mail", [EHLO, ("DATA", "503|554"), ("NOOP", "250")]),
    Case("data_before_rcpt", [EHLO, MAIL, ("DATA", "503|554"), RCPT, DATA, body(SMALL)],
         stats=dict(messages=1, recipients=1, bytes=len(SMALL))),
    Case("nested_mail", [EHLO, MAIL, ("MAIL FROM:<other@example.com>", "503 5.5.1")]),
    Case("unknown_command", [EHLO, ("XYZZY plugh", "500 5.5.1"), ("NOOP", "250")]),
    Case("noop_vrfy_rset", [EHLO, ("NOOP", "250"), ("VRFY someone", "252"), ("RSET", "250"),
                            ("NOOP ignored argument", "250")]),
    Case("bad_mail_syntax",
         [EHLO, ("MAIL", "501"), ("MAIL FROM:", "501"), ("MAIL FROM:<a@example.com", "501"),
          ("MAIL TO:<a@example.com>", "501"), ("MAIL FROM:<a@example.com> SIZE=abc", "501 5.5.4"),
          ("MAIL FROM:<a@example.com> XNOTREAL=1", "501|555 5.5"), MAIL]),
    Case("bad_rcpt_syntax",
         [EHLO, MAIL, ("RCPT", "501"), ("RCPT TO:<>", "501"), ("RCPT TO:<a@example.com", "501"),
          ("RCPT FROM:<a@example.com>", "501"), RCPT]),
    Case("ehlo_helo_need_argument", [("EHLO", "501 5.5.4"), ("HELO", "501 5.5.4"), EHLO]),
    Case("unexpected_arguments",
         [EHLO, MAIL, RCPT, ("DATA now", "501 5.5.4"), ("RSET now", "501 5.5.4"), ("QUIT now", "501 5.5.4"),
          DATA, body(SMALL)],
         stats=dict(messages=1, recipients=1, bytes=len(SMALL))),
    Case("null_sender_and_postmaster",
         [EHLO, ("MAIL FROM:<>", "250"), ("RCPT TO:<postmaster>", "250"), ("RCPT TO:<Postmaster>", "250"),
          ("RCPT TO:<POSTMASTER@example.org>", "250"), DATA, body(SMALL)],
         stats=dict(messages=1, recipients=3, bytes=len(SMALL))),
    Case("address_forms",
         [EHLO, ('MAIL FROM:<"john doe"@example.com>', "250"),
          ('RCPT TO:<"a b"@example.com>', "250"),
          ('RCPT TO:<"quoted\\"quote"@example.com>', "250"),
          ("RCPT TO:<u@[192.0.2.1]>", "250"),
          ("RCPT TO:<u@[IPv6:2001:db8::1]>", "250"),
          ("RCPT TO:<@a.example,@b.example:u@c.example>", "250"),
          ("RCPT TO:<first.last+tag@sub.example.com>", "250"),
          DATA, body(SMALL)],
         stats=dict(messages=1, recipients=6, bytes=len(SMALL))),
    Case("path_limits",
         [EHLO, MAIL, ("RCPT TO:<%s@example.com>" % ("l" * 64), "250"),
          ("RCPT TO:<%s@example.com>" % ("l" * 65), "501|553 5.1"),
          ("RCPT TO:<u@%s.example>" % ("d" * 300), "501|553 5.1")]),
    Case("smtputf8",
         [EHLO, MAIL, ("RCPT TO:<j\u00fcrgen@example.com>", "5xx"), ("RSET", "250"),
          ("MAIL FROM:<sender@example.com> SMTPUTF8 BODY=8BITMIME", "250"),
          ("RCPT TO:<j\u00fcrgen@b\u00fccher.example>", "250"), DATA, body(UTF8)],
         stats=dict(messages=1, recipients=1, bytes=len(UTF8))),
    Case("dsn_parameters",
         [EHLO, ("MAIL FROM:<a@example.com> RET=HDRS ENVID=QQ314159", "250"),
          ("RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.com", "250"),
          ("RCPT TO:<c@example.com> NOTIFY=NEVER", "250"), DATA, body(SMALL)],
         stats=dict(messages=1, recipients=2, bytes=len(SMALL))),
    Case("size_param_default_limit",
         [EHLO, ("MAIL FROM:<a@example.com> SIZE=67108865", "552 5.3.4"),
          ("MAIL FROM:<a@example.com> SIZE=67108864", "250")]),
    Case("size_param_configured_limit",
         [EHLO, ("MAIL FROM:<a@example.com> SIZE=1001", "552 5.3.4"),
          ("MAIL FROM:<a@example.com> SIZE=99999999999999999999999999", "552|501"),
          ("MAIL FROM:<a@example.com> SIZE=1000", "250")], args=["--max-size", "1000"]),
    Case("real_size_over_limit",
         [EHLO, *TXN, body(b"Subject: big\r\n\r\n" + b"x" * 76 + b"\r\n" + b"y" * 998 + b"\r\n", "552 5.3.4"),
          *TXN, body(SMALL)],
         args=["--max-size", "1000"], stats=dict(messages=1, recipients=1, bytes=len(SMALL))),
    Case("real_size_exactly_at_limit",
         [EHLO, *TXN, body(b"s" * 998 + b"\r\n")],
         args=["--max-size", "1000"], stats=dict(messages=1, recipients=1, bytes=1000)),
    Case("too_many_recipients",
         [EHLO, MAIL] + [("RCPT TO:<r%d@example.com>" % i, "250") for i in range(5)]
         + [("RCPT TO:<r5@example.com>", "452 4.5.3"), ("RCPT TO:<r6@example.com>", "452 4.5.3"),
            DATA, body(SMALL)],
         args=["--max-recipients", "5"], stats=dict(messages=1, recipients=5, bytes=len(SMALL))),
    Case("command_line_limit",
         [EHLO, ("NOOP " + "a" * (2048 - 7), "250"),                 # 2048 octets with CRLF
          ("NOOP " + "a" * (2049 - 7), "500 5.5.2"),                 # 2049
          ("NOOP", "250"),
          ("MAIL FROM:<a@example.com> " + "X" * 3000, "500 5.5.2"),
          MAIL, RCPT, DATA, body(SMALL)],
         stats=dict(messages=1, recipients=1, bytes=len(SMALL))),
    Case("nul_in_command",
         [EHLO, (b"NOOP\x00\r\n", "500 5.5.2"), (b"MAIL FROM:<a\x00b@example.com>\r\n", "500 5.5.2"),
          (b"\x00\r\n", "500 5.5.2"), ("NOOP", "250"), MAIL, RCPT, DATA, body(SMALL)],
         stats=dict(messages=1, recipients=1, bytes=len(SMALL))),
    Case("dot_stuffing",
         [EHLO, *TXN, body(DOTS)], stats=dict(messages=1, recipients=1, bytes=stored(DOTS))),
    Case("empty_body", [EHLO, *TXN, (b".\r\n", "250")], stats=dict(messages=1, recipients=1, bytes=0)),
    Case("end_marker_split_across_writes",
         [EHLO, *TXN, (b"Subject: s\r\n\r\nbody\r", None), (b"\n.", NOREPLY), (b"\r", NOREPLY), (b"\n", "250")],
         stats=dict(messages=1, recipients=1, bytes=len(b"Subject: s\r\n\r\nbody\r\n"))),
    Case("lines_998_ok", [EHLO, *TXN, body(L998), *TXN, body(L998_STUFFED)],
         stats=dict(messages=2, recipients=2, bytes=stored(L998) + stored(L998_STUFFED))),
    Case("line_over_1000_rejected", [EHLO, *TXN, body(L1001, LONG_REJECT), *TXN, body(SMALL)],
         stats=dict(messages=1, recipients=1, bytes=len(SMALL))),
    Case("bare_lf_dot_lf_is_not_the_end",
         [EHLO, *TXN, (b"Subject: s\r\n\r\na\n.\nb\r\n", NOREPLY), (b".\r\n", "5xx"), ("NOOP", "250"),
          MAIL, RCPT]),
    Case("lf_dot_crlf_is_not_the_end",
         [EHLO, *TXN, (b"Subject: s\r\n\r\na\n.\r\n" + SMUGGLE, NOREPLY), (b".\r\n", "5xx"), (None, NOREPLY),
          ("NOOP", "250")]),
    Case("crlf_dot_lf_is_not_the_end",
         [EHLO, *TXN, (b"Subject: s\r\n\r\na\r\n.\n" + SMUGGLE, NOREPLY), (b".\r\n", "5xx"), (None, NOREPLY),
          ("NOOP", "250")]),
    Case("bare_lf_line_ends_rejected",
         [EHLO, *TXN, (b"Subject: s\n\nunix line ends\n\r\n", NOREPLY), (b".\r\n", "5xx"), ("NOOP", "250")]),
    Case("bare_cr_dot_cr_is_not_the_end",
         [EHLO, *TXN, (b"Subject: s\r\n\r\na\r.\r" + SMUGGLE, NOREPLY), (b".\r\n", "250|5xx"), (None, NOREPLY),
          ("NOOP", "250")],
         stats={}),
    Case("pipelined_group_answered_in_order",
         [EHLO, (b"NOOP\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nXYZZY\r\n"
                 b"RCPT TO:<c@example.com>\r\nVRFY u\r\nRSET\r\nRCPT TO:<d@example.com>\r\nNOOP\r\n",
                 ["250", "250", "250", "500 5.5.1", "250", "252", "250", "503 5.5.1", "250"])]),
    Case("pipelined_data_and_body_in_one_write",
         [EHLO, (b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n" + SMALL
                 + b".\r\nNOOP\r\nQUIT\r\n", ["250", "250", "354", "250", "250", "221"]), (None, CLOSED)],
         stats=dict(messages=1, recipients=1, bytes=len(SMALL))),
    Case("rset_mid_transaction",
         [EHLO, MAIL, ("RCPT TO:<dropped@example.com>", "250"), ("RSET", "250"),
          ("RCPT TO:<x@example.com>", "503 5.5.1"), MAIL, RCPT, DATA, body(SMALL)],
         stats=dict(messages=1, recipients=1, bytes=len(SMALL))),
    Case("transaction_resets_after_message",
         [EHLO, *TXN, body(SMALL), ("RCPT TO:<x@example.com>", "503 5.5.1"), ("DATA", "503|554")],
         stats=dict(messages=1, recipients=1, bytes=len(SMALL))),
    Case("bdat_simple_and_zero_last",
         [EHLO, MAIL, RCPT, (b"BDAT 5\r\nhello", "250"), (b"BDAT 0 LAST\r\n", "250"),
          MAIL, RCPT, (b"BDAT 3 LAST\r\nabc", "250")],
         stats=dict(messages=2, recipients=2, bytes=8)),
    Case("bdat_then_data_is_503",
         [EHLO, MAIL, RCPT, (b"BDAT 5\r\nhello", "250"), ("DATA", "503"), (b"BDAT 0 LAST\r\n", "250|503|554"),
          ("NOOP", "250")], stats={}),
    Case("bdat_without_mail_is_skipped",
         [EHLO, (b"BDAT 10 LAST\r\nQUIT\r\nXXXX", "503"), (None, NOREPLY), ("NOOP", "250")]),
    Case("bdat_without_rcpt_is_skipped",
         [EHLO, MAIL, (b"BDAT 6\r\nRSET\r\n", "503|554"), (None, NOREPLY), ("NOOP", "250")]),
    Case("bdat_bad_arguments",
         [EHLO, MAIL, RCPT, ("BDAT", "501"), ("BDAT abc", "501"), ("BDAT 5 NOTLAST", "501"), ("NOOP", "250")]),
    Case("bdat_over_max_size",
         [EHLO, MAIL, RCPT, (b"BDAT 60\r\n" + b"a" * 60, "250"),
          (b"BDAT 60 LAST\r\nQUIT\r\n" + b"b" * 54, "552 5.3.4"), ("NOOP", "250"),
          MAIL, RCPT, (b"BDAT 3 LAST\r\nabc", "250")],
         args=["--max-size", "100"], stats=dict(messages=1, recipients=1, bytes=3)),
    Case("fail_rcpt_451",
         [EHLO, MAIL, ("RCPT TO:<a@example.com>", "451 4.3.0"), ("RCPT TO:<b@example.com>", "451 4.3.0"),
          ("DATA", "503|554")],
         args=["--fail", "RCPT:451:100"], stats=dict(messages=0, recipients=0, injected_failures=2)),
    Case("fail_mail_550",
         [EHLO, ("MAIL FROM:<a@example.com>", "550 5"), ("RCPT TO:<b@example.com>", "503 5.5.1")],
         args=["--fail", "MAIL:550:100"], stats=dict(messages=0, injected_failures=1)),
    Case("fail_data_451",
         [EHLO, MAIL, RCPT, ("DATA", "451 4"), ("NOOP", "250")],
         args=["--fail", "DATA:451:100"], stats=dict(messages=0, injected_failures=1)),
    Case("fail_eom_554",
         [EHLO, *TXN, body(SMALL, "554 5"), *TXN, body(SMALL, "554 5")],
         args=["--fail", "EOM:554:100"], stats=dict(messages=0, recipients=0, bytes=0, injected_failures=2)),
    Case("fail_eom_for_bdat",
         [EHLO, MAIL, RCPT, (b"BDAT 3 LAST\r\nabc", "451 4")],
         args=["--fail", "EOM:451:100"], stats=dict(messages=0, bytes=0, injected_failures=1)),
    Case("fail_ehlo",
         [("EHLO client.example", "550 5"), ("NOOP", "250")],
         args=["--fail", "EHLO:550:100"], stats=dict(messages=0, injected_failures=1)),
    Case("fail_percent_zero",
         [EHLO, *TXN, body(SMALL)],
         args=["--fail", "RCPT:451:0", "--fail", "MAIL:550:0"],
         stats=dict(messages=1, recipients=1, bytes=len(SMALL), injected_failures=0)),
    Case("fail_several_commands",
         [EHLO, ("MAIL FROM:<a@example.com>", "451 4"), ("MAIL FROM:<a@example.com>", "451 4")],
         args=["--fail", "MAIL:451:100", "--fail", "RCPT:550:100"], stats=dict(messages=0, injected_failures=2)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_dialogue(sink, dialogue, case):
    s = sink(*case.args)
    d = dialogue(s, greeting=case.greeting)
    d.run(case.steps)
    d.close()
    st = s.stop()
    want = dict(case.stats)
    if want:
        want.setdefault("connections", s.conns(1))
    try:
        assert_stats(st, **want)
    except AssertionError as e:
        raise AssertionError("%s\n%s" % (e, d.dump()))


# ------------------------------------------------------------------ greeting and EHLO


def test_greeting_and_ehlo_capabilities(sink, dialogue):
    s = sink("--hostname", "mx.test.example")
    d = dialogue(s)
    assert d.greeting.text.startswith("mx.test.example ESMTP"), d.greeting
    r = d.cmd("EHLO client.example", "250")
    assert len(r.lines) > 1, r
    assert r.lines[0].split()[0] == "mx.test.example", r
    kw = r.keywords
    for ext in ("PIPELINING", "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES", "CHUNKING", "SMTPUTF8", "DSN"):
        assert ext in kw, "EHLO lacks %s: %r" % (ext, r)
    size = [ln for ln in r.lines[1:] if ln.upper().startswith("SIZE")]
    assert size and size[0].split()[1:] == ["67108864"], "SIZE should advertise 64 MiB: %r" % (size,)
    assert "STARTTLS" not in kw, "the sink has no TLS but advertises STARTTLS: %r" % (r,)


def test_ehlo_size_follows_max_size(sink, dialogue):
    s = sink("--max-size", "12345")
    d = dialogue(s)
    r = d.cmd("EHLO client.example", "250")
    size = [ln for ln in r.lines[1:] if ln.upper().startswith("SIZE")]
    assert size and size[0].split()[1:] == ["12345"], r


def test_helo_has_no_extensions(sink, dialogue):
    s = sink()
    d = dialogue(s)
    r = d.cmd("HELO client.example", "250")
    assert len(r.lines) == 1, "HELO reply must be a single line: %r" % (r,)


def test_enhanced_codes_on_every_reply(sink, dialogue):
    """ENHANCEDSTATUSCODES: every 2xx/4xx/5xx reply after EHLO carries a
    class.subject.detail code of the same class (RFC 2034 §3)."""
    s = sink("--max-recipients", "1")
    d = dialogue(s)
    d.cmd("EHLO client.example", "250")
    cmds = ["NOOP", "VRFY x", "XYZZY", "RCPT TO:<a@example.com>", "MAIL FROM:<a@example.com>",
            "MAIL FROM:<a@example.com>", "RCPT TO:<a@example.com>", "RCPT TO:<b@example.com>",
            "RCPT TO:<", "DATA"]
    replies = [d.cmd(c) for c in cmds]
    d.send(b"x\r\n.\r\n")
    replies.append(d.read_reply())
    replies.append(d.cmd("RSET"))
    replies.append(d.cmd("QUIT"))
    for c, r in zip(cmds + [".", "RSET", "QUIT"], replies):
        if r.code // 100 == 3:
            continue
        e = r.enhanced
        assert e is not None and int(e[0]) == r.code // 100, "reply to %s lacks a matching enhanced code: %r\n%s" % (
            c, r, d.dump())


# ------------------------------------------------------------------ error limit


def test_error_limit_421_and_close(sink, dialogue):
    s = sink()
    d = dialogue(s)
    d.cmd("EHLO client.example", "250")
    n500 = 0
    final = None
    for i in range(30):
        try:
            d.send("XYZZY %d" % i)
            r = d.read_reply()
        except phtest.ConnectionClosed:
            break
        if r.code == 500:
            n500 += 1
            continue
        final = r
        break
    assert final is not None and phtest.reply_matches(final, "421 4.7.0"), (
        "expected 421 4.7.0 after about 20 errors, got %r after %d x 500\n%s" % (final, n500, d.dump()))
    assert 19 <= n500 <= 20, "the default error limit is 20; got %d errors before 421\n%s" % (n500, d.dump())
    d.expect_closed(15)
    st = s.stop()
    assert_stats(st, messages=0, connections=s.conns(1))


# ------------------------------------------------------------------ injection: randomness and delays


def test_fail_percentage_is_counted(sink, dialogue):
    s = sink("--fail", "RCPT:451:50")
    d = dialogue(s)
    d.cmd("EHLO client.example", "250")
    n = 200
    d.send(b"MAIL FROM:<a@example.com>\r\n" + b"".join(b"RCPT TO:<r%d@example.com>\r\n" % i for i in range(n)))
    d.expect("250")
    codes = [d.read_reply().code for _ in range(n)]
    bad = [c for c in codes if c not in (250, 451)]
    assert not bad, d.dump()
    ok, failed = codes.count(250), codes.count(451)
    assert 0 < failed < n, "RCPT:451:50 over %d RCPTs gave %d failures" % (n, failed)
    d.cmd("DATA", "354")
    d.send(SMALL + b".\r\n")
    d.expect("250")
    st = s.stop()
    assert_stats(st, messages=1, recipients=ok, injected_failures=failed, bytes=len(SMALL))


def test_delay_eom_and_rcpt(sink, dialogue):
    s = sink("--delay", "EOM:1000", "--delay", "RCPT:300")
    d = dialogue(s)
    d.cmd("EHLO client.example", "250")
    d.cmd("MAIL FROM:<a@example.com>", "250")
    for i in range(3):
        t0 = time.monotonic()
        d.cmd("RCPT TO:<r%d@example.com>" % i, "250")
        dt = time.monotonic() - t0
        assert dt >= 0.28, "RCPT reply after %.3f s despite --delay RCPT:300" % dt
    d.cmd("DATA", "354")
    t0 = time.monotonic()
    d.send(SMALL + b".\r\n")
    d.expect("250")
    dt = time.monotonic() - t0
    assert dt >= 0.95, "final reply after %.3f s despite --delay EOM:1000" % dt
    st = s.stop()
    assert_stats(st, messages=1, recipients=3, injected_delays=4, injected_failures=0)


def test_delay_connect(sink, dialogue):
    s = sink("--delay", "CONNECT:700")
    t0 = time.monotonic()
    d = dialogue(s)
    dt = time.monotonic() - t0
    assert dt >= 0.65, "greeting after %.3f s despite --delay CONNECT:700" % dt
    d.cmd("QUIT", "221")
    st = s.stop()
    assert_stats(st, injected_delays=s.conns(1), connections=s.conns(1))


def test_fail_connect_421(sink, dialogue):
    s = sink("--fail", "CONNECT:421:100")
    d = dialogue(s, greeting="421 4")
    d.expect_closed(15)
    st = s.stop()
    assert_stats(st, injected_failures=s.conns(1), connections=s.conns(1), messages=0)


# ------------------------------------------------------------------ timeouts


def test_idle_timeout_421(sink, dialogue):
    s = sink("--timeout", "2")
    d = dialogue(s)
    d.cmd("EHLO client.example", "250")
    t0 = time.monotonic()
    r = d.read_reply(timeout=20)
    dt = time.monotonic() - t0
    assert phtest.reply_matches(r, "421 4.4.2"), "%r\n%s" % (r, d.dump())
    assert dt >= 1.5, "closed after %.2f s with --timeout 2" % dt
    d.expect_closed(10)
    st = s.stop()
    assert_stats(st, messages=0, connections=s.conns(1))


def test_idle_timeout_in_data(sink, dialogue):
    s = sink("--timeout", "2")
    d = dialogue(s)
    d.run([EHLO, *TXN, (b"Subject: never finished\r\n\r\npartial", None)])
    r = d.read_reply(timeout=20)
    assert phtest.reply_matches(r, "421 4.4.2"), "%r\n%s" % (r, d.dump())
    d.expect_closed(10)
    st = s.stop()
    assert_stats(st, messages=0, recipients=0, bytes=0, connections=s.conns(1))


def test_activity_defers_timeout(sink, dialogue):
    s = sink("--timeout", "4")
    d = dialogue(s)
    d.cmd("EHLO client.example", "250")
    deadline = time.monotonic() + 6.0
    for _ in range(100):
        if time.monotonic() > deadline:
            break
        d.cmd("NOOP", "250")
        time.sleep(0.5)
    d.run([MAIL, RCPT, DATA, body(SMALL), ("QUIT", "221")])
    st = s.stop()
    assert_stats(st, messages=1)


# ------------------------------------------------------------------ shutdown


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_421_to_open_sessions_and_stats(sink, dialogue, sig):
    s = sink()
    d1 = dialogue(s, name="idle after EHLO")
    d1.cmd("EHLO one.example", "250")
    d2 = dialogue(s, name="mid-DATA")
    d2.run([EHLO, *TXN, (b"Subject: cut\r\n\r\nhalf a message", None)])
    d3 = dialogue(s, name="done")
    d3.run([EHLO, *TXN, body(SMALL)])
    s.send_signal(sig)
    for d in (d1, d2, d3):
        r = d.read_reply(timeout=20)
        assert phtest.reply_matches(r, "421 4"), "expected 421 on shutdown, got %r\n%s" % (r, d.dump())
        d.expect_closed(15)
    st = s.stop(sig)
    assert s.returncode == 0, "sink exit status after signal %d: %s; stderr:\n%s" % (sig, s.returncode,
                                                                                   s.stderr_text())
    assert_stats(st, messages=1, recipients=1, bytes=len(SMALL), connections=s.conns(3))


def test_listener_closed_after_shutdown(sink):
    s = sink()
    s.stop()
    with pytest.raises(OSError):
        socket.create_connection((s.host, s.port), timeout=2).close()


def test_injected_421_closes_and_discards_the_pipelined_rest(sink):
    """A 421 means the server closes the channel: the commands pipelined behind it
    are not processed (no message may be accepted after it)."""
    import socket
    s = sink("--fail", "RCPT:421:100")
    c = socket.create_connection((s.host, s.port), timeout=30)
    c.settimeout(30)
    got = c.recv(4096)
    assert got.startswith(b"220 ")
    c.sendall(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
              b"BDAT 5 LAST\r\nhelloMAIL FROM:<a@example.com>\r\nQUIT\r\n")
    data = b""
    for _ in range(100):
        chunk = c.recv(4096)
        if not chunk:
            break
        data += chunk
    c.close()
    lines = data.split(b"\r\n")
    assert any(l.startswith(b"421 ") for l in lines), data
    after = lines[[i for i, l in enumerate(lines) if l.startswith(b"421 ")][0] + 1:]
    assert all(l == b"" for l in after), "replies after the 421: %r" % data
    st = s.stop()
    assert st["messages"] == 0
