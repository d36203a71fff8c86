"""Real clients through `posthaste-bench sink`, with exact accounting of what was sent.

Sink stats: messages = accepted with a final 250, recipients = accepted recipients of those,
bytes = body octets after dot-unstuffing, connections = accepted TCP connections
(the fixture's readiness probe is one of them: sink.conns(n)).
"""
import os
import random
import smtplib
import ssl
import subprocess
import threading

import pytest

import phtest
from phtest import assert_stats


# ------------------------------------------------------------------ smtplib


def test_smtplib_several_messages_per_session(sink):
    s = sink()
    msgs = [
        # (sender, recipients, message, mail_options)
        ("a@example.com", ["r1@example.com"],
         "Subject: one\n\nHello\n.leading dot\n..two dots\n.\nno newline at end", []),
        ("", ["r1@example.com", "r2@example.com", "postmaster"],
         "Subject: two\r\n\r\nline one\rline two\r\n\r\n", []),
        ("b@example.org", ["r3@example.net", "r4@example.net"],
         b"Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\n\r\ncaf\xc3\xa9 cr\xc3\xa8me\r\n", ["BODY=8BITMIME"]),
        ("c@example.com", ["r5@example.com"],
         "Subject: big\r\n\r\n" + "".join("%06d %s\r\n" % (i, "x" * 68) for i in range(14000)), []),
        ("d@example.com", ["r6@example.com"], "Subject: empty body\r\n\r\n", []),
    ]
    want_m = want_r = want_b = 0
    with smtplib.SMTP(s.host, s.port, timeout=60) as c:
        code, _ = c.ehlo("client.example")
        assert code == 250
        for frm, to, msg, opts in msgs:
            refused = c.sendmail(frm, to, msg, mail_options=opts)
            assert refused == {}
            want_m += 1
            want_r += len(to)
            want_b += len(phtest.smtplib_body(msg))
        # a second session-level RSET between transactions is harmless
        assert c.rset()[0] == 250
        c.sendmail("e@example.com", ["r7@example.com"], "Subject: after rset\r\n\r\nok\r\n")
        want_m, want_r, want_b = want_m + 1, want_r + 1, want_b + len(b"Subject: after rset\r\n\r\nok\r\n")
    st = s.stop()
    assert_stats(st, messages=want_m, recipients=want_r, bytes=want_b, connections=s.conns(1),
                 injected_failures=0, injected_delays=0)


def test_smtplib_several_sessions_helo_and_ehlo(sink):
    s = sink()
    want_b = 0
    for i in range(5):
        with smtplib.SMTP(s.host, s.port, timeout=60) as c:
            if i % 2:
                assert c.helo("old.example")[0] == 250
            else:
                assert c.ehlo("new.example")[0] == 250
            for j in range(3):
                msg = "Subject: s%d m%d\r\n\r\n%s\r\n" % (i, j, "." * (j + 1))
                assert c.sendmail("s@example.com", ["r@example.com", "q@example.com"], msg) == {}
                want_b += len(phtest.smtplib_body(msg))
    st = s.stop()
    assert_stats(st, messages=15, recipients=30, bytes=want_b, connections=s.conns(5))


def test_smtplib_ipv6_listener(sink):
    try:
        phtest.free_port("::1")
    except OSError:
        pytest.skip("no ::1 in this network namespace")
    s = sink(host="::1")
    m, r, b = phtest.smtplib_send("::1", s.port, n=3)
    st = s.stop()
    assert_stats(st, messages=m, recipients=r, bytes=b, connections=s.conns(1))


def test_smtplib_concurrent_sessions_with_workers(sink):
    s = sink("--workers", "2")
    results, errors = [], []

    def client(k):
        try:
            results.append(phtest.smtplib_send(s.host, s.port, n=25, rcpts=("a%d@example.com" % k, "b@example.com")))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    ts = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors, errors
    assert len(results) == 4
    st = s.stop()
    assert_stats(st, messages=sum(r[0] for r in results), recipients=sum(r[1] for r in results),
                 bytes=sum(r[2] for r in results), connections=s.conns(4))


# ------------------------------------------------------------------ raw pipelining and BDAT


def test_pipelined_transaction_raw(sink, dialogue):
    s = sink()
    d = dialogue(s)
    ehlo = d.cmd("EHLO pipe.example", "250")
    assert "PIPELINING" in ehlo.keywords, ehlo
    d.send(b"MAIL FROM:<p@example.com>\r\nRCPT TO:<r1@example.com>\r\nRCPT TO:<r2@example.com>\r\nDATA\r\n")
    d.run([(None, ["250", "250", "250", "354"])])
    wire = b"Subject: pipelined\r\n\r\n..stuffed\r\nbody\r\n"
    d.send(wire + b".\r\n")
    d.expect("250")
    # a second pipelined transaction including the QUIT
    d.send(b"MAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\n")
    d.run([(None, ["250", "250", "354"])])
    d.send(b"x\r\n.\r\nQUIT\r\n")
    d.run([(None, ["250", "221"]), (None, phtest.CLOSED)])
    st = s.stop()
    assert_stats(st, messages=2, recipients=3, bytes=len(phtest.dot_unstuff(wire)) + 3, connections=s.conns(1))


def test_bdat_chunks_raw(sink, dialogue):
    s = sink()
    d = dialogue(s)
    ehlo = d.cmd("EHLO chunky.example", "250")
    assert "CHUNKING" in ehlo.keywords, ehlo
    chunks = [
        b"Subject: bdat\r\n\r\nfirst part\r\n.\r\n",      # "\r\n.\r\n" must not end anything
        b"..not unstuffed\r\n.\r\nQUIT\r\n",               # nor must a QUIT inside a chunk run
        b"\x00binary\xff\r\n.\r\n" + b"y" * 70000 + b"\r\n",
        b"z",                                               # one octet
    ]
    d.cmd("MAIL FROM:<b@example.com>", "250")
    d.cmd("RCPT TO:<r@example.com>", "250")
    for c in chunks:
        d.send(b"BDAT %d\r\n" % len(c) + c)
        d.expect("250")
    d.send(b"BDAT 0 LAST\r\n")
    d.expect("250")
    total = sum(len(c) for c in chunks)

    # the same chunks pipelined in one write, the last one with LAST, then a NOOP that
    # proves the chunk sizes were honoured exactly
    payload = b"MAIL FROM:<b@example.com>\r\nRCPT TO:<r1@example.com>\r\nRCPT TO:<r2@example.com>\r\n"
    for i, c in enumerate(chunks):
        payload += b"BDAT %d%s\r\n" % (len(c), b" LAST" if i == len(chunks) - 1 else b"") + c
    payload += b"NOOP\r\n"
    d.send(payload)
    d.run([(None, ["250", "250", "250"] + ["250"] * len(chunks) + ["250"])])
    d.cmd("QUIT", "221")
    st = s.stop()
    assert_stats(st, messages=2, recipients=3, bytes=2 * total, connections=s.conns(1))


# ------------------------------------------------------------------ swaks


def _swaks_body_octets(transcript):
    """Body octets as sent by swaks, from its ' -> ' transcript after the 354."""
    n, in_data = 0, False
    for ln in transcript.split("\n"):
        if ln.startswith("<-  354") or ln.startswith("<** 354"):
            in_data = True
            continue
        if in_data and ln.startswith(" -> "):
            x = ln[4:].rstrip("\r")
            if x == ".":
                in_data = False
                continue
            if x.startswith("."):
                x = x[1:]
            n += len(x.encode("utf-8", "surrogateescape")) + 2
    return n


def test_swaks(sink, procs, tool, tmp_path):
    swaks = tool("swaks")
    s = sink()
    att = tmp_path / "attachment.bin"
    att.write_bytes(random.Random(7).randbytes(5000))
    data = tmp_path / "data.eml"
    data.write_bytes(b"Subject: from a file\r\nX-Dots: yes\r\n\r\n.leading\r\n..two\r\n.\r\nend\r\n")
    base = [swaks, "--server", s.addr, "--from", "swaks@example.com", "--helo", "swaks.example",
            "--timeout", "60"]
    runs = [
        ["--to", "a@example.com"],
        ["--to", "a@example.com,b@example.com", "--pipeline"],
        ["--to", "a@example.com", "--attach", str(att), "--body", "see attached"],
        ["--to", "a@example.com,b@example.com,c@example.com", "--pipeline", "--attach", str(att),
         "--header", "X-Test: swaks"],
        ["--to", "postmaster", "--data", str(data)],
        ["--to", "a@example.com", "--from", "<>", "--body", "null sender\n.dot line\n"],
    ]
    want_r = want_b = 0
    for r in runs:
        rc, out, err = procs.run(base + r, timeout=60)
        assert rc == 0, "swaks %s failed (%d):\n%s\n%s" % (r, rc, out[-3000:], err[-2000:])
        want_r += len(r[r.index("--to") + 1].split(","))
        b = _swaks_body_octets(out)
        assert b > 0, out
        want_b += b
    st = s.stop()
    assert_stats(st, messages=len(runs), recipients=want_r, bytes=want_b, connections=s.conns(len(runs)))


# ------------------------------------------------------------------ curl


def test_curl_upload(sink, procs, tool, tmp_path):
    curl = tool("curl")
    s = sink()
    files = [
        b"From: curl@example.com\r\nTo: a@example.com\r\nSubject: curl\r\n\r\nhello\r\n.dot\r\n..dots\r\n",
        b"Subject: curl 2\r\n\r\n" + b"".join(b"line %05d %s\r\n" % (i, b"q" * 60) for i in range(3000)),
    ]
    want_b = 0
    for i, content in enumerate(files):
        f = tmp_path / ("m%d.eml" % i)
        f.write_bytes(content)
        rc, out, err = procs.run([curl, "-sS", "--max-time", "60", "smtp://%s" % s.addr,
                                  "--mail-from", "curl@example.com", "--mail-rcpt", "a@example.com",
                                  "--mail-rcpt", "b@example.com", "--upload-file", str(f)], timeout=90)
        assert rc == 0, "curl failed (%d): %s %s" % (rc, out, err)
        want_b += len(content)  # ends with CRLF: curl sends just ".CRLF" after it
    st = s.stop()
    assert_stats(st, messages=2, recipients=4, bytes=want_b, connections=s.conns(2))


# ------------------------------------------------------------------ Postfix smtp-source


def test_postfix_smtp_source(sink, procs, tool):
    src = tool("smtp-source")
    s = sink()
    rc, out, err = procs.run([src, "-m", "500", "-s", "5", "-l", "1024", "-f", "src@example.com",
                              "-t", "dst@example.com", "-M", "source.example", s.addr], timeout=180)
    assert rc == 0, "smtp-source failed (%d): %s %s" % (rc, out[-2000:], err[-2000:])
    st = s.stop()
    # smtp-source adds From/To/Date/Message-Id headers of varying length; the payload is 1024 octets.
    assert_stats(st, messages=500, recipients=500, connections=s.conns(500))
    assert 500 * 1024 <= st["bytes"] <= 500 * (1024 + 400), st


def test_postfix_smtp_source_one_session_many_recipients(sink, procs, tool):
    src = tool("smtp-source")
    s = sink()
    rc, out, err = procs.run([src, "-d", "-m", "100", "-s", "2", "-r", "7", "-l", "300",
                              "-f", "src@example.com", "-t", "dst@example.com", "-M", "source.example",
                              s.addr], timeout=180)
    assert rc == 0, "smtp-source failed (%d): %s %s" % (rc, out[-2000:], err[-2000:])
    st = s.stop()
    assert_stats(st, messages=100, recipients=700)


# ------------------------------------------------------------------ posthaste-bench send


def _send(procs, bench, server, *args, timeout=120):
    rc, out, err = procs.run([bench, "send", "--server", server] + [str(a) for a in args] + ["--json"],
                             timeout=timeout)
    return rc, phtest.parse_send_json(rc, out, err), err


def _check_latency(js):
    lat = js["latency_ms"]
    vals = [lat[k] for k in phtest.LATENCY_KEYS]
    assert all(isinstance(v, (int, float)) and v >= 0 for v in vals), lat
    assert vals == sorted(vals), "latency percentiles not monotonic: %r" % (lat,)


@pytest.mark.parametrize("mode", [[], ["--pipelining"], ["--no-pipelining"], ["--bdat"],
                                  ["--bdat", "--no-pipelining"]],
                         ids=["default", "pipelining", "no-pipelining", "bdat", "bdat-no-pipelining"])
def test_bench_send_exact_counts(sink, procs, bench, mode):
    s = sink()
    rc, js, err = _send(procs, bench, s.addr, "--connections", 10, "--messages", 2000, "--size", 1024,
                        "--recipients", 2, *mode)
    assert rc == 0, "send exited %d: %s" % (rc, err[-2000:])
    st = s.stop()
    want = dict(sent=2000, accepted=2000, rejected_temp=0, rejected_perm=0, recipients_accepted=4000,
                recipients_rejected=0, connections=10, connect_errors=0)
    bad = {k: (v, js[k]) for k, v in want.items() if js[k] != v}
    assert not bad, "send report differs (expected, got): %r\n%r" % (bad, js)
    _check_latency(js)
    assert js["elapsed_s"] > 0 and js["msgs_per_s"] > 0, js
    assert_stats(st, messages=2000, recipients=4000, connections=s.conns(10), injected_failures=0)
    # --size is the message size: the sink counts exactly that many body octets per message
    assert st["bytes"] == 2000 * 1024, "sink bytes %d != 2000 * --size 1024 (send reported bytes=%r)" % (
        st["bytes"], js["bytes"])


def test_bench_send_workers_and_large_messages(sink, procs, bench):
    s = sink("--workers", 2)
    rc, js, err = _send(procs, bench, s.addr, "--connections", 6, "--messages", 300, "--size", 100000,
                        "--workers", 2)
    assert rc == 0, err[-2000:]
    st = s.stop()
    assert js["sent"] == 300 and js["accepted"] == 300, js
    assert_stats(st, messages=300, connections=s.conns(6), bytes=300 * 100000)
    assert st["recipients"] == js["recipients_accepted"], (st, js)


def test_bench_send_duration(sink, procs, bench):
    s = sink()
    rc, js, err = _send(procs, bench, s.addr, "--connections", 4, "--duration", 2, "--size", 512, timeout=60)
    assert rc == 0, err[-2000:]
    st = s.stop()
    assert js["sent"] >= 1 and js["accepted"] == js["sent"], js
    assert_stats(st, messages=js["accepted"], recipients=js["recipients_accepted"], connections=s.conns(4))


def test_bench_send_rate_is_an_upper_bound(sink, procs, bench):
    s = sink()
    rc, js, err = _send(procs, bench, s.addr, "--connections", 2, "--duration", 2, "--rate", 50,
                        "--size", 256, timeout=60)
    assert rc == 0, err[-2000:]
    st = s.stop()
    # 50/s for 2 s: allow generous slack for bursts, but not an unlimited rate
    assert 1 <= js["sent"] <= 2 * 50 * 2 + 10, js
    assert_stats(st, messages=js["accepted"])


@pytest.mark.parametrize("mode", [[], ["--no-pipelining"]], ids=["pipelining", "no-pipelining"])
def test_bench_send_against_permanent_failures(sink, procs, bench, mode):
    s = sink("--fail", "MAIL:550:100")
    rc, js, err = _send(procs, bench, s.addr, "--connections", 4, "--messages", 200, "--size", 300, *mode)
    st = s.stop()
    assert rc == 1, "send must exit 1 when messages failed, got %d" % rc
    assert js["sent"] == 200 and js["accepted"] == 0 and js["rejected_perm"] == 200 \
        and js["rejected_temp"] == 0, js
    assert_stats(st, messages=0, recipients=0, bytes=0, injected_failures=200)


def test_bench_send_against_random_eom_failures(sink, procs, bench):
    s = sink("--fail", "EOM:451:50")
    rc, js, err = _send(procs, bench, s.addr, "--connections", 4, "--messages", 400, "--size", 300)
    st = s.stop()
    assert js["sent"] == 400, js
    assert js["accepted"] + js["rejected_temp"] == 400 and js["rejected_perm"] == 0, js
    assert 0 < js["accepted"] < 400, "50%% failures should give a mix: %r" % (js,)
    assert_stats(st, messages=js["accepted"], injected_failures=js["rejected_temp"],
                 bytes=js["accepted"] * 300)


def test_bench_send_against_random_rcpt_failures(sink, procs, bench):
    s = sink("--fail", "RCPT:451:50")
    rc, js, err = _send(procs, bench, s.addr, "--connections", 3, "--messages", 300, "--size", 300,
                        "--recipients", 4)
    st = s.stop()
    assert js["sent"] == 300, js
    assert js["recipients_accepted"] + js["recipients_rejected"] == 1200, js
    assert 0 < js["recipients_rejected"] < 1200, js
    assert_stats(st, messages=js["accepted"], recipients=js["recipients_accepted"],
                 injected_failures=js["recipients_rejected"])


def test_bench_send_connection_refused_terminates(procs, bench):
    port = phtest.free_port()
    rc, out, err = procs.run([bench, "send", "--server", "127.0.0.1:%d" % port, "--connections", "2",
                              "--messages", "10", "--size", "100", "--json"], timeout=60)
    js = phtest.parse_send_json(rc, out, err)
    assert js["accepted"] == 0 and js["connect_errors"] >= 1, js


@pytest.mark.parametrize("mode", [[], ["--no-pipelining"]], ids=["pipelining", "no-pipelining"])
def test_bench_send_against_postfix_smtp_sink(procs, bench, tool, tmp_path, mode):
    smtp_sink = tool("smtp-sink")
    port = phtest.free_port()
    args = [smtp_sink]
    if os.geteuid() == 0:
        args += ["-u", "nobody"]
    p = procs.spawn(args + ["127.0.0.1:%d" % port, "1024"], stdout=open(tmp_path / "smtp-sink.out", "wb"),
                    stderr=open(tmp_path / "smtp-sink.err", "wb"))
    phtest.wait_connectable("127.0.0.1", port, proc=p, what="postfix smtp-sink").close()
    rc, js, err = _send(procs, bench, "127.0.0.1:%d" % port, "--connections", 4, "--messages", 500,
                        "--size", 2048, "--recipients", 3, *mode)
    assert rc == 0, err[-2000:]
    assert js["sent"] == 500 and js["accepted"] == 500 and js["rejected_temp"] == 0 \
        and js["rejected_perm"] == 0 and js["recipients_accepted"] == 1500, js
    _check_latency(js)


def test_bench_send_over_ipv6(sink, procs, bench):
    try:
        phtest.free_port("::1")
    except OSError:
        pytest.skip("no ::1 in this network namespace")
    s = sink(host="::1")
    rc, js, err = _send(procs, bench, s.addr, "--connections", 3, "--messages", 300, "--size", 2000)
    assert rc == 0, err[-2000:]
    st = s.stop()
    assert js["sent"] == 300 and js["accepted"] == 300, js
    assert_stats(st, messages=300, recipients=300, bytes=300 * 2000, connections=s.conns(3))


# ------------------------------------------------------------------ implicit TLS (sink --tls-implicit)


def _cert(tmp_path):
    """A self-signed P-256 certificate made by `openssl req`; returns (cert, key)."""
    cert, key = str(tmp_path / "sink-cert.pem"), str(tmp_path / "sink-key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    return cert, key


@pytest.fixture
def tls_sink(bench, tmp_path):
    """A sink with --tls CERT KEY --tls-implicit. Its readiness check is a bare
    connect that is closed at once: a connection whose handshake never
    finished reaches no protocol callback, so it is not in `connections`."""
    cert, key = _cert(tmp_path)
    s = phtest.Sink(bench, ["--tls", cert, key, "--tls-implicit", "--workers", "1"], tmp_path, ready=False)
    try:
        phtest.wait_connectable(s.host, s.port, proc=s.proc, what="posthaste-bench sink --tls-implicit").close()
        yield s
    finally:
        s.kill()


def _tls_client_ctx():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # self-signed: not what is tested here
    return ctx


def test_implicit_tls_sink_smtplib_ssl(tls_sink):
    s = tls_sink
    msg = "Subject: over implicit TLS\r\n\r\nhello\r\n"
    with smtplib.SMTP_SSL(s.host, s.port, context=_tls_client_ctx(), timeout=30) as c:
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
        code, text = c.ehlo("client.example")
        assert code == 250
        assert b"STARTTLS" not in text.upper(), "STARTTLS offered inside TLS: %r" % text
        for _ in range(2):
            assert c.sendmail("a@example.com", ["r@example.com"], msg) == {}
    st = s.stop()
    assert_stats(st, messages=2, recipients=2, bytes=2 * len(phtest.smtplib_body(msg)), connections=1)


def test_implicit_tls_sink_openssl_s_client(tls_sink, tool):
    s = tls_sink
    p = subprocess.run([tool("openssl"), "s_client", "-connect", s.addr, "-quiet", "-crlf"],
                       input=b"EHLO client.example\nQUIT\n", stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=30)
    out = p.stdout.decode(errors="replace")
    assert out.startswith("220 "), (out, p.stderr[-1000:])
    assert "250-" in out and "221 " in out, out
    assert_stats(s.stop(), messages=0, connections=1)


def test_implicit_tls_sink_refuses_plaintext(tls_sink):
    s = tls_sink
    c = phtest.connect(s.host, s.port, timeout=10)
    try:
        c.sendall(b"EHLO client.example\r\n")  # not a ClientHello: the handshake fails
        got = phtest.read_greeting(c, timeout=10)
    except OSError:
        got = b""
    finally:
        c.close()
    assert not got.startswith(b"220"), got
    assert_stats(s.stop(), messages=0, connections=0)


def test_implicit_tls_sink_bench_send(tls_sink, procs, bench):
    s = tls_sink
    rc, js, err = _send(procs, bench, s.addr, "--tls", "implicit", "--connections", 5, "--messages", 500,
                        "--size", 1024, "--workers", 1)
    assert rc == 0, err[-2000:]
    assert js["accepted"] == 500 and js["tls_handshakes"] == 5, js
    # a connection per message, sessions resumed: each a handshake, all but the first few resumed
    rc, js2, err = _send(procs, bench, s.addr, "--tls", "implicit", "--connections", 2, "--messages", 40,
                         "--size", 1024, "--workers", 1, "--messages-per-connection", 1, "--tls-reuse")
    assert rc == 0, err[-2000:]
    assert js2["accepted"] == 40 and js2["tls_handshakes"] >= 40 and js2["tls_resumed"] >= 30, js2
    st = s.stop()
    assert_stats(st, messages=540, recipients=540, bytes=540 * 1024,
                 connections=js["connections"] + js2["connections"])


def test_implicit_tls_sink_needs_a_certificate(procs, bench):
    rc, out, err = procs.run([bench, "sink", "--listen", "127.0.0.1:%d" % phtest.free_port(),
                              "--tls-implicit"], timeout=30)
    assert rc == 2 and "--tls-implicit needs --tls" in err, (rc, err)
