/*
 * tls - GnuTLS global state and certificate credentials.
 * Server credentials carry the chain and key (reloadable: a new credentials object is made,
 * sessions in progress keep the old one). Client credentials carry the trust anchors used
 * to verify the upstream (RFC 8314 / RFC 7817 host name checks are done by GnuTLS through
 * gnutls_session_set_verify_cert in conn.c).
 */
#include "tls.h"

#include "log.h"
#include "rsakey.h"

#include <gnutls/x509.h>
#include <stdio.h>

static gnutls_priority_t tls_prio;
static gnutls_datum_t tls_ticket;

/* tls_global_init - initialise GnuTLS once */
int tls_global_init(void)
{
	if (gnutls_global_init() < 0 || gnutls_priority_init(&tls_prio, TLS_PRIORITY, NULL) < 0)
		return -1;
	if (gnutls_session_ticket_key_generate(&tls_ticket) < 0)
		tls_ticket.data = NULL;
	return 0;
}

/* tls_global_deinit - release what tls_global_init made */
void tls_global_deinit(void)
{
	if (tls_prio)
		gnutls_priority_deinit(tls_prio);
	tls_prio = NULL;
	if (tls_ticket.data) {
		gnutls_memset(tls_ticket.data, 0, tls_ticket.size);
		gnutls_free(tls_ticket.data);
	}
	tls_ticket.data = NULL;
	gnutls_global_deinit();
}

/* tls_priority - the shared priority cache */
gnutls_priority_t tls_priority(void)
{
	return tls_prio;
}

/* tls_ticket_key - the session ticket key */
const gnutls_datum_t *tls_ticket_key(void)
{
	return tls_ticket.data ? &tls_ticket : NULL;
}

/* tls_server_pair - add one certificate chain and its key to cred: an RSA key through rsakey
 * (faster, same defences), any other through GnuTLS; logs which signs */
static int tls_server_pair(gnutls_certificate_credentials_t cred, const char *cert, const char *key, char *err,
			   size_t errlen)
{
	int rc = rsakey_set_cert(cred, cert, key);
	const char *signer = rc == 0 ? "rsakey" : "gnutls";
	if (rc == 1)
		rc = gnutls_certificate_set_x509_key_file2(cred, cert, key, GNUTLS_X509_FMT_PEM, NULL, 0);
	if (rc < 0) {
		err_set(err, errlen, "cannot load certificate %s / key %s: %s", cert, key, gnutls_strerror(rc));
		return -1;
	}
	char vc[LOG_VALUE_SIZE(PATH_MAX)], vk[LOG_VALUE_SIZE(PATH_MAX)];
	log_info("tls event=certificate cert=\"%s\" key=\"%s\" signer=%s", log_value(cert, vc, sizeof(vc)),
		 log_value(key, vk, sizeof(vk)), signer);
	return 0;
}

/* tls_server_creds - load certificate chains and their keys */
gnutls_certificate_credentials_t tls_server_creds(const char (*certs)[PATH_MAX], const char (*keys)[PATH_MAX], int n,
						  char *err, size_t errlen)
{
	gnutls_certificate_credentials_t cred;
	int rc = gnutls_certificate_allocate_credentials(&cred);
	if (rc < 0) {
		err_set(err, errlen, "gnutls: %s", gnutls_strerror(rc));
		return NULL;
	}
	for (int i = 0; i < n; i++) {
		if (tls_server_pair(cred, certs[i], keys[i], err, errlen) < 0) {
			gnutls_certificate_free_credentials(cred);
			return NULL;
		}
	}
	return cred;
}

/* tls_creds_slow_sign - any RSA or DSA key (or one that is not an X.509 key) among cred's */
bool tls_creds_slow_sign(gnutls_certificate_credentials_t cred)
{
	for (unsigned i = 0;; i++) {
		gnutls_x509_privkey_t key;
		int rc = gnutls_certificate_get_x509_key(cred, i, &key);
		if (rc == GNUTLS_E_REQUESTED_DATA_NOT_AVAILABLE)
			return false;
		if (rc < 0)
			return true;
		int alg = gnutls_x509_privkey_get_pk_algorithm2(key, NULL);
		gnutls_x509_privkey_deinit(key);
		if (alg != GNUTLS_PK_ECDSA && alg != GNUTLS_PK_EDDSA_ED25519 && alg != GNUTLS_PK_EDDSA_ED448)
			return true;
	}
}

/* tls_client_creds - trust anchors for verifying an upstream */
gnutls_certificate_credentials_t tls_client_creds(const char *ca, char *err, size_t errlen)
{
	gnutls_certificate_credentials_t cred;
	int rc = gnutls_certificate_allocate_credentials(&cred);
	if (rc < 0) {
		snprintf(err, errlen, "gnutls: %s", gnutls_strerror(rc));
		return NULL;
	}
	if (ca && ca[0])
		rc = gnutls_certificate_set_x509_trust_file(cred, ca, GNUTLS_X509_FMT_PEM);
	else
		rc = gnutls_certificate_set_x509_system_trust(cred);
	if (rc <= 0) {
		snprintf(err, errlen, "cannot load trust anchors from %s: %s", ca && ca[0] ? ca : "the system store",
			 rc == 0 ? "no certificates found" : gnutls_strerror(rc));
		gnutls_certificate_free_credentials(cred);
		return NULL;
	}
	return cred;
}
