/*
 * header: the few header-field lookups the relay needs (the accounting log's
 * message_id), done in place over the message's first octets, which may be
 * split over several iovecs. Pure; bounded (at most 64 KiB are looked at,
 * and never past the header section's empty line).
 */
#ifndef POSTHASTE_MTA_RELAY_HEADER_H
#define POSTHASTE_MTA_RELAY_HEADER_H

#include <stddef.h>
#include <sys/uio.h>

/*
 * Finds the Message-ID field (name case-insensitive, at the start of a line of
 * the header section) and copies its value, unfolded, without leading and
 * trailing blanks and without control characters, into buf (at most cap - 1
 * octets, NUL-terminated; cap >= 1). Returns the octets copied: 0 when there
 * is none.
 */
size_t relay_find_message_id(const struct iovec *iov, unsigned n, char *buf, size_t cap);

#endif
