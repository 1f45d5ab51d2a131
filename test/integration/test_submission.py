#!/usr/bin/python3
"""test_submission - relayd's submission server, end to end (RFC 5321, 6409, 3207, 4954, 2920,
1870, 3030): greeting and EHLO, STARTTLS and its injection attack, AUTH, sender policy, queueing
with the submission fixes, size/line/recipient limits, CRLF strictness (SMTP smuggling),
pipelining, BDAT, and real clients (swaks, curl, smtplib over 587-mode, 465-mode and IPv6).

Run by `make check`, or by hand: top_builddir=. /usr/bin/python3 test/integration/test_submission.py
Slow groups (concurrency, kill -9) are in test_durability.py.
"""
import base64
import os
import re
import smtplib
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import relaytest as t  # noqa: E402

ALICE, ALICE_PW = "alice@example.org", "alice-secret-1"
BOB, BOB_PW = "bob", "bob-secret-2"
EXTENSIONS = ["SIZE", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "CHUNKING", "SMTPUTF8", "DSN"]

try:
    relay = t.Relay()
    relay.add_user(ALICE, ALICE_PW)
    relay.add_user(BOB, BOB_PW, senders=["@example.net"])
    relay.start()
except Exception as e:  # noqa: BLE001
    t.bail(f"could not set up relayd: {e}")


def marker(tag):
    return f"{tag}-{os.getpid()}-{time.monotonic_ns()}"


def queued_message(qid):
    """the message bytes of queue file qid (None if there is no such file)"""
    data = relay.queue_files().get(qid)
    if data is None:
        return None
    return t.queue_parse(data)[1]


def find_in_queue(needle):
    """ids of queue files that contain needle"""
    if isinstance(needle, str):
        needle = needle.encode()
    return [qid for qid, data in relay.queue_files().items() if needle in data]


def start_debug(r):
    """start relayd r with -d (debug log lines)"""
    t.WRAPPER = ["/bin/sh", "-c", 'exec "$0" -d "$@"']  # relayd -d -f -c CONF
    try:
        r.start()
    finally:
        t.WRAPPER = []


def log_unsafe_lines(r, needle):
    """the lines of r's log (bytes) that contain needle and are not safe to show: not UTF-8,
    or holding a C0 or C1 control or DEL (U+0000-U+001F, U+007F-U+009F)"""
    with open(r.logfile, "rb") as f:
        data = f.read()
    bad = []
    for line in data.split(b"\n"):
        if needle not in line:
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(line)
            continue
        if re.search("[\x00-\x1f\x7f-\x9f]", text):
            bad.append(line)
    return bad


def transaction(c, frm, rcpts, data):
    """MAIL, RCPT..., DATA, dot-stuffed data; returns the reply to the final dot"""
    code, text = c.cmd(f"MAIL FROM:<{frm}>")
    if code != 250:
        return code, text
    for r in rcpts:
        code, text = c.cmd(f"RCPT TO:<{r}>")
        if code != 250:
            return code, text
    code, text = c.cmd("DATA")
    if code != 354:
        return code, text
    c.send(t.dot_stuff(data))
    return c.reply()


def data_raw(c, raw, frm=ALICE, rcpt="rcpt@example.com"):
    """MAIL, RCPT, DATA, then raw bytes exactly as given (they must end the DATA themselves)"""
    for line, want in ((f"MAIL FROM:<{frm}>", 250), (f"RCPT TO:<{rcpt}>", 250), ("DATA", 354)):
        code, text = c.cmd(line)
        if code != want:
            raise RuntimeError(f"{line!r} answered {text!r}")
    c.send(raw)
    return c.reply()


# ---------------------------------------------------------------------------------------------
@t.test("greeting and EHLO before and after STARTTLS")
def _():
    c = relay.raw()
    code, text = c.reply()
    t.like(text, r"^220 relay\.test ESMTP", "greeting is 220 relay.test ESMTP ...")
    code, text, ext = c.ehlo()
    t.is_(code, 250, "EHLO before TLS: 250")
    t.like(text.splitlines()[0], r"^250[ -]relay\.test", "EHLO reply names relay.test")
    t.ok("STARTTLS" in ext, "EHLO before TLS offers STARTTLS", text)
    t.ok("AUTH" not in ext, "EHLO before TLS does not offer AUTH", text)
    code, text = c.auth_plain(ALICE, ALICE_PW)
    t.like(text, r"^530 5\.7\.0 ", "AUTH before STARTTLS: 530 5.7.0")
    code, text = c.cmd(f"MAIL FROM:<{ALICE}>")
    t.like(text, r"^530 5\.7\.0 ", "MAIL before STARTTLS: 530 5.7.0")
    code, text = c.cmd("STARTTLS")
    t.like(text, r"^220 ", "STARTTLS: 220")
    c.starttls()
    t.is_(c.plain_leftover, b"", "nothing after the 220 in clear text")
    code, text, ext = c.ehlo()
    t.is_(code, 250, "EHLO after TLS: 250")
    auth = ext.get("AUTH", "").upper().split()
    t.ok("PLAIN" in auth and "LOGIN" in auth, "EHLO after TLS offers AUTH PLAIN LOGIN", text)
    t.ok("STARTTLS" not in ext, "EHLO after TLS does not offer STARTTLS", text)
    for e in EXTENSIONS:
        t.ok(e in ext, f"EHLO after TLS advertises {e}", text)
    t.is_(ext.get("SIZE"), "1048576", "SIZE shows max_message_size (1M)")
    code, text = c.cmd(f"MAIL FROM:<{ALICE}>")
    t.like(text, r"^530 5\.7\.0 ", "MAIL after TLS but before AUTH: 530 5.7.0")
    code, text = c.cmd("QUIT")
    t.like(text, r"^221 ", "QUIT: 221")
    t.ok(c.eof(), "connection closed after QUIT")
    c.close()


@t.test("implicit TLS port (465-mode)")
def _():
    c = relay.raw(relay.port_tls, tls=True)
    t.like(c.reply_text(), r"^220 relay\.test ESMTP", "greeting over TLS from the first byte")
    code, text, ext = c.ehlo()
    t.ok("AUTH" in ext and "STARTTLS" not in ext, "AUTH offered, STARTTLS not", text)
    t.is_(c.auth_plain(ALICE, ALICE_PW)[0], 235, "AUTH PLAIN works")
    c.close()


@t.test("AUTH: bad password, PLAIN, LOGIN, PLAIN with empty initial response")
def _():
    c = relay.session(ALICE, ALICE_PW)  # PLAIN with initial response
    t.ok(True, "AUTH PLAIN with the right password: 235")
    code, text = c.auth_plain(ALICE, ALICE_PW)
    t.like(text, r"^503 5\.5\.1 ", "second AUTH: 503 5.5.1")
    c.close()

    c = relay.raw()
    c.reply(); c.ehlo(); c.cmd("STARTTLS"); c.starttls(); c.ehlo()
    code, text = c.auth_plain(ALICE, "wrong password")
    t.like(text, r"^535 5\.7\.8 ", "bad password: 535 5.7.8")
    code, text = c.cmd(f"MAIL FROM:<{ALICE}>")
    t.like(text, r"^530 5\.7\.0 ", "MAIL after failed AUTH: 530 5.7.0")
    code, text = c.auth_plain(ALICE, ALICE_PW)
    t.like(text, r"^235 2\.7\.0 ", "right password after a wrong one: 235 2.7.0")
    c.close()

    c = relay.raw()
    c.reply(); c.ehlo(); c.cmd("STARTTLS"); c.starttls(); c.ehlo()
    code, text = c.cmd("AUTH LOGIN")
    t.like(text, r"^334 VXNlcm5hbWU6", "AUTH LOGIN: 334 Username:")
    code, text = c.cmd(t.b64(ALICE))
    t.like(text, r"^334 UGFzc3dvcmQ6", "AUTH LOGIN: 334 Password:")
    code, text = c.cmd(t.b64(ALICE_PW))
    t.like(text, r"^235 2\.7\.0 ", "AUTH LOGIN: 235 2.7.0")
    c.close()

    c = relay.raw()
    c.reply(); c.ehlo(); c.cmd("STARTTLS"); c.starttls(); c.ehlo()
    code, text = c.cmd("AUTH PLAIN")
    t.like(text, r"^334", "AUTH PLAIN without initial response: 334")
    code, text = c.cmd(t.b64(f"\0{BOB}\0{BOB_PW}"))
    t.like(text, r"^235 2\.7\.0 ", "AUTH PLAIN after the 334: 235 2.7.0")
    c.close()

    c = relay.raw()
    c.reply(); c.ehlo(); c.cmd("STARTTLS"); c.starttls(); c.ehlo()
    code, text = c.cmd("AUTH LOGIN")
    code, text = c.cmd("*")
    t.like(text, r"^501 5\.\d+\.\d+ ", "AUTH cancelled with '*': 501 (RFC 4954 4)")
    code, text = c.cmd("NOOP")
    t.is_(code, 250, "session usable after a cancelled AUTH")
    c.close()

    # an empty LOGIN user name is refused by relayd itself (Cyrus's LOGIN plugin leaked the
    # password that followed one: the valgrind stage runs this file); with and without an
    # initial response, and the session goes on
    c = relay.raw()
    c.reply(); c.ehlo(); c.cmd("STARTTLS"); c.starttls(); c.ehlo()
    for how, first in (("after the prompt", "AUTH LOGIN"), ("as the initial response", "AUTH LOGIN =")):
        code, text = c.cmd(first)
        if first == "AUTH LOGIN":
            t.like(text, r"^334 VXNlcm5hbWU6", "AUTH LOGIN: 334 Username:")
            code, text = c.cmd("")
        t.like(text, r"^535 5\.7\.8 ", f"an empty user name {how}: 535 5.7.8 at once, no Password: prompt")
    code, text = c.auth_login(ALICE, ALICE_PW)
    t.like(text, r"^235 2\.7\.0 ", "then AUTH LOGIN with a real name: 235")
    c.close()
    t.like(relay.log(), r"event=auth result=fail mech=LOGIN client=\S+ user=- reason=empty-user-name", "logged as a failure")


def auth_fresh(mech, user, password):
    """(code, text) of AUTH PLAIN or LOGIN on a new session after STARTTLS"""
    c = relay.raw()
    try:
        c.reply(); c.ehlo(); c.cmd("STARTTLS"); c.starttls(); c.ehlo()
        return c.auth_plain(user, password) if mech == "PLAIN" else c.auth_login(user, password)
    finally:
        c.close()


def set_disabled(name, value):
    import sqlite3
    db = sqlite3.connect(os.path.join(relay.dir, "relayd.db"))
    try:
        db.execute("UPDATE users SET disabled = ? WHERE name = ?", (value, name))
        db.commit()
    finally:
        db.close()


def auth_plain_bytes(r, name, password=b"wrong"):
    """(code, text) of AUTH PLAIN with a user name given as bytes, on a new session of r"""
    c = r.raw()
    try:
        c.reply(); c.ehlo(); c.cmd("STARTTLS"); c.starttls(); c.ehlo()
        c.send(b"AUTH PLAIN " + base64.b64encode(b"\0" + name + b"\0" + password) + b"\r\n")
        return c.reply()
    finally:
        c.close()


@t.test("AUTH: a user name with C1 controls, bytes that are not UTF-8 or quotes never reaches the log raw, "
        "not even at the lockout")
def _():
    r = t.Relay(extra_config="auth_fail_limit 2\nlimit_loopback no\n")
    try:
        r.add_user(ALICE, ALICE_PW)
        r.start()
        name = b'x\xc2\x85\xc2\x9b31m\xff\xfe="evil"@example.org'  # NEL, CSI, bytes that are not UTF-8
        got = [auth_plain_bytes(r, name)[0] for _ in range(3)]
        t.is_(got, [535, 535, 535], "AUTH with that name: 535 (it names no user, so it is never locked)")
        t.ok(t.wait_for(lambda: r.log().count("event=auth result=fail") >= 3, 5), "the failures are logged")
        t.is_(log_unsafe_lines(r, b"auth"), [], "no auth line holds a control or invalid UTF-8")
        t.like(r.log(), r"event=auth result=fail mech=PLAIN client=\S+ user=- reason=bad-credentials",
               "the name is logged as '-'")
        name = 'x="evil"\\@b\u00fccher.example'.encode()  # a valid name, with '"', '=', '\\' and UTF-8
        got = [auth_plain_bytes(r, name)[0] for _ in range(3)]
        t.is_(got, [535, 535, 454], "AUTH with a valid name that holds quotes: locked after 2 failures")
        t.ok(t.wait_for(lambda: "event=auth result=refused" in r.log(), 5), "the refusal is logged")
        esc = 'x=\\"evil\\"\\\\@b\u00fccher.example'
        t.like(r.log(), r"policy event=auth-lockout user=" + re.escape(esc) + " failures=2 ",
               "the lockout line has the name with '\"' and '\\' escaped, its UTF-8 as it is")
        t.like(r.log(), r"event=auth result=refused mech=PLAIN client=\S+ user=" + re.escape(esc) + " reason=lockout",
               "so has the AUTH refused line")
        t.is_([l for l in r.log().splitlines() if re.search(r'auth.*(?<!\\)"', l)], [],
              "no auth line holds a quote that is not escaped")
        t.is_(log_unsafe_lines(r, b"auth"), [], "nor a control or invalid UTF-8")
        t.is_(auth_plain_bytes(r, ALICE.encode(), ALICE_PW.encode())[0], 235, "alice still gets in")
    finally:
        r.stop()


def hostile_upstream(lsock, served):
    """answer one connection on lsock with replies full of ESC, C1, bytes that are not UTF-8
    and quotes, then close (every socket operation bounded by a timeout)"""
    try:
        conn, _ = lsock.accept()
        with conn:
            conn.settimeout(10)
            conn.sendall(b'220 up.test \x1b[2J\xc2\x9b31m\xff"x\\y\r\n')
            conn.recv(512)  # EHLO
            conn.sendall(b"421 4.3.2 gone\x1b]0;t\x07\xc2\x85\r\n")
            served.append(True)
    except OSError:
        pass


@t.test("the forwarder's debug line shows upstream reply text escaped (relayd -d)")
def _():
    if t.WRAPPER:
        return t.skip("upstream replies at debug level", "relayd runs under a wrapper")
    import socket
    import threading
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.settimeout(15 * t.SLOW)
    served = []
    th = threading.Thread(target=hostile_upstream, args=(lsock, served), daemon=True)
    th.start()
    r = t.Relay(extra_config=f"upstream 127.0.0.1:{lsock.getsockname()[1]} tls=none\n")
    try:
        r.add_user(ALICE, ALICE_PW)
        start_debug(r)
        c = r.session(ALICE)
        code, text = transaction(c, ALICE, ["bob@example.net"], t.make_message(ALICE, "bob@example.net"))
        c.close()
        t.is_(code, 250, "a message queued")
        t.ok(t.wait_for(lambda: r.log().count("forward event=reply") >= 2, 10 * t.SLOW), "both replies logged")
        t.like(r.log(), r'event=reply state=\S+ reply="220 up\.test \\x1b\[2J\\xc2\\x9b31m\\xff\\"x\\\\y"',
               "the greeting: ESC, CSI, byte FF as \\xHH, quote and backslash escaped")
        t.like(r.log(), r'event=reply state=\S+ reply="421 4\.3\.2 gone\\x1b\]0;t\\x07\\xc2\\x85"',
               "the 421: ESC, BEL, NEL as \\xHH")
        t.is_(log_unsafe_lines(r, b"event=reply"), [], "no reply line holds a control or invalid UTF-8")
        t.ok(t.wait_for(lambda: "event=upstream-failed" in r.log(), 10 * t.SLOW), "the 421 ends the session")
        t.is_(log_unsafe_lines(r, b"event=upstream-failed"), [],
              "nor does the info line that quotes the upstream's reply")
    finally:
        r.stop()
        th.join(15 * t.SLOW)
        lsock.close()


@t.test("passwords never reach the log, in clear or base64, even at debug level (relayd -d)")
def _():
    if t.WRAPPER:
        return t.skip("passwords at debug level", "relayd runs under a wrapper")
    secret, wrong = "Zq7-unique-secret-pw", "Wr0ng-unique-guess-pw"
    r = t.Relay(ipv6=False)
    try:
        r.add_user(ALICE, secret)
        start_debug(r)
        for mech, pw, want in (("PLAIN", secret, 235), ("LOGIN", secret, 235), ("PLAIN", wrong, 535),
                               ("LOGIN", wrong, 535)):
            c = r.raw()
            c.reply(); c.ehlo(); c.cmd("STARTTLS"); c.starttls(); c.ehlo()
            code, text = c.auth_plain(ALICE, pw) if mech == "PLAIN" else c.auth_login(ALICE, pw)
            t.is_(code, want, f"AUTH {mech} with the {'right' if pw == secret else 'wrong'} password: {want}")
            c.close()
        t.ok(t.wait_for(lambda: r.log().count("event=auth result=") >= 4, 5 * t.SLOW), "all four logged")
        log = r.log()
        forms = [pw for pw in (secret, wrong)] + [t.b64(pw) for pw in (secret, wrong)] + \
                [t.b64(f"\0{ALICE}\0{pw}") for pw in (secret, wrong)]
        t.is_([f for f in forms if f in log], [], "no password, base64 password or PLAIN response in the log")
        t.like(log, r"\bdebug\b|level=debug|DEBUG|event=", "(the log is the debug one)")
    finally:
        r.stop()


@t.test("AUTH: a disabled user is refused at once, also when the credential cache holds the password")
def _():
    dave, dave_pw = "dave@example.org", "dave-secret-4"
    relay.add_user(dave, dave_pw)
    t.is_(auth_fresh("PLAIN", dave, dave_pw)[0], 235, "dave logs in: 235 (the cache is filled)")
    before = relay.stat("auth_cached")
    t.is_(auth_fresh("PLAIN", dave, dave_pw)[0], 235, "again: 235")
    t.is_(relay.stat("auth_cached"), before + 1 if before is not None else None,
          "the second login was a credential-cache hit")
    set_disabled(dave, 1)
    for mech in ("PLAIN", "LOGIN"):  # PLAIN is tried from the cache on the loop, LOGIN on a worker
        code, text = auth_fresh(mech, dave, dave_pw)
        t.like(text, r"^535 5\.7\.8 ", f"disabled, AUTH {mech} with the cached password: 535 5.7.8")
    t.like(relay.log(), r"event=auth result=fail mech=PLAIN client=\S+ user=- reason=bad-credentials",
           "logged like an unknown name")
    set_disabled(dave, 0)
    t.is_(auth_fresh("LOGIN", dave, dave_pw)[0], 235, "enabled again: 235")


@t.test("sender policy")
def _():
    c = relay.session(ALICE)
    code, text = c.cmd("MAIL FROM:<x@example.org>")
    t.like(text, r"^553 5\.7\.1 ", "alice may not send as x@example.org: 553 5.7.1")
    code, text = c.cmd(f"MAIL FROM:<{ALICE}>")
    t.like(text, r"^250 ", "alice may send as alice@example.org")
    c.cmd("RSET")
    code, text = c.cmd("MAIL FROM:<Alice@Example.ORG>")
    t.like(text, r"^250 ", "sender check ignores the case of the domain and local part")
    c.close()

    c = relay.session(BOB)
    code, text = c.cmd("MAIL FROM:<anything@example.net>")
    t.like(text, r"^250 ", "bob (sender @example.net) may send as anything@example.net")
    c.cmd("RSET")
    code, text = c.cmd("MAIL FROM:<x@example.org>")
    t.like(text, r"^553 5\.7\.1 ", "bob may not send as x@example.org: 553 5.7.1")
    code, text = c.cmd("MAIL FROM:<x@sub.example.net>")
    t.like(text, r"^553 5\.7\.1 ", "@example.net does not cover sub.example.net")
    c.close()


@t.test("a quoted local part is parsed (RFC 5321 4.1.2): one Quoted-string, or 501")
def _():
    c = relay.session(ALICE)
    code, text = c.cmd(f"MAIL FROM:<{ALICE}>")
    t.is_(code, 250, "MAIL")
    for bad in ('"x=1"reason="y"@example.net', '"a"."b"@example.net', '"a\\"@example.net'):
        code, text = c.cmd(f"RCPT TO:<{bad}>")
        t.like(text, r"^501 5\.1\.3 ", f"RCPT TO:<{bad}>: 501 5.1.3")
    code, text = c.cmd('RCPT TO:<"john.doe"@example.net>')
    t.like(text, r"^250 2\.1\.5 ", 'RCPT TO:<"john.doe"@example.net>: 250')
    tag = marker("quoted")
    code, text = c.cmd("DATA")
    t.is_(code, 354, "DATA")
    c.send(t.dot_stuff(t.make_message(ALICE, '"john.doe"@example.net', subject=tag)))
    code, text = c.reply()
    qid = t.queued_id(text)
    t.ok(qid is not None, "queued", text)
    env = t.queue_parse(relay.queue_files().get(qid, b""))[0] if qid else {}
    t.ok(any('"john.doe"@example.net' in str(r) for r in env.get("rcpt", [])), "its recipient kept with the quotes",
         env)
    c.close()


@t.test("under SMTPUTF8 an address is well-formed UTF-8 without C1 controls (RFC 6531 3.3), or 501")
def _():
    c = relay.session(ALICE)
    for bad in (b"al\xc2\x85ice\xff\x9b2J@example.org", b"al\xc0\xafice@example.org", b"al\xed\xa0\x80@example.org"):
        c.send(b"MAIL FROM:<" + bad + b"> SMTPUTF8\r\n")
        code, text = c.reply()
        t.like(text, r"^501 5\.1\.7 ", f"MAIL FROM:<{bad!r}> SMTPUTF8: 501 5.1.7")
    c.send(b"MAIL FROM:<al\xc2\x85ice@example.org>\r\n")
    code, text = c.reply()
    t.like(text, r"^553 5\.6\.7 ", "8-bit without SMTPUTF8: 553 5.6.7, as before")
    code, text = c.cmd(f"MAIL FROM:<{ALICE}> SMTPUTF8")
    t.is_(code, 250, "MAIL SMTPUTF8")
    c.send(b"RCPT TO:<b\xc2\x9b2Job@example.net>\r\n")
    code, text = c.reply()
    t.like(text, r"^501 5\.1\.3 ", "RCPT with CSI (U+009B) under SMTPUTF8: 501 5.1.3")
    code, text = c.cmd("RCPT TO:<j\u00f6rg@b\u00fccher.example>")
    t.like(text, r"^250 2\.1\.5 ", "RCPT with UTF-8 under SMTPUTF8: 250")
    code, text = c.cmd("DATA")
    t.is_(code, 354, "DATA")
    c.send(b"From: <x\x1b[2J\xc2\x9b@example.org>\r\nSubject: t\r\n\r\nbody\r\n.\r\n")
    code, text = c.reply()
    t.like(text, r"^550 5\.6\.0 ", "a From: address with ESC and CSI: 550 5.6.0")
    c.close()
    t.wait_for(lambda: "header-from-invalid" in relay.log(), 5)
    t.is_(log_unsafe_lines(relay, b"smtp event=reject"), [], "no reject line holds a control or invalid UTF-8")


@t.test("accepted message: queued durably with Received, Message-ID, Date; dot-unstuffed")
def _():
    m = marker("body")
    body = f"first line {m}\r\n.x\r\n.\r\n...\r\nlast line\r\n"
    raw = (f"From: <{ALICE}>\r\nTo: <rcpt@example.com>\r\nSubject: queue test\r\n\r\n"
           f"first line {m}\r\n"
           "..x\r\n"           # arrives as ".x"
           "..\r\n"            # arrives as "."
           "....\r\n"          # arrives as "..."
           "last line\r\n.\r\n").encode()
    c = relay.session(ALICE)
    code, text = data_raw(c, raw)
    t.like(text, t.QUEUED_RE, "250 2.0.0 Ok: queued as <16 hex>")
    qid = t.queued_id(text)
    msg = queued_message(qid) if qid else None
    t.ok(msg is not None, f"queue/msg/{qid} exists right after the 250", sorted(relay.queue_ids()))
    msg = msg or b""
    t.ok(body.encode() in msg, "stored body is the dot-unstuffed body, byte for byte", msg)
    t.ok(b"\r\n.x\r\n" in msg and b"..x" not in msg, "a body line '..x' on the wire is stored as '.x'", msg)
    t.is_(t.header_count(msg, "Received"), 1, "one Received: header added")
    t.is_(t.header_count(msg, "Message-ID"), 1, "Message-ID: added when missing")
    t.is_(t.header_count(msg, "Date"), 1, "Date: added when missing")
    t.like(msg, r"(?im)^Message-ID:\s*<[^>@\s]+@[^>\s]+>", "added Message-ID looks like <x@y>")
    t.like(msg, r"(?i)^Received: ", "Received: is the first header")
    t.like(msg, r"(?im)^Subject: queue test\r$", "client headers kept")
    env = t.queue_parse(relay.queue_files()[qid])[0] if qid else {}
    t.is_(env.get("from"), [ALICE], "envelope sender stored")
    t.ok(any(r.endswith(" rcpt@example.com") for r in env.get("rcpt", [])), "recipient stored", env)
    t.is_(env.get("user"), [ALICE], "authenticated user stored")

    # the client's own Message-ID and Date are kept and not duplicated
    mid = f"<{marker('mid')}@client.example>"
    msg2 = t.make_message(ALICE, "rcpt@example.com", subject="with ids",
                          extra_headers=[f"Message-ID: {mid}", "Date: Mon, 1 Jan 2024 10:00:00 +0000"])
    code, text = transaction(c, ALICE, ["rcpt@example.com"], msg2)
    qid2 = t.queued_id(text)
    t.ok(qid2 is not None and qid2 != qid, "second message on the same session queued with a new id", text)
    stored = queued_message(qid2) or b"" if qid2 else b""
    t.is_(t.header_count(stored, "Message-ID"), 1, "client's Message-ID not duplicated")
    t.is_(t.header_count(stored, "Date"), 1, "client's Date not duplicated")
    t.ok(mid.encode() in stored, "client's Message-ID kept", stored[:600])
    t.ok(b"Mon, 1 Jan 2024 10:00:00 +0000" in stored, "client's Date kept", stored[:600])
    t.is_(t.header_count(stored, "Received"), 1, "one Received: header")

    # the obsolete "Name :" form (RFC 5322 4.5.1, 4.5.4) counts as present too
    mid = f"<{marker('obs')}@client.example>"
    msg3 = t.make_message(ALICE, "rcpt@example.com", subject="obs ids",
                          extra_headers=[f"Message-ID : {mid}", "Date\t: Mon, 1 Jan 2024 10:00:00 +0000"])
    code, text = transaction(c, ALICE, ["rcpt@example.com"], msg3)
    qid3 = t.queued_id(text)
    stored = (queued_message(qid3) or b"") if qid3 else b""
    t.is_(t.header_count(stored, "Message-ID"), 1, "'Message-ID :' kept, no second Message-ID added")
    t.is_(t.header_count(stored, "Date"), 1, "'Date\\t:' kept, no second Date added")
    t.ok(mid.encode() in stored, "the client's obsolete-form Message-ID kept", stored[:600])
    c.close()


def stored_after(c, raw, bdat=False):
    """submit raw (DATA, dot-stuffed here; or one BDAT LAST) on session c: the stored message"""
    if bdat:
        c.cmd(f"MAIL FROM:<{ALICE}>")
        c.cmd("RCPT TO:<rcpt@example.com>")
        c.send(f"BDAT {len(raw)} LAST\r\n".encode() + raw)
        code, text = c.reply()
    else:
        code, text = data_raw(c, t.dot_stuff(raw))
    qid = t.queued_id(text)
    return text, ((queued_message(qid) or b"") if qid else b"")


@t.test("no empty line after the header section: the added fields and an empty line go before the "
        "first line that is not a field (RFC 5322 2.2, 3.5)")
def _():
    import email
    import email.policy
    c = relay.session(ALICE)
    cases = (
        ("no header section at all", b"", b"hello world\r\nsecond line\r\n"),
        ("fields then text", f"From: <{ALICE}>\r\nSubject: nb\r\n".encode(), b"body text here\r\n"),
        ("a first line that starts with a space", b"", b" continued-by-client; fake\r\nSubject: x\r\n"),
        ("a quoted From: line in the text", f"From: <{ALICE}>\r\nSubject: q\r\n".encode(),
         b"Bob wrote:\r\nFrom: Bob <bob@example.net>\r\n"),
        ("text only, with a From: line", b"", b"Dear all,\r\nFrom: the committee\r\n"),
    )
    for name, hdrs, text in cases:
        for bdat in (False, True):
            how = f"{name} ({'BDAT' if bdat else 'DATA'})"
            reply, msg = stored_after(c, hdrs + text, bdat)
            t.like(reply, t.QUEUED_RE, f"{how}: queued")
            head, sep, body = msg.partition(b"\r\n\r\n")
            t.is_(body, text, f"{how}: the client's text is the body, byte for byte, after the one empty line")
            t.ok(hdrs in head + b"\r\n", f"{how}: the client's fields kept", head)
            t.like(head, r";\r\n\t[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} [\d:]{8} [-+]\d{4}\r\n"
                         r"(?![ \t])", f"{how}: the Received: field ends with its date-time")
            m = email.message_from_bytes(msg, policy=email.policy.default)
            t.is_([type(d).__name__ for d in m.defects], [], f"{how}: Python's email parser finds no defect")
            t.ok(m["Message-ID"] is not None and m["Date"] is not None, f"{how}: Message-ID and Date in the "
                 "header section", head)
    c.close()


@t.test("message size limit (max_message_size 1M)")
def _():
    c = relay.session(ALICE)
    code, text = c.cmd(f"MAIL FROM:<{ALICE}> SIZE=2000000")
    t.like(text, r"^552 5\.3\.4 ", "MAIL SIZE=2000000: 552 5.3.4")
    code, text = c.cmd(f"MAIL FROM:<{ALICE}> SIZE=1000")
    t.like(text, r"^250 ", "MAIL SIZE=1000: 250")
    c.cmd("RSET")
    before = relay.queue_ids()
    line = "x" * 76 + "\r\n"
    big = t.make_message(ALICE, "rcpt@example.com", body=line * (1200 * 1024 // len(line)))
    code, text = transaction(c, ALICE, ["rcpt@example.com"], big)
    t.like(text, r"^552 5\.3\.4 ", "1.2 MB of DATA: 552 5.3.4 after the final dot")
    t.is_(relay.queue_ids() - before, set(), "nothing queued")
    code, text = c.cmd("RSET")
    t.is_(code, 250, "RSET after the 552: 250")
    code, text = c.cmd("NOOP")
    t.is_(code, 250, "NOOP after the 552: 250")
    code, text = transaction(c, ALICE, ["rcpt@example.com"], t.make_message(ALICE, "rcpt@example.com"))
    t.like(text, t.QUEUED_RE, "a small message afterwards on the same session is queued")
    c.close()


@t.test("the EHLO name goes into Received: with only [A-Za-z0-9.-_:[]] (the rest as '?')")
def _():
    c = relay.session(ALICE)
    c.send(b"EHLO h\xc3\xa9llo(x);\tby\tfake.example\r\n")
    code, text = c.reply()
    t.is_(code, 250, "an odd EHLO name is still accepted (no client is refused for its name)")
    t.ok("\ufffd" not in text and "(x)" not in text, "the EHLO reply echoes the cleaned name", text)
    code, text = transaction(c, ALICE, ["rcpt@example.com"], t.make_message(ALICE, "rcpt@example.com"))
    qid = t.queued_id(text)
    msg = (queued_message(qid) or b"") if qid else b""
    first = msg.split(b"\r\n")[0]
    t.is_(first, b"Received: from h??llo?x???by?fake.example ([127.0.0.1])", "cleaned name in Received:")
    t.ok(all(b < 0x80 for b in msg.split(b"\r\n\r\n")[0]), "no 8-bit byte in the header section")
    for name in ("[IPv6:2001:db8::1]", "[192.0.2.1]", "my_host.local-domain", "BareName"):
        code, text = c.cmd(f"EHLO {name}")
        code, text = transaction(c, ALICE, ["rcpt@example.com"], t.make_message(ALICE, "rcpt@example.com"))
        qid = t.queued_id(text)
        msg = (queued_message(qid) or b"") if qid else b""
        t.ok(msg.startswith(f"Received: from {name} ([127.0.0.1])".encode()), f"EHLO {name} kept as is",
             msg[:80])
    c.close()


@t.test("MAIL and RCPT lines longer than 512 octets with extension parameters (RFC 3461, RFC 4954)")
def _():
    c = relay.session(ALICE)
    addr = "l" * 64 + "@" + ".".join(["d" * 59] * 3) + ".example"  # 252 chars
    xaddr = addr.replace("@", "+40")
    xauth = "a+2B" * 60 + "+40" + addr.split("@")[1]  # xtext of a+a+...@<domain>
    mail = (f"MAIL FROM:<{ALICE}> SIZE=1000 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID={'E' * 100}"
            f" AUTH={xauth}")
    t.ok(len(mail) + 2 > 512, f"MAIL line of {len(mail) + 2} octets")
    code, text = c.cmd(mail)
    t.like(text, r"^250 2\.1\.0 ", "MAIL with SIZE, BODY, SMTPUTF8, RET, ENVID and a long AUTH=: 250")
    rcpt = f"RCPT TO:<{addr}> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;{xaddr}"
    t.ok(len(rcpt) + 2 > 512, f"RCPT line of {len(rcpt) + 2} octets")
    code, text = c.cmd(rcpt)
    t.like(text, r"^250 2\.1\.5 ", "RCPT with NOTIFY and a long ORCPT: 250")
    code, text = c.cmd(f"RCPT TO:<{addr}> NOTIFY=SUCCESS ORCPT=rfc822;{xaddr}" + " " * 1800)
    t.like(text, r"^500 5\.5\.2 Line too long", "a RCPT line over 2048 octets: 500 5.5.2")
    code, text = c.cmd("NOOP " + "x" * 600)
    t.like(text, r"^500 5\.5\.2 Line too long", "other commands keep the 512-octet limit")
    code, text = c.cmd("RSET")
    t.is_(code, 250, "in sync afterwards")
    c.close()


@t.test("command line limits and CRLF strictness")
def _():
    c = relay.session(ALICE)
    c.send("NOOP " + "x" * 4995 + "\r\n")
    code, text = c.reply()
    t.like(text, r"^500 5\.5\.2 ", "5000-char command: 500 5.5.2")
    code, text = c.cmd("NOOP")
    t.like(text, r"^250 ", "next NOOP: 250 (still in sync)")
    c.send("NOOP\n")
    code, text = c.reply()
    t.like(text, r"^500 5\.5\.2 ", "NOOP with bare LF: 500 5.5.2")
    code, text = c.cmd("NOOP")
    t.like(text, r"^250 ", "next NOOP: 250")
    c.send(b"NO\0OP\r\n")
    code, text = c.reply()
    t.like(text, r"^500 5\.5\.2 ", "command with a NUL byte: 500 5.5.2")
    code, text = c.cmd("NOOP")
    t.like(text, r"^250 ", "next NOOP: 250")
    for raw in (b"NOOP x\ry\r\n", b"NOOP\rRSET\r\n"):
        c.send(raw)
        code, text = c.reply()
        t.like(text, r"^500 5\.5\.2 ", f"command with a bare CR ({raw!r}): 500 5.5.2")
        code, text = c.cmd("NOOP")
        t.like(text, r"^250 ", "next NOOP: 250")
    c.close()


@t.test("DATA: bare LF, NUL, long line refused with 554 5.6.0; no smuggling")
def _():
    c = relay.session(ALICE)
    head = f"From: <{ALICE}>\r\nTo: <rcpt@example.com>\r\nSubject: bad data\r\n\r\n"
    cases = [
        ("a bare LF", head + "line one\nline two\r\n.\r\n"),
        ("a NUL byte", head + "a\0b\r\n.\r\n"),
        ("a bare CR", head + "a\rb\r\n.\r\n"),
        ("a 2000-char line", head + "y" * 2000 + "\r\n.\r\n"),
    ]
    for what, raw in cases:
        before = relay.queue_ids()
        code, text = data_raw(c, raw.encode())
        t.like(text, r"^554 5\.6\.0 ", f"DATA with {what}: 554 5.6.0 after the final dot")
        t.is_(relay.queue_ids() - before, set(), f"DATA with {what}: nothing queued")
        code, text = c.cmd("NOOP")
        t.like(text, r"^250 ", f"session in sync after DATA with {what}")

    # SMTP smuggling: a fake end of data with bare LFs, then a smuggled transaction
    smuggled = (f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
                "Subject: smuggled\r\n\r\nsmuggled\r\n")
    for name, fake_end in (("\\n.\\n", "\n.\n"), ("\\r\\n.\\n", "\r\n.\n"), ("\\n.\\r\\n", "\n.\r\n")):
        before = relay.queue_ids()
        raw = head + "hello" + fake_end + smuggled + ".\r\n"
        code, text = data_raw(c, raw.encode())
        t.like(text, r"^554 5\.6\.0 ", f"'{name}' inside DATA does not end it: one 554 5.6.0 at the real end")
        code, text = c.cmd("VRFY postmaster")
        t.like(text, r"^252 ", f"'{name}': next reply is VRFY's 252 (no smuggled commands ran)")
        t.is_(relay.queue_ids() - before, set(), f"'{name}': nothing queued")
    c.close()


@t.test("recipient limit (max_recipients 20)")
def _():
    c = relay.session(ALICE)
    c.cmd(f"MAIL FROM:<{ALICE}>")
    codes = [c.cmd(f"RCPT TO:<r{i}@example.com>") for i in range(22)]
    t.is_([x[0] for x in codes[:20]], [250] * 20, "first 20 RCPTs: 250")
    t.like(codes[20][1], r"^452 4\.5\.3 ", "21st RCPT: 452 4.5.3")
    t.like(codes[21][1], r"^452 4\.5\.3 ", "22nd RCPT: 452 4.5.3")
    code, text = c.cmd("DATA")
    t.is_(code, 354, "DATA with 20 recipients: 354")
    c.send(t.dot_stuff(t.make_message(ALICE, "r0@example.com")))
    code, text = c.reply()
    qid = t.queued_id(text)
    t.ok(qid, "queued", text)
    env = t.queue_parse(relay.queue_files().get(qid, b""))[0] if qid else {}
    t.is_(len(env.get("rcpt", [])), 20, "the queue file has the 20 accepted recipients")
    c.close()


@t.test("pipelining")
def _():
    c = relay.session(ALICE)
    c.send(f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    replies = [c.reply() for _ in range(4)]
    t.is_([r[0] for r in replies], [250, 250, 250, 354], "MAIL, RCPT, RCPT, DATA in one write: replies in order")
    c.send(t.dot_stuff(t.make_message(ALICE, "a@example.com")))
    t.like(c.reply_text(), t.QUEUED_RE, "message queued")

    # a whole transaction plus QUIT in one write, the refused sender making the rest fail
    c.send("MAIL FROM:<x@example.org>\r\nRCPT TO:<a@example.com>\r\nDATA\r\nNOOP\r\n")
    replies = [c.reply() for _ in range(4)]
    t.like(replies[0][1], r"^553 5\.7\.1 ", "pipelined refused MAIL: 553 5.7.1")
    t.like(replies[1][1], r"^503 5\.5\.1 ", "pipelined RCPT after it: 503 5.5.1")
    t.like(replies[2][1], r"^(503 5\.5\.1|554 5\.5\.1) ", "pipelined DATA after it: 503/554 5.5.1")
    t.like(replies[3][1], r"^250 ", "pipelined NOOP: 250")

    # everything including the message and QUIT in one write
    msg = t.dot_stuff(t.make_message(ALICE, "c@example.com", subject=marker("onewrite")))
    c.send(f"RSET\r\nMAIL FROM:<{ALICE}>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n".encode() + msg + b"QUIT\r\n")
    replies = [c.reply() for _ in range(6)]
    t.is_([r[0] for r in replies], [250, 250, 250, 354, 250, 221],
          "RSET, MAIL, RCPT, DATA, message, QUIT in one write: replies in order")
    t.ok(c.eof(), "closed after QUIT")
    c.close()


def tls_bio_handshake(sock, records_after_finished):
    """a TLS 1.3 client over ssl.MemoryBIO: the handshake, then the client's Finished and
    records_after_finished (each its own TLS record) leave in ONE send(), so they arrive
    together; returns (sslobj, recv_plain) where recv_plain() yields decrypted bytes"""
    import ssl
    ctx = relay.ssl_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="localhost")
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            if out.pending:
                sock.sendall(out.read())
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("server closed during the handshake")
            inc.write(data)
    for rec in records_after_finished:
        obj.write(rec)
    sock.sendall(out.read())  # Finished + every record in one write

    def recv_plain():
        while True:
            try:
                return obj.read(65536)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                if not data:
                    return b""
                inc.write(data)
                if out.pending:
                    sock.sendall(out.read())
    return obj, recv_plain


def read_replies(recv_plain, n):
    """n complete SMTP replies (multi-line ones count once) as a list of codes"""
    buf, codes = b"", []
    deadline = time.monotonic() + 10
    while len(codes) < n and time.monotonic() < deadline:
        while b"\r\n" in buf and len(codes) < n:
            line, buf = buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                codes.append(int(line[:3]))
        if len(codes) < n:
            more = recv_plain()
            if not more:
                break
            buf += more
    return codes


@t.test("the client's TLS Finished and its first commands in one TCP segment (STARTTLS and implicit TLS)")
def _():
    import socket
    # STARTTLS: Finished + EHLO + NOOP + QUIT, each its own record, in one write
    s, reply = t.clear_to_starttls(relay.port_starttls)
    t.like(reply, r"^220 ", "STARTTLS: 220")
    _, recv_plain = tls_bio_handshake(s, [b"EHLO c.test\r\n", b"NOOP\r\n", b"QUIT\r\n"])
    t.is_(read_replies(recv_plain, 3), [250, 250, 221], "EHLO, NOOP, QUIT that came with the Finished: answered")
    s.close()
    # implicit TLS: Finished + EHLO + a whole AUTHed transaction in one write
    s = socket.create_connection(("127.0.0.1", relay.port_tls), timeout=10)
    msg = t.dot_stuff(t.make_message(ALICE, "seg@example.com", subject=marker("oneseg")))
    cmds = [b"EHLO c.test\r\n", ("AUTH PLAIN " + t.b64(f"\0{ALICE}\0{ALICE_PW}") + "\r\n").encode(),
            f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<seg@example.com>\r\nDATA\r\n".encode(), msg, b"QUIT\r\n"]
    _, recv_plain = tls_bio_handshake(s, cmds)
    t.is_(read_replies(recv_plain, 8), [220, 250, 235, 250, 250, 354, 250, 221],
          "greeting, EHLO, AUTH, MAIL, RCPT, DATA, message, QUIT: all answered")
    s.close()


def tls_hello(version, ciphers="DEFAULT:@SECLEVEL=0", starttls=False, r=relay):
    """("ok", version, cipher name) of a handshake limited to one TLS version (an ssl.TLSVersion
    name) and an OpenSSL cipher list, or ("error", text) when it fails"""
    import socket
    import ssl
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 is deprecated, on purpose
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
    try:
        ctx.set_ciphers(ciphers)
    except ssl.SSLError as e:
        return "error", f"client: {e}"
    if starttls:
        c = r.raw()
        c.reply(); c.ehlo(); c.cmd("STARTTLS")
        sock = c.sock
    else:
        sock = socket.create_connection(("127.0.0.1", r.port_tls), timeout=t.SOCK_TIMEOUT)
    try:
        with ctx.wrap_socket(sock) as ss:
            return "ok", ss.version(), ss.cipher()[0]
    except (ssl.SSLError, OSError) as e:
        return "error", f"{type(e).__name__}: {e}"
    finally:
        sock.close()


# the client could not even send such a hello (its OpenSSL has no TLS 1.1 at all)
CLIENT_CANNOT = re.compile(r"NO_PROTOCOLS_AVAILABLE|UNSUPPORTED_PROTOCOL|NO_CIPHERS_AVAILABLE|^client:", re.I)


@t.test("a TLS 1.1 or 1.0 hello gets a protocol_version alert (RFC 8996 5), no shared suite handshake_failure")
def _():
    for version in ("TLSv1_1", "TLSv1"):
        for starttls in (False, True):
            where = "after STARTTLS" if starttls else "on the implicit-TLS port"
            got = tls_hello(version, starttls=starttls)
            if got[0] == "error" and CLIENT_CANNOT.search(got[1]):
                t.skip(f"{version} {where}: protocol_version alert", f"this client cannot: {got[1]}")
                continue
            t.like(got[-1], r"ALERT_PROTOCOL_VERSION", f"{version} {where}: refused with a protocol_version alert")
    got = tls_hello("TLSv1_2", "CAMELLIA128-SHA:@SECLEVEL=0")
    t.like(got[-1], r"ALERT_HANDSHAKE_FAILURE", "TLS 1.2 with no suite in common: a handshake_failure alert")
    t.like(relay.log(), r"event=disconnect reason=\"tls-handshake: ", "the failed handshakes are logged")
    t.is_(tls_hello("TLSv1_2")[0], "ok", "a TLS 1.2 client is served afterwards")
    # the RSA key above hands handshakes to threads; with none, the handshake fails on the loop
    r0 = t.Relay(extra_config="tls_threads 0\n")
    r0.start()
    got = tls_hello("TLSv1_1", r=r0)
    if not (got[0] == "error" and CLIENT_CANNOT.search(got[1])):
        t.like(got[-1], r"ALERT_PROTOCOL_VERSION", "TLS 1.1, handshakes on the loop: a protocol_version alert too")
    t.is_(r0.stop(), 0, "that relayd exits 0")


@t.test("TLS 1.2 without static-RSA key exchange (RFC 9325 4.1); forward-secret clients are served")
def _():
    static_rsa = "AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA256:AES256-SHA256:AES128-SHA:AES256-SHA"
    for starttls in (False, True):
        where = "after STARTTLS" if starttls else "on the implicit-TLS port"
        got = tls_hello("TLSv1_2", static_rsa, starttls=starttls)
        t.like(got[-1], r"ALERT_HANDSHAKE_FAILURE", f"a client offering only static-RSA suites {where}: refused")
    got = tls_hello("TLSv1_2", "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-GCM-SHA256")
    t.is_(got[:2], ("ok", "TLSv1.2"), "a TLS 1.2 client with ECDHE suites is served")
    got = tls_hello("TLSv1_2", "DEFAULT:" + static_rsa)
    t.like(got[-1], r"^ECDHE-", "a TLS 1.2 client offering both gets ECDHE")
    t.is_(tls_hello("TLSv1_3")[:2], ("ok", "TLSv1.3"), "TLS 1.3 is served")
    c = relay.session(ALICE)  # a default client (TLS 1.3 and 1.2) does the whole session
    t.is_(c.cmd("NOOP")[0], 250, "a default client authenticates and is served")
    c.close()


@t.test("STARTTLS injection: pipelined bytes after STARTTLS are discarded")
def _():
    c = relay.raw()
    c.reply()
    c.ehlo()
    c.send("STARTTLS\r\nNOOP\r\n")
    code, text = c.reply()
    t.like(text, r"^220 ", "STARTTLS: 220")
    c.starttls()
    t.is_(c.plain_leftover, b"", "no reply to the injected NOOP in clear text")
    c.send("EHLO client.test\r\n")
    first = c.recv_line()
    t.like(first, rb"^250-relay\.test", "first line over TLS is the EHLO's 250-relay.test, not a NOOP reply")
    while first and first[3:4] == b"-":
        first = c.recv_line()
    code, text = c.cmd("VRFY postmaster")
    t.like(text, r"^252 ", "next reply is VRFY's (no stray replies queued)")
    c.close()

    # the same with AUTH injected: the server must not have authenticated before TLS
    c = relay.raw()
    c.reply()
    c.ehlo()
    c.send("STARTTLS\r\n" + "AUTH PLAIN " + t.b64(f"\0{ALICE}\0{ALICE_PW}") + "\r\n")
    t.like(c.reply_text(), r"^220 ", "STARTTLS with AUTH after it: 220")
    c.starttls()
    c.ehlo()
    code, text = c.cmd(f"MAIL FROM:<{ALICE}>")
    t.like(text, r"^530 5\.7\.0 ", "injected AUTH had no effect: MAIL gets 530 5.7.0")
    c.close()


@t.test("BDAT and the small commands")
def _():
    c = relay.session(ALICE)
    m = marker("bdat")
    msg = t.make_message(ALICE, "rcpt@example.com", subject=m, body="..not unstuffed\r\nend\r\n")
    c.cmd(f"MAIL FROM:<{ALICE}>")
    c.cmd("RCPT TO:<rcpt@example.com>")
    c.send(f"BDAT {len(msg)} LAST\r\n".encode() + msg)
    code, text = c.reply()
    t.like(text, t.QUEUED_RE, "BDAT n LAST: 250 queued")
    stored = queued_message(t.queued_id(text) or "") or b""
    t.ok(msg.split(b"\r\n\r\n", 1)[1] in stored, "BDAT body stored byte for byte (no dot-unstuffing)", stored)

    m2 = marker("bdat2")
    msg = t.make_message(ALICE, "rcpt@example.com", subject=m2, body="chunked body\r\n")
    c.cmd(f"MAIL FROM:<{ALICE}>")
    c.cmd("RCPT TO:<rcpt@example.com>")
    c.send(b"BDAT 10\r\n" + msg[:10])
    code, text = c.reply()
    t.like(text, r"^250 ", "BDAT 10 (not last): 250")
    c.send(f"BDAT {len(msg) - 10} LAST\r\n".encode() + msg[10:])
    code, text = c.reply()
    t.like(text, t.QUEUED_RE, "BDAT LAST: 250 queued")
    stored = queued_message(t.queued_id(text) or "") or b""
    t.ok(msg.split(b"\r\n\r\n", 1)[1] in stored and m2.encode() in stored,
         "two chunks stored as one message", stored)
    c.close()

    c = relay.session(ALICE)
    t.like(c.cmd("RSET")[1], r"^250 ", "RSET: 250")
    t.like(c.cmd("NOOP")[1], r"^250 ", "NOOP: 250")
    t.like(c.cmd("HELP")[1], r"^214", "HELP: 214")
    t.like(c.cmd("VRFY postmaster")[1], r"^252 ", "VRFY: 252")
    t.like(c.cmd("VRFY")[1], r"^501 5\.5\.4 ", "VRFY without an argument: 501 5.5.4 (RFC 5321 4.1.1.6)")
    t.like(c.cmd("RCPT TO:<a@example.com>")[1], r"^503 5\.5\.1 ", "RCPT before MAIL: 503 5.5.1")
    t.like(c.cmd("DATA")[1], r"^503 5\.5\.1 ", "DATA before MAIL: 503 5.5.1")
    c.cmd(f"MAIL FROM:<{ALICE}>")
    t.like(c.cmd(f"MAIL FROM:<{ALICE}>")[1], r"^503 5\.5\.1 ", "second MAIL: 503 5.5.1")
    t.like(c.cmd("DATA")[1], r"^(503|554) 5\.5\.1 ", "DATA before RCPT: 503 or 554 5.5.1 (RFC 5321 3.3)")
    t.like(c.cmd("FROB")[1], r"^50[02] 5\.5\.[12] ", "unknown command: 500/502 5.5.x")
    t.like(c.cmd("QUIT")[1], r"^221 ", "QUIT: 221")
    c.close()


@t.test("BDAT: a chunk that makes the message too large or bad gets the 5xx at that chunk (RFC 3030 2)")
def _():
    c = relay.session(ALICE)
    c.settimeout(20)
    chunk = (b"y" * 78 + b"\r\n") * (600 * 1024 // 80)  # 600 KB; max_message_size is 1M
    c.cmd(f"MAIL FROM:<{ALICE}>")
    c.cmd("RCPT TO:<rcpt@example.com>")
    c.send(f"BDAT {len(chunk)}\r\n".encode() + chunk)
    t.like(c.reply()[1], rf"^250 2\.0\.0 {len(chunk)} octets received", "first 600 KB chunk: 250")
    c.send(f"BDAT {len(chunk)}\r\n".encode() + chunk)
    t.like(c.reply()[1], r"^552 5\.3\.4 ", "the chunk that passes 1M: 552 5.3.4 at once")
    c.send(b"BDAT 10 LAST\r\n0123456789")
    t.like(c.reply()[1], r"^503 5\.5\.1 ", "a BDAT after it: 503 5.5.1, the transaction is over")
    t.is_(c.cmd("NOOP")[0], 250, "in sync: its 10 octets were read and discarded")

    c.cmd(f"MAIL FROM:<{ALICE}>")
    c.cmd("RCPT TO:<rcpt@example.com>")
    c.send(b"BDAT 5\r\na\nbcd")
    t.like(c.reply()[1], r"^554 5\.6\.0 .*bare LF", "a chunk with a bare LF: 554 5.6.0 at that chunk")
    t.is_(c.cmd("NOOP")[0], 250, "in sync")

    msg = t.make_message(ALICE, "rcpt@example.com", body="ab\r\ncd\r\n")
    cut = msg.index(b"ab\r\n") + 3  # the CR ends one chunk, its LF starts the next
    c.cmd(f"MAIL FROM:<{ALICE}>")
    c.cmd("RCPT TO:<rcpt@example.com>")
    c.send(f"BDAT {cut}\r\n".encode() + msg[:cut])
    t.like(c.reply()[1], r"^250 ", "a chunk ending in CR (its LF in the next chunk): 250")
    c.send(f"BDAT {len(msg) - cut} LAST\r\n".encode() + msg[cut:])
    code, text = c.reply()
    t.like(text, t.QUEUED_RE, "and the message is queued")
    stored = queued_message(t.queued_id(text) or "") or b""
    t.ok(stored.endswith(b"\r\n\r\nab\r\ncd\r\n"), "stored byte for byte", stored[-40:])
    c.close()


@t.test("parameter corners: known parameters used wrongly get 501, a 20-digit SIZE 552")
def _():
    c = relay.session(ALICE)
    c.cmd(f"MAIL FROM:<{ALICE}>")
    t.like(c.cmd("RCPT TO:<rcpt@example.com> NOTIFY=FAILURE NOTIFY=DELAY")[1], r"^501 5\.5\.4 ",
           "NOTIFY twice: 501 5.5.4 (known parameter, used wrongly)")
    t.is_(c.cmd("RSET")[0], 250, "RSET")
    t.like(c.cmd(f"MAIL FROM:<{ALICE}> SIZE=99999999999999999999")[1], r"^552 5\.3\.4 ",
           "a 20-digit SIZE is valid (RFC 1870) and too big: 552 5.3.4")
    t.like(c.cmd(f"MAIL FROM:<{ALICE}> AUTH")[1], r"^501 5\.5\.4 ", "AUTH without a value: 501 5.5.4")
    c.send(b"BDAT 3LAST\r\n")
    t.like(c.reply()[1], r"^501 5\.5\.4 ", "BDAT 3LAST: 501 5.5.4")
    t.is_(c.cmd("NOOP")[0], 250, "in sync")
    c.close()


# --- real clients ------------------------------------------------------------------------------
def swaks_args(port, user=ALICE, pw=ALICE_PW, subject="swaks"):
    return ["--server", "127.0.0.1", "--port", str(port), "--auth-user", user, "--auth-password", pw,
            "--from", user, "--to", "x@example.com", "--header", f"Subject: {subject}"]


@t.test("swaks")
def _():
    m = marker("swaks-starttls")
    rc, out = t.swaks(swaks_args(relay.port_starttls, subject=m) + ["-tls", "--auth", "PLAIN"])
    t.is_(rc, 0, "swaks -tls --auth PLAIN on the starttls port: rc 0") or t.diag(out)
    t.like(out, r"250 2\.0\.0 Ok: queued as [0-9A-Fa-f]{16}", "swaks sees 250 queued")
    t.is_(len(find_in_queue(m)), 1, "swaks message in the queue")

    m = marker("swaks-tls")
    rc, out = t.swaks(swaks_args(relay.port_tls, subject=m) + ["--tls-on-connect", "--auth", "PLAIN"])
    t.is_(rc, 0, "swaks --tls-on-connect on the tls port: rc 0") or t.diag(out)
    t.is_(len(find_in_queue(m)), 1, "swaks --tls-on-connect message in the queue")

    rc, out = t.swaks(swaks_args(relay.port_starttls, pw="wrong") + ["-tls", "--auth", "PLAIN"])
    t.ok(rc != 0, "swaks with a wrong password fails", out)
    t.like(out, r"535 5\.7\.8", "swaks shows 535 5.7.8")

    m = marker("swaks-login")
    rc, out = t.swaks(swaks_args(relay.port_starttls, subject=m) + ["-tls", "--auth", "LOGIN"])
    t.is_(rc, 0, "swaks -tls --auth LOGIN: rc 0") or t.diag(out)
    t.is_(len(find_in_queue(m)), 1, "swaks AUTH LOGIN message in the queue")

    rc, out = t.swaks(swaks_args(relay.port_starttls) + ["--auth", "PLAIN"])
    t.ok(rc != 0, "swaks AUTH without TLS fails (AUTH not offered before STARTTLS)", out)


@t.test("curl")
def _():
    for scheme, port in (("smtp", relay.port_starttls), ("smtps", relay.port_tls)):
        m = marker(f"curl-{scheme}")
        f = os.path.join(relay.dir, f"curl-{scheme}.eml")
        with open(f, "wb") as fh:
            fh.write(t.make_message(ALICE, "x@example.com", subject=m))
        args = [f"{scheme}://127.0.0.1:{port}", "--mail-from", ALICE, "--mail-rcpt", "x@example.com",
                "--user", f"{ALICE}:{ALICE_PW}", "--upload-file", f, "--cacert", relay.ca_file, "-sS"]
        if scheme == "smtp":
            args.insert(0, "--ssl-reqd")
        rc, out = t.curl(args)
        t.is_(rc, 0, f"curl {scheme}:// (cert verified against the test CA): rc 0") or t.diag(out)
        t.is_(len(find_in_queue(m)), 1, f"curl {scheme}:// message queued")
    rc, out = t.curl(["--ssl-reqd", f"smtp://127.0.0.1:{relay.port_starttls}", "--mail-from", ALICE,
                      "--mail-rcpt", "x@example.com", "--user", f"{ALICE}:nope", "--upload-file", f,
                      "--cacert", relay.ca_file, "-sS"])
    t.ok(rc != 0, "curl with a wrong password fails", out)


@t.test("smtplib: STARTTLS, SMTP_SSL, IPv6")
def _():
    m = marker("smtplib-starttls")
    s = relay.smtp_starttls()
    s.login(ALICE, ALICE_PW)
    refused = s.sendmail(ALICE, ["x@example.com", "y@example.com"],
                         t.make_message(ALICE, "x@example.com", subject=m))
    t.is_(refused, {}, "smtplib SMTP + starttls + login + sendmail: no refused recipients")
    s.quit()
    t.is_(len(find_in_queue(m)), 1, "smtplib STARTTLS message queued")

    m = marker("smtplib-ssl")
    s = relay.smtp_ssl()
    s.login(ALICE, ALICE_PW)
    t.is_(s.sendmail(ALICE, ["x@example.com"], t.make_message(ALICE, "x@example.com", subject=m)), {},
          "smtplib SMTP_SSL + login + sendmail")
    s.quit()
    t.is_(len(find_in_queue(m)), 1, "smtplib SMTP_SSL message queued")

    try:
        s = relay.smtp_ssl()
        s.login(ALICE, "bad")
        t.ok(False, "smtplib login with a bad password raises")
    except smtplib.SMTPAuthenticationError as e:
        t.is_(e.smtp_code, 535, "smtplib login with a bad password: SMTPAuthenticationError 535")

    if relay.port_v6 is None:
        t.skip("smtplib over IPv6", "no ::1 here")
        return
    m = marker("smtplib-v6")
    s = relay.smtp_starttls(port=relay.port_v6, host="::1")
    s.login(BOB, BOB_PW)
    t.is_(s.sendmail("someone@example.net", ["x@example.com"],
                     t.make_message("someone@example.net", "x@example.com", subject=m)), {},
          "smtplib over [::1] (STARTTLS, bob as someone@example.net)")
    s.quit()
    t.is_(len(find_in_queue(m)), 1, "IPv6 message queued")
    # RFC 5321 4.1.3, 4.4: the client's IPv6 address in Received: is an IPv6 address literal
    c = relay.session(ALICE, port=relay.port_v6, host="::1")
    code, text = transaction(c, ALICE, ["rcpt@example.com"], t.make_message(ALICE, "rcpt@example.com"))
    c.close()
    qid = t.queued_id(text)
    msg = (queued_message(qid) or b"") if qid else b""
    t.is_(msg.split(b"\r\n")[0], b"Received: from client.test ([IPv6:::1])", "Received: names [IPv6:::1]")


# --- commands without progress (max_junk_commands) ----------------------------------------------
JUNK_RE = r"^421 4\.7\.0 relay\.test Too many commands without progress"


@t.test("max_junk_commands (default 100): the EHLO after STARTTLS is not counted, a successful AUTH "
        "starts the count again")
def _():
    c = relay.raw()
    try:
        c.reply()
        c.ehlo()
        t.is_(c.cmd("STARTTLS")[0], 220, "STARTTLS: 220")
        c.starttls()
        t.is_(c.ehlo()[0], 250, "EHLO after STARTTLS: 250 (RFC 3207 4.2 asks for it: not counted)")
        t.is_([c.cmd("NOOP")[0] for _ in range(100)], [250] * 100, "100 NOOPs: 250 each (neither EHLO counted)")
        t.is_(c.auth_plain(ALICE, ALICE_PW)[0], 235, "AUTH PLAIN: 235, progress")
        t.is_(c.ehlo()[0], 250, "EHLO after AUTH: 250 (a second greeting: counted, 1)")
        t.is_([c.cmd("NOOP")[0] for _ in range(99)], [250] * 99, "99 NOOPs: 250 each")
        t.like(c.cmd("NOOP")[1], JUNK_RE, "the next NOOP, the 101st command without progress since AUTH: 421 4.7.0")
        t.ok(c.eof(), "and the connection is closed")
    finally:
        c.close()


@t.test("max_junk_commands (default 100): an accepted message (DATA or BDAT LAST) starts the count again, a "
        "refused one does not; a MAIL/RSET loop is stopped at its 101st RSET")
def _():
    c = relay.session(ALICE)

    def mail_rset(n):
        codes = []
        for _ in range(n):
            codes += [c.cmd(f"MAIL FROM:<{ALICE}>")[0], c.cmd("RSET")[0]]
        return codes
    try:
        t.is_(mail_rset(100), [250, 250] * 100, "100 x MAIL, RSET: 250 each (MAIL is not counted, RSET is)")
        code, text = transaction(c, ALICE, ["rcpt@example.com"], t.make_message(ALICE, "rcpt@example.com"))
        t.like(text, t.QUEUED_RE, "a message by DATA: 250 queued, progress")
        t.is_(mail_rset(100), [250, 250] * 100, "100 x MAIL, RSET again: 250 each")
        msg = t.make_message(ALICE, "rcpt@example.com")
        c.cmd(f"MAIL FROM:<{ALICE}>")
        c.cmd("RCPT TO:<rcpt@example.com>")
        c.send(f"BDAT {len(msg)} LAST\r\n".encode() + msg)
        t.like(c.reply_text(), t.QUEUED_RE, "a message by BDAT LAST: 250 queued, progress")
        t.is_(mail_rset(100), [250, 250] * 100, "100 x MAIL, RSET again: 250 each")
        code, text = transaction(c, ALICE, ["rcpt@example.com"],
                                 t.make_message("mallory@example.com", "rcpt@example.com"))
        t.like(text, r"^553 5\.7\.1 ", "a message with a From: alice may not use: 553 5.7.1, no progress")
        t.is_(c.cmd(f"MAIL FROM:<{ALICE}>")[0], 250, "MAIL: 250")
        t.like(c.cmd("RSET")[1], JUNK_RE, "the 101st RSET since the last accepted message: 421 4.7.0")
        t.ok(c.eof(), "and the connection is closed")
    finally:
        c.close()


@t.test("max_junk_commands 1: real clients are not stopped (swaks STARTTLS and AUTH; smtplib with EHLO after "
        "STARTTLS and after AUTH, RSET between messages, NOOP)")
def _():
    r = t.Relay(extra_config="max_junk_commands 1", ipv6=False)
    r.add_user(ALICE, ALICE_PW)
    r.start()

    def queued(m):
        return [q for q, data in r.queue_files().items() if m.encode() in data]
    try:
        m = marker("junk-swaks")
        rc, out = t.swaks(swaks_args(r.port_starttls, subject=m) + ["-tls", "--auth", "PLAIN"])
        t.is_(rc, 0, "swaks -tls --auth PLAIN: rc 0") or t.diag(out)
        t.is_(len(queued(m)), 1, "swaks message queued")

        s = r.smtp_starttls()  # EHLO, STARTTLS, EHLO
        s.login(ALICE, ALICE_PW)
        t.is_(s.ehlo()[0], 250, "smtplib: EHLO again after AUTH: 250 (the one command without progress allowed)")
        marks = [marker(f"junk-smtplib-{i}") for i in range(3)]
        for i, m in enumerate(marks):
            if i:
                t.is_(s.rset()[0], 250, f"smtplib: RSET before message {i + 1}: 250")
            t.is_(s.sendmail(ALICE, ["x@example.com"], t.make_message(ALICE, "x@example.com", subject=m)), {},
                  f"smtplib: message {i + 1} accepted")
        t.is_(s.noop()[0], 250, "smtplib: NOOP after the last message: 250")
        t.is_(s.quit()[0], 221, "smtplib: QUIT: 221")
        t.is_([len(queued(m)) for m in marks], [1, 1, 1], "the three messages are queued")
        t.unlike(r.log(), r"too-many-junk-commands", "no session was ended for commands without progress")
    finally:
        t.is_(r.stop(), 0, "relayd exits 0 on SIGTERM")


# --- idle timeout (its own relayd) ---------------------------------------------------------------
@t.test("idle timeout")
def _():
    r2 = t.Relay(extra_config="timeout_idle 2s")
    r2.start()
    c = r2.raw()
    t.like(c.reply_text(), r"^220 ", "greeting")
    c.settimeout(8)
    t0 = time.monotonic()
    code, text = c.reply()
    dt = time.monotonic() - t0
    t.like(text, r"^421 4\.4\.2 ", "silent client gets 421 4.4.2")
    t.ok(1.5 <= dt <= 5.0, f"after about 2 s (took {dt:.1f} s)")
    t.ok(c.eof(3), "and the connection is closed")
    c.close()

    c = r2.raw(r2.port_tls, tls=True)
    c.reply()
    c.ehlo()
    c.settimeout(8)
    t0 = time.monotonic()
    code, text = c.reply()
    t.like(text, r"^421 4\.4\.2 ", "idle timeout on the TLS port too")
    t.ok(time.monotonic() - t0 <= 5.0, "within 5 s")
    c.close()
    rc = r2.stop()
    t.is_(rc, 0, "relayd exits 0 on SIGTERM")


# --- drain deadline (its own relayd) ------------------------------------------------------------
@t.test("drain deadline: sessions still in a transaction get 421 4.3.2 before the close (RFC 5321 3.8)")
def _():
    r3 = t.Relay(extra_config="drain_timeout 2s")
    r3.add_user(ALICE, ALICE_PW)
    r3.start()
    rcpt = r3.session(ALICE)
    rcpt.cmd(f"MAIL FROM:<{ALICE}>")
    t.is_(rcpt.cmd("RCPT TO:<x@example.com>")[0], 250, "one session has a recipient")
    data = r3.session(ALICE)
    data.cmd(f"MAIL FROM:<{ALICE}>")
    data.cmd("RCPT TO:<x@example.com>")
    t.is_(data.cmd("DATA")[0], 354, "one is in DATA")
    data.send(b"Subject: never finished\r\n\r\nhalf\r\n")
    bdat = r3.session(ALICE)
    bdat.cmd(f"MAIL FROM:<{ALICE}>")
    bdat.cmd("RCPT TO:<x@example.com>")
    bdat.send(b"BDAT 100 LAST\r\nonly part of the chunk")
    t0 = time.monotonic()
    r3.proc.terminate()
    for name, c in (("RCPT", rcpt), ("DATA", data), ("BDAT", bdat)):
        c.settimeout(8)
        code, text = c.reply()
        dt = time.monotonic() - t0
        t.like(text, r"^421 4\.3\.2 .*shutting down", f"session in {name}: 421 4.3.2 at the deadline")
        t.ok(1.5 <= dt <= 6, f"session in {name}: after about 2 s (took {dt:.1f} s)")
        t.ok(c.eof(3), f"session in {name}: then closed")
        c.close()
    t.is_(r3.stop(), 0, "relayd exits 0")
    t.like(r3.log(), r"event=drain-timeout sessions=3", "the drain timed out with the 3 sessions")


t.is_(relay.running(), True, "relayd is still running after all this")
t.is_(relay.stop(), 0, "relayd exits 0 on SIGTERM")
t.done()
