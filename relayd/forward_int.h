/*
 * forward_int - what the forwarder's manager (forward.c) and its sessions (forward_session.c)
 * share: the message, session and upstream structs, the manager's state, and the manager's
 * calls a session makes. Private to those two files.
 */
#ifndef RELAYD_FORWARD_INT_H
#define RELAYD_FORWARD_INT_H

#include <limits.h>
#include <netdb.h>
#include <sasl/sasl.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <ev.h>

#include "buf.h"
#include "config.h"
#include "conn.h"
#include "queue.h"
#include "ratelimit.h"
#include "smtp_reply.h"
#include "tls.h"

/* a message up to this size is read from the queue on the loop (just written, so in the page
 * cache: cheaper than a worker's two hand-overs); a larger one on a worker */
#define FORWARD_INLINE_MAX (64 * 1024)

enum forward_state {
	FS_RESOLVE,    /* getaddrinfo on a worker */
	FS_CONNECT,    /* non-blocking connect */
	FS_HANDSHAKE,  /* TLS handshake (implicit, or after STARTTLS) */
	FS_GREETING,   /* waiting for 220 */
	FS_EHLO,
	FS_STARTTLS,
	FS_AUTH,
	FS_READY,      /* idle, can take a message */
	FS_PREPARE,    /* the message body is read on a worker */
	FS_MAIL,
	FS_RCPT,
	FS_DATA,
	FS_BODY,       /* body sent, waiting for the final reply */
	FS_RSET,
	FS_QUIT
};

enum forward_mstate {
	MS_WAIT,       /* timer running until its next attempt */
	MS_QUEUED,     /* in an upstream's waiting list */
	MS_ACTIVE,     /* taken by a session */
	MS_FINISH,     /* every recipient is done: bounce/removal in progress */
	MS_IDLE        /* nothing scheduled (no upstream configured) */
};

struct forward_upstream;

struct forward_msg {
	char id[QUEUE_ID_LEN + 1];
	struct forward_msg *hnext;          /* id table */
	struct forward_msg *wnext;          /* upstream waiting list */
	struct forward_upstream *waiting_at;
	enum forward_mstate state;
	struct queue_envelope env;      /* envelope and status, kept up to date in memory */
	ev_timer timer;
	bool tried[CONFIG_MAX_UPSTREAM];
	char last_error[512];
	bool gone;                      /* forgotten while a session held it: freed by forward_tx_done */
	/* disk work: one job at a time */
	bool io_busy;
	bool warn_due;                  /* the "delayed" notice is to be made by the next disk job */
	struct buf records;             /* status lines not yet appended */
};

/* how much of a bounce's returned message is sent: all, its headers, nothing */
enum forward_cut { FORWARD_CUT_NONE, FORWARD_CUT_HEADERS, FORWARD_CUT_ALL };

struct forward_session {
	uint64_t id;
	char idstr[QUEUE_ID_LEN + 1];
	struct forward_session *next;       /* upstream's list */
	struct forward_upstream *up;
	struct forward_creds *creds;    /* up's when the session began (a reference) */
	enum forward_state state;
	bool dead;
	bool established;               /* reached READY once */
	bool authed;
	bool tls;
	struct conn conn;
	bool conn_live;
	int fd;                         /* while connecting */
	ev_io cio;
	ev_timer timer;
	struct addrinfo *ai, *ai_next;
	char last_connect_error[128];
	/* EHLO */
	struct smtp_ehlo ext;
	sasl_conn_t *sasl;
	sasl_callback_t sasl_cb[4];
	/* the reply being read */
	struct smtp_reply reply;
	/* the transaction */
	struct forward_msg *msg;
	size_t *rcpts;                  /* indices of the pending recipients */
	size_t nrcpts, rcpt_sent, rcpt_reply, naccepted;
	bool *accepted;
	int *rcode;                     /* final result per pending recipient, 0 = none */
	char **rreply;
	bool pipelined, mail_refused, body_abort, must_close;
	bool dot_sent;                  /* the body and its final dot are written out (on_drain) */
	bool closed_by_421;             /* the upstream said 421 in a transaction (RFC 5321 §3.8) */
	unsigned ndelivered;            /* transactions on this connection that delivered someone */
	char *body;                     /* dot-stuffed message + ".\r\n" */
	size_t body_len, body_off;
	bool body_8bit;
	bool hdr_8bit;                  /* in the header section */
	size_t body_size;               /* the message's octets as sent (SIZE=) */
	enum forward_cut cut;           /* a bounce read again with its returned message cut */
	ev_tstamp tx_started;
};

/* what an upstream's sessions authenticate with: a reload makes a new set, and a set is freed
 * when the upstream and every session begun with it have let go (the password wiped then) */
struct forward_creds {
	unsigned refs;                  /* the upstream holding it, and each session begun with it */
	gnutls_certificate_credentials_t cred; /* trust anchors; NULL with tls=none */
	char *user;                     /* NULL without auth= */
	sasl_secret_t *secret;
};

struct forward_upstream {
	int index;
	struct upstream_cfg conf;       /* a copy: a SIGHUP reload does not change it under us */
	const struct upstream_cfg *cfg;
	char name[300];                 /* host:port for logs */
	struct forward_creds *creds;    /* what new sessions use */
	struct forward_session *sessions;
	unsigned nsessions, nsetup;
	struct forward_msg *wait_head, *wait_tail;
	unsigned nwait;
	ev_tstamp down_until;
	unsigned fail_streak;
	struct ratelimit_window rate;   /* pacing (rate=), in clock_mono_sec() */
	ev_timer rate_timer;
	bool rate_waiting;
	/* stats */
	unsigned long long stat_msgs, stat_rcpts, stat_failures, stat_conns, stat_lat_n;
	double stat_lat_sum, stat_lat_last;
};

/* the manager's state (forward.c); the sessions read it */
extern struct ev_loop *forward_loop;
extern const struct config *forward_cfg;
extern struct forward_upstream forward_up[CONFIG_MAX_UPSTREAM];
extern int forward_nup;
extern bool forward_stopping;
extern char forward_queue[PATH_MAX];  /* read by workers: a copy, never changed after init */

/* forward_creds_get - one more reference to c; forward_creds_put - one less (the last frees c) */
struct forward_creds *forward_creds_get(struct forward_creds *c);
void forward_creds_put(struct forward_creds *c);
/* forward_logsafe - text safe inside a log value in double quotes */
void forward_logsafe(const char *in, char *out, size_t outlen);
/* forward_tx_done - the session's transaction ended (or could not happen): per-recipient
 * results go to the message, which finishes or tries the next upstream; why is the reply for
 * recipients without one */
void forward_tx_done(struct forward_session *s, const char *why);
/* forward_upstream_dispatch - hand waiting messages to idle sessions, open sessions for the rest */
void forward_upstream_dispatch(struct forward_upstream *u);
/* forward_upstream_reroute - without a working session left, u's waiting messages move on */
void forward_upstream_reroute(struct forward_upstream *u, const char *why);
/* forward_upstream_failed - mark u down for a while */
void forward_upstream_failed(struct forward_upstream *u);

#endif
