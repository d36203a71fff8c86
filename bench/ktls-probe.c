/*
 * ktls-probe: does kernel TLS pay on this machine? Bulk transfer over
 * loopback, sender and receiver in two processes (each pinned to its own CPU
 * unless --no-pin), in four ways:
 *
 *   plain  write()/read() on a TCP socket
 *   tls    OpenSSL over a socket BIO, records encrypted in user space (one
 *          write per 16 KiB record, two reads per record: header, body)
 *   tls-batched  the same with the records of each chunk gathered in a
 *          buffering BIO and written at once, and input read ahead in
 *          large reads: the system calls of tls/ (records batched into the
 *          send queue, recv of whole buffers), without its memory-BIO copies
 *   ktls   tls with SSL_OP_ENABLE_KTLS on both ends: after the handshake
 *          OpenSSL hands the keys to the kernel (setsockopt TCP_ULP "tls",
 *          TLS_TX / TLS_RX) and SSL_write/SSL_read become plain write/read
 *
 * For each: MB/s (10^6 octets/s) and the CPU time (user + system) per GiB of
 * the sender and of the receiver, data phase only (handshake excluded).
 * Whether kTLS was really used is what BIO_get_ktls_send/BIO_get_ktls_recv
 * say after the handshake; when the kernel lacks the tls ULP (no CONFIG_TLS,
 * or the module not loaded) a raw setsockopt(TCP_ULP, "tls") on a connected
 * socket tells why, and the ktls row says "not available".
 *
 * A standalone measurement tool: it is the one place besides tls/tls.c that
 * uses OpenSSL, because what it measures (a socket BIO, kTLS) is exactly
 * what tls/ does not do (memory BIOs, docs/tls.md).
 *
 * usage: ktls-probe [--bytes N[k|m|g]] [--chunk N[k|m]] [--mode plain|tls|tls-batched|ktls|all]
 *                   [--tls12] [--cipher aes128|aes256|chacha] [--no-pin] [--json]
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#ifndef TCP_ULP
#define TCP_ULP 31
#endif

enum probe_mode { MODE_PLAIN, MODE_TLS, MODE_BATCHED, MODE_KTLS, MODE_COUNT };
static const char *const mode_names[MODE_COUNT] = {"plain", "tls", "tls-batched", "ktls"};

/* tls-batched: the records of one chunk gathered before the write, input read ahead */
#define BATCH_BUF (256u << 10)

/* Options: set once in main, read-only after. */
struct probe_opts {
	uint64_t bytes;
	size_t chunk;
	bool tls12;
	const char *cipher; /* "aes128", "aes256", "chacha" */
	bool pin;
	bool json;
};

/* What one side measured over the data phase; the receiver sends its own through a pipe. */
struct side_result {
	uint64_t bytes;
	double elapsed_s;
	double cpu_s; /* user + system */
	int ktls;     /* 1 active, 0 not, -1 not TLS */
	int error;    /* 0, or a positive errno-like code */
	char why[160];
};

/* Server credentials, made once in the parent (inherited by the receiver). */
struct probe_creds {
	EVP_PKEY *key;
	X509 *cert;
};

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_s(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
	       (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static void pin_to(const struct probe_opts *o, int cpu)
{
	if (!o->pin || sysconf(_SC_NPROCESSORS_ONLN) < 2)
		return;
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	sched_setaffinity(0, sizeof(set), &set); /* best effort */
}

static void ssl_reason(char *buf, size_t cap, const char *what)
{
	unsigned long e = ERR_get_error();
	char r[120] = "no OpenSSL error queued";
	if (e)
		ERR_error_string_n(e, r, sizeof(r));
	snprintf(buf, cap, "%s: %s", what, r);
	ERR_clear_error();
}

/* A self-signed P-256 certificate for the receiver. 0 or -1. */
static int creds_make(struct probe_creds *c)
{
	c->key = EVP_EC_gen("P-256");
	c->cert = X509_new();
	if (!c->key || !c->cert)
		return -1;
	X509_set_version(c->cert, 2);
	ASN1_INTEGER_set(X509_get_serialNumber(c->cert), 1);
	X509_gmtime_adj(X509_getm_notBefore(c->cert), 0);
	X509_gmtime_adj(X509_getm_notAfter(c->cert), 86400);
	X509_NAME *n = X509_get_subject_name(c->cert);
	X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_ASC, (const unsigned char *)"ktls-probe", -1,
	                           -1, 0);
	X509_set_issuer_name(c->cert, n);
	X509_set_pubkey(c->cert, c->key);
	return X509_sign(c->cert, c->key, EVP_sha256()) > 0 ? 0 : -1;
}

static SSL_CTX *ctx_new(const struct probe_opts *o, const struct probe_creds *cr, bool server,
                        bool ktls)
{
	SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
	if (!ctx)
		return NULL;
	int v = o->tls12 ? TLS1_2_VERSION : TLS1_3_VERSION;
	SSL_CTX_set_min_proto_version(ctx, v);
	SSL_CTX_set_max_proto_version(ctx, v);
	const char *suite = !strcmp(o->cipher, "aes256")   ? "TLS_AES_256_GCM_SHA384"
	                    : !strcmp(o->cipher, "chacha") ? "TLS_CHACHA20_POLY1305_SHA256"
	                                                   : "TLS_AES_128_GCM_SHA256";
	const char *c12 = !strcmp(o->cipher, "aes256")   ? "ECDHE-ECDSA-AES256-GCM-SHA384"
	                  : !strcmp(o->cipher, "chacha") ? "ECDHE-ECDSA-CHACHA20-POLY1305"
	                                                 : "ECDHE-ECDSA-AES128-GCM-SHA256";
	if (!SSL_CTX_set_ciphersuites(ctx, suite) || !SSL_CTX_set_cipher_list(ctx, c12))
		goto fail;
	SSL_CTX_set_num_tickets(ctx, 0);
	SSL_CTX_set_default_read_buffer_len(ctx, BATCH_BUF); /* used only with read-ahead */
	if (ktls)
		SSL_CTX_set_options(ctx, SSL_OP_ENABLE_KTLS);
	if (server && (SSL_CTX_use_certificate(ctx, cr->cert) != 1 ||
	               SSL_CTX_use_PrivateKey(ctx, cr->key) != 1))
		goto fail;
	if (!server)
		SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
	return ctx;
fail:
	SSL_CTX_free(ctx);
	return NULL;
}

/* A listening socket on 127.0.0.1 and a connected pair through it. 0 or -errno. */
static int tcp_pair(int *client_r, int *server_r)
{
	int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (l < 0)
		return -errno;
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof(sa);
	int c = -1, r = 0;
	if (bind(l, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(l, 1) < 0 ||
	    getsockname(l, (struct sockaddr *)&sa, &len) < 0) {
		r = -errno;
		goto out;
	}
	c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c < 0 || connect(c, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		r = -errno;
		goto out;
	}
	int s = accept4(l, NULL, NULL, SOCK_CLOEXEC);
	if (s < 0) {
		r = -errno;
		goto out;
	}
	int one = 1;
	setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	*client_r = c;
	*server_r = s;
	c = -1;
out:
	if (c >= 0)
		close(c);
	close(l);
	return r;
}

/*
 * Can this kernel do TLS in the socket layer at all? Attaches the "tls" ULP
 * to a connected socket. 0, or -errno (ENOENT: no tls ULP in the kernel, as
 * without CONFIG_TLS or with the module not loaded).
 */
static int kernel_tls_ulp(void)
{
	int c, s;
	int r = tcp_pair(&c, &s);
	if (r < 0)
		return r;
	r = setsockopt(c, IPPROTO_TCP, TCP_ULP, "tls", sizeof("tls")) < 0 ? -errno : 0;
	close(c);
	close(s);
	return r;
}

static int full_write(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t k = write(fd, p, n);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return -errno;
		p += k;
		n -= (size_t)k;
	}
	return 0;
}

static int ktls_state(SSL *ssl, bool send)
{
	return send ? BIO_get_ktls_send(SSL_get_wbio(ssl)) : BIO_get_ktls_recv(SSL_get_rbio(ssl));
}

/* The receiving side (its own process): reads until EOF or close_notify. */
static void run_receiver(const struct probe_opts *o, enum probe_mode m, SSL_CTX *ctx, int fd,
                         struct side_result *res)
{
	char *buf = malloc(o->chunk);
	SSL *ssl = NULL;
	res->ktls = -1;
	if (!buf) {
		res->error = ENOMEM;
		return;
	}
	if (m != MODE_PLAIN) {
		ssl = SSL_new(ctx);
		if (!ssl || !SSL_set_fd(ssl, fd))
			goto hs_fail;
		if (m == MODE_BATCHED)
			SSL_set_read_ahead(ssl, 1);
		if (SSL_accept(ssl) != 1) {
		hs_fail:
			ssl_reason(res->why, sizeof(res->why), "receiver handshake");
			res->error = EPROTO;
			goto out;
		}
		res->ktls = ktls_state(ssl, false);
	}
	double c0 = cpu_s(), t0 = 0;
	for (;;) {
		ssize_t k;
		if (ssl) {
			k = SSL_read(ssl, buf, (int)o->chunk);
			if (k <= 0) {
				int e = SSL_get_error(ssl, (int)k);
				if (e != SSL_ERROR_ZERO_RETURN) {
					ssl_reason(res->why, sizeof(res->why), "SSL_read");
					res->error = EPROTO;
				}
				break;
			}
		} else {
			k = read(fd, buf, o->chunk);
			if (k < 0 && errno == EINTR)
				continue;
			if (k <= 0) {
				if (k < 0)
					res->error = errno;
				break;
			}
		}
		if (!res->bytes)
			t0 = now_s();
		res->bytes += (uint64_t)k;
	}
	res->elapsed_s = res->bytes ? now_s() - t0 : 0;
	res->cpu_s = cpu_s() - c0;
out:
	SSL_free(ssl);
	free(buf);
}

static void run_sender(const struct probe_opts *o, enum probe_mode m, SSL_CTX *ctx, int fd,
                       struct side_result *res)
{
	char *buf = malloc(o->chunk);
	SSL *ssl = NULL;
	res->ktls = -1;
	if (!buf) {
		res->error = ENOMEM;
		return;
	}
	for (size_t i = 0; i < o->chunk; i++)
		buf[i] = (char)('a' + i % 26);
	if (m != MODE_PLAIN) {
		ssl = SSL_new(ctx);
		if (!ssl || !SSL_set_fd(ssl, fd))
			goto hs_fail;
		if (m == MODE_BATCHED) {
			/* the socket BIO under a buffer: SSL_write's records pile up until the
			 * flush */
			BIO *b = BIO_new(BIO_f_buffer());
			if (!b || BIO_set_write_buffer_size(b, BATCH_BUF) != 1) {
				BIO_free(b);
				goto hs_fail;
			}
			BIO *sock = SSL_get_wbio(ssl);
			BIO_up_ref(sock);
			BIO_push(b, sock);
			SSL_set0_wbio(ssl, b);
		}
		if (SSL_connect(ssl) != 1) {
		hs_fail:
			ssl_reason(res->why, sizeof(res->why), "sender handshake");
			res->error = EPROTO;
			goto out;
		}
		res->ktls = ktls_state(ssl, true);
	}
	double c0 = cpu_s(), t0 = now_s();
	while (res->bytes < o->bytes) {
		size_t n =
		    o->bytes - res->bytes < o->chunk ? (size_t)(o->bytes - res->bytes) : o->chunk;
		if (ssl) {
			size_t done = 0;
			if (SSL_write_ex(ssl, buf, n, &done) != 1) {
				ssl_reason(res->why, sizeof(res->why), "SSL_write");
				res->error = EPROTO;
				break;
			}
			if (m == MODE_BATCHED && BIO_flush(SSL_get_wbio(ssl)) != 1) {
				ssl_reason(res->why, sizeof(res->why), "BIO_flush");
				res->error = EIO;
				break;
			}
		} else if ((res->error = -full_write(fd, buf, n)) != 0) {
			break;
		}
		res->bytes += n;
	}
	if (ssl) {
		SSL_shutdown(ssl); /* close_notify: the receiver's end of data */
		(void)BIO_flush(SSL_get_wbio(ssl));
	}
	shutdown(fd, SHUT_WR);
	res->elapsed_s = now_s() - t0;
	res->cpu_s = cpu_s() - c0;
out:
	SSL_free(ssl);
	free(buf);
}

/* One transfer; fills snd and rcv. 0, or -1 when it could not run (reason in snd->why). */
static int run_mode(const struct probe_opts *o, const struct probe_creds *cr, enum probe_mode m,
                    struct side_result *snd, struct side_result *rcv)
{
	memset(snd, 0, sizeof(*snd));
	memset(rcv, 0, sizeof(*rcv));
	SSL_CTX *sctx = NULL, *cctx = NULL;
	if (m != MODE_PLAIN) {
		sctx = ctx_new(o, cr, true, m == MODE_KTLS);
		cctx = ctx_new(o, cr, false, m == MODE_KTLS);
		if (!sctx || !cctx) {
			ssl_reason(snd->why, sizeof(snd->why), "SSL_CTX");
			SSL_CTX_free(sctx);
			SSL_CTX_free(cctx);
			return -1;
		}
	}
	int c, s, pfd[2];
	int r = tcp_pair(&c, &s);
	if (r < 0 || pipe(pfd) < 0) {
		snprintf(snd->why, sizeof(snd->why), "loopback pair: %s",
		         strerror(r < 0 ? -r : errno));
		SSL_CTX_free(sctx);
		SSL_CTX_free(cctx);
		return -1;
	}
	fflush(stdout);
	pid_t pid = fork();
	if (pid == 0) {
		close(c);
		close(pfd[0]);
		pin_to(o, 1);
		run_receiver(o, m, sctx, s, rcv);
		ssize_t w = write(pfd[1], rcv, sizeof(*rcv));
		_exit(w == (ssize_t)sizeof(*rcv) ? 0 : 1);
	}
	close(s);
	close(pfd[1]);
	if (pid < 0) {
		snprintf(snd->why, sizeof(snd->why), "fork: %s", strerror(errno));
		close(c);
		close(pfd[0]);
		SSL_CTX_free(sctx);
		SSL_CTX_free(cctx);
		return -1;
	}
	cpu_set_t old;
	sched_getaffinity(0, sizeof(old), &old);
	pin_to(o, 0);
	run_sender(o, m, cctx, c, snd);
	sched_setaffinity(0, sizeof(old), &old);
	close(c);
	ssize_t got = read(pfd[0], rcv, sizeof(*rcv));
	close(pfd[0]);
	int status;
	waitpid(pid, &status, 0);
	if (got != (ssize_t)sizeof(*rcv)) {
		memset(rcv, 0, sizeof(*rcv));
		rcv->error = EIO;
		snprintf(rcv->why, sizeof(rcv->why), "the receiver reported nothing");
	}
	SSL_CTX_free(sctx);
	SSL_CTX_free(cctx);
	return 0;
}

static uint64_t parse_size(const char *s)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || end == s || *s == '-')
		return 0;
	switch (*end) {
	case 'g':
	case 'G':
		v <<= 30;
		end++;
		break;
	case 'm':
	case 'M':
		v <<= 20;
		end++;
		break;
	case 'k':
	case 'K':
		v <<= 10;
		end++;
		break;
	default:
		break;
	}
	return *end ? 0 : v;
}

static void usage(FILE *f)
{
	fputs("usage: ktls-probe [options]\n"
	      "  --bytes N       octets per transfer (suffix k, m, g; default 1g)\n"
	      "  --chunk N       octets per write/SSL_write and read (default 100k)\n"
	      "  --mode M        plain, tls, tls-batched, ktls or all (default all)\n"
	      "  --tls12         TLS 1.2 (ECDHE-ECDSA) instead of 1.3\n"
	      "  --cipher C      aes128 (default), aes256 or chacha\n"
	      "  --no-pin        do not pin the sender to CPU 0 and the receiver to CPU 1\n"
	      "  --json          one JSON line per mode\n"
	      "Exit: 0 done (kTLS unavailable is a result, not an error), 1 a transfer failed, 2 "
	      "usage.\n",
	      f);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
	    {"bytes", required_argument, NULL, 'b'},
	    {"chunk", required_argument, NULL, 'c'},
	    {"mode", required_argument, NULL, 'm'},
	    {"tls12", no_argument, NULL, '2'},
	    {"cipher", required_argument, NULL, 'C'},
	    {"no-pin", no_argument, NULL, 'P'},
	    {"json", no_argument, NULL, 'j'},
	    {"help", no_argument, NULL, 'h'},
	    {NULL, 0, NULL, 0},
	};
	struct probe_opts o = {
	    .bytes = 1ull << 30, .chunk = 100 << 10, .cipher = "aes128", .pin = true};
	int only = -1, opt;
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (opt) {
		case 'b':
			if (!(o.bytes = parse_size(optarg)))
				return fprintf(stderr, "ktls-probe: bad --bytes\n"), 2;
			break;
		case 'c': {
			uint64_t v = parse_size(optarg);
			if (!v || v > (64u << 20))
				return fprintf(stderr, "ktls-probe: --chunk takes 1..64m\n"), 2;
			o.chunk = (size_t)v;
			break;
		}
		case 'm':
			if (!strcmp(optarg, "all"))
				only = -1;
			else if (!strcmp(optarg, "plain"))
				only = MODE_PLAIN;
			else if (!strcmp(optarg, "tls"))
				only = MODE_TLS;
			else if (!strcmp(optarg, "tls-batched"))
				only = MODE_BATCHED;
			else if (!strcmp(optarg, "ktls"))
				only = MODE_KTLS;
			else
				return fprintf(
				           stderr,
				           "ktls-probe: --mode plain|tls|tls-batched|ktls|all\n"),
				       2;
			break;
		case '2':
			o.tls12 = true;
			break;
		case 'C':
			if (strcmp(optarg, "aes128") && strcmp(optarg, "aes256") &&
			    strcmp(optarg, "chacha"))
				return fprintf(stderr,
				               "ktls-probe: --cipher aes128|aes256|chacha\n"),
				       2;
			o.cipher = optarg;
			break;
		case 'P':
			o.pin = false;
			break;
		case 'j':
			o.json = true;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind < argc) {
		usage(stderr);
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);

	struct probe_creds cr = {0};
	if (creds_make(&cr) < 0) {
		fprintf(stderr, "ktls-probe: cannot make a certificate\n");
		return 1;
	}
	int ulp = kernel_tls_ulp();
	const char *ulp_text =
	    ulp == 0 ? "available"
	    : ulp == -ENOENT
	        ? "not in this kernel (ENOENT: no CONFIG_TLS, or module tls not loaded)"
	        : strerror(-ulp);
	const char *ver = o.tls12 ? "TLSv1.2" : "TLSv1.3";
	if (!o.json)
		printf("%s, %s; %llu octets in %zu-octet writes; %s\n"
		       "kernel TLS (setsockopt TCP_ULP \"tls\"): %s\n"
		       "%-11s %8s %12s %12s  %s\n",
		       OpenSSL_version(OPENSSL_VERSION), ver, (unsigned long long)o.bytes, o.chunk,
		       o.pin ? "sender on CPU 0, receiver on CPU 1" : "not pinned", ulp_text,
		       "mode", "MB/s", "send CPU/GiB", "recv CPU/GiB", "notes");
	int rc = 0;
	for (int m = 0; m < MODE_COUNT; m++) {
		if (only >= 0 && m != only)
			continue;
		struct side_result snd, rcv;
		if (run_mode(&o, &cr, (enum probe_mode)m, &snd, &rcv) < 0) {
			fprintf(stderr, "ktls-probe: %s: %s\n", mode_names[m], snd.why);
			rc = 1;
			continue;
		}
		bool ok = !snd.error && !rcv.error && rcv.bytes == o.bytes;
		double el = snd.elapsed_s > rcv.elapsed_s ? snd.elapsed_s : rcv.elapsed_s;
		double gib = (double)o.bytes / (double)(1u << 30);
		double mbs = ok && el > 0 ? (double)o.bytes / el / 1e6 : 0;
		char notes[400];
		if (!ok)
			snprintf(notes, sizeof(notes), "FAILED: %s%s%s (received %llu)", snd.why,
			         *snd.why && *rcv.why ? "; " : "", rcv.why,
			         (unsigned long long)rcv.bytes);
		else if (m == MODE_KTLS)
			snprintf(notes, sizeof(notes), "kTLS send %s, receive %s%s",
			         snd.ktls > 0 ? "ACTIVE" : "not active",
			         rcv.ktls > 0 ? "ACTIVE" : "not active",
			         snd.ktls > 0 || rcv.ktls > 0
			             ? ""
			             : "; not available: this row is user-space TLS again");
		else
			notes[0] = '\0';
		if (!ok)
			rc = 1;
		if (o.json)
			printf(
			    "{\"mode\":\"%s\",\"version\":\"%s\",\"cipher\":\"%s\",\"bytes\":%llu,"
			    "\"chunk\":%zu,\"ok\":%s,\"mb_per_s\":%.1f,\"send_cpu_s_per_gib\":%.3f,"
			    "\"recv_cpu_s_per_gib\":%.3f,\"ktls_send\":%d,\"ktls_recv\":%d,"
			    "\"kernel_tls_ulp\":%s}\n",
			    mode_names[m], ver, o.cipher, (unsigned long long)o.bytes, o.chunk,
			    ok ? "true" : "false", mbs, snd.cpu_s / gib, rcv.cpu_s / gib, snd.ktls,
			    rcv.ktls, ulp == 0 ? "true" : "false");
		else
			printf("%-11s %8.0f %11.3fs %11.3fs  %s\n", mode_names[m], mbs,
			       snd.cpu_s / gib, rcv.cpu_s / gib, notes);
		fflush(stdout);
	}
	X509_free(cr.cert);
	EVP_PKEY_free(cr.key);
	return rc;
}
