"""Reading what waits on a socket that a poll found readable, without a ``zmq.Again`` per wake-up.

The hub and the nodes wake in a poll and then read every message that waits on the readable
socket, up to a budget (so no socket starves the others). Reading until a non-blocking receive
raises ``zmq.Again`` is the usual way to end such a drain, but raising it costs more than the message
it ends when a wake-up brings one message, as every wake-up does in the paced latency
benchmark (a few microseconds; ``benchmarks/bus_receive.py``, second table, measures both ways
of reading). Asking ``ZMQ_EVENTS`` after every message costs a few microseconds each instead, which
under load (thousands of messages per wake-up, one update each for an unbatched stream) cut a
raw PUB/SUB stream's throughput about threefold in a diagnostic run. So the drain asks once,
after the first message: if nothing else waits, it ends there (no exception); if more wait, it
reads on until ``zmq.Again``, one exception for many messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import zmq


def waiting(sock: zmq.Socket) -> bool:
    """Whether a message waits on ``sock`` now (``ZMQ_EVENTS`` has ``POLLIN``)."""
    return bool(sock.get(zmq.EVENTS) & zmq.POLLIN)


def drain(sock: zmq.Socket, limit: int, multipart: bool = False, copy: bool = True) -> Iterator[Any]:
    """The messages waiting on ``sock``, at most ``limit``: frames (``bytes``, or a ``zmq.Frame``
    when not ``copy``), or lists of frames when ``multipart``. The caller may stop early."""
    receive = sock.recv_multipart if multipart else sock.recv
    for i in range(limit):
        try:
            message = receive(zmq.NOBLOCK, copy=copy)
        except zmq.Again:  # nothing is left (or the poll's readiness was stale)
            return
        yield message
        if i == 0 and not waiting(sock):  # the usual case when the traffic is light
            return
