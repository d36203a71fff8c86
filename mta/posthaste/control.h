/*
 * control: live queue control of the running daemon over a Unix socket (as
 * Postfix's postqueue/postsuper talk to the running system). The daemon
 * listens on the control socket (control_socket, default
 * SPOOL_DIR/control.sock; mode 0600). One request per connection, one line
 * of at most PH_CONTROL_LINE_MAX octets (LF or CRLF ended), one answer line:
 *
 *   request = ("hold" / "release" / "delete") SP target LF
 *           / "flush" [SP target] LF           ; no target: ALL
 *   target  = 16HEXDIG / "ALL"                 ; a queue id, or every message
 *   answer  = "ok" SP count LF                 ; messages changed
 *           / "error" SP reason LF             ; e.g. "no such message"
 *
 * A thread of its own accepts the connections and hands each request to every
 * worker through a per-worker mailbox (a locked list and an eventfd the worker
 * polls on its ring); each worker acts on the messages it owns
 * (relay_worker_control, or without delivery on the spool directly) and
 * posts its result back; the thread answers once every worker has (at most
 * PH_CONTROL_WAIT_MS). A state change is in the worker's group commit of the
 * turn that made it: the answer can come before it is on disk (a crash in
 * between loses the change, as it loses any state record not yet synced).
 *
 * Threads: ph_control_open/start/stop/close on the main thread (start after
 * the engine was created, before net_engine_run; stop after it returned);
 * ph_control_worker_* from the engine's worker hooks, on that worker.
 * Errors: 0 or -errno; constructors NULL with a readable reason.
 */
#ifndef POSTHASTE_MTA_POSTHASTE_CONTROL_H
#define POSTHASTE_MTA_POSTHASTE_CONTROL_H

#include <stddef.h>

#include "mta/posthaste/config.h"
#include "net/net.h"

#define PH_CONTROL_LINE_MAX    512  /* a request line, its LF included */
#define PH_CONTROL_READ_MS     3000 /* for the request line to arrive */
#define PH_CONTROL_WAIT_MS     5000 /* for every worker's result */
#define PH_CONTROL_SOCKET_NAME "control.sock"

struct ph_control;
struct spool_worker;
struct relay_worker;

/*
 * The control socket's path: cfg->control_socket when set, else
 * SPOOL/control.sock (spool: the spool directory in use; NULL for
 * cfg->spool_dir). 0, or -ENAMETOOLONG when it does not fit a socket
 * address (buf: at least 108 octets).
 */
int ph_control_path(const struct ph_config *cfg, const char *spool, char *buf, size_t len);

/*
 * Binds and listens on path (a stale socket there is unlinked first: call
 * this only with the spool's lock held, which rules out another live daemon),
 * created with mode 0600. nworkers: the engine's workers. NULL with err.
 */
struct ph_control *ph_control_open(const char *path, unsigned nworkers, char *err, size_t errlen);
/* Starts the thread that serves the socket. 0 or -errno. */
int ph_control_start(struct ph_control *c);
/* Stops the thread (within a moment: it never blocks without a timeout) and joins it. */
void ph_control_stop(struct ph_control *c);
/* Stops, closes and removes the socket; frees. Accepts NULL; sets *c to NULL. */
void ph_control_close(struct ph_control **c);

/*
 * From the worker init hook, after the spool's and relay's worker init:
 * arms the worker's mailbox. rw NULL without delivery: then the requests act
 * on sw directly (hold, release, delete; flush changes nothing) and the
 * spool's live-queue hook is installed here to know the worker's messages.
 */
int ph_control_worker_init(struct ph_control *c, struct net_worker *w, struct spool_worker *sw,
                           struct relay_worker *rw);
/* From the fini hook: requests still coming get "the daemon is shutting down". */
void ph_control_worker_fini(struct ph_control *c, struct net_worker *w);

#endif
