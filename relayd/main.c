/*
 * main - relayd: arguments, configuration, start-up order, signals, the loop.
 * Start-up order: config -> queue lock (one relayd per queue) -> database (migrated) -> TLS
 * credentials -> SASL -> bind listeners -> detach (the parent exits when the child has
 * started) -> queue (recovery) -> drop privileges -> loop. Anything that fails before the
 * loop is fatal with a message naming what and where.
 */
#include <dirent.h>
#include <errno.h>
#include <stddef.h>
#include <ev.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "auth.h"
#include "config.h"
#include "forward.h"
#include "control.h"
#include "listener.h"
#include "metrics.h"
#include "log.h"
#include "policy.h"
#include "queue.h"
#include "smtp_server.h"
#include "stats.h"
#include "tls.h"
#include "tlsoff.h"
#include "userdb.h"
#include "workq.h"

#ifndef SYSCONFDIR
#define SYSCONFDIR "/etc"
#endif

static struct config main_cfg;
static ev_signal main_sigterm, main_sigint, main_sighup;
static ev_timer main_drain_timer;
static ev_tstamp main_drain_deadline;
static bool main_draining;
static int main_lock_fd = -1;  /* QUEUE/lock, flock'ed for the life of the process */
static int main_pid_fd = -1;   /* the pidfile, kept to empty it at exit when it cannot go */
static int main_ready_fd = -1; /* detached: the pipe to the parent waiting for "started" */
static int main_notify_fd = -1; /* connected to $NOTIFY_SOCKET (systemd Type=notify), or -1 */

static void main_usage(void)
{
	fprintf(stderr, "usage: relayd [-f] [-d] [-n] [-c FILE]\n"
			"  -c FILE  configuration (default %s/relayd/relayd.conf)\n"
			"  -f       stay in the foreground and log to stderr\n"
			"  -d       debug logging\n"
			"  -n       check the configuration and exit\n", SYSCONFDIR);
	exit(1);
}

struct main_recovery {
	const char *dir;
	int good, bad, kept;
};

/* only a file without a valid END trailer goes (it was never acknowledged with 250); one that
 * has it stays whatever else is wrong with it */
static void main_recover_one(const char *id, void *arg)
{
	struct main_recovery *r = arg;
	struct queue_envelope env;
	int rc = queue_load(r->dir, id, &env);
	if (rc == 0) {
		r->good++;
		queue_envelope_free(&env);
		return;
	}
	char path[PATH_MAX];
	if (rc == QUEUE_LOAD_INCOMPLETE) {
		if (queue_path(r->dir, id, path, sizeof(path)) == 0 && unlink(path) == 0) {
			log_warn("%s queue event=discard-incomplete", id);
			r->bad++;
		}
		return;
	}
	if (errno == ENOENT) /* removed meanwhile */
		return;
	log_err("%s queue event=unloadable error=\"%s\" action=kept-in-place reason=\"acknowledged message that "
		"cannot be read or used: see relayctl queue show\"", id, strerror(errno));
	r->kept++;
}

static void main_recover(const char *dir)
{
	struct main_recovery r = { .dir = dir };
	queue_scan(dir, main_recover_one, &r);
	if (r.kept)
		log_err("queue event=recovered messages=%d discarded=%d unloadable=%d", r.good, r.bad, r.kept);
	else
		log_info("queue event=recovered messages=%d discarded=%d unloadable=0", r.good, r.bad);
}

/* give dirfd/name to uid:gid without following a link: a symbolic link, or a file with a
 * second hard link (it may be anyone's), is left alone with a warning */
static void main_chown_at(int dirfd, const char *dir, const char *name, uid_t uid, gid_t gid)
{
	struct stat st;
	const char *why = NULL;
	int fd = openat(dirfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0 && errno == ENOENT)
		return;
	if (fd < 0 || fstat(fd, &st) < 0)
		why = strerror(errno);
	else if (S_ISLNK(st.st_mode))
		why = "a symbolic link";
	else if (!S_ISDIR(st.st_mode) && (!S_ISREG(st.st_mode) || st.st_nlink != 1))
		why = "not a file with one link";
	else if ((st.st_uid != uid || st.st_gid != gid) && fchownat(fd, "", uid, gid, AT_EMPTY_PATH) < 0)
		why = strerror(errno);
	if (why)
		log_warn("main event=chown-failed path=%s%s%s error=\"%s\"", dir, dir[0] ? "/" : "", name, why);
	if (fd >= 0)
		close(fd);
}

/* every file in QUEUE/msg: messages queued while relayd ran as root must stay deliverable */
static void main_chown_msgs(int queue_fd, const char *queue, uid_t uid, gid_t gid)
{
	char dir[PATH_MAX + 8];
	snprintf(dir, sizeof(dir), "%s/msg", queue);
	int fd = openat(queue_fd, "msg", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
	if (!d) {
		log_warn("main event=chown-failed path=%s error=\"%s\"", dir, strerror(errno));
		if (fd >= 0)
			close(fd);
		return;
	}
	struct dirent *e;
	while ((e = readdir(d)))
		if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
			main_chown_at(dirfd(d), dir, e->d_name, uid, gid);
	closedir(d);
}

/* files made as root before the drop (or while relayd ran without `user`) must belong to
 * the user relayd runs as */
static void main_chown_state(const struct config *cfg, uid_t uid, gid_t gid)
{
	static const char *suffixes[] = { "", "-wal", "-shm" };
	static const char *names[] = { "msg", "usage.log", "usage.log.1", "lock" };
	char path[PATH_MAX + 32];
	for (size_t i = 0; i < 3; i++) {
		snprintf(path, sizeof(path), "%s%s", cfg->database, suffixes[i]);
		main_chown_at(AT_FDCWD, "", path, uid, gid);
	}
	int fd = open(cfg->queue, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0) {
		log_warn("main event=chown-failed path=%s error=\"%s\"", cfg->queue, strerror(errno));
		return;
	}
	main_chown_msgs(fd, cfg->queue, uid, gid);
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		main_chown_at(fd, cfg->queue, names[i], uid, gid);
	if (fchown(fd, uid, gid) < 0)
		log_warn("main event=chown-failed path=%s error=\"%s\"", cfg->queue, strerror(errno));
	close(fd);
}

/* descriptors beside the sessions': listeners, upstream sessions, queue files, the database */
#define MAIN_FDS_SPARE 256
#define MAIN_FDS_MAX (1u << 20)  /* Linux's default fs.nr_open */

/* the soft limit on open files up to the hard one (a service manager's soft default, often
 * 1024, would refuse sessions long before max_sessions); a warning when even that is short */
static void main_raise_nofile(const struct config *cfg)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
		return;
	rlim_t want = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > MAIN_FDS_MAX ? MAIN_FDS_MAX : rl.rlim_max;
	if (rl.rlim_cur < want) {
		rl.rlim_cur = want;
		if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
			getrlimit(RLIMIT_NOFILE, &rl);
	}
	if (cfg->max_sessions && rl.rlim_cur < (rlim_t)cfg->max_sessions + MAIN_FDS_SPARE)
		log_warn("main event=fd-limit-low limit=%llu max_sessions=%u hint=\"raise the hard limit "
			 "(LimitNOFILE= in the systemd unit, ulimit -Hn): sessions past it are refused\"",
			 (unsigned long long)rl.rlim_cur, cfg->max_sessions);
}

/* a file a SIGHUP re-reads as the user: a warning now if the user cannot read it. A secret
 * (auth=) must be the user's own, mode 0600: forward refuses any group or other permission
 * on it, the others' group-readable 0640 too */
static void main_check_rereadable(const struct config *cfg, const char *path, bool secret)
{
	if (access(path, R_OK) == 0)
		return;
	if (secret)
		log_warn("main event=reload-will-fail path=%s error=\"%s\" hint=\"a SIGHUP re-reads it as user %s: "
			 "give it to that user, mode 0600 (chown %s %s; chmod 600 %s)\"", path, strerror(errno),
			 cfg->user, cfg->user, path, path);
	else
		log_warn("main event=reload-will-fail path=%s error=\"%s\" hint=\"a SIGHUP re-reads it as user %s: "
			 "make it readable by that user or one of its groups (e.g. ssl-cert, mode 0640)\"", path,
			 strerror(errno), cfg->user);
}

/* after the drop: a SIGHUP re-reads these files as the user, so say now which it cannot */
static void main_check_reloadable(const struct config *cfg)
{
	main_check_rereadable(cfg, cfg->path, false);
	for (int i = 0; i < cfg->ncert; i++) {
		main_check_rereadable(cfg, cfg->tls_cert[i], false);
		main_check_rereadable(cfg, cfg->tls_key[i], false);
	}
	for (int i = 0; i < cfg->nupstream; i++) {
		if (cfg->upstream[i].ca[0])
			main_check_rereadable(cfg, cfg->upstream[i].ca, false);
		if (cfg->upstream[i].auth_file[0])
			main_check_rereadable(cfg, cfg->upstream[i].auth_file, true);
	}
}

/* the first folder on path that the user cannot search, path cut there in place: its errno,
 * or 0 when the user reaches the whole path */
static int main_first_unsearchable(char *path)
{
	for (char *p = path + 1;; p++) {
		if (*p != '/' && *p != '\0')
			continue;
		char c = *p;
		*p = '\0';
		if (access(path, X_OK) < 0)
			return errno;
		if (!c)
			return 0;
		*p = c;
	}
}

/* after the drop: each worker thread opens the database itself, as the user, so the user
 * must be able to search its folder and every folder above it (relayd does not chown a
 * folder that may be /var/lib; systemd's StateDirectory= without User= gives /var/lib/relayd
 * back to root). The warning names the first folder that blocks. Writing there is not
 * needed: the -wal and -shm files stay while the loop's connection is open. */
static void main_check_database_dir(const struct config *cfg)
{
	char dir[PATH_MAX], block[PATH_MAX];
	snprintf(dir, sizeof(dir), "%s", cfg->database);
	char *slash = strrchr(dir, '/');
	if (!slash)
		snprintf(dir, sizeof(dir), ".");
	else if (slash == dir)
		dir[1] = '\0'; /* "/x.db": the folder is "/" */
	else
		*slash = '\0';
	snprintf(block, sizeof(block), "%s", dir);
	int err = main_first_unsearchable(block);
	if (!err)
		return;
	if (!strcmp(block, dir))
		log_warn("main event=database-folder-unusable path=%s error=\"%s\" hint=\"user %s cannot reach %s "
			 "through this folder, so every AUTH fails with 454 4.7.0: give the folder to that user "
			 "(chown %s %s) or let it search there (mode 0711)\"", dir, strerror(err), cfg->user,
			 cfg->database, cfg->user, dir);
	else
		log_warn("main event=database-folder-unusable path=%s error=\"%s\" hint=\"user %s cannot reach %s "
			 "through this folder above %s, so every AUTH fails with 454 4.7.0: let it search there "
			 "(chmod o+x %s, or g+x with a group of the user's)\"", block, strerror(err), cfg->user,
			 cfg->database, dir, block);
}

static void main_drop_privileges(const struct config *cfg)
{
	if (!cfg->user[0]) {
		if (geteuid() == 0)
			log_warn("main event=running-as-root hint=\"set 'user' in %s\"", cfg->path);
		return;
	}
	struct passwd *pw = getpwnam(cfg->user);
	if (!pw)
		fatal("%s: user %s does not exist", cfg->path, cfg->user);
	if (geteuid() != 0) {
		if (getuid() != pw->pw_uid)
			log_warn("main event=cannot-drop-privileges reason=not-root user=%s", cfg->user);
		return;
	}
	main_chown_state(cfg, pw->pw_uid, pw->pw_gid);
	/* the user's groups too (not just its own): a key readable by a group such as ssl-cert */
	if (initgroups(pw->pw_name, pw->pw_gid) < 0 || setgid(pw->pw_gid) < 0 || setuid(pw->pw_uid) < 0)
		fatal("cannot drop privileges to %s: %s", cfg->user, strerror(errno));
	if (setuid(0) == 0)
		fatal("privileges could be regained after dropping them");
	log_info("main event=privileges-dropped user=%s uid=%u", cfg->user, (unsigned)pw->pw_uid);
	main_check_reloadable(cfg);
	main_check_database_dir(cfg);
}

/* systemd's readiness protocol (sd_notify(3)) without libsystemd: a datagram socket
 * connected to $NOTIFY_SOCKET (a path, or an abstract name after '@') at start, as root, so
 * that it still reaches a root-only socket after the privilege drop */
static void main_notify_open(void)
{
	const char *name = getenv("NOTIFY_SOCKET");
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	if (!name || (name[0] != '/' && name[0] != '@'))
		return;
	size_t len = strlen(name);
	if (len >= sizeof(sun.sun_path)) {
		log_warn("main event=notify-failed socket=%s error=\"name too long\"", name);
		return;
	}
	memcpy(sun.sun_path, name, len);
	if (name[0] == '@')
		sun.sun_path[0] = '\0';
	int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sun, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len)) < 0) {
		log_warn("main event=notify-failed socket=%s error=\"%s\"", name, strerror(errno));
		if (fd >= 0)
			close(fd);
		return;
	}
	main_notify_fd = fd;
}

/* one state change for the service manager ("READY=1", "STOPPING=1"); never blocks */
static void main_notify(const char *state)
{
	if (main_notify_fd >= 0 && send(main_notify_fd, state, strlen(state), MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
		log_warn("main event=notify-failed state=\"%.*s\" error=\"%s\"", (int)strcspn(state, "\n"), state,
			 strerror(errno));
}

/* every 100 ms while draining: done when no session is left, or at the deadline */
static void main_drain_check(struct ev_loop *loop, ev_timer *w, int revents)
{
	(void)w; (void)revents;
	if (smtp_server_count() > 0 && ev_now(loop) < main_drain_deadline)
		return;
	if (smtp_server_count() > 0)
		log_warn("main event=drain-timeout sessions=%u", smtp_server_count());
	ev_timer_stop(loop, &main_drain_timer);
	smtp_server_shutdown();
	ev_break(loop, EVBREAK_ALL);
}

/* SIGTERM/SIGINT: stop accepting, let sessions finish; the second one stops at once.
 * Either way every message that got a 250 is already on disk. */
static void main_signal(struct ev_loop *loop, ev_signal *w, int revents)
{
	(void)revents;
	if (main_draining) {
		log_info("main event=shutdown-now signal=%d sessions=%u", w->signum, smtp_server_count());
		smtp_server_shutdown();
		ev_break(loop, EVBREAK_ALL);
		return;
	}
	main_draining = true;
	main_notify("STOPPING=1");
	log_info("main event=draining signal=%d sessions=%u timeout=%u", w->signum, smtp_server_count(),
		 main_cfg.drain_timeout);
	listener_stop(loop);
	smtp_server_drain();
	main_drain_deadline = ev_now(loop) + main_cfg.drain_timeout;
	ev_timer_init(&main_drain_timer, main_drain_check, 0., 0.1);
	ev_timer_again(loop, &main_drain_timer);
}

/* keep what only a restart can change, and say so */
static void main_reload_keep(struct config *n, const struct config *o)
{
	bool same_listen = n->nlisten == o->nlisten;
	for (int i = 0; same_listen && i < n->nlisten; i++)
		same_listen = !strcmp(n->listen[i].host, o->listen[i].host) &&
			      !strcmp(n->listen[i].port, o->listen[i].port) && n->listen[i].mode == o->listen[i].mode;
	if (!same_listen || strcmp(n->queue, o->queue) || strcmp(n->database, o->database) ||
	    strcmp(n->user, o->user) || strcmp(n->control, o->control) || strcmp(n->metrics_host, o->metrics_host) ||
	    strcmp(n->metrics_port, o->metrics_port) || n->auth_cache_ttl != o->auth_cache_ttl ||
	    n->ipv6_prefix_length != o->ipv6_prefix_length || strcmp(n->pidfile, o->pidfile))
		log_warn("main event=reload-partial reason=\"listen, queue, database, user, control, metrics, pidfile, "
			 "auth_cache_ttl and ipv6_prefix_length change only on restart\"");
	memcpy(n->listen, o->listen, sizeof(n->listen));
	n->nlisten = o->nlisten;
	memcpy(n->queue, o->queue, sizeof(n->queue));
	memcpy(n->database, o->database, sizeof(n->database));
	memcpy(n->user, o->user, sizeof(n->user));
	memcpy(n->control, o->control, sizeof(n->control));
	memcpy(n->metrics_host, o->metrics_host, sizeof(n->metrics_host));
	memcpy(n->metrics_port, o->metrics_port, sizeof(n->metrics_port));
	n->auth_cache_ttl = o->auth_cache_ttl; /* the credential cache reads it once, at start */
	n->ipv6_prefix_length = o->ipv6_prefix_length; /* the per-IP table's keys are made with it */
	memcpy(n->pidfile, o->pidfile, sizeof(n->pidfile)); /* the one written at start goes at exit */
}

/* the CPUs relayd may run on (its affinity mask: taskset, systemd CPUAffinity=), at least 1 */
static int main_cpus(void)
{
	cpu_set_t set;
	if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0)
		return CPU_COUNT(&set);
	long n = sysconf(_SC_NPROCESSORS_ONLN);
	return n > 0 ? (int)n : 1;
}

/* TLS handshake threads: the configured count, or with "auto" one thread per CPU (at most
 * TLSOFF_MAX_THREADS) when a key signs slowly (RSA: the signature would hold the loop about a
 * millisecond per handshake, and one thread saturates before the CPUs do) and none for EC
 * keys (a handshake on the loop costs less than handing it to a thread and back).
 * Called at start and after each reload: an RSA key loaded later starts the threads then. */
static void main_tls_threads(struct ev_loop *loop, gnutls_certificate_credentials_t cred, bool starting)
{
	bool automatic = main_cfg.tls_threads == CONFIG_TLS_THREADS_AUTO;
	int cpus = main_cpus();
	if (cpus > TLSOFF_MAX_THREADS)
		cpus = TLSOFF_MAX_THREADS;
	int n = automatic ? (cred && tls_creds_slow_sign(cred) ? cpus : 0) : (int)main_cfg.tls_threads;
	if (tlsoff_enabled() || (n == 0 && !starting))
		return; /* threads, once started, stay for the life of the process */
	if (tlsoff_init(loop, n) < 0)
		fatal("cannot start TLS handshake threads");
	log_info("main event=tls-handshakes on=%s threads=%d setting=%s", n ? "threads" : "loop", n,
		 automatic ? (n ? "auto-slow-key" : "auto-ec-key") : "tls_threads");
}

/* main_reload - SIGHUP: new config, certificates, limits; a bad one is refused whole */
static int main_reload(void)
{
	char err[1024];
	struct config *n = malloc(sizeof(*n));
	if (!n)
		return -1;
	if (config_load(main_cfg.path, n, err, sizeof(err)) < 0) {
		log_err("main event=reload-failed error=\"%s\" action=kept-old-config", err);
		free(n);
		return -1;
	}
	main_reload_keep(n, &main_cfg);
	gnutls_certificate_credentials_t cred = NULL;
	if (n->ncert && !(cred = tls_server_creds((const char (*)[PATH_MAX])n->tls_cert,
						  (const char (*)[PATH_MAX])n->tls_key, n->ncert, err, sizeof(err)))) {
		log_err("main event=reload-failed error=\"%s\" action=kept-old-config", err);
		free(n);
		return -1;
	}
	if (forward_reload(n, err, sizeof(err)) < 0) { /* last: it applies what it loaded */
		log_err("main event=reload-failed error=\"%s\" action=kept-old-config", err);
		if (cred)
			gnutls_certificate_free_credentials(cred);
		free(n);
		return -1;
	}
	main_cfg = *n;
	free(n);
	if (cred) {
		main_tls_threads(EV_DEFAULT, cred, false);
		smtp_server_set_creds(cred); /* it frees the old set when its last session ends */
	}
	log_info("main event=reloaded config=%s", main_cfg.path);
	return 0;
}

static int main_ctl_stats(const char *args, struct buf *out)
{
	(void)args;
	stats_render(out, false);
	policy_stats(out);
	return 0;
}

static int main_ctl_reload(const char *args, struct buf *out)
{
	(void)args;
	if (main_reload() < 0) {
		buf_printf(out, "reload refused: the configuration has an error (see the log); the old one is kept");
		return -1;
	}
	buf_printf(out, "reloaded %s\n", main_cfg.path);
	return 0;
}

static int main_ctl_flush(const char *args, struct buf *out)
{
	(void)args;
	forward_flush();
	buf_printf(out, "flush started\n");
	return 0;
}

/* the unlink runs on the loop (an administrator's rare action); the commit thread's syncfs
 * makes it durable within a second, so no fsync waits here */
static int main_ctl_delete(const char *args, struct buf *out)
{
	if (strlen(args) != QUEUE_ID_LEN || strspn(args, "0123456789abcdef") != QUEUE_ID_LEN) {
		buf_printf(out, "bad queue id: expected 16 hex digits"); /* not a path: it names a file */
		return -1;
	}
	forward_forget(args); /* first, so the forwarder does not race the removal */
	if (queue_remove(main_cfg.queue, args, false) < 0) {
		buf_printf(out, "no such message: %s", args);
		return -1;
	}
	log_info("%s queue event=deleted by=relayctl", args);
	buf_printf(out, "deleted %s\n", args);
	return 0;
}

/* the forwarder's counters and per-upstream state in relayctl stats and /metrics */
static void main_forward_section(struct buf *out, bool prometheus)
{
	if (!prometheus) {
		forward_stats(out);
		return;
	}
	struct buf kv = { 0 };
	forward_stats(&kv);
	stats_kv_prometheus(kv.data ? kv.data : "", "forward", out);
	buf_free(&kv);
}

static void main_control_init(struct ev_loop *loop)
{
	stats_add_section(main_forward_section);
	char err[512];
	control_register("flush", main_ctl_flush);
	control_register("delete", main_ctl_delete);
	control_register("stats", main_ctl_stats);
	control_register("reload", main_ctl_reload);
	if (control_init(loop, main_cfg.control, err, sizeof(err)) < 0)
		fatal("%s", err);
}

static void main_hup(struct ev_loop *loop, ev_signal *w, int revents)
{
	(void)loop; (void)w; (void)revents;
	main_reload();
}

/* a start-up failure before detaching, which the caller must see: a detaching relayd logs
 * to syslog only, so it goes to stderr (still the caller's) too */
static void main_refuse(bool foreground, const char *msg)
{
	if (!foreground)
		fprintf(stderr, "relayd: %s\n", msg);
	fatal("%s", msg);
}

/* one relayd per queue: an exclusive flock on QUEUE/lock, taken before anything else
 * touches the queue (recovery, usage.log, pidfile, control socket) and held until exit;
 * a second relayd on the same queue exits 1 here and names the first one's pid */
static void main_lock_queue(const struct config *cfg, bool foreground)
{
	char path[PATH_MAX + 16], msg[PATH_MAX + 128], pid[24] = "";
	snprintf(path, sizeof(path), "%s/lock", cfg->queue);
	if (mkdir(cfg->queue, 0700) < 0 && errno != EEXIST) {
		snprintf(msg, sizeof(msg), "cannot create queue %s: %s", cfg->queue, strerror(errno));
		main_refuse(foreground, msg);
	}
	main_lock_fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0600);
	if (main_lock_fd < 0) {
		snprintf(msg, sizeof(msg), "cannot open %s: %s", path, strerror(errno));
		main_refuse(foreground, msg);
	}
	struct stat st;
	if (fstat(main_lock_fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_nlink != 1) {
		snprintf(msg, sizeof(msg), "%s is not a file with one link: not starting", path);
		main_refuse(foreground, msg); /* a hard link to a file relayd would truncate */
	}
	if (flock(main_lock_fd, LOCK_EX | LOCK_NB) == 0)
		return;
	if (errno != EWOULDBLOCK) {
		snprintf(msg, sizeof(msg), "cannot lock %s: %s", path, strerror(errno));
		main_refuse(foreground, msg);
	}
	ssize_t n = pread(main_lock_fd, pid, sizeof(pid) - 1, 0);
	pid[n > 0 ? strcspn(pid, "\n") : 0] = '\0';
	snprintf(msg, sizeof(msg), "queue %s is in use by another relayd (pid %s): not starting",
		 cfg->queue, pid[0] ? pid : "unknown");
	main_refuse(foreground, msg);
}

/* started as root with a `user`, relayd works as root in folders that user may write until
 * the drop, so it refuses links there that it would follow (the queue code opens QUEUE/msg,
 * SQLite the database and its -wal and -shm): a process running as the user could plant
 * them to make root give it, or overwrite, any file */
static void main_refuse_links(const struct config *cfg, bool foreground)
{
	static const char *db_suffixes[] = { "", "-wal", "-shm" };
	char path[PATH_MAX + 16], msg[PATH_MAX + 256];
	struct stat st;
	if (!cfg->user[0] || geteuid() != 0)
		return;
	for (size_t i = 0; i < 4; i++) {
		if (i < 3)
			snprintf(path, sizeof(path), "%s%s", cfg->database, db_suffixes[i]);
		else
			snprintf(path, sizeof(path), "%s/msg", cfg->queue);
		if (lstat(path, &st) == 0 && S_ISLNK(st.st_mode)) {
			snprintf(msg, sizeof(msg), "%s is a symbolic link: not starting (as root, relayd "
				 "follows no link in the folders of user %s)", path, cfg->user);
			main_refuse(foreground, msg);
		}
	}
}

/* fd's whole content becomes this process's pid and a newline */
static int main_write_pid(int fd)
{
	char pid[24];
	int n = snprintf(pid, sizeof(pid), "%ld\n", (long)getpid());
	return ftruncate(fd, 0) == 0 && pwrite(fd, pid, (size_t)n, 0) == n ? 0 : -1;
}

/* the lock file names the process holding it (after detaching: the pid changes) */
static void main_lock_pid(void)
{
	if (main_write_pid(main_lock_fd) < 0)
		log_warn("main event=lock-pid-failed error=\"%s\"", strerror(errno));
}

/* at exit (clean or fatal): the pidfile goes; when relayd, no longer root, may not remove
 * it from its folder, it is emptied so that it names no process */
static void main_pidfile_remove(void)
{
	if (main_pid_fd < 0)
		return;
	if (unlink(main_cfg.pidfile) < 0 && ftruncate(main_pid_fd, 0) < 0)
		log_warn("main event=pidfile-not-removed path=%s error=\"%s\"", main_cfg.pidfile, strerror(errno));
	close(main_pid_fd);
	main_pid_fd = -1;
}

static void main_pidfile_write(const struct config *cfg)
{
	int fd = open(cfg->pidfile, O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
	if (fd < 0 || main_write_pid(fd) < 0) {
		log_warn("main event=pidfile-failed path=%s error=\"%s\"", cfg->pidfile, strerror(errno));
		if (fd >= 0)
			close(fd);
		return;
	}
	main_pid_fd = fd;
	atexit(main_pidfile_remove);
}

/* the parent of a detaching relayd exits 0 when the child says it started, 1 when the
 * child exits first (its reason is in the log) */
static void main_daemon_wait(int fd, const sigset_t *mask)
{
	char c;
	ssize_t n;
	sigprocmask(SIG_UNBLOCK, mask, NULL); /* ^C still stops the wait */
	while ((n = read(fd, &c, 1)) < 0 && errno == EINTR)
		;
	if (n == 1)
		_exit(0);
	fprintf(stderr, "relayd: start-up failed (the reason is in the mail log)\n");
	_exit(1);
}

static void main_daemonize(const struct config *cfg, const sigset_t *mask)
{
	int ready[2];
	if (pipe2(ready, O_CLOEXEC) < 0)
		fatal("pipe: %s", strerror(errno));
	pid_t pid = fork();
	if (pid < 0)
		fatal("fork: %s", strerror(errno));
	if (pid > 0) {
		close(ready[1]);
		main_daemon_wait(ready[0], mask);
	}
	close(ready[0]);
	main_ready_fd = ready[1];
	setsid();
	int fd = open("/dev/null", O_RDWR);
	if (fd >= 0) {
		dup2(fd, 0);
		dup2(fd, 1);
		dup2(fd, 2);
		if (fd > 2)
			close(fd);
	}
	if (cfg->pidfile[0])
		main_pidfile_write(cfg);
}

/* serving: a waiting parent may exit 0 now, and a service manager may count relayd as started */
static void main_ready(void)
{
	char state[48];
	snprintf(state, sizeof(state), "READY=1\nMAINPID=%ld", (long)getpid());
	main_notify(state);
	if (main_ready_fd < 0)
		return;
	if (write(main_ready_fd, "R", 1) != 1)
		log_warn("main event=ready-not-sent error=\"%s\"", strerror(errno));
	close(main_ready_fd);
	main_ready_fd = -1;
}

int main(int argc, char **argv)
{
	char cfgpath[PATH_MAX];
	char err[1024];
	int opt, foreground = 0, debug = 0, check_only = 0;

	snprintf(cfgpath, sizeof(cfgpath), "%s/relayd/relayd.conf", SYSCONFDIR);
	while ((opt = getopt(argc, argv, "c:fdnh")) != -1) {
		switch (opt) {
		case 'c': snprintf(cfgpath, sizeof(cfgpath), "%s", optarg); break;
		case 'f': foreground = 1; break;
		case 'd': debug = 1; break;
		case 'n': check_only = 1; break;
		default: main_usage();
		}
	}
	if (optind != argc)
		main_usage();
	if (config_load(cfgpath, &main_cfg, err, sizeof(err)) < 0) {
		fprintf(stderr, "%s\n", err);
		return 1;
	}
	if (check_only) {
		printf("%s: ok\n", cfgpath);
		return 0;
	}
	umask(077);
	/* a SIGTERM during start-up waits until the drain handler is installed (the ports are
	 * bound early, so a supervisor may already see relayd as up); threads started before
	 * that inherit the mask, so signals always land on the loop thread */
	sigset_t startup_mask;
	sigemptyset(&startup_mask);
	sigaddset(&startup_mask, SIGTERM);
	sigaddset(&startup_mask, SIGINT);
	sigaddset(&startup_mask, SIGHUP);
	sigprocmask(SIG_BLOCK, &startup_mask, NULL);
	log_init("relayd", foreground, debug);
	main_notify_open();
	signal(SIGPIPE, SIG_IGN);
	main_raise_nofile(&main_cfg);
	main_lock_queue(&main_cfg, foreground);
	main_refuse_links(&main_cfg, foreground);

	/* kept open for the life of the process: SQLite's -wal and -shm files then stay in place
	 * (chowned with the database before the privilege drop), so worker threads running as
	 * the unprivileged user can open the database in a folder they cannot write to */
	struct userdb *db = userdb_open(main_cfg.database, err, sizeof(err));
	if (!db)
		main_refuse(foreground, err);
	if (tls_global_init() < 0)
		main_refuse(foreground, "cannot initialise GnuTLS");
	gnutls_certificate_credentials_t cred = NULL; /* handed to smtp_server, which frees it */
	if (main_cfg.ncert) {
		cred = tls_server_creds((const char (*)[PATH_MAX])main_cfg.tls_cert,
					     (const char (*)[PATH_MAX])main_cfg.tls_key, main_cfg.ncert, err, sizeof(err));
		if (!cred)
			main_refuse(foreground, err);
	}
	if (auth_init(&main_cfg, err, sizeof(err)) < 0)
		main_refuse(foreground, err);
	auth_use_loop_db(db); /* and AUTH PLAIN answered from the credential cache uses it, on the loop */
	for (int i = 0; i < main_cfg.nupstream; i++) {
		const struct upstream_cfg *u = &main_cfg.upstream[i];
		char name[300];
		config_hostport_str(u->host, u->port, name, sizeof(name));
		if (u->tls == UPSTREAM_TLS_NONE || !u->verify)
			log_warn("main event=insecure-upstream upstream=%s tls=%s verify=%s", name,
				 u->tls == UPSTREAM_TLS_NONE ? "none" : u->tls == UPSTREAM_TLS_IMPLICIT ? "implicit" : "starttls",
				 u->verify ? "yes" : "no");
	}
	if (!strchr(main_cfg.hostname, '.'))
		log_warn("main event=hostname-not-fqdn hostname=%s hint=\"set hostname to this host's domain name: it "
			 "names relayd in its greeting, Received: and Message-ID:, and in EHLO to upstreams, which get "
			 "an address literal meanwhile\"", main_cfg.hostname);
	if (listener_bind_all(&main_cfg, err, sizeof(err)) < 0)
		main_refuse(foreground, err);
	if (!foreground)
		main_daemonize(&main_cfg, &startup_mask);
	main_lock_pid();

	struct ev_loop *loop = EV_DEFAULT;
	if (queue_init(loop, main_cfg.queue, err, sizeof(err)) < 0)
		fatal("%s", err);
	main_recover(main_cfg.queue);
	if (forward_init(loop, &main_cfg, err, sizeof(err)) < 0)
		fatal("%s", err);
	if (policy_init(loop, &main_cfg, err, sizeof(err)) < 0)
		fatal("%s", err);
	main_drop_privileges(&main_cfg);
	int cpus = main_cpus();
	if (workq_init(loop, cpus > 1 ? cpus : 2) < 0)
		fatal("cannot start worker threads");
	main_tls_threads(loop, cred, true);
	smtp_server_init(loop, &main_cfg, cred);
	main_control_init(loop); /* after the drop: the socket belongs to relayd's user */
	if (main_cfg.metrics_host[0] && metrics_init(loop, main_cfg.metrics_host, main_cfg.metrics_port, err, sizeof(err)) < 0)
		fatal("%s", err);
	listener_start(loop);
	ev_signal_init(&main_sigterm, main_signal, SIGTERM);
	ev_signal_init(&main_sigint, main_signal, SIGINT);
	ev_signal_start(loop, &main_sigterm);
	ev_signal_start(loop, &main_sigint);
	ev_signal_init(&main_sighup, main_hup, SIGHUP);
	ev_signal_start(loop, &main_sighup);
	pthread_sigmask(SIG_UNBLOCK, &startup_mask, NULL);
	log_info("main event=started version=%s config=%s", PACKAGE_VERSION, cfgpath);
	main_ready();
	ev_run(loop, 0);
	forward_shutdown();
	tlsoff_shutdown();
	workq_shutdown();
	queue_shutdown();
	policy_shutdown();
	metrics_shutdown();
	control_shutdown();
	smtp_server_free_creds();
	sasl_server_done();
	userdb_close(db);
	tls_global_deinit();
	main_pidfile_remove();
	log_info("main event=stopped");
	return 0;
}
