"""Tables and plots from an incident replay's results directory.

  python report.py RESULTS_DIR

Writes RESULTS_DIR/report.md (also printed) and one PNG per fault, RESULTS_DIR/<fault>.png.
Column meanings are in README.md beside this file.
"""

import collections
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SYSTEMS = ["direct", "pgbouncer", "bulkhead"]
FAULTS = ["stall-tx", "stall-auto", "failover", "frozen", "failover-split", "failover-ro"]
CLIENT_TIMEOUT = 10.0
NOTES = {
    "stall-tx": "commits wait for a synchronous standby that does not exist (synchronous_standby_names = 'missing'); "
                "the app runs transactions (autocommit off: BEGIN; INSERT; COMMIT).",
    "stall-auto": "the same stall; the app runs in autocommit (each INSERT commits by itself).",
    "failover": "the primary is stopped (immediate) and the streaming standby promoted ~2 s later; nothing is "
                "healed, so recovery is measured from the fault start. Direct: libpq multi-host with "
                "target_session_attrs=read-write. PgBouncer is configured with the original primary only: "
                "it cannot follow a failover, so it cannot recover. bulkhead lists both hosts. "
                "App in transactions.",
    "frozen": "the postmaster and all its children are SIGSTOPped for the fault window, SIGCONTinued at the heal; "
              "app in transactions.",
    "failover-split": "the failover above, with the app's reads on a pool of their own (10 more connections) "
                      "to the same address as its writes. The baseline for failover-ro.",
    "failover-ro": "the same failover and app, with the reads' pool on a read endpoint: bulkhead's read-only "
                   "listener ([listen_readonly]); directly, libpq multi-host with "
                   "target_session_attrs=prefer-standby. PgBouncer has no read routing and is not run.",
}


def load_run(d):
    meta = json.load(open(os.path.join(d, "meta.json")))
    ev = {e["what"]: e["t"] for e in meta["events"]}
    recs = collections.defaultdict(list)
    with open(os.path.join(d, "load.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            recs[r["k"]].append(r)
    writes = json.load(open(os.path.join(d, "writes.json")))
    return meta, ev, recs, writes


def pct(n, d):
    return f"{100.0 * n / d:.0f} %" if d else "—"


def quantile(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))
    return xs[i]


def fmt_lat(v):
    if v is None:
        return "—"
    if v >= CLIENT_TIMEOUT - 0.05:
        return "≥ 10 s (timeout)"
    if v >= 1:
        return f"{v:.1f} s"
    return f"{v * 1000:.0f} ms" if v >= 0.01 else f"{v * 1000:.1f} ms"


def outcome(r):
    if r["st"] == 200:
        return "ok"
    if r["st"] == 503:
        return r.get("ss") or "503"
    return str(r["st"])  # timeout, err


def ok_within(r, limit):
    return r["st"] == 200 and r["lat"] <= limit


def recovery(reqs, ref, end):
    """Seconds from `ref` to the start of the first 1 s bin after which every bin up to `end` has
    >= 95 % of its requests (reads and writes, by send time) answered 200 within 1 s; None if the
    last bin itself fails."""
    bins = collections.defaultdict(lambda: [0, 0])
    for r in reqs:
        if ref <= r["t"] < end:
            b = int((r["t"] - ref) // 1)
            bins[b][1] += 1
            if ok_within(r, 1.0):
                bins[b][0] += 1
    nbins = int(math.ceil((end - ref) - 1e-6))
    first_good = None
    for b in range(nbins - 1, -1, -1):
        ok, n = bins[b]
        if n == 0 or ok / n >= 0.95:
            first_good = b
        else:
            break
    if first_good is None:
        return None
    return float(first_good)


def analyse(d):
    meta, ev, recs, writes = load_run(d)
    fs, hs = ev["fault-start"], ev["heal-start"]
    end = meta["t0"] + sum(meta["phases"])
    in_fault = lambda r: fs <= r["t"] < hs  # noqa: E731
    reads = [r for r in recs["req"] if r["op"] == "read" and in_fault(r)]
    wr = [r for r in recs["req"] if r["op"] == "write" and in_fault(r)]
    row = {}
    row["reads_ok"] = pct(sum(ok_within(r, 1.0) for r in reads), len(reads))
    # Requests sent from the fault start to the end of the run that did not get 200: the
    # application's failed requests across the fault, reads and writes apart.
    after = [r for r in recs["req"] if r["t"] >= fs]
    failed_reads = sum(r["st"] != 200 for r in after if r["op"] == "read")
    failed_writes = sum(r["st"] != 200 for r in after if r["op"] == "write")
    row["failed"] = f"{failed_reads} / {failed_writes}"
    lats = [r["lat"] for r in reads]
    row["read_p50"] = fmt_lat(quantile(lats, 0.5))
    row["read_p99"] = fmt_lat(quantile(lats, 0.99))
    row["writes_answered"] = pct(sum(r["st"] in (200, 503) and r["lat"] <= 5.0 for r in wr), len(wr))
    c = collections.Counter(outcome(r) for r in wr)
    row["write_outcomes"] = ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))
    infl = [s["inflight"] for s in recs["stats"] if in_fault(s) and s.get("inflight") is not None]
    row["peak_inflight"] = str(max(infl)) if infl else "—"
    hz = [h for h in recs["hz"] if in_fault(h)]
    row["healthz"] = pct(sum(h["st"] == 200 for h in hz), len(hz))
    rz = [r for r in recs["rz"] if in_fault(r)]
    if rz:
        bad = [r for r in rz if r["st"] == 503]
        row["readyz_503"] = pct(len(bad), len(rz))
        row["readyz_first"] = f"{min(r['t'] for r in bad) - fs:.1f} s" if bad else "never"
    else:
        row["readyz_503"] = row["readyz_first"] = "—"
    ref = fs if meta["fault"].startswith("failover") else hs
    rec = recovery(recs["req"], ref, end)
    row["recovery"] = "not recovered" if rec is None else f"{rec:.0f} s"
    row["missing"] = str(len(writes["acked_missing"]))
    row["unacked_present"] = str(writes["unacked_present"])
    # whole-run facts for the notes
    row["_circuit"] = circuit_summary(d)
    row["_disturbed"] = disturbances(meta, recs)
    return row


def disturbances(meta, recs):
    """Signs that the harness itself did not run on time (a paused VM, a starved process): the
    load generator's send loop late by > 0.5 s, or a fault injected or healed > 0.5 s late."""
    fs = next(e["t"] for e in meta["events"] if e["what"] == "fault-start")
    out = [f"load generator paused {g['late']:.1f} s at {g['t'] - fs:+.1f} s" for g in recs["gap"]]
    for e in meta["events"]:
        if "due" in e and e["t"] - e["due"] > 0.5:
            out.append(f"{e['what']} {e['t'] - e['due']:.1f} s late")
    return out


def circuit_summary(d):
    path = os.path.join(d, "bulkhead.log")
    if not os.path.exists(path):
        return None
    opened = half = closed = 0
    with open(path, errors="replace") as f:
        for line in f:
            opened += "write circuit opened: writes are refused" in line
            half += "write circuit half-open" in line
            closed += "write circuit closed" in line
    return opened, half, closed


COLUMNS = [
    ("reads_ok", "reads OK ≤ 1 s"),
    ("failed", "failed requests from the fault on (reads / writes)"),
    ("read_p50", "read p50"),
    ("read_p99", "read p99"),
    ("writes_answered", "writes answered ≤ 5 s"),
    ("write_outcomes", "write outcomes (fault window)"),
    ("peak_inflight", "peak in-flight"),
    ("healthz", "/healthz OK"),
    ("readyz_503", "/readyz 503"),
    ("readyz_first", "first 503 after"),
    ("recovery", "recovery"),
    ("missing", "acked writes missing"),
    ("unacked_present", "unacked writes committed"),
]


def table(rows):
    out = ["| system | " + " | ".join(h for _, h in COLUMNS) + " |",
           "|---|" + "---|" * len(COLUMNS)]
    for system, row in rows:
        out.append(f"| {system} | " + " | ".join(row[k] for k, _ in COLUMNS) + " |")
    return out


def plot(results, fault, runs):
    fig, axes = plt.subplots(2, len(runs), figsize=(5.2 * len(runs), 7.5), sharex=True, sharey="row",
                             squeeze=False)
    for i, (system, d) in enumerate(runs):
        meta, ev, recs, _ = load_run(d)
        fs, hs = ev["fault-start"], ev["heal-start"]
        ax, ax2 = axes[0][i], axes[1][i]
        for a in (ax, ax2):
            a.axvspan(0, hs - fs, color="orange", alpha=0.15, lw=0)
            a.grid(True, which="major", alpha=0.3)
        groups = {"read ok": ([], [], "tab:green", "."), "read error": ([], [], "tab:red", "."),
                  "read timeout (10 s)": ([], [], "grey", "."), "write ok": ([], [], "tab:blue", "x"),
                  "write error/timeout": ([], [], "tab:purple", "x")}
        for r in recs["req"]:
            if r["op"] == "read":
                g = "read ok" if r["st"] == 200 else ("read timeout (10 s)" if r["st"] == "timeout" else "read error")
            else:
                g = "write ok" if r["st"] == 200 else "write error/timeout"
            groups[g][0].append(r["t"] - fs)
            groups[g][1].append(max(r["lat"], 1e-4))
        for label, (xs, ys, color, marker) in groups.items():
            if xs:
                ax.scatter(xs, ys, s=4 if marker == "." else 10, c=color, marker=marker, label=label,
                           alpha=0.6, linewidths=0.6)
        ax.set_yscale("log")
        ax.set_title(system)
        if i == 0:
            ax.set_ylabel("request latency (s), by send time")
            ax2.set_ylabel("app in-flight requests")
        st = [s for s in recs["stats"] if s.get("inflight") is not None]
        ax2.plot([s["t"] - fs for s in st], [s["inflight"] for s in st], color="black", lw=1, label="in-flight")
        rz = recs["rz"]
        if rz:
            bad = [r["t"] - fs for r in rz if r["st"] != 200]
            if bad:
                ax2.scatter(bad, [0] * len(bad), marker="|", color="tab:red", s=60, label="bulkhead /readyz not 200")
            ax2.legend(loc="upper left", fontsize=7)
        ax2.set_xlabel("seconds since fault start (shaded: fault window)")
        if i == len(runs) - 1:
            ax.legend(loc="upper right", fontsize=7, markerscale=2)
    fig.suptitle(f"incident replay: {fault}")
    fig.tight_layout()
    path = os.path.join(results, f"{fault}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def churn_table(results):
    rows = []
    for system in SYSTEMS:
        p = os.path.join(results, "runs", "churn", system, "churn.json")
        if os.path.exists(p):
            rows.append(json.load(open(p)))
    if not rows:
        return []
    out = ["## churn", "",
           f"{rows[0]['cycles']} cycles of connect, `SELECT 1`, close (psycopg, no pool) on a healthy database, "
           "one after another, while one connection INSERTs (autocommit) every 100 ms, through each system "
           "(cycle time: wall time of the cycles / their number).", "",
           "| system | cycles failed | how | cycle time | writer INSERTs OK | refused | with | circuit openings |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        how = "; ".join(f"{v}× {k}" for k, v in sorted(r["failures"].items(), key=lambda kv: -kv[1])) or "—"
        wh = "; ".join(f"{v}× {k}" for k, v in sorted(r["writer_errors"].items(), key=lambda kv: -kv[1])) or "—"
        circ = "—"
        if "circuit_openings_log" in r:
            circ = (f"{r['circuit_openings_log']} (log); circuit_state ≠ 0 in {r['circuit_open_samples']} of "
                    f"{r['circuit_samples']} /metrics samples")
        per = f"{1000 * r['seconds'] / max(1, r['cycles']):.1f} ms"
        out.append(f"| {r['system']} | {r['failed']} / {r['cycles']} | {how} | {per} | {r['writer_ok']} | "
                   f"{r['writer_refused']} | {wh} | {circ} |")
    return out


def main():
    results = sys.argv[1]
    meta = {}
    if os.path.exists(os.path.join(results, "meta.json")):
        meta = json.load(open(os.path.join(results, "meta.json")))
    lines = [f"# Incident replay, {meta.get('started', '')}", "",
             f"bulkhead `{meta.get('bulkhead_commit', '?')}` ({meta.get('bulkhead_bin', '?')}); "
             f"{meta.get('cores', '?')} cores; arguments: `{' '.join(meta.get('args', [])) or '(defaults)'}`"
             + (f"; extra bulkhead config `{meta['bulkhead_config_extra']}`" if meta.get("bulkhead_config_extra") else ""),
             ""]
    pngs = []
    for fault in FAULTS:
        runs = [(s, os.path.join(results, "runs", fault, s)) for s in SYSTEMS
                if os.path.exists(os.path.join(results, "runs", fault, s, "writes.json"))]
        if not runs:
            continue
        m0 = json.load(open(os.path.join(runs[0][1], "meta.json")))
        h, f_, r_ = m0["phases"]
        lines += [f"## {fault}", "", f"{NOTES[fault]} Phases: {h:g} s healthy, {f_:g} s fault, {r_:g} s healed.", ""]
        rows = [(s, analyse(d)) for s, d in runs]
        lines += table(rows)
        for s, row in rows:
            if row["_disturbed"]:
                lines.append(f"\n**{s}: the harness did not run on time, so this row is not trustworthy: "
                             + "; ".join(row["_disturbed"]) + ".**")
            if row["_circuit"] is not None:
                o, hh, c = row["_circuit"]
                lines.append(f"\n{s}: write circuit opened {o}×, half-open {hh}×, closed {c}× (bulkhead log, whole run).")
        lines.append("")
        pngs.append(plot(results, fault, runs))
    lines += churn_table(results)
    if os.path.exists(os.path.join(results, "failures.txt")):
        lines += ["", "## runs that failed", "", "```", open(os.path.join(results, "failures.txt")).read().strip(), "```"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(results, "report.md"), "w") as f:
        f.write(text)
    print(text)
    for p in pngs:
        print(f"plot: {p}", file=sys.stderr)


if __name__ == "__main__":
    main()
