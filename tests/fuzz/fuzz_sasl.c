/*
 * libFuzzer target for mta/smtp/sasl: the input is an AUTH dialogue, one
 * line per LF: the first line is the AUTH argument ("MECH [initial
 * response]"), the next ones the client's answers to each 334.
 *
 * Checked: every line is given as an exact-size heap copy (ASan sees reads
 * past it); the exchange ends within the lines or asks for more; a 334's
 * text is one of the mechanisms' challenges; credentials have the lengths
 * they claim, no NUL, at most SASL_FIELD_MAX octets, a non-empty authcid and
 * password, and an authzid that is empty or the authcid; a failure has a
 * reason and leaves no field behind. Base64: whatever decodes strictly
 * encodes back to the same text (the decoder accepts one spelling per
 * value), and encoding the input decodes back to it.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "mta/smtp/sasl.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_field(const char *f, size_t len)
{
	if (len > SASL_FIELD_MAX || strlen(f) != len)
		abort();
}

static void check_base64(const uint8_t *data, size_t size)
{
	unsigned char *out = malloc(size + 1);
	char *enc = malloc(4 * (size / 3 + 1) + 1);
	if (!out || !enc)
		abort();
	long n = sasl_base64_decode((const char *)data, size, out, size);
	if (n >= 0) {
		if (sasl_base64_encode(out, (size_t)n, enc, 4 * (size / 3 + 1) + 1) != (long)size ||
		    memcmp(enc, data, size) != 0)
			abort();
	}
	long e = sasl_base64_encode(data, size, enc, 4 * (size / 3 + 1) + 1);
	if (e < 0 || sasl_base64_decode(enc, (size_t)e, out, size + 1) != (long)size ||
	    memcmp(out, data, size) != 0)
		abort();
	free(out);
	free(enc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	check_base64(data, size);

	struct sasl x;
	const uint8_t *p = data, *end = data + size;
	int r = 2; /* not started */
	while (p <= end) {
		const uint8_t *nl = memchr(p, '\n', (size_t)(end - p));
		size_t n = (size_t)((nl ? nl : end) - p);
		char *line = malloc(n ? n : 1);
		if (!line)
			abort();
		memcpy(line, p, n);
		if (r == 2) {
			const char *sp = memchr(line, ' ', n);
			size_t ml = sp ? (size_t)(sp - line) : n;
			r = sasl_start(&x, line, ml, sp != NULL, sp ? sp + 1 : NULL,
				       sp ? n - ml - 1 : 0);
		} else {
			r = sasl_step(&x, line, n);
		}
		free(line);
		if (r != 0)
			break;
		if (strcmp(x.challenge, "") && strcmp(x.challenge, "VXNlcm5hbWU6") &&
		    strcmp(x.challenge, "UGFzc3dvcmQ6"))
			abort();
		if (!nl)
			break;
		p = nl + 1;
	}
	if (r == 1) {
		check_field(x.authzid, x.authzid_len);
		check_field(x.authcid, x.authcid_len);
		check_field(x.passwd, x.passwd_len);
		if (!x.authcid_len || !x.passwd_len)
			abort();
		if (x.authzid_len && (x.authzid_len != x.authcid_len ||
				      strcasecmp(x.authzid, x.authcid) != 0))
			abort();
		if (x.mech == SASL_MECH_LOGIN && x.authzid_len)
			abort();
	} else if (r == -1) {
		if (x.error == SASL_E_NONE || x.passwd_len || x.authcid_len || x.passwd[0])
			abort();
		if (!sasl_error_reply(x.error)[0])
			abort();
	}
	if (r != 2)
		sasl_wipe(&x);
	return 0;
}
