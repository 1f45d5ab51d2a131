/*
 * policy - per-user rate limits, per-IP connection limits and AUTH brute-force defence,
 * with per-user counters for `relayctl stats`.
 *
 * Per user, each metric (messages, recipients, bytes) is counted in sliding windows of a
 * minute, an hour and a day (ratelimit.h), so a limit changed with relayctl applies at the
 * user's next AUTH with no restart and no reset. Usage is appended to QUEUE/usage.log
 * before the message is committed; the commit's syncfs makes it durable with the message,
 * and start-up replays the last day of it, so a restart does not refill anyone's budget.
 */
#ifndef RELAYD_POLICY_H
#define RELAYD_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "buf.h"

struct config;
struct ev_loop;

enum policy_metric { POLICY_MSGS, POLICY_RCPTS, POLICY_BYTES, POLICY_NMETRICS };

struct policy_limits {
	uint64_t limit[POLICY_NMETRICS];   /* 0 = unlimited */
	uint32_t window[POLICY_NMETRICS];  /* 60, 3600 or 86400 */
};

/* policy_init - defaults from the config; replay and compact the usage journal */
int policy_init(struct ev_loop *loop, const struct config *cfg, char *err, size_t errlen);
/* policy_shutdown - close the journal, free the tables */
void policy_shutdown(void);
/* policy_default_limits - the limits from relayd.conf */
void policy_default_limits(struct policy_limits *l);

/* policy_check - may user send (msgs more messages, rcpts more recipients, bytes more bytes)
 * under limits l? 0 yes; -1 no, with the metric and the seconds until room in *metric and *wait
 * (0: never, it is more than the whole limit) */
int policy_check(const char *user, const struct policy_limits *l, uint64_t msgs, uint64_t rcpts, uint64_t bytes,
		 enum policy_metric *metric, uint32_t *wait);
/* policy_record - count an accepted message (and journal it); returns when it was counted */
time_t policy_record(const char *user, uint64_t rcpts, uint64_t bytes);
/* policy_unrecord - take back a recorded message whose commit failed (counted: what
 * policy_record returned) */
void policy_unrecord(const char *user, time_t counted, uint64_t rcpts, uint64_t bytes);
/* policy_metric_name - "messages", "recipients", "bytes" */
const char *policy_metric_name(enum policy_metric m);

/* per-user counters for stats */
enum policy_counter { PC_ACCEPTED, PC_REJECT_LIMIT, PC_REJECT_SENDER, PC_AUTH_FAIL, PC_NCOUNTERS };
/* policy_count - bump a user's counter */
void policy_count(const char *user, enum policy_counter c);

/* policy_ip_connect - a new connection from ip: 0 ok, -1 refuse (421 4.7.0) with why */
int policy_ip_connect(const char *ip, const char **why);
/* policy_ip_disconnect - that connection ended */
void policy_ip_disconnect(const char *ip);
/* policy_auth_allowed - may ip try AUTH (for name, if known)? false while locked out */
bool policy_auth_allowed(const char *ip, const char *name);
/* policy_auth_failed - count a failure; returns the delay in seconds before the reply */
double policy_auth_failed(const char *ip, const char *name);
/* policy_auth_ok - success resets the IP's and the user name's failure counts */
void policy_auth_ok(const char *ip, const char *name);

/* policy_stats - key=value lines per user into out */
void policy_stats(struct buf *out);

#endif
