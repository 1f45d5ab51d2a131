/*
 * fuzz_smtp_parse - libFuzzer target for relayd/smtp_parse.c: the input is one command line
 * (cut at the first CR/LF, NUL-terminated, as the session hands it over) and goes through
 * smtp_parse_command, then smtp_parse_mail / smtp_parse_rcpt / smtp_parse_bdat on its
 * argument whatever the verb, and smtp_header_from over the whole input as a header
 * section. Invariants checked: results point into the line; replies are complete SMTP
 * replies ("5xx x.y.z ..."); header addresses are NUL-terminated and at most 255 chars.
 */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "smtp_parse.h"

static void check_reply(const char *reply)
{
	assert(reply != NULL);
	assert(strlen(reply) >= 4);
	assert(reply[0] >= '2' && reply[0] <= '5');
	assert(reply[1] >= '0' && reply[1] <= '9' && reply[2] >= '0' && reply[2] <= '9');
}

static bool inside(const char *p, const char *base, size_t len)
{
	return p >= base && p <= base + len;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size > 1 << 16)
		return 0;
	size_t n = 0;
	while (n < size && data[n] != '\r' && data[n] != '\n' && data[n] != '\0')
		n++;

	/* the command line */
	char *line = malloc(n + 1);
	memcpy(line, data, n);
	line[n] = '\0';
	struct smtp_cmd cmd;
	smtp_parse_command(line, &cmd);
	assert(cmd.arg != NULL && inside(cmd.arg, line, n));
	(void)smtp_verb_name(cmd.verb);
	size_t alen = strlen(cmd.arg);
	char *arg1 = malloc(alen + 1), *arg2 = malloc(alen + 1);
	memcpy(arg1, cmd.arg, alen + 1);
	memcpy(arg2, cmd.arg, alen + 1);

	struct smtp_mail_args m;
	const char *reply = NULL;
	if (smtp_parse_mail(arg1, &m, &reply) == 0) {
		assert(m.addr && inside(m.addr, arg1, alen));
		(void)smtp_addr_valid(m.addr, m.smtputf8);
		if (m.envid)
			(void)smtp_xtext_valid(m.envid);
	} else {
		check_reply(reply);
	}
	for (int utf8 = 0; utf8 < 2; utf8++) {
		struct smtp_rcpt_args r;
		memcpy(arg2, cmd.arg, alen + 1);
		reply = NULL;
		if (smtp_parse_rcpt(arg2, utf8, &r, &reply) == 0) {
			assert(r.addr && inside(r.addr, arg2, alen));
			(void)smtp_addr_valid(r.addr, utf8);
		} else {
			check_reply(reply);
		}
	}
	size_t bsize = 0;
	bool last = false;
	reply = NULL;
	if (smtp_parse_bdat(cmd.arg, &bsize, &last, &reply) != 0)
		check_reply(reply);
	(void)smtp_xtext_valid(cmd.arg);
	(void)smtp_addr_valid(cmd.arg, false);
	(void)smtp_addr_valid(cmd.arg, true);

	/* the whole input as a header section, in an exactly sized heap copy */
	char *hdrs = malloc(size ? size : 1);
	memcpy(hdrs, data, size);
	char out[SMTP_FROM_MAX][256];
	memset(out, 0x55, sizeof(out));
	reply = NULL;
	int got = smtp_header_from(hdrs, size, out, &reply);
	assert(got >= -1 && got <= SMTP_FROM_MAX);
	if (got < 0)
		check_reply(reply);
	for (int i = 0; i < got; i++)
		assert(memchr(out[i], '\0', 256) != NULL && strchr(out[i], '@') != NULL);
	free(hdrs);
	free(arg1);
	free(arg2);
	free(line);
	return 0;
}
