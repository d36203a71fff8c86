/*
 * libFuzzer target for smtp_reply_parser.
 *
 * Input: byte 0 picks the limits, byte 1 seeds the split of the rest into
 * pieces. The rest is parsed twice: whole, and in pieces (each piece in its
 * own heap block so ASan catches any read past it). Both runs must yield the
 * same lines and the same outcome; every line must satisfy the header's
 * contract; every line is also passed to smtp_reply_caps_learn.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/compiler.h"
#include "mta/smtp/smtp_reply_parser.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct fuzz_run {
	uint64_t hash; /* over every line's fields and octets */
	unsigned lines;
	int outcome; /* 0 ok, -1 error */
	unsigned expect_index;
	struct smtp_reply_caps caps;
};

static void fuzz_mix(struct fuzz_run *r, const void *p, size_t n)
{
	const unsigned char *s = p;
	for (size_t i = 0; i < n; i++)
		r->hash = (r->hash ^ s[i]) * 0x100000001b3ull;
}

static void fuzz_line(struct fuzz_run *r, const struct smtp_reply_limits *lim,
                      const struct smtp_reply_line *ln)
{
	if (ln->code < 200 || ln->code > 559 || ln->code % 100 > 59)
		abort();
	if (ln->index != r->expect_index || ln->index >= lim->max_lines)
		abort();
	if (ln->line_len < 3 || ln->line_len + 1 > lim->max_line)
		abort();
	if (ln->text + ln->text_len != ln->line + ln->line_len ||
	    ln->msg + ln->msg_len != ln->text + ln->text_len || ln->text < ln->line + 3 ||
	    ln->msg < ln->text)
		abort();
	if (ln->esc.klass &&
	    (ln->esc.klass != ln->code / 100 || ln->esc.subject > 999 || ln->esc.detail > 999))
		abort();
	if (memchr(ln->line, '\n', ln->line_len))
		abort();
	r->expect_index = ln->last ? 0 : ln->index + 1;
	r->lines++;
	fuzz_mix(r, &ln->code, sizeof(ln->code));
	fuzz_mix(r, &ln->last, sizeof(ln->last));
	fuzz_mix(r, &ln->esc.klass, 1);
	fuzz_mix(r, &ln->esc.subject, 2);
	fuzz_mix(r, &ln->esc.detail, 2);
	fuzz_mix(r, &ln->msg_len, sizeof(ln->msg_len));
	fuzz_mix(r, ln->line, ln->line_len);
	smtp_reply_caps_learn(&r->caps, ln);
}

/* Feeds one piece; returns false after an error. */
static bool fuzz_feed(struct smtp_reply_parser *p, struct fuzz_run *r, const char *in, size_t len)
{
	struct smtp_reply_line ln;
	const char *err;
	size_t used;
	int rc;

	do {
		err = NULL;
		rc = smtp_reply_parser_next(p, in, len, &used, &ln, &err);
		if (used > len)
			abort();
		if (rc < 0) {
			if (!err || !*err || used != 0)
				abort();
			r->outcome = -1;
			return false;
		}
		if (rc == 0) {
			if (used != len)
				abort();
			return true;
		}
		fuzz_line(r, &p->lim, &ln);
		in += used;
		len -= used;
	} while (len > 0);
	return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const size_t lines[] = {2048, 8, 16, 64};
	static const unsigned nlines[] = {100, 1, 3, 1000};
	struct smtp_reply_limits lim;
	struct smtp_reply_parser p;
	struct fuzz_run whole = {0}, split = {0};
	uint32_t seed;
	size_t off;

	if (size < 2)
		return 0;
	lim.max_line = lines[data[0] & 3];
	lim.max_lines = nlines[(data[0] >> 2) & 3];
	seed = data[1] * 2654435761u + 1;
	data += 2;
	size -= 2;

	if (smtp_reply_parser_init(&p, &lim) != 0)
		abort();
	{
		char *copy = malloc(size ? size : 1);
		memcpy(copy, data, size);
		fuzz_feed(&p, &whole, copy, size);
		free(copy);
	}

	smtp_reply_parser_reset(&p);
	for (off = 0; off < size;) {
		size_t n;
		char *piece;
		bool ok;

		seed = seed * 1103515245u + 12345u;
		n = (seed >> 16) % 24 + 1;
		if (n > size - off)
			n = size - off;
		piece = malloc(n);
		memcpy(piece, data + off, n);
		ok = fuzz_feed(&p, &split, piece, n);
		free(piece);
		off += n;
		if (!ok)
			break;
	}
	smtp_reply_parser_deinit(&p);

	if (whole.outcome != split.outcome || whole.lines != split.lines ||
	    whole.hash != split.hash || whole.caps.flags != split.caps.flags ||
	    whole.caps.auth != split.caps.auth || whole.caps.size_max != split.caps.size_max)
		abort();
	return 0;
}
