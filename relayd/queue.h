/*
 * queue - the durable store of accepted messages.
 *
 * Layout: QUEUE/msg/<id> holds one message:
 *     RELAYD-QUEUE 1\n
 *     id <16 hex>\n
 *     created <unix seconds>\n
 *     user <sasl user>\n
 *     from <reverse-path, empty for the null sender>\n
 *     ret <FULL|HDRS|->\n
 *     envid <xtext or ->\n
 *     body <7BIT|8BITMIME|BINARYMIME>\n
 *     smtputf8 <0|1>\n
 *     rcpt <notify bits> <orcpt or -> <address>\n      (one line per recipient, in order)
 *     size <N>\n
 *     \n
 *     <N bytes: the message exactly as it is to be sent, headers added, NOT dot-stuffed>
 *     \nEND <crc32 of the N bytes, 8 hex>\n
 *     then zero or more status records appended later, each one line (a record starts with
 *     an extra '\n' when the file does not end with one; empty lines, lines with NUL bytes
 *     and a last line without '\n' are skipped when read):
 *     D <rcpt index> <smtp code> <text>\n     recipient finished (delivered 2xx or failed 5xx)
 *     T <attempts> <next attempt unix time> <text>\n   transient failure, retry later
 *     B <bounce queue id>\n                    the bounce for failed recipients is committed
     R <rcpt index>\n                         recipient delivered with NOTIFY=SUCCESS to an upstream
                                              without DSN: a "relayed" notice is owed (RFC 3464)
     W <notice queue id>\n                    the one "delayed" notice (delay_warning) is committed
 * A file without a valid END trailer never got a 250 and is discarded at recovery. One with
 * it was acknowledged and is never discarded: if it cannot be read or used (permissions, a
 * newer version, damaged envelope lines), it stays where it is for the admin. Unknown
 * envelope keys are ignored (a newer relayd's optional fields); a change older versions
 * must not read takes a new version number.
 * A message is removed (unlink) only when every recipient has a D record and, where any
 * recipient failed, its bounce is committed (B record), or it is a bounce itself.
 *
 * Group commit: queue_commit() hands a message to the commit thread, which writes every
 * pending message of a batch, makes them durable with one syncfs(2), and then reports each
 * result back to the loop through ev_async. 250 is sent only from that callback.
 */
#ifndef RELAYD_QUEUE_H
#define RELAYD_QUEUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#include "buf.h"

struct ev_loop;

#define QUEUE_ID_LEN 16

/* DSN NOTIFY bits (RFC 3461); 0 = not given (default: failure) */
#define DSN_NOTIFY_NEVER   0x1
#define DSN_NOTIFY_SUCCESS 0x2
#define DSN_NOTIFY_FAILURE 0x4
#define DSN_NOTIFY_DELAY   0x8

enum queue_body { QUEUE_BODY_7BIT, QUEUE_BODY_8BITMIME, QUEUE_BODY_BINARYMIME };

struct queue_rcpt {
	char *addr;
	char *orcpt;          /* NULL if not given */
	unsigned notify;      /* DSN_NOTIFY_* bits */
	int done_code;        /* 0 = pending, else the final SMTP code (2xx delivered, 5xx failed) */
	char *done_text;      /* upstream reply text for done recipients (NULL if pending) */
	bool relay_notice;    /* R record: a "relayed" DSN is owed to the sender */
};

struct queue_envelope {
	char id[QUEUE_ID_LEN + 1];
	time_t created;
	char *user;
	char *from;           /* "" for the null sender */
	char *ret;            /* "FULL", "HDRS" or NULL */
	char *envid;          /* NULL if not given */
	enum queue_body body;
	bool smtputf8;
	struct queue_rcpt *rcpt;
	size_t nrcpt;
	/* state from the status records */
	unsigned attempts;
	time_t next_attempt;
	char *last_error;     /* text of the last T record, NULL if none */
	char bounce_id[QUEUE_ID_LEN + 1]; /* "" if no B record */
	bool delay_warned;    /* W record: the "delayed" notice was sent */
	/* the message */
	size_t size;
	off_t body_offset;    /* where the N message bytes start in the file */
};

/* called on the loop thread when a commit finished: qerrno 0 = durable, else an errno */
typedef void (*queue_commit_cb)(uint64_t owner, const char *id, int qerrno);

/* queue_new_id - a fresh unique 16-hex-digit id (also used for session ids) */
void queue_new_id(char out[QUEUE_ID_LEN + 1]);
/* queue_init - create QUEUE/msg if needed and start the commit thread */
int queue_init(struct ev_loop *loop, const char *dir, char *err, size_t errlen);
/* queue_shutdown - finish pending commits and stop the commit thread */
void queue_shutdown(void);
/* queue_commit - make env + message durable; takes ownership of msg's contents (msg is emptied).
 * cb(owner, id, 0) runs on the loop when it is on disk. env->id is assigned here when empty. */
int queue_commit(struct queue_envelope *env, struct buf *msg, queue_commit_cb cb, uint64_t owner);

/* queue_path - QUEUE/msg/<id> into out */
int queue_path(const char *dir, const char *id, char *out, size_t outlen);
/* queue_load's failures */
#define QUEUE_LOAD_INCOMPLETE (-1) /* read in full, no valid END trailer: never got a 250 */
#define QUEUE_LOAD_UNUSABLE   (-2) /* not read (errno), or complete but not usable: keep it */
/* queue_load - parse a queue file's envelope and status records (not the body); 0, or one of
 * QUEUE_LOAD_* (< 0) with errno set (ENOENT: it is gone) */
int queue_load(const char *dir, const char *id, struct queue_envelope *env);
/* queue_read_body - read the N message bytes of a loaded message into out (malloc'd) */
int queue_read_body(const char *dir, const struct queue_envelope *env, char **out);
/* queue_open_message - the message's file, read-only; -1 with errno */
int queue_open_message(const char *dir, const char *id);
/* queue_envelope_free - release what queue_load allocated */
void queue_envelope_free(struct queue_envelope *env);
/* queue_append_status - append one status record line (without '\n') durably (fdatasync) */
int queue_append_status(const char *dir, const char *id, const char *record);
/* queue_remove - unlink a message; with durable, fsync the folder too. The forwarder's removal
 * of a finished message is not synced by itself: the next commit's syncfs, or the commit
 * thread's own a second later, makes it durable; a crash (power loss) before that can only
 * forward it once more, never lose it */
int queue_remove(const char *dir, const char *id, bool durable);
/* queue_remove_async - the commit thread unlinks message id (of the queue of queue_init) soon,
 * off the loop (an unlink can wait for the disk: a discard on some file systems), and its
 * syncfs makes that durable like queue_remove's; a message already gone is no error */
void queue_remove_async(const char *id);
/* queue_scan - call fn for each message id in the queue; returns the count or -1 */
int queue_scan(const char *dir, void (*fn)(const char *id, void *arg), void *arg);
/* queue_write_sync - write and fsync one message synchronously (for bounces made off the
 * session path, and for tools); env->id assigned unless set; 0, or -1 with errno (EEXIST: a
 * message with that id is there already, and stays as it was) */
int queue_write_sync(const char *dir, struct queue_envelope *env, const char *msg, size_t len);

#endif
