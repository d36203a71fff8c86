/*
 * queue_cmd: `posthaste queue ...`, the queue tools. They read the spool
 * directly (queue/spool_scan.h), read-only and without its lock, so they work
 * with the daemon running or stopped.
 *
 *   posthaste queue list [--json] [--spool DIR | --config FILE]
 *   posthaste queue show ID [--spool DIR | --config FILE]
 *   posthaste queue hold|release|delete|flush ID      (not implemented yet)
 *
 * The spool directory: --spool, else --config FILE's spool_dir, else the
 * built-in default (ph_config_default).
 */
#ifndef POSTHASTE_MTA_POSTHASTE_QUEUE_CMD_H
#define POSTHASTE_MTA_POSTHASTE_QUEUE_CMD_H

/*
 * Runs the queue command; argv[0] is "queue", argv[1] the verb. Writes to
 * stdout/stderr and returns the process's exit status: 0 done, 1 failed (no
 * such message, unreadable spool or configuration), 2 bad usage or a verb not
 * implemented yet. Main thread only (uses getopt).
 */
int ph_queue_main(int argc, char **argv);

#endif
