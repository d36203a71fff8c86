/*
 * libFuzzer target for mta/smtp/smtp_parser.
 *
 * Input: byte 0 picks the limits, byte 1 the way the rest is split into
 * pieces (whole, one octet at a time, or pseudo-random lengths seeded by
 * bytes 2-3); the rest is what a client sent. The pieces are fed through the
 * parser, each in its own exactly-sized heap buffer freed after use, acting
 * as the server does (an accepted DATA or BDAT switches the mode). Every
 * command line goes through smtp_command_parse.
 *
 * Invariants:
 *  - the event stream (bodies joined) equals that of a byte-at-a-time model
 *    run on the whole input, whatever the split;
 *  - return values and *used_r are consistent; no endless events without input;
 *  - COMMAND slices lie in the consumed input or the parser's buffer; BODY
 *    slices lie in the consumed input, except a 1-octet held-back CR;
 *  - DATA_END/BDAT_END sizes equal the body octets yielded;
 *  - smtp_command_parse slices lie in the line; accepted MAIL/RCPT addresses
 *    respect the limits, carry addr_utf8 exactly when they have an octet >=
 *    0x80, and parse again, unchanged, when rebuilt as "MAIL FROM:<addr> params".
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mta/smtp/smtp_parser.h"

#define CHECK(x)                                                                                   \
	do {                                                                                       \
		if (!(x)) {                                                                        \
			fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #x);  \
			abort();                                                                   \
		}                                                                                  \
	} while (0)

static const struct smtp_limits limit_sets[] = {
    {2048, 1000, 64, 255, 256}, {16, 10, 8, 16, 24}, {64, 78, 64, 255, 256}, {1, 1, 1, 1, 1},
    {512, 0, 64, 255, 256},
};

/* ---- event records: type, flags, size, len, data; adjacent bodies joined ---- */

struct rec {
	unsigned char *b;
	size_t len, cap;
	size_t body_at; /* offset of the length field of a trailing BODY record, or SIZE_MAX */
};

static void rec_raw(struct rec *r, const void *data, size_t n)
{
	if (r->len + n > r->cap) {
		r->cap = (r->len + n) * 2 + 64;
		r->b = realloc(r->b, r->cap);
		CHECK(r->b != NULL);
	}
	if (n > 0)
		memcpy(r->b + r->len, data, n);
	r->len += n;
}

static void rec_event(struct rec *r, unsigned type, unsigned flags, uint64_t size, const void *data,
                      size_t n)
{
	if (type == SMTP_EV_BODY && r->body_at != SIZE_MAX) {
		uint64_t old;

		memcpy(&old, r->b + r->body_at, sizeof(old));
		old += n;
		memcpy(r->b + r->body_at, &old, sizeof(old));
		rec_raw(r, data, n);
		return;
	}
	uint64_t len64 = n;

	rec_raw(r, &type, sizeof(type));
	rec_raw(r, &flags, sizeof(flags));
	rec_raw(r, &size, sizeof(size));
	r->body_at = type == SMTP_EV_BODY ? r->len : SIZE_MAX;
	rec_raw(r, &len64, sizeof(len64));
	rec_raw(r, data, n);
}

/* ---- command lines: the server's mode switch and the parse invariants ---- */

static bool within(const char *x, size_t n, const char *base, size_t len)
{
	return x >= base && x <= base + len && n <= (size_t)(base + len - x);
}

static void check_reparse(const struct smtp_command *cmd, const struct smtp_limits *lim)
{
	char line[4096];
	size_t n = 0;
	const char *word = cmd->verb == SMTP_VERB_MAIL ? "MAIL FROM:<" : "RCPT TO:<";
	struct smtp_command again;

	if (cmd->addr_len + 64 > sizeof(line))
		return;
	memcpy(line, word, strlen(word));
	n += strlen(word);
	memcpy(line + n, cmd->addr, cmd->addr_len);
	n += cmd->addr_len;
	line[n++] = '>';
	for (unsigned i = 0; i < cmd->nparams; i++) {
		const struct smtp_param *prm = &cmd->params[i];
		size_t need = 2 + prm->key_len + prm->value_len;

		if (n + need > sizeof(line))
			return;
		line[n++] = ' ';
		memcpy(line + n, prm->key, prm->key_len);
		n += prm->key_len;
		if (prm->value != NULL) {
			line[n++] = '=';
			memcpy(line + n, prm->value, prm->value_len);
			n += prm->value_len;
		}
	}
	CHECK(smtp_command_parse(line, n, lim, &again) == SMTP_CMD_OK);
	CHECK(again.verb == cmd->verb);
	CHECK(again.addr_len == cmd->addr_len);
	CHECK(memcmp(again.addr, cmd->addr, cmd->addr_len) == 0);
	CHECK(again.local_len == cmd->local_len);
	CHECK(again.addr_utf8 == cmd->addr_utf8);
	CHECK(again.nparams == cmd->nparams);
	for (unsigned i = 0; i < cmd->nparams; i++) {
		CHECK(again.params[i].key_len == cmd->params[i].key_len);
		CHECK(again.params[i].value_len == cmd->params[i].value_len);
		CHECK((again.params[i].value == NULL) == (cmd->params[i].value == NULL));
	}
}

/* Parses a command line (in an exact-size copy) and returns the BDAT size, or -1/-2 for DATA /
 * other. */
static int64_t server_command(const char *data, size_t len, const struct smtp_limits *lim,
                              uint64_t *bdat_r)
{
	char *line = malloc(len > 0 ? len : 1);
	struct smtp_command cmd;
	int64_t ret = -2;

	CHECK(line != NULL);
	if (len > 0)
		memcpy(line, data, len);
	enum smtp_cmd_error err = smtp_command_parse(line, len, lim, &cmd);

	CHECK(cmd.verb < SMTP_VERB_COUNT);
	CHECK(smtp_verb_name(cmd.verb) != NULL);
	CHECK((err == SMTP_CMD_E_UNKNOWN) == (cmd.verb == SMTP_VERB_UNKNOWN));
	CHECK(within(cmd.arg, cmd.arg_len, line, len));
	if (err != SMTP_CMD_OK)
		goto out;
	switch (cmd.verb) {
	case SMTP_VERB_MAIL:
	case SMTP_VERB_RCPT: {
		CHECK(cmd.addr != NULL && within(cmd.addr, cmd.addr_len, line, len));
		CHECK(cmd.local_len <= cmd.addr_len);
		CHECK(cmd.local_len <= lim->max_local_part);
		CHECK(cmd.addr_len + 2 <= lim->max_path);
		if (cmd.local_len < cmd.addr_len) {
			CHECK(cmd.addr[cmd.local_len] == '@');
			CHECK(cmd.addr_len - cmd.local_len - 1 <= lim->max_domain);
		}
		if (cmd.verb == SMTP_VERB_RCPT)
			CHECK(cmd.addr_len > 0);
		bool hi = false;

		for (size_t i = 0; i < cmd.addr_len; i++)
			hi |= (unsigned char)cmd.addr[i] >= 0x80;
		CHECK(hi == cmd.addr_utf8);
		CHECK(cmd.nparams <= SMTP_MAX_PARAMS);
		for (unsigned i = 0; i < cmd.nparams; i++) {
			const struct smtp_param *prm = &cmd.params[i];
			char key[1024];

			CHECK(prm->key_len > 0 && within(prm->key, prm->key_len, line, len));
			CHECK(
			    prm->value == NULL ||
			    (prm->value_len > 0 && within(prm->value, prm->value_len, line, len)));
			if (prm->key_len < sizeof(key)) {
				memcpy(key, prm->key, prm->key_len);
				key[prm->key_len] = '\0';
				const struct smtp_param *f = smtp_command_param(&cmd, key);
				CHECK(f != NULL && f <= prm);
			}
		}
		check_reparse(&cmd, lim);
		break;
	}
	case SMTP_VERB_DATA:
	case SMTP_VERB_RSET:
	case SMTP_VERB_QUIT:
	case SMTP_VERB_STARTTLS:
		CHECK(cmd.arg_len == 0);
		if (cmd.verb == SMTP_VERB_DATA)
			ret = -1;
		break;
	case SMTP_VERB_HELO:
	case SMTP_VERB_EHLO:
	case SMTP_VERB_AUTH:
		CHECK(cmd.arg_len > 0);
		break;
	case SMTP_VERB_BDAT:
		CHECK(cmd.bdat_size <= UINT64_C(1) << 63);
		*bdat_r = cmd.bdat_size;
		ret = 0;
		break;
	default:
		break;
	}
out:
	free(line);
	return ret;
}

/* ---- the model: the whole input at once, one octet at a time ---- */

static void model_run(const char *in, size_t len, const struct smtp_limits *lim, struct rec *r)
{
	size_t pos = 0;

	for (;;) {
		const char *lf = memchr(in + pos, '\n', len - pos);
		uint64_t bdat = 0;

		if (lf == NULL)
			return;
		size_t n = (size_t)(lf - (in + pos));

		if (n + 1 > lim->max_command_line) {
			rec_event(r, SMTP_EV_COMMAND_TOO_LONG, 0, 0, NULL, 0);
			pos += n + 1;
			continue;
		}
		const char *line = in + pos;
		unsigned flags = 0;

		pos += n + 1;
		if (n > 0 && line[n - 1] == '\r')
			n--;
		else
			flags |= SMTP_LINE_BARE_LF;
		for (size_t i = 0; i < n; i++) {
			if (line[i] == '\r')
				flags |= SMTP_LINE_BARE_CR;
			if (line[i] == '\0')
				flags |= SMTP_LINE_NUL;
		}
		rec_event(r, SMTP_EV_COMMAND, flags, 0, line, n);

		int64_t what = server_command(line, n, lim, &bdat);

		if (what == 0) {
			size_t avail = len - pos;
			size_t take = bdat < avail ? (size_t)bdat : avail;

			if (take > 0)
				rec_event(r, SMTP_EV_BODY, 0, 0, in + pos, take);
			pos += take;
			if (take < bdat)
				return;
			rec_event(r, SMTP_EV_BDAT_END, 0, bdat, NULL, 0);
		} else if (what == -1) {
			bool bol = true, prev_cr = false, dot = false, dotcr = false, end = false;
			unsigned bf = 0;
			uint64_t size = 0;
			size_t line_len = 0;
			size_t start = pos;

			for (; pos < len && !end; pos++) {
				char c = in[pos];

				if (dotcr) {
					dotcr = false;
					if (c == '\n') {
						end = true;
						/* CRLF "." CRLF, or "." CRLF at the start of the
						 * data */
						CHECK(pos >= start + 2 && in[pos - 1] == '\r' &&
						      in[pos - 2] == '.');
						CHECK(pos == start + 2 ||
						      (in[pos - 3] == '\n' && in[pos - 4] == '\r'));
						continue;
					}
					rec_event(r, SMTP_EV_BODY, 0, 0, "\r", 1);
					size++;
					bf |= SMTP_BODY_BARE_CR;
					prev_cr = false;
					if (lim->max_text_line != 0 &&
					    ++line_len > lim->max_text_line)
						bf |= SMTP_BODY_LONG_LINE;
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
				rec_event(r, SMTP_EV_BODY, 0, 0, &c, 1);
				size++;
				if (prev_cr && c != '\n')
					bf |= SMTP_BODY_BARE_CR;
				if (c == '\n' && !prev_cr)
					bf |= SMTP_BODY_BARE_LF;
				if (c == '\0')
					bf |= SMTP_BODY_NUL;
				if ((unsigned char)c >= 0x80)
					bf |= SMTP_BODY_8BIT;
				if (lim->max_text_line != 0 && ++line_len > lim->max_text_line)
					bf |= SMTP_BODY_LONG_LINE;
				if (c == '\n')
					line_len = 0;
				bol = c == '\n' && prev_cr;
				prev_cr = c == '\r';
			}
			if (!end)
				return;
			rec_event(r, SMTP_EV_DATA_END, bf, size, NULL, 0);
		}
	}
}

/* ---- the parser, fed in pieces ---- */

struct run {
	struct smtp_parser p;
	const struct smtp_limits *lim;
	struct rec r;
	uint64_t body; /* octets since DATA/BDAT began */
};

static void run_feed(struct run *x, const char *data, size_t len)
{
	char *in = malloc(len > 0 ? len : 1);
	size_t off = 0;
	unsigned idle = 0;

	CHECK(in != NULL);
	if (len > 0)
		memcpy(in, data, len);
	for (;;) {
		struct smtp_event ev;
		size_t used = SIZE_MAX;
		enum smtp_mode mode = smtp_parser_mode(&x->p);
		int r = smtp_parser_next(&x->p, in + off, len - off, &used, &ev);
		uint64_t bdat = 0;

		CHECK(r == 0 || r == 1);
		CHECK(used <= len - off);
		if (r == 0) {
			CHECK(used == len - off);
			break;
		}
		idle = used == 0 ? idle + 1 : 0;
		CHECK(idle <= 2);

		const char *cur = in + off;

		switch (ev.type) {
		case SMTP_EV_COMMAND:
			CHECK(mode == SMTP_MODE_COMMAND);
			CHECK(ev.len < x->lim->max_command_line);
			CHECK(within(ev.data, ev.len, cur, used) ||
			      within(ev.data, ev.len, x->p.buf, x->lim->max_command_line));
			CHECK((ev.flags & ~7u) == 0);
			rec_event(&x->r, ev.type, ev.flags, 0, ev.data, ev.len);
			int64_t what = server_command(ev.data, ev.len, x->lim, &bdat);
			if (what == -1)
				smtp_parser_begin_data(&x->p);
			else if (what == 0)
				smtp_parser_begin_bdat(&x->p, bdat);
			x->body = 0;
			break;
		case SMTP_EV_COMMAND_TOO_LONG:
			CHECK(mode == SMTP_MODE_COMMAND && ev.len == 0 && ev.flags == 0);
			rec_event(&x->r, ev.type, 0, 0, NULL, 0);
			break;
		case SMTP_EV_BODY:
			CHECK(mode != SMTP_MODE_COMMAND);
			CHECK(ev.len > 0);
			if (!within(ev.data, ev.len, cur, used))
				CHECK(mode == SMTP_MODE_DATA && ev.len == 1 && ev.data[0] == '\r');
			x->body += ev.len;
			rec_event(&x->r, ev.type, 0, 0, ev.data, ev.len);
			break;
		case SMTP_EV_DATA_END:
			CHECK(mode == SMTP_MODE_DATA);
			CHECK(ev.size == x->body);
			CHECK((ev.flags & ~0x1fu) == 0);
			CHECK(smtp_parser_mode(&x->p) == SMTP_MODE_COMMAND);
			rec_event(&x->r, ev.type, ev.flags, ev.size, NULL, 0);
			break;
		case SMTP_EV_BDAT_END:
			CHECK(mode == SMTP_MODE_BDAT);
			CHECK(ev.size == x->body);
			CHECK(smtp_parser_mode(&x->p) == SMTP_MODE_COMMAND);
			rec_event(&x->r, ev.type, 0, ev.size, NULL, 0);
			break;
		default:
			CHECK(!"unknown event type");
		}
		off += used;
	}
	free(in);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 4)
		return 0;

	const struct smtp_limits *lim =
	    &limit_sets[data[0] % (sizeof(limit_sets) / sizeof(limit_sets[0]))];
	unsigned split = data[1];
	uint32_t seed = (uint32_t)data[2] << 8 | data[3] | 1;
	const char *in = (const char *)data + 4;
	size_t len = size - 4;
	struct rec model = {.body_at = SIZE_MAX};
	struct run x = {.lim = lim, .r = {.body_at = SIZE_MAX}};

	model_run(in, len, lim, &model);

	CHECK(smtp_parser_init(&x.p, lim) == 0);
	if (split % 4 == 0) {
		run_feed(&x, in, len);
	} else if (split % 4 == 1) {
		for (size_t i = 0; i < len; i++)
			run_feed(&x, in + i, 1);
		run_feed(&x, in + len, 0);
	} else {
		size_t maxpiece = (size_t)1 << (split / 4 % 12); /* 1 .. 2048 */
		size_t off = 0;

		while (off < len) {
			seed ^= seed << 13;
			seed ^= seed >> 17;
			seed ^= seed << 5;
			size_t n = seed % (maxpiece + 1); /* empty pieces too */

			if (n > len - off)
				n = len - off;
			run_feed(&x, in + off, n);
			off += n;
		}
	}
	smtp_parser_deinit(&x.p);

	CHECK(model.len == x.r.len);
	CHECK(model.len == 0 || memcmp(model.b, x.r.b, model.len) == 0);
	free(model.b);
	free(x.r.b);
	return 0;
}
