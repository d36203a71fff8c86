/* posthaste user add|passwd|del: see user_cmd.h. */
#include "mta/posthaste/user_cmd.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#include "core/compiler.h"
#include "mta/local/passwd.h"
#include "mta/local/users.h"
#include "mta/posthaste/config.h"

enum verb { V_ADD, V_PASSWD, V_DEL };

static void usage(FILE *f)
{
	fputs("usage: posthaste user add ADDRESS [--users FILE | --config FILE] [--password-stdin]\n"
	      "       posthaste user passwd ADDRESS [--users FILE | --config FILE] "
	      "[--password-stdin]\n"
	      "       posthaste user del ADDRESS [--users FILE | --config FILE]\n"
	      "Adds a user (with a password), changes a user's password, or removes a user in\n"
	      "the users file: --users FILE, else the users_file of --config FILE. The password\n"
	      "is asked twice on the terminal (no echo), or read as the first line of standard\n"
	      "input (--password-stdin, or when it is not a terminal). Other lines are kept as\n"
	      "they are; the daemon reads the file when it starts.\n",
	      f);
}

/* ---- the password ---- */

/* One line from fd into buf (cap octets): its length without the line end, or -1. */
static long read_line(int fd, char *buf, size_t cap)
{
	size_t n = 0;
	for (;;) {
		char c;
		ssize_t r = read(fd, &c, 1);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0 || c == '\n')
			break;
		if (n + 1 >= cap)
			return -1; /* too long: what was read is wiped by the caller */
		buf[n++] = c;
	}
	if (n && buf[n - 1] == '\r')
		n--;
	buf[n] = '\0';
	return (long)n;
}

/* Asks on the terminal (fd 0) without echo. 0 or -1. */
static long ask(const char *prompt, char *buf, size_t cap)
{
	struct termios old, quiet;
	if (tcgetattr(0, &old) < 0)
		return -1;
	quiet = old;
	quiet.c_lflag &= ~(tcflag_t)(ECHO | ECHONL);
	fputs(prompt, stderr);
	fflush(stderr);
	if (tcsetattr(0, TCSAFLUSH, &quiet) < 0)
		return -1;
	long n = read_line(0, buf, cap);
	tcsetattr(0, TCSAFLUSH, &old);
	fputc('\n', stderr);
	return n;
}

/* The new password into pw (PASSWD_MAX + 2 octets). 0, or 1 with a message printed. */
static int get_password(const char *verb, bool from_stdin, char *pw, size_t cap)
{
	long n;
	if (!from_stdin && isatty(0)) {
		char again[PASSWD_MAX + 2];
		n = ask("New password: ", pw, cap);
		long m = n >= 0 ? ask("Retype new password: ", again, sizeof(again)) : -1;
		bool same = n >= 0 && m == n && !memcmp(pw, again, (size_t)n);
		explicit_bzero(again, sizeof(again));
		if (n >= 0 && !same) {
			fprintf(stderr, "posthaste user %s: the passwords do not match\n", verb);
			return 1;
		}
	} else {
		n = read_line(0, pw, cap);
	}
	if (n < 0 || (size_t)n > PASSWD_MAX) {
		fprintf(stderr, "posthaste user %s: the password is longer than %u octets\n", verb,
		        PASSWD_MAX);
		return 1;
	}
	if (n == 0) {
		fprintf(stderr, "posthaste user %s: empty password\n", verb);
		return 1;
	}
	if (memchr(pw, '\0', (size_t)n)) {
		fprintf(stderr, "posthaste user %s: NUL octet in the password\n", verb);
		return 1;
	}
	return 0;
}

/* ---- the file ---- */

struct text {
	char *p;
	size_t len, cap;
};

static void text_free(struct text *t)
{
	if (t->p) {
		explicit_bzero(t->p, t->cap); /* password hashes */
		free(t->p);
	}
	memset(t, 0, sizeof(*t));
}

static int text_add(struct text *t, const char *s, size_t n)
{
	if (t->len + n + 1 > t->cap) {
		size_t cap = MAX(t->cap * 2, t->len + n + 1);
		char *p = malloc(cap);
		if (!p)
			return -ENOMEM;
		if (t->len)
			memcpy(p, t->p, t->len);
		text_free(&(struct text){.p = t->p, .cap = t->cap});
		t->p = p;
		t->cap = cap;
	}
	memcpy(t->p + t->len, s, n);
	t->len += n;
	t->p[t->len] = '\0';
	return 0;
}

/* Reads the file (a missing one is empty when missing_ok). 0 or -errno. */
static int read_file(const char *path, bool missing_ok, struct text *t, struct stat *st,
                     bool *exists)
{
	*exists = false;
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	if (fd < 0)
		return errno == ENOENT && missing_ok ? 0 : -errno;
	*exists = true;
	int r = fstat(fd, st) < 0 ? -errno : 0;
	char buf[65536];
	while (!r) {
		ssize_t n = read(fd, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			r = -errno;
		else if (n == 0)
			break;
		else if (t->len + (size_t)n > USERS_FILE_MAX)
			r = -EFBIG;
		else
			r = text_add(t, buf, (size_t)n);
	}
	explicit_bzero(buf, sizeof(buf));
	close(fd);
	return r;
}

/*
 * Writes the new text over path: a temporary file in the same directory,
 * fsync, rename, fsync of the directory (dirfd). 0 or -errno (*what: the step).
 */
static int write_file(const char *path, int dirfd, const struct text *t, const struct stat *old,
                      const char **what)
{
	char tmp[4200];
	const char *slash = strrchr(path, '/');
	int n = slash ? snprintf(tmp, sizeof(tmp), "%.*s/.%s.XXXXXX", (int)(slash - path), path,
	                         slash + 1)
	              : snprintf(tmp, sizeof(tmp), ".%s.XXXXXX", path);
	if (n < 0 || (size_t)n >= sizeof(tmp)) {
		*what = "name the temporary file for";
		return -ENAMETOOLONG;
	}
	*what = "create a temporary file beside";
	int fd = mkstemp(tmp);
	if (fd < 0)
		return -errno;
	int r = 0;
	if (fchmod(fd, 0600) < 0) {
		r = -errno;
		*what = "set the mode of the temporary file for";
	}
	/* keep the owner when root edits a file that belongs to the daemon's user */
	if (!r && old && geteuid() == 0 && fchown(fd, old->st_uid, old->st_gid) < 0) {
		r = -errno;
		*what = "set the owner of the temporary file for";
	}
	for (size_t off = 0; !r && off < t->len;) {
		ssize_t w = write(fd, t->p + off, t->len - off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0) {
			r = -errno;
			*what = "write";
		} else {
			off += (size_t)w;
		}
	}
	if (!r && fsync(fd) < 0) {
		r = -errno;
		*what = "sync";
	}
	if (close(fd) < 0 && !r) {
		r = -errno;
		*what = "write";
	}
	if (!r && rename(tmp, path) < 0) {
		r = -errno;
		*what = "replace";
	}
	if (r) {
		unlink(tmp);
		return r;
	}
	if (fsync(dirfd) < 0) {
		*what = "sync the directory of";
		return -errno;
	}
	return 0;
}

/* Opens and locks the file's directory (serialises concurrent edits). fd or -errno. */
static int lock_dir(const char *path)
{
	char dir[4200];
	const char *slash = strrchr(path, '/');
	if (!slash)
		snprintf(dir, sizeof(dir), ".");
	else if (slash == path)
		snprintf(dir, sizeof(dir), "/");
	else
		snprintf(dir, sizeof(dir), "%.*s", (int)(slash - path), path);
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (flock(fd, LOCK_EX) < 0) {
		int e = errno;
		close(fd);
		return -e;
	}
	return fd;
}

/*
 * The line of the user whose own address is addr (case-insensitive): its
 * start, and its end (at its LF, or the end of the text). false when none.
 */
static bool find_line(const struct text *t, const char *addr, size_t *start_r, size_t *end_r)
{
	size_t al = strlen(addr);
	for (size_t pos = 0; pos < t->len;) {
		const char *p = t->p + pos;
		const char *nl = memchr(p, '\n', t->len - pos);
		size_t end = nl ? (size_t)(nl - t->p) : t->len;
		const char *q = p, *e = t->p + end;
		while (q < e && (*q == ' ' || *q == '\t'))
			q++;
		const char *colon = memchr(q, ':', (size_t)(e - q));
		if (q < e && *q != '#' && colon) {
			const char *fe = colon;
			while (fe > q && (fe[-1] == ' ' || fe[-1] == '\t'))
				fe--;
			if ((size_t)(fe - q) == al && !strncasecmp(q, addr, al)) {
				*start_r = pos;
				*end_r = end;
				return true;
			}
		}
		pos = nl ? end + 1 : t->len;
	}
	return false;
}

/* The new text for the verb into out; 0, or 1 with a message printed. */
static int edit(enum verb v, const char *vname, const char *path, const struct text *in,
                const char *addr, const char *hash, struct text *out)
{
	char err[512];
	struct users *u = users_load_buffer(path, in->p ? in->p : "", in->len, err, sizeof(err));
	if (!u) {
		fprintf(stderr, "posthaste user %s: %s (fix the file first)\n", vname, err);
		return 1;
	}
	const struct user *found = users_find(u, addr, strlen(addr), 0);
	size_t start = 0, end = 0;
	bool own = find_line(in, addr, &start, &end);
	int status = 0;
	if (v == V_ADD && found) {
		fprintf(stderr, "posthaste user add: %s exists already%s%s\n", addr,
		        own ? "" : " as an alias of ", own ? "" : user_address(found));
		status = 1;
	} else if (v != V_ADD && !own) {
		if (found)
			fprintf(stderr, "posthaste user %s: %s is an alias of %s, not a user\n", vname,
			        addr, user_address(found));
		else
			fprintf(stderr, "posthaste user %s: no user %s in %s\n", vname, addr, path);
		status = 1;
	}
	users_free(&u);
	if (status)
		return status;

	int r = 0;
	if (v == V_ADD) {
		if (in->len)
			r = text_add(out, in->p, in->len);
		if (!r && in->len && in->p[in->len - 1] != '\n')
			r = text_add(out, "\n", 1);
		if (!r)
			r = text_add(out, addr, strlen(addr));
		if (!r)
			r = text_add(out, ":", 1);
		if (!r)
			r = text_add(out, hash, strlen(hash));
		if (!r)
			r = text_add(out, "\n", 1);
	} else if (v == V_PASSWD) {
		/* the hash field: from after the first ':' to the next ':' or the line's end */
		const char *line = in->p + start, *le = in->p + end;
		if (le > line && le[-1] == '\r')
			le--;
		const char *c1 = memchr(line, ':', (size_t)(le - line));
		const char *c2 = memchr(c1 + 1, ':', (size_t)(le - c1 - 1));
		size_t from = (size_t)(c1 + 1 - in->p), to = c2 ? (size_t)(c2 - in->p)
		                                                 : (size_t)(le - in->p);
		r = text_add(out, in->p, from);
		if (!r)
			r = text_add(out, hash, strlen(hash));
		if (!r)
			r = text_add(out, in->p + to, in->len - to);
	} else {
		size_t next = end < in->len ? end + 1 : end; /* with its LF */
		if (start)
			r = text_add(out, in->p, start);
		if (!r && next < in->len)
			r = text_add(out, in->p + next, in->len - next);
	}
	if (r) {
		fprintf(stderr, "posthaste user %s: out of memory\n", vname);
		return 1;
	}
	/* the result must load: a bad ADDRESS is refused here, with the parser's reason */
	u = users_load_buffer(path, out->p ? out->p : "", out->len, err, sizeof(err));
	if (!u) {
		fprintf(stderr, "posthaste user %s: %s\n", vname, err);
		return 1;
	}
	users_free(&u);
	return 0;
}

int ph_user_main(int argc, char **argv)
{
	static const struct option opts[] = {
	    {"users", required_argument, NULL, 'u'},
	    {"config", required_argument, NULL, 'c'},
	    {"password-stdin", no_argument, NULL, 'p'},
	    {"help", no_argument, NULL, 'h'},
	    {NULL, 0, NULL, 0},
	};
	if (argc < 2) {
		usage(stderr);
		return 2;
	}
	const char *vname = argv[1];
	if (!strcmp(vname, "--help") || !strcmp(vname, "-h") || !strcmp(vname, "help")) {
		usage(stdout);
		return 0;
	}
	enum verb v;
	if (!strcmp(vname, "add"))
		v = V_ADD;
	else if (!strcmp(vname, "passwd"))
		v = V_PASSWD;
	else if (!strcmp(vname, "del"))
		v = V_DEL;
	else {
		fprintf(stderr, "posthaste user: unknown command '%s'\n", vname);
		usage(stderr);
		return 2;
	}
	const char *users_path = NULL, *config_file = NULL;
	bool from_stdin = false;
	int opt;
	opterr = 1;
	optind = 1;
	while ((opt = getopt_long(argc - 1, argv + 1, "", opts, NULL)) != -1) {
		switch (opt) {
		case 'u':
			users_path = optarg;
			break;
		case 'c':
			config_file = optarg;
			break;
		case 'p':
			from_stdin = true;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	int nargs = argc - 1 - optind;
	if (nargs != 1 || (v == V_DEL && from_stdin)) {
		fprintf(stderr, "posthaste user %s: %s\n", vname,
		        nargs != 1 ? "one ADDRESS expected" : "--password-stdin goes with add and passwd");
		usage(stderr);
		return 2;
	}
	char addr[USERS_ADDRESS_MAX + 1];
	const char *arg = argv[1 + optind];
	if (strlen(arg) > USERS_ADDRESS_MAX || !strchr(arg, '@') || strchr(arg, ':') ||
	    strchr(arg, '\n')) {
		fprintf(stderr, "posthaste user %s: '%.300s' is not an address (local@domain, at most "
		                "%u octets, no ':')\n",
		        vname, arg, USERS_ADDRESS_MAX);
		return 2;
	}
	size_t al = strlen(arg);
	for (size_t i = 0; i <= al; i++)
		addr[i] = arg[i] >= 'A' && arg[i] <= 'Z' ? (char)(arg[i] - 'A' + 'a') : arg[i];

	struct ph_config *cfg = NULL;
	if (!users_path) {
		cfg = malloc(sizeof(*cfg)); /* large (paths): not on the stack */
		if (!cfg) {
			fprintf(stderr, "posthaste user: out of memory\n");
			return 1;
		}
		ph_config_default(cfg);
		char err[512];
		if (config_file && ph_config_load_file(cfg, config_file, err, sizeof(err)) < 0) {
			fprintf(stderr, "posthaste user %s: %s\n", vname, err);
			free(cfg);
			return 1;
		}
		if (!cfg->users_file[0]) {
			fprintf(stderr, "posthaste user %s: no users file: give --users FILE, or "
			                "--config FILE with users_file set\n",
			        vname);
			free(cfg);
			return 2;
		}
		users_path = cfg->users_file;
	}

	int status = 1;
	char pw[PASSWD_MAX + 2];
	char hash[PASSWD_HASH_MAX];
	struct text in = {0}, out = {0};
	int dirfd = -1;
	hash[0] = '\0';
	pw[0] = '\0';
	if (v != V_DEL) {
		if (get_password(vname, from_stdin, pw, sizeof(pw)))
			goto done;
		int r = passwd_hash(pw, hash, sizeof(hash));
		explicit_bzero(pw, sizeof(pw));
		if (r < 0) {
			fprintf(stderr, "posthaste user %s: cannot hash the password: %s\n", vname,
			        strerror(-r));
			goto done;
		}
	}
	dirfd = lock_dir(users_path);
	if (dirfd < 0) {
		fprintf(stderr, "posthaste user %s: cannot open the directory of %s: %s\n", vname,
		        users_path, strerror(-dirfd));
		goto done;
	}
	struct stat st;
	bool exists;
	int r = read_file(users_path, v == V_ADD, &in, &st, &exists);
	if (r < 0) {
		fprintf(stderr, "posthaste user %s: cannot read %s: %s\n", vname, users_path,
		        strerror(-r));
		goto done;
	}
	if (edit(v, vname, users_path, &in, addr, hash, &out))
		goto done;
	const char *what = "";
	r = write_file(users_path, dirfd, &out, exists ? &st : NULL, &what);
	if (r < 0) {
		fprintf(stderr, "posthaste user %s: cannot %s %s: %s\n", vname, what, users_path,
		        strerror(-r));
		goto done;
	}
	printf("posthaste user %s: %s %s %s\n", vname, addr,
	       v == V_ADD      ? "added to"
	       : v == V_PASSWD ? "has a new password in"
	                       : "removed from",
	       users_path);
	status = fflush(stdout) == EOF ? 1 : 0;
done:
	explicit_bzero(pw, sizeof(pw));
	explicit_bzero(hash, sizeof(hash));
	text_free(&in);
	text_free(&out);
	if (dirfd >= 0)
		close(dirfd);
	free(cfg);
	return status;
}
