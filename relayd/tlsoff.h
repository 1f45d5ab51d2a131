/*
 * tlsoff - server-side TLS handshakes on helper threads, so the signature of one client's
 * handshake (the costliest step of a submission) never holds up every other session on the
 * loop, and the other cores do the public-key work.
 *
 * conn.c hands a connection over at the start of its server handshake and gets it back,
 * through ev_async on the main loop, when the handshake ends. While a connection is away
 * the loop thread does not touch it; an owner that wants to close it asks for cancellation
 * (conn_cancel_offload) and closes it when it comes back.
 */
#ifndef RELAYD_TLSOFF_H
#define RELAYD_TLSOFF_H

#include <stdbool.h>

struct conn;
struct ev_loop;

#define TLSOFF_MAX_THREADS 8

/* tlsoff_init - start nthreads handshake threads (0: handshakes stay on the loop) */
int tlsoff_init(struct ev_loop *main_loop, int nthreads);
/* tlsoff_enabled - are handshakes offloaded? */
bool tlsoff_enabled(void);
/* tlsoff_submit - run c's server handshake on a helper thread (loop thread only) */
void tlsoff_submit(struct conn *c);
/* tlsoff_cancel - stop c's handshake early; it still comes back (loop thread only) */
void tlsoff_cancel(struct conn *c);
/* tlsoff_shutdown - stop the threads; connections away are left to the process exit */
void tlsoff_shutdown(void);

#endif
