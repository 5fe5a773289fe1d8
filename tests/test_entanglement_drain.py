"""entanglement.drain over real sockets: everything waiting is read, in order, within the limit."""

from __future__ import annotations

import time

import zmq

from entanglement.drain import drain, waiting


def _pair(ctx: zmq.Context, name: str) -> tuple[zmq.Socket, zmq.Socket]:
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"inproc://{name}")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"inproc://{name}")
    return push, pull


def _until_waiting(sock: zmq.Socket) -> None:
    deadline = time.monotonic() + 5
    while not waiting(sock):
        assert time.monotonic() < deadline, "nothing arrived"
        time.sleep(0.001)


def test_drain_reads_what_waits_in_order_and_stops_at_the_limit_or_when_empty() -> None:
    ctx = zmq.Context()
    try:
        push, pull = _pair(ctx, "drain-single")
        assert list(drain(pull, 10)) == []  # nothing waits: no zmq.Again escapes, nothing read
        for i in range(7):
            push.send(b"%d" % i)
        _until_waiting(pull)
        assert list(drain(pull, 5)) == [b"0", b"1", b"2", b"3", b"4"]  # the budget
        assert waiting(pull)
        assert list(drain(pull, 100)) == [b"5", b"6"]
        assert not waiting(pull)
        assert list(drain(pull, 100)) == []

        push.send_multipart([b"a", b"b"])
        push.send_multipart([b"c"])
        _until_waiting(pull)
        assert list(drain(pull, 10, multipart=True)) == [[b"a", b"b"], [b"c"]]

        push.send(b"frame")
        _until_waiting(pull)
        frames = list(drain(pull, 10, copy=False))
        assert len(frames) == 1 and isinstance(frames[0], zmq.Frame) and frames[0].bytes == b"frame"

        # a caller that stops early leaves the rest for the next drain
        for i in range(3):
            push.send(b"%d" % i)
        _until_waiting(pull)
        for message in drain(pull, 10):
            assert message == b"0"
            break
        assert list(drain(pull, 10)) == [b"1", b"2"]
        push.close(linger=0)
        pull.close(linger=0)
    finally:
        ctx.term()
