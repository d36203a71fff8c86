/* Unit tests of mta/smtp/sasl: strict base64, SASL PLAIN and LOGIN exchanges. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "core/compiler.h"
#include "mta/smtp/sasl.h"

/* ---- base64 ---- */

struct b64_case {
	const char *name;
	const char *in;
	const char *out; /* NULL: must fail */
	size_t out_len;
};

static const struct b64_case b64_cases[] = {
    {"empty", "", "", 0},
    {"rfc4648_f", "Zg==", "f", 1},
    {"rfc4648_fo", "Zm8=", "fo", 2},
    {"rfc4648_foo", "Zm9v", "foo", 3},
    {"rfc4648_foob", "Zm9vYg==", "foob", 4},
    {"rfc4648_fooba", "Zm9vYmE=", "fooba", 5},
    {"rfc4648_foobar", "Zm9vYmFy", "foobar", 6},
    {"plain_nuls", "AGFsaWNlAHNlY3JldA==", "\0alice\0secret", 13},
    {"all_alphabet", "+/+/", "\xfb\xff\xbf", 3},
    {"missing_padding", "Zg", NULL, 0},
    {"missing_one_pad", "Zm8", NULL, 0},
    {"bad_length", "Zm9vY", NULL, 0},
    {"space_inside", "Zm9v Zg==", NULL, 0},
    {"trailing_space", "Zm9v ", NULL, 0},
    {"crlf", "Zm9v\r\n", NULL, 0},
    {"urlsafe_alphabet", "-_-_", NULL, 0},
    {"pad_in_middle", "Zg==Zm9v", NULL, 0},
    {"pad_first", "=Zm9", NULL, 0},
    {"three_pads", "Z===", NULL, 0},
    {"only_pads", "====", NULL, 0},
    {"nonzero_pad_bits_1", "Zh==", NULL, 0},
    {"nonzero_pad_bits_2", "Zm9=", NULL, 0},
    {"nul_octet", "Zm\0v", NULL, 0},
    {"high_octet", "Zm\xc3\xa9", NULL, 0},
};

static void test_base64_decode(void **state)
{
	(void)state;
	for (size_t i = 0; i < ARRAY_SIZE(b64_cases); i++) {
		const struct b64_case *c = &b64_cases[i];
		unsigned char out[64];
		size_t in_len = strcmp(c->name, "nul_octet") == 0 ? 4 : strlen(c->in);
		long n = sasl_base64_decode(c->in, in_len, out, sizeof(out));
		if (!c->out) {
			if (n != -1)
				fail_msg("%s: decoded %ld octets, want a failure", c->name, n);
			continue;
		}
		if (n != (long)c->out_len || memcmp(out, c->out, c->out_len) != 0)
			fail_msg("%s: got %ld octets, want %zu", c->name, n, c->out_len);
	}
}

static void test_base64_bounds(void **state)
{
	(void)state;
	unsigned char out[3];
	assert_int_equal(sasl_base64_decode("Zm9v", 4, out, 3), 3);
	assert_int_equal(sasl_base64_decode("Zm9v", 4, out, 2), -1);
	assert_int_equal(sasl_base64_decode("Zm9vYg==", 8, out, 3), -1);
	char enc[16];
	assert_int_equal(sasl_base64_encode((const unsigned char *)"foob", 4, enc, sizeof(enc)), 8);
	assert_string_equal(enc, "Zm9vYg==");
	assert_int_equal(sasl_base64_encode((const unsigned char *)"foob", 4, enc, 8), -1);
	assert_int_equal(sasl_base64_encode((const unsigned char *)"", 0, enc, 1), 0);
	assert_string_equal(enc, "");
}

static void test_base64_round_trip(void **state)
{
	(void)state;
	unsigned char in[300], back[300];
	char enc[420];
	for (size_t len = 0; len < sizeof(in); len++) {
		for (size_t i = 0; i < len; i++)
			in[i] = (unsigned char)(i * 37 + len);
		long e = sasl_base64_encode(in, len, enc, sizeof(enc));
		assert_true(e >= 0);
		long d = sasl_base64_decode(enc, (size_t)e, back, sizeof(back));
		assert_int_equal(d, (long)len);
		assert_memory_equal(in, back, len);
	}
}

/* ---- exchanges ---- */

enum { END_CREDS, END_ERROR };

struct sasl_case {
	const char *name;
	const char *command; /* the AUTH argument: "MECH [IR]" */
	const char *lines[4]; /* client answers to 334s, in order (NULL ends) */
	const char *challenges[4]; /* the 334 texts expected, in order */
	int end;
	enum sasl_error error;
	const char *authzid, *authcid, *passwd;
};

/* base64 of "\0alice@example.org\0secret" and friends */
#define PLAIN_ALICE     "AGFsaWNlQGV4YW1wbGUub3JnAHNlY3JldA=="
#define PLAIN_AUTHZID   "YWxpY2VAZXhhbXBsZS5vcmcAYWxpY2VAZXhhbXBsZS5vcmcAc2VjcmV0" /* same z/c */
#define PLAIN_AUTHZ_UC  "QUxJQ0VAZXhhbXBsZS5vcmcAYWxpY2VAZXhhbXBsZS5vcmcAc2VjcmV0" /* ALICE@... */
#define PLAIN_OTHERZID  "Ym9iQGV4YW1wbGUub3JnAGFsaWNlQGV4YW1wbGUub3JnAHNlY3JldA==" /* bob */
#define PLAIN_ONE_NUL   "AGFsaWNlQGV4YW1wbGUub3Jn"                                 /* \0alice */
#define PLAIN_NO_PASS   "AGFsaWNlQGV4YW1wbGUub3JnAA=="                             /* \0alice\0 */
#define PLAIN_NO_USER   "AABzZWNyZXQ="                                             /* \0\0secret */
#define PLAIN_THREE_NUL "AGFsaWNlAHNlYwByZXQ="                                     /* \0alice\0sec\0ret */
#define B64_ALICE       "YWxpY2VAZXhhbXBsZS5vcmc="                                 /* alice@example.org */
#define B64_SECRET      "c2VjcmV0"                                                 /* secret */
#define B64_NUL_USER    "YWwAaWNl"                                                 /* al\0ice */

static const struct sasl_case sasl_cases[] = {
    {"plain_ir", "PLAIN " PLAIN_ALICE, {NULL}, {NULL}, END_CREDS, 0, "", "alice@example.org",
     "secret"},
    {"plain_lower_case_mech", "plain " PLAIN_ALICE, {NULL}, {NULL}, END_CREDS, 0, "",
     "alice@example.org", "secret"},
    {"plain_no_ir", "PLAIN", {PLAIN_ALICE}, {""}, END_CREDS, 0, "", "alice@example.org",
     "secret"},
    {"plain_authzid_same", "PLAIN " PLAIN_AUTHZID, {NULL}, {NULL}, END_CREDS, 0,
     "alice@example.org", "alice@example.org", "secret"},
    {"plain_authzid_case", "PLAIN " PLAIN_AUTHZ_UC, {NULL}, {NULL}, END_CREDS, 0,
     "ALICE@example.org", "alice@example.org", "secret"},
    {"plain_authzid_other", "PLAIN " PLAIN_OTHERZID, {NULL}, {NULL}, END_ERROR, SASL_E_AUTHZID, NULL, NULL, NULL},
    {"plain_password_with_nul", "PLAIN " PLAIN_THREE_NUL, {NULL}, {NULL}, END_ERROR,
     SASL_E_SYNTAX, NULL, NULL, NULL},
    {"plain_one_nul", "PLAIN " PLAIN_ONE_NUL, {NULL}, {NULL}, END_ERROR, SASL_E_SYNTAX, NULL, NULL, NULL},
    {"plain_empty_password", "PLAIN " PLAIN_NO_PASS, {NULL}, {NULL}, END_ERROR, SASL_E_SYNTAX, NULL, NULL, NULL},
    {"plain_empty_authcid", "PLAIN " PLAIN_NO_USER, {NULL}, {NULL}, END_ERROR, SASL_E_SYNTAX, NULL, NULL, NULL},
    {"plain_empty_ir", "PLAIN =", {NULL}, {NULL}, END_ERROR, SASL_E_SYNTAX, NULL, NULL, NULL},
    {"plain_cancel_ir", "PLAIN *", {NULL}, {NULL}, END_ERROR, SASL_E_CANCEL, NULL, NULL, NULL},
    {"plain_cancel", "PLAIN", {"*"}, {""}, END_ERROR, SASL_E_CANCEL, NULL, NULL, NULL},
    {"plain_bad_base64", "PLAIN", {"not base64!"}, {""}, END_ERROR, SASL_E_BASE64, NULL, NULL, NULL},
    {"plain_ir_with_space", "PLAIN " PLAIN_ALICE " x", {NULL}, {NULL}, END_ERROR,
     SASL_E_BASE64, NULL, NULL, NULL},
    {"plain_empty_line", "PLAIN", {""}, {""}, END_ERROR, SASL_E_SYNTAX, NULL, NULL, NULL},
    {"login", "LOGIN", {B64_ALICE, B64_SECRET}, {"VXNlcm5hbWU6", "UGFzc3dvcmQ6"}, END_CREDS, 0,
     "", "alice@example.org", "secret"},
    {"login_ir", "LOGIN " B64_ALICE, {B64_SECRET}, {"UGFzc3dvcmQ6"}, END_CREDS, 0, "",
     "alice@example.org", "secret"},
    {"login_cancel_user", "LOGIN", {"*"}, {"VXNlcm5hbWU6"}, END_ERROR, SASL_E_CANCEL, NULL, NULL, NULL},
    {"login_cancel_password", "LOGIN", {B64_ALICE, "*"}, {"VXNlcm5hbWU6", "UGFzc3dvcmQ6"},
     END_ERROR, SASL_E_CANCEL, NULL, NULL, NULL},
    {"login_nul_in_user", "LOGIN", {B64_NUL_USER}, {"VXNlcm5hbWU6"}, END_ERROR, SASL_E_SYNTAX, NULL, NULL, NULL},
    {"login_empty_user", "LOGIN", {""}, {"VXNlcm5hbWU6"}, END_ERROR, SASL_E_SYNTAX, NULL, NULL, NULL},
    {"login_empty_password", "LOGIN", {B64_ALICE, ""}, {"VXNlcm5hbWU6", "UGFzc3dvcmQ6"},
     END_ERROR, SASL_E_SYNTAX, NULL, NULL, NULL},
    {"unknown_mech", "CRAM-MD5", {NULL}, {NULL}, END_ERROR, SASL_E_MECH, NULL, NULL, NULL},
    {"mech_prefix", "PLAINX", {NULL}, {NULL}, END_ERROR, SASL_E_MECH, NULL, NULL, NULL},
    {"empty_mech", "", {NULL}, {NULL}, END_ERROR, SASL_E_MECH, NULL, NULL, NULL},
};

static void run_case(const struct sasl_case *c)
{
	struct sasl x;
	const char *sp = strchr(c->command, ' ');
	size_t mlen = sp ? (size_t)(sp - c->command) : strlen(c->command);
	int r = sasl_start(&x, c->command, mlen, sp != NULL, sp ? sp + 1 : NULL,
			   sp ? strlen(sp + 1) : 0);
	for (unsigned i = 0; r == 0; i++) {
		if (i >= 4 || !c->lines[i])
			fail_msg("%s: a 334 (%s) after the last line", c->name, x.challenge);
		if (!c->challenges[i] || strcmp(x.challenge, c->challenges[i]) != 0)
			fail_msg("%s: challenge %u is '%s', want '%s'", c->name, i, x.challenge,
				 c->challenges[i] ? c->challenges[i] : "(none)");
		r = sasl_step(&x, c->lines[i], strlen(c->lines[i]));
	}
	if (c->end == END_ERROR) {
		if (r != -1 || x.error != c->error)
			fail_msg("%s: r %d error %d, want -1 error %d", c->name, r, x.error, c->error);
		/* nothing secret is left after a failure */
		if (x.passwd_len || x.passwd[0] || x.authcid[0])
			fail_msg("%s: fields left after the failure", c->name);
		return;
	}
	if (r != 1)
		fail_msg("%s: r %d (error %d), want 1", c->name, r, x.error);
	if (strcmp(x.authzid, c->authzid) || strcmp(x.authcid, c->authcid) ||
	    strcmp(x.passwd, c->passwd) || x.authcid_len != strlen(c->authcid) ||
	    x.passwd_len != strlen(c->passwd) || x.authzid_len != strlen(c->authzid))
		fail_msg("%s: got '%s' '%s' '%s'", c->name, x.authzid, x.authcid, x.passwd);
	sasl_wipe(&x);
	static const struct sasl zero;
	if (memcmp(&x, &zero, sizeof(x)) != 0)
		fail_msg("%s: sasl_wipe left octets", c->name);
}

static void test_exchanges(void **state)
{
	(void)state;
	for (size_t i = 0; i < ARRAY_SIZE(sasl_cases); i++)
		run_case(&sasl_cases[i]);
}

/* Bounds: fields of exactly 255 octets pass, 256 fail; over-long base64 fails. */
static void test_field_bounds(void **state)
{
	(void)state;
	unsigned char msg[SASL_MSG_MAX + 8];
	char b64[SASL_B64_MAX + 16];
	struct sasl x;
	for (size_t extra = 0; extra <= 1; extra++) {
		size_t u = SASL_FIELD_MAX + extra, p = SASL_FIELD_MAX;
		size_t n = 0;
		msg[n++] = '\0';
		memset(msg + n, 'u', u);
		n += u;
		msg[n++] = '\0';
		memset(msg + n, 'p', p);
		n += p;
		long e = sasl_base64_encode(msg, n, b64, sizeof(b64));
		assert_true(e > 0);
		int r = sasl_start(&x, "PLAIN", 5, true, b64, (size_t)e);
		if (extra == 0) {
			assert_int_equal(r, 1);
			assert_int_equal(x.authcid_len, SASL_FIELD_MAX);
			assert_int_equal(x.passwd_len, SASL_FIELD_MAX);
		} else {
			assert_int_equal(r, -1);
			assert_int_equal(x.error, SASL_E_SYNTAX);
		}
	}
	/* the largest PLAIN message: 255 + NUL + 255 + NUL + 255 */
	size_t n = 0;
	memset(msg, 'z', SASL_FIELD_MAX);
	n += SASL_FIELD_MAX;
	msg[n++] = '\0';
	memset(msg + n, 'z', SASL_FIELD_MAX);
	n += SASL_FIELD_MAX;
	msg[n++] = '\0';
	memset(msg + n, 'p', SASL_FIELD_MAX);
	n += SASL_FIELD_MAX;
	long e = sasl_base64_encode(msg, n, b64, sizeof(b64));
	assert_true(e > 0 && (size_t)e <= SASL_B64_MAX);
	assert_int_equal(sasl_start(&x, "PLAIN", 5, true, b64, (size_t)e), 1);
	/* one octet more does not even decode */
	msg[n++] = 'p';
	e = sasl_base64_encode(msg, n, b64, sizeof(b64));
	assert_int_equal(sasl_start(&x, "PLAIN", 5, true, b64, (size_t)e), -1);
	assert_true(x.error == SASL_E_BASE64 || x.error == SASL_E_SYNTAX);
	sasl_wipe(&x);
}

static void test_replies(void **state)
{
	(void)state;
	assert_string_equal(sasl_error_reply(SASL_E_MECH),
			    "504 5.5.4 Error: unsupported authentication mechanism\r\n");
	assert_string_equal(sasl_error_reply(SASL_E_CANCEL), "501 5.0.0 Authentication cancelled\r\n");
	assert_memory_equal(sasl_error_reply(SASL_E_BASE64), "501 5.5.2 ", 10);
	assert_memory_equal(sasl_error_reply(SASL_E_SYNTAX), "535 5.7.8 ", 10);
	assert_memory_equal(sasl_error_reply(SASL_E_AUTHZID), "535 5.7.8 ", 10);
	assert_int_equal(sasl_mech_parse("LOGIN", 5), SASL_MECH_LOGIN);
	assert_int_equal(sasl_mech_parse("Plain", 5), SASL_MECH_PLAIN);
	assert_int_equal(sasl_mech_parse("PLAI", 4), SASL_MECH_NONE);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_base64_decode),   cmocka_unit_test(test_base64_bounds),
	    cmocka_unit_test(test_base64_round_trip), cmocka_unit_test(test_exchanges),
	    cmocka_unit_test(test_field_bounds),    cmocka_unit_test(test_replies),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
