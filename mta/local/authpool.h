/*
 * authpool: password checks (passwd_verify, 10-50 ms of CPU each for
 * yescrypt) on a fixed pool of threads, so that the net workers that ask for
 * them go on serving their other connections meanwhile (docs/auth.md).
 *
 * A worker submits a job (the login and a copy of the password) to one
 * bounded queue shared by the pool's threads; a thread runs the check, wipes
 * the password copy, and puts the job on the submitting worker's completion
 * list, then signals that worker's eventfd. The worker's ring polls the
 * eventfd (authpool_worker_init) and runs each finished job's callback on
 * the worker thread. Nothing blocks a worker: a full queue is refused at
 * once (-EAGAIN).
 *
 * Secrets: the password copy lives in the job only; it is wiped with
 * explicit_bzero as soon as the check returns, and on every other path that
 * drops a job (cancelled at shutdown, refused, freed).
 *
 * Threads: authpool_new and authpool_free on the program's main thread
 * (before the workers start / after they stopped); authpool_submit,
 * authpool_worker_init, authpool_worker_fini and authpool_worker_deliver on
 * the worker thread of the index they name (one thread per index). The
 * pool's own threads run only the check.
 *
 * Errors: 0 or -errno.
 */
#ifndef POSTHASTE_MTA_LOCAL_AUTHPOOL_H
#define POSTHASTE_MTA_LOCAL_AUTHPOOL_H

#include <stddef.h>

#include "mta/local/users.h"
#include "net/net.h"

struct authpool;

/* Jobs that may wait for a thread, per thread, when authpool_config.queue_max is 0. */
#define AUTHPOOL_QUEUE_PER_THREAD 32u

struct authpool_config {
	unsigned threads;   /* hashing threads; 0 = max(1, CPUs the process may use / 2) */
	unsigned queue_max; /* jobs waiting for a thread (not those being checked);
	                       0 = AUTHPOOL_QUEUE_PER_THREAD x threads */
	unsigned nworkers;  /* submitters, by index 0 .. nworkers - 1 (the net workers) */
	/* The logins: each job is passwd_verify(users, login, password). */
	const struct users *users;
	/*
	 * Optional, for tests: runs instead of passwd_verify, on a pool thread,
	 * with the same contract (1 accepted, 0 refused, -errno); the password
	 * is pw_len octets, not NUL-terminated.
	 */
	int (*check)(void *arg, const char *login, size_t login_len, const char *pw, size_t pw_len);
	void *check_arg;
};

/*
 * A job's answer, on the submitting worker's thread: res is 1 (accepted),
 * 0 (refused), or -errno: what the check returned (-ENOMEM), or -ECANCELED
 * when the worker stopped before the answer (authpool_worker_fini). Called
 * exactly once per job authpool_submit accepted, unless the pool is freed
 * before the worker's authpool_worker_fini (then never).
 */
typedef void authpool_done_fn(void *arg, int res);

/*
 * Creates the pool and starts its threads (with every signal blocked, so the
 * engine's signal handling is not disturbed). NULL on failure, with the
 * reason in err.
 */
struct authpool *authpool_new(const struct authpool_config *cfg, char *err, size_t errlen);

/*
 * Stops the threads (a check in progress finishes first), joins them, and
 * frees every job left, wiped, without calling its callback. Call after the
 * workers stopped (their authpool_worker_fini ran). Accepts NULL; sets *p to
 * NULL.
 */
void authpool_free(struct authpool **p);

/* The number of threads the pool runs (after the default was applied). */
unsigned authpool_threads(const struct authpool *p);

/*
 * Queues a check for worker `worker`: copies login (login_len octets) and
 * the password (pw_len octets; the caller wipes its own copy). done(arg, res)
 * runs later on that worker's thread (authpool_done_fn). Returns 0 (queued),
 * -EAGAIN (the queue is full: answer "try later" at once), -ESHUTDOWN (the
 * worker's authpool_worker_fini ran), -EINVAL (a bad worker index), or
 * -ENOMEM. On an error done never runs.
 */
int authpool_submit(struct authpool *p, unsigned worker, const char *login, size_t login_len,
                    const char *pw, size_t pw_len, authpool_done_fn *done, void *arg);

/*
 * Arms worker w's completion eventfd in its ring (from the engine's worker
 * init hook): finished jobs' callbacks then run from the worker's loop.
 */
int authpool_worker_init(struct authpool *p, struct net_worker *w);

/*
 * The worker's loop ended (from the fini hook): its jobs still waiting for a
 * thread are dropped, and every job of it not answered yet gets
 * done(arg, -ECANCELED) now, except those already finished, which get their
 * result. A job being checked at this moment is left to its thread, which
 * wipes and frees it when the check returns. authpool_submit for this worker
 * fails from now on.
 */
void authpool_worker_fini(struct authpool *p, struct net_worker *w);

/*
 * For loops other than net's (the unit tests): the eventfd that becomes
 * readable when worker `worker` has finished jobs, and the call that runs
 * their callbacks (and resets the eventfd). authpool_worker_deliver returns
 * the number of callbacks it ran. authpool_worker_fini_index is
 * authpool_worker_fini by index.
 */
int authpool_worker_fd(const struct authpool *p, unsigned worker);
unsigned authpool_worker_deliver(struct authpool *p, unsigned worker);
void authpool_worker_fini_index(struct authpool *p, unsigned worker);

#endif
