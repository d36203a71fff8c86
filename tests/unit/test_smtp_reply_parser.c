/*
 * Unit tests of smtp_reply_parser: tables of named cases, each fed whole, split
 * in two at every octet, and one octet at a time; every way must yield the
 * same lines (rendered as text) and the same outcome.
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
#include "mta/smtp/smtp_reply_parser.h"

/*
 * A rendered line: "<code><'-' or ' '>[<c.s.d>]|<msg>\n". Lines of an
 * unfinished reply at the end of the input are rendered as well; "!" + the
 * start of the error reason follows the lines yielded before an error.
 */
struct reply_case {
	const char *name;
	const char *in;
	size_t in_len;          /* 0: strlen(in) */
	size_t max_line;        /* 0: default */
	unsigned max_lines;     /* 0: default */
	const char *want;       /* rendered lines */
	const char *want_error; /* NULL: no error expected; else a substring of the reason */
	bool want_idle;         /* the parser is between replies at the end */
};

#define OUT_MAX 65536

struct run {
	char out[OUT_MAX];
	size_t out_len;
	const char *error;
	unsigned expect_index;
};

static void out_put(struct run *r, const char *s, size_t n)
{
	assert_true(n < OUT_MAX - r->out_len);
	memcpy(r->out + r->out_len, s, n);
	r->out_len += n;
	r->out[r->out_len] = '\0';
}

static void render(struct run *r, const struct smtp_reply_line *ln)
{
	char head[32];
	int k;

	assert_int_equal(ln->index, r->expect_index);
	r->expect_index = ln->last ? 0 : r->expect_index + 1;
	/* text is the tail of line; msg the tail of text */
	assert_ptr_equal(ln->text + ln->text_len, ln->line + ln->line_len);
	assert_ptr_equal(ln->msg + ln->msg_len, ln->text + ln->text_len);
	assert_int_equal(ln->line[0] - '0', ln->code / 100);
	if (ln->esc.klass)
		k = snprintf(head, sizeof(head), "%u%c<%u.%u.%u>|", ln->code, ln->last ? ' ' : '-',
		             ln->esc.klass, ln->esc.subject, ln->esc.detail);
	else
		k = snprintf(head, sizeof(head), "%u%c|", ln->code, ln->last ? ' ' : '-');
	out_put(r, head, (size_t)k);
	for (size_t i = 0; i < ln->msg_len; i++) {
		if (ln->msg[i] == '\0')
			out_put(r, "\\0", 2);
		else
			out_put(r, ln->msg + i, 1);
	}
	out_put(r, "\n", 1);
}

/* Feeds one piece; returns false after an error. */
static bool feed(struct smtp_reply_parser *p, struct run *r, const char *in, size_t len)
{
	struct smtp_reply_line ln;
	size_t used;
	int rc;

	for (;;) {
		rc = smtp_reply_parser_next(p, in, len, &used, &ln, &r->error);
		assert_true(used <= len);
		if (rc < 0) {
			assert_non_null(r->error);
			return false;
		}
		if (rc == 0) {
			assert_int_equal(used, len);
			return true;
		}
		assert_int_equal(rc, 1);
		render(r, &ln);
		in += used;
		len -= used;
		if (len == 0)
			return true;
	}
}

static void check(const struct reply_case *c, const struct run *r, const char *how,
                  const struct smtp_reply_parser *p)
{
	if (strcmp(r->out, c->want) != 0)
		fail_msg("case %s (%s): lines\n%s\nwant\n%s", c->name, how, r->out, c->want);
	if (c->want_error) {
		if (!r->error || !strstr(r->error, c->want_error))
			fail_msg("case %s (%s): error \"%s\", want \"%s\"", c->name, how,
			         r->error ? r->error : "(none)", c->want_error);
	} else if (r->error) {
		fail_msg("case %s (%s): unexpected error \"%s\"", c->name, how, r->error);
	} else if (smtp_reply_parser_idle(p) != c->want_idle) {
		fail_msg("case %s (%s): idle %d, want %d", c->name, how, smtp_reply_parser_idle(p),
		         c->want_idle);
	}
}

static void parser_for(const struct reply_case *c, struct smtp_reply_parser *p)
{
	struct smtp_reply_limits lim;

	smtp_reply_limits_default(&lim);
	if (c->max_line)
		lim.max_line = c->max_line;
	if (c->max_lines)
		lim.max_lines = c->max_lines;
	assert_int_equal(smtp_reply_parser_init(p, &lim), 0);
}

/*
 * Runs a case with pieces of the input delimited by `cuts` (sorted offsets).
 * Each piece is copied to its own heap block so that ASan sees any read past it.
 */
static void run_split(const struct reply_case *c, const size_t *cuts, unsigned ncuts,
                      const char *how)
{
	size_t len = c->in_len ? c->in_len : strlen(c->in), start = 0;
	struct smtp_reply_parser p;
	struct run *r = calloc(1, sizeof(*r));
	unsigned i;

	assert_non_null(r);
	parser_for(c, &p);
	for (i = 0; i <= ncuts; i++) {
		size_t end = i < ncuts ? cuts[i] : len;
		char *piece = malloc(end - start + 1);
		bool ok;

		assert_non_null(piece);
		memcpy(piece, c->in + start, end - start);
		ok = feed(&p, r, piece, end - start);
		free(piece);
		start = end;
		if (!ok)
			break;
	}
	check(c, r, how, &p);
	smtp_reply_parser_deinit(&p);
	free(r);
}

static void run_case(const struct reply_case *c)
{
	size_t len = c->in_len ? c->in_len : strlen(c->in), i;
	size_t *cuts = malloc((len + 1) * sizeof(*cuts));
	char how[64];

	assert_non_null(cuts);
	run_split(c, NULL, 0, "whole");
	for (i = 1; i < len; i++) {
		cuts[0] = i;
		snprintf(how, sizeof(how), "split at %zu", i);
		run_split(c, cuts, 1, how);
	}
	for (i = 1; i < len; i++)
		cuts[i - 1] = i;
	if (len > 1)
		run_split(c, cuts, (unsigned)(len - 1), "byte by byte");
	free(cuts);
}

static const struct reply_case good_cases[] = {
    {.name = "greeting",
     .in = "220 mx.example.com ESMTP Postfix\r\n",
     .want = "220 |mx.example.com ESMTP Postfix\n",
     .want_idle = true},
    {.name = "bare code", .in = "250\r\n", .want = "250 |\n", .want_idle = true},
    {.name = "code and space only", .in = "354 \r\n", .want = "354 |\n", .want_idle = true},
    {.name = "bare LF line end",
     .in = "250 ok\n221 bye\n",
     .want = "250 |ok\n221 |bye\n",
     .want_idle = true},
    {.name = "enhanced code",
     .in = "250 2.1.0 Ok\r\n",
     .want = "250 <2.1.0>|Ok\n",
     .want_idle = true},
    {.name = "enhanced code three-digit parts",
     .in = "550 5.123.456 nope\r\n",
     .want = "550 <5.123.456>|nope\n",
     .want_idle = true},
    {.name = "enhanced code alone",
     .in = "250 2.0.0\r\n",
     .want = "250 <2.0.0>|\n",
     .want_idle = true},
    {.name = "enhanced code many spaces",
     .in = "451 4.3.0   try later\r\n",
     .want = "451 <4.3.0>|try later\n",
     .want_idle = true},
    {.name = "enhanced class mismatch is text",
     .in = "250 5.1.1 odd\r\n",
     .want = "250 |5.1.1 odd\n",
     .want_idle = true},
    {.name = "enhanced four-digit part is text",
     .in = "250 2.1000.0 x\r\n",
     .want = "250 |2.1000.0 x\n",
     .want_idle = true},
    {.name = "enhanced without space is text",
     .in = "250 2.1.0Ok\r\n",
     .want = "250 |2.1.0Ok\n",
     .want_idle = true},
    {.name = "enhanced missing detail is text",
     .in = "250 2.1. x\r\n",
     .want = "250 |2.1. x\n",
     .want_idle = true},
    {.name = "ehlo multiline",
     .in = "250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"
           "250-8BITMIME\r\n250-CHUNKING\r\n250 SMTPUTF8\r\n",
     .want = "250-|mx.example.com\n250-|PIPELINING\n250-|SIZE 10240000\n250-|8BITMIME\n"
             "250-|CHUNKING\n250 |SMTPUTF8\n",
     .want_idle = true},
    {.name = "multiline enhanced on every line",
     .in = "550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 third\r\n",
     .want = "550-<5.7.1>|first\n550-<5.7.1>|second\n550 <5.7.1>|third\n",
     .want_idle = true},
    {.name = "empty continuation text",
     .in = "250-\r\n250 done\r\n",
     .want = "250-|\n250 |done\n",
     .want_idle = true},
    {.name = "pipelined replies",
     .in =
         "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
     .want =
         "250 <2.1.0>|Ok\n250 <2.1.5>|Ok\n250 <2.1.5>|Ok\n354 |End data with <CR><LF>.<CR><LF>\n",
     .want_idle = true},
    {.name = "partial reply pending",
     .in = "250-a\r\n250-b\r\n",
     .want = "250-|a\n250-|b\n",
     .want_idle = false},
    {.name = "partial line pending", .in = "250 o", .want = "", .want_idle = false},
    {.name = "CR inside text kept", .in = "250 a\rb\r\n", .want = "250 |a\rb\n", .want_idle = true},
    {.name = "NUL inside text kept",
     .in = "250 a\0b\r\n",
     .in_len = 9,
     .want = "250 |a\\0b\n",
     .want_idle = true},
    {.name = "line at exactly max_line",
     .in = "250 abcd\r\n", /* 10 octets */
     .max_line = 10,
     .want = "250 |abcd\n",
     .want_idle = true},
    {.name = "lines at exactly max_lines",
     .in = "250-a\r\n250-b\r\n250 c\r\n",
     .max_lines = 3,
     .want = "250-|a\n250-|b\n250 |c\n",
     .want_idle = true},
    {.name = "highest code", .in = "559 x\r\n", .want = "559 |x\n", .want_idle = true},
    {.name = "421 then more",
     .in = "421 4.4.2 mx Error: timeout exceeded\r\n",
     .want = "421 <4.4.2>|mx Error: timeout exceeded\n",
     .want_idle = true},
};

static const struct reply_case bad_cases[] = {
    {.name = "letters in code", .in = "2x0 ok\r\n", .want = "", .want_error = "3-digit"},
    {.name = "short line", .in = "25\r\n", .want = "", .want_error = "3-digit"},
    {.name = "empty line", .in = "\r\n", .want = "", .want_error = "3-digit"},
    {.name = "code 199", .in = "199 x\r\n", .want = "", .want_error = "out of range"},
    {.name = "code 600", .in = "600 x\r\n", .want = "", .want_error = "out of range"},
    {.name = "code 260", .in = "260 x\r\n", .want = "", .want_error = "out of range"},
    {.name = "missing separator", .in = "250ok\r\n", .want = "", .want_error = "no SP"},
    {.name = "tab separator", .in = "250\tok\r\n", .want = "", .want_error = "no SP"},
    {.name = "four digits", .in = "2500 ok\r\n", .want = "", .want_error = "no SP"},
    {.name = "leading space", .in = " 250 ok\r\n", .want = "", .want_error = "3-digit"},
    {.name = "inconsistent codes",
     .in = "250-a\r\n251 b\r\n",
     .want = "250-|a\n",
     .want_error = "251 after 250"},
    {.name = "inconsistent continuation",
     .in = "250-a\r\n550-b\r\n250 c\r\n",
     .want = "250-|a\n",
     .want_error = "550 after 250"},
    {.name = "error after good replies",
     .in = "250 ok\r\n250 ok\r\nHTTP/1.1 400 Bad\r\n",
     .want = "250 |ok\n250 |ok\n",
     .want_error = "3-digit"},
    {.name = "overlong line",
     .in = "250 abcde\r\n", /* 11 octets */
     .max_line = 10,
     .want = "",
     .want_error = "longer than 10"},
    {.name = "overlong line without LF",
     .in = "250 abcdefghijk",
     .max_line = 10,
     .want = "",
     .want_error = "longer than 10"},
    {.name = "overlong after good line",
     .in = "250-ok\r\n250-abcdefghijk\r\n",
     .max_line = 10,
     .want = "250-|ok\n",
     .want_error = "longer than 10"},
    {.name = "too many lines",
     .in = "250-a\r\n250-b\r\n250-c\r\n250 d\r\n",
     .max_lines = 3,
     .want = "250-|a\n250-|b\n",
     .want_error = "more than 3 lines"},
    {.name = "binary junk", .in = "\x80\xff\x01\n", .want = "", .want_error = "3-digit"},
};

static void test_good(void **state)
{
	for (size_t i = 0; i < ARRAY_SIZE(good_cases); i++)
		run_case(&good_cases[i]);
}

static void test_bad(void **state)
{
	for (size_t i = 0; i < ARRAY_SIZE(bad_cases); i++)
		run_case(&bad_cases[i]);
}

/* The default limits: a 2048-octet line passes, 2049 fails; 100 lines pass, 101 fail. */
static void test_default_limits(void **state)
{
	char *big = malloc(4096 + 100 * 8);
	struct reply_case c = {.name = "default max_line", .want_idle = true};
	char *want = malloc(4096);
	size_t i, n;

	assert_non_null(big);
	assert_non_null(want);
	memcpy(big, "250 ", 4);
	memset(big + 4, 'x', 2042);
	memcpy(big + 2046, "\r\n", 3);
	snprintf(want, 4096, "250 |%.*s\n", 2042, big + 4);
	c.in = big;
	c.want = want;
	run_split(&c, NULL, 0, "whole");
	{
		size_t cuts[] = {1000, 2047};
		run_split(&c, cuts, 2, "three pieces");
	}
	memcpy(big + 2046, "x\r\n", 4);
	c.name = "default max_line + 1";
	c.want = "";
	c.want_error = "longer than 2048";
	run_split(&c, NULL, 0, "whole");

	for (n = 0, i = 0; i < 99; i++)
		n += (size_t)sprintf(big + n, "250-%02zu\r\n", i);
	n += (size_t)sprintf(big + n, "250 end\r\n");
	c.name = "100 lines";
	c.in = big;
	c.want_error = NULL;
	{
		struct smtp_reply_parser p;
		struct run *r = calloc(1, sizeof(*r));
		assert_non_null(r);
		assert_int_equal(smtp_reply_parser_init(&p, NULL), 0);
		assert_true(feed(&p, r, big, n));
		assert_null(r->error);
		assert_true(smtp_reply_parser_idle(&p));
		/* 101 lines */
		n = 0;
		for (i = 0; i < 100; i++)
			n += (size_t)sprintf(big + n, "250-%02zu\r\n", i);
		n += (size_t)sprintf(big + n, "250 end\r\n");
		assert_false(feed(&p, r, big, n));
		assert_non_null(strstr(r->error, "more than 100 lines"));
		smtp_reply_parser_deinit(&p);
		free(r);
	}
	free(big);
	free(want);
}

/* A line whole inside the input is yielded in place; a straddling line from the parser's buffer. */
static void test_zero_copy(void **state)
{
	static const char in[] = "250-first\r\n250 second\r\n";
	struct smtp_reply_parser p;
	struct smtp_reply_line ln;
	size_t used;

	assert_int_equal(smtp_reply_parser_init(&p, NULL), 0);
	assert_int_equal(smtp_reply_parser_next(&p, in, sizeof(in) - 1, &used, &ln, NULL), 1);
	assert_int_equal(used, 11);
	assert_ptr_equal(ln.line, in);
	assert_ptr_equal(ln.text, in + 4);
	assert_int_equal(ln.text_len, 5);
	assert_false(ln.last);
	assert_false(smtp_reply_parser_idle(&p));
	/* the second line split in two */
	assert_int_equal(smtp_reply_parser_next(&p, in + 11, 5, &used, &ln, NULL), 0);
	assert_int_equal(used, 5);
	assert_int_equal(smtp_reply_parser_next(&p, in + 16, sizeof(in) - 1 - 16, &used, &ln, NULL),
	                 1);
	assert_true(ln.line < in || ln.line >= in + sizeof(in));
	assert_int_equal(ln.text_len, 6);
	assert_memory_equal(ln.text, "second", 6);
	assert_true(ln.last);
	assert_int_equal(ln.index, 1);
	assert_true(smtp_reply_parser_idle(&p));
	/* empty input */
	assert_int_equal(smtp_reply_parser_next(&p, in, 0, &used, &ln, NULL), 0);
	assert_int_equal(used, 0);
	smtp_reply_parser_deinit(&p);
	smtp_reply_parser_deinit(&p); /* twice is harmless */
}

/* Errors stick until reset; reset makes the parser usable again. */
static void test_sticky_error_and_reset(void **state)
{
	struct smtp_reply_parser p;
	struct smtp_reply_line ln;
	const char *err = NULL, *err2 = NULL;
	size_t used;

	assert_int_equal(smtp_reply_parser_init(&p, NULL), 0);
	assert_int_equal(smtp_reply_parser_next(&p, "xyz\r\n", 5, &used, &ln, &err), -1);
	assert_non_null(err);
	assert_int_equal(smtp_reply_parser_next(&p, "250 ok\r\n", 8, &used, &ln, &err2), -1);
	assert_int_equal(used, 0);
	assert_string_equal(err, err2);
	assert_false(smtp_reply_parser_idle(&p));
	smtp_reply_parser_reset(&p);
	assert_true(smtp_reply_parser_idle(&p));
	assert_int_equal(smtp_reply_parser_next(&p, "250 ok\r\n", 8, &used, &ln, &err), 1);
	assert_int_equal(ln.code, 250);
	/* reset drops a partial reply and a partial line */
	assert_int_equal(smtp_reply_parser_next(&p, "250-a\r\n550 b", 12, &used, &ln, &err), 1);
	assert_int_equal(smtp_reply_parser_next(&p, "550 b", 5, &used, &ln, &err), 0);
	smtp_reply_parser_reset(&p);
	assert_int_equal(smtp_reply_parser_next(&p, "221 bye\r\n", 9, &used, &ln, &err), 1);
	assert_int_equal(ln.code, 221);
	assert_int_equal(ln.index, 0);
	assert_true(ln.last);
	smtp_reply_parser_deinit(&p);
}

static void test_init_limits(void **state)
{
	struct smtp_reply_parser p;
	struct smtp_reply_limits lim = {.max_line = 7, .max_lines = 1};

	assert_int_equal(smtp_reply_parser_init(&p, &lim), -EINVAL);
	smtp_reply_parser_deinit(&p);
	lim.max_line = 8;
	lim.max_lines = 0;
	assert_int_equal(smtp_reply_parser_init(&p, &lim), -EINVAL);
	smtp_reply_parser_deinit(&p);
	lim.max_lines = 1;
	assert_int_equal(smtp_reply_parser_init(&p, &lim), 0);
	smtp_reply_parser_deinit(&p);
}

/* ---- EHLO capabilities ---- */

struct caps_case {
	const char *name;
	const char *in; /* a whole reply */
	unsigned flags;
	unsigned auth;
	uint64_t size_max;
};

static const struct caps_case caps_cases[] = {
    {"postfix",
     "250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ETRN\r\n"
     "250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n"
     "250-SMTPUTF8\r\n250 CHUNKING\r\n",
     SMTP_CAP_PIPELINING | SMTP_CAP_SIZE | SMTP_CAP_STARTTLS | SMTP_CAP_ENHANCEDSTATUSCODES |
         SMTP_CAP_8BITMIME | SMTP_CAP_DSN | SMTP_CAP_SMTPUTF8 | SMTP_CAP_CHUNKING,
     0, 10240000},
    {"greeting line ignored", "250 PIPELINING\r\n", 0, 0, 0},
    {"lower case", "250-x\r\n250-pipelining\r\n250 chunking\r\n",
     SMTP_CAP_PIPELINING | SMTP_CAP_CHUNKING, 0, 0},
    {"auth", "250-x\r\n250-AUTH PLAIN LOGIN CRAM-MD5 GSSAPI\r\n250 SIZE\r\n",
     SMTP_CAP_AUTH | SMTP_CAP_SIZE,
     SMTP_AUTH_PLAIN | SMTP_AUTH_LOGIN | SMTP_AUTH_CRAM_MD5 | SMTP_AUTH_OTHER, 0},
    {"old auth=", "250-x\r\n250-AUTH=LOGIN PLAIN\r\n250 XOAUTH2\r\n", SMTP_CAP_AUTH,
     SMTP_AUTH_LOGIN | SMTP_AUTH_PLAIN, 0},
    {"size garbage", "250-x\r\n250 SIZE 12k\r\n", SMTP_CAP_SIZE, 0, 0},
    {"size overflow", "250-x\r\n250 SIZE 99999999999999999999999\r\n", SMTP_CAP_SIZE, 0, 0},
    {"prefix is not a keyword", "250-x\r\n250-PIPELININGX\r\n250 CHUNK\r\n", 0, 0, 0},
    {"not a 250", "550-x\r\n550-PIPELINING\r\n550 CHUNKING\r\n", 0, 0, 0},
    {"leading spaces", "250-x\r\n250-  PIPELINING  \r\n250 BINARYMIME\r\n",
     SMTP_CAP_PIPELINING | SMTP_CAP_BINARYMIME, 0, 0},
    {"with enhanced-looking text", "250-x\r\n250 2.0.0 REQUIRETLS\r\n", 0, 0, 0},
};

static void test_caps(void **state)
{
	for (size_t i = 0; i < ARRAY_SIZE(caps_cases); i++) {
		const struct caps_case *c = &caps_cases[i];
		struct smtp_reply_caps caps = {0};
		struct smtp_reply_parser p;
		struct smtp_reply_line ln;
		const char *in = c->in;
		size_t len = strlen(in), used;
		int rc;

		assert_int_equal(smtp_reply_parser_init(&p, NULL), 0);
		while ((rc = smtp_reply_parser_next(&p, in, len, &used, &ln, NULL)) == 1) {
			smtp_reply_caps_learn(&caps, &ln);
			in += used;
			len -= used;
			if (ln.last)
				break;
		}
		if (caps.flags != c->flags || caps.auth != c->auth || caps.size_max != c->size_max)
			fail_msg("caps case %s: flags %#x auth %#x size %llu", c->name, caps.flags,
			         caps.auth, (unsigned long long)caps.size_max);
		assert_true(ln.last);
		smtp_reply_parser_deinit(&p);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_good),
	    cmocka_unit_test(test_bad),
	    cmocka_unit_test(test_default_limits),
	    cmocka_unit_test(test_zero_copy),
	    cmocka_unit_test(test_sticky_error_and_reset),
	    cmocka_unit_test(test_init_limits),
	    cmocka_unit_test(test_caps),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
