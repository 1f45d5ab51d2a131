/*
 * schema_sql - the SQL migrations from schema/NNN_name.sql, embedded at build time by
 * tools/embed-schema.sh into schema_sql.c. Ordered by strictly increasing version;
 * version N is applied on a database whose PRAGMA user_version is below N.
 */
#ifndef RELAYD_SCHEMA_SQL_H
#define RELAYD_SCHEMA_SQL_H

struct schema_migration {
	int version;       /* leading number of the file name */
	const char *name;  /* file name, e.g. "001_init.sql" */
	const char *sql;   /* the file's text (no BEGIN/COMMIT) */
};

extern const struct schema_migration schema_migrations[];
extern const int schema_migrations_count;

#endif
