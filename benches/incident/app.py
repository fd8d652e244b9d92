"""The application of the incident: a small HTTP service in front of PostgreSQL.

A FIXED pool of 16 worker threads serves every request (reads, writes and the health check
alike), fed by one accept thread through an unbounded queue, as a threaded web server with a
fixed worker count does. The database is reached through a psycopg_pool.ConnectionPool of 10
connections with the driver's defaults (getconn waits up to 30 s, no statement timeout, no
connect timeout).

  GET  /read         SELECT on the table; 200 with the value
  POST /write?id=N   INSERT the id; 200 only after the commit returned
  GET  /healthz      200 without touching the database (but served by the same 16 workers)
  GET  /stats        served by the accept thread itself: {"inflight": N}, requests accepted and
                     not yet answered (queued ones included, /stats itself excluded)

Errors: 503 with the SQLSTATE in the body for a database error (psycopg's e.sqlstate), "conn"
for a connection error without a SQLSTATE, "pool-timeout" when no pooled connection came within
the pool's 30 s default.

  python app.py --port P --conninfo '...' (--tx | --autocommit) [--read-conninfo '...']

With --read-conninfo, reads use a second pool of 10 connections to that address (a read
endpoint), and writes the first.
"""

import argparse
import json
import queue
import random
import socket
import sys
import threading
import time

import psycopg
import psycopg_pool

WORKERS = 16
POOL_SIZE = 10
READ_SQL = "SELECT payload FROM items WHERE id = %s"
WRITE_SQL = "INSERT INTO items (id, payload) VALUES (%s, 'w')"
SEEDED = 1000  # rows 1..SEEDED exist before the run (made by the harness)

inflight = 0
inflight_lock = threading.Lock()


def add_inflight(n):
    global inflight
    with inflight_lock:
        inflight += n


def respond(sock, status, body):
    reason = {200: "OK", 404: "Not Found", 400: "Bad Request", 503: "Service Unavailable"}.get(status, "X")
    data = body.encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n").encode()
    try:
        sock.sendall(head + data)
    except OSError:
        pass  # the client gave up (its own timeout): the work was done anyway, as in a real server
    finally:
        try:
            sock.close()
        except OSError:
            pass


def db_error(e):
    if isinstance(e, psycopg_pool.PoolTimeout):
        return "pool-timeout"
    state = getattr(e, "sqlstate", None)
    return state if state else "conn"


def handle(pool, read_pool, method, path):
    """Returns (status, body)."""
    route, _, query = path.partition("?")
    params = dict(p.partition("=")[::2] for p in query.split("&") if p)
    if route == "/healthz":
        return 200, "ok"
    if route == "/read" and method == "GET":
        try:
            with read_pool.connection() as conn:  # tx mode: BEGIN; SELECT; COMMIT on exit
                row = conn.execute(READ_SQL, (random.randint(1, SEEDED),)).fetchone()
            return 200, str(row[0] if row else "")
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            return 503, db_error(e)
    if route == "/write" and method == "POST":
        try:
            ident = int(params["id"])
        except (KeyError, ValueError):
            return 400, "id"
        try:
            with pool.connection() as conn:  # tx mode: BEGIN; INSERT; COMMIT on exit
                conn.execute(WRITE_SQL, (ident,))
            return 200, "ok"
        except (psycopg.Error, psycopg_pool.PoolTimeout) as e:
            return 503, db_error(e)
    return 404, "no such path"


def worker(pool, read_pool, work):
    while True:
        sock, method, path = work.get()
        try:
            status, body = handle(pool, read_pool, method, path)
        except Exception as e:  # never lose a worker
            status, body = 503, "app:" + type(e).__name__
        respond(sock, status, body)
        add_inflight(-1)


def read_request(sock):
    """The request line of an HTTP request (headers are read and ignored; no bodies are sent)."""
    sock.settimeout(2.0)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > 65536:
            break
    sock.settimeout(None)
    line = buf.split(b"\r\n", 1)[0].decode("latin-1").split()
    return (line[0], line[1]) if len(line) >= 2 else (None, None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--conninfo", required=True)
    ap.add_argument("--read-conninfo", default="")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--tx", action="store_true", help="autocommit off (psycopg's default)")
    mode.add_argument("--autocommit", action="store_true")
    args = ap.parse_args()

    kwargs = {"autocommit": True} if args.autocommit else {}
    pool = psycopg_pool.ConnectionPool(args.conninfo, min_size=POOL_SIZE, max_size=POOL_SIZE,
                                       kwargs=kwargs, open=True)
    pool.wait(timeout=60)
    read_pool = pool
    if args.read_conninfo:
        read_pool = psycopg_pool.ConnectionPool(args.read_conninfo, min_size=POOL_SIZE, max_size=POOL_SIZE,
                                                kwargs=kwargs, open=True)
        read_pool.wait(timeout=60)

    work = queue.Queue()
    for _ in range(WORKERS):
        threading.Thread(target=worker, args=(pool, read_pool, work), daemon=True).start()

    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", args.port))
    lsock.listen(4096)
    print(f"app listening on 127.0.0.1:{args.port} ({'tx' if args.tx else 'autocommit'})", file=sys.stderr, flush=True)
    while True:
        sock, _ = lsock.accept()
        add_inflight(1)
        try:
            method, path = read_request(sock)
        except OSError:
            method = path = None
        if path is None:
            add_inflight(-1)
            respond(sock, 400, "bad request")
            continue
        if path.startswith("/stats"):
            add_inflight(-1)
            with inflight_lock:
                n = inflight
            respond(sock, 200, json.dumps({"inflight": n, "queued": work.qsize(), "t": time.time()}))
            continue
        work.put((sock, method, path))


if __name__ == "__main__":
    main()
