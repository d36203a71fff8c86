/*
 * posthaste queue: list and show the spool's messages; hold, release, delete
 * and flush them through the running daemon, or offline (see queue_cmd.h).
 *
 * list prints what Postfix's mailq prints (one entry per message, recipients
 * indented below the sender, a total at the end), or with --json one object
 * per line in the shape of `postqueue -j`. show prints one message's envelope,
 * then its text exactly as stored. Text output replaces control characters
 * and invalid UTF-8 with '?' (the spool's octets reach a terminal); JSON
 * escapes them, invalid UTF-8 as \ufffd.
 */
#include "mta/posthaste/queue_cmd.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "core/compiler.h"
#include "mta/posthaste/config.h"
#include "mta/posthaste/control.h"
#include "mta/smtp/smtp_server.h"
#include "queue/spool.h"
#include "queue/record.h"
#include "queue/spool_scan.h"
#include "queue/state.h"

/* Columns of the list: id, size, arrival, then sender (and recipients below it). */
#define COL_ID     16
#define COL_SIZE   8
#define COL_TIME   20
#define COL_SENDER (COL_ID + 1 + COL_SIZE + 1 + COL_TIME + 1)

#define FOUND 1 /* each's value that stops the scan at the message sought */

static void usage(FILE *f)
{
	fputs("usage: posthaste queue list [--json] [--spool DIR | --config FILE]\n"
	      "       posthaste queue show ID [--spool DIR | --config FILE]\n"
	      "       posthaste queue hold|release|delete ID...|ALL [--spool DIR | --config FILE]\n"
	      "       posthaste queue flush [ID...|ALL] [--spool DIR | --config FILE]\n"
	      "Reads the spool (the daemon may be running): list prints one entry per queued\n"
	      "message, as mailq does ('!' after the id: on hold; --json: one JSON object per\n"
	      "line, as postqueue -j, with delay_warned: a delay DSN went out); show prints a message's envelope, then its text exactly\n"
	      "as stored. hold, release, delete and flush ask the running daemon over its\n"
	      "control socket (ALL: every message they apply to; flush: try deferred mail now);\n"
	      "with the daemon stopped, hold, release and delete change the spool itself.\n"
	      "The spool is --spool DIR, else the spool_dir of --config FILE, else the default;\n"
	      "the socket is the file's control_socket, else SPOOL/control.sock.\n",
	      f);
}

/* ---- text ---- */

/* Length of the valid UTF-8 sequence at s (n octets available), 0 if invalid. */
static size_t utf8_seq(const uint8_t *s, size_t n)
{
	uint8_t c = s[0];
	size_t len;
	uint32_t cp, min;

	if (c < 0x80)
		return 1;
	if (c >= 0xc2 && c <= 0xdf) {
		len = 2;
		cp = c & 0x1f;
		min = 0x80;
	} else if ((c & 0xf0) == 0xe0) {
		len = 3;
		cp = c & 0x0f;
		min = 0x800;
	} else if (c >= 0xf0 && c <= 0xf4) {
		len = 4;
		cp = c & 0x07;
		min = 0x10000;
	} else {
		return 0;
	}
	if (n < len)
		return 0;
	for (size_t i = 1; i < len; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		cp = cp << 6 | (s[i] & 0x3f);
	}
	if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
		return 0;
	return len;
}

/* Writes len octets for a terminal: UTF-8 as is; controls (C0, DEL, C1), invalid octets: '?'. */
static void put_text(FILE *f, const char *s, size_t len)
{
	const uint8_t *p = (const uint8_t *)s;
	size_t i = 0;
	while (i < len) {
		size_t k = utf8_seq(p + i, len - i);
		bool c1 = k == 2 && p[i] == 0xc2 && p[i + 1] < 0xa0;
		if (!k || c1 || (k == 1 && (p[i] < 0x20 || p[i] == 0x7f))) {
			fputc('?', f);
			i += k ? k : 1;
			continue;
		}
		fwrite(p + i, 1, k, f);
		i += k;
	}
}

/* Writes a JSON string literal: valid UTF-8 as is, controls escaped, invalid octets as \ufffd. */
static void put_json(FILE *f, const char *s, size_t len)
{
	const uint8_t *p = (const uint8_t *)s;
	size_t i = 0;
	fputc('"', f);
	while (i < len) {
		size_t k = utf8_seq(p + i, len - i);
		if (!k) {
			fputs("\\ufffd", f);
			i++;
			continue;
		}
		if (k > 1) {
			fwrite(p + i, 1, k, f);
			i += k;
			continue;
		}
		uint8_t c = p[i++];
		switch (c) {
		case '"':
			fputs("\\\"", f);
			break;
		case '\\':
			fputs("\\\\", f);
			break;
		case '\n':
			fputs("\\n", f);
			break;
		case '\r':
			fputs("\\r", f);
			break;
		case '\t':
			fputs("\\t", f);
			break;
		default:
			if (c < 0x20 || c == 0x7f)
				fprintf(f, "\\u%04x", c);
			else
				fputc(c, f);
		}
	}
	fputc('"', f);
}

/* "Mon Nov 22 03:14:07" (or with the year), local time. */
static void format_time(uint64_t unix_s, bool year, char *buf, size_t len)
{
	time_t t = (time_t)unix_s;
	struct tm tm;
	if (!localtime_r(&t, &tm) ||
	    !strftime(buf, len, year ? "%a %b %e %H:%M:%S %Y" : "%a %b %e %H:%M:%S", &tm))
		snprintf(buf, len, "%" PRIu64, unix_s);
}

/* ---- list ---- */

struct list_state {
	bool json;
	uint64_t messages;
	uint64_t bytes;
	FILE *out;
};

static int list_one(void *arg, const struct spool_scan_item *it)
{
	struct list_state *st = arg;
	const struct spool_message *m = it->msg;
	FILE *f = st->out;
	char id[17];
	spool_id_format(it->queue_id, id);
	st->messages++;
	st->bytes += m->body_len;

	if (st->json) {
		fprintf(f,
		        "{\"queue_name\":\"%s\",\"queue_id\":\"%s\",\"arrival_time\":%" PRIu64
		        ",\"message_size\":%zu,\"sender\":",
		        it->state == SPOOL_STATE_HELD ? "hold" : "active", id,
		        m->received_ms / 1000, m->body_len);
		put_json(f, m->sender, m->sender_len);
		fputs(",\"recipients\":[", f);
		for (uint32_t i = 0; i < m->nrcpts; i++) {
			fputs(i ? ",{\"address\":" : "{\"address\":", f);
			put_json(f, m->rcpts[i].addr, m->rcpts[i].addr_len);
			fputc('}', f);
		}
		fputs("],\"envid\":", f);
		if (m->envid_len)
			put_json(f, m->envid, m->envid_len);
		else
			fputs("null", f);
		fputs(",\"client_address\":", f);
		put_json(f, m->peer, m->peer_len);
		fprintf(f, ",\"delay_warned\":%s}\n",
			(it->flags & STATE_F_DELAY_WARNED) ? "true" : "false");
		return 0;
	}

	if (st->messages == 1)
		fprintf(f, "%-*s %*s %-*s %s\n", COL_ID, "-Queue ID-------", COL_SIZE, "--Size--",
		        COL_TIME, "----Arrival Time----", "-Sender/Recipient-------");
	char when[64];
	format_time(m->received_ms / 1000, false, when, sizeof(when));
	/* as mailq: '!' right after the id marks a message on hold */
	fprintf(f, "%-*s%c%*zu %-*s ", COL_ID, id, it->state == SPOOL_STATE_HELD ? '!' : ' ',
	        COL_SIZE, m->body_len, COL_TIME, when);
	if (m->sender_len)
		put_text(f, m->sender, m->sender_len);
	else
		fputs("<>", f);
	fputc('\n', f);
	for (uint32_t i = 0; i < m->nrcpts; i++) {
		fprintf(f, "%*s", COL_SENDER, "");
		put_text(f, m->rcpts[i].addr, m->rcpts[i].addr_len);
		fputc('\n', f);
	}
	fputc('\n', f);
	return 0;
}

static int cmd_list(const char *spool, bool json)
{
	struct list_state st = {.json = json, .out = stdout};
	char err[512];
	int r = spool_scan(spool, list_one, &st, err, sizeof(err));
	if (r < 0) {
		fflush(stdout);
		fprintf(stderr, "posthaste queue list: %s\n", err);
		return 1;
	}
	if (!json) {
		if (!st.messages)
			puts("Mail queue is empty");
		else
			printf("-- %" PRIu64 " Kbytes in %" PRIu64 " Request%s.\n",
			       (st.bytes + 1023) / 1024, st.messages, st.messages == 1 ? "" : "s");
	}
	return 0;
}

/* ---- show ---- */

struct show_state {
	uint64_t id;
	FILE *out;
};

static void put_notify(FILE *f, uint8_t notify)
{
	static const struct {
		unsigned bit;
		const char *name;
	} names[] = {
	    {SMTP_NOTIFY_NEVER, "NEVER"},
	    {SMTP_NOTIFY_SUCCESS, "SUCCESS"},
	    {SMTP_NOTIFY_FAILURE, "FAILURE"},
	    {SMTP_NOTIFY_DELAY, "DELAY"},
	};
	const char *sep = " NOTIFY=";
	for (size_t i = 0; i < ARRAY_SIZE(names); i++) {
		if (notify & names[i].bit) {
			fprintf(f, "%s%s", sep, names[i].name);
			sep = ",";
		}
	}
	unsigned rest = notify & ~(unsigned)(SMTP_NOTIFY_NEVER | SMTP_NOTIFY_SUCCESS |
	                                     SMTP_NOTIFY_FAILURE | SMTP_NOTIFY_DELAY);
	if (rest)
		fprintf(f, "%s0x%02x", sep, rest);
}

static void put_flags(FILE *f, uint16_t flags)
{
	static const struct {
		unsigned bit;
		const char *name;
	} names[] = {
	    {SPOOL_ENV_ESMTP, "ESMTP"},       {SPOOL_ENV_SMTPUTF8, "SMTPUTF8"},
	    {SPOOL_ENV_8BITMIME, "8BITMIME"}, {SPOOL_ENV_RET_FULL, "RET=FULL"},
	    {SPOOL_ENV_RET_HDRS, "RET=HDRS"}, {SPOOL_ENV_CHUNKED, "BDAT"},
	};
	unsigned rest = flags;
	const char *sep = "";
	for (size_t i = 0; i < ARRAY_SIZE(names); i++) {
		if (flags & names[i].bit) {
			fprintf(f, "%s%s", sep, names[i].name);
			sep = " ";
			rest &= ~names[i].bit;
		}
	}
	if (rest)
		fprintf(f, "%s0x%04x", sep, rest);
	else if (!flags)
		fputc('-', f);
}

static int show_one(void *arg, const struct spool_scan_item *it)
{
	struct show_state *st = arg;
	if (it->queue_id != st->id)
		return 0;
	const struct spool_message *m = it->msg;
	FILE *f = st->out;
	char id[17], when[64];
	spool_id_format(it->queue_id, id);
	format_time(m->received_ms / 1000, true, when, sizeof(when));

	fprintf(f, "*** ENVELOPE %s ***\n", id);
	fprintf(f, "queue_id: %s\n", id);
	fprintf(f, "arrival: %s (%" PRIu64 ".%03u)\n", when, m->received_ms / 1000,
	        (unsigned)(m->received_ms % 1000));
	fprintf(f, "size: %zu\n", m->body_len);
	fputs("flags: ", f);
	put_flags(f, m->flags);
	fputs("\nsender: <", f);
	put_text(f, m->sender, m->sender_len);
	fputs(">\nclient: ", f);
	put_text(f, m->peer, m->peer_len);
	fputs("\nhelo: ", f);
	put_text(f, m->helo, m->helo_len);
	fputc('\n', f);
	if (m->envid_len) {
		fputs("envid: ", f);
		put_text(f, m->envid, m->envid_len);
		fputc('\n', f);
	}
	for (uint32_t i = 0; i < m->nrcpts; i++) {
		const struct spool_rcpt *r = &m->rcpts[i];
		fputs("recipient: <", f);
		put_text(f, r->addr, r->addr_len);
		fputc('>', f);
		put_notify(f, r->notify);
		if (r->orcpt_len) {
			fputs(" ORCPT=", f);
			put_text(f, r->orcpt, r->orcpt_len);
		}
		fputc('\n', f);
	}
	fprintf(f, "segment: %s offset %" PRIu64 "\n", it->segment, it->offset);
	fprintf(f, "*** MESSAGE CONTENTS %s ***\n", id);
	if (m->body_len)
		fwrite(m->body, 1, m->body_len, f);
	return FOUND;
}

/* A queue id as listed: 16 hex digits, either case. */
static bool parse_id(const char *s, uint64_t *id_r)
{
	uint64_t id = 0;
	size_t n = 0;
	for (; s[n]; n++) {
		char c = s[n];
		unsigned v;
		if (c >= '0' && c <= '9')
			v = (unsigned)(c - '0');
		else if (c >= 'a' && c <= 'f')
			v = (unsigned)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F')
			v = (unsigned)(c - 'A' + 10);
		else
			return false;
		if (n >= 16)
			return false;
		id = id << 4 | v;
	}
	if (n != 16)
		return false;
	*id_r = id;
	return true;
}

static int cmd_show(const char *spool, const char *idtext)
{
	struct show_state st = {.out = stdout};
	if (!parse_id(idtext, &st.id)) {
		fprintf(stderr, "posthaste queue show: no message %s in the queue\n", idtext);
		return 1;
	}
	char err[512];
	int r = spool_scan(spool, show_one, &st, err, sizeof(err));
	if (r < 0) {
		fflush(stdout);
		fprintf(stderr, "posthaste queue show: %s\n", err);
		return 1;
	}
	if (r != FOUND) {
		fprintf(stderr, "posthaste queue show: no message %s in the queue\n", idtext);
		return 1;
	}
	return 0;
}

/* ---- hold, release, delete ---- */

struct ctl_msg {
	uint64_t id;
	enum spool_state state;
	uint8_t flags; /* STATE_F_*: carried into the record written, so none is lost */
};

struct ctl_list {
	struct ctl_msg *v;
	size_t n, cap;
};

static int collect_one(void *arg, const struct spool_scan_item *it)
{
	struct ctl_list *l = arg;
	if (l->n == l->cap) {
		size_t cap = l->cap ? l->cap * 2 : 256;
		struct ctl_msg *v = realloc(l->v, cap * sizeof(*v));
		if (!v)
			return -ENOMEM;
		l->v = v;
		l->cap = cap;
	}
	l->v[l->n++] = (struct ctl_msg){it->queue_id, it->state, it->flags};
	return 0;
}

static int ctl_cmp(const void *a, const void *b)
{
	const struct ctl_msg *x = a, *y = b;
	return x->id < y->id ? -1 : x->id > y->id;
}

/* Takes the spool's lock as the daemon does. The fd, or -1 after saying why (*status set). */
static int ctl_lock(const char *spool, const char *verb, int *status)
{
	char path[4200];
	snprintf(path, sizeof(path), "%s/lock", spool);
	int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (fd < 0) {
		fprintf(stderr, "posthaste queue %s: cannot open %s: %s\n", verb, path,
		        strerror(errno));
		*status = 1;
		return -1;
	}
	if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		int e = errno;
		if (e != EWOULDBLOCK) {
			fprintf(stderr, "posthaste queue %s: cannot lock %s: %s\n", verb, path,
			        strerror(e));
			close(fd);
			*status = 1;
			return -1;
		}
		char pid[32] = "";
		ssize_t n = pread(fd, pid, sizeof(pid) - 1, 0);
		pid[n > 0 ? n : 0] = '\0';
		pid[strcspn(pid, "\n")] = '\0';
		/* it holds the lock but did not answer on its socket (starting or stopping) */
		fprintf(stderr,
		        "posthaste queue %s: the daemon is running (pid %s) but does not answer on "
		        "its control socket; try again\n",
		        verb, pid[0] ? pid : "unknown");
		close(fd);
		*status = 1;
		return -1;
	}
	char pid[32];
	int n = snprintf(pid, sizeof(pid), "%ld\n", (long)getpid());
	if (ftruncate(fd, 0) < 0 || pwrite(fd, pid, (size_t)n, 0) != n) {
		/* only informative, as in the daemon */
	}
	return fd;
}

/* The highest segment sequence in the spool's names, or -1 when it has none. */
static int64_t ctl_max_seq(const char *spool)
{
	int64_t max = -1;
	DIR *d = opendir(spool);
	if (!d)
		return -1;
	struct dirent *de;
	while ((de = readdir(d))) {
		if (de->d_name[0] != 'w')
			continue;
		char path[4400];
		snprintf(path, sizeof(path), "%s/%s", spool, de->d_name);
		DIR *wd = opendir(path);
		if (!wd)
			continue;
		struct dirent *se;
		while ((se = readdir(wd))) {
			if (strncmp(se->d_name, "seg-", 4))
				continue;
			char *end;
			errno = 0;
			unsigned long long seq = strtoull(se->d_name + 4, &end, 16);
			if (end != se->d_name + 4 && !errno && !strcmp(end, ".log") &&
			    seq < (unsigned long long)INT64_MAX && (int64_t)seq > max)
				max = (int64_t)seq;
		}
		closedir(wd);
	}
	closedir(d);
	return max;
}

/*
 * Appends the n state records to a new segment of SPOOL/w0 named above every
 * existing one: written, synced, and its name synced. 0 or -errno (err says).
 */
static int ctl_write(const char *spool, const struct ctl_msg *recs, size_t n, char *err,
                     size_t errlen)
{
	char wdir[4200];
	snprintf(wdir, sizeof(wdir), "%s/w0", spool);
	if (mkdir(wdir, 0700) < 0 && errno != EEXIST) {
		int e = errno;
		snprintf(err, errlen, "cannot create %s: %s", wdir, strerror(e));
		return -e;
	}
	int dfd = open(wdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0) {
		int e = errno;
		snprintf(err, errlen, "cannot open %s: %s", wdir, strerror(e));
		return -e;
	}
	uint64_t seq = (uint64_t)(ctl_max_seq(spool) + 1);
	size_t rec_size = record_encoded_size(STATE_PAYLOAD_SIZE);
	size_t len = SEGMENT_HEADER_SIZE + n * rec_size;
	uint8_t *buf = calloc(1, len);
	if (!buf) {
		close(dfd);
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	segment_header_encode(buf, 0, seq, (uint64_t)time(NULL));
	for (size_t i = 0; i < n; i++) {
		uint8_t *p = buf + SEGMENT_HEADER_SIZE + i * rec_size;
		state_payload_encode_rec(
		    p + RECORD_HEADER_SIZE,
		    &(struct state_rec){.state = recs[i].state, .flags = recs[i].flags});
		struct iovec iov = {p + RECORD_HEADER_SIZE, STATE_PAYLOAD_SIZE};
		record_header_encode(p, RECORD_STATE, 0, recs[i].id, &iov, 1);
		record_header_bind(p, seq);
	}
	char name[64];
	snprintf(name, sizeof(name), "seg-%016" PRIx64 ".log", seq);
	int r = 0;
	int fd = openat(dfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0) {
		r = -errno;
		snprintf(err, errlen, "cannot create %s/%s: %s", wdir, name, strerror(-r));
	} else {
		ssize_t w = pwrite(fd, buf, len, 0);
		if (w != (ssize_t)len || fdatasync(fd) < 0) {
			r = w < 0 || w == (ssize_t)len ? -errno : -ENOSPC;
			if (!r)
				r = -EIO;
			snprintf(err, errlen, "cannot write %s/%s: %s", wdir, name, strerror(-r));
			unlinkat(dfd, name, 0);
		}
		close(fd);
		if (r == 0 && fsync(dfd) < 0) {
			r = -errno;
			snprintf(err, errlen, "cannot sync %s: %s", wdir, strerror(-r));
		}
	}
	free(buf);
	close(dfd);
	return r;
}

static const char *ctl_done_word(const char *verb)
{
	return !strcmp(verb, "hold")      ? "held"
	       : !strcmp(verb, "release") ? "released"
	       : !strcmp(verb, "flush")   ? "flushed"
	                                  : "deleted";
}

/* Whether verb applies to a message in state st; else why not. */
static const char *ctl_refusal(const char *verb, enum spool_state st)
{
	if (!strcmp(verb, "hold"))
		return st == SPOOL_STATE_QUEUED ? NULL : "is on hold already";
	if (!strcmp(verb, "release"))
		return st == SPOOL_STATE_HELD ? NULL : "is not on hold";
	return NULL; /* delete: queued or held, the only states listed */
}

static int cmd_control(const char *spool, const char *verb, char **args, int nargs)
{
	int status = 0;
	int lockfd = ctl_lock(spool, verb, &status);
	if (lockfd < 0)
		return status;
	struct ctl_list l = {0};
	struct ctl_msg *recs = NULL;
	size_t nrecs = 0;
	char err[8960]; /* room for paths */
	int r = spool_scan(spool, collect_one, &l, err, sizeof(err));
	if (r != 0) {
		fprintf(stderr, "posthaste queue %s: %s\n", verb,
		        r == -ENOMEM ? "out of memory" : err);
		status = 1;
		goto out;
	}
	if (l.n > 1)
		qsort(l.v, l.n, sizeof(*l.v), ctl_cmp);
	enum spool_state to = !strcmp(verb, "hold")      ? SPOOL_STATE_HELD
	                      : !strcmp(verb, "release") ? SPOOL_STATE_RELEASED
	                                                 : SPOOL_STATE_DELETED;
	size_t cap = l.n + (size_t)nargs;
	recs = malloc((cap ? cap : 1) * sizeof(*recs));
	if (!recs) {
		fprintf(stderr, "posthaste queue %s: out of memory\n", verb);
		status = 1;
		goto out;
	}
	for (int a = 0; a < nargs; a++) {
		if (!strcmp(args[a], "ALL")) {
			for (size_t i = 0; i < l.n; i++) {
				if (spool_state_final(l.v[i].state) ||
				    ctl_refusal(verb, l.v[i].state))
					continue;
				recs[nrecs++] = (struct ctl_msg){l.v[i].id, to, l.v[i].flags};
				l.v[i].state = to == SPOOL_STATE_RELEASED ? SPOOL_STATE_QUEUED : to;
				if (nrecs == cap)
					break;
			}
			continue;
		}
		struct ctl_msg key, *m = NULL;
		if (parse_id(args[a], &key.id))
			m = bsearch(&key, l.v, l.n, sizeof(*l.v), ctl_cmp);
		if (!m || spool_state_final(m->state)) {
			fprintf(stderr, "posthaste queue %s: no message %s in the queue\n", verb,
			        args[a]);
			status = 1;
			continue;
		}
		const char *why = ctl_refusal(verb, m->state);
		if (why) {
			fprintf(stderr, "posthaste queue %s: %s %s\n", verb, args[a], why);
			status = 1;
			continue;
		}
		if (nrecs == cap)
			break;
		recs[nrecs++] = (struct ctl_msg){m->id, to, m->flags};
		m->state = to == SPOOL_STATE_RELEASED ? SPOOL_STATE_QUEUED : to;
	}
	if (nrecs) {
		r = ctl_write(spool, recs, nrecs, err, sizeof(err));
		if (r < 0) {
			fprintf(stderr, "posthaste queue %s: %s; nothing changed\n", verb, err);
			status = 1;
			goto out;
		}
	}
	printf("posthaste queue %s: %s %zu message%s\n", verb, ctl_done_word(verb), nrecs,
	       nrecs == 1 ? "" : "s");
out:
	free(recs);
	free(l.v);
	close(lockfd); /* releases the lock */
	return status;
}

/* ---- the running daemon: its control socket (mta/posthaste/control.h) ---- */

enum { ASK_ANSWERED = 1, ASK_NOT_RUNNING = 0, ASK_FAILED = -1 };

/*
 * Sends one request line to the daemon and reads its answer line into ans
 * (without the LF). ASK_ANSWERED, ASK_NOT_RUNNING (nothing listens: no socket,
 * or a dead daemon's), or ASK_FAILED after saying why.
 */
static int ctl_ask(const char *path, const char *verb, const char *req, char *ans, size_t len)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof(sa.sun_path))
		return ASK_NOT_RUNNING; /* no daemon could have bound it */
	memcpy(sa.sun_path, path, strlen(path) + 1);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		fprintf(stderr, "posthaste queue %s: socket: %s\n", verb, strerror(errno));
		return ASK_FAILED;
	}
	struct timeval tv = {.tv_sec = 5};
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)); /* a full backlog */
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int e = errno;
		close(fd);
		if (e == ENOENT || e == ECONNREFUSED)
			return ASK_NOT_RUNNING;
		fprintf(
		    stderr,
		    "posthaste queue %s: cannot connect to the daemon's control socket %s: %s\n",
		    verb, path, strerror(e));
		return ASK_FAILED;
	}
	size_t rl = strlen(req), sent = 0;
	while (sent < rl) {
		ssize_t w = send(fd, req + sent, rl - sent, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			fprintf(stderr, "posthaste queue %s: cannot write to %s: %s\n", verb, path,
			        w < 0 ? strerror(errno) : "nothing written");
			close(fd);
			return ASK_FAILED;
		}
		sent += (size_t)w;
	}
	/* the daemon waits at most PH_CONTROL_WAIT_MS for its workers: a margin on top */
	size_t got = 0;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		clock_gettime(CLOCK_MONOTONIC, &t1);
		long spent =
		    (long)(t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
		long left = PH_CONTROL_WAIT_MS + 5000 - spent;
		struct pollfd p = {.fd = fd, .events = POLLIN};
		int r = left > 0 ? poll(&p, 1, (int)left) : 0;
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			fprintf(stderr, "posthaste queue %s: no answer from the daemon on %s%s%s\n",
			        verb, path, r < 0 ? ": " : "", r < 0 ? strerror(errno) : "");
			close(fd);
			return ASK_FAILED;
		}
		ssize_t n = read(fd, ans + got, len - 1 - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0 || memchr(ans + got, '\n', (size_t)n) || got + (size_t)n == len - 1) {
			got += n > 0 ? (size_t)n : 0;
			break;
		}
		got += (size_t)n;
	}
	close(fd);
	ans[got] = '\0';
	char *lf = memchr(ans, '\n', got);
	if (!lf) {
		fprintf(stderr,
		        "posthaste queue %s: the daemon closed the connection without an "
		        "answer\n",
		        verb);
		return ASK_FAILED;
	}
	*lf = '\0';
	for (char *c = ans; *c; c++) /* its words reach a terminal */
		if ((unsigned char)*c < 0x20 || *c == 0x7f)
			*c = '?';
	return ASK_ANSWERED;
}

/* The daemon's reasons as the offline path words them ("%s": the id). */
static const struct {
	const char *reason;
	const char *text;
} live_reasons[] = {
    {"no such message", "no message %s in the queue"},
    {"already on hold", "%s is on hold already"},
    {"not on hold", "%s is not on hold"},
};

/*
 * hold|release|delete|flush through the running daemon: one request per
 * operand (flush without one: every deferred message). ASK_NOT_RUNNING when no
 * daemon listens (before anything was sent), else ASK_ANSWERED with *status set.
 */
static int cmd_live(const char *path, const char *verb, char **args, int nargs, int *status)
{
	uint64_t changed = 0;
	*status = 0;
	for (int a = 0; a < (nargs ? nargs : 1); a++) {
		const char *target = nargs ? args[a] : "ALL";
		uint64_t id;
		if (strcmp(target, "ALL") && !parse_id(target, &id)) {
			fprintf(stderr, "posthaste queue %s: no message %s in the queue\n", verb,
			        target);
			*status = 1;
			continue;
		}
		char req[64], ans[PH_CONTROL_LINE_MAX + 1];
		snprintf(req, sizeof(req), "%s %s\n", verb, target);
		int r = ctl_ask(path, verb, req, ans, sizeof(ans));
		if (r == ASK_NOT_RUNNING && a == 0 && *status == 0)
			return ASK_NOT_RUNNING;
		if (r == ASK_NOT_RUNNING) {
			fprintf(stderr, "posthaste queue %s: %s: the daemon stopped answering\n",
			        verb, target);
			*status = 1;
			continue;
		}
		if (r == ASK_FAILED) {
			*status = 1;
			continue;
		}
		char *end;
		if (!strncmp(ans, "ok ", 3) && ans[3] >= '0' && ans[3] <= '9') {
			errno = 0;
			unsigned long long n = strtoull(ans + 3, &end, 10);
			if (!errno && !*end) {
				changed += n;
				continue;
			}
		}
		*status = 1;
		if (strncmp(ans, "error ", 6)) {
			fprintf(stderr,
			        "posthaste queue %s: %s: unexpected answer from the daemon: %s\n",
			        verb, target, ans);
			continue;
		}
		const char *text = NULL;
		for (size_t i = 0; i < ARRAY_SIZE(live_reasons); i++)
			if (!strcmp(ans + 6, live_reasons[i].reason))
				text = live_reasons[i].text;
		fprintf(stderr, "posthaste queue %s: ", verb);
		if (text)
			fprintf(stderr, text, target);
		else
			fprintf(stderr, "%s: %s", target, ans + 6);
		fputc('\n', stderr);
	}
	printf("posthaste queue %s: %s %" PRIu64 " message%s\n", verb, ctl_done_word(verb), changed,
	       changed == 1 ? "" : "s");
	return ASK_ANSWERED;
}

/* ---- dispatch ---- */

static bool is_control_verb(const char *v)
{
	static const char *const verbs[] = {"hold", "release", "delete", "flush"};
	for (size_t i = 0; i < ARRAY_SIZE(verbs); i++)
		if (!strcmp(v, verbs[i]))
			return true;
	return false;
}

static int finish(int status)
{
	if (fflush(stdout) == EOF || ferror(stdout)) {
		fprintf(stderr, "posthaste queue: cannot write the output\n");
		return status ? status : 1;
	}
	return status;
}

int ph_queue_main(int argc, char **argv)
{
	static const struct option opts[] = {
	    {"json", no_argument, NULL, 'j'},
	    {"spool", required_argument, NULL, 's'},
	    {"config", required_argument, NULL, 'c'},
	    {"help", no_argument, NULL, 'h'},
	    {NULL, 0, NULL, 0},
	};
	if (argc < 2) {
		usage(stderr);
		return 2;
	}
	const char *verb = argv[1];
	if (!strcmp(verb, "--help") || !strcmp(verb, "-h") || !strcmp(verb, "help")) {
		usage(stdout);
		return 0;
	}
	bool list = !strcmp(verb, "list"), show = !strcmp(verb, "show");
	bool control = is_control_verb(verb);
	if (!list && !show && !control) {
		fprintf(stderr, "posthaste queue: unknown command '%s'\n", verb);
		usage(stderr);
		return 2;
	}

	/* options after the verb, in any order with the operands */
	const char *spool = NULL, *config_file = NULL;
	bool json = false;
	int opt;
	opterr = 1;
	optind = 1;
	while ((opt = getopt_long(argc - 1, argv + 1, "", opts, NULL)) != -1) {
		switch (opt) {
		case 'j':
			json = true;
			break;
		case 's':
			spool = optarg;
			break;
		case 'c':
			config_file = optarg;
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
	char **args = argv + 1 + optind;
	bool flush = !strcmp(verb, "flush"); /* no operand: ALL */
	if ((list && nargs != 0) || (show && nargs != 1) || (control && !flush && nargs < 1) ||
	    (json && !list)) {
		if (json && !list)
			fprintf(stderr, "posthaste queue %s: --json goes with list only\n", verb);
		else if (list)
			fprintf(stderr, "posthaste queue list: unexpected argument '%s'\n",
			        args[0]);
		else
			fprintf(stderr, "posthaste queue %s: %s\n", verb,
			        nargs ? "one queue id expected" : "a queue id is required");
		usage(stderr);
		return 2;
	}

	struct ph_config *cfg = malloc(sizeof(*cfg)); /* large (paths): not on the stack */
	if (!cfg) {
		fprintf(stderr, "posthaste queue: out of memory\n");
		return 1;
	}
	ph_config_default(cfg);
	char err[512];
	if (config_file && (!spool || control)) { /* control: the file may name the socket */
		if (ph_config_load_file(cfg, config_file, err, sizeof(err)) < 0) {
			fprintf(stderr, "posthaste queue: %s\n", err);
			free(cfg);
			return 1;
		}
	}
	if (!spool)
		spool = cfg->spool_dir;
	int status = 0;
	if (control) {
		/* the running daemon first; without one, the spool itself */
		char path[sizeof(cfg->control_socket)];
		if (ph_control_path(cfg, spool, path, sizeof(path)) < 0 ||
		    cmd_live(path, verb, args, nargs, &status) == ASK_NOT_RUNNING) {
			if (flush) {
				fprintf(stderr, "posthaste queue flush: the daemon is not running: "
				                "nothing to flush\n");
				status = 1;
			} else {
				status = cmd_control(spool, verb, args, nargs);
			}
		}
	} else {
		status = list ? cmd_list(spool, json) : cmd_show(spool, args[0]);
	}
	free(cfg);
	return finish(status);
}
