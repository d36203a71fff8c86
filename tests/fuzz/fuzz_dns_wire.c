/*
 * libFuzzer target for dns/wire (the TTL walk over raw DNS answers).
 *
 * Input: byte 0 picks the record type asked for; the rest is the message,
 * copied into a heap block of its exact size so ASan catches any read past
 * it. The result must satisfy the header's contract: -1 with a 0 TTL, or a
 * count no larger than the header's ANCOUNT with a TTL of at most 2^31 - 1.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dns/wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const uint16_t types[] = {DNS_TYPE_MX, DNS_TYPE_A, DNS_TYPE_AAAA, DNS_TYPE_CNAME};
	if (size < 1)
		return 0;
	uint16_t type = types[data[0] & 3];
	data++;
	size--;
	uint8_t *msg = malloc(size ? size : 1);
	if (!msg)
		return 0;
	memcpy(msg, data, size);
	uint32_t ttl = 12345;
	int rc = dns_wire_answer_ttl(msg, size, type, &ttl);
	if (rc < -1)
		abort();
	if (rc == -1 && ttl != 0)
		abort();
	if (rc >= 0) {
		unsigned an = size >= 12 ? (unsigned)(msg[6] << 8 | msg[7]) : 0;
		if ((unsigned)rc > an || ttl > DNS_WIRE_TTL_MAX)
			abort();
	}
	/* the same bytes again give the same answer */
	uint32_t ttl2;
	if (dns_wire_answer_ttl(msg, size, type, &ttl2) != rc || ttl2 != ttl)
		abort();
	free(msg);
	return 0;
}
