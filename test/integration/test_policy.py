"""test_policy - issue 4: per-user limits, header From: check, per-IP limits, brute-force
lockout and its expiry, the verified-credential cache, counts surviving a restart, and the
per-IP memory forgetting addresses that failed AUTH and never came back, and the open-files
limit raised for max_sessions.

Real relayd, real TLS, real SQLite; the clients are Raw sessions and smtplib.
"""
import os
import re
import sys
import subprocess
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import relaytest as t  # noqa: E402

USER = "alice@example.org"
PW = "correct horse"


def send(relay, user=USER, pw=None, frm=USER, rcpts=("bob@example.net",), body=b"Hello.\r\n", msg=None):
    """one transaction on a fresh session; returns (stage, code, text) of the first non-2xx/3xx
    reply, or ("done", 250, text)"""
    c = relay.session(user, pw)
    try:
        code, text = c.cmd(f"MAIL FROM:<{frm}>")
        if code != 250:
            return "mail", code, text
        for r in rcpts:
            code, text = c.cmd(f"RCPT TO:<{r}>")
            if code != 250:
                return "rcpt", code, text
        code, text = c.cmd("DATA")
        if code != 354:
            return "data", code, text
        data = msg if msg is not None else t.make_message(frm, rcpts[0], body=body.decode())
        c.send(t.dot_stuff(data))
        code, text = c.reply()
        return ("done" if code == 250 else "dot"), code, text
    finally:
        c.close()


# --- message limit, wait time in the reply, persistence across restart ---------------------
relay = t.Relay(extra_config="limit_msgs 3/hour\nlimit_rcpts 5/hour\n")
relay.add_user(USER, PW)
relay.add_user("bob@example.org", "bobpw", senders=["@example.net"])
relay.start()


@t.test("message limit: 3/hour lets three through and refuses the fourth at MAIL with 450 4.7.1")
def _():
    for i in range(3):
        stage, code, text = send(relay)
        t.is_(code, 250, f"message {i + 1} accepted")
    stage, code, text = send(relay)
    t.is_((stage, code), ("mail", 450), "fourth refused at MAIL")
    t.like(text, r"^450 4\.7\.1 .*try again in \d+ seconds", "enhanced code and the wait in the text")
    m = re.search(r"try again in (\d+) seconds", text)
    t.ok(m and 3000 < int(m.group(1)) <= 3600, "the wait is about an hour for an hourly limit", text)


@t.test("limits are per user: another user is not affected")
def _():
    stage, code, text = send(relay, user="bob@example.org", frm="bob@example.net")
    t.is_(code, 250, "bob still sends")


@t.test("usage survives a restart (no budget refill)")
def _():
    relay.restart()
    stage, code, text = send(relay)
    t.is_((stage, code), ("mail", 450), "still limited after restart")
    t.like(relay.log(), r"event=usage-replayed entries=[1-9]", "usage journal replayed")


@t.test("a rotated journal (usage.log.1) is replayed too")
def _():
    relay.stop()
    j = os.path.join(relay.queue_dir, "usage.log")
    os.rename(j, j + ".1")
    relay.start()
    stage, code, text = send(relay)
    t.is_((stage, code), ("mail", 450), "still limited with the usage in usage.log.1")
    t.ok(not os.path.exists(j + ".1"), "merged into one usage.log at start")


@t.test("kill -9 does not refill the budget either")
def _():
    relay.kill9()
    relay.start()
    stage, code, text = send(relay)
    t.is_((stage, code), ("mail", 450), "still limited after kill -9")


@t.test("recipient limit: 5/hour refuses the sixth RCPT with 450 4.7.1")
def _():
    stage, code, text = send(relay, user="bob@example.org", frm="bob@example.net",
                             rcpts=[f"r{i}@example.com" for i in range(4)])
    t.is_(code, 250, "four recipients accepted")
    stage, code, text = send(relay, user="bob@example.org", frm="bob@example.net",
                             rcpts=["x@example.com", "y@example.com"])
    t.is_((stage, code), ("rcpt", 450), "sixth recipient refused at RCPT")
    t.like(text, r"^450 4\.7\.1 Limit of 5/hour recipients", "names the recipient limit")

relay.stop()

# --- bytes limit, header From:, sliding window reset ---------------------------------------
relay2 = t.Relay(extra_config="limit_bytes 3k/hour\nlimit_msgs 2/minute\n")
relay2.add_user(USER, PW)
relay2.start()


@t.test("From: header must be an allowed sender: 553 5.7.1")
def _():
    msg = t.make_message("someone@else.org", "bob@example.net")
    stage, code, text = send(relay2, msg=msg)
    t.is_((stage, code), ("dot", 553), "foreign From: refused after the final dot")
    t.like(text, r"^553 5\.7\.1 From: header address <someone@else\.org>", "names the address")
    msg = b"From: \"Alice\" <alice@example.org>\r\nTo: b@example.net\r\nSubject: ok\r\n\r\nHi\r\n"
    stage, code, text = send(relay2, msg=msg)
    t.is_(code, 250, "own address with a display name accepted")


# each way around the From: check that an audit found: all refused after the final dot (a
# refused message is not counted, so they do not use relay2's budget)
FROM_BYPASSES = [
    ("a second From: header", b"From: <alice@example.org>\r\nFROM: <ceo@bank.example>\r\n",
     r"^550 5\.6\.0 Message has more than one From: header"),
    ("obsolete 'From :' (RFC 5322 4.5.2)", b"From : <ceo@bank.example>\r\n",
     r"^553 5\.7\.1 From: header address <ceo@bank\.example>"),
    ("a 33rd mailbox", b"From:" + b"".join(b" <alice@example.org>,\r\n" for _ in range(32))
     + b" <ceo@bank.example>\r\n", r"^550 5\.6\.0 From: header has more than 32 addresses"),
    ("a 9th mailbox (the old cap)", b"From:" + b"".join(b" <alice@example.org>,\r\n" for _ in range(8))
     + b" <ceo@bank.example>\r\n", r"^553 5\.7\.1 From: header address <ceo@bank\.example>"),
    ("an address after 4.5 kB of folded comment", b"From: <alice@example.org>\r\n"
     + b"".join(b" (" + b"x" * 900 + b")\r\n" for _ in range(5)) + b" , <ceo@bank.example>\r\n",
     r"^553 5\.7\.1 From: header address <ceo@bank\.example>"),
]
for label, head, want in FROM_BYPASSES:
    @t.test(f"From: check: {label} is refused")
    def _(head=head, want=want, label=label):
        stage, code, text = send(relay2, msg=head + b"To: <bob@example.net>\r\nSubject: t\r\n\r\nbody\r\n")
        t.is_(stage, "dot", f"{label}: refused after the final dot")
        t.like(text, want, f"{label}: the reply says why")


@t.test("bytes limit: 3k/hour defers a message that would pass it, refuses for good one larger than it")
def _():
    c = relay2.session(USER, PW)
    code, text = c.cmd(f"MAIL FROM:<{USER}> SIZE=3000")  # fits 3k alone, not with what was sent above
    t.is_(code, 450, "SIZE=3000 on top of this hour's bytes: 450 at MAIL (try later)")
    t.like(text, r"^450 4\.7\.1 Limit of 3072/hour bytes .*try again in \d+ seconds", "names the bytes limit and the wait")
    code, text = c.cmd(f"MAIL FROM:<{USER}> SIZE=4000")
    t.is_(code, 552, "SIZE=4000, more than the whole limit: 552 at MAIL (RFC 1870), not a retry that cannot succeed")
    t.like(text, r"^552 5\.3\.4 A message of 4000 bytes is larger than the limit of 3072/hour bytes", "says why")
    c.close()
    big = b"x" * 70 + b"\r\n"
    stage, code, text = send(relay2, body=big * 60)  # ~4.3 kB, no SIZE=
    t.is_((stage, code), ("dot", 552), "4.3 kB without SIZE=: refused for good at the end of DATA")
    t.like(text, r"^552 5\.3\.4 .*larger than the limit of 3072/hour bytes", "names the bytes limit")


@t.test("sliding window: the minute limit frees up after the window, not before")
def _():
    # one message went through above (From: test) in this minute window, one more fits
    stage, code, text = send(relay2)
    t.is_(code, 250, "second message of the minute accepted")
    stage, code, text = send(relay2)
    t.is_((stage, code), ("mail", 450), "third refused")
    wait = int(re.search(r"try again in (\d+) seconds", text).group(1))
    t.ok(0 < wait <= 60, f"wait {wait}s within a minute")
    time.sleep(wait + 1.5)
    stage, code, text = send(relay2)
    t.is_(code, 250, "accepted again once the window moved on")

@t.test("relayctl user limit applies at the next session, without a restart")
def _():
    relay2.add_user("carol@example.org", "carolpw")
    rc, out = relay2.relayctl("user", "limit", "carol@example.org", "msgs=1/hour")
    t.is_(rc, 0, "relayctl user limit exit 0")
    stage, code, text = send(relay2, user="carol@example.org", frm="carol@example.org")
    t.is_(code, 250, "first message accepted")
    stage, code, text = send(relay2, user="carol@example.org", frm="carol@example.org")
    t.is_((stage, code), ("mail", 450), "second refused by the per-user override")
    t.like(text, r"Limit of 1/hour messages", "the override's value is in the reply")
    relay2.relayctl("user", "limit", "carol@example.org", "msgs=100/hour")
    stage, code, text = send(relay2, user="carol@example.org", frm="carol@example.org")
    t.is_(code, 250, "raised again with relayctl: accepted at once")

relay2.stop()

# --- check_header_from no --------------------------------------------------------------------
relay3 = t.Relay(extra_config="check_header_from no\nlimit_loopback yes\nmax_conn_per_ip 2\n"
                 "auth_fail_limit 3\nauth_lockout 10s\nauth_cache_ttl 300\n")
relay3.add_user(USER, PW)
relay3.start()


@t.test("check_header_from no lets a foreign From: through (MAIL FROM is still checked)")
def _():
    time.sleep(0.5)  # the harness's port probes must be closed first (max_conn_per_ip 2)
    stage, code, text = send(relay3, msg=t.make_message("someone@else.org", "bob@example.net"))
    t.is_(code, 250, "accepted")
    stage, code, text = send(relay3, frm="someone@else.org")
    t.is_((stage, code), ("mail", 553), "envelope sender still enforced")


@t.test("per-IP concurrent connections: the third gets 421 4.7.0")
def _():
    time.sleep(0.5)  # let relayd see the earlier sessions close
    a = relay3.raw()
    b = relay3.raw()
    t.like(a.reply_text(), r"^220 ", "first greeted")
    t.like(b.reply_text(), r"^220 ", "second greeted")
    c = relay3.raw()
    t.like(c.reply_text(), r"^421 4\.7\.0 ", "third refused")
    t.ok(c.eof(), "and closed")
    for x in (a, b, c):
        x.close()
    time.sleep(0.3)
    d = relay3.raw()
    t.like(d.reply_text(), r"^220 ", "accepted again once the others closed")
    d.close()


@t.test("credential cache: a changed password stops the cached one at once")
def _():
    c = relay3.session(USER)
    c.close()
    before = relay3.stat("auth_cached")
    t0 = time.monotonic()
    c = relay3.session(USER)
    cached = time.monotonic() - t0
    c.close()
    t.ok(cached < 1.0, f"second AUTH completes ({cached:.3f}s)")
    t.is_(relay3.stat("auth_cached"), before + 1 if before is not None else None,
          "answered by the credential cache (relayctl stats auth_cached)")
    for pw, want in (("wrong", 535), (PW, 235)):  # a wrong password after a cached success
        c = relay3.raw()
        c.reply(); c.ehlo(); c.cmd("STARTTLS"); c.starttls(); c.ehlo()
        code, text = c.auth_plain(USER, pw)
        t.is_(code, want, f"then AUTH PLAIN with {'a wrong' if pw == 'wrong' else 'the right'} password: {want}")
        c.close()
    t.is_(relay3.stat("auth_cached"), before + 2 if before is not None else None,
          "the wrong password was not a cache hit, the right one was")
    relay3.relayctl("user", "passwd", USER, input=b"new password\n")
    c = relay3.raw()
    c.reply(); c.ehlo(); c.cmd("STARTTLS"); c.starttls(); c.ehlo()
    code, text = c.auth_plain(USER, PW)
    t.is_(code, 535, "old (cached) password refused right after relayctl user passwd")
    c.close()
    relay3.users[USER] = "new password"
    c = relay3.session(USER)
    t.ok(True, "new password accepted")
    c.close()


@t.test("brute force: lockout after 3 failures, 454 even with the right password, then expiry")
def _():
    for i in range(3):
        c = relay3.raw()
        c.reply(); c.ehlo(); c.cmd("STARTTLS"); c.starttls(); c.ehlo()
        t0 = time.monotonic()
        code, text = c.auth_plain(USER, "wrong")
        took = time.monotonic() - t0
        t.is_(code, 535, f"failure {i + 1}: 535")
        lock_start = t0
        t.ok(took >= 0.9 * (2 ** i) if i < 3 else True, f"failure {i + 1} answered after a growing delay ({took:.2f}s)")
        c.close()
    c = relay3.raw()
    code, text = c.reply()
    t.like(text, r"^421 4\.7\.0 ", "a new connection from the locked IP gets 421 4.7.0")
    c.close()
    try:
        c = relay3.raw(port=relay3.port_tls, tls=True)
        code, text = c.reply()
        t.is_(code, None, "the implicit-TLS port closes without a reply")
        c.close()
    except (OSError, ConnectionError) as e:
        t.ok(True, f"the implicit-TLS port closes the connection ({type(e).__name__})")
    t.like(relay3.log(), r"event=auth-lockout ip=127\.0\.0\.1", "lockout logged for fail2ban")
    time.sleep(max(0.0, lock_start + 10.5 - time.monotonic()))
    c = relay3.session(USER)
    t.ok(True, "AUTH works again after the lockout period")
    c.close()

relay3.stop()


# --- what the per-IP and AUTH rules remember goes when it no longer matters -----------------
relay4 = t.Relay(extra_config="limit_loopback yes\nauth_fail_limit 3\nauth_lockout 8s\nmax_conn_rate_per_ip 0\n")
relay4.add_user(USER, PW)
relay4.start()


def fail_auth(source, codes, n):
    c = relay4.raw(source=source)
    try:
        c.reply(); c.ehlo(); c.cmd("STARTTLS"); c.starttls(); c.ehlo()
        # a name each: unknown names are counted too, and one name would be locked out
        codes.append(c.auth_plain(f"nobody{n}@example.org", "wrong")[0])
    finally:
        c.close()


@t.test("forgotten in time: IPs that failed AUTH and never came back, and a lockout once it ended")
def _():
    import threading
    codes = []
    once = [f"127.0.1.{i}" for i in range(1, 11)]
    locked = "127.0.2.1"
    threads = [threading.Thread(target=fail_auth, args=(ip, codes, n)) for n, ip in enumerate(once + [locked] * 3)]
    begin = time.monotonic()  # no failure, and so no lockout, is older than this
    for th in threads:
        th.start()
    for th in threads:
        th.join()  # the third failure from one address is answered after 4 s
    t.is_(codes, [535] * 13, "13 failures from 11 addresses, each 535")
    t.ok(relay4.stat("policy_tracked") >= 11, "each address remembered while its failure is recent")
    c = relay4.raw(source=locked)
    t.like(c.reply_text(), r"^421 4\.7\.0 ", "the locked address is refused during its lockout")
    c.close()
    t.ok(t.wait_for(lambda: relay4.stat("policy_tracked") == 0, 20 * t.SLOW),
         "after the lockout (8 s) every entry is gone, though none of the 10 addresses came back",
         relay4.stat("policy_tracked"))
    t.ok(time.monotonic() - begin >= 7.9, "not before the failures were 8 s old")
    c = relay4.raw(source=locked)
    t.like(c.reply_text(), r"^220 ", "the formerly locked address is served again")
    c.close()


relay4.stop()


# --- a locked-out name answers the same whatever the password, and whether or not it exists -
def auth_timed(relay, user, pw, mech="PLAIN", source=None):
    """(code, text, seconds) of one AUTH on a fresh session"""
    c = relay.raw(source=source)
    try:
        c.reply(); c.ehlo(); c.cmd("STARTTLS"); c.starttls(); c.ehlo()
        t0 = time.monotonic()
        code, text = c.auth_plain(user, pw) if mech == "PLAIN" else c.auth_login(user, pw)
        return code, text, time.monotonic() - t0
    finally:
        c.close()


OTHER = "dave@example.org"
LOCKED = r"^454 4\.7\.0 Too many authentication failures"
relay5 = t.Relay(extra_config="auth_fail_limit 3\nauth_lockout 60s\nauth_cache_ttl 300\n")
relay5.add_user(USER, PW)
relay5.start()


@t.test("per-name lockout: 454 for the right and wrong passwords alike, for unknown names too")
def _():
    t.is_(auth_timed(relay5, USER, PW)[0], 235, "the user logs in (the credential cache is filled)")
    before = relay5.stat("auth_cached")
    t.is_(auth_timed(relay5, USER, PW)[0], 235, "and again, from the cache")
    t.is_(relay5.stat("auth_cached"), before + 1 if before is not None else None, "a cache hit")
    for i in range(3):  # loopback is exempt from the per-IP rules: only the name's count runs
        t.is_(auth_timed(relay5, USER, f"guess{i}")[0], 535, f"wrong password {i + 1}: 535")
    t.like(relay5.log(), r"event=auth-lockout user=alice@example\.org ", "the name is locked out")
    wrong = [auth_timed(relay5, USER, f"guess{i}") for i in range(3, 6)]
    right = [auth_timed(relay5, USER, PW, mech) for mech in ("PLAIN", "LOGIN")]
    for (code, text, _), what in zip(wrong + right, ["a wrong password"] * 3 + ["the right password (PLAIN)",
                                                                             "the right password (LOGIN)"]):
        t.like(text, LOCKED, f"locked out, {what}: 454 4.7.0")
    t.is_(len({text for _, text, _ in wrong + right}), 1, "the same reply text for all of them")
    fastest_wrong = min(dt for _, _, dt in wrong)
    t.ok(right[0][2] >= 0.5 * fastest_wrong,
         f"the right (cached) password costs the slow hash like a wrong one, no cache hit "
         f"({right[0][2] * 1000:.0f} ms, wrong: {fastest_wrong * 1000:.0f} ms)")
    t.is_(relay5.stat("auth_success"), 2, "no AUTH succeeded during the lockout")

    ghost = "ghost@example.org"
    for i in range(3):
        t.is_(auth_timed(relay5, ghost, f"guess{i}")[0], 535, f"unknown name, failure {i + 1}: 535")
    t.like(relay5.log(), r"event=auth-lockout user=ghost@example\.org ", "an unknown name is locked out too")
    code, text, _ = auth_timed(relay5, ghost, "guess3")
    t.is_(text, wrong[0][1], "and then gets the very reply an existing locked name gets")
    t.is_(auth_timed(relay5, "other@example.org", "guess")[0], 535, "a name never tried is not locked: 535")


relay5.stop()

relay6 = t.Relay(extra_config="limit_loopback yes\nauth_fail_limit 3\nauth_lockout 60s\nmax_conn_rate_per_ip 0\n")
relay6.add_user(USER, PW)
relay6.add_user(OTHER, PW)  # the next test locks USER's name out
relay6.start()


@t.test("per-name lockout against guesses from many addresses: the same 454 after the same delay")
def _():
    for i in range(3):  # one guess per address: no address is locked, the name is
        code, text, dt = auth_timed(relay6, USER, f"guess{i}", source=f"127.0.3.{i + 1}")
        t.is_(code, 535, f"guess {i + 1} from 127.0.3.{i + 1}: 535 after {dt:.2f} s")
    for pw, src in (("guess3", "127.0.3.10"), (PW, "127.0.3.11")):
        code, text, dt = auth_timed(relay6, USER, pw, source=src)
        what = "the right" if pw == PW else "a wrong"
        t.like(text, LOCKED, f"from a new address, {what} password: 454 4.7.0")
        t.ok(dt >= 0.9, f"... after the failure delay of 1 s ({dt:.2f} s)")


@t.test("a success takes back only that name's failures from the IP's count")
def _():
    typo = "127.0.4.1"
    for i in range(3):  # a typo then the right password, three times: never locked
        t.is_(auth_timed(relay6, OTHER, f"typo{i}", source=typo)[0], 535, f"typo {i + 1}: 535")
        t.is_(auth_timed(relay6, OTHER, PW, source=typo)[0], 235, "then the right password: 235")
    t.unlike(relay6.log(), r"event=auth-lockout ip=127\.0\.4\.1 ", "the typing address is not locked out")
    spray = "127.0.4.2"
    for i in range(3):  # a valid account's logins between guesses at other names
        code, text, dt = auth_timed(relay6, f"victim{i}@example.org", "guess", source=spray)
        t.is_(code, 535, f"guess at victim{i}: 535 ({dt:.2f} s)")
        if i < 2:
            t.is_(auth_timed(relay6, OTHER, PW, source=spray)[0], 235, "then the valid account: 235")
    t.like(relay6.log(), r"event=auth-lockout ip=127\.0\.4\.2 failures=3 ",
           "the third guess locks the address out, logins in between notwithstanding")
    c = relay6.raw(source=spray)
    t.like(c.reply_text(), r"^421 4\.7\.0 ", "a new connection from it gets 421 4.7.0")
    c.close()


# --- open files: max_sessions needs as many descriptors -------------------------------------
def nofile(soft, hard):
    import resource
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_files_limit(relay):
    with open(f"/proc/{relay.proc.pid}/limits") as f:
        return [int(x) for x in re.search(r"^Max open files\s+(\d+)\s+(\d+)", f.read(), re.M).groups()]


@t.test("open files: relayd raises its soft limit to the hard one, and warns when max_sessions would not fit")
def _():
    r = t.Relay(extra_config="max_sessions 100\n")
    r.add_user(USER, PW)
    r.start(preexec_fn=nofile(256, 4096))
    t.is_(open_files_limit(r), [4096, 4096], "started with 256 of 4096 open files: raised to 4096")
    t.unlike(r.log(), r"fd-limit-low", "100 sessions fit: no warning")
    t.is_(send(r)[1], 250, "and a message goes through")
    r.stop()
    r.write_config("max_sessions 5000\n")
    r.start(preexec_fn=nofile(256, 1024))
    t.is_(open_files_limit(r), [1024, 1024], "a hard limit of 1024: raised to that")
    t.like(r.log(), r"main event=fd-limit-low limit=1024 max_sessions=5000 hint=.*LimitNOFILE",
           "and a warning that 5000 sessions would not fit, naming the fix")
    r.stop()


# --- the byte limit and the usage journal -----------------------------------------------------
@t.test("a failed commit taken back in another bucket than it was counted in does not wrap the usage")
def _():
    r = t.Relay(extra_config="limit_msgs 100/day\nlimit_bytes 50M/day\n")
    r.add_user(USER, PW)
    os.makedirs(r.queue_dir, exist_ok=True)
    now = int(time.time())
    edge = ((now - 86400) // 1440 + 1) * 1440  # a day-window bucket edge about a day ago
    if edge - 1 <= now - 86400 + 1:
        edge += 1440
    with open(os.path.join(r.queue_dir, "usage.log"), "w") as f:
        f.write(f"{edge - 1} 1 1 2600000 {USER}\n")   # counted just before the edge
        f.write(f"{edge} -1 -1 -2600000 {USER}\n")    # its commit failed just after (the old journal)
    r.start()
    t.is_(send(r)[1], 250, "the user, who used nothing, sends a message: 250 (not 450 on a wrapped sum)")
    r.stop()
    lines = open(os.path.join(r.queue_dir, "usage.log")).read().splitlines()
    t.ok(len(lines) >= 1 and lines[-1].split()[1] == "1", "and it is journalled", lines[-1:])


@t.test("usage journal lines dated ahead of the clock (written before it stepped back) still count at start")
def _():
    r = t.Relay(extra_config="limit_msgs 2/hour\n")
    r.add_user(USER, PW)
    os.makedirs(r.queue_dir, exist_ok=True)
    ahead = int(time.time()) + 600
    with open(os.path.join(r.queue_dir, "usage.log"), "w") as f:
        f.write(f"{ahead} 1 1 300 {USER}\n{ahead + 1} 1 1 300 {USER}\n")
    r.start()
    t.like(r.log(), r"policy event=usage-replayed entries=2", "both replayed")
    t.is_(send(r)[1], 450, "the user's two messages of the hour count: the third gets 450")
    r.stop()


@t.test("the byte limit counts what the client sent, not the headers relayd adds")
def _():
    r = t.Relay(extra_config="limit_bytes 2k/hour\n")
    r.add_user(USER, PW)
    r.start()
    head = f"From: <{USER}>\r\nTo: <bob@example.net>\r\nSubject: s\r\n\r\n".encode()
    msg = head + (b"x" * 78 + b"\r\n") * ((2000 - len(head)) // 80)
    msg += b"y" * (2000 - len(msg) - 2) + b"\r\n"
    stage, code, text = send(r, msg=msg)
    t.is_(code, 250, f"2000 bytes under a 2048-byte limit: accepted ({stage} {text})")
    stage, code, text = send(r, msg=head + b"y\r\n")
    t.is_(code, 450, f"the next one is over the hour's bytes: 450 ({stage} {text})")
    r.stop()


# --- IPv6 clients are counted by their network ------------------------------------------------
V6 = ["fd00:99::1", "fd00:99::2", "fd00:99:0:1::1"]


def v6_addrs(add):
    for a in V6:
        subprocess.run(["ip", "-6", "addr", "add" if add else "del", a + "/128", "dev", "lo"] + (["nodad"] if add else []),
                       check=add, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@t.test("IPv6: the per-IP rules count a /64 as one client (ipv6_prefix_length 64)")
def _():
    v6_addrs(True)
    r = t.Relay(extra_config="max_conn_per_ip 2\nmax_conn_rate_per_ip 0\nauth_fail_limit 3\nauth_lockout 60s\n")
    r.add_user(USER, PW)
    try:
        r.start()
        raw = lambda src: t.Raw(r.port_v6, host="::1", ca_file=r.ca_file, source=src)
        a, b = raw(V6[0]), raw(V6[1])
        t.like(a.reply_text(), r"^220 ", "fd00:99::1 greeted")
        t.like(b.reply_text(), r"^220 ", "fd00:99::2 greeted")
        c = raw(V6[1])
        t.like(c.reply_text(), r"^421 4\.7\.0 ", "a third from the same /64, another address: 421 4.7.0")
        d = raw(V6[2])
        t.like(d.reply_text(), r"^220 ", "another /64 is another client: 220")
        for x in (a, b, c, d):
            x.close()
        time.sleep(0.3)
        for i, src in enumerate([V6[0], V6[1], V6[0]]):
            g = raw(src)
            g.reply(); g.ehlo(); g.cmd("STARTTLS"); g.starttls(); g.ehlo()
            t.is_(g.auth_plain(f"nobody{i}@example.org", "guess")[0], 535, f"guess {i + 1} from {src}: 535")
            g.close()
        t.like(r.log(), r"event=auth-lockout ip=fd00:99::1 net=fd00:99::/64 failures=3 ",
               "three guesses from two addresses of one /64 lock it out, logged with its network")
        e = raw(V6[1])
        t.like(e.reply_text(), r"^421 4\.7\.0 ", "its other address is locked out too: 421 4.7.0")
        e.close()
    finally:
        r.stop()
        v6_addrs(False)


# --- wall-clock steps (NTP): libfaketime moves CLOCK_REALTIME only -----------------------------
@t.test("a wall-clock step neither stretches an AUTH lockout nor ends a young session, and the limits hold")
def _():
    clock = t.WallClock()
    step = clock.step
    r = t.Relay(extra_config="auth_fail_limit 3\nauth_lockout 4s\ntimeout_session 1h\nlimit_msgs 2/hour\n", ipv6=False)
    r.add_user(OTHER, PW)
    clock.start(r)
    try:
        for i in range(3):
            t.is_(auth_timed(r, OTHER, f"guess{i}")[0], 535, f"guess {i + 1}: 535")
        t.like(auth_timed(r, OTHER, PW)[1], LOCKED, "locked out: 454 with the right password")
        step("-3600")  # NTP steps the clock back an hour
        time.sleep(5)  # more than auth_lockout (4 s) of real time
        t.is_(auth_timed(r, OTHER, PW)[0], 235, "4 s of real time later the lockout is over, the step notwithstanding")
        step("+0")
        for n in range(2):
            t.is_(send(r, user=OTHER, frm=OTHER)[1], 250, f"message {n + 1} of limit_msgs 2/hour")
        step("-3600")  # back an hour again: the two messages are now counted an hour ahead of the clock
        t.is_(send(r, user=OTHER, frm=OTHER)[1], 450, "the third is over the limit though the two are 'in the future'")
        c = r.session(OTHER)
        step("+86400")  # forward a day
        time.sleep(1.2)
        t.is_(c.cmd("NOOP")[0], 250, "a session a second old is not ended as too long by a step of a day")
        c.close()
    finally:
        step("+0")
        r.stop()


t.done()
