/*
 * forward - the SMTP client that carries queued messages to the upstream smarthosts:
 * failover across the upstream lines in order, connection reuse, PIPELINING, STARTTLS or
 * implicit TLS with verification, AUTH through Cyrus SASL's client side, per-recipient
 * results, retries with backoff, pacing, and bounces (dsn.c) for recipients that fail.
 * Runs on the libev loop; DNS, queue file reads and every fsync go to workq threads.
 *
 * Status records it writes (queue.h): "D <i> <code> [<upstream host>] <reply text>" when
 * recipient i is finished, "R <i>" when it was delivered with NOTIFY=SUCCESS to an upstream
 * without DSN (a "relayed" notice is owed), "T <attempts> <next> <text>" when the message is
 * deferred, "W <notice id>" once the one "delayed" notice (delay_warning) is committed,
 * "B <bounce id>" once the bounce is committed; then the relayed notice, if owed, is
 * written and the file is removed.
 */
#ifndef RELAYD_FORWARD_H
#define RELAYD_FORWARD_H

#include <stddef.h>

#include "buf.h"

struct ev_loop;
struct config;

/* forward_init - after queue_init: client TLS credentials and auth= secrets per upstream,
 * SASL client set-up, then every message in the queue is scheduled (recovery).
 * Nothing runs before the loop does. -1 with err on a start-up error. */
int forward_init(struct ev_loop *loop, const struct config *cfg, char *err, size_t errlen);
/* forward_reload - SIGHUP: new ca=, verify=, auth= secrets, rate= and connections= for
 * upstreams whose list is unchanged; -1 with err (nothing changed) if one cannot be loaded */
int forward_reload(const struct config *cfg, char *err, size_t errlen);
/* forward_notify - message id (size bytes, 0 if not known) was just committed: load it and
 * send it now. Up to FORWARD_INLINE_MAX (forward_int.h) it is read on the loop (it is in the page cache:
 * cheaper than a worker's two hand-overs), a larger one on a worker. */
void forward_notify(const char *id, size_t size);
/* forward_shutdown - no new attempts; QUIT idle upstream connections, close the others */
void forward_shutdown(void);
/* forward_forget - message id was deleted from the queue (relayctl queue delete): drop it from
 * memory; a transaction already on the wire still ends, but nothing more is done for it */
void forward_forget(const char *id);
/* forward_flush - every deferred message is retried now, and down marks are forgotten */
void forward_flush(void);
/* forward_stats - "key=value\n" lines: counters, and per upstream state, failures, latency */
void forward_stats(struct buf *out);

#endif
