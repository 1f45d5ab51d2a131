/*
 * main - relayd: arguments, configuration, start-up order, signals, the loop.
 * Start-up order: config -> database (migrated) -> TLS credentials -> SASL -> queue
 * (recovery) -> bind listeners -> drop privileges -> loop. Anything that fails before the
 * loop is fatal with a message naming what and where.
 */
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "auth.h"
#include "config.h"
#include "listener.h"
#include "log.h"
#include "policy.h"
#include "queue.h"
#include "smtp_server.h"
#include "tls.h"
#include "userdb.h"
#include "workq.h"

#ifndef SYSCONFDIR
#define SYSCONFDIR "/etc"
#endif

static struct config main_cfg;
static ev_signal main_sigterm, main_sigint;

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
	int good, bad;
};

static void main_recover_one(const char *id, void *arg)
{
	struct main_recovery *r = arg;
	struct queue_envelope env;
	if (queue_load(r->dir, id, &env) == 0) {
		r->good++;
		queue_envelope_free(&env);
		return;
	}
	/* no valid END trailer: it was never acknowledged with 250 */
	char path[PATH_MAX];
	if (queue_path(r->dir, id, path, sizeof(path)) == 0 && unlink(path) == 0) {
		log_warn("%s queue event=discard-incomplete", id);
		r->bad++;
	}
}

static void main_recover(const char *dir)
{
	struct main_recovery r = { .dir = dir };
	queue_scan(dir, main_recover_one, &r);
	log_info("queue event=recovered messages=%d discarded=%d", r.good, r.bad);
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
	if (setgroups(1, &pw->pw_gid) < 0 || setgid(pw->pw_gid) < 0 || setuid(pw->pw_uid) < 0)
		fatal("cannot drop privileges to %s: %s", cfg->user, strerror(errno));
	if (setuid(0) == 0)
		fatal("privileges could be regained after dropping them");
	log_info("main event=privileges-dropped user=%s uid=%u", cfg->user, (unsigned)pw->pw_uid);
}

static void main_signal(struct ev_loop *loop, ev_signal *w, int revents)
{
	(void)revents;
	log_info("main event=shutdown signal=%d sessions=%u", w->signum, smtp_server_count());
	listener_stop(loop);
	smtp_server_shutdown();
	ev_break(loop, EVBREAK_ALL);
}

static void main_daemonize(const struct config *cfg)
{
	pid_t pid = fork();
	if (pid < 0)
		fatal("fork: %s", strerror(errno));
	if (pid > 0)
		_exit(0);
	setsid();
	int fd = open("/dev/null", O_RDWR);
	if (fd >= 0) {
		dup2(fd, 0);
		dup2(fd, 1);
		dup2(fd, 2);
		if (fd > 2)
			close(fd);
	}
	if (cfg->pidfile[0]) {
		FILE *f = fopen(cfg->pidfile, "w");
		if (f) {
			fprintf(f, "%ld\n", (long)getpid());
			fclose(f);
		}
	}
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
	log_init("relayd", foreground, debug);
	signal(SIGPIPE, SIG_IGN);

	struct userdb *db = userdb_open(main_cfg.database, err, sizeof(err));
	if (!db)
		fatal("%s", err);
	userdb_close(db);
	if (tls_global_init() < 0)
		fatal("cannot initialise GnuTLS");
	gnutls_certificate_credentials_t cred = NULL;
	if (main_cfg.tls_cert[0]) {
		cred = tls_server_creds(main_cfg.tls_cert, main_cfg.tls_key, err, sizeof(err));
		if (!cred)
			fatal("%s", err);
	}
	if (auth_init(&main_cfg, err, sizeof(err)) < 0)
		fatal("%s", err);
	for (int i = 0; i < main_cfg.nupstream; i++)
		if (main_cfg.upstream[i].tls == UPSTREAM_TLS_NONE || !main_cfg.upstream[i].verify)
			log_warn("main event=insecure-upstream upstream=%s:%s tls=%s verify=%s", main_cfg.upstream[i].host,
				 main_cfg.upstream[i].port,
				 main_cfg.upstream[i].tls == UPSTREAM_TLS_NONE ? "none" : "yes",
				 main_cfg.upstream[i].verify ? "yes" : "no");
	if (listener_bind_all(&main_cfg, err, sizeof(err)) < 0)
		fatal("%s", err);
	if (!foreground)
		main_daemonize(&main_cfg);

	struct ev_loop *loop = EV_DEFAULT;
	if (queue_init(loop, main_cfg.queue, err, sizeof(err)) < 0)
		fatal("%s", err);
	main_recover(main_cfg.queue);
	if (policy_init(&main_cfg, err, sizeof(err)) < 0)
		fatal("%s", err);
	main_drop_privileges(&main_cfg);
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	if (workq_init(loop, ncpu > 1 ? (int)ncpu : 2) < 0)
		fatal("cannot start worker threads");
	smtp_server_init(loop, &main_cfg, cred);
	listener_start(loop);
	ev_signal_init(&main_sigterm, main_signal, SIGTERM);
	ev_signal_init(&main_sigint, main_signal, SIGINT);
	ev_signal_start(loop, &main_sigterm);
	ev_signal_start(loop, &main_sigint);
	log_info("main event=started version=%s config=%s", PACKAGE_VERSION, cfgpath);
	ev_run(loop, 0);
	workq_shutdown();
	queue_shutdown();
	policy_shutdown();
	if (cred)
		gnutls_certificate_free_credentials(cred);
	sasl_server_done();
	gnutls_global_deinit();
	log_info("main event=stopped");
	return 0;
}
