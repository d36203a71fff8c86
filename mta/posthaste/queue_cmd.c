/*
 * posthaste queue: list and show the spool's messages (see queue_cmd.h).
 *
 * list prints what Postfix's mailq prints (one entry per message, recipients
 * indented below the sender, a total at the end), or with --json one object
 * per line in the shape of `postqueue -j`. show prints one message's envelope,
 * then its text exactly as stored. Text output replaces control characters
 * and invalid UTF-8 with '?' (the spool's octets reach a terminal); JSON
 * escapes them, invalid UTF-8 as \ufffd.
 */
#include "mta/posthaste/queue_cmd.h"

#include <getopt.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/compiler.h"
#include "mta/posthaste/config.h"
#include "mta/smtp/smtp_server.h"
#include "queue/spool.h"
#include "queue/spool_scan.h"

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
	      "       posthaste queue hold|release|delete|flush ID   (not implemented yet)\n"
	      "Reads the spool (the daemon may be running): list prints one entry per queued\n"
	      "message, as mailq does (--json: one JSON object per line, as postqueue -j);\n"
	      "show prints a message's envelope, then its text exactly as stored.\n"
	      "The spool is --spool DIR, else the spool_dir of --config FILE, else the default.\n",
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
		        "{\"queue_name\":\"active\",\"queue_id\":\"%s\",\"arrival_time\":%" PRIu64
		        ",\"message_size\":%zu,\"sender\":",
		        id, m->received_ms / 1000, m->body_len);
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
		fputs("}\n", f);
		return 0;
	}

	if (st->messages == 1)
		fprintf(f, "%-*s %*s %-*s %s\n", COL_ID, "-Queue ID-------", COL_SIZE, "--Size--",
		        COL_TIME, "----Arrival Time----", "-Sender/Recipient-------");
	char when[64];
	format_time(m->received_ms / 1000, false, when, sizeof(when));
	fprintf(f, "%-*s %*zu %-*s ", COL_ID, id, COL_SIZE, m->body_len, COL_TIME, when);
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
	if ((list && nargs != 0) || (!list && nargs != 1) || (json && !list)) {
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
	if (control) {
		fprintf(stderr,
		        "posthaste queue %s: not implemented yet (needs the running daemon's "
		        "control socket; coming with delivery)\n",
		        verb);
		return 2;
	}

	struct ph_config *cfg = malloc(sizeof(*cfg)); /* large (paths): not on the stack */
	if (!cfg) {
		fprintf(stderr, "posthaste queue: out of memory\n");
		return 1;
	}
	ph_config_default(cfg);
	char err[512];
	if (!spool && config_file) {
		if (ph_config_load_file(cfg, config_file, err, sizeof(err)) < 0) {
			fprintf(stderr, "posthaste queue: %s\n", err);
			free(cfg);
			return 1;
		}
	}
	if (!spool)
		spool = cfg->spool_dir;
	int status = list ? cmd_list(spool, json) : cmd_show(spool, args[0]);
	free(cfg);
	return finish(status);
}
