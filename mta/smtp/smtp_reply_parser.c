/* smtp_reply_parser: see smtp_reply_parser.h for the contract. */
#include "mta/smtp/smtp_reply_parser.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/compiler.h"

#define REPLY_MIN_LINE 8

void smtp_reply_limits_default(struct smtp_reply_limits *lim)
{
	lim->max_line = 2048;
	lim->max_lines = 100;
}

int smtp_reply_parser_init(struct smtp_reply_parser *p, const struct smtp_reply_limits *lim)
{
	memset(p, 0, sizeof(*p));
	if (lim)
		p->lim = *lim;
	else
		smtp_reply_limits_default(&p->lim);
	if (p->lim.max_line < REPLY_MIN_LINE || p->lim.max_lines < 1)
		return -EINVAL;
	p->buf = malloc(p->lim.max_line);
	if (!p->buf)
		return -ENOMEM;
	return 0;
}

void smtp_reply_parser_deinit(struct smtp_reply_parser *p)
{
	free(p->buf);
	p->buf = NULL;
	p->hold = 0;
}

void smtp_reply_parser_reset(struct smtp_reply_parser *p)
{
	p->code = 0;
	p->lines = 0;
	p->hold = 0;
	p->failed = false;
	p->error[0] = '\0';
}

bool smtp_reply_parser_idle(const struct smtp_reply_parser *p)
{
	return p->lines == 0 && p->hold == 0 && !p->failed;
}

static printf_like(2, 3) int reply_fail(struct smtp_reply_parser *p, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(p->error, sizeof(p->error), fmt, ap);
	va_end(ap);
	p->failed = true;
	p->hold = 0;
	return -1;
}

/* Copies up to 16 octets of s into out as printable ASCII (others become '?'), for error texts. */
static const char *reply_excerpt(char out[20], const char *s, size_t n)
{
	size_t i, k = MIN(n, (size_t)16);

	for (i = 0; i < k; i++) {
		unsigned char ch = (unsigned char)s[i];
		out[i] = ch >= 0x20 && ch < 0x7f && ch != '"' ? (char)ch : '?';
	}
	if (n > k) {
		out[k++] = '.';
		out[k++] = '.';
	}
	out[k] = '\0';
	return out;
}

/* Reads 1..3 digits at s[*i]; returns the value or -1. */
static int esc_number(const char *s, size_t n, size_t *i)
{
	size_t start = *i;
	int v = 0;

	while (*i < n && *i - start < 3 && s[*i] >= '0' && s[*i] <= '9')
		v = v * 10 + (s[(*i)++] - '0');
	if (*i == start || (*i < n && s[*i] >= '0' && s[*i] <= '9'))
		return -1;
	return v;
}

/* Recognises "c.s.d" + SP or end at the start of text; fills esc and the msg slice. */
static void reply_esc_parse(struct smtp_reply_line *ln)
{
	const char *s = ln->text;
	size_t n = ln->text_len, i = 2;
	int subject, detail;

	ln->msg = ln->text;
	ln->msg_len = ln->text_len;
	memset(&ln->esc, 0, sizeof(ln->esc));
	if (n < 5 || s[0] != (char)('0' + ln->code / 100) || s[1] != '.')
		return;
	subject = esc_number(s, n, &i);
	if (subject < 0 || i >= n || s[i] != '.')
		return;
	i++;
	detail = esc_number(s, n, &i);
	if (detail < 0 || (i < n && s[i] != ' '))
		return;
	while (i < n && s[i] == ' ')
		i++;
	ln->esc.klass = (uint8_t)(ln->code / 100);
	ln->esc.subject = (uint16_t)subject;
	ln->esc.detail = (uint16_t)detail;
	ln->msg = s + i;
	ln->msg_len = n - i;
}

/* Parses one complete line (s, n octets, LF excluded) into *ln. */
static int reply_line(struct smtp_reply_parser *p, const char *s, size_t n,
                      struct smtp_reply_line *ln)
{
	char ex[20];
	unsigned code;
	bool last;

	if (n > 0 && s[n - 1] == '\r')
		n--;
	if (n < 3 || s[0] < '0' || s[0] > '9' || s[1] < '0' || s[1] > '9' || s[2] < '0' ||
	    s[2] > '9')
		return reply_fail(p, "reply line does not start with a 3-digit code: \"%s\"",
		                  reply_excerpt(ex, s, n));
	if (s[0] < '2' || s[0] > '5' || s[1] > '5')
		return reply_fail(p, "reply code %.3s out of range", s);
	code = (unsigned)(s[0] - '0') * 100 + (unsigned)(s[1] - '0') * 10 + (unsigned)(s[2] - '0');
	if (n == 3 || s[3] == ' ')
		last = true;
	else if (s[3] == '-')
		last = false;
	else
		return reply_fail(p, "no SP or '-' after reply code: \"%s\"",
		                  reply_excerpt(ex, s, n));
	if (p->lines > 0 && code != p->code)
		return reply_fail(p, "reply code %u after %u within one multiline reply", code,
		                  p->code);
	if (!last && p->lines + 1 >= p->lim.max_lines)
		return reply_fail(p, "reply of more than %u lines", p->lim.max_lines);

	ln->code = code;
	ln->index = p->lines;
	ln->last = last;
	ln->line = s;
	ln->line_len = n;
	ln->text = s + (n > 3 ? 4 : 3);
	ln->text_len = n > 3 ? n - 4 : 0;
	reply_esc_parse(ln);
	if (last) {
		p->code = 0;
		p->lines = 0;
	} else {
		p->code = code;
		p->lines++;
	}
	return 1;
}

int smtp_reply_parser_next(struct smtp_reply_parser *p, const char *in, size_t len, size_t *used_r,
                           struct smtp_reply_line *line_r, const char **error_r)
{
	const char *lf;
	size_t n;

	*used_r = 0;
	if (unlikely(p->failed))
		goto fail;
	lf = len ? memchr(in, '\n', len) : NULL;
	if (likely(p->hold == 0)) {
		if (likely(lf != NULL)) {
			n = (size_t)(lf - in) + 1;
			if (unlikely(n > p->lim.max_line))
				goto too_long;
			if (reply_line(p, in, n - 1, line_r) < 0)
				goto fail;
			*used_r = n;
			return 1;
		}
		/* The line will need at least one more octet, its LF. */
		if (unlikely(len + 1 > p->lim.max_line))
			goto too_long;
		memcpy(p->buf, in, len);
		p->hold = len;
		*used_r = len;
		return 0;
	}

	n = lf ? (size_t)(lf - in) + 1 : len;
	if (unlikely(p->hold + n + (lf ? 0 : 1) > p->lim.max_line))
		goto too_long;
	memcpy(p->buf + p->hold, in, n);
	p->hold += n;
	if (!lf) {
		*used_r = n;
		return 0;
	}
	if (reply_line(p, p->buf, p->hold - 1, line_r) < 0)
		goto fail;
	p->hold = 0;
	*used_r = n;
	return 1;

too_long:
	reply_fail(p, "reply line longer than %zu octets", p->lim.max_line);
fail:
	if (error_r)
		*error_r = p->error;
	return -1;
}

/* ---- EHLO capabilities ---- */

struct reply_word {
	const char *s;
	size_t n;
};

/* Splits the next SP-separated word off the front of (*s, *n). False at the end. */
static bool reply_word_next(const char **s, size_t *n, struct reply_word *w)
{
	while (*n > 0 && (**s == ' ' || **s == '\t')) {
		(*s)++;
		(*n)--;
	}
	if (*n == 0)
		return false;
	w->s = *s;
	while (*n > 0 && **s != ' ' && **s != '\t') {
		(*s)++;
		(*n)--;
	}
	w->n = (size_t)(*s - w->s);
	return true;
}

static bool reply_word_is(const struct reply_word *w, const char *kw)
{
	size_t k = strlen(kw);
	return w->n == k && strncasecmp(w->s, kw, k) == 0;
}

static const struct {
	const char *kw;
	unsigned flag;
} reply_caps_table[] = {
    {"PIPELINING", SMTP_CAP_PIPELINING},
    {"CHUNKING", SMTP_CAP_CHUNKING},
    {"8BITMIME", SMTP_CAP_8BITMIME},
    {"SMTPUTF8", SMTP_CAP_SMTPUTF8},
    {"STARTTLS", SMTP_CAP_STARTTLS},
    {"ENHANCEDSTATUSCODES", SMTP_CAP_ENHANCEDSTATUSCODES},
    {"DSN", SMTP_CAP_DSN},
    {"BINARYMIME", SMTP_CAP_BINARYMIME},
    {"REQUIRETLS", SMTP_CAP_REQUIRETLS},
};

static const struct {
	const char *mech;
	unsigned flag;
} reply_auth_table[] = {
    {"PLAIN", SMTP_AUTH_PLAIN},
    {"LOGIN", SMTP_AUTH_LOGIN},
    {"CRAM-MD5", SMTP_AUTH_CRAM_MD5},
    {"XOAUTH2", SMTP_AUTH_XOAUTH2},
};

static void reply_caps_auth(struct smtp_reply_caps *caps, const char *s, size_t n)
{
	struct reply_word w;
	size_t i;

	caps->flags |= SMTP_CAP_AUTH;
	while (reply_word_next(&s, &n, &w)) {
		unsigned flag = SMTP_AUTH_OTHER;
		for (i = 0; i < ARRAY_SIZE(reply_auth_table); i++)
			if (reply_word_is(&w, reply_auth_table[i].mech))
				flag = reply_auth_table[i].flag;
		caps->auth |= flag;
	}
}

void smtp_reply_caps_learn(struct smtp_reply_caps *caps, const struct smtp_reply_line *line)
{
	const char *s = line->text;
	size_t n = line->text_len, i;
	struct reply_word w;

	if (line->code != 250 || line->index == 0)
		return;
	if (!reply_word_next(&s, &n, &w))
		return;
	if (w.n > 5 && strncasecmp(w.s, "AUTH=", 5) == 0) {
		/* The pre-RFC 4954 form "AUTH=LOGIN PLAIN": the first mechanism is glued on. */
		reply_caps_auth(caps, w.s + 5, w.n - 5 + n);
		return;
	}
	if (reply_word_is(&w, "AUTH")) {
		reply_caps_auth(caps, s, n);
		return;
	}
	if (reply_word_is(&w, "SIZE")) {
		uint64_t v = 0;
		caps->flags |= SMTP_CAP_SIZE;
		if (reply_word_next(&s, &n, &w)) {
			for (i = 0; i < w.n && w.s[i] >= '0' && w.s[i] <= '9'; i++) {
				unsigned d = (unsigned)(w.s[i] - '0');
				if (v > (UINT64_MAX - d) / 10) {
					v = 0; /* absurd: treat as "no limit announced" */
					break;
				}
				v = v * 10 + d;
			}
			if (i < w.n)
				v = 0;
		}
		caps->size_max = v;
		return;
	}
	for (i = 0; i < ARRAY_SIZE(reply_caps_table); i++) {
		if (reply_word_is(&w, reply_caps_table[i].kw)) {
			caps->flags |= reply_caps_table[i].flag;
			return;
		}
	}
}
