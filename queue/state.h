/*
 * state: the payload of a RECORD_STATE record (queue/record.h) and the table
 * that applies a spool's state records to its messages, shared by recovery
 * (queue/spool.c) and the read-only walk (queue/spool_scan.c).
 *
 * Payload, 16 octets, little-endian (docs/spool.md):
 *
 *   u8 state (enum spool_state) | u8 flags | u16 attempts | u32 recipient |
 *   u64 until_ms (unix ms; 0 for none)
 *
 * attempts counts the delivery attempts made so far (DEFERRED); recipient is
 * the index of the envelope recipient a RCPT_DONE record settles. Writers
 * before DEFERRED wrote zeros there, which reads as 0 attempts.
 *
 * flags (STATE_F_*) are facts about the message that stay true once set: the
 * spool writes a message's flags into every state record it writes for it,
 * so the last record (the one that wins) carries them all. Writers before
 * flags wrote 0 there (no flag set); readers before flags ignore the octet
 * (they forget the flags, nothing else). Bits this version does not know are
 * kept as they are.
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
	SPOOL_STATE_DEFERRED = 6,  /* queued; next attempt at until_ms, after `attempts` */
	/*
	 * Not a message state: recipient `rcpt` has its final outcome (delivered,
	 * or included in a bounce) and is not tried again. The message's state
	 * is unchanged. Recovery collects these apart from the table.
	 */
	SPOOL_STATE_RCPT_DONE = 7,
};

/* The message's delay DSN (docs/bounces.md) has been sent: no second one. */
#define STATE_F_DELAY_WARNED 0x01u

/* A decoded state payload. */
struct state_rec {
	enum spool_state state;
	uint16_t attempts;
	uint32_t rcpt;
	uint64_t until_ms;
	uint8_t flags; /* STATE_F_* */
};

/* Deleted, delivered or bounced: the message will never be looked at again. */
bool spool_state_final(enum spool_state st);

/* Writes a state payload. */
void state_payload_encode(uint8_t out[STATE_PAYLOAD_SIZE], enum spool_state st, uint64_t until_ms);

/* Writes a state payload with every field. */
void state_payload_encode_rec(uint8_t out[STATE_PAYLOAD_SIZE], const struct state_rec *r);

/*
 * Reads a state payload of len octets. Returns 0 with *st (and *until_ms, if
 * not NULL) set, or -1 when it is shorter than STATE_PAYLOAD_SIZE or its state
 * is not one of enum spool_state's written values (HELD .. RCPT_DONE).
 */
int state_payload_decode(const uint8_t *p, size_t len, enum spool_state *st, uint64_t *until_ms);
/* The same, every field. */
int state_payload_decode_rec(const uint8_t *p, size_t len, struct state_rec *r);

struct state_entry {
	uint64_t id;
	uint64_t order; /* position among the records added */
	uint64_t until_ms;
	uint16_t attempts;
	uint8_t state; /* enum spool_state */
	uint8_t flags; /* STATE_F_*, of that last record */
};

/* The state records of a spool, added in the order they apply. Zero-initialise. */
struct state_table {
	struct state_entry *v;
	size_t n, cap;
	bool sorted;
};

/* Adds one state record (after the ones added before). 0 or -ENOMEM. */
int state_table_add(struct state_table *t, uint64_t id, enum spool_state st);
/* The same with flags, attempts and until. A RCPT_DONE record is not added (returns 0). */
int state_table_add_rec(struct state_table *t, uint64_t id, const struct state_rec *r);

/* After the last add: keeps the last state of each id, sorted for lookups. */
void state_table_finish(struct state_table *t);

/*
 * The current state of id after state_table_finish: SPOOL_STATE_QUEUED when
 * no record names it, and for a released message; else the last state.
 */
enum spool_state state_table_lookup(const struct state_table *t, uint64_t id);

/* The last entry for id after state_table_finish, or NULL (RELEASED is returned as is). */
const struct state_entry *state_table_find(const struct state_table *t, uint64_t id);

void state_table_free(struct state_table *t);

#endif
