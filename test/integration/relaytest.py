"""relaytest - shared helper of relayd's integration tests.

A test file imports this module, starts one or more real relayd processes with Relay(...) and
drives them with smtplib, swaks, curl or a raw socket; results are reported in TAP (the automake
tap-driver turns each "ok"/"not ok" line into one result).

    import relaytest as t
    relay = t.Relay()                                   # temp dir, certs, config (not started)
    relay.add_user("alice@example.org", "pw")           # tools/relayctl user add
    relay.start()

    @t.test("greeting")                                 # runs at once; an exception is a failure
    def _():
        c = t.Raw(relay.port_starttls)
        t.like(c.reply_text(), r"^220 relay\\.test ESMTP", "220 greeting")

    t.done()                                            # prints the plan, exits 1 on any failure

Environment: top_builddir and top_srcdir (exported by `make check`; default: the tree this file
is in), KEEP_TMP=1 keeps the temp folders, RELAYD_WRAPPER="valgrind -q ..." runs relayd under a
wrapper (startup timeouts are then multiplied by RELAYTEST_SLOW, default 10 with a wrapper);
a relayd that exits non-zero after Relay.stop()'s SIGTERM (valgrind --error-exitcode, an
ASan/UBSan report, a crash) fails the test file at done().
Every socket has a timeout, so a hang becomes a failed assertion, never a stuck suite.
"""

import asyncio
import atexit
import base64
import os
import re
import shlex
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
TOP_BUILDDIR = os.path.abspath(os.environ.get("top_builddir") or os.path.join(HERE, "..", ".."))
TOP_SRCDIR = os.path.abspath(os.environ.get("top_srcdir") or os.path.join(HERE, "..", ".."))
RELAYD = os.path.join(TOP_BUILDDIR, "relayd", "relayd")
RELAYCTL = os.path.join(TOP_BUILDDIR, "tools", "relayctl")
CAPTURE_SINK = os.path.join(TOP_SRCDIR, "tools", "capture-sink")
PYTHON = "/usr/bin/python3"

WRAPPER = shlex.split(os.environ.get("RELAYD_WRAPPER", ""))
SLOW = float(os.environ.get("RELAYTEST_SLOW", "10" if WRAPPER else "1"))
SOCK_TIMEOUT = 10.0 * SLOW
KEEP_TMP = os.environ.get("KEEP_TMP") == "1"

# --------------------------------------------------------------------------------------------
# TAP reporter
# --------------------------------------------------------------------------------------------

_lock = threading.RLock()
_count = 0
_failed = 0
_planned = None
_failed_names = []


def diag(msg):
    """print msg as TAP diagnostics, one '# ' line per line"""
    with _lock:
        for line in str(msg).splitlines() or [""]:
            print("# " + line)
        sys.stdout.flush()


def plan(n):
    """announce n tests up front (optional: done() prints a trailing plan otherwise)"""
    global _planned
    _planned = n
    print(f"1..{n}", flush=True)


def ok(cond, name, detail=None):
    """one assertion; detail (anything printable) is shown as diagnostics when it fails"""
    global _count, _failed
    with _lock:
        _count += 1
        name = str(name).replace("#", "\\#").replace("\n", " ")
        if cond:
            print(f"ok {_count} - {name}")
        else:
            _failed += 1
            _failed_names.append(name)
            print(f"not ok {_count} - {name}")
            if detail is not None:
                diag(detail)
        sys.stdout.flush()
    return bool(cond)


def is_(got, expected, name):
    """equality assertion that shows both values when it fails"""
    return ok(got == expected, name, f"     got: {got!r}\nexpected: {expected!r}")


def like(got, regex, name):
    """got (str or bytes) matches regex (re.search)"""
    if isinstance(got, bytes) and isinstance(regex, str):
        regex = regex.encode()
    try:
        m = got is not None and re.search(regex, got)
    except TypeError:
        m = None
    return ok(bool(m), name, f"     got: {got!r}\nexpected: match {regex!r}")


def unlike(got, regex, name):
    """got does not match regex"""
    if isinstance(got, bytes) and isinstance(regex, str):
        regex = regex.encode()
    m = got is not None and re.search(regex, got)
    return ok(got is not None and not m, name, f"     got: {got!r}\nexpected: no match {regex!r}")


def skip(name, reason):
    global _count
    with _lock:
        _count += 1
        print(f"ok {_count} - {name} # SKIP {reason}", flush=True)


def failures():
    return _failed


def test(name):
    """decorator: run the function now as a group of assertions named name; an exception
    becomes a 'not ok' with the traceback, and the relayd logs are dumped when it failed"""
    def run(fn):
        before = _failed
        diag(f"--- {name}")
        t0 = time.monotonic()
        try:
            fn()
        except Exception:
            ok(False, f"{name}: no exception", traceback.format_exc())
        if _failed != before:
            for r in list(Relay.live):
                r.dump_log(only_new=True)
        dt = time.monotonic() - t0
        if dt > 5:
            diag(f"({name}: {dt:.1f} s)")
        return fn
    return run


def bail(msg):
    """stop the whole test file (TAP 'Bail out!')"""
    for r in list(Relay.live):
        r.dump_log(only_new=True)
    print(f"Bail out! {msg}", flush=True)
    _cleanup()
    os._exit(1)


_bad_exits = []  # (log file, status) of relayds that exited non-zero after Relay.stop()'s SIGTERM


def _check_exits():
    """one failed assertion per relayd that exited non-zero after SIGTERM (memory errors
    found by ASan/UBSan/valgrind show up here); nothing is printed when all exited 0"""
    for logfile, rc in _bad_exits:
        ok(False, f"relayd exits 0 after SIGTERM ({logfile})",
           f"exit status {rc}" + (" (valgrind --error-exitcode)" if WRAPPER else ""))
    del _bad_exits[:]


def done():
    """stop the relayds still running, print the trailing plan, clean up, and exit 1 if
    anything failed (including a relayd that exited non-zero after SIGTERM)"""
    for r in list(Relay.live):
        try:
            r.stop(timeout=5)
        except Exception as e:
            diag(f"stopping relayd: {e}")
    _check_exits()
    if _planned is None:
        print(f"1..{_count}", flush=True)
    elif _planned != _count:
        diag(f"planned {_planned} tests but ran {_count}")
    if _failed:
        diag(f"{_failed} of {_count} failed: " + "; ".join(_failed_names[:20]))
    _cleanup()
    sys.exit(1 if _failed or (_planned is not None and _planned != _count) else 0)


# --------------------------------------------------------------------------------------------
# cleanup
# --------------------------------------------------------------------------------------------

_procs = []      # subprocess.Popen objects to kill at exit
_tmpdirs = []


def _cleanup():
    for r in list(Relay.live):
        if _failed:
            r.dump_log(only_new=True)
        try:
            r.stop(timeout=3)
        except Exception:
            pass
    for p in _procs:
        if p.poll() is None:
            try:
                p.kill()
                p.wait(timeout=5)
            except Exception:
                pass
    del _procs[:]
    for d in _tmpdirs:
        if KEEP_TMP:
            diag(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
    del _tmpdirs[:]


def _on_signal(signum, frame):
    diag(f"caught signal {signum}, cleaning up")
    _cleanup()
    os._exit(128 + signum)


atexit.register(_cleanup)
for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(_sig, _on_signal)


def mkdtemp(prefix="relaytest-"):
    d = tempfile.mkdtemp(prefix=prefix)
    _tmpdirs.append(d)
    return d


def spawn(argv, **kw):
    """Popen that is killed at exit"""
    p = subprocess.Popen(argv, **kw)
    _procs.append(p)
    return p


# --------------------------------------------------------------------------------------------
# certificates, ports
# --------------------------------------------------------------------------------------------

CA_TEMPLATE = """cn = "relaytest CA"
organization = "relayd tests"
serial = 1
expiration_days = 30
ca
cert_signing_key
crl_signing_key
"""

SERVER_TEMPLATE = """cn = "localhost"
organization = "relayd tests"
serial = 2
expiration_days = 30
dns_name = "localhost"
ip_address = "127.0.0.1"
ip_address = "::1"
tls_www_server
signing_key
encryption_key
"""


def _run(argv, input=None, timeout=30):
    r = subprocess.run(argv, input=input, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}:\n"
                           + r.stdout.decode("utf-8", "replace"))
    return r.stdout


def make_certs(d):
    """a CA (ca.pem, ca-key.pem) and a server certificate for localhost, 127.0.0.1 and ::1
    (server-cert.pem, server-key.pem) in folder d; returns the CA file"""
    with open(os.path.join(d, "ca.tmpl"), "w") as f:
        f.write(CA_TEMPLATE)
    with open(os.path.join(d, "server.tmpl"), "w") as f:
        f.write(SERVER_TEMPLATE)
    j = lambda n: os.path.join(d, n)  # noqa: E731
    _run(["certtool", "--generate-privkey", "--key-type=ecdsa", "--sec-param=high",
          "--outfile", j("ca-key.pem")])
    _run(["certtool", "--generate-self-signed", "--load-privkey", j("ca-key.pem"),
          "--template", j("ca.tmpl"), "--outfile", j("ca.pem")])
    _run(["certtool", "--generate-privkey", "--key-type=rsa", "--bits=2048",
          "--outfile", j("server-key.pem")])
    _run(["certtool", "--generate-certificate", "--load-privkey", j("server-key.pem"),
          "--load-ca-certificate", j("ca.pem"), "--load-ca-privkey", j("ca-key.pem"),
          "--template", j("server.tmpl"), "--outfile", j("server-cert.pem")])
    os.chmod(j("server-key.pem"), 0o600)
    return j("ca.pem")


def have_ipv6():
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.bind(("::1", 0))
        s.close()
        return True
    except OSError:
        return False


FAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def sanitized():
    """is relayd an ASan build (tools/run-hardening)?"""
    with open(RELAYD, "rb") as f:
        return b"__asan_init" in f.read()


class WallClock:
    """the wall clock of a relayd started with start(relay), for NTP-step tests:
    step("-3600") sets its offset from the real time (libfaketime reads the file on every call;
    CLOCK_MONOTONIC stays real)"""

    def __init__(self):
        self.rc = os.path.join(mkdtemp("relaytest-clock-"), "faketime.rc")
        self.step("+0")

    def step(self, offset):
        with open(self.rc + ".new", "w") as f:
            f.write(offset + "\n")
        os.replace(self.rc + ".new", self.rc)  # never read half written

    def _faked(self):  # in relayd's child before exec
        os.environ.update(LD_PRELOAD=FAKETIME, FAKETIME_TIMESTAMP_FILE=self.rc, FAKETIME_NO_CACHE="1",
                          FAKETIME_DONT_FAKE_MONOTONIC="1")
        if sanitized():  # ASan must come first among the preloaded libraries otherwise
            os.environ["ASAN_OPTIONS"] = (os.environ.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0").lstrip(":")

    def start(self, relay):
        return relay.start(preexec_fn=self._faked)


def free_port(host="127.0.0.1"):
    """a port that was free a moment ago (bind port 0, close)"""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(host, port, timeout):
    """True once host:port accepts a TCP connection"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def wait_for(cond, timeout=10.0, step=0.05):
    """poll cond() until it is true (returns its value) or timeout (returns the last value)"""
    deadline = time.monotonic() + timeout
    v = cond()
    while not v and time.monotonic() < deadline:
        time.sleep(step)
        v = cond()
    return v


# --------------------------------------------------------------------------------------------
# relayd
# --------------------------------------------------------------------------------------------

# directives written by default; a line of extra_config naming one of these replaces it
_SINGLE = {"hostname", "tls_cert", "tls_key", "database", "queue", "max_message_size",
           "max_recipients", "timeout_idle", "timeout_session", "max_errors", "max_sessions",
           "user", "pidfile", "control"}


class Relay:
    """one relayd with its own temp folder, certificates, ports, config and database.

    Attributes: dir, conf, ca_file, queue_dir, port_starttls (587-mode), port_tls (465-mode,
    implicit TLS), port_v6 (starttls on [::1], None without IPv6), hostname, users {name: pw}.
    """
    live = []

    def __init__(self, extra_config="", start=False, ipv6=True):
        if not os.path.exists(RELAYD):
            bail(f"{RELAYD} is not built (run make first)")
        self.dir = mkdtemp()
        self.ca_file = make_certs(self.dir)
        self.conf = os.path.join(self.dir, "relayd.conf")
        self.queue_dir = os.path.join(self.dir, "queue")
        self.logfile = os.path.join(self.dir, "relayd.log")
        self.hostname = "relay.test"
        self.port_starttls = free_port()
        self.port_tls = free_port()
        self.port_v6 = free_port("::1") if ipv6 and have_ipv6() else None
        self.users = {}
        self.proc = None
        self._log_pos = 0
        self.write_config(extra_config)
        if start:
            self.start()

    # config ---------------------------------------------------------------------------------
    def write_config(self, extra_config=""):
        lines = [
            ("hostname", self.hostname),
            ("listen", f"127.0.0.1:{self.port_starttls} starttls"),
            ("listen", f"127.0.0.1:{self.port_tls} tls"),
        ]
        if self.port_v6:
            lines.append(("listen", f"[::1]:{self.port_v6} starttls"))
        lines += [
            ("tls_cert", "server-cert.pem"),
            ("tls_key", "server-key.pem"),
            ("database", "relayd.db"),
            ("queue", "queue"),
            ("max_message_size", "1M"),
            ("max_recipients", "20"),
            ("timeout_idle", "30s"),
        ]
        extra = [l.strip() for l in extra_config.splitlines() if l.strip()]
        for l in extra:
            key = l.split()[0]
            if key in _SINGLE:
                lines = [(k, v) for (k, v) in lines if k != key]
        text = "# written by test/integration/relaytest.py\n"
        text += "".join(f"{k:<17}{v}\n" for k, v in lines)
        text += "".join(l + "\n" for l in extra)
        with open(self.conf, "w") as f:
            f.write(text)
        self.config_text = text

    def listeners(self):
        """[(host, port, mode)] of every listen line"""
        out = [("127.0.0.1", self.port_starttls, "starttls"), ("127.0.0.1", self.port_tls, "tls")]
        if self.port_v6:
            out.append(("::1", self.port_v6, "starttls"))
        return out

    # users ----------------------------------------------------------------------------------
    def relayctl(self, *args, input=None, check=True):
        """run tools/relayctl -c CONF ARGS; returns (rc, output)"""
        r = subprocess.run([RELAYCTL, "-c", self.conf] + list(args), input=input,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30 * SLOW)
        out = r.stdout.decode("utf-8", "replace")
        if check and r.returncode != 0:
            raise RuntimeError(f"relayctl {' '.join(args)} exited {r.returncode}: {out}")
        return r.returncode, out

    def stat(self, name, out=None):
        """a number from relayctl stats (from out, one stats output, when given), or None"""
        m = re.search(rf"^{re.escape(name)}=(\d+)$", out or self.relayctl("stats")[1], re.M)
        return int(m.group(1)) if m else None

    def rss_kb(self):
        """VmRSS of relayd (of valgrind running it, under a wrapper) in kB, or None"""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            return None
        return None

    def add_user(self, name, password, senders=()):
        """relayctl user add NAME (password on stdin), then user sender NAME add PATTERN"""
        self.relayctl("user", "add", name, input=(password + "\n").encode())
        for s in senders:
            self.relayctl("user", "sender", name, "add", s)
        self.users[name] = password

    # process --------------------------------------------------------------------------------
    def start(self, timeout=10.0, preexec_fn=None):
        """start relayd -f -c CONF and wait until every listener accepts a connection
        (preexec_fn runs in the child before relayd starts, e.g. to set resource limits)"""
        if self.proc and self.proc.poll() is None:
            raise RuntimeError("relayd already running")
        logf = open(self.logfile, "ab")
        logf.write(f"===== relaytest: starting relayd at {time.strftime('%H:%M:%S')}\n".encode())
        logf.flush()
        self.proc = spawn(WRAPPER + [RELAYD, "-f", "-c", self.conf], stdin=subprocess.DEVNULL,
                          stdout=logf, stderr=logf, cwd=self.dir, preexec_fn=preexec_fn)
        logf.close()
        if self not in Relay.live:
            Relay.live.append(self)
        deadline = time.monotonic() + timeout * SLOW
        for host, port, _ in self.listeners():
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"relayd exited with status {self.proc.returncode} at start:\n"
                                       + self.log())
                try:
                    socket.create_connection((host, port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"relayd does not accept on [{host}]:{port} after "
                                           f"{timeout * SLOW:.0f} s:\n" + self.log())
                    time.sleep(0.05)
        # the listeners accept before the rest is up (privilege drop, control socket): wait for
        # the line main logs last, in this run's part of the log
        while "main event=started" not in self.log().rsplit("===== relaytest: starting", 1)[-1]:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relayd exited with status {self.proc.returncode} at start:\n" + self.log())
            if time.monotonic() > deadline:
                raise RuntimeError(f"relayd did not log main event=started after {timeout * SLOW:.0f} s:\n"
                                   + self.log())
            time.sleep(0.02)
        return self

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=10.0):
        """SIGTERM and wait; SIGKILL if it does not exit in time; returns the exit status.
        A non-zero status after our SIGTERM (a sanitizer report, valgrind's --error-exitcode,
        a crash) is also remembered and fails the test file at done(), whether or not the
        caller looks at the status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            killed = False
            try:
                self.proc.wait(timeout=timeout * SLOW)
            except subprocess.TimeoutExpired:
                diag(f"relayd did not exit {timeout * SLOW:.0f} s after SIGTERM; killing it")
                self.proc.kill()
                self.proc.wait(timeout=10)
                killed = True
            rc = self.proc.returncode
            if rc != 0 and not killed:
                _bad_exits.append((self.logfile, rc))
                diag(f"relayd ({self.logfile}) exited with status {rc} after SIGTERM")
        rc = self.proc.returncode
        if self in Relay.live:
            Relay.live.remove(self)
        return rc

    def kill9(self):
        """SIGKILL relayd (a crash) and reap it"""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self in Relay.live:
            Relay.live.remove(self)

    def restart(self, timeout=10.0):
        self.stop()
        return self.start(timeout)

    # state ----------------------------------------------------------------------------------
    def log(self):
        try:
            with open(self.logfile, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def dump_log(self, only_new=False, max_lines=300):
        """print relayd's log (or what was added since the last dump) as '# ' lines"""
        text = self.log()
        start = self._log_pos if only_new else 0
        self._log_pos = len(text)
        lines = text[start:].splitlines()
        if not lines:
            return
        diag(f"----- relayd log {self.logfile}" + (" (new lines)" if only_new else ""))
        if len(lines) > max_lines:
            diag(f"[... {len(lines) - max_lines} lines left out ...]")
            lines = lines[-max_lines:]
        diag("\n".join(lines))
        diag("----- end of relayd log")

    def queue_files(self):
        """{id: file bytes} for every file in QUEUE/msg/"""
        d = os.path.join(self.queue_dir, "msg")
        out = {}
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return out
        for n in names:
            p = os.path.join(d, n)
            try:
                with open(p, "rb") as f:
                    out[n] = f.read()
            except (FileNotFoundError, IsADirectoryError):
                pass
        return out

    def queue_ids(self):
        return set(self.queue_files())

    # clients --------------------------------------------------------------------------------
    def ssl_context(self):
        return client_context(self.ca_file)

    def smtp_starttls(self, port=None, host="127.0.0.1", ehlo="client.test"):
        return smtp_starttls(port or self.port_starttls, self.ca_file, host, ehlo)

    def smtp_ssl(self, port=None, host="127.0.0.1"):
        return smtp_ssl(port or self.port_tls, self.ca_file, host)

    def raw(self, port=None, host="127.0.0.1", tls=False, source=None):
        return Raw(port or self.port_starttls, host=host, ca_file=self.ca_file, tls=tls, source=source)

    def session(self, user, password=None, port=None, host="127.0.0.1"):
        """a Raw session on the starttls port: greeting, EHLO, STARTTLS, EHLO, AUTH PLAIN done"""
        c = self.raw(port, host)
        c.reply()
        c.ehlo()
        code, text = c.cmd("STARTTLS")
        if code != 220:
            raise RuntimeError(f"STARTTLS answered {text!r}")
        c.starttls()
        c.ehlo()
        code, text = c.auth_plain(user, self.users[user] if password is None else password)
        if code != 235:
            raise RuntimeError(f"AUTH PLAIN {user} answered {text!r}")
        return c


# --------------------------------------------------------------------------------------------
# queue files (format in relayd/queue.h)
# --------------------------------------------------------------------------------------------

def queue_parse(data):
    """split a queue file into (envelope header lines as {key: [values]}, message bytes,
    trailer bytes); the message is the `size` bytes after the first blank line. Files in an
    unknown format come back as ({}, data, b"")."""
    if not data.startswith(b"RELAYD-QUEUE "):
        return {}, data, b""
    head, sep, rest = data.partition(b"\n\n")
    env = {}
    for line in head.split(b"\n"):
        k, _, v = line.decode("utf-8", "replace").partition(" ")
        env.setdefault(k, []).append(v)
    try:
        size = int(env["size"][0])
    except (KeyError, ValueError):
        return env, rest, b""
    return env, rest[:size], rest[size:]


def message_headers(msg):
    """the header block of a message (bytes, up to the first empty line)"""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = msg.find(sep)
        if i >= 0:
            return msg[:i + len(sep) // 2]
    return msg


def header_count(msg, name):
    """how many header fields called name the message's header block holds"""
    return len(re.findall(rb"(?im)^" + re.escape(name.encode()) + rb"[ \t]*:", message_headers(msg)))


# --------------------------------------------------------------------------------------------
# clients
# --------------------------------------------------------------------------------------------

def client_context(ca_file):
    ctx = ssl.create_default_context(cafile=ca_file)
    return ctx


def smtp_starttls(port, ca_file, host="127.0.0.1", ehlo="client.test"):
    """smtplib.SMTP connected to host:port, after EHLO, STARTTLS (verified against ca_file), EHLO"""
    s = smtplib.SMTP(host, port, local_hostname=ehlo, timeout=SOCK_TIMEOUT)
    s.ehlo()
    s.starttls(context=client_context(ca_file))
    s.ehlo()
    return s


def smtp_ssl(port, ca_file, host="127.0.0.1", ehlo="client.test"):
    """smtplib.SMTP_SSL (implicit TLS) to host:port, verified against ca_file"""
    s = smtplib.SMTP_SSL(host, port, local_hostname=ehlo, context=client_context(ca_file),
                         timeout=SOCK_TIMEOUT)
    s.ehlo()
    return s


def clear_to_starttls(port, host="127.0.0.1", ehlo="client.test"):
    """a plain socket to host:port that read the greeting, sent EHLO and STARTTLS and read the
    reply to STARTTLS: ready for the client's TLS handshake. Returns (socket, that reply line)"""
    s = socket.create_connection((host, port), timeout=SOCK_TIMEOUT)
    f = s.makefile("rb")
    f.readline()
    s.sendall(f"EHLO {ehlo}\r\n".encode())
    while f.readline()[3:4] == b"-":
        pass
    s.sendall(b"STARTTLS\r\n")
    return s, f.readline().decode("utf-8", "replace")


def b64(s):
    if isinstance(s, str):
        s = s.encode()
    return base64.b64encode(s).decode()


class Raw:
    """a byte-exact SMTP client: send() what you want, read replies line by line.

    reply() returns (code, text) for one complete (possibly multi-line) reply, text being all
    its lines joined with "\\n" without CRLF; cmd(line) sends line + CRLF and reads one reply.
    starttls() wraps the socket in TLS; bytes the server sent in clear text after the last read
    are kept in .plain_leftover.
    """

    def __init__(self, port, host="127.0.0.1", ca_file=None, tls=False, timeout=SOCK_TIMEOUT, source=None):
        """source: the local address to connect from (any of 127.0.0.0/8 works on loopback)"""
        self.host, self.port, self.ca_file = host, port, ca_file
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buf = b""
        self.plain_leftover = b""
        self.tls = False
        if tls:
            self._wrap()

    def _wrap(self):
        ctx = client_context(self.ca_file)
        self.sock = ctx.wrap_socket(self.sock, server_hostname=self.host)
        self.tls = True

    def starttls(self):
        """TLS handshake on the existing connection (after a 220 to STARTTLS)"""
        self.plain_leftover = self.buf
        self.buf = b""
        self._wrap()

    def settimeout(self, t):
        self.sock.settimeout(t)

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def recv_line(self):
        """one line including its CRLF (or LF); b"" at EOF; raises socket.timeout"""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line, self.buf = self.buf[:i + 1], self.buf[i + 1:]
                return line
            chunk = self.sock.recv(65536)
            if not chunk:
                line, self.buf = self.buf, b""
                return line
            self.buf += chunk

    def reply(self):
        """(code, text) of one reply; (None, partial text) at EOF"""
        lines = []
        while True:
            line = self.recv_line()
            if not line:
                return None, "\n".join(lines)
            s = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(s)
            if len(s) < 4 or s[3] != "-":
                break
        try:
            code = int(lines[-1][:3])
        except ValueError:
            code = None
        return code, "\n".join(lines)

    def reply_text(self):
        return self.reply()[1]

    def cmd(self, line):
        self.send(line + "\r\n")
        return self.reply()

    def ehlo(self, name="client.test"):
        """(code, text, extensions {KEYWORD: params})"""
        code, text = self.cmd(f"EHLO {name}")
        ext = {}
        for l in text.splitlines()[1:]:
            parts = l[4:].split(None, 1)
            if parts:
                ext[parts[0].upper()] = parts[1] if len(parts) > 1 else ""
        return code, text, ext

    def auth_plain(self, user, password):
        return self.cmd("AUTH PLAIN " + b64(f"\0{user}\0{password}"))

    def auth_login(self, user, password):
        code, text = self.cmd("AUTH LOGIN")
        if code != 334:
            return code, text
        code, text = self.cmd(b64(user))
        if code != 334:
            return code, text
        return self.cmd(b64(password))

    def eof(self, timeout=5.0):
        """True if the server closes the connection within timeout (pending bytes are read)"""
        self.sock.settimeout(timeout)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
            return False
        except (socket.timeout, TimeoutError):
            return False
        except OSError:
            return True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


QUEUED_RE = r"^250 2\.0\.0 Ok: queued as ([0-9A-Fa-f]{16})$"


def queued_id(text):
    """the queue id of a '250 2.0.0 Ok: queued as <id>' reply, or None"""
    m = re.search(QUEUED_RE, text or "", re.M)
    return m.group(1) if m else None


def make_message(frm, to, subject="relaytest", body="Hello.\r\n", extra_headers=()):
    """a small RFC 5322 message with CRLF line ends (no Message-ID or Date unless given)"""
    h = [f"From: <{frm}>", f"To: <{to}>", f"Subject: {subject}"] + list(extra_headers)
    return ("\r\n".join(h) + "\r\n\r\n" + body).encode()


def dot_stuff(data):
    """SMTP transparency (RFC 5321 4.5.2) and the final dot, for raw DATA"""
    out = re.sub(rb"(?m)^\.", b"..", data)
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out + b".\r\n"


# --------------------------------------------------------------------------------------------
# external clients
# --------------------------------------------------------------------------------------------

def _runner(argv, timeout):
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout)
        return r.returncode, r.stdout.decode("utf-8", "replace")
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode("utf-8", "replace")
        return -1, out + f"\n[relaytest: {argv[0]} killed after {timeout} s]"
    except FileNotFoundError:
        return -2, f"[relaytest: {argv[0]} is not installed]"


def swaks(args, timeout=30):
    """run swaks ARGS; returns (rc, stdout+stderr)"""
    return _runner(["swaks", "--timeout", str(int(SOCK_TIMEOUT))] + list(args), timeout * SLOW)


def curl(args, timeout=30):
    """run curl ARGS; returns (rc, stdout+stderr)"""
    return _runner(["curl", "--max-time", str(int(20 * SLOW))] + list(args), timeout * SLOW)


# --------------------------------------------------------------------------------------------
# capture sink (upstream SMTP server for forwarding tests)
# --------------------------------------------------------------------------------------------

class AsyncServer:
    """a TCP server on 127.0.0.1 (port: .port) run by asyncio in a thread of its own, for
    upstreams a test scripts; a subclass sets its fields, then calls AsyncServer.__init__,
    and defines async _client(reader, writer). stop() closes it and cancels its clients."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.th = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.th.start()
        if not ready.wait(10):
            raise RuntimeError(f"{type(self).__name__} did not start")

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def stop(self):
        async def _stop():
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            await asyncio.sleep(0.1)
            self.loop.stop()
        asyncio.run_coroutine_threadsafe(_stop(), self.loop)
        self.th.join(5)


class Sink:
    """tools/capture-sink on 127.0.0.1:<free port>; messages() reads what it stored"""

    def __init__(self, args=(), dir=None):
        self.dir = dir or os.path.join(mkdtemp("relaytest-sink-"), "captured")
        self.port_file = os.path.join(os.path.dirname(self.dir), "sink.port")
        self.logfile = os.path.join(os.path.dirname(self.dir), "sink.log")
        logf = open(self.logfile, "ab")
        self.proc = spawn([PYTHON, CAPTURE_SINK, "--listen", "127.0.0.1:0", "--dir", self.dir,
                           "--port-file", self.port_file] + list(args),
                          stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        logf.close()
        if not wait_for(lambda: os.path.exists(self.port_file) or self.proc.poll() is not None, 10):
            raise RuntimeError("capture-sink did not start")
        if self.proc.poll() is not None:
            raise RuntimeError("capture-sink exited:\n" + self.log())
        with open(self.port_file) as f:
            self.port = int(f.read())

    def log(self):
        with open(self.logfile, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def messages(self):
        """[(meta dict, eml bytes)] in arrival order"""
        import json
        out = []
        names = sorted((int(n[:-5]) for n in os.listdir(self.dir) if n.endswith(".json")))
        for n in names:
            with open(os.path.join(self.dir, f"{n}.json")) as f:
                meta = json.load(f)
            with open(os.path.join(self.dir, f"{n}.eml"), "rb") as f:
                out.append((meta, f.read()))
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode
