/*
 * libFuzzer target for core/config and the posthaste keys (mta/posthaste/config).
 *
 * The input is a configuration file. It is parsed twice: by config_parse_buffer
 * with a callback that hands every entry to ph_config_set and to each typed
 * helper (whose results must format and parse back to themselves), and by
 * ph_config_load_buffer over the defaults. Both must agree on success, every
 * error must name the file, and a configuration that loaded must print as a
 * file that loads back to an equal configuration (the same listeners, and
 * every octet after them equal). Every value also goes to ph_hosts_parse and
 * ph_networks_parse (each network parsed must hold its own address, also as
 * a socket reports it), and the delivery helpers must find each route,
 * destination, local and relay domain.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/config.h"
#include "mta/posthaste/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void fuzz_hosts(const char *v)
{
	struct ph_hostport hp[PH_HOSTS_MAX];
	char err[256];
	int n;

	err[0] = '\0';
	n = ph_hosts_parse(v, hp, PH_HOSTS_MAX, err, sizeof(err));
	if (n < 0) {
		if (n != -1 || !err[0])
			abort();
		return;
	}
	if (n < 1 || n > PH_HOSTS_MAX ||
	    ph_hosts_parse(v, NULL, PH_HOSTS_MAX, err, sizeof(err)) != n)
		abort();
	for (int i = 0; i < n; i++)
		if (!hp[i].host[0] ||
		    strnlen(hp[i].host, sizeof(hp[i].host)) == sizeof(hp[i].host) ||
		    hp[i].port == 0 || strpbrk(hp[i].host, " ,[]"))
			abort();
}

/* Whether nets[0..n) hold addr (of family) as an AF_INET/AF_INET6 socket reports it. */
static bool fuzz_match(const struct ph_net *nets, unsigned n, int family, const uint8_t *addr)
{
	struct sockaddr_storage ss;

	memset(&ss, 0, sizeof(ss));
	if (family == AF_INET) {
		struct sockaddr_in *sin = (struct sockaddr_in *)&ss;

		sin->sin_family = AF_INET;
		memcpy(&sin->sin_addr, addr, 4);
	} else {
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;

		sin6->sin6_family = AF_INET6;
		memcpy(&sin6->sin6_addr, addr, 16);
	}
	return ph_networks_match(nets, n, &ss);
}

static void fuzz_networks(const char *v)
{
	static const uint8_t zero[16];
	struct ph_net nets[PH_NETWORKS_MAX];
	char err[256];
	int n;

	err[0] = '\0';
	n = ph_networks_parse(v, nets, PH_NETWORKS_MAX, err, sizeof(err));
	if (n < 0) {
		if (n != -1 || !err[0] ||
		    ph_networks_parse(v, NULL, PH_NETWORKS_MAX, err, sizeof(err)) != -1)
			abort();
		return;
	}
	if (n > PH_NETWORKS_MAX || ph_networks_parse(v, NULL, PH_NETWORKS_MAX, err, sizeof(err)) != n)
		abort();
	for (int i = 0; i < n; i++) {
		const struct ph_net *net = &nets[i];
		unsigned bits = net->family == AF_INET ? 32 : 128;
		uint8_t mapped[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

		if ((net->family != AF_INET && net->family != AF_INET6) || net->prefix > bits ||
		    (net->family == AF_INET && memcmp(net->addr + 4, zero, 12) != 0))
			abort();
		for (unsigned b = net->prefix; b < bits; b++)
			if (net->addr[b / 8] & (0x80u >> (b % 8)))
				abort();
		/* a network holds its own address; an IPv4 one also in its mapped form */
		if (!fuzz_match(net, 1, net->family, net->addr) ||
		    !fuzz_match(nets, (unsigned)n, net->family, net->addr))
			abort();
		if (net->family == AF_INET) {
			memcpy(mapped + 12, net->addr, 4);
			if (!fuzz_match(net, 1, AF_INET6, mapped))
				abort();
		}
		/* and not the address that differs in the last bit of the prefix */
		if (net->prefix > 0) {
			uint8_t next[16];
			unsigned k = net->prefix - 1;

			memcpy(next, net->addr, 16);
			next[k / 8] ^= (uint8_t)(0x80u >> (k % 8)); /* flip the last prefix bit */
			if (fuzz_match(net, 1, net->family, next))
				abort();
		}
	}
}

static void fuzz_helpers(const char *v)
{
	char err[256], buf[32], host[64];
	uint64_t n, m;
	uint16_t port;
	unsigned u;
	bool b;

	if (config_size(v, &n, err, sizeof(err)) == 0) {
		config_size_format(n, buf, sizeof(buf));
		if (config_size(buf, &m, err, sizeof(err)) != 0 || m != n)
			abort();
	} else if (!err[0]) {
		abort();
	}
	if (config_duration_ms(v, &n, err, sizeof(err)) == 0) {
		config_duration_format(n, buf, sizeof(buf));
		if (config_duration_ms(buf, &m, err, sizeof(err)) != 0 || m != n)
			abort();
	} else if (!err[0]) {
		abort();
	}
	if (config_bool(v, &b, err, sizeof(err)) != 0 && !err[0])
		abort();
	fuzz_hosts(v);
	fuzz_networks(v);
	if (config_uint(v, 3, 1000, &u, err, sizeof(err)) == 0 && (u < 3 || u > 1000))
		abort();
	if (config_hostport(v, host, sizeof(host), &port, err, sizeof(err)) == 0) {
		if (!host[0] || strlen(host) >= sizeof(host) || strchr(host, ']'))
			abort();
	} else if (!err[0]) {
		abort();
	}
}

struct fuzz_state {
	struct ph_config c;
	bool listen_seen;
	unsigned last_line;
};

static int fuzz_entry(void *arg, const char *key, const char *value, unsigned line, char *err,
                      size_t errlen)
{
	struct fuzz_state *st = arg;

	if (!key[0] || line <= st->last_line || strlen(key) > CONFIG_LINE_MAX ||
	    strlen(value) > CONFIG_LINE_MAX)
		abort();
	for (const char *k = key; *k; k++)
		if (*k >= 'A' && *k <= 'Z')
			abort();
	st->last_line = line;
	fuzz_helpers(value);
	if (!st->listen_seen && strcmp(key, "listen") == 0) {
		st->c.nlisten = 0;
		st->listen_seen = true;
	}
	return ph_config_set(&st->c, key, value, err, errlen);
}

static bool fuzz_equal(const struct ph_config *a, const struct ph_config *b)
{
	size_t tail = offsetof(struct ph_config, nlisten);

	if (a->nlisten != b->nlisten)
		return false;
	for (unsigned i = 0; i < a->nlisten; i++)
		if (strcmp(a->listen[i].host, b->listen[i].host) != 0 ||
		    a->listen[i].port != b->listen[i].port)
			return false;
	return memcmp((const char *)a + tail, (const char *)b + tail, sizeof(*a) - tail) == 0;
}

/* The delivery helpers find what the configuration holds. */
static void fuzz_lookups(const struct ph_config *c)
{
	const char *p = c->local_domains;
	char err[256];

	for (unsigned i = 0; i < c->nroutes; i++)
		if (ph_config_route_for(c, c->routes[i].domain) != c->routes[i].hosts)
			abort();
	for (unsigned i = 0; i < c->ndests; i++)
		if (ph_config_limits_for(c, c->dests[i].domain) != &c->dests[i].lim)
			abort();
	while (*p) {
		size_t n = strcspn(p, ",");

		if (n == 0 || !ph_config_is_local(c, p, n))
			abort();
		p += n + (p[n] == ',');
	}
	for (p = c->relay_domains; *p;) {
		size_t n = strcspn(p, ",");

		if (n == 0 || !ph_config_is_relay_domain(c, p, n))
			abort();
		p += n + (p[n] == ',');
	}
	/* mynetworks is stored in a form its parser reads */
	if (ph_networks_parse(c->mynetworks, NULL, PH_NETWORKS_MAX, err, sizeof(err)) < 0 ||
	    (c->mynetworks[0] && strpbrk(c->mynetworks, " \t[]")))
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const char name[] = "fuzz.conf";
	struct fuzz_state st;
	struct ph_config c, again;
	char err[512], err2[512];
	char *copy, *out = NULL;
	size_t outlen = 0;
	int r1, r2, chk;
	FILE *f;

	/* an exact-size heap copy: ASan sees any read past the end */
	copy = malloc(size ? size : 1);
	if (!copy)
		return 0;
	memcpy(copy, data, size);

	memset(&st, 0, sizeof(st));
	ph_config_default(&st.c);
	err[0] = '\0';
	r1 = config_parse_buffer(name, copy, size, fuzz_entry, &st, err, sizeof(err));
	if (r1 != 0 && (r1 != -1 || strncmp(err, "fuzz.conf:", 10) != 0))
		abort();

	ph_config_default(&c);
	err2[0] = '\0';
	r2 = ph_config_load_buffer(&c, name, copy, size, err2, sizeof(err2));
	free(copy);
	if (r1 != r2 || (r2 == 0 && !fuzz_equal(&c, &st.c)) || (r2 < 0 && strcmp(err, err2) != 0))
		abort();
	if (r2 < 0)
		return 0;

	chk = ph_config_check(&c, err, sizeof(err));
	if (chk != 0 && (chk != -1 || !err[0]))
		abort();
	fuzz_lookups(&c);

	f = open_memstream(&out, &outlen);
	if (!f)
		return 0;
	ph_config_print(&c, f);
	if (fclose(f) != 0) {
		free(out);
		return 0;
	}
	ph_config_default(&again);
	if (ph_config_load_buffer(&again, "printed", out, outlen, err, sizeof(err)) != 0) {
		fprintf(stderr, "printed configuration does not load: %s\n%s", err, out);
		abort();
	}
	if (!fuzz_equal(&c, &again) || ph_config_check(&again, err, sizeof(err)) != chk) {
		fprintf(stderr, "printed configuration differs:\n%s", out);
		abort();
	}
	free(out);
	return 0;
}
