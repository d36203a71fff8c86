/*
 * Unit tests of mta/smtp/smtp_parser: tables of named cases.
 *
 * Stream cases are fed through the parser whole, one octet at a time, in
 * every 2-way split and (for short inputs) every 3-way split, each piece in
 * its own exactly-sized heap buffer that is freed after use (so ASan sees any
 * slice that outlives its input). The harness acts as the server does: on an
 * accepted DATA or BDAT command it switches the parser's mode. Every split
 * must give the same transcript, which is compared with the expected one:
 *
 *   C"line"/nul/lf/cr   SMTP_EV_COMMAND with its flags
 *   LONG                SMTP_EV_COMMAND_TOO_LONG
 *   B"octets"           consecutive SMTP_EV_BODY slices, joined
 *   END n/lf/cr/nul/long/8bit   SMTP_EV_DATA_END, size and flags
 *   BEND n              SMTP_EV_BDAT_END
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "mta/smtp/smtp_parser.h"

#define IN(s) s, sizeof(s) - 1

static const struct smtp_limits lim_default = {2048, 1000, 64, 255, 256};
static const struct smtp_limits lim_cmd16 = {16, 1000, 64, 255, 256};
static const struct smtp_limits lim_text10 = {2048, 10, 64, 255, 256};
static const struct smtp_limits lim_notext = {2048, 0, 64, 255, 256};
static const struct smtp_limits lim_path400 = {2048, 1000, 64, 255, 400};

/* ---- a growable string ---- */

struct str {
	char *s;
	size_t len, cap;
};

static void str_add(struct str *b, const void *data, size_t n)
{
	if (b->len + n + 1 > b->cap) {
		b->cap = (b->len + n + 1) * 2;
		b->s = realloc(b->s, b->cap);
		assert_non_null(b->s);
	}
	memcpy(b->s + b->len, data, n);
	b->len += n;
	b->s[b->len] = '\0';
}

static void str_addf(struct str *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void str_addf(struct str *b, const char *fmt, ...)
{
	char tmp[128];
	va_list ap;

	va_start(ap, fmt);
	int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
	va_end(ap);
	str_add(b, tmp, (size_t)n);
}

static void str_escape(struct str *b, const char *data, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)data[i];

		switch (c) {
		case '\r':
			str_add(b, "\\r", 2);
			break;
		case '\n':
			str_add(b, "\\n", 2);
			break;
		case '\0':
			str_add(b, "\\0", 2);
			break;
		case '"':
			str_add(b, "\\\"", 2);
			break;
		case '\\':
			str_add(b, "\\\\", 2);
			break;
		default:
			if (c >= 32 && c < 127)
				str_add(b, &c, 1);
			else
				str_addf(b, "\\x%02x", c);
		}
	}
}

/* ---- the session harness ---- */

struct session {
	struct smtp_parser p;
	const struct smtp_limits *lim;
	struct str out;      /* transcript */
	struct str body;     /* body octets not yet written to out */
	uint64_t body_total; /* octets since the last DATA/BDAT began */
};

static void session_flush_body(struct session *ss)
{
	if (ss->body.len == 0)
		return;
	if (ss->out.len > 0)
		str_add(&ss->out, " ", 1);
	str_add(&ss->out, "B\"", 2);
	str_escape(&ss->out, ss->body.s, ss->body.len);
	str_add(&ss->out, "\"", 1);
	ss->body.len = 0;
}

static void session_word(struct session *ss)
{
	session_flush_body(ss);
	if (ss->out.len > 0)
		str_add(&ss->out, " ", 1);
}

static bool inside(const char *x, size_t n, const char *base, size_t len)
{
	return x >= base && x <= base + len && n <= (size_t)(base + len - x);
}

static void session_event(struct session *ss, const struct smtp_event *ev, const char *in,
                          size_t used)
{
	struct smtp_command cmd;

	switch (ev->type) {
	case SMTP_EV_COMMAND:
		assert_true(inside(ev->data, ev->len, in, used) ||
		            inside(ev->data, ev->len, ss->p.buf, ss->lim->max_command_line));
		session_word(ss);
		str_add(&ss->out, "C\"", 2);
		str_escape(&ss->out, ev->data, ev->len);
		str_add(&ss->out, "\"", 1);
		if (ev->flags & SMTP_LINE_NUL)
			str_add(&ss->out, "/nul", 4);
		if (ev->flags & SMTP_LINE_BARE_LF)
			str_add(&ss->out, "/lf", 3);
		if (ev->flags & SMTP_LINE_BARE_CR)
			str_add(&ss->out, "/cr", 3);
		if (smtp_command_parse(ev->data, ev->len, ss->lim, &cmd) == SMTP_CMD_OK) {
			if (cmd.verb == SMTP_VERB_DATA) {
				smtp_parser_begin_data(&ss->p);
				ss->body_total = 0;
			} else if (cmd.verb == SMTP_VERB_BDAT) {
				smtp_parser_begin_bdat(&ss->p, cmd.bdat_size);
				ss->body_total = 0;
			}
		}
		break;
	case SMTP_EV_COMMAND_TOO_LONG:
		assert_int_equal(ev->len, 0);
		session_word(ss);
		str_add(&ss->out, "LONG", 4);
		break;
	case SMTP_EV_BODY:
		assert_true(ev->len > 0);
		if (!inside(ev->data, ev->len, in, used)) {
			/* Only a held-back CR comes from elsewhere (a constant). */
			assert_int_equal(ev->len, 1);
			assert_int_equal(ev->data[0], '\r');
		}
		str_add(&ss->body, ev->data, ev->len);
		ss->body_total += ev->len;
		break;
	case SMTP_EV_DATA_END:
		assert_int_equal(ev->size, ss->body_total);
		assert_int_equal(smtp_parser_mode(&ss->p), SMTP_MODE_COMMAND);
		session_word(ss);
		str_addf(&ss->out, "END %llu", (unsigned long long)ev->size);
		if (ev->flags & SMTP_BODY_BARE_LF)
			str_add(&ss->out, "/lf", 3);
		if (ev->flags & SMTP_BODY_BARE_CR)
			str_add(&ss->out, "/cr", 3);
		if (ev->flags & SMTP_BODY_NUL)
			str_add(&ss->out, "/nul", 4);
		if (ev->flags & SMTP_BODY_LONG_LINE)
			str_add(&ss->out, "/long", 5);
		if (ev->flags & SMTP_BODY_8BIT)
			str_add(&ss->out, "/8bit", 5);
		break;
	case SMTP_EV_BDAT_END:
		assert_int_equal(ev->size, ss->body_total);
		assert_int_equal(smtp_parser_mode(&ss->p), SMTP_MODE_COMMAND);
		session_word(ss);
		str_addf(&ss->out, "BEND %llu", (unsigned long long)ev->size);
		break;
	default:
		fail_msg("unexpected event type %d", (int)ev->type);
	}
}

/* Feeds one piece (copied to its own heap buffer, freed on return) until the parser wants more. */
static void session_feed(struct session *ss, const char *data, size_t len)
{
	char *in = malloc(len > 0 ? len : 1);
	size_t off = 0;
	unsigned idle = 0;

	assert_non_null(in);
	memcpy(in, data, len);
	for (;;) {
		struct smtp_event ev;
		size_t used = (size_t)-1;
		int r = smtp_parser_next(&ss->p, in + off, len - off, &used, &ev);

		assert_true(r == 0 || r == 1);
		assert_true(used <= len - off);
		if (r == 0) {
			assert_int_equal(used, len - off);
			break;
		}
		/* Events without input (held CR, BDAT_END) cannot repeat forever. */
		idle = used == 0 ? idle + 1 : 0;
		assert_true(idle <= 2);
		session_event(ss, &ev, in + off, used);
		off += used;
	}
	free(in);
}

/* Runs `in` split at cuts[0..ncuts) (ascending) and returns the transcript (malloc'd). */
static char *session_run(const char *in, size_t len, const struct smtp_limits *lim,
                         const size_t *cuts, size_t ncuts)
{
	struct session ss = {.lim = lim};
	size_t from = 0;

	assert_int_equal(smtp_parser_init(&ss.p, lim), 0);
	for (size_t i = 0; i <= ncuts; i++) {
		size_t to = i < ncuts ? cuts[i] : len;

		session_feed(&ss, in + from, to - from);
		from = to;
	}
	session_flush_body(&ss);
	smtp_parser_deinit(&ss.p);
	free(ss.body.s);
	if (ss.out.s == NULL)
		return strdup("");
	return ss.out.s;
}

static void expect_run(const char *name, const char *in, size_t len, const struct smtp_limits *lim,
                       const size_t *cuts, size_t ncuts, const char *expect)
{
	char *got = session_run(in, len, lim, cuts, ncuts);

	if (strcmp(got, expect) != 0) {
		print_error("%s: split at", name);
		for (size_t i = 0; i < ncuts; i++)
			print_error(" %zu", cuts[i]);
		print_error("\n");
	}
	assert_string_equal(got, expect);
	free(got);
}

/* Every split strategy must give `expect`. */
static void expect_all_splits(const char *name, const char *in, size_t len,
                              const struct smtp_limits *lim, bool three_way, const char *expect)
{
	size_t cuts[2];

	expect_run(name, in, len, lim, NULL, 0, expect);

	size_t *each = malloc((len > 0 ? len : 1) * sizeof(*each));

	assert_non_null(each);
	for (size_t i = 0; i + 1 < len; i++)
		each[i] = i + 1;
	expect_run(name, in, len, lim, each, len > 0 ? len - 1 : 0, expect);
	free(each);

	for (size_t i = 0; i <= len; i++) {
		cuts[0] = i;
		expect_run(name, in, len, lim, cuts, 1, expect);
	}
	if (!three_way || len > 80)
		return;
	for (size_t i = 0; i <= len; i++) {
		for (size_t j = i; j <= len; j++) {
			cuts[0] = i;
			cuts[1] = j;
			expect_run(name, in, len, lim, cuts, 2, expect);
		}
	}
}

/* ---- stream cases ---- */

struct stream_case {
	const char *name;
	const char *in;
	size_t len;
	const struct smtp_limits *lim;
	const char *expect;
};

#define STREAM(name, in, expect)                                                                   \
	{                                                                                          \
		name, IN(in), &lim_default, expect                                                 \
	}
#define STREAM_LIM(name, in, lim, expect)                                                          \
	{                                                                                          \
		name, IN(in), lim, expect                                                          \
	}

static const struct stream_case stream_cases[] = {
    /* command framing */
    STREAM("cmd_crlf", "NOOP\r\n", "C\"NOOP\""),
    STREAM("cmd_bare_lf", "NOOP\n", "C\"NOOP\"/lf"),
    STREAM("cmd_bare_cr_inside", "NO\rOP\r\n", "C\"NO\\rOP\"/cr"),
    STREAM("cmd_cr_cr_lf", "NOOP\r\r\n", "C\"NOOP\\r\"/cr"),
    STREAM("cmd_nul", "NO\0OP\r\n", "C\"NO\\0OP\"/nul"),
    STREAM("cmd_nul_bare_lf_cr", "\0\r \n", "C\"\\0\\r \"/nul/lf/cr"),
    STREAM("cmd_lf_then_cr_line", "NOOP\n\rQUIT\r\n", "C\"NOOP\"/lf C\"\\rQUIT\"/cr"),
    STREAM("cmd_empty_lines", "\r\n\n", "C\"\" C\"\"/lf"),
    STREAM("cmd_partial_line", "NOOP\r", ""),
    STREAM("cmd_pipelined_group",
           "MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<e@f.example>\r\n"
           "DATA\r\n",
           "C\"MAIL FROM:<a@b.example>\" C\"RCPT TO:<c@d.example>\" "
           "C\"RCPT TO:<e@f.example>\" C\"DATA\""),
    STREAM("cmd_pipelined_group_with_body",
           "MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<e@f.example>\r\n"
           "DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n",
           "C\"MAIL FROM:<a@b.example>\" C\"RCPT TO:<c@d.example>\" "
           "C\"RCPT TO:<e@f.example>\" C\"DATA\" B\"Subject: x\\r\\n\\r\\nhi\\r\\n\" END 18 "
           "C\"QUIT\""),
    STREAM("cmd_failed_data_stays_command", "DATA x\r\n.\r\n", "C\"DATA x\" C\".\""),
    STREAM_LIM("cmd_at_limit", "0123456789abcd\r\nNOOP\r\n", &lim_cmd16,
               "C\"0123456789abcd\" C\"NOOP\""),
    STREAM_LIM("cmd_over_limit_by_one", "0123456789abcde\r\nNOOP\r\n", &lim_cmd16,
               "LONG C\"NOOP\""),
    STREAM_LIM("cmd_bare_lf_at_limit", "0123456789abcde\nNOOP\r\n", &lim_cmd16,
               "C\"0123456789abcde\"/lf C\"NOOP\""),
    STREAM_LIM("cmd_bare_lf_over_limit", "0123456789abcdef\nNOOP\r\n", &lim_cmd16,
               "LONG C\"NOOP\""),
    STREAM_LIM("cmd_far_over_limit_once",
               "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n"
               "QUIT\r\n",
               &lim_cmd16, "LONG C\"QUIT\""),
    STREAM_LIM("cmd_over_limit_unterminated", "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
               &lim_cmd16, ""),
    STREAM_LIM("cmd_two_long_lines", "xxxxxxxxxxxxxxxxxxxxxxxx\r\nyyyyyyyyyyyyyyyyyyyyyyyyy\n",
               &lim_cmd16, "LONG LONG"),
    STREAM_LIM("cmd_long_then_at_limit", "xxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n0123456789abcd\r\n",
               &lim_cmd16, "LONG C\"0123456789abcd\""),
    STREAM_LIM("cmd_long_line_hides_data", "xxxxxxxxxxxxxxxxxxxxxxxx\r\nDATA\r\nQUIT\r\n",
               &lim_cmd16, "LONG C\"DATA\" B\"QUIT\\r\\n\""),
    STREAM_LIM("cmd_long_line_swallows_pipelined", "xxxxxxxxxxxxxxxxxxx\rDATA\r\nQUIT\r\n",
               &lim_cmd16, "LONG C\"QUIT\""),

    /* DATA */
    STREAM("data_empty", "DATA\r\n.\r\n", "C\"DATA\" END 0"),
    STREAM("data_simple", "DATA\r\nhello\r\n.\r\n", "C\"DATA\" B\"hello\\r\\n\" END 7"),
    STREAM("data_lowercase_verb", "data\r\nx\r\n.\r\n", "C\"data\" B\"x\\r\\n\" END 3"),
    STREAM("data_then_pipelined_commands", "DATA\r\nhi\r\n.\r\nMAIL FROM:<>\r\nQUIT\r\n",
           "C\"DATA\" B\"hi\\r\\n\" END 4 C\"MAIL FROM:<>\" C\"QUIT\""),
    STREAM("data_twice", "DATA\r\na\r\n.\r\nDATA\r\nb\r\n.\r\n",
           "C\"DATA\" B\"a\\r\\n\" END 3 C\"DATA\" B\"b\\r\\n\" END 3"),
    STREAM("data_dot_stuffed", "DATA\r\n..foo\r\n..\r\n...\r\n.\r\n",
           "C\"DATA\" B\".foo\\r\\n.\\r\\n..\\r\\n\" END 13"),
    STREAM("data_starts_with_stuffed_dot_line", "DATA\r\n..\r\n.\r\n",
           "C\"DATA\" B\".\\r\\n\" END 3"),
    STREAM("data_starts_with_dot_text", "DATA\r\n.x\r\n.\r\n", "C\"DATA\" B\"x\\r\\n\" END 3"),
    STREAM("data_single_dot_mid_line", "DATA\r\na.b\r\n .\r\nc.\r\n.\r\n",
           "C\"DATA\" B\"a.b\\r\\n .\\r\\nc.\\r\\n\" END 13"),
    STREAM("data_dot_line_prefix", "DATA\r\na\r\n.b\r\n.\r\n",
           "C\"DATA\" B\"a\\r\\nb\\r\\n\" END 6"),
    STREAM("data_dot_space_line", "DATA\r\n. \r\n.\r\n", "C\"DATA\" B\" \\r\\n\" END 3"),
    STREAM("data_empty_lines", "DATA\r\n\r\n\r\n.\r\n", "C\"DATA\" B\"\\r\\n\\r\\n\" END 4"),
    STREAM("data_unterminated", "DATA\r\nabc\r\n.", "C\"DATA\" B\"abc\\r\\n\""),
    STREAM("data_unterminated_dot_cr", "DATA\r\nabc\r\n.\r", "C\"DATA\" B\"abc\\r\\n\""),
    STREAM("data_unterminated_cr", "DATA\r\nabc\r", "C\"DATA\" B\"abc\\r\""),
    STREAM("data_marker_then_bdat", "DATA\r\n.\r\nBDAT 3 LAST\r\nabc",
           "C\"DATA\" END 0 C\"BDAT 3 LAST\" B\"abc\" BEND 3"),
    /* smuggling: none of these end the data */
    STREAM("smuggle_lf_dot_lf", "DATA\r\na\n.\nb\r\n.\r\n",
           "C\"DATA\" B\"a\\n.\\nb\\r\\n\" END 7/lf"),
    STREAM("smuggle_lf_dot_crlf", "DATA\r\na\n.\r\nb\r\n.\r\n",
           "C\"DATA\" B\"a\\n.\\r\\nb\\r\\n\" END 8/lf"),
    STREAM("smuggle_crlf_dot_lf", "DATA\r\na\r\n.\nb\r\n.\r\n",
           "C\"DATA\" B\"a\\r\\n\\nb\\r\\n\" END 7/lf"),
    STREAM("smuggle_cr_dot_cr", "DATA\r\na\r.\rb\r\n.\r\n",
           "C\"DATA\" B\"a\\r.\\rb\\r\\n\" END 7/cr"),
    STREAM("smuggle_cr_dot_crlf", "DATA\r\na\r.\r\nb\r\n.\r\n",
           "C\"DATA\" B\"a\\r.\\r\\nb\\r\\n\" END 8/cr"),
    STREAM("smuggle_lf_dot_lf_at_start", "DATA\r\n\n.\n.\r\n", "C\"DATA\" B\"\\n.\\n.\\r\\n\""),
    STREAM("smuggle_lf_dot_crlf_never_ends", "DATA\r\nx\n.\r\nQUIT\r\n",
           "C\"DATA\" B\"x\\n.\\r\\nQUIT\\r\\n\""),
    STREAM("smuggle_crlf_dot_lf_never_ends", "DATA\r\nx\r\n.\nQUIT\r\n",
           "C\"DATA\" B\"x\\r\\n\\nQUIT\\r\\n\""),
    STREAM("smuggle_crlf_dot_cr_x", "DATA\r\na\r\n.\rx\r\n.\r\n",
           "C\"DATA\" B\"a\\r\\n\\rx\\r\\n\" END 7/cr"),
    STREAM("smuggle_dot_cr_cr_lf", "DATA\r\n.\r\r\n.\r\n", "C\"DATA\" B\"\\r\\r\\n\" END 3/cr"),
    STREAM("smuggle_dot_cr_dot", "DATA\r\n.\r.\r\n.\r\n", "C\"DATA\" B\"\\r.\\r\\n\" END 4/cr"),
    STREAM("smuggle_dot_cr_at_start_twice", "DATA\r\n.\r.\r\r\n.\r\n",
           "C\"DATA\" B\"\\r.\\r\\r\\n\" END 5/cr"),
    STREAM("smuggle_lf_cr_dot_cr_lf", "DATA\r\na\n\r.\r\n.\r\n",
           "C\"DATA\" B\"a\\n\\r.\\r\\n\" END 6/lf/cr"),
    /* flags */
    STREAM("data_nul", "DATA\r\na\0b\r\n.\r\n", "C\"DATA\" B\"a\\0b\\r\\n\" END 5/nul"),
    STREAM("data_8bit", "DATA\r\n\xc3\xa9t\xc3\xa9\r\n.\r\n",
           "C\"DATA\" B\"\\xc3\\xa9t\\xc3\\xa9\\r\\n\" END 7/8bit"),
    STREAM("data_bare_cr_before_crlf", "DATA\r\nab\r\r\n.\r\n",
           "C\"DATA\" B\"ab\\r\\r\\n\" END 5/cr"),
    STREAM_LIM("data_all_flags", "DATA\r\n\0\x80 long line over ten\r\nx\ny\rz\r\n.\r\n",
               &lim_text10,
               "C\"DATA\" B\"\\0\\x80 long line over ten\\r\\nx\\ny\\rz\\r\\n\" "
               "END 30/lf/cr/nul/long/8bit"),
    STREAM("data_long_text_crossing_vector_blocks",
           "DATA\r\n0123456789012345678901234567890123456789\r\n"
           "..0123456789012345678901234567890123456789\r\n"
           "\xe2\x82\xac"
           "0123456789012345678901234567\r\n.\r\n",
           "C\"DATA\" B\"0123456789012345678901234567890123456789\\r\\n"
           ".0123456789012345678901234567890123456789\\r\\n"
           "\\xe2\\x82\\xac0123456789012345678901234567\\r\\n\" END 118/8bit"),
    STREAM_LIM("data_text_line_at_limit", "DATA\r\n12345678\r\n.\r\n", &lim_text10,
               "C\"DATA\" B\"12345678\\r\\n\" END 10"),
    STREAM_LIM("data_text_line_over_limit", "DATA\r\n12345678\r\n123456789\r\n.\r\n", &lim_text10,
               "C\"DATA\" B\"12345678\\r\\n123456789\\r\\n\" END 21/long"),
    STREAM_LIM("data_text_line_stuffed_at_limit", "DATA\r\n..2345678\r\n.\r\n", &lim_text10,
               "C\"DATA\" B\".2345678\\r\\n\" END 10"),
    STREAM_LIM("data_text_line_bare_lf_ends_line", "DATA\r\n123456789\nx\r\n.\r\n", &lim_text10,
               "C\"DATA\" B\"123456789\\nx\\r\\n\" END 13/lf"),
    STREAM_LIM("data_text_line_held_cr_counts", "DATA\r\n.\r1234567\r\n.\r\n", &lim_text10,
               "C\"DATA\" B\"\\r1234567\\r\\n\" END 10/cr"),
    STREAM_LIM("data_text_line_held_cr_over", "DATA\r\n.\r12345678\r\n.\r\n", &lim_text10,
               "C\"DATA\" B\"\\r12345678\\r\\n\" END 11/cr/long"),
    STREAM_LIM("data_text_line_no_limit",
               "DATA\r\n0123456789012345678901234567890123456789\r\n.\r\n", &lim_notext,
               "C\"DATA\" B\"0123456789012345678901234567890123456789\\r\\n\" END 42"),

    /* BDAT */
    STREAM("bdat_then_pipelined", "BDAT 5\r\nhelloQUIT\r\n",
           "C\"BDAT 5\" B\"hello\" BEND 5 C\"QUIT\""),
    STREAM("bdat_zero_last", "BDAT 0 LAST\r\n", "C\"BDAT 0 LAST\" BEND 0"),
    STREAM("bdat_zero_then_command", "BDAT 0\r\nNOOP\r\n", "C\"BDAT 0\" BEND 0 C\"NOOP\""),
    STREAM("bdat_no_unstuffing", "BDAT 9\r\n\r\n.\r\n..\n\rQUIT\r\n",
           "C\"BDAT 9\" B\"\\r\\n.\\r\\n..\\n\\r\" BEND 9 C\"QUIT\""),
    STREAM("bdat_partial", "BDAT 10\r\nabc", "C\"BDAT 10\" B\"abc\""),
    STREAM("bdat_bad_size_stays_command", "BDAT x\r\nabc\r\n", "C\"BDAT x\" C\"abc\""),
    STREAM("bdat_two_chunks", "bdat 3\r\nabcBDAT 2 last\r\nde",
           "C\"bdat 3\" B\"abc\" BEND 3 C\"BDAT 2 last\" B\"de\" BEND 2"),
    STREAM("bdat_chunk_is_a_command_line", "BDAT 6\r\nQUIT\r\nNOOP\r\n",
           "C\"BDAT 6\" B\"QUIT\\r\\n\" BEND 6 C\"NOOP\""),
};

static void test_stream(void **state)
{
	const struct stream_case *c = *state;

	expect_all_splits(c->name, c->in, c->len, c->lim, true, c->expect);
}

/* ---- text line lengths around max_text_line 1000 ---- */

struct textline_case {
	const char *name;
	size_t content;    /* octets before the terminator */
	const char *term;  /* "\r\n" or "\n" */
	bool stuffed;      /* the line starts with a stuffing "." (not counted) */
	const char *flags; /* expected END flags */
};

static const struct textline_case textline_cases[] = {
    {"text_line_998_incl_crlf", 996, "\r\n", false, ""},
    {"text_line_999_incl_crlf", 997, "\r\n", false, ""},
    {"text_line_1000_incl_crlf", 998, "\r\n", false, ""},
    {"text_line_1001_incl_crlf", 999, "\r\n", false, "/long"},
    {"text_line_1002_incl_crlf", 1000, "\r\n", false, "/long"},
    {"text_line_1003_incl_crlf", 1001, "\r\n", false, "/long"},
    {"text_line_1000_stuffed", 998, "\r\n", true, ""},
    {"text_line_1001_stuffed", 999, "\r\n", true, "/long"},
    {"text_line_1000_bare_lf", 999, "\n", false, "/lf"},
    {"text_line_1001_bare_lf", 1000, "\n", false, "/lf/long"},
};

static void test_textline(void **state)
{
	const struct textline_case *c = *state;
	struct str in = {0}, body = {0}, expect = {0};

	str_add(&in, "DATA\r\nfirst\r\n", 13);
	str_add(&body, "first\r\n", 7);
	if (c->stuffed)
		str_add(&in, ".", 1);
	for (size_t i = 0; i < c->content; i++) {
		char ch = (char)('a' + i % 26);

		if (i == 0 && c->stuffed)
			ch = '.';
		str_add(&in, &ch, 1);
		str_add(&body, &ch, 1);
	}
	str_add(&in, c->term, strlen(c->term));
	str_add(&body, c->term, strlen(c->term));
	str_add(&in, "last\r\n.\r\n", 9);
	str_add(&body, "last\r\n", 6);

	str_add(&expect, "C\"DATA\" B\"", 10);
	str_escape(&expect, body.s, body.len);
	str_addf(&expect, "\" END %zu%s", body.len, c->flags);
	expect_all_splits(c->name, in.s, in.len, &lim_default, true, expect.s);
	free(in.s);
	free(body.s);
	free(expect.s);
}

/* ---- exhaustive short DATA bodies against a byte-at-a-time model ---- */

/*
 * The DATA semantics written as plainly as possible, one octet at a time.
 * Returns true at the end marker, with *used_r the octets through it.
 */
static bool model_data(const char *in, size_t len, struct str *body, unsigned *flags_r,
                       size_t *used_r)
{
	bool bol = true, prev_cr = false, dot = false, dotcr = false;
	unsigned flags = 0;

	for (size_t i = 0; i < len; i++) {
		char c = in[i];

		if (dotcr) {
			dotcr = false;
			if (c == '\n') {
				*flags_r = flags;
				*used_r = i + 1;
				return true;
			}
			str_add(body, "\r", 1);
			flags |= SMTP_BODY_BARE_CR;
			prev_cr = false;
		} else if (dot) {
			dot = false;
			if (c == '\r') {
				dotcr = true;
				continue;
			}
		} else if (bol && c == '.') {
			dot = true;
			bol = false;
			continue;
		}
		str_add(body, &c, 1);
		if (prev_cr && c != '\n')
			flags |= SMTP_BODY_BARE_CR;
		if (c == '\n' && !prev_cr)
			flags |= SMTP_BODY_BARE_LF;
		if (c == '\0')
			flags |= SMTP_BODY_NUL;
		bol = c == '\n' && prev_cr;
		prev_cr = c == '\r';
	}
	*flags_r = flags;
	*used_r = len;
	return false;
}

/* Every DATA body up to 8 octets over {CR, LF, ".", "x"}, in every 1- and 2-cut split. */
static void test_data_exhaustive(void **state)
{
	static const char alphabet[] = {'\r', '\n', '.', 'x'};
	enum { MAXLEN = 8 };
	char in[6 + MAXLEN];
	unsigned long runs = 0, ends = 0;

	memcpy(in, "DATA\r\n", 6);
	for (size_t n = 0; n <= MAXLEN; n++) {
		size_t total = (size_t)1 << (2 * n);

		for (size_t k = 0; k < total; k++) {
			struct str body = {0}, expect = {0};
			unsigned flags = 0;
			size_t x = k, used;

			for (size_t i = 0; i < n; i++, x /= 4)
				in[6 + i] = alphabet[x % 4];

			bool end = model_data(in + 6, n, &body, &flags, &used);

			/* After the end the rest would be commands: cut there. */
			str_add(&expect, "C\"DATA\"", 7);
			if (body.len > 0) {
				str_add(&expect, " B\"", 3);
				str_escape(&expect, body.s, body.len);
				str_add(&expect, "\"", 1);
			}
			if (end) {
				str_addf(&expect, " END %zu", body.len);
				if (flags & SMTP_BODY_BARE_LF)
					str_add(&expect, "/lf", 3);
				if (flags & SMTP_BODY_BARE_CR)
					str_add(&expect, "/cr", 3);
				ends++;
			}
			expect_all_splits("data_exhaustive", in, 6 + used, &lim_default, false,
			                  expect.s);
			runs++;
			free(body.s);
			free(expect.s);
		}
	}
	assert_int_equal(runs, 87381);
	assert_true(ends > 1000);
}

/* ---- direct API checks ---- */

static void test_limits_default(void **state)
{
	struct smtp_limits lim;

	smtp_limits_default(&lim);
	assert_int_equal(lim.max_command_line, 2048);
	assert_int_equal(lim.max_text_line, 1000);
	assert_int_equal(lim.max_local_part, 64);
	assert_int_equal(lim.max_domain, 255);
	assert_int_equal(lim.max_path, 256);
}

static void test_zero_copy_command(void **state)
{
	struct smtp_parser p;
	struct smtp_event ev;
	size_t used;
	const char in[] = "NOOP\r\nQU";
	const char in2[] = "IT\r\n";

	assert_int_equal(smtp_parser_init(&p, &lim_default), 0);
	assert_int_equal(smtp_parser_next(&p, in, 8, &used, &ev), 1);
	assert_int_equal(used, 6);
	assert_ptr_equal(ev.data, in); /* whole line: no copy */
	assert_int_equal(ev.len, 4);
	assert_int_equal(smtp_parser_next(&p, in + 6, 2, &used, &ev), 0);
	assert_int_equal(used, 2);
	assert_int_equal(smtp_parser_next(&p, in2, 4, &used, &ev), 1);
	assert_int_equal(used, 4);
	assert_ptr_equal(ev.data, p.buf); /* straddling line: the parser's buffer */
	assert_memory_equal(ev.data, "QUIT", 4);
	assert_int_equal(ev.len, 4);
	smtp_parser_deinit(&p);
}

static void test_zero_copy_body(void **state)
{
	struct smtp_parser p;
	struct smtp_event ev;
	size_t used;
	const char in[] = "line one\r\nline two\r\n\r\nline four\r\n.\r\n";

	assert_int_equal(smtp_parser_init(&p, &lim_default), 0);
	smtp_parser_begin_data(&p);
	assert_int_equal(smtp_parser_next(&p, in, sizeof(in) - 1, &used, &ev), 1);
	assert_int_equal(ev.type, SMTP_EV_BODY);
	assert_ptr_equal(ev.data, in); /* one slice up to the "." */
	assert_int_equal(ev.len, sizeof(in) - 1 - 3);
	assert_int_equal(smtp_parser_next(&p, in + used, sizeof(in) - 1 - used, &used, &ev), 1);
	assert_int_equal(ev.type, SMTP_EV_DATA_END);
	assert_int_equal(ev.size, sizeof(in) - 1 - 3);
	assert_int_equal(ev.flags, 0);
	assert_int_equal(smtp_parser_mode(&p), SMTP_MODE_COMMAND);
	smtp_parser_deinit(&p);
}

static void test_held_cr_from_constant(void **state)
{
	struct smtp_parser p;
	struct smtp_event ev;
	size_t used;
	const char a[] = "x\r\n.\r";
	const char b[] = "y";

	assert_int_equal(smtp_parser_init(&p, &lim_default), 0);
	smtp_parser_begin_data(&p);
	assert_int_equal(smtp_parser_next(&p, a, 5, &used, &ev), 1);
	assert_int_equal(ev.len, 3);
	assert_int_equal(used, 4); /* through the "." */
	assert_int_equal(smtp_parser_next(&p, a + 4, 1, &used, &ev), 0);
	assert_int_equal(used, 1);
	assert_int_equal(smtp_parser_next(&p, b, 1, &used, &ev), 1);
	assert_int_equal(used, 0);
	assert_int_equal(ev.type, SMTP_EV_BODY);
	assert_int_equal(ev.len, 1);
	assert_int_equal(ev.data[0], '\r');
	assert_true(ev.data < b || ev.data >= b + 1);
	assert_int_equal(smtp_parser_next(&p, b, 1, &used, &ev), 1);
	assert_ptr_equal(ev.data, b);
	smtp_parser_deinit(&p);
}

static void test_bdat_zero_empty_input(void **state)
{
	struct smtp_parser p;
	struct smtp_event ev;
	size_t used = 99;

	assert_int_equal(smtp_parser_init(&p, &lim_default), 0);
	smtp_parser_begin_bdat(&p, 0);
	assert_int_equal(smtp_parser_mode(&p), SMTP_MODE_BDAT);
	assert_int_equal(smtp_parser_next(&p, NULL, 0, &used, &ev), 1);
	assert_int_equal(used, 0);
	assert_int_equal(ev.type, SMTP_EV_BDAT_END);
	assert_int_equal(ev.size, 0);
	assert_int_equal(smtp_parser_mode(&p), SMTP_MODE_COMMAND);
	assert_int_equal(smtp_parser_next(&p, NULL, 0, &used, &ev), 0);
	smtp_parser_begin_data(&p);
	assert_int_equal(smtp_parser_next(&p, NULL, 0, &used, &ev), 0);
	assert_int_equal(used, 0);
	smtp_parser_deinit(&p);
}

static void test_bdat_large_chunk(void **state)
{
	struct smtp_parser p;
	struct smtp_event ev;
	size_t used;
	char buf[4096];
	uint64_t total = 0;
	const uint64_t chunk = 10 * 1000 * 1000 + 7;

	memset(buf, '.', sizeof(buf));
	assert_int_equal(smtp_parser_init(&p, &lim_default), 0);
	smtp_parser_begin_bdat(&p, chunk);
	while (smtp_parser_mode(&p) == SMTP_MODE_BDAT) {
		size_t off = 0;

		while (smtp_parser_next(&p, buf + off, sizeof(buf) - off, &used, &ev) == 1) {
			off += used;
			if (ev.type == SMTP_EV_BDAT_END) {
				assert_int_equal(ev.size, chunk);
				break;
			}
			assert_int_equal(ev.type, SMTP_EV_BODY);
			total += ev.len;
		}
	}
	assert_int_equal(total, chunk);
	smtp_parser_deinit(&p);
}

static void test_reset_drops_partial(void **state)
{
	struct smtp_parser p;
	struct smtp_event ev;
	size_t used;

	assert_int_equal(smtp_parser_init(&p, &lim_cmd16), 0);
	assert_int_equal(smtp_parser_next(&p, "STARTTLS\r\nEVIL", 14, &used, &ev), 1);
	assert_int_equal(smtp_parser_next(&p, "EVIL", 4, &used, &ev), 0);
	smtp_parser_reset(&p);
	assert_int_equal(smtp_parser_next(&p, "EHLO x\r\n", 8, &used, &ev), 1);
	assert_int_equal(ev.len, 6);
	assert_memory_equal(ev.data, "EHLO x", 6);
	/* and a discarding state */
	assert_int_equal(smtp_parser_next(&p, "xxxxxxxxxxxxxxxxxxxxxxxx", 24, &used, &ev), 0);
	smtp_parser_reset(&p);
	assert_int_equal(smtp_parser_next(&p, "QUIT\r\n", 6, &used, &ev), 1);
	assert_int_equal(ev.type, SMTP_EV_COMMAND);
	/* and DATA mode */
	smtp_parser_begin_data(&p);
	assert_int_equal(smtp_parser_next(&p, "x\r\n.", 4, &used, &ev), 1);
	smtp_parser_reset(&p);
	assert_int_equal(smtp_parser_mode(&p), SMTP_MODE_COMMAND);
	assert_int_equal(smtp_parser_next(&p, "\r\n", 2, &used, &ev), 1);
	assert_int_equal(ev.type, SMTP_EV_COMMAND);
	assert_int_equal(ev.len, 0);
	smtp_parser_deinit(&p);
	smtp_parser_deinit(&p); /* twice is harmless */
}

static void test_deinit_zeroed(void **state)
{
	struct smtp_parser p;

	memset(&p, 0, sizeof(p));
	smtp_parser_deinit(&p);
}

static void test_verb_names(void **state)
{
	assert_string_equal(smtp_verb_name(SMTP_VERB_MAIL), "MAIL");
	assert_string_equal(smtp_verb_name(SMTP_VERB_STARTTLS), "STARTTLS");
	assert_string_equal(smtp_verb_name(SMTP_VERB_AUTH), "AUTH");
	assert_string_equal(smtp_verb_name(SMTP_VERB_UNKNOWN), "UNKNOWN");
	assert_string_equal(smtp_verb_name(SMTP_VERB_COUNT), "UNKNOWN");
	for (int v = SMTP_VERB_HELO; v < SMTP_VERB_COUNT; v++) {
		struct smtp_command cmd;
		const char *name = smtp_verb_name((enum smtp_verb)v);

		smtp_command_parse(name, strlen(name), &lim_default, &cmd);
		assert_int_equal(cmd.verb, v);
	}
}

static void test_command_param_lookup(void **state)
{
	struct smtp_command cmd;
	const char line[] = "MAIL FROM:<a@b.example> size=100 SMTPUTF8 Body=8BITMIME";
	const struct smtp_param *prm;

	assert_int_equal(smtp_command_parse(line, sizeof(line) - 1, &lim_default, &cmd),
	                 SMTP_CMD_OK);
	prm = smtp_command_param(&cmd, "SIZE");
	assert_non_null(prm);
	assert_int_equal(prm->value_len, 3);
	assert_memory_equal(prm->value, "100", 3);
	assert_memory_equal(prm->key, "size", 4);
	prm = smtp_command_param(&cmd, "smtputf8");
	assert_non_null(prm);
	assert_null(prm->value);
	assert_int_equal(prm->value_len, 0);
	prm = smtp_command_param(&cmd, "BODY");
	assert_non_null(prm);
	assert_memory_equal(prm->value, "8BITMIME", 8);
	assert_null(smtp_command_param(&cmd, "SIZ"));
	assert_null(smtp_command_param(&cmd, "SIZE1"));
	assert_null(smtp_command_param(&cmd, "RET"));
}

/* ---- smtp_command_parse ---- */

struct cmd_case {
	const char *name;
	const char *line;
	size_t len;
	const struct smtp_limits *lim;
	enum smtp_cmd_error err;
	enum smtp_verb verb;
	const char *addr; /* expected addr when OK (NULL: not checked) */
	int local_len;    /* -1: not checked */
	bool utf8;
	const char *params; /* "K=V K" when OK (NULL: not checked) */
	const char *arg;    /* NULL: not checked */
};

#define OK(n, l, v)                                                                                \
	{                                                                                          \
		n, IN(l), &lim_default, SMTP_CMD_OK, v, NULL, -1, false, NULL, NULL                \
	}
#define ERR(n, l, e, v)                                                                            \
	{                                                                                          \
		n, IN(l), &lim_default, e, v, NULL, -1, false, NULL, NULL                          \
	}
#define ADDR(n, l, v, a, ll, u)                                                                    \
	{                                                                                          \
		n, IN(l), &lim_default, SMTP_CMD_OK, v, a, ll, u, "", NULL                         \
	}
#define PARAMS(n, l, v, p)                                                                         \
	{                                                                                          \
		n, IN(l), &lim_default, SMTP_CMD_OK, v, NULL, -1, false, p, NULL                   \
	}
#define ARG(n, l, v, a)                                                                            \
	{                                                                                          \
		n, IN(l), &lim_default, SMTP_CMD_OK, v, NULL, -1, false, NULL, a                   \
	}

#define L64 "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
#define D63 "d23456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
#define D60 "d23456789abcdef0123456789abcdef0123456789abcdef0123456789abc"

static const struct cmd_case cmd_cases[] = {
    /* verbs */
    ARG("helo", "HELO client.example", SMTP_VERB_HELO, "client.example"),
    ARG("ehlo_literal", "ehlo [192.0.2.1]", SMTP_VERB_EHLO, "[192.0.2.1]"),
    ARG("ehlo_trailing_spaces", "EHLO x.example  \t ", SMTP_VERB_EHLO, "x.example"),
    ERR("ehlo_no_arg", "EHLO", SMTP_CMD_E_NO_ARG, SMTP_VERB_EHLO),
    ERR("ehlo_only_space", "EHLO ", SMTP_CMD_E_NO_ARG, SMTP_VERB_EHLO),
    ERR("helo_no_arg", "helo", SMTP_CMD_E_NO_ARG, SMTP_VERB_HELO),
    OK("data", "DATA", SMTP_VERB_DATA),
    OK("data_lower", "data", SMTP_VERB_DATA),
    OK("data_trailing_space", "DATA ", SMTP_VERB_DATA),
    OK("data_trailing_tab", "DATA\t", SMTP_VERB_DATA),
    ERR("data_arg", "DATA x", SMTP_CMD_E_UNEXPECTED_ARG, SMTP_VERB_DATA),
    OK("rset", "RSET", SMTP_VERB_RSET),
    ERR("rset_arg", "RSET now", SMTP_CMD_E_UNEXPECTED_ARG, SMTP_VERB_RSET),
    OK("quit", "QuIt", SMTP_VERB_QUIT),
    ERR("quit_arg", "QUIT bye", SMTP_CMD_E_UNEXPECTED_ARG, SMTP_VERB_QUIT),
    OK("starttls", "STARTTLS", SMTP_VERB_STARTTLS),
    OK("starttls_lower", "starttls", SMTP_VERB_STARTTLS),
    ERR("starttls_arg", "STARTTLS x", SMTP_CMD_E_UNEXPECTED_ARG, SMTP_VERB_STARTTLS),
    OK("noop", "NOOP", SMTP_VERB_NOOP),
    ARG("noop_arg", "NOOP anything at all", SMTP_VERB_NOOP, "anything at all"),
    OK("help", "HELP", SMTP_VERB_HELP),
    ARG("help_arg", "HELP MAIL", SMTP_VERB_HELP, "MAIL"),
    ARG("vrfy", "VRFY postmaster", SMTP_VERB_VRFY, "postmaster"),
    ERR("vrfy_no_arg", "VRFY", SMTP_CMD_E_NO_ARG, SMTP_VERB_VRFY),
    ARG("expn", "EXPN list", SMTP_VERB_EXPN, "list"),
    ERR("expn_no_arg", "EXPN", SMTP_CMD_E_NO_ARG, SMTP_VERB_EXPN),
    ARG("auth", "AUTH PLAIN dGVzdAB0ZXN0AHRlc3Q=", SMTP_VERB_AUTH, "PLAIN dGVzdAB0ZXN0AHRlc3Q="),
    ERR("auth_no_arg", "AUTH", SMTP_CMD_E_NO_ARG, SMTP_VERB_AUTH),
    ERR("unknown", "FOO bar", SMTP_CMD_E_UNKNOWN, SMTP_VERB_UNKNOWN),
    ERR("unknown_empty", "", SMTP_CMD_E_UNKNOWN, SMTP_VERB_UNKNOWN),
    ERR("unknown_prefix", "MAILX FROM:<>", SMTP_CMD_E_UNKNOWN, SMTP_VERB_UNKNOWN),
    ERR("unknown_short", "MAI", SMTP_CMD_E_UNKNOWN, SMTP_VERB_UNKNOWN),
    ERR("unknown_leading_space", " NOOP", SMTP_CMD_E_UNKNOWN, SMTP_VERB_UNKNOWN),
    ERR("unknown_starttlsx", "STARTTLSX", SMTP_CMD_E_UNKNOWN, SMTP_VERB_UNKNOWN),
    ERR("unknown_not_letters", "M@IL FROM:<>", SMTP_CMD_E_UNKNOWN, SMTP_VERB_UNKNOWN),
    ERR("unknown_nul", "NO\0P", SMTP_CMD_E_UNKNOWN, SMTP_VERB_UNKNOWN),
    ERR("unknown_cr", "DATA\r", SMTP_CMD_E_UNKNOWN, SMTP_VERB_UNKNOWN),
    ERR("unknown_header_line", "Subject: hi", SMTP_CMD_E_UNKNOWN, SMTP_VERB_UNKNOWN),

    /* MAIL / RCPT framing */
    ADDR("mail", "MAIL FROM:<a@b.example>", SMTP_VERB_MAIL, "a@b.example", 1, false),
    ADDR("mail_lower", "mail from:<a@b.example>", SMTP_VERB_MAIL, "a@b.example", 1, false),
    ADDR("mail_mixed_case", "MaIl FrOm:<a@b.example>", SMTP_VERB_MAIL, "a@b.example", 1, false),
    ADDR("mail_space_after_colon", "MAIL FROM: <a@b.example>", SMTP_VERB_MAIL, "a@b.example", 1,
         false),
    ADDR("mail_trailing_space", "MAIL FROM:<a@b.example> ", SMTP_VERB_MAIL, "a@b.example", 1,
         false),
    ADDR("mail_null", "MAIL FROM:<>", SMTP_VERB_MAIL, "", 0, false),
    ADDR("rcpt", "RCPT TO:<c@d.example>", SMTP_VERB_RCPT, "c@d.example", 1, false),
    ADDR("rcpt_lower_space", "rcpt to: <c@d.example>", SMTP_VERB_RCPT, "c@d.example", 1, false),
    ERR("rcpt_null", "RCPT TO:<>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("mail_no_arg", "MAIL", SMTP_CMD_E_NO_ARG, SMTP_VERB_MAIL),
    ERR("rcpt_no_arg", "RCPT ", SMTP_CMD_E_NO_ARG, SMTP_VERB_RCPT),
    ERR("mail_no_from", "MAIL <a@b.example>", SMTP_CMD_E_SYNTAX, SMTP_VERB_MAIL),
    ERR("mail_to", "MAIL TO:<a@b.example>", SMTP_CMD_E_SYNTAX, SMTP_VERB_MAIL),
    ERR("rcpt_from", "RCPT FROM:<a@b.example>", SMTP_CMD_E_SYNTAX, SMTP_VERB_RCPT),
    ERR("mail_from_no_colon", "MAIL FROM <a@b.example>", SMTP_CMD_E_SYNTAX, SMTP_VERB_MAIL),
    ERR("mail_empty_path", "MAIL FROM:", SMTP_CMD_E_ADDRESS, SMTP_VERB_MAIL),
    ERR("mail_no_brackets", "MAIL FROM:a@b.example", SMTP_CMD_E_ADDRESS, SMTP_VERB_MAIL),
    ERR("mail_unclosed", "MAIL FROM:<a@b.example", SMTP_CMD_E_ADDRESS, SMTP_VERB_MAIL),
    ERR("mail_junk_after_path", "MAIL FROM:<a@b.example>x", SMTP_CMD_E_SYNTAX, SMTP_VERB_MAIL),
    ERR("mail_two_paths", "MAIL FROM:<a@b.example> <c@d.example>", SMTP_CMD_E_SYNTAX,
        SMTP_VERB_MAIL),

    /* parameters */
    PARAMS("param_size_body", "MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME", SMTP_VERB_MAIL,
           "SIZE=1000 BODY=8BITMIME"),
    PARAMS("param_smtputf8", "MAIL FROM:<a@b.example> SMTPUTF8", SMTP_VERB_MAIL, "SMTPUTF8"),
    PARAMS("param_null_sender", "MAIL FROM:<> SIZE=0", SMTP_VERB_MAIL, "SIZE=0"),
    PARAMS("param_notify_orcpt",
           "RCPT TO:<c@d.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y.example", SMTP_VERB_RCPT,
           "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y.example"),
    PARAMS("param_orcpt_xtext", "RCPT TO:<c@d.example> ORCPT=rfc822;a+2Bb@c.example",
           SMTP_VERB_RCPT, "ORCPT=rfc822;a+2Bb@c.example"),
    PARAMS("param_many_spaces", "MAIL FROM:<a@b.example>   SIZE=1    RET=HDRS  ", SMTP_VERB_MAIL,
           "SIZE=1 RET=HDRS"),
    PARAMS("param_hyphen_key", "MAIL FROM:<a@b.example> X-FOO=bar", SMTP_VERB_MAIL, "X-FOO=bar"),
    PARAMS("param_no_space_after_colon", "MAIL FROM:<a@b.example> ENVID=QQ314159", SMTP_VERB_MAIL,
           "ENVID=QQ314159"),
    PARAMS("param_16", "MAIL FROM:<a@b.example> A B C D E F G H I J K L M N O P", SMTP_VERB_MAIL,
           "A B C D E F G H I J K L M N O P"),
    ERR("param_17", "MAIL FROM:<a@b.example> A B C D E F G H I J K L M N O P Q",
        SMTP_CMD_E_TOO_MANY_PARAMS, SMTP_VERB_MAIL),
    ERR("param_empty_value", "MAIL FROM:<a@b.example> SIZE=", SMTP_CMD_E_SYNTAX, SMTP_VERB_MAIL),
    ERR("param_no_key", "MAIL FROM:<a@b.example> =1", SMTP_CMD_E_SYNTAX, SMTP_VERB_MAIL),
    ERR("param_key_hyphen_first", "MAIL FROM:<a@b.example> -X", SMTP_CMD_E_SYNTAX, SMTP_VERB_MAIL),
    ERR("param_double_equals", "MAIL FROM:<a@b.example> A=b=c", SMTP_CMD_E_SYNTAX, SMTP_VERB_MAIL),
    ERR("param_bad_key_char", "MAIL FROM:<a@b.example> SI_ZE=1", SMTP_CMD_E_SYNTAX, SMTP_VERB_MAIL),
    ERR("param_control_in_value", "MAIL FROM:<a@b.example> A=b\x01", SMTP_CMD_E_SYNTAX,
        SMTP_VERB_MAIL),
    ERR("param_tab_separator", "MAIL FROM:<a@b.example>\tSIZE=1", SMTP_CMD_E_SYNTAX,
        SMTP_VERB_MAIL),

    /* local parts */
    ADDR("local_dot_atom", "MAIL FROM:<first.last+tag@b.example>", SMTP_VERB_MAIL,
         "first.last+tag@b.example", 14, false),
    ADDR("local_atext_specials", "RCPT TO:<!#$%&'*+-/=?^_`{|}~@b.example>", SMTP_VERB_RCPT,
         "!#$%&'*+-/=?^_`{|}~@b.example", 19, false),
    ADDR("local_quoted", "MAIL FROM:<\"a b\"@x.example>", SMTP_VERB_MAIL, "\"a b\"@x.example", 5,
         false),
    ADDR("local_quoted_escapes", "MAIL FROM:<\"a\\\"b\\\\c\"@x.example>", SMTP_VERB_MAIL,
         "\"a\\\"b\\\\c\"@x.example", 9, false),
    ADDR("local_quoted_angle", "RCPT TO:<\"a>b@c\"@x.example>", SMTP_VERB_RCPT,
         "\"a>b@c\"@x.example", 7, false),
    ADDR("local_quoted_empty", "RCPT TO:<\"\"@x.example>", SMTP_VERB_RCPT, "\"\"@x.example", 2,
         false),
    ERR("local_quoted_unterminated", "MAIL FROM:<\"ab@x.example>", SMTP_CMD_E_ADDRESS,
        SMTP_VERB_MAIL),
    ERR("local_quoted_backslash_end", "MAIL FROM:<\"ab\\", SMTP_CMD_E_ADDRESS, SMTP_VERB_MAIL),
    ERR("local_quoted_control", "MAIL FROM:<\"a\tb\"@x.example>", SMTP_CMD_E_ADDRESS,
        SMTP_VERB_MAIL),
    ERR("local_quoted_escaped_control", "MAIL FROM:<\"a\\\x01\"@x.example>", SMTP_CMD_E_ADDRESS,
        SMTP_VERB_MAIL),
    ERR("local_leading_dot", "MAIL FROM:<.a@x.example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_MAIL),
    ERR("local_trailing_dot", "MAIL FROM:<a.@x.example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_MAIL),
    ERR("local_double_dot", "MAIL FROM:<a..b@x.example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_MAIL),
    ERR("local_space", "MAIL FROM:<a b@x.example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_MAIL),
    ERR("local_empty", "MAIL FROM:<@x.example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_MAIL),
    ERR("local_bracket", "MAIL FROM:<a<b@x.example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_MAIL),
    ERR("local_nul", "MAIL FROM:<a\0b@x.example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_MAIL),
    ERR("two_ats", "MAIL FROM:<a@b@x.example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_MAIL),

    /* domains */
    ADDR("domain_ldh", "RCPT TO:<a@mail-1.x-y.example>", SMTP_VERB_RCPT, "a@mail-1.x-y.example", 1,
         false),
    ADDR("domain_digits", "RCPT TO:<a@123.example>", SMTP_VERB_RCPT, "a@123.example", 1, false),
    ADDR("domain_single_label", "RCPT TO:<a@localhost>", SMTP_VERB_RCPT, "a@localhost", 1, false),
    ERR("domain_empty", "RCPT TO:<a@>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("domain_leading_hyphen", "RCPT TO:<a@-x.example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("domain_trailing_hyphen", "RCPT TO:<a@x-.example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("domain_empty_label", "RCPT TO:<a@x..example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("domain_trailing_dot", "RCPT TO:<a@x.example.>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("domain_leading_dot", "RCPT TO:<a@.x.example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("domain_underscore", "RCPT TO:<a@x_y.example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("domain_space", "RCPT TO:<a@x .example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),

    /* domain literals */
    ADDR("literal_ipv4", "RCPT TO:<a@[192.0.2.1]>", SMTP_VERB_RCPT, "a@[192.0.2.1]", 1, false),
    ADDR("literal_ipv4_max", "RCPT TO:<a@[255.255.255.255]>", SMTP_VERB_RCPT, "a@[255.255.255.255]",
         1, false),
    ADDR("literal_ipv4_leading_zeros", "RCPT TO:<a@[001.002.003.004]>", SMTP_VERB_RCPT,
         "a@[001.002.003.004]", 1, false),
    ERR("literal_ipv4_256", "RCPT TO:<a@[256.1.1.1]>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("literal_ipv4_three", "RCPT TO:<a@[1.2.3]>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("literal_ipv4_five", "RCPT TO:<a@[1.2.3.4.5]>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("literal_ipv4_four_digits", "RCPT TO:<a@[1.2.3.0004]>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("literal_ipv4_empty_part", "RCPT TO:<a@[1..3.4]>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("literal_empty", "RCPT TO:<a@[]>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("literal_unclosed", "RCPT TO:<a@[1.2.3.4>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("literal_general_tag", "RCPT TO:<a@[x-tag:foo]>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ADDR("literal_ipv6_comp", "RCPT TO:<a@[IPv6:2001:db8::1]>", SMTP_VERB_RCPT,
         "a@[IPv6:2001:db8::1]", 1, false),
    ADDR("literal_ipv6_full", "RCPT TO:<a@[IPv6:1:2:3:4:5:6:7:abcd]>", SMTP_VERB_RCPT,
         "a@[IPv6:1:2:3:4:5:6:7:abcd]", 1, false),
    ADDR("literal_ipv6_loopback", "RCPT TO:<a@[ipv6:::1]>", SMTP_VERB_RCPT, "a@[ipv6:::1]", 1,
         false),
    ADDR("literal_ipv6_any", "RCPT TO:<a@[IPv6:::]>", SMTP_VERB_RCPT, "a@[IPv6:::]", 1, false),
    ADDR("literal_ipv6_trailing_comp", "RCPT TO:<a@[IPv6:fe80::]>", SMTP_VERB_RCPT,
         "a@[IPv6:fe80::]", 1, false),
    ADDR("literal_ipv6_v4", "RCPT TO:<a@[IPv6:::ffff:192.0.2.1]>", SMTP_VERB_RCPT,
         "a@[IPv6:::ffff:192.0.2.1]", 1, false),
    ADDR("literal_ipv6_v4_full", "RCPT TO:<a@[IPv6:1:2:3:4:5:6:1.2.3.4]>", SMTP_VERB_RCPT,
         "a@[IPv6:1:2:3:4:5:6:1.2.3.4]", 1, false),
    ERR("literal_ipv6_seven", "RCPT TO:<a@[IPv6:1:2:3:4:5:6:7]>", SMTP_CMD_E_ADDRESS,
        SMTP_VERB_RCPT),
    ERR("literal_ipv6_nine", "RCPT TO:<a@[IPv6:1:2:3:4:5:6:7:8:9]>", SMTP_CMD_E_ADDRESS,
        SMTP_VERB_RCPT),
    ERR("literal_ipv6_comp_seven", "RCPT TO:<a@[IPv6:1:2:3:4:5:6:7::]>", SMTP_CMD_E_ADDRESS,
        SMTP_VERB_RCPT),
    ERR("literal_ipv6_two_comp", "RCPT TO:<a@[IPv6:1::2::3]>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("literal_ipv6_long_group", "RCPT TO:<a@[IPv6:12345::]>", SMTP_CMD_E_ADDRESS,
        SMTP_VERB_RCPT),
    ERR("literal_ipv6_bad_hex", "RCPT TO:<a@[IPv6:g::1]>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("literal_ipv6_trailing_colon", "RCPT TO:<a@[IPv6:1:2:3:4:5:6:7:8:]>", SMTP_CMD_E_ADDRESS,
        SMTP_VERB_RCPT),
    ERR("literal_ipv6_leading_colon", "RCPT TO:<a@[IPv6::1:2:3:4:5:6:7]>", SMTP_CMD_E_ADDRESS,
        SMTP_VERB_RCPT),
    ERR("literal_ipv6_v4_not_last", "RCPT TO:<a@[IPv6:1.2.3.4::1]>", SMTP_CMD_E_ADDRESS,
        SMTP_VERB_RCPT),
    ERR("literal_ipv6_v4_too_many", "RCPT TO:<a@[IPv6:1:2:3:4:5:6:7:1.2.3.4]>", SMTP_CMD_E_ADDRESS,
        SMTP_VERB_RCPT),
    ERR("literal_ipv6_empty", "RCPT TO:<a@[IPv6:]>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("literal_ipv6_no_tag", "RCPT TO:<a@[::1]>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),

    /* source routes */
    ADDR("route_one", "RCPT TO:<@a.example:u@c.example>", SMTP_VERB_RCPT, "u@c.example", 1, false),
    ADDR("route_two", "RCPT TO:<@a.example,@b.example:u@c.example>", SMTP_VERB_RCPT, "u@c.example",
         1, false),
    ADDR("route_mail", "MAIL FROM:<@a.example:u@[192.0.2.1]>", SMTP_VERB_MAIL, "u@[192.0.2.1]", 1,
         false),
    ERR("route_no_mailbox", "RCPT TO:<@a.example:>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("route_empty_domain", "RCPT TO:<@:u@c.example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("route_no_colon", "RCPT TO:<@a.example,u@c.example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("route_trailing_comma", "RCPT TO:<@a.example,:u@c.example>", SMTP_CMD_E_ADDRESS,
        SMTP_VERB_RCPT),
    ERR("route_literal", "RCPT TO:<@[1.2.3.4]:u@c.example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("route_to_postmaster", "RCPT TO:<@a.example:postmaster>", SMTP_CMD_E_ADDRESS,
        SMTP_VERB_RCPT),

    /* postmaster */
    ADDR("postmaster", "RCPT TO:<postmaster>", SMTP_VERB_RCPT, "postmaster", 10, false),
    ADDR("postmaster_case", "RCPT TO:<PostMaster>", SMTP_VERB_RCPT, "PostMaster", 10, false),
    ADDR("postmaster_domain", "RCPT TO:<Postmaster@x.example>", SMTP_VERB_RCPT,
         "Postmaster@x.example", 10, false),
    ERR("postmaster_mail", "MAIL FROM:<postmaster>", SMTP_CMD_E_ADDRESS, SMTP_VERB_MAIL),
    ERR("postmaster_quoted", "RCPT TO:<\"postmaster\">", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("no_domain", "RCPT TO:<bob>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("postmasters", "RCPT TO:<postmasters>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),

    /* UTF-8 */
    ADDR("utf8_local_domain", "RCPT TO:<\xe7\x94\xa8\xe6\x88\xb7@\xe4\xbe\x8b\xe5\xad\x90.example>",
         SMTP_VERB_RCPT, "\xe7\x94\xa8\xe6\x88\xb7@\xe4\xbe\x8b\xe5\xad\x90.example", 6, true),
    ADDR("utf8_quoted", "RCPT TO:<\"J\xc3\xb6rg K\"@x.example>", SMTP_VERB_RCPT,
         "\"J\xc3\xb6rg K\"@x.example", 9, true),
    ADDR("utf8_domain_only",
         "RCPT TO:<a@b\xc3\xbc"
         "cher.example>",
         SMTP_VERB_RCPT,
         "a@b\xc3\xbc"
         "cher.example",
         1, true),
    ERR("utf8_invalid", "RCPT TO:<\xff@x.example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("utf8_truncated", "RCPT TO:<a\xc3@x.example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("utf8_overlong", "RCPT TO:<\xc0\xaf@x.example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),
    ERR("utf8_surrogate", "RCPT TO:<\xed\xa0\x80@x.example>", SMTP_CMD_E_ADDRESS, SMTP_VERB_RCPT),

    /* limits: local 64, domain 255, path 256 incl <> */
    ADDR("limit_local_64", "RCPT TO:<" L64 "@x.example>", SMTP_VERB_RCPT, L64 "@x.example", 64,
         false),
    ERR("limit_local_65", "RCPT TO:<" L64 "x@x.example>", SMTP_CMD_E_PATH_TOO_LONG, SMTP_VERB_RCPT),
    ERR("limit_local_quoted_65", "RCPT TO:<\"" L64 "\"@x.example>", SMTP_CMD_E_PATH_TOO_LONG,
        SMTP_VERB_RCPT),
    /* path "<" 1 "@" 252 ">" = 256 octets */
    ADDR("limit_path_256", "RCPT TO:<a@" D63 "." D63 "." D63 "." D60 ">", SMTP_VERB_RCPT,
         "a@" D63 "." D63 "." D63 "." D60, 1, false),
    ERR("limit_path_257", "RCPT TO:<ab@" D63 "." D63 "." D63 "." D60 ">", SMTP_CMD_E_PATH_TOO_LONG,
        SMTP_VERB_RCPT),
    ERR("limit_path_with_route", "RCPT TO:<@r.example:a@" D63 "." D63 "." D63 "." D60 ">",
        SMTP_CMD_E_PATH_TOO_LONG, SMTP_VERB_RCPT),
    /* with max_path 400: domain 255 octets, then 256 */
    {"limit_domain_255", IN("RCPT TO:<a@" D63 "." D63 "." D63 "." D63 ">"), &lim_path400,
     SMTP_CMD_OK, SMTP_VERB_RCPT, "a@" D63 "." D63 "." D63 "." D63, 1, false, "", NULL},
    {"limit_domain_256", IN("RCPT TO:<a@" D63 "." D63 "." D63 "." D63 "x>"), &lim_path400,
     SMTP_CMD_E_PATH_TOO_LONG, SMTP_VERB_RCPT, NULL, -1, false, NULL, NULL},

    /* BDAT */
    OK("bdat_zero", "BDAT 0", SMTP_VERB_BDAT),
    OK("bdat_last", "BDAT 0 LAST", SMTP_VERB_BDAT),
    OK("bdat_last_lower", "bdat 12 last", SMTP_VERB_BDAT),
    OK("bdat_leading_zeros", "BDAT 00012", SMTP_VERB_BDAT),
    OK("bdat_2_63", "BDAT 9223372036854775808", SMTP_VERB_BDAT),
    ERR("bdat_2_63_plus_1", "BDAT 9223372036854775809", SMTP_CMD_E_SYNTAX, SMTP_VERB_BDAT),
    ERR("bdat_2_64", "BDAT 18446744073709551616", SMTP_CMD_E_SYNTAX, SMTP_VERB_BDAT),
    ERR("bdat_huge", "BDAT 99999999999999999999999999", SMTP_CMD_E_SYNTAX, SMTP_VERB_BDAT),
    ERR("bdat_no_size", "BDAT", SMTP_CMD_E_NO_ARG, SMTP_VERB_BDAT),
    ERR("bdat_only_last", "BDAT LAST", SMTP_CMD_E_SYNTAX, SMTP_VERB_BDAT),
    ERR("bdat_negative", "BDAT -1", SMTP_CMD_E_SYNTAX, SMTP_VERB_BDAT),
    ERR("bdat_plus", "BDAT +1", SMTP_CMD_E_SYNTAX, SMTP_VERB_BDAT),
    ERR("bdat_junk", "BDAT 1x", SMTP_CMD_E_SYNTAX, SMTP_VERB_BDAT),
    ERR("bdat_hex", "BDAT 0x10", SMTP_CMD_E_SYNTAX, SMTP_VERB_BDAT),
    ERR("bdat_lastx", "BDAT 1 LASTX", SMTP_CMD_E_SYNTAX, SMTP_VERB_BDAT),
    ERR("bdat_last_junk", "BDAT 1 LAST x", SMTP_CMD_E_SYNTAX, SMTP_VERB_BDAT),
    ERR("bdat_tab", "BDAT 1\tLAST", SMTP_CMD_E_SYNTAX, SMTP_VERB_BDAT),
};

static void format_params(const struct smtp_command *cmd, struct str *b)
{
	for (unsigned i = 0; i < cmd->nparams; i++) {
		const struct smtp_param *prm = &cmd->params[i];

		if (i > 0)
			str_add(b, " ", 1);
		str_add(b, prm->key, prm->key_len);
		if (prm->value != NULL) {
			str_add(b, "=", 1);
			str_add(b, prm->value, prm->value_len);
		}
	}
	str_add(b, "", 0);
}

static bool within(const char *x, size_t n, const char *line, size_t len)
{
	return x != NULL && x >= line && n <= len && x - line <= (ptrdiff_t)(len - n);
}

static void test_cmd(void **state)
{
	const struct cmd_case *c = *state;
	struct smtp_command cmd;
	/* An exactly-sized copy, so ASan sees any read past the line. */
	char *line = malloc(c->len > 0 ? c->len : 1);

	assert_non_null(line);
	memcpy(line, c->line, c->len);

	enum smtp_cmd_error err = smtp_command_parse(line, c->len, c->lim, &cmd);

	assert_int_equal(err, c->err);
	assert_int_equal(cmd.verb, c->verb);
	if (err != SMTP_CMD_OK)
		goto out;
	assert_true(within(cmd.arg, cmd.arg_len, line, c->len));
	if (c->arg != NULL) {
		assert_int_equal(cmd.arg_len, strlen(c->arg));
		assert_memory_equal(cmd.arg, c->arg, cmd.arg_len);
	}
	if (c->addr != NULL) {
		assert_true(within(cmd.addr, cmd.addr_len, line, c->len));
		assert_int_equal(cmd.addr_len, strlen(c->addr));
		assert_memory_equal(cmd.addr, c->addr, cmd.addr_len);
		assert_int_equal(cmd.addr_utf8, c->utf8);
	}
	if (c->local_len >= 0)
		assert_int_equal(cmd.local_len, (size_t)c->local_len);
	if (c->params != NULL) {
		struct str b = {0};

		format_params(&cmd, &b);
		assert_string_equal(b.s, c->params);
		free(b.s);
		for (unsigned i = 0; i < cmd.nparams; i++)
			assert_true(within(cmd.params[i].key, cmd.params[i].key_len, line, c->len));
	}
out:
	free(line);
}

static void test_bdat_values(void **state)
{
	static const struct {
		const char *line;
		uint64_t size;
		bool last;
	} t[] = {
	    {"BDAT 0", 0, false},
	    {"BDAT 0 LAST", 0, true},
	    {"bdat 12 last", 12, true},
	    {"BDAT 00012", 12, false},
	    {"BDAT 1  LAST ", 1, true},
	    {"BDAT 9223372036854775808", UINT64_C(9223372036854775808), false},
	    {"BDAT 9223372036854775807 LAST", UINT64_C(9223372036854775807), true},
	};

	for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
		struct smtp_command cmd;

		assert_int_equal(
		    smtp_command_parse(t[i].line, strlen(t[i].line), &lim_default, &cmd),
		    SMTP_CMD_OK);
		assert_int_equal(cmd.verb, SMTP_VERB_BDAT);
		assert_int_equal(cmd.bdat_size, t[i].size);
		assert_int_equal(cmd.bdat_last, t[i].last);
	}
}

/* ---- main: one named cmocka test per table row ---- */

int main(void)
{
	static const struct CMUnitTest fixed[] = {
	    cmocka_unit_test(test_limits_default),
	    cmocka_unit_test(test_zero_copy_command),
	    cmocka_unit_test(test_zero_copy_body),
	    cmocka_unit_test(test_held_cr_from_constant),
	    cmocka_unit_test(test_bdat_zero_empty_input),
	    cmocka_unit_test(test_bdat_large_chunk),
	    cmocka_unit_test(test_reset_drops_partial),
	    cmocka_unit_test(test_deinit_zeroed),
	    cmocka_unit_test(test_verb_names),
	    cmocka_unit_test(test_command_param_lookup),
	    cmocka_unit_test(test_bdat_values),
	    cmocka_unit_test(test_data_exhaustive),
	};
	const size_t nstream = sizeof(stream_cases) / sizeof(stream_cases[0]);
	const size_t ntext = sizeof(textline_cases) / sizeof(textline_cases[0]);
	const size_t ncmd = sizeof(cmd_cases) / sizeof(cmd_cases[0]);
	const size_t nfixed = sizeof(fixed) / sizeof(fixed[0]);
	const size_t n = nfixed + nstream + ntext + ncmd;
	struct CMUnitTest *tests = calloc(n, sizeof(*tests));
	size_t k = 0;

	if (tests == NULL)
		return 1;
	for (size_t i = 0; i < nfixed; i++)
		tests[k++] = fixed[i];
	for (size_t i = 0; i < nstream; i++)
		tests[k++] = (struct CMUnitTest){.name = stream_cases[i].name,
		                                 .test_func = test_stream,
		                                 .initial_state = (void *)&stream_cases[i]};
	for (size_t i = 0; i < ntext; i++)
		tests[k++] = (struct CMUnitTest){.name = textline_cases[i].name,
		                                 .test_func = test_textline,
		                                 .initial_state = (void *)&textline_cases[i]};
	for (size_t i = 0; i < ncmd; i++)
		tests[k++] = (struct CMUnitTest){.name = cmd_cases[i].name,
		                                 .test_func = test_cmd,
		                                 .initial_state = (void *)&cmd_cases[i]};

	int failed = _cmocka_run_group_tests("smtp_parser", tests, n, NULL, NULL);

	free(tests);
	return failed;
}
