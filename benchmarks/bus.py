"""Entanglement bus against raw pyzmq + msgpack PUB/SUB, measured side by side in one run.

For 2, 4, 8 and 16 agents (all in this process, one publisher thread and one receiver per
agent, tcp over loopback) three setups carry the same state update (16 float32 phases as bytes,
16 sedenion floats, coherence, step; about 240 bytes packed):

  raw        each agent PUB-binds, every agent SUB-connects to all others; msgpack pack/unpack
  bus none   BusHub + BusNode, security "none"
  bus curve  BusHub + BusNode, CURVE + ZAP (the default)

updates/s: every publisher sends as fast as it can for --seconds; the figure is the number of
  peer updates each agent received per second (deliveries from others / (agents - 1)), i.e. the
  rate at which state propagates to everyone. PUB drops above the HWM are not counted.
p50/p99: latency from publish (the update's timestamp) to the receiver's callback, with all
  agents together publishing a paced --rate updates/s (default 1000) for --seconds.

Every cell is the median over --repeats runs. Python threads share one GIL and this machine's
cores, so absolute numbers are a floor: agents in separate processes scale further.

    python benchmarks/bus.py [--seconds 1.5] [--repeats 3] [--agents 2 4 8 16] [--rate 1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from entanglement import BusConfig, BusEndpoints, BusHub, BusNode, StateUpdate  # noqa: E402

HWM = 100_000
WARMUP_S = 0.3


def state_payload(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {
        "phases": rng.uniform(0, 6.283, 16).astype("<f4").tobytes(),
        "sedenion": rng.standard_normal(16).tolist(),
        "coherence": 0.5,
        "step": step,
    }


@dataclass
class Sample:
    updates_per_s: float
    p50_ms: float
    p99_ms: float


class Receiver:
    """Counts deliveries from other agents and records latencies while `recording` is set."""

    def __init__(self, agent: str) -> None:
        self.agent = agent
        self.count = 0
        self.latencies: list[float] = []
        self.recording = False

    def seen(self, sender: str, timestamp: float) -> None:
        if sender != self.agent and self.recording:
            self.count += 1
            self.latencies.append(time.time() - timestamp)


def drive(publishers: list[Callable[[int], None]], receivers: list[Receiver], seconds: float,
          rate: float | None) -> Sample:
    """Run all publishers (blast, or paced at `rate` in total) and measure at the receivers."""
    stop = threading.Event()

    def loop(publish: Callable[[int], None]) -> None:
        period = None if rate is None else len(publishers) / rate
        step, next_t = 0, time.perf_counter()
        while not stop.is_set():
            publish(step)
            step += 1
            if period is not None:
                next_t += period
                delay = next_t - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)

    threads = [threading.Thread(target=loop, args=(p,), daemon=True) for p in publishers]
    for t in threads:
        t.start()
    time.sleep(WARMUP_S)
    for r in receivers:
        r.count, r.latencies, r.recording = 0, [], True
    t0 = time.perf_counter()
    time.sleep(seconds)
    for r in receivers:
        r.recording = False
    elapsed = time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join(5)
    n = len(receivers)
    lat = np.array([x for r in receivers for x in r.latencies]) * 1000.0
    p50, p99 = (np.percentile(lat, [50, 99]) if lat.size else (float("nan"),) * 2)
    return Sample(sum(r.count for r in receivers) / (n - 1) / elapsed, float(p50), float(p99))


def run_raw(n: int, seconds: float, rate: float | None) -> Sample:
    ctx = zmq.Context()
    pubs, endpoints = [], []
    for _ in range(n):
        pub = ctx.socket(zmq.PUB)
        pub.sndhwm = HWM
        pub.linger = 0
        endpoints.append(f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}")
        pubs.append(pub)
    receivers = [Receiver(f"a{i}") for i in range(n)]
    subs = []
    for i in range(n):
        sub = ctx.socket(zmq.SUB)
        sub.rcvhwm = HWM
        sub.linger = 0
        sub.subscribe(b"")
        for j, ep in enumerate(endpoints):
            if j != i:
                sub.connect(ep)
        subs.append(sub)
    stop = threading.Event()

    def receive(sub: zmq.Socket, rec: Receiver) -> None:
        while not stop.is_set():
            if not sub.poll(50):
                continue
            for _ in range(1000):
                try:
                    frame = sub.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                agent, _key, _seq, ts, _payload = msgpack.unpackb(frame, raw=False)
                rec.seen(agent, ts)

    def publisher(i: int) -> Callable[[int], None]:
        pub, agent = pubs[i], f"a{i}"

        def publish(step: int) -> None:
            body = msgpack.packb([agent, f"agent/{agent}/phase", step, time.time(),
                                  state_payload_cached], use_bin_type=True)
            try:
                pub.send(body, zmq.NOBLOCK)
            except zmq.Again:
                pass
        return publish

    threads = [threading.Thread(target=receive, args=(s, r), daemon=True)
               for s, r in zip(subs, receivers)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # slow joiner: let every subscription reach its publishers
    try:
        return drive([publisher(i) for i in range(n)], receivers, seconds, rate)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        for s in subs + pubs:
            s.close(linger=0)
        ctx.term()


def run_bus(n: int, seconds: float, rate: float | None, security: str) -> Sample:
    config = BusConfig(endpoints=BusEndpoints.tcp(), security=security, hwm=HWM,
                       heartbeat_interval=0.2, hub_timeout=5.0, ttl=10.0, snapshot_timeout=5.0)
    hub = BusHub(config).start()
    receivers = [Receiver(f"a{i}") for i in range(n)]
    nodes = []
    try:
        for rec in receivers:
            def callback(u: StateUpdate, rec: Receiver = rec) -> None:
                if u.payload is not None:
                    rec.seen(u.agent, u.timestamp)
            nodes.append(BusNode(rec.agent, hub.config, hub.credentials(), on_update=callback))
        for node in nodes:
            if not node.wait_active(10):
                raise RuntimeError(f"bus node {node.agent_id} did not become active")

        def publisher(node: BusNode) -> Callable[[int], None]:
            return lambda step: node.publish("phase", state_payload_cached)

        return drive([publisher(nd) for nd in nodes], receivers, seconds, rate)
    finally:
        for node in nodes:
            node.close()
        hub.stop()


state_payload_cached = state_payload(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="measurement window per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (median)")
    parser.add_argument("--agents", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="total paced updates/s for the latency runs")
    args = parser.parse_args(argv)
    setups: dict[str, Callable[[int, float, float | None], Sample]] = {
        "raw pyzmq+msgpack": run_raw,
        "bus, CURVE off": lambda n, s, r: run_bus(n, s, r, "none"),
        "bus, CURVE on": lambda n, s, r: run_bus(n, s, r, "curve"),
    }
    print(f"# entanglement bus benchmark: tcp loopback, {args.seconds}s windows, median of "
          f"{args.repeats}; latency at {args.rate:.0f} updates/s in total; "
          f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, msgpack "
          f"{'.'.join(map(str, msgpack.version))}")
    header = f"{'agents':>6}  {'setup':<18} {'updates/s':>10} {'vs raw':>7} {'p50 ms':>7} {'p99 ms':>7}"
    print(header)
    print("-" * len(header))
    for n in args.agents:
        raw_rate = None
        for name, run in setups.items():
            thr = [run(n, args.seconds, None).updates_per_s for _ in range(args.repeats)]
            lat = [run(n, args.seconds, args.rate) for _ in range(args.repeats)]
            rate = statistics.median(thr)
            raw_rate = raw_rate or rate
            p50 = statistics.median(s.p50_ms for s in lat)
            p99 = statistics.median(s.p99_ms for s in lat)
            print(f"{n:>6}  {name:<18} {rate:>10,.0f} {rate / raw_rate:>6.2f}x "
                  f"{p50:>7.3f} {p99:>7.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
