/*
 * metrics - an optional HTTP listener (`metrics 127.0.0.1:9425`) serving GET /metrics in
 * Prometheus text format (version 0.0.4). Minimal HTTP/1.0: one request per connection.
 */
#ifndef RELAYD_METRICS_H
#define RELAYD_METRICS_H

#include <ev.h>
#include <stddef.h>

/* metrics_init - bind host:port and serve on the loop; -1 with err */
int metrics_init(struct ev_loop *loop, const char *host, const char *port, char *err, size_t errlen);
/* metrics_shutdown - close the listener */
void metrics_shutdown(void);

#endif
