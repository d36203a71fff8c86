/*
 * libFuzzer target for relay_find_message_id (mta/relay/header.h): the
 * input is split into up to four iovecs at offsets taken from its first
 * octets, so every split of a header section is reached. Checks: the result
 * fits, is NUL-terminated, has no control character, and does not depend on
 * where the input was split.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mta/relay/header.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 3)
		return 0;
	size_t cuts[3] = {data[0] % (size - 2), data[1] % (size - 2), data[2] % (size - 2)};
	const char *p = (const char *)data + 3;
	size_t len = size - 3;
	for (int i = 0; i < 3; i++)
		cuts[i] = len ? cuts[i] % (len + 1) : 0;
	/* sort the three cut points */
	for (int i = 0; i < 3; i++)
		for (int j = i + 1; j < 3; j++)
			if (cuts[j] < cuts[i]) {
				size_t t = cuts[i];
				cuts[i] = cuts[j];
				cuts[j] = t;
			}
	struct iovec iov[4] = {
	    {(void *)p, cuts[0]},
	    {(void *)(p + cuts[0]), cuts[1] - cuts[0]},
	    {(void *)(p + cuts[1]), cuts[2] - cuts[1]},
	    {(void *)(p + cuts[2]), len - cuts[2]},
	};
	char a[200], b[200];
	size_t na = relay_find_message_id(iov, 4, a, sizeof(a));
	struct iovec whole = {(void *)p, len};
	size_t nb = relay_find_message_id(&whole, 1, b, sizeof(b));
	if (na >= sizeof(a) || a[na] != '\0' || na != nb || memcmp(a, b, na) != 0)
		abort();
	for (size_t i = 0; i < na; i++)
		if ((unsigned char)a[i] < 0x20)
			abort();
	char one[1];
	if (relay_find_message_id(&whole, 1, one, 1) != 0 || one[0] != '\0')
		abort();
	return 0;
}
