#!/usr/bin/env python3
"""test_faults - relayd when the world around it breaks (issue 7).

- disk full during DATA: the queue on a 2 MB tmpfs (a loop-mounted 2 MB image when tmpfs
  cannot be mounted); a big message gets 452 4.3.1 and leaves nothing in queue/msg, a small
  one is accepted afterwards;
- disk full while the forwarder appends a status record (a failed write, a short one): the
  message stays in relayd and keeps being retried, a recipient delivered is not sent again,
  the file holds no torn record, and the records land (backoff) once space is free;
- the user database unreadable, then read-only (0000, 0400 on relayd.db, -wal, -shm; relayd
  runs as `nobody` so the modes bind): AUTH gets 454 4.7.0 (or works read-only), never 535;
- upstreams that accept and never answer, drop the connection in the middle of DATA, or send
  malformed replies (a small asyncio server below): relayd defers, keeps the message, and
  delivers it once a good upstream (tools/capture-sink) is configured;
- kill -9 at random moments under load, five times: every message that got 250 reaches the
  upstream at least once.
Needs root for mount(8) (or unshare(1) user namespaces); bounded: about two minutes.
"""

import asyncio
import atexit
import os
import random
import re
import smtplib
import subprocess
import threading
import time

import relaytest as t

ALICE, ALICE_PW = "alice@example.org", "alice-pw-7"
RETRY = "retry_min 1s\nretry_max 2s\n"
SLOW = t.SLOW


def submit(relay, subject, body="Hello.\r\n", rcpt="bob@example.net"):
    """(code, text) of DATA for one message over STARTTLS + AUTH (smtplib); rcpt: one
    address or a list"""
    rcpts = rcpt if isinstance(rcpt, list) else [rcpt]
    c = relay.smtp_starttls()
    try:
        c.login(ALICE, ALICE_PW)
        c.mail(ALICE)
        for r in rcpts:
            c.rcpt(r)
        code, resp = c.data(t.make_message(ALICE, rcpts[0], subject=subject, body=body))
        try:
            c.quit()
        except smtplib.SMTPException:
            pass
        return code, resp.decode("utf-8", "replace")
    finally:
        c.close()


def sink_subjects(sink):
    out = []
    for meta, eml in sink.messages():
        m = re.search(rb"(?im)^Subject: ([^\r\n]*)", eml)
        if m:
            out.append(m.group(1).decode())
    return out


# --------------------------------------------------------------------------------------------
# disk full
# --------------------------------------------------------------------------------------------

_mounts = []


def _umount_all():
    for d in reversed(_mounts):
        subprocess.run(["umount", "-l", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    del _mounts[:]


atexit.register(_umount_all)  # runs before relaytest's cleanup removes the folders


def small_fs(path, size_kb=2048):
    """mount a size_kb file system on path: tmpfs, else a loop-mounted ext4 image; the way
    used, or raise"""
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", path],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode == 0:
        _mounts.append(path)
        return "tmpfs"
    img = path.rstrip("/") + ".img"
    with open(img, "wb") as f:
        f.truncate(size_kb * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", img], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    r2 = subprocess.run(["mount", "-o", "loop", img, path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r2.returncode != 0:
        raise RuntimeError(f"cannot mount a small file system: tmpfs: {r.stdout!r}; loop: {r2.stdout!r}")
    _mounts.append(path)
    return "ext4 image"


@t.test("disk full during DATA")
def _():
    relay = t.Relay(extra_config="max_message_size 3M\n")
    relay.add_user(ALICE, ALICE_PW)
    how = small_fs(relay.queue_dir)
    t.diag(f"queue on a 2 MB {how}")
    relay.start()
    big = ("x" * 76 + "\r\n") * (2600 * 1024 // 78)   # 2.6 MB
    try:
        code, text = submit(relay, "big", body=big)
    except smtplib.SMTPResponseException as e:
        code, text = e.smtp_code, e.smtp_error.decode("utf-8", "replace")
    t.is_(code, 452, f"a 2.6 MB message on a 2 MB queue: 452 ({text})")
    t.like(f"{code} {text}", r"^452 4\.3\.1 ", "452 4.3.1 Insufficient system storage")
    left = relay.queue_files()
    t.is_(sorted(left), [], "no half-written file remains in queue/msg")
    code, text = submit(relay, "small after the big one")
    t.is_(code, 250, f"a small message afterwards is accepted ({text})")
    qid = t.queued_id(f"{code} {text}")
    t.ok(qid in relay.queue_ids(), "and it is in the queue")
    # fill the disk from outside, then free it again
    filler = os.path.join(relay.queue_dir, "filler")
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    try:
        code, text = submit(relay, "small on a full disk")
    except smtplib.SMTPResponseException as e:
        code, text = e.smtp_code, e.smtp_error.decode("utf-8", "replace")
    t.is_(code, 452, f"a small message on a full disk: 452 ({text})")
    t.is_(sorted(relay.queue_ids()), [qid], "nothing half-written left beside the accepted message")
    os.unlink(filler)
    code, text = submit(relay, "small after space frees")
    t.is_(code, 250, f"once space is free a small message is accepted ({text})")
    t.ok(relay.running(), "relayd is running")
    t.is_(relay.stop(), 0, "relayd exits 0 on SIGTERM")
    _umount_all()


def fill_fs(path):
    """fill the file system of path to the last byte with the file path; tmpfs then refuses
    any write that needs a new page, and a file ending inside its last page can still grow
    up to that page's end"""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)


def queue_file_ending_at(relay, rcpts, end):
    """queue a message whose file is `end` bytes long (the message grows to fit); its id"""
    line = "x" * 70 + "\r\n"
    body = line * 80
    for _ in range(4):
        code, text = submit(relay, "disk full append", body=body, rcpt=rcpts)
        qid = t.queued_id(f"{code} {text}")
        if code != 250 or not qid:
            raise RuntimeError(f"message not queued: {code} {text}")
        path = os.path.join(relay.queue_dir, "msg", qid)
        delta = end - os.path.getsize(path)
        if delta == 0:
            return qid
        relay.relayctl("queue", "delete", qid)
        size = len(body) + delta
        n = size // len(line) - 1
        body = "x" * (size - len(line) * n - 2) + "\r\n" + line * n
    raise RuntimeError(f"cannot make a queue file of {end} bytes")


def status_records(relay, qid):
    """the status lines after the END trailer of a queue file"""
    with open(os.path.join(relay.queue_dir, "msg", qid), "rb") as f:
        data = f.read()
    return data[data.index(b"\nEND ") + 14:].decode("utf-8", "replace").splitlines()


def count_log(relay, regex):
    return len(re.findall(regex, relay.log(), re.M))


def disk_full_append(torn):
    """a@ is delivered, b@ gets 450, while the queue's disk is full: the file ends `torn`
    bytes before a page boundary, so the append of the D record writes `torn` bytes and fails
    (0: fails at once)"""
    sink = t.Sink(["--reply-rcpt", "b@example.net=450"])
    relay = t.Relay(extra_config=RETRY)   # no upstream yet: the message waits
    relay.add_user(ALICE, ALICE_PW)
    small_fs(relay.queue_dir, 1024)
    relay.start()
    qid = queue_file_ending_at(relay, ["a@example.net", "b@example.net"], 8192 - torn)
    filler = os.path.join(relay.queue_dir, "filler")
    fill_fs(filler)
    relay.write_config(f"upstream 127.0.0.1:{sink.port} tls=none\n" + RETRY)
    relay.relayctl("reload")
    deferred = rf"^\S+ {qid} forward event=deferred "
    t.ok(t.wait_for(lambda: count_log(relay, deferred) >= 4, 20 * SLOW),
         f"torn={torn}: disk full: b@ keeps being retried (4 deferrals)")
    got = [r for meta, _ in sink.messages() for r in meta["rcpt_tos"]]
    t.is_(got.count("a@example.net"), 1, f"torn={torn}: a@ was delivered once while the disk was full")
    t.ok(re.search(rf"{qid} forward event=queue-error op=append .* retry=1s", relay.log()) and
         re.search(rf"{qid} forward event=queue-error op=append .* retry=2s", relay.log()),
         f"torn={torn}: the records are written again with a backoff (retry_min, then retry_max)")
    t.ok(re.search(rf"{qid} forward event=queue-error op=append error=\"No space left on device\"", relay.log()),
         f"torn={torn}: the failed append is logged with its real error")
    t.ok(not re.search(rf"{qid} forward event=vanished", relay.log()), f"torn={torn}: not taken as vanished")
    t.is_(status_records(relay, qid), [], f"torn={torn}: nothing torn is left in the file")
    os.unlink(filler)
    t.ok(t.wait_for(lambda: any(r.startswith("D 0 250 ") for r in status_records(relay, qid)), 10 * SLOW),
         f"torn={torn}: once space is free, a@'s D record is written")
    t.ok(t.wait_for(lambda: any(r.startswith("T ") for r in status_records(relay, qid)), 10 * SLOW),
         f"torn={torn}: and a T record")
    recs = status_records(relay, qid)
    t.ok(all(re.match(r"^(D \d+ \d{3} |T \d+ \d+ )", r) for r in recs), f"torn={torn}: every record whole: {recs}")
    t.is_(relay.stat("queued"), 1, f"torn={torn}: relayd still holds the message")
    relay.stop()
    n = count_log(relay, deferred)
    relay.start()
    t.ok(t.wait_for(lambda: count_log(relay, deferred) > n, 10 * SLOW), f"torn={torn}: after a restart b@ is tried again")
    got = [r for meta, _ in sink.messages() for r in meta["rcpt_tos"]]
    t.is_(got.count("a@example.net"), 1, f"torn={torn}: and a@ is not sent again")
    t.is_(relay.stop(), 0, "relayd exits 0 on SIGTERM")
    sink.stop()
    _umount_all()


@t.test("disk full while a status record is appended (failing at once)")
def _():
    disk_full_append(0)


@t.test("disk full while a status record is appended (a short write)")
def _():
    disk_full_append(10)


# --------------------------------------------------------------------------------------------
# read-only database
# --------------------------------------------------------------------------------------------

@t.test("user database read-only: AUTH is a temporary failure")
def _():
    # relayd runs as nobody (root ignores file modes); the database sits in a folder nobody
    # owns, as SQLite creates relayd.db-wal and -shm next to it
    relay = t.Relay(extra_config="user nobody\ndatabase db/relayd.db\n")
    os.chmod(relay.dir, 0o755)
    dbdir = os.path.join(relay.dir, "db")
    os.mkdir(dbdir, 0o700)
    import pwd
    pw = pwd.getpwnam("nobody")
    os.chown(dbdir, pw.pw_uid, pw.pw_gid)
    relay.add_user(ALICE, ALICE_PW)
    relay.start()
    db = os.path.join(dbdir, "relayd.db")
    files = [db + x for x in ("", "-wal", "-shm") if os.path.exists(db + x)]

    def auth(pw):
        c = relay.raw()
        c.reply()
        c.ehlo()
        c.cmd("STARTTLS")
        c.starttls()
        c.ehlo()
        code, text = c.auth_plain(ALICE, pw)
        c.close()
        return code, text

    # relayd opens the database at the first AUTH: an unreadable one is a temporary failure
    for f in files:
        os.chmod(f, 0o000)
    code, text = auth(ALICE_PW)
    t.like(text, r"^454 4\.7\.0 ", "database unreadable: the right password gets 454 4.7.0, not 535")
    code, text = auth("wrong")
    t.like(text, r"^454 4\.7\.0 ", "and a wrong one is not called wrong either (454 4.7.0)")
    t.ok(relay.running(), "relayd keeps running")
    # read-only (0400): AUTH only reads, so it may work; it must never turn into 535
    for f in files:
        os.chmod(f, 0o400)
    code, text = auth(ALICE_PW)
    t.ok(code in (235, 454), f"database read-only: the right password gets 235 or 454, not 535 ({text})")
    for f in [db + x for x in ("", "-wal", "-shm") if os.path.exists(db + x)]:
        os.chmod(f, 0o600)   # -shm may have been created meanwhile, 0400 like the database
    code, text = auth(ALICE_PW)
    t.is_(code, 235, f"AUTH works once the database is writable again ({text})")
    code, text = auth("wrong")
    t.is_(code, 535, f"and a wrong password is refused for what it is ({text})")
    t.is_(relay.stop(), 0, "relayd exits 0 on SIGTERM")


# --------------------------------------------------------------------------------------------
# bad upstreams
# --------------------------------------------------------------------------------------------

class BadUpstream(t.AsyncServer):
    """an SMTP server on 127.0.0.1 that misbehaves in one way (mode):
    silent     accepts connections and never sends a byte
    drop-data  a normal dialogue up to 354, then closes after some of the body
    malformed  220 greeting, then replies that are not SMTP
    """

    def __init__(self, mode):
        self.mode = mode
        self.connections = 0
        t.AsyncServer.__init__(self)

    async def _client(self, reader, writer):
        self.connections += 1
        try:
            if self.mode == "silent":
                await asyncio.sleep(3600)
                return
            writer.write(b"220 bad.test ESMTP\r\n")
            if self.mode == "malformed":
                await reader.readline()          # EHLO
                writer.write(b"250-bad.test\r\n25O PIPELINING\r\nhello there\r\n")
                await writer.drain()
                await asyncio.wait_for(reader.read(1), 30)
                return
            while True:
                line = await asyncio.wait_for(reader.readline(), 30)
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-bad.test\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    await reader.read(100)       # a little of the body, then hang up
                    return
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (asyncio.TimeoutError, asyncio.CancelledError, ConnectionError):
            pass
        finally:
            writer.close()



def bad_upstream_case(mode, fail_log):
    bad = BadUpstream(mode)
    # upstream_timeout: the forwarder's wait for each reply (RFC 5321's minutes by default)
    relay = t.Relay(extra_config=f"upstream 127.0.0.1:{bad.port} tls=none\nupstream_timeout 3s\n" + RETRY)
    relay.add_user(ALICE, ALICE_PW)
    relay.start()
    code, text = submit(relay, f"to a {mode} upstream")
    qid = t.queued_id(f"{code} {text}")
    t.is_(code, 250, f"{mode}: message accepted")
    found = t.wait_for(lambda: re.search(fail_log, relay.log()), 25 * SLOW, 0.2)
    t.ok(found, f"{mode}: relayd notices the bad upstream ({fail_log})")
    t.ok(bad.connections >= 1, f"{mode}: relayd did connect to it ({bad.connections})")
    t.ok(qid in relay.queue_ids(), f"{mode}: the message stays queued")
    t.unlike(relay.log(), rf"{qid} forward event=(delivered|failed|bounce)", f"{mode}: not delivered, failed or bounced")
    t.is_(relay.stop(), 0, f"{mode}: relayd exits 0 on SIGTERM")
    bad.stop()
    # a good upstream now: the message from the queue arrives
    sink = t.Sink()
    relay.write_config(f"upstream 127.0.0.1:{sink.port} tls=none\n" + RETRY)
    relay.start()
    got = t.wait_for(lambda: f"to a {mode} upstream" in sink_subjects(sink), 20 * SLOW, 0.2)
    t.ok(got, f"{mode}: delivered to the good upstream after a restart")
    t.ok(t.wait_for(lambda: qid not in relay.queue_ids(), 10 * SLOW), f"{mode}: and removed from the queue")
    t.is_(relay.stop(), 0, f"{mode}: relayd exits 0 on SIGTERM")
    sink.stop()


@t.test("an upstream that accepts and never answers")
def _():
    bad_upstream_case("silent", r"forward event=upstream-failed .*(timeout|time)")


@t.test("an upstream that drops the connection in the middle of DATA")
def _():
    bad_upstream_case("drop-data", r"forward event=(upstream-failed|deferred)")


@t.test("an upstream that sends malformed replies")
def _():
    bad_upstream_case("malformed", r"forward event=upstream-failed .*malformed")


# --------------------------------------------------------------------------------------------
# kill -9 under load
# --------------------------------------------------------------------------------------------

@t.test("kill -9 at random moments under load, five times: at least once delivery")
def _():
    sink = t.Sink()
    relay = t.Relay(extra_config=f"upstream 127.0.0.1:{sink.port} tls=none\n" + RETRY)
    relay.add_user(ALICE, ALICE_PW)
    relay.start()
    acked = set()
    lock = threading.Lock()
    counter = [0]
    rnd = random.Random(os.getpid())

    def client(stop):
        while not stop.is_set():
            with lock:
                counter[0] += 1
                subj = f"k9-{counter[0]}"
            try:
                c = smtplib.SMTP("127.0.0.1", relay.port_starttls, local_hostname="client.test", timeout=5 * SLOW)
                c.starttls(context=relay.ssl_context())
                c.login(ALICE, ALICE_PW)
                c.mail(ALICE)
                c.rcpt("bob@example.net")
                code, _ = c.data(t.make_message(ALICE, "bob@example.net", subject=subj,
                                                body="line\r\n" * rnd.randint(1, 200)))
                if code == 250:
                    with lock:
                        acked.add(subj)
                c.close()
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)

    for round_ in range(5):
        stop = threading.Event()
        ths = [threading.Thread(target=client, args=(stop,), daemon=True) for _ in range(4)]
        before = len(acked)
        for th in ths:
            th.start()
        # at least one 250 in every round (slow under valgrind), then a random moment
        t.wait_for(lambda: len(acked) > before, 30 * SLOW, 0.05)
        time.sleep(rnd.uniform(0.2, 1.5))
        relay.kill9()
        stop.set()
        for th in ths:
            th.join(10 * SLOW)
        relay.start()
    t.diag(f"{len(acked)} messages got 250 across 5 kill -9 rounds")
    t.ok(len(acked) >= 5, f"load was real: {len(acked)} messages acknowledged")

    def missing():
        got = set(sink_subjects(sink))
        return acked - got
    t.wait_for(lambda: not missing(), 60 * SLOW, 0.5)
    miss = missing()
    t.ok(not miss, f"every acknowledged message reached the upstream ({len(acked) - len(miss)}/{len(acked)})",
         sorted(miss)[:20])
    subj = sink_subjects(sink)
    dups = len(subj) - len(set(subj))
    t.diag(f"duplicates at the upstream (allowed: at least once): {dups}")
    t.ok(t.wait_for(lambda: not relay.queue_ids(), 20 * SLOW), "the queue empties")
    t.is_(relay.stop(), 0, "relayd exits 0 on SIGTERM")
    sink.stop()


t.done()
