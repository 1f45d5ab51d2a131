"""test_operations - issue 5: reload under load with no failed session, a bad reload refused,
SIGTERM during a DATA transfer (the message still gets its 250), a second SIGTERM, metrics
scraped with curl and parsed, relayctl stats/reload through the control socket, and the
privilege drop seen on the running process (when the tests run as root).
"""
import grp
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import relaytest as t  # noqa: E402

USER = "ops@example.org"
PW = "ops password"

metrics_port = t.free_port()
relay = t.Relay(extra_config=f"metrics 127.0.0.1:{metrics_port}\ndrain_timeout 20s\n")
relay.add_user(USER, PW)
relay.start()


def nobody_relay(extra="", as_nobody=True):
    """a Relay (not started) that drops to user nobody (as_nobody), with extra config; its
    folder searchable by others, so that nobody reaches the database and queue inside"""
    r = t.Relay(extra_config=("user nobody\n" if as_nobody else "") + extra)
    os.chmod(r.dir, 0o755)
    return r


def one_message(r, tag):
    c = r.session(USER)
    try:
        for line, want in ((f"MAIL FROM:<{USER}>", 250), ("RCPT TO:<x@example.net>", 250), ("DATA", 354)):
            code, text = c.cmd(line)
            if code != want:
                return text
        c.send(t.dot_stuff(t.make_message(USER, "x@example.net", subject=tag)))
        code, text = c.reply()
        c.cmd("QUIT")
        return text
    finally:
        c.close()


def connect_refused():
    try:
        socket.create_connection(("127.0.0.1", relay.port_starttls), timeout=2).close()
        return False
    except OSError:
        return True


PROM_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
PROM_SAMPLE = re.compile(rf'^({PROM_NAME})(?:\{{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*)\}})? (\S+)$')


def prom_family(name, types):
    """the family a sample belongs to: a histogram's _bucket/_sum/_count are its own"""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[:-len(suffix)]
        if name.endswith(suffix) and types.get(base) in ("histogram", "summary"):
            return base
    return name


def prom_check(text):
    """strict checks of Prometheus text format 0.0.4: each family one group of samples, after
    its HELP and TYPE (once each); label values escaped; counters named ..._total and gauges
    not; no _ms units; histogram buckets ascending, cumulative, ending in +Inf == _count
    (histograms without other labels). Returns [error, ...]"""
    errs, helps, types, done, hists, series = [], {}, {}, set(), {}, set()
    cur = None
    for i, line in enumerate(text.split("\n"), 1):
        m = re.match(rf"^# (HELP|TYPE) ({PROM_NAME}) (.*)$", line)
        if m:
            kind, name, rest = m.groups()
            seen = helps if kind == "HELP" else types
            if name in seen:
                errs.append(f"{i}: a second {kind} for {name}")
            if name in done or name == cur:
                errs.append(f"{i}: {kind} for {name} after its samples")
            if kind == "TYPE" and rest not in ("counter", "gauge", "histogram", "summary", "untyped"):
                errs.append(f"{i}: unknown type {rest!r}")
            seen[name] = rest
            continue
        if not line or line.startswith("#"):
            continue
        m = PROM_SAMPLE.match(line)
        if not m:
            errs.append(f"{i}: not a sample line: {line!r}")
            continue
        name, labels, value = m.groups()
        try:
            v = float(value)
        except ValueError:
            errs.append(f"{i}: not a number: {line!r}")
            continue
        if (name, labels) in series:
            errs.append(f"{i}: a second sample of {name}{{{labels or ''}}}")
        series.add((name, labels))
        fam = prom_family(name, types)
        if fam != cur:
            if fam in done:
                errs.append(f"{i}: the samples of {fam} are not one group")
            if cur:
                done.add(cur)
            cur = fam
        if fam not in helps or fam not in types:
            errs.append(f"{i}: {fam} has no HELP or no TYPE before its samples")
        if (types.get(fam) == "counter") != name.endswith("_total"):
            errs.append(f"{i}: {name} is a {types.get(fam)}: only counters end in _total, and all of them")
        if re.search(r"_ms(_|$)", fam):
            errs.append(f"{i}: {fam} is not in base units (seconds)")
        if types.get(fam) == "histogram":
            h = hists.setdefault(fam, {"buckets": [], "count": None})
            le = re.search(r'le="([^"]*)"', labels or "")
            if name.endswith("_bucket") and le:
                h["buckets"].append((float(le.group(1)), v))
            elif name.endswith("_count"):
                h["count"] = v
    for fam, h in hists.items():
        les, counts = [le for le, _ in h["buckets"]], [c for _, c in h["buckets"]]
        if not les or les != sorted(les) or counts != sorted(counts):
            errs.append(f"{fam}: buckets not ascending and cumulative: {h['buckets']}")
        elif les[-1] != float("inf") or counts[-1] != h["count"]:
            errs.append(f"{fam}: the last bucket is not +Inf == _count ({h['buckets'][-1]}, count {h['count']})")
    return errs


def prom_scrape(port):
    """the /metrics body, and {sample name with labels: value}"""
    rc, out = t.curl(["-s", f"http://127.0.0.1:{port}/metrics"])
    samples = {}
    for line in out.splitlines():
        m = PROM_SAMPLE.match(line)
        if m and not line.startswith("#"):
            samples[m.group(1) + (f"{{{m.group(2)}}}" if m.group(2) is not None else "")] = float(m.group(3))
    return out, samples


@t.test("SIGHUP under load: every session of 4 clients x 15 messages succeeds")
def _():
    results = []
    lock = threading.Lock()

    def client(n):
        for i in range(15):
            text = one_message(relay, f"reload-{n}-{i}")
            with lock:
                results.append(text)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    for i in range(5):  # one at a time: signals sent together may be delivered as one
        time.sleep(0.2)
        os.kill(relay.proc.pid, signal.SIGHUP)
        t.wait_for(lambda: len(re.findall(r"event=reloaded", relay.log())) > i, 5 * t.SLOW)
    for th in threads:
        th.join(60)
    good = sum(1 for r in results if t.queued_id(r))
    t.is_(good, 60, "all 60 messages queued while reloading")
    t.ok(len(re.findall(r"event=reloaded", relay.log())) >= 5, "five reloads logged")


@t.test("a bad config on SIGHUP is refused and the old one kept")
def _():
    with open(relay.conf) as f:
        good = f.read()
    with open(relay.conf, "a") as f:
        f.write("no_such_directive 1\n")
    os.kill(relay.proc.pid, signal.SIGHUP)
    t.wait_for(lambda: "reload-failed" in relay.log(), timeout=5)
    t.like(relay.log(), r"event=reload-failed error=\".*relayd\.conf:\d+: unknown directive", "error logged with file:line")
    with open(relay.conf, "w") as f:
        f.write(good)
    t.like(one_message(relay, "after-bad-reload"), t.QUEUED_RE, "still serving with the old config")


@t.test("relayctl reload and stats through the control socket")
def _():
    rc, out = relay.relayctl("reload")
    t.like(out, r"reloaded", "relayctl reload")
    rc, out = relay.relayctl("stats")
    t.like(out, r"(?m)^messages_accepted=\d+", "stats has counters")
    t.like(out, rf"(?m)^user={re.escape(USER)} accepted=\d+", "stats has per-user counters")


@t.test("metrics scraped with curl are valid Prometheus text and count what happened")
def _():
    rc, out = t.curl(["-s", f"http://127.0.0.1:{metrics_port}/metrics"])
    t.is_(rc, 0, "curl exit 0")
    samples = {}
    bad = []
    for line in out.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (-?[0-9.eE+]+)$", line)
        if not m:
            bad.append(line)
            continue
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    t.is_(bad, [], "every sample line parses")
    t.is_(prom_check(out), [], "strict format check (families grouped, HELP and TYPE, _total, buckets)")
    t.ok(samples.get("relayd_messages_accepted_total", 0) >= 61, "accepted counter >= 61",
         str(samples.get("relayd_messages_accepted_total")))
    t.ok(samples.get("relayd_auth_success_total", 0) >= 61, "auth successes counted")
    t.ok("relayd_sessions" in samples, "sessions gauge present")
    accepted = samples.get("relayd_messages_accepted_total")
    t.is_(samples.get("relayd_commit_seconds_count"), accepted, "one commit latency per accepted message")
    for h in ("commit", "accept_to_250"):
        buckets = [(k, v) for k, v in samples.items() if k.startswith(f"relayd_{h}_seconds_bucket{{")]
        counts = [v for _, v in buckets]
        t.ok(len(buckets) > 10 and counts == sorted(counts), f"{h}: buckets are cumulative", str(buckets[:3]))
        t.is_(samples.get(f'relayd_{h}_seconds_bucket{{le="+Inf"}}'), samples.get(f"relayd_{h}_seconds_count"),
              f"{h}: +Inf bucket == count")
    n = samples.get("relayd_accept_to_250_seconds_count", 0)
    t.ok(0 < n <= accepted, "accept-to-250: one per session that got a message accepted", f"{n} of {accepted}")
    t.ok(0 < samples.get("relayd_commit_seconds_sum", 0) < 60 * accepted, "commit seconds summed")
    rc, out = relay.relayctl("stats")
    m = re.search(r"(?m)^accept_to_250_p99_ms=([0-9.]+)$", out)
    t.ok(m and float(m.group(1)) > 0, "relayctl stats has the accept-to-250 p99", m.group(0) if m else out[-300:])


@t.test("metrics with two upstreams: each upstream family is one group (HELP, TYPE, a line per upstream); "
        "forwarder counters end in _total; latency in seconds")
def _():
    sink = t.Sink()
    dead = t.free_port()
    mport = t.free_port()
    r = t.Relay(extra_config=f"metrics 127.0.0.1:{mport}\nupstream 127.0.0.1:{sink.port} tls=none\n"
                f"upstream 127.0.0.1:{dead} tls=none\n", ipv6=False)
    r.add_user(USER, PW)
    r.start()
    try:
        c = r.session(USER)
        for line in (f"MAIL FROM:<{USER}>", "RCPT TO:<a@example.net>", "RCPT TO:<b@example.net>", "DATA"):
            c.cmd(line)
        c.send(t.dot_stuff(t.make_message(USER, "a@example.net", subject="two upstreams")))
        t.like(c.reply()[1], t.QUEUED_RE, "message queued")
        c.close()
        names = [f"127.0.0.1:{sink.port}", f"127.0.0.1:{dead}"]
        t.ok(t.wait_for(lambda: prom_scrape(mport)[1].get(f'relayd_upstream_messages_total{{upstream="{names[0]}"}}') == 1,
                        10 * t.SLOW), "the first upstream's message counter reaches 1")
        out, samples = prom_scrape(mport)
        t.is_(prom_check(out), [], "strict format check")
        families = [l.split()[2] for l in out.splitlines() if l.startswith("# TYPE relayd_upstream_")]
        t.ok(len(families) >= 8, "per-upstream families have TYPE lines", str(families))
        for fam in families:
            labels = re.findall(rf'(?m)^{fam}{{upstream="([^"]*)"}} \S+$', out)
            t.is_(labels, names, f"{fam}: one line per upstream, in order")
        types = dict(l.split()[2:4] for l in out.splitlines() if l.startswith("# TYPE "))
        for fam in ("relayd_forward_forwarded_total", "relayd_forward_rcpt_delivered_total", "relayd_forward_deferrals_total",
                    "relayd_upstream_messages_total", "relayd_upstream_recipients_total", "relayd_upstream_connects_total",
                    "relayd_upstream_failures_total"):
            t.is_(types.get(fam), "counter", f"{fam} is a counter")
        t.is_(samples.get("relayd_forward_rcpt_delivered_total"), 2.0, "two recipients delivered")
        t.is_(samples.get(f'relayd_upstream_recipients_total{{upstream="{names[0]}"}}'), 2.0, "by the first upstream")
        last = samples.get(f'relayd_upstream_latency_last_seconds{{upstream="{names[0]}"}}')
        t.ok(last is not None and 0 <= last < 10 * t.SLOW, "the last transaction's time is in seconds", str(last))
        rc, kv = r.relayctl("stats")
        t.like(kv, r"(?m)^upstream\.0\.latency_last_ms=\d+$", "relayctl stats keeps its key=value names (ms)")
        t.like(kv, r"(?m)^forwarded=1$", "relayctl stats: forwarded=1")
    finally:
        r.stop()
        sink.stop()


@t.test("relayd_messages_rejected_total counts a refused sender, SIZE=, From: header and rate limit")
def _():
    mport = t.free_port()
    r = t.Relay(extra_config=f"metrics 127.0.0.1:{mport}\nlimit_msgs 1/hour\n", ipv6=False)
    r.add_user(USER, PW)
    r.start()

    def rejected():
        return prom_scrape(mport)[1].get("relayd_messages_rejected_total")

    def data(c, frm):
        c.cmd("DATA")
        c.send(t.dot_stuff(t.make_message(frm, "x@example.net", subject="rejected")))
        return c.reply()

    try:
        c = r.session(USER)
        n = rejected()
        t.is_(n, 0.0, "none at start")
        t.like(c.cmd("MAIL FROM:<mallory@example.org>")[1], r"^553 5\.7\.1 ", "disallowed sender: 553")
        t.is_(rejected(), n + 1, "counted")
        t.like(c.cmd(f"MAIL FROM:<{USER}> SIZE=2000000")[1], r"^552 5\.3\.4 ", "SIZE= over the limit: 552")
        t.is_(rejected(), n + 2, "counted")
        c.cmd(f"MAIL FROM:<{USER}>")
        c.cmd("RCPT TO:<x@example.net>")
        t.like(data(c, "mallory@example.org")[1], r"^553 5\.7\.1 ", "From: header not allowed: 553")
        t.is_(rejected(), n + 3, "counted")
        c.cmd(f"MAIL FROM:<{USER}>")
        c.cmd("RCPT TO:<x@example.net>")
        t.like(data(c, USER)[1], t.QUEUED_RE, "a message accepted (the hour's one)")
        t.is_(rejected(), n + 3, "not counted")
        t.like(c.cmd(f"MAIL FROM:<{USER}>")[1], r"^450 4\.7\.1 ", "over limit_msgs: 450")
        t.is_(rejected(), n + 4, "counted")
        c.close()
    finally:
        r.stop()


@t.test("listeners are logged as relayd.conf writes them: [::1]:PORT for IPv6, 127.0.0.1:PORT for IPv4")
def _():
    log = relay.log()
    t.like(log, rf"listener event=listening address=127\.0\.0\.1:{relay.port_starttls} mode=starttls", "IPv4 as is")
    if not relay.port_v6:
        t.skip("IPv6 listener logged in brackets", "no ::1 here")
        return
    t.like(log, rf"listener event=listening address=\[::1\]:{relay.port_v6} mode=starttls", "IPv6 in brackets")


@t.test("a reload that changes pidfile keeps the first one (removed at exit), not the new path")
def _():
    r = t.Relay(ipv6=False)
    first, second = os.path.join(r.dir, "first.pid"), os.path.join(r.dir, "second.pid")
    with open(second, "w") as f:
        f.write("not relayd's\n")
    r.write_config(f"pidfile {first}\n")
    r.add_user(USER, PW)
    rc = subprocess.run([t.RELAYD, "-c", r.conf], cwd=r.dir, timeout=20 * t.SLOW).returncode  # detaches
    t.is_(rc, 0, "detached start: exit 0 once serving")
    pid = int(open(first).read().strip()) if os.path.exists(first) else None
    t.ok(pid, "the pidfile is written")
    if not pid:
        return
    try:
        r.write_config(f"pidfile {second}\n")
        os.kill(pid, signal.SIGHUP)
        time.sleep(1)
        os.kill(pid, signal.SIGTERM)
        t.ok(t.wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 15 * t.SLOW), "relayd exits on SIGTERM")
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
    t.ok(not os.path.exists(first), "the pidfile it wrote is removed at exit")
    t.ok(os.path.exists(second) and open(second).read() == "not relayd's\n", "the file named by the reload is left alone")


@t.test("max_sessions on an implicit-TLS listener: the session over it is closed without clear text")
def _():
    import socket
    r = t.Relay(extra_config="max_sessions 1\n", ipv6=False)
    r.add_user(USER, PW)
    r.start()
    time.sleep(0.5)  # the start-up probes are gone
    first = socket.create_connection(("127.0.0.1", r.port_tls), timeout=5 * t.SLOW)
    time.sleep(0.3)
    second = socket.create_connection(("127.0.0.1", r.port_tls), timeout=5 * t.SLOW)
    data = b""
    try:
        while True:
            chunk = second.recv(4096)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    t.is_(data, b"", "no clear-text 421 before TLS: closed at once")
    t.like(r.log(), r"smtp event=refused client=127\.0\.0\.1 reason=max-sessions", "logged")
    first.close()
    second.close()
    r.stop()


@t.test("SIGTERM during DATA: the transfer finishes with 250, then 421, then exit 0")
def _():
    c = relay.session(USER)
    c.cmd(f"MAIL FROM:<{USER}>")
    c.cmd("RCPT TO:<x@example.net>")
    code, _ = c.cmd("DATA")
    t.is_(code, 354, "354")
    c.send(b"Subject: drain\r\n\r\nfirst half\r\n")
    os.kill(relay.proc.pid, signal.SIGTERM)
    time.sleep(0.5)
    t.ok(relay.proc.poll() is None, "relayd waits for the transfer")
    t.ok(connect_refused(), "no new connections while draining")
    c.send(b"second half\r\n.\r\n")
    code, text = c.reply()
    qid = t.queued_id(text)
    t.ok(qid is not None, "250 queued after SIGTERM", text)
    code, text = c.reply()
    t.like(text, r"^421 4\.3\.2 ", "then 421 4.3.2 shutting down")
    c.close()
    rc = relay.proc.wait(timeout=15)
    t.is_(rc, 0, "exit status 0")
    t.ok(qid in relay.queue_ids() or "forward" in relay.log(), "the message is in the queue")


@t.test("a second SIGTERM exits at once, and what got 250 is kept")
def _():
    relay.start()
    c = relay.session(USER)
    c.cmd(f"MAIL FROM:<{USER}>")
    c.cmd("RCPT TO:<x@example.net>")
    c.cmd("DATA")
    c.send(b"Subject: never finished\r\n\r\n")
    before = set(relay.queue_ids())
    os.kill(relay.proc.pid, signal.SIGTERM)
    time.sleep(0.3)
    t.ok(connect_refused(), "no new connections while draining")
    os.kill(relay.proc.pid, signal.SIGTERM)
    rc = relay.proc.wait(timeout=5)
    t.is_(rc, 0, "second SIGTERM: exit 0 at once")
    t.ok(before <= set(relay.queue_ids()), "nothing that was queued is gone")
    c.close()


@t.test("privilege drop: the running relayd has the configured user's uid")
def _():
    if os.geteuid() != 0:
        t.ok(True, "not root: relayd keeps its uid (nothing to drop)")
        return
    r = nobody_relay()
    r.add_user(USER, PW)
    r.start()  # returns after main event=started, which is logged after the drop
    with open(f"/proc/{r.proc.pid}/status") as f:
        status = f.read()
    nobody = pwd.getpwnam("nobody")
    uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", status, re.M).groups()
    t.is_(set(map(int, uids)), {nobody.pw_uid}, "real, effective, saved and fs uid are nobody's")
    t.like(r.log(), r"event=privileges-dropped user=nobody", "logged")
    t.like(one_message(r, "as-nobody"), t.QUEUED_RE, "still accepts and commits mail after the drop")
    st = os.stat(os.path.join(r.queue_dir, "msg"))
    t.is_(st.st_mode & 0o077, 0, "queue folder not readable by others")
    t.is_(os.stat(os.path.join(r.dir, "relayd.db")).st_mode & 0o077, 0, "database not readable by others")
    t.like(r.log(), r"main event=reload-will-fail path=\S+/server-key\.pem .*make it readable by that user",
           "the root-only key is named at start: a SIGHUP could not re-read it")
    r.stop()


@t.test("privilege drop: an upstream's root-only auth= and ca= files are named at start, the secret with its own hint")
def _():
    if os.geteuid() != 0:
        t.skip("files relayd's user cannot re-read", "not root")
        return
    import shutil
    r = nobody_relay()
    secret, ca = os.path.join(r.dir, "upstream.secret"), os.path.join(r.dir, "upstream-ca.pem")
    with open(secret, "w") as f:
        f.write("relay:upstream-password\n")
    shutil.copy(r.ca_file, ca)
    for path in (secret, ca):
        os.chown(path, 0, 0)
        os.chmod(path, 0o600)
    r.write_config(f"user nobody\nupstream 127.0.0.1:{t.free_port()} auth={secret} ca={ca}\n")
    r.add_user(USER, PW)
    r.start()
    t.like(r.log(), rf"main event=reload-will-fail path={re.escape(secret)} .*hint=\"[^\"]*chown nobody "
           rf"{re.escape(secret)}; chmod 600 ", "the secret: give it to the user, mode 0600 (0640 would be refused)")
    t.like(r.log(), rf"main event=reload-will-fail path={re.escape(ca)} ", "the CA file is named too")
    r.stop()


def secret_relay(mode):
    """a relay (as nobody when root) with an upstream auth= file of that mode, its owner the
    user's: the relay and the file's path"""
    root = os.geteuid() == 0
    r = nobody_relay(as_nobody=root)
    secret = os.path.join(r.dir, "upstream.secret")
    with open(secret, "w") as f:
        f.write("relay:upstream-password\n")
    if root:  # a SIGHUP re-reads the key and the secret as nobody
        nobody = pwd.getpwnam("nobody")
        for path in (secret, os.path.join(r.dir, "server-key.pem")):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
    os.chmod(secret, mode)
    r.write_config(("user nobody\n" if root else "") + f"upstream 127.0.0.1:{t.free_port()} tls=none auth={secret}\n")
    r.add_user(USER, PW)
    return r, secret


@t.test("an auth= file writable by group or others (0620, 0602) is refused at start, with the chmod to run")
def _():
    for mode in (0o620, 0o602):
        r, secret = secret_relay(mode)
        try:  # the listeners are bound before the forwarder starts: wait for the exit too
            r.start(timeout=5)
        except RuntimeError:
            pass
        t.ok(t.wait_for(lambda: not r.running(), 10 * t.SLOW), f"{mode:04o}: relayd refused to start")
        t.is_(r.proc.returncode, 1, f"{mode:04o}: exit 1")
        t.like(r.log(), rf"auth file {re.escape(secret)} is writable by group or others: refused \(chmod 600 it\)",
               f"{mode:04o}: the error names the file, the problem and the chmod")
        t.like(r.log(), rf"forward event=insecure-secret file={re.escape(secret)} mode={mode:03o} ",
               f"{mode:04o}: logged as an insecure secret")
        r.stop()


@t.test("an auth= file made group-writable (0620) is refused on SIGHUP, the old config kept")
def _():
    r, secret = secret_relay(0o600)
    r.start()
    os.chmod(secret, 0o620)
    r.proc.send_signal(signal.SIGHUP)
    t.ok(t.wait_for(lambda: "reload-failed" in r.log(), 10 * t.SLOW), "the reload fails")
    t.like(r.log(), rf"main event=reload-failed error=\"[^\"]*auth file {re.escape(secret)} is writable by group "
           r"or others: refused \(chmod 600 it\)\" action=kept-old-config", "named, with the chmod to run")
    t.unlike(r.log(), r"main event=reloaded", "nothing reloaded")
    t.like(one_message(r, "after-refused-secret"), t.QUEUED_RE, "still serving with the old config")
    os.chmod(secret, 0o600)
    r.proc.send_signal(signal.SIGHUP)
    t.ok(t.wait_for(lambda: "main event=reloaded" in r.log(), 10 * t.SLOW), "back to 0600: the reload works")
    r.stop()


@t.test("privilege drop keeps the user's groups: a key readable by its group reloads on SIGHUP")
def _():
    if os.geteuid() != 0:
        t.skip("supplementary groups", "not root")
        return
    group = f"rlyt{os.getpid() % 100000}"
    subprocess.run(["groupadd", group], check=True, capture_output=True)
    try:
        subprocess.run(["gpasswd", "-a", "nobody", group], check=True, capture_output=True)
        gid = grp.getgrnam(group).gr_gid
        r = nobody_relay()
        key = os.path.join(r.dir, "server-key.pem")
        os.chown(key, 0, gid)
        os.chmod(key, 0o640)  # root:group 0640, the ssl-cert way
        r.add_user(USER, PW)
        r.start()
        with open(f"/proc/{r.proc.pid}/status") as f:
            groups = re.search(r"^Groups:\s*(.*)$", f.read(), re.M).group(1).split()
        t.ok(str(gid) in groups, f"relayd keeps nobody's group {group} after the drop ({groups})")
        t.unlike(r.log(), r"reload-will-fail", "no warning: every file it re-reads is readable")
        r.proc.send_signal(signal.SIGHUP)
        t.ok(t.wait_for(lambda: re.search(r"main event=reloaded", r.log()), 10 * t.SLOW), "SIGHUP reloads")
        t.unlike(r.log(), r"reload-failed", "without a failure to read the key")
        r.stop()
    finally:
        subprocess.run(["groupdel", group], capture_output=True)


def auth_reply(r, user, password):
    """AUTH PLAIN past STARTTLS on r: the reply's text"""
    c = r.raw()
    try:
        c.reply()
        c.ehlo()
        c.cmd("STARTTLS")
        c.starttls()
        c.ehlo()
        return c.auth_plain(user, password)[1]
    finally:
        c.close()


@t.test("database in a folder the user cannot search (root's 0700, as StateDirectory= leaves it): "
        "a warning at start names the folder")
def _():
    if os.geteuid() != 0:
        t.skip("database folder of root's", "not root")
        return
    r = nobody_relay("database lib/relayd.db\n")
    lib = os.path.join(r.dir, "lib")
    os.mkdir(lib, 0o700)
    r.add_user(USER, PW)
    r.start()
    t.like(r.log(), rf"main event=database-folder-unusable path={re.escape(lib)} error=\"Permission denied\" "
           rf"hint=\"user nobody cannot reach {re.escape(lib)}/relayd\.db", "the warning names the folder and the user")
    t.like(auth_reply(r, USER, PW), r"^454 4\.7\.0 ", "and AUTH is a temporary failure, as the warning says")
    r.stop()
    nobody = pwd.getpwnam("nobody")
    os.chown(lib, nobody.pw_uid, nobody.pw_gid)
    r.start()
    this_run = r.log().rsplit("===== relaytest: starting", 1)[-1]
    t.unlike(this_run, r"database-folder-unusable", "the folder given to the user: no warning")
    t.like(auth_reply(r, USER, PW), r"^235 ", "and AUTH works")
    r.stop()



@t.test("database in the user's folder below a folder it cannot search (root's 0700): the warning names that parent")
def _():
    if os.geteuid() != 0:
        t.skip("a parent folder of root's", "not root")
        return
    r = nobody_relay("database secret/relayd/relayd.db\n")
    secret = os.path.join(r.dir, "secret")
    lib = os.path.join(secret, "relayd")
    os.mkdir(secret, 0o700)
    os.mkdir(lib, 0o700)
    nobody = pwd.getpwnam("nobody")
    os.chown(lib, nobody.pw_uid, nobody.pw_gid)  # the database's own folder is the user's
    r.add_user(USER, PW)
    r.start()
    t.like(r.log(), rf"main event=database-folder-unusable path={re.escape(secret)} error=\"Permission denied\" "
           rf"hint=\"user nobody cannot reach {re.escape(lib)}/relayd\.db through this folder above "
           rf"{re.escape(lib)}, [^\"]*chmod o\+x {re.escape(secret)}\b", "the warning names the parent that blocks")
    t.unlike(r.log(), rf"path={re.escape(lib)} ", "not the database's own folder, which is the user's already")
    t.like(auth_reply(r, USER, PW), r"^454 4\.7\.0 ", "and AUTH is a temporary failure, as the warning says")
    r.stop()
    os.chmod(secret, 0o711)  # what the hint says
    r.start()
    this_run = r.log().rsplit("===== relaytest: starting", 1)[-1]
    t.unlike(this_run, r"database-folder-unusable", "the parent searchable: no warning")
    t.like(auth_reply(r, USER, PW), r"^235 ", "and AUTH works")
    r.stop()


@t.test("user added to a relayd that ran as root: what it queued then is forwarded after the drop")
def _():
    if os.geteuid() != 0:
        t.skip("queue files made as root", "not root")
        return
    sink = t.Sink()
    down = "upstream 127.0.0.1:1 tls=none\nretry_min 1s\nretry_max 2s\n"
    r = t.Relay(extra_config=down)
    os.chmod(r.dir, 0o755)
    r.add_user(USER, PW)
    r.start()
    ids = [t.queued_id(one_message(r, f"queued as root {i}")) for i in range(2)]
    r.stop()
    owners = {os.stat(os.path.join(r.queue_dir, "msg", i)).st_uid for i in ids if i}
    t.is_(owners, {0}, "two messages queued by root (upstream down)")
    r.write_config(down.replace("127.0.0.1:1", f"127.0.0.1:{sink.port}") + "user nobody\n")
    r.start()
    t.ok(t.wait_for(lambda: len(sink.messages()) >= 2, 15 * t.SLOW), "both forwarded by relayd running as nobody",
         f"{len(sink.messages())} of 2")
    t.ok(t.wait_for(lambda: not r.queue_ids(), 10 * t.SLOW), "and removed from the queue", str(r.queue_ids()))
    nobody = pwd.getpwnam("nobody").pw_uid
    for name in ("usage.log", "lock", "msg", ""):
        t.is_(os.stat(os.path.join(r.queue_dir, name)).st_uid, nobody, f"QUEUE/{name} belongs to nobody")
    r.stop()
    sink.stop()


@t.test("SIGHUP with a new auth_cache_ttl: the warning says it needs a restart")
def _():
    r = t.Relay(extra_config="auth_cache_ttl 1m\n")
    r.start()
    r.write_config("auth_cache_ttl 2m\n")
    r.proc.send_signal(signal.SIGHUP)
    t.ok(t.wait_for(lambda: "main event=reloaded" in r.log(), 10 * t.SLOW), "reloaded")
    t.like(r.log(), r"event=reload-partial reason=\"[^\"]*auth_cache_ttl and ipv6_prefix_length change only on restart",
           "reload-partial names auth_cache_ttl")
    r.stop()


def second_config(r, name, extra=""):
    """a copy of r's config (same queue, database and pidfile) with its own ports and extra lines"""
    path = os.path.join(r.dir, name)
    text = re.sub(r"(?m)^listen .*\n", "", r.config_text)
    text += f"listen 127.0.0.1:{t.free_port()} starttls\nlisten 127.0.0.1:{t.free_port()} tls\n" + extra
    with open(path, "w") as f:
        f.write(text)
    return path


def relayd_run(conf, *opts):
    """relayd [opts] -c conf run to its end (detached: until its parent exits): (status, output)"""
    return t._runner([t.RELAYD, *opts, "-c", conf], 15 * t.SLOW)


def alive(pid):
    """pid is a process that has not exited (a zombie has)"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@t.test("a second relayd on the same queue exits 1 before touching it; the first keeps working")
def _():
    sink = t.Sink()
    r = t.Relay(extra_config=f"upstream 127.0.0.1:{sink.port} tls=none\n")
    r.add_user(USER, PW)
    r.start()
    t.like(one_message(r, "before the second"), t.QUEUED_RE, "first relayd queues a message")
    t.wait_for(lambda: len(sink.messages()) == 1, 10 * t.SLOW)
    usage = os.path.join(r.queue_dir, "usage.log")
    before = os.stat(usage)
    torn = os.path.join(r.queue_dir, "msg", "0123456789abcdef")  # no END trailer: recovery would unlink it
    with open(torn, "w") as f:
        f.write("RELAYD-QUEUE 1\n")
    sock = os.path.join(r.dir, "second.sock")
    conf = second_config(r, "second.conf", f"control {sock}\n")
    for mode, opts in (("-f", ["-f"]), ("detached", [])):
        rc, out = relayd_run(conf, *opts)
        t.is_(rc, 1, f"{mode}: the second relayd exits 1")
        t.like(out, rf"queue {re.escape(r.queue_dir)} is in use by another relayd \(pid {r.proc.pid}\)",
               f"{mode}: it says why, naming the queue and the first one's pid")
        t.unlike(out, r"event=(recovered|usage-replayed|started)", f"{mode}: no recovery, no usage replay")
    after = os.stat(usage)
    t.is_((after.st_ino, after.st_size), (before.st_ino, before.st_size), "usage.log untouched")
    t.ok(os.path.exists(torn), "an incomplete queue file (one being written) is not discarded")
    t.ok(not os.path.exists(sock), "no control socket made")
    os.unlink(torn)
    t.like(one_message(r, "after the second"), t.QUEUED_RE, "the first relayd still queues")
    t.wait_for(lambda: len(sink.messages()) >= 2, 10 * t.SLOW)
    t.is_(len(sink.messages()), 2, "each message forwarded once")
    t.is_(r.relayctl("stats")[0], 0, "relayctl still reaches the first one")
    r.stop()
    sink.stop()


@t.test("detached: the caller gets 0 once relayd serves, 1 when it fails; the pidfile names it and goes at exit")
def _():
    r = t.Relay(extra_config="pidfile relayd.pid\n")
    pidfile = os.path.join(r.dir, "relayd.pid")
    rc, out = relayd_run(r.conf)
    t.is_(rc, 0, "relayd (detached) exits 0 to its caller")
    pid = None
    try:
        with open(pidfile) as f:
            pid = int(f.read())
        t.ok(alive(pid), "the pidfile names a running relayd")
        t.is_(r.relayctl("stats", check=False)[0], 0, "which serves already when its parent exits (control socket)")
        conf = second_config(r, "second.conf")
        rc, out = relayd_run(conf)
        t.is_(rc, 1, "a second detached relayd on the same queue: exit 1")
        t.like(out, rf"in use by another relayd \(pid {pid}\)", "and says why")
        with open(pidfile) as f:
            t.is_(int(f.read()), pid, "the pidfile still names the first")
        os.kill(pid, signal.SIGTERM)
        t.ok(t.wait_for(lambda: not alive(pid), 15 * t.SLOW), "SIGTERM stops it")
        t.ok(not os.path.exists(pidfile), "the pidfile is removed at exit")
        pid = None
        conf = second_config(r, "bad-control.conf", f"control {pidfile}.x\n")
        with open(f"{pidfile}.x", "w") as f:
            f.write("not a socket\n")
        rc, out = relayd_run(conf)
        t.is_(rc, 1, "a start that fails after detaching (control path not a socket): exit 1 to the caller")
        t.like(out, r"start-up failed", "with a line saying so")
        t.ok(not os.path.exists(pidfile), "and no pidfile left behind")
    finally:
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)


@t.test("detached: a start-up failure before detaching (port in use, missing key) is said on stderr, exit 1")
def _():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        for what, extra, want in (("port in use", f"listen 127.0.0.1:{port} starttls\n",
                                   rf"cannot listen on 127\.0\.0\.1:{port}: Address already in use"),
                                  ("missing key", "tls_key no-such-key.pem\n", r"no-such-key\.pem")):
            r = t.Relay(extra_config=extra)
            rc, out = relayd_run(r.conf)
            t.is_(rc, 1, f"{what}: exit 1")
            t.like(out, rf"(?m)^relayd: .*{want}", f"{what}: the reason on stderr")
    finally:
        busy.close()


def notify_socket(r, abstract):
    """a datagram socket as systemd's $NOTIFY_SOCKET: (socket, the variable's value). The path
    one is root's 0600 when relayd drops privileges (stricter than systemd's, world-writable)"""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"relaytest-notify-{os.getpid()}-{t.free_port()}"
        s.bind("\0" + name)
        return s, "@" + name
    path = os.path.join(r.dir, "notify.sock")
    s.bind(path)
    os.chmod(path, 0o600)
    return s, path


def start_notified(r, value):
    """relayd -f with NOTIFY_SOCKET=value, not waited for"""
    with open(r.logfile, "ab") as logf:
        r.proc = t.spawn(t.WRAPPER + [t.RELAYD, "-f", "-c", r.conf], env=dict(os.environ, NOTIFY_SOCKET=value),
                         stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, cwd=r.dir)
    t.Relay.live.append(r)


def accepts(r):
    """[host:port] of r's listeners that refuse a connection now (one try each)"""
    refused = []
    for host, port, _ in r.listeners():
        try:
            socket.create_connection((host, port), timeout=2).close()
        except OSError:
            refused.append(f"{host}:{port}")
    return refused


@t.test("systemd Type=notify: READY=1 and MAINPID once every listener accepts, STOPPING=1 at SIGTERM, "
        "no READY=1 when the start fails (path and abstract sockets)")
def _():
    root = os.geteuid() == 0
    for kind, abstract in (("path", False), ("abstract", True)):
        r = nobody_relay(as_nobody=root)
        s, value = notify_socket(r, abstract)
        s.settimeout(10 * t.SLOW)
        try:
            start_notified(r, value)
            try:
                msg = s.recv(4096).decode()
            except socket.timeout:
                msg = None
            refused = accepts(r)  # at once: READY=1 means serving
            t.is_(msg, f"READY=1\nMAINPID={r.proc.pid}", f"{kind}: READY=1 with relayd's pid")
            t.is_(refused, [], f"{kind}: every listener accepts as soon as READY=1 arrives")
            t.like(r.log(), r"main event=started", f"{kind}: relayd had logged event=started")
            if root:
                t.like(r.log(), r"event=privileges-dropped user=nobody", f"{kind}: sent after the privilege drop")
            r.proc.send_signal(signal.SIGTERM)
            try:
                msg = s.recv(4096).decode()
            except socket.timeout:
                msg = None
            t.is_(msg, "STOPPING=1", f"{kind}: SIGTERM: STOPPING=1")
            t.is_(r.stop(), 0, f"{kind}: exit 0")
            busy = socket.socket()
            busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            busy.bind(("127.0.0.1", r.port_tls))  # the failure comes after the database, key and SASL
            busy.listen(1)
            start_notified(r, value)
            rc = r.proc.wait(timeout=15 * t.SLOW)
            busy.close()
            t.is_(rc, 1, f"{kind}: a port in use: exit 1")
            s.setblocking(False)
            try:
                msg = s.recv(4096).decode()
            except BlockingIOError:
                msg = None
            t.is_(msg, None, f"{kind}: and nothing sent (no READY=1)")
            t.Relay.live.remove(r)
        finally:
            s.close()


@t.test("started as root with a user, relayd follows no link planted in the user's folders")
def _():
    if os.geteuid() != 0:
        t.skip("links planted by the relayd user", "not root")
        return
    nobody = pwd.getpwnam("nobody")
    r = nobody_relay()
    r.add_user(USER, PW)
    r.start()
    r.stop()  # the queue now belongs to nobody
    victim_dir = os.path.join(r.dir, "victim-dir")
    os.mkdir(victim_dir, 0o755)
    victim = os.path.join(r.dir, "victim-file")
    with open(victim, "w") as f:
        f.write("root:important:content\n")

    def plant(target, name):  # a link as a process running as nobody would make it
        link = os.path.join(r.dir, name)
        os.symlink(target, link)
        os.lchown(link, nobody.pw_uid, nobody.pw_gid)
        return link

    def untouched(what):
        with open(victim) as f:
            content = f.read()
        t.is_((os.stat(victim).st_uid, content, os.stat(victim_dir).st_uid), (0, "root:important:content\n", 0),
              f"{what}: the link's target keeps its owner and content")

    plant(victim, "queue/usage.log.new")
    plant(victim, "queue/usage.log.1")
    r.start()
    r.stop()
    untouched("usage.log.new and usage.log.1 links")
    usage = os.lstat(os.path.join(r.queue_dir, "usage.log"))
    t.ok(stat.S_ISREG(usage.st_mode) and usage.st_uid == nobody.pw_uid, "usage.log is a file of nobody's")
    # QUEUE/msg, and the database's -wal as if its folder were the user's (/var/lib/relayd)
    for name, target in (("queue/msg", victim_dir), ("relayd.db-wal", victim)):
        path = os.path.join(r.dir, name)
        if os.path.exists(path):
            os.rename(path, path + ".saved")
        plant(target, name)
        rc, out = relayd_run(r.conf, "-f")
        t.is_(rc, 1, f"{name} a link: relayd exits 1")
        t.like(out, rf"{re.escape(path)} is a symbolic link: not starting", "and names it")
        untouched(f"{name} a link")
        os.unlink(path)
        if os.path.exists(path + ".saved"):
            os.rename(path + ".saved", path)
    lock = os.path.join(r.queue_dir, "lock")
    os.unlink(lock)
    os.link(victim, lock)  # a hard link (where fs.protected_hardlinks does not stop the user)
    rc, out = relayd_run(r.conf, "-f")
    t.is_(rc, 1, "QUEUE/lock a hard link to another file: relayd exits 1")
    t.like(out, r"lock is not a file with one link: not starting", "and says why")
    untouched("lock a hard link")
    os.unlink(lock)
    r.start()
    t.like(one_message(r, "after the links"), t.QUEUED_RE, "with the links gone relayd starts and queues")
    r.stop()


def issue_cert(r, key, cert, template="server.tmpl"):
    """a certificate for the key file key from r's CA (names from template), in r's folder"""
    j = lambda n: os.path.join(r.dir, n)  # noqa: E731
    t._run(["certtool", "--generate-certificate", "--load-privkey", j(key), "--load-ca-certificate", j("ca.pem"),
            "--load-ca-privkey", j("ca-key.pem"), "--template", j(template), "--outfile", j(cert)])


def ec_cert(r, key, cert):
    """an ECDSA P-256 key and a certificate for it from r's CA (server.tmpl names), in r's folder"""
    t._run(["certtool", "--generate-privkey", "--key-type=ecdsa", "--curve=secp256r1", "--outfile",
            os.path.join(r.dir, key)])
    issue_cert(r, key, cert)


def relay_rsa_and_ec():
    """a Relay (not started) with its RSA certificate and an ECDSA one beside it"""
    r = t.Relay()
    ec_cert(r, "ec-key.pem", "ec-cert.pem")
    with open(r.conf, "a") as f:
        f.write("tls_cert ec-cert.pem\ntls_key ec-key.pem\n")
    return r


@t.test("two certificates (RSA and ECDSA): each client gets one it can use")
def _():
    r = relay_rsa_and_ec()
    r.add_user(USER, PW)
    r.start()
    import ssl
    for kind, cipher in (("RSA", "ECDHE-RSA-AES128-GCM-SHA256"), ("ECDSA", "ECDHE-ECDSA-AES128-GCM-SHA256")):
        ctx = ssl.create_default_context(cafile=r.ca_file)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(cipher)
        try:
            with socket.create_connection(("127.0.0.1", r.port_tls), timeout=10) as sock:
                with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
                    got = tls.cipher()[0]
                    greeting = tls.recv(200).decode()
            t.is_(got, cipher, f"a client that only takes {kind} gets an {kind} certificate")
            t.like(greeting, r"^220 ", f"and the greeting ({kind})")
        except (ssl.SSLError, OSError) as e:
            t.ok(False, f"a client that only takes {kind} gets an {kind} certificate", repr(e))
    with open(r.conf, "a") as f:
        f.write("tls_cert ec-cert.pem\n")
    rc, out = t._runner([t.RELAYD, "-n", "-c", r.conf], 10)
    t.ok(rc == 1, "a tls_cert without its tls_key is refused by -n (exit 1)", out)
    t.like(out, r"every tls_cert needs its tls_key", "and says why")
    r.stop()


def gnutls_cli(r, port, *args):
    """gnutls-cli against r's port (verified against r's CA, name localhost), no input; its output"""
    import subprocess
    p = subprocess.run(["gnutls-cli", "--x509cafile", r.ca_file, "--port", str(port), *args, "localhost"],
                       input=b"", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    return p.stdout.decode("utf-8", "replace")


def openssl_sigalg(r, *args):
    """openssl s_client -brief against r's implicit-TLS port, verified against r's CA: (rc, output)"""
    p = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{r.port_tls}", "-CAfile", r.ca_file,
                        "-verify_return_error", "-verify_hostname", "localhost", "-brief", "-ign_eof", *args],
                       input=b"QUIT\r\n", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    return p.returncode, p.stdout.decode("utf-8", "replace")


@t.test("RSA key: relayd's own signer (rsakey) makes every signature scheme a client may ask for (openssl)")
def _():
    r = relay_rsa_and_ec()
    r.start()
    t.like(r.log(), r'tls event=certificate cert="[^"]*server-cert\.pem" key="[^"]*server-key\.pem" signer=rsakey',
           "the RSA key signs through rsakey (logged)")
    t.like(r.log(), r'tls event=certificate cert="[^"]*ec-cert\.pem" key="[^"]*ec-key\.pem" signer=gnutls',
           "the ECDSA key through GnuTLS")
    for version, sigalg, kind, digest in (("-tls1_3", "rsa_pss_rsae_sha256", "RSA-PSS", "SHA256"),
                                          ("-tls1_3", "rsa_pss_rsae_sha384", "RSA-PSS", "SHA384"),
                                          ("-tls1_3", "rsa_pss_rsae_sha512", "RSA-PSS", "SHA512"),
                                          ("-tls1_2", "rsa_pss_rsae_sha256", "RSA-PSS", "SHA256"),
                                          ("-tls1_2", "RSA+SHA256", "RSA", "SHA256"),
                                          ("-tls1_2", "RSA+SHA384", "RSA", "SHA384"),
                                          ("-tls1_2", "RSA+SHA512", "RSA", "SHA512")):
        rc, out = openssl_sigalg(r, version, "-sigalgs", sigalg)
        t.ok(rc == 0 and "Verification: OK" in out and re.search(r"^220 relay\.test", out, re.M),
             f"{version[1:]} {sigalg}: handshake verified, greeting read", out)
        t.like(out, rf"Hash used: {digest}\s+Signature type: {kind}\n",
               f"{version[1:]} {sigalg}: the server signed {kind} with {digest}")
    out = gnutls_cli(r, r.port_tls, "--priority", "NORMAL:-VERS-ALL:+VERS-TLS1.2:-SIGN-ALL:+SIGN-RSA-SHA256")
    t.like(out, r"Handshake was completed", "gnutls-cli, TLS 1.2 with PKCS #1 v1.5 SHA-256 only: completed")
    r.stop()


@t.test("RSA key: 240 handshakes from 4 threads at once all verify (blinding shared by the TLS threads)")
def _():
    r = t.Relay()
    r.start()
    import ssl
    since = len(r.log())
    good, bad = [0], []
    lock = threading.Lock()

    def client():
        ctx = ssl.create_default_context(cafile=r.ca_file)
        for _ in range(60):
            try:
                with socket.create_connection(("127.0.0.1", r.port_tls), timeout=10) as sock:
                    with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
                        line = tls.recv(200)
                with lock:
                    good[0] += line.startswith(b"220 ")
            except (ssl.SSLError, OSError) as e:
                with lock:
                    bad.append(repr(e))
    threads = [threading.Thread(target=client) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    t.is_(good[0], 240, "240 verified handshakes with a greeting")
    t.ok(not bad, "no handshake failed", bad[:3])
    log = r.log()[since:]
    t.is_(len(re.findall(r"smtp event=tls version=TLS1\.3", log)), 240, "relayd logged 240 TLS 1.3 handshakes")
    # (relaytest's start probes leave "non-properly terminated" handshakes behind: not these)
    t.unlike(log, r"tls-handshake: (?!The TLS connection was non-properly terminated)", "and no failed one")
    r.stop()


def rsa_numbers(path):
    """the numbers of the RSA key file path, by name (openssl rsa -text)"""
    out = t._run(["openssl", "rsa", "-in", path, "-noout", "-text"]).decode()
    names = {"modulus": "n", "publicExponent": "e", "privateExponent": "d", "prime1": "p", "prime2": "q",
             "exponent1": "e1", "exponent2": "e2", "coefficient": "u"}
    nums, cur = {}, None
    for line in out.splitlines():
        m = re.match(r"^(\w+):\s*(\d+)?", line)
        if m and m.group(1) in names:
            cur = names[m.group(1)]
            nums[cur] = m.group(2) or ""
            if m.group(2):  # publicExponent: 65537 (0x10001)
                nums[cur] = int(m.group(2))
                cur = None
        elif cur and line.startswith(" "):
            nums[cur] += line.strip().replace(":", "")
    return {k: (v if isinstance(v, int) else int(v, 16)) for k, v in nums.items()}


def der_rsa_key(nums):
    """a PKCS #1 RSAPrivateKey in PEM from nums (no check that they belong together)"""
    import base64

    def length(n):
        return bytes([n]) if n < 128 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes(
            (n.bit_length() + 7) // 8, "big")

    def integer(v):
        b = v.to_bytes(v.bit_length() // 8 + 1, "big")
        return b"\x02" + length(len(b)) + b
    body = integer(0) + b"".join(integer(nums[k]) for k in ("n", "e", "d", "p", "q", "e1", "e2", "u"))
    der = b"\x30" + length(len(body)) + body
    b64 = base64.b64encode(der).decode()
    return ("-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
            + "\n-----END RSA PRIVATE KEY-----\n")


@t.test("RSA key file whose n is not pq: relayd neither aborts at start nor on SIGHUP (GnuTLS signs, as before)")
def _():
    r = t.Relay()
    j = lambda n: os.path.join(r.dir, n)  # noqa: E731
    t._run(["certtool", "--generate-privkey", "--key-type=rsa", "--bits=1024", "--outfile", j("small.pem")])
    mixed = rsa_numbers(j("small.pem"))
    mixed["n"] = rsa_numbers(j("server-key.pem"))["n"]  # the certificate's n, a smaller key's p, q, d
    with open(j("mixed-key.pem"), "w") as f:
        f.write(der_rsa_key(mixed))
    os.chmod(j("mixed-key.pem"), 0o600)
    r.start()
    os.replace(j("mixed-key.pem"), j("server-key.pem"))
    since = len(r.log())
    r.proc.send_signal(signal.SIGHUP)
    t.ok(t.wait_for(lambda: "event=reload" in r.log()[since:], 10), "the reload is done", r.log()[since:])
    t.ok(r.running(), "relayd runs on after a SIGHUP with that key (nettle aborted on an assertion before)")
    t.like(r.log()[since:], r'key="[^"]*server-key\.pem" signer=gnutls', "the key went to GnuTLS")
    r.stop()
    r.start()
    t.ok(r.running(), "and relayd starts with it")
    r.stop()


@t.test("two RSA certificates: each client gets the one for the name it asks for (SNI)")
def _():
    r = t.Relay()
    j = lambda n: os.path.join(r.dir, n)  # noqa: E731
    for name in ("alpha", "beta"):
        with open(j(f"{name}.tmpl"), "w") as f:
            f.write(f'organization = "relayd tests"\ncn = "{name}.example"\ndns_name = "{name}.example"\n'
                    "tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 30\n")
        t._run(["certtool", "--generate-privkey", "--key-type=rsa", "--bits=2048", "--outfile", j(f"{name}-key.pem")])
        issue_cert(r, f"{name}-key.pem", f"{name}-cert.pem", f"{name}.tmpl")
        os.chmod(j(f"{name}-key.pem"), 0o600)
    with open(r.conf, "a") as f:
        f.write("tls_cert alpha-cert.pem\ntls_key alpha-key.pem\ntls_cert beta-cert.pem\ntls_key beta-key.pem\n")
    r.start()
    t.is_(len(re.findall(r"signer=rsakey", r.log())), 3, "three RSA keys, each through rsakey")
    for name in ("alpha", "beta"):
        rc, out = openssl_sigalg(r, "-servername", f"{name}.example", "-verify_hostname", f"{name}.example")
        t.ok(rc == 0 and f"CN = {name}.example" in out and "Verification: OK" in out,
             f"SNI {name}.example: its certificate, verified", out)
    r.stop()


@t.test("RSA key forms: PKCS #8, 3072 bits; a key for another certificate is refused as before")
def _():
    r = t.Relay()
    j = lambda n: os.path.join(r.dir, n)  # noqa: E731
    t._run(["certtool", "--generate-privkey", "--key-type=rsa", "--bits=3072", "--outfile", j("rsa3072.pem")])
    t._run(["openssl", "pkcs8", "-topk8", "-nocrypt", "-in", j("rsa3072.pem"), "-out", j("p8-key.pem")])
    issue_cert(r, "p8-key.pem", "p8-cert.pem")
    with open(j("p8-key.pem")) as f:
        t.like(f.read(), r"^-----BEGIN PRIVATE KEY-----", "the key file is PKCS #8")
    os.chmod(j("p8-key.pem"), 0o600)
    conf = open(r.conf).read()
    with open(r.conf, "w") as f:
        f.write(conf.replace("server-cert.pem", "p8-cert.pem").replace("server-key.pem", "p8-key.pem"))
    r.start()
    t.like(r.log(), r'key="[^"]*p8-key\.pem" signer=rsakey', "a PKCS #8 RSA-3072 key signs through rsakey")
    rc, out = openssl_sigalg(r, "-tls1_3")
    t.ok(rc == 0 and "Verification: OK" in out, "and a TLS 1.3 handshake verifies", out)
    t.like(out, r"Signature type: RSA-PSS", "signed RSA-PSS")
    r.stop()
    with open(r.conf, "w") as f:
        f.write(conf.replace("server-key.pem", "p8-key.pem"))
    rc, out = relayd_run(r.conf, "-f")
    t.is_(rc, 1, "server-cert.pem with another certificate's key: relayd exits 1")
    t.like(out, r"cannot load certificate \S*server-cert\.pem / key \S*p8-key\.pem: "
           r"The certificate and the given key do not match", "in GnuTLS's words, as before rsakey")


@t.test("key exchange: X25519 for a client that offers it, P-256 for one that offers only that (gnutls-cli)")
def _():
    r = t.Relay()
    r.start()
    for prio, want in (("NORMAL", "ECDHE-X25519"), ("NORMAL:-GROUP-ALL:+GROUP-SECP256R1", "ECDHE-SECP256R1")):
        out = gnutls_cli(r, r.port_starttls, "--starttls-proto=smtp", "--priority", prio)
        desc = re.search(r"- Description: (.*)", out)
        t.like(desc.group(1) if desc else out, rf"\(TLS1\.3-X\.509\)-\({want}\)",
               f"client priority {prio}: {want}")
    r.stop()


@t.test("TLS session resumption: gnutls-cli -r resumes on STARTTLS and implicit TLS; OpenSSL (Python) too, "
        "and a resumed session must still AUTH")
def _():
    r = t.Relay()
    r.add_user(USER, PW)
    r.start()
    for port, extra in ((r.port_starttls, ["--starttls-proto=smtp"]), (r.port_tls, [])):
        out = gnutls_cli(r, port, "-r", *extra)
        t.ok("*** This is a resumed session" in out, f"gnutls-cli resumed ({'STARTTLS' if extra else 'implicit TLS'})",
             out[-400:])
    ctx = r.ssl_context()

    def starttls_session(session):
        s, _ = t.clear_to_starttls(r.port_starttls)
        tls = ctx.wrap_socket(s, server_hostname="localhost", session=session)
        tf = tls.makefile("rb")
        tls.sendall(b"EHLO c.example\r\n")
        while tf.readline()[3:4] == b"-":  # the ticket arrives with the first records
            pass
        return tls, tf

    first, _ = starttls_session(None)
    saved = first.session
    first.sendall(b"QUIT\r\n")
    first.close()
    again, tf = starttls_session(saved)
    t.ok(again.session_reused, "OpenSSL client resumed its STARTTLS session")
    again.sendall(f"MAIL FROM:<{USER}>\r\n".encode())
    t.like(tf.readline().decode(), r"^530 5\.7\.0 ", "MAIL without AUTH in a resumed session: 530 5.7.0")
    again.close()
    t.is_(len(re.findall(r"event=accepted", r.log())), 0, "nothing accepted")
    r.stop()


@t.test("70 reloads while a TLS session from before them stays open: it still works; old certificates are freed")
def _():
    r = t.Relay()
    r.add_user(USER, PW)
    r.start()
    held = r.session(USER)  # its TLS began with the first certificate set
    n = 70
    for i in range(n):
        r.proc.send_signal(signal.SIGHUP)
        t.wait_for(lambda: len(re.findall(r"main event=reloaded", r.log())) > i, 10 * t.SLOW)
    t.is_(len(re.findall(r"main event=reloaded", r.log())), n, f"{n} reloads done")
    codes = [held.cmd(f"MAIL FROM:<{USER}>")[0], held.cmd("RCPT TO:<x@example.net>")[0], held.cmd("DATA")[0]]
    held.send(t.dot_stuff(t.make_message(USER, "x@example.net", subject="held over reloads")))
    codes.append(held.reply()[0])
    t.is_(codes, [250, 250, 354, 250], "the session begun before the reloads sends a message")
    held.cmd("QUIT")
    held.close()
    t.is_(one_message(r, "after reloads")[:3], "250", "a new session works")
    t.is_(r.stop(), 0, "clean exit (under valgrind: no certificate set leaked)")


def ec_only(r):
    """replace r's RSA server key and certificate with ECDSA P-256 ones (same CA and names)"""
    ec_cert(r, "server-key.pem", "server-cert.pem")


def implicit_tls_greeting(r):
    with socket.create_connection(("127.0.0.1", r.port_tls), timeout=10) as sock:
        with r.ssl_context().wrap_socket(sock, server_hostname="localhost") as tls:
            return tls.recv(200).decode()


# tls_threads auto with an RSA key: one handshake thread per CPU relayd may run on, at most 8
RSA_THREADS = min(len(os.sched_getaffinity(0)), 8)


@t.test("tls_threads auto: handshakes on the loop with an EC key, on a thread per CPU with an RSA key")
def _():
    for kind, extra, want in (("ECDSA", "", r"on=loop threads=0 setting=auto-ec-key"),
                              ("RSA", "", rf"on=threads threads={RSA_THREADS} setting=auto-slow-key"),
                              ("RSA, tls_threads 0", "tls_threads 0\n", r"on=loop threads=0 setting=tls_threads")):
        r = t.Relay(extra_config=extra)
        if kind == "ECDSA":
            ec_only(r)
        r.add_user(USER, PW)
        r.start()
        t.like(r.log(), want, f"{kind}: the log says where handshakes run")
        t.is_(one_message(r, f"tls-threads {kind}")[:3], "250", f"{kind}: STARTTLS + AUTH + a message")
        t.like(implicit_tls_greeting(r), r"^220 ", f"{kind}: implicit TLS greeting")
        r.stop()
    cpus = os.sched_getaffinity(0)
    r = t.Relay()
    r.add_user(USER, PW)
    os.sched_setaffinity(0, {min(cpus)})  # relayd inherits it: auto counts the CPUs it may use
    try:
        r.start()
    finally:
        os.sched_setaffinity(0, cpus)
    t.like(r.log(), r"on=threads threads=1 setting=auto-slow-key", "RSA, relayd on one CPU (taskset): one thread")
    t.is_(one_message(r, "tls-threads one CPU")[:3], "250", "RSA on one CPU: a message")
    r.stop()
    r = t.Relay()
    ec_only(r)
    r.add_user(USER, PW)
    r.start()
    t.unlike(r.log(), r"on=threads", "EC key: no handshake thread")
    t.make_certs(r.dir)  # RSA again, then SIGHUP
    r.proc.send_signal(signal.SIGHUP)
    t.ok(t.wait_for(lambda: re.search(rf"on=threads threads={RSA_THREADS} setting=auto-slow-key", r.log()), 10 * t.SLOW),
         "an RSA key loaded by a reload starts the handshake threads")
    t.is_(one_message(r, "tls-threads reload")[:3], "250", "and sessions still work")
    r.stop()


def cpu_seconds(pid):
    """user + system CPU time of a process so far"""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@t.test("out of file descriptors: the metrics listener pauses accepting instead of spinning the loop")
def _():
    import resource
    mport = t.free_port()
    r = t.Relay(extra_config=f"metrics 127.0.0.1:{mport}\nmax_sessions 1000\ntimeout_idle 10m\n", ipv6=False)
    r.add_user(USER, PW)
    r.start(preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    # the start-up probes' sessions must be gone first: closing later, they would free descriptors
    t.wait_for(lambda: r.log().count("smtp event=disconnect") >= len(r.listeners()), 5 * t.SLOW)
    held = []
    try:
        for _ in range(100):  # idle sessions (waiting in the backlog if need be) past relayd's descriptors
            held.append(socket.create_connection(("127.0.0.1", r.port_starttls), timeout=5))
        t.ok(t.wait_for(lambda: re.search(r"listener event=accept-failed .*Too many open files", r.log()),
                        5 * t.SLOW), "relayd ran out of descriptors (its SMTP listener pauses)")
        held.append(socket.create_connection(("127.0.0.1", mport), timeout=5))  # waits in the backlog
        t.ok(t.wait_for(lambda: "metrics event=accept-failed" in r.log(), 5 * t.SLOW),
             "the metrics listener met EMFILE too")
        before = cpu_seconds(r.proc.pid)
        time.sleep(2)
        used = cpu_seconds(r.proc.pid) - before
        t.ok(used < 0.5, f"relayd used {used:.2f} s of CPU in 2 s (a spinning loop uses about 2)")
    finally:
        for c in held:
            c.close()
    ok = t.wait_for(lambda: t.curl(["-s", "-m", "2", f"http://127.0.0.1:{mport}/metrics"])[1].count("relayd_") > 0,
                    10 * t.SLOW)
    t.ok(ok, "with descriptors free again, a scrape is answered")
    r.stop()

t.done()
