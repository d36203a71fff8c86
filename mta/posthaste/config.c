#include "mta/posthaste/config.h"

#include <arpa/inet.h>
#include <limits.h>
#include <stdarg.h>
#include <string.h>
#include <strings.h>

#include "core/compiler.h"
#include "core/config.h"

#define DAY_MS (24ull * 3600 * 1000)

enum ph_key_type {
	PH_K_LISTEN,
	PH_K_PATH,     /* char[size]; min: 1 when it may not be empty */
	PH_K_HOSTNAME, /* char[size] */
	PH_K_DURABILITY,
	PH_K_LOG_LEVEL,
	PH_K_UINT,     /* unsigned in [min, max] */
	PH_K_SIZE,     /* uint64_t octets in [min, max] */
	PH_K_DURATION, /* uint64_t milliseconds in [min, max] */
	PH_K_BOOL,
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
    {"control_socket", PH_K_PATH, FIELD(control_socket), 0, 0, NULL},
    {"discard", PH_K_BOOL, FIELD(discard), 0, 0, NULL},
    {"log_level", PH_K_LOG_LEVEL, FIELD(log_level), 0, 0, NULL},
    {"max_queue_age", PH_K_DURATION, FIELD(max_queue_age_ms), 1000, 365 * DAY_MS, NULL},
};

/* Keys of features still to come: named, so that a file written for them fails clearly. */
static const char *const ph_reserved[] = {
    "route", "smarthost", "resolver", "local_domains", "mynetworks", "tls_cert", "tls_key",
};

static const char *const ph_durability_names[] = {"fsync", "batch", "none"};
static const char *const ph_log_level_names[] = {"error", "warning", "info", "debug"};

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
	c->discard = false;
	c->log_level = LOG_INFO;
	c->max_queue_age_ms = 5 * DAY_MS;
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

/* Range check of a number; the value printed in the key's own units. */
static int ph_range_check(const struct ph_key *k, uint64_t v, char *err, size_t errlen)
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
	config_err(err, errlen, "%s: %s is out of range (%s to %s)", k->name, a, lo, hi);
	return -1;
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

static int ph_set(struct ph_config *c, const struct ph_key *k, const char *v, char *err,
                  size_t errlen)
{
	char *field = (char *)c + k->off;
	char why[256];
	uint64_t u64;
	unsigned u;
	bool b;
	int i;

	switch (k->type) {
	case PH_K_LISTEN:
		return ph_set_listen(c, v, err, errlen);
	case PH_K_PATH:
	case PH_K_HOSTNAME:
		if ((k->type == PH_K_PATH ? ph_path_check : ph_hostname_check)(k, v, err, errlen) <
		    0)
			return -1;
		memset(field, 0, k->size);
		memcpy(field, v, strlen(v));
		return 0;
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
		if (config_uint(v, (unsigned)k->min, (unsigned)k->max, &u, why, sizeof(why)) < 0) {
			config_err(err, errlen, "%s: %s", k->name, why);
			return -1;
		}
		memcpy(field, &u, sizeof(u));
		return 0;
	case PH_K_SIZE:
	case PH_K_DURATION:
		if ((k->type == PH_K_SIZE ? config_size(v, &u64, why, sizeof(why))
		                          : config_duration_ms(v, &u64, why, sizeof(why))) < 0) {
			config_err(err, errlen, "%s: %s", k->name, why);
			return -1;
		}
		if (ph_range_check(k, u64, err, errlen) < 0)
			return -1;
		memcpy(field, &u64, sizeof(u64));
		return 0;
	case PH_K_BOOL:
		if (config_bool(v, &b, why, sizeof(why)) < 0) {
			config_err(err, errlen, "%s: %s", k->name, why);
			return -1;
		}
		memcpy(field, &b, sizeof(b));
		return 0;
	}
	panic("ph_config: key type %d", (int)k->type);
}

int ph_config_set(struct ph_config *c, const char *key, const char *value, char *err, size_t errlen)
{
	for (size_t i = 0; i < ARRAY_SIZE(ph_keys); i++)
		if (strcasecmp(key, ph_keys[i].name) == 0)
			return ph_set(c, &ph_keys[i], value, err, errlen);
	for (size_t i = 0; i < ARRAY_SIZE(ph_reserved); i++) {
		if (strcasecmp(key, ph_reserved[i]) == 0) {
			config_err(err, errlen,
			       "'%s' is not supported yet (reserved for a later version)",
			       ph_reserved[i]);
			return -1;
		}
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

int ph_config_load_buffer(struct ph_config *c, const char *name, const char *buf, size_t len,
                          char *err, size_t errlen)
{
	struct ph_load l;

	l.c = *c;
	l.listen_seen = false;
	if (config_parse_buffer(name, buf, len, ph_load_entry, &l, err, errlen) < 0)
		return -1;
	*c = l.c;
	return 0;
}

int ph_config_load_file(struct ph_config *c, const char *path, char *err, size_t errlen)
{
	struct ph_load l;

	l.c = *c;
	l.listen_seen = false;
	if (config_parse_file(path, ph_load_entry, &l, err, errlen) < 0)
		return -1;
	*c = l.c;
	return 0;
}

/* ---- checks ---- */

static int ph_check_key(const struct ph_config *c, const struct ph_key *k, char *err, size_t errlen)
{
	const char *field = (const char *)c + k->off;
	uint64_t u64;
	unsigned u;

	switch (k->type) {
	case PH_K_LISTEN:
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
		memcpy(&u, field, sizeof(u));
		return ph_range_check(k, u, err, errlen);
	case PH_K_SIZE:
	case PH_K_DURATION:
		memcpy(&u64, field, sizeof(u64));
		return ph_range_check(k, u64, err, errlen);
	case PH_K_BOOL:
		return 0;
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
	unsigned char addr[PH_LISTEN_MAX][17];
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
		const struct ph_listen *l = &c->listen[i];

		memset(addr[i], 0, sizeof(addr[i]));
		if (strnlen(l->host, sizeof(l->host)) == sizeof(l->host)) {
			config_err(err, errlen, "listen: host %u is not NUL-terminated", i + 1);
			return -1;
		}
		if (inet_pton(AF_INET, l->host, addr[i]) == 1) {
			addr[i][16] = 4;
		} else if (inet_pton(AF_INET6, l->host, addr[i]) == 1) {
			addr[i][16] = 6;
		} else {
			config_err(err, errlen, "listen: '%s' is not an IPv4 or IPv6 address", l->host);
			return -1;
		}
		for (unsigned j = 0; j < i && l->port != 0; j++) {
			if (c->listen[j].port == l->port && memcmp(addr[i], addr[j], 17) == 0) {
				ph_listen_format(l, a, sizeof(a));
				config_err(err, errlen, "listen: %s is given twice", a);
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
	return 0;
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

void ph_config_print(const struct ph_config *c, FILE *f)
{
	fputs("# posthaste: the effective configuration\n", f);
	for (size_t i = 0; i < ARRAY_SIZE(ph_keys); i++) {
		const struct ph_key *k = &ph_keys[i];
		const char *field = (const char *)c + k->off;
		char buf[96];
		uint64_t u64 = 0;
		unsigned u;
		bool b, zero = false;

		if (k->type == PH_K_LISTEN) {
			for (unsigned j = 0; j < c->nlisten && j < PH_LISTEN_MAX; j++) {
				ph_listen_format(&c->listen[j], buf, sizeof(buf));
				fprintf(f, "listen = %s\n", buf);
			}
			continue;
		}
		fprintf(f, "%s = ", k->name);
		switch (k->type) {
		case PH_K_LISTEN:
			break;
		case PH_K_PATH:
		case PH_K_HOSTNAME:
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
			memcpy(&u, field, sizeof(u));
			fprintf(f, "%u", u);
			zero = u == 0;
			break;
		case PH_K_SIZE:
			memcpy(&u64, field, sizeof(u64));
			config_size_format(u64, buf, sizeof(buf));
			fputs(buf, f);
			zero = u64 == 0;
			break;
		case PH_K_DURATION:
			memcpy(&u64, field, sizeof(u64));
			config_duration_format(u64, buf, sizeof(buf));
			fputs(buf, f);
			break;
		case PH_K_BOOL:
			memcpy(&b, field, sizeof(b));
			fputs(b ? "yes" : "no", f);
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
