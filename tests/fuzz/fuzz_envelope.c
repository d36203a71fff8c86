/*
 * libFuzzer target for queue/envelope: the input is a RECORD_MESSAGE payload.
 *
 * It is decoded twice, each time from an exact-size heap copy so ASan catches
 * any read past the end:
 *   1. as given;
 *   2. "repaired": the body length field set to what follows the envelope
 *      length, so mutations get past that check and reach the recipients.
 * Invariants: a decoded message lies wholly within the payload, its body is
 * exactly the rest after the envelope, and encoding it again (as the spool's
 * encoder does) gives back the input octet for octet; the format has one
 * encoding per message, so anything else must have been refused. A refusal is
 * -EBADMSG with a reason and leaves nothing allocated.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "queue/envelope.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static bool within(const uint8_t *buf, size_t len, const void *p, size_t n)
{
	const uint8_t *q = p;
	return q >= buf && q <= buf + len && n <= (size_t)(buf + len - q);
}

static void put(uint8_t **p, uint64_t v, unsigned octets)
{
	for (unsigned i = 0; i < octets; i++)
		(*p)[i] = (uint8_t)(v >> (8 * i));
	*p += octets;
}

static void put_str(uint8_t **p, const char *s, size_t len)
{
	if (len > UINT16_MAX)
		abort();
	put(p, len, 2);
	memcpy(*p, s, len);
	*p += len;
}

/* Encodes m again and compares with the input. */
static void reencode(const uint8_t *buf, size_t size, const struct spool_message *m)
{
	uint8_t *out = malloc(size ? size : 1), *p = out;
	if (!out)
		abort();
	put(&p, m->env_len, 4);
	put(&p, m->received_ms, 8);
	put(&p, m->flags, 2);
	put(&p, m->body_len, 8);
	put_str(&p, m->sender, m->sender_len);
	put_str(&p, m->helo, m->helo_len);
	put_str(&p, m->peer, m->peer_len);
	put_str(&p, m->envid, m->envid_len);
	put(&p, m->nrcpts, 4);
	for (uint32_t i = 0; i < m->nrcpts; i++) {
		put_str(&p, m->rcpts[i].addr, m->rcpts[i].addr_len);
		*p++ = m->rcpts[i].notify;
		put_str(&p, m->rcpts[i].orcpt, m->rcpts[i].orcpt_len);
	}
	if ((size_t)(p - out) != m->env_len)
		abort();
	memcpy(p, m->body, m->body_len);
	p += m->body_len;
	if ((size_t)(p - out) != size || memcmp(out, buf, size) != 0)
		abort();
	free(out);
}

static void check(const uint8_t *data, size_t size)
{
	uint8_t *buf = malloc(size ? size : 1);
	struct spool_message m;
	char err[256];

	if (!buf)
		abort();
	if (size)
		memcpy(buf, data, size);
	err[0] = '\0';
	int r = spool_envelope_decode(buf, size, &m, err, sizeof(err));
	if (r == 0) {
		if (m.env_len < SPOOL_ENVELOPE_MIN || m.env_len > size)
			abort();
		if (!within(buf, m.env_len, m.sender, m.sender_len) ||
		    !within(buf, m.env_len, m.helo, m.helo_len) ||
		    !within(buf, m.env_len, m.peer, m.peer_len) ||
		    !within(buf, m.env_len, m.envid, m.envid_len))
			abort();
		if (m.nrcpts && !m.rcpts)
			abort();
		for (uint32_t i = 0; i < m.nrcpts; i++)
			if (!within(buf, m.env_len, m.rcpts[i].addr, m.rcpts[i].addr_len) ||
			    !within(buf, m.env_len, m.rcpts[i].orcpt, m.rcpts[i].orcpt_len))
				abort();
		if (m.body != buf + m.env_len || m.body_len != size - m.env_len)
			abort();
		reencode(buf, size, &m);
	} else {
		if (r != -EBADMSG || !err[0] || m.rcpts || m.nrcpts || m.body)
			abort();
	}
	spool_message_free(&m);
	if (m.rcpts)
		abort();
	free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	check(data, size);
	if (size >= 22) {
		uint8_t *fixed = malloc(size);
		if (!fixed)
			abort();
		memcpy(fixed, data, size);
		uint32_t env_len = (uint32_t)fixed[0] | (uint32_t)fixed[1] << 8 |
		                   (uint32_t)fixed[2] << 16 | (uint32_t)fixed[3] << 24;
		uint64_t body = env_len <= size ? size - env_len : 0;
		for (int i = 0; i < 8; i++)
			fixed[14 + i] = (uint8_t)(body >> (8 * i));
		check(fixed, size);
		free(fixed);
	}
	return 0;
}
