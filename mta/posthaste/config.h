/*
 * ph_config: the configuration of the posthaste daemon: its keys, their
 * defaults and checks, on top of core/config's file reader. The keys and the
 * file format are documented in docs/configuration.md.
 *
 * Order of precedence (main): ph_config_default, then ph_config_load_file,
 * then one ph_config_set per command-line flag, then ph_config_check.
 *
 * Errors: 0, or -1 with a readable reason in err (truncated to errlen).
 * Not thread-safe on one struct; no global state.
 */
#ifndef POSTHASTE_MTA_POSTHASTE_CONFIG_H
#define POSTHASTE_MTA_POSTHASTE_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "core/log.h"

enum ph_durability { PH_DURABILITY_FSYNC = 0, PH_DURABILITY_BATCH, PH_DURABILITY_NONE };

#define PH_LISTEN_MAX 16

struct ph_listen {
	char host[64]; /* an IPv4 or IPv6 literal, without brackets */
	uint16_t port; /* 0: any free port */
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
	char control_socket[108]; /* default "" = SPOOL_DIR/control.sock */
	/* built-in discard route for benchmarks: accept, make durable, then drop */
	bool discard;
	enum log_level log_level;  /* default info */
	uint64_t max_queue_age_ms; /* default 5 d (used by delivery later) */
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
 * Errors: "unknown key 'x'", "'route' is not supported yet ...", or
 * "KEY: reason" for a bad value (then *c is unchanged).
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

#endif
