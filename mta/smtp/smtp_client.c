/* smtp_client: see smtp_client.h for the contract. */
#include "mta/smtp/smtp_client.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/compiler.h"
#include "core/log.h"

enum client_state {
	ST_INIT = 0, /* before smtp_client_on_connect */
	ST_HELLO,    /* greeting, EHLO/HELO, STARTTLS */
	ST_TLS,      /* STARTTLS answered 220: waiting for smtp_client_tls_done */
	ST_READY,    /* between messages */
	ST_TXN,      /* a message in flight */
	ST_QUIT,     /* QUIT sent */
	ST_DONE,     /* over */
};

enum client_cb { CB_NONE = 0, CB_READY, CB_OTHER };

/* Per-recipient progress. */
enum { R_PENDING = 0, R_ACCEPTED, R_FINAL };

#define CLIENT_CMD_INITIAL 4096

static const char *const cmd_names[SMTP_CLIENT_CMD_COUNT] = {
    [SMTP_CLIENT_CMD_NONE] = "none",         [SMTP_CLIENT_CMD_GREETING] = "greeting",
    [SMTP_CLIENT_CMD_EHLO] = "EHLO",         [SMTP_CLIENT_CMD_HELO] = "HELO",
    [SMTP_CLIENT_CMD_STARTTLS] = "STARTTLS", [SMTP_CLIENT_CMD_RSET] = "RSET",
    [SMTP_CLIENT_CMD_MAIL] = "MAIL",         [SMTP_CLIENT_CMD_RCPT] = "RCPT",
    [SMTP_CLIENT_CMD_DATA] = "DATA",         [SMTP_CLIENT_CMD_DATA_END] = "end of data",
    [SMTP_CLIENT_CMD_QUIT] = "QUIT",         [SMTP_CLIENT_CMD_LOCAL] = "local",
};

const char *smtp_client_cmd_name(enum smtp_client_cmd cmd)
{
	return (unsigned)cmd < SMTP_CLIENT_CMD_COUNT ? cmd_names[cmd] : "?";
}

void smtp_client_limits_default(struct smtp_client_limits *lim)
{
	memset(lim, 0, sizeof(*lim));
	lim->max_rcpts = 100;
	lim->max_text = 256;
	lim->text_space = 16384;
	lim->use_chunking = true;
	smtp_reply_limits_default(&lim->reply);
	lim->greeting_ms = 300000;
	lim->helo_ms = 300000;
	lim->mail_ms = 300000;
	lim->rcpt_ms = 300000;
	lim->data_init_ms = 120000;
	lim->data_block_ms = 180000;
	lim->data_done_ms = 600000;
	lim->quit_ms = 300000;
}

/* ---- output ---- */

static void out_copy(struct smtp_client *cl, const void *p, size_t n)
{
	cl->ops->send(cl->arg, p, n, false);
}

static void out_ref(struct smtp_client *cl, const void *p, size_t n)
{
	if (n)
		cl->ops->send(cl->arg, p, n, true);
}

static void cmd_put(struct smtp_client *cl, const char *s, size_t n)
{
	if (unlikely(cl->cmd_len + n > cl->cmd_cap))
		panic("smtp_client: command buffer overflow (%zu + %zu > %zu)", cl->cmd_len, n,
		      cl->cmd_cap);
	if (n)
		memcpy(cl->cmd + cl->cmd_len, s, n);
	cl->cmd_len += n;
}

static void cmd_puts(struct smtp_client *cl, const char *s)
{
	cmd_put(cl, s, strlen(s));
}

static void cmd_u64(struct smtp_client *cl, uint64_t v)
{
	char b[24];
	int k = snprintf(b, sizeof(b), "%" PRIu64, v);
	cmd_put(cl, b, (size_t)k);
}

static void cmd_flush(struct smtp_client *cl)
{
	if (cl->cmd_len)
		out_copy(cl, cl->cmd, cl->cmd_len);
	cl->cmd_len = 0;
}

/* ---- expected replies ---- */

static void pend_push(struct smtp_client *cl, enum smtp_client_cmd c)
{
	if (unlikely(cl->pend_count >= cl->pend_cap))
		panic("smtp_client: %u replies pending", cl->pend_count);
	cl->pend[(cl->pend_head + cl->pend_count) % cl->pend_cap] = (uint8_t)c;
	cl->pend_count++;
}

static enum smtp_client_cmd pend_first(const struct smtp_client *cl)
{
	return cl->pend_count ? (enum smtp_client_cmd)cl->pend[cl->pend_head]
	                      : SMTP_CLIENT_CMD_NONE;
}

static void pend_pop(struct smtp_client *cl)
{
	cl->pend_head = (cl->pend_head + 1) % cl->pend_cap;
	cl->pend_count--;
}

/* What the session waits for, for failures and timeouts. */
static enum smtp_client_cmd awaiting(const struct smtp_client *cl)
{
	if (cl->state == ST_TLS)
		return SMTP_CLIENT_CMD_STARTTLS;
	return pend_first(cl);
}

/* ---- texts ---- */

/* Appends n octets of s to the reply text, bounded, control characters as '?'. */
static void cur_append(struct smtp_client *cl, const char *s, size_t n)
{
	size_t room = cl->lim.max_text - 1 - cl->cur.text_len, i;
	char *t = cl->cur_text + cl->cur.text_len;

	n = MIN(n, room);
	for (i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)s[i];
		t[i] = ch < 0x20 || ch == 0x7f ? '?' : (char)ch;
	}
	cl->cur.text_len += n;
	cl->cur_text[cl->cur.text_len] = '\0';
}

/* A copy of the reply just read, its text in the per-message text space. */
static struct smtp_client_reply store_reply(struct smtp_client *cl, enum smtp_client_cmd cmd)
{
	struct smtp_client_reply r = cl->cur;
	size_t room = cl->lim.text_space - cl->texts_used, n;
	char *t;

	r.cmd = cmd;
	if (room == 0) {
		r.text = "";
		r.text_len = 0;
		return r;
	}
	n = MIN(cl->cur.text_len, room - 1);
	t = cl->texts + cl->texts_used;
	memcpy(t, cl->cur_text, n);
	t[n] = '\0';
	cl->texts_used += n + 1;
	r.text = t;
	r.text_len = n;
	return r;
}

/* Makes cl->cur a client-made reply (local failures). */
static void cur_set(struct smtp_client *cl, unsigned code, unsigned subject, unsigned detail,
                    const char *text)
{
	cl->cur.code = code;
	cl->cur.esc.klass = (uint8_t)(code / 100);
	cl->cur.esc.subject = (uint16_t)subject;
	cl->cur.esc.detail = (uint16_t)detail;
	cl->cur.text_len = 0;
	cl->cur_text[0] = '\0';
	cur_append(cl, text, strlen(text));
}

/* ---- ending a message and the session ---- */

/*
 * Reports the message in flight. end: how the session ended (a 421 reply, or
 * code 0 for an unknown outcome), applied to every recipient whose outcome is
 * not known; NULL when the transaction ended normally.
 */
static void finish_msg(struct smtp_client *cl, const struct smtp_client_reply *end,
                       bool permanent_local)
{
	const struct smtp_client_msg *m = cl->msg;
	struct smtp_client_result res;
	unsigned i, saved = cl->in_cb;

	memset(&res, 0, sizeof(res));
	for (i = 0; i < m->nrcpts; i++) {
		struct smtp_client_reply *r = &cl->rres[i];
		if (cl->mail_refused)
			*r = cl->mreply;
		else if (cl->rstate[i] != R_FINAL) {
			if (end)
				*r = *end;
			else
				panic("smtp_client: recipient %u without an outcome", i);
		}
		switch (r->code / 100) {
		case 2:
			res.delivered++;
			break;
		case 4:
			res.deferred++;
			break;
		case 5:
			res.bounced++;
			break;
		default:
			res.unknown++;
			break;
		}
	}
	res.msg = m;
	res.rcpt = cl->rres;
	res.nrcpts = m->nrcpts;
	res.reply = cl->mreply;
	if (end && res.reply.code == 0)
		res.reply = *end;
	res.permanent_local = permanent_local;
	if (!permanent_local) /* a local refusal sent nothing: the session is as it was */
		cl->need_rset = !cl->final_ok;
	cl->msg = NULL;
	cl->in_cb = CB_OTHER;
	cl->ops->on_msg_done(cl->arg, &res);
	cl->in_cb = saved;
}

/* The normal end of a transaction: the session is ready again. */
static void txn_done(struct smtp_client *cl)
{
	if (unlikely(cl->pend_count != 0))
		panic("smtp_client: transaction over with %u replies pending", cl->pend_count);
	finish_msg(cl, NULL, false);
	cl->state = ST_READY;
	cl->ready_notify = true;
}

/*
 * Ends the session: the message in flight first, then on_fail. with_reply:
 * the reply just read caused it (cl->cur). quit: send QUIT first.
 */
static void printf_like(6, 7)
    session_fail(struct smtp_client *cl, enum smtp_client_fail_kind kind, enum smtp_client_cmd what,
                 bool with_reply, bool quit, const char *fmt, ...)
{
	struct smtp_client_failure f;
	struct smtp_client_reply end;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(cl->reason, sizeof(cl->reason), fmt, ap);
	va_end(ap);

	memset(&f, 0, sizeof(f));
	f.kind = kind;
	f.awaiting = what;
	f.reason = cl->reason;
	if (with_reply) {
		f.reply = cl->cur;
		f.reply.cmd = what;
	} else {
		f.reply.text = "";
	}
	if (cl->msg) {
		if (with_reply && cl->cur.code == 421) {
			end = store_reply(cl, what);
		} else {
			memset(&end, 0, sizeof(end));
			end.text = "";
		}
		finish_msg(cl, &end, false);
	}
	if (quit)
		out_copy(cl, "QUIT\r\n", 6);
	cl->state = ST_DONE;
	cl->ready_notify = false;
	cl->pend_count = 0;
	cl->in_cb = CB_OTHER;
	cl->ops->on_fail(cl->arg, &f);
	cl->in_cb = CB_NONE;
}

static void protocol_error(struct smtp_client *cl, enum smtp_client_cmd what)
{
	session_fail(cl, SMTP_CLIENT_FAIL_PROTOCOL, what, true, false, "unexpected reply %u to %s",
	             cl->cur.code, smtp_client_cmd_name(what));
}

/* ---- commands ---- */

static void send_simple(struct smtp_client *cl, const char *verb, enum smtp_client_cmd c)
{
	cl->cmd_len = 0;
	cmd_puts(cl, verb);
	if (c == SMTP_CLIENT_CMD_EHLO || c == SMTP_CLIENT_CMD_HELO) {
		cmd_put(cl, " ", 1);
		cmd_put(cl, cl->helo, cl->helo_len);
	}
	cmd_put(cl, "\r\n", 2);
	pend_push(cl, c);
	cmd_flush(cl);
}

static void send_ehlo(struct smtp_client *cl)
{
	memset(&cl->caps, 0, sizeof(cl->caps));
	send_simple(cl, "EHLO", SMTP_CLIENT_CMD_EHLO);
}

static void put_mail(struct smtp_client *cl)
{
	const struct smtp_client_msg *m = cl->msg;
	unsigned caps = cl->caps.flags;

	cmd_puts(cl, "MAIL FROM:<");
	cmd_put(cl, m->sender, m->sender_len);
	cmd_put(cl, ">", 1);
	if (caps & SMTP_CAP_SIZE) {
		cmd_puts(cl, " SIZE=");
		cmd_u64(cl, m->size);
	}
	if (m->eightbit && (caps & SMTP_CAP_8BITMIME))
		cmd_puts(cl, " BODY=8BITMIME");
	if (m->smtputf8)
		cmd_puts(cl, " SMTPUTF8");
	if (caps & SMTP_CAP_DSN) {
		if (m->ret == 1)
			cmd_puts(cl, " RET=FULL");
		else if (m->ret == 2)
			cmd_puts(cl, " RET=HDRS");
		if (m->envid_len) {
			cmd_puts(cl, " ENVID=");
			cmd_put(cl, m->envid, m->envid_len);
		}
	}
	cmd_put(cl, "\r\n", 2);
	pend_push(cl, SMTP_CLIENT_CMD_MAIL);
}

static void put_rcpt(struct smtp_client *cl, unsigned i)
{
	const struct smtp_client_rcpt *r = &cl->msg->rcpts[i];

	cmd_puts(cl, "RCPT TO:<");
	cmd_put(cl, r->addr, r->addr_len);
	cmd_put(cl, ">", 1);
	if (cl->caps.flags & SMTP_CAP_DSN) {
		if (r->notify & SMTP_NOTIFY_NEVER) {
			cmd_puts(cl, " NOTIFY=NEVER");
		} else if (r->notify) {
			static const struct {
				unsigned bit;
				const char *name;
			} bits[] = {{SMTP_NOTIFY_SUCCESS, "SUCCESS"},
			            {SMTP_NOTIFY_FAILURE, "FAILURE"},
			            {SMTP_NOTIFY_DELAY, "DELAY"}};
			char sep = '=';
			cmd_puts(cl, " NOTIFY");
			for (size_t k = 0; k < ARRAY_SIZE(bits); k++) {
				if (r->notify & bits[k].bit) {
					cmd_put(cl, &sep, 1);
					cmd_puts(cl, bits[k].name);
					sep = ',';
				}
			}
		}
		if (r->orcpt_len) {
			cmd_puts(cl, " ORCPT=");
			cmd_put(cl, r->orcpt, r->orcpt_len);
		}
	}
	cmd_put(cl, "\r\n", 2);
	pend_push(cl, SMTP_CLIENT_CMD_RCPT);
	cl->rcpt_sent++;
}

/* The body as stored, by reference (BDAT). */
static void send_body_ref(struct smtp_client *cl)
{
	const struct smtp_client_msg *m = cl->msg;

	for (unsigned i = 0; i < m->nbody; i++)
		out_ref(cl, m->body[i].iov_base, m->body[i].iov_len);
}

static void put_bdat(struct smtp_client *cl)
{
	cmd_puts(cl, "BDAT ");
	cmd_u64(cl, cl->msg->size);
	cmd_puts(cl, " LAST\r\n");
	pend_push(cl, SMTP_CLIENT_CMD_DATA_END);
}

/*
 * One slice of the body for DATA: slices of p by reference, with the "." of
 * dot-stuffing and the CR or LF completing a bare LF or bare CR as copies.
 * cl->bol (at the start of a line) and cl->pending_cr (the last octet handed
 * out was a CR) carry over to the next slice.
 */
static void data_slice(struct smtp_client *cl, const char *p, size_t n)
{
	size_t start = 0, i = 0;

	while (i < n) {
		const char *lf, *cr;
		size_t end;

		if (cl->pending_cr) {
			cl->pending_cr = false;
			cl->bol = true;
			if (p[i] == '\n') {
				i++;
				continue;
			}
			/* a bare CR: make it CRLF */
			out_ref(cl, p + start, i - start);
			start = i;
			out_copy(cl, "\n", 1);
		}
		if (cl->bol) {
			cl->bol = false;
			if (p[i] == '.') {
				out_ref(cl, p + start, i - start);
				start = i;
				out_copy(cl, ".", 1);
			}
		}
		lf = memchr(p + i, '\n', n - i);
		end = lf ? (size_t)(lf - p) : n;
		cr = memchr(p + i, '\r', end - i);
		if (cr) {
			i = (size_t)(cr - p) + 1;
			cl->pending_cr = true;
			continue;
		}
		if (!lf)
			break;
		/* a bare LF: make it CRLF */
		out_ref(cl, p + start, end - start);
		start = end;
		out_copy(cl, "\r", 1);
		i = end + 1;
		cl->bol = true;
	}
	out_ref(cl, p + start, n - start);
}

/* After 354: the whole body, dot-stuffed, and the final dot, with nothing awaited between. */
static void send_body_data(struct smtp_client *cl)
{
	const struct smtp_client_msg *m = cl->msg;

	cl->bol = true;
	cl->pending_cr = false;
	for (unsigned i = 0; i < m->nbody; i++)
		data_slice(cl, m->body[i].iov_base, m->body[i].iov_len);
	if (cl->pending_cr)
		out_copy(cl, "\n.\r\n", 4);
	else if (cl->bol)
		out_copy(cl, ".\r\n", 3);
	else
		out_copy(cl, "\r\n.\r\n", 5);
	pend_push(cl, SMTP_CLIENT_CMD_DATA_END);
}

/* Without PIPELINING: after the last RCPT reply. */
static void after_rcpts(struct smtp_client *cl)
{
	if (cl->rcpt_ok == 0 || cl->mail_refused) {
		txn_done(cl);
		return;
	}
	cl->cmd_len = 0;
	if (cl->chunked) {
		put_bdat(cl);
		cmd_flush(cl);
		send_body_ref(cl);
	} else {
		cmd_puts(cl, "DATA\r\n");
		pend_push(cl, SMTP_CLIENT_CMD_DATA);
		cmd_flush(cl);
	}
}

static bool pipelining(const struct smtp_client *cl)
{
	return (cl->caps.flags & SMTP_CAP_PIPELINING) != 0;
}

/* ---- replies ---- */

/* EHLO or HELO accepted: STARTTLS if wanted, else ready. */
static void after_hello(struct smtp_client *cl)
{
	if (!cl->tls_active && (cl->caps.flags & SMTP_CAP_STARTTLS) && cl->ops->want_starttls) {
		bool want;
		cl->in_cb = CB_OTHER;
		want = cl->ops->want_starttls(cl->arg);
		cl->in_cb = CB_NONE;
		if (want) {
			send_simple(cl, "STARTTLS", SMTP_CLIENT_CMD_STARTTLS);
			return;
		}
	}
	cl->state = ST_READY;
	cl->ready_notify = true;
}

static void reply_hello(struct smtp_client *cl, enum smtp_client_cmd what)
{
	unsigned code = cl->cur.code, klass = code / 100;

	switch (what) {
	case SMTP_CLIENT_CMD_GREETING:
		if (code == 220)
			send_ehlo(cl);
		else if (klass == 4 || klass == 5)
			session_fail(cl, SMTP_CLIENT_FAIL_GREETING, what, true, code != 421,
			             "greeting refused: %u", code);
		else
			protocol_error(cl, what);
		return;
	case SMTP_CLIENT_CMD_EHLO:
		if (klass == 2) {
			after_hello(cl);
		} else if (klass == 5) {
			memset(&cl->caps, 0, sizeof(cl->caps));
			send_simple(cl, "HELO", SMTP_CLIENT_CMD_HELO);
		} else if (klass == 4) {
			session_fail(cl, SMTP_CLIENT_FAIL_HELO, what, true, true,
			             "EHLO refused: %u", code);
		} else {
			protocol_error(cl, what);
		}
		return;
	case SMTP_CLIENT_CMD_HELO:
		if (klass == 2)
			after_hello(cl);
		else if (klass == 4 || klass == 5)
			session_fail(cl, SMTP_CLIENT_FAIL_HELO, what, true, true,
			             "EHLO and HELO refused: %u", code);
		else
			protocol_error(cl, what);
		return;
	case SMTP_CLIENT_CMD_STARTTLS:
		if (code == 220)
			cl->state = ST_TLS; /* start_tls is called by feed once no byte follows */
		else if (klass == 4 || klass == 5) {
			/* refused: go on in plaintext (smtp_client_tls_active says so) */
			cl->caps.flags &= ~SMTP_CAP_STARTTLS;
			cl->state = ST_READY;
			cl->ready_notify = true;
		} else {
			protocol_error(cl, what);
		}
		return;
	default:
		panic("smtp_client: %s in the hello phase", smtp_client_cmd_name(what));
	}
}

static void reply_txn(struct smtp_client *cl, enum smtp_client_cmd what)
{
	unsigned code = cl->cur.code, klass = code / 100, i;
	struct smtp_client_reply r;
	bool pipe = pipelining(cl);

	switch (what) {
	case SMTP_CLIENT_CMD_RSET:
		if (klass != 2) {
			session_fail(cl, SMTP_CLIENT_FAIL_PROTOCOL, what, true, false,
			             "RSET refused: %u", code);
			return;
		}
		if (!pipe) {
			cl->cmd_len = 0;
			put_mail(cl);
			cmd_flush(cl);
		}
		return;
	case SMTP_CLIENT_CMD_MAIL:
		if (klass == 2) {
			if (!pipe) {
				cl->cmd_len = 0;
				put_rcpt(cl, 0);
				cmd_flush(cl);
			}
		} else if (klass == 4 || klass == 5) {
			cl->mail_refused = true;
			cl->mreply = store_reply(cl, what);
			if (!pipe)
				txn_done(cl);
		} else {
			protocol_error(cl, what);
		}
		return;
	case SMTP_CLIENT_CMD_RCPT:
		i = cl->rcpt_replied++;
		if (klass == 2) {
			if (!cl->mail_refused) {
				cl->rstate[i] = R_ACCEPTED;
				cl->rcpt_ok++;
			}
		} else if (klass == 4 || klass == 5) {
			if (!cl->mail_refused) {
				cl->rres[i] = store_reply(cl, what);
				cl->rstate[i] = R_FINAL;
			}
		} else {
			protocol_error(cl, what);
			return;
		}
		if (!pipe) {
			if (cl->rcpt_replied < cl->msg->nrcpts) {
				cl->cmd_len = 0;
				put_rcpt(cl, cl->rcpt_replied);
				cmd_flush(cl);
			} else {
				after_rcpts(cl);
			}
		}
		return;
	case SMTP_CLIENT_CMD_DATA:
		if (code == 354) {
			if (cl->rcpt_ok && !cl->mail_refused) {
				send_body_data(cl);
			} else {
				/* a pipelining server that says 354 with no recipient */
				out_copy(cl, ".\r\n", 3);
				pend_push(cl, SMTP_CLIENT_CMD_DATA_END);
			}
		} else if (klass == 4 || klass == 5) {
			r = store_reply(cl, what);
			if (cl->mreply.code == 0)
				cl->mreply = r;
			for (i = 0; i < cl->msg->nrcpts; i++) {
				if (cl->rstate[i] == R_ACCEPTED) {
					cl->rres[i] = r;
					cl->rstate[i] = R_FINAL;
				}
			}
			txn_done(cl);
		} else {
			protocol_error(cl, what);
		}
		return;
	case SMTP_CLIENT_CMD_DATA_END:
		if (klass != 2 && klass != 4 && klass != 5) {
			protocol_error(cl, what);
			return;
		}
		r = store_reply(cl, what);
		if (cl->rcpt_ok && !cl->mail_refused) {
			cl->mreply = r;
			cl->final_ok = klass == 2;
			for (i = 0; i < cl->msg->nrcpts; i++) {
				if (cl->rstate[i] == R_ACCEPTED) {
					cl->rres[i] = r;
					cl->rstate[i] = R_FINAL;
				}
			}
		} else if (cl->mreply.code == 0) {
			cl->mreply = r;
		}
		txn_done(cl);
		return;
	default:
		panic("smtp_client: %s in a transaction", smtp_client_cmd_name(what));
	}
}

/* A complete reply is in cl->cur. */
static void on_reply(struct smtp_client *cl)
{
	enum smtp_client_cmd what = pend_first(cl);

	if (cl->unsolicited || what == SMTP_CLIENT_CMD_NONE) {
		cl->unsolicited = false;
		what = SMTP_CLIENT_CMD_NONE;
		if (cl->cur.code == 421)
			session_fail(cl, SMTP_CLIENT_FAIL_CLOSING, what, true, false,
			             "server closing: 421");
		else
			session_fail(cl, SMTP_CLIENT_FAIL_PROTOCOL, what, true, false,
			             "unsolicited reply %u", cl->cur.code);
		return;
	}
	pend_pop(cl);
	if (what == SMTP_CLIENT_CMD_QUIT) {
		cl->state = ST_DONE;
		return;
	}
	if (cl->cur.code == 421 && what != SMTP_CLIENT_CMD_GREETING) {
		session_fail(cl, SMTP_CLIENT_FAIL_CLOSING, what, true, false,
		             "server closing: 421 to %s", smtp_client_cmd_name(what));
		return;
	}
	if (cl->state == ST_HELLO)
		reply_hello(cl, what);
	else
		reply_txn(cl, what);
}

static void reply_line(struct smtp_client *cl, const struct smtp_reply_line *ln)
{
	if (ln->index == 0) {
		cl->cur.code = ln->code;
		cl->cur.esc = ln->esc;
		cl->cur.cmd = SMTP_CLIENT_CMD_NONE;
		cl->cur.text_len = 0;
		cl->cur_text[0] = '\0';
	} else {
		cur_append(cl, " ", 1);
	}
	cur_append(cl, ln->msg, ln->msg_len);
	if (pend_first(cl) == SMTP_CLIENT_CMD_EHLO)
		smtp_reply_caps_learn(&cl->caps, ln);
}

void smtp_client_feed(struct smtp_client *cl, const char *in, size_t len)
{
	struct smtp_reply_line ln;
	const char *err = NULL;
	size_t used;
	int rc;

	if (unlikely(cl->in_cb != CB_NONE))
		panic("smtp_client_feed called from inside a callback");
	if (cl->state == ST_DONE)
		return;
	if (cl->state == ST_INIT || cl->state == ST_TLS) {
		if (len)
			session_fail(cl, SMTP_CLIENT_FAIL_PROTOCOL, awaiting(cl), false, false,
			             cl->state == ST_TLS
			                 ? "data after the STARTTLS reply, before the TLS handshake"
			                 : "data before the connection was up");
		return;
	}
	while (len > 0) {
		/*
		 * A reply that starts while nothing is pending is unsolicited
		 * (421 or a protocol error), even if a message is given before
		 * its end arrives: it must not be taken as the reply to MAIL.
		 */
		if (cl->state == ST_READY && smtp_reply_parser_idle(&cl->rp))
			cl->unsolicited = true;
		rc = smtp_reply_parser_next(&cl->rp, in, len, &used, &ln, &err);
		if (rc < 0) {
			if (cl->state == ST_QUIT) {
				cl->state = ST_DONE;
				return;
			}
			session_fail(cl, SMTP_CLIENT_FAIL_PROTOCOL, awaiting(cl), false, false,
			             "%s", err);
			return;
		}
		in += used;
		len -= used;
		if (rc == 0)
			break;
		reply_line(cl, &ln);
		if (!ln.last)
			continue;
		on_reply(cl);
		if (cl->state == ST_DONE)
			return;
		if (cl->state == ST_TLS) {
			/* bytes before the handshake: injection (CVE-2011-0411 class) */
			if (len > 0) {
				session_fail(
				    cl, SMTP_CLIENT_FAIL_PROTOCOL, SMTP_CLIENT_CMD_STARTTLS, false,
				    false,
				    "data after the STARTTLS reply, before the TLS handshake");
				return;
			}
			cl->in_cb = CB_OTHER;
			cl->ops->start_tls(cl->arg);
			cl->in_cb = CB_NONE;
			return;
		}
	}
	/* Not while an unsolicited reply is being read: it ends the session. */
	if (cl->state == ST_READY && cl->ready_notify && !cl->unsolicited) {
		cl->ready_notify = false;
		cl->in_cb = CB_READY;
		cl->ops->on_ready(cl->arg);
		cl->in_cb = CB_NONE;
	}
}

/* ---- messages ---- */

static bool addr_ok(const char *s, size_t n)
{
	if (n > SMTP_CLIENT_MAX_ADDR || (n && !s))
		return false;
	for (size_t i = 0; i < n; i++)
		if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0')
			return false;
	return true;
}

static bool xtext_ok(const char *s, size_t n)
{
	if (n > SMTP_CLIENT_MAX_XTEXT || (n && !s))
		return false;
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)s[i] <= 0x20 || (unsigned char)s[i] >= 0x7f)
			return false;
	return true;
}

/* Validates m; returns 0 or -errno, and the command octets it may need in *need_r. */
static int msg_check(const struct smtp_client *cl, const struct smtp_client_msg *m, size_t *need_r)
{
	size_t need;
	uint64_t total = 0;
	unsigned i;

	if (m->nrcpts == 0 || !m->rcpts)
		return -EINVAL;
	if (m->nrcpts > cl->lim.max_rcpts)
		return -E2BIG;
	if (m->ret < 0 || m->ret > 2 || !addr_ok(m->sender, m->sender_len) ||
	    !xtext_ok(m->envid, m->envid_len) || (m->nbody && !m->body))
		return -EINVAL;
	/* RSET, MAIL with every parameter, DATA or BDAT: generous */
	need = 16 + 128 + m->sender_len + m->envid_len + 64;
	for (i = 0; i < m->nrcpts; i++) {
		const struct smtp_client_rcpt *r = &m->rcpts[i];
		if (r->addr_len == 0 || !addr_ok(r->addr, r->addr_len) ||
		    !xtext_ok(r->orcpt, r->orcpt_len))
			return -EINVAL;
		need += 64 + r->addr_len + r->orcpt_len;
	}
	for (i = 0; i < m->nbody; i++) {
		if (m->body[i].iov_len && !m->body[i].iov_base)
			return -EINVAL;
		total += m->body[i].iov_len;
	}
	if (total != m->size)
		return -EINVAL;
	*need_r = need;
	return 0;
}

static void txn_begin(struct smtp_client *cl, const struct smtp_client_msg *m)
{
	cl->msg = m;
	cl->texts_used = 0;
	memset(cl->rstate, R_PENDING, m->nrcpts);
	memset(&cl->mreply, 0, sizeof(cl->mreply));
	cl->mreply.text = "";
	cl->rcpt_sent = cl->rcpt_replied = cl->rcpt_ok = 0;
	cl->mail_refused = false;
	cl->final_ok = false;
	cl->chunked = cl->lim.use_chunking && (cl->caps.flags & SMTP_CAP_CHUNKING);
}

/* Refuses m without sending anything. */
static void local_fail(struct smtp_client *cl, unsigned code, unsigned subject, unsigned detail,
                       const char *text)
{
	unsigned i;

	cur_set(cl, code, subject, detail, text);
	cl->mreply = store_reply(cl, SMTP_CLIENT_CMD_LOCAL);
	for (i = 0; i < cl->msg->nrcpts; i++) {
		cl->rres[i] = cl->mreply;
		cl->rstate[i] = R_FINAL;
	}
	finish_msg(cl, NULL, true);
}

int smtp_client_send_msg(struct smtp_client *cl, const struct smtp_client_msg *m)
{
	size_t need;
	unsigned i;
	int rc;

	if (cl->state != ST_READY || cl->in_cb == CB_OTHER)
		return -EBUSY;
	rc = msg_check(cl, m, &need);
	if (rc < 0)
		return rc;
	if (need > cl->cmd_cap) {
		size_t cap = cl->cmd_cap;
		char *p;
		while (cap < need)
			cap *= 2;
		p = realloc(cl->cmd, cap);
		if (!p)
			return -ENOMEM;
		cl->cmd = p;
		cl->cmd_cap = cap;
	}
	txn_begin(cl, m);
	if (m->smtputf8 && !(cl->caps.flags & SMTP_CAP_SMTPUTF8)) {
		local_fail(cl, 553, 6, 7, "SMTPUTF8 is required but the server does not offer it");
		return 1;
	}
	if ((cl->caps.flags & SMTP_CAP_SIZE) && cl->caps.size_max && m->size > cl->caps.size_max) {
		char t[128];
		snprintf(t, sizeof(t),
		         "message size %" PRIu64 " exceeds the server's limit of %" PRIu64, m->size,
		         cl->caps.size_max);
		local_fail(cl, 552, 3, 4, t);
		return 1;
	}

	cl->state = ST_TXN;
	cl->ready_notify = false;
	cl->cmd_len = 0;
	if (cl->need_rset) {
		cl->need_rset = false;
		cmd_puts(cl, "RSET\r\n");
		pend_push(cl, SMTP_CLIENT_CMD_RSET);
		if (!pipelining(cl)) {
			cmd_flush(cl);
			return 0;
		}
	}
	put_mail(cl);
	if (!pipelining(cl)) {
		cmd_flush(cl);
		return 0;
	}
	for (i = 0; i < m->nrcpts; i++)
		put_rcpt(cl, i);
	if (cl->chunked) {
		put_bdat(cl);
		cmd_flush(cl);
		send_body_ref(cl);
	} else {
		cmd_puts(cl, "DATA\r\n");
		pend_push(cl, SMTP_CLIENT_CMD_DATA);
		cmd_flush(cl);
	}
	return 0;
}

/* ---- session ---- */

int smtp_client_init(struct smtp_client *cl, const struct smtp_client_ops *ops, void *arg,
                     const char *helo_name, const struct smtp_client_limits *lim)
{
	size_t n, i;
	int rc;

	memset(cl, 0, sizeof(*cl));
	if (lim)
		cl->lim = *lim;
	else
		smtp_client_limits_default(&cl->lim);
	if (!ops || !ops->send || !ops->on_ready || !ops->on_msg_done || !ops->on_fail ||
	    (ops->want_starttls && !ops->start_tls) || !helo_name)
		return -EINVAL;
	n = strlen(helo_name);
	if (n == 0 || n >= sizeof(cl->helo))
		return -EINVAL;
	for (i = 0; i < n; i++)
		if ((unsigned char)helo_name[i] <= 0x20 || (unsigned char)helo_name[i] >= 0x7f)
			return -EINVAL;
	if (cl->lim.max_rcpts < 1 || cl->lim.max_rcpts > 1000000 || cl->lim.max_text < 16 ||
	    cl->lim.text_space < cl->lim.max_text || !cl->lim.greeting_ms || !cl->lim.helo_ms ||
	    !cl->lim.mail_ms || !cl->lim.rcpt_ms || !cl->lim.data_init_ms ||
	    !cl->lim.data_block_ms || !cl->lim.data_done_ms || !cl->lim.quit_ms)
		return -EINVAL;
	memcpy(cl->helo, helo_name, n);
	cl->helo_len = n;
	cl->ops = ops;
	cl->arg = arg;

	rc = smtp_reply_parser_init(&cl->rp, &cl->lim.reply);
	if (rc < 0)
		return rc;
	cl->pend_cap = cl->lim.max_rcpts + 8;
	cl->pend = malloc(cl->pend_cap);
	cl->cur_text = malloc(cl->lim.max_text);
	cl->rres = calloc(cl->lim.max_rcpts, sizeof(*cl->rres));
	cl->rstate = calloc(cl->lim.max_rcpts, 1);
	cl->texts = malloc(cl->lim.text_space);
	cl->cmd_cap = CLIENT_CMD_INITIAL;
	cl->cmd = malloc(cl->cmd_cap);
	if (!cl->pend || !cl->cur_text || !cl->rres || !cl->rstate || !cl->texts || !cl->cmd) {
		smtp_client_deinit(cl);
		return -ENOMEM;
	}
	cl->cur_text[0] = '\0';
	cl->cur.text = cl->cur_text;
	return 0;
}

void smtp_client_deinit(struct smtp_client *cl)
{
	smtp_reply_parser_deinit(&cl->rp);
	free(cl->pend);
	free(cl->cur_text);
	free(cl->rres);
	free(cl->rstate);
	free(cl->texts);
	free(cl->cmd);
	cl->pend = NULL;
	cl->cur_text = NULL;
	cl->rres = NULL;
	cl->rstate = NULL;
	cl->texts = NULL;
	cl->cmd = NULL;
	cl->cmd_cap = 0;
	cl->msg = NULL;
	cl->state = ST_DONE;
}

void smtp_client_on_connect(struct smtp_client *cl)
{
	if (cl->state != ST_INIT)
		return;
	cl->state = ST_HELLO;
	pend_push(cl, SMTP_CLIENT_CMD_GREETING);
}

void smtp_client_quit(struct smtp_client *cl)
{
	if (cl->in_cb == CB_OTHER || cl->state == ST_DONE || cl->state == ST_QUIT)
		return;
	if (cl->state == ST_READY) {
		cl->ready_notify = false;
		cl->state = ST_QUIT;
		send_simple(cl, "QUIT", SMTP_CLIENT_CMD_QUIT);
		return;
	}
	if (cl->msg) {
		struct smtp_client_reply end;
		memset(&end, 0, sizeof(end));
		end.text = "";
		finish_msg(cl, &end, false);
	}
	cl->state = ST_DONE;
	cl->pend_count = 0;
}

static void session_lost(struct smtp_client *cl, enum smtp_client_fail_kind kind, const char *why)
{
	if (cl->state == ST_INIT || cl->state == ST_DONE || cl->in_cb != CB_NONE)
		return;
	if (cl->state == ST_QUIT) {
		cl->state = ST_DONE;
		return;
	}
	session_fail(cl, kind, awaiting(cl), false, false, "%s while waiting for %s", why,
	             cl->state == ST_READY ? "a message" : smtp_client_cmd_name(awaiting(cl)));
}

void smtp_client_timeout(struct smtp_client *cl)
{
	session_lost(cl, SMTP_CLIENT_FAIL_TIMEOUT, "timeout");
}

void smtp_client_on_close(struct smtp_client *cl)
{
	session_lost(cl, SMTP_CLIENT_FAIL_DISCONNECTED, "connection lost");
}

uint64_t smtp_client_timeout_ms(const struct smtp_client *cl)
{
	switch (cl->state) {
	case ST_HELLO:
	case ST_TXN:
	case ST_QUIT:
		break;
	case ST_TLS:
		return cl->lim.helo_ms;
	default:
		return 0;
	}
	switch (pend_first(cl)) {
	case SMTP_CLIENT_CMD_GREETING:
		return cl->lim.greeting_ms;
	case SMTP_CLIENT_CMD_EHLO:
	case SMTP_CLIENT_CMD_HELO:
	case SMTP_CLIENT_CMD_STARTTLS:
		return cl->lim.helo_ms;
	case SMTP_CLIENT_CMD_RSET:
	case SMTP_CLIENT_CMD_MAIL:
		return cl->lim.mail_ms;
	case SMTP_CLIENT_CMD_RCPT:
		return cl->lim.rcpt_ms;
	case SMTP_CLIENT_CMD_DATA:
		return cl->lim.data_init_ms;
	case SMTP_CLIENT_CMD_DATA_END:
		return cl->lim.data_done_ms;
	case SMTP_CLIENT_CMD_QUIT:
		return cl->lim.quit_ms;
	default:
		return 0;
	}
}

const struct smtp_reply_caps *smtp_client_caps(const struct smtp_client *cl)
{
	return &cl->caps;
}

void smtp_client_tls_done(struct smtp_client *cl)
{
	if (cl->state != ST_TLS)
		return;
	smtp_reply_parser_reset(&cl->rp);
	cl->tls_active = true;
	cl->state = ST_HELLO;
	send_ehlo(cl);
}

bool smtp_client_tls_active(const struct smtp_client *cl)
{
	return cl->tls_active;
}

bool smtp_client_ready(const struct smtp_client *cl)
{
	return cl->state == ST_READY;
}

bool smtp_client_finished(const struct smtp_client *cl)
{
	return cl->state == ST_DONE;
}
