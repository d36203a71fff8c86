/*
 * authpool: password checks on a pool of threads (see authpool.h).
 *
 * One lock (authpool.lock) guards the job queue, every worker's completion
 * list, the threads' running jobs and the workers' closed flags; it is held
 * only to move a job from one list to another, never during a check, and
 * never while a callback runs. A job is on exactly one of: the queue, a
 * thread's hands (running[]), a worker's completion list; or it is being
 * delivered by its worker.
 */
#include "mta/local/authpool.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "core/compiler.h"
#include "core/log.h"
#include "mta/local/passwd.h"

struct ap_job {
	struct ap_job *next;
	unsigned worker;
	int res;
	authpool_done_fn *done;
	void *arg;
	size_t pw_len;
	size_t login_len;
	/* PASSWD_MAX + 1 octets: a longer password is kept as "too long" (refused by passwd_verify
	   after its dummy hash, as before) without keeping more of it */
	char pw[PASSWD_MAX + 1];
	char login[]; /* login_len octets and a NUL */
};

/* A callback owed for a job that its thread still holds when the worker stops. */
struct ap_owed {
	authpool_done_fn *done;
	void *arg;
};

struct ap_worker {
	struct authpool *p;
	unsigned index;
	int efd;             /* eventfd: "look at the completion list" */
	bool closed;         /* authpool_worker_fini ran; under lock */
	bool broken;         /* the eventfd cannot be polled: refuse new jobs */
	struct ap_job *head; /* finished jobs; under lock */
	struct ap_job **tail;
	struct ap_owed *owed; /* nthreads entries, for authpool_worker_fini */
	struct net_worker *w;
	struct net_io io;
} cache_aligned;

struct authpool {
	pthread_mutex_t lock;
	pthread_cond_t cond; /* for the threads: a job was queued, or stop */
	struct ap_job *qhead, **qtail;
	unsigned queued, queue_max;
	bool stop;
	unsigned nthreads, started;
	pthread_t *threads;
	struct ap_job **running; /* per thread: the job being checked, or NULL */
	unsigned nworkers;
	struct ap_worker *workers;
	const struct users *users;
	int (*check)(void *arg, const char *login, size_t login_len, const char *pw, size_t pw_len);
	void *check_arg;
};

struct ap_thread_arg {
	struct authpool *p;
	unsigned index;
};

/* Wipes the whole job (the password copy, the login) and frees it. */
static void job_free(struct ap_job *j)
{
	explicit_bzero(j, sizeof(*j) + j->login_len + 1);
	free(j);
}

static void wake(struct ap_worker *aw)
{
	uint64_t one = 1;
	if (write(aw->efd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		log_err("authpool: cannot wake worker %u: %s", aw->index, strerror(errno));
}

/* ---- the threads ---- */

static int run_check(struct authpool *p, const struct ap_job *j)
{
	if (p->check)
		return p->check(p->check_arg, j->login, j->login_len, j->pw, j->pw_len);
	return passwd_verify(p->users, j->login, j->login_len, j->pw, j->pw_len, NULL);
}

static void *thread_main(void *targ)
{
	struct ap_thread_arg *ta = targ;
	struct authpool *p = ta->p;
	unsigned me = ta->index;
	free(ta);
	pthread_mutex_lock(&p->lock);
	for (;;) {
		while (!p->stop && !p->qhead)
			pthread_cond_wait(&p->cond, &p->lock);
		if (p->stop)
			break; /* what is still queued is authpool_free's */
		struct ap_job *j = p->qhead;
		p->qhead = j->next;
		if (!p->qhead)
			p->qtail = &p->qhead;
		p->queued--;
		j->next = NULL;
		p->running[me] = j;
		pthread_mutex_unlock(&p->lock);

		int res = run_check(p, j);
		explicit_bzero(j->pw, sizeof(j->pw));
		j->pw_len = 0;

		pthread_mutex_lock(&p->lock);
		p->running[me] = NULL;
		struct ap_worker *aw = &p->workers[j->worker];
		if (aw->closed) {
			/* its worker stopped and answered -ECANCELED for it */
			job_free(j);
			continue;
		}
		j->res = res;
		*aw->tail = j;
		aw->tail = &j->next;
		wake(aw); /* a write to an eventfd: cheap, never blocks (EFD_NONBLOCK) */
	}
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

/* ---- set-up ---- */

static unsigned default_threads(void)
{
	unsigned n = 0;
	cpu_set_t set;
	if (sched_getaffinity(0, sizeof(set), &set) == 0)
		n = (unsigned)CPU_COUNT(&set);
	if (!n) {
		long c = sysconf(_SC_NPROCESSORS_ONLN);
		n = c > 0 ? (unsigned)c : 1;
	}
	return n / 2 ? n / 2 : 1;
}

struct authpool *authpool_new(const struct authpool_config *cfg, char *err, size_t errlen)
{
	if (!cfg->users && !cfg->check) {
		snprintf(err, errlen, "authpool: no users to check against");
		return NULL;
	}
	struct authpool *p = calloc(1, sizeof(*p));
	if (!p) {
		snprintf(err, errlen, "authpool: out of memory");
		return NULL;
	}
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->cond, NULL);
	p->qtail = &p->qhead;
	p->nthreads = cfg->threads ? cfg->threads : default_threads();
	p->queue_max = cfg->queue_max ? cfg->queue_max : AUTHPOOL_QUEUE_PER_THREAD * p->nthreads;
	p->nworkers = cfg->nworkers;
	p->users = cfg->users;
	p->check = cfg->check;
	p->check_arg = cfg->check_arg;
	p->threads = calloc(p->nthreads, sizeof(*p->threads));
	p->running = calloc(p->nthreads, sizeof(*p->running));
	p->workers =
	    aligned_alloc(CACHELINE, sizeof(*p->workers) * (p->nworkers ? p->nworkers : 1));
	if (!p->threads || !p->running || !p->workers) {
		free(p->workers); /* nothing in it yet */
		p->workers = NULL;
		p->nworkers = 0;
		snprintf(err, errlen, "authpool: out of memory");
		goto fail;
	}
	memset(p->workers, 0, sizeof(*p->workers) * (p->nworkers ? p->nworkers : 1));
	for (unsigned i = 0; i < p->nworkers; i++) {
		struct ap_worker *aw = &p->workers[i];
		aw->p = p;
		aw->index = i;
		aw->tail = &aw->head;
		aw->efd = -1;
	}
	for (unsigned i = 0; i < p->nworkers; i++) {
		struct ap_worker *aw = &p->workers[i];
		aw->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		aw->owed = calloc(p->nthreads, sizeof(*aw->owed));
		if (aw->efd < 0 || !aw->owed) {
			snprintf(err, errlen, "authpool: %s",
			         aw->efd < 0 ? strerror(errno) : "out of memory");
			goto fail;
		}
	}
	/* every signal stays with the engine's thread (it waits for SIGTERM, SIGINT, SIGHUP) */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	for (unsigned i = 0; i < p->nthreads; i++) {
		struct ap_thread_arg *ta = malloc(sizeof(*ta));
		if (ta)
			*ta = (struct ap_thread_arg){.p = p, .index = i};
		int r = ta ? pthread_create(&p->threads[i], NULL, thread_main, ta) : ENOMEM;
		if (r) {
			free(ta);
			pthread_sigmask(SIG_SETMASK, &old, NULL);
			snprintf(err, errlen, "authpool: cannot start a thread: %s", strerror(r));
			goto fail;
		}
		p->started++;
		pthread_setname_np(p->threads[i], "ph-auth");
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return p;
fail:
	authpool_free(&p);
	return NULL;
}

unsigned authpool_threads(const struct authpool *p)
{
	return p->nthreads;
}

void authpool_free(struct authpool **pp)
{
	struct authpool *p = *pp;
	if (!p)
		return;
	*pp = NULL;
	pthread_mutex_lock(&p->lock);
	p->stop = true;
	pthread_cond_broadcast(&p->cond);
	pthread_mutex_unlock(&p->lock);
	for (unsigned i = 0; i < p->started; i++)
		pthread_join(p->threads[i], NULL);
	/* the threads are gone: every job left is on the queue or a completion list */
	for (struct ap_job *j = p->qhead, *next; j; j = next) {
		next = j->next;
		job_free(j);
	}
	for (unsigned i = 0; i < p->nworkers; i++) {
		struct ap_worker *aw = &p->workers[i];
		for (struct ap_job *j = aw->head, *next; j; j = next) {
			next = j->next;
			job_free(j);
		}
		if (aw->efd >= 0)
			close(aw->efd);
		free(aw->owed);
	}
	pthread_cond_destroy(&p->cond);
	pthread_mutex_destroy(&p->lock);
	free(p->workers);
	free(p->running);
	free(p->threads);
	free(p);
}

/* ---- the workers' side ---- */

int authpool_submit(struct authpool *p, unsigned worker, const char *login, size_t login_len,
                    const char *pw, size_t pw_len, authpool_done_fn *done, void *arg)
{
	if (worker >= p->nworkers)
		return -EINVAL;
	struct ap_worker *aw = &p->workers[worker];
	if (aw->broken)
		return -EIO;
	if (login_len > SIZE_MAX / 2)
		return -EINVAL;
	struct ap_job *j = malloc(sizeof(*j) + login_len + 1);
	if (!j)
		return -ENOMEM;
	memset(j, 0, sizeof(*j));
	j->worker = worker;
	j->done = done;
	j->arg = arg;
	j->login_len = login_len;
	memcpy(j->login, login, login_len);
	j->login[login_len] = '\0';
	j->pw_len = MIN(pw_len, sizeof(j->pw)); /* over PASSWD_MAX stays over it */
	memcpy(j->pw, pw, j->pw_len);
	int r = 0;
	pthread_mutex_lock(&p->lock);
	if (aw->closed || p->stop) {
		r = -ESHUTDOWN;
	} else if (p->queued >= p->queue_max) {
		r = -EAGAIN;
	} else {
		*p->qtail = j;
		p->qtail = &j->next;
		p->queued++;
		pthread_cond_signal(&p->cond);
	}
	pthread_mutex_unlock(&p->lock);
	if (r < 0)
		job_free(j);
	return r;
}

int authpool_worker_fd(const struct authpool *p, unsigned worker)
{
	return worker < p->nworkers ? p->workers[worker].efd : -1;
}

unsigned authpool_worker_deliver(struct authpool *p, unsigned worker)
{
	if (worker >= p->nworkers)
		return 0;
	struct ap_worker *aw = &p->workers[worker];
	/* reset first: a job finished after this read wakes us again */
	uint64_t v;
	if (read(aw->efd, &v, sizeof(v)) < 0 && errno != EAGAIN)
		log_err("authpool: worker %u: reading the eventfd: %s", worker, strerror(errno));
	pthread_mutex_lock(&p->lock);
	struct ap_job *j = aw->head;
	aw->head = NULL;
	aw->tail = &aw->head;
	pthread_mutex_unlock(&p->lock);
	unsigned n = 0;
	while (j) {
		struct ap_job *next = j->next;
		authpool_done_fn *done = j->done;
		void *arg = j->arg;
		int res = j->res;
		job_free(j);
		done(arg, res);
		n++;
		j = next;
	}
	return n;
}

static void worker_wake(struct net_io *io, int res)
{
	struct ap_worker *aw = container_of(io, struct ap_worker, io);
	if (res < 0) {
		if (res != -ECANCELED) {
			log_err("authpool: worker %u: polling the eventfd: %s; AUTH answers 454 on "
			        "this worker from now on",
			        aw->index, strerror(-res));
			aw->broken = true;
		}
		return;
	}
	authpool_worker_deliver(aw->p, aw->index);
	int r = net_poll_add(aw->w, aw->efd, POLLIN, &aw->io);
	if (r < 0 && r != -ESHUTDOWN) {
		log_err(
		    "authpool: worker %u: cannot poll the eventfd: %s; AUTH answers 454 on this "
		    "worker from now on",
		    aw->index, strerror(-r));
		aw->broken = true;
	}
}

int authpool_worker_init(struct authpool *p, struct net_worker *w)
{
	unsigned i = net_worker_index(w);
	if (i >= p->nworkers)
		return -EINVAL;
	struct ap_worker *aw = &p->workers[i];
	aw->w = w;
	aw->io.done = worker_wake;
	return net_poll_add(w, aw->efd, POLLIN, &aw->io);
}

void authpool_worker_fini_index(struct authpool *p, unsigned worker)
{
	if (worker >= p->nworkers)
		return;
	struct ap_worker *aw = &p->workers[worker];
	struct ap_job *cancelled = NULL, **ctail = &cancelled;
	unsigned nowed = 0;
	pthread_mutex_lock(&p->lock);
	aw->closed = true;
	/* its jobs still waiting for a thread leave the queue */
	struct ap_job **pj = &p->qhead;
	p->qtail = &p->qhead;
	while (*pj) {
		struct ap_job *j = *pj;
		if (j->worker == worker) {
			*pj = j->next;
			p->queued--;
			j->next = NULL;
			*ctail = j;
			ctail = &j->next;
		} else {
			pj = &j->next;
			p->qtail = pj;
		}
	}
	/* those being checked stay with their threads (freed there, aw->closed); their
	   callbacks are owed now */
	for (unsigned t = 0; t < p->nthreads; t++) {
		struct ap_job *j = p->running[t];
		if (j && j->worker == worker)
			aw->owed[nowed++] = (struct ap_owed){.done = j->done, .arg = j->arg};
	}
	pthread_mutex_unlock(&p->lock);
	/* the finished ones get their result; nothing is added to the list any more */
	authpool_worker_deliver(p, worker);
	for (struct ap_job *j = cancelled, *next; j; j = next) {
		next = j->next;
		authpool_done_fn *done = j->done;
		void *arg = j->arg;
		job_free(j);
		done(arg, -ECANCELED);
	}
	for (unsigned k = 0; k < nowed; k++)
		aw->owed[k].done(aw->owed[k].arg, -ECANCELED);
}

void authpool_worker_fini(struct authpool *p, struct net_worker *w)
{
	authpool_worker_fini_index(p, net_worker_index(w));
}
