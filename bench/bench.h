/* posthaste-bench: the subcommands' entry points (bench/main.c dispatches). */
#ifndef POSTHASTE_BENCH_BENCH_H
#define POSTHASTE_BENCH_BENCH_H

/* argv[0] is the subcommand name. Return the process exit status. */
int sink_main(int argc, char **argv);
int send_main(int argc, char **argv);

/* Parses "HOST:PORT", "[v6]:PORT" or ":PORT" into host (NUL-terminated, hostlen bytes) and port. 0 or -EINVAL. */
int bench_parse_hostport(const char *s, char *host, unsigned hostlen, unsigned short *port);

#endif
