/*
 * fuzz_config - libFuzzer target for relayd/config.c: the input is written to a temporary
 * relayd.conf and loaded with config_load(). Invariants: it returns 0 or -1; on -1 the
 * error is a non-empty NUL-terminated "FILE:LINE: ..." string naming the file; on 0 the
 * counts of listen and upstream lines are within their arrays.
 */
#include <assert.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"

static char conf_path[64];

static void cleanup(void)
{
	if (conf_path[0])
		unlink(conf_path);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (!conf_path[0]) {
		snprintf(conf_path, sizeof(conf_path), "/tmp/relayd-fuzz-config.XXXXXX");
		int fd = mkstemp(conf_path);
		assert(fd >= 0);
		close(fd);
		atexit(cleanup);
	}
	FILE *f = fopen(conf_path, "w");
	assert(f);
	if (size)
		assert(fwrite(data, 1, size, f) == size);
	assert(fclose(f) == 0);

	static struct config c; /* large (many PATH_MAX fields): not on the stack */
	char err[1024];
	memset(err, 0x55, sizeof(err));
	int rc = config_load(conf_path, &c, err, sizeof(err));
	assert(rc == 0 || rc == -1);
	if (rc < 0) {
		assert(memchr(err, '\0', sizeof(err)) != NULL);
		assert(strncmp(err, conf_path, strlen(conf_path)) == 0);
	} else {
		assert(c.nlisten >= 0 && c.nlisten <= CONFIG_MAX_LISTEN);
		assert(c.nupstream >= 0 && c.nupstream <= CONFIG_MAX_UPSTREAM);
		assert(memchr(c.hostname, '\0', sizeof(c.hostname)) != NULL);
		(void)config_listen_mode_str(c.nlisten ? c.listen[0].mode : LISTEN_PLAIN);
	}
	/* the two value parsers on the raw input too */
	char v[256];
	size_t n = size < sizeof(v) - 1 ? size : sizeof(v) - 1;
	memcpy(v, data, n);
	v[n] = '\0';
	(void)config_parse_size(v);
	(void)config_parse_duration(v);
	return 0;
}
