"""Side-by-side: direct, bulkhead, PgBouncer, HAProxy, on one PostgreSQL, interleaved rounds.

The server has ssl = on (a self-signed certificate made with openssl). The plain workloads use
no TLS anywhere. The TLS workloads compare TLS to the server: bulkhead with [database] tls =
"require" and PgBouncer with server_tls_sslmode = require (clients in plaintext, as a sidecar's
are), against pgbench with sslmode=require directly and through HAProxy (TLS end to end).

Reports per workload and system: median tps, average and p99 latency, ratios, and proxy CPU
seconds per 100k transactions (utime + stime of the proxy process from /proc; utime alone in
parentheses), and the CPU seconds of the whole machine per 100k transactions (busy time of all
CPUs from /proc/stat: pgbench, PostgreSQL and the proxy together). On a small machine the proxy,
pgbench and PostgreSQL share the cores, so CPU per transaction is the fair figure. Also
bulkhead's and PgBouncer's RSS growth per idle client. With --floor, the plain workloads also
run through benches/floor.rs, a bare relay that parses nothing, for scale, as it is and with its
sends batched through io_uring.

Pooling (issue 20): the "tx" workloads run 100 clients through bulkhead ([pool] mode =
"transaction", size 10) and PgBouncer (pool_mode = transaction, default_pool_size = 10, and
max_prepared_statements = 200 where PgBouncer is 1.21 or later; an older PgBouncer is left out
of `-M prepared`, which it cannot pool), against 100 direct connections. The "session" workloads
open a new connection per transaction through bulkhead ([pool] mode = "session", size 20) and
PgBouncer (session mode, default_pool_size = 20), without and with TLS to the server. Both
poolers authenticate pgbench the same way, SCRAM-SHA-256 against a verifier of the same password
in a users file (so pgbench's own key derivation, about a millisecond of its CPU per login, is
in every -C row of the pooled systems); they log in to the server, which trusts local
connections, without one (direct connections and the passthrough systems do no password
exchange at all). The idle clients of the
pooled systems log in with SCRAM too. Run through
benches/compare.
"""

import argparse
import base64
import collections
import glob
import hashlib
import hmac
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target/release/bulkhead")
PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
AS_ROOT = os.geteuid() == 0
USER = "postgres"
PASSWORD = "bench-password"  # pgbench's; the server itself trusts local connections


def scram_verifier(password, iterations=4096):
    """A SCRAM-SHA-256 verifier as PostgreSQL stores it (and PgBouncer's auth_file takes it):
    the pooled systems' users files hold this, not the password, as a production one would,
    so neither derives the salted password per login."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server = hmac.digest(salted, b"Server Key", "sha256")
    b64 = lambda b: base64.b64encode(b).decode()
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_server_user(cmd):
    return ["runuser", "-u", "postgres", "--"] + cmd if AS_ROOT else cmd


def run(cmd, **kw):
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: exit status {done.returncode}\n{done.stderr.strip()[-3000:]}")
    return done


def wait_port(port, what, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


def cpu_seconds(pid):
    """(user, system) CPU seconds of the process `pid`, all threads."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


class UserShare:
    """With --sample: perf samples every CPU 1,000 times a second (hrtimer-driven cpu-clock, so
    no hardware counters are needed) while a run lasts, and the share of the process's samples
    taken in user space splits its CPU time. The kernel's own user/system split is sampled at
    the scheduler tick (250 Hz here) and reported in 10 ms units: over a 6 s run a proxy's user
    time is some 40 ticks. Sampling the process itself instead (perf record -p) cost it a third
    more CPU per transaction at 1 kHz and twice as much at 10 kHz."""

    def __init__(self, pid, work):
        self.pid, self.out = pid, os.path.join(work, f"sample-{pid}.data")
        # Every CPU, not the process (see above): per-process events are switched with it at
        # every context switch.
        self.proc = subprocess.Popen(["perf", "record", "-q", "-a", "-e", "cpu-clock", "-F", "1000",
                                      "-o", self.out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def share(self):
        """The share of the process's samples taken in user space (NaN without samples), and
        the share of them each user-space function got ({function: share of all samples})."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait()
        lines = subprocess.run(["perf", "script", "-i", self.out, "--pid", str(self.pid), "-F", "ip,sym"],
                               capture_output=True, text=True).stdout.splitlines()
        os.remove(self.out)
        samples = [(int(f[0], 16), f[1] if len(f) > 1 else "?")
                   for f in (line.strip().split(None, 1) for line in lines) if f]
        user = collections.Counter(sym for ip, sym in samples if ip < 0xffff800000000000)
        n = len(samples)
        if not n:
            return float("nan"), {}
        return sum(user.values()) / n, {sym: k / n for sym, k in user.items()}


def machine_busy_seconds():
    """CPU seconds all CPUs have spent busy (not idle, not waiting for I/O) since boot."""
    ticks = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def start_postgres(work, max_connections, ssl=True):
    """initdb, start and pgbench -i (scale 10) a throwaway server in `work`; returns (port, data dir)."""
    if AS_ROOT:
        shutil.chown(work, "postgres")
    port = free_port()
    data = os.path.join(work, "data")
    run(as_server_user([f"{PG_BIN}/initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync"]))
    if ssl:
        run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
             "-keyout", os.path.join(data, "server.key"), "-out", os.path.join(data, "server.crt")])
        os.chmod(os.path.join(data, "server.key"), 0o600)
        if AS_ROOT:
            for f in ("server.key", "server.crt"):
                shutil.chown(os.path.join(data, f), "postgres")
    with open(os.path.join(data, "postgresql.conf"), "a") as f:
        f.write(f"ssl = {'on' if ssl else 'off'}\n")
        f.write(f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{work}'\n"
                f"max_connections = {max_connections}\nshared_buffers = 256MB\nfsync = off\n"
                "synchronous_commit = off\nfull_page_writes = off\n")
    run(as_server_user([f"{PG_BIN}/pg_ctl", "-D", data, "-l", os.path.join(work, "pg.log"), "-w", "start"]))
    run([f"{PG_BIN}/pgbench", "-i", "-q", "-s", "10", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "postgres"])
    return port, data


def write_bulkhead_config(path, port, pg_port, tls, max_clients, mode="passthrough", size=20, users=None):
    """bulkhead's defaults (deadlines, classification, probe, admission, metrics all on), with
    admission limits high enough that the benchmark's clients are never shed, and a write
    deadline of 10 s instead of 2 s: on two cores, with a proxy taking a share of them,
    PostgreSQL itself now and then takes 1–3 s over a pgbench -N statement (its own log says
    so, and PgBouncer's runs show the same tail), and a cancelled write that the starved server
    then also answers late aborts the whole run. Deadlines cost the same whatever their length. In the pooled
    modes, a pool of `size` per (user, database), the users file `users`, and a long enough
    queue_timeout that no client waiting for a pooled connection is refused."""
    with open(path, "w") as f:
        f.write(f'[listen]\naddress = "127.0.0.1:{port}"\n[health]\naddress = "127.0.0.1:{free_port()}"\n'
                f'[database]\nhosts = ["127.0.0.1:{pg_port}"]\ntls = "{tls}"\n'
                f'[limits]\nmax_clients = {max_clients}\nmax_inflight = 256\nmax_inflight_writes = 256\n')
        if mode != "passthrough":
            f.write(f'queue_timeout = "10s"\n[pool]\nmode = "{mode}"\nsize = {size}\n[auth]\nfile = "{users}"\n')
        f.write('[timeouts]\nwrite = "10s"\n')


def stop_postgres(data):
    subprocess.run(as_server_user([f"{PG_BIN}/pg_ctl", "-D", data, "-m", "immediate", "stop"]), capture_output=True)


class Systems:
    def __init__(self, work, idle_clients):
        self.work = work
        self.procs = {}
        self.pg_port, self.data = start_postgres(work, idle_clients + 300)
        self.ports = {"direct": self.pg_port, "direct-tls": self.pg_port}
        # What pgbench's own connection uses: TLS only where the client does TLS itself.
        self.sslmode = {"direct-tls": "require", "haproxy-tls": "require"}
        self.start_bulkhead("bulkhead", "disable", idle_clients)
        self.start_bulkhead("bulkhead-tls", "require", idle_clients)
        self.start_pgbouncer("pgbouncer", "disable", idle_clients)
        self.start_pgbouncer("pgbouncer-tls", "require", idle_clients)
        self.start_haproxy(idle_clients)
        self.ports["haproxy-tls"] = self.ports["haproxy"]
        self.procs["haproxy-tls"] = self.procs["haproxy"]
        # Pooled: both poolers check pgbench's SCRAM login against the same plain password.
        self.start_bulkhead("bulkhead-tx", "disable", idle_clients, "transaction", 10)
        self.start_bulkhead("bulkhead-session", "disable", idle_clients, "session", 20)
        self.start_bulkhead("bulkhead-session-tls", "require", idle_clients, "session", 20)
        self.pgbouncer_prepared = pgbouncer_version() >= (1, 21)  # max_prepared_statements
        self.start_pgbouncer("pgbouncer-tx", "disable", idle_clients, "transaction", 10, scram=True,
                             prepared=200 if self.pgbouncer_prepared else 0)
        self.start_pgbouncer("pgbouncer-session", "disable", idle_clients, "session", 20, scram=True)
        self.start_pgbouncer("pgbouncer-session-tls", "require", idle_clients, "session", 20, scram=True)

    def spawn(self, name, cmd, port):
        log = open(os.path.join(self.work, f"{name}.log"), "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=log)
        self.ports[name] = port
        wait_port(port, name)

    def start_bulkhead(self, name, tls, idle_clients, mode="passthrough", size=20, binary=None):
        port = free_port()
        conf = os.path.join(self.work, f"{name}.toml")
        users = os.path.join(self.work, f"{name}-users.txt")
        if mode != "passthrough":
            open(users, "w").write(f'"{USER}" "{scram_verifier(PASSWORD)}"\n')
        write_bulkhead_config(conf, port, self.pg_port, tls, idle_clients + 200, mode, size, users)
        self.spawn(name, [binary or BINARY, "--config", conf], port)

    def start_pgbouncer(self, name, tls, idle_clients, mode="session", pool_size=None, scram=False, prepared=0):
        """PgBouncer with trust for its clients (scram: SCRAM-SHA-256 against PASSWORD), a pool
        of `pool_size` (default: more than the idle clients), and max_prepared_statements if
        `prepared`."""
        port = free_port()
        conf = os.path.join(self.work, f"{name}.ini")
        users = os.path.join(self.work, f"{name}-users.txt")
        open(users, "w").write(f'"{USER}" "{scram_verifier(PASSWORD) if scram else ""}"\n')
        with open(conf, "w") as f:
            f.write(f"[databases]\npostgres = host=127.0.0.1 port={self.pg_port} dbname=postgres\n"
                    f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
                    f"auth_type = {'scram-sha-256' if scram else 'trust'}\nauth_file = {users}\npool_mode = {mode}\n"
                    f"max_client_conn = {idle_clients + 200}\ndefault_pool_size = {pool_size or idle_clients + 100}\n"
                    f"max_db_connections = 0\nlogfile = {self.work}/{name}.out\npidfile =\n"
                    f"server_tls_sslmode = {tls}\n")
            if prepared:
                f.write(f"max_prepared_statements = {prepared}\n")
        if AS_ROOT:
            for p in (conf, users):
                shutil.chown(p, "postgres")
        self.spawn(name, as_server_user([pgbouncer_exe(), conf]), port)
        if AS_ROOT:  # runuser is the parent; find pgbouncer itself for /proc
            self.procs[name].real_pid = int(run(["pgrep", "-n", "-f", f"pgbouncer {conf}"]).stdout.split()[0])

    def start_haproxy(self, idle_clients):
        port = free_port()
        conf = os.path.join(self.work, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(f"global\n  maxconn {2 * idle_clients + 400}\n"
                    "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
                    f"listen pg\n  bind 127.0.0.1:{port}\n  server db 127.0.0.1:{self.pg_port}\n")
        exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.spawn("haproxy", [exe, "-f", conf, "-db"], port)

    def start_floor(self, name, exe, *flags):
        port = free_port()
        self.spawn(name, [exe, f"127.0.0.1:{port}", f"127.0.0.1:{self.pg_port}", *flags], port)

    def pid(self, name):
        p = self.procs.get(name)
        return getattr(p, "real_pid", p.pid) if p else None

    def stop(self):
        procs = {id(p): p for p in self.procs.values()}.values()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        stop_postgres(self.data)


def pgbouncer_exe():
    """$PGBOUNCER (a PgBouncer built elsewhere, e.g. 1.21+ for max_prepared_statements), else Debian's."""
    return os.environ.get("PGBOUNCER") or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def pgbouncer_version():
    """(major, minor) of the installed PgBouncer: its --version says "PgBouncer 1.18.0"."""
    words = run([pgbouncer_exe(), "--version"]).stdout.split()
    return tuple(int(x) for x in words[1].split(".")[:2])


def commit():
    """The commit the measured bulkhead was built from, marked if the tree had changes."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src", "Cargo.toml", "Cargo.lock"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return (head.stdout.strip() or "unknown") + (" with uncommitted changes" if dirty else "")


def pgbench(port, sslmode, args, seconds, logdir):
    for f in glob.glob(os.path.join(logdir, "pgbench_log*")):
        os.remove(f)
    # The password is for the poolers; the server and the passthrough systems never ask for it.
    env = {**os.environ, "PGSSLMODE": sslmode, "PGPASSWORD": PASSWORD}
    out = run([f"{PG_BIN}/pgbench", "-n", *args, "-T", str(seconds), "-l", "--sampling-rate", "0.2",
               "--log-prefix", os.path.join(logdir, "pgbench_log"), "-h", "127.0.0.1", "-p", str(port),
               "-U", "postgres", "postgres"], cwd=logdir, env=env).stdout
    tps = float(out.split("tps = ")[1].split()[0])
    latency = float(out.split("latency average = ")[1].split()[0])
    done = int(out.split("number of transactions actually processed: ")[1].split()[0].split("/")[0])
    failed = out.split("number of failed transactions: ")[1].split()[0]
    samples = []
    for f in glob.glob(os.path.join(logdir, "pgbench_log*")):
        for line in open(f):
            parts = line.split()
            if len(parts) > 2:
                samples.append(int(parts[2]) / 1000.0)
    samples.sort()
    p99 = samples[int(len(samples) * 0.99)] if samples else float("nan")
    return tps, latency, p99, done, int(failed)


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            sys.exit("idle client: the connection closed during login")
        buf += chunk
    return buf


def send_msg(s, kind, body):
    s.sendall(kind + struct.pack("!i", 4 + len(body)) + body)


def login(s, user, password):
    """Logs in as `user` with trust, md5 or SCRAM-SHA-256 (no channel binding), to ReadyForQuery."""
    startup = b"user\0" + user.encode() + b"\0database\0postgres\0\0"
    s.sendall(struct.pack("!ii", 8 + len(startup), 196608) + startup)
    while True:
        kind, length = struct.unpack("!ci", recv_exact(s, 5))
        body = recv_exact(s, length - 4)
        if kind == b"Z":
            return
        if kind == b"E":
            sys.exit(f"idle client refused: {body!r}")
        code = struct.unpack("!i", body[:4])[0] if kind == b"R" else 0
        if code == 5:  # AuthenticationMD5Password, salt in body[4:8]
            inner = hashlib.md5((password + user).encode()).hexdigest().encode()
            send_msg(s, b"p", b"md5" + hashlib.md5(inner + body[4:8]).hexdigest().encode() + b"\0")
        elif code == 10:  # AuthenticationSASL: client-first-message
            first_bare = f"n=,r={base64.b64encode(os.urandom(18)).decode()}"
            first = f"n,,{first_bare}".encode()
            send_msg(s, b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
        elif code == 11:  # AuthenticationSASLContinue: server-first-message; send the proof
            server_first = body[4:].decode()
            attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
            salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
            client_key = hmac.digest(salted, b"Client Key", "sha256")
            final_bare = f"c=biws,r={attrs['r']}"
            signature = hmac.digest(hashlib.sha256(client_key).digest(),
                                    f"{first_bare},{server_first},{final_bare}".encode(), "sha256")
            proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature))).decode()
            send_msg(s, b"p", f"{final_bare},p={proof}".encode())
        elif kind == b"R" and code not in (0, 12):  # 12: SASLFinal (the server's signature, unchecked)
            sys.exit(f"idle client: authentication request {code} not handled")


def idle_rss(port, pid, n):
    """RSS growth of the process `pid` while `n` idle clients are logged in through `port`."""
    before = rss_kib(pid)
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        login(s, USER, PASSWORD)
        socks.append(s)
    time.sleep(7)  # idle sessions give their buffers back after a second quiet, and memory
    # is returned to the system every 5 s; then measure
    after = rss_kib(pid)
    for s in socks:
        s.close()
    return (after - before) / n


def sign_test(k, n):
    """The chance of k or more of n rounds under 1.00 if bulkhead's CPU were as likely over
    PgBouncer's as under it in each round (one-sided sign test)."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def paired_cpu(workloads, results):
    """Each bulkhead system's CPU per transaction against its PgBouncer counterpart (the same
    name after the first dash), round by round: both ran in the same round, so each round's
    ratio sees the same machine. The medians of those ratios, total, user and system time, with
    how many rounds were under 1.00 and a sign test's chance of that many."""
    out = []
    for name, _, order in workloads:
        for s in order:
            if not s.startswith("bulkhead"):
                continue
            twin = "pgbouncer" + s[len(s.split("-")[0]):]
            if s.startswith("bulkhead-b"):
                twin = "pgbouncer"
            if twin not in order:
                continue
            per_round = [(a[3] / b[3], a[5] / b[5], (a[3] - a[5]) / (b[3] - b[5]))
                         for a, b in zip(results[(name, s)], results[(name, twin)])
                         if a[3] == a[3] and b[3] and b[5] and b[3] > b[5]]
            if not per_round:
                continue
            cells = []
            for i in range(3):
                xs = [r[i] for r in per_round]
                under = sum(x < 1 for x in xs)
                cells.append(f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f}, "
                             f"{under} of {len(xs)} under 1.00, p {sign_test(under, len(xs)):.3f})")
            out.append(f"| `{name}` | {s} ÷ {twin} | " + " | ".join(cells) + " |")
    if not out:
        return []
    return ["", "Proxy CPU per transaction, bulkhead ÷ PgBouncer, round by round (median, range, "
            "rounds under 1.00, and the chance of that many or more if each round were a coin toss):",
            "", "| workload | systems | total | user | system |", "|---|---|---|---|---|", *out]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--idle-clients", type=int, default=1000, help="idle clients for the RSS measurement (0: none)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="", help="run only the workloads whose name contains this "
                    "(or one of several, separated by commas; one that starts with = must match the whole name)")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy the proxies' and PostgreSQL's logs to DIR at the end")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/bulkhead"),
                    help="the bulkhead to run (e.g. an older build, to compare)")
    ap.add_argument("--against", metavar="PATH",
                    help="also run this second bulkhead build (as bulkhead-b) in the plain workloads, "
                         "so that two builds are compared in the same run")
    ap.add_argument("--no-alloc", action="store_true", help="skip benches/alloc.rs (cargo bench builds it first)")
    ap.add_argument("--rate", type=int, default=0,
                    help="run every workload at this many transactions a second (pgbench -R) instead of flat out")
    ap.add_argument("--sample", action="store_true",
                    help="split each proxy's CPU into user and system time by sampling it with perf at 1 kHz "
                         "rather than by the kernel's tick-based accounting (needs perf: linux-perf)")
    ap.add_argument("--systems", default="",
                    help="run only the systems whose name starts with one of these (comma-separated), "
                         "e.g. bulkhead,pgbouncer: more rounds in the same time when only their CPU is compared")
    ap.add_argument("--sample-top", type=int, default=0, metavar="N",
                    help="with --sample, also list the N user-space functions with the most of each system's "
                         "user time")
    ap.add_argument("--floor", action="store_true",
                    help="also run the plain workloads through benches/floor.rs, a bare relay, for scale "
                         "(as it is, and with --uring)")
    args = ap.parse_args()
    global BINARY
    BINARY = args.binary
    built_from = commit()  # before the run, which takes a while
    work = tempfile.mkdtemp(prefix="bulkhead-compare-")
    systems = Systems(work, args.idle_clients)
    plain = ["direct", "bulkhead", "pgbouncer", "haproxy"]
    if args.floor:
        systems.start_floor("floor", os.environ["BULKHEAD_FLOOR_BIN"])
        systems.start_floor("floor-uring", os.environ["BULKHEAD_FLOOR_BIN"], "--uring")
        plain += ["floor", "floor-uring"]
    if args.against:
        systems.start_bulkhead("bulkhead-b", "disable", args.idle_clients, binary=args.against)
        plain.append("bulkhead-b")
    tls = ["direct-tls", "bulkhead-tls", "pgbouncer-tls", "haproxy-tls"]
    workloads = []
    for clients in (1, 16):
        for mode in ("simple", "extended", "prepared"):
            workloads.append((f"-S -M {mode} -c {clients}", ["-S", "-M", mode, "-c", str(clients), "-j", str(min(clients, 2))], plain))
    workloads.append(("-N -M prepared -c 16", ["-N", "-M", "prepared", "-c", "16", "-j", "2"], plain))
    workloads.append(("TLS -S -M prepared -c 1", ["-S", "-M", "prepared", "-c", "1"], tls))
    workloads.append(("TLS -S -M prepared -c 16", ["-S", "-M", "prepared", "-c", "16", "-j", "2"], tls))
    workloads.append(("TLS -S -M simple -c 4 -C", ["-S", "-M", "simple", "-c", "4", "-j", "2", "-C"], tls))
    # Pooling (issue 20). PgBouncer before 1.21 cannot pool named prepared statements.
    tx = ["direct", "bulkhead-tx", "pgbouncer-tx"]
    workloads.append(("tx -S -M prepared -c 100", ["-S", "-M", "prepared", "-c", "100", "-j", "2"],
                      tx if systems.pgbouncer_prepared else tx[:2]))
    workloads.append(("tx -S -M simple -c 100", ["-S", "-M", "simple", "-c", "100", "-j", "2"], tx))
    workloads.append(("session -S -M simple -c 4 -C", ["-S", "-M", "simple", "-c", "4", "-j", "2", "-C"],
                      ["direct", "bulkhead-session", "pgbouncer-session"]))
    workloads.append(("session TLS -S -M simple -c 4 -C", ["-S", "-M", "simple", "-c", "4", "-j", "2", "-C"],
                      ["direct-tls", "bulkhead-session-tls", "pgbouncer-session-tls"]))
    workloads = [w for w in workloads
                 if any(w[0] == p[1:] if p.startswith("=") else p in w[0] for p in args.only.split(","))]
    if args.systems:
        keep = tuple(args.systems.split(","))
        workloads = [(name, wargs, [s for s in order if s.startswith(keep)]) for name, wargs, order in workloads]
    if args.rate:
        # A fixed arrival rate (pgbench -R): the machine is not saturated, so every proxy sees the
        # same load and wakes up as often, and its CPU per transaction moves far less from run
        # to run than at full speed, where each run settles into its own batching.
        workloads = [(f"{name} -R {args.rate}", wargs + ["-R", str(args.rate)], order) for name, wargs, order in workloads]
    results = {(w, s): [] for w, _, order in workloads for s in order}
    # With --sample: each system's user time by function, CPU-s per 100k transactions, the
    # mean of the rounds.
    where = collections.defaultdict(collections.Counter)
    try:
        alloc_report = "(skipped: --no-alloc)"
        if not args.no_alloc:
            alloc = subprocess.run(["cargo", "bench", "--quiet", "--bench", "alloc"], cwd=ROOT, capture_output=True, text=True,
                                   env={**os.environ, "BULKHEAD_BENCH_PG": f"127.0.0.1:{systems.pg_port}",
                                        "BULKHEAD_BENCH_TLS": "1", "PGSSLMODE": "disable"})
            alloc_report = alloc.stdout.strip() or alloc.stderr.strip()[-2000:]
        for r in range(args.rounds):
            for name, wargs, order in workloads:
                # The order turns by one each round: whichever runs first in a round gets a few
                # percent of an edge (a cooler machine, PostgreSQL's caches just warmed).
                turn = r % len(order)
                for system in order[turn:] + order[:turn]:
                    pid = systems.pid(system)
                    user0, sys0 = cpu_seconds(pid) if pid else (0.0, 0.0)
                    sslmode = systems.sslmode.get(system, "disable")
                    busy0 = machine_busy_seconds()
                    sampler = UserShare(pid, work) if pid and args.sample else None
                    tps, lat, p99, done, failed = pgbench(systems.ports[system], sslmode, wargs, args.seconds, work)
                    user1, sys1 = cpu_seconds(pid) if pid else (float("nan"), float("nan"))
                    total, user = user1 - user0 + sys1 - sys0, user1 - user0
                    if sampler:
                        # The total from /proc (exact: the kernel scales its ticks to the
                        # scheduler's runtime), split by the samples.
                        share, functions = sampler.share()
                        user = total * share
                        for sym, f in functions.items():
                            where[(name, system)][sym] += total * f * 100_000 / done / args.rounds if done else 0
                    busy = machine_busy_seconds() - busy0
                    per = 100_000 / done if done else float("nan")
                    cpu, user = total * per, user * per
                    results[(name, system)].append((tps, lat, p99, cpu, failed, user, busy * per))
                    print(f"round {r + 1} {name:40} {system:21} tps {tps:9.0f} lat {lat:7.3f} ms p99 {p99:7.3f} ms "
                          f"cpu/100k {cpu:.3f} (user {user:.3f}) all {busy * per:.2f} failed {failed}", flush=True)
        rss = {s: idle_rss(systems.ports[s], systems.pid(s), args.idle_clients)
               for s in ("bulkhead", "bulkhead-tls", "pgbouncer", "bulkhead-tx", "pgbouncer-tx")} if args.idle_clients else {}
    finally:
        systems.stop()
        if args.keep_logs:
            os.makedirs(args.keep_logs, exist_ok=True)
            for f in glob.glob(os.path.join(work, "*.log")) + glob.glob(os.path.join(work, "*.out")):
                shutil.copy(f, args.keep_logs)
    med = lambda xs: statistics.median(xs)
    lines = [
        f"Date: {time.strftime('%Y-%m-%d')}; commit {built_from}; machine: {os.cpu_count()} cores, {platform.machine()}, "
        f"{platform.system()} {platform.release()}; PostgreSQL {os.path.basename(os.path.dirname(PG_BIN))}; "
        f"{args.rounds} interleaved rounds of {args.seconds} s; medians.",
        "",
        "| workload | system | tps | avg latency ms | p99 ms | proxy CPU-s / 100k tx (user) | all CPUs / 100k tx | tps vs direct | vs PgBouncer | vs HAProxy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, _, order in workloads if args.rounds else []:
        tps = {s: med([x[0] for x in results[(name, s)]]) for s in order}
        # The systems the ratios are against, by name prefix: one each, or none ("—").
        bases = []
        for prefix in ("direct", "pgbouncer", "haproxy"):
            found = [s for s in order if s.split("-")[0] == prefix]
            assert len(found) <= 1, f"{name}: more than one {prefix} system: {found}"
            bases.append(tps[found[0]] if found else None)
        for s in order:
            rs = results[(name, s)]
            cpu, user = med([x[3] for x in rs]), med([x[5] for x in rs])
            ratios = " | ".join("—" if b is None else f"{tps[s] / b:.2f}" for b in bases)
            lines.append(f"| `{name}` | {s} | {tps[s]:.0f} | {med([x[1] for x in rs]):.3f} | {med([x[2] for x in rs]):.3f} | "
                         f"{'—' if cpu != cpu else f'{cpu:.2f} ({user:.2f})'} | {med([x[6] for x in rs]):.2f} | {ratios} |")
    lines += paired_cpu(workloads, results) if args.rounds else []
    if where and args.sample_top:
        lines += ["", f"User time by function (`--sample`), CPU-ms per 100k transactions, the {args.sample_top} largest "
                  "(samples just after a system call returns are the kernel's exit path, landed in user space):"]
        for (name, system), functions in where.items():
            top = ", ".join(f"{sym[:60]} {v * 1000:.0f}" for sym, v in functions.most_common(args.sample_top))
            lines += ["", f"- `{name}` {system}: {top}"]
    if not systems.pgbouncer_prepared and any(name.startswith("tx -S -M prepared") for name, _, _ in workloads):
        lines += ["", f"PgBouncer {'.'.join(map(str, pgbouncer_version()))} has no max_prepared_statements (1.21 and later): "
                  "it is left out of `tx -S -M prepared -c 100`."]
    if rss:
        lines += ["", f"RSS growth per idle client ({args.idle_clients} clients): "
                  + ", ".join(f"{s} {v:.1f} KiB" for s, v in rss.items())]
    lines += ["", "Allocations (benches/alloc.rs):", "",
              *("    " + l for l in alloc_report.splitlines())]
    report = "\n".join(lines)
    print("\n" + report)
    if args.out:
        open(args.out, "w").write(report + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
