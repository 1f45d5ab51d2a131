/*
 * conn - a non-blocking socket on the libev loop, optionally wrapped in GnuTLS, with an
 * input and an output buffer. Used by the SMTP server session and the forwarding client.
 *
 * Reading: bytes are appended to c->in and ops->on_read is called; the owner consumes
 * what it parsed with buf_consume(&c->in, n). Reading pauses while c->in holds more than
 * in_max bytes (back-pressure), and resumes on conn_resume_read().
 * Writing: conn_write() appends to c->out and flushes as the socket allows.
 * TLS: conn_start_tls_*() first flushes c->out (so a "220 Ready to start TLS" leaves in
 * clear text), DISCARDS whatever unread clear text is in c->in (RFC 3207 §4.2 / the
 * STARTTLS injection attack), then runs the handshake and calls ops->on_tls when done.
 * Errors (peer closed, reset, TLS failure) call ops->on_error once; the owner then frees.
 * The owner may free the connection inside on_error and on_drain, never inside on_read or
 * on_tls (conn.c still touches it after those return).
 */
#ifndef RELAYD_CONN_H
#define RELAYD_CONN_H

#include <ev.h>
#include <gnutls/gnutls.h>
#include <stdbool.h>

#include "buf.h"

struct conn;

struct conn_ops {
	void (*on_read)(struct conn *c, void *arg);             /* new bytes in c->in */
	void (*on_tls)(struct conn *c, void *arg);              /* handshake finished */
	void (*on_drain)(struct conn *c, void *arg);            /* c->out became empty (may be NULL) */
	void (*on_error)(struct conn *c, void *arg, const char *why); /* closed or failed */
};

struct conn {
	int fd;
	struct ev_loop *loop;
	ev_io rio;
	ev_io wio;
	gnutls_session_t tls;      /* NULL when clear text */
	bool tls_handshaking;
	bool tls_want;             /* handshake waits for c->out to drain */
	bool tls_client;
	bool read_paused;
	bool eof;                  /* peer closed its side */
	bool failed;               /* on_error was called */
	bool flush_pending;        /* in the list of conns the loop flushes before it blocks */
	struct conn *flush_next, **flush_pprev;
	size_t in_max;
	struct buf in;
	struct buf out;
	const struct conn_ops *ops;
	void *arg;
	/* server handshake offload (tlsoff.c); the loop leaves the conn alone while offloaded */
	bool offloaded;
	bool off_cancel;
	int off_state;
	int off_rc;
	ev_io off_io;
	struct conn *off_next;
	struct conn *off_cancel_next;
	struct tlsoff_thread *off_thread;
};

/* conn_init - take over a connected non-blocking fd and start reading */
void conn_init(struct conn *c, struct ev_loop *loop, int fd, const struct conn_ops *ops, void *arg);
/* conn_write - queue bytes for sending; -1 on allocation failure */
int conn_write(struct conn *c, const void *p, size_t n);
/* conn_printf - queue formatted text */
int conn_printf(struct conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* conn_start_tls_server - begin a server-side handshake with these credentials */
int conn_start_tls_server(struct conn *c, gnutls_certificate_credentials_t cred);
/* conn_start_tls_client - begin a client-side handshake; verify chain + name when verify */
int conn_start_tls_client(struct conn *c, gnutls_certificate_credentials_t cred, const char *servername, bool verify);
/* conn_tls_info - "TLSv1.3 cipher=TLS_AES_256_GCM_SHA384" or "" when clear text */
void conn_tls_info(const struct conn *c, char *out, size_t outlen);
/* conn_pause_read / conn_resume_read - stop or restart reading from the socket */
void conn_pause_read(struct conn *c);
void conn_resume_read(struct conn *c);
/* conn_cancel_offload - if the handshake runs on a tlsoff thread, ask for it back and return
 * true: the owner must not free now; on_error follows when it is back */
bool conn_cancel_offload(struct conn *c);
/* conn_offload_done - a tlsoff thread finished c's handshake with rc (loop thread) */
void conn_offload_done(struct conn *c, int rc);
/* conn_flush - send what the socket takes at once, no callbacks (before a close) */
void conn_flush(struct conn *c);
/* conn_close - stop watchers, say goodbye to TLS (best effort), close the fd, free buffers */
void conn_close(struct conn *c);

#endif
