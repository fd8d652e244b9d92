#!/usr/bin/env python3
"""A libpq async-API client over TLS hangs when a TLS record holds more than libpq can take.

libpq reads into a buffer with at least 8 KiB free; a larger TLS record is decrypted whole by
OpenSSL and the rest waits inside OpenSSL, where a client that waits for the socket to be
readable (psycopg; ruby-pg's async API; CockroachDB issue 147890) never looks. PostgreSQL
writes records of at most 8 KiB (its send buffer); a TLS terminator that writes 16 KiB records
hangs such clients now and then on large results.

    pip install 'psycopg[binary]'
    python3 tls_record_hang.py "host=127.0.0.1 port=6432 user=postgres sslmode=require" [N]

Runs N (default 2000) queries with results of random sizes (20 to 200 KB); exit 1 with
"HANG" when one does not finish in 10 s, 0 otherwise.
"""
import random
import sys
import threading
import os

import psycopg

dsn = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
with psycopg.connect(dsn, autocommit=True) as conn:
    print("TLS:", conn.pgconn.ssl_in_use)
    for i in range(n):
        rows = random.randint(20, 400)
        width = random.randint(50, 2000)
        done = threading.Event()

        def watchdog():
            if not done.wait(10):
                print(f"HANG at query {i}: {rows} rows of {width} bytes", flush=True)
                os._exit(1)

        threading.Thread(target=watchdog, daemon=True).start()
        got = conn.execute(
            "select g, repeat(md5(g::text), %s) from generate_series(1, %s) g",
            [width // 32 + 1, rows],
        ).fetchall()
        done.set()
        assert len(got) == rows
print(f"no hang in {n} queries")
