/*
 * ratelimit-t - the sliding-window arithmetic.
 */
#include "../../relayd/ratelimit.h"
#include "tap.h"

int main(void)
{
	struct ratelimit_window w = { 0 };
	ratelimit_set(&w, 10, 3600);
	time_t t0 = 1700000000 - 1700000000 % 3600; /* on an hour boundary */

	ok(ratelimit_allows(&w, t0, 10), "an empty window allows the whole limit");
	ok(!ratelimit_allows(&w, t0, 11), "but not more");
	ratelimit_add(&w, t0 + 3500, 10); /* 10 just before the boundary */
	is_int((long long)ratelimit_usage(&w, t0 + 3500), 10, "usage counted");
	ok(!ratelimit_allows(&w, t0 + 3600, 1), "no 2x at the window boundary (fixed windows would allow)");
	ok(!ratelimit_allows(&w, t0 + 3600 + 3000, 1), "still full 3000 s later");
	uint32_t wait = ratelimit_wait(&w, t0 + 3600, 1);
	ok(wait > 3400 - 60 && wait <= 3500, "wait until the burst leaves the window: %u s", wait);
	ok(ratelimit_allows(&w, t0 + 3500 + 3600, 10), "a full window later everything is free again");

	struct ratelimit_window m = { 0 };
	ratelimit_set(&m, 5, 60);
	for (int i = 0; i < 5; i++)
		ratelimit_add(&m, t0 + i * 10, 1);
	ok(!ratelimit_allows(&m, t0 + 45, 1), "5/minute full after 5");
	uint32_t mw = ratelimit_wait(&m, t0 + 45, 1);
	is_int(mw, 15, "the first one leaves 60 s after it was counted");
	ok(ratelimit_allows(&m, t0 + 60, 1), "one slot free after the first leaves");
	ok(!ratelimit_allows(&m, t0 + 60, 2), "but only one");
	is_int(ratelimit_wait(&m, t0 + 45, 6), 60, "more than the limit: a whole window");

	/* a take-back lands in the bucket it was counted in, whenever it comes, and never wraps */
	struct ratelimit_window b = { 0 };
	ratelimit_set(&b, 100, 3600);
	ratelimit_add(&b, t0 + 59, 7); /* the last second of the first 60 s bucket */
	ratelimit_take_back(&b, t0 + 59, 7);
	is_int((long long)ratelimit_usage(&b, t0 + 60), 0, "taken back from its own bucket: usage 0");
	ratelimit_add(&b, t0 + 59, 7);
	ratelimit_take_back(&b, t0 + 59, 9);
	is_int((long long)ratelimit_usage(&b, t0 + 60), 0, "more taken back than counted: 0, not a wrap");
	ratelimit_add(&b, t0 + 120, 5);
	ratelimit_take_back(&b, t0 + 120 + 3600, 5); /* same slot, a window later: another bucket */
	is_int((long long)ratelimit_usage(&b, t0 + 130), 5, "a take-back for another bucket leaves this one");
	is_int((long long)ratelimit_usage(&b, t0 + 3600 + 3599), 0, "and nothing is left once it leaves the window");
	ok(ratelimit_allows(&b, t0 + 3600 + 3599, 100), "the whole limit free again (no wrapped sum)");

	struct ratelimit_window u = { 0 };
	ratelimit_set(&u, 0, 60);
	ok(ratelimit_allows(&u, t0, 1000000), "limit 0 is unlimited");

	uint64_t lim;
	uint32_t win;
	ok(ratelimit_parse("100/hour", &lim, &win) == 0 && lim == 100 && win == 3600, "parse 100/hour");
	ok(ratelimit_parse("50M/day", &lim, &win) == 0 && lim == 50ull * 1024 * 1024 && win == 86400, "parse 50M/day");
	ok(ratelimit_parse("7/minute", &lim, &win) == 0 && lim == 7 && win == 60, "parse 7/minute");
	ok(ratelimit_parse("7/week", &lim, &win) < 0, "week refused");
	ok(ratelimit_parse("x/hour", &lim, &win) < 0, "non-number refused");
	char buf[64];
	ratelimit_format(100, 3600, buf, sizeof(buf));
	is_str(buf, "100/hour", "format");
	return done_testing();
}
