/*
 * posthaste-bench sink: the SMTP server with a discarding message sink, and
 * failures and delays injected on demand, so a sender (or a relay under
 * test) sees the back-pressure real receivers give.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "bench/bench.h"
#include "core/compiler.h"
#include "core/log.h"
#include "mta/smtp/smtp_server.h"
#include "net/net.h"
#include "tls/tls.h"

#define MAX_RULES 16

struct fail_rule {
	enum smtp_stage stage;
	unsigned code;
	double percent;
};

struct delay_rule {
	enum smtp_stage stage;
	unsigned ms;
};

/* --fail-rcpt: a recipient containing `pattern` is refused with `code`. */
struct rcpt_rule {
	const char *pattern;
	unsigned code;
};

/* Per worker: the discard sink's state. */
struct sink_worker {
	uint64_t rng;
	uint64_t next_id;
	uint64_t injected_failures;
	uint64_t injected_delays;
	unsigned index;
	struct sink_ctx *ctx;
} cache_aligned;

/* The process: options, then read-only while the workers run. */
struct sink_ctx {
	struct fail_rule fails[MAX_RULES];
	unsigned nfails;
	struct delay_rule delays[MAX_RULES];
	unsigned ndelays;
	struct rcpt_rule rcpt_fails[MAX_RULES];
	unsigned nrcpt_fails;
	/* connections open now, and the most open at once, over all workers */
	_Atomic uint64_t open_conns;
	_Atomic uint64_t max_concurrent;
	struct smtp_server *srv;
	struct sink_worker *workers;
};

static const char *const stage_names[SMTP_STAGE_COUNT] = {
	[SMTP_STAGE_CONNECT] = "CONNECT", [SMTP_STAGE_EHLO] = "EHLO", [SMTP_STAGE_MAIL] = "MAIL",
	[SMTP_STAGE_RCPT] = "RCPT",       [SMTP_STAGE_DATA] = "DATA", [SMTP_STAGE_EOM] = "EOM",
};

static int parse_stage(const char *s, size_t n, enum smtp_stage *out)
{
	for (unsigned i = 0; i < SMTP_STAGE_COUNT; i++) {
		if (strlen(stage_names[i]) == n && !strncasecmp(s, stage_names[i], n)) {
			*out = (enum smtp_stage)i;
			return 0;
		}
	}
	if (n == 4 && !strncasecmp(s, "HELO", 4)) {
		*out = SMTP_STAGE_EHLO;
		return 0;
	}
	return -EINVAL;
}

static uint64_t rng_next(uint64_t *s)
{
	/* xorshift64*: per worker, no locks */
	uint64_t x = *s;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*s = x;
	return x * 0x2545F4914F6CDD1Dull;
}

static int sink_txn_begin(void *ctx, struct smtp_session *s, void **txn_r)
{
	(void)s;
	*txn_r = ctx;
	return 0;
}

static int sink_txn_body(void *txn, const char *data, size_t len)
{
	(void)txn;
	(void)data;
	(void)len;
	return 0;
}

static int sink_txn_end(void *txn, const struct smtp_envelope *env, struct smtp_txn_result *res)
{
	struct sink_worker *sw = txn;
	(void)env;
	res->code = 250;
	res->enhanced = "2.0.0";
	snprintf(res->text, sizeof(res->text), "Ok: queued as %02X%012" PRIX64, sw->index,
		 ++sw->next_id);
	return 1;
}

static void sink_txn_abort(void *txn)
{
	(void)txn;
}

static void sink_session_close(void *ctx)
{
	struct sink_worker *sw = ctx;
	atomic_fetch_sub_explicit(&sw->ctx->open_conns, 1, memory_order_relaxed);
}

static unsigned sink_rcpt_check(void *ctx, struct smtp_session *s, const char *addr, size_t len,
				char *text, size_t cap)
{
	(void)s;
	struct sink_worker *sw = ctx;
	const struct sink_ctx *c = sw->ctx;
	for (unsigned i = 0; i < c->nrcpt_fails; i++) {
		const struct rcpt_rule *r = &c->rcpt_fails[i];
		if (!memmem(addr, len, r->pattern, strlen(r->pattern)))
			continue;
		sw->injected_failures++;
		snprintf(text, cap, "%s <%.*s>: Recipient address rejected (injected)",
			 r->code >= 500 ? "5.1.1" : "4.2.0", (int)(len > 256 ? 256 : len), addr);
		return r->code;
	}
	return 0;
}

static void sink_verdict(void *ctx, enum smtp_stage stage, struct smtp_verdict *v)
{
	struct sink_worker *sw = ctx;
	struct sink_ctx *c = sw->ctx;
	if (stage == SMTP_STAGE_CONNECT) {
		/* every session gets this verdict once; session_close undoes it */
		uint64_t now = atomic_fetch_add_explicit(&c->open_conns, 1, memory_order_relaxed) + 1;
		uint64_t max = atomic_load_explicit(&c->max_concurrent, memory_order_relaxed);
		while (now > max && !atomic_compare_exchange_weak_explicit(
					    &c->max_concurrent, &max, now, memory_order_relaxed,
					    memory_order_relaxed)) {
		}
	}
	for (unsigned i = 0; i < c->ndelays; i++) {
		if (c->delays[i].stage == stage) {
			v->delay_ms = c->delays[i].ms;
			sw->injected_delays++;
		}
	}
	for (unsigned i = 0; i < c->nfails; i++) {
		const struct fail_rule *f = &c->fails[i];
		if (f->stage != stage)
			continue;
		double roll = (double)(rng_next(&sw->rng) >> 11) * (1.0 / 9007199254740992.0) * 100.0;
		if (roll < f->percent) {
			v->code = f->code;
			sw->injected_failures++;
			return;
		}
	}
}

static const struct smtp_sink_ops discard_ops = {
	.txn_begin = sink_txn_begin,
	.txn_body = sink_txn_body,
	.txn_end = sink_txn_end,
	.txn_abort = sink_txn_abort,
	.verdict = sink_verdict,
	.rcpt_check = sink_rcpt_check,
	.session_close = sink_session_close,
};

static int worker_init(struct net_worker *w, void *arg)
{
	struct sink_ctx *c = arg;
	struct sink_worker *sw = &c->workers[net_worker_index(w)];
	sw->index = net_worker_index(w);
	sw->ctx = c;
	sw->rng = 0x9E3779B97F4A7C15ull ^ ((uint64_t)time(NULL) << 8) ^ (sw->index + 1);
	const struct smtp_sink_ops *ops = &discard_ops;
	return smtp_server_worker_init(c->srv, w, ops, sw);
}

static void sink_usage(FILE *f)
{
	fputs("usage: posthaste-bench sink --listen HOST:PORT [options]\n"
	      "  --listen HOST:PORT       address to accept SMTP on (repeatable)\n"
	      "  --workers N              worker threads, one per core (default: all CPUs)\n"
	      "  --delay CMD:MS           delay the reply at CMD by MS milliseconds\n"
	      "  --fail CMD:CODE:PERCENT  answer CODE (4xx/5xx) at CMD for PERCENT%% of tries\n"
	      "                           CMD: CONNECT EHLO MAIL RCPT DATA EOM (EOM = final reply)\n"
	      "  --fail-rcpt PATTERN:CODE answer CODE (4xx/5xx) to every RCPT whose address\n"
	      "                           contains PATTERN (case-sensitive substring)\n"
	      "  --max-size BYTES         message size limit (default 67108864)\n"
	      "  --max-recipients N       recipients per message (default 1000)\n"
	      "  --timeout SECONDS        command/data timeout (default 300/180)\n"
	      "  --hostname NAME          name in the greeting (default: the host's name)\n"
	      "  --max-connections N      connections per worker (default 16384); more get 421\n"
	      "  --tls CERT KEY           offer STARTTLS with this certificate and key (PEM files;\n"
	      "                           KEY may be the CERT file)\n"
	      "  --tls-implicit           with --tls: every --listen address takes TLS from the\n"
	      "                           first octet (RFC 8314) instead of offering STARTTLS\n"
	      "  --quiet                  log errors only\n"
	      "On SIGTERM or SIGINT it stops and prints one JSON line of counts.\n",
	      f);
}

static int parse_u64(const char *s, uint64_t *out)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || end == s || *end || *s == '-')
		return -EINVAL;
	*out = v;
	return 0;
}

int sink_main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"listen", required_argument, NULL, 'l'},
		{"workers", required_argument, NULL, 'w'},
		{"delay", required_argument, NULL, 'd'},
		{"fail", required_argument, NULL, 'f'},
		{"fail-rcpt", required_argument, NULL, 'R'},
		{"max-size", required_argument, NULL, 's'},
		{"max-recipients", required_argument, NULL, 'r'},
		{"timeout", required_argument, NULL, 't'},
		{"hostname", required_argument, NULL, 'H'},
		{"max-connections", required_argument, NULL, 'c'},
		{"quiet", no_argument, NULL, 'q'},
		{"help", no_argument, NULL, 'h'},
		{"tls", required_argument, NULL, 'T'},
		{"tls-implicit", no_argument, NULL, 'I'},
		{NULL, 0, NULL, 0},
	};
	const char *tls_cert = NULL, *tls_key = NULL;
	bool tls_implicit = false;
	struct sink_ctx ctx;
	memset(&ctx, 0, sizeof(ctx));
	struct smtp_server_config scfg;
	smtp_server_config_default(&scfg);
	struct net_config ncfg;
	net_config_default(&ncfg);
	const char *listens[8];
	unsigned nlistens = 0;
	uint64_t v;
	int opt;
	optind = 1;
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (opt) {
		case 'l':
			if (nlistens == ARRAY_SIZE(listens)) {
				fprintf(stderr, "sink: at most %zu --listen\n", ARRAY_SIZE(listens));
				return 2;
			}
			listens[nlistens++] = optarg;
			break;
		case 'w':
			if (parse_u64(optarg, &v) < 0 || v < 1 || v > 256) {
				fprintf(stderr, "sink: --workers takes 1..256\n");
				return 2;
			}
			ncfg.workers = (unsigned)v;
			break;
		case 'd': {
			const char *colon = strchr(optarg, ':');
			struct delay_rule *d = &ctx.delays[ctx.ndelays];
			if (ctx.ndelays == MAX_RULES || !colon ||
			    parse_stage(optarg, (size_t)(colon - optarg), &d->stage) < 0 ||
			    parse_u64(colon + 1, &v) < 0 || v > 600000) {
				fprintf(stderr, "sink: --delay takes CMD:MS (CMD one of CONNECT EHLO "
						"MAIL RCPT DATA EOM; MS <= 600000)\n");
				return 2;
			}
			d->ms = (unsigned)v;
			ctx.ndelays++;
			break;
		}
		case 'f': {
			char *c1 = strchr(optarg, ':');
			char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
			struct fail_rule *f = &ctx.fails[ctx.nfails];
			char *end = NULL;
			double pct = c2 ? strtod(c2 + 1, &end) : -1;
			unsigned long code = c1 ? strtoul(c1 + 1, NULL, 10) : 0;
			if (ctx.nfails == MAX_RULES || !c2 ||
			    parse_stage(optarg, (size_t)(c1 - optarg), &f->stage) < 0 ||
			    code < 400 || code > 599 || !end || *end || pct < 0 || pct > 100) {
				fprintf(stderr, "sink: --fail takes CMD:CODE:PERCENT (CODE 400..599, "
						"PERCENT 0..100)\n");
				return 2;
			}
			f->code = (unsigned)code;
			f->percent = pct;
			ctx.nfails++;
			break;
		}
		case 'R': {
			char *colon = strrchr(optarg, ':');
			if (ctx.nrcpt_fails == MAX_RULES || !colon || colon == optarg ||
			    parse_u64(colon + 1, &v) < 0 || v < 400 || v > 599) {
				fprintf(stderr, "sink: --fail-rcpt takes PATTERN:CODE (PATTERN not empty, "
						"CODE 400..599)\n");
				return 2;
			}
			*colon = '\0';
			ctx.rcpt_fails[ctx.nrcpt_fails].pattern = optarg;
			ctx.rcpt_fails[ctx.nrcpt_fails].code = (unsigned)v;
			ctx.nrcpt_fails++;
			break;
		}
		case 's':
			if (parse_u64(optarg, &v) < 0 || v < 1) {
				fprintf(stderr, "sink: --max-size takes a positive byte count\n");
				return 2;
			}
			scfg.max_message_size = v;
			break;
		case 'r':
			if (parse_u64(optarg, &v) < 0 || v < 1 || v > 100000) {
				fprintf(stderr, "sink: --max-recipients takes 1..100000\n");
				return 2;
			}
			scfg.max_recipients = (unsigned)v;
			break;
		case 't':
			if (parse_u64(optarg, &v) < 0 || v < 1 || v > 86400) {
				fprintf(stderr, "sink: --timeout takes 1..86400 seconds\n");
				return 2;
			}
			scfg.timeout_command_ms = scfg.timeout_data_ms = (unsigned)(v * 1000);
			break;
		case 'H':
			scfg.hostname = optarg;
			break;
		case 'c':
			if (parse_u64(optarg, &v) < 0 || v < 1 || v > 1000000) {
				fprintf(stderr, "sink: --max-connections takes 1..1000000\n");
				return 2;
			}
			ncfg.max_conns = (unsigned)v;
			break;
		case 'q':
			log_set_level(LOG_ERR);
			break;
		case 'T':
			/* --tls CERT KEY: the key is the next word */
			if (optind >= argc || argv[optind][0] == '-') {
				fprintf(stderr, "sink: --tls takes CERT KEY\n");
				return 2;
			}
			tls_cert = optarg;
			tls_key = argv[optind++];
			break;
		case 'I':
			tls_implicit = true;
			break;
		case 'h':
			sink_usage(stdout);
			return 0;
		default:
			sink_usage(stderr);
			return 2;
		}
	}
	if (optind < argc || !nlistens) {
		fprintf(stderr, "sink: %s\n", nlistens ? "unexpected argument" : "--listen is required");
		sink_usage(stderr);
		return 2;
	}
	if (tls_implicit && !tls_cert) {
		fprintf(stderr, "sink: --tls-implicit needs --tls CERT KEY\n");
		return 2;
	}

	struct tls_ctx *tls = NULL;
	if (tls_cert) {
		char terr[256];
		tls = tls_ctx_new_server(tls_cert, tls_key, NULL, terr, sizeof(terr));
		if (!tls) {
			fprintf(stderr, "sink: --tls: %s\n", terr);
			return 1;
		}
		/* implicit TLS: the session never offers STARTTLS (it would be inside TLS) */
		if (!tls_implicit)
			scfg.tls = tls;
	}

	struct net_worker_hooks hooks = {.init = worker_init, .arg = &ctx};
	struct net_engine *e = net_engine_new(&ncfg, &hooks);
	if (!e) {
		fprintf(stderr, "sink: cannot create the engine: %s\n", strerror(errno));
		return 1;
	}
	ctx.srv = smtp_server_new(&scfg, e);
	ctx.workers = aligned_alloc(CACHELINE, sizeof(*ctx.workers) * net_engine_workers(e));
	if (ctx.workers)
		memset(ctx.workers, 0, sizeof(*ctx.workers) * net_engine_workers(e));
	if (!ctx.srv || !ctx.workers) {
		fprintf(stderr, "sink: out of memory\n");
		return 1;
	}
	for (unsigned i = 0; i < nlistens; i++) {
		char host[128];
		unsigned short port;
		if (bench_parse_hostport(listens[i], host, sizeof(host), &port) < 0) {
			fprintf(stderr, "sink: bad --listen '%s' (want HOST:PORT or [V6]:PORT)\n",
				listens[i]);
			return 2;
		}
		int r = smtp_server_listen(ctx.srv, host, port);
		if (r < 0) {
			fprintf(stderr, "sink: cannot listen on %s: %s\n", listens[i], strerror(-r));
			return 1;
		}
		/* each smtp_server_listen adds one net listener, numbered in order */
		if (tls_implicit && (r = tls_listener_implicit(e, i, tls)) < 0) {
			fprintf(stderr, "sink: --tls-implicit on %s: %s\n", listens[i], strerror(-r));
			return 1;
		}
	}
	log_info("sink: listening with %u workers", net_engine_workers(e));
	int r = net_engine_run(e);

	struct smtp_server_stats st;
	smtp_server_stats(ctx.srv, &st);
	uint64_t fails = 0, delays = 0;
	for (unsigned i = 0; i < net_engine_workers(e); i++) {
		fails += ctx.workers[i].injected_failures;
		delays += ctx.workers[i].injected_delays;
	}
	printf("{\"messages\":%" PRIu64 ",\"recipients\":%" PRIu64 ",\"bytes\":%" PRIu64
	       ",\"connections\":%" PRIu64 ",\"injected_failures\":%" PRIu64
	       ",\"injected_delays\":%" PRIu64 ",\"rejected\":%" PRIu64 ",\"errors\":%" PRIu64
	       ",\"max_concurrent\":%" PRIu64 "}\n",
	       st.messages, st.recipients, st.bytes, st.connections, fails, delays, st.rejected,
	       st.errors, atomic_load(&ctx.max_concurrent));
	fflush(stdout);
	smtp_server_free(&ctx.srv);
	net_engine_free(&e);
	tls_ctx_free(&tls);
	free(ctx.workers);
	return r < 0 ? 1 : 0;
}
