/*
 * posthaste-bench send: an SMTP load generator on the net/ engine.
 *
 * C sessions ("slots") are spread over W workers. Each slot connects, reads
 * the greeting, says EHLO once (falls back to HELO), then runs transactions
 * back to back on the same connection until no message is left to claim, and
 * ends with QUIT. With PIPELINING, MAIL, the RCPTs and DATA go out in one
 * write, and the body with its final dot goes out together with the next
 * message's MAIL, RCPTs and DATA (one round trip per message); with BDAT the
 * whole transaction is one write. With --window N (BDAT, and a server that
 * offers PIPELINING and CHUNKING) a slot keeps up to N transactions in flight:
 * each is written whole without waiting for a reply (RFC 2920 does not end a
 * group at BDAT; RFC 3030 4.2 pipelines it), and the replies are matched to
 * them in order. A slot whose connection fails is re-opened
 * with a backoff, up to SEND_MAX_FAILURES failures in a row (an accepted
 * message resets the count). The sender leaves its workers unpinned: it
 * usually shares the host with the server under test.
 *
 * The hot path allocates nothing: the command block (MAIL, every RCPT, DATA)
 * and the message (fixed headers, body, final dot) are built once and queued
 * with net_send_ref; only the per-message header (Date, Message-ID) and the
 * BDAT command are copied with net_send. Replies are parsed in place.
 *
 * TLS (--tls starttls|implicit): STARTTLS after the first EHLO, then EHLO
 * again; or the handshake right after connecting (RFC 8314). No certificate
 * check (a load generator), no SNI. --tls-reuse: each worker keeps the newest
 * session of its connections and resumes it on the next one.
 *
 * Threads: the process context is read-only while the engine runs, except
 * its atomics (claimed messages, live workers, end time). Each worker owns
 * its slots, counters and histogram; counters are relaxed atomics only so
 * that worker 0 may read them for the progress line.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "bench/bench.h"
#include "bench/histogram.h"
#include "core/clock.h"
#include "core/compiler.h"
#include "core/log.h"
#include "mta/smtp/smtp_reply_parser.h"
#include "net/net.h"
#include "tls/tls.h"

#define SEND_MAX_FAILURES 10 /* consecutive connection failures before a slot gives up */
#define SEND_RETRY_MIN_MS 50 /* first reconnect delay; doubles per failure */
#define SEND_RETRY_MAX_MS 2000
#define SEND_MAX_RCPTS    1000
#define SEND_MAX_ADDR     256
#define SEND_LINE_CHARS   76 /* body line length without CRLF */
#define SEND_PROGRESS_MS  1000
#define SEND_HDR_MAX      512  /* BDAT command + per-message header */
#define SEND_MAX_WINDOW   256  /* --window: transactions in flight per connection */
#define SEND_WIN_CMDS_MAX 1024 /* windowed: a longer MAIL + RCPTs block is queued by reference */
#define SEND_WIN_BUF      (8 + SEND_WIN_CMDS_MAX + 48 + SEND_HDR_MAX)
#define SEND_ID_LINE_MAX  520 /* --ids-file: longest line written (a reply text is shorter) */

/* ---- options and process context ---- */

struct send_opts {
	char host[256];
	unsigned short port;
	unsigned connections;
	unsigned workers;
	unsigned recipients;
	uint64_t messages; /* 0: --duration mode */
	double duration_s;
	size_t size;
	double rate; /* messages/s overall; 0: unlimited */
	double timeout_s;
	int pipelining; /* -1 auto (when offered), 0 off, 1 on */
	bool bdat;
	unsigned window; /* BDAT transactions in flight per connection (1: one at a time) */
	bool json;
	const char *from;
	const char *to;
	const char *helo;
	const char *ids_file; /* --ids-file: one line per accepted message, its queue id */
	int tls;              /* SEND_TLS_*: --tls */
	bool tls_reuse;       /* --tls-reuse: resume sessions */
	uint64_t per_conn;    /* --messages-per-connection: then QUIT and reconnect; 0 = no limit */
};

enum { SEND_TLS_NONE = 0, SEND_TLS_STARTTLS, SEND_TLS_IMPLICIT };
#define SEND_TLS_SESSION_MAX 4096

struct send_stats {
	_Atomic uint64_t sent; /* transactions started */
	_Atomic uint64_t accepted;
	_Atomic uint64_t rej_temp;
	_Atomic uint64_t rej_perm;
	_Atomic uint64_t rcpt_ok;
	_Atomic uint64_t rcpt_rej;
	_Atomic uint64_t conns;       /* connections opened */
	_Atomic uint64_t conn_errors; /* connects refused, bad greetings, timeouts, lost sessions */
	_Atomic uint64_t bytes;       /* message octets queued */
	_Atomic uint64_t tls_ok;      /* TLS handshakes done */
	_Atomic uint64_t tls_resumed; /* of them, resumed sessions */
};

/* Single-writer increment: the owner thread adds, worker 0 may read. */
#define STAT_ADD(w, field, n)                                                                      \
	atomic_store_explicit(&(w)->st.field,                                                      \
	                      atomic_load_explicit(&(w)->st.field, memory_order_relaxed) + (n),    \
	                      memory_order_relaxed)
#define STAT_GET(st, field) atomic_load_explicit(&(st)->field, memory_order_relaxed)

struct send_worker;

struct send_ctx {
	struct send_opts o;
	struct sockaddr_storage sa;
	socklen_t salen;
	/* "MAIL FROM:<..>\r\n" "RCPT TO:<..>\r\n" x R "DATA\r\n", built once */
	char *cmds;
	size_t *rcpt_off; /* R + 1 offsets into cmds: RCPT i is [rcpt_off[i], rcpt_off[i + 1]) */
	size_t data_off;  /* offset of "DATA\r\n" (= the end of the last RCPT) */
	size_t cmds_len;
	char *ehlo;
	size_t ehlo_len;
	char *helo;
	size_t helo_len;
	/* the message after the per-message header, then ".\r\n" */
	char *msg;
	size_t msg_len;     /* without the final dot line */
	size_t hdr_len;     /* the per-message header's (constant) length */
	bool win_copy_cmds; /* windowed: MAIL + RCPTs within SEND_WIN_CMDS_MAX, copied */
	uint32_t nonce;
	int ids_fd; /* --ids-file, O_APPEND; -1 without */
	struct tls_ctx *tls; /* --tls: a client context without verification */
	uint64_t timeout_ms;
	uint64_t deadline_ms; /* clock_ms() after which no message is claimed (duration mode) */
	uint64_t hard_stop_ms;
	bool tty;
	struct net_engine *engine;
	struct send_worker *workers;
	unsigned nworkers;
	_Atomic uint64_t claimed;
	atomic_uint live_workers;
	uint64_t start_ns;
	_Atomic uint64_t end_ns;
};

/* ---- slots and workers ---- */

enum sess_state {
	S_IDLE = 0, /* no connection: not started, waiting to reconnect, or done */
	S_CONNECTING,
	S_GREETING,
	S_EHLO,
	S_HELO,
	S_READY,     /* between transactions */
	S_RATE_WAIT, /* waiting for a token of the rate limiter */
	S_TXN,       /* MAIL .. DATA/BDAT replies */
	S_BODY,      /* DATA body sent, final reply awaited */
	S_RSET,
	S_QUIT,
	S_STARTTLS,  /* STARTTLS sent, its 220 awaited */
	S_HANDSHAKE, /* TLS handshake (after STARTTLS's 220, or implicit at connect) */
};

static const char *const sess_state_names[] = {
    [S_IDLE] = "idle",      [S_CONNECTING] = "connect", [S_GREETING] = "greeting",
    [S_EHLO] = "EHLO",      [S_HELO] = "HELO",          [S_READY] = "ready",
    [S_RATE_WAIT] = "rate", [S_TXN] = "transaction",    [S_BODY] = "end of data",
    [S_RSET] = "RSET",      [S_QUIT] = "QUIT",          [S_STARTTLS] = "STARTTLS",
    [S_HANDSHAKE] = "TLS handshake",
};

/*
 * One transaction of a window (--window > 1): written whole, then matched to
 * its replies in order: RSET's when rset, MAIL's, R RCPT replies, BDAT's.
 */
struct win_txn {
	uint64_t msg_no;
	uint64_t t0_ns; /* when its first command was queued */
	unsigned step;  /* replies received */
	unsigned rcpt_ok;
	uint8_t fail_class; /* 0, or 4/5: the class of the first failing reply */
	bool rset;          /* an RSET went out ahead of its MAIL */
	bool mail_ok;
	bool rcpt_temp;
};

struct sess {
	struct send_worker *w;
	struct net_conn *conn;
	struct smtp_reply_parser parser;
	struct smtp_reply_caps caps;
	enum sess_state state;
	bool pipelining;
	bool bdat;
	bool closing;      /* close or abort asked: ignore the rest of the input */
	bool fail_counted; /* this connection's failure was already counted */
	bool stop;         /* no reconnect: finished or shutting down */
	bool finished;     /* counted out of the worker's live slots */
	bool waiting;      /* on the rate wait list */
	bool retry_armed;
	bool tls_on; /* this connection's TLS handshake is done */
	bool reconnect;     /* QUIT for --messages-per-connection: connect again after it */
	uint64_t conn_msgs; /* messages claimed on this connection */
	/* the transaction in flight */
	bool in_txn;
	bool mail_ok;
	bool rcpt_temp;
	uint8_t fail_class; /* 0, or 4/5 once the message is known to be rejected */
	unsigned step;      /* replies received in this transaction (0 = MAIL) */
	unsigned rcpt_ok;
	uint64_t msg_no;
	uint64_t t0_ns;
	/* DATA with PIPELINING: the next transaction's MAIL..DATA went out behind the dot */
	bool next_claimed;
	uint64_t next_msg_no;
	uint64_t next_t0_ns;
	/*
	 * --window > 1 (this connection offers PIPELINING and CHUNKING): the
	 * transactions in flight are ring[ring_head ..] (inflight of them, oldest
	 * first); in_txn and the fields above are unused. S_TXN while any is.
	 */
	unsigned window; /* 1: one transaction at a time */
	unsigned ring_head, inflight;
	struct win_txn *ring; /* window entries of the worker's array */
	/*
	 * Set by the slot's first refused windowed transaction, never cleared:
	 * from then on each transaction it writes starts with RSET. A server may
	 * keep the envelope of a refused transaction (a MAIL whose RCPTs were all
	 * refused), and the transactions already written behind it would run
	 * into that envelope; one RSET per message is the price only once the
	 * server refuses messages at all.
	 */
	bool rset_first;
	bool win_done;     /* a transaction ended in this batch of input: refill the window */
	unsigned failures; /* consecutive connection failures */
	struct net_timer retry;
	struct sess *wait_prev, *wait_next;
};

struct send_worker {
	struct send_ctx *ctx;
	struct net_worker *nw;
	unsigned index;
	struct sess *sess;
	unsigned nsess;
	unsigned live;        /* slots not finished */
	struct win_txn *ring; /* nsess x --window entries when --window > 1, else NULL */
	struct send_stats st;
	struct histogram *hist;
	/* rate limiter: a token bucket with this worker's share of --rate */
	double share, burst, tokens;
	uint64_t refill_ns;
	struct net_timer rate_timer;
	bool rate_armed;
	struct sess *wait_head, *wait_tail;
	/* worker 0 only */
	struct net_timer progress, hard_stop;
	bool progress_armed, hard_stop_armed;
	uint64_t progress_last_acc, progress_last_ns;
	/* per-message header scratch (net_send copies it) */
	time_t date_sec;
	char date[64];
	char hdr[SEND_HDR_MAX];
	char wbuf[SEND_WIN_BUF]; /* windowed: [RSET] MAIL RCPTs BDAT header, copied by net_send */
	/* --tls-reuse: the newest session of this worker's connections */
	size_t tls_sess_len;
	uint8_t tls_sess[SEND_TLS_SESSION_MAX];
} cache_aligned;

static void sess_next(struct sess *s);
static void sess_connect(struct sess *s);
static void sess_fail(struct sess *s, int err, const char *fmt, ...) printf_like(3, 4);
static bool sess_win_push(struct sess *s, uint64_t msg_no);
static void sess_win_fill(struct sess *s);

/* ---- stopping ---- */

static void ctx_stop(struct send_ctx *ctx)
{
	uint64_t zero = 0;

	atomic_compare_exchange_strong(&ctx->end_ns, &zero, clock_ns());
	net_engine_stop(ctx->engine);
}

static void slot_finish(struct sess *s)
{
	struct send_worker *w = s->w;

	if (s->finished)
		return;
	s->finished = true;
	s->stop = true;
	s->state = S_IDLE;
	if (--w->live == 0 && atomic_fetch_sub(&w->ctx->live_workers, 1) == 1)
		ctx_stop(w->ctx);
}

/* True while there may be messages left to claim. */
static bool ctx_more_work(const struct send_ctx *ctx)
{
	if (ctx->o.messages)
		return atomic_load_explicit(&ctx->claimed, memory_order_relaxed) < ctx->o.messages;
	return clock_ms() < ctx->deadline_ms;
}

/* ---- output helpers ---- */

static bool sess_send(struct sess *s, const void *p, size_t n, bool ref)
{
	int rc = ref ? net_send_ref(s->conn, p, n) : net_send(s->conn, p, n);

	if (unlikely(rc < 0)) {
		sess_fail(s, rc, "send failed: %s", strerror(-rc));
		return false;
	}
	return true;
}

static void sess_arm(struct sess *s)
{
	net_conn_set_timeout(s->conn, s->w->ctx->timeout_ms);
}

/* Formats "Date: ..\r\nMessage-ID: <..>\r\n" at dst (room octets); returns its length. */
static size_t send_format_header(struct send_worker *w, char *dst, size_t room, uint64_t msg_no)
{
	const struct send_ctx *ctx = w->ctx;
	time_t now = time(NULL);
	int n;

	if (now != w->date_sec) {
		struct tm tm;
		gmtime_r(&now, &tm);
		strftime(w->date, sizeof(w->date), "%a, %d %b %Y %H:%M:%S +0000", &tm);
		w->date_sec = now;
	}
	n = snprintf(dst, room, "Date: %s\r\nMessage-ID: <%016" PRIx64 ".%08" PRIx32 "@%s>\r\n",
	             w->date, msg_no, ctx->nonce, ctx->o.helo);
	if (n < 0 || (size_t)n >= room)
		panic("send: per-message header does not fit");
	return (size_t)n;
}

/* ---- transactions ---- */

static void sess_quit(struct sess *s)
{
	static const char quit[] = "QUIT\r\n";

	s->state = S_QUIT;
	if (sess_send(s, quit, sizeof(quit) - 1, true))
		sess_arm(s);
}

/* Queues "BDAT n LAST" + header + message. */
static bool sess_send_bdat(struct sess *s)
{
	struct send_worker *w = s->w;
	const struct send_ctx *ctx = w->ctx;
	char cmd[48];
	size_t h =
	    send_format_header(w, w->hdr + sizeof(cmd), sizeof(w->hdr) - sizeof(cmd), s->msg_no);
	int n = snprintf(cmd, sizeof(cmd), "BDAT %zu LAST\r\n", h + ctx->msg_len);
	char *start = w->hdr + sizeof(cmd) - n;

	memcpy(start, cmd, (size_t)n);
	STAT_ADD(w, bytes, h + ctx->msg_len);
	return sess_send(s, start, (size_t)n + h, false) &&
	       sess_send(s, ctx->msg, ctx->msg_len, true);
}

/* Queues header + message + ".\r\n" after a 354. */
static bool sess_send_data(struct sess *s)
{
	struct send_worker *w = s->w;
	const struct send_ctx *ctx = w->ctx;
	size_t h = send_format_header(w, w->hdr, sizeof(w->hdr), s->msg_no);

	STAT_ADD(w, bytes, h + ctx->msg_len);
	return sess_send(s, w->hdr, h, false) && sess_send(s, ctx->msg, ctx->msg_len + 3, true);
}

static void sess_txn_begin(struct sess *s, uint64_t msg_no, uint64_t t0_ns)
{
	s->state = S_TXN;
	s->in_txn = true;
	s->mail_ok = false;
	s->rcpt_temp = false;
	s->fail_class = 0;
	s->step = 0;
	s->rcpt_ok = 0;
	s->msg_no = msg_no;
	s->t0_ns = t0_ns;
}

static void sess_start_txn(struct sess *s, uint64_t msg_no)
{
	struct send_worker *w = s->w;
	const struct send_ctx *ctx = w->ctx;
	bool ok;

	STAT_ADD(w, sent, 1);
	if (s->window > 1) {
		s->state = S_TXN;
		if (sess_win_push(s, msg_no))
			sess_win_fill(s);
		if (s->conn && !s->closing)
			sess_arm(s);
		return;
	}
	sess_txn_begin(s, msg_no, clock_ns());
	if (s->pipelining) {
		if (s->bdat)
			ok = sess_send(s, ctx->cmds, ctx->data_off, true) && sess_send_bdat(s);
		else
			ok = sess_send(s, ctx->cmds, ctx->cmds_len, true);
	} else {
		ok = sess_send(s, ctx->cmds, ctx->rcpt_off[0], true);
	}
	if (ok)
		sess_arm(s);
}

/* Claims the next message (a rate token is already held) or says QUIT. */
static void sess_claim(struct sess *s)
{
	struct send_ctx *ctx = s->w->ctx;
	uint64_t n;

	if (net_worker_stopping(s->w->nw)) {
		sess_quit(s);
		return;
	}
	if (!ctx->o.messages && clock_ms() >= ctx->deadline_ms) {
		sess_quit(s);
		return;
	}
	if (ctx->o.per_conn && s->conn_msgs >= ctx->o.per_conn) {
		s->reconnect = true;
		sess_quit(s);
		return;
	}
	n = atomic_fetch_add_explicit(&ctx->claimed, 1, memory_order_relaxed);
	if (ctx->o.messages && n >= ctx->o.messages) {
		sess_quit(s);
		return;
	}
	s->conn_msgs++;
	sess_start_txn(s, n);
}

/* ---- rate limiter ---- */

static void rate_refill(struct send_worker *w)
{
	uint64_t now = clock_ns();

	w->tokens += (double)(now - w->refill_ns) * 1e-9 * w->share;
	if (w->tokens > w->burst)
		w->tokens = w->burst;
	w->refill_ns = now;
}

/*
 * Claims a message for a transaction queued behind others, only if one and a
 * rate token (no slot waiting for one first) are at hand: true with *msg_no_r
 * set and the message counted sent, false with nothing taken.
 */
static bool sess_try_claim(struct sess *s, uint64_t *msg_no_r)
{
	struct send_worker *w = s->w;
	struct send_ctx *ctx = w->ctx;
	uint64_t n;

	if (net_worker_stopping(w->nw))
		return false;
	if (!ctx->o.messages && clock_ms() >= ctx->deadline_ms)
		return false;
	if (ctx->o.per_conn && s->conn_msgs >= ctx->o.per_conn)
		return false;
	if (w->share > 0) {
		rate_refill(w);
		if (w->wait_head || w->tokens < 1.0)
			return false;
	}
	n = atomic_fetch_add_explicit(&ctx->claimed, 1, memory_order_relaxed);
	if (ctx->o.messages && n >= ctx->o.messages)
		return false;
	if (w->share > 0)
		w->tokens -= 1.0;
	s->conn_msgs++;
	STAT_ADD(w, sent, 1);
	*msg_no_r = n;
	return true;
}

/*
 * DATA with PIPELINING, after the body was queued: claims the next message
 * and queues its MAIL, RCPTs and DATA behind the final dot, in the same write
 * (RFC 2920 3.1: message content may be the first "command" of a group). Its
 * replies follow the current message's final reply. Does nothing when no
 * message or rate token is available at once.
 */
static void sess_preclaim(struct sess *s)
{
	const struct send_ctx *ctx = s->w->ctx;
	uint64_t n;

	if (!sess_try_claim(s, &n))
		return;
	s->next_claimed = true;
	s->next_msg_no = n;
	s->next_t0_ns = clock_ns();
	sess_send(s, ctx->cmds, ctx->cmds_len, true);
}

/* ---- windowed transactions (--window > 1) ---- */

/*
 * Queues transaction t whole, waiting for no reply: [RSET] MAIL, the RCPTs,
 * "BDAT n LAST" and the message. A short command block goes out copied in one
 * segment with the BDAT command and the per-message header (the body by
 * reference is the other), so a window of transactions stays within the
 * engine's iovecs for one sendmsg.
 */
static bool sess_win_write(struct sess *s, const struct win_txn *t)
{
	static const char rset[] = "RSET\r\n";
	struct send_worker *w = s->w;
	const struct send_ctx *ctx = w->ctx;
	char *p = w->wbuf;
	size_t h;

	if (t->rset) {
		memcpy(p, rset, sizeof(rset) - 1);
		p += sizeof(rset) - 1;
	}
	if (ctx->win_copy_cmds) {
		memcpy(p, ctx->cmds, ctx->data_off);
		p += ctx->data_off;
	} else {
		if (p > w->wbuf && !sess_send(s, w->wbuf, (size_t)(p - w->wbuf), false))
			return false;
		if (!sess_send(s, ctx->cmds, ctx->data_off, true))
			return false;
		p = w->wbuf;
	}
	h = send_format_header(w, w->hdr, sizeof(w->hdr), t->msg_no);
	p += snprintf(p, 48, "BDAT %zu LAST\r\n", h + ctx->msg_len);
	memcpy(p, w->hdr, h);
	p += h;
	STAT_ADD(w, bytes, h + ctx->msg_len);
	return sess_send(s, w->wbuf, (size_t)(p - w->wbuf), false) &&
	       sess_send(s, ctx->msg, ctx->msg_len, true);
}

/*
 * Appends message msg_no (claimed and counted sent) to the window and writes
 * it. It is in flight from here on: a failed write or a lost connection ends
 * it as a temporary failure (sess_on_close).
 */
static bool sess_win_push(struct sess *s, uint64_t msg_no)
{
	unsigned i = s->ring_head + s->inflight;
	struct win_txn *t = &s->ring[i >= s->window ? i - s->window : i];

	*t = (struct win_txn){.msg_no = msg_no, .t0_ns = clock_ns(), .rset = s->rset_first};
	s->inflight++;
	return sess_win_write(s, t);
}

/* Writes more transactions until the window is full or no message or rate token is at hand. */
static void sess_win_fill(struct sess *s)
{
	uint64_t n;

	while (s->inflight < s->window && s->conn && !s->closing && sess_try_claim(s, &n))
		if (!sess_win_push(s, n))
			return;
}

static void rate_fire(struct net_timer *t, struct net_worker *nw);

static void rate_arm(struct send_worker *w)
{
	double need_s;
	uint64_t ms;

	if (w->rate_armed)
		return;
	need_s = (1.0 - w->tokens) / w->share;
	ms = need_s > 0 ? (uint64_t)ceil(need_s * 1000.0) : 1;
	if (!w->ctx->o.messages) { /* wake up at the deadline at the latest */
		uint64_t now = clock_ms();
		ms = MIN(ms, w->ctx->deadline_ms > now ? w->ctx->deadline_ms - now + 1 : 1);
	}
	w->rate_timer.fire = rate_fire;
	net_timer_start(w->nw, &w->rate_timer, MAX(ms, (uint64_t)1));
	w->rate_armed = true;
}

static void wait_remove(struct send_worker *w, struct sess *s)
{
	if (!s->waiting)
		return;
	if (s->wait_prev)
		s->wait_prev->wait_next = s->wait_next;
	else
		w->wait_head = s->wait_next;
	if (s->wait_next)
		s->wait_next->wait_prev = s->wait_prev;
	else
		w->wait_tail = s->wait_prev;
	s->wait_prev = s->wait_next = NULL;
	s->waiting = false;
}

static void wait_append(struct send_worker *w, struct sess *s)
{
	s->waiting = true;
	s->wait_next = NULL;
	s->wait_prev = w->wait_tail;
	if (w->wait_tail)
		w->wait_tail->wait_next = s;
	else
		w->wait_head = s;
	w->wait_tail = s;
}

static void rate_fire(struct net_timer *t, struct net_worker *nw)
{
	struct send_worker *w = container_of(t, struct send_worker, rate_timer);

	bool more = ctx_more_work(w->ctx);

	w->rate_armed = false;
	rate_refill(w);
	/* with no work left, the waiting slots go on at once (to say QUIT) */
	while (w->wait_head && (w->tokens >= 1.0 || !more)) {
		struct sess *s = w->wait_head;
		wait_remove(w, s);
		if (more)
			w->tokens -= 1.0;
		sess_claim(s);
	}
	if (w->wait_head)
		rate_arm(w);
}

/* Starts the next transaction, or waits for the rate limiter, or says QUIT. */
static void sess_next(struct sess *s)
{
	struct send_worker *w = s->w;

	s->state = S_READY;
	if (w->share > 0 && !net_worker_stopping(w->nw) && ctx_more_work(w->ctx)) {
		rate_refill(w);
		if (w->wait_head || w->tokens < 1.0) {
			s->state = S_RATE_WAIT;
			net_conn_set_timeout(s->conn, 0);
			wait_append(w, s);
			rate_arm(w);
			return;
		}
		w->tokens -= 1.0;
	}
	sess_claim(s);
}

/*
 * --ids-file: appends the queue id of an accepted message (the token after
 * "queued as " in the final reply, else the whole reply text) as one line, in
 * one write(2), so that lines from several workers never interleave.
 */
static void send_note_id(const struct send_ctx *ctx, const struct smtp_reply_line *ln)
{
	static const char tag[] = "queued as ";
	char line[SEND_ID_LINE_MAX];
	const char *p = ln->text, *end = ln->text + ln->text_len;
	size_t n;

	if (ctx->ids_fd < 0)
		return;
	for (const char *q = ln->text; q + sizeof(tag) - 1 <= end; q++) {
		if (memcmp(q, tag, sizeof(tag) - 1) == 0) {
			p = q + sizeof(tag) - 1;
			end = p;
			while (end < ln->text + ln->text_len && *end != ' ' && *end != '\t')
				end++;
			break;
		}
	}
	n = MIN((size_t)(end - p), sizeof(line) - 1);
	memcpy(line, p, n);
	line[n++] = '\n';
	if (write(ctx->ids_fd, line, n) != (ssize_t)n)
		log_once(LOG_WARN, "send: --ids-file: write failed: %s", strerror(errno));
}

/* The transaction is over: count it, then RSET if the server may hold state, or go on. */
static void sess_txn_done(struct sess *s, unsigned cls, bool rset)
{
	static const char rset_cmd[] = "RSET\r\n";
	struct send_worker *w = s->w;

	s->in_txn = false;
	if (cls == 0) {
		s->failures = 0; /* the connection is healthy */
		STAT_ADD(w, accepted, 1);
		histogram_record(w->hist, clock_ns() - s->t0_ns);
	} else if (cls == 4) {
		STAT_ADD(w, rej_temp, 1);
	} else {
		STAT_ADD(w, rej_perm, 1);
	}
	if (s->next_claimed) { /* its commands are out already: await their replies */
		s->next_claimed = false;
		sess_txn_begin(s, s->next_msg_no, s->next_t0_ns);
		sess_arm(s);
		return;
	}
	if (cls && rset) {
		s->state = S_RSET;
		if (sess_send(s, rset_cmd, sizeof(rset_cmd) - 1, true))
			sess_arm(s);
		return;
	}
	sess_next(s);
}

static void send_log_reject(uint64_t msg_no, const char *what, const struct smtp_reply_line *ln)
{
	log_once(LOG_WARN, "send: first rejection (%s): %.*s", what, (int)MIN(ln->line_len, 200),
	         ln->line);
	log_debug("send: message %" PRIu64 " rejected at %s: %.*s", msg_no, what,
	          (int)MIN(ln->line_len, 200), ln->line);
}

static void sess_txn_reply(struct sess *s, const struct smtp_reply_line *ln)
{
	const struct send_ctx *ctx = s->w->ctx;
	unsigned R = ctx->o.recipients;
	unsigned k = s->step++;
	unsigned cls = ln->code / 100;

	if (k == 0) { /* MAIL */
		if (cls == 2) {
			s->mail_ok = true;
		} else {
			s->fail_class = cls == 4 ? 4 : 5;
			send_log_reject(s->msg_no, "MAIL", ln);
		}
		if (!s->pipelining) {
			if (s->mail_ok) {
				if (sess_send(s, ctx->cmds + ctx->rcpt_off[0],
				              ctx->rcpt_off[1] - ctx->rcpt_off[0], true))
					sess_arm(s);
			} else {
				sess_txn_done(s, s->fail_class, false);
			}
		}
		return;
	}
	if (k <= R) { /* RCPT k */
		if (s->mail_ok) {
			if (cls == 2) {
				s->rcpt_ok++;
				STAT_ADD(s->w, rcpt_ok, 1);
			} else {
				STAT_ADD(s->w, rcpt_rej, 1);
				if (cls == 4)
					s->rcpt_temp = true;
				if (s->rcpt_ok == 0 && k == R)
					send_log_reject(s->msg_no, "RCPT", ln);
			}
		}
		if (k == R && s->mail_ok && s->rcpt_ok == 0 && !s->fail_class)
			s->fail_class = s->rcpt_temp ? 4 : 5;
		if (s->pipelining)
			return;
		if (k < R) {
			if (sess_send(s, ctx->cmds + ctx->rcpt_off[k],
			              ctx->rcpt_off[k + 1] - ctx->rcpt_off[k], true))
				sess_arm(s);
		} else if (s->fail_class) {
			sess_txn_done(s, s->fail_class, true);
		} else if (s->bdat) {
			if (sess_send_bdat(s))
				sess_arm(s);
		} else {
			if (sess_send(s, ctx->cmds + ctx->data_off, ctx->cmds_len - ctx->data_off,
			              true))
				sess_arm(s);
		}
		return;
	}
	/* k == R + 1: the reply to DATA, or BDAT's final reply */
	if (s->bdat) {
		if (cls != 2 && !s->fail_class) {
			s->fail_class = (uint8_t)(cls == 4 ? 4 : 5);
			send_log_reject(s->msg_no, "BDAT", ln);
		}
		if (!s->fail_class)
			send_note_id(ctx, ln);
		sess_txn_done(s, s->fail_class, s->mail_ok);
		return;
	}
	if (ln->code == 354) {
		static const char dot[] = ".\r\n";
		bool ok;
		s->state = S_BODY;
		if (s->fail_class) { /* a server that says 354 with no recipient: end it empty */
			ok = sess_send(s, dot, 3, true);
		} else {
			ok = sess_send_data(s);
			if (ok && s->pipelining)
				sess_preclaim(s);
		}
		if (ok && s->conn && !s->closing)
			sess_arm(s);
		return;
	}
	if (!s->fail_class) {
		s->fail_class = (uint8_t)(cls == 4 ? 4 : 5);
		send_log_reject(s->msg_no, "DATA", ln);
	}
	sess_txn_done(s, s->fail_class, s->mail_ok);
}

/* Windowed: the oldest transaction in flight is over: count it and drop it from the window. */
static void sess_win_done(struct sess *s, const struct win_txn *t, unsigned cls)
{
	struct send_worker *w = s->w;

	if (cls == 0) {
		s->failures = 0; /* the connection is healthy */
		STAT_ADD(w, accepted, 1);
		histogram_record(w->hist, clock_ns() - t->t0_ns);
	} else {
		if (cls == 4)
			STAT_ADD(w, rej_temp, 1);
		else
			STAT_ADD(w, rej_perm, 1);
		s->rset_first = true;
	}
	s->ring_head = s->ring_head + 1 == s->window ? 0 : s->ring_head + 1;
	s->inflight--;
	s->win_done = true;
}

/*
 * Windowed: one reply, for the oldest transaction in flight. Accounting as for
 * one transaction at a time: the message is refused with the class of its
 * first failing reply (MAIL, all RCPTs, BDAT), and accepted when BDAT LAST
 * says 2xx. A 2xx there after a refused MAIL means the server had kept the
 * envelope of a failed transaction this one was written behind, and took the
 * message into it: it is counted accepted, as the server took it (and its
 * accepted recipients with it), so the counts stay those of the server.
 */
static void sess_win_reply(struct sess *s, const struct smtp_reply_line *ln)
{
	unsigned R = s->w->ctx->o.recipients;
	unsigned cls = ln->code / 100;
	struct win_txn *t;
	unsigned k;

	if (unlikely(s->inflight == 0)) {
		sess_fail(s, -EPROTO, "unexpected reply: %.*s", (int)MIN(ln->line_len, 200),
		          ln->line);
		return;
	}
	t = &s->ring[s->ring_head];
	k = t->step++;
	if (t->rset) {
		if (k == 0) {
			if (cls != 2)
				sess_fail(s, -EPROTO, "RSET: %.*s", (int)MIN(ln->line_len, 200),
				          ln->line);
			return;
		}
		k--;
	}
	if (k == 0) { /* MAIL */
		if (cls == 2) {
			t->mail_ok = true;
		} else {
			t->fail_class = cls == 4 ? 4 : 5;
			send_log_reject(t->msg_no, "MAIL", ln);
		}
		return;
	}
	if (k <= R) { /* RCPT k */
		if (cls == 2) {
			t->rcpt_ok++;
			STAT_ADD(s->w, rcpt_ok, 1);
		} else if (t->mail_ok) {
			STAT_ADD(s->w, rcpt_rej, 1);
			if (cls == 4)
				t->rcpt_temp = true;
			if (t->rcpt_ok == 0 && k == R)
				send_log_reject(t->msg_no, "RCPT", ln);
		}
		if (k == R && t->mail_ok && t->rcpt_ok == 0 && !t->fail_class)
			t->fail_class = t->rcpt_temp ? 4 : 5;
		return;
	}
	/* k == R + 1: BDAT's final reply */
	if (cls == 2) {
		if (t->fail_class)
			log_debug("send: message %" PRIu64 " accepted after its MAIL was refused "
			          "(the server had kept an earlier envelope)",
			          t->msg_no);
		send_note_id(s->w->ctx, ln);
		sess_win_done(s, t, 0);
		return;
	}
	if (!t->fail_class) {
		t->fail_class = (uint8_t)(cls == 4 ? 4 : 5);
		send_log_reject(t->msg_no, "BDAT", ln);
	}
	sess_win_done(s, t, t->fail_class);
}

/*
 * Windowed, after a batch of input in which a transaction ended: writes the
 * next transactions behind those still in flight (all of them go out in this
 * loop turn's one write), or with none left in flight goes on as after a
 * single transaction (the rate limiter, the next claim, or QUIT).
 */
static void sess_win_refill(struct sess *s)
{
	s->win_done = false;
	if (s->inflight == 0) {
		sess_next(s);
		return;
	}
	sess_win_fill(s);
	if (s->conn && !s->closing)
		sess_arm(s);
}

/* ---- connection callbacks ---- */

static void sess_fail(struct sess *s, int err, const char *fmt, ...)
{
	char why[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, sizeof(why), fmt, ap);
	va_end(ap);
	log_once(LOG_WARN, "send: first connection failure (in %s): %s", sess_state_names[s->state],
	         why);
	log_debug("send: worker %u: connection failed in %s: %s", s->w->index,
	          sess_state_names[s->state], why);
	if (!s->fail_counted) {
		s->fail_counted = true;
		STAT_ADD(s->w, conn_errors, 1);
	}
	if (s->conn && !s->closing) {
		s->closing = true;
		net_conn_abort(s->conn, err);
	}
}

static void sess_greeted(struct sess *s)
{
	const struct send_opts *o = &s->w->ctx->o;

	s->pipelining =
	    o->pipelining > 0 || (o->pipelining < 0 && (s->caps.flags & SMTP_CAP_PIPELINING));
	s->bdat = o->bdat && (s->caps.flags & SMTP_CAP_CHUNKING);
	s->window = 1;
	if (o->bdat && !s->bdat)
		log_once(LOG_WARN, "send: the server does not offer CHUNKING: using DATA%s",
		         o->window > 1 ? " and --window 1" : "");
	else if (o->window > 1 && !(s->pipelining && (s->caps.flags & SMTP_CAP_PIPELINING)))
		log_once(LOG_WARN, "send: the server does not offer PIPELINING: using --window 1");
	else if (o->window > 1)
		s->window = o->window;
	sess_next(s);
}

/* STARTTLS's 220 came, or an implicit-TLS connection opened: the handshake (on_tls ends it). */
static void sess_tls_start(struct sess *s)
{
	const struct send_ctx *ctx = s->w->ctx;
	struct send_worker *w = s->w;
	int rc;

	s->state = S_HANDSHAKE;
	rc = tls_conn_start(s->conn, ctx->tls, NULL, ctx->o.tls_reuse ? w->tls_sess : NULL,
	                    ctx->o.tls_reuse ? w->tls_sess_len : 0);
	if (rc < 0) {
		sess_fail(s, rc, "cannot start TLS: %s", strerror(-rc));
		return;
	}
	sess_arm(s);
}

static void sess_on_tls(struct net_conn *c, int err)
{
	struct sess *s = net_conn_data(c);
	const struct send_ctx *ctx = s->w->ctx;
	struct tls_info ti;

	if (err < 0) {
		/* the connection is closing: on_close(c, err) follows */
		log_once(LOG_WARN, "send: first TLS handshake failure: %s", strerror(-err));
		if (!s->fail_counted) {
			s->fail_counted = true;
			STAT_ADD(s->w, conn_errors, 1);
		}
		s->closing = true;
		return;
	}
	s->tls_on = true;
	STAT_ADD(s->w, tls_ok, 1);
	if (tls_conn_info(c, &ti) == 0) {
		if (ti.resumed)
			STAT_ADD(s->w, tls_resumed, 1);
		log_once(LOG_INFO, "send: TLS: %s %s", ti.version, ti.cipher);
	}
	smtp_reply_parser_reset(&s->parser);
	if (ctx->o.tls == SEND_TLS_IMPLICIT) {
		s->state = S_GREETING; /* the greeting comes over TLS */
		sess_arm(s);
		return;
	}
	/* STARTTLS: EHLO again (RFC 3207 4.2), the capabilities learnt anew */
	s->state = S_EHLO;
	memset(&s->caps, 0, sizeof(s->caps));
	if (sess_send(s, ctx->ehlo, ctx->ehlo_len, true))
		sess_arm(s);
}

static void sess_reply(struct sess *s, const struct smtp_reply_line *ln)
{
	const struct send_ctx *ctx = s->w->ctx;

	if (ln->code == 421 && s->state != S_QUIT) {
		sess_fail(s, -ECONNRESET, "server closing: %.*s", (int)MIN(ln->line_len, 200),
		          ln->line);
		return;
	}
	switch (s->state) {
	case S_GREETING:
		if (ln->code != 220) {
			sess_fail(s, -ECONNREFUSED, "greeting: %.*s", (int)MIN(ln->line_len, 200),
			          ln->line);
			return;
		}
		s->state = S_EHLO;
		memset(&s->caps, 0, sizeof(s->caps));
		if (sess_send(s, ctx->ehlo, ctx->ehlo_len, true))
			sess_arm(s);
		return;
	case S_EHLO:
		if (ln->code == 250 && ctx->o.tls == SEND_TLS_STARTTLS && !s->tls_on) {
			static const char starttls[] = "STARTTLS\r\n";
			if (!(s->caps.flags & SMTP_CAP_STARTTLS)) {
				s->stop = true; /* retrying would not help */
				sess_fail(s, -EPROTONOSUPPORT, "--tls starttls: the server does not "
				                               "offer STARTTLS");
				return;
			}
			s->state = S_STARTTLS;
			if (sess_send(s, starttls, sizeof(starttls) - 1, true))
				sess_arm(s);
		} else if (ln->code == 250) {
			sess_greeted(s);
		} else if (ln->code / 100 == 5) {
			s->state = S_HELO;
			memset(&s->caps, 0, sizeof(s->caps));
			if (sess_send(s, ctx->helo, ctx->helo_len, true))
				sess_arm(s);
		} else {
			sess_fail(s, -EPROTO, "EHLO: %.*s", (int)MIN(ln->line_len, 200), ln->line);
		}
		return;
	case S_HELO:
		if (ln->code == 250)
			sess_greeted(s);
		else
			sess_fail(s, -EPROTO, "HELO: %.*s", (int)MIN(ln->line_len, 200), ln->line);
		return;
	case S_TXN:
		if (s->window > 1)
			sess_win_reply(s, ln);
		else
			sess_txn_reply(s, ln);
		return;
	case S_BODY: {
		unsigned cls = ln->code / 100;
		if (cls != 2 && !s->fail_class) {
			s->fail_class = (uint8_t)(cls == 4 ? 4 : 5);
			send_log_reject(s->msg_no, "end of data", ln);
		}
		if (!s->fail_class)
			send_note_id(ctx, ln);
		sess_txn_done(s, s->fail_class, false);
		return;
	}
	case S_RSET:
		if (ln->code / 100 != 2) {
			sess_fail(s, -EPROTO, "RSET: %.*s", (int)MIN(ln->line_len, 200), ln->line);
			return;
		}
		sess_next(s);
		return;
	case S_QUIT:
		s->closing = true;
		net_conn_close(s->conn);
		return;
	case S_STARTTLS:
		if (ln->code != 220) {
			s->stop = true;
			sess_fail(s, -EPROTO, "STARTTLS: %.*s", (int)MIN(ln->line_len, 200), ln->line);
			return;
		}
		sess_tls_start(s);
		return;
	default:
		sess_fail(s, -EPROTO, "unexpected reply: %.*s", (int)MIN(ln->line_len, 200),
		          ln->line);
		return;
	}
}

static void sess_on_open(struct net_conn *c, int err)
{
	struct sess *s = net_conn_data(c);

	if (err < 0) {
		/* on_close follows */
		s->conn = c;
		s->closing = true;
		sess_fail(s, err, "connect: %s", strerror(-err));
		return;
	}
	s->conn = c;
	s->closing = false;
	net_conn_set_data(c, s);
	STAT_ADD(s->w, conns, 1);
	smtp_reply_parser_reset(&s->parser);
	s->window = 1;
	s->ring_head = s->inflight = 0;
	s->win_done = false;
	s->tls_on = false;
	s->reconnect = false;
	s->conn_msgs = 0;
	if (s->w->ctx->o.tls == SEND_TLS_IMPLICIT) {
		sess_tls_start(s);
		return;
	}
	s->state = S_GREETING;
	sess_arm(s);
}

static void sess_on_data(struct net_conn *c, const struct iovec *iov, unsigned n)
{
	struct sess *s = net_conn_data(c);
	struct smtp_reply_line ln;
	const char *err;
	size_t used;

	for (unsigned i = 0; i < n; i++) {
		const char *p = iov[i].iov_base;
		size_t len = iov[i].iov_len;

		while (len > 0) {
			int rc;
			if (s->closing || s->conn != c)
				return;
			rc = smtp_reply_parser_next(&s->parser, p, len, &used, &ln, &err);
			if (unlikely(rc < 0)) {
				sess_fail(s, -EPROTO, "bad reply: %s", err);
				return;
			}
			p += used;
			len -= used;
			if (rc == 0)
				break;
			if (s->state == S_EHLO)
				smtp_reply_caps_learn(&s->caps, &ln);
			if (ln.last)
				sess_reply(s, &ln);
			if (s->state == S_HANDSHAKE)
				return; /* octets after STARTTLS's 220 are not taken (CVE-2011-0411) */
		}
	}
	if (s->win_done && s->conn == c && !s->closing && s->state == S_TXN)
		sess_win_refill(s);
}

static void sess_on_timeout(struct net_conn *c)
{
	struct sess *s = net_conn_data(c);

	if (s->state == S_RATE_WAIT || s->closing)
		return;
	sess_fail(s, -ETIMEDOUT, "no reply within %g s", s->w->ctx->o.timeout_s);
}

static void sess_on_shutdown(struct net_conn *c)
{
	static const char quit[] = "QUIT\r\n";
	struct sess *s = net_conn_data(c);

	s->stop = true;
	wait_remove(s->w, s);
	if (s->closing)
		return;
	if (s->state == S_READY || s->state == S_RATE_WAIT)
		net_send(c, quit, sizeof(quit) - 1);
	s->closing = true;
	net_conn_close(c);
}

static void sess_retry_fire(struct net_timer *t, struct net_worker *nw)
{
	struct sess *s = container_of(t, struct sess, retry);

	s->retry_armed = false;
	if (net_worker_stopping(nw) || !ctx_more_work(s->w->ctx)) {
		slot_finish(s);
		return;
	}
	sess_connect(s);
}

/* After a failure: reconnect later, or give up. */
static void sess_retry_or_finish(struct sess *s)
{
	struct send_worker *w = s->w;
	uint64_t ms;

	s->failures++;
	if (s->stop || net_worker_stopping(w->nw) || s->failures > SEND_MAX_FAILURES ||
	    !ctx_more_work(w->ctx)) {
		if (s->failures > SEND_MAX_FAILURES)
			log_warn("send: worker %u: giving a connection up after %u failures",
			         w->index, SEND_MAX_FAILURES);
		slot_finish(s);
		return;
	}
	ms = (uint64_t)SEND_RETRY_MIN_MS << MIN(s->failures - 1, 10u);
	s->state = S_IDLE;
	s->retry.fire = sess_retry_fire;
	s->retry_armed = true;
	net_timer_start(w->nw, &s->retry, MIN(ms, (uint64_t)SEND_RETRY_MAX_MS));
}

static void sess_on_close(struct net_conn *c, int err)
{
	struct sess *s = net_conn_data(c);
	bool normal = s->state == S_QUIT;

	if (s->tls_on && s->w->ctx->o.tls_reuse) {
		/* TLS 1.3 tickets arrive after the handshake: ask at the end */
		int n = tls_conn_session(c, s->w->tls_sess, sizeof(s->w->tls_sess));
		if (n > 0)
			s->w->tls_sess_len = (size_t)n;
	}
	s->tls_on = false;
	s->conn = NULL;
	s->closing = false;
	wait_remove(s->w, s);
	if (s->in_txn) {
		s->in_txn = false;
		STAT_ADD(s->w, rej_temp, 1);
	}
	if (s->next_claimed) {
		s->next_claimed = false;
		STAT_ADD(s->w, rej_temp, 1);
	}
	if (s->inflight) { /* windowed: everything in flight ends as a temporary failure */
		STAT_ADD(s->w, rej_temp, s->inflight);
		s->inflight = 0;
	}
	s->ring_head = 0;
	s->window = 1;
	if (normal && s->reconnect && !s->stop && !net_worker_stopping(s->w->nw) &&
	    ctx_more_work(s->w->ctx)) {
		s->fail_counted = false;
		sess_connect(s); /* --messages-per-connection */
		return;
	}
	if (normal || s->stop) { /* QUIT done, or shutting down */
		s->fail_counted = false;
		slot_finish(s);
		return;
	}
	if (!s->fail_counted) {
		log_once(LOG_WARN, "send: first connection lost (in %s): %s",
		         sess_state_names[s->state], err ? strerror(-err) : "closed by the server");
		STAT_ADD(s->w, conn_errors, 1);
	}
	s->fail_counted = false;
	sess_retry_or_finish(s);
}

static const struct net_proto send_proto = {
    .on_open = sess_on_open,
    .on_data = sess_on_data,
    .on_timeout = sess_on_timeout,
    .on_shutdown = sess_on_shutdown,
    .on_close = sess_on_close,
    .on_tls = sess_on_tls,
};

static void sess_connect(struct sess *s)
{
	struct send_worker *w = s->w;
	const struct send_ctx *ctx = w->ctx;
	int rc;

	s->state = S_CONNECTING;
	s->closing = false;
	s->fail_counted = false;
	rc = net_connect(w->nw, (const struct sockaddr *)&ctx->sa, ctx->salen, &send_proto, s);
	if (rc < 0) {
		log_once(LOG_WARN, "send: first connect failure: %s", strerror(-rc));
		STAT_ADD(w, conn_errors, 1);
		sess_retry_or_finish(s);
	}
}

/* ---- worker hooks and timers ---- */

static void send_totals(const struct send_ctx *ctx, uint64_t *sent_r, uint64_t *acc_r)
{
	uint64_t sent = 0, acc = 0;

	for (unsigned i = 0; i < ctx->nworkers; i++) {
		sent += STAT_GET(&ctx->workers[i].st, sent);
		acc += STAT_GET(&ctx->workers[i].st, accepted);
	}
	*sent_r = sent;
	*acc_r = acc;
}

static void progress_fire(struct net_timer *t, struct net_worker *nw)
{
	struct send_worker *w = container_of(t, struct send_worker, progress);
	uint64_t sent, acc, now = clock_ns();
	double dt = (double)(now - w->progress_last_ns) * 1e-9;

	w->progress_armed = false;
	send_totals(w->ctx, &sent, &acc);
	fprintf(stderr, "\rsent %" PRIu64 "  accepted %" PRIu64 "  %.0f msgs/s   ", sent, acc,
	        dt > 0 ? (double)(acc - w->progress_last_acc) / dt : 0.0);
	fflush(stderr);
	w->progress_last_acc = acc;
	w->progress_last_ns = now;
	if (!net_worker_stopping(nw)) {
		net_timer_start(nw, &w->progress, SEND_PROGRESS_MS);
		w->progress_armed = true;
	}
}

static void hard_stop_fire(struct net_timer *t, struct net_worker *nw)
{
	struct send_worker *w = container_of(t, struct send_worker, hard_stop);

	w->hard_stop_armed = false;
	log_warn("send: time limit of %.0f s reached: stopping",
	         (double)w->ctx->hard_stop_ms / 1e3);
	ctx_stop(w->ctx);
}

static int send_worker_init(struct net_worker *nw, void *arg)
{
	struct send_ctx *ctx = arg;
	unsigned i = net_worker_index(nw);
	struct send_worker *w = &ctx->workers[i];

	w->nw = nw;
	net_worker_set_data(nw, w);
	if (i == 0) {
		w->hard_stop.fire = hard_stop_fire;
		net_timer_start(nw, &w->hard_stop, ctx->hard_stop_ms);
		w->hard_stop_armed = true;
		if (ctx->tty) {
			w->progress.fire = progress_fire;
			w->progress_last_ns = clock_ns();
			net_timer_start(nw, &w->progress, SEND_PROGRESS_MS);
			w->progress_armed = true;
		}
	}
	w->refill_ns = clock_ns();
	for (unsigned k = 0; k < w->nsess; k++)
		sess_connect(&w->sess[k]);
	return 0;
}

static void send_worker_fini(struct net_worker *nw, void *arg)
{
	struct send_worker *w = net_worker_data(nw);

	if (!w)
		return;
	if (w->progress_armed)
		net_timer_stop(nw, &w->progress);
	if (w->hard_stop_armed)
		net_timer_stop(nw, &w->hard_stop);
	if (w->rate_armed)
		net_timer_stop(nw, &w->rate_timer);
	w->progress_armed = w->hard_stop_armed = w->rate_armed = false;
	for (unsigned k = 0; k < w->nsess; k++) {
		struct sess *s = &w->sess[k];
		if (s->retry_armed)
			net_timer_stop(nw, &s->retry);
		s->retry_armed = false;
		/* a slot that never finished still holds a message it could not account */
		if (s->in_txn) {
			s->in_txn = false;
			STAT_ADD(w, rej_temp, 1);
		}
		if (s->next_claimed) {
			s->next_claimed = false;
			STAT_ADD(w, rej_temp, 1);
		}
		if (s->inflight) {
			STAT_ADD(w, rej_temp, s->inflight);
			s->inflight = 0;
		}
	}
}

/* ---- options ---- */

static void send_usage(FILE *f)
{
	fputs(
	    "usage: posthaste-bench send --server HOST:PORT --connections C\n"
	    "                            (--messages M | --duration S) --size BYTES [options]\n"
	    "  --server HOST:PORT   SMTP server to load (also [v6]:PORT)\n"
	    "  --connections C      concurrent SMTP sessions\n"
	    "  --messages M         send M messages in all, then QUIT\n"
	    "  --duration S         claim new messages for S seconds, then QUIT\n"
	    "  --size BYTES         message size incl. headers (suffix k = KiB, m = MiB)\n"
	    "  --recipients R       recipients per message (default 1)\n"
	    "  --pipelining         pipeline MAIL, RCPTs and DATA/BDAT (default: when offered)\n"
	    "  --no-pipelining      one command per round trip\n"
	    "  --bdat               BDAT size LAST instead of DATA when CHUNKING is offered\n"
	    "  --window N           with --bdat, PIPELINING and CHUNKING: up to N transactions\n"
	    "                       in flight per connection (default 1, at most 256)\n"
	    "  --rate N             at most N messages/s overall\n"
	    "  --workers W          worker threads (default min(2, CPUs), at most C)\n"
	    "  --from ADDR          envelope and header sender (default sender@example.com)\n"
	    "  --to ADDR            recipient (default user@example.com; R > 1: user1@.. userR@)\n"
	    "  --helo NAME          EHLO name (default posthaste-bench.example)\n"
	    "  --timeout SECONDS    longest wait for one reply (default 60)\n"
	    "  --tls MODE           starttls (STARTTLS after EHLO, then EHLO again) or implicit\n"
	    "                       (TLS from the connect, RFC 8314); no certificate check\n"
	    "  --tls-reuse          resume TLS sessions (per worker: the newest one)\n"
	    "  --messages-per-connection K  QUIT after K messages and connect again\n"
	    "                       (handshake-bound runs; default: no limit)\n"
	    "  --json               one JSON line with the results on stdout\n"
	    "  --ids-file FILE      append the queue id of every accepted message to FILE, one\n"
	    "                       a line (the token after \"queued as \" in the final reply,\n"
	    "                       else the whole reply text)\n"
	    "  --help               this text\n"
	    "Exit: 0 every message accepted, 1 some failed, 2 usage error.\n",
	    f);
}

static int send_usage_error(const char *fmt, ...) printf_like(1, 2);
static int send_usage_error(const char *fmt, ...)
{
	va_list ap;

	fputs("posthaste-bench send: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputs("\n(posthaste-bench send --help for usage)\n", stderr);
	return 2;
}

static bool send_parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *v_r)
{
	char *end;
	unsigned long long v;

	if (!s || *s < '0' || *s > '9')
		return false;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || *end || v < min || v > max)
		return false;
	*v_r = v;
	return true;
}

static bool send_parse_double(const char *s, double min, double max, double *v_r)
{
	char *end;
	double v;

	if (!s || !*s)
		return false;
	errno = 0;
	v = strtod(s, &end);
	if (errno || *end || !(v >= min) || !(v <= max))
		return false;
	*v_r = v;
	return true;
}

static bool send_parse_size(const char *s, size_t *v_r)
{
	char *end;
	unsigned long long v, mul = 1;

	if (!s || *s < '0' || *s > '9')
		return false;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno)
		return false;
	if (*end == 'k' || *end == 'K')
		mul = 1024, end++;
	else if (*end == 'm' || *end == 'M')
		mul = 1024 * 1024, end++;
	if (*end || v == 0 || v > (1ull << 30) / mul)
		return false;
	*v_r = (size_t)(v * mul);
	return true;
}

/* An address or name is printable ASCII without SP, <, >, and at most SEND_MAX_ADDR octets. */
static bool send_valid_token(const char *s)
{
	size_t n = strlen(s);

	if (n == 0 || n > SEND_MAX_ADDR)
		return false;
	for (size_t i = 0; i < n; i++)
		if (s[i] <= ' ' || s[i] >= 0x7f || s[i] == '<' || s[i] == '>')
			return false;
	return true;
}

enum {
	OPT_SERVER = 1000,
	OPT_CONNECTIONS,
	OPT_MESSAGES,
	OPT_DURATION,
	OPT_SIZE,
	OPT_RECIPIENTS,
	OPT_PIPELINING,
	OPT_NO_PIPELINING,
	OPT_BDAT,
	OPT_WINDOW,
	OPT_RATE,
	OPT_WORKERS,
	OPT_FROM,
	OPT_TO,
	OPT_HELO,
	OPT_TIMEOUT,
	OPT_JSON,
	OPT_IDS_FILE,
	OPT_TLS,
	OPT_TLS_REUSE,
	OPT_PER_CONN,
	OPT_HELP,
};

/* Returns 0, 2 after a usage error (reported), or -1 after --help (printed). */
static int send_parse_args(int argc, char **argv, struct send_opts *o)
{
	static const struct option longopts[] = {
	    {"server", required_argument, NULL, OPT_SERVER},
	    {"connections", required_argument, NULL, OPT_CONNECTIONS},
	    {"messages", required_argument, NULL, OPT_MESSAGES},
	    {"duration", required_argument, NULL, OPT_DURATION},
	    {"size", required_argument, NULL, OPT_SIZE},
	    {"recipients", required_argument, NULL, OPT_RECIPIENTS},
	    {"pipelining", no_argument, NULL, OPT_PIPELINING},
	    {"no-pipelining", no_argument, NULL, OPT_NO_PIPELINING},
	    {"bdat", no_argument, NULL, OPT_BDAT},
	    {"window", required_argument, NULL, OPT_WINDOW},
	    {"rate", required_argument, NULL, OPT_RATE},
	    {"workers", required_argument, NULL, OPT_WORKERS},
	    {"from", required_argument, NULL, OPT_FROM},
	    {"to", required_argument, NULL, OPT_TO},
	    {"helo", required_argument, NULL, OPT_HELO},
	    {"timeout", required_argument, NULL, OPT_TIMEOUT},
	    {"json", no_argument, NULL, OPT_JSON},
	    {"ids-file", required_argument, NULL, OPT_IDS_FILE},
	    {"tls", required_argument, NULL, OPT_TLS},
	    {"tls-reuse", no_argument, NULL, OPT_TLS_REUSE},
	    {"messages-per-connection", required_argument, NULL, OPT_PER_CONN},
	    {"help", no_argument, NULL, OPT_HELP},
	    {NULL, 0, NULL, 0},
	};
	bool have_server = false, have_conns = false, have_size = false, have_duration = false;
	uint64_t v;
	int opt;

	memset(o, 0, sizeof(*o));
	o->recipients = 1;
	o->timeout_s = 60;
	o->pipelining = -1;
	o->window = 1;
	o->from = "sender@example.com";
	o->to = "user@example.com";
	o->helo = "posthaste-bench.example";

	optind = 1;
	opterr = 0;
	while ((opt = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (opt) {
		case OPT_SERVER: {
			const char *arg = optarg;
			if (bench_parse_hostport(arg, o->host, sizeof(o->host), &o->port) < 0 ||
			    o->port == 0)
				return send_usage_error("--server: expected HOST:PORT, got \"%s\"",
				                        arg);
			if (arg[0] == ':') /* ":PORT" means this host */
				snprintf(o->host, sizeof(o->host), "127.0.0.1");
			have_server = true;
			break;
		}
		case OPT_CONNECTIONS:
			if (!send_parse_u64(optarg, 1, 1000000, &v))
				return send_usage_error(
				    "--connections: expected 1..1000000, got \"%s\"", optarg);
			o->connections = (unsigned)v;
			have_conns = true;
			break;
		case OPT_MESSAGES:
			if (!send_parse_u64(optarg, 1, UINT64_MAX / 2, &v))
				return send_usage_error(
				    "--messages: expected a positive count, got \"%s\"", optarg);
			o->messages = v;
			break;
		case OPT_DURATION:
			if (!send_parse_double(optarg, 0.001, 1e7, &o->duration_s))
				return send_usage_error(
				    "--duration: expected seconds > 0, got \"%s\"", optarg);
			have_duration = true;
			break;
		case OPT_SIZE:
			if (!send_parse_size(optarg, &o->size))
				return send_usage_error(
				    "--size: expected 1 .. 1 GiB (suffix k or m), got \"%s\"",
				    optarg);
			have_size = true;
			break;
		case OPT_RECIPIENTS:
			if (!send_parse_u64(optarg, 1, SEND_MAX_RCPTS, &v))
				return send_usage_error("--recipients: expected 1..%u, got \"%s\"",
				                        SEND_MAX_RCPTS, optarg);
			o->recipients = (unsigned)v;
			break;
		case OPT_PIPELINING:
			o->pipelining = 1;
			break;
		case OPT_NO_PIPELINING:
			o->pipelining = 0;
			break;
		case OPT_BDAT:
			o->bdat = true;
			break;
		case OPT_WINDOW:
			if (!send_parse_u64(optarg, 1, SEND_MAX_WINDOW, &v))
				return send_usage_error("--window: expected 1..%u, got \"%s\"",
				                        SEND_MAX_WINDOW, optarg);
			o->window = (unsigned)v;
			break;
		case OPT_RATE:
			if (!send_parse_double(optarg, 0.001, 1e9, &o->rate))
				return send_usage_error(
				    "--rate: expected messages/s > 0, got \"%s\"", optarg);
			break;
		case OPT_WORKERS:
			if (!send_parse_u64(optarg, 1, 1024, &v))
				return send_usage_error("--workers: expected 1..1024, got \"%s\"",
				                        optarg);
			o->workers = (unsigned)v;
			break;
		case OPT_FROM:
			o->from = optarg;
			break;
		case OPT_TO:
			o->to = optarg;
			break;
		case OPT_HELO:
			o->helo = optarg;
			break;
		case OPT_TIMEOUT:
			if (!send_parse_double(optarg, 0.001, 86400, &o->timeout_s))
				return send_usage_error(
				    "--timeout: expected seconds > 0, got \"%s\"", optarg);
			break;
		case OPT_JSON:
			o->json = true;
			break;
		case OPT_IDS_FILE:
			if (!*optarg)
				return send_usage_error("--ids-file: expected a file name");
			o->ids_file = optarg;
			break;
		case OPT_TLS:
			if (!strcmp(optarg, "starttls"))
				o->tls = SEND_TLS_STARTTLS;
			else if (!strcmp(optarg, "implicit"))
				o->tls = SEND_TLS_IMPLICIT;
			else if (!strcmp(optarg, "none"))
				o->tls = SEND_TLS_NONE;
			else
				return send_usage_error("--tls: expected starttls or implicit, got \"%s\"",
				                        optarg);
			break;
		case OPT_TLS_REUSE:
			o->tls_reuse = true;
			break;
		case OPT_PER_CONN:
			if (!send_parse_u64(optarg, 1, UINT64_MAX / 2, &v))
				return send_usage_error(
				    "--messages-per-connection: expected a count >= 1, got \"%s\"",
				    optarg);
			o->per_conn = v;
			break;
		case OPT_HELP:
			send_usage(stdout);
			return -1;
		default:
			if (optopt)
				return send_usage_error("option %s needs an argument or is unknown",
				                        argv[optind - 1]);
			return send_usage_error("unknown option \"%s\"", argv[optind - 1]);
		}
	}
	if (optind < argc)
		return send_usage_error("unexpected argument \"%s\"", argv[optind]);
	if (!have_server)
		return send_usage_error("--server HOST:PORT is required");
	if (!have_conns)
		return send_usage_error("--connections C is required");
	if (!have_size)
		return send_usage_error("--size BYTES is required");
	if (!o->messages == !have_duration)
		return send_usage_error("exactly one of --messages M and --duration S is required");
	if (!send_valid_token(o->from) || !strchr(o->from, '@'))
		return send_usage_error("--from: expected a plain address like a@example.com");
	if (!send_valid_token(o->to) || !strchr(o->to, '@') || strchr(o->to, '@') == o->to)
		return send_usage_error("--to: expected a plain address like user@example.com");
	if (!send_valid_token(o->helo) || strlen(o->helo) > 200)
		return send_usage_error("--helo: expected a host name");
	if (o->window > 1 && (!o->bdat || o->pipelining == 0)) {
		log_warn("send: --window needs --bdat and pipelining: using --window 1");
		o->window = 1;
	}
	return 0;
}

/* ---- building the commands and the message ---- */

static char *send_sprintf(size_t *len_r, const char *fmt, ...) printf_like(2, 3);
static char *send_sprintf(size_t *len_r, const char *fmt, ...)
{
	va_list ap;
	char *s;
	int n;

	va_start(ap, fmt);
	n = vasprintf(&s, fmt, ap);
	va_end(ap);
	if (n < 0)
		return NULL;
	if (len_r)
		*len_r = (size_t)n;
	return s;
}

static int send_build(struct send_ctx *ctx)
{
	const struct send_opts *o = &ctx->o;
	const char *at = strrchr(o->to, '@');
	size_t local_len = (size_t)(at - o->to), cap, off, fixed_len, body, full, rem, i;
	static const char alphabet[] =
	    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
	char *fixed, *first_rcpt, sample[SEND_HDR_MAX];
	struct send_worker tmp = {.ctx = ctx};

	/* commands */
	cap = 32 + strlen(o->from) + (size_t)o->recipients * (32 + strlen(o->to)) + 8;
	ctx->cmds = malloc(cap);
	ctx->rcpt_off = calloc(o->recipients + 1, sizeof(*ctx->rcpt_off));
	if (!ctx->cmds || !ctx->rcpt_off)
		return -ENOMEM;
	off = (size_t)snprintf(ctx->cmds, cap, "MAIL FROM:<%s>\r\n", o->from);
	for (i = 0; i < o->recipients; i++) {
		ctx->rcpt_off[i] = off;
		if (o->recipients == 1)
			off +=
			    (size_t)snprintf(ctx->cmds + off, cap - off, "RCPT TO:<%s>\r\n", o->to);
		else
			off +=
			    (size_t)snprintf(ctx->cmds + off, cap - off, "RCPT TO:<%.*s%zu%s>\r\n",
			                     (int)local_len, o->to, i + 1, at);
	}
	ctx->rcpt_off[o->recipients] = off;
	ctx->data_off = off;
	off += (size_t)snprintf(ctx->cmds + off, cap - off, "DATA\r\n");
	ctx->cmds_len = off;
	if (off >= cap)
		panic("send: command block overflow");
	ctx->win_copy_cmds = ctx->data_off <= SEND_WIN_CMDS_MAX;

	ctx->ehlo = send_sprintf(&ctx->ehlo_len, "EHLO %s\r\n", o->helo);
	ctx->helo = send_sprintf(&ctx->helo_len, "HELO %s\r\n", o->helo);
	if (o->recipients == 1)
		first_rcpt = send_sprintf(NULL, "%s", o->to);
	else
		first_rcpt = send_sprintf(NULL, "%.*s1%s", (int)local_len, o->to, at);
	if (!ctx->ehlo || !ctx->helo || !first_rcpt)
		return -ENOMEM;
	fixed =
	    send_sprintf(&fixed_len,
	                 "From: <%s>\r\nTo: <%s>\r\nSubject: posthaste-bench test message\r\n"
	                 "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n",
	                 o->from, first_rcpt);
	free(first_rcpt);
	if (!fixed)
		return -ENOMEM;

	/* the per-message header has a constant length */
	ctx->hdr_len = send_format_header(&tmp, sample, sizeof(sample), 0);

	/* body: 76-character lines filling the message to --size; no line starts with "." */
	body = o->size > ctx->hdr_len + fixed_len ? o->size - ctx->hdr_len - fixed_len : 0;
	full = body / (SEND_LINE_CHARS + 2);
	rem = body % (SEND_LINE_CHARS + 2);
	if (rem == 1 && full == 0)
		rem = 2; /* one octet cannot make a line: one octet over */
	ctx->msg = malloc(fixed_len + body + 8);
	if (!ctx->msg) {
		free(fixed);
		return -ENOMEM;
	}
	memcpy(ctx->msg, fixed, fixed_len);
	free(fixed);
	off = fixed_len;
	for (i = 0; i < full; i++) {
		size_t n = SEND_LINE_CHARS + (rem == 1 && i == 0 ? 1 : 0);
		for (size_t k = 0; k < n; k++)
			ctx->msg[off + k] = alphabet[(i + k) % (sizeof(alphabet) - 1)];
		off += n;
		ctx->msg[off++] = '\r';
		ctx->msg[off++] = '\n';
	}
	if (rem >= 2) {
		for (size_t k = 0; k < rem - 2; k++)
			ctx->msg[off + k] = alphabet[(full + k) % (sizeof(alphabet) - 1)];
		off += rem - 2;
		ctx->msg[off++] = '\r';
		ctx->msg[off++] = '\n';
	}
	ctx->msg_len = off;
	memcpy(ctx->msg + off, ".\r\n", 3);
	return 0;
}

static int send_resolve(struct send_ctx *ctx)
{
	struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
	struct addrinfo *res;
	char port[8];
	int rc;

	snprintf(port, sizeof(port), "%u", ctx->o.port);
	rc = getaddrinfo(ctx->o.host, port, &hints, &res);
	if (rc != 0) {
		fprintf(stderr, "posthaste-bench send: %s: %s\n", ctx->o.host, gai_strerror(rc));
		return -1;
	}
	memcpy(&ctx->sa, res->ai_addr, res->ai_addrlen);
	ctx->salen = res->ai_addrlen;
	freeaddrinfo(res);
	return 0;
}

/* ---- results ---- */

struct send_result {
	struct send_stats st; /* plain sums (read after the workers stopped) */
	struct histogram *hist;
	double elapsed_s;
};

static void send_collect(struct send_ctx *ctx, struct send_result *r)
{
	uint64_t end = atomic_load(&ctx->end_ns);

	memset(&r->st, 0, sizeof(r->st));
	for (unsigned i = 0; i < ctx->nworkers; i++) {
		struct send_stats *s = &ctx->workers[i].st;
#define SUM(f) atomic_store(&r->st.f, atomic_load(&r->st.f) + atomic_load(&s->f))
		SUM(sent);
		SUM(accepted);
		SUM(rej_temp);
		SUM(rej_perm);
		SUM(rcpt_ok);
		SUM(rcpt_rej);
		SUM(conns);
		SUM(conn_errors);
		SUM(bytes);
		SUM(tls_ok);
		SUM(tls_resumed);
#undef SUM
		histogram_merge(r->hist, ctx->workers[i].hist);
	}
	if (!end)
		end = clock_ns();
	r->elapsed_s = (double)(end - ctx->start_ns) * 1e-9;
}

static double ms_of(uint64_t ns)
{
	return (double)ns / 1e6;
}

static void send_report(const struct send_ctx *ctx, const struct send_result *r)
{
	const struct send_opts *o = &ctx->o;
	const struct send_stats *st = &r->st;
	double el = r->elapsed_s > 0 ? r->elapsed_s : 1e-9;
	uint64_t acc = STAT_GET(st, accepted);
	double rate = (double)acc / el;
	double mbs = (double)STAT_GET(st, bytes) / el / 1e6;
	const struct histogram *h = r->hist;

	if (o->json) {
		printf("{\"sent\":%" PRIu64 ",\"accepted\":%" PRIu64 ",\"rejected_temp\":%" PRIu64
		       ",\"rejected_perm\":%" PRIu64 ",\"recipients_accepted\":%" PRIu64
		       ",\"recipients_rejected\":%" PRIu64 ",\"connections\":%" PRIu64
		       ",\"connect_errors\":%" PRIu64 ",\"bytes\":%" PRIu64
		       ",\"tls_handshakes\":%" PRIu64 ",\"tls_resumed\":%" PRIu64
		       ",\"elapsed_s\":%.3f,\"msgs_per_s\":%.1f,\"latency_ms\":{\"p50\":%.3f,"
		       "\"p90\":%.3f,\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f}}\n",
		       STAT_GET(st, sent), acc, STAT_GET(st, rej_temp), STAT_GET(st, rej_perm),
		       STAT_GET(st, rcpt_ok), STAT_GET(st, rcpt_rej), STAT_GET(st, conns),
		       STAT_GET(st, conn_errors), STAT_GET(st, bytes), STAT_GET(st, tls_ok),
		       STAT_GET(st, tls_resumed), r->elapsed_s, rate,
		       ms_of(histogram_percentile(h, 50)), ms_of(histogram_percentile(h, 90)),
		       ms_of(histogram_percentile(h, 99)), ms_of(histogram_percentile(h, 99.9)),
		       ms_of(histogram_max(h)));
		return;
	}
	printf("posthaste-bench send: %s port %u, %u connections, %u workers, %zu-octet messages, "
	       "%u recipient%s\n",
	       o->host, o->port, o->connections, ctx->nworkers, o->size, o->recipients,
	       o->recipients == 1 ? "" : "s");
	printf("messages     sent %" PRIu64 "  accepted %" PRIu64 "  rejected %" PRIu64
	       " (temporary %" PRIu64 ", permanent %" PRIu64 ")\n",
	       STAT_GET(st, sent), acc, STAT_GET(st, rej_temp) + STAT_GET(st, rej_perm),
	       STAT_GET(st, rej_temp), STAT_GET(st, rej_perm));
	printf("recipients   accepted %" PRIu64 "  rejected %" PRIu64 "\n", STAT_GET(st, rcpt_ok),
	       STAT_GET(st, rcpt_rej));
	printf("connections  opened %" PRIu64 "  failed %" PRIu64 "\n", STAT_GET(st, conns),
	       STAT_GET(st, conn_errors));
	if (o->tls)
		printf("tls          handshakes %" PRIu64 "  resumed %" PRIu64 "\n",
		       STAT_GET(st, tls_ok), STAT_GET(st, tls_resumed));
	printf("elapsed      %.3f s  %.1f msgs/s  %.2f MB/s\n", r->elapsed_s, rate, mbs);
	printf("latency ms   p50 %.3f  p90 %.3f  p99 %.3f  p99.9 %.3f  max %.3f\n",
	       ms_of(histogram_percentile(h, 50)), ms_of(histogram_percentile(h, 90)),
	       ms_of(histogram_percentile(h, 99)), ms_of(histogram_percentile(h, 99.9)),
	       ms_of(histogram_max(h)));
}

/* ---- main ---- */

static void send_ctx_free(struct send_ctx *ctx)
{
	if (ctx->workers) {
		for (unsigned i = 0; i < ctx->nworkers; i++) {
			struct send_worker *w = &ctx->workers[i];
			for (unsigned k = 0; w->sess && k < w->nsess; k++)
				smtp_reply_parser_deinit(&w->sess[k].parser);
			free(w->sess);
			free(w->ring);
			histogram_free(&w->hist);
		}
		free(ctx->workers);
	}
	net_engine_free(&ctx->engine);
	tls_ctx_free(&ctx->tls);
	if (ctx->ids_fd >= 0)
		close(ctx->ids_fd);
	free(ctx->cmds);
	free(ctx->rcpt_off);
	free(ctx->ehlo);
	free(ctx->helo);
	free(ctx->msg);
}

static unsigned next_pow2(unsigned v)
{
	unsigned p = 1;
	while (p < v)
		p <<= 1;
	return p;
}

int send_main(int argc, char **argv)
{
	struct send_ctx ctx_store, *ctx = &ctx_store;
	struct net_worker_hooks hooks;
	struct send_result res = {0};
	struct net_config cfg;
	long cpus;
	unsigned per;
	int rc, status = 1;

	memset(ctx, 0, sizeof(*ctx));
	ctx->ids_fd = -1;
	rc = send_parse_args(argc, argv, &ctx->o);
	if (rc)
		return rc < 0 ? 0 : rc;
	if (send_resolve(ctx) < 0)
		return 2;
	if (ctx->o.ids_file) {
		ctx->ids_fd = open(ctx->o.ids_file, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
		if (ctx->ids_fd < 0) {
			fprintf(stderr, "posthaste-bench send: --ids-file: cannot open %s: %s\n",
			        ctx->o.ids_file, strerror(errno));
			return 2;
		}
	}

	cpus = sysconf(_SC_NPROCESSORS_ONLN);
	ctx->nworkers = ctx->o.workers ? ctx->o.workers : (unsigned)MIN(MAX(cpus, 1L), 2L);
	ctx->nworkers = MIN(ctx->nworkers, ctx->o.connections);
	ctx->timeout_ms = (uint64_t)ceil(ctx->o.timeout_s * 1000.0);
	ctx->tty = isatty(STDERR_FILENO);
	ctx->nonce = (uint32_t)(clock_ns() ^ ((uint64_t)getpid() << 16));
	if (send_build(ctx) < 0) {
		fprintf(stderr, "posthaste-bench send: out of memory\n");
		goto out;
	}
	if (ctx->o.tls) {
		char terr[256];
		ctx->tls = tls_ctx_new_client(TLS_VERIFY_NONE, NULL, NULL, terr, sizeof(terr));
		if (!ctx->tls) {
			fprintf(stderr, "posthaste-bench send: --tls: %s\n", terr);
			goto out;
		}
	}

	/* Generous outer bound so the run always ends by itself. */
	if (ctx->o.messages) {
		double floor_rate = ctx->o.rate > 0 ? MIN(ctx->o.rate / 2, 100.0) : 100.0;
		ctx->hard_stop_ms = (uint64_t)((60.0 + 3 * ctx->o.timeout_s +
		                                (double)ctx->o.messages / floor_rate) *
		                               1000.0);
	} else {
		ctx->hard_stop_ms = (uint64_t)((ctx->o.duration_s + ctx->o.timeout_s) * 1000.0);
	}

	ctx->workers = aligned_alloc(CACHELINE, sizeof(*ctx->workers) * ctx->nworkers);
	if (!ctx->workers) {
		fprintf(stderr, "posthaste-bench send: out of memory\n");
		goto out;
	}
	memset(ctx->workers, 0, sizeof(*ctx->workers) * ctx->nworkers);
	for (unsigned i = 0; i < ctx->nworkers; i++) {
		struct send_worker *w = &ctx->workers[i];
		w->ctx = ctx;
		w->index = i;
		w->nsess = ctx->o.connections / ctx->nworkers +
		           (i < ctx->o.connections % ctx->nworkers ? 1 : 0);
		w->live = w->nsess;
		w->sess = calloc(w->nsess, sizeof(*w->sess));
		w->hist = histogram_new();
		if (ctx->o.window > 1)
			w->ring = calloc((size_t)w->nsess * ctx->o.window, sizeof(*w->ring));
		if (!w->sess || !w->hist || (ctx->o.window > 1 && !w->ring)) {
			fprintf(stderr, "posthaste-bench send: out of memory\n");
			goto out;
		}
		for (unsigned k = 0; k < w->nsess; k++) {
			w->sess[k].w = w;
			w->sess[k].window = 1;
			if (w->ring)
				w->sess[k].ring = w->ring + (size_t)k * ctx->o.window;
			if (smtp_reply_parser_init(&w->sess[k].parser, NULL) < 0) {
				fprintf(stderr, "posthaste-bench send: out of memory\n");
				goto out;
			}
		}
		if (ctx->o.rate > 0) {
			w->share = ctx->o.rate / ctx->nworkers;
			w->burst = MAX(1.0, w->share / 50.0);
			w->tokens = 1.0;
		}
	}
	atomic_store(&ctx->live_workers, ctx->nworkers);

	per = (ctx->o.connections + ctx->nworkers - 1) / ctx->nworkers;
	net_config_default(&cfg);
	cfg.workers = ctx->nworkers;
	cfg.pin = false; /* a load generator shares the host with the server under test */
	cfg.max_conns = per + 16;
	cfg.buf_count = MIN(next_pow2(MAX(per * 4, 256u)), 4096u);
	if (cfg.out_high_water < ctx->o.size + ctx->hdr_len + 65536)
		cfg.out_high_water = ctx->o.size + ctx->hdr_len + 65536;
	/* a full window is queued at once: never refused, nor pausing the reading of its replies */
	if (ctx->o.window > 1) {
		size_t txn = ctx->o.size + ctx->hdr_len + ctx->cmds_len + 64;
		if (cfg.out_high_water < ctx->o.window * txn + 65536)
			cfg.out_high_water = ctx->o.window * txn + 65536;
	}
	hooks = (struct net_worker_hooks){
	    .init = send_worker_init,
	    .fini = send_worker_fini,
	    .arg = ctx,
	};
	ctx->engine = net_engine_new(&cfg, &hooks);
	if (!ctx->engine) {
		fprintf(stderr, "posthaste-bench send: cannot create the engine: %s\n",
		        strerror(errno));
		goto out;
	}
	ctx->start_ns = clock_ns();
	ctx->deadline_ms = clock_ms() + (uint64_t)(ctx->o.duration_s * 1000.0);
	rc = net_engine_run(ctx->engine);
	if (rc < 0) {
		fprintf(stderr, "posthaste-bench send: engine failed: %s\n", strerror(-rc));
		goto out;
	}
	if (ctx->tty)
		fputs("\r\033[K", stderr);

	res.hist = histogram_new();
	if (!res.hist) {
		fprintf(stderr, "posthaste-bench send: out of memory\n");
		goto out;
	}
	send_collect(ctx, &res);
	send_report(ctx, &res);
	fflush(stdout);
	{
		uint64_t acc = STAT_GET(&res.st, accepted);
		bool failed = STAT_GET(&res.st, rej_temp) + STAT_GET(&res.st, rej_perm) > 0 ||
		              acc == 0 || (ctx->o.messages && acc < ctx->o.messages);
		status = failed ? 1 : 0;
	}
out:
	histogram_free(&res.hist);
	send_ctx_free(ctx);
	return status;
}
