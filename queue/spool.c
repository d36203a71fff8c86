/*
 * The spool: per-worker segment files written by group commit.
 *
 * A transaction's body is copied once, into a chain of buffers that grow
 * geometrically (so a large message is a handful of iovecs). Sealed
 * transactions wait on the worker's pending list; at the end of the loop turn
 * every pending transaction that fits in one writev (IOV_MAX iovecs) becomes a
 * batch: record header, envelope and body buffers of each, written at the
 * segment's end in one request with an fdatasync linked behind it. When the
 * sync completes every transaction of the batch gets its answer together. One
 * batch is in flight per worker at a time; what is sealed meanwhile forms the
 * next batch, which is what makes the commit a group commit.
 *
 * A failed or short write leaves garbage past the segment's known end: the
 * segment is truncated back to it and the batch's transactions fail (the SMTP
 * side answers 452/451); the next batch tries again, so service resumes by
 * itself when the disk does.
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

struct body_chunk {
	struct body_chunk *next;
	size_t len, cap;
	char data[];
};

struct spool_txn {
	struct spool_worker *sw;
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
	struct spool_txn *batch; /* in flight */
	uint64_t batch_len;
	struct iovec *iov;
	unsigned iov_cap;
	struct net_io write_io, sync_io;
	int write_res;
	bool write_done, sync_wanted;
	bool dirty; /* SPOOL_BATCH: written since the last sync */
	bool sync_inflight;
	struct net_io batch_sync_io;
	struct net_timer batch_timer;
	struct net_timer space_timer;
	bool low_space;
	uint64_t queued;
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

/* ---- files ---- */

static int fsync_dir(int dirfd)
{
	return fsync(dirfd) < 0 ? -errno : 0;
}

static int segment_open_new(struct spool_worker *sw)
{
	char name[64];
	snprintf(name, sizeof(name), "seg-%016" PRIx64 ".log", sw->seq);
	int fd = openat(sw->dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0)
		return -errno;
	uint8_t hdr[SEGMENT_HEADER_SIZE];
	segment_header_encode(hdr, sw->index, sw->seq, (uint64_t)time(NULL));
	if (pwrite(fd, hdr, sizeof(hdr), 0) != (ssize_t)sizeof(hdr) || fdatasync(fd) < 0) {
		int err = errno ? -errno : -EIO;
		close(fd);
		unlinkat(sw->dirfd, name, 0);
		return err;
	}
	int r = fsync_dir(sw->dirfd); /* the new name itself must survive a crash */
	if (r < 0) {
		close(fd);
		return r;
	}
	if (sw->fd >= 0)
		close(sw->fd);
	sw->fd = fd;
	sw->offset = SEGMENT_HEADER_SIZE;
	return 0;
}

/* Past the segment size: the next batch goes to a new segment. */
static int segment_rotate(struct spool_worker *sw)
{
	char name[64];
	uint64_t old = sw->seq;
	sw->seq += sw->sp->nworkers; /* sequences interleave across workers: never collide */
	int r = segment_open_new(sw);
	if (r < 0) {
		sw->seq = old;
		return r;
	}
	if (sw->sp->cfg.discard) {
		/* every message in it is final already */
		snprintf(name, sizeof(name), "seg-%016" PRIx64 ".log", old);
		unlinkat(sw->dirfd, name, 0);
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
	iov[n++] = (struct iovec){t->env, t->env_len};
	for (struct body_chunk *c = t->head; c; c = c->next)
		if (c->len)
			iov[n++] = (struct iovec){c->data, c->len};
	if (t->pad)
		iov[n++] = (struct iovec){(void *)zeros, t->pad};
	return n;
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
	t->next = NULL;
	if (sw->pending_tail)
		sw->pending_tail->next = t;
	else
		sw->pending_head = t;
	sw->pending_tail = t;
}

/* ---- group commit ---- */

static void batch_finish(struct spool_worker *sw, int res)
{
	struct spool_txn *t = sw->batch;
	sw->batch = NULL;
	if (res == 0) {
		sw->offset += sw->batch_len;
		sw->stats.bytes += sw->batch_len;
	} else {
		/* drop whatever part of the batch reached the file: it was never acknowledged */
		if (ftruncate(sw->fd, (off_t)sw->offset) < 0)
			log_err("spool: worker %u: cannot truncate a failed write: %s; "
				"starting a new segment",
				sw->index, strerror(errno));
		if (res != -ENOSPC && res != -EDQUOT)
			log_err("spool: worker %u: write failed: %s", sw->index, strerror(-res));
		else
			log_once(LOG_WARN, "spool: the spool's file system is full (%s); "
					   "answering 452 until writes succeed",
				 strerror(-res));
	}
	while (t) {
		struct spool_txn *n = t->next;
		if (res == 0) {
			sw->stats.committed++;
			if (!sw->sp->cfg.discard)
				sw->queued++;
		} else {
			sw->stats.failed++;
		}
		t->done(t->arg, res, t->id);
		txn_free(t);
		t = n;
	}
}

static void write_done(struct net_io *io, int res)
{
	struct spool_worker *sw = container_of(io, struct spool_worker, write_io);
	sw->write_done = true;
	if (res >= 0 && (uint64_t)res != sw->batch_len)
		res = -ENOSPC; /* a short file write: the device is full */
	sw->write_res = res < 0 ? res : 0;
	if (sw->sync_wanted && sw->write_res == 0)
		return; /* the linked sync answers */
	if (sw->write_res == 0)
		sw->dirty = true;
	if (!sw->sync_wanted)
		batch_finish(sw, sw->write_res);
	/* else: a failed write cancels its linked sync, whose completion finishes the batch */
}

static void sync_done(struct net_io *io, int res)
{
	struct spool_worker *sw = container_of(io, struct spool_worker, sync_io);
	sw->stats.syncs++;
	if (sw->write_res < 0)
		res = sw->write_res;
	batch_finish(sw, res < 0 ? res : 0);
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

void spool_worker_turn_end(struct spool_worker *sw)
{
	while (sw->failed) {
		struct spool_txn *t = sw->failed;
		sw->failed = t->next;
		sw->stats.failed++;
		t->done(t->arg, t->fail, t->id);
		txn_free(t);
	}
	if (sw->batch || !sw->pending_head)
		return;
	if (sw->offset >= sw->sp->cfg.segment_size && !sw->sync_inflight) {
		int r = segment_rotate(sw);
		if (r < 0)
			log_err("spool: worker %u: cannot start a new segment: %s", sw->index,
				strerror(-r));
	}
	/* take as many pending transactions as fit in one writev */
	unsigned n = 0;
	uint64_t len = 0;
	struct spool_txn *t = sw->pending_head, *last = NULL;
	while (t && n + t->niov <= IOV_MAX) {
		if (n + t->niov > sw->iov_cap) {
			unsigned cap = MAX(sw->iov_cap * 2, 256u);
			while (cap < n + t->niov)
				cap *= 2;
			struct iovec *iv = realloc(sw->iov, cap * sizeof(*iv));
			if (!iv)
				break;
			sw->iov = iv;
			sw->iov_cap = cap;
		}
		unsigned k = txn_iov(t, sw->iov + n);
		for (unsigned i = 0; i < k; i++)
			len += sw->iov[n + i].iov_len;
		n += k;
		last = t;
		t = t->next;
	}
	if (!last)
		return;
	sw->batch = sw->pending_head;
	sw->pending_head = last->next;
	if (!sw->pending_head)
		sw->pending_tail = NULL;
	last->next = NULL;
	sw->batch_len = len;
	sw->write_done = false;
	sw->write_res = 0;
	sw->sync_wanted = sw->sp->cfg.durability == SPOOL_FSYNC;
	sw->stats.writes++;
	int r = net_file_writev(sw->w, sw->fd, sw->iov, n, sw->offset, &sw->write_io,
				sw->sync_wanted ? &sw->sync_io : NULL);
	if (r < 0)
		batch_finish(sw, r);
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
	sw->write_io.done = write_done;
	sw->sync_io.done = sync_done;
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
	sw->seq = sp->next_seq + i;
	sw->id_ms = sp->max_id_ms; /* every new id is above every id already in the spool */
	int r = segment_open_new(sw);
	if (r < 0) {
		log_err("spool: worker %u: cannot create a segment in %s: %s", i, path, strerror(-r));
		return r;
	}
	space_check(sw);
	sw->space_timer.fire = space_timer_fire;
	net_timer_start(w, &sw->space_timer, SPACE_CHECK_MS);
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
	net_timer_stop(sw->w, &sw->batch_timer);
	/* transactions sealed but never written: never acknowledged either */
	for (struct spool_txn *t = sw->failed, *n; t; t = n) {
		n = t->next;
		t->done(t->arg, t->fail, t->id);
		txn_free(t);
	}
	sw->failed = NULL;
	for (struct spool_txn *t = sw->pending_head, *n; t; t = n) {
		n = t->next;
		t->done(t->arg, -ESHUTDOWN, t->id);
		txn_free(t);
	}
	sw->pending_head = sw->pending_tail = NULL;
	if (sw->fd >= 0) {
		if (sw->sp->cfg.durability != SPOOL_NONE)
			fdatasync(sw->fd);
		close(sw->fd);
		sw->fd = -1;
	}
	if (sw->sp->cfg.discard || sw->offset == SEGMENT_HEADER_SIZE) {
		/* nothing queued in it */
		char name[64];
		snprintf(name, sizeof(name), "seg-%016" PRIx64 ".log", sw->seq);
		unlinkat(sw->dirfd, name, 0);
	}
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

struct rec_ctx {
	int *dirfds;
	unsigned ndirs;
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
	sg->scanned = true;
	if (sh.seq + 1 > sp->next_seq)
		sp->next_seq = sh.seq + 1;
	struct record_reader rr;
	record_reader_init(&rr, SEGMENT_HEADER_SIZE);
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
				if (!ref_push(&c->msgs, &c->nmsgs, &c->msgcap, rec.queue_id, si))
					c->oom = true;
			} else if (rec.type == RECORD_STATE) {
				enum spool_state s;
				if (state_payload_decode(rec.payload, rec.length, &s, NULL) < 0) {
					sg->keep = true; /* a newer writer's state: not ours to drop */
					continue;
				}
				if (state_table_add(&c->states, rec.queue_id, s) < 0 ||
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
		close(c->dirfds[i]);
	free(c->dirfds);
	for (size_t i = 0; i < c->nsegs; i++)
		free(c->segs[i].name);
	free(c->segs);
	free(c->msgs);
	free(c->strecs);
	state_table_free(&c->states);
}

/* Adds the segment names of the worker directory dfd. -errno on out of memory. */
static int list_worker_segments(struct rec_ctx *c, int dfd)
{
	int *fds = realloc(c->dirfds, (c->ndirs + 1) * sizeof(*fds));
	if (!fds) {
		close(dfd);
		return -ENOMEM;
	}
	c->dirfds = fds;
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
		r = list_worker_segments(&c, dfd);
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
	uint64_t queued = 0, held = 0;
	for (size_t i = 0; i < c.nmsgs; i++) {
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
	}
}

uint64_t spool_held(const struct spool *sp)
{
	return sp->recovered_held;
}

uint64_t spool_queued(const struct spool *sp)
{
	uint64_t n = sp->recovered;
	for (unsigned i = 0; i < sp->nworkers; i++)
		n += sp->workers[i].queued;
	return n;
}
