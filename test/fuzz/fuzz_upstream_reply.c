/*
 * fuzz_upstream_reply - libFuzzer target for the forwarder's reply parsing (relayd/forward.c).
 *
 * forward.c has no separate pure reply parser: replies are split and checked inside the
 * static conn callback forward_on_read() (RFC 5321 §4.2.1 "ddd-"/"ddd " lines, at most
 * FORWARD_REPLY_MAX), and EHLO keywords are read by the static forward_parse_ehlo(). This
 * target #includes forward.c to drive both as they are: a session in FS_CONNECT (where
 * forward_response() only logs) is fed the input in random-sized pieces, the way conn.c
 * appends to c->in; a malformed reply takes the real forward_session_fail() path (upstream
 * marked down, session freed and reaped). The input is also given to forward_parse_ehlo().
 * It uses forward.c's internal names: when they change, this file follows.
 */
#include "../../relayd/forward.c"

#include <assert.h>

static struct config fz_cfg;
static bool fz_ready;

static void fz_init(void)
{
	log_init("fuzz", 1, 0);
	config_defaults(&fz_cfg);
	forward_cfg = &fz_cfg;
	forward_loop = ev_loop_new(EVFLAG_AUTO);
	ev_init(&forward_reaper, forward_reaper_cb);
	forward_stopping = true; /* forward_upstream_dispatch() opens no connection */
	forward_nup = 1;
	struct forward_upstream *u = &forward_up[0];
	snprintf(u->conf.host, sizeof(u->conf.host), "upstream.test");
	snprintf(u->conf.port, sizeof(u->conf.port), "587");
	u->conf.max_connections = 1;
	u->cfg = &u->conf;
	snprintf(u->name, sizeof(u->name), "upstream.test:587");
	fz_ready = true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (!fz_ready)
		fz_init();
	if (size < 1)
		return 0;
	struct forward_upstream *u = &forward_up[0];
	struct forward_session *s = calloc(1, sizeof(*s));
	assert(s);
	s->id = ++forward_next_sid;
	snprintf(s->idstr, sizeof(s->idstr), "%016llx", (unsigned long long)s->id);
	s->up = u;
	s->state = FS_CONNECT;
	s->fd = -1;
	ev_init(&s->timer, forward_timeout_cb);
	ev_io_init(&s->cio, forward_connect_cb, -1, EV_WRITE);
	s->next = u->sessions;
	u->sessions = s;
	u->nsessions++;
	u->nsetup++;

	/* first byte: piece size seed; the rest arrives as conn.c would append it */
	uint32_t st = data[0] | 0x100;
	const char *p = (const char *)data + 1;
	size_t n = size - 1;
	struct conn c;
	memset(&c, 0, sizeof(c));
	forward_on_read(&c, s); /* nothing read yet: c.in.data is NULL */
	bool failed = s->dead;
	for (size_t off = 0; off < n && !failed;) {
		st ^= st << 13;
		st ^= st >> 17;
		st ^= st << 5;
		size_t k = 1 + st % (n - off);
		assert(buf_append(&c.in, p + off, k) == 0);
		off += k;
		size_t before = c.in.len;
		forward_on_read(&c, s);
		failed = s->dead;
		assert(c.in.len <= before);
		if (!failed) {
			/* what is left is one partial line, and replies never grow past the cap */
			assert(c.in.len == 0 || !memchr(c.in.data, '\n', c.in.len));
			assert(s->rtext.len <= FORWARD_REPLY_MAX);
		}
	}
	if (!s->dead)
		forward_session_free(s); /* a partial reply at EOF */
	ev_run(forward_loop, EVRUN_NOWAIT); /* the reaper frees the session */
	assert(forward_graveyard == NULL && u->sessions == NULL && u->nsessions == 0);
	buf_free(&c.in);
	u->fail_streak = 0;
	u->nsetup = 0;

	/* the EHLO keyword parser on the text of a reply */
	char *text = malloc(n + 1);
	memcpy(text, p, n);
	text[n] = '\0';
	struct forward_session e;
	memset(&e, 0, sizeof(e));
	forward_parse_ehlo(&e, text);
	free(text);
	return 0;
}
