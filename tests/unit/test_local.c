/*
 * Unit tests of mta/local: the users file (mta/local/users) and Maildir
 * delivery (mta/local/maildir).
 *
 * Tables of named cases: good files and the users they hold; every parse
 * error with its exact "NAME:LINE: reason"; lookups (case, subaddress,
 * aliases, missing); default and explicit maildir paths; the delivery
 * prefix. Deliveries go to a mkdtemp directory, removed at the end: exact
 * content in new/, tmp/ empty, names in the documented form with the right
 * size, 1000 unique names from one thread and from four, and failures
 * (a path under a regular file, new/ not a directory) that leave nothing.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <regex.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/compiler.h"
#include "mta/local/maildir.h"
#include "mta/local/users.h"

static char tmpdir[64];

static void expect_str(const char *name, const char *what, const char *want, const char *got)
{
	if (strcmp(want, got) != 0)
		fail_msg("%s: %s:\n  want: [%s]\n  got:  [%s]", name, what, want, got);
}

static struct users *load_str(const char *s, char *err, size_t errlen)
{
	return users_load_buffer("users", s, strlen(s), err, errlen);
}

static const struct user *find(const struct users *u, const char *a, char delim)
{
	return users_find(u, a, strlen(a), delim);
}

/* ---- table 1: good files ---- */

static const char good_file[] =
    "# the users of example.org\n"
    "\n"
    "   \t\n"
    "  # an indented comment\n"
    "alice@example.org:$y$j9T$abcdefghijklmnop$0123456789ABCDEFGHIJ./abcdefghijklmnopqrst\n"
    "Bob@Example.ORG:$6$rounds=5000$salt$hashhash::bob.smith@example.org, "
    "postmaster@example.org\r\n"
    "carol@example.org:*:/srv/mail/carol\n"
    "dave@example.net:!$6$locked$hash: /srv/mail/dave :\n"
    "erin@example.net:\n"
    "bob+lists@example.org:\n"
    "\xc3\xa9lodie@example.org:$5$salt$hash\n"
    "frank@example.org:$2b$10$abcdefghijklmnopqrstuv:: a@example.com ,b@example.com";

struct lookup_case {
	const char *name;
	const char *query;
	char delim;
	const char *want; /* the user's address; NULL: not found */
};

static const struct lookup_case lookups[] = {
    {"exact", "alice@example.org", 0, "alice@example.org"},
    {"upper case", "ALICE@EXAMPLE.ORG", 0, "alice@example.org"},
    {"mixed case in file", "bob@example.org", 0, "bob@example.org"},
    {"alias", "bob.smith@example.org", 0, "bob@example.org"},
    {"alias, trimmed, upper case", "PostMaster@example.org", 0, "bob@example.org"},
    {"alias list with blanks", "b@example.com", 0, "frank@example.org"},
    {"first alias with blanks", "a@example.com", 0, "frank@example.org"},
    {"subaddress", "alice+tag@example.org", '+', "alice@example.org"},
    {"subaddress, upper case", "Alice+Tag@Example.Org", '+', "alice@example.org"},
    {"subaddress of alias", "bob.smith+x@example.org", '+', "bob@example.org"},
    {"empty subaddress", "alice+@example.org", '+', "alice@example.org"},
    {"subaddress cut at the first delimiter", "alice+a+b@example.org", '+', "alice@example.org"},
    {"other delimiter", "alice-tag@example.org", '-', "alice@example.org"},
    {"exact entry with delimiter wins", "bob+lists@example.org", '+', "bob+lists@example.org"},
    {"other tag strips to bob", "bob+other@example.org", '+', "bob@example.org"},
    {"no delimiter, no strip", "alice+tag@example.org", 0, NULL},
    {"wrong delimiter", "alice+tag@example.org", '-', NULL},
    {"delimiter only in domain", "alice@exa+mple.org", '+', NULL},
    {"delimiter first", "+tag@example.org", '+', NULL},
    {"utf-8 local part as is", "\xc3\xa9lodie@example.org", 0, "\xc3\xa9lodie@example.org"},
    {"utf-8 not case-folded", "\xc3\x89lodie@example.org", 0, NULL},
    {"other domain", "alice@example.net", 0, NULL},
    {"missing", "nobody@example.org", '+', NULL},
    {"no @", "alice", '+', NULL},
    {"local part only with @", "alice@", 0, NULL},
    {"empty", "", '+', NULL},
    {"prefix of an address", "alice@example.or", 0, NULL},
    {"longer than an address", "alice@example.orgx", 0, NULL},
};

static void test_users_good(void **state)
{
	char err[512] = "";
	struct users *u = load_str(good_file, err, sizeof(err));
	if (!u)
		fail_msg("good file: %s", err);
	assert_int_equal(users_count(u), 8);

	for (size_t i = 0; i < ARRAY_SIZE(lookups); i++) {
		const struct lookup_case *c = &lookups[i];
		const struct user *got = find(u, c->query, c->delim);
		if (!c->want && got)
			fail_msg("%s: want no user, got %s", c->name, user_address(got));
		if (c->want && !got)
			fail_msg("%s: want %s, got none", c->name, c->want);
		if (c->want)
			expect_str(c->name, "address", c->want, user_address(got));
	}

	/* hashes and login */
	const struct user *a = find(u, "alice@example.org", 0);
	expect_str("alice", "hash",
	           "$y$j9T$abcdefghijklmnop$0123456789ABCDEFGHIJ./abcdefghijklmnopqrst",
	           user_password_hash(a));
	assert_true(user_can_login(a));
	assert_true(user_can_login(find(u, "bob@example.org", 0)));
	assert_false(user_can_login(find(u, "carol@example.org", 0)));
	assert_false(user_can_login(find(u, "dave@example.net", 0)));
	assert_false(user_can_login(find(u, "erin@example.net", 0)));
	expect_str("erin", "hash", "", user_password_hash(find(u, "erin@example.net", 0)));
	expect_str("dave", "hash", "!$6$locked$hash",
	           user_password_hash(find(u, "dave@example.net", 0)));

	/* maildir paths */
	struct {
		const char *user, *root, *want;
	} md[] = {
	    {"alice@example.org", "/var/mail", "/var/mail/example.org/alice/Maildir"},
	    {"alice@example.org", "/var/mail/", "/var/mail/example.org/alice/Maildir"},
	    {"alice@example.org", "/var/mail//", "/var/mail/example.org/alice/Maildir"},
	    {"alice@example.org", "/", "/example.org/alice/Maildir"},
	    {"bob.smith@example.org", "/m", "/m/example.org/bob/Maildir"},
	    {"carol@example.org", "/var/mail", "/srv/mail/carol"},
	    {"carol@example.org", NULL, "/srv/mail/carol"},
	    {"dave@example.net", "/var/mail", "/srv/mail/dave"},
	    {"erin@example.net", NULL, ""},
	    {"bob+lists@example.org", "/m", "/m/example.org/bob+lists/Maildir"},
	};
	for (size_t i = 0; i < ARRAY_SIZE(md); i++) {
		char buf[256];
		const struct user *x = find(u, md[i].user, 0);
		assert_non_null(x);
		size_t n = user_maildir(x, md[i].root, buf, sizeof(buf));
		expect_str(md[i].user, "maildir", md[i].want, buf);
		assert_int_equal(n, strlen(md[i].want));
	}
	/* truncation: snprintf-like */
	char small[8];
	size_t n = user_maildir(a, "/var/mail", small, sizeof(small));
	assert_int_equal(n, strlen("/var/mail/example.org/alice/Maildir"));
	expect_str("truncated", "maildir", "/var/ma", small);
	assert_int_equal(user_maildir(a, "/var/mail", NULL, 0), n);

	users_free(&u);
	assert_null(u);
	users_free(&u);
	users_free(NULL);
	assert_int_equal(users_count(NULL), 0);
	assert_null(users_find(NULL, "a@b", 3, '+'));
}

static void test_users_empty(void **state)
{
	char err[256];
	const char *empties[] = {"", "\n", "# only a comment", "\r\n\r\n  \n#x\n"};
	for (size_t i = 0; i < ARRAY_SIZE(empties); i++) {
		struct users *u = load_str(empties[i], err, sizeof(err));
		assert_non_null(u);
		assert_int_equal(users_count(u), 0);
		assert_null(find(u, "a@b", '+'));
		users_free(&u);
	}
}

/* ---- table 2: every parse error ---- */

struct bad_case {
	const char *name;
	const char *input;
	const char *want;
};

static const struct bad_case bad_cases[] = {
    {"no colon", "alice@example.org\n", "users:1: no ':' after the address"},
    {"too many fields", "a@x:*:/m:b@x:more\n",
     "users:1: too many fields (want address:password-hash:maildir:aliases)"},
    {"empty address", ":*\n", "users:1: empty address"},
    {"blank address", "  \t :*\n", "users:1: empty address"},
    {"address without @", "alice:*\n", "users:1: address without @: alice"},
    {"empty local part", "@x:*\n", "users:1: empty local part in address @x"},
    {"empty domain", "bob@:*\n", "users:1: empty domain in address bob@"},
    {"dot local part", "..@x:*\n", "users:1: address ..@x: local part or domain starts with '.'"},
    {"dot domain", "a@..:*\n", "users:1: address a@..: local part or domain starts with '.'"},
    {"blank inside address", "bob smith@x:*\n", "users:1: bad octet 0x20 in address (octet 4)"},
    {"slash in address", "a/b@x:*\n", "users:1: bad octet 0x2f in address (octet 2)"},
    {"comma in address", "a,b@x:*\n", "users:1: bad octet 0x2c in address (octet 2)"},
    {"control in address", "a\x01@x:*\n", "users:1: bad octet 0x01 in address (octet 2)"},
    {"DEL in address", "a\x7f@x:*\n", "users:1: bad octet 0x7f in address (octet 2)"},
    {"CR inside line", "a\r@x:*\n", "users:1: bad octet 0x0d in address (octet 2)"},
    {"duplicate address", "a@x:*\nb@x:*\n# c\nA@X:*\n",
     "users:4: duplicate address a@x (first on line 1)"},
    {"duplicate alias of user", "a@x:*\nb@x:*::c@x,A@x\n",
     "users:2: duplicate address a@x (first on line 1)"},
    {"user duplicates alias", "b@x:*::c@x\nC@x:*\n",
     "users:2: duplicate address c@x (first on line 1)"},
    {"alias duplicates own address", "b@x:*::b@x\n",
     "users:1: duplicate address b@x (first on line 1)"},
    {"alias repeated", "b@x:*::c@x,c@x\n", "users:1: duplicate address c@x (first on line 1)"},
    {"empty alias", "b@x:*::c@x,,d@x\n", "users:1: empty alias"},
    {"trailing comma", "b@x:*::c@x,\n", "users:1: empty alias"},
    {"blank alias", "b@x:*:: , c@x\n", "users:1: empty alias"},
    {"alias without @", "b@x:*::carol\n", "users:1: alias without @: carol"},
    {"alias empty domain", "b@x:*::c@\n", "users:1: empty domain in alias c@"},
    {"alias bad octet", "b@x:*::c d@x\n", "users:1: bad octet 0x20 in alias (octet 2)"},
    {"weak hash", "a@x:$1$salt$hash\n",
     "users:1: unsupported password hash (want $y$, $gy$, $7$, $2b$, $6$ or $5$; empty, * or ! "
     "for no login)"},
    {"DES hash", "a@x:abJnggxhB/yWI\n",
     "users:1: unsupported password hash (want $y$, $gy$, $7$, $2b$, $6$ or $5$; empty, * or ! "
     "for no login)"},
    {"bare scheme", "a@x:$6$\n",
     "users:1: unsupported password hash (want $y$, $gy$, $7$, $2b$, $6$ or $5$; empty, * or ! "
     "for no login)"},
    {"blank in hash", "a@x:$6$a b\n", "users:1: bad octet 0x20 in password hash (octet 5)"},
    {"relative maildir", "a@x:*:mail/a\n", "users:1: maildir mail/a is not an absolute path"},
    {"control in maildir", "a@x:*:/m\x01\n", "users:1: bad octet 0x01 in maildir (octet 3)"},
    {"line number after CRLF and comments", "# c\r\n\r\na@x:*\r\nb@x:*\r\nbad\r\n",
     "users:5: no ':' after the address"},
    {"last line without LF", "a@x:*\nbad", "users:2: no ':' after the address"},
};

static void test_users_bad(void **state)
{
	for (size_t i = 0; i < ARRAY_SIZE(bad_cases); i++) {
		const struct bad_case *c = &bad_cases[i];
		char err[512] = "";
		struct users *u = load_str(c->input, err, sizeof(err));
		if (u)
			fail_msg("%s: loaded, want [%s]", c->name, c->want);
		expect_str(c->name, "error", c->want, err);
	}
}

/* Errors that need octets a string literal cannot carry, or large inputs. */
static void test_users_bounds(void **state)
{
	char err[512];
	struct users *u;

	/* a 254-octet address is fine */
	char addr[600];
	memset(addr, 'a', 252);
	memcpy(addr + 252, "@x:*\n", 6);
	u = load_str(addr, err, sizeof(err));
	assert_non_null(u);
	assert_non_null(users_find(u, addr, 254, 0));
	assert_null(users_find(u, addr, 255, 0));
	users_free(&u);
	memset(addr, 'a', 253);
	memcpy(addr + 253, "@x:*\n", 6);
	u = load_str(addr, err, sizeof(err));
	assert_null(u);
	expect_str("long address", "error", "users:1: address longer than 254 octets", err);
	memcpy(addr, "b@x:*::d@x,", 11);
	memset(addr + 11, 'c', 253);
	memcpy(addr + 264, "@x\n", 4);
	u = load_str(addr, err, sizeof(err));
	assert_null(u);
	expect_str("long alias", "error", "users:1: alias longer than 254 octets", err);

	/* NUL octet */
	static const char nul[] = "a@x:*\nb@x\0:*\n";
	u = users_load_buffer("users", nul, sizeof(nul) - 1, err, sizeof(err));
	assert_null(u);
	expect_str("NUL", "error", "users:2: NUL octet in line", err);

	/* line length: USERS_LINE_MAX octets pass, one more fails */
	size_t big = USERS_LINE_MAX + 64;
	char *line = malloc(big);
	if (!line)
		abort();
	memcpy(line, "a@x:*::", 7);
	size_t o = 7;
	for (unsigned i = 0; o + 12 < USERS_LINE_MAX; i++)
		o += (size_t)snprintf(line + o, big - o, "%s%u@y", i ? "," : "", i);
	while (o < USERS_LINE_MAX)
		line[o++] = ' ';
	line[o] = '\n';
	u = users_load_buffer("users", line, o + 1, err, sizeof(err));
	if (!u)
		fail_msg("line of %zu octets: %s", o, err);
	assert_non_null(find(u, "0@y", 0));
	users_free(&u);
	line[o] = ' ';
	line[o + 1] = '\n';
	u = users_load_buffer("users", line, o + 2, err, sizeof(err));
	assert_null(u);
	expect_str("long line", "error", "users:1: line longer than 8192 octets", err);
	/* the CR before LF counts toward the line */
	line[o] = '\r';
	u = users_load_buffer("users", line, o + 2, err, sizeof(err));
	assert_null(u);
	free(line);

	/* file size */
	u = users_load_buffer("users", "", (size_t)USERS_FILE_MAX + 1, err, sizeof(err));
	assert_null(u);
	expect_str("big buffer", "error", "users: larger than 67108864 octets", err);

	/* number of users: USERS_MAX pass, one more fails */
	size_t cap = (size_t)(USERS_MAX + 1) * 16;
	char *f = malloc(cap);
	assert_non_null(f);
	o = 0;
	for (unsigned i = 0; i < USERS_MAX; i++)
		o += (size_t)snprintf(f + o, cap - o, "u%u@x:\n", i);
	u = users_load_buffer("users", f, o, err, sizeof(err));
	if (!u)
		fail_msg("%u users: %s", USERS_MAX, err);
	assert_int_equal(users_count(u), USERS_MAX);
	expect_str("last user", "address", "u1048575@x", user_address(find(u, "U1048575@X", 0)));
	users_free(&u);
	o += (size_t)snprintf(f + o, cap - o, "one@more:\n");
	u = users_load_buffer("users", f, o, err, sizeof(err));
	assert_null(u);
	expect_str("too many users", "error", "users:1048577: more than 1048576 users", err);
	free(f);
}

static void write_file(const char *path, const char *s, size_t len)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, s, len), (ssize_t)len);
	close(fd);
}

static void test_users_file(void **state)
{
	char path[128], err[512], want[256];
	struct users *u;

	snprintf(path, sizeof(path), "%s/users", tmpdir);
	write_file(path, good_file, strlen(good_file));
	u = users_load(path, err, sizeof(err));
	if (!u)
		fail_msg("users_load: %s", err);
	assert_int_equal(users_count(u), 8);
	assert_non_null(find(u, "postmaster@example.org", 0));
	users_free(&u);

	write_file(path, "a@x:*\nbad\n", 10);
	u = users_load(path, err, sizeof(err));
	assert_null(u);
	snprintf(want, sizeof(want), "%s:2: no ':' after the address", path);
	expect_str("file", "error", want, err);

	/* one octet over the limit: File too large */
	int fd = open(path, O_WRONLY | O_TRUNC);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, (off_t)USERS_FILE_MAX + 1), 0);
	close(fd);
	u = users_load(path, err, sizeof(err));
	assert_null(u);
	snprintf(want, sizeof(want), "cannot read %s: File too large", path);
	expect_str("big file", "error", want, err);
	unlink(path);

	u = users_load(path, err, sizeof(err));
	assert_null(u);
	snprintf(want, sizeof(want), "cannot read %s: No such file or directory", path);
	expect_str("missing", "error", want, err);

	/* a tiny error buffer is truncated, never overrun */
	char tiny[8];
	u = load_str("bad\n", tiny, sizeof(tiny));
	assert_null(u);
	expect_str("tiny", "error", "users:1", tiny);
	assert_null(load_str("bad\n", NULL, 0));
}

/* ---- maildir_prefix ---- */

static void test_prefix(void **state)
{
	struct {
		const char *name, *rp, *dt, *want;
	} cases[] = {
	    {"typical", "alice@example.org", "bob@example.org",
	     "Return-Path: <alice@example.org>\r\nDelivered-To: bob@example.org\r\n"},
	    {"null sender", "", "bob@example.org",
	     "Return-Path: <>\r\nDelivered-To: bob@example.org\r\n"},
	    {"control octets", "a\r\nX-Evil: 1@x", "b\n@\x7fy\t",
	     "Return-Path: <a??X-Evil: 1@x>\r\nDelivered-To: b?@?y?\r\n"},
	    {"utf-8 kept", "\xc3\xa9@x", "\xc3\xa9@y",
	     "Return-Path: <\xc3\xa9@x>\r\nDelivered-To: \xc3\xa9@y\r\n"},
	};
	for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
		char buf[256];
		size_t want = strlen(cases[i].want);
		size_t n = maildir_prefix(buf, sizeof(buf), cases[i].rp, strlen(cases[i].rp),
		                          cases[i].dt, strlen(cases[i].dt));
		assert_int_equal(n, want);
		expect_str(cases[i].name, "prefix", cases[i].want, buf);
		/* exactly too small: nothing written */
		memset(buf, 'Z', sizeof(buf));
		n = maildir_prefix(buf, want, cases[i].rp, strlen(cases[i].rp), cases[i].dt,
		                   strlen(cases[i].dt));
		assert_int_equal(n, want);
		assert_int_equal(buf[0], 'Z');
		/* just enough */
		n = maildir_prefix(buf, want + 1, cases[i].rp, strlen(cases[i].rp), cases[i].dt,
		                   strlen(cases[i].dt));
		assert_int_equal(n, want);
		expect_str(cases[i].name, "prefix", cases[i].want, buf);
	}
	assert_int_equal(maildir_prefix(NULL, 0, NULL, 0, NULL, 0),
	                 strlen("Return-Path: <>\r\nDelivered-To: \r\n"));
}

/* ---- delivery ---- */

/* Names of the entries of dir (without . and ..) into names (up to max); returns the count. */
static size_t list_dir(const char *dir, char (*names)[MAILDIR_NAME_MAX], size_t max)
{
	DIR *d = opendir(dir);
	size_t n = 0;
	assert_non_null(d);
	for (struct dirent *e; (e = readdir(d));) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		if (names && n < max)
			snprintf(names[n], MAILDIR_NAME_MAX, "%s", e->d_name);
		n++;
	}
	closedir(d);
	return n;
}

static char *read_all(const char *path, size_t *len)
{
	struct stat st;
	int fd = open(path, O_RDONLY);
	assert_true(fd >= 0);
	assert_int_equal(fstat(fd, &st), 0);
	char *p = malloc((size_t)st.st_size + 1);
	assert_non_null(p);
	assert_int_equal(read(fd, p, (size_t)st.st_size), st.st_size);
	close(fd);
	*len = (size_t)st.st_size;
	return p;
}

static void rm_rf(const char *path)
{
	char cmd[PATH_MAX + 16];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", path);
	assert_int_equal(system(cmd), 0);
}

/* Checks a name's form and that ,S= matches want_size. */
static void check_name(const char *name, size_t want_size)
{
	regex_t re;
	assert_int_equal(
	    regcomp(&re, "^[0-9]+\\.M[0-9]{6}P[0-9]+Q[0-9]+\\.[^/:]+,S=([0-9]+)$", REG_EXTENDED),
	    0);
	regmatch_t m[2];
	if (regexec(&re, name, 2, m, 0) != 0)
		fail_msg("bad maildir name [%s]", name);
	regfree(&re);
	assert_int_equal(strtoull(name + m[1].rm_so, NULL, 10), want_size);
}

static void mode_is(const char *path, mode_t want)
{
	struct stat st;
	assert_int_equal(stat(path, &st), 0);
	assert_true(S_ISDIR(st.st_mode));
	assert_int_equal(st.st_mode & 0777, want);
}

static void test_deliver_one(void **state)
{
	char md[128], path[PATH_MAX], name[MAILDIR_NAME_MAX], pre[256];
	char names[4][MAILDIR_NAME_MAX];
	const char *msg = "Subject: hi\r\n\r\nbody\r\n";

	snprintf(md, sizeof(md), "%s/one/a/b/Maildir", tmpdir);
	size_t pl = maildir_prefix(pre, sizeof(pre), "s@x", 3, "r@y", 3);
	struct iovec iov[2] = {{pre, pl}, {(void *)msg, strlen(msg)}};
	mode_t old = umask(022);
	int rc = maildir_deliver(md, iov, 2, name, sizeof(name));
	umask(old);
	assert_int_equal(rc, 0);
	check_name(name, pl + strlen(msg));

	snprintf(path, sizeof(path), "%s/new/%s", md, name);
	size_t len;
	char *got = read_all(path, &len);
	char want[512];
	snprintf(want, sizeof(want), "%s%s", pre, msg);
	assert_int_equal(len, strlen(want));
	assert_memory_equal(got, want, len);
	free(got);
	struct stat st;
	assert_int_equal(stat(path, &st), 0);
	assert_int_equal(st.st_mode & 0777, 0600);

	for (const char *sub = "tmp\0new\0cur\0"; *sub; sub += 4) {
		snprintf(path, sizeof(path), "%s/%s", md, sub);
		mode_is(path, 0700);
	}
	snprintf(path, sizeof(path), "%s/one/a", tmpdir);
	mode_is(path, 0700);
	snprintf(path, sizeof(path), "%s/tmp", md);
	assert_int_equal(list_dir(path, NULL, 0), 0);
	snprintf(path, sizeof(path), "%s/cur", md);
	assert_int_equal(list_dir(path, NULL, 0), 0);
	snprintf(path, sizeof(path), "%s/new", md);
	assert_int_equal(list_dir(path, names, 4), 1);
	expect_str("one", "name", name, names[0]);

	/* an empty message and no name wanted */
	assert_int_equal(maildir_deliver(md, NULL, 0, NULL, 0), 0);
	assert_int_equal(list_dir(path, names, 4), 2);

	/* a short name buffer: truncated, terminated */
	char shortname[6];
	assert_int_equal(maildir_deliver(md, iov, 2, shortname, sizeof(shortname)), 0);
	assert_int_equal(strlen(shortname), 5);

	/* many iovecs, some empty: written in order, exactly */
	static char bufs[200][40];
	struct iovec many[200];
	size_t total = 0;
	for (unsigned i = 0; i < 200; i++) {
		size_t l = i % 7 == 0 ? 0 : (size_t)snprintf(bufs[i], sizeof(bufs[i]), "[%u]", i);
		many[i] = (struct iovec){bufs[i], l};
		total += l;
	}
	assert_int_equal(maildir_deliver(md, many, 200, name, sizeof(name)), 0);
	check_name(name, total);
	snprintf(path, sizeof(path), "%s/new/%s", md, name);
	got = read_all(path, &len);
	assert_int_equal(len, total);
	size_t o = 0;
	for (unsigned i = 0; i < 200; i++) {
		assert_memory_equal(got + o, bufs[i], many[i].iov_len);
		o += many[i].iov_len;
	}
	free(got);

	/* an existing Maildir without cur/ still works, and cur/ comes back */
	snprintf(path, sizeof(path), "%s/cur", md);
	assert_int_equal(rmdir(path), 0);
	assert_int_equal(maildir_deliver(md, iov, 2, NULL, 0), 0);
	snprintf(path, sizeof(path), "%s/new", md);
	assert_int_equal(list_dir(path, NULL, 0), 5);
}

#define MANY 1000u

static int cmp_names(const void *a, const void *b)
{
	return strcmp(a, b);
}

static void check_unique(const char *md, size_t want)
{
	char path[PATH_MAX];
	char(*names)[MAILDIR_NAME_MAX] = calloc(want + 1, MAILDIR_NAME_MAX);
	assert_non_null(names);
	snprintf(path, sizeof(path), "%s/new", md);
	assert_int_equal(list_dir(path, names, want + 1), want);
	qsort(names, want, MAILDIR_NAME_MAX, cmp_names);
	for (size_t i = 1; i < want; i++)
		if (strcmp(names[i - 1], names[i]) == 0)
			fail_msg("name %s twice", names[i]);
	for (size_t i = 0; i < want; i++) {
		struct stat st;
		snprintf(path, sizeof(path), "%s/new/%s", md, names[i]);
		assert_int_equal(stat(path, &st), 0);
		check_name(names[i], (size_t)st.st_size);
	}
	snprintf(path, sizeof(path), "%s/tmp", md);
	assert_int_equal(list_dir(path, NULL, 0), 0);
	free(names);
}

static void test_deliver_many(void **state)
{
	char md[128];
	char body[64];

	snprintf(md, sizeof(md), "%s/many", tmpdir);
	for (unsigned i = 0; i < MANY; i++) {
		struct iovec iov = {body,
		                    (size_t)snprintf(body, sizeof(body), "message %u\r\n", i)};
		assert_int_equal(maildir_deliver(md, &iov, 1, NULL, 0), 0);
	}
	check_unique(md, MANY);
}

struct worker_arg {
	const char *md;
	unsigned id;
	int rc;
};

static void *worker(void *p)
{
	struct worker_arg *w = p;
	char body[64];
	for (unsigned i = 0; i < MANY / 4 && !w->rc; i++) {
		struct iovec iov = {body,
		                    (size_t)snprintf(body, sizeof(body), "w%u m%u\r\n", w->id, i)};
		w->rc = maildir_deliver(w->md, &iov, 1, NULL, 0);
	}
	return NULL;
}

static void test_deliver_threads(void **state)
{
	char md[128];
	pthread_t t[4];
	struct worker_arg w[4];

	/* the Maildir does not exist yet: the threads race to create it */
	snprintf(md, sizeof(md), "%s/threads/x/Maildir", tmpdir);
	for (unsigned i = 0; i < 4; i++) {
		w[i] = (struct worker_arg){md, i, 0};
		assert_int_equal(pthread_create(&t[i], NULL, worker, &w[i]), 0);
	}
	for (unsigned i = 0; i < 4; i++) {
		pthread_join(t[i], NULL);
		assert_int_equal(w[i].rc, 0);
	}
	check_unique(md, MANY);
}

static void test_deliver_errors(void **state)
{
	char md[128], path[PATH_MAX], file[128];
	struct iovec iov = {"x\r\n", 3};

	assert_int_equal(maildir_deliver("", &iov, 1, NULL, 0), -EINVAL);
	assert_int_equal(maildir_deliver(NULL, &iov, 1, NULL, 0), -EINVAL);
	assert_int_equal(maildir_deliver(tmpdir, NULL, 1, NULL, 0), -EINVAL);
	struct iovec huge[2] = {{"x", SIZE_MAX}, {"y", 2}};
	assert_int_equal(maildir_deliver(tmpdir, huge, 2, NULL, 0), -EINVAL);
	char longp[PATH_MAX + 8];
	memset(longp, 'a', sizeof(longp) - 1);
	longp[sizeof(longp) - 1] = '\0';
	assert_int_equal(maildir_deliver(longp, &iov, 1, NULL, 0), -ENAMETOOLONG);

	/* a path under a regular file */
	snprintf(file, sizeof(file), "%s/plain", tmpdir);
	write_file(file, "x", 1);
	snprintf(md, sizeof(md), "%s/plain/Maildir", tmpdir);
	assert_int_equal(maildir_deliver(md, &iov, 1, NULL, 0), -ENOTDIR);
	snprintf(md, sizeof(md), "%s/plain/a/b/Maildir", tmpdir);
	assert_int_equal(maildir_deliver(md, &iov, 1, NULL, 0), -ENOTDIR);
	/* the Maildir itself a regular file */
	assert_int_equal(maildir_deliver(file, &iov, 1, NULL, 0), -ENOTDIR);

	/* new/ is a regular file: the link fails, tmp/ is cleaned up */
	snprintf(md, sizeof(md), "%s/badnew", tmpdir);
	assert_int_equal(mkdir(md, 0700), 0);
	snprintf(path, sizeof(path), "%s/tmp", md);
	assert_int_equal(mkdir(path, 0700), 0);
	snprintf(path, sizeof(path), "%s/new", md);
	write_file(path, "x", 1);
	assert_int_equal(maildir_deliver(md, &iov, 1, NULL, 0), -ENOTDIR);
	snprintf(path, sizeof(path), "%s/tmp", md);
	assert_int_equal(list_dir(path, NULL, 0), 0);

	/* tmp/ is a regular file */
	snprintf(md, sizeof(md), "%s/badtmp", tmpdir);
	assert_int_equal(mkdir(md, 0700), 0);
	snprintf(path, sizeof(path), "%s/tmp", md);
	write_file(path, "x", 1);
	assert_int_equal(maildir_deliver(md, &iov, 1, NULL, 0), -ENOTDIR);

	/* permissions: only meaningful when not root (root ignores modes) */
	if (geteuid() != 0) {
		snprintf(md, sizeof(md), "%s/ro", tmpdir);
		assert_int_equal(mkdir(md, 0500), 0);
		snprintf(path, sizeof(path), "%s/Maildir", md);
		assert_int_equal(maildir_deliver(path, &iov, 1, NULL, 0), -EACCES);
		chmod(md, 0700);
	}

	/* the classification */
	assert_true(maildir_error_is_permanent(-EDQUOT));
	assert_true(maildir_error_is_permanent(EFBIG));
	assert_false(maildir_error_is_permanent(-ENOSPC));
	assert_false(maildir_error_is_permanent(-EACCES));
	assert_false(maildir_error_is_permanent(-ENOTDIR));
	assert_false(maildir_error_is_permanent(-EIO));
	expect_str("EDQUOT", "status", "5.2.2", maildir_error_status(-EDQUOT));
	expect_str("EFBIG", "status", "5.2.2", maildir_error_status(-EFBIG));
	expect_str("ENOSPC", "status", "4.3.1", maildir_error_status(-ENOSPC));
	expect_str("EACCES", "status", "4.2.0", maildir_error_status(-EACCES));
}

static int setup(void **state)
{
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/test_local.XXXXXX");
	return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state)
{
	rm_rf(tmpdir);
	return 0;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_users_good),      cmocka_unit_test(test_users_empty),
	    cmocka_unit_test(test_users_bad),       cmocka_unit_test(test_users_bounds),
	    cmocka_unit_test(test_users_file),      cmocka_unit_test(test_prefix),
	    cmocka_unit_test(test_deliver_one),     cmocka_unit_test(test_deliver_many),
	    cmocka_unit_test(test_deliver_threads), cmocka_unit_test(test_deliver_errors),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}
