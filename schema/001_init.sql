-- 001_init - users, their allowed senders and per-user limits.
-- Applied by relayd and relayctl inside one transaction; PRAGMA user_version tracks it.

CREATE TABLE users (
	name       TEXT PRIMARY KEY,
	hash       TEXT NOT NULL,               -- crypt(3) string, yescrypt "$y$..."
	created    INTEGER,                     -- unix time
	pw_changed INTEGER,                     -- unix time of the last password change
	disabled   INTEGER DEFAULT 0
);

-- Sender patterns a user may use in MAIL FROM: "user@example.org", "@example.org" or "*".
CREATE TABLE senders (
	user    TEXT REFERENCES users(name) ON DELETE CASCADE,
	pattern TEXT,
	PRIMARY KEY (user, pattern)
);

-- Per-user rate limit overrides: N per window seconds; NULL = the config default.
CREATE TABLE limits (
	user         TEXT PRIMARY KEY REFERENCES users(name) ON DELETE CASCADE,
	msgs         INTEGER,
	msgs_window  INTEGER,
	rcpts        INTEGER,
	rcpts_window INTEGER,
	bytes        INTEGER,
	bytes_window INTEGER
);
