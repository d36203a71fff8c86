/*
 * spool_scan: a read-only walk over a spool directory's messages, for the
 * queue tools (posthaste queue list/show). It neither takes the spool's lock
 * nor writes anything, so it runs beside a live daemon: segments are append
 * only, and each is mapped at its size of the moment.
 *
 * Segments SPOOL/w<N>/seg-<SEQ>.log are visited in order of their sequence number
 * (the hex digits of the name; ties by path), records in order of offset. Every
 * record is read as recovery reads it (queue/spool.c): a damaged record is
 * skipped and the reader resynchronises on the next valid header, so each good
 * message after damage is still seen. Damage is logged (core/log) and skipped,
 * except a torn tail at the end of a worker's newest segment: that is the
 * daemon's write in progress and is passed over silently. A record with a good
 * checksum whose envelope does not decode is logged and skipped too.
 *
 * State records (queue/state.h) are applied as recovery applies them: the
 * last one for an id, in (segment, offset) order, wins. Messages whose state is
 * final (deleted, delivered, bounced) are not reported; the others come with
 * their state (queued or held). All segments are read before the first
 * message is reported, so memory grows with the number of messages (a few
 * dozen octets each), and each stays mapped until spool_scan returns.
 *
 * Limits: if the daemon
 * truncates a failed write off a segment while it is mapped here, touching the
 * cut pages raises SIGBUS (the window is one failed write on a full or broken
 * disk).
 *
 * Thread-safety: none needed; no state outside the call.
 */
#ifndef POSTHASTE_QUEUE_SPOOL_SCAN_H
#define POSTHASTE_QUEUE_SPOOL_SCAN_H

#include <stddef.h>
#include <stdint.h>

#include "queue/envelope.h"
#include "queue/state.h"

struct spool_scan_item {
	uint64_t queue_id;
	const char *segment;             /* path of the segment file: SPOOL/wN/seg-SEQ.log */
	uint64_t offset;                 /* of the record's header within the segment */
	size_t length;                   /* payload octets; on disk: record_encoded_size(length) */
	const struct spool_message *msg; /* decoded payload */
	enum spool_state state;          /* SPOOL_STATE_QUEUED or SPOOL_STATE_HELD */
	uint8_t flags;                   /* STATE_F_* of its last state record (queue/state.h) */
};

/*
 * Calls each(arg, it) for every valid message of the spool at spool_dir that
 * is not final, in (segment, offset) order. The item, its strings and the message body point
 * into a mapping that is gone when each returns: copy what must outlive it.
 * each returns 0 to go on; anything else stops the scan, and spool_scan then
 * returns that value (use positive values: they cannot clash with -errno).
 *
 * Returns 0 after the whole spool, each's non-zero value, or -errno with a
 * readable reason in err: the spool directory, a worker directory or a
 * segment cannot be opened, read or mapped (files that vanish during the scan,
 * like the daemon's empty segments, are skipped), or out of memory.
 */
int spool_scan(const char *spool_dir, int (*each)(void *arg, const struct spool_scan_item *it),
               void *arg, char *err, size_t errlen);

#endif
