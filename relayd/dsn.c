/*
 * dsn - bounces, delay warnings and relayed notices: RFC 3464 (delivery-status), RFC 3462/6522 (multipart/report),
 * RFC 3461 (NOTIFY, RET, ENVID, ORCPT), RFC 3834 (Auto-Submitted), RFC 3463 (status codes),
 * RFC 6532/6533 (message/global, message/global-delivery-status), RFC 2046 (boundary).
 *
 * Invariants:
 *  - pure: no I/O, no clock (now is passed in), so the output is unit-testable;
 *  - every line ends in CRLF and stays under 998 octets (RFC 5322 §2.1.1): text taken
 *    from upstream replies is cut and stripped of control characters;
 *  - a recipient is reported only when its state fits the notice (failed: 5xx D record;
 *    delayed: pending; relayed: 2xx and R record) and its NOTIFY allows it.
 */
#include "dsn.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DSN_TEXT_MAX 700 /* reply text kept per recipient, well under 998 with the field name */
#define DSN_BOUNDARY_MAX 70 /* RFC 2046 §5.1.1: boundary := 0*69<bchars> bcharsnospace */
#define DSN_CTE_8BIT "Content-Transfer-Encoding: 8bit\r\n"

/* dsn_rcpt_wanted - failed, and NOTIFY not NEVER and (not given or includes FAILURE) */
bool dsn_rcpt_wanted(const struct queue_rcpt *r)
{
	if (r->done_code < 500)
		return false;
	if (r->notify & DSN_NOTIFY_NEVER)
		return false;
	return r->notify == 0 || (r->notify & DSN_NOTIFY_FAILURE);
}

/* dsn_rcpt_reported - the recipient's state and NOTIFY fit the notice */
bool dsn_rcpt_reported(const struct queue_rcpt *r, enum dsn_action action)
{
	switch (action) {
	case DSN_ACTION_FAILED:
		return dsn_rcpt_wanted(r);
	case DSN_ACTION_DELAYED:
		return r->done_code == 0 && !(r->notify & DSN_NOTIFY_NEVER) &&
		       (r->notify == 0 || (r->notify & DSN_NOTIFY_DELAY));
	case DSN_ACTION_RELAYED:
		return r->done_code >= 200 && r->done_code < 300 && r->relay_notice && !(r->notify & DSN_NOTIFY_NEVER) &&
		       (r->notify & DSN_NOTIFY_SUCCESS);
	}
	return false;
}

static const char *dsn_action_name(enum dsn_action action)
{
	return action == DSN_ACTION_FAILED ? "failed" : action == DSN_ACTION_DELAYED ? "delayed" : "relayed";
}

/* dsn_xtext_decode - "+XX" hex escapes to bytes */
int dsn_xtext_decode(const char *in, char *out, size_t outlen)
{
	size_t o = 0;
	for (const char *p = in; *p; p++) {
		char ch = *p;
		if (ch == '+' && isxdigit((unsigned char)p[1]) && isxdigit((unsigned char)p[2])) {
			char hex[3] = { p[1], p[2], '\0' };
			ch = (char)strtol(hex, NULL, 16);
			p += 2;
		}
		if (o + 1 >= outlen)
			return -1;
		out[o++] = ch;
	}
	if (outlen == 0)
		return -1;
	out[o] = '\0';
	return 0;
}

/* copy text without control characters (a header field must not break), at most max bytes */
static void dsn_clean(const char *in, char *out, size_t outlen, size_t max)
{
	size_t o = 0;
	for (const char *p = in; *p && o + 1 < outlen && o < max; p++)
		out[o++] = ((unsigned char)*p < 0x20 || *p == 0x7f) ? ' ' : *p;
	out[o] = '\0';
}

/* split a done_text "[remote] reply text" into its parts (remote may be empty) */
static void dsn_split_text(const char *text, char *remote, size_t rlen, const char **reply)
{
	remote[0] = '\0';
	*reply = text ? text : "";
	if (text && text[0] == '[') {
		const char *end = strstr(text, "] ");
		if (end && (size_t)(end - text - 1) < rlen) {
			memcpy(remote, text + 1, (size_t)(end - text - 1));
			remote[end - text - 1] = '\0';
			*reply = end + 2;
		}
	}
}

/* the enhanced status code (RFC 3463) at the start of a reply text, of class 4 or 5 for a
 * failure, 2 for relayed; for delayed the first one of class 4 anywhere in the text (it is
 * "upstream said: 451 4.3.0 ..."); else 5.0.0, 2.0.0 or 4.0.0 */
static void dsn_status(const char *reply, enum dsn_action action, char *out, size_t outlen)
{
	const char *p = reply;
	for (;;) {
		unsigned a, b, c;
		int n = 0;
		if (sscanf(p, "%1u.%3u.%3u%n", &a, &b, &c, &n) == 3 && (p[n] == '\0' || p[n] == ' ') &&
		    (action == DSN_ACTION_FAILED ? a == 4 || a == 5 : a == (action == DSN_ACTION_RELAYED ? 2u : 4u))) {
			snprintf(out, outlen, "%u.%u.%u", a, b, c);
			return;
		}
		if (action != DSN_ACTION_DELAYED || !(p = strchr(p, ' ')))
			break;
		p++;
	}
	snprintf(out, outlen, "%s", action == DSN_ACTION_FAILED ? "5.0.0" : action == DSN_ACTION_RELAYED ? "2.0.0" : "4.0.0");
}

static bool dsn_has_8bit(const char *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)p[i] & 0x80)
			return true;
	return false;
}

/* the header section of a message, including the CRLF ending its last field */
static size_t dsn_header_len(const char *body, size_t len)
{
	if (len >= 2 && body[0] == '\r' && body[1] == '\n')
		return 0;
	for (size_t i = 0; i + 3 < len; i++)
		if (body[i] == '\r' && body[i + 1] == '\n' && body[i + 2] == '\r' && body[i + 3] == '\n')
			return i + 2;
	return len;
}

static void dsn_date(time_t t, char *out, size_t outlen)
{
	struct tm tm;
	localtime_r(&t, &tm);
	strftime(out, outlen, "%a, %d %b %Y %H:%M:%S %z", &tm);
}

/* address type for Final-/Original-Recipient: utf-8 for non-ASCII mailboxes (RFC 6533) */
static const char *dsn_addr_type(const char *addr)
{
	return dsn_has_8bit(addr, strlen(addr)) ? "utf-8" : "rfc822";
}

static int dsn_human_part(const struct queue_envelope *env, enum dsn_action action, const char *hostname,
			  const char *boundary, bool utf8, struct buf *out)
{
	static const char *intro[] = {
		"I'm sorry to have to inform you that your message could not\r\n"
		"be delivered to one or more recipients. It's attached below.\r\n\r\n",
		"####### THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #######\r\n\r\n"
		"Your message could not be delivered yet to one or more recipients.\r\n"
		"The mail system will keep trying. Its headers are attached below.\r\n\r\n",
		"Your message was delivered to the mail systems below, which will not\r\n"
		"send delivery notifications of their own. Its headers are attached below.\r\n\r\n",
	};
	int rc = buf_printf(out, "--%s\r\nContent-Description: Notification\r\n"
			    "Content-Type: text/plain; charset=%s\r\n%s\r\n"
			    "This is the mail system at host %s.\r\n\r\n%s"
			    "The mail system\r\n\r\n", boundary, utf8 ? "utf-8" : "us-ascii",
			    utf8 ? DSN_CTE_8BIT : "", hostname, intro[action]);
	for (size_t i = 0; rc == 0 && i < env->nrcpt; i++) {
		const struct queue_rcpt *r = &env->rcpt[i];
		if (!dsn_rcpt_reported(r, action))
			continue;
		char remote[256], text[DSN_TEXT_MAX + 1];
		const char *reply;
		if (action == DSN_ACTION_DELAYED) {
			dsn_clean(env->last_error ? env->last_error : "not delivered yet", text, sizeof(text), DSN_TEXT_MAX);
			rc |= buf_printf(out, "<%s>: delivery temporarily suspended: %s\r\n\r\n", r->addr, text);
			continue;
		}
		dsn_split_text(r->done_text, remote, sizeof(remote), &reply);
		dsn_clean(reply, text, sizeof(text), DSN_TEXT_MAX);
		if (action == DSN_ACTION_RELAYED)
			rc |= buf_printf(out, "<%s>: delivery via %s: %d %s\r\n\r\n", r->addr,
					 remote[0] ? remote : "the mail system", r->done_code, text);
		else
			rc |= buf_printf(out, "<%s>: %s%s%s said: %d %s\r\n\r\n", r->addr, remote[0] ? "host " : "",
					 remote[0] ? remote : "the mail system", "", r->done_code, text);
	}
	return rc;
}

/* RFC 6533 §6: UTF-8 (an address of the utf-8 type, a reply text) in the report fields makes
 * it a message/global-delivery-status, 8bit; message/delivery-status stays 7-bit */
static int dsn_status_part(const struct queue_envelope *env, enum dsn_action action, const char *hostname,
			   const char *boundary, bool utf8, struct buf *out)
{
	char date[64];
	dsn_date(env->created, date, sizeof(date));
	int rc = buf_printf(out, "--%s\r\nContent-Description: Delivery report\r\n"
			    "Content-Type: message/%sdelivery-status\r\n%s\r\n"
			    "Reporting-MTA: dns; %s\r\nX-Relayd-Queue-ID: %s\r\n", boundary, utf8 ? "global-" : "",
			    utf8 ? DSN_CTE_8BIT : "", hostname, env->id);
	if (env->envid) {
		char envid[256], clean[256];
		if (dsn_xtext_decode(env->envid, envid, sizeof(envid)) == 0) {
			dsn_clean(envid, clean, sizeof(clean), 200);
			rc |= buf_printf(out, "Original-Envelope-Id: %s\r\n", clean);
		}
	}
	rc |= buf_printf(out, "Arrival-Date: %s\r\n", date);
	for (size_t i = 0; rc == 0 && i < env->nrcpt; i++) {
		const struct queue_rcpt *r = &env->rcpt[i];
		if (!dsn_rcpt_reported(r, action))
			continue;
		char remote[256], text[DSN_TEXT_MAX + 1], status[16];
		const char *reply;
		if (action == DSN_ACTION_DELAYED) {
			remote[0] = '\0';
			reply = env->last_error ? env->last_error : "";
		} else {
			dsn_split_text(r->done_text, remote, sizeof(remote), &reply);
		}
		dsn_clean(reply, text, sizeof(text), DSN_TEXT_MAX);
		dsn_status(text, action, status, sizeof(status));
		rc |= buf_printf(out, "\r\n");
		if (r->orcpt) {
			/* ORCPT is "addr-type;xtext" (RFC 3461 §4.2) */
			char orcpt[1024], clean[1024];
			if (dsn_xtext_decode(r->orcpt, orcpt, sizeof(orcpt)) == 0) {
				dsn_clean(orcpt, clean, sizeof(clean), 900);
				char *semi = strchr(clean, ';');
				if (semi) {
					*semi = '\0';
					const char *a = semi + 1;
					while (*a == ' ')
						a++;
					rc |= buf_printf(out, "Original-Recipient: %s; %s\r\n", clean, a);
				}
			}
		}
		rc |= buf_printf(out, "Final-Recipient: %s; %s\r\nAction: %s\r\nStatus: %s\r\n",
				 dsn_addr_type(r->addr), r->addr, dsn_action_name(action), status);
		if (remote[0])
			rc |= buf_printf(out, "Remote-MTA: dns; %s\r\n", remote);
		if (action != DSN_ACTION_DELAYED) {
			rc |= buf_printf(out, "Diagnostic-Code: smtp; %d %s\r\n", r->done_code, text);
		} else {
			const char *said = strstr(text, " said: "); /* "upstream said: 451 4.3.0 ..." */
			if (said)
				rc |= buf_printf(out, "Diagnostic-Code: smtp; %s\r\n", said + 7);
		}
	}
	return rc;
}

/* the media type of the returned message or its headers */
static const char *dsn_returned_type(bool hdrs_only, bool global)
{
	if (hdrs_only)
		return global ? "message/global-headers" : "text/rfc822-headers";
	return global ? "message/global" : "message/rfc822";
}

/* dsn_build - the whole report */
int dsn_build(const struct queue_envelope *env, enum dsn_action action, const char *body, size_t len,
	      const char *hostname, time_t now, struct buf *out)
{
	static const char *subject[] = { "Undelivered Mail Returned to Sender", "Delayed Mail (still being retried)",
					 "Successful Mail Delivery Report" };
	int n = 0;
	bool utf8 = false;
	for (size_t i = 0; i < env->nrcpt; i++) {
		if (!dsn_rcpt_reported(&env->rcpt[i], action))
			continue;
		n++;
		utf8 |= dsn_has_8bit(env->rcpt[i].addr, strlen(env->rcpt[i].addr));
		if (env->rcpt[i].done_text)
			utf8 |= dsn_has_8bit(env->rcpt[i].done_text, strlen(env->rcpt[i].done_text));
		if (env->rcpt[i].orcpt) /* xtext: raw UTF-8 only when it came with SMTPUTF8 */
			utf8 |= dsn_has_8bit(env->rcpt[i].orcpt, strlen(env->rcpt[i].orcpt));
	}
	if (n == 0)
		return 0;
	if (action == DSN_ACTION_DELAYED && env->last_error)
		utf8 |= dsn_has_8bit(env->last_error, strlen(env->last_error));
	/* only a bounce returns the whole message (RFC 3461 §4.3 leaves it open for the others) */
	bool hdrs_only = action != DSN_ACTION_FAILED || (env->ret && !strcmp(env->ret, "HDRS"));
	size_t part_len = hdrs_only ? dsn_header_len(body, len) : len;
	bool body8 = dsn_has_8bit(body, part_len);
	/* RFC 6532 §3.7, RFC 6533 §6: a message with UTF-8 in its header section is returned as
	 * message/global (or its headers as message/global-headers), never as message/rfc822 */
	bool global = dsn_has_8bit(body, dsn_header_len(body, len));
	char date[64], boundary[DSN_BOUNDARY_MAX + 1];
	dsn_date(now, date, sizeof(date));
	int bl = snprintf(boundary, sizeof(boundary), "=_%s/%lld/", env->id, (long long)now);
	snprintf(boundary + bl, sizeof(boundary) - (size_t)bl, "%.*s", DSN_BOUNDARY_MAX - bl, hostname);

	int rc = buf_printf(out, "From: Mail Delivery System <MAILER-DAEMON@%s>\r\n"
			    "To: <%s>\r\n"
			    "Subject: %s\r\n"
			    "Date: %s\r\n"
			    "Message-ID: <%s.%lld.%s@%s>\r\n"
			    "Auto-Submitted: auto-replied\r\n"
			    "MIME-Version: 1.0\r\n"
			    "Content-Type: multipart/report; report-type=delivery-status;\r\n"
			    "\tboundary=\"%s\"\r\n"
			    "%s"
			    "\r\n"
			    "This is a MIME-encapsulated message.\r\n\r\n",
			    hostname, env->from, subject[action], date, env->id, (long long)now,
			    action == DSN_ACTION_FAILED ? "dsn" : action == DSN_ACTION_DELAYED ? "delay" : "relay", hostname,
			    boundary, utf8 || body8 ? DSN_CTE_8BIT : ""); /* RFC 2045 §6.4: the multipart's too */
	rc |= dsn_human_part(env, action, hostname, boundary, utf8, out);
	rc |= dsn_status_part(env, action, hostname, boundary, utf8, out);
	rc |= buf_printf(out, "\r\n--%s\r\nContent-Description: %s\r\nContent-Type: %s\r\n%s\r\n", boundary,
			 action != DSN_ACTION_FAILED ? "Message Headers"
			 : hdrs_only ? "Undelivered Message Headers" : "Undelivered Message",
			 dsn_returned_type(hdrs_only, global), body8 ? DSN_CTE_8BIT : "");
	rc |= buf_append(out, body, part_len);
	if (part_len > 0 && !(part_len >= 2 && body[part_len - 2] == '\r' && body[part_len - 1] == '\n'))
		rc |= buf_append(out, "\r\n", 2);
	rc |= buf_printf(out, "\r\n--%s--\r\n", boundary);
	return rc ? -1 : n;
}

/* where the part of the returned whole message starts in the bounce in[0..len) whose boundary
 * is b[0..blen): its "\r\n--boundary" line, *n bytes of part header up to its type's CRLF;
 * *global for message/global. NULL if there is none */
static const char *dsn_returned_part(const char *in, size_t len, const char *b, int blen, int *n, bool *global)
{
	static const char part[] = "\r\nContent-Description: Undelivered Message\r\nContent-Type: message/";
	static const char *types[] = { "rfc822\r\n", "global\r\n" };
	for (int g = 0; g < 2; g++) {
		char marker[200];
		*n = snprintf(marker, sizeof(marker), "\r\n--%.*s%s%s", blen, b, part, types[g]);
		const char *m = memmem(in, len, marker, (size_t)*n);
		if (m) {
			*global = g == 1;
			return m;
		}
	}
	return NULL;
}

/* the boundary of a bounce from dsn_build: *b, *blen; false when in is not such a bounce */
static bool dsn_boundary(const char *in, size_t hlen, const char **b, int *blen)
{
	const char *p = memmem(in, hlen, "\tboundary=\"", 11);
	p = p ? p + 11 : NULL;
	const char *end = p ? memchr(p, '"', hlen - (size_t)(p - in)) : NULL;
	if (!end || end - p > 120)
		return false;
	*b = p;
	*blen = (int)(end - p);
	return true;
}

/* the bounce's header section in[0..hlen) into out without its top-level 8bit label (*label:
 * it had one): a rewritten bounce gets it back from dsn_relabel only if still 8-bit */
static int dsn_put_top(const char *in, size_t hlen, struct buf *out, bool *label)
{
	size_t cl = sizeof(DSN_CTE_8BIT) - 1;
	*label = hlen >= cl && !memcmp(in + hlen - cl, DSN_CTE_8BIT, cl);
	return buf_append(out, in, *label ? hlen - cl : hlen);
}

/* the top-level 8bit label back at `at` (where dsn_put_top left it out) when out is 8-bit */
static int dsn_relabel(struct buf *out, size_t at, bool label)
{
	if (!label || !dsn_has_8bit(out->data, out->len))
		return 0;
	return buf_replace(out, at, 0, DSN_CTE_8BIT, sizeof(DSN_CTE_8BIT) - 1);
}

/* dsn_headers_only - a bounce that returns the whole message, cut to its header section */
int dsn_headers_only(const char *in, size_t len, struct buf *out)
{
	static const char cte[] = DSN_CTE_8BIT;
	size_t hlen = dsn_header_len(in, len);
	const char *b;
	int n, blen;
	bool global;
	if (!dsn_boundary(in, hlen, &b, &blen))
		return -1;
	const char *m = dsn_returned_part(in, len, b, blen, &n, &global);
	if (!m)
		return -1;
	const char *msg = m + n, *end = in + len;
	if ((size_t)(end - msg) >= sizeof(cte) - 1 && !memcmp(msg, cte, sizeof(cte) - 1))
		msg += sizeof(cte) - 1;
	if (end - msg < 2 || memcmp(msg, "\r\n", 2))
		return -1;
	msg += 2;
	/* the returned message's headers, up to the bounce's closing boundary when it has no body */
	const char *stop = memmem(msg, (size_t)(end - msg), m, (size_t)(4 + blen));
	size_t mlen = dsn_header_len(msg, (size_t)((stop ? stop : end) - msg));
	bool label;
	int rc = dsn_put_top(in, hlen, out, &label);
	size_t top = out->len;
	rc |= buf_append(out, in + hlen, (size_t)(m - (in + hlen)));
	rc |= buf_printf(out, "\r\n--%.*s\r\nContent-Description: Undelivered Message Headers\r\n"
			 "Content-Type: %s\r\n%s\r\n", blen, b, dsn_returned_type(true, global),
			 dsn_has_8bit(msg, mlen) ? cte : "");
	rc |= buf_append(out, msg, mlen);
	if (mlen > 0 && !(mlen >= 2 && msg[mlen - 2] == '\r' && msg[mlen - 1] == '\n'))
		rc |= buf_append(out, "\r\n", 2);
	rc |= buf_printf(out, "\r\n--%.*s--\r\n", blen, b);
	if (rc == 0)
		rc = dsn_relabel(out, top, label);
	return rc ? -1 : 0;
}

/* dsn_without_content - a bounce from dsn_build with its returned part left out */
int dsn_without_content(const char *in, size_t len, struct buf *out)
{
	static const char *attached[] = { " It's attached below.\r\n", " Its headers are attached below.\r\n" };
	static const char gone[] = " It is not returned.\r\n";
	size_t hlen = dsn_header_len(in, len);
	const char *b;
	int blen;
	char marker[200];
	if (!dsn_boundary(in, hlen, &b, &blen))
		return -1;
	int n = snprintf(marker, sizeof(marker), "\r\n--%.*s\r\nContent-Description: Undelivered Message", blen, b);
	const char *m = memmem(in, len, marker, (size_t)n);
	if (!m)
		return -1;
	bool label;
	int rc = dsn_put_top(in, hlen, out, &label);
	size_t top = out->len;
	rc |= buf_append(out, in + hlen, (size_t)(m - (in + hlen)));
	rc |= buf_printf(out, "\r\n--%.*s--\r\n", blen, b);
	for (int i = 0; rc == 0 && i < 2; i++) {
		const char *a = memmem(out->data + top, out->len - top, attached[i], strlen(attached[i]));
		if (a)
			rc = buf_replace(out, (size_t)(a - out->data), strlen(attached[i]), gone, sizeof(gone) - 1);
	}
	if (rc == 0)
		rc = dsn_relabel(out, top, label);
	return rc ? -1 : 0;
}
