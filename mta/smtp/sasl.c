/* SASL PLAIN and LOGIN for SMTP AUTH, and strict base64: see sasl.h. */
#include "mta/smtp/sasl.h"

#include <stdint.h>
#include <string.h>
#include <strings.h>

#include "core/compiler.h"

/* ---- base64 (RFC 4648 4) ---- */

static const char b64_alphabet[] =
	"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* The 6-bit value of c, or -1 (not in the alphabet; '=' included). */
static int b64_value(unsigned char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

long sasl_base64_decode(const char *in, size_t len, unsigned char *out, size_t cap)
{
	if (len % 4)
		return -1;
	size_t o = 0;
	for (size_t i = 0; i < len; i += 4) {
		const unsigned char *q = (const unsigned char *)in + i;
		bool last = i + 4 == len;
		/* padding only in the last quantum: "xx==" or "xxx=" */
		size_t pad = 0;
		if (last && q[3] == '=')
			pad = q[2] == '=' ? 2 : 1;
		int v[4];
		for (size_t k = 0; k < 4 - pad; k++) {
			v[k] = b64_value(q[k]);
			if (v[k] < 0)
				return -1;
		}
		size_t n = 3 - pad;
		if (o + n > cap)
			return -1;
		uint32_t bits = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12;
		if (pad < 2)
			bits |= (uint32_t)v[2] << 6;
		if (pad < 1)
			bits |= (uint32_t)v[3];
		/* the bits under the padding must be zero (canonical encoding) */
		if ((pad == 2 && (bits & 0xffff)) || (pad == 1 && (bits & 0xff)))
			return -1;
		out[o++] = (unsigned char)(bits >> 16);
		if (n > 1)
			out[o++] = (unsigned char)(bits >> 8);
		if (n > 2)
			out[o++] = (unsigned char)bits;
	}
	return (long)o;
}

long sasl_base64_encode(const unsigned char *in, size_t len, char *out, size_t cap)
{
	size_t need = 4 * ((len + 2) / 3);
	if (cap < need + 1)
		return -1;
	size_t o = 0;
	for (size_t i = 0; i < len; i += 3) {
		size_t n = MIN(len - i, (size_t)3);
		uint32_t bits = (uint32_t)in[i] << 16;
		if (n > 1)
			bits |= (uint32_t)in[i + 1] << 8;
		if (n > 2)
			bits |= in[i + 2];
		out[o++] = b64_alphabet[bits >> 18 & 63];
		out[o++] = b64_alphabet[bits >> 12 & 63];
		out[o++] = n > 1 ? b64_alphabet[bits >> 6 & 63] : '=';
		out[o++] = n > 2 ? b64_alphabet[bits & 63] : '=';
	}
	out[o] = '\0';
	return (long)o;
}

/* ---- the exchanges ---- */

#define LOGIN_USERNAME "VXNlcm5hbWU6" /* "Username:" */
#define LOGIN_PASSWORD "UGFzc3dvcmQ6" /* "Password:" */

enum sasl_mech sasl_mech_parse(const char *name, size_t len)
{
	if (len == 5 && !strncasecmp(name, "PLAIN", 5))
		return SASL_MECH_PLAIN;
	if (len == 5 && !strncasecmp(name, "LOGIN", 5))
		return SASL_MECH_LOGIN;
	return SASL_MECH_NONE;
}

void sasl_wipe(struct sasl *x)
{
	explicit_bzero(x, sizeof(*x));
}

static int fail(struct sasl *x, enum sasl_error e)
{
	enum sasl_mech m = x->mech;
	sasl_wipe(x);
	x->mech = m;
	x->error = e;
	return -1;
}

/* Copies a field of n octets (no NUL inside) into dst (SASL_FIELD_MAX + 1). */
static bool set_field(char *dst, size_t *len_r, const unsigned char *src, size_t n)
{
	if (n > SASL_FIELD_MAX || memchr(src, '\0', n))
		return false;
	memcpy(dst, src, n);
	dst[n] = '\0';
	*len_r = n;
	return true;
}

/* RFC 4616 2: message = [authzid] UTF8NUL authcid UTF8NUL passwd */
static int plain_message(struct sasl *x, const unsigned char *m, size_t n)
{
	const unsigned char *nul1 = memchr(m, '\0', n);
	if (!nul1)
		return fail(x, SASL_E_SYNTAX);
	const unsigned char *rest = nul1 + 1;
	size_t rn = n - (size_t)(rest - m);
	const unsigned char *nul2 = memchr(rest, '\0', rn);
	if (!nul2)
		return fail(x, SASL_E_SYNTAX);
	const unsigned char *pw = nul2 + 1;
	size_t pwn = n - (size_t)(pw - m);
	size_t zn = (size_t)(nul1 - m), cn = (size_t)(nul2 - rest);
	if (!cn || !pwn || !set_field(x->authzid, &x->authzid_len, m, zn) ||
	    !set_field(x->authcid, &x->authcid_len, rest, cn) ||
	    !set_field(x->passwd, &x->passwd_len, pw, pwn))
		return fail(x, SASL_E_SYNTAX);
	/* no proxy authorisation: an authzid must name the authcid itself */
	if (zn && (zn != cn || strncasecmp(x->authzid, x->authcid, cn) != 0))
		return fail(x, SASL_E_AUTHZID);
	return 1;
}

/* One decoded client response of n octets at m. */
static int response(struct sasl *x, const unsigned char *m, size_t n)
{
	if (x->mech == SASL_MECH_PLAIN)
		return plain_message(x, m, n);
	/* LOGIN: the user name, then the password */
	if (x->step == 0) {
		if (!n || !set_field(x->authcid, &x->authcid_len, m, n))
			return fail(x, SASL_E_SYNTAX);
		x->step = 1;
		x->challenge = LOGIN_PASSWORD;
		return 0;
	}
	if (!n || !set_field(x->passwd, &x->passwd_len, m, n))
		return fail(x, SASL_E_SYNTAX);
	return 1;
}

/* Decodes one base64 response and hands it on; the decoded copy is wiped. */
static int decode_response(struct sasl *x, const char *b64, size_t len)
{
	unsigned char m[SASL_MSG_MAX];
	if (len > SASL_B64_MAX)
		return fail(x, SASL_E_BASE64);
	long n = sasl_base64_decode(b64, len, m, sizeof(m));
	if (n < 0) {
		explicit_bzero(m, sizeof(m));
		return fail(x, SASL_E_BASE64);
	}
	int r = response(x, m, (size_t)n);
	explicit_bzero(m, sizeof(m));
	return r;
}

int sasl_start(struct sasl *x, const char *mech, size_t mech_len, bool has_ir, const char *ir,
	       size_t ir_len)
{
	sasl_wipe(x);
	x->mech = sasl_mech_parse(mech, mech_len);
	if (x->mech == SASL_MECH_NONE)
		return fail(x, SASL_E_MECH);
	if (has_ir) {
		if (ir_len == 1 && ir[0] == '*')
			return fail(x, SASL_E_CANCEL);
		if (ir_len == 1 && ir[0] == '=')
			return response(x, (const unsigned char *)"", 0);
		return decode_response(x, ir, ir_len);
	}
	x->challenge = x->mech == SASL_MECH_PLAIN ? "" : LOGIN_USERNAME;
	return 0;
}

int sasl_step(struct sasl *x, const char *line, size_t len)
{
	if (len == 1 && line[0] == '*')
		return fail(x, SASL_E_CANCEL);
	return decode_response(x, line, len);
}

const char *sasl_error_reply(enum sasl_error e)
{
	switch (e) {
	case SASL_E_MECH:
		return "504 5.5.4 Error: unsupported authentication mechanism\r\n";
	case SASL_E_CANCEL:
		return "501 5.0.0 Authentication cancelled\r\n";
	case SASL_E_BASE64:
		return "501 5.5.2 Error: cannot decode the response (base64)\r\n";
	case SASL_E_AUTHZID:
	case SASL_E_SYNTAX:
	case SASL_E_NONE:
	default:
		return "535 5.7.8 Error: authentication failed\r\n";
	}
}
