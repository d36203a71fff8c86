/*
 * dns/resolver: the per-worker asynchronous resolver of the relay (c-ares,
 * driven by the worker's io_uring loop; docs/dns.md).
 *
 * dns_resolve_mx finds where mail for a domain goes: its MX hosts ordered
 * by preference (equal preferences in a random order, shuffled for every
 * answer handed out), each with its IPv6 and IPv4 addresses; without MX
 * records the domain itself is the one host (RFC 5321 5.1, `implicit`); a
 * null MX (RFC 7505) is reported as such. dns_resolve_host finds the
 * addresses of one name (a smarthost or a route's host).
 *
 * Answers are cached for the smallest TTL of the records they were built
 * from (capped at one day), negative answers (NXDOMAIN, no data) for
 * negative_ttl_s; temporary failures are not cached. The cache holds at
 * most cache_max answers and evicts the oldest. Identical lookups that are
 * in progress at the same time share one set of DNS queries; the address
 * lookups of MX hosts are shared between domains too.
 *
 * Callbacks: a callback NEVER runs inside dns_resolve_* (cache hits too are
 * delivered from the loop, in a later timer of the same or the next turn),
 * so callers need no re-entrancy care. It runs exactly once per accepted
 * lookup. The result and everything it points to are valid only during the
 * callback. A callback may start lookups and may free the resolver.
 *
 * Threads: a resolver belongs to the worker it was created on; every call
 * is made on that worker's thread (its init hook, callbacks, fini hook).
 *
 * Errors: dns_resolve_* return 0 (the callback will run) or -errno (it will
 * not): -EINVAL for a name that cannot be a domain, -ENOMEM, -ESHUTDOWN
 * once the resolver is being freed.
 */
#ifndef POSTHASTE_DNS_RESOLVER_H
#define POSTHASTE_DNS_RESOLVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "net/net.h"

#define DNS_NAME_MAX  253 /* octets of a name in text form, without the final dot */
#define DNS_MAX_HOSTS 16  /* MX hosts kept per answer (the most preferred) */
#define DNS_MAX_ADDRS 8   /* addresses kept per host */
#define DNS_ERROR_MAX 256

struct dns_resolver;

struct dns_config {
	/* "127.0.0.1:5353" or "[::1]:53", comma-separated (port optional: 53);
	   NULL or "" -> the system's /etc/resolv.conf (production only) */
	const char *servers;
	unsigned timeout_ms;     /* first try's timeout per server (c-ares doubles it per round); 2000 */
	unsigned tries;          /* rounds over the servers; 3 */
	unsigned cache_max;      /* cached answers; 0 disables the cache; 10000 */
	unsigned negative_ttl_s; /* how long NXDOMAIN and no-data answers are believed; 60 */
};

/* Fills *cfg with the defaults above. */
void dns_config_default(struct dns_config *cfg);

enum dns_status {
	DNS_OK,       /* at least one host has an address */
	DNS_NULLMX,   /* RFC 7505 null MX ("MX 0 ."): the domain takes no mail; bounce at once */
	DNS_NXDOMAIN, /* the domain does not exist: permanent */
	DNS_NODATA,   /* no MX and no A/AAAA, or no MX host has an address: permanent */
	DNS_TEMPFAIL, /* timeout, SERVFAIL, refused, unreachable server: try again later */
	DNS_CANCELLED /* the resolver was freed before the answer came */
};

/* "ok", "null MX", "NXDOMAIN", "no data", "temporary failure", "cancelled". */
const char *dns_status_str(enum dns_status s);

struct dns_mx_host {
	char name[DNS_NAME_MAX + 1]; /* lower case, no final dot */
	unsigned pref;               /* MX preference (0 for implicit MX and host lookups) */
	unsigned naddr;              /* 0: its address lookups failed; the caller skips it */
	/* IPv6 first, then IPv4, each in the server's order; port 0 */
	struct sockaddr_storage addr[DNS_MAX_ADDRS];
};

struct dns_mx_result {
	enum dns_status status;
	bool implicit;              /* no MX: the domain's own A/AAAA records (RFC 5321 5.1) */
	const char *name;           /* the name looked up (lower case, no final dot) */
	uint32_t ttl;               /* seconds the answer is cached for (0: not cached) */
	char error[DNS_ERROR_MAX];  /* readable reason when status != DNS_OK, else "" */
	/* dns_resolve_mx: by preference, ties shuffled; dns_resolve_host: one host.
	   Hosts are listed whenever they are known, whatever the status. */
	unsigned nhosts;
	const struct dns_mx_host *hosts;
};

/* arg first, as the callbacks of net/ are not: it is the caller's object. */
typedef void (*dns_mx_cb)(void *arg, const struct dns_mx_result *res);

/*
 * A resolver on worker w. cfg->servers is parsed here. Returns NULL with a
 * reason in err on failure.
 */
struct dns_resolver *dns_resolver_new(struct net_worker *w, const struct dns_config *cfg,
				      char *err, size_t errlen);

/*
 * Frees the resolver; accepts NULL; sets *r to NULL. Lookups still in
 * progress, and answers not yet handed out, are cancelled: their callbacks
 * run inside this call with DNS_CANCELLED (new lookups from those callbacks
 * fail with -ESHUTDOWN). May be called from a dns callback, and from the
 * worker's fini hook (after the loop ended).
 */
void dns_resolver_free(struct dns_resolver **r);

/*
 * Where mail for `domain` goes (a domain name, not an address literal: the
 * caller handles "[1.2.3.4]"; a final dot is accepted). cb(arg, result)
 * runs later, once. Returns 0 or -errno (see above).
 */
int dns_resolve_mx(struct dns_resolver *r, const char *domain, dns_mx_cb cb, void *arg);

/*
 * The A and AAAA addresses of `name` (an IPv4 or IPv6 literal is answered
 * as such); the result has one host. DNS_OK when either family gave an
 * address. Returns 0 or -errno.
 */
int dns_resolve_host(struct dns_resolver *r, const char *name, dns_mx_cb cb, void *arg);

struct dns_stats {
	uint64_t queries;       /* DNS queries sent (one per MX, A or AAAA question) */
	uint64_t cache_hits;    /* lookups (and MX hosts' address lookups) answered from the cache */
	uint64_t coalesced;     /* lookups that joined an identical one in progress */
	uint64_t cache_entries; /* answers in the cache now (expired ones included until evicted) */
};

/* The resolver's counters since it was created. */
void dns_resolver_stats(const struct dns_resolver *r, struct dns_stats *out);

#endif
