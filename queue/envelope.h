/*
 * envelope: the reader of a RECORD_MESSAGE payload, the inverse of the
 * spool's envelope encoder (queue/spool.c; format in docs/spool.md).
 *
 * Payload, integers little-endian, strings as u16 length + octets (no NUL):
 *
 *   u32 envelope length (the envelope's octets, this field included)
 *   u64 received time (unix ms) | u16 flags (SPOOL_ENV_*) | u64 body length
 *   sender | HELO name | client address | ENVID
 *   u32 recipient count, then per recipient: address | u8 NOTIFY bits | ORCPT
 *   body: the rest of the payload, exactly `body length` octets
 *
 * Zero-copy: every string and the body point into the caller's payload, which
 * must outlive the decoded message. Strings are NOT NUL-terminated; an empty
 * field (the null sender <>, no ENVID, no ORCPT) has length 0 and a non-NULL
 * pointer. The recipient array is allocated (one calloc, never more than the
 * payload could describe) and released with spool_message_free.
 *
 * Thread-safety: none needed; pure function over caller memory.
 */
#ifndef POSTHASTE_QUEUE_ENVELOPE_H
#define POSTHASTE_QUEUE_ENVELOPE_H

#include <stddef.h>
#include <stdint.h>

/* The smallest envelope: fixed fields, four empty strings, no recipients. */
#define SPOOL_ENVELOPE_MIN 34u

struct spool_rcpt {
	const char *addr;
	size_t addr_len;
	uint8_t notify; /* the SMTP layer's NOTIFY bits; 0 when not given */
	const char *orcpt;
	size_t orcpt_len; /* 0: no ORCPT */
};

struct spool_message {
	uint64_t received_ms; /* unix milliseconds */
	uint16_t flags;       /* SPOOL_ENV_* (queue/spool.h); unknown bits kept as written */
	size_t env_len;       /* envelope octets at the start of the payload */
	const char *sender;   /* sender_len 0 for the null sender <> */
	size_t sender_len;
	const char *helo;
	size_t helo_len;
	const char *peer; /* printable client address ("" when unknown) */
	size_t peer_len;
	const char *envid;
	size_t envid_len;
	struct spool_rcpt *rcpts; /* owned: spool_message_free */
	uint32_t nrcpts;
	const uint8_t *body; /* payload + env_len */
	size_t body_len;     /* equals the encoded body length */
};

/*
 * Decodes the len octets at payload (a RECORD_MESSAGE payload) into *out.
 * Never reads outside [payload, payload + len). Every field must lie within
 * the envelope length, the recipients must end exactly at it, the count must
 * fit the octets left (so a damaged count cannot make it allocate much), and
 * the body must be exactly the rest of the payload and equal the encoded body
 * length.
 *
 * Returns 0 with *out filled (free with spool_message_free), or
 *   -EBADMSG  malformed; err says what and at which offset;
 *   -ENOMEM   the recipient array could not be allocated.
 * On error *out is zeroed (spool_message_free on it is harmless).
 */
int spool_envelope_decode(const uint8_t *payload, size_t len, struct spool_message *out, char *err,
                          size_t errlen);

/*
 * The same for an envelope given alone (len octets, exactly the envelope; the
 * body is kept elsewhere): out->body is NULL and out->body_len the encoded
 * body length.
 */
int spool_envelope_decode_head(const uint8_t *env, size_t len, struct spool_message *out,
                               char *err, size_t errlen);

/* Frees the recipient array and sets m->rcpts to NULL; accepts NULL and a freed message. */
void spool_message_free(struct spool_message *m);

#endif
