/*
 * relay: the delivery side of the daemon. Each worker delivers the messages
 * its spool worker owns (queue/spool.h's live queue): shared nothing, no
 * locks, everything on the worker's io_uring loop.
 *
 * The path of a message:
 *
 *   spool (added) -> ready list or deferred heap -> active (record read,
 *   envelope decoded, recipients grouped by domain) -> per domain: local
 *   (Maildir), a route, the smarthost, or the domain's MX set (dns/) ->
 *   a site (one per distinct host list, so domains sharing MX hosts share
 *   connections and limits) -> a connection (mta/smtp/smtp_client) ->
 *   per-recipient results -> DELIVERED / BOUNCED (after a DSN is queued) /
 *   DEFERRED with exponential backoff and jitter, until the maximum age (one
 *   delay DSN once the message is delay_warning_time old).
 *
 * Limits per site (from the configuration of the domain that created it):
 * concurrent connections, a message rate and a connection rate (token
 * buckets), messages per connection, idle timeout. A site whose hosts all
 * fail to connect is backed off as a whole: its queued work is deferred and
 * new work waits until the back-off ends.
 *
 * Every outcome goes to the accounting log (docs/accounting.md).
 *
 * Threads: relay_new/relay_free on the main thread; the rest on the worker
 * that owns the relay_worker.
 */
#ifndef POSTHASTE_MTA_RELAY_RELAY_H
#define POSTHASTE_MTA_RELAY_RELAY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "mta/posthaste/config.h"
#include "net/net.h"
#include "queue/spool.h"

struct relay;
struct relay_worker;
struct users;

struct relay_stats {
	uint64_t delivered;   /* recipients delivered (remote 2xx or Maildir) */
	uint64_t deferred;    /* recipient attempts that failed temporarily */
	uint64_t bounced;     /* recipients failed permanently or expired */
	uint64_t dsns;        /* delivery status notifications queued */
	uint64_t messages_done; /* messages made final */
	uint64_t connections; /* outgoing connections opened */
	uint64_t attempts;    /* delivery attempts (message activations) */
};

/*
 * The relay for a daemon: cfg and users (may be NULL without local domains)
 * must outlive it. Opens the accounting log. NULL with err on failure.
 */
struct relay *relay_new(const struct ph_config *cfg, const char *hostname,
			const struct users *users, struct spool *sp, unsigned nworkers, char *err,
			size_t errlen);
void relay_free(struct relay **r);

/* From the engine's worker init hook, after spool_worker_init. 0 or -errno. */
int relay_worker_init(struct relay *r, struct net_worker *w);
/* From the turn_end hook, before spool_worker_turn_end. */
void relay_worker_turn_end(struct relay_worker *rw);
/* From the fini hook, before spool_worker_fini. */
void relay_worker_fini(struct relay_worker *rw);
struct relay_worker *relay_worker(struct relay *r, unsigned index);

/* Logs a reception to the accounting log (the SMTP side, after the 250). */
void relay_log_reception(struct relay_worker *rw, uint64_t queue_id, const char *message_id,
			 size_t message_id_len, const char *sender, size_t sender_len,
			 unsigned nrcpts, uint64_t size, const char *peer);

/* Whether local delivery knows this address (RCPT-time check). */
bool relay_local_domain(const struct relay *r, const char *domain, size_t len);
bool relay_local_user(const struct relay *r, const char *addr, size_t len);

enum relay_ctl {
	RELAY_CTL_HOLD = 1, /* queued or deferred -> on hold */
	RELAY_CTL_RELEASE,  /* on hold -> queued, due now */
	RELAY_CTL_DELETE,   /* gone for good (no bounce), from any state but active */
	RELAY_CTL_FLUSH,    /* deferred -> due now; destinations' back-off forgotten */
	RELAY_CTL_FLUSH_ALL, /* every deferred message (id ignored) */
};

/*
 * Queue control on the worker that owns the message (the control socket's
 * thread posts it there). id RELAY_CTL_ALL: every live message of the worker
 * (those being delivered are skipped). 0 (for ALL and FLUSH_ALL: how many
 * were changed), or -ENOENT
 * (not a live message of this worker), -EALREADY (held already), -EINVAL
 * (release of a message not on hold), -EBUSY (a delivery attempt is under
 * way: try again in a moment), -ENOMEM.
 */
#define RELAY_CTL_ALL UINT64_MAX
int relay_worker_control(struct relay_worker *rw, enum relay_ctl op, uint64_t id);

/* Summed counters (after the engine stopped). */
void relay_stats(const struct relay *r, struct relay_stats *out);

#include "mta/relay/header.h" /* relay_find_message_id */

#endif
