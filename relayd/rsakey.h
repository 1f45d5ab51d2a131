/*
 * rsakey - RSA server keys signed through nettle's constant-time CRT root with cached
 * blinding, about 2.5 times faster than GnuTLS's own RSA path (see rsakey.c).
 */
#ifndef RELAYD_RSAKEY_H
#define RELAYD_RSAKEY_H

#include <gnutls/abstract.h>
#include <gnutls/x509.h>

/* the longest modulus rsakey takes, in 64-bit limbs (8192 bits); longer keys go through GnuTLS */
#define RSAKEY_MAX_LIMBS 128

/* how many signatures one blinding factor serves (squared after each) before a fresh one */
#define RSAKEY_BLIND_USES 32

/* an RSA key's numbers, big-endian, in the order of gnutls_x509_privkey_export_rsa_raw2 */
enum { RSAKEY_N, RSAKEY_E, RSAKEY_D, RSAKEY_P, RSAKEY_Q, RSAKEY_U, RSAKEY_E1, RSAKEY_E2, RSAKEY_NUMBERS };

/* rsakey_import_numbers - a gnutls_privkey_t that signs with the key v[] through rsakey (v is
 * copied); NULL when the numbers do not make a key or fail the self-test */
gnutls_privkey_t rsakey_import_numbers(const gnutls_datum_t v[RSAKEY_NUMBERS]);
/* rsakey_import - a gnutls_privkey_t that signs with x's RSA key through rsakey (x is
 * copied; the caller keeps it); NULL when x is not a plain RSA key or fails the self-test
 * (a signature that does not verify), and the caller should use GnuTLS's own path */
gnutls_privkey_t rsakey_import(gnutls_x509_privkey_t x);
/* rsakey_set_cert - load the chain in certfile and the key in keyfile into cred, the key
 * signing through rsakey: 0 when loaded; 1 when the key is not RSA or anything does not fit
 * (the chain does not parse, the key does not match it), so the caller loads the pair the
 * usual way and GnuTLS reports any problem in its own words; a GnuTLS error code (< 0) when
 * cred refused the pair */
int rsakey_set_cert(gnutls_certificate_credentials_t cred, const char *certfile, const char *keyfile);

#endif
