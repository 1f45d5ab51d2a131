/*
 * smtp_reply - parsing an SMTP server's replies (RFC 5321 §4.2) and its EHLO keywords, as
 * the forwarder's client side reads them. Pure functions: no I/O, no logging, no globals.
 */
#ifndef RELAYD_SMTP_REPLY_H
#define RELAYD_SMTP_REPLY_H

#include <stdbool.h>
#include <stddef.h>

#define SMTP_REPLY_LINE_MAX 4096    /* one reply line, without its CRLF */
#define SMTP_REPLY_MAX      65536   /* the text of every line of one reply */

struct smtp_reply {
	int code;                       /* 200..599 */
	char status[16];                /* enhanced status code of the first line (RFC 3463), or "" */
	size_t nlines;
	size_t len;                     /* of text */
	/* each line's text after "ddd-" / "ddd ", joined by '\n'; NUL-terminated */
	char text[SMTP_REPLY_MAX + 1];
	bool complete;                  /* the last call returned 1: the next one starts afresh */
};

/* what an EHLO reply offers (RFC 5321 §4.1.1.1), from its second line on */
struct smtp_ehlo {
	bool starttls, pipelining, eightbitmime, smtputf8, dsn, size;
	bool auth_plain, auth_login;
	unsigned long long size_max;    /* SIZE's argument; 0 = none given */
};

/* smtp_reply_init - an empty reply, ready for smtp_reply_parse() */
void smtp_reply_init(struct smtp_reply *r);
/* smtp_reply_parse - collect one reply from buf: 1 when it is complete in r, 0 when more
 * input is needed, -1 when it is malformed (not "ddd", "ddd-..." or "ddd ...", a code out of
 * 2xx..5xx, lines of one reply with different codes, a line over SMTP_REPLY_LINE_MAX, a
 * reply over SMTP_REPLY_MAX, a NUL). *consumed is set to the bytes used: on 1 the whole
 * reply; on 0 the complete continuation lines, which are kept in r, so the caller drops
 * them and calls again with the same r when more input comes. A line ends at LF, CRLF
 * being the usual ending. After a 1, the next call with r starts a new reply. */
int smtp_reply_parse(const char *buf, size_t len, struct smtp_reply *r, size_t *consumed);
/* smtp_reply_line - the reply's first line of text into out (truncated to fit) */
void smtp_reply_line(const struct smtp_reply *r, char *out, size_t outlen);
/* smtp_reply_ehlo - the keywords of an EHLO reply's text (lines joined by '\n'; the first
 * line is the greeting) */
void smtp_reply_ehlo(const char *text, struct smtp_ehlo *e);

#endif
