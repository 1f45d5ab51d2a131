#!/usr/bin/python3
"""test_durability - the slow groups: 50 concurrent STARTTLS clients sending 1000 messages
(each queued exactly once), and kill -9 right after a 250 and under load (every message that
got 250 is still in the queue after a restart, and relayd starts fine with it).

Run by `make check`, or by hand: top_builddir=. /usr/bin/python3 test/integration/test_durability.py
Bounded: every socket has a 10 s timeout and the load phases have a wall-clock budget.
"""
import os
import re
import sys
import threading
import time

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


t.done()
