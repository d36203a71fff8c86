/*
 * Unit tests of core/config (the file reader and the typed value helpers) and
 * mta/posthaste/config (the daemon's keys): tables of named cases with exact
 * error messages. Files go to a mkdtemp directory that is removed at the end.
 */
#include <dirent.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cmocka.h>

#include "core/compiler.h"
#include "core/config.h"
#include "mta/posthaste/config.h"

static char tmpdir[64];

/* Fails with the case's name when two strings differ. */
static void expect_str(const char *name, const char *what, const char *want, const char *got)
{
	if (strcmp(want, got) != 0)
		fail_msg("%s: %s:\n  want: [%s]\n  got:  [%s]", name, what, want, got);
}

static void expect_rc(const char *name, int want, int got, const char *err)
{
	if (want != got)
		fail_msg("%s: want rc %d, got %d (err: %s)", name, want, got, err);
}

/* ---- table 1: config_parse_buffer ---- */

struct capture {
	char out[16384];
	size_t len;
};

/* Records "LINE:key=value\n"; key "fail" stops with a reason, "failsilent" without one. */
static int capture_entry(void *arg, const char *key, const char *value, unsigned line, char *err,
                         size_t errlen)
{
	struct capture *c = arg;
	int n;

	if (strcmp(key, "fail") == 0) {
		snprintf(err, errlen, "no thanks to '%s'", value);
		return -1;
	}
	if (strcmp(key, "failsilent") == 0)
		return -1;
	n = snprintf(c->out + c->len, sizeof(c->out) - c->len, "%u:%s=%s\n", line, key, value);
	assert_true(n > 0 && (size_t)n < sizeof(c->out) - c->len);
	c->len += (size_t)n;
	return 0;
}

struct parse_case {
	const char *name;
	const char *in;
	size_t len; /* 0: strlen(in) */
	const char *entries;
	const char *err; /* NULL: success */
};

static const struct parse_case parse_cases[] = {
    {"empty_buffer", "", 0, "", NULL},
    {"only_newlines", "\n\n\n", 0, "", NULL},
    {"simple", "key = value\n", 0, "1:key=value\n", NULL},
    {"no_blanks_no_final_lf", "a=b", 0, "1:a=b\n", NULL},
    {"key_lowercased", "Spool_DIR = ./X\n", 0, "1:spool_dir=./X\n", NULL},
    {"key_chars", "a.b-c_d9 = 1\n", 0, "1:a.b-c_d9=1\n", NULL},
    {"tabs_and_blanks", "\t key\t=\t value \t\n", 0, "1:key=value\n", NULL},
    {"comments_and_blank_lines", "\n   \n# one\n  \t# two\nk = v # three\n", 0, "5:k=v\n", NULL},
    {"hash_inside_value", "k = a#b\n", 0, "1:k=a#b\n", NULL},
    {"hash_after_tab", "k = a\t# c\n", 0, "1:k=a\n", NULL},
    {"hash_right_after_equals", "k =#x\n", 0, "1:k=#x\n", NULL},
    {"hash_in_key_position_after_blank_is_comment_then_missing_equals", "k #= v\n", 0, "",
     "t.conf:1: missing '=' (expected 'key = value')"},
    {"empty_value", "k =\n", 0, "1:k=\n", NULL},
    {"empty_value_with_comment", "k = # nothing\n", 0, "1:k=\n", NULL},
    {"equals_in_value", "k = a=b = c\n", 0, "1:k=a=b = c\n", NULL},
    {"inner_blanks_kept", "k = a  b\tc\n", 0, "1:k=a  b\tc\n", NULL},
    {"quoted_keeps_blanks", "k = \"  a b  \"\n", 0, "1:k=  a b  \n", NULL},
    {"quoted_keeps_hash", "k = \"a # b\" # c\n", 0, "1:k=a # b\n", NULL},
    {"quoted_escapes", "k = \"a\\\"b\\\\c\"\n", 0, "1:k=a\"b\\c\n", NULL},
    {"quoted_empty", "k = \"\"\n", 0, "1:k=\n", NULL},
    {"quoted_then_comment_without_blank", "k = \"a\"# c\n", 0, "1:k=a\n", NULL},
    {"quote_inside_bare_value", "k = a\"b\"\n", 0, "1:k=a\"b\"\n", NULL},
    {"backslash_in_bare_value", "k = a\\b\n", 0, "1:k=a\\b\n", NULL},
    {"crlf_lines", "a = 1\r\nb = \"2\"\r\n", 0, "1:a=1\n2:b=2\n", NULL},
    {"repeated_key_reported_twice", "l = 1\nL = 2\n", 0, "1:l=1\n2:l=2\n", NULL},
    {"utf8_value", "k = caf\xc3\xa9\n", 0, "1:k=caf\xc3\xa9\n", NULL},
    {"nul_octet", "a = 1\nb = \0x\n", 13, "1:a=1\n", "t.conf:2: NUL octet"},
    {"nul_octet_in_comment", "# \0\n", 4, "", "t.conf:1: NUL octet"},
    {"missing_equals", "a = 1\nfoo\n", 0, "1:a=1\n",
     "t.conf:2: missing '=' (expected 'key = value')"},
    {"comment_hides_equals", "foo # = 1\n", 0, "",
     "t.conf:1: missing '=' (expected 'key = value')"},
    {"empty_key", "  = 1\n", 0, "", "t.conf:1: empty key"},
    {"blank_in_key", "foo bar = 1\n", 0, "",
     "t.conf:1: invalid key 'foo bar' (keys are letters, digits, '_', '.' and '-')"},
    {"bad_char_in_key", "foo/bar = 1\n", 0, "",
     "t.conf:1: invalid key 'foo/bar' (keys are letters, digits, '_', '.' and '-')"},
    {"unterminated_quote", "k = \"abc\n", 0, "", "t.conf:1: unterminated quoted value"},
    {"unterminated_after_escape", "k = \"abc\\\"\n", 0, "", "t.conf:1: unterminated quoted value"},
    {"backslash_at_end", "k = \"abc\\", 0, "", "t.conf:1: unterminated quoted value"},
    {"bad_escape", "k = \"a\\nb\"\n", 0, "",
     "t.conf:1: invalid escape '\\n' in quoted value (only \\\" and \\\\)"},
    {"bad_escape_control", "k = \"a\\\tb\"\n", 0, "",
     "t.conf:1: invalid escape '\\\\x09' in quoted value (only \\\" and \\\\)"},
    {"text_after_quote", "k = \"a\" b\n", 0, "",
     "t.conf:1: unexpected text after the closing quote"},
    {"line_number_counts_every_line", "\n# c\n\nk = 1\n\nbad\n", 0, "4:k=1\n",
     "t.conf:6: missing '=' (expected 'key = value')"},
    {"crlf_line_numbers", "a = 1\r\n\r\nbad\r\n", 0, "1:a=1\n",
     "t.conf:3: missing '=' (expected 'key = value')"},
    {"callback_error_prefixed", "a = 1\n\nfail = x\nb = 2\n", 0, "1:a=1\n",
     "t.conf:3: no thanks to 'x'"},
    {"callback_error_without_reason", "failsilent = 1\n", 0, "", "t.conf:1: invalid entry"},
};

static void test_parse_cases(void **state)
{
	for (size_t i = 0; i < ARRAY_SIZE(parse_cases); i++) {
		const struct parse_case *t = &parse_cases[i];
		struct capture cap = {.len = 0};
		char err[256] = "";
		size_t len = t->len ? t->len : strlen(t->in);
		int rc = config_parse_buffer("t.conf", t->in, len, capture_entry, &cap, err,
		                             sizeof(err));

		cap.out[cap.len] = '\0';
		expect_rc(t->name, t->err ? -1 : 0, rc, err);
		expect_str(t->name, "entries", t->entries, cap.out);
		if (t->err)
			expect_str(t->name, "error", t->err, err);
	}
}

/* Lines of exactly CONFIG_LINE_MAX octets pass; one more fails (a CR counts). */
static void test_parse_line_length(void **state)
{
	static const struct {
		const char *name;
		size_t len; /* of the second line, without LF */
		bool cr;
		bool ok;
	} cases[] = {
	    {"at_limit", CONFIG_LINE_MAX, false, true},
	    {"at_limit_quoted", CONFIG_LINE_MAX, false, true},
	    {"over_limit", CONFIG_LINE_MAX + 1, false, false},
	    {"cr_counts", CONFIG_LINE_MAX, true, false},
	    {"last_line_without_lf_over_limit", CONFIG_LINE_MAX + 1, false, false},
	};
	char *buf = malloc(2 * CONFIG_LINE_MAX + 16);

	assert_non_null(buf);
	for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
		struct capture cap = {.len = 0};
		char err[256] = "";
		size_t n = 0, vlen;
		int rc;

		memcpy(buf, "a = 1\nk = ", 10);
		n = 10;
		vlen = cases[i].len - 4;
		if (i == 1) { /* a quoted value filling the line */
			buf[n++] = '"';
			memset(buf + n, 'y', vlen - 2);
			n += vlen - 2;
			buf[n++] = '"';
		} else {
			memset(buf + n, 'x', vlen);
			n += vlen;
		}
		if (cases[i].cr)
			buf[n++] = '\r';
		if (i != 4)
			buf[n++] = '\n';
		rc = config_parse_buffer("t.conf", buf, n, capture_entry, &cap, err, sizeof(err));
		expect_rc(cases[i].name, cases[i].ok ? 0 : -1, rc, err);
		if (cases[i].ok) {
			assert_int_equal(cap.len,
			                 strlen("1:a=1\n2:k=\n") + vlen - (i == 1 ? 2 : 0));
		} else {
			expect_str(cases[i].name, "error", "t.conf:2: line longer than 4096 octets",
			           err);
		}
	}
	free(buf);
}

/* The error is truncated to errlen and stays NUL-terminated; a NULL name reads "(config)". */
static void test_parse_err_truncation(void **state)
{
	struct capture cap = {.len = 0};
	char err[12];

	memset(err, 'z', sizeof(err));
	assert_int_equal(config_parse_buffer("long-name.conf", "bad\n", 4, capture_entry, &cap, err,
	                                     sizeof(err)),
	                 -1);
	assert_string_equal(err, "long-name.c");
	assert_int_equal(config_parse_buffer(NULL, "bad\n", 4, capture_entry, &cap, NULL, 0), -1);
	{
		char e2[128];
		assert_int_equal(
		    config_parse_buffer(NULL, "bad", 3, capture_entry, &cap, e2, sizeof(e2)), -1);
		assert_string_equal(e2, "(config):1: missing '=' (expected 'key = value')");
	}
}

/* ---- table 2: typed helpers ---- */

#define SIZE_HINT "(expected digits with an optional k, M, G or T suffix)"
#define DUR_HINT  "(expected digits with a unit: ms, s, m, h or d)"
#define BOOL_HINT "(expected yes, no, true, false, on, off, 1 or 0)"

struct u64_case {
	const char *in;
	uint64_t want;
	const char *err; /* NULL: success */
};

static const struct u64_case size_cases[] = {
    {"0", 0, NULL},
    {"1024", 1024, NULL},
    {"007", 7, NULL},
    {"64k", 64ull << 10, NULL},
    {"64K", 64ull << 10, NULL},
    {"10M", 10ull << 20, NULL},
    {"10m", 10ull << 20, NULL},
    {"1G", 1ull << 30, NULL},
    {"1g", 1ull << 30, NULL},
    {"2T", 2ull << 40, NULL},
    {"18446744073709551615", UINT64_MAX, NULL},
    {"16777215T", 16777215ull << 40, NULL},
    {"17179869183G", 17179869183ull << 30, NULL},
    {"", 0, "invalid size '' " SIZE_HINT},
    {"k", 0, "invalid size 'k' " SIZE_HINT},
    {"-1", 0, "invalid size '-1' " SIZE_HINT},
    {"+1", 0, "invalid size '+1' " SIZE_HINT},
    {" 1", 0, "invalid size ' 1' " SIZE_HINT},
    {"1 ", 0, "invalid size '1 ' " SIZE_HINT},
    {"1.5M", 0, "invalid size '1.5M' " SIZE_HINT},
    {"10MB", 0, "invalid size '10MB' " SIZE_HINT},
    {"10 M", 0, "invalid size '10 M' " SIZE_HINT},
    {"10P", 0, "invalid size '10P' " SIZE_HINT},
    {"0x10", 0, "invalid size '0x10' " SIZE_HINT},
    {"16777216T", 0, "size '16777216T' is too large"},
    {"17179869184G", 0, "size '17179869184G' is too large"},
    {"18446744073709551616", 0, "size '18446744073709551616' is too large"},
    {"99999999999999999999999k", 0, "size '99999999999999999999999k' is too large"},
    {"99999999999999999999999x", 0, "invalid size '99999999999999999999999x' " SIZE_HINT},
    {"1111111111111111111111111111111111111111111111111111111111111111111111", 0,
     "size '1111111111111111111111111111111111111111111111111111111111111111...' is too large"},
};

static const struct u64_case duration_cases[] = {
    {"250ms", 250, NULL},
    {"10s", 10000, NULL},
    {"5m", 300000, NULL},
    {"2h", 7200000, NULL},
    {"5d", 432000000, NULL},
    {"30", 30000, NULL},
    {"0", 0, NULL},
    {"0ms", 0, NULL},
    {"18446744073709551615ms", UINT64_MAX, NULL},
    {"18446744073709551s", 18446744073709551000ull, NULL},
    {"213503982334d", 213503982334ull * 86400000, NULL},
    {"", 0, "invalid duration '' " DUR_HINT},
    {"s", 0, "invalid duration 's' " DUR_HINT},
    {"10S", 0, "invalid duration '10S' " DUR_HINT},
    {"10 s", 0, "invalid duration '10 s' " DUR_HINT},
    {"10sec", 0, "invalid duration '10sec' " DUR_HINT},
    {"1.5s", 0, "invalid duration '1.5s' " DUR_HINT},
    {"-1s", 0, "invalid duration '-1s' " DUR_HINT},
    {"1w", 0, "invalid duration '1w' " DUR_HINT},
    {"18446744073709552s", 0, "duration '18446744073709552s' is too large"},
    {"18446744073709551615", 0, "duration '18446744073709551615' is too large"},
    {"18446744073709551616ms", 0, "duration '18446744073709551616ms' is too large"},
    {"213503982335d", 0, "duration '213503982335d' is too large"},
};

static void run_u64_cases(const char *what, const struct u64_case *cases, size_t n,
                          int (*fn)(const char *, uint64_t *, char *, size_t))
{
	for (size_t i = 0; i < n; i++) {
		char name[128], err[256] = "";
		uint64_t out = 12345;
		int rc = fn(cases[i].in, &out, err, sizeof(err));

		snprintf(name, sizeof(name), "%s('%s')", what, cases[i].in);
		expect_rc(name, cases[i].err ? -1 : 0, rc, err);
		if (cases[i].err) {
			expect_str(name, "error", cases[i].err, err);
			assert_int_equal(out, 12345); /* unchanged */
		} else if (out != cases[i].want) {
			fail_msg("%s: want %llu, got %llu", name, (unsigned long long)cases[i].want,
			         (unsigned long long)out);
		}
	}
}

static void test_size(void **state)
{
	run_u64_cases("config_size", size_cases, ARRAY_SIZE(size_cases), config_size);
}

static void test_duration(void **state)
{
	run_u64_cases("config_duration_ms", duration_cases, ARRAY_SIZE(duration_cases),
	              config_duration_ms);
}

static void test_bool(void **state)
{
	static const struct {
		const char *in;
		bool want;
		bool ok;
	} cases[] = {
	    {"yes", true, true},       {"no", false, true},    {"true", true, true},
	    {"false", false, true},    {"on", true, true},     {"off", false, true},
	    {"1", true, true},         {"0", false, true},     {"YES", true, true},
	    {"False", false, true},    {"On", true, true},     {"", false, false},
	    {"y", false, false},       {"2", false, false},    {"yess", false, false},
	    {"enabled", false, false}, {" yes", false, false}, {"00", false, false},
	};

	for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
		char name[64], want_err[256], err[256] = "";
		bool out = !cases[i].want;
		int rc = config_bool(cases[i].in, &out, err, sizeof(err));

		snprintf(name, sizeof(name), "config_bool('%s')", cases[i].in);
		expect_rc(name, cases[i].ok ? 0 : -1, rc, err);
		if (cases[i].ok) {
			assert_int_equal(out, cases[i].want);
		} else {
			snprintf(want_err, sizeof(want_err), "invalid boolean '%s' " BOOL_HINT,
			         cases[i].in);
			expect_str(name, "error", want_err, err);
		}
	}
}

static void test_uint(void **state)
{
	static const struct {
		const char *in;
		unsigned min, max, want;
		const char *err;
	} cases[] = {
	    {"0", 0, 10, 0, NULL},
	    {"10", 0, 10, 10, NULL},
	    {"0010", 0, 10, 10, NULL},
	    {"4294967295", 0, UINT_MAX, UINT_MAX, NULL},
	    {"11", 0, 10, 0, "number '11' is out of range (0 to 10)"},
	    {"0", 1, 10, 0, "number '0' is out of range (1 to 10)"},
	    {"4294967296", 0, UINT_MAX, 0, "number '4294967296' is out of range (0 to 4294967295)"},
	    {"99999999999999999999999", 0, 10, 0,
	     "number '99999999999999999999999' is out of range (0 to 10)"},
	    {"", 0, 10, 0, "invalid number '' (expected decimal digits)"},
	    {"-1", 0, 10, 0, "invalid number '-1' (expected decimal digits)"},
	    {"1x", 0, 10, 0, "invalid number '1x' (expected decimal digits)"},
	    {" 1", 0, 10, 0, "invalid number ' 1' (expected decimal digits)"},
	};

	for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
		char name[96], err[256] = "";
		unsigned out = 777;
		int rc =
		    config_uint(cases[i].in, cases[i].min, cases[i].max, &out, err, sizeof(err));

		snprintf(name, sizeof(name), "config_uint('%s', %u, %u)", cases[i].in, cases[i].min,
		         cases[i].max);
		expect_rc(name, cases[i].err ? -1 : 0, rc, err);
		if (cases[i].err) {
			expect_str(name, "error", cases[i].err, err);
			assert_int_equal(out, 777);
		} else {
			assert_int_equal(out, cases[i].want);
		}
	}
}

static void test_hostport(void **state)
{
	static const struct {
		const char *in;
		size_t hostlen; /* 0: 64 */
		const char *host;
		uint16_t port;
		const char *err;
	} cases[] = {
	    {"127.0.0.1:2525", 0, "127.0.0.1", 2525, NULL},
	    {"[::1]:25", 0, "::1", 25, NULL},
	    {"[::]:0", 0, "::", 0, NULL},
	    {":2525", 0, "0.0.0.0", 2525, NULL},
	    {"1.2.3.4:65535", 0, "1.2.3.4", 65535, NULL},
	    {"mx.example.org:25", 0, "mx.example.org", 25, NULL},
	    {"[fe80::1%eth0]:25", 0, "fe80::1%eth0", 25, NULL},
	    {"1.2.3.4:025", 0, "1.2.3.4", 25, NULL},
	    {"1234567:1", 8, "1234567", 1, NULL},
	    {"12345678:1", 8, NULL, 0, "invalid address '12345678:1' (host longer than 7 octets)"},
	    {"", 0, NULL, 0, "invalid address '' (expected HOST:PORT, [IPV6]:PORT or :PORT)"},
	    {"127.0.0.1", 0, NULL, 0,
	     "invalid address '127.0.0.1' (expected HOST:PORT, [IPV6]:PORT or :PORT)"},
	    {"::1:25", 0, NULL, 0,
	     "invalid address '::1:25' (an IPv6 address goes in brackets: [::1]:25)"},
	    {"[::1]25", 0, NULL, 0, "invalid address '[::1]25' (expected [IPV6]:PORT)"},
	    {"[::1]", 0, NULL, 0, "invalid address '[::1]' (expected [IPV6]:PORT)"},
	    {"[::1", 0, NULL, 0, "invalid address '[::1' (expected [IPV6]:PORT)"},
	    {"[]:25", 0, NULL, 0, "invalid address '[]:25' (empty host)"},
	    {"1.2.3.4:", 0, NULL, 0, "invalid address '1.2.3.4:' (missing or invalid port)"},
	    {":", 0, NULL, 0, "invalid address ':' (missing or invalid port)"},
	    {"1.2.3.4:x", 0, NULL, 0, "invalid address '1.2.3.4:x' (missing or invalid port)"},
	    {"1.2.3.4:-1", 0, NULL, 0, "invalid address '1.2.3.4:-1' (missing or invalid port)"},
	    {"1.2.3.4:25 ", 0, NULL, 0, "invalid address '1.2.3.4:25 ' (missing or invalid port)"},
	    {"1.2.3.4:65536", 0, NULL, 0, "invalid address '1.2.3.4:65536' (port above 65535)"},
	    {"1.2.3.4:99999999999999999999999", 0, NULL, 0,
	     "invalid address '1.2.3.4:99999999999999999999999' (port above 65535)"},
	    {"a b:25", 0, NULL, 0, "invalid address 'a b:25' (bad character in host)"},
	    {"a/b:25", 0, NULL, 0, "invalid address 'a/b:25' (bad character in host)"},
	    {"[a]b]:25", 0, NULL, 0, "invalid address '[a]b]:25' (expected [IPV6]:PORT)"},
	    {"[[::1]]:25", 0, NULL, 0, "invalid address '[[::1]]:25' (expected [IPV6]:PORT)"},
	    {"[:[:1]:25", 0, NULL, 0, "invalid address '[:[:1]:25' (bad character in host)"},
	};

	for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
		char name[96], err[256] = "", host[64] = "unchanged";
		uint16_t port = 7;
		size_t hostlen = cases[i].hostlen ? cases[i].hostlen : sizeof(host);
		int rc = config_hostport(cases[i].in, host, hostlen, &port, err, sizeof(err));

		snprintf(name, sizeof(name), "config_hostport('%s')", cases[i].in);
		expect_rc(name, cases[i].err ? -1 : 0, rc, err);
		if (cases[i].err) {
			expect_str(name, "error", cases[i].err, err);
			assert_string_equal(host, "unchanged");
			assert_int_equal(port, 7);
		} else {
			expect_str(name, "host", cases[i].host, host);
			assert_int_equal(port, cases[i].port);
		}
	}
}

static void test_format(void **state)
{
	static const struct {
		uint64_t n;
		const char *size, *duration;
	} cases[] = {
	    {0, "0", "0s"},
	    {10, "10", "10ms"},
	    {1000, "1000", "1s"},
	    {1023, "1023", "1023ms"},
	    {1024, "1K", "1024ms"},
	    {1500, "1500", "1500ms"},
	    {1536, "1536", "1536ms"},
	    {60000, "60000", "1m"},
	    {90000, "90000", "90s"},
	    {180000, "180000", "3m"},
	    {300000, "300000", "5m"},
	    {3600000, "3600000", "1h"},
	    {432000000, "421875K", "5d"},
	    {64ull << 20, "64M", "67108864ms"},
	    {3ull << 30, "3G", "3221225472ms"},
	    {2ull << 40, "2T", "2199023255552ms"},
	    {1ull << 50, "1024T", "1125899906842624ms"},
	    {UINT64_MAX, "18446744073709551615", "18446744073709551615ms"},
	};

	for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
		char buf[32], name[64], err[128];
		uint64_t back;

		snprintf(name, sizeof(name), "format(%llu)", (unsigned long long)cases[i].n);
		config_size_format(cases[i].n, buf, sizeof(buf));
		expect_str(name, "size", cases[i].size, buf);
		assert_int_equal(config_size(buf, &back, err, sizeof(err)), 0);
		assert_true(back == cases[i].n);
		config_duration_format(cases[i].n, buf, sizeof(buf));
		expect_str(name, "duration", cases[i].duration, buf);
		assert_int_equal(config_duration_ms(buf, &back, err, sizeof(err)), 0);
		assert_true(back == cases[i].n);
	}
}

/* ---- ph_config ---- */

/*
 * Equal configurations: the same listeners, and every octet after the
 * listeners equal (ph_config_set writes strings, lists and rates so that
 * loading the same keys gives the same octets, padding included).
 */
static bool ph_equal(const struct ph_config *a, const struct ph_config *b)
{
	size_t tail = offsetof(struct ph_config, nlisten);

	if (a->nlisten != b->nlisten)
		return false;
	for (unsigned i = 0; i < a->nlisten; i++)
		if (strcmp(a->listen[i].host, b->listen[i].host) != 0 ||
		    a->listen[i].port != b->listen[i].port)
			return false;
	return strcmp(a->spool_dir, b->spool_dir) == 0 && a->durability == b->durability &&
	       a->batch_interval_ms == b->batch_interval_ms && a->workers == b->workers &&
	       strcmp(a->hostname, b->hostname) == 0 &&
	       a->message_size_limit == b->message_size_limit &&
	       a->recipient_limit == b->recipient_limit &&
	       a->command_timeout_ms == b->command_timeout_ms &&
	       a->data_timeout_ms == b->data_timeout_ms && a->spool_reserve == b->spool_reserve &&
	       a->spool_direct_io == b->spool_direct_io &&
	       strcmp(a->control_socket, b->control_socket) == 0 && a->discard == b->discard &&
	       a->log_level == b->log_level && a->max_queue_age_ms == b->max_queue_age_ms &&
	       memcmp((const char *)a + tail, (const char *)b + tail, sizeof(*a) - tail) == 0;
}

/*
 * The configuration as ph_config_print writes it (caller frees). Not inlined:
 * GCC 12 then takes its result for a pointer to its local (-Wdangling-pointer).
 */
__attribute__((noinline)) static char *ph_printed(const struct ph_config *c)
{
	char *out = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&out, &len);

	assert_non_null(f);
	ph_config_print(c, f);
	assert_int_equal(fclose(f), 0);
	return out;
}

#define DELIVERY_DEFAULTS_PRINTED                                                                  \
	"resolver = \"\" # the system's resolv.conf\n"                                             \
	"smarthost = \"\" # none: deliver by MX\n"                                                 \
	"# route.DOMAIN = HOSTS: none\n"                                                           \
	"local_domains = \"\" # none\n"                                                            \
	"mynetworks = 127.0.0.0/8,::1/128\n"                                                       \
	"relay_domains = \"\" # none\n"                                                            \
	"users_file = \"\" # none\n"                                                               \
	"mailbox_root = ./var/mail\n"                                                              \
	"accounting_log = ./var/log/accounting.jsonl\n"                                            \
	"retry_min = 5m\n"                                                                         \
	"retry_max = 1h\n"                                                                         \
	"delay_warning_time = 4h\n"                                                                \
	"connect_timeout = 30s\n"                                                                  \
	"delivery_active_max = 10000\n"                                                            \
	"delivery_concurrency = 20\n"                                                              \
	"delivery_rate = unlimited\n"                                                              \
	"delivery_connection_rate = unlimited\n"                                                   \
	"delivery_messages_per_connection = 100\n"                                                 \
	"delivery_idle_timeout = 5s\n"                                                             \
	"delivery_tls = may\n"                                                                     \
	"delivery_tls_verify = none\n"                                                             \
	"# destination.DOMAIN = LIMITS: none\n"

static const char default_printed[] = "# posthaste: the effective configuration\n"
                                      "listen = 127.0.0.1:2525\n"
                                      "spool_dir = ./var/spool\n"
                                      "durability = fsync\n"
                                      "batch_interval = 10ms\n"
                                      "workers = 0 # one per CPU\n"
                                      "hostname = \"\" # the system's host name\n"
                                      "message_size_limit = 64M\n"
                                      "recipient_limit = 1000\n"
                                      "command_timeout = 5m\n"
                                      "data_timeout = 3m\n"
                                      "spool_reserve = 256M\n"
                                      "spool_direct_io = yes\n"
                                      "control_socket = \"\" # ./var/spool/control.sock\n"
                                      "discard = no\n"
                                      "delivery = yes\n"
                                      "log_level = info\n"
                                      "max_queue_age = 5d\n"
                                      "smtp_auth = no\n"
                                      "smtp_auth_required = no\n"
                                      "smtp_auth_without_tls = no\n"
                                      "auth_threads = 0 # half the CPUs, at least 1\n"
                                      "smtp_sender_login_check = yes\n"
                                      "tls_cert = \"\" # none: no STARTTLS\n"
                                      "tls_key = \"\" # none\n"
                                      "submission_listen = none\n"
                                      "submissions_listen = none\n"
                                      "client_connection_limit = 50\n"
                                      "client_connection_rate = unlimited\n"
                                      "client_message_rate = unlimited\n"
                                      "client_limit_exempt_mynetworks = yes\n" DELIVERY_DEFAULTS_PRINTED;

static void test_ph_defaults(void **state)
{
	struct ph_config c, d;
	char err[256] = "";
	char *out;

	memset(&c, 0xa5, sizeof(c));
	ph_config_default(&c);
	assert_int_equal(c.nlisten, 1);
	assert_string_equal(c.listen[0].host, "127.0.0.1");
	assert_int_equal(c.listen[0].port, 2525);
	assert_string_equal(c.spool_dir, "./var/spool");
	assert_int_equal(c.durability, PH_DURABILITY_FSYNC);
	assert_int_equal(c.batch_interval_ms, 10);
	assert_int_equal(c.workers, 0);
	assert_string_equal(c.hostname, "");
	assert_int_equal(c.message_size_limit, 64ull << 20);
	assert_int_equal(c.recipient_limit, 1000);
	assert_int_equal(c.command_timeout_ms, 300000);
	assert_int_equal(c.data_timeout_ms, 180000);
	assert_int_equal(c.spool_reserve, 256ull << 20);
	assert_string_equal(c.control_socket, "");
	assert_false(c.discard);
	assert_int_equal(c.log_level, LOG_INFO);
	assert_int_equal(c.max_queue_age_ms, 5ull * 86400000);
	assert_string_equal(c.resolver, "");
	assert_string_equal(c.smarthost, "");
	assert_int_equal(c.nroutes, 0);
	assert_string_equal(c.local_domains, "");
	assert_string_equal(c.mynetworks, "127.0.0.0/8,::1/128");
	assert_string_equal(c.relay_domains, "");
	assert_string_equal(c.users_file, "");
	assert_string_equal(c.mailbox_root, "./var/mail");
	assert_int_equal(c.limits.concurrency, 20);
	assert_int_equal(c.limits.msg_rate.count, 0);
	assert_int_equal(c.limits.msg_rate.per_ms, 0);
	assert_int_equal(c.limits.conn_rate.count, 0);
	assert_int_equal(c.limits.conn_rate.per_ms, 0);
	assert_int_equal(c.limits.msgs_per_conn, 100);
	assert_int_equal(c.limits.idle_timeout_ms, 5000);
	assert_int_equal(c.ndests, 0);
	assert_int_equal(c.retry_min_ms, 300000);
	assert_int_equal(c.retry_max_ms, 3600000);
	assert_int_equal(c.delay_warning_ms, 4ull * 3600000);
	assert_int_equal(c.connect_timeout_ms, 30000);
	assert_string_equal(c.accounting_log, "./var/log/accounting.jsonl");
	assert_int_equal(c.delivery_active_max, 10000);
	assert_true(c.smtp_sender_login_check);
	assert_int_equal(c.client_connection_limit, 50);
	assert_int_equal(c.client_connection_rate.count, 0);
	assert_int_equal(c.client_connection_rate.per_ms, 0);
	assert_int_equal(c.client_message_rate.count, 0);
	assert_int_equal(c.client_message_rate.per_ms, 0);
	assert_true(c.client_limit_exempt_mynetworks);
	assert_int_equal(ph_config_check(&c, err, sizeof(err)), 0);

	/* every octet is written: two defaults compare equal with memcmp */
	memset(&d, 0x5a, sizeof(d));
	ph_config_default(&d);
	assert_memory_equal(&c, &d, sizeof(c));

	out = ph_printed(&c);
	expect_str("defaults", "printed", default_printed, out);
	free(out);
}

/* One key set on the defaults: its printed line, or the exact error (then nothing changed). */
struct set_case {
	const char *key, *value;
	const char *line; /* expected in the printed configuration, or NULL */
	const char *err;  /* NULL: success */
};

#define SIZE_MAX_STR "18446744073709551615"
#define DOMAIN_HINT  "(letters, digits, '-' and '.')"
#define RATE_HINT                                                                                  \
	"(expected COUNT/UNIT such as 100/s or 5000/h, COUNT/DURATION such as 10/5s, or "          \
	"unlimited)"
#define LIMIT_NAMES                                                                                \
	"concurrency, rate, connection_rate, messages_per_connection, idle_timeout, tls or verify"

static const struct set_case set_cases[] = {
    {"listen", "[::1]:25", "listen = 127.0.0.1:2525\nlisten = [::1]:25\n", NULL},
    {"listen", ":26", "listen = 0.0.0.0:26\n", NULL},
    {"listen", "10.0.0.1:0", "listen = 10.0.0.1:0\n", NULL},
    {"LISTEN", "[2001:db8::1]:587", "listen = [2001:db8::1]:587\n", NULL},
    {"listen", "localhost:25", NULL, "listen: 'localhost' is not an IPv4 or IPv6 address"},
    {"listen", "[fe80::1%eth0]:25", NULL, "listen: 'fe80::1%eth0' is not an IPv4 or IPv6 address"},
    {"listen", "1.2.3.4", NULL,
     "listen: invalid address '1.2.3.4' (expected HOST:PORT, [IPV6]:PORT or :PORT)"},
    {"listen", "1.2.3.4:70000", NULL, "listen: invalid address '1.2.3.4:70000' (port above 65535)"},
    {"spool_dir", "/var/spool/posthaste", "spool_dir = /var/spool/posthaste\n", NULL},
    {"spool_dir", " spaced ", "spool_dir = \" spaced \"\n", NULL},
    {"spool_dir", "a #b", "spool_dir = \"a #b\"\n", NULL},
    {"spool_dir", "a#b", "spool_dir = a#b\n", NULL},
    {"spool_dir", "#b", "spool_dir = \"#b\"\n", NULL},
    {"spool_dir", "\"q\\", "spool_dir = \"\\\"q\\\\\"\n", NULL},
    {"spool_dir", "a\\b\"c", "spool_dir = a\\b\"c\n", NULL},
    {"Spool_Dir", "/x", "spool_dir = /x\n", NULL},
    {"spool_dir", "", NULL, "spool_dir: must not be empty"},
    {"spool_dir", "a\nb", NULL, "spool_dir: contains a control character"},
    {"spool_dir", "a\tb", NULL, "spool_dir: contains a control character"},
    {"durability", "batch", "durability = batch\n", NULL},
    {"durability", "NONE", "durability = none\n", NULL},
    {"durability", "fsync", "durability = fsync\n", NULL},
    {"durability", "sync", NULL, "durability: 'sync' is not fsync, batch or none"},
    {"batch_interval", "250ms", "batch_interval = 250ms\n", NULL},
    {"batch_interval", "1m", "batch_interval = 1m\n", NULL},
    {"batch_interval", "1", "batch_interval = 1s\n", NULL},
    {"batch_interval", "0", NULL, "batch_interval: 0s is out of range (1ms to 1m)"},
    {"batch_interval", "61s", NULL, "batch_interval: 61s is out of range (1ms to 1m)"},
    {"batch_interval", "soon", NULL, "batch_interval: invalid duration 'soon' " DUR_HINT},
    {"workers", "8", "workers = 8\n", NULL},
    {"workers", "256", "workers = 256\n", NULL},
    {"workers", "0", "workers = 0 # one per CPU\n", NULL},
    {"workers", "257", NULL, "workers: number '257' is out of range (0 to 256)"},
    {"workers", "-1", NULL, "workers: invalid number '-1' (expected decimal digits)"},
    {"hostname", "mx.example.org", "hostname = mx.example.org\n", NULL},
    {"hostname", "[192.0.2.1]", "hostname = [192.0.2.1]\n", NULL},
    {"hostname", "", "hostname = \"\" # the system's host name\n", NULL},
    {"hostname", "mx example", NULL,
     "hostname: 'mx example' is not a host name (letters, digits, '-', '.', '_', or an "
     "address literal in brackets)"},
    {"message_size_limit", "10M", "message_size_limit = 10M\n", NULL},
    {"message_size_limit", "1000", "message_size_limit = 1000\n", NULL},
    {"message_size_limit", "0", NULL,
     "message_size_limit: 0 is out of range (1 to " SIZE_MAX_STR ")"},
    {"message_size_limit", "10X", NULL, "message_size_limit: invalid size '10X' " SIZE_HINT},
    {"message_size_limit", "16777216T", NULL, "message_size_limit: size '16777216T' is too large"},
    {"recipient_limit", "100", "recipient_limit = 100\n", NULL},
    {"recipient_limit", "0", NULL, "recipient_limit: number '0' is out of range (1 to 1000000)"},
    {"command_timeout", "10m", "command_timeout = 10m\n", NULL},
    {"command_timeout", "500ms", "command_timeout = 500ms\n", NULL},
    {"command_timeout", "1d", "command_timeout = 1d\n", NULL},
    {"command_timeout", "25h", NULL, "command_timeout: 25h is out of range (1ms to 1d)"},
    {"command_timeout", "0", NULL, "command_timeout: 0s is out of range (1ms to 1d)"},
    {"data_timeout", "600", "data_timeout = 10m\n", NULL},
    {"data_timeout", "2d", NULL, "data_timeout: 2d is out of range (1ms to 1d)"},
    {"spool_reserve", "1G", "spool_reserve = 1G\n", NULL},
    {"spool_reserve", "0", "spool_reserve = 0 # no reserve\n", NULL},
    {"spool_reserve", "lots", NULL, "spool_reserve: invalid size 'lots' " SIZE_HINT},
    {"spool_direct_io", "no", "spool_direct_io = no\n", NULL},
    {"control_socket", "/run/posthaste.sock", "control_socket = /run/posthaste.sock\n", NULL},
    {"control_socket",
     "/0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567"
     "890123456789abcdef",
     "control_socket = "
     "/0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567"
     "890123456789abcdef\n",
     NULL},
    {"control_socket",
     "/0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567"
     "890123456789abcdefg",
     NULL, "control_socket: longer than 107 octets"},
    {"discard", "yes", "discard = yes\n", NULL},
    {"delivery", "no", "delivery = no\n", NULL},
    {"discard", "off", "discard = no\n", NULL},
    {"discard", "maybe", NULL, "discard: invalid boolean 'maybe' " BOOL_HINT},
    {"log_level", "debug", "log_level = debug\n", NULL},
    {"log_level", "WARNING", "log_level = warning\n", NULL},
    {"log_level", "error", "log_level = error\n", NULL},
    {"log_level", "warn", NULL, "log_level: 'warn' is not error, warning, info or debug"},
    {"max_queue_age", "7d", "max_queue_age = 7d\n", NULL},
    {"max_queue_age", "1s", "max_queue_age = 1s\n", NULL},
    {"max_queue_age", "500ms", NULL, "max_queue_age: 500ms is out of range (1s to 365d)"},
    {"max_queue_age", "366d", NULL, "max_queue_age: 366d is out of range (1s to 365d)"},
    {"foo", "1", NULL, "unknown key 'foo'"},
    {"spool-dir", "1", NULL, "unknown key 'spool-dir'"},
    {"", "1", NULL, "unknown key ''"},
    /* delivery */
    {"resolver", "127.0.0.1:5353", "resolver = 127.0.0.1:5353\n", NULL},
    {"resolver", "127.0.0.1:53 , [::1]:53", "resolver = 127.0.0.1:53,[::1]:53\n", NULL},
    {"Resolver", "[2001:db8::53]:5353", "resolver = [2001:db8::53]:5353\n", NULL},
    {"resolver", "", "resolver = \"\" # the system's resolv.conf\n", NULL},
    {"resolver", "  ", "resolver = \"\" # the system's resolv.conf\n", NULL},
    {"resolver", "127.0.0.1", NULL,
     "resolver: invalid address '127.0.0.1' (expected HOST:PORT, [IPV6]:PORT or :PORT)"},
    {"resolver", "::1:53", NULL,
     "resolver: invalid address '::1:53' (an IPv6 address goes in brackets: [::1]:25)"},
    {"resolver", "ns.example.org:53", NULL,
     "resolver: 'ns.example.org' is not an IPv4 or IPv6 address"},
    {"resolver", ":53", NULL, "resolver: ':53' is not IP:PORT"},
    {"resolver", "127.0.0.1:0", NULL, "resolver: '127.0.0.1:0': port 0"},
    {"resolver", "127.0.0.1:53,,[::1]:53", NULL, "resolver: empty entry in the list"},
    {"resolver", "127.0.0.1:53,", NULL, "resolver: empty entry in the list"},
    {"smarthost", "[127.0.0.1]:2526", "smarthost = [127.0.0.1]:2526\n", NULL},
    {"smarthost", "mx1.example.org , mx2.example.org:587",
     "smarthost = mx1.example.org,mx2.example.org:587\n", NULL},
    {"smarthost", "", "smarthost = \"\" # none: deliver by MX\n", NULL},
    {"smarthost", "mx example", NULL,
     "smarthost: 'mx example': 'mx example' is not a host name " DOMAIN_HINT " or an IP address"},
    {"smarthost", "[mx.example.org]:25", NULL,
     "smarthost: '[mx.example.org]:25': 'mx.example.org' is not an IPv4 or IPv6 address"},
    {"smarthost", "mx.example.org:0", NULL,
     "smarthost: 'mx.example.org:0': invalid port (1 to 65535)"},
    {"smarthost", "a,", NULL, "smarthost: empty entry in the host list"},
    {"route.example.com", "[127.0.0.1]:2526,[::1]:2526",
     "route.example.com = [127.0.0.1]:2526,[::1]:2526\n", NULL},
    {"ROUTE.Example.COM", "mx.example.net", "route.example.com = mx.example.net\n", NULL},
    {"route.a-b.test", " 192.0.2.1 , mx:2525 ", "route.a-b.test = 192.0.2.1,mx:2525\n", NULL},
    {"route.example.com", "", NULL, "route.example.com: no host given"},
    {"route.example.com", "::1", NULL,
     "route.example.com: '::1': an IPv6 address goes in brackets ([::1] or [::1]:25)"},
    {"route.example.com", "[::1]25", NULL,
     "route.example.com: '[::1]25': expected ':PORT' after ']'"},
    {"route.example_com", "a", NULL, "route.example_com: not a domain name " DOMAIN_HINT},
    {"route.", "a", NULL, "route.: not a domain name " DOMAIN_HINT},
    {"route.a..b", "a", NULL, "route.a..b: not a domain name " DOMAIN_HINT},
    {"route.a.", "a", NULL, "route.a.: not a domain name " DOMAIN_HINT},
    {"route", "a", NULL, "'route': the domain goes in the key: route.DOMAIN"},
    {"local_domains", "a.test, B.test", "local_domains = a.test,b.test\n", NULL},
    {"local_domains", " a.test  b.test,,A.TEST ,", "local_domains = a.test,b.test\n", NULL},
    {"local_domains", "", "local_domains = \"\" # none\n", NULL},
    {"local_domains", " , ", "local_domains = \"\" # none\n", NULL},
    {"local_domains", "a.test,b_c.test", NULL,
     "local_domains: 'b_c.test' is not a domain name " DOMAIN_HINT},
    {"local_domains", "a.test;b.test", NULL,
     "local_domains: 'a.test;b.test' is not a domain name " DOMAIN_HINT},
    /* relay access */
    {"mynetworks", "10.0.0.0/8", "mynetworks = 10.0.0.0/8\n", NULL},
    {"MyNetworks", " 10.0.0.0/8 , 192.168.1.0/24\t[2001:DB8::]/32,,::1 ",
     "mynetworks = 10.0.0.0/8,192.168.1.0/24,2001:db8::/32,::1/128\n", NULL},
    {"mynetworks", "192.0.2.1", "mynetworks = 192.0.2.1/32\n", NULL},
    {"mynetworks", "[::1]/128", "mynetworks = ::1/128\n", NULL},
    {"mynetworks", "[::1]", "mynetworks = ::1/128\n", NULL},
    {"mynetworks", "[192.0.2.0]/24", "mynetworks = 192.0.2.0/24\n", NULL},
    {"mynetworks", "2001:0db8:0:0:0:0:0:1", "mynetworks = 2001:db8::1/128\n", NULL},
    {"mynetworks", "0.0.0.0/0,::/0", "mynetworks = 0.0.0.0/0,::/0\n", NULL},
    {"mynetworks", "::ffff:10.0.0.0/104", "mynetworks = ::ffff:10.0.0.0/104\n", NULL},
    {"mynetworks", "10.1.2.3/32 10.1.2.3/32", "mynetworks = 10.1.2.3/32,10.1.2.3/32\n", NULL},
    {"mynetworks", "10.0.0.0/008", "mynetworks = 10.0.0.0/8\n", NULL},
    {"mynetworks", "", "mynetworks = \"\" # none: no client may relay\n", NULL},
    {"mynetworks", " , ", "mynetworks = \"\" # none: no client may relay\n", NULL},
    {"mynetworks", "10.0.0.1/8", NULL, "mynetworks: 10.0.0.1/8 has host bits set"},
    {"mynetworks", "127.0.0.1/8", NULL, "mynetworks: 127.0.0.1/8 has host bits set"},
    {"mynetworks", "10.0.0.0/8,2001:db8::1/32", NULL,
     "mynetworks: 2001:db8::1/32 has host bits set"},
    {"mynetworks", "[::1]/64", NULL, "mynetworks: [::1]/64 has host bits set"},
    {"mynetworks", "0.0.0.1/0", NULL, "mynetworks: 0.0.0.1/0 has host bits set"},
    {"mynetworks", "10.0.0.0/33", NULL,
     "mynetworks: '10.0.0.0/33': invalid prefix length (0 to 32)"},
    {"mynetworks", "::/129", NULL, "mynetworks: '::/129': invalid prefix length (0 to 128)"},
    {"mynetworks", "10.0.0.0/", NULL, "mynetworks: '10.0.0.0/': invalid prefix length (0 to 32)"},
    {"mynetworks", "10.0.0.0/-8", NULL,
     "mynetworks: '10.0.0.0/-8': invalid prefix length (0 to 32)"},
    {"mynetworks", "10.0.0.0/8x", NULL,
     "mynetworks: '10.0.0.0/8x': invalid prefix length (0 to 32)"},
    {"mynetworks", "10.0.0.0/0008", NULL,
     "mynetworks: '10.0.0.0/0008': invalid prefix length (0 to 32)"},
    {"mynetworks", "10.0.0.0/8/8", NULL,
     "mynetworks: '10.0.0.0/8/8': invalid prefix length (0 to 32)"},
    {"mynetworks", "10.0.0.0/8;10.1.0.0/16", NULL,
     "mynetworks: '10.0.0.0/8;10.1.0.0/16': invalid prefix length (0 to 32)"},
    {"mynetworks", "localhost", NULL,
     "mynetworks: 'localhost': 'localhost' is not an IPv4 or IPv6 address"},
    {"mynetworks", "10.0.0/8", NULL,
     "mynetworks: '10.0.0/8': '10.0.0' is not an IPv4 or IPv6 address"},
    {"mynetworks", "/8", NULL, "mynetworks: '/8': '' is not an IPv4 or IPv6 address"},
    {"mynetworks", "fe80::1%eth0", NULL,
     "mynetworks: 'fe80::1%eth0': 'fe80::1%eth0' is not an IPv4 or IPv6 address"},
    {"mynetworks", "[::1", NULL, "mynetworks: '[::1': no closing ']'"},
    {"mynetworks", "[::1]128", NULL, "mynetworks: '[::1]128': expected '/PREFIX' after ']'"},
    {"mynetworks", "[]", NULL, "mynetworks: '[]': '' is not an IPv4 or IPv6 address"},
    {"relay_domains", "backup.test, B.Example", "relay_domains = backup.test,b.example\n", NULL},
    {"relay_domains", " x.test  x.test,,X.TEST ,", "relay_domains = x.test\n", NULL},
    {"relay_domains", "", "relay_domains = \"\" # none\n", NULL},
    {"relay_domains", "a.test,b_c.test", NULL,
     "relay_domains: 'b_c.test' is not a domain name " DOMAIN_HINT},
    {"users_file", "/etc/posthaste/users", "users_file = /etc/posthaste/users\n", NULL},
    {"users_file", "", "users_file = \"\" # none\n", NULL},
    {"users_file", "a\tb", NULL, "users_file: contains a control character"},
    {"mailbox_root", "/var/mail", "mailbox_root = /var/mail\n", NULL},
    {"mailbox_root", "", NULL, "mailbox_root: must not be empty"},
    {"accounting_log", "none", "accounting_log = none\n", NULL},
    {"accounting_log", "-", "accounting_log = -\n", NULL},
    {"accounting_log", "", NULL, "accounting_log: must not be empty"},
    {"retry_min", "10ms", "retry_min = 10ms\n", NULL},
    {"retry_min", "1d", "retry_min = 1d\n", NULL},
    {"retry_min", "9ms", NULL, "retry_min: 9ms is out of range (10ms to 1d)"},
    {"retry_max", "2h", "retry_max = 2h\n", NULL},
    {"retry_max", "8d", NULL, "retry_max: 8d is out of range (10ms to 7d)"},
    {"delay_warning_time", "0", "delay_warning_time = 0s\n", NULL},
    {"delay_warning_time", "500ms", "delay_warning_time = 500ms\n", NULL},
    {"delay_warning_time", "365d", "delay_warning_time = 365d\n", NULL},
    {"delay_warning_time", "366d", NULL, "delay_warning_time: 366d is out of range (0s to 365d)"},
    {"connect_timeout", "10s", "connect_timeout = 10s\n", NULL},
    {"connect_timeout", "0", NULL, "connect_timeout: 0s is out of range (1ms to 1d)"},
    {"delivery_active_max", "1", "delivery_active_max = 1\n", NULL},
    {"delivery_active_max", "0", NULL,
     "delivery_active_max: number '0' is out of range (1 to 1000000)"},
    {"delivery_concurrency", "10000", "delivery_concurrency = 10000\n", NULL},
    {"delivery_concurrency", "10001", NULL,
     "delivery_concurrency: number '10001' is out of range (1 to 10000)"},
    {"delivery_rate", "100/s", "delivery_rate = 100/s\n", NULL},
    {"delivery_rate", "5000/h", "delivery_rate = 5000/h\n", NULL},
    {"delivery_rate", "10/m", "delivery_rate = 10/m\n", NULL},
    {"delivery_rate", "50/d", "delivery_rate = 50/d\n", NULL},
    {"delivery_rate", "3/250ms", "delivery_rate = 3/250ms\n", NULL},
    {"delivery_rate", "10/5s", "delivery_rate = 10/5s\n", NULL},
    {"delivery_rate", "7/1000ms", "delivery_rate = 7/s\n", NULL},
    {"delivery_rate", "7/60s", "delivery_rate = 7/m\n", NULL},
    {"delivery_rate", "1/ms", "delivery_rate = 1/1ms\n", NULL},
    {"delivery_rate", "4294967295/365d", "delivery_rate = 4294967295/365d\n", NULL},
    {"delivery_rate", "0", "delivery_rate = unlimited\n", NULL},
    {"delivery_rate", "UNLIMITED", "delivery_rate = unlimited\n", NULL},
    {"delivery_rate", "0/s", "delivery_rate = unlimited\n", NULL},
    {"delivery_rate", "4294967296/s", NULL,
     "delivery_rate: rate '4294967296/s': count above 4294967295"},
    {"delivery_rate", "10/0s", NULL,
     "delivery_rate: rate '10/0s': the period 0s is out of range (1ms to 365d)"},
    {"delivery_rate", "1/366d", NULL,
     "delivery_rate: rate '1/366d': the period 366d is out of range (1ms to 365d)"},
    {"delivery_rate", "10", NULL, "delivery_rate: invalid rate '10' " RATE_HINT},
    {"delivery_rate", "10/5", NULL, "delivery_rate: invalid rate '10/5' " RATE_HINT},
    {"delivery_rate", "/s", NULL, "delivery_rate: invalid rate '/s' " RATE_HINT},
    {"delivery_rate", "10/", NULL, "delivery_rate: invalid rate '10/' " RATE_HINT},
    {"delivery_rate", "10/w", NULL, "delivery_rate: invalid rate '10/w' " RATE_HINT},
    {"delivery_rate", "10/S", NULL, "delivery_rate: invalid rate '10/S' " RATE_HINT},
    {"delivery_rate", "10 /s", NULL, "delivery_rate: invalid rate '10 /s' " RATE_HINT},
    {"delivery_rate", "-1/s", NULL, "delivery_rate: invalid rate '-1/s' " RATE_HINT},
    {"delivery_rate", "1/1/s", NULL, "delivery_rate: invalid rate '1/1/s' " RATE_HINT},
    {"delivery_connection_rate", "10/s", "delivery_connection_rate = 10/s\n", NULL},
    {"delivery_connection_rate", "fast", NULL,
     "delivery_connection_rate: invalid rate 'fast' " RATE_HINT},
    {"delivery_messages_per_connection", "1", "delivery_messages_per_connection = 1\n", NULL},
    {"delivery_messages_per_connection", "1000001", NULL,
     "delivery_messages_per_connection: number '1000001' is out of range (1 to 1000000)"},
    {"delivery_idle_timeout", "250ms", "delivery_idle_timeout = 250ms\n", NULL},
    {"delivery_idle_timeout", "0", NULL, "delivery_idle_timeout: 0s is out of range (1ms to 1d)"},
    {"destination.example.com",
     "concurrency=2 rate=100/s connection_rate=10/s messages_per_connection=50 idle_timeout=2s",
     "destination.example.com = concurrency=2 rate=100/s connection_rate=10/s "
     "messages_per_connection=50 idle_timeout=2s tls=may verify=none\n",
     NULL},
    {"Destination.B.Test", "rate=3/250ms",
     "destination.b.test = concurrency=20 rate=3/250ms connection_rate=unlimited "
     "messages_per_connection=100 idle_timeout=5s tls=may verify=none\n",
     NULL},
    {"destination.b.test", "",
     "destination.b.test = concurrency=20 rate=unlimited connection_rate=unlimited "
     "messages_per_connection=100 idle_timeout=5s tls=may verify=none\n",
     NULL},
    {"destination.b.test", " CONCURRENCY=3\tconcurrency=4 ",
     "destination.b.test = concurrency=4 rate=unlimited", NULL},
    {"destination.b.test", "tls=require verify=name",
     "destination.b.test = concurrency=20 rate=unlimited connection_rate=unlimited "
     "messages_per_connection=100 idle_timeout=5s tls=require verify=name\n",
     NULL},
    {"destination.b.test", "tls=maybe", NULL,
     "destination.b.test: tls: 'maybe' is not none, may or require"},
    {"destination.b.test", "verify=full", NULL,
     "destination.b.test: verify: 'full' is not none or name"},
    {"delivery_tls", "require", "delivery_tls = require\n", NULL},
    {"delivery_tls_verify", "name", "delivery_tls_verify = name\n", NULL},
    {"destination.b.test", "concurrency=0", NULL,
     "destination.b.test: concurrency: number '0' is out of range (1 to 10000)"},
    {"destination.b.test", "rate=fast", NULL,
     "destination.b.test: rate: invalid rate 'fast' " RATE_HINT},
    {"destination.b.test", "idle_timeout=0", NULL,
     "destination.b.test: idle_timeout: 0s is out of range (1ms to 1d)"},
    {"destination.b.test", "messages_per_connection=", NULL,
     "destination.b.test: messages_per_connection: invalid number '' (expected decimal digits)"},
    {"destination.b.test", "speed=1", NULL,
     "destination.b.test: unknown limit 'speed' (" LIMIT_NAMES ")"},
    {"destination.b.test", "concurrency", NULL,
     "destination.b.test: 'concurrency' is not NAME=VALUE (NAME: " LIMIT_NAMES ")"},
    {"destination.b.test", "=3", NULL,
     "destination.b.test: '=3' is not NAME=VALUE (NAME: " LIMIT_NAMES ")"},
    {"destination.b.test", "concurrency = 3", NULL,
     "destination.b.test: 'concurrency' is not NAME=VALUE (NAME: " LIMIT_NAMES ")"},
    {"destination.b_test", "", NULL, "destination.b_test: not a domain name " DOMAIN_HINT},
    {"destination", "concurrency=1", NULL,
     "'destination': the domain goes in the key: destination.DOMAIN"},
    {"TLS_CERT", "/etc/ssl/mx.pem", "tls_cert = /etc/ssl/mx.pem\n", NULL},
    {"tls_key", "", "tls_key = \"\" # none\n", NULL},
    {"submission_listen", "[::1]:587", "submission_listen = [::1]:587\n", NULL},
    {"submission_listen", "none", "submission_listen = none\n", NULL},
    {"submissions_listen", "0.0.0.0:465", "submissions_listen = 0.0.0.0:465\n", NULL},
    {"submissions_listen", "", "submissions_listen = none\n", NULL},
    {"submissions_listen", "nowhere", NULL,
     "submissions_listen: invalid address 'nowhere' (expected HOST:PORT, [IPV6]:PORT or :PORT)"},
    {"submission_listen", "mx.example:587", NULL,
     "submission_listen: 'mx.example' is not an IPv4 or IPv6 address"},
    {"smtp_sender_login_check", "no", "smtp_sender_login_check = no\n", NULL},
    {"smtp_sender_login_check", "maybe", NULL,
     "smtp_sender_login_check: invalid boolean 'maybe' (expected yes, no, true, false, on, off, "
     "1 or 0)"},
    {"client_connection_limit", "10", "client_connection_limit = 10\n", NULL},
    {"client_connection_limit", "0", "client_connection_limit = 0 # no limit\n", NULL},
    {"client_connection_limit", "1000001", NULL,
     "client_connection_limit: number '1000001' is out of range (0 to 1000000)"},
    {"client_connection_rate", "100/m", "client_connection_rate = 100/m\n", NULL},
    {"client_connection_rate", "unlimited", "client_connection_rate = unlimited\n", NULL},
    {"client_connection_rate", "10", NULL,
     "client_connection_rate: invalid rate '10' " RATE_HINT},
    {"client_message_rate", "6000/h", "client_message_rate = 6000/h\n", NULL},
    {"client_message_rate", "5/10s", "client_message_rate = 5/10s\n", NULL},
    {"client_message_rate", "1/366d", NULL,
     "client_message_rate: rate '1/366d': the period 366d is out of range (1ms to 365d)"},
    {"client_limit_exempt_mynetworks", "off", "client_limit_exempt_mynetworks = no\n", NULL},
};

static void test_ph_set(void **state)
{
	for (size_t i = 0; i < ARRAY_SIZE(set_cases); i++) {
		const struct set_case *t = &set_cases[i];
		struct ph_config c, before;
		char name[160], err[512] = "";
		int rc;

		snprintf(name, sizeof(name), "set(%s, '%.100s')", t->key, t->value);
		ph_config_default(&c);
		before = c;
		rc = ph_config_set(&c, t->key, t->value, err, sizeof(err));
		expect_rc(name, t->err ? -1 : 0, rc, err);
		if (t->err) {
			expect_str(name, "error", t->err, err);
			if (memcmp(&c, &before, sizeof(c)) != 0)
				fail_msg("%s: the configuration changed on error", name);
		} else {
			char *out = ph_printed(&c);
			struct ph_config again;

			if (!strstr(out, t->line))
				fail_msg("%s: want line [%s] in:\n%s", name, t->line, out);
			/* the printed form loads back to the same configuration */
			ph_config_default(&again);
			rc = ph_config_load_buffer(&again, "printed", out, strlen(out), err,
			                           sizeof(err));
			expect_rc(name, 0, rc, err);
			if (!ph_equal(&c, &again))
				fail_msg("%s: printed form does not load back equal:\n%s", name,
				         out);
			free(out);
		}
	}
}

static void test_ph_listen_limit(void **state)
{
	struct ph_config c;
	char err[256], v[32];

	ph_config_default(&c);
	c.nlisten = 0;
	for (unsigned i = 0; i < PH_LISTEN_MAX; i++) {
		snprintf(v, sizeof(v), "10.0.0.%u:25", i + 1);
		assert_int_equal(ph_config_set(&c, "listen", v, err, sizeof(err)), 0);
	}
	assert_int_equal(c.nlisten, PH_LISTEN_MAX);
	assert_int_equal(ph_config_set(&c, "listen", "10.0.0.99:25", err, sizeof(err)), -1);
	assert_string_equal(err, "listen: more than 16 addresses");
	assert_int_equal(c.nlisten, PH_LISTEN_MAX);
	assert_int_equal(ph_config_check(&c, err, sizeof(err)), 0);
}

/* spool_dir as long as the field allows, but only if it can be printed back on one line. */
static void test_ph_long_spool_dir(void **state)
{
	static const struct {
		const char *name;
		size_t len;
		char fill;
		const char *err;
	} cases[] = {
	    {"fits_bare", CONFIG_LINE_MAX - 12, 'a', NULL},
	    {"one_over_line", CONFIG_LINE_MAX - 11, 'a',
	     "spool_dir: too long to be written on one "
	     "configuration line (4096 octets)"},
	    {"field_full", 4096, 'a', "spool_dir: longer than 4095 octets"},
	    {"escapes_fit", (CONFIG_LINE_MAX - 14) / 2 - 1, '\\', NULL},
	    {"escapes_over_line", (CONFIG_LINE_MAX - 14) / 2 + 1, '\\',
	     "spool_dir: too long to be written on one configuration line (4096 octets)"},
	};
	char *v = malloc(8192);

	assert_non_null(v);
	for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
		struct ph_config c, again;
		char err[256] = "";
		int rc;

		memset(v, cases[i].fill, cases[i].len);
		v[cases[i].len] = '\0';
		if (cases[i].fill == '\\')
			v[0] = ' '; /* leading blank: written quoted, with escapes */
		ph_config_default(&c);
		assert_int_equal(
		    ph_config_set(&c, "control_socket", "/run/ph.sock", err, sizeof(err)), 0);
		rc = ph_config_set(&c, "spool_dir", v, err, sizeof(err));
		expect_rc(cases[i].name, cases[i].err ? -1 : 0, rc, err);
		if (cases[i].err) {
			expect_str(cases[i].name, "error", cases[i].err, err);
		} else {
			char *out = ph_printed(&c);
			assert_int_equal(ph_config_check(&c, err, sizeof(err)), 0);
			ph_config_default(&again);
			rc = ph_config_load_buffer(&again, "printed", out, strlen(out), err,
			                           sizeof(err));
			expect_rc(cases[i].name, 0, rc, err);
			assert_true(ph_equal(&c, &again));
			free(out);
		}
	}
	free(v);
}

/* ---- delivery: host lists, helpers, limits ---- */

/* ph_hosts_parse: each host as "HOST PORT L|-" (L: literal), separated by '|'. */
static void test_ph_hosts_parse(void **state)
{
	static const struct {
		const char *in;
		unsigned max; /* 0: PH_HOSTS_MAX */
		const char *want;
		const char *err;
	} cases[] = {
	    {"mx.example.org", 0, "mx.example.org 25 -", NULL},
	    {"mx.example.org:2525", 0, "mx.example.org 2525 -", NULL},
	    {"[127.0.0.1]:2526,[::1]:2526", 0, "127.0.0.1 2526 L|::1 2526 L", NULL},
	    {"[::1]", 0, "::1 25 L", NULL},
	    {"[192.0.2.1]", 0, "192.0.2.1 25 L", NULL},
	    {"192.0.2.1", 0, "192.0.2.1 25 L", NULL},
	    {"192.0.2.1:65535", 0, "192.0.2.1 65535 L", NULL},
	    {" a , b:1 ,\tc ", 0, "a 25 -|b 1 -|c 25 -", NULL},
	    {"A-1.Example.ORG:00025", 0, "A-1.Example.ORG 25 -", NULL},
	    {"1.2.3", 0, "1.2.3 25 -", NULL}, /* a (numeric) host name, not an address */
	    {"a,b,c", 3, "a 25 -|b 25 -|c 25 -", NULL},
	    {"a,b,c,d", 3, NULL, "more than 3 hosts"},
	    {"", 0, NULL, "no host given"},
	    {"  ", 0, NULL, "no host given"},
	    {",", 0, NULL, "empty entry in the host list"},
	    {"a,,b", 0, NULL, "empty entry in the host list"},
	    {"a, ", 0, NULL, "empty entry in the host list"},
	    {":25", 0, NULL, "':25': empty host"},
	    {"a:", 0, NULL, "'a:': invalid port (1 to 65535)"},
	    {"a:0", 0, NULL, "'a:0': invalid port (1 to 65535)"},
	    {"a:65536", 0, NULL, "'a:65536': invalid port (1 to 65535)"},
	    {"a:100000", 0, NULL, "'a:100000': invalid port (1 to 65535)"},
	    {"a:2x", 0, NULL, "'a:2x': invalid port (1 to 65535)"},
	    {"a:-1", 0, NULL, "'a:-1': invalid port (1 to 65535)"},
	    {"::1", 0, NULL, "'::1': an IPv6 address goes in brackets ([::1] or [::1]:25)"},
	    {"[::1", 0, NULL, "'[::1': no closing ']'"},
	    {"[::1]x", 0, NULL, "'[::1]x': expected ':PORT' after ']'"},
	    {"[::1]:", 0, NULL, "'[::1]:': invalid port (1 to 65535)"},
	    {"[]", 0, NULL, "'[]': '' is not an IPv4 or IPv6 address"},
	    {"[fe80::1%eth0]", 0, NULL,
	     "'[fe80::1%eth0]': 'fe80::1%eth0' is not an IPv4 or IPv6 address"},
	    {"[mx.example.org]", 0, NULL,
	     "'[mx.example.org]': 'mx.example.org' is not an IPv4 or IPv6 address"},
	    {"a b", 0, NULL, "'a b': 'a b' is not a host name " DOMAIN_HINT " or an IP address"},
	    {"a_b:25", 0, NULL,
	     "'a_b:25': 'a_b' is not a host name " DOMAIN_HINT " or an IP address"},
	    {".a", 0, NULL, "'.a': '.a' is not a host name " DOMAIN_HINT " or an IP address"},
	    {"a..b", 0, NULL, "'a..b': 'a..b' is not a host name " DOMAIN_HINT " or an IP address"},
	    {"a#b", 0, NULL, "'a#b': 'a#b' is not a host name " DOMAIN_HINT " or an IP address"},
	    {"0123456789012345678901234567890123456789012345678901234567890123.x", 0, NULL,
	     "'0123456789012345678901234567890123456789012345678901234567890123': "
	     "'0123456789012345678901234567890123456789012345678901234567890123' is not a host "
	     "name " DOMAIN_HINT " or an IP address"},
	};

	for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
		struct ph_hostport hp[PH_HOSTS_MAX];
		char name[160], err[256] = "", got[1024] = "";
		unsigned max = cases[i].max ? cases[i].max : PH_HOSTS_MAX;
		int n = ph_hosts_parse(cases[i].in, hp, max, err, sizeof(err));

		snprintf(name, sizeof(name), "ph_hosts_parse('%s')", cases[i].in);
		expect_rc(name, cases[i].err ? -1 : 0, n < 0 ? -1 : 0, err);
		if (cases[i].err) {
			expect_str(name, "error", cases[i].err, err);
			continue;
		}
		for (int j = 0; j < n; j++) {
			char one[300];

			snprintf(one, sizeof(one), "%s%.255s %u %s", j ? "|" : "", hp[j].host,
			         hp[j].port, hp[j].literal ? "L" : "-");
			assert_true(strlen(got) + strlen(one) < sizeof(got));
			strcat(got, one);
		}
		expect_str(name, "hosts", cases[i].want, got);
		/* the same count without an output array */
		assert_int_equal(ph_hosts_parse(cases[i].in, NULL, max, err, sizeof(err)), n);
	}
}

/* A host list of 16 entries is accepted by the configuration; 17 are not. */
static void test_ph_hosts_max(void **state)
{
	struct ph_config c;
	char v[1024], err[256];

	ph_config_default(&c);
	v[0] = '\0';
	for (unsigned i = 0; i < PH_HOSTS_MAX; i++)
		snprintf(v + strlen(v), sizeof(v) - strlen(v), "%sh%u", i ? "," : "", i);
	assert_int_equal(ph_config_set(&c, "smarthost", v, err, sizeof(err)), 0);
	assert_int_equal(ph_config_set(&c, "route.a.test", v, err, sizeof(err)), 0);
	strcat(v, ",h16");
	assert_int_equal(ph_config_set(&c, "smarthost", v, err, sizeof(err)), -1);
	assert_string_equal(err, "smarthost: more than 16 hosts");
	assert_int_equal(ph_config_set(&c, "route.a.test", v, err, sizeof(err)), -1);
	assert_string_equal(err, "route.a.test: more than 16 hosts");

	/* a list that would not fit the field: 16 long names */
	v[0] = '\0';
	for (unsigned i = 0; i < PH_HOSTS_MAX; i++)
		snprintf(v + strlen(v), sizeof(v) - strlen(v), "%s%032u", i ? "," : "", i);
	assert_int_equal(ph_config_set(&c, "smarthost", v, err, sizeof(err)), -1);
	assert_string_equal(err, "smarthost: longer than 511 octets");
	assert_int_equal(ph_config_check(&c, err, sizeof(err)), 0);
}

/* resolver and local_domains: as long as their fields (and a configuration line) allow. */
static void test_ph_long_lists(void **state)
{
	struct ph_config c, again;
	char *v = malloc(8192), err[256], *out;
	const char *line;
	size_t n;

	assert_non_null(v);
	ph_config_default(&c);
	/* 17 x "[1:2:3:4:5:6:7:8]:53," = 357 octets */
	v[0] = '\0';
	for (unsigned i = 0; i < 17; i++)
		strcat(v, i ? ",[1:2:3:4:5:6:7:8]:53" : "[1:2:3:4:5:6:7:8]:53");
	assert_int_equal(ph_config_set(&c, "resolver", v, err, sizeof(err)), -1);
	assert_string_equal(err, "resolver: longer than 255 octets");
	v[12 * 21 - 1] = '\0'; /* 12 entries: 251 octets */
	assert_int_equal(ph_config_set(&c, "resolver", v, err, sizeof(err)), 0);
	assert_string_equal(c.resolver, v);

	/* local_domains: "local_domains = " + the list must fit in 4096 octets */
	n = 0;
	v[0] = '\0';
	for (unsigned k = 0; n < 4080; k++) /* "d0000.test", 371 of them */
		n += (size_t)sprintf(v + n, "%sd%04u.test", k ? "," : "", k);
	assert_int_equal(n, 4080);
	strcat(v, ",b"); /* 4082 octets */
	assert_int_equal(ph_config_set(&c, "local_domains", v, err, sizeof(err)), -1);
	assert_string_equal(
	    err, "local_domains: too long to be written on one configuration line (4096 octets)");
	strcpy(v + 4080, ", D0000.TEST  d0001.test"); /* repeated names are dropped */
	assert_int_equal(ph_config_set(&c, "local_domains", v, err, sizeof(err)), 0);
	v[4080] = '\0';
	assert_string_equal(c.local_domains, v);
	assert_int_equal(ph_config_set(&c, "users_file", "/u", err, sizeof(err)), 0);
	assert_int_equal(ph_config_check(&c, err, sizeof(err)), 0);
	out = ph_printed(&c);
	line = strstr(out, "\nlocal_domains = d0000.test,");
	assert_non_null(line);
	assert_int_equal(strcspn(line + 1, "\n"), CONFIG_LINE_MAX);
	ph_config_default(&again);
	assert_int_equal(
	    ph_config_load_buffer(&again, "printed", out, strlen(out), err, sizeof(err)), 0);
	assert_true(ph_equal(&c, &again));
	free(out);
	free(v);
}

/* route.DOMAIN and destination.DOMAIN: the same domain replaces; at most 64 domains. */
static void test_ph_route_dest_limits(void **state)
{
	struct ph_config c, before;
	char key[64], err[256];

	ph_config_default(&c);
	for (unsigned i = 0; i < PH_ROUTE_MAX; i++) {
		snprintf(key, sizeof(key), "route.d%u.test", i);
		assert_int_equal(ph_config_set(&c, key, "mx.test", err, sizeof(err)), 0);
		snprintf(key, sizeof(key), "destination.d%u.test", i);
		assert_int_equal(ph_config_set(&c, key, "concurrency=1", err, sizeof(err)), 0);
	}
	assert_int_equal(c.nroutes, PH_ROUTE_MAX);
	assert_int_equal(c.ndests, PH_DEST_MAX);
	memcpy(&before, &c, sizeof(c));
	assert_int_equal(ph_config_set(&c, "route.new.test", "mx.test", err, sizeof(err)), -1);
	assert_string_equal(err, "route.new.test: more than 64 routes");
	assert_int_equal(ph_config_set(&c, "destination.new.test", "", err, sizeof(err)), -1);
	assert_string_equal(err, "destination.new.test: more than 64 destinations");
	assert_memory_equal(&c, &before, sizeof(c));

	/* replacing still works when full, in place */
	assert_int_equal(ph_config_set(&c, "Route.D7.Test", "[::1]:2526", err, sizeof(err)), 0);
	assert_int_equal(c.nroutes, PH_ROUTE_MAX);
	assert_string_equal(c.routes[7].domain, "d7.test");
	assert_string_equal(c.routes[7].hosts, "[::1]:2526");
	assert_int_equal(ph_config_set(&c, "destination.d7.test", "rate=1/s", err, sizeof(err)), 0);
	assert_int_equal(c.ndests, PH_DEST_MAX);
	assert_int_equal(c.dests[7].lim.concurrency, 20); /* replaced, not merged */
	assert_int_equal(c.dests[7].lim.msg_rate.count, 1);
	assert_int_equal(c.dests[7].lim.msg_rate.per_ms, 1000);
	assert_int_equal(ph_config_check(&c, err, sizeof(err)), 0);

	/* a replaced entry is written over completely: equal to one set once */
	ph_config_default(&c);
	ph_config_default(&before);
	assert_int_equal(
	    ph_config_set(&c, "route.a.test", "a-much-longer-name.example:2525", err, sizeof(err)),
	    0);
	assert_int_equal(ph_config_set(&c, "route.a.test", "b", err, sizeof(err)), 0);
	assert_int_equal(ph_config_set(&before, "route.a.test", "b", err, sizeof(err)), 0);
	assert_int_equal(ph_config_set(&c, "destination.a.test", "rate=3/s", err, sizeof(err)), 0);
	assert_int_equal(ph_config_set(&c, "destination.a.test", "", err, sizeof(err)), 0);
	assert_int_equal(ph_config_set(&before, "destination.a.test", "", err, sizeof(err)), 0);
	assert_memory_equal(&c, &before, sizeof(c));

	/* rates write both members; a rate set back to unlimited equals the default */
	ph_config_default(&c);
	ph_config_default(&before);
	assert_int_equal(ph_config_set(&c, "delivery_rate", "3/250ms", err, sizeof(err)), 0);
	assert_int_equal(c.limits.msg_rate.count, 3);
	assert_int_equal(c.limits.msg_rate.per_ms, 250);
	assert_int_equal(ph_config_set(&c, "delivery_rate", "unlimited", err, sizeof(err)), 0);
	assert_memory_equal(&c, &before, sizeof(c));
}

static void test_ph_helpers(void **state)
{
	static const char file[] = "local_domains = a.test, Example.ORG\n"
	                           "relay_domains = Backup.test example.net\n"
	                           "users_file = /u\n"
	                           "delivery_concurrency = 7\n"
	                           "route.example.com = [127.0.0.1]:2526\n"
	                           "route.sub.example.com = mx.sub.example.com\n"
	                           "destination.example.com = concurrency=2 rate=100/s\n";
	struct ph_config c;
	const struct ph_limits *l;
	char err[256];

	ph_config_default(&c);
	assert_int_equal(ph_config_load_buffer(&c, "t.conf", file, strlen(file), err, sizeof(err)),
	                 0);
	assert_int_equal(ph_config_check(&c, err, sizeof(err)), 0);

	l = ph_config_limits_for(&c, "EXAMPLE.com");
	assert_ptr_equal(l, &c.dests[0].lim);
	assert_int_equal(l->concurrency, 2);
	assert_int_equal(l->msg_rate.count, 100);
	assert_int_equal(l->msg_rate.per_ms, 1000);
	assert_int_equal(l->conn_rate.count, 0);
	assert_int_equal(l->msgs_per_conn, 100);
	assert_int_equal(l->idle_timeout_ms, 5000);
	assert_ptr_equal(ph_config_limits_for(&c, "sub.example.com"), &c.limits);
	assert_ptr_equal(ph_config_limits_for(&c, "example.co"), &c.limits);
	assert_ptr_equal(ph_config_limits_for(&c, ""), &c.limits);
	assert_int_equal(ph_config_limits_for(&c, "other.test")->concurrency, 7);

	assert_string_equal(ph_config_route_for(&c, "example.com"), "[127.0.0.1]:2526");
	assert_string_equal(ph_config_route_for(&c, "Example.Com"), "[127.0.0.1]:2526");
	assert_string_equal(ph_config_route_for(&c, "sub.example.com"), "mx.sub.example.com");
	assert_null(ph_config_route_for(&c, "x.example.com"));
	assert_null(ph_config_route_for(&c, "example.com."));
	assert_null(ph_config_route_for(&c, ""));

	assert_true(ph_config_is_local(&c, "a.test", 6));
	assert_true(ph_config_is_local(&c, "A.TEST", 6));
	assert_true(ph_config_is_local(&c, "example.org", 11));
	assert_true(ph_config_is_local(&c, "example.orgXYZ", 11)); /* only len octets */
	assert_false(ph_config_is_local(&c, "a.tes", 5));
	assert_false(ph_config_is_local(&c, "a.test,example.org", 18));
	assert_false(ph_config_is_local(&c, "b.test", 6));
	assert_false(ph_config_is_local(&c, "", 0));
	assert_false(ph_config_is_local(&c, "backup.test", 11));

	assert_true(ph_config_is_relay_domain(&c, "backup.test", 11));
	assert_true(ph_config_is_relay_domain(&c, "BACKUP.TEST", 11));
	assert_true(ph_config_is_relay_domain(&c, "example.net", 11));
	assert_true(ph_config_is_relay_domain(&c, "example.netXYZ", 11)); /* only len octets */
	assert_false(ph_config_is_relay_domain(&c, "sub.backup.test", 15)); /* exact, no subdomains */
	assert_false(ph_config_is_relay_domain(&c, "ackup.test", 10));
	assert_false(ph_config_is_relay_domain(&c, "backup.test,example.net", 23));
	assert_false(ph_config_is_relay_domain(&c, "a.test", 6)); /* local, not relay */
	assert_false(ph_config_is_relay_domain(&c, "", 0));
	ph_config_default(&c);
	assert_false(ph_config_is_relay_domain(&c, "backup.test", 11));
	assert_false(ph_config_is_relay_domain(&c, "", 0));
	assert_false(ph_config_is_local(&c, "a.test", 6));
	assert_false(ph_config_is_local(&c, "", 0));
	assert_null(ph_config_route_for(&c, "example.com"));
	assert_ptr_equal(ph_config_limits_for(&c, "example.com"), &c.limits);
}

/* ---- relay access: mynetworks ---- */

/* ph_networks_parse: each network as "4|6 ADDRESS/PREFIX", separated by '|'. */
static void test_ph_networks_parse(void **state)
{
	static const struct {
		const char *in;
		unsigned max; /* 0: PH_NETWORKS_MAX */
		const char *want;
		const char *err;
	} cases[] = {
	    {"", 0, "", NULL},
	    {" ,\t, ", 0, "", NULL},
	    {"127.0.0.0/8,::1/128", 0, "4 127.0.0.0/8|6 ::1/128", NULL},
	    {"192.0.2.1", 0, "4 192.0.2.1/32", NULL},
	    {"::1", 0, "6 ::1/128", NULL},
	    {"[::1]", 0, "6 ::1/128", NULL},
	    {"[2001:db8::]/32 , 0.0.0.0/0\t::/0", 0, "6 2001:db8::/32|4 0.0.0.0/0|6 ::/0", NULL},
	    {"192.0.2.128/25", 0, "4 192.0.2.128/25", NULL},
	    {"::ffff:192.0.2.0/120", 0, "6 ::ffff:192.0.2.0/120", NULL},
	    {"a,b", 1, NULL, "'a': 'a' is not an IPv4 or IPv6 address"},
	    {"10.0.0.0/8 10.0.0.0/8", 1, NULL, "more than 1 networks"},
	    {"10.0.0.0/8", 0, "4 10.0.0.0/8", NULL},
	    {"192.0.2.1/24", 0, NULL, "192.0.2.1/24 has host bits set"},
	    {"192.0.2.128/24", 0, NULL, "192.0.2.128/24 has host bits set"},
	    {"192.0.2.129/25", 0, NULL, "192.0.2.129/25 has host bits set"},
	    {"2001:db8::8000/113", 0, "6 2001:db8::8000/113", NULL},
	    {"2001:db8::4000/113", 0, NULL, "2001:db8::4000/113 has host bits set"},
	    {"::1/127", 0, NULL, "::1/127 has host bits set"},
	    {"1.2.3.4/33", 0, NULL, "'1.2.3.4/33': invalid prefix length (0 to 32)"},
	    {"::/1000", 0, NULL, "'::/1000': invalid prefix length (0 to 128)"},
	    {"[1.2.3.4/8]", 0, NULL, "'[1.2.3.4/8]': '1.2.3.4/8' is not an IPv4 or IPv6 address"},
	    {"0123456789012345678901234567890123456789012345678901234567890123456789/8", 0, NULL,
	     "'0123456789012345678901234567890123456789012345678901234567890123...': "
	     "'0123456789012345678901234567890123456789012345678901234567890123...' is not an "
	     "IPv4 or IPv6 address"},
	};

	for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
		struct ph_net nets[PH_NETWORKS_MAX];
		char name[160], err[256] = "", got[2048] = "", a[INET6_ADDRSTRLEN];
		unsigned max = cases[i].max ? cases[i].max : PH_NETWORKS_MAX;
		int n = ph_networks_parse(cases[i].in, nets, max, err, sizeof(err));

		snprintf(name, sizeof(name), "ph_networks_parse('%s')", cases[i].in);
		expect_rc(name, cases[i].err ? -1 : 0, n < 0 ? -1 : 0, err);
		if (cases[i].err) {
			expect_str(name, "error", cases[i].err, err);
			assert_int_equal(ph_networks_parse(cases[i].in, NULL, max, err, sizeof(err)),
			                 -1);
			continue;
		}
		for (int j = 0; j < n; j++) {
			char one[80];

			assert_true(nets[j].family == AF_INET || nets[j].family == AF_INET6);
			assert_non_null(inet_ntop(nets[j].family, nets[j].addr, a, sizeof(a)));
			if (nets[j].family == AF_INET) /* the unused octets are 0 */
				assert_memory_equal(nets[j].addr + 4, "\0\0\0\0\0\0\0\0\0\0\0\0", 12);
			snprintf(one, sizeof(one), "%s%d %s/%u", j ? "|" : "",
			         nets[j].family == AF_INET ? 4 : 6, a, nets[j].prefix);
			strcat(got, one);
		}
		expect_str(name, "networks", cases[i].want, got);
		assert_int_equal(ph_networks_parse(cases[i].in, NULL, max, err, sizeof(err)), n);
	}
}

/* An address as a socket reports it: AF_INET6 when it holds a ':', else AF_INET. */
static void sockaddr_of(const char *a, struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof(*ss));
	if (strchr(a, ':')) {
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;

		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = htons(25);
		assert_int_equal(inet_pton(AF_INET6, a, &sin6->sin6_addr), 1);
	} else {
		struct sockaddr_in *sin = (struct sockaddr_in *)ss;

		sin->sin_family = AF_INET;
		sin->sin_port = htons(25);
		assert_int_equal(inet_pton(AF_INET, a, &sin->sin_addr), 1);
	}
}

static void test_ph_networks_match(void **state)
{
	static const struct {
		const char *nets, *addr;
		bool want;
	} cases[] = {
	    /* the default: loopback only */
	    {"127.0.0.0/8,::1/128", "127.0.0.1", true},
	    {"127.0.0.0/8,::1/128", "127.255.255.254", true},
	    {"127.0.0.0/8,::1/128", "128.0.0.1", false},
	    {"127.0.0.0/8,::1/128", "126.255.255.255", false},
	    {"127.0.0.0/8,::1/128", "192.0.2.1", false},
	    {"127.0.0.0/8,::1/128", "::1", true},
	    {"127.0.0.0/8,::1/128", "::2", false},
	    {"127.0.0.0/8,::1/128", "::", false},
	    {"127.0.0.0/8,::1/128", "::ffff:127.0.0.1", true}, /* IPv4-mapped */
	    {"127.0.0.0/8,::1/128", "::ffff:128.0.0.1", false},
	    {"127.0.0.0/8,::1/128", "2001:db8::1", false},
	    /* IPv4 */
	    {"10.0.0.0/8", "10.1.2.3", true},
	    {"10.0.0.0/8", "11.0.0.0", false},
	    {"10.0.0.0/8", "9.255.255.255", false},
	    {"10.0.0.0/8", "::ffff:10.1.2.3", true},
	    {"10.0.0.0/8", "::a01:203", false},        /* IPv4-compatible: not mapped */
	    {"10.0.0.0/8", "64:ff9b::a01:203", false}, /* NAT64: not mapped */
	    {"10.0.0.0/8", "::ffff:0:a01:203", false}, /* SIIT-translated: not mapped */
	    {"192.0.2.0/25", "192.0.2.127", true},
	    {"192.0.2.0/25", "192.0.2.128", false},
	    {"192.0.2.128/25", "192.0.2.128", true},
	    {"192.0.2.128/25", "192.0.2.127", false},
	    {"172.16.0.0/12", "172.31.255.255", true},
	    {"172.16.0.0/12", "172.32.0.0", false},
	    {"192.0.2.7", "192.0.2.7", true}, /* /32 */
	    {"192.0.2.7/32", "::ffff:192.0.2.7", true},
	    {"192.0.2.7/32", "192.0.2.6", false},
	    {"192.0.2.7/32", "192.0.2.8", false},
	    {"0.0.0.0/0", "1.2.3.4", true},
	    {"0.0.0.0/0", "255.255.255.255", true},
	    {"0.0.0.0/0", "::ffff:1.2.3.4", true},
	    {"0.0.0.0/0", "::1", false},
	    {"0.0.0.0/0", "2001:db8::1", false},
	    /* IPv6 */
	    {"::/0", "2001:db8::1", true},
	    {"::/0", "::1", true},
	    {"::/0", "1.2.3.4", true}, /* its mapped form ::ffff:1.2.3.4 */
	    {"2001:db8::/32", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", true},
	    {"2001:db8::/32", "2001:db9::1", false},
	    {"2001:db8::/32", "2001:db7:ffff::1", false},
	    {"2001:db8::/32", "192.0.2.1", false},
	    {"2001:db8:8000::/33", "2001:db8:8000::1", true},
	    {"2001:db8:8000::/33", "2001:db8:7fff::1", false},
	    {"2001:db8::1/128", "2001:db8::1", true},
	    {"2001:db8::1", "2001:db8::2", false},
	    {"2001:db8::1", "2001:db8::", false},
	    {"fe80::/10", "febf::1", true},
	    {"fe80::/10", "fec0::1", false},
	    /* an IPv6 entry of mapped addresses holds the IPv4 clients too */
	    {"::ffff:10.0.0.0/104", "10.9.9.9", true},
	    {"::ffff:10.0.0.0/104", "::ffff:10.9.9.9", true},
	    {"::ffff:10.0.0.0/104", "11.0.0.1", false},
	    {"::ffff:0:0/96", "203.0.113.5", true},
	    /* several: any one */
	    {"10.0.0.0/8 192.168.0.0/16 2001:db8::/32", "192.168.255.1", true},
	    {"10.0.0.0/8 192.168.0.0/16 2001:db8::/32", "2001:db8::25", true},
	    {"10.0.0.0/8 192.168.0.0/16 2001:db8::/32", "192.169.0.1", false},
	    /* none */
	    {"", "127.0.0.1", false},
	    {"", "::1", false},
	};

	for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
		struct ph_net nets[PH_NETWORKS_MAX];
		struct sockaddr_storage ss;
		char err[256] = "";
		int n = ph_networks_parse(cases[i].nets, nets, PH_NETWORKS_MAX, err, sizeof(err));

		expect_rc(cases[i].nets, 0, n < 0 ? -1 : 0, err);
		sockaddr_of(cases[i].addr, &ss);
		if (ph_networks_match(nets, (unsigned)n, &ss) != cases[i].want)
			fail_msg("ph_networks_match('%s', %s): want %s", cases[i].nets,
			         cases[i].addr, cases[i].want ? "a match" : "no match");
	}

	/* not an IP socket, no address, no networks: no match */
	{
		struct ph_net nets[2];
		struct sockaddr_storage ss;
		char err[256];

		assert_int_equal(ph_networks_parse("0.0.0.0/0 ::/0", nets, 2, err, sizeof(err)), 2);
		memset(&ss, 0, sizeof(ss));
		ss.ss_family = AF_UNIX;
		assert_false(ph_networks_match(nets, 2, &ss));
		assert_false(ph_networks_match(nets, 2, NULL));
		sockaddr_of("127.0.0.1", &ss);
		assert_true(ph_networks_match(nets, 2, &ss));
		assert_false(ph_networks_match(nets, 0, &ss));
	}
}

/* mynetworks: at most 64 networks, and as long as its field allows. */
static void test_ph_networks_limits(void **state)
{
	struct ph_config c, before, again;
	char v[4096], err[256], *out;

	ph_config_default(&c);
	v[0] = '\0';
	for (unsigned i = 0; i < PH_NETWORKS_MAX; i++)
		snprintf(v + strlen(v), sizeof(v) - strlen(v), "%s10.0.%u.0/24", i ? " " : "", i);
	assert_int_equal(ph_config_set(&c, "mynetworks", v, err, sizeof(err)), 0);
	assert_int_equal(ph_networks_parse(c.mynetworks, NULL, PH_NETWORKS_MAX, err, sizeof(err)),
	                 PH_NETWORKS_MAX);
	assert_int_equal(ph_config_check(&c, err, sizeof(err)), 0);
	out = ph_printed(&c);
	ph_config_default(&again);
	assert_int_equal(
	    ph_config_load_buffer(&again, "printed", out, strlen(out), err, sizeof(err)), 0);
	assert_true(ph_equal(&c, &again));
	free(out);

	memcpy(&before, &c, sizeof(c));
	strcat(v, ",10.0.64.0/24");
	assert_int_equal(ph_config_set(&c, "mynetworks", v, err, sizeof(err)), -1);
	assert_string_equal(err, "mynetworks: more than 64 networks");
	assert_memory_equal(&c, &before, sizeof(c));

	/* 23 x 43 octets + 22 commas = 1011 octets fit in 1023; 24 do not */
	v[0] = '\0';
	for (unsigned i = 0; i < 23; i++)
		strcat(v, i ? ",1111:2222:3333:4444:5555:6666:7777:8888/128"
		            : "1111:2222:3333:4444:5555:6666:7777:8888/128");
	assert_int_equal(ph_config_set(&c, "mynetworks", v, err, sizeof(err)), 0);
	assert_string_equal(c.mynetworks, v);
	assert_int_equal(ph_config_check(&c, err, sizeof(err)), 0);
	strcat(v, " [1111:2222:3333:4444:5555:6666:7777:8888]");
	assert_int_equal(ph_config_set(&c, "mynetworks", v, err, sizeof(err)), -1);
	assert_string_equal(err, "mynetworks: longer than 1023 octets");
}

/* ---- files ---- */

static char *write_file(const char *name, const char *content, size_t len)
{
	static char path[128];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
	f = fopen(path, "wb");
	assert_non_null(f);
	assert_int_equal(fwrite(content, 1, len, f), len);
	assert_int_equal(fclose(f), 0);
	return path;
}

struct load_case {
	const char *name;
	const char *content;
	const char *pre;  /* "key=value" set before loading, or NULL */
	const char *want; /* expected printed configuration lines (all present), or NULL */
	const char *err;  /* "%s" stands for the path; NULL: success */
};

static const struct load_case load_cases[] = {
    {"empty_file_keeps_defaults", "", NULL, "listen = 127.0.0.1:2525\nspool_dir = ./var/spool\n",
     NULL},
    {"listen_replaces_defaults", "listen = [::1]:25\nworkers = 2\nlisten = 0.0.0.0:2526\n", NULL,
     "# posthaste: the effective configuration\nlisten = [::1]:25\nlisten = 0.0.0.0:2526\n"
     "spool_dir",
     NULL},
    {"no_listen_keeps_default", "workers = 4\n", NULL, "listen = 127.0.0.1:2525\nspool_dir", NULL},
    {"applies_over_current_values", "hostname = mx.example.org\n", "workers=7",
     "workers = 7\nhostname = mx.example.org\n", NULL},
    {"last_one_wins", "workers = 2\nWorkers = 3\n", NULL, "workers = 3\n", NULL},
    {"every_key",
     "# a full configuration\n"
     "listen = 127.0.0.1:25\n"
     "listen = [::1]:25\n"
     "spool_dir = \"/var/spool/posthaste\"\n"
     "durability = batch\n"
     "batch_interval = 20ms\n"
     "workers = 4\n"
     "hostname = mx.example.org\n"
     "message_size_limit = 50M\n"
     "recipient_limit = 500\n"
     "command_timeout = 5m\n"
     "data_timeout = 10m\n"
     "spool_reserve = 1G\n"
     "spool_direct_io = no\n"
     "control_socket = /run/posthaste/control.sock\n"
     "discard = no\n"
     "log_level = warning\n"
     "max_queue_age = 5d\n"
     "smtp_auth = yes\n"
     "smtp_auth_required = on\n"
     "smtp_auth_without_tls = true\n"
     "auth_threads = 2\n"
     "smtp_sender_login_check = off\n"
     "tls_cert = /etc/posthaste/cert.pem\n"
     "tls_key = /etc/posthaste/key.pem\n"
     "submission_listen = 127.0.0.1:587\n"
     "submissions_listen = [::]:465\n"
     "client_connection_limit = 0\n"
     "client_connection_rate = 60/60s\n"
     "client_message_rate = 3/250ms\n"
     "client_limit_exempt_mynetworks = no\n"
     "resolver = 127.0.0.1:5353, [::1]:53\n"
     "smarthost = [192.0.2.25]:2526\n"
     "route.example.com = [127.0.0.1]:2526,[::1]:2526\n"
     "route.Example.NET = mx.example.net:2525\n"
     "local_domains = a.test, B.test\n"
     "mynetworks = 192.0.2.0/24 [2001:db8::]/32\n"
     "relay_domains = Backup.test\n"
     "users_file = /etc/posthaste/users\n"
     "mailbox_root = /var/mail\n"
     "accounting_log = -\n"
     "retry_min = 10ms\n"
     "retry_max = 2h\n"
     "delay_warning_time = 30m\n"
     "connect_timeout = 10s\n"
     "delivery_active_max = 500\n"
     "delivery_concurrency = 4\n"
     "delivery_rate = 100/s\n"
     "delivery_connection_rate = 10/5s\n"
     "delivery_messages_per_connection = 50\n"
     "delivery_idle_timeout = 2s\n"
     "delivery_tls = require\n"
     "delivery_tls_verify = name\n"
     "destination.example.org = concurrency=2 rate=3/250ms\n"
     "destination.b.example = idle_timeout=1m tls=may\n",
     NULL,
     "# posthaste: the effective configuration\n"
     "listen = 127.0.0.1:25\n"
     "listen = [::1]:25\n"
     "spool_dir = /var/spool/posthaste\n"
     "durability = batch\n"
     "batch_interval = 20ms\n"
     "workers = 4\n"
     "hostname = mx.example.org\n"
     "message_size_limit = 50M\n"
     "recipient_limit = 500\n"
     "command_timeout = 5m\n"
     "data_timeout = 10m\n"
     "spool_reserve = 1G\n"
     "spool_direct_io = no\n"
     "control_socket = /run/posthaste/control.sock\n"
     "discard = no\n"
     "delivery = yes\n"
     "log_level = warning\n"
     "max_queue_age = 5d\n"
     "smtp_auth = yes\n"
     "smtp_auth_required = yes\n"
     "smtp_auth_without_tls = yes\n"
     "auth_threads = 2\n"
     "smtp_sender_login_check = no\n"
     "tls_cert = /etc/posthaste/cert.pem\n"
     "tls_key = /etc/posthaste/key.pem\n"
     "submission_listen = 127.0.0.1:587\n"
     "submissions_listen = [::]:465\n"
     "client_connection_limit = 0 # no limit\n"
     "client_connection_rate = 60/m\n"
     "client_message_rate = 3/250ms\n"
     "client_limit_exempt_mynetworks = no\n"
     "resolver = 127.0.0.1:5353,[::1]:53\n"
     "smarthost = [192.0.2.25]:2526\n"
     "route.example.com = [127.0.0.1]:2526,[::1]:2526\n"
     "route.example.net = mx.example.net:2525\n"
     "local_domains = a.test,b.test\n"
     "mynetworks = 192.0.2.0/24,2001:db8::/32\n"
     "relay_domains = backup.test\n"
     "users_file = /etc/posthaste/users\n"
     "mailbox_root = /var/mail\n"
     "accounting_log = -\n"
     "retry_min = 10ms\n"
     "retry_max = 2h\n"
     "delay_warning_time = 30m\n"
     "connect_timeout = 10s\n"
     "delivery_active_max = 500\n"
     "delivery_concurrency = 4\n"
     "delivery_rate = 100/s\n"
     "delivery_connection_rate = 10/5s\n"
     "delivery_messages_per_connection = 50\n"
     "delivery_idle_timeout = 2s\n"
     "delivery_tls = require\n"
     "delivery_tls_verify = name\n"
     "destination.example.org = concurrency=2 rate=3/250ms connection_rate=10/5s "
     "messages_per_connection=50 idle_timeout=2s tls=require verify=name\n"
     "destination.b.example = concurrency=4 rate=100/s connection_rate=10/5s "
     "messages_per_connection=50 idle_timeout=1m tls=may verify=name\n",
     NULL},
    {"unknown_key", "workers = 2\nbogus = 1\n", NULL, NULL, "%s:2: unknown key 'bogus'"},
    {"bad_value_line_3", "\n# x\ndurability = maybe\n", NULL, NULL,
     "%s:3: durability: 'maybe' is not fsync, batch or none"},
    {"bad_submission_listen", "submission_listen = 1.2.3.4\n", NULL, NULL,
     "%s:1: submission_listen: invalid address '1.2.3.4' (expected HOST:PORT, [IPV6]:PORT or "
     ":PORT)"},
    {"bad_listen_after_good", "listen = 127.0.0.1:25\nlisten = nowhere\n", NULL, NULL,
     "%s:2: listen: invalid address 'nowhere' (expected HOST:PORT, [IPV6]:PORT or :PORT)"},
    {"syntax_error", "workers = 2\n\"workers\" = 3\n", NULL, NULL,
     "%s:2: invalid key '\"workers\"' (keys are letters, digits, '_', '.' and '-')"},
    {"route_replaces_same_domain",
     "route.a.test = x.test\nroute.b.test = y.test\nROUTE.A.TEST = z.test:26\n", NULL,
     "route.a.test = z.test:26\nroute.b.test = y.test\nlocal_domains", NULL},
    {"mynetworks_last_one_wins", "mynetworks = 10.0.0.0/8\nmynetworks = 192.0.2.0/24\n", NULL,
     "\nmynetworks = 192.0.2.0/24\nrelay_domains", NULL},
    {"mynetworks_host_bits", "\nmynetworks = 127.0.0.1/8, ::1\n", NULL, NULL,
     "%s:2: mynetworks: 127.0.0.1/8 has host bits set"},
    {"delivery_key_after_destination",
     "delivery_concurrency = 5\ndestination.a.test = rate=1/s\ndelivery_rate = 2/s\n", NULL, NULL,
     "%s:3: delivery_rate: must come before the destination.DOMAIN keys (each copies the "
     "delivery_* limits in force when it is read)"},
    {"destination_copies_defaults_read_before",
     "delivery_concurrency = 5\ndelivery_idle_timeout = 1s\ndestination.a.test = rate=1/s\n", NULL,
     "destination.a.test = concurrency=5 rate=1/s connection_rate=unlimited "
     "messages_per_connection=100 idle_timeout=1s tls=may verify=none\n",
     NULL},
    {"bad_route_line_2", "route.a.test = x.test\nroute.b.test = [x]\n", NULL, NULL,
     "%s:2: route.b.test: '[x]': 'x' is not an IPv4 or IPv6 address"},
    {"seventeen_listeners",
     "listen = :1\nlisten = :2\nlisten = :3\nlisten = :4\nlisten = :5\nlisten = :6\n"
     "listen = :7\nlisten = :8\nlisten = :9\nlisten = :10\nlisten = :11\nlisten = :12\n"
     "listen = :13\nlisten = :14\nlisten = :15\nlisten = :16\nlisten = :17\n",
     NULL, NULL, "%s:17: listen: more than 16 addresses"},
};

static void test_load_cases(void **state)
{
	for (size_t i = 0; i < ARRAY_SIZE(load_cases); i++) {
		const struct load_case *t = &load_cases[i];
		struct ph_config c, before;
		char err[512] = "", want_err[512];
		char *path = write_file(t->name, t->content, strlen(t->content));
		int rc;

		ph_config_default(&c);
		if (t->pre) {
			char key[64];
			const char *eq = strchr(t->pre, '=');
			snprintf(key, sizeof(key), "%.*s", (int)(eq - t->pre), t->pre);
			assert_int_equal(ph_config_set(&c, key, eq + 1, err, sizeof(err)), 0);
		}
		before = c;
		rc = ph_config_load_file(&c, path, err, sizeof(err));
		expect_rc(t->name, t->err ? -1 : 0, rc, err);
		if (t->err) {
			snprintf(want_err, sizeof(want_err), t->err, path);
			expect_str(t->name, "error", want_err, err);
			if (memcmp(&c, &before, sizeof(c)) != 0)
				fail_msg("%s: the configuration changed on error", t->name);
		} else {
			char *out = ph_printed(&c);
			if (!strstr(out, t->want))
				fail_msg("%s: want [%s] in:\n%s", t->name, t->want, out);
			assert_int_equal(ph_config_check(&c, err, sizeof(err)), 0);
			free(out);
		}
		unlink(path);
	}
}

static void test_load_file_errors(void **state)
{
	struct ph_config c;
	char err[512], want[512], *big, *path;
	struct capture cap = {.len = 0};

	ph_config_default(&c);

	snprintf(want, sizeof(want), "%s/missing.conf", tmpdir);
	assert_int_equal(ph_config_load_file(&c, want, err, sizeof(err)), -1);
	snprintf(want, sizeof(want), "cannot read %s/missing.conf: No such file or directory",
	         tmpdir);
	assert_string_equal(err, want);

	assert_int_equal(ph_config_load_file(&c, tmpdir, err, sizeof(err)), -1);
	snprintf(want, sizeof(want), "cannot read %s: Is a directory", tmpdir);
	assert_string_equal(err, want);

	/* exactly 1 MiB of comment lines is read; one octet more is refused */
	big = malloc(CONFIG_FILE_MAX + 1);
	assert_non_null(big);
	memset(big, '#', CONFIG_FILE_MAX + 1);
	for (size_t i = 1000; i < CONFIG_FILE_MAX + 1; i += 1000)
		big[i] = '\n';
	memcpy(big + CONFIG_FILE_MAX - 10, "\nk = v #\n", 9);
	path = write_file("big.conf", big, CONFIG_FILE_MAX);
	assert_int_equal(config_parse_file(path, capture_entry, &cap, err, sizeof(err)), 0);
	cap.out[cap.len] = '\0';
	assert_string_equal(cap.out, "1050:k=v\n");
	unlink(path);
	path = write_file("big.conf", big, CONFIG_FILE_MAX + 1);
	assert_int_equal(config_parse_file(path, capture_entry, &cap, err, sizeof(err)), -1);
	snprintf(want, sizeof(want), "cannot read %s: File too large", path);
	assert_string_equal(err, want);
	unlink(path);
	free(big);
}

/* ---- print -> load round trips ---- */

static void test_round_trip(void **state)
{
	static const char *const configs[] = {
	    "",
	    "listen = [::]:25\nlisten = 0.0.0.0:25\nlisten = 127.0.0.1:0\nlisten = 127.0.0.1:0\n"
	    "spool_dir = \" /tmp/a \\\"b\\\" #c \\\\d \"\ndurability = none\n"
	    "batch_interval = 1500ms\nworkers = 256\nhostname = [IPv6:2001:db8::1]\n"
	    "message_size_limit = 1025\nrecipient_limit = 1000000\ncommand_timeout = 90s\n"
	    "data_timeout = 86400000ms\nspool_reserve = 18446744073709551615\n"
	    "control_socket = \"/run/x #1.sock\"\ndiscard = on\nlog_level = debug\n"
	    "max_queue_age = 365d\n",
	    "durability = batch\nbatch_interval = 60s\nspool_reserve = 0\nhostname = a\n"
	    "spool_dir = \"#x\"\n",
	    "listen = :1\nlisten = :2\nlisten = :3\nlisten = :4\nlisten = :5\nlisten = :6\n"
	    "listen = :7\nlisten = :8\nlisten = :9\nlisten = :10\nlisten = :11\nlisten = :12\n"
	    "listen = :13\nlisten = :14\nlisten = [::1]:15\nlisten = [1:2:3:4:5:6:7:8]:65535\n",
	    /* delivery: every key, lists written loosely, rates in every form */
	    "resolver = \" 127.0.0.1:5353 ,[::1]:53\"\nsmarthost = a.test , [192.0.2.1]:587\n"
	    "route.Example.com = [127.0.0.1]:2526,[::1]:2526\nroute.x.test = mx.x.test\n"
	    "route.y.test = 192.0.2.7:26\nroute.example.COM = [::1]\n"
	    "local_domains = \"L1.test  l2.test,,l1.test\"\nusers_file = \"/etc/ph users #1\"\n"
	    "mailbox_root = \" /m \"\naccounting_log = none\nretry_min = 10ms\nretry_max = 10ms\n"
	    "connect_timeout = 1500ms\ndelivery_active_max = 1000000\n"
	    "delivery_concurrency = 10000\ndelivery_rate = 4294967295/365d\n"
	    "delivery_connection_rate = 3/1000ms\ndelivery_messages_per_connection = 1\n"
	    "delivery_idle_timeout = 1ms\ndelivery_tls = none\ndelivery_tls_verify = name\n"
	    "destination.d1.test = rate=1/ms connection_rate=0/s tls=require\n"
	    "destination.d2.test = concurrency=1 rate=7/60s connection_rate=unlimited "
	    "messages_per_connection=1000000 idle_timeout=1d\n"
	    "destination.D1.test = idle_timeout=90s TLS=May Verify=None\ndestination.d3.test =\n",
	    "delivery_rate = 0\ndelivery_connection_rate = 10/5s\ndestination.a = rate=5000/h\n",
	    /* relay access */
	    "mynetworks = \"  [::1]  10.0.0.0/8,,::ffff:192.0.2.0/120 0.0.0.0/0 [2001:DB8::]\"\n"
	    "relay_domains = R1.test r2.test,R1.TEST\n",
	    "mynetworks =\nrelay_domains = \"\"\n",
	    "mynetworks = ::/0\n",
	};

	for (size_t i = 0; i < ARRAY_SIZE(configs); i++) {
		struct ph_config c, again;
		char err[512] = "", name[32], *out, *out2, *path;

		snprintf(name, sizeof(name), "round_trip_%zu", i);
		ph_config_default(&c);
		expect_rc(name, 0,
		          ph_config_load_buffer(&c, name, configs[i], strlen(configs[i]), err,
		                                sizeof(err)),
		          err);
		expect_rc(name, 0, ph_config_check(&c, err, sizeof(err)), err);
		out = ph_printed(&c);
		path = write_file(name, out, strlen(out));
		ph_config_default(&again);
		expect_rc(name, 0, ph_config_load_file(&again, path, err, sizeof(err)), err);
		if (!ph_equal(&c, &again))
			fail_msg("%s: loads back different:\n%s", name, out);
		out2 = ph_printed(&again);
		expect_str(name, "printed twice", out, out2);
		unlink(path);
		free(out);
		free(out2);
	}
}

/* ---- ph_config_check ---- */

static void tweak_no_listen(struct ph_config *c)
{
	c->nlisten = 0;
}

static void tweak_bad_listen_host(struct ph_config *c)
{
	snprintf(c->listen[0].host, sizeof(c->listen[0].host), "localhost");
}

static void tweak_workers(struct ph_config *c)
{
	c->workers = 1000;
}

static void tweak_durability(struct ph_config *c)
{
	c->durability = (enum ph_durability)7;
}

static void tweak_log_level(struct ph_config *c)
{
	c->log_level = (enum log_level)9;
}

static void tweak_batch_zero(struct ph_config *c)
{
	c->batch_interval_ms = 0;
}

static void tweak_timeout(struct ph_config *c)
{
	c->data_timeout_ms = 5000000000ull;
}

static void tweak_hostname(struct ph_config *c)
{
	snprintf(c->hostname, sizeof(c->hostname), "a b");
}

static void tweak_spool_empty(struct ph_config *c)
{
	c->spool_dir[0] = '\0';
}

static void tweak_too_many_listen(struct ph_config *c)
{
	c->nlisten = PH_LISTEN_MAX + 1;
}

/* 94 octets: with "/control.sock" exactly the 107 a socket path holds */
#define DIR94                                                                                      \
	"/012345678901234567890123456789012345678901234567890123456789012345678901234567890123456" \
	"789012"

static void tweak_bad_rate(struct ph_config *c)
{
	c->limits.msg_rate.count = 0;
	c->limits.msg_rate.per_ms = 5;
}

static void tweak_rate_period(struct ph_config *c)
{
	c->limits.conn_rate.count = 1;
	c->limits.conn_rate.per_ms = 0;
}

static void tweak_dest_concurrency(struct ph_config *c)
{
	c->dests[1].lim.concurrency = 0;
}

static void tweak_route_hosts(struct ph_config *c)
{
	snprintf(c->routes[0].hosts, sizeof(c->routes[0].hosts), "a b");
}

static void tweak_route_hosts_spaced(struct ph_config *c)
{
	snprintf(c->routes[0].hosts, sizeof(c->routes[0].hosts), "a, b");
}

static void tweak_route_upper(struct ph_config *c)
{
	c->routes[1].domain[0] = 'B';
}

static void tweak_route_twice(struct ph_config *c)
{
	memcpy(c->routes[1].domain, c->routes[0].domain, sizeof(c->routes[0].domain));
}

static void tweak_dest_twice(struct ph_config *c)
{
	memcpy(c->dests[1].domain, c->dests[0].domain, sizeof(c->dests[0].domain));
}

static void tweak_route_domain(struct ph_config *c)
{
	memset(c->routes[0].domain, 'a', sizeof(c->routes[0].domain));
}

static void tweak_too_many_routes(struct ph_config *c)
{
	c->nroutes = PH_ROUTE_MAX + 1;
}

static void tweak_too_many_dests(struct ph_config *c)
{
	c->ndests = PH_DEST_MAX + 1;
}

static void tweak_local_upper(struct ph_config *c)
{
	snprintf(c->local_domains, sizeof(c->local_domains), "A.test");
}

static void tweak_resolver_spaced(struct ph_config *c)
{
	snprintf(c->resolver, sizeof(c->resolver), "127.0.0.1:53 ");
}

static void tweak_smarthost_bad(struct ph_config *c)
{
	snprintf(c->smarthost, sizeof(c->smarthost), "a:99999");
}

static void tweak_mynetworks_spaced(struct ph_config *c)
{
	snprintf(c->mynetworks, sizeof(c->mynetworks), "127.0.0.1/32 ");
}

static void tweak_mynetworks_bare(struct ph_config *c)
{
	snprintf(c->mynetworks, sizeof(c->mynetworks), "127.0.0.1");
}

static void tweak_mynetworks_host_bits(struct ph_config *c)
{
	snprintf(c->mynetworks, sizeof(c->mynetworks), "10.0.0.1/8");
}

static void tweak_mynetworks_unterminated(struct ph_config *c)
{
	memset(c->mynetworks, '1', sizeof(c->mynetworks));
}

static void tweak_relay_upper(struct ph_config *c)
{
	snprintf(c->relay_domains, sizeof(c->relay_domains), "B.test");
}

static const struct {
	const char *name;
	const char *file;
	void (*tweak)(struct ph_config *c);
	const char *err; /* NULL: passes */
} check_cases[] = {
    {"defaults", "", NULL, NULL},
    {"no_listen", "", tweak_no_listen, "listen: no address to listen on"},
    {"too_many_listen", "", tweak_too_many_listen, "listen: more than 16 addresses"},
    {"bad_listen_host", "", tweak_bad_listen_host,
     "listen: 'localhost' is not an IPv4 or IPv6 address"},
    {"duplicate_listen", "listen = 127.0.0.1:2525\nlisten = [::1]:25\nlisten = 127.0.0.1:2525\n",
     NULL, "listen: 127.0.0.1:2525 is given twice"},
    {"duplicate_ipv6_spelled_differently", "listen = [::1]:25\nlisten = [0:0::0:1]:25\n", NULL,
     "listen: [0:0::0:1]:25 is given twice"},
    {"same_address_other_port", "listen = [::1]:25\nlisten = [::1]:26\n", NULL, NULL},
    {"same_port_other_family", "listen = [::]:25\nlisten = 0.0.0.0:25\n", NULL, NULL},
    {"port_zero_twice_is_fine", "listen = 127.0.0.1:0\nlisten = 127.0.0.1:0\n", NULL, NULL},
    {"tls_cert_without_key", "tls_cert = /c.pem\n", NULL, "tls_cert: needs tls_key too"},
    {"tls_key_without_cert", "tls_key = /k.pem\n", NULL, "tls_key: needs tls_cert too"},
    {"submission_without_tls", "users_file = /u\nsubmission_listen = 127.0.0.1:587\n", NULL,
     "submission_listen: needs tls_cert and tls_key"},
    {"submissions_without_users",
     "tls_cert = /c.pem\ntls_key = /k.pem\nsubmissions_listen = 127.0.0.1:465\n", NULL,
     "submissions_listen: needs users_file (the logins)"},
    {"submission_same_as_listen",
     "listen = 127.0.0.1:587\ntls_cert = /c.pem\ntls_key = /k.pem\nusers_file = /u\n"
     "submission_listen = 127.0.0.1:587\n",
     NULL, "submission_listen: 127.0.0.1:587 is given twice"},
    {"submission_roles",
     "tls_cert = /c.pem\ntls_key = /c.pem\nusers_file = /u\n"
     "submission_listen = 127.0.0.1:587\nsubmissions_listen = 127.0.0.1:465\n",
     NULL, NULL},
    {"control_socket_default_fits", "spool_dir = " DIR94 "\n", NULL, NULL},
    {"control_socket_default_one_too_long", "spool_dir = " DIR94 "5\n", NULL,
     "control_socket: the default, spool_dir + \"/control.sock\", would be 108 octets, more "
     "than a socket path holds (107): set control_socket or a shorter spool_dir"},
    {"control_socket_default_too_long", "spool_dir = " DIR94 "56\n", NULL,
     "control_socket: the default, spool_dir + \"/control.sock\", would be 109 octets, more "
     "than a socket path holds (107): set control_socket or a shorter spool_dir"},
    {"long_spool_dir_with_control_socket", "spool_dir = " DIR94 "56\ncontrol_socket = /run/x\n",
     NULL, NULL},
    {"workers_out_of_range", "", tweak_workers, "workers: 1000 is out of range (0 to 256)"},
    {"durability_invalid", "", tweak_durability, "durability: invalid value 7"},
    {"log_level_invalid", "", tweak_log_level, "log_level: invalid value 9"},
    {"batch_interval_zero", "durability = batch\n", tweak_batch_zero,
     "batch_interval: 0s is out of range (1ms to 1m)"},
    {"data_timeout_too_long", "", tweak_timeout,
     "data_timeout: 5000000s is out of range (1ms to 1d)"},
    {"hostname_invalid", "", tweak_hostname,
     "hostname: 'a b' is not a host name (letters, digits, '-', '.', '_', or an address "
     "literal in brackets)"},
    {"spool_dir_empty", "", tweak_spool_empty, "spool_dir: must not be empty"},
    /* delivery */
    {"delivery_every_key",
     "resolver = 127.0.0.1:53\nsmarthost = [::1]:25\nroute.r.test = r\nlocal_domains = l.test\n"
     "users_file = /u\nretry_min = 1h\nretry_max = 1h\ndelivery_rate = 1/s\n"
     "destination.d.test = rate=2/s\n",
     NULL, NULL},
    {"retry_max_below_retry_min", "retry_min = 2h\n", NULL,
     "retry_max: 1h is less than retry_min (2h)"},
    {"retry_max_below_retry_min_ms", "retry_min = 11ms\nretry_max = 10ms\n", NULL,
     "retry_max: 10ms is less than retry_min (11ms)"},
    {"users_file_required", "local_domains = a.test\n", NULL,
     "users_file: required when local_domains is set"},
    {"local_and_routed", "local_domains = a.test, b.test\nusers_file = /u\nroute.B.test = x\n",
     NULL,
     "route.b.test: b.test is in local_domains too (a domain is delivered either locally or by "
     "a route)"},
    {"local_and_destination_is_fine",
     "local_domains = a.test\nusers_file = /u\ndestination.a.test = concurrency=1\n", NULL, NULL},
    {"rate_count_0_with_period", "", tweak_bad_rate,
     "delivery_rate: invalid rate (count 0 with a period)"},
    {"rate_period_0", "", tweak_rate_period,
     "delivery_connection_rate: 0s is out of range (1ms to 365d)"},
    {"destination_limit_out_of_range", "destination.a.test =\ndestination.b.test =\n",
     tweak_dest_concurrency, "destination.b.test: concurrency: 0 is out of range (1 to 10000)"},
    {"destination_twice", "destination.a.test =\ndestination.b.test =\n", tweak_dest_twice,
     "destination.a.test: given twice"},
    {"too_many_destinations", "", tweak_too_many_dests, "destination: more than 64 destinations"},
    {"route_hosts_invalid", "route.a.test = x\n", tweak_route_hosts,
     "route.a.test: 'a b': 'a b' is not a host name " DOMAIN_HINT " or an IP address"},
    {"route_hosts_not_normal", "route.a.test = x\n", tweak_route_hosts_spaced,
     "route.a.test: not in its normal form ('a,b')"},
    {"route_domain_upper_case", "route.a.test = x\nroute.b.test = y\n", tweak_route_upper,
     "route.B.test: the domain is not in lower case"},
    {"route_twice", "route.a.test = x\nroute.b.test = y\n", tweak_route_twice,
     "route.a.test: given twice"},
    {"route_domain_unterminated", "route.a.test = x\n", tweak_route_domain,
     "route: entry 1: not a domain name"},
    {"too_many_routes", "", tweak_too_many_routes, "route: more than 64 routes"},
    {"local_domains_not_normal", "users_file = /u\n", tweak_local_upper,
     "local_domains: not in its normal form ('a.test')"},
    /* relay access */
    {"relay_every_key",
     "local_domains = a.test\nusers_file = /u\nrelay_domains = b.test\nroute.b.test = "
     "[192.0.2.1]\nmynetworks = 192.0.2.0/24\n",
     NULL, NULL},
    {"mynetworks_empty", "mynetworks = \"\"\n", NULL, NULL},
    {"relay_domains_without_local_domains", "relay_domains = b.test\n", NULL, NULL},
    {"relay_and_local", "local_domains = a.test\nusers_file = /u\nrelay_domains = b.test, A.test\n",
     NULL,
     "relay_domains: a.test is in local_domains too (a domain is either delivered locally or "
     "relayed)"},
    {"mynetworks_not_normal", "", tweak_mynetworks_spaced,
     "mynetworks: not in its normal form ('127.0.0.1/32')"},
    {"mynetworks_no_prefix", "", tweak_mynetworks_bare,
     "mynetworks: not in its normal form ('127.0.0.1/32')"},
    {"mynetworks_host_bits", "", tweak_mynetworks_host_bits,
     "mynetworks: 10.0.0.1/8 has host bits set"},
    {"mynetworks_unterminated", "", tweak_mynetworks_unterminated,
     "mynetworks: not NUL-terminated"},
    {"relay_domains_not_normal", "", tweak_relay_upper,
     "relay_domains: not in its normal form ('b.test')"},
    {"resolver_not_normal", "", tweak_resolver_spaced,
     "resolver: not in its normal form ('127.0.0.1:53')"},
    {"smarthost_invalid", "", tweak_smarthost_bad,
     "smarthost: 'a:99999': invalid port (1 to 65535)"},
};

static void test_check(void **state)
{
	for (size_t i = 0; i < ARRAY_SIZE(check_cases); i++) {
		struct ph_config c;
		char err[512] = "";
		int rc;

		ph_config_default(&c);
		rc = ph_config_load_buffer(&c, "t.conf", check_cases[i].file,
		                           strlen(check_cases[i].file), err, sizeof(err));
		expect_rc(check_cases[i].name, 0, rc, err);
		if (check_cases[i].tweak)
			check_cases[i].tweak(&c);
		rc = ph_config_check(&c, err, sizeof(err));
		expect_rc(check_cases[i].name, check_cases[i].err ? -1 : 0, rc, err);
		if (check_cases[i].err)
			expect_str(check_cases[i].name, "error", check_cases[i].err, err);
	}
}

/* ---- set-up ---- */

static int tmpdir_setup(void **state)
{
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/test_config.XXXXXX");
	return mkdtemp(tmpdir) ? 0 : -1;
}

static int tmpdir_teardown(void **state)
{
	DIR *d = opendir(tmpdir);
	struct dirent *e;
	char path[512];

	if (d) {
		while ((e = readdir(d))) {
			if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
				continue;
			snprintf(path, sizeof(path), "%s/%s", tmpdir, e->d_name);
			unlink(path);
		}
		closedir(d);
	}
	return rmdir(tmpdir);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_parse_cases),
	    cmocka_unit_test(test_parse_line_length),
	    cmocka_unit_test(test_parse_err_truncation),
	    cmocka_unit_test(test_size),
	    cmocka_unit_test(test_duration),
	    cmocka_unit_test(test_bool),
	    cmocka_unit_test(test_uint),
	    cmocka_unit_test(test_hostport),
	    cmocka_unit_test(test_format),
	    cmocka_unit_test(test_ph_defaults),
	    cmocka_unit_test(test_ph_set),
	    cmocka_unit_test(test_ph_listen_limit),
	    cmocka_unit_test(test_ph_long_spool_dir),
	    cmocka_unit_test(test_ph_hosts_parse),
	    cmocka_unit_test(test_ph_hosts_max),
	    cmocka_unit_test(test_ph_long_lists),
	    cmocka_unit_test(test_ph_route_dest_limits),
	    cmocka_unit_test(test_ph_helpers),
	    cmocka_unit_test(test_ph_networks_parse),
	    cmocka_unit_test(test_ph_networks_match),
	    cmocka_unit_test(test_ph_networks_limits),
	    cmocka_unit_test(test_load_cases),
	    cmocka_unit_test(test_load_file_errors),
	    cmocka_unit_test(test_round_trip),
	    cmocka_unit_test(test_check),
	};

	return cmocka_run_group_tests(tests, tmpdir_setup, tmpdir_teardown);
}
