/* Monotonic and wall clocks. Header-only; safe from any thread. */
#ifndef POSTHASTE_CORE_CLOCK_H
#define POSTHASTE_CORE_CLOCK_H

#include <stdint.h>
#include <time.h>

/* Monotonic nanoseconds since an arbitrary origin. */
static inline uint64_t clock_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Monotonic milliseconds since an arbitrary origin. */
static inline uint64_t clock_ms(void)
{
	return clock_ns() / 1000000ull;
}

#endif
