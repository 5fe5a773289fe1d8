"""CURVE keys made per run, and the hub's ZAP handler that admits only the run's clients.

Who holds what:
- `BusKeys` (the whole run): the hub's key pair and one key pair per client name. Made with
  `zmq.curve_keypair()` by whoever starts the run, kept by the hub.
- `NodeCredentials` (one node): the hub's public key and that client's own pair. This is what
  is handed to an agent (a plain dict through `to_dict`, e.g. as a Ray actor argument).

CURVE without ZAP would accept any client that knows the hub's public key, so the hub always runs
a `ZapHandler` (RFC 27) in its own poll loop when security is on: a CURVE client whose public
key is not one of the run's is answered 400 and its connection is dropped. A client that does
not speak CURVE at all fails the handshake before ZAP is asked. Note that libzmq performs no
handshake over inproc://, so neither CURVE nor ZAP applies there (same process, same context).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils import z85

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"reso-bus"
# The run-wide client credential: whoever holds it may speak for any agent id. Credentials made
# under any other name (`BusKeys.add_client(agent_id)`) bind their holder to that agent id: the
# hub refuses updates and heartbeats they send for another agent (see `BusHub`).
SHARED_CLIENT = "default"


class SecurityError(RuntimeError):
    """Security is misconfigured (e.g. CURVE requested without keys, or CURVE unavailable)."""


def require_curve() -> None:
    """Raise `SecurityError` if this libzmq was built without CURVE."""
    if not zmq.has("curve"):
        raise SecurityError("libzmq was built without CURVE; use security='none' explicitly")


@dataclass(frozen=True)
class CurveKeyPair:
    """A CURVE key pair, both keys Z85-encoded text (40 characters)."""

    public: str
    secret: str

    @classmethod
    def generate(cls) -> CurveKeyPair:
        require_curve()
        public, secret = zmq.curve_keypair()
        return cls(public.decode("ascii"), secret.decode("ascii"))


@dataclass(frozen=True)
class NodeCredentials:
    """What one node needs: the hub's public key and its own client key pair."""

    server_public: str
    client: CurveKeyPair

    def to_dict(self) -> dict[str, str]:
        return {
            "server_public": self.server_public,
            "client_public": self.client.public,
            "client_secret": self.client.secret,
        }

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> NodeCredentials:
        try:
            return cls(data["server_public"], CurveKeyPair(data["client_public"], data["client_secret"]))
        except KeyError as exc:
            raise SecurityError(f"node credentials lack {exc}") from exc

    def apply(self, socket: zmq.Socket) -> None:
        """Make `socket` a CURVE client of the hub."""
        socket.curve_serverkey = self.server_public.encode("ascii")
        socket.curve_publickey = self.client.public.encode("ascii")
        socket.curve_secretkey = self.client.secret.encode("ascii")


@dataclass
class BusKeys:
    """All CURVE keys of one run: the hub's pair and the pairs of the allowed clients."""

    server: CurveKeyPair
    clients: dict[str, CurveKeyPair] = field(default_factory=dict)

    @classmethod
    def generate(cls, client_names: Iterable[str] = (SHARED_CLIENT,)) -> BusKeys:
        """Fresh keys: one hub pair, one client pair per name. `SHARED_CLIENT` ("default") is
        the run-wide credential any agent may use; any other name binds its holder to the agent
        id of that name (the hub rejects what it sends for other agents)."""
        return cls(CurveKeyPair.generate(), {n: CurveKeyPair.generate() for n in client_names})

    def add_client(self, name: str) -> NodeCredentials:
        """Make (or return) the pair for `name`. For a running hub use `hub.add_client(name)`,
        which also admits the new key."""
        if name not in self.clients:
            self.clients[name] = CurveKeyPair.generate()
        return self.credentials(name)

    def credentials(self, name: str = SHARED_CLIENT) -> NodeCredentials:
        if name not in self.clients:
            raise SecurityError(f"no client key pair named {name!r}; known: {sorted(self.clients)}")
        return NodeCredentials(self.server.public, self.clients[name])

    def allowed_public_keys(self) -> set[bytes]:
        return set(self.client_names())

    def client_names(self) -> dict[bytes, str]:
        """Public key (z85, bytes) -> the client name it was issued under."""
        return {pair.public.encode("ascii"): name for name, pair in self.clients.items()}

    def apply_server(self, socket: zmq.Socket) -> None:
        """Make `socket` a CURVE server whose clients are checked by ZAP."""
        socket.curve_server = True
        socket.curve_publickey = self.server.public.encode("ascii")
        socket.curve_secretkey = self.server.secret.encode("ascii")
        socket.zap_domain = ZAP_DOMAIN

    def to_dict(self) -> dict[str, Any]:
        return {
            "server": {"public": self.server.public, "secret": self.server.secret},
            "clients": {n: {"public": p.public, "secret": p.secret} for n, p in self.clients.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BusKeys:
        try:
            return cls(
                CurveKeyPair(**data["server"]),
                {n: CurveKeyPair(**p) for n, p in data["clients"].items()},
            )
        except (KeyError, TypeError) as exc:
            raise SecurityError(f"invalid BusKeys dict: {exc}") from exc


class ZapHandler:
    """RFC 27 ZAP handler; `handle()` is called from the hub's poll loop when `socket` is readable.

    Allows CURVE clients whose public key is in the allowed set, refuses everything else (and
    counts refusals). `allow()` may be called from any thread.
    """

    def __init__(self, context: zmq.Context, allowed: Mapping[bytes, str]) -> None:
        # public key -> client name, answered as the ZAP User-Id (the hub binds it to an agent id)
        self._allowed = dict(allowed)
        self._lock = threading.Lock()
        self.accepted = 0
        self.denied = 0
        self.socket = context.socket(zmq.REP)
        self.socket.linger = 0
        try:
            self.socket.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self.socket.close()
            raise SecurityError(
                f"cannot bind the ZAP handler ({exc}); is another hub using this context?"
            ) from exc

    def allow(self, public_key: str | bytes, name: str = SHARED_CLIENT) -> None:
        key = public_key.encode("ascii") if isinstance(public_key, str) else public_key
        with self._lock:
            self._allowed[key] = name

    def handle(self) -> None:
        """Answer one pending ZAP request."""
        frames = self.socket.recv_multipart()
        if len(frames) < 6:
            log.debug("ZAP: short request of %d frames", len(frames))
            self.denied += 1
            request_id = frames[1] if len(frames) > 1 else b""
            self.socket.send_multipart([b"1.0", request_id, b"400", b"bad request", b"", b""])
            return
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        credentials = frames[6:]
        ok = version == b"1.0" and mechanism == b"CURVE" and len(credentials) == 1
        if ok:
            key = z85.encode(credentials[0]) if len(credentials[0]) == 32 else b""
            with self._lock:
                name = self._allowed.get(key)
            ok = name is not None
        if ok:
            self.accepted += 1
            self.socket.send_multipart([b"1.0", request_id, b"200", b"OK", name.encode(), b""])
        else:
            self.denied += 1
            log.debug("ZAP: refused %s client from %r (domain %r)", mechanism, address, domain)
            self.socket.send_multipart([b"1.0", request_id, b"400", b"not allowed", b"", b""])

    def close(self) -> None:
        self.socket.close(linger=0)
