/*
 * user_cmd: `posthaste user ...`, the tools that edit the users file
 * (mta/local/users.h, docs/local-delivery.md):
 *
 *   posthaste user add ADDRESS    [--users FILE | --config FILE] [--password-stdin]
 *   posthaste user passwd ADDRESS [--users FILE | --config FILE] [--password-stdin]
 *   posthaste user del ADDRESS    [--users FILE | --config FILE]
 *
 * The file: --users, else --config FILE's users_file, else the built-in
 * default's (none: an error). The password is read from the terminal without
 * echo (twice), or, with --password-stdin or when standard input is not a
 * terminal, as the first line of standard input. It is hashed with yescrypt
 * (SHA-512-crypt when libcrypt lacks it).
 *
 * The file is rewritten safely: the new text is checked with the users-file
 * parser, written to a temporary file in the same directory (mode 0600),
 * synced, renamed over the old one, and the directory synced; every other
 * line, comments included, is kept octet for octet. Concurrent runs are
 * serialised by a lock on the directory. The running daemon reads the file
 * at start only: restart it to use the change.
 */
#ifndef POSTHASTE_MTA_POSTHASTE_USER_CMD_H
#define POSTHASTE_MTA_POSTHASTE_USER_CMD_H

/*
 * Runs the user command; argv[0] is "user", argv[1] the verb. Returns the
 * process's exit status: 0 done, 1 failed (an existing address for add, a
 * missing one for passwd/del, an unreadable or invalid file, an I/O error),
 * 2 bad usage. Main thread only (uses getopt).
 */
int ph_user_main(int argc, char **argv);

#endif
