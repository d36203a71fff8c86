/*
 * The SMTP server session: the protocol state machine between the parser
 * (smtp_parser, which yields commands and body slices from the receive
 * buffers in place) and the message sink (which gets those slices as they
 * are). Replies are queued on the connection and leave once per loop turn,
 * so a pipelined group is answered in order with one send.
 *
 * A step whose answer is not ready (a sink that answers after its group
 * commit, an injected delay) suspends the session: reading stops, the
 * unprocessed rest of the input is kept in a small backlog, and processing
 * resumes exactly where it stopped once the answer is sent. Replies never
 * overtake each other.
 */
#include "mta/smtp/smtp_server.h"

#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "core/addr.h"
#include "core/arena.h"
#include "core/compiler.h"
#include "core/log.h"
#include "mta/smtp/sasl.h"
#include "tls/tls.h"

#define BACKLOG_MAX (1u << 20) /* input kept while a session waits: more is abuse */
#define AUTH_FAIL_SLOTS 256    /* client addresses with failed AUTHs, per worker */

/* ---- server and per-worker state ---- */

/* Failed AUTHs of one client address (IPv4 as v4-mapped IPv6) in the current window. */
struct auth_fail {
	uint8_t addr[16];
	uint64_t first_ms; /* start of the window */
	unsigned count;
	bool used;
};

struct smtp_worker {
	struct smtp_server *srv;
	const struct smtp_sink_ops *sink;
	void *sink_ctx;
	struct smtp_server_stats stats;
	struct auth_fail *auth_fails; /* AUTH_FAIL_SLOTS, when AUTH is offered */
} cache_aligned;

/* One listener: the ctx of its net listener. */
struct smtp_listener {
	struct smtp_server *srv;
	enum smtp_role role;
	struct smtp_listener *next;
};

struct smtp_server {
	struct smtp_server_config cfg;
	char hostname[256];
	struct net_engine *engine;
	unsigned nworkers;
	struct smtp_worker *workers;
	/* preformatted replies that carry the host name or limits */
	char greeting[320];
	size_t greeting_len;
	char ehlo_tail[512]; /* the EHLO lines after the first */
	size_t ehlo_tail_len;
	char helo_reply[300];
	size_t helo_reply_len;
	struct smtp_listener *listeners;
	bool submission; /* a submission listener exists: AUTH state is needed */
};

/* ---- replies ---- */

enum reply_id {
	RP_OK,
	RP_MAIL_OK,
	RP_RCPT_OK,
	RP_DATA_GO,
	RP_RSET_OK,
	RP_NOOP_OK,
	RP_QUIT,
	RP_VRFY,
	RP_HELP,
	RP_NOT_IMPL,
	RP_UNKNOWN,
	RP_LINE_TOO_LONG,
	RP_NUL_IN_CMD,
	RP_SYNTAX,
	RP_SYNTAX_MAIL,
	RP_SYNTAX_RCPT,
	RP_BAD_ADDR_MAIL,
	RP_BAD_ADDR_RCPT,
	RP_NEED_HELO,
	RP_NESTED_MAIL,
	RP_NEED_MAIL,
	RP_NEED_RCPT,
	RP_NO_VALID_RCPT,
	RP_DATA_AFTER_BDAT,
	RP_BDAT_PENDING,
	RP_TOO_MANY_RCPTS,
	RP_SIZE_EXCEEDED,
	RP_UTF8_NEEDED,
	RP_BAD_BODY_PARAM,
	RP_BAD_PARAM_VALUE,
	RP_TXN_TEMPFAIL,
	RP_NO_SPACE,
	RP_BARE_LF,
	RP_NUL_IN_BODY,
	RP_LONG_LINE,
	RP_TXN_FAILED_BDAT,
	RP_AUTH_OK,
	RP_AUTH_FAILED,
	RP_AUTH_TEMPFAIL,
	RP_AUTH_RATE,
	RP_AUTH_NEED_TLS,
	RP_AUTH_ALREADY,
	RP_AUTH_IN_TXN,
	RP_AUTH_DISABLED,
	RP_AUTH_NEED_EHLO,
	RP_AUTH_REQUIRED,
	RP_AUTH_LINE_TOO_LONG,
	RP_TLS_GO,
	RP_TLS_ACTIVE,
	RP_COUNT
};

struct reply_def {
	const char *line; /* complete, with CRLF */
	bool error;       /* counts towards max_errors */
};

#define REPLY(s) {s "\r\n", false}
#define ERROR(s) {s "\r\n", true}

static const struct reply_def replies[RP_COUNT] = {
	[RP_OK] = REPLY("250 2.0.0 Ok"),
	[RP_MAIL_OK] = REPLY("250 2.1.0 Ok"),
	[RP_RCPT_OK] = REPLY("250 2.1.5 Ok"),
	[RP_DATA_GO] = REPLY("354 End data with <CR><LF>.<CR><LF>"),
	[RP_RSET_OK] = REPLY("250 2.0.0 Ok"),
	[RP_NOOP_OK] = REPLY("250 2.0.0 Ok"),
	[RP_QUIT] = REPLY("221 2.0.0 Bye"),
	[RP_VRFY] = REPLY("252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"),
	[RP_HELP] = REPLY("214 2.0.0 See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET "
			 "NOOP QUIT VRFY HELP STARTTLS AUTH"),
	[RP_NOT_IMPL] = ERROR("502 5.5.1 Error: command not implemented"),
	[RP_UNKNOWN] = ERROR("500 5.5.1 Error: command not recognized"),
	[RP_LINE_TOO_LONG] = ERROR("500 5.5.2 Error: line too long"),
	[RP_NUL_IN_CMD] = ERROR("500 5.5.2 Error: NUL character in command"),
	[RP_SYNTAX] = ERROR("501 5.5.4 Syntax error in parameters or arguments"),
	[RP_SYNTAX_MAIL] = ERROR("501 5.5.4 Syntax: MAIL FROM:<address> [parameters]"),
	[RP_SYNTAX_RCPT] = ERROR("501 5.5.4 Syntax: RCPT TO:<address> [parameters]"),
	[RP_BAD_ADDR_MAIL] = ERROR("501 5.1.7 Bad sender address syntax"),
	[RP_BAD_ADDR_RCPT] = ERROR("501 5.1.3 Bad recipient address syntax"),
	[RP_NEED_HELO] = ERROR("503 5.5.1 Error: send HELO/EHLO first"),
	[RP_NESTED_MAIL] = ERROR("503 5.5.1 Error: nested MAIL command"),
	[RP_NEED_MAIL] = ERROR("503 5.5.1 Error: need MAIL command"),
	[RP_NEED_RCPT] = ERROR("503 5.5.1 Error: need RCPT command"),
	/* what a pipelining client gets after its RCPTs were refused: not its error */
	[RP_NO_VALID_RCPT] = REPLY("554 5.5.1 Error: no valid recipients"),
	[RP_DATA_AFTER_BDAT] = ERROR("503 5.5.1 Error: DATA and BDAT may not be mixed"),
	[RP_BDAT_PENDING] = ERROR("503 5.5.1 Error: BDAT transaction in progress"),
	[RP_TOO_MANY_RCPTS] = REPLY("452 4.5.3 Error: too many recipients"),
	[RP_SIZE_EXCEEDED] = REPLY("552 5.3.4 Error: message size exceeds fixed limit"),
	[RP_UTF8_NEEDED] = ERROR("553 5.6.7 Error: UTF-8 address requires the SMTPUTF8 parameter"),
	[RP_BAD_BODY_PARAM] = ERROR("501 5.5.4 Error: BODY must be 7BIT or 8BITMIME"),
	[RP_BAD_PARAM_VALUE] = ERROR("501 5.5.4 Error: bad parameter value"),
	[RP_TXN_TEMPFAIL] = REPLY("451 4.3.0 Error: temporary failure, try again later"),
	[RP_NO_SPACE] = REPLY("452 4.3.1 Error: insufficient system storage, try again later"),
	[RP_BARE_LF] = REPLY("554 5.6.0 Error: bare <LF> in message; not accepted (SMTP smuggling "
			    "defence)"),
	[RP_NUL_IN_BODY] = REPLY("554 5.6.0 Error: NUL character in message"),
	[RP_LONG_LINE] = REPLY("554 5.6.0 Error: message line longer than 998 octets"),
	[RP_TXN_FAILED_BDAT] = REPLY("503 5.5.1 Error: transaction failed; send RSET"),
	/* AUTH (RFC 4954 6, RFC 3463, RFC 5248) */
	[RP_AUTH_OK] = REPLY("235 2.7.0 Authentication successful"),
	[RP_AUTH_FAILED] = REPLY("535 5.7.8 Error: authentication failed"),
	[RP_AUTH_TEMPFAIL] = REPLY("454 4.7.0 Temporary authentication failure"),
	[RP_AUTH_RATE] = REPLY("454 4.7.0 Error: too many failed authentication attempts; try "
			       "again later"),
	[RP_AUTH_NEED_TLS] = REPLY("538 5.7.11 Encryption required for requested authentication "
				   "mechanism"),
	[RP_AUTH_ALREADY] = ERROR("503 5.5.1 Error: already authenticated"),
	[RP_AUTH_IN_TXN] = ERROR("503 5.5.1 Error: MAIL transaction in progress"),
	[RP_AUTH_DISABLED] = ERROR("503 5.5.1 Error: authentication not enabled"),
	[RP_AUTH_NEED_EHLO] = ERROR("503 5.5.1 Error: send EHLO first"),
	[RP_AUTH_REQUIRED] = REPLY("530 5.7.0 Authentication required"),
	[RP_AUTH_LINE_TOO_LONG] = ERROR("500 5.5.6 Error: authentication exchange line is too long"),
	/* STARTTLS (RFC 3207) */
	[RP_TLS_GO] = REPLY("220 2.0.0 Ready to start TLS"),
	[RP_TLS_ACTIVE] = ERROR("503 5.5.1 Error: TLS already active"),
};

/* ---- sessions ---- */

enum sess_state {
	S_GREET = 1u << 0, /* no HELO/EHLO yet */
	S_READY = 1u << 1, /* HELO/EHLO given, no transaction */
	S_MAIL = 1u << 2,  /* MAIL accepted */
	S_RCPT = 1u << 3,  /* at least one RCPT accepted */
	S_DATA = 1u << 4,  /* reading a DATA body */
	S_BDAT = 1u << 5,  /* reading a BDAT chunk */
};

#define S_ANY (S_GREET | S_READY | S_MAIL | S_RCPT)

struct smtp_session {
	struct net_conn *conn;
	struct smtp_worker *sw;
	struct smtp_server *srv;
	const struct smtp_listener *lst;
	struct smtp_parser parser;
	enum sess_state state;
	unsigned errors;
	bool esmtp;
	bool closing;
	bool conn_gone;      /* on_close ran while a txn_done was owed */
	bool waiting_txn;    /* txn_end returned 0: smtp_session_txn_done owed */
	bool suspended;      /* input processing stopped until an answer is sent */
	bool shutdown_asked; /* the engine is stopping: say 421 once the answer is out */
	bool mail_failed;    /* the last MAIL was refused: the RCPT/DATA pipelined after it
				are answered 503 without counting as the client's errors */
	bool admitted;       /* connect_check let it in: connect_end is owed at close */
	uintptr_t sink_data; /* smtp_session_set_sink_data */
	uint64_t last_ms;
	char helo[256];

	/* AUTH */
	bool tls;           /* the connection is encrypted (smtp_session_set_tls) */
	bool waiting_auth;  /* auth_check returned 0: smtp_session_auth_done owed */
	unsigned auth_fails; /* failed AUTHs in this session */
	struct sasl *sasl;  /* during an exchange (334 sent); wiped before release */
	char auth_user[SASL_FIELD_MAX + 1]; /* "" until 235 */
	char auth_cand[SASL_FIELD_MAX + 1]; /* the authcid being checked */

	/* TLS */
	bool tls_pending; /* STARTTLS said 220: input is dropped until the handshake ends */
	struct tls_info tls_info; /* valid with tls */

	/* the transaction */
	struct arena arena;
	void *txn;
	const char *sender;
	size_t sender_len;
	struct smtp_rcpt *rcpts;
	unsigned nrcpts, rcpt_cap;
	uint64_t size;
	enum smtp_body_type body;
	bool smtputf8;
	enum smtp_ret ret;
	const char *envid;
	int body_err;    /* the sink failed on a body slice */
	bool too_big;    /* the body went over max_message_size */
	bool bdat_used;  /* this transaction uses BDAT */
	bool bdat_last;  /* the chunk being read is the last */
	bool bdat_fail;  /* the chunk being read is refused: its reply is bdat_reply */
	enum reply_id bdat_reply;
	unsigned bdat_code;          /* when a verdict refused it */
	enum sess_state bdat_prev;   /* the state to go back to after the chunk */

	/* a reply held back by an injected delay */
	struct net_timer delay_timer;
	char delayed[512];
	size_t delayed_len;
	bool delayed_close;

	/* input kept while suspended */
	char *backlog;
	size_t backlog_len, backlog_off, backlog_cap;
};

static void sess_process_backlog(struct smtp_session *s);
static bool auth_offered(const struct smtp_session *s);
static bool auth_enabled(const struct smtp_session *s);
static bool starttls_offered(const struct smtp_session *s);

/* Ends an AUTH exchange: its secrets are wiped. */
static void sasl_end(struct smtp_session *s)
{
	if (s->sasl) {
		sasl_wipe(s->sasl);
		free(s->sasl);
		s->sasl = NULL;
	}
}

/* Releases a session whose connection is gone and that owes no answer. */
static void sess_free(struct smtp_session *s)
{
	sasl_end(s);
	arena_deinit(&s->arena);
	if (s->backlog) {
		explicit_bzero(s->backlog, s->backlog_cap); /* may hold AUTH lines */
		free(s->backlog);
	}
	explicit_bzero(s, sizeof(*s));
	free(s);
}

/* ---- config ---- */

void smtp_server_config_default(struct smtp_server_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	smtp_limits_default(&cfg->limits);
	cfg->max_recipients = 1000;
	cfg->max_message_size = 64ull << 20;
	cfg->max_errors = 20;
	cfg->timeout_command_ms = 300 * 1000;
	cfg->timeout_data_ms = 180 * 1000;
	cfg->auth_fail_limit = 3;
	cfg->auth_fail_window_ms = 60 * 1000;
	cfg->auth_fail_close = 5;
}

/* ---- output ---- */

static void send_raw(struct smtp_session *s, const char *line, size_t len)
{
	if (s->conn_gone || s->closing)
		return;
	if (net_send(s->conn, line, len) < 0) {
		/* a peer that reads nothing: its output is past any sane bound */
		s->closing = true;
		net_conn_abort(s->conn, -ENOBUFS);
	}
}

static void close_with(struct smtp_session *s, const char *line, size_t len)
{
	send_raw(s, line, len);
	if (!s->closing && !s->conn_gone) {
		s->closing = true;
		net_conn_close(s->conn);
	}
}

static void close_421(struct smtp_session *s, const char *enh, const char *text)
{
	char line[512];
	int n = snprintf(line, sizeof(line), "421 %s %s %s\r\n", enh, s->srv->hostname, text);
	close_with(s, line, (size_t)n);
}

static void reply(struct smtp_session *s, enum reply_id id)
{
	const struct reply_def *r = &replies[id];
	send_raw(s, r->line, strlen(r->line));
	if (r->error)
		s->sw->stats.errors++;
	if (r->error && ++s->errors >= s->srv->cfg.max_errors)
		close_421(s, "4.7.0", "Error: too many errors");
}

static size_t format_code(char *buf, size_t size, unsigned code, const char *what)
{
	const char *enh = code >= 500 ? "5.3.0" : "4.3.0";
	int n = snprintf(buf, size, "%u %s Error: %s\r\n", code, enh, what);
	return n < 0 ? 0 : MIN((size_t)n, size - 1);
}

/* Sends now, or after delay_ms with the session suspended meanwhile. */
static void reply_after(struct smtp_session *s, const char *line, size_t len, unsigned delay_ms,
			bool then_close);

static void delay_fire(struct net_timer *t, struct net_worker *w)
{
	struct smtp_session *s = container_of(t, struct smtp_session, delay_timer);
	(void)w;
	bool then_close = s->delayed_close;
	s->delayed_close = false;
	if (then_close)
		close_with(s, s->delayed, s->delayed_len);
	else
		send_raw(s, s->delayed, s->delayed_len);
	s->delayed_len = 0;
	s->suspended = false;
	if (s->shutdown_asked) {
		close_421(s, "4.3.2", "Service shutting down");
		return;
	}
	sess_process_backlog(s);
}

static void reply_after(struct smtp_session *s, const char *line, size_t len, unsigned delay_ms,
			bool then_close)
{
	if (!delay_ms) {
		if (then_close)
			close_with(s, line, len);
		else
			send_raw(s, line, len);
		return;
	}
	len = MIN(len, sizeof(s->delayed));
	memcpy(s->delayed, line, len);
	s->delayed_len = len;
	s->delayed_close = then_close;
	s->suspended = true;
	net_conn_pause_reading(s->conn);
	s->delay_timer.fire = delay_fire;
	net_timer_start(net_conn_worker(s->conn), &s->delay_timer, delay_ms);
}

static void reply_id_after(struct smtp_session *s, enum reply_id id, unsigned delay_ms)
{
	const struct reply_def *r = &replies[id];
	if (r->error)
		s->errors++;
	reply_after(s, r->line, strlen(r->line), delay_ms, false);
	if (r->error && s->errors >= s->srv->cfg.max_errors && !delay_ms)
		close_421(s, "4.7.0", "Error: too many errors");
}

static bool consult(struct smtp_session *s, enum smtp_stage stage, struct smtp_verdict *v)
{
	memset(v, 0, sizeof(*v));
	if (s->sw->sink->verdict)
		s->sw->sink->verdict(s->sw->sink_ctx, stage, v);
	return v->code != 0;
}

static void reply_verdict(struct smtp_session *s, const struct smtp_verdict *v, const char *what)
{
	char line[256];
	size_t n = format_code(line, sizeof(line), v->code, what);
	/* 421 means the service is closing the channel (RFC 5321 4.2.3): it does */
	reply_after(s, line, n, v->delay_ms, v->code == 421);
}

/* RFC 5322 atext octets only (the ORCPT address type, RFC 3461 4.2: an atom). */
static bool is_atom(const char *p, size_t n)
{
	static const char specials[] = "!#$%&'*+-/=?^_`{|}~";
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)p[i];
		if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
		      (ch && strchr(specials, ch))))
			return false;
	}
	return n > 0;
}

/* ---- transactions ---- */

static void txn_reset(struct smtp_session *s)
{
	if (s->txn && s->sw->sink->txn_abort)
		s->sw->sink->txn_abort(s->txn);
	s->txn = NULL;
	arena_reset(&s->arena);
	s->sender = NULL;
	s->sender_len = 0;
	s->rcpts = NULL;
	s->nrcpts = s->rcpt_cap = 0;
	s->size = 0;
	s->body = SMTP_BODY_7BIT;
	s->smtputf8 = false;
	s->ret = SMTP_RET_UNSET;
	s->envid = NULL;
	s->body_err = 0;
	s->too_big = false;
	s->bdat_used = s->bdat_last = s->bdat_fail = false;
	s->bdat_code = 0;
	if (s->state & (S_MAIL | S_RCPT | S_DATA | S_BDAT))
		s->state = S_READY;
}

static void body_slice(struct smtp_session *s, const char *p, size_t len)
{
	s->size += len;
	if (s->too_big || s->body_err || s->bdat_fail)
		return;
	if (s->size > s->srv->cfg.max_message_size) {
		s->too_big = true;
		return;
	}
	int r = s->sw->sink->txn_body(s->txn, p, len);
	if (r < 0)
		s->body_err = r;
}

/* Formats a transaction's final reply and counts its outcome. */
static size_t txn_result_line(struct smtp_session *s, const struct smtp_txn_result *res,
			      char *line, size_t size)
{
	int n = snprintf(line, size, "%u %s %s\r\n", res->code,
			 res->enhanced ? res->enhanced : (res->code < 400 ? "2.0.0" : "4.3.0"),
			 res->text[0] ? res->text : "Ok");
	struct smtp_server_stats *st = &s->sw->stats;
	if (res->code < 400) {
		st->messages++;
		st->recipients += s->nrcpts;
		st->bytes += s->size;
	} else {
		st->rejected++;
	}
	return n < 0 ? 0 : MIN((size_t)n, size - 1);
}

static void txn_finish_reply(struct smtp_session *s, const struct smtp_txn_result *res,
			     unsigned delay_ms)
{
	char line[256];
	size_t n = txn_result_line(s, res, line, sizeof(line));
	txn_reset(s);
	reply_after(s, line, n, delay_ms, false);
}

/* The message is complete (DATA end or BDAT LAST): checks, then the sink. */
static void txn_end(struct smtp_session *s, unsigned body_flags)
{
	const struct smtp_server_config *cfg = &s->srv->cfg;
	enum reply_id fail = RP_COUNT;
	if ((body_flags & SMTP_BODY_BARE_LF) && !cfg->allow_bare_lf)
		fail = RP_BARE_LF;
	else if ((body_flags & SMTP_BODY_NUL) && !cfg->allow_nul)
		fail = RP_NUL_IN_BODY;
	else if (body_flags & SMTP_BODY_LONG_LINE)
		fail = RP_LONG_LINE;
	else if (s->too_big)
		fail = RP_SIZE_EXCEEDED;
	else if (s->body_err)
		fail = RP_TXN_TEMPFAIL;
	if (fail != RP_COUNT) {
		s->sw->stats.rejected++;
		reply(s, fail);
		txn_reset(s);
		return;
	}
	struct smtp_verdict v;
	if (consult(s, SMTP_STAGE_EOM, &v)) {
		s->sw->stats.rejected++;
		reply_verdict(s, &v, "message refused");
		txn_reset(s);
		return;
	}
	struct smtp_envelope env = {
		.helo = s->helo,
		.esmtp = s->esmtp,
		.sender = s->sender,
		.sender_len = s->sender_len,
		.rcpts = s->rcpts,
		.nrcpts = s->nrcpts,
		.size = s->size,
		.body = s->body,
		.smtputf8 = s->smtputf8,
		.ret = s->ret,
		.envid = s->envid,
		.peer = net_conn_peer(s->conn),
		.chunked = s->bdat_used,
		.auth_user = s->auth_user[0] ? s->auth_user : NULL,
		.tls_version = s->tls ? s->tls_info.version : NULL,
		.tls_cipher = s->tls ? s->tls_info.cipher : NULL,
		.tls_bits = s->tls ? s->tls_info.bits : 0,
	};
	struct smtp_txn_result res = {.code = 0};
	void *txn = s->txn;
	s->txn = NULL; /* the sink owns it from here */
	int r = s->sw->sink->txn_end(txn, &env, &res);
	if (r == 0) {
		/* the answer comes through smtp_session_txn_done */
		s->waiting_txn = true;
		s->suspended = true;
		net_conn_pause_reading(s->conn);
		return;
	}
	txn_finish_reply(s, &res, v.delay_ms);
}

void smtp_session_txn_done(struct smtp_session *s, const struct smtp_txn_result *res)
{
	s->waiting_txn = false;
	if (s->conn_gone) {
		sess_free(s);
		return;
	}
	s->suspended = false;
	txn_finish_reply(s, res, 0);
	if (s->shutdown_asked) {
		close_421(s, "4.3.2", "Service shutting down");
		return;
	}
	sess_process_backlog(s);
}

struct net_conn *smtp_session_conn(const struct smtp_session *s)
{
	return s->conn;
}

/* ---- parameters ---- */

static bool is_digits(const char *p, size_t n)
{
	if (!n || n > 20)
		return false;
	for (size_t i = 0; i < n; i++)
		if (p[i] < '0' || p[i] > '9')
			return false;
	return true;
}

static bool key_is(const struct smtp_param *p, const char *key)
{
	return p->key_len == strlen(key) && !strncasecmp(p->key, key, p->key_len);
}

static bool value_is(const struct smtp_param *p, const char *v)
{
	return p->value && p->value_len == strlen(v) && !strncasecmp(p->value, v, p->value_len);
}

/* xtext (RFC 3461 4): printable US-ASCII except '+' and '=' , or "+XX" hex. */
static bool is_xtext(const char *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)p[i];
		if (ch == '+') {
			if (i + 2 >= n)
				return false;
			for (int k = 1; k <= 2; k++) {
				char h = p[i + (size_t)k];
				if (!((h >= '0' && h <= '9') || (h >= 'A' && h <= 'F')))
					return false;
			}
			i += 2;
		} else if (ch < 33 || ch > 126 || ch == '=') {
			return false;
		}
	}
	return true;
}

static void unsupported_param(struct smtp_session *s, const struct smtp_param *p)
{
	char line[160];
	int n = snprintf(line, sizeof(line), "555 5.5.4 Error: unsupported parameter %.*s\r\n",
			 (int)MIN(p->key_len, (size_t)64), p->key);
	send_raw(s, line, (size_t)n);
	if (++s->errors >= s->srv->cfg.max_errors)
		close_421(s, "4.7.0", "Error: too many errors");
}

/* ---- command handlers ---- */

static void do_helo(struct smtp_session *s, struct smtp_command *cmd)
{
	txn_reset(s);
	size_t n = MIN(cmd->arg_len, sizeof(s->helo) - 1);
	memcpy(s->helo, cmd->arg, n);
	s->helo[n] = '\0';
	s->esmtp = cmd->verb == SMTP_VERB_EHLO;
	struct smtp_verdict v;
	if (consult(s, SMTP_STAGE_EHLO, &v)) {
		reply_verdict(s, &v, "EHLO refused");
		return;
	}
	s->state = S_READY;
	if (!s->esmtp) {
		reply_after(s, s->srv->helo_reply, s->srv->helo_reply_len, v.delay_ms, false);
		return;
	}
	char line[1024];
	int k = snprintf(line, sizeof(line), "250-%s\r\n", s->srv->hostname);
	if (starttls_offered(s)) {
		static const char tls_line[] = "250-STARTTLS\r\n";
		memcpy(line + k, tls_line, sizeof(tls_line) - 1);
		k += (int)sizeof(tls_line) - 1;
	}
	if (auth_offered(s)) {
		static const char auth_line[] = "250-AUTH PLAIN LOGIN\r\n";
		memcpy(line + k, auth_line, sizeof(auth_line) - 1);
		k += (int)sizeof(auth_line) - 1;
	}
	memcpy(line + k, s->srv->ehlo_tail, s->srv->ehlo_tail_len);
	reply_after(s, line, (size_t)k + s->srv->ehlo_tail_len, v.delay_ms, false);
}

static void do_mail(struct smtp_session *s, struct smtp_command *cmd)
{
	const struct smtp_server_config *cfg = &s->srv->cfg;
	bool utf8 = false;
	enum smtp_body_type body = SMTP_BODY_7BIT;
	enum smtp_ret ret = SMTP_RET_UNSET;
	const struct smtp_param *envid = NULL;
	for (unsigned i = 0; i < cmd->nparams; i++) {
		const struct smtp_param *p = &cmd->params[i];
		if (key_is(p, "SIZE")) {
			if (!p->value || !is_digits(p->value, p->value_len)) {
				reply(s, RP_BAD_PARAM_VALUE);
				return;
			}
			uint64_t declared = strtoull(p->value, NULL, 10);
			if (p->value_len > 19 || declared > cfg->max_message_size) {
				reply(s, RP_SIZE_EXCEEDED);
				return;
			}
		} else if (key_is(p, "BODY")) {
			if (value_is(p, "7BIT"))
				body = SMTP_BODY_7BIT;
			else if (value_is(p, "8BITMIME"))
				body = SMTP_BODY_8BITMIME;
			else {
				reply(s, RP_BAD_BODY_PARAM);
				return;
			}
		} else if (key_is(p, "SMTPUTF8") && !p->value) {
			utf8 = true;
		} else if (key_is(p, "RET")) {
			if (value_is(p, "FULL"))
				ret = SMTP_RET_FULL;
			else if (value_is(p, "HDRS"))
				ret = SMTP_RET_HDRS;
			else {
				reply(s, RP_BAD_PARAM_VALUE);
				return;
			}
		} else if (key_is(p, "ENVID")) {
			if (!p->value || p->value_len > 100 || !is_xtext(p->value, p->value_len)) {
				reply(s, RP_BAD_PARAM_VALUE);
				return;
			}
			envid = p;
		} else if (key_is(p, "AUTH")) {
			/* RFC 4954 5: accepted and ignored from unauthenticated clients */
		} else {
			unsupported_param(s, p);
			return;
		}
	}
	if (cmd->addr_utf8 && !utf8) {
		reply(s, RP_UTF8_NEEDED);
		return;
	}
	if ((cfg->auth_required || s->lst->role != SMTP_ROLE_RELAY) && !s->auth_user[0]) {
		reply(s, RP_AUTH_REQUIRED);
		return;
	}
	struct smtp_verdict v;
	if (consult(s, SMTP_STAGE_MAIL, &v)) {
		reply_verdict(s, &v, "sender refused");
		return;
	}
	if (s->sw->sink->mail_check) {
		char text[300];
		text[0] = '\0';
		unsigned code = s->sw->sink->mail_check(s->sw->sink_ctx, s, cmd->addr, cmd->addr_len,
							text, sizeof(text));
		if (code) {
			char line[400];
			int n = snprintf(line, sizeof(line), "%u %s\r\n", code, text);
			reply_after(s, line, (size_t)MIN(n, (int)sizeof(line) - 1), 0, false);
			return;
		}
	}
	void *txn = NULL;
	int r = s->sw->sink->txn_begin(s->sw->sink_ctx, s, &txn);
	if (r < 0) {
		reply(s, r == -ENOSPC || r == -EDQUOT ? RP_NO_SPACE : RP_TXN_TEMPFAIL);
		return;
	}
	s->txn = txn;
	s->sender = arena_strndup(&s->arena, cmd->addr, cmd->addr_len);
	s->envid = envid ? arena_strndup(&s->arena, envid->value, envid->value_len) : NULL;
	if (!s->sender || (envid && !s->envid)) {
		txn_reset(s);
		reply(s, RP_TXN_TEMPFAIL);
		return;
	}
	s->sender_len = cmd->addr_len;
	s->mail_failed = false;
	s->body = body;
	s->smtputf8 = utf8;
	s->ret = ret;
	s->state = S_MAIL;
	reply_id_after(s, RP_MAIL_OK, v.delay_ms);
}

static bool parse_notify(const struct smtp_param *p, unsigned *out)
{
	if (!p->value || !p->value_len)
		return false;
	unsigned bits = 0;
	const char *v = p->value, *end = p->value + p->value_len;
	while (v < end) {
		const char *comma = memchr(v, ',', (size_t)(end - v));
		size_t n = (size_t)((comma ? comma : end) - v);
		if (n == 5 && !strncasecmp(v, "NEVER", 5))
			bits |= SMTP_NOTIFY_NEVER;
		else if (n == 7 && !strncasecmp(v, "SUCCESS", 7))
			bits |= SMTP_NOTIFY_SUCCESS;
		else if (n == 7 && !strncasecmp(v, "FAILURE", 7))
			bits |= SMTP_NOTIFY_FAILURE;
		else if (n == 5 && !strncasecmp(v, "DELAY", 5))
			bits |= SMTP_NOTIFY_DELAY;
		else
			return false;
		v = comma ? comma + 1 : end;
		if (comma && v == end)
			return false;
	}
	if ((bits & SMTP_NOTIFY_NEVER) && bits != SMTP_NOTIFY_NEVER)
		return false;
	*out = bits;
	return true;
}

static void do_rcpt(struct smtp_session *s, struct smtp_command *cmd)
{
	if (s->nrcpts >= s->srv->cfg.max_recipients) {
		reply(s, RP_TOO_MANY_RCPTS);
		return;
	}
	unsigned notify = 0;
	const struct smtp_param *orcpt = NULL;
	for (unsigned i = 0; i < cmd->nparams; i++) {
		const struct smtp_param *p = &cmd->params[i];
		if (key_is(p, "NOTIFY")) {
			if (!parse_notify(p, &notify)) {
				reply(s, RP_BAD_PARAM_VALUE);
				return;
			}
		} else if (key_is(p, "ORCPT")) {
			const char *semi = p->value ? memchr(p->value, ';', p->value_len) : NULL;
			if (!semi || semi == p->value || p->value_len > 500 ||
			    !is_atom(p->value, (size_t)(semi - p->value)) ||
			    !is_xtext(semi + 1, p->value_len - (size_t)(semi + 1 - p->value))) {
				reply(s, RP_BAD_PARAM_VALUE);
				return;
			}
			orcpt = p;
		} else {
			unsupported_param(s, p);
			return;
		}
	}
	if (cmd->addr_utf8 && !s->smtputf8) {
		reply(s, RP_UTF8_NEEDED);
		return;
	}
	struct smtp_verdict v;
	if (consult(s, SMTP_STAGE_RCPT, &v)) {
		reply_verdict(s, &v, "recipient refused");
		return;
	}
	if (s->sw->sink->rcpt_check) {
		char text[300];
		text[0] = '\0';
		unsigned code = s->sw->sink->rcpt_check(s->sw->sink_ctx, s, cmd->addr,
							cmd->addr_len, text, sizeof(text));
		if (code) {
			char line[400];
			int n = snprintf(line, sizeof(line), "%u %s\r\n", code, text);
			reply_after(s, line, (size_t)MIN(n, (int)sizeof(line) - 1), 0, false);
			return;
		}
	}
	if (s->nrcpts == s->rcpt_cap) {
		unsigned cap = s->rcpt_cap ? s->rcpt_cap * 2 : 8;
		if (cap > s->srv->cfg.max_recipients)
			cap = s->srv->cfg.max_recipients;
		struct smtp_rcpt *r = arena_alloc(&s->arena, cap * sizeof(*r));
		if (!r) {
			reply(s, RP_TXN_TEMPFAIL);
			return;
		}
		if (s->nrcpts)
			memcpy(r, s->rcpts, s->nrcpts * sizeof(*r));
		s->rcpts = r;
		s->rcpt_cap = cap;
	}
	struct smtp_rcpt *r = &s->rcpts[s->nrcpts];
	r->addr = arena_strndup(&s->arena, cmd->addr, cmd->addr_len);
	r->len = cmd->addr_len;
	r->notify = notify;
	r->orcpt = orcpt ? arena_strndup(&s->arena, orcpt->value, orcpt->value_len) : NULL;
	if (!r->addr || (orcpt && !r->orcpt)) {
		reply(s, RP_TXN_TEMPFAIL);
		return;
	}
	s->nrcpts++;
	s->state = S_RCPT;
	reply_id_after(s, RP_RCPT_OK, v.delay_ms);
}

static void do_data(struct smtp_session *s, struct smtp_command *cmd)
{
	(void)cmd;
	if (s->bdat_used) {
		reply(s, RP_DATA_AFTER_BDAT);
		return;
	}
	if (s->state == S_MAIL) {
		reply(s, RP_NO_VALID_RCPT);
		return;
	}
	struct smtp_verdict v;
	if (consult(s, SMTP_STAGE_DATA, &v)) {
		reply_verdict(s, &v, "DATA refused");
		return;
	}
	s->state = S_DATA;
	smtp_parser_begin_data(&s->parser);
	reply_id_after(s, RP_DATA_GO, v.delay_ms);
}

static void bdat_chunk_end(struct smtp_session *s);

static void bdat_refuse(struct smtp_session *s, enum reply_id r)
{
	s->bdat_fail = true;
	s->bdat_reply = r;
}

static void do_bdat(struct smtp_session *s, struct smtp_command *cmd)
{
	/* Whatever the answer, the chunk's octets follow and are read (RFC 3030 2). */
	s->bdat_fail = false;
	s->bdat_code = 0;
	if (s->state == S_GREET) {
		bdat_refuse(s, RP_NEED_HELO);
	} else if (s->state == S_READY) {
		bdat_refuse(s, RP_NEED_MAIL);
	} else if (s->state == S_MAIL) {
		bdat_refuse(s, RP_NO_VALID_RCPT);
	} else if (s->too_big || s->body_err) {
		bdat_refuse(s, RP_TXN_FAILED_BDAT);
	} else if (s->size + cmd->bdat_size > s->srv->cfg.max_message_size) {
		s->too_big = true;
		bdat_refuse(s, RP_SIZE_EXCEEDED);
	} else if (!s->bdat_used) {
		struct smtp_verdict v;
		if (consult(s, SMTP_STAGE_DATA, &v)) {
			bdat_refuse(s, RP_TXN_FAILED_BDAT);
			s->bdat_code = v.code;
		}
	}
	if (s->state == S_RCPT)
		s->bdat_used = true;
	s->bdat_last = cmd->bdat_last;
	s->bdat_prev = s->state;
	s->state = S_BDAT;
	if (!cmd->bdat_size) {
		bdat_chunk_end(s);
		return;
	}
	smtp_parser_begin_bdat(&s->parser, cmd->bdat_size);
}

static void bdat_chunk_end(struct smtp_session *s)
{
	s->state = s->bdat_prev;
	if (s->state != S_RCPT) {
		/* not in a transaction with recipients */
		if (s->bdat_reply == RP_NEED_MAIL && s->mail_failed)
			send_raw(s, replies[RP_NEED_MAIL].line, strlen(replies[RP_NEED_MAIL].line));
		else
			reply(s, s->bdat_reply);
		if (s->bdat_last && s->state == S_MAIL)
			txn_reset(s); /* BDAT LAST ends the transaction, refused or not */
		return;
	}
	if (s->bdat_fail) {
		if (s->bdat_code) {
			struct smtp_verdict v = {.code = s->bdat_code};
			reply_verdict(s, &v, "BDAT refused");
			s->body_err = -EPERM; /* later chunks of this transaction are refused */
		} else {
			reply(s, s->bdat_reply);
		}
		if (s->bdat_last) {
			s->sw->stats.rejected++;
			txn_reset(s);
		}
		return;
	}
	if (s->bdat_last) {
		txn_end(s, 0);
		return;
	}
	char line[96];
	int n = snprintf(line, sizeof(line), "250 2.0.0 Ok: %" PRIu64 " octets received\r\n",
			 s->size);
	send_raw(s, line, (size_t)n);
}

static void do_rset(struct smtp_session *s, struct smtp_command *cmd)
{
	(void)cmd;
	txn_reset(s);
	reply(s, RP_RSET_OK);
}

static void do_noop(struct smtp_session *s, struct smtp_command *cmd)
{
	(void)cmd;
	reply(s, RP_NOOP_OK);
}

static void do_quit(struct smtp_session *s, struct smtp_command *cmd)
{
	(void)cmd;
	txn_reset(s);
	const char *l = replies[RP_QUIT].line;
	close_with(s, l, strlen(l));
}

static void do_vrfy(struct smtp_session *s, struct smtp_command *cmd)
{
	(void)cmd;
	reply(s, RP_VRFY);
}

static void do_help(struct smtp_session *s, struct smtp_command *cmd)
{
	(void)cmd;
	reply(s, RP_HELP);
}

static void do_not_impl(struct smtp_session *s, struct smtp_command *cmd)
{
	(void)cmd;
	reply(s, RP_NOT_IMPL);
}

/* ---- AUTH (RFC 4954) ---- */

/* AUTH exists on this listener (offered now or after STARTTLS). */
static bool auth_enabled(const struct smtp_session *s)
{
	return s->srv->cfg.auth || s->lst->role != SMTP_ROLE_RELAY;
}

/* Submission never offers AUTH without TLS; the relay role only when told to. */
static bool auth_offered(const struct smtp_session *s)
{
	return auth_enabled(s) &&
	       (s->tls || (s->srv->cfg.auth_without_tls && s->lst->role == SMTP_ROLE_RELAY));
}

static bool starttls_offered(const struct smtp_session *s)
{
	return s->srv->cfg.tls && !s->tls && s->lst->role != SMTP_ROLE_SUBMISSIONS;
}

/* ---- STARTTLS (RFC 3207) ---- */

static void do_starttls(struct smtp_session *s, struct smtp_command *cmd)
{
	(void)cmd;
	if (s->tls) {
		reply(s, RP_TLS_ACTIVE);
		return;
	}
	if (!starttls_offered(s)) {
		reply(s, RP_NOT_IMPL);
		return;
	}
	reply(s, RP_TLS_GO);
	if (s->closing)
		return;
	int r = tls_conn_start(s->conn, s->srv->cfg.tls, NULL, NULL, 0);
	if (r < 0) {
		/* the 220 is queued: nothing sensible can follow it in plaintext */
		log_warn("smtp: STARTTLS: cannot start TLS: %s", strerror(-r));
		s->closing = true;
		net_conn_abort(s->conn, r);
		return;
	}
	/*
	 * Everything the client sent after the STARTTLS line is dropped (CVE-2011-0411):
	 * the rest of the input (sess_run and on_data stop on tls_pending), the backlog
	 * and the parser's partial line. The session is as after the greeting
	 * (RFC 3207 4.2): no EHLO, no transaction, no AUTH.
	 */
	s->tls_pending = true;
	txn_reset(s);
	smtp_parser_reset(&s->parser);
	s->backlog_off = s->backlog_len = 0;
	sasl_end(s);
	s->state = S_GREET;
	s->esmtp = false;
	s->helo[0] = '\0';
	s->mail_failed = false;
	explicit_bzero(s->auth_user, sizeof(s->auth_user));
}

/*
 * Clears a command line that carried AUTH data, in the buffer it sits in (a
 * receive buffer, the backlog or the parser's line buffer: all writable).
 */
static void wipe_line(const struct smtp_event *ev)
{
	if (ev->len)
		explicit_bzero((char *)(uintptr_t)ev->data, ev->len);
}

/* The failure table's key for the client's address: 16 octets, IPv4 v4-mapped. */
static bool peer_key(const struct smtp_session *s, uint8_t key[16])
{
	return addr_key16(net_conn_peer(s->conn), key);
}

/* The client's entry, or (when make) a new one in a free, expired or the oldest slot. */
static struct auth_fail *auth_fail_entry(struct smtp_session *s, bool make)
{
	struct auth_fail *t = s->sw->auth_fails;
	uint8_t key[16];
	if (!t || !peer_key(s, key))
		return NULL;
	uint64_t now = net_worker_now_ms(net_conn_worker(s->conn));
	uint64_t window = s->srv->cfg.auth_fail_window_ms;
	struct auth_fail *victim = NULL;
	for (unsigned i = 0; i < AUTH_FAIL_SLOTS; i++) {
		struct auth_fail *e = &t[i];
		if (e->used && !memcmp(e->addr, key, 16)) {
			if (now - e->first_ms >= window) {
				e->first_ms = now; /* a new window */
				e->count = 0;
			}
			return e;
		}
		if (!victim || !e->used || (victim->used && e->first_ms < victim->first_ms))
			victim = e;
	}
	if (!make)
		return NULL;
	memcpy(victim->addr, key, 16);
	victim->used = true;
	victim->first_ms = now;
	victim->count = 0;
	return victim;
}

static bool auth_blocked(struct smtp_session *s)
{
	const struct auth_fail *e = auth_fail_entry(s, false);
	return e && e->count >= s->srv->cfg.auth_fail_limit;
}

/* A failed attempt: counted for the address and the session; replies 535 or the given reply. */
static void auth_failed(struct smtp_session *s, const char *line)
{
	struct auth_fail *e = auth_fail_entry(s, true);
	if (e)
		e->count++;
	s->auth_fails++;
	send_raw(s, line, strlen(line));
	log_info("smtp: AUTH failed for %s (%u in this session)",
		 s->auth_cand[0] ? s->auth_cand : "(no user)", s->auth_fails);
	explicit_bzero(s->auth_cand, sizeof(s->auth_cand));
	if (s->auth_fails >= s->srv->cfg.auth_fail_close)
		close_421(s, "4.7.0", "Error: too many failed authentication attempts");
}

/* The answer of auth_check (235, 535 or 454). */
static void auth_finish(struct smtp_session *s, unsigned code)
{
	if (code == 235) {
		memcpy(s->auth_user, s->auth_cand, sizeof(s->auth_user));
		explicit_bzero(s->auth_cand, sizeof(s->auth_cand));
		reply(s, RP_AUTH_OK);
	} else if (code == 454) {
		explicit_bzero(s->auth_cand, sizeof(s->auth_cand));
		reply(s, RP_AUTH_TEMPFAIL);
	} else {
		auth_failed(s, replies[RP_AUTH_FAILED].line);
	}
}

/* The exchange gave credentials: the sink checks them, now or later. */
static void auth_verify(struct smtp_session *s)
{
	struct sasl *x = s->sasl;
	memcpy(s->auth_cand, x->authcid, x->authcid_len + 1);
	unsigned code = s->sw->sink->auth_check(s->sw->sink_ctx, s, x->authcid, x->authcid_len,
						x->passwd, x->passwd_len);
	sasl_end(s);
	if (code == 0) {
		s->waiting_auth = true;
		s->suspended = true;
		net_conn_pause_reading(s->conn);
		return;
	}
	auth_finish(s, code);
}

/* sasl_start/sasl_step said r: go on, verify, or fail. */
static void auth_progress(struct smtp_session *s, int r)
{
	if (r == 1) {
		auth_verify(s);
		return;
	}
	if (r == 0) {
		char line[64];
		int n = snprintf(line, sizeof(line), "334 %s\r\n", s->sasl->challenge);
		send_raw(s, line, (size_t)n);
		return;
	}
	enum sasl_error e = s->sasl->error;
	sasl_end(s);
	if (e == SASL_E_SYNTAX || e == SASL_E_AUTHZID)
		auth_failed(s, sasl_error_reply(e));
	else
		send_raw(s, sasl_error_reply(e), strlen(sasl_error_reply(e)));
}

static void do_auth(struct smtp_session *s, struct smtp_command *cmd)
{
	const struct smtp_server_config *cfg = &s->srv->cfg;
	if (!auth_enabled(s)) {
		reply(s, RP_AUTH_DISABLED);
		return;
	}
	if (!s->esmtp) {
		reply(s, RP_AUTH_NEED_EHLO);
		return;
	}
	if (s->auth_user[0]) {
		reply(s, RP_AUTH_ALREADY);
		return;
	}
	if (!auth_offered(s)) {
		reply(s, RP_AUTH_NEED_TLS);
		return;
	}
	if (auth_blocked(s)) {
		s->auth_fails++;
		reply(s, RP_AUTH_RATE);
		if (s->auth_fails >= cfg->auth_fail_close)
			close_421(s, "4.7.0", "Error: too many failed authentication attempts");
		return;
	}
	if (!s->sw->sink->auth_check) {
		reply(s, RP_AUTH_TEMPFAIL);
		return;
	}
	/* "MECH [initial-response]" */
	const char *sp = memchr(cmd->arg, ' ', cmd->arg_len);
	size_t mlen = sp ? (size_t)(sp - cmd->arg) : cmd->arg_len;
	const char *ir = sp ? sp + 1 : NULL;
	size_t irlen = sp ? cmd->arg_len - mlen - 1 : 0;
	s->sasl = malloc(sizeof(*s->sasl));
	if (!s->sasl) {
		reply(s, RP_AUTH_TEMPFAIL);
		return;
	}
	auth_progress(s, sasl_start(s->sasl, cmd->arg, mlen, sp != NULL, ir, irlen));
}

/* A line the client sent after a 334. */
static void auth_continue(struct smtp_session *s, const char *line, size_t len)
{
	auth_progress(s, sasl_step(s->sasl, line, len));
}

void smtp_session_auth_done(struct smtp_session *s, unsigned code)
{
	s->waiting_auth = false;
	if (s->conn_gone) {
		if (!s->waiting_txn)
			sess_free(s);
		return;
	}
	s->suspended = false;
	auth_finish(s, code);
	if (s->shutdown_asked) {
		close_421(s, "4.3.2", "Service shutting down");
		return;
	}
	sess_process_backlog(s);
}

void smtp_session_set_tls(struct smtp_session *s, bool on)
{
	s->tls = on;
	if (on)
		explicit_bzero(s->auth_user, sizeof(s->auth_user));
}

void smtp_session_set_sink_data(struct smtp_session *s, uintptr_t data)
{
	s->sink_data = data;
}

uintptr_t smtp_session_sink_data(const struct smtp_session *s)
{
	return s->sink_data;
}

const char *smtp_session_auth_user(const struct smtp_session *s)
{
	return s->auth_user[0] ? s->auth_user : NULL;
}

/* The command table: which states allow a verb, and what refuses it otherwise. */
static const struct command_def {
	unsigned states;
	enum reply_id refuse_greet, refuse_ready, refuse_txn;
	void (*fn)(struct smtp_session *s, struct smtp_command *cmd);
	enum reply_id syntax;
} commands[SMTP_VERB_COUNT] = {
	[SMTP_VERB_HELO] = {S_ANY, 0, 0, 0, do_helo, RP_SYNTAX},
	[SMTP_VERB_EHLO] = {S_ANY, 0, 0, 0, do_helo, RP_SYNTAX},
	[SMTP_VERB_MAIL] = {S_READY, RP_NEED_HELO, 0, RP_NESTED_MAIL, do_mail, RP_SYNTAX_MAIL},
	[SMTP_VERB_RCPT] = {S_MAIL | S_RCPT, RP_NEED_MAIL, RP_NEED_MAIL, 0, do_rcpt, RP_SYNTAX_RCPT},
	[SMTP_VERB_DATA] = {S_MAIL | S_RCPT, RP_NEED_MAIL, RP_NEED_MAIL, 0, do_data, RP_SYNTAX},
	[SMTP_VERB_BDAT] = {S_ANY, 0, 0, 0, do_bdat, RP_SYNTAX},
	[SMTP_VERB_RSET] = {S_ANY, 0, 0, 0, do_rset, RP_SYNTAX},
	[SMTP_VERB_NOOP] = {S_ANY, 0, 0, 0, do_noop, RP_SYNTAX},
	[SMTP_VERB_QUIT] = {S_ANY, 0, 0, 0, do_quit, RP_SYNTAX},
	[SMTP_VERB_VRFY] = {S_ANY, 0, 0, 0, do_vrfy, RP_SYNTAX},
	[SMTP_VERB_EXPN] = {S_ANY, 0, 0, 0, do_not_impl, RP_SYNTAX},
	[SMTP_VERB_HELP] = {S_ANY, 0, 0, 0, do_help, RP_SYNTAX},
	[SMTP_VERB_STARTTLS] = {S_ANY, 0, 0, 0, do_starttls, RP_SYNTAX},
	[SMTP_VERB_AUTH] = {S_READY, RP_NEED_HELO, 0, RP_AUTH_IN_TXN, do_auth, RP_SYNTAX},
};

static void handle_command(struct smtp_session *s, const char *line, size_t len, unsigned flags)
{
	if (flags & SMTP_LINE_NUL) {
		reply(s, RP_NUL_IN_CMD);
		return;
	}
	struct smtp_command cmd;
	enum smtp_cmd_error err = smtp_command_parse(line, len, &s->srv->cfg.limits, &cmd);
	if (err == SMTP_CMD_E_UNKNOWN || cmd.verb == SMTP_VERB_UNKNOWN ||
	    cmd.verb >= SMTP_VERB_COUNT) {
		reply(s, RP_UNKNOWN);
		return;
	}
	const struct command_def *def = &commands[cmd.verb];
	/* in a BDAT transaction only BDAT, RSET, NOOP, QUIT, HELP and EHLO/HELO make sense */
	if (s->bdat_used && (cmd.verb == SMTP_VERB_MAIL || cmd.verb == SMTP_VERB_RCPT)) {
		reply(s, RP_BDAT_PENDING);
		return;
	}
	if (cmd.verb == SMTP_VERB_MAIL)
		s->mail_failed = true; /* until do_mail accepts it */
	else if (cmd.verb == SMTP_VERB_RSET || cmd.verb == SMTP_VERB_HELO ||
		 cmd.verb == SMTP_VERB_EHLO)
		s->mail_failed = false;
	if (!(def->states & s->state)) {
		enum reply_id r = s->state == S_GREET ? def->refuse_greet
				  : s->state == S_READY ? def->refuse_ready
							: def->refuse_txn;
		if (!r)
			r = RP_NEED_MAIL;
		if (r == RP_NEED_MAIL && s->mail_failed) {
			const char *l = replies[r].line;
			send_raw(s, l, strlen(l)); /* the consequence of a refused MAIL */
		} else {
			reply(s, r);
		}
		return;
	}
	if (err != SMTP_CMD_OK) {
		if (err == SMTP_CMD_E_ADDRESS || err == SMTP_CMD_E_PATH_TOO_LONG)
			reply(s, cmd.verb == SMTP_VERB_MAIL ? RP_BAD_ADDR_MAIL : RP_BAD_ADDR_RCPT);
		else
			reply(s, def->syntax);
		return;
	}
	def->fn(s, &cmd);
}

/* ---- input ---- */

static void handle_event(struct smtp_session *s, const struct smtp_event *ev)
{
	switch (ev->type) {
	case SMTP_EV_COMMAND:
		if (s->sasl) {
			auth_continue(s, ev->data, ev->len);
			wipe_line(ev);
			break;
		}
		handle_command(s, ev->data, ev->len, ev->flags);
		if (ev->len >= 4 && !strncasecmp(ev->data, "AUTH", 4))
			wipe_line(ev); /* an initial response holds the password */
		break;
	case SMTP_EV_COMMAND_TOO_LONG:
		if (s->sasl) {
			sasl_end(s);
			reply(s, RP_AUTH_LINE_TOO_LONG);
			break;
		}
		reply(s, RP_LINE_TOO_LONG);
		break;
	case SMTP_EV_BODY:
		if (s->state == S_DATA || (s->state == S_BDAT && s->bdat_prev == S_RCPT))
			body_slice(s, ev->data, ev->len);
		break;
	case SMTP_EV_DATA_END:
		s->state = S_RCPT;
		txn_end(s, ev->flags);
		break;
	case SMTP_EV_BDAT_END:
		bdat_chunk_end(s);
		break;
	default:
		break;
	}
}

/* Processes input until it is used up or the session suspends; returns octets used. */
static size_t sess_run(struct smtp_session *s, const char *p, size_t n)
{
	size_t done = 0;
	/*
	 * Until the parser says it needs more (0), even with no input left: a BDAT
	 * chunk that ends exactly at the end of the input, or a held-back CR, is
	 * yielded by a call that consumes nothing.
	 */
	while (!s->suspended && !s->closing && !s->tls_pending) {
		size_t used = 0;
		struct smtp_event ev;
		int r = smtp_parser_next(&s->parser, done < n ? p + done : NULL, n - done, &used, &ev);
		done += used;
		if (r == 0)
			break;
		handle_event(s, &ev);
	}
	return s->closing || s->tls_pending ? n : done;
}

static int backlog_append(struct smtp_session *s, const char *p, size_t n)
{
	if (s->backlog_off && s->backlog_off == s->backlog_len)
		s->backlog_off = s->backlog_len = 0;
	if (s->backlog_len + n > s->backlog_cap) {
		size_t cap = s->backlog_cap ? s->backlog_cap : 4096;
		while (cap < s->backlog_len + n)
			cap *= 2;
		if (cap > BACKLOG_MAX)
			return -ENOBUFS;
		char *b = realloc(s->backlog, cap);
		if (!b)
			return -ENOMEM;
		s->backlog = b;
		s->backlog_cap = cap;
	}
	memcpy(s->backlog + s->backlog_len, p, n);
	s->backlog_len += n;
	return 0;
}

static void sess_process_backlog(struct smtp_session *s)
{
	/* at least once: the parser may owe an event that consumes no input */
	do {
		size_t left = s->backlog_len - s->backlog_off;
		s->backlog_off += sess_run(s, left ? s->backlog + s->backlog_off : NULL, left);
	} while (s->backlog_off < s->backlog_len && !s->suspended && !s->closing &&
		 !s->tls_pending);
	if (s->tls_pending)
		s->backlog_off = s->backlog_len = 0;
	if (s->backlog_off >= s->backlog_len)
		s->backlog_off = s->backlog_len = 0;
	if (!s->suspended && !s->closing)
		net_conn_resume_reading(s->conn);
}

static void on_data(struct net_conn *c, const struct iovec *iov, unsigned n)
{
	struct smtp_session *s = net_conn_data(c);
	s->last_ms = net_worker_now_ms(net_conn_worker(c));
	for (unsigned i = 0; i < n && !s->closing && !s->tls_pending; i++) {
		const char *p = iov[i].iov_base;
		size_t len = iov[i].iov_len;
		size_t used = 0;
		if (!s->suspended && s->backlog_off == s->backlog_len)
			used = sess_run(s, p, len);
		if (used < len && !s->closing && backlog_append(s, p + used, len - used) < 0) {
			log_warn("smtp: client sent over %u octets while its session waited; "
				 "dropping it",
				 BACKLOG_MAX);
			s->closing = true;
			net_conn_abort(c, -ENOBUFS);
		}
	}
}

/* ---- connection life ---- */

static unsigned sess_timeout(const struct smtp_session *s)
{
	return s->state & (S_DATA | S_BDAT) ? s->srv->cfg.timeout_data_ms
					    : s->srv->cfg.timeout_command_ms;
}

static void on_timeout(struct net_conn *c)
{
	struct smtp_session *s = net_conn_data(c);
	uint64_t now = net_worker_now_ms(net_conn_worker(c));
	uint64_t limit = sess_timeout(s);
	/* the timer is armed once; activity only moves last_ms (no heap work per read) */
	if (s->suspended || now - s->last_ms < limit) {
		uint64_t left = s->suspended ? limit : limit - (now - s->last_ms);
		net_conn_set_timeout(c, left ? left : 1);
		return;
	}
	close_421(s, "4.4.2", "Error: timeout exceeded");
}

static void on_open(struct net_conn *c, int err)
{
	if (err)
		return;
	const struct smtp_listener *lst = net_conn_listener_ctx(c);
	struct smtp_server *srv = lst->srv;
	struct net_worker *w = net_conn_worker(c);
	struct smtp_worker *sw = &srv->workers[net_worker_index(w)];
	struct smtp_session *s = calloc(1, sizeof(*s));
	if (!s || smtp_parser_init(&s->parser, &srv->cfg.limits) < 0) {
		free(s);
		static const char busy[] = "421 4.3.2 Error: out of memory; try again later\r\n";
		net_send(c, busy, sizeof(busy) - 1);
		net_conn_close(c);
		return;
	}
	s->conn = c;
	s->sw = sw;
	s->srv = srv;
	s->lst = lst;
	if (lst->role == SMTP_ROLE_SUBMISSIONS && tls_conn_info(c, &s->tls_info) == 0)
		s->tls = true; /* implicit TLS: on_open comes after the handshake */
	s->state = S_GREET;
	arena_init(&s->arena, 4096);
	net_conn_set_data(c, s);
	sw->stats.connections++;
	s->last_ms = net_worker_now_ms(w);
	net_conn_set_timeout(c, srv->cfg.timeout_command_ms);
	struct smtp_verdict v;
	if (consult(s, SMTP_STAGE_CONNECT, &v)) {
		char line[256];
		int k = snprintf(line, sizeof(line), "%u %s %s Error: service refused\r\n",
				 v.code >= 500 ? 554 : v.code, v.code >= 500 ? "5.7.0" : "4.3.2",
				 srv->hostname);
		reply_after(s, line, (size_t)k, v.delay_ms, true);
		return;
	}
	if (sw->sink->connect_check) {
		char text[300];
		text[0] = '\0';
		unsigned code = sw->sink->connect_check(sw->sink_ctx, s, text, sizeof(text));
		if (code) {
			char line[400];
			int k = snprintf(line, sizeof(line), "%u %s\r\n", code, text);
			reply_after(s, line, (size_t)MIN(k, (int)sizeof(line) - 1), v.delay_ms, true);
			return;
		}
		s->admitted = true;
	}
	reply_after(s, srv->greeting, srv->greeting_len, v.delay_ms, false);
}

static void on_shutdown(struct net_conn *c)
{
	struct smtp_session *s = net_conn_data(c);
	if (!s) {
		net_conn_close(c);
		return;
	}
	if (s->suspended) {
		/* an answer is owed: it goes out first, then the 421 */
		s->shutdown_asked = true;
		if (s->delayed_len) {
			net_timer_stop(net_conn_worker(c), &s->delay_timer);
			delay_fire(&s->delay_timer, net_conn_worker(c));
		}
		return;
	}
	txn_reset(s);
	close_421(s, "4.3.2", "Service shutting down");
}

static void on_close(struct net_conn *c, int err)
{
	(void)err;
	struct smtp_session *s = net_conn_data(c);
	if (!s)
		return;
	net_timer_stop(net_conn_worker(c), &s->delay_timer);
	txn_reset(s);
	smtp_parser_deinit(&s->parser);
	if (s->sw->sink->session_close)
		s->sw->sink->session_close(s->sw->sink_ctx);
	if (s->admitted && s->sw->sink->connect_end)
		s->sw->sink->connect_end(s->sw->sink_ctx, s);
	s->conn_gone = true;
	if (s->waiting_txn || s->waiting_auth)
		return; /* freed by smtp_session_txn_done / smtp_session_auth_done */
	sess_free(s);
}

static void on_tls(struct net_conn *c, int err)
{
	struct smtp_session *s = net_conn_data(c);
	if (!s || err)
		return; /* the connection closes; on_close follows */
	s->tls_pending = false;
	s->last_ms = net_worker_now_ms(net_conn_worker(c));
	if (tls_conn_info(c, &s->tls_info) < 0)
		memset(&s->tls_info, 0, sizeof(s->tls_info));
	smtp_session_set_tls(s, true);
}

static const struct net_proto smtp_proto = {
	.on_open = on_open,
	.on_data = on_data,
	.on_timeout = on_timeout,
	.on_shutdown = on_shutdown,
	.on_close = on_close,
	.on_tls = on_tls,
	.refuse_msg = "421 4.3.2 Too many connections; try again later\r\n",
};

/* ---- server ---- */

struct smtp_server *smtp_server_new(const struct smtp_server_config *cfg, struct net_engine *e)
{
	struct smtp_server *srv = calloc(1, sizeof(*srv));
	if (!srv)
		return NULL;
	srv->cfg = *cfg;
	if (cfg->hostname && *cfg->hostname)
		snprintf(srv->hostname, sizeof(srv->hostname), "%s", cfg->hostname);
	else if (gethostname(srv->hostname, sizeof(srv->hostname) - 1) < 0 || !srv->hostname[0])
		snprintf(srv->hostname, sizeof(srv->hostname), "localhost");
	srv->cfg.hostname = srv->hostname;
	if (!srv->cfg.max_errors)
		srv->cfg.max_errors = 20;
	if (!srv->cfg.max_recipients)
		srv->cfg.max_recipients = 1000;
	if (!srv->cfg.auth_fail_limit)
		srv->cfg.auth_fail_limit = 3;
	if (!srv->cfg.auth_fail_window_ms)
		srv->cfg.auth_fail_window_ms = 60 * 1000;
	if (!srv->cfg.auth_fail_close)
		srv->cfg.auth_fail_close = 5;
	srv->engine = e;
	srv->nworkers = net_engine_workers(e);
	srv->workers = aligned_alloc(CACHELINE, sizeof(*srv->workers) * srv->nworkers);
	if (!srv->workers) {
		free(srv);
		errno = ENOMEM;
		return NULL;
	}
	memset(srv->workers, 0, sizeof(*srv->workers) * srv->nworkers);
	int n = snprintf(srv->greeting, sizeof(srv->greeting), "220 %s ESMTP Posthaste\r\n",
			 srv->hostname);
	srv->greeting_len = (size_t)n;
	n = snprintf(srv->helo_reply, sizeof(srv->helo_reply), "250 %s\r\n", srv->hostname);
	srv->helo_reply_len = (size_t)n;
	n = snprintf(srv->ehlo_tail, sizeof(srv->ehlo_tail),
		     "250-PIPELINING\r\n"
		     "250-SIZE %" PRIu64 "\r\n"
		     "250-8BITMIME\r\n"
		     "250-ENHANCEDSTATUSCODES\r\n"
		     "250-CHUNKING\r\n"
		     "250-SMTPUTF8\r\n"
		     "250 DSN\r\n",
		     srv->cfg.max_message_size);
	srv->ehlo_tail_len = (size_t)n;
	return srv;
}

void smtp_server_free(struct smtp_server **srvp)
{
	struct smtp_server *srv = *srvp;
	if (!srv)
		return;
	for (unsigned i = 0; i < srv->nworkers; i++)
		free(srv->workers[i].auth_fails);
	while (srv->listeners) {
		struct smtp_listener *l = srv->listeners;
		srv->listeners = l->next;
		free(l);
	}
	free(srv->workers);
	free(srv);
	*srvp = NULL;
}

int smtp_server_listen(struct smtp_server *srv, const char *host, uint16_t port)
{
	return smtp_server_listen_role(srv, host, port, SMTP_ROLE_RELAY);
}

int smtp_server_listen_role(struct smtp_server *srv, const char *host, uint16_t port,
			    enum smtp_role role)
{
	if (role == SMTP_ROLE_SUBMISSIONS && !srv->cfg.tls)
		return -EINVAL;
	struct smtp_listener *l = calloc(1, sizeof(*l));
	if (!l)
		return -ENOMEM;
	l->srv = srv;
	l->role = role;
	int r = role == SMTP_ROLE_SUBMISSIONS
			? tls_listen(srv->engine, host, port, &smtp_proto, l, srv->cfg.tls)
			: net_engine_listen(srv->engine, host, port, &smtp_proto, l);
	if (r < 0) {
		free(l);
		return r;
	}
	l->next = srv->listeners;
	srv->listeners = l;
	if (role != SMTP_ROLE_RELAY)
		srv->submission = true;
	return 0;
}

int smtp_server_worker_init(struct smtp_server *srv, struct net_worker *w,
			    const struct smtp_sink_ops *sink, void *sink_ctx)
{
	unsigned i = net_worker_index(w);
	if (i >= srv->nworkers)
		return -EINVAL;
	srv->workers[i].srv = srv;
	srv->workers[i].sink = sink;
	srv->workers[i].sink_ctx = sink_ctx;
	if ((srv->cfg.auth || srv->submission) && !srv->workers[i].auth_fails) {
		srv->workers[i].auth_fails = calloc(AUTH_FAIL_SLOTS, sizeof(struct auth_fail));
		if (!srv->workers[i].auth_fails)
			return -ENOMEM;
	}
	return 0;
}

void smtp_server_stats(const struct smtp_server *srv, struct smtp_server_stats *out)
{
	memset(out, 0, sizeof(*out));
	for (unsigned i = 0; i < srv->nworkers; i++) {
		const struct smtp_server_stats *st = &srv->workers[i].stats;
		out->connections += st->connections;
		out->messages += st->messages;
		out->recipients += st->recipients;
		out->bytes += st->bytes;
		out->rejected += st->rejected;
		out->errors += st->errors;
	}
}
