"""Open-loop load against app.py, with health polling; writes JSON lines.

Every 1/rate seconds one request is started on its own asyncio task, whatever happened to the
earlier ones (open loop): 10% POST /write?id=N with unique increasing ids, 90% GET /read. Each
has a 10 s client timeout. Meanwhile, every 100 ms: GET /healthz on the app (1 s timeout), GET
/stats on the app (in-flight depth), and GET /readyz on bulkhead when --readyz is given; every
500 ms GET /health on bulkhead (circuit state, kept for diagnosis).

Output lines (times are Unix seconds):
  {"k":"req","op":"read"|"write","id":N,"t":send,"lat":s,"st":200|503|...|"timeout"|"err","ss":"57P03"}
  {"k":"hz","t":send,"lat":s,"st":...}         app /healthz
  {"k":"stats","t":send,"inflight":N,"queued":N}
  {"k":"rz","t":send,"lat":s,"st":...,"body":"..."}  bulkhead /readyz
  {"k":"bh","t":send,"health":{...}}           bulkhead /health
  {"k":"gap","t":due,"late":s}                 the send loop ran late by more than 0.5 s (sends skipped)

  python load.py --app 127.0.0.1:P --duration 70 --out FILE [--readyz 127.0.0.1:H] [--rate 100]
                 [--write-share 0.1] [--first-id 1000001] [--start-at UNIXTIME]
"""

import argparse
import asyncio
import json
import random
import time


async def http(addr, method, path, timeout):
    """(status or "timeout"/"err", body, latency)."""
    host, port = addr.rsplit(":", 1)
    t0 = time.time()
    writer = None

    async def go():
        nonlocal writer
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()  # the server closes after its answer
        return data

    try:
        data = await asyncio.wait_for(go(), timeout)
        head, _, body = data.partition(b"\r\n\r\n")
        parts = head.split(b" ", 2)
        status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else "err"
        return status, body.decode("utf-8", "replace"), time.time() - t0
    except asyncio.TimeoutError:
        return "timeout", "", time.time() - t0
    except OSError as e:
        return "err", type(e).__name__, time.time() - t0
    finally:
        if writer is not None:
            writer.close()


class Out:
    def __init__(self, path):
        self.f = open(path, "w")

    def put(self, rec):
        self.f.write(json.dumps(rec, separators=(",", ":")) + "\n")


async def one_request(out, app, op, ident, timeout):
    t = time.time()
    if op == "write":
        st, body, lat = await http(app, "POST", f"/write?id={ident}", timeout)
    else:
        st, body, lat = await http(app, "GET", "/read", timeout)
    rec = {"k": "req", "op": op, "t": t, "lat": round(lat, 6), "st": st}
    if op == "write":
        rec["id"] = ident
    if st != 200:
        rec["ss"] = body.strip()[:40] if st == 503 else (body[:40] if body else st)
    out.put(rec)


async def poller(out, end, every, fn):
    nxt = time.time()
    tasks = set()
    while nxt < end:
        t = asyncio.create_task(fn())
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        nxt += every
        if time.time() - nxt > 0.5:
            nxt = time.time()  # paused: skip the missed polls (the send loop records the gap)
        await asyncio.sleep(max(0.0, nxt - time.time()))
    if tasks:
        await asyncio.wait(tasks)


async def main_async(args):
    out = Out(args.out)
    if args.start_at:
        await asyncio.sleep(max(0.0, args.start_at - time.time()))
    start = args.start_at or time.time()
    end = start + args.duration
    rng = random.Random(args.seed)

    async def healthz():
        t = time.time()
        st, _, lat = await http(args.app, "GET", "/healthz", 1.0)
        out.put({"k": "hz", "t": t, "lat": round(lat, 6), "st": st})

    async def stats():
        t = time.time()
        st, body, _ = await http(args.app, "GET", "/stats", 1.0)
        if st == 200:
            d = json.loads(body)
            out.put({"k": "stats", "t": t, "inflight": d["inflight"], "queued": d["queued"]})
        else:
            out.put({"k": "stats", "t": t, "inflight": None, "st": st})

    async def readyz():
        t = time.time()
        st, body, lat = await http(args.readyz, "GET", "/readyz", 1.0)
        out.put({"k": "rz", "t": t, "lat": round(lat, 6), "st": st, "body": body.strip()[:120]})

    async def bhealth():
        t = time.time()
        st, body, _ = await http(args.readyz, "GET", "/health", 1.0)
        try:
            h = json.loads(body) if st in (200, 503) else {"st": st}
        except ValueError:
            h = {"st": st, "body": body[:200]}
        out.put({"k": "bh", "t": t, "health": h})

    pollers = [poller(out, end, 0.1, healthz), poller(out, end, 0.1, stats)]
    if args.readyz:
        pollers += [poller(out, end, 0.1, readyz), poller(out, end, 0.5, bhealth)]
    poll_task = asyncio.gather(*pollers)

    reqs = set()
    next_id = args.first_id
    nxt = start
    interval = 1.0 / args.rate
    while nxt < end:
        if rng.random() < args.write_share:
            op, ident = "write", next_id
            next_id += 1
        else:
            op, ident = "read", None
        t = asyncio.create_task(one_request(out, args.app, op, ident, args.timeout))
        reqs.add(t)
        t.add_done_callback(reqs.discard)
        nxt += interval
        late = time.time() - nxt
        if late > 0.5:
            # This process did not run for a while (the machine paused, or it was starved):
            # record it, and skip the missed sends rather than firing them all at once.
            out.put({"k": "gap", "t": nxt, "late": round(late, 3)})
            nxt = time.time()
        await asyncio.sleep(max(0.0, nxt - time.time()))
    await poll_task
    if reqs:
        await asyncio.wait(reqs)  # each ends within its own timeout
    out.f.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--app", required=True)
    ap.add_argument("--readyz", default="")
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--write-share", type=float, default=0.1)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--first-id", type=int, default=1_000_001)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--start-at", type=float, default=0.0, help="Unix time to start at (default: now)")
    args = ap.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
