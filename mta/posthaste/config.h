/*
 * ph_config: the configuration of the posthaste daemon: its keys, their
 * defaults and checks, on top of core/config's file reader. The keys and the
 * file format are documented in docs/configuration.md.
 *
 * Order of precedence (main): ph_config_default, then ph_config_load_file,
 * then one ph_config_set per command-line flag, then ph_config_check.
 *
 * Errors: 0, or -1 with a readable reason in err (truncated to errlen).
 * Not thread-safe on one struct; no global state. The struct is large
 * (about 100 KiB: routes, destinations, paths): better not on a small stack.
 */
#ifndef POSTHASTE_MTA_POSTHASTE_CONFIG_H
#define POSTHASTE_MTA_POSTHASTE_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/socket.h>

#include "core/log.h"

enum ph_durability { PH_DURABILITY_FSYNC = 0, PH_DURABILITY_BATCH, PH_DURABILITY_NONE };

#define PH_LISTEN_MAX 16

struct ph_listen {
	char host[64]; /* an IPv4 or IPv6 literal, without brackets */
	uint16_t port; /* 0: any free port */
};

#define PH_ROUTE_MAX 64  /* route.DOMAIN keys */
#define PH_DEST_MAX  64  /* destination.DOMAIN keys */
#define PH_HOSTS_LEN 512 /* a host list, with its NUL */
#define PH_HOSTS_MAX 16  /* hosts in one list (route, smarthost): size of a ph_hostport array */

/* count per per_ms milliseconds; count 0 = unlimited (then per_ms is 0 too). */
struct ph_rate {
	uint32_t count;
	uint64_t per_ms;
};

/* Limits of delivery to one destination (a site: the hosts of a domain). */
struct ph_limits {
	unsigned concurrency;     /* connections per destination; default 20; 1..10000 */
	struct ph_rate msg_rate;  /* messages; default unlimited */
	struct ph_rate conn_rate; /* new connections; default unlimited */
	unsigned msgs_per_conn;   /* messages per connection before QUIT; default 100; 1..1000000 */
	uint64_t idle_timeout_ms; /* an idle connection is closed after; default 5 s; 1ms..1d */
	unsigned tls;             /* enum ph_tls: STARTTLS policy; default may */
	unsigned tls_verify;      /* enum ph_tls_verify: certificate check; default none */
};

/* Outbound STARTTLS policy of a destination (delivery_tls, destination.D = tls=...). */
enum ph_tls {
	PH_TLS_NONE = 0, /* never STARTTLS */
	PH_TLS_MAY,      /* when offered; a failed handshake: once more in plaintext */
	PH_TLS_REQUIRE,  /* not offered or failed: the message is deferred (4.7.5) */
};

/* How the server's certificate is checked (delivery_tls_verify, verify=...). */
enum ph_tls_verify {
	PH_TLS_VERIFY_NONE = 0, /* opportunistic: any certificate */
	PH_TLS_VERIFY_NAME,     /* chain to the system CAs and the MX host name */
};

/*
 * route.DOMAIN = HOSTS. domain: lower-case; hosts: "HOST[:PORT][,HOST[:PORT]...]"
 * as written less any blanks (valid for ph_hosts_parse, up to PH_HOSTS_MAX hosts).
 */
struct ph_route {
	char domain[256];
	char hosts[PH_HOSTS_LEN];
};

/* destination.DOMAIN = k=v ...: domain lower-case; lim complete (see ph_config_set). */
struct ph_dest {
	char domain[256];
	struct ph_limits lim;
};

#define PH_NETWORKS_MAX 64 /* networks in mynetworks: size of a ph_net array */

/*
 * One network of mynetworks (ph_networks_parse): family AF_INET (addr[0..4),
 * the rest 0; prefix 0..32) or AF_INET6 (addr[0..16); prefix 0..128); the
 * bits of addr after the prefix are 0.
 */
struct ph_net {
	int family;
	uint8_t addr[16];
	unsigned prefix;
};

/* One host of a host list (ph_hosts_parse). */
struct ph_hostport {
	char host[256]; /* a host name, or an IP address without its brackets */
	uint16_t port;  /* 1..65535; 25 when the list omits it */
	bool literal;   /* [IP] or a bare IPv4 address: no MX/A lookup */
};

struct ph_config {
	struct ph_listen listen[PH_LISTEN_MAX];
	unsigned nlisten;              /* default: 127.0.0.1:2525 */
	char spool_dir[4096];          /* default "./var/spool" */
	enum ph_durability durability; /* default fsync */
	uint64_t batch_interval_ms;    /* default 10 */
	unsigned workers;              /* 0 = one per CPU */
	char hostname[256];            /* "" = gethostname() */
	uint64_t message_size_limit;   /* default 64 MiB */
	unsigned recipient_limit;      /* default 1000 */
	uint64_t command_timeout_ms;   /* default 300 s */
	uint64_t data_timeout_ms;      /* default 180 s */
	/* refuse new mail when the spool's file system has less free; default 256 MiB */
	uint64_t spool_reserve;
	/* write the spool with O_DIRECT where the file system takes it (default yes) */
	bool spool_direct_io;
	char control_socket[108]; /* default "" = SPOOL_DIR/control.sock */
	/* built-in discard route for benchmarks: accept, make durable, then drop */
	bool discard;
	/* deliver queued mail (default yes); no: mail waits in the queue (tests, maintenance) */
	bool delivery;
	enum log_level log_level;  /* default info */
	uint64_t max_queue_age_ms; /* default 5 d */
	/* AUTH (docs/auth.md); all default no */
	bool smtp_auth;             /* offer AUTH PLAIN LOGIN (needs users_file) */
	bool smtp_auth_required;    /* MAIL before AUTH gets 530 5.7.0 (needs smtp_auth) */
	bool smtp_auth_without_tls; /* offer AUTH without TLS: passwords in clear (tests only) */
	unsigned auth_threads;      /* password-check threads; 0 = max(1, CPUs / 2) */
	/* after AUTH, MAIL FROM must be one of the user's addresses (default yes; docs/auth.md) */
	bool smtp_sender_login_check;
	/* TLS (docs/tls.md); "" = none */
	char tls_cert[4096]; /* PEM: the certificate then its chain; with it STARTTLS is offered */
	char tls_key[4096];  /* PEM: the private key (may be the tls_cert file) */
	/* submission (RFC 6409: STARTTLS, AUTH required) and submissions (RFC 8314: implicit
	   TLS, AUTH required) listeners; host "" = none (default) */
	struct ph_listen submission_listen;
	struct ph_listen submissions_listen;
	/* per-client-address limits (docs/smtp-server.md, "Client limits") */
	unsigned client_connection_limit;     /* open connections; default 50; 0 = none */
	struct ph_rate client_connection_rate; /* new connections; default unlimited */
	struct ph_rate client_message_rate;    /* MAIL commands; default unlimited */
	bool client_limit_exempt_mynetworks;   /* mynetworks clients are not limited; default yes */

	/* ---- delivery (docs/configuration.md, "Delivery") ---- */
	/* "" = the system's resolv.conf; else "IP:PORT[,IP:PORT...]" normalised: no blanks */
	char resolver[256];
	/* "" = none (deliver by MX); else the hosts of every non-local domain without a route */
	char smarthost[PH_HOSTS_LEN]; /* like ph_route.hosts */
	struct ph_route routes[PH_ROUTE_MAX];
	unsigned nroutes;
	/* comma/blank-separated list, stored normalised: lower-case, single commas, no blanks */
	char local_domains[4096];
	/*
	 * The clients that may relay to any domain: "CIDR[,CIDR...]" normalised
	 * (ph_networks_parse's input, canonical addresses, prefix always written);
	 * default "127.0.0.0/8,::1/128"; "" = none.
	 */
	char mynetworks[1024];
	/* domains accepted from any client besides local_domains (a backup MX's); like local_domains */
	char relay_domains[4096];
	char users_file[4096];   /* "" default; required when local_domains is set */
	char mailbox_root[4096]; /* default "./var/mail" */
	struct ph_limits limits; /* the default per-destination limits (delivery_*) */
	struct ph_dest dests[PH_DEST_MAX];
	unsigned ndests;
	uint64_t retry_min_ms;       /* first retry after; default 5 min; 10ms..1d */
	uint64_t retry_max_ms;       /* backoff cap; default 1 h; 10ms..7d, >= retry_min */
	/* a message still deferred this long after arrival gets one delay DSN (NOTIFY=DELAY or
	   no NOTIFY; docs/bounces.md); default 4 h; 0 = never; 0..365d */
	uint64_t delay_warning_ms;
	uint64_t connect_timeout_ms; /* default 30 s; 1ms..1d */
	/* default "./var/log/accounting.jsonl"; "none" = off; "-" = standard output */
	char accounting_log[4096];
	/* messages being delivered at once per worker; default 10000; 1..1000000 */
	unsigned delivery_active_max;
};

/* Fills *c with the defaults (every octet of *c is written: memcmp-stable). */
void ph_config_default(struct ph_config *c);

/*
 * Applies the file at path over the current values of *c. The first "listen"
 * of the file clears the listeners set before it (the defaults); later ones
 * add to the list. Any other key that repeats: the last one wins. On error *c
 * is left unchanged and err holds "PATH:LINE: reason" or "cannot read PATH: ...".
 */
int ph_config_load_file(struct ph_config *c, const char *path, char *err, size_t errlen);

/* The same for len octets of buf, name standing for the path in errors (tests, fuzzing). */
int ph_config_load_buffer(struct ph_config *c, const char *name, const char *buf, size_t len,
                          char *err, size_t errlen);

/*
 * Sets one key (case-insensitive) from its string value, as from a file or a
 * command-line flag. "listen" adds one listener (at most PH_LISTEN_MAX); the
 * caller clears nlisten first when a new list should replace the old one.
 * "route.DOMAIN" and "destination.DOMAIN" add an entry for DOMAIN, or replace
 * the one DOMAIN already has (at most PH_ROUTE_MAX / PH_DEST_MAX domains).
 * A destination copies the default limits (delivery_*) in force when it is
 * set and overrides the ones its value names; so a delivery_* key after a
 * destination.* key is refused ("KEY: must come before ...").
 * Errors: "unknown key 'x'", or "KEY: reason" for a bad value (then *c is
 * unchanged).
 */
int ph_config_set(struct ph_config *c, const char *key, const char *value, char *err,
                  size_t errlen);

/* Checks every field's range and the fields against each other. */
int ph_config_check(const struct ph_config *c, char *err, size_t errlen);

/*
 * Writes the configuration as `key = value` lines, every key, in the order
 * of docs/configuration.md. Loading the output over ph_config_default gives
 * back an equal configuration (for any configuration that passes ph_config_check).
 */
void ph_config_print(const struct ph_config *c, FILE *f);

/* ---- for delivery ---- */

/* The limits of destination.DOMAIN (exact match, case-insensitive), else c->limits. */
const struct ph_limits *ph_config_limits_for(const struct ph_config *c, const char *domain);

/* The hosts of route.DOMAIN (exact match, case-insensitive), or NULL. */
const char *ph_config_route_for(const struct ph_config *c, const char *domain);

/* Whether the len octets at domain name one of local_domains (case-insensitive). */
bool ph_config_is_local(const struct ph_config *c, const char *domain, size_t len);

/* Whether the len octets at domain name one of relay_domains (case-insensitive, exact). */
bool ph_config_is_relay_domain(const struct ph_config *c, const char *domain, size_t len);

/* ---- relay access (mynetworks) ---- */

/*
 * Parses a network list: entries separated by commas and/or blanks (empty
 * entries are skipped), each ADDRESS or ADDRESS/PREFIX; ADDRESS an IPv4 or
 * IPv6 address, optionally in brackets ([::1]/128, [2001:db8::]/32); PREFIX
 * 0..32 (IPv4) or 0..128 (IPv6); a bare address is /32 or /128. The bits
 * after the prefix must be 0 ("10.0.0.1/8 has host bits set"). Fills
 * out[0..count) in the order given (out may be NULL to only check) and
 * returns the count (0 for an empty or blank list), or -1 with a reason in
 * err (without the key's name): a bad address or prefix, host bits set,
 * more than max networks.
 */
int ph_networks_parse(const char *list, struct ph_net *out, unsigned max, char *err,
                      size_t errlen);

/*
 * Whether the address of sa (AF_INET or AF_INET6; anything else, or NULL,
 * matches nothing) is in one of nets[0..n). An IPv4-mapped IPv6 address
 * (::ffff:a.b.c.d, as a dual-stack socket reports IPv4 clients) matches the
 * IPv4 entries as a.b.c.d would; and an IPv4 address matches the IPv6 entries
 * that hold its mapped form (::ffff:0:0/96, ::/0), so the result does not
 * depend on the kind of listening socket.
 */
bool ph_networks_match(const struct ph_net *nets, unsigned n, const struct sockaddr_storage *sa);

/*
 * Parses a host list, "HOST[:PORT][,HOST[:PORT]...]" (blanks around the
 * commas allowed): each HOST a host name (letters, digits, '-', '.'), an
 * IPv4 address, or an IPv4 or IPv6 address in brackets ([192.0.2.1],
 * [::1]:2526); PORT 1..65535, 25 when omitted. Fills out[0..count) (out
 * may be NULL to only check) and returns the count (>= 1), or -1 with a
 * reason in err: an empty list, more than max hosts, a bad host or port.
 */
int ph_hosts_parse(const char *hosts, struct ph_hostport *out, unsigned max, char *err,
                   size_t errlen);

#endif
