/*
 * listener - bind every `listen` line (IPv4 and IPv6), accept connections, hand them to
 * smtp_server. Binding happens before privileges are dropped.
 */
#ifndef RELAYD_LISTENER_H
#define RELAYD_LISTENER_H

#include <ev.h>

#include "config.h"

/* listener_bind_all - bind and listen on every configured address; -1 with err */
int listener_bind_all(const struct config *cfg, char *err, size_t errlen);
/* listener_start - start accepting on the loop */
void listener_start(struct ev_loop *loop);
/* listener_stop - stop accepting and close the sockets */
void listener_stop(struct ev_loop *loop);

#endif
