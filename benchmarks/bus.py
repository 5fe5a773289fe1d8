"""Entanglement bus against raw pyzmq + msgpack PUB/SUB, measured side by side in one run.

Deployment-shaped: every agent is its own process (as a Ray actor would be), and the bus hub
runs in this coordinating process (a Ray actor of its own in a real run). For 2, 4, 8 and 16
agents, four setups carry the same state update (16 float32 phases as bytes, 16 sedenion
floats, coherence, step; about 280 bytes packed) over tcp on loopback:

  raw p2p    each agent PUB-binds and SUB-connects to every other agent; msgpack pack/unpack.
             No hub hop, no sequencing, no validation: an upper bound, not a like-for-like
             baseline for a hub design.
  raw fwd    the fair baseline for a hub-based bus: each agent PUSHes to a forwarder in the
             coordinator (libzmq's zmq.proxy, PULL -> PUB, in C: no Python per message) and
             SUBscribes to it, so, as on the bus, every agent receives every update (its own
             too, not counted) after one hop through a central process; msgpack pack/unpack.
  bus off    BusHub + one BusNode per agent, security "none"
  bus curve  BusHub + one BusNode per agent, CURVE + ZAP (the default)

The "vs fwd" and "vs p2p" columns divide each setup's updates/s by the raw rows'.

updates/s  every agent publishes as fast as it can; the figure is the number of peer updates
           each agent received per second (deliveries from others / (agents - 1)), i.e. the
           rate at which state reaches everyone. What a PUB drops above its HWM is not counted.
p50/p99    latency from publish (the update's own timestamp) to the receiving agent's code,
           with all agents together publishing a paced --rate updates/s (default 1000).

Each cell is the median over --repeats runs; the setups take turns, each repeat starting one
setup later (a rotation), so none always runs first or last while the machine's speed drifts;
with --repeats a multiple of 4 each setup takes every place in the order equally often.
steal      the share of all CPU time the hypervisor gave to other guests during the row's latency
           runs (median; `benchmarks/host.py`): a virtual CPU wanted to run and could not.
           Latency tails follow it.
The machine's load average is printed too: on a shared or small machine the agents, the hub
and everything else compete for the same cores.

    python benchmarks/bus.py [--seconds 1.5] [--repeats 3] [--agents 2 4 8 16] [--rate 1000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from entanglement import BusConfig, BusEndpoints, BusHub, BusNode, NodeCredentials  # noqa: E402

from host import StealMeter, cpu_ticks, percent, steal_share  # noqa: E402  (benchmarks/host.py)

HWM = 100_000
WARMUP_S = 0.3
SETUP_S = 0.5  # time between "go" and the common start, so every agent starts together


def state_payload() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "phases": rng.uniform(0, 6.283, 16).astype("<f4").tobytes(),
        "sedenion": rng.standard_normal(16).tolist(),
        "coherence": 0.5,
        "step": 1,
    }


class Window:
    """Counts peer deliveries (and latencies, when paced) inside [start, end] of wall time."""

    def __init__(self, agent: str, start: float, end: float, keep_latency: bool) -> None:
        self.agent, self.start, self.end, self.keep = agent, start, end, keep_latency
        self.count = 0
        self.dropped = 0  # raw sends refused by a full queue
        self.latencies: list[float] = []

    def seen(self, sender: str, sent_at: float) -> None:
        now = time.time()
        if sender != self.agent and self.start <= now <= self.end:
            self.count += 1
            if self.keep:
                self.latencies.append(now - sent_at)


def receive_raw(sub: zmq.Socket, window: Window) -> None:
    """Drain `sub` (plain msgpack state messages) into `window` until the window has closed."""
    while time.time() < window.end + 0.2:
        if not sub.poll(50):
            continue
        for i in range(1000):  # as entanglement.drain: ZMQ_EVENTS after the first, then until zmq.Again
            try:
                frame = sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            sender, _key, _seq, sent_at, _payload = msgpack.unpackb(frame, raw=False)
            window.seen(sender, sent_at)
            if i == 0 and not sub.get(zmq.EVENTS) & zmq.POLLIN:
                break


def publish_loop(publish: Any, start: float, end: float, period: float | None) -> None:
    """Call `publish()` from `start` to `end`, flat out or every `period` seconds."""
    time.sleep(max(0.0, start - time.time()))
    next_t = time.time()
    while True:
        now = time.time()
        if now >= end:
            return
        publish()
        if period is not None:
            next_t += period
            delay = next_t - time.time()
            if delay > 0:
                time.sleep(delay)


def publish_while_receiving(publish: Any, sub: zmq.Socket, window: Window, start: float,
                            period: float | None) -> None:
    """Raw setups: `publish` runs in a thread while this one drains `sub` into `window`."""
    thread = threading.Thread(target=publish_loop, args=(publish, start, window.end + 0.1, period))
    thread.start()
    receive_raw(sub, window)
    thread.join()


# -- agent processes ------------------------------------------------------------------------


def agent_main(conn: Connection, index: int) -> None:
    """One agent process: obeys ("raw-bind"|"raw-run"|"fwd-run"|"bus-run"|"quit", args)."""
    agent = f"a{index}"
    payload = state_payload()
    ctx = zmq.Context()
    pub: zmq.Socket | None = None
    while True:
        cmd, args = conn.recv()
        if cmd == "quit":
            break
        if cmd == "raw-bind":
            pub = ctx.socket(zmq.PUB)
            pub.sndhwm, pub.linger = HWM, 0
            port = pub.bind_to_random_port("tcp://127.0.0.1")
            conn.send(f"tcp://127.0.0.1:{port}")
        elif cmd == "raw-run":
            assert pub is not None
            conn.send(run_raw_agent(ctx, pub, agent, payload, conn, **args))
            pub.close(linger=0)
            pub = None
        elif cmd == "fwd-run":
            conn.send(run_fwd_agent(ctx, agent, payload, conn, **args))
        elif cmd == "bus-run":
            conn.send(run_bus_agent(agent, payload, conn, **args))
    ctx.term()


def run_raw_agent(ctx: zmq.Context, pub: zmq.Socket, agent: str, payload: dict, conn: Connection,
                  peers: list[str], seconds: float, period: float | None) -> tuple[int, list[float]]:
    sub = ctx.socket(zmq.SUB)
    sub.rcvhwm, sub.linger = HWM, 0
    sub.subscribe(b"")
    for ep in peers:
        sub.connect(ep)
    time.sleep(0.3)  # slow joiner: let the subscriptions reach every publisher
    conn.send("ready")
    start = conn.recv()
    window = Window(agent, start + WARMUP_S, start + WARMUP_S + seconds, period is not None)
    key = f"agent/{agent}/phase"

    def publish() -> None:
        body = msgpack.packb([agent, key, 0, time.time(), payload], use_bin_type=True)
        try:
            pub.send(body, zmq.NOBLOCK)
        except zmq.Again:  # a full queue: the update is lost, as a raw PUB would lose it
            window.dropped += 1

    publish_while_receiving(publish, sub, window, start, period)
    sub.close(linger=0)
    return window.count, window.latencies


def run_fwd_agent(ctx: zmq.Context, agent: str, payload: dict, conn: Connection, push_ep: str,
                  sub_ep: str, seconds: float, period: float | None) -> tuple[int, list[float]]:
    """Raw pyzmq + msgpack through a central forwarder: PUSH in, SUB out (own updates too)."""
    push = ctx.socket(zmq.PUSH)
    push.sndhwm, push.linger = HWM, 0
    push.connect(push_ep)
    sub = ctx.socket(zmq.SUB)
    sub.rcvhwm, sub.linger = HWM, 0
    sub.subscribe(b"")
    sub.connect(sub_ep)
    time.sleep(0.3)  # slow joiner: let the subscription reach the forwarder
    conn.send("ready")
    start = conn.recv()
    window = Window(agent, start + WARMUP_S, start + WARMUP_S + seconds, period is not None)
    key = f"agent/{agent}/phase"
    lock = threading.Lock()  # zmq sockets are not thread-safe; publish happens in a thread

    def publish() -> None:
        body = msgpack.packb([agent, key, 0, time.time(), payload], use_bin_type=True)
        with lock:
            try:
                push.send(body, zmq.NOBLOCK)
            except zmq.Again:  # a full queue: the update is lost (counted, not retried)
                window.dropped += 1

    publish_while_receiving(publish, sub, window, start, period)
    push.close(linger=0)
    sub.close(linger=0)
    return window.count, window.latencies


def run_bus_agent(agent: str, payload: dict, conn: Connection, config: dict,
                  credentials: dict | None, seconds: float,
                  period: float | None) -> tuple[int, list[float]]:
    cfg = BusConfig.from_dict(config)
    creds = NodeCredentials.from_dict(credentials) if credentials else None
    holder: list[Window] = []

    def on_update(u: Any) -> None:
        if holder and u.payload is not None:
            holder[0].seen(u.agent, u.timestamp)

    node = BusNode(agent, cfg, creds, on_update=on_update)
    if not node.wait_active(10):
        raise RuntimeError(f"{agent}: bus node not active")
    conn.send("ready")
    start = conn.recv()
    window = Window(agent, start + WARMUP_S, start + WARMUP_S + seconds, period is not None)
    holder.append(window)
    publish_loop(lambda: node.publish("phase", payload), start, window.end + 0.1, period)
    time.sleep(0.2)
    node.close()
    return window.count, window.latencies


# -- coordinator ----------------------------------------------------------------------------


@dataclass
class Sample:
    updates_per_s: float
    p50_ms: float
    p99_ms: float


def gather(conns: list[Connection], seconds: float) -> Sample:
    for c in conns:
        assert c.recv() == "ready"
    start = time.time() + SETUP_S
    for c in conns:
        c.send(start)
    results = [c.recv() for c in conns]
    lat = np.array([x for _, lats in results for x in lats]) * 1000.0
    p50, p99 = np.percentile(lat, [50, 99]) if lat.size else (float("nan"), float("nan"))
    total = sum(count for count, _ in results)
    return Sample(total / (len(conns) - 1) / seconds, float(p50), float(p99))


def run_raw(conns: list[Connection], seconds: float, period: float | None) -> Sample:
    for c in conns:
        c.send(("raw-bind", None))
    endpoints = [c.recv() for c in conns]
    for i, c in enumerate(conns):
        peers = [ep for j, ep in enumerate(endpoints) if j != i]
        c.send(("raw-run", dict(peers=peers, seconds=seconds, period=period)))
    return gather(conns, seconds)


def run_fwd(conns: list[Connection], seconds: float, period: float | None) -> Sample:
    """A PULL -> PUB forwarder (zmq.proxy, in C) in this process, like the bus hub."""
    ctx = zmq.Context()
    pull, pub = ctx.socket(zmq.PULL), ctx.socket(zmq.PUB)
    for s in (pull, pub):
        s.sndhwm = s.rcvhwm = HWM
        s.linger = 0
    push_ep = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    sub_ep = f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"

    def forward() -> None:
        try:
            zmq.proxy(pull, pub)
        except zmq.ContextTerminated:
            pass  # the run is over: ctx.term() below ends the proxy
        finally:
            pull.close(linger=0)
            pub.close(linger=0)

    proxy = threading.Thread(target=forward, daemon=True)
    proxy.start()
    try:
        for c in conns:
            c.send(("fwd-run", dict(push_ep=push_ep, sub_ep=sub_ep, seconds=seconds,
                                    period=period)))
        return gather(conns, seconds)
    finally:
        ctx.term()
        proxy.join(5)


def run_bus(conns: list[Connection], seconds: float, period: float | None, security: str) -> Sample:
    config = BusConfig(endpoints=BusEndpoints.tcp(), security=security, hwm=HWM,
                       heartbeat_interval=0.2, hub_timeout=5.0, ttl=10.0, snapshot_timeout=5.0)
    with BusHub(config) as hub:
        creds = hub.credentials()
        for c in conns:
            c.send(("bus-run", dict(config=hub.config.to_dict(),
                                    credentials=creds.to_dict() if creds else None,
                                    seconds=seconds, period=period)))
        return gather(conns, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="measurement window per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (median)")
    parser.add_argument("--agents", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="total paced updates/s (all agents together) for the latency runs")
    args = parser.parse_args(argv)
    setups = {
        "raw p2p (no hub)": lambda c, s, p: run_raw(c, s, p),
        "raw fwd (zmq.proxy)": lambda c, s, p: run_fwd(c, s, p),
        "bus, CURVE off": lambda c, s, p: run_bus(c, s, p, "none"),
        "bus, CURVE on": lambda c, s, p: run_bus(c, s, p, "curve"),
    }
    load = os.getloadavg()[0]
    ticks = cpu_ticks()
    print(f"# entanglement bus: one process per agent, hub in the coordinator, tcp loopback; "
          f"{args.seconds}s windows, median of {args.repeats}; latency at {args.rate:.0f} "
          f"updates/s in total")
    print(f"# {os.cpu_count()} CPUs, load average {load:.1f} at start; pyzmq {zmq.__version__}, "
          f"libzmq {zmq.zmq_version()}, msgpack {'.'.join(map(str, msgpack.version))}")
    print("# raw p2p: direct PUB/SUB agent to agent, NO hub hop, no validation (an upper bound); "
          "raw fwd: PUSH -> zmq.proxy PULL->PUB forwarder -> SUB, no validation (the fair "
          "baseline for a hub design); vs fwd / vs p2p: updates/s relative to those rows")
    header = (f"{'agents':>6}  {'setup':<19} {'updates/s':>10} {'vs fwd':>7} {'vs p2p':>7} "
              f"{'p50 ms':>7} {'p99 ms':>7} {'steal':>6}")
    print(header)
    print("-" * len(header))
    spawn = mp.get_context("spawn")
    for n in args.agents:
        pipes = [spawn.Pipe() for _ in range(n)]
        procs = [spawn.Process(target=agent_main, args=(child, i), daemon=True)
                 for i, (_, child) in enumerate(pipes)]
        for p in procs:
            p.start()
        conns = [parent for parent, _ in pipes]
        try:
            thr: dict[str, list[float]] = {name: [] for name in setups}
            lat: dict[str, list[Sample]] = {name: [] for name in setups}
            steal: dict[str, list[float]] = {name: [] for name in setups}
            order = list(setups)
            for r in range(args.repeats):  # in turns, each repeat starting one setup later
                for name in order[r % len(order):] + order[:r % len(order)]:
                    run = setups[name]
                    thr[name].append(run(conns, args.seconds, None).updates_per_s)
                    with StealMeter() as meter:
                        lat[name].append(run(conns, args.seconds, n / args.rate))
                    if meter.share is not None:
                        steal[name].append(meter.share)
            rates = {name: statistics.median(v) for name, v in thr.items()}
            p2p, fwd = rates["raw p2p (no hub)"], rates["raw fwd (zmq.proxy)"]
            for name in order:
                rate = rates[name]
                vs_fwd = f"{rate / fwd:>6.2f}x" if name != "raw p2p (no hub)" else f"{'-':>7}"
                p50 = statistics.median(s.p50_ms for s in lat[name])
                p99 = statistics.median(s.p99_ms for s in lat[name])
                st = percent(statistics.median(steal[name]) if steal[name] else None)
                print(f"{n:>6}  {name:<19} {rate:>10,.0f} {vs_fwd} {rate / p2p:>6.2f}x "
                      f"{p50:>7.3f} {p99:>7.3f} {st:>6}", flush=True)
        finally:
            for c in conns:
                c.send(("quit", None))
            for p in procs:
                p.join(10)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end; the whole run: CPU steal "
          f"{percent(steal_share(ticks, cpu_ticks()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
