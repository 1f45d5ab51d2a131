/*
 * smtp_parse - pure parsing of SMTP command lines and their parameters (RFC 5321 §4.1,
 * RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 6531 SMTPUTF8, RFC 3461 DSN, RFC 3030 BDAT,
 * RFC 4954 AUTH=). No I/O, no allocation: results point into the line, which is modified
 * in place. Errors come back as a complete reply ("501 5.5.4 ...") for the session to send.
 */
#ifndef RELAYD_SMTP_PARSE_H
#define RELAYD_SMTP_PARSE_H

#include <stdbool.h>
#include <stddef.h>

#define SMTP_FROM_MAX 32        /* mailboxes in a From: header */

enum smtp_verb {
	SMTP_UNKNOWN, SMTP_HELO, SMTP_EHLO, SMTP_MAIL, SMTP_RCPT, SMTP_DATA, SMTP_BDAT, SMTP_RSET,
	SMTP_NOOP, SMTP_QUIT, SMTP_HELP, SMTP_VRFY, SMTP_EXPN, SMTP_STARTTLS, SMTP_AUTH
};

struct smtp_cmd {
	enum smtp_verb verb;
	char *arg;               /* text after the verb and one space; "" if none */
};

enum smtp_body_type { SMTP_BODY_NONE, SMTP_BODY_7BIT, SMTP_BODY_8BITMIME, SMTP_BODY_BINARYMIME };

struct smtp_mail_args {
	char *addr;              /* reverse-path without <>; "" for the null sender */
	long long size;          /* SIZE= (LLONG_MAX when over 19 digits) or -1 */
	enum smtp_body_type body;
	bool smtputf8;
	char *ret;               /* "FULL" / "HDRS" or NULL */
	char *envid;             /* xtext or NULL */
	bool auth;               /* AUTH= was given (RFC 4954 §5; not used further) */
};

struct smtp_rcpt_args {
	char *addr;              /* forward-path without <> */
	unsigned notify;         /* DSN_NOTIFY_* bits from queue.h, 0 if not given */
	char *orcpt;             /* "rfc822;..." or NULL */
};

/* smtp_parse_command - split a line (no CRLF, NUL-terminated) into verb and argument */
void smtp_parse_command(char *line, struct smtp_cmd *cmd);
/* smtp_parse_mail - parse "FROM:<addr> params"; 0, or -1 with *reply set */
int smtp_parse_mail(char *arg, struct smtp_mail_args *m, const char **reply);
/* smtp_parse_rcpt - parse "TO:<addr> params"; 0, or -1 with *reply set */
int smtp_parse_rcpt(char *arg, bool smtputf8, struct smtp_rcpt_args *r, const char **reply);
/* smtp_parse_bdat - parse "SIZE [LAST]"; 0, or -1 with *reply set */
int smtp_parse_bdat(const char *arg, size_t *size, bool *last, const char **reply);
/* smtp_addr_valid - a mailbox local@domain (RFC 5321 §4.1.2): the local part one
 * Quoted-string (without SP) or a Dot-string (leniently: empty atoms pass); non-ASCII only
 * when utf8 */
bool smtp_addr_valid(const char *addr, bool utf8);
/* smtp_xtext_valid - RFC 3461 §4 xtext */
bool smtp_xtext_valid(const char *s);
/* smtp_header_from - the addr-specs of the From: field (RFC 5322 §3.6.2, also the obsolete
 * "From :" of §4.5.2) in the header section hdrs[0..len): unfolded, display names and
 * comments skipped, group syntax tolerated, every mailbox of any length looked at. Writes
 * up to SMTP_FROM_MAX addresses of up to 255 chars; returns the count, 0 if there is no
 * From:, or -1 with *reply set ("550 5.6.0 ...") when there is more than one From:, more
 * than SMTP_FROM_MAX mailboxes, or a mailbox that is not one parsable address. */
int smtp_header_from(const char *hdrs, size_t len, char out[][256], const char **reply);
/* smtp_addr_literal - the text between the brackets of an address literal (RFC 5321
 * §4.1.3) for a numeric address from getnameinfo: IPv4 as is, IPv6 as "IPv6:addr" (without
 * a "%zone"), a v4-mapped ::ffff:a.b.c.d as the IPv4 address */
void smtp_addr_literal(const char *ip, char *out, size_t outlen);
/* smtp_header_section - the length of the header section at the start of msg[0..len)
 * (RFC 5322 §2.2, §3.5): its header fields (1*ftext *WSP ":") and their continuation lines,
 * up to and including the CRLF of the last one. It ends before the first line that is
 * neither: the empty line, or a line of text when the client left the empty line out;
 * *nosep is true in that second case (a body follows with no separator). A first line
 * that starts with WSP is not a continuation: the section is then empty. */
size_t smtp_header_section(const char *msg, size_t len, bool *nosep);
/* smtp_header_present - does the header section hdrs[0..len) hold a field of this name (no
 * colon; any case, also the obsolete "Name :" of RFC 5322 §4.5)? */
bool smtp_header_present(const char *hdrs, size_t len, const char *name);
/* smtp_verb_name - "MAIL", "RCPT", ... for logs */
const char *smtp_verb_name(enum smtp_verb v);

#endif
