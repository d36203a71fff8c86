/* Per-client-address connection and message limits: see anvil.h for the contract. */
#include "mta/smtp/anvil.h"

#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "core/addr.h"
#include "core/clock.h"
#include "core/compiler.h"

#define NS_PER_MS 1000000ull

struct anvil_slot {
	uint8_t addr[16];  /* IPv4 as v4-mapped IPv6 */
	uint64_t conn_tat; /* GCRA: when the bucket is full again, ns; <= now: idle */
	uint64_t msg_tat;
	uint32_t conns; /* open connections; a slot with any is never reused */
	bool used;
};

struct anvil_set {
	pthread_mutex_t lock;
	struct anvil_slot slot[ANVIL_WAYS];
} cache_aligned;

/* One rate: a token every t_ns, up to count at once (tau_ns of credit). */
struct anvil_rate {
	uint64_t t_ns, tau_ns; /* t_ns 0: no limit */
};

struct anvil {
	struct anvil_set *sets;
	uint32_t nsets; /* a power of two */
	unsigned conn_limit;
	struct anvil_rate conn_rate, msg_rate;
	uint64_t seed[2];
	_Atomic uint64_t untracked;
};

static void rate_init(struct anvil_rate *r, uint32_t count, uint64_t per_ms)
{
	r->t_ns = r->tau_ns = 0;
	if (!count)
		return;
	uint64_t per_ns = per_ms > UINT64_MAX / NS_PER_MS ? UINT64_MAX : per_ms * NS_PER_MS;
	r->t_ns = MAX(per_ns / count, 1);
	/* count tokens at once: the count-th take finds (count-1) * t_ns of debt */
	r->tau_ns = r->t_ns * (count - 1) <= per_ns ? r->t_ns * (count - 1) : per_ns;
}

/* Takes a token at now_ns when one is there (GCRA); *tat is the bucket. */
static bool rate_take(const struct anvil_rate *r, uint64_t *tat, uint64_t now_ns)
{
	if (!r->t_ns)
		return true;
	uint64_t t = MAX(*tat, now_ns);
	if (t - now_ns > r->tau_ns)
		return false;
	*tat = t + r->t_ns;
	return true;
}

struct anvil *anvil_new(const struct anvil_config *cfg)
{
	if ((cfg->conn_rate_count && !cfg->conn_rate_ms) ||
	    (cfg->msg_rate_count && !cfg->msg_rate_ms)) {
		errno = EINVAL;
		return NULL;
	}
	struct anvil *a = calloc(1, sizeof(*a));
	if (!a)
		return NULL;
	uint32_t slots = cfg->slots ? MIN(cfg->slots, ANVIL_SLOTS_MAX) : ANVIL_SLOTS_DEFAULT;
	uint32_t n = ANVIL_WAYS;
	while (n < slots)
		n *= 2;
	a->nsets = n / ANVIL_WAYS;
	a->sets = aligned_alloc(CACHELINE, sizeof(*a->sets) * a->nsets);
	if (!a->sets) {
		free(a);
		errno = ENOMEM;
		return NULL;
	}
	memset(a->sets, 0, sizeof(*a->sets) * a->nsets);
	for (uint32_t i = 0; i < a->nsets; i++)
		pthread_mutex_init(&a->sets[i].lock, NULL);
	a->conn_limit = cfg->conn_limit;
	rate_init(&a->conn_rate, cfg->conn_rate_count, cfg->conn_rate_ms);
	rate_init(&a->msg_rate, cfg->msg_rate_count, cfg->msg_rate_ms);
	/* keyed: a client must not be able to pick addresses that share one set */
	if (getrandom(a->seed, sizeof(a->seed), GRND_NONBLOCK) != (ssize_t)sizeof(a->seed)) {
		a->seed[0] = clock_ns() ^ (uintptr_t)a;
		a->seed[1] = a->seed[0] * 0x9e3779b97f4a7c15ull;
	}
	return a;
}

void anvil_free(struct anvil **ap)
{
	struct anvil *a = *ap;
	if (!a)
		return;
	for (uint32_t i = 0; i < a->nsets; i++)
		pthread_mutex_destroy(&a->sets[i].lock);
	free(a->sets);
	free(a);
	*ap = NULL;
}

/* The table's key of an address: false for anything but AF_INET and AF_INET6. */
static bool anvil_key(const struct sockaddr_storage *ss, uint8_t key[16])
{
	return addr_key16(ss, key);
}

static uint64_t mix(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static struct anvil_set *anvil_set_of(struct anvil *a, const uint8_t key[16])
{
	uint64_t w[2];
	memcpy(w, key, 16);
	uint64_t h = mix(mix(w[0] ^ a->seed[0]) ^ w[1] ^ a->seed[1]);
	return &a->sets[h & (a->nsets - 1)];
}

/*
 * The address's slot in its (locked) set, or a new one: a free slot, else
 * the one without connections whose buckets fill up first (idle ones have
 * nothing left to forget). NULL when every slot has open connections.
 */
static struct anvil_slot *slot_get(struct anvil_set *set, const uint8_t key[16])
{
	struct anvil_slot *free_sl = NULL, *old = NULL;
	uint64_t old_tat = 0;
	for (unsigned i = 0; i < ANVIL_WAYS; i++) {
		struct anvil_slot *sl = &set->slot[i];
		if (!sl->used) {
			if (!free_sl)
				free_sl = sl;
			continue;
		}
		if (!memcmp(sl->addr, key, 16))
			return sl;
		/* idle buckets have the earliest times: they go first */
		uint64_t tat = MAX(sl->conn_tat, sl->msg_tat);
		if (!sl->conns && (!old || tat < old_tat)) {
			old = sl;
			old_tat = tat;
		}
	}
	struct anvil_slot *sl = free_sl ? free_sl : old;
	if (!sl)
		return NULL;
	memset(sl, 0, sizeof(*sl));
	memcpy(sl->addr, key, 16);
	sl->used = true;
	return sl;
}

enum anvil_result anvil_connect(struct anvil *a, const struct sockaddr_storage *sa, uint64_t now_ms,
                                uint32_t *ticket_r)
{
	uint8_t key[16];
	*ticket_r = 0;
	if (!anvil_key(sa, key))
		return ANVIL_OK;
	struct anvil_set *set = anvil_set_of(a, key);
	enum anvil_result r = ANVIL_OK;
	pthread_mutex_lock(&set->lock);
	struct anvil_slot *sl = slot_get(set, key);
	if (!sl) {
		atomic_fetch_add_explicit(&a->untracked, 1, memory_order_relaxed);
	} else if (a->conn_limit && sl->conns >= a->conn_limit) {
		r = ANVIL_CONN_LIMIT;
	} else if (!rate_take(&a->conn_rate, &sl->conn_tat, now_ms * NS_PER_MS)) {
		r = ANVIL_CONN_RATE;
	} else {
		sl->conns++;
		*ticket_r =
		    (uint32_t)((size_t)(set - a->sets) * ANVIL_WAYS + (size_t)(sl - set->slot)) + 1;
	}
	pthread_mutex_unlock(&set->lock);
	return r;
}

void anvil_disconnect(struct anvil *a, uint32_t ticket)
{
	if (!ticket || ticket > a->nsets * ANVIL_WAYS)
		return;
	struct anvil_set *set = &a->sets[(ticket - 1) / ANVIL_WAYS];
	pthread_mutex_lock(&set->lock);
	struct anvil_slot *sl = &set->slot[(ticket - 1) % ANVIL_WAYS];
	if (sl->conns) /* never reused while it had any: still this connection's address */
		sl->conns--;
	pthread_mutex_unlock(&set->lock);
}

enum anvil_result anvil_message(struct anvil *a, const struct sockaddr_storage *sa, uint64_t now_ms)
{
	uint8_t key[16];
	if (!a->msg_rate.t_ns || !anvil_key(sa, key))
		return ANVIL_OK;
	struct anvil_set *set = anvil_set_of(a, key);
	enum anvil_result r = ANVIL_OK;
	pthread_mutex_lock(&set->lock);
	struct anvil_slot *sl = slot_get(set, key);
	if (sl && !rate_take(&a->msg_rate, &sl->msg_tat, now_ms * NS_PER_MS))
		r = ANVIL_MSG_RATE;
	pthread_mutex_unlock(&set->lock);
	return r;
}

unsigned anvil_connections(struct anvil *a, const struct sockaddr_storage *sa)
{
	uint8_t key[16];
	if (!anvil_key(sa, key))
		return 0;
	struct anvil_set *set = anvil_set_of(a, key);
	unsigned n = 0;
	pthread_mutex_lock(&set->lock);
	for (unsigned i = 0; i < ANVIL_WAYS; i++)
		if (set->slot[i].used && !memcmp(set->slot[i].addr, key, 16))
			n = set->slot[i].conns;
	pthread_mutex_unlock(&set->lock);
	return n;
}

uint64_t anvil_untracked(const struct anvil *a)
{
	return atomic_load_explicit(&a->untracked, memory_order_relaxed);
}
