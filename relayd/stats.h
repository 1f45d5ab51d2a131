/*
 * stats - process-wide counters, gauges and latency histograms, rendered as key=value text (relayctl stats)
 * or Prometheus text format (the metrics listener). Loop thread only.
 */
#ifndef RELAYD_STATS_H
#define RELAYD_STATS_H

#include <stdbool.h>
#include <stdint.h>

#include "buf.h"

enum stats_counter {
	ST_CONNECTIONS, ST_CONN_REFUSED, ST_TLS_OK, ST_TLS_FAIL, ST_AUTH_OK, ST_AUTH_FAIL, ST_AUTH_CACHED,
	ST_ACCEPTED, ST_ACCEPTED_BYTES, ST_REJECTED,
	ST_NCOUNTERS
};

/* latency histograms (Prometheus buckets, le in seconds) */
enum stats_hist {
	SH_ACCEPT_TO_250, /* accept() of a connection to the 250 of its first message */
	SH_COMMIT,        /* the final dot (or BDAT LAST) to its 250: the durable write */
	SH_NHIST
};
#define STATS_HIST_NBUCKETS 22 /* the last one is +Inf */
extern const double stats_hist_le[STATS_HIST_NBUCKETS - 1];

/* stats_inc - add n to a counter */
void stats_inc(enum stats_counter c, uint64_t n);
/* stats_get - a counter's value */
uint64_t stats_get(enum stats_counter c);
/* stats_observe - count one duration in seconds */
void stats_observe(enum stats_hist h, double seconds);
/* stats_hist_quantile - the q-quantile (0 < q <= 1) of a histogram's per-bucket counts, in
 * seconds: linear inside the bucket that holds the rank, as Prometheus' histogram_quantile
 * estimates it; the largest finite bound when the rank is in +Inf; 0 when empty */
double stats_hist_quantile(const uint64_t counts[STATS_HIST_NBUCKETS], double q);
/* stats_add_section - another module's lines (gauges, per-upstream, per-user) */
void stats_add_section(void (*fn)(struct buf *out, bool prometheus));
/* stats_kv_prometheus - turn a section's "key=value" lines into metric families, each with
 * its HELP and TYPE: the keys stats.c knows get their type, name (counters end in _total)
 * and unit (seconds); other numeric keys become gauges named relayd_<prefix>_<key>.
 * "upstream.N.key=value" lines become relayd_upstream_<key>{upstream="<upstream.N.name>"},
 * rendered family by family (every upstream's line of one key together), and
 * upstream.N.state=up|down becomes relayd_upstream_up 1|0 */
void stats_kv_prometheus(const char *kv, const char *prefix, struct buf *out);
/* stats_render - everything, as key=value lines or Prometheus exposition text */
void stats_render(struct buf *out, bool prometheus);

#endif
