/*
 * smtp_server - the ESMTP submission session (RFC 5321, RFC 6409, RFC 3207, RFC 4954,
 * RFC 2920, RFC 1870, RFC 3030, RFC 3461, RFC 6531) on one accepted connection.
 */
#ifndef RELAYD_SMTP_SERVER_H
#define RELAYD_SMTP_SERVER_H

#include <ev.h>
#include <gnutls/gnutls.h>
#include <stdint.h>
#include <sys/socket.h>

#include "config.h"

/* smtp_server_init - remember the loop, the config and the TLS credentials */
void smtp_server_init(struct ev_loop *loop, const struct config *cfg, gnutls_certificate_credentials_t cred);
/* smtp_server_set_creds - new certificate for new sessions (reload); smtp_server owns the
 * credentials given here and to smtp_server_init, and frees a replaced set once no session
 * uses it */
void smtp_server_set_creds(gnutls_certificate_credentials_t cred);
/* smtp_server_free_creds - at exit, after the sessions: free every certificate set */
void smtp_server_free_creds(void);
/* smtp_server_accept - start a session on an accepted non-blocking socket */
void smtp_server_accept(int fd, const struct sockaddr *sa, socklen_t salen, enum listen_mode mode);
/* smtp_server_count - sessions alive now */
unsigned smtp_server_count(void);
/* smtp_server_drain - SIGTERM: idle sessions get 421 4.3.2, others when their transaction ends */
void smtp_server_drain(void);
/* smtp_server_shutdown - close every session now, after a 421 4.3.2 (RFC 5321 §3.8) */
void smtp_server_shutdown(void);

#endif
