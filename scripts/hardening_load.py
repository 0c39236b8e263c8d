#!/usr/bin/env python3
"""Bounded hostile-client load against the gateway: half-open connections and stalled bodies.

Starts a zero-cost replica (asyncio, fixed JSON answer) and the gateway binary, both as children
killed by pid at the end, then:
  1. baseline: --requests normal chat completions at --concurrency, latency p50/p99;
  2. attack: --half-open connections that send part of a request head and then one byte every
     2 s (slowloris), and --stalled connections that declare a 10 MB body, send 9 MiB of it and
     stall;
  3. the same normal requests again while the attack holds, latency p50/p99;
  4. waits (at most --wait seconds) until the gateway has closed every attack connection, and
     reports how many were closed and with which answer (408, 503, none), and the gateway's peak
     resident memory (VmRSS from /proc/PID/status, sampled every 100 ms).
Prints one JSON object. Everything is bounded: connection counts, byte counts and time.

usage: scripts/hardening_load.py [--gateway target/release/replica-router-gateway]
         [--half-open 1000] [--stalled 100] [--requests 2000] [--concurrency 8] [--wait 40]
         [-- extra gateway flags]
"""

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

REPLY = (b'{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",'
         b'"content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,'
         b'"total_tokens":2}}')
CHAT = b'{"model":"m","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}'


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


async def replica_main(port):
    async def serve(r, w):
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                n = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        n = int(line.split(b":", 1)[1])
                if n:
                    await r.readexactly(n)
                w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                        + str(len(REPLY)).encode() + b"\r\n\r\n" + REPLY)
                await w.drain()
        except Exception:
            pass
        finally:
            w.close()
    srv = await asyncio.start_server(serve, "127.0.0.1", port, backlog=1024)
    async with srv:
        await srv.serve_forever()


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


async def wait_ready(port, timeout=30):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            data = await asyncio.wait_for(r.read(), 2)
            w.close()
            if data.startswith(b"HTTP/1.1 200"):
                return True
        except Exception:
            pass
        await asyncio.sleep(0.2)
    return False


async def normal_load(port, n, conc):
    """n chat completions over conc keep-alive connections; latencies in ms, errors."""
    lat, errors = [], 0
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
           b"content-length: " + str(len(CHAT)).encode() + b"\r\n\r\n" + CHAT)
    per = [n // conc + (1 if i < n % conc else 0) for i in range(conc)]

    async def worker(k):
        nonlocal errors
        conn = None
        for _ in range(k):
            t = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
                r, w = conn
                w.write(req)
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
                n = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        n = int(line.split(b":", 1)[1])
                await asyncio.wait_for(r.readexactly(n), 5)
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
                else:
                    lat.append((time.perf_counter() - t) * 1000)
            except Exception as e:
                errors += 1
                if os.environ.get("DEBUG"):
                    print("request failed:", repr(e), file=sys.stderr)
                if conn:
                    conn[1].close()
                conn = None
        if conn:
            conn[1].close()
    await asyncio.gather(*(worker(k) for k in per))
    lat.sort()
    pct = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None
    return {"ok": len(lat), "errors": errors, "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


class Attack:
    def __init__(self):
        self.results = {}  # kind -> list of outcome strings
        self.open = 0
        self.settled = 0  # stalled bodies sent (or answered) so far

    async def conn(self, port, kind, deadline):
        self.open += 1
        outcome = "open"
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            reader = asyncio.ensure_future(r.read(4096))
            if kind == "half-open":
                w.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
                drip = b"x-slow-header-" * 100
                i = 0
                while time.monotonic() < deadline and not reader.done():
                    await asyncio.wait([reader], timeout=2)
                    if reader.done():
                        break
                    w.write(drip[i:i + 1])
                    i += 1
            else:
                w.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                        b"content-length: 10000000\r\n\r\n")
                chunk = b" " * 65536
                sent = 0
                while sent < 9 * 1024 * 1024 and not reader.done():
                    w.write(chunk)
                    sent += len(chunk)
                    try:
                        await asyncio.wait_for(w.drain(), 30)
                    except Exception:
                        break
                self.settled += 1
                while time.monotonic() < deadline and not reader.done():
                    await asyncio.wait([reader], timeout=1)
            if reader.done():
                data = reader.result() if not reader.exception() else b""
                outcome = ("closed " + data.split(b" ")[1].decode()) if data.startswith(b"HTTP/1.1 ") else "closed"
            else:
                reader.cancel()
            w.close()
        except Exception:
            outcome = "closed"
        self.open -= 1
        self.results.setdefault(kind, []).append(outcome)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gateway", default="target/release/replica-router-gateway")
    ap.add_argument("--half-open", type=int, default=1000)
    ap.add_argument("--stalled", type=int, default=100)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--wait", type=float, default=40)
    ap.add_argument("--replica-only", type=int, default=0, help=argparse.SUPPRESS)
    args, extra = ap.parse_known_args()
    if args.replica_only:
        await replica_main(args.replica_only)
        return
    extra = [a for a in extra if a != "--"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    rport, gport = free_port(), free_port()
    children = []
    try:
        children.append(subprocess.Popen([sys.executable, __file__, "--replica-only", str(rport)]))
        for _ in range(100):  # the replica listens before the gateway starts
            try:
                socket.create_connection(("127.0.0.1", rport), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        gw = subprocess.Popen([args.gateway, "--listen", f"127.0.0.1:{gport}", "--replica",
                               f"http://127.0.0.1:{rport}", "--policy", "least-loaded"] + extra,
                              stdout=subprocess.DEVNULL)
        children.append(gw)
        if not await wait_ready(gport):
            print("gateway not ready", file=sys.stderr)
            return 1
        await normal_load(gport, 200, args.concurrency)  # warm-up
        rss_idle = rss_kib(gw.pid)
        baseline = await normal_load(gport, args.requests, args.concurrency)
        peak = [rss_kib(gw.pid)]

        async def sample():
            while True:
                peak[0] = max(peak[0], rss_kib(gw.pid))
                await asyncio.sleep(0.1)
        sampler = asyncio.ensure_future(sample())
        attack = Attack()
        t0 = time.monotonic()
        deadline = t0 + args.wait
        tasks = [asyncio.ensure_future(attack.conn(gport, "half-open", deadline)) for _ in range(args.half_open)]
        tasks += [asyncio.ensure_future(attack.conn(gport, "stalled-9MiB", deadline)) for _ in range(args.stalled)]
        # Measure once the attack is in place: every stalled body sent (or refused).
        while attack.settled < args.stalled and time.monotonic() - t0 < 20:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        in_place_after = round(time.monotonic() - t0, 1)
        under = await normal_load(gport, args.requests, args.concurrency)
        health = await wait_ready(gport, timeout=2)
        await asyncio.wait(tasks, timeout=args.wait + 5)
        all_closed_after = round(time.monotonic() - t0, 1)
        sampler.cancel()
        summary = {}
        for kind, outs in attack.results.items():
            counts = {}
            for o in outs:
                counts[o] = counts.get(o, 0) + 1
            summary[kind] = counts
        print(json.dumps({
            "gateway_flags": extra,
            "baseline": baseline,
            "under_attack": under,
            "p99_delta_ms": round((under["p99_ms"] or 0) - (baseline["p99_ms"] or 0), 2),
            "health_during_attack": health,
            "rss_idle_mib": round(rss_idle / 1024, 1),
            "rss_peak_mib": round(peak[0] / 1024, 1),
            "attack_outcomes": summary,
            "attack_in_place_after_s": in_place_after,
            "attack_left_open": attack.open,
            "attack_done_after_s": all_closed_after,
        }, indent=1))
    finally:
        for c in children:
            c.send_signal(signal.SIGKILL)
            c.wait()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
