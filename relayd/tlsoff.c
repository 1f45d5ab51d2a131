/*
 * tlsoff - TLS handshake threads (see tlsoff.h).
 * Each thread runs its own libev loop. Lists handed between threads are protected by one
 * mutex; a connection is in at most one list at a time (off_next) plus, once, the cancel
 * list (off_cancel_next). States: queued (in an inbox) -> active (watched by a thread) ->
 * done (in the main outbox). A cancel for a connection already done is ignored: the main
 * loop sees off_cancel when it comes back.
 */
#include "tlsoff.h"

#include <ev.h>
#include <pthread.h>
#include <stdlib.h>

#include "conn.h"

enum { OFF_QUEUED = 1, OFF_ACTIVE, OFF_DONE };

struct tlsoff_thread {
	pthread_t th;
	struct ev_loop *loop;
	ev_async wake;
	struct conn *inbox;
	struct conn *cancels;
	bool stop;
};

static pthread_mutex_t tlsoff_lock = PTHREAD_MUTEX_INITIALIZER;
static struct tlsoff_thread tlsoff_threads[TLSOFF_MAX_THREADS];
static int tlsoff_nthreads;
static unsigned tlsoff_next;
static struct ev_loop *tlsoff_main;
static ev_async tlsoff_back;
static struct conn *tlsoff_outbox;

/* hand a finished (or cancelled) connection back to the main loop */
static void tlsoff_return(struct tlsoff_thread *t, struct conn *c, int rc)
{
	ev_io_stop(t->loop, &c->off_io);
	pthread_mutex_lock(&tlsoff_lock);
	c->off_rc = rc;
	c->off_state = OFF_DONE;
	c->off_next = tlsoff_outbox;
	tlsoff_outbox = c;
	pthread_mutex_unlock(&tlsoff_lock);
	ev_async_send(tlsoff_main, &tlsoff_back);
}

static void tlsoff_step(struct tlsoff_thread *t, struct conn *c)
{
	int rc = gnutls_handshake(c->tls);
	if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) {
		int events = gnutls_record_get_direction(c->tls) ? EV_WRITE : EV_READ;
		if (!ev_is_active(&c->off_io) || (c->off_io.events & (EV_READ | EV_WRITE)) != events) {
			ev_io_stop(t->loop, &c->off_io);
			ev_io_set(&c->off_io, c->fd, events);
			ev_io_start(t->loop, &c->off_io);
		}
		return;
	}
	tlsoff_return(t, c, rc);
}

static void tlsoff_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
	struct conn *c = w->data;
	(void)loop; (void)revents;
	tlsoff_step(c->off_thread, c);
}

static void tlsoff_wake_cb(struct ev_loop *loop, ev_async *w, int revents)
{
	struct tlsoff_thread *t = w->data;
	(void)revents;
	pthread_mutex_lock(&tlsoff_lock);
	struct conn *in = t->inbox, *cancels = t->cancels;
	t->inbox = t->cancels = NULL;
	bool stop = t->stop;
	for (struct conn *c = in; c; c = c->off_next)
		c->off_state = OFF_ACTIVE;
	pthread_mutex_unlock(&tlsoff_lock);
	if (stop) {
		ev_break(loop, EVBREAK_ALL);
		return;
	}
	while (in) {
		struct conn *c = in;
		in = c->off_next;
		c->off_thread = t;
		ev_io_init(&c->off_io, tlsoff_io_cb, c->fd, EV_READ);
		c->off_io.data = c;
		tlsoff_step(t, c);
	}
	while (cancels) {
		struct conn *c = cancels;
		cancels = c->off_cancel_next;
		pthread_mutex_lock(&tlsoff_lock);
		bool active = c->off_state == OFF_ACTIVE;
		pthread_mutex_unlock(&tlsoff_lock);
		if (active)
			tlsoff_return(t, c, GNUTLS_E_INTERRUPTED);
	}
}

static void *tlsoff_main_fn(void *arg)
{
	struct tlsoff_thread *t = arg;
	ev_run(t->loop, 0);
	return NULL;
}

/* results on the main loop */
static void tlsoff_back_cb(struct ev_loop *loop, ev_async *w, int revents)
{
	(void)loop; (void)w; (void)revents;
	pthread_mutex_lock(&tlsoff_lock);
	struct conn *c = tlsoff_outbox;
	tlsoff_outbox = NULL;
	pthread_mutex_unlock(&tlsoff_lock);
	while (c) {
		struct conn *next = c->off_next;
		conn_offload_done(c, c->off_rc);
		c = next;
	}
}

/* tlsoff_init - the threads */
int tlsoff_init(struct ev_loop *main_loop, int nthreads)
{
	tlsoff_main = main_loop;
	if (nthreads > TLSOFF_MAX_THREADS)
		nthreads = TLSOFF_MAX_THREADS;
	if (nthreads <= 0)
		return 0;
	ev_async_init(&tlsoff_back, tlsoff_back_cb);
	ev_async_start(main_loop, &tlsoff_back);
	ev_unref(main_loop);
	for (int i = 0; i < nthreads; i++) {
		struct tlsoff_thread *t = &tlsoff_threads[i];
		t->loop = ev_loop_new(EVFLAG_AUTO);
		if (!t->loop)
			return -1;
		ev_async_init(&t->wake, tlsoff_wake_cb);
		t->wake.data = t;
		ev_async_start(t->loop, &t->wake);
		if (pthread_create(&t->th, NULL, tlsoff_main_fn, t) != 0)
			return -1;
		tlsoff_nthreads++;
	}
	return 0;
}

/* tlsoff_enabled - handshakes go to threads */
bool tlsoff_enabled(void)
{
	return tlsoff_nthreads > 0;
}

/* tlsoff_submit - queue c on the next thread */
void tlsoff_submit(struct conn *c)
{
	struct tlsoff_thread *t = &tlsoff_threads[tlsoff_next++ % (unsigned)tlsoff_nthreads];
	pthread_mutex_lock(&tlsoff_lock);
	c->off_state = OFF_QUEUED;
	c->off_next = t->inbox;
	t->inbox = c;
	c->off_thread = t;
	pthread_mutex_unlock(&tlsoff_lock);
	ev_async_send(t->loop, &t->wake);
}

/* tlsoff_cancel - ask c's thread to give it back now */
void tlsoff_cancel(struct conn *c)
{
	struct tlsoff_thread *t = c->off_thread;
	pthread_mutex_lock(&tlsoff_lock);
	bool send = !c->off_cancel && c->off_state != OFF_DONE;
	if (!c->off_cancel) {
		c->off_cancel = true;
		if (send) {
			c->off_cancel_next = t->cancels;
			t->cancels = c;
		}
	}
	pthread_mutex_unlock(&tlsoff_lock);
	if (send)
		ev_async_send(t->loop, &t->wake);
}

/* tlsoff_shutdown - stop and join */
void tlsoff_shutdown(void)
{
	for (int i = 0; i < tlsoff_nthreads; i++) {
		struct tlsoff_thread *t = &tlsoff_threads[i];
		pthread_mutex_lock(&tlsoff_lock);
		t->stop = true;
		pthread_mutex_unlock(&tlsoff_lock);
		ev_async_send(t->loop, &t->wake);
		pthread_join(t->th, NULL);
		ev_loop_destroy(t->loop);
	}
	tlsoff_nthreads = 0;
}
