"""The fleet benchmark (issue 22): what N bulkhead sidecars cost one PostgreSQL for probing.

Starts one throwaway PostgreSQL and N bulkhead processes in front of it (default probe
settings: interval 1 s, heartbeat 100 ms, new_session_interval 60 s), then measures windows:

  idle     no client traffic at all;
  traffic  light traffic through every bulkhead: one pgbench client each, TPC-B-like
           transactions (BEGIN, three UPDATEs, an INSERT, COMMIT) at --rate per second.

For each window and each binary (--before BIN, e.g. an older build, and the current one):
per instance per minute, the new server sessions the probes started (log_connections lines
with application_name "bulkhead probe"), the probes' WAL commits (pg_waldump, logical messages
with prefix "bulkhead"), and the server's CPU seconds (postmaster and every backend, reaped ones
included, from /proc) minus the same window without bulkheads (idle: nothing; traffic: the same
pgbench clients connected directly), i.e. what probing costs the server.

    benches/fleet [--instances 50] [--seconds 60] [--rate 5] [--before BIN] [--out FILE]
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (helpers: PostgreSQL, ports, /proc)

PG_BIN = compare.PG_BIN
CLK_TCK = os.sysconf("SC_CLK_TCK")


def server_cpu(postmaster):
    """CPU seconds of the postmaster, its reaped children and its live children."""
    def stat(pid):
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return fields
    f = stat(postmaster)
    total = sum(int(x) for x in f[11:15])  # utime stime cutime cstime
    try:
        children = open(f"/proc/{postmaster}/task/{postmaster}/children").read().split()
    except OSError:
        children = []
    for c in children:
        try:
            g = stat(c)
            total += int(g[11]) + int(g[12])
        except OSError:
            pass
    return total / CLK_TCK


def psql(port, sql):
    return compare.run([f"{PG_BIN}/psql", "-XAtq", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                        "-d", "postgres", "-c", sql]).stdout.strip()


def probe_logins(log):
    with open(log, errors="replace") as f:
        return sum(1 for line in f if "connection authorized" in line and "bulkhead probe" in line)


def probe_commits(data, start, end):
    out = subprocess.run([f"{PG_BIN}/pg_waldump", "-p", os.path.join(data, "pg_wal"), "-s", start, "-e", end,
                          "-r", "LogicalMessage"], capture_output=True, text=True).stdout
    return len(re.findall(r'prefix "bulkhead"', out))


class Fleet:
    def __init__(self, binary, n, pg_port, work):
        self.procs, self.ports = [], []
        for i in range(n):
            port = compare.free_port()
            conf = os.path.join(work, f"bulkhead-{i}.toml")
            with open(conf, "w") as f:
                f.write(f'[listen]\naddress = "127.0.0.1:{port}"\n'
                        f'[health]\naddress = "127.0.0.1:{compare.free_port()}"\n'
                        f'[database]\nhosts = ["127.0.0.1:{pg_port}"]\ntls = "disable"\n')
            log = open(os.path.join(work, f"bulkhead-{i}.log"), "w")
            env = dict(os.environ, BULKHEAD_WORKERS="1")
            self.procs.append(subprocess.Popen([binary, "--config", conf], stdout=log, stderr=log, env=env))
            self.ports.append(port)
        for p in self.ports:
            compare.wait_port(p, "bulkhead")

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()


def traffic(ports, rate, seconds, work):
    """One rate-limited pgbench client per port, for `seconds`."""
    procs = []
    for port in ports:
        procs.append(subprocess.Popen(
            [f"{PG_BIN}/pgbench", "-n", "-c", "1", "-R", str(rate), "-T", str(seconds), "-h", "127.0.0.1",
             "-p", str(port), "-U", "postgres", "postgres"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "pgbench.log"), "a")))
    return procs


def window(pg, seconds, ports=None, rate=0, work=None):
    """Measures one window; with `ports`, pgbench clients run through them meanwhile."""
    port, data, log, postmaster = pg
    clients = traffic(ports, rate, seconds + 2, work) if ports else []
    time.sleep(1)  # clients connected
    logins, lsn, cpu = probe_logins(log), psql(port, "SELECT pg_current_wal_lsn()"), server_cpu(postmaster)
    t0 = time.time()
    time.sleep(seconds)
    took = time.time() - t0
    logins2, lsn2, cpu2 = probe_logins(log), psql(port, "SELECT pg_current_wal_lsn()"), server_cpu(postmaster)
    for c in clients:
        c.wait()
    return {"logins": logins2 - logins, "commits": probe_commits(data, lsn, lsn2), "cpu": cpu2 - cpu,
            "minutes": took / 60}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=50)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--rate", type=float, default=5)
    ap.add_argument("--before", help="an older bulkhead binary to compare with")
    ap.add_argument("--after", default="target/release/bulkhead")
    ap.add_argument("--out")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bulkhead-fleet-")
    os.chmod(work, 0o755)
    port, data = compare.start_postgres(work, max_connections=4 * a.instances + 50, ssl=False)
    log = os.path.join(work, "pg.log")
    psql(port, "ALTER SYSTEM SET log_connections = on")
    psql(port, "ALTER SYSTEM SET log_line_prefix = '[%a] '")
    psql(port, "SELECT pg_reload_conf()")
    postmaster = int(open(os.path.join(data, "postmaster.pid")).readline())
    pg = (port, data, log, postmaster)
    rows = []
    try:
        base_idle = window(pg, a.seconds)
        base_traffic = window(pg, a.seconds, [port] * a.instances, a.rate, work)
        print(f"no bulkhead: idle {base_idle['cpu']:.2f} CPU-s, traffic {base_traffic['cpu']:.2f} CPU-s", flush=True)
        binaries = ([("before", a.before)] if a.before else []) + [("after", a.after)]
        for name, binary in binaries:
            fleet = Fleet(binary, a.instances, port, work)
            try:
                time.sleep(10)  # first probes, kept connections
                for kind, w, base in (("idle", lambda: window(pg, a.seconds), base_idle),
                                      ("traffic", lambda: window(pg, a.seconds, fleet.ports, a.rate, work),
                                       base_traffic)):
                    r = w()
                    per = a.instances * r["minutes"]
                    row = (name, kind, r["logins"] / per, r["commits"] / per,
                           (r["cpu"] - base["cpu"]) / per, r["cpu"] / r["minutes"], base["cpu"] / base["minutes"])
                    rows.append(row)
                    print(f"{name} {kind}: {row[2]:.2f} sessions, {row[3]:.1f} commits, {row[4] * 1000:.1f} ms CPU "
                          "per instance per minute", flush=True)
            finally:
                fleet.stop()
    finally:
        compare.run(compare.as_server_user([f"{PG_BIN}/pg_ctl", "-D", data, "-m", "immediate", "stop"]))
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"Fleet benchmark, {time.strftime('%Y-%m-%d')}, {a.instances} bulkhead instances in front of one "
             f"PostgreSQL, {a.seconds} s windows, traffic {a.rate:g} pgbench tx/s per instance; "
             f"{os.cpu_count()} cores.", "",
             "| binary | window | new probe sessions /instance/min | probe WAL commits /instance/min "
             "| server CPU for probing, ms /instance/min | server CPU-s/min (without bulkheads) |",
             "|---|---|---|---|---|---|"]
    for name, kind, s, c, cpu, total, base in rows:
        lines.append(f"| {name} | {kind} | {s:.2f} | {c:.1f} | {cpu * 1000:.0f} | {total:.2f} ({base:.2f}) |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
