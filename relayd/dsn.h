/*
 * dsn - delivery status notifications (RFC 3464) for recipients that finally failed, that
 * are still delayed, or that were relayed to an upstream that cannot pass a success notice
 * on: a multipart/report; report-type=delivery-status message from MAILER-DAEMON@hostname
 * to the original sender, sent with the null reverse-path (RFC 5321 §4.5.5).
 *
 * The failure of recipient i is read from env->rcpt[i]: done_code >= 500 and done_text,
 * written by the forwarder as "[remote host] reply text" (the bracketed part is optional
 * and becomes Remote-MTA; the reply's enhanced code, if any, becomes Status).
 * RFC 3461 NOTIFY: NEVER, or a NOTIFY list without FAILURE, means no report for that
 * recipient; RET=HDRS returns the header section only (text/rfc822-headers).
 * A delayed notice reports the pending recipients (done_code 0) whose NOTIFY has DELAY or
 * is not given, with env->last_error; a relayed notice the delivered ones (2xx) marked
 * relay_notice whose NOTIFY has SUCCESS. Both return the header section only.
 * UTF-8 (RFC 6532, RFC 6533): a returned message with UTF-8 in its header section is
 * message/global (message/global-headers), and report fields with UTF-8 (a utf-8 address, a
 * reply text) make the report message/global-delivery-status; the notice's own header
 * section stays ASCII, so it needs 8BITMIME but not SMTPUTF8.
 */
#ifndef RELAYD_DSN_H
#define RELAYD_DSN_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include "buf.h"
#include "queue.h"

enum dsn_action {
	DSN_ACTION_FAILED,    /* a bounce: Action: failed */
	DSN_ACTION_DELAYED,   /* a warning: Action: delayed, Status 4.x.x */
	DSN_ACTION_RELAYED    /* Action: relayed (RFC 3461 §5.2.2.2) */
};

/* dsn_rcpt_wanted - does this recipient's failure get reported (failed and NOTIFY allows)? */
bool dsn_rcpt_wanted(const struct queue_rcpt *r);
/* dsn_rcpt_reported - is recipient r part of a notice of this action? */
bool dsn_rcpt_reported(const struct queue_rcpt *r, enum dsn_action action);
/* dsn_build - the complete notice (headers, CRLF line ends, not dot-stuffed) of this action
 * for env's recipients that are reported, with the original message body[0..len) returned
 * in full or as headers. Returns how many recipients it reports (0: nothing to report, out
 * untouched), or -1 on allocation failure. */
int dsn_build(const struct queue_envelope *env, enum dsn_action action, const char *body, size_t len,
	      const char *hostname, time_t now, struct buf *out);
/* dsn_headers_only - a bounce from dsn_build that returns the whole message (message/rfc822 or
 * message/global), rewritten into out as RET=HDRS makes it (text/rfc822-headers or
 * message/global-headers: the header section only), for
 * an upstream that cannot take the whole (SIZE, 8BITMIME). -1 when in is not such a bounce, or
 * out of memory */
int dsn_headers_only(const char *in, size_t len, struct buf *out);
/* dsn_without_content - a bounce from dsn_build (whole message or headers returned) without
 * its returned part, for an upstream that cannot take even the headers (8-bit headers without
 * 8BITMIME): the report alone. -1 when in is not such a bounce, or out of memory */
int dsn_without_content(const char *in, size_t len, struct buf *out);
/* dsn_xtext_decode - RFC 3461 §4 xtext ("+2B" -> "+") into out; -1 if it does not fit */
int dsn_xtext_decode(const char *in, char *out, size_t outlen);

#endif
