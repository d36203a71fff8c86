/*
 * tls/ tests: a real engine with two echo listeners (one that switches to
 * TLS on "STARTTLS\n", one with implicit TLS), driven by clients in the same
 * engine (the client side of the filter) and by blocking OpenSSL clients on
 * the test thread. Certificates are generated at start (P-256, self-signed,
 * CN=localhost) into a temporary directory.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "core/clock.h"
#include "core/compiler.h"
#include "net/net.h"
#include "tls/tls.h"

#define MIB (1024u * 1024u)

static char tmpdir[64];
static char cert_path[128], key_path[128], cert2_path[128], key2_path[128];
static unsigned char *payload; /* 1 MiB pattern shared by every transfer */

/* ---- certificates ---- */

static void make_cert(const char *cert, const char *key, const char *cn)
{
	EVP_PKEY *pk = EVP_EC_gen("P-256");
	assert_non_null(pk);
	X509 *x = X509_new();
	X509_set_version(x, 2);
	ASN1_INTEGER_set(X509_get_serialNumber(x), (long)clock_ms());
	X509_gmtime_adj(X509_getm_notBefore(x), -3600);
	X509_gmtime_adj(X509_getm_notAfter(x), 86400);
	X509_set_pubkey(x, pk);
	X509_NAME *n = X509_get_subject_name(x);
	X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0);
	X509_set_issuer_name(x, n);
	X509V3_CTX v3;
	X509V3_set_ctx_nodb(&v3);
	X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
	X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, &v3, NID_subject_alt_name, "DNS:localhost");
	assert_non_null(ext);
	X509_add_ext(x, ext, -1);
	X509_EXTENSION_free(ext);
	assert_true(X509_sign(x, pk, EVP_sha256()) > 0);
	FILE *f = fopen(cert, "w");
	assert_non_null(f);
	PEM_write_X509(f, x);
	fclose(f);
	f = fopen(key, "w");
	assert_non_null(f);
	PEM_write_PrivateKey(f, pk, NULL, NULL, 0, NULL, NULL);
	fclose(f);
	X509_free(x);
	EVP_PKEY_free(pk);
}

static int group_setup(void **state)
{
	(void)state;
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/test_tls.XXXXXX");
	if (!mkdtemp(tmpdir))
		return -1;
	snprintf(cert_path, sizeof(cert_path), "%s/cert.pem", tmpdir);
	snprintf(key_path, sizeof(key_path), "%s/key.pem", tmpdir);
	snprintf(cert2_path, sizeof(cert2_path), "%s/cert2.pem", tmpdir);
	snprintf(key2_path, sizeof(key2_path), "%s/key2.pem", tmpdir);
	make_cert(cert_path, key_path, "localhost");
	make_cert(cert2_path, key2_path, "reloaded");
	payload = malloc(MIB);
	for (size_t i = 0; i < MIB; i++)
		payload[i] = (unsigned char)('a' + (i * 7 + i / 4096) % 26);
	return 0;
}

static int group_teardown(void **state)
{
	(void)state;
	unlink(cert_path);
	unlink(key_path);
	unlink(cert2_path);
	unlink(key2_path);
	rmdir(tmpdir);
	free(payload);
	return 0;
}

/* ---- the server: echo, STARTTLS on "STARTTLS\n" (plaintext listener), close on "QUIT\n" ---- */

struct srv {
	struct tls_ctx *tls;
	_Atomic unsigned opens, closes, tls_ok, tls_fail, injected, writable, resumed;
	_Atomic int tls_err;
};

struct sconn {
	bool tls_started;
};

static void srv_note_tls(struct net_conn *c, struct srv *x)
{
	struct tls_info i;
	if (tls_conn_info(c, &i) == 0 && i.resumed)
		x->resumed++;
}

static void srv_open(struct net_conn *c, int err)
{
	struct srv *x = net_conn_listener_ctx(c);
	assert_int_equal(err, 0);
	x->opens++;
	struct sconn *sc = calloc(1, sizeof(*sc));
	assert_non_null(sc);
	net_conn_set_data(c, sc);
	if (net_conn_filter_ready(c)) { /* implicit TLS: the handshake is done */
		sc->tls_started = true;
		srv_note_tls(c, x);
	}
}

static void srv_data(struct net_conn *c, const struct iovec *iov, unsigned n)
{
	struct srv *x = net_conn_listener_ctx(c);
	struct sconn *sc = net_conn_data(c);
	for (unsigned i = 0; i < n; i++) {
		const char *p = iov[i].iov_base;
		size_t len = iov[i].iov_len;
		const char *st = sc->tls_started ? NULL : memmem(p, len, "STARTTLS\n", 9);
		if (st) {
			net_send(c, p, (size_t)(st - p));
			net_send(c, "GO\n", 3); /* plaintext: queued before the switch */
			sc->tls_started = true;
			assert_int_equal(tls_conn_start(c, x->tls, NULL, NULL, 0), 0);
			return; /* whatever followed STARTTLS is dropped (CVE-2011-0411) */
		}
		/* everything from here on is taken as the peer's input */
		if (memmem(p, len, "INJECT", 6))
			x->injected++;
		const char *q = memmem(p, len, "QUIT\n", 5);
		int r = net_send(c, p, q ? (size_t)(q - p) + 5 : len);
		if (r < 0) {
			net_conn_abort(c, r);
			return;
		}
		if (q) {
			net_conn_close(c);
			return;
		}
	}
}

static void srv_writable(struct net_conn *c)
{
	struct srv *x = net_conn_listener_ctx(c);
	x->writable++;
}

static void srv_tls(struct net_conn *c, int err)
{
	struct srv *x = net_conn_listener_ctx(c);
	if (err) {
		x->tls_err = err;
		x->tls_fail++;
		return;
	}
	x->tls_ok++;
	srv_note_tls(c, x);
}

static void srv_close(struct net_conn *c, int err)
{
	(void)err;
	struct srv *x = net_conn_listener_ctx(c);
	free(net_conn_data(c));
	x->closes++;
}

static const struct net_proto srv_proto = {
    .on_open = srv_open,
    .on_data = srv_data,
    .on_writable = srv_writable,
    .on_close = srv_close,
    .on_tls = srv_tls,
};

/* ---- a client in the engine: optional STARTTLS, then pushes `total` octets and checks the echo
 * ---- */

struct cli {
	struct sockaddr_in to;
	struct tls_ctx *tls;
	bool starttls;
	const char *sni;
	unsigned char sess_in[4096];
	int sess_in_len;
	unsigned char sess_out[4096];
	int sess_out_len;
	size_t total, window;
	size_t sent, got;
	char pre[64];
	size_t pre_len;
	bool in_tls, mismatch;
	int open_err, tls_err, close_err;
	bool tls_done, resumed, verified;
	char version[16];
	_Atomic bool closed;
};

static void cli_pump(struct net_conn *c)
{
	struct cli *k = net_conn_data(c);
	size_t hw = 64 * 1024; /* the harness's out_high_water */
	while (k->sent < k->total && k->sent - k->got < k->window && net_conn_pending(c) <= hw) {
		size_t n =
		    MIN(MIN((size_t)65536, k->total - k->sent), k->window - (k->sent - k->got));
		/* alternate copies and references: both paths go through the filter */
		int r = (k->sent / 65536) % 2 ? net_send(c, payload + k->sent, n)
		                              : net_send_ref(c, payload + k->sent, n);
		assert_int_equal(r, 0);
		k->sent += n;
	}
	if (k->total && k->got == k->total)
		net_conn_close(c);
}

static void cli_begin_tls(struct net_conn *c)
{
	struct cli *k = net_conn_data(c);
	k->in_tls = true;
	int r = tls_conn_start(c, k->tls, k->sni, k->sess_in_len ? k->sess_in : NULL,
	                       (size_t)k->sess_in_len);
	assert_int_equal(r, 0);
}

static void cli_open(struct net_conn *c, int err)
{
	struct cli *k = net_conn_data(c);
	k->open_err = err;
	if (err)
		return;
	if (k->starttls)
		net_send(c, "hello\nSTARTTLS\n", 15);
	else
		cli_begin_tls(c); /* implicit TLS from the client side */
}

static void cli_data(struct net_conn *c, const struct iovec *iov, unsigned n)
{
	struct cli *k = net_conn_data(c);
	for (unsigned i = 0; i < n; i++) {
		const unsigned char *p = iov[i].iov_base;
		size_t len = iov[i].iov_len;
		if (!k->in_tls) {
			size_t m = MIN(len, sizeof(k->pre) - 1 - k->pre_len);
			memcpy(k->pre + k->pre_len, p, m);
			k->pre_len += m;
			if (strstr(k->pre, "GO\n")) {
				cli_begin_tls(c);
				return; /* nothing after the go-ahead is plaintext we may use */
			}
			continue;
		}
		if (k->got + len > k->total || memcmp(payload + k->got, p, len) != 0)
			k->mismatch = true;
		k->got += len;
	}
	if (k->in_tls && k->tls_done)
		cli_pump(c);
}

static void cli_tls(struct net_conn *c, int err)
{
	struct cli *k = net_conn_data(c);
	k->tls_err = err;
	if (err)
		return;
	k->tls_done = true;
	struct tls_info i;
	assert_int_equal(tls_conn_info(c, &i), 0);
	k->resumed = i.resumed;
	k->verified = i.verified;
	snprintf(k->version, sizeof(k->version), "%s", i.version);
	if (!k->total)
		net_conn_close(c);
	else
		cli_pump(c);
}

static void cli_writable(struct net_conn *c)
{
	struct cli *k = net_conn_data(c);
	if (k->tls_done)
		cli_pump(c);
}

static void cli_close(struct net_conn *c, int err)
{
	struct cli *k = net_conn_data(c);
	k->close_err = err;
	k->sess_out_len = tls_conn_session(c, k->sess_out, sizeof(k->sess_out));
	k->closed = true;
}

static const struct net_proto cli_proto = {
    .on_open = cli_open,
    .on_data = cli_data,
    .on_writable = cli_writable,
    .on_close = cli_close,
    .on_tls = cli_tls,
};

/* ---- harness: one worker, a STARTTLS listener and an implicit-TLS one ---- */

struct harness {
	struct net_engine *e;
	pthread_t thread;
	int run_result;
	uint16_t port_plain, port_tls;
	struct srv plain, implicit;
	struct tls_ctx *server_tls, *client_tls;
	int efd; /* the test thread asks the worker to dial `next` */
	struct net_io dial_io;
	struct net_worker *w;
	struct cli *_Atomic next;
};

static void dial_done(struct net_io *io, int res)
{
	struct harness *h = container_of(io, struct harness, dial_io);
	if (res < 0)
		return;
	uint64_t v;
	assert_int_equal(read(h->efd, &v, sizeof(v)), (ssize_t)sizeof(v));
	struct cli *k = atomic_exchange(&h->next, NULL);
	if (k) {
		int r = net_connect(h->w, (struct sockaddr *)&k->to, sizeof(k->to), &cli_proto, k);
		if (r < 0) {
			k->open_err = r;
			k->closed = true;
		}
	}
	net_poll_add(h->w, h->efd, POLLIN, &h->dial_io);
}

static int h_init(struct net_worker *w, void *arg)
{
	struct harness *h = arg;
	h->w = w;
	h->dial_io.done = dial_done;
	return net_poll_add(w, h->efd, POLLIN, &h->dial_io);
}

static void *run_engine(void *arg)
{
	struct harness *h = arg;
	h->run_result = net_engine_run(h->e);
	return NULL;
}

static void harness_start(struct harness *h)
{
	char err[256];
	h->server_tls = tls_ctx_new_server(cert_path, key_path, NULL, err, sizeof(err));
	if (!h->server_tls)
		fail_msg("server ctx: %s", err);
	h->client_tls = tls_ctx_new_client(TLS_VERIFY_NONE, NULL, NULL, err, sizeof(err));
	if (!h->client_tls)
		fail_msg("client ctx: %s", err);
	h->plain.tls = h->server_tls;
	h->implicit.tls = h->server_tls;
	h->efd = eventfd(0, EFD_CLOEXEC);
	assert_true(h->efd >= 0);
	struct net_config cfg;
	net_config_default(&cfg);
	cfg.workers = 1;
	cfg.pin = false;
	cfg.buf_count = 256;
	cfg.out_high_water = 64 * 1024;
	cfg.out_low_water = 16 * 1024;
	cfg.handshake_timeout_ms = 2000;
	struct net_worker_hooks hooks = {.init = h_init, .arg = h};
	h->e = net_engine_new(&cfg, &hooks);
	assert_non_null(h->e);
	assert_int_equal(net_engine_listen(h->e, "127.0.0.1", 0, &srv_proto, &h->plain), 0);
	assert_int_equal(tls_listen(h->e, "127.0.0.1", 0, &srv_proto, &h->implicit, h->server_tls),
	                 0);
	h->port_plain = net_engine_listener_port(h->e, 0);
	h->port_tls = net_engine_listener_port(h->e, 1);
	assert_int_equal(pthread_create(&h->thread, NULL, run_engine, h), 0);
}

static void harness_stop(struct harness *h)
{
	net_engine_stop(h->e);
	pthread_join(h->thread, NULL);
	assert_int_equal(h->run_result, 0);
	net_engine_free(&h->e);
	close(h->efd);
	tls_ctx_free(&h->server_tls);
	tls_ctx_free(&h->client_tls);
	assert_null(h->server_tls);
}

static bool wait_true(_Atomic bool *v, unsigned ms)
{
	uint64_t deadline = clock_ms() + ms;
	while (!*v && clock_ms() < deadline)
		usleep(1000);
	return *v;
}

static bool wait_count(_Atomic unsigned *v, unsigned want, unsigned ms)
{
	uint64_t deadline = clock_ms() + ms;
	while (*v < want && clock_ms() < deadline)
		usleep(1000);
	return *v >= want;
}

/* Runs an engine client to the end of its connection. */
static void run_client(struct harness *h, struct cli *k, uint16_t port)
{
	k->to = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons(port)};
	inet_pton(AF_INET, "127.0.0.1", &k->to.sin_addr);
	if (!k->tls)
		k->tls = h->client_tls;
	h->next = k;
	uint64_t one = 1;
	assert_int_equal(write(h->efd, &one, sizeof(one)), (ssize_t)sizeof(one));
	assert_true(wait_true(&k->closed, 20000));
}

/* ---- test-thread clients ---- */

static int dial(uint16_t port)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	assert_true(fd >= 0);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
	inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
	assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	struct timeval tv = {.tv_sec = 10};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	return fd;
}

static void read_exact(int fd, char *buf, size_t n)
{
	size_t got = 0;
	while (got < n) {
		ssize_t r = read(fd, buf + got, n - got);
		assert_true(r > 0);
		got += (size_t)r;
	}
}

static SSL_CTX *test_client_ctx(int version)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
	assert_non_null(ctx);
	SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
	if (version) {
		SSL_CTX_set_security_level(ctx, 0);
		SSL_CTX_set_cipher_list(ctx, "DEFAULT:@SECLEVEL=0");
		SSL_CTX_set_min_proto_version(ctx, version);
		SSL_CTX_set_max_proto_version(ctx, version);
	}
	return ctx;
}

/* A blocking TLS client on fd; NULL if the handshake fails. */
static SSL *ssl_connect(SSL_CTX *ctx, int fd)
{
	SSL *ssl = SSL_new(ctx);
	SSL_set_fd(ssl, fd);
	SSL_set_tlsext_host_name(ssl, "localhost");
	if (SSL_connect(ssl) != 1) {
		ERR_clear_error();
		SSL_free(ssl);
		return NULL;
	}
	return ssl;
}

static void ssl_echo(SSL *ssl, const char *msg)
{
	size_t n = strlen(msg);
	char got[256];
	assert_int_equal(SSL_write(ssl, msg, (int)n), (int)n);
	size_t have = 0;
	while (have < n) {
		int r = SSL_read(ssl, got + have, (int)(n - have));
		assert_true(r > 0);
		have += (size_t)r;
	}
	assert_memory_equal(got, msg, n);
}

/* ---- tests ---- */

/* plaintext, STARTTLS, then 1 MiB each way through TLS, both ends in the engine */
static void test_starttls_echo(void **state)
{
	(void)state;
	struct harness h = {0};
	harness_start(&h);
	struct cli k = {.starttls = true, .sni = "localhost", .total = MIB, .window = 256 * 1024};
	run_client(&h, &k, h.port_plain);
	assert_int_equal(k.open_err, 0);
	assert_int_equal(k.tls_err, 0);
	assert_true(k.tls_done);
	assert_string_equal(k.pre, "hello\nGO\n");
	assert_int_equal(k.got, MIB);
	assert_false(k.mismatch);
	assert_string_equal(k.version, "TLSv1.3");
	assert_false(k.verified); /* self-signed, not in the system store */
	assert_int_equal(k.close_err, 0);
	assert_true(wait_count(&h.plain.closes, 1, 5000));
	assert_int_equal(h.plain.tls_ok, 1);
	assert_int_equal(h.plain.tls_fail, 0);
	harness_stop(&h);
}

/* implicit TLS: the server's on_open comes after the handshake */
static void test_implicit_echo(void **state)
{
	(void)state;
	struct harness h = {0};
	harness_start(&h);
	struct cli k = {.sni = "localhost", .total = MIB, .window = MIB};
	run_client(&h, &k, h.port_tls);
	assert_int_equal(k.tls_err, 0);
	assert_int_equal(k.got, MIB);
	assert_false(k.mismatch);
	assert_true(wait_count(&h.implicit.closes, 1, 5000));
	assert_int_equal(h.implicit.opens, 1);
	assert_int_equal(h.implicit.tls_ok, 0); /* no on_tls for implicit TLS */
	harness_stop(&h);
}

/* the second connection resumes with the session the first one kept */
static void test_resumption(void **state)
{
	(void)state;
	struct harness h = {0};
	harness_start(&h);
	struct cli a = {.sni = "localhost", .total = 1000, .window = 1000};
	run_client(&h, &a, h.port_tls);
	assert_int_equal(a.tls_err, 0);
	assert_false(a.resumed);
	assert_true(a.sess_out_len > 0);

	struct cli b = {.sni = "localhost", .total = 1000, .window = 1000};
	memcpy(b.sess_in, a.sess_out, (size_t)a.sess_out_len);
	b.sess_in_len = a.sess_out_len;
	run_client(&h, &b, h.port_tls);
	assert_int_equal(b.tls_err, 0);
	assert_true(b.resumed);
	assert_int_equal(b.got, 1000);

	/* and over STARTTLS, with the session of the resumed connection */
	struct cli c = {.starttls = true, .sni = "localhost", .total = 1000, .window = 1000};
	assert_true(b.sess_out_len > 0);
	memcpy(c.sess_in, b.sess_out, (size_t)b.sess_out_len);
	c.sess_in_len = b.sess_out_len;
	run_client(&h, &c, h.port_plain);
	assert_true(c.resumed);
	assert_true(wait_count(&h.plain.closes, 1, 5000));
	assert_int_equal(h.implicit.resumed, 1);
	assert_int_equal(h.plain.resumed, 1);

	/* a garbage session is ignored: a full handshake */
	struct cli d = {
	    .sni = "localhost", .total = 10, .window = 10, .sess_in = "junk", .sess_in_len = 4};
	run_client(&h, &d, h.port_tls);
	assert_int_equal(d.tls_err, 0);
	assert_false(d.resumed);
	harness_stop(&h);
}

/* a client that speaks only TLS 1.1 is refused, on both listeners */
static void test_tls11_refused(void **state)
{
	(void)state;
	struct harness h = {0};
	harness_start(&h);
	SSL_CTX *old = test_client_ctx(TLS1_1_VERSION);

	int fd = dial(h.port_tls);
	assert_null(ssl_connect(old, fd));
	close(fd);

	fd = dial(h.port_plain);
	assert_int_equal(write(fd, "STARTTLS\n", 9), 9);
	char go[3];
	read_exact(fd, go, 3);
	assert_memory_equal(go, "GO\n", 3);
	assert_null(ssl_connect(old, fd));
	close(fd);
	assert_true(wait_count(&h.plain.closes, 1, 5000));
	assert_int_equal(h.plain.tls_fail, 1);
	assert_int_equal(h.plain.tls_err, -EPROTONOSUPPORT);

	/* TLS 1.2 is accepted */
	SSL_CTX *v12 = test_client_ctx(TLS1_2_VERSION);
	fd = dial(h.port_tls);
	SSL *ssl = ssl_connect(v12, fd);
	assert_non_null(ssl);
	assert_string_equal(SSL_get_version(ssl), "TLSv1.2");
	ssl_echo(ssl, "twelve\n");
	SSL_free(ssl);
	close(fd);
	assert_true(wait_count(&h.implicit.closes, 1, 5000));
	assert_int_equal(h.implicit.opens, 1); /* the refused one never opened */
	SSL_CTX_free(old);
	SSL_CTX_free(v12);
	harness_stop(&h);
}

/* Compares octets at stream offset `off` with the payload, which repeats every MiB. */
static bool payload_matches(size_t off, const char *p, size_t n)
{
	while (n) {
		size_t k = MIN(n, MIB - off % MIB);
		if (memcmp(p, payload + off % MIB, k) != 0)
			return false;
		off += k;
		p += k;
		n -= k;
	}
	return true;
}

/*
 * Through TLS to a peer that does not read at first (up to 8 MiB: loopback
 * buffers take several): the server must stop reading past its high-water
 * mark, then deliver every byte in order once the peer reads.
 */
static void test_back_pressure(void **state)
{
	(void)state;
	struct harness h = {0};
	harness_start(&h);
	SSL_CTX *ctx = test_client_ctx(0);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	int small = 16 * 1024;
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(h.port_tls)};
	inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
	assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	SSL *ssl = ssl_connect(ctx, fd);
	assert_non_null(ssl);
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);

	const size_t limit = 8 * MIB;
	size_t sent = 0, got = 0, chunk = 0;
	bool mismatch = false;
	/* phase 1: write without reading, until nothing is writable for 1.5 s (a loaded
	   machine may pause the engine that long: not before 256 KiB are out) */
	uint64_t until = clock_ms() + 15000;
	while (sent < limit) {
		struct pollfd p = {.fd = fd, .events = POLLOUT};
		if (poll(&p, 1, 1500) == 0) {
			if (sent >= 256 * 1024 || clock_ms() > until)
				break;
			continue;
		}
		if (!chunk)
			chunk = 16384;
		int r = SSL_write(ssl, payload + sent % MIB, (int)chunk);
		if (r > 0) {
			sent += (size_t)r;
			chunk = 0;
		} else {
			assert_int_equal(SSL_get_error(ssl, r), SSL_ERROR_WANT_WRITE);
		}
	}
	/* the kernel may take it all (tcp_rmem can autotune far): the server's
	   on_writable below is what proves it stopped reading past high water */
	if (sent < 256 * 1024)
		fail_msg("sent only %zu", sent);
	size_t total = sent;
	/* phase 2: read everything back */
	static char buf[65536];
	uint64_t deadline = clock_ms() + 20000;
	while (got < total && clock_ms() < deadline) {
		struct pollfd p = {.fd = fd, .events = POLLIN};
		if (!SSL_pending(ssl))
			poll(&p, 1, 1000);
		int r = SSL_read(ssl, buf, sizeof(buf));
		if (r > 0) {
			if (!payload_matches(got, buf, (size_t)r))
				mismatch = true;
			got += (size_t)r;
		} else {
			int e = SSL_get_error(ssl, r);
			assert_true(e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE);
		}
	}
	assert_int_equal(got, total);
	assert_false(mismatch);
	assert_true(h.implicit.writable >= 1); /* back-pressure engaged and released */
	SSL_free(ssl);
	close(fd);
	SSL_CTX_free(ctx);
	assert_true(wait_count(&h.implicit.closes, 1, 5000));
	harness_stop(&h);
}

/* a peer that leaves in the middle of the handshake */
static void test_close_mid_handshake(void **state)
{
	(void)state;
	struct harness h = {0};
	harness_start(&h);
	static const char partial[] = "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";

	int fd = dial(h.port_plain);
	assert_int_equal(write(fd, "STARTTLS\n", 9), 9);
	char go[3];
	read_exact(fd, go, 3);
	assert_int_equal(write(fd, partial, sizeof(partial) - 1), (ssize_t)sizeof(partial) - 1);
	close(fd);
	assert_true(wait_count(&h.plain.closes, 1, 5000));
	assert_int_equal(h.plain.tls_fail, 1);
	assert_int_equal(h.plain.tls_err, -ECONNRESET);

	/* implicit: never reaches the protocol */
	fd = dial(h.port_tls);
	assert_int_equal(write(fd, partial, sizeof(partial) - 1), (ssize_t)sizeof(partial) - 1);
	close(fd);
	/* and one that says nothing: dropped after handshake_timeout_ms (2 s here) */
	int idle = dial(h.port_tls);
	char c;
	uint64_t t0 = clock_ms();
	ssize_t r = read(idle, &c, 1);
	assert_true(r == 0 || (r < 0 && errno == ECONNRESET));
	uint64_t took = clock_ms() - t0;
	assert_true(took >= 1500 && took < 8000);
	close(idle);
	assert_int_equal(h.implicit.opens, 0);
	assert_int_equal(h.implicit.closes, 0);
	harness_stop(&h);
}

/* octets pipelined after STARTTLS are never delivered (CVE-2011-0411) */
static void test_pipelined_injection(void **state)
{
	(void)state;
	struct harness h = {0};
	harness_start(&h);
	SSL_CTX *ctx = test_client_ctx(0);

	/* in the same segment as STARTTLS: the protocol drops them, the handshake proceeds */
	int fd = dial(h.port_plain);
	const char *cmd = "hello\nSTARTTLS\nINJECT\n";
	assert_int_equal(write(fd, cmd, strlen(cmd)), (ssize_t)strlen(cmd));
	char got[9];
	read_exact(fd, got, 9);
	assert_memory_equal(got, "hello\nGO\n", 9);
	SSL *ssl = ssl_connect(ctx, fd);
	assert_non_null(ssl);
	ssl_echo(ssl, "after\n");
	SSL_shutdown(ssl);
	SSL_free(ssl);
	close(fd);
	assert_true(wait_count(&h.plain.closes, 1, 5000));
	assert_int_equal(h.plain.tls_ok, 1);

	/* after the go-ahead, in plaintext: taken as a TLS record, the handshake fails */
	fd = dial(h.port_plain);
	assert_int_equal(write(fd, "STARTTLS\n", 9), 9);
	read_exact(fd, got, 3);
	assert_int_equal(write(fd, "INJECT\n", 7), 7);
	char c;
	ssize_t r;
	while ((r = read(fd, &c, 1)) > 0) /* an alert, then EOF */
		;
	close(fd);
	assert_true(wait_count(&h.plain.closes, 2, 5000));
	assert_int_equal(h.plain.tls_fail, 1);
	assert_true(h.plain.tls_err == -EPROTO || h.plain.tls_err == -EPROTONOSUPPORT);
	assert_int_equal(h.plain.injected, 0);
	SSL_CTX_free(ctx);
	harness_stop(&h);
}

/* the client verifies the name against the CA file */
static void test_verify_name(void **state)
{
	(void)state;
	struct harness h = {0};
	harness_start(&h);
	char err[256];
	struct tls_ctx *strict =
	    tls_ctx_new_client(TLS_VERIFY_NAME, cert_path, NULL, err, sizeof(err));
	if (!strict)
		fail_msg("%s", err);
	struct cli a = {.tls = strict, .sni = "localhost", .total = 100, .window = 100};
	run_client(&h, &a, h.port_tls);
	assert_int_equal(a.tls_err, 0);
	assert_true(a.verified);

	struct cli b = {.tls = strict, .sni = "mx.example.org", .total = 100, .window = 100};
	run_client(&h, &b, h.port_tls);
	assert_int_equal(b.tls_err, -EKEYREJECTED);
	assert_false(b.tls_done);
	harness_stop(&h);
	tls_ctx_free(&strict);

	assert_null(tls_ctx_new_server("/nonexistent.pem", key_path, NULL, err, sizeof(err)));
	assert_non_null(strstr(err, "/nonexistent.pem"));
	assert_null(
	    tls_ctx_new_server(cert_path, key2_path, NULL, err, sizeof(err))); /* mismatch */
	struct tls_settings bad = {.ciphers = "NO-SUCH-CIPHER"};
	assert_null(tls_ctx_new_server(cert_path, key_path, &bad, err, sizeof(err)));
}

static char *peer_cn(SSL *ssl, char *buf, size_t len)
{
	X509 *x = SSL_get1_peer_certificate(ssl);
	assert_non_null(x);
	X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, buf, (int)len);
	X509_free(x);
	return buf;
}

static void copy_file(const char *from, const char *to)
{
	char buf[8192];
	FILE *a = fopen(from, "r"), *b = fopen(to, "w");
	assert_non_null(a);
	assert_non_null(b);
	size_t n;
	while ((n = fread(buf, 1, sizeof(buf), a)) > 0)
		assert_int_equal(fwrite(buf, 1, n, b), n);
	fclose(a);
	fclose(b);
}

/* reload: new connections get the new certificate, established ones go on, tickets still resume */
static void test_reload(void **state)
{
	(void)state;
	char live_cert[160], live_key[160], err[256], cn[64];
	snprintf(live_cert, sizeof(live_cert), "%s/live-cert.pem", tmpdir);
	snprintf(live_key, sizeof(live_key), "%s/live-key.pem", tmpdir);
	copy_file(cert_path, live_cert);
	copy_file(key_path, live_key);
	struct harness h = {0};
	harness_start(&h);
	/* point the listeners at a context over the live files */
	struct tls_ctx *live = tls_ctx_new_server(live_cert, live_key, NULL, err, sizeof(err));
	assert_non_null(live);
	h.implicit.tls = live; /* only used for STARTTLS; the implicit listener keeps server_tls */
	h.plain.tls = live;

	SSL_CTX *ctx = test_client_ctx(0);
	int fd1 = dial(h.port_plain);
	assert_int_equal(write(fd1, "STARTTLS\n", 9), 9);
	char go[3];
	read_exact(fd1, go, 3);
	SSL *before = ssl_connect(ctx, fd1);
	assert_non_null(before);
	assert_string_equal(peer_cn(before, cn, sizeof(cn)), "localhost");

	struct cli a = {.starttls = true, .sni = "localhost", .total = 100, .window = 100};
	run_client(&h, &a, h.port_plain);
	assert_true(a.sess_out_len > 0);

	/* a reload that fails leaves everything as it was */
	copy_file(key2_path, live_key); /* the key no longer matches the certificate */
	assert_true(tls_ctx_reload(live, err, sizeof(err)) < 0);
	copy_file(cert2_path, live_cert);
	assert_int_equal(tls_ctx_reload(live, err, sizeof(err)), 0);

	int fd2 = dial(h.port_plain);
	assert_int_equal(write(fd2, "STARTTLS\n", 9), 9);
	read_exact(fd2, go, 3);
	SSL *after = ssl_connect(ctx, fd2);
	assert_non_null(after);
	assert_string_equal(peer_cn(after, cn, sizeof(cn)), "reloaded");
	ssl_echo(before, "still here\n"); /* the old context lives on with its connection */
	ssl_echo(after, "new\n");

	struct cli b = {.starttls = true, .sni = "localhost", .total = 100, .window = 100};
	memcpy(b.sess_in, a.sess_out, (size_t)a.sess_out_len);
	b.sess_in_len = a.sess_out_len;
	run_client(&h, &b, h.port_plain);
	assert_int_equal(b.tls_err, 0);
	assert_true(b.resumed); /* ticket keys survive the reload */

	SSL_free(before);
	SSL_free(after);
	close(fd1);
	close(fd2);
	SSL_CTX_free(ctx);
	harness_stop(&h);
	tls_ctx_free(&live); /* after the connections that used it */
	unlink(live_cert);
	unlink(live_key);
}

/* the openssl command-line client against the implicit-TLS echo */
static void test_s_client(void **state)
{
	(void)state;
	if (system("command -v openssl >/dev/null 2>&1") != 0)
		skip();
	struct harness h = {0};
	harness_start(&h);
	char cmd[256];
	snprintf(cmd, sizeof(cmd),
	         "printf 'ping\\nQUIT\\n' | timeout 10 openssl s_client -connect 127.0.0.1:%u "
	         "-servername localhost -quiet -ign_eof 2>/dev/null",
	         h.port_tls);
	FILE *p = popen(cmd, "r");
	assert_non_null(p);
	char out[256] = {0};
	size_t n = fread(out, 1, sizeof(out) - 1, p);
	pclose(p);
	assert_true(n > 0);
	assert_string_equal(out, "ping\nQUIT\n");
	assert_true(wait_count(&h.implicit.closes, 1, 5000));
	harness_stop(&h);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_starttls_echo),
	    cmocka_unit_test(test_implicit_echo),
	    cmocka_unit_test(test_resumption),
	    cmocka_unit_test(test_tls11_refused),
	    cmocka_unit_test(test_back_pressure),
	    cmocka_unit_test(test_close_mid_handshake),
	    cmocka_unit_test(test_pipelined_injection),
	    cmocka_unit_test(test_verify_name),
	    cmocka_unit_test(test_reload),
	    cmocka_unit_test(test_s_client),
	};
	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
