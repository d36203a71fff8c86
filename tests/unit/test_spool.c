/*
 * spool tests: a real engine with one worker drives the spool from its loop
 * (group commit through io_uring), then the spool is reopened to check what
 * recovery finds. Write failures are made with RLIMIT_FSIZE (writes past it
 * fail with EFBIG), so no special file system is needed.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include <dirent.h>
#include <sys/uio.h>

#include "net/net.h"
#include "queue/record.h"
#include "queue/spool.h"
#include "queue/state.h"

struct scenario {
	struct spool *sp;
	struct net_engine *e;
	struct net_timer start;
	unsigned messages;     /* to commit in one turn */
	size_t body_size;
	unsigned done_ok, done_err;
	int last_err;
	rlim_t fsize_limit;    /* 0: none; else set before committing */
	bool second_round;     /* after a failure: lift the limit and commit again */
	unsigned second_ok;
	unsigned rounds;       /* 0: all messages in the first turn; else per_round every 1 ms */
	unsigned per_round, round_no;
	struct spool_worker *sw;
	char dir[256];
};

static void commit_batch(struct scenario *s, unsigned n);

static void on_done(void *arg, int res, uint64_t id)
{
	struct scenario *s = arg;
	(void)id;
	if (res == 0)
		s->done_ok++;
	else {
		s->done_err++;
		s->last_err = res;
	}
	if (s->done_ok + s->done_err < s->messages)
		return;
	if (s->second_round && !s->second_ok && s->done_err) {
		/* space is back: the next batch must succeed */
		struct rlimit rl = {RLIM_INFINITY, RLIM_INFINITY};
		setrlimit(RLIMIT_FSIZE, &rl);
		s->second_ok = 1;
		s->messages += 3;
		commit_batch(s, 3);
		return;
	}
	net_engine_stop(s->e);
}

static void commit_batch(struct scenario *s, unsigned n)
{
	char *body = malloc(s->body_size);
	assert_non_null(body);
	for (size_t i = 0; i < s->body_size; i++)
		body[i] = (char)('a' + i % 26);
	for (unsigned i = 0; i < n; i++) {
		struct spool_txn *t = spool_txn_begin(s->sw);
		assert_non_null(t);
		assert_int_equal(spool_txn_append(t, "Subject: x\r\n\r\n", 14), 0);
		assert_int_equal(spool_txn_append(t, body, s->body_size), 0);
		const char *rcpt = "rcpt@example.com";
		size_t rlen = strlen(rcpt);
		struct spool_envelope env = {
			.sender = "sender@example.com",
			.sender_len = 18,
			.helo = "client.example",
			.peer = "127.0.0.1",
			.rcpts = &rcpt,
			.rcpt_lens = &rlen,
			.nrcpts = 1,
		};
		spool_txn_commit(t, &env, on_done, s);
	}
	free(body);
}

static void start_fire(struct net_timer *t, struct net_worker *w)
{
	struct scenario *s = (struct scenario *)((char *)t - offsetof(struct scenario, start));
	if (s->fsize_limit) {
		signal(SIGXFSZ, SIG_IGN);
		struct rlimit rl = {s->fsize_limit, RLIM_INFINITY};
		assert_int_equal(setrlimit(RLIMIT_FSIZE, &rl), 0);
	}
	if (!s->rounds) {
		commit_batch(s, s->messages);
		return;
	}
	commit_batch(s, s->per_round);
	if (++s->round_no < s->rounds)
		net_timer_start(w, t, 1);
}

static int hook_init(struct net_worker *w, void *arg)
{
	struct scenario *s = arg;
	int r = spool_worker_init(s->sp, w);
	if (r < 0)
		return r;
	s->sw = spool_worker(s->sp, 0);
	s->start.fire = start_fire;
	net_timer_start(w, &s->start, 1);
	return 0;
}

static void hook_turn_end(struct net_worker *w, void *arg)
{
	(void)w;
	struct scenario *s = arg;
	spool_worker_turn_end(s->sw);
}

static void hook_fini(struct net_worker *w, void *arg)
{
	(void)w;
	struct scenario *s = arg;
	spool_worker_fini(s->sw);
}

/*
 * Every case runs twice: with direct I/O (the default where the file system
 * takes it: the test directory is on one that does, or the spool falls back)
 * and through the page cache.
 */
static bool buffered_io;

/* Sync fault injection: the syncs numbered fail_sync_from.. fail with EIO (0: none). */
static unsigned sync_count, fail_sync_from, fail_sync_count;

static int sync_fault(int res)
{
	sync_count++;
	if (fail_sync_from && sync_count >= fail_sync_from &&
	    sync_count < fail_sync_from + fail_sync_count)
		return -EIO;
	return res;
}

static struct spool *open_spool(const char *dir, char *err, size_t errlen)
{
	struct spool_config cfg = {.dir = dir,
				   .durability = SPOOL_FSYNC,
				   .buffered_io = buffered_io,
				   .sync_result = sync_fault};
	return spool_open(&cfg, 1, err, errlen);
}

/* Runs the scenario in a fresh engine; leaves the spool closed. */
static void run(struct scenario *s)
{
	char err[512];
	s->sp = open_spool(s->dir, err, sizeof(err));
	assert_non_null(s->sp);
	struct net_config cfg;
	net_config_default(&cfg);
	cfg.workers = 1;
	cfg.pin = false;
	cfg.buf_count = 64;
	struct net_worker_hooks hooks = {
		.init = hook_init, .turn_end = hook_turn_end, .fini = hook_fini, .arg = s};
	s->e = net_engine_new(&cfg, &hooks);
	assert_non_null(s->e);
	assert_int_equal(net_engine_run(s->e), 0);
	net_engine_free(&s->e);
	struct rlimit rl = {RLIM_INFINITY, RLIM_INFINITY};
	setrlimit(RLIMIT_FSIZE, &rl);
	spool_close(&s->sp);
}

static uint64_t recovered(const char *dir, uint64_t *bad)
{
	char err[512];
	struct spool *sp = open_spool(dir, err, sizeof(err));
	assert_non_null(sp);
	struct spool_stats st;
	spool_stats(sp, &st);
	if (bad)
		*bad = st.recovered_bad;
	spool_close(&sp);
	return st.recovered;
}

static void make_dir(struct scenario *s)
{
	snprintf(s->dir, sizeof(s->dir), "/tmp/ph-test-spool-XXXXXX");
	assert_non_null(mkdtemp(s->dir));
}

static void remove_dir(const char *dir)
{
	char cmd[512];
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	assert_int_equal(system(cmd), 0);
}

/* ---- tests ---- */

static void test_group_commit_and_recovery(void **state)
{
	(void)state;
	struct scenario s = {.messages = 200, .body_size = 1000};
	make_dir(&s);
	run(&s);
	assert_int_equal(s.done_ok, 200);
	assert_int_equal(s.done_err, 0);
	assert_int_equal(recovered(s.dir, NULL), 200);
	/* a second run adds to the same spool */
	struct scenario s2 = {.messages = 50, .body_size = 70000};
	memcpy(s2.dir, s.dir, sizeof(s.dir));
	run(&s2);
	assert_int_equal(s2.done_ok, 50);
	assert_int_equal(recovered(s.dir, NULL), 250);
	remove_dir(s.dir);
}

static void test_stats_count_batches(void **state)
{
	(void)state;
	struct scenario s = {.messages = 300, .body_size = 100};
	make_dir(&s);
	char err[512];
	s.sp = open_spool(s.dir, err, sizeof(err));
	assert_non_null(s.sp);
	struct net_config cfg;
	net_config_default(&cfg);
	cfg.workers = 1;
	cfg.pin = false;
	cfg.buf_count = 64;
	struct net_worker_hooks hooks = {
		.init = hook_init, .turn_end = hook_turn_end, .fini = hook_fini, .arg = &s};
	s.e = net_engine_new(&cfg, &hooks);
	assert_int_equal(net_engine_run(s.e), 0);
	net_engine_free(&s.e);
	struct spool_stats st;
	spool_stats(s.sp, &st);
	spool_close(&s.sp);
	assert_int_equal(st.committed, 300);
	/* 300 messages sealed in one turn: 4 iovecs each fit 256 per writev -> 2 batches */
	assert_true(st.writes >= 1 && st.writes <= 3);
	/* a batch whose write completes while another's sync is in flight shares the next sync */
	assert_true(st.syncs >= 1 && st.syncs <= st.writes);
	remove_dir(s.dir);
}

/* A write that fails (file size limit: like a full disk) answers every message of the batch
   with an error, leaves nothing of it behind, and the next batch succeeds. */
static void test_write_failure_then_resume(void **state)
{
	(void)state;
	struct scenario s = {.messages = 20, .body_size = 10000, .second_round = true};
	make_dir(&s);
	s.fsize_limit = 4096; /* the segment header fits; the batch does not */
	run(&s);
	assert_int_equal(s.done_err, 20);
	assert_true(s.last_err == -EFBIG || s.last_err == -ENOSPC);
	assert_int_equal(s.done_ok, 3);
	uint64_t bad = 0;
	assert_int_equal(recovered(s.dir, &bad), 3);
	assert_int_equal(bad, 0); /* the failed batch was truncated away */
	remove_dir(s.dir);
}

/* Runs s with syncs from..from+count-1 failing; checks recovery finds exactly what was
   acknowledged, and no damaged record. */
static void run_with_sync_faults(struct scenario *s, unsigned from, unsigned count)
{
	make_dir(s);
	sync_count = 0;
	fail_sync_from = from;
	fail_sync_count = count;
	run(s);
	fail_sync_from = 0;
	uint64_t bad = 0;
	assert_int_equal(recovered(s->dir, &bad), s->done_ok);
	assert_int_equal(bad, 0);
	remove_dir(s->dir);
}

/* A sync that fails answers its batch with the error and cuts the segment back: recovery
   finds nothing of it, and the next batch succeeds. */
static void test_sync_failure_then_resume(void **state)
{
	(void)state;
	struct scenario s = {.messages = 20, .body_size = 10000, .second_round = true};
	run_with_sync_faults(&s, 1, 1);
	assert_int_equal(s.done_err, 20);
	assert_int_equal(s.last_err, -EIO);
	assert_int_equal(s.done_ok, 3);
}

/*
 * Messages sealed every millisecond, so that a batch is being written while
 * the one before it syncs; two syncs in the middle fail. Every batch from
 * the failed sync's on (including one written meanwhile) is answered with the
 * error and cut away; what was acknowledged is exactly what recovery finds.
 */
static void test_sync_failure_while_writing(void **state)
{
	(void)state;
	struct scenario s = {.messages = 40 * 5, .body_size = 60000, .rounds = 40, .per_round = 5};
	run_with_sync_faults(&s, 4, 2);
	assert_int_equal(s.done_ok + s.done_err, 200);
	assert_true(s.done_err >= 5);
	assert_true(s.done_ok >= 5);
}

static void test_lock_refuses_second_open(void **state)
{
	(void)state;
	struct scenario s = {0};
	make_dir(&s);
	char err[512];
	struct spool *a = open_spool(s.dir, err, sizeof(err));
	assert_non_null(a);
	struct spool *b = open_spool(s.dir, err, sizeof(err));
	assert_null(b);
	assert_non_null(strstr(err, "in use by another posthaste"));
	spool_close(&a);
	b = open_spool(s.dir, err, sizeof(err));
	assert_non_null(b);
	spool_close(&b);
	remove_dir(s.dir);
}

/* A crash in the middle of a write leaves a torn record: recovery keeps all before it. */
static void test_torn_tail_recovery(void **state)
{
	(void)state;
	struct scenario s = {.messages = 10, .body_size = 5000};
	make_dir(&s);
	run(&s);
	char seg[512];
	snprintf(seg, sizeof(seg), "%s/w0", s.dir);
	char cmd[1024];
	snprintf(cmd, sizeof(cmd), "ls %s/seg-*.log | head -1", seg);
	FILE *p = popen(cmd, "r");
	assert_non_null(p);
	assert_non_null(fgets(seg, sizeof(seg), p));
	pclose(p);
	seg[strcspn(seg, "\n")] = '\0';
	struct stat st;
	assert_int_equal(stat(seg, &st), 0);
	assert_int_equal(truncate(seg, st.st_size - 100), 0); /* cut into the last record */
	uint64_t bad = 0;
	assert_int_equal(recovered(s.dir, &bad), 9);
	remove_dir(s.dir);
}

static void test_id_format(void **state)
{
	(void)state;
	char buf[17];
	spool_id_format(0x0123456789ABCDEFull, buf);
	assert_string_equal(buf, "0123456789ABCDEF");
	spool_id_format(0, buf);
	assert_string_equal(buf, "0000000000000000");
}

/* ---- state records ---- */

static int seg_filter(const struct dirent *de)
{
	return !strncmp(de->d_name, "seg-", 4);
}

/* The segment names of dir/w0, sorted; returns how many (names freed by the caller). */
static int list_segs(const char *dir, struct dirent ***names)
{
	char w0[512];
	snprintf(w0, sizeof(w0), "%s/w0", dir);
	int n = scandir(w0, names, seg_filter, alphasort);
	assert_true(n >= 0);
	return n;
}

static void free_names(struct dirent **names, int n)
{
	for (int i = 0; i < n; i++)
		free(names[i]);
	free(names);
}

static bool seg_exists(const char *dir, uint64_t seq)
{
	char path[600];
	snprintf(path, sizeof(path), "%s/w0/seg-%016llx.log", dir, (unsigned long long)seq);
	return access(path, F_OK) == 0;
}

/* The message ids of the segment dir/w0/seg-SEQ.log, in order; returns how many. */
static size_t segment_ids(const char *dir, uint64_t seq, uint64_t *ids, size_t max)
{
	char path[600];
	snprintf(path, sizeof(path), "%s/w0/seg-%016llx.log", dir, (unsigned long long)seq);
	FILE *f = fopen(path, "rb");
	assert_non_null(f);
	static uint8_t buf[4 << 20];
	size_t len = fread(buf, 1, sizeof(buf), f);
	fclose(f);
	struct segment_header h;
	assert_int_equal(segment_header_decode(buf, len, &h), 0);
	struct record_reader rr;
	record_reader_init_segment(&rr, &h, SEGMENT_HEADER_SIZE);
	struct record rec;
	size_t n = 0;
	while (record_next(&rr, buf, len, &rec) == 1)
		if (rec.type == RECORD_MESSAGE && n < max)
			ids[n++] = rec.queue_id;
	return n;
}

/* The highest segment sequence in dir/w0 (the one run() just wrote). */
static uint64_t newest_seq(const char *dir)
{
	struct dirent **names;
	int n = list_segs(dir, &names);
	assert_true(n > 0);
	uint64_t seq = strtoull(names[n - 1]->d_name + 4, NULL, 16);
	free_names(names, n);
	return seq;
}

/*
 * Writes dir/w0/seg-SEQ.log holding one state record per (ids[i], states[i]),
 * as a version-1 segment (an older writer's: still read, among the daemon's
 * version-2 ones).
 */
static void write_states(const char *dir, uint64_t seq, const uint64_t *ids,
			 const enum spool_state *states, size_t n)
{
	char path[600];
	snprintf(path, sizeof(path), "%s/w0/seg-%016llx.log", dir, (unsigned long long)seq);
	FILE *f = fopen(path, "wbx");
	assert_non_null(f);
	uint8_t hdr[SEGMENT_HEADER_SIZE];
	segment_header_encode(hdr, 0, seq, 0);
	hdr[8] = SEGMENT_VERSION_V1;
	assert_int_equal(fwrite(hdr, 1, sizeof(hdr), f), sizeof(hdr));
	for (size_t i = 0; i < n; i++) {
		uint8_t rh[RECORD_HEADER_SIZE], payload[STATE_PAYLOAD_SIZE];
		state_payload_encode(payload, states[i], 0);
		struct iovec iov = {payload, sizeof(payload)};
		size_t pad = record_header_encode(rh, RECORD_STATE, 0, ids[i], &iov, 1);
		assert_int_equal(pad, 0);
		assert_int_equal(fwrite(rh, 1, sizeof(rh), f), sizeof(rh));
		assert_int_equal(fwrite(payload, 1, sizeof(payload), f), sizeof(payload));
	}
	assert_int_equal(fclose(f), 0);
}

/* (queued, held) as recovery counts them. */
static uint64_t recovered_held(const char *dir, uint64_t *held)
{
	char err[512];
	struct spool *sp = open_spool(dir, err, sizeof(err));
	assert_non_null(sp);
	struct spool_stats st;
	spool_stats(sp, &st);
	*held = st.recovered_held;
	assert_int_equal(spool_held(sp), st.recovered_held);
	assert_int_equal(spool_queued(sp), st.recovered);
	spool_close(&sp);
	return st.recovered;
}

/* Held, deleted, released, later states winning, an unknown id: counted right, nothing lost. */
static void test_state_records_recovery(void **state)
{
	(void)state;
	struct scenario s = {.messages = 10, .body_size = 100};
	make_dir(&s);
	run(&s);
	uint64_t mseq = newest_seq(s.dir);
	uint64_t id[10];
	assert_int_equal(segment_ids(s.dir, mseq, id, 10), 10);
	uint64_t a_ids[] = {id[0], id[1], id[2], id[3], id[3], 0x1234, id[4]};
	enum spool_state a_st[] = {SPOOL_STATE_HELD,    SPOOL_STATE_DELETED, SPOOL_STATE_HELD,
				   SPOOL_STATE_HELD,    SPOOL_STATE_DELETED, SPOOL_STATE_DELETED,
				   SPOOL_STATE_DELETED};
	write_states(s.dir, mseq + 100, a_ids, a_st, 7);
	/* a later segment: id2 released (the later record wins), id5 delivered */
	uint64_t b_ids[] = {id[2], id[5]};
	enum spool_state b_st[] = {SPOOL_STATE_RELEASED, SPOOL_STATE_DELIVERED};
	write_states(s.dir, mseq + 101, b_ids, b_st, 2);
	uint64_t held = 0;
	/* final: id1, id3, id4, id5; held: id0; queued: 2, 6, 7, 8, 9 */
	assert_int_equal(recovered_held(s.dir, &held), 5);
	assert_int_equal(held, 1);
	/* the messages' segment has live messages: every segment stays */
	assert_true(seg_exists(s.dir, mseq));
	assert_true(seg_exists(s.dir, mseq + 100));
	assert_true(seg_exists(s.dir, mseq + 101));
	assert_int_equal(recovered_held(s.dir, &held), 5);
	assert_int_equal(held, 1);
	remove_dir(s.dir);
}

/* A segment whose messages are all final goes at start-up, with the state-only segments that
   only name its messages; one naming a live message elsewhere stays. */
static void test_state_records_remove_final_segments(void **state)
{
	(void)state;
	struct scenario s = {.messages = 5, .body_size = 100};
	make_dir(&s);
	run(&s);
	uint64_t seq_a = newest_seq(s.dir);
	uint64_t a[5];
	assert_int_equal(segment_ids(s.dir, seq_a, a, 5), 5);
	struct scenario s2 = {.messages = 3, .body_size = 100};
	memcpy(s2.dir, s.dir, sizeof(s.dir));
	run(&s2);
	uint64_t seq_b = newest_seq(s.dir);
	assert_true(seq_b > seq_a);
	uint64_t b[3];
	assert_int_equal(segment_ids(s.dir, seq_b, b, 3), 3);

	enum spool_state del[5] = {SPOOL_STATE_DELETED, SPOOL_STATE_DELETED, SPOOL_STATE_DELETED,
				   SPOOL_STATE_DELETED, SPOOL_STATE_DELETED};
	uint64_t seq_d = seq_b + 10, seq_e = seq_b + 11;
	write_states(s.dir, seq_d, a, del, 5); /* only deletes of A's messages */
	uint64_t e_ids[] = {a[0], b[0]};
	enum spool_state e_st[] = {SPOOL_STATE_DELETED, SPOOL_STATE_HELD};
	write_states(s.dir, seq_e, e_ids, e_st, 2); /* names a live message of B */

	uint64_t held = 0;
	assert_int_equal(recovered_held(s.dir, &held), 2);
	assert_int_equal(held, 1);
	assert_false(seg_exists(s.dir, seq_a));
	assert_false(seg_exists(s.dir, seq_d));
	assert_true(seg_exists(s.dir, seq_b));
	assert_true(seg_exists(s.dir, seq_e));
	/* again: the same (E's delete of a[0] now names no message and is ignored) */
	assert_int_equal(recovered_held(s.dir, &held), 2);
	assert_int_equal(held, 1);

	/* everything of B final: B, E and F all go */
	uint64_t seq_f = seq_b + 12;
	write_states(s.dir, seq_f, b, del, 3);
	assert_int_equal(recovered_held(s.dir, &held), 0);
	assert_int_equal(held, 0);
	struct dirent **names;
	int n = list_segs(s.dir, &names);
	free_names(names, n);
	assert_int_equal(n, 0);
	remove_dir(s.dir);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_group_commit_and_recovery),
		cmocka_unit_test(test_stats_count_batches),
		cmocka_unit_test(test_write_failure_then_resume),
		cmocka_unit_test(test_sync_failure_then_resume),
		cmocka_unit_test(test_sync_failure_while_writing),
		cmocka_unit_test(test_lock_refuses_second_open),
		cmocka_unit_test(test_torn_tail_recovery),
		cmocka_unit_test(test_id_format),
		cmocka_unit_test(test_state_records_recovery),
		cmocka_unit_test(test_state_records_remove_final_segments),
	};
	int failed = cmocka_run_group_tests_name("direct I/O", tests, NULL, NULL);
	buffered_io = true;
	failed += cmocka_run_group_tests_name("buffered I/O", tests, NULL, NULL);
	return failed;
}
