/*
 * histogram: a latency histogram with log-linear buckets (as HdrHistogram):
 * every power of two is split into 128 equal sub-buckets, so a recorded value
 * is known to within 1/128 (< 0.8 %). Values are nanoseconds; values below
 * 256 ns are exact, values above HISTOGRAM_MAX_NS (100 s) are counted in the
 * top bucket and reported as the exact maximum seen.
 *
 * A histogram is about 32 KiB; recording is a few instructions and never
 * allocates. Histograms of different workers are merged after the workers
 * stopped. Not thread-safe: one owner thread at a time.
 */
#ifndef POSTHASTE_BENCH_HISTOGRAM_H
#define POSTHASTE_BENCH_HISTOGRAM_H

#include <stdint.h>

#define HISTOGRAM_MAX_NS (100ull * 1000000000ull)

struct histogram;

/* A new empty histogram, or NULL on allocation failure. */
struct histogram *histogram_new(void);
/* Frees *h and sets *h to NULL. Accepts NULL and *h == NULL. */
void histogram_free(struct histogram **h);
/* Empties h. */
void histogram_reset(struct histogram *h);

/* Records one value in nanoseconds. */
void histogram_record(struct histogram *h, uint64_t ns);
/* Adds every count of src to dst. */
void histogram_merge(struct histogram *dst, const struct histogram *src);

/* Number of recorded values. */
uint64_t histogram_count(const struct histogram *h);
/* Exact smallest / largest recorded value (0 when empty). */
uint64_t histogram_min(const struct histogram *h);
uint64_t histogram_max(const struct histogram *h);
/* Mean of the recorded values (exact sum / count; 0 when empty). */
double histogram_mean(const struct histogram *h);
/*
 * The value at percentile p (0 < p <= 100): the highest value equivalent to
 * the bucket holding the ceil(p/100 * count)-th smallest value, clamped to
 * [min, max]; so percentile 100 is the exact maximum. 0 when empty.
 */
uint64_t histogram_percentile(const struct histogram *h, double p);

#endif
