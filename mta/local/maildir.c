/* Maildir delivery: see maildir.h for the contract and docs/local-delivery.md for the steps. */
#include "mta/local/maildir.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/compiler.h"

#define NAME_TRIES 8    /* fresh names drawn when one is taken */
#define HOST_MAX   128u /* octets of the escaped host name kept in a file name */
#define IOV_BATCH  64u  /* iovecs per writev */

/*
 * Process-wide state, the only kind this module has: the Q counter that makes
 * names unique within a microsecond, and the escaped host name.
 */
static _Atomic unsigned long maildir_counter;
static pthread_once_t host_once = PTHREAD_ONCE_INIT;
static char host_escaped[HOST_MAX + 1];

static void host_init(void)
{
	char h[256];
	size_t o = 0;

	if (gethostname(h, sizeof(h)) < 0 || !h[0])
		snprintf(h, sizeof(h), "localhost");
	h[sizeof(h) - 1] = '\0';
	for (const char *p = h; *p; p++) {
		const char *esc = *p == '/' ? "\\057" : *p == ':' ? "\\072" : NULL;
		size_t l = esc ? 4 : 1;
		if (o + l > HOST_MAX)
			break;
		if (esc)
			memcpy(host_escaped + o, esc, l);
		else
			host_escaped[o] = *p;
		o += l;
	}
	host_escaped[o] = '\0';
}

/* A fresh unique name into buf (MAILDIR_NAME_MAX octets). */
static void make_name(char *buf, size_t size)
{
	struct timespec ts;
	unsigned long q = atomic_fetch_add_explicit(&maildir_counter, 1, memory_order_relaxed);

	pthread_once(&host_once, host_init);
	clock_gettime(CLOCK_REALTIME, &ts);
	snprintf(buf, MAILDIR_NAME_MAX, "%lld.M%06ldP%ldQ%lu.%s,S=%zu", (long long)ts.tv_sec,
	         ts.tv_nsec / 1000, (long)getpid(), q, host_escaped, size);
}

/* fsync of the directory at path. 0 or -errno. */
static int fsync_dir_path(const char *path)
{
	int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	int rc = fsync(fd) < 0 ? -errno : 0;
	close(fd);
	return rc;
}

static int fsync_dir_at(int dfd, const char *name)
{
	int fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	int rc = fsync(fd) < 0 ? -errno : 0;
	close(fd);
	return rc;
}

/*
 * mkdir of buf (0700), then an fsync of its parent: also when it exists, since
 * another thread may have made it and not synced its parent yet (this runs
 * only for a Maildir that was missing). 0 or -errno.
 */
static int mkdir_one(char *buf)
{
	if (mkdir(buf, 0700) < 0 && errno != EEXIST)
		return -errno;
	char *slash = strrchr(buf, '/');
	if (!slash)
		return fsync_dir_path(".");
	if (slash == buf)
		return fsync_dir_path("/");
	*slash = '\0';
	int rc = fsync_dir_path(buf);
	*slash = '/';
	return rc;
}

/* mkdir -p path (every missing component 0700). 0 or -errno. */
static int mkdir_p(const char *path)
{
	char buf[PATH_MAX];
	size_t len = strlen(path);

	if (len >= sizeof(buf))
		return -ENAMETOOLONG;
	memcpy(buf, path, len + 1);
	for (size_t i = 1; i < len; i++) {
		if (buf[i] != '/' || buf[i - 1] == '/')
			continue;
		buf[i] = '\0';
		int rc = mkdir_one(buf);
		buf[i] = '/';
		if (rc < 0)
			return rc;
	}
	return mkdir_one(buf);
}

/*
 * tmp/, new/ and cur/ under dfd, made when missing, then dfd fsync'ed (even
 * when another thread made them: this runs only when one was missing).
 */
static int make_subdirs(int dfd)
{
	static const char *const sub[] = {"tmp", "new", "cur"};

	for (size_t i = 0; i < ARRAY_SIZE(sub); i++)
		if (mkdirat(dfd, sub[i], 0700) < 0 && errno != EEXIST)
			return -errno;
	return fsync(dfd) < 0 ? -errno : 0;
}

/* Writes every octet of the n iovecs to fd, in order. 0 or -errno. */
static int write_all(int fd, const struct iovec *iov, unsigned n)
{
	unsigned i = 0;
	size_t off = 0; /* octets of iov[i] already written */

	while (i < n) {
		struct iovec batch[IOV_BATCH];
		unsigned b = 0;
		for (unsigned j = i; j < n && b < IOV_BATCH; j++) {
			size_t skip = j == i ? off : 0;
			if (iov[j].iov_len == skip)
				continue;
			batch[b].iov_base = (char *)iov[j].iov_base + skip;
			batch[b].iov_len = iov[j].iov_len - skip;
			b++;
		}
		if (!b)
			return 0;
		ssize_t w = writev(fd, batch, (int)b);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return -errno;
		if (w == 0)
			return -EIO;
		size_t left = (size_t)w;
		while (i < n && left >= iov[i].iov_len - off) {
			left -= iov[i].iov_len - off;
			off = 0;
			i++;
		}
		off += left;
	}
	return 0;
}

/*
 * Gives the tmp/ file its new/ name without replacing anything. *moved is set
 * when the tmp/ name is gone (renameat2). 0 or -errno.
 */
static int publish(int dfd, const char *tmp, const char *dst, bool *moved)
{
	*moved = false;
	if (linkat(dfd, tmp, dfd, dst, 0) == 0)
		return 0;
	int e = errno;
	if (e != EPERM && e != EOPNOTSUPP && e != ENOSYS)
		return -e;
	/* no hard links on this file system (vfat, some FUSE): an atomic no-replace rename */
	if (renameat2(dfd, tmp, dfd, dst, RENAME_NOREPLACE) < 0)
		return errno == EINVAL ? -e : -errno;
	*moved = true;
	return 0;
}

int maildir_deliver(const char *maildir, const struct iovec *iov, unsigned n, char *name_out,
                    size_t name_len)
{
	char name[MAILDIR_NAME_MAX], tmp[MAILDIR_NAME_MAX + 4], dst[MAILDIR_NAME_MAX + 4];
	size_t size = 0;
	bool made = false, moved = false;
	int dfd, fd = -1, rc;

	if (name_out && name_len)
		name_out[0] = '\0';
	if (!maildir || !maildir[0] || (n && !iov))
		return -EINVAL;
	for (unsigned i = 0; i < n; i++) {
		if (size + iov[i].iov_len < size)
			return -EINVAL;
		size += iov[i].iov_len;
	}
	if (strlen(maildir) >= PATH_MAX - sizeof(tmp))
		return -ENAMETOOLONG;

	dfd = open(maildir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0 && errno == ENOENT) {
		rc = mkdir_p(maildir);
		if (rc < 0)
			return rc;
		dfd = open(maildir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	}
	if (dfd < 0)
		return -errno;

	/* 1. a fresh file in tmp/ */
	for (unsigned tries = 0;; tries++) {
		make_name(name, size);
		snprintf(tmp, sizeof(tmp), "tmp/%s", name);
		fd = openat(dfd, tmp,
		            O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY, 0600);
		if (fd >= 0)
			break;
		rc = -errno;
		if (rc == -ENOENT && !made) {
			made = true;
			rc = make_subdirs(dfd);
			if (rc < 0)
				goto out;
			continue;
		}
		if (rc == -EEXIST && tries + 1 < NAME_TRIES)
			continue;
		goto out;
	}

	/* 2. the octets, on disk */
	rc = write_all(fd, iov, n);
	if (!rc && fsync(fd) < 0)
		rc = -errno;
	if (close(fd) < 0 && !rc && errno != EINTR)
		rc = -errno;
	if (rc)
		goto unlink_tmp;

	/* 3. into new/, never over another file */
	snprintf(dst, sizeof(dst), "new/%s", name);
	for (unsigned tries = 0;; tries++) {
		rc = publish(dfd, tmp, dst, &moved);
		if (!rc)
			break;
		if (rc == -ENOENT && !made) {
			made = true;
			rc = make_subdirs(dfd);
			if (rc < 0)
				goto unlink_tmp;
			continue;
		}
		if (rc == -EEXIST && tries + 1 < NAME_TRIES) {
			make_name(name, size);
			snprintf(dst, sizeof(dst), "new/%s", name);
			continue;
		}
		goto unlink_tmp;
	}
	if (!moved)
		unlinkat(dfd, tmp, 0); /* delivered either way; a stale tmp/ file is harmless */

	/* 4. the new/ entry, on disk */
	rc = fsync_dir_at(dfd, "new");
	if (rc < 0) {
		unlinkat(dfd, dst, 0); /* not durable: report failure, leave nothing behind */
		goto out;
	}
	if (name_out && name_len)
		snprintf(name_out, name_len, "%s", name);
	goto out;

unlink_tmp:
	unlinkat(dfd, tmp, 0);
out:
	close(dfd);
	return rc;
}

bool maildir_error_is_permanent(int err)
{
	if (err < 0)
		err = -err;
	return err == EDQUOT || err == EFBIG;
}

const char *maildir_error_status(int err)
{
	if (err < 0)
		err = -err;
	switch (err) {
	case EDQUOT:
	case EFBIG:
		return "5.2.2";
	case ENOSPC:
	case ENOMEM:
	case EMFILE:
	case ENFILE:
		return "4.3.1";
	default:
		return "4.2.0";
	}
}

/* Appends [s, s + n) at *o, control octets as '?'. */
static void put_clean(char *buf, size_t *o, const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		buf[(*o)++] = c < 0x20 || c == 0x7f ? '?' : (char)c;
	}
}

size_t maildir_prefix(char *buf, size_t cap, const char *return_path, size_t rp_len,
                      const char *delivered_to, size_t dt_len)
{
	static const char rp1[] = "Return-Path: <", rp2[] = ">\r\nDelivered-To: ", dt2[] = "\r\n";
	size_t fixed = sizeof(rp1) - 1 + sizeof(rp2) - 1 + sizeof(dt2) - 1;

	if (rp_len > SIZE_MAX / 2 - fixed || dt_len > SIZE_MAX / 2)
		return SIZE_MAX;
	size_t need = fixed + rp_len + dt_len;
	if (need >= cap)
		return need;
	size_t o = 0;
	memcpy(buf + o, rp1, sizeof(rp1) - 1);
	o += sizeof(rp1) - 1;
	put_clean(buf, &o, return_path, rp_len);
	memcpy(buf + o, rp2, sizeof(rp2) - 1);
	o += sizeof(rp2) - 1;
	put_clean(buf, &o, delivered_to, dt_len);
	memcpy(buf + o, dt2, sizeof(dt2) - 1);
	o += sizeof(dt2) - 1;
	buf[o] = '\0';
	return need;
}
