/*
 * anvil: per-client-address connection and message limits for the SMTP
 * server, in the spirit of Postfix's anvil(8) but in-process: one table
 * shared by every worker, since SO_REUSEPORT spreads one address's
 * connections over all of them (docs/smtp-server.md, "Client limits").
 *
 * Per address it keeps the number of open connections and two rates
 * (new connections, messages), each a token bucket of COUNT tokens refilled
 * evenly over its period (kept as a GCRA "theoretical arrival time"): a
 * client that has been quiet may open COUNT connections (or start COUNT
 * messages) at once, then one every period/COUNT. A refused attempt takes no
 * token.
 *
 * The table is fixed-size and set-associative: an address hashes (keyed
 * with a random seed, so a client cannot aim at a set) to a set of
 * ANVIL_WAYS slots under one mutex; nothing else is locked, so workers only
 * meet when two addresses share a set. A new address takes a free slot, or
 * the slot of an address without open connections whose rate memory is
 * closest to running out (an idle one first). When every slot of the set
 * holds an address with open connections, the new address is admitted
 * untracked (ticket 0): the table fails open rather than refuse clients it
 * cannot count. IPv4 addresses are keyed as v4-mapped IPv6, so a client is
 * the same whichever socket it reached.
 *
 * Threads: every function may be called from any thread concurrently,
 * except anvil_new and anvil_free.
 */
#ifndef POSTHASTE_MTA_SMTP_ANVIL_H
#define POSTHASTE_MTA_SMTP_ANVIL_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#define ANVIL_WAYS          8u         /* slots per set */
#define ANVIL_SLOTS_DEFAULT 16384u     /* addresses tracked at once */
#define ANVIL_SLOTS_MAX     (1u << 24) /* bounds memory (48 octets a slot) */

struct anvil_config {
	unsigned conn_limit;      /* open connections per address; 0: no limit */
	uint32_t conn_rate_count; /* new connections per conn_rate_ms; 0: no limit */
	uint64_t conn_rate_ms;
	uint32_t msg_rate_count; /* messages (anvil_message calls) per msg_rate_ms; 0: no limit */
	uint64_t msg_rate_ms;
	/* addresses tracked at once, rounded up to a power of two (at least
	   ANVIL_WAYS, at most ANVIL_SLOTS_MAX); 0: ANVIL_SLOTS_DEFAULT */
	unsigned slots;
};

enum anvil_result {
	ANVIL_OK = 0,     /* admitted (and counted) */
	ANVIL_CONN_LIMIT, /* the address has conn_limit connections open */
	ANVIL_CONN_RATE,  /* the address opened too many connections lately */
	ANVIL_MSG_RATE,   /* the address started too many messages lately */
};

struct anvil;

/* A table for cfg (copied). NULL with errno (EINVAL: a rate with a count but no period). */
struct anvil *anvil_new(const struct anvil_config *cfg);

/* Frees the table and sets *a to NULL; accepts NULL and a NULL *a. */
void anvil_free(struct anvil **a);

/*
 * A new connection from sa at monotonic time now_ms. ANVIL_OK: admitted;
 * *ticket_r is what anvil_disconnect takes when the connection closes (0
 * when the address was not tracked: sa is not AF_INET/AF_INET6, or its set
 * was full). Otherwise refused, nothing counted, *ticket_r is 0. The
 * concurrency limit is checked before the rate.
 */
enum anvil_result anvil_connect(struct anvil *a, const struct sockaddr_storage *sa, uint64_t now_ms,
                                uint32_t *ticket_r);

/* The connection of ticket closed (ticket 0: nothing). Once per admitted connection. */
void anvil_disconnect(struct anvil *a, uint32_t ticket);

/*
 * A message (MAIL) from sa at now_ms: ANVIL_OK, or ANVIL_MSG_RATE (no token
 * taken). An address that cannot be tracked is admitted.
 */
enum anvil_result anvil_message(struct anvil *a, const struct sockaddr_storage *sa,
                                uint64_t now_ms);

/* Open connections counted for sa (tests, logs). */
unsigned anvil_connections(struct anvil *a, const struct sockaddr_storage *sa);

/* Connections admitted untracked since the start (their set was full). */
uint64_t anvil_untracked(const struct anvil *a);

#endif
