/*
 * Unit tests of mta/relay/dsn (RFC 3464 delivery status notifications).
 *
 * Every report built here goes through check_shape: CRLF everywhere, no
 * line over 998 octets, no NUL, the boundary declared once in the header
 * and used only as the delimiters of the expected parts, which are then
 * split out and checked by content type and fields. Cases: the structure
 * of a failure report, RET=HDRS and the size / line-length fallbacks to
 * headers only, NOTIFY filtering, ORCPT and ENVID decoding, injection
 * attempts through the remote reply (CR, LF, NUL, a forged boundary), a
 * boundary that occurs in the returned message, the SMTPUTF8 variant,
 * 5000 recipients, delay reports (alone and with a failure, by NOTIFY), and
 * bad arguments.
 *
 * DSN_TEST_OUT=file writes the rich failure report to file, for checking
 * with another MIME parser by hand.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <errno.h>

#include "core/compiler.h"
#include "mta/relay/dsn.h"

/* ---- helpers ---- */

static const char ORIG[] = "Received: from client.example by mx.example\r\n"
                           "From: Alice <alice@example.org>\r\n"
                           "To: bob@example.net\r\n"
                           "Subject: lunch\r\n"
                           " on Friday\r\n"
                           "Message-ID: <m1@example.org>\r\n"
                           "\r\n"
                           "Shall we meet at noon?\r\n"
                           "BODY-MARKER\r\n";

static void base_message(struct dsn_message *m)
{
	memset(m, 0, sizeof(*m));
	m->reporting_mta = "mx.example";
	m->queue_id = "0A1B2C3D4E";
	m->arrival_ms = 1700000000000ull;
	m->now_ms = 1700003600000ull;
	m->sender = "alice@example.org";
	m->sender_len = strlen(m->sender);
	m->ret = DSN_RET_UNSET;
	m->msg = (const uint8_t *)ORIG;
	m->msg_len = sizeof(ORIG) - 1;
	m->random = 0x1234567890abcdefull;
}

static void base_rcpt(struct dsn_rcpt *r, const char *addr)
{
	memset(r, 0, sizeof(*r));
	r->addr = addr;
	r->addr_len = strlen(addr);
	r->action = DSN_ACTION_FAILED;
	r->status = "5.1.1";
	r->remote_mta = "mx.example.net";
	r->diag = "550 5.1.1 <bob@example.net>: no such user";
	r->diag_len = strlen(r->diag);
	r->last_attempt_ms = 1700003500000ull;
}

struct part {
	const char *p; /* the part's own header + content */
	size_t len;
};

struct report {
	char *out;
	size_t len;
	char boundary[80];
	struct part parts[4];
	unsigned nparts;
	size_t hdr_len; /* the top header section, through its empty line */
};

static size_t count(const char *hay, size_t n, const char *needle)
{
	size_t c = 0, nl = strlen(needle);
	for (const char *p = hay; (p = memmem(p, n - (size_t)(p - hay), needle, nl)); p += nl)
		c++;
	return c;
}

static bool contains(const char *hay, size_t n, const char *needle)
{
	return memmem(hay, n, needle, strlen(needle)) != NULL;
}

/* A line starting with s somewhere in [hay, hay + n). */
static bool has_line(const char *hay, size_t n, const char *s)
{
	size_t sl = strlen(s);
	if (n >= sl && memcmp(hay, s, sl) == 0)
		return true;
	for (const char *p = hay; (p = memmem(p, n - (size_t)(p - hay), "\r\n", 2)); p += 2) {
		size_t left = n - (size_t)(p + 2 - hay);
		if (left >= sl && memcmp(p + 2, s, sl) == 0)
			return true;
	}
	return false;
}

/* A NUL-terminated copy of [s, s + n) with folding (CRLF before SP or TAB) undone. */
static char *unfold(const char *s, size_t n)
{
	char *u = malloc(n + 1);
	assert_non_null(u);
	size_t o = 0;
	for (size_t i = 0; i < n; i++) {
		if (s[i] == '\r' && i + 2 < n && s[i + 1] == '\n' &&
		    (s[i + 2] == ' ' || s[i + 2] == '\t')) {
			i++;
			continue;
		}
		u[o++] = s[i];
	}
	u[o] = '\0';
	return u;
}

/* Lines: CRLF only, at most 998 octets, no NUL. */
static void check_lines(const char *s, size_t n)
{
	size_t col = 0;
	assert_true(n >= 2 && s[n - 2] == '\r' && s[n - 1] == '\n');
	for (size_t i = 0; i < n; i++) {
		assert_int_not_equal(s[i], '\0');
		if (s[i] == '\r') {
			assert_true(i + 1 < n && s[i + 1] == '\n');
			i++;
			col = 0;
			continue;
		}
		assert_int_not_equal(s[i], '\n');
		col++;
		assert_true(col <= 998);
	}
}

/* Checks the outer shape and splits the report into its parts. */
static void check_shape(struct report *r, unsigned want_parts)
{
	check_lines(r->out, r->len);
	char *end = memmem(r->out, r->len, "\r\n\r\n", 4);
	assert_non_null(end);
	r->hdr_len = (size_t)(end + 4 - r->out);
	const char *b = memmem(r->out, r->hdr_len, "boundary=\"", 10);
	assert_non_null(b);
	b += 10;
	const char *q = memchr(b, '"', r->hdr_len - (size_t)(b - r->out));
	assert_non_null(q);
	assert_true(q - b > 0 && q - b < 71);
	memcpy(r->boundary, b, (size_t)(q - b));
	r->boundary[q - b] = '\0';

	/* the boundary string: once in the header, once per delimiter, nowhere else */
	assert_int_equal(count(r->out, r->len, r->boundary), 1 + want_parts + 1);
	char delim[96], close[96];
	snprintf(delim, sizeof(delim), "\r\n--%s\r\n", r->boundary);
	snprintf(close, sizeof(close), "\r\n--%s--\r\n", r->boundary);
	assert_int_equal(count(r->out, r->len, delim), want_parts);
	assert_int_equal(count(r->out, r->len, close), 1);
	const char *cl = memmem(r->out, r->len, close, strlen(close));
	assert_ptr_equal(cl + strlen(close), r->out + r->len);

	const char *p = memmem(r->out, r->len, delim, strlen(delim));
	r->nparts = 0;
	while (p && p < cl) {
		const char *start = p + strlen(delim);
		const char *next =
		    memmem(start, (size_t)(r->out + r->len - start), delim, strlen(delim));
		const char *stop = next ? next : cl;
		assert_true(r->nparts < 4);
		r->parts[r->nparts].p = start;
		r->parts[r->nparts].len = (size_t)(stop - start);
		r->nparts++;
		p = next;
	}
	assert_int_equal(r->nparts, want_parts);
}

static void part_type(const struct report *r, unsigned i, const char *type)
{
	char want[128];
	snprintf(want, sizeof(want), "Content-Type: %s", type);
	assert_true(i < r->nparts);
	assert_true(r->parts[i].len > strlen(want));
	assert_memory_equal(r->parts[i].p, want, strlen(want));
}

static void build_ok(struct report *r, const struct dsn_message *m, const struct dsn_rcpt *rc,
                     unsigned n, unsigned want_parts)
{
	memset(r, 0, sizeof(*r));
	assert_int_equal(dsn_build(m, rc, n, &r->out, &r->len), 0);
	assert_non_null(r->out);
	assert_int_equal(strlen(r->out), r->len);
	check_shape(r, want_parts);
}

static void report_free(struct report *r)
{
	free(r->out);
	r->out = NULL;
}

/* ---- cases ---- */

static void test_structure(void **state)
{
	(void)state;
	struct dsn_message m;
	struct dsn_rcpt rc[2];
	base_message(&m);
	m.envid = "QQ+2B314";
	m.envid_len = strlen(m.envid);
	base_rcpt(&rc[0], "bob@example.net");
	rc[0].orcpt = "rfc822;Bob+2Bx@example.net";
	rc[0].orcpt_len = strlen(rc[0].orcpt);
	base_rcpt(&rc[1], "carol@example.net");
	rc[1].status = "5.2.2";
	rc[1].diag = "552-5.2.2 mailbox full\r\n552 5.2.2 try later";
	rc[1].diag_len = strlen(rc[1].diag);
	rc[1].remote_mta = NULL;

	struct report r;
	build_ok(&r, &m, rc, 2, 3);
	const char *h = r.out;
	size_t hl = r.hdr_len;
	assert_true(has_line(h, hl, "From: Mail Delivery System <MAILER-DAEMON@mx.example>\r\n"));
	assert_true(has_line(h, hl, "To: <alice@example.org>\r\n"));
	assert_true(has_line(h, hl, "Subject: Undelivered Mail Returned to Sender\r\n"));
	assert_true(has_line(h, hl, "Date: Tue, 14 Nov 2023 23:13:20 +0000\r\n"));
	assert_true(has_line(h, hl, "Message-ID: <0A1B2C3D4E.1700003600000@mx.example>\r\n"));
	assert_true(has_line(h, hl, "Auto-Submitted: auto-replied\r\n"));
	assert_true(has_line(h, hl, "MIME-Version: 1.0\r\n"));
	assert_true(
	    has_line(h, hl, "Content-Type: multipart/report; report-type=delivery-status;"));
	assert_memory_equal(r.boundary, "=_0A1B2C3D4E.", 13);

	part_type(&r, 0, "text/plain; charset=us-ascii");
	const struct part *t = &r.parts[0];
	assert_true(contains(t->p, t->len, "<bob@example.net>: failed, status 5.1.1"));
	assert_true(contains(t->p, t->len, "mx.example.net said: 550 5.1.1 <bob@example.net>: no"));
	assert_true(contains(t->p, t->len, "<carol@example.net>: failed, status 5.2.2"));
	assert_true(contains(t->p, t->len, "the remote server said: 552-5.2.2 mailbox full 552"));

	part_type(&r, 1, "message/delivery-status");
	const struct part *s = &r.parts[1];
	assert_true(has_line(s->p, s->len, "Reporting-MTA: dns; mx.example\r\n"));
	assert_true(has_line(s->p, s->len, "Original-Envelope-Id: QQ+314\r\n"));
	assert_true(has_line(s->p, s->len, "Arrival-Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"));
	assert_true(contains(s->p, s->len,
	                     "\r\n\r\nOriginal-Recipient: rfc822; Bob+x@example.net\r\n"
	                     "Final-Recipient: rfc822; bob@example.net\r\n"
	                     "Action: failed\r\n"
	                     "Status: 5.1.1\r\n"
	                     "Remote-MTA: dns; mx.example.net\r\n"
	                     "Diagnostic-Code: smtp; 550 5.1.1 <bob@example.net>: no such user\r\n"
	                     "Last-Attempt-Date: Tue, 14 Nov 2023 23:11:40 +0000\r\n"));
	assert_true(
	    contains(s->p, s->len,
	             "\r\n\r\nFinal-Recipient: rfc822; carol@example.net\r\n"
	             "Action: failed\r\n"
	             "Status: 5.2.2\r\n"
	             "Diagnostic-Code: smtp; 552-5.2.2 mailbox full 552 5.2.2 try later\r\n"));
	assert_false(contains(s->p, s->len, "Will-Retry-Until"));
	assert_int_equal(count(s->p, s->len, "Final-Recipient:"), 2);

	part_type(&r, 2, "message/rfc822");
	const struct part *o = &r.parts[2];
	assert_true(contains(o->p, o->len, "Content-Transfer-Encoding: 7bit\r\n"));
	const char *c = memmem(o->p, o->len, "\r\n\r\n", 4);
	assert_non_null(c);
	c += 4;
	assert_int_equal((size_t)(o->p + o->len - c), sizeof(ORIG) - 1);
	assert_memory_equal(c, ORIG, sizeof(ORIG) - 1);

	const char *path = getenv("DSN_TEST_OUT");
	if (path && *path) {
		FILE *f = fopen(path, "wb");
		assert_non_null(f);
		assert_int_equal(fwrite(r.out, 1, r.len, f), r.len);
		assert_int_equal(fclose(f), 0);
	}
	report_free(&r);
}

/* The header section (the returned part's content) must equal ORIG's, and no body. */
static void check_headers_only(const struct report *r, unsigned i, const char *type)
{
	part_type(r, i, type);
	const struct part *o = &r->parts[i];
	const char *c = memmem(o->p, o->len, "\r\n\r\n", 4);
	assert_non_null(c);
	c += 4;
	const char *orig_end = strstr(ORIG, "\r\n\r\n") + 2;
	size_t hl = (size_t)(orig_end - ORIG);
	assert_int_equal((size_t)(o->p + o->len - c), hl);
	assert_memory_equal(c, ORIG, hl);
	assert_false(contains(o->p, o->len, "BODY-MARKER"));
}

static void test_ret_hdrs(void **state)
{
	(void)state;
	struct dsn_message m;
	struct dsn_rcpt rc;
	base_message(&m);
	m.ret = DSN_RET_HDRS;
	base_rcpt(&rc, "bob@example.net");
	struct report r;
	build_ok(&r, &m, &rc, 1, 3);
	check_headers_only(&r, 2, "text/rfc822-headers");
	assert_true(contains(r.parts[0].p, r.parts[0].len,
	                     "The header section of your message is attached."));
	report_free(&r);
}

static void test_size_bound(void **state)
{
	(void)state;
	struct dsn_message m;
	struct dsn_rcpt rc;
	struct report r;
	base_message(&m);
	m.ret = DSN_RET_FULL;
	base_rcpt(&rc, "bob@example.net");

	/* a bound just below the message: headers only; at the size: full */
	m.full_max = sizeof(ORIG) - 2;
	build_ok(&r, &m, &rc, 1, 3);
	check_headers_only(&r, 2, "text/rfc822-headers");
	report_free(&r);
	m.full_max = sizeof(ORIG) - 1;
	build_ok(&r, &m, &rc, 1, 3);
	part_type(&r, 2, "message/rfc822");
	report_free(&r);

	/* the default bound: 256 KiB + 1 of body comes back as headers */
	size_t hl = (size_t)(strstr(ORIG, "\r\n\r\n") + 4 - ORIG);
	size_t big = DSN_FULL_MAX_DEFAULT + 1;
	char *msg = malloc(big);
	assert_non_null(msg);
	memcpy(msg, ORIG, hl);
	for (size_t i = hl; i < big; i++)
		msg[i] = (i - hl) % 80 == 78 ? '\r' : (i - hl) % 80 == 79 ? '\n' : 'x';
	m.full_max = 0;
	m.msg = (const uint8_t *)msg;
	m.msg_len = big;
	build_ok(&r, &m, &rc, 1, 3);
	check_headers_only(&r, 2, "text/rfc822-headers");
	report_free(&r);
	m.msg_len = DSN_FULL_MAX_DEFAULT;
	build_ok(&r, &m, &rc, 1, 3);
	part_type(&r, 2, "message/rfc822");
	report_free(&r);

	/* a body line over 998 octets: headers only, whatever the size */
	for (size_t i = hl; i < hl + 2000; i++)
		msg[i] = 'y';
	m.msg_len = hl + 2000;
	build_ok(&r, &m, &rc, 1, 3);
	check_headers_only(&r, 2, "text/rfc822-headers");
	report_free(&r);

	/* a header line over 998 octets is left out of the header section */
	const char pre[] = "From: a@b\r\nX-Long: ";
	size_t off = 0;
	memcpy(msg, pre, sizeof(pre) - 1);
	off = sizeof(pre) - 1;
	memset(msg + off, 'z', 1200);
	off += 1200;
	const char post[] = "\r\nSubject: kept\r\n\r\nbody\r\n";
	memcpy(msg + off, post, sizeof(post) - 1);
	off += sizeof(post) - 1;
	m.msg_len = off;
	build_ok(&r, &m, &rc, 1, 3);
	part_type(&r, 2, "text/rfc822-headers");
	assert_true(
	    contains(r.parts[2].p, r.parts[2].len, "\r\n\r\nFrom: a@b\r\nSubject: kept\r\n"));
	assert_false(contains(r.parts[2].p, r.parts[2].len, "X-Long"));
	report_free(&r);
	free(msg);
}

static void test_notify_wants(void **state)
{
	(void)state;
	static const struct {
		unsigned notify;
		enum dsn_action a;
		bool want;
	} t[] = {
	    {0, DSN_ACTION_FAILED, true},
	    {0, DSN_ACTION_DELAYED, true},
	    {0, DSN_ACTION_DELIVERED, false},
	    {0, DSN_ACTION_RELAYED, false},
	    {DSN_NOTIFY_NEVER, DSN_ACTION_FAILED, false},
	    {DSN_NOTIFY_NEVER | DSN_NOTIFY_FAILURE, DSN_ACTION_FAILED, false},
	    {DSN_NOTIFY_SUCCESS, DSN_ACTION_FAILED, false},
	    {DSN_NOTIFY_SUCCESS, DSN_ACTION_DELIVERED, true},
	    {DSN_NOTIFY_SUCCESS, DSN_ACTION_RELAYED, true},
	    {DSN_NOTIFY_SUCCESS, DSN_ACTION_EXPANDED, true},
	    {DSN_NOTIFY_FAILURE, DSN_ACTION_FAILED, true},
	    {DSN_NOTIFY_FAILURE, DSN_ACTION_DELAYED, false},
	    {DSN_NOTIFY_DELAY, DSN_ACTION_DELAYED, true},
	    {DSN_NOTIFY_DELAY, DSN_ACTION_FAILED, false},
	};
	for (size_t i = 0; i < ARRAY_SIZE(t); i++)
		assert_int_equal(dsn_rcpt_wants(t[i].notify, t[i].a), t[i].want);
}

static void test_notify_filter(void **state)
{
	(void)state;
	struct dsn_message m;
	struct dsn_rcpt rc[4];
	base_message(&m);
	base_rcpt(&rc[0], "never@example.net");
	rc[0].notify = DSN_NOTIFY_NEVER;
	base_rcpt(&rc[1], "success@example.net");
	rc[1].notify = DSN_NOTIFY_SUCCESS;
	base_rcpt(&rc[2], "failure@example.net");
	rc[2].notify = DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY;
	base_rcpt(&rc[3], "default@example.net");

	struct report r;
	build_ok(&r, &m, rc, 4, 3);
	assert_false(contains(r.out, r.len, "never@"));
	assert_false(contains(r.out, r.len, "success@"));
	assert_int_equal(count(r.parts[1].p, r.parts[1].len, "Final-Recipient:"), 2);
	assert_true(contains(r.parts[1].p, r.parts[1].len, "rfc822; failure@example.net"));
	assert_true(contains(r.parts[1].p, r.parts[1].len, "rfc822; default@example.net"));
	report_free(&r);

	/* nobody left: -ENOENT, nothing allocated */
	char *out = (char *)1;
	size_t len = 7;
	assert_int_equal(dsn_build(&m, rc, 2, &out, &len), -ENOENT);
	assert_null(out);
	assert_int_equal(len, 0);
	assert_false(dsn_should_send(m.sender, m.sender_len, rc, 2));
	assert_true(dsn_should_send(m.sender, m.sender_len, rc, 4));
	/* never to the null sender */
	assert_false(dsn_should_send("", 0, rc, 4));
	m.sender = "";
	m.sender_len = 0;
	assert_int_equal(dsn_build(&m, rc, 4, &out, &len), -EINVAL);
	assert_null(out);

	/* a success report (NOTIFY=SUCCESS, delivered): headers only */
	base_message(&m);
	rc[1].action = DSN_ACTION_DELIVERED;
	rc[1].status = "2.0.0";
	build_ok(&r, &m, &rc[1], 1, 3);
	assert_true(has_line(r.out, r.hdr_len, "Subject: Successful Mail Delivery Report\r\n"));
	assert_true(has_line(r.parts[1].p, r.parts[1].len, "Action: delivered\r\n"));
	part_type(&r, 2, "text/rfc822-headers");
	report_free(&r);
}

static void test_orcpt_envid(void **state)
{
	(void)state;
	static const struct {
		const char *envid, *orcpt;
		const char *want_envid, *want_orcpt; /* NULL: the field is left out */
	} t[] = {
	    {"abc", "rfc822;x@y", "Original-Envelope-Id: abc\r\n",
	     "Original-Recipient: rfc822; x@y\r\n"},
	    {"a+20b+3Dc", "rfc822;a+2Bb@y", "Original-Envelope-Id: a b=c\r\n",
	     "Original-Recipient: rfc822; a+b@y\r\n"},
	    {"a+zzb", "RFC822;a+2bb@y", "Original-Envelope-Id: a+zzb\r\n",
	     "Original-Recipient: RFC822; a+b@y\r\n"},
	    /* encoded CR LF / NUL / 8-bit: left out rather than altered */
	    {"x+0D+0ASubject:+20evil", "rfc822;x+0D+0AEvil:+20y", NULL, NULL},
	    {"x+00", "rfc822;x+00@y", NULL, NULL},
	    {"x+C3+A9", "rfc822;+E9@y", NULL, NULL},
	    /* malformed ORCPT: no type, bad type, empty address */
	    {"", "x@y", NULL, NULL},
	    {"", "rfc 822;x@y", NULL, NULL},
	    {"", "rfc822;", NULL, NULL},
	};
	for (size_t i = 0; i < ARRAY_SIZE(t); i++) {
		struct dsn_message m;
		struct dsn_rcpt rc;
		base_message(&m);
		m.envid = t[i].envid;
		m.envid_len = strlen(t[i].envid);
		base_rcpt(&rc, "bob@example.net");
		rc.orcpt = t[i].orcpt;
		rc.orcpt_len = strlen(t[i].orcpt);
		struct report r;
		build_ok(&r, &m, &rc, 1, 3);
		const struct part *s = &r.parts[1];
		if (t[i].want_envid)
			assert_true(has_line(s->p, s->len, t[i].want_envid));
		else
			assert_false(contains(s->p, s->len, "Original-Envelope-Id"));
		if (t[i].want_orcpt)
			assert_true(has_line(s->p, s->len, t[i].want_orcpt));
		else
			assert_false(contains(s->p, s->len, "Original-Recipient"));
		assert_false(has_line(r.out, r.len, "Subject: evil"));
		assert_false(has_line(r.out, r.len, "Evil:"));
		report_free(&r);
	}
	/* an ENVID over the bound is left out */
	char envid[DSN_XTEXT_MAX + 2];
	memset(envid, 'e', sizeof(envid));
	struct dsn_message m;
	struct dsn_rcpt rc;
	base_message(&m);
	m.envid = envid;
	m.envid_len = sizeof(envid);
	base_rcpt(&rc, "bob@example.net");
	struct report r;
	build_ok(&r, &m, &rc, 1, 3);
	assert_false(contains(r.out, r.len, "Original-Envelope-Id"));
	report_free(&r);
	m.envid_len = DSN_XTEXT_MAX;
	build_ok(&r, &m, &rc, 1, 3);
	assert_true(contains(r.out, r.len, "Original-Envelope-Id: eee"));
	report_free(&r);
}

static void test_injection(void **state)
{
	(void)state;
	struct dsn_message m;
	struct dsn_rcpt rc;
	base_message(&m);
	base_rcpt(&rc, "bob@example.net");
	struct report r;
	build_ok(&r, &m, &rc, 1, 3);
	char first[80];
	strcpy(first, r.boundary);
	report_free(&r);

	/* the remote reply forges the boundary this report would have used */
	char diag[512];
	int dl = snprintf(diag, sizeof(diag),
	                  "550 no\r\nSubject: evil\r\n\r\n--%s\r\nContent-Type: text/html\r\n\r\n"
	                  "<b>x</b>\r\n--%s--\r\nX-A:\rX-B:\nX-C:\tnul",
	                  first, first);
	assert_true(dl > 0 && (size_t)dl < 400);
	/* then a NUL and what follows it, and DEL and an escape sequence */
	const char tail[] = "\0after\x7f\x1b[0m";
	memcpy(diag + dl, tail, sizeof(tail) - 1);
	rc.diag = diag;
	rc.diag_len = (size_t)dl + sizeof(tail) - 1;

	build_ok(&r, &m, &rc, 1, 3);
	assert_string_not_equal(r.boundary, first);
	assert_false(has_line(r.out, r.len, "Subject: evil"));
	assert_false(has_line(r.out, r.len, "Content-Type: text/html"));
	assert_false(has_line(r.out, r.len, "X-A:"));
	assert_false(has_line(r.out, r.len, "X-B:"));
	/* the report's, the returned message's, and the reply's in two values */
	assert_int_equal(count(r.out, r.len, "Subject:"), 4);
	char want[512];
	snprintf(want, sizeof(want),
	         "\r\nDiagnostic-Code: smtp; 550 no Subject: evil --%s Content-Type: text/html "
	         "<b>x</b> --%s-- X-A: X-B: X-C: nul after [0m\r\n",
	         first, first);
	char *u = unfold(r.parts[1].p, r.parts[1].len);
	assert_true(contains(u, strlen(u), want));
	free(u);
	assert_false(contains(r.out, r.len, "\x1b"));
	assert_false(contains(r.out, r.len, "\x7f"));
	report_free(&r);

	/* 8-bit in the reply of a non-SMTPUTF8 report becomes '?' */
	rc.diag = "550 gr\xc3\xbc\xc3\x9f \xff";
	rc.diag_len = strlen(rc.diag);
	build_ok(&r, &m, &rc, 1, 3);
	assert_true(contains(r.parts[1].p, r.parts[1].len, "smtp; 550 gr???? ?\r\n"));
	report_free(&r);
}

static void test_boundary_in_content(void **state)
{
	(void)state;
	struct dsn_message m;
	struct dsn_rcpt rc;
	base_message(&m);
	base_rcpt(&rc, "bob@example.net");
	struct report r;
	build_ok(&r, &m, &rc, 1, 3);
	char first[80];
	strcpy(first, r.boundary);
	report_free(&r);

	char msg[1024];
	int n = snprintf(msg, sizeof(msg), "Subject: x %s\r\n\r\n--%s\r\n--%s--\r\n", first, first,
	                 first);
	m.msg = (const uint8_t *)msg;
	m.msg_len = (size_t)n;
	build_ok(&r, &m, &rc, 1, 3);
	assert_string_not_equal(r.boundary, first);
	assert_int_equal(count(r.parts[2].p, r.parts[2].len, first), 3);
	report_free(&r);
}

static void test_smtputf8(void **state)
{
	(void)state;
	static const char orig[] = "From: j\xc3\xb6rg@example.de\r\nSubject: gr\xc3\xbc\xc3\x9f"
	                           "e\r\n\r\nHall\xc3\xb6\r\n";
	struct dsn_message m;
	struct dsn_rcpt rc[2];
	base_message(&m);
	m.smtputf8 = true;
	m.sender = "j\xc3\xb6rg@example.de";
	m.sender_len = strlen(m.sender);
	m.msg = (const uint8_t *)orig;
	m.msg_len = sizeof(orig) - 1;
	base_rcpt(&rc[0], "\xe7\x94\xa8\xe6\x88\xb7+tag@\xe4\xbe\x8b\xe5\xad\x90.example");
	rc[0].diag = "550 5.1.1 \xe7\x94\xa8\xe6\x88\xb7 unknown \xff";
	rc[0].diag_len = strlen(rc[0].diag);
	base_rcpt(&rc[1], "ascii@example.net");

	struct report r;
	build_ok(&r, &m, rc, 2, 3);
	assert_true(has_line(r.out, r.hdr_len, "To: <j\xc3\xb6rg@example.de>\r\n"));
	assert_true(
	    has_line(r.out, r.hdr_len,
	             "Content-Type: multipart/report; report-type=global-delivery-status;"));
	part_type(&r, 0, "text/plain; charset=utf-8");
	part_type(&r, 1, "message/global-delivery-status");
	const struct part *s = &r.parts[1];
	assert_true(has_line(s->p, s->len,
	                     "Final-Recipient: utf-8; \xe7\x94\xa8\xe6\x88\xb7\\x{2B}tag@"
	                     "\xe4\xbe\x8b\xe5\xad\x90.example\r\n"));
	assert_true(has_line(s->p, s->len, "Final-Recipient: rfc822; ascii@example.net\r\n"));
	assert_true(has_line(s->p, s->len,
	                     "Diagnostic-Code: smtp; 550 5.1.1 \xe7\x94\xa8\xe6\x88\xb7 "
	                     "unknown ?\r\n"));
	part_type(&r, 2, "message/global");
	assert_true(contains(r.parts[2].p, r.parts[2].len, "Content-Transfer-Encoding: 8bit\r\n"));
	assert_true(contains(r.parts[2].p, r.parts[2].len, "Hall\xc3\xb6\r\n"));
	report_free(&r);

	m.ret = DSN_RET_HDRS;
	build_ok(&r, &m, rc, 2, 3);
	part_type(&r, 2, "message/global-headers");
	assert_false(contains(r.parts[2].p, r.parts[2].len, "Hall"));
	report_free(&r);

	/* the same recipient in an ASCII report: every non-ASCII character as \x{HEX} */
	base_message(&m);
	build_ok(&r, &m, rc, 1, 3);
	assert_true(
	    has_line(r.parts[1].p, r.parts[1].len,
	             "Final-Recipient: utf-8; \\x{7528}\\x{6237}\\x{2B}tag@\\x{4F8B}\\x{5B50}"
	             ".example\r\n"));
	assert_false(contains(r.out, r.len, "\xe7"));
	report_free(&r);

	/* an 8-bit sender needs SMTPUTF8 */
	m.sender = "j\xc3\xb6rg@example.de";
	m.sender_len = strlen(m.sender);
	char *out;
	size_t len;
	assert_int_equal(dsn_build(&m, rc, 1, &out, &len), -EINVAL);
}

static void test_many_rcpts(void **state)
{
	(void)state;
	enum { N = 5000 };
	struct dsn_message m;
	base_message(&m);
	struct dsn_rcpt *rc = calloc(N, sizeof(*rc));
	char(*addrs)[32] = calloc(N, 32);
	assert_non_null(rc);
	assert_non_null(addrs);
	for (unsigned i = 0; i < N; i++) {
		snprintf(addrs[i], 32, "user%u@example.net", i);
		base_rcpt(&rc[i], addrs[i]);
	}
	struct report r;
	build_ok(&r, &m, rc, N, 3);
	assert_int_equal(count(r.parts[1].p, r.parts[1].len, "Final-Recipient:"), N);
	assert_true(contains(r.parts[1].p, r.parts[1].len, "rfc822; user4999@example.net\r\n"));
	assert_int_equal(count(r.parts[0].p, r.parts[0].len, ": failed, status"),
	                 DSN_TEXT_RCPTS_MAX);
	assert_true(contains(r.parts[0].p, r.parts[0].len, "... and 4900 more recipients"));
	report_free(&r);
	free(addrs);
	free(rc);
}

static void test_long_fields(void **state)
{
	(void)state;
	struct dsn_message m;
	struct dsn_rcpt rc;
	base_message(&m);
	base_rcpt(&rc, "bob@example.net");
	size_t n = 20000;
	char *diag = malloc(n);
	assert_non_null(diag);
	struct report r;

	/* one word far over a line, then words of every length */
	memset(diag, 'w', n);
	rc.diag = diag;
	rc.diag_len = n;
	build_ok(&r, &m, &rc, 1, 3);
	assert_true(contains(r.parts[1].p, r.parts[1].len, "www...\r\n"));
	report_free(&r);
	for (size_t i = 0; i < n; i++)
		diag[i] = (i * 7919) % 97 == 0 ? ' ' : (char)('a' + i % 26);
	build_ok(&r, &m, &rc, 1, 3);
	report_free(&r);

	/* an address at the bound, and over it */
	char *addr = malloc(DSN_ADDR_MAX + 1);
	assert_non_null(addr);
	memset(addr, 'a', DSN_ADDR_MAX + 1);
	addr[100] = '@';
	rc.addr = addr;
	rc.addr_len = DSN_ADDR_MAX;
	build_ok(&r, &m, &rc, 1, 3);
	report_free(&r);
	char *out;
	size_t len;
	rc.addr_len = DSN_ADDR_MAX + 1;
	assert_int_equal(dsn_build(&m, &rc, 1, &out, &len), -EINVAL);
	/* 8-bit octets that are not UTF-8, in an ASCII report: \x{HH} each, too long */
	memset(addr, 0xff, DSN_ADDR_MAX);
	rc.addr_len = DSN_ADDR_MAX;
	assert_int_equal(dsn_build(&m, &rc, 1, &out, &len), -EINVAL);
	rc.addr_len = 100;
	build_ok(&r, &m, &rc, 1, 3);
	assert_true(
	    contains(r.parts[1].p, r.parts[1].len, "Final-Recipient: utf-8; \\x{FF}\\x{FF}"));
	report_free(&r);
	free(addr);
	free(diag);
}

static void test_delayed(void **state)
{
	(void)state;
	struct dsn_message m;
	struct dsn_rcpt rc;
	base_message(&m);
	m.ret = DSN_RET_FULL;
	base_rcpt(&rc, "bob@example.net");
	rc.action = DSN_ACTION_DELAYED;
	rc.status = "4.4.1";
	rc.diag = "421 4.4.1 try again later";
	rc.diag_len = strlen(rc.diag);
	rc.retry_until_ms = 1700432000000ull;
	struct report r;
	build_ok(&r, &m, &rc, 1, 3);
	assert_true(has_line(r.out, r.hdr_len, "Subject: Delayed Mail (still being retried)\r\n"));
	assert_true(has_line(r.parts[1].p, r.parts[1].len, "Action: delayed\r\n"));
	assert_true(has_line(r.parts[1].p, r.parts[1].len, "Status: 4.4.1\r\n"));
	assert_true(has_line(r.parts[1].p, r.parts[1].len,
	                     "Will-Retry-Until: Sun, 19 Nov 2023 22:13:20 +0000\r\n"));
	check_headers_only(&r, 2, "text/rfc822-headers"); /* never the full text for a delay */
	report_free(&r);

	/* a malformed status falls back to the action's class */
	rc.status = "4.4.1\r\nX: y";
	build_ok(&r, &m, &rc, 1, 3);
	assert_true(has_line(r.parts[1].p, r.parts[1].len, "Status: 4.0.0\r\n"));
	report_free(&r);
	rc.action = DSN_ACTION_FAILED;
	rc.status = NULL;
	build_ok(&r, &m, &rc, 1, 3);
	assert_true(has_line(r.parts[1].p, r.parts[1].len, "Status: 5.0.0\r\n"));
	assert_false(contains(r.parts[1].p, r.parts[1].len, "Will-Retry-Until"));
	report_free(&r);
}

/* Which recipients a delay report lists, by NOTIFY (no NOTIFY: FAILURE and DELAY, as Postfix). */
static void test_delayed_notify(void **state)
{
	(void)state;
	static const struct {
		const char *name;
		unsigned notify;
		bool listed;
	} cases[] = {
	    {"not given", 0, true},
	    {"DELAY", DSN_NOTIFY_DELAY, true},
	    {"FAILURE,DELAY", DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY, true},
	    {"SUCCESS,DELAY", DSN_NOTIFY_SUCCESS | DSN_NOTIFY_DELAY, true},
	    {"NEVER", DSN_NOTIFY_NEVER, false},
	    {"FAILURE", DSN_NOTIFY_FAILURE, false},
	    {"SUCCESS", DSN_NOTIFY_SUCCESS, false},
	    {"SUCCESS,FAILURE", DSN_NOTIFY_SUCCESS | DSN_NOTIFY_FAILURE, false},
	};
	for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
		struct dsn_message m;
		struct dsn_rcpt rc;
		base_message(&m);
		base_rcpt(&rc, "bob@example.net");
		rc.action = DSN_ACTION_DELAYED;
		rc.status = "4.2.2";
		rc.notify = cases[i].notify;
		assert_int_equal(dsn_rcpt_wants(rc.notify, DSN_ACTION_DELAYED), cases[i].listed);
		assert_int_equal(dsn_should_send(m.sender, m.sender_len, &rc, 1), cases[i].listed);
		char *out = (char *)1;
		size_t len = 1;
		int r = dsn_build(&m, &rc, 1, &out, &len);
		if (!cases[i].listed) {
			if (r != -ENOENT)
				fail_msg("NOTIFY=%s: %d, want -ENOENT", cases[i].name, r);
			assert_null(out);
			assert_int_equal(len, 0);
			continue;
		}
		if (r != 0)
			fail_msg("NOTIFY=%s: %d", cases[i].name, r);
		free(out);
	}
	/* never to the null sender, whatever the recipient asked */
	struct dsn_message m;
	struct dsn_rcpt rc;
	base_message(&m);
	base_rcpt(&rc, "bob@example.net");
	rc.action = DSN_ACTION_DELAYED;
	rc.notify = DSN_NOTIFY_DELAY;
	m.sender = "";
	m.sender_len = 0;
	assert_false(dsn_should_send(m.sender, m.sender_len, &rc, 1));
	char *out;
	size_t len;
	assert_int_equal(dsn_build(&m, &rc, 1, &out, &len), -EINVAL);
}

/*
 * One report for an attempt with a failure and a delay (the relay's combined
 * report): both blocks, the failure decides the subject and the returned
 * content, Will-Retry-Until only in the delayed block; a recipient that asked
 * for failures only is left out of the delay part.
 */
static void test_delayed_with_failure(void **state)
{
	(void)state;
	struct dsn_message m;
	struct dsn_rcpt rc[3];
	base_message(&m);
	base_rcpt(&rc[0], "gone@example.net"); /* failed, 5.1.1 */
	base_rcpt(&rc[1], "slow@example.com");
	rc[1].action = DSN_ACTION_DELAYED;
	rc[1].status = "4.7.1";
	rc[1].remote_mta = NULL;
	rc[1].diag = "451 4.7.1 greylisted, come back later";
	rc[1].diag_len = strlen(rc[1].diag);
	rc[1].retry_until_ms = 1700432000000ull;
	base_rcpt(&rc[2], "quiet@example.com");
	rc[2].action = DSN_ACTION_DELAYED;
	rc[2].status = "4.7.1";
	rc[2].notify = DSN_NOTIFY_FAILURE;
	rc[2].retry_until_ms = 1700432000000ull;
	struct report r;
	build_ok(&r, &m, rc, 3, 3);
	assert_true(has_line(r.out, r.hdr_len, "Subject: Undelivered Mail Returned to Sender\r\n"));
	part_type(&r, 2, "message/rfc822"); /* a failure is listed: the whole message */
	const struct part *st = &r.parts[1];
	assert_int_equal(count(st->p, st->len, "Final-Recipient: "), 2);
	assert_true(has_line(st->p, st->len, "Final-Recipient: rfc822; gone@example.net\r\n"));
	assert_true(has_line(st->p, st->len, "Final-Recipient: rfc822; slow@example.com\r\n"));
	assert_false(contains(st->p, st->len, "quiet@example.com"));
	assert_int_equal(count(st->p, st->len, "Action: failed\r\n"), 1);
	assert_int_equal(count(st->p, st->len, "Action: delayed\r\n"), 1);
	assert_int_equal(count(st->p, st->len, "Will-Retry-Until: "), 1);
	/* the delayed block: its own status, diagnostic and retry limit, after the failed one */
	const char *d = memmem(st->p, st->len, "Final-Recipient: rfc822; slow@example.com", 41);
	assert_non_null(d);
	size_t dl = st->len - (size_t)(d - st->p);
	assert_true(has_line(d, dl, "Status: 4.7.1\r\n"));
	assert_true(
	    has_line(d, dl, "Diagnostic-Code: smtp; 451 4.7.1 greylisted, come back later\r\n"));
	assert_true(has_line(d, dl, "Will-Retry-Until: Sun, 19 Nov 2023 22:13:20 +0000\r\n"));
	/* the text part says both things */
	assert_true(contains(r.parts[0].p, r.parts[0].len, "marked \"failed\""));
	assert_true(contains(r.parts[0].p, r.parts[0].len, "marked \"delayed\""));
	assert_true(
	    contains(r.parts[0].p, r.parts[0].len, "<slow@example.com>: delayed, status 4.7.1"));
	report_free(&r);

	/* without the failure: a delay report, headers only */
	build_ok(&r, &m, rc + 1, 2, 3);
	assert_true(has_line(r.out, r.hdr_len, "Subject: Delayed Mail (still being retried)\r\n"));
	check_headers_only(&r, 2, "text/rfc822-headers");
	assert_false(contains(r.parts[0].p, r.parts[0].len, "marked \"failed\""));
	report_free(&r);

	/* a delay never carries a permanent status: 4.0.0 instead */
	rc[1].status = "5.1.1";
	build_ok(&r, &m, rc + 1, 1, 3);
	assert_true(has_line(r.parts[1].p, r.parts[1].len, "Status: 4.0.0\r\n"));
	assert_false(contains(r.out, r.len, "Status: 5.1.1"));
	report_free(&r);
}

static void test_odd_originals(void **state)
{
	(void)state;
	struct dsn_message m;
	struct dsn_rcpt rc;
	base_message(&m);
	base_rcpt(&rc, "bob@example.net");
	struct report r;

	/* bare LF and CR line ends, no final line end: CRLF in the report */
	static const char lf[] = "Subject: a\nX: b\r\rbody\nlast";
	m.msg = (const uint8_t *)lf;
	m.msg_len = sizeof(lf) - 1;
	build_ok(&r, &m, &rc, 1, 3);
	assert_true(contains(r.parts[2].p, r.parts[2].len,
	                     "\r\n\r\nSubject: a\r\nX: b\r\n\r\nbody\r\nlast\r\n"));
	report_free(&r);

	/* a NUL in the body: headers only; in a header: that field left out */
	static const char nul[] =
	    "Subject: a\r\nX-Nul: a\0b\r\n continued\r\nTo: c\r\n\r\nbo\0dy\r\n";
	m.msg = (const uint8_t *)nul;
	m.msg_len = sizeof(nul) - 1;
	build_ok(&r, &m, &rc, 1, 3);
	part_type(&r, 2, "text/rfc822-headers");
	assert_true(contains(r.parts[2].p, r.parts[2].len, "\r\n\r\nSubject: a\r\nTo: c\r\n"));
	assert_false(contains(r.parts[2].p, r.parts[2].len, "continued"));
	report_free(&r);

	/* no message at all, or no header section: two parts */
	m.msg = NULL;
	m.msg_len = 0;
	build_ok(&r, &m, &rc, 1, 2);
	report_free(&r);
	m.ret = DSN_RET_HDRS;
	m.msg = (const uint8_t *)"\r\nbody only\r\n";
	m.msg_len = strlen((const char *)m.msg);
	build_ok(&r, &m, &rc, 1, 2);
	report_free(&r);
	/* every header field left out (over 998 octets): two parts as well */
	char *hdr = malloc(1300);
	assert_non_null(hdr);
	memcpy(hdr, "X-Long: ", 8);
	memset(hdr + 8, 'z', 1200);
	memcpy(hdr + 1208, "\r\n\r\nbody\r\n", 10);
	m.msg = (const uint8_t *)hdr;
	m.msg_len = 1218;
	build_ok(&r, &m, &rc, 1, 2);
	assert_false(contains(r.parts[0].p, r.parts[0].len, "attached"));
	report_free(&r);
	free(hdr);
}

static void test_bad_args(void **state)
{
	(void)state;
	struct dsn_message m;
	struct dsn_rcpt rc;
	char *out;
	size_t len;
	base_rcpt(&rc, "bob@example.net");

	static const char *const hosts[] = {"", "mx example", "mx.example\r\nX: y", "[1.2.3.4]",
	                                    NULL};
	for (size_t i = 0; i < ARRAY_SIZE(hosts); i++) {
		base_message(&m);
		m.reporting_mta = hosts[i];
		assert_int_equal(dsn_build(&m, &rc, 1, &out, &len), -EINVAL);
	}
	static const char *const qids[] = {
	    "",
	    "a b",
	    "a>b",
	    "q\r\n",
	    "0123456789012345678901234567890123456789012345678901234567890123x",
	    NULL};
	for (size_t i = 0; i < ARRAY_SIZE(qids); i++) {
		base_message(&m);
		m.queue_id = qids[i];
		assert_int_equal(dsn_build(&m, &rc, 1, &out, &len), -EINVAL);
	}
	base_message(&m);
	m.sender = "a@b\r\nBcc: x@y";
	m.sender_len = strlen(m.sender);
	assert_int_equal(dsn_build(&m, &rc, 1, &out, &len), -EINVAL);
	base_message(&m);
	assert_int_equal(dsn_build(NULL, &rc, 1, &out, &len), -EINVAL);
	assert_int_equal(dsn_build(&m, NULL, 1, &out, &len), -EINVAL);
	assert_int_equal(dsn_build(&m, &rc, 1, NULL, &len), -EINVAL);
	assert_int_equal(dsn_build(&m, &rc, 1, &out, NULL), -EINVAL);
	assert_int_equal(dsn_build(&m, &rc, 0, &out, &len), -ENOENT);
	assert_int_equal(dsn_build(&m, &rc, DSN_RCPTS_MAX + 1, &out, &len), -EINVAL);
	rc.addr = "bob@example.net\r\nX: y";
	rc.addr_len = strlen(rc.addr);
	assert_int_equal(dsn_build(&m, &rc, 1, &out, &len), -EINVAL);
	base_rcpt(&rc, "bob@example.net");
	rc.action = (enum dsn_action)99;
	assert_int_equal(dsn_build(&m, &rc, 1, &out, &len), -EINVAL);
	/* a bad Remote-MTA is left out, not an error */
	base_rcpt(&rc, "bob@example.net");
	rc.remote_mta = "mx\r\nX-Evil: 1";
	struct report r;
	build_ok(&r, &m, &rc, 1, 3);
	assert_false(contains(r.out, r.len, "Remote-MTA"));
	assert_false(contains(r.out, r.len, "X-Evil"));
	report_free(&r);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_structure),      cmocka_unit_test(test_ret_hdrs),
	    cmocka_unit_test(test_size_bound),     cmocka_unit_test(test_notify_wants),
	    cmocka_unit_test(test_notify_filter),  cmocka_unit_test(test_orcpt_envid),
	    cmocka_unit_test(test_injection),      cmocka_unit_test(test_boundary_in_content),
	    cmocka_unit_test(test_smtputf8),       cmocka_unit_test(test_many_rcpts),
	    cmocka_unit_test(test_long_fields),    cmocka_unit_test(test_delayed),
	    cmocka_unit_test(test_delayed_notify), cmocka_unit_test(test_delayed_with_failure),
	    cmocka_unit_test(test_odd_originals),  cmocka_unit_test(test_bad_args),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
