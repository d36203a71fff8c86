/*
 * addr: a client address as a 16-octet table key, IPv4 as v4-mapped IPv6
 * (::ffff:a.b.c.d), so one client is one key whichever socket it reached.
 * Shared by the per-client tables (AUTH failures in smtp_server, mta/smtp/anvil).
 */
#ifndef POSTHASTE_CORE_ADDR_H
#define POSTHASTE_CORE_ADDR_H

#include <netinet/in.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

/* Fills key; false (key zeroed) for NULL or a family other than AF_INET and AF_INET6. */
static inline bool addr_key16(const struct sockaddr_storage *ss, uint8_t key[16])
{
	memset(key, 0, 16);
	if (ss && ss->ss_family == AF_INET) {
		key[10] = key[11] = 0xff;
		memcpy(key + 12, &((const struct sockaddr_in *)ss)->sin_addr, 4);
		return true;
	}
	if (ss && ss->ss_family == AF_INET6) {
		memcpy(key, &((const struct sockaddr_in6 *)ss)->sin6_addr, 16);
		return true;
	}
	return false;
}

#endif
