/*
 * workq - worker threads with completion on the loop.
 * Invariant: done() of every submitted job is called exactly once, on the loop thread,
 * unless the process exits first.
 */
#include "workq.h"

#include <ev.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>

#define WORKQ_MAX_THREADS 16

static pthread_mutex_t workq_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t workq_cond = PTHREAD_COND_INITIALIZER;
static struct workq_job *workq_head, *workq_tail;     /* waiting to run */
static struct workq_job *workq_done_head, *workq_done_tail; /* ran, waiting for done() */
static pthread_t workq_threads[WORKQ_MAX_THREADS];
static int workq_nthreads;
static bool workq_stopping;
static struct ev_loop *workq_loop;
static ev_async workq_async;

static void workq_push(struct workq_job **head, struct workq_job **tail, struct workq_job *j)
{
	j->next = NULL;
	if (*tail)
		(*tail)->next = j;
	else
		*head = j;
	*tail = j;
}

static void *workq_main(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&workq_lock);
	for (;;) {
		while (!workq_head && !workq_stopping)
			pthread_cond_wait(&workq_cond, &workq_lock);
		if (!workq_head)
			break;
		struct workq_job *j = workq_head;
		workq_head = j->next;
		if (!workq_head)
			workq_tail = NULL;
		pthread_mutex_unlock(&workq_lock);
		j->run(j);
		pthread_mutex_lock(&workq_lock);
		workq_push(&workq_done_head, &workq_done_tail, j);
		ev_async_send(workq_loop, &workq_async);
	}
	pthread_mutex_unlock(&workq_lock);
	return NULL;
}

static void workq_async_cb(struct ev_loop *loop, ev_async *w, int revents)
{
	(void)loop; (void)w; (void)revents;
	pthread_mutex_lock(&workq_lock);
	struct workq_job *j = workq_done_head;
	workq_done_head = workq_done_tail = NULL;
	pthread_mutex_unlock(&workq_lock);
	while (j) {
		struct workq_job *next = j->next;
		j->done(j);
		j = next;
	}
}

/* workq_init - start the workers */
int workq_init(struct ev_loop *loop, int nthreads)
{
	if (nthreads < 1)
		nthreads = 1;
	if (nthreads > WORKQ_MAX_THREADS)
		nthreads = WORKQ_MAX_THREADS;
	workq_loop = loop;
	ev_async_init(&workq_async, workq_async_cb);
	ev_async_start(loop, &workq_async);
	ev_unref(loop); /* the async watcher alone does not keep the loop running */
	for (int i = 0; i < nthreads; i++) {
		if (pthread_create(&workq_threads[i], NULL, workq_main, NULL) != 0)
			return -1;
		workq_nthreads++;
	}
	return 0;
}

/* workq_submit - queue a job */
void workq_submit(struct workq_job *j)
{
	pthread_mutex_lock(&workq_lock);
	workq_push(&workq_head, &workq_tail, j);
	pthread_mutex_unlock(&workq_lock);
	pthread_cond_signal(&workq_cond); /* after the unlock: the woken worker does not block on it */
}

/* workq_run - on the loop (done() still through the list the workers report on) or on a
 * worker, as the caller judged the work's cost */
void workq_run(struct workq_job *j, bool on_loop)
{
	if (!on_loop) {
		workq_submit(j);
		return;
	}
	j->run(j);
	workq_done_later(j);
}

/* workq_done_later - done() through the list the workers report on */
void workq_done_later(struct workq_job *j)
{
	pthread_mutex_lock(&workq_lock);
	workq_push(&workq_done_head, &workq_done_tail, j);
	pthread_mutex_unlock(&workq_lock);
	ev_async_send(workq_loop, &workq_async);
}

/* workq_shutdown - drain and join */
void workq_shutdown(void)
{
	pthread_mutex_lock(&workq_lock);
	workq_stopping = true;
	pthread_cond_broadcast(&workq_cond);
	pthread_mutex_unlock(&workq_lock);
	for (int i = 0; i < workq_nthreads; i++)
		pthread_join(workq_threads[i], NULL);
	workq_nthreads = 0;
	workq_async_cb(workq_loop, &workq_async, 0);
}
