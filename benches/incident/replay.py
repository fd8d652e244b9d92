"""Runs the incident replay: every fault through every system, then the churn measurement.

Started by benches/incident/run (which installs what this needs); see README.md beside this file.
For each fault and system: a fresh PostgreSQL cluster (a streaming standby too for `failover`),
the system under test in front of it (nothing, PgBouncer or bulkhead), app.py in front of that,
and load.py driving app.py for healthy + fault + healed seconds while the fault is injected and
healed on schedule. Afterwards the acknowledged write ids are looked up on the surviving primary.
Everything a run produced goes to RESULTS/runs/<fault>/<system>/.
"""

import argparse
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request

import psycopg

HERE = os.path.dirname(os.path.abspath(__file__))
PG_BIN = (sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(re.findall(r"/(\d+)/bin", p)[0]))
          or [""])[-1]
AS_ROOT = os.geteuid() == 0
FAULTS = ["stall-tx", "stall-auto", "failover", "frozen", "failover-split", "failover-ro"]
# Failovers with the app's reads on a pool of their own: on the same address as the writes
# (failover-split), or on a read endpoint (failover-ro: bulkhead's read-only listener; libpq's
# target_session_attrs=prefer-standby directly).
SPLIT = {"failover-split": "main", "failover-ro": "readonly"}
ALL_FAULTS = FAULTS + ["churn"]
SYSTEMS = ["direct", "pgbouncer", "bulkhead"]
APP_MODE = {"stall-tx": "--tx", "stall-auto": "--autocommit", "failover": "--tx", "frozen": "--tx",
            "failover-split": "--tx", "failover-ro": "--tx"}
FIRST_ID = 1_000_001
DB = "incident"


class Stop(Exception):
    pass


def on_signal(signum, _frame):
    raise Stop(f"signal {signum}")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_server_user(cmd):
    return ["runuser", "-u", "postgres", "--"] + cmd if AS_ROOT else cmd


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
    return r


def wait_port(port, what, seconds=30, proc=None):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {seconds}s")


def http_get(addr, path, timeout=1.0):
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return None, str(e)


def wait_http(addr, path, seconds, what):
    deadline = time.time() + seconds
    last = None
    while time.time() < deadline:
        last = http_get(addr, path)
        if last[0] == 200:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what}: {path} not 200 within {seconds}s (last: {last})")


def sql(port, statements, dbname="postgres", fetch=False):
    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname=dbname, autocommit=True,
                         connect_timeout=10) as conn:
        res = None
        for s in statements:
            cur = conn.execute(s)
            if fetch and cur.description:
                res = cur.fetchall()
        return res


# ---------------------------------------------------------------- processes


class Procs:
    """Every process this harness starts, each in its own process group, so all can be ended."""

    def __init__(self):
        self.procs = []

    def spawn(self, cmd, logpath, env=None):
        f = open(logpath, "ab")
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env=env)
        f.close()
        self.procs.append(p)
        return p

    def end(self, p, grace=5.0):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def kill(self, p):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def end_all(self):
        for p in list(self.procs):
            self.end(p, grace=3.0)


# ---------------------------------------------------------------- PostgreSQL


class Cluster:
    """One PostgreSQL data directory under `root`, started on a free port as the server user."""

    def __init__(self, root, name):
        self.dir = os.path.join(root, name)
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "pg.log")
        self.port = free_port()
        self.frozen = []

    def conf(self, extra=""):
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(f"\n# incident replay\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.dir}'\n{extra}")

    def start(self):
        run(as_server_user([f"{PG_BIN}/pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "start"]))

    def stop(self, mode="immediate"):
        if not os.path.exists(os.path.join(self.data, "postmaster.pid")):
            return
        self.thaw()
        subprocess.run(as_server_user([f"{PG_BIN}/pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "30", "stop"]),
                       capture_output=True)

    def postmaster_pid(self):
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            return int(f.readline())

    def family(self):
        pm = self.postmaster_pid()
        kids = []
        for st in glob.glob("/proc/[0-9]*/stat"):
            try:
                fields = open(st).read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pm:
                kids.append(int(st.split("/")[2]))
        return pm, kids

    def freeze(self):
        pm, _ = self.family()
        os.kill(pm, signal.SIGSTOP)  # first, so it forks no new backend meanwhile
        self.frozen = [pm]
        _, kids = self.family()
        for k in kids:
            try:
                os.kill(k, signal.SIGSTOP)
                self.frozen.append(k)
            except ProcessLookupError:
                pass
        return len(self.frozen)

    def thaw(self):
        for p in reversed(self.frozen):
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass
        n = len(self.frozen)
        self.frozen = []
        return n


class Postgres:
    """Makes fresh clusters from one initdb template (initdb once per harness run)."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.template = os.path.join(tmp, "template")
        os.makedirs(self.template)
        if AS_ROOT:
            shutil.chown(tmp, "postgres")
            shutil.chown(self.template, "postgres")
        run(as_server_user([f"{PG_BIN}/initdb", "-D", os.path.join(self.template, "data"), "-U", "postgres",
                            "-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C"]))
        self.live = []
        self.n = 0

    def new_root(self, name):
        self.n += 1
        root = os.path.join(self.tmp, f"{self.n:02d}-{name}")
        os.makedirs(root)
        if AS_ROOT:
            shutil.chown(root, "postgres")
        return root

    def primary(self, root):
        c = Cluster(root, "primary")
        os.makedirs(c.dir)
        run(["cp", "-a", os.path.join(self.template, "data"), c.data])
        if AS_ROOT:
            run(["chown", "-R", "postgres:", c.dir])
        # synchronous_commit stays on (the default): the stall needs it. fsync off only spares the
        # shared disk; it changes nothing a client can see while the server is up.
        c.conf("max_connections = 300\nshared_buffers = 128MB\nfsync = off\nwal_level = replica\n"
               "max_wal_senders = 10\nhot_standby = on\nwal_keep_size = 256MB\n"
               "log_min_messages = warning\nlog_connections = off\n")
        c.start()
        self.live.append(c)
        sql(c.port, [f"CREATE DATABASE {DB}"])
        sql(c.port, ["CREATE TABLE items (id bigint PRIMARY KEY, payload text NOT NULL)",
                     "INSERT INTO items SELECT g, 'seed' FROM generate_series(1, 1000) g",
                     "ANALYZE items"], dbname=DB)
        return c

    def standby(self, root, primary):
        c = Cluster(root, "standby")
        os.makedirs(c.dir)
        if AS_ROOT:
            shutil.chown(c.dir, "postgres")
        run(as_server_user([f"{PG_BIN}/pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
                            "-D", c.data, "-R", "-X", "stream", "-c", "fast"]))
        c.conf()
        c.start()
        self.live.append(c)
        deadline = time.time() + 30
        while time.time() < deadline:
            rows = sql(primary.port, ["SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"], fetch=True)
            if rows[0][0] >= 1:
                return c
            time.sleep(0.2)
        raise RuntimeError("standby did not start streaming")

    def stop_all(self):
        for c in self.live:
            c.stop()
        self.live = []


# ---------------------------------------------------------------- systems under test


def dump_toml(d):
    """Minimal TOML writer for bulkhead's config (tables of strings, numbers, booleans, arrays)."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        raise ValueError(f"cannot write {v!r} as TOML")
    lines = [f"{k} = {val(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{k2} = {val(v2)}" for k2, v2 in v.items()]
    return "\n".join(lines) + "\n"


def merge(base, extra):
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base


class System:
    """The system under test in front of `hosts` (a list of ports): where the app connects."""

    def __init__(self, name, procs, outdir, args, workdir):
        self.name = name
        self.workdir = workdir  # readable by the server user (PgBouncer runs as it)
        self.procs = procs
        self.outdir = outdir
        self.args = args
        self.proc = None
        self.health = None  # bulkhead's health address
        self.port = None

    def start(self, hosts, reads="main"):
        """Starts the system; returns the app's conninfo, and the one for its reads."""
        if self.name == "direct":
            base = (f"host={','.join(['127.0.0.1'] * len(hosts))} port={','.join(map(str, hosts))} "
                    f"dbname={DB} user=postgres")
            self.conninfo = base + (" target_session_attrs=read-write" if len(hosts) > 1 else "")
            if reads == "readonly":
                return self.conninfo, base + " target_session_attrs=prefer-standby"
            return self.conninfo, self.conninfo
        self.port = free_port()
        if self.name == "pgbouncer":
            # PgBouncer takes one host per database: the original primary (it cannot follow a failover).
            conf = os.path.join(self.workdir, "pgbouncer.ini")
            users = os.path.join(self.workdir, "pgbouncer-users.txt")
            with open(users, "w") as f:
                f.write('"postgres" ""\n')
            with open(conf, "w") as f:
                f.write(f"[databases]\n{DB} = host=127.0.0.1 port={hosts[0]} dbname={DB}\n"
                        f"postgres = host=127.0.0.1 port={hosts[0]} dbname=postgres\n"
                        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
                        f"auth_type = trust\nauth_file = {users}\npool_mode = session\n"
                        f"max_client_conn = 2000\ndefault_pool_size = 200\nmax_db_connections = 0\n"
                        f"logfile = {os.path.join(self.workdir, 'pgbouncer.log')}\npidfile =\n")
            if AS_ROOT:
                for p in (conf, users):
                    shutil.chown(p, "postgres")
            exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
            self.proc = self.procs.spawn(as_server_user([exe, conf]), os.path.join(self.outdir, "pgbouncer.out"))
            wait_port(self.port, "pgbouncer", proc=self.proc)
        elif self.name == "bulkhead":
            hport = free_port()
            self.health = f"127.0.0.1:{hport}"
            cfg = {"listen": {"address": f"127.0.0.1:{self.port}"},
                   "health": {"address": self.health},
                   "database": {"hosts": [f"127.0.0.1:{p}" for p in hosts]},
                   "probe": {"user": "postgres"},
                   "timeouts": {"write": "2s"}}
            ro_port = free_port() if reads == "readonly" else None
            if ro_port:
                cfg["listen_readonly"] = {"address": f"127.0.0.1:{ro_port}"}
            if self.args.bulkhead_config_extra:
                with open(self.args.bulkhead_config_extra, "rb") as f:
                    merge(cfg, tomllib.load(f))
            conf = os.path.join(self.outdir, "bulkhead.toml")
            with open(conf, "w") as f:
                f.write(dump_toml(cfg))
            run([self.args.bulkhead_bin, "--config", conf, "--check"])
            env = dict(os.environ)
            env.setdefault("BULKHEAD_LOG", "info")
            self.proc = self.procs.spawn([self.args.bulkhead_bin, "--config", conf],
                                         os.path.join(self.outdir, "bulkhead.log"), env=env)
            wait_port(self.port, "bulkhead", proc=self.proc)
            wait_http(self.health, "/readyz", 20, "bulkhead")
        self.conninfo = f"host=127.0.0.1 port={self.port} dbname={DB} user=postgres"
        if self.name == "bulkhead" and ro_port:
            wait_port(ro_port, "bulkhead's read-only listener", proc=self.proc)
            return self.conninfo, f"host=127.0.0.1 port={ro_port} dbname={DB} user=postgres"
        return self.conninfo, self.conninfo

    def stop(self):
        if self.proc is not None:
            if self.health:
                st, body = http_get(self.health, "/metrics", timeout=2)
                if st == 200:
                    with open(os.path.join(self.outdir, "bulkhead-metrics.txt"), "w") as f:
                        f.write(body)
            self.procs.end(self.proc, grace=5.0)
            self.proc = None
            for f in ("pgbouncer.ini", "pgbouncer.log"):
                if os.path.exists(os.path.join(self.workdir, f)):
                    shutil.copy(os.path.join(self.workdir, f), os.path.join(self.outdir, f))


# ---------------------------------------------------------------- faults


class Fault:
    def __init__(self, name, clusters, events):
        self.name = name
        self.c = clusters
        self.events = events

    def ev(self, what, **kw):
        self.events.append(dict(t=time.time(), what=what, **kw))

    def inject(self):
        p = self.c[0]
        if self.name in ("stall-tx", "stall-auto"):
            sql(p.port, ["ALTER SYSTEM SET synchronous_standby_names = 'missing'", "SELECT pg_reload_conf()"])
        elif self.name.startswith("failover"):
            run(as_server_user([f"{PG_BIN}/pg_ctl", "-D", p.data, "-m", "immediate", "-w", "stop"]))
        elif self.name == "frozen":
            n = p.freeze()
            self.ev("frozen", processes=n)

    def after_inject(self, fault_start):
        """Anything scheduled inside the fault window (the promotion, ~2 s after the stop)."""
        if self.name.startswith("failover"):
            time.sleep(max(0.0, fault_start + 2.0 - time.time()))
            self.ev("promote-begin")
            run(as_server_user([f"{PG_BIN}/pg_ctl", "-D", self.c[1].data, "-w", "-t", "60", "promote"]))
            self.ev("promote-done")

    def heal(self):
        p = self.c[0]
        if self.name in ("stall-tx", "stall-auto"):
            sql(p.port, ["ALTER SYSTEM RESET synchronous_standby_names", "SELECT pg_reload_conf()"])
        elif self.name == "frozen":
            p.thaw()
        # failover: nothing; the new primary stays.

    def survivor(self):
        return self.c[1] if self.name.startswith("failover") else self.c[0]


def read_acked(load_path):
    sent, acked = set(), set()
    with open(load_path) as f:
        for line in f:
            r = json.loads(line)
            if r["k"] == "req" and r["op"] == "write":
                sent.add(r["id"])
                if r["st"] == 200:
                    acked.add(r["id"])
    return sent, acked


def run_fault(fault, system, args, pg, procs, outdir):
    log(f"{fault} through {system}: start")
    os.makedirs(outdir, exist_ok=True)
    root = pg.new_root(f"{fault}-{system}")
    events = []
    clusters = [pg.primary(root)]
    if fault.startswith("failover"):
        clusters.append(pg.standby(root, clusters[0]))
    sysu = System(system, procs, outdir, args, root)
    app = None
    healthy, faulty, healed = args.phases
    try:
        conninfo, read_conninfo = sysu.start([c.port for c in clusters], SPLIT.get(fault, "main"))
        app_port = free_port()
        app_cmd = [sys.executable, os.path.join(HERE, "app.py"), "--port", str(app_port),
                   "--conninfo", conninfo, APP_MODE[fault]]
        if fault in SPLIT:
            app_cmd += ["--read-conninfo", read_conninfo]
        app = procs.spawn(app_cmd, os.path.join(outdir, "app.log"))
        wait_port(app_port, "app", seconds=60, proc=app)
        wait_http(f"127.0.0.1:{app_port}", "/healthz", 10, "app")

        t0 = time.time() + 1.0
        duration = healthy + faulty + healed
        cmd = [sys.executable, os.path.join(HERE, "load.py"), "--app", f"127.0.0.1:{app_port}",
               "--duration", str(duration), "--start-at", repr(t0), "--out", os.path.join(outdir, "load.jsonl"),
               "--first-id", str(FIRST_ID), "--rate", str(args.rate)]
        if sysu.health:
            cmd += ["--readyz", sysu.health]
        load = procs.spawn(cmd, os.path.join(outdir, "load.log"))
        fault_obj = Fault(fault, clusters, events)
        events.append(dict(t=t0, what="load-start"))

        time.sleep(max(0.0, t0 + healthy - time.time()))
        fs = time.time()
        events.append(dict(t=fs, what="fault-start", due=t0 + healthy))
        fault_obj.inject()
        events.append(dict(t=time.time(), what="fault-injected"))
        fault_obj.after_inject(fs)

        time.sleep(max(0.0, t0 + healthy + faulty - time.time()))
        events.append(dict(t=time.time(), what="heal-start", due=t0 + healthy + faulty))
        fault_obj.heal()
        events.append(dict(t=time.time(), what="heal-done"))

        time.sleep(max(0.0, t0 + duration - time.time()))
        events.append(dict(t=time.time(), what="load-end"))
        try:
            load.wait(timeout=args.timeout + 20)
        except subprocess.TimeoutExpired:
            log("load generator did not end; killing it")
        procs.end(load)
        events.append(dict(t=time.time(), what="load-exited"))

        procs.kill(app)
        app = None
        sysu.stop()
        # Ids acknowledged (200 seen by the client) and absent from the surviving primary.
        sent, acked = read_acked(os.path.join(outdir, "load.jsonl"))
        present = {r[0] for r in sql(fault_obj.survivor().port, [f"SELECT id FROM items WHERE id >= {FIRST_ID}"],
                                     dbname=DB, fetch=True)}
        check = {"sent": len(sent), "acked": len(acked), "present": len(present & sent),
                 "acked_missing": sorted(acked - present),
                 "unacked_present": len((sent - acked) & present)}
        with open(os.path.join(outdir, "writes.json"), "w") as f:
            json.dump(check, f)
        meta = {"fault": fault, "system": system, "phases": args.phases, "t0": t0, "events": events,
                "conninfo": conninfo, "read_conninfo": read_conninfo, "app_mode": APP_MODE[fault],
                "ports": {"primary": clusters[0].port, "standby": clusters[1].port if len(clusters) > 1 else None}}
        with open(os.path.join(outdir, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        log(f"{fault} through {system}: done; writes acked {len(acked)}/{len(sent)}, "
            f"acked but missing {len(check['acked_missing'])}")
    finally:
        if app is not None:
            procs.kill(app)
        sysu.stop()
        for c in clusters:
            c.thaw()
        pg.stop_all()
        for c in clusters:
            if os.path.exists(c.log):
                shutil.copy(c.log, os.path.join(outdir, f"pg-{os.path.basename(c.dir)}.log"))
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- churn


def describe(e):
    state = getattr(e, "sqlstate", None)
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    msg = re.sub(r"\d+", "N", msg)[:120]  # ports, pids, ids out: so equal causes group
    return f"{state or type(e).__name__}: {msg}"


def run_churn(system, args, pg, procs, outdir):
    log(f"churn through {system}: start")
    os.makedirs(outdir, exist_ok=True)
    root = pg.new_root(f"churn-{system}")
    cluster = pg.primary(root)
    sysu = System(system, procs, outdir, args, root)
    stop = threading.Event()
    writer_res = {"ok": 0, "refused": {}, "ids": []}
    circuit_samples = []
    try:
        conninfo, _ = sysu.start([cluster.port])

        def writer():
            conn = None
            ident = FIRST_ID
            nxt = time.time()
            while not stop.is_set():
                try:
                    if conn is None or conn.closed:
                        conn = psycopg.connect(conninfo, autocommit=True, connect_timeout=10)
                    conn.execute("INSERT INTO items (id, payload) VALUES (%s, 'churn')", (ident,))
                    writer_res["ok"] += 1
                except psycopg.Error as e:
                    k = describe(e)
                    writer_res["refused"][k] = writer_res["refused"].get(k, 0) + 1
                    if conn is not None and conn.broken:
                        conn = None
                ident += 1
                nxt += 0.1
                time.sleep(max(0.0, nxt - time.time()))
            if conn is not None:
                conn.close()

        def sampler():
            while not stop.is_set():
                st, body = http_get(sysu.health, "/metrics")
                if st == 200:
                    vals = [float(l.rsplit(" ", 1)[1]) for l in body.splitlines()
                            if l.startswith("bulkhead_circuit_state{")]
                    circuit_samples.append((time.time(), max(vals) if vals else 0.0))
                stop.wait(0.1)

        threads = [threading.Thread(target=writer, daemon=True)]
        if sysu.health:
            threads.append(threading.Thread(target=sampler, daemon=True))
        for t in threads:
            t.start()
        failures = {}
        t_start = time.time()
        for _ in range(args.churn_cycles):
            try:
                with psycopg.connect(conninfo, connect_timeout=10) as conn:
                    conn.execute("SELECT 1").fetchone()
            except psycopg.Error as e:
                k = describe(e)
                failures[k] = failures.get(k, 0) + 1
        elapsed = time.time() - t_start
        stop.set()
        for t in threads:
            t.join(timeout=15)
        res = {"system": system, "cycles": args.churn_cycles, "failed": sum(failures.values()),
               "failures": failures, "seconds": round(elapsed, 1),
               "writer_ok": writer_res["ok"], "writer_refused": sum(writer_res["refused"].values()),
               "writer_errors": writer_res["refused"]}
        sysu.stop()
        if system == "bulkhead":
            text = open(os.path.join(outdir, "bulkhead.log"), errors="replace").read()
            res["circuit_openings_log"] = len(re.findall(r"write circuit opened: writes are refused", text))
            res["circuit_open_samples"] = sum(1 for _, v in circuit_samples if v > 0)
            res["circuit_samples"] = len(circuit_samples)
        with open(os.path.join(outdir, "churn.json"), "w") as f:
            json.dump(res, f, indent=1)
        log(f"churn through {system}: {res['failed']}/{res['cycles']} cycles failed, "
            f"{res['writer_refused']} writer INSERTs refused, {elapsed:.1f}s")
    finally:
        stop.set()
        sysu.stop()
        pg.stop_all()
        if os.path.exists(cluster.log):
            shutil.copy(cluster.log, os.path.join(outdir, "pg-primary.log"))
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--faults", default=",".join(ALL_FAULTS))
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--phases", default="20,30,20", help="healthy,fault,healed seconds")
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--churn-cycles", type=int, default=2000)
    ap.add_argument("--bulkhead-bin", required=True)
    ap.add_argument("--bulkhead-config-extra", default="")
    ap.add_argument("--results", required=True)
    ap.add_argument("--tmp", required=True)
    args = ap.parse_args()
    args.phases = [float(x) for x in args.phases.split(",")]
    if len(args.phases) != 3:
        sys.exit("--phases takes three numbers: healthy,fault,healed")
    faults = [f for f in args.faults.split(",") if f]
    systems = [s for s in args.systems.split(",") if s]
    for f in faults:
        if f not in ALL_FAULTS:
            sys.exit(f"unknown fault {f!r}; known: {', '.join(ALL_FAULTS)}")
    for s in systems:
        if s not in SYSTEMS:
            sys.exit(f"unknown system {s!r}; known: {', '.join(SYSTEMS)}")
    if not PG_BIN:
        sys.exit("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin: apt-get install -y postgresql")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    os.makedirs(args.results, exist_ok=True)
    procs = Procs()
    pg = None
    failed = []
    try:
        pg = Postgres(args.tmp)
        for f in faults:
            for s in systems:
                if f == "failover-ro" and s == "pgbouncer":
                    log("failover-ro through pgbouncer: skipped (PgBouncer has no read routing)")
                    continue
                out = os.path.join(args.results, "runs", f, s)
                try:
                    if f == "churn":
                        run_churn(s, args, pg, procs, out)
                    else:
                        run_fault(f, s, args, pg, procs, out)
                except Stop:
                    raise
                except Exception as e:  # one broken run does not cost the others
                    log(f"{f} through {s} FAILED: {e}")
                    failed.append(f"{f}/{s}: {e}")
                    with open(os.path.join(args.results, "failures.txt"), "a") as fh:
                        fh.write(f"{f}/{s}: {e}\n")
    except Stop as e:
        log(f"stopped by {e}")
        sys.exit(130)
    finally:
        procs.end_all()
        if pg is not None:
            pg.stop_all()
    if failed:
        log(f"{len(failed)} run(s) failed: see {os.path.join(args.results, 'failures.txt')}")


if __name__ == "__main__":
    main()
