/*
 * tls - GnuTLS global set-up and certificate credentials for the server and the client.
 * Sessions themselves live in conn.c.
 */
#ifndef RELAYD_TLS_H
#define RELAYD_TLS_H

#include <gnutls/gnutls.h>
#include <limits.h>
#include <stdbool.h>

/* the priority string for every session: TLS 1.2 or newer; no static-RSA key transport in
 * TLS 1.2 (no forward secrecy; RFC 9325 4.1: SHOULD NOT), only (EC)DHE; X25519 first among
 * the key exchange groups (as OpenSSL, NSS and Postfix have it: a client offering it gets it,
 * and it costs less than P-256 on both sides), then GnuTLS's NORMAL order */
#define TLS_PRIORITY \
	"NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2:-RSA:-GROUP-ALL:+GROUP-X25519:+GROUP-SECP256R1:" \
	"+GROUP-SECP384R1:+GROUP-SECP521R1:+GROUP-X448:+GROUP-FFDHE2048:+GROUP-FFDHE3072:" \
	"+GROUP-FFDHE4096:+GROUP-FFDHE6144:+GROUP-FFDHE8192:%SERVER_PRECEDENCE"

/* tls_global_init - gnutls_global_init once, the parsed priority cache and the session
 * ticket key (RFC 5077 / TLS 1.3 resumption: a returning client skips the signature) */
int tls_global_init(void);
/* tls_global_deinit - free the priority cache and ticket key, gnutls_global_deinit */
void tls_global_deinit(void);
/* tls_priority - the priority cache every session uses (parsed once: saves CPU and ~8 KB
 * per session compared with gnutls_priority_set_direct) */
gnutls_priority_t tls_priority(void);
/* tls_ticket_key - the server's session ticket key (NULL if tickets are off) */
const gnutls_datum_t *tls_ticket_key(void);
/* tls_server_creds - load n certificate chains with their keys (GnuTLS picks, per client,
 * one its signature algorithms allow: ECDSA for most, RSA for old clients); an RSA key signs
 * through rsakey (rsakey.h), others through GnuTLS; logs which; NULL with err */
gnutls_certificate_credentials_t tls_server_creds(const char (*certs)[PATH_MAX], const char (*keys)[PATH_MAX], int n,
						  char *err, size_t errlen);
/* tls_creds_slow_sign - does a key of cred sign slowly (RSA, DSA, or a kind we cannot tell,
 * such as an rsakey one: 0.6 ms or more per handshake, too long for the loop)? EC keys sign
 * in tens of µs */
bool tls_creds_slow_sign(gnutls_certificate_credentials_t cred);
/* tls_client_creds - trust the CA file, or the system trust store when ca is NULL or "" */
gnutls_certificate_credentials_t tls_client_creds(const char *ca, char *err, size_t errlen);

#endif
