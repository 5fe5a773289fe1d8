"""Reading what waits on a socket that a poll found readable, without a ``zmq.Again`` per wake-up.

The hub and the nodes wake in a poll and then read every message that waits on the readable
socket, up to a budget (so no socket starves the others). Reading until a non-blocking receive
raises ``zmq.Again`` is the usual way to end such a drain, but raising it costs more than the
message it ends: in the paced latency benchmark every wake-up brings one message, so that
exception was a large part of a node's CPU per update (measured in a receiving process at 1,000
updates/s: about 20 us of the node thread's 120 us per update). Instead, after each message,
``ZMQ_EVENTS`` says whether another one waits (a few microseconds, no exception). A
``zmq.Again`` still ends the drain if the poll's readiness went stale.
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
    for _ in range(limit):
        try:
            message = receive(zmq.NOBLOCK, copy=copy)
        except zmq.Again:  # the poll said readable, but nothing is left (a stale readiness)
            return
        yield message
        if not waiting(sock):
            return
