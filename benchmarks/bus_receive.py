"""CPU a receiving process spends per state update: a BusNode against a plain SUB socket.

The bus's latency tail at 8 agents forms on the receiving side (see the README). On a machine
with fewer cores than processes, every microsecond of CPU a receiver spends per update delays
everyone else, so this measures that cost alone. A hub runs in one process and a feeder in
another, pushing ``--rate`` encoded updates per second (the bus's wire format, about 280 bytes)
for ``--seconds``; the measured process either

  raw SUB   subscribes to the hub's PUB socket and unpacks each batch frame with msgpack in a
            thread of its own (poll, then read as the node does, see entanglement.drain): no
            validation, no sequencing, no replica, or
  BusNode   runs a real node (security "none" for both, so encryption does not enter), whose
            thread validates and sequences each batch, applies it to the replica and calls an
            update callback.

"CPU us / update" is the measured process's CPU time (every thread, libzmq's I/O thread
included) over the updates it received; each row's median over --repeats runs in alternating
order, "vs raw" the median of each repeat's ratio.

A second table shows why the bus reads a readable socket with ``entanglement.drain``: a
receiver thread that polls a PULL socket fed at --rate messages/s (one message per wake-up, as
in the paced latency benchmark) and reads until ``zmq.Again`` is raised, against the same thread
reading with ``drain()`` (which asks ``ZMQ_EVENTS`` after the first message and so raises nothing
when one message came); the thread's CPU time per message, in alternating runs. The same
again with the feeder sending flat out, where a wake-up finds many messages waiting: there
``drain()`` must cost no more than reading until ``zmq.Again`` (asking ``ZMQ_EVENTS`` after every
message would).

    python benchmarks/bus_receive.py [--rate 1000] [--seconds 2] [--repeats 5]   # about 1.5 minutes
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import threading
import time
from pathlib import Path

import msgpack
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bus import state_payload  # noqa: E402  (the same update as benchmarks/bus.py)
from entanglement import BusConfig, BusHub, BusNode  # noqa: E402
from entanglement.drain import drain  # noqa: E402
from entanglement.message import encode_update  # noqa: E402
from host import StealMeter, percent  # noqa: E402  (benchmarks/host.py)


def hub_process(config_out, stop_in) -> None:
    hub = BusHub(BusConfig(security="none")).start()
    config_out.put(hub.config.to_dict())
    stop_in.get()
    hub.stop()


def feeder_process(collect: str, go_in, rate: float, seconds: float) -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(collect)
    payload = state_payload()
    go_in.get()
    next_t = time.time()
    for _ in range(int(rate * seconds)):
        push.send(encode_update("feed", "agent/feed/phase", payload))
        next_t += 1.0 / rate
        delay = next_t - time.time()
        if delay > 0:
            time.sleep(delay)
    push.close(linger=1000)
    ctx.term()


def start_raw_receiver(config: BusConfig, count: list[int]):
    """A plain SUB socket drained by a thread of its own; returns the function that stops it."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.subscribe(b"")
    sub.connect(config.endpoints.publish)
    time.sleep(0.3)  # slow joiner
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            if not sub.poll(50):
                continue
            first = True
            while True:  # as entanglement.drain: ZMQ_EVENTS after the first, then until zmq.Again
                try:
                    frame = sub.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                # [version, epoch, last_seq, [update, ...]]: one msgpack array per batch
                count[0] += len(msgpack.unpackb(frame, raw=False)[3])
                if first and not sub.get(zmq.EVENTS) & zmq.POLLIN:
                    break
                first = False

    thread = threading.Thread(target=receive)
    thread.start()

    def close() -> None:
        stop.set()
        thread.join()
        sub.close(linger=0)
        ctx.term()
    return close


def start_node(config: BusConfig, count: list[int]):
    """A BusNode counting the updates it applies; returns the function that closes it."""
    node = BusNode("reader", config, None, on_update=lambda u: count.__setitem__(0, count[0] + 1))
    if not node.wait_active(10):
        raise RuntimeError("bus node not active")
    time.sleep(0.3)
    return node.close


def measure(kind: str, config: BusConfig, rate: float, seconds: float) -> float:
    """One run: CPU microseconds of this process per update received."""
    spawn = mp.get_context("spawn")
    go = spawn.Queue()
    feeder = spawn.Process(target=feeder_process, args=(config.endpoints.collect, go, rate, seconds))
    feeder.start()
    count = [0]
    close = start_node(config, count) if kind == "BusNode" else start_raw_receiver(config, count)
    try:
        c0 = time.process_time()
        go.put(1)
        feeder.join()
        time.sleep(0.1)  # the last updates in flight
        used = time.process_time() - c0
    finally:
        close()
    if count[0] < 0.9 * rate * seconds:
        raise RuntimeError(f"{kind}: received {count[0]} of {int(rate * seconds)} updates")
    return used / count[0] * 1e6


FLAT_OUT = 100_000  # messages (a --rate of this many per second for 1 s: the feeder never sleeps)


def drain_cost(rate: float, seconds: float, repeats: int) -> dict[str, list[float]]:
    """Thread CPU per message of a poll-and-drain receiver (a PULL fed at ``rate`` messages/s,
    so one message per wake-up) that ends each drain on ``zmq.Again`` or reads with
    ``entanglement.drain`` (``ZMQ_EVENTS`` after the first message), in alternating runs over one socket."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    spawn = mp.get_context("spawn")
    kinds = ["zmq.Again", "drain()"]
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    n = int(rate * seconds)
    try:
        for i in range(repeats):
            for kind in kinds if i % 2 == 0 else kinds[::-1]:
                go = spawn.Queue()
                feeder = spawn.Process(target=feeder_process, args=(f"tcp://127.0.0.1:{port}", go, rate, seconds))
                feeder.start()
                time.sleep(0.3)  # connected
                got, use_drain = 0, kind == "drain()"
                go.put(1)
                c0 = time.thread_time()
                while got < n and (feeder.is_alive() or dict(poller.poll(0))):
                    if not dict(poller.poll(50)):
                        continue
                    if use_drain:
                        for _ in drain(pull, 1000):
                            got += 1
                        continue
                    while True:
                        try:
                            pull.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        got += 1
                used = time.thread_time() - c0
                feeder.join()
                if got < 0.9 * n:
                    raise RuntimeError(f"drain ({kind}): received {got} of {n} messages")
                samples[kind].append(used / got * 1e6)
    finally:
        pull.close(linger=0)
        ctx.term()
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    spawn = mp.get_context("spawn")
    config_q, stop_q = spawn.Queue(), spawn.Queue()
    hub = spawn.Process(target=hub_process, args=(config_q, stop_q))
    hub.start()
    config = BusConfig.from_dict(config_q.get(timeout=30))
    kinds = ["raw SUB", "BusNode"]
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        with StealMeter() as steal:
            for i in range(args.repeats):
                for kind in kinds if i % 2 == 0 else kinds[::-1]:
                    samples[kind].append(measure(kind, config, args.rate, args.seconds))
    finally:
        stop_q.put(1)
        hub.join(10)
    print(f"# CPU of the receiving process per update, {args.rate:g} updates/s for {args.seconds:g} s, "
          f"median of {args.repeats}; security none; pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}; "
          f"CPU steal {percent(steal.share)}")
    print(f"{'receiver':10s} {'CPU us / update':>16s} {'vs raw':>8s}")
    for kind in kinds:
        ratio = statistics.median(a / b for a, b in zip(samples[kind], samples["raw SUB"]))
        print(f"{kind:10s} {statistics.median(samples[kind]):16.1f} {ratio:7.2f}x")
    print(f"\n# Reading a readable PULL socket over tcp: thread CPU per message, median of {2 * args.repeats};"
          f" paced: {args.rate:g} messages/s for {args.seconds:g} s (one per wake-up); flat out:"
          f" {FLAT_OUT:,} messages sent as fast as the feeder can")
    print(f"{'feed':8s} {'read with':10s} {'CPU us / message':>17s} {'vs Again':>9s}")
    for feed, rate, seconds in (("paced", args.rate, args.seconds), ("flat out", FLAT_OUT, 1.0)):
        with StealMeter() as steal:
            drains = drain_cost(rate, seconds, 2 * args.repeats)
        for kind, values in drains.items():
            ratio = statistics.median(a / b for a, b in zip(values, drains["zmq.Again"]))
            print(f"{feed:8s} {kind:10s} {statistics.median(values):17.2f} {ratio:8.2f}x")
        print(f"# {feed}: CPU steal {percent(steal.share)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
