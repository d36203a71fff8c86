/* Delivery status notifications: see dsn.h for the message built and the contract. */
#include "mta/relay/dsn.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/compiler.h"

#define LINE_MAX_OCTETS 998u /* RFC 5322 2.1.1, without CRLF */
#define FOLD_AT         78u  /* preferred line length when folding */
#define HOST_MAX        255u
#define QID_MAX         64u
#define BOUNDARY_TRIES  64u

/* ---- an output buffer with a sticky error and a hard size bound ---- */

struct sb {
	char *p;
	size_t len, cap;
	int err; /* 0, -ENOMEM or -EMSGSIZE; once set, writes are dropped */
};

static void sb_put(struct sb *b, const void *s, size_t n)
{
	if (b->err || n == 0)
		return;
	if (n > DSN_OUT_MAX - b->len) {
		b->err = -EMSGSIZE;
		return;
	}
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 1024;
		while (cap < b->len + n + 1)
			cap *= 2;
		char *p = realloc(b->p, cap);
		if (!p) {
			b->err = -ENOMEM;
			return;
		}
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = '\0';
}

static void sb_puts(struct sb *b, const char *s)
{
	sb_put(b, s, strlen(s));
}

static void sb_putc(struct sb *b, char c)
{
	sb_put(b, &c, 1);
}

/* Only for short, bounded formats (numbers, dates, host names). */
printf_like(2, 3) static void sb_printf(struct sb *b, const char *fmt, ...)
{
	char tmp[1200];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof(tmp)) {
		if (!b->err)
			b->err = -EMSGSIZE;
		return;
	}
	sb_put(b, tmp, (size_t)n);
}

static void sb_free(struct sb *b)
{
	free(b->p);
	b->p = NULL;
	b->len = b->cap = 0;
}

/* ---- character classes ---- */

static bool is_ctl(unsigned char c)
{
	return c < 0x20 || c == 0x7f;
}

/* Length of the valid UTF-8 sequence at s (2..4), or 0 if s[0] does not start one. */
static size_t utf8_seq(const unsigned char *s, size_t n, uint32_t *cp_r)
{
	unsigned char c = s[0];
	size_t len;
	uint32_t cp, min;
	if (c >= 0xc2 && c <= 0xdf) {
		len = 2, cp = c & 0x1f, min = 0x80;
	} else if (c >= 0xe0 && c <= 0xef) {
		len = 3, cp = c & 0x0f, min = 0x800;
	} else if (c >= 0xf0 && c <= 0xf4) {
		len = 4, cp = c & 0x07, min = 0x10000;
	} else {
		return 0;
	}
	if (n < len)
		return 0;
	for (size_t i = 1; i < len; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		cp = cp << 6 | (s[i] & 0x3f);
	}
	if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
		return 0;
	if (cp_r)
		*cp_r = cp;
	return len;
}

static bool has_8bit(const char *s, size_t n)
{
	if (!s)
		return false;
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)s[i] & 0x80)
			return true;
	return false;
}

static bool is_hostname(const char *s)
{
	size_t n = s ? strlen(s) : 0;
	if (n == 0 || n > HOST_MAX)
		return false;
	if (s[0] == '[') { /* an address literal, as a Remote-MTA may be */
		if (n < 3 || s[n - 1] != ']')
			return false;
		for (size_t i = 1; i + 1 < n; i++) {
			char c = s[i];
			if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') ||
			      (c >= 'A' && c <= 'Z') || c == '.' || c == ':' || c == '-'))
				return false;
		}
		return true;
	}
	for (size_t i = 0; i < n; i++) {
		char c = s[i];
		if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		      c == '.' || c == '-' || c == '_'))
			return false;
	}
	return true;
}

static bool is_queue_id(const char *s)
{
	size_t n = s ? strlen(s) : 0;
	if (n == 0 || n > QID_MAX)
		return false;
	for (size_t i = 0; i < n; i++) {
		char c = s[i];
		if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		      c == '.' || c == '-' || c == '_'))
			return false;
	}
	return true;
}

/* An address as the envelope carries it: bounded, no controls, 8-bit only if allowed. */
static bool addr_ok(const char *s, size_t n, bool allow_8bit)
{
	if (n == 0 || n > DSN_ADDR_MAX || !s)
		return false;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (is_ctl(c) || (c & 0x80 && !allow_8bit))
			return false;
	}
	return true;
}

/* "d.ddd.ddd" with class 2, 4 or 5 (RFC 3463). */
static bool is_status(const char *s)
{
	if (!s || (s[0] != '2' && s[0] != '4' && s[0] != '5') || s[1] != '.')
		return false;
	s += 2;
	for (int part = 0; part < 2; part++) {
		size_t d = 0;
		while (*s >= '0' && *s <= '9' && d < 4)
			s++, d++;
		if (d == 0 || d > 3)
			return false;
		if (part == 0 && *s++ != '.')
			return false;
	}
	return *s == '\0';
}

/* ---- untrusted text ---- */

/*
 * Appends s as one line of printable text: controls (CR, LF, NUL, TAB...)
 * become spaces, runs of spaces collapse, ends are trimmed; 8-bit octets stay
 * only as valid UTF-8 when utf8, else each becomes '?'. At most max octets
 * are appended ("..." ends a cut text, within max).
 */
static void put_sanitised(struct sb *b, const char *s, size_t n, bool utf8, size_t max)
{
	const unsigned char *u = (const unsigned char *)s;
	size_t start = b->len, i = 0;
	bool space = false, cut = false;
	while (i < n) {
		size_t step = 1;
		const char *piece;
		char one;
		unsigned char c = u[i];
		if (is_ctl(c) || c == ' ') {
			space = b->len > start;
			i++;
			continue;
		}
		if (c & 0x80) {
			size_t l = utf8 ? utf8_seq(u + i, n - i, NULL) : 0;
			if (l) {
				step = l;
				piece = s + i;
			} else {
				one = '?';
				piece = &one;
			}
		} else {
			one = (char)c;
			piece = &one;
		}
		size_t plen = piece == &one ? 1 : step;
		if (b->len - start + space + plen > max - 3) {
			cut = true;
			break;
		}
		if (space)
			sb_putc(b, ' ');
		space = false;
		sb_put(b, piece, plen);
		i += step;
	}
	if (cut)
		sb_puts(b, "...");
}

/*
 * Decodes RFC 3461 xtext ("+HH" is the octet 0xHH) into dst (capacity cap).
 * Returns the decoded length, or (size_t)-1 when the result would not fit or
 * is not printable text (controls, or 8-bit unless utf8 and valid UTF-8).
 */
static size_t xtext_decode(const char *s, size_t n, bool utf8, char *dst, size_t cap)
{
	size_t o = 0;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '+' && n - i > 2) {
			int v = 0;
			bool ok = true;
			for (int k = 1; k <= 2; k++) {
				char h = s[i + (size_t)k];
				v <<= 4;
				if (h >= '0' && h <= '9')
					v |= h - '0';
				else if (h >= 'A' && h <= 'F')
					v |= h - 'A' + 10;
				else if (h >= 'a' && h <= 'f')
					v |= h - 'a' + 10;
				else
					ok = false;
			}
			if (ok) {
				c = (unsigned char)v;
				i += 2;
			}
		}
		if (o >= cap)
			return (size_t)-1;
		dst[o++] = (char)c;
	}
	for (size_t i = 0; i < o;) {
		unsigned char c = (unsigned char)dst[i];
		if (is_ctl(c))
			return (size_t)-1;
		if (c & 0x80) {
			size_t l = utf8 ? utf8_seq((const unsigned char *)dst + i, o - i, NULL) : 0;
			if (!l)
				return (size_t)-1;
			i += l;
		} else {
			i++;
		}
	}
	return o;
}

/*
 * Appends "prefix" + text as header-style lines: folded at spaces before
 * FOLD_AT where possible, continuation lines start with indent, no line over
 * LINE_MAX_OCTETS (a word longer than that is split, never inside a UTF-8
 * sequence). text has single spaces and no controls (put_sanitised output).
 */
static void put_folded(struct sb *b, const char *prefix, const char *text, size_t n,
                       const char *indent)
{
	size_t col = strlen(prefix), ilen = strlen(indent);
	bool line_has_word = false;
	sb_puts(b, prefix);
	size_t i = 0;
	while (i < n) {
		size_t w = i;
		while (w < n && text[w] != ' ')
			w++;
		size_t wlen = w - i;
		if (line_has_word && col + 1 + wlen > FOLD_AT) {
			sb_puts(b, "\r\n");
			sb_puts(b, indent);
			col = ilen;
			line_has_word = false;
		}
		if (line_has_word) {
			sb_putc(b, ' ');
			col++;
		}
		while (col + wlen > LINE_MAX_OCTETS) { /* a very long word: split it */
			size_t room = LINE_MAX_OCTETS - col;
			while (room > 0 && ((unsigned char)text[i + room] & 0xc0) == 0x80)
				room--;
			sb_put(b, text + i, room);
			sb_puts(b, "\r\n");
			sb_puts(b, indent);
			col = ilen;
			i += room;
			wlen -= room;
		}
		sb_put(b, text + i, wlen);
		col += wlen;
		line_has_word = true;
		i = w < n ? w + 1 : w;
	}
	sb_puts(b, "\r\n");
}

/* Sanitises untrusted text, then writes it folded after prefix. */
static void put_untrusted_field(struct sb *b, const char *prefix, const char *s, size_t n,
                                bool utf8, size_t max, const char *indent)
{
	struct sb t = {0};
	put_sanitised(&t, s, n, utf8, max);
	if (t.err) {
		if (!b->err)
			b->err = t.err;
	} else {
		put_folded(b, prefix, t.p ? t.p : "", t.len, indent);
	}
	sb_free(&t);
}

/*
 * An address as an RFC 3464 address-type; address pair. ASCII: "rfc822; a".
 * 8-bit (RFC 6533): "utf-8; " + the address with '+', '=', '\', SP and (when
 * !raw_utf8, i.e. outside message/global-delivery-status) every non-ASCII
 * character written as \x{HEX}; invalid UTF-8 octets as \x{HH}.
 */
static void put_addr_value(struct sb *b, const char *a, size_t n, bool raw_utf8)
{
	if (!has_8bit(a, n)) {
		sb_puts(b, "rfc822; ");
		sb_put(b, a, n);
		return;
	}
	sb_puts(b, "utf-8; ");
	const unsigned char *u = (const unsigned char *)a;
	for (size_t i = 0; i < n;) {
		unsigned char c = u[i];
		uint32_t cp;
		size_t l = 1;
		if (c & 0x80) {
			l = utf8_seq(u + i, n - i, &cp);
			if (l && raw_utf8) {
				sb_put(b, a + i, l);
				i += l;
				continue;
			}
			if (!l) {
				l = 1;
				cp = c;
			}
			sb_printf(b, "\\x{%X}", (unsigned)cp);
		} else if (c == '+' || c == '=' || c == '\\' || c == ' ') {
			sb_printf(b, "\\x{%X}", (unsigned)c);
		} else {
			sb_putc(b, (char)c);
		}
		i += l;
	}
}

/* Whether the Final-Recipient value of this address fits one line. */
static int addr_value_fits(const char *a, size_t n, bool raw_utf8)
{
	struct sb t = {0};
	put_addr_value(&t, a, n, raw_utf8);
	int r = t.err ? t.err : t.len <= LINE_MAX_OCTETS - 32 ? 0 : -EINVAL;
	sb_free(&t);
	return r;
}

/* ---- dates ---- */

static void fmt_date(uint64_t ms, char out[40])
{
	static const char *const wd[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
	static const char *const mo[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
	                                 "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
	time_t t = (time_t)(ms / 1000);
	struct tm tm;
	if (!gmtime_r(&t, &tm) || tm.tm_year + 1900 > 9999) {
		t = 0;
		gmtime_r(&t, &tm);
	}
	snprintf(out, 40, "%s, %02d %s %04d %02d:%02d:%02d +0000", wd[tm.tm_wday % 7], tm.tm_mday,
	         mo[tm.tm_mon % 12], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

/* ---- policy ---- */

bool dsn_rcpt_wants(unsigned notify, enum dsn_action a)
{
	if (notify & DSN_NOTIFY_NEVER)
		return false;
	if (notify == 0)
		notify = DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY;
	switch (a) {
	case DSN_ACTION_FAILED:
		return notify & DSN_NOTIFY_FAILURE;
	case DSN_ACTION_DELAYED:
		return notify & DSN_NOTIFY_DELAY;
	case DSN_ACTION_DELIVERED:
	case DSN_ACTION_RELAYED:
	case DSN_ACTION_EXPANDED:
		return notify & DSN_NOTIFY_SUCCESS;
	}
	return false;
}

bool dsn_should_send(const char *sender, size_t sender_len, const struct dsn_rcpt *rcpts,
                     unsigned n)
{
	if (!sender || sender_len == 0 || !rcpts)
		return false;
	for (unsigned i = 0; i < n; i++)
		if (dsn_rcpt_wants(rcpts[i].notify, rcpts[i].action))
			return true;
	return false;
}

static const char *action_name(enum dsn_action a)
{
	switch (a) {
	case DSN_ACTION_FAILED:
		return "failed";
	case DSN_ACTION_DELAYED:
		return "delayed";
	case DSN_ACTION_DELIVERED:
		return "delivered";
	case DSN_ACTION_RELAYED:
		return "relayed";
	case DSN_ACTION_EXPANDED:
		return "expanded";
	}
	return "failed";
}

static const char *rcpt_status(const struct dsn_rcpt *r)
{
	/* a delay is transient by definition (RFC 3464 2.3.4): a 4.x.x status or none */
	if (is_status(r->status) && (r->action != DSN_ACTION_DELAYED || r->status[0] == '4'))
		return r->status;
	switch (r->action) {
	case DSN_ACTION_FAILED:
		return "5.0.0";
	case DSN_ACTION_DELAYED:
		return "4.0.0";
	default:
		return "2.0.0";
	}
}

/* ---- the returned content ---- */

/* One line of msg: [start, start + len), next is where the following line starts. */
struct line {
	size_t start, len, next;
};

static bool next_line(const uint8_t *msg, size_t n, size_t pos, struct line *l)
{
	if (pos >= n)
		return false;
	size_t e = pos;
	while (e < n && msg[e] != '\r' && msg[e] != '\n')
		e++;
	l->start = pos;
	l->len = e - pos;
	if (e < n && msg[e] == '\r' && e + 1 < n && msg[e + 1] == '\n')
		l->next = e + 2;
	else
		l->next = e < n ? e + 1 : e;
	return true;
}

static bool line_ok(const uint8_t *msg, const struct line *l)
{
	return l->len <= LINE_MAX_OCTETS && !memchr(msg + l->start, '\0', l->len);
}

/* Whether the whole message can be returned as message/rfc822 as it is. */
static bool full_ok(const uint8_t *msg, size_t n)
{
	struct line l;
	for (size_t pos = 0; next_line(msg, n, pos, &l); pos = l.next)
		if (!line_ok(msg, &l))
			return false;
	return true;
}

static void put_full(struct sb *b, const uint8_t *msg, size_t n)
{
	struct line l;
	for (size_t pos = 0; next_line(msg, n, pos, &l); pos = l.next) {
		sb_put(b, msg + l.start, l.len);
		sb_puts(b, "\r\n");
	}
}

/*
 * The header section, field by field, leaving out fields with a line over
 * the limit or a NUL, and stopping before the section would pass max.
 */
static void put_headers(struct sb *b, const uint8_t *msg, size_t n, size_t max)
{
	struct line l;
	size_t pos = 0, written = 0;
	bool more = next_line(msg, n, pos, &l);
	while (more && l.len > 0) {
		/* a field: this line and the continuation lines after it */
		size_t fstart = l.start, fend, flen = 0;
		bool ok = true;
		do {
			ok = ok && line_ok(msg, &l);
			flen += l.len + 2;
			fend = l.next;
			more = next_line(msg, n, l.next, &l);
		} while (more && l.len > 0 && (msg[l.start] == ' ' || msg[l.start] == '\t'));
		if (!ok)
			continue;
		if (flen > max - written)
			break;
		struct line fl;
		for (size_t p = fstart; p < fend && next_line(msg, fend, p, &fl); p = fl.next) {
			sb_put(b, msg + fl.start, fl.len);
			sb_puts(b, "\r\n");
		}
		written += flen;
	}
}

/* ---- the parts ---- */

struct ctx {
	const struct dsn_message *m;
	const struct dsn_rcpt *r;
	unsigned n;
	bool global;  /* RFC 6533 variant */
	bool failed;  /* at least one listed recipient failed */
	bool delayed; /* ... was delayed */
	bool success; /* ... was delivered, relayed or expanded */
	bool full;    /* part 3 is the whole message */
	bool has_part3;
};

static void part_text(struct sb *b, const struct ctx *c)
{
	const struct dsn_message *m = c->m;
	char date[40];
	sb_printf(b, "Content-Type: text/plain; charset=%s\r\n", c->global ? "utf-8" : "us-ascii");
	sb_printf(b, "Content-Transfer-Encoding: %s\r\n", c->global ? "8bit" : "7bit");
	sb_puts(b, "Content-Description: Notification\r\n\r\n");
	sb_printf(b, "This is the mail delivery system at %s.\r\n\r\n", m->reporting_mta);
	if (m->arrival_ms) {
		fmt_date(m->arrival_ms, date);
		sb_printf(b, "Your message (queue id %s) was received on\r\n%s.\r\n\r\n",
		          m->queue_id, date);
	}
	if (c->failed)
		sb_puts(b,
		        "It could not be delivered to the recipients marked \"failed\" below;\r\n"
		        "the mail system has given up on them.\r\n\r\n");
	if (c->delayed)
		sb_puts(b, "It has not yet been delivered to the recipients marked \"delayed\"\r\n"
		           "below. The mail system keeps trying; you do not need to send it "
		           "again.\r\n\r\n");
	if (c->success)
		sb_puts(
		    b, "It was delivered (or passed on) to the recipients marked \"delivered\",\r\n"
		       "\"relayed\" or \"expanded\" below, as you asked.\r\n\r\n");

	unsigned shown = 0, listed = 0;
	for (unsigned i = 0; i < c->n; i++) {
		const struct dsn_rcpt *r = &c->r[i];
		if (!dsn_rcpt_wants(r->notify, r->action))
			continue;
		listed++;
		if (shown == DSN_TEXT_RCPTS_MAX)
			continue;
		shown++;
		struct sb line = {0};
		sb_putc(&line, '<');
		put_sanitised(&line, r->addr, r->addr_len, c->global, DSN_ADDR_MAX + 3);
		sb_printf(&line, ">: %s, status %s", action_name(r->action), rcpt_status(r));
		if (r->action == DSN_ACTION_DELAYED && r->retry_until_ms) {
			fmt_date(r->retry_until_ms, date);
			sb_printf(&line, ", retried until %s", date);
		}
		if (line.err) {
			if (!b->err)
				b->err = line.err;
			sb_free(&line);
			return;
		}
		put_folded(b, "", line.p, line.len, "    ");
		sb_free(&line);
		if (r->diag_len) {
			char prefix[HOST_MAX + 32];
			if (is_hostname(r->remote_mta))
				snprintf(prefix, sizeof(prefix), "    %s said: ", r->remote_mta);
			else
				snprintf(prefix, sizeof(prefix), "    the remote server said: ");
			put_untrusted_field(b, prefix, r->diag, r->diag_len, c->global,
			                    DSN_DIAG_MAX, "    ");
		}
		sb_puts(b, "\r\n");
	}
	if (listed > shown)
		sb_printf(
		    b, "... and %u more recipients, listed in the delivery status report.\r\n\r\n",
		    listed - shown);
	if (c->has_part3)
		sb_printf(b, "The %s of your message is attached.\r\n",
		          c->full ? "full text" : "header section");
}

static void part_status(struct sb *b, const struct ctx *c)
{
	const struct dsn_message *m = c->m;
	char date[40];
	char dec[DSN_XTEXT_MAX];
	sb_printf(b, "Content-Type: message/%s\r\n",
	          c->global ? "global-delivery-status" : "delivery-status");
	if (c->global)
		sb_puts(b, "Content-Transfer-Encoding: 8bit\r\n");
	sb_puts(b, "Content-Description: Delivery report\r\n\r\n");

	sb_printf(b, "Reporting-MTA: dns; %s\r\n", m->reporting_mta);
	sb_printf(b, "X-Posthaste-Queue-ID: %s\r\n", m->queue_id);
	if (m->envid_len) {
		size_t l = xtext_decode(m->envid, m->envid_len, c->global, dec, sizeof(dec));
		if (l != (size_t)-1 && l > 0) {
			sb_puts(b, "Original-Envelope-Id: ");
			sb_put(b, dec, l);
			sb_puts(b, "\r\n");
		}
	}
	if (m->arrival_ms) {
		fmt_date(m->arrival_ms, date);
		sb_printf(b, "Arrival-Date: %s\r\n", date);
	}

	for (unsigned i = 0; i < c->n; i++) {
		const struct dsn_rcpt *r = &c->r[i];
		if (!dsn_rcpt_wants(r->notify, r->action))
			continue;
		sb_puts(b, "\r\n");
		if (r->orcpt_len) {
			/* addr-type ";" xtext: the type is an atom, the address decoded */
			size_t semi = 0;
			while (semi < r->orcpt_len && r->orcpt[semi] != ';')
				semi++;
			bool type_ok = semi > 0 && semi <= 32 && semi < r->orcpt_len;
			for (size_t k = 0; type_ok && k < semi; k++) {
				char t = r->orcpt[k];
				type_ok = (t >= 'a' && t <= 'z') || (t >= 'A' && t <= 'Z') ||
				          (t >= '0' && t <= '9') || t == '-';
			}
			size_t l = type_ok
			               ? xtext_decode(r->orcpt + semi + 1, r->orcpt_len - semi - 1,
			                              c->global, dec, sizeof(dec))
			               : (size_t)-1;
			if (l != (size_t)-1 && l > 0) {
				sb_puts(b, "Original-Recipient: ");
				sb_put(b, r->orcpt, semi);
				sb_puts(b, "; ");
				sb_put(b, dec, l);
				sb_puts(b, "\r\n");
			}
		}
		sb_puts(b, "Final-Recipient: ");
		put_addr_value(b, r->addr, r->addr_len, c->global);
		sb_puts(b, "\r\n");
		sb_printf(b, "Action: %s\r\n", action_name(r->action));
		sb_printf(b, "Status: %s\r\n", rcpt_status(r));
		if (is_hostname(r->remote_mta))
			sb_printf(b, "Remote-MTA: dns; %s\r\n", r->remote_mta);
		if (r->diag_len)
			put_untrusted_field(b, "Diagnostic-Code: smtp; ", r->diag, r->diag_len,
			                    c->global, DSN_DIAG_MAX, " ");
		if (r->last_attempt_ms) {
			fmt_date(r->last_attempt_ms, date);
			sb_printf(b, "Last-Attempt-Date: %s\r\n", date);
		}
		if (r->action == DSN_ACTION_DELAYED && r->retry_until_ms) {
			fmt_date(r->retry_until_ms, date);
			sb_printf(b, "Will-Retry-Until: %s\r\n", date);
		}
	}
}

/* The returned content: the whole message or its header section (see dsn.h). */
static void returned_content(struct sb *b, const struct ctx *c)
{
	const struct dsn_message *m = c->m;
	size_t max = m->full_max ? m->full_max : DSN_FULL_MAX_DEFAULT;
	if (c->full)
		put_full(b, m->msg, m->msg_len);
	else
		put_headers(b, m->msg, m->msg_len, max);
}

static void part_returned(struct sb *b, const struct ctx *c, const struct sb *content)
{
	const char *type = c->full ? (c->global ? "message/global" : "message/rfc822")
	                           : (c->global ? "message/global-headers" : "text/rfc822-headers");
	sb_printf(b, "Content-Type: %s\r\n", type);
	sb_printf(b, "Content-Transfer-Encoding: %s\r\n",
	          has_8bit(content->p, content->len) ? "8bit" : "7bit");
	sb_printf(b, "Content-Description: %s\r\n\r\n",
	          c->full ? "Undelivered message" : "Undelivered message headers");
	sb_put(b, content->p, content->len);
}

/* splitmix64: spreads the caller's random bits and the attempt number. */
static uint64_t mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

/* A boundary ("=_" + up to 32 queue id characters + "." + 16 hex) absent from every part. */
static bool pick_boundary(const struct ctx *c, struct sb *parts, unsigned nparts, char out[72])
{
	char qid[33];
	size_t q = 0;
	for (const char *s = c->m->queue_id; *s && q < 32; s++)
		if ((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'z') ||
		    (*s >= 'A' && *s <= 'Z'))
			qid[q++] = *s;
	qid[q] = '\0';
	uint64_t seed = c->m->random ^ mix64(c->m->now_ms);
	for (unsigned t = 0; t < BOUNDARY_TRIES; t++) {
		snprintf(out, 72, "=_%s.%016llx", qid, (unsigned long long)mix64(seed + t));
		size_t bl = strlen(out);
		bool clash = false;
		for (unsigned i = 0; i < nparts && !clash; i++)
			clash = parts[i].len && memmem(parts[i].p, parts[i].len, out, bl);
		if (!clash)
			return true;
	}
	return false;
}

int dsn_build(const struct dsn_message *m, const struct dsn_rcpt *rcpts, unsigned n, char **out,
              size_t *out_len)
{
	if (out)
		*out = NULL;
	if (out_len)
		*out_len = 0;
	if (!m || !out || !out_len || (!rcpts && n) || n > DSN_RCPTS_MAX ||
	    !is_hostname(m->reporting_mta) || m->reporting_mta[0] == '[' ||
	    !is_queue_id(m->queue_id) || !addr_ok(m->sender, m->sender_len, m->smtputf8) ||
	    (m->envid_len && !m->envid) || (m->msg_len && !m->msg))
		return -EINVAL;

	struct ctx c = {.m = m, .r = rcpts, .n = n, .global = m->smtputf8};
	unsigned listed = 0;
	for (unsigned i = 0; i < n; i++) {
		const struct dsn_rcpt *r = &rcpts[i];
		if ((unsigned)r->action > DSN_ACTION_EXPANDED)
			return -EINVAL;
		if (!dsn_rcpt_wants(r->notify, r->action))
			continue;
		if (!addr_ok(r->addr, r->addr_len, true) || (r->orcpt_len && !r->orcpt) ||
		    (r->diag_len && !r->diag))
			return -EINVAL;
		int fit = addr_value_fits(r->addr, r->addr_len, c.global);
		if (fit)
			return fit;
		listed++;
		c.failed |= r->action == DSN_ACTION_FAILED;
		c.delayed |= r->action == DSN_ACTION_DELAYED;
		c.success |= r->action >= DSN_ACTION_DELIVERED;
	}
	if (listed == 0)
		return -ENOENT;

	size_t full_max = m->full_max ? m->full_max : DSN_FULL_MAX_DEFAULT;
	c.full = c.failed && m->ret != DSN_RET_HDRS && m->msg_len <= full_max &&
	         full_ok(m->msg, m->msg_len);
	/* part 3 only when there is something to return */
	struct sb content = {0};
	returned_content(&content, &c);
	c.has_part3 = content.len > 0;

	struct sb parts[3] = {{0}};
	unsigned nparts = c.has_part3 ? 3 : 2;
	part_text(&parts[0], &c);
	part_status(&parts[1], &c);
	if (c.has_part3)
		part_returned(&parts[2], &c, &content);
	int err = content.err;
	sb_free(&content);
	for (unsigned i = 0; i < nparts; i++)
		if (parts[i].err && !err)
			err = parts[i].err;

	char boundary[72];
	if (!err && !pick_boundary(&c, parts, nparts, boundary))
		err = -EINVAL; /* 64 random boundaries all in the content: not a real message */

	struct sb o = {0};
	if (!err) {
		char date[40];
		fmt_date(m->now_ms, date);
		sb_printf(&o, "From: Mail Delivery System <MAILER-DAEMON@%s>\r\n",
		          m->reporting_mta);
		sb_puts(&o, "To: <");
		sb_put(&o, m->sender, m->sender_len);
		sb_puts(&o, ">\r\n");
		sb_printf(&o, "Subject: %s\r\n",
		          c.failed    ? "Undelivered Mail Returned to Sender"
		          : c.delayed ? "Delayed Mail (still being retried)"
		                      : "Successful Mail Delivery Report");
		sb_printf(&o, "Date: %s\r\n", date);
		sb_printf(&o, "Message-ID: <%s.%llu@%s>\r\n", m->queue_id,
		          (unsigned long long)m->now_ms, m->reporting_mta);
		sb_puts(&o, "Auto-Submitted: auto-replied\r\n");
		sb_puts(&o, "MIME-Version: 1.0\r\n");
		sb_printf(&o,
		          "Content-Type: multipart/report; report-type=%s;\r\n boundary=\"%s\"\r\n",
		          c.global ? "global-delivery-status" : "delivery-status", boundary);
		sb_puts(&o, "\r\nThis is a MIME-encapsulated message.\r\n");
		for (unsigned i = 0; i < nparts; i++) {
			sb_printf(&o, "\r\n--%s\r\n", boundary);
			sb_put(&o, parts[i].p, parts[i].len);
		}
		sb_printf(&o, "\r\n--%s--\r\n", boundary);
		err = o.err;
	}
	for (unsigned i = 0; i < 3; i++)
		sb_free(&parts[i]);
	if (err) {
		sb_free(&o);
		return err;
	}
	*out = o.p;
	*out_len = o.len;
	return 0;
}
