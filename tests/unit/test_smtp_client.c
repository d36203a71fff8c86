/*
 * Unit tests of smtp_client: scripted dialogues with a fake server. Each case
 * is a list of turns: the server's bytes (or an action: timeout, TLS done,
 * quit, close), then the exact bytes the client sent (all send calls
 * concatenated) and the callbacks it made (rendered as text), and the timeout
 * it asks for. Every case runs with each turn's bytes fed whole, split in two
 * at every octet, one octet at a time, and in random pieces; every way must
 * give the same output and callbacks.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/compiler.h"
#include "mta/smtp/smtp_client.h"
/* Both headers define SMTP_NOTIFY_*: a differing value would fail to compile here. */
#include "mta/smtp/smtp_server.h"

#define OUT_MAX 65536
#define LOG_MAX 16384

/* ---- messages ---- */

#define BODY1 "Subject: hi\r\n\r\nhello\r\n" /* 22 octets */

static const struct iovec body1[] = {{(void *)BODY1, sizeof(BODY1) - 1}};

static const struct smtp_client_rcpt rcpt_b = {"b@example.org", 13, 0, NULL, 0};
static const struct smtp_client_rcpt rcpt_c = {"c@example.org", 13, 0, NULL, 0};
static const struct smtp_client_rcpt rcpts_bc[] = {
    {"b@example.org", 13, 0, NULL, 0},
    {"c@example.org", 13, 0, NULL, 0},
};
static const struct smtp_client_rcpt rcpts_4[] = {
    {"b@example.org", 13, 0, NULL, 0},
    {"c@example.org", 13, 0, NULL, 0},
    {"d@example.org", 13, 0, NULL, 0},
    {"e@example.org", 13, 0, NULL, 0},
};
static const struct smtp_client_rcpt rcpts_dsn[] = {
    {"b@example.org", 13, SMTP_NOTIFY_SUCCESS | SMTP_NOTIFY_FAILURE, "rfc822;b@example.org", 20},
    {"c@example.org", 13, SMTP_NOTIFY_NEVER | SMTP_NOTIFY_DELAY, NULL, 0},
    {"d@example.org", 13, SMTP_NOTIFY_DELAY | SMTP_NOTIFY_SUCCESS | SMTP_NOTIFY_FAILURE, NULL, 0},
};

static const struct smtp_client_msg msg1 = {
    .sender = "a@example.net",
    .sender_len = 13,
    .rcpts = rcpts_bc,
    .nrcpts = 2,
    .body = body1,
    .nbody = 1,
    .size = 22,
};
/* the null sender, one recipient, 8-bit */
static const struct smtp_client_msg msg2 = {
    .rcpts = &rcpt_c,
    .nrcpts = 1,
    .eightbit = true,
    .body = body1,
    .nbody = 1,
    .size = 22,
};
static const struct smtp_client_msg msg4 = {
    .sender = "a@example.net",
    .sender_len = 13,
    .rcpts = rcpts_4,
    .nrcpts = 4,
    .body = body1,
    .nbody = 1,
    .size = 22,
};
static const struct smtp_client_msg msg_utf8 = {
    .sender = "\xc3\xa9@example.net",
    .sender_len = 14,
    .rcpts = &rcpt_b,
    .nrcpts = 1,
    .smtputf8 = true,
    .eightbit = true,
    .body = body1,
    .nbody = 1,
    .size = 22,
};
static const struct smtp_client_msg msg_dsn = {
    .sender = "a@example.net",
    .sender_len = 13,
    .rcpts = rcpts_dsn,
    .nrcpts = 3,
    .envid = "QQ+2B123",
    .envid_len = 8,
    .ret = 2,
    .body = body1,
    .nbody = 1,
    .size = 22,
};

/* Slices with every hard boundary: CR|LF, LF|".", a "." line alone, bare LFs, no final CRLF. */
static const struct iovec body_dots[] = {
    {(void *)"Subject: dots\r\n\r\n.leading\r\n", 27},
    {(void *)".\r", 2},
    {(void *)"\n", 1},
    {(void *)"bare\nlf\n", 8},
    {(void *)".", 1},
    {(void *)"x\r\n..two\r\n", 10},
    {(void *)"", 0},
    {(void *)"last", 4},
};
static const struct smtp_client_msg msg_dots = {
    .sender = "a@example.net",
    .sender_len = 13,
    .rcpts = &rcpt_b,
    .nrcpts = 1,
    .body = body_dots,
    .nbody = ARRAY_SIZE(body_dots),
    .size = 53,
};
#define DOTS_OUT                                                                                   \
	"Subject: dots\r\n\r\n..leading\r\n..\r\nbare\r\nlf\r\n..x\r\n...two\r\nlast\r\n.\r\n"
/* as stored, for BDAT */
#define DOTS_RAW "Subject: dots\r\n\r\n.leading\r\n.\r\nbare\nlf\n.x\r\n..two\r\nlast"

static const struct smtp_client_msg *const all_msgs[] = {&msg1,     &msg2,    &msg4,
                                                         &msg_utf8, &msg_dsn, &msg_dots};

/* ---- the fake glue ---- */

enum act { A_FEED = 0, A_TIMEOUT, A_TLS_DONE, A_QUIT, A_CLOSE };

#define IDLE (-1) /* turn.tmo: smtp_client_timeout_ms must say 0 */

struct turn {
	enum act act;
	const char *in;  /* A_FEED: the server's bytes */
	const char *out; /* what the client sends during the turn (NULL: nothing) */
	const char *log; /* callbacks during the turn (NULL: none) */
	long long tmo;   /* smtp_client_timeout_ms after the turn; IDLE for 0; 0 = unchecked */
	int copies;      /* copy (non-body) send calls during the turn; 0 = unchecked */
	int caps;        /* smtp_client_caps()->flags after the turn; 0 = unchecked */
	bool finished;   /* smtp_client_finished after the turn */
};

struct client_case {
	const char *name;
	const struct smtp_client_msg *msgs[4]; /* given in order at each on_ready */
	bool want_tls;
	bool whole_only; /* the outcome depends on the split (bytes after a final reply) */
	unsigned max_rcpts;
	struct turn turns[16];
};

struct harness {
	struct smtp_client cl;
	const struct client_case *c;
	unsigned next_msg;
	char out[OUT_MAX];
	size_t out_len;
	char log[LOG_MAX];
	size_t log_len;
	int copies;
	size_t ref_bytes;
	bool in_ready, failed;
	unsigned given, done;
	const struct smtp_client_msg *msgs[4]; /* given in order at each on_ready */
};

static void logf_(struct harness *h, const char *fmt, ...) printf_like(2, 3);
static void logf_(struct harness *h, const char *fmt, ...)
{
	va_list ap;
	int k;

	va_start(ap, fmt);
	k = vsnprintf(h->log + h->log_len, LOG_MAX - h->log_len, fmt, ap);
	va_end(ap);
	assert_true(k >= 0 && (size_t)k < LOG_MAX - h->log_len);
	h->log_len += (size_t)k;
}

static bool in_body(const struct smtp_client_msg *m, const char *p, size_t n)
{
	for (unsigned i = 0; m && i < m->nbody; i++) {
		const char *b = m->body[i].iov_base;
		if (p >= b && p + n <= b + m->body[i].iov_len)
			return true;
	}
	return false;
}

static bool in_some_body(const struct harness *h, const char *p, size_t n)
{
	for (size_t m = 0; m < ARRAY_SIZE(all_msgs); m++)
		if (in_body(all_msgs[m], p, n))
			return true;
	for (size_t m = 0; m < ARRAY_SIZE(h->msgs); m++)
		if (in_body(h->msgs[m], p, n))
			return true;
	return false;
}

static void h_send(void *arg, const void *data, size_t len, bool body_ref)
{
	struct harness *h = arg;

	assert_false(h->failed);
	assert_true(len > 0);
	if (body_ref) {
		assert_true(in_some_body(h, data, len));
		h->ref_bytes += len;
	} else {
		h->copies++;
	}
	assert_true(len < OUT_MAX - h->out_len);
	memcpy(h->out + h->out_len, data, len);
	h->out_len += len;
	h->out[h->out_len] = '\0';
}

static void give_msgs(struct harness *h)
{
	while (h->next_msg < ARRAY_SIZE(h->msgs) && h->msgs[h->next_msg]) {
		int rc = smtp_client_send_msg(&h->cl, h->msgs[h->next_msg++]);
		h->given += rc >= 0;
		if (rc != 0)
			logf_(h, "send_msg=%d\n", rc);
		if (rc != 1)
			break;
	}
}

static void h_ready(void *arg)
{
	struct harness *h = arg;

	assert_false(h->in_ready);
	assert_false(h->failed);
	assert_true(smtp_client_ready(&h->cl));
	logf_(h, "ready\n");
	h->in_ready = true;
	give_msgs(h);
	h->in_ready = false;
}

static void render_reply(struct harness *h, const struct smtp_client_reply *r)
{
	assert_non_null(r->text);
	assert_int_equal(strlen(r->text), r->text_len);
	for (size_t i = 0; i < r->text_len; i++)
		assert_true((unsigned char)r->text[i] >= 0x20 && r->text[i] != 0x7f);
	if (r->esc.klass)
		logf_(h, "%u %u.%u.%u %s \"%s\"", r->code, r->esc.klass, r->esc.subject,
		      r->esc.detail, smtp_client_cmd_name(r->cmd), r->text);
	else
		logf_(h, "%u - %s \"%s\"", r->code, smtp_client_cmd_name(r->cmd), r->text);
}

static void h_done(void *arg, const struct smtp_client_result *r)
{
	struct harness *h = arg;
	unsigned i;

	assert_false(h->failed);
	assert_true(h->done < h->given || h->in_ready); /* a local refusal comes before rc */
	h->done++;
	assert_int_equal(r->nrcpts, r->msg->nrcpts);
	assert_int_equal(r->delivered + r->deferred + r->bounced + r->unknown, r->nrcpts);
	logf_(h, "done ");
	render_reply(h, &r->reply);
	logf_(h, "%s ok=%u temp=%u perm=%u unknown=%u\n", r->permanent_local ? " local" : "",
	      r->delivered, r->deferred, r->bounced, r->unknown);
	for (i = 0; i < r->nrcpts; i++) {
		logf_(h, "  %.*s: ", (int)r->msg->rcpts[i].addr_len, r->msg->rcpts[i].addr);
		render_reply(h, &r->rcpt[i]);
		logf_(h, "\n");
	}
}

static const char *const kind_names[] = {"?",        "greeting", "helo",        "closing",
                                         "protocol", "timeout",  "disconnected"};

static void h_fail(void *arg, const struct smtp_client_failure *f)
{
	struct harness *h = arg;

	assert_false(h->failed);
	h->failed = true;
	assert_non_null(f->reason);
	assert_true(f->reason[0] != '\0');
	logf_(h, "fail %s awaiting %s: ", kind_names[f->kind], smtp_client_cmd_name(f->awaiting));
	render_reply(h, &f->reply);
	logf_(h, "\n");
}

static bool h_want_tls(void *arg)
{
	struct harness *h = arg;
	return h->c && h->c->want_tls;
}

static void h_start_tls(void *arg)
{
	struct harness *h = arg;
	logf_(h, "start_tls\n");
}

static const struct smtp_client_ops h_ops = {
    .send = h_send,
    .on_ready = h_ready,
    .on_msg_done = h_done,
    .on_fail = h_fail,
    .want_starttls = h_want_tls,
    .start_tls = h_start_tls,
};

/* Distinct timeouts so that each phase can be told apart. */
static void test_limits(struct smtp_client_limits *lim)
{
	smtp_client_limits_default(lim);
	lim->greeting_ms = 1001;
	lim->helo_ms = 1002;
	lim->mail_ms = 1003;
	lim->rcpt_ms = 1004;
	lim->data_init_ms = 1005;
	lim->data_block_ms = 1006;
	lim->data_done_ms = 1007;
	lim->quit_ms = 1008;
}

#define T_GREET 1001
#define T_HELO  1002
#define T_MAIL  1003
#define T_RCPT  1004
#define T_DATA  1005
#define T_DOT   1007
#define T_QUIT  1008

/* ---- running a case ---- */

enum split { S_WHOLE, S_CUT, S_BYTES, S_RANDOM };

struct how {
	enum split split;
	unsigned turn; /* S_CUT: the turn split */
	size_t cut;    /* S_CUT: where */
	uint32_t seed; /* S_RANDOM */
	char name[64];
};

static void feed_piece(struct harness *h, const char *s, size_t n)
{
	char *piece = malloc(n ? n : 1);

	assert_non_null(piece);
	memcpy(piece, s, n);
	smtp_client_feed(&h->cl, piece, n);
	free(piece);
}

static void feed_turn(struct harness *h, const char *in, unsigned t, struct how *how)
{
	size_t len = strlen(in), off = 0;

	switch (how->split) {
	case S_CUT:
		if (t == how->turn && how->cut < len) {
			feed_piece(h, in, how->cut);
			feed_piece(h, in + how->cut, len - how->cut);
			return;
		}
		break;
	case S_BYTES:
		for (off = 0; off < len; off++)
			feed_piece(h, in + off, 1);
		return;
	case S_RANDOM:
		while (off < len) {
			size_t n;
			how->seed = how->seed * 1103515245u + 12345u;
			n = (how->seed >> 16) % 9 + 1;
			n = MIN(n, len - off);
			feed_piece(h, in + off, n);
			off += n;
		}
		return;
	default:
		break;
	}
	feed_piece(h, in, len);
}

static void run(const struct client_case *c, struct how *how)
{
	struct harness *h = calloc(1, sizeof(*h));
	struct smtp_client_limits lim;
	unsigned t;

	assert_non_null(h);
	h->c = c;
	memcpy(h->msgs, c->msgs, sizeof(h->msgs));
	test_limits(&lim);
	if (c->max_rcpts)
		lim.max_rcpts = c->max_rcpts;
	assert_int_equal(smtp_client_init(&h->cl, &h_ops, h, "client.example.net", &lim), 0);
	assert_int_equal(smtp_client_timeout_ms(&h->cl), 0);
	smtp_client_on_connect(&h->cl);
	assert_int_equal(h->out_len, 0);
	assert_int_equal(smtp_client_timeout_ms(&h->cl), T_GREET);

	for (t = 0; t < ARRAY_SIZE(c->turns) && (c->turns[t].in || c->turns[t].act); t++) {
		const struct turn *tu = &c->turns[t];

		h->out_len = 0;
		h->out[0] = '\0';
		h->log_len = 0;
		h->log[0] = '\0';
		h->copies = 0;
		switch (tu->act) {
		case A_FEED:
			feed_turn(h, tu->in, t, how);
			break;
		case A_TIMEOUT:
			smtp_client_timeout(&h->cl);
			break;
		case A_TLS_DONE:
			smtp_client_tls_done(&h->cl);
			break;
		case A_QUIT:
			smtp_client_quit(&h->cl);
			break;
		case A_CLOSE:
			smtp_client_on_close(&h->cl);
			break;
		}
		if (strcmp(h->out, tu->out ? tu->out : "") != 0)
			fail_msg("case %s (%s) turn %u: output\n%s\nwant\n%s", c->name, how->name,
			         t, h->out, tu->out ? tu->out : "");
		if (strcmp(h->log, tu->log ? tu->log : "") != 0)
			fail_msg("case %s (%s) turn %u: callbacks\n%s\nwant\n%s", c->name,
			         how->name, t, h->log, tu->log ? tu->log : "");
		if (tu->tmo &&
		    smtp_client_timeout_ms(&h->cl) != (tu->tmo == IDLE ? 0 : (uint64_t)tu->tmo))
			fail_msg("case %s (%s) turn %u: timeout %llu, want %lld", c->name,
			         how->name, t, (unsigned long long)smtp_client_timeout_ms(&h->cl),
			         tu->tmo);
		if (tu->copies && h->copies != tu->copies)
			fail_msg("case %s (%s) turn %u: %d copied sends, want %d", c->name,
			         how->name, t, h->copies, tu->copies);
		if (tu->caps && smtp_client_caps(&h->cl)->flags != (unsigned)tu->caps)
			fail_msg("case %s (%s) turn %u: caps %#x, want %#x", c->name, how->name, t,
			         smtp_client_caps(&h->cl)->flags, (unsigned)tu->caps);
		if (smtp_client_finished(&h->cl) != tu->finished)
			fail_msg("case %s (%s) turn %u: finished %d", c->name, how->name, t,
			         smtp_client_finished(&h->cl));
	}
	/* the end: every message given was reported */
	smtp_client_timeout(&h->cl);
	smtp_client_on_close(&h->cl);
	assert_int_equal(h->done, h->given);
	smtp_client_deinit(&h->cl);
	smtp_client_deinit(&h->cl);
	free(h);
}

static void run_case(const struct client_case *c)
{
	struct how how = {0};
	unsigned t;

	snprintf(how.name, sizeof(how.name), "whole");
	run(c, &how);
	if (c->whole_only)
		return;
	how.split = S_BYTES;
	snprintf(how.name, sizeof(how.name), "byte by byte");
	run(c, &how);
	for (uint32_t s = 1; s <= 8; s++) {
		how.split = S_RANDOM;
		how.seed = s;
		snprintf(how.name, sizeof(how.name), "random %u", s);
		run(c, &how);
	}
	for (t = 0; t < ARRAY_SIZE(c->turns) && (c->turns[t].in || c->turns[t].act); t++) {
		size_t len = c->turns[t].in ? strlen(c->turns[t].in) : 0;
		for (size_t k = 1; k < len; k++) {
			how.split = S_CUT;
			how.turn = t;
			how.cut = k;
			snprintf(how.name, sizeof(how.name), "turn %u split at %zu", t, k);
			run(c, &how);
		}
	}
}

/* ---- the dialogues ---- */

#define GREET      "220 mx.example.com ESMTP\r\n"
#define EHLO       "EHLO client.example.net\r\n"
#define HELO       "HELO client.example.net\r\n"
#define EHLO_PIPE  "250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n"
#define EHLO_PLAIN "250-mx.example.com\r\n250 8BITMIME\r\n"
#define EHLO_CHUNK "250-mx.example.com\r\n250-PIPELINING\r\n250 CHUNKING\r\n"
#define EHLO_DSN   "250-mx.example.com\r\n250-PIPELINING\r\n250-DSN\r\n250 SMTPUTF8\r\n"
#define MAIL1      "MAIL FROM:<a@example.net> SIZE=22\r\n"
#define RCPT_B     "RCPT TO:<b@example.org>\r\n"
#define RCPT_C     "RCPT TO:<c@example.org>\r\n"
#define RCPT_D     "RCPT TO:<d@example.org>\r\n"
#define RCPT_E     "RCPT TO:<e@example.org>\r\n"
#define PIPE1      MAIL1 RCPT_B RCPT_C "DATA\r\n"
#define BODY1_DOT  BODY1 ".\r\n"
#define GO         "354 End data with <CR><LF>.<CR><LF>\r\n"
#define OK3        "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
#define QUEUED     "250 2.0.0 Ok: queued as 4XyZ\r\n"
#define DONE_OK2                                                                                   \
	"done 250 2.0.0 end of data \"Ok: queued as 4XyZ\" ok=2 temp=0 perm=0 unknown=0\n"         \
	"  b@example.org: 250 2.0.0 end of data \"Ok: queued as 4XyZ\"\n"                          \
	"  c@example.org: 250 2.0.0 end of data \"Ok: queued as 4XyZ\"\n"

/* The start of a pipelining session that sends msg1. */
#define START_PIPE1                                                                                \
	{.in = GREET, .out = EHLO, .tmo = T_HELO},                                                 \
	{                                                                                          \
		.in = EHLO_PIPE, .out = PIPE1, .log = "ready\n", .tmo = T_MAIL, .copies = 1        \
	}

/* The same with msg4 (four recipients). */
#define START_PIPE1_4                                                                              \
	{.in = GREET, .out = EHLO},                                                                \
	{                                                                                          \
		.in = EHLO_PIPE, .out = MAIL1 RCPT_B RCPT_C RCPT_D RCPT_E "DATA\r\n",              \
		.log = "ready\n"                                                                   \
	}

static const struct client_case cases[] = {
    {.name = "pipelined success, multiline greeting, QUIT",
     .msgs = {&msg1},
     .turns = {{.in = "220-mx.example.com ESMTP\r\n220-no UCE\r\n220 go ahead\r\n",
                .out = EHLO,
                .tmo = T_HELO},
               {.in = EHLO_PIPE,
                .out = PIPE1,
                .log = "ready\n",
                .tmo = T_MAIL,
                .copies = 1,
                .caps = SMTP_CAP_PIPELINING | SMTP_CAP_SIZE | SMTP_CAP_8BITMIME},
               {.in = "250 2.1.0 Ok\r\n", .tmo = T_RCPT},
               {.in = "250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n", .tmo = T_DATA},
               {.in = GO, .out = BODY1_DOT, .tmo = T_DOT},
               {.in = QUEUED, .log = DONE_OK2 "ready\n", .tmo = IDLE},
               {.act = A_QUIT, .out = "QUIT\r\n", .tmo = T_QUIT},
               {.in = "221 2.0.0 Bye\r\n", .tmo = IDLE, .finished = true}}},
    {.name = "pipelined success, all replies at once",
     .msgs = {&msg1},
     .turns = {START_PIPE1,
               {.in = OK3 GO, .out = BODY1_DOT, .tmo = T_DOT},
               {.in = QUEUED, .log = DONE_OK2 "ready\n", .tmo = IDLE}}},
    {.name = "not pipelined: one command at a time, BODY=8BITMIME, null sender",
     .msgs = {&msg2},
     .turns = {{.in = GREET, .out = EHLO, .tmo = T_HELO},
               {.in = EHLO_PLAIN,
                .out = "MAIL FROM:<> BODY=8BITMIME\r\n",
                .log = "ready\n",
                .tmo = T_MAIL},
               {.in = "250 ok\r\n", .out = RCPT_C, .tmo = T_RCPT},
               {.in = "250 ok\r\n", .out = "DATA\r\n", .tmo = T_DATA},
               {.in = GO, .out = BODY1_DOT, .tmo = T_DOT},
               {.in = "250 queued\r\n",
                .log = "done 250 - end of data \"queued\" ok=1 temp=0 perm=0 unknown=0\n"
                       "  c@example.org: 250 - end of data \"queued\"\n"
                       "ready\n",
                .tmo = IDLE}}},
    {.name = "HELO fallback: no extensions",
     .msgs = {&msg2, &msg_utf8},
     .turns = {{.in = GREET, .out = EHLO},
               {.in = "502 5.5.2 Error: command not recognized\r\n", .out = HELO, .tmo = T_HELO},
               {.in = "250 mx.example.com\r\n", .out = "MAIL FROM:<>\r\n", .log = "ready\n"},
               {.in = "250 ok\r\n", .out = RCPT_C},
               {.in = "250 ok\r\n", .out = "DATA\r\n"},
               {.in = GO, .out = BODY1_DOT},
               {.in = "250 queued\r\n",
                .log = "done 250 - end of data \"queued\" ok=1 temp=0 perm=0 unknown=0\n"
                       "  c@example.org: 250 - end of data \"queued\"\n"
                       "ready\n"
                       "done 553 5.6.7 local \"SMTPUTF8 is required but the server does not "
                       "offer it\" local ok=0 temp=0 perm=1 unknown=0\n"
                       "  b@example.org: 553 5.6.7 local \"SMTPUTF8 is required but the server "
                       "does not offer it\"\n"
                       "send_msg=1\n",
                .tmo = IDLE}}},
    {.name = "EHLO and HELO refused",
     .turns = {{.in = GREET, .out = EHLO},
               {.in = "500 5.5.1 what\r\n", .out = HELO},
               {.in = "550 5.7.1 go away\r\n",
                .out = "QUIT\r\n",
                .log = "fail helo awaiting HELO: 550 5.7.1 HELO \"go away\"\n",
                .tmo = IDLE,
                .finished = true}}},
    {.name = "EHLO 4xx: no HELO, session over",
     .turns = {{.in = GREET, .out = EHLO},
               {.in = "451 4.3.0 busy\r\n",
                .out = "QUIT\r\n",
                .log = "fail helo awaiting EHLO: 451 4.3.0 EHLO \"busy\"\n",
                .finished = true}}},
    {.name = "CHUNKING with PIPELINING: everything in one go, body as stored",
     .msgs = {&msg_dots},
     .turns = {{.in = GREET, .out = EHLO},
               {.in = EHLO_CHUNK,
                .out = "MAIL FROM:<a@example.net>\r\n" RCPT_B "BDAT 53 LAST\r\n" DOTS_RAW,
                .log = "ready\n",
                .tmo = T_MAIL,
                .copies = 1},
               {.in = "250 ok\r\n250 ok\r\n", .tmo = T_DOT},
               {.in = "250 2.0.0 queued\r\n",
                .log = "done 250 2.0.0 end of data \"queued\" ok=1 temp=0 perm=0 unknown=0\n"
                       "  b@example.org: 250 2.0.0 end of data \"queued\"\n"
                       "ready\n"}}},
    {.name = "CHUNKING without PIPELINING",
     .msgs = {&msg1},
     .turns = {{.in = GREET, .out = EHLO},
               {.in = "250-mx\r\n250 CHUNKING\r\n",
                .out = "MAIL FROM:<a@example.net>\r\n",
                .log = "ready\n"},
               {.in = "250 ok\r\n", .out = RCPT_B},
               {.in = "550 5.1.1 no such user\r\n", .out = RCPT_C},
               {.in = "250 ok\r\n", .out = "BDAT 22 LAST\r\n" BODY1, .tmo = T_DOT, .copies = 1},
               {.in = "250 2.0.0 queued\r\n",
                .log = "done 250 2.0.0 end of data \"queued\" ok=1 temp=0 perm=1 unknown=0\n"
                       "  b@example.org: 550 5.1.1 RCPT \"no such user\"\n"
                       "  c@example.org: 250 2.0.0 end of data \"queued\"\n"
                       "ready\n"}}},
    {.name = "dot-stuffing across slices, bare LF, no final CRLF",
     .msgs = {&msg_dots},
     .turns = {{.in = GREET, .out = EHLO},
               {.in = EHLO_PIPE,
                .out = "MAIL FROM:<a@example.net> SIZE=53\r\n" RCPT_B "DATA\r\n",
                .log = "ready\n"},
               {.in = "250 ok\r\n250 ok\r\n" GO, .out = DOTS_OUT, .tmo = T_DOT},
               {.in = "250 queued\r\n",
                .log = "done 250 - end of data \"queued\" ok=1 temp=0 perm=0 unknown=0\n"
                       "  b@example.org: 250 - end of data \"queued\"\n"
                       "ready\n"}}},
    {.name = "mixed recipients: 2 ok, 1 4xx, 1 5xx; multiline reply text",
     .msgs = {&msg4},
     .turns = {START_PIPE1_4,
               {.in = "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
                      "451 4.2.1 mailbox busy\r\n"
                      "250 2.1.5 Ok\r\n"
                      "550-5.1.1 no such\r\n550-5.1.1 user here\r\n550 5.1.1 (see RFC)\r\n" GO,
                .out = BODY1_DOT},
               {.in = QUEUED,
                .log = "done 250 2.0.0 end of data \"Ok: queued as 4XyZ\" ok=2 temp=1 perm=1 "
                       "unknown=0\n"
                       "  b@example.org: 250 2.0.0 end of data \"Ok: queued as 4XyZ\"\n"
                       "  c@example.org: 451 4.2.1 RCPT \"mailbox busy\"\n"
                       "  d@example.org: 250 2.0.0 end of data \"Ok: queued as 4XyZ\"\n"
                       "  e@example.org: 550 5.1.1 RCPT \"no such user here (see RFC)\"\n"
                       "ready\n"}}},
    {.name = "all recipients refused, DATA refused (RFC 2920), then RSET + next message",
     .msgs = {&msg1, &msg2},
     .turns = {START_PIPE1,
               {.in = "250 ok\r\n550 5.1.1 no b\r\n450 4.1.1 no c\r\n554 5.5.1 no valid "
                      "recipients\r\n",
                .out = "RSET\r\nMAIL FROM:<> SIZE=22 BODY=8BITMIME\r\n" RCPT_C "DATA\r\n",
                .log = "done 554 5.5.1 DATA \"no valid recipients\" ok=0 temp=1 perm=1 "
                       "unknown=0\n"
                       "  b@example.org: 550 5.1.1 RCPT \"no b\"\n"
                       "  c@example.org: 450 4.1.1 RCPT \"no c\"\n"
                       "ready\n",
                .tmo = T_MAIL,
                .copies = 1},
               {.in = "250 reset\r\n250 ok\r\n250 ok\r\n" GO, .out = BODY1_DOT},
               {.in = "250 queued\r\n",
                .log = "done 250 - end of data \"queued\" ok=1 temp=0 perm=0 unknown=0\n"
                       "  c@example.org: 250 - end of data \"queued\"\n"
                       "ready\n"}}},
    {.name = "all recipients refused, yet 354: just the dot",
     .msgs = {&msg1},
     .turns = {START_PIPE1,
               {.in = "250 ok\r\n550 no b\r\n550 no c\r\n" GO, .out = ".\r\n", .tmo = T_DOT},
               {.in = "554 5.5.1 no recipients\r\n",
                .log = "done 554 5.5.1 end of data \"no recipients\" ok=0 temp=0 perm=2 "
                       "unknown=0\n"
                       "  b@example.org: 550 - RCPT \"no b\"\n"
                       "  c@example.org: 550 - RCPT \"no c\"\n"
                       "ready\n"},
               {.act = A_QUIT, .out = "QUIT\r\n"}}},
    {.name = "all recipients refused without PIPELINING: no DATA",
     .msgs = {&msg1, &msg2},
     .turns = {{.in = GREET, .out = EHLO},
               {.in = EHLO_PLAIN, .out = "MAIL FROM:<a@example.net>\r\n", .log = "ready\n"},
               {.in = "250 ok\r\n", .out = RCPT_B},
               {.in = "550 no b\r\n", .out = RCPT_C},
               {.in = "550 no c\r\n",
                .out = "RSET\r\n",
                .log = "done 0 - none \"\" ok=0 temp=0 perm=2 unknown=0\n"
                       "  b@example.org: 550 - RCPT \"no b\"\n"
                       "  c@example.org: 550 - RCPT \"no c\"\n"
                       "ready\n",
                .tmo = T_MAIL},
               {.in = "250 reset\r\n", .out = "MAIL FROM:<> BODY=8BITMIME\r\n", .tmo = T_MAIL}}},
    {.name = "MAIL refused, pipelined",
     .msgs = {&msg1},
     .turns = {START_PIPE1,
               {.in = "553 5.7.1 sender rejected\r\n", .tmo = T_RCPT},
               {.in = "503 5.5.1 no\r\n503 5.5.1 no\r\n554 5.5.1 no\r\n",
                .log = "done 553 5.7.1 MAIL \"sender rejected\" ok=0 temp=0 perm=2 unknown=0\n"
                       "  b@example.org: 553 5.7.1 MAIL \"sender rejected\"\n"
                       "  c@example.org: 553 5.7.1 MAIL \"sender rejected\"\n"
                       "ready\n"}}},
    {.name = "MAIL refused, not pipelined",
     .msgs = {&msg1},
     .turns = {{.in = GREET, .out = EHLO},
               {.in = EHLO_PLAIN, .out = "MAIL FROM:<a@example.net>\r\n", .log = "ready\n"},
               {.in = "452 4.3.1 insufficient storage\r\n",
                .log = "done 452 4.3.1 MAIL \"insufficient storage\" ok=0 temp=2 perm=0 "
                       "unknown=0\n"
                       "  b@example.org: 452 4.3.1 MAIL \"insufficient storage\"\n"
                       "  c@example.org: 452 4.3.1 MAIL \"insufficient storage\"\n"
                       "ready\n",
                .tmo = IDLE},
               {.act = A_QUIT, .out = "QUIT\r\n", .tmo = T_QUIT},
               {.act = A_TIMEOUT, .finished = true}}},
    {.name = "DATA 4xx",
     .msgs = {&msg1},
     .turns = {START_PIPE1,
               {.in = "250 ok\r\n250 ok\r\n550 no c\r\n451 4.3.0 try later\r\n",
                .log = "done 451 4.3.0 DATA \"try later\" ok=0 temp=1 perm=1 unknown=0\n"
                       "  b@example.org: 451 4.3.0 DATA \"try later\"\n"
                       "  c@example.org: 550 - RCPT \"no c\"\n"
                       "ready\n"}}},
    {.name = "final reply 5xx, then RSET before the next message",
     .msgs = {&msg1, &msg1},
     .turns = {START_PIPE1,
               {.in = OK3 GO, .out = BODY1_DOT},
               {.in = "554 5.7.1 looks like spam\r\n",
                .out = "RSET\r\n" PIPE1,
                .log = "done 554 5.7.1 end of data \"looks like spam\" ok=0 temp=0 perm=2 "
                       "unknown=0\n"
                       "  b@example.org: 554 5.7.1 end of data \"looks like spam\"\n"
                       "  c@example.org: 554 5.7.1 end of data \"looks like spam\"\n"
                       "ready\n",
                .copies = 1}}},
    {.name = "two messages on one session",
     .msgs = {&msg1, &msg2},
     .turns = {START_PIPE1,
               {.in = OK3 GO, .out = BODY1_DOT},
               {.in = QUEUED,
                .out = "MAIL FROM:<> SIZE=22 BODY=8BITMIME\r\n" RCPT_C "DATA\r\n",
                .log = DONE_OK2 "ready\n"},
               {.in = "250 ok\r\n250 ok\r\n" GO, .out = BODY1_DOT},
               {.in = "250 queued 2\r\n",
                .log = "done 250 - end of data \"queued 2\" ok=1 temp=0 perm=0 unknown=0\n"
                       "  c@example.org: 250 - end of data \"queued 2\"\n"
                       "ready\n"}}},
    {.name = "421 mid-transaction",
     .msgs = {&msg1},
     .turns = {START_PIPE1,
               {.in = "250 ok\r\n250 ok\r\n421 4.3.2 shutting down\r\n",
                .log = "done 421 4.3.2 RCPT \"shutting down\" ok=0 temp=2 perm=0 unknown=0\n"
                       "  b@example.org: 421 4.3.2 RCPT \"shutting down\"\n"
                       "  c@example.org: 421 4.3.2 RCPT \"shutting down\"\n"
                       "fail closing awaiting RCPT: 421 4.3.2 RCPT \"shutting down\"\n",
                .tmo = IDLE,
                .finished = true}}},
    {.name = "421 to the final reply",
     .msgs = {&msg1},
     .turns = {START_PIPE1,
               {.in = "250 ok\r\n250 ok\r\n550 no c\r\n" GO, .out = BODY1_DOT},
               {.in = "421 4.4.2 timeout\r\n",
                .log = "done 421 4.4.2 end of data \"timeout\" ok=0 temp=1 perm=1 unknown=0\n"
                       "  b@example.org: 421 4.4.2 end of data \"timeout\"\n"
                       "  c@example.org: 550 - RCPT \"no c\"\n"
                       "fail closing awaiting end of data: 421 4.4.2 end of data \"timeout\"\n",
                .finished = true}}},
    {.name = "421 while idle",
     .turns = {{.in = GREET, .out = EHLO},
               {.in = EHLO_PIPE, .log = "ready\n", .tmo = IDLE},
               {.in = "421 4.4.2 idle timeout\r\n",
                .log = "fail closing awaiting none: 421 4.4.2 none \"idle timeout\"\n",
                .finished = true}}},
    {.name = "greeting 554",
     .msgs = {&msg1},
     .turns = {{.in = "554 5.7.1 no service for you\r\n",
                .out = "QUIT\r\n",
                .log = "fail greeting awaiting greeting: 554 5.7.1 greeting \"no service for "
                       "you\"\n",
                .tmo = IDLE,
                .finished = true}}},
    {.name = "greeting 421: no QUIT",
     .turns = {{.in = "421 4.3.2 busy\r\n",
                .log = "fail greeting awaiting greeting: 421 4.3.2 greeting \"busy\"\n",
                .finished = true}}},
    {.name = "garbage greeting",
     .turns = {{.in = "hello there\r\n",
                .log = "fail protocol awaiting greeting: 0 - none \"\"\n",
                .finished = true}}},
    {.name = "garbage mid-transaction",
     .msgs = {&msg1},
     .turns = {START_PIPE1,
               {.in = "250 ok\r\n250 ok\r\n25O ok\r\n",
                .log = "done 0 - none \"\" ok=0 temp=0 perm=0 unknown=2\n"
                       "  b@example.org: 0 - none \"\"\n"
                       "  c@example.org: 0 - none \"\"\n"
                       "fail protocol awaiting RCPT: 0 - none \"\"\n",
                .finished = true}}},
    {.name = "out of step: 250 to DATA",
     .msgs = {&msg1},
     .turns = {START_PIPE1,
               {.in = OK3 "250 ok\r\n",
                .log = "done 0 - none \"\" ok=0 temp=0 perm=0 unknown=2\n"
                       "  b@example.org: 0 - none \"\"\n"
                       "  c@example.org: 0 - none \"\"\n"
                       "fail protocol awaiting DATA: 250 - DATA \"ok\"\n",
                .finished = true}}},
    {.name = "out of step: 354 to MAIL",
     .msgs = {&msg2},
     .turns = {{.in = GREET, .out = EHLO},
               {.in = EHLO_PLAIN, .out = "MAIL FROM:<> BODY=8BITMIME\r\n", .log = "ready\n"},
               {.in = GO,
                .log = "done 0 - none \"\" ok=0 temp=0 perm=0 unknown=1\n"
                       "  c@example.org: 0 - none \"\"\n"
                       "fail protocol awaiting MAIL: 354 - MAIL \"End data with "
                       "<CR><LF>.<CR><LF>\"\n",
                .finished = true}}},
    {.name = "unsolicited reply while idle",
     .turns = {{.in = GREET, .out = EHLO},
               {.in = EHLO_PIPE, .log = "ready\n"},
               {.in = "250 surprise\r\n",
                .log = "fail protocol awaiting none: 250 - none \"surprise\"\n",
                .finished = true}}},
    {.name = "unsolicited partial line while idle",
     .turns = {{.in = GREET, .out = EHLO},
               {.in = EHLO_PIPE, .log = "ready\n"},
               {.in = "250 surp"},
               {.in = "rise\r\n",
                .log = "fail protocol awaiting none: 250 - none \"surprise\"\n",
                .finished = true}}},
    {.name = "a reply after the final reply in the same input",
     .msgs = {&msg1},
     .whole_only = true,
     .turns = {START_PIPE1,
               {.in = OK3 GO, .out = BODY1_DOT},
               {.in = QUEUED "250 extra\r\n",
                .log = DONE_OK2 "fail protocol awaiting none: 250 - none \"extra\"\n",
                .finished = true}}},
    {.name = "SIZE too large: refused locally, nothing sent",
     .msgs = {&msg1},
     .turns = {{.in = GREET, .out = EHLO},
               {.in = "250-mx\r\n250-PIPELINING\r\n250 SIZE 21\r\n",
                .log = "ready\n"
                       "done 552 5.3.4 local \"message size 22 exceeds the server's limit of "
                       "21\" local ok=0 temp=0 perm=2 unknown=0\n"
                       "  b@example.org: 552 5.3.4 local \"message size 22 exceeds the "
                       "server's limit of 21\"\n"
                       "  c@example.org: 552 5.3.4 local \"message size 22 exceeds the "
                       "server's limit of 21\"\n"
                       "send_msg=1\n",
                .tmo = IDLE},
               {.act = A_QUIT, .out = "QUIT\r\n"}}},
    {.name = "SIZE equal to the maximum is fine",
     .msgs = {&msg1},
     .turns = {{.in = GREET, .out = EHLO},
               {.in = "250-mx\r\n250-PIPELINING\r\n250 SIZE 22\r\n",
                .out = PIPE1,
                .log = "ready\n"}}},
    {.name = "SMTPUTF8 not offered",
     .msgs = {&msg_utf8, &msg1},
     .turns = {{.in = GREET, .out = EHLO},
               {.in = EHLO_PIPE,
                .out = PIPE1,
                .log = "ready\n"
                       "done 553 5.6.7 local \"SMTPUTF8 is required but the server does not "
                       "offer it\" local ok=0 temp=0 perm=1 unknown=0\n"
                       "  b@example.org: 553 5.6.7 local \"SMTPUTF8 is required but the server "
                       "does not offer it\"\n"
                       "send_msg=1\n"}}},
    {.name = "SMTPUTF8 offered",
     .msgs = {&msg_utf8},
     .turns = {{.in = GREET, .out = EHLO},
               {.in = EHLO_DSN,
                .out = "MAIL FROM:<\xc3\xa9@example.net> SMTPUTF8\r\n" RCPT_B "DATA\r\n",
                .log = "ready\n"}}},
    {.name = "DSN parameters when offered",
     .msgs = {&msg_dsn},
     .turns = {{.in = GREET, .out = EHLO},
               {.in = EHLO_DSN,
                .out =
                    "MAIL FROM:<a@example.net> RET=HDRS ENVID=QQ+2B123\r\n"
                    "RCPT TO:<b@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.org\r\n"
                    "RCPT TO:<c@example.org> NOTIFY=NEVER\r\n"
                    "RCPT TO:<d@example.org> NOTIFY=SUCCESS,FAILURE,DELAY\r\n"
                    "DATA\r\n",
                .log = "ready\n"}}},
    {.name = "no DSN parameters when not offered",
     .msgs = {&msg_dsn},
     .turns = {{.in = GREET, .out = EHLO},
               {.in = EHLO_PIPE, .out = MAIL1 RCPT_B RCPT_C RCPT_D "DATA\r\n", .log = "ready\n"}}},
    {.name = "STARTTLS seam",
     .msgs = {&msg1},
     .want_tls = true,
     .turns = {{.in = GREET, .out = EHLO},
               {.in = "250-mx\r\n250-STARTTLS\r\n250 SIZE 100\r\n",
                .out = "STARTTLS\r\n",
                .tmo = T_HELO,
                .caps = SMTP_CAP_STARTTLS | SMTP_CAP_SIZE},
               {.in = "220 2.0.0 Ready to start TLS\r\n", .log = "start_tls\n", .tmo = T_HELO},
               {.act = A_TLS_DONE, .out = EHLO, .tmo = T_HELO},
               {.in = EHLO_PIPE,
                .out = PIPE1,
                .log = "ready\n",
                .caps = SMTP_CAP_PIPELINING | SMTP_CAP_SIZE | SMTP_CAP_8BITMIME}}},
    {.name = "STARTTLS: bytes after 220 are refused",
     .msgs = {&msg1},
     .want_tls = true,
     .whole_only = true,
     .turns = {{.in = GREET, .out = EHLO},
               {.in = "250-mx\r\n250 STARTTLS\r\n", .out = "STARTTLS\r\n"},
               {.in = "220 go\r\n250-injected\r\n",
                .log = "fail protocol awaiting STARTTLS: 0 - none \"\"\n",
                .finished = true}}},
    {.name = "STARTTLS: plaintext before the handshake is refused",
     .want_tls = true,
     .turns = {{.in = GREET, .out = EHLO},
               {.in = "250-mx\r\n250 STARTTLS\r\n", .out = "STARTTLS\r\n"},
               {.in = "220 go\r\n", .log = "start_tls\n"},
               {.in = "250 x\r\n",
                .log = "fail protocol awaiting STARTTLS: 0 - none \"\"\n",
                .finished = true}}},
    {.name = "STARTTLS refused: go on in plaintext",
     .msgs = {&msg1},
     .want_tls = true,
     .turns = {{.in = GREET, .out = EHLO},
               {.in = "250-mx\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 SIZE 100\r\n",
                .out = "STARTTLS\r\n"},
               {.in = "454 4.7.0 TLS not available\r\n", .out = PIPE1, .log = "ready\n"}}},
    {.name = "STARTTLS offered but not wanted",
     .msgs = {&msg1},
     .turns = {{.in = GREET, .out = EHLO},
               {.in = "250-mx\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 SIZE 100\r\n",
                .out = PIPE1,
                .log = "ready\n"}}},
    {.name = "timeouts per phase, without PIPELINING; timeout waiting for RCPT",
     .msgs = {&msg1},
     .turns = {{.in = GREET, .out = EHLO, .tmo = T_HELO},
               {.in = EHLO_PLAIN,
                .out = "MAIL FROM:<a@example.net>\r\n",
                .log = "ready\n",
                .tmo = T_MAIL},
               {.in = "250 ok\r\n", .out = RCPT_B, .tmo = T_RCPT},
               {.in = "250 ok\r\n", .out = RCPT_C, .tmo = T_RCPT},
               {.act = A_TIMEOUT,
                .log = "done 0 - none \"\" ok=0 temp=0 perm=0 unknown=2\n"
                       "  b@example.org: 0 - none \"\"\n"
                       "  c@example.org: 0 - none \"\"\n"
                       "fail timeout awaiting RCPT: 0 - none \"\"\n",
                .tmo = IDLE,
                .finished = true}}},
    {.name = "timeout waiting for 354",
     .msgs = {&msg2},
     .turns = {{.in = GREET, .out = EHLO},
               {.in = EHLO_PLAIN, .out = "MAIL FROM:<> BODY=8BITMIME\r\n", .log = "ready\n"},
               {.in = "250 ok\r\n", .out = RCPT_C},
               {.in = "250 ok\r\n", .out = "DATA\r\n", .tmo = T_DATA},
               {.act = A_TIMEOUT,
                .log = "done 0 - none \"\" ok=0 temp=0 perm=0 unknown=1\n"
                       "  c@example.org: 0 - none \"\"\n"
                       "fail timeout awaiting DATA: 0 - none \"\"\n",
                .finished = true}}},
    {.name = "timeout waiting for the greeting",
     .turns = {{.act = A_TIMEOUT,
                .log = "fail timeout awaiting greeting: 0 - none \"\"\n",
                .finished = true}}},
    {.name = "timeout waiting for the final reply",
     .msgs = {&msg1},
     .turns = {START_PIPE1,
               {.in = "250 ok\r\n550 no b\r\n250 ok\r\n" GO, .out = BODY1_DOT, .tmo = T_DOT},
               {.act = A_TIMEOUT,
                .log = "done 0 - none \"\" ok=0 temp=0 perm=1 unknown=1\n"
                       "  b@example.org: 550 - RCPT \"no b\"\n"
                       "  c@example.org: 0 - none \"\"\n"
                       "fail timeout awaiting end of data: 0 - none \"\"\n",
                .finished = true}}},
    {.name = "connection lost mid-transaction",
     .msgs = {&msg1},
     .turns = {START_PIPE1,
               {.act = A_CLOSE,
                .log = "done 0 - none \"\" ok=0 temp=0 perm=0 unknown=2\n"
                       "  b@example.org: 0 - none \"\"\n"
                       "  c@example.org: 0 - none \"\"\n"
                       "fail disconnected awaiting MAIL: 0 - none \"\"\n",
                .finished = true}}},
    {.name = "quit mid-transaction: outcomes unknown, no QUIT sent, no on_fail",
     .msgs = {&msg1},
     .turns = {START_PIPE1,
               {.act = A_QUIT,
                .log = "done 0 - none \"\" ok=0 temp=0 perm=0 unknown=2\n"
                       "  b@example.org: 0 - none \"\"\n"
                       "  c@example.org: 0 - none \"\"\n",
                .tmo = IDLE,
                .finished = true}}},
    {.name = "too many recipients for the limit",
     .msgs = {&msg4, &msg1},
     .max_rcpts = 2,
     .turns = {{.in = GREET, .out = EHLO}, {.in = EHLO_PIPE, .log = "ready\nsend_msg=-7\n"}}},
};

static void test_dialogues(void **state)
{
	for (size_t i = 0; i < ARRAY_SIZE(cases); i++)
		run_case(&cases[i]);
}

/* ---- direct tests ---- */

/* A harness brought to "ready" with PIPELINING (and the given EHLO reply). */
static struct harness *ready_harness(const struct smtp_client_limits *lim, const char *ehlo)
{
	struct harness *h = calloc(1, sizeof(*h));

	assert_non_null(h);
	assert_int_equal(smtp_client_init(&h->cl, &h_ops, h, "client.example.net", lim), 0);
	smtp_client_on_connect(&h->cl);
	smtp_client_feed(&h->cl, GREET, strlen(GREET));
	smtp_client_feed(&h->cl, ehlo, strlen(ehlo));
	assert_true(smtp_client_ready(&h->cl));
	h->out_len = h->log_len = 0;
	return h;
}

static void free_harness(struct harness *h)
{
	smtp_client_timeout(&h->cl);
	assert_int_equal(h->done, h->given);
	smtp_client_deinit(&h->cl);
	free(h);
}

static void test_defaults(void **state)
{
	struct smtp_client_limits lim;

	smtp_client_limits_default(&lim);
	assert_int_equal(lim.greeting_ms, 300000);
	assert_int_equal(lim.helo_ms, 300000);
	assert_int_equal(lim.mail_ms, 300000);
	assert_int_equal(lim.rcpt_ms, 300000);
	assert_int_equal(lim.data_init_ms, 120000);
	assert_int_equal(lim.data_block_ms, 180000);
	assert_int_equal(lim.data_done_ms, 600000);
	assert_int_equal(lim.quit_ms, 300000);
	assert_int_equal(lim.max_rcpts, 100);
	assert_true(lim.use_chunking);
	assert_string_equal(smtp_client_cmd_name(SMTP_CLIENT_CMD_RCPT), "RCPT");
	assert_string_equal(smtp_client_cmd_name((enum smtp_client_cmd)99), "?");
}

static void test_init_errors(void **state)
{
	struct smtp_client_ops ops = h_ops;
	struct smtp_client_limits lim;
	struct smtp_client cl;

	assert_int_equal(smtp_client_init(&cl, &h_ops, NULL, "", NULL), -EINVAL);
	smtp_client_deinit(&cl);
	assert_int_equal(smtp_client_init(&cl, &h_ops, NULL, "a b", NULL), -EINVAL);
	smtp_client_deinit(&cl);
	assert_int_equal(smtp_client_init(&cl, &h_ops, NULL, "a\r\nQUIT", NULL), -EINVAL);
	smtp_client_deinit(&cl);
	ops.send = NULL;
	assert_int_equal(smtp_client_init(&cl, &ops, NULL, "x", NULL), -EINVAL);
	smtp_client_deinit(&cl);
	ops = h_ops;
	ops.start_tls = NULL;
	assert_int_equal(smtp_client_init(&cl, &ops, NULL, "x", NULL), -EINVAL);
	smtp_client_deinit(&cl);
	smtp_client_limits_default(&lim);
	lim.max_text = 8;
	assert_int_equal(smtp_client_init(&cl, &h_ops, NULL, "x", &lim), -EINVAL);
	smtp_client_deinit(&cl);
	smtp_client_limits_default(&lim);
	lim.max_rcpts = 0;
	assert_int_equal(smtp_client_init(&cl, &h_ops, NULL, "x", &lim), -EINVAL);
	smtp_client_deinit(&cl);
	smtp_client_limits_default(&lim);
	lim.data_done_ms = 0;
	assert_int_equal(smtp_client_init(&cl, &h_ops, NULL, "x", &lim), -EINVAL);
	smtp_client_deinit(&cl);
	/* want_starttls and start_tls both NULL is fine */
	ops = h_ops;
	ops.want_starttls = NULL;
	ops.start_tls = NULL;
	assert_int_equal(smtp_client_init(&cl, &ops, NULL, "x", NULL), 0);
	assert_int_equal(smtp_client_send_msg(&cl, &msg1), -EBUSY); /* not connected */
	smtp_client_deinit(&cl);
}

static void test_send_msg_errors(void **state)
{
	struct harness *h = ready_harness(NULL, EHLO_PIPE);
	struct smtp_client_rcpt bad_rcpt = rcpt_b;
	struct smtp_client_msg m = msg1;

	m.nrcpts = 0;
	assert_int_equal(smtp_client_send_msg(&h->cl, &m), -EINVAL);
	m = msg1;
	m.size = 21;
	assert_int_equal(smtp_client_send_msg(&h->cl, &m), -EINVAL);
	m = msg1;
	m.ret = 3;
	assert_int_equal(smtp_client_send_msg(&h->cl, &m), -EINVAL);
	m = msg1;
	m.sender = "a@b\r\nRCPT TO:<x@y>";
	m.sender_len = strlen(m.sender);
	assert_int_equal(smtp_client_send_msg(&h->cl, &m), -EINVAL);
	m = msg1;
	m.envid = "a b";
	m.envid_len = 3;
	assert_int_equal(smtp_client_send_msg(&h->cl, &m), -EINVAL);
	m = msg1;
	bad_rcpt.orcpt = "rfc822;x\n";
	bad_rcpt.orcpt_len = 9;
	m.rcpts = &bad_rcpt;
	m.nrcpts = 1;
	assert_int_equal(smtp_client_send_msg(&h->cl, &m), -EINVAL);
	bad_rcpt = rcpt_b;
	bad_rcpt.addr_len = 0;
	assert_int_equal(smtp_client_send_msg(&h->cl, &m), -EINVAL);
	bad_rcpt.addr = "x\0y";
	bad_rcpt.addr_len = 3;
	assert_int_equal(smtp_client_send_msg(&h->cl, &m), -EINVAL);
	assert_int_equal(h->out_len, 0);
	assert_int_equal(h->log_len, 0);
	assert_true(smtp_client_ready(&h->cl));

	assert_int_equal(smtp_client_send_msg(&h->cl, &msg1), 0);
	h->given++;
	assert_false(smtp_client_ready(&h->cl));
	assert_int_equal(smtp_client_send_msg(&h->cl, &msg1), -EBUSY);
	free_harness(h);
}

/* A long reply with control characters; a small text space. */
static void test_text_bounds(void **state)
{
	static const char replies[] =
	    "250 ok\r\n"
	    "550-5.1.1 bad\x01user\x7f\ttext that goes on and on\r\n550 5.1.1 and on\r\n"
	    "550 5.1.1 second\r\n"
	    "554 5.5.1 no valid recipients\r\n";
	struct smtp_client_limits lim;
	struct harness *h;

	smtp_client_limits_default(&lim);
	lim.max_text = 32;
	lim.text_space = 40;
	h = ready_harness(&lim, EHLO_PIPE);
	assert_int_equal(smtp_client_send_msg(&h->cl, &msg1), 0);
	h->given++;
	smtp_client_feed(&h->cl, replies, strlen(replies));
	assert_string_equal(h->log,
	                    "done 554 5.5.1 DATA \"\" ok=0 temp=0 perm=2 unknown=0\n"
	                    "  b@example.org: 550 5.1.1 RCPT \"bad?user??text that goes on and\"\n"
	                    "  c@example.org: 550 5.1.1 RCPT \"second\"\n"
	                    "ready\n");
	free_harness(h);
}

/* Every way of slicing each body must give the same stuffed output, with no body octet copied. */
struct stuff_case {
	const char *body;
	const char *want;
};

static const struct stuff_case stuff_cases[] = {
    {"", ".\r\n"},
    {".", "..\r\n.\r\n"},
    {".\r\n", "..\r\n.\r\n"},
    {"a\r\n.\r\nb\r\n", "a\r\n..\r\nb\r\n.\r\n"},
    {"a\n.\nb", "a\r\n..\r\nb\r\n.\r\n"},
    {"a\n", "a\r\n.\r\n"},
    {"a\r", "a\r\n.\r\n"},
    {"a\rb\r.c", "a\r\nb\r\n..c\r\n.\r\n"},
    {"\r\n\r\n", "\r\n\r\n.\r\n"},
    {"..\r\n...", "...\r\n....\r\n.\r\n"},
    {"x.y\r\n.\r\n.", "x.y\r\n..\r\n..\r\n.\r\n"},
    {"\n\n", "\r\n\r\n.\r\n"},
    {"\r\r\n", "\r\n\r\n.\r\n"},
    {"a\r\n.\r", "a\r\n..\r\n.\r\n"},
};

static void stuff_run(const struct stuff_case *c, const size_t *cuts, unsigned ncuts)
{
	size_t len = strlen(c->body), start = 0;
	struct iovec iov[4];
	struct smtp_client_msg m = msg1;
	char *copy = malloc(len + 1);
	struct harness *h = ready_harness(NULL, EHLO_PIPE);
	const char *go = "250 ok\r\n250 ok\r\n250 ok\r\n" GO;
	unsigned i;

	assert_non_null(copy);
	memcpy(copy, c->body, len);
	for (i = 0; i <= ncuts; i++) {
		size_t end = i < ncuts ? cuts[i] : len;
		iov[i].iov_base = copy + start;
		iov[i].iov_len = end - start;
		start = end;
	}
	m.body = iov;
	m.nbody = ncuts + 1;
	m.size = len;
	h->msgs[0] = &m;
	assert_int_equal(smtp_client_send_msg(&h->cl, &m), 0);
	h->given++;
	h->out_len = 0;
	h->ref_bytes = 0;
	smtp_client_feed(&h->cl, go, strlen(go));
	if (strcmp(h->out, c->want) != 0)
		fail_msg("stuffing \"%s\" (%u slices, first cut %zu): got \"%s\"", c->body,
		         ncuts + 1, ncuts ? cuts[0] : 0, h->out);
	assert_int_equal(h->ref_bytes, len);
	assert_int_equal(smtp_client_timeout_ms(&h->cl), 600000);
	smtp_client_feed(&h->cl, "250 ok\r\n", 8);
	assert_int_equal(h->done, 1);
	free_harness(h);
	free(copy);
}

static void test_stuffing(void **state)
{
	for (size_t k = 0; k < ARRAY_SIZE(stuff_cases); k++) {
		const struct stuff_case *c = &stuff_cases[k];
		size_t len = strlen(c->body), cuts[3];

		stuff_run(c, NULL, 0);
		for (cuts[0] = 0; cuts[0] <= len; cuts[0]++) {
			stuff_run(c, cuts, 1);
			for (cuts[1] = cuts[0]; cuts[1] <= len; cuts[1]++) {
				stuff_run(c, cuts, 2);
				for (cuts[2] = cuts[1]; cuts[2] <= len; cuts[2]++)
					stuff_run(c, cuts, 3);
			}
		}
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_defaults),        cmocka_unit_test(test_init_errors),
	    cmocka_unit_test(test_send_msg_errors), cmocka_unit_test(test_text_bounds),
	    cmocka_unit_test(test_stuffing),        cmocka_unit_test(test_dialogues),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
