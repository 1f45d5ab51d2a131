/*
 * forward_session - the forwarder's SMTP client connections (forward_session.c). Internal:
 * used by the manager, forward.c, only.
 */
#ifndef RELAYD_FORWARD_SESSION_H
#define RELAYD_FORWARD_SESSION_H

#include "forward_int.h"

/* forward_session_init - at forward_init: the reaper */
void forward_session_init(const struct config *cfg);
/* forward_session_new - a new connection to upstream u (resolve first); NULL when out of memory */
struct forward_session *forward_session_new(struct forward_upstream *u);
/* forward_session_take - an idle (FS_READY) session takes message m */
void forward_session_take(struct forward_session *s, struct forward_msg *m);
/* forward_session_free - release everything; the struct itself is freed later from the loop */
void forward_session_free(struct forward_session *s);
/* forward_session_tx_clear - forget the transaction (not the message) */
void forward_session_tx_clear(struct forward_session *s);
/* forward_session_shutdown - QUIT an idle session, drop a busy one */
void forward_session_shutdown(struct forward_session *s);
/* forward_session_reap - free the freed sessions now (at shutdown) */
void forward_session_reap(void);

#endif
