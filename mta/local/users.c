/* The local users file: see users.h for the format and the contract. */
#include "mta/local/users.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/compiler.h"

#define NO_ENTRY UINT32_MAX

struct user {
	const char *address; /* lower-cased, NUL-terminated, in the pool */
	const char *hash;    /* as written; "" when empty */
	const char *maildir; /* NULL: the default under mailbox_root */
	uint16_t addr_len;
	uint16_t at; /* offset of the '@' between local part and domain */
	unsigned line;
};

/* One address, a user's own or an alias, as the hash table sees it. */
struct addr_ent {
	const char *s;
	uint64_t hash;
	uint32_t len;
	uint32_t user; /* index into users[] */
	unsigned line;
};

struct users {
	char *pool; /* the file's octets, fields NUL-terminated in place */
	size_t pool_cap;
	struct user *users;
	size_t nusers, users_cap;
	struct addr_ent *addrs;
	size_t naddrs, addrs_cap;
	uint32_t *table;  /* open addressing, linear probing: indices into addrs[] */
	size_t table_cap; /* a power of two, at least twice naddrs */
};

/* ---- errors ---- */

printf_like(3, 4) static void users_err(char *err, size_t errlen, const char *fmt, ...)
{
	if (!err || !errlen)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

/* ---- the address table ---- */

static uint64_t addr_hash(const char *s, size_t len)
{
	uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
	for (size_t i = 0; i < len; i++) {
		h ^= (unsigned char)s[i];
		h *= 0x100000001b3ull;
	}
	return h ^ (h >> 29);
}

static const struct addr_ent *table_get(const struct users *u, const char *s, size_t len)
{
	if (!u->table_cap)
		return NULL;
	uint64_t h = addr_hash(s, len);
	size_t mask = u->table_cap - 1;
	for (size_t i = (size_t)h & mask;; i = (i + 1) & mask) {
		uint32_t idx = u->table[i];
		if (idx == NO_ENTRY)
			return NULL;
		const struct addr_ent *e = &u->addrs[idx];
		if (e->hash == h && e->len == len && memcmp(e->s, s, len) == 0)
			return e;
	}
}

static void table_put(uint32_t *table, size_t cap, const struct addr_ent *addrs, uint32_t idx)
{
	size_t mask = cap - 1;
	size_t i = (size_t)addrs[idx].hash & mask;
	while (table[i] != NO_ENTRY)
		i = (i + 1) & mask;
	table[i] = idx;
}

/* Doubles the table (at least 64 slots) and puts every address back. -ENOMEM. */
static int table_grow(struct users *u)
{
	size_t cap = u->table_cap ? u->table_cap * 2 : 64;
	uint32_t *t = malloc(cap * sizeof(*t));
	if (!t)
		return -ENOMEM;
	memset(t, 0xff, cap * sizeof(*t));
	for (size_t i = 0; i < u->naddrs; i++)
		table_put(t, cap, u->addrs, (uint32_t)i);
	free(u->table);
	u->table = t;
	u->table_cap = cap;
	return 0;
}

/* Grows *p (n used of *cap elements of size sz) to hold one more. -ENOMEM. */
static int grow(void **p, size_t *cap, size_t n, size_t sz)
{
	if (n < *cap)
		return 0;
	size_t c = *cap ? *cap * 2 : 64;
	void *q = realloc(*p, c * sz);
	if (!q)
		return -ENOMEM;
	*p = q;
	*cap = c;
	return 0;
}

/* ---- the parser ---- */

struct parse {
	struct users *u;
	const char *name;
	unsigned line;
	char *err;
	size_t errlen;
	bool oom;
};

printf_like(2, 3) static int bad(struct parse *ps, const char *fmt, ...)
{
	char reason[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(reason, sizeof(reason), fmt, ap);
	va_end(ap);
	users_err(ps->err, ps->errlen, "%s:%u: %s", ps->name, ps->line, reason);
	return -1;
}

static int out_of_memory(struct parse *ps)
{
	ps->oom = true;
	users_err(ps->err, ps->errlen, "%s: out of memory", ps->name);
	return -1;
}

static bool is_blank(char c)
{
	return c == ' ' || c == '\t';
}

/* Trims blanks around [*s, *s + *n). */
static void trim(char **s, size_t *n)
{
	while (*n && is_blank((*s)[0])) {
		(*s)++;
		(*n)--;
	}
	while (*n && is_blank((*s)[*n - 1]))
		(*n)--;
}

/*
 * Checks and lower-cases the address at [s, s + n) (`what` is "address" or
 * "alias"); *at gets the offset of its last '@'. 0 or -1 with the error set.
 */
static int check_address(struct parse *ps, char *s, size_t n, const char *what, size_t *at)
{
	if (!n)
		return bad(ps, "empty %s", what);
	if (n > USERS_ADDRESS_MAX)
		return bad(ps, "%s longer than %u octets", what, USERS_ADDRESS_MAX);
	size_t a = n;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c <= ' ' || c == 0x7f || c == '/' || c == ',')
			return bad(ps, "bad octet 0x%02x in %s (octet %zu)", c, what, i + 1);
		if (c >= 'A' && c <= 'Z')
			s[i] = (char)(c - 'A' + 'a');
		else if (c == '@')
			a = i;
	}
	if (a == n)
		return bad(ps, "%s without @: %.*s", what, (int)n, s);
	if (a == 0)
		return bad(ps, "empty local part in %s %.*s", what, (int)n, s);
	if (a == n - 1)
		return bad(ps, "empty domain in %s %.*s", what, (int)n, s);
	if (s[0] == '.' || s[a + 1] == '.')
		return bad(ps, "%s %.*s: local part or domain starts with '.'", what, (int)n, s);
	*at = a;
	return 0;
}

/* Enters the checked address [s, s + n), s NUL-terminated, for user index ui. */
static int add_address(struct parse *ps, const char *s, size_t n, uint32_t ui)
{
	struct users *u = ps->u;
	const struct addr_ent *old = table_get(u, s, n);
	if (old)
		return bad(ps, "duplicate address %s (first on line %u)", s, old->line);
	if (u->naddrs >= USERS_ADDRESSES_MAX)
		return bad(ps, "more than %u addresses", USERS_ADDRESSES_MAX);
	if (grow((void **)&u->addrs, &u->addrs_cap, u->naddrs, sizeof(*u->addrs)) < 0)
		return out_of_memory(ps);
	if ((u->naddrs + 1) * 2 > u->table_cap && table_grow(u) < 0)
		return out_of_memory(ps);
	struct addr_ent *e = &u->addrs[u->naddrs];
	e->s = s;
	e->len = (uint32_t)n;
	e->hash = addr_hash(s, n);
	e->user = ui;
	e->line = ps->line;
	table_put(u->table, u->table_cap, u->addrs, (uint32_t)u->naddrs);
	u->naddrs++;
	return 0;
}

static const char *const hash_schemes[] = {"$y$", "$gy$", "$7$", "$2b$", "$6$", "$5$"};

static int check_hash(struct parse *ps, const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		char c = s[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '.' || c == '/' || c == '$' || c == '=' || c == '!' || c == '*'))
			return bad(ps, "bad octet 0x%02x in password hash (octet %zu)",
			           (unsigned char)c, i + 1);
	}
	if (n == 0 || (n == 1 && s[0] == '*') || s[0] == '!')
		return 0;
	for (size_t i = 0; i < ARRAY_SIZE(hash_schemes); i++) {
		size_t l = strlen(hash_schemes[i]);
		if (n > l && memcmp(s, hash_schemes[i], l) == 0)
			return 0;
	}
	return bad(ps, "unsupported password hash (want $y$, $gy$, $7$, $2b$, $6$ or $5$; "
	               "empty, * or ! for no login)");
}

static int check_maildir(struct parse *ps, const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c < ' ' || c == 0x7f)
			return bad(ps, "bad octet 0x%02x in maildir (octet %zu)", c, i + 1);
	}
	if (s[0] != '/')
		return bad(ps, "maildir %s is not an absolute path", s);
	return 0;
}

/*
 * One line [p, end), *end writable (the LF or CR after it, or the pool's
 * terminator). Fields are NUL-terminated in place. 0 or -1.
 */
static int parse_line(struct parse *ps, char *p, char *end)
{
	struct users *u = ps->u;
	char *f[4];
	size_t fl[4], nf = 0;

	/* split at ':' into at most four fields */
	char *s = p;
	for (;;) {
		char *c = memchr(s, ':', (size_t)(end - s));
		char *fe = c ? c : end;
		if (nf == 4)
			return bad(ps,
			           "too many fields (want address:password-hash:maildir:aliases)");
		f[nf] = s;
		fl[nf] = (size_t)(fe - s);
		nf++;
		if (!c)
			break;
		s = c + 1;
	}
	if (nf < 2)
		return bad(ps, "no ':' after the address");
	for (size_t i = 0; i < nf; i++) {
		trim(&f[i], &fl[i]);
		f[i][fl[i]] = '\0'; /* the blank, ':' or end after the field */
	}
	for (size_t i = nf; i < 4; i++) {
		f[i] = f[nf - 1] + fl[nf - 1]; /* an empty string */
		fl[i] = 0;
	}

	size_t at;
	if (check_address(ps, f[0], fl[0], "address", &at) < 0 || check_hash(ps, f[1], fl[1]) < 0)
		return -1;
	if (fl[2] && check_maildir(ps, f[2], fl[2]) < 0)
		return -1;
	if (u->nusers >= USERS_MAX)
		return bad(ps, "more than %u users", USERS_MAX);
	if (grow((void **)&u->users, &u->users_cap, u->nusers, sizeof(*u->users)) < 0)
		return out_of_memory(ps);
	uint32_t ui = (uint32_t)u->nusers;
	if (add_address(ps, f[0], fl[0], ui) < 0)
		return -1;
	u->users[ui] = (struct user){
	    .address = f[0],
	    .hash = f[1],
	    .maildir = fl[2] ? f[2] : NULL,
	    .addr_len = (uint16_t)fl[0],
	    .at = (uint16_t)at,
	    .line = ps->line,
	};
	u->nusers++;

	/* aliases: the fourth field, comma-separated */
	char *a = f[3], *aend = f[3] + fl[3];
	while (fl[3]) {
		char *c = memchr(a, ',', (size_t)(aend - a));
		char *e = c ? c : aend;
		char *s2 = a;
		size_t n = (size_t)(e - a);
		trim(&s2, &n);
		if (!n)
			return bad(ps, "empty alias");
		s2[n] = '\0';
		size_t aat;
		if (check_address(ps, s2, n, "alias", &aat) < 0 || add_address(ps, s2, n, ui) < 0)
			return -1;
		if (!c)
			break;
		a = c + 1;
	}
	return 0;
}

static void users_release(struct users *u)
{
	if (!u)
		return;
	if (u->pool) {
		explicit_bzero(u->pool, u->pool_cap);
		free(u->pool);
	}
	if (u->users) {
		explicit_bzero(u->users, u->users_cap * sizeof(*u->users));
		free(u->users);
	}
	free(u->addrs);
	free(u->table);
	explicit_bzero(u, sizeof(*u));
	free(u);
}

/*
 * Parses the len octets at pool (cap >= len + 1 octets, owned: kept by the
 * table on success, wiped and freed on failure).
 */
static struct users *users_parse_owned(const char *name, char *pool, size_t len, size_t cap,
                                       char *err, size_t errlen)
{
	if (err && errlen)
		err[0] = '\0';
	struct users *u = calloc(1, sizeof(*u));
	if (!u) {
		explicit_bzero(pool, cap);
		free(pool);
		users_err(err, errlen, "%s: out of memory", name);
		return NULL;
	}
	u->pool = pool;
	u->pool_cap = cap;
	pool[len] = '\0';
	struct parse ps = {.u = u, .name = name, .err = err, .errlen = errlen};

	for (size_t pos = 0; pos < len;) {
		ps.line++;
		char *p = pool + pos;
		char *nl = memchr(p, '\n', len - pos);
		size_t eol = nl ? (size_t)(nl - pool) : len;
		pos = nl ? eol + 1 : len;
		if (eol - (size_t)(p - pool) > USERS_LINE_MAX) {
			bad(&ps, "line longer than %u octets", USERS_LINE_MAX);
			goto fail;
		}
		char *end = pool + eol;
		if (memchr(p, '\0', (size_t)(end - p))) {
			bad(&ps, "NUL octet in line");
			goto fail;
		}
		if (end > p && end[-1] == '\r')
			end--;
		*end = '\0';
		while (p < end && is_blank(*p))
			p++;
		if (p == end || *p == '#')
			continue;
		if (parse_line(&ps, p, end) < 0)
			goto fail;
	}
	return u;

fail:
	users_release(u);
	return NULL;
}

struct users *users_load_buffer(const char *name, const char *buf, size_t len, char *err,
                                size_t errlen)
{
	if (len > USERS_FILE_MAX) {
		users_err(err, errlen, "%s: larger than %u octets", name, USERS_FILE_MAX);
		return NULL;
	}
	char *pool = malloc(len + 1);
	if (!pool) {
		users_err(err, errlen, "%s: out of memory", name);
		return NULL;
	}
	if (len)
		memcpy(pool, buf, len);
	return users_parse_owned(name, pool, len, len + 1, err, errlen);
}

struct users *users_load(const char *path, char *err, size_t errlen)
{
	struct stat st;
	size_t len = 0, cap;
	char *buf;
	int e = 0;

	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	if (fd < 0) {
		users_err(err, errlen, "cannot read %s: %s", path, strerror(errno));
		return NULL;
	}
	/* sized by fstat; one octet more than allowed tells a file that is too large */
	cap = fstat(fd, &st) == 0 && st.st_size >= 0 && (uint64_t)st.st_size < USERS_FILE_MAX
	          ? (size_t)st.st_size + 2
	          : USERS_FILE_MAX + 2;
	buf = malloc(cap);
	if (!buf) {
		close(fd);
		users_err(err, errlen, "cannot read %s: %s", path, strerror(ENOMEM));
		return NULL;
	}
	for (;;) {
		if (len == cap - 1) {
			/* the file grew since fstat: move to a larger buffer, wiping the old one */
			if (cap >= USERS_FILE_MAX + 2)
				break; /* full: len is one past the limit */
			size_t ncap = MIN(cap * 2, USERS_FILE_MAX + 2);
			char *nbuf = malloc(ncap);
			if (!nbuf) {
				e = ENOMEM;
				break;
			}
			memcpy(nbuf, buf, len);
			explicit_bzero(buf, cap);
			free(buf);
			buf = nbuf;
			cap = ncap;
		}
		ssize_t r = read(fd, buf + len, cap - 1 - len);
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
	if (!e && len > USERS_FILE_MAX)
		e = EFBIG;
	if (e) {
		explicit_bzero(buf, cap);
		free(buf);
		users_err(err, errlen, "cannot read %s: %s", path, strerror(e));
		return NULL;
	}
	return users_parse_owned(path, buf, len, cap, err, errlen);
}

/* ---- lookups ---- */

static const struct user *find_exact(const struct users *u, const char *key, size_t len)
{
	const struct addr_ent *e = table_get(u, key, len);
	return e ? &u->users[e->user] : NULL;
}

const struct user *users_find(const struct users *u, const char *addr, size_t len, char delim)
{
	char key[USERS_ADDRESS_MAX];
	size_t at = len;

	if (!u || !addr || !len || len > USERS_ADDRESS_MAX)
		return NULL;
	for (size_t i = 0; i < len; i++) {
		char c = addr[i];
		key[i] = c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
		if (c == '@')
			at = i;
	}
	if (at == len)
		return NULL;
	const struct user *user = find_exact(u, key, len);
	if (user || !delim)
		return user;
	char *d = memchr(key, delim, at);
	if (!d)
		return NULL;
	size_t cut = (size_t)(d - key);
	memmove(key + cut, key + at, len - at);
	return find_exact(u, key, cut + len - at);
}

bool users_owns(const struct users *u, const char *login, size_t login_len, const char *addr,
                size_t len, char delim)
{
	const struct user *user = users_find(u, login, login_len, 0);

	/* the login is the user's own address, never an alias */
	if (!user || user->addr_len != login_len || strncasecmp(user->address, login, login_len))
		return false;
	return users_find(u, addr, len, delim) == user;
}

size_t users_count(const struct users *u)
{
	return u ? u->nusers : 0;
}

void users_free(struct users **u)
{
	if (!u)
		return;
	users_release(*u);
	*u = NULL;
}

/* ---- one user ---- */

const char *user_address(const struct user *user)
{
	return user->address;
}

const char *user_password_hash(const struct user *user)
{
	return user->hash;
}

bool user_can_login(const struct user *user)
{
	const char *h = user->hash;
	return h[0] && strcmp(h, "*") != 0 && h[0] != '!';
}

size_t user_maildir(const struct user *user, const char *mailbox_root, char *buf, size_t cap)
{
	int n;

	if (user->maildir) {
		n = snprintf(buf, cap, "%s", user->maildir);
	} else if (mailbox_root) {
		size_t rl = strlen(mailbox_root);
		while (rl && mailbox_root[rl - 1] == '/')
			rl--;
		n = snprintf(buf, cap, "%.*s/%s/%.*s/Maildir", (int)rl, mailbox_root,
		             user->address + user->at + 1, (int)user->at, user->address);
	} else {
		n = snprintf(buf, cap, "%s", "");
	}
	return n < 0 ? 0 : (size_t)n;
}
