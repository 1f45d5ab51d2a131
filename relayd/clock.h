/*
 * clock - seconds on CLOCK_MONOTONIC (vDSO, no system call), for times that live in memory
 * only: session ages and latencies, lockouts, an upstream marked down, its pacing (rate=).
 * The wall clock (and libev's ev_now(), which follows it) jumps when NTP steps it; this one
 * does not.
 */
#ifndef RELAYD_CLOCK_H
#define RELAYD_CLOCK_H

#include <time.h>

/* clock_mono - seconds since an arbitrary start, with nanoseconds */
static inline double clock_mono(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* clock_mono_sec - the same in whole seconds */
static inline time_t clock_mono_sec(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec;
}

#endif
