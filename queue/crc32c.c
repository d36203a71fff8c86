/*
 * CRC-32C: the SSE4.2 instruction when the CPU has it (three streams at once
 * for long buffers), slicing-by-8 otherwise.
 *
 * Slicing-by-8: table[k][b] is the CRC register after feeding octet b followed
 * by k zero octets into a zero register, so eight octets XORed into the
 * register fold into eight independent lookups.
 */
#include "queue/crc32c.h"

#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#if defined(__x86_64__)
#include <nmmintrin.h>
#define CRC32C_HAVE_SSE42 1
#endif

#include "core/compiler.h"

#define CRC32C_POLY 0x82F63B78u

typedef uint32_t (*crc32c_fn)(uint32_t crc, const void *data, size_t len);

/* Filled once (pthread_once), read-only afterwards. */
static uint32_t crc32c_table[8][256];
static pthread_once_t crc32c_table_once = PTHREAD_ONCE_INIT;

static void crc32c_table_init(void)
{
	for (unsigned n = 0; n < 256; n++) {
		uint32_t c = n;
		for (int i = 0; i < 8; i++)
			c = (c >> 1) ^ (CRC32C_POLY & (0u - (c & 1u)));
		crc32c_table[0][n] = c;
	}
	for (unsigned n = 0; n < 256; n++) {
		uint32_t c = crc32c_table[0][n];
		for (int k = 1; k < 8; k++) {
			c = (c >> 8) ^ crc32c_table[0][c & 0xff];
			crc32c_table[k][n] = c;
		}
	}
}

static inline uint64_t load_le64(const unsigned char *p)
{
	uint64_t v;

	memcpy(&v, p, sizeof(v));
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	v = __builtin_bswap64(v);
#endif
	return v;
}

uint32_t crc32c_sw(uint32_t crc, const void *data, size_t len)
{
	const unsigned char *p = data;
	uint32_t c = ~crc;

	pthread_once(&crc32c_table_once, crc32c_table_init);
	const uint32_t(*t)[256] = (const uint32_t(*)[256])crc32c_table;
	while (len >= 8) {
		uint64_t v = load_le64(p) ^ c;
		c = t[7][v & 0xff] ^ t[6][(v >> 8) & 0xff] ^ t[5][(v >> 16) & 0xff] ^
		    t[4][(v >> 24) & 0xff] ^ t[3][(v >> 32) & 0xff] ^ t[2][(v >> 40) & 0xff] ^
		    t[1][(v >> 48) & 0xff] ^ t[0][v >> 56];
		p += 8;
		len -= 8;
	}
	while (len--)
		c = (c >> 8) ^ t[0][(c ^ *p++) & 0xff];
	return ~c;
}

#ifdef CRC32C_HAVE_SSE42
/*
 * The crc32 instruction has a latency of three cycles and a throughput of one
 * per cycle: one dependent chain uses a third of it. So a long buffer is cut
 * into three streams of BLK octets, run as three independent chains, and
 * joined: the register after a ++ b is the register after a, moved over
 * BLK zero octets, XOR the register of b from zero (the register update is
 * linear). Moving over BLK zeros is itself linear, so it is four table
 * lookups (shift_*[k][octet k of the register]); the tables are made once,
 * from the images of the 32 one-bit registers.
 */
#define BLK_LONG  4096u /* octets per stream: rounds of 12 KiB */
#define BLK_SHORT 256u  /* rounds of 768 octets */

static uint32_t shift_long[4][256], shift_short[4][256];
static pthread_once_t shift_once = PTHREAD_ONCE_INIT;

__attribute__((target("sse4.2"))) static uint32_t zeros_raw(uint32_t c, size_t n)
{
	uint64_t r = c;
	for (; n >= 8; n -= 8)
		r = _mm_crc32_u64(r, 0);
	for (; n; n--)
		r = _mm_crc32_u8((uint32_t)r, 0);
	return (uint32_t)r;
}

static void shift_table_make(uint32_t t[4][256], size_t n)
{
	uint32_t bit[32];
	for (unsigned i = 0; i < 32; i++)
		bit[i] = zeros_raw(1u << i, n);
	for (unsigned k = 0; k < 4; k++)
		for (unsigned v = 0; v < 256; v++) {
			uint32_t x = 0;
			for (unsigned j = 0; j < 8; j++)
				if (v & (1u << j))
					x ^= bit[8 * k + j];
			t[k][v] = x;
		}
}

static void shift_tables_init(void)
{
	shift_table_make(shift_long, BLK_LONG);
	shift_table_make(shift_short, BLK_SHORT);
}

static inline uint32_t shift(const uint32_t t[4][256], uint32_t c)
{
	return t[0][c & 0xff] ^ t[1][(c >> 8) & 0xff] ^ t[2][(c >> 16) & 0xff] ^ t[3][c >> 24];
}

/* Rounds of 3 x blk octets from *pp while they fit; the raw register in and out. */
__attribute__((target("sse4.2"))) static inline uint64_t
crc3(uint64_t c, const unsigned char **pp, size_t *lenp, size_t blk, const uint32_t t[4][256])
{
	const unsigned char *p = *pp;
	size_t len = *lenp;
	while (len >= 3 * blk) {
		uint64_t c1 = 0, c2 = 0;
		const unsigned char *q = p + blk, *r = p + 2 * blk;
		for (size_t i = 0; i < blk; i += 8) {
			c = _mm_crc32_u64(c, load_le64(p + i));
			c1 = _mm_crc32_u64(c1, load_le64(q + i));
			c2 = _mm_crc32_u64(c2, load_le64(r + i));
		}
		c = shift(t, (uint32_t)c) ^ (uint32_t)c1;
		c = shift(t, (uint32_t)c) ^ (uint32_t)c2;
		p += 3 * blk;
		len -= 3 * blk;
	}
	*pp = p;
	*lenp = len;
	return c;
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_sse42(uint32_t crc, const void *data,
                                                               size_t len)
{
	const unsigned char *p = data;
	uint64_t c = ~crc;

	/* align the 8-octet loads (a load across a cache line costs more) */
	while (len && ((uintptr_t)p & 7)) {
		c = _mm_crc32_u8((uint32_t)c, *p++);
		len--;
	}
	if (len >= 3 * BLK_SHORT) {
		pthread_once(&shift_once, shift_tables_init);
		c = crc3(c, &p, &len, BLK_LONG, shift_long);
		c = crc3(c, &p, &len, BLK_SHORT, shift_short);
	}
	while (len >= 32) {
		c = _mm_crc32_u64(c, load_le64(p));
		c = _mm_crc32_u64(c, load_le64(p + 8));
		c = _mm_crc32_u64(c, load_le64(p + 16));
		c = _mm_crc32_u64(c, load_le64(p + 24));
		p += 32;
		len -= 32;
	}
	while (len >= 8) {
		c = _mm_crc32_u64(c, load_le64(p));
		p += 8;
		len -= 8;
	}
	while (len--)
		c = _mm_crc32_u8((uint32_t)c, *p++);
	return ~(uint32_t)c;
}
#endif

static crc32c_fn crc32c_pick(void)
{
#ifdef CRC32C_HAVE_SSE42
	__builtin_cpu_init();
	if (__builtin_cpu_supports("sse4.2"))
		return crc32c_sse42;
#endif
	return crc32c_sw;
}

/* NULL until the first call picks the implementation for the life of the process. */
static _Atomic(crc32c_fn) crc32c_impl;

static inline crc32c_fn crc32c_get(void)
{
	crc32c_fn f = atomic_load_explicit(&crc32c_impl, memory_order_relaxed);

	if (unlikely(!f)) {
		f = crc32c_pick(); /* racing threads pick the same one */
		atomic_store_explicit(&crc32c_impl, f, memory_order_relaxed);
	}
	return f;
}

uint32_t crc32c(uint32_t crc, const void *data, size_t len)
{
	return crc32c_get()(crc, data, len);
}

uint32_t crc32c_iov(uint32_t crc, const struct iovec *iov, unsigned n)
{
	crc32c_fn f = crc32c_get();

	for (unsigned i = 0; i < n; i++)
		crc = f(crc, iov[i].iov_base, iov[i].iov_len);
	return crc;
}

bool crc32c_hw(void)
{
#ifdef CRC32C_HAVE_SSE42
	return crc32c_get() == crc32c_sse42;
#else
	return false;
#endif
}
