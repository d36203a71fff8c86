/*
 * net: the connection API every protocol is written against, and the engine
 * that runs it (one pinned worker thread per core, shared nothing).
 *
 * The protocol code sees a byte stream and nothing else. Backends (io_uring,
 * later DPDK+lwIP) and filters (TLS) sit below this API; the SMTP, POP3 and
 * IMAP code does not change with them.
 *
 * Threads: every function taking a net_conn or net_worker must be called on
 * that worker's thread, except where noted. Callbacks run on the worker's
 * thread. No locks are taken on any per-connection path.
 *
 * Errors: functions return 0 or -errno.
 */
#ifndef POSTHASTE_NET_NET_H
#define POSTHASTE_NET_NET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>

struct net_engine;
struct net_worker;
struct net_conn;

/* Protocol callbacks: one const table per protocol (a listener's or a connect's). */
struct net_proto {
	/*
	 * A connection is ready: accepted by a listener (err 0), or an outgoing
	 * net_connect finished (err 0, or -errno: then on_close follows at once).
	 * Set the protocol's state with net_conn_set_data here.
	 */
	void (*on_open)(struct net_conn *c, int err);
	/*
	 * Bytes arrived. The buffers belong to the backend and are valid only
	 * during the call: the protocol works on them in place and copies only
	 * what it must keep (e.g. a partial line). n >= 1.
	 */
	void (*on_data)(struct net_conn *c, const struct iovec *iov, unsigned n);
	/* Output that was above the high-water mark drained (optional). */
	void (*on_writable)(struct net_conn *c);
	/* The timer set with net_conn_set_timeout expired (optional). */
	void (*on_timeout)(struct net_conn *c);
	/*
	 * The engine is shutting down (optional): finish the current reply,
	 * say goodbye (SMTP: 421) and net_conn_close. Without this callback the
	 * connection is closed after its queued output is flushed.
	 */
	void (*on_shutdown)(struct net_conn *c);
	/*
	 * The connection is gone: peer EOF (err 0), an error (-errno), or the
	 * close the protocol asked for (err 0). Called exactly once per opened
	 * connection; free the protocol state here. No call follows.
	 */
	void (*on_close)(struct net_conn *c, int err);
	/*
	 * Optional: sent (best effort, without blocking) to a connection that is
	 * refused because the worker's connection table is full, before it is
	 * closed; e.g. "421 4.3.2 Too many connections\r\n". Never a silent close.
	 */
	const char *refuse_msg;
	/*
	 * Optional: the handshake of a filter the protocol started on this
	 * connection (STARTTLS: tls_conn_start) finished: err 0, or -errno
	 * (reason logged; the connection is then closing and on_close(c, err)
	 * follows). Not called for implicit-TLS listeners (net_engine_listen_filter):
	 * there on_open itself comes after the handshake.
	 */
	void (*on_tls)(struct net_conn *c, int err);
};

/* Per-worker hooks of the program (all optional), run on the worker thread. */
struct net_worker_hooks {
	/* Before the loop starts. Return 0, or -errno to stop the engine. */
	int (*init)(struct net_worker *w, void *arg);
	/* Once per loop turn, after the completions of the turn were handled and before submitting. */
	void (*turn_end)(struct net_worker *w, void *arg);
	/* After the loop ended and every connection was closed. */
	void (*fini)(struct net_worker *w, void *arg);
	void *arg;
};

struct net_config {
	unsigned workers;         /* threads; 0 = one per online CPU */
	bool pin;                 /* pin worker i to the i-th CPU of the process's affinity mask */
	unsigned max_conns;       /* per worker; default 16384 */
	unsigned ring_entries;    /* SQ size; default 4096 */
	unsigned buf_size;        /* provided-buffer size; default 16384 */
	unsigned buf_count;       /* provided buffers per worker (power of two); default 4096 */
	bool lazy_buffers;        /* leave them untouched until used; default: touched at start-up */
	size_t out_high_water;    /* stop reading a connection whose queued output exceeds this; default 256 KiB */
	size_t out_low_water;     /* resume below this; default 64 KiB */
	unsigned shutdown_grace_ms; /* longest wait for connections to finish at shutdown; default 5000 */
	int listen_backlog;       /* default 4096 */
	unsigned connect_timeout_ms; /* net_connect gives up after this (on_open -ETIMEDOUT); 0 = the kernel's */
	unsigned handshake_timeout_ms; /* filtered listeners (implicit TLS): a handshake not done by then is dropped; default 30000 */
	/*
	 * Optional: SIGHUP handling (e.g. reload TLS certificates). When set,
	 * net_engine_run blocks SIGHUP in every thread too and calls
	 * on_hup(hup_arg) on its own (the main) thread for each one; the workers
	 * go on meanwhile. NULL leaves SIGHUP alone.
	 */
	void (*on_hup)(void *arg);
	void *hup_arg;
};

/* Fills *cfg with the defaults above. */
void net_config_default(struct net_config *cfg);

/* Creates an engine (no threads yet). Returns NULL with errno set on failure. */
struct net_engine *net_engine_new(const struct net_config *cfg, const struct net_worker_hooks *hooks);
/* Frees the engine after net_engine_run returned. Accepts NULL; sets *e to NULL. */
void net_engine_free(struct net_engine **e);

/*
 * Adds a listener on host:port (host may be an IPv4 or IPv6 literal); every
 * worker gets its own SO_REUSEPORT socket. `ctx` is available to the protocol
 * through net_conn_listener_ctx. Before net_engine_run only.
 * Returns 0 or -errno (e.g. -EADDRINUSE), with a logged reason.
 */
int net_engine_listen(struct net_engine *e, const char *host, uint16_t port,
		      const struct net_proto *proto, void *ctx);

/*
 * As net_engine_listen, and every accepted connection gets a filter (implicit
 * TLS, RFC 8314) from filter_start(c, arg), which calls net_conn_set_filter and
 * returns 0 or -errno (then the connection is dropped). The protocol's on_open
 * runs only once the filter's handshake succeeded; a connection whose
 * handshake fails, times out (handshake_timeout_ms) or is cut by the peer is
 * closed without any protocol callback (on_open, on_tls, on_close). tls/ wraps
 * this as tls_listen. Before net_engine_run only. Returns as net_engine_listen.
 */
int net_engine_listen_filter(struct net_engine *e, const char *host, uint16_t port,
			     const struct net_proto *proto, void *ctx,
			     int (*filter_start)(struct net_conn *c, void *arg), void *arg);

/* The port listener number `i` (in order of net_engine_listen calls) is bound to: useful after asking for port 0. */
uint16_t net_engine_listener_port(const struct net_engine *e, unsigned i);
/*
 * Gives listener number `i` (numbered as for net_engine_listener_port) a
 * filter at accept, as if it had been added with net_engine_listen_filter:
 * for a protocol that adds its listeners itself (smtp_server_listen) when
 * the program wants them to be implicit TLS. Before net_engine_run only.
 * Returns 0 or -EINVAL (no such listener, or it has a filter already).
 */
int net_engine_listener_set_filter(struct net_engine *e, unsigned i,
				   int (*filter_start)(struct net_conn *c, void *arg), void *arg);

/* The number of workers the engine will run. */
unsigned net_engine_workers(const struct net_engine *e);

/*
 * Starts the workers and blocks until the engine stops: on SIGTERM or SIGINT
 * (which it blocks in every thread and waits for), or on net_engine_stop.
 * With net_config.on_hup, SIGHUP is waited for too and calls it.
 * At stop the workers stop accepting, ask every connection to finish
 * (on_shutdown), flush queued output, and wait up to shutdown_grace_ms.
 * Returns 0, or -errno if a worker failed to start.
 */
int net_engine_run(struct net_engine *e);

/* Asks the engine to stop. Any thread; async-signal-safe. */
void net_engine_stop(struct net_engine *e);

/* ---- workers ---- */

unsigned net_worker_index(const struct net_worker *w);
struct net_engine *net_worker_engine(const struct net_worker *w);
void *net_worker_data(const struct net_worker *w);
void net_worker_set_data(struct net_worker *w, void *data);
/* Monotonic milliseconds, sampled once per loop turn. */
uint64_t net_worker_now_ms(const struct net_worker *w);
/* True once the engine is shutting down. */
bool net_worker_stopping(const struct net_worker *w);

/* One-shot worker timers (for things that are not a connection's timeout). */
struct net_timer {
	uint64_t deadline_ms;
	unsigned heap_index; /* private */
	void (*fire)(struct net_timer *t, struct net_worker *w);
};
/* Arms (or re-arms) t to fire after ms milliseconds. t must stay valid until it fires or is stopped. */
void net_timer_start(struct net_worker *w, struct net_timer *t, uint64_t ms);
/* Disarms t if armed. */
void net_timer_stop(struct net_worker *w, struct net_timer *t);

/*
 * Opens an outgoing TCP connection. proto->on_open reports the result;
 * on failure on_close follows. Returns 0, or -errno (then no callback runs).
 */
int net_connect(struct net_worker *w, const struct sockaddr *sa, socklen_t salen,
		const struct net_proto *proto, void *data);

/* ---- file I/O through the worker's ring (the spool's writes and syncs) ---- */

struct net_io {
	/* Runs on the worker thread: res is the octets written (short writes happen), 0 for a
	   sync, the revents of a poll, or -errno (-ECANCELED for a sync whose linked write
	   failed or was short, or for a cancelled poll). */
	void (*done)(struct net_io *io, int res);
};

/*
 * Queues a positional write of the iovecs (at most IOV_MAX) at `off`; when
 * `sync_io` is given, an fdatasync of the same file is linked after it and
 * runs only if the write wrote everything. iov and both net_io must stay valid
 * until their done callbacks ran. Submitted with the loop turn's batch.
 * Returns 0 or -errno.
 */
int net_file_writev(struct net_worker *w, int fd, const struct iovec *iov, unsigned n, uint64_t off,
		    struct net_io *write_io, struct net_io *sync_io);
/* Queues an fdatasync. Returns 0 or -errno. */
int net_file_fdatasync(struct net_worker *w, int fd, struct net_io *io);

/* ---- readiness of foreign descriptors (e.g. a DNS library's sockets) ---- */

/*
 * Queues a one-shot poll of fd for poll_events (POLLIN, POLLOUT, ...):
 * io->done(io, revents) runs once when fd is ready, or with -errno
 * (-ECANCELED after net_poll_cancel). io must stay valid until then; one
 * io per armed poll. The poll holds a reference to the file: a descriptor
 * that is closed while polled stays open in the kernel until its poll is
 * cancelled (close does not end the poll). Polls still armed when the
 * loop ends never complete. Returns 0, or -errno (-ESHUTDOWN after the
 * loop ended, i.e. from the fini hook): then no callback runs.
 */
int net_poll_add(struct net_worker *w, int fd, unsigned poll_events, struct net_io *io);
/*
 * Cancels the armed poll of io: its done callback still runs exactly once,
 * with -ECANCELED, or with the revents if it completed before the cancel
 * took effect. Returns 0, or -ESHUTDOWN after the loop ended: then done
 * never runs and io may be freed at once.
 */
int net_poll_cancel(struct net_worker *w, struct net_io *io);

/* ---- connections ---- */

struct net_worker *net_conn_worker(const struct net_conn *c);
void *net_conn_data(const struct net_conn *c);
void net_conn_set_data(struct net_conn *c, void *data);
/* The ctx given to net_engine_listen (NULL for outgoing connections). */
void *net_conn_listener_ctx(const struct net_conn *c);
/* Peer and local addresses. */
const struct sockaddr_storage *net_conn_peer(const struct net_conn *c);
const struct sockaddr_storage *net_conn_local(const struct net_conn *c);

/*
 * Queues bytes for sending; they are copied. Queued output goes out once per
 * loop turn, in order. Returns 0, or -ENOBUFS when the queued output would
 * exceed 16 x out_high_water (a peer that reads nothing), or -EPIPE once the
 * connection is closing.
 */
int net_send(struct net_conn *c, const void *data, size_t len);
int net_sendv(struct net_conn *c, const struct iovec *iov, unsigned n);
/*
 * Queues bytes without copying them: `data` must stay valid and unchanged
 * until the connection closes (e.g. a bench message body shared by all).
 */
int net_send_ref(struct net_conn *c, const void *data, size_t len);
/*
 * As net_send_ref, for memory the caller frees once the connection is done
 * with it: release(arg) runs exactly once, on the worker thread, when the
 * whole segment has been sent, or when the connection drops it (abort,
 * close, send error; at the latest just before on_close). It never runs
 * inside this call; on an error return it does not run at all and the
 * caller still owns the memory. Returns as net_send_ref (also -EMSGSIZE
 * for len above 4 GiB - 1). A zero len queues nothing and releases nothing.
 */
int net_send_ref_release(struct net_conn *c, const void *data, size_t len,
			 void (*release)(void *arg), void *arg);
/* Octets queued and not yet sent. */
size_t net_conn_pending(const struct net_conn *c);

/* Stop / resume reading from the peer (back-pressure from the protocol). */
void net_conn_pause_reading(struct net_conn *c);
void net_conn_resume_reading(struct net_conn *c);

/* Arms the connection's timer: on_timeout after ms milliseconds (0 disarms). */
void net_conn_set_timeout(struct net_conn *c, uint64_t ms);

/*
 * Closes gracefully: no more on_data, queued output is flushed (for at most
 * shutdown_grace_ms), then the socket is closed and on_close(c, 0) runs.
 */
void net_conn_close(struct net_conn *c);
/* Closes now, dropping queued output; on_close(c, err) follows. */
void net_conn_abort(struct net_conn *c, int err);

/* ---- filters: a transformation of the byte stream (TLS), implemented outside net/ ---- */

/*
 * A filter sits between the socket and the protocol: received octets go to
 * input() and the protocol's on_data sees what read() returns; what the
 * protocol sends goes to write() and what output() returns is sent. The engine
 * drives it from its loop; no call blocks. All calls run on the connection's
 * worker thread. `f` is the filter's own state.
 */
struct net_filter_ops {
	/* Octets received from the peer; the filter copies them. 0 or -errno. */
	int (*input)(void *f, const void *data, size_t len);
	/* Advances the handshake: 1 done, 0 needs more input, -errno failed (reason logged). */
	int (*handshake)(void *f);
	/*
	 * Decoded octets into buf (at most cap): the count (> 0), 0 when more
	 * input is needed, -EPIPE when the peer ended the session cleanly, or
	 * another -errno (reason logged).
	 */
	long (*read)(void *f, void *buf, size_t cap);
	/* Encodes all len octets (only after the handshake). 0 or -errno. */
	int (*write)(void *f, const void *data, size_t len);
	/* Octets waiting to be sent to the peer. */
	size_t (*output_pending)(void *f);
	/* Moves up to cap of them into buf; returns the count. */
	size_t (*output)(void *f, void *buf, size_t cap);
	/* Queues the end of the session (TLS close_notify) after what was written. */
	void (*close)(void *f);
	/* Frees f: the connection is gone (after on_close). */
	void (*free)(void *f);
};

/* Size of the largest octet run a filter's read() is given (one TLS record). */
#define NET_FILTER_READ_MAX 16384u

/*
 * Puts a filter on the connection (STARTTLS; tls_conn_start calls this).
 * From then on:
 * - output the protocol queued before this call goes out as it is, first
 *   (the "220 Ready to start TLS" reply), then the handshake;
 * - input received before the switch is never delivered: net drops what it
 *   holds for a paused connection; the protocol must drop whatever it has
 *   buffered itself, including the rest of the on_data call it is in
 *   (octets pipelined after STARTTLS, CVE-2011-0411);
 * - on_tls(c, 0) reports the handshake done, then on_data sees decoded
 *   octets; on failure on_tls(c, -errno) and the connection closes;
 * - net_send* take plaintext: it is encoded at the end of the loop turn
 *   (batched into records) and a referenced segment's release runs once it is
 *   encoded; net_conn_pending counts plaintext and encoded octets;
 * - net_conn_close sends the filter's close (close_notify) after the output;
 * - do not pause reading before the handshake is done.
 * The filter owns f from this call on, even when it fails: ops->free(f) runs
 * when the connection goes. Returns 0, -EALREADY (a filter is set: f is not
 * taken), or -EPIPE (the connection is closing: f is not taken).
 */
int net_conn_set_filter(struct net_conn *c, const struct net_filter_ops *ops, void *f);
/* The state of the connection's filter if its ops are `ops`, else NULL. */
void *net_conn_filter(const struct net_conn *c, const struct net_filter_ops *ops);
/* True once the connection's filter finished its handshake. */
bool net_conn_filter_ready(const struct net_conn *c);

#endif
