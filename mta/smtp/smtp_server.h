/*
 * smtp_server: the SMTP server protocol (RFC 5321 + ESMTP PIPELINING, SIZE,
 * 8BITMIME, ENHANCEDSTATUSCODES, CHUNKING, SMTPUTF8, DSN, AUTH PLAIN/LOGIN
 * per RFC 4954 through mta/smtp/sasl, docs/auth.md, STARTTLS per RFC 3207 and
 * implicit TLS per RFC 8314 through tls/, docs/tls.md) on a net/ connection. Each finished message goes to a message sink (the spool, or a
 * discard/count sink for benchmarks) through struct smtp_sink_ops.
 *
 * One struct smtp_server per listener configuration, shared by all workers
 * (immutable after smtp_server_listen); per-worker state is set up by
 * smtp_server_worker_init from the program's worker init hook.
 */
#ifndef POSTHASTE_MTA_SMTP_SERVER_H
#define POSTHASTE_MTA_SMTP_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "mta/smtp/smtp_parser.h"
#include "net/net.h"

struct smtp_session;

/* Where a message came from and where it goes: valid only during txn_end. */
struct smtp_rcpt {
	const char *addr; /* NUL-terminated, without <> */
	size_t len;
	unsigned notify;   /* SMTP_NOTIFY_* bits; 0 when not given */
	const char *orcpt; /* ORCPT value as sent (xtext), or NULL */
};

#define SMTP_NOTIFY_NEVER   0x1u
#define SMTP_NOTIFY_SUCCESS 0x2u
#define SMTP_NOTIFY_FAILURE 0x4u
#define SMTP_NOTIFY_DELAY   0x8u

enum smtp_body_type { SMTP_BODY_7BIT = 0, SMTP_BODY_8BITMIME };
enum smtp_ret { SMTP_RET_UNSET = 0, SMTP_RET_FULL, SMTP_RET_HDRS };

struct smtp_envelope {
	const char *helo;   /* as given in HELO/EHLO */
	bool esmtp;         /* EHLO (not HELO) */
	const char *sender; /* "" for the null sender <> */
	size_t sender_len;
	const struct smtp_rcpt *rcpts;
	unsigned nrcpts;
	uint64_t size; /* body octets received */
	enum smtp_body_type body;
	bool smtputf8;
	enum smtp_ret ret;
	const char *envid; /* or NULL */
	const struct sockaddr_storage *peer;
	bool chunked; /* arrived with BDAT */
	const char *auth_user; /* the AUTH identity (authcid) of the session, or NULL */
	/* TLS (STARTTLS or implicit): what was negotiated, or NULL without TLS (static strings) */
	const char *tls_version; /* "TLSv1.3" */
	const char *tls_cipher;  /* "TLS_AES_128_GCM_SHA256" */
	int tls_bits;            /* symmetric key bits */
};

/* A final reply for a transaction, e.g. {250, "2.0.0", "Ok: queued as 8F2A..."}. */
struct smtp_txn_result {
	unsigned code;
	const char *enhanced; /* "x.y.z" */
	char text[128];
};

/* Where a policy hook can step in (the bench sink injects failures and delays here). */
enum smtp_stage {
	SMTP_STAGE_CONNECT = 0,
	SMTP_STAGE_EHLO,
	SMTP_STAGE_MAIL,
	SMTP_STAGE_RCPT,
	SMTP_STAGE_DATA,
	SMTP_STAGE_EOM,
	SMTP_STAGE_COUNT
};

struct smtp_verdict {
	unsigned code;     /* 0: go on; else reply this code (4xx/5xx) and fail the step */
	unsigned delay_ms; /* delay the step's reply this long (the session waits, in order) */
};

/*
 * The message sink. All calls run on the session's worker thread. `ctx` is
 * the per-worker pointer given to smtp_server_worker_init.
 */
struct smtp_sink_ops {
	/* MAIL was accepted: start a transaction. 0, or -errno (then 451 4.3.0). */
	int (*txn_begin)(void *ctx, struct smtp_session *s, void **txn_r);
	/*
	 * Body octets, in order, as slices of the receive buffers (valid only
	 * during the call). 0, or -errno: the transaction fails with 451 at its end.
	 */
	int (*txn_body)(void *txn, const char *data, size_t len);
	/*
	 * The body is complete. Return 1 with *res filled for a synchronous
	 * answer, or 0 when the answer comes later through smtp_session_txn_done
	 * (e.g. after a group fdatasync); the session waits for it, in order.
	 * The transaction handle is finished either way.
	 */
	int (*txn_end)(void *txn, const struct smtp_envelope *env, struct smtp_txn_result *res);
	/* The transaction was dropped (RSET, error, disconnect) before txn_end. */
	void (*txn_abort)(void *txn);
	/* Optional: a verdict at each stage (fills *v; zeroed before the call). */
	void (*verdict)(void *ctx, enum smtp_stage stage, struct smtp_verdict *v);
	/*
	 * Optional: a check of each recipient (after its syntax and the verdict):
	 * 0 accepts it; else the reply code, with the reply's text written to
	 * text (cap octets, NUL-terminated), e.g. "5.1.1 <bob@example.com>:
	 * Recipient address rejected: User unknown".
	 */
	unsigned (*rcpt_check)(void *ctx, struct smtp_session *s, const char *addr, size_t len,
			       char *text, size_t cap);
	/*
	 * Optional: a check of the sender (after MAIL's syntax, the AUTH
	 * requirement and the verdict; addr is "" for the null sender <>), e.g.
	 * whether an authenticated user may send as it: 0 accepts it; else the
	 * reply code, with the reply's text in text as for rcpt_check, e.g.
	 * "5.7.1 <eve@example.com>: Sender address rejected: not owned by user
	 * alice@example.com". Not counted as a protocol error.
	 */
	unsigned (*mail_check)(void *ctx, struct smtp_session *s, const char *addr, size_t len,
			       char *text, size_t cap);
	/*
	 * Optional, needed for AUTH (without it AUTH gets 454 4.7.0): checks a
	 * login. authcid and passwd are NUL-terminated, valid only during the
	 * call, and secret: an implementation that keeps them (to answer later)
	 * wipes its copy. Returns 235 (accepted), 535 (refused), 454 (temporary
	 * failure), or 0 when the answer comes later through
	 * smtp_session_auth_done (e.g. from a thread running the slow hash);
	 * the session waits for it, in order, reading nothing meanwhile.
	 */
	unsigned (*auth_check)(void *ctx, struct smtp_session *s, const char *authcid,
			       size_t authcid_len, const char *passwd, size_t passwd_len);
	/*
	 * Optional: a session's connection closed (once per session that got its
	 * SMTP_STAGE_CONNECT verdict; the bench sink counts open connections).
	 */
	void (*session_close)(void *ctx);
	/*
	 * Optional: admission of a new connection (after a CONNECT verdict that
	 * let it in, before the greeting), e.g. per-client limits. 0 admits it,
	 * and connect_end is called once when it closes; else the reply code
	 * (421, 554), with the reply's text in text (cap octets, NUL-terminated),
	 * e.g. "4.7.0 mx.example.org Error: too many connections from
	 * 192.0.2.7": sent in place of the greeting, then the connection closes.
	 */
	unsigned (*connect_check)(void *ctx, struct smtp_session *s, char *text, size_t cap);
	/* Optional: a connection that connect_check admitted closed (smtp_session_sink_data holds
	   what the sink kept for it). */
	void (*connect_end)(void *ctx, struct smtp_session *s);
};

struct tls_ctx;

struct smtp_server_config {
	const char *hostname;        /* in the greeting and EHLO; default: gethostname() */
	struct smtp_limits limits;   /* parser limits */
	unsigned max_recipients;     /* per message (then 452 4.5.3); default 1000 */
	uint64_t max_message_size;   /* octets (SIZE); default 64 MiB */
	unsigned max_errors;         /* protocol errors before 421 4.7.0; default 20 */
	unsigned timeout_command_ms; /* waiting for a command; default 300 s (RFC 5321 4.5.3.2.7) */
	unsigned timeout_data_ms;    /* waiting for a data block; default 180 s (4.5.3.2.6) */
	bool allow_bare_lf;          /* accept messages with bare LF (default false: 554 5.6.0) */
	bool allow_nul;              /* accept messages with NUL octets (default false) */

	/* AUTH (RFC 4954, docs/auth.md): PLAIN and LOGIN through the sink's auth_check */
	bool auth;             /* offer AUTH on this server's listeners (default false) */
	bool auth_without_tls; /* offer it without TLS too: passwords in clear (tests only) */
	bool auth_required;    /* submission: MAIL before AUTH gets 530 5.7.0 */
	unsigned auth_fail_limit;     /* failed AUTHs per client address within the window,
					 then 454 4.7.0 until it ends; default 3 (per worker) */
	unsigned auth_fail_window_ms; /* default 60 s */
	unsigned auth_fail_close;     /* failed AUTHs in one session, then 421 and close; default 5 */

	/*
	 * TLS (RFC 3207, docs/tls.md): a server context (tls/tls.h, owned by the
	 * caller, outliving the server). When set, STARTTLS is offered on every
	 * plain listener; submissions listeners need it.
	 */
	struct tls_ctx *tls;
};

/* Fills *cfg with the defaults above. */
void smtp_server_config_default(struct smtp_server_config *cfg);

/* Per-worker counters, read after the engine stopped (or racily for progress). */
struct smtp_server_stats {
	uint64_t connections;
	uint64_t messages;   /* accepted with a 2xx final reply */
	uint64_t recipients; /* of accepted messages */
	uint64_t bytes;      /* body octets of accepted messages */
	uint64_t rejected;   /* transactions that got a 4xx/5xx final reply */
	uint64_t errors;     /* protocol errors answered with 5xx */
};

struct smtp_server;

/*
 * Creates a server for an engine: copies cfg (strings included). Returns NULL
 * with errno on failure.
 */
struct smtp_server *smtp_server_new(const struct smtp_server_config *cfg, struct net_engine *e);
void smtp_server_free(struct smtp_server **srv);

/* Adds a listener that speaks SMTP (before net_engine_run). 0 or -errno. */
int smtp_server_listen(struct smtp_server *srv, const char *host, uint16_t port);

/* What a listener is for (docs/tls.md). */
enum smtp_role {
	/* relay / MX (port 25): STARTTLS when cfg.tls is set; AUTH as cfg.auth says */
	SMTP_ROLE_RELAY = 0,
	/* submission (RFC 6409, port 587): STARTTLS, then AUTH, which is required
	   (MAIL before it: 530 5.7.0; AUTH before STARTTLS: 538 5.7.11) */
	SMTP_ROLE_SUBMISSION,
	/* submission over implicit TLS (RFC 8314, port 465): AUTH required; needs cfg.tls */
	SMTP_ROLE_SUBMISSIONS,
};

/*
 * Adds a listener with a role (before net_engine_run); smtp_server_listen is
 * this with SMTP_ROLE_RELAY. The submission roles offer AUTH whatever
 * cfg.auth says (the sink needs auth_check). 0 or -errno (-EINVAL: a role
 * that needs cfg.tls without it).
 */
int smtp_server_listen_role(struct smtp_server *srv, const char *host, uint16_t port,
			    enum smtp_role role);

/*
 * Attaches a worker to the server with its message sink (from the engine's
 * worker init hook). 0 or -errno.
 */
int smtp_server_worker_init(struct smtp_server *srv, struct net_worker *w,
			    const struct smtp_sink_ops *sink, void *sink_ctx);

/* Sum of the workers' counters (call after net_engine_run returned). */
void smtp_server_stats(const struct smtp_server *srv, struct smtp_server_stats *out);

/*
 * The answer to a txn_end that returned 0. Must be called on the session's
 * worker thread, exactly once per such txn_end, even if the session's
 * connection is gone (then it only frees what it must).
 */
void smtp_session_txn_done(struct smtp_session *s, const struct smtp_txn_result *res);

/* The connection under a session (for the peer address). */
struct net_conn *smtp_session_conn(const struct smtp_session *s);

/*
 * The answer to an auth_check that returned 0: 235, 535 or 454. Same rules
 * as smtp_session_txn_done: on the session's worker thread, exactly once per
 * such auth_check, even if the connection is gone.
 */
void smtp_session_auth_done(struct smtp_session *s, unsigned code);

/*
 * Marks the session's connection as encrypted (on) or not: the server calls
 * it itself after the STARTTLS handshake and at the open of an implicit-TLS
 * connection. With on, AUTH is offered when the server offers it, and any
 * identity from an AUTH before it is forgotten (RFC 3207 4.2). STARTTLS
 * resets the rest of the session itself (EHLO again).
 */
void smtp_session_set_tls(struct smtp_session *s, bool on);

/*
 * One word of the sink's own per session (0 until set), e.g. what
 * connect_check reserved for connect_end to release. On the session's worker
 * thread.
 */
void smtp_session_set_sink_data(struct smtp_session *s, uintptr_t data);
uintptr_t smtp_session_sink_data(const struct smtp_session *s);

/*
 * The identity the client authenticated as (its authcid, as the users file
 * knows it after auth_check accepted it), or NULL before a successful AUTH.
 * Valid as long as the session; for relay policy in rcpt_check.
 */
const char *smtp_session_auth_user(const struct smtp_session *s);

#endif
