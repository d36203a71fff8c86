/*
 * maildir: durable delivery of one message into a Maildir (docs/local-delivery.md).
 *
 * maildir_deliver creates <maildir>/{tmp,new,cur} when missing (mode 0700,
 * parents too, each new directory's parent fsync'ed), writes the message into
 * tmp/ under a unique name, fsyncs it, links it into new/ under the same name
 * (never replacing a file: link(2), or renameat2 RENAME_NOREPLACE where the
 * file system has no hard links; on EEXIST a new name is drawn), removes the
 * tmp/ name and fsyncs new/. When it returns 0 the message survives a crash.
 *
 * Names follow the modern Maildir scheme:
 *
 *   <secs>.M<usecs>P<pid>Q<n>.<host>,S=<size>
 *
 * secs/usecs the wall clock, n a per-process counter, host the host name
 * with '/' as \057 and ':' as \072, size the message's octets (every iovec).
 *
 * Errors: 0 or -errno. On error nothing is left in tmp/ or new/ by the call
 * (barring a failing unlink during clean-up). maildir_error_is_permanent and
 * maildir_error_status say which errors bounce and which defer.
 *
 * Threads: every function may be called from any number of threads at once;
 * the only shared state is an atomic counter and the host name, read once.
 */
#ifndef POSTHASTE_MTA_LOCAL_MAILDIR_H
#define POSTHASTE_MTA_LOCAL_MAILDIR_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/uio.h>

/* A buffer this large always holds a file name made by maildir_deliver. */
#define MAILDIR_NAME_MAX 256u

/*
 * Delivers the n iovecs (written in order, as given: usually the prefix of
 * maildir_prefix, then the message) into the Maildir at the path maildir
 * (absolute or relative to the working directory, shorter than PATH_MAX less
 * the name). When name_out is not NULL the file's name in new/ (without the
 * "new/") is copied into it, truncated to name_len - 1 octets and
 * NUL-terminated (MAILDIR_NAME_MAX is always enough).
 *
 * Returns 0, or -errno: -EINVAL (empty path, iov NULL with n > 0, size
 * overflow), -ENAMETOOLONG, -EEXIST (no free name after several tries), or
 * the error of the failing system call: -ENOSPC, -EDQUOT, -EFBIG, -EACCES,
 * -EROFS, -ENOTDIR, -EIO, -EMFILE ...
 */
int maildir_deliver(const char *maildir, const struct iovec *iov, unsigned n, char *name_out,
                    size_t name_len);

/*
 * Whether a maildir_deliver error (negative or positive errno) should bounce
 * the recipient rather than defer it: -EDQUOT (over quota) and -EFBIG (larger
 * than the file size limit), as Postfix and Dovecot do. Every other error is
 * temporary: a full disk, a permission or path mistake the administrator can
 * fix, an I/O error; the queue retries and bounces at the end of its lifetime.
 */
bool maildir_error_is_permanent(int err);

/*
 * The RFC 3463 enhanced status code for a maildir_deliver error: "5.2.2"
 * (mailbox full: EDQUOT, EFBIG), "4.3.1" (system storage: ENOSPC, ENOMEM,
 * EMFILE, ENFILE), "4.2.0" (mailbox unavailable: everything else).
 */
const char *maildir_error_status(int err);

/*
 * Builds the delivery header prefix
 *
 *   "Return-Path: <RETURN_PATH>\r\nDelivered-To: DELIVERED_TO\r\n"
 *
 * (rp_len 0 gives "Return-Path: <>", the null sender). Octets below 0x20 and
 * 0x7f in either address are written as '?', so no address can end the
 * header early. Returns the prefix's length (without NUL); when it is < cap
 * the prefix and a NUL are written into buf, else nothing is written and the
 * caller calls again with a larger buffer.
 */
size_t maildir_prefix(char *buf, size_t cap, const char *return_path, size_t rp_len,
                      const char *delivered_to, size_t dt_len);

#endif
