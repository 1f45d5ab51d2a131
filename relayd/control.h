/*
 * control - the unix control socket that relayctl talks to.
 *
 * Protocol: the client sends one line "COMMAND [ARGS]\n" (at most CONTROL_LINE_MAX bytes
 * with the newline; a CR before it is dropped); the server answers "OK\n" followed by the
 * handler's body, or "ERR message\n", and closes the connection. An unknown command gets
 * "ERR unknown command". "ping" is built in and answers "OK\npong\n".
 *
 * Everything runs on the libev loop and never blocks: the socket is non-blocking, each
 * client has CONTROL_TIMEOUT seconds in all, at most CONTROL_MAX_CLIENTS are served at once.
 * Handlers run on the loop thread and must be quick (start work, do not wait for it).
 * Access: the socket is mode 0600, and a peer whose uid is neither root nor relayd's
 * effective uid is refused (SO_PEERCRED), so call control_init after dropping privileges.
 */
#ifndef RELAYD_CONTROL_H
#define RELAYD_CONTROL_H

#include <stddef.h>

#include "buf.h"

struct ev_loop;

#define CONTROL_LINE_MAX    4096  /* request line, newline included */
#define CONTROL_TIMEOUT     5.0   /* seconds per client, from accept to close */
#define CONTROL_MAX_CLIENTS 16
#define CONTROL_MAX_COMMANDS 32
#define CONTROL_NAME_MAX    32    /* command name, NUL included */

/* fills out; returns 0 ok, -1 error (out then holds the message, first line used) */
typedef int (*control_handler)(const char *args, struct buf *out);

/* control_init - unlink a stale socket, bind, chmod 0600, listen, start the watcher;
 * -1 with err (also when another process already answers on path) */
int control_init(struct ev_loop *loop, const char *path, char *err, size_t errlen);
/* control_register - add (or replace) a command; before or after control_init */
void control_register(const char *command, control_handler h);
/* control_shutdown - drop clients, close the socket and unlink it */
void control_shutdown(void);

#endif
