/*
 * queue_cmd: `posthaste queue ...`, the queue tools. list and show read the
 * spool directly (queue/spool_scan.h), read-only and without its lock, so
 * they work with the daemon running or stopped. The verbs that change the
 * queue ask the running daemon over its control socket (control.h); when
 * nothing listens there, hold, release and delete change a stopped daemon's
 * spool themselves (under the spool's lock) and flush has nothing to do.
 *
 *   posthaste queue list [--json] [--spool DIR | --config FILE]
 *   posthaste queue show ID [--spool DIR | --config FILE]
 *   posthaste queue hold|release|delete ID...|ALL [--spool DIR | --config FILE]
 *   posthaste queue flush [ID...|ALL] [--spool DIR | --config FILE]
 *
 * The spool directory: --spool, else --config FILE's spool_dir, else the
 * built-in default (ph_config_default). The control socket: --config FILE's
 * control_socket when set, else SPOOL/control.sock.
 */
#ifndef POSTHASTE_MTA_POSTHASTE_QUEUE_CMD_H
#define POSTHASTE_MTA_POSTHASTE_QUEUE_CMD_H

/*
 * Runs the queue command; argv[0] is "queue", argv[1] the verb. Writes to
 * stdout/stderr and returns the process's exit status: 0 done, 1 failed (no
 * such message, a refused change, unreadable spool or configuration, no answer
 * from the daemon), 2 bad usage. Main thread only (uses getopt).
 */
int ph_queue_main(int argc, char **argv);

#endif
