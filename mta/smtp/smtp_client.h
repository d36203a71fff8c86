/*
 * smtp_client: the relay's SMTP client (delivery side) as a pure protocol
 * engine. It never touches a socket, a timer or the spool: the glue feeds it
 * the server's bytes (smtp_client_feed), writes what it is handed
 * (ops->send), arms the timer it asks for (smtp_client_timeout_ms) and gives
 * it messages when it says it is ready (ops->on_ready).
 *
 * Session: greeting (must be 220, multiline allowed) -> EHLO (capabilities
 * learnt with smtp_reply_caps_learn; a 5xx makes it fall back to HELO with no
 * extensions) -> optional STARTTLS (ops->want_starttls) -> ready. Then any
 * number of messages, one at a time, then QUIT.
 *
 * Per message (RFC 5321, 2920, 3030, 1870, 6152, 6531, 3461):
 *   - With PIPELINING: [RSET] MAIL, every RCPT and DATA go out in ONE send
 *     call; with CHUNKING too, "BDAT <size> LAST" joins that same send call
 *     and the body follows at once, by reference.
 *   - Without PIPELINING: one command at a time; DATA (or BDAT) only when at
 *     least one RCPT was accepted.
 *   - DATA: after 354 the body is dot-stuffed on the fly, bare LF and bare CR
 *     become CRLF, a missing final CRLF is added, and the final ".\r\n" is
 *     handed out in the same sequence of send calls as the body's last octet
 *     (nothing is ever awaited between the body and the dot).
 *   - BDAT: the body exactly as stored (msg->size octets), no stuffing.
 *   - MAIL parameters: SIZE=<size> when SIZE is offered; BODY=8BITMIME when
 *     msg->eightbit and 8BITMIME is offered (otherwise the body goes as it
 *     is); SMTPUTF8 when msg->smtputf8 (not offered: local failure 553 5.6.7,
 *     RFC 6531 3.4); RET= and ENVID= only when DSN is offered. RCPT
 *     parameters NOTIFY= (NEVER alone, else SUCCESS,FAILURE,DELAY in that
 *     order) and ORCPT= only when DSN is offered.
 *   - A size above the server's announced SIZE maximum: local failure
 *     552 5.3.4 (RFC 1870), nothing sent.
 *   - After a transaction that did not end with a 2xx final reply, RSET is
 *     sent before the next MAIL (pipelined with it when PIPELINING is offered;
 *     QUIT needs none).
 *
 * Results (struct smtp_client_result, on_msg_done, exactly once per message):
 * a recipient is delivered when its RCPT got 2xx AND the final reply (to the
 * dot, or to BDAT LAST) is 2xx. A 4xx/5xx RCPT reply is that recipient's
 * result; a 4xx/5xx DATA reply or final reply applies to every RCPT-accepted
 * recipient; a MAIL refusal applies to all. When the session ends with a
 * message in flight (421, timeout, protocol error, disconnection), the
 * recipients whose outcome is not known get code 421 when a 421 reply ended
 * it, else code 0 ("unknown": the glue defers them; a code 0 recipient may
 * have been delivered when the final reply was lost).
 *
 * Session failures (ops->on_fail, at most once, always the last callback):
 * greeting not 220, 421 at any time, EHLO refused with 4xx or EHLO and HELO
 * both refused, a protocol error (malformed reply line, reply out of step,
 * unsolicited data, an impossible reply code for the command), a timeout,
 * the connection lost. After a greeting/EHLO/HELO refusal other than 421 the
 * client sends "QUIT\r\n" before on_fail (RFC 5321 3.1); the glue writes what
 * it was handed, then closes.
 *
 * Callbacks are made from smtp_client_feed, smtp_client_send_msg (a local
 * failure only: on_msg_done), smtp_client_timeout, smtp_client_on_close,
 * smtp_client_quit (on_msg_done) and smtp_client_tls_done (send). Inside a
 * callback the glue may call smtp_client_send_msg and smtp_client_quit only
 * from on_ready; it must never call smtp_client_deinit from a callback (do it
 * after the call into the client returns).
 *
 * Memory: everything is allocated by smtp_client_init, except the command
 * buffer, which grows (and never shrinks) when a message needs more room
 * than any message before it. Body octets are never copied: they are handed
 * out by reference; only the dot-stuffing "." and CRLF repairs are copies.
 *
 * Thread-safety: a client belongs to one connection, used by one thread.
 */
#ifndef POSTHASTE_MTA_SMTP_CLIENT_H
#define POSTHASTE_MTA_SMTP_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "mta/smtp/smtp_reply_parser.h"

/*
 * DSN NOTIFY bits: the same values as in smtp_server.h (an identical macro
 * redefinition is valid C, and a different one fails to compile wherever both
 * headers are included, as the unit test does). This pure library must not
 * include the server's header (it pulls in net/).
 */
#define SMTP_NOTIFY_NEVER   0x1u
#define SMTP_NOTIFY_SUCCESS 0x2u
#define SMTP_NOTIFY_FAILURE 0x4u
#define SMTP_NOTIFY_DELAY   0x8u

/* Per-field bounds checked by smtp_client_send_msg (-EINVAL beyond them). */
#define SMTP_CLIENT_MAX_ADDR  1000 /* octets of a sender or recipient address, without <> */
#define SMTP_CLIENT_MAX_XTEXT 500  /* octets of an ENVID or ORCPT value (RFC 3461 4.2) */

struct smtp_client_rcpt {
	const char *addr;  /* without <>; no CR, LF or NUL */
	size_t addr_len;   /* >= 1 */
	unsigned notify;   /* SMTP_NOTIFY_* or 0 */
	const char *orcpt; /* as received: "rfc822;..." xtext (printable ASCII, no SP) */
	size_t orcpt_len;  /* 0 = none */
};

/* One message to deliver. Everything it points to must stay valid until on_msg_done returns. */
struct smtp_client_msg {
	const char *sender; /* without <>; no CR, LF or NUL */
	size_t sender_len;  /* 0 = the null sender <> */
	const struct smtp_client_rcpt *rcpts;
	unsigned nrcpts;   /* 1 .. limits.max_rcpts (the glue splits bigger lists) */
	const char *envid; /* xtext as received (printable ASCII, no SP) */
	size_t envid_len;  /* 0 = none */
	int ret;           /* 0 none, 1 FULL, 2 HDRS */
	bool smtputf8;     /* the message needs SMTPUTF8 */
	bool eightbit;     /* 8-bit body: BODY=8BITMIME when offered */
	/* The content as stored: headers + body, NOT dot-stuffed, line ends as received. */
	const struct iovec *body;
	unsigned nbody;
	uint64_t size; /* total octets of body[]; must equal their sum */
};

/* The command a reply answered, or where an outcome came from. */
enum smtp_client_cmd {
	SMTP_CLIENT_CMD_NONE = 0, /* no reply: the outcome is unknown (code 0) */
	SMTP_CLIENT_CMD_GREETING,
	SMTP_CLIENT_CMD_EHLO,
	SMTP_CLIENT_CMD_HELO,
	SMTP_CLIENT_CMD_STARTTLS,
	SMTP_CLIENT_CMD_RSET,
	SMTP_CLIENT_CMD_MAIL,
	SMTP_CLIENT_CMD_RCPT,
	SMTP_CLIENT_CMD_DATA,     /* the reply to the DATA command (a refusal instead of 354) */
	SMTP_CLIENT_CMD_DATA_END, /* the final reply: to the dot, or to BDAT LAST */
	SMTP_CLIENT_CMD_QUIT,
	SMTP_CLIENT_CMD_LOCAL, /* decided by the client, nothing sent (permanent_local) */
	SMTP_CLIENT_CMD_COUNT
};

/* "MAIL", "RCPT", ... for logs; "?" for a value out of range. */
const char *smtp_client_cmd_name(enum smtp_client_cmd cmd);

/* A reply as remembered by the client. */
struct smtp_client_reply {
	unsigned code;             /* 200..559; 0 = none (outcome unknown) */
	struct smtp_reply_esc esc; /* enhanced status code; klass 0 when the reply had none */
	enum smtp_client_cmd cmd;  /* the command it answered */
	/*
	 * The reply's text after the enhanced code (the lines of a multiline
	 * reply joined with SP), at most limits.max_text - 1 octets, control
	 * characters replaced by '?', NUL-terminated. Client-owned: valid
	 * during the callback it is given to. Never NULL ("" when none).
	 */
	const char *text;
	size_t text_len;
};

/* Given to on_msg_done; everything in it is valid during the callback only. */
struct smtp_client_result {
	const struct smtp_client_msg *msg;    /* the message given */
	const struct smtp_client_reply *rcpt; /* msg->nrcpts outcomes, in msg->rcpts order */
	unsigned nrcpts;
	/*
	 * The message-level reply: the MAIL refusal, the DATA refusal, the final
	 * reply, the reply that ended the session (421), or the local failure;
	 * code 0 when there was none (e.g. every RCPT refused without
	 * PIPELINING, or a timeout).
	 */
	struct smtp_client_reply reply;
	bool permanent_local; /* the client refused the message itself (5.6.7, 5.3.4) */
	/* rcpt[] by outcome: code 2xx / 4xx / 5xx / 0 */
	unsigned delivered, deferred, bounced, unknown;
};

enum smtp_client_fail_kind {
	SMTP_CLIENT_FAIL_GREETING = 1, /* the greeting was not 220 (reply: it) */
	SMTP_CLIENT_FAIL_HELO, /* EHLO 4xx, or EHLO 5xx and then HELO refused (reply: the last) */
	SMTP_CLIENT_FAIL_CLOSING,      /* 421 after the greeting (reply: it) */
	SMTP_CLIENT_FAIL_PROTOCOL,     /* the server broke the protocol (reason says how) */
	SMTP_CLIENT_FAIL_TIMEOUT,      /* smtp_client_timeout */
	SMTP_CLIENT_FAIL_DISCONNECTED, /* smtp_client_on_close */
};

/* Given to on_fail; valid during the callback only. */
struct smtp_client_failure {
	enum smtp_client_fail_kind kind;
	enum smtp_client_cmd awaiting;  /* the reply being waited for (NONE when idle) */
	struct smtp_client_reply reply; /* the reply that caused it; code 0 when none */
	const char *reason;             /* readable, NUL-terminated */
};

struct smtp_client_ops {
	/*
	 * Output, in order. body_ref true: data points into msg->body and stays
	 * valid until on_msg_done returns (it may be queued by reference); false:
	 * copy it now. Must not call back into the client.
	 */
	void (*send)(void *arg, const void *data, size_t len, bool body_ref);
	/*
	 * The session is ready for a message: after the greeting and EHLO (and
	 * STARTTLS), and after each message. Give one (smtp_client_send_msg) or
	 * quit (smtp_client_quit), now or later. Called at the end of
	 * smtp_client_feed, never from inside smtp_client_send_msg.
	 */
	void (*on_ready)(void *arg);
	/* Exactly once per message accepted by smtp_client_send_msg. */
	void (*on_msg_done)(void *arg, const struct smtp_client_result *r);
	/*
	 * The session is over (see the list above); the glue closes the
	 * connection. A message in flight gets its on_msg_done first. No
	 * callback follows.
	 */
	void (*on_fail)(void *arg, const struct smtp_client_failure *f);
	/* May be NULL (never STARTTLS). Asked after each EHLO while TLS is not active. */
	bool (*want_starttls)(void *arg);
	/*
	 * "220" to STARTTLS came (with no byte after it): start the TLS handshake,
	 * then call smtp_client_tls_done (not from inside this callback), or
	 * smtp_client_on_close when it fails. NULL only with want_starttls NULL.
	 */
	void (*start_tls)(void *arg);
};

struct smtp_client_limits {
	unsigned max_rcpts;             /* per message; default 100 (RFC 5321 4.5.3.1.8) */
	size_t max_text;                /* octets of one reply text incl. NUL; 256, >= 16 */
	size_t text_space;              /* all texts of one message; 16384, >= max_text */
	bool use_chunking;              /* BDAT when CHUNKING is offered; default true */
	struct smtp_reply_limits reply; /* reply line length and lines per reply */
	/*
	 * Timeouts in milliseconds (RFC 5321 4.5.3.2), each > 0. data_block_ms
	 * is applied by the glue to each write of the body (see timeout_ms).
	 */
	uint64_t greeting_ms;   /* initial 220: 5 min */
	uint64_t helo_ms;       /* EHLO, HELO, STARTTLS and the TLS handshake: 5 min */
	uint64_t mail_ms;       /* MAIL (and a RSET before it): 5 min */
	uint64_t rcpt_ms;       /* each RCPT: 5 min */
	uint64_t data_init_ms;  /* DATA -> 354: 2 min */
	uint64_t data_block_ms; /* each write of the body: 3 min */
	uint64_t data_done_ms;  /* the final reply: 10 min */
	uint64_t quit_ms;       /* QUIT -> 221: 5 min */
};

/* The defaults given above. */
void smtp_client_limits_default(struct smtp_client_limits *lim);

struct smtp_client {
	/* private: callers use the functions below */
	const struct smtp_client_ops *ops;
	void *arg;
	struct smtp_client_limits lim;
	char helo[256];
	size_t helo_len;
	unsigned state;    /* enum in smtp_client.c */
	unsigned in_cb;    /* which callback is running */
	bool ready_notify; /* on_ready owed at the end of feed */
	bool need_rset;
	bool tls_active;
	bool unsolicited; /* the reply being read began while nothing was pending */
	struct smtp_reply_parser rp;
	struct smtp_reply_caps caps;
	/* expected replies, in order: a ring of enum smtp_client_cmd */
	uint8_t *pend;
	unsigned pend_cap, pend_head, pend_count;
	/* the reply being read */
	struct smtp_client_reply cur;
	char *cur_text; /* lim.max_text octets */
	/* the message in flight */
	const struct smtp_client_msg *msg;
	struct smtp_client_reply *rres; /* lim.max_rcpts */
	uint8_t *rstate;                /* lim.max_rcpts */
	struct smtp_client_reply mreply;
	unsigned rcpt_sent, rcpt_replied, rcpt_ok;
	bool mail_refused, final_ok, chunked;
	char *texts; /* lim.text_space octets */
	size_t texts_used;
	/* commands being built: grown, never shrunk */
	char *cmd;
	size_t cmd_len, cmd_cap;
	/* dot-stuffing state across body slices */
	bool bol, pending_cr;
	char reason[192];
};

/*
 * Prepares cl: copies *ops pointer (ops must outlive cl), *lim (NULL: the
 * defaults) and helo_name (1..255 octets of printable ASCII without SP; the
 * name sent in EHLO/HELO). Nothing is sent until smtp_client_on_connect.
 * Returns 0, -EINVAL (bad name or limits, ops->send/on_ready/on_msg_done/
 * on_fail NULL, start_tls NULL while want_starttls is set) or -ENOMEM.
 */
int smtp_client_init(struct smtp_client *cl, const struct smtp_client_ops *ops, void *arg,
                     const char *helo_name, const struct smtp_client_limits *lim);
/* Frees what init allocated. Accepts a zeroed or already deinitialised client. No callback. */
void smtp_client_deinit(struct smtp_client *cl);

/* The TCP connection is up: the client now waits for the greeting. Once only. */
void smtp_client_on_connect(struct smtp_client *cl);

/*
 * Bytes from the server (after TLS: decrypted), any split, len may be 0.
 * Ignored once the session is over (after on_fail or QUIT's reply); bytes
 * before smtp_client_on_connect are a protocol error. Never from inside a
 * callback (a broken invariant: panic).
 */
void smtp_client_feed(struct smtp_client *cl, const char *in, size_t len);

/*
 * Starts a transaction for m (which must stay valid, body included, until its
 * on_msg_done returns). Only when ready: after on_ready, before anything else.
 *   0: under way; on_msg_done comes later (from feed, timeout, on_close, quit).
 *   1: refused locally (SMTPUTF8 not offered: 553 5.6.7; size above the
 *      server's SIZE: 552 5.3.4): on_msg_done was called from inside this
 *      call with permanent_local set, and the session is still ready: give
 *      the next message or quit (on_ready will not be called for this).
 *   -EBUSY: not ready (or called from a callback other than on_ready).
 *   -E2BIG: more than limits.max_rcpts recipients.
 *   -EINVAL: no recipient, ret out of range, a field over its bound or with
 *      a forbidden octet, or body octets that do not add up to m->size.
 *   -ENOMEM: the command buffer could not grow.
 * On a negative return nothing was sent and no callback was made.
 */
int smtp_client_send_msg(struct smtp_client *cl, const struct smtp_client_msg *m);

/*
 * Ends the session. When ready: sends QUIT; the session is finished when its
 * reply comes (smtp_client_finished) or its timeout expires. At other times
 * (the glue gives up): nothing is sent (the server's state is unknown), a
 * message in flight gets on_msg_done with its unknown outcomes (code 0), and
 * the session is finished at once. No on_fail. Ignored after the end.
 */
void smtp_client_quit(struct smtp_client *cl);

/*
 * The glue's timer (armed with smtp_client_timeout_ms) expired: a message in
 * flight gets on_msg_done (code 0 for the unknown outcomes), then on_fail
 * (TIMEOUT). While waiting for QUIT's reply: just finished, no callback.
 * Ignored before on_connect and after the end.
 */
void smtp_client_timeout(struct smtp_client *cl);

/*
 * The connection was lost (EOF, a socket error, a failed TLS handshake): as
 * smtp_client_timeout, with DISCONNECTED. After QUIT was sent: just
 * finished. After on_fail (the glue closing in answer to it): ignored.
 */
void smtp_client_on_close(struct smtp_client *cl);

/*
 * What to arm now, in milliseconds; call it after every call into the client
 * and re-arm. The timeout of the reply being waited for (limits): greeting,
 * EHLO/HELO/STARTTLS/handshake, MAIL (and RSET), RCPT, DATA initiation, final
 * reply (measured from when the glue wrote the last body octet: while body
 * octets are still queued the glue applies limits.data_block_ms to each
 * write, RFC 5321 4.5.3.2.5), QUIT. With PIPELINING, the first reply
 * outstanding decides. 0 = idle (ready, not connected, or finished): the glue
 * uses its own idle timeout.
 */
uint64_t smtp_client_timeout_ms(const struct smtp_client *cl);

/* The capabilities learnt from the last EHLO (all zero after a HELO fallback). */
const struct smtp_reply_caps *smtp_client_caps(const struct smtp_client *cl);

/* The handshake started by ops->start_tls succeeded: the client sends EHLO again. */
void smtp_client_tls_done(struct smtp_client *cl);

/* True once smtp_client_tls_done was called (e.g. for a glue that requires TLS). */
bool smtp_client_tls_active(const struct smtp_client *cl);

/* True when the session is ready for smtp_client_send_msg. */
bool smtp_client_ready(const struct smtp_client *cl);

/* True once the session is over (on_fail made, QUIT answered, quit/timeout/close): close. */
bool smtp_client_finished(const struct smtp_client *cl);

#endif
