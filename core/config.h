/*
 * config: a reader for `key = value` configuration files, with no knowledge
 * of any program's keys, and helpers that turn value strings into typed values.
 *
 * File format:
 *   - one `key = value` entry per line; lines end with LF (a CR before it is
 *     whitespace); a line holds at most CONFIG_LINE_MAX octets;
 *   - blank lines are ignored; `#` starts a comment when it is the first
 *     non-blank character of a line or follows a blank (space, tab, CR, FF, VT);
 *   - keys are [A-Za-z0-9_.-]+, case-insensitive, reported lowercased;
 *   - values are trimmed; a value that begins with `"` runs to the closing
 *     `"`, keeps its blanks and `#`, and knows two escapes, \" and \\; only
 *     blanks or a comment may follow the closing quote; an empty value is allowed;
 *   - a key may repeat: every occurrence is reported, in order.
 * A NUL octet, a line without '=', an empty or malformed key, an unterminated
 * quote or a bad escape stop the parse with "NAME:LINE: reason".
 *
 * Errors: 0 or -1 with a readable reason in err (NUL-terminated, truncated to
 * errlen). No state: every function is thread-safe.
 */
#ifndef POSTHASTE_CORE_CONFIG_H
#define POSTHASTE_CORE_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/compiler.h"

#define CONFIG_LINE_MAX 4096u           /* octets per line, without its LF */
#define CONFIG_FILE_MAX (1024u * 1024u) /* octets per file (config_parse_file) */

/*
 * Called once per entry, in file order. key (lowercased) and value (unquoted)
 * are NUL-terminated and valid only during the call; line counts from 1.
 * Return 0 to go on, or -1 with a reason in err (errlen octets) to stop the
 * parse: the parser then reports "NAME:LINE: reason".
 */
typedef int (*config_entry_fn)(void *arg, const char *key, const char *value, unsigned line,
                               char *err, size_t errlen);

/*
 * Parses len octets of buf (no terminator needed; the last line may lack its
 * LF). name is used in error messages (usually the file's path). Stops at
 * the first error. Returns 0, or -1 with "NAME:LINE: reason" in err.
 */
int config_parse_buffer(const char *name, const char *buf, size_t len, config_entry_fn entry,
                        void *arg, char *err, size_t errlen);

/*
 * Reads the whole file at path (at most CONFIG_FILE_MAX octets) and parses it
 * with config_parse_buffer, path as its name. Returns 0, or -1 with
 * "cannot read PATH: strerror" (a larger file: "File too large") or a parse error.
 */
int config_parse_file(const char *path, config_entry_fn entry, void *arg, char *err, size_t errlen);

/* ---- typed values: each returns 0 with *out set, or -1 with err and *out unchanged ---- */

/*
 * An octet count: decimal digits with an optional binary-multiple suffix,
 * k/K (2^10), m/M (2^20), g/G (2^30), t/T (2^40): "1024", "64k", "10M".
 * Values above UINT64_MAX are rejected.
 */
int config_size(const char *v, uint64_t *out, char *err, size_t errlen);

/*
 * A duration in milliseconds: decimal digits with a unit, ms, s, m
 * (minutes), h, d; a bare number is seconds: "250ms", "10s", "5m", "2h", "5d".
 * Values above UINT64_MAX milliseconds are rejected.
 */
int config_duration_ms(const char *v, uint64_t *out, char *err, size_t errlen);

/* yes/no, true/false, on/off, 1/0 (case-insensitive). */
int config_bool(const char *v, bool *out, char *err, size_t errlen);

/* A decimal integer in [min, max]. */
int config_uint(const char *v, unsigned min, unsigned max, unsigned *out, char *err, size_t errlen);

/*
 * HOST:PORT, [IPV6]:PORT, or :PORT (host "0.0.0.0", all IPv4 addresses).
 * host receives the host without brackets, NUL-terminated (hostlen octets
 * with the NUL); port is decimal 0-65535. An IPv6 address must be bracketed.
 * The host is not resolved: the caller checks what it accepts (e.g. literals).
 */
int config_hostport(const char *v, char *host, size_t hostlen, uint16_t *port, char *err,
                    size_t errlen);

/*
 * Formats n with the largest suffix that keeps it exact ("64M", "1000",
 * "0"), so config_size reads it back to n. buf: at least 24 octets.
 */
void config_size_format(uint64_t n, char *buf, size_t len);

/* Formats ms with the largest exact unit ("5m", "250ms", "0s"), read back by config_duration_ms. */
void config_duration_format(uint64_t ms, char *buf, size_t len);

/* Formats an error message into err (nothing when err is NULL or errlen 0). */
void config_err(char *err, size_t errlen, const char *fmt, ...) printf_like(3, 4);

#endif
