/*
 * The spool: per-worker segment files written by group commit.
 *
 * A transaction's body is copied once, into a chain of buffers that grow
 * geometrically (so a large message is a handful of iovecs). Sealed
 * transactions wait on the worker's pending list; at the end of the loop turn
 * every pending transaction that fits in one writev (IOV_MAX iovecs) becomes a
 * batch: record header, envelope and body buffers of each, written at the
 * segment's end in one request, with an fdatasync linked behind it (the
 * kernel starts the sync the moment the write completes). Writes go one at a
 * time, each starting where the last ended; the next batch is written as soon
 * as the last write completes, while its sync may still be running, so up to
 * BATCHES_MAX batches are in flight, the newest being written and the others
 * syncing (the block layer merges flushes that overlap). A sync issued after
 * the writes of every batch before it makes them all durable: when one
 * completes, its batch and every older unanswered one get their answers
 * together, in order (their own syncs, when they complete, find nothing left to
 * do). What is sealed meanwhile forms the next batch, which is what makes the
 * commit a group commit.
 *
 * Direct I/O: where the file system takes O_DIRECT (and unless the
 * configuration says buffered_io), the batch is copied once into an aligned
 * staging buffer and written with O_DIRECT. The page cache copy, the delayed
 * allocation and the writeback then cost the worker nothing (they were a
 * quarter of its CPU time on 100 KiB messages, in io_uring's worker threads),
 * and the sync has only the device to flush. Writes must start and end on
 * DIO_ALIGN boundaries: a batch starts at the block holding the segment's end
 * (its first octets rewritten with what they already hold, kept in tailblk)
 * and ends with zeros up to the next boundary, which the next batch writes
 * over; readers take zeros at the end of a segment as its end. A clean stop
 * cuts them off.
 *
 * A failed or short write leaves garbage past the segment's known end: the
 * segment is truncated back to it and the batch's transactions fail (the SMTP
 * side answers 452/451); the next batch tries again, so service resumes by
 * itself when the disk does. A failed sync puts everything written since the
 * last good one in doubt: every unanswered batch fails (the one being written
 * too: the rollback flag), and the segment is cut back to where the oldest of
 * them began, once the write in flight has completed. Nothing after that point
 * was acknowledged. (Not so in the batch and none durabilities, where only a
 * compaction copy's batch is synced and later batches are answered at once:
 * there nothing is cut.)
 *
 * Recycling: a dead segment file at least a segment's size is not unlinked
 * but renamed to spare-<n>.log (up to SPARES_MAX per worker directory; the
 * scanners only read seg-*), and the next new segment takes it over: its
 * header is rewritten for the new seq, and its batches then overwrite blocks
 * the file system has already allocated, so their fdatasync needs no journal
 * commit (no size or extent change), only the device flush. Records are
 * bound to their segment's seq (record.h, version 2): what an earlier use of
 * the file left after the new data's end never verifies, and readers take it
 * as the end. The crash-ordering argument is at segs_gc and spare_take.
 */
#include "queue/spool.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/compiler.h"
#include "core/log.h"
#include "queue/record.h"
#include "queue/state.h"

#define BODY_CHUNK_MIN  (16u * 1024)
#define BODY_CHUNK_MAX  (4u * 1024 * 1024)
#define SPACE_CHECK_MS  500
#define SEGMENT_DEFAULT (64ull << 20)
#define COMPACT_CHECK_MS 1000
#define HOT_MAX (64ull << 20) /* bytes of just-committed messages kept in memory, per worker */
#define COMPACT_AFTER_DEFAULT 30000
#define COMPACT_BATCH_MAX 4096 /* messages copied per check */
#define DIO_ALIGN 4096u /* direct I/O: buffer, offset and length alignment (any device's) */
#define SPARES_MAX 2    /* dead segment files kept per worker for new segments to reuse */

struct body_chunk {
	struct body_chunk *next;
	size_t len, cap;
	char data[];
};

/* A segment file some worker reads from and, for its current one, writes to. */
struct spool_seg {
	struct spool_seg *next; /* the owner's list, oldest first */
	int dirfd;              /* borrowed: the worker directory's */
	int rfd;                /* read-only, opened on the first read; -1 */
	uint64_t seq;
	uint64_t live;  /* live entries in it */
	uint64_t live_bytes; /* their records' payload octets */
	unsigned moving; /* compaction copies of its messages in flight */
	bool writing;   /* the owner appends to it */
	uint64_t closed_ms; /* monotonic: when it stopped being written (0: never written here) */
	bool pinned;    /* its state records name messages outside the owner's segments */
	struct segment_header hdr; /* its records' version and seq (their binding) */
	char name[64];
};

struct spool_txn {
	struct spool_worker *sw;
	enum record_type type; /* MESSAGE, or STATE (a spool_entry_mark) */
	uint8_t st[STATE_PAYLOAD_SIZE];
	uint64_t off; /* the record's segment offset, once batched */
	struct spool_entry *moved; /* a compaction copy of this live entry */
	struct spool_txn *next; /* pending / batch list */
	struct body_chunk *head, *tail;
	uint64_t body_len;
	uint64_t id;
	uint8_t header[RECORD_HEADER_SIZE];
	size_t pad;
	char *env; /* encoded envelope */
	size_t env_len;
	unsigned niov; /* iovecs this transaction needs in a batch */
	void (*done)(void *arg, int res, uint64_t queue_id);
	void *arg;
	int fail; /* sealing failed: answered at the end of the turn, never from commit */
};

/* Transactions written together: one write, then (usually) one sync linked to it. */
struct spool_batch {
	struct spool_worker *sw;
	struct net_io write_io, sync_io;
	struct spool_txn *head, *tail; /* in file order */
	uint64_t off, len;             /* their octets in the segment */
	bool sync;                     /* an fdatasync is linked behind the write */
	bool write_pending, sync_pending; /* completions to come: the slot is busy */
	bool queued;                   /* in the unanswered FIFO */
	uint8_t tail0[DIO_ALIGN];      /* direct I/O: tailblk as it was at off */
};

#define BATCHES_MAX 4 /* batches in flight per worker (written or syncing) */

struct spool_worker {
	struct spool *sp;
	struct net_worker *w;
	unsigned index;
	int dirfd;
	int fd; /* current segment */
	uint64_t seq;
	uint64_t offset; /* known good end of the current segment */
	uint32_t id_counter;
	uint64_t id_ms; /* the millisecond of the last id */
	struct spool_txn *pending_head, *pending_tail;
	struct spool_txn *failed; /* sealing failed: answered at turn end */
	/* group commit's pipeline (see the top) */
	struct spool_batch bslot[BATCHES_MAX];
	struct spool_batch *fifo[BATCHES_MAX]; /* unanswered synced batches, oldest first */
	unsigned fifo_head, fifo_n;
	struct spool_batch *writing;  /* the batch whose write is in flight */
	bool rollback;                /* a sync failed while `writing` was in flight */
	uint64_t rollback_off;        /* where the segment goes back to then */
	uint8_t rollback_tail[DIO_ALIGN];
	struct iovec *iov;
	unsigned iov_cap;
	/* direct I/O (see the top): dfd writes the current segment, -1 when buffered */
	int dfd;
	uint8_t *stage; /* the batch, aligned, from the block holding offset */
	size_t stage_cap;
	uint64_t stage_len; /* what the write must write */
	uint8_t tailblk[DIO_ALIGN]; /* the segment's octets from align_down(offset) to offset */
	bool recycled; /* the current segment is a spare taken over: octets may follow its end */
	bool spare[SPARES_MAX]; /* spare-<n>.log exists in dirfd */
	bool dir_dirty; /* dirfd has removals (unlinks, renames to spares) not yet fsynced */
	dev_t dir_dev;  /* dirfd's identity: recovered segments borrow another fd of it */
	ino_t dir_ino;
	bool dirty; /* SPOOL_BATCH: written since the last sync */
	bool sync_inflight;
	struct net_io batch_sync_io;
	struct net_timer batch_timer;
	struct net_timer space_timer;
	struct net_timer compact_timer;
	bool low_space;
	struct spool_seg *segs_head, *segs_tail; /* owned segments, oldest first */
	uint64_t hot_bytes; /* kept by spool_hot objects still attached to entries */
	struct spool_seg *cur;                    /* the one being written */
	struct spool_entry **htab;                /* live entries by id */
	size_t hsize, hcount;
	uint64_t nheld;
	bool announced;
	struct spool_hooks hooks;
	void *hooks_arg;
	struct spool_stats stats;
} cache_aligned;

struct spool {
	struct spool_config cfg;
	char dir[4096];
	int lockfd;
	unsigned nworkers;
	struct spool_worker *workers;
	uint64_t next_seq; /* first free segment sequence, shared out at worker init */
	uint64_t recovered, recovered_held, recovered_bad;
	uint64_t max_id_ms; /* the newest id's millisecond found at start-up */
	int *dirfds;        /* the worker directories recovery read (segments borrow them) */
	unsigned ndirfds;
};

static const char zeros[8];

/* ---- ids ---- */

void spool_id_format(uint64_t id, char *buf)
{
	snprintf(buf, 17, "%016" PRIX64, id);
}

/*
 * (unix milliseconds:44 | worker:8 | counter:12), strictly increasing per
 * worker and unique for the life of the spool: a worker starts above every id
 * recovery found (so a restart within the same millisecond, or a clock that
 * went back, cannot repeat one), and more than 4096 ids in a millisecond move
 * on to the next millisecond.
 */
static uint64_t id_next(struct spool_worker *sw)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	uint64_t now = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
	if (now > sw->id_ms) {
		sw->id_ms = now;
		sw->id_counter = 0;
	} else if (sw->id_counter == 4096) {
		sw->id_ms++;
		sw->id_counter = 0;
	}
	return (sw->id_ms << 20) | ((uint64_t)(sw->index & 0xff) << 12) | sw->id_counter++;
}

/* ---- the live index ---- */

static size_t hslot(const struct spool_worker *sw, uint64_t id)
{
	uint64_t h = id * 0x9e3779b97f4a7c15ull;
	return (size_t)(h ^ (h >> 29)) & (sw->hsize - 1);
}

static int entry_insert(struct spool_worker *sw, struct spool_entry *e)
{
	if (sw->hcount >= sw->hsize) {
		size_t n = sw->hsize ? sw->hsize * 2 : 1024;
		struct spool_entry **t = calloc(n, sizeof(*t));
		if (!t)
			return -ENOMEM;
		struct spool_entry **old = sw->htab;
		size_t on = sw->hsize;
		sw->htab = t;
		sw->hsize = n;
		for (size_t i = 0; i < on; i++)
			for (struct spool_entry *x = old[i], *nx; x; x = nx) {
				nx = x->hnext;
				size_t k = hslot(sw, x->id);
				x->hnext = t[k];
				t[k] = x;
			}
		free(old);
	}
	size_t k = hslot(sw, e->id);
	e->hnext = sw->htab[k];
	sw->htab[k] = e;
	sw->hcount++;
	e->seg->live++;
	e->seg->live_bytes += e->len;
	if (e->state == SPOOL_STATE_HELD)
		sw->nheld++;
	return 0;
}

struct spool_entry *spool_entry_find(struct spool_worker *sw, uint64_t id)
{
	if (!sw->hsize)
		return NULL;
	for (struct spool_entry *e = sw->htab[hslot(sw, id)]; e; e = e->hnext)
		if (e->id == id)
			return e;
	return NULL;
}

uint64_t spool_worker_live(const struct spool_worker *sw)
{
	return sw->hcount;
}

struct spool_hot {
	char *env;
	size_t env_len;
	struct body_chunk *head;
	uint64_t bytes;
};

void spool_hot_free(struct spool_hot *h)
{
	if (!h)
		return;
	for (struct body_chunk *c = h->head, *n; c; c = n) {
		n = c->next;
		free(c);
	}
	free(h->env);
	free(h);
}

const uint8_t *spool_hot_env(const struct spool_hot *h, size_t *len_r)
{
	*len_r = h->env_len;
	return (const uint8_t *)h->env;
}

int spool_hot_body(const struct spool_hot *h, struct iovec *iov, unsigned max)
{
	unsigned n = 0;
	for (const struct body_chunk *c = h->head; c; c = c->next) {
		if (!c->len)
			continue;
		if (n == max)
			return -E2BIG;
		iov[n++] = (struct iovec){(void *)c->data, c->len};
	}
	return (int)n;
}

struct spool_hot *spool_entry_take_hot(struct spool_worker *sw, struct spool_entry *e)
{
	struct spool_hot *h = e->hot;
	if (h) {
		e->hot = NULL;
		sw->hot_bytes -= h->bytes;
	}
	return h;
}

static void entry_drop_hot(struct spool_worker *sw, struct spool_entry *e)
{
	spool_hot_free(spool_entry_take_hot(sw, e));
}

static void seg_free(struct spool_seg *g)
{
	if (g->rfd >= 0)
		close(g->rfd);
	free(g);
}

static int seg_retire(struct spool_worker *sw, struct spool_seg *g);

/*
 * Removes owned segments from the oldest on while nothing is live in them:
 * in that order only, so that a removed segment's state records can only
 * name messages in segments already removed (or in itself). A pinned one
 * stops the walk; start-up recovery deals with it.
 *
 * Removal is an unlink or a rename to a spare name (seg_retire): for
 * recovery the two are the same, a directory operation after which the
 * scanners no longer see the file. Neither is synced here: a crash may undo
 * the latest ones, and the file systems the spool runs on (ext4, XFS:
 * journalled metadata) keep directory operations in order, so what comes
 * back is the newest removed segments, as if they had not died yet. What a
 * spare must not do is lose its old content while its removal (or an older
 * segment's) can still be undone: spare_take syncs the directory before it
 * writes over a spare.
 */
static void segs_gc(struct spool_worker *sw)
{
	while (sw->segs_head && !sw->segs_head->live && !sw->segs_head->writing &&
	       !sw->segs_head->pinned && !sw->segs_head->moving) {
		struct spool_seg *g = sw->segs_head;
		int r = seg_retire(sw, g);
		if (r < 0) {
			log_warn("spool: worker %u: cannot remove segment %s: %s", sw->index, g->name,
				 strerror(-r));
			g->pinned = true;
			return;
		}
		sw->segs_head = g->next;
		if (!sw->segs_head)
			sw->segs_tail = NULL;
		seg_free(g);
	}
}

static void entry_remove(struct spool_worker *sw, struct spool_entry *e)
{
	struct spool_entry **pp = &sw->htab[hslot(sw, e->id)];
	while (*pp && *pp != e)
		pp = &(*pp)->hnext;
	if (*pp) {
		*pp = e->hnext;
		sw->hcount--;
		if (e->state == SPOOL_STATE_HELD)
			sw->nheld--;
	}
	e->seg->live--;
	e->seg->live_bytes -= e->len;
	if (e->moving)
		e->moving->moved = NULL; /* the copy lands as a dead record */
	entry_drop_hot(sw, e);
	free(e->rcpt_done);
	free(e);
	segs_gc(sw);
}

static struct spool_seg *seg_new(int dirfd, uint64_t seq, const char *name)
{
	struct spool_seg *g = calloc(1, sizeof(*g));
	if (!g)
		return NULL;
	g->dirfd = dirfd;
	g->rfd = -1;
	g->seq = seq;
	snprintf(g->name, sizeof(g->name), "%s", name);
	return g;
}

static void seg_append(struct spool_worker *sw, struct spool_seg *g)
{
	if (sw->segs_tail)
		sw->segs_tail->next = g;
	else
		sw->segs_head = g;
	sw->segs_tail = g;
}

/* ---- files ---- */

static int fsync_dir(int dirfd)
{
	return fsync(dirfd) < 0 ? -errno : 0;
}

static void spare_name(char *buf, size_t len, unsigned slot)
{
	snprintf(buf, len, "spare-%u.log", slot);
}

/*
 * Takes dead segment g out of the spool's view: renamed to a free spare slot
 * when recycling it pays (it is in the worker's own directory and at least a
 * segment's size: a shorter one would be extended anyway), else unlinked.
 * 0 (also when it is already gone), or -errno with the file still there.
 */
static int seg_retire(struct spool_worker *sw, struct spool_seg *g)
{
	struct stat st;
	bool own = g->dirfd == sw->dirfd ||
		   (fstat(g->dirfd, &st) == 0 && st.st_dev == sw->dir_dev && st.st_ino == sw->dir_ino);
	unsigned slot = 0;
	while (slot < SPARES_MAX && sw->spare[slot])
		slot++;
	if (slot < SPARES_MAX && own && fstatat(g->dirfd, g->name, &st, 0) == 0 &&
	    (uint64_t)st.st_size >= sw->sp->cfg.segment_size) {
		char spare[32];
		spare_name(spare, sizeof(spare), slot);
		if (renameat(g->dirfd, g->name, g->dirfd, spare) == 0) {
			sw->spare[slot] = true;
			sw->dir_dirty = true;
			return 0;
		}
		if (errno == ENOENT)
			return 0;
		log_once(LOG_WARN, "spool: cannot keep a dead segment for reuse (%s); removing it",
			 strerror(errno));
	}
	if (unlinkat(g->dirfd, g->name, 0) < 0)
		return errno == ENOENT ? 0 : -errno;
	if (own) {
		sw->dir_dirty = true;
	} else {
		/*
		 * another worker directory's (the worker count went down): spare_take
		 * only syncs its own, and this removal must be as durable as the ones
		 * there before a spare is written over
		 */
		int r = fsync_dir(g->dirfd);
		if (r < 0)
			log_warn("spool: worker %u: cannot sync a directory after removing %s: %s",
				 sw->index, g->name, strerror(-r));
	}
	return 0;
}

/*
 * Makes a spare file the new segment `name`, with header hdr: returns its
 * fd (write-only, offset SEGMENT_HEADER_SIZE is the data's end), or -1 when
 * there is no spare to use (the caller creates a file).
 *
 * Crash ordering: (1) the directory is synced, so that the spare's own
 * removal and every one before it are durable before anything of its old
 * content is lost (else a crash could bring back an older segment whose
 * messages this one's state records made final, with those records gone);
 * (2) the new header is written over the old one and synced while the file
 * still has its spare name, so that it never appears as a segment with its
 * old header; (3) it is renamed to `name` (the caller syncs the directory,
 * as for a new file). From (2) on the file reads as an empty segment of the
 * new seq: the old records are bound to another seq. A crash anywhere leaves
 * either a spare (reused or removed at the next start) or that empty segment.
 */
static int spare_take(struct spool_worker *sw, const char *name,
		      const uint8_t hdr[SEGMENT_HEADER_SIZE])
{
	for (unsigned slot = 0; slot < SPARES_MAX; slot++) {
		if (!sw->spare[slot])
			continue;
		sw->spare[slot] = false; /* taken, or removed below */
		char spare[32];
		spare_name(spare, sizeof(spare), slot);
		if (sw->dir_dirty) {
			int r = fsync_dir(sw->dirfd);
			if (r < 0) {
				log_warn("spool: worker %u: cannot sync the directory: %s; not "
					 "reusing segment files",
					 sw->index, strerror(-r));
				sw->spare[slot] = true;
				return -1;
			}
			sw->dir_dirty = false;
		}
		int fd = openat(sw->dirfd, spare, O_RDWR | O_CLOEXEC);
		if (fd < 0) {
			if (errno != ENOENT)
				unlinkat(sw->dirfd, spare, 0);
			continue;
		}
		/*
		 * The old header's seq must bind its records differently: not the same
		 * tag (a leftover record would read as damage, not as the end), which
		 * also rules out the same seq. One that does not decode is not reused.
		 */
		struct segment_header old;
		uint8_t ohdr[SEGMENT_HEADER_SIZE];
		struct stat st;
		bool ok = fstat(fd, &st) == 0 && (uint64_t)st.st_size >= sw->sp->cfg.segment_size &&
			  pread(fd, ohdr, sizeof(ohdr), 0) == (ssize_t)sizeof(ohdr) &&
			  segment_header_decode(ohdr, sizeof(ohdr), &old) == 0 &&
			  (old.version == SEGMENT_VERSION_V1 ? 0 : record_tag(old.seq)) !=
			      record_tag(sw->seq);
		if (ok && pwrite(fd, hdr, SEGMENT_HEADER_SIZE, 0) == (ssize_t)SEGMENT_HEADER_SIZE &&
		    fdatasync(fd) == 0 && renameat(sw->dirfd, spare, sw->dirfd, name) == 0)
			return fd;
		if (ok)
			log_warn("spool: worker %u: cannot reuse %s: %s; removing it", sw->index,
				 spare, strerror(errno ? errno : EIO));
		close(fd);
		unlinkat(sw->dirfd, spare, 0);
		sw->dir_dirty = true;
	}
	return -1;
}

static int segment_open_new(struct spool_worker *sw)
{
	char name[64];
	snprintf(name, sizeof(name), "seg-%016" PRIx64 ".log", sw->seq);
	uint8_t hdr[SEGMENT_HEADER_SIZE];
	uint64_t created = (uint64_t)time(NULL);
	segment_header_encode(hdr, sw->index, sw->seq, created);
	int fd = spare_take(sw, name, hdr);
	bool recycled = fd >= 0;
	if (!recycled) {
		fd = openat(sw->dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
		if (fd < 0)
			return -errno;
		if (pwrite(fd, hdr, sizeof(hdr), 0) != (ssize_t)sizeof(hdr) || fdatasync(fd) < 0) {
			int err = errno ? -errno : -EIO;
			close(fd);
			unlinkat(sw->dirfd, name, 0);
			return err;
		}
	}
	int r = fsync_dir(sw->dirfd); /* the new name itself must survive a crash */
	struct spool_seg *g = r < 0 ? NULL : seg_new(sw->dirfd, sw->seq, name);
	if (!g) {
		close(fd);
		if (recycled)
			unlinkat(sw->dirfd, name, 0);
		return r < 0 ? r : -ENOMEM;
	}
	sw->dir_dirty = false;
	g->hdr = (struct segment_header){SEGMENT_VERSION, sw->index, sw->seq, created};
	g->writing = true;
	seg_append(sw, g);
	if (sw->cur) {
		sw->cur->writing = false;
		sw->cur->closed_ms = net_worker_now_ms(sw->w);
	}
	sw->cur = g;
	if (sw->dfd >= 0 || sw->recycled) {
		/*
		 * The old segment ends at sw->offset: direct I/O's zeros past it, or
		 * what an earlier use of a recycled file left there, go (readers stop
		 * at them anyway). Its size stays at least the segment size, so that
		 * it is worth recycling in turn; the next use's last batch may extend
		 * it by up to that batch.
		 */
		if (sw->dfd >= 0)
			close(sw->dfd);
		if (ftruncate(sw->fd, (off_t)sw->offset) < 0)
			log_warn("spool: worker %u: cannot cut the previous segment's padding: %s",
				 sw->index, strerror(errno));
	}
	if (sw->fd >= 0)
		close(sw->fd);
	sw->fd = fd;
	sw->dfd = -1;
	sw->recycled = recycled;
	sw->offset = SEGMENT_HEADER_SIZE;
	if (!sw->sp->cfg.buffered_io) {
		sw->dfd = openat(sw->dirfd, name, O_WRONLY | O_DIRECT | O_CLOEXEC);
		if (sw->dfd < 0)
			log_once(LOG_INFO, "spool: the file system does not take direct I/O (%s); "
					   "writing through the page cache",
				 strerror(errno));
		memcpy(sw->tailblk, hdr, sizeof(hdr)); /* the header: the first block's start */
	}
	segs_gc(sw);
	return 0;
}

/* Past the segment size: the next batch goes to a new segment. */
static int segment_rotate(struct spool_worker *sw)
{
	uint64_t old = sw->seq;
	sw->seq += sw->sp->nworkers; /* sequences interleave across workers: never collide */
	int r = segment_open_new(sw); /* the old one goes once nothing in it is live */
	if (r < 0) {
		sw->seq = old;
		return r;
	}
	return 0;
}

/* ---- free space ---- */

static void space_check(struct spool_worker *sw)
{
	struct statvfs st;
	if (!sw->sp->cfg.reserve_bytes || fstatvfs(sw->dirfd, &st) < 0)
		return;
	uint64_t avail = (uint64_t)st.f_bavail * st.f_frsize;
	bool low = avail < sw->sp->cfg.reserve_bytes;
	if (low != sw->low_space)
		log_msg(low ? LOG_WARN : LOG_INFO,
			"spool: worker %u: %" PRIu64 " MiB free, reserve %" PRIu64 " MiB: %s",
			sw->index, avail >> 20, sw->sp->cfg.reserve_bytes >> 20,
			low ? "refusing new mail" : "accepting mail again");
	sw->low_space = low;
}

static void space_timer_fire(struct net_timer *t, struct net_worker *w)
{
	struct spool_worker *sw = container_of(t, struct spool_worker, space_timer);
	space_check(sw);
	net_timer_start(w, t, SPACE_CHECK_MS);
}

/* ---- transactions ---- */

struct spool_txn *spool_txn_begin(struct spool_worker *sw)
{
	if (sw->low_space) {
		errno = ENOSPC;
		return NULL;
	}
	struct spool_txn *t = calloc(1, sizeof(*t));
	if (!t) {
		errno = ENOMEM;
		return NULL;
	}
	t->sw = sw;
	t->id = id_next(sw);
	return t;
}

uint64_t spool_txn_id(const struct spool_txn *t)
{
	return t->id;
}

int spool_txn_prepend(struct spool_txn *t, const char *data, size_t len)
{
	struct body_chunk *c = malloc(sizeof(*c) + len);
	if (!c)
		return -ENOMEM;
	memcpy(c->data, data, len);
	c->len = c->cap = len; /* full: appends go to the chunks after it */
	c->next = t->head;
	t->head = c;
	if (!t->tail)
		t->tail = c;
	t->body_len += len;
	return 0;
}

int spool_txn_append(struct spool_txn *t, const char *data, size_t len)
{
	while (len) {
		struct body_chunk *c = t->tail;
		if (!c || c->len == c->cap) {
			size_t cap = c ? MIN(MAX(c->cap * 2, (size_t)BODY_CHUNK_MIN), (size_t)BODY_CHUNK_MAX)
				       : BODY_CHUNK_MIN;
			struct body_chunk *n = malloc(sizeof(*n) + cap);
			if (!n)
				return -ENOMEM;
			n->next = NULL;
			n->len = 0;
			n->cap = cap;
			if (c)
				c->next = n;
			else
				t->head = n;
			t->tail = c = n;
		}
		size_t k = MIN(len, c->cap - c->len);
		memcpy(c->data + c->len, data, k);
		c->len += k;
		t->body_len += k;
		data += k;
		len -= k;
	}
	return 0;
}

unsigned spool_txn_body_iov(const struct spool_txn *t, struct iovec *iov, unsigned max)
{
	unsigned n = 0;
	for (const struct body_chunk *c = t->head; c && n < max; c = c->next)
		if (c->len)
			iov[n++] = (struct iovec){(void *)c->data, c->len};
	return n;
}

static void txn_free(struct spool_txn *t)
{
	for (struct body_chunk *c = t->head, *n; c; c = n) {
		n = c->next;
		free(c);
	}
	free(t->env);
	free(t);
}

void spool_txn_abort(struct spool_txn *t)
{
	if (t)
		txn_free(t);
}

/* Envelope encoding (little-endian): see docs/spool.md. */
static void put16(char **p, uint16_t v)
{
	(*p)[0] = (char)(v & 0xff);
	(*p)[1] = (char)(v >> 8);
	*p += 2;
}

static void put32(char **p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		(*p)[i] = (char)((v >> (8 * i)) & 0xff);
	*p += 4;
}

static void put64(char **p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		(*p)[i] = (char)((v >> (8 * i)) & 0xff);
	*p += 8;
}

static void putstr(char **p, const char *s, size_t len)
{
	put16(p, (uint16_t)len);
	if (len)
		memcpy(*p, s, len);
	*p += len;
}

static size_t slen(const char *s)
{
	return s ? MIN(strlen(s), (size_t)UINT16_MAX) : 0;
}

static int envelope_encode(struct spool_txn *t, const struct spool_envelope *env)
{
	size_t need = 4 + 8 + 2 + 8 + 2 * 4 + env->sender_len + slen(env->helo) + slen(env->peer) +
		      slen(env->envid) + 4;
	for (unsigned i = 0; i < env->nrcpts; i++)
		need += 2 + env->rcpt_lens[i] + 1 + 2 + slen(env->rcpt_orcpt ? env->rcpt_orcpt[i] : NULL);
	char *buf = malloc(need), *p = buf;
	if (!buf)
		return -ENOMEM;
	put32(&p, (uint32_t)need);
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	put64(&p, (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000);
	put16(&p, env->flags);
	put64(&p, t->body_len);
	putstr(&p, env->sender, MIN(env->sender_len, (size_t)UINT16_MAX));
	putstr(&p, env->helo, slen(env->helo));
	putstr(&p, env->peer, slen(env->peer));
	putstr(&p, env->envid, slen(env->envid));
	put32(&p, env->nrcpts);
	for (unsigned i = 0; i < env->nrcpts; i++) {
		putstr(&p, env->rcpts[i], MIN(env->rcpt_lens[i], (size_t)UINT16_MAX));
		*p++ = (char)(env->rcpt_notify ? env->rcpt_notify[i] : 0);
		const char *o = env->rcpt_orcpt ? env->rcpt_orcpt[i] : NULL;
		putstr(&p, o, slen(o));
	}
	t->env = buf;
	t->env_len = (size_t)(p - buf);
	return 0;
}

/* The iovecs of one sealed transaction, into iov (t->niov of them). */
static unsigned txn_iov(struct spool_txn *t, struct iovec *iov)
{
	unsigned n = 0;
	iov[n++] = (struct iovec){t->header, RECORD_HEADER_SIZE};
	if (t->type == RECORD_STATE) {
		iov[n++] = (struct iovec){t->st, sizeof(t->st)};
		if (t->pad)
			iov[n++] = (struct iovec){(void *)zeros, t->pad};
		return n;
	}
	iov[n++] = (struct iovec){t->env, t->env_len};
	for (struct body_chunk *c = t->head; c; c = c->next)
		if (c->len)
			iov[n++] = (struct iovec){c->data, c->len};
	if (t->pad)
		iov[n++] = (struct iovec){(void *)zeros, t->pad};
	return n;
}

static void pending_push(struct spool_worker *sw, struct spool_txn *t)
{
	t->next = NULL;
	if (sw->pending_tail)
		sw->pending_tail->next = t;
	else
		sw->pending_head = t;
	sw->pending_tail = t;
}

/* A transaction that cannot be sealed is answered at the end of the turn. */
static void txn_fail_later(struct spool_txn *t, int err)
{
	t->fail = err;
	t->next = t->sw->failed;
	t->sw->failed = t;
}

void spool_txn_commit(struct spool_txn *t, const struct spool_envelope *env,
		      void (*done)(void *arg, int res, uint64_t queue_id), void *arg)
{
	struct spool_worker *sw = t->sw;
	t->type = RECORD_MESSAGE;
	t->done = done;
	t->arg = arg;
	int r = envelope_encode(t, env);
	if (r < 0) {
		txn_fail_later(t, r);
		return;
	}
	/* the record: header, then envelope + body as one payload */
	struct iovec stack[64];
	unsigned nbody = 0;
	for (struct body_chunk *c = t->head; c; c = c->next)
		nbody += c->len ? 1 : 0;
	struct iovec *payload = nbody + 1 <= ARRAY_SIZE(stack) ? stack
							     : malloc((nbody + 1) * sizeof(*payload));
	if (!payload) {
		txn_fail_later(t, -ENOMEM);
		return;
	}
	unsigned k = 0;
	payload[k++] = (struct iovec){t->env, t->env_len};
	for (struct body_chunk *c = t->head; c; c = c->next)
		if (c->len)
			payload[k++] = (struct iovec){c->data, c->len};
	if (t->env_len + t->body_len > RECORD_MAX_PAYLOAD) {
		if (payload != stack)
			free(payload);
		txn_fail_later(t, -EMSGSIZE);
		return;
	}
	t->pad = record_header_encode(t->header, RECORD_MESSAGE, 0, t->id, payload, k);
	if (payload != stack)
		free(payload);
	t->niov = 2 + nbody + (t->pad ? 1 : 0);
	if (t->niov > IOV_MAX) {
		txn_fail_later(t, -EMSGSIZE);
		return;
	}
	pending_push(sw, t);
}

/* ---- compaction ---- */

static void push_state(struct spool_worker *sw, uint64_t id, const struct state_rec *r);

static void compact_landed(struct spool_worker *sw, struct spool_txn *t, int res)
{
	struct spool_entry *e = t->moved;
	struct spool_seg *old = (struct spool_seg *)t->arg;
	old->moving--;
	if (e) {
		e->moving = NULL;
		if (res == 0) {
			e->seg->live--;
			e->seg->live_bytes -= e->len;
			e->seg = sw->cur;
			e->off = t->off;
			e->seg->live++;
			e->seg->live_bytes += e->len;
			sw->stats.compacted++;
		}
	}
	segs_gc(sw);
}

/*
 * Copies the live messages of the oldest segment forward when few are left
 * in it (long-deferred or held ones keep it, and with it every newer
 * segment, from being removed). Each copy is the same record (same id), then
 * the message's current state again, because the state records in the old
 * segment go with it. Recovery keeps the newest copy of an id.
 */
static void compact_check(struct spool_worker *sw)
{
	struct spool_seg *g = sw->segs_head;
	uint64_t after = sw->sp->cfg.compact_after_ms ? sw->sp->cfg.compact_after_ms
						      : COMPACT_AFTER_DEFAULT;
	uint64_t now = net_worker_now_ms(sw->w);
	if (!g || g == sw->cur || g->writing || g->pinned || !g->live || g->moving ||
	    g->live_bytes > sw->sp->cfg.segment_size / 4 || sw->low_space)
		return;
	if (!g->closed_ms)
		g->closed_ms = now; /* recovered: its age counts from now */
	if (now - g->closed_ms < after)
		return;
	unsigned n = 0;
	for (size_t i = 0; i < sw->hsize && n < COMPACT_BATCH_MAX; i++) {
		for (struct spool_entry *e = sw->htab[i]; e && n < COMPACT_BATCH_MAX; e = e->hnext) {
			if (e->seg != g || e->moving)
				continue;
			if (3 + 2 * ((uint64_t)e->nrcpt_done + 1) > IOV_MAX)
				continue; /* its copy and states would not fit one batch: it stays */
			uint8_t *buf;
			size_t len;
			if (spool_entry_read(sw, e, &buf, &len) < 0) {
				g->pinned = true; /* a damaged message stays where it is */
				return;
			}
			struct spool_txn *t = calloc(1, sizeof(*t));
			if (!t) {
				free(buf);
				return;
			}
			t->sw = sw;
			t->id = e->id;
			t->type = RECORD_MESSAGE;
			t->env = (char *)buf; /* the whole payload, as it was */
			t->env_len = len;
			struct iovec iv = {buf, len};
			t->pad = record_header_encode(t->header, RECORD_MESSAGE, 0, e->id, &iv, 1);
			t->niov = 2 + (t->pad ? 1 : 0);
			t->moved = e;
			t->arg = g;
			e->moving = t;
			g->moving++;
			pending_push(sw, t);
			if (e->state == SPOOL_STATE_HELD || e->state == SPOOL_STATE_DEFERRED)
				push_state(sw, e->id,
					   &(struct state_rec){.state = e->state,
							       .flags = e->flags,
							       .attempts = e->attempts,
							       .until_ms = e->until_ms});
			else if (e->flags) /* queued, with flags: RELEASED reads as queued */
				push_state(sw, e->id,
					   &(struct state_rec){.state = SPOOL_STATE_RELEASED,
							       .flags = e->flags});
			for (uint32_t k = 0; k < e->nrcpt_done; k++)
				push_state(sw, e->id,
					   &(struct state_rec){.state = SPOOL_STATE_RCPT_DONE,
							       .rcpt = e->rcpt_done[k]});
			n++;
		}
	}
	if (n)
		log_info("spool: worker %u: compacting %s: %u messages copied forward", sw->index,
			 g->name, n);
}

static void compact_timer_fire(struct net_timer *t, struct net_worker *w)
{
	struct spool_worker *sw = container_of(t, struct spool_worker, compact_timer);
	if (!sw->sp->cfg.discard)
		compact_check(sw);
	net_timer_start(w, t, COMPACT_CHECK_MS);
}

/* ---- group commit ---- */

/*
 * Answers a batch's transactions with res (0: durable) and frees the slot.
 * Success makes each message a live entry of the current segment.
 */
static void batch_answer(struct spool_worker *sw, struct spool_batch *b, int res)
{
	struct spool_txn *t = b->head;
	b->head = b->tail = NULL;
	while (t) {
		struct spool_txn *n = t->next;
		if (t->type == RECORD_STATE) {
			/* lost with a failed write: the message is tried again after a restart */
			if (res < 0)
				sw->stats.failed_states++;
			txn_free(t);
			t = n;
			continue;
		}
		if (!t->done) {
			/* a compaction copy: the entry now lives in the current segment */
			compact_landed(sw, t, res);
			txn_free(t);
			t = n;
			continue;
		}
		struct spool_entry *e = NULL;
		if (res == 0) {
			sw->stats.committed++;
			if (!sw->sp->cfg.discard && (e = calloc(1, sizeof(*e)))) {
				e->id = t->id;
				e->seg = sw->cur;
				e->off = t->off;
				e->len = (uint32_t)(t->env_len + t->body_len);
				if (entry_insert(sw, e) < 0) {
					free(e);
					e = NULL;
				}
			}
			if (e && sw->hooks.keep_bodies && sw->hot_bytes + t->body_len <= HOT_MAX) {
				/* the buffers the record was written from stay for delivery */
				struct spool_hot *h = malloc(sizeof(*h));
				if (h) {
					*h = (struct spool_hot){t->env, t->env_len, t->head, t->body_len};
					t->env = NULL;
					t->head = t->tail = NULL;
					e->hot = h;
					sw->hot_bytes += h->bytes;
				}
			}
			if (!e && !sw->sp->cfg.discard) {
				sw->cur->pinned = true; /* its live count misses this message */
				log_once(LOG_ERR, "spool: out of memory for the live queue: accepted "
						  "messages wait for the next restart");
			}
		} else {
			sw->stats.failed++;
		}
		t->done(t->arg, res, t->id);
		if (e && sw->hooks.added)
			sw->hooks.added(sw->hooks_arg, e);
		txn_free(t);
		t = n;
	}
}

static struct spool_batch *batch_slot(struct spool_worker *sw)
{
	for (unsigned i = 0; i < BATCHES_MAX; i++) {
		struct spool_batch *b = &sw->bslot[i];
		if (!b->write_pending && !b->sync_pending && !b->queued)
			return b;
	}
	return NULL;
}

static bool batches_idle(const struct spool_worker *sw)
{
	for (unsigned i = 0; i < BATCHES_MAX; i++) {
		const struct spool_batch *b = &sw->bslot[i];
		if (b->write_pending || b->sync_pending || b->queued)
			return false;
	}
	return true;
}

static struct spool_batch *fifo_at(const struct spool_worker *sw, unsigned i)
{
	return sw->fifo[(sw->fifo_head + i) % BATCHES_MAX];
}

static void fifo_push(struct spool_worker *sw, struct spool_batch *b)
{
	sw->fifo[(sw->fifo_head + sw->fifo_n++) % BATCHES_MAX] = b;
	b->queued = true;
}

static struct spool_batch *fifo_pop(struct spool_worker *sw)
{
	struct spool_batch *b = sw->fifo[sw->fifo_head];
	sw->fifo_head = (sw->fifo_head + 1) % BATCHES_MAX;
	sw->fifo_n--;
	b->queued = false;
	return b;
}

/* Cuts the segment back to off, the end of what is known to be good. */
static void segment_cut(struct spool_worker *sw, uint64_t off)
{
	if (ftruncate(sw->fd, (off_t)off) < 0)
		log_err("spool: worker %u: cannot truncate after a failed write: %s", sw->index,
			strerror(errno));
}

static void log_write_error(struct spool_worker *sw, const char *what, int res)
{
	if (res != -ENOSPC && res != -EDQUOT)
		log_err("spool: worker %u: %s failed: %s", sw->index, what, strerror(-res));
	else
		log_once(LOG_WARN, "spool: the spool's file system is full (%s); "
				   "answering 452 until writes succeed",
			 strerror(-res));
}

static void rollback_to(struct spool_worker *sw, uint64_t off, const uint8_t *tail)
{
	sw->offset = off;
	if (sw->dfd >= 0)
		memcpy(sw->tailblk, tail, sizeof(sw->tailblk));
	segment_cut(sw, off);
}

static void write_done(struct net_io *io, int res)
{
	struct spool_batch *b = container_of(io, struct spool_batch, write_io);
	struct spool_worker *sw = b->sw;
	b->write_pending = false;
	sw->writing = NULL;
	if (res >= 0 && (uint64_t)res != (sw->dfd >= 0 ? sw->stage_len : b->len))
		res = -ENOSPC; /* a short file write: the device is full (the linked sync is cancelled) */
	if (sw->rollback) {
		/* a sync failed meanwhile and answered this batch too: the segment goes back */
		sw->rollback = false;
		rollback_to(sw, sw->rollback_off, sw->rollback_tail);
		return;
	}
	if (res < 0) {
		/* drop whatever part of it reached the file: it was never acknowledged */
		log_write_error(sw, "write", res);
		segment_cut(sw, sw->offset);
		if (b->queued) {
			/* the newest in the FIFO (writes go one at a time) */
			sw->fifo_n--;
			b->queued = false;
		}
		batch_answer(sw, b, res);
		return;
	}
	if (sw->dfd >= 0) {
		/* the last block's octets, for the next batch to start with */
		uint64_t base = sw->offset & ~(uint64_t)(DIO_ALIGN - 1);
		uint64_t end = sw->offset + b->len;
		uint64_t from = end & ~(uint64_t)(DIO_ALIGN - 1);
		memcpy(sw->tailblk, sw->stage + (from - base), (size_t)(end - from));
	}
	sw->offset += b->len;
	sw->stats.bytes += b->len;
	if (!b->sync) {
		sw->dirty = true;
		batch_answer(sw, b, 0);
	}
	/* else: its linked sync answers */
}

static void sync_done(struct net_io *io, int res)
{
	struct spool_batch *b = container_of(io, struct spool_batch, sync_io);
	struct spool_worker *sw = b->sw;
	b->sync_pending = false;
	sw->stats.syncs++;
	if (!b->queued)
		return; /* answered already: by a later batch's sync, or as failed */
	if (sw->sp->cfg.sync_result)
		res = sw->sp->cfg.sync_result(res);
	if (res >= 0) {
		/*
		 * This sync was issued when b's write completed, after the writes of
		 * every batch before it: all of them are durable now.
		 */
		for (;;) {
			struct spool_batch *x = fifo_pop(sw);
			batch_answer(sw, x, 0);
			if (x == b)
				break;
		}
		return;
	}
	/*
	 * What was written since the last good sync is in doubt (and a later
	 * fdatasync would not report the error again): every unanswered batch
	 * fails. In the fsync durability that is every batch from the oldest
	 * unanswered one on, and the segment goes back to where it began, once
	 * the write in flight, if any, has completed. (In the others only
	 * compaction copies are synced, and batches after them may be answered
	 * already: nothing is cut, the copies fail and their originals stay.)
	 */
	log_write_error(sw, "fdatasync", res);
	bool cut = sw->sp->cfg.durability == SPOOL_FSYNC;
	struct spool_batch *first = fifo_at(sw, 0);
	uint64_t off = first->off;
	if (cut && sw->dfd >= 0)
		memcpy(sw->rollback_tail, first->tail0, sizeof(sw->rollback_tail));
	while (sw->fifo_n)
		batch_answer(sw, fifo_pop(sw), res);
	if (!cut)
		return;
	if (sw->writing) {
		sw->rollback = true;
		sw->rollback_off = off;
		return;
	}
	rollback_to(sw, off, sw->rollback_tail);
}

static void batch_sync_done(struct net_io *io, int res)
{
	struct spool_worker *sw = container_of(io, struct spool_worker, batch_sync_io);
	sw->sync_inflight = false;
	sw->stats.syncs++;
	if (res < 0)
		log_err("spool: worker %u: fdatasync: %s", sw->index, strerror(-res));
}

static void batch_timer_fire(struct net_timer *t, struct net_worker *w)
{
	struct spool_worker *sw = container_of(t, struct spool_worker, batch_timer);
	if (sw->dirty && !sw->sync_inflight && sw->sp->cfg.durability == SPOOL_BATCH) {
		sw->dirty = false;
		sw->sync_inflight = true;
		if (net_file_fdatasync(w, sw->fd, &sw->batch_sync_io) < 0)
			sw->sync_inflight = false;
	}
	net_timer_start(w, t, sw->sp->cfg.batch_interval_ms);
}

/*
 * Direct I/O: copies the batch's n iovecs (len octets, to go at offset) into
 * the staging buffer after the octets of offset's block that precede it, and
 * pads it with zeros to the next boundary. 0 or -ENOMEM.
 */
static int stage_batch(struct spool_worker *sw, unsigned n, uint64_t len)
{
	size_t head = (size_t)(sw->offset & (DIO_ALIGN - 1));
	size_t total = head + (size_t)len;
	size_t padded = (total + DIO_ALIGN - 1) & ~(size_t)(DIO_ALIGN - 1);
	if (padded > sw->stage_cap) {
		size_t cap = MAX(sw->stage_cap * 2, (size_t)1 << 20);
		while (cap < padded)
			cap *= 2;
		uint8_t *st = aligned_alloc(DIO_ALIGN, cap);
		if (!st)
			return -ENOMEM;
		free(sw->stage);
		sw->stage = st;
		sw->stage_cap = cap;
	}
	memcpy(sw->stage, sw->tailblk, head);
	uint8_t *p = sw->stage + head;
	for (unsigned i = 0; i < n; i++) {
		memcpy(p, sw->iov[i].iov_base, sw->iov[i].iov_len);
		p += sw->iov[i].iov_len;
	}
	memset(p, 0, padded - total);
	sw->stage_len = padded;
	return 0;
}

void spool_worker_turn_end(struct spool_worker *sw)
{
	while (sw->failed) {
		struct spool_txn *t = sw->failed;
		sw->failed = t->next;
		sw->stats.failed++;
		t->done(t->arg, t->fail, t->id);
		txn_free(t);
	}
	if (sw->writing || sw->rollback || !sw->pending_head)
		return;
	if (sw->offset >= sw->sp->cfg.segment_size && !sw->sync_inflight) {
		/* the next batch goes to a new segment once this one's are all durable */
		if (!batches_idle(sw))
			return;
		int r = segment_rotate(sw);
		if (r < 0)
			log_err("spool: worker %u: cannot start a new segment: %s", sw->index,
				strerror(-r));
	}
	struct spool_batch *bt = batch_slot(sw);
	if (!bt)
		return; /* BATCHES_MAX in flight: the next completion makes room */
	/* take as many pending transactions as fit in one writev (binding each to the segment) */
	unsigned n = 0;
	uint64_t len = 0;
	struct spool_txn *t = sw->pending_head, *last = NULL;
	while (t) {
		/*
		 * a compaction copy goes in the same batch as the state records
		 * behind it: its original's segment (with the old state records)
		 * is removed once the batch is durable
		 */
		unsigned need = t->niov;
		if (t->type == RECORD_MESSAGE && !t->done)
			for (struct spool_txn *x = t->next;
			     x && x->type == RECORD_STATE && x->id == t->id; x = x->next)
				need += x->niov;
		if (n + need > IOV_MAX)
			break;
		if (n + need > sw->iov_cap) {
			unsigned cap = MAX(sw->iov_cap * 2, 256u);
			while (cap < n + need)
				cap *= 2;
			struct iovec *iv = realloc(sw->iov, cap * sizeof(*iv));
			if (!iv)
				break;
			sw->iov = iv;
			sw->iov_cap = cap;
		}
		record_header_bind(t->header, sw->seq); /* the segment it goes to is known now */
		unsigned k = txn_iov(t, sw->iov + n);
		t->off = sw->offset + len;
		for (unsigned i = 0; i < k; i++)
			len += sw->iov[n + i].iov_len;
		n += k;
		last = t;
		t = t->next;
	}
	if (!last)
		return;
	bt->head = sw->pending_head;
	bt->tail = last;
	bt->off = sw->offset;
	bt->len = len;
	sw->pending_head = last->next;
	if (!sw->pending_head)
		sw->pending_tail = NULL;
	last->next = NULL;
	bt->sync = sw->sp->cfg.durability == SPOOL_FSYNC;
	/* a compaction copy is synced in every mode: its original's segment goes next */
	for (struct spool_txn *x = bt->head; x && !bt->sync; x = x->next)
		bt->sync = x->type == RECORD_MESSAGE && !x->done;
	sw->stats.writes++;
	int r;
	if (sw->dfd >= 0) {
		memcpy(bt->tail0, sw->tailblk, sizeof(bt->tail0));
		r = stage_batch(sw, n, len);
		if (r == 0) {
			sw->iov[0] = (struct iovec){sw->stage, sw->stage_len};
			r = net_file_writev(sw->w, sw->dfd, sw->iov, 1,
					    sw->offset & ~(uint64_t)(DIO_ALIGN - 1), &bt->write_io,
					    bt->sync ? &bt->sync_io : NULL);
		}
	} else {
		r = net_file_writev(sw->w, sw->fd, sw->iov, n, sw->offset, &bt->write_io,
				    bt->sync ? &bt->sync_io : NULL);
	}
	if (r < 0) {
		batch_answer(sw, bt, r);
		return;
	}
	sw->writing = bt;
	bt->write_pending = true;
	bt->sync_pending = bt->sync;
	if (bt->sync)
		fifo_push(sw, bt);
}

/* ---- the live queue's API ---- */

void spool_worker_set_hooks(struct spool_worker *sw, const struct spool_hooks *h, void *arg)
{
	sw->hooks = *h;
	sw->hooks_arg = arg;
}

static int entry_id_cmp(const void *a, const void *b)
{
	const struct spool_entry *x = *(struct spool_entry *const *)a;
	const struct spool_entry *y = *(struct spool_entry *const *)b;
	return x->id < y->id ? -1 : x->id > y->id;
}

void spool_worker_announce(struct spool_worker *sw)
{
	if (sw->announced || !sw->hooks.added)
		return;
	sw->announced = true;
	size_t n = 0;
	struct spool_entry **v = malloc((sw->hcount ? sw->hcount : 1) * sizeof(*v));
	if (v) {
		for (size_t i = 0; i < sw->hsize; i++)
			for (struct spool_entry *e = sw->htab[i]; e; e = e->hnext)
				v[n++] = e;
		qsort(v, n, sizeof(*v), entry_id_cmp); /* oldest first */
	}
	for (size_t i = 0; i < n; i++)
		sw->hooks.added(sw->hooks_arg, v[i]);
	free(v);
}

int spool_entry_read(struct spool_worker *sw, const struct spool_entry *e, uint8_t **buf_r,
		     size_t *len_r)
{
	struct spool_seg *g = e->seg;
	if (g->rfd < 0) {
		g->rfd = openat(g->dirfd, g->name, O_RDONLY | O_CLOEXEC);
		if (g->rfd < 0) {
			int err = -errno;
			log_err("spool: worker %u: cannot open %s: %s", sw->index, g->name,
				strerror(errno));
			return err;
		}
	}
	size_t total = record_encoded_size(e->len);
	uint8_t *buf = malloc(total);
	if (!buf)
		return -ENOMEM;
	size_t got = 0;
	while (got < RECORD_HEADER_SIZE + (size_t)e->len) {
		ssize_t r = pread(g->rfd, buf + got, RECORD_HEADER_SIZE + e->len - got,
				  (off_t)(e->off + got));
		if (r <= 0) {
			int err = r < 0 ? -errno : -EIO;
			if (r < 0 && errno == EINTR)
				continue;
			free(buf);
			return err;
		}
		got += (size_t)r;
	}
	/* the reader wants the padding too: it is not checksummed, any octets do */
	memset(buf + got, 0, total - got);
	struct record_reader rr;
	record_reader_init_segment(&rr, &g->hdr, 0);
	struct record rec;
	if (record_next(&rr, buf, total, &rec) != 1 || rec.type != RECORD_MESSAGE ||
	    rec.queue_id != e->id || rec.length != e->len) {
		char idb[17];
		spool_id_format(e->id, idb);
		log_err("spool: worker %u: message %s in %s at %" PRIu64 " is damaged", sw->index,
			idb, g->name, e->off);
		free(buf);
		return -EBADMSG;
	}
	memmove(buf, buf + RECORD_HEADER_SIZE, e->len);
	*buf_r = buf;
	*len_r = e->len;
	return 0;
}

static struct spool_txn *state_txn(struct spool_worker *sw, uint64_t id, const struct state_rec *r)
{
	struct spool_txn *t = calloc(1, sizeof(*t));
	if (!t)
		return NULL;
	t->sw = sw;
	t->id = id;
	t->type = RECORD_STATE;
	state_payload_encode_rec(t->st, r);
	struct iovec iv = {t->st, sizeof(t->st)};
	t->pad = record_header_encode(t->header, RECORD_STATE, 0, id, &iv, 1);
	t->niov = 2 + (t->pad ? 1 : 0);
	return t;
}

static void push_state(struct spool_worker *sw, uint64_t id, const struct state_rec *r)
{
	struct spool_txn *t = state_txn(sw, id, r);
	if (t)
		pending_push(sw, t);
	else
		sw->stats.failed_states++;
}

int spool_entry_mark(struct spool_worker *sw, struct spool_entry *e, const struct state_rec *r)
{
	/* a settled recipient joins e->rcpt_done: compaction writes it again from there */
	uint32_t at = 0;
	bool add_done = false;
	if (r->state == SPOOL_STATE_RCPT_DONE) {
		while (at < e->nrcpt_done && e->rcpt_done[at] < r->rcpt)
			at++;
		add_done = at == e->nrcpt_done || e->rcpt_done[at] != r->rcpt;
		if (add_done) {
			uint32_t *v = realloc(e->rcpt_done, (e->nrcpt_done + 1) * sizeof(*v));
			if (!v)
				return -ENOMEM;
			e->rcpt_done = v; /* the same indices, room for one more */
		}
	}
	struct state_rec rf = *r;
	rf.flags |= e->flags;
	struct spool_txn *t = state_txn(sw, e->id, &rf);
	if (!t)
		return -ENOMEM;
	pending_push(sw, t);
	if (spool_state_final(r->state)) {
		entry_remove(sw, e);
		return 0;
	}
	if (add_done) {
		memmove(e->rcpt_done + at + 1, e->rcpt_done + at,
			(e->nrcpt_done - at) * sizeof(*e->rcpt_done));
		e->rcpt_done[at] = r->rcpt;
		e->nrcpt_done++;
	}
	e->flags = rf.flags;
	bool was_held = e->state == SPOOL_STATE_HELD;
	switch (r->state) {
	case SPOOL_STATE_HELD:
		e->state = SPOOL_STATE_HELD;
		break;
	case SPOOL_STATE_RELEASED:
		e->state = SPOOL_STATE_QUEUED;
		e->until_ms = 0;
		break;
	case SPOOL_STATE_DEFERRED:
		e->state = SPOOL_STATE_DEFERRED;
		e->until_ms = r->until_ms;
		e->attempts = r->attempts;
		break;
	default:
		break;
	}
	if (was_held != (e->state == SPOOL_STATE_HELD)) {
		if (was_held)
			sw->nheld--;
		else
			sw->nheld++;
	}
	return 0;
}

/* ---- workers ---- */

struct spool_worker *spool_worker(struct spool *sp, unsigned index)
{
	return index < sp->nworkers ? &sp->workers[index] : NULL;
}

int spool_worker_init(struct spool *sp, struct net_worker *w)
{
	unsigned i = net_worker_index(w);
	if (i >= sp->nworkers)
		return -EINVAL;
	struct spool_worker *sw = &sp->workers[i];
	sw->sp = sp;
	sw->w = w;
	sw->index = i;
	sw->fd = -1;
	sw->dfd = -1;
	for (unsigned k = 0; k < BATCHES_MAX; k++) {
		sw->bslot[k].sw = sw;
		sw->bslot[k].write_io.done = write_done;
		sw->bslot[k].sync_io.done = sync_done;
	}
	sw->batch_sync_io.done = batch_sync_done;
	char sub[32];
	snprintf(sub, sizeof(sub), "w%u", i);
	char path[4200];
	snprintf(path, sizeof(path), "%s/%s", sp->dir, sub);
	if (mkdir(path, 0700) < 0 && errno != EEXIST)
		return -errno;
	sw->dirfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (sw->dirfd < 0)
		return -errno;
	struct stat dst;
	if (fstat(sw->dirfd, &dst) < 0) {
		int err = -errno;
		close(sw->dirfd);
		return err;
	}
	sw->dir_dev = dst.st_dev;
	sw->dir_ino = dst.st_ino;
	sw->seq = sp->next_seq + i;
	sw->id_ms = sp->max_id_ms; /* every new id is above every id already in the spool */
	/* spares a previous run left (recovery removed the ones no worker uses) */
	for (unsigned k = 0; k < SPARES_MAX; k++) {
		char spare[32];
		struct stat st;
		spare_name(spare, sizeof(spare), k);
		sw->spare[k] = fstatat(sw->dirfd, spare, &st, 0) == 0;
	}
	sw->dir_dirty = true; /* their renames may not be durable yet: synced before a reuse */
	int r = segment_open_new(sw);
	if (r < 0) {
		log_err("spool: worker %u: cannot create a segment in %s: %s", i, path, strerror(-r));
		return r;
	}
	space_check(sw);
	sw->space_timer.fire = space_timer_fire;
	net_timer_start(w, &sw->space_timer, SPACE_CHECK_MS);
	sw->compact_timer.fire = compact_timer_fire;
	net_timer_start(w, &sw->compact_timer, COMPACT_CHECK_MS);
	if (sp->cfg.durability == SPOOL_BATCH) {
		sw->batch_timer.fire = batch_timer_fire;
		net_timer_start(w, &sw->batch_timer, sp->cfg.batch_interval_ms);
	}
	return 0;
}

void spool_worker_fini(struct spool_worker *sw)
{
	if (!sw || !sw->sp)
		return;
	net_timer_stop(sw->w, &sw->space_timer);
	net_timer_stop(sw->w, &sw->compact_timer);
	net_timer_stop(sw->w, &sw->batch_timer);
	/* transactions sealed but never written: never acknowledged either */
	for (struct spool_txn *t = sw->failed, *n; t; t = n) {
		n = t->next;
		t->done(t->arg, t->fail, t->id);
		txn_free(t);
	}
	sw->failed = NULL;
	/*
	 * State records sealed after the last batch (deliveries that finished
	 * during shutdown) are written here, synchronously, so that a clean stop
	 * does not deliver them twice; messages never written were never
	 * acknowledged.
	 */
	for (struct spool_txn *t = sw->pending_head, *n; t; t = n) {
		n = t->next;
		if (t->type == RECORD_STATE) {
			struct iovec iov[3];
			record_header_bind(t->header, sw->seq);
			unsigned k = txn_iov(t, iov);
			size_t len = 0;
			for (unsigned i = 0; i < k; i++)
				len += iov[i].iov_len;
			if (sw->fd >= 0 && batches_idle(sw) &&
			    pwritev(sw->fd, iov, (int)k, (off_t)sw->offset) == (ssize_t)len)
				sw->offset += len;
		} else if (!t->done) {
			compact_landed(sw, t, -ESHUTDOWN); /* the original stays where it is */
		} else {
			t->done(t->arg, -ESHUTDOWN, t->id);
		}
		txn_free(t);
	}
	sw->pending_head = sw->pending_tail = NULL;
	bool empty = sw->sp->cfg.discard || sw->offset == SEGMENT_HEADER_SIZE;
	if ((sw->dfd >= 0 || sw->recycled) && !empty && sw->fd >= 0) {
		/*
		 * direct I/O's zeros past the end, or a recycled file's older octets
		 * (readers stop at them anyway). The file may end up shorter than a
		 * segment: then it is unlinked, not recycled, when it dies.
		 */
		if (ftruncate(sw->fd, (off_t)sw->offset) < 0)
			log_warn("spool: worker %u: cannot cut the segment's padding: %s", sw->index,
				 strerror(errno));
	}
	if (sw->dfd >= 0) {
		close(sw->dfd);
		sw->dfd = -1;
	}
	free(sw->stage);
	sw->stage = NULL;
	sw->stage_cap = 0;
	if (sw->fd >= 0) {
		if (sw->sp->cfg.durability != SPOOL_NONE)
			fdatasync(sw->fd);
		close(sw->fd);
		sw->fd = -1;
	}
	if (empty && sw->cur) {
		/*
		 * nothing queued in it: a spare again if it was one (it holds no
		 * record anything else depends on, so order does not matter), else
		 * unlinked; segs_gc finds it gone
		 */
		if (seg_retire(sw, sw->cur) < 0)
			log_warn("spool: worker %u: cannot remove the empty segment %s", sw->index,
				 sw->cur->name);
	}
	if (sw->cur) {
		sw->cur->writing = false;
		sw->cur = NULL;
	}
	segs_gc(sw);
	for (size_t i = 0; i < sw->hsize; i++)
		for (struct spool_entry *e = sw->htab[i], *n; e; e = n) {
			n = e->hnext;
			free(e->rcpt_done);
			spool_hot_free(e->hot);
			free(e);
		}
	free(sw->htab);
	sw->htab = NULL;
	sw->hsize = 0; /* hcount and nheld stay: what is still queued, for spool_queued */
	for (struct spool_seg *g = sw->segs_head, *n; g; g = n) {
		n = g->next;
		seg_free(g);
	}
	sw->segs_head = sw->segs_tail = NULL;
	close(sw->dirfd);
	free(sw->iov);
	sw->iov = NULL;
}

/* ---- start-up: lock and recovery ---- */

static int take_lock(struct spool *sp, char *err, size_t errlen)
{
	char path[4200];
	snprintf(path, sizeof(path), "%s/lock", sp->dir);
	int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (fd < 0) {
		snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
		return -1;
	}
	if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		char pid[32] = "";
		ssize_t n = pread(fd, pid, sizeof(pid) - 1, 0);
		pid[n > 0 ? n : 0] = '\0';
		pid[strcspn(pid, "\n")] = '\0';
		snprintf(err, errlen,
			 "the spool %s is in use by another posthaste (pid %s); "
			 "two daemons cannot share a spool",
			 sp->dir, pid[0] ? pid : "unknown");
		close(fd);
		return -1;
	}
	char pid[32];
	int n = snprintf(pid, sizeof(pid), "%ld\n", (long)getpid());
	if (ftruncate(fd, 0) < 0 || pwrite(fd, pid, (size_t)n, 0) != n)
		log_warn("spool: cannot write the pid into %s", path);
	sp->lockfd = fd;
	return 0;
}

/*
 * Recovery. Every segment is scanned in (sequence, path) order: each message
 * record's id is kept with its segment's index, each state record is added to
 * a state table (queue/state.h) and kept with its segment too. Memory is
 * proportional to the number of records: no message body is kept.
 *
 * Then each message's current state is looked up: neither final nor held is
 * queued (`recovered`), held is `recovered_held`. A segment is removed when it
 * is undamaged, every message in it is final, it holds no record this version
 * does not understand, and every state record in it names a message whose own
 * segments are removed too (or no message at all, when every segment could be
 * read). Removal goes in rounds, so that a state record is never unlinked
 * before the message it makes final: a crash in between cannot bring a
 * deleted message back. Segments that depend on each other in a cycle stay.
 */
struct rec_seg {
	char *name;
	unsigned dir;  /* index into rec_ctx.dirfds */
	uint64_t seq;  /* from the name; UINT64_MAX without one */
	struct segment_header hdr; /* once scanned */
	size_t st_first, st_end; /* its state records in rec_ctx.strecs */
	uint64_t nmsgs;
	bool scanned;  /* header read: its records are known */
	bool keep;     /* damaged, or a record not understood: never removed */
	bool live;     /* holds a message that is not final */
	bool removable, gone;
};

struct rec_ref {
	uint64_t id;
	uint32_t seg;
};

struct rec_loc {
	uint64_t off;
	uint32_t len;
	bool superseded; /* a newer copy of the same id (compaction) comes later */
};

struct rec_done {
	uint64_t id;
	uint32_t rcpt;
};

struct rec_ctx {
	int *dirfds;
	unsigned *dirnum; /* N of each w<N> */
	unsigned ndirs;
	struct rec_loc *locs; /* parallel to msgs */
	size_t loccap;
	struct rec_done *dones; /* RCPT_DONE records */
	size_t ndones, donecap;
	struct rec_seg *segs;
	size_t nsegs, segcap;
	struct rec_ref *msgs; /* message records, in scan order */
	size_t nmsgs, msgcap;
	struct rec_ref *strecs; /* state records, in scan order */
	size_t nstrecs, strcap;
	struct state_table states;
	bool incomplete; /* a segment could not be read: an unknown id may be in it */
	bool oom;
};

static bool ref_push(struct rec_ref **v, size_t *n, size_t *cap, uint64_t id, uint32_t seg)
{
	if (*n == *cap) {
		size_t c = *cap ? *cap * 2 : 1024;
		struct rec_ref *nv = realloc(*v, c * sizeof(*nv));
		if (!nv)
			return false;
		*v = nv;
		*cap = c;
	}
	(*v)[(*n)++] = (struct rec_ref){id, seg};
	return true;
}

/* Scans one segment: keeps its message and state records, logs damage. */
static void recover_segment(struct spool *sp, struct rec_ctx *c, uint32_t si)
{
	struct rec_seg *sg = &c->segs[si];
	int dirfd = c->dirfds[sg->dir];
	const char *name = sg->name;
	sg->st_first = sg->st_end = c->nstrecs;
	int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		log_err("spool: cannot open segment %s: %s", name, strerror(errno));
		c->incomplete = true;
		return;
	}
	struct stat st;
	if (fstat(fd, &st) < 0) {
		log_err("spool: cannot stat segment %s: %s", name, strerror(errno));
		c->incomplete = true;
		close(fd);
		return;
	}
	if (st.st_size < (off_t)SEGMENT_HEADER_SIZE) {
		/* created but its header never made it: no message can be in it */
		close(fd);
		unlinkat(dirfd, name, 0);
		sg->gone = true;
		return;
	}
	size_t len = (size_t)st.st_size;
	const uint8_t *map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
	close(fd);
	if (map == MAP_FAILED) {
		log_err("spool: cannot map segment %s: %s", name, strerror(errno));
		c->incomplete = true;
		return;
	}
	struct segment_header sh;
	if (segment_header_decode(map, len, &sh) < 0) {
		log_err("spool: %s: not a segment (bad header); left alone", name);
		c->incomplete = true;
		munmap((void *)map, len);
		return;
	}
	if (sh.version >= 2 && sg->seq != UINT64_MAX && sh.seq != sg->seq) {
		/* its records are bound to the header's seq: a damaged one would hide them all */
		log_err("spool: %s: the header's sequence %016" PRIx64 " is not the name's "
			"(damaged header); left alone",
			name, sh.seq);
		c->incomplete = true;
		munmap((void *)map, len);
		return;
	}
	sg->scanned = true;
	sg->hdr = sh;
	if (sh.seq + 1 > sp->next_seq)
		sp->next_seq = sh.seq + 1;
	struct record_reader rr;
	record_reader_init_segment(&rr, &sh, SEGMENT_HEADER_SIZE);
	uint64_t bad = 0;
	for (;;) {
		struct record rec;
		int r = record_next(&rr, map, len, &rec);
		if (r == 0)
			break;
		if (r == 1) {
			if ((rec.queue_id >> 20) > sp->max_id_ms)
				sp->max_id_ms = rec.queue_id >> 20;
			if (rec.type == RECORD_MESSAGE) {
				sg->nmsgs++;
				if (c->nmsgs == c->loccap) {
					size_t cap = c->loccap ? c->loccap * 2 : 1024;
					struct rec_loc *v = realloc(c->locs, cap * sizeof(*v));
					if (!v) {
						c->oom = true;
						continue;
					}
					c->locs = v;
					c->loccap = cap;
				}
				c->locs[c->nmsgs] = (struct rec_loc){rec.offset, (uint32_t)rec.length, false};
				if (!ref_push(&c->msgs, &c->nmsgs, &c->msgcap, rec.queue_id, si))
					c->oom = true;
			} else if (rec.type == RECORD_STATE) {
				struct state_rec s;
				if (state_payload_decode_rec(rec.payload, rec.length, &s) < 0) {
					sg->keep = true; /* a newer writer's state: not ours to drop */
					continue;
				}
				if (s.state == SPOOL_STATE_RCPT_DONE) {
					if (c->ndones == c->donecap) {
						size_t cap = c->donecap ? c->donecap * 2 : 256;
						struct rec_done *v = realloc(c->dones, cap * sizeof(*v));
						if (!v) {
							c->oom = true;
							continue;
						}
						c->dones = v;
						c->donecap = cap;
					}
					c->dones[c->ndones++] = (struct rec_done){rec.queue_id, s.rcpt};
				}
				if (state_table_add_rec(&c->states, rec.queue_id, &s) < 0 ||
				    !ref_push(&c->strecs, &c->nstrecs, &c->strcap, rec.queue_id, si))
					c->oom = true;
			} else if (rec.type != RECORD_PAD) {
				sg->keep = true;
			}
			continue;
		}
		bad++;
		log_warn("spool: %s: %s at offset %" PRIu64 "; recovery goes on", name,
			 record_error_str(rec.error), rec.offset);
		if (!record_resync(&rr, map, len))
			break;
	}
	munmap((void *)map, len);
	sg->st_end = c->nstrecs;
	if (bad)
		sg->keep = true;
	sp->recovered_bad += bad;
}

static int rec_seg_cmp(const void *a, const void *b)
{
	const struct rec_seg *x = a, *y = b;
	if (x->seq != y->seq)
		return x->seq < y->seq ? -1 : 1;
	if (x->dir != y->dir)
		return x->dir < y->dir ? -1 : 1;
	return strcmp(x->name, y->name);
}

static int rec_ref_cmp(const void *a, const void *b)
{
	const struct rec_ref *x = a, *y = b;
	if (x->id != y->id)
		return x->id < y->id ? -1 : 1;
	return x->seg < y->seg ? -1 : x->seg > y->seg;
}

/* First index of id in the id-sorted refs, or n. */
static size_t ref_find(const struct rec_ref *v, size_t n, uint64_t id)
{
	size_t lo = 0, hi = n;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (v[mid].id < id)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < n && v[lo].id == id ? lo : n;
}

/*
 * Whether the state records of segment si allow removing it: each names only
 * messages in si itself or in segments for which ok(seg) holds, or (with
 * every segment read) no message at all.
 */
static bool states_allow(const struct rec_ctx *c, const struct rec_ref *byid, uint32_t si,
			 bool gone_only)
{
	const struct rec_seg *sg = &c->segs[si];
	for (size_t k = sg->st_first; k < sg->st_end; k++) {
		size_t i = ref_find(byid, c->nmsgs, c->strecs[k].id);
		if (i == c->nmsgs) {
			if (c->incomplete)
				return false;
			continue;
		}
		for (; i < c->nmsgs && byid[i].id == c->strecs[k].id; i++) {
			const struct rec_seg *t = &c->segs[byid[i].seg];
			if (byid[i].seg == si)
				continue;
			if (gone_only ? !t->gone : !t->removable)
				return false;
		}
	}
	return true;
}

/* Removes the segments whose messages are all final; returns how many. */
static unsigned remove_final_segments(struct rec_ctx *c)
{
	bool any = false, with_states = false;
	for (size_t i = 0; i < c->nsegs; i++) {
		struct rec_seg *sg = &c->segs[i];
		sg->removable = sg->scanned && !sg->gone && !sg->keep && !sg->live;
		any |= sg->removable;
		with_states |= sg->removable && sg->st_end > sg->st_first;
	}
	if (!any)
		return 0;
	struct rec_ref *byid = NULL;
	if (with_states) {
		byid = malloc((c->nmsgs ? c->nmsgs : 1) * sizeof(*byid));
		if (!byid)
			return 0; /* keeping segments is always safe */
		if (c->nmsgs)
			memcpy(byid, c->msgs, c->nmsgs * sizeof(*byid));
		qsort(byid, c->nmsgs, sizeof(*byid), rec_ref_cmp);
		/* the largest set whose state records only name messages within it */
		for (bool changed = true; changed;) {
			changed = false;
			for (uint32_t i = 0; i < c->nsegs; i++) {
				if (c->segs[i].removable && !states_allow(c, byid, i, false)) {
					c->segs[i].removable = false;
					changed = true;
				}
			}
		}
	}
	/* in rounds: a segment goes once the messages its state records name are gone */
	unsigned removed = 0;
	bool *dirty = calloc(c->ndirs ? c->ndirs : 1, sizeof(*dirty));
	for (bool progress = true; progress;) {
		progress = false;
		size_t before = removed;
		for (uint32_t i = 0; i < c->nsegs; i++) {
			struct rec_seg *sg = &c->segs[i];
			if (!sg->removable || sg->gone)
				continue;
			if (byid && !states_allow(c, byid, i, true))
				continue;
			if (unlinkat(c->dirfds[sg->dir], sg->name, 0) < 0) {
				log_warn("spool: cannot remove segment %s: %s", sg->name,
					 strerror(errno));
				sg->removable = false;
				continue;
			}
			sg->gone = true;
			removed++;
			if (dirty)
				dirty[sg->dir] = true;
		}
		if (removed == before)
			break;
		progress = true;
		/* this round's unlinks are durable before the next round's */
		for (unsigned d = 0; d < c->ndirs; d++) {
			if (!dirty || dirty[d]) {
				int r = fsync_dir(c->dirfds[d]);
				if (r < 0)
					log_warn("spool: cannot sync a worker directory: %s",
						 strerror(-r));
				if (dirty)
					dirty[d] = false;
			}
		}
		if (!byid)
			break; /* no state records: one round removes them all */
	}
	free(dirty);
	free(byid);
	return removed;
}

static void rec_ctx_free(struct rec_ctx *c)
{
	for (unsigned i = 0; i < c->ndirs; i++)
		if (c->dirfds[i] >= 0)
			close(c->dirfds[i]);
	free(c->dirfds);
	free(c->dirnum);
	free(c->locs);
	free(c->dones);
	for (size_t i = 0; i < c->nsegs; i++)
		free(c->segs[i].name);
	free(c->segs);
	free(c->msgs);
	free(c->strecs);
	state_table_free(&c->states);
}

/*
 * A spare file of worker directory w<num>: kept for worker num to reuse when
 * there is one and the name is a slot of it, else removed. Its header's seq
 * (the latest its octets were bound to) counts for next_seq like a
 * segment's: a seq is never used again while a file holds records bound to
 * it.
 */
static void recover_spare(struct spool *sp, int dfd, unsigned num, const char *name)
{
	char *end;
	errno = 0;
	unsigned long slot = strtoul(name + 6, &end, 10);
	if (end == name + 6 || errno || strcmp(end, ".log") || slot >= SPARES_MAX ||
	    num >= sp->nworkers) {
		if (unlinkat(dfd, name, 0) < 0 && errno != ENOENT)
			log_warn("spool: cannot remove the spare file %s: %s", name, strerror(errno));
		return;
	}
	uint8_t buf[SEGMENT_HEADER_SIZE];
	struct segment_header sh;
	int fd = openat(dfd, name, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	if (pread(fd, buf, sizeof(buf), 0) == (ssize_t)sizeof(buf) &&
	    segment_header_decode(buf, sizeof(buf), &sh) == 0 && sh.seq < UINT64_MAX &&
	    sh.seq + 1 > sp->next_seq)
		sp->next_seq = sh.seq + 1;
	close(fd);
}

/*
 * Adds the segment names of the worker directory dfd (w<num>), and deals with
 * its spare files. -errno on out of memory.
 */
static int list_worker_segments(struct spool *sp, struct rec_ctx *c, int dfd, unsigned num)
{
	int *fds = realloc(c->dirfds, (c->ndirs + 1) * sizeof(*fds));
	if (fds)
		c->dirfds = fds;
	unsigned *nums = fds ? realloc(c->dirnum, (c->ndirs + 1) * sizeof(*nums)) : NULL;
	if (!nums) {
		close(dfd);
		return -ENOMEM;
	}
	c->dirnum = nums;
	nums[c->ndirs] = num;
	unsigned di = c->ndirs;
	int lfd = dup(dfd);
	DIR *wd = lfd < 0 ? NULL : fdopendir(lfd);
	if (!wd) {
		if (lfd >= 0)
			close(lfd);
		close(dfd);
		return 0;
	}
	c->dirfds[c->ndirs++] = dfd;
	struct dirent *se;
	int r = 0;
	while ((se = readdir(wd))) {
		if (!strncmp(se->d_name, "spare-", 6)) {
			recover_spare(sp, dfd, num, se->d_name);
			continue;
		}
		if (strncmp(se->d_name, "seg-", 4) || !strstr(se->d_name, ".log"))
			continue;
		if (c->nsegs == c->segcap) {
			size_t cap = c->segcap ? c->segcap * 2 : 16;
			struct rec_seg *v = realloc(c->segs, cap * sizeof(*v));
			if (!v) {
				r = -ENOMEM;
				break;
			}
			c->segs = v;
			c->segcap = cap;
		}
		struct rec_seg *sg = &c->segs[c->nsegs];
		*sg = (struct rec_seg){.dir = di, .name = strdup(se->d_name)};
		if (!sg->name) {
			r = -ENOMEM;
			break;
		}
		char *end;
		errno = 0;
		unsigned long long seq = strtoull(se->d_name + 4, &end, 16);
		sg->seq = end != se->d_name + 4 && !errno && !strcmp(end, ".log") ? seq : UINT64_MAX;
		c->nsegs++;
	}
	closedir(wd);
	return r;
}

static int done_cmp(const void *a, const void *b)
{
	const struct rec_done *x = a, *y = b;
	if (x->id != y->id)
		return x->id < y->id ? -1 : 1;
	return x->rcpt < y->rcpt ? -1 : x->rcpt > y->rcpt;
}

/*
 * Hands the surviving segments and the live messages to the workers that
 * will own them (w<N> -> worker N mod nworkers), oldest segment first, so
 * that each worker can remove its segments in order while it runs. A segment
 * whose state records name a message in another worker's segments, in a
 * segment kept for damage, or an unknown one while some segment could not be
 * read, is pinned: only a later start-up removes it.
 */
static int build_live(struct spool *sp, struct rec_ctx *c)
{
	struct spool_seg **rs = calloc(c->nsegs ? c->nsegs : 1, sizeof(*rs));
	unsigned *owner = calloc(c->nsegs ? c->nsegs : 1, sizeof(*owner));
	struct rec_ref *byid = malloc((c->nmsgs ? c->nmsgs : 1) * sizeof(*byid));
	int r = -ENOMEM;
	if (!rs || !owner || !byid)
		goto out;
	for (size_t i = 0; i < c->nsegs; i++) {
		struct rec_seg *sg = &c->segs[i];
		if (!sg->scanned || sg->gone)
			continue;
		if (!(rs[i] = seg_new(c->dirfds[sg->dir], sg->seq, sg->name)))
			goto out;
		rs[i]->hdr = sg->hdr;
		owner[i] = c->dirnum[sg->dir] % sp->nworkers;
		rs[i]->pinned = sg->keep;
		seg_append(&sp->workers[owner[i]], rs[i]);
	}
	/* the segments borrow the directories: the spool keeps them open */
	int *fds = realloc(sp->dirfds, (sp->ndirfds + c->ndirs + 1) * sizeof(*fds));
	if (!fds)
		goto out;
	sp->dirfds = fds;
	for (unsigned d = 0; d < c->ndirs; d++) {
		sp->dirfds[sp->ndirfds++] = c->dirfds[d];
		c->dirfds[d] = -1;
	}
	if (c->nmsgs) {
		memcpy(byid, c->msgs, c->nmsgs * sizeof(*byid));
		qsort(byid, c->nmsgs, sizeof(*byid), rec_ref_cmp);
	}
	for (size_t i = 0; i < c->nsegs; i++) {
		if (!rs[i] || rs[i]->pinned)
			continue;
		const struct rec_seg *sg = &c->segs[i];
		for (size_t k = sg->st_first; k < sg->st_end && !rs[i]->pinned; k++) {
			size_t j = ref_find(byid, c->nmsgs, c->strecs[k].id);
			if (j == c->nmsgs) {
				rs[i]->pinned = c->incomplete;
				continue;
			}
			for (; j < c->nmsgs && byid[j].id == c->strecs[k].id; j++) {
				uint32_t ms = byid[j].seg;
				if (c->segs[ms].gone)
					continue; /* removed for good above: the record names nothing */
				if (!rs[ms] || owner[ms] != owner[i])
					rs[i]->pinned = true;
			}
		}
	}
	for (size_t i = 0; i < c->nmsgs; i++) {
		if (c->locs[i].superseded)
			continue;
		uint32_t si = c->msgs[i].seg;
		const struct state_entry *st = c->states.n ? state_table_find(&c->states, c->msgs[i].id)
							   : NULL;
		enum spool_state s = st ? (enum spool_state)st->state : SPOOL_STATE_QUEUED;
		if (spool_state_final(s) || !rs[si])
			continue;
		struct spool_entry *e = calloc(1, sizeof(*e));
		if (!e)
			goto out;
		e->id = c->msgs[i].id;
		e->seg = rs[si];
		e->off = c->locs[i].off;
		e->len = c->locs[i].len;
		e->state = s == SPOOL_STATE_HELD       ? SPOOL_STATE_HELD
			   : s == SPOOL_STATE_DEFERRED ? SPOOL_STATE_DEFERRED
						       : SPOOL_STATE_QUEUED;
		if (st && s == SPOOL_STATE_DEFERRED) {
			e->until_ms = st->until_ms;
			e->attempts = st->attempts;
		}
		e->flags = st ? st->flags : 0;
		if (entry_insert(&sp->workers[owner[si]], e) < 0) {
			free(e);
			goto out;
		}
	}
	/* recipients settled before the restart */
	if (c->ndones > 1)
		qsort(c->dones, c->ndones, sizeof(*c->dones), done_cmp);
	for (size_t i = 0; i < c->ndones;) {
		size_t j = i;
		while (j < c->ndones && c->dones[j].id == c->dones[i].id)
			j++;
		struct spool_entry *e = NULL;
		for (unsigned w = 0; w < sp->nworkers && !e; w++)
			e = spool_entry_find(&sp->workers[w], c->dones[i].id);
		if (e && (e->rcpt_done = malloc((j - i) * sizeof(uint32_t)))) {
			for (size_t k = i; k < j; k++)
				if (k == i || c->dones[k].rcpt != c->dones[k - 1].rcpt)
					e->rcpt_done[e->nrcpt_done++] = c->dones[k].rcpt;
		}
		i = j;
	}
	r = 0;
out:
	free(rs);
	free(owner);
	free(byid);
	return r;
}

static const struct rec_ctx *sort_ctx; /* recovery runs on one thread, before the workers */

static int idx_cmp(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	uint64_t ix = sort_ctx->msgs[x].id, iy = sort_ctx->msgs[y].id;
	if (ix != iy)
		return ix < iy ? -1 : 1;
	return x < y ? -1 : x > y;
}

/*
 * Compaction copies a message forward under the same id: of several copies
 * of an id, the one scanned last (the newest segment) is the message; the
 * others are marked superseded. 0 or -ENOMEM.
 */
static int mark_superseded(struct rec_ctx *c)
{
	if (c->nmsgs < 2)
		return 0;
	uint32_t *ix = malloc(c->nmsgs * sizeof(*ix));
	if (!ix)
		return -ENOMEM;
	for (size_t i = 0; i < c->nmsgs; i++)
		ix[i] = (uint32_t)i;
	sort_ctx = c;
	qsort(ix, c->nmsgs, sizeof(*ix), idx_cmp);
	for (size_t i = 0; i + 1 < c->nmsgs; i++)
		if (c->msgs[ix[i]].id == c->msgs[ix[i + 1]].id)
			c->locs[ix[i]].superseded = true;
	free(ix);
	return 0;
}

static int recover(struct spool *sp)
{
	uint64_t t0 = clock_ms();
	DIR *d = opendir(sp->dir);
	if (!d)
		return -errno;
	struct rec_ctx c = {0};
	struct dirent *de;
	int r = 0;
	while (r == 0 && (de = readdir(d))) {
		if (de->d_name[0] != 'w')
			continue;
		char path[4400];
		snprintf(path, sizeof(path), "%s/%s", sp->dir, de->d_name);
		int dfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (dfd < 0)
			continue;
		r = list_worker_segments(sp, &c, dfd, (unsigned)strtoul(de->d_name + 1, NULL, 10));
	}
	closedir(d);
	if (r < 0) {
		rec_ctx_free(&c);
		return r;
	}
	if (c.nsegs > 1)
		qsort(c.segs, c.nsegs, sizeof(*c.segs), rec_seg_cmp);
	for (uint32_t i = 0; i < c.nsegs && !c.oom; i++)
		recover_segment(sp, &c, i);
	if (c.oom) {
		rec_ctx_free(&c);
		return -ENOMEM;
	}
	unsigned segments = (unsigned)c.nsegs;

	/* each message's current state */
	state_table_finish(&c.states);
	if (mark_superseded(&c) < 0) {
		rec_ctx_free(&c);
		return -ENOMEM;
	}
	uint64_t queued = 0, held = 0;
	for (size_t i = 0; i < c.nmsgs; i++) {
		if (c.locs[i].superseded)
			continue; /* an older copy of a compacted message */
		enum spool_state st =
		    c.states.n ? state_table_lookup(&c.states, c.msgs[i].id) : SPOOL_STATE_QUEUED;
		if (spool_state_final(st))
			continue;
		if (st == SPOOL_STATE_HELD)
			held++;
		else
			queued++;
		c.segs[c.msgs[i].seg].live = true;
	}

	unsigned removed = 0;
	if (sp->cfg.discard) {
		/* every message is final once durable */
		for (size_t i = 0; i < c.nsegs; i++)
			if (c.segs[i].scanned && !c.segs[i].gone)
				unlinkat(c.dirfds[c.segs[i].dir], c.segs[i].name, 0);
		queued = held = 0;
	} else {
		removed = remove_final_segments(&c);
	}
	if (!sp->cfg.discard && build_live(sp, &c) < 0) {
		rec_ctx_free(&c);
		return -ENOMEM;
	}
	rec_ctx_free(&c);
	sp->recovered = queued;
	sp->recovered_held = held;

	if (sp->next_seq % 4096)
		sp->next_seq += 4096 - sp->next_seq % 4096; /* a clean start for this run's sequences */
	char heldtext[48] = "";
	if (held)
		snprintf(heldtext, sizeof(heldtext), ", %" PRIu64 " held", held);
	log_info("spool: %s: recovered %" PRIu64 " queued messages from %u segments in %" PRIu64
		 " ms%s%s",
		 sp->dir, queued, segments, clock_ms() - t0, heldtext,
		 sp->recovered_bad ? " (damaged records skipped: see above)" : "");
	if (removed)
		log_info("spool: %s: removed %u segments whose messages are all final", sp->dir,
			 removed);
	return 0;
}

static int mkdir_p(const char *path)
{
	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s", path);
	for (char *p = tmp + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(tmp, 0700) < 0 && errno != EEXIST)
			return -errno;
		*p = '/';
	}
	if (mkdir(tmp, 0700) < 0 && errno != EEXIST)
		return -errno;
	return 0;
}

struct spool *spool_open(const struct spool_config *cfg, unsigned nworkers, char *err,
			 size_t errlen)
{
	struct spool *sp = calloc(1, sizeof(*sp));
	if (!sp) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	sp->cfg = *cfg;
	sp->lockfd = -1;
	if (!sp->cfg.segment_size)
		sp->cfg.segment_size = SEGMENT_DEFAULT;
	if (!sp->cfg.batch_interval_ms)
		sp->cfg.batch_interval_ms = 10;
	snprintf(sp->dir, sizeof(sp->dir), "%s", cfg->dir);
	sp->cfg.dir = sp->dir;
	sp->nworkers = nworkers;
	int r = mkdir_p(sp->dir);
	if (r < 0) {
		snprintf(err, errlen, "cannot create the spool directory %s: %s", sp->dir,
			 strerror(-r));
		free(sp);
		return NULL;
	}
	if (take_lock(sp, err, errlen) < 0) {
		free(sp);
		return NULL;
	}
	sp->workers = aligned_alloc(CACHELINE, sizeof(*sp->workers) * nworkers);
	if (!sp->workers) {
		snprintf(err, errlen, "out of memory");
		spool_close(&sp);
		return NULL;
	}
	memset(sp->workers, 0, sizeof(*sp->workers) * nworkers);
	r = recover(sp);
	if (r < 0) {
		snprintf(err, errlen, "cannot read the spool %s: %s", sp->dir, strerror(-r));
		spool_close(&sp);
		return NULL;
	}
	if (sp->cfg.durability == SPOOL_NONE)
		log_warn("spool: durability = none: accepted mail is NOT synced to disk and a "
			 "crash or power loss loses it; for benchmarks only");
	return sp;
}

void spool_close(struct spool **spp)
{
	struct spool *sp = *spp;
	if (!sp)
		return;
	if (sp->lockfd >= 0)
		close(sp->lockfd);
	for (unsigned i = 0; i < sp->nworkers; i++) {
		struct spool_worker *sw = &sp->workers[i];
		if (sw->sp)
			continue; /* spool_worker_fini freed its own */
		for (size_t k = 0; k < sw->hsize; k++)
			for (struct spool_entry *e = sw->htab[k], *n; e; e = n) {
				n = e->hnext;
				free(e->rcpt_done);
				spool_hot_free(e->hot);
				free(e);
			}
		free(sw->htab);
		for (struct spool_seg *g = sw->segs_head, *n; g; g = n) {
			n = g->next;
			seg_free(g);
		}
	}
	for (unsigned i = 0; i < sp->ndirfds; i++)
		close(sp->dirfds[i]);
	free(sp->dirfds);
	free(sp->workers);
	free(sp);
	*spp = NULL;
}

void spool_stats(const struct spool *sp, struct spool_stats *out)
{
	memset(out, 0, sizeof(*out));
	out->recovered = sp->recovered;
	out->recovered_held = sp->recovered_held;
	out->recovered_bad = sp->recovered_bad;
	for (unsigned i = 0; i < sp->nworkers; i++) {
		const struct spool_stats *s = &sp->workers[i].stats;
		out->committed += s->committed;
		out->failed += s->failed;
		out->bytes += s->bytes;
		out->writes += s->writes;
		out->syncs += s->syncs;
		out->compacted += s->compacted;
		out->failed_states += s->failed_states;
	}
}

uint64_t spool_held(const struct spool *sp)
{
	uint64_t n = 0;
	for (unsigned i = 0; i < sp->nworkers; i++)
		n += sp->workers[i].nheld;
	return n;
}

uint64_t spool_queued(const struct spool *sp)
{
	uint64_t n = 0;
	for (unsigned i = 0; i < sp->nworkers; i++)
		n += sp->workers[i].hcount - sp->workers[i].nheld;
	return n;
}
