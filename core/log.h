/*
 * Logging: one line per call to stderr, "LEVEL [component] message".
 *
 * Thread-safe (one write(2) per line). The level is process configuration,
 * set once at start-up before any worker starts.
 */
#ifndef POSTHASTE_CORE_LOG_H
#define POSTHASTE_CORE_LOG_H

#include <stdatomic.h>
#include <stdbool.h>

#include "core/compiler.h"

enum log_level { LOG_ERR = 0, LOG_WARN, LOG_INFO, LOG_DEBUG };

/* Sets the most verbose level printed (default LOG_INFO). Call before threads start. */
void log_set_level(enum log_level level);
enum log_level log_get_level(void);

/* Writes one line. Never fails (a failed write is ignored). */
void log_msg(enum log_level level, const char *fmt, ...) printf_like(2, 3);

/* A broken invariant: logs and aborts. Never returns. */
_Noreturn void panic(const char *fmt, ...) printf_like(1, 2);

#define log_err(...)   log_msg(LOG_ERR, __VA_ARGS__)
#define log_warn(...)  log_msg(LOG_WARN, __VA_ARGS__)
#define log_info(...)  log_msg(LOG_INFO, __VA_ARGS__)
#define log_debug(...)                                                                             \
	do {                                                                                       \
		if (unlikely(log_get_level() >= LOG_DEBUG))                                        \
			log_msg(LOG_DEBUG, __VA_ARGS__);                                           \
	} while (0)

/* Logs at most once per call site for the life of the process (e.g. a kernel fallback). */
#define log_once(level, ...)                                                                       \
	do {                                                                                       \
		static atomic_bool logged_once_;                                                   \
		if (!atomic_exchange_explicit(&logged_once_, true, memory_order_relaxed))          \
			log_msg(level, __VA_ARGS__);                                               \
	} while (0)

#endif
