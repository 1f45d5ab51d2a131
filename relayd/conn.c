/*
 * conn - non-blocking socket I/O on the libev loop, clear text or GnuTLS.
 * Invariants:
 *  - ops->on_error is called at most once; after it the owner must conn_close().
 *  - while a handshake is in progress nothing is passed to on_read.
 *  - clear text left in c->in when TLS starts is discarded (RFC 3207 §4.2, STARTTLS
 *    command injection, CVE-2011-0411 class).
 *  - GnuTLS may hold decrypted records internally; after each read we drain
 *    gnutls_record_check_pending() so no data waits for a socket event that never comes.
 *  - conn_write only queues: on the loop of the first conn_init, a prepare watcher sends every
 *    queued output once per loop turn, just before the loop blocks, so the replies to a
 *    pipelined group leave as one write (one TLS record) and a reply that fits the socket
 *    buffer costs no write watcher (two epoll_ctl calls and a loop turn); only output the
 *    socket does not take at once waits for EV_WRITE.
 */
#include "conn.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "tls.h"
#include "tlsoff.h"

#define CONN_READ_CHUNK 16384

static struct ev_loop *conn_flush_loop;
static ev_prepare conn_flush_watcher;
static struct conn *conn_flush_head;

static void conn_do_write(struct conn *c);

static void conn_flush_unlink(struct conn *c)
{
	if (!c->flush_pending)
		return;
	*c->flush_pprev = c->flush_next;
	if (c->flush_next)
		c->flush_next->flush_pprev = c->flush_pprev;
	c->flush_pending = false;
	c->flush_next = NULL;
	c->flush_pprev = NULL;
}

static void conn_flush_add(struct conn *c)
{
	if (c->flush_pending)
		return;
	c->flush_next = conn_flush_head;
	if (conn_flush_head)
		conn_flush_head->flush_pprev = &c->flush_next;
	c->flush_pprev = &conn_flush_head;
	conn_flush_head = c;
	c->flush_pending = true;
}

/* before the loop blocks: send what every conn queued in this turn. Each conn is taken off
 * the list before its write, whose on_drain or on_error may free it or queue on others */
static void conn_flush_cb(struct ev_loop *loop, ev_prepare *w, int revents)
{
	(void)loop; (void)w; (void)revents;
	while (conn_flush_head) {
		struct conn *c = conn_flush_head;
		conn_flush_unlink(c);
		if (!c->failed && !c->offloaded && !c->tls_handshaking && c->out.len > 0)
			conn_do_write(c);
	}
}

static void conn_fail(struct conn *c, const char *why)
{
	if (c->failed)
		return;
	c->failed = true;
	ev_io_stop(c->loop, &c->rio);
	ev_io_stop(c->loop, &c->wio);
	c->ops->on_error(c, c->arg, why);
}

static void conn_update_watchers(struct conn *c)
{
	if (c->failed)
		return;
	bool want_read, want_write;
	if (c->tls_handshaking) {
		int dir = gnutls_record_get_direction(c->tls);
		want_read = dir == 0;
		want_write = dir == 1;
	} else {
		want_read = !c->read_paused && !c->eof && !c->tls_want;
		want_write = c->out.len > 0 && !c->flush_pending;
	}
	if (want_read && !ev_is_active(&c->rio))
		ev_io_start(c->loop, &c->rio);
	else if (!want_read && ev_is_active(&c->rio))
		ev_io_stop(c->loop, &c->rio);
	if (want_write && !ev_is_active(&c->wio))
		ev_io_start(c->loop, &c->wio);
	else if (!want_write && ev_is_active(&c->wio))
		ev_io_stop(c->loop, &c->wio);
}

/* the end of a handshake, here or on a tlsoff thread: report it to the owner */
static void conn_handshake_finished(struct conn *c, int rc)
{
	if (rc < 0) {
		char why[256];
		snprintf(why, sizeof(why), "tls-handshake: %s", gnutls_strerror(rc));
		/* the server tells the client why (RFC 5246 §7.2, RFC 8446 §6): protocol_version
		 * for a TLS 1.0/1.1 hello (RFC 8996 §5), handshake_failure for no shared suite;
		 * best effort, the few bytes go to an empty socket buffer */
		if (!c->tls_client && rc != GNUTLS_E_PREMATURE_TERMINATION)
			(void)gnutls_alert_send_appropriate(c->tls, rc);
		conn_fail(c, why);
		return;
	}
	c->tls_handshaking = false;
	conn_update_watchers(c);
	if (c->ops->on_tls)
		c->ops->on_tls(c, c->arg);
}

static void conn_handshake(struct conn *c)
{
	if (!c->tls_client && tlsoff_enabled()) { /* the public-key work goes to another core */
		ev_io_stop(c->loop, &c->rio);
		ev_io_stop(c->loop, &c->wio);
		c->offloaded = true;
		tlsoff_submit(c);
		return;
	}
	int rc = gnutls_handshake(c->tls);
	if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) {
		conn_update_watchers(c);
		return;
	}
	conn_handshake_finished(c, rc);
}

/* read once from the socket or TLS; returns bytes, 0 on EOF, -1 again, -2 error */
static ssize_t conn_recv(struct conn *c, char *p, size_t n, const char **why)
{
	if (c->tls) {
		ssize_t r = gnutls_record_recv(c->tls, p, n);
		if (r >= 0)
			return r;
		if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
			return -1;
		if (r == GNUTLS_E_PREMATURE_TERMINATION)
			return 0;
		*why = gnutls_strerror((int)r);
		return -2;
	}
	ssize_t r = recv(c->fd, p, n, 0);
	if (r >= 0)
		return r;
	if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
		return -1;
	*why = strerror(errno);
	return -2;
}

static void conn_do_read(struct conn *c)
{
	char chunk[CONN_READ_CHUNK];
	bool got = false;
	for (;;) {
		if (c->in.len >= c->in_max) {
			c->read_paused = true;
			break;
		}
		const char *why = "read";
		ssize_t r = conn_recv(c, chunk, sizeof(chunk), &why);
		if (r == -1)
			break;
		if (r == -2) {
			char buf[256];
			snprintf(buf, sizeof(buf), "read-error: %s", why);
			conn_fail(c, buf);
			return;
		}
		if (r == 0) {
			c->eof = true;
			break;
		}
		if (buf_append(&c->in, chunk, (size_t)r) < 0) {
			conn_fail(c, "out-of-memory");
			return;
		}
		got = true;
		if (!c->tls || gnutls_record_check_pending(c->tls) == 0) {
			if ((size_t)r < sizeof(chunk))
				break;
		}
	}
	conn_update_watchers(c);
	if (got || c->in.len > 0)
		c->ops->on_read(c, c->arg);
	if (!c->failed && c->eof && !c->tls_handshaking)
		conn_fail(c, "peer-closed");
}

/* send what the socket takes now of c->out; 0 (all sent, or it would block) or -1 with why */
static int conn_send(struct conn *c, char *why, size_t whylen)
{
	while (c->out.len > 0) {
		ssize_t w;
		if (c->tls && !c->tls_want) { /* tls_want: the clear-text "220" still leaves first */
			w = gnutls_record_send(c->tls, c->out.data, c->out.len);
			if (w == GNUTLS_E_AGAIN || w == GNUTLS_E_INTERRUPTED)
				break;
			if (w < 0) {
				snprintf(why, whylen, "write-error: %s", gnutls_strerror((int)w));
				return -1;
			}
		} else {
			w = send(c->fd, c->out.data, c->out.len, MSG_NOSIGNAL);
			if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
				break;
			if (w < 0) {
				snprintf(why, whylen, "write-error: %s", strerror(errno));
				return -1;
			}
		}
		buf_consume(&c->out, (size_t)w);
	}
	return 0;
}

static void conn_do_write(struct conn *c)
{
	char why[256];
	if (conn_send(c, why, sizeof(why)) < 0) {
		conn_fail(c, why);
		return;
	}
	if (c->out.len == 0 && c->out.cap > 65536)
		buf_free(&c->out); /* give back what a big reply burst took */
	conn_update_watchers(c);
	if (c->out.len == 0) {
		if (c->tls_want) {
			c->tls_want = false;
			c->tls_handshaking = true;
			conn_handshake(c);
			return;
		}
		if (c->ops->on_drain)
			c->ops->on_drain(c, c->arg);
	}
}

static void conn_read_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct conn *c = w->data;
	(void)loop; (void)revents;
	if (c->tls_handshaking)
		conn_handshake(c);
	else
		conn_do_read(c);
}

static void conn_write_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct conn *c = w->data;
	(void)loop; (void)revents;
	if (c->tls_handshaking)
		conn_handshake(c);
	else
		conn_do_write(c);
}

/* conn_init - take over a connected non-blocking fd */
void conn_init(struct conn *c, struct ev_loop *loop, int fd, const struct conn_ops *ops, void *arg)
{
	memset(c, 0, sizeof(*c));
	c->fd = fd;
	c->loop = loop;
	c->ops = ops;
	c->arg = arg;
	c->in_max = 65536;
	ev_io_init(&c->rio, conn_read_cb, fd, EV_READ);
	ev_io_init(&c->wio, conn_write_cb, fd, EV_WRITE);
	c->rio.data = c;
	c->wio.data = c;
	if (!conn_flush_loop) {
		conn_flush_loop = loop;
		ev_prepare_init(&conn_flush_watcher, conn_flush_cb);
		ev_prepare_start(loop, &conn_flush_watcher);
		ev_unref(loop); /* it must not keep the loop running by itself */
	}
	conn_update_watchers(c);
}

/* conn_write - queue bytes and try to send them now */
int conn_write(struct conn *c, const void *p, size_t n)
{
	if (c->failed)
		return -1;
	if (buf_append(&c->out, p, n) < 0)
		return -1;
	if (c->loop == conn_flush_loop)
		conn_flush_add(c); /* sent before the loop blocks, with whatever else comes in this turn */
	else if (!c->tls_handshaking)
		conn_update_watchers(c);
	return 0;
}

/* conn_printf - queue formatted text */
int conn_printf(struct conn *c, const char *fmt, ...)
{
	char line[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (n < 0)
		return -1;
	if ((size_t)n >= sizeof(line))
		n = (int)sizeof(line) - 1;
	return conn_write(c, line, (size_t)n);
}

static int conn_tls_begin(struct conn *c, unsigned flags, gnutls_certificate_credentials_t cred,
			  const char *servername, bool verify)
{
	if (c->tls)
		return -1;
	if (gnutls_init(&c->tls, flags | GNUTLS_NONBLOCK) < 0)
		return -1;
	if (gnutls_priority_set(c->tls, tls_priority()) < 0 ||
	    gnutls_credentials_set(c->tls, GNUTLS_CRD_CERTIFICATE, cred) < 0) {
		gnutls_deinit(c->tls);
		c->tls = NULL;
		return -1;
	}
	if ((flags & GNUTLS_SERVER) && tls_ticket_key())
		gnutls_session_ticket_enable_server(c->tls, tls_ticket_key());
	if (servername && servername[0])
		gnutls_server_name_set(c->tls, GNUTLS_NAME_DNS, servername, strlen(servername));
	if (verify)
		gnutls_session_set_verify_cert(c->tls, servername, 0);
	gnutls_transport_set_int(c->tls, c->fd);
	/* RFC 3207 §4.2: forget clear text that arrived before the handshake */
	buf_reset(&c->in);
	c->eof = false;
	if (c->out.len > 0) {
		c->tls_want = true;
		conn_update_watchers(c);
	} else {
		/* start from the loop, never inside the owner's call */
		c->tls_handshaking = true;
		ev_io_start(c->loop, &c->wio);
	}
	return 0;
}

/* conn_start_tls_server - server side handshake */
int conn_start_tls_server(struct conn *c, gnutls_certificate_credentials_t cred)
{
	c->tls_client = false;
	return conn_tls_begin(c, GNUTLS_SERVER, cred, NULL, false);
}

/* conn_start_tls_client - client side handshake, verifying chain and name when verify */
int conn_start_tls_client(struct conn *c, gnutls_certificate_credentials_t cred, const char *servername, bool verify)
{
	c->tls_client = true;
	return conn_tls_begin(c, GNUTLS_CLIENT, cred, servername, verify);
}

/* conn_cancel_offload - take back an offloaded handshake early */
bool conn_cancel_offload(struct conn *c)
{
	if (!c->offloaded)
		return false;
	tlsoff_cancel(c);
	return true;
}

/* conn_offload_done - the handshake came back from its thread */
void conn_offload_done(struct conn *c, int rc)
{
	c->offloaded = false;
	if (c->off_cancel)
		conn_fail(c, "closed-during-tls-handshake");
	else
		conn_handshake_finished(c, rc);
}

/* conn_tls_info - version and cipher for logs and Received: */
void conn_tls_info(const struct conn *c, char *out, size_t outlen)
{
	if (!c->tls || c->tls_handshaking) {
		if (outlen)
			out[0] = '\0';
		return;
	}
	gnutls_protocol_t v = gnutls_protocol_get_version(c->tls);
	snprintf(out, outlen, "%s cipher=%s", gnutls_protocol_get_name(v), gnutls_cipher_get_name(gnutls_cipher_get(c->tls)));
}

/* conn_pause_read - stop reading */
void conn_pause_read(struct conn *c)
{
	c->read_paused = true;
	conn_update_watchers(c);
}

/* conn_resume_read - read again; data GnuTLS already holds is delivered now */
void conn_resume_read(struct conn *c)
{
	if (!c->read_paused || c->failed)
		return;
	c->read_paused = false;
	conn_update_watchers(c);
	/* bytes may already wait in c->in or inside GnuTLS: deliver them from the loop */
	if (c->in.len > 0 || (c->tls && !c->tls_handshaking && gnutls_record_check_pending(c->tls) > 0))
		ev_feed_event(c->loop, &c->rio, EV_READ);
}

/* conn_flush - send what the socket takes at once, without callbacks; nothing while a
 * handshake (or the clear-text reply before one) holds the connection */
void conn_flush(struct conn *c)
{
	char why[256];
	if (!c->failed && !c->offloaded && !c->tls_handshaking && !c->tls_want)
		(void)conn_send(c, why, sizeof(why)); /* an error: the close follows anyway */
}

/* conn_close - release everything */
void conn_close(struct conn *c)
{
	conn_flush_unlink(c);
	ev_io_stop(c->loop, &c->rio);
	ev_io_stop(c->loop, &c->wio);
	if (c->tls) {
		if (!c->tls_handshaking && !c->failed)
			gnutls_bye(c->tls, GNUTLS_SHUT_WR);
		gnutls_deinit(c->tls);
		c->tls = NULL;
	}
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
	buf_free(&c->in);
	buf_free(&c->out);
}
