/*
 * smtp_parse-t - unit tests of the pure command and parameter parser.
 */
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "../../relayd/queue.h"
#include "../../relayd/smtp_parse.h"
#include "tap.h"

static void test_command(void)
{
	struct smtp_cmd c;
	char l1[] = "ehlo client.example";
	smtp_parse_command(l1, &c);
	ok(c.verb == SMTP_EHLO && !strcmp(c.arg, "client.example"), "EHLO case-insensitive with argument");
	char l2[] = "QUIT";
	smtp_parse_command(l2, &c);
	ok(c.verb == SMTP_QUIT && c.arg[0] == '\0', "QUIT without argument");
	char l3[] = "MAILX FROM:<a@b>";
	smtp_parse_command(l3, &c);
	ok(c.verb == SMTP_UNKNOWN, "MAILX is not MAIL");
	char l4[] = "NOOP   ";
	smtp_parse_command(l4, &c);
	ok(c.verb == SMTP_NOOP && c.arg[0] == '\0', "trailing blanks tolerated");
	char l5[] = "STARTTLS";
	smtp_parse_command(l5, &c);
	ok(c.verb == SMTP_STARTTLS, "STARTTLS");
	char l6[] = "";
	smtp_parse_command(l6, &c);
	ok(c.verb == SMTP_UNKNOWN, "empty line is unknown");
}

static void test_mail(void)
{
	struct smtp_mail_args m;
	const char *reply = NULL;
	char a1[] = "FROM:<alice@example.org> SIZE=1000 BODY=8BITMIME RET=hdrs ENVID=abc+2Bx";
	ok(smtp_parse_mail(a1, &m, &reply) == 0, "MAIL with parameters parses");
	is_str(m.addr, "alice@example.org", "sender address");
	is_int((int)m.size, 1000, "SIZE");
	ok(m.body == SMTP_BODY_8BITMIME, "BODY=8BITMIME");
	is_str(m.ret, "HDRS", "RET upper-cased");
	is_str(m.envid, "abc+2Bx", "ENVID");
	char a2[] = "FROM:<>";
	ok(smtp_parse_mail(a2, &m, &reply) == 0 && m.addr[0] == '\0', "null sender");
	char a3[] = "FROM: <bob@example.org>";
	ok(smtp_parse_mail(a3, &m, &reply) == 0 && !strcmp(m.addr, "bob@example.org"), "space after colon tolerated");
	char a4[] = "FROM:bob@example.org";
	ok(smtp_parse_mail(a4, &m, &reply) < 0 && !strncmp(reply, "501 5.1.7", 9), "missing brackets: 501 5.1.7");
	char a5[] = "FROM:<a@b.org> FOO=1";
	ok(smtp_parse_mail(a5, &m, &reply) < 0 && !strncmp(reply, "555 5.5.4", 9), "unknown parameter: 555 5.5.4");
	char a6[] = "FROM:<a@b.org> SIZE=abc";
	ok(smtp_parse_mail(a6, &m, &reply) < 0 && !strncmp(reply, "501 5.5.4", 9), "bad SIZE: 501 5.5.4");
	char a7[] = "TO:<a@b.org>";
	ok(smtp_parse_mail(a7, &m, &reply) < 0 && !strncmp(reply, "501", 3), "MAIL TO: refused");
	char a8[] = "FROM:<j\xc3\xb6rg@example.org>";
	ok(smtp_parse_mail(a8, &m, &reply) < 0 && !strncmp(reply, "553 5.6.7", 9), "UTF-8 sender without SMTPUTF8: 553 5.6.7");
	char a9[] = "FROM:<j\xc3\xb6rg@example.org> SMTPUTF8";
	ok(smtp_parse_mail(a9, &m, &reply) == 0 && m.smtputf8, "UTF-8 sender with SMTPUTF8");
	char a10[] = "FROM:<@relay.example:a@b.org>";
	ok(smtp_parse_mail(a10, &m, &reply) == 0 && !strcmp(m.addr, "a@b.org"), "source route ignored");
	char a11[] = "FROM:<a@b.org> BODY=BINARYMIME";
	ok(smtp_parse_mail(a11, &m, &reply) < 0, "BINARYMIME not offered");
	char a12[] = "FROM:<a@b.org>x";
	ok(smtp_parse_mail(a12, &m, &reply) < 0, "junk after the path refused");
}

static void test_rcpt(void)
{
	struct smtp_rcpt_args r;
	const char *reply = NULL;
	char a1[] = "TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.net";
	ok(smtp_parse_rcpt(a1, false, &r, &reply) == 0, "RCPT with DSN parameters");
	ok(r.notify == (DSN_NOTIFY_SUCCESS | DSN_NOTIFY_FAILURE), "NOTIFY bits");
	is_str(r.orcpt, "rfc822;bob@example.net", "ORCPT");
	char a2[] = "TO:<bob@example.net> NOTIFY=NEVER,SUCCESS";
	ok(smtp_parse_rcpt(a2, false, &r, &reply) < 0, "NOTIFY=NEVER with others refused");
	char a3[] = "TO:<>";
	ok(smtp_parse_rcpt(a3, false, &r, &reply) < 0 && !strncmp(reply, "501 5.1.3", 9), "empty recipient: 501 5.1.3");
	char a4[] = "TO:<bob>";
	ok(smtp_parse_rcpt(a4, false, &r, &reply) < 0, "recipient without domain refused");
	char a5[] = "TO:<bob@exa mple.net>";
	ok(smtp_parse_rcpt(a5, false, &r, &reply) < 0, "space in domain refused");
	char a6[] = "TO:<bob@example..net>";
	ok(smtp_parse_rcpt(a6, false, &r, &reply) < 0, "empty domain label refused");
	char a7[] = "TO:<bob@[192.0.2.1]>";
	ok(smtp_parse_rcpt(a7, false, &r, &reply) == 0, "address literal accepted");
}

/* reply and syntax corners (audit F5): known parameters used wrongly are 501, not 555 */
static void test_param_corners(void)
{
	struct smtp_mail_args m;
	struct smtp_rcpt_args r;
	const char *reply = NULL;
	static const char *mail_501[] = {
		"FROM:<a@b.org> SIZE=10 SIZE=99999", "FROM:<a@b.org> BODY=8BITMIME BODY=7BIT",
		"FROM:<a@b.org> SMTPUTF8 SMTPUTF8", "FROM:<a@b.org> AUTH", "FROM:<a@b.org> AUTH=",
		"FROM:<a@b.org> AUTH=a@b AUTH=<>", "FROM:<a@b.org> AUTH=a=b", "FROM:<a@b.org> SIZE=123456789012345678901",
		"FROM:<a@b.org> SIZE=+5",
	};
	for (size_t i = 0; i < sizeof(mail_501) / sizeof(mail_501[0]); i++) {
		char a[200];
		snprintf(a, sizeof(a), "%s", mail_501[i]);
		reply = NULL;
		ok(smtp_parse_mail(a, &m, &reply) < 0 && reply && !strncmp(reply, "501 5.5.4", 9), "MAIL %s: 501 5.5.4",
		   mail_501[i]);
	}
	char a1[] = "FROM:<a@b.org> AUTH=<>";
	ok(smtp_parse_mail(a1, &m, &reply) == 0 && m.auth, "AUTH=<> accepted");
	char a2[] = "FROM:<a@b.org> AUTH=a+40b.org";
	ok(smtp_parse_mail(a2, &m, &reply) == 0, "AUTH=xtext accepted");
	char a3[] = "FROM:<a@b.org> SIZE=99999999999999999999";
	ok(smtp_parse_mail(a3, &m, &reply) == 0 && m.size == LLONG_MAX, "20-digit SIZE is valid, and huge");
	char a4[] = "FROM:<@a:>";
	ok(smtp_parse_mail(a4, &m, &reply) < 0 && !strncmp(reply, "501 5.1.7", 9), "<@a:> is not the null sender");

	static const char *rcpt_501[] = {
		"TO:<a@b.org> NOTIFY=FAILURE NOTIFY=DELAY", "TO:<a@b.org> NOTIFY", "TO:<a@b.org> ORCPT",
		"TO:<a@b.org> ORCPT=rfc822;a@b.org ORCPT=rfc822;a@b.org",
	};
	for (size_t i = 0; i < sizeof(rcpt_501) / sizeof(rcpt_501[0]); i++) {
		char a[200];
		snprintf(a, sizeof(a), "%s", rcpt_501[i]);
		reply = NULL;
		ok(smtp_parse_rcpt(a, false, &r, &reply) < 0 && reply && !strncmp(reply, "501 5.5.4", 9), "RCPT %s: 501 5.5.4",
		   rcpt_501[i]);
	}
	char a5[] = "TO:<a@b.org> FOO=1";
	ok(smtp_parse_rcpt(a5, false, &r, &reply) < 0 && !strncmp(reply, "555 5.5.4", 9), "unknown RCPT parameter: 555");

	size_t n;
	bool last;
	ok(smtp_parse_bdat("5LAST", &n, &last, &reply) < 0, "BDAT 5LAST refused");
	ok(smtp_parse_bdat("5 LAST", &n, &last, &reply) == 0 && n == 5 && last, "BDAT 5 LAST");
}

static void test_bdat(void)
{
	size_t n;
	bool last;
	const char *reply;
	ok(smtp_parse_bdat("100 LAST", &n, &last, &reply) == 0 && n == 100 && last, "BDAT 100 LAST");
	ok(smtp_parse_bdat("0", &n, &last, &reply) == 0 && n == 0 && !last, "BDAT 0");
	ok(smtp_parse_bdat("x", &n, &last, &reply) < 0, "BDAT x refused");
	ok(smtp_parse_bdat("10 FIRST", &n, &last, &reply) < 0, "BDAT 10 FIRST refused");
	ok(smtp_parse_bdat("-1", &n, &last, &reply) < 0, "negative BDAT refused");
}

static void test_xtext(void)
{
	ok(smtp_xtext_valid("abc+2B"), "xtext with hex escape");
	ok(!smtp_xtext_valid("a=b"), "'=' not allowed in xtext");
	ok(!smtp_xtext_valid("a+2"), "short escape refused");
	ok(smtp_addr_valid("a.b-c+d@sub.example.org", false), "ordinary address");
	ok(!smtp_addr_valid("a@", false), "no domain");
	ok(!smtp_addr_valid("@b.org", false), "no local part");
	ok(!smtp_addr_valid("a<b@c.org", false), "'<' in local part refused");
}

/* a quoted local part is parsed (RFC 5321 §4.1.2), not only its first and last character */
static void test_quoted_local(void)
{
	ok(smtp_addr_valid("\"john.doe\"@example.net", false), "quoted local part");
	ok(smtp_addr_valid("\"a\\\"b\\\\c@d\"@example.net", false), "quoted-pairs and '@' inside the quotes");
	ok(smtp_addr_valid("\"x=1;<y>\"@example.net", false), "specials are qtext");
	ok(!smtp_addr_valid("\"x=1\"reason=\"y\"@example.net", false), "two quoted strings around text refused");
	ok(!smtp_addr_valid("\"a\".\"b\"@example.net", false), "quoted strings joined by a dot refused");
	ok(!smtp_addr_valid("\"a\"b@example.net", false), "quoted string then atext refused");
	ok(!smtp_addr_valid("a\"b\"@example.net", false), "atext then quoted string refused");
	ok(!smtp_addr_valid("\"@example.net", false), "a lone quote refused");
	ok(!smtp_addr_valid("\"a\\\"@example.net", false), "the closing quote escaped refused");
	ok(!smtp_addr_valid("\"john doe\"@example.net", false), "SP in quotes refused (queue format)");
	ok(!smtp_addr_valid("\"john\\ doe\"@example.net", false), "quoted SP refused (queue format)");
	ok(!smtp_addr_valid("\"a\tb\"@example.net", false), "TAB in quotes refused");
	ok(!smtp_addr_valid("\"a\\\x01\"@example.net", false), "quoted control refused");
	ok(!smtp_addr_valid("\"j\xc3\xa9\"@example.net", false), "8-bit in quotes without SMTPUTF8 refused");
	ok(smtp_addr_valid("\"j\xc3\xa9\"@example.net", true), "UTF-8 in quotes with SMTPUTF8");
	ok(!smtp_addr_valid("\"\\\xc3\xa9\"@example.net", true), "quoted-pair of a non-ASCII character refused");
	struct smtp_rcpt_args r;
	const char *reply = NULL;
	char a1[] = "TO:<\"x=1\"reason=\"y\"@example.net>";
	ok(smtp_parse_rcpt(a1, false, &r, &reply) < 0 && reply && !strncmp(reply, "501 5.1.3", 9),
	   "RCPT with text between quoted strings: 501 5.1.3");
	char a2[] = "FROM:<\"a\"\"b\"@example.org>";
	struct smtp_mail_args m;
	ok(smtp_parse_mail(a2, &m, &reply) < 0 && reply && !strncmp(reply, "501 5.1.7", 9),
	   "MAIL with two quoted strings: 501 5.1.7");
}

/* under SMTPUTF8 only well-formed UTF-8 without C1 controls (RFC 6531 §3.3) */
static void test_utf8_addr(void)
{
	ok(smtp_addr_valid("j\xc3\xb6rg@b\xc3\xbc" "cher.example", true), "UTF-8 local part and domain");
	ok(!smtp_addr_valid("al\xc2\x85ice@example.org", true), "NEL (U+0085) refused");
	ok(!smtp_addr_valid("al\xc2\x9b" "2J@example.org", true), "CSI (U+009B) refused");
	ok(!smtp_addr_valid("al\xffice@example.org", true), "byte FF refused");
	ok(!smtp_addr_valid("al\x9bice@example.org", true), "a raw C1 byte refused");
	ok(!smtp_addr_valid("a\xc0\xaf@example.org", true), "overlong refused");
	ok(!smtp_addr_valid("a\xed\xa0\x80@example.org", true), "surrogate refused");
	ok(!smtp_addr_valid("a\xf4\x90\x80\x80@example.org", true), "above U+10FFFF refused");
	ok(!smtp_addr_valid("a@ex\xe2\x82" "ample.org", true), "cut sequence in the domain refused");
	ok(!smtp_addr_valid("\"\xc2\x85\"@example.org", true), "NEL in a quoted local part refused");
	struct smtp_mail_args m;
	struct smtp_rcpt_args r;
	const char *reply = NULL;
	char a1[] = "FROM:<al\xc2\x85ice\xff\x9b" "2J@example.org> SMTPUTF8";
	ok(smtp_parse_mail(a1, &m, &reply) < 0 && reply && !strncmp(reply, "501 5.1.7", 9),
	   "MAIL SMTPUTF8 with invalid UTF-8: 501 5.1.7");
	char a2[] = "FROM:<al\xc3\xaf" "ce@example.org>";
	ok(smtp_parse_mail(a2, &m, &reply) < 0 && reply && !strncmp(reply, "553 5.6.7", 9),
	   "MAIL without SMTPUTF8 with UTF-8: 553 5.6.7, as before");
	char a3[] = "TO:<b\xc2\x9bob@example.net>";
	ok(smtp_parse_rcpt(a3, true, &r, &reply) < 0 && reply && !strncmp(reply, "501 5.1.3", 9),
	   "RCPT with a C1 control under SMTPUTF8: 501 5.1.3");
	char a4[] = "TO:<b\xc3\xb6" "b@example.net>";
	ok(smtp_parse_rcpt(a4, true, &r, &reply) == 0, "RCPT with UTF-8 under SMTPUTF8");
	char a5[] = "TO:<b\xff" "b@example.net>";
	ok(smtp_parse_rcpt(a5, false, &r, &reply) < 0 && reply && !strncmp(reply, "553 5.6.7", 9),
	   "RCPT with 8-bit without SMTPUTF8: 553 5.6.7");
	char a[SMTP_FROM_MAX][256];
	const char *h1 = "From: <x\x1b[2J@example.org>\r\n";
	ok(smtp_header_from(h1, strlen(h1), a, &reply) == -1 && !strncmp(reply, "550 5.6.0", 9),
	   "From: address with ESC: 550 5.6.0");
	const char *h2 = "From: x\xc2\x9b" "2J\xff@example.org\r\n";
	ok(smtp_header_from(h2, strlen(h2), a, &reply) == -1 && !strncmp(reply, "550 5.6.0", 9),
	   "From: address with CSI and byte FF: 550 5.6.0");
	const char *h3 = "From: J\xc3\xb6rg <j\xc3\xb6rg@example.org>\r\n";
	ok(smtp_header_from(h3, strlen(h3), a, &reply) == 1 && !strcmp(a[0], "j\xc3\xb6rg@example.org"),
	   "From: address in UTF-8 (RFC 6532)");
}

static void test_header_from(void)
{
	char a[SMTP_FROM_MAX][256];
	const char *reply = NULL;
	const char *h1 = "Subject: x\r\nFrom: \"Alice, A.\" <alice@example.org>\r\nTo: b@c.d\r\n";
	ok(smtp_header_from(h1, strlen(h1), a, &reply) == 1 && !strcmp(a[0], "alice@example.org"),
	   "display name with a quoted comma");
	const char *h2 = "from: bob@example.net (Bob),\r\n\tcarol@example.net\r\n";
	int n = smtp_header_from(h2, strlen(h2), a, &reply);
	ok(n == 2 && !strcmp(a[0], "bob@example.net") && !strcmp(a[1], "carol@example.net"),
	   "two mailboxes, a comment and a folded line (%d)", n);
	const char *h3 = "To: x@y.z\r\n";
	ok(smtp_header_from(h3, strlen(h3), a, &reply) == 0, "absent From: gives 0");
	const char *h4 = "From: undisclosed\r\n";
	reply = NULL;
	ok(smtp_header_from(h4, strlen(h4), a, &reply) == -1 && reply && !strncmp(reply, "550 5.6.0", 9),
	   "From: without an address gives -1 and 550 5.6.0");
	const char *h5 = "From-Extra: e@x.y\r\nFrom: <d@example.com>\r\n";
	ok(smtp_header_from(h5, strlen(h5), a, &reply) == 1 && !strcmp(a[0], "d@example.com"),
	   "From-Extra: is not From:");

	/* the address as MAIL FROM would read it: a quoted local part kept, malformed ones refused */
	const char *q1 = "From: <\"john.doe\"@example.org>\r\n";
	ok(smtp_header_from(q1, strlen(q1), a, &reply) == 1 && !strcmp(a[0], "\"john.doe\"@example.org"),
	   "a quoted local part is kept, as in MAIL FROM (%s)", a[0]);
	const char *q2 = "From: \"john doe\"@example.org\r\n";
	ok(smtp_header_from(q2, strlen(q2), a, &reply) == 1 && !strcmp(a[0], "\"john doe\"@example.org"),
	   "a quoted local part with a space, without <> (%s)", a[0]);
	const char *q3 = "From: \"Carol <boss>\" <carol@example.org>\r\n";
	ok(smtp_header_from(q3, strlen(q3), a, &reply) == 1 && !strcmp(a[0], "carol@example.org"),
	   "a display name with <> inside its quotes is left out");
	const char *bad[] = { "From: <\"ceo@bank.example\"carol@example.org>\r\n",
			      "From: <carol@example.org\"@evil.example\">\r\n",
			      "From: <carol@example.org\"@evil.example>\r\n",
			      "From: <@relay.example:carol@example.org>\r\n",
			      "From: \"Carol\" carol@example.org\r\n" };
	for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++) {
		reply = NULL;
		ok(smtp_header_from(bad[i], strlen(bad[i]), a, &reply) == -1 && reply && !strncmp(reply, "550 5.6.0", 9),
		   "malformed address refused with 550 5.6.0: %.40s", bad[i] + 6);
	}
}

/* the ways around the From: check that the audit found (F1), each closed */
static void test_header_from_bypass(void)
{
	char a[SMTP_FROM_MAX][256];
	const char *reply = NULL;
	const char *h1 = "From: <alice@example.org>\r\nSubject: x\r\nFROM: <ceo@bank.example>\r\n";
	ok(smtp_header_from(h1, strlen(h1), a, &reply) == -1 && reply && strstr(reply, "more than one From:"),
	   "a second From: header is refused");
	const char *h2 = "Subject: x\r\nFrom : <ceo@bank.example>\r\n";
	ok(smtp_header_from(h2, strlen(h2), a, &reply) == 1 && !strcmp(a[0], "ceo@bank.example"),
	   "obsolete 'From :' is a From: field");
	const char *h3 = "From\t \t:ceo@bank.example\r\n";
	ok(smtp_header_from(h3, strlen(h3), a, &reply) == 1 && !strcmp(a[0], "ceo@bank.example"),
	   "tabs before the colon too");
	const char *h4 = "From: <alice@example.org>\r\nFrom : <ceo@bank.example>\r\n";
	ok(smtp_header_from(h4, strlen(h4), a, &reply) == -1, "'From:' and 'From :' are two From: fields");

	/* exactly SMTP_FROM_MAX mailboxes: all returned; one more: refused */
	char h[8192] = "From:";
	for (int i = 0; i < SMTP_FROM_MAX; i++)
		snprintf(h + strlen(h), sizeof(h) - strlen(h), " <u%d@example.org>,\r\n", i);
	strcat(h, " (end)\r\n");
	int n = smtp_header_from(h, strlen(h), a, &reply);
	ok(n == SMTP_FROM_MAX && !strcmp(a[SMTP_FROM_MAX - 1], "u31@example.org"), "%d mailboxes all returned (%d)",
	   SMTP_FROM_MAX, n);
	strcat(h, " , <ceo@bank.example>\r\n");
	reply = NULL;
	ok(smtp_header_from(h, strlen(h), a, &reply) == -1 && reply && !strncmp(reply, "550 5.6.0", 9),
	   "one mailbox over the cap is refused, not dropped");

	/* a mailbox after 10 kB of folded comment is still found */
	static char big[16384];
	strcpy(big, "From: <alice@example.org>\r\n");
	size_t bl = strlen(big);
	for (int i = 0; i < 10; i++) {
		big[bl++] = ' ';
		big[bl++] = '(';
		memset(big + bl, 'x', 900);
		bl += 900;
		memcpy(big + bl, ")\r\n", 3);
		bl += 3;
	}
	const char *tail = " , <ceo@bank.example>\r\nSubject: x\r\n";
	memcpy(big + bl, tail, strlen(tail) + 1);
	bl += strlen(tail);
	n = smtp_header_from(big, bl, a, &reply);
	ok(n == 2 && !strcmp(a[1], "ceo@bank.example"), "the mailbox after 9 kB of comment is returned (%d)", n);

	/* one mailbox that hides a second address */
	const char *h6 = "From: <ceo@bank.example> <alice@example.org>\r\n";
	ok(smtp_header_from(h6, strlen(h6), a, &reply) == -1, "two <> in one mailbox refused");
	const char *h7 = "From: <ceo@bank.example>: alice@example.org;\r\n";
	ok(smtp_header_from(h7, strlen(h7), a, &reply) == -1, "a group name after <> refused");
	char h8[400] = "From: <";
	memset(h8 + strlen(h8), 'a', 300);
	strcat(h8, "@example.org>\r\n");
	ok(smtp_header_from(h8, strlen(h8), a, &reply) == -1, "an address over 255 chars refused, not cut");
	const char *h9 = "From: (a \\) <ceo@bank.example> ) alice@example.org\r\n";
	ok(smtp_header_from(h9, strlen(h9), a, &reply) == 1 && !strcmp(a[0], "alice@example.org"),
	   "quoted-pair inside a comment (RFC 5322 3.2.2)");
	const char *h10 = "Subject: x\r\n From: <ceo@bank.example>\r\n";
	ok(smtp_header_from(h10, strlen(h10), a, &reply) == 0, "a continuation line is not a field");
	const char *h11 = "From: \"Group\": <a@example.org>, b@example.org;\r\n";
	n = smtp_header_from(h11, strlen(h11), a, &reply);
	ok(n == 2 && !strcmp(a[0], "a@example.org") && !strcmp(a[1], "b@example.org"), "group syntax (%d)", n);
}

/* where the header section ends (RFC 5322 §2.2, §3.5), with and without the empty line */
static void test_header_section(void)
{
	static const struct {
		const char *msg;
		size_t hlen;
		bool nosep;
		const char *name;
	} cases[] = {
		{ "Subject: x\r\n\tfolded\r\nTo: a@b.c\r\n\r\nbody\r\n", 32, false, "fields, a continuation, the empty line" },
		{ "Subject: x\r\n", 12, false, "a header section and no body" },
		{ "", 0, false, "an empty message" },
		{ "\r\nbody\r\n", 0, false, "a message that starts with the empty line" },
		{ "hello world\r\nsecond line\r\n", 0, true, "text and no header section" },
		{ "From: <a@b.c>\r\nSubject: nb\r\nbody text\r\n", 28, true, "fields, then text without the empty line" },
		{ " continued; fake\r\nSubject: x\r\n", 0, true, "a first line that starts with a space" },
		{ "Subject : obs\r\nX-A\t:b\r\nno colon here\r\n", 23, true, "WSP before the colon is a field" },
		{ "Subject: x\r\n: no name\r\n", 12, true, "a line that starts with a colon is not a field" },
		{ "Subject: x\r\nS\xc3\xbc" "bject: y\r\n", 12, true, "an 8-bit field name is not a field" },
		{ "Subject: x\r\nFrom: <a@b.c>", 25, false, "the last field without its CRLF (BDAT)" },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		bool nosep = !cases[i].nosep;
		size_t hlen = smtp_header_section(cases[i].msg, strlen(cases[i].msg), &nosep);
		ok(hlen == cases[i].hlen && nosep == cases[i].nosep, "%s (%zu, %d)", cases[i].name, hlen, nosep);
	}
}

/* the client's address in Received: (RFC 5321 §4.1.3 address literals) */
static void test_addr_literal(void)
{
	static const char *cases[][2] = {
		{ "127.0.0.1", "127.0.0.1" }, { "::1", "IPv6:::1" }, { "2001:db8::25", "IPv6:2001:db8::25" },
		{ "::ffff:192.0.2.1", "192.0.2.1" }, { "::FFFF:192.0.2.1", "192.0.2.1" },
		{ "fe80::1%eth0", "IPv6:fe80::1" }, { "::ffff:1:2", "IPv6:::ffff:1:2" },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char out[64];
		smtp_addr_literal(cases[i][0], out, sizeof(out));
		is_str(out, cases[i][1], cases[i][0]);
	}
}

/* is a field there, in any case and in the obsolete "Name :" form (RFC 5322 §4.5) */
static void test_header_present(void)
{
	const char *h = "message-id : <a@b>\r\nDATE\t:Mon, 1 Jan 2024 10:00:00 +0000\r\n X-Date: y\r\nDated: z\r\n";
	ok(smtp_header_present(h, strlen(h), "Message-ID"), "'message-id :' is a Message-ID field");
	ok(smtp_header_present(h, strlen(h), "Date"), "'DATE\\t:' is a Date field");
	const char *h2 = "Dated: z\r\nSubject: x\r\n\tDate: folded\r\nX-Message-ID: <c@d>\r\n";
	ok(!smtp_header_present(h2, strlen(h2), "Date"), "Dated: and a continuation line are not Date");
	ok(!smtp_header_present(h2, strlen(h2), "Message-ID"), "X-Message-ID: is not Message-ID");
	ok(!smtp_header_present("Date", 4, "Date"), "a name without a colon is not a field");
}

int main(void)
{
	test_header_present();
	test_addr_literal();
	test_header_section();
	test_header_from();
	test_header_from_bypass();
	test_command();
	test_mail();
	test_rcpt();
	test_bdat();
	test_param_corners();
	test_xtext();
	test_quoted_local();
	test_utf8_addr();
	return done_testing();
}
