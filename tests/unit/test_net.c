/*
 * net/ engine tests: a real engine on a loopback port, driven by plain
 * blocking sockets from the test thread. Run inside a network namespace by
 * tools/test.sh (loopback only).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <stdio.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/clock.h"
#include "core/compiler.h"
#include "net/net.h"

/* ---- a tiny protocol: echo, with knobs ---- */

struct echo_ctx {
	unsigned multiply;      /* echo each input this many times */
	unsigned timeout_ms;    /* arm a timer in on_open */
	bool shutdown_bye;      /* say BYE at shutdown */
	bool use_ref;           /* mix net_send_ref into the echo */
	bool use_release;       /* echo through net_send_ref_release of a heap copy */
	bool abort_after_send;  /* abort the connection right after queueing the echo */
	_Atomic unsigned opens, closes, timeouts, writable;
	_Atomic unsigned releases;            /* release callbacks run */
	_Atomic unsigned releases_at_close;   /* releases seen when on_close ran */
	size_t max_pending;
};

static const char ref_text[] = "[ref]";

static void echo_open(struct net_conn *c, int err)
{
	struct echo_ctx *x = net_conn_listener_ctx(c);
	if (err || !x)
		return;
	x->opens++;
	if (x->timeout_ms)
		net_conn_set_timeout(c, x->timeout_ms);
}

struct release_buf {
	struct echo_ctx *x;
	char data[];
};

static void release_buf(void *arg)
{
	struct release_buf *b = arg;
	b->x->releases++;
	free(b);
}

static void echo_data(struct net_conn *c, const struct iovec *iov, unsigned n)
{
	struct echo_ctx *x = net_conn_listener_ctx(c);
	if (x->use_release) {
		for (unsigned i = 0; i < n; i++) {
			struct release_buf *b = malloc(sizeof(*b) + iov[i].iov_len);
			assert_non_null(b);
			b->x = x;
			memcpy(b->data, iov[i].iov_base, iov[i].iov_len);
			unsigned before = x->releases;
			int r = net_send_ref_release(c, b->data, iov[i].iov_len, release_buf, b);
			assert_int_equal(r, 0);
			assert_int_equal(x->releases, before); /* never inside the call */
		}
		if (x->abort_after_send)
			net_conn_abort(c, -ECONNRESET);
		return;
	}
	for (unsigned i = 0; i < n; i++)
		for (unsigned k = 0; k < (x->multiply ? x->multiply : 1); k++) {
			if (x->use_ref)
				assert_int_equal(net_send_ref(c, ref_text, sizeof(ref_text) - 1), 0);
			int r = net_send(c, iov[i].iov_base, iov[i].iov_len);
			if (r < 0) {
				fprintf(stderr, "echo: send failed %d pending %zu\n", r, net_conn_pending(c));
				net_conn_abort(c, r);
				return;
			}
			if (net_conn_pending(c) > x->max_pending)
				x->max_pending = net_conn_pending(c);
		}
}

static void echo_writable(struct net_conn *c)
{
	struct echo_ctx *x = net_conn_listener_ctx(c);
	x->writable++;
}

static void echo_timeout(struct net_conn *c)
{
	struct echo_ctx *x = net_conn_listener_ctx(c);
	x->timeouts++;
	net_send(c, "T", 1);
	net_conn_close(c);
}

static void echo_shutdown(struct net_conn *c)
{
	struct echo_ctx *x = net_conn_listener_ctx(c);
	if (x->shutdown_bye)
		net_send(c, "BYE", 3);
	net_conn_close(c);
}

static void echo_close(struct net_conn *c, int err)
{
	(void)err;
	struct echo_ctx *x = net_conn_listener_ctx(c);
	if (x) {
		x->releases_at_close = x->releases;
		x->closes++;
	}
}

static const struct net_proto echo_proto = {
	.on_open = echo_open,
	.on_data = echo_data,
	.on_writable = echo_writable,
	.on_timeout = echo_timeout,
	.on_shutdown = echo_shutdown,
	.on_close = echo_close,
};

/* ---- harness ---- */

struct harness {
	struct net_engine *e;
	pthread_t thread;
	uint16_t port;
	struct echo_ctx ctx;
	int run_result;
};

static void *run_engine(void *arg)
{
	struct harness *h = arg;
	h->run_result = net_engine_run(h->e);
	return NULL;
}

static void harness_start(struct harness *h, const struct net_config *cfg_in)
{
	struct net_config cfg;
	net_config_default(&cfg);
	if (cfg_in)
		cfg = *cfg_in;
	cfg.workers = 1;
	cfg.pin = false;
	if (!cfg.buf_count)
		cfg.buf_count = 256;
	h->e = net_engine_new(&cfg, NULL);
	assert_non_null(h->e);
	assert_int_equal(net_engine_listen(h->e, "127.0.0.1", 0, &echo_proto, &h->ctx), 0);
	h->port = net_engine_listener_port(h->e, 0);
	assert_true(h->port != 0);
	assert_int_equal(pthread_create(&h->thread, NULL, run_engine, h), 0);
}

static void harness_stop(struct harness *h)
{
	net_engine_stop(h->e);
	pthread_join(h->thread, NULL);
	assert_int_equal(h->run_result, 0);
	net_engine_free(&h->e);
	assert_null(h->e);
}

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

/* Reads exactly n bytes (or fails the test). */
static void read_exact(int fd, char *buf, size_t n)
{
	size_t got = 0;
	while (got < n) {
		ssize_t r = read(fd, buf + got, n - got);
		assert_true(r > 0);
		got += (size_t)r;
	}
}

static void expect_eof(int fd)
{
	char c;
	ssize_t r = read(fd, &c, 1);
	assert_true(r == 0 || (r < 0 && errno == ECONNRESET));
}

/* ---- tests ---- */

static void test_echo(void **state)
{
	(void)state;
	struct harness h = {0};
	harness_start(&h, NULL);
	int fd = dial(h.port);
	for (int i = 0; i < 100; i++) {
		char msg[64], got[64];
		int n = snprintf(msg, sizeof(msg), "hello %d\r\n", i);
		assert_int_equal(write(fd, msg, (size_t)n), n);
		read_exact(fd, got, (size_t)n);
		assert_memory_equal(msg, got, (size_t)n);
	}
	close(fd);
	harness_stop(&h);
	assert_int_equal(h.ctx.opens, 1);
	assert_int_equal(h.ctx.closes, 1);
}

static void test_echo_fallback_single_shot(void **state)
{
	(void)state;
	setenv("POSTHASTE_NET_NO_MULTISHOT", "1", 1);
	struct harness h = {0};
	harness_start(&h, NULL);
	unsetenv("POSTHASTE_NET_NO_MULTISHOT");
	int fds[4];
	for (int k = 0; k < 4; k++)
		fds[k] = dial(h.port);
	for (int i = 0; i < 50; i++)
		for (int k = 0; k < 4; k++) {
			char msg[32], got[32];
			int n = snprintf(msg, sizeof(msg), "c%d m%d\n", k, i);
			assert_int_equal(write(fds[k], msg, (size_t)n), n);
			read_exact(fds[k], got, (size_t)n);
			assert_memory_equal(msg, got, (size_t)n);
		}
	for (int k = 0; k < 4; k++)
		close(fds[k]);
	harness_stop(&h);
	assert_int_equal(h.ctx.opens, 4);
	assert_int_equal(h.ctx.closes, 4);
}

static void test_send_ref_order(void **state)
{
	(void)state;
	struct harness h = {0};
	h.ctx.use_ref = true;
	h.ctx.multiply = 2;
	harness_start(&h, NULL);
	int fd = dial(h.port);
	assert_int_equal(write(fd, "ab", 2), 2);
	char got[32];
	const char *want = "[ref]ab[ref]ab";
	read_exact(fd, got, strlen(want));
	assert_memory_equal(got, want, strlen(want));
	close(fd);
	harness_stop(&h);
}

static bool wait_until(_Atomic unsigned *v, unsigned want, unsigned ms)
{
	uint64_t deadline = clock_ms() + ms;
	while (*v != want && clock_ms() < deadline)
		usleep(1000);
	return *v == want;
}

/* release runs once per segment, after the bytes went out; the peer got them all */
static void test_send_ref_release_sent(void **state)
{
	(void)state;
	struct harness h = {0};
	h.ctx.use_release = true;
	harness_start(&h, NULL);
	int fd = dial(h.port);
	for (int i = 0; i < 20; i++) {
		char msg[32], got[32];
		int n = snprintf(msg, sizeof(msg), "line %d\r\n", i);
		assert_int_equal(write(fd, msg, (size_t)n), n);
		read_exact(fd, got, (size_t)n);
		assert_memory_equal(msg, got, (size_t)n);
		assert_true(wait_until(&h.ctx.releases, (unsigned)i + 1, 5000));
	}
	close(fd);
	harness_stop(&h);
	assert_int_equal(h.ctx.releases, 20);
	assert_int_equal(h.ctx.closes, 1);
}

/* an abort drops the queued reference: release still runs exactly once, before on_close */
static void test_send_ref_release_abort(void **state)
{
	(void)state;
	struct harness h = {0};
	h.ctx.use_release = true;
	h.ctx.abort_after_send = true;
	harness_start(&h, NULL);
	int fd = dial(h.port);
	assert_int_equal(write(fd, "dropped", 7), 7);
	expect_eof(fd);
	assert_true(wait_until(&h.ctx.closes, 1, 5000));
	assert_int_equal(h.ctx.releases, 1);
	assert_int_equal(h.ctx.releases_at_close, 1);
	close(fd);
	harness_stop(&h);
	assert_int_equal(h.ctx.releases, 1);
}

/*
 * A peer that does not read: the engine must stop reading from it once the
 * queued output passes the high-water mark, keep every byte in order, and
 * resume when the peer drains.
 */
static void test_back_pressure(void **state)
{
	(void)state;
	struct net_config cfg;
	net_config_default(&cfg);
	cfg.out_high_water = 64 * 1024;
	cfg.out_low_water = 16 * 1024;
	cfg.buf_size = 4096;
	struct harness h = {0};
	h.ctx.multiply = 4;
	harness_start(&h, &cfg);
	int fd = dial(h.port);
	int small = 16 * 1024;
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
	/* write without reading until the kernel refuses more: the server paused */
	char block[4096];
	size_t sent = 0;
	for (size_t i = 0; i < sizeof(block); i++)
		block[i] = (char)('a' + i % 26);
	uint64_t deadline = clock_ms() + 5000;
	while (sent < 8u * 1024 * 1024 && clock_ms() < deadline) {
		struct pollfd p = {.fd = fd, .events = POLLOUT};
		if (poll(&p, 1, 500) == 0)
			break; /* nothing writable for 0.5 s: the server stopped reading */
		ssize_t r = send(fd, block, sizeof(block), MSG_DONTWAIT);
		if (r > 0)
			sent += (size_t)r;
	}
	assert_true(sent > 0);
	/* now drain: all sent bytes come back four times, in order */
	size_t want = sent * 4, got = 0;
	char buf[65536];
	while (got < want) {
		ssize_t r = read(fd, buf, sizeof(buf));
		assert_true(r > 0);
		got += (size_t)r;
	}
	assert_int_equal(got, want);
	assert_true(h.ctx.writable >= 1);
	/* queued output stayed bounded: at most high water plus one read's worth of echo */
	assert_true(h.ctx.max_pending <= cfg.out_high_water + 4 * cfg.buf_size);
	close(fd);
	harness_stop(&h);
}

static void test_timeout(void **state)
{
	(void)state;
	struct harness h = {0};
	h.ctx.timeout_ms = 100;
	harness_start(&h, NULL);
	int fd = dial(h.port);
	uint64_t t0 = clock_ms();
	char c;
	read_exact(fd, &c, 1);
	assert_int_equal(c, 'T');
	expect_eof(fd);
	uint64_t took = clock_ms() - t0;
	assert_true(took >= 90 && took < 5000);
	close(fd);
	harness_stop(&h);
	assert_int_equal(h.ctx.timeouts, 1);
}

static void test_shutdown_says_bye(void **state)
{
	(void)state;
	struct harness h = {0};
	h.ctx.shutdown_bye = true;
	harness_start(&h, NULL);
	int fds[3];
	for (int k = 0; k < 3; k++) {
		fds[k] = dial(h.port);
		assert_int_equal(write(fds[k], "x", 1), 1);
		char c;
		read_exact(fds[k], &c, 1);
	}
	net_engine_stop(h.e);
	for (int k = 0; k < 3; k++) {
		char got[3];
		read_exact(fds[k], got, 3);
		assert_memory_equal(got, "BYE", 3);
		expect_eof(fds[k]);
		close(fds[k]);
	}
	pthread_join(h.thread, NULL);
	assert_int_equal(h.run_result, 0);
	net_engine_free(&h.e);
	assert_int_equal(h.ctx.closes, 3);
}

/* ---- outgoing connections ---- */

struct dial_ctx {
	struct sockaddr_in to;
	char got[64];
	size_t got_len;
	int open_err;
	_Atomic bool closed;
};

static void out_open(struct net_conn *c, int err)
{
	struct dial_ctx *d = net_conn_data(c);
	d->open_err = err;
	if (!err)
		net_send(c, "ping", 4);
}

static void out_data(struct net_conn *c, const struct iovec *iov, unsigned n)
{
	struct dial_ctx *d = net_conn_data(c);
	for (unsigned i = 0; i < n; i++) {
		size_t k = iov[i].iov_len;
		if (k > sizeof(d->got) - d->got_len)
			k = sizeof(d->got) - d->got_len;
		memcpy(d->got + d->got_len, iov[i].iov_base, k);
		d->got_len += k;
	}
}

static void out_close(struct net_conn *c, int err)
{
	(void)err;
	struct dial_ctx *d = net_conn_data(c);
	d->closed = true;
}

static const struct net_proto out_proto = {
	.on_open = out_open,
	.on_data = out_data,
	.on_close = out_close,
};

static int dial_init(struct net_worker *w, void *arg)
{
	struct dial_ctx *d = arg;
	return net_connect(w, (struct sockaddr *)&d->to, sizeof(d->to), &out_proto, d);
}

/* A loopback socket bound to an ephemeral port; listening or not. */
static int bound_socket(struct sockaddr_in *sa, bool listening)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	*sa = (struct sockaddr_in){.sin_family = AF_INET};
	inet_pton(AF_INET, "127.0.0.1", &sa->sin_addr);
	assert_int_equal(bind(fd, (struct sockaddr *)sa, sizeof(*sa)), 0);
	if (listening)
		assert_int_equal(listen(fd, 4), 0);
	socklen_t l = sizeof(*sa);
	getsockname(fd, (struct sockaddr *)sa, &l);
	return fd;
}

/* Starts an engine whose only worker dials d->to from its init hook. */
static void dialer_start(struct harness *h, struct dial_ctx *d)
{
	struct net_config cfg;
	net_config_default(&cfg);
	cfg.workers = 1;
	cfg.pin = false;
	cfg.buf_count = 64;
	struct net_worker_hooks hooks = {.init = dial_init, .arg = d};
	h->e = net_engine_new(&cfg, &hooks);
	assert_non_null(h->e);
	assert_int_equal(pthread_create(&h->thread, NULL, run_engine, h), 0);
}

static void wait_closed(struct dial_ctx *d)
{
	uint64_t deadline = clock_ms() + 5000;
	while (!d->closed && clock_ms() < deadline)
		usleep(1000);
	assert_true(d->closed);
}

static void test_connect(void **state)
{
	(void)state;
	struct sockaddr_in sa;
	int lfd = bound_socket(&sa, true);
	struct dial_ctx d = {.to = sa};
	struct harness h = {0};
	dialer_start(&h, &d);

	int fd = accept(lfd, NULL, NULL);
	assert_true(fd >= 0);
	char buf[4];
	read_exact(fd, buf, 4);
	assert_memory_equal(buf, "ping", 4);
	assert_int_equal(write(fd, "pong", 4), 4);
	close(fd); /* EOF: the engine closes its side */
	wait_closed(&d);
	assert_int_equal(d.open_err, 0);
	assert_int_equal(d.got_len, 4);
	assert_memory_equal(d.got, "pong", 4);
	harness_stop(&h);
	close(lfd);
}

static void test_connect_refused(void **state)
{
	(void)state;
	struct sockaddr_in sa;
	close(bound_socket(&sa, false)); /* a port with nothing listening */
	struct dial_ctx d = {.to = sa};
	struct harness h = {0};
	dialer_start(&h, &d);
	wait_closed(&d);
	assert_int_equal(d.open_err, -ECONNREFUSED);
	harness_stop(&h);
}

static void test_listen_errors(void **state)
{
	(void)state;
	struct net_config cfg;
	net_config_default(&cfg);
	cfg.workers = 1;
	struct net_engine *e = net_engine_new(&cfg, NULL);
	assert_non_null(e);
	assert_int_equal(net_engine_listen(e, "not-an-address", 25, &echo_proto, NULL), -EINVAL);
	assert_int_equal(net_engine_listen(e, "127.0.0.1", 0, &echo_proto, NULL), 0);
	uint16_t port = net_engine_listener_port(e, 0);
	/* a second engine cannot share the port: SO_REUSEPORT is only among one user's sockets,
	   but a plain socket bound without it conflicts */
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
	inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
	assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), -1);
	close(fd);
	net_engine_free(&e);
	struct net_config bad = cfg;
	bad.buf_count = 1000; /* not a power of two */
	assert_null(net_engine_new(&bad, NULL));
	assert_int_equal(errno, EINVAL);
}

/* ---- polls of foreign descriptors ---- */

struct poll_ctx {
	int ready_pipe[2];  /* the test writes: the poll sees POLLIN */
	int idle_pipe[2];   /* never written: cancelled by a timer */
	int late_pipe[2];   /* never written: still armed at the end of the loop */
	struct net_io ready_io, idle_io, late_io;
	struct net_timer cancel_timer;
	struct net_worker *w;
	_Atomic int ready_res, idle_res;
	_Atomic unsigned ready_calls, idle_calls, late_calls;
	_Atomic int add_errs;
	int fini_cancel;    /* net_poll_cancel from the fini hook */
	int fini_add;       /* net_poll_add from the fini hook */
};

static void ready_done(struct net_io *io, int res)
{
	struct poll_ctx *p = container_of(io, struct poll_ctx, ready_io);
	p->ready_res = res;
	p->ready_calls++;
}

static void idle_done(struct net_io *io, int res)
{
	struct poll_ctx *p = container_of(io, struct poll_ctx, idle_io);
	p->idle_res = res;
	p->idle_calls++;
}

static void late_done(struct net_io *io, int res)
{
	(void)res;
	struct poll_ctx *p = container_of(io, struct poll_ctx, late_io);
	p->late_calls++;
}

static void cancel_fire(struct net_timer *t, struct net_worker *w)
{
	struct poll_ctx *p = container_of(t, struct poll_ctx, cancel_timer);
	if (net_poll_cancel(w, &p->idle_io) != 0)
		p->add_errs++;
}

static int poll_init(struct net_worker *w, void *arg)
{
	struct poll_ctx *p = arg;
	p->w = w;
	p->ready_io.done = ready_done;
	p->idle_io.done = idle_done;
	p->late_io.done = late_done;
	if (net_poll_add(w, p->ready_pipe[0], POLLIN, &p->ready_io) != 0 ||
	    net_poll_add(w, p->idle_pipe[0], POLLIN, &p->idle_io) != 0 ||
	    net_poll_add(w, p->late_pipe[0], POLLIN, &p->late_io) != 0)
		p->add_errs++;
	p->cancel_timer.fire = cancel_fire;
	net_timer_start(w, &p->cancel_timer, 50);
	return 0;
}

static void poll_fini(struct net_worker *w, void *arg)
{
	struct poll_ctx *p = arg;
	p->fini_cancel = net_poll_cancel(w, &p->late_io);
	p->fini_add = net_poll_add(w, p->late_pipe[0], POLLIN, &p->late_io);
}

static void test_poll(void **state)
{
	(void)state;
	struct poll_ctx p = {.ready_res = 1, .idle_res = 1};
	assert_int_equal(pipe(p.ready_pipe), 0);
	assert_int_equal(pipe(p.idle_pipe), 0);
	assert_int_equal(pipe(p.late_pipe), 0);
	struct net_config cfg;
	net_config_default(&cfg);
	cfg.workers = 1;
	cfg.pin = false;
	cfg.buf_count = 64;
	struct net_worker_hooks hooks = {.init = poll_init, .fini = poll_fini, .arg = &p};
	struct harness h = {0};
	h.e = net_engine_new(&cfg, &hooks);
	assert_non_null(h.e);
	assert_int_equal(pthread_create(&h.thread, NULL, run_engine, &h), 0);

	/* the cancelled poll reports -ECANCELED once */
	assert_true(wait_until(&p.idle_calls, 1, 5000));
	assert_int_equal(p.idle_res, -ECANCELED);
	/* nothing was written yet: the ready poll is still armed */
	assert_int_equal(p.ready_calls, 0);
	assert_int_equal(write(p.ready_pipe[1], "x", 1), 1);
	assert_true(wait_until(&p.ready_calls, 1, 5000));
	assert_true(p.ready_res > 0 && (p.ready_res & POLLIN));

	harness_stop(&h);
	assert_int_equal(p.add_errs, 0);
	assert_int_equal(p.ready_calls, 1);
	assert_int_equal(p.idle_calls, 1);
	/* the loop ended with the late poll armed: no callback, and the fini hook learns so */
	assert_int_equal(p.late_calls, 0);
	assert_int_equal(p.fini_cancel, -ESHUTDOWN);
	assert_int_equal(p.fini_add, -ESHUTDOWN);
	for (int i = 0; i < 2; i++) {
		close(p.ready_pipe[i]);
		close(p.idle_pipe[i]);
		close(p.late_pipe[i]);
	}
}

/* ---- filters: a toy XOR filter, no handshake ---- */

struct xor_filter {
	char in[4096], out[4096];
	size_t in_len, out_len;
	_Atomic unsigned *freed;
};

static int xf_input(void *f, const void *data, size_t len)
{
	struct xor_filter *x = f;
	if (len > sizeof(x->in) - x->in_len)
		return -ENOBUFS;
	memcpy(x->in + x->in_len, data, len);
	x->in_len += len;
	return 0;
}
static int xf_handshake(void *f)
{
	(void)f;
	return 1;
}
static long xf_read(void *f, void *buf, size_t cap)
{
	struct xor_filter *x = f;
	size_t n = x->in_len < cap ? x->in_len : cap;
	for (size_t i = 0; i < n; i++)
		((char *)buf)[i] = (char)(x->in[i] ^ 0x20);
	memmove(x->in, x->in + n, x->in_len - n);
	x->in_len -= n;
	return (long)n;
}
static int xf_write(void *f, const void *data, size_t len)
{
	struct xor_filter *x = f;
	if (len > sizeof(x->out) - x->out_len)
		return -ENOBUFS;
	for (size_t i = 0; i < len; i++)
		x->out[x->out_len + i] = (char)(((const char *)data)[i] ^ 0x20);
	x->out_len += len;
	return 0;
}
static size_t xf_output_pending(void *f)
{
	return ((struct xor_filter *)f)->out_len;
}
static size_t xf_output(void *f, void *buf, size_t cap)
{
	struct xor_filter *x = f;
	size_t n = x->out_len < cap ? x->out_len : cap;
	memcpy(buf, x->out, n);
	memmove(x->out, x->out + n, x->out_len - n);
	x->out_len -= n;
	return n;
}
static void xf_close(void *f)
{
	(void)f;
}
static void xf_free(void *f)
{
	struct xor_filter *x = f;
	(*x->freed)++;
	free(x);
}
static const struct net_filter_ops xor_ops = {
	.input = xf_input, .handshake = xf_handshake, .read = xf_read, .write = xf_write,
	.output_pending = xf_output_pending, .output = xf_output, .close = xf_close, .free = xf_free,
};

struct switch_ctx {
	_Atomic unsigned tls_ok, freed, closes;
	char first[64]; /* the first decoded input */
	size_t first_len;
};

/* "SWITCH\n": pause reading, and 100 ms later say "OK\n" in plaintext and set the filter */
static void sw_data(struct net_conn *c, const struct iovec *iov, unsigned n)
{
	struct switch_ctx *x = net_conn_listener_ctx(c);
	if (net_conn_filter(c, &xor_ops)) {
		if (!x->first_len) {
			x->first_len = iov[0].iov_len < sizeof(x->first) ? iov[0].iov_len : sizeof(x->first);
			memcpy(x->first, iov[0].iov_base, x->first_len);
		}
		for (unsigned i = 0; i < n; i++)
			net_send(c, iov[i].iov_base, iov[i].iov_len);
		return;
	}
	if (memmem(iov[0].iov_base, iov[0].iov_len, "SWITCH\n", 7)) {
		net_conn_pause_reading(c);
		net_conn_set_timeout(c, 100);
	}
}

static void sw_timeout(struct net_conn *c)
{
	struct switch_ctx *x = net_conn_listener_ctx(c);
	net_send(c, "OK\n", 3);
	struct xor_filter *f = calloc(1, sizeof(*f));
	f->freed = &x->freed;
	assert_int_equal(net_conn_set_filter(c, &xor_ops, f), 0);
	assert_int_equal(net_conn_set_filter(c, &xor_ops, f), -EALREADY);
	net_conn_resume_reading(c);
}

static void sw_tls(struct net_conn *c, int err)
{
	struct switch_ctx *x = net_conn_listener_ctx(c);
	if (!err && net_conn_filter_ready(c))
		x->tls_ok++;
}

static void sw_close(struct net_conn *c, int err)
{
	(void)err;
	struct switch_ctx *x = net_conn_listener_ctx(c);
	x->closes++;
}

static const struct net_proto switch_proto = {
	.on_data = sw_data, .on_timeout = sw_timeout, .on_tls = sw_tls, .on_close = sw_close,
};

/*
 * Plaintext sent after the switch command and before the switch is never
 * delivered as plaintext: if net held it (paused reading) it is dropped; if it
 * was still in the kernel it goes to the filter, as ciphertext (a TLS
 * handshake would fail on it). The output queued before the switch goes out
 * as it is, the rest through the filter.
 */
static void test_filter_drops_held_input(void **state)
{
	(void)state;
	struct net_config cfg;
	net_config_default(&cfg);
	cfg.workers = 1;
	cfg.pin = false;
	cfg.buf_count = 64;
	struct switch_ctx x = {0};
	struct harness h = {0};
	h.e = net_engine_new(&cfg, NULL);
	assert_non_null(h.e);
	assert_int_equal(net_engine_listen(h.e, "127.0.0.1", 0, &switch_proto, &x), 0);
	h.port = net_engine_listener_port(h.e, 0);
	assert_int_equal(pthread_create(&h.thread, NULL, run_engine, &h), 0);

	int fd = dial(h.port);
	assert_int_equal(write(fd, "SWITCH\n", 7), 7);
	usleep(20 * 1000);
	assert_int_equal(write(fd, "INJECT\n", 7), 7); /* held: reading is paused */
	char got[16];
	read_exact(fd, got, 3);
	assert_memory_equal(got, "OK\n", 3);
	char enc[5];
	for (int i = 0; i < 5; i++)
		enc[i] = (char)("data\n"[i] ^ 0x20);
	assert_int_equal(write(fd, enc, 5), 5);
	read_exact(fd, got, 5);
	if (got[0] == 'I') { /* INJECT went through the filter: decoded "inject", echoed encoded */
		assert_memory_equal(got, "INJEC", 5);
		read_exact(fd, got, 2);
		read_exact(fd, got, 5);
	}
	assert_memory_equal(got, enc, 5); /* echoed through the filter */
	close(fd);
	assert_true(wait_until(&x.closes, 1, 5000));
	assert_true(x.first_len > 0);
	assert_null(memmem(x.first, x.first_len, "INJECT", 6)); /* never seen as plaintext */
	assert_int_equal(x.tls_ok, 1);
	harness_stop(&h);
	assert_int_equal(x.freed, 1);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_echo),
		cmocka_unit_test(test_echo_fallback_single_shot),
		cmocka_unit_test(test_send_ref_order),
		cmocka_unit_test(test_send_ref_release_sent),
		cmocka_unit_test(test_send_ref_release_abort),
		cmocka_unit_test(test_poll),
		cmocka_unit_test(test_back_pressure),
		cmocka_unit_test(test_timeout),
		cmocka_unit_test(test_shutdown_says_bye),
		cmocka_unit_test(test_connect),
		cmocka_unit_test(test_connect_refused),
		cmocka_unit_test(test_listen_errors),
		cmocka_unit_test(test_filter_drops_held_input),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
