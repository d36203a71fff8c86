/* The RECORD_MESSAGE payload reader: see envelope.h for the format and the contract. */
#include "queue/envelope.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/compiler.h"

/* Per recipient at least: u16 address length, u8 NOTIFY, u16 ORCPT length. */
#define RCPT_MIN 5u

/* A cursor over the envelope: pos never passes end, and end never passes the payload. */
struct cursor {
	const uint8_t *buf;
	size_t pos, end;
	const char *what; /* the field being read, for the error text */
};

static bool take(struct cursor *c, size_t n)
{
	if (c->end - c->pos < n)
		return false;
	c->pos += n;
	return true;
}

static bool get16(struct cursor *c, uint16_t *v)
{
	const uint8_t *p = c->buf + c->pos;
	if (!take(c, 2))
		return false;
	*v = (uint16_t)(p[0] | p[1] << 8);
	return true;
}

static bool get32(struct cursor *c, uint32_t *v)
{
	const uint8_t *p = c->buf + c->pos;
	if (!take(c, 4))
		return false;
	*v = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
	return true;
}

static bool get64(struct cursor *c, uint64_t *v)
{
	uint32_t lo, hi;
	if (!get32(c, &lo) || !get32(c, &hi))
		return false;
	*v = (uint64_t)hi << 32 | lo;
	return true;
}

static bool getstr(struct cursor *c, const char **s, size_t *len)
{
	uint16_t n;
	if (!get16(c, &n))
		return false;
	*s = (const char *)c->buf + c->pos;
	*len = n;
	return take(c, n);
}

printf_like(3, 4) static int fail(char *err, size_t errlen, const char *fmt, ...)
{
	if (err && errlen) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return -EBADMSG;
}

/* A field ran past the envelope's end: says which one and where. */
static int truncated(const struct cursor *c, char *err, size_t errlen)
{
	return fail(err, errlen, "envelope: %s at offset %zu runs past the envelope's end (%zu)",
	            c->what, c->pos, c->end);
}

#define FIELD(c, name, ok)                                                                         \
	do {                                                                                       \
		(c)->what = (name);                                                                \
		if (!(ok))                                                                         \
			goto torn;                                                                 \
	} while (0)

/* head_only: payload is the envelope alone (its body kept elsewhere); else envelope + body. */
static int decode(const uint8_t *payload, size_t len, bool head_only, struct spool_message *out,
                  char *err, size_t errlen)
{
	memset(out, 0, sizeof(*out));
	if (err && errlen)
		err[0] = '\0';
	if (len < 4)
		return fail(err, errlen, "envelope: payload of %zu octets has no envelope length",
		            len);
	struct cursor c = {.buf = payload, .pos = 0, .end = 4};
	uint32_t env_len = 0; /* get32 cannot fail here (len >= 4); the compiler cannot see it */
	get32(&c, &env_len);
	if (env_len < SPOOL_ENVELOPE_MIN)
		return fail(err, errlen, "envelope: length %u is below the minimum %u", env_len,
		            SPOOL_ENVELOPE_MIN);
	if (env_len > len)
		return fail(err, errlen, "envelope: length %u is past the payload's end (%zu)",
		            env_len, len);
	c.end = env_len;

	struct spool_message m;
	memset(&m, 0, sizeof(m));
	m.env_len = env_len;
	uint64_t body_len;
	FIELD(&c, "received time", get64(&c, &m.received_ms));
	FIELD(&c, "flags", get16(&c, &m.flags));
	FIELD(&c, "body length", get64(&c, &body_len));
	FIELD(&c, "sender", getstr(&c, &m.sender, &m.sender_len));
	FIELD(&c, "HELO name", getstr(&c, &m.helo, &m.helo_len));
	FIELD(&c, "client address", getstr(&c, &m.peer, &m.peer_len));
	FIELD(&c, "ENVID", getstr(&c, &m.envid, &m.envid_len));
	FIELD(&c, "recipient count", get32(&c, &m.nrcpts));
	if (m.nrcpts > (c.end - c.pos) / RCPT_MIN)
		return fail(
		    err, errlen,
		    "envelope: %u recipients cannot fit in the %zu octets left at offset %zu",
		    m.nrcpts, c.end - c.pos, c.pos);
	if (head_only && len != env_len)
		return fail(err, errlen, "envelope: %zu octets after an envelope given alone",
		            len - env_len);
	if (!head_only && len - env_len != body_len)
		return fail(err, errlen,
		            "envelope: body length %llu does not match the %zu octets after the "
		            "envelope",
		            (unsigned long long)body_len, len - env_len);
	if (m.nrcpts) {
		m.rcpts = calloc(m.nrcpts, sizeof(*m.rcpts));
		if (!m.rcpts) {
			if (err && errlen)
				snprintf(err, errlen, "envelope: out of memory for %u recipients",
				         m.nrcpts);
			return -ENOMEM;
		}
	}
	for (uint32_t i = 0; i < m.nrcpts; i++) {
		struct spool_rcpt *r = &m.rcpts[i];
		FIELD(&c, "recipient address", getstr(&c, &r->addr, &r->addr_len));
		FIELD(&c, "NOTIFY", take(&c, 1));
		r->notify = payload[c.pos - 1];
		FIELD(&c, "ORCPT", getstr(&c, &r->orcpt, &r->orcpt_len));
	}
	if (c.pos != c.end) {
		free(m.rcpts);
		return fail(err, errlen,
		            "envelope: %zu unexplained octets between the last recipient (offset "
		            "%zu) and the envelope's end",
		            c.end - c.pos, c.pos);
	}
	m.body = head_only ? NULL : payload + env_len;
	m.body_len = head_only ? body_len : len - env_len;
	*out = m;
	return 0;

torn:
	free(m.rcpts);
	return truncated(&c, err, errlen);
}

int spool_envelope_decode(const uint8_t *payload, size_t len, struct spool_message *out, char *err,
                          size_t errlen)
{
	return decode(payload, len, false, out, err, errlen);
}

int spool_envelope_decode_head(const uint8_t *env, size_t len, struct spool_message *out,
                               char *err, size_t errlen)
{
	return decode(env, len, true, out, err, errlen);
}

void spool_message_free(struct spool_message *m)
{
	if (!m)
		return;
	free(m->rcpts);
	m->rcpts = NULL;
	m->nrcpts = 0;
}
