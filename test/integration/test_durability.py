#!/usr/bin/python3
"""test_durability - the slow groups: 50 concurrent STARTTLS clients sending 1000 messages
(each queued exactly once), and kill -9 right after a 250 and under load (every message that
got 250 is still in the queue after a restart, and relayd starts fine with it). Queue files
made by hand in a stopped relayd's queue: recovery discards only those without a valid END
trailer; complete ones it cannot read or use stay where they are; a torn record or a NUL
range in the status section hides none of the records after it; times a clock ahead left
(a next attempt a year away, a creation in the future) do not park a message; relayctl queue
list shows damaged values plainly.

Run by `make check`, or by hand: top_builddir=. /usr/bin/python3 test/integration/test_durability.py
Bounded: every socket has a 10 s timeout and the load phases have a wall-clock budget.
"""
import os
import pwd
import re
import subprocess
import sys
import threading
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import relaytest as t  # noqa: E402

ALICE, ALICE_PW = "alice@example.org", "alice-secret-1"
THREADS, PER_THREAD = 50, 20
BUDGET = 100.0   # seconds for the concurrency phase (the suite must stay under 2 minutes)

ID_RE = re.compile(rb"(?m)^X-Test-Id: (\S+)\r?$")


def test_ids(relay):
    """{X-Test-Id: [queue ids holding it]} over every queue file"""
    found = {}
    for qid, data in relay.queue_files().items():
        msg = t.queue_parse(data)[1]
        for m in ID_RE.finditer(t.message_headers(msg)):
            found.setdefault(m.group(1).decode(), []).append(qid)
    return found


def complete(data):
    """a queue file with its END trailer (what a 250 promises)"""
    env, msg, trailer = t.queue_parse(data)
    return bool(env) and trailer.startswith(b"\nEND ")


# ---------------------------------------------------------------------------------------------
@t.test(f"concurrency: {THREADS} STARTTLS sessions x {PER_THREAD} messages")
def _():
    relay = t.Relay()
    relay.add_user(ALICE, ALICE_PW)
    relay.start()
    acked = {}          # test id -> queue id from the 250
    errors = []
    lock = threading.Lock()
    deadline = time.monotonic() + BUDGET

    def worker(n):
        try:
            s = relay.smtp_starttls()
            s.login(ALICE, ALICE_PW)
            for i in range(PER_THREAD):
                if time.monotonic() > deadline:
                    raise RuntimeError("out of time")
                tid = f"{n}-{i}"
                msg = t.make_message(ALICE, f"rcpt{n}@example.com", subject=f"load {tid}",
                                     extra_headers=[f"X-Test-Id: {tid}"], body="x" * 70 + "\r\n")
                s.mail(ALICE)
                s.rcpt(f"rcpt{n}@example.com")
                code, text = s.data(msg)
                qid = t.queued_id(f"{code} {text.decode('utf-8', 'replace')}")
                with lock:
                    if code == 250 and qid:
                        acked[tid] = qid
                    else:
                        errors.append(f"{tid}: {code} {text!r}")
            s.quit()
        except Exception as e:  # noqa: BLE001
            with lock:
                errors.append(f"thread {n}: {type(e).__name__}: {e}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(max(0.1, deadline + 5 - time.monotonic()))
    dt = time.monotonic() - t0
    t.ok(not any(th.is_alive() for th in threads), f"all {THREADS} clients finished ({dt:.1f} s)")
    t.is_(len(acked), THREADS * PER_THREAD, f"all {THREADS * PER_THREAD} messages got 250 queued")
    if errors:
        t.diag(f"{len(errors)} errors, first ones:\n" + "\n".join(errors[:10]))
    t.diag(f"{len(acked) / dt:.0f} messages/s with {THREADS} clients")
    found = test_ids(relay)
    want = {f"{n}-{i}" for n in range(THREADS) for i in range(PER_THREAD)}
    missing = sorted(want - set(found))
    dup = {k: v for k, v in found.items() if len(v) != 1}
    t.ok(not missing, "every X-Test-Id is in the queue", f"{len(missing)} missing: {missing[:20]}")
    t.ok(not dup, "each X-Test-Id is in exactly one queue file", str(list(dup.items())[:10]))
    t.ok(all(found.get(k, [None])[0] == v for k, v in acked.items()),
         "each message is in the queue file named by its 250's id")
    t.is_(len(set(acked.values())), len(acked), "queue ids are unique")
    t.ok(relay.running(), "relayd still running")
    t.is_(relay.stop(), 0, "relayd exits 0 on SIGTERM after the load")


@t.test("kill -9 right after a 250")
def _():
    relay = t.Relay()
    relay.add_user(ALICE, ALICE_PW)
    relay.start()
    c = relay.session(ALICE)
    body = f"kill9 body {os.getpid()} {time.time()}\r\n" + "line\r\n" * 100
    c.cmd(f"MAIL FROM:<{ALICE}>")
    c.cmd("RCPT TO:<x@example.com>")
    c.cmd("DATA")
    c.send(t.dot_stuff(t.make_message(ALICE, "x@example.com", body=body)))
    code, text = c.reply()
    relay.kill9()
    qid = t.queued_id(text)
    t.ok(qid, "250 queued before the kill", text)
    c.close()
    data = relay.queue_files().get(qid or "")
    t.ok(data is not None, "queue file present after kill -9")
    data = data or b""
    t.ok(body.encode() in t.queue_parse(data)[1], "body intact")
    t.ok(complete(data), "queue file complete (END trailer)")

    relay.start()
    t.ok(relay.running(), "relayd restarts with the message in the queue")
    data2 = relay.queue_files().get(qid or "")
    t.is_(data2 is not None and body.encode() in data2, True, "message still queued after the restart")
    s = relay.smtp_starttls()
    s.login(ALICE, ALICE_PW)
    t.is_(s.sendmail(ALICE, ["y@example.com"], t.make_message(ALICE, "y@example.com")), {},
          "a new message is accepted after the restart")
    s.quit()
    t.is_(relay.stop(), 0, "relayd exits 0 on SIGTERM")


@t.test("kill -9 under load: every message that got 250 survives")
def _():
    relay = t.Relay()
    relay.add_user(ALICE, ALICE_PW)
    relay.start()
    acked = {}
    lock = threading.Lock()
    stop = threading.Event()

    def worker(n):
        try:
            s = relay.smtp_starttls()
            s.login(ALICE, ALICE_PW)
            i = 0
            while not stop.is_set():
                tid = f"k{n}-{i}"
                i += 1
                msg = t.make_message(ALICE, "x@example.com", extra_headers=[f"X-Test-Id: {tid}"],
                                     body="y" * 70 + "\r\n")
                s.mail(ALICE)
                s.rcpt("x@example.com")
                code, text = s.data(msg)
                qid = t.queued_id(f"{code} {text.decode('utf-8', 'replace')}")
                if code == 250 and qid:
                    with lock:
                        acked[tid] = qid
        except Exception:  # noqa: BLE001  (the kill ends every session)
            pass

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(10)]
    for th in threads:
        th.start()
    t.wait_for(lambda: len(acked) >= 200, timeout=30)
    relay.kill9()
    stop.set()
    for th in threads:
        th.join(15)
    with lock:
        got = dict(acked)
    t.ok(len(got) >= 200, f"{len(got)} messages got 250 before the kill")
    relay.start()
    t.ok(relay.running(), "relayd restarts after kill -9 under load")
    found = test_ids(relay)
    lost = sorted(k for k in got if k not in found)
    t.ok(not lost, "every message that got 250 is in the queue", f"{len(lost)} lost: {lost[:20]}")
    files = relay.queue_files()
    bad = [q for q in set(got.values()) if not complete(files.get(q, b""))]
    t.ok(not bad, "their queue files are complete", str(bad[:10]))
    dup = {k: v for k, v in found.items() if len(v) != 1}
    t.ok(not dup, "no message queued twice", str(list(dup.items())[:10]))
    t.is_(relay.stop(), 0, "relayd exits 0 on SIGTERM")


# ---------------------------------------------------------------------------------------------
CRAFT_BODY = b"From: alice@example.org\r\nTo: x@example.net\r\nSubject: crafted\r\n\r\nhi\r\n"


def craft_id(n):
    """a queue id of the form relayd makes (time, then a counter)"""
    return "%08x%08x" % (int(time.time()), 0x10000001 + n)


def craft_head(qid, rcpts, created=None, frm=ALICE):
    """the envelope lines relayd writes, without size"""
    return ["RELAYD-QUEUE 1", f"id {qid}", f"created {int(time.time()) if created is None else created}",
            f"user {ALICE}", f"from {frm}", "ret -", "envid -", "body 7BIT", "smtputf8 0"] + \
        [f"rcpt 0 - {r}" for r in rcpts]


def craft(relay, qid, head, body=CRAFT_BODY, trailer=True, status=b""):
    """write a queue file by hand into a stopped relayd's queue: head lines, size, body, the
    END trailer with its CRC (or crc=wrong, or none), then the status records"""
    os.makedirs(os.path.join(relay.queue_dir, "msg"), mode=0o700, exist_ok=True)
    data = ("\n".join(head) + f"\nsize {len(body)}\n\n").encode() + body
    if trailer == "bad-crc":
        data += b"\nEND %08x\n" % (zlib.crc32(body) ^ 1)
    elif trailer:
        data += b"\nEND %08x\n" % zlib.crc32(body)
    path = os.path.join(relay.queue_dir, "msg", qid)
    with open(path, "wb") as f:
        f.write(data + status)
    return path


def sink_rcpts(sink):
    return [r for meta, _ in sink.messages() for r in meta["rcpt_tos"]]


@t.test("recovery discards only files without a valid END trailer, keeps the rest")
def _():
    sink = t.Sink()
    relay = t.Relay(extra_config=f"upstream 127.0.0.1:{sink.port} tls=none\nretry_min 1s\nretry_max 2s\n")
    relay.add_user(ALICE, ALICE_PW)
    cases = {
        "unknown-key": (craft_head, ["unk@example.net"], ["priority 5"], True),
        "no-from": (lambda q, r: [l for l in craft_head(q, r) if not l.startswith("from ")],
                    ["nofrom@example.net"], [], True),
        "version-2": (lambda q, r: ["RELAYD-QUEUE 2"] + craft_head(q, r)[1:], ["v2@example.net"], [], True),
        "bad-rcpt-line": (craft_head, ["br@example.net"], ["rcpt x"], True),
        "no-trailer": (craft_head, ["torn@example.net"], [], False),
        "bad-crc": (craft_head, ["crc@example.net"], [], "bad-crc"),
    }
    ids = {}
    for n, (name, (head, rcpts, extra, trailer)) in enumerate(cases.items()):
        ids[name] = qid = craft_id(n)
        craft(relay, qid, head(qid, rcpts) + extra, trailer=trailer)
    code, out = relay.relayctl("queue", "show", ids["no-from"], check=False)
    t.like(out, r"complete but cannot be used", f"relayctl queue show: a complete file it cannot use ({out.strip()})")
    code, out = relay.relayctl("queue", "show", ids["no-trailer"], check=False)
    t.like(out, r"incomplete", f"relayctl queue show: one without its END trailer ({out.strip()})")
    relay.start()
    t.ok(t.wait_for(lambda: "unk@example.net" in sink_rcpts(sink), 10 * t.SLOW),
         "an unknown envelope key (a newer relayd's field) is ignored: the message is delivered")
    t.ok(t.wait_for(lambda: ids["unknown-key"] not in relay.queue_ids(), 10 * t.SLOW), "and removed")
    kept = {n for n in ("no-from", "version-2", "bad-rcpt-line") if ids[n] in relay.queue_ids()}
    t.is_(sorted(kept), ["bad-rcpt-line", "no-from", "version-2"],
          "complete files it cannot use stay in the queue (a missing from, another version, a bad rcpt line)")
    t.ok(ids["no-trailer"] not in relay.queue_ids() and ids["bad-crc"] not in relay.queue_ids(),
         "files without a valid END trailer (none, bad CRC) are discarded")
    log = relay.log()
    for n in ("no-from", "version-2", "bad-rcpt-line"):
        t.ok(re.search(rf"{ids[n]} queue event=unloadable .*action=kept-in-place", log), f"{n}: logged as kept in place")
    t.ok(re.search(r"queue event=recovered messages=1 discarded=2 unloadable=3", log),
         "the recovery line counts the kept ones")
    t.is_(relay.stop(), 0, "relayd exits 0 on SIGTERM")
    relay.start()
    t.is_(sorted(n for n in cases if ids[n] in relay.queue_ids()), ["bad-rcpt-line", "no-from", "version-2"],
          "a second start keeps them too")
    t.is_(relay.stop(), 0, "relayd exits 0 on SIGTERM")
    sink.stop()


@t.test("recovery keeps a complete message it cannot open (relayd as nobody, file root's 0600)")
def _():
    if os.geteuid() != 0:
        t.skip("a file relayd cannot open", "needs root to run relayd as nobody")
        return
    nobody = pwd.getpwnam("nobody")
    sink = t.Sink()
    relay = t.Relay(extra_config=f"upstream 127.0.0.1:{sink.port} tls=none\nretry_min 1s\nretry_max 2s\n")
    relay.add_user(ALICE, ALICE_PW)
    qid = craft_id(0)
    path = craft(relay, qid, craft_head(qid, ["root0600@example.net"]))
    subprocess.run(["chown", "-R", f"{nobody.pw_uid}:{nobody.pw_gid}", relay.dir], check=True)
    os.chmod(relay.dir, 0o755)
    os.chown(path, 0, 0)
    os.chmod(path, 0o600)

    def as_nobody():
        os.setgid(nobody.pw_gid)
        os.setgroups([])
        os.setuid(nobody.pw_uid)

    relay.start(preexec_fn=as_nobody)
    t.ok(os.path.exists(path), "the file relayd cannot read is still in the queue")
    t.ok(re.search(rf"{qid} queue event=unloadable error=\"Permission denied\"", relay.log()), "logged as unloadable")
    t.is_(relay.stop(), 0, "relayd exits 0 on SIGTERM")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)   # what the admin does
    relay.start(preexec_fn=as_nobody)
    t.ok(t.wait_for(lambda: "root0600@example.net" in sink_rcpts(sink), 10 * t.SLOW),
         "once it is readable, it is delivered")
    t.is_(relay.stop(), 0, "relayd exits 0 on SIGTERM")
    sink.stop()


@t.test("recovery does not follow a link in QUEUE/msg (it runs as root): kept, logged, not delivered")
def _():
    sink = t.Sink()
    relay = t.Relay(extra_config=f"upstream 127.0.0.1:{sink.port} tls=none\nretry_min 1s\nretry_max 2s\n")
    relay.add_user(ALICE, ALICE_PW)
    qid = craft_id(0)
    path = craft(relay, qid, craft_head(qid, ["linked@example.net"]))
    outside = os.path.join(relay.dir, "outside-the-queue")
    os.rename(path, outside)        # a file in queue format somewhere else ...
    os.symlink(outside, path)       # ... and a link to it planted in the queue
    relay.start()
    t.ok(re.search(rf"{qid} queue event=unloadable .*action=kept-in-place", relay.log()),
         "the link is not loaded: logged as unloadable and kept", relay.log()[-400:])
    t.ok(os.path.islink(path) and os.path.exists(outside), "the link and its target are left as they are")
    c = relay.session(ALICE)
    c.cmd(f"MAIL FROM:<{ALICE}>")
    c.cmd("RCPT TO:<after@example.net>")
    c.cmd("DATA")
    c.send(t.dot_stuff(t.make_message(ALICE, "after@example.net")))
    t.like(c.reply()[1], t.QUEUED_RE, "a later message is queued")
    c.close()
    t.ok(t.wait_for(lambda: "after@example.net" in sink_rcpts(sink), 10 * t.SLOW),
         "and delivered: the forwarder runs")
    t.ok("linked@example.net" not in sink_rcpts(sink), "what the link points to is never forwarded")
    t.is_(relay.stop(), 0, "relayd exits 0 on SIGTERM")
    sink.stop()


def file_status(relay, qid):
    """the status section of a queue file (after the END trailer), b"" when it is gone"""
    try:
        with open(os.path.join(relay.queue_dir, "msg", qid), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return b""
    return data[data.index(b"\nEND ") + 14:]


@t.test("a torn or NUL-damaged status record does not hide the records after it")
def _():
    sink = t.Sink(["--reply-rcpt", "tb@example.net=450", "--reply-rcpt", "zb@example.net=450"])
    relay = t.Relay(extra_config=f"upstream 127.0.0.1:{sink.port} tls=none\nretry_min 1s\nretry_max 2s\n")
    relay.add_user(ALICE, ALICE_PW)
    torn, nul, tail = craft_id(1), craft_id(2), craft_id(3)
    craft(relay, torn, craft_head(torn, ["ta@example.net", "tb@example.net"]), status=b"D 1 45")
    craft(relay, nul, craft_head(nul, ["n0@example.net", "n1@example.net", "n2@example.net"]),
          status=b"D 0 250 ok\n\0\0\0\0\nD 1 250 ok\n")
    craft(relay, tail, craft_head(tail, ["za@example.net", "zb@example.net"]), status=b"\0" * 6)
    relay.start()
    t.ok(t.wait_for(lambda: b"D 0 250 " in file_status(relay, torn) and b"D 0 250 " in file_status(relay, tail),
                    10 * t.SLOW), "ta@ and za@ delivered, their D records appended")
    t.ok(t.wait_for(lambda: nul not in relay.queue_ids(), 10 * t.SLOW), "the NUL-damaged message is finished")
    got = sink_rcpts(sink)
    t.is_(sorted(r for r in got if r.startswith("n")), ["n2@example.net"],
          "only n2@ was sent: n1@'s D record after a line of NUL bytes counted")
    t.like(file_status(relay, torn).decode(), r"^D 1 45\nD 0 250 ", "after a torn record, the next starts on a new line")
    t.like(file_status(relay, tail).decode("latin-1"), r"^\0{6}\nD 0 250 ", "after a NUL range too")
    code, out = relay.relayctl("queue", "show", torn)
    t.like(out, r"<ta@example\.net>  delivered 250", "relayctl queue show: ta@ delivered")
    t.is_(relay.stop(), 0, "relayd exits 0 on SIGTERM")
    relay.start()
    deferred = rf"^\S+ {torn} forward event=deferred "
    n = len(re.findall(deferred, relay.log(), re.M))
    relay.relayctl("queue", "flush")
    t.ok(t.wait_for(lambda: len(re.findall(deferred, relay.log(), re.M)) > n, 10 * t.SLOW),
         "after a restart tb@ is tried again")
    got = sink_rcpts(sink)
    t.is_((got.count("ta@example.net"), got.count("za@example.net")), (1, 1), "ta@ and za@ are not sent again")
    t.is_(relay.stop(), 0, "relayd exits 0 on SIGTERM")
    sink.stop()


@t.test("times a clock ahead left in the queue: next attempt capped at retry_max, creation at now")
def _():
    sink = t.Sink(["--reply-rcpt", "future@example.net=450"])
    relay = t.Relay(extra_config=f"upstream 127.0.0.1:{sink.port} tls=none\nretry_min 1s\nretry_max 2s\n"
                                 "queue_lifetime 10s\n")
    relay.add_user(ALICE, ALICE_PW)
    now = int(time.time())
    year = b"T 3 %d upstream said 451\n" % (now + 365 * 86400)
    old, parked, future = craft_id(1), craft_id(2), craft_id(3)
    craft(relay, old, craft_head(old, ["old@example.net"], created=now - 6 * 86400), status=year)
    craft(relay, parked, craft_head(parked, ["parked@example.net"]), status=year)
    craft(relay, future, craft_head(future, ["future@example.net"], created=now + 10 * 86400))
    damaged = craft_id(4)
    craft(relay, damaged, craft_head(damaged, ["damaged@example.net"], created=-5))
    relay.start()
    t.ok(t.wait_for(lambda: "parked@example.net" in sink_rcpts(sink), 10 * t.SLOW),
         "a next attempt a year ahead: tried within retry_max, and delivered")

    def bounced(qid):
        return any(meta["mail_from"] == "" and qid.encode() in eml for meta, eml in sink.messages())
    t.ok(t.wait_for(lambda: bounced(old), 10 * t.SLOW),
         "past queue_lifetime with a next attempt a year ahead: expired and bounced within retry_max")
    t.ok("old@example.net" not in sink_rcpts(sink), "and not sent")
    t.ok(re.search(rf"{future} forward event=clock-skew field=created", relay.log()), "a creation in the future is logged")
    t.ok(t.wait_for(lambda: "damaged@example.net" in sink_rcpts(sink), 10 * t.SLOW),
         "a creation time of -5 (damaged) counts from now too: delivered, not expired")
    t.ok(not bounced(damaged), "and not bounced")
    t.ok(t.wait_for(lambda: bounced(future), 30 * t.SLOW),
         "created 10 days ahead, refused with 450: it expires queue_lifetime after the start")
    t.ok(t.wait_for(lambda: not ({old, parked, future, damaged} & relay.queue_ids()), 10 * t.SLOW),
         "all four leave the queue")
    t.is_(relay.stop(), 0, "relayd exits 0 on SIGTERM")
    sink.stop()


@t.test("relayctl queue list: damaged times and counts do not show as huge numbers")
def _():
    relay = t.Relay()
    now = int(time.time())
    neg_t, neg_created, old = craft_id(1), craft_id(2), craft_id(3)
    craft(relay, neg_t, craft_head(neg_t, ["a@example.net"]), status=b"T -1 -100 x\n")
    craft(relay, neg_created, craft_head(neg_created, ["b@example.net"], created=-5))
    craft(relay, old, craft_head(old, ["c@example.net"], created=now - 200 * 86400))
    code, out = relay.relayctl("queue", "list")
    rows = {l.split()[0]: l for l in out.splitlines() if l[:16] in (neg_t, neg_created, old)}
    t.is_(len(rows), 3, "three rows")
    t.is_(rows.get(neg_t, "").split()[4:5], ["0"], "a T record with -1 attempts is ignored: TRIES 0")
    t.is_(rows.get(neg_created, "").split()[1:2], ["?"], "a created time of -5 shows AGE ?")
    t.is_(rows.get(old, "").split()[1:2], ["200d"], "200 days show as 200d")
    t.is_({l.index("<") for l in rows.values()}, {out.splitlines()[0].index("FROM")}, "the columns stay aligned")


t.done()
