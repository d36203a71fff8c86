/*
 * The relay: scheduling, resolution, connections and outcomes (relay.h).
 *
 * Objects per worker, all owned by the worker:
 *   rq      one per live spool entry: where the message waits (ready list,
 *           deferred heap, held, active)
 *   amsg    an active message: its record read into a refcounted buffer,
 *           the decoded envelope, each recipient's outcome this attempt
 *   job     the recipients of one message for one domain
 *   rdomain a domain's resolution (MX, route or smarthost) -> site
 *   site    one per host list: queue of jobs, connections, limits, back-off
 *   rconn   an outgoing connection running an smtp_client
 */
#include "mta/relay/relay.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/compiler.h"
#include "core/log.h"
#include "dns/resolver.h"
#include "mta/local/maildir.h"
#include "mta/local/users.h"
#include "mta/relay/dsn.h"
#include "mta/relay/header.h"
#include "mta/smtp/smtp_client.h"
#include "queue/envelope.h"
#include "tls/tls.h"

#define ACCT_BUF        (256u * 1024)
#define SITE_HOSTS_MAX  16
#define HOST_ADDRS_MAX  8
#define DOMAIN_TTL_MS   60000
#define BACKOFF_BASE_MS 1000 /* a site that failed to connect: 1 s, doubling, up to retry_max */
#define DIAG_MAX        512
#define JOB_RCPTS_MAX   100 /* smtp_client's max_rcpts: more is -E2BIG, never sent */
#define TLS_SESSION_MAX 4096 /* a serialized session (tls_conn_session: always enough) */

/* ---- small things ---- */

static uint64_t wall_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static uint64_t rnd_next(uint64_t *s)
{
	/* splitmix64: per-worker jitter and DSN boundaries, not security */
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

struct bucket {
	double tokens, burst, per_ms; /* per_ms: tokens added per millisecond; 0 = unlimited */
	uint64_t last;
};

static void bucket_init(struct bucket *b, const struct ph_rate *r)
{
	memset(b, 0, sizeof(*b));
	if (!r->count || !r->per_ms)
		return;
	b->per_ms = (double)r->count / (double)r->per_ms;
	/* pacing, not bursts: one token and 20 ms worth of slack, so that a take that
	   comes late (the wait rounded up, a busy loop) keeps what it earned meanwhile;
	   capped at 1 token, each late take lost it and 100/s ran at ~88/s */
	b->burst = 1.0 + b->per_ms * 20.0;
	b->tokens = 1.0;
}

/* Takes a token at monotonic time now; else 0 and *wait_ms until one is there. */
static bool bucket_take(struct bucket *b, uint64_t now, uint64_t *wait_ms)
{
	if (b->per_ms == 0)
		return true;
	if (now > b->last) {
		b->tokens = MIN(b->burst, b->tokens + (double)(now - b->last) * b->per_ms);
		b->last = now;
	}
	if (b->tokens >= 1.0) {
		b->tokens -= 1.0;
		return true;
	}
	*wait_ms = (uint64_t)((1.0 - b->tokens) / b->per_ms) + 1;
	return false;
}

/* ---- objects ---- */

/* The message's octets, shared with the connections' output by reference. */
struct rbuf {
	unsigned refs;
	uint8_t *data;         /* read back from the spool, or */
	struct spool_hot *hot; /* the buffers it was written from */
};

#define BODY_IOV_MAX 64

enum { RQ_NONE = 0, RQ_READY, RQ_DEFERRED, RQ_ACTIVE, RQ_HELD };

struct rq {
	struct spool_entry *e;
	struct rq *next;               /* ready list */
	struct rq *all_prev, *all_next; /* every rq of the worker (freed at the end) */
	size_t heap;     /* index in the deferred heap */
	uint8_t where;
};

enum { RS_PENDING = 0, RS_OK, RS_FAIL, RS_DEFER, RS_SETTLED };

struct arcpt {
	uint8_t st;
	bool fresh; /* settled in this attempt */
	char status[16];
	char remote[280];
	char *diag; /* malloc'd or NULL */
};

struct amsg {
	struct relay_worker *rw;
	struct rq *rq;
	struct rbuf *buf;
	struct spool_message m;
	struct iovec biov[BODY_IOV_MAX]; /* the body: one slice when read back, the chunks when hot */
	unsigned nbiov;
	struct arcpt *rc;
	unsigned outstanding; /* jobs in flight */
	char msgid[200];
	bool expired;
	/* this attempt reports the still-deferred recipients (the message's delay DSN) */
	bool warn;
	unsigned dsn_failed, dsn_delayed; /* recipients the report lists, for the accounting log */
};

struct rdomain;
struct site;

struct job {
	struct job *next;
	struct amsg *am;
	struct rdomain *dom;
	unsigned n;
	uint32_t idx[];
};

struct rhost {
	char name[256];
	uint16_t port;
	unsigned naddr;
	struct sockaddr_storage addr[HOST_ADDRS_MAX];
};

struct rconn;

struct site {
	struct site *hnext;
	struct relay_worker *rw;
	char key[PH_HOSTS_LEN + 8];
	struct rhost *hosts;
	unsigned nhosts;
	struct ph_limits lim;
	struct job *qhead, *qtail;
	unsigned qlen;
	unsigned nconns, connecting;
	struct rconn *idle;
	struct bucket msg_tb, conn_tb;
	unsigned fails;
	uint64_t down_until; /* monotonic */
	char last_err[DIAG_MAX];
	char last_status[16]; /* the status the back-off defers with; "" = 4.4.1 */
	struct net_timer timer;
	bool timer_armed;
	/* the newest TLS session of a connection to the site, for resumption */
	uint8_t *tls_sess;
	size_t tls_sess_len;
};

struct rdomain {
	struct rdomain *hnext;
	struct relay_worker *rw;
	char name[256];
	struct site *site;
	uint64_t expires; /* monotonic */
	bool resolving;
	struct job *phead, *ptail; /* waiting for the resolution */
	/* route / smarthost names being resolved */
	unsigned outstanding;
	struct rhost *rhosts;
	unsigned nrhosts;
	bool route;
	char hosts_text[PH_HOSTS_LEN];
};

struct rconn {
	struct relay_worker *rw;
	struct site *site;
	struct net_conn *c;
	struct smtp_client cl;
	bool cl_init;
	unsigned hi, ai; /* the host and address being tried */
	unsigned msgs;
	struct job *job;
	struct smtp_client_rcpt *rcpts;
	unsigned rcap;
	struct iovec body;
	struct smtp_client_msg msg;
	bool greeted, idle, quitting, gave_up;
	/* STARTTLS: asked for, handshake done, required but not offered, plaintext retry */
	bool tls_started, tls_up, tls_missing, no_tls;
	bool tls_verified;
	int tls_err;             /* the handshake's error (on_tls) */
	const char *fail_status; /* the status of the last failure before a session; NULL: 4.4.1 */
	char tls_desc[96];       /* "TLSv1.3 TLS_AES_256_GCM_SHA384", or "none" */
	struct rconn *next_idle;
	char remote[280];
	char err[DIAG_MAX];
};

struct relay_worker {
	struct relay *r;
	struct net_worker *w;
	struct spool_worker *sw;
	struct dns_resolver *dns;
	unsigned index;
	uint64_t rnd;
	struct rq *ready_head, *ready_tail;
	struct rq *all;
	struct rq **heap;
	size_t nheap, heapcap;
	struct net_timer heap_timer;
	bool heap_timer_armed;
	uint64_t heap_timer_at;
	unsigned nactive;
	struct rdomain **doms;
	size_t ndoms_cap; /* buckets, power of two */
	struct site **sites;
	size_t nsites_cap;
	char *acct;
	size_t acct_len;
	const struct rconn *acct_conn; /* the connection whose outcomes are being logged (tls) */
	struct relay_stats stats;
} cache_aligned;

struct relay {
	const struct ph_config *cfg;
	const struct users *users;
	struct spool *sp;
	char hostname[256];
	int acct_fd;
	unsigned nworkers;
	struct relay_worker *workers;
	/* outbound STARTTLS, shared by the workers (tls.h: contexts are process-wide),
	   indexed by enum ph_tls_verify; NULL: could not be created (no TLS) */
	struct tls_ctx *tls[2];
};

static void pump(struct relay_worker *rw);
static void site_pump(struct site *s);
static void attempt_done(struct amsg *am);
static void job_settle(struct job *j, uint8_t st, const char *status, const char *remote,
		       const char *diag);

/* ---- accounting log: one JSON object per line ---- */

static void acct_raw(struct relay_worker *rw, const char *s, size_t n)
{
	if (!n || !rw->acct || rw->acct_len + n > ACCT_BUF)
		return;
	memcpy(rw->acct + rw->acct_len, s, n);
	rw->acct_len += n;
}

static void acct_str(struct relay_worker *rw, const char *key, const char *v, size_t n)
{
	char tmp[64];
	int k = snprintf(tmp, sizeof(tmp), ",\"%s\":\"", key);
	acct_raw(rw, tmp, (size_t)k);
	n = MIN(n, (size_t)2048);
	size_t run = 0; /* octets that need no escape, copied in one piece */
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)v[i];
		if (ch != '"' && ch != '\\' && ch >= 0x20 && ch != 0x7f)
			continue;
		acct_raw(rw, v + run, i - run);
		run = i + 1;
		if (ch == '"' || ch == '\\') {
			char e[2] = {'\\', (char)ch};
			acct_raw(rw, e, 2);
		} else {
			char e[8];
			snprintf(e, sizeof(e), "\\u%04x", ch);
			acct_raw(rw, e, 6);
		}
	}
	acct_raw(rw, v + run, n - run);
	acct_raw(rw, "\"", 1);
}

static void acct_cstr(struct relay_worker *rw, const char *key, const char *v)
{
	if (v && *v)
		acct_str(rw, key, v, strlen(v));
}

static void acct_u64(struct relay_worker *rw, const char *key, uint64_t v)
{
	char tmp[96];
	int k = snprintf(tmp, sizeof(tmp), ",\"%s\":%" PRIu64, key, v);
	acct_raw(rw, tmp, (size_t)k);
}

static void acct_begin(struct relay_worker *rw, const char *event, uint64_t queue_id)
{
	if (rw->r->acct_fd < 0)
		return;
	if (rw->acct_len + 4096 > ACCT_BUF)
		relay_worker_turn_end(rw); /* flush early */
	uint64_t now = wall_ms();
	time_t secs = (time_t)(now / 1000);
	struct tm tm;
	gmtime_r(&secs, &tm);
	char tmp[160];
	int k = snprintf(tmp, sizeof(tmp),
			 "{\"time\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03uZ\",\"event\":\"%s\","
			 "\"queue_id\":\"%016" PRIX64 "\"",
			 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
			 tm.tm_sec, (unsigned)(now % 1000), event, queue_id);
	acct_raw(rw, tmp, (size_t)k);
}

static void acct_end(struct relay_worker *rw)
{
	if (rw->r->acct_fd >= 0)
		acct_raw(rw, "}\n", 2);
}

void relay_log_reception(struct relay_worker *rw, uint64_t queue_id, const char *message_id,
			 size_t message_id_len, const char *sender, size_t sender_len,
			 unsigned nrcpts, uint64_t size, const char *peer)
{
	if (rw->r->acct_fd < 0)
		return;
	acct_begin(rw, "reception", queue_id);
	if (message_id_len)
		acct_str(rw, "message_id", message_id, message_id_len);
	acct_str(rw, "sender", sender, sender_len);
	acct_u64(rw, "recipients", nrcpts);
	acct_u64(rw, "size", size);
	acct_cstr(rw, "peer", peer);
	acct_end(rw);
}

/* One recipient's outcome. */
static void acct_rcpt(struct relay_worker *rw, const char *event, const struct amsg *am,
		      unsigned i, const char *dest)
{
	if (rw->r->acct_fd < 0)
		return;
	const struct arcpt *rc = &am->rc[i];
	acct_begin(rw, event, am->rq->e->id);
	acct_cstr(rw, "message_id", am->msgid);
	acct_str(rw, "sender", am->m.sender, am->m.sender_len);
	acct_str(rw, "recipient", am->m.rcpts[i].addr, am->m.rcpts[i].addr_len);
	acct_cstr(rw, "destination", dest);
	acct_cstr(rw, "remote_host", rc->remote);
	acct_cstr(rw, "status", rc->status);
	acct_cstr(rw, "reply", rc->diag);
	acct_u64(rw, "attempt", (uint64_t)am->rq->e->attempts + 1);
	acct_u64(rw, "size", am->m.body_len);
	if (rw->acct_conn) {
		/* the connection it went over: "TLSv1.3 TLS_AES_256_GCM_SHA384" or "none" */
		acct_cstr(rw, "tls", rw->acct_conn->tls_desc[0] ? rw->acct_conn->tls_desc : "none");
		if (rw->acct_conn->tls_up) {
			const char *v = rw->acct_conn->tls_verified ? ",\"tls_verified\":true"
			                                            : ",\"tls_verified\":false";
			acct_raw(rw, v, strlen(v));
		}
	}
	acct_u64(rw, "received_ms", am->m.received_ms);
	uint64_t now = wall_ms();
	acct_u64(rw, "delay_ms", now > am->m.received_ms ? now - am->m.received_ms : 0);
	acct_end(rw);
}

/* ---- buffers shared with the connections' output ---- */

static void rbuf_unref(struct rbuf *b)
{
	if (b && --b->refs == 0) {
		free(b->data);
		spool_hot_free(b->hot);
		free(b);
	}
}

static void rbuf_release(void *arg)
{
	rbuf_unref(arg);
}

/* ---- the deferred heap (by until_ms) ---- */

static bool heap_less(struct rq *a, struct rq *b)
{
	return a->e->until_ms < b->e->until_ms;
}

static void heap_swap(struct relay_worker *rw, size_t i, size_t j)
{
	struct rq *t = rw->heap[i];
	rw->heap[i] = rw->heap[j];
	rw->heap[j] = t;
	rw->heap[i]->heap = i;
	rw->heap[j]->heap = j;
}

static void heap_up(struct relay_worker *rw, size_t i)
{
	while (i && heap_less(rw->heap[i], rw->heap[(i - 1) / 2])) {
		heap_swap(rw, i, (i - 1) / 2);
		i = (i - 1) / 2;
	}
}

static void heap_down(struct relay_worker *rw, size_t i)
{
	for (;;) {
		size_t l = 2 * i + 1, m = i;
		if (l < rw->nheap && heap_less(rw->heap[l], rw->heap[m]))
			m = l;
		if (l + 1 < rw->nheap && heap_less(rw->heap[l + 1], rw->heap[m]))
			m = l + 1;
		if (m == i)
			return;
		heap_swap(rw, i, m);
		i = m;
	}
}

static void heap_timer_fire(struct net_timer *t, struct net_worker *w);

static void heap_arm(struct relay_worker *rw)
{
	if (!rw->nheap)
		return;
	uint64_t now = wall_ms(), at = rw->heap[0]->e->until_ms;
	uint64_t ms = at > now ? at - now : 0;
	uint64_t mono_at = net_worker_now_ms(rw->w) + ms;
	if (rw->heap_timer_armed && rw->heap_timer_at <= mono_at)
		return;
	rw->heap_timer_armed = true;
	rw->heap_timer_at = mono_at;
	net_timer_start(rw->w, &rw->heap_timer, ms);
}

static int heap_push(struct relay_worker *rw, struct rq *q)
{
	if (rw->nheap == rw->heapcap) {
		size_t cap = rw->heapcap ? rw->heapcap * 2 : 1024;
		struct rq **v = realloc(rw->heap, cap * sizeof(*v));
		if (!v)
			return -ENOMEM;
		rw->heap = v;
		rw->heapcap = cap;
	}
	q->heap = rw->nheap;
	rw->heap[rw->nheap++] = q;
	heap_up(rw, q->heap);
	q->where = RQ_DEFERRED;
	heap_arm(rw);
	return 0;
}

static struct rq *heap_pop(struct relay_worker *rw)
{
	struct rq *q = rw->heap[0];
	rw->nheap--;
	if (rw->nheap) {
		rw->heap[0] = rw->heap[rw->nheap];
		rw->heap[0]->heap = 0;
		heap_down(rw, 0);
	}
	q->where = RQ_NONE;
	return q;
}

static void ready_push(struct relay_worker *rw, struct rq *q)
{
	q->next = NULL;
	q->where = RQ_READY;
	if (rw->ready_tail)
		rw->ready_tail->next = q;
	else
		rw->ready_head = q;
	rw->ready_tail = q;
}

static void heap_timer_fire(struct net_timer *t, struct net_worker *w)
{
	struct relay_worker *rw = container_of(t, struct relay_worker, heap_timer);
	rw->heap_timer_armed = false;
	uint64_t now = wall_ms();
	while (rw->nheap && rw->heap[0]->e->until_ms <= now)
		ready_push(rw, heap_pop(rw));
	heap_arm(rw);
	pump(rw);
}

static void rq_free(struct relay_worker *rw, struct rq *q)
{
	if (q->all_prev)
		q->all_prev->all_next = q->all_next;
	else
		rw->all = q->all_next;
	if (q->all_next)
		q->all_next->all_prev = q->all_prev;
	free(q);
}

/* ---- the spool's hook: a message joined the live queue ---- */

static void entry_added(void *arg, struct spool_entry *e)
{
	struct relay_worker *rw = arg;
	struct rq *q = calloc(1, sizeof(*q));
	if (!q) {
		log_once(LOG_ERR, "relay: out of memory: messages wait for a restart");
		return;
	}
	q->e = e;
	e->owner = q;
	q->all_next = rw->all;
	if (rw->all)
		rw->all->all_prev = q;
	rw->all = q;
	if (e->state == SPOOL_STATE_HELD) {
		q->where = RQ_HELD;
	} else if (e->state == SPOOL_STATE_DEFERRED && e->until_ms > wall_ms()) {
		if (heap_push(rw, q) < 0)
			ready_push(rw, q);
	} else {
		ready_push(rw, q);
	}
}

/* ---- domains and sites ---- */

static size_t str_hash(const char *s)
{
	size_t h = 1469598103934665603ull;
	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 1099511628211ull;
	return h;
}

static struct site *site_get(struct relay_worker *rw, const char *key, const struct ph_limits *lim)
{
	if (!rw->sites) {
		rw->nsites_cap = 256;
		rw->sites = calloc(rw->nsites_cap, sizeof(*rw->sites));
		if (!rw->sites)
			return NULL;
	}
	size_t b = str_hash(key) & (rw->nsites_cap - 1);
	for (struct site *s = rw->sites[b]; s; s = s->hnext)
		if (!strcmp(s->key, key))
			return s;
	struct site *s = calloc(1, sizeof(*s));
	if (!s)
		return NULL;
	s->rw = rw;
	snprintf(s->key, sizeof(s->key), "%s", key);
	s->lim = *lim;
	bucket_init(&s->msg_tb, &lim->msg_rate);
	bucket_init(&s->conn_tb, &lim->conn_rate);
	s->hnext = rw->sites[b];
	rw->sites[b] = s;
	return s;
}

static void site_set_hosts(struct site *s, const struct rhost *h, unsigned n)
{
	struct rhost *v = malloc((n ? n : 1) * sizeof(*v));
	if (!v)
		return;
	memcpy(v, h, n * sizeof(*v));
	free(s->hosts);
	s->hosts = v;
	s->nhosts = n;
}

static struct rdomain *domain_get(struct relay_worker *rw, const char *name)
{
	if (!rw->doms) {
		rw->ndoms_cap = 1024;
		rw->doms = calloc(rw->ndoms_cap, sizeof(*rw->doms));
		if (!rw->doms)
			return NULL;
	}
	size_t b = str_hash(name) & (rw->ndoms_cap - 1);
	for (struct rdomain *d = rw->doms[b]; d; d = d->hnext)
		if (!strcmp(d->name, name))
			return d;
	struct rdomain *d = calloc(1, sizeof(*d));
	if (!d)
		return NULL;
	d->rw = rw;
	snprintf(d->name, sizeof(d->name), "%s", name);
	d->hnext = rw->doms[b];
	rw->doms[b] = d;
	return d;
}

/* Every job waiting on the domain gets the same outcome. */
static void domain_fail_pending(struct rdomain *d, uint8_t st, const char *status, const char *diag)
{
	struct job *j = d->phead;
	d->phead = d->ptail = NULL;
	while (j) {
		struct job *n = j->next;
		job_settle(j, st, status, "", diag);
		j = n;
	}
}

static void site_enqueue(struct site *s, struct job *j)
{
	j->next = NULL;
	if (s->qtail)
		s->qtail->next = j;
	else
		s->qhead = j;
	s->qtail = j;
	s->qlen++;
}

static void domain_ready(struct rdomain *d, const char *key, const struct rhost *hosts, unsigned n)
{
	struct relay_worker *rw = d->rw;
	d->resolving = false;
	struct site *s = site_get(rw, key, ph_config_limits_for(rw->r->cfg, d->name));
	if (!s) {
		domain_fail_pending(d, RS_DEFER, "4.3.0", "out of memory");
		return;
	}
	site_set_hosts(s, hosts, n);
	d->site = s;
	d->expires = net_worker_now_ms(rw->w) + DOMAIN_TTL_MS;
	struct job *j = d->phead;
	d->phead = d->ptail = NULL;
	while (j) {
		struct job *nx = j->next;
		site_enqueue(s, j);
		j = nx;
	}
	site_pump(s);
}

static void sa_set_port(struct sockaddr_storage *ss, uint16_t port)
{
	if (ss->ss_family == AF_INET)
		((struct sockaddr_in *)ss)->sin_port = htons(port);
	else if (ss->ss_family == AF_INET6)
		((struct sockaddr_in6 *)ss)->sin6_port = htons(port);
}

static void mx_done(void *arg, const struct dns_mx_result *res)
{
	struct rdomain *d = arg;
	char diag[DIAG_MAX];
	switch (res->status) {
	case DNS_OK:
		break;
	case DNS_NULLMX:
		d->resolving = false;
		snprintf(diag, sizeof(diag), "domain %s accepts no mail (null MX)", d->name);
		domain_fail_pending(d, RS_FAIL, "5.1.10", diag);
		return;
	case DNS_NXDOMAIN:
	case DNS_NODATA:
		d->resolving = false;
		snprintf(diag, sizeof(diag), "domain %s: %s", d->name,
			 res->status == DNS_NXDOMAIN ? "no such domain" : "no MX or address records");
		domain_fail_pending(d, RS_FAIL, "5.1.2", diag);
		return;
	case DNS_CANCELLED:
		/* the resolver is being freed (the worker ends): the jobs are dropped
		   by relay_worker_fini, their messages stay queued as they are */
		return;
	default:
		d->resolving = false;
		snprintf(diag, sizeof(diag), "cannot resolve %.255s: %.200s", d->name,
			 res->error[0] ? res->error : "temporary DNS failure");
		domain_fail_pending(d, RS_DEFER, "4.4.3", diag);
		return;
	}
	struct rhost hosts[SITE_HOSTS_MAX];
	unsigned n = 0;
	char key[PH_HOSTS_LEN + 8] = "mx:";
	size_t kl = 3;
	for (unsigned i = 0; i < res->nhosts && n < SITE_HOSTS_MAX; i++) {
		const struct dns_mx_host *h = &res->hosts[i];
		struct rhost *rh = &hosts[n++];
		memset(rh, 0, sizeof(*rh));
		snprintf(rh->name, sizeof(rh->name), "%s", h->name);
		rh->port = 25;
		for (unsigned a = 0; a < h->naddr && rh->naddr < HOST_ADDRS_MAX; a++)
			rh->addr[rh->naddr++] = h->addr[a];
		int k = snprintf(key + kl, sizeof(key) - kl, "%s%s", kl > 3 ? "," : "", h->name);
		if (k > 0)
			kl = MIN(kl + (size_t)k, sizeof(key) - 1);
	}
	if (res->implicit)
		snprintf(key, sizeof(key), "a:%s", d->name);
	domain_ready(d, key, hosts, n);
}

static void host_done(void *arg, const struct dns_mx_result *res);

struct host_lookup {
	struct rdomain *d;
	unsigned index;
};

static void route_resolved(struct rdomain *d)
{
	char key[PH_HOSTS_LEN + 8];
	snprintf(key, sizeof(key), "route:%s", d->hosts_text);
	/* hosts without addresses stay in the list: connecting skips them */
	domain_ready(d, key, d->rhosts, d->nrhosts);
	free(d->rhosts);
	d->rhosts = NULL;
}

static void host_done(void *arg, const struct dns_mx_result *res)
{
	struct host_lookup *hl = arg;
	struct rdomain *d = hl->d;
	struct rhost *rh = &d->rhosts[hl->index];
	free(hl);
	if (res->status == DNS_CANCELLED) {
		/* the worker ends: its jobs are dropped by relay_worker_fini */
		if (--d->outstanding == 0) {
			free(d->rhosts);
			d->rhosts = NULL;
		}
		return;
	}
	if (res->status == DNS_OK && res->nhosts)
		for (unsigned a = 0; a < res->hosts[0].naddr && rh->naddr < HOST_ADDRS_MAX; a++)
			rh->addr[rh->naddr++] = res->hosts[0].addr[a];
	if (--d->outstanding == 0)
		route_resolved(d);
}

/* Starts resolving d: a route or the smarthost, else its MX set. */
static void domain_resolve(struct rdomain *d)
{
	struct relay_worker *rw = d->rw;
	const struct ph_config *cfg = rw->r->cfg;
	const char *hosts = ph_config_route_for(cfg, d->name);
	if (!hosts && cfg->smarthost[0])
		hosts = cfg->smarthost;
	d->resolving = true;
	if (!hosts) {
		if (dns_resolve_mx(rw->dns, d->name, mx_done, d) < 0) {
			d->resolving = false;
			domain_fail_pending(d, RS_DEFER, "4.3.0", "cannot start a DNS query");
		}
		return;
	}
	struct ph_hostport hp[SITE_HOSTS_MAX];
	char err[256];
	int n = ph_hosts_parse(hosts, hp, SITE_HOSTS_MAX, err, sizeof(err));
	if (n <= 0) {
		d->resolving = false;
		domain_fail_pending(d, RS_DEFER, "4.3.5", "bad route in the configuration");
		return;
	}
	d->rhosts = calloc((size_t)n, sizeof(*d->rhosts));
	if (!d->rhosts) {
		d->resolving = false;
		domain_fail_pending(d, RS_DEFER, "4.3.0", "out of memory");
		return;
	}
	snprintf(d->hosts_text, sizeof(d->hosts_text), "%s", hosts);
	d->nrhosts = (unsigned)n;
	d->outstanding = 1; /* held while the lookups start */
	for (int i = 0; i < n; i++) {
		struct rhost *rh = &d->rhosts[i];
		snprintf(rh->name, sizeof(rh->name), "%.255s", hp[i].host);
		rh->port = hp[i].port ? hp[i].port : 25;
		struct sockaddr_in *s4 = (struct sockaddr_in *)&rh->addr[0];
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&rh->addr[0];
		if (inet_pton(AF_INET, hp[i].host, &s4->sin_addr) == 1) {
			s4->sin_family = AF_INET;
			rh->naddr = 1;
		} else if (inet_pton(AF_INET6, hp[i].host, &s6->sin6_addr) == 1) {
			s6->sin6_family = AF_INET6;
			rh->naddr = 1;
		} else {
			struct host_lookup *hl = malloc(sizeof(*hl));
			if (hl) {
				*hl = (struct host_lookup){d, (unsigned)i};
				d->outstanding++;
				if (dns_resolve_host(rw->dns, hp[i].host, host_done, hl) < 0) {
					d->outstanding--;
					free(hl);
				}
			}
		}
	}
	if (--d->outstanding == 0)
		route_resolved(d);
}

/* A job for a remote domain: to its site, or waiting for the resolution. */
static void domain_submit(struct relay_worker *rw, struct job *j)
{
	struct rdomain *d = j->dom;
	if (d->site && !d->resolving && net_worker_now_ms(rw->w) < d->expires) {
		site_enqueue(d->site, j);
		site_pump(d->site);
		return;
	}
	j->next = NULL;
	if (d->ptail)
		d->ptail->next = j;
	else
		d->phead = j;
	d->ptail = j;
	if (!d->resolving)
		domain_resolve(d);
}

/* ---- outcomes ---- */

static void rcpt_set(struct amsg *am, unsigned i, uint8_t st, const char *status,
		     const char *remote, const char *diag)
{
	struct arcpt *rc = &am->rc[i];
	rc->st = st;
	rc->fresh = true;
	snprintf(rc->status, sizeof(rc->status), "%s", status ? status : "");
	snprintf(rc->remote, sizeof(rc->remote), "%s", remote ? remote : "");
	free(rc->diag);
	rc->diag = diag ? strndup(diag, strnlen(diag, DIAG_MAX)) : NULL;
	struct relay_worker *rw = am->rw;
	const char *dom = memrchr(am->m.rcpts[i].addr, '@', am->m.rcpts[i].addr_len);
	char dest[256] = "";
	if (dom)
		snprintf(dest, sizeof(dest), "%.*s",
			 (int)(am->m.rcpts[i].addr + am->m.rcpts[i].addr_len - dom - 1), dom + 1);
	if (st == RS_OK) {
		rw->stats.delivered++;
		acct_rcpt(rw, "delivery", am, i, dest);
	} else if (st == RS_FAIL) {
		rw->stats.bounced++;
		acct_rcpt(rw, "bounce", am, i, dest);
	} else {
		rw->stats.deferred++;
		acct_rcpt(rw, "transient_failure", am, i, dest);
	}
}

static void job_settle(struct job *j, uint8_t st, const char *status, const char *remote,
		       const char *diag)
{
	struct amsg *am = j->am;
	for (unsigned k = 0; k < j->n; k++)
		rcpt_set(am, j->idx[k], st, status, remote, diag);
	free(j);
	if (--am->outstanding == 0)
		attempt_done(am);
}

/* ---- connections ---- */

static void conn_try_next(struct rconn *rc);
static const struct net_proto relay_proto;

static void conn_set_remote(struct rconn *rc)
{
	const struct rhost *h = &rc->site->hosts[rc->hi];
	char ip[INET6_ADDRSTRLEN] = "?";
	const struct sockaddr_storage *ss = &h->addr[rc->ai];
	if (ss->ss_family == AF_INET)
		inet_ntop(AF_INET, &((const struct sockaddr_in *)ss)->sin_addr, ip, sizeof(ip));
	else
		inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)ss)->sin6_addr, ip, sizeof(ip));
	if (!strcmp(h->name, ip))
		snprintf(rc->remote, sizeof(rc->remote), "[%s]:%u", ip, h->port);
	else
		snprintf(rc->remote, sizeof(rc->remote), "%s[%s]:%u", h->name, ip, h->port);
}

static void conn_free(struct rconn *rc)
{
	if (rc->cl_init)
		smtp_client_deinit(&rc->cl);
	free(rc->rcpts);
	free(rc);
}

/* Takes rc out of its site's idle list. */
static void idle_remove(struct rconn *rc)
{
	struct rconn **pp = &rc->site->idle;
	while (*pp && *pp != rc)
		pp = &(*pp)->next_idle;
	if (*pp)
		*pp = rc->next_idle;
	rc->idle = false;
}

static void site_timer_fire(struct net_timer *t, struct net_worker *w)
{
	struct site *s = container_of(t, struct site, timer);
	s->timer_armed = false;
	site_pump(s);
}

static void site_wake_in(struct site *s, uint64_t ms)
{
	if (s->timer_armed)
		return;
	s->timer.fire = site_timer_fire;
	s->timer_armed = true;
	net_timer_start(s->rw->w, &s->timer, ms);
}

/* Gives rc the next job, or makes it idle. 1 when the client refused the job itself: again. */
static int conn_next_once(struct rconn *rc)
{
	struct site *s = rc->site;
	struct relay_worker *rw = rc->rw;
	if (rc->msgs >= s->lim.msgs_per_conn || net_worker_stopping(rw->w) || !s->qhead) {
		if (rc->msgs >= s->lim.msgs_per_conn || net_worker_stopping(rw->w)) {
			rc->quitting = true;
			smtp_client_quit(&rc->cl);
			net_conn_set_timeout(rc->c, 10000);
			return 0;
		}
		rc->idle = true;
		rc->next_idle = s->idle;
		s->idle = rc;
		net_conn_set_timeout(rc->c, s->lim.idle_timeout_ms);
		return 0;
	}
	uint64_t wait = 0;
	if (!bucket_take(&s->msg_tb, net_worker_now_ms(rw->w), &wait)) {
		rc->idle = true;
		rc->next_idle = s->idle;
		s->idle = rc;
		net_conn_set_timeout(rc->c, s->lim.idle_timeout_ms + wait);
		site_wake_in(s, wait);
		return 0;
	}
	struct job *j = s->qhead;
	s->qhead = j->next;
	if (!s->qhead)
		s->qtail = NULL;
	s->qlen--;
	rc->job = j;
	struct amsg *am = j->am;
	if (rc->rcap < j->n) {
		struct smtp_client_rcpt *v = realloc(rc->rcpts, j->n * sizeof(*v));
		if (!v) {
			rc->job = NULL;
			job_settle(j, RS_DEFER, "4.3.0", rc->remote, "out of memory");
			return 0;
		}
		rc->rcpts = v;
		rc->rcap = j->n;
	}
	for (unsigned k = 0; k < j->n; k++) {
		const struct spool_rcpt *r = &am->m.rcpts[j->idx[k]];
		rc->rcpts[k] = (struct smtp_client_rcpt){r->addr, r->addr_len, r->notify, r->orcpt,
							 r->orcpt_len};
	}
	/* the client keeps a pointer to it until on_msg_done */
	rc->msg = (struct smtp_client_msg){
	    .sender = am->m.sender,
	    .sender_len = am->m.sender_len,
	    .rcpts = rc->rcpts,
	    .nrcpts = j->n,
	    .envid = am->m.envid,
	    .envid_len = am->m.envid_len,
	    .ret = (am->m.flags & SPOOL_ENV_RET_FULL)   ? 1
		   : (am->m.flags & SPOOL_ENV_RET_HDRS) ? 2
							: 0,
	    .smtputf8 = (am->m.flags & SPOOL_ENV_SMTPUTF8) != 0,
	    .eightbit = (am->m.flags & SPOOL_ENV_8BITMIME) != 0,
	    .body = am->biov,
	    .nbody = am->nbiov,
	    .size = am->m.body_len,
	};
	int sr = smtp_client_send_msg(&rc->cl, &rc->msg);
	if (sr == -EBUSY) {
		rc->job = NULL;
		site_enqueue(s, j); /* not taken: another connection will */
		return 0;
	}
	if (sr < 0) {
		/* the client cannot send it at all (never re-queued: it would loop) */
		rc->job = NULL;
		char diag[DIAG_MAX];
		snprintf(diag, sizeof(diag), "cannot send to %s: %s", rc->remote, strerror(-sr));
		job_settle(j, sr == -ENOMEM ? RS_DEFER : RS_FAIL, sr == -ENOMEM ? "4.3.0" : "5.5.2",
			   rc->remote, diag);
		return 1;
	}
	if (sr == 1)
		return 1; /* refused locally (SMTPUTF8, SIZE): settled already; the next one */
	uint64_t t = smtp_client_timeout_ms(&rc->cl);
	net_conn_set_timeout(rc->c, t ? t : 300000);
	return 0;
}

static void conn_next(struct rconn *rc)
{
	while (conn_next_once(rc) == 1)
		;
}

/* Opens connections while there is queued work, within the limits. */
static void site_pump(struct site *s)
{
	struct relay_worker *rw = s->rw;
	uint64_t now = net_worker_now_ms(rw->w);
	if (s->down_until > now) {
		/* backed off as a whole: the work comes back when the back-off ends */
		char diag[DIAG_MAX + 64];
		snprintf(diag, sizeof(diag), "%s", s->last_err[0] ? s->last_err : "host unreachable");
		struct job *j = s->qhead;
		s->qhead = s->qtail = NULL;
		s->qlen = 0;
		while (j) {
			struct job *n = j->next;
			job_settle(j, RS_DEFER, s->last_status[0] ? s->last_status : "4.4.1", "", diag);
			j = n;
		}
		return;
	}
	while (s->qhead && s->idle) {
		struct rconn *rc = s->idle;
		idle_remove(rc);
		conn_next(rc);
		if (rc->idle)
			return; /* rate-limited */
	}
	while (s->qlen > s->connecting && s->nconns < s->lim.concurrency &&
	       !net_worker_stopping(rw->w)) {
		uint64_t wait = 0;
		if (!bucket_take(&s->conn_tb, now, &wait)) {
			site_wake_in(s, wait);
			return;
		}
		struct rconn *rc = calloc(1, sizeof(*rc));
		if (!rc)
			return;
		rc->rw = rw;
		rc->site = s;
		s->nconns++;
		s->connecting++;
		rw->stats.connections++;
		rc->hi = 0;
		rc->ai = 0;
		conn_try_next(rc);
	}
}

/* The site's every host failed: back off the whole destination. */
static void site_failed(struct site *s, const char *status, const char *err)
{
	struct relay_worker *rw = s->rw;
	s->fails++;
	uint64_t ms = BACKOFF_BASE_MS;
	for (unsigned i = 1; i < s->fails && ms < rw->r->cfg->retry_max_ms; i++)
		ms *= 2;
	ms = MIN(ms, rw->r->cfg->retry_max_ms);
	ms = MIN(ms, rw->r->cfg->retry_min_ms);
	s->down_until = net_worker_now_ms(rw->w) + ms;
	snprintf(s->last_err, sizeof(s->last_err), "%s", err);
	snprintf(s->last_status, sizeof(s->last_status), "%s", status ? status : "");
	log_info("relay: %s: every host failed (%s); backing off %" PRIu64 " ms", s->key, err,
		 ms);
	site_pump(s); /* defers the queued work */
}

/* Connects rc to the next address of the site's hosts (from rc->hi/ai on). */
static void conn_try_next(struct rconn *rc)
{
	struct site *s = rc->site;
	while (rc->hi < s->nhosts) {
		struct rhost *h = &s->hosts[rc->hi];
		if (rc->ai >= h->naddr) {
			rc->hi++;
			rc->ai = 0;
			continue;
		}
		struct sockaddr_storage ss = h->addr[rc->ai];
		sa_set_port(&ss, h->port);
		conn_set_remote(rc);
		socklen_t len = ss.ss_family == AF_INET ? sizeof(struct sockaddr_in)
							: sizeof(struct sockaddr_in6);
		int r = net_connect(rc->rw->w, (struct sockaddr *)&ss, len, &relay_proto, rc);
		if (r == 0)
			return;
		snprintf(rc->err, sizeof(rc->err), "connect to %s: %s", rc->remote, strerror(-r));
		rc->fail_status = NULL;
		rc->ai++;
	}
	/* nothing left to try */
	s->connecting--;
	s->nconns--;
	char err[DIAG_MAX];
	snprintf(err, sizeof(err), "%s", rc->err[0] ? rc->err : "no address to connect to");
	const char *status = rc->fail_status;
	conn_free(rc);
	site_failed(s, status, err);
}

/* smtp_client callbacks */

static void cl_send(void *arg, const void *data, size_t len, bool body_ref)
{
	struct rconn *rc = arg;
	if (!rc->c)
		return;
	if (body_ref && rc->job) {
		struct rbuf *b = rc->job->am->buf;
		b->refs++;
		if (net_send_ref_release(rc->c, data, len, rbuf_release, b) < 0)
			b->refs--;
		return;
	}
	net_send(rc->c, data, len);
}

/*
 * The TLS policy of rc's destination (*tls: enum ph_tls, *verify: enum
 * ph_tls_verify): today the configuration's, delivery_tls / delivery_tls_verify
 * or destination.DOMAIN = tls=... verify=... of the domain that created the site.
 *
 * Seam for DANE and MTA-STS: this is where they would raise the policy per MX
 * host. DANE (RFC 7672): usable TLSA records of the host (looked up, DNSSEC-
 * validated, with the MX set in mx_done and kept in struct rhost) make it
 * require, with the certificate matched against the TLSA records instead of
 * verify=name (a new TLS_VERIFY_DANE in tls/). MTA-STS (RFC 8461): a cached
 * "enforce" policy of the recipient domain whose mx patterns match the host
 * makes it require + verify=name (and a host outside the patterns is skipped).
 */
static void conn_tls_policy(const struct rconn *rc, unsigned *tls, unsigned *verify)
{
	*tls = rc->site->lim.tls;
	*verify = rc->site->lim.tls_verify;
}

static bool is_ip_literal(const char *name)
{
	unsigned char a[16];
	return inet_pton(AF_INET, name, a) == 1 || inet_pton(AF_INET6, name, a) == 1;
}

static bool cl_want_starttls(void *arg)
{
	struct rconn *rc = arg;
	unsigned tls, verify;
	conn_tls_policy(rc, &tls, &verify);
	if (tls == PH_TLS_NONE || rc->no_tls)
		return false;
	return rc->rw->r->tls[verify == PH_TLS_VERIFY_NAME] != NULL;
}

static void cl_start_tls(void *arg)
{
	struct rconn *rc = arg;
	struct site *s = rc->site;
	unsigned tls, verify;
	conn_tls_policy(rc, &tls, &verify);
	const char *host = s->hosts[rc->hi].name;
	/* SNI (and the name verified) = the MX host name; none for an IP literal */
	const char *sni = host[0] && !is_ip_literal(host) ? host : NULL;
	rc->tls_started = true;
	int r = tls_conn_start(rc->c, rc->rw->r->tls[verify == PH_TLS_VERIFY_NAME], sni,
			       s->tls_sess, s->tls_sess_len);
	if (r < 0) {
		rc->tls_err = r;
		snprintf(rc->err, sizeof(rc->err), "%s: cannot start TLS: %s", rc->remote,
			 strerror(-r));
		net_conn_abort(rc->c, r); /* on_close: a failed handshake */
	}
}

static void cl_ready(void *arg)
{
	struct rconn *rc = arg;
	if (!rc->greeted && !smtp_client_tls_active(&rc->cl)) {
		unsigned tls, verify;
		conn_tls_policy(rc, &tls, &verify);
		if (tls == PH_TLS_REQUIRE) {
			/* no session without TLS: QUIT; on_close defers the work with 4.7.5 */
			rc->tls_missing = true;
			snprintf(rc->err, sizeof(rc->err), "%s: TLS required but not %s", rc->remote,
				 !rc->rw->r->tls[verify == PH_TLS_VERIFY_NAME]
				     ? "available (no TLS client context)"
				     : "offered (no STARTTLS, or it was refused)");
			rc->quitting = true;
			smtp_client_quit(&rc->cl);
			net_conn_close(rc->c);
			return;
		}
	}
	if (!rc->greeted) {
		rc->greeted = true;
		rc->site->connecting--;
		rc->site->fails = 0;
		rc->site->down_until = 0;
	}
	conn_next(rc);
}

static void enhanced(const struct smtp_client_reply *r, char *buf, size_t len)
{
	if (r->esc.klass)
		snprintf(buf, len, "%u.%u.%u", r->esc.klass, r->esc.subject, r->esc.detail);
	else if (r->code >= 200)
		snprintf(buf, len, "%u.0.0", r->code / 100);
	else
		snprintf(buf, len, "4.4.2");
}

static void cl_msg_done(void *arg, const struct smtp_client_result *res)
{
	struct rconn *rc = arg;
	struct job *j = rc->job;
	rc->job = NULL;
	rc->msgs++;
	if (!j)
		return;
	struct amsg *am = j->am;
	rc->rw->acct_conn = rc;
	for (unsigned k = 0; k < j->n && k < res->nrcpts; k++) {
		const struct smtp_client_reply *r = &res->rcpt[k];
		char status[16], diag[DIAG_MAX];
		enhanced(r, status, sizeof(status));
		if (r->code)
			snprintf(diag, sizeof(diag), "%u %s%s%.*s", r->code, r->esc.klass ? status : "",
				 r->esc.klass ? " " : "", (int)r->text_len, r->text);
		else
			snprintf(diag, sizeof(diag), "%s", rc->err[0] ? rc->err : "lost connection");
		uint8_t st = r->code >= 200 && r->code < 300 ? RS_OK
			     : r->code >= 500              ? RS_FAIL
							   : RS_DEFER;
		rcpt_set(am, j->idx[k], st, status, rc->remote, diag);
	}
	rc->rw->acct_conn = NULL;
	free(j);
	if (--am->outstanding == 0)
		attempt_done(am);
}

static void cl_fail(void *arg, const struct smtp_client_failure *f)
{
	struct rconn *rc = arg;
	if (f->reply.code)
		snprintf(rc->err, sizeof(rc->err), "%s said: %u %s", rc->remote, f->reply.code,
			 f->reply.text);
	else
		snprintf(rc->err, sizeof(rc->err), "%s: %s", rc->remote, f->reason);
	/* bytes right behind the STARTTLS 220 (refused: they could be injected) end the
	   attempt like a failed handshake: tls=may tries the host again in plaintext */
	if (f->kind == SMTP_CLIENT_FAIL_PROTOCOL && f->awaiting == SMTP_CLIENT_CMD_STARTTLS) {
		rc->tls_started = true;
		snprintf(rc->err, sizeof(rc->err), "%s: TLS handshake failed: %s", rc->remote,
			 f->reason);
	}
	if (rc->c)
		net_conn_abort(rc->c, -ECONNRESET);
}

static const struct smtp_client_ops cl_ops = {
    .send = cl_send,
    .on_ready = cl_ready,
    .on_msg_done = cl_msg_done,
    .on_fail = cl_fail,
    .want_starttls = cl_want_starttls,
    .start_tls = cl_start_tls,
};

/* net callbacks */

static void rc_open(struct net_conn *c, int err)
{
	struct rconn *rc = net_conn_data(c);
	rc->c = c;
	if (err < 0) {
		snprintf(rc->err, sizeof(rc->err), "connect to %s: %s", rc->remote, strerror(-err));
		return; /* on_close follows */
	}
	if (!rc->cl_init) {
		if (smtp_client_init(&rc->cl, &cl_ops, rc, rc->rw->r->hostname, NULL) < 0) {
			net_conn_abort(c, -ENOMEM);
			return;
		}
		rc->cl_init = true;
	}
	smtp_client_on_connect(&rc->cl);
	net_conn_set_timeout(c, smtp_client_timeout_ms(&rc->cl));
}

static void rc_data(struct net_conn *c, const struct iovec *iov, unsigned n)
{
	struct rconn *rc = net_conn_data(c);
	for (unsigned i = 0; i < n && rc->c; i++)
		smtp_client_feed(&rc->cl, iov[i].iov_base, iov[i].iov_len);
	if (rc->c && !rc->idle) {
		uint64_t t = smtp_client_timeout_ms(&rc->cl);
		if (t)
			net_conn_set_timeout(c, t);
	}
}

static void rc_tls(struct net_conn *c, int err)
{
	struct rconn *rc = net_conn_data(c);
	if (err < 0) {
		/* on_close(c, err) follows */
		rc->tls_err = err;
		snprintf(rc->err, sizeof(rc->err), "%s: TLS handshake failed: %s", rc->remote,
			 err == -EKEYREJECTED ? "certificate verification failed"
			 : err == -EPROTONOSUPPORT ? "no common TLS version"
						   : strerror(-err));
		return;
	}
	struct tls_info ti;
	rc->tls_up = true;
	if (tls_conn_info(c, &ti) == 0) {
		snprintf(rc->tls_desc, sizeof(rc->tls_desc), "%s %s", ti.version ? ti.version : "?",
			 ti.cipher ? ti.cipher : "?");
		rc->tls_verified = ti.verified;
		log_debug("relay: %s: TLS %s%s%s", rc->remote, rc->tls_desc,
			  ti.resumed ? " (resumed)" : "", ti.verified ? " (verified)" : "");
	}
	smtp_client_tls_done(&rc->cl);
	if (rc->c) {
		uint64_t t = smtp_client_timeout_ms(&rc->cl);
		if (t)
			net_conn_set_timeout(c, t);
	}
}

static void rc_timeout(struct net_conn *c)
{
	struct rconn *rc = net_conn_data(c);
	if (rc->idle || rc->quitting) {
		if (rc->idle) {
			idle_remove(rc);
			rc->quitting = true;
			smtp_client_quit(&rc->cl);
		}
		net_conn_close(c);
		return;
	}
	snprintf(rc->err, sizeof(rc->err), "%s: timeout", rc->remote);
	smtp_client_timeout(&rc->cl); /* on_fail aborts */
}

static void rc_shutdown(struct net_conn *c)
{
	struct rconn *rc = net_conn_data(c);
	if (rc->idle) {
		idle_remove(rc);
		rc->quitting = true;
		smtp_client_quit(&rc->cl);
		net_conn_close(c);
	}
	/* a message in flight finishes (or the grace period ends it) */
}

static void rc_close(struct net_conn *c, int err)
{
	struct rconn *rc = net_conn_data(c);
	struct site *s = rc->site;
	if (rc->idle)
		idle_remove(rc);
	if (rc->tls_up) {
		/* TLS 1.3 tickets come after the handshake: the newest one, for the next connection */
		uint8_t sess[TLS_SESSION_MAX];
		int n = tls_conn_session(c, sess, sizeof(sess));
		if (n > 0) {
			uint8_t *v = realloc(s->tls_sess, (size_t)n);
			if (v) {
				memcpy(v, sess, (size_t)n);
				s->tls_sess = v;
				s->tls_sess_len = (size_t)n;
			}
		}
	}
	rc->c = NULL;
	if (rc->cl_init && rc->job) {
		/* tells on_msg_done with the unanswered recipients unknown */
		if (!rc->err[0])
			snprintf(rc->err, sizeof(rc->err), "%s: connection lost%s%s", rc->remote,
				 err ? ": " : "", err ? strerror(-err) : "");
		smtp_client_on_close(&rc->cl);
	}
	if (rc->job) {
		struct job *j = rc->job;
		rc->job = NULL;
		job_settle(j, RS_DEFER, "4.4.2", rc->remote, rc->err);
	}
	if (!rc->greeted && !net_worker_stopping(rc->rw->w)) {
		/* never got to a session: the next address, the next MX */
		if (!rc->err[0])
			snprintf(rc->err, sizeof(rc->err), "connect to %s: %s", rc->remote,
				 err ? strerror(-err) : "connection closed");
		if (rc->cl_init) {
			smtp_client_deinit(&rc->cl);
			rc->cl_init = false;
		}
		bool tls_failed = rc->tls_started && !rc->tls_up;
		unsigned tls, verify;
		conn_tls_policy(rc, &tls, &verify);
		rc->fail_status = tls_failed || rc->tls_missing ? "4.7.5" : NULL;
		bool retry_plain = tls_failed && tls == PH_TLS_MAY && !rc->no_tls &&
				   !(verify == PH_TLS_VERIFY_NAME && rc->tls_err == -EKEYREJECTED);
		rc->tls_started = rc->tls_up = rc->tls_missing = rc->tls_verified = false;
		rc->tls_desc[0] = '\0';
		rc->tls_err = 0;
		if (retry_plain) {
			/* tls=may: the same address once more, in plaintext */
			log_info("relay: %s; trying again without TLS", rc->err);
			rc->no_tls = true;
			conn_try_next(rc);
			return;
		}
		rc->no_tls = false;
		rc->ai++;
		conn_try_next(rc);
		return;
	}
	if (!rc->greeted)
		s->connecting--;
	s->nconns--;
	conn_free(rc);
	site_pump(s);
}

static const struct net_proto relay_proto = {
    .on_open = rc_open,
    .on_data = rc_data,
    .on_timeout = rc_timeout,
    .on_shutdown = rc_shutdown,
    .on_close = rc_close,
    .on_tls = rc_tls,
};

/* ---- local delivery ---- */

static void local_deliver(struct amsg *am, unsigned i)
{
	struct relay *r = am->rw->r;
	const struct spool_rcpt *rp = &am->m.rcpts[i];
	const struct user *u = r->users ? users_find(r->users, rp->addr, rp->addr_len, '+') : NULL;
	if (!u) {
		rcpt_set(am, i, RS_FAIL, "5.1.1", "local", "550 5.1.1 no such user here");
		return;
	}
	char dir[4200];
	if (user_maildir(u, r->cfg->mailbox_root, dir, sizeof(dir)) >= sizeof(dir)) {
		rcpt_set(am, i, RS_DEFER, "4.3.5", "local", "maildir path too long");
		return;
	}
	char prefix[1200];
	size_t pl = maildir_prefix(prefix, sizeof(prefix), am->m.sender, am->m.sender_len,
				   rp->addr, rp->addr_len);
	if (pl >= sizeof(prefix))
		pl = 0;
	struct iovec iov[1 + BODY_IOV_MAX];
	iov[0] = (struct iovec){prefix, pl};
	memcpy(iov + 1, am->biov, am->nbiov * sizeof(*iov));
	char name[MAILDIR_NAME_MAX];
	int e = maildir_deliver(dir, iov, 1 + am->nbiov, name, sizeof(name));
	if (e == 0) {
		char diag[MAILDIR_NAME_MAX + 32];
		snprintf(diag, sizeof(diag), "delivered to maildir as %s", name);
		rcpt_set(am, i, RS_OK, "2.0.0", "local", diag);
		return;
	}
	char diag[DIAG_MAX];
	snprintf(diag, sizeof(diag), "maildir %.300s: %s", dir, strerror(-e));
	rcpt_set(am, i, maildir_error_is_permanent(e) ? RS_FAIL : RS_DEFER,
		 maildir_error_status(e), "local", diag);
}

/* ---- attempts ---- */

static void amsg_free(struct amsg *am)
{
	if (am->rc)
		for (uint32_t i = 0; i < am->m.nrcpts; i++)
			free(am->rc[i].diag);
	free(am->rc);
	spool_message_free(&am->m);
	rbuf_unref(am->buf);
	am->rw->nactive--;
	free(am);
}

/* The domain of recipient rp (after its last '@'; *len octets), or NULL without an '@'. */
static const char *rcpt_domain(const struct spool_rcpt *rp, size_t *len)
{
	const char *at = memrchr(rp->addr, '@', rp->addr_len);
	*len = at ? (size_t)(rp->addr + rp->addr_len - at - 1) : 0;
	return at ? at + 1 : NULL;
}

/*
 * qsort_r over recipient indexes (arg: the message's recipients): by domain,
 * case-insensitively, then by index. The result is +-2 or more when the
 * domains differ and +-1 when only the indexes do, so that cmp / 2 == 0 tells
 * recipients of one domain.
 */
static int rcpt_domain_cmp(const void *a, const void *b, void *arg)
{
	const struct spool_rcpt *rcpts = arg;
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	size_t xl, yl;
	const char *xd = rcpt_domain(&rcpts[x], &xl), *yd = rcpt_domain(&rcpts[y], &yl);
	int c = strncasecmp(xd, yd, MIN(xl, yl));
	if (c == 0 && xl != yl)
		c = xl < yl ? -1 : 1;
	if (c != 0)
		return c < 0 ? -2 : 2;
	return x < y ? -1 : x > y;
}

/* qsort_r over run starts (arg: the sorted indexes): by each run's first recipient. */
static int run_first_cmp(const void *a, const void *b, void *arg)
{
	const uint32_t *idx = arg;
	uint32_t x = idx[*(const uint32_t *)a], y = idx[*(const uint32_t *)b];
	return x < y ? -1 : x > y;
}

static bool rcpt_done_before(const struct spool_entry *e, uint32_t i)
{
	for (uint32_t k = 0; k < e->nrcpt_done; k++)
		if (e->rcpt_done[k] == i)
			return true;
	return false;
}

/* Reads q's message and hands its recipients out. */
static void activate(struct relay_worker *rw, struct rq *q)
{
	struct amsg *am = calloc(1, sizeof(*am));
	struct rbuf *b = calloc(1, sizeof(*b));
	size_t len = 0;
	char err[160];
	int r = !am || !b ? -ENOMEM : 0;
	/* right after reception the message is still in memory: no read back */
	struct spool_hot *h = r == 0 ? spool_entry_take_hot(rw->sw, q->e) : NULL;
	if (h) {
		size_t el;
		const uint8_t *env = spool_hot_env(h, &el);
		int nb = spool_hot_body(h, am->biov, BODY_IOV_MAX);
		if (nb >= 0 && spool_envelope_decode_head(env, el, &am->m, err, sizeof(err)) == 0) {
			am->nbiov = (unsigned)nb;
			b->hot = h;
		} else {
			spool_hot_free(h); /* too many pieces, or damaged: the disk has it */
		}
	}
	if (r == 0 && !b->hot) {
		r = spool_entry_read(rw->sw, q->e, &b->data, &len);
		if (r == 0 && spool_envelope_decode(b->data, len, &am->m, err, sizeof(err)) < 0)
			r = -EBADMSG;
		if (r == 0) {
			am->biov[0] = (struct iovec){(void *)am->m.body, am->m.body_len};
			am->nbiov = 1;
		}
	}
	if (r < 0) {
		free(am);
		if (b)
			free(b->data);
		free(b);
		char idb[17];
		spool_id_format(q->e->id, idb);
		if (r == -EBADMSG || r == -EIO) {
			/* damaged on disk: hold it for the operator rather than loop over it */
			log_err("relay: message %s cannot be read (%s): put on hold", idb,
				strerror(-r));
			spool_entry_mark(rw->sw, q->e, &(struct state_rec){.state = SPOOL_STATE_HELD});
			q->where = RQ_HELD;
			return;
		}
		log_warn("relay: message %s: %s; trying again later", idb, strerror(-r));
		struct spool_entry *e = q->e;
		e->until_ms = wall_ms() + 1000;
		heap_push(rw, q);
		return;
	}
	b->refs = 1;
	am->rw = rw;
	am->rq = q;
	am->buf = b;
	q->where = RQ_ACTIVE;
	rw->nactive++;
	rw->stats.attempts++;
	am->rc = calloc(am->m.nrcpts ? am->m.nrcpts : 1, sizeof(*am->rc));
	relay_find_message_id(am->biov, am->nbiov, am->msgid, sizeof(am->msgid));
	if (!am->rc) {
		am->outstanding = 1;
		am->rc = NULL;
		amsg_free(am);
		q->where = RQ_NONE;
		q->e->until_ms = wall_ms() + 1000;
		heap_push(rw, q);
		return;
	}
	/*
	 * group the recipients by domain; local ones are delivered right here.
	 * Sorted by (domain, index), so any mix of up to max_recipients domains
	 * costs n log n, and handed out in the order of each domain's first
	 * recipient.
	 */
	am->outstanding = 1; /* held while handing out */
	uint32_t n = am->m.nrcpts;
	/* one block per message: idx[n], runs[n], settled[n] */
	uint32_t *idx = malloc((n ? n : 1) * (2 * sizeof(uint32_t) + 1));
	uint32_t *runs = idx ? idx + n : NULL;
	uint8_t *settled = idx ? (uint8_t *)(runs + n) : NULL;
	if (settled) {
		memset(settled, 0, n);
		for (uint32_t k = 0; k < q->e->nrcpt_done; k++)
			if (q->e->rcpt_done[k] < n)
				settled[q->e->rcpt_done[k]] = 1;
	}
	uint32_t m = 0;
	for (uint32_t i = 0; i < n; i++) {
		if (settled ? settled[i] : rcpt_done_before(q->e, i)) {
			am->rc[i].st = RS_SETTLED;
			continue;
		}
		if (!idx) {
			rcpt_set(am, i, RS_DEFER, "4.3.0", "", "out of memory");
			continue;
		}
		size_t dl;
		if (!rcpt_domain(&am->m.rcpts[i], &dl) || dl == 0 || dl >= 256) {
			rcpt_set(am, i, RS_FAIL, "5.1.3", "", "bad recipient address");
			continue;
		}
		idx[m++] = i;
	}
	uint32_t nruns = 0;
	if (m) {
		qsort_r(idx, m, sizeof(*idx), rcpt_domain_cmp, am->m.rcpts);
		for (uint32_t k = 0; k < m; k++)
			if (k == 0 || rcpt_domain_cmp(&idx[k - 1], &idx[k], am->m.rcpts) / 2 != 0)
				runs[nruns++] = k;
		qsort_r(runs, nruns, sizeof(*runs), run_first_cmp, idx);
	}
	for (uint32_t ri = 0; ri < nruns; ri++) {
		uint32_t first = runs[ri], last = first + 1;
		size_t dl;
		const char *at = rcpt_domain(&am->m.rcpts[idx[first]], &dl);
		while (last < m && rcpt_domain_cmp(&idx[last - 1], &idx[last], am->m.rcpts) / 2 == 0)
			last++;
		char dom[256];
		for (size_t k = 0; k < dl; k++)
			dom[k] = (char)((at[k] >= 'A' && at[k] <= 'Z') ? at[k] + 32 : at[k]);
		dom[dl] = '\0';
		if (ph_config_is_local(rw->r->cfg, dom, dl)) {
			for (uint32_t k = first; k < last; k++)
				local_deliver(am, idx[k]);
			continue;
		}
		/* the recipients of this domain, JOB_RCPTS_MAX per job (one transaction each) */
		for (uint32_t k = first; k < last; k += JOB_RCPTS_MAX) {
			uint32_t cnt = MIN(last - k, (uint32_t)JOB_RCPTS_MAX);
			struct job *j = malloc(sizeof(*j) + cnt * sizeof(uint32_t));
			struct rdomain *d = j ? domain_get(rw, dom) : NULL;
			if (!j || !d) {
				free(j);
				for (uint32_t x = 0; x < cnt; x++)
					rcpt_set(am, idx[k + x], RS_DEFER, "4.3.0", "", "out of memory");
				continue;
			}
			j->am = am;
			j->dom = d;
			j->n = cnt;
			memcpy(j->idx, idx + k, cnt * sizeof(uint32_t));
			am->outstanding++;
			domain_submit(rw, j);
		}
	}
	free(idx);
	if (--am->outstanding == 0)
		attempt_done(am);
}

/* Shutdown: frees a job without an outcome (the message stays as the spool has it). */
static void job_drop(struct job *j)
{
	struct amsg *am = j->am;
	free(j);
	if (--am->outstanding == 0)
		amsg_free(am);
}

static void pump(struct relay_worker *rw)
{
	unsigned max = rw->r->cfg->delivery_active_max;
	while (rw->ready_head && rw->nactive < max && !net_worker_stopping(rw->w)) {
		struct rq *q = rw->ready_head;
		rw->ready_head = q->next;
		if (!rw->ready_head)
			rw->ready_tail = NULL;
		q->where = RQ_NONE;
		activate(rw, q);
	}
}

static void finish(struct amsg *am);

static void dsn_committed(void *arg, int res, uint64_t queue_id)
{
	struct amsg *am = arg;
	if (res < 0) {
		/* the bounce could not be queued: those recipients are tried again later */
		for (uint32_t i = 0; i < am->m.nrcpts; i++)
			if (am->rc[i].fresh && am->rc[i].st == RS_FAIL)
				am->rc[i].st = RS_DEFER;
		am->warn = false;
	} else {
		am->rw->stats.dsns++;
		acct_begin(am->rw, "dsn", am->rq->e->id);
		char idb[17];
		spool_id_format(queue_id, idb);
		acct_cstr(am->rw, "dsn_queue_id", idb);
		acct_str(am->rw, "recipient", am->m.sender, am->m.sender_len);
		acct_u64(am->rw, "failed", am->dsn_failed);
		acct_u64(am->rw, "delayed", am->dsn_delayed);
		acct_end(am->rw);
	}
	finish(am);
}

/*
 * Queues one report for the recipients that failed in this attempt and, when
 * am->warn, the ones still deferred (Action: delayed). 1 when it is on its
 * way (finish runs from dsn_committed), 0 when none is sent (null sender,
 * nobody asked for one by NOTIFY, or it cannot be built), -errno when it
 * could not be queued.
 */
static int send_dsn(struct amsg *am)
{
	struct relay_worker *rw = am->rw;
	if (!am->m.sender_len)
		return 0; /* never to the null sender */
	unsigned n = 0;
	for (uint32_t i = 0; i < am->m.nrcpts; i++)
		n += am->rc[i].fresh && am->rc[i].st == RS_FAIL;
	if (am->warn)
		for (uint32_t i = 0; i < am->m.nrcpts; i++)
			n += am->rc[i].st == RS_DEFER;
	struct dsn_rcpt *dr = calloc(n ? n : 1, sizeof(*dr));
	if (!dr)
		return -ENOMEM;
	unsigned k = 0;
	uint64_t now = wall_ms();
	am->dsn_failed = am->dsn_delayed = 0;
	for (uint32_t i = 0; i < am->m.nrcpts; i++) {
		const struct arcpt *rc = &am->rc[i];
		bool failed = rc->fresh && rc->st == RS_FAIL;
		bool delayed = am->warn && rc->st == RS_DEFER;
		if (!failed && !delayed)
			continue;
		const struct spool_rcpt *rp = &am->m.rcpts[i];
		dr[k] = (struct dsn_rcpt){
		    .addr = rp->addr,
		    .addr_len = rp->addr_len,
		    .orcpt = rp->orcpt,
		    .orcpt_len = rp->orcpt_len,
		    .notify = rp->notify,
		    .action = failed ? DSN_ACTION_FAILED : DSN_ACTION_DELAYED,
		    .status = rc->status, /* a delay: the last 4xx reply's enhanced code */
		    .remote_mta = NULL, /* rc->remote is "name[ip]:port": the diagnostic names it */
		    .diag = rc->diag,
		    .diag_len = rc->diag ? strlen(rc->diag) : 0,
		    .last_attempt_ms = now,
		    /* a delayed recipient is tried until the message expires */
		    .retry_until_ms = failed ? 0 : am->m.received_ms + rw->r->cfg->max_queue_age_ms,
		};
		if (dsn_rcpt_wants(rp->notify, dr[k].action)) {
			am->dsn_failed += failed;
			am->dsn_delayed += delayed;
		}
		k++;
	}
	char idb[17];
	spool_id_format(am->rq->e->id, idb);
	struct dsn_message dm = {
	    .reporting_mta = rw->r->hostname,
	    .queue_id = idb,
	    .arrival_ms = am->m.received_ms,
	    .now_ms = now,
	    .sender = am->m.sender,
	    .sender_len = am->m.sender_len,
	    .envid = am->m.envid,
	    .envid_len = am->m.envid_len,
	    .ret = (am->m.flags & SPOOL_ENV_RET_FULL)   ? DSN_RET_FULL
		   : (am->m.flags & SPOOL_ENV_RET_HDRS) ? DSN_RET_HDRS
							: DSN_RET_UNSET,
	    .smtputf8 = (am->m.flags & SPOOL_ENV_SMTPUTF8) != 0,
	    .msg = NULL, /* below: the body in one piece */
	    .msg_len = am->m.body_len,
	    .random = rnd_next(&rw->rnd),
	};
	/* the composer wants the original in one piece: join the chunks of a hot body */
	uint8_t *flat = NULL;
	if (am->nbiov == 1) {
		dm.msg = am->biov[0].iov_base;
	} else if ((flat = malloc(am->m.body_len ? am->m.body_len : 1))) {
		size_t o = 0;
		for (unsigned i = 0; i < am->nbiov; i++) {
			memcpy(flat + o, am->biov[i].iov_base, am->biov[i].iov_len);
			o += am->biov[i].iov_len;
		}
		dm.msg = flat;
	} else {
		free(dr);
		return -ENOMEM;
	}
	char *out = NULL;
	size_t outlen = 0;
	int r = dsn_build(&dm, dr, k, &out, &outlen);
	free(dr);
	free(flat);
	if (r == -ENOENT)
		return 0; /* nobody asked for one (NOTIFY) */
	if (r < 0) {
		log_err("relay: %s: cannot build the bounce: %s", idb, strerror(-r));
		return 0;
	}
	struct spool_txn *t = spool_txn_begin(rw->sw);
	if (!t || spool_txn_append(t, out, outlen) < 0) {
		free(out);
		if (t)
			spool_txn_abort(t);
		return -ENOSPC;
	}
	free(out);
	char rcpt[1024];
	size_t rl = MIN(am->m.sender_len, sizeof(rcpt) - 1);
	memcpy(rcpt, am->m.sender, rl);
	rcpt[rl] = '\0';
	const char *rcpts[1] = {rcpt};
	size_t lens[1] = {rl};
	unsigned char notify[1] = {SMTP_NOTIFY_NEVER};
	struct spool_envelope env = {
	    .sender = "",
	    .sender_len = 0,
	    .helo = rw->r->hostname,
	    .peer = "",
	    .rcpts = rcpts,
	    .rcpt_lens = lens,
	    .rcpt_notify = notify,
	    .nrcpts = 1,
	    .flags = (uint16_t)(SPOOL_ENV_ESMTP | (am->m.flags & SPOOL_ENV_SMTPUTF8) |
				SPOOL_ENV_8BITMIME),
	};
	spool_txn_commit(t, &env, dsn_committed, am);
	return 1;
}

/* Records the attempt's outcome in the spool and frees the active message. */
static void finish(struct amsg *am)
{
	struct relay_worker *rw = am->rw;
	struct rq *q = am->rq;
	struct spool_entry *e = q->e;
	unsigned ndefer = 0, nfail = 0;
	for (uint32_t i = 0; i < am->m.nrcpts; i++) {
		ndefer += am->rc[i].st == RS_DEFER || am->rc[i].st == RS_PENDING;
		nfail += am->rc[i].st == RS_FAIL;
	}
	if (ndefer == 0) {
		rw->stats.messages_done++;
		spool_entry_mark(rw->sw, e,
				 &(struct state_rec){.state = nfail ? SPOOL_STATE_BOUNCED
								    : SPOOL_STATE_DELIVERED});
		rq_free(rw, q);
		amsg_free(am);
		pump(rw);
		return;
	}
	for (uint32_t i = 0; i < am->m.nrcpts; i++)
		if (am->rc[i].fresh && (am->rc[i].st == RS_OK || am->rc[i].st == RS_FAIL))
			spool_entry_mark(rw->sw, e,
					 &(struct state_rec){.state = SPOOL_STATE_RCPT_DONE, .rcpt = i});
	const struct ph_config *cfg = rw->r->cfg;
	uint64_t delay = cfg->retry_min_ms;
	for (unsigned a = 0; a < e->attempts && delay < cfg->retry_max_ms; a++)
		delay *= 2;
	delay = MIN(delay, cfg->retry_max_ms);
	/* jitter: 0.75x .. 1.25x, so that retries of a burst spread out */
	delay = delay * 3 / 4 + (delay ? rnd_next(&rw->rnd) % (delay / 2 + 1) : 0);
	uint16_t attempts = (uint16_t)MIN((unsigned)e->attempts + 1, 65535u);
	spool_entry_mark(rw->sw, e,
			 &(struct state_rec){.state = SPOOL_STATE_DEFERRED,
					     .attempts = attempts,
					     .until_ms = wall_ms() + delay,
					     .flags = am->warn ? STATE_F_DELAY_WARNED : 0});
	/* recipients settled in this attempt are not tried again */
	uint32_t nd = 0;
	for (uint32_t i = 0; i < am->m.nrcpts; i++)
		nd += am->rc[i].st == RS_OK || am->rc[i].st == RS_FAIL || am->rc[i].st == RS_SETTLED;
	if (nd) {
		uint32_t *v = malloc(nd * sizeof(*v));
		if (v) {
			uint32_t k = 0;
			for (uint32_t i = 0; i < am->m.nrcpts; i++)
				if (am->rc[i].st == RS_OK || am->rc[i].st == RS_FAIL ||
				    am->rc[i].st == RS_SETTLED)
					v[k++] = i;
			free(e->rcpt_done);
			e->rcpt_done = v;
			e->nrcpt_done = k;
		}
	}
	amsg_free(am);
	if (heap_push(rw, q) < 0)
		ready_push(rw, q);
	pump(rw);
}

/*
 * Whether this attempt sends the message's delay DSN (docs/bounces.md): some
 * recipient is still deferred, the message is at least delay_warning_time
 * old, it has not had one (STATE_F_DELAY_WARNED, kept in the spool), and it
 * does not come from the null sender (a DSN, or other automatic mail). Which
 * recipients it lists is up to their NOTIFY (dsn_rcpt_wants).
 */
static bool delay_warning_due(const struct amsg *am, uint64_t now)
{
	uint64_t after = am->rw->r->cfg->delay_warning_ms;
	if (!after || !am->m.sender_len || (am->rq->e->flags & STATE_F_DELAY_WARNED) ||
	    now < am->m.received_ms + after)
		return false;
	for (uint32_t i = 0; i < am->m.nrcpts; i++)
		if (am->rc[i].st == RS_DEFER)
			return true;
	return false;
}

static void attempt_done(struct amsg *am)
{
	struct relay_worker *rw = am->rw;
	const struct ph_config *cfg = rw->r->cfg;
	uint64_t now = wall_ms();
	bool any_defer = false;
	for (uint32_t i = 0; i < am->m.nrcpts; i++)
		any_defer |= am->rc[i].st == RS_DEFER || am->rc[i].st == RS_PENDING;
	if (any_defer && now >= am->m.received_ms + cfg->max_queue_age_ms) {
		/* too old: what is still deferred bounces now */
		for (uint32_t i = 0; i < am->m.nrcpts; i++) {
			struct arcpt *rc = &am->rc[i];
			if (rc->st != RS_DEFER && rc->st != RS_PENDING)
				continue;
			char diag[DIAG_MAX + 64];
			snprintf(diag, sizeof(diag), "delivery time expired; last error: %s",
				 rc->diag ? rc->diag : "none");
			rc->st = RS_FAIL;
			rc->fresh = true;
			snprintf(rc->status, sizeof(rc->status), "4.4.7");
			free(rc->diag);
			rc->diag = strndup(diag, DIAG_MAX);
			const char *dom = memrchr(am->m.rcpts[i].addr, '@', am->m.rcpts[i].addr_len);
			char dest[256] = "";
			if (dom)
				snprintf(dest, sizeof(dest), "%.*s",
					 (int)(am->m.rcpts[i].addr + am->m.rcpts[i].addr_len - dom - 1),
					 dom + 1);
			rw->stats.bounced++;
			acct_rcpt(rw, "expiry", am, i, dest);
		}
	}
	bool any_fail = false;
	for (uint32_t i = 0; i < am->m.nrcpts; i++)
		any_fail |= am->rc[i].fresh && am->rc[i].st == RS_FAIL;
	/* the delay DSN goes in the same report as this attempt's failures, if any */
	am->warn = delay_warning_due(am, now);
	if (any_fail || am->warn) {
		int r = send_dsn(am);
		if (r == 1)
			return; /* finish runs when the bounce is queued */
		if (r < 0) {
			for (uint32_t i = 0; i < am->m.nrcpts; i++)
				if (am->rc[i].fresh && am->rc[i].st == RS_FAIL)
					am->rc[i].st = RS_DEFER;
			am->warn = false; /* not sent: the next attempt tries again */
		}
	}
	finish(am);
}

/* ---- queue control (from the control socket, on the owning worker) ---- */

static void heap_remove(struct relay_worker *rw, struct rq *q)
{
	size_t i = q->heap;
	rw->nheap--;
	if (i != rw->nheap) {
		rw->heap[i] = rw->heap[rw->nheap];
		rw->heap[i]->heap = i;
		heap_down(rw, i);
		heap_up(rw, i);
	}
	q->where = RQ_NONE;
}

static void ready_remove(struct relay_worker *rw, struct rq *q)
{
	struct rq *prev = NULL;
	for (struct rq *x = rw->ready_head; x; prev = x, x = x->next) {
		if (x != q)
			continue;
		if (prev)
			prev->next = x->next;
		else
			rw->ready_head = x->next;
		if (rw->ready_tail == x)
			rw->ready_tail = prev;
		break;
	}
	q->where = RQ_NONE;
}

/* Takes q out of whatever list it waits in. false when it is being delivered right now. */
static bool rq_detach(struct relay_worker *rw, struct rq *q)
{
	switch (q->where) {
	case RQ_READY:
		ready_remove(rw, q);
		return true;
	case RQ_DEFERRED:
		heap_remove(rw, q);
		return true;
	case RQ_ACTIVE:
		return false;
	default:
		q->where = RQ_NONE;
		return true;
	}
}

static void flush_sites(struct relay_worker *rw)
{
	for (size_t b = 0; rw->sites && b < rw->nsites_cap; b++)
		for (struct site *s = rw->sites[b]; s; s = s->hnext) {
			s->down_until = 0;
			s->fails = 0;
		}
}

int relay_worker_control(struct relay_worker *rw, enum relay_ctl op, uint64_t id)
{
	if (op == RELAY_CTL_FLUSH_ALL) {
		/* every deferred message is due now, and no destination is backed off */
		unsigned n = 0;
		while (rw->nheap) {
			ready_push(rw, heap_pop(rw));
			n++;
		}
		flush_sites(rw);
		pump(rw);
		return (int)MIN(n, (unsigned)INT32_MAX);
	}
	if (id == RELAY_CTL_ALL) {
		/* every live message of this worker; busy ones are skipped */
		int n = 0;
		for (struct rq *q = rw->all, *nx; q; q = nx) {
			nx = q->all_next;
			if (relay_worker_control(rw, op, q->e->id) == 0 && n < INT32_MAX)
				n++;
		}
		return n;
	}
	struct spool_entry *e = spool_entry_find(rw->sw, id);
	if (!e || !e->owner)
		return -ENOENT;
	struct rq *q = e->owner;
	switch (op) {
	case RELAY_CTL_HOLD:
		if (q->where == RQ_HELD)
			return -EALREADY;
		if (!rq_detach(rw, q))
			return -EBUSY;
		if (spool_entry_mark(rw->sw, e, &(struct state_rec){.state = SPOOL_STATE_HELD}) < 0) {
			ready_push(rw, q);
			return -ENOMEM;
		}
		q->where = RQ_HELD;
		return 0;
	case RELAY_CTL_RELEASE:
		if (q->where != RQ_HELD)
			return -EINVAL;
		if (spool_entry_mark(rw->sw, e, &(struct state_rec){.state = SPOOL_STATE_RELEASED}) < 0)
			return -ENOMEM;
		ready_push(rw, q);
		pump(rw);
		return 0;
	case RELAY_CTL_DELETE: {
		uint8_t where = q->where;
		if (!rq_detach(rw, q))
			return -EBUSY;
		if (spool_entry_mark(rw->sw, e, &(struct state_rec){.state = SPOOL_STATE_DELETED}) < 0) {
			if (where == RQ_HELD)
				q->where = RQ_HELD;
			else
				ready_push(rw, q);
			return -ENOMEM;
		}
		acct_begin(rw, "deleted", id);
		acct_end(rw);
		rq_free(rw, q);
		return 0;
	}
	case RELAY_CTL_FLUSH:
		if (q->where == RQ_DEFERRED) {
			heap_remove(rw, q);
			ready_push(rw, q);
		}
		flush_sites(rw);
		pump(rw);
		return 0;
	default:
		return -EINVAL;
	}
}

/* ---- workers ---- */

struct relay *relay_new(const struct ph_config *cfg, const char *hostname,
			const struct users *users, struct spool *sp, unsigned nworkers, char *err,
			size_t errlen)
{
	struct relay *r = calloc(1, sizeof(*r));
	if (r)
		r->workers = aligned_alloc(CACHELINE, sizeof(*r->workers) * nworkers);
	if (!r || !r->workers) {
		free(r);
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	memset(r->workers, 0, sizeof(*r->workers) * nworkers);
	r->nworkers = nworkers;
	r->cfg = cfg;
	r->users = users;
	r->sp = sp;
	r->acct_fd = -1;
	snprintf(r->hostname, sizeof(r->hostname), "%s", hostname);
	/* outbound TLS: one client context per verification mode, shared by the workers */
	for (unsigned v = 0; v < 2; v++) {
		char terr[256];
		r->tls[v] = tls_ctx_new_client(v == PH_TLS_VERIFY_NAME ? TLS_VERIFY_NAME
								  : TLS_VERIFY_NONE,
					       NULL, NULL, terr, sizeof(terr));
		if (!r->tls[v])
			log_warn("relay: no outbound TLS%s: %s",
				 v == PH_TLS_VERIFY_NAME ? " with verify=name" : "", terr);
	}
	const char *path = cfg->accounting_log;
	if (!strcmp(path, "-")) {
		r->acct_fd = dup(STDOUT_FILENO);
	} else if (strcmp(path, "none") && path[0]) {
		char dir[4096];
		snprintf(dir, sizeof(dir), "%s", path);
		char *slash = strrchr(dir, '/');
		if (slash && slash != dir) {
			*slash = '\0';
			for (char *p = dir + 1; *p; p++)
				if (*p == '/') {
					*p = '\0';
					mkdir(dir, 0755);
					*p = '/';
				}
			mkdir(dir, 0755);
		}
		r->acct_fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
		if (r->acct_fd < 0) {
			snprintf(err, errlen, "cannot open the accounting log %s: %s", path,
				 strerror(errno));
			tls_ctx_free(&r->tls[0]);
			tls_ctx_free(&r->tls[1]);
			free(r->workers);
			free(r);
			return NULL;
		}
	}
	return r;
}

void relay_free(struct relay **rp)
{
	struct relay *r = *rp;
	if (!r)
		return;
	if (r->acct_fd >= 0)
		close(r->acct_fd);
	tls_ctx_free(&r->tls[0]);
	tls_ctx_free(&r->tls[1]);
	free(r->workers);
	free(r);
	*rp = NULL;
}

int relay_worker_init(struct relay *r, struct net_worker *w)
{
	unsigned i = net_worker_index(w);
	if (i >= r->nworkers)
		return -EINVAL;
	struct relay_worker *rw = &r->workers[i];
	rw->r = r;
	rw->w = w;
	rw->index = i;
	rw->sw = spool_worker(r->sp, i);
	rw->rnd = wall_ms() ^ ((uint64_t)i << 56) ^ (uint64_t)getpid();
	rw->heap_timer.fire = heap_timer_fire;
	if (r->acct_fd >= 0 && !(rw->acct = malloc(ACCT_BUF)))
		return -ENOMEM;
	struct dns_config dc;
	dns_config_default(&dc);
	dc.servers = r->cfg->resolver[0] ? r->cfg->resolver : NULL;
	char err[256];
	rw->dns = dns_resolver_new(w, &dc, err, sizeof(err));
	if (!rw->dns) {
		log_err("relay: worker %u: resolver: %s", i, err);
		return -EINVAL;
	}
	spool_worker_set_hooks(rw->sw,
			       &(struct spool_hooks){.added = entry_added, .keep_bodies = true}, rw);
	spool_worker_announce(rw->sw);
	pump(rw);
	return 0;
}

struct relay_worker *relay_worker(struct relay *r, unsigned index)
{
	return r->workers && index < r->nworkers ? &r->workers[index] : NULL;
}

void relay_worker_turn_end(struct relay_worker *rw)
{
	pump(rw);
	if (rw->acct_len) {
		ssize_t k = write(rw->r->acct_fd, rw->acct, rw->acct_len);
		if (k < 0 || (size_t)k != rw->acct_len)
			log_once(LOG_WARN, "relay: cannot write the accounting log: %s",
				 k < 0 ? strerror(errno) : "short write");
		rw->acct_len = 0;
	}
}

void relay_worker_fini(struct relay_worker *rw)
{
	if (!rw || !rw->r)
		return;
	relay_worker_turn_end(rw);
	dns_resolver_free(&rw->dns);
	/*
	 * Work still waiting: its messages stay queued in the spool as they are
	 * and are tried again after the restart. Only memory is released here.
	 */
	for (size_t b = 0; rw->sites && b < rw->nsites_cap; b++)
		for (struct site *s = rw->sites[b], *n; s; s = n) {
			n = s->hnext;
			net_timer_stop(rw->w, &s->timer);
			for (struct job *j = s->qhead, *jn; j; j = jn) {
				jn = j->next;
				job_drop(j);
			}
			free(s->hosts);
			free(s->tls_sess);
			free(s);
		}
	free(rw->sites);
	for (size_t b = 0; rw->doms && b < rw->ndoms_cap; b++)
		for (struct rdomain *d = rw->doms[b], *n; d; d = n) {
			n = d->hnext;
			for (struct job *j = d->phead, *jn; j; j = jn) {
				jn = j->next;
				job_drop(j);
			}
			free(d->rhosts);
			free(d);
		}
	for (struct rq *q = rw->all, *n; q; q = n) {
		n = q->all_next;
		free(q);
	}
	rw->all = NULL;
	free(rw->doms);
	net_timer_stop(rw->w, &rw->heap_timer);
	free(rw->heap);
	free(rw->acct);
	rw->acct = NULL;
}

bool relay_local_domain(const struct relay *r, const char *domain, size_t len)
{
	return ph_config_is_local(r->cfg, domain, len);
}

bool relay_local_user(const struct relay *r, const char *addr, size_t len)
{
	return r->users && users_find(r->users, addr, len, '+') != NULL;
}

void relay_stats(const struct relay *r, struct relay_stats *out)
{
	memset(out, 0, sizeof(*out));
	for (unsigned i = 0; r->workers && i < r->nworkers; i++) {
		const struct relay_stats *s = &r->workers[i].stats;
		out->delivered += s->delivered;
		out->deferred += s->deferred;
		out->bounced += s->bounced;
		out->dsns += s->dsns;
		out->messages_done += s->messages_done;
		out->connections += s->connections;
		out->attempts += s->attempts;
	}
}
