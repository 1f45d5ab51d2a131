/*
 * stats-t - the latency histograms: bucketing, the quantile estimate, and both renderings;
 * a section's key=value lines as Prometheus families (types, units, grouping, label escaping).
 */
#include <stdlib.h>
#include <string.h>

#include "../../relayd/stats.h"
#include "tap.h"

static bool near(double a, double b)
{
	return a - b < 1e-9 && b - a < 1e-9;
}

static void quantiles(void)
{
	uint64_t c[STATS_HIST_NBUCKETS] = { 0 };
	ok(stats_hist_quantile(c, 0.99) == 0, "an empty histogram's p99 is 0");
	c[1] = 100; /* 100 values in (0.5 ms, 1 ms] */
	ok(near(stats_hist_quantile(c, 0.5), 0.00075), "p50 is the middle of the only bucket: %g",
	   stats_hist_quantile(c, 0.5));
	ok(near(stats_hist_quantile(c, 1.0), 0.001), "p100 is its upper bound");
	c[7] = 100; /* and 100 in (7.5 ms, 10 ms] */
	ok(near(stats_hist_quantile(c, 0.5), 0.001), "half of 200 ends the first bucket");
	ok(near(stats_hist_quantile(c, 0.99), 0.0075 + 0.0025 * 98 / 100), "p99 interpolates inside (7.5, 10] ms: %g",
	   stats_hist_quantile(c, 0.99));
	c[STATS_HIST_NBUCKETS - 1] = 10000; /* most values beyond the last bound */
	ok(near(stats_hist_quantile(c, 0.99), stats_hist_le[STATS_HIST_NBUCKETS - 2]),
	   "a rank in +Inf gives the largest finite bound");
}

/* two upstreams, the second with a name that needs escaping: every upstream family is one
 * group after its HELP and TYPE; counters end in _total; milliseconds become seconds */
static void kv_sections(void)
{
	const char *kv = "forwarded=3\ncredential_sets=2\nnot_a_number=x\n"
			 "upstream.0.name=a:25\nupstream.0.state=up\nupstream.0.messages=5\nupstream.0.latency_last_ms=250\n"
			 "upstream.1.name=b\"\\:25\nupstream.1.state=down\nupstream.1.messages=0\nupstream.1.latency_last_ms=0\n";
	const char *want =
		"# HELP relayd_forward_forwarded_total Messages delivered to every recipient and removed from the queue\n"
		"# TYPE relayd_forward_forwarded_total counter\nrelayd_forward_forwarded_total 3\n"
		"# HELP relayd_forward_credential_sets Client TLS credential sets held now\n"
		"# TYPE relayd_forward_credential_sets gauge\nrelayd_forward_credential_sets 2\n"
		"# HELP relayd_upstream_up 1 when the upstream is up, 0 while it is marked down\n"
		"# TYPE relayd_upstream_up gauge\n"
		"relayd_upstream_up{upstream=\"a:25\"} 1\nrelayd_upstream_up{upstream=\"b\\\"\\\\:25\"} 0\n"
		"# HELP relayd_upstream_messages_total Messages the upstream accepted for at least one recipient\n"
		"# TYPE relayd_upstream_messages_total counter\n"
		"relayd_upstream_messages_total{upstream=\"a:25\"} 5\n"
		"relayd_upstream_messages_total{upstream=\"b\\\"\\\\:25\"} 0\n"
		"# HELP relayd_upstream_latency_last_seconds Time of the last transaction on the upstream (millisecond "
		"resolution)\n# TYPE relayd_upstream_latency_last_seconds gauge\n"
		"relayd_upstream_latency_last_seconds{upstream=\"a:25\"} 0.25\n"
		"relayd_upstream_latency_last_seconds{upstream=\"b\\\"\\\\:25\"} 0\n";
	struct buf out = { 0 };
	stats_kv_prometheus(kv, "forward", &out);
	is_str(out.data, want, "key=value section: families grouped, typed, in seconds, labels escaped");
	buf_free(&out);
}

int main(void)
{
	quantiles();
	kv_sections();

	stats_observe(SH_COMMIT, 0.0005);  /* on a bound: that bucket (le is "less or equal") */
	stats_observe(SH_COMMIT, 0.0012);
	stats_observe(SH_COMMIT, 0.0012);
	stats_observe(SH_COMMIT, 120);     /* beyond every bound */
	stats_observe(SH_ACCEPT_TO_250, -1); /* a clock step never makes a negative bucket */
	struct buf out = { 0 };
	stats_render(&out, true);
	const char *p = out.data;
	ok(strstr(p, "# TYPE relayd_commit_seconds histogram\n") != NULL, "commit is a Prometheus histogram");
	ok(strstr(p, "relayd_commit_seconds_bucket{le=\"0.0005\"} 1\n") != NULL, "le=0.0005 holds the value on the bound");
	ok(strstr(p, "relayd_commit_seconds_bucket{le=\"0.001\"} 1\n") != NULL, "le=0.001: nothing more");
	ok(strstr(p, "relayd_commit_seconds_bucket{le=\"0.002\"} 3\n") != NULL, "le=0.002 is cumulative: 3");
	ok(strstr(p, "relayd_commit_seconds_bucket{le=\"60\"} 3\n") != NULL, "le=60: still 3");
	ok(strstr(p, "relayd_commit_seconds_bucket{le=\"+Inf\"} 4\n") != NULL, "+Inf counts all 4");
	ok(strstr(p, "relayd_commit_seconds_count 4\n") != NULL, "count 4");
	ok(strstr(p, "relayd_commit_seconds_sum 120.002900\n") != NULL, "sum of the values");
	ok(strstr(p, "relayd_accept_to_250_seconds_bucket{le=\"0.0005\"} 1\n") != NULL, "a negative duration counts as 0");
	buf_free(&out);
	stats_render(&out, false);
	p = out.data;
	ok(strstr(p, "\ncommit_count=4\n") != NULL, "key=value: commit_count");
	ok(strstr(p, "\ncommit_p50_ms=1.50\n") != NULL, "key=value: p50 in ms (rank 2 of 4: halfway into (1, 2] ms)");
	ok(strstr(p, "\naccept_to_250_count=1\n") != NULL, "key=value: accept_to_250_count");
	buf_free(&out);
	return done_testing();
}
