/*
 * state: the payload of a RECORD_STATE record (queue/record.h) and the table
 * that applies a spool's state records to its messages, shared by recovery
 * (queue/spool.c) and the read-only walk (queue/spool_scan.c).
 *
 * Payload, 16 octets, little-endian (docs/spool.md):
 *
 *   u8 state (enum spool_state) | 7 octets zero | u64 until_ms (0 for now)
 *
 * The record's queue_id is the message's id. State records are applied in
 * (segment sequence, offset) order and the last one for an id wins; one for an
 * id with no message is ignored. A state value this version does not know, or
 * a payload shorter than 16 octets, changes nothing (a newer writer's record).
 *
 * Thread-safety: none needed; a table belongs to its caller.
 */
#ifndef POSTHASTE_QUEUE_STATE_H
#define POSTHASTE_QUEUE_STATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define STATE_PAYLOAD_SIZE 16

enum spool_state {
	SPOOL_STATE_QUEUED = 0,    /* no state record (never written) */
	SPOOL_STATE_HELD = 1,      /* on hold: not delivered until released */
	SPOOL_STATE_RELEASED = 2,  /* queued again after a hold */
	SPOOL_STATE_DELETED = 3,   /* final */
	SPOOL_STATE_DELIVERED = 4, /* final */
	SPOOL_STATE_BOUNCED = 5,   /* final */
};

/* Deleted, delivered or bounced: the message will never be looked at again. */
bool spool_state_final(enum spool_state st);

/* Writes a state payload. */
void state_payload_encode(uint8_t out[STATE_PAYLOAD_SIZE], enum spool_state st, uint64_t until_ms);

/*
 * Reads a state payload of len octets. Returns 0 with *st (and *until_ms, if
 * not NULL) set, or -1 when it is shorter than STATE_PAYLOAD_SIZE or its state
 * is not one of enum spool_state's written values (HELD .. BOUNCED).
 */
int state_payload_decode(const uint8_t *p, size_t len, enum spool_state *st, uint64_t *until_ms);

struct state_entry {
	uint64_t id;
	uint64_t order; /* position among the records added */
	uint8_t state;  /* enum spool_state */
};

/* The state records of a spool, added in the order they apply. Zero-initialise. */
struct state_table {
	struct state_entry *v;
	size_t n, cap;
	bool sorted;
};

/* Adds one state record (after the ones added before). 0 or -ENOMEM. */
int state_table_add(struct state_table *t, uint64_t id, enum spool_state st);

/* After the last add: keeps the last state of each id, sorted for lookups. */
void state_table_finish(struct state_table *t);

/*
 * The current state of id after state_table_finish: SPOOL_STATE_QUEUED when
 * no record names it, and for a released message; else the last state.
 */
enum spool_state state_table_lookup(const struct state_table *t, uint64_t id);

void state_table_free(struct state_table *t);

#endif
