/*
 * Unit tests of mta/local/authpool: password checks on a pool of threads,
 * answered on the submitting worker's completion list.
 *
 * The "workers" here are the test's own thread: it waits on each worker's
 * eventfd with poll(2) and runs authpool_worker_deliver, as net's loop does
 * through authpool_worker_init. A fake check (authpool_config.check) makes
 * the threads' work controllable: a table of logins and passwords with their
 * answers, and a gate that holds a check until the test opens it (to fill
 * the queue, to stop a worker with a job in a thread's hands). One case runs
 * the real passwd_verify against a users table with a yescrypt hash.
 * Leaks (jobs left queued, running or finished at shutdown) are for the
 * ASan build's LeakSanitizer to find.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "core/compiler.h"
#include "mta/local/authpool.h"
#include "mta/local/passwd.h"
#include "mta/local/users.h"

#define WAIT_MS 30000 /* longest wait for an answer (the sanitizer build is slow) */

/* ---- the fake check and its gate ---- */

struct gate {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool open;
	unsigned started;   /* checks that began */
	size_t last_pw_len; /* as the check saw it */
};

static struct gate gate = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, true, 0, 0};

static void gate_set(bool open)
{
	pthread_mutex_lock(&gate.lock);
	gate.open = open;
	gate.started = 0;
	pthread_cond_broadcast(&gate.cond);
	pthread_mutex_unlock(&gate.lock);
}

static void gate_wait_started(unsigned n)
{
	pthread_mutex_lock(&gate.lock);
	while (gate.started < n)
		pthread_cond_wait(&gate.cond, &gate.lock);
	pthread_mutex_unlock(&gate.lock);
}

/* "user" / "good" is accepted, any password "error" fails the check, the rest is refused. */
static int fake_check(void *arg, const char *login, size_t login_len, const char *pw, size_t pw_len)
{
	(void)arg;
	pthread_mutex_lock(&gate.lock);
	gate.started++;
	gate.last_pw_len = pw_len;
	pthread_cond_broadcast(&gate.cond);
	while (!gate.open)
		pthread_cond_wait(&gate.cond, &gate.lock);
	pthread_mutex_unlock(&gate.lock);
	usleep(500); /* some work, so that jobs overlap */
	if (pw_len == 5 && !memcmp(pw, "error", 5))
		return -ENOMEM;
	return login_len == 4 && !memcmp(login, "user", 4) && pw_len == 4 && !memcmp(pw, "good", 4);
}

/* ---- answers ---- */

static int delivering = -1; /* the worker whose list is being delivered */

struct answer {
	unsigned worker; /* where it must arrive */
	int want;
	int res;
	unsigned calls;
	int on_worker; /* where it arrived */
};

static void on_done(void *arg, int res)
{
	struct answer *a = arg;
	a->res = res;
	a->calls++;
	a->on_worker = delivering;
}

static unsigned answered(const struct answer *a, size_t n)
{
	unsigned k = 0;
	for (size_t i = 0; i < n; i++)
		k += a[i].calls != 0;
	return k;
}

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Runs the workers' side until `want` of the n answers came (or the wait ran out). */
static void deliver_until(struct authpool *p, unsigned nworkers, const struct answer *a, size_t n,
                          unsigned want)
{
	uint64_t end = now_ms() + WAIT_MS;
	while (answered(a, n) < want && now_ms() < end) {
		struct pollfd fds[8];
		assert_true(nworkers <= ARRAY_SIZE(fds));
		for (unsigned i = 0; i < nworkers; i++)
			fds[i] = (struct pollfd){.fd = authpool_worker_fd(p, i), .events = POLLIN};
		int r = poll(fds, nworkers, 100);
		assert_true(r >= 0);
		for (unsigned i = 0; i < nworkers; i++) {
			if (!(fds[i].revents & POLLIN))
				continue;
			delivering = (int)i;
			authpool_worker_deliver(p, i);
			delivering = -1;
		}
	}
	assert_int_equal(answered(a, n), want);
}

static struct authpool *pool_new(unsigned threads, unsigned queue_max, unsigned nworkers)
{
	struct authpool_config cfg = {
	    .threads = threads,
	    .queue_max = queue_max,
	    .nworkers = nworkers,
	    .check = fake_check,
	};
	char err[256] = "";
	struct authpool *p = authpool_new(&cfg, err, sizeof(err));
	if (!p)
		fail_msg("authpool_new: %s", err);
	return p;
}

static int submit(struct authpool *p, unsigned worker, const char *login, const char *pw,
                  struct answer *a)
{
	return authpool_submit(p, worker, login, strlen(login), pw, strlen(pw), on_done, a);
}

/* ---- cases ---- */

/* Many jobs from three workers over three threads: each answer once, right, on its worker. */
static void test_answers_reach_their_worker(void **state)
{
	(void)state;
	static const struct {
		const char *login, *pw;
		int want;
	} jobs[] = {
	    {"user", "good", 1},        {"user", "bad", 0}, {"nobody", "good", 0},
	    {"user", "error", -ENOMEM}, {"user", "", 0},    {"USER", "good", 0},
	};
	enum { NW = 3, N = 60 };
	gate_set(true);
	struct authpool *p = pool_new(3, N, NW);
	assert_int_equal(authpool_threads(p), 3);
	struct answer a[N];
	memset(a, 0, sizeof(a));
	for (unsigned i = 0; i < N; i++) {
		unsigned j = i % ARRAY_SIZE(jobs);
		a[i].worker = (i * 7) % NW;
		a[i].want = jobs[j].want;
		assert_int_equal(submit(p, a[i].worker, jobs[j].login, jobs[j].pw, &a[i]), 0);
	}
	deliver_until(p, NW, a, N, N);
	for (unsigned i = 0; i < N; i++) {
		if (a[i].calls != 1 || a[i].res != a[i].want || a[i].on_worker != (int)a[i].worker)
			fail_msg("job %u: %u calls, res %d (want %d), on worker %d (want %u)", i,
			         a[i].calls, a[i].res, a[i].want, a[i].on_worker, a[i].worker);
	}
	/* nothing more arrives */
	for (unsigned i = 0; i < NW; i++)
		assert_int_equal(authpool_worker_deliver(p, i), 0);
	assert_int_equal(authpool_submit(p, NW, "user", 4, "good", 4, on_done, &a[0]), -EINVAL);
	for (unsigned i = 0; i < NW; i++)
		authpool_worker_fini_index(p, i);
	authpool_free(&p);
	assert_null(p);
	authpool_free(&p); /* NULL is fine */
}

/* One thread busy, the queue (2) full: the next job is refused at once, the others answered. */
static void test_queue_full(void **state)
{
	(void)state;
	struct authpool *p = pool_new(1, 2, 1);
	struct answer a[4];
	memset(a, 0, sizeof(a));
	gate_set(false);
	assert_int_equal(submit(p, 0, "user", "good", &a[0]), 0);
	gate_wait_started(1); /* the thread holds it: the queue is empty */
	assert_int_equal(submit(p, 0, "user", "good", &a[1]), 0);
	assert_int_equal(submit(p, 0, "user", "bad", &a[2]), 0);
	uint64_t t0 = now_ms();
	assert_int_equal(submit(p, 0, "user", "good", &a[3]), -EAGAIN);
	assert_true(now_ms() - t0 < 1000); /* never waits for the pool */
	gate_set(true);
	deliver_until(p, 1, a, 3, 3);
	assert_int_equal(a[0].res, 1);
	assert_int_equal(a[1].res, 1);
	assert_int_equal(a[2].res, 0);
	assert_int_equal(a[3].calls, 0); /* refused: never answered */
	/* room again */
	assert_int_equal(submit(p, 0, "user", "good", &a[3]), 0);
	deliver_until(p, 1, a, 4, 4);
	assert_int_equal(a[3].res, 1);
	authpool_worker_fini_index(p, 0);
	authpool_free(&p);
}

/*
 * A worker stops with one job in a thread's hands, two queued and none
 * finished: all three are answered -ECANCELED at once, the other worker's
 * job is not touched and is answered normally, and the running job is freed
 * by its thread when its check returns (LSan).
 */
static void test_worker_fini_with_jobs_in_flight(void **state)
{
	(void)state;
	struct authpool *p = pool_new(1, 8, 2);
	struct answer a[5];
	memset(a, 0, sizeof(a));
	gate_set(false);
	assert_int_equal(submit(p, 0, "user", "good", &a[0]), 0);
	gate_wait_started(1);
	assert_int_equal(submit(p, 0, "user", "good", &a[1]), 0);
	assert_int_equal(submit(p, 1, "user", "good", &a[2]), 0);
	assert_int_equal(submit(p, 0, "user", "bad", &a[3]), 0);
	authpool_worker_fini_index(p, 0);
	for (unsigned i = 0; i < 4; i++) {
		if (i == 2)
			continue;
		assert_int_equal(a[i].calls, 1);
		assert_int_equal(a[i].res, -ECANCELED);
	}
	assert_int_equal(a[2].calls, 0);
	assert_int_equal(submit(p, 0, "user", "good", &a[4]), -ESHUTDOWN);
	gate_set(true);
	a[0].calls = a[1].calls = a[3].calls = 0; /* count worker 1's answer only */
	deliver_until(p, 2, a, 5, 1);
	assert_int_equal(a[2].calls, 1);
	assert_int_equal(a[2].res, 1);
	assert_int_equal(a[2].on_worker, 1);
	assert_int_equal(a[0].calls + a[1].calls + a[3].calls + a[4].calls, 0);
	authpool_worker_fini_index(p, 1);
	authpool_free(&p);
}

/* Finished answers waiting on a list, and jobs still queued, when the pool is freed: no leak. */
static void test_free_with_jobs_left(void **state)
{
	(void)state;
	enum { N = 12 };
	struct authpool *p = pool_new(2, N, 2);
	struct answer a[N];
	memset(a, 0, sizeof(a));
	gate_set(false);
	for (unsigned i = 0; i < N; i++)
		assert_int_equal(submit(p, i % 2, "user", "good", &a[i]), 0);
	gate_wait_started(2);
	gate_set(true); /* some finish, some stay queued when the threads see the stop */
	usleep(2000);
	authpool_free(&p);
	for (unsigned i = 0; i < N; i++)
		assert_int_equal(a[i].calls, 0); /* never answered after the pool is gone */
}

/* A finished answer still on the list when the worker stops gets its result, not -ECANCELED. */
static void test_worker_fini_delivers_finished(void **state)
{
	(void)state;
	struct authpool *p = pool_new(1, 4, 1);
	struct answer a[1];
	memset(a, 0, sizeof(a));
	gate_set(true);
	assert_int_equal(submit(p, 0, "user", "good", &a[0]), 0);
	struct pollfd fd = {.fd = authpool_worker_fd(p, 0), .events = POLLIN};
	assert_int_equal(poll(&fd, 1, WAIT_MS), 1); /* finished, not delivered */
	authpool_worker_fini_index(p, 0);
	assert_int_equal(a[0].calls, 1);
	assert_int_equal(a[0].res, 1);
	authpool_free(&p);
}

/* The default size, and a password over PASSWD_MAX stays over it for the check. */
static void test_defaults_and_long_password(void **state)
{
	(void)state;
	struct authpool *p = pool_new(0, 0, 1);
	assert_true(authpool_threads(p) >= 1);
	char pw[1000];
	memset(pw, 'a', sizeof(pw));
	struct answer a[2];
	memset(a, 0, sizeof(a));
	gate_set(true);
	assert_int_equal(authpool_submit(p, 0, "user", 4, pw, sizeof(pw), on_done, &a[0]), 0);
	deliver_until(p, 1, a, 1, 1);
	assert_int_equal(a[0].res, 0);
	assert_true(gate.last_pw_len > PASSWD_MAX);
	assert_int_equal(authpool_submit(p, 0, "user", 4, pw, PASSWD_MAX, on_done, &a[1]), 0);
	deliver_until(p, 1, a, 2, 2);
	assert_int_equal(gate.last_pw_len, PASSWD_MAX);
	authpool_worker_fini_index(p, 0);
	authpool_free(&p);
}

/* The real check: passwd_verify against a yescrypt (or SHA-512-crypt) hash. */
static void test_passwd_verify(void **state)
{
	(void)state;
	char hash[PASSWD_HASH_MAX];
	char longpw[PASSWD_MAX + 1];
	memset(longpw, 'p', PASSWD_MAX);
	longpw[PASSWD_MAX] = '\0';
	char hash_long[PASSWD_HASH_MAX];
	assert_int_equal(passwd_hash("s3cret", hash, sizeof(hash)), 0);
	assert_int_equal(passwd_hash(longpw, hash_long, sizeof(hash_long)), 0);
	char file[2 * PASSWD_HASH_MAX + 200];
	int n = snprintf(file, sizeof(file),
	                 "alice@example.org:%s\nlong@example.org:%s\nbob@example.org:*\n", hash,
	                 hash_long);
	char err[256] = "";
	struct users *u = users_load_buffer("users", file, (size_t)n, err, sizeof(err));
	if (!u)
		fail_msg("users_load_buffer: %s", err);
	struct authpool_config cfg = {.threads = 2, .nworkers = 2, .users = u};
	struct authpool *p = authpool_new(&cfg, err, sizeof(err));
	if (!p)
		fail_msg("authpool_new: %s", err);
	char over[PASSWD_MAX + 2];
	memset(over, 'p', sizeof(over) - 1);
	over[sizeof(over) - 1] = '\0';
	static const struct {
		const char *login;
		unsigned pw; /* 0 "s3cret", 1 "wrong", 2 PASSWD_MAX octets, 3 one more */
		int want;
	} cases[] = {
	    {"alice@example.org", 0, 1},  {"ALICE@Example.org", 0, 1}, {"alice@example.org", 1, 0},
	    {"nobody@example.org", 0, 0}, {"bob@example.org", 0, 0},   {"long@example.org", 2, 1},
	    {"long@example.org", 3, 0},
	};
	const char *pws[] = {"s3cret", "wrong", longpw, over};
	struct answer a[ARRAY_SIZE(cases)];
	memset(a, 0, sizeof(a));
	for (unsigned i = 0; i < ARRAY_SIZE(cases); i++) {
		a[i].worker = i % 2;
		a[i].want = cases[i].want;
		assert_int_equal(submit(p, a[i].worker, cases[i].login, pws[cases[i].pw], &a[i]),
		                 0);
	}
	deliver_until(p, 2, a, ARRAY_SIZE(a), ARRAY_SIZE(a));
	for (unsigned i = 0; i < ARRAY_SIZE(cases); i++)
		if (a[i].res != a[i].want || a[i].on_worker != (int)a[i].worker)
			fail_msg("case %u (%s): res %d, want %d; on worker %d", i, cases[i].login,
			         a[i].res, a[i].want, a[i].on_worker);
	authpool_worker_fini_index(p, 0);
	authpool_worker_fini_index(p, 1);
	authpool_free(&p);
	users_free(&u);
}

/* A pool needs something to check against. */
static void test_new_refuses_without_users(void **state)
{
	(void)state;
	struct authpool_config cfg = {.threads = 1, .nworkers = 1};
	char err[256] = "";
	assert_null(authpool_new(&cfg, err, sizeof(err)));
	assert_non_null(strstr(err, "no users"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_answers_reach_their_worker),
	    cmocka_unit_test(test_queue_full),
	    cmocka_unit_test(test_worker_fini_with_jobs_in_flight),
	    cmocka_unit_test(test_free_with_jobs_left),
	    cmocka_unit_test(test_worker_fini_delivers_finished),
	    cmocka_unit_test(test_defaults_and_long_password),
	    cmocka_unit_test(test_passwd_verify),
	    cmocka_unit_test(test_new_refuses_without_users),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
