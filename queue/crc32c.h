/*
 * crc32c: CRC-32C (Castagnoli), as in iSCSI (RFC 3720), ext4 and SCTP:
 * reflected polynomial 0x82F63B78, initial value ~0, final xor ~0.
 *
 * Two implementations give the same results: the SSE4.2 crc32 instruction
 * (8 octets per step) and a portable slicing-by-8 table. The first call picks
 * the instruction when the CPU has it; that choice is kept for the life of
 * the process.
 *
 * Incremental use: pass 0 as crc for the first piece and the previous result
 * for each next one; chaining calls over pieces gives the same value as one
 * call over their concatenation.
 *
 * Thread-safety: every function may be called from any thread, concurrently.
 * No allocation, no I/O. data may be NULL when len is 0.
 */
#ifndef POSTHASTE_QUEUE_CRC32C_H
#define POSTHASTE_QUEUE_CRC32C_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

/* CRC-32C of len octets at data, continuing from crc (0 to start). */
uint32_t crc32c(uint32_t crc, const void *data, size_t len);

/* The same over n iovecs in order, as if concatenated (empty iovecs are fine). */
uint32_t crc32c_iov(uint32_t crc, const struct iovec *iov, unsigned n);

/* True when crc32c uses the SSE4.2 instruction on this machine. */
bool crc32c_hw(void);

/* The portable table implementation, whatever the CPU (for tests and benchmarks). */
uint32_t crc32c_sw(uint32_t crc, const void *data, size_t len);

#endif
