/*
 * posthaste: the relay daemon. Accepts mail over SMTP, makes every message
 * durable in the spool before it says 250, and delivers it (mta/relay): to
 * the recipients' MX hosts, a route or the smarthost, or a local Maildir.
 *
 *   posthaste [--config FILE] [--listen HOST:PORT]... [--spool DIR]
 *             [--durability fsync|batch|none] [--workers N] [--hostname NAME]
 *             [--discard] [--log-level LEVEL] [--check-config]
 *
 * With no file and no flags it runs on embedded defaults: 127.0.0.1:2525,
 * spool ./var/spool, fsync durability. `posthaste queue ...` changes the
 * running daemon's queue over its control socket (control.h).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/compiler.h"
#include "core/log.h"
#include "mta/posthaste/config.h"
#include "mta/posthaste/control.h"
#include "mta/posthaste/queue_cmd.h"
#include "mta/posthaste/user_cmd.h"
#include "mta/local/authpool.h"
#include "mta/local/users.h"
#include "mta/relay/relay.h"
#include "mta/smtp/anvil.h"
#include "mta/smtp/smtp_server.h"
#include "net/net.h"
#include "queue/spool.h"
#include "tls/tls.h"

/* Per worker: the glue between the SMTP server's message sink and the spool. */
struct ph_worker {
	const struct ph_config *cfg;
	const struct ph_net *nets; /* mynetworks */
	const struct users *users; /* local users, or NULL */
	unsigned nnets;
	struct spool_worker *sw;
	struct relay_worker *rw; /* NULL without delivery */
	struct relay *relay;
	struct anvil *anvil; /* per-client limits, shared; NULL when none is set */
	const char *hostname;
	struct authpool *authpool; /* AUTH's password checks; NULL when AUTH is not offered */
	unsigned index;
	uint64_t auth_busy_log_ms; /* when "queue full" was last logged */
} cache_aligned;

struct ph_ctx {
	struct ph_config cfg;
	char hostname[256]; /* ours, for the Received: header */
	struct spool *spool;
	struct smtp_server *srv;
	struct relay *relay;
	struct users *users;
	struct ph_net nets[64];
	unsigned nnets;
	struct ph_worker *workers;
	struct ph_control *control; /* the control socket */
	struct tls_ctx *tls;        /* the server's certificate (tls_cert), or NULL */
	struct anvil *anvil;        /* per-client limits (client_*), or NULL */
	struct authpool *authpool;  /* the AUTH hashing threads, or NULL */
};

/* One SMTP transaction on its way into the spool. */
struct ph_txn {
	struct spool_txn *t;
	struct smtp_session *s;
	struct ph_worker *pw;
	const char *hostname;
	/* for the accounting log's reception line */
	char msgid[200];
	size_t msgid_len;
	char sender[256];
	size_t sender_len;
	unsigned nrcpts;
	uint64_t size;
	char peer[48];
};

/*
 * The trace header every relay prepends (RFC 5321 4.4):
 *   Received: from HELO ([ADDR])
 *           by HOST (Posthaste) with ESMTP id QUEUEID
 *           for <RCPT>; DATE
 * "for" only with a single recipient (more would disclose the others). Over
 * TLS the protocol is ESMTPS (ESMTPSA after AUTH, RFC 3848) followed by
 * "(version=TLSv1.3 cipher=... bits=128)".
 */
static size_t received_header(char *buf, size_t size, const struct smtp_envelope *env,
			      const char *peer, const char *hostname, uint64_t id)
{
	char qid[17], date[64];
	spool_id_format(id, qid);
	time_t now = time(NULL);
	struct tm tm;
	localtime_r(&now, &tm);
	strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S %z", &tm);
	/* RFC 3848 / RFC 6531: ESMTP[S][A], UTF8SMTP[S][A] */
	char proto[16], tls[160] = "";
	snprintf(proto, sizeof(proto), "%s%s%s",
		 env->smtputf8			 ? "UTF8SMTP"
		 : env->esmtp || env->tls_version ? "ESMTP"
						  : "SMTP",
		 env->tls_version ? "S" : "", env->auth_user ? "A" : "");
	if (env->tls_version)
		snprintf(tls, sizeof(tls), " (version=%s cipher=%s bits=%d)", env->tls_version,
			 env->tls_cipher ? env->tls_cipher : "unknown", env->tls_bits);
	/* the HELO name is the client's text: no control characters reach the header */
	char helo[201];
	size_t hl = 0;
	for (const char *h = env->helo ? env->helo : ""; *h && hl < sizeof(helo) - 1; h++)
		helo[hl++] = (unsigned char)*h < 0x20 || *h == 0x7f ? '?' : *h;
	helo[hl] = '\0';
	int n;
	if (env->nrcpts == 1)
		n = snprintf(buf, size,
			     "Received: from %s ([%s])\r\n\tby %s (Posthaste) with %s%s id %s\r\n"
			     "\tfor <%.300s>; %s\r\n",
			     hl ? helo : "unknown", peer, hostname, proto, tls, qid,
			     env->rcpts[0].addr, date);
	else
		n = snprintf(buf, size,
			     "Received: from %s ([%s])\r\n\tby %s (Posthaste) with %s%s id %s;\r\n"
			     "\t%s\r\n",
			     hl ? helo : "unknown", peer, hostname, proto, tls, qid, date);
	return n < 0 ? 0 : MIN((size_t)n, size - 1);
}

static int sink_begin(void *ctx, struct smtp_session *s, void **txn_r)
{
	struct ph_worker *pw = ctx;
	struct ph_txn *x = malloc(sizeof(*x));
	if (!x)
		return -ENOMEM;
	x->t = spool_txn_begin(pw->sw);
	if (!x->t) {
		int err = errno;
		free(x);
		return -err;
	}
	x->s = s;
	x->pw = pw;
	x->hostname = pw->hostname;
	*txn_r = x;
	return 0;
}

static int sink_body(void *txn, const char *data, size_t len)
{
	struct ph_txn *x = txn;
	return spool_txn_append(x->t, data, len);
}

static void sink_done(void *arg, int res, uint64_t id)
{
	struct ph_txn *x = arg;
	struct smtp_txn_result r = {.code = 250, .enhanced = "2.0.0"};
	if (res == 0) {
		char qid[17];
		spool_id_format(id, qid);
		snprintf(r.text, sizeof(r.text), "Ok: queued as %s", qid);
		if (x->pw->rw)
			relay_log_reception(x->pw->rw, id, x->msgid, x->msgid_len, x->sender,
					    x->sender_len, x->nrcpts, x->size, x->peer);
	} else if (res == -ENOSPC || res == -EDQUOT) {
		r.code = 452;
		r.enhanced = "4.3.1";
		snprintf(r.text, sizeof(r.text), "Error: insufficient system storage, try again later");
	} else {
		r.code = 451;
		r.enhanced = "4.3.0";
		snprintf(r.text, sizeof(r.text), "Error: queue file write error, try again later");
	}
	smtp_session_txn_done(x->s, &r);
	free(x);
}

static int sink_end(void *txn, const struct smtp_envelope *env, struct smtp_txn_result *res)
{
	struct ph_txn *x = txn;
	enum { STACK_RCPTS = 32 };
	const char *addr_s[STACK_RCPTS], *orcpt_s[STACK_RCPTS];
	size_t len_s[STACK_RCPTS];
	unsigned char notify_s[STACK_RCPTS];
	const char **addrs = addr_s, **orcpts = orcpt_s;
	size_t *lens = len_s;
	unsigned char *notify = notify_s;
	void *heap = NULL;
	if (env->nrcpts > STACK_RCPTS) {
		size_t n = env->nrcpts;
		heap = malloc(n * (2 * sizeof(char *) + sizeof(size_t) + 1));
		if (!heap) {
			spool_txn_abort(x->t);
			free(x);
			res->code = 451;
			res->enhanced = "4.3.0";
			snprintf(res->text, sizeof(res->text), "Error: out of memory, try again later");
			return 1;
		}
		addrs = heap;
		orcpts = addrs + n;
		lens = (size_t *)(orcpts + n);
		notify = (unsigned char *)(lens + n);
	}
	for (unsigned i = 0; i < env->nrcpts; i++) {
		addrs[i] = env->rcpts[i].addr;
		lens[i] = env->rcpts[i].len;
		notify[i] = (unsigned char)env->rcpts[i].notify;
		orcpts[i] = env->rcpts[i].orcpt;
	}
	char peer[INET6_ADDRSTRLEN] = "";
	if (env->peer && env->peer->ss_family == AF_INET)
		inet_ntop(AF_INET, &((const struct sockaddr_in *)env->peer)->sin_addr, peer,
			  sizeof(peer));
	else if (env->peer && env->peer->ss_family == AF_INET6)
		inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)env->peer)->sin6_addr, peer,
			  sizeof(peer));
	uint16_t flags = 0;
	flags |= env->smtputf8 ? SPOOL_ENV_SMTPUTF8 : 0;
	flags |= env->body == SMTP_BODY_8BITMIME ? SPOOL_ENV_8BITMIME : 0;
	flags |= env->ret == SMTP_RET_FULL ? SPOOL_ENV_RET_FULL : 0;
	flags |= env->ret == SMTP_RET_HDRS ? SPOOL_ENV_RET_HDRS : 0;
	flags |= env->chunked ? SPOOL_ENV_CHUNKED : 0;
	flags |= env->esmtp ? SPOOL_ENV_ESMTP : 0;
	struct spool_envelope se = {
		.sender = env->sender,
		.sender_len = env->sender_len,
		.helo = env->helo,
		.peer = peer,
		.envid = env->envid,
		.rcpts = addrs,
		.rcpt_lens = lens,
		.rcpt_notify = notify,
		.rcpt_orcpt = orcpts,
		.nrcpts = env->nrcpts,
		.body_size = env->size,
		.flags = flags,
	};
	struct spool_txn *t = x->t;
	x->t = NULL;
	if (x->pw->rw) {
		struct iovec head[4];
		unsigned nh = spool_txn_body_iov(t, head, 4);
		x->msgid_len = relay_find_message_id(head, nh, x->msgid, sizeof(x->msgid));
		x->sender_len = MIN(env->sender_len, sizeof(x->sender));
		memcpy(x->sender, env->sender, x->sender_len);
		x->nrcpts = env->nrcpts;
		x->size = env->size;
		snprintf(x->peer, sizeof(x->peer), "%s", peer);
	}
	char trace[1024];
	size_t tlen = received_header(trace, sizeof(trace), env, peer, x->hostname,
				      spool_txn_id(t));
	if (spool_txn_prepend(t, trace, tlen) < 0) {
		spool_txn_abort(t);
		free(heap);
		free(x);
		res->code = 451;
		res->enhanced = "4.3.0";
		snprintf(res->text, sizeof(res->text), "Error: out of memory, try again later");
		return 1;
	}
	spool_txn_commit(t, &se, sink_done, x); /* copies what it keeps */
	free(heap);
	return 0; /* the answer comes from sink_done, after the group commit */
}

static void sink_abort(void *txn)
{
	struct ph_txn *x = txn;
	spool_txn_abort(x->t);
	free(x);
}

/*
 * The RCPT-time policy. Never an open relay: a client in mynetworks or an
 * authenticated one may send anywhere; any other client only to local_domains
 * and relay_domains (550 5.7.1). Local domains: unknown users are refused here (550 5.1.1), not
 * bounced later.
 */
static unsigned sink_rcpt_check(void *ctx, struct smtp_session *s, const char *addr, size_t len,
				char *text, size_t cap)
{
	struct ph_worker *pw = ctx;
	const struct ph_config *cfg = pw->cfg;
	const char *at = memrchr(addr, '@', len);
	const char *dom = at ? at + 1 : "";
	size_t dl = at ? (size_t)(addr + len - at - 1) : 0;
	bool local = dl && ph_config_is_local(cfg, dom, dl);
	if (!local && !(dl && ph_config_is_relay_domain(cfg, dom, dl)) &&
	    !smtp_session_auth_user(s) &&
	    !ph_networks_match(pw->nets, pw->nnets, net_conn_peer(smtp_session_conn(s)))) {
		snprintf(text, cap, "5.7.1 <%.*s>: Relay access denied", (int)MIN(len, (size_t)256),
			 addr);
		return 550;
	}
	if (!local || !pw->users)
		return 0;
	if (users_find(pw->users, addr, len, USERS_DELIM_DEFAULT))
		return 0;
	snprintf(text, cap, "5.1.1 <%.*s>: Recipient address rejected: User unknown",
		 (int)MIN(len, (size_t)256), addr);
	return 550;
}

/* The client's address as text ("192.0.2.7", "2001:db8::1"), "unknown" for other families. */
static void peer_text(const struct sockaddr_storage *ss, char *buf, size_t len)
{
	const void *a = NULL;
	if (ss && ss->ss_family == AF_INET)
		a = &((const struct sockaddr_in *)ss)->sin_addr;
	else if (ss && ss->ss_family == AF_INET6)
		a = &((const struct sockaddr_in6 *)ss)->sin6_addr;
	if (!a || !inet_ntop(ss->ss_family, a, buf, (socklen_t)len))
		snprintf(buf, len, "unknown");
}

/* Whether the per-client limits apply to this client (client_limit_exempt_mynetworks). */
static bool client_limited(const struct ph_worker *pw, const struct sockaddr_storage *peer)
{
	return pw->anvil && !(pw->cfg->client_limit_exempt_mynetworks &&
			      ph_networks_match(pw->nets, pw->nnets, peer));
}

/*
 * Admission: the client's open connections and connection rate
 * (client_connection_limit, client_connection_rate), counted across all
 * workers in the shared table. 421 like Postfix's smtpd.
 */
static unsigned sink_connect_check(void *ctx, struct smtp_session *s, char *text, size_t cap)
{
	struct ph_worker *pw = ctx;
	struct net_conn *c = smtp_session_conn(s);
	const struct sockaddr_storage *peer = net_conn_peer(c);
	if (!client_limited(pw, peer))
		return 0;
	uint32_t ticket;
	enum anvil_result r =
		anvil_connect(pw->anvil, peer, net_worker_now_ms(net_conn_worker(c)), &ticket);
	if (r == ANVIL_OK) {
		smtp_session_set_sink_data(s, ticket);
		return 0;
	}
	char a[INET6_ADDRSTRLEN];
	peer_text(peer, a, sizeof(a));
	log_info("posthaste: connection from %s refused: %s", a,
		 r == ANVIL_CONN_LIMIT ? "client_connection_limit" : "client_connection_rate");
	snprintf(text, cap, "4.7.0 %s Error: too many connections from %s", pw->hostname, a);
	return 421;
}

static void sink_connect_end(void *ctx, struct smtp_session *s)
{
	struct ph_worker *pw = ctx;
	if (pw->anvil)
		anvil_disconnect(pw->anvil, (uint32_t)smtp_session_sink_data(s));
}

/*
 * The MAIL-time policy. An authenticated user may send only as its own
 * address, an alias, or either with a +subaddress (smtp_sender_login_check;
 * the null sender is allowed: bounces and MDNs use it); then the client's
 * message rate (client_message_rate; 450 4.7.1 like Postfix's smtpd).
 */
static unsigned sink_mail_check(void *ctx, struct smtp_session *s, const char *addr, size_t len,
				char *text, size_t cap)
{
	struct ph_worker *pw = ctx;
	const char *login = smtp_session_auth_user(s);
	if (login && len && pw->cfg->smtp_sender_login_check &&
	    !users_owns(pw->users, login, strlen(login), addr, len, USERS_DELIM_DEFAULT)) {
		snprintf(text, cap, "5.7.1 <%.*s>: Sender address rejected: not owned by user %s",
			 (int)MIN(len, (size_t)256), addr, login);
		return 553;
	}
	struct net_conn *c = smtp_session_conn(s);
	const struct sockaddr_storage *peer = net_conn_peer(c);
	if (client_limited(pw, peer) &&
	    anvil_message(pw->anvil, peer, net_worker_now_ms(net_conn_worker(c))) != ANVIL_OK) {
		char a[INET6_ADDRSTRLEN];
		peer_text(peer, a, sizeof(a));
		log_info("posthaste: MAIL from %s refused: client_message_rate", a);
		snprintf(text, cap, "4.7.1 Error: too much mail from %s", a);
		return 450;
	}
	return 0;
}

/* The answer of the pool's check, on the session's worker: 1, 0, or -errno (-ECANCELED at stop). */
static void sink_auth_done(void *arg, int res)
{
	smtp_session_auth_done(arg, res == 1 ? 235 : res == 0 ? 535 : 454);
}

/*
 * AUTH: the login against the users file. The hash (yescrypt, ~10-50 ms)
 * runs on the authpool's threads, never on the worker (docs/auth.md): the
 * session waits for sink_auth_done while the worker serves its other
 * connections. A full queue is answered 454 at once.
 */
static unsigned sink_auth_check(void *ctx, struct smtp_session *s, const char *authcid,
				size_t authcid_len, const char *passwd, size_t passwd_len)
{
	struct ph_worker *pw = ctx;
	if (!pw->users || !pw->authpool)
		return 454;
	int r = authpool_submit(pw->authpool, pw->index, authcid, authcid_len, passwd, passwd_len,
				sink_auth_done, s);
	if (r == 0)
		return 0;
	uint64_t now = net_worker_now_ms(net_conn_worker(smtp_session_conn(s)));
	if (r != -EAGAIN || now - pw->auth_busy_log_ms >= 10000 || !pw->auth_busy_log_ms) {
		pw->auth_busy_log_ms = now;
		log_warn("posthaste: AUTH for %.*s answered 454: %s", (int)MIN(authcid_len, (size_t)255),
			 authcid,
			 r == -EAGAIN ? "the password-check queue is full (auth_threads)" : strerror(-r));
	}
	return 454;
}

static const struct smtp_sink_ops spool_sink = {
	.txn_begin = sink_begin,
	.txn_body = sink_body,
	.txn_end = sink_end,
	.txn_abort = sink_abort,
	.rcpt_check = sink_rcpt_check,
	.auth_check = sink_auth_check,
	.mail_check = sink_mail_check,
	.connect_check = sink_connect_check,
	.connect_end = sink_connect_end,
};

static int worker_init(struct net_worker *w, void *arg)
{
	struct ph_ctx *c = arg;
	unsigned i = net_worker_index(w);
	int r = spool_worker_init(c->spool, w);
	if (r < 0)
		return r;
	c->workers[i].sw = spool_worker(c->spool, i);
	c->workers[i].hostname = c->hostname;
	c->workers[i].cfg = &c->cfg;
	c->workers[i].nets = c->nets;
	c->workers[i].nnets = c->nnets;
	c->workers[i].users = c->users;
	c->workers[i].anvil = c->anvil;
	c->workers[i].index = i;
	c->workers[i].authpool = c->authpool;
	if (c->authpool) {
		r = authpool_worker_init(c->authpool, w);
		if (r < 0)
			return r;
	}
	if (c->relay) {
		r = relay_worker_init(c->relay, w);
		if (r < 0)
			return r;
		c->workers[i].rw = relay_worker(c->relay, i);
		c->workers[i].relay = c->relay;
	}
	r = ph_control_worker_init(c->control, w, c->workers[i].sw, c->workers[i].rw);
	if (r < 0)
		return r;
	return smtp_server_worker_init(c->srv, w, &spool_sink, &c->workers[i]);
}

static void worker_turn_end(struct net_worker *w, void *arg)
{
	struct ph_ctx *c = arg;
	struct ph_worker *pw = &c->workers[net_worker_index(w)];
	if (pw->rw)
		relay_worker_turn_end(pw->rw);
	spool_worker_turn_end(pw->sw);
}

static void worker_fini(struct net_worker *w, void *arg)
{
	struct ph_ctx *c = arg;
	struct ph_worker *pw = &c->workers[net_worker_index(w)];
	ph_control_worker_fini(c->control, w);
	if (pw->authpool)
		authpool_worker_fini(pw->authpool, w); /* answers its sessions' checks in flight */
	if (pw->rw)
		relay_worker_fini(pw->rw);
	spool_worker_fini(pw->sw);
}

/* SIGHUP (on the engine's main thread): the certificate and key are read again. */
static void on_hup(void *arg)
{
	struct ph_ctx *c = arg;
	char err[512];
	if (!c->tls) {
		log_info("posthaste: SIGHUP: nothing to reload");
		return;
	}
	if (tls_ctx_reload(c->tls, err, sizeof(err)) < 0)
		log_warn("posthaste: SIGHUP: TLS certificate not reloaded, keeping the old one: %s",
			 err);
	else
		log_info("posthaste: SIGHUP: TLS certificate reloaded from %s", c->cfg.tls_cert);
}

static void ctx_release(struct ph_ctx *c, struct net_engine **e)
{
	authpool_free(&c->authpool); /* before the users its threads read */
	relay_free(&c->relay);
	users_free(&c->users);
	anvil_free(&c->anvil);
	smtp_server_free(&c->srv);
	tls_ctx_free(&c->tls);
	spool_close(&c->spool);
	net_engine_free(e);
	free(c->workers);
	c->workers = NULL;
}

static void usage(FILE *f)
{
	fputs("usage: posthaste [--config FILE] [--listen HOST:PORT]... [--spool DIR]\n"
	      "                 [--durability fsync|batch|none] [--workers N] [--hostname NAME]\n"
	      "                 [--route DOMAIN=HOST:PORT[,...]]... [--smarthost HOST:PORT[,...]]\n"
	      "                 [--resolver IP:PORT] [--no-delivery] [--discard]\n"
	      "                 [--log-level error|warning|info|debug] [--check-config]\n"
	      "Accepts mail over SMTP into a durable spool and delivers it: by MX, a route or the\n"
	      "smarthost, or to local Maildirs. Without a file or flags it listens on\n"
	      "127.0.0.1:2525 with the spool in ./var/spool. --check-config prints the effective\n"
	      "configuration and exits. See docs/configuration.md.\n"
	      "       posthaste queue list [--json] | show ID   [--spool DIR | --config FILE]\n"
	      "       posthaste queue hold|release|delete ID...|ALL | flush [ID...|ALL]\n"
	      "Lists or shows the queued messages (reads the spool; works with or without the\n"
	      "daemon running); changes them through the running daemon's control socket, or\n"
	      "the stopped daemon's spool. See `posthaste queue --help`.\n"
	      "       posthaste user add|passwd|del ADDRESS [--users FILE | --config FILE]\n"
	      "Edits the users file (logins for AUTH). See `posthaste user --help`.\n",
	      f);
}

int main(int argc, char **argv)
{
	if (argc > 1 && !strcmp(argv[1], "queue"))
		return ph_queue_main(argc - 1, argv + 1);
	if (argc > 1 && !strcmp(argv[1], "user"))
		return ph_user_main(argc - 1, argv + 1);
	static const struct option opts[] = {
		{"config", required_argument, NULL, 'c'},
		{"listen", required_argument, NULL, 'l'},
		{"spool", required_argument, NULL, 's'},
		{"durability", required_argument, NULL, 'd'},
		{"workers", required_argument, NULL, 'w'},
		{"hostname", required_argument, NULL, 'H'},
		{"discard", no_argument, NULL, 'D'},
		{"no-delivery", no_argument, NULL, 'N'},
		{"route", required_argument, NULL, 'R'},
		{"resolver", required_argument, NULL, 'r'},
		{"smarthost", required_argument, NULL, 'S'},
		{"log-level", required_argument, NULL, 'L'},
		{"check-config", no_argument, NULL, 'C'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	struct ph_ctx ctx;
	memset(&ctx, 0, sizeof(ctx));
	ph_config_default(&ctx.cfg);
	char err[512];
	const char *config_file = NULL;
	bool check = false;
	bool listen_flag = false;
	char route_key[300];
	/* the file first, then flags over it, whatever their order on the line */
	int opt;
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		if (opt == 'c')
			config_file = optarg;
		else if (opt == 'h') {
			usage(stdout);
			return 0;
		} else if (opt == '?') {
			usage(stderr);
			return 2;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "posthaste: unexpected argument '%s'\n", argv[optind]);
		usage(stderr);
		return 2;
	}
	if (config_file && ph_config_load_file(&ctx.cfg, config_file, err, sizeof(err)) < 0) {
		fprintf(stderr, "posthaste: %s\n", err);
		return 1;
	}
	optind = 1;
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		const char *key = NULL, *value = optarg;
		switch (opt) {
		case 'l':
			if (!listen_flag) {
				ctx.cfg.nlisten = 0; /* flags replace the file's listeners */
				listen_flag = true;
			}
			key = "listen";
			break;
		case 's':
			key = "spool_dir";
			break;
		case 'd':
			key = "durability";
			break;
		case 'w':
			key = "workers";
			break;
		case 'H':
			key = "hostname";
			break;
		case 'D':
			key = "discard";
			value = "yes";
			break;
		case 'L':
			key = "log_level";
			break;
		case 'N':
			key = "delivery";
			value = "no";
			break;
		case 'r':
			key = "resolver";
			break;
		case 'S':
			key = "smarthost";
			break;
		case 'R': {
			/* DOMAIN=HOSTS, the key route.DOMAIN */
			const char *eq = strchr(optarg, '=');
			if (!eq || eq == optarg || eq - optarg > 250) {
				fprintf(stderr, "posthaste: --route: expected DOMAIN=HOST:PORT[,...], "
						"got '%s'\n", optarg);
				return 1;
			}
			snprintf(route_key, sizeof(route_key), "route.%.*s", (int)(eq - optarg),
				 optarg);
			key = route_key;
			value = eq + 1;
			break;
		}
		case 'C':
			check = true;
			break;
		default:
			break;
		}
		if (key && ph_config_set(&ctx.cfg, key, value, err, sizeof(err)) < 0) {
			fprintf(stderr, "posthaste: %s\n", err); /* err names the key */
			return 1;
		}
	}
	if (ph_config_check(&ctx.cfg, err, sizeof(err)) < 0) {
		fprintf(stderr, "posthaste: %s\n", err);
		return 1;
	}
	if (check) {
		ph_config_print(&ctx.cfg, stdout);
		return 0;
	}
	log_set_level(ctx.cfg.log_level);

	struct net_config ncfg;
	net_config_default(&ncfg);
	ncfg.workers = ctx.cfg.workers;
	ncfg.connect_timeout_ms = (unsigned)MIN(ctx.cfg.connect_timeout_ms, (uint64_t)UINT32_MAX);
	ncfg.on_hup = on_hup;
	ncfg.hup_arg = &ctx;
	struct net_worker_hooks hooks = {
		.init = worker_init,
		.turn_end = worker_turn_end,
		.fini = worker_fini,
		.arg = &ctx,
	};
	struct net_engine *e = net_engine_new(&ncfg, &hooks);
	if (!e) {
		fprintf(stderr, "posthaste: cannot create the engine: %s\n", strerror(errno));
		return 1;
	}
	unsigned nw = net_engine_workers(e);
	struct spool_config scfg = {
		.dir = ctx.cfg.spool_dir,
		.durability = ctx.cfg.durability == PH_DURABILITY_BATCH  ? SPOOL_BATCH
			      : ctx.cfg.durability == PH_DURABILITY_NONE ? SPOOL_NONE
									 : SPOOL_FSYNC,
		.batch_interval_ms = ctx.cfg.batch_interval_ms,
		.reserve_bytes = ctx.cfg.spool_reserve,
		.discard = ctx.cfg.discard,
		.buffered_io = !ctx.cfg.spool_direct_io,
	};
	ctx.spool = spool_open(&scfg, nw, err, sizeof(err));
	if (!ctx.spool) {
		fprintf(stderr, "posthaste: %s\n", err);
		net_engine_free(&e);
		return 1;
	}
	if (ctx.cfg.hostname[0])
		snprintf(ctx.hostname, sizeof(ctx.hostname), "%s", ctx.cfg.hostname);
	else if (gethostname(ctx.hostname, sizeof(ctx.hostname) - 1) < 0 || !ctx.hostname[0])
		snprintf(ctx.hostname, sizeof(ctx.hostname), "localhost");
	struct smtp_server_config sc;
	smtp_server_config_default(&sc);
	sc.hostname = ctx.hostname;
	sc.max_message_size = ctx.cfg.message_size_limit;
	sc.max_recipients = ctx.cfg.recipient_limit;
	sc.timeout_command_ms = (unsigned)ctx.cfg.command_timeout_ms;
	sc.timeout_data_ms = (unsigned)ctx.cfg.data_timeout_ms;
	sc.auth = ctx.cfg.smtp_auth;
	sc.auth_required = ctx.cfg.smtp_auth_required;
	sc.auth_without_tls = ctx.cfg.smtp_auth_without_tls;
	if (ctx.cfg.tls_cert[0]) {
		ctx.tls = tls_ctx_new_server(ctx.cfg.tls_cert, ctx.cfg.tls_key, NULL, err,
					     sizeof(err));
		if (!ctx.tls) {
			fprintf(stderr, "posthaste: tls_cert: %s\n", err);
			goto fail;
		}
		sc.tls = ctx.tls;
	}
	ctx.srv = smtp_server_new(&sc, e);
	ctx.workers = aligned_alloc(CACHELINE, sizeof(*ctx.workers) * nw);
	if (!ctx.srv || !ctx.workers) {
		fprintf(stderr, "posthaste: out of memory\n");
		goto fail;
	}
	memset(ctx.workers, 0, sizeof(*ctx.workers) * nw);
	int nn = ph_networks_parse(ctx.cfg.mynetworks, ctx.nets, ARRAY_SIZE(ctx.nets), err,
				   sizeof(err));
	if (nn < 0) {
		fprintf(stderr, "posthaste: %s\n", err);
		goto fail;
	}
	ctx.nnets = (unsigned)nn;
	if (ctx.cfg.client_connection_limit || ctx.cfg.client_connection_rate.count ||
	    ctx.cfg.client_message_rate.count) {
		struct anvil_config ac = {
			.conn_limit = ctx.cfg.client_connection_limit,
			.conn_rate_count = ctx.cfg.client_connection_rate.count,
			.conn_rate_ms = ctx.cfg.client_connection_rate.per_ms,
			.msg_rate_count = ctx.cfg.client_message_rate.count,
			.msg_rate_ms = ctx.cfg.client_message_rate.per_ms,
		};
		ctx.anvil = anvil_new(&ac);
		if (!ctx.anvil) {
			fprintf(stderr, "posthaste: per-client limits: %s\n", strerror(errno));
			goto fail;
		}
	}
	if (ctx.cfg.users_file[0]) {
		ctx.users = users_load(ctx.cfg.users_file, err, sizeof(err));
		if (!ctx.users) {
			fprintf(stderr, "posthaste: %s\n", err);
			goto fail;
		}
	}
	if (ctx.users && (ctx.cfg.smtp_auth || ctx.cfg.submission_listen.host[0] ||
			  ctx.cfg.submissions_listen.host[0])) {
		struct authpool_config ac = {
			.threads = ctx.cfg.auth_threads,
			.nworkers = nw,
			.users = ctx.users,
		};
		ctx.authpool = authpool_new(&ac, err, sizeof(err));
		if (!ctx.authpool) {
			fprintf(stderr, "posthaste: %s\n", err);
			goto fail;
		}
		log_info("posthaste: %u threads check AUTH passwords", authpool_threads(ctx.authpool));
	}
	if (!ctx.cfg.discard && ctx.cfg.delivery) {
		ctx.relay = relay_new(&ctx.cfg, ctx.hostname, ctx.users, ctx.spool, nw, err,
				      sizeof(err));
		if (!ctx.relay) {
			fprintf(stderr, "posthaste: %s\n", err);
			goto fail;
		}
	}
	/*
	 * From here on clients can connect: a SIGTERM or SIGINT now waits (blocked) for
	 * net_engine_run, which blocks them too and takes the pending one, instead of
	 * killing a daemon that has not started its loop yet.
	 */
	sigset_t stop_sigs;
	sigemptyset(&stop_sigs);
	sigaddset(&stop_sigs, SIGTERM);
	sigaddset(&stop_sigs, SIGINT);
	sigaddset(&stop_sigs, SIGHUP); /* on_hup */
	pthread_sigmask(SIG_BLOCK, &stop_sigs, NULL);
	char ctl_path[sizeof(ctx.cfg.control_socket)];
	if (ph_control_path(&ctx.cfg, NULL, ctl_path, sizeof(ctl_path)) < 0) {
		fprintf(stderr, "posthaste: control_socket: the path is too long\n");
		goto fail;
	}
	ctx.control = ph_control_open(ctl_path, nw, err, sizeof(err)); /* the spool lock is ours */
	if (!ctx.control) {
		fprintf(stderr, "posthaste: %s\n", err);
		goto fail;
	}
	int cr = ph_control_start(ctx.control);
	if (cr < 0) {
		fprintf(stderr, "posthaste: cannot start the control thread: %s\n", strerror(-cr));
		ph_control_close(&ctx.control);
		goto fail;
	}
	for (unsigned i = 0; i < ctx.cfg.nlisten; i++) {
		int r = smtp_server_listen(ctx.srv, ctx.cfg.listen[i].host, ctx.cfg.listen[i].port);
		if (r < 0) {
			fprintf(stderr, "posthaste: cannot listen on %s:%u: %s\n",
				ctx.cfg.listen[i].host, ctx.cfg.listen[i].port, strerror(-r));
			ph_control_close(&ctx.control);
			goto fail;
		}
		log_info("posthaste: listening on %s:%u%s", ctx.cfg.listen[i].host,
			 ctx.cfg.listen[i].port, ctx.tls ? " (STARTTLS)" : "");
	}
	static const struct {
		size_t off;
		enum smtp_role role;
		const char *what;
	} roles[] = {
		{offsetof(struct ph_config, submission_listen), SMTP_ROLE_SUBMISSION,
		 "submission (STARTTLS, AUTH required)"},
		{offsetof(struct ph_config, submissions_listen), SMTP_ROLE_SUBMISSIONS,
		 "submissions (implicit TLS, AUTH required)"},
	};
	for (size_t i = 0; i < ARRAY_SIZE(roles); i++) {
		const struct ph_listen *l = (const void *)((const char *)&ctx.cfg + roles[i].off);
		if (!l->host[0])
			continue;
		int r = smtp_server_listen_role(ctx.srv, l->host, l->port, roles[i].role);
		if (r < 0) {
			fprintf(stderr, "posthaste: cannot listen on %s:%u: %s\n", l->host, l->port,
				strerror(-r));
			ph_control_close(&ctx.control);
			goto fail;
		}
		log_info("posthaste: listening on %s:%u: %s", l->host, l->port, roles[i].what);
	}
	log_info("posthaste: %u workers, spool %s, durability %s%s", nw, ctx.cfg.spool_dir,
		 scfg.durability == SPOOL_FSYNC   ? "fsync"
		 : scfg.durability == SPOOL_BATCH ? "batch"
						  : "none",
		 ctx.cfg.discard ? ", discard route" : "");
	int r = net_engine_run(e);
	ph_control_close(&ctx.control); /* stops its thread, removes the socket */

	struct spool_stats st;
	spool_stats(ctx.spool, &st);
	struct smtp_server_stats ss;
	smtp_server_stats(ctx.srv, &ss);
	log_info("posthaste: stopped: %" PRIu64 " messages accepted, %" PRIu64
		 " committed in %" PRIu64 " writes and %" PRIu64 " syncs, %" PRIu64
		 " failed, %" PRIu64 " queued",
		 ss.messages, st.committed, st.writes, st.syncs, st.failed,
		 spool_queued(ctx.spool));
	if (ctx.relay) {
		struct relay_stats rs;
		relay_stats(ctx.relay, &rs);
		log_info("posthaste: delivery: %" PRIu64 " recipients delivered, %" PRIu64
			 " deferred attempts, %" PRIu64 " bounced, %" PRIu64 " bounces sent, %" PRIu64
			 " connections",
			 rs.delivered, rs.deferred, rs.bounced, rs.dsns, rs.connections);
	}
	ctx_release(&ctx, &e);
	return r < 0 ? 1 : 0;

fail: /* after the engine and the spool exist: release them (and whatever came after) */
	ph_control_close(&ctx.control);
	ctx_release(&ctx, &e);
	return 1;
}
