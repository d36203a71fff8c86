/* posthaste-bench: SMTP load generator (send) and discarding server (sink). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench.h"

int bench_parse_hostport(const char *s, char *host, unsigned hostlen, unsigned short *port)
{
	const char *colon;
	const char *h = s;
	size_t hl;
	if (*s == '[') {
		const char *end = strchr(s, ']');
		if (!end || end[1] != ':')
			return -EINVAL;
		h = s + 1;
		hl = (size_t)(end - h);
		colon = end + 1;
	} else {
		colon = strrchr(s, ':');
		if (!colon)
			return -EINVAL;
		hl = (size_t)(colon - s);
	}
	if (hl >= hostlen)
		return -EINVAL;
	char *end;
	errno = 0;
	unsigned long p = strtoul(colon + 1, &end, 10);
	if (errno || *end || end == colon + 1 || p > 65535)
		return -EINVAL;
	memcpy(host, h, hl);
	host[hl] = '\0';
	if (!hl)
		snprintf(host, hostlen, "0.0.0.0");
	*port = (unsigned short)p;
	return 0;
}

static void usage(FILE *f)
{
	fputs("usage: posthaste-bench sink --listen HOST:PORT [options]   (sink --help)\n"
	      "       posthaste-bench send --server HOST:PORT [options]   (send --help)\n",
	      f);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		usage(stderr);
		return 2;
	}
	if (!strcmp(argv[1], "sink"))
		return sink_main(argc - 1, argv + 1);
	if (!strcmp(argv[1], "send"))
		return send_main(argc - 1, argv + 1);
	if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
		usage(stdout);
		return 0;
	}
	fprintf(stderr, "posthaste-bench: unknown subcommand '%s'\n", argv[1]);
	usage(stderr);
	return 2;
}
