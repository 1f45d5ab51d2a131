/*
 * ratelimit - sliding-window arithmetic (see ratelimit.h).
 * Invariant: slot i holds the bucket starting at slot_start[i]; a bucket belongs to the
 * current window when slot_start > now - window. Stale slots are ignored, then reused.
 */
#include "ratelimit.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "config.h"

static uint32_t ratelimit_slot_len(const struct ratelimit_window *w)
{
	uint32_t len = w->window / RATELIMIT_SLOTS;
	return len ? len : 1;
}

/* ratelimit_set - configure a window */
void ratelimit_set(struct ratelimit_window *w, uint64_t limit, uint32_t window)
{
	if (w->window != window) {
		memset(w->slot_start, 0, sizeof(w->slot_start));
		memset(w->count, 0, sizeof(w->count));
	}
	w->limit = limit;
	w->window = window;
}

/* a bucket still in the window; one ahead of now (counted before the clock stepped back) too,
 * so that a backward step does not give a user's limit back */
static bool ratelimit_live(const struct ratelimit_window *w, int i, time_t now)
{
	return w->count[i] && w->slot_start[i] > (int64_t)now - (int64_t)w->window;
}

/* ratelimit_usage - sum of live buckets */
uint64_t ratelimit_usage(const struct ratelimit_window *w, time_t now)
{
	uint64_t sum = 0;
	if (!w->window)
		return 0;
	for (int i = 0; i < RATELIMIT_SLOTS; i++)
		if (ratelimit_live(w, i, now))
			sum += w->count[i];
	return sum;
}

/* ratelimit_allows - room for n more? */
bool ratelimit_allows(const struct ratelimit_window *w, time_t now, uint64_t n)
{
	if (!w->limit)
		return true;
	return ratelimit_usage(w, now) + n <= w->limit;
}

/* the slot of time t's bucket, and that bucket's start */
static int ratelimit_bucket(const struct ratelimit_window *w, time_t t, int64_t *start)
{
	uint32_t len = ratelimit_slot_len(w);
	*start = (int64_t)t - (int64_t)t % len;
	return (int)((*start / len) % RATELIMIT_SLOTS);
}

/* ratelimit_add - count n units in the bucket of time t */
void ratelimit_add(struct ratelimit_window *w, time_t t, uint64_t n)
{
	int64_t start;
	if (!w->window)
		return;
	int i = ratelimit_bucket(w, t, &start);
	if (w->slot_start[i] != start) {
		w->slot_start[i] = start;
		w->count[i] = 0;
	}
	w->count[i] += n;
}

/* ratelimit_take_back - uncount n units counted at time t, from t's bucket only */
void ratelimit_take_back(struct ratelimit_window *w, time_t t, uint64_t n)
{
	int64_t start;
	if (!w->window)
		return;
	int i = ratelimit_bucket(w, t, &start);
	if (w->slot_start[i] == start)
		w->count[i] -= n < w->count[i] ? n : w->count[i];
}

/* ratelimit_wait - how long until n more fit: buckets leave the window oldest first */
uint32_t ratelimit_wait(const struct ratelimit_window *w, time_t now, uint64_t n)
{
	if (!w->limit || ratelimit_allows(w, now, n))
		return 0;
	if (n > w->limit)
		return w->window;
	uint64_t usage = ratelimit_usage(w, now);
	bool gone[RATELIMIT_SLOTS] = { false };
	for (int round = 0; round < RATELIMIT_SLOTS; round++) {
		int oldest = -1;
		for (int i = 0; i < RATELIMIT_SLOTS; i++)
			if (!gone[i] && ratelimit_live(w, i, now) &&
			    (oldest < 0 || w->slot_start[i] < w->slot_start[oldest]))
				oldest = i;
		if (oldest < 0)
			break;
		gone[oldest] = true;
		usage -= w->count[oldest];
		if (usage + n <= w->limit) {
			int64_t d = w->slot_start[oldest] + (int64_t)w->window - (int64_t)now;
			return d > 0 ? (uint32_t)d : 1;
		}
	}
	return w->window;
}

/* ratelimit_parse - "N/unit" */
int ratelimit_parse(const char *s, uint64_t *limit, uint32_t *window)
{
	char num[64];
	const char *slash = strchr(s, '/');
	if (!slash || (size_t)(slash - s) >= sizeof(num) || slash == s)
		return -1;
	memcpy(num, s, (size_t)(slash - s));
	num[slash - s] = '\0';
	long long v = config_parse_size(num);
	if (v < 0)
		return -1;
	const char *u = slash + 1;
	if (!strcasecmp(u, "minute") || !strcasecmp(u, "min") || !strcasecmp(u, "m"))
		*window = 60;
	else if (!strcasecmp(u, "hour") || !strcasecmp(u, "h"))
		*window = 3600;
	else if (!strcasecmp(u, "day") || !strcasecmp(u, "d"))
		*window = 86400;
	else
		return -1;
	*limit = (uint64_t)v;
	return 0;
}

/* ratelimit_format - the inverse of ratelimit_parse */
void ratelimit_format(uint64_t limit, uint32_t window, char *out, size_t outlen)
{
	const char *unit = window == 60 ? "minute" : window == 3600 ? "hour" : window == 86400 ? "day" : "s";
	if (!limit)
		snprintf(out, outlen, "unlimited");
	else if (!strcmp(unit, "s"))
		snprintf(out, outlen, "%llu/%us", (unsigned long long)limit, window);
	else
		snprintf(out, outlen, "%llu/%s", (unsigned long long)limit, unit);
}
