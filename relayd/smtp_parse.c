/*
 * smtp_parse - command and parameter parsing (RFC 5321 §4.1.1-4.1.2, RFC 1870, RFC 3461,
 * RFC 3030, RFC 6531, RFC 4954 §5).
 * Invariants: never reads past the NUL, never allocates; every error is a full reply with
 * an enhanced status code (RFC 3463). An address that passes holds no control character,
 * and non-ASCII only as well-formed UTF-8 without C1 controls: it can be logged as it is.
 */
#include "smtp_parse.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "queue.h"
#include "utf8.h"

#define SMTP_STR_(x) #x
#define SMTP_STR(x) SMTP_STR_(x)

static const struct {
	const char *name;
	enum smtp_verb verb;
} smtp_verbs[] = {
	{ "HELO", SMTP_HELO }, { "EHLO", SMTP_EHLO }, { "MAIL", SMTP_MAIL }, { "RCPT", SMTP_RCPT },
	{ "DATA", SMTP_DATA }, { "BDAT", SMTP_BDAT }, { "RSET", SMTP_RSET }, { "NOOP", SMTP_NOOP },
	{ "QUIT", SMTP_QUIT }, { "HELP", SMTP_HELP }, { "VRFY", SMTP_VRFY }, { "EXPN", SMTP_EXPN },
	{ "STARTTLS", SMTP_STARTTLS }, { "AUTH", SMTP_AUTH },
};

/* smtp_verb_name - verb for logs */
const char *smtp_verb_name(enum smtp_verb v)
{
	for (size_t i = 0; i < sizeof(smtp_verbs) / sizeof(smtp_verbs[0]); i++)
		if (smtp_verbs[i].verb == v)
			return smtp_verbs[i].name;
	return "UNKNOWN";
}

/* smtp_parse_command - verb and argument */
void smtp_parse_command(char *line, struct smtp_cmd *cmd)
{
	size_t vl = strcspn(line, " ");
	cmd->verb = SMTP_UNKNOWN;
	cmd->arg = line + vl;
	if (*cmd->arg == ' ')
		cmd->arg++;
	for (size_t i = 0; i < sizeof(smtp_verbs) / sizeof(smtp_verbs[0]); i++) {
		if (strlen(smtp_verbs[i].name) == vl && !strncasecmp(line, smtp_verbs[i].name, vl)) {
			cmd->verb = smtp_verbs[i].verb;
			break;
		}
	}
	/* trailing blanks are tolerated (RFC 5321 §4.1.1 says none, clients send them) */
	size_t al = strlen(cmd->arg);
	while (al > 0 && (cmd->arg[al - 1] == ' ' || cmd->arg[al - 1] == '\t'))
		cmd->arg[--al] = '\0';
}

static bool smtp_domain_valid(const char *d, bool utf8)
{
	size_t n = strlen(d);
	if (n == 0 || n > 255)
		return false;
	if (d[0] == '[')
		return d[n - 1] == ']' && n > 2 && strspn(d + 1, "0123456789abcdefABCDEF.:IPv6") == n - 2;
	if (d[0] == '.' || d[0] == '-' || d[n - 1] == '.' || strstr(d, ".."))
		return false;
	for (const unsigned char *p = (const unsigned char *)d; *p; p++) {
		if (*p >= 0x80 && utf8)
			continue;
		if (!isalnum(*p) && *p != '-' && *p != '.' && *p != '_')
			return false;
	}
	return true;
}

/* a Dot-string local part, leniently: atext and dots, empty atoms tolerated */
static bool smtp_dot_string_valid(const char *s, size_t n, bool utf8)
{
	if (n > 64)
		return false;
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)s[i];
		if (ch < 0x21 || ch == 0x7f || (ch >= 0x80 && !utf8) || strchr("<>()[],;:\\\"", ch))
			return false;
	}
	return true;
}

/* a Quoted-string local part: DQUOTE *(qtextSMTP / quoted-pairSMTP) DQUOTE (RFC 5321
 * §4.1.2; qtextSMTP =/ UTF8-non-ascii, RFC 6531 §3.3). SP, bare or quoted, is refused:
 * the queue file separates its fields with it */
static bool smtp_quoted_valid(const char *s, size_t n, bool utf8, bool sp)
{
	if (n < 2 || s[0] != '"' || s[n - 1] != '"')
		return false;
	for (size_t i = 1; i < n - 1; i++) {
		unsigned char ch = (unsigned char)s[i];
		if (ch == '\\') { /* quoted-pairSMTP: one ASCII graphic (SP refused) */
			ch = (unsigned char)s[++i];
			if (i == n - 1 || ch < (sp ? 0x20 : 0x21) || ch > 0x7e)
				return false;
		} else if (ch == '"' || ch < (sp ? 0x20 : 0x21) || ch == 0x7f || (ch >= 0x80 && !utf8)) {
			return false;
		}
	}
	return true;
}

/* mailbox syntax; sp: a space in a quoted local part (a header's address, not a path) */
static bool smtp_addr_syntax(const char *addr, bool utf8, bool sp)
{
	size_t n = strlen(addr);
	if (n == 0 || n > 254 || (utf8 && !utf8_clean(addr))) /* RFC 6531 §3.3: UTF-8 */
		return false;
	const char *at = strrchr(addr, '@');
	if (!at || at == addr)
		return false;
	size_t ll = (size_t)(at - addr);
	if (addr[0] == '"' ? !smtp_quoted_valid(addr, ll, utf8, sp) : !smtp_dot_string_valid(addr, ll, utf8))
		return false;
	return smtp_domain_valid(at + 1, utf8);
}

/* smtp_addr_valid - mailbox syntax: Local-part "@" Domain, the local part one Dot-string or
 * one Quoted-string */
bool smtp_addr_valid(const char *addr, bool utf8)
{
	return smtp_addr_syntax(addr, utf8, false);
}

/* smtp_xtext_valid - xtext: printable ASCII but '+' and '=', or "+HH" */
bool smtp_xtext_valid(const char *s)
{
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;
		if (ch == '+') {
			if (!isxdigit((unsigned char)s[1]) || !isxdigit((unsigned char)s[2]))
				return false;
			s += 2;
		} else if (ch < 33 || ch > 126 || ch == '=') {
			return false;
		}
	}
	return true;
}

static bool smtp_has_8bit(const char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s >= 0x80)
			return true;
	return false;
}

/* take "<path>" (after optional blanks); sets *rest to the parameters */
static int smtp_path(char *s, char **addr, char **rest)
{
	while (*s == ' ')
		s++;
	if (*s != '<')
		return -1;
	char *end = strchr(s, '>');
	if (!end)
		return -1;
	*end = '\0';
	s++;
	/* RFC 5321 §4.1.2: a source route "@a,@b:" is accepted and ignored */
	if (*s == '@') {
		char *colon = strchr(s, ':');
		if (!colon || colon[1] == '\0') /* "<@a:>" is not the null sender */
			return -1;
		s = colon + 1;
	}
	*addr = s;
	*rest = end + 1;
	if (**rest != '\0' && **rest != ' ')
		return -1;
	return 0;
}

/* next "KEY[=VALUE]" word from a parameter list, NUL-terminated in place */
static char *smtp_next_param(char **p, char **value)
{
	char *s = *p;
	while (*s == ' ')
		s++;
	if (!*s)
		return NULL;
	char *end = s + strcspn(s, " ");
	if (*end)
		*end++ = '\0';
	*p = end;
	char *eq = strchr(s, '=');
	*value = NULL;
	if (eq) {
		*eq = '\0';
		*value = eq + 1;
	}
	return s;
}

/* RFC 1870: size-value = 1*20DIGIT; one too large for us is LLONG_MAX (552 later, not 501) */
static int smtp_size_value(const char *val, long long *size)
{
	size_t n = val ? strspn(val, "0123456789") : 0;
	if (n == 0 || n > 20 || val[n])
		return -1;
	errno = 0;
	long long v = strtoll(val, NULL, 10);
	*size = errno == ERANGE ? LLONG_MAX : v;
	return 0;
}

/* a parameter given twice: RFC 5321 §4.1.2 lists each one once */
static bool smtp_mail_param_dup(const struct smtp_mail_args *m, const char *key)
{
	return (!strcasecmp(key, "SIZE") && m->size >= 0) || (!strcasecmp(key, "BODY") && m->body != SMTP_BODY_NONE) ||
	       (!strcasecmp(key, "SMTPUTF8") && m->smtputf8) || (!strcasecmp(key, "AUTH") && m->auth);
}

static int smtp_mail_param(struct smtp_mail_args *m, const char *key, char *val, const char **reply)
{
	if (smtp_mail_param_dup(m, key)) {
		*reply = "501 5.5.4 Duplicate MAIL parameter";
		return -1;
	}
	if (!strcasecmp(key, "SIZE")) {
		if (smtp_size_value(val, &m->size) < 0) {
			*reply = "501 5.5.4 Bad SIZE parameter";
			return -1;
		}
	} else if (!strcasecmp(key, "BODY")) {
		if (val && !strcasecmp(val, "7BIT"))
			m->body = SMTP_BODY_7BIT;
		else if (val && !strcasecmp(val, "8BITMIME"))
			m->body = SMTP_BODY_8BITMIME;
		else {
			*reply = "501 5.5.4 BODY must be 7BIT or 8BITMIME";
			return -1;
		}
	} else if (!strcasecmp(key, "SMTPUTF8") && !val) {
		m->smtputf8 = true;
	} else if (!strcasecmp(key, "RET")) {
		if (!val || (strcasecmp(val, "FULL") && strcasecmp(val, "HDRS")) || m->ret) {
			*reply = "501 5.5.4 RET must be FULL or HDRS";
			return -1;
		}
		for (char *p = val; *p; p++)
			*p = (char)toupper((unsigned char)*p);
		m->ret = val;
	} else if (!strcasecmp(key, "ENVID")) {
		if (!val || !*val || strlen(val) > 100 || !smtp_xtext_valid(val) || m->envid) {
			*reply = "501 5.5.4 Bad ENVID parameter";
			return -1;
		}
		m->envid = val;
	} else if (!strcasecmp(key, "AUTH")) {
		/* RFC 4954 §5: AUTH=xtext or AUTH=<>, accepted; we trust only our own authentication */
		if (!val || (strcmp(val, "<>") && (!*val || !smtp_xtext_valid(val)))) {
			*reply = "501 5.5.4 Bad AUTH parameter";
			return -1;
		}
		m->auth = true;
	} else {
		*reply = "555 5.5.4 Unsupported MAIL parameter";
		return -1;
	}
	return 0;
}

/* smtp_parse_mail - MAIL FROM:<addr> [params] */
int smtp_parse_mail(char *arg, struct smtp_mail_args *m, const char **reply)
{
	memset(m, 0, sizeof(*m));
	m->size = -1;
	if (strncasecmp(arg, "FROM:", 5)) {
		*reply = "501 5.5.4 Syntax: MAIL FROM:<address>";
		return -1;
	}
	char *rest;
	if (smtp_path(arg + 5, &m->addr, &rest) < 0) {
		*reply = "501 5.1.7 Bad sender address syntax";
		return -1;
	}
	char *key, *val;
	while ((key = smtp_next_param(&rest, &val)))
		if (smtp_mail_param(m, key, val, reply) < 0)
			return -1;
	if (m->addr[0] && !smtp_addr_valid(m->addr, m->smtputf8)) {
		*reply = !m->smtputf8 && smtp_has_8bit(m->addr) ? "553 5.6.7 Non-ASCII sender address needs SMTPUTF8" :
								   "501 5.1.7 Bad sender address syntax";
		return -1;
	}
	return 0;
}

static int smtp_notify(char *val, unsigned *bits)
{
	*bits = 0;
	for (char *tok = strtok(val, ","); tok; tok = strtok(NULL, ",")) {
		if (!strcasecmp(tok, "NEVER"))
			*bits |= DSN_NOTIFY_NEVER;
		else if (!strcasecmp(tok, "SUCCESS"))
			*bits |= DSN_NOTIFY_SUCCESS;
		else if (!strcasecmp(tok, "FAILURE"))
			*bits |= DSN_NOTIFY_FAILURE;
		else if (!strcasecmp(tok, "DELAY"))
			*bits |= DSN_NOTIFY_DELAY;
		else
			return -1;
	}
	/* NEVER excludes the others (RFC 3461 §4.1) */
	if (*bits == 0 || ((*bits & DSN_NOTIFY_NEVER) && *bits != DSN_NOTIFY_NEVER))
		return -1;
	return 0;
}

/* smtp_parse_rcpt - RCPT TO:<addr> [params] */
int smtp_parse_rcpt(char *arg, bool smtputf8, struct smtp_rcpt_args *r, const char **reply)
{
	memset(r, 0, sizeof(*r));
	if (strncasecmp(arg, "TO:", 3)) {
		*reply = "501 5.5.4 Syntax: RCPT TO:<address>";
		return -1;
	}
	char *rest;
	if (smtp_path(arg + 3, &r->addr, &rest) < 0) {
		*reply = "501 5.1.3 Bad recipient address syntax";
		return -1;
	}
	if (!smtp_addr_valid(r->addr, smtputf8)) {
		*reply = !smtputf8 && smtp_has_8bit(r->addr) ? "553 5.6.7 Non-ASCII recipient address needs SMTPUTF8" :
							     "501 5.1.3 Bad recipient address syntax";
		return -1;
	}
	char *key, *val;
	while ((key = smtp_next_param(&rest, &val))) {
		if (!strcasecmp(key, "NOTIFY")) {
			if (!val || r->notify || smtp_notify(val, &r->notify) < 0) {
				*reply = "501 5.5.4 Bad NOTIFY parameter";
				return -1;
			}
		} else if (!strcasecmp(key, "ORCPT")) {
			char *semi = val ? strchr(val, ';') : NULL;
			if (!semi || r->orcpt || semi == val || !smtp_xtext_valid(semi + 1) || strlen(val) > 500) {
				*reply = "501 5.5.4 Bad ORCPT parameter";
				return -1;
			}
			r->orcpt = val;
		} else {
			*reply = "555 5.5.4 Unsupported RCPT parameter";
			return -1;
		}
	}
	return 0;
}

/* smtp_parse_bdat - BDAT size [LAST] (RFC 3030 §2) */
int smtp_parse_bdat(const char *arg, size_t *size, bool *last, const char **reply)
{
	char *end;
	*last = false;
	if (!isdigit((unsigned char)arg[0])) {
		*reply = "501 5.5.4 Syntax: BDAT size [LAST]";
		return -1;
	}
	errno = 0;
	unsigned long long v = strtoull(arg, &end, 10);
	if (errno || v > (1ULL << 40)) {
		*reply = "501 5.5.4 Bad BDAT size";
		return -1;
	}
	if (*end && *end != ' ') { /* "5LAST": chunk-size [SP end-marker] */
		*reply = "501 5.5.4 Syntax: BDAT size [LAST]";
		return -1;
	}
	while (*end == ' ')
		end++;
	if (!strcasecmp(end, "LAST"))
		*last = true;
	else if (*end) {
		*reply = "501 5.5.4 Syntax: BDAT size [LAST]";
		return -1;
	}
	*size = (size_t)v;
	return 0;
}

/* smtp_addr_literal - an address literal's content */
void smtp_addr_literal(const char *ip, char *out, size_t outlen)
{
	if (!strchr(ip, ':'))
		snprintf(out, outlen, "%s", ip);
	else if (!strncasecmp(ip, "::ffff:", 7) && strchr(ip + 7, '.') && !strchr(ip + 7, ':'))
		snprintf(out, outlen, "%s", ip + 7); /* v4-mapped: the IPv4 client it is */
	else
		snprintf(out, outlen, "IPv6:%.*s", (int)strcspn(ip, "%"), ip); /* no zone index */
}

/* the index of the LF ending the line that holds h[i], or len */
static size_t smtp_line_end(const char *h, size_t len, size_t i)
{
	const char *eol = memchr(h + i, '\n', len - i);
	return eol ? (size_t)(eol - h) : len;
}

/* is the line at h[i] a field of this name? name *WSP ":" (RFC 5322 §3.6, and the obsolete
 * WSP before the colon of §4.5); *vs is then where its value begins */
static bool smtp_header_named(const char *h, size_t len, size_t i, const char *name, size_t *vs)
{
	size_t nl = strlen(name);
	if (len - i <= nl || strncasecmp(h + i, name, nl))
		return false;
	size_t j = i + nl;
	while (j < len && (h[j] == ' ' || h[j] == '\t'))
		j++;
	if (j >= len || h[j] != ':')
		return false;
	*vs = j + 1;
	return true;
}

/* is the line at h[i] a header field? 1*ftext *WSP ":" (RFC 5322 §2.2, §3.6.8; ftext is
 * printable US-ASCII but the colon; WSP before the colon is the obsolete form of §4.5) */
static bool smtp_header_is_field(const char *h, size_t len, size_t i)
{
	size_t j = i;
	while (j < len && (unsigned char)h[j] > ' ' && (unsigned char)h[j] < 0x7f && h[j] != ':')
		j++;
	if (j == i)
		return false;
	while (j < len && (h[j] == ' ' || h[j] == '\t'))
		j++;
	return j < len && h[j] == ':';
}

/* smtp_header_section - the header section: its fields and their continuation lines */
size_t smtp_header_section(const char *msg, size_t len, bool *nosep)
{
	size_t i = 0;
	while (i < len) {
		bool cont = i > 0 && (msg[i] == ' ' || msg[i] == '\t'); /* not on the first line */
		if (!cont && !smtp_header_is_field(msg, len, i))
			break;
		size_t end = smtp_line_end(msg, len, i);
		i = end < len ? end + 1 : len;
	}
	*nosep = i < len && !(len - i >= 2 && msg[i] == '\r' && msg[i + 1] == '\n');
	return i;
}

/* smtp_header_present - is there a field of this name */
bool smtp_header_present(const char *hdrs, size_t len, const char *name)
{
	for (size_t i = 0; i < len; i = smtp_line_end(hdrs, len, i) + 1) {
		size_t vs;
		if (smtp_header_named(hdrs, len, i, name, &vs))
			return true;
	}
	return false;
}

/* the end of the field whose value begins at h[vs]: its continuation lines included
 * (RFC 5322 §2.2.3) */
static size_t smtp_field_end(const char *h, size_t len, size_t vs)
{
	size_t end = smtp_line_end(h, len, vs);
	while (end + 1 < len && (h[end + 1] == ' ' || h[end + 1] == '\t'))
		end = smtp_line_end(h, len, end + 1);
	return end;
}

/* one more byte of a From: address; false when it does not fit */
static bool smtp_mailbox_put(char item[256], size_t *l, char ch)
{
	if (*l >= 255)
		return false;
	item[(*l)++] = ch;
	return true;
}

/* one mailbox of a folded From: value v[i..n): up to a ',' or ';' outside quotes, comments
 * and <>. Its address (the part in <> when there is one; a quoted local part kept as
 * written, a display name left out) goes to item; returns the index
 * after it. *il is the address's length, -1 when it is too long or the mailbox is not one
 * address (a second <>, a group name after <>): nothing that is not checked gets through */
static size_t smtp_mailbox(const char *v, size_t n, size_t i, char item[256], int *il)
{
	size_t l = 0;
	int depth = 0, angles = 0;
	bool quoted = false, angle = false, bad = false;
	for (; i < n; i++) {
		char ch = v[i];
		if (quoted) { /* kept as written: a quoted local part is the address's own */
			bad |= !smtp_mailbox_put(item, &l, ch);
			if (ch == '\\' && i + 1 < n)
				bad |= !smtp_mailbox_put(item, &l, v[++i]);
			else if (ch == '"')
				quoted = false;
			continue;
		}
		if (depth) { /* a comment: quoted-pair inside (RFC 5322 §3.2.1) */
			if (ch == '\\')
				i++;
			else if (ch == '(')
				depth++;
			else if (ch == ')')
				depth--;
			continue;
		}
		if (ch == '"') {
			quoted = true;
			bad |= !smtp_mailbox_put(item, &l, ch);
		} else if (ch == '(') {
			depth = 1;
		} else if (ch == '<') {
			bad |= angles++ > 0;
			angle = true;
			l = 0;
		} else if (ch == '>' && angle) {
			angle = false;
		} else if ((ch == ',' || ch == ';') && !angle) {
			i++;
			break;
		} else if (ch == ':' && !angle) { /* a group name */
			bad |= angles > 0;
			l = 0;
		} else if (ch != ' ' && ch != '\t' && ch != '\r' && ch != '\n') {
			bad |= !smtp_mailbox_put(item, &l, ch);
		}
	}
	item[l] = '\0';
	*il = bad || quoted ? -1 : (int)l;
	return i;
}

/* the addresses of one From: value v[0..n) into out; -1 with *reply set */
static int smtp_mailboxes(const char *v, size_t n, char out[][256], const char **reply)
{
	int count = 0;
	for (size_t i = 0; i < n;) {
		char item[256];
		int il;
		i = smtp_mailbox(v, n, i, item, &il);
		if (il == 0)
			continue;
		/* the mailbox syntax also rules out controls (C0, DEL, C1) and text that is not
		 * UTF-8 (RFC 6532 §3.2): the address goes into a log line and a reply as it is */
		if (il < 0 || !smtp_addr_syntax(item, true, true)) {
			*reply = "550 5.6.0 From: header has an address that cannot be parsed";
			return -1;
		}
		if (count == SMTP_FROM_MAX) {
			*reply = "550 5.6.0 From: header has more than " SMTP_STR(SMTP_FROM_MAX) " addresses";
			return -1;
		}
		memcpy(out[count++], item, (size_t)il + 1);
	}
	return count;
}

/* smtp_header_from - the addresses of the From: field */
int smtp_header_from(const char *hdrs, size_t len, char out[][256], const char **reply)
{
	int n = 0;
	bool seen = false;
	for (size_t i = 0; i < len;) {
		size_t vs, end = smtp_line_end(hdrs, len, i);
		if (hdrs[i] != ' ' && hdrs[i] != '\t' && smtp_header_named(hdrs, len, i, "From", &vs)) {
			if (seen) { /* RFC 5322 §3.6: exactly one */
				*reply = "550 5.6.0 Message has more than one From: header";
				return -1;
			}
			seen = true;
			end = smtp_field_end(hdrs, len, vs);
			if ((n = smtp_mailboxes(hdrs + vs, end - vs, out, reply)) < 0)
				return -1;
		}
		i = end + 1;
	}
	if (seen && n == 0) {
		*reply = "550 5.6.0 From: header has no valid address";
		return -1;
	}
	return n;
}
