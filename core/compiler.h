/* Compiler helpers shared by every layer. No state, no I/O. */
#ifndef POSTHASTE_CORE_COMPILER_H
#define POSTHASTE_CORE_COMPILER_H

#include <stddef.h>

#define likely(x)   __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

#define CACHELINE 64
#define cache_aligned __attribute__((aligned(CACHELINE)))

#define printf_like(fmt, args) __attribute__((format(printf, fmt, args)))

#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
