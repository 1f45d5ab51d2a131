/*
 * stats - counters and their rendering. Prometheus names are relayd_<name>_total for
 * counters; sections add their own families with # HELP and # TYPE lines.
 * Invariants of the Prometheus text (exposition format 0.0.4): each family is one group of
 * samples after its HELP and TYPE; what only grows is a counter named ..._total; durations
 * are in seconds; label values are escaped.
 */
#include "stats.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STATS_MAX_SECTIONS 8

static uint64_t stats_counters[ST_NCOUNTERS];
static void (*stats_sections[STATS_MAX_SECTIONS])(struct buf *, bool);
static int stats_nsections;

const double stats_hist_le[STATS_HIST_NBUCKETS - 1] = {
	0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
	0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
};

static struct {
	uint64_t counts[STATS_HIST_NBUCKETS];
	uint64_t n;
	double sum;
} stats_hists[SH_NHIST];

/* a metric's name (relayd_<name>...) and its # HELP text */
struct stats_name {
	const char *name;
	const char *help;
};

static const struct stats_name stats_hist_names[SH_NHIST] = {
	[SH_ACCEPT_TO_250] = { "accept_to_250", "From a connection's accept to the 250 of its first message" },
	[SH_COMMIT] = { "commit", "From the end of a message's data to its 250 (written and synced to the queue)" },
};

static const struct stats_name stats_names[ST_NCOUNTERS] = {
	[ST_CONNECTIONS] = { "connections", "Client connections accepted" },
	[ST_CONN_REFUSED] = { "connections_refused", "Client connections refused by per-IP or session limits" },
	[ST_TLS_OK] = { "tls_handshakes", "Server-side TLS handshakes completed" },
	[ST_TLS_FAIL] = { "tls_failures", "Server-side TLS handshakes failed" },
	[ST_AUTH_OK] = { "auth_success", "Successful AUTH" },
	[ST_AUTH_FAIL] = { "auth_failures", "Failed AUTH" },
	[ST_AUTH_CACHED] = { "auth_cached", "Successful AUTH answered by the verified-credential cache (no password hash)" },
	[ST_ACCEPTED] = { "messages_accepted", "Messages committed to the queue (250 sent)" },
	[ST_ACCEPTED_BYTES] = { "bytes_accepted", "Bytes of messages committed to the queue" },
	[ST_REJECTED] = { "messages_rejected", "Transactions refused (policy, content, limits), one per refusal reply: "
			  "MAIL (sender, SIZE=, rate, storage), RCPT (rate) or the message (content, From:, size, rate, "
			  "storage)" },
};

/* stats_inc - count */
void stats_inc(enum stats_counter c, uint64_t n)
{
	stats_counters[c] += n;
}

/* stats_get - read */
uint64_t stats_get(enum stats_counter c)
{
	return stats_counters[c];
}

/* stats_observe - one duration into its bucket */
void stats_observe(enum stats_hist h, double seconds)
{
	if (seconds < 0)
		seconds = 0;
	int b = 0;
	while (b < STATS_HIST_NBUCKETS - 1 && seconds > stats_hist_le[b])
		b++;
	stats_hists[h].counts[b]++;
	stats_hists[h].n++;
	stats_hists[h].sum += seconds;
}

/* stats_hist_quantile - estimate from bucket counts */
double stats_hist_quantile(const uint64_t counts[STATS_HIST_NBUCKETS], double q)
{
	uint64_t n = 0;
	for (int b = 0; b < STATS_HIST_NBUCKETS; b++)
		n += counts[b];
	if (n == 0)
		return 0;
	double rank = q * (double)n, below = 0;
	for (int b = 0; b < STATS_HIST_NBUCKETS - 1; b++) {
		if (counts[b] && below + (double)counts[b] >= rank) {
			double lo = b ? stats_hist_le[b - 1] : 0, hi = stats_hist_le[b];
			return lo + (hi - lo) * (rank - below) / (double)counts[b];
		}
		below += (double)counts[b];
	}
	return stats_hist_le[STATS_HIST_NBUCKETS - 2];
}

static void stats_render_hist(struct buf *out, bool prometheus, enum stats_hist h)
{
	const char *name = stats_hist_names[h].name;
	if (!prometheus) {
		buf_printf(out, "%s_count=%llu\n%s_p50_ms=%.2f\n%s_p99_ms=%.2f\n", name,
			   (unsigned long long)stats_hists[h].n, name,
			   stats_hist_quantile(stats_hists[h].counts, 0.50) * 1000, name,
			   stats_hist_quantile(stats_hists[h].counts, 0.99) * 1000);
		return;
	}
	buf_printf(out, "# HELP relayd_%s_seconds %s\n# TYPE relayd_%s_seconds histogram\n", name,
		   stats_hist_names[h].help, name);
	uint64_t cum = 0;
	for (int b = 0; b < STATS_HIST_NBUCKETS - 1; b++) {
		cum += stats_hists[h].counts[b];
		buf_printf(out, "relayd_%s_seconds_bucket{le=\"%g\"} %llu\n", name, stats_hist_le[b],
			   (unsigned long long)cum);
	}
	buf_printf(out, "relayd_%s_seconds_bucket{le=\"+Inf\"} %llu\nrelayd_%s_seconds_sum %.6f\n"
		   "relayd_%s_seconds_count %llu\n", name, (unsigned long long)stats_hists[h].n, name,
		   stats_hists[h].sum, name, (unsigned long long)stats_hists[h].n);
}

/* stats_add_section - register a renderer */
void stats_add_section(void (*fn)(struct buf *out, bool prometheus))
{
	if (stats_nsections < STATS_MAX_SECTIONS)
		stats_sections[stats_nsections++] = fn;
}

/* stats_render - all counters and sections */
void stats_render(struct buf *out, bool prometheus)
{
	for (int i = 0; i < ST_NCOUNTERS; i++) {
		if (prometheus)
			buf_printf(out, "# HELP relayd_%s_total %s\n# TYPE relayd_%s_total counter\nrelayd_%s_total %llu\n",
				   stats_names[i].name, stats_names[i].help, stats_names[i].name, stats_names[i].name,
				   (unsigned long long)stats_counters[i]);
		else
			buf_printf(out, "%s=%llu\n", stats_names[i].name, (unsigned long long)stats_counters[i]);
	}
	for (int h = 0; h < SH_NHIST; h++)
		stats_render_hist(out, prometheus, (enum stats_hist)h);
	for (int i = 0; i < stats_nsections; i++)
		stats_sections[i](out, prometheus);
}

/* how a section's key=value line reads as a Prometheus metric: key is "<prefix>_<key>", or
 * "upstream_<key>" for the per-upstream "upstream.N.<key>" lines. The section's keys are the
 * relayctl stats names; what only grows is a counter named ..._total, durations are seconds */
struct stats_kv_metric {
	const char *key;
	const char *name;  /* relayd_<name> */
	const char *type;
	double scale;      /* the value times this (milliseconds to seconds); 0 keeps it as it is */
	const char *help;
};

static const struct stats_kv_metric stats_kv_metrics[] = {
	{ "forward_queued", "forward_queued", "gauge", 0, "Messages in the forwarder's queue now" },
	{ "forward_deferred", "forward_deferred", "gauge", 0, "Queued messages waiting to retry after a failed attempt" },
	{ "forward_active", "forward_active", "gauge", 0, "Messages being sent to an upstream now" },
	{ "forward_waiting", "forward_waiting", "gauge", 0, "Messages waiting for a session to an upstream now" },
	{ "forward_forwarded", "forward_forwarded_total", "counter", 0,
	  "Messages delivered to every recipient and removed from the queue" },
	{ "forward_bounced", "forward_bounced_total", "counter", 0,
	  "Messages removed with a bounce to their sender for failed recipients" },
	{ "forward_dropped", "forward_dropped_total", "counter", 0, "Bounces that could not be delivered, dropped" },
	{ "forward_rcpt_delivered", "forward_rcpt_delivered_total", "counter", 0, "Recipients accepted by an upstream" },
	{ "forward_rcpt_failed", "forward_rcpt_failed_total", "counter", 0,
	  "Recipients failed for good (refused by an upstream or expired)" },
	{ "forward_deferrals", "forward_deferrals_total", "counter", 0, "Delivery attempts that ended in a later retry" },
	{ "forward_credential_sets", "forward_credential_sets", "gauge", 0, "Client TLS credential sets held now" },
	{ "upstream_state", "upstream_up", "gauge", 0, "1 when the upstream is up, 0 while it is marked down" },
	{ "upstream_connections", "upstream_connections", "gauge", 0, "Sessions open to the upstream now" },
	{ "upstream_waiting", "upstream_waiting", "gauge", 0, "Messages waiting for a session to the upstream now" },
	{ "upstream_messages", "upstream_messages_total", "counter", 0,
	  "Messages the upstream accepted for at least one recipient" },
	{ "upstream_recipients", "upstream_recipients_total", "counter", 0, "Recipients the upstream accepted" },
	{ "upstream_failures", "upstream_failures_total", "counter", 0, "Times the upstream was marked down" },
	{ "upstream_connects", "upstream_connects_total", "counter", 0, "Connections opened to the upstream" },
	{ "upstream_latency_avg_ms", "upstream_latency_avg_seconds", "gauge", 0.001,
	  "Mean time of a transaction on the upstream, MAIL to its last reply (millisecond resolution)" },
	{ "upstream_latency_last_ms", "upstream_latency_last_seconds", "gauge", 0.001,
	  "Time of the last transaction on the upstream (millisecond resolution)" },
};

/* the next "key=value" line from *p, copied into l and split at its '='; false at the end */
static bool stats_kv_next(const char **p, char *l, size_t lsize, const char **key, const char **val)
{
	while (*p && **p) {
		const char *nl = strchr(*p, '\n');
		size_t len = nl ? (size_t)(nl - *p) : strlen(*p);
		snprintf(l, lsize, "%.*s", (int)len, *p);
		*p = nl ? nl + 1 : NULL;
		char *eq = strchr(l, '=');
		if (!eq)
			continue;
		*eq = '\0';
		*key = l;
		*val = eq + 1;
		return true;
	}
	return false;
}

/* "upstream.N.<sub>": N, and *sub; -1 for any other key */
static long stats_kv_upstream(const char *key, const char **sub)
{
	char *dot;
	if (strncmp(key, "upstream.", 9))
		return -1;
	long n = strtol(key + 9, &dot, 10);
	if (dot == key + 9 || *dot != '.' || n < 0)
		return -1;
	*sub = dot + 1;
	return n;
}

/* key of section prefix as a metric: its table entry, or a gauge named for it (name holds
 * the name and help then) */
static struct stats_kv_metric stats_kv_describe(const char *prefix, const char *key, char *name, size_t namelen)
{
	snprintf(name, namelen, "%s_%s", prefix, key);
	for (size_t i = 0; i < sizeof(stats_kv_metrics) / sizeof(stats_kv_metrics[0]); i++)
		if (!strcmp(stats_kv_metrics[i].key, name))
			return stats_kv_metrics[i];
	return (struct stats_kv_metric){ name, name, "gauge", 0, name };
}

static void stats_kv_header(struct buf *out, const struct stats_kv_metric *m)
{
	buf_printf(out, "# HELP relayd_%s %s\n# TYPE relayd_%s %s\n", m->name, m->help, m->name, m->type);
}

static bool stats_kv_numeric(const char *val)
{
	char *end;
	strtod(val, &end);
	return *val && !*end;
}

/* " value\n" of a sample, scaled to its unit */
static void stats_kv_value(struct buf *out, const struct stats_kv_metric *m, const char *val)
{
	if (m->scale)
		buf_printf(out, " %g\n", strtod(val, NULL) * m->scale);
	else
		buf_printf(out, " %s\n", val);
}

/* v as a label value: backslash, double quote and newline escaped (exposition format 0.0.4) */
static void stats_label_value(struct buf *out, const char *v)
{
	for (; *v; v++) {
		if (*v == '\\' || *v == '"')
			buf_printf(out, "\\%c", *v);
		else if (*v == '\n')
			buf_append(out, "\\n", 2);
		else
			buf_append(out, v, 1);
	}
}

/* the value of the line "upstream.N.name=" in kv */
static void stats_upstream_name(const char *kv, long n, char *out, size_t outlen)
{
	char l[512];
	const char *key, *val, *sub, *p = kv;
	out[0] = '\0';
	while (stats_kv_next(&p, l, sizeof(l), &key, &val))
		if (stats_kv_upstream(key, &sub) == n && !strcmp(sub, "name")) {
			snprintf(out, outlen, "%s", val);
			return;
		}
}

/* one per-upstream family: its header, then the line of each upstream */
static void stats_kv_upstream_family(const char *kv, const char *family, struct buf *out)
{
	char name[128], l[512], label[300];
	struct stats_kv_metric m = stats_kv_describe("upstream", family, name, sizeof(name));
	const char *key, *val, *sub, *p = kv;
	stats_kv_header(out, &m);
	while (stats_kv_next(&p, l, sizeof(l), &key, &val)) {
		long n = stats_kv_upstream(key, &sub);
		if (n < 0 || strcmp(sub, family))
			continue;
		if (!strcmp(family, "state"))
			val = strcmp(val, "up") ? "0" : "1";
		if (!stats_kv_numeric(val))
			continue;
		stats_upstream_name(kv, n, label, sizeof(label));
		buf_printf(out, "relayd_%s{upstream=\"", m.name);
		stats_label_value(out, label);
		buf_append(out, "\"}", 2);
		stats_kv_value(out, &m, val);
	}
}

/* stats_kv_prometheus - key=value lines as metric families */
void stats_kv_prometheus(const char *kv, const char *prefix, struct buf *out)
{
	char l[512], name[128];
	const char *key, *val, *sub, *p = kv;
	long first = -1;
	while (stats_kv_next(&p, l, sizeof(l), &key, &val)) {
		if (stats_kv_upstream(key, &sub) >= 0)
			continue;
		if (!stats_kv_numeric(val))
			continue;
		struct stats_kv_metric m = stats_kv_describe(prefix, key, name, sizeof(name));
		stats_kv_header(out, &m);
		buf_printf(out, "relayd_%s", m.name);
		stats_kv_value(out, &m, val);
	}
	/* family by family, in the order of the first upstream's keys: a family's samples are
	 * one group in the format, so not upstream by upstream */
	for (p = kv; stats_kv_next(&p, l, sizeof(l), &key, &val);) {
		long n = stats_kv_upstream(key, &sub);
		if (n < 0 || (first >= 0 && n != first) || !strcmp(sub, "name"))
			continue;
		first = n;
		stats_kv_upstream_family(kv, sub, out);
	}
}
