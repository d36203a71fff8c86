/*
 * libFuzzer target for smtp_client: a session driven by arbitrary server bytes.
 *
 * Input: byte 0 picks the options (STARTTLS wanted, CHUNKING used, the
 * recipient limit, small text limits), byte 1 seeds the split of the rest
 * into pieces and the glue's actions between pieces (TLS done, a rare
 * timeout or quit). The rest is what the server says. The glue gives the
 * same fixed message (3 recipients with DSN parameters, a body in slices
 * with dots, a bare LF and no final CRLF) at each on_ready, up to three
 * times, then quits.
 *
 * Invariants checked: on_msg_done exactly once per message given (after a
 * final timeout and close), never after on_fail; on_fail at most once and
 * last; on_ready only when ready and never nested; results well formed
 * (codes, counts, bounded NUL-terminated texts without control characters);
 * body_ref slices inside the body; the output bounded by the messages given
 * and the replies received; the timeout one of the configured values.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/compiler.h"
#include "mta/smtp/smtp_client.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define BODY_A "Subject: fuzz\r\n\r\n.dot\r\n"
#define BODY_B ".\nbare lf\r"
#define BODY_C "\n..two\r\nno final crlf"

static const struct iovec fz_body[] = {
    {(void *)BODY_A, sizeof(BODY_A) - 1},
    {(void *)BODY_B, sizeof(BODY_B) - 1},
    {(void *)BODY_C, sizeof(BODY_C) - 1},
};
static const struct smtp_client_rcpt fz_rcpts[] = {
    {"b@example.org", 13, SMTP_NOTIFY_SUCCESS | SMTP_NOTIFY_FAILURE, "rfc822;b@example.org", 20},
    {"c@example.org", 13, SMTP_NOTIFY_NEVER, NULL, 0},
    {"d@example.org", 13, 0, NULL, 0},
};
static const struct smtp_client_msg fz_msg = {
    .sender = "a@example.net",
    .sender_len = 13,
    .rcpts = fz_rcpts,
    .nrcpts = 3,
    .envid = "ID1",
    .envid_len = 3,
    .ret = 1,
    .eightbit = true,
    .body = fz_body,
    .nbody = 3,
    .size = sizeof(BODY_A) + sizeof(BODY_B) + sizeof(BODY_C) - 3,
};

struct fz {
	struct smtp_client cl;
	struct smtp_client_limits lim;
	bool want_tls, tls_pending, in_ready, failed;
	unsigned given, done, max_msgs;
	size_t out;
};

static void fz_send(void *arg, const void *p, size_t n, bool body_ref)
{
	struct fz *z = arg;

	if (z->failed || n == 0)
		abort();
	if (body_ref) {
		const char *s = p;
		bool inside = false;
		for (unsigned i = 0; i < fz_msg.nbody; i++) {
			const char *b = fz_body[i].iov_base;
			inside |= s >= b && s + n <= b + fz_body[i].iov_len;
		}
		if (!inside)
			abort();
	}
	z->out += n;
}

static void fz_ready(void *arg)
{
	struct fz *z = arg;

	if (z->in_ready || z->failed || !smtp_client_ready(&z->cl))
		abort();
	z->in_ready = true;
	for (;;) {
		int rc;
		if (z->given >= z->max_msgs) {
			smtp_client_quit(&z->cl);
			break;
		}
		rc = smtp_client_send_msg(&z->cl, &fz_msg);
		if (rc == -E2BIG && z->lim.max_rcpts < fz_msg.nrcpts) {
			smtp_client_quit(&z->cl); /* the glue would split the message */
			break;
		}
		if (rc < 0)
			abort(); /* the message is valid and the client ready */
		z->given++;
		if (rc == 0)
			break;
		if (z->done != z->given) /* 1: reported from inside */
			abort();
	}
	z->in_ready = false;
}

static void fz_reply(const struct fz *z, const struct smtp_client_reply *r)
{
	if (r->code != 0 && (r->code < 200 || r->code > 559))
		abort();
	if (!r->text || strlen(r->text) != r->text_len || r->text_len >= z->lim.max_text)
		abort();
	for (size_t i = 0; i < r->text_len; i++)
		if ((unsigned char)r->text[i] < 0x20 || r->text[i] == 0x7f)
			abort();
	if (r->esc.klass && r->esc.klass != r->code / 100)
		abort();
	if ((unsigned)r->cmd >= SMTP_CLIENT_CMD_COUNT)
		abort();
}

static void fz_done(void *arg, const struct smtp_client_result *r)
{
	struct fz *z = arg;

	if (z->failed || r->msg != &fz_msg || r->nrcpts != fz_msg.nrcpts)
		abort();
	z->done++;
	if (z->done > z->given + 1) /* + 1: a local refusal is reported before rc */
		abort();
	if (r->delivered + r->deferred + r->bounced + r->unknown != r->nrcpts)
		abort();
	fz_reply(z, &r->reply);
	for (unsigned i = 0; i < r->nrcpts; i++) {
		fz_reply(z, &r->rcpt[i]);
		/* delivered only through a final 2xx */
		if (r->rcpt[i].code / 100 == 2 && r->rcpt[i].cmd != SMTP_CLIENT_CMD_DATA_END)
			abort();
	}
}

static void fz_fail(void *arg, const struct smtp_client_failure *f)
{
	struct fz *z = arg;

	if (z->failed || !f->reason || !f->reason[0])
		abort();
	fz_reply(z, &f->reply);
	z->failed = true;
}

static bool fz_want_tls(void *arg)
{
	struct fz *z = arg;
	return z->want_tls;
}

static void fz_start_tls(void *arg)
{
	struct fz *z = arg;
	z->tls_pending = true;
}

static const struct smtp_client_ops fz_ops = {
    .send = fz_send,
    .on_ready = fz_ready,
    .on_msg_done = fz_done,
    .on_fail = fz_fail,
    .want_starttls = fz_want_tls,
    .start_tls = fz_start_tls,
};

static void fz_check_timeout(const struct fz *z)
{
	uint64_t t = smtp_client_timeout_ms(&z->cl);
	const struct smtp_client_limits *l = &z->lim;

	if (t != 0 && t != l->greeting_ms && t != l->helo_ms && t != l->mail_ms &&
	    t != l->rcpt_ms && t != l->data_init_ms && t != l->data_done_ms && t != l->quit_ms)
		abort();
	if (smtp_client_finished(&z->cl) && t != 0)
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const unsigned rcpt_limits[] = {100, 3, 1, 2};
	struct fz *z;
	uint32_t seed;
	size_t off, per_msg;

	if (size < 2)
		return 0;
	z = calloc(1, sizeof(*z));
	if (!z)
		return 0;
	smtp_client_limits_default(&z->lim);
	z->want_tls = data[0] & 1;
	z->lim.use_chunking = (data[0] & 2) != 0;
	z->lim.max_rcpts = rcpt_limits[(data[0] >> 2) & 3];
	if (data[0] & 16) {
		z->lim.max_text = 16;
		z->lim.text_space = 40;
		z->lim.reply.max_line = 64;
		z->lim.reply.max_lines = 4;
	}
	z->max_msgs = 3;
	seed = data[1] * 2654435761u + 1;
	data += 2;
	size -= 2;

	if (smtp_client_init(&z->cl, &fz_ops, z, "client.example.net", &z->lim) != 0)
		abort();
	smtp_client_on_connect(&z->cl);
	for (off = 0; off < size && !smtp_client_finished(&z->cl);) {
		size_t n;
		char *piece;

		seed = seed * 1103515245u + 12345u;
		n = (seed >> 16) % 32 + 1;
		if (n > size - off)
			n = size - off;
		piece = malloc(n);
		if (!piece)
			abort();
		memcpy(piece, data + off, n);
		smtp_client_feed(&z->cl, piece, n);
		free(piece);
		off += n;
		fz_check_timeout(z);
		if (z->tls_pending) {
			z->tls_pending = false;
			smtp_client_tls_done(&z->cl);
		}
		seed = seed * 1103515245u + 12345u;
		switch ((seed >> 16) % 128) {
		case 0:
			smtp_client_timeout(&z->cl);
			break;
		case 1:
			smtp_client_quit(&z->cl);
			break;
		default:
			break;
		}
		fz_check_timeout(z);
	}
	/* The end: whatever is in flight is reported. */
	smtp_client_timeout(&z->cl);
	smtp_client_on_close(&z->cl);
	smtp_client_quit(&z->cl);
	if (!smtp_client_finished(&z->cl))
		abort();
	if (z->done != z->given)
		abort();
	/* Every command is sent for a message given or a reply received (>= 4 octets each). */
	per_msg = 1024 + 3 * 600 + 2 * (size_t)fz_msg.size + 16;
	if (z->out > z->given * per_msg + (size / 4 + 4) * 300)
		abort();
	smtp_client_deinit(&z->cl);
	free(z);
	return 0;
}
