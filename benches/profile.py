"""Where bulkhead's CPU time goes, in instructions per transaction, counted by callgrind.

Runs the release bulkhead (one worker thread) under valgrind --tool=callgrind in front of a
throwaway PostgreSQL, drives it with pgbench (-S, or -N with --writes) for N and then 3N
transactions per client, and
reports the worker thread's instructions per transaction (the difference of the two runs, so
startup and login cancel out), grouped by where they are spent, and the costliest functions.
Instruction counts repeat to within a few percent from run to run (how many messages a
wake-up finds varies), where CPU seconds on a shared machine move by 10%: this is for
comparing two builds, the load benchmark (benches/compare) for comparing proxies. Under valgrind the proxy runs some 50 times slower,
so at many clients it handles more messages per wake-up than it would natively. Run through
benches/profile.
"""

import argparse
import collections
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C  # noqa: E402

# Exclusive costs are grouped by the first pattern that matches the function's name.
GROUPS = [
    ("classification, and memchr (NUL and semicolon searches)", r"bulkhead::classify|memchr"),
    ("metrics", r"^metrics|metrics_exporter|AtomicBucket"),
    ("logging spans and events", r"^tracing|^<tracing"),
    ("cryptography (ring: SCRAM, TLS)", r"ring_core|^ring::|rustls"),
    ("allocator", r"malloc|_int_free|cfree|realloc|calloc|unlink_chunk|consolidate"),
    ("relay: framing, bookkeeping, buffers", r"bulkhead::|bytes::"),
    ("tokio: socket readiness and I/O", r"tokio::runtime::io|tokio::net|poll_evented|mio::|tokio_util::"),
    ("tokio: timer wheel and clock reads", r"tokio::runtime::time|tokio::time|Timespec|clock_gettime|Instant"),
    ("tokio: scheduler, tasks, wakers", r"tokio::|atomic_waker|core::future|Waker"),
    ("libc: system call wrappers", r"recv|send|epoll|cancel|syscall"),
]
# With --cache: callgrind's cache simulation, shrunk to stand in for what the kernel leaves of the
# L1 caches between two system calls; its misses count the code and data lines a request touches.
SMALL_CACHES = ["--cache-sim=yes", "--I1=4096,2,64", "--D1=2048,2,64", "--LL=262144,8,64"]
CACHE = []  # SMALL_CACHES with --cache
LINE = re.compile(r"^\s*([\d,]+)\s+(?:\(\s*[\d.]+%\)\s+)?(\?\?\?|[^:]*):(.*?)(?: \[[^\]]*\])?$")


def exclusive_costs(path):
    """{function: instructions} from a callgrind output file, exclusive costs; with --cache, also
    the whole thread's cache misses under "@I1mr", "@D1mr" and "@D1mw"."""
    out = subprocess.run(["callgrind_annotate", "--show=Ir", "--inclusive=no", "--threshold=100", "--auto=no",
                          path], capture_output=True, text=True, check=True).stdout
    costs = collections.Counter()
    if CACHE:
        events = totals = None
        for line in open(path):
            if line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith("summary:") or line.startswith("totals:"):
                totals = [int(x) for x in line.split()[1:]]
        for event, n in zip(events or [], totals or []):
            if event in ("I1mr", "D1mr", "D1mw"):
                costs["@" + event] = n
    body = out.split("file:function", 1)[-1]
    for line in body.splitlines():
        m = LINE.match(line)
        if m:
            costs[m.group(3).strip()] += int(m.group(1).replace(",", ""))
    return costs


def worker_costs(binary, pg_port, work, workload, mode, clients, transactions, pool, connect, keep=None,
                 save_as=None):
    """Exclusive costs of the data-path worker thread over one pgbench run: the thread that ran
    the relay (not the busiest: at one client under valgrind the probe's thread can be busier).
    With `connect` (pgbench -C), the accepting thread's costs are added: a login starts there."""
    port = C.free_port()
    conf = os.path.join(work, "profile.toml")
    users = os.path.join(work, "profile-users.txt")
    if pool != "passthrough":
        open(users, "w").write(f'"{C.USER}" "{C.scram_verifier(C.PASSWORD)}"\n')
    C.write_bulkhead_config(conf, port, pg_port, "disable", 300, pool, 10, users)
    out = os.path.join(work, "callgrind.out")
    for f in glob.glob(out + "*"):
        os.remove(f)
    proxy = subprocess.Popen(["valgrind", "--tool=callgrind", *CACHE, "--separate-threads=yes", f"--callgrind-out-file={out}",
                              binary, "--config", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "BULKHEAD_WORKERS": "1"})
    try:
        C.wait_port(port, "bulkhead under valgrind", 120)
        C.run([f"{C.PG_BIN}/pgbench", "-n", workload, "-M", mode, "-c", str(clients), "-j", str(min(clients, 2)),
               *(["-C"] if connect else []), "-t", str(transactions), "-h", "127.0.0.1", "-p", str(port),
               "-U", "postgres", "postgres"], env={**os.environ, "PGPASSWORD": C.PASSWORD, "PGSSLMODE": "disable"})
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait()
    files = glob.glob(out + "-*")  # one file per thread
    threads = [exclusive_costs(f) for f in files]
    worker = max(threads, key=lambda c: sum(n for f, n in c.items() if "Relay::poll_relay" in f))
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(files[threads.index(worker)], os.path.join(keep, "worker.callgrind.out"))
    if save_as:
        shutil.copy(files[threads.index(worker)], save_as)
    acceptor = max(threads, key=lambda c: sum(n for f, n in c.items() if "accept4" in f))
    if connect and acceptor is not worker:
        worker = worker + acceptor
    return worker


def other_costs(proxy, pg_port, work, mode, clients, transactions):
    """Exclusive costs of PgBouncer (session mode, trust) or benches/floor.rs over one pgbench
    run: the same yardstick for the proxies bulkhead is compared with. Both have one thread."""
    port = C.free_port()
    out = os.path.join(work, f"{proxy}.callgrind.out")
    if os.path.exists(out):
        os.remove(out)
    if proxy == "pgbouncer":
        conf, users = os.path.join(work, "pgbouncer.ini"), os.path.join(work, "pgbouncer-users.txt")
        open(users, "w").write(f'"{C.USER}" ""\n')
        open(conf, "w").write(f"[databases]\npostgres = host=127.0.0.1 port={pg_port} dbname=postgres\n"
                              f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
                              f"auth_type = trust\nauth_file = {users}\npool_mode = session\nmax_client_conn = 300\n"
                              f"default_pool_size = 100\nlogfile = {work}/pgbouncer.log\npidfile =\n")
        cmd = ["valgrind", "--tool=callgrind", *CACHE, f"--callgrind-out-file={out}", C.pgbouncer_exe(), conf]
        if C.AS_ROOT:  # PgBouncer will not run as root
            for f in (conf, users, work):
                shutil.chown(f, "postgres")
            cmd = C.as_server_user(cmd)
    else:
        cmd = ["valgrind", "--tool=callgrind", *CACHE, f"--callgrind-out-file={out}", os.environ["BULKHEAD_FLOOR_BIN"],
               f"127.0.0.1:{port}", f"127.0.0.1:{pg_port}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        C.wait_port(port, f"{proxy} under valgrind", 120)
        C.run([f"{C.PG_BIN}/pgbench", "-n", "-S", "-M", mode, "-c", str(clients), "-j", str(min(clients, 2)),
               "-t", str(transactions), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "postgres"],
              env={**os.environ, "PGPASSWORD": C.PASSWORD, "PGSSLMODE": "disable"})
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group: runuser and valgrind under it
        proc.wait()
    for _ in range(100):  # valgrind writes the file as the proxy exits
        if os.path.exists(out) and os.path.getsize(out) > 0:
            break
        time.sleep(0.1)
    return exclusive_costs(out)


def instruction_costs(path):
    """{address: [events], ...}, {address: function} and the event names of a callgrind file
    written with --dump-instr=yes (positions "instr line"); call lines' inclusive costs left out."""
    names, fn_of, costs = {}, {}, {}
    events, fn, addr, skip = [], None, 0, False

    def name(kind, text):
        m = re.match(r"\((\d+)\)(?: (.*))?", text)
        if not m:
            return text
        if m.group(2):
            names[(kind, m.group(1))] = m.group(2)
        return names.get((kind, m.group(1)), text)

    obj = None
    for line in open(path):
        line = line.rstrip("\n")
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("ob="):
            obj = name("ob", line[3:])
        elif line.startswith("fn="):
            fn = name("fn", line[3:])
        elif line.startswith(("cob=", "cfn=")):
            name(line[1:3], line[4:])
        elif line.startswith("calls="):
            skip = True
        elif line and (line[0].isdigit() or line[0] in "+-*"):
            position = line.split()[0]
            if position[0] in "+-":
                addr += int(position)
            elif position != "*":
                addr = int(position, 0)
            if skip:
                skip = False
                continue
            key = (obj, addr)
            total = costs.setdefault(key, [0] * len(events))
            for i, v in enumerate(line.split()[2:]):
                total[i] += int(v)
            fn_of[key] = fn
    return costs, fn_of, events


STACK = re.compile(r"\(%rsp\)|^push|^pop|^call|^ret")


def where_lines(short, long, binary, tx, top):
    """Which functions' code and data the lines missed per transaction belong to: the difference
    of two runs' per-instruction counts, each missing instruction looked up in the binary's
    disassembly (stack: an access through %rsp, a push, pop, call or return)."""
    a, fn_of, events = instruction_costs(long)
    b, _, _ = instruction_costs(short)
    ir, i1, d1r, d1w = (events.index(e) for e in ("Ir", "I1mr", "D1mr", "D1mw"))
    per_tx = {k: [(v[i] - (b.get(k) or [0] * len(v))[i]) / tx for i in range(len(v))] for k, v in a.items()}
    ours = sorted(addr for (obj, addr) in per_tx if obj == binary)
    text = {}
    if ours:
        dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={ours[0]}",
                               f"--stop-address={ours[-1] + 1}", binary], capture_output=True, text=True).stdout
        wanted = set(ours)
        for line in dump.splitlines():
            m = re.match(r"\s+([0-9a-f]+):\s+(.*)", line)
            if m and int(m.group(1), 16) in wanted:
                text[int(m.group(1), 16)] = m.group(2).strip()
    data = collections.defaultdict(lambda: [0.0, 0.0, 0.0])  # function: stack, own, library
    code = collections.defaultdict(lambda: [set(), 0, 0.0])  # function: hot lines, hot instructions, misses
    for (obj, addr), v in per_tx.items():
        f = fn_of[(obj, addr)]
        missed = v[d1r] + v[d1w]
        if obj != binary:
            data[f][2] += missed
        elif STACK.search(text.get(addr, "")):
            data[f][0] += missed
        else:
            data[f][1] += missed
        if v[ir] >= 0.5:
            code[f][0].add(addr // 64)
            code[f][1] += 1
        code[f][2] += v[i1]
    stack, own, lib = (sum(d[i] for d in data.values()) for i in range(3))
    print(f"\ndata lines missed per transaction: {stack:.0f} stack, {own:.0f} bulkhead's other data, "
          f"{lib:.0f} in libraries\n\n     stack    other  functions, by data lines missed")
    for f, (st, ow, li) in sorted(data.items(), key=lambda x: -sum(x[1]))[:top]:
        print(f"  {st:8.1f} {ow + li:8.1f}  {f[:100]}")
    hot_lines = sum(len(c[0]) for c in code.values())
    hot = sum(c[1] for c in code.values())
    print(f"\ncode: {hot} instructions run at least every other transaction, on {hot_lines} lines of 64 bytes"
          f"\n\n  misses    lines instructions  functions, by code lines missed")
    for f, (lines, n, missed) in sorted(code.items(), key=lambda x: -x[1][2])[:top]:
        print(f"  {missed:6.1f} {len(lines):8d} {n:12d}  {f[:100]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="simple", choices=["simple", "extended", "prepared"])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--writes", action="store_true", help="pgbench -N (five statements a transaction) instead of -S")
    ap.add_argument("--transactions", type=int, default=300, help="per client, in the shorter run")
    ap.add_argument("--pool", default="passthrough", choices=["passthrough", "session", "transaction"],
                    help="[pool] mode; the pooled modes log pgbench in with SCRAM against a users file")
    ap.add_argument("--connect", action="store_true", help="pgbench -C: a new connection per transaction")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--binary", default=os.path.join(C.ROOT, "target/release/bulkhead"))
    ap.add_argument("--keep", metavar="DIR", help="copy the longer run's worker-thread callgrind file to DIR "
                    "(for callgrind_annotate --auto=yes on a build with line tables)")
    ap.add_argument("--proxy", default="bulkhead", choices=["bulkhead", "pgbouncer", "floor"],
                    help="count another proxy's instructions instead, under the same load (pgbench -S, "
                         "passthrough or PgBouncer's session mode): the budget bulkhead's are measured against")
    ap.add_argument("--cache", action="store_true",
                    help="also simulate small caches (4 KiB instruction, 2 KiB data) and report the code and data "
                         "lines missed per transaction: how many lines a request touches")
    ap.add_argument("--where", action="store_true",
                    help="with --cache, per instruction: which functions the missed lines belong to, data lines "
                         "on the stack and elsewhere, and the code lines the hot instructions lie on")
    args = ap.parse_args()
    if args.where and (not args.cache or args.proxy != "bulkhead"):
        sys.exit("--where goes with --cache, for bulkhead")
    if args.cache:
        CACHE.extend(SMALL_CACHES)
    if args.where:
        CACHE.append("--dump-instr=yes")
    work = tempfile.mkdtemp(prefix="bulkhead-profile-")
    pg_port, data = C.start_postgres(work, 100, ssl=False)
    try:
        workload = "-N" if args.writes else "-S"
        if args.proxy != "bulkhead":
            if args.writes or args.pool != "passthrough" or args.connect:
                sys.exit("--proxy counts pgbench -S through a passthrough (session-mode) proxy only")
            short = other_costs(args.proxy, pg_port, work, args.mode, args.clients, args.transactions)
            long = other_costs(args.proxy, pg_port, work, args.mode, args.clients, 3 * args.transactions)
        else:
            saved = [os.path.join(work, f"{run}.callgrind.out") for run in ("short", "long")]
            short = worker_costs(args.binary, pg_port, work, workload, args.mode, args.clients, args.transactions,
                                 args.pool, args.connect, save_as=saved[0])
            long = worker_costs(args.binary, pg_port, work, workload, args.mode, args.clients, 3 * args.transactions,
                                args.pool, args.connect, args.keep, save_as=saved[1])
        tx = 2 * args.transactions * args.clients
        report(args, short, long, tx, workload)
        if args.where:
            where_lines(saved[0], saved[1], os.path.realpath(args.binary), tx, args.top)
    finally:
        C.stop_postgres(data)
        shutil.rmtree(work, ignore_errors=True)


def report(args, short, long, tx, workload):
    """Instructions per transaction by group and by function, and with --cache the lines missed."""
    per_tx = {f: (long[f] - short.get(f, 0)) / tx for f in long}
    misses = {f[1:]: per_tx.pop(f) for f in list(per_tx) if f.startswith("@")}
    groups = collections.Counter()
    for f, n in per_tx.items():
        group = next((g for g, pattern in GROUPS if re.search(pattern, f)), "other")
        groups[group] += n
    total = sum(per_tx.values())
    how = f"{' -C' if args.connect else ''}, [pool] mode = {args.pool}" if args.proxy == "bulkhead" else ""
    thread = "on the worker thread" if args.proxy == "bulkhead" else f"in {args.proxy}"
    print(f"pgbench {workload} -M {args.mode} -c {args.clients}{how}: {total:.0f} instructions per transaction "
          f"{thread}\n")
    if misses:
        print(f"lines missed per transaction, 4 KiB instruction cache: {misses.get('I1mr', 0):.0f} of code; "
              f"2 KiB data cache: {misses.get('D1mr', 0) + misses.get('D1mw', 0):.0f} of data "
              f"({misses.get('D1mr', 0):.0f} read, {misses.get('D1mw', 0):.0f} written)\n")
    for group, n in groups.most_common():
        print(f"  {n:7.0f}  {100 * n / total:5.1f}%  {group}")
    print(f"\ncostliest functions (exclusive):\n")
    for f, n in sorted(per_tx.items(), key=lambda x: -x[1])[:args.top]:
        print(f"  {n:7.0f}  {100 * n / total:5.1f}%  {f[:110]}")


if __name__ == "__main__":
    main()
