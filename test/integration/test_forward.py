#!/usr/bin/python3
"""test_forward - relayd's forwarder against a real upstream (tools/capture-sink, aiosmtpd):
STARTTLS + AUTH end to end with byte comparison, certificate verification (untrusted CA refused,
accepted once ca= names it), STARTTLS required, implicit TLS, upstream down then up, 4xx then 250,
a 5xx recipient bounced (RFC 3464) while the others are delivered, failover to the second
upstream, kill -9 under load (nothing that got 250 is lost), pacing (rate=N/minute), an
auth= file readable by others refused, and DSN notices (RFC 3461/3464): "relayed" for
NOTIFY=SUCCESS through an upstream without DSN (none when it offers DSN), one "delayed" after
delay_warning; a reload that changes the list of upstreams (the old upstream finishes the
transaction in progress, the rest goes to the new list, same process); reloads free the trust
anchors and secrets they replace (RSS, relayctl stats credential_sets); wall-clock steps
(libfaketime) change neither an upstream's down time, nor a deferred message's retry, nor the
upstream latencies in /metrics.

Run by `make check`, or by hand: top_builddir=. /usr/bin/python3 test/integration/test_forward.py
"""
import asyncio
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import relaytest as t  # noqa: E402

ALICE, ALICE_PW = "alice@example.org", "alice-secret-1"
UP_USER, UP_PW = "relayuser", "up-Secret-9:x"   # a colon in the password on purpose
RETRY = "retry_min 1s\nretry_max 2s\n"

# a second CA, unknown to relayd unless ca= names it, and a localhost certificate from it
SINK_CERTS = t.mkdtemp("relaytest-sinkca-")
SINK_CA = t.make_certs(SINK_CERTS)
SINK_TLS = ["--tls-cert", os.path.join(SINK_CERTS, "server-cert.pem"),
            "--tls-key", os.path.join(SINK_CERTS, "server-key.pem")]


def marker(tag):
    return f"{tag}-{os.getpid()}-{time.monotonic_ns()}"


def secret_file(relay, mode=0o600):
    p = os.path.join(relay.dir, "upstream.secret")
    with open(p, "w") as f:
        f.write(f"{UP_USER}:{UP_PW}\n")
    os.chmod(p, mode)
    return p


def make_relay(upstreams, extra=RETRY, start=True):
    r = t.Relay(extra_config="\n".join(f"upstream {u}" for u in upstreams) + "\n" + extra)
    r.add_user(ALICE, ALICE_PW)
    if start:
        r.start()
    return r


def reconfigure(relay, upstreams, extra=RETRY):
    relay.write_config("\n".join(f"upstream {u}" for u in upstreams) + "\n" + extra)


def submit(relay, rcpts, subject="fwd", body="Hello.\r\n", headers=(), conn=None):
    """one message through relayd (STARTTLS + AUTH); returns (code, queue id or None, bytes)"""
    c = conn or relay.smtp_starttls()
    if conn is None:
        c.login(ALICE, ALICE_PW)
    msg = t.make_message(ALICE, rcpts[0], subject=subject, body=body, extra_headers=headers)
    c.mail(ALICE)
    for r in rcpts:
        c.rcpt(r)
    code, resp = c.data(msg)
    if conn is None:
        c.quit()
    text = f"{code} {resp.decode('utf-8', 'replace')}"
    return code, t.queued_id(text), msg


def wait_msgs(sink, n, timeout=15.0):
    """the sink's messages once there are at least n (or what is there at the timeout)"""
    return (t.wait_for(lambda: (lambda m: m if len(m) >= n else None)(sink.messages()), timeout * t.SLOW)
            or sink.messages())


def wait_log(relay, regex, timeout=15.0):
    return t.wait_for(lambda: re.search(regex, relay.log(), re.M), timeout * t.SLOW)


def header(eml, name):
    m = re.search(rb"(?im)^" + re.escape(name.encode()) + rb":[ \t]*([^\r\n]*)", t.message_headers(eml))
    return m.group(1).decode() if m else None


def done(relay, *sinks):
    relay.stop()
    for s in sinks:
        s.stop()


class Upstream(t.AsyncServer):
    """a scripted SMTP upstream on 127.0.0.1 (asyncio, in a thread) that answers a pipelined
    MAIL/RCPT.../DATA group in one write, as Postfix does. It takes rcpt_limit recipients per
    transaction and answers the others with over; pad adds that many 1000-byte lines to every
    RCPT reply (a big burst); ehlo: its EHLO keywords. messages: [(recipients, data)] it took,
    mails: every MAIL command, ehlos: every EHLO name; fqdn_helo: refuse an EHLO name that is
    neither a domain with a dot nor an address literal (Postfix's reject_non_fqdn_helo_hostname)."""

    def __init__(self, rcpt_limit=1000, over=b"452 4.5.3 Too many recipients", pad=0,
                 ehlo=(b"PIPELINING", b"8BITMIME", b"ENHANCEDSTATUSCODES"), fqdn_helo=False):
        self.rcpt_limit, self.over, self.pad, self.fqdn_helo, self.ehlos = rcpt_limit, over, pad, fqdn_helo, []
        self.ehlo = b"250-up.test\r\n" + b"".join(b"250-" + k + b"\r\n" for k in ehlo[:-1]) + b"250 " + ehlo[-1] + b"\r\n"
        self.messages, self.connections, self.mails = [], 0, []
        t.AsyncServer.__init__(self)

    def _rcpt_ok(self):
        fill = b"".join(b"250-2.1.5 " + b"x" * 1000 + b"\r\n" for _ in range(self.pad))
        return fill + b"250 2.1.5 ok\r\n"

    async def _data(self, reader):
        data = b""
        while True:
            line = await asyncio.wait_for(reader.readline(), 30)
            if not line or line == b".\r\n":
                return data if line else None
            data += line[1:] if line.startswith(b".") else line

    async def _client(self, reader, writer):
        self.connections += 1
        out, rcpts = [], []
        try:
            writer.write(b"220 up.test ESMTP\r\n")
            while True:
                line = await asyncio.wait_for(reader.readline(), 30)
                verb = line[:4].upper()
                if not line or verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    return
                if verb == b"EHLO":
                    name = line[5:].strip().decode(errors="replace")
                    self.ehlos.append(name)
                    fqdn = "." in name.strip(".") or (name.startswith("[") and name.endswith("]"))
                    out.append(self.ehlo if fqdn or not self.fqdn_helo else
                               b"504 5.5.2 <" + name.encode() + b">: Helo command rejected: need fully-qualified hostname\r\n")
                elif verb == b"MAIL":
                    rcpts = []
                    self.mails.append(line.rstrip(b"\r\n"))
                    out.append(b"250 2.1.0 ok\r\n")
                elif verb == b"RCPT" and len(rcpts) < self.rcpt_limit:
                    rcpts.append(line[8:].split(b">")[0].lstrip(b"<").decode())
                    out.append(self._rcpt_ok())
                elif verb == b"RCPT":
                    out.append(self.over + b"\r\n")
                elif verb == b"DATA" and rcpts:
                    writer.write(b"".join(out) + b"354 go ahead\r\n")  # the whole group's replies at once
                    out = []
                    data = await self._data(reader)
                    if data is None:
                        return
                    self.messages.append((rcpts, data))
                    out.append(b"250 2.0.0 queued\r\n")
                elif verb == b"DATA":
                    out.append(b"554 5.5.1 no valid recipients\r\n")
                else:
                    out.append(b"250 2.0.0 ok\r\n")
                if verb in (b"EHLO", b"DATA", b"RSET", b"NOOP"):
                    writer.write(b"".join(out))
                    out = []
                await writer.drain()
        except (asyncio.TimeoutError, asyncio.CancelledError, ConnectionError):
            pass
        finally:
            writer.close()

    def rcpts(self):
        return sorted(r for m in self.messages for r in m[0])



@t.test("STARTTLS + AUTH upstream: a message from swaks arrives byte for byte")
def _():
    sink = t.Sink(SINK_TLS + ["--require-auth", f"{UP_USER}:{UP_PW}"])
    relay = t.Relay(extra_config=RETRY)
    sec = secret_file(relay)
    reconfigure(relay, [f"localhost:{sink.port} tls=starttls ca={SINK_CA} auth={sec}"])
    relay.add_user(ALICE, ALICE_PW)
    relay.start()
    mid = marker("swaks")
    data = (f"From: <{ALICE}>\r\nTo: <bob@example.net>\r\nSubject: forward test\r\n"
            f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{mid}@example.org>\r\n\r\n"
            "first line\r\n.a line that starts with a dot\r\n..two dots\r\n.\tdot tab\r\nlast line\r\n")
    path = os.path.join(relay.dir, "swaks.eml")
    with open(path, "w", newline="") as f:
        f.write(data[:-2])  # swaks ends DATA with CRLF . CRLF itself
    rc, out = t.swaks(["--server", f"127.0.0.1:{relay.port_starttls}", "--tls", "--auth", "PLAIN",
                       "--auth-user", ALICE, "--auth-password", ALICE_PW, "--from", ALICE,
                       "--to", "bob@example.net", "--data", "@" + path])
    t.is_(rc, 0, "swaks got 250")
    msgs = wait_msgs(sink, 1)
    t.is_(len(msgs), 1, "one message at the sink")
    if not msgs:
        return done(relay, sink)
    meta, eml = msgs[0]
    t.is_(meta["auth_user"], UP_USER, "relayd authenticated to the upstream")
    t.ok(meta["tls"], "over TLS (STARTTLS)")
    t.is_(meta["mail_from"], ALICE, "envelope sender")
    t.is_(meta["rcpt_tos"], ["bob@example.net"], "envelope recipient")
    t.ok(eml.endswith(data.encode()), "the submitted message is intact at the end (dot lines too)",
         eml[-300:])
    prefix = eml[:len(eml) - len(data)]
    t.like(prefix, rb"\AReceived: [^\r\n]*(\r\n[ \t][^\r\n]*)*\r\n\Z", "only a Received: header was added")
    t.ok(t.wait_for(lambda: not relay.queue_ids(), 5 * t.SLOW), "queue file removed after delivery")
    t.like(relay.log(), r"forward event=delivered upstream=localhost:\d+ rcpt=<bob@example.net> "
           r"reply=\"250 [^\"]*\" delay=\d", "delivered log line")
    t.unlike(relay.log(), re.escape(UP_PW), "the upstream password is not in the log")
    done(relay, sink)


@t.test("a 2 MB message of dot lines arrives byte for byte (read from the queue in 64 KiB pieces)")
def _():
    sink = t.Sink([])
    relay = make_relay([f"127.0.0.1:{sink.port} tls=none"], extra=RETRY + "max_message_size 5M\n")
    # lines of 3, 4 and 5 bytes that start with a dot: the pieces' edges fall at every place in
    # a line, a line start among them; no line ends at the very end of the body
    lines = [".\r\n", "..\r\n", ".x.\r\n"]
    body = "".join(lines[i % 3] for i in range(2 * 1024 * 1024 // 4)) + "end"
    data = (f"From: <{ALICE}>\r\nTo: <bob@example.net>\r\nSubject: dots\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
            f"Message-ID: <{marker('dots')}@example.org>\r\n\r\n{body}")
    c = relay.smtp_starttls()
    c.login(ALICE, ALICE_PW)
    c.mail(ALICE)
    c.rcpt("bob@example.net")
    code, resp = c.data(data.encode())  # smtplib dot-stuffs, and ends the body with CRLF
    c.quit()
    t.is_(code, 250, "accepted")
    msgs = wait_msgs(sink, 1, 30)
    t.is_(len(msgs), 1, "one message at the sink")
    if msgs:
        eml = msgs[0][1]
        t.ok(eml.endswith((data + "\r\n").encode()), "every dot line intact, CRLF added at the end only once",
             eml[-100:])
    done(relay, sink)


@t.test("relayd to relayd: PIPELINING, AUTH, DSN parameters (RET, ENVID, NOTIFY, ORCPT) carried")
def _():
    upstream = t.Relay()
    upstream.add_user(UP_USER, UP_PW, senders=["*"])
    upstream.start()
    relay = t.Relay(extra_config=RETRY)
    sec = secret_file(relay)
    reconfigure(relay, [f"localhost:{upstream.port_starttls} tls=starttls ca={upstream.ca_file} auth={sec}"])
    relay.add_user(ALICE, ALICE_PW)
    relay.start()
    c = relay.session(ALICE)
    msg = t.make_message(ALICE, "x@example.net", subject=marker("r2r"),
                         body=".leading dot\r\nplain\r\n",
                         extra_headers=["Date: Mon, 01 Jan 2024 00:00:00 +0000", "Message-ID: <r2r@example.org>"])
    t.is_(c.cmd(f"MAIL FROM:<{ALICE}> RET=HDRS ENVID=env+2B1")[0], 250, "MAIL with RET and ENVID")
    t.is_(c.cmd("RCPT TO:<x@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+2Bo@example.net")[0], 250,
          "RCPT with NOTIFY and ORCPT")
    t.is_(c.cmd("RCPT TO:<y@example.net>")[0], 250, "plain RCPT")
    t.is_(c.cmd("DATA")[0], 354, "DATA")
    c.send(t.dot_stuff(msg))
    code, text = c.reply()
    qid = t.queued_id(text)
    c.cmd("QUIT")
    t.ok(t.wait_for(lambda: upstream.queue_ids(), 10 * t.SLOW), "the message is in the upstream relayd's queue")
    files = upstream.queue_files()
    if files:
        env, body, _ = t.queue_parse(list(files.values())[0])
        t.is_(env.get("ret"), ["HDRS"], "RET carried")
        t.is_(env.get("envid"), ["env+2B1"], "ENVID carried")
        t.is_(env.get("rcpt"), ["6 rfc822;x+2Bo@example.net x@example.net", "0 - y@example.net"],
              "NOTIFY and ORCPT carried, per recipient")
        t.is_(env.get("user"), [UP_USER], "authenticated as the auth= user")
        t.ok(body.endswith(msg), "message intact (leading dot too)", body[-200:])
        t.is_(t.header_count(body, "Received"), 2, "one Received: per relayd")
    t.ok(wait_log(relay, rf"{qid} forward event=delivered upstream=localhost:\d+ rcpt=<y@example\.net> "
                  r"reply=\"250 2\.0\.0 Ok: queued as [0-9a-f]{16}\"", 10),
         "delivered, the upstream's queue id logged")
    t.ok(t.wait_for(lambda: not relay.queue_ids(), 5 * t.SLOW), "removed from the queue")
    done(relay)
    upstream.stop()


@t.test("an upstream certificate from an untrusted CA is refused, accepted once ca= names it")
def _():
    sink = t.Sink(SINK_TLS)
    relay = t.Relay(extra_config=RETRY)
    reconfigure(relay, [f"localhost:{sink.port} tls=starttls ca={relay.ca_file}"])
    relay.add_user(ALICE, ALICE_PW)
    relay.start()
    code, qid, _ = submit(relay, ["carol@example.net"], subject=marker("ca"))
    t.is_(code, 250, "accepted")
    t.ok(wait_log(relay, r"upstream-failed .*tls-handshake", 10), "handshake refused (verification)")
    t.ok(wait_log(relay, rf"^.*{qid} forward event=deferred", 10), "message deferred")
    t.is_(sink.messages(), [], "nothing reached the untrusted upstream")
    t.ok(t.wait_for(lambda: re.search(rb"\nT \d+ \d+ ", relay.queue_files().get(qid, b"")), 5 * t.SLOW),
         "still queued, with a T record (appended off the loop, after the log line)")
    relay.stop()
    reconfigure(relay, [f"localhost:{sink.port} tls=starttls ca={SINK_CA}"])
    relay.start()
    msgs = wait_msgs(sink, 1)
    t.is_(len(msgs), 1, "delivered after ca= names the upstream's CA and a restart")
    t.ok(t.wait_for(lambda: qid not in relay.queue_ids(), 5 * t.SLOW), "and removed from the queue")
    done(relay, sink)


@t.test("an upstream certificate for another host name is refused (the name is verified, not only the chain)")
def _():
    d = t.mkdtemp("relaytest-othername-")
    with open(os.path.join(d, "other.tmpl"), "w") as f:
        f.write('cn = "mail.other.example"\nserial = 7\nexpiration_days = 30\ndns_name = "mail.other.example"\n'
                'tls_www_server\nsigning_key\nencryption_key\n')
    key, cert = os.path.join(d, "other-key.pem"), os.path.join(d, "other-cert.pem")
    subprocess.run(["certtool", "--generate-privkey", "--key-type=ecdsa", "--outfile", key], check=True, capture_output=True)
    subprocess.run(["certtool", "--generate-certificate", "--load-privkey", key, "--load-ca-certificate", SINK_CA,
                    "--load-ca-privkey", os.path.join(SINK_CERTS, "ca-key.pem"), "--template",
                    os.path.join(d, "other.tmpl"), "--outfile", cert], check=True, capture_output=True)
    sink = t.Sink(["--tls-cert", cert, "--tls-key", key])
    relay = make_relay([f"localhost:{sink.port} tls=starttls ca={SINK_CA}"])
    code, qid, _ = submit(relay, ["nina@example.net"], subject=marker("name"))
    t.is_(code, 250, "accepted")
    t.ok(wait_log(relay, r"upstream-failed .*tls-handshake", 10), "the handshake fails: the certificate is not for localhost")
    t.ok(wait_log(relay, rf"{qid} forward event=deferred", 10), "the message is deferred, not sent")
    t.is_(sink.messages(), [], "nothing reached the upstream with a trusted chain but another name")
    done(relay, sink)


@t.test("tls=none and verify=no are warned about at start, each upstream by name")
def _():
    relay = make_relay([f"127.0.0.1:{t.free_port()} tls=none", f"localhost:{t.free_port()} tls=implicit verify=no",
                        f"localhost:{t.free_port()} tls=starttls ca={SINK_CA}"])
    log = relay.log()
    t.like(log, r"main event=insecure-upstream upstream=127\.0\.0\.1:\d+ tls=none verify=", "tls=none warned")
    t.like(log, r"main event=insecure-upstream upstream=localhost:\d+ tls=implicit verify=no", "verify=no warned")
    t.is_(len(re.findall(r"event=insecure-upstream", log)), 2, "the verified upstream is not")
    done(relay)


@t.test("tls=starttls and the upstream does not offer STARTTLS: never sent in clear")
def _():
    sink = t.Sink()
    relay = make_relay([f"127.0.0.1:{sink.port} tls=starttls"])
    code, qid, _ = submit(relay, ["dave@example.net"])
    t.is_(code, 250, "accepted")
    t.ok(wait_log(relay, r"upstream-failed .*does not offer STARTTLS", 10), "failure logged")
    time.sleep(1)
    t.is_(sink.messages(), [], "nothing sent in clear")
    t.ok(qid in relay.queue_ids(), "still queued")
    done(relay, sink)


@t.test("implicit TLS upstream")
def _():
    sink = t.Sink(SINK_TLS + ["--implicit-tls"])
    relay = make_relay([f"localhost:{sink.port} tls=implicit ca={SINK_CA}"])
    code, qid, _ = submit(relay, ["erin@example.net"])
    msgs = wait_msgs(sink, 1)
    t.ok(code == 250 and len(msgs) == 1, "delivered over implicit TLS")
    done(relay, sink)


@t.test("upstream down, then up: delivered after a retry")
def _():
    port = t.free_port()
    relay = make_relay([f"127.0.0.1:{port} tls=none"])
    code, qid, _ = submit(relay, ["frank@example.net"])
    t.is_(code, 250, "accepted while the upstream is down")
    t.ok(wait_log(relay, rf"{qid} forward event=deferred attempts=1", 10), "deferred (T record)")
    t.ok(t.wait_for(lambda: re.search(rb"\nT 1 \d+ ", relay.queue_files().get(qid, b"")), 5 * t.SLOW),
         "T record in the queue file")
    sink = t.Sink(["--listen", f"127.0.0.1:{port}"])
    msgs = wait_msgs(sink, 1, 15)
    t.is_(len(msgs), 1, "arrived once the upstream is up")
    t.ok(t.wait_for(lambda: qid not in relay.queue_ids(), 5 * t.SLOW), "removed from the queue")
    done(relay, sink)


@t.test("4xx at DATA, then 250 on the retry")
def _():
    sink = t.Sink(["--fail-data-times", "1"])
    relay = make_relay([f"127.0.0.1:{sink.port} tls=none"])
    code, qid, _ = submit(relay, ["gina@example.net"], subject=marker("4xx"))
    msgs = wait_msgs(sink, 1, 15)
    t.is_(len(msgs), 1, "delivered on the second attempt")
    t.like(relay.log(), rf"{qid} forward event=deferred attempts=1 retry=1s reason=\"[^\"]*451", "the 451 deferred it")
    t.ok(t.wait_for(lambda: qid not in relay.queue_ids(), 5 * t.SLOW), "removed from the queue")
    done(relay, sink)


def submit_notify(relay, rcpts, subject):
    """one message with RCPT parameters: rcpts is [(address, "NOTIFY=..." or "")]; returns the queue id"""
    c = relay.session(ALICE)
    msg = t.make_message(ALICE, rcpts[0][0], subject=subject)
    t.is_(c.cmd(f"MAIL FROM:<{ALICE}>")[0], 250, "MAIL")
    for addr, params in rcpts:
        c.cmd(f"RCPT TO:<{addr}>{' ' + params if params else ''}")
    t.is_(c.cmd("DATA")[0], 354, "DATA")
    c.send(t.dot_stuff(msg))
    code, text = c.reply()
    t.is_(code, 250, "accepted")
    c.cmd("QUIT")
    return t.queued_id(text)


@t.test("NOTIFY=SUCCESS and an upstream without DSN: a relayed DSN goes to the sender")
def _():
    sink = t.Sink(["--no-dsn"])
    relay = make_relay([f"127.0.0.1:{sink.port} tls=none"])
    qid = submit_notify(relay, [("sue@example.net", "NOTIFY=SUCCESS,FAILURE"), ("sam@example.net", "")],
                        marker("relayed"))
    msgs = wait_msgs(sink, 2, 15)
    t.is_(len(msgs), 2, "the message and a notice arrived")
    normal = [m for m in msgs if m[0]["mail_from"] == ALICE]
    notices = [m for m in msgs if m[0]["mail_from"] == ""]
    t.ok(len(normal) == 1 and normal[0][0]["rcpt_options"] == [[], []], "no NOTIFY sent to an upstream without DSN",
         [m[0] for m in normal])
    t.is_(len(notices), 1, "one notice with the null sender")
    if notices:
        meta, eml = notices[0]
        t.is_(meta["rcpt_tos"], [ALICE], "addressed to the sender")
        t.like(header(eml, "Subject") or "", r"Successful Mail Delivery Report", "Subject")
        t.like(eml, rb"Final-Recipient: rfc822; sue@example\.net\r\nAction: relayed\r\nStatus: 2\.0\.0\r\n"
               rb"Remote-MTA: dns; 127\.0\.0\.1\r\nDiagnostic-Code: smtp; 250 ", "Action: relayed for sue@")
        t.unlike(eml, rb"sam@example\.net\r\nAction", "not the recipient without NOTIFY=SUCCESS")
        t.like(eml, rb"Content-Type: text/rfc822-headers", "the original's headers")
    t.ok(wait_log(relay, rf"{qid} forward event=notice action=relayed notice=[0-9a-f]{{16}}", 5), "notice log line")
    t.ok(t.wait_for(lambda: not relay.queue_ids(), 5 * t.SLOW), "original and notice removed from the queue",
         relay.queue_ids())
    done(relay, sink)


@t.test("NOTIFY=SUCCESS and an upstream with DSN: NOTIFY passed on, no notice from relayd")
def _():
    sink = t.Sink()
    relay = make_relay([f"127.0.0.1:{sink.port} tls=none"])
    qid = submit_notify(relay, [("sue@example.net", "NOTIFY=SUCCESS")], marker("passed"))
    msgs = wait_msgs(sink, 1, 15)
    t.ok(t.wait_for(lambda: not relay.queue_ids(), 5 * t.SLOW), "removed from the queue")
    time.sleep(0.5)
    msgs = sink.messages()
    t.is_([m[0]["mail_from"] for m in msgs], [ALICE], "only the message arrived")
    t.ok(msgs and msgs[0][0]["rcpt_options"] == [["NOTIFY=SUCCESS"]], "NOTIFY carried",
         [m[0] for m in msgs])
    t.unlike(relay.log(), rf"{qid} forward event=notice", "no notice")
    done(relay, sink)


@t.test("delay_warning: one delayed DSN to the sender while 451s defer the message")
def _():
    sink = t.Sink(["--fail-data-times", "3"])
    relay = make_relay([f"127.0.0.1:{sink.port} tls=none"], extra=RETRY + "delay_warning 2s\n")
    qid = submit_notify(relay, [("dora@example.net", ""), ("dan@example.net", "NOTIFY=FAILURE")],
                        marker("delayed"))
    t.ok(wait_log(relay, rf"{qid} forward event=notice action=delayed notice=[0-9a-f]{{16}}", 20),
         "delayed notice log line")
    msgs = wait_msgs(sink, 2, 20)
    t.ok(t.wait_for(lambda: not relay.queue_ids(), 10 * t.SLOW), "original and notice leave the queue",
         relay.queue_ids())
    msgs = sink.messages()
    normal = [m for m in msgs if m[0]["mail_from"] == ALICE]
    notices = [m for m in msgs if m[0]["mail_from"] == ""]
    t.is_(len(normal), 1, "the message was delivered in the end")
    t.is_(len(notices), 1, "exactly one delayed notice")
    if notices:
        meta, eml = notices[0]
        t.is_(meta["rcpt_tos"], [ALICE], "addressed to the sender")
        t.like(header(eml, "Subject") or "", r"Delayed Mail", "Subject")
        t.like(eml, rb"Final-Recipient: rfc822; dora@example\.net\r\nAction: delayed\r\nStatus: 4\.3\.0\r\n"
               rb"Diagnostic-Code: smtp; 451 4\.3\.0 ", "Action: delayed, Status 4.3.0 from the 451")
        t.unlike(eml, rb"dan@example\.net\r\nAction", "not the recipient with NOTIFY=FAILURE only")
    t.like(relay.log(), rf"{qid} forward event=deferred attempts=3 ", "deferred three times")
    done(relay, sink)


@t.test("messages in turn over one upstream connection: no RSET after a delivered transaction")
def _():
    sink = t.Sink()
    relay = make_relay([f"127.0.0.1:{sink.port} tls=none"])
    for n in range(3):
        code, _, _ = submit(relay, [f"turn{n}@example.net"], subject=marker(f"turn{n}"))
        t.is_(code, 250, f"message {n + 1} accepted")
        wait_msgs(sink, n + 1, 15)
    metas = [m[0] for m in sink.messages()]
    t.is_([m["rcpt_tos"] for m in metas], [[f"turn{n}@example.net"] for n in range(3)], "delivered in turn")
    t.is_([m["connection"] for m in metas], [metas[0]["connection"]] * 3, "over one upstream connection")
    t.is_([m["rsets"] for m in metas], [0, 0, 0], "no RSET between them (RFC 5321 4.1.1.4)")
    done(relay, sink)


@t.test("an upstream's cap of messages per connection (421 at MAIL): the next goes at once on a new connection")
def _():
    sink = t.Sink(["--messages-per-connection", "2"])
    relay = make_relay([f"127.0.0.1:{sink.port} tls=none connections=1"], extra="retry_min 30s\nretry_max 60s\n")
    c = relay.smtp_starttls()
    c.login(ALICE, ALICE_PW)
    for n in range(5):
        code, _, _ = submit(relay, [f"cap{n}@example.net"], subject=marker(f"cap{n}"), conn=c)
        t.is_(code, 250, f"message {n + 1} accepted")
    c.quit()
    msgs = wait_msgs(sink, 5, 10)
    t.is_(len(msgs), 5, "all five delivered within seconds, not after retry_min (30 s)")
    t.is_(sorted(m[0]["connection"] for m in msgs), [1, 1, 2, 2, 3], "two per upstream connection")
    t.unlike(relay.log(), r"forward event=(deferred|attempt-failed)", "no deferral, no failed attempt")
    t.like(relay.log(), r"forward event=connection-cap upstream=\S+ delivered_before=2", "the cap is logged")
    done(relay, sink)


@t.test("a 421 at the first MAIL of a connection is still a failed attempt (the cap needs a delivery first)")
def _():
    port = t.free_port()
    relay = make_relay([f"127.0.0.1:{port} tls=none"], extra="retry_min 30s\nretry_max 60s\n")
    script = os.path.join(relay.dir, "say421.py")
    with open(script, "w") as f:
        f.write("import socket,sys\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                f"s.bind(('127.0.0.1', {port})); s.listen(8); s.settimeout(20)\n"
                "c, _ = s.accept(); c.settimeout(10); f = c.makefile('rwb')\n"
                "f.write(b'220 x ESMTP\\r\\n'); f.flush(); f.readline()\n"
                "f.write(b'250-x\\r\\n250 PIPELINING\\r\\n'); f.flush(); f.readline()\n"
                "f.write(b'421 4.7.0 busy\\r\\n'); f.flush(); c.close()\n")
    up = subprocess.Popen([t.PYTHON, script])
    time.sleep(0.3)
    code, qid, _ = submit(relay, ["first421@example.net"], subject=marker("first421"))
    t.is_(code, 250, "accepted")
    t.ok(wait_log(relay, rf"{qid} forward event=deferred attempts=1", 10), "deferred: a 421 without a delivery first")
    t.unlike(relay.log(), r"connection-cap", "not taken for a cap")
    up.wait(timeout=20)
    done(relay)


@t.test("5xx for one of three recipients: that one bounces, the others are delivered")
def _():
    sink = t.Sink(["--reply-rcpt", "bad@example.net=550"])
    relay = make_relay([f"127.0.0.1:{sink.port} tls=none"])
    rcpts = ["ok1@example.net", "bad@example.net", "ok2@example.net"]
    subj = marker("bounce")
    code, qid, orig = submit(relay, rcpts, subject=subj)
    t.is_(code, 250, "accepted")
    msgs = wait_msgs(sink, 2, 15)
    t.is_(len(msgs), 2, "the message and a bounce arrived")
    normal = [m for m in msgs if m[0]["mail_from"] == ALICE]
    bounces = [m for m in msgs if m[0]["mail_from"] == ""]
    t.ok(len(normal) == 1 and normal[0][0]["rcpt_tos"] == ["ok1@example.net", "ok2@example.net"],
         "the other two were delivered", [m[0] for m in msgs])
    t.is_(len(bounces), 1, "one bounce with the null sender")
    if bounces:
        meta, eml = bounces[0]
        t.is_(meta["rcpt_tos"], [ALICE], "addressed to the sender")
        t.like(header(eml, "Content-Type") or "", r"multipart/report; report-type=delivery-status",
               "multipart/report")
        t.like(eml, rb"Final-Recipient: rfc822; bad@example\.net\r\nAction: failed\r\nStatus: 5\.1\.1\r\n",
               "names the failed recipient, action and status")
        t.like(eml, rb"Diagnostic-Code: smtp; 550 5\.1\.1", "with the upstream's reply")
        t.unlike(eml, rb"Final-Recipient: rfc822; ok[12]@", "not the delivered ones")
        t.ok(subj.encode() in eml, "the original message is attached")
    t.ok(t.wait_for(lambda: not relay.queue_ids(), 5 * t.SLOW), "original and bounce removed from the queue",
         relay.queue_ids())
    t.ok(wait_log(relay, rf"{qid} forward event=bounced bounce=[0-9a-f]{{16}} failed=1 delivered=2", 5),
         "bounced log line")
    done(relay, sink)


@t.test("queue_lifetime passed: pending recipients fail with 4.4.7 and the sender gets a bounce")
def _():
    dead = t.free_port()
    relay = make_relay([f"127.0.0.1:{dead} tls=none"], extra=RETRY + "queue_lifetime 3s\n")
    code, qid, _ = submit(relay, ["ivan@example.net"], subject=marker("expire"))
    t.is_(code, 250, "accepted")
    t.ok(t.wait_for(lambda: qid not in relay.queue_ids(), 10 * t.SLOW), "the original leaves the queue")
    files = relay.queue_files()
    t.is_(len(files), 1, "one message left: the bounce (its upstream is dead too)")
    if files:
        env, body, _ = t.queue_parse(list(files.values())[0])
        t.is_(env.get("from"), [""], "null reverse-path")
        t.is_(env.get("rcpt"), [f"1 - {ALICE}"], "to the sender, NOTIFY=NEVER")
        t.like(body, rb"Final-Recipient: rfc822; ivan@example\.net\r\nAction: failed\r\nStatus: 4\.4\.7\r\n",
               "Status 4.4.7 for the expired recipient")
        t.like(body, rb"Diagnostic-Code: smtp; 554 4\.4\.7 Delivery time expired: last error: ",
               "with the last error")
    t.like(relay.log(), rf"{qid} forward event=expired rcpt=<ivan@example\.net>", "expired log line")
    t.is_(relay.stop(), 0, "clean exit with a message still queued")
    t.like(relay.log(), r"forward event=stopped", "forwarder stopped")


# a bounce's returned part with the original's header section only (Received: first)
HDRS_ONLY = rb"Content-Type: text/rfc822-headers\r\n\r\nReceived: [^\r]*\r\n(?:\t[^\r]*\r\n)*From: <alice@example\.org>"


@t.test("a message over the upstream's SIZE fails for good (no retry loop); its bounce returns the headers only")
def _():
    sink = t.Sink(["--max-size", "3000"])
    relay = make_relay([f"127.0.0.1:{sink.port} tls=none"])
    code, qid, _ = submit(relay, ["judy@example.net"], subject=marker("too big"),
                          body=("x" * 70 + "\r\n") * 60)
    t.is_(code, 250, "accepted (relayd's own limit is larger)")
    t.ok(wait_log(relay, rf"{qid} forward event=failed upstream=\S+ rcpt=<judy@example\.net> "
                  r"reply=\"552 5\.3\.4 Message size \d+ exceeds the upstream's limit of 3000", 10),
         "failed permanently with 552 5.3.4, without sending it")
    t.ok(wait_log(relay, rf"{qid} forward event=bounced", 10), "bounced")
    msgs = wait_msgs(sink, 1)
    t.is_([m[0]["rcpt_tos"] for m in msgs], [[ALICE]], "the bounce (too big whole) reached the sender")
    eml = msgs[0][1] if msgs else b""
    t.like(eml, HDRS_ONLY, "with the headers only")
    t.unlike(eml, rb"xxxxxxxxxx", "not the message's body")
    t.like(eml, rb"Status: 5\.3\.4", "and the reason")
    t.ok(t.wait_for(lambda: not relay.queue_ids(), 5 * t.SLOW), "queue empty")
    t.unlike(relay.log(), r"event=deferred|event=dropped", "no retries, nothing dropped")
    done(relay, sink)


@t.test("an 8-bit message to an upstream without 8BITMIME: its bounce returns the headers only (7-bit), not dropped")
def _():
    up = Upstream(ehlo=(b"PIPELINING", b"ENHANCEDSTATUSCODES"))
    relay = make_relay([f"127.0.0.1:{up.port} tls=none"])
    c = relay.smtp_starttls()
    c.login(ALICE, ALICE_PW)
    c.mail(ALICE, ["BODY=8BITMIME"])
    c.rcpt("ursula@example.net")
    code, resp = c.data(t.make_message(ALICE, "ursula@example.net", subject=marker("8bit")) +
                        "d\u00e9j\u00e0 vu\r\n".encode())
    c.quit()
    qid = t.queued_id(f"{code} {resp.decode()}")
    t.is_(code, 250, "accepted")
    t.ok(wait_log(relay, rf"{qid} forward event=failed .*554 5\.6\.3", 10), "failed: 554 5.6.3")
    t.ok(t.wait_for(lambda: up.messages, 10 * t.SLOW), "the bounce reached the upstream")
    rc, data = up.messages[0] if up.messages else ([], b"")
    t.is_(rc, [ALICE], "to the sender")
    t.like(data, HDRS_ONLY, "with the headers only")
    t.ok(not any(b & 0x80 for b in data), "7-bit: the 8-bit body is not in it")
    t.unlike(relay.log(), r"event=dropped", "nothing dropped")
    done(relay, up)


@t.test("UTF-8 headers to an upstream without 8BITMIME: the bounce goes without the returned message, not dropped")
def _():
    up = Upstream(ehlo=(b"PIPELINING", b"ENHANCEDSTATUSCODES"))
    relay = make_relay([f"127.0.0.1:{up.port} tls=none"])
    c = relay.smtp_starttls()
    c.login(ALICE, ALICE_PW)
    c.mail(ALICE, ["BODY=8BITMIME", "SMTPUTF8"])
    c.rcpt("ursula@example.net")
    code, resp = c.data(t.make_message(ALICE, "ursula@example.net", subject="caf\u00e9 " + marker("utf8 hdr")))
    c.quit()
    qid = t.queued_id(f"{code} {resp.decode()}")
    t.is_(code, 250, "accepted")
    t.ok(wait_log(relay, rf"{qid} forward event=failed ", 10), "failed: the upstream cannot take it")
    t.ok(t.wait_for(lambda: up.messages, 10 * t.SLOW), "the bounce reached the upstream")
    rc, data = up.messages[0] if up.messages else ([], b"")
    t.is_(rc, [ALICE], "to the sender")
    t.ok(not any(b & 0x80 for b in data), "7-bit: neither the message nor its UTF-8 headers are in it")
    t.like(data, rb"Final-Recipient: rfc822; ursula@example\.net\r\nAction: failed\r\n", "the report names the recipient")
    t.like(data, rb"It is not returned\.", "and says the message is not returned")
    t.unlike(data, rb"Undelivered Message", "no returned part")
    t.unlike(relay.log(), r"event=dropped", "nothing dropped")
    done(relay, up)


@t.test("hostname without a dot (localhost): EHLO to the upstream with an address literal, and a warning at start")
def _():
    up = Upstream(fqdn_helo=True)
    relay = make_relay([f"127.0.0.1:{up.port} tls=none"], extra=RETRY + "hostname localhost\n")
    t.like(relay.log(), r"main event=hostname-not-fqdn hostname=localhost ", "warned at start")
    code, qid, _ = submit(relay, ["walter@example.net"], subject=marker("ehlo literal"))
    t.is_(code, 250, "accepted")
    t.ok(t.wait_for(lambda: up.messages, 10 * t.SLOW), "delivered by an upstream that refuses non-FQDN EHLO names")
    t.is_(up.ehlos[:1], ["[127.0.0.1]"], "EHLO [127.0.0.1]: the connection's address literal")
    done(relay, up)
    up = Upstream(fqdn_helo=True)
    relay = make_relay([f"127.0.0.1:{up.port} tls=none"])
    code, qid, _ = submit(relay, ["walter@example.net"], subject=marker("ehlo name"))
    t.ok(t.wait_for(lambda: up.messages, 10 * t.SLOW), "with a domain name as hostname: delivered")
    t.is_(up.ehlos[:1], ["relay.test"], "EHLO relay.test: the name itself")
    t.unlike(relay.log(), r"hostname-not-fqdn", "and no warning")
    done(relay, up)


class EarlyReply(Upstream):
    """an Upstream whose first connection answers MAIL/RCPT/DATA and a 250 "for the dot" in one
    write, before any of the body, then drops the connection; later ones behave"""

    async def _client(self, reader, writer):
        if self.connections > 0:
            return await Upstream._client(self, reader, writer)
        self.connections += 1
        try:
            writer.write(b"220 up.test ESMTP\r\n")
            while True:
                line = await asyncio.wait_for(reader.readline(), 30)
                if not line:
                    return
                if line[:4].upper() == b"EHLO":
                    writer.write(self.ehlo)
                elif line[:4].upper() == b"DATA":
                    writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 queued (not really)\r\n")
                    await writer.drain()
                    return
        except (asyncio.TimeoutError, asyncio.CancelledError, ConnectionError):
            pass
        finally:
            writer.close()


@t.test("a 250 that comes before the message's final dot was sent is out of sync: retried, not taken as delivered")
def _():
    up = EarlyReply()
    relay = make_relay([f"127.0.0.1:{up.port} tls=none"])
    code, qid, _ = submit(relay, ["xena@example.net"], subject=marker("early 250"), body="the body\r\n" * 50)
    t.is_(code, 250, "accepted")
    t.ok(wait_log(relay, rf"{qid} forward event=deferred .*out of sync\): 250 2\.0\.0 queued \(not really\)", 10),
         "the early 250 is not the message's: deferred")
    t.ok(t.wait_for(lambda: up.messages, 15 * t.SLOW), "the retry delivers it")
    t.is_(len(up.messages), 1, "once")
    data = up.messages[0][1] if up.messages else b""
    t.is_(data.count(b"the body\r\n"), 50, "with the whole body")
    t.ok(wait_log(relay, rf"{qid} forward event=delivered", 10), "logged delivered, by the retry")
    t.is_(len(re.findall(rf"{qid} forward event=delivered", relay.log())), 1, "once")
    done(relay, up)


@t.test("an upstream whose SIZE is too small for a message: the next upstream takes it")
def _():
    small, big = t.Sink(["--max-size", "300"]), t.Sink([])
    relay = make_relay([f"127.0.0.1:{small.port} tls=none", f"127.0.0.1:{big.port} tls=none"])
    code, qid, _ = submit(relay, ["vera@example.net"], subject=marker("next upstream"), body="x" * 400 + "\r\n")
    t.is_(code, 250, "accepted")
    t.is_(len(wait_msgs(big, 1)), 1, "delivered by the second upstream")
    t.ok(wait_log(relay, rf"{qid} forward event=delivered upstream=127\.0\.0\.1:{big.port} ", 5), "logged there")
    t.unlike(relay.log(), rf"{qid} forward event=(failed|bounced)", "no failure, no bounce")
    t.is_(small.messages(), [], "nothing sent to the first")
    done(relay, small, big)


@t.test("a mute upstream times out (no greeting) and the message is deferred")
def _():
    import socket
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(5)   # never accepted: the connection is made, nothing is ever said
    relay = make_relay([f"127.0.0.1:{mute.getsockname()[1]} tls=none"], extra=RETRY + "upstream_timeout 2s\n")
    code, qid, _ = submit(relay, ["kim@example.net"])
    t.ok(wait_log(relay, r"upstream-failed upstream=\S+ state=greeting reason=\"timeout in state greeting\"", 10),
         "greeting timeout (upstream_timeout 2s)")
    t.ok(wait_log(relay, rf"{qid} forward event=deferred attempts=1", 5), "deferred")
    relay.stop()
    mute.close()


@t.test("two upstreams, the first dead: delivered through the second")
def _():
    dead = t.free_port()
    sink = t.Sink()
    relay = make_relay([f"127.0.0.1:{dead} tls=none", f"127.0.0.1:{sink.port} tls=none"])
    code, qid, _ = submit(relay, ["hank@example.net"])
    msgs = wait_msgs(sink, 1, 10)
    t.is_(len(msgs), 1, "delivered through the second upstream")
    t.like(relay.log(), rf"upstream-failed upstream=127\.0\.0\.1:{dead} ", "the first one failed")
    t.ok(wait_log(relay, rf"{qid} forward event=delivered upstream=127\.0\.0\.1:{sink.port} ", 10),
         "second upstream named")  # logged when the 250 is read: after the sink has the message
    t.unlike(relay.log(), rf"{qid} forward event=deferred", "no deferral needed")
    done(relay, sink)


@t.test("an IPv6 upstream is named [::1]:PORT in the log and the metrics label, as relayd.conf writes it")
def _():
    if not t.have_ipv6():
        t.skip("IPv6 upstream named in brackets", "no ::1 here")
        return
    sink = t.Sink(["--listen", "[::1]:0"])
    mport = t.free_port()
    relay = make_relay([f"[::1]:{sink.port} tls=none"], extra=RETRY + f"metrics 127.0.0.1:{mport}\n")
    code, qid, _ = submit(relay, ["ivan@example.net"])
    t.is_(code, 250, "accepted")
    t.ok(wait_log(relay, rf"{qid} forward event=delivered upstream=\[::1\]:{sink.port} ", 10),
         "delivered line names [::1]:PORT")
    rc, out = t.curl(["-s", f"http://127.0.0.1:{mport}/metrics"])
    t.like(out, rf'upstream="\[::1\]:{sink.port}"', "metrics label is [::1]:PORT")
    t.unlike(out, rf'upstream="::1:{sink.port}"', "not ::1:PORT")
    done(relay, sink)


@t.test("kill -9 under load: every message that got 250 arrives")
def _():
    sink = t.Sink()
    relay = make_relay([f"127.0.0.1:{sink.port} tls=none"])
    got250 = set()
    lock = threading.Lock()
    stop = threading.Event()

    def client(n):
        try:
            c = relay.smtp_starttls()
            c.login(ALICE, ALICE_PW)
            for i in range(20):
                if stop.is_set():
                    break
                tid = f"k9-{n}-{i}-{os.getpid()}"
                code, _, _ = submit(relay, ["load@example.net"], subject=tid, headers=[f"X-Test-Id: {tid}"],
                                    conn=c)
                if code == 250:
                    with lock:
                        got250.add(tid)
            c.quit()
        except (smtplib.SMTPException, OSError):
            pass

    threads = [threading.Thread(target=client, args=(n,)) for n in range(5)]
    for th in threads:
        th.start()
    t.wait_for(lambda: len(got250) >= 40, 20 * t.SLOW)
    relay.kill9()
    stop.set()
    for th in threads:
        th.join(20)
    n250 = len(got250)
    t.ok(n250 >= 40, f"{n250} messages got 250 before kill -9")
    relay.start()

    def arrived():
        return {header(eml, "X-Test-Id") for _, eml in sink.messages()}
    seen = t.wait_for(lambda: (lambda a: a if got250 <= a else None)(arrived()), 30 * t.SLOW) or arrived()
    missing = got250 - seen
    t.ok(not missing, f"all {n250} acknowledged messages arrived after the restart", sorted(missing)[:10])
    t.ok(t.wait_for(lambda: not relay.queue_ids(), 10 * t.SLOW), "queue empty at the end", len(relay.queue_ids()))
    done(relay, sink)


@t.test("pacing: rate=5/minute sends 5 and holds the rest")
def _():
    sink = t.Sink()
    relay = make_relay([f"127.0.0.1:{sink.port} tls=none rate=5/minute"])
    c = relay.smtp_starttls()
    c.login(ALICE, ALICE_PW)
    codes = [submit(relay, ["pace@example.net"], subject=marker("pace"), conn=c)[0] for _ in range(10)]
    c.quit()
    t.is_(codes, [250] * 10, "10 accepted")
    wait_msgs(sink, 5, 10)
    time.sleep(3)
    t.is_(len(sink.messages()), 5, "only 5 sent within the window")
    t.is_(len(relay.queue_ids()), 5, "5 held in the queue")
    t.like(relay.log(), r"forward event=paced upstream=127\.0\.0\.1:\d+ rate=5/60s", "pacing logged")
    t.unlike(relay.log(), r"event=deferred", "held without T records")
    done(relay, sink)


@t.test("an auth= file readable by others is refused at start")
def _():
    relay = t.Relay(extra_config=RETRY)
    sec = secret_file(relay, 0o644)
    reconfigure(relay, [f"127.0.0.1:{t.free_port()} tls=none auth={sec}"])
    relay.add_user(ALICE, ALICE_PW)
    try:  # the listeners are bound before the forwarder starts: wait for the exit too
        relay.start(timeout=5)
    except RuntimeError:
        pass
    t.ok(t.wait_for(lambda: not relay.running(), 10 * t.SLOW), "relayd refused to start")
    t.like(relay.log(), r"auth file .*upstream\.secret is readable by group or others: refused",
           "the error names the file and the problem")
    relay.stop()



@t.test("reload: a corrected upstream secret applies without a restart")
def _():
    sink = t.Sink(SINK_TLS + ["--require-auth", f"{UP_USER}:{UP_PW}"])
    relay = t.Relay(extra_config=RETRY)
    sec = os.path.join(relay.dir, "upstream.secret")
    with open(sec, "w") as f:
        f.write(f"{UP_USER}:wrong-password\n")
    os.chmod(sec, 0o600)
    reconfigure(relay, [f"localhost:{sink.port} tls=starttls ca={SINK_CA} auth={sec}"])
    relay.add_user(ALICE, ALICE_PW)
    relay.start()
    pid = relay.proc.pid
    code, qid, msg = submit(relay, ["bob@example.net"], subject=marker("reload"))
    t.is_(code, 250, "accepted")
    t.ok(wait_log(relay, r"event=deferred"), "deferred: the upstream refuses the wrong password")
    t.is_(sink.messages(), [], "nothing delivered yet")
    secret_file(relay)  # the right password
    rc, out = relay.relayctl("reload")
    t.is_(rc, 0, "relayctl reload")
    t.ok(wait_log(relay, r"forward event=reloaded upstreams=1"), "forwarder took the new settings")
    relay.relayctl("queue", "flush")
    msgs = wait_msgs(sink, 1)
    t.is_(len(msgs), 1, "delivered after the reload")
    t.is_(relay.proc.pid, pid, "same relayd process (no restart)")
    done(relay, sink)

@t.test("reload: a changed list of upstreams applies without a restart")
def _():
    sink_a = t.Sink([])
    relay = make_relay([f"127.0.0.1:{sink_a.port} tls=none"])
    pid = relay.proc.pid
    code, qid1, _ = submit(relay, ["ann@example.net"], subject=marker("list-a"))
    t.is_(len(wait_msgs(sink_a, 1)), 1, "the first message went to upstream A")
    dead = t.free_port()
    reconfigure(relay, [f"127.0.0.1:{dead} tls=none"])
    rc, _ = relay.relayctl("reload")
    t.is_(rc, 0, "relayctl reload with A replaced by a dead upstream")
    t.ok(wait_log(relay, r"forward event=reloaded upstreams=1 list=changed"),
         "the forwarder switched lists once A's idle session had quit")
    code, qid2, _ = submit(relay, ["ben@example.net"], subject=marker("list-dead"))
    t.ok(wait_log(relay, rf"{qid2} forward event=deferred attempts=1 .*127\.0\.0\.1:{dead}"),
         "a message for the dead upstream is deferred (it tried the new list)")
    sink_b = t.Sink([])
    reconfigure(relay, [f"127.0.0.1:{sink_b.port} tls=none"])
    relay.relayctl("reload")
    t.ok(t.wait_for(lambda: len(re.findall(r"list=changed", relay.log())) >= 2, 10 * t.SLOW),
         "second switch: to upstream B")
    code, qid3, _ = submit(relay, ["cid@example.net"], subject=marker("list-b"))
    msgs = wait_msgs(sink_b, 2, 20)
    t.is_(len(msgs), 2, "B got the deferred message and the new one")
    t.is_(len(sink_a.messages()), 1, "A got nothing after it was taken out")
    t.ok(t.wait_for(lambda: not ({qid2, qid3} & set(relay.queue_ids())), 5 * t.SLOW), "both removed from the queue")
    t.is_(relay.proc.pid, pid, "same relayd process (no restart)")
    t.unlike(relay.log(), r"reload-partial", "no restart asked for")
    done(relay, sink_a, sink_b)


@t.test("reload: a transaction in progress finishes on the old upstream, the next goes to the new one")
def _():
    slow = t.Sink(["--data-delay", "2"])
    relay = make_relay([f"127.0.0.1:{slow.port} tls=none"])
    code, qid1, _ = submit(relay, ["dan@example.net"], subject=marker("slow"))
    t.ok(wait_log(relay, r"forward event=connected upstream=127\.0\.0\.1:" + str(slow.port)), "sending to the slow upstream")
    time.sleep(0.5)  # the body is out, the reply is 2 s away
    fast = t.Sink([])
    reconfigure(relay, [f"127.0.0.1:{fast.port} tls=none"])
    relay.relayctl("reload")
    t.ok(wait_log(relay, r"forward event=switching"), "switch started")
    code, qid2, _ = submit(relay, ["eve@example.net"], subject=marker("after"))
    t.is_(len(wait_msgs(slow, 1)), 1, "the message in progress was delivered by the old upstream")
    t.ok(wait_log(relay, rf"{qid1} forward event=delivered upstream=127\.0\.0\.1:{slow.port}"),
         "logged as delivered there")
    log = relay.log()
    t.ok(re.search(r"forward event=switching[\s\S]*" + qid1 + r" forward event=delivered", log),
         "and that was after the switch began (it was in progress)")
    t.is_(len(wait_msgs(fast, 1)), 1, "the message accepted during the switch went to the new upstream")
    t.ok(t.wait_for(lambda: not ({qid1, qid2} & set(relay.queue_ids())), 5 * t.SLOW), "both removed from the queue")
    t.is_(len(slow.messages()), 1, "nothing was sent twice")
    done(relay, slow, fast)


def bounce_on_disk(relay, qid, note):
    """a stopped relay's queue as a crash can leave it: message qid's first recipient failed for
    good (D record) and its bounce is queued under the id derived from qid's (no B record);
    the bounce's Subject ends with (note); returns the bounce's id"""
    msgdir = os.path.join(relay.queue_dir, "msg")
    with open(os.path.join(msgdir, qid), "ab") as f:
        f.write(b"D 0 550 [upstream.test] 550 5.1.1 no such user\n")
    bid = "%016x" % (int(qid, 16) ^ 0x8000000000000001)
    body = (b"From: MAILER-DAEMON@relay.test\r\nTo: <" + ALICE.encode() + b">\r\n"
            b"Subject: Undelivered Mail (" + note + b")\r\n\r\nno such user\r\n")
    head = (f"RELAYD-QUEUE 1\nid {bid}\ncreated {int(time.time())}\nuser MAILER-DAEMON\nfrom \nret -\n"
            f"envid -\nbody 7BIT\nsmtputf8 0\nrcpt 1 - {ALICE}\nsize {len(body)}\n\n").encode()
    with open(os.path.join(msgdir, bid), "wb") as f:
        f.write(head + body + b"\nEND %08x\n" % zlib.crc32(body))
    return bid


@t.test("a crash after a bounce was written, before it was recorded: one bounce, not two")
def _():
    sink = t.Sink([])
    relay = make_relay([])  # no upstream yet: the message waits untouched
    code, qid, _ = submit(relay, ["gone@example.net"], subject=marker("crash-bounce"))
    t.is_(code, 250, "accepted")
    relay.stop()
    # the state such a crash leaves: the recipient failed for good, its bounce queued, no B record
    bid = bounce_on_disk(relay, qid, b"written before the crash")
    reconfigure(relay, [f"127.0.0.1:{sink.port} tls=none"])
    relay.start()
    t.ok(wait_log(relay, rf"{qid} forward event=notice-found notice={bid}"),
         "the finish, run again, found the bounce written before the crash")
    t.ok(wait_log(relay, rf"{qid} forward event=bounced bounce={bid}"), "and recorded it as the bounce")
    t.ok(t.wait_for(lambda: not relay.queue_ids(), 10 * t.SLOW), "queue empty")
    time.sleep(1)
    msgs = sink.messages()
    t.is_(len(msgs), 1, "exactly one bounce reached the sender")
    t.ok(msgs and b"written before the crash" in msgs[0][1], "the one written before the crash")
    t.is_(msgs[0][0]["rcpt_tos"] if msgs else None, [ALICE], "to the sender")
    done(relay, sink)


@t.test("a bounce on disk from before a restart, sent before its message's finish: not sent again")
def _():
    sink = t.Sink(["--reply-rcpt", "later@example.net=450"])
    relay = make_relay([])  # no upstream yet: the message waits untouched
    code, qid, _ = submit(relay, ["gone@example.net", "later@example.net"], subject=marker("stale-bounce"))
    t.is_(code, 250, "accepted")
    relay.stop()
    bid = bounce_on_disk(relay, qid, b"from before the restart")  # the first recipient failed for good
    reconfigure(relay, [f"127.0.0.1:{sink.port} tls=none"])
    relay.start()
    t.ok(wait_log(relay, rf"{qid} forward event=deferred attempts=1 "), "the message waits for its second recipient")
    t.ok(t.wait_for(lambda: bid not in relay.queue_ids(), 10 * t.SLOW), "the bounce was sent and removed")
    t.is_([m[0]["rcpt_tos"] for m in sink.messages()], [[ALICE]], "the bounce reached the sender")
    sink2 = t.Sink([])  # now the second recipient is accepted: the finish comes
    reconfigure(relay, [f"127.0.0.1:{sink2.port} tls=none"])
    t.is_(relay.relayctl("reload")[0], 0, "relayctl reload")
    t.ok(t.wait_for(lambda: not relay.queue_ids(), 15 * t.SLOW), "queue empty", relay.queue_ids())
    t.ok(wait_log(relay, rf"{bid} forward event=notice-stale "), "the bounce written again was recognized")
    time.sleep(1)
    t.is_([(m[0]["mail_from"], m[0]["rcpt_tos"]) for m in sink2.messages()], [(ALICE, ["later@example.net"])],
          "only the message went to the new upstream, no second bounce")
    t.is_(len(sink.messages()), 1, "one bounce in all")
    done(relay, sink, sink2)


@t.test("the commit thread unlinks delivered messages: none left after a stop right after delivery, none sent twice")
def _():
    sink = t.Sink([])
    relay = make_relay([f"127.0.0.1:{sink.port} tls=none"])
    c = relay.smtp_starttls()
    c.login(ALICE, ALICE_PW)
    n = 20
    codes = [submit(relay, [f"r{i}@example.net"], subject=marker(f"unlink {i}"), conn=c)[0] for i in range(n)]
    c.quit()
    t.is_(codes, [250] * n, "all accepted")
    t.is_(len(wait_msgs(sink, n)), n, f"{n} delivered")
    t.ok(wait_log(relay, r"(?s)(forward event=removed.*){%d}" % n, 10), "each logged removed")
    t.is_(relay.stop(), 0, "stopped at once after the deliveries")
    t.is_(relay.queue_ids(), set(), "no delivered message left in the queue after the stop")
    relay.start()
    time.sleep(1.0 * t.SLOW)
    t.is_(len(sink.messages()), n, "after a restart nothing was sent again")
    done(relay, sink)


@t.test("reloads free the upstreams' trust anchors and secrets they replace; a session begun before "
        "them still delivers")
def _():
    sink = t.Sink(SINK_TLS + ["--require-auth", f"{UP_USER}:{UP_PW}"])
    relay = make_relay([], start=False)
    # the second upstream (never reached) loads the whole system trust store: a few MB a reload
    reconfigure(relay, [f"localhost:{sink.port} tls=starttls ca={SINK_CA} auth={secret_file(relay)}",
                        f"127.0.0.1:{t.free_port()} tls=starttls verify=yes"])
    relay.start()
    code, _, _ = submit(relay, ["held@example.net"], subject=marker("before reloads"))
    t.is_((code, len(wait_msgs(sink, 1))), (250, 1), "delivered before the reloads")
    t.is_(relay.stat("credential_sets"), 2, "credential sets: one per upstream (the idle session shares one)")
    n = 8 if t.WRAPPER else 30
    rss0 = relay.rss_kb()
    for i in range(n):
        relay.proc.send_signal(signal.SIGHUP)
        t.wait_for(lambda: len(re.findall(r"main event=reloaded", relay.log())) > i, 10 * t.SLOW)
    t.is_(len(re.findall(r"main event=reloaded", relay.log())), n, f"{n} reloads done")
    grown = relay.rss_kb() - rss0
    if not t.WRAPPER and "ASAN_OPTIONS" not in os.environ:  # valgrind and ASan keep freed memory
        t.ok(grown < 20 * 1024, f"RSS grew by {grown >> 10} MB over {n} reloads (was about 4 MB a reload)")
    out = relay.relayctl("stats")[1]  # one snapshot: the sets and the sessions holding them
    sets, live = relay.stat("credential_sets", out), relay.stat("upstream.0.connections", out)
    t.is_(sets, 2 + (live or 0), f"after the reloads: one set per upstream, plus the old one of each session "
          f"begun before them ({live})")
    code, _, _ = submit(relay, ["after@example.net"], subject=marker("after reloads"))
    msgs = wait_msgs(sink, 2)
    t.is_((code, len(msgs)), (250, 2), "delivered after the reloads")
    if live:
        t.is_(msgs[1][0]["connection"], msgs[0][0]["connection"],
              "by the session that authenticated before the reloads")
    t.ok(t.wait_for(lambda: relay.stat("credential_sets") == 2, 15 * t.SLOW),
         "its old set is freed when that session ends (idle QUIT)")
    t.is_(relay.stop(), 0, "clean exit (under valgrind: nothing leaked, the secrets freed)")
    sink.stop()



@t.test("a burst of replies over 64 KiB (a pipelined group of 20 recipients) is read to the end")
def _():
    up = Upstream(pad=10)  # about 10 KB a RCPT reply, 200 KB in one write
    relay = make_relay([f"127.0.0.1:{up.port} tls=none"])
    rcpts = [f"burst{i:02}@example.net" for i in range(20)]
    code, qid, _ = submit(relay, rcpts, subject=marker("burst"))
    t.is_(code, 250, "accepted")
    t.ok(t.wait_for(lambda: up.messages, 10 * t.SLOW), "delivered in one transaction (no stall after 64 KiB)")
    t.is_(up.rcpts(), rcpts, "to every recipient")
    t.ok(t.wait_for(lambda: qid not in relay.queue_ids(), 5 * t.SLOW), "removed from the queue")
    t.unlike(relay.log(), r"upstream-failed", "no timeout")
    done(relay, up)


@t.test("timeout_idle does not shorten the wait for the upstream's reply to the final dot (RFC 5321: 10 minutes)")
def _():
    slow = t.Sink(["--data-delay", "21"])  # past the old 2 x timeout_idle (at least 10 s)
    relay = make_relay([f"127.0.0.1:{slow.port} tls=none"], extra=RETRY + "timeout_idle 10s\n")
    code, qid, _ = submit(relay, ["slowdot@example.net"], subject=marker("slow dot"))
    t.is_(code, 250, "accepted")
    t.ok(wait_log(relay, rf"{qid} forward event=delivered ", 30), "delivered once the upstream answered")
    t.unlike(relay.log(), r"upstream-failed|event=deferred", "no timeout, no retry")
    t.is_(len(slow.messages()), 1, "one copy at the upstream, not one per timeout")
    done(relay, slow)


# an LD_PRELOAD shim: getaddrinfo("dual.test") gives 127.0.0.2 then 127.0.0.1, as a host name
# with a dead first address (an AAAA record over a broken IPv6 path) does; glibc's freeaddrinfo
# frees node by node, so the two lists can be chained
GAI_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <string.h>
int getaddrinfo(const char *node, const char *serv, const struct addrinfo *hints, struct addrinfo **res)
{
	int (*real)(const char *, const char *, const struct addrinfo *, struct addrinfo **) =
		(int (*)(const char *, const char *, const struct addrinfo *, struct addrinfo **))dlsym(RTLD_NEXT, "getaddrinfo");
	if (!node || strcmp(node, "dual.test"))
		return real(node, serv, hints, res);
	struct addrinfo h = { .ai_family = AF_INET, .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST };
	struct addrinfo *a = NULL, *b = NULL;
	int rc = real("127.0.0.2", serv, &h, &a);
	if (rc || (rc = real("127.0.0.1", serv, &h, &b)))
		return rc;
	a->ai_next = b;
	*res = a;
	return 0;
}
"""


def gai_shim(d):
    """the shim built in d, or None without a C compiler"""
    cc = os.environ.get("CC", "cc").split()
    if not shutil.which(cc[0]):
        return None
    src, so = os.path.join(d, "gai_shim.c"), os.path.join(d, "gai_shim.so")
    with open(src, "w") as f:
        f.write(GAI_SHIM)
    r = subprocess.run(cc + ["-shared", "-fPIC", "-o", so, src, "-ldl"], capture_output=True, timeout=60)
    return so if r.returncode == 0 else None


@t.test("a connect timeout on the upstream's first address moves on to its next address")
def _():
    sink = t.Sink([])
    hole = socket.socket()
    hole.bind(("127.0.0.2", sink.port))
    hole.listen(0)
    filler = socket.create_connection(("127.0.0.2", sink.port), timeout=5)  # backlog full: SYNs dropped
    probe = socket.socket()
    probe.settimeout(1)
    try:
        probe.connect(("127.0.0.2", sink.port))
        blackhole = False
    except socket.timeout:
        blackhole = True
    except OSError:
        blackhole = False
    probe.close()
    relay = make_relay([f"dual.test:{sink.port} tls=none"], extra=RETRY + "upstream_timeout 2s\n", start=False)
    shim = gai_shim(relay.dir)
    if not shim or not blackhole:
        t.skip("connect timeout, next address", "no C compiler for the getaddrinfo shim" if not shim else
               "127.0.0.2 with a full backlog does not drop SYNs here")
        done(relay, sink)
        hole.close(), filler.close()
        return
    env = {k: os.environ.get(k) for k in ("LD_PRELOAD", "ASAN_OPTIONS")}
    os.environ["LD_PRELOAD"] = shim
    os.environ["ASAN_OPTIONS"] = (env["ASAN_OPTIONS"] + ":" if env["ASAN_OPTIONS"] else "") + "verify_asan_link_order=0"
    try:
        relay.start()
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    code, qid, _ = submit(relay, ["dual@example.net"], subject=marker("dual"))
    t.is_(code, 250, "accepted")
    t.is_(len(wait_msgs(sink, 1, 10)), 1, "delivered through the second address")
    t.ok(wait_log(relay, rf"{qid} forward event=delivered ", 5), "logged delivered")
    t.unlike(relay.log(), r"event=deferred|upstream-failed", "in the first attempt: no failure, no deferral")
    done(relay, sink)
    hole.close(), filler.close()


@t.test("552 to RCPT (RFC 821's 'too many recipients') is temporary: the rest is sent again, no bounce")
def _():
    up = Upstream(rcpt_limit=2, over=b"552 5.5.3 Too many recipients")
    relay = make_relay([f"127.0.0.1:{up.port} tls=none"])
    rcpts = ["m1@example.net", "m2@example.net", "m3@example.net"]
    code, qid, _ = submit(relay, rcpts, subject=marker("552"))
    t.is_(code, 250, "accepted")
    t.ok(t.wait_for(lambda: up.rcpts() == rcpts, 10 * t.SLOW), "all three delivered", up.rcpts())
    t.ok(t.wait_for(lambda: not relay.queue_ids(), 5 * t.SLOW), "queue empty (no bounce waiting)")
    t.unlike(relay.log(), rf"{qid} forward event=(failed|bounced)", "no recipient failed, no bounce")
    t.is_([m[0] for m in up.messages], [rcpts[:2], rcpts[2:]], "two transactions at the upstream, no bounce")
    done(relay, up)


@t.test("recipients refused with 452 (too many) go out at once in the next transactions: no retry, no delay notice")
def _():
    up = Upstream(rcpt_limit=2)
    # a deferral would wait retry_min (30 s) and send a "delayed" notice (delay_warning 1s)
    relay = make_relay([f"127.0.0.1:{up.port} tls=none"], extra="retry_min 30s\nretry_max 60s\ndelay_warning 1s\n")
    rcpts = [f"chunk{i}@example.net" for i in range(7)]
    code, qid, _ = submit(relay, rcpts, subject=marker("chunks"))
    t.is_(code, 250, "accepted")
    t.ok(t.wait_for(lambda: up.rcpts() == rcpts, 10 * t.SLOW), "all seven delivered at once", up.rcpts())
    t.is_([len(m[0]) for m in up.messages], [2, 2, 2, 1], "in chunks of the upstream's limit, nothing else sent")
    t.ok(t.wait_for(lambda: not relay.queue_ids(), 5 * t.SLOW), "queue empty")
    t.unlike(relay.log(), rf"{qid} forward event=(deferred|attempt-failed|failed|notice)", "no deferral, no notice")
    t.is_(up.connections, 1, "on the same connection")
    done(relay, up)


@t.test("SMTPUTF8 with ASCII envelope and headers and an 8-bit body: sent with BODY=8BITMIME alone to an "
        "upstream without SMTPUTF8")
def _():
    up = Upstream()  # 8BITMIME, no SMTPUTF8
    relay = make_relay([f"127.0.0.1:{up.port} tls=none"])
    c = relay.smtp_starttls()
    c.login(ALICE, ALICE_PW)
    c.mail(ALICE, ["SMTPUTF8", "BODY=8BITMIME"])
    c.rcpt("wanda@example.net")
    body = "d\u00e9j\u00e0 vu\r\n".encode()
    code, resp = c.data(t.make_message(ALICE, "wanda@example.net", subject=marker("utf8 body")) + body)
    c.quit()
    qid = t.queued_id(f"{code} {resp.decode()}")
    t.is_(code, 250, "accepted")
    t.ok(t.wait_for(lambda: up.messages, 10 * t.SLOW) and up.rcpts() == ["wanda@example.net"],
         "delivered (RFC 6531 §3.4: SMTPUTF8 not needed)", up.rcpts())
    t.ok(up.messages and up.messages[0][1].endswith(body), "the 8-bit body intact")
    t.like(up.mails[0] if up.mails else b"", rb"^MAIL FROM:<alice@example\.org> [^\r]*BODY=8BITMIME", "BODY=8BITMIME")
    t.unlike(up.mails[0] if up.mails else b"", rb"SMTPUTF8", "without SMTPUTF8")
    t.unlike(relay.log(), rf"{qid} forward event=(failed|bounced)", "not bounced")
    c = relay.smtp_starttls()  # non-ASCII in the header section still needs SMTPUTF8
    c.login(ALICE, ALICE_PW)
    c.mail(ALICE, ["SMTPUTF8", "BODY=8BITMIME"])
    c.rcpt("xena@example.net")
    code, resp = c.data(t.make_message(ALICE, "xena@example.net", subject="caf\u00e9 " + marker("utf8 hdr")))
    c.quit()
    qid = t.queued_id(f"{code} {resp.decode()}")
    t.ok(wait_log(relay, rf"{qid} forward event=failed .*553 5\.6\.7", 10), "a UTF-8 Subject: 553 5.6.7 as before")
    done(relay, up)

@t.test("the bounce of an SMTPUTF8 message: message/global-delivery-status with the utf-8 address and the "
        "message as message/global (RFC 6533, RFC 6532 3.7); sent with BODY=8BITMIME, its own headers ASCII")
def _():
    import email
    import email.policy
    up = Upstream()  # 8BITMIME, no SMTPUTF8: the message fails with 5.6.7, its bounce goes there too
    relay = make_relay([f"127.0.0.1:{up.port} tls=none"])
    c = relay.smtp_starttls()
    c.login(ALICE, ALICE_PW)
    c.mail(ALICE, ["SMTPUTF8", "BODY=8BITMIME"])
    c.rcpt("b\u00e4d@example.net")
    subj = "caf\u00e9 " + marker("utf8 bounce")
    code, resp = c.data(t.make_message(ALICE, "b\u00e4d@example.net", subject=subj))
    c.quit()
    t.is_(code, 250, "accepted")
    t.ok(t.wait_for(lambda: up.messages, 10 * t.SLOW), "the bounce arrived", relay.log()[-2000:])
    t.like(up.mails[0] if up.mails else b"", rb"^MAIL FROM:<> [^\r]*BODY=8BITMIME", "MAIL FROM:<> BODY=8BITMIME")
    t.unlike(up.mails[0] if up.mails else b"", rb"SMTPUTF8", "no SMTPUTF8 needed: the bounce's own headers are ASCII")
    eml = up.messages[0][1] if up.messages else b""
    head = eml.split(b"\r\n\r\n")[0]
    t.ok(all(b < 0x80 for b in head), "the bounce's header section is ASCII", head)
    t.like(head, rb"(?m)^Content-Transfer-Encoding: 8bit\r?$", "labelled 8bit at the top")
    m = email.message_from_bytes(eml, policy=email.policy.compat32)
    types = [m.get_content_type()] + [p.get_content_type() for p in m.get_payload()]
    t.is_(types, ["multipart/report", "text/plain", "message/global-delivery-status", "message/global"],
          "the parts")
    t.like(eml, "Final-Recipient: utf-8; b\u00e4d@example.net\r\n".encode(), "Final-Recipient: utf-8; the address")
    t.ok(("Subject: " + subj).encode() in eml, "the returned message's UTF-8 Subject intact")
    t.unlike(eml, rb"message/rfc822|message/delivery-status\r", "no legacy type holds UTF-8")
    done(relay, up)


# --- wall-clock steps (NTP): libfaketime moves relayd's CLOCK_REALTIME only -----------------
# What the forwarder times on which clock (forward.c, forward_session.c):
#  - an upstream's down time (down_until) and a transaction's latency: CLOCK_MONOTONIC
#    (clock_mono), in memory only: a step changes neither;
#  - a message's next attempt: a T record holds it as wall-clock seconds (on disk, for a
#    restart), but the timer is relative (ev_timer, on libev's monotonic clock), armed for
#    next_attempt - time(NULL) at once: a step afterwards neither stretches nor skips it;
#  - a message's age (queue_lifetime, delay_warning): created, wall-clock on purpose (stored
#    in the queue file, it must survive a restart): a forward step past queue_lifetime does
#    expire a message, so the test keeps the step (1 day) below it (2 days).
def clocked_relay(upstreams, **kw):
    """make_relay(upstreams, **kw) started with a wall clock the test steps: (clock, relay)"""
    clock = t.WallClock()
    relay = make_relay(upstreams, start=False, **kw)
    clock.start(relay)
    return clock, relay


class ClockUpstream(t.AsyncServer):
    """a scripted upstream for the clock-step tests, one command at a time (no PIPELINING): 421
    at the greeting on its first `refuse` connections, 451 to its first `fail_mail` MAILs; mails:
    the (test's monotonic) time of every MAIL; messages: the recipients of every message taken.
    With hold, the reply to a final dot waits for release (10 s at most), held set meanwhile;
    with one_per_conn, the upstream closes the connection after that reply."""

    def __init__(self, refuse=0, fail_mail=0, hold=False, one_per_conn=False):
        self.refuse, self.fail_mail, self.hold, self.one_per_conn = refuse, fail_mail, hold, one_per_conn
        self.held, self.release = threading.Event(), threading.Event()
        self.connections, self.mails, self.messages = 0, [], []
        t.AsyncServer.__init__(self)

    async def _dot(self, reader, rcpts):
        while await asyncio.wait_for(reader.readline(), 30) not in (b".\r\n", b""):
            pass
        if self.hold:
            self.held.set()
            for _ in range(200):
                if self.release.is_set():
                    break
                await asyncio.sleep(0.05)
        self.messages.append(rcpts)
        return b"250 2.0.0 queued\r\n"

    def _mail(self):
        self.mails.append(time.monotonic())
        failing = self.fail_mail > 0
        self.fail_mail -= failing
        return b"451 4.3.0 try again later\r\n" if failing else b"250 2.1.0 ok\r\n"

    async def _client(self, reader, writer):
        self.connections += 1
        rcpts = []
        try:
            if self.refuse > 0:
                self.refuse -= 1
                writer.write(b"421 4.3.2 not now\r\n")
                await writer.drain()
                return
            writer.write(b"220 up.test ESMTP\r\n")
            while True:
                line = await asyncio.wait_for(reader.readline(), 30)
                verb = line[:4].upper()
                if not line or verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    return
                reply = b"250 2.0.0 ok\r\n"
                if verb == b"EHLO":
                    reply = b"250-up.test\r\n250 ENHANCEDSTATUSCODES\r\n"
                elif verb == b"MAIL":
                    rcpts = []
                    reply = self._mail()
                elif verb == b"RCPT":
                    rcpts.append(line[8:].split(b">")[0].lstrip(b"<").decode())
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    reply = await self._dot(reader, rcpts)
                writer.write(reply)
                await writer.drain()
                if verb == b"DATA" and self.one_per_conn:
                    return
        except (asyncio.TimeoutError, asyncio.CancelledError, ConnectionError):
            pass
        finally:
            writer.close()


def upstream_state(relay, i):
    m = re.search(rf"^upstream\.{i}\.state=(\w+)$", relay.relayctl("stats")[1], re.M)
    return m.group(1) if m else None


@t.test("an upstream marked down is back after its down time, no more, no less, across wall-clock steps")
def _():
    down = max(3, round(3 * t.SLOW))  # retry_min: the first down time
    first, second = ClockUpstream(refuse=1, one_per_conn=True), ClockUpstream()
    clock, relay = clocked_relay([f"127.0.0.1:{first.port} tls=none", f"127.0.0.1:{second.port} tls=none"],
                                 extra=f"retry_min {down}s\nretry_max {down}s\n")
    refused = rf"upstream-failed upstream=127\.0\.0\.1:{first.port} state=greeting"
    submit(relay, ["one@example.net"])
    t.ok(wait_log(relay, refused, 10), "the first upstream said 421 at its greeting: marked down")
    t.ok(t.wait_for(lambda: second.messages, 10 * t.SLOW), "the message went to the second")
    t.is_(upstream_state(relay, 0), "down", "relayctl stats: the first is down")
    clock.step("-3600")  # NTP steps the clock back an hour
    t.ok(t.wait_for(lambda: upstream_state(relay, 0) == "up", down + 5 * t.SLOW),
         f"{down} s of real time later it is up again, an hour back notwithstanding")
    submit(relay, ["two@example.net"])
    t.ok(t.wait_for(lambda: first.messages, 10 * t.SLOW), "the next message goes to the first again")
    t.is_(first.messages, [["two@example.net"]], "that one")
    t.ok(t.wait_for(lambda: relay.stat("upstream.0.connections") == 0, 10 * t.SLOW),
         "the first closed its connection after the message")

    first.refuse = 1  # the next connection is refused: down again, as long (the first failure since it delivered)
    submit(relay, ["three@example.net"])
    t.ok(t.wait_for(lambda: len(re.findall(refused, relay.log())) == 2, 10 * t.SLOW), "the first refused again")
    failed_at = time.monotonic()
    t.ok(t.wait_for(lambda: len(second.messages) == 2, 10 * t.SLOW), "that message went to the second")
    clock.step("+86400")  # forward a day
    t.is_(upstream_state(relay, 0), "down", "a day later by the wall clock it is still down")
    submit(relay, ["four@example.net"])
    t.ok(t.wait_for(lambda: len(second.messages) == 3, 10 * t.SLOW), "the next message goes to the second too")
    t.is_(first.connections, 3, "the first, ready now, was not tried before its down time")
    t.ok(time.monotonic() - failed_at < down, f"(checked within the down time of {down} s)")
    clock.step("+0")
    done(relay, first, second)


@t.test("a deferred message is retried on schedule across wall-clock steps: an hour back does not stretch "
        "its retry, a day forward neither skips it nor expires it")
def _():
    up = ClockUpstream(fail_mail=2)
    clock, relay = clocked_relay([f"127.0.0.1:{up.port} tls=none"],
                                 extra="retry_min 2s\nretry_max 2s\nqueue_lifetime 2d\n")
    code, qid, _ = submit(relay, ["kate@example.net"])
    t.is_(code, 250, "accepted")
    t.ok(wait_log(relay, rf"{qid} forward event=deferred attempts=1 retry=2s", 10), "451: deferred for 2 s")
    clock.step("-3600")
    t.ok(wait_log(relay, rf"{qid} forward event=deferred attempts=2 retry=2s", 5 + 5 * t.SLOW),
         "retried 2 s later, though the wall clock went back an hour meanwhile")
    clock.step("+86400")
    t.ok(t.wait_for(lambda: up.messages, 5 + 5 * t.SLOW), "retried again and delivered, the clock a day ahead")
    t.ok(t.wait_for(lambda: qid not in relay.queue_ids(), 5 * t.SLOW), "and removed from the queue")
    gaps = [round(b - a, 2) for a, b in zip(up.mails, up.mails[1:])]
    t.is_(len(up.mails), 3, "three attempts in all: not one more")
    t.ok(len(gaps) == 2 and all(1.0 <= g <= 3 + 3 * t.SLOW for g in gaps),
         "each retry about 2 s after the one before (the delay counted in whole seconds)", gaps)
    t.unlike(relay.log(), rf"{qid} forward event=(expired|bounced)", "a day forward is no reason to give it up")
    clock.step("+0")
    done(relay, up)


def latencies(mport):
    """relayd_upstream_latency_{avg,last}_seconds from /metrics, as floats"""
    rc, out = t.curl(["-s", f"http://127.0.0.1:{mport}/metrics"])
    got = dict(re.findall(r"^relayd_upstream_latency_(avg|last)_seconds\{[^}]*\} (\S+)$", out, re.M))
    return {k: float(v) for k, v in got.items()}


@t.test("upstream latencies in /metrics stay true across wall-clock steps in a transaction: never negative")
def _():
    up = ClockUpstream(hold=True)
    mport = t.free_port()
    clock, relay = clocked_relay([f"127.0.0.1:{up.port} tls=none"], extra=RETRY + f"metrics 127.0.0.1:{mport}\n")
    for n, offset in enumerate(("-3600", "+86400")):
        up.held.clear()
        up.release.clear()
        submit(relay, [f"lat{n}@example.net"])
        t.ok(up.held.wait(10 * t.SLOW), f"message {n + 1}: the upstream holds its reply to the final dot")
        clock.step(offset)
        up.release.set()
        t.ok(wait_log(relay, rf"forward event=delivered upstream=\S+ rcpt=<lat{n}@example\.net>", 10),
             "then delivered")
        lat = latencies(mport)
        t.ok(set(lat) == {"avg", "last"} and all(0 <= v < 30 for v in lat.values()),
             f"latency last and avg between 0 and 30 s, though the wall clock stepped {offset} s", lat)
    clock.step("+0")
    done(relay, up)


@t.test("pacing across a step back of the wall clock: messages counted 'in the future' do not hold the next for an hour")
def _():
    up = ClockUpstream()
    clock, relay = clocked_relay([f"127.0.0.1:{up.port} tls=none rate=1/second"])
    submit(relay, ["pace1@example.net"])
    t.ok(t.wait_for(lambda: up.messages, 10 * t.SLOW), "the first message sent")
    clock.step("-3600")
    submit(relay, ["pace2@example.net"])
    t.ok(t.wait_for(lambda: len(up.messages) == 2, 3 + 5 * t.SLOW),
         "rate=1/second: the next goes within seconds, though the first was counted an hour ahead of the clock now",
         relay.log()[-600:])
    clock.step("+0")
    done(relay, up)


@t.test("pacing across a step forward of the wall clock: the window is not emptied (no burst over the rate)")
def _():
    up = ClockUpstream()
    clock, relay = clocked_relay([f"127.0.0.1:{up.port} tls=none rate=2/minute"])
    c = relay.smtp_starttls()
    c.login(ALICE, ALICE_PW)
    for n in range(3):
        submit(relay, [f"burst{n}@example.net"], conn=c)
    t.ok(t.wait_for(lambda: len(up.messages) == 2 and relay.stat("upstream.0.waiting") == 1, 10 * t.SLOW),
         "rate=2/minute: two sent, the third held")
    clock.step("+86400")
    submit(relay, ["burst3@example.net"], conn=c)
    c.quit()
    t.ok(t.wait_for(lambda: relay.stat("upstream.0.waiting") == 2, 10 * t.SLOW),
         "a day later by the wall clock, a fourth message waits with the third", relay.stat("upstream.0.waiting"))
    t.is_(len(up.messages), 2, "still two sent within the minute")
    clock.step("+0")
    done(relay, up)


t.done()
