#include "core/config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "core/compiler.h"

void config_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || !errlen)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

static bool config_blank(char ch)
{
	return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\f' || ch == '\v';
}

static bool config_key_char(char ch)
{
	return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
	       ch == '_' || ch == '.' || ch == '-';
}

/*
 * Parses one line (len octets, no LF, no NUL) into key and value (each at
 * least CONFIG_LINE_MAX + 1 octets). Returns 1 for an entry, 0 for a blank or
 * comment line, -1 with a reason.
 */
static int config_line(const char *s, size_t len, char *key, char *value, char *err, size_t errlen)
{
	size_t i = 0, kbeg, kend, n;

	while (i < len && config_blank(s[i]))
		i++;
	if (i == len || s[i] == '#')
		return 0;

	/* the key: up to '=', unless a comment starts first */
	kbeg = i;
	while (i < len && s[i] != '=' && !(s[i] == '#' && config_blank(s[i - 1])))
		i++;
	if (i == len || s[i] != '=') {
		config_err(err, errlen, "missing '=' (expected 'key = value')");
		return -1;
	}
	kend = i;
	while (kend > kbeg && config_blank(s[kend - 1]))
		kend--;
	if (kend == kbeg) {
		config_err(err, errlen, "empty key");
		return -1;
	}
	for (size_t k = kbeg; k < kend; k++) {
		if (!config_key_char(s[k])) {
			config_err(
			    err, errlen,
			    "invalid key '%.*s' (keys are letters, digits, '_', '.' and '-')",
			    (int)MIN(kend - kbeg, 64), s + kbeg);
			return -1;
		}
		key[k - kbeg] = (char)(s[k] >= 'A' && s[k] <= 'Z' ? s[k] - 'A' + 'a' : s[k]);
	}
	key[kend - kbeg] = '\0';

	/* the value */
	i++;
	while (i < len && config_blank(s[i]))
		i++;
	n = 0;
	if (i < len && s[i] == '"') {
		for (i++;; i++) {
			if (i == len) {
				config_err(err, errlen, "unterminated quoted value");
				return -1;
			}
			if (s[i] == '"')
				break;
			if (s[i] == '\\') {
				if (i + 1 == len) {
					config_err(err, errlen, "unterminated quoted value");
					return -1;
				}
				if (s[i + 1] != '"' && s[i + 1] != '\\') {
					if ((unsigned char)s[i + 1] >= 0x20 && s[i + 1] != 0x7f)
						config_err(err, errlen,
						           "invalid escape '\\%c' in quoted value "
						           "(only \\\" and \\\\)",
						           s[i + 1]);
					else
						config_err(
						    err, errlen,
						    "invalid escape '\\\\x%02x' in quoted value "
						    "(only \\\" and \\\\)",
						    (unsigned char)s[i + 1]);
					return -1;
				}
				i++;
			}
			value[n++] = s[i];
		}
		for (i++; i < len && config_blank(s[i]); i++)
			;
		if (i < len && s[i] != '#') {
			config_err(err, errlen, "unexpected text after the closing quote");
			return -1;
		}
	} else {
		size_t vbeg = i, vend;

		while (i < len && !(s[i] == '#' && config_blank(s[i - 1])))
			i++;
		vend = i;
		while (vend > vbeg && config_blank(s[vend - 1]))
			vend--;
		n = vend - vbeg;
		memcpy(value, s + vbeg, n);
	}
	value[n] = '\0';
	return 1;
}

int config_parse_buffer(const char *name, const char *buf, size_t len, config_entry_fn entry,
                        void *arg, char *err, size_t errlen)
{
	char *key = NULL, *value = NULL, reason[512];
	size_t off = 0;
	unsigned line = 0;
	int rc = -1;

	if (!name)
		name = "(config)";
	key = malloc(CONFIG_LINE_MAX + 1);
	value = malloc(CONFIG_LINE_MAX + 1);
	if (!key || !value) {
		config_err(err, errlen, "%s: out of memory", name);
		goto out;
	}
	while (off < len) {
		const char *s = buf + off;
		const char *lf = memchr(s, '\n', len - off);
		size_t n = lf ? (size_t)(lf - s) : len - off;
		int r;

		line++;
		off += n + (lf ? 1 : 0);
		if (n > CONFIG_LINE_MAX) {
			config_err(err, errlen, "%s:%u: line longer than %u octets", name, line,
			           CONFIG_LINE_MAX);
			goto out;
		}
		if (memchr(s, '\0', n)) {
			config_err(err, errlen, "%s:%u: NUL octet", name, line);
			goto out;
		}
		reason[0] = '\0';
		r = config_line(s, n, key, value, reason, sizeof(reason));
		if (r < 0) {
			config_err(err, errlen, "%s:%u: %s", name, line, reason);
			goto out;
		}
		if (r == 0)
			continue;
		if (entry(arg, key, value, line, reason, sizeof(reason)) != 0) {
			config_err(err, errlen, "%s:%u: %s", name, line,
			           reason[0] ? reason : "invalid entry");
			goto out;
		}
	}
	rc = 0;
out:
	free(key);
	free(value);
	return rc;
}

int config_parse_file(const char *path, config_entry_fn entry, void *arg, char *err, size_t errlen)
{
	char *buf;
	size_t len = 0;
	int fd, rc, e = 0;

	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	if (fd < 0) {
		config_err(err, errlen, "cannot read %s: %s", path, strerror(errno));
		return -1;
	}
	buf = malloc(CONFIG_FILE_MAX + 1);
	if (!buf) {
		close(fd);
		config_err(err, errlen, "cannot read %s: %s", path, strerror(ENOMEM));
		return -1;
	}
	/* one octet more than allowed tells a file that is too large */
	while (len < CONFIG_FILE_MAX + 1) {
		ssize_t r = read(fd, buf + len, CONFIG_FILE_MAX + 1 - len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			e = errno;
			break;
		}
		if (r == 0)
			break;
		len += (size_t)r;
	}
	close(fd);
	if (!e && len > CONFIG_FILE_MAX)
		e = EFBIG;
	if (e) {
		free(buf);
		config_err(err, errlen, "cannot read %s: %s", path, strerror(e));
		return -1;
	}
	rc = config_parse_buffer(path, buf, len, entry, arg, err, errlen);
	free(buf);
	return rc;
}

/* ---- typed values ---- */

/*
 * Leading decimal digits of v into *n, *end after them: 1, or 0 without
 * digits, or -1 when they do not fit in 64 bits.
 */
static int config_digits(const char *v, uint64_t *n, const char **end)
{
	uint64_t x = 0;
	const char *p = v;
	bool over = false;

	for (; *p >= '0' && *p <= '9'; p++) {
		unsigned d = (unsigned)(*p - '0');
		if (x > (UINT64_MAX - d) / 10)
			over = true;
		else
			x = x * 10 + d;
	}
	*end = p;
	*n = x;
	return p == v ? 0 : over ? -1 : 1;
}

/* The value as shown in an error message: at most 64 octets, then "...". */
#define SHOW_FMT "'%.64s%s'"
#define SHOW(v)  (v), (strlen(v) > 64 ? "..." : "")

int config_size(const char *v, uint64_t *out, char *err, size_t errlen)
{
	const char *end;
	uint64_t n, mul = 1;
	int r = config_digits(v, &n, &end);

	if (r == 0)
		goto bad;
	switch (*end) {
	case '\0':
		break;
	case 'k':
	case 'K':
		mul = 1ull << 10;
		break;
	case 'm':
	case 'M':
		mul = 1ull << 20;
		break;
	case 'g':
	case 'G':
		mul = 1ull << 30;
		break;
	case 't':
	case 'T':
		mul = 1ull << 40;
		break;
	default:
		goto bad;
	}
	if (*end && end[1])
		goto bad;
	if (r < 0 || n > UINT64_MAX / mul) {
		config_err(err, errlen, "size " SHOW_FMT " is too large", SHOW(v));
		return -1;
	}
	*out = n * mul;
	return 0;
bad:
	config_err(err, errlen,
	           "invalid size " SHOW_FMT
	           " (expected digits with an optional k, M, G or T suffix)",
	           SHOW(v));
	return -1;
}

int config_duration_ms(const char *v, uint64_t *out, char *err, size_t errlen)
{
	static const struct {
		const char *unit;
		uint64_t ms;
	} units[] = {
	    {"", 1000}, {"ms", 1}, {"s", 1000}, {"m", 60000}, {"h", 3600000}, {"d", 86400000},
	};
	const char *end;
	uint64_t n;
	int r = config_digits(v, &n, &end);

	if (r != 0) {
		for (size_t i = 0; i < ARRAY_SIZE(units); i++) {
			if (strcmp(end, units[i].unit) != 0)
				continue;
			if (r < 0 || n > UINT64_MAX / units[i].ms) {
				config_err(err, errlen, "duration " SHOW_FMT " is too large",
				           SHOW(v));
				return -1;
			}
			*out = n * units[i].ms;
			return 0;
		}
	}
	config_err(err, errlen,
	           "invalid duration " SHOW_FMT " (expected digits with a unit: ms, s, m, h or d)",
	           SHOW(v));
	return -1;
}

int config_bool(const char *v, bool *out, char *err, size_t errlen)
{
	static const char *const yes[] = {"yes", "true", "on", "1"};
	static const char *const no[] = {"no", "false", "off", "0"};

	for (size_t i = 0; i < ARRAY_SIZE(yes); i++) {
		if (strcasecmp(v, yes[i]) == 0) {
			*out = true;
			return 0;
		}
		if (strcasecmp(v, no[i]) == 0) {
			*out = false;
			return 0;
		}
	}
	config_err(err, errlen,
	           "invalid boolean " SHOW_FMT " (expected yes, no, true, false, on, "
	           "off, 1 or 0)",
	           SHOW(v));
	return -1;
}

int config_uint(const char *v, unsigned min, unsigned max, unsigned *out, char *err, size_t errlen)
{
	const char *end;
	uint64_t n;
	int r = config_digits(v, &n, &end);

	if (r == 0 || *end) {
		config_err(err, errlen, "invalid number " SHOW_FMT " (expected decimal digits)",
		           SHOW(v));
		return -1;
	}
	if (r < 0 || n < min || n > max) {
		config_err(err, errlen, "number " SHOW_FMT " is out of range (%u to %u)", SHOW(v),
		           min, max);
		return -1;
	}
	*out = (unsigned)n;
	return 0;
}

int config_hostport(const char *v, char *host, size_t hostlen, uint16_t *port, char *err,
                    size_t errlen)
{
	const char *h, *p, *colon;
	size_t hlen;
	uint64_t n;
	const char *end;
	int r;

	if (v[0] == '[') {
		const char *close = strchr(v, ']');
		if (!close || close[1] != ':') {
			config_err(err, errlen,
			           "invalid address " SHOW_FMT " (expected [IPV6]:PORT)", SHOW(v));
			return -1;
		}
		h = v + 1;
		hlen = (size_t)(close - h);
		p = close + 2;
		if (hlen == 0) {
			config_err(err, errlen, "invalid address " SHOW_FMT " (empty host)",
			           SHOW(v));
			return -1;
		}
	} else {
		colon = strrchr(v, ':');
		if (!colon) {
			config_err(err, errlen,
			           "invalid address " SHOW_FMT " (expected HOST:PORT, [IPV6]:PORT "
			           "or :PORT)",
			           SHOW(v));
			return -1;
		}
		if (memchr(v, ':', (size_t)(colon - v))) {
			config_err(err, errlen,
			           "invalid address " SHOW_FMT
			           " (an IPv6 address goes in brackets: "
			           "[::1]:25)",
			           SHOW(v));
			return -1;
		}
		h = v;
		hlen = (size_t)(colon - v);
		p = colon + 1;
		if (hlen == 0) {
			h = "0.0.0.0";
			hlen = strlen(h);
		}
	}
	for (size_t i = 0; i < hlen; i++) {
		unsigned char ch = (unsigned char)h[i];
		if (ch <= ' ' || ch >= 0x7f || ch == '[' || ch == ']' || ch == '/') {
			config_err(err, errlen,
			           "invalid address " SHOW_FMT " (bad character in host)", SHOW(v));
			return -1;
		}
	}
	r = config_digits(p, &n, &end);
	if (r == 0 || *end) {
		config_err(err, errlen, "invalid address " SHOW_FMT " (missing or invalid port)",
		           SHOW(v));
		return -1;
	}
	if (r < 0 || n > 65535) {
		config_err(err, errlen, "invalid address " SHOW_FMT " (port above 65535)", SHOW(v));
		return -1;
	}
	if (hlen + 1 > hostlen) {
		config_err(err, errlen,
		           "invalid address " SHOW_FMT " (host longer than %zu octets)", SHOW(v),
		           hostlen ? hostlen - 1 : 0);
		return -1;
	}
	memcpy(host, h, hlen);
	host[hlen] = '\0';
	*port = (uint16_t)n;
	return 0;
}

void config_size_format(uint64_t n, char *buf, size_t len)
{
	static const char suffix[] = "TGMK";
	unsigned shift = 40;

	for (size_t i = 0; i < 4 && n; i++, shift -= 10) {
		uint64_t unit = 1ull << shift;
		if (n % unit == 0) {
			snprintf(buf, len, "%llu%c", (unsigned long long)(n / unit), suffix[i]);
			return;
		}
	}
	snprintf(buf, len, "%llu", (unsigned long long)n);
}

void config_duration_format(uint64_t ms, char *buf, size_t len)
{
	static const struct {
		const char *unit;
		uint64_t ms;
	} units[] = {{"d", 86400000}, {"h", 3600000}, {"m", 60000}, {"s", 1000}};

	for (size_t i = 0; i < ARRAY_SIZE(units) && ms; i++) {
		if (ms % units[i].ms == 0) {
			snprintf(buf, len, "%llu%s", (unsigned long long)(ms / units[i].ms),
			         units[i].unit);
			return;
		}
	}
	snprintf(buf, len, ms ? "%llums" : "%llus", (unsigned long long)ms);
}
