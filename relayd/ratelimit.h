/*
 * ratelimit - sliding-window counters for per-user limits (messages, recipients, bytes per
 * minute, hour or day) and per-IP connection rates.
 *
 * A window of W seconds is kept as RATELIMIT_SLOTS sub-buckets of W/RATELIMIT_SLOTS seconds;
 * the usage is the sum of the buckets that overlap the last W seconds. Unlike fixed windows
 * this never lets 2x the limit through around a window boundary: within any W seconds that
 * start on a bucket edge at most `limit` units are admitted.
 * The functions here are pure arithmetic on a struct (unit-tested); the registry of users
 * and IPs and the durable usage journal are in ratelimit.c as well, under their own names.
 */
#ifndef RELAYD_RATELIMIT_H
#define RELAYD_RATELIMIT_H

#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#define RATELIMIT_SLOTS 60

struct ratelimit_window {
	uint64_t limit;           /* 0 = unlimited */
	uint32_t window;          /* seconds */
	int64_t slot_start[RATELIMIT_SLOTS]; /* start time of the bucket in each slot */
	uint64_t count[RATELIMIT_SLOTS];
};

/* ratelimit_set - (re)configure; keeps counts when the window is unchanged */
void ratelimit_set(struct ratelimit_window *w, uint64_t limit, uint32_t window);
/* ratelimit_usage - units counted in the last window seconds */
uint64_t ratelimit_usage(const struct ratelimit_window *w, time_t now);
/* ratelimit_allows - would n more units stay within the limit? */
bool ratelimit_allows(const struct ratelimit_window *w, time_t now, uint64_t n);
/* ratelimit_add - count n units at time t (t may be in the past, within the window) */
void ratelimit_add(struct ratelimit_window *w, time_t t, uint64_t n);
/* ratelimit_take_back - uncount n units counted at time t (none if its bucket was reused; never
 * below zero) */
void ratelimit_take_back(struct ratelimit_window *w, time_t t, uint64_t n);
/* ratelimit_wait - seconds until n more units would be allowed (0 = now) */
uint32_t ratelimit_wait(const struct ratelimit_window *w, time_t now, uint64_t n);
/* ratelimit_parse - "100/hour" -> limit 100, window 3600; -1 if malformed. Units for bytes
 * take a size suffix: "50M/day" */
int ratelimit_parse(const char *s, uint64_t *limit, uint32_t *window);
/* ratelimit_format - "100/hour" */
void ratelimit_format(uint64_t limit, uint32_t window, char *out, size_t outlen);

#endif
