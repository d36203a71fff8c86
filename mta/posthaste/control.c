/*
 * control: the daemon's control socket (see control.h).
 *
 * One thread serves the socket, one connection at a time: it reads the
 * request line, posts the request to every worker's mailbox and waits on a
 * condition variable until every worker put its result in the request (or
 * the wait times out, or the daemon stops). A request is shared by the
 * thread and the mailboxes that hold it: it is freed by the last of them to
 * let go (refs, under the control's lock), so a worker that answers after
 * the thread gave up touches nothing freed.
 */
#include "mta/posthaste/control.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "core/compiler.h"
#include "core/log.h"
#include "mta/relay/relay.h"
#include "queue/spool.h"
#include "queue/state.h"

enum ctl_op { CTL_HOLD, CTL_RELEASE, CTL_DELETE, CTL_FLUSH };

#define RES_PENDING INT_MIN /* a worker's result not in yet */

/* The request table: verb, operation, whether the target may be left out (then ALL). */
static const struct {
	const char *verb;
	enum ctl_op op;
	bool target_optional;
} ctl_verbs[] = {
    {"hold", CTL_HOLD, false},
    {"release", CTL_RELEASE, false},
    {"delete", CTL_DELETE, false},
    {"flush", CTL_FLUSH, true},
};

/* Errors as the answer words them. */
static const struct {
	int err;
	const char *reason;
} ctl_reasons[] = {
    {-ENOENT, "no such message"},
    {-EBUSY, "message is being delivered; try again"},
    {-EINVAL, "not on hold"},
    {-EALREADY, "already on hold"},
    {-EPERM, "on hold; release it first"},
    {-ENOMEM, "out of memory"},
    {-ESHUTDOWN, "the daemon is shutting down"},
    {-ETIMEDOUT, "timed out waiting for the workers"},
};

struct ctl_req {
	enum ctl_op op;
	bool all;
	uint64_t id;
	unsigned refs;  /* the thread + mailboxes holding it; under ph_control.lock */
	unsigned ndone; /* results in */
	int res[];      /* per worker: messages changed, -errno, or RES_PENDING */
};

struct ctl_mailbox {
	pthread_mutex_t lock;
	struct ctl_req **q; /* posted, not yet taken by the worker */
	size_t n, cap;
	bool closed; /* the worker's loop ended */
	int efd;     /* eventfd: "look at q" */
	struct net_io io;
	struct ph_control *c;
	unsigned index;
	struct net_worker *w;
	struct spool_worker *sw;
	struct relay_worker *rw; /* NULL without delivery */
	/* without delivery: the ids of the worker's live messages (some may be gone) */
	uint64_t *ids;
	size_t nids, capids;
} cache_aligned;

struct ph_control {
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	int fd;
	dev_t dev;
	ino_t ino;
	int pipe[2]; /* the thread's stop signal */
	pthread_t thread;
	bool running;
	unsigned nworkers;
	struct ctl_mailbox *mb;
	pthread_mutex_t lock; /* requests' results and refs, stopping */
	pthread_cond_t cond;
	bool stopping;
};

int ph_control_path(const struct ph_config *cfg, const char *spool, char *buf, size_t len)
{
	size_t cap = MIN(len, sizeof(((struct sockaddr_un *)0)->sun_path));
	int n;
	if (cfg->control_socket[0])
		n = snprintf(buf, cap, "%s", cfg->control_socket);
	else
		n = snprintf(buf, cap, "%s/" PH_CONTROL_SOCKET_NAME,
		             spool ? spool : cfg->spool_dir);
	return n < 0 || (size_t)n >= cap ? -ENAMETOOLONG : 0;
}

/* ---- the worker's side ---- */

static void req_unref_locked(struct ph_control *c, struct ctl_req *req)
{
	(void)c;
	if (--req->refs == 0)
		free(req);
}

static void req_result(struct ph_control *c, struct ctl_req *req, unsigned index, int res)
{
	pthread_mutex_lock(&c->lock);
	req->res[index] = res;
	req->ndone++;
	req_unref_locked(c, req);
	pthread_cond_broadcast(&c->cond);
	pthread_mutex_unlock(&c->lock);
}

/* Without delivery: one message on the spool directly. 1 changed, 0 not, or -errno. */
static int direct_one(struct ctl_mailbox *mb, enum ctl_op op, uint64_t id)
{
	struct spool_entry *e = spool_entry_find(mb->sw, id);
	if (!e)
		return -ENOENT;
	struct state_rec r = {0};
	switch (op) {
	case CTL_HOLD:
		if (e->state == SPOOL_STATE_HELD)
			return -EALREADY;
		r.state = SPOOL_STATE_HELD;
		break;
	case CTL_RELEASE:
		if (e->state != SPOOL_STATE_HELD)
			return -EINVAL;
		r.state = SPOOL_STATE_RELEASED;
		break;
	case CTL_DELETE:
		r.state = SPOOL_STATE_DELETED;
		break;
	case CTL_FLUSH:
		/* nothing delivers: nothing to hurry */
		return e->state == SPOOL_STATE_HELD ? -EPERM : 0;
	}
	int res = spool_entry_mark(mb->sw, e, &r);
	return res < 0 ? res : 1;
}

static int direct_all(struct ctl_mailbox *mb, enum ctl_op op)
{
	size_t k = 0;
	int n = 0;
	for (size_t i = 0; i < mb->nids; i++) {
		uint64_t id = mb->ids[i];
		if (!spool_entry_find(mb->sw, id))
			continue; /* made final: forget it */
		int r = direct_one(mb, op, id);
		if (r > 0 && n < INT_MAX)
			n++;
		if (!(r > 0 && op == CTL_DELETE))
			mb->ids[k++] = id;
	}
	mb->nids = k;
	return n;
}

static int relay_one(struct ctl_mailbox *mb, enum ctl_op op, uint64_t id)
{
	static const enum relay_ctl ops[] = {
	    [CTL_HOLD] = RELAY_CTL_HOLD,
	    [CTL_RELEASE] = RELAY_CTL_RELEASE,
	    [CTL_DELETE] = RELAY_CTL_DELETE,
	    [CTL_FLUSH] = RELAY_CTL_FLUSH,
	};
	int changed = 1;
	if (op == CTL_FLUSH) {
		struct spool_entry *e = spool_entry_find(mb->sw, id);
		if (!e)
			return -ENOENT;
		if (e->state == SPOOL_STATE_HELD)
			return -EPERM;
		changed = e->state == SPOOL_STATE_DEFERRED; /* else due already */
	}
	int r = relay_worker_control(mb->rw, ops[op], id);
	return r < 0 ? r : changed;
}

static int run_req(struct ctl_mailbox *mb, const struct ctl_req *req)
{
	if (!mb->rw)
		return req->all ? direct_all(mb, req->op) : direct_one(mb, req->op, req->id);
	if (!req->all)
		return relay_one(mb, req->op, req->id);
	static const enum relay_ctl all_ops[] = {
	    [CTL_HOLD] = RELAY_CTL_HOLD,
	    [CTL_RELEASE] = RELAY_CTL_RELEASE,
	    [CTL_DELETE] = RELAY_CTL_DELETE,
	    [CTL_FLUSH] = RELAY_CTL_FLUSH_ALL,
	};
	return relay_worker_control(mb->rw, all_ops[req->op], RELAY_CTL_ALL);
}

static void mailbox_wake(struct net_io *io, int res)
{
	struct ctl_mailbox *mb = container_of(io, struct ctl_mailbox, io);
	if (res < 0) {
		if (res != -ECANCELED)
			log_err("control: worker %u: polling the mailbox: %s; live queue control "
			        "stops on this worker",
			        mb->index, strerror(-res));
		return;
	}
	uint64_t v;
	if (read(mb->efd, &v, sizeof(v)) < 0 && errno != EAGAIN)
		log_err("control: worker %u: reading the mailbox: %s", mb->index, strerror(errno));
	pthread_mutex_lock(&mb->lock);
	struct ctl_req **q = mb->q;
	size_t n = mb->n;
	mb->q = NULL;
	mb->n = mb->cap = 0;
	pthread_mutex_unlock(&mb->lock);
	for (size_t i = 0; i < n; i++)
		req_result(mb->c, q[i], mb->index, run_req(mb, q[i]));
	free(q);
	int r = net_poll_add(mb->w, mb->efd, POLLIN, &mb->io);
	if (r < 0 && r != -ESHUTDOWN)
		log_err("control: worker %u: cannot poll the mailbox: %s", mb->index, strerror(-r));
}

/* The spool's live-queue hook without delivery: remember the worker's messages. */
static void entry_added(void *arg, struct spool_entry *e)
{
	struct ctl_mailbox *mb = arg;
	if (mb->nids == mb->capids) {
		size_t cap = mb->capids ? mb->capids * 2 : 1024;
		uint64_t *v = realloc(mb->ids, cap * sizeof(*v));
		if (!v) {
			log_once(LOG_ERR,
			         "control: out of memory: `queue ... ALL` misses messages");
			return;
		}
		mb->ids = v;
		mb->capids = cap;
	}
	mb->ids[mb->nids++] = e->id;
}

int ph_control_worker_init(struct ph_control *c, struct net_worker *w, struct spool_worker *sw,
                           struct relay_worker *rw)
{
	unsigned i = net_worker_index(w);
	if (i >= c->nworkers)
		return -EINVAL;
	struct ctl_mailbox *mb = &c->mb[i];
	mb->w = w;
	mb->sw = sw;
	mb->rw = rw;
	mb->io.done = mailbox_wake;
	if (!rw) {
		spool_worker_set_hooks(sw, &(struct spool_hooks){.added = entry_added}, mb);
		spool_worker_announce(sw);
	}
	/* requests posted before this are seen at once: the eventfd is readable already */
	return net_poll_add(w, mb->efd, POLLIN, &mb->io);
}

void ph_control_worker_fini(struct ph_control *c, struct net_worker *w)
{
	unsigned i = net_worker_index(w);
	if (i >= c->nworkers)
		return;
	struct ctl_mailbox *mb = &c->mb[i];
	pthread_mutex_lock(&mb->lock);
	mb->closed = true;
	struct ctl_req **q = mb->q;
	size_t n = mb->n;
	mb->q = NULL;
	mb->n = mb->cap = 0;
	pthread_mutex_unlock(&mb->lock);
	for (size_t k = 0; k < n; k++)
		req_result(c, q[k], i, -ESHUTDOWN);
	free(q);
	free(mb->ids);
	mb->ids = NULL;
	mb->nids = mb->capids = 0;
}

/* ---- the thread's side ---- */

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Posts req to mailbox i; if that cannot be, puts the result in itself. */
static void post(struct ph_control *c, struct ctl_req *req, unsigned i)
{
	struct ctl_mailbox *mb = &c->mb[i];
	int fail = 0;
	pthread_mutex_lock(&mb->lock);
	if (mb->closed) {
		fail = -ESHUTDOWN;
	} else if (mb->n == mb->cap) {
		size_t cap = mb->cap ? mb->cap * 2 : 4;
		struct ctl_req **q = realloc(mb->q, cap * sizeof(*q));
		if (q) {
			mb->q = q;
			mb->cap = cap;
		} else {
			fail = -ENOMEM;
		}
	}
	if (!fail)
		mb->q[mb->n++] = req;
	pthread_mutex_unlock(&mb->lock);
	if (fail) {
		req_result(c, req, i, fail);
		return;
	}
	uint64_t one = 1;
	if (write(mb->efd, &one, sizeof(one)) < 0)
		log_err("control: cannot wake worker %u: %s", i, strerror(errno));
}

/* Runs req on every worker; the combined result: messages changed, or -errno. Frees req. */
static int dispatch(struct ph_control *c, struct ctl_req *req)
{
	req->refs = 1 + c->nworkers;
	for (unsigned i = 0; i < c->nworkers; i++)
		req->res[i] = RES_PENDING;
	for (unsigned i = 0; i < c->nworkers; i++)
		post(c, req, i);

	struct timespec until;
	clock_gettime(CLOCK_MONOTONIC, &until);
	until.tv_sec += PH_CONTROL_WAIT_MS / 1000;
	until.tv_nsec += (long)(PH_CONTROL_WAIT_MS % 1000) * 1000000L;
	if (until.tv_nsec >= 1000000000L) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&c->lock);
	while (req->ndone < c->nworkers && !c->stopping)
		if (pthread_cond_timedwait(&c->cond, &c->lock, &until) == ETIMEDOUT)
			break;
	/* one id: the worker that owns it speaks; ALL: the sum, unless a worker failed */
	int64_t sum = 0;
	int found = -1, err = 0;
	for (unsigned i = 0; i < c->nworkers; i++) {
		int r = req->res[i];
		if (r == RES_PENDING)
			r = c->stopping ? -ESHUTDOWN : -ETIMEDOUT;
		if (r >= 0) {
			sum += r;
			found = r;
		} else if (!err || err == -ENOENT) {
			err = r;
		}
	}
	bool all = req->all;
	req_unref_locked(c, req);
	pthread_mutex_unlock(&c->lock);
	if (all)
		return err ? err : (int)MIN(sum, (int64_t)INT_MAX);
	if (found >= 0)
		return found;
	return err ? err : -ENOENT;
}

static bool parse_id(const char *s, uint64_t *id_r)
{
	uint64_t id = 0;
	size_t n = 0;
	for (; s[n]; n++) {
		char ch = s[n];
		unsigned v;
		if (ch >= '0' && ch <= '9')
			v = (unsigned)(ch - '0');
		else if (ch >= 'a' && ch <= 'f')
			v = (unsigned)(ch - 'a' + 10);
		else if (ch >= 'A' && ch <= 'F')
			v = (unsigned)(ch - 'A' + 10);
		else
			return false;
		if (n >= 16)
			return false;
		id = id << 4 | v;
	}
	if (n != 16)
		return false;
	*id_r = id;
	return true;
}

/*
 * Parses a request line (no LF) into op/all/id. NULL, or the reason it is
 * refused (the client's text is never echoed).
 */
static const char *parse_req(char *line, enum ctl_op *op_r, bool *all_r, uint64_t *id_r)
{
	char *save = NULL;
	char *verb = strtok_r(line, " \t", &save);
	char *target = verb ? strtok_r(NULL, " \t", &save) : NULL;
	if (!verb)
		return "empty request";
	if (target && strtok_r(NULL, " \t", &save))
		return "one queue id or ALL expected";
	for (size_t i = 0; i < ARRAY_SIZE(ctl_verbs); i++) {
		if (strcmp(verb, ctl_verbs[i].verb))
			continue;
		*op_r = ctl_verbs[i].op;
		*all_r = false;
		if (!target) {
			if (!ctl_verbs[i].target_optional)
				return "a queue id or ALL is required";
			*all_r = true;
		} else if (!strcmp(target, "ALL")) {
			*all_r = true;
		} else if (!parse_id(target, id_r)) {
			return "bad queue id (16 hex digits expected)";
		}
		return NULL;
	}
	return "unknown command";
}

/*
 * Reads one line from fd into buf (at most PH_CONTROL_LINE_MAX octets, LF
 * included) within PH_CONTROL_READ_MS. The line's length without the
 * CR LF, or -errno: -EMSGSIZE too long, -ETIMEDOUT, -ESHUTDOWN (stopping),
 * -ECONNRESET (closed before a line).
 */
static int read_line(struct ph_control *c, int fd, char *buf)
{
	size_t len = 0;
	int64_t deadline = now_ms() + PH_CONTROL_READ_MS;
	for (;;) {
		int64_t left = deadline - now_ms();
		if (left <= 0)
			return -ETIMEDOUT;
		struct pollfd p[2] = {{.fd = fd, .events = POLLIN},
		                      {.fd = c->pipe[0], .events = POLLIN}};
		int r = poll(p, 2, (int)left);
		if (r < 0 && errno != EINTR)
			return -errno;
		if (r <= 0)
			continue;
		if (p[1].revents)
			return -ESHUTDOWN;
		ssize_t n = read(fd, buf + len, PH_CONTROL_LINE_MAX - len);
		if (n < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			return -errno;
		}
		char *lf = memchr(buf + len, '\n', (size_t)n);
		len += (size_t)n;
		if (lf || n == 0) {
			size_t l = lf ? (size_t)(lf - buf) : len;
			if (!lf && !l)
				return -ECONNRESET;
			if (l && buf[l - 1] == '\r')
				l--;
			buf[l] = '\0';
			return (int)l;
		}
		if (len == PH_CONTROL_LINE_MAX)
			return -EMSGSIZE;
	}
}

static void answer(int fd, const char *text)
{
	/* a short line into an empty socket buffer: never blocks, never raises SIGPIPE */
	ssize_t r = send(fd, text, strlen(text), MSG_NOSIGNAL | MSG_DONTWAIT);
	(void)r;
}

static const char *reason(int err)
{
	for (size_t i = 0; i < ARRAY_SIZE(ctl_reasons); i++)
		if (ctl_reasons[i].err == err)
			return ctl_reasons[i].reason;
	return strerror(-err);
}

static void serve(struct ph_control *c, int fd)
{
	struct ucred cred;
	socklen_t cl = sizeof(cred);
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) == 0 && cred.uid != 0 &&
	    cred.uid != geteuid()) {
		log_warn("control: refused a request from uid %u (pid %d)", (unsigned)cred.uid,
		         (int)cred.pid);
		answer(fd, "error permission denied\n");
		return;
	}
	char line[PH_CONTROL_LINE_MAX + 1];
	int n = read_line(c, fd, line);
	if (n < 0) {
		if (n == -EMSGSIZE)
			answer(fd, "error request too long\n");
		else if (n == -ETIMEDOUT)
			answer(fd, "error timed out waiting for the request\n");
		return;
	}
	enum ctl_op op = CTL_HOLD;
	bool all = false;
	uint64_t id = 0;
	const char *bad = parse_req(line, &op, &all, &id);
	if (bad) {
		char out[128];
		snprintf(out, sizeof(out), "error %s\n", bad);
		answer(fd, out);
		return;
	}
	struct ctl_req *req = calloc(1, sizeof(*req) + c->nworkers * sizeof(req->res[0]));
	if (!req) {
		answer(fd, "error out of memory\n");
		return;
	}
	req->op = op;
	req->all = all;
	req->id = id;
	int r = dispatch(c, req); /* frees req */
	char out[160], idtext[17];
	if (all)
		snprintf(idtext, sizeof(idtext), "ALL");
	else
		spool_id_format(id, idtext);
	if (r >= 0)
		snprintf(out, sizeof(out), "ok %d\n", r);
	else
		snprintf(out, sizeof(out), "error %s\n", reason(r));
	log_info("control: %s %s: %.*s", ctl_verbs[op].verb, idtext, (int)strlen(out) - 1, out);
	answer(fd, out);
}

static void *control_main(void *arg)
{
	struct ph_control *c = arg;
	for (;;) {
		struct pollfd p[2] = {{.fd = c->fd, .events = POLLIN},
		                      {.fd = c->pipe[0], .events = POLLIN}};
		int r = poll(p, 2, -1);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			log_err("control: poll: %s; the control socket stops", strerror(errno));
			break;
		}
		if (p[1].revents)
			break;
		if (!p[0].revents)
			continue;
		int fd = accept4(c->fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
		if (fd < 0) {
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS ||
			    errno == ENOMEM) {
				log_once(LOG_WARN, "control: accept: %s", strerror(errno));
				poll(&p[1], 1, 100); /* do not spin on a full table */
			}
			continue;
		}
		serve(c, fd);
		/* what the client sent beyond its line: read, so the close does not reset the
		   connection before the client read the answer */
		char sink[4096];
		for (int k = 0; k < 16 && read(fd, sink, sizeof(sink)) > 0; k++)
			;
		close(fd);
	}
	return NULL;
}

/* ---- set-up ---- */

struct ph_control *ph_control_open(const char *path, unsigned nworkers, char *err, size_t errlen)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof(sa.sun_path)) {
		snprintf(err, errlen, "control socket %s: path too long", path);
		return NULL;
	}
	struct ph_control *c = calloc(1, sizeof(*c));
	if (c)
		c->mb = aligned_alloc(CACHELINE, sizeof(*c->mb) * (nworkers ? nworkers : 1));
	if (!c || !c->mb) {
		free(c);
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	memset(c->mb, 0, sizeof(*c->mb) * (nworkers ? nworkers : 1));
	snprintf(c->path, sizeof(c->path), "%s", path);
	c->fd = -1;
	c->pipe[0] = c->pipe[1] = -1;
	c->nworkers = nworkers;
	pthread_mutex_init(&c->lock, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&c->cond, &ca);
	pthread_condattr_destroy(&ca);
	for (unsigned i = 0; i < nworkers; i++) {
		struct ctl_mailbox *mb = &c->mb[i];
		pthread_mutex_init(&mb->lock, NULL);
		mb->c = c;
		mb->index = i;
		mb->efd = -1;
		mb->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (mb->efd < 0) {
			snprintf(err, errlen, "control: eventfd: %s", strerror(errno));
			goto fail;
		}
	}
	if (pipe2(c->pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
		snprintf(err, errlen, "control: pipe: %s", strerror(errno));
		goto fail;
	}
	c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (c->fd < 0) {
		snprintf(err, errlen, "control socket: %s", strerror(errno));
		goto fail;
	}
	memcpy(sa.sun_path, path, strlen(path) + 1);
	/* the spool's lock is ours: whatever is there is a dead daemon's socket */
	struct stat st;
	if (lstat(path, &st) == 0 && !S_ISSOCK(st.st_mode)) {
		snprintf(err, errlen, "control socket %s: exists and is not a socket", path);
		goto fail;
	}
	if (unlink(path) < 0 && errno != ENOENT) {
		snprintf(err, errlen, "control socket %s: cannot remove the old one: %s", path,
		         strerror(errno));
		goto fail;
	}
	mode_t old = umask(0177); /* created 0600: root (the owner) only */
	int r = bind(c->fd, (struct sockaddr *)&sa, sizeof(sa));
	int e = errno;
	umask(old);
	if (r < 0) {
		snprintf(err, errlen, "control socket %s: bind: %s", path, strerror(e));
		goto fail;
	}
	if (stat(path, &st) == 0) {
		c->dev = st.st_dev;
		c->ino = st.st_ino;
	}
	if (listen(c->fd, 64) < 0) {
		snprintf(err, errlen, "control socket %s: listen: %s", path, strerror(errno));
		unlink(path);
		goto fail;
	}
	return c;
fail:
	c->ino = 0; /* nothing of ours to remove */
	c->path[0] = '\0';
	ph_control_close(&c);
	return NULL;
}

int ph_control_start(struct ph_control *c)
{
	/* every signal stays with the engine's thread (it waits for SIGTERM and SIGINT) */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	int r = pthread_create(&c->thread, NULL, control_main, c);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (r)
		return -r;
	c->running = true;
	return 0;
}

void ph_control_stop(struct ph_control *c)
{
	if (!c || !c->running)
		return;
	pthread_mutex_lock(&c->lock);
	c->stopping = true;
	pthread_cond_broadcast(&c->cond);
	pthread_mutex_unlock(&c->lock);
	char b = 1;
	if (write(c->pipe[1], &b, 1) < 0)
		log_err("control: cannot stop the thread: %s", strerror(errno));
	pthread_join(c->thread, NULL);
	c->running = false;
}

void ph_control_close(struct ph_control **cp)
{
	struct ph_control *c = *cp;
	if (!c)
		return;
	*cp = NULL;
	ph_control_stop(c);
	if (c->fd >= 0) {
		/* remove it only if it is still ours (not a later daemon's) */
		struct stat st;
		if (c->path[0] && c->ino && stat(c->path, &st) == 0 && st.st_dev == c->dev &&
		    st.st_ino == c->ino)
			unlink(c->path);
		close(c->fd);
	}
	for (int i = 0; i < 2; i++)
		if (c->pipe[i] >= 0)
			close(c->pipe[i]);
	for (unsigned i = 0; i < c->nworkers; i++) {
		struct ctl_mailbox *mb = &c->mb[i];
		if (mb->c) {
			if (mb->efd >= 0)
				close(mb->efd);
			for (size_t k = 0; k < mb->n; k++) /* never taken: the loop did not run */
				if (--mb->q[k]->refs == 0)
					free(mb->q[k]);
			free(mb->q);
			free(mb->ids);
			pthread_mutex_destroy(&mb->lock);
		}
	}
	pthread_cond_destroy(&c->cond);
	pthread_mutex_destroy(&c->lock);
	free(c->mb);
	free(c);
}
