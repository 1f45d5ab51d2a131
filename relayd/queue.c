/*
 * queue - durable message store with group commit.
 * See queue.h for the file format. The commit thread takes every message waiting at that
 * moment as one batch: writes each file (O_EXCL, the END trailer last), then makes the whole
 * batch durable with one syncfs(2) on the queue's file system, then reports each result to
 * the loop. A crash mid-batch leaves files without a valid trailer: those never got a 250
 * and queue_load() refuses them (recovery deletes them).
 * Invariant: the callback reporting success runs only after syncfs returned 0.
 * The forwarder's removals of finished messages are unlinked by the commit thread too
 * (queue_remove_async: an unlink may wait for the disk), and not synced one by one: the next batch's
 * syncfs covers them, or, when no message comes, the commit thread's own syncfs at most
 * QUEUE_REMOVAL_SYNC seconds later (a crash before that can only forward a message again).
 */
#include "queue.h"

#include <ctype.h>
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <dirent.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

struct queue_job {
	struct queue_job *next;
	char id[QUEUE_ID_LEN + 1];
	struct buf head;          /* envelope lines */
	struct buf msg;           /* message bytes */
	queue_commit_cb cb;
	uint64_t owner;
	int result;               /* 0 or errno */
};

static pthread_mutex_t queue_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queue_cond = PTHREAD_COND_INITIALIZER;
static clockid_t queue_cond_clock = CLOCK_REALTIME; /* what queue_cond's timed waits count in */
static struct queue_job *queue_pending, *queue_done;
static bool queue_stopping;
static pthread_t queue_thread;
static bool queue_thread_running;
static ev_async queue_async;
static struct ev_loop *queue_loop;
static char queue_dir[PATH_MAX];
static int queue_msgdir_fd = -1;
static bool queue_removals_unsynced; /* under queue_lock */
struct queue_removal {
	struct queue_removal *next;
	char id[QUEUE_ID_LEN + 1];
};
static struct queue_removal *queue_removals; /* under queue_lock: for the commit thread to unlink */
static bool queue_thread_idle; /* under queue_lock: waiting with nothing due (a removal must wake it) */

#define QUEUE_REMOVAL_SYNC 1      /* seconds */
#define QUEUE_REMOVAL_DELAY_MS 20 /* a removal handed over waits at most this for the thread */

#define QUEUE_MAX_ATTEMPTS 1000000 /* a T record beyond it (or negative) is damaged, ignored */

static uint32_t queue_crc_table[256];

static void queue_crc_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		queue_crc_table[i] = c;
	}
}

static uint32_t queue_crc32(const char *p, size_t n)
{
	if (!queue_crc_table[1])
		queue_crc_init();
	uint32_t c = 0xFFFFFFFFu;
	for (size_t i = 0; i < n; i++)
		c = queue_crc_table[(c ^ (unsigned char)p[i]) & 0xff] ^ (c >> 8);
	return c ^ 0xFFFFFFFFu;
}

/* queue_new_id - time in seconds, then a per-process random start plus a counter */
void queue_new_id(char out[QUEUE_ID_LEN + 1])
{
	static uint32_t counter;
	static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
	pthread_mutex_lock(&lock);
	if (counter == 0) {
		uint32_t r = 0;
		int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
		if (fd < 0 || read(fd, &r, sizeof(r)) != (ssize_t)sizeof(r))
			r = (uint32_t)getpid() * 2654435761u;
		if (fd >= 0)
			close(fd);
		counter = r | 1;
	}
	uint32_t c = counter++;
	pthread_mutex_unlock(&lock);
	snprintf(out, QUEUE_ID_LEN + 1, "%08x%08x", (uint32_t)time(NULL), c);
}

/* queue_path - the file of a message */
int queue_path(const char *dir, const char *id, char *out, size_t outlen)
{
	int n = snprintf(out, outlen, "%s/msg/%s", dir, id);
	return n < 0 || (size_t)n >= outlen ? -1 : 0;
}

static int queue_serialize(const struct queue_envelope *env, struct buf *b)
{
	static const char *bodies[] = { "7BIT", "8BITMIME", "BINARYMIME" };
	int rc = buf_printf(b, "RELAYD-QUEUE 1\nid %s\ncreated %lld\nuser %s\nfrom %s\nret %s\nenvid %s\n"
			    "body %s\nsmtputf8 %d\n", env->id, (long long)env->created, env->user ? env->user : "",
			    env->from ? env->from : "", env->ret ? env->ret : "-", env->envid ? env->envid : "-",
			    bodies[env->body], env->smtputf8 ? 1 : 0);
	for (size_t i = 0; rc == 0 && i < env->nrcpt; i++)
		rc = buf_printf(b, "rcpt %u %s %s\n", env->rcpt[i].notify,
				env->rcpt[i].orcpt ? env->rcpt[i].orcpt : "-", env->rcpt[i].addr);
	return rc;
}

/* write every byte of iov[0..n) (advancing over short writes); -1 with errno on failure */
static int queue_writev_all(int fd, struct iovec *iov, int n)
{
	while (n > 0) {
		ssize_t w = writev(fd, iov, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return -1;
		bool none = w == 0;
		while (n > 0 && (size_t)w >= iov->iov_len) {
			w -= (ssize_t)iov->iov_len;
			iov++;
			n--;
		}
		if (n > 0 && none) { /* nothing written, something left: no progress to wait for */
			errno = EIO;
			return -1;
		}
		if (n > 0) {
			iov->iov_base = (char *)iov->iov_base + w;
			iov->iov_len -= (size_t)w;
		}
	}
	return 0;
}

/* the file's contents after the header: size line, message, trailer with the CRC, in one
 * system call (the trailer is still the last thing in the file); -1 with errno on failure */
static int queue_write_message(int fd, const struct buf *head, const char *msg, size_t len)
{
	char sizeline[48], trailer[64];
	snprintf(sizeline, sizeof(sizeline), "size %zu\n\n", len);
	snprintf(trailer, sizeof(trailer), "\nEND %08" PRIx32 "\n", queue_crc32(msg, len));
	struct iovec iov[4] = {
		{ head->data, head->len }, { sizeline, strlen(sizeline) }, { (char *)msg, len }, { trailer, strlen(trailer) },
	};
	return queue_writev_all(fd, iov, 4);
}

/* write one message file; 0 or errno */
static int queue_write_file(const char *id, const struct buf *head, const char *msg, size_t len)
{
	int fd = openat(queue_msgdir_fd, id, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0)
		return errno;
	int rc = 0;
	if (queue_write_message(fd, head, msg, len) < 0)
		rc = errno ? errno : EIO;
	if (close(fd) < 0 && rc == 0)
		rc = errno;
	if (rc)
		unlinkat(queue_msgdir_fd, id, 0);
	return rc;
}

static void queue_commit_batch(struct queue_job *batch)
{
	for (struct queue_job *j = batch; j; j = j->next) {
		j->result = queue_write_file(j->id, &j->head, j->msg.data ? j->msg.data : "", j->msg.len);
		if (j->result)
			log_err("%s queue event=commit-failed error=\"%s\"", j->id, strerror(j->result));
	}
	/* one flush for the whole batch: data, inodes and directory entries */
	if (syncfs(queue_msgdir_fd) < 0) {
		int e = errno;
		log_err("queue event=syncfs-failed error=\"%s\"", strerror(e));
		for (struct queue_job *j = batch; j; j = j->next)
			if (!j->result) {
				j->result = e;
				unlinkat(queue_msgdir_fd, j->id, 0);
			}
	}
}

/* unlink one message file of the queue; one already gone is no error */
static void queue_unlink_id(const char *id)
{
	if (unlinkat(queue_msgdir_fd, id, 0) < 0 && errno != ENOENT)
		log_err("%s queue event=remove-failed error=\"%s\"", id, strerror(errno));
}

/* unlink the removals handed over (called and returns with queue_lock held) */
static void queue_unlink_removals(void)
{
	while (queue_removals) {
		struct queue_removal *r = queue_removals;
		queue_removals = NULL;
		pthread_mutex_unlock(&queue_lock);
		while (r) {
			struct queue_removal *next = r->next;
			queue_unlink_id(r->id);
			free(r);
			r = next;
		}
		pthread_mutex_lock(&queue_lock);
		queue_removals_unsynced = true;
	}
}

/* wait for work. Removals handed over while it waits are unlinked within QUEUE_REMOVAL_DELAY_MS
 * (it is only woken for them when idle, so a busy queue pays no extra wake-up per message);
 * removals not yet synced get a syncfs QUEUE_REMOVAL_SYNC seconds later unless a batch's
 * syncfs covers them first. Called and returns with queue_lock held. */
static void queue_thread_wait(void)
{
	struct timespec sync_due = { 0 }, ts;
	while (!queue_pending && !queue_stopping) {
		queue_unlink_removals();
		if (queue_pending || queue_stopping)
			break;
		if (!queue_removals_unsynced) {
			queue_thread_idle = true;
			pthread_cond_wait(&queue_cond, &queue_lock);
			queue_thread_idle = false;
			sync_due.tv_sec = 0;
			continue;
		}
		clock_gettime(queue_cond_clock, &ts);
		if (!sync_due.tv_sec) {
			sync_due = ts;
			sync_due.tv_sec += QUEUE_REMOVAL_SYNC;
		}
		if (ts.tv_sec > sync_due.tv_sec || (ts.tv_sec == sync_due.tv_sec && ts.tv_nsec >= sync_due.tv_nsec)) {
			queue_removals_unsynced = false;
			pthread_mutex_unlock(&queue_lock);
			syncfs(queue_msgdir_fd);
			pthread_mutex_lock(&queue_lock);
			continue;
		}
		ts.tv_nsec += QUEUE_REMOVAL_DELAY_MS * 1000000L;
		if (ts.tv_nsec >= 1000000000L) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000L;
		}
		pthread_cond_timedwait(&queue_cond, &queue_lock, &ts);
	}
}

static void *queue_thread_main(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&queue_lock);
	for (;;) {
		queue_thread_wait();
		if (!queue_pending)
			break;
		queue_removals_unsynced = false; /* this batch's syncfs covers them */
		struct queue_job *batch = NULL, *j = queue_pending;
		queue_pending = NULL;
		while (j) { /* reverse into arrival order */
			struct queue_job *next = j->next;
			j->next = batch;
			batch = j;
			j = next;
		}
		pthread_mutex_unlock(&queue_lock);
		queue_commit_batch(batch);
		pthread_mutex_lock(&queue_lock);
		while (batch) {
			struct queue_job *next = batch->next;
			batch->next = queue_done;
			queue_done = batch;
			batch = next;
		}
		ev_async_send(queue_loop, &queue_async);
		/* after the replies (an unlink can wait for a discard), before the next batch, whose
		 * syncfs covers them */
		queue_unlink_removals();
	}
	queue_unlink_removals(); /* stopping: queue_shutdown syncs them */
	pthread_mutex_unlock(&queue_lock);
	return NULL;
}

static void queue_async_cb(struct ev_loop *loop, ev_async *w, int revents)
{
	(void)loop; (void)w; (void)revents;
	pthread_mutex_lock(&queue_lock);
	struct queue_job *j = queue_done;
	queue_done = NULL;
	pthread_mutex_unlock(&queue_lock);
	while (j) {
		struct queue_job *next = j->next;
		j->cb(j->owner, j->id, j->result);
		buf_free(&j->head);
		buf_free(&j->msg);
		free(j);
		j = next;
	}
}

/* queue_init - folders and the commit thread */
int queue_init(struct ev_loop *loop, const char *dir, char *err, size_t errlen)
{
	char path[PATH_MAX];
	snprintf(queue_dir, sizeof(queue_dir), "%s", dir);
	if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
		snprintf(err, errlen, "cannot create queue %s: %s", dir, strerror(errno));
		return -1;
	}
	snprintf(path, sizeof(path), "%s/msg", dir);
	if (mkdir(path, 0700) < 0 && errno != EEXIST) {
		snprintf(err, errlen, "cannot create %s: %s", path, strerror(errno));
		return -1;
	}
	queue_msgdir_fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (queue_msgdir_fd < 0) {
		snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
		return -1;
	}
	queue_loop = loop;
	ev_async_init(&queue_async, queue_async_cb);
	ev_async_start(loop, &queue_async);
	ev_unref(loop);
	pthread_condattr_t ca; /* the removal wait on CLOCK_MONOTONIC: a clock step must not stretch it */
	if (pthread_condattr_init(&ca) == 0) {
		if (pthread_condattr_setclock(&ca, CLOCK_MONOTONIC) == 0) {
			pthread_cond_destroy(&queue_cond);
			if (pthread_cond_init(&queue_cond, &ca) == 0)
				queue_cond_clock = CLOCK_MONOTONIC;
			else
				pthread_cond_init(&queue_cond, NULL);
		}
		pthread_condattr_destroy(&ca);
	}
	if (pthread_create(&queue_thread, NULL, queue_thread_main, NULL) != 0) {
		snprintf(err, errlen, "cannot start the commit thread");
		return -1;
	}
	queue_thread_running = true;
	return 0;
}

/* queue_shutdown - let the commit thread finish its batch and stop */
void queue_shutdown(void)
{
	if (!queue_thread_running)
		return;
	pthread_mutex_lock(&queue_lock);
	queue_stopping = true;
	pthread_cond_signal(&queue_cond);
	pthread_mutex_unlock(&queue_lock);
	pthread_join(queue_thread, NULL); /* it unlinks the removals handed over before it ends */
	queue_thread_running = false;
	if (queue_removals_unsynced && queue_msgdir_fd >= 0) {
		queue_removals_unsynced = false;
		syncfs(queue_msgdir_fd);
	}
	queue_async_cb(queue_loop, &queue_async, 0);
}

/* queue_commit - hand a message to the commit thread */
int queue_commit(struct queue_envelope *env, struct buf *msg, queue_commit_cb cb, uint64_t owner)
{
	struct queue_job *j = calloc(1, sizeof(*j));
	if (!j)
		return -1;
	if (!env->id[0])
		queue_new_id(env->id);
	if (!env->created)
		env->created = time(NULL);
	memcpy(j->id, env->id, sizeof(j->id));
	if (queue_serialize(env, &j->head) < 0) {
		buf_free(&j->head);
		free(j);
		return -1;
	}
	j->msg = *msg;
	memset(msg, 0, sizeof(*msg));
	j->cb = cb;
	j->owner = owner;
	pthread_mutex_lock(&queue_lock);
	j->next = queue_pending;
	queue_pending = j;
	pthread_mutex_unlock(&queue_lock);
	pthread_cond_signal(&queue_cond); /* after the unlock: the woken thread does not block on it */
	return 0;
}

/* make a change of QUEUE/msg's entries (a new name, an unlink) durable */
static void queue_sync_dir(const char *dir)
{
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "%s/msg", dir);
	int dfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd >= 0) {
		fsync(dfd);
		close(dfd);
	}
}

/* queue_write_sync - write and fsync one message now (not on the loop's hot path) */
int queue_write_sync(const char *dir, struct queue_envelope *env, const char *msg, size_t len)
{
	char path[PATH_MAX], tmp[PATH_MAX];
	struct buf head = { 0 };
	if (!env->id[0])
		queue_new_id(env->id);
	if (!env->created)
		env->created = time(NULL);
	if (queue_serialize(env, &head) < 0 || queue_path(dir, env->id, path, sizeof(path)) < 0) {
		buf_free(&head);
		errno = ENOMEM;
		return -1;
	}
	snprintf(tmp, sizeof(tmp), "%s/msg/.%s.tmp", dir, env->id);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0) {
		buf_free(&head);
		return -1;
	}
	int rc = queue_write_message(fd, &head, msg, len);
	int e = errno;
	buf_free(&head);
	if (rc == 0 && fsync(fd) < 0)
		rc = -1, e = errno;
	close(fd);
	if (rc == 0 && link(tmp, path) < 0) /* not rename: an existing file must not be replaced */
		rc = -1, e = errno;
	unlink(tmp);
	if (rc < 0) {
		errno = e;
		return -1;
	}
	queue_sync_dir(dir);
	return 0;
}

static char *queue_strdup_or_null(const char *s)
{
	return strcmp(s, "-") ? strdup(s) : NULL;
}

static int queue_parse_header(struct queue_envelope *env, char *line)
{
	char *sp = strchr(line, ' ');
	char *v = sp ? sp + 1 : line + strlen(line);
	if (sp)
		*sp = '\0';
	if (!strcmp(line, "id")) {
		if (strlen(v) != QUEUE_ID_LEN)
			return -1;
		memcpy(env->id, v, QUEUE_ID_LEN + 1);
	}
	else if (!strcmp(line, "created"))
		env->created = (time_t)strtoll(v, NULL, 10);
	else if (!strcmp(line, "user"))
		env->user = strdup(v);
	else if (!strcmp(line, "from"))
		env->from = strdup(v);
	else if (!strcmp(line, "ret"))
		env->ret = queue_strdup_or_null(v);
	else if (!strcmp(line, "envid"))
		env->envid = queue_strdup_or_null(v);
	else if (!strcmp(line, "body"))
		env->body = !strcmp(v, "8BITMIME") ? QUEUE_BODY_8BITMIME :
			    !strcmp(v, "BINARYMIME") ? QUEUE_BODY_BINARYMIME : QUEUE_BODY_7BIT;
	else if (!strcmp(line, "smtputf8"))
		env->smtputf8 = v[0] == '1';
	else if (!strcmp(line, "rcpt")) {
		char orcpt[1024], addr[1024];
		unsigned notify;
		if (sscanf(v, "%u %1023s %1023s", &notify, orcpt, addr) != 3)
			return -1;
		struct queue_rcpt *r = realloc(env->rcpt, (env->nrcpt + 1) * sizeof(*r));
		if (!r)
			return -1;
		env->rcpt = r;
		r = &env->rcpt[env->nrcpt++];
		memset(r, 0, sizeof(*r));
		r->notify = notify;
		r->orcpt = queue_strdup_or_null(orcpt);
		r->addr = strdup(addr);
	} else if (!strcmp(line, "size"))
		env->size = (size_t)strtoull(v, NULL, 10);
	/* any other key (one a newer relayd may add) is ignored: a format older versions must
	 * not read gets a new version number instead (queue_load_version) */
	return 0;
}

static void queue_parse_status(struct queue_envelope *env, char *line)
{
	if (line[0] == 'D' && line[1] == ' ') {
		char *end;
		unsigned long idx = strtoul(line + 2, &end, 10);
		int code = (int)strtol(end, &end, 10);
		if (idx < env->nrcpt && code >= 200 && code < 600) {
			free(env->rcpt[idx].done_text);
			env->rcpt[idx].done_code = code;
			env->rcpt[idx].done_text = strdup(*end == ' ' ? end + 1 : end);
		}
	} else if (line[0] == 'T' && line[1] == ' ' && isdigit((unsigned char)line[2])) {
		char *end;
		unsigned long attempts = strtoul(line + 2, &end, 10);
		long long next = strtoll(end, &end, 10);
		if (attempts > QUEUE_MAX_ATTEMPTS || next < 0)
			return; /* damaged: not ours */
		env->attempts = (unsigned)attempts;
		env->next_attempt = (time_t)next;
		free(env->last_error);
		env->last_error = strdup(*end == ' ' ? end + 1 : end);
	} else if (line[0] == 'B' && line[1] == ' ') {
		if (strlen(line + 2) == QUEUE_ID_LEN)
			memcpy(env->bounce_id, line + 2, QUEUE_ID_LEN + 1);
	} else if (line[0] == 'R' && line[1] == ' ') {
		char *end;
		unsigned long idx = strtoul(line + 2, &end, 10);
		if (end != line + 2 && idx < env->nrcpt)
			env->rcpt[idx].relay_notice = true;
	} else if (line[0] == 'W' && (line[1] == ' ' || line[1] == '\0')) {
		env->delay_warned = true;
	}
}

/* check the END trailer: CRC over the body */
static int queue_check_body(FILE *f, struct queue_envelope *env)
{
	char buf[65536];
	uint32_t c = 0xFFFFFFFFu;
	size_t left = env->size;
	if (!queue_crc_table[1])
		queue_crc_init();
	while (left > 0) {
		size_t want = left < sizeof(buf) ? left : sizeof(buf);
		if (fread(buf, 1, want, f) != want)
			return -1;
		for (size_t i = 0; i < want; i++)
			c = queue_crc_table[(c ^ (unsigned char)buf[i]) & 0xff] ^ (c >> 8);
		left -= want;
	}
	char trailer[32];
	unsigned crc;
	if (!fgets(trailer, sizeof(trailer), f) || strcmp(trailer, "\n") || !fgets(trailer, sizeof(trailer), f) ||
	    sscanf(trailer, "END %8x\n", &crc) != 1 || strlen(trailer) != 13 || crc != (c ^ 0xFFFFFFFFu))
		return -1;
	return 0;
}

/* the first line: 0 for "RELAYD-QUEUE 1"; QUEUE_LOAD_UNUSABLE with *err for another version
 * (a newer relayd's file, kept for it) or a read error; QUEUE_LOAD_INCOMPLETE for anything
 * else (torn, or not ours) */
static int queue_load_version(FILE *f, char **line, size_t *cap, int *err)
{
	ssize_t n = getline(line, cap, f);
	if (n > 0 && !strcmp(*line, "RELAYD-QUEUE 1\n"))
		return 0;
	if (n > 0 && !strncmp(*line, "RELAYD-QUEUE ", 13) && (*line)[n - 1] == '\n' && strlen(*line) == (size_t)n) {
		*err = ENOTSUP;
		return QUEUE_LOAD_UNUSABLE;
	}
	if (ferror(f)) {
		*err = EIO;
		return QUEUE_LOAD_UNUSABLE;
	}
	return QUEUE_LOAD_INCOMPLETE;
}

/* the envelope lines up to the empty line; *damaged when one of them is not understood.
 * 0, QUEUE_LOAD_INCOMPLETE when the file ends before the empty line, or QUEUE_LOAD_UNUSABLE
 * (a read error) */
static int queue_load_header(FILE *f, struct queue_envelope *env, char **line, size_t *cap, bool *damaged)
{
	ssize_t n;
	while ((n = getline(line, cap, f)) > 0 && (*line)[n - 1] == '\n') {
		(*line)[--n] = '\0';
		if (n == 0)
			return 0;
		if (strlen(*line) != (size_t)n || queue_parse_header(env, *line) < 0)
			*damaged = true;
	}
	return ferror(f) ? QUEUE_LOAD_UNUSABLE : QUEUE_LOAD_INCOMPLETE;
}

/* the status records after the END trailer. A damaged line is skipped, never the lines
 * after it: one with NUL bytes (a range a crash left zeroed), an empty one (the newline
 * queue_append_status puts after a torn record), and a torn last one */
static void queue_load_status(FILE *f, struct queue_envelope *env, char **line, size_t *cap)
{
	ssize_t n;
	while ((n = getline(line, cap, f)) > 0) {
		if ((*line)[n - 1] != '\n')
			break; /* a torn last record: ignored */
		(*line)[n - 1] = '\0';
		if (strlen(*line) == (size_t)n - 1)
			queue_parse_status(env, *line);
	}
}

/* queue_load - envelope and status of a committed message. Only a file read in full that has
 * no valid END trailer is QUEUE_LOAD_INCOMPLETE (never acknowledged); one that cannot be read,
 * or is complete but cannot be used, is QUEUE_LOAD_UNUSABLE (errno says why) and must stay */
int queue_load(const char *dir, const char *id, struct queue_envelope *env)
{
	char path[PATH_MAX], *line = NULL;
	size_t cap = 0;
	bool damaged = false;
	int err = EBADMSG;
	memset(env, 0, sizeof(*env));
	if (queue_path(dir, id, path, sizeof(path)) < 0) {
		errno = ENAMETOOLONG;
		return QUEUE_LOAD_UNUSABLE;
	}
	int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC); /* recovery runs as root: no link is followed */
	FILE *f = fd >= 0 ? fdopen(fd, "r") : NULL;
	if (!f) {
		if (fd >= 0)
			close(fd);
		return QUEUE_LOAD_UNUSABLE;
	}
	int rc = queue_load_version(f, &line, &cap, &err);
	if (rc == 0)
		rc = queue_load_header(f, env, &line, &cap, &damaged);
	if (rc == 0) {
		env->body_offset = ftello(f);
		if (queue_check_body(f, env) < 0)
			rc = QUEUE_LOAD_INCOMPLETE;
	}
	if (rc == 0 && (damaged || !env->from || env->nrcpt == 0 || strcmp(env->id, id)))
		rc = QUEUE_LOAD_UNUSABLE; /* complete, so acknowledged, but not as we write them */
	if (rc == 0)
		queue_load_status(f, env, &line, &cap);
	if (ferror(f)) { /* not read in full: nothing is known about its trailer */
		rc = QUEUE_LOAD_UNUSABLE;
		err = EIO;
	}
	free(line);
	fclose(f);
	if (rc < 0) {
		queue_envelope_free(env);
		errno = err;
	}
	return rc;
}

/* queue_open_message - the message's file, read-only */
int queue_open_message(const char *dir, const char *id)
{
	char path[PATH_MAX];
	if (queue_path(dir, id, path, sizeof(path)) < 0) {
		errno = ENAMETOOLONG;
		return -1;
	}
	return open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
}

/* queue_read_body - the message bytes */
int queue_read_body(const char *dir, const struct queue_envelope *env, char **out)
{
	*out = NULL;
	int fd = queue_open_message(dir, env->id);
	if (fd < 0)
		return -1;
	char *p = malloc(env->size + 1);
	ssize_t r = p ? pread(fd, p, env->size, env->body_offset) : -1;
	close(fd);
	if (r != (ssize_t)env->size) {
		free(p);
		return -1;
	}
	p[env->size] = '\0';
	*out = p;
	return 0;
}

/* queue_envelope_free - release a loaded envelope */
void queue_envelope_free(struct queue_envelope *env)
{
	for (size_t i = 0; i < env->nrcpt; i++) {
		free(env->rcpt[i].addr);
		free(env->rcpt[i].orcpt);
		free(env->rcpt[i].done_text);
	}
	free(env->rcpt);
	free(env->user);
	free(env->from);
	free(env->ret);
	free(env->envid);
	free(env->last_error);
	memset(env, 0, sizeof(*env));
}

/* queue_append_status - one durable status record, on a line of its own: after a file
 * that does not end with a newline (a record torn by a crash, a NUL range) it starts with
 * one. One that fails is cut off again (ftruncate to the size before) */
int queue_append_status(const char *dir, const char *id, const char *record)
{
	char path[PATH_MAX];
	struct stat st;
	if (queue_path(dir, id, path, sizeof(path)) < 0) {
		errno = ENAMETOOLONG;
		return -1;
	}
	int fd = open(path, O_RDWR | O_APPEND | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return -1; /* only here is ENOENT "the message is gone" */
	char last = '\n';
	errno = 0;
	if (fstat(fd, &st) < 0 || (st.st_size > 0 && pread(fd, &last, 1, st.st_size - 1) != 1)) {
		int e = errno && errno != ENOENT ? errno : EIO;
		close(fd);
		errno = e;
		return -1;
	}
	struct iovec iov[3] = { { "\n", last != '\n' }, { (void *)record, strlen(record) }, { "\n", 1 } };
	int rc = queue_writev_all(fd, iov, 3) < 0 || fdatasync(fd) < 0 ? -1 : 0;
	int e = rc < 0 && errno && errno != ENOENT ? errno : EIO;
	if (rc < 0 && ftruncate(fd, st.st_size) < 0)
		log_err("%s queue event=truncate-failed error=\"%s\"", id, strerror(errno));
	close(fd);
	if (rc < 0)
		errno = e;
	return rc;
}

/* queue_remove - unlink; with durable, make the removal durable at once */
int queue_remove(const char *dir, const char *id, bool durable)
{
	char path[PATH_MAX];
	if (queue_path(dir, id, path, sizeof(path)) < 0 || unlink(path) < 0)
		return -1;
	if (durable) {
		queue_sync_dir(dir);
	} else if (queue_thread_running) {
		pthread_mutex_lock(&queue_lock);
		if (!queue_removals_unsynced) { /* the commit thread starts its timed wait */
			queue_removals_unsynced = true;
			pthread_cond_signal(&queue_cond);
		}
		pthread_mutex_unlock(&queue_lock);
	}
	return 0;
}

/* queue_remove_async - hand the unlink to the commit thread */
void queue_remove_async(const char *id)
{
	struct queue_removal *r = malloc(sizeof(*r));
	if (!r || !queue_thread_running) { /* out of memory, or no thread: here and now */
		free(r);
		queue_unlink_id(id);
		return;
	}
	snprintf(r->id, sizeof(r->id), "%s", id);
	pthread_mutex_lock(&queue_lock);
	r->next = queue_removals;
	queue_removals = r;
	bool wake = queue_thread_idle; /* else it is busy or in a timed wait, and takes it after that */
	pthread_mutex_unlock(&queue_lock);
	if (wake)
		pthread_cond_signal(&queue_cond);
}

/* queue_scan - every message id (16 hex digits) in the queue */
int queue_scan(const char *dir, void (*fn)(const char *id, void *arg), void *arg)
{
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "%s/msg", dir);
	DIR *d = opendir(path);
	if (!d)
		return -1;
	int n = 0;
	struct dirent *e;
	while ((e = readdir(d))) {
		if (strlen(e->d_name) != QUEUE_ID_LEN || strspn(e->d_name, "0123456789abcdef") != QUEUE_ID_LEN)
			continue;
		fn(e->d_name, arg);
		n++;
	}
	closedir(d);
	return n;
}
