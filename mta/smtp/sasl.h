/*
 * sasl: the server side of the SASL exchanges SMTP AUTH offers (RFC 4954):
 * PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login), with strict
 * base64 (RFC 4648 section 4: the standard alphabet, '=' padding required,
 * no whitespace, no line breaks, non-zero pad bits refused).
 *
 * Pure: no I/O, no allocation. The server feeds it the mechanism and the
 * optional initial response of "AUTH MECH [IR]" (sasl_start), then each
 * continuation line the client sends after a 334 (sasl_step), until the
 * exchange yields the credentials or fails.
 *
 * Return convention (as the other incremental parsers): 1 the credentials
 * are ready (authzid/authcid/passwd), 0 the server must send
 * "334 " + x->challenge and feed the client's next line to sasl_step, -1 the
 * exchange failed: x->error says why (sasl_error_reply gives the SMTP reply).
 *
 * Secrets: the struct holds the decoded password; sasl_wipe clears it
 * (explicit_bzero) and must be called on every path that ends an exchange.
 * The caller also wipes the lines it fed (they hold the base64 password).
 *
 * Thread-safety: a struct sasl belongs to one session, used by one thread.
 */
#ifndef POSTHASTE_MTA_SMTP_SASL_H
#define POSTHASTE_MTA_SMTP_SASL_H

#include <stdbool.h>
#include <stddef.h>

#define SASL_FIELD_MAX 255u /* octets of authzid, authcid and passwd (RFC 4616 2) */
/* decoded octets of one client response: a PLAIN message at its largest */
#define SASL_MSG_MAX (3 * SASL_FIELD_MAX + 2)
/* base64 characters of one client response */
#define SASL_B64_MAX (4 * ((SASL_MSG_MAX + 2) / 3))

enum sasl_mech { SASL_MECH_NONE = 0, SASL_MECH_PLAIN, SASL_MECH_LOGIN };

enum sasl_error {
	SASL_E_NONE = 0,
	SASL_E_MECH,     /* unknown mechanism: 504 5.5.4 */
	SASL_E_CANCEL,   /* the client sent "*": 501 5.0.0 */
	SASL_E_BASE64,   /* not strict base64, or too long: 501 5.5.2 */
	SASL_E_SYNTAX,   /* PLAIN without two NULs, a NUL in a LOGIN field, an empty
			    authcid or password, a field over 255 octets: 535 5.7.8 */
	SASL_E_AUTHZID,  /* an authzid other than the authcid: 535 5.7.8 */
};

struct sasl {
	enum sasl_mech mech;
	unsigned step;         /* private: LOGIN 0 = want user, 1 = want password */
	enum sasl_error error; /* after -1 */
	const char *challenge; /* after 0: base64 text to send after "334 " ("" for none) */
	/* after 1: NUL-terminated; authzid "" when none was given */
	char authzid[SASL_FIELD_MAX + 1];
	char authcid[SASL_FIELD_MAX + 1];
	char passwd[SASL_FIELD_MAX + 1];
	size_t authzid_len, authcid_len, passwd_len;
};

/* The mechanism named by the len octets at name (case-insensitive), or SASL_MECH_NONE. */
enum sasl_mech sasl_mech_parse(const char *name, size_t len);

/*
 * Starts an exchange: mech/mech_len as sent after AUTH; ir/ir_len the initial
 * response when has_ir ("=" is an empty one, RFC 4954 4), ignored otherwise.
 * Returns 1, 0 or -1 as above. Resets *x first.
 */
int sasl_start(struct sasl *x, const char *mech, size_t mech_len, bool has_ir, const char *ir,
	       size_t ir_len);

/*
 * Feeds the client's answer to a 334 (the line without CRLF): "*" cancels,
 * anything else must be strict base64 (an empty line is an empty response).
 * Returns 1, 0 or -1 as above. Only after sasl_start or sasl_step returned 0.
 */
int sasl_step(struct sasl *x, const char *line, size_t len);

/* Clears every secret in *x (explicit_bzero of the whole struct). */
void sasl_wipe(struct sasl *x);

/*
 * The SMTP reply line for an error, with CRLF, e.g.
 * "501 5.0.0 Authentication cancelled\r\n".
 */
const char *sasl_error_reply(enum sasl_error e);

/*
 * Strict base64 decoding of len characters at in into out (cap octets).
 * Returns the decoded length, or -1: a character outside the alphabet
 * (whitespace included), a length not a multiple of 4, misplaced or missing
 * padding, non-zero pad bits, or a result over cap. An empty input gives 0.
 */
long sasl_base64_decode(const char *in, size_t len, unsigned char *out, size_t cap);

/*
 * Base64 encoding of len octets at in into out (cap characters, NUL
 * included). Returns the length without the NUL, or -1 when cap is too small
 * (4 * ceil(len / 3) + 1 needed).
 */
long sasl_base64_encode(const unsigned char *in, size_t len, char *out, size_t cap);

#endif
