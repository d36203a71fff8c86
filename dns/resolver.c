/*
 * dns/resolver: c-ares on a worker's io_uring loop (dns/resolver.h).
 *
 * Loop integration: c-ares tells us through sock_state_cb which of its
 * sockets it wants to read or write; each socket gets a `watch` with one
 * one-shot net_poll_add in flight at a time. A completed poll is handed to
 * ares_process_fd and the watch is re-armed. A net_timer follows
 * ares_timeout. A socket c-ares closes is unwatched: its poll is cancelled
 * (the poll holds the file open) and the watch lives on, detached, until
 * the poll's completion comes back.
 *
 * Lookups: an in-progress `lookup` per (kind, name), found through a hash
 * table, gathers its waiters (callers, or MX lookups waiting for one of
 * their hosts' addresses). A finished lookup produces an immutable,
 * refcounted `answer` (compact: names and raw addresses), which goes into
 * the cache and to each waiter. Callers' waiters are queued and delivered
 * by a 0 ms timer, so no callback runs inside a dns_resolve_* call or
 * inside c-ares; the public result is built from the answer at delivery,
 * in a per-resolver scratch array, with the hosts of equal preference
 * shuffled.
 *
 * c-ares callbacks never run caller code. They may start more queries
 * (an MX answer starts its hosts' address lookups).
 */
#include "dns/resolver.h"

#include <ares.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>

#include "core/clock.h"
#include "core/compiler.h"
#include "core/log.h"
#include "dns/wire.h"

#define TTL_CAP_S   86400u /* nothing is believed longer than a day */
#define MX_READ_MAX 64u    /* MX records looked at per answer */

void dns_config_default(struct dns_config *cfg)
{
	*cfg = (struct dns_config){
		.servers = NULL,
		.timeout_ms = 2000,
		.tries = 3,
		.cache_max = 10000,
		.negative_ttl_s = 60,
	};
}

const char *dns_status_str(enum dns_status s)
{
	switch (s) {
	case DNS_OK:
		return "ok";
	case DNS_NULLMX:
		return "null MX";
	case DNS_NXDOMAIN:
		return "NXDOMAIN";
	case DNS_NODATA:
		return "no data";
	case DNS_TEMPFAIL:
		return "temporary failure";
	case DNS_CANCELLED:
		return "cancelled";
	}
	return "?";
}

/* ---- answers: immutable once finished, shared by the cache and waiters ---- */

struct ans_addr {
	uint8_t family; /* AF_INET or AF_INET6 */
	uint8_t a[16];
};

struct ans_host {
	char *name;
	uint16_t pref;
	uint8_t naddr;
	uint8_t status; /* enum dns_status of its address lookup */
	struct ans_addr addr[DNS_MAX_ADDRS];
};

struct answer {
	unsigned refs;
	enum dns_status status;
	bool implicit;
	bool cacheable; /* false when any part failed temporarily */
	uint32_t ttl;
	char *qname;
	char *error; /* NULL when none */
	unsigned nhosts;
	struct ans_host hosts[];
};

static struct answer *answer_new(const char *qname, unsigned nhosts)
{
	struct answer *a = calloc(1, sizeof(*a) + nhosts * sizeof(a->hosts[0]));
	if (!a)
		return NULL;
	a->qname = strdup(qname);
	if (!a->qname) {
		free(a);
		return NULL;
	}
	a->refs = 1;
	a->cacheable = true;
	a->ttl = TTL_CAP_S;
	a->nhosts = nhosts;
	return a;
}

static struct answer *answer_ref(struct answer *a)
{
	a->refs++;
	return a;
}

static void answer_unref(struct answer *a)
{
	if (!a || --a->refs)
		return;
	for (unsigned i = 0; i < a->nhosts; i++)
		free(a->hosts[i].name);
	free(a->qname);
	free(a->error);
	free(a);
}

static void answer_error(struct answer *a, const char *fmt, ...) printf_like(2, 3);
static void answer_error(struct answer *a, const char *fmt, ...)
{
	char buf[DNS_ERROR_MAX];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	free(a->error);
	a->error = strdup(buf); /* NULL on ENOMEM: the result then has an empty text */
}

/* ---- a small hash table keyed by (kind, name) ---- */

enum kind { K_MX = 1, K_HOST = 2 };

struct hnode {
	struct hnode *next;
	uint32_t hash;
	uint8_t kind;
	const char *name;
};

struct htab {
	struct hnode **b;
	size_t mask;
	size_t n;
};

static uint32_t name_hash(enum kind kind, const char *name)
{
	uint32_t h = 2166136261u ^ (uint32_t)kind;
	for (const unsigned char *p = (const unsigned char *)name; *p; p++)
		h = (h ^ *p) * 16777619u;
	return h;
}

static int ht_init(struct htab *t, size_t size)
{
	size_t n = 16;
	while (n < size)
		n *= 2;
	t->b = calloc(n, sizeof(*t->b));
	if (!t->b)
		return -ENOMEM;
	t->mask = n - 1;
	t->n = 0;
	return 0;
}

static struct hnode *ht_find(const struct htab *t, enum kind kind, const char *name, uint32_t hash)
{
	for (struct hnode *h = t->b[hash & t->mask]; h; h = h->next)
		if (h->hash == hash && h->kind == kind && !strcmp(h->name, name))
			return h;
	return NULL;
}

static void ht_insert(struct htab *t, struct hnode *h)
{
	if (t->n >= 2 * (t->mask + 1)) { /* grow; on ENOMEM the chains just get longer */
		size_t n = 2 * (t->mask + 1);
		struct hnode **b = calloc(n, sizeof(*b));
		if (b) {
			for (size_t i = 0; i <= t->mask; i++)
				for (struct hnode *x = t->b[i], *nx; x; x = nx) {
					nx = x->next;
					x->next = b[x->hash & (n - 1)];
					b[x->hash & (n - 1)] = x;
				}
			free(t->b);
			t->b = b;
			t->mask = n - 1;
		}
	}
	struct hnode **slot = &t->b[h->hash & t->mask];
	h->next = *slot;
	*slot = h;
	t->n++;
}

static void ht_remove(struct htab *t, struct hnode *h)
{
	for (struct hnode **p = &t->b[h->hash & t->mask]; *p; p = &(*p)->next)
		if (*p == h) {
			*p = h->next;
			t->n--;
			return;
		}
}

/* ---- the resolver ---- */

struct lookup;

struct waiter {
	struct waiter *next;
	dns_mx_cb cb;           /* a caller's waiter ... */
	void *arg;
	struct lookup *parent;  /* ... or an MX lookup waiting for host `index` */
	unsigned index;
	struct answer *ans;     /* set when queued for delivery */
};

enum part { P_PENDING, P_OK, P_NODATA, P_NXDOMAIN, P_TEMPFAIL };

struct lookup {
	struct hnode hn;
	struct dns_resolver *r;
	enum kind kind;
	struct waiter *wh, *wt;
	unsigned pending; /* queries (host) or host lookups (MX) outstanding */
	/* host: per family */
	enum part p4, p6;
	unsigned n4, n6;
	uint32_t ttl4, ttl6;
	struct ans_addr a4[DNS_MAX_ADDRS], a6[DNS_MAX_ADDRS];
	int err4, err6; /* ares status of a failed part */
	/* MX: the answer being built */
	struct answer *ans;
	char name[];
};

struct watch {
	struct net_io io;
	struct dns_resolver *r; /* NULL once detached from a freed resolver */
	struct watch *next, *prev;
	int fd;
	bool live;      /* c-ares still uses the socket */
	bool canceling; /* a cancel of the armed poll was submitted */
	unsigned want;  /* POLLIN / POLLOUT c-ares asked for */
	unsigned armed; /* events of the poll in flight; 0 = none */
};

struct centry {
	struct hnode hn;
	struct centry *older, *newer;
	struct answer *ans;
	uint64_t expires_ms;
	char name[];
};

struct dns_resolver {
	struct net_worker *w;
	ares_channel ch;
	struct dns_config cfg;
	struct net_timer ares_timer;
	struct net_timer deliver_timer;
	struct watch *watches; /* live and detached (their poll ends) */
	struct htab inflight;  /* struct lookup */
	struct htab cache;     /* struct centry */
	struct centry *oldest, *newest;
	struct waiter *dq_head, *dq_tail; /* answers to hand out */
	struct dns_mx_host *scratch;      /* the hosts of the result being delivered */
	uint64_t rnd;
	struct dns_stats stats;
	bool closing;
	bool delivering;
};

static uint64_t rnd_next(struct dns_resolver *r)
{
	/* xorshift64* */
	r->rnd ^= r->rnd >> 12;
	r->rnd ^= r->rnd << 25;
	r->rnd ^= r->rnd >> 27;
	return r->rnd * 2685821657736338717ull;
}

/* ---- socket watches ---- */

static void resolver_sync(struct dns_resolver *r);

static void watch_unlink(struct watch *wt)
{
	if (wt->prev)
		wt->prev->next = wt->next;
	else if (wt->r)
		wt->r->watches = wt->next;
	if (wt->next)
		wt->next->prev = wt->prev;
	wt->next = wt->prev = NULL;
}

static void watch_done(struct net_io *io, int res)
{
	struct watch *wt = container_of(io, struct watch, io);
	struct dns_resolver *r = wt->r;
	wt->armed = 0;
	wt->canceling = false;
	if (!wt->live || !r) {
		watch_unlink(wt);
		free(wt);
		return;
	}
	if (res == -ECANCELED) { /* re-armed with the events wanted now */
		resolver_sync(r);
		return;
	}
	/* an error of the poll itself: let c-ares read and find it */
	unsigned ev = res < 0 ? POLLERR : (unsigned)res;
	ares_socket_t rfd = ARES_SOCKET_BAD, wfd = ARES_SOCKET_BAD;
	if ((wt->want & POLLIN) && (ev & (POLLIN | POLLERR | POLLHUP)))
		rfd = wt->fd;
	if ((wt->want & POLLOUT) && (ev & (POLLOUT | POLLERR | POLLHUP)))
		wfd = wt->fd;
	/* wt may be unwatched (freed) inside: not touched after */
	if (rfd != ARES_SOCKET_BAD || wfd != ARES_SOCKET_BAD)
		ares_process_fd(r->ch, rfd, wfd);
	resolver_sync(r);
}

/* c-ares no longer uses the socket: cancel its poll, free the watch when the poll is over. */
static void watch_drop(struct dns_resolver *r, struct watch *wt)
{
	wt->live = false;
	wt->want = 0;
	if (!wt->armed) {
		watch_unlink(wt);
		free(wt);
		return;
	}
	if (!wt->canceling) {
		if (net_poll_cancel(r->w, &wt->io) < 0) { /* the loop ended: nothing will complete */
			watch_unlink(wt);
			free(wt);
			return;
		}
		wt->canceling = true;
	}
}

static void sock_state(void *data, ares_socket_t fd, int readable, int writable)
{
	struct dns_resolver *r = data;
	struct watch *wt = r->watches;
	while (wt && !(wt->live && wt->fd == fd))
		wt = wt->next;
	unsigned want = (readable ? POLLIN : 0) | (writable ? POLLOUT : 0);
	if (!want) {
		if (wt)
			watch_drop(r, wt);
		return;
	}
	if (!wt) {
		wt = calloc(1, sizeof(*wt));
		if (!wt) {
			/* the query times out through ares_timeout */
			log_once(LOG_WARN, "dns: out of memory for a socket watch");
			return;
		}
		wt->io.done = watch_done;
		wt->r = r;
		wt->fd = fd;
		wt->live = true;
		wt->next = r->watches;
		if (r->watches)
			r->watches->prev = wt;
		r->watches = wt;
	}
	wt->want = want; /* armed in resolver_sync */
}

/* ---- after every entry into c-ares: polls, the timeout timer, deliveries ---- */

static void resolver_sync(struct dns_resolver *r)
{
	if (r->closing)
		return;
	for (struct watch *wt = r->watches; wt; wt = wt->next) {
		if (!wt->live || !wt->want)
			continue;
		if (!wt->armed) {
			int rc = net_poll_add(r->w, wt->fd, wt->want, &wt->io);
			if (rc < 0)
				log_once(LOG_WARN, "dns: cannot poll a resolver socket: %s", strerror(-rc));
			else
				wt->armed = wt->want;
		} else if ((wt->want & ~wt->armed) && !wt->canceling) {
			/* more events wanted than armed: cancel, re-armed on completion */
			if (net_poll_cancel(r->w, &wt->io) == 0)
				wt->canceling = true;
		}
	}
	struct timeval tv, *tvp = ares_timeout(r->ch, NULL, &tv);
	if (tvp)
		net_timer_start(r->w, &r->ares_timer,
				(uint64_t)tvp->tv_sec * 1000 + ((uint64_t)tvp->tv_usec + 999) / 1000);
	else
		net_timer_stop(r->w, &r->ares_timer);
	if (r->dq_head && !r->deliver_timer.heap_index)
		net_timer_start(r->w, &r->deliver_timer, 0);
}

static void ares_timer_fire(struct net_timer *t, struct net_worker *w)
{
	(void)w;
	struct dns_resolver *r = container_of(t, struct dns_resolver, ares_timer);
	ares_process_fd(r->ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
	resolver_sync(r);
}

/* ---- names ---- */

/* Lower-cases `in` into out (DNS_NAME_MAX + 1), without a final dot. 0 or -EINVAL. */
static int name_norm(const char *in, char *out)
{
	size_t n = strlen(in);
	if (n && in[n - 1] == '.')
		n--;
	if (!n || n > DNS_NAME_MAX)
		return -EINVAL;
	size_t label = 0;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)in[i];
		if (c <= ' ' || c == 0x7f || c == '\\')
			return -EINVAL;
		if (c == '.') {
			if (!label)
				return -EINVAL;
			label = 0;
		} else if (++label > 63) {
			return -EINVAL;
		}
		out[i] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
	}
	out[n] = '\0';
	return 0;
}

/* An IPv4 or IPv6 literal? */
static bool addr_literal(const char *name, struct ans_addr *a)
{
	if (inet_pton(AF_INET, name, a->a) == 1) {
		a->family = AF_INET;
		return true;
	}
	if (inet_pton(AF_INET6, name, a->a) == 1) {
		a->family = AF_INET6;
		return true;
	}
	return false;
}

/* ---- the cache ---- */

static void cache_unlink(struct dns_resolver *r, struct centry *e)
{
	ht_remove(&r->cache, &e->hn);
	if (e->older)
		e->older->newer = e->newer;
	else
		r->oldest = e->newer;
	if (e->newer)
		e->newer->older = e->older;
	else
		r->newest = e->older;
	answer_unref(e->ans);
	free(e);
}

static struct answer *cache_get(struct dns_resolver *r, enum kind kind, const char *name)
{
	if (!r->cache.b)
		return NULL;
	struct hnode *h = ht_find(&r->cache, kind, name, name_hash(kind, name));
	if (!h)
		return NULL;
	struct centry *e = container_of(h, struct centry, hn);
	if (net_worker_now_ms(r->w) >= e->expires_ms) {
		cache_unlink(r, e);
		return NULL;
	}
	return e->ans;
}

static void cache_put(struct dns_resolver *r, enum kind kind, const char *name, struct answer *a)
{
	if (!r->cache.b || !r->cfg.cache_max || !a->cacheable || !a->ttl ||
	    a->status == DNS_TEMPFAIL || a->status == DNS_CANCELLED)
		return;
	uint32_t hash = name_hash(kind, name);
	struct hnode *old = ht_find(&r->cache, kind, name, hash);
	if (old)
		cache_unlink(r, container_of(old, struct centry, hn));
	size_t nl = strlen(name) + 1;
	struct centry *e = malloc(sizeof(*e) + nl);
	if (!e)
		return;
	memcpy(e->name, name, nl);
	e->hn = (struct hnode){.hash = hash, .kind = (uint8_t)kind, .name = e->name};
	e->ans = answer_ref(a);
	e->expires_ms = net_worker_now_ms(r->w) + (uint64_t)a->ttl * 1000;
	e->newer = NULL;
	e->older = r->newest;
	if (r->newest)
		r->newest->newer = e;
	else
		r->oldest = e;
	r->newest = e;
	ht_insert(&r->cache, &e->hn);
	while (r->cache.n > r->cfg.cache_max)
		cache_unlink(r, r->oldest);
}

/* ---- delivery ---- */

static void dq_push(struct dns_resolver *r, struct waiter *wt)
{
	wt->next = NULL;
	if (r->dq_tail)
		r->dq_tail->next = wt;
	else
		r->dq_head = wt;
	r->dq_tail = wt;
}

static void addr_to_ss(const struct ans_addr *a, struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof(*ss));
	if (a->family == AF_INET) {
		struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
		s4->sin_family = AF_INET;
		memcpy(&s4->sin_addr, a->a, 4);
	} else {
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
		s6->sin6_family = AF_INET6;
		memcpy(&s6->sin6_addr, a->a, 16);
	}
}

/* Builds the public result of a (into r->scratch), ties shuffled, and runs the callback. */
static void deliver(struct dns_resolver *r, struct waiter *wt)
{
	const struct answer *a = wt->ans;
	struct dns_mx_result res = {
		.status = a->status,
		.implicit = a->implicit,
		.name = a->qname,
		.ttl = a->cacheable && a->status != DNS_TEMPFAIL && r->cfg.cache_max ? a->ttl : 0,
		.nhosts = a->nhosts,
		.hosts = r->scratch,
	};
	snprintf(res.error, sizeof(res.error), "%s", a->error ? a->error : "");
	for (unsigned i = 0; i < a->nhosts; i++) {
		const struct ans_host *h = &a->hosts[i];
		struct dns_mx_host *o = &r->scratch[i];
		snprintf(o->name, sizeof(o->name), "%s", h->name);
		o->pref = h->pref;
		o->naddr = h->naddr;
		for (unsigned k = 0; k < h->naddr; k++)
			addr_to_ss(&h->addr[k], &o->addr[k]);
	}
	/* the answer is sorted by preference: shuffle each run of equal ones */
	for (unsigned i = 0; i < a->nhosts;) {
		unsigned j = i + 1;
		while (j < a->nhosts && a->hosts[j].pref == a->hosts[i].pref)
			j++;
		for (unsigned k = j - 1; k > i; k--) {
			unsigned m = i + (unsigned)(rnd_next(r) % (k - i + 1));
			if (m != k) {
				struct dns_mx_host t = r->scratch[k];
				r->scratch[k] = r->scratch[m];
				r->scratch[m] = t;
			}
		}
		i = j;
	}
	wt->cb(wt->arg, &res);
}

static void resolver_release(struct dns_resolver *r)
{
	free(r->scratch);
	free(r);
}

static void deliver_fire(struct net_timer *t, struct net_worker *w)
{
	(void)w;
	struct dns_resolver *r = container_of(t, struct dns_resolver, deliver_timer);
	r->delivering = true;
	while (r->dq_head && !r->closing) {
		struct waiter *wt = r->dq_head;
		r->dq_head = wt->next;
		if (!r->dq_head)
			r->dq_tail = NULL;
		deliver(r, wt);
		answer_unref(wt->ans);
		free(wt);
	}
	r->delivering = false;
	if (r->closing) /* freed by a callback: the rest was cancelled there */
		resolver_release(r);
}

/* ---- lookups ---- */

static struct lookup *lookup_new(struct dns_resolver *r, enum kind kind, const char *name)
{
	size_t nl = strlen(name) + 1;
	struct lookup *l = calloc(1, sizeof(*l) + nl);
	if (!l)
		return NULL;
	memcpy(l->name, name, nl);
	l->r = r;
	l->kind = kind;
	l->hn = (struct hnode){.hash = name_hash(kind, name), .kind = (uint8_t)kind, .name = l->name};
	ht_insert(&r->inflight, &l->hn);
	return l;
}

static void lookup_add_waiter(struct lookup *l, struct waiter *wt)
{
	wt->next = NULL;
	if (l->wt)
		l->wt->next = wt;
	else
		l->wh = wt;
	l->wt = wt;
}

static void mx_sub_done(struct lookup *l, unsigned i, const struct answer *ha);

/* The lookup is over: cache the answer, hand it to every waiter, free the lookup. */
static void lookup_finish(struct lookup *l, struct answer *a)
{
	struct dns_resolver *r = l->r;
	ht_remove(&r->inflight, &l->hn);
	if (a->ttl > TTL_CAP_S)
		a->ttl = TTL_CAP_S;
	cache_put(r, l->kind, l->name, a);
	struct waiter *wt = l->wh;
	while (wt) {
		struct waiter *next = wt->next;
		if (wt->parent) {
			mx_sub_done(wt->parent, wt->index, a);
			free(wt);
		} else {
			wt->ans = answer_ref(a);
			dq_push(r, wt);
		}
		wt = next;
	}
	answer_unref(l->ans);
	answer_unref(a);
	free(l);
}

/* An answer of one host with no address (a lookup that could not even start). */
static struct answer *host_fail_answer(const char *name, enum dns_status st, const char *why)
{
	struct answer *a = answer_new(name, 1);
	if (!a)
		return NULL;
	a->hosts[0].name = strdup(name);
	if (!a->hosts[0].name) {
		answer_unref(a);
		return NULL;
	}
	a->status = st;
	a->hosts[0].status = (uint8_t)st;
	a->cacheable = false;
	answer_error(a, "%s: %s", name, why);
	return a;
}

static void host_complete(struct lookup *l)
{
	struct dns_resolver *r = l->r;
	struct answer *a = answer_new(l->name, 1);
	if (a)
		a->hosts[0].name = strdup(l->name);
	if (!a || !a->hosts[0].name) {
		answer_unref(a);
		a = host_fail_answer(l->name, DNS_TEMPFAIL, "out of memory");
		if (!a)
			panic("dns: out of memory");
		lookup_finish(l, a);
		return;
	}
	struct ans_host *h = &a->hosts[0];
	/* both families when both answered, IPv6 first: at least half the room for IPv4 */
	unsigned n6 = l->n6, n4 = l->n4;
	if (n6 + n4 > DNS_MAX_ADDRS) {
		unsigned room6 = DNS_MAX_ADDRS - MIN(n4, DNS_MAX_ADDRS / 2);
		n6 = MIN(n6, room6);
		n4 = MIN(n4, DNS_MAX_ADDRS - n6);
	}
	for (unsigned i = 0; i < n6; i++)
		h->addr[h->naddr++] = l->a6[i];
	for (unsigned i = 0; i < n4; i++)
		h->addr[h->naddr++] = l->a4[i];
	bool temp = l->p4 == P_TEMPFAIL || l->p6 == P_TEMPFAIL;
	if (h->naddr) {
		a->status = DNS_OK;
		a->ttl = MIN(l->p6 == P_OK ? l->ttl6 : TTL_CAP_S, l->p4 == P_OK ? l->ttl4 : TTL_CAP_S);
		a->cacheable = !temp; /* half an answer is not remembered */
	} else if (l->p4 == P_NXDOMAIN || l->p6 == P_NXDOMAIN) {
		a->status = DNS_NXDOMAIN;
		a->ttl = r->cfg.negative_ttl_s;
		answer_error(a, "%s: no such domain (NXDOMAIN)", l->name);
	} else if (temp) {
		a->status = DNS_TEMPFAIL;
		a->cacheable = false;
		int e = l->p4 == P_TEMPFAIL ? l->err4 : l->err6;
		answer_error(a, "address lookup of %s failed: %s", l->name, ares_strerror(e));
	} else {
		a->status = DNS_NODATA;
		a->ttl = r->cfg.negative_ttl_s;
		answer_error(a, "%s has no A or AAAA records", l->name);
	}
	h->status = (uint8_t)a->status;
	lookup_finish(l, a);
}

static enum part part_of(int status)
{
	switch (status) {
	case ARES_SUCCESS:
		return P_OK;
	case ARES_ENODATA:
		return P_NODATA;
	case ARES_ENOTFOUND:
		return P_NXDOMAIN;
	default:
		return P_TEMPFAIL;
	}
}

static void host_part(struct lookup *l, bool v6, int status, const unsigned char *abuf, int alen)
{
	enum part p = part_of(status);
	unsigned n = 0;
	uint32_t ttl = TTL_CAP_S;
	struct ans_addr *out = v6 ? l->a6 : l->a4;
	if (p == P_OK) {
		int k = DNS_MAX_ADDRS, ps;
		if (v6) {
			struct ares_addr6ttl t[DNS_MAX_ADDRS];
			ps = ares_parse_aaaa_reply(abuf, alen, NULL, t, &k);
			for (int i = 0; ps == ARES_SUCCESS && i < k && n < DNS_MAX_ADDRS; i++) {
				out[n].family = AF_INET6;
				memcpy(out[n++].a, &t[i].ip6addr, 16);
				ttl = MIN(ttl, t[i].ttl > 0 ? (uint32_t)t[i].ttl : 0);
			}
		} else {
			struct ares_addrttl t[DNS_MAX_ADDRS];
			ps = ares_parse_a_reply(abuf, alen, NULL, t, &k);
			for (int i = 0; ps == ARES_SUCCESS && i < k && n < DNS_MAX_ADDRS; i++) {
				out[n].family = AF_INET;
				memcpy(out[n++].a, &t[i].ipaddr, 4);
				ttl = MIN(ttl, t[i].ttl > 0 ? (uint32_t)t[i].ttl : 0);
			}
		}
		if (ps == ARES_ENODATA || (ps == ARES_SUCCESS && n == 0)) {
			p = P_NODATA;
		} else if (ps != ARES_SUCCESS) {
			p = P_TEMPFAIL;
			status = ps;
		}
	}
	if (v6) {
		l->p6 = p;
		l->n6 = n;
		l->ttl6 = ttl;
		l->err6 = status;
	} else {
		l->p4 = p;
		l->n4 = n;
		l->ttl4 = ttl;
		l->err4 = status;
	}
	if (--l->pending == 0)
		host_complete(l);
}

static void a_cb(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
	(void)timeouts;
	struct lookup *l = arg;
	if (status == ARES_EDESTRUCTION || l->r->closing)
		return;
	host_part(l, false, status, abuf, alen);
}

static void aaaa_cb(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
	(void)timeouts;
	struct lookup *l = arg;
	if (status == ARES_EDESTRUCTION || l->r->closing)
		return;
	host_part(l, true, status, abuf, alen);
}

/* Sends the A and AAAA queries. l may be finished (freed) when this returns. */
static void host_start(struct lookup *l)
{
	struct dns_resolver *r = l->r;
	l->pending = 2;
	r->stats.queries += 2;
	ares_query(r->ch, l->name, DNS_CLASS_IN, DNS_TYPE_A, a_cb, l);
	/* a synchronous failure of the first leaves pending at 1: l is still there */
	ares_query(r->ch, l->name, DNS_CLASS_IN, DNS_TYPE_AAAA, aaaa_cb, l);
}

static void mx_complete(struct lookup *l)
{
	struct answer *a = l->ans;
	l->ans = NULL;
	bool any = false, temp = false;
	for (unsigned i = 0; i < a->nhosts; i++) {
		any |= a->hosts[i].naddr > 0;
		temp |= a->hosts[i].status == DNS_TEMPFAIL;
	}
	if (any) {
		a->status = DNS_OK;
	} else if (a->implicit) {
		/* the domain's own address lookup decides */
		a->status = a->nhosts ? (enum dns_status)a->hosts[0].status : DNS_TEMPFAIL;
		if (a->status == DNS_NODATA)
			answer_error(a, "%s has no MX and no A or AAAA records", l->name);
		else if (a->status == DNS_NXDOMAIN)
			answer_error(a, "%s: no such domain (NXDOMAIN)", l->name);
		else
			answer_error(a, "%s has no MX records and its address lookup failed "
					"temporarily",
				     l->name);
	} else if (temp) {
		a->status = DNS_TEMPFAIL;
		answer_error(a, "no MX host of %s has an address (temporary failure)", l->name);
	} else {
		a->status = DNS_NODATA;
		answer_error(a, "no MX host of %s has an address", l->name);
	}
	if (a->status == DNS_TEMPFAIL)
		a->cacheable = false;
	lookup_finish(l, a);
}

/* Host i of the MX lookup l got its addresses (or failed). */
static void mx_sub_done(struct lookup *l, unsigned i, const struct answer *ha)
{
	struct ans_host *h = &l->ans->hosts[i];
	const struct ans_host *src = ha->nhosts ? &ha->hosts[0] : NULL;
	h->status = (uint8_t)ha->status;
	if (src) {
		h->naddr = src->naddr;
		memcpy(h->addr, src->addr, sizeof(h->addr));
	}
	if (!ha->cacheable || ha->status == DNS_TEMPFAIL)
		l->ans->cacheable = false;
	else
		l->ans->ttl = MIN(l->ans->ttl, ha->ttl);
	if (--l->pending == 0)
		mx_complete(l);
}

/* Starts (or joins, or answers from the cache) the address lookup of MX host i. */
static void mx_sub_start(struct lookup *l, unsigned i)
{
	struct dns_resolver *r = l->r;
	struct ans_host *h = &l->ans->hosts[i];
	char name[DNS_NAME_MAX + 1];
	if (addr_literal(h->name, &h->addr[0])) { /* not valid in MX data, but plain */
		h->naddr = 1;
		h->status = DNS_OK;
		l->pending--;
		return;
	}
	struct answer *ha;
	if (name_norm(h->name, name) < 0) {
		ha = host_fail_answer(h->name, DNS_NXDOMAIN, "not a valid host name");
		if (!ha)
			panic("dns: out of memory");
		ha->cacheable = true; /* as permanent as any negative answer */
		ha->ttl = r->cfg.negative_ttl_s;
		mx_sub_done(l, i, ha);
		answer_unref(ha);
		return;
	}
	if ((ha = cache_get(r, K_HOST, name))) {
		r->stats.cache_hits++;
		mx_sub_done(l, i, ha);
		return;
	}
	struct waiter *wt = calloc(1, sizeof(*wt));
	struct hnode *hn = ht_find(&r->inflight, K_HOST, name, name_hash(K_HOST, name));
	struct lookup *hl = hn ? container_of(hn, struct lookup, hn) : NULL;
	if (!hl && wt)
		hl = lookup_new(r, K_HOST, name);
	if (!wt || !hl) {
		free(wt);
		ha = host_fail_answer(name, DNS_TEMPFAIL, "out of memory");
		if (!ha)
			panic("dns: out of memory");
		mx_sub_done(l, i, ha);
		answer_unref(ha);
		return;
	}
	wt->parent = l;
	wt->index = i;
	lookup_add_waiter(hl, wt);
	if (hn)
		r->stats.coalesced++;
	else
		host_start(hl);
}

struct mx_rec {
	const char *host;
	unsigned short pref;
};

static void mx_got(struct lookup *l, struct ares_mx_reply *list, uint32_t ttl)
{
	struct mx_rec recs[MX_READ_MAX];
	unsigned n = 0, nnull = 0;
	for (struct ares_mx_reply *m = list; m && n < MX_READ_MAX; m = m->next) {
		bool null = !m->host[0] || !strcmp(m->host, ".");
		nnull += null;
		if (null)
			continue; /* a null MX among real ones is ignored */
		bool dup = false;
		for (unsigned k = 0; k < n && !dup; k++)
			dup = !strcasecmp(recs[k].host, m->host);
		if (dup)
			continue;
		/* insertion by preference, stable */
		unsigned k = n++;
		while (k > 0 && recs[k - 1].pref > m->priority) {
			recs[k] = recs[k - 1];
			k--;
		}
		recs[k] = (struct mx_rec){m->host, m->priority};
	}
	if (n > DNS_MAX_HOSTS)
		n = DNS_MAX_HOSTS;
	struct answer *a = answer_new(l->name, n);
	if (!a)
		goto nomem;
	a->ttl = ttl;
	if (!n) { /* only null MX records: the domain takes no mail */
		a->status = nnull ? DNS_NULLMX : DNS_NODATA;
		answer_error(a, nnull ? "%s accepts no mail (null MX, RFC 7505)"
				      : "%s has no usable MX records",
			     l->name);
		lookup_finish(l, a);
		return;
	}
	for (unsigned i = 0; i < n; i++) {
		char *nm = strdup(recs[i].host);
		if (!nm) {
			answer_unref(a);
			goto nomem;
		}
		for (char *p = nm; *p; p++)
			if (*p >= 'A' && *p <= 'Z')
				*p = (char)(*p + 32);
		size_t k = strlen(nm);
		if (k > 1 && nm[k - 1] == '.')
			nm[k - 1] = '\0';
		a->hosts[i].name = nm;
		a->hosts[i].pref = recs[i].pref;
		a->hosts[i].status = DNS_TEMPFAIL; /* until its lookup answers */
	}
	l->ans = a;
	l->pending = n + 1; /* held while the host lookups start */
	for (unsigned i = 0; i < n; i++)
		mx_sub_start(l, i);
	if (--l->pending == 0)
		mx_complete(l);
	return;
nomem:;
	struct answer *f = answer_new(l->name, 0);
	if (!f)
		panic("dns: out of memory");
	f->status = DNS_TEMPFAIL;
	f->cacheable = false;
	answer_error(f, "%s: out of memory", l->name);
	lookup_finish(l, f);
}

static void mx_cb(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
	(void)timeouts;
	struct lookup *l = arg;
	struct dns_resolver *r = l->r;
	if (status == ARES_EDESTRUCTION || r->closing)
		return;
	if (status == ARES_SUCCESS) {
		struct ares_mx_reply *mx = NULL;
		int ps = ares_parse_mx_reply(abuf, alen, &mx);
		if (ps == ARES_SUCCESS) {
			uint32_t ttl;
			if (dns_wire_answer_ttl(abuf, (size_t)alen, DNS_TYPE_MX, &ttl) <= 0)
				ttl = 0; /* c-ares read it, we could not: not cached */
			mx_got(l, mx, ttl);
			ares_free_data(mx);
			return;
		}
		status = ps; /* ENODATA (no MX among the records) or a malformed answer */
		if (ps != ARES_ENODATA)
			status = ARES_EBADRESP;
	}
	struct answer *a;
	switch (status) {
	case ARES_ENODATA:
		/* no MX: the domain itself, if it has addresses (RFC 5321 5.1) */
		a = answer_new(l->name, 1);
		if (!a || !(a->hosts[0].name = strdup(l->name)))
			break;
		a->implicit = true;
		a->ttl = r->cfg.negative_ttl_s; /* the absence of MX records */
		a->hosts[0].status = DNS_TEMPFAIL;
		l->ans = a;
		l->pending = 2;
		mx_sub_start(l, 0);
		if (--l->pending == 0)
			mx_complete(l);
		return;
	case ARES_ENOTFOUND:
		a = answer_new(l->name, 0);
		if (!a)
			break;
		a->status = DNS_NXDOMAIN;
		a->ttl = r->cfg.negative_ttl_s;
		answer_error(a, "%s: no such domain (NXDOMAIN)", l->name);
		lookup_finish(l, a);
		return;
	default:
		a = answer_new(l->name, 0);
		if (!a)
			break;
		a->status = DNS_TEMPFAIL;
		a->cacheable = false;
		answer_error(a, "MX lookup of %s failed: %s", l->name, ares_strerror(status));
		lookup_finish(l, a);
		return;
	}
	answer_unref(a);
	a = answer_new(l->name, 0);
	if (!a)
		panic("dns: out of memory");
	a->status = DNS_TEMPFAIL;
	a->cacheable = false;
	lookup_finish(l, a);
}

/* ---- public calls ---- */

static int resolve(struct dns_resolver *r, enum kind kind, const char *in, dns_mx_cb cb, void *arg)
{
	if (r->closing)
		return -ESHUTDOWN;
	char name[DNS_NAME_MAX + 1];
	struct ans_addr lit;
	bool literal = kind == K_HOST && strlen(in) < sizeof(name) && addr_literal(in, &lit);
	if (literal)
		snprintf(name, sizeof(name), "%s", in);
	else if (name_norm(in, name) < 0)
		return -EINVAL;
	struct waiter *wt = calloc(1, sizeof(*wt));
	if (!wt)
		return -ENOMEM;
	wt->cb = cb;
	wt->arg = arg;
	struct answer *a;
	if (literal) {
		a = answer_new(name, 1);
		if (!a || !(a->hosts[0].name = strdup(name))) {
			answer_unref(a);
			free(wt);
			return -ENOMEM;
		}
		a->status = DNS_OK;
		a->hosts[0].status = DNS_OK;
		a->hosts[0].naddr = 1;
		a->hosts[0].addr[0] = lit;
		a->cacheable = false;
		wt->ans = a;
		dq_push(r, wt);
		resolver_sync(r);
		return 0;
	}
	if ((a = cache_get(r, kind, name))) {
		r->stats.cache_hits++;
		wt->ans = answer_ref(a);
		dq_push(r, wt);
		resolver_sync(r);
		return 0;
	}
	struct hnode *hn = ht_find(&r->inflight, kind, name, name_hash(kind, name));
	if (hn) {
		r->stats.coalesced++;
		lookup_add_waiter(container_of(hn, struct lookup, hn), wt);
		return 0;
	}
	struct lookup *l = lookup_new(r, kind, name);
	if (!l) {
		free(wt);
		return -ENOMEM;
	}
	lookup_add_waiter(l, wt);
	if (kind == K_HOST) {
		host_start(l);
	} else {
		r->stats.queries++;
		ares_query(r->ch, l->name, DNS_CLASS_IN, DNS_TYPE_MX, mx_cb, l);
	}
	resolver_sync(r);
	return 0;
}

int dns_resolve_mx(struct dns_resolver *r, const char *domain, dns_mx_cb cb, void *arg)
{
	return resolve(r, K_MX, domain, cb, arg);
}

int dns_resolve_host(struct dns_resolver *r, const char *name, dns_mx_cb cb, void *arg)
{
	return resolve(r, K_HOST, name, cb, arg);
}

void dns_resolver_stats(const struct dns_resolver *r, struct dns_stats *out)
{
	*out = r->stats;
	out->cache_entries = r->cache.n;
}

/* ---- life cycle ---- */

static pthread_once_t ares_once = PTHREAD_ONCE_INIT;
static int ares_init_status;

static void ares_global_init(void)
{
	ares_init_status = ares_library_init(ARES_LIB_INIT_ALL);
}

struct dns_resolver *dns_resolver_new(struct net_worker *w, const struct dns_config *cfg_in,
				      char *err, size_t errlen)
{
	struct dns_config cfg;
	dns_config_default(&cfg);
	if (cfg_in)
		cfg = *cfg_in;
	if (!cfg.timeout_ms)
		cfg.timeout_ms = 2000;
	if (!cfg.tries)
		cfg.tries = 3;
	pthread_once(&ares_once, ares_global_init);
	if (ares_init_status != ARES_SUCCESS) {
		snprintf(err, errlen, "c-ares: %s", ares_strerror(ares_init_status));
		return NULL;
	}
	struct dns_resolver *r = calloc(1, sizeof(*r));
	if (!r || !(r->scratch = calloc(DNS_MAX_HOSTS, sizeof(*r->scratch))) ||
	    ht_init(&r->inflight, 64) < 0 ||
	    (cfg.cache_max && ht_init(&r->cache, MIN(cfg.cache_max, 1u << 16)) < 0)) {
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	r->w = w;
	r->cfg = cfg;
	r->cfg.servers = NULL; /* the caller's string is not kept */
	r->ares_timer.fire = ares_timer_fire;
	r->deliver_timer.fire = deliver_fire;
	if (getrandom(&r->rnd, sizeof(r->rnd), GRND_NONBLOCK) != sizeof(r->rnd))
		r->rnd = clock_ns() ^ (uintptr_t)r;
	r->rnd |= 1;

	bool own_servers = cfg.servers && *cfg.servers;
	struct ares_options o;
	memset(&o, 0, sizeof(o));
	int mask = ARES_OPT_FLAGS | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES | ARES_OPT_SOCK_STATE_CB |
		   ARES_OPT_EDNSPSZ | ARES_OPT_LOOKUPS;
	o.flags = ARES_FLAG_NOSEARCH | ARES_FLAG_NOALIASES | ARES_FLAG_EDNS;
	o.timeout = (int)MIN(cfg.timeout_ms, 600000u);
	o.tries = (int)MIN(cfg.tries, 16u);
	o.sock_state_cb = sock_state;
	o.sock_state_cb_data = r;
	o.ednspsz = 1232; /* no IP fragmentation (DNS flag day 2020) */
	o.lookups = (char *)"b";
	if (own_servers) {
		/* nothing of the system's configuration: the servers come next */
		mask |= ARES_OPT_RESOLVCONF;
		o.resolvconf_path = (char *)"/dev/null";
	}
	int rc = ares_init_options(&r->ch, &o, mask);
	if (rc != ARES_SUCCESS) {
		r->ch = NULL;
		snprintf(err, errlen, "c-ares: %s", ares_strerror(rc));
		goto fail;
	}
	if (own_servers) {
		rc = ares_set_servers_ports_csv(r->ch, cfg.servers);
		if (rc != ARES_SUCCESS) {
			snprintf(err, errlen, "bad DNS servers '%s': %s", cfg.servers, ares_strerror(rc));
			goto fail;
		}
	}
	return r;
fail:
	if (r) {
		if (r->ch)
			ares_destroy(r->ch);
		free(r->inflight.b);
		free(r->cache.b);
		free(r->scratch);
		free(r);
	}
	return NULL;
}

/* A caller's waiter gets DNS_CANCELLED (its callbacks can only fail to start lookups). */
static void cancel_one(struct waiter *wt, const char *name)
{
	struct dns_mx_result res = {.status = DNS_CANCELLED, .name = name};
	snprintf(res.error, sizeof(res.error), "%s: the DNS resolver was shut down", name);
	wt->cb(wt->arg, &res);
	answer_unref(wt->ans);
	free(wt);
}

void dns_resolver_free(struct dns_resolver **rp)
{
	struct dns_resolver *r = *rp;
	if (!r)
		return;
	*rp = NULL;
	if (r->closing)
		return;
	r->closing = true;
	net_timer_stop(r->w, &r->ares_timer);
	net_timer_stop(r->w, &r->deliver_timer);
	/* c-ares answers its queries with EDESTRUCTION (ignored) and closes its sockets */
	ares_destroy(r->ch);
	r->ch = NULL;
	for (struct watch *wt = r->watches, *next; wt; wt = next) {
		next = wt->next;
		if (wt->live)
			watch_drop(r, wt);
	}
	/* what is left are detached watches whose cancelled poll has not ended yet */
	for (struct watch *wt = r->watches, *next; wt; wt = next) {
		next = wt->next;
		if (net_poll_cancel(r->w, &wt->io) < 0) { /* the loop ended: free now */
			watch_unlink(wt);
			free(wt);
		} else {
			wt->r = NULL;
			wt->prev = wt->next = NULL;
		}
	}
	r->watches = NULL;

	/* the callers' waiters: answers not yet handed out, then lookups in progress */
	struct waiter *q = r->dq_head;
	r->dq_head = r->dq_tail = NULL;
	for (struct waiter *wt = q, *next; wt; wt = next) {
		next = wt->next;
		cancel_one(wt, wt->ans->qname);
	}
	for (size_t b = 0; b <= r->inflight.mask; b++) {
		for (struct hnode *h = r->inflight.b[b], *nh; h; h = nh) {
			nh = h->next;
			struct lookup *l = container_of(h, struct lookup, hn);
			for (struct waiter *wt = l->wh, *next; wt; wt = next) {
				next = wt->next;
				if (wt->parent)
					free(wt);
				else
					cancel_one(wt, l->name);
			}
			answer_unref(l->ans);
			free(l);
		}
	}
	free(r->inflight.b);
	r->inflight.b = NULL;
	while (r->oldest)
		cache_unlink(r, r->oldest);
	free(r->cache.b);
	r->cache.b = NULL;
	r->cache.n = 0;
	if (!r->delivering)
		resolver_release(r);
}
