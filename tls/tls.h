/*
 * tls: OpenSSL 3 over memory BIOs, as a filter on a net connection
 * (struct net_filter_ops). The same code runs on any net backend: it never
 * touches a socket.
 *
 * Contexts (struct tls_ctx) are process-wide and shared by the workers: they
 * wrap an SSL_CTX that tls_ctx_reload replaces (SIGHUP) while connections
 * keep the one they started with (OpenSSL counts the references).
 *
 * Threads: tls_ctx_new_*, tls_ctx_reload and tls_ctx_free on any thread
 * (reload concurrently with the workers); tls_conn_* on the connection's
 * worker thread.
 *
 * Errors: functions return 0 or -errno; a handshake reports (through the
 * protocol's on_tls) -EPROTO (a protocol error: no common version or cipher,
 * a bad record), -EPROTONOSUPPORT (the peer offered only TLS < 1.2),
 * -EKEYREJECTED (the peer's certificate failed verification), -ECONNRESET
 * (the peer left during the handshake), -ETIMEDOUT (net's timers), with the
 * reason logged ("tls: <peer>: handshake failed: <OpenSSL reason>").
 */
#ifndef POSTHASTE_TLS_TLS_H
#define POSTHASTE_TLS_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "net/net.h"

struct tls_ctx;

/*
 * Default TLS 1.2 cipher list: forward secret AEAD only (Mozilla
 * "intermediate" without DHE), the client picks among them.
 */
#define TLS_CTX_CIPHERS                                                                            \
	"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"                               \
	"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"                               \
	"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
/*
 * The client's default adds the ECDHE CBC suites: opportunistic STARTTLS to
 * an old MTA is still better than plaintext.
 */
#define TLS_CTX_CLIENT_CIPHERS                                                                     \
	TLS_CTX_CIPHERS ":ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256:"                      \
	                "ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES256-SHA384:"                       \
	                "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:"                             \
	                "ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES256-SHA"
/* TLS 1.3 suites: all three, AES-128-GCM first (the cheapest with AES-NI). */
#define TLS_CTX_CIPHERSUITES                                                                       \
	"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
/* Key exchange groups. */
#define TLS_CTX_GROUPS "X25519:P-256:P-384"

/* Optional settings; a NULL pointer or a zero field means the default. */
struct tls_settings {
	const char *ciphers;      /* TLS 1.2 list, OpenSSL syntax */
	const char *ciphersuites; /* TLS 1.3 suites */
	const char *groups;       /* key exchange groups */
	int tickets; /* server: session tickets per full handshake (default 1; -1 none) */
};

enum tls_verify {
	TLS_VERIFY_NONE, /* opportunistic: the handshake succeeds whatever the certificate
	                    (whether it verified is still reported by tls_conn_info) */
	TLS_VERIFY_NAME, /* the chain must verify against the CAs and name the SNI host */
};

/*
 * A server context from PEM files: cert_file holds the certificate then its
 * chain, key_file the private key (may be the same file). TLS 1.2 and 1.3
 * only, renegotiation off, stateless session tickets (keys random per
 * process, kept across reloads). Returns NULL with a reason in err.
 */
struct tls_ctx *tls_ctx_new_server(const char *cert_file, const char *key_file,
                                   const struct tls_settings *s, char *err, size_t errlen);
/*
 * A client context: verify as above, CAs from ca_file (PEM) or, when NULL,
 * the system's default store. Returns NULL with a reason in err.
 */
struct tls_ctx *tls_ctx_new_client(enum tls_verify verify, const char *ca_file,
                                   const struct tls_settings *s, char *err, size_t errlen);
/*
 * Re-reads the files (certificate, key, CAs) into a new SSL_CTX used by the
 * connections started from now on; established connections keep theirs.
 * On failure the context is unchanged. Returns 0 or -errno with a reason.
 */
int tls_ctx_reload(struct tls_ctx *ctx, char *err, size_t errlen);
/* Frees the context (connections still using its SSL_CTX keep it). Accepts NULL; sets *ctx NULL. */
void tls_ctx_free(struct tls_ctx **ctx);

/*
 * Starts TLS on a connection (STARTTLS, or an outgoing implicit-TLS
 * connection from on_open): the server side for a server context, the client
 * side for a client one. For a client, sni is the name sent (and verified
 * with TLS_VERIFY_NAME; NULL sends none), and session/session_len an
 * optional session to resume (from tls_conn_session; ignored if unusable).
 * See net_conn_set_filter for what changes on the connection; the result
 * comes through the protocol's on_tls. Returns 0, or -ENOMEM, -EALREADY
 * (TLS already started), -EPIPE (the connection is closing).
 */
int tls_conn_start(struct net_conn *c, struct tls_ctx *ctx, const char *sni, const void *session,
                   size_t session_len);

/*
 * Adds an implicit-TLS listener (RFC 8314: ports 465, 993, 995): as
 * net_engine_listen, with the handshake run at accept; the protocol's on_open
 * comes after it succeeded (no on_tls), and a failed handshake never reaches
 * the protocol. Before net_engine_run only.
 */
int tls_listen(struct net_engine *e, const char *host, uint16_t port, const struct net_proto *proto,
               void *ctx, struct tls_ctx *tls);
/*
 * Makes listener number `i` of the engine (numbered as for
 * net_engine_listener_port) an implicit-TLS listener, as tls_listen would
 * have made it: for a protocol that adds its own listeners (the bench sink's
 * --tls-implicit over smtp_server_listen). The protocol is not told: its
 * on_open simply comes after the handshake. Before net_engine_run only.
 * Returns 0 or -EINVAL (a client context, no such listener, or one that
 * already has a filter).
 */
int tls_listener_implicit(struct net_engine *e, unsigned i, struct tls_ctx *tls);

/* What a connection negotiated, for the Received header and the accounting log. */
struct tls_info {
	const char *version; /* "TLSv1.3"; static strings */
	const char *cipher;  /* "TLS_AES_128_GCM_SHA256" */
	int bits;            /* symmetric key bits */
	bool resumed;        /* the session was resumed (no full handshake) */
	bool verified;       /* the peer sent a certificate that verified */
	const char *sni;     /* server side: the name the client asked for, or NULL;
	                        valid while the connection lives */
};

/* Fills *info once the handshake is done. Returns 0, or -ENOTCONN (no TLS, or not done). */
int tls_conn_info(const struct net_conn *c, struct tls_info *info);

/*
 * Client side: the newest resumable session of the connection, serialized
 * (DER) into buf, to give to tls_conn_start of the next connection to the
 * same destination. TLS 1.3 sends tickets after the handshake, so ask late
 * (e.g. in on_close). Returns the length, -ENOENT (no session yet), -ENOSPC
 * (buf too small; 4 KiB is always enough for ours), -ENOTCONN (no TLS).
 */
int tls_conn_session(const struct net_conn *c, void *buf, size_t cap);

#endif
