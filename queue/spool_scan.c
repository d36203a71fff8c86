/*
 * The read-only spool walk: see spool_scan.h. Segment discovery and the
 * record loop follow recover()/recover_segment() in spool.c, without their
 * side effects (no lock, no unlink).
 */
#include "queue/spool_scan.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/log.h"
#include "queue/record.h"
#include "queue/state.h"

struct seg {
	char *path;
	uint64_t seq; /* from the name; UINT64_MAX when it has none */
	bool newest;  /* the highest sequence of its worker directory */
};

struct seg_list {
	struct seg *v;
	size_t n, cap;
};

static void seg_list_free(struct seg_list *l)
{
	for (size_t i = 0; i < l->n; i++)
		free(l->v[i].path);
	free(l->v);
	l->v = NULL;
	l->n = l->cap = 0;
}

static int seg_list_add(struct seg_list *l, const char *dir, const char *name)
{
	if (l->n == l->cap) {
		size_t cap = l->cap ? l->cap * 2 : 16;
		struct seg *v = realloc(l->v, cap * sizeof(*v));
		if (!v)
			return -ENOMEM;
		l->v = v;
		l->cap = cap;
	}
	struct seg *s = &l->v[l->n];
	if (asprintf(&s->path, "%s/%s", dir, name) < 0)
		return -ENOMEM;
	char *end;
	errno = 0;
	unsigned long long seq = strtoull(name + 4, &end, 16);
	s->seq = end != name + 4 && !errno && !strcmp(end, ".log") ? seq : UINT64_MAX;
	s->newest = false;
	l->n++;
	return 0;
}

static int seg_cmp(const void *a, const void *b)
{
	const struct seg *x = a, *y = b;
	if (x->seq != y->seq)
		return x->seq < y->seq ? -1 : 1;
	return strcmp(x->path, y->path);
}

/* Adds the segments of one worker directory and marks its newest. */
static int list_worker(struct seg_list *l, const char *wdir, char *err, size_t errlen)
{
	DIR *d = opendir(wdir);
	if (!d) {
		if (errno == ENOENT || errno == ENOTDIR)
			return 0; /* not a directory, or gone */
		int e = errno;
		snprintf(err, errlen, "cannot open %s: %s", wdir, strerror(e));
		return -e;
	}
	size_t first = l->n;
	struct dirent *de;
	int r = 0;
	while ((de = readdir(d))) {
		if (strncmp(de->d_name, "seg-", 4) || !strstr(de->d_name, ".log"))
			continue;
		r = seg_list_add(l, wdir, de->d_name);
		if (r < 0) {
			snprintf(err, errlen, "out of memory");
			break;
		}
	}
	closedir(d);
	size_t newest = SIZE_MAX;
	for (size_t i = first; i < l->n; i++)
		if (l->v[i].seq != UINT64_MAX &&
		    (newest == SIZE_MAX || l->v[i].seq > l->v[newest].seq))
			newest = i;
	if (newest != SIZE_MAX)
		l->v[newest].newest = true;
	return r;
}

static int list_segments(const char *spool_dir, struct seg_list *l, char *err, size_t errlen)
{
	DIR *d = opendir(spool_dir);
	if (!d) {
		int e = errno;
		snprintf(err, errlen, "cannot open the spool directory %s: %s", spool_dir,
		         strerror(e));
		return -e;
	}
	struct dirent *de;
	int r = 0;
	while ((de = readdir(d))) {
		if (de->d_name[0] != 'w')
			continue;
		char *wdir;
		if (asprintf(&wdir, "%s/%s", spool_dir, de->d_name) < 0) {
			snprintf(err, errlen, "out of memory");
			r = -ENOMEM;
			break;
		}
		r = list_worker(l, wdir, err, errlen);
		free(wdir);
		if (r < 0)
			break;
	}
	closedir(d);
	if (r == 0 && l->n)
		qsort(l->v, l->n, sizeof(*l->v), seg_cmp);
	return r;
}

/* Maps one segment (NULL map with 0 for one to skip). 0 or -errno. */
static int seg_map(const struct seg *s, const uint8_t **map_r, size_t *len_r, char *err,
                   size_t errlen)
{
	*map_r = NULL;
	*len_r = 0;
	int fd = open(s->path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		if (errno == ENOENT)
			return 0; /* an empty segment the daemon removed meanwhile */
		int e = errno;
		snprintf(err, errlen, "cannot open %s: %s", s->path, strerror(e));
		return -e;
	}
	struct stat st;
	if (fstat(fd, &st) < 0) {
		int e = errno;
		snprintf(err, errlen, "cannot stat %s: %s", s->path, strerror(e));
		close(fd);
		return -e;
	}
	if (!S_ISREG(st.st_mode) || st.st_size < (off_t)SEGMENT_HEADER_SIZE) {
		close(fd); /* being created (its header not yet written), or not a file */
		return 0;
	}
	size_t len = (size_t)st.st_size;
	void *map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
	int e = errno;
	close(fd);
	if (map == MAP_FAILED) {
		snprintf(err, errlen, "cannot map %s: %s", s->path, strerror(e));
		return -e;
	}
	*map_r = map;
	*len_r = len;
	return 0;
}

struct found {
	uint64_t queue_id;
	uint64_t offset;
	size_t length;
	size_t seg;
	bool superseded; /* a later copy of the same id (compaction) was found */
};

/* Every segment's mapping and every message found, until the report is done. */
struct scan {
	const uint8_t **maps;
	size_t *lens;
	struct found *v;
	size_t n, cap;
	struct state_table states;
	bool oom;
};

static void found_add(struct scan *sc, size_t seg, const struct record *rec)
{
	if (sc->n == sc->cap) {
		size_t cap = sc->cap ? sc->cap * 2 : 256;
		struct found *v = realloc(sc->v, cap * sizeof(*v));
		if (!v) {
			sc->oom = true;
			return;
		}
		sc->v = v;
		sc->cap = cap;
	}
	sc->v[sc->n++] = (struct found){rec->queue_id, rec->offset, rec->length, seg, false};
}

static int found_cmp(const void *a, const void *b, void *arg)
{
	const struct found *v = arg;
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	if (v[x].queue_id != v[y].queue_id)
		return v[x].queue_id < v[y].queue_id ? -1 : 1;
	return x < y ? -1 : x > y;
}

/*
 * Compaction copies a message forward under the same id, and the daemon
 * removes the old segment only once the copy is durable: a scan in between
 * finds both. As recovery does, the copy found last (segments are read in
 * sequence order) is the message; the others are marked superseded.
 * false when out of memory.
 */
static bool mark_superseded(struct scan *sc)
{
	if (sc->n < 2)
		return true;
	if (sc->n > UINT32_MAX)
		return false;
	uint32_t *ix = malloc(sc->n * sizeof(*ix));
	if (!ix)
		return false;
	for (size_t i = 0; i < sc->n; i++)
		ix[i] = (uint32_t)i;
	qsort_r(ix, sc->n, sizeof(*ix), found_cmp, sc->v);
	for (size_t i = 0; i + 1 < sc->n; i++)
		if (sc->v[ix[i]].queue_id == sc->v[ix[i + 1]].queue_id)
			sc->v[ix[i]].superseded = true;
	free(ix);
	return true;
}

/* Reads the records of one mapped segment: keeps its messages and state records. */
static void seg_read(struct scan *sc, size_t si, const struct seg *s, const uint8_t *map,
                     size_t len)
{
	struct segment_header sh;
	if (segment_header_decode(map, len, &sh) < 0) {
		log_warn("spool: %s: not a segment (bad header); skipped", s->path);
		return;
	}
	if (sh.version >= 2 && s->seq != UINT64_MAX && sh.seq != s->seq) {
		/* its records are bound to the header's seq (record.h): the header is damaged */
		log_warn("spool: %s: the header's sequence is not the name's; skipped", s->path);
		return;
	}
	struct record_reader rr;
	record_reader_init_segment(&rr, &sh, SEGMENT_HEADER_SIZE);
	while (!sc->oom) {
		struct record rec;
		int r = record_next(&rr, map, len, &rec);
		if (r == 0)
			return;
		if (r == 1) {
			if (rec.type == RECORD_MESSAGE) {
				found_add(sc, si, &rec);
			} else if (rec.type == RECORD_STATE) {
				struct state_rec st;
				if (state_payload_decode_rec(rec.payload, rec.length, &st) == 0 &&
				    state_table_add_rec(&sc->states, rec.queue_id, &st) < 0)
					sc->oom = true;
			}
			continue;
		}
		uint64_t at = rec.offset;
		enum record_error why = rec.error;
		if (record_resync(&rr, map, len))
			log_warn("spool: %s: %s at offset %" PRIu64 "; skipped to offset %" PRIu64,
			         s->path, record_error_str(why), at, record_reader_offset(&rr));
		else {
			/* nothing valid after it: a torn tail, or damage up to the end */
			if (!(s->newest && why == RECORD_E_TORN))
				log_warn("spool: %s: %s at offset %" PRIu64 "; the rest skipped",
				         s->path, record_error_str(why), at);
			return;
		}
	}
}

/* Calls each for every message neither final nor unreadable. 0, or each's non-zero value. */
static int report(struct scan *sc, const struct seg_list *l,
                  int (*each)(void *arg, const struct spool_scan_item *it), void *arg)
{
	for (size_t i = 0; i < sc->n; i++) {
		const struct found *f = &sc->v[i];
		if (f->superseded)
			continue;
		enum spool_state st = state_table_lookup(&sc->states, f->queue_id);
		if (spool_state_final(st))
			continue;
		const struct seg *s = &l->v[f->seg];
		const uint8_t *payload = sc->maps[f->seg] + f->offset + RECORD_HEADER_SIZE;
		struct spool_message m;
		char why[256];
		if (spool_envelope_decode(payload, f->length, &m, why, sizeof(why)) < 0) {
			log_warn("spool: %s: message %016" PRIX64 " at offset %" PRIu64
			         ": %s; skipped",
			         s->path, f->queue_id, f->offset, why);
			continue;
		}
		struct spool_scan_item it = {
		    .queue_id = f->queue_id,
		    .segment = s->path,
		    .offset = f->offset,
		    .length = f->length,
		    .msg = &m,
		    .state = st,
		};
		const struct state_entry *se = state_table_find(&sc->states, f->queue_id);
		it.flags = se ? se->flags : 0;
		int stop = each(arg, &it);
		spool_message_free(&m);
		if (stop)
			return stop;
	}
	return 0;
}

int spool_scan(const char *spool_dir, int (*each)(void *arg, const struct spool_scan_item *it),
               void *arg, char *err, size_t errlen)
{
	struct seg_list l = {0};
	struct scan sc = {0};
	int r = list_segments(spool_dir, &l, err, errlen);
	if (r == 0 && l.n) {
		sc.maps = calloc(l.n, sizeof(*sc.maps));
		sc.lens = calloc(l.n, sizeof(*sc.lens));
		if (!sc.maps || !sc.lens)
			sc.oom = true;
	}
	for (size_t i = 0; r == 0 && !sc.oom && i < l.n; i++) {
		r = seg_map(&l.v[i], &sc.maps[i], &sc.lens[i], err, errlen);
		if (r == 0 && sc.maps[i])
			seg_read(&sc, i, &l.v[i], sc.maps[i], sc.lens[i]);
	}
	if (r == 0 && !sc.oom && !mark_superseded(&sc))
		sc.oom = true;
	if (r == 0 && sc.oom) {
		snprintf(err, errlen, "out of memory");
		r = -ENOMEM;
	}
	if (r == 0) {
		state_table_finish(&sc.states);
		r = report(&sc, &l, each, arg);
	}
	for (size_t i = 0; sc.maps && i < l.n; i++)
		if (sc.maps[i])
			munmap((void *)sc.maps[i], sc.lens[i]);
	free(sc.maps);
	free(sc.lens);
	free(sc.v);
	state_table_free(&sc.states);
	seg_list_free(&l);
	return r;
}
