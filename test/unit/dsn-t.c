/*
 * dsn-t - the RFC 3464 notices: bounce structure, per-recipient fields, RET=HDRS, NOTIFY rules,
 * ENVID and ORCPT carried, CRLF only and bounded line lengths; delayed and relayed notices.
 */
#include <stdlib.h>
#include <string.h>

#include "../../relayd/dsn.h"
#include "tap.h"

static const char msg[] =
	"Received: from client.test\r\n"
	"From: <alice@example.org>\r\n"
	"To: <bob@example.net>\r\n"
	"Subject: hello\r\n"
	"\r\n"
	"BODY-LINE-ONE\r\n"
	".a line with a leading dot\r\n";

static struct queue_rcpt rcpts[4];

static void setup(struct queue_envelope *env)
{
	memset(env, 0, sizeof(*env));
	memset(rcpts, 0, sizeof(rcpts));
	strcpy(env->id, "0123456789abcdef");
	env->created = 1700000000;
	env->from = "alice@example.org";
	env->rcpt = rcpts;
	env->nrcpt = 3;
	rcpts[0].addr = "ok@example.net";
	rcpts[0].done_code = 250;
	rcpts[0].done_text = "[mx.example.net] 2.0.0 Ok";
	rcpts[1].addr = "bad@example.net";
	rcpts[1].done_code = 550;
	rcpts[1].done_text = "[mx.example.net] 5.1.1 <bad@example.net>: no such user";
	rcpts[2].addr = "gone@example.net";
	rcpts[2].done_code = 554;
	rcpts[2].done_text = "no enhanced code here";
}

/* the text of the part whose Content-Type is ctype (up to the next boundary) */
static char *part(const char *dsn, const char *ctype)
{
	const char *p = strstr(dsn, ctype);
	if (!p)
		return NULL;
	p = strstr(p, "\r\n\r\n");
	if (!p)
		return NULL;
	p += 4;
	const char *e = strstr(p, "\r\n--=_");
	if (!e)
		return NULL;
	return strndup(p, (size_t)(e - p));
}

static bool lines_ok(const char *s, size_t n)
{
	size_t len = 0;
	for (size_t i = 0; i < n; i++) {
		if (s[i] == '\n' && (i == 0 || s[i - 1] != '\r'))
			return false;
		if (s[i] == '\r' && (i + 1 >= n || s[i + 1] != '\n'))
			return false;
		len = s[i] == '\n' ? 0 : len + 1;
		if (len > 998)
			return false;
	}
	return true;
}

/* the top-level header (up to the first empty line) labels the report 8bit */
static bool top_cte(const char *dsn)
{
	const char *e = strstr(dsn, "\r\n\r\n");
	const char *c = strstr(dsn, "\r\nContent-Transfer-Encoding: 8bit\r\n");
	return e && c && c < e;
}

int main(void)
{
	struct queue_envelope env;
	struct buf out = { 0 };

	setup(&env);
	int n = dsn_build(&env, DSN_ACTION_FAILED, msg, strlen(msg), "relay.test", 1700000100, &out);
	is_int(n, 2, "two failed recipients reported");
	const char *d = out.data;
	ok(d && strstr(d, "From: Mail Delivery System <MAILER-DAEMON@relay.test>\r\n") != NULL, "From: MAILER-DAEMON@hostname");
	ok(d && strstr(d, "To: <alice@example.org>\r\n") != NULL, "To: the original sender");
	ok(d && strstr(d, "Auto-Submitted: auto-replied\r\n") != NULL, "Auto-Submitted (RFC 3834)");
	ok(d && strstr(d, "Content-Type: multipart/report; report-type=delivery-status;") != NULL, "multipart/report");
	ok(lines_ok(out.data, out.len), "CRLF only, lines <= 998");
	char *ds = part(d, "Content-Type: message/delivery-status");
	ok(ds != NULL, "a message/delivery-status part");
	ok(ds && strstr(ds, "Reporting-MTA: dns; relay.test\r\n") != NULL, "Reporting-MTA");
	ok(ds && strstr(ds, "Arrival-Date: ") != NULL, "Arrival-Date");
	ok(ds && !strstr(ds, "Original-Envelope-Id"), "no ENVID, no Original-Envelope-Id");
	ok(ds && !strstr(ds, "ok@example.net"), "the delivered recipient is not reported");
	ok(ds && strstr(ds, "Final-Recipient: rfc822; bad@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\n"
			    "Remote-MTA: dns; mx.example.net\r\n"
			    "Diagnostic-Code: smtp; 550 5.1.1 <bad@example.net>: no such user\r\n") != NULL,
	   "per-recipient fields of bad@ (status from the enhanced code, Remote-MTA)");
	ok(ds && strstr(ds, "Final-Recipient: rfc822; gone@example.net\r\nAction: failed\r\nStatus: 5.0.0\r\n"
			    "Diagnostic-Code: smtp; 554 no enhanced code here\r\n") != NULL,
	   "no enhanced code: Status 5.0.0, no Remote-MTA");
	free(ds);
	char *orig = part(d, "Content-Type: message/rfc822");
	ok(orig && !strcmp(orig, "Received: from client.test\r\nFrom: <alice@example.org>\r\nTo: <bob@example.net>\r\n"
				 "Subject: hello\r\n\r\nBODY-LINE-ONE\r\n.a line with a leading dot\r\n"),
	   "RET not given: the whole original as message/rfc822");
	free(orig);
	ok(d && strstr(d, "<bad@example.net>: host mx.example.net said: 550 5.1.1") != NULL, "human-readable part names the failure");
	ok(d && out.len > 6 && !strcmp(out.data + out.len - 4, "--\r\n"), "closing boundary");
	buf_free(&out);

	/* RET=HDRS, ENVID, ORCPT */
	setup(&env);
	env.ret = "HDRS";
	env.envid = "QQ+2B314";
	rcpts[1].orcpt = "rfc822;Bad+2BAlias@example.net";
	n = dsn_build(&env, DSN_ACTION_FAILED, msg, strlen(msg), "relay.test", 1700000100, &out);
	is_int(n, 2, "RET=HDRS: still two reported");
	d = out.data;
	ok(d && strstr(d, "Content-Type: text/rfc822-headers\r\n") != NULL, "RET=HDRS: text/rfc822-headers");
	ok(d && !strstr(d, "message/rfc822") && !strstr(d, "BODY-LINE-ONE"), "RET=HDRS: no body");
	ok(d && strstr(d, "Subject: hello\r\n") != NULL, "RET=HDRS: the headers are there");
	ok(d && strstr(d, "Original-Envelope-Id: QQ+314\r\n") != NULL, "ENVID carried, xtext decoded");
	ok(d && strstr(d, "Original-Recipient: rfc822; Bad+Alias@example.net\r\nFinal-Recipient: rfc822; bad@example.net\r\n") != NULL,
	   "ORCPT carried as Original-Recipient");
	ok(lines_ok(out.data, out.len), "HDRS: CRLF only");
	buf_free(&out);

	/* NOTIFY */
	setup(&env);
	rcpts[1].notify = DSN_NOTIFY_NEVER;
	rcpts[2].notify = DSN_NOTIFY_SUCCESS | DSN_NOTIFY_DELAY;
	n = dsn_build(&env, DSN_ACTION_FAILED, msg, strlen(msg), "relay.test", 1700000100, &out);
	is_int(n, 0, "NOTIFY=NEVER and NOTIFY without FAILURE: nothing to report");
	is_int((long long)out.len, 0, "and nothing written");
	rcpts[2].notify = DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY;
	n = dsn_build(&env, DSN_ACTION_FAILED, msg, strlen(msg), "relay.test", 1700000100, &out);
	is_int(n, 1, "NOTIFY=FAILURE,DELAY is reported");
	ok(out.data && !strstr(out.data, "bad@example.net") && strstr(out.data, "gone@example.net"),
	   "only the recipient that asked for it");
	buf_free(&out);

	/* a failure without text, and an expired message */
	setup(&env);
	rcpts[1].done_text = NULL;
	rcpts[2].done_text = "4.4.7 Delivery time expired: last error: mx said: 451 4.3.0 try later";
	n = dsn_build(&env, DSN_ACTION_FAILED, msg, strlen(msg), "relay.test", 1700000100, &out);
	is_int(n, 2, "missing text is fine");
	ok(out.data && strstr(out.data, "Status: 4.4.7\r\n") != NULL, "expiry reported with 4.4.7");
	buf_free(&out);

	/* 8-bit original */
	setup(&env);
	const char m8[] = "Subject: caf\xc3\xa9\r\n\r\nd\xc3\xa9j\xc3\xa0\r\n";
	n = dsn_build(&env, DSN_ACTION_FAILED, m8, strlen(m8), "relay.test", 1700000100, &out);
	ok(n == 2 && strstr(out.data, "Content-Type: message/global\r\nContent-Transfer-Encoding: 8bit\r\n") != NULL,
	   "UTF-8 in the original's headers: returned as message/global, 8bit (RFC 6532 3.7)");
	ok(n == 2 && !strstr(out.data, "message/rfc822"), "UTF-8 in the original's headers: not message/rfc822");
	ok(n == 2 && top_cte(out.data), "8-bit original: the multipart/report is labelled 8bit too (RFC 2045 6.4)");
	buf_free(&out);
	dsn_build(&env, DSN_ACTION_FAILED, msg, strlen(msg), "relay.test", 1700000100, &out);
	ok(out.data && !strstr(out.data, "Content-Transfer-Encoding"), "7-bit bounce: no Content-Transfer-Encoding");
	ok(out.data && strstr(out.data, "Content-Type: message/delivery-status\r\n\r\n"), "7-bit bounce: "
	   "message/delivery-status");
	buf_free(&out);
	const char b8[] = "Subject: ascii\r\n\r\nd\xc3\xa9" "j\xc3\xa0\r\n";
	dsn_build(&env, DSN_ACTION_FAILED, b8, strlen(b8), "relay.test", 1700000100, &out);
	ok(out.data && strstr(out.data, "Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n"),
	   "8-bit body, ASCII headers: message/rfc822, 8bit");
	buf_free(&out);
	/* RFC 6533: a UTF-8 address (utf-8 type) goes in message/global-delivery-status, 8bit */
	rcpts[1].addr = "b\xc3\xa4" "d@example.net";
	dsn_build(&env, DSN_ACTION_FAILED, msg, strlen(msg), "relay.test", 1700000100, &out);
	ok(out.data && top_cte(out.data), "8-bit recipient address: the multipart/report is labelled 8bit");
	ok(out.data && strstr(out.data, "Content-Type: message/global-delivery-status\r\n"
				      "Content-Transfer-Encoding: 8bit\r\n\r\n") != NULL,
	   "8-bit recipient address: message/global-delivery-status, 8bit");
	ok(out.data && strstr(out.data, "Final-Recipient: utf-8; b\xc3\xa4" "d@example.net\r\n") != NULL,
	   "8-bit recipient address: Final-Recipient: utf-8; the address");
	ok(out.data && strstr(out.data, "Content-Type: message/rfc822\r\n\r\n") != NULL,
	   "8-bit recipient address, ASCII message: message/rfc822, 7bit");
	buf_free(&out);
	env.ret = "HDRS";
	dsn_build(&env, DSN_ACTION_FAILED, m8, strlen(m8), "relay.test", 1700000100, &out);
	ok(out.data && strstr(out.data, "Content-Type: message/global-headers\r\nContent-Transfer-Encoding: 8bit\r\n"),
	   "RET=HDRS, UTF-8 headers: message/global-headers");
	buf_free(&out);

	/* RFC 2046 5.1.1: the boundary is at most 70 characters, whatever the hostname */
	const char *longhost = "mail-submission-relay-01.eu-west-1.corp.example.com.very-long-name";
	setup(&env);
	dsn_build(&env, DSN_ACTION_FAILED, msg, strlen(msg), longhost, 1700000100, &out);
	const char *bp = out.data ? strstr(out.data, "boundary=\"") : NULL;
	size_t blen = bp ? strcspn(bp + 10, "\"") : 0;
	ok(bp && blen > 0 && blen <= 70, "long hostname: boundary of %zu characters", blen);
	char delim[128];
	snprintf(delim, sizeof(delim), "\r\n--%.*s--\r\n", (int)blen, bp ? bp + 10 : "");
	ok(bp && out.len > strlen(delim) && !strcmp(out.data + out.len - strlen(delim), delim),
	   "long hostname: the closing delimiter uses that boundary");
	struct buf cut0 = { 0 };
	ok(out.data && dsn_headers_only(out.data, out.len, &cut0) == 0, "long hostname: headers only still works");
	buf_free(&cut0);
	buf_free(&out);

	/* a full bounce cut to the headers (for an upstream that cannot take it whole): byte for
	 * byte what RET=HDRS makes, for a 7-bit and an 8-bit body, and for a message without body */
	const char *originals[] = { msg, m8, "Subject: no body\r\n", "Subject: caf\xc3\xa9\r\n\r\nplain\r\n",
				    "Subject: ascii\r\n\r\nd\xc3\xa9j\xc3\xa0\r\n" };
	for (size_t k = 0; k < sizeof(originals) / sizeof(*originals); k++) {
		struct buf full = { 0 }, cut = { 0 }, want = { 0 };
		const char *o = originals[k];
		setup(&env);
		dsn_build(&env, DSN_ACTION_FAILED, o, strlen(o), "relay.test", 1700000100, &full);
		env.ret = "HDRS";
		dsn_build(&env, DSN_ACTION_FAILED, o, strlen(o), "relay.test", 1700000100, &want);
		ok(dsn_headers_only(full.data, full.len, &cut) == 0 && cut.len == want.len &&
		   !memcmp(cut.data, want.data, want.len), "headers only %zu: as RET=HDRS makes it", k);
		buf_free(&cut);
		ok(dsn_headers_only(want.data, want.len, &cut) < 0, "headers only %zu: not again", k);
		buf_free(&full), buf_free(&cut), buf_free(&want);
	}
	ok(dsn_headers_only(msg, strlen(msg), &out) < 0 && out.len == 0, "headers only: not a bounce, refused");

	/* a bounce without its returned part (not even 8-bit headers can go): whole or headers
	 * returned before, the report after, same parts up to it, 7-bit when only the returned
	 * part was 8-bit, and the text no longer says it is attached */
	for (size_t k = 0; k < sizeof(originals) / sizeof(*originals); k++) {
		for (int hdrs = 0; hdrs < 2; hdrs++) {
			struct buf full = { 0 }, none = { 0 };
			setup(&env);
			env.ret = hdrs ? "HDRS" : NULL;
			dsn_build(&env, DSN_ACTION_FAILED, originals[k], strlen(originals[k]), "relay.test", 1700000100, &full);
			int rc = dsn_without_content(full.data, full.len, &none);
			const char *nb = none.data ? strstr(none.data, "boundary=\"") : NULL;
			size_t nblen = nb ? strcspn(nb + 10, "\"") : 0;
			char ndelim[128];
			snprintf(ndelim, sizeof(ndelim), "\r\n--%.*s--\r\n", (int)nblen, nb ? nb + 10 : "");
			ok(rc == 0 && none.len < full.len && nb && !strcmp(none.data + none.len - strlen(ndelim), ndelim),
			   "without content %zu/%d: shorter, closed by the boundary", k, hdrs);
			ok(rc == 0 && !memmem(none.data, none.len, "Undelivered Message", 19) &&
			   memmem(none.data, none.len, "Action: failed", 14) &&
			   memmem(none.data, none.len, "It is not returned.", 19) &&
			   !memmem(none.data, none.len, "attached below", 14),
			   "without content %zu/%d: no returned part, the report kept, the text says so", k, hdrs);
			bool eight = false;
			for (size_t i = 0; i < none.len; i++)
				eight |= (unsigned char)none.data[i] >= 0x80;
			ok(rc == 0 && !eight && !memmem(none.data, none.len, "8bit", 4) && lines_ok(none.data, none.len),
			   "without content %zu/%d: 7-bit, no 8bit label, lines within limits", k, hdrs);
			buf_free(&full), buf_free(&none);
		}
	}
	ok(dsn_without_content(msg, strlen(msg), &out) < 0 && out.len == 0, "without content: not a bounce, refused");

	/* delayed: the pending recipients whose NOTIFY has DELAY or is not given */
	setup(&env);
	rcpts[1].done_code = 0;
	rcpts[1].done_text = NULL;
	rcpts[2].done_code = 0;
	rcpts[2].done_text = NULL;
	rcpts[2].notify = DSN_NOTIFY_FAILURE;
	env.last_error = "mx.example.net:25 said: 451 4.3.0 try later";
	n = dsn_build(&env, DSN_ACTION_DELAYED, msg, strlen(msg), "relay.test", 1700000100, &out);
	is_int(n, 1, "delayed: only the pending recipient without NOTIFY (FAILURE alone: no warning)");
	d = out.data;
	ok(d && strstr(d, "Subject: Delayed Mail (still being retried)\r\n") != NULL, "delayed: Subject");
	ok(d && strstr(d, "Final-Recipient: rfc822; bad@example.net\r\nAction: delayed\r\nStatus: 4.3.0\r\n"
			  "Diagnostic-Code: smtp; 451 4.3.0 try later\r\n") != NULL,
	   "delayed: Action, Status from the last error, Diagnostic-Code");
	ok(d && !strstr(d, "ok@example.net") && !strstr(d, "gone@example.net"), "delayed: not the others");
	ok(d && strstr(d, "Content-Type: text/rfc822-headers\r\n") != NULL && !strstr(d, "BODY-LINE-ONE"),
	   "delayed: headers only");
	ok(d && strstr(d, "WARNING ONLY") != NULL, "delayed: the human part says it is a warning");
	ok(lines_ok(out.data, out.len), "delayed: CRLF only");
	buf_free(&out);
	rcpts[1].notify = DSN_NOTIFY_NEVER;
	is_int(dsn_build(&env, DSN_ACTION_DELAYED, msg, strlen(msg), "relay.test", 1700000100, &out), 0,
	       "delayed: NOTIFY=NEVER: nothing");
	rcpts[1].notify = DSN_NOTIFY_DELAY;
	env.last_error = "mx.example.net:25: connect: Connection refused";
	n = dsn_build(&env, DSN_ACTION_DELAYED, msg, strlen(msg), "relay.test", 1700000100, &out);
	ok(n == 1 && strstr(out.data, "Status: 4.0.0\r\n") && !strstr(out.data, "Diagnostic-Code"),
	   "delayed: NOTIFY=DELAY; no reply: Status 4.0.0, no Diagnostic-Code");
	buf_free(&out);

	/* relayed: delivered, marked, NOTIFY has SUCCESS */
	setup(&env);
	rcpts[0].notify = DSN_NOTIFY_SUCCESS | DSN_NOTIFY_FAILURE;
	is_int(dsn_build(&env, DSN_ACTION_RELAYED, msg, strlen(msg), "relay.test", 1700000100, &out), 0,
	       "relayed: not marked (the upstream passed NOTIFY on): nothing");
	rcpts[0].relay_notice = true;
	rcpts[1].relay_notice = true; /* failed: never relayed */
	rcpts[1].notify = DSN_NOTIFY_SUCCESS;
	n = dsn_build(&env, DSN_ACTION_RELAYED, msg, strlen(msg), "relay.test", 1700000100, &out);
	is_int(n, 1, "relayed: the delivered recipient");
	d = out.data;
	ok(d && strstr(d, "Subject: Successful Mail Delivery Report\r\n") != NULL, "relayed: Subject");
	ok(d && strstr(d, "Final-Recipient: rfc822; ok@example.net\r\nAction: relayed\r\nStatus: 2.0.0\r\n"
			  "Remote-MTA: dns; mx.example.net\r\nDiagnostic-Code: smtp; 250 2.0.0 Ok\r\n") != NULL,
	   "relayed: Action, Status, Remote-MTA, Diagnostic-Code");
	ok(d && !strstr(d, "bad@example.net"), "relayed: not the failed one");
	ok(d && strstr(d, "Content-Type: text/rfc822-headers\r\n") != NULL, "relayed: headers only");
	ok(d && strstr(d, "<ok@example.net>: delivery via mx.example.net: 250 2.0.0 Ok") != NULL,
	   "relayed: human-readable part");
	ok(lines_ok(out.data, out.len), "relayed: CRLF only");
	buf_free(&out);
	rcpts[0].notify = DSN_NOTIFY_FAILURE;
	is_int(dsn_build(&env, DSN_ACTION_RELAYED, msg, strlen(msg), "relay.test", 1700000100, &out), 0,
	       "relayed: without SUCCESS: nothing");

	char x[64];
	ok(dsn_xtext_decode("a+2Bb+3Dc", x, sizeof(x)) == 0 && !strcmp(x, "a+b=c"), "xtext decode");
	ok(dsn_xtext_decode("abcdef", x, 4) < 0, "xtext decode: too long refused");
	return done_testing();
}
