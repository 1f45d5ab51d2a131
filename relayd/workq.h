/*
 * workq - a small pool of worker threads for slow work (password hashing, SASL steps)
 * that must not run on the libev loop. run() executes on a worker; done() then executes on
 * the loop thread (delivered through ev_async). Jobs are embedded in the caller's struct.
 */
#ifndef RELAYD_WORKQ_H
#define RELAYD_WORKQ_H

#include <stdbool.h>

struct ev_loop;

struct workq_job {
	void (*run)(struct workq_job *j);   /* on a worker thread */
	void (*done)(struct workq_job *j);  /* on the loop thread, after run */
	struct workq_job *next;
};

/* workq_init - start nthreads workers reporting to loop */
int workq_init(struct ev_loop *loop, int nthreads);
/* workq_submit - queue a job (loop thread only) */
void workq_submit(struct workq_job *j);
/* workq_run - j on a worker (workq_submit), or when on_loop, now on the loop thread, for work
 * known to be cheap (a small file just written, so in the page cache: saves the two thread
 * hand-overs); its done() then follows from the loop as after a worker, so a caller sees the
 * same order either way */
void workq_run(struct workq_job *j, bool on_loop);
/* workq_done_later - j's work was done on the loop: only its done() is to follow, from the loop */
void workq_done_later(struct workq_job *j);
/* workq_shutdown - finish queued jobs and join the workers */
void workq_shutdown(void);

#endif
