#!/usr/bin/env python3
"""JUnit XML (pytest --junitxml, Maven Surefire, go-junit-report) to results.tsv lines:
name<TAB>pass|fail|skip<TAB>seconds<TAB>first line of the failure message.
An expected failure (pytest xfail) counts as skip; an unexpected pass (xpass) as pass."""
import sys
import xml.etree.ElementTree as ET


def main():
    try:
        root = ET.parse(sys.argv[1]).getroot()
    except (OSError, ET.ParseError) as e:
        print(f"cannot read {sys.argv[1]}: {e}", file=sys.stderr)
        return
    for case in root.iter("testcase"):
        cls = case.get("classname", "")
        name = case.get("name", "")
        full = f"{cls}::{name}" if cls else name
        status, note = "pass", ""
        for child in case:
            if child.tag in ("failure", "error"):
                status = "fail"
                note = (child.get("message") or child.text or "").strip().splitlines()[:1]
                note = note[0][:200] if note else child.tag
                break
            if child.tag == "skipped":
                status = "skip"
                note = (child.get("message") or "")[:200].replace("\n", " ")
        note = note.replace("\t", " ")
        print(f"{full}\t{status}\t{float(case.get('time') or 0):.2f}\t{note}")


if __name__ == "__main__":
    main()
