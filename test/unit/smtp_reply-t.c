/*
 * smtp_reply-t - the client-side reply parser: single and multi-line replies, enhanced
 * status codes, input in pieces, the limits (line, reply), malformed replies (bad code,
 * mixed codes, NUL, bad separator), and the EHLO keyword parser.
 */
#include <stdlib.h>
#include <string.h>

#include "../../relayd/smtp_reply.h"
#include "tap.h"

static struct smtp_reply r;

/* parse s whole with a fresh reply; consumed in *used */
static int parse(const char *s, size_t *used)
{
	smtp_reply_init(&r);
	return smtp_reply_parse(s, strlen(s), &r, used);
}

/* feed s one byte at a time, dropping what is consumed, as forward_session.c does */
static int parse_bytewise(const char *s)
{
	char buf[256];
	size_t have = 0, used;
	int rc = 0;
	smtp_reply_init(&r);
	for (size_t i = 0; s[i]; i++) {
		buf[have++] = s[i];
		rc = smtp_reply_parse(buf, have, &r, &used);
		if (rc != 0)
			return rc;
		memmove(buf, buf + used, have - used);
		have -= used;
	}
	return rc;
}

int main(void)
{
	size_t used;
	char line[64];

	/* single line */
	is_int(parse("250 2.1.0 Ok\r\n", &used), 1, "single line: complete");
	is_int(r.code, 250, "code");
	is_str(r.status, "2.1.0", "enhanced status code");
	is_str(r.text, "2.1.0 Ok", "text keeps the enhanced code");
	is_int((long long)r.nlines, 1, "one line");
	is_int((long long)used, 14, "consumed the whole line");

	is_int(parse("220\r\n", &used), 1, "bare code ends a reply");
	is_int(r.code, 220, "bare code");
	is_str(r.text, "", "no text");
	is_str(r.status, "", "no enhanced code");

	is_int(parse("250 Ok\n", &used), 1, "bare LF ends a line too");
	is_str(r.text, "Ok", "text without CR");

	/* multi-line, and what follows it */
	const char *ehlo = "250-relay.test greets you\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 DSN\r\n354 next\r\n";
	is_int(parse(ehlo, &used), 1, "multi-line reply complete");
	is_int((long long)r.nlines, 4, "four lines");
	is_str(r.text, "relay.test greets you\nPIPELINING\nSIZE 1000\nDSN", "lines joined by LF");
	is_int((long long)used, (long long)(strlen(ehlo) - strlen("354 next\r\n")), "stops after the last line");
	smtp_reply_line(&r, line, sizeof(line));
	is_str(line, "relay.test greets you", "smtp_reply_line: the first line");
	is_int(smtp_reply_parse(ehlo + used, strlen(ehlo + used), &r, &used), 1, "the next reply with the same r");
	is_int(r.code, 354, "next reply's code");
	is_str(r.text, "next", "next reply's text: the old one is gone");
	is_int((long long)r.nlines, 1, "next reply: one line");

	/* incomplete input */
	is_int(parse("250 Ok", &used), 0, "no newline: need more");
	is_int((long long)used, 0, "nothing consumed");
	is_int(parse("250-one\r\n250-two\r\n25", &used), 0, "continuation lines only: need more");
	is_int((long long)used, 18, "continuation lines consumed");
	is_int(smtp_reply_parse("250 three\r\n", 11, &r, &used), 1, "completed on the next call");
	is_str(r.text, "one\ntwo\nthree", "lines kept across calls");
	is_int(parse("", &used), 0, "empty input: need more");

	is_int(parse_bytewise("250-a\r\n250-b\r\n250 5.0.0 c\r\n"), 1, "byte by byte: complete");
	is_str(r.text, "a\nb\n5.0.0 c", "byte by byte: text");
	is_str(r.status, "", "the enhanced code comes from the first line only");

	/* enhanced status codes */
	parse("550 5.1.1 <x@y>: no such user\r\n", &used);
	is_str(r.status, "5.1.1", "5.1.1");
	parse("451 4.7.500 later\r\n", &used);
	is_str(r.status, "4.7.500", "three-digit detail");
	parse("550 4.1.1 wrong class\r\n", &used);
	is_str(r.status, "", "class must match the code");
	parse("250 2.0.0\r\n", &used);
	is_str(r.status, "2.0.0", "code alone on the line");
	parse("250 2.0.0x\r\n", &used);
	is_str(r.status, "", "junk after the code");
	parse("250 2.1234.0 x\r\n", &used);
	is_str(r.status, "", "four-digit subject");

	/* malformed */
	is_int(parse("hello\r\n", &used), -1, "not a code");
	is_int(parse("25\r\n", &used), -1, "two digits");
	is_int(parse("150 x\r\n", &used), -1, "1xx is not a reply here");
	is_int(parse("650 x\r\n", &used), -1, "6xx");
	is_int(parse("2a0 x\r\n", &used), -1, "letter in the code");
	is_int(parse("250x\r\n", &used), -1, "bad separator");
	is_int(parse("250-one\r\n251 two\r\n", &used), -1, "mixed codes");
	is_int(parse("250-one\r\n251", &used), 0, "mixed codes: only seen once the line ends");
	is_int(parse_bytewise("250-one\r\n251 two\r\n"), -1, "mixed codes across calls");
	is_int(smtp_reply_parse("250 a\0b\r\n", 9, (smtp_reply_init(&r), &r), &used), -1, "NUL in a line");
	is_int(smtp_reply_parse("250 a\0", 6, (smtp_reply_init(&r), &r), &used), -1, "NUL before the newline");

	/* limits */
	size_t n = SMTP_REPLY_LINE_MAX;
	char *big = malloc(SMTP_REPLY_MAX * 2);
	memset(big, 'x', n + 8);
	memcpy(big, "250 ", 4);
	memcpy(big + n, "\r\n", 2);
	is_int(smtp_reply_parse(big, n + 2, (smtp_reply_init(&r), &r), &used), 1, "a line of SMTP_REPLY_LINE_MAX");
	memset(big, 'x', n + 8);
	memcpy(big, "250 ", 4);
	is_int(smtp_reply_parse(big, n, (smtp_reply_init(&r), &r), &used), 0, "unterminated, at the limit: need more");
	is_int(smtp_reply_parse(big, n + 1, (smtp_reply_init(&r), &r), &used), -1,
	       "unterminated past the limit: malformed before the newline");
	big[n] = '\r';
	is_int(smtp_reply_parse(big, n + 1, (smtp_reply_init(&r), &r), &used), 0, "the limit and a CR: need more");
	/* a reply of many full lines passes SMTP_REPLY_MAX */
	size_t off = 0;
	while (off + 1000 < SMTP_REPLY_MAX * 2 - 1000) {
		memset(big + off, 'y', 998);
		memcpy(big + off, "250-", 4);
		memcpy(big + off + 998, "\r\n", 2);
		off += 1000;
	}
	int rc = smtp_reply_parse(big, off, (smtp_reply_init(&r), &r), &used);
	is_int(rc, -1, "a reply past SMTP_REPLY_MAX is malformed");
	ok(r.len <= SMTP_REPLY_MAX, "the text never passes SMTP_REPLY_MAX (%zu)", r.len);
	free(big);

	/* EHLO keywords */
	struct smtp_ehlo e;
	smtp_reply_ehlo("relay.test hi\nSTARTTLS\npipelining\n8BITMIME\nSMTPUTF8\nDSN\nSIZE 52428800\n"
			"AUTH LOGIN PLAIN CRAM-MD5",
			&e);
	ok(e.starttls && e.pipelining && e.eightbitmime && e.smtputf8 && e.dsn && e.size, "EHLO: every keyword");
	ok(e.auth_plain && e.auth_login, "EHLO: AUTH PLAIN and LOGIN");
	is_int((long long)e.size_max, 52428800, "EHLO: SIZE argument");
	smtp_reply_ehlo("STARTTLS first line is the greeting\nAUTH=PLAIN\nSIZE", &e);
	ok(!e.starttls, "EHLO: the greeting line is not a keyword");
	ok(e.auth_plain && !e.auth_login, "EHLO: AUTH=PLAIN (old form)");
	ok(e.size && e.size_max == 0, "EHLO: SIZE without a limit");
	smtp_reply_ehlo("only a greeting", &e);
	ok(!e.dsn && !e.pipelining && !e.size, "EHLO: nothing offered");
	return done_testing();
}
