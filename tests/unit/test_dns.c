/*
 * dns/resolver tests: a real net engine with one worker running the
 * resolver, against a dnsmasq of our own on 127.0.0.1 and a free port
 * (records given by flags; nothing is forwarded; the system resolver is
 * never used). The test thread hands work to the worker through an eventfd
 * the worker polls (net_poll_add) and waits for the callbacks' results.
 * Skips (exit 77) without /usr/sbin/dnsmasq.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/clock.h"
#include "core/compiler.h"
#include "dns/resolver.h"
#include "net/net.h"

#define DNSMASQ "/usr/sbin/dnsmasq"

/* ---- our dnsmasq ---- */

struct dnsmasq {
	pid_t pid;
	uint16_t port;
	char servers[64]; /* "127.0.0.1:port" */
};

/* A port free for both UDP and TCP on 127.0.0.1 (or for UDP only: a black hole). */
static uint16_t free_port(int *keep_udp)
{
	for (int tries = 0; tries < 50; tries++) {
		int u = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
		struct sockaddr_in sa = {.sin_family = AF_INET};
		inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
		assert_int_equal(bind(u, (struct sockaddr *)&sa, sizeof(sa)), 0);
		socklen_t l = sizeof(sa);
		getsockname(u, (struct sockaddr *)&sa, &l);
		int t = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		int ok = bind(t, (struct sockaddr *)&sa, sizeof(sa)) == 0;
		close(t);
		if (keep_udp)
			*keep_udp = u;
		else
			close(u);
		if (ok || keep_udp)
			return ntohs(sa.sin_port);
	}
	fail_msg("no free port");
	return 0;
}

static bool dnsmasq_ready(uint16_t port)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
	inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
	bool ok = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
	close(fd);
	return ok;
}

static int dnsmasq_start(void **state, unsigned ttl)
{
	if (access(DNSMASQ, X_OK) != 0) {
		fprintf(stderr, "dnsmasq not installed (Debian: dnsmasq-base)\n");
		exit(77);
	}
	struct dnsmasq *d = calloc(1, sizeof(*d));
	assert_non_null(d);
	d->port = free_port(NULL);
	snprintf(d->servers, sizeof(d->servers), "127.0.0.1:%u", d->port);
	char port[32], ttls[32];
	snprintf(port, sizeof(port), "--port=%u", d->port);
	snprintf(ttls, sizeof(ttls), "--local-ttl=%u", ttl);
	const char *argv[] = {
		/* not --no-daemon: in debug mode dnsmasq serves TCP in its main process and
		   stops answering UDP while a client keeps a TCP connection open (c-ares does) */
		DNSMASQ, "--keep-in-foreground", "--pid-file=", "--no-resolv", "--no-hosts",
		"--bind-interfaces", "--listen-address=127.0.0.1", port, "-C", "/dev/null", ttls,
		/* every name under .test is answered here: unknown ones are NXDOMAIN */
		"--local=/test/",
		/* two MX of preference 10 and one of 20 */
		"--mx-host=multi.test,mx1.multi.test,10", "--mx-host=multi.test,mx2.multi.test,10",
		"--mx-host=multi.test,mx3.multi.test,20",
		"--host-record=mx1.multi.test,192.0.2.1,2001:db8::1",
		"--host-record=mx2.multi.test,192.0.2.2", "--host-record=mx3.multi.test,192.0.2.3",
		/* no MX: the domain's own address (implicit MX) */
		"--host-record=onlya.test,192.0.2.9",
		/* RFC 7505 null MX: preference 0, the root name */
		"--dns-rr=nullmx.test,15,000000",
		/* a name with neither MX nor addresses */
		"--txt-record=txtonly.test,hello",
		/* MX hosts without addresses */
		"--mx-host=noaddr.test,ghost.test,5",
		"--mx-host=partial.test,ghost.test,5", "--mx-host=partial.test,mx2.multi.test,10",
		/* an MX given as an IP literal (invalid, tolerated) and an upper-case one */
		"--mx-host=literal.test,192.0.2.50,5", "--mx-host=upper.test,MX3.Multi.Test,5",
		NULL,
	};
	/* 30 MX records with long names: too big for UDP (1232 octets), read over TCP */
	const char *args[128];
	char big[30][128];
	unsigned n = 0;
	for (; argv[n]; n++)
		args[n] = argv[n];
	for (unsigned i = 0; i < 30; i++) {
		snprintf(big[i], sizeof(big[i]),
			 "--mx-host=big.test,mx%02u-a-rather-long-label-to-fill-the-answer.big.test,%u", i,
			 i + 1);
		args[n++] = big[i];
	}
	args[n++] = "--host-record=mx00-a-rather-long-label-to-fill-the-answer.big.test,192.0.2.100";
	args[n] = NULL;
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		int null = open("/dev/null", O_RDWR);
		dup2(null, 0);
		dup2(null, 1);
		if (!getenv("TEST_DNS_VERBOSE"))
			dup2(null, 2);
		execv(DNSMASQ, (char *const *)args);
		_exit(127);
	}
	d->pid = pid;
	uint64_t deadline = clock_ms() + 10000;
	while (!dnsmasq_ready(d->port)) {
		int st;
		if (waitpid(pid, &st, WNOHANG) == pid || clock_ms() > deadline) {
			d->pid = 0;
			free(d);
			fail_msg("dnsmasq did not start");
		}
		usleep(10000);
	}
	*state = d;
	return 0;
}

static int dnsmasq_setup(void **state)
{
	return dnsmasq_start(state, 300);
}

static int dnsmasq_setup_ttl1(void **state)
{
	return dnsmasq_start(state, 1);
}

static int dnsmasq_teardown(void **state)
{
	struct dnsmasq *d = *state;
	if (d && d->pid > 0) {
		kill(d->pid, SIGTERM);
		waitpid(d->pid, NULL, 0);
	}
	free(d);
	*state = NULL;
	return 0;
}

/* ---- the engine, and work handed to its worker ---- */

struct harness;
typedef void job_fn(struct harness *h, void *arg);

struct harness {
	struct net_engine *e;
	pthread_t thread;
	int run_result;
	struct dns_config cfg;
	struct dns_resolver *r;
	struct net_worker *w;
	int efd;
	struct net_io eio;
	job_fn *_Atomic job;
	void *job_arg;
	_Atomic bool job_done;
	_Atomic bool init_ok;
};

static void job_ready(struct net_io *io, int res)
{
	struct harness *h = container_of(io, struct harness, eio);
	uint64_t v;
	if (res > 0 && read(h->efd, &v, sizeof(v)) == sizeof(v) && h->job) {
		job_fn *fn = h->job;
		h->job = NULL;
		fn(h, h->job_arg);
		h->job_done = true;
	}
	assert_int_equal(net_poll_add(h->w, h->efd, POLLIN, &h->eio), 0);
}

static int h_init(struct net_worker *w, void *arg)
{
	struct harness *h = arg;
	char err[256];
	h->w = w;
	h->r = dns_resolver_new(w, &h->cfg, err, sizeof(err));
	if (!h->r) {
		fprintf(stderr, "dns_resolver_new: %s\n", err);
		return -EINVAL;
	}
	h->eio.done = job_ready;
	int rc = net_poll_add(w, h->efd, POLLIN, &h->eio);
	h->init_ok = rc == 0;
	return rc;
}

static void h_fini(struct net_worker *w, void *arg)
{
	(void)w;
	struct harness *h = arg;
	dns_resolver_free(&h->r); /* as the relay does: lookups left are cancelled */
}

static void *run_engine(void *arg)
{
	struct harness *h = arg;
	h->run_result = net_engine_run(h->e);
	return NULL;
}

static void harness_start(struct harness *h, const char *servers, void (*tune)(struct dns_config *))
{
	dns_config_default(&h->cfg);
	h->cfg.servers = servers;
	h->cfg.timeout_ms = 1000;
	h->cfg.tries = 2;
	if (tune)
		tune(&h->cfg);
	h->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	assert_true(h->efd >= 0);
	struct net_config cfg;
	net_config_default(&cfg);
	cfg.workers = 1;
	cfg.pin = false;
	cfg.buf_count = 64;
	struct net_worker_hooks hooks = {.init = h_init, .fini = h_fini, .arg = h};
	h->e = net_engine_new(&cfg, &hooks);
	assert_non_null(h->e);
	assert_int_equal(pthread_create(&h->thread, NULL, run_engine, h), 0);
	uint64_t deadline = clock_ms() + 5000;
	while (!h->init_ok && clock_ms() < deadline)
		usleep(1000);
	assert_true(h->init_ok);
}

static void harness_stop(struct harness *h)
{
	net_engine_stop(h->e);
	pthread_join(h->thread, NULL);
	assert_int_equal(h->run_result, 0);
	net_engine_free(&h->e);
	close(h->efd);
	assert_null(h->r);
}

/* Runs fn(h, arg) on the worker and waits for it to return. */
static void on_worker(struct harness *h, job_fn *fn, void *arg)
{
	h->job_done = false;
	h->job_arg = arg;
	h->job = fn;
	uint64_t one = 1;
	assert_int_equal(write(h->efd, &one, sizeof(one)), sizeof(one));
	uint64_t deadline = clock_ms() + 10000;
	while (!h->job_done && clock_ms() < deadline)
		usleep(200);
	assert_true(h->job_done);
}

/* ---- probes: a lookup's result, copied in the callback ---- */

struct probe_host {
	char name[DNS_NAME_MAX + 1];
	unsigned pref;
	unsigned naddr;
	char addr[DNS_MAX_ADDRS][INET6_ADDRSTRLEN];
};

struct probe {
	struct harness *h;
	_Atomic unsigned calls;
	bool inside; /* the callback ran inside dns_resolve_* */
	enum dns_status status;
	bool implicit;
	uint32_t ttl;
	char name[DNS_NAME_MAX + 1];
	char error[DNS_ERROR_MAX];
	unsigned nhosts;
	struct probe_host hosts[DNS_MAX_HOSTS];
	bool free_resolver; /* frees the resolver from the callback */
};

static bool in_resolve; /* worker thread only */

static void probe_cb(void *arg, const struct dns_mx_result *res)
{
	struct probe *p = arg;
	p->inside |= in_resolve;
	p->status = res->status;
	p->implicit = res->implicit;
	p->ttl = res->ttl;
	snprintf(p->name, sizeof(p->name), "%s", res->name ? res->name : "(null)");
	snprintf(p->error, sizeof(p->error), "%s", res->error);
	p->nhosts = res->nhosts;
	for (unsigned i = 0; i < res->nhosts && i < DNS_MAX_HOSTS; i++) {
		const struct dns_mx_host *s = &res->hosts[i];
		struct probe_host *o = &p->hosts[i];
		snprintf(o->name, sizeof(o->name), "%s", s->name);
		o->pref = s->pref;
		o->naddr = s->naddr;
		for (unsigned k = 0; k < s->naddr; k++) {
			const struct sockaddr_storage *ss = &s->addr[k];
			assert_int_equal(ss->ss_family == AF_INET ? ((struct sockaddr_in *)ss)->sin_port
								  : ((struct sockaddr_in6 *)ss)->sin6_port,
					 0);
			if (ss->ss_family == AF_INET)
				inet_ntop(AF_INET, &((struct sockaddr_in *)ss)->sin_addr, o->addr[k],
					  sizeof(o->addr[k]));
			else
				inet_ntop(AF_INET6, &((struct sockaddr_in6 *)ss)->sin6_addr, o->addr[k],
					  sizeof(o->addr[k]));
		}
	}
	if (p->free_resolver)
		dns_resolver_free(&p->h->r);
	p->calls++;
}

struct req {
	bool host; /* dns_resolve_host, else dns_resolve_mx */
	const char *name;
	struct probe *p;
	int rc;
};

static void job_resolve(struct harness *h, void *arg)
{
	struct req *q = arg;
	q->p->h = h;
	in_resolve = true;
	q->rc = q->host ? dns_resolve_host(h->r, q->name, probe_cb, q->p)
			: dns_resolve_mx(h->r, q->name, probe_cb, q->p);
	in_resolve = false;
}

static void wait_probe(struct probe *p, unsigned calls)
{
	uint64_t deadline = clock_ms() + 10000;
	while (p->calls < calls && clock_ms() < deadline)
		usleep(500);
	assert_int_equal(p->calls, calls);
	assert_false(p->inside);
}

/* Starts a lookup on the worker, waits for its answer; returns dns_resolve_*'s result. */
static int lookup(struct harness *h, bool host, const char *name, struct probe *p)
{
	memset(p, 0, sizeof(*p));
	struct req q = {host, name, p, 0};
	on_worker(h, job_resolve, &q);
	if (q.rc == 0)
		wait_probe(p, 1);
	return q.rc;
}

struct stats_req {
	struct dns_stats st;
};

static void job_stats(struct harness *h, void *arg)
{
	struct stats_req *s = arg;
	dns_resolver_stats(h->r, &s->st);
}

static struct dns_stats stats(struct harness *h)
{
	struct stats_req s;
	on_worker(h, job_stats, &s);
	return s.st;
}

static const struct probe_host *find_host(const struct probe *p, const char *name)
{
	for (unsigned i = 0; i < p->nhosts; i++)
		if (!strcmp(p->hosts[i].name, name))
			return &p->hosts[i];
	return NULL;
}

/* ---- tests ---- */

static void test_mx_order(void **state)
{
	struct dnsmasq *d = *state;
	struct harness h = {0};
	harness_start(&h, d->servers, NULL);
	struct probe p;
	bool first1 = false, first2 = false;
	for (int i = 0; i < 40; i++) {
		assert_int_equal(lookup(&h, false, "Multi.TEST.", &p), 0);
		assert_int_equal(p.status, DNS_OK);
		assert_false(p.implicit);
		assert_string_equal(p.name, "multi.test");
		assert_string_equal(p.error, "");
		assert_int_equal(p.nhosts, 3);
		assert_int_equal(p.hosts[0].pref, 10);
		assert_int_equal(p.hosts[1].pref, 10);
		assert_int_equal(p.hosts[2].pref, 20);
		assert_string_equal(p.hosts[2].name, "mx3.multi.test");
		first1 |= !strcmp(p.hosts[0].name, "mx1.multi.test");
		first2 |= !strcmp(p.hosts[0].name, "mx2.multi.test");
		const struct probe_host *m1 = find_host(&p, "mx1.multi.test");
		assert_non_null(m1);
		assert_int_equal(m1->naddr, 2);
		assert_string_equal(m1->addr[0], "2001:db8::1"); /* IPv6 first */
		assert_string_equal(m1->addr[1], "192.0.2.1");
		const struct probe_host *m2 = find_host(&p, "mx2.multi.test");
		assert_non_null(m2);
		assert_int_equal(m2->naddr, 1);
		assert_string_equal(m2->addr[0], "192.0.2.2");
		assert_true(p.ttl > 0 && p.ttl <= 300);
	}
	/* equal preferences come in both orders */
	assert_true(first1);
	assert_true(first2);
	struct dns_stats st = stats(&h);
	assert_int_equal(st.queries, 7); /* MX, then A and AAAA of three hosts */
	assert_int_equal(st.cache_hits, 39);
	harness_stop(&h);
}

static void test_implicit_mx(void **state)
{
	struct dnsmasq *d = *state;
	struct harness h = {0};
	harness_start(&h, d->servers, NULL);
	struct probe p;
	assert_int_equal(lookup(&h, false, "onlya.test", &p), 0);
	assert_int_equal(p.status, DNS_OK);
	assert_true(p.implicit);
	assert_int_equal(p.nhosts, 1);
	assert_string_equal(p.hosts[0].name, "onlya.test");
	assert_int_equal(p.hosts[0].pref, 0);
	assert_int_equal(p.hosts[0].naddr, 1);
	assert_string_equal(p.hosts[0].addr[0], "192.0.2.9");
	/* the absence of MX records is believed for negative_ttl_s at most */
	assert_true(p.ttl > 0 && p.ttl <= 60);
	harness_stop(&h);
}

static void test_failures(void **state)
{
	struct dnsmasq *d = *state;
	struct harness h = {0};
	harness_start(&h, d->servers, NULL);
	static const struct {
		const char *name;
		bool host;
		enum dns_status want;
		unsigned nhosts;
	} cases[] = {
		{"nullmx.test", false, DNS_NULLMX, 0},
		{"nx.test", false, DNS_NXDOMAIN, 0},
		{"nx.test", true, DNS_NXDOMAIN, 1},
		{"txtonly.test", false, DNS_NODATA, 1}, /* no MX, and no address of its own */
		{"txtonly.test", true, DNS_NODATA, 1},
		{"noaddr.test", false, DNS_NODATA, 1},  /* its only MX host does not exist */
	};
	for (unsigned i = 0; i < ARRAY_SIZE(cases); i++) {
		struct probe p;
		assert_int_equal(lookup(&h, cases[i].host, cases[i].name, &p), 0);
		if (p.status != cases[i].want)
			fail_msg("%s: status %s, want %s (%s)", cases[i].name, dns_status_str(p.status),
				 dns_status_str(cases[i].want), p.error);
		assert_int_equal(p.nhosts, cases[i].nhosts);
		assert_true(p.error[0] != '\0');
		for (unsigned k = 0; k < p.nhosts; k++)
			assert_int_equal(p.hosts[k].naddr, 0);
	}
	/* negative answers are cached */
	struct dns_stats before = stats(&h);
	struct probe p;
	assert_int_equal(lookup(&h, false, "nx.test", &p), 0);
	assert_int_equal(p.status, DNS_NXDOMAIN);
	struct dns_stats after = stats(&h);
	assert_int_equal(after.queries, before.queries);
	assert_int_equal(after.cache_hits, before.cache_hits + 1);
	harness_stop(&h);
}

static void test_mx_hosts_partial(void **state)
{
	struct dnsmasq *d = *state;
	struct harness h = {0};
	harness_start(&h, d->servers, NULL);
	struct probe p;
	/* one MX host has no address: kept, with none; the other is usable */
	assert_int_equal(lookup(&h, false, "partial.test", &p), 0);
	assert_int_equal(p.status, DNS_OK);
	assert_int_equal(p.nhosts, 2);
	assert_string_equal(p.hosts[0].name, "ghost.test");
	assert_int_equal(p.hosts[0].naddr, 0);
	assert_string_equal(p.hosts[1].name, "mx2.multi.test");
	assert_int_equal(p.hosts[1].naddr, 1);
	/* an IP literal in MX data is taken as the address */
	assert_int_equal(lookup(&h, false, "literal.test", &p), 0);
	assert_int_equal(p.status, DNS_OK);
	assert_int_equal(p.nhosts, 1);
	assert_int_equal(p.hosts[0].naddr, 1);
	assert_string_equal(p.hosts[0].addr[0], "192.0.2.50");
	/* MX targets are lower-cased */
	assert_int_equal(lookup(&h, false, "upper.test", &p), 0);
	assert_int_equal(p.status, DNS_OK);
	assert_string_equal(p.hosts[0].name, "mx3.multi.test");
	assert_string_equal(p.hosts[0].addr[0], "192.0.2.3");
	harness_stop(&h);
}

/* An answer too big for UDP: c-ares retries over TCP (polled for POLLOUT, then POLLIN). */
static void test_big_answer_tcp(void **state)
{
	struct dnsmasq *d = *state;
	struct harness h = {0};
	harness_start(&h, d->servers, NULL);
	struct probe p;
	assert_int_equal(lookup(&h, false, "big.test", &p), 0);
	if (p.status != DNS_OK)
		fail_msg("big.test: %s: %s", dns_status_str(p.status), p.error);
	assert_int_equal(p.nhosts, DNS_MAX_HOSTS); /* the 16 most preferred */
	assert_string_equal(p.hosts[0].name, "mx00-a-rather-long-label-to-fill-the-answer.big.test");
	assert_int_equal(p.hosts[0].naddr, 1);
	for (unsigned i = 1; i < p.nhosts; i++) {
		assert_int_equal(p.hosts[i].pref, i + 1);
		assert_int_equal(p.hosts[i].naddr, 0);
	}
	harness_stop(&h);
}

static void test_resolve_host(void **state)
{
	struct dnsmasq *d = *state;
	struct harness h = {0};
	harness_start(&h, d->servers, NULL);
	struct probe p;
	assert_int_equal(lookup(&h, true, "mx1.multi.test", &p), 0);
	assert_int_equal(p.status, DNS_OK);
	assert_false(p.implicit);
	assert_int_equal(p.nhosts, 1);
	assert_string_equal(p.hosts[0].name, "mx1.multi.test");
	assert_int_equal(p.hosts[0].naddr, 2);
	assert_string_equal(p.hosts[0].addr[0], "2001:db8::1");
	assert_string_equal(p.hosts[0].addr[1], "192.0.2.1");
	/* literals are answered without a query, still from the loop */
	struct dns_stats before = stats(&h);
	assert_int_equal(lookup(&h, true, "192.0.2.77", &p), 0);
	assert_int_equal(p.status, DNS_OK);
	assert_string_equal(p.hosts[0].addr[0], "192.0.2.77");
	assert_int_equal(lookup(&h, true, "::1", &p), 0);
	assert_string_equal(p.hosts[0].addr[0], "::1");
	assert_int_equal(stats(&h).queries, before.queries);
	/* names that cannot be domains */
	char label64[80];
	memset(label64, 'a', 64);
	strcpy(label64 + 64, ".test");
	const char *bad[] = {"", ".", "a..test", "sp ace.test", "back\\slash.test", label64};
	for (unsigned i = 0; i < ARRAY_SIZE(bad); i++) {
		assert_int_equal(lookup(&h, false, bad[i], &p), -EINVAL);
		assert_int_equal(lookup(&h, true, bad[i], &p), -EINVAL);
	}
	harness_stop(&h);
}

/* Five identical lookups at once: one set of queries, five answers; a sixth from the cache. */
struct burst {
	struct probe p[6];
	int rc[6];
};

static void job_burst(struct harness *h, void *arg)
{
	struct burst *b = arg;
	in_resolve = true;
	for (int i = 0; i < 5; i++) {
		b->p[i].h = h;
		b->rc[i] = dns_resolve_mx(h->r, "multi.test", probe_cb, &b->p[i]);
	}
	in_resolve = false;
}

static void test_coalesce_and_cache(void **state)
{
	struct dnsmasq *d = *state;
	struct harness h = {0};
	harness_start(&h, d->servers, NULL);
	struct burst b;
	memset(&b, 0, sizeof(b));
	on_worker(&h, job_burst, &b);
	for (int i = 0; i < 5; i++) {
		assert_int_equal(b.rc[i], 0);
		wait_probe(&b.p[i], 1);
		assert_int_equal(b.p[i].status, DNS_OK);
		assert_int_equal(b.p[i].nhosts, 3);
	}
	struct dns_stats st = stats(&h);
	assert_int_equal(st.queries, 7);
	assert_int_equal(st.coalesced, 4);
	assert_int_equal(st.cache_hits, 0);
	/* the hosts' address answers are shared with host lookups */
	assert_int_equal(lookup(&h, true, "mx2.multi.test", &b.p[5]), 0);
	assert_int_equal(b.p[5].status, DNS_OK);
	st = stats(&h);
	assert_int_equal(st.queries, 7);
	assert_int_equal(st.cache_hits, 1);
	assert_int_equal(st.cache_entries, 4); /* one MX answer, three host answers */
	harness_stop(&h);
}

static void small_cache(struct dns_config *c)
{
	c->cache_max = 2;
}

static void test_cache_bound(void **state)
{
	struct dnsmasq *d = *state;
	struct harness h = {0};
	harness_start(&h, d->servers, small_cache);
	struct probe p;
	assert_int_equal(lookup(&h, true, "mx1.multi.test", &p), 0);
	assert_int_equal(lookup(&h, true, "mx2.multi.test", &p), 0);
	assert_int_equal(lookup(&h, true, "mx3.multi.test", &p), 0);
	struct dns_stats st = stats(&h);
	assert_int_equal(st.cache_entries, 2);
	assert_int_equal(st.queries, 6);
	/* the oldest (mx1) was evicted, mx3 is still there */
	assert_int_equal(lookup(&h, true, "mx3.multi.test", &p), 0);
	assert_int_equal(stats(&h).queries, 6);
	assert_int_equal(lookup(&h, true, "mx1.multi.test", &p), 0);
	assert_int_equal(stats(&h).queries, 8);
	harness_stop(&h);
}

/* TTL 1 s: a second lookup within the TTL is a hit, one after it asks the server again */
static void test_ttl_expiry(void **state)
{
	struct dnsmasq *d = *state;
	struct harness h = {0};
	harness_start(&h, d->servers, NULL);
	struct probe p;
	assert_int_equal(lookup(&h, false, "multi.test", &p), 0);
	assert_int_equal(p.status, DNS_OK);
	assert_int_equal(p.ttl, 1);
	struct dns_stats st = stats(&h);
	assert_int_equal(st.queries, 7);
	assert_int_equal(lookup(&h, false, "multi.test", &p), 0);
	st = stats(&h);
	if (st.queries == 7)
		assert_int_equal(st.cache_hits, 1);
	/* (a slow machine may have let the second one expire already: not an error) */
	uint64_t q = st.queries;
	usleep(1300 * 1000);
	assert_int_equal(lookup(&h, false, "multi.test", &p), 0);
	assert_int_equal(p.status, DNS_OK);
	assert_int_equal(p.nhosts, 3);
	assert_int_equal(stats(&h).queries, q + 7);
	harness_stop(&h);
}

static void test_tempfail_refused(void **state)
{
	(void)state;
	char servers[64];
	snprintf(servers, sizeof(servers), "127.0.0.1:%u", free_port(NULL)); /* nothing listens */
	struct harness h = {0};
	harness_start(&h, servers, NULL);
	struct probe p;
	uint64_t t0 = clock_ms();
	assert_int_equal(lookup(&h, false, "example.test", &p), 0);
	assert_int_equal(p.status, DNS_TEMPFAIL);
	assert_true(p.error[0] != '\0');
	assert_int_equal(p.ttl, 0);
	assert_true(clock_ms() - t0 < 8000);
	assert_int_equal(lookup(&h, true, "host.test", &p), 0);
	assert_int_equal(p.status, DNS_TEMPFAIL);
	/* not cached: asked again */
	uint64_t q = stats(&h).queries;
	assert_int_equal(lookup(&h, false, "example.test", &p), 0);
	assert_int_equal(p.status, DNS_TEMPFAIL);
	assert_int_equal(stats(&h).queries, q + 1);
	harness_stop(&h);
}

static void fast_timeout(struct dns_config *c)
{
	c->timeout_ms = 200;
	c->tries = 1;
}

static void test_tempfail_timeout(void **state)
{
	(void)state;
	int hole;
	char servers[64];
	snprintf(servers, sizeof(servers), "127.0.0.1:%u", free_port(&hole)); /* never answers */
	struct harness h = {0};
	harness_start(&h, servers, fast_timeout);
	struct probe p;
	uint64_t t0 = clock_ms();
	assert_int_equal(lookup(&h, false, "example.test", &p), 0);
	uint64_t took = clock_ms() - t0;
	assert_int_equal(p.status, DNS_TEMPFAIL);
	assert_true(strstr(p.error, "example.test") != NULL);
	assert_true(took >= 150 && took < 5000);
	harness_stop(&h);
	close(hole);
}

/* Freeing the resolver cancels: from a job, from a callback, and at engine stop (fini). */
struct cancel_job {
	struct probe a, b;
	int rc_a, rc_b;
	int rc_after;
};

static void job_two_then_free(struct harness *h, void *arg)
{
	struct cancel_job *c = arg;
	c->a.h = c->b.h = h;
	c->rc_a = dns_resolve_mx(h->r, "example.test", probe_cb, &c->a);
	c->rc_b = dns_resolve_host(h->r, "192.0.2.1", probe_cb, &c->b); /* answer queued */
	dns_resolver_free(&h->r); /* both are cancelled in here */
	assert_null(h->r);
	dns_resolver_free(&h->r); /* NULL is fine */
}

static void test_free_cancels(void **state)
{
	(void)state;
	int hole;
	char servers[64];
	snprintf(servers, sizeof(servers), "127.0.0.1:%u", free_port(&hole));
	struct harness h = {0};
	harness_start(&h, servers, NULL);
	struct cancel_job c;
	memset(&c, 0, sizeof(c));
	on_worker(&h, job_two_then_free, &c);
	assert_int_equal(c.rc_a, 0);
	assert_int_equal(c.rc_b, 0);
	/* both ran inside dns_resolver_free, once */
	assert_int_equal(c.a.calls, 1);
	assert_int_equal(c.a.status, DNS_CANCELLED);
	assert_string_equal(c.a.name, "example.test");
	assert_int_equal(c.b.calls, 1);
	assert_int_equal(c.b.status, DNS_CANCELLED);
	harness_stop(&h);
	close(hole);
}

static void job_start_only(struct harness *h, void *arg)
{
	struct probe *p = arg;
	p->h = h;
	assert_int_equal(dns_resolve_mx(h->r, "example.test", probe_cb, p), 0);
}

static void test_free_at_stop(void **state)
{
	(void)state;
	int hole;
	char servers[64];
	snprintf(servers, sizeof(servers), "127.0.0.1:%u", free_port(&hole));
	struct harness h = {0};
	harness_start(&h, servers, NULL);
	struct probe p;
	memset(&p, 0, sizeof(p));
	on_worker(&h, job_start_only, &p);
	usleep(50 * 1000); /* the query is out, its socket polled */
	assert_int_equal(p.calls, 0);
	harness_stop(&h); /* the fini hook frees the resolver */
	assert_int_equal(p.calls, 1);
	assert_int_equal(p.status, DNS_CANCELLED);
	close(hole);
}

struct cb_free_job {
	struct probe p[3];
};

static void job_free_from_callback(struct harness *h, void *arg)
{
	struct cb_free_job *c = arg;
	for (int i = 0; i < 3; i++) {
		c->p[i].h = h;
		assert_int_equal(dns_resolve_host(h->r, "192.0.2.1", probe_cb, &c->p[i]), 0);
	}
	c->p[0].free_resolver = true; /* the first answer's callback frees the resolver */
}

static void test_free_from_callback(void **state)
{
	(void)state;
	struct harness h = {0};
	harness_start(&h, "127.0.0.1:9", NULL); /* never asked */
	struct cb_free_job c;
	memset(&c, 0, sizeof(c));
	on_worker(&h, job_free_from_callback, &c);
	wait_probe(&c.p[0], 1);
	wait_probe(&c.p[1], 1);
	wait_probe(&c.p[2], 1);
	assert_int_equal(c.p[0].status, DNS_OK);
	assert_int_equal(c.p[1].status, DNS_CANCELLED);
	assert_int_equal(c.p[2].status, DNS_CANCELLED);
	harness_stop(&h);
}

static void test_bad_servers(void **state)
{
	(void)state;
	struct dns_config cfg;
	dns_config_default(&cfg);
	cfg.servers = "not an address";
	char err[256] = "";
	/* creation needs no running loop: only the worker pointer is kept */
	assert_null(dns_resolver_new(NULL, &cfg, err, sizeof(err)));
	assert_true(strstr(err, "not an address") != NULL);
	assert_string_equal(dns_status_str(DNS_NULLMX), "null MX");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_mx_order, dnsmasq_setup, dnsmasq_teardown),
		cmocka_unit_test_setup_teardown(test_implicit_mx, dnsmasq_setup, dnsmasq_teardown),
		cmocka_unit_test_setup_teardown(test_failures, dnsmasq_setup, dnsmasq_teardown),
		cmocka_unit_test_setup_teardown(test_mx_hosts_partial, dnsmasq_setup, dnsmasq_teardown),
		cmocka_unit_test_setup_teardown(test_resolve_host, dnsmasq_setup, dnsmasq_teardown),
		cmocka_unit_test_setup_teardown(test_big_answer_tcp, dnsmasq_setup, dnsmasq_teardown),
		cmocka_unit_test_setup_teardown(test_coalesce_and_cache, dnsmasq_setup,
						dnsmasq_teardown),
		cmocka_unit_test_setup_teardown(test_cache_bound, dnsmasq_setup, dnsmasq_teardown),
		cmocka_unit_test_setup_teardown(test_ttl_expiry, dnsmasq_setup_ttl1, dnsmasq_teardown),
		cmocka_unit_test(test_tempfail_refused),
		cmocka_unit_test(test_tempfail_timeout),
		cmocka_unit_test(test_free_cancels),
		cmocka_unit_test(test_free_at_stop),
		cmocka_unit_test(test_free_from_callback),
		cmocka_unit_test(test_bad_servers),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
