/* Header-field lookups over a message's first octets: see header.h. */
#include "mta/relay/header.h"

#include <stdbool.h>


size_t relay_find_message_id(const struct iovec *iov, unsigned n, char *buf, size_t cap)
{
	static const char name[] = "message-id:";
	size_t matched = 0, out = 0, scanned = 0;
	bool bol = true, in_value = false, prev_lf = false, blank = true;
	for (unsigned k = 0; k < n; k++) {
		const char *p = iov[k].iov_base;
		for (size_t i = 0; i < iov[k].iov_len; i++) {
			char ch = p[i];
			if (++scanned > 65536)
				goto end;
			if (in_value) {
				if (prev_lf) {
					if (ch != ' ' && ch != '\t')
						goto end; /* the field ended */
					prev_lf = false;
				}
				if (ch == '\n') {
					prev_lf = true;
					continue;
				}
				if (ch == '\r')
					continue;
				if ((ch == ' ' || ch == '\t') && out == 0)
					continue;
				if (out + 1 < cap && (unsigned char)ch >= 0x20)
					buf[out++] = ch;
				continue;
			}
			if (ch == '\n') {
				if (bol && blank)
					goto end; /* the empty line: end of the header */
				bol = true;
				blank = true;
				matched = 0;
				continue;
			}
			if (ch != '\r')
				blank = false;
			if (bol && matched < sizeof(name) - 1) {
				char lc = (ch >= 'A' && ch <= 'Z') ? (char)(ch + 32) : ch;
				if (lc == name[matched]) {
					if (++matched == sizeof(name) - 1) {
						in_value = true;
					}
					continue;
				}
				bol = false;
				matched = 0;
			} else {
				bol = false;
			}
		}
	}
end:
	while (out && (buf[out - 1] == ' ' || buf[out - 1] == '\t'))
		out--;
	if (cap)
		buf[out] = '\0';
	return out;
}
