/*
 * smtp_parser: the zero-copy incremental SMTP server-side parser.
 *
 * Command mode: memchr for the LF of a line; a line wholly inside one input is
 * yielded in place, a partial one is copied into p->buf (at most
 * max_command_line - 1 octets, because the LF must fall inside the limit).
 *
 * DATA mode: a vector scan finds the octets that matter (CR, LF, and NUL or
 * >= 0x80 until their flag is set); everything between them is skipped at
 * full speed and yielded as one slice. A slice ends only at the end of the
 * input or before a line-initial "." (which is dropped: stuffing, or the end
 * marker). The only octet ever held back is the CR of CRLF "." CR when the
 * input ends there; if no LF follows it is yielded from a constant.
 *
 * BDAT mode: slices of min(available, remaining).
 */
#include "mta/smtp/smtp_parser.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "core/compiler.h"

/* DATA sub-states (p->state). */
enum {
	D_MID = 0, /* inside a line; the last octet was not a CR */
	D_CR,      /* the last octet (already yielded) was a CR */
	D_BOL,     /* just after CRLF or at the start of the data */
	D_DOT,     /* after CRLF ".": the "." is consumed and never yielded */
	D_DOTCR,   /* after CRLF "." CR: the CR is held back */
};

/* Held-back octets are yielded from here, never from a released input. */
static const char held_cr[] = "\r";

void smtp_limits_default(struct smtp_limits *lim)
{
	lim->max_command_line = 2048;
	lim->max_text_line = 1000;
	lim->max_local_part = 64;
	lim->max_domain = 255;
	lim->max_path = 256;
}

int smtp_parser_init(struct smtp_parser *p, const struct smtp_limits *lim)
{
	memset(p, 0, sizeof(*p));
	p->lim = lim;
	p->buf = malloc(lim->max_command_line > 0 ? lim->max_command_line : 1);
	if (p->buf == NULL)
		return -ENOMEM;
	return 0;
}

void smtp_parser_deinit(struct smtp_parser *p)
{
	free(p->buf);
	p->buf = NULL;
}

static void data_clear(struct smtp_parser *p)
{
	p->state = D_BOL;
	p->flags = 0;
	p->line_len = 0;
	p->size = 0;
	p->remaining = 0;
	p->discarding = false;
	p->hold = 0;
}

void smtp_parser_reset(struct smtp_parser *p)
{
	data_clear(p);
	p->mode = SMTP_MODE_COMMAND;
}

void smtp_parser_begin_data(struct smtp_parser *p)
{
	data_clear(p);
	p->mode = SMTP_MODE_DATA;
}

void smtp_parser_begin_bdat(struct smtp_parser *p, uint64_t size)
{
	data_clear(p);
	p->remaining = size;
	p->mode = SMTP_MODE_BDAT;
}

enum smtp_mode smtp_parser_mode(const struct smtp_parser *p)
{
	return p->mode;
}

static void ev_set(struct smtp_event *ev, enum smtp_event_type type, const void *data, size_t len)
{
	ev->type = type;
	ev->data = data;
	ev->len = len;
	ev->flags = 0;
	ev->size = 0;
}

/* ---- command mode ---- */

static int cmd_emit(const char *line, size_t len, struct smtp_event *ev)
{
	unsigned flags = 0;

	if (len > 0 && line[len - 1] == '\r')
		len--;
	else
		flags |= SMTP_LINE_BARE_LF;
	if (len > 0 && memchr(line, '\r', len) != NULL)
		flags |= SMTP_LINE_BARE_CR;
	if (len > 0 && memchr(line, '\0', len) != NULL)
		flags |= SMTP_LINE_NUL;
	ev_set(ev, SMTP_EV_COMMAND, line, len);
	ev->flags = flags;
	return 1;
}

static int cmd_next(struct smtp_parser *p, const char *in, size_t len, size_t *used_r,
                    struct smtp_event *ev)
{
	size_t off = 0;

	for (;;) {
		if (p->discarding) {
			const char *lf = memchr(in + off, '\n', len - off);

			if (lf == NULL) {
				*used_r = len;
				return 0;
			}
			p->discarding = false;
			*used_r = (size_t)(lf + 1 - in);
			ev_set(ev, SMTP_EV_COMMAND_TOO_LONG, NULL, 0);
			return 1;
		}

		/* The LF must be at most the max_command_line-th octet of the line. */
		size_t room = p->lim->max_command_line - p->hold;
		size_t avail = len - off;
		const char *lf = memchr(in + off, '\n', MIN(avail, room));

		if (lf != NULL) {
			size_t n = (size_t)(lf - (in + off));

			*used_r = off + n + 1;
			if (likely(p->hold == 0))
				return cmd_emit(in + off, n, ev);
			memcpy(p->buf + p->hold, in + off, n);
			n += p->hold;
			p->hold = 0;
			return cmd_emit(p->buf, n, ev);
		}
		if (avail < room) {
			memcpy(p->buf + p->hold, in + off, avail);
			p->hold += avail;
			*used_r = len;
			return 0;
		}
		/* No LF within the limit: the line is too long whatever follows. */
		p->hold = 0;
		p->discarding = true;
		off += room;
	}
}

/* ---- DATA mode ---- */

/*
 * Returns the first octet in [q, end) that is CR or LF, or NUL or >= 0x80 while
 * the matching flag is not yet set in `flags`; end when there is none.
 */
static const unsigned char *data_scan(const unsigned char *q, const unsigned char *end,
                                      unsigned flags)
{
	const bool want_nul = !(flags & SMTP_BODY_NUL);
	const bool want_8bit = !(flags & SMTP_BODY_8BIT);

#if defined(__SSE2__)
	const __m128i cr = _mm_set1_epi8('\r');
	const __m128i lf = _mm_set1_epi8('\n');
	const __m128i nul_mask = want_nul ? _mm_set1_epi8(-1) : _mm_setzero_si128();
	const unsigned hi_mask = want_8bit ? 0xffffu : 0u;

	while (end - q >= 16) {
		__m128i v = _mm_loadu_si128((const __m128i *)(const void *)q);
		__m128i m = _mm_or_si128(_mm_cmpeq_epi8(v, cr), _mm_cmpeq_epi8(v, lf));

		m = _mm_or_si128(m,
		                 _mm_and_si128(_mm_cmpeq_epi8(v, _mm_setzero_si128()), nul_mask));
		unsigned bits =
		    (unsigned)_mm_movemask_epi8(m) | ((unsigned)_mm_movemask_epi8(v) & hi_mask);
		if (bits != 0)
			return q + __builtin_ctz(bits);
		q += 16;
	}
#else
	/* SWAR: a byte of zero_bytes(x) has its top bit set where x has a zero byte (exact for the
	 * lowest one, which is all we use). */
	const uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
	const uint64_t nul_mask = want_nul ? ~0ull : 0, hi_mask = want_8bit ? highs : 0;
#define ZERO_BYTES(x) (((x)-ones) & ~(x)&highs)

	while (end - q >= 8) {
		uint64_t w;

		memcpy(&w, q, 8);
		uint64_t x = w ^ (ones * '\r'), y = w ^ (ones * '\n');
		uint64_t m =
		    ZERO_BYTES(x) | ZERO_BYTES(y) | (ZERO_BYTES(w) & nul_mask) | (w & hi_mask);
		if (m != 0) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
			return q + (__builtin_ctzll(m) >> 3);
#else
			break; /* the byte loop below finds it */
#endif
		}
		q += 8;
	}
#undef ZERO_BYTES
#endif
	for (; q < end; q++) {
		unsigned c = *q;

		if (c == '\r' || c == '\n' || (c == 0 && want_nul) || (c >= 0x80 && want_8bit))
			return q;
	}
	return end;
}

static int data_end(struct smtp_parser *p, size_t used, size_t *used_r, struct smtp_event *ev)
{
	ev_set(ev, SMTP_EV_DATA_END, NULL, 0);
	ev->flags = p->flags;
	ev->size = p->size;
	*used_r = used;
	smtp_parser_reset(p);
	return 1;
}

static int data_next(struct smtp_parser *p, const char *in, size_t len, size_t *used_r,
                     struct smtp_event *ev)
{
	const unsigned char *const s = (const unsigned char *)in, *const end = s + len;
	const unsigned char *q = s;
	const size_t max = p->lim->max_text_line;

	if (len == 0) {
		*used_r = 0;
		return 0;
	}
	/* Settle the octets that are not body until the next one is known. */
	for (;;) {
		if (q == end) {
			*used_r = len;
			return 0;
		}
		if (p->state == D_BOL && *q == '.') {
			p->state = D_DOT;
			q++;
		} else if (p->state == D_DOT) {
			if (*q != '\r') {
				p->state = D_MID; /* the "." was stuffing */
				break;
			}
			p->state = D_DOTCR;
			q++;
		} else if (p->state == D_DOTCR) {
			if (*q == '\n')
				return data_end(p, (size_t)(q + 1 - s), used_r, ev);
			/* CRLF "." CR x: the "." was stuffing, the CR is a bare one. */
			p->state = D_MID;
			p->flags |= SMTP_BODY_BARE_CR;
			p->line_len += 1;
			if (max != 0 && p->line_len > max)
				p->flags |= SMTP_BODY_LONG_LINE;
			p->size += 1;
			*used_r = (size_t)(q - s);
			ev_set(ev, SMTP_EV_BODY, held_cr, 1);
			return 1;
		} else {
			break;
		}
	}

	/* One slice [start, ...) up to the end of the input or a line-initial ".". */
	const unsigned char *const start = q;
	const unsigned char *ls = q; /* where the current line starts in this input */
	size_t carry = p->line_len;  /* octets of the current line yielded before ls */
	unsigned flags = p->flags;
	unsigned st = D_MID;
	bool crlf = false;

	if (p->state == D_CR) {
		if (*q == '\n') {
			q++;
			crlf = true;
		} else {
			flags |= SMTP_BODY_BARE_CR;
		}
	}
	for (;;) {
		if (crlf) {
			crlf = false;
			if (max != 0 && carry + (size_t)(q - ls) > max)
				flags |= SMTP_BODY_LONG_LINE;
			carry = 0;
			ls = q;
			if (q == end) {
				st = D_BOL;
				break;
			}
			if (*q == '.') {
				/* Cut before the ".", which is consumed but never yielded. */
				p->flags = flags;
				p->state = D_DOT;
				p->line_len = 0;
				p->size += (uint64_t)(q - start);
				*used_r = (size_t)(q + 1 - s);
				ev_set(ev, SMTP_EV_BODY, start, (size_t)(q - start));
				return 1;
			}
		}
		q = data_scan(q, end, flags);
		if (q == end)
			break;
		switch (*q) {
		case '\r':
			if (q + 1 == end) {
				q = end;
				st = D_CR;
				goto out;
			}
			if (q[1] == '\n') {
				q += 2;
				crlf = true;
			} else {
				flags |= SMTP_BODY_BARE_CR;
				q++;
			}
			break;
		case '\n':
			/* A CR LF is consumed by the case above: this LF is bare. */
			flags |= SMTP_BODY_BARE_LF;
			q++;
			if (max != 0 && carry + (size_t)(q - ls) > max)
				flags |= SMTP_BODY_LONG_LINE;
			carry = 0;
			ls = q;
			break;
		case '\0':
			flags |= SMTP_BODY_NUL;
			q++;
			break;
		default:
			flags |= SMTP_BODY_8BIT;
			q++;
			break;
		}
	}
out:
	carry += (size_t)(end - ls);
	if (max != 0 && carry > max)
		flags |= SMTP_BODY_LONG_LINE;
	p->line_len = carry;
	p->flags = flags;
	p->state = st;
	p->size += (uint64_t)(end - start);
	*used_r = len;
	ev_set(ev, SMTP_EV_BODY, start, (size_t)(end - start));
	return 1;
}

/* ---- BDAT mode ---- */

static int bdat_next(struct smtp_parser *p, const char *in, size_t len, size_t *used_r,
                     struct smtp_event *ev)
{
	if (p->remaining == 0) {
		ev_set(ev, SMTP_EV_BDAT_END, NULL, 0);
		ev->size = p->size;
		*used_r = 0;
		smtp_parser_reset(p);
		return 1;
	}
	if (len == 0) {
		*used_r = 0;
		return 0;
	}
	size_t n = p->remaining < len ? (size_t)p->remaining : len;

	p->remaining -= n;
	p->size += n;
	*used_r = n;
	ev_set(ev, SMTP_EV_BODY, in, n);
	return 1;
}

int smtp_parser_next(struct smtp_parser *p, const char *in, size_t len, size_t *used_r,
                     struct smtp_event *ev)
{
	switch (p->mode) {
	case SMTP_MODE_DATA:
		return data_next(p, in, len, used_r, ev);
	case SMTP_MODE_BDAT:
		return bdat_next(p, in, len, used_r, ev);
	case SMTP_MODE_COMMAND:
	default:
		if (len == 0) {
			*used_r = 0;
			return 0;
		}
		return cmd_next(p, in, len, used_r, ev);
	}
}

/* ---- command lines ---- */

typedef const unsigned char *cursor;

static const char *const verb_names[SMTP_VERB_COUNT] = {
    [SMTP_VERB_UNKNOWN] = "UNKNOWN", [SMTP_VERB_HELO] = "HELO",         [SMTP_VERB_EHLO] = "EHLO",
    [SMTP_VERB_MAIL] = "MAIL",       [SMTP_VERB_RCPT] = "RCPT",         [SMTP_VERB_DATA] = "DATA",
    [SMTP_VERB_BDAT] = "BDAT",       [SMTP_VERB_RSET] = "RSET",         [SMTP_VERB_NOOP] = "NOOP",
    [SMTP_VERB_QUIT] = "QUIT",       [SMTP_VERB_VRFY] = "VRFY",         [SMTP_VERB_EXPN] = "EXPN",
    [SMTP_VERB_HELP] = "HELP",       [SMTP_VERB_STARTTLS] = "STARTTLS", [SMTP_VERB_AUTH] = "AUTH",
};

const char *smtp_verb_name(enum smtp_verb verb)
{
	if ((unsigned)verb >= SMTP_VERB_COUNT)
		return verb_names[SMTP_VERB_UNKNOWN];
	return verb_names[verb];
}

static bool is_alpha(unsigned c)
{
	return (c | 0x20) >= 'a' && (c | 0x20) <= 'z';
}

static bool is_digit(unsigned c)
{
	return c >= '0' && c <= '9';
}

static bool is_hex(unsigned c)
{
	return is_digit(c) || ((c | 0x20) >= 'a' && (c | 0x20) <= 'f');
}

/* RFC 5321 atext, with RFC 6531 UTF8-non-ascii octets. */
static bool is_atext(unsigned c)
{
	return is_alpha(c) || is_digit(c) || c >= 0x80 ||
	       (c != 0 && strchr("!#$%&'*+-/=?^_`{|}~", (int)c) != NULL);
}

/* Let-dig, with the octets of RFC 6531 U-labels. */
static bool is_letdig(unsigned c)
{
	return is_alpha(c) || is_digit(c) || c >= 0x80;
}

/* True when `a` (n octets) equals the lower-case ASCII word `w`, ignoring case. */
static bool ci_eq(cursor a, size_t n, const char *w)
{
	for (size_t i = 0; i < n; i++) {
		if (w[i] == '\0' || (a[i] | 0x20) != (unsigned char)w[i])
			return false;
	}
	return w[n] == '\0';
}

static bool ci_prefix(cursor a, cursor end, const char *w)
{
	size_t n = strlen(w);

	return (size_t)(end - a) >= n && ci_eq(a, n, w);
}

static enum smtp_verb verb_lookup(cursor v, size_t n)
{
	static const char *const lower[SMTP_VERB_COUNT] = {
	    [SMTP_VERB_HELO] = "helo",         [SMTP_VERB_EHLO] = "ehlo", [SMTP_VERB_MAIL] = "mail",
	    [SMTP_VERB_RCPT] = "rcpt",         [SMTP_VERB_DATA] = "data", [SMTP_VERB_BDAT] = "bdat",
	    [SMTP_VERB_RSET] = "rset",         [SMTP_VERB_NOOP] = "noop", [SMTP_VERB_QUIT] = "quit",
	    [SMTP_VERB_VRFY] = "vrfy",         [SMTP_VERB_EXPN] = "expn", [SMTP_VERB_HELP] = "help",
	    [SMTP_VERB_STARTTLS] = "starttls", [SMTP_VERB_AUTH] = "auth",
	};

	if (n != 4 && n != 8)
		return SMTP_VERB_UNKNOWN;
	for (unsigned i = 1; i < SMTP_VERB_COUNT; i++) {
		if (ci_eq(v, n, lower[i]))
			return (enum smtp_verb)i;
	}
	return SMTP_VERB_UNKNOWN;
}

/* Well-formed UTF-8 (no overlongs, surrogates or code points over U+10FFFF). */
static bool utf8_valid(cursor s, cursor end)
{
	while (s < end) {
		unsigned c = *s;
		size_t n;
		unsigned lo = 0x80, hi = 0xbf; /* range of the second octet */

		if (c < 0x80) {
			s++;
			continue;
		}
		if (c >= 0xc2 && c <= 0xdf) {
			n = 1;
		} else if (c >= 0xe0 && c <= 0xef) {
			n = 2;
			if (c == 0xe0)
				lo = 0xa0;
			else if (c == 0xed)
				hi = 0x9f;
		} else if (c >= 0xf0 && c <= 0xf4) {
			n = 3;
			if (c == 0xf0)
				lo = 0x90;
			else if (c == 0xf4)
				hi = 0x8f;
		} else {
			return false;
		}
		if ((size_t)(end - s) <= n || s[1] < lo || s[1] > hi)
			return false;
		for (size_t i = 2; i <= n; i++) {
			if (s[i] < 0x80 || s[i] > 0xbf)
				return false;
		}
		s += n + 1;
	}
	return true;
}

/* Domain = sub-domain *("." sub-domain), sub-domain = Let-dig [Ldh-str]. Returns its end or NULL.
 */
static cursor parse_domain(cursor s, cursor end)
{
	for (;;) {
		if (s == end || !is_letdig(*s))
			return NULL;
		while (s < end && (is_letdig(*s) || *s == '-'))
			s++;
		if (s[-1] == '-')
			return NULL;
		if (s == end || *s != '.')
			return s;
		s++;
	}
}

/* Snum 3("." Snum), all of [s, end). */
static bool parse_ipv4(cursor s, cursor end)
{
	for (int i = 0; i < 4; i++) {
		unsigned v = 0, n = 0;

		if (i > 0) {
			if (s == end || *s != '.')
				return false;
			s++;
		}
		while (s < end && is_digit(*s) && n < 3) {
			v = v * 10 + (*s++ - '0');
			n++;
		}
		if (n == 0 || v > 255)
			return false;
	}
	return s == end;
}

/* IPv6-addr of RFC 5321 4.1.3, all of [s, end). "::" stands for at least two groups. */
static bool parse_ipv6(cursor s, cursor end)
{
	unsigned groups = 0;
	bool comp = false;

	if (end - s >= 2 && s[0] == ':' && s[1] == ':') {
		comp = true;
		s += 2;
		if (s == end)
			return true;
	}
	for (;;) {
		cursor colon = memchr(s, ':', (size_t)(end - s));
		cursor gend = colon != NULL ? colon : end;

		if (colon == NULL && memchr(s, '.', (size_t)(end - s)) != NULL) {
			if (!parse_ipv4(s, end))
				return false;
			groups += 2;
			break;
		}
		if (gend == s || gend - s > 4)
			return false;
		for (cursor c = s; c < gend; c++) {
			if (!is_hex(*c))
				return false;
		}
		groups++;
		s = gend;
		if (s == end)
			break;
		s++; /* ":" */
		if (s < end && *s == ':') {
			if (comp)
				return false;
			comp = true;
			s++;
			if (s == end)
				break;
		} else if (s == end) {
			return false;
		}
	}
	return comp ? groups <= 6 : groups == 8;
}

/* address-literal "[" ... "]" at s. Returns the end after "]" or NULL. */
static cursor parse_literal(cursor s, cursor end)
{
	cursor close = memchr(s, ']', (size_t)(end - s));

	if (close == NULL)
		return NULL;
	s++;
	if (ci_prefix(s, close, "ipv6:")) {
		if (!parse_ipv6(s + 5, close))
			return NULL;
	} else if (!parse_ipv4(s, close)) {
		return NULL;
	}
	return close + 1;
}

/* Local-part = Dot-string / Quoted-string. Returns its end or NULL. */
static cursor parse_local(cursor s, cursor end)
{
	if (s < end && *s == '"') {
		for (s++; s < end; s++) {
			unsigned c = *s;

			if (c == '"')
				return s + 1;
			if (c == '\\') {
				if (++s == end || *s < 32 || *s > 126)
					return NULL;
			} else if (c < 32 || c == 127) {
				return NULL;
			}
		}
		return NULL;
	}
	for (;;) {
		cursor a = s;

		while (s < end && is_atext(*s))
			s++;
		if (s == a)
			return NULL;
		if (s == end || *s != '.')
			return s;
		s++;
	}
}

/*
 * Path at [s, end): "<" [A-d-l ":"] Mailbox ">", "<>" (MAIL) or "<postmaster>" (RCPT).
 * Sets the address fields of cmd and *next_r (after ">").
 */
static enum smtp_cmd_error parse_path(cursor s, cursor end, bool mail,
                                      const struct smtp_limits *lim, struct smtp_command *cmd,
                                      cursor *next_r)
{
	cursor path = s, q, local, local_end, dom, gt;

	if (s == end || *s != '<')
		return SMTP_CMD_E_ADDRESS;
	q = s + 1;
	if (mail && q < end && *q == '>') {
		cmd->addr = (const char *)q;
		*next_r = q + 1;
		return SMTP_CMD_OK;
	}
	/* A source route is checked and dropped. */
	bool route = q < end && *q == '@';
	while (q < end && *q == '@') {
		q = parse_domain(q + 1, end);
		if (q == NULL || q == end || (*q != ',' && *q != ':'))
			return SMTP_CMD_E_ADDRESS;
		if (*q++ == ':')
			break;
		if (q == end || *q != '@')
			return SMTP_CMD_E_ADDRESS;
	}
	local = q;
	local_end = parse_local(q, end);
	if (local_end == NULL || local_end == end)
		return SMTP_CMD_E_ADDRESS;
	if (*local_end == '@') {
		dom = local_end + 1;
		if (dom < end && *dom == '[')
			gt = parse_literal(dom, end);
		else
			gt = parse_domain(dom, end);
		if (gt == NULL)
			return SMTP_CMD_E_ADDRESS;
	} else if (!mail && !route && ci_eq(local, (size_t)(local_end - local), "postmaster")) {
		dom = gt = local_end;
	} else {
		return SMTP_CMD_E_ADDRESS;
	}
	if (gt == end || *gt != '>')
		return SMTP_CMD_E_ADDRESS;

	if ((size_t)(local_end - local) > lim->max_local_part ||
	    (dom != gt && (size_t)(gt - dom) > lim->max_domain) ||
	    (size_t)(gt + 1 - path) > lim->max_path)
		return SMTP_CMD_E_PATH_TOO_LONG;
	for (cursor c = local; c < gt; c++) {
		if (*c >= 0x80) {
			if (!utf8_valid(c, gt))
				return SMTP_CMD_E_ADDRESS;
			cmd->addr_utf8 = true;
			break;
		}
	}
	cmd->addr = (const char *)local;
	cmd->addr_len = (size_t)(gt - local);
	cmd->local_len = (size_t)(local_end - local);
	*next_r = gt + 1;
	return SMTP_CMD_OK;
}

/* Mail-parameters: *(SP esmtp-param), esmtp-param = keyword ["=" value]. */
static enum smtp_cmd_error parse_params(cursor s, cursor end, struct smtp_command *cmd)
{
	while (s < end) {
		if (*s != ' ')
			return SMTP_CMD_E_SYNTAX;
		while (s < end && *s == ' ')
			s++;
		if (s == end)
			break;

		cursor key = s;

		if (!is_alpha(*s) && !is_digit(*s))
			return SMTP_CMD_E_SYNTAX;
		while (s < end && (is_alpha(*s) || is_digit(*s) || *s == '-'))
			s++;

		cursor key_end = s, value = NULL;

		if (s < end && *s == '=') {
			value = ++s;
			/* esmtp-value: %d33-60 / %d62-126, and UTF8-non-ascii (RFC 6531). */
			while (s<end && * s> 32 && *s != '=' && *s != 127)
				s++;
			if (s == value)
				return SMTP_CMD_E_SYNTAX;
		}
		if (s < end && *s != ' ')
			return SMTP_CMD_E_SYNTAX;
		if (cmd->nparams == SMTP_MAX_PARAMS)
			return SMTP_CMD_E_TOO_MANY_PARAMS;

		struct smtp_param *prm = &cmd->params[cmd->nparams++];

		prm->key = (const char *)key;
		prm->key_len = (size_t)(key_end - key);
		prm->value = (const char *)value;
		prm->value_len = value != NULL ? (size_t)(s - value) : 0;
	}
	return SMTP_CMD_OK;
}

/* "MAIL FROM:" / "RCPT TO:" with 0 or more SP, then a path and parameters. */
static enum smtp_cmd_error parse_mail_rcpt(cursor s, cursor end, bool mail,
                                           const struct smtp_limits *lim, struct smtp_command *cmd)
{
	const char *word = mail ? "from:" : "to:";
	enum smtp_cmd_error err;

	while (s < end && *s == ' ')
		s++;
	if (!ci_prefix(s, end, word))
		return SMTP_CMD_E_SYNTAX;
	s += strlen(word);
	while (s < end && *s == ' ')
		s++;
	err = parse_path(s, end, mail, lim, cmd, &s);
	if (err != SMTP_CMD_OK)
		return err;
	return parse_params(s, end, cmd);
}

/* chunk-size [SP "LAST"], size <= 2^63. */
static enum smtp_cmd_error parse_bdat(cursor s, cursor end, struct smtp_command *cmd)
{
	uint64_t v = 0;
	cursor digits = s;

	for (; s < end && is_digit(*s); s++) {
		unsigned d = *s - '0';

		if (v > (UINT64_C(1) << 63) / 10)
			return SMTP_CMD_E_SYNTAX;
		v = v * 10 + d;
		if (v > UINT64_C(1) << 63)
			return SMTP_CMD_E_SYNTAX;
	}
	if (s == digits)
		return SMTP_CMD_E_SYNTAX;
	cmd->bdat_size = v;
	if (s == end)
		return SMTP_CMD_OK;
	if (*s != ' ')
		return SMTP_CMD_E_SYNTAX;
	while (s < end && *s == ' ')
		s++;
	if (!ci_eq(s, (size_t)(end - s), "last"))
		return SMTP_CMD_E_SYNTAX;
	cmd->bdat_last = true;
	return SMTP_CMD_OK;
}

enum smtp_cmd_error smtp_command_parse(const char *line, size_t len, const struct smtp_limits *lim,
                                       struct smtp_command *cmd)
{
	cursor s = (cursor)line, end = s + len, v;

	cmd->verb = SMTP_VERB_UNKNOWN;
	cmd->arg = NULL;
	cmd->arg_len = 0;
	cmd->addr = NULL;
	cmd->addr_len = 0;
	cmd->local_len = 0;
	cmd->addr_utf8 = false;
	cmd->nparams = 0;
	cmd->bdat_size = 0;
	cmd->bdat_last = false;

	while (end > s && (end[-1] == ' ' || end[-1] == '\t'))
		end--;
	for (v = s; v < end && *v != ' '; v++)
		;
	cmd->verb = verb_lookup(s, (size_t)(v - s));
	if (v < end)
		v++;
	cmd->arg = (const char *)v;
	cmd->arg_len = (size_t)(end - v);

	switch (cmd->verb) {
	case SMTP_VERB_UNKNOWN:
		return SMTP_CMD_E_UNKNOWN;
	case SMTP_VERB_MAIL:
	case SMTP_VERB_RCPT:
		if (cmd->arg_len == 0)
			return SMTP_CMD_E_NO_ARG;
		return parse_mail_rcpt(v, end, cmd->verb == SMTP_VERB_MAIL, lim, cmd);
	case SMTP_VERB_BDAT:
		if (cmd->arg_len == 0)
			return SMTP_CMD_E_NO_ARG;
		return parse_bdat(v, end, cmd);
	case SMTP_VERB_HELO:
	case SMTP_VERB_EHLO:
	case SMTP_VERB_VRFY:
	case SMTP_VERB_EXPN:
	case SMTP_VERB_AUTH:
		return cmd->arg_len == 0 ? SMTP_CMD_E_NO_ARG : SMTP_CMD_OK;
	case SMTP_VERB_DATA:
	case SMTP_VERB_RSET:
	case SMTP_VERB_QUIT:
	case SMTP_VERB_STARTTLS:
		return cmd->arg_len == 0 ? SMTP_CMD_OK : SMTP_CMD_E_UNEXPECTED_ARG;
	case SMTP_VERB_NOOP:
	case SMTP_VERB_HELP:
	default:
		return SMTP_CMD_OK;
	}
}

const struct smtp_param *smtp_command_param(const struct smtp_command *cmd, const char *key)
{
	size_t n = strlen(key);

	for (unsigned i = 0; i < cmd->nparams; i++) {
		const struct smtp_param *prm = &cmd->params[i];

		if (prm->key_len == n && strncasecmp(prm->key, key, n) == 0)
			return prm;
	}
	return NULL;
}
