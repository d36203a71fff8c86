/*
 * spool: the durable message queue. Per-worker append-only segment files of
 * framed records (queue/record.h); messages finished in one loop turn are
 * written with one writev and made durable with one fdatasync, linked behind
 * it in the worker's io_uring (group commit), and each transaction's done
 * callback runs when that completes.
 *
 * Layout under the spool directory:
 *   lock                  flock'd by the running daemon (holds its pid)
 *   w<N>/seg-<SEQ>.log    worker N's segments, SEQ increasing
 *   w<N>/spare-<K>.log    dead segment files kept for reuse (K < 2; never read)
 *
 * Threads: spool_open/spool_close on the main thread before/after the
 * engine runs; everything taking a spool_worker on that worker's thread.
 * Errors: 0 or -errno; constructors NULL with a readable reason.
 */
#ifndef POSTHASTE_QUEUE_SPOOL_H
#define POSTHASTE_QUEUE_SPOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "net/net.h"
#include "queue/state.h"

enum spool_durability {
	SPOOL_FSYNC = 0, /* done after fdatasync returned */
	SPOOL_BATCH,     /* done after the write; fdatasync at least every batch_interval_ms */
	SPOOL_NONE,      /* done after the write; never synced (benchmarks only) */
};

struct spool_config {
	const char *dir;
	enum spool_durability durability;
	uint64_t batch_interval_ms; /* SPOOL_BATCH; default 10 */
	uint64_t reserve_bytes;     /* refuse new transactions below this much free space */
	uint64_t segment_size;      /* start a new segment past this; default 64 MiB */
	bool discard;               /* messages are final once durable (benchmark route) */
	/*
	 * Compaction: the oldest segment, once it has been closed this long and
	 * its live messages take at most a quarter of segment_size, has them
	 * copied forward so it can be removed. Default 30 s; 0 = the default.
	 */
	uint64_t compact_after_ms;
	/*
	 * Write segments through the page cache even where the file system
	 * takes direct I/O (O_DIRECT, the default there: see spool.c).
	 */
	bool buffered_io;
	/*
	 * Optional, for tests: called with each completed fdatasync's result;
	 * what it returns is taken as the result (fault injection).
	 */
	int (*sync_result)(int res);
};

struct spool_envelope {
	const char *sender; /* "" for <> */
	size_t sender_len;
	const char *helo;
	const char *peer; /* printable client address */
	const char *envid;
	const char *const *rcpts;
	const size_t *rcpt_lens;
	const unsigned char *rcpt_notify;
	const char *const *rcpt_orcpt; /* entries may be NULL */
	unsigned nrcpts;
	uint64_t body_size;
	uint16_t flags; /* SPOOL_ENV_* */
};

#define SPOOL_ENV_SMTPUTF8 0x01u
#define SPOOL_ENV_8BITMIME 0x02u
#define SPOOL_ENV_RET_FULL 0x04u
#define SPOOL_ENV_RET_HDRS 0x08u
#define SPOOL_ENV_CHUNKED  0x10u
#define SPOOL_ENV_ESMTP    0x20u

struct spool;
struct spool_worker;
struct spool_txn;

struct spool_stats {
	uint64_t recovered;      /* messages found queued at start-up (not held, not final) */
	uint64_t recovered_held; /* messages found on hold at start-up */
	uint64_t recovered_bad; /* damaged records skipped at start-up */
	uint64_t committed;     /* messages made durable since start */
	uint64_t failed;        /* transactions whose write or sync failed */
	uint64_t bytes;         /* octets written */
	uint64_t writes;        /* writev calls */
	uint64_t syncs;         /* fdatasync calls */
	uint64_t failed_states; /* state records lost to a failed write */
	uint64_t compacted;     /* messages copied forward by compaction */
};

/*
 * Opens or creates the spool, takes its lock (a second daemon gets an error
 * naming the holder), and scans every segment to rebuild the queue: torn
 * tails and bad checksums are logged and skipped, every good record is kept.
 * nworkers: how many workers will call spool_worker_init.
 */
struct spool *spool_open(const struct spool_config *cfg, unsigned nworkers, char *err,
			 size_t errlen);
/* Flushes nothing (workers are stopped by then); frees. Accepts NULL; sets *sp to NULL. */
void spool_close(struct spool **sp);

/* From the engine's worker init hook: opens the worker's segment. 0 or -errno. */
int spool_worker_init(struct spool *sp, struct net_worker *w);
/* The worker's spool, after spool_worker_init. */
struct spool_worker *spool_worker(struct spool *sp, unsigned index);
/* From the engine's turn_end hook: writes (and syncs) what this turn sealed. */
void spool_worker_turn_end(struct spool_worker *sw);
/* From the engine's fini hook. */
void spool_worker_fini(struct spool_worker *sw);

/* Begins a message. NULL with errno: ENOSPC below the free-space reserve, ENOMEM. */
struct spool_txn *spool_txn_begin(struct spool_worker *sw);
/* The queue id the message will have (assigned at begin). */
uint64_t spool_txn_id(const struct spool_txn *t);
/* Puts octets before the body received so far (a trace header). 0 or -errno. */
int spool_txn_prepend(struct spool_txn *t, const char *data, size_t len);
/* Appends body octets (copied once into the transaction's buffers). 0 or -errno. */
int spool_txn_append(struct spool_txn *t, const char *data, size_t len);
/*
 * Seals the message with its envelope and queues it for this turn's group
 * commit. done(arg, res, queue_id) runs on the worker thread: res 0 when the
 * message is durable (per the durability mode), or -errno (ENOSPC, EDQUOT,
 * EIO, ...) when it is not and was not queued. The transaction is gone after
 * done returns.
 */
void spool_txn_commit(struct spool_txn *t, const struct spool_envelope *env,
		      void (*done)(void *arg, int res, uint64_t queue_id), void *arg);
/* The body octets so far as up to max iovecs (the first ones), for a look at the header. */
unsigned spool_txn_body_iov(const struct spool_txn *t, struct iovec *iov, unsigned max);
/* Drops an unsealed transaction. */
void spool_txn_abort(struct spool_txn *t);

/* Formats a queue id as 16 upper-case hex digits (buf: at least 17 octets). */
void spool_id_format(uint64_t id, char *buf);

/* ---- the live queue: messages neither final nor discarded ---- */

struct spool_seg;

/*
 * One queued message as the delivery side sees it. The spool keeps one per
 * message that is not final, on the worker that owns it: the worker that
 * accepted it, or for a recovered message the worker its segment directory
 * maps to (w<N>: N modulo the number of workers). Stable until the message is
 * made final with spool_entry_mark (then freed by it) or the worker ends.
 */
struct spool_entry {
	uint64_t id;
	uint64_t until_ms; /* DEFERRED: unix ms of the next attempt */
	uint16_t attempts; /* delivery attempts made so far */
	uint8_t state;     /* SPOOL_STATE_QUEUED, HELD or DEFERRED */
	uint8_t flags;     /* STATE_F_* (queue/state.h): set by spool_entry_mark, never cleared */
	uint32_t nrcpt_done;
	uint32_t *rcpt_done; /* RCPT_DONE indices (sorted): recovered, and added by
				spool_entry_mark; NULL when none */
	void *owner;         /* the delivery side's pointer; the spool never touches it */
	/* private */
	struct spool_seg *seg;
	uint64_t off; /* the record's header in its segment */
	uint32_t len; /* payload octets */
	struct spool_entry *hnext;
	struct spool_txn *moving; /* its compaction copy in flight */
	struct spool_hot *hot;    /* the message still in memory, right after its commit */
};

struct spool_hooks {
	/*
	 * A message joined this worker's live queue: committed (right after its
	 * transaction's done callback) or recovered (from spool_worker_announce).
	 */
	void (*added)(void *arg, struct spool_entry *e);
	/*
	 * Keep a committed message's buffers for spool_entry_take_hot (the relay
	 * does; a hook that never takes them must not, or they sit in memory).
	 */
	bool keep_bodies;
};

/* Installs the worker's hooks (from the engine's worker init hook). */
void spool_worker_set_hooks(struct spool_worker *sw, const struct spool_hooks *h, void *arg);
/* Passes every recovered message the worker owns to hooks.added, once. */
void spool_worker_announce(struct spool_worker *sw);
/* The live entry with this id owned by the worker, or NULL. */
struct spool_entry *spool_entry_find(struct spool_worker *sw, uint64_t id);
/* Live messages the worker owns. */
uint64_t spool_worker_live(const struct spool_worker *sw);
/*
 * Reads the message's record (checksum verified) into a malloc'd buffer:
 * *buf_r holds the payload (envelope + body, queue/envelope.h), *len_r its
 * length. 0, -EIO / -EBADMSG (damaged), -ENOMEM.
 */
int spool_entry_read(struct spool_worker *sw, const struct spool_entry *e, uint8_t **buf_r,
		     size_t *len_r);
/*
 * A message just committed keeps its envelope and body buffers (the ones the
 * record was written from) so that delivery need not read it back: while
 * the worker's kept bytes stay under a bound (64 MiB), until it is taken.
 * spool_entry_take_hot hands them over (NULL when there are none: then use
 * spool_entry_read); the caller frees them with spool_hot_free.
 */
struct spool_hot;
struct spool_hot *spool_entry_take_hot(struct spool_worker *sw, struct spool_entry *e);
/* The envelope octets (spool_envelope_decode_head reads them). */
const uint8_t *spool_hot_env(const struct spool_hot *h, size_t *len_r);
/* The body (trace header and message) as up to max iovecs; the count, or -E2BIG. */
int spool_hot_body(const struct spool_hot *h, struct iovec *iov, unsigned max);
void spool_hot_free(struct spool_hot *h);
/*
 * Appends a state record for e with this turn's group commit (r->state one of
 * HELD, RELEASED, DELETED, DELIVERED, BOUNCED, DEFERRED, RCPT_DONE) and
 * updates e. r->flags are added to e->flags, and the record carries all of
 * e->flags (flags stay set: every later record of e carries them too, and
 * recovery restores them). A final state removes e from the live queue and
 * frees it: e is gone when this returns. The record's durability follows the durability
 * mode; a crash before it is on disk means the message is tried again
 * (at-least-once). 0 or -ENOMEM (e unchanged).
 */
int spool_entry_mark(struct spool_worker *sw, struct spool_entry *e, const struct state_rec *r);

/* Counters summed over the workers (after the engine stopped). */
void spool_stats(const struct spool *sp, struct spool_stats *out);

/* Messages queued (recovered + committed, neither held nor final), summed over workers. */
uint64_t spool_queued(const struct spool *sp);

/* Messages on hold (found at start-up; nothing holds a message while the daemon runs yet). */
uint64_t spool_held(const struct spool *sp);

#endif
