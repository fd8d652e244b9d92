"""Trains a profile-instrumented bulkhead for a profile-guided build (benches/pgo runs this).

Starts a throwaway PostgreSQL (with TLS) and four instrumented bulkheads in front of it:
passthrough in plaintext and with TLS to the server, transaction pooling (size 10) and session
pooling, the latter two logging pgbench in with SCRAM. Drives each with the traffic of
benches/compare (pgbench -S in the simple, extended and prepared protocols, -N, new
connections per transaction), then stops them with SIGTERM so that each writes its profile
(a .profraw file in the directory given to -Cprofile-generate) as it exits. Every mode is
trained, so that no mode's code is laid out as cold.
"""

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C  # noqa: E402


class Trainees(C.Systems):
    def __init__(self, work, binary):
        self.work = work
        self.procs = {}
        self.pg_port, self.data = C.start_postgres(work, 300)
        self.ports = {}
        self.sslmode = {}
        self.start_bulkhead("plain", "disable", 0, binary=binary)
        self.start_bulkhead("tls", "require", 0, binary=binary)
        self.start_bulkhead("tx", "disable", 0, "transaction", 10, binary=binary)
        self.start_bulkhead("session", "disable", 0, "session", 20, binary=binary)


WORKLOADS = [
    (system, args)
    for system in ("plain", "tls")
    for args in [["-S", "-M", mode, "-c", clients, "-j", "2"]
                 for mode in ("simple", "extended", "prepared") for clients in ("1", "16")]
    + [["-N", "-M", "prepared", "-c", "16", "-j", "2"], ["-S", "-M", "simple", "-c", "4", "-j", "2", "-C"]]
] + [
    ("tx", ["-S", "-M", "prepared", "-c", "100", "-j", "2"]),
    ("tx", ["-S", "-M", "simple", "-c", "100", "-j", "2"]),
    ("tx", ["-N", "-M", "extended", "-c", "16", "-j", "2"]),
    ("session", ["-S", "-M", "simple", "-c", "4", "-j", "2", "-C"]),
    ("session", ["-S", "-M", "prepared", "-c", "16", "-j", "2"]),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True, help="the instrumented bulkhead")
    ap.add_argument("--seconds", type=int, default=3, help="per workload")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bulkhead-pgo-")
    systems = Trainees(work, args.binary)
    try:
        for system, wargs in WORKLOADS:
            tps, _, _, _, failed = C.pgbench(systems.ports[system], "disable", wargs, args.seconds, work)
            print(f"trained {system:8} {' '.join(wargs):40} {tps:8.0f} tps, {failed} failed", flush=True)
    finally:
        # SIGTERM: each bulkhead drains and exits normally, which writes its profile.
        systems.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
