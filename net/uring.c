/*
 * The io_uring backend of net/: one ring per worker thread, pinned to a core.
 *
 * Per worker: a SO_REUSEPORT listener per configured address with a
 * multishot accept; a multishot recv per connection that picks buffers from
 * the worker's provided-buffer ring; output queued per connection as a list
 * of segments (copied bytes in pooled chunks, or references to caller memory)
 * and submitted as one sendmsg per connection per loop turn; a min-heap of
 * timers; an eventfd that the engine writes to stop the loop.
 *
 * user_data packs (op, connection slot, generation) so a completion for a
 * slot that was freed and reused is recognised and dropped (its buffer is
 * still given back to the ring).
 *
 * Everything that ends a connection happens at the end of a loop turn, never
 * inside a callback, so a protocol can close or abort from any callback and
 * the connection stays valid until that callback returns.
 */
#include "net/net.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <limits.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/compiler.h"
#include "core/log.h"

/* ---- user_data packing ---- */

enum op {
	OP_NONE = 0,
	OP_ACCEPT,
	OP_RECV,
	OP_SEND,
	OP_CONNECT,
	OP_WAKE,
	OP_IGNORE, /* cancels and other fire-and-forget requests */
	OP_FILE,   /* file I/O: the low 56 bits are the struct net_io pointer */
	OP_POLL,   /* a one-shot poll: the low 56 bits are the struct net_io pointer */
};

static inline uint64_t ud_pack(enum op op, uint32_t idx, uint32_t gen)
{
	return ((uint64_t)op << 56) | ((uint64_t)(idx & 0xffffffu) << 32) | gen;
}
static inline enum op ud_op(uint64_t ud)
{
	return (enum op)(ud >> 56);
}
static inline uint32_t ud_idx(uint64_t ud)
{
	return (uint32_t)(ud >> 32) & 0xffffffu;
}
static inline uint32_t ud_gen(uint64_t ud)
{
	return (uint32_t)ud;
}

/* ---- output segments ---- */

#define CHUNK_SIZE  16384u
#define SEND_IOV    64u
#define POOL_KEEP   1024u

struct seg {
	struct seg *next;
	const char *ptr; /* next byte to send */
	uint32_t len;    /* bytes left to send */
	uint32_t fill;   /* owned: bytes written into data */
	uint32_t cap;    /* owned: capacity of data; 0 for a reference */
	void (*release)(void *arg); /* reference: called once when sent or dropped */
	void *release_arg;
	char data[];
};

struct segq {
	struct seg *head, *tail;
};

/* ---- connections ---- */

enum conn_flag {
	CF_OPEN = 1u << 0,       /* slot in use */
	CF_RECV_ARMED = 1u << 1, /* a recv is in the kernel */
	CF_CANCELING = 1u << 2,  /* a cancel of the recv was submitted */
	CF_SENDING = 1u << 3,    /* a sendmsg is in the kernel */
	CF_CLOSING = 1u << 4,    /* graceful close asked: flush, then close */
	CF_ABORT = 1u << 5,      /* close now */
	CF_DIRTY = 1u << 6,      /* on the worker's service list */
	CF_PAUSED_USER = 1u << 7,
	CF_PAUSED_BP = 1u << 8, /* output above high water */
	CF_CONNECTING = 1u << 9,
	CF_ADDRS = 1u << 10,      /* peer/local filled */
	CF_EOF = 1u << 11,        /* peer closed its side */
	CF_SHUT_ASKED = 1u << 12, /* on_shutdown was called */
	CF_STARVED = 1u << 13,    /* recv ended with ENOBUFS: re-armed when buffers come back */
	CF_PREOPEN = 1u << 14,    /* filtered listener: on_open waits for the handshake */
	CF_FMORE = 1u << 15,      /* the filter may hold decoded input: read it on resume */
	CF_FCLOSED = 1u << 16,    /* the filter's close was queued */
};

/* A connection's filter (TLS): absent, handshaking, open, or failed. */
enum filter_state { FS_NONE = 0, FS_START, FS_HANDSHAKE, FS_OPEN, FS_FAILED };

struct held_buf {
	uint16_t bid;
	uint32_t len;
};

struct net_conn {
	struct net_worker *w;
	struct __kernel_timespec cts; /* the connect's link timeout, read at submission */
	int fd;
	uint32_t idx;
	uint32_t gen;
	uint32_t flags;
	int close_err;
	const struct net_proto *proto;
	void *data;
	void *lctx;
	struct segq out;     /* octets for the socket */
	struct segq *sendq;  /* where net_send* queue: &out, or &plain under a filter */
	size_t pending;      /* octets queued and not yet sent: out and plain */
	struct net_conn *dirty_next;
	struct net_timer timer;
	/* input received while reading was paused: delivered, in order, on resume */
	struct held_buf *held;
	unsigned held_n, held_head, held_cap;
	struct msghdr msg;
	struct iovec iov[SEND_IOV];
	struct sockaddr_storage peer;
	struct sockaddr_storage local;
	/* filter (TLS): the protocol's output waits in plain until encoded into out */
	const struct net_filter_ops *fops;
	void *f;
	enum filter_state fstate;
	struct segq plain;
	size_t plain_pending;
};

struct listener {
	int fds[256]; /* one per worker; index = worker */
	const struct net_proto *proto;
	void *ctx;
	int (*filter_start)(struct net_conn *c, void *arg);
	void *filter_arg;
	char host[64];
	uint16_t port;
};

#define MAX_LISTENERS 16

struct net_worker {
	struct io_uring ring;
	struct net_engine *e;
	unsigned index;
	int cpu;
	pthread_t thread;
	int wake_fd;
	uint64_t wake_val;
	uint64_t now_ms;
	bool stopping;
	bool multishot_accept;
	bool multishot_recv;
	bool ring_ok;
	bool loop_done; /* worker_loop returned: no completion is handled any more */
	int init_err;
	void *data;

	/* provided buffers */
	struct io_uring_buf_ring *br;
	size_t br_size;
	char *bufs; /* buf_count x buf_size, mapped (bufs_size octets) */
	size_t bufs_size;
	unsigned buf_mask;
	unsigned bufs_returned; /* added to the ring, not yet advanced */

	/* connections */
	struct net_conn *conns;
	uint32_t free_head; /* free list through conns[i].idx is kept; uses next_free */
	uint32_t *next_free;
	unsigned nconns;
	unsigned file_inflight; /* file requests in the kernel: the loop waits for them at stop */
	struct net_conn *dirty;
	uint64_t *starved; /* (slot, generation) of recvs that ran out of buffers */
	unsigned starved_n, starved_cap;

	/* segment pools */
	struct seg *chunk_pool;
	unsigned chunk_pool_n;
	struct seg *ref_pool;
	unsigned ref_pool_n;

	char *fbuf;   /* decoded input of a filtered connection, during on_data */
	char *fstage; /* small plaintext segments gathered into one record (filter_service) */

	/* timers: min-heap by deadline */
	struct net_timer **heap;
	unsigned heap_n, heap_cap;
	struct net_timer grace_timer;

	bool accept_armed[MAX_LISTENERS];
} cache_aligned;

struct net_engine {
	struct net_config cfg;
	struct net_worker_hooks hooks;
	unsigned nworkers;
	struct net_worker *workers;
	struct listener listeners[MAX_LISTENERS];
	unsigned nlisteners;
	atomic_bool stop;
	atomic_uint running;
	atomic_int err;
};

void net_config_default(struct net_config *cfg)
{
	*cfg = (struct net_config){
		.workers = 0,
		.pin = true,
		.max_conns = 16384,
		.ring_entries = 4096,
		.buf_size = 16384,
		.buf_count = 4096,
		.out_high_water = 256 * 1024,
		.out_low_water = 64 * 1024,
		.shutdown_grace_ms = 5000,
		.listen_backlog = 4096,
		.handshake_timeout_ms = 30000,
	};
}

/* ---- timers ---- */

static void heap_swap(struct net_timer **h, unsigned a, unsigned b)
{
	struct net_timer *t = h[a];
	h[a] = h[b];
	h[b] = t;
	h[a]->heap_index = a + 1;
	h[b]->heap_index = b + 1;
}

static void heap_up(struct net_timer **h, unsigned i)
{
	while (i > 0) {
		unsigned p = (i - 1) / 2;
		if (h[p]->deadline_ms <= h[i]->deadline_ms)
			break;
		heap_swap(h, i, p);
		i = p;
	}
}

static void heap_down(struct net_timer **h, unsigned n, unsigned i)
{
	for (;;) {
		unsigned l = 2 * i + 1, r = l + 1, m = i;
		if (l < n && h[l]->deadline_ms < h[m]->deadline_ms)
			m = l;
		if (r < n && h[r]->deadline_ms < h[m]->deadline_ms)
			m = r;
		if (m == i)
			return;
		heap_swap(h, i, m);
		i = m;
	}
}

void net_timer_stop(struct net_worker *w, struct net_timer *t)
{
	if (!t->heap_index)
		return;
	unsigned i = t->heap_index - 1;
	t->heap_index = 0;
	w->heap_n--;
	if (i == w->heap_n)
		return;
	w->heap[i] = w->heap[w->heap_n];
	w->heap[i]->heap_index = i + 1;
	heap_up(w->heap, i);
	heap_down(w->heap, w->heap_n, i);
}

void net_timer_start(struct net_worker *w, struct net_timer *t, uint64_t ms)
{
	net_timer_stop(w, t);
	t->deadline_ms = w->now_ms + ms;
	if (w->heap_n == w->heap_cap) {
		unsigned cap = w->heap_cap ? w->heap_cap * 2 : 1024;
		struct net_timer **h = realloc(w->heap, cap * sizeof(*h));
		if (!h)
			panic("net: out of memory for timers");
		w->heap = h;
		w->heap_cap = cap;
	}
	w->heap[w->heap_n] = t;
	t->heap_index = ++w->heap_n;
	heap_up(w->heap, w->heap_n - 1);
}

static void timers_run(struct net_worker *w)
{
	while (w->heap_n && w->heap[0]->deadline_ms <= w->now_ms) {
		struct net_timer *t = w->heap[0];
		net_timer_stop(w, t);
		t->fire(t, w);
	}
}

/* ---- small helpers ---- */

static struct io_uring_sqe *get_sqe(struct net_worker *w)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&w->ring);
	while (!sqe) {
		int r = io_uring_submit(&w->ring);
		if (r < 0 && r != -EAGAIN && r != -EBUSY && r != -EINTR)
			panic("net: io_uring_submit: %s", strerror(-r));
		sqe = io_uring_get_sqe(&w->ring);
	}
	return sqe;
}

static void conn_kick(struct net_conn *c)
{
	if (c->flags & CF_DIRTY)
		return;
	c->flags |= CF_DIRTY;
	c->dirty_next = c->w->dirty;
	c->w->dirty = c;
}

static bool conn_wants_read(const struct net_conn *c)
{
	return !(c->flags & (CF_PAUSED_USER | CF_PAUSED_BP | CF_CLOSING | CF_ABORT | CF_EOF |
			     CF_CONNECTING));
}

static void buf_return(struct net_worker *w, unsigned bid)
{
	io_uring_buf_ring_add(w->br, w->bufs + (size_t)bid * w->e->cfg.buf_size,
			      w->e->cfg.buf_size, (unsigned short)bid, w->buf_mask,
			      (int)w->bufs_returned);
	w->bufs_returned++;
}

static void seg_free(struct net_worker *w, struct seg *s)
{
	if (s->release) {
		void (*release)(void *) = s->release;
		s->release = NULL;
		release(s->release_arg);
	}
	if (s->cap == CHUNK_SIZE && w->chunk_pool_n < POOL_KEEP) {
		s->next = w->chunk_pool;
		w->chunk_pool = s;
		w->chunk_pool_n++;
	} else if (s->cap == 0 && w->ref_pool_n < POOL_KEEP) {
		s->next = w->ref_pool;
		w->ref_pool = s;
		w->ref_pool_n++;
	} else {
		free(s);
	}
}

static struct seg *seg_new_owned(struct net_worker *w, size_t need)
{
	struct seg *s;
	if (need <= CHUNK_SIZE && w->chunk_pool) {
		s = w->chunk_pool;
		w->chunk_pool = s->next;
		w->chunk_pool_n--;
	} else {
		size_t cap = need <= CHUNK_SIZE ? CHUNK_SIZE : need;
		s = malloc(sizeof(*s) + cap);
		if (!s)
			return NULL;
		s->cap = (uint32_t)cap;
	}
	s->next = NULL;
	s->ptr = s->data;
	s->len = 0;
	s->fill = 0;
	s->release = NULL;
	return s;
}

static struct seg *seg_new_ref(struct net_worker *w)
{
	struct seg *s;
	if (w->ref_pool) {
		s = w->ref_pool;
		w->ref_pool = s->next;
		w->ref_pool_n--;
	} else {
		s = malloc(sizeof(*s));
		if (!s)
			return NULL;
	}
	s->next = NULL;
	s->cap = 0;
	s->fill = 0;
	s->release = NULL;
	return s;
}

static void segq_append(struct segq *q, struct seg *s)
{
	if (q->tail)
		q->tail->next = s;
	else
		q->head = s;
	q->tail = s;
}

static void segq_clear(struct net_worker *w, struct segq *q)
{
	/* detached first: a release callback may queue output (or fail to) */
	struct seg *s = q->head;
	q->head = q->tail = NULL;
	while (s) {
		struct seg *n = s->next;
		seg_free(w, s);
		s = n;
	}
}

/* Drops the plaintext a filter has not encoded yet. */
static void plain_clear(struct net_conn *c)
{
	c->pending -= c->plain_pending;
	c->plain_pending = 0;
	segq_clear(c->w, &c->plain);
}

static void out_clear(struct net_conn *c)
{
	plain_clear(c);
	c->pending = 0;
	segq_clear(c->w, &c->out);
}

/* ---- connection slots ---- */

static struct net_conn *conn_alloc(struct net_worker *w)
{
	if (w->free_head == UINT32_MAX)
		return NULL;
	uint32_t i = w->free_head;
	w->free_head = w->next_free[i];
	struct net_conn *c = &w->conns[i];
	uint32_t gen = c->gen;
	memset(c, 0, sizeof(*c));
	c->w = w;
	c->idx = i;
	c->gen = gen;
	c->fd = -1;
	c->flags = CF_OPEN;
	c->sendq = &c->out;
	w->nconns++;
	return c;
}

static void buf_return(struct net_worker *w, unsigned bid);

static void held_drop(struct net_conn *c)
{
	for (unsigned i = c->held_head; i < c->held_n; i++)
		buf_return(c->w, c->held[i].bid);
	free(c->held);
	c->held = NULL;
	c->held_n = c->held_head = c->held_cap = 0;
}

static void conn_release(struct net_conn *c)
{
	struct net_worker *w = c->w;
	out_clear(c);
	held_drop(c);
	net_timer_stop(w, &c->timer);
	if (c->fops) {
		c->fops->free(c->f);
		c->fops = NULL;
		c->f = NULL;
	}
	c->flags = 0;
	c->gen++;
	w->next_free[c->idx] = w->free_head;
	w->free_head = c->idx;
	w->nconns--;
}

static struct net_conn *conn_lookup(struct net_worker *w, uint64_t ud)
{
	uint32_t idx = ud_idx(ud);
	if (idx >= w->e->cfg.max_conns)
		return NULL;
	struct net_conn *c = &w->conns[idx];
	if (!(c->flags & CF_OPEN) || c->gen != ud_gen(ud))
		return NULL;
	return c;
}

static void conn_timer_fire(struct net_timer *t, struct net_worker *w)
{
	struct net_conn *c = container_of(t, struct net_conn, timer);
	(void)w;
	if (c->flags & CF_PREOPEN) {
		/* an implicit-TLS connection whose handshake did not finish in time */
		log_debug("net: filter handshake timed out; connection dropped");
		net_conn_abort(c, -ETIMEDOUT);
		return;
	}
	if (c->flags & (CF_CLOSING | CF_ABORT)) {
		/* a graceful close that could not flush in time: the peer reads nothing */
		net_conn_abort(c, -ETIMEDOUT);
		return;
	}
	if (c->proto->on_timeout)
		c->proto->on_timeout(c);
	else
		net_conn_abort(c, -ETIMEDOUT);
}

/* ---- submissions ---- */

static void arm_recv(struct net_conn *c)
{
	struct net_worker *w = c->w;
	struct io_uring_sqe *sqe = get_sqe(w);
	if (w->multishot_recv)
		io_uring_prep_recv_multishot(sqe, c->fd, NULL, 0, 0);
	else
		io_uring_prep_recv(sqe, c->fd, NULL, w->e->cfg.buf_size, 0);
	sqe->flags |= IOSQE_BUFFER_SELECT;
	sqe->buf_group = 0;
	io_uring_sqe_set_data64(sqe, ud_pack(OP_RECV, c->idx, c->gen));
	c->flags |= CF_RECV_ARMED;
}

static void cancel_recv(struct net_conn *c)
{
	if (!(c->flags & CF_RECV_ARMED) || (c->flags & CF_CANCELING))
		return;
	struct io_uring_sqe *sqe = get_sqe(c->w);
	io_uring_prep_cancel64(sqe, ud_pack(OP_RECV, c->idx, c->gen), 0);
	io_uring_sqe_set_data64(sqe, ud_pack(OP_IGNORE, 0, 0));
	c->flags |= CF_CANCELING;
}

static void submit_send(struct net_conn *c)
{
	unsigned n = 0;
	for (struct seg *s = c->out.head; s && n < SEND_IOV; s = s->next) {
		if (!s->len)
			continue;
		c->iov[n].iov_base = (void *)s->ptr;
		c->iov[n].iov_len = s->len;
		n++;
	}
	if (!n)
		return;
	struct io_uring_sqe *sqe = get_sqe(c->w);
	if (n == 1) {
		/* the common case (a batch of replies): plain send, no msghdr to import */
		io_uring_prep_send(sqe, c->fd, c->iov[0].iov_base, c->iov[0].iov_len, MSG_NOSIGNAL);
	} else {
		memset(&c->msg, 0, sizeof(c->msg));
		c->msg.msg_iov = c->iov;
		c->msg.msg_iovlen = n;
		io_uring_prep_sendmsg(sqe, c->fd, &c->msg, MSG_NOSIGNAL);
	}
	io_uring_sqe_set_data64(sqe, ud_pack(OP_SEND, c->idx, c->gen));
	c->flags |= CF_SENDING;
}

static void conn_finish(struct net_conn *c)
{
	struct net_worker *w = c->w;
	cancel_recv(c);
	if (c->fd >= 0) {
		if (!(c->flags & CF_ABORT))
			shutdown(c->fd, SHUT_WR);
		/* in-flight requests hold their own reference to the file */
		close(c->fd);
		c->fd = -1;
	}
	int err = c->close_err;
	/* a filtered listener's connection that never opened gets no callback at all */
	bool opened = !(c->flags & CF_PREOPEN);
	bool handshaking = c->fstate == FS_START || c->fstate == FS_HANDSHAKE;
	/* During on_close the connection takes no more output and is never re-listed. */
	c->flags = CF_CLOSING | CF_ABORT | CF_DIRTY;
	net_timer_stop(w, &c->timer);
	out_clear(c); /* releases of unsent references run before on_close */
	if (unlikely(handshaking)) {
		c->fstate = FS_FAILED;
		if (opened && c->proto->on_tls)
			c->proto->on_tls(c, err ? err : -ECONNRESET);
	}
	if (opened && c->proto && c->proto->on_close)
		c->proto->on_close(c, err);
	conn_release(c);
}

/* ---- filters ---- */

static const char *peer_str(struct net_conn *c, char *buf, size_t len)
{
	const struct sockaddr_storage *ss = net_conn_peer(c);
	const void *a = ss->ss_family == AF_INET6 ? (const void *)&((const struct sockaddr_in6 *)ss)->sin6_addr
						  : (const void *)&((const struct sockaddr_in *)ss)->sin_addr;
	if (ss->ss_family != AF_INET && ss->ss_family != AF_INET6)
		return "?";
	if (!inet_ntop(ss->ss_family, a, buf, (socklen_t)len))
		return "?";
	return buf;
}

/*
 * The filter failed (or its peer left during the handshake): a pending
 * handshake is reported to the protocol, the plaintext that was never
 * encoded is dropped, and whatever the filter still has to say (an alert)
 * is flushed before the close.
 */
static void filter_fail(struct net_conn *c, int err)
{
	bool report = c->fstate == FS_START || c->fstate == FS_HANDSHAKE;
	c->fstate = FS_FAILED;
	plain_clear(c);
	if (!c->close_err)
		c->close_err = err;
	if (report && !(c->flags & CF_PREOPEN) && c->proto->on_tls)
		c->proto->on_tls(c, err);
	net_conn_close(c);
}

/* Moves the filter's output into the socket queue (one copy, into the tail chunk). */
static int filter_drain(struct net_conn *c)
{
	size_t avail;
	while ((avail = c->fops->output_pending(c->f)) > 0) {
		struct seg *t = c->out.tail;
		if (!t || !t->cap || t->fill == t->cap || t->ptr + t->len != t->data + t->fill) {
			t = seg_new_owned(c->w, CHUNK_SIZE);
			if (!t)
				return -ENOMEM;
			segq_append(&c->out, t);
		}
		size_t room = t->cap - t->fill;
		size_t n = c->fops->output(c->f, t->data + t->fill, room < avail ? room : avail);
		if (!n)
			break;
		t->fill += (uint32_t)n;
		t->len += (uint32_t)n;
		c->pending += n;
	}
	return 0;
}

/* Advances the handshake, then hands decoded input to the protocol while it reads. */
static void filter_pump(struct net_conn *c)
{
	struct net_worker *w = c->w;
	c->flags &= ~CF_FMORE;
	if (c->fstate == FS_START)
		c->fstate = FS_HANDSHAKE;
	if (c->fstate == FS_HANDSHAKE) {
		int r = c->fops->handshake(c->f);
		if (r == 0)
			return;
		if (r < 0) {
			filter_fail(c, r);
			return;
		}
		c->fstate = FS_OPEN;
		conn_kick(c); /* plaintext queued during the handshake can go now */
		if (c->flags & CF_PREOPEN) {
			c->flags &= ~CF_PREOPEN;
			net_timer_stop(w, &c->timer);
			if (c->proto->on_open)
				c->proto->on_open(c, 0);
		} else if (c->proto->on_tls) {
			c->proto->on_tls(c, 0);
		}
	}
	if (c->fstate != FS_OPEN || !c->proto->on_data)
		return;
	if (!w->fbuf && !(w->fbuf = malloc(NET_FILTER_READ_MAX))) {
		net_conn_abort(c, -ENOMEM);
		return;
	}
	while (conn_wants_read(c)) {
		long n = c->fops->read(c->f, w->fbuf, NET_FILTER_READ_MAX);
		if (n == 0)
			return;
		if (n < 0) {
			if (n == -EPIPE) { /* the peer ended the session: as an EOF */
				c->flags |= CF_EOF;
				net_conn_close(c);
			} else {
				filter_fail(c, (int)n);
			}
			return;
		}
		struct iovec iov = {w->fbuf, (size_t)n};
		c->proto->on_data(c, &iov, 1);
	}
	c->flags |= CF_FMORE; /* paused (or closing) with input possibly left in the filter */
}

/* Received octets of a filtered connection. */
static void filter_input(struct net_conn *c, const char *p, size_t len)
{
	conn_kick(c); /* what the filter answers goes out at the end of the turn */
	if (c->fstate == FS_FAILED)
		return;
	int r = c->fops->input(c->f, p, len);
	if (r < 0)
		filter_fail(c, r);
	else
		filter_pump(c);
}

/*
 * Encodes len octets of plaintext and moves the result to the socket queue.
 * 0, or -errno: the filter failed (the connection is closing), or the move
 * ran out of memory (the connection was aborted).
 */
static int filter_encode(struct net_conn *c, const char *p, size_t len)
{
	int r = c->fops->write(c->f, p, len);
	if (r < 0) {
		filter_fail(c, r);
		return r;
	}
	if (filter_drain(c) < 0) {
		net_conn_abort(c, -ENOMEM);
		return -ENOMEM;
	}
	return 0;
}

/*
 * At the end of a loop turn: start a handshake, resume decoding for a
 * protocol that resumed reading, encode the queued plaintext (at most
 * out_high_water ahead of the socket, so referenced bodies are not copied
 * long before they can be sent), queue the close, move output to the socket.
 *
 * Each write() is at least one record, and a record costs far more than its
 * octets at these sizes (an AEAD set-up per record in OpenSSL 3), so small
 * segments (a client's pipelined commands, a referenced body, the final dot)
 * are gathered into one buffer and encoded as one record; a segment that does
 * not fit goes to write() as it is.
 */
static void filter_service(struct net_conn *c)
{
	if (c->fstate == FS_START || ((c->flags & CF_FMORE) && conn_wants_read(c)))
		filter_pump(c);
	if (c->fstate == FS_OPEN) {
		struct net_worker *w = c->w;
		bool closing = c->flags & (CF_CLOSING | CF_ABORT);
		size_t ahead = w->e->cfg.out_high_water;
		size_t staged = 0;
		if (c->plain.head && c->plain.head != c->plain.tail && !w->fstage)
			w->fstage = malloc(NET_FILTER_READ_MAX); /* without it: a record per segment */
		while (c->plain.head && (closing || c->pending - c->plain_pending < ahead)) {
			struct seg *s = c->plain.head;
			if (s->len) {
				if (w->fstage && staged + s->len <= NET_FILTER_READ_MAX) {
					memcpy(w->fstage + staged, s->ptr, s->len);
					staged += s->len;
				} else {
					if (staged && filter_encode(c, w->fstage, staged) < 0)
						goto failed;
					staged = 0;
					if (filter_encode(c, s->ptr, s->len) < 0)
						goto failed;
				}
				c->pending -= s->len;
				c->plain_pending -= s->len;
				s->ptr += s->len;
				s->len = 0;
			}
			/* an owned chunk may still take appended bytes: keep it if it is the tail */
			if (s == c->plain.tail && s->cap && s->fill < s->cap)
				break;
			c->plain.head = s->next;
			if (!c->plain.head)
				c->plain.tail = NULL;
			seg_free(w, s); /* a reference's release runs once it is encoded (or staged) */
		}
		if (staged && filter_encode(c, w->fstage, staged) < 0)
			goto failed;
		if ((c->flags & CF_CLOSING) && c->fstate == FS_OPEN && !c->plain_pending &&
		    !(c->flags & CF_FCLOSED)) {
			c->fops->close(c->f);
			c->flags |= CF_FCLOSED;
		}
	} else if (c->flags & CF_CLOSING) {
		plain_clear(c); /* the handshake never finished: nothing can be encoded */
	}
	if (filter_drain(c) < 0)
		net_conn_abort(c, -ENOMEM);
	return;
failed:
	if (!(c->flags & CF_ABORT) && filter_drain(c) < 0) /* the filter's alert, if any */
		net_conn_abort(c, -ENOMEM);
}

/* Received octets: to the filter if there is one, else to the protocol in place. */
static inline void conn_deliver(struct net_conn *c, char *p, size_t len)
{
	if (unlikely(c->fops)) {
		filter_input(c, p, len);
	} else {
		struct iovec iov = {p, len};
		c->proto->on_data(c, &iov, 1);
	}
}

int net_conn_set_filter(struct net_conn *c, const struct net_filter_ops *ops, void *f)
{
	if (c->fops)
		return -EALREADY;
	if (c->flags & (CF_CLOSING | CF_ABORT))
		return -EPIPE;
	/* input received before the switch is plaintext sent before our go-ahead: dropped */
	held_drop(c);
	c->fops = ops;
	c->f = f;
	c->fstate = FS_START;
	c->sendq = &c->plain;
	c->flags &= ~CF_FMORE;
	conn_kick(c);
	return 0;
}

void *net_conn_filter(const struct net_conn *c, const struct net_filter_ops *ops)
{
	return c->fops == ops ? c->f : NULL;
}

bool net_conn_filter_ready(const struct net_conn *c)
{
	return c->fstate == FS_OPEN;
}

static void held_deliver(struct net_conn *c)
{
	struct net_worker *w = c->w;
	while (c->held_head < c->held_n && conn_wants_read(c)) {
		struct held_buf hb = c->held[c->held_head++];
		conn_deliver(c, w->bufs + (size_t)hb.bid * w->e->cfg.buf_size, hb.len);
		buf_return(w, hb.bid);
	}
	if (c->held_head == c->held_n)
		c->held_head = c->held_n = 0;
}

static int held_push(struct net_conn *c, unsigned bid, uint32_t len)
{
	if (c->held_n == c->held_cap) {
		if (c->held_head) {
			memmove(c->held, c->held + c->held_head,
				(c->held_n - c->held_head) * sizeof(*c->held));
			c->held_n -= c->held_head;
			c->held_head = 0;
		}
		if (c->held_n == c->held_cap) {
			unsigned cap = c->held_cap ? c->held_cap * 2 : 8;
			struct held_buf *h = realloc(c->held, cap * sizeof(*h));
			if (!h)
				return -ENOMEM;
			c->held = h;
			c->held_cap = cap;
		}
	}
	c->held[c->held_n++] = (struct held_buf){(uint16_t)bid, len};
	return 0;
}

/* Decides what a connection needs at the end of a loop turn. */
static void conn_service(struct net_conn *c)
{
	c->flags &= ~CF_DIRTY;
	if (!(c->flags & CF_OPEN))
		return;
	if (c->flags & CF_ABORT) {
		conn_finish(c);
		return;
	}
	if (unlikely(c->fops)) {
		filter_service(c);
		if (c->flags & CF_ABORT) {
			conn_finish(c);
			return;
		}
	}
	if (c->pending && !(c->flags & CF_SENDING))
		submit_send(c);
	if (c->flags & CF_CLOSING) {
		if (!c->pending && !(c->flags & CF_SENDING))
			conn_finish(c);
		else
			cancel_recv(c);
		return;
	}
	if (conn_wants_read(c) && c->held_n)
		held_deliver(c);
	if (!(c->flags & CF_OPEN) || (c->flags & (CF_ABORT | CF_CLOSING))) {
		conn_kick(c); /* the protocol closed it while taking held input */
		return;
	}
	if (conn_wants_read(c)) {
		if (!(c->flags & (CF_RECV_ARMED | CF_STARVED)))
			arm_recv(c);
	} else if (c->flags & CF_RECV_ARMED) {
		cancel_recv(c);
	}
}

static void arm_accept(struct net_worker *w, unsigned li)
{
	struct io_uring_sqe *sqe = get_sqe(w);
	int fd = w->e->listeners[li].fds[w->index];
	if (w->multishot_accept)
		io_uring_prep_multishot_accept(sqe, fd, NULL, NULL, SOCK_CLOEXEC);
	else
		io_uring_prep_accept(sqe, fd, NULL, NULL, SOCK_CLOEXEC);
	io_uring_sqe_set_data64(sqe, ud_pack(OP_ACCEPT, li, 0));
	w->accept_armed[li] = true;
}

static void arm_wake(struct net_worker *w)
{
	struct io_uring_sqe *sqe = get_sqe(w);
	io_uring_prep_read(sqe, w->wake_fd, &w->wake_val, sizeof(w->wake_val), 0);
	io_uring_sqe_set_data64(sqe, ud_pack(OP_WAKE, 0, 0));
}

/* ---- public connection calls ---- */

struct net_worker *net_conn_worker(const struct net_conn *c)
{
	return c->w;
}
void *net_conn_data(const struct net_conn *c)
{
	return c->data;
}
void net_conn_set_data(struct net_conn *c, void *data)
{
	c->data = data;
}
void *net_conn_listener_ctx(const struct net_conn *c)
{
	return c->lctx;
}

static void conn_fill_addrs(const struct net_conn *cc)
{
	struct net_conn *c = (struct net_conn *)cc; /* lazily filled cache */
	if (c->flags & CF_ADDRS)
		return;
	socklen_t l = sizeof(c->peer);
	if (getpeername(c->fd, (struct sockaddr *)&c->peer, &l) < 0)
		c->peer.ss_family = AF_UNSPEC;
	l = sizeof(c->local);
	if (getsockname(c->fd, (struct sockaddr *)&c->local, &l) < 0)
		c->local.ss_family = AF_UNSPEC;
	c->flags |= CF_ADDRS;
}

const struct sockaddr_storage *net_conn_peer(const struct net_conn *c)
{
	conn_fill_addrs(c);
	return &c->peer;
}

const struct sockaddr_storage *net_conn_local(const struct net_conn *c)
{
	conn_fill_addrs(c);
	return &c->local;
}

size_t net_conn_pending(const struct net_conn *c)
{
	return c->pending;
}

static int send_check(struct net_conn *c, size_t len)
{
	if (c->flags & (CF_CLOSING | CF_ABORT))
		return -EPIPE;
	if (c->pending + len > 16 * c->w->e->cfg.out_high_water)
		return -ENOBUFS;
	return 0;
}

static void send_queued(struct net_conn *c, size_t len)
{
	c->pending += len;
	if (unlikely(c->sendq != &c->out))
		c->plain_pending += len;
	/* not while a handshake is pending: the plaintext drains only after it, and the
	   handshake needs the reads */
	if (c->pending > c->w->e->cfg.out_high_water && !(c->flags & CF_PAUSED_BP) &&
	    c->fstate != FS_START && c->fstate != FS_HANDSHAKE)
		c->flags |= CF_PAUSED_BP;
	conn_kick(c);
}

static int copy_in(struct net_conn *c, const char *p, size_t len)
{
	struct seg *t = c->sendq->tail;
	if (t && t->cap && t->fill < t->cap && t->ptr + t->len == t->data + t->fill) {
		size_t room = t->cap - t->fill;
		size_t n = len < room ? len : room;
		memcpy(t->data + t->fill, p, n);
		t->fill += (uint32_t)n;
		t->len += (uint32_t)n;
		p += n;
		len -= n;
	}
	if (len) {
		struct seg *s = seg_new_owned(c->w, len);
		if (!s)
			return -ENOMEM;
		memcpy(s->data, p, len);
		s->fill = (uint32_t)len;
		s->len = (uint32_t)len;
		segq_append(c->sendq, s);
	}
	return 0;
}

int net_send(struct net_conn *c, const void *data, size_t len)
{
	int r = send_check(c, len);
	if (r < 0 || !len)
		return r;
	r = copy_in(c, data, len);
	if (r < 0)
		return r;
	send_queued(c, len);
	return 0;
}

int net_sendv(struct net_conn *c, const struct iovec *iov, unsigned n)
{
	size_t total = 0;
	for (unsigned i = 0; i < n; i++)
		total += iov[i].iov_len;
	int r = send_check(c, total);
	if (r < 0 || !total)
		return r;
	for (unsigned i = 0; i < n; i++) {
		r = copy_in(c, iov[i].iov_base, iov[i].iov_len);
		if (r < 0)
			return r;
	}
	send_queued(c, total);
	return 0;
}

int net_send_ref(struct net_conn *c, const void *data, size_t len)
{
	return net_send_ref_release(c, data, len, NULL, NULL);
}

int net_send_ref_release(struct net_conn *c, const void *data, size_t len,
			 void (*release)(void *arg), void *arg)
{
	int r = send_check(c, len);
	if (r == 0 && len > UINT32_MAX)
		r = -EMSGSIZE;
	if (r < 0 || !len)
		return r;
	struct seg *s = seg_new_ref(c->w);
	if (!s)
		return -ENOMEM;
	s->ptr = data;
	s->len = (uint32_t)len;
	s->release = release;
	s->release_arg = arg;
	segq_append(c->sendq, s);
	send_queued(c, len);
	return 0;
}

void net_conn_pause_reading(struct net_conn *c)
{
	c->flags |= CF_PAUSED_USER;
	conn_kick(c);
}

void net_conn_resume_reading(struct net_conn *c)
{
	c->flags &= ~CF_PAUSED_USER;
	conn_kick(c);
}

void net_conn_set_timeout(struct net_conn *c, uint64_t ms)
{
	if (c->flags & (CF_CLOSING | CF_ABORT))
		return; /* the close's own flush deadline stays */
	if (!ms) {
		net_timer_stop(c->w, &c->timer);
		return;
	}
	c->timer.fire = conn_timer_fire;
	net_timer_start(c->w, &c->timer, ms);
}

void net_conn_close(struct net_conn *c)
{
	if (c->flags & (CF_CLOSING | CF_ABORT))
		return;
	c->flags |= CF_CLOSING;
	c->timer.fire = conn_timer_fire;
	net_timer_start(c->w, &c->timer, c->w->e->cfg.shutdown_grace_ms);
	conn_kick(c);
}

void net_conn_abort(struct net_conn *c, int err)
{
	if (c->flags & CF_ABORT)
		return;
	c->flags |= CF_ABORT;
	if (!c->close_err)
		c->close_err = err;
	conn_kick(c);
}

/* ---- completions ---- */

static void on_accept_cqe(struct net_worker *w, uint64_t ud, const struct io_uring_cqe *cqe)
{
	unsigned li = ud_idx(ud);
	struct listener *l = &w->e->listeners[li];
	if (!(cqe->flags & IORING_CQE_F_MORE))
		w->accept_armed[li] = false;
	if (cqe->res < 0) {
		if (cqe->res == -EINVAL && w->multishot_accept && !w->stopping) {
			log_once(LOG_WARN, "net: multishot accept unsupported by this kernel; "
					   "falling back to one accept per connection");
			w->multishot_accept = false;
		} else if (cqe->res != -ECANCELED && !w->stopping && cqe->res != -EAGAIN &&
			   cqe->res != -EINTR && cqe->res != -ECONNABORTED) {
			log_warn("net: accept on %s:%u: %s", l->host, l->port, strerror(-cqe->res));
		}
		if (!w->accept_armed[li] && !w->stopping)
			arm_accept(w, li);
		return;
	}
	int fd = cqe->res;
	if (!w->accept_armed[li] && !w->stopping)
		arm_accept(w, li);
	if (w->stopping) {
		close(fd);
		return;
	}
	struct net_conn *c = conn_alloc(w);
	if (!c) {
		log_once(LOG_WARN, "net: worker connection table full (max_conns %u); "
				   "refusing connections",
			 w->e->cfg.max_conns);
		if (l->proto->refuse_msg) {
			ssize_t r = send(fd, l->proto->refuse_msg, strlen(l->proto->refuse_msg),
					 MSG_DONTWAIT | MSG_NOSIGNAL);
			(void)r;
		}
		close(fd);
		return;
	}
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	c->fd = fd;
	c->proto = l->proto;
	c->lctx = l->ctx;
	conn_kick(c);
	if (l->filter_start) {
		/* implicit TLS: on_open once the handshake is done */
		c->flags |= CF_PREOPEN;
		c->timer.fire = conn_timer_fire;
		net_timer_start(w, &c->timer, w->e->cfg.handshake_timeout_ms);
		int r = l->filter_start(c, l->filter_arg);
		if (r < 0)
			net_conn_abort(c, r);
		return;
	}
	if (c->proto->on_open)
		c->proto->on_open(c, 0);
}

static void on_recv_cqe(struct net_worker *w, uint64_t ud, const struct io_uring_cqe *cqe)
{
	bool has_buf = cqe->flags & IORING_CQE_F_BUFFER;
	unsigned bid = cqe->flags >> IORING_CQE_BUFFER_SHIFT;
	struct net_conn *c = conn_lookup(w, ud);
	if (!c) {
		if (has_buf)
			buf_return(w, bid);
		return;
	}
	bool more = cqe->flags & IORING_CQE_F_MORE;
	if (!more) {
		c->flags &= ~(CF_RECV_ARMED | CF_CANCELING);
		conn_kick(c);
	}
	int res = cqe->res;
	if (res > 0) {
		if (!has_buf)
			return;
		if ((c->flags & (CF_CLOSING | CF_ABORT)) || !c->proto->on_data) {
			buf_return(w, bid);
		} else if (!conn_wants_read(c) || c->held_n) {
			/* paused: keep the buffer (it counts against the ring) until resumed */
			if (held_push(c, bid, (uint32_t)res) < 0) {
				buf_return(w, bid);
				net_conn_abort(c, -ENOMEM);
			}
		} else {
			conn_deliver(c, w->bufs + (size_t)bid * w->e->cfg.buf_size, (size_t)res);
			buf_return(w, bid);
		}
		return;
	}
	if (has_buf)
		buf_return(w, bid);
	if (res == 0) {
		if (unlikely(c->fops) && (c->fstate == FS_START || c->fstate == FS_HANDSHAKE)) {
			char a[INET6_ADDRSTRLEN];
			if (c->flags & CF_PREOPEN)
				log_debug("net: %s closed the connection during the handshake",
					  peer_str(c, a, sizeof(a)));
			else
				log_info("net: %s closed the connection during the TLS handshake",
					 peer_str(c, a, sizeof(a)));
			c->flags |= CF_EOF;
			filter_fail(c, -ECONNRESET);
			return;
		}
		c->flags |= CF_EOF;
		net_conn_close(c);
		return;
	}
	switch (res) {
	case -ENOBUFS: /* the buffer ring ran dry: re-armed once buffers are back */
		log_once(LOG_WARN, "net: provided buffers exhausted (buf_count %u); "
				   "consider raising it",
			 w->e->cfg.buf_count);
		if (!(c->flags & CF_STARVED)) {
			if (w->starved_n == w->starved_cap) {
				unsigned cap = w->starved_cap ? w->starved_cap * 2 : 64;
				uint64_t *n = realloc(w->starved, cap * sizeof(*n));
				if (!n) {
					net_conn_abort(c, -ENOMEM);
					return;
				}
				w->starved = n;
				w->starved_cap = cap;
			}
			w->starved[w->starved_n++] = ud_pack(OP_RECV, c->idx, c->gen);
			c->flags |= CF_STARVED;
		}
		return;
	case -ECANCELED:
		return;
	case -EINVAL:
		if (w->multishot_recv) {
			log_once(LOG_WARN, "net: multishot recv unsupported by this kernel; "
					   "falling back to one recv per completion");
			w->multishot_recv = false;
			return;
		}
		/* fall through */
	default:
		net_conn_abort(c, res);
	}
}

static void on_send_cqe(struct net_worker *w, uint64_t ud, const struct io_uring_cqe *cqe)
{
	struct net_conn *c = conn_lookup(w, ud);
	if (!c)
		return;
	c->flags &= ~CF_SENDING;
	conn_kick(c);
	if (cqe->res < 0) {
		if (cqe->res == -EAGAIN || cqe->res == -EINTR)
			return;
		net_conn_abort(c, cqe->res);
		out_clear(c);
		return;
	}
	size_t n = (size_t)cqe->res;
	c->pending -= n;
	while (n && c->out.head) {
		struct seg *s = c->out.head;
		size_t k = n < s->len ? n : s->len;
		s->ptr += k;
		s->len -= (uint32_t)k;
		n -= k;
		if (s->len)
			break;
		/* an owned chunk may still take appended bytes: keep it if it is the tail */
		if (s == c->out.tail && s->cap && s->fill < s->cap)
			break;
		c->out.head = s->next;
		if (!c->out.head)
			c->out.tail = NULL;
		seg_free(w, s);
	}
	if ((c->flags & CF_PAUSED_BP) && c->pending <= w->e->cfg.out_low_water) {
		c->flags &= ~CF_PAUSED_BP;
		if (c->proto->on_writable && !(c->flags & (CF_CLOSING | CF_ABORT)))
			c->proto->on_writable(c);
	}
}

static void on_connect_cqe(struct net_worker *w, uint64_t ud, const struct io_uring_cqe *cqe)
{
	struct net_conn *c = conn_lookup(w, ud);
	if (!c)
		return;
	c->flags &= ~CF_CONNECTING;
	if (cqe->res < 0) {
		/* cancelled by the link timeout (or the shutdown): report it as a timeout */
		int err = cqe->res == -ECANCELED && !w->stopping ? -ETIMEDOUT : cqe->res;
		if (c->proto->on_open)
			c->proto->on_open(c, err);
		c->close_err = err;
		conn_finish(c);
		return;
	}
	int one = 1;
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	conn_kick(c);
	if (c->proto->on_open)
		c->proto->on_open(c, 0);
}

/* ---- outgoing connections ---- */

int net_connect(struct net_worker *w, const struct sockaddr *sa, socklen_t salen,
		const struct net_proto *proto, void *data)
{
	if (salen > sizeof(struct sockaddr_storage))
		return -EINVAL;
	if (w->stopping)
		return -ESHUTDOWN;
	int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_CLOEXEC, IPPROTO_TCP);
	if (fd < 0)
		return -errno;
	struct net_conn *c = conn_alloc(w);
	if (!c) {
		close(fd);
		return -EMFILE;
	}
	c->fd = fd;
	c->proto = proto;
	c->data = data;
	c->flags |= CF_CONNECTING;
	memcpy(&c->peer, sa, salen);
	struct io_uring_sqe *sqe = get_sqe(w);
	io_uring_prep_connect(sqe, fd, (struct sockaddr *)&c->peer, salen);
	io_uring_sqe_set_data64(sqe, ud_pack(OP_CONNECT, c->idx, c->gen));
	unsigned ms = w->e->cfg.connect_timeout_ms;
	if (ms) {
		/* a linked timeout cancels the connect: it completes with -ECANCELED */
		sqe->flags |= IOSQE_IO_LINK;
		c->cts.tv_sec = ms / 1000;
		c->cts.tv_nsec = (long long)(ms % 1000) * 1000000;
		struct io_uring_sqe *t = get_sqe(w);
		io_uring_prep_link_timeout(t, &c->cts, 0);
		io_uring_sqe_set_data64(t, ud_pack(OP_IGNORE, 0, 0));
	}
	return 0;
}

/* ---- file I/O ---- */

static uint64_t ud_io(struct net_io *io)
{
	return ((uint64_t)OP_FILE << 56) | (uint64_t)(uintptr_t)io;
}

int net_file_writev(struct net_worker *w, int fd, const struct iovec *iov, unsigned n, uint64_t off,
		    struct net_io *write_io, struct net_io *sync_io)
{
	if (!n || n > IOV_MAX)
		return -EINVAL;
	if ((uintptr_t)write_io >> 56 || (sync_io && (uintptr_t)sync_io >> 56))
		return -EINVAL; /* cannot be packed into user_data */
	struct io_uring_sqe *sqe = get_sqe(w);
	io_uring_prep_writev(sqe, fd, iov, n, off);
	io_uring_sqe_set_data64(sqe, ud_io(write_io));
	w->file_inflight++;
	if (sync_io) {
		sqe->flags |= IOSQE_IO_LINK; /* a short write breaks the link: the sync is cancelled */
		sqe = get_sqe(w);
		io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
		io_uring_sqe_set_data64(sqe, ud_io(sync_io));
		w->file_inflight++;
	}
	return 0;
}

int net_file_fdatasync(struct net_worker *w, int fd, struct net_io *io)
{
	if ((uintptr_t)io >> 56)
		return -EINVAL;
	struct io_uring_sqe *sqe = get_sqe(w);
	io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
	io_uring_sqe_set_data64(sqe, ud_io(io));
	w->file_inflight++;
	return 0;
}

/* ---- polls ---- */

static uint64_t ud_poll(struct net_io *io)
{
	return ((uint64_t)OP_POLL << 56) | (uint64_t)(uintptr_t)io;
}

int net_poll_add(struct net_worker *w, int fd, unsigned poll_events, struct net_io *io)
{
	if ((uintptr_t)io >> 56 || fd < 0)
		return -EINVAL;
	if (w->loop_done)
		return -ESHUTDOWN;
	struct io_uring_sqe *sqe = get_sqe(w);
	io_uring_prep_poll_add(sqe, fd, poll_events);
	io_uring_sqe_set_data64(sqe, ud_poll(io));
	return 0;
}

int net_poll_cancel(struct net_worker *w, struct net_io *io)
{
	if ((uintptr_t)io >> 56)
		return -EINVAL;
	if (w->loop_done)
		return -ESHUTDOWN; /* nothing completes any more: io is the caller's again */
	struct io_uring_sqe *sqe = get_sqe(w);
	io_uring_prep_poll_remove(sqe, ud_poll(io));
	io_uring_sqe_set_data64(sqe, ud_pack(OP_IGNORE, 0, 0));
	return 0;
}

/* ---- workers ---- */

unsigned net_worker_index(const struct net_worker *w)
{
	return w->index;
}
struct net_engine *net_worker_engine(const struct net_worker *w)
{
	return w->e;
}
void *net_worker_data(const struct net_worker *w)
{
	return w->data;
}
void net_worker_set_data(struct net_worker *w, void *data)
{
	w->data = data;
}
uint64_t net_worker_now_ms(const struct net_worker *w)
{
	return w->now_ms;
}
bool net_worker_stopping(const struct net_worker *w)
{
	return w->stopping;
}

static int ring_setup(struct net_worker *w)
{
	const struct net_config *cfg = &w->e->cfg;
	struct io_uring_params p;
	static const unsigned flag_sets[] = {
		IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
		IORING_SETUP_COOP_TASKRUN,
		0,
	};
	int r = -EINVAL;
	for (unsigned i = 0; i < ARRAY_SIZE(flag_sets); i++) {
		memset(&p, 0, sizeof(p));
		p.flags = flag_sets[i] | IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL;
		p.cq_entries = cfg->ring_entries * 4;
		r = io_uring_queue_init_params(cfg->ring_entries, &w->ring, &p);
		if (r == 0) {
			if (i > 0)
				log_once(LOG_WARN, "net: io_uring DEFER_TASKRUN/SINGLE_ISSUER "
						   "unsupported; using fallback ring flags");
			break;
		}
		if (r != -EINVAL)
			break;
	}
	if (r < 0) {
		log_err("net: io_uring_queue_init: %s", strerror(-r));
		return r;
	}
	w->ring_ok = true;
	if (!(p.features & IORING_FEAT_EXT_ARG))
		log_once(LOG_WARN, "net: kernel lacks IORING_FEAT_EXT_ARG; timers cost a syscall");

	/* provided-buffer ring (liburing 2.3 has no io_uring_setup_buf_ring) */
	unsigned n = cfg->buf_count;
	w->br_size = (size_t)n * sizeof(struct io_uring_buf);
	w->br = mmap(NULL, w->br_size, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
	if (w->br == MAP_FAILED) {
		w->br = NULL;
		return -errno;
	}
	struct io_uring_buf_reg reg = {.ring_addr = (uintptr_t)w->br, .ring_entries = n, .bgid = 0};
	r = io_uring_register_buf_ring(&w->ring, &reg, 0);
	if (r < 0) {
		log_err("net: provided-buffer rings unsupported by this kernel (%s); "
			"Posthaste needs Linux 5.19 or later",
			strerror(-r));
		return r;
	}
	/*
	 * The buffers are made resident now (MAP_POPULATE: the kernel fills the
	 * mapping in one call, without a fault per page), by the worker's own
	 * pinned thread: the pages are on its NUMA node, and the first pass of the
	 * receive path through the ring does not take a page fault per 4 KiB (on
	 * a fresh daemon under load that was ~15 % of its time on this VM, 23 %
	 * of its 100 KiB relay rate). The memory is the configured pool, which
	 * load makes resident anyway.
	 */
	w->bufs_size = (size_t)n * cfg->buf_size;
	w->bufs = mmap(NULL, w->bufs_size, PROT_READ | PROT_WRITE,
		       MAP_ANONYMOUS | MAP_PRIVATE | (cfg->lazy_buffers ? 0 : MAP_POPULATE), -1, 0);
	if (w->bufs == MAP_FAILED) {
		w->bufs = NULL;
		return -ENOMEM;
	}
	io_uring_buf_ring_init(w->br);
	w->buf_mask = io_uring_buf_ring_mask(n);
	for (unsigned i = 0; i < n; i++)
		io_uring_buf_ring_add(w->br, w->bufs + (size_t)i * cfg->buf_size, cfg->buf_size,
				      (unsigned short)i, w->buf_mask, (int)i);
	io_uring_buf_ring_advance(w->br, (int)n);

	w->conns = calloc(cfg->max_conns, sizeof(*w->conns));
	w->next_free = calloc(cfg->max_conns, sizeof(*w->next_free));
	if (!w->conns || !w->next_free)
		return -ENOMEM;
	for (uint32_t i = 0; i < cfg->max_conns; i++)
		w->next_free[i] = i + 1 < cfg->max_conns ? i + 1 : UINT32_MAX;
	w->free_head = 0;
	return 0;
}

static void worker_teardown(struct net_worker *w)
{
	if (w->ring_ok)
		io_uring_queue_exit(&w->ring);
	w->ring_ok = false;
	if (w->br)
		munmap(w->br, w->br_size);
	w->br = NULL;
	if (w->bufs)
		munmap(w->bufs, w->bufs_size);
	free(w->conns);
	free(w->next_free);
	free(w->heap);
	free(w->starved);
	w->starved = NULL;
	free(w->fbuf);
	w->fbuf = NULL;
	free(w->fstage);
	w->fstage = NULL;
	w->bufs = NULL;
	w->conns = NULL;
	w->next_free = NULL;
	w->heap = NULL;
	for (struct seg *s = w->chunk_pool, *n; s; s = n) {
		n = s->next;
		free(s);
	}
	for (struct seg *s = w->ref_pool, *n; s; s = n) {
		n = s->next;
		free(s);
	}
	w->chunk_pool = w->ref_pool = NULL;
}

static void grace_fire(struct net_timer *t, struct net_worker *w)
{
	(void)t;
	unsigned left = 0;
	for (uint32_t i = 0; i < w->e->cfg.max_conns; i++) {
		struct net_conn *c = &w->conns[i];
		if (c->flags & CF_OPEN) {
			net_conn_abort(c, -ESHUTDOWN);
			left++;
		}
	}
	if (left)
		log_warn("net: worker %u: %u connections did not finish within the shutdown "
			 "grace period; closed",
			 w->index, left);
}

static void worker_begin_stop(struct net_worker *w)
{
	if (w->stopping)
		return;
	w->stopping = true;
	for (unsigned li = 0; li < w->e->nlisteners; li++) {
		int fd = w->e->listeners[li].fds[w->index];
		if (fd >= 0) {
			/* wakes the pending accept; the ring's reference closes it later */
			shutdown(fd, SHUT_RDWR);
			close(fd);
			w->e->listeners[li].fds[w->index] = -1;
		}
	}
	for (uint32_t i = 0; i < w->e->cfg.max_conns; i++) {
		struct net_conn *c = &w->conns[i];
		if (!(c->flags & CF_OPEN) || (c->flags & (CF_CLOSING | CF_ABORT)))
			continue;
		if (c->flags & CF_PREOPEN) {
			net_conn_abort(c, -ESHUTDOWN);
			continue;
		}
		c->flags |= CF_SHUT_ASKED;
		if (c->proto->on_shutdown && !(c->flags & CF_CONNECTING))
			c->proto->on_shutdown(c);
		else
			net_conn_close(c);
	}
	w->grace_timer.fire = grace_fire;
	net_timer_start(w, &w->grace_timer, w->e->cfg.shutdown_grace_ms + 100);
}

static void pin_to_cpu(struct net_worker *w)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(w->cpu, &set);
	int r = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
	if (r)
		log_warn("net: worker %u: cannot pin to CPU %d: %s", w->index, w->cpu, strerror(r));
}

static void worker_loop(struct net_worker *w)
{
	struct io_uring_cqe *cqe;
	for (unsigned li = 0; li < w->e->nlisteners; li++)
		arm_accept(w, li);
	arm_wake(w);
	for (;;) {
		/* end of turn: services, buffers back to the kernel, one submission */
		if (w->e->hooks.turn_end)
			w->e->hooks.turn_end(w, w->e->hooks.arg);
		do {
			while (w->dirty) {
				struct net_conn *c = w->dirty;
				w->dirty = c->dirty_next;
				conn_service(c);
			}
			if (w->bufs_returned) {
				io_uring_buf_ring_advance(w->br, (int)w->bufs_returned);
				w->bufs_returned = 0;
				/* buffers are back: recvs that ran dry may go again */
				for (unsigned i = 0; i < w->starved_n; i++) {
					struct net_conn *c = conn_lookup(w, w->starved[i]);
					if (c) {
						c->flags &= ~CF_STARVED;
						conn_kick(c);
					}
				}
				w->starved_n = 0;
			}
		} while (w->dirty);
		if (w->stopping && w->nconns == 0 && w->file_inflight == 0)
			break;
		struct __kernel_timespec ts, *tsp = NULL;
		if (w->heap_n) {
			uint64_t now = clock_ms();
			uint64_t d = w->heap[0]->deadline_ms;
			uint64_t ms = d > now ? d - now : 0;
			ts.tv_sec = (long long)(ms / 1000);
			ts.tv_nsec = (long long)(ms % 1000) * 1000000;
			tsp = &ts;
		}
		int r = io_uring_submit_and_wait_timeout(&w->ring, &cqe, 1, tsp, NULL);
		if (r < 0 && r != -ETIME && r != -EINTR && r != -EAGAIN && r != -EBUSY)
			panic("net: worker %u: io_uring wait: %s", w->index, strerror(-r));
		w->now_ms = clock_ms();
		unsigned head, count = 0;
		io_uring_for_each_cqe(&w->ring, head, cqe)
		{
			count++;
			uint64_t ud = cqe->user_data;
			switch (ud_op(ud)) {
			case OP_ACCEPT:
				on_accept_cqe(w, ud, cqe);
				break;
			case OP_RECV:
				on_recv_cqe(w, ud, cqe);
				break;
			case OP_SEND:
				on_send_cqe(w, ud, cqe);
				break;
			case OP_CONNECT:
				on_connect_cqe(w, ud, cqe);
				break;
			case OP_FILE: {
				struct net_io *io = (struct net_io *)(uintptr_t)(ud & ((1ull << 56) - 1));
				w->file_inflight--;
				io->done(io, cqe->res);
				break;
			}
			case OP_POLL: {
				struct net_io *io = (struct net_io *)(uintptr_t)(ud & ((1ull << 56) - 1));
				io->done(io, cqe->res);
				break;
			}
			case OP_WAKE:
				if (atomic_load(&w->e->stop))
					worker_begin_stop(w);
				else
					arm_wake(w);
				break;
			default:
				break;
			}
		}
		io_uring_cq_advance(&w->ring, count);
		timers_run(w);
	}
}

static void *worker_main(void *arg)
{
	struct net_worker *w = arg;
	struct net_engine *e = w->e;
	if (e->cfg.pin)
		pin_to_cpu(w);
	w->now_ms = clock_ms();
	int r = ring_setup(w);
	if (r == 0 && e->hooks.init)
		r = e->hooks.init(w, e->hooks.arg);
	if (r < 0) {
		w->init_err = r;
		atomic_store(&e->err, r);
		net_engine_stop(e);
	} else {
		worker_loop(w);
		w->loop_done = true;
		if (e->hooks.fini)
			e->hooks.fini(w, e->hooks.arg);
	}
	worker_teardown(w);
	atomic_fetch_sub(&e->running, 1);
	return NULL;
}

/* ---- engine ---- */

struct net_engine *net_engine_new(const struct net_config *cfg, const struct net_worker_hooks *hooks)
{
	struct net_engine *e = calloc(1, sizeof(*e));
	if (!e)
		return NULL;
	e->cfg = *cfg;
	if (hooks)
		e->hooks = *hooks;
	struct net_config def;
	net_config_default(&def);
	if (!e->cfg.max_conns)
		e->cfg.max_conns = def.max_conns;
	if (!e->cfg.ring_entries)
		e->cfg.ring_entries = def.ring_entries;
	if (!e->cfg.buf_size)
		e->cfg.buf_size = def.buf_size;
	if (!e->cfg.buf_count)
		e->cfg.buf_count = def.buf_count;
	if (!e->cfg.out_high_water)
		e->cfg.out_high_water = def.out_high_water;
	if (!e->cfg.out_low_water || e->cfg.out_low_water > e->cfg.out_high_water)
		e->cfg.out_low_water = e->cfg.out_high_water / 4;
	if (!e->cfg.shutdown_grace_ms)
		e->cfg.shutdown_grace_ms = def.shutdown_grace_ms;
	if (!e->cfg.listen_backlog)
		e->cfg.listen_backlog = def.listen_backlog;
	if (!e->cfg.handshake_timeout_ms)
		e->cfg.handshake_timeout_ms = def.handshake_timeout_ms;
	if (e->cfg.buf_count & (e->cfg.buf_count - 1) || e->cfg.buf_count > 32768 ||
	    e->cfg.max_conns > 0xffffffu) {
		free(e);
		errno = EINVAL;
		return NULL;
	}

	cpu_set_t set;
	CPU_ZERO(&set);
	if (sched_getaffinity(0, sizeof(set), &set) < 0)
		CPU_SET(0, &set);
	unsigned ncpu = (unsigned)CPU_COUNT(&set);
	e->nworkers = cfg->workers ? cfg->workers : ncpu;
	if (e->nworkers > 256)
		e->nworkers = 256;
	e->workers = aligned_alloc(CACHELINE, sizeof(struct net_worker) * e->nworkers);
	if (!e->workers) {
		free(e);
		errno = ENOMEM;
		return NULL;
	}
	memset(e->workers, 0, sizeof(struct net_worker) * e->nworkers);
	int cpus[CPU_SETSIZE];
	unsigned k = 0;
	for (int i = 0; i < CPU_SETSIZE && k < CPU_SETSIZE; i++)
		if (CPU_ISSET(i, &set))
			cpus[k++] = i;
	for (unsigned i = 0; i < e->nworkers; i++) {
		struct net_worker *w = &e->workers[i];
		w->e = e;
		w->index = i;
		w->cpu = cpus[i % k];
		w->multishot_accept = !getenv("POSTHASTE_NET_NO_MULTISHOT");
		w->multishot_recv = !getenv("POSTHASTE_NET_NO_MULTISHOT");
		w->wake_fd = eventfd(0, EFD_CLOEXEC);
		if (w->wake_fd < 0) {
			int err = errno;
			for (unsigned j = 0; j < i; j++)
				close(e->workers[j].wake_fd);
			free(e->workers);
			free(e);
			errno = err;
			return NULL;
		}
	}
	return e;
}

void net_engine_free(struct net_engine **ep)
{
	struct net_engine *e = *ep;
	if (!e)
		return;
	for (unsigned i = 0; i < e->nworkers; i++)
		close(e->workers[i].wake_fd);
	for (unsigned li = 0; li < e->nlisteners; li++)
		for (unsigned i = 0; i < e->nworkers; i++)
			if (e->listeners[li].fds[i] >= 0)
				close(e->listeners[li].fds[i]);
	free(e->workers);
	free(e);
	*ep = NULL;
}

uint16_t net_engine_listener_port(const struct net_engine *e, unsigned i)
{
	return i < e->nlisteners ? e->listeners[i].port : 0;
}

int net_engine_listener_set_filter(struct net_engine *e, unsigned i,
				   int (*filter_start)(struct net_conn *c, void *arg), void *arg)
{
	if (i >= e->nlisteners || !filter_start || e->listeners[i].filter_start)
		return -EINVAL;
	e->listeners[i].filter_start = filter_start;
	e->listeners[i].filter_arg = arg;
	return 0;
}

unsigned net_engine_workers(const struct net_engine *e)
{
	return e->nworkers;
}

static int listen_socket(const struct sockaddr *sa, socklen_t len, int backlog)
{
	int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_CLOEXEC, IPPROTO_TCP);
	if (fd < 0)
		return -errno;
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0)
		goto fail;
	if (sa->sa_family == AF_INET6)
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (bind(fd, sa, len) < 0 || listen(fd, backlog) < 0)
		goto fail;
	return fd;
fail:;
	int err = -errno;
	close(fd);
	return err;
}

int net_engine_listen(struct net_engine *e, const char *host, uint16_t port,
		      const struct net_proto *proto, void *ctx)
{
	return net_engine_listen_filter(e, host, port, proto, ctx, NULL, NULL);
}

int net_engine_listen_filter(struct net_engine *e, const char *host, uint16_t port,
			     const struct net_proto *proto, void *ctx,
			     int (*filter_start)(struct net_conn *c, void *arg), void *arg)
{
	if (e->nlisteners == MAX_LISTENERS)
		return -ENOSPC;
	struct sockaddr_storage ss;
	memset(&ss, 0, sizeof(ss));
	socklen_t len;
	struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
	struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
	if (!host || !*host)
		host = "0.0.0.0";
	if (inet_pton(AF_INET, host, &s4->sin_addr) == 1) {
		s4->sin_family = AF_INET;
		s4->sin_port = htons(port);
		len = sizeof(*s4);
	} else if (inet_pton(AF_INET6, host, &s6->sin6_addr) == 1) {
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons(port);
		len = sizeof(*s6);
	} else {
		log_err("net: listen address '%s' is not an IPv4 or IPv6 literal", host);
		return -EINVAL;
	}
	struct listener *l = &e->listeners[e->nlisteners];
	memset(l, 0, sizeof(*l));
	for (unsigned i = 0; i < 256; i++)
		l->fds[i] = -1;
	snprintf(l->host, sizeof(l->host), "%s", host);
	l->port = port;
	l->proto = proto;
	l->ctx = ctx;
	l->filter_start = filter_start;
	l->filter_arg = arg;
	for (unsigned i = 0; i < e->nworkers; i++) {
		int fd = listen_socket((struct sockaddr *)&ss, len, e->cfg.listen_backlog);
		if (fd < 0) {
			log_err("net: cannot listen on %s:%u: %s", host, port, strerror(-fd));
			for (unsigned j = 0; j < i; j++)
				close(l->fds[j]);
			return fd;
		}
		l->fds[i] = fd;
		if (port == 0 && i == 0) {
			/* an ephemeral port: the other workers share the one the first got */
			struct sockaddr_storage got;
			socklen_t gl = sizeof(got);
			getsockname(fd, (struct sockaddr *)&got, &gl);
			port = ntohs(got.ss_family == AF_INET ? ((struct sockaddr_in *)&got)->sin_port
							      : ((struct sockaddr_in6 *)&got)->sin6_port);
			s4->sin_port = htons(port); /* same offset for sin6_port */
			l->port = port;
		}
	}
	e->nlisteners++;
	return 0;
}

void net_engine_stop(struct net_engine *e)
{
	atomic_store(&e->stop, true);
	uint64_t one = 1;
	for (unsigned i = 0; i < e->nworkers; i++) {
		ssize_t r = write(e->workers[i].wake_fd, &one, sizeof(one));
		(void)r;
	}
}

int net_engine_run(struct net_engine *e)
{
	sigset_t set, old;
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	if (e->cfg.on_hup)
		sigaddset(&set, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &set, &old);
	signal(SIGPIPE, SIG_IGN);

	/* Connections and buffers need descriptors: raise the soft limit to the hard one. */
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}

	atomic_store(&e->running, e->nworkers);
	unsigned started = 0;
	for (; started < e->nworkers; started++) {
		struct net_worker *w = &e->workers[started];
		int r = pthread_create(&w->thread, NULL, worker_main, w);
		if (r) {
			log_err("net: cannot start worker %u: %s", started, strerror(r));
			atomic_store(&e->err, -r);
			atomic_fetch_sub(&e->running, e->nworkers - started);
			net_engine_stop(e);
			break;
		}
	}
	struct timespec tick = {.tv_sec = 0, .tv_nsec = 50 * 1000 * 1000};
	bool asked = false;
	while (atomic_load(&e->running) > 0) {
		int sig = sigtimedwait(&set, NULL, &tick);
		if (sig == SIGTERM || sig == SIGINT) {
			if (!asked)
				log_info("net: signal %d: shutting down", sig);
			asked = true;
			net_engine_stop(e);
		} else if (sig == SIGHUP && e->cfg.on_hup && !asked) {
			e->cfg.on_hup(e->cfg.hup_arg);
		}
	}
	for (unsigned i = 0; i < started; i++)
		pthread_join(e->workers[i].thread, NULL);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return atomic_load(&e->err);
}
