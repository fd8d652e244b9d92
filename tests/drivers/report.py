#!/usr/bin/env python3
"""Side-by-side tables of a tests/drivers run: python3 report.py RESULTS_DIR [--all]

Reads RESULTS_DIR/<suite>/<mode>[.<n>]/results.tsv (name, pass|fail|skip, seconds, note) and
prints, per suite, one row per test with its status in every run (direct, bulkhead, ...), then
a summary. Suites with more than 150 tests show only the rows whose status is not the same in
every run (--all shows every row); the full table is always written to <suite>/table.tsv.
Exits 1 when a test failed in a bulkhead run and passed in every direct run.
"""
import os
import sys

MARK = {"pass": "ok", "fail": "FAIL", "skip": "skip", None: "-"}


def tag_key(tag):
    mode, _, rep = tag.partition(".")
    return (int(rep) if rep.isdigit() else 0, 0 if mode == "direct" else 1, mode)


def load(path):
    rows = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 2 and parts[0]:
                # A name seen twice (parametrised tests with equal ids) keeps the worst status.
                old = rows.get(parts[0])
                if old is None or (old[0] == "pass" and parts[1] != "pass"):
                    rows[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
    return rows


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    show_all = "--all" in sys.argv
    out = args[0]
    summary = []
    for suite in sorted(os.listdir(out)):
        sdir = os.path.join(out, suite)
        if not os.path.isdir(sdir):
            continue
        tags = sorted(
            (t for t in os.listdir(sdir) if os.path.isfile(os.path.join(sdir, t, "results.tsv"))),
            key=tag_key,
        )
        if not tags:
            continue
        runs = {t: load(os.path.join(sdir, t, "results.tsv")) for t in tags}
        names = sorted(set().union(*[set(r) for r in runs.values()]))
        with open(os.path.join(sdir, "table.tsv"), "w", encoding="utf-8") as f:
            f.write("test\t" + "\t".join(tags) + "\n")
            for n in names:
                f.write(n + "\t" + "\t".join((runs[t].get(n) or (None,))[0] or "-" for t in tags) + "\n")
        differ = [n for n in names if len({(runs[t].get(n) or (None,))[0] for t in tags}) > 1]
        shown = names if (show_all or len(names) <= 150) else differ
        width = min(max([len(n) for n in shown] + [10]), 100)
        print(f"\n== {suite}: {len(names)} tests" + ("" if shown is names else f", {len(differ)} whose status differs between runs shown (all in {suite}/table.tsv)"))
        print(f"{'test':<{width}}  " + "  ".join(f"{t:>10}" for t in tags))
        for n in shown:
            cells = []
            for t in tags:
                st = (runs[t].get(n) or (None,))[0]
                cells.append(f"{MARK.get(st, st):>10}")
            flag = "   <-- differs" if n in differ else ""
            print(f"{n[:width]:<{width}}  " + "  ".join(cells) + flag)
        direct = [t for t in tags if t.startswith("direct")]
        for t in tags:
            r = runs[t]
            c = {k: sum(1 for v in r.values() if v[0] == k) for k in ("pass", "fail", "skip")}
            secs = ""
            try:
                with open(os.path.join(sdir, t, "seconds")) as f:
                    secs = f.read().strip()
            except OSError:
                pass
            # Tests that fail here but pass in every direct run (for a bulkhead run).
            worse = ""
            if not t.startswith("direct") and direct:
                worse = str(
                    sum(
                        1
                        for n, v in r.items()
                        if v[0] == "fail" and all((runs[d].get(n) or (None,))[0] == "pass" for d in direct)
                    )
                )
            summary.append((suite, t, c["pass"], c["fail"], c["skip"], worse, secs))
    print("\n== summary")
    print(f"{'suite':<10} {'run':<12} {'passed':>7} {'failed':>7} {'skipped':>8} {'fail only here':>15} {'seconds':>8}")
    for s in summary:
        print(f"{s[0]:<10} {s[1]:<12} {s[2]:>7} {s[3]:>7} {s[4]:>8} {s[5]:>15} {s[6]:>8}")
    print("('fail only here': failed in this run but passed in every direct run)")
    return 1 if any(s[5] not in ("", "0") for s in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
