/*
 * dns/wire: the little DNS message reading the resolver does itself.
 *
 * c-ares parses the records (MX, A, AAAA) but its 1.18 MX parser drops the
 * TTLs; this walks a raw answer and reports them. It is a parser of bytes
 * from the network: it reads nothing outside [msg, msg + len), follows no
 * compression pointer (names are skipped, never expanded), and has a
 * libFuzzer target (tests/fuzz/fuzz_dns_wire.c).
 *
 * Threads: no state; any thread.
 */
#ifndef POSTHASTE_DNS_WIRE_H
#define POSTHASTE_DNS_WIRE_H

#include <stddef.h>
#include <stdint.h>

enum {
	DNS_TYPE_A = 1,
	DNS_TYPE_CNAME = 5,
	DNS_TYPE_MX = 15,
	DNS_TYPE_AAAA = 28,
	DNS_CLASS_IN = 1,
};

/* The longest TTL any answer is believed for (RFC 2181 8 allows 2^31 - 1). */
#define DNS_WIRE_TTL_MAX 0x7fffffffu

/*
 * Walks the header, the question and the answer section of the message.
 * Returns the number of answer records of class IN and type `type`, and in
 * *ttl_r the smallest TTL among those and the CNAME records of the answer
 * section (the chain that led to them); DNS_WIRE_TTL_MAX when there is none.
 * A TTL with the top bit set counts as 0 (RFC 2181 8). Returns -1 when the
 * message is malformed (truncated header, name, record or record data; a
 * reserved label type); *ttl_r is then 0.
 */
int dns_wire_answer_ttl(const uint8_t *msg, size_t len, uint16_t type, uint32_t *ttl_r);

#endif
