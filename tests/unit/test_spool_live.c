/*
 * live queue tests: the spool's in-memory queue of messages that are not
 * final (queue/spool.h, "the live queue"), driven by a real engine with one
 * worker, with the spool reopened between runs to check what recovery hands
 * back. Also the state payload codec and table of queue/state.c.
 *
 * Everything that runs on the worker thread records failures with CHECK
 * (cmocka's asserts longjmp, which must not happen on another thread); the
 * main thread asserts that no CHECK failed once the engine stopped.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include <dirent.h>
#include <sys/uio.h>

#include "net/net.h"
#include "queue/envelope.h"
#include "queue/record.h"
#include "queue/spool.h"
#include "queue/state.h"

#define MAXM 64

struct ctx;

struct msgref {
	struct ctx *c;
	unsigned i;
};

struct ctx {
	char dir[256];
	uint64_t segment_size;
	uint64_t compact_after_ms;
	size_t body_size;
	struct spool *sp;
	struct net_engine *e;
	struct spool_worker *sw;
	struct net_timer tick;
	bool stopped;
	/* per run: what the test does (worker thread) */
	void (*step)(struct ctx *c);          /* every tick until stop */
	void (*fini)(struct ctx *c);          /* from the fini hook, before spool_worker_fini */
	void (*after_open)(struct ctx *c);    /* main thread, after spool_open */
	void (*turn_pre)(struct ctx *c);      /* turn end, before spool_worker_turn_end */
	void (*turn_post)(struct ctx *c);     /* turn end, after spool_worker_turn_end */
	bool announce;                        /* spool_worker_announce from the init hook */
	int phase;
	/* messages, over every run of the test, in commit order */
	unsigned nmsg;
	uint64_t ids[MAXM];
	struct msgref ref[MAXM];
	bool done_seen[MAXM];
	int done_res[MAXM];
	unsigned ndone, nok; /* this run */
	/* hooks.added, this run */
	unsigned nadded;
	uint64_t added_id[MAXM];
	uint8_t added_state[MAXM];
	uint16_t added_attempts[MAXM];
	uint64_t added_until[MAXM];
	uint32_t added_ndone[MAXM];
	uint32_t added_done[MAXM][4];
	bool added_before_done;
	/* after the run (main thread) */
	struct spool_stats stats;
	uint64_t queued, held;
	/* failures on the worker thread */
	unsigned fails;
	int fail_line;
	/* test specific */
	uint64_t u[16];
};

#define CHECK(c_, cond)                                                                      \
	do {                                                                                 \
		if (!(cond)) {                                                               \
			if (!(c_)->fails++)                                                  \
				(c_)->fail_line = __LINE__;                                  \
			fprintf(stderr, "CHECK failed at line %d: %s\n", __LINE__, #cond);  \
		}                                                                            \
	} while (0)

/* ---- messages ---- */

static void msg_sender(unsigned i, char *buf, size_t len)
{
	snprintf(buf, len, "sender%u@example.com", i);
}

static void msg_rcpt(unsigned i, unsigned k, char *buf, size_t len)
{
	snprintf(buf, len, "%s%u@example.%s", k ? "b" : "a", i, k ? "net" : "org");
}

/* The body of message i: a header and body_size octets of a pattern of i. */
static size_t msg_body(unsigned i, size_t body_size, char *buf)
{
	int n = sprintf(buf, "Subject: m%u\r\n\r\n", i);
	for (size_t k = 0; k < body_size; k++)
		buf[n + k] = (char)('a' + (i * 7 + k) % 26);
	return (size_t)n + body_size;
}

static unsigned idx_of(const struct ctx *c, uint64_t id)
{
	for (unsigned i = 0; i < c->nmsg; i++)
		if (c->ids[i] == id)
			return i;
	return UINT32_MAX;
}

static void on_done(void *arg, int res, uint64_t id)
{
	struct msgref *r = arg;
	struct ctx *c = r->c;
	CHECK(c, id == c->ids[r->i]);
	CHECK(c, !c->done_seen[r->i]);
	c->done_seen[r->i] = true;
	c->done_res[r->i] = res;
	c->ndone++;
	if (res == 0)
		c->nok++;
}

static void on_added(void *arg, struct spool_entry *e)
{
	struct ctx *c = arg;
	unsigned i = idx_of(c, e->id);
	CHECK(c, i != UINT32_MAX);
	if (i != UINT32_MAX && !c->done_seen[i])
		c->added_before_done = true;
	if (c->nadded >= MAXM)
		return;
	unsigned k = c->nadded++;
	c->added_id[k] = e->id;
	c->added_state[k] = e->state;
	c->added_attempts[k] = e->attempts;
	c->added_until[k] = e->until_ms;
	c->added_ndone[k] = e->nrcpt_done;
	for (uint32_t j = 0; j < e->nrcpt_done && j < 4; j++)
		c->added_done[k][j] = e->rcpt_done[j];
}

/* Commits message c->nmsg (2 recipients); with a trace header prepended when asked. */
static unsigned commit_one(struct ctx *c, bool prepend)
{
	unsigned i = c->nmsg++;
	char *body = malloc(c->body_size + 64);
	size_t blen = msg_body(i, c->body_size, body);
	struct spool_txn *t = spool_txn_begin(c->sw);
	CHECK(c, t != NULL);
	if (!t) {
		free(body);
		return i;
	}
	c->ids[i] = spool_txn_id(t);
	CHECK(c, spool_txn_append(t, body, 7) == 0);
	CHECK(c, spool_txn_append(t, body + 7, blen - 7) == 0);
	/* the body so far, as the iovecs the SMTP side peeks at */
	struct iovec iov[8];
	unsigned n = spool_txn_body_iov(t, iov, 8);
	size_t got = 0;
	for (unsigned k = 0; k < n; k++) {
		CHECK(c, got + iov[k].iov_len <= blen && !memcmp(body + got, iov[k].iov_base, iov[k].iov_len));
		got += iov[k].iov_len;
	}
	CHECK(c, n >= 1 && got == blen);
	if (prepend)
		CHECK(c, spool_txn_prepend(t, "Received: x\r\n", 13) == 0);
	char sender[64], r0[64], r1[64];
	msg_sender(i, sender, sizeof(sender));
	msg_rcpt(i, 0, r0, sizeof(r0));
	msg_rcpt(i, 1, r1, sizeof(r1));
	const char *rcpts[2] = {r0, r1};
	size_t lens[2] = {strlen(r0), strlen(r1)};
	struct spool_envelope env = {
		.sender = sender,
		.sender_len = strlen(sender),
		.helo = "client.example",
		.peer = "127.0.0.1",
		.rcpts = rcpts,
		.rcpt_lens = lens,
		.nrcpts = 2,
	};
	c->ref[i] = (struct msgref){c, i};
	spool_txn_commit(t, &env, on_done, &c->ref[i]);
	free(body);
	return i;
}

/* Reads message i's record back through its entry and compares it with what was committed. */
static void check_read(struct ctx *c, const struct spool_entry *e, unsigned i, bool prepended)
{
	uint8_t *buf = NULL;
	size_t len = 0;
	int r = spool_entry_read(c->sw, e, &buf, &len);
	CHECK(c, r == 0);
	if (r < 0)
		return;
	struct spool_message m;
	char err[256];
	r = spool_envelope_decode(buf, len, &m, err, sizeof(err));
	CHECK(c, r == 0);
	if (r == 0) {
		char sender[64], rc[64];
		msg_sender(i, sender, sizeof(sender));
		CHECK(c, m.sender_len == strlen(sender) && !memcmp(m.sender, sender, m.sender_len));
		CHECK(c, m.helo_len == 14 && !memcmp(m.helo, "client.example", 14));
		CHECK(c, m.nrcpts == 2);
		for (unsigned k = 0; k < 2 && k < m.nrcpts; k++) {
			msg_rcpt(i, k, rc, sizeof(rc));
			CHECK(c, m.rcpts[k].addr_len == strlen(rc) &&
				     !memcmp(m.rcpts[k].addr, rc, strlen(rc)));
		}
		char *body = malloc(c->body_size + 64 + 13);
		size_t blen = 0;
		if (prepended) {
			memcpy(body, "Received: x\r\n", 13);
			blen = 13;
		}
		blen += msg_body(i, c->body_size, body + blen);
		CHECK(c, m.body_len == blen && !memcmp(m.body, body, blen));
		free(body);
	}
	spool_message_free(&m);
	free(buf);
}

static void stop(struct ctx *c)
{
	c->stopped = true;
	net_engine_stop(c->e);
}

/* ---- the engine ---- */

static void tick_fire(struct net_timer *t, struct net_worker *w)
{
	struct ctx *c = (struct ctx *)((char *)t - offsetof(struct ctx, tick));
	if (c->stopped)
		return;
	c->step(c);
	if (!c->stopped)
		net_timer_start(w, t, 1);
}

static int hook_init(struct net_worker *w, void *arg)
{
	struct ctx *c = arg;
	int r = spool_worker_init(c->sp, w);
	if (r < 0)
		return r;
	c->sw = spool_worker(c->sp, 0);
	spool_worker_set_hooks(c->sw, &(struct spool_hooks){.added = on_added}, c);
	if (c->announce) {
		spool_worker_announce(c->sw);
		unsigned n = c->nadded;
		spool_worker_announce(c->sw); /* once only */
		CHECK(c, c->nadded == n);
	}
	c->tick.fire = tick_fire;
	net_timer_start(w, &c->tick, 1);
	return 0;
}

static void hook_turn_end(struct net_worker *w, void *arg)
{
	(void)w;
	struct ctx *c = arg;
	if (c->turn_pre)
		c->turn_pre(c);
	spool_worker_turn_end(c->sw);
	if (c->turn_post)
		c->turn_post(c);
}

static void hook_fini(struct net_worker *w, void *arg)
{
	struct ctx *c = arg;
	net_timer_stop(w, &c->tick);
	if (c->fini)
		c->fini(c);
	spool_worker_fini(c->sw);
}

/*
 * Every case runs twice: with direct I/O (the default where the file system
 * takes it: the test directory is on one that does, or the spool falls back)
 * and through the page cache.
 */
static bool buffered_io;

static struct spool *open_spool(const struct ctx *c, char *err, size_t errlen)
{
	struct spool_config cfg = {
		.dir = c->dir,
		.durability = SPOOL_FSYNC,
		.segment_size = c->segment_size,
		.compact_after_ms = c->compact_after_ms,
		.buffered_io = buffered_io};
	return spool_open(&cfg, 1, err, errlen);
}

/* One engine run over the spool: reopened (recovery), driven by c->step, closed. */
static void run(struct ctx *c)
{
	char err[512];
	c->sp = open_spool(c, err, sizeof(err));
	assert_non_null(c->sp);
	c->stopped = false;
	c->phase = 0;
	c->ndone = c->nok = c->nadded = 0;
	c->added_before_done = false;
	if (c->after_open)
		c->after_open(c);
	struct net_config cfg;
	net_config_default(&cfg);
	cfg.workers = 1;
	cfg.pin = false;
	cfg.buf_count = 64;
	struct net_worker_hooks hooks = {
		.init = hook_init, .turn_end = hook_turn_end, .fini = hook_fini, .arg = c};
	c->e = net_engine_new(&cfg, &hooks);
	assert_non_null(c->e);
	assert_int_equal(net_engine_run(c->e), 0);
	net_engine_free(&c->e);
	spool_stats(c->sp, &c->stats);
	c->queued = spool_queued(c->sp);
	c->held = spool_held(c->sp);
	spool_close(&c->sp);
	if (c->fails)
		fail_msg("%u checks failed on the worker thread, the first at line %d", c->fails,
			 c->fail_line);
	c->step = NULL;
	c->fini = NULL;
	c->after_open = NULL;
	c->turn_pre = c->turn_post = NULL;
}

/* What recovery finds, without running an engine. */
static void reopen_counts(struct ctx *c, struct spool_stats *st, uint64_t *queued, uint64_t *held)
{
	char err[512];
	struct spool *sp = open_spool(c, err, sizeof(err));
	assert_non_null(sp);
	spool_stats(sp, st);
	*queued = spool_queued(sp);
	*held = spool_held(sp);
	spool_close(&sp);
}

static void make_dir(struct ctx *c)
{
	snprintf(c->dir, sizeof(c->dir), "/tmp/ph-test-live-XXXXXX");
	assert_non_null(mkdtemp(c->dir));
	if (!c->body_size)
		c->body_size = 200;
}

static void remove_dir(const char *dir)
{
	char cmd[512];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	assert_int_equal(system(cmd), 0);
}

/* ---- segments on disk ---- */

static int seg_filter(const struct dirent *de)
{
	return !strncmp(de->d_name, "seg-", 4);
}

/* The sequences of dir/w0's segments, ascending; how many. */
static unsigned seg_list(const char *dir, uint64_t *seqs, unsigned max)
{
	char w0[512];
	snprintf(w0, sizeof(w0), "%s/w0", dir);
	struct dirent **names;
	int n = scandir(w0, &names, seg_filter, alphasort);
	if (n < 0)
		return 0;
	unsigned k = 0;
	for (int i = 0; i < n; i++) {
		if (k < max)
			seqs[k++] = strtoull(names[i]->d_name + 4, NULL, 16);
		free(names[i]);
	}
	free(names);
	return k;
}

static void seg_path(const char *dir, uint64_t seq, char *buf, size_t len)
{
	snprintf(buf, len, "%s/w0/seg-%016llx.log", dir, (unsigned long long)seq);
}

static bool seg_exists(const char *dir, uint64_t seq)
{
	char path[600];
	seg_path(dir, seq, path, sizeof(path));
	return access(path, F_OK) == 0;
}

/* The message ids of segment seq, in order; how many. */
static unsigned seg_ids(const char *dir, uint64_t seq, uint64_t *ids, unsigned max)
{
	char path[600];
	seg_path(dir, seq, path, sizeof(path));
	FILE *f = fopen(path, "rb");
	if (!f)
		return 0;
	static uint8_t buf[1 << 20];
	size_t len = fread(buf, 1, sizeof(buf), f);
	fclose(f);
	struct segment_header h;
	if (segment_header_decode(buf, len, &h) < 0)
		return 0;
	struct record_reader rr;
	record_reader_init_segment(&rr, &h, SEGMENT_HEADER_SIZE);
	struct record rec;
	unsigned n = 0;
	while (record_next(&rr, buf, len, &rec) == 1)
		if (rec.type == RECORD_MESSAGE && n < max)
			ids[n++] = rec.queue_id;
	return n;
}

static int mark(struct ctx *c, unsigned i, enum spool_state st)
{
	struct spool_entry *e = spool_entry_find(c->sw, c->ids[i]);
	CHECK(c, e != NULL);
	if (!e)
		return -ENOENT;
	return spool_entry_mark(c->sw, e, &(struct state_rec){.state = st});
}

/* ---- 1: commit, hooks.added, find, read ---- */

#define T1_N 20

static void t1_step(struct ctx *c)
{
	if (c->phase == 0) {
		for (unsigned i = 0; i < T1_N; i++)
			commit_one(c, i == 3);
		/* nothing is live before its done callback */
		CHECK(c, spool_worker_live(c->sw) == 0);
		CHECK(c, spool_entry_find(c->sw, c->ids[0]) == NULL);
		c->phase = 1;
		return;
	}
	if (c->ndone < T1_N)
		return;
	CHECK(c, c->nok == T1_N);
	CHECK(c, c->nadded == T1_N);
	CHECK(c, !c->added_before_done);
	for (unsigned i = 0; i < c->nadded; i++) {
		CHECK(c, c->added_id[i] == c->ids[i]); /* in commit order, once each */
		CHECK(c, c->added_state[i] == SPOOL_STATE_QUEUED);
		CHECK(c, c->added_attempts[i] == 0 && c->added_until[i] == 0);
		CHECK(c, c->added_ndone[i] == 0);
	}
	CHECK(c, spool_worker_live(c->sw) == T1_N);
	for (unsigned i = 0; i < T1_N; i++) {
		struct spool_entry *e = spool_entry_find(c->sw, c->ids[i]);
		CHECK(c, e != NULL);
		if (!e)
			continue;
		CHECK(c, e->id == c->ids[i] && e->state == SPOOL_STATE_QUEUED && !e->rcpt_done);
		check_read(c, e, i, i == 3);
		check_read(c, e, i, i == 3); /* again: the segment's read fd is reused */
	}
	CHECK(c, spool_entry_find(c->sw, c->ids[T1_N - 1] + 1) == NULL);
	CHECK(c, spool_entry_find(c->sw, 0) == NULL);
	stop(c);
}

static void test_commit_added_find_read(void **state)
{
	(void)state;
	struct ctx *c = calloc(1, sizeof(*c));
	make_dir(c);
	c->body_size = 3000;
	c->step = t1_step;
	run(c);
	assert_int_equal(c->nok, T1_N);
	assert_int_equal(c->stats.committed, T1_N);
	assert_int_equal(c->stats.failed, 0);
	assert_int_equal(c->queued, T1_N);
	assert_int_equal(c->held, 0);
	struct spool_stats st;
	uint64_t q, h;
	reopen_counts(c, &st, &q, &h);
	assert_int_equal(st.recovered, T1_N);
	assert_int_equal(q, T1_N);
	remove_dir(c->dir);
	free(c);
}

/* ---- 2: marks, then what a restart hands back ---- */

#define T2_N     10
#define T2_UNTIL 1893456000123ull

static void t2_run1(struct ctx *c)
{
	if (c->phase == 0) {
		for (unsigned i = 0; i < T2_N; i++)
			commit_one(c, false);
		c->phase = 1;
		return;
	}
	if (c->ndone < T2_N)
		return;
	CHECK(c, spool_worker_live(c->sw) == T2_N);
	/* 0-2 delivered, 3 bounced, 4 deleted */
	for (unsigned i = 0; i < 3; i++)
		CHECK(c, mark(c, i, SPOOL_STATE_DELIVERED) == 0);
	CHECK(c, mark(c, 3, SPOOL_STATE_BOUNCED) == 0);
	CHECK(c, spool_worker_live(c->sw) == T2_N - 4);
	CHECK(c, mark(c, 4, SPOOL_STATE_DELETED) == 0);
	CHECK(c, spool_entry_find(c->sw, c->ids[4]) == NULL);
	for (unsigned i = 0; i < 5; i++)
		CHECK(c, spool_entry_find(c->sw, c->ids[i]) == NULL);
	CHECK(c, spool_worker_live(c->sw) == T2_N - 5);
	/* 5 held */
	CHECK(c, mark(c, 5, SPOOL_STATE_HELD) == 0);
	struct spool_entry *e = spool_entry_find(c->sw, c->ids[5]);
	CHECK(c, e && e->state == SPOOL_STATE_HELD);
	CHECK(c, spool_held(c->sp) == 1 && spool_queued(c->sp) == 4);
	/* 6 deferred */
	e = spool_entry_find(c->sw, c->ids[6]);
	CHECK(c, e != NULL);
	if (e) {
		CHECK(c, spool_entry_mark(c->sw, e,
					  &(struct state_rec){.state = SPOOL_STATE_DEFERRED,
							      .attempts = 3,
							      .until_ms = T2_UNTIL}) == 0);
		CHECK(c, e->state == SPOOL_STATE_DEFERRED && e->attempts == 3 &&
			     e->until_ms == T2_UNTIL);
	}
	/* 7: recipient 1 done; the message's state does not change */
	e = spool_entry_find(c->sw, c->ids[7]);
	CHECK(c, e != NULL);
	if (e) {
		CHECK(c, spool_entry_mark(c->sw, e,
					  &(struct state_rec){.state = SPOOL_STATE_RCPT_DONE,
							      .rcpt = 1}) == 0);
		CHECK(c, e->state == SPOOL_STATE_QUEUED);
	}
	CHECK(c, spool_worker_live(c->sw) == T2_N - 5);
	CHECK(c, spool_held(c->sp) == 1 && spool_queued(c->sp) == 4);
	c->phase = 2;
	c->u[0] = 0;
}

/* Waits a few turns (the state records go out with the next batches), then stops. */
static void t2_run1_step(struct ctx *c)
{
	if (c->phase < 2) {
		t2_run1(c);
		return;
	}
	if (++c->u[0] == 20)
		stop(c);
}

static void t2_run2_step(struct ctx *c)
{
	/* the announced entries: 5 held, 6 deferred, 7 with rcpt 1 done, 8, 9; oldest first */
	CHECK(c, c->nadded == 5);
	for (unsigned k = 0; k < c->nadded; k++)
		CHECK(c, c->added_id[k] == c->ids[5 + k]);
	if (c->nadded == 5) {
		CHECK(c, c->added_state[0] == SPOOL_STATE_HELD);
		CHECK(c, c->added_state[1] == SPOOL_STATE_DEFERRED);
		CHECK(c, c->added_attempts[1] == 3 && c->added_until[1] == T2_UNTIL);
		CHECK(c, c->added_state[2] == SPOOL_STATE_QUEUED);
		CHECK(c, c->added_ndone[2] == 1 && c->added_done[2][0] == 1);
		CHECK(c, c->added_state[3] == SPOOL_STATE_QUEUED && c->added_ndone[3] == 0);
		CHECK(c, c->added_state[4] == SPOOL_STATE_QUEUED && c->added_ndone[4] == 0);
		CHECK(c, c->added_ndone[0] == 0 && c->added_ndone[1] == 0);
		CHECK(c, c->added_attempts[0] == 0 && c->added_until[0] == 0);
	}
	CHECK(c, spool_worker_live(c->sw) == 5);
	for (unsigned i = 0; i < T2_N; i++) {
		struct spool_entry *e = spool_entry_find(c->sw, c->ids[i]);
		CHECK(c, (e != NULL) == (i >= 5));
		if (e)
			check_read(c, e, i, false); /* recovered offsets and lengths */
	}
	/* more marks for the next restart: 5 released, 6 delivered, 7 recipient 0 done */
	CHECK(c, mark(c, 5, SPOOL_STATE_RELEASED) == 0);
	struct spool_entry *e = spool_entry_find(c->sw, c->ids[5]);
	CHECK(c, e && e->state == SPOOL_STATE_QUEUED);
	CHECK(c, spool_held(c->sp) == 0);
	CHECK(c, mark(c, 6, SPOOL_STATE_DELIVERED) == 0);
	e = spool_entry_find(c->sw, c->ids[7]);
	CHECK(c, e != NULL);
	if (e)
		CHECK(c, spool_entry_mark(c->sw, e,
					  &(struct state_rec){.state = SPOOL_STATE_RCPT_DONE,
							      .rcpt = 0}) == 0);
	/* a deferred message held keeps nothing of its deferral once released */
	e = spool_entry_find(c->sw, c->ids[8]);
	CHECK(c, e != NULL);
	if (e) {
		CHECK(c, spool_entry_mark(c->sw, e,
					  &(struct state_rec){.state = SPOOL_STATE_DEFERRED,
							      .attempts = 1,
							      .until_ms = 5}) == 0);
		CHECK(c, mark(c, 8, SPOOL_STATE_HELD) == 0);
		CHECK(c, spool_held(c->sp) == 1);
	}
	stop(c);
}

static void t2_after_open2(struct ctx *c)
{
	struct spool_stats st;
	spool_stats(c->sp, &st);
	c->u[1] = st.recovered;
	c->u[2] = st.recovered_held;
	c->u[3] = spool_queued(c->sp);
	c->u[4] = spool_held(c->sp);
}

static void t2_run3_step(struct ctx *c)
{
	/* 5 queued (released), 7 with both recipients done, 8 held, 9 */
	CHECK(c, c->nadded == 4);
	static const unsigned want[4] = {5, 7, 8, 9};
	for (unsigned k = 0; k < c->nadded && k < 4; k++)
		CHECK(c, c->added_id[k] == c->ids[want[k]]);
	if (c->nadded == 4) {
		CHECK(c, c->added_state[0] == SPOOL_STATE_QUEUED && c->added_ndone[0] == 0);
		CHECK(c, c->added_state[1] == SPOOL_STATE_QUEUED);
		CHECK(c, c->added_ndone[1] == 2 && c->added_done[1][0] == 0 &&
			     c->added_done[1][1] == 1);
		CHECK(c, c->added_state[2] == SPOOL_STATE_HELD);
		CHECK(c, c->added_state[3] == SPOOL_STATE_QUEUED);
	}
	stop(c);
}

static void test_marks_and_recovery(void **state)
{
	(void)state;
	struct ctx *c = calloc(1, sizeof(*c));
	make_dir(c);
	c->step = t2_run1_step;
	run(c);
	assert_int_equal(c->nok, T2_N);
	assert_int_equal(c->stats.committed, T2_N);
	assert_int_equal(c->stats.failed, 0);
	assert_int_equal(c->stats.failed_states, 0);
	assert_int_equal(c->queued, 4);
	assert_int_equal(c->held, 1);

	/* a restart: recovery, then the hooks and the announcement */
	c->announce = true;
	c->after_open = t2_after_open2;
	c->step = t2_run2_step;
	run(c);
	assert_int_equal(c->u[1], 4); /* recovered: 6 (deferred), 7, 8, 9 */
	assert_int_equal(c->u[2], 1); /* held: 5 */
	assert_int_equal(c->u[3], 4);
	assert_int_equal(c->u[4], 1);
	assert_int_equal(c->stats.recovered, 4);
	assert_int_equal(c->stats.recovered_held, 1);
	assert_int_equal(c->stats.recovered_bad, 0);
	assert_int_equal(c->stats.committed, 0);
	assert_int_equal(c->queued, 3); /* 5, 7, 9 */
	assert_int_equal(c->held, 1);   /* 8 */

	c->step = t2_run3_step;
	run(c);
	assert_int_equal(c->stats.recovered, 3);
	assert_int_equal(c->stats.recovered_held, 1);

	/* without an announcement nothing is passed on, but the entries are there */
	struct spool_stats st;
	uint64_t q, h;
	reopen_counts(c, &st, &q, &h);
	assert_int_equal(q, 3);
	assert_int_equal(h, 1);
	remove_dir(c->dir);
	free(c);
}

/* ---- 3: marks made while shutting down survive a clean stop ---- */

#define T3_N 8

static void t3_marks(struct ctx *c, unsigned base)
{
	CHECK(c, mark(c, base + 0, SPOOL_STATE_DELIVERED) == 0);
	CHECK(c, mark(c, base + 1, SPOOL_STATE_HELD) == 0);
	struct spool_entry *e = spool_entry_find(c->sw, c->ids[base + 2]);
	CHECK(c, e != NULL);
	if (e)
		CHECK(c, spool_entry_mark(c->sw, e,
					  &(struct state_rec){.state = SPOOL_STATE_DEFERRED,
							      .attempts = 7,
							      .until_ms = 42}) == 0);
	e = spool_entry_find(c->sw, c->ids[base + 3]);
	CHECK(c, e != NULL);
	if (e)
		CHECK(c, spool_entry_mark(c->sw, e,
					  &(struct state_rec){.state = SPOOL_STATE_RCPT_DONE,
							      .rcpt = 0}) == 0);
}

/* Marks 0-3 in a timer and stops the engine in the same turn. */
static void t3_run1_step(struct ctx *c)
{
	if (c->phase == 0) {
		for (unsigned i = 0; i < T3_N; i++)
			commit_one(c, false);
		c->phase = 1;
		return;
	}
	if (c->ndone < T3_N)
		return;
	t3_marks(c, 0);
	stop(c);
}

/* Marks 4-7 from the fini hook, after the loop ended: spool_worker_fini writes them. */
static void t3_run2_step(struct ctx *c)
{
	stop(c);
}

static void t3_run2_fini(struct ctx *c)
{
	/* a message sealed during shutdown is never written: its done says so */
	unsigned i = commit_one(c, false);
	c->u[0] = i;
	t3_marks(c, 4);
	CHECK(c, spool_worker_live(c->sw) == T3_N - 2);
}

static void t3_run3_step(struct ctx *c)
{
	/* 1 held, 2 deferred (7, 42), 3 with recipient 0 done, 4..7 the same, the rest queued */
	static const unsigned want[6] = {1, 2, 3, 5, 6, 7};
	CHECK(c, c->nadded == 6);
	for (unsigned k = 0; k < c->nadded && k < 6; k++) {
		CHECK(c, c->added_id[k] == c->ids[want[k]]);
		unsigned r = want[k] % 4;
		CHECK(c, c->added_state[k] == (r == 1   ? SPOOL_STATE_HELD
					       : r == 2 ? SPOOL_STATE_DEFERRED
							: SPOOL_STATE_QUEUED));
		CHECK(c, c->added_attempts[k] == (r == 2 ? 7 : 0));
		CHECK(c, c->added_until[k] == (r == 2 ? 42 : 0));
		CHECK(c, c->added_ndone[k] == (r == 3 ? 1u : 0u));
		if (r == 3 && c->added_ndone[k] == 1)
			CHECK(c, c->added_done[k][0] == 0);
	}
	stop(c);
}

static void test_marks_at_shutdown(void **state)
{
	(void)state;
	struct ctx *c = calloc(1, sizeof(*c));
	make_dir(c);
	c->step = t3_run1_step;
	run(c);
	assert_int_equal(c->nok, T3_N);
	struct spool_stats st;
	uint64_t q, h;
	reopen_counts(c, &st, &q, &h);
	assert_int_equal(st.recovered, T3_N - 2); /* 0 delivered, 1 held */
	assert_int_equal(st.recovered_held, 1);

	/* run 2: marks 4-7 from the fini hook */
	c->step = t3_run2_step;
	c->fini = t3_run2_fini;
	run(c);
	assert_true(c->done_seen[c->u[0]]);
	assert_int_equal(c->done_res[c->u[0]], -ESHUTDOWN);
	assert_int_equal(c->stats.committed, 0);
	assert_int_equal(c->queued, T3_N - 4); /* 2, 3, 6, 7 */
	assert_int_equal(c->held, 2);          /* 1, 5 */

	c->announce = true;
	c->step = t3_run3_step;
	run(c);
	assert_int_equal(c->stats.recovered, T3_N - 4);
	assert_int_equal(c->stats.recovered_held, 2);
	remove_dir(c->dir);
	free(c);
}

/* ---- 4: segments removed while the engine runs ---- */

#define T4_N 24

struct t4 {
	uint64_t seqs[16];
	unsigned nseg;
	uint64_t ids[16][MAXM];
	unsigned nids[16];
};

static struct t4 t4;

static void t4_map(struct ctx *c)
{
	t4.nseg = seg_list(c->dir, t4.seqs, 16);
	for (unsigned s = 0; s < t4.nseg; s++)
		t4.nids[s] = seg_ids(c->dir, t4.seqs[s], t4.ids[s], MAXM);
}

static void t4_mark_seg(struct ctx *c, unsigned s, unsigned from)
{
	for (unsigned k = from; k < t4.nids[s]; k++) {
		unsigned i = idx_of(c, t4.ids[s][k]);
		CHECK(c, i != UINT32_MAX);
		if (i != UINT32_MAX)
			CHECK(c, mark(c, i, SPOOL_STATE_DELIVERED) == 0);
	}
}

static void t4_step(struct ctx *c)
{
	switch (c->phase) {
	case 0: /* one message per turn: each batch alone, the segments rotate */
		if (c->nmsg == c->ndone && c->nmsg < T4_N)
			commit_one(c, false);
		if (c->ndone == T4_N)
			c->phase = 1;
		return;
	case 1: {
		t4_map(c);
		CHECK(c, t4.nseg >= 5);
		if (t4.nseg < 5) {
			stop(c);
			return;
		}
		unsigned total = 0;
		for (unsigned s = 0; s < t4.nseg; s++) {
			CHECK(c, t4.nids[s] >= 1);
			total += t4.nids[s];
		}
		CHECK(c, total == T4_N);
		unsigned last = t4.nseg - 1;
		/* segments 1 and 2 all final, the first message of segment 0 still live */
		t4_mark_seg(c, 1, 0);
		t4_mark_seg(c, 2, 0);
		t4_mark_seg(c, 0, 1);
		for (unsigned s = 0; s <= last; s++)
			CHECK(c, seg_exists(c->dir, t4.seqs[s])); /* ordered: segment 0 is live */
		/* the last live message of segment 0: 0, 1 and 2 go at once */
		unsigned x = idx_of(c, t4.ids[0][0]);
		CHECK(c, mark(c, x, SPOOL_STATE_BOUNCED) == 0);
		CHECK(c, !seg_exists(c->dir, t4.seqs[0]));
		CHECK(c, !seg_exists(c->dir, t4.seqs[1]));
		CHECK(c, !seg_exists(c->dir, t4.seqs[2]));
		for (unsigned s = 3; s <= last; s++)
			CHECK(c, seg_exists(c->dir, t4.seqs[s]));
		/* the current segment all final: it stays while it is written to */
		t4_mark_seg(c, last, 0);
		CHECK(c, seg_exists(c->dir, t4.seqs[last]));
		/* another message: the next batch starts a new segment */
		c->u[0] = c->ndone + 1;
		commit_one(c, false);
		c->phase = 2;
		return;
	}
	case 2: {
		if (c->ndone < c->u[0])
			return;
		unsigned last = t4.nseg - 1;
		uint64_t now[16];
		unsigned n = seg_list(c->dir, now, 16);
		CHECK(c, n == t4.nseg - 3 + 1);
		CHECK(c, now[n - 1] > t4.seqs[last]);
		/* the old current one is final but waits for the older ones (3 ..) */
		CHECK(c, seg_exists(c->dir, t4.seqs[last]));
		for (unsigned s = 3; s < last; s++)
			t4_mark_seg(c, s, 0);
		n = seg_list(c->dir, now, 16);
		CHECK(c, n == 1); /* only the current one */
		CHECK(c, spool_worker_live(c->sw) == 1);
		c->u[1] = now[0];
		CHECK(c, mark(c, c->nmsg - 1, SPOOL_STATE_DELIVERED) == 0);
		CHECK(c, seg_exists(c->dir, c->u[1])); /* current */
		CHECK(c, spool_worker_live(c->sw) == 0);
		stop(c);
		return;
	}
	}
}

static void test_runtime_segment_removal(void **state)
{
	(void)state;
	struct ctx *c = calloc(1, sizeof(*c));
	make_dir(c);
	c->segment_size = 4096;
	c->body_size = 1000;
	c->step = t4_step;
	run(c);
	assert_int_equal(c->nok, T4_N + 1);
	assert_int_equal(c->queued, 0);
	struct spool_stats st;
	uint64_t q, h;
	reopen_counts(c, &st, &q, &h);
	assert_int_equal(st.recovered, 0);
	assert_int_equal(st.recovered_held, 0);
	assert_int_equal(st.recovered_bad, 0);
	assert_int_equal(q, 0);
	uint64_t seqs[16];
	assert_int_equal(seg_list(c->dir, seqs, 16), 0);
	remove_dir(c->dir);
	free(c);
}

/*
 * A segment recovery removed (all its messages final) while a later one that
 * names its messages in state records stays (it has live messages): the later
 * one must not be pinned for the rest of the run, or no segment after it is
 * ever removed until the next restart.
 */
static void t4b_run1_step(struct ctx *c)
{
	switch (c->phase) {
	case 0:
		if (c->nmsg == c->ndone && c->nmsg < 12)
			commit_one(c, false);
		if (c->ndone == 12)
			c->phase = 1;
		return;
	case 1:
		t4_map(c);
		CHECK(c, t4.nseg >= 3);
		/* segment 0 keeps its first message, segment 1 all final, the rest live */
		t4_mark_seg(c, 0, 1);
		t4_mark_seg(c, 1, 0);
		CHECK(c, seg_exists(c->dir, t4.seqs[1])); /* behind segment 0 */
		c->phase = 2;
		c->u[0] = 0;
		return;
	default:
		if (++c->u[0] == 10)
			stop(c);
	}
}

static void t4b_run2_step(struct ctx *c)
{
	/* recovery removed segment 1; segments 0 and 2 .. stay */
	CHECK(c, !seg_exists(c->dir, t4.seqs[1]));
	CHECK(c, seg_exists(c->dir, t4.seqs[0]));
	for (unsigned s = 2; s < t4.nseg; s++)
		CHECK(c, seg_exists(c->dir, t4.seqs[s]));
	uint64_t now[16];
	unsigned n0 = seg_list(c->dir, now, 16);
	/* everything final: every segment but the current one goes */
	CHECK(c, mark(c, idx_of(c, t4.ids[0][0]), SPOOL_STATE_DELIVERED) == 0);
	for (unsigned s = 2; s < t4.nseg; s++)
		t4_mark_seg(c, s, 0);
	CHECK(c, spool_worker_live(c->sw) == 0);
	unsigned n = seg_list(c->dir, now, 16);
	CHECK(c, n == 1);
	if (n != 1)
		fprintf(stderr, "%u segments left of %u\n", n, n0);
	stop(c);
}

static void test_recovery_removed_segment_does_not_pin(void **state)
{
	(void)state;
	struct ctx *c = calloc(1, sizeof(*c));
	make_dir(c);
	c->segment_size = 4096;
	c->body_size = 1000;
	c->step = t4b_run1_step;
	run(c);
	c->announce = true;
	c->step = t4b_run2_step;
	run(c);
	struct spool_stats st;
	uint64_t q, h;
	reopen_counts(c, &st, &q, &h);
	assert_int_equal(q, 0);
	uint64_t seqs[16];
	assert_int_equal(seg_list(c->dir, seqs, 16), 0);
	remove_dir(c->dir);
	free(c);
}

/* ---- 5: a damaged record reads as -EBADMSG ---- */

static int seg_fd(const struct ctx *c, const struct spool_entry *e, int flags)
{
	(void)e;
	uint64_t seqs[4];
	unsigned n = seg_list(c->dir, seqs, 4);
	if (n != 1)
		return -1;
	char path[600];
	seg_path(c->dir, seqs[0], path, sizeof(path));
	return open(path, flags);
}

static void flip(int fd, uint64_t off)
{
	uint8_t b;
	if (pread(fd, &b, 1, (off_t)off) == 1) {
		b ^= 0x20;
		if (pwrite(fd, &b, 1, (off_t)off) != 1)
			abort();
	}
}

static void t5_step(struct ctx *c)
{
	if (c->phase == 0) {
		for (unsigned i = 0; i < 4; i++)
			commit_one(c, false);
		c->phase = 1;
		return;
	}
	if (c->ndone < 4)
		return;
	struct spool_entry *e[4];
	for (unsigned i = 0; i < 4; i++) {
		e[i] = spool_entry_find(c->sw, c->ids[i]);
		CHECK(c, e[i] != NULL);
		if (!e[i]) {
			stop(c);
			return;
		}
		check_read(c, e[i], i, false);
	}
	int fd = seg_fd(c, e[0], O_RDWR);
	CHECK(c, fd >= 0);
	/* 1: a body octet; 2: the header's queue id */
	flip(fd, e[1]->off + RECORD_HEADER_SIZE + e[1]->len - 3);
	flip(fd, e[2]->off + 16);
	close(fd);
	uint8_t *buf = (uint8_t *)1;
	size_t len = 7;
	CHECK(c, spool_entry_read(c->sw, e[1], &buf, &len) == -EBADMSG);
	CHECK(c, spool_entry_read(c->sw, e[2], &buf, &len) == -EBADMSG);
	CHECK(c, buf == (uint8_t *)1 && len == 7); /* untouched on failure */
	check_read(c, e[0], 0, false);
	check_read(c, e[3], 3, false);
	stop(c);
}

/* Damage after recovery read the spool: the entry's read finds it. */
static void t5_after_open(struct ctx *c)
{
	uint64_t seqs[4];
	unsigned n = seg_list(c->dir, seqs, 4);
	assert_int_equal(n, 1);
	char path[600];
	seg_path(c->dir, seqs[0], path, sizeof(path));
	struct stat st;
	assert_int_equal(stat(path, &st), 0);
	int fd = open(path, O_RDWR);
	assert_true(fd >= 0);
	/* the last record is message 3: flip an octet 10 from the end of its payload */
	flip(fd, (uint64_t)st.st_size - 16);
	close(fd);
}

static void t5_run2_step(struct ctx *c)
{
	/* 0 and 3 (1 and 2 were skipped by recovery as damaged) */
	CHECK(c, spool_worker_live(c->sw) == 2);
	struct spool_entry *e0 = spool_entry_find(c->sw, c->ids[0]);
	struct spool_entry *e3 = spool_entry_find(c->sw, c->ids[3]);
	CHECK(c, e0 && e3);
	if (e0 && e3) {
		check_read(c, e0, 0, false);
		uint8_t *buf;
		size_t len;
		CHECK(c, spool_entry_read(c->sw, e3, &buf, &len) == -EBADMSG);
	}
	stop(c);
}

static void test_read_damaged(void **state)
{
	(void)state;
	struct ctx *c = calloc(1, sizeof(*c));
	make_dir(c);
	c->body_size = 500;
	c->step = t5_step;
	run(c);
	c->after_open = t5_after_open;
	c->step = t5_run2_step;
	run(c);
	assert_int_equal(c->stats.recovered, 2);
	assert_true(c->stats.recovered_bad >= 1);
	remove_dir(c->dir);
	free(c);
}

/* ---- a state record lost to a failed write ---- */

static void t7_step(struct ctx *c)
{
	struct spool_stats st;
	switch (c->phase) {
	case 0:
		for (unsigned i = 0; i < 3; i++)
			commit_one(c, false);
		c->phase = 1;
		return;
	case 1: {
		if (c->ndone < 3)
			return;
		/* the segment cannot grow: the state record's write fails (EFBIG) */
		uint64_t seqs[4];
		CHECK(c, seg_list(c->dir, seqs, 4) == 1);
		char path[600];
		seg_path(c->dir, seqs[0], path, sizeof(path));
		struct stat sb;
		CHECK(c, stat(path, &sb) == 0);
		signal(SIGXFSZ, SIG_IGN);
		/*
		 * With direct I/O the file ends on a 4 KiB boundary (zeros after
		 * the last record) and a write rewrites the last block: a limit
		 * one octet lower makes it fail as an append fails through the
		 * page cache.
		 */
		rlim_t lim = (rlim_t)sb.st_size - (sb.st_size % 4096 == 0 && !buffered_io);
		struct rlimit rl = {lim, RLIM_INFINITY};
		CHECK(c, setrlimit(RLIMIT_FSIZE, &rl) == 0);
		CHECK(c, mark(c, 1, SPOOL_STATE_DELIVERED) == 0);
		CHECK(c, spool_worker_live(c->sw) == 2);
		c->phase = 2;
		return;
	}
	default:
		spool_stats(c->sp, &st); /* this worker's own counters */
		if (st.failed_states == 0 && ++c->u[0] < 2000)
			return;
		CHECK(c, st.failed_states == 1);
		struct rlimit rl = {RLIM_INFINITY, RLIM_INFINITY};
		setrlimit(RLIMIT_FSIZE, &rl);
		stop(c);
	}
}

static void test_failed_state_write(void **state)
{
	(void)state;
	struct ctx *c = calloc(1, sizeof(*c));
	make_dir(c);
	c->step = t7_step;
	run(c);
	struct rlimit rl = {RLIM_INFINITY, RLIM_INFINITY};
	setrlimit(RLIMIT_FSIZE, &rl);
	assert_int_equal(c->stats.failed_states, 1);
	assert_int_equal(c->stats.failed, 0); /* no message failed */
	/* at-least-once: the message comes back after a restart */
	struct spool_stats st;
	uint64_t q, h;
	reopen_counts(c, &st, &q, &h);
	assert_int_equal(st.recovered, 3);
	assert_int_equal(st.recovered_bad, 0); /* the failed write was truncated away */
	remove_dir(c->dir);
	free(c);
}

/* ---- 8: compaction ---- */

#define TC_N      40
#define TC_UNTIL  1893456000777ull
#define TC_WAIT   3500 /* ms: the check runs every second */

static uint64_t mono_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* One message per turn (each batch alone) so that they spread over segments; true when done. */
static bool tc_commit(struct ctx *c, unsigned n)
{
	if (c->nmsg == c->ndone && c->nmsg < n)
		commit_one(c, false);
	return c->ndone == n;
}

/* Every live message but keep[] delivered. */
static void tc_final_except(struct ctx *c, const unsigned *keep, unsigned nkeep)
{
	for (unsigned i = 0; i < c->nmsg; i++) {
		bool k = false;
		for (unsigned j = 0; j < nkeep; j++)
			k |= keep[j] == i;
		if (!k && spool_entry_find(c->sw, c->ids[i]))
			CHECK(c, mark(c, i, SPOOL_STATE_DELIVERED) == 0);
	}
}

static uint64_t tc_compacted(struct ctx *c)
{
	struct spool_stats st;
	spool_stats(c->sp, &st); /* this worker's own counters */
	return st.compacted;
}

/* How many message records with this id the segments in w0/ hold now. */
static unsigned tc_copies(const struct ctx *c, uint64_t id)
{
	uint64_t seqs[32];
	unsigned n = seg_list(c->dir, seqs, 32), k = 0;
	for (unsigned s = 0; s < n; s++) {
		uint64_t ids[MAXM * 2];
		unsigned m = seg_ids(c->dir, seqs[s], ids, MAXM * 2);
		for (unsigned j = 0; j < m; j++)
			k += ids[j] == id;
	}
	return k;
}

/* The first segment's messages: keeps h held and d deferred (2, TC_UNTIL) with rcpt 1 done. */
static void tc_hold_defer(struct ctx *c, unsigned h, unsigned d)
{
	CHECK(c, mark(c, h, SPOOL_STATE_HELD) == 0);
	struct spool_entry *e = spool_entry_find(c->sw, c->ids[d]);
	CHECK(c, e != NULL);
	if (!e)
		return;
	CHECK(c, spool_entry_mark(c->sw, e,
				  &(struct state_rec){.state = SPOOL_STATE_DEFERRED,
						      .attempts = 2,
						      .until_ms = TC_UNTIL}) == 0);
	CHECK(c, spool_entry_mark(c->sw, e,
				  &(struct state_rec){.state = SPOOL_STATE_RCPT_DONE, .rcpt = 1}) ==
		     0);
}

static void tc_check_held(struct ctx *c, unsigned h)
{
	struct spool_entry *e = spool_entry_find(c->sw, c->ids[h]);
	CHECK(c, e != NULL);
	if (!e)
		return;
	CHECK(c, e->state == SPOOL_STATE_HELD && e->attempts == 0 && e->until_ms == 0);
	CHECK(c, e->nrcpt_done == 0);
	check_read(c, e, h, false);
}

static void tc_check_deferred(struct ctx *c, unsigned d)
{
	struct spool_entry *e = spool_entry_find(c->sw, c->ids[d]);
	CHECK(c, e != NULL);
	if (!e)
		return;
	CHECK(c, e->state == SPOOL_STATE_DEFERRED && e->attempts == 2 && e->until_ms == TC_UNTIL);
	CHECK(c, e->nrcpt_done == 1 && e->rcpt_done && e->rcpt_done[0] == 1);
	check_read(c, e, d, false);
}

/* hooks.added of a restart: exactly h (held) and d (deferred, rcpt 1 done), in that order. */
static void tc_check_announced(struct ctx *c, unsigned h, unsigned d)
{
	CHECK(c, c->nadded == 2);
	if (c->nadded != 2)
		return;
	CHECK(c, c->added_id[0] == c->ids[h] && c->added_id[1] == c->ids[d]);
	CHECK(c, c->added_state[0] == SPOOL_STATE_HELD && c->added_ndone[0] == 0);
	CHECK(c, c->added_attempts[0] == 0 && c->added_until[0] == 0);
	CHECK(c, c->added_state[1] == SPOOL_STATE_DEFERRED);
	CHECK(c, c->added_attempts[1] == 2 && c->added_until[1] == TC_UNTIL);
	CHECK(c, c->added_ndone[1] == 1 && c->added_done[1][0] == 1);
}

/*
 * The oldest segment keeps a held and a deferred message, everything else is
 * final: both are copied forward with their state, the segments go while the
 * engine runs, and a restart finds them as they were.
 */
static void t8_run1_step(struct ctx *c)
{
	switch (c->phase) {
	case 0: {
		/* 0 held, 1 deferred while the first segment is written: their states are in it */
		if (c->ndone == 2 && !c->u[9]) {
			tc_hold_defer(c, 0, 1);
			c->u[9] = 1;
		}
		if (!tc_commit(c, TC_N))
			return;
		t4_map(c);
		CHECK(c, t4.nseg >= 3 && t4.nids[0] >= 3);
		if (t4.nseg < 3 || t4.nids[0] < 3) {
			stop(c);
			return;
		}
		unsigned keep[2] = {0, 1};
		CHECK(c, t4.ids[0][0] == c->ids[0] && t4.ids[0][1] == c->ids[1]);
		c->u[0] = keep[0];
		c->u[1] = keep[1];
		tc_final_except(c, keep, 2);
		CHECK(c, spool_worker_live(c->sw) == 2);
		/* the oldest segment is live: nothing after it goes */
		for (unsigned s = 0; s < t4.nseg; s++)
			CHECK(c, seg_exists(c->dir, t4.seqs[s]));
		CHECK(c, tc_copies(c, c->ids[keep[0]]) == 1 && tc_copies(c, c->ids[keep[1]]) == 1);
		c->u[2] = mono_ms();
		c->phase = 1;
		return;
	}
	case 1: {
		unsigned h = (unsigned)c->u[0], d = (unsigned)c->u[1];
		if ((tc_compacted(c) < 2 || seg_exists(c->dir, t4.seqs[0])) &&
		    mono_ms() - c->u[2] < TC_WAIT)
			return;
		CHECK(c, tc_compacted(c) == 2);
		/* the old segments are gone while the engine runs; the copies are elsewhere */
		for (unsigned s = 0; s + 1 < t4.nseg; s++)
			CHECK(c, !seg_exists(c->dir, t4.seqs[s]));
		CHECK(c, tc_copies(c, c->ids[h]) == 1 && tc_copies(c, c->ids[d]) == 1);
		CHECK(c, spool_worker_live(c->sw) == 2);
		CHECK(c, spool_held(c->sp) == 1 && spool_queued(c->sp) == 1);
		tc_check_held(c, h);
		tc_check_deferred(c, d);
		stop(c);
		return;
	}
	}
}

static void t8_run2_step(struct ctx *c)
{
	unsigned h = (unsigned)c->u[0], d = (unsigned)c->u[1];
	tc_check_announced(c, h, d);
	CHECK(c, spool_worker_live(c->sw) == 2);
	tc_check_held(c, h);
	tc_check_deferred(c, d);
	for (unsigned s = 0; s + 1 < t4.nseg; s++)
		CHECK(c, !seg_exists(c->dir, t4.seqs[s]));
	stop(c);
}

static void test_compaction(void **state)
{
	(void)state;
	struct ctx *c = calloc(1, sizeof(*c));
	make_dir(c);
	c->segment_size = 4096;
	c->body_size = 100;
	c->compact_after_ms = 50;
	c->step = t8_run1_step;
	run(c);
	assert_int_equal(c->nok, TC_N);
	assert_int_equal(c->stats.compacted, 2);
	assert_int_equal(c->stats.failed, 0);
	assert_int_equal(c->stats.failed_states, 0);
	assert_int_equal(c->queued, 1);
	assert_int_equal(c->held, 1);

	c->announce = true;
	c->step = t8_run2_step;
	run(c);
	assert_int_equal(c->stats.recovered, 1);
	assert_int_equal(c->stats.recovered_held, 1);
	assert_int_equal(c->stats.recovered_bad, 0);
	assert_int_equal(c->stats.compacted, 0);
	remove_dir(c->dir);
	free(c);
}

/*
 * A crash after the copies were durable but before the old segment was
 * removed: the same message records (and their states) in a newer segment.
 * Recovery takes each id once, from the newer segment; the old segment goes
 * while the engine runs, and the next start finds the same from the copies.
 */
#define T11_N 8

static void t11_run1_step(struct ctx *c)
{
	switch (c->phase) {
	case 0: {
		for (unsigned i = 0; i < T11_N; i++)
			commit_one(c, false);
		c->phase = 1;
		return;
	}
	case 1: {
		if (c->ndone < T11_N)
			return;
		/* 0 held, 1 deferred (rcpt 1 done), 2 queued, the rest final */
		tc_hold_defer(c, 0, 1);
		unsigned keep[3] = {0, 1, 2};
		tc_final_except(c, keep, 3);
		stop(c);
		return;
	}
	}
}

/* A state record for the segment of sequence seq at out; its size. */
static size_t tc_put_state(uint8_t *out, uint64_t seq, uint64_t id, const struct state_rec *r)
{
	uint8_t p[STATE_PAYLOAD_SIZE];
	state_payload_encode_rec(p, r);
	struct iovec iv = {p, sizeof(p)};
	size_t pad = record_header_encode(out, RECORD_STATE, 0, id, &iv, 1);
	record_header_bind(out, seq);
	memcpy(out + RECORD_HEADER_SIZE, p, sizeof(p));
	memset(out + RECORD_HEADER_SIZE + sizeof(p), 0, pad);
	return RECORD_HEADER_SIZE + sizeof(p) + pad;
}

static uint8_t *tc_load(const char *path, size_t *len)
{
	struct stat st;
	assert_int_equal(stat(path, &st), 0);
	uint8_t *buf = malloc((size_t)st.st_size);
	assert_non_null(buf);
	FILE *f = fopen(path, "rb");
	assert_non_null(f);
	assert_int_equal(fread(buf, 1, (size_t)st.st_size, f), (size_t)st.st_size);
	fclose(f);
	*len = (size_t)st.st_size;
	return buf;
}

/* Finds message id's record in a loaded segment. */
static bool tc_find_rec(const uint8_t *buf, size_t len, uint64_t id, struct record *rec)
{
	struct segment_header h;
	if (segment_header_decode(buf, len, &h) < 0)
		return false;
	struct record_reader rr;
	record_reader_init_segment(&rr, &h, SEGMENT_HEADER_SIZE);
	while (record_next(&rr, buf, len, rec) == 1)
		if (rec->type == RECORD_MESSAGE && rec->queue_id == id)
			return true;
	return false;
}

/* What compaction would have written for 0, 1 and 2, as a newer segment. */
static void t11_forge(struct ctx *c)
{
	t4_map(c);
	assert_int_equal(t4.nseg, 1);
	assert_int_equal(t4.nids[0], T11_N);
	char path[600];
	seg_path(c->dir, t4.seqs[0], path, sizeof(path));
	size_t len;
	uint8_t *buf = tc_load(path, &len);
	uint8_t *out = calloc(1, len + 4096);
	assert_non_null(out);
	uint64_t seq = t4.seqs[0] + 1;
	segment_header_encode(out, 0, seq, (uint64_t)time(NULL));
	size_t olen = SEGMENT_HEADER_SIZE;
	for (unsigned i = 0; i < 3; i++) {
		struct record rec;
		assert_true(tc_find_rec(buf, len, c->ids[i], &rec));
		size_t sz = record_encoded_size(rec.length);
		assert_true(rec.offset + sz <= len);
		memcpy(out + olen, buf + rec.offset, sz);
		/* the same record, bound to the new segment (compaction writes it anew) */
		struct iovec iv = {(void *)rec.payload, rec.length};
		record_header_encode(out + olen, RECORD_MESSAGE, rec.flags, rec.queue_id, &iv, 1);
		record_header_bind(out + olen, seq);
		olen += sz;
	}
	olen += tc_put_state(out + olen, seq, c->ids[0], &(struct state_rec){.state = SPOOL_STATE_HELD});
	olen += tc_put_state(out + olen, seq, c->ids[1],
			     &(struct state_rec){.state = SPOOL_STATE_DEFERRED,
						 .attempts = 2,
						 .until_ms = TC_UNTIL});
	olen += tc_put_state(out + olen, seq, c->ids[1],
			     &(struct state_rec){.state = SPOOL_STATE_RCPT_DONE, .rcpt = 1});
	seg_path(c->dir, seq, path, sizeof(path));
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, out, olen), (ssize_t)olen);
	close(fd);
	c->u[0] = t4.seqs[0];
	c->u[1] = seq;
	free(out);
	free(buf);
}

/* After recovery: the old copies damaged, so reading one of them would fail. */
static void t11_after_open(struct ctx *c)
{
	char path[600];
	seg_path(c->dir, c->u[0], path, sizeof(path));
	assert_true(seg_exists(c->dir, c->u[0])); /* its state records are still needed */
	size_t len;
	uint8_t *buf = tc_load(path, &len);
	int fd = open(path, O_RDWR);
	assert_true(fd >= 0);
	for (unsigned i = 0; i < 3; i++) {
		struct record rec;
		assert_true(tc_find_rec(buf, len, c->ids[i], &rec));
		flip(fd, rec.offset + RECORD_HEADER_SIZE + rec.length - 3);
	}
	close(fd);
	free(buf);
}

static void t11_check(struct ctx *c)
{
	CHECK(c, c->nadded == 3);
	if (c->nadded == 3) {
		for (unsigned k = 0; k < 3; k++)
			CHECK(c, c->added_id[k] == c->ids[k]); /* each once */
		CHECK(c, c->added_state[0] == SPOOL_STATE_HELD && c->added_ndone[0] == 0);
		CHECK(c, c->added_state[1] == SPOOL_STATE_DEFERRED &&
			     c->added_attempts[1] == 2 && c->added_until[1] == TC_UNTIL);
		CHECK(c, c->added_ndone[1] == 1 && c->added_done[1][0] == 1);
		CHECK(c, c->added_state[2] == SPOOL_STATE_QUEUED && c->added_ndone[2] == 0);
	}
	CHECK(c, spool_worker_live(c->sw) == 3);
	tc_check_held(c, 0);
	tc_check_deferred(c, 1);
	struct spool_entry *e = spool_entry_find(c->sw, c->ids[2]);
	CHECK(c, e && e->state == SPOOL_STATE_QUEUED && e->nrcpt_done == 0);
	if (e)
		check_read(c, e, 2, false);
	for (unsigned i = 3; i < T11_N; i++)
		CHECK(c, spool_entry_find(c->sw, c->ids[i]) == NULL);
}

static void t11_run2_step(struct ctx *c)
{
	t11_check(c);
	/* nothing live is left in the old segment: it goes while the engine runs */
	CHECK(c, !seg_exists(c->dir, c->u[0]));
	CHECK(c, seg_exists(c->dir, c->u[1]));
	stop(c);
}

static void t11_run3_step(struct ctx *c)
{
	t11_check(c);
	stop(c);
}

static void test_compaction_crash_before_removal(void **state)
{
	(void)state;
	struct ctx *c = calloc(1, sizeof(*c));
	make_dir(c);
	c->segment_size = 4096;
	c->body_size = 100;
	c->compact_after_ms = 3600000;
	c->step = t11_run1_step;
	run(c);
	assert_int_equal(c->nok, T11_N);
	t11_forge(c);

	c->announce = true;
	c->after_open = t11_after_open;
	c->step = t11_run2_step;
	run(c);
	assert_int_equal(c->stats.recovered, 2); /* 1 and 2, once each */
	assert_int_equal(c->stats.recovered_held, 1);
	assert_int_equal(c->stats.recovered_bad, 0);

	/* the old segment and its state records are gone: the copies carry the states */
	c->step = t11_run3_step;
	run(c);
	assert_int_equal(c->stats.recovered, 2);
	assert_int_equal(c->stats.recovered_held, 1);
	assert_int_equal(c->stats.recovered_bad, 0);
	remove_dir(c->dir);
	free(c);
}

/*
 * Not compacted: the oldest segment more than a quarter live (u[5] messages
 * kept), or closed for less than compact_after_ms.
 */
static void t9_step(struct ctx *c)
{
	switch (c->phase) {
	case 0: {
		if (!tc_commit(c, TC_N))
			return;
		t4_map(c);
		unsigned nkeep = (unsigned)c->u[5];
		CHECK(c, t4.nseg >= 3 && t4.nids[0] >= nkeep);
		if (t4.nseg < 3 || t4.nids[0] < nkeep) {
			stop(c);
			return;
		}
		unsigned keep[8];
		uint64_t bytes = 0;
		for (unsigned k = 0; k < nkeep; k++) {
			keep[k] = idx_of(c, t4.ids[0][k]);
			struct spool_entry *e = spool_entry_find(c->sw, c->ids[keep[k]]);
			CHECK(c, e != NULL);
			if (e)
				bytes += e->len;
		}
		tc_final_except(c, keep, nkeep);
		/* the case this run is about */
		CHECK(c, (bytes > c->segment_size / 4) == (c->compact_after_ms < 1000));
		c->u[2] = mono_ms();
		c->phase = 1;
		return;
	}
	case 1:
		if (mono_ms() - c->u[2] < 2300) /* two checks at least */
			return;
		CHECK(c, tc_compacted(c) == 0);
		for (unsigned s = 0; s < t4.nseg; s++)
			CHECK(c, seg_exists(c->dir, t4.seqs[s]));
		CHECK(c, spool_worker_live(c->sw) == c->u[5]);
		for (unsigned k = 0; k < c->u[5]; k++) {
			unsigned i = idx_of(c, t4.ids[0][k]);
			struct spool_entry *e = spool_entry_find(c->sw, c->ids[i]);
			CHECK(c, e != NULL);
			CHECK(c, tc_copies(c, c->ids[i]) == 1);
			if (e)
				check_read(c, e, i, false);
		}
		stop(c);
		return;
	}
}

static void t9_case(uint64_t compact_after_ms, unsigned nkeep)
{
	struct ctx *c = calloc(1, sizeof(*c));
	make_dir(c);
	c->segment_size = 4096;
	c->body_size = 100;
	c->compact_after_ms = compact_after_ms;
	c->u[5] = nkeep;
	c->step = t9_step;
	run(c);
	assert_int_equal(c->nok, TC_N);
	assert_int_equal(c->stats.compacted, 0);
	assert_int_equal(c->queued, nkeep);
	struct spool_stats st;
	uint64_t q, h;
	reopen_counts(c, &st, &q, &h);
	assert_int_equal(st.recovered, nkeep);
	assert_int_equal(q, nkeep);
	remove_dir(c->dir);
	free(c);
}

static void test_compaction_not_too_live(void **state)
{
	(void)state;
	t9_case(50, 5); /* 5 of ~240 octets: more than 1024 */
}

static void test_compaction_not_too_young(void **state)
{
	(void)state;
	t9_case(60000, 1);
}

/*
 * Messages made final while their copies are on the way: a (final before the
 * copy is written, in the same turn) and c (final while the copy's batch is in
 * flight) do not come back; b (held) is copied.
 */
static void t10_pre(struct ctx *c)
{
	if (c->phase != 1 || c->u[6] || c->stopped)
		return;
	struct spool_entry *e = spool_entry_find(c->sw, c->ids[c->u[0]]);
	if (e && e->moving) {
		CHECK(c, mark(c, (unsigned)c->u[0], SPOOL_STATE_DELIVERED) == 0);
		c->u[6] = 1;
	}
}

static void t10_post(struct ctx *c)
{
	if (c->phase != 1 || c->u[7] || c->stopped)
		return;
	struct spool_entry *e = spool_entry_find(c->sw, c->ids[c->u[2]]);
	if (e && e->moving) {
		CHECK(c, mark(c, (unsigned)c->u[2], SPOOL_STATE_BOUNCED) == 0);
		c->u[7] = 1;
	}
}

static void t10_run1_step(struct ctx *c)
{
	switch (c->phase) {
	case 0: {
		if (!tc_commit(c, TC_N))
			return;
		t4_map(c);
		CHECK(c, t4.nseg >= 3 && t4.nids[0] >= 3);
		if (t4.nseg < 3 || t4.nids[0] < 3) {
			stop(c);
			return;
		}
		unsigned keep[3];
		for (unsigned k = 0; k < 3; k++)
			keep[k] = idx_of(c, t4.ids[0][k]);
		c->u[0] = keep[0];
		c->u[1] = keep[1];
		c->u[2] = keep[2];
		CHECK(c, mark(c, keep[1], SPOOL_STATE_HELD) == 0);
		tc_final_except(c, keep, 3);
		c->u[3] = mono_ms();
		c->phase = 1;
		return;
	}
	case 1:
		if ((tc_compacted(c) < 1 || seg_exists(c->dir, t4.seqs[0])) &&
		    mono_ms() - c->u[3] < TC_WAIT)
			return;
		CHECK(c, c->u[6] == 1 && c->u[7] == 1);
		CHECK(c, tc_compacted(c) == 1); /* b only: the others' copies landed dead */
		CHECK(c, !seg_exists(c->dir, t4.seqs[0]));
		CHECK(c, spool_entry_find(c->sw, c->ids[c->u[0]]) == NULL);
		CHECK(c, spool_entry_find(c->sw, c->ids[c->u[2]]) == NULL);
		CHECK(c, spool_worker_live(c->sw) == 1);
		/* the dead copies were written (the old segment is gone) */
		CHECK(c, tc_copies(c, c->ids[c->u[0]]) == 1);
		CHECK(c, tc_copies(c, c->ids[c->u[2]]) == 1);
		tc_check_held(c, (unsigned)c->u[1]);
		stop(c);
		return;
	}
}

static void t10_run2_step(struct ctx *c)
{
	CHECK(c, c->nadded == 1);
	if (c->nadded == 1)
		CHECK(c, c->added_id[0] == c->ids[c->u[1]] &&
			     c->added_state[0] == SPOOL_STATE_HELD);
	CHECK(c, spool_worker_live(c->sw) == 1);
	CHECK(c, spool_entry_find(c->sw, c->ids[c->u[0]]) == NULL);
	CHECK(c, spool_entry_find(c->sw, c->ids[c->u[2]]) == NULL);
	tc_check_held(c, (unsigned)c->u[1]);
	stop(c);
}

static void test_compaction_final_in_flight(void **state)
{
	(void)state;
	struct ctx *c = calloc(1, sizeof(*c));
	make_dir(c);
	c->segment_size = 4096;
	c->body_size = 100;
	c->compact_after_ms = 50;
	c->step = t10_run1_step;
	c->turn_pre = t10_pre;
	c->turn_post = t10_post;
	run(c);
	assert_int_equal(c->nok, TC_N);
	assert_int_equal(c->stats.compacted, 1);
	assert_int_equal(c->held, 1);
	assert_int_equal(c->queued, 0);

	c->announce = true;
	c->step = t10_run2_step;
	run(c);
	assert_int_equal(c->stats.recovered, 0);
	assert_int_equal(c->stats.recovered_held, 1);
	assert_int_equal(c->stats.recovered_bad, 0);
	remove_dir(c->dir);
	free(c);
}

/* ---- 5b: flags (STATE_F_*) stay set across later records, restarts and compaction ---- */

#define TF_N 5
#define TF_W STATE_F_DELAY_WARNED

static int mark_rec(struct ctx *c, unsigned i, struct state_rec r)
{
	struct spool_entry *e = spool_entry_find(c->sw, c->ids[i]);
	CHECK(c, e != NULL);
	return e ? spool_entry_mark(c->sw, e, &r) : -ENOENT;
}

static uint8_t flags_of(struct ctx *c, unsigned i)
{
	struct spool_entry *e = spool_entry_find(c->sw, c->ids[i]);
	CHECK(c, e != NULL);
	return e ? e->flags : 0xee;
}

/*
 * 0: deferred with the flag, then a recipient done and a deferral without it;
 * 1: deferred with the flag, held, released (queued, flag kept);
 * 2: deferred without; 3: deferred with it, then held; 4: never marked.
 */
static void tf_run1_step(struct ctx *c)
{
	if (c->phase == 0) {
		for (unsigned i = 0; i < TF_N; i++)
			commit_one(c, false);
		c->phase = 1;
		return;
	}
	if (c->ndone < TF_N)
		return;
	CHECK(c, flags_of(c, 0) == 0);
	CHECK(c, mark_rec(c, 0,
	                  (struct state_rec){.state = SPOOL_STATE_DEFERRED,
	                                     .attempts = 1,
	                                     .until_ms = 11,
	                                     .flags = TF_W}) == 0);
	CHECK(c, flags_of(c, 0) == TF_W);
	CHECK(c,
	      mark_rec(c, 0, (struct state_rec){.state = SPOOL_STATE_RCPT_DONE, .rcpt = 1}) == 0);
	CHECK(c, mark_rec(c, 0,
	                  (struct state_rec){
	                      .state = SPOOL_STATE_DEFERRED, .attempts = 2, .until_ms = 22}) == 0);
	CHECK(c, flags_of(c, 0) == TF_W); /* never cleared */
	CHECK(c, mark_rec(c, 1,
	                  (struct state_rec){.state = SPOOL_STATE_DEFERRED,
	                                     .attempts = 1,
	                                     .until_ms = 11,
	                                     .flags = TF_W}) == 0);
	CHECK(c, mark(c, 1, SPOOL_STATE_HELD) == 0);
	CHECK(c, mark(c, 1, SPOOL_STATE_RELEASED) == 0);
	CHECK(c, flags_of(c, 1) == TF_W);
	CHECK(c, mark_rec(c, 2,
	                  (struct state_rec){
	                      .state = SPOOL_STATE_DEFERRED, .attempts = 3, .until_ms = 33}) == 0);
	CHECK(c, flags_of(c, 2) == 0);
	CHECK(c, mark_rec(c, 3,
	                  (struct state_rec){.state = SPOOL_STATE_DEFERRED,
	                                     .attempts = 1,
	                                     .until_ms = 11,
	                                     .flags = TF_W}) == 0);
	CHECK(c, mark(c, 3, SPOOL_STATE_HELD) == 0);
	CHECK(c, flags_of(c, 3) == TF_W);
	stop(c);
}

static void tf_check(struct ctx *c)
{
	CHECK(c, spool_worker_live(c->sw) == TF_N);
	static const uint8_t want_state[TF_N] = {SPOOL_STATE_DEFERRED, SPOOL_STATE_QUEUED,
	                                         SPOOL_STATE_DEFERRED, SPOOL_STATE_HELD,
	                                         SPOOL_STATE_QUEUED};
	static const uint8_t want_flags[TF_N] = {TF_W, TF_W, 0, TF_W, 0};
	for (unsigned i = 0; i < TF_N; i++) {
		struct spool_entry *e = spool_entry_find(c->sw, c->ids[i]);
		CHECK(c, e != NULL);
		if (!e)
			continue;
		CHECK(c, e->state == want_state[i]);
		CHECK(c, e->flags == want_flags[i]);
	}
	struct spool_entry *e = spool_entry_find(c->sw, c->ids[0]);
	if (e)
		CHECK(c, e->attempts == 2 && e->until_ms == 22 && e->nrcpt_done == 1);
}

static void tf_run2_step(struct ctx *c)
{
	tf_check(c);
	/* a final record carries the flags too (nothing reads them: the message is gone) */
	CHECK(c, mark(c, 4, SPOOL_STATE_DELIVERED) == 0);
	stop(c);
}

static void tf_run3_step(struct ctx *c)
{
	CHECK(c, spool_worker_live(c->sw) == TF_N - 1);
	CHECK(c, spool_entry_find(c->sw, c->ids[4]) == NULL);
	CHECK(c, flags_of(c, 0) == TF_W && flags_of(c, 1) == TF_W && flags_of(c, 2) == 0 &&
	             flags_of(c, 3) == TF_W);
	stop(c);
}

static void test_state_flags_survive(void **state)
{
	(void)state;
	struct ctx *c = calloc(1, sizeof(*c));
	make_dir(c);
	c->step = tf_run1_step;
	run(c);
	assert_int_equal(c->nok, TF_N);
	assert_int_equal(c->stats.failed_states, 0);
	c->announce = true;
	c->step = tf_run2_step;
	run(c);
	c->step = tf_run3_step;
	run(c);
	remove_dir(c->dir);
	free(c);
}

/*
 * Compaction copies a queued message with flags (held and released after a
 * flagged deferral) and a flagged deferred one with their flags: after the
 * old segments are gone and a restart, both still have them.
 */
static void tg_run1_step(struct ctx *c)
{
	switch (c->phase) {
	case 0: {
		if (c->ndone == 2 && !c->u[9]) {
			CHECK(c, mark_rec(c, 0,
			                  (struct state_rec){.state = SPOOL_STATE_DEFERRED,
			                                     .attempts = 1,
			                                     .until_ms = 5,
			                                     .flags = TF_W}) == 0);
			CHECK(c, mark(c, 0, SPOOL_STATE_HELD) == 0);
			CHECK(c, mark(c, 0, SPOOL_STATE_RELEASED) == 0);
			CHECK(c, mark_rec(c, 1,
			                  (struct state_rec){.state = SPOOL_STATE_DEFERRED,
			                                     .attempts = 2,
			                                     .until_ms = TC_UNTIL,
			                                     .flags = TF_W}) == 0);
			c->u[9] = 1;
		}
		if (!tc_commit(c, TC_N))
			return;
		t4_map(c);
		CHECK(c, t4.nseg >= 3 && t4.nids[0] >= 3);
		if (t4.nseg < 3 || t4.nids[0] < 3) {
			stop(c);
			return;
		}
		unsigned keep[2] = {0, 1};
		tc_final_except(c, keep, 2);
		c->u[2] = mono_ms();
		c->phase = 1;
		return;
	}
	case 1:
		if ((tc_compacted(c) < 2 || seg_exists(c->dir, t4.seqs[0])) &&
		    mono_ms() - c->u[2] < TC_WAIT)
			return;
		CHECK(c, tc_compacted(c) == 2);
		CHECK(c, !seg_exists(c->dir, t4.seqs[0]));
		CHECK(c, flags_of(c, 0) == TF_W && flags_of(c, 1) == TF_W);
		stop(c);
		return;
	}
}

static void tg_run2_step(struct ctx *c)
{
	CHECK(c, spool_worker_live(c->sw) == 2);
	struct spool_entry *e = spool_entry_find(c->sw, c->ids[0]);
	CHECK(c, e && e->state == SPOOL_STATE_QUEUED && e->flags == TF_W);
	e = spool_entry_find(c->sw, c->ids[1]);
	CHECK(c, e && e->state == SPOOL_STATE_DEFERRED && e->flags == TF_W && e->attempts == 2 &&
	             e->until_ms == TC_UNTIL);
	stop(c);
}

static void test_compaction_keeps_flags(void **state)
{
	(void)state;
	struct ctx *c = calloc(1, sizeof(*c));
	make_dir(c);
	c->segment_size = 4096;
	c->body_size = 100;
	c->compact_after_ms = 50;
	c->step = tg_run1_step;
	run(c);
	assert_int_equal(c->nok, TC_N);
	assert_int_equal(c->stats.compacted, 2);
	assert_int_equal(c->stats.failed_states, 0);
	c->announce = true;
	c->step = tg_run2_step;
	run(c);
	assert_int_equal(c->stats.recovered, 2);
	remove_dir(c->dir);
	free(c);
}

/* ---- 9: dead segment files are recycled ---- */

#define TR_SEG 8192 /* segment size: 7-8 messages of ~1.1 KiB */

static ino_t tr_ino(const char *dir, const char *name)
{
	char path[600];
	struct stat st;
	snprintf(path, sizeof(path), "%s/w0/%s", dir, name);
	return stat(path, &st) == 0 ? st.st_ino : 0;
}

static ino_t tr_seg_ino(const char *dir, uint64_t seq)
{
	char name[64];
	snprintf(name, sizeof(name), "seg-%016llx.log", (unsigned long long)seq);
	return tr_ino(dir, name);
}

/* the file of the newest segment as it was before the clean stop cut it (a crash image) */
static uint8_t *tr_image;
static size_t tr_image_len;
static uint64_t tr_image_seq;

/*
 * Run 1: segments 0-3 written; 0, 1, 2 all final: 0 and 1 become the spares,
 * 2 is unlinked (two spares at most); the next two segments take the spares
 * over (same inodes, new names); some messages final in the first of them.
 * u[0]: the last old segment's seq; u[1], u[2]: the inodes of segments 0, 1;
 * u[3]: first message of the new segments; u[4]: ticks waited.
 */
static void tr_run1_step(struct ctx *c)
{
	switch (c->phase) {
	case 0:
		if (!tc_commit(c, 32))
			return;
		t4_map(c);
		CHECK(c, t4.nseg >= 4);
		if (t4.nseg < 4) {
			stop(c);
			return;
		}
		c->u[0] = t4.seqs[t4.nseg - 1];
		c->u[1] = tr_seg_ino(c->dir, t4.seqs[0]);
		c->u[2] = tr_seg_ino(c->dir, t4.seqs[1]);
		for (unsigned s = 0; s < 3; s++)
			t4_mark_seg(c, s, 0);
		CHECK(c, !seg_exists(c->dir, t4.seqs[0]) && !seg_exists(c->dir, t4.seqs[1]) &&
			     !seg_exists(c->dir, t4.seqs[2]));
		CHECK(c, tr_ino(c->dir, "spare-0.log") == (ino_t)c->u[1]);
		CHECK(c, tr_ino(c->dir, "spare-1.log") == (ino_t)c->u[2]);
		c->u[3] = c->nmsg;
		c->phase = 1;
		return;
	case 1: {
		/* one message per turn until the second new segment has its first */
		if (c->nmsg != c->ndone)
			return;
		uint64_t seqs[16];
		unsigned n = seg_list(c->dir, seqs, 16), fresh = 0;
		for (unsigned k = 0; k < n; k++)
			fresh += seqs[k] > c->u[0];
		if (fresh < 2 && c->nmsg < MAXM - 2) {
			commit_one(c, false);
			return;
		}
		CHECK(c, fresh == 2 && n >= 2);
		if (fresh != 2 || n < 2) {
			stop(c);
			return;
		}
		/* the spares, taken over in order: no spare left, the inodes moved */
		CHECK(c, tr_seg_ino(c->dir, seqs[n - 2]) == (ino_t)c->u[1]);
		CHECK(c, tr_seg_ino(c->dir, seqs[n - 1]) == (ino_t)c->u[2]);
		CHECK(c, tr_ino(c->dir, "spare-0.log") == 0 && tr_ino(c->dir, "spare-1.log") == 0);
		uint64_t ids[MAXM];
		CHECK(c, seg_ids(c->dir, seqs[n - 1], ids, MAXM) == 1);
		CHECK(c, seg_ids(c->dir, seqs[n - 2], ids, MAXM) >= 3);
		tr_image_seq = seqs[n - 1];
		/* the first two of the new messages final */
		CHECK(c, mark(c, (unsigned)c->u[3], SPOOL_STATE_DELIVERED) == 0);
		CHECK(c, mark(c, (unsigned)c->u[3] + 1, SPOOL_STATE_DELIVERED) == 0);
		c->phase = 2;
		return;
	}
	default:
		if (++c->u[4] == 20) /* the state records are written meanwhile */
			stop(c);
	}
}

static void tr_run1_fini(struct ctx *c)
{
	char path[600];
	seg_path(c->dir, tr_image_seq, path, sizeof(path));
	struct stat st;
	CHECK(c, stat(path, &st) == 0);
	tr_image_len = (size_t)st.st_size;
	tr_image = malloc(tr_image_len);
	FILE *f = fopen(path, "rb");
	CHECK(c, f && tr_image && fread(tr_image, 1, tr_image_len, f) == tr_image_len);
	if (f)
		fclose(f);
}

/* Whether message i is expected live after run 1: segments 3.. and the new ones but two. */
static bool tr_live(const struct ctx *c, unsigned i)
{
	for (unsigned s = 0; s < 3; s++)
		for (unsigned k = 0; k < t4.nids[s]; k++)
			if (t4.ids[s][k] == c->ids[i])
				return false;
	return i != c->u[3] && i != c->u[3] + 1;
}

/* Run 2: exactly the live messages, readable; then all final. */
static void tr_run2_step(struct ctx *c)
{
	switch (c->phase) {
	case 0: {
		unsigned want = 0, k = 0;
		for (unsigned i = 0; i < c->nmsg; i++) {
			if (!tr_live(c, i))
				continue;
			want++;
			CHECK(c, k < c->nadded && c->added_id[k] == c->ids[i]);
			k++;
			struct spool_entry *e = spool_entry_find(c->sw, c->ids[i]);
			CHECK(c, e != NULL);
			if (e)
				check_read(c, e, i, false);
		}
		CHECK(c, c->nadded == want);
		c->u[5] = want;
		tc_final_except(c, NULL, 0);
		CHECK(c, spool_worker_live(c->sw) == 0);
		c->u[4] = 0;
		c->phase = 1;
		return;
	}
	default:
		if (++c->u[4] == 20)
			stop(c);
	}
}

/* Run 3: the segment the worker starts with is a spare from run 2. */
static void tr_run3_step(struct ctx *c)
{
	if (!c->phase) {
		c->u[7] = c->nmsg;
		commit_one(c, false);
		c->phase = 1;
		return;
	}
	if (c->ndone < 1)
		return;
	uint64_t seqs[16];
	unsigned n = seg_list(c->dir, seqs, 16);
	CHECK(c, n >= 1);
	if (n >= 1)
		CHECK(c, tr_seg_ino(c->dir, seqs[n - 1]) == (ino_t)c->u[6]);
	stop(c);
}

static void test_segment_recycling(void **state)
{
	(void)state;
	struct ctx *c = calloc(1, sizeof(*c));
	make_dir(c);
	c->segment_size = TR_SEG;
	c->body_size = 1000;
	c->step = tr_run1_step;
	c->fini = tr_run1_fini;
	run(c);
	assert_int_equal(c->stats.failed, 0);
	assert_int_equal(c->stats.failed_states, 0);
	assert_non_null(tr_image);

	/*
	 * A crash instead of the clean stop: the newest segment (a recycled file)
	 * as it was before the stop cut it, with what its earlier use left after
	 * its data: message records of messages long final, bound to another seq.
	 */
	struct segment_header h;
	assert_int_equal(segment_header_decode(tr_image, tr_image_len, &h), 0);
	assert_int_equal(h.version, SEGMENT_VERSION);
	assert_true(h.seq == tr_image_seq);
	struct record_reader rr;
	struct record rec;
	record_reader_init_segment(&rr, &h, SEGMENT_HEADER_SIZE);
	int rc;
	while ((rc = record_next(&rr, tr_image, tr_image_len, &rec)) == 1)
		;
	assert_int_equal(rc, 0);
	assert_true(rec.offset + 1024 < tr_image_len); /* stale octets after the end */
	char path[600];
	seg_path(c->dir, tr_image_seq, path, sizeof(path));
	FILE *f = fopen(path, "wb");
	assert_non_null(f);
	assert_int_equal(fwrite(tr_image, 1, tr_image_len, f), tr_image_len);
	assert_int_equal(fclose(f), 0);
	free(tr_image);
	tr_image = NULL;

	c->announce = true;
	c->step = tr_run2_step;
	run(c);
	assert_int_equal(c->stats.recovered, c->u[5]);
	assert_true(c->u[5] >= 8);
	assert_int_equal(c->stats.recovered_bad, 0);
	/* everything final: the oldest two became spares again */
	c->u[6] = tr_ino(c->dir, "spare-0.log");
	assert_true(c->u[6] != 0);
	assert_true(tr_ino(c->dir, "spare-1.log") != 0);

	c->announce = false;
	c->step = tr_run3_step;
	run(c);
	assert_int_equal(c->nok, 1);
	struct spool_stats st;
	uint64_t q, hd;
	reopen_counts(c, &st, &q, &hd);
	assert_int_equal(st.recovered, 1); /* nothing of the files' earlier uses */
	assert_int_equal(st.recovered_bad, 0);
	assert_int_equal(q, 1);
	remove_dir(c->dir);
	free(c);
}

/* ---- 6: state payloads and the table ---- */

static void test_state_payload_roundtrip(void **state)
{
	(void)state;
	static const struct state_rec cases[] = {
	    {SPOOL_STATE_DEFERRED, 65535, 0xdeadbeefu, 0x0123456789abcdefull, 0},
	    {SPOOL_STATE_DEFERRED, 1, 0, 1893456000123ull, STATE_F_DELAY_WARNED},
	    {SPOOL_STATE_RCPT_DONE, 0, 7, 0, 0},
	    {SPOOL_STATE_RCPT_DONE, 0, UINT32_MAX, 0, STATE_F_DELAY_WARNED},
	    {SPOOL_STATE_HELD, 0, 0, 0, STATE_F_DELAY_WARNED},
	    {SPOOL_STATE_RELEASED, 0, 0, UINT64_MAX, 0xff},
	    {SPOOL_STATE_DELETED, 2, 3, 4, 0x80},
	    {SPOOL_STATE_DELIVERED, 0, 0, 0, 0},
	    {SPOOL_STATE_BOUNCED, 258, 0, 0, 0},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		uint8_t p[STATE_PAYLOAD_SIZE];
		memset(p, 0xaa, sizeof(p));
		state_payload_encode_rec(p, &cases[i]);
		/* the layout of state.h */
		assert_int_equal(p[0], cases[i].state);
		assert_int_equal(p[1], cases[i].flags);
		assert_int_equal(p[2] | p[3] << 8, cases[i].attempts);
		uint32_t rc = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16 |
			      (uint32_t)p[7] << 24;
		assert_int_equal(rc, cases[i].rcpt);
		uint64_t until = 0;
		for (int k = 7; k >= 0; k--)
			until = until << 8 | p[8 + k];
		assert_true(until == cases[i].until_ms);
		struct state_rec r;
		memset(&r, 0x55, sizeof(r));
		assert_int_equal(state_payload_decode_rec(p, sizeof(p), &r), 0);
		assert_int_equal(r.state, cases[i].state);
		assert_int_equal(r.attempts, cases[i].attempts);
		assert_int_equal(r.rcpt, cases[i].rcpt);
		assert_true(r.until_ms == cases[i].until_ms);
		assert_int_equal(r.flags, cases[i].flags); /* unknown bits kept as they are */
		/* the short form reads the same state and time */
		enum spool_state st;
		uint64_t u = 1;
		assert_int_equal(state_payload_decode(p, sizeof(p), &st, &u), 0);
		assert_int_equal(st, cases[i].state);
		assert_true(u == cases[i].until_ms);
		assert_int_equal(state_payload_decode(p, sizeof(p), &st, NULL), 0);
		/* longer payloads (a newer writer's extra octets) read the same */
		uint8_t longer[STATE_PAYLOAD_SIZE + 8];
		memcpy(longer, p, sizeof(p));
		memset(longer + sizeof(p), 0xff, 8);
		assert_int_equal(state_payload_decode_rec(longer, sizeof(longer), &r), 0);
		assert_true(r.state == cases[i].state && r.attempts == cases[i].attempts &&
		            r.rcpt == cases[i].rcpt && r.until_ms == cases[i].until_ms &&
		            r.flags == cases[i].flags);
		/* shorter: refused */
		for (size_t len = 0; len < STATE_PAYLOAD_SIZE; len++)
			assert_int_equal(state_payload_decode_rec(p, len, &r), -1);
	}
	/* the short encoder: zeros between state and time */
	uint8_t p[STATE_PAYLOAD_SIZE];
	state_payload_encode(p, SPOOL_STATE_HELD, 0x1122334455667788ull);
	static const uint8_t want[STATE_PAYLOAD_SIZE] = {1,    0,    0,    0,    0,    0,
							 0,    0,    0x88, 0x77, 0x66, 0x55,
							 0x44, 0x33, 0x22, 0x11};
	assert_memory_equal(p, want, sizeof(want));
}

/* Payloads of writers before DEFERRED: zeros in octets 1..7 read as 0 attempts, recipient 0. */
static void test_state_payload_old_writers(void **state)
{
	(void)state;
	for (unsigned s = SPOOL_STATE_HELD; s <= SPOOL_STATE_BOUNCED; s++) {
		uint8_t p[STATE_PAYLOAD_SIZE] = {(uint8_t)s, 0, 0, 0, 0, 0, 0, 0,
						 0x10,       0x20, 0, 0, 0, 0, 0, 0};
		struct state_rec r;
		memset(&r, 0x55, sizeof(r));
		assert_int_equal(state_payload_decode_rec(p, sizeof(p), &r), 0);
		assert_int_equal(r.state, s);
		assert_int_equal(r.attempts, 0);
		assert_int_equal(r.rcpt, 0);
		assert_true(r.until_ms == 0x2010);
		assert_int_equal(r.flags, 0); /* writers before flags: none set */
	}
}

static void test_state_payload_values(void **state)
{
	(void)state;
	uint8_t p[STATE_PAYLOAD_SIZE] = {0};
	struct state_rec r;
	enum spool_state st;
	/* QUEUED is never written */
	p[0] = SPOOL_STATE_QUEUED;
	assert_int_equal(state_payload_decode_rec(p, sizeof(p), &r), -1);
	assert_int_equal(state_payload_decode(p, sizeof(p), &st, NULL), -1);
	for (unsigned v = SPOOL_STATE_HELD; v <= SPOOL_STATE_RCPT_DONE; v++) {
		p[0] = (uint8_t)v;
		assert_int_equal(state_payload_decode_rec(p, sizeof(p), &r), 0);
		assert_int_equal(r.state, v);
	}
	/* a newer writer's states: refused */
	for (unsigned v = 8; v < 256; v++) {
		p[0] = (uint8_t)v;
		assert_int_equal(state_payload_decode_rec(p, sizeof(p), &r), -1);
		assert_int_equal(state_payload_decode(p, sizeof(p), &st, NULL), -1);
	}
	/* only the message states are final */
	assert_true(spool_state_final(SPOOL_STATE_DELETED));
	assert_true(spool_state_final(SPOOL_STATE_DELIVERED));
	assert_true(spool_state_final(SPOOL_STATE_BOUNCED));
	assert_false(spool_state_final(SPOOL_STATE_QUEUED));
	assert_false(spool_state_final(SPOOL_STATE_HELD));
	assert_false(spool_state_final(SPOOL_STATE_RELEASED));
	assert_false(spool_state_final(SPOOL_STATE_DEFERRED));
	assert_false(spool_state_final(SPOOL_STATE_RCPT_DONE));
}

static void test_state_table_records(void **state)
{
	(void)state;
	struct state_table t = {0};
	assert_int_equal(state_table_add_rec(&t, 10,
	                                     &(struct state_rec){.state = SPOOL_STATE_DEFERRED,
	                                                         .attempts = 4,
	                                                         .until_ms = 99,
	                                                         .flags = STATE_F_DELAY_WARNED}),
	                 0);
	/* RCPT_DONE is not a message state: not added, the deferral stays */
	assert_int_equal(state_table_add_rec(&t, 10,
					     &(struct state_rec){.state = SPOOL_STATE_RCPT_DONE,
								 .rcpt = 1}),
			 0);
	assert_int_equal(t.n, 1);
	assert_int_equal(state_table_add(&t, 11, SPOOL_STATE_HELD), 0);
	assert_int_equal(state_table_add_rec(&t, 11,
					     &(struct state_rec){.state = SPOOL_STATE_DEFERRED,
								 .attempts = 1,
								 .until_ms = 5}),
			 0);
	assert_int_equal(state_table_add(&t, 12, SPOOL_STATE_DEFERRED), 0);
	assert_int_equal(state_table_add(&t, 12, SPOOL_STATE_DELIVERED), 0);
	assert_int_equal(state_table_add(&t, 13, SPOOL_STATE_HELD), 0);
	assert_int_equal(state_table_add(&t, 13, SPOOL_STATE_RELEASED), 0);
	state_table_finish(&t);
	const struct state_entry *e = state_table_find(&t, 10);
	assert_non_null(e);
	assert_int_equal(e->state, SPOOL_STATE_DEFERRED);
	assert_int_equal(e->attempts, 4);
	assert_true(e->until_ms == 99);
	assert_int_equal(e->flags, STATE_F_DELAY_WARNED);
	assert_int_equal(state_table_lookup(&t, 10), SPOOL_STATE_QUEUED);
	e = state_table_find(&t, 11);
	assert_non_null(e);
	assert_int_equal(e->state, SPOOL_STATE_DEFERRED);
	assert_int_equal(e->attempts, 1);
	assert_int_equal(state_table_lookup(&t, 11), SPOOL_STATE_QUEUED);
	assert_int_equal(state_table_lookup(&t, 12), SPOOL_STATE_DELIVERED);
	assert_int_equal(state_table_lookup(&t, 13), SPOOL_STATE_QUEUED);
	e = state_table_find(&t, 13);
	assert_non_null(e);
	assert_int_equal(e->state, SPOOL_STATE_RELEASED);
	assert_null(state_table_find(&t, 14));
	assert_int_equal(state_table_lookup(&t, 14), SPOOL_STATE_QUEUED);
	state_table_free(&t);
	assert_null(t.v);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_commit_added_find_read),
	    cmocka_unit_test(test_marks_and_recovery),
	    cmocka_unit_test(test_marks_at_shutdown),
	    cmocka_unit_test(test_runtime_segment_removal),
	    cmocka_unit_test(test_recovery_removed_segment_does_not_pin),
	    cmocka_unit_test(test_read_damaged),
	    cmocka_unit_test(test_failed_state_write),
	    cmocka_unit_test(test_compaction),
	    cmocka_unit_test(test_compaction_crash_before_removal),
	    cmocka_unit_test(test_compaction_not_too_live),
	    cmocka_unit_test(test_compaction_not_too_young),
	    cmocka_unit_test(test_compaction_final_in_flight),
	    cmocka_unit_test(test_state_payload_roundtrip),
	    cmocka_unit_test(test_state_payload_old_writers),
	    cmocka_unit_test(test_state_payload_values),
	    cmocka_unit_test(test_state_table_records),
	    cmocka_unit_test(test_state_flags_survive),
	    cmocka_unit_test(test_compaction_keeps_flags),
	    cmocka_unit_test(test_segment_recycling),
	};
	int failed = cmocka_run_group_tests_name("direct I/O", tests, NULL, NULL);
	buffered_io = true;
	failed += cmocka_run_group_tests_name("buffered I/O", tests, NULL, NULL);
	return failed;
}
