/*
 * TLS as a net filter: one SSL per connection between two memory BIOs.
 * net feeds received octets into the read BIO and drains the write BIO into
 * its send queue; this file never sees a socket. See docs/tls.md.
 */
#include "tls/tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "core/log.h"

struct tls_ctx {
	pthread_mutex_t lock; /* guards ssl: reload swaps it while workers start connections */
	SSL_CTX *ssl;         /* for new connections; each SSL holds its own reference */
	bool server;
	enum tls_verify verify;
	char *cert_file, *key_file, *ca_file;
	char *ciphers, *ciphersuites, *groups;
	int tickets;
};

/* One connection's TLS state: the filter's f. */
struct tls_conn {
	SSL *ssl;
	BIO *rbio, *wbio; /* owned by ssl */
	struct net_conn *c;
	SSL_SESSION *session; /* client: the newest session the server gave */
	bool server;
};

static const struct net_filter_ops tls_filter_ops;

/* ---- errors ---- */

/*
 * SSL_get_error needs an empty error queue before each call. ERR_clear_error
 * walks and frees all the queue's slots even when it is empty (~8 % of a TLS
 * sink's CPU time in a profile), so clear only what is there.
 */
static inline void err_reset(void)
{
	if (ERR_peek_error())
		ERR_clear_error();
}

/* The OpenSSL reason of the latest error, or `fallback`. Clears the thread's error queue. */
static const char *ssl_reason(char *buf, size_t len, const char *fallback)
{
	unsigned long e = ERR_peek_last_error();
	if (!e) {
		snprintf(buf, len, "%s", fallback);
	} else {
		const char *r = ERR_reason_error_string(e);
		if (r)
			snprintf(buf, len, "%s", r);
		else
			ERR_error_string_n(e, buf, len);
	}
	ERR_clear_error();
	return buf;
}

static const char *peer_str(struct net_conn *c, char *buf, size_t len)
{
	const struct sockaddr_storage *ss = net_conn_peer(c);
	if (ss->ss_family == AF_INET)
		return inet_ntop(AF_INET, &((const struct sockaddr_in *)ss)->sin_addr, buf,
		                 (socklen_t)len);
	if (ss->ss_family == AF_INET6)
		return inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)ss)->sin6_addr, buf,
		                 (socklen_t)len);
	return "?";
}

/* Maps a failed handshake or record to -errno, logging why. */
static int conn_error(struct tls_conn *t, int r, const char *what)
{
	char reason[256], peer[INET6_ADDRSTRLEN];
	int err = -EPROTO;
	unsigned long e = ERR_peek_last_error();
	long vr = SSL_get_verify_result(t->ssl);
	if (ERR_GET_LIB(e) == ERR_LIB_SSL) {
		int why = ERR_GET_REASON(e);
		if (why == SSL_R_UNSUPPORTED_PROTOCOL ||
		    why == SSL_R_TLSV1_ALERT_PROTOCOL_VERSION ||
		    why == SSL_R_WRONG_VERSION_NUMBER || why == SSL_R_NO_PROTOCOLS_AVAILABLE)
			err = -EPROTONOSUPPORT;
		else if (why == SSL_R_CERTIFICATE_VERIFY_FAILED)
			err = -EKEYREJECTED;
	}
	int se = SSL_get_error(t->ssl, r);
	const char *fallback =
	    se == SSL_ERROR_SYSCALL ? "unexpected end of data" : "protocol error";
	ssl_reason(reason, sizeof(reason), fallback);
	if (err == -EKEYREJECTED)
		log_info("tls: %s: %s failed: %s (%s)", peer_str(t->c, peer, sizeof(peer)), what,
		         reason, X509_verify_cert_error_string(vr));
	else
		log_info("tls: %s: %s failed: %s", peer_str(t->c, peer, sizeof(peer)), what,
		         reason);
	return err;
}

/* ---- the filter ---- */

static int f_input(void *f, const void *data, size_t len)
{
	struct tls_conn *t = f;
	size_t n;
	if (!BIO_write_ex(t->rbio, data, len, &n) || n != len)
		return -ENOMEM;
	return 0;
}

static int f_handshake(void *f)
{
	struct tls_conn *t = f;
	err_reset();
	int r = SSL_do_handshake(t->ssl);
	if (r == 1) {
		char peer[INET6_ADDRSTRLEN];
		log_debug("tls: %s: %s %s%s", peer_str(t->c, peer, sizeof(peer)),
		          SSL_get_version(t->ssl), SSL_get_cipher_name(t->ssl),
		          SSL_session_reused(t->ssl) ? " (resumed)" : "");
		return 1;
	}
	int e = SSL_get_error(t->ssl, r);
	if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
		return 0;
	return conn_error(t, r, "handshake");
}

static long f_read(void *f, void *buf, size_t cap)
{
	struct tls_conn *t = f;
	size_t n;
	/*
	 * Nothing buffered, decoded or not: a read could only fail with
	 * WANT_READ, and would cost a record-layer pass to find that out.
	 */
	if (!BIO_ctrl_pending(t->rbio) && !SSL_pending(t->ssl))
		return 0;
	err_reset();
	int r = SSL_read_ex(t->ssl, buf, cap, &n);
	if (r == 1)
		return (long)n;
	switch (SSL_get_error(t->ssl, r)) {
	case SSL_ERROR_WANT_READ:
	case SSL_ERROR_WANT_WRITE:
		return 0;
	case SSL_ERROR_ZERO_RETURN:
		return -EPIPE;
	default:
		return conn_error(t, r, "read");
	}
}

static int f_write(void *f, const void *data, size_t len)
{
	struct tls_conn *t = f;
	size_t n;
	err_reset();
	/* the write BIO grows: a write never waits, and takes everything */
	if (SSL_write_ex(t->ssl, data, len, &n) == 1 && n == len)
		return 0;
	return conn_error(t, 0, "write");
}

static size_t f_output_pending(void *f)
{
	struct tls_conn *t = f;
	return BIO_ctrl_pending(t->wbio);
}

static size_t f_output(void *f, void *buf, size_t cap)
{
	struct tls_conn *t = f;
	size_t n = 0;
	if (!BIO_read_ex(t->wbio, buf, cap, &n))
		return 0;
	return n;
}

static void f_close(void *f)
{
	struct tls_conn *t = f;
	ERR_clear_error();
	SSL_shutdown(t->ssl); /* queues close_notify; we do not wait for the peer's */
	ERR_clear_error();
}

static void f_free(void *f)
{
	struct tls_conn *t = f;
	SSL_SESSION_free(t->session);
	SSL_free(t->ssl); /* and both BIOs */
	free(t);
}

static const struct net_filter_ops tls_filter_ops = {
    .input = f_input,
    .handshake = f_handshake,
    .read = f_read,
    .write = f_write,
    .output_pending = f_output_pending,
    .output = f_output,
    .close = f_close,
    .free = f_free,
};

/* ---- contexts ---- */

/* Client: keep the newest session the server sent (TLS 1.3 tickets come after the handshake). */
static int new_session_cb(SSL *ssl, SSL_SESSION *sess)
{
	struct tls_conn *t = SSL_get_app_data(ssl);
	if (!t)
		return 0;
	SSL_SESSION_free(t->session);
	t->session = sess;
	return 1; /* we keep the reference */
}

static int ctx_fail(char *err, size_t errlen, const char *what, const char *file)
{
	char reason[256];
	ssl_reason(reason, sizeof(reason), "unknown error");
	if (file)
		snprintf(err, errlen, "%s %s: %s", what, file, reason);
	else
		snprintf(err, errlen, "%s: %s", what, reason);
	return -EINVAL;
}

/* Builds an SSL_CTX from the settings and files of ctx; `old` gives the ticket keys to keep. */
static SSL_CTX *ctx_build(const struct tls_ctx *ctx, SSL_CTX *old, char *err, size_t errlen)
{
	ERR_clear_error();
	SSL_CTX *s = SSL_CTX_new(ctx->server ? TLS_server_method() : TLS_client_method());
	if (!s) {
		ctx_fail(err, errlen, "SSL_CTX_new", NULL);
		return NULL;
	}
	SSL_CTX_set_min_proto_version(s, TLS1_2_VERSION);
	SSL_CTX_set_options(s, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
	/* idle connections give their 2 x ~17 KiB record buffers back */
	SSL_CTX_set_mode(s, SSL_MODE_RELEASE_BUFFERS);
	const char *ciphers = ctx->ciphers  ? ctx->ciphers
	                      : ctx->server ? TLS_CTX_CIPHERS
	                                    : TLS_CTX_CLIENT_CIPHERS;
	if (!SSL_CTX_set_cipher_list(s, ciphers)) {
		ctx_fail(err, errlen, "cipher list", ciphers);
		goto fail;
	}
	const char *suites = ctx->ciphersuites ? ctx->ciphersuites : TLS_CTX_CIPHERSUITES;
	if (!SSL_CTX_set_ciphersuites(s, suites)) {
		ctx_fail(err, errlen, "TLS 1.3 ciphersuites", suites);
		goto fail;
	}
	const char *groups = ctx->groups ? ctx->groups : TLS_CTX_GROUPS;
	if (!SSL_CTX_set1_groups_list(s, groups)) {
		ctx_fail(err, errlen, "groups", groups);
		goto fail;
	}
	if (ctx->server) {
		if (SSL_CTX_use_certificate_chain_file(s, ctx->cert_file) != 1) {
			ctx_fail(err, errlen, "certificate", ctx->cert_file);
			goto fail;
		}
		if (SSL_CTX_use_PrivateKey_file(s, ctx->key_file, SSL_FILETYPE_PEM) != 1) {
			ctx_fail(err, errlen, "private key", ctx->key_file);
			goto fail;
		}
		if (SSL_CTX_check_private_key(s) != 1) {
			ctx_fail(err, errlen, "private key does not match the certificate",
			         ctx->key_file);
			goto fail;
		}
		static const unsigned char sid_ctx[] = "posthaste";
		SSL_CTX_set_session_id_context(s, sid_ctx, sizeof(sid_ctx) - 1);
		/* stateless tickets only: no server-side cache, no lock shared by the workers */
		SSL_CTX_set_session_cache_mode(s, SSL_SESS_CACHE_OFF);
		if (ctx->tickets < 0) {
			SSL_CTX_set_options(s, SSL_OP_NO_TICKET);
			SSL_CTX_set_num_tickets(s, 0);
		} else {
			SSL_CTX_set_num_tickets(s, ctx->tickets ? (size_t)ctx->tickets : 1);
		}
		if (old) {
			/* tickets issued before the reload still resume */
			unsigned char keys[80];
			if (SSL_CTX_get_tlsext_ticket_keys(old, keys, sizeof(keys)) == 1)
				SSL_CTX_set_tlsext_ticket_keys(s, keys, sizeof(keys));
			OPENSSL_cleanse(keys, sizeof(keys));
		}
	} else {
		if (ctx->ca_file ? SSL_CTX_load_verify_locations(s, ctx->ca_file, NULL) != 1
		                 : SSL_CTX_set_default_verify_paths(s) != 1) {
			ctx_fail(err, errlen, "CA certificates",
			         ctx->ca_file ? ctx->ca_file : "(system)");
			goto fail;
		}
		/* with VERIFY_NONE the chain is still checked: tls_conn_info says whether it
		 * verified */
		SSL_CTX_set_verify(
		    s, ctx->verify == TLS_VERIFY_NAME ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
		SSL_CTX_set_session_cache_mode(s, SSL_SESS_CACHE_CLIENT |
		                                      SSL_SESS_CACHE_NO_INTERNAL_STORE);
		SSL_CTX_sess_set_new_cb(s, new_session_cb);
	}
	ERR_clear_error();
	return s;
fail:
	SSL_CTX_free(s);
	return NULL;
}

static char *dup_or_null(const char *s)
{
	return s ? strdup(s) : NULL;
}

static void ctx_destroy(struct tls_ctx *ctx)
{
	SSL_CTX_free(ctx->ssl);
	free(ctx->cert_file);
	free(ctx->key_file);
	free(ctx->ca_file);
	free(ctx->ciphers);
	free(ctx->ciphersuites);
	free(ctx->groups);
	pthread_mutex_destroy(&ctx->lock);
	free(ctx);
}

static struct tls_ctx *ctx_new(bool server, const struct tls_settings *s)
{
	struct tls_ctx *ctx = calloc(1, sizeof(*ctx));
	if (!ctx)
		return NULL;
	pthread_mutex_init(&ctx->lock, NULL);
	ctx->server = server;
	if (s) {
		ctx->ciphers = dup_or_null(s->ciphers);
		ctx->ciphersuites = dup_or_null(s->ciphersuites);
		ctx->groups = dup_or_null(s->groups);
		ctx->tickets = s->tickets;
	}
	return ctx;
}

struct tls_ctx *tls_ctx_new_server(const char *cert_file, const char *key_file,
                                   const struct tls_settings *s, char *err, size_t errlen)
{
	struct tls_ctx *ctx = ctx_new(true, s);
	if (!ctx || !(ctx->cert_file = strdup(cert_file)) || !(ctx->key_file = strdup(key_file))) {
		snprintf(err, errlen, "out of memory");
		if (ctx)
			ctx_destroy(ctx);
		return NULL;
	}
	ctx->ssl = ctx_build(ctx, NULL, err, errlen);
	if (!ctx->ssl) {
		ctx_destroy(ctx);
		return NULL;
	}
	return ctx;
}

struct tls_ctx *tls_ctx_new_client(enum tls_verify verify, const char *ca_file,
                                   const struct tls_settings *s, char *err, size_t errlen)
{
	struct tls_ctx *ctx = ctx_new(false, s);
	if (!ctx || (ca_file && !(ctx->ca_file = strdup(ca_file)))) {
		snprintf(err, errlen, "out of memory");
		if (ctx)
			ctx_destroy(ctx);
		return NULL;
	}
	ctx->verify = verify;
	ctx->ssl = ctx_build(ctx, NULL, err, errlen);
	if (!ctx->ssl) {
		ctx_destroy(ctx);
		return NULL;
	}
	return ctx;
}

int tls_ctx_reload(struct tls_ctx *ctx, char *err, size_t errlen)
{
	pthread_mutex_lock(&ctx->lock);
	SSL_CTX *old = ctx->ssl;
	SSL_CTX_up_ref(old);
	pthread_mutex_unlock(&ctx->lock);
	SSL_CTX *s = ctx_build(ctx, old, err, errlen); /* file reads outside the lock */
	SSL_CTX_free(old);
	if (!s)
		return -EINVAL;
	pthread_mutex_lock(&ctx->lock);
	old = ctx->ssl;
	ctx->ssl = s;
	pthread_mutex_unlock(&ctx->lock);
	SSL_CTX_free(old); /* the connections that use it hold their own references */
	return 0;
}

void tls_ctx_free(struct tls_ctx **ctxp)
{
	if (!*ctxp)
		return;
	ctx_destroy(*ctxp);
	*ctxp = NULL;
}

/* ---- connections ---- */

int tls_conn_start(struct net_conn *c, struct tls_ctx *ctx, const char *sni, const void *session,
                   size_t session_len)
{
	struct tls_conn *t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->c = c;
	t->server = ctx->server;
	ERR_clear_error();
	pthread_mutex_lock(&ctx->lock);
	t->ssl = SSL_new(ctx->ssl); /* takes a reference on the SSL_CTX of the moment */
	pthread_mutex_unlock(&ctx->lock);
	if (!t->ssl)
		goto nomem;
	t->rbio = BIO_new(BIO_s_mem());
	t->wbio = BIO_new(BIO_s_mem());
	if (!t->rbio || !t->wbio) {
		BIO_free(t->rbio);
		BIO_free(t->wbio);
		goto nomem;
	}
	/* an empty BIO means "wait for more", not end of file */
	BIO_set_mem_eof_return(t->rbio, -1);
	BIO_set_mem_eof_return(t->wbio, -1);
	SSL_set_bio(t->ssl, t->rbio, t->wbio);
	SSL_set_app_data(t->ssl, t);
	if (t->server) {
		SSL_set_accept_state(t->ssl);
	} else {
		SSL_set_connect_state(t->ssl);
		if (sni && *sni) {
			if (!SSL_set_tlsext_host_name(t->ssl, sni))
				goto nomem;
			if (ctx->verify == TLS_VERIFY_NAME) {
				SSL_set_hostflags(t->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
				if (!SSL_set1_host(t->ssl, sni))
					goto nomem;
			}
		}
		if (session && session_len) {
			const unsigned char *p = session;
			SSL_SESSION *sess = d2i_SSL_SESSION(NULL, &p, (long)session_len);
			if (sess) {
				if (SSL_SESSION_is_resumable(sess))
					SSL_set_session(t->ssl, sess);
				SSL_SESSION_free(sess);
			}
		}
	}
	ERR_clear_error();
	int r = net_conn_set_filter(c, &tls_filter_ops, t);
	if (r < 0)
		f_free(t);
	return r;
nomem:
	ERR_clear_error();
	SSL_free(t->ssl);
	free(t);
	return -ENOMEM;
}

static int accept_start(struct net_conn *c, void *arg)
{
	return tls_conn_start(c, arg, NULL, NULL, 0);
}

int tls_listen(struct net_engine *e, const char *host, uint16_t port, const struct net_proto *proto,
               void *ctx, struct tls_ctx *tls)
{
	if (!tls->server)
		return -EINVAL;
	return net_engine_listen_filter(e, host, port, proto, ctx, accept_start, tls);
}

int tls_listener_implicit(struct net_engine *e, unsigned i, struct tls_ctx *tls)
{
	if (!tls->server)
		return -EINVAL;
	return net_engine_listener_set_filter(e, i, accept_start, tls);
}

int tls_conn_info(const struct net_conn *c, struct tls_info *info)
{
	struct tls_conn *t = net_conn_filter(c, &tls_filter_ops);
	if (!t || !net_conn_filter_ready(c))
		return -ENOTCONN;
	int alg = 0;
	X509 *peer = SSL_get0_peer_certificate(t->ssl);
	*info = (struct tls_info){
	    .version = SSL_get_version(t->ssl),
	    .cipher = SSL_get_cipher_name(t->ssl),
	    .bits = SSL_get_cipher_bits(t->ssl, &alg),
	    .resumed = SSL_session_reused(t->ssl),
	    .verified = peer && SSL_get_verify_result(t->ssl) == X509_V_OK,
	    .sni = t->server ? SSL_get_servername(t->ssl, TLSEXT_NAMETYPE_host_name) : NULL,
	};
	return 0;
}

int tls_conn_session(const struct net_conn *c, void *buf, size_t cap)
{
	struct tls_conn *t = net_conn_filter(c, &tls_filter_ops);
	if (!t || t->server)
		return -ENOTCONN;
	SSL_SESSION *s = t->session;
	if (!s || !SSL_SESSION_is_resumable(s))
		return -ENOENT;
	int len = i2d_SSL_SESSION(s, NULL);
	if (len <= 0)
		return -ENOENT;
	if ((size_t)len > cap)
		return -ENOSPC;
	unsigned char *p = buf;
	i2d_SSL_SESSION(s, &p);
	return len;
}
