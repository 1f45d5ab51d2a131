/*
 * stats - counters and their rendering. Prometheus names are relayd_<name>_total for
 * counters; sections add their own gauges with # TYPE lines.
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
	[ST_REJECTED] = { "messages_rejected", "Transactions refused (policy, content, limits)" },
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

/* the value of "upstream.N.name=" in kv */
static void stats_upstream_name(const char *kv, long n, char *out, size_t outlen)
{
	char key[64];
	snprintf(key, sizeof(key), "upstream.%ld.name=", n);
	const char *p = strstr(kv, key);
	out[0] = '\0';
	if (p) {
		p += strlen(key);
		size_t len = strcspn(p, "\n\"\\");
		snprintf(out, outlen, "%.*s", (int)len, p);
	}
}

/* stats_kv_prometheus - key=value lines as gauges */
void stats_kv_prometheus(const char *kv, const char *prefix, struct buf *out)
{
	for (const char *line = kv; line && *line;) {
		const char *nl = strchr(line, '\n');
		size_t len = nl ? (size_t)(nl - line) : strlen(line);
		char l[256], name[128];
		snprintf(l, sizeof(l), "%.*s", (int)len, line);
		line = nl ? nl + 1 : NULL;
		char *eq = strchr(l, '=');
		if (!eq)
			continue;
		*eq = '\0';
		const char *key = l, *val = eq + 1;
		if (!strncmp(key, "upstream.", 9)) {
			char *dot;
			long n = strtol(key + 9, &dot, 10);
			if (*dot != '.' || !strcmp(dot + 1, "name"))
				continue;
			stats_upstream_name(kv, n, name, sizeof(name));
			if (!strcmp(dot + 1, "state"))
				buf_printf(out, "relayd_upstream_up{upstream=\"%s\"} %d\n", name, !strcmp(val, "up"));
			else
				buf_printf(out, "relayd_upstream_%s{upstream=\"%s\"} %s\n", dot + 1, name, val);
			continue;
		}
		char *end;
		strtod(val, &end);
		if (*val && !*end)
			buf_printf(out, "# TYPE relayd_%s_%s gauge\nrelayd_%s_%s %s\n", prefix, key, prefix, key, val);
	}
}
