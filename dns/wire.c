/* dns/wire: TTLs of a raw DNS answer (dns/wire.h). */
#include "dns/wire.h"

#define HEADER_LEN 12

static uint16_t get16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Skips the (possibly compressed) name at *pos. Returns 0, or -1 if malformed. */
static int skip_name(const uint8_t *msg, size_t len, size_t *pos)
{
	size_t p = *pos;
	for (;;) {
		if (p >= len)
			return -1;
		uint8_t l = msg[p];
		if ((l & 0xc0) == 0xc0) { /* a pointer ends the name */
			if (p + 2 > len)
				return -1;
			*pos = p + 2;
			return 0;
		}
		if (l & 0xc0) /* 01 and 10: extended / reserved label types */
			return -1;
		p += 1 + (size_t)l;
		if (l == 0) {
			*pos = p;
			return 0;
		}
	}
}

int dns_wire_answer_ttl(const uint8_t *msg, size_t len, uint16_t type, uint32_t *ttl_r)
{
	*ttl_r = 0;
	if (len < HEADER_LEN)
		return -1;
	unsigned qd = get16(msg + 4), an = get16(msg + 6);
	size_t pos = HEADER_LEN;
	for (unsigned i = 0; i < qd; i++) {
		if (skip_name(msg, len, &pos) < 0 || len - pos < 4)
			return -1;
		pos += 4; /* type, class */
	}
	uint32_t ttl = DNS_WIRE_TTL_MAX;
	int found = 0;
	for (unsigned i = 0; i < an; i++) {
		if (skip_name(msg, len, &pos) < 0 || len - pos < 10)
			return -1;
		uint16_t rtype = get16(msg + pos), rclass = get16(msg + pos + 2);
		uint32_t rttl = get32(msg + pos + 4);
		size_t rdlen = get16(msg + pos + 8);
		pos += 10;
		if (len - pos < rdlen)
			return -1;
		pos += rdlen;
		if (rclass != DNS_CLASS_IN || (rtype != type && rtype != DNS_TYPE_CNAME))
			continue;
		if (rttl > DNS_WIRE_TTL_MAX)
			rttl = 0;
		if (rttl < ttl)
			ttl = rttl;
		if (rtype == type)
			found++;
	}
	*ttl_r = ttl;
	return found;
}
