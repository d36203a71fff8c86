#include "mta/posthaste/config.h"

#include <arpa/inet.h>
#include <limits.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/compiler.h"
#include "core/config.h"

#define DAY_MS (24ull * 3600 * 1000)

enum ph_key_type {
	PH_K_LISTEN,
	PH_K_LISTEN1,  /* struct ph_listen: one listener, host "" = none */
	PH_K_PATH,     /* char[size]; min: 1 when it may not be empty */
	PH_K_HOSTNAME, /* char[size] */
	PH_K_DURABILITY,
	PH_K_LOG_LEVEL,
	PH_K_UINT,     /* unsigned in [min, max] */
	PH_K_SIZE,     /* uint64_t octets in [min, max] */
	PH_K_DURATION, /* uint64_t milliseconds in [min, max] */
	PH_K_BOOL,
	PH_K_RATE,     /* struct ph_rate; its period (per_ms) in [min, max] */
	PH_K_TLS,      /* unsigned enum ph_tls: none, may, require */
	PH_K_TLS_VERIFY, /* unsigned enum ph_tls_verify: none, name */
	PH_K_RESOLVER, /* char[size]: IP:PORT list, normalised */
	PH_K_HOSTS,    /* char[size]: host list (ph_hosts_parse), normalised */
	PH_K_DOMAINS,  /* char[size]: domain list, normalised */
	PH_K_NETWORKS, /* char[size]: network list (ph_networks_parse), normalised */
	PH_K_ROUTES,   /* route.DOMAIN keys: routes[], nroutes */
	PH_K_DESTS,    /* destination.DOMAIN keys: dests[], ndests */
};

struct ph_key {
	const char *name;
	enum ph_key_type type;
	size_t off;  /* of the field in struct ph_config */
	size_t size; /* of a string field */
	uint64_t min, max;
	const char *zero_note; /* comment printed after an empty or zero value */
};

#define FIELD(f) offsetof(struct ph_config, f), sizeof(((struct ph_config *)0)->f)

/* Every key, in the order of docs/configuration.md and of ph_config_print. */
static const struct ph_key ph_keys[] = {
    {"listen", PH_K_LISTEN, FIELD(listen), 0, 0, NULL},
    {"spool_dir", PH_K_PATH, FIELD(spool_dir), 1, 0, NULL},
    {"durability", PH_K_DURABILITY, FIELD(durability), 0, 0, NULL},
    {"batch_interval", PH_K_DURATION, FIELD(batch_interval_ms), 1, 60 * 1000, NULL},
    {"workers", PH_K_UINT, FIELD(workers), 0, 256, "one per CPU"},
    {"hostname", PH_K_HOSTNAME, FIELD(hostname), 0, 0, "the system's host name"},
    {"message_size_limit", PH_K_SIZE, FIELD(message_size_limit), 1, UINT64_MAX, NULL},
    {"recipient_limit", PH_K_UINT, FIELD(recipient_limit), 1, 1000000, NULL},
    {"command_timeout", PH_K_DURATION, FIELD(command_timeout_ms), 1, DAY_MS, NULL},
    {"data_timeout", PH_K_DURATION, FIELD(data_timeout_ms), 1, DAY_MS, NULL},
    {"spool_reserve", PH_K_SIZE, FIELD(spool_reserve), 0, UINT64_MAX, "no reserve"},
    {"spool_direct_io", PH_K_BOOL, FIELD(spool_direct_io), 0, 0, NULL},
    {"control_socket", PH_K_PATH, FIELD(control_socket), 0, 0, NULL},
    {"discard", PH_K_BOOL, FIELD(discard), 0, 0, NULL},
    {"delivery", PH_K_BOOL, FIELD(delivery), 0, 0, NULL},
    {"log_level", PH_K_LOG_LEVEL, FIELD(log_level), 0, 0, NULL},
    {"max_queue_age", PH_K_DURATION, FIELD(max_queue_age_ms), 1000, 365 * DAY_MS, NULL},
    /* AUTH */
    {"smtp_auth", PH_K_BOOL, FIELD(smtp_auth), 0, 0, NULL},
    {"smtp_auth_required", PH_K_BOOL, FIELD(smtp_auth_required), 0, 0, NULL},
    {"smtp_auth_without_tls", PH_K_BOOL, FIELD(smtp_auth_without_tls), 0, 0, NULL},
    {"auth_threads", PH_K_UINT, FIELD(auth_threads), 0, 256, "half the CPUs, at least 1"},
    {"smtp_sender_login_check", PH_K_BOOL, FIELD(smtp_sender_login_check), 0, 0, NULL},
    /* TLS */
    {"tls_cert", PH_K_PATH, FIELD(tls_cert), 0, 0, "none: no STARTTLS"},
    {"tls_key", PH_K_PATH, FIELD(tls_key), 0, 0, "none"},
    {"submission_listen", PH_K_LISTEN1, FIELD(submission_listen), 0, 0, "none"},
    {"submissions_listen", PH_K_LISTEN1, FIELD(submissions_listen), 0, 0, "none"},
    /* per-client limits */
    {"client_connection_limit", PH_K_UINT, FIELD(client_connection_limit), 0, 1000000, "no limit"},
    {"client_connection_rate", PH_K_RATE, FIELD(client_connection_rate), 1, 365 * DAY_MS, NULL},
    {"client_message_rate", PH_K_RATE, FIELD(client_message_rate), 1, 365 * DAY_MS, NULL},
    {"client_limit_exempt_mynetworks", PH_K_BOOL, FIELD(client_limit_exempt_mynetworks), 0, 0,
     NULL},
    /* delivery */
    {"resolver", PH_K_RESOLVER, FIELD(resolver), 0, 0, "the system's resolv.conf"},
    {"smarthost", PH_K_HOSTS, FIELD(smarthost), 0, 0, "none: deliver by MX"},
    {"route", PH_K_ROUTES, FIELD(routes), 0, 0, NULL},
    {"local_domains", PH_K_DOMAINS, FIELD(local_domains), 0, 0, "none"},
    {"mynetworks", PH_K_NETWORKS, FIELD(mynetworks), 0, 0, "none: no client may relay"},
    {"relay_domains", PH_K_DOMAINS, FIELD(relay_domains), 0, 0, "none"},
    {"users_file", PH_K_PATH, FIELD(users_file), 0, 0, "none"},
    {"mailbox_root", PH_K_PATH, FIELD(mailbox_root), 1, 0, NULL},
    {"accounting_log", PH_K_PATH, FIELD(accounting_log), 1, 0, NULL},
    {"retry_min", PH_K_DURATION, FIELD(retry_min_ms), 10, DAY_MS, NULL},
    {"retry_max", PH_K_DURATION, FIELD(retry_max_ms), 10, 7 * DAY_MS, NULL},
    {"delay_warning_time", PH_K_DURATION, FIELD(delay_warning_ms), 0, 365 * DAY_MS, NULL},
    {"connect_timeout", PH_K_DURATION, FIELD(connect_timeout_ms), 1, DAY_MS, NULL},
    {"delivery_active_max", PH_K_UINT, FIELD(delivery_active_max), 1, 1000000, NULL},
    /* the default limits: "delivery_" + a destination's limit names */
    {"delivery_concurrency", PH_K_UINT, FIELD(limits.concurrency), 1, 10000, NULL},
    {"delivery_rate", PH_K_RATE, FIELD(limits.msg_rate), 1, 365 * DAY_MS, NULL},
    {"delivery_connection_rate", PH_K_RATE, FIELD(limits.conn_rate), 1, 365 * DAY_MS, NULL},
    {"delivery_messages_per_connection", PH_K_UINT, FIELD(limits.msgs_per_conn), 1, 1000000, NULL},
    {"delivery_idle_timeout", PH_K_DURATION, FIELD(limits.idle_timeout_ms), 1, DAY_MS, NULL},
    {"delivery_tls", PH_K_TLS, FIELD(limits.tls), 0, 0, NULL},
    {"delivery_tls_verify", PH_K_TLS_VERIFY, FIELD(limits.tls_verify), 0, 0, NULL},
    {"destination", PH_K_DESTS, FIELD(dests), 0, 0, NULL},
};

/* A destination's limits, in print order: each is the key "delivery_" + name. */
static const char *const ph_limit_names[] = {
    "concurrency", "rate", "connection_rate", "messages_per_connection", "idle_timeout",
    "tls", "verify", /* verify: the key delivery_tls_verify */
};

#define PH_LIMIT_NAMES                                                                             \
	"concurrency, rate, connection_rate, messages_per_connection, idle_timeout, tls or verify"
#define PH_DOMAIN_HINT "(letters, digits, '-' and '.')"
#define PH_RATE_HINT                                                                               \
	"(expected COUNT/UNIT such as 100/s or 5000/h, COUNT/DURATION such as 10/5s, or "          \
	"unlimited)"
#define DEFAULT_PORT 25

static const char *const ph_durability_names[] = {"fsync", "batch", "none"};
static const char *const ph_log_level_names[] = {"error", "warning", "info", "debug"};
static const char *const ph_tls_names[] = {"none", "may", "require"};        /* enum ph_tls */
static const char *const ph_tls_verify_names[] = {"none", "name"};          /* enum ph_tls_verify */

#define CONTROL_SOCKET_NAME "/control.sock"


void ph_config_default(struct ph_config *c)
{
	memset(c, 0, sizeof(*c));
	snprintf(c->listen[0].host, sizeof(c->listen[0].host), "127.0.0.1");
	c->listen[0].port = 2525;
	c->nlisten = 1;
	snprintf(c->spool_dir, sizeof(c->spool_dir), "./var/spool");
	c->durability = PH_DURABILITY_FSYNC;
	c->batch_interval_ms = 10;
	c->workers = 0;
	c->message_size_limit = 64ull << 20;
	c->recipient_limit = 1000;
	c->command_timeout_ms = 300 * 1000;
	c->data_timeout_ms = 180 * 1000;
	c->spool_reserve = 256ull << 20;
	c->spool_direct_io = true;
	c->discard = false;
	c->delivery = true;
	c->log_level = LOG_INFO;
	c->max_queue_age_ms = 5 * DAY_MS;
	c->smtp_sender_login_check = true;
	c->client_connection_limit = 50; /* Postfix's smtpd_client_connection_count_limit */
	c->client_limit_exempt_mynetworks = true;

	/* delivery: every string and list empty (the memset), except: */
	snprintf(c->mailbox_root, sizeof(c->mailbox_root), "./var/mail");
	snprintf(c->accounting_log, sizeof(c->accounting_log), "./var/log/accounting.jsonl");
	snprintf(c->mynetworks, sizeof(c->mynetworks), "127.0.0.0/8,::1/128"); /* loopback only */
	c->limits.concurrency = 20;
	c->limits.msg_rate.count = 0; /* unlimited */
	c->limits.msg_rate.per_ms = 0;
	c->limits.conn_rate.count = 0;
	c->limits.conn_rate.per_ms = 0;
	c->limits.msgs_per_conn = 100;
	c->limits.idle_timeout_ms = 5 * 1000;
	c->limits.tls = PH_TLS_MAY;
	c->limits.tls_verify = PH_TLS_VERIFY_NONE;
	c->retry_min_ms = 5 * 60 * 1000;
	c->retry_max_ms = 3600 * 1000;
	c->delay_warning_ms = 4 * 3600 * 1000; /* sendmail's Timeout.queuewarn; Postfix: off */
	c->connect_timeout_ms = 30 * 1000;
	c->delivery_active_max = 10000;
}

static const struct ph_key *ph_key_find(const char *name)
{
	for (size_t i = 0; i < ARRAY_SIZE(ph_keys); i++)
		if (strcmp(ph_keys[i].name, name) == 0)
			return &ph_keys[i];
	panic("ph_config: no key %s", name);
}

/* The key of a destination's limit ph_limit_names[i]. */
static const struct ph_key *ph_limit_key(size_t i)
{
	char name[64];

	snprintf(name, sizeof(name), "delivery_%s%s",
	         strcmp(ph_limit_names[i], "verify") == 0 ? "tls_" : "", ph_limit_names[i]);
	return ph_key_find(name);
}

/* Where the limit of key k (one of the delivery_* keys) is in l. */
static void *ph_limit_field(struct ph_limits *l, const struct ph_key *k)
{
	return (char *)l + (k->off - offsetof(struct ph_config, limits));
}

static bool ph_is_limit_key(const struct ph_key *k)
{
	return k->off >= offsetof(struct ph_config, limits) &&
	       k->off < offsetof(struct ph_config, limits) + sizeof(struct ph_limits);
}

/* ---- one value of each type: parse + range check (set), range check alone (check) ---- */

static int ph_listen_host_ok(const char *host)
{
	unsigned char a[16];

	return inet_pton(AF_INET, host, a) == 1 || inet_pton(AF_INET6, host, a) == 1;
}

/*
 * A string is written bare unless reading it back bare would change it: it is
 * empty, begins with '"' or '#', begins or ends with a space, or holds " #".
 */
static bool ph_needs_quotes(const char *s, size_t n)
{
	if (n == 0 || s[0] == '"' || s[0] == '#' || s[0] == ' ' || s[n - 1] == ' ')
		return true;
	for (size_t i = 1; i < n; i++)
		if (s[i] == '#' && s[i - 1] == ' ')
			return true;
	return false;
}

/* The length of s as ph_print_string writes it. */
static size_t ph_printed_len(const char *s, size_t n)
{
	size_t len = n;

	if (!ph_needs_quotes(s, n))
		return len;
	for (size_t i = 0; i < n; i++)
		len += s[i] == '"' || s[i] == '\\';
	return len + 2;
}

static int ph_path_check(const struct ph_key *k, const char *v, char *err, size_t errlen)
{
	size_t n = strnlen(v, k->size);

	if (n < k->min) {
		config_err(err, errlen, "%s: must not be empty", k->name);
		return -1;
	}
	if (n >= k->size) {
		config_err(err, errlen, "%s: longer than %zu octets", k->name, k->size - 1);
		return -1;
	}
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)v[i];
		if (ch < 0x20 || ch == 0x7f) {
			config_err(err, errlen, "%s: contains a control character", k->name);
			return -1;
		}
	}
	/* ph_config_print must be able to write it back on one line */
	if (strlen(k->name) + 3 + ph_printed_len(v, n) > CONFIG_LINE_MAX) {
		config_err(err, errlen,
		       "%s: too long to be written on one configuration line (%u octets)", k->name,
		       CONFIG_LINE_MAX);
		return -1;
	}
	return 0;
}

static bool ph_hostname_char(char ch)
{
	return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
	       ch == '-' || ch == '.' || ch == '_' || ch == ':' || ch == '[' || ch == ']';
}

static int ph_hostname_check(const struct ph_key *k, const char *v, char *err, size_t errlen)
{
	size_t n = strnlen(v, k->size);

	if (n >= k->size) {
		config_err(err, errlen, "%s: longer than %zu octets", k->name, k->size - 1);
		return -1;
	}
	for (size_t i = 0; i < n; i++) {
		if (!ph_hostname_char(v[i])) {
			config_err(err, errlen,
			       "%s: '%.64s' is not a host name (letters, digits, '-', '.', '_', "
			       "or an address literal in brackets)",
			       k->name, v);
			return -1;
		}
	}
	return 0;
}

/* Range check of a number; the value printed in the key's own units; name: the key as shown. */
static int ph_range_check(const struct ph_key *k, const char *name, uint64_t v, char *err,
                          size_t errlen)
{
	char a[32], lo[32], hi[32];

	if (v >= k->min && v <= k->max)
		return 0;
	if (k->type == PH_K_DURATION) {
		config_duration_format(v, a, sizeof(a));
		config_duration_format(k->min, lo, sizeof(lo));
		config_duration_format(k->max, hi, sizeof(hi));
	} else if (k->type == PH_K_SIZE) {
		config_size_format(v, a, sizeof(a));
		config_size_format(k->min, lo, sizeof(lo));
		config_size_format(k->max, hi, sizeof(hi));
	} else {
		snprintf(a, sizeof(a), "%llu", (unsigned long long)v);
		snprintf(lo, sizeof(lo), "%llu", (unsigned long long)k->min);
		snprintf(hi, sizeof(hi), "%llu", (unsigned long long)k->max);
	}
	config_err(err, errlen, "%s: %s is out of range (%s to %s)", name, a, lo, hi);
	return -1;
}

/* ---- delivery values: rates, domains, host lists ---- */

static bool ph_blank(char ch)
{
	return ch == ' ' || ch == '\t';
}

static bool ph_alnum(char ch)
{
	return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9');
}

static char ph_lower(char ch)
{
	return (char)(ch >= 'A' && ch <= 'Z' ? ch - 'A' + 'a' : ch);
}

/* A domain or host name: dot-separated labels of 1-63 letters, digits and '-'; 255 octets at most.
 */
static bool ph_domain_ok(const char *s, size_t n)
{
	size_t label = 0;

	if (n == 0 || n > 255)
		return false;
	for (size_t i = 0; i < n; i++) {
		if (s[i] == '.') {
			if (label == 0)
				return false;
			label = 0;
		} else if (ph_alnum(s[i]) || s[i] == '-') {
			if (++label > 63)
				return false;
		} else {
			return false;
		}
	}
	return label > 0;
}

static bool ph_ip_ok(const char *host, bool v6)
{
	unsigned char a[16];

	return inet_pton(AF_INET, host, a) == 1 || (v6 && inet_pton(AF_INET6, host, a) == 1);
}

/*
 * COUNT/UNIT (100/s: UNIT one of ms, s, m, h, d), COUNT/DURATION (10/5s), or
 * "0" / "unlimited" (also COUNT 0): {0, 0}. The period must be in [min, max].
 */
static int ph_rate_parse(const char *v, uint64_t min, uint64_t max, struct ph_rate *out, char *why,
                         size_t whylen)
{
	const char *slash = strchr(v, '/'), *per;
	char buf[32], lo[32], hi[32], p[32];
	uint64_t n = 0, ms;
	bool over = false;
	size_t plen;

	if (strcmp(v, "0") == 0 || strcasecmp(v, "unlimited") == 0) {
		out->count = 0;
		out->per_ms = 0;
		return 0;
	}
	if (!slash || slash == v)
		goto bad;
	for (const char *q = v; q < slash; q++) {
		if (*q < '0' || *q > '9')
			goto bad;
		n = n * 10 + (uint64_t)(*q - '0');
		if (n > UINT32_MAX) {
			over = true;
			n = UINT32_MAX + 1ull;
		}
	}
	per = slash + 1;
	plen = strlen(per);
	/* a unit is required: "10/5" is not 10 per 5 seconds */
	if (plen == 0 || plen >= sizeof(buf) - 1 || per[plen - 1] < 'a' || per[plen - 1] > 'z')
		goto bad;
	snprintf(buf, sizeof(buf), "%s%s", per[0] >= '0' && per[0] <= '9' ? "" : "1", per);
	if (config_duration_ms(buf, &ms, NULL, 0) < 0)
		goto bad;
	if (over) {
		config_err(why, whylen, "rate '%.64s': count above %u", v, UINT32_MAX);
		return -1;
	}
	if (ms < min || ms > max) {
		config_duration_format(ms, p, sizeof(p));
		config_duration_format(min, lo, sizeof(lo));
		config_duration_format(max, hi, sizeof(hi));
		config_err(why, whylen, "rate '%.64s': the period %s is out of range (%s to %s)", v,
		           p, lo, hi);
		return -1;
	}
	out->count = (uint32_t)n;
	out->per_ms = n ? ms : 0;
	return 0;
bad:
	config_err(why, whylen, "invalid rate '%.64s%s' " PH_RATE_HINT, v,
	           strlen(v) > 64 ? "..." : "");
	return -1;
}

/* "unlimited", or COUNT/UNIT when the period is one unit ("100/s"), else COUNT/DURATION. */
static void ph_rate_format(const struct ph_rate *r, char *buf, size_t len)
{
	char d[32];

	if (r->count == 0) {
		snprintf(buf, len, "unlimited");
		return;
	}
	config_duration_format(r->per_ms, d, sizeof(d));
	snprintf(buf, len, "%u/%s", r->count,
	         d[0] == '1' && d[1] >= 'a' && d[1] <= 'z' && !d[2] ? d + 1 : d);
}

static int ph_rate_check(const struct ph_key *k, const char *name, const struct ph_rate *r,
                         char *err, size_t errlen)
{
	if (r->count == 0 && r->per_ms == 0)
		return 0;
	if (r->count == 0) {
		config_err(err, errlen, "%s: invalid rate (count 0 with a period)", name);
		return -1;
	}
	return ph_range_check(
	    &(struct ph_key){.name = k->name, .type = PH_K_DURATION, .min = k->min, .max = k->max},
	    name, r->per_ms, err, errlen);
}

/* One entry of a host list: s, n octets without surrounding blanks. */
static int ph_hostport_parse(const char *s, size_t n, struct ph_hostport *hp, char *err,
                             size_t errlen)
{
	const char *port = NULL, *end = s + n;
	char host[256];
	size_t hlen;
	int show = (int)MIN(n, 64);

	memset(hp, 0, sizeof(*hp));
	if (s[0] == '[') {
		const char *close = memchr(s, ']', n);

		if (!close) {
			config_err(err, errlen, "'%.*s': no closing ']'", show, s);
			return -1;
		}
		hlen = (size_t)(close - s - 1);
		if (hlen >= 64)
			goto bad_literal;
		memcpy(host, s + 1, hlen);
		host[hlen] = '\0';
		if (!ph_ip_ok(host, true)) {
		bad_literal:
			config_err(err, errlen, "'%.*s': '%.*s' is not an IPv4 or IPv6 address",
			           show, s, (int)MIN(hlen, 64), s + 1);
			return -1;
		}
		if (close + 1 < end && close[1] != ':') {
			config_err(err, errlen, "'%.*s': expected ':PORT' after ']'", show, s);
			return -1;
		}
		if (close + 1 < end)
			port = close + 2;
		hp->literal = true;
	} else {
		const char *colon = memchr(s, ':', n);

		if (colon && memchr(colon + 1, ':', (size_t)(end - colon - 1))) {
			config_err(err, errlen,
			           "'%.*s': an IPv6 address goes in brackets ([::1] or [::1]:25)",
			           show, s);
			return -1;
		}
		hlen = colon ? (size_t)(colon - s) : n;
		if (hlen == 0) {
			config_err(err, errlen, "'%.*s': empty host", show, s);
			return -1;
		}
		if (!ph_domain_ok(s, hlen)) {
			config_err(err, errlen,
			           "'%.*s': '%.*s' is not a host name " PH_DOMAIN_HINT
			           " or an IP address",
			           show, s, (int)MIN(hlen, 64), s);
			return -1;
		}
		memcpy(host, s, hlen);
		host[hlen] = '\0';
		hp->literal = ph_ip_ok(host, false);
		if (colon)
			port = colon + 1;
	}
	memcpy(hp->host, host, hlen + 1);
	hp->port = DEFAULT_PORT;
	if (port) {
		unsigned p = 0;

		if (port == end || end - port > 5)
			goto bad_port;
		for (const char *q = port; q < end; q++) {
			if (*q < '0' || *q > '9')
				goto bad_port;
			p = p * 10 + (unsigned)(*q - '0');
		}
		if (p == 0 || p > 65535) {
		bad_port:
			config_err(err, errlen, "'%.*s': invalid port (1 to 65535)", show, s);
			return -1;
		}
		hp->port = (uint16_t)p;
	}
	return 0;
}

int ph_hosts_parse(const char *hosts, struct ph_hostport *out, unsigned max, char *err,
                   size_t errlen)
{
	const char *p = hosts;
	unsigned n = 0;

	for (;;) {
		const char *comma = strchr(p, ','), *e = comma ? comma : p + strlen(p);
		struct ph_hostport hp;

		while (p < e && ph_blank(*p))
			p++;
		while (e > p && ph_blank(e[-1]))
			e--;
		if (p == e) {
			if (n == 0 && !comma)
				config_err(err, errlen, "no host given");
			else
				config_err(err, errlen, "empty entry in the host list");
			return -1;
		}
		if (n >= max) {
			config_err(err, errlen, "more than %u hosts", max);
			return -1;
		}
		if (ph_hostport_parse(p, (size_t)(e - p), &hp, err, errlen) < 0)
			return -1;
		if (out)
			out[n] = hp;
		n++;
		if (!comma)
			return (int)n;
		p = comma + 1;
	}
}

/* v without any blank into out (outlen octets); -1 if it does not fit. */
static int ph_unblank(const char *v, char *out, size_t outlen)
{
	size_t n = 0;

	for (; *v; v++) {
		if (ph_blank(*v))
			continue;
		if (n + 1 >= outlen)
			return -1;
		out[n++] = *v;
	}
	out[n] = '\0';
	return 0;
}

/* A host list (route, smarthost), checked, stored without blanks; "" allowed when empty_ok. */
static int ph_hosts_norm(const char *name, const char *v, bool empty_ok, char *out, size_t outlen,
                         char *err, size_t errlen)
{
	char why[256];

	if (empty_ok && ph_unblank(v, out, outlen) == 0 && !out[0])
		return 0;
	if (ph_hosts_parse(v, NULL, PH_HOSTS_MAX, why, sizeof(why)) < 0) {
		config_err(err, errlen, "%s: %s", name, why);
		return -1;
	}
	if (ph_unblank(v, out, outlen) < 0) {
		config_err(err, errlen, "%s: longer than %zu octets", name, outlen - 1);
		return -1;
	}
	return 0;
}

/* resolver: "" or IP:PORT[,IP:PORT...], checked, stored without blanks. */
static int ph_resolver_norm(const char *v, char *out, size_t outlen, char *err, size_t errlen)
{
	const char *p = v;
	char entry[128], host[64], why[256];
	uint16_t port;

	if (ph_unblank(v, out, outlen) == 0 && !out[0])
		return 0;
	for (;;) {
		const char *comma = strchr(p, ','), *e = comma ? comma : p + strlen(p);

		while (p < e && ph_blank(*p))
			p++;
		while (e > p && ph_blank(e[-1]))
			e--;
		if (p == e) {
			config_err(err, errlen, "resolver: empty entry in the list");
			return -1;
		}
		snprintf(entry, sizeof(entry), "%.*s", (int)MIN((size_t)(e - p), 127), p);
		if ((size_t)(e - p) >= sizeof(entry) ||
		    (entry[0] == ':' && !strchr(entry + 1, ':'))) {
			config_err(err, errlen, "resolver: '%.64s' is not IP:PORT", entry);
			return -1;
		}
		if (config_hostport(entry, host, sizeof(host), &port, why, sizeof(why)) < 0) {
			config_err(err, errlen, "resolver: %s", why);
			return -1;
		}
		if (!ph_ip_ok(host, true)) {
			config_err(err, errlen, "resolver: '%s' is not an IPv4 or IPv6 address",
			           host);
			return -1;
		}
		if (port == 0) {
			config_err(err, errlen, "resolver: '%s': port 0", entry);
			return -1;
		}
		if (!comma)
			break;
		p = comma + 1;
	}
	if (ph_unblank(v, out, outlen) < 0) {
		config_err(err, errlen, "resolver: longer than %zu octets", outlen - 1);
		return -1;
	}
	return 0;
}

/* Whether the domain list (normalised) holds s (n octets, any case). */
static bool ph_domain_listed(const char *list, const char *s, size_t n)
{
	const char *p = list;

	while (*p) {
		const char *comma = strchr(p, ',');
		size_t len = comma ? (size_t)(comma - p) : strlen(p);

		if (len == n && strncasecmp(p, s, n) == 0)
			return true;
		if (!comma)
			break;
		p = comma + 1;
	}
	return false;
}

/*
 * A domain list (local_domains, relay_domains; errors name the key as name):
 * split at commas and blanks, checked, lower-cased, joined by single commas,
 * each once.
 */
static int ph_domains_norm(const char *name, const char *v, char *out, size_t outlen, char *err,
                           size_t errlen)
{
	/* it must also be written back on one line: "NAME = " + the list */
	size_t max = MIN(outlen - 1, CONFIG_LINE_MAX - strlen(name) - 3), n = 0;
	const char *p = v;

	out[0] = '\0';
	for (;;) {
		const char *b;

		while (*p == ',' || ph_blank(*p))
			p++;
		if (!*p)
			return 0;
		for (b = p; *p && *p != ',' && !ph_blank(*p); p++)
			;
		if (!ph_domain_ok(b, (size_t)(p - b))) {
			config_err(err, errlen,
			           "%s: '%.*s%s' is not a domain name " PH_DOMAIN_HINT, name,
			           (int)MIN((size_t)(p - b), 64), b, p - b > 64 ? "..." : "");
			return -1;
		}
		if (ph_domain_listed(out, b, (size_t)(p - b)))
			continue;
		if (n + (n ? 1 : 0) + (size_t)(p - b) > max) {
			config_err(
			    err, errlen,
			    "%s: too long to be written on one configuration line (%u octets)", name,
			    CONFIG_LINE_MAX);
			return -1;
		}
		if (n)
			out[n++] = ',';
		while (b < p)
			out[n++] = ph_lower(*b++);
		out[n] = '\0';
	}
}

/* ---- mynetworks ---- */

#define PH_NET_SHOW 64 /* octets of an entry shown in an error */

/* One entry of a network list: s, n octets (no blank, no comma). */
static int ph_net_parse(const char *s, size_t n, struct ph_net *net, char *err, size_t errlen)
{
	const char *end = s + n, *a = s, *ae, *slash;
	int show = (int)MIN(n, PH_NET_SHOW);
	const char *more = n > PH_NET_SHOW ? "..." : "";
	char addr[64];
	unsigned bits = 0, prefix;

	memset(net, 0, sizeof(*net));
	if (s[0] == '[') {
		const char *close = memchr(s, ']', n);

		if (!close) {
			config_err(err, errlen, "'%.*s%s': no closing ']'", show, s, more);
			return -1;
		}
		a = s + 1;
		ae = close;
		if (close + 1 < end && close[1] != '/') {
			config_err(err, errlen, "'%.*s%s': expected '/PREFIX' after ']'", show, s,
			           more);
			return -1;
		}
		slash = close + 1 < end ? close + 1 : NULL;
	} else {
		slash = memchr(s, '/', n);
		ae = slash ? slash : end;
	}
	if ((size_t)(ae - a) >= sizeof(addr))
		goto bad_addr;
	memcpy(addr, a, (size_t)(ae - a));
	addr[ae - a] = '\0';
	if (inet_pton(AF_INET, addr, net->addr) == 1) {
		net->family = AF_INET;
		bits = 32;
	} else if (inet_pton(AF_INET6, addr, net->addr) == 1) {
		net->family = AF_INET6;
		bits = 128;
	} else {
	bad_addr:
		config_err(err, errlen, "'%.*s%s': '%.*s%s' is not an IPv4 or IPv6 address", show, s,
		           more, (int)MIN((size_t)(ae - a), PH_NET_SHOW), a,
		           (size_t)(ae - a) > PH_NET_SHOW ? "..." : "");
		return -1;
	}
	prefix = bits;
	if (slash) {
		const char *q = slash + 1;

		if (q == end || end - q > 3)
			goto bad_prefix;
		for (prefix = 0; q < end; q++) {
			if (*q < '0' || *q > '9')
				goto bad_prefix;
			prefix = prefix * 10 + (unsigned)(*q - '0');
		}
		if (prefix > bits) {
		bad_prefix:
			config_err(err, errlen, "'%.*s%s': invalid prefix length (0 to %u)", show, s,
			           more, bits);
			return -1;
		}
	}
	net->prefix = prefix;
	for (unsigned i = prefix; i < bits; i++) {
		if (net->addr[i / 8] & (0x80u >> (i % 8))) {
			config_err(err, errlen, "%.*s%s has host bits set", show, s, more);
			return -1;
		}
	}
	return 0;
}

int ph_networks_parse(const char *list, struct ph_net *out, unsigned max, char *err,
                      size_t errlen)
{
	const char *p = list;
	unsigned n = 0;

	for (;;) {
		const char *b;
		struct ph_net net;

		while (*p == ',' || ph_blank(*p))
			p++;
		if (!*p)
			return (int)n;
		for (b = p; *p && *p != ',' && !ph_blank(*p); p++)
			;
		if (ph_net_parse(b, (size_t)(p - b), &net, err, errlen) < 0)
			return -1;
		if (n >= max) {
			config_err(err, errlen, "more than %u networks", max);
			return -1;
		}
		if (out)
			out[n] = net;
		n++;
	}
}

/* Whether addr (of net's family) is in net. */
static bool ph_net_holds(const struct ph_net *net, const uint8_t *addr)
{
	unsigned full = net->prefix / 8, rest = net->prefix % 8;

	if (memcmp(net->addr, addr, full) != 0)
		return false;
	return rest == 0 || ((net->addr[full] ^ addr[full]) & (0xffu << (8 - rest)) & 0xffu) == 0;
}

bool ph_networks_match(const struct ph_net *nets, unsigned n, const struct sockaddr_storage *sa)
{
	static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
	uint8_t v4[4], v6[16];
	bool has_v4 = false;

	if (!nets || !sa)
		return false;
	if (sa->ss_family == AF_INET) {
		const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;

		memcpy(v4, &sin->sin_addr, 4);
		memcpy(v6, mapped, 12);
		memcpy(v6 + 12, v4, 4);
		has_v4 = true;
	} else if (sa->ss_family == AF_INET6) {
		const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;

		memcpy(v6, &sin6->sin6_addr, 16);
		if (memcmp(v6, mapped, 12) == 0) {
			memcpy(v4, v6 + 12, 4);
			has_v4 = true;
		}
	} else {
		return false;
	}
	for (unsigned i = 0; i < n; i++) {
		const struct ph_net *net = &nets[i];

		if (net->family == AF_INET && net->prefix <= 32 && has_v4 && ph_net_holds(net, v4))
			return true;
		if (net->family == AF_INET6 && net->prefix <= 128 && ph_net_holds(net, v6))
			return true;
	}
	return false;
}

/* mynetworks: checked, each entry written ADDRESS/PREFIX (inet_ntop), joined by single commas. */
static int ph_networks_norm(const char *name, const char *v, char *out, size_t outlen, char *err,
                            size_t errlen)
{
	struct ph_net nets[PH_NETWORKS_MAX];
	char why[256], a[INET6_ADDRSTRLEN], one[INET6_ADDRSTRLEN + 8];
	size_t len = 0;
	int n = ph_networks_parse(v, nets, PH_NETWORKS_MAX, why, sizeof(why));

	if (n < 0) {
		config_err(err, errlen, "%s: %s", name, why);
		return -1;
	}
	out[0] = '\0';
	for (int i = 0; i < n; i++) {
		size_t l;

		if (!inet_ntop(nets[i].family, nets[i].addr, a, sizeof(a)))
			panic("ph_config: inet_ntop");
		l = (size_t)snprintf(one, sizeof(one), "%s%s/%u", i ? "," : "", a, nets[i].prefix);
		if (len + l >= outlen) {
			config_err(err, errlen, "%s: longer than %zu octets", name, outlen - 1);
			return -1;
		}
		memcpy(out + len, one, l + 1);
		len += l;
	}
	return 0;
}

static int ph_name_index(const char *const *names, size_t n, const char *v)
{
	for (size_t i = 0; i < n; i++)
		if (strcasecmp(v, names[i]) == 0)
			return (int)i;
	return -1;
}

static int ph_set_listen(struct ph_config *c, const char *v, char *err, size_t errlen)
{
	struct ph_listen l;
	char why[256];

	memset(&l, 0, sizeof(l));
	if (c->nlisten >= PH_LISTEN_MAX) {
		config_err(err, errlen, "listen: more than %u addresses", PH_LISTEN_MAX);
		return -1;
	}
	if (config_hostport(v, l.host, sizeof(l.host), &l.port, why, sizeof(why)) < 0) {
		config_err(err, errlen, "listen: %s", why);
		return -1;
	}
	if (!ph_listen_host_ok(l.host)) {
		config_err(err, errlen, "listen: '%s' is not an IPv4 or IPv6 address", l.host);
		return -1;
	}
	c->listen[c->nlisten++] = l;
	return 0;
}

/* One listener of a role (submission_listen): "" or "none" clears it. */
static int ph_set_listen1(const struct ph_key *k, struct ph_listen *out, const char *v, char *err,
                          size_t errlen)
{
	struct ph_listen l;
	char why[256];

	memset(&l, 0, sizeof(l));
	if (!v[0] || strcasecmp(v, "none") == 0) {
		*out = l;
		return 0;
	}
	if (config_hostport(v, l.host, sizeof(l.host), &l.port, why, sizeof(why)) < 0) {
		config_err(err, errlen, "%s: %s", k->name, why);
		return -1;
	}
	if (!ph_listen_host_ok(l.host)) {
		config_err(err, errlen, "%s: '%s' is not an IPv4 or IPv6 address", k->name, l.host);
		return -1;
	}
	*out = l;
	return 0;
}

/*
 * A value of a scalar type (number, size, duration, boolean, rate) into field;
 * errors name the key as name.
 */
static int ph_set_value(const struct ph_key *k, const char *name, const char *v, void *field,
                        char *err, size_t errlen)
{
	char why[256];
	struct ph_rate r;
	uint64_t u64;
	unsigned u;
	bool b;

	switch (k->type) {
	case PH_K_UINT:
		if (config_uint(v, (unsigned)k->min, (unsigned)k->max, &u, why, sizeof(why)) < 0) {
			config_err(err, errlen, "%s: %s", name, why);
			return -1;
		}
		memcpy(field, &u, sizeof(u));
		return 0;
	case PH_K_SIZE:
	case PH_K_DURATION:
		if ((k->type == PH_K_SIZE ? config_size(v, &u64, why, sizeof(why))
		                          : config_duration_ms(v, &u64, why, sizeof(why))) < 0) {
			config_err(err, errlen, "%s: %s", name, why);
			return -1;
		}
		if (ph_range_check(k, name, u64, err, errlen) < 0)
			return -1;
		memcpy(field, &u64, sizeof(u64));
		return 0;
	case PH_K_BOOL:
		if (config_bool(v, &b, why, sizeof(why)) < 0) {
			config_err(err, errlen, "%s: %s", name, why);
			return -1;
		}
		memcpy(field, &b, sizeof(b));
		return 0;
	case PH_K_RATE:
		if (ph_rate_parse(v, k->min, k->max, &r, why, sizeof(why)) < 0) {
			config_err(err, errlen, "%s: %s", name, why);
			return -1;
		}
		/* member by member: the padding keeps the zeros of ph_config_default */
		memcpy((char *)field + offsetof(struct ph_rate, count), &r.count, sizeof(r.count));
		memcpy((char *)field + offsetof(struct ph_rate, per_ms), &r.per_ms,
		       sizeof(r.per_ms));
		return 0;
	case PH_K_TLS:
	case PH_K_TLS_VERIFY: {
		bool t = k->type == PH_K_TLS;
		int i = t ? ph_name_index(ph_tls_names, ARRAY_SIZE(ph_tls_names), v)
		          : ph_name_index(ph_tls_verify_names, ARRAY_SIZE(ph_tls_verify_names), v);
		if (i < 0) {
			config_err(err, errlen, "%s: '%.64s' is not %s", name, v,
			           t ? "none, may or require" : "none or name");
			return -1;
		}
		u = (unsigned)i;
		memcpy(field, &u, sizeof(u));
		return 0;
	}
	default:
		break;
	}
	panic("ph_config: key type %d is not a scalar", (int)k->type);
}

/* A scalar value as ph_set_value reads it back; *zero: it is 0 (for the key's note). */
static void ph_format_value(const struct ph_key *k, const void *field, char *buf, size_t len,
                            bool *zero)
{
	struct ph_rate r;
	uint64_t u64;
	unsigned u;
	bool b;

	*zero = false;
	switch (k->type) {
	case PH_K_UINT:
		memcpy(&u, field, sizeof(u));
		snprintf(buf, len, "%u", u);
		*zero = u == 0;
		return;
	case PH_K_SIZE:
		memcpy(&u64, field, sizeof(u64));
		config_size_format(u64, buf, len);
		*zero = u64 == 0;
		return;
	case PH_K_DURATION:
		memcpy(&u64, field, sizeof(u64));
		config_duration_format(u64, buf, len);
		return;
	case PH_K_BOOL:
		memcpy(&b, field, sizeof(b));
		snprintf(buf, len, "%s", b ? "yes" : "no");
		return;
	case PH_K_RATE:
		memcpy(&r, field, sizeof(r));
		ph_rate_format(&r, buf, len);
		return;
	case PH_K_TLS:
		memcpy(&u, field, sizeof(u));
		snprintf(buf, len, "%s", u < ARRAY_SIZE(ph_tls_names) ? ph_tls_names[u] : "?");
		return;
	case PH_K_TLS_VERIFY:
		memcpy(&u, field, sizeof(u));
		snprintf(buf, len, "%s",
		         u < ARRAY_SIZE(ph_tls_verify_names) ? ph_tls_verify_names[u] : "?");
		return;
	default:
		break;
	}
	panic("ph_config: key type %d is not a scalar", (int)k->type);
}

/* Checks DOMAIN of "PREFIX.DOMAIN" and writes it lower-cased into dom[256]. */
static int ph_key_domain(const char *prefix, const char *domain, char *dom, char *err,
                         size_t errlen)
{
	size_t n = strlen(domain);

	if (!ph_domain_ok(domain, n)) {
		config_err(err, errlen, "%s.%.64s%s: not a domain name " PH_DOMAIN_HINT, prefix,
		           domain, n > 64 ? "..." : "");
		return -1;
	}
	for (size_t i = 0; i <= n; i++)
		dom[i] = ph_lower(domain[i]);
	return 0;
}

static int ph_set_route(struct ph_config *c, const char *domain, const char *v, char *err,
                        size_t errlen)
{
	struct ph_route r;
	char name[300];
	unsigned i;

	memset(&r, 0, sizeof(r));
	if (ph_key_domain("route", domain, r.domain, err, errlen) < 0)
		return -1;
	snprintf(name, sizeof(name), "route.%s", r.domain);
	if (ph_hosts_norm(name, v, false, r.hosts, sizeof(r.hosts), err, errlen) < 0)
		return -1;
	for (i = 0; i < c->nroutes && i < PH_ROUTE_MAX; i++)
		if (strcmp(c->routes[i].domain, r.domain) == 0)
			break;
	if (i == c->nroutes) {
		if (c->nroutes >= PH_ROUTE_MAX) {
			config_err(err, errlen, "%s: more than %u routes", name, PH_ROUTE_MAX);
			return -1;
		}
		c->nroutes++;
	}
	memcpy(&c->routes[i], &r, sizeof(r));
	return 0;
}

/* destination.DOMAIN = NAME=VALUE ...: the default limits, with the ones named replaced. */
static int ph_set_dest(struct ph_config *c, const char *domain, const char *v, char *err,
                       size_t errlen)
{
	struct ph_dest d;
	char name[340], tok[128];
	const char *p = v;
	unsigned i;

	memset(&d, 0, sizeof(d));
	if (ph_key_domain("destination", domain, d.domain, err, errlen) < 0)
		return -1;
	memcpy(&d.lim, &c->limits, sizeof(d.lim));
	for (;;) {
		const char *b, *eq;
		size_t j;

		while (ph_blank(*p))
			p++;
		if (!*p)
			break;
		for (b = p; *p && !ph_blank(*p); p++)
			;
		eq = memchr(b, '=', (size_t)(p - b));
		if (!eq || eq == b) {
			config_err(
			    err, errlen,
			    "destination.%s: '%.*s%s' is not NAME=VALUE (NAME: " PH_LIMIT_NAMES ")",
			    d.domain, (int)MIN((size_t)(p - b), 64), b, p - b > 64 ? "..." : "");
			return -1;
		}
		for (j = 0; j < ARRAY_SIZE(ph_limit_names); j++)
			if ((size_t)(eq - b) == strlen(ph_limit_names[j]) &&
			    strncasecmp(b, ph_limit_names[j], (size_t)(eq - b)) == 0)
				break;
		if (j == ARRAY_SIZE(ph_limit_names)) {
			config_err(err, errlen,
			           "destination.%s: unknown limit '%.*s' (" PH_LIMIT_NAMES ")",
			           d.domain, (int)MIN((size_t)(eq - b), 64), b);
			return -1;
		}
		snprintf(name, sizeof(name), "destination.%s: %s", d.domain, ph_limit_names[j]);
		if ((size_t)(p - eq - 1) >= sizeof(tok)) {
			config_err(err, errlen, "%s: value longer than %zu octets", name,
			           sizeof(tok) - 1);
			return -1;
		}
		memcpy(tok, eq + 1, (size_t)(p - eq - 1));
		tok[p - eq - 1] = '\0';
		if (ph_set_value(ph_limit_key(j), name, tok,
		                 ph_limit_field(&d.lim, ph_limit_key(j)), err, errlen) < 0)
			return -1;
	}
	for (i = 0; i < c->ndests && i < PH_DEST_MAX; i++)
		if (strcmp(c->dests[i].domain, d.domain) == 0)
			break;
	if (i == c->ndests) {
		if (c->ndests >= PH_DEST_MAX) {
			config_err(err, errlen, "destination.%s: more than %u destinations",
			           d.domain, PH_DEST_MAX);
			return -1;
		}
		c->ndests++;
	}
	memcpy(&c->dests[i], &d, sizeof(d));
	return 0;
}

/* A list value of key k (resolver, host, domain or network list) normalised into buf[k->size]. */
static int ph_list_norm(const struct ph_key *k, const char *v, char *buf, char *err, size_t errlen)
{
	switch (k->type) {
	case PH_K_RESOLVER:
		return ph_resolver_norm(v, buf, k->size, err, errlen);
	case PH_K_HOSTS:
		return ph_hosts_norm(k->name, v, true, buf, k->size, err, errlen);
	case PH_K_DOMAINS:
		return ph_domains_norm(k->name, v, buf, k->size, err, errlen);
	case PH_K_NETWORKS:
		return ph_networks_norm(k->name, v, buf, k->size, err, errlen);
	default:
		break;
	}
	panic("ph_config: key type %d is not a list", (int)k->type);
}

static int ph_set(struct ph_config *c, const struct ph_key *k, const char *v, char *err,
                  size_t errlen)
{
	char *field = (char *)c + k->off;
	char buf[4096];
	int i;

	switch (k->type) {
	case PH_K_LISTEN:
		return ph_set_listen(c, v, err, errlen);
	case PH_K_LISTEN1:
		return ph_set_listen1(k, (struct ph_listen *)field, v, err, errlen);
	case PH_K_PATH:
	case PH_K_HOSTNAME:
		if ((k->type == PH_K_PATH ? ph_path_check : ph_hostname_check)(k, v, err, errlen) <
		    0)
			return -1;
		memset(field, 0, k->size);
		memcpy(field, v, strlen(v));
		return 0;
	case PH_K_RESOLVER:
	case PH_K_HOSTS:
	case PH_K_DOMAINS:
	case PH_K_NETWORKS:
		if (ph_list_norm(k, v, buf, err, errlen) < 0)
			return -1;
		memset(field, 0, k->size);
		memcpy(field, buf, strlen(buf));
		return 0;
	case PH_K_ROUTES:
	case PH_K_DESTS:
		break; /* only as route.DOMAIN and destination.DOMAIN (ph_config_set) */
	case PH_K_DURABILITY:
		i = ph_name_index(ph_durability_names, ARRAY_SIZE(ph_durability_names), v);
		if (i < 0) {
			config_err(err, errlen, "%s: '%.64s' is not fsync, batch or none", k->name, v);
			return -1;
		}
		c->durability = (enum ph_durability)i;
		return 0;
	case PH_K_LOG_LEVEL:
		i = ph_name_index(ph_log_level_names, ARRAY_SIZE(ph_log_level_names), v);
		if (i < 0) {
			config_err(err, errlen, "%s: '%.64s' is not error, warning, info or debug",
			           k->name, v);
			return -1;
		}
		c->log_level = (enum log_level)i;
		return 0;
	case PH_K_UINT:
	case PH_K_SIZE:
	case PH_K_DURATION:
	case PH_K_BOOL:
	case PH_K_RATE:
	case PH_K_TLS:
	case PH_K_TLS_VERIFY:
		if (ph_is_limit_key(k) && c->ndests > 0) {
			config_err(
			    err, errlen,
			    "%s: must come before the destination.DOMAIN keys (each copies the "
			    "delivery_* limits in force when it is read)",
			    k->name);
			return -1;
		}
		return ph_set_value(k, k->name, v, field, err, errlen);
	}
	panic("ph_config: key type %d", (int)k->type);
}

int ph_config_set(struct ph_config *c, const char *key, const char *value, char *err, size_t errlen)
{
	for (size_t i = 0; i < ARRAY_SIZE(ph_keys); i++) {
		const struct ph_key *k = &ph_keys[i];
		size_t n = strlen(k->name);

		if (k->type == PH_K_ROUTES || k->type == PH_K_DESTS) {
			if (strncasecmp(key, k->name, n) == 0 && key[n] == '.')
				return (k->type == PH_K_ROUTES ? ph_set_route : ph_set_dest)(
				    c, key + n + 1, value, err, errlen);
			if (strcasecmp(key, k->name) == 0) {
				config_err(err, errlen,
				           "'%s': the domain goes in the key: %s.DOMAIN", k->name,
				           k->name);
				return -1;
			}
			continue;
		}
		if (strcasecmp(key, k->name) == 0)
			return ph_set(c, k, value, err, errlen);
	}
	config_err(err, errlen, "unknown key '%.64s'", key);
	return -1;
}

/* ---- files ---- */

struct ph_load {
	struct ph_config c;
	bool listen_seen;
};

static int ph_load_entry(void *arg, const char *key, const char *value, unsigned line, char *err,
                         size_t errlen)
{
	struct ph_load *l = arg;

	if (!l->listen_seen && strcmp(key, "listen") == 0) {
		l->c.nlisten = 0; /* the file's listeners replace the earlier ones */
		l->listen_seen = true;
	}
	return ph_config_set(&l->c, key, value, err, errlen);
}

/* The file's entries over a copy of *c (on the heap: the struct is large), then *c. */
static int ph_load(struct ph_config *c, const char *name, const char *path, const char *buf,
                   size_t len, char *err, size_t errlen)
{
	struct ph_load *l = malloc(sizeof(*l));
	int rc;

	if (!l) {
		config_err(err, errlen, "%s: out of memory",
		           path   ? path
		           : name ? name
		                  : "(config)");
		return -1;
	}
	memcpy(&l->c, c, sizeof(*c));
	l->listen_seen = false;
	rc = path ? config_parse_file(path, ph_load_entry, l, err, errlen)
	          : config_parse_buffer(name, buf, len, ph_load_entry, l, err, errlen);
	if (rc == 0)
		memcpy(c, &l->c, sizeof(*c));
	free(l);
	return rc < 0 ? -1 : 0;
}

int ph_config_load_buffer(struct ph_config *c, const char *name, const char *buf, size_t len,
                          char *err, size_t errlen)
{
	return ph_load(c, name, NULL, buf, len, err, errlen);
}

int ph_config_load_file(struct ph_config *c, const char *path, char *err, size_t errlen)
{
	return ph_load(c, NULL, path, NULL, 0, err, errlen);
}

/* ---- checks ---- */

/* The range of a scalar value (ph_set_value's types). */
static int ph_check_value(const struct ph_key *k, const char *name, const void *field, char *err,
                          size_t errlen)
{
	struct ph_rate r;
	uint64_t u64;
	unsigned u;

	switch (k->type) {
	case PH_K_UINT:
		memcpy(&u, field, sizeof(u));
		return ph_range_check(k, name, u, err, errlen);
	case PH_K_SIZE:
	case PH_K_DURATION:
		memcpy(&u64, field, sizeof(u64));
		return ph_range_check(k, name, u64, err, errlen);
	case PH_K_RATE:
		memcpy(&r, field, sizeof(r));
		return ph_rate_check(k, name, &r, err, errlen);
	case PH_K_TLS:
	case PH_K_TLS_VERIFY:
		memcpy(&u, field, sizeof(u));
		if (u >= (k->type == PH_K_TLS ? ARRAY_SIZE(ph_tls_names)
		                              : ARRAY_SIZE(ph_tls_verify_names))) {
			config_err(err, errlen, "%s: invalid value %u", name, u);
			return -1;
		}
		return 0;
	default:
		return 0;
	}
}

/* A list field: NUL-terminated, valid, and as its normaliser writes it. */
static int ph_check_list(const struct ph_key *k, const char *field, char *err, size_t errlen)
{
	char buf[4096];
	int rc;

	if (strnlen(field, k->size) == k->size) {
		config_err(err, errlen, "%s: not NUL-terminated", k->name);
		return -1;
	}
	rc = ph_list_norm(k, field, buf, err, errlen);
	if (rc < 0)
		return -1;
	if (strcmp(buf, field) != 0) {
		config_err(err, errlen, "%s: not in its normal form ('%.64s')", k->name, buf);
		return -1;
	}
	return 0;
}

/* A route's or destination's domain: NUL-terminated, valid, lower case, not seen before. */
static int ph_check_domain(const char *prefix, const char *dom, unsigned i, const char *prev,
                           size_t stride, char *err, size_t errlen)
{
	size_t n = strnlen(dom, 256);

	if (n == 256 || !ph_domain_ok(dom, n)) {
		config_err(err, errlen, "%s: entry %u: not a domain name", prefix, i + 1);
		return -1;
	}
	for (size_t j = 0; j < n; j++) {
		if (dom[j] != ph_lower(dom[j])) {
			config_err(err, errlen, "%s.%s: the domain is not in lower case", prefix,
			           dom);
			return -1;
		}
	}
	for (unsigned j = 0; j < i; j++) {
		if (strcmp(prev + j * stride, dom) == 0) {
			config_err(err, errlen, "%s.%s: given twice", prefix, dom);
			return -1;
		}
	}
	return 0;
}

static int ph_check_routes(const struct ph_config *c, char *err, size_t errlen)
{
	char name[300], buf[PH_HOSTS_LEN];

	if (c->nroutes > PH_ROUTE_MAX) {
		config_err(err, errlen, "route: more than %u routes", PH_ROUTE_MAX);
		return -1;
	}
	for (unsigned i = 0; i < c->nroutes; i++) {
		const struct ph_route *r = &c->routes[i];

		if (ph_check_domain("route", r->domain, i, c->routes[0].domain,
		                    sizeof(struct ph_route), err, errlen) < 0)
			return -1;
		snprintf(name, sizeof(name), "route.%s", r->domain);
		if (strnlen(r->hosts, sizeof(r->hosts)) == sizeof(r->hosts)) {
			config_err(err, errlen, "%s: not NUL-terminated", name);
			return -1;
		}
		if (ph_hosts_norm(name, r->hosts, false, buf, sizeof(buf), err, errlen) < 0)
			return -1;
		if (strcmp(buf, r->hosts) != 0) {
			config_err(err, errlen, "%s: not in its normal form ('%.64s')", name, buf);
			return -1;
		}
	}
	return 0;
}

static int ph_check_dests(const struct ph_config *c, char *err, size_t errlen)
{
	char name[340];

	if (c->ndests > PH_DEST_MAX) {
		config_err(err, errlen, "destination: more than %u destinations", PH_DEST_MAX);
		return -1;
	}
	for (unsigned i = 0; i < c->ndests; i++) {
		struct ph_dest d;

		memcpy(&d, &c->dests[i], sizeof(d));
		if (ph_check_domain("destination", d.domain, i, c->dests[0].domain,
		                    sizeof(struct ph_dest), err, errlen) < 0)
			return -1;
		for (size_t j = 0; j < ARRAY_SIZE(ph_limit_names); j++) {
			const struct ph_key *k = ph_limit_key(j);

			snprintf(name, sizeof(name), "destination.%s: %s", d.domain,
			         ph_limit_names[j]);
			if (ph_check_value(k, name, ph_limit_field(&d.lim, k), err, errlen) < 0)
				return -1;
		}
	}
	return 0;
}

static int ph_check_key(const struct ph_config *c, const struct ph_key *k, char *err, size_t errlen)
{
	const char *field = (const char *)c + k->off;

	switch (k->type) {
	case PH_K_LISTEN:
	case PH_K_LISTEN1:
		return 0; /* ph_check_listen */
	case PH_K_PATH:
		return ph_path_check(k, field, err, errlen);
	case PH_K_HOSTNAME:
		return ph_hostname_check(k, field, err, errlen);
	case PH_K_DURABILITY:
		if ((unsigned)c->durability >= ARRAY_SIZE(ph_durability_names)) {
			config_err(err, errlen, "durability: invalid value %d", (int)c->durability);
			return -1;
		}
		return 0;
	case PH_K_LOG_LEVEL:
		if ((unsigned)c->log_level >= ARRAY_SIZE(ph_log_level_names)) {
			config_err(err, errlen, "log_level: invalid value %d", (int)c->log_level);
			return -1;
		}
		return 0;
	case PH_K_UINT:
	case PH_K_SIZE:
	case PH_K_DURATION:
	case PH_K_BOOL:
	case PH_K_RATE:
	case PH_K_TLS:
	case PH_K_TLS_VERIFY:
		return ph_check_value(k, k->name, field, err, errlen);
	case PH_K_RESOLVER:
	case PH_K_HOSTS:
	case PH_K_DOMAINS:
	case PH_K_NETWORKS:
		return ph_check_list(k, field, err, errlen);
	case PH_K_ROUTES:
		return ph_check_routes(c, err, errlen);
	case PH_K_DESTS:
		return ph_check_dests(c, err, errlen);
	}
	panic("ph_config: key type %d", (int)k->type);
}

/* The address as written in a file: IPv6 in brackets. */
static void ph_listen_format(const struct ph_listen *l, char *buf, size_t len)
{
	snprintf(buf, len, strchr(l->host, ':') ? "[%.*s]:%u" : "%.*s:%u",
	         (int)strnlen(l->host, sizeof(l->host)), l->host, l->port);
}

static int ph_check_listen(const struct ph_config *c, char *err, size_t errlen)
{
	unsigned char addr[PH_LISTEN_MAX + 2][17];
	const struct ph_listen *all[PH_LISTEN_MAX + 2];
	const char *names[PH_LISTEN_MAX + 2];
	unsigned n = 0;
	char a[96];

	if (c->nlisten == 0) {
		config_err(err, errlen, "listen: no address to listen on");
		return -1;
	}
	if (c->nlisten > PH_LISTEN_MAX) {
		config_err(err, errlen, "listen: more than %u addresses", PH_LISTEN_MAX);
		return -1;
	}
	for (unsigned i = 0; i < c->nlisten; i++) {
		all[n] = &c->listen[i];
		names[n++] = "listen";
	}
	if (c->submission_listen.host[0]) {
		all[n] = &c->submission_listen;
		names[n++] = "submission_listen";
	}
	if (c->submissions_listen.host[0]) {
		all[n] = &c->submissions_listen;
		names[n++] = "submissions_listen";
	}
	for (unsigned i = 0; i < n; i++) {
		const struct ph_listen *l = all[i];

		memset(addr[i], 0, sizeof(addr[i]));
		if (strnlen(l->host, sizeof(l->host)) == sizeof(l->host)) {
			config_err(err, errlen, "%s: host %u is not NUL-terminated", names[i], i + 1);
			return -1;
		}
		if (inet_pton(AF_INET, l->host, addr[i]) == 1) {
			addr[i][16] = 4;
		} else if (inet_pton(AF_INET6, l->host, addr[i]) == 1) {
			addr[i][16] = 6;
		} else {
			config_err(err, errlen, "%s: '%s' is not an IPv4 or IPv6 address", names[i],
			           l->host);
			return -1;
		}
		for (unsigned j = 0; j < i && l->port != 0; j++) {
			if (all[j]->port == l->port && memcmp(addr[i], addr[j], 17) == 0) {
				ph_listen_format(l, a, sizeof(a));
				config_err(err, errlen, "%s: %s is given twice", names[i], a);
				return -1;
			}
		}
	}
	return 0;
}

int ph_config_check(const struct ph_config *c, char *err, size_t errlen)
{
	size_t dir_len;

	if (ph_check_listen(c, err, errlen) < 0)
		return -1;
	for (size_t i = 0; i < ARRAY_SIZE(ph_keys); i++)
		if (ph_check_key(c, &ph_keys[i], err, errlen) < 0)
			return -1;
	if (c->smtp_auth && !c->users_file[0]) {
		config_err(err, errlen, "smtp_auth: needs users_file (the logins)");
		return -1;
	}
	if ((c->smtp_auth_required || c->smtp_auth_without_tls) && !c->smtp_auth) {
		config_err(err, errlen, "%s: needs smtp_auth = yes",
		           c->smtp_auth_required ? "smtp_auth_required" : "smtp_auth_without_tls");
		return -1;
	}
	if (!c->tls_cert[0] != !c->tls_key[0]) {
		config_err(err, errlen, "%s: needs %s too", c->tls_cert[0] ? "tls_cert" : "tls_key",
		           c->tls_cert[0] ? "tls_key" : "tls_cert");
		return -1;
	}
	for (int i = 0; i < 2; i++) {
		const char *name = i ? "submissions_listen" : "submission_listen";

		if (!(i ? c->submissions_listen : c->submission_listen).host[0])
			continue;
		if (!c->tls_cert[0]) {
			config_err(err, errlen, "%s: needs tls_cert and tls_key", name);
			return -1;
		}
		if (!c->users_file[0]) {
			config_err(err, errlen, "%s: needs users_file (the logins)", name);
			return -1;
		}
	}
	/* sockaddr_un holds 107 octets of path: the default one must fit too */
	dir_len = strlen(c->spool_dir);
	if (!c->control_socket[0] &&
	    dir_len + strlen(CONTROL_SOCKET_NAME) >= sizeof(c->control_socket)) {
		config_err(err, errlen,
		       "control_socket: the default, spool_dir + \"" CONTROL_SOCKET_NAME "\", "
		       "would be %zu octets, more than a socket path holds (%zu): "
		       "set control_socket or a shorter spool_dir",
		       dir_len + strlen(CONTROL_SOCKET_NAME), sizeof(c->control_socket) - 1);
		return -1;
	}
	if (c->retry_max_ms < c->retry_min_ms) {
		char a[32], b[32];

		config_duration_format(c->retry_max_ms, a, sizeof(a));
		config_duration_format(c->retry_min_ms, b, sizeof(b));
		config_err(err, errlen, "retry_max: %s is less than retry_min (%s)", a, b);
		return -1;
	}
	if (c->local_domains[0] && !c->users_file[0]) {
		config_err(err, errlen, "users_file: required when local_domains is set");
		return -1;
	}
	for (const char *p = c->relay_domains; *p;) {
		size_t n = strcspn(p, ",");

		if (n && ph_domain_listed(c->local_domains, p, n)) {
			config_err(err, errlen,
			           "relay_domains: %.*s is in local_domains too (a domain is either "
			           "delivered locally or relayed)",
			           (int)MIN(n, 255), p);
			return -1;
		}
		p += n + (p[n] == ',');
	}
	for (unsigned i = 0; i < c->nroutes; i++) {
		const char *dom = c->routes[i].domain;

		if (ph_domain_listed(c->local_domains, dom, strlen(dom))) {
			config_err(
			    err, errlen,
			    "route.%s: %s is in local_domains too (a domain is delivered either "
			    "locally or by a route)",
			    dom, dom);
			return -1;
		}
	}
	return 0;
}

/* ---- for delivery ---- */

const struct ph_limits *ph_config_limits_for(const struct ph_config *c, const char *domain)
{
	for (unsigned i = 0; i < c->ndests && i < PH_DEST_MAX; i++)
		if (strcasecmp(c->dests[i].domain, domain) == 0)
			return &c->dests[i].lim;
	return &c->limits;
}

const char *ph_config_route_for(const struct ph_config *c, const char *domain)
{
	for (unsigned i = 0; i < c->nroutes && i < PH_ROUTE_MAX; i++)
		if (strcasecmp(c->routes[i].domain, domain) == 0)
			return c->routes[i].hosts;
	return NULL;
}

bool ph_config_is_local(const struct ph_config *c, const char *domain, size_t len)
{
	return len > 0 && ph_domain_listed(c->local_domains, domain, len);
}

bool ph_config_is_relay_domain(const struct ph_config *c, const char *domain, size_t len)
{
	return len > 0 && ph_domain_listed(c->relay_domains, domain, len);
}

/* ---- printing ---- */

static void ph_print_string(FILE *f, const char *s, size_t size)
{
	size_t n = strnlen(s, size);

	if (!ph_needs_quotes(s, n)) {
		fwrite(s, 1, n, f);
		return;
	}
	fputc('"', f);
	for (size_t i = 0; i < n; i++) {
		if (s[i] == '"' || s[i] == '\\')
			fputc('\\', f);
		fputc(s[i], f);
	}
	fputc('"', f);
}

/* destination.DOMAIN = every limit, so that it reads back the same whatever the defaults. */
static void ph_print_dest(FILE *f, const struct ph_dest *d)
{
	fprintf(f, "destination.%.*s =", (int)strnlen(d->domain, sizeof(d->domain)), d->domain);
	for (size_t j = 0; j < ARRAY_SIZE(ph_limit_names); j++) {
		const struct ph_key *k = ph_limit_key(j);
		struct ph_limits lim;
		char buf[96];
		bool zero;

		memcpy(&lim, &d->lim, sizeof(lim));
		ph_format_value(k, ph_limit_field(&lim, k), buf, sizeof(buf), &zero);
		fprintf(f, " %s=%s", ph_limit_names[j], buf);
	}
	fputc('\n', f);
}

void ph_config_print(const struct ph_config *c, FILE *f)
{
	fputs("# posthaste: the effective configuration\n", f);
	for (size_t i = 0; i < ARRAY_SIZE(ph_keys); i++) {
		const struct ph_key *k = &ph_keys[i];
		const char *field = (const char *)c + k->off;
		char buf[96];
		bool zero = false;

		switch (k->type) {
		case PH_K_LISTEN:
			for (unsigned j = 0; j < c->nlisten && j < PH_LISTEN_MAX; j++) {
				ph_listen_format(&c->listen[j], buf, sizeof(buf));
				fprintf(f, "listen = %s\n", buf);
			}
			continue;
		case PH_K_LISTEN1: {
			const struct ph_listen *l = (const struct ph_listen *)field;

			if (l->host[0]) {
				ph_listen_format(l, buf, sizeof(buf));
				fprintf(f, "%s = %s\n", k->name, buf);
			} else {
				fprintf(f, "%s = none\n", k->name);
			}
			continue;
		}
		case PH_K_ROUTES:
			for (unsigned j = 0; j < c->nroutes && j < PH_ROUTE_MAX; j++) {
				const struct ph_route *r = &c->routes[j];

				fprintf(f,
				        "route.%.*s = ", (int)strnlen(r->domain, sizeof(r->domain)),
				        r->domain);
				ph_print_string(f, r->hosts, sizeof(r->hosts));
				fputc('\n', f);
			}
			if (c->nroutes == 0)
				fputs("# route.DOMAIN = HOSTS: none\n", f);
			continue;
		case PH_K_DESTS:
			for (unsigned j = 0; j < c->ndests && j < PH_DEST_MAX; j++)
				ph_print_dest(f, &c->dests[j]);
			if (c->ndests == 0)
				fputs("# destination.DOMAIN = LIMITS: none\n", f);
			continue;
		default:
			break;
		}
		fprintf(f, "%s = ", k->name);
		switch (k->type) {
		case PH_K_LISTEN:
		case PH_K_LISTEN1:
		case PH_K_ROUTES:
		case PH_K_DESTS:
			break;
		case PH_K_PATH:
		case PH_K_HOSTNAME:
		case PH_K_RESOLVER:
		case PH_K_HOSTS:
		case PH_K_DOMAINS:
		case PH_K_NETWORKS:
			ph_print_string(f, field, k->size);
			zero = !field[0];
			break;
		case PH_K_DURABILITY:
			fputs((unsigned)c->durability < ARRAY_SIZE(ph_durability_names)
			          ? ph_durability_names[c->durability]
			          : "?",
			      f);
			break;
		case PH_K_LOG_LEVEL:
			fputs((unsigned)c->log_level < ARRAY_SIZE(ph_log_level_names)
			          ? ph_log_level_names[c->log_level]
			          : "?",
			      f);
			break;
		case PH_K_UINT:
		case PH_K_SIZE:
		case PH_K_DURATION:
		case PH_K_BOOL:
		case PH_K_RATE:
		case PH_K_TLS:
		case PH_K_TLS_VERIFY:
			ph_format_value(k, field, buf, sizeof(buf), &zero);
			fputs(buf, f);
			break;
		}
		if (zero && k->zero_note)
			fprintf(f, " # %s", k->zero_note);
		else if (zero && k->off == offsetof(struct ph_config, control_socket))
			fprintf(f, " # %.*s" CONTROL_SOCKET_NAME,
			        (int)strnlen(c->spool_dir, sizeof(c->spool_dir)), c->spool_dir);
		fputc('\n', f);
	}
}
