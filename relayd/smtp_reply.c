/*
 * smtp_reply - an SMTP server's replies as a client reads them (RFC 5321 §4.2, §4.2.1:
 * "ddd-text" continues a reply, "ddd text" or "ddd" ends it), their enhanced status code
 * (RFC 3463, RFC 2034), and the keywords of an EHLO reply (RFC 5321 §4.1.1.1).
 *
 * Invariants:
 *  - pure: no I/O, no allocation, no globals; every input is bounded (SMTP_REPLY_LINE_MAX
 *    per line, checked before its newline arrives; SMTP_REPLY_MAX per reply);
 *  - r->text is always NUL-terminated and never holds a NUL;
 *  - a reply's lines are only kept in r once complete, so a partial line is read again
 *    whole on the next call, and the caller never has to keep it apart.
 */
#include "smtp_reply.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* smtp_reply_init - an empty reply */
void smtp_reply_init(struct smtp_reply *r)
{
	r->code = 0;
	r->status[0] = '\0';
	r->nlines = 0;
	r->len = 0;
	r->text[0] = '\0';
	r->complete = false;
}

static bool smtp_reply_isdigit(char c)
{
	return c >= '0' && c <= '9';
}

/* RFC 3463 §2: class "." subject "." detail, class matching the reply code's first digit,
 * subject and detail of 1 to 3 digits, then a space or the end */
static void smtp_reply_status(struct smtp_reply *r, const char *t, size_t tlen)
{
	size_t i = 0, n;
	if (tlen < 5 || t[0] != (char)('0' + r->code / 100) || t[1] != '.')
		return;
	i = 2;
	for (n = 0; i < tlen && smtp_reply_isdigit(t[i]) && n < 4; i++, n++)
		;
	if (n < 1 || n > 3 || i >= tlen || t[i] != '.')
		return;
	i++;
	for (n = 0; i < tlen && smtp_reply_isdigit(t[i]) && n < 4; i++, n++)
		;
	if (n < 1 || n > 3 || (i < tlen && t[i] != ' '))
		return;
	memcpy(r->status, t, i);
	r->status[i] = '\0';
}

/* smtp_reply_parse - one complete reply from buf (see smtp_reply.h for the contract) */
int smtp_reply_parse(const char *buf, size_t len, struct smtp_reply *r, size_t *consumed)
{
	size_t off = 0;
	*consumed = 0;
	if (r->complete)
		smtp_reply_init(r);
	while (off < len) {
		const char *p = buf + off;
		size_t avail = len - off;
		const char *nl = memchr(p, '\n', avail);
		size_t ll = nl ? (size_t)(nl - p) : avail;
		size_t tl = ll && p[ll - 1] == '\r' ? ll - 1 : ll;
		if (tl > SMTP_REPLY_LINE_MAX || memchr(p, '\0', ll))
			return -1;
		if (!nl)
			break; /* the rest of this line has not come yet */
		if (tl < 3 || p[0] < '2' || p[0] > '5' || !smtp_reply_isdigit(p[1]) || !smtp_reply_isdigit(p[2]) ||
		    (tl > 3 && p[3] != ' ' && p[3] != '-'))
			return -1;
		int code = (p[0] - '0') * 100 + (p[1] - '0') * 10 + (p[2] - '0');
		if (r->nlines && code != r->code)
			return -1;
		const char *t = p + 4;
		size_t tlen = tl > 4 ? tl - 4 : 0;
		size_t sep = r->nlines ? 1 : 0;
		if (r->len + sep + tlen > SMTP_REPLY_MAX)
			return -1;
		if (sep)
			r->text[r->len++] = '\n';
		memcpy(r->text + r->len, t, tlen);
		r->len += tlen;
		r->text[r->len] = '\0';
		if (r->nlines++ == 0) {
			r->code = code;
			smtp_reply_status(r, t, tlen);
		}
		off += ll + 1;
		*consumed = off;
		if (!(tl > 3 && p[3] == '-')) {
			r->complete = true;
			return 1;
		}
	}
	return 0;
}

/* smtp_reply_line - the first line of text */
void smtp_reply_line(const struct smtp_reply *r, char *out, size_t outlen)
{
	size_t n = strcspn(r->text, "\n");
	snprintf(out, outlen, "%.*s", (int)(n < outlen - 1 ? n : outlen - 1), r->text);
}

/* smtp_reply_ehlo - the keywords we use; the others are ignored */
void smtp_reply_ehlo(const char *text, struct smtp_ehlo *e)
{
	memset(e, 0, sizeof(*e));
	const char *line = strchr(text, '\n'); /* the first line is the greeting */
	while (line) {
		line++;
		const char *end = strchr(line, '\n');
		size_t len = end ? (size_t)(end - line) : strlen(line);
		char kw[512];
		snprintf(kw, sizeof(kw), "%.*s", (int)(len < sizeof(kw) - 1 ? len : sizeof(kw) - 1), line);
		char *arg = kw + strcspn(kw, " =");
		if (*arg)
			*arg++ = '\0';
		if (!strcasecmp(kw, "STARTTLS"))
			e->starttls = true;
		else if (!strcasecmp(kw, "PIPELINING"))
			e->pipelining = true;
		else if (!strcasecmp(kw, "8BITMIME"))
			e->eightbitmime = true;
		else if (!strcasecmp(kw, "SMTPUTF8"))
			e->smtputf8 = true;
		else if (!strcasecmp(kw, "DSN"))
			e->dsn = true;
		else if (!strcasecmp(kw, "SIZE")) {
			e->size = true;
			e->size_max = strtoull(arg, NULL, 10);
		} else if (!strcasecmp(kw, "AUTH")) {
			char *save = NULL;
			for (char *tok = strtok_r(arg, " ", &save); tok; tok = strtok_r(NULL, " ", &save)) {
				if (!strcasecmp(tok, "PLAIN"))
					e->auth_plain = true;
				else if (!strcasecmp(tok, "LOGIN"))
					e->auth_login = true;
			}
		}
		line = end;
	}
}
