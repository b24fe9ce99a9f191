"""A TLS-terminating reverse proxy that forwards **only** Flower's Fleet API to a loopback SuperLink.

Why it exists. In flwr 1.41 one HTTP(S) port of the SuperLink serves three APIs: Fleet
(SuperNode <-> SuperLink, ``POST /v1/fleet/*``), Control (``/v1/control/*``: start runs,
register SuperNodes, ...) and the Runtime/ServerAppIo API. The Control API has no account
authentication in the open-source build, so anyone who reaches that port can register their
own SuperNode key (defeating ``--enable-supernode-auth``) or start a run. The SuperLink
therefore binds to 127.0.0.1 and this proxy is the only thing on the public interface.

What the SuperNode speaks (read from flwr 1.41, ``flwr/supernode/fleet_http_client.py`` and
``flwr/supercore/protobuf/client.py``): HTTP/1.1 over TLS (httpx), one unary
``POST /v1/fleet/<method>`` per call, body and reply serialized protobuf, node authentication
in headers (public key, signature over a timestamp) that the SuperLink verifies — nothing is
bound to the TLS connection, so terminating TLS here and re-encrypting to the loopback
SuperLink keeps node authentication intact. No streaming call exists on the Fleet API.

The rule is an allow-list of exact paths: ``POST`` + one of :data:`FLEET_PATHS` + no query
string; the request is forwarded to the canonical path from that list (never the raw one, so
``/v1/fleet/../control/...``, percent-encodings or doubled slashes cannot reach anything
else). Everything else gets 404 without touching the SuperLink. Hop-by-hop headers are dropped.

**Pull hold (long poll).** A SuperNode that finds no message sleeps 3 s before it asks again
(``time.sleep(3)`` in flwr 1.41's ``start_client_internal``, a constant), so every trip of a run
waited on average ~1.5 s for each node's sleep and ~2.3 s for the last of three. The proxy holds
an empty ``pull-messages`` answer for up to ``pull_hold`` seconds (default 10, below the
SuperNode's 30 s request timeout), asking the SuperLink again every :func:`repoll_interval` with
the node's own request (its signed timestamp stays valid for Flower's 300 s tolerance), and
answers as soon as a message is there: the node learns of a message within ~0.1 s instead of
~1.5 s. The re-poll interval grows with the number of held pulls so that the SuperLink sees at
most about :data:`MAX_REPOLLS_PER_S` requests per second however large the federation, and at
most 25 pulls are held at once (:data:`MAX_HOLD_INTERVAL_S`): in a larger federation the others
are answered as Flower's SuperLink answers them, so no node hears later than without the proxy. A message
pulled for a node that has meanwhile gone away is lost with the node: a dropout, as it would be
for a node that crashed after its own pull. ``pull_hold = 0`` forwards every pull as it comes.

Why our own and not nginx/Envoy/a PyPI proxy: the deployment must be installable from PyPI
alone (offline hospital sites, CI from a fresh clone with only the venv), and the proxies on
PyPI (proxy.py, mitmproxy, ...) are forward or debugging proxies with far more surface than an
allow-list of twelve POST paths. This one is ~150 lines on uvicorn + httpx, which Flower
itself already depends on (its SuperLink serves with uvicorn, its SuperNode calls with httpx),
so it adds no dependency. A site that prefers nginx can use the equivalent config in
docs/deploy.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys
import time
from pathlib import Path

import httpx

log = logging.getLogger("fedrec.fleet_proxy")

__all__ = ["FLEET_METHODS", "FLEET_PATHS", "FleetProxy", "is_fleet_request", "pull_is_empty", "repoll_interval",
           "serve", "main"]

#: the Fleet API's methods in flwr 1.41 (flwr/superlink/routers/fleet/router.py)
FLEET_METHODS = (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received",
)
FLEET_PATHS = frozenset(f"/v1/fleet/{m}" for m in FLEET_METHODS)

#: request headers never forwarded (hop-by-hop, or rewritten by the upstream client)
_DROP_REQUEST = frozenset({
    "host", "connection", "keep-alive", "proxy-authorization", "proxy-authenticate", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "content-length", "forwarded", "x-forwarded-for",
    "x-forwarded-host", "x-forwarded-proto", "x-real-ip",
})
_DROP_RESPONSE = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "trailer",
                            "content-length", "server", "date"})

#: largest request body forwarded (Flower chunks objects far below this)
MAX_BODY = 512 * 1024 * 1024

PULL_PATH = "/v1/fleet/pull-messages"
#: seconds an empty pull is held by default, and at most (the SuperNode's request timeout is 30 s
#: in flwr 1.41: a hold must end well before it)
PULL_HOLD_S = 10.0
MAX_PULL_HOLD_S = 25.0
#: re-polls of the SuperLink per second, all held pulls together (at least one per 0.1 s each)
MAX_REPOLLS_PER_S = 50.0
#: a pull is held only while each held pull can be re-asked at least this often: beyond
#: MAX_REPOLLS_PER_S x this many held pulls (25), further ones are answered at once, as Flower
#: itself would (the node then sleeps its 3 s): a slower re-poll would make a node hear of a
#: message later than Flower's own sleep does
MAX_HOLD_INTERVAL_S = 0.5


def repoll_interval(held: int) -> float:
    """Seconds between two re-polls of one held pull while ``held`` pulls are held: 0.1 s for
    a few nodes, slower for many, so that the SuperLink sees <= ~MAX_REPOLLS_PER_S requests/s."""
    return max(0.1, held / MAX_REPOLLS_PER_S)


def pull_is_empty(status: int, content: bytes) -> bool:
    """Whether a ``pull-messages`` answer carries nothing (no message, no reconnect order): the
    only answer the proxy may hold back. Anything it cannot read as such is passed on at once."""
    if status != 200:
        return False
    from flwr.proto.fleet_pb2 import PullMessagesResponse  # flwr's own protobuf (a dependency already)

    try:
        resp = PullMessagesResponse.FromString(content)
    except Exception:  # noqa: BLE001 — not ours to judge: forwarded unchanged
        return False
    return not resp.messages_list and not resp.HasField("reconnect")


def is_fleet_request(method: str, raw_path: bytes, query_string: bytes) -> str | None:
    """The canonical Fleet path this request may be forwarded to, or None (rejected)."""
    if method != "POST" or query_string:
        return None
    try:
        path = raw_path.decode("ascii")
    except UnicodeDecodeError:
        return None
    for allowed in FLEET_PATHS:  # return our own constant, never the request's bytes
        if path == allowed:
            return allowed
    return None


async def _reply(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class FleetProxy:
    """ASGI app: forward allow-listed Fleet calls to ``upstream`` (https://127.0.0.1:PORT)."""

    def __init__(self, upstream: str, *, ca_cert: str | Path | None, timeout: float = 60.0,
                 max_body: int = MAX_BODY, pull_hold: float = PULL_HOLD_S):
        if not 0.0 <= pull_hold <= MAX_PULL_HOLD_S:
            raise ValueError(f"pull_hold={pull_hold}: must be in [0, {MAX_PULL_HOLD_S:g}] s (the SuperNode's request "
                             "timeout is 30 s)")
        self.upstream = upstream.rstrip("/")
        self.pull_hold = pull_hold
        self.held = 0  # pulls being held right now
        #: set when the server shuts down: held pulls answer at once (uvicorn waits for every
        #: open request before it stops, so a held pull would delay a restart by up to pull_hold)
        self.stopping = lambda: False
        self.verify: ssl.SSLContext | bool = (ssl.create_default_context(cafile=str(ca_cert))
                                              if ca_cert else False)
        self.timeout = timeout
        self.max_body = max_body
        self.client: httpx.AsyncClient | None = None
        self.rejected = 0

    def _client(self) -> httpx.AsyncClient:
        if self.client is None:
            self.client = httpx.AsyncClient(verify=self.verify, timeout=self.timeout,
                                            limits=httpx.Limits(max_connections=200))
        return self.client

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    if self.client is not None:
                        await self.client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return  # websockets etc.: closed without an answer
        path = is_fleet_request(scope["method"], scope.get("raw_path") or scope["path"].encode(),
                                scope.get("query_string", b""))
        if path is None:
            self.rejected += 1
            log.warning("rejected %s %s from %s (not a Fleet API call)", scope["method"],
                        scope.get("path", "?")[:200], (scope.get("client") or ("?",))[0])
            await _reply(send, 404, b"fedrec fleet proxy: only the Fleet API is served on this port\n")
            return
        body = bytearray()
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                return
            body.extend(event.get("body", b""))
            if len(body) > self.max_body:
                await _reply(send, 413, b"fedrec fleet proxy: request body too large\n")
                return
            if not event.get("more_body", False):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.decode("latin-1").lower() not in _DROP_REQUEST]
        try:
            resp = await self._forward(path, bytes(body), headers)
        except httpx.HTTPError as err:
            log.warning("upstream SuperLink unreachable for %s: %s", path, type(err).__name__)
            await _reply(send, 503, b"fedrec fleet proxy: SuperLink unavailable\n")
            return
        out_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.items()
                       if k.lower() not in _DROP_RESPONSE]
        content = resp.content
        out_headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": resp.status_code, "headers": out_headers})
        await send({"type": "http.response.body", "body": content})

    async def _forward(self, path: str, body: bytes, headers: list) -> httpx.Response:
        """One upstream call; an empty ``pull-messages`` answer is held (re-asked) for up to
        ``pull_hold`` seconds (module doc)."""
        resp = await self._client().post(self.upstream + path, content=body, headers=headers)
        if path != PULL_PATH or self.pull_hold <= 0 or not pull_is_empty(resp.status_code, resp.content):
            return resp
        if repoll_interval(self.held + 1) > MAX_HOLD_INTERVAL_S:  # enough held already: as Flower would
            return resp
        deadline = time.monotonic() + self.pull_hold
        self.held += 1
        try:
            while time.monotonic() < deadline and not self.stopping():
                await asyncio.sleep(min(repoll_interval(self.held), max(0.0, deadline - time.monotonic())))
                resp = await self._client().post(self.upstream + path, content=body, headers=headers)
                if not pull_is_empty(resp.status_code, resp.content):
                    break
        finally:
            self.held -= 1
        return resp


def serve(*, listen_host: str, listen_port: int, upstream: str, certfile: str, keyfile: str,
          ca_cert: str | None, log_level: str = "warning", alive=None, pull_hold: float = PULL_HOLD_S) -> None:
    """Serve the proxy with TLS until interrupted (SIGINT/SIGTERM), or until ``alive()`` (polled
    every second, e.g. "is the SuperLink still running") returns False."""
    import threading

    import uvicorn

    proxy = FleetProxy(upstream, ca_cert=ca_cert, pull_hold=pull_hold)
    config = uvicorn.Config(proxy, host=listen_host, port=listen_port,
                            ssl_certfile=certfile, ssl_keyfile=keyfile, log_level=log_level,
                            access_log=False, server_header=False, date_header=False, lifespan="on",
                            proxy_headers=False, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    proxy.stopping = lambda: server.should_exit
    if alive is not None:
        def watch() -> None:
            while not server.should_exit:
                if not alive():
                    log.error("the SuperLink exited: stopping the Fleet API proxy")
                    server.should_exit = True
                    return
                threading.Event().wait(1.0)

        threading.Thread(target=watch, name="superlink-watch", daemon=True).start()
    server.run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedrec.server.fleet_proxy",
        description="TLS reverse proxy forwarding only Flower's Fleet API (POST /v1/fleet/<method>) to a "
                    "SuperLink on loopback. `fedrec-server start` runs it for you.")
    p.add_argument("--listen", required=True, help="public HOST:PORT to serve on (TLS)")
    p.add_argument("--upstream", required=True, help="the SuperLink, e.g. https://127.0.0.1:9093")
    p.add_argument("--cert", required=True, help="server certificate (PEM) presented to SuperNodes")
    p.add_argument("--key", required=True, help="its private key (PEM)")
    p.add_argument("--ca-cert", help="CA that signed the SuperLink's certificate (upstream TLS)")
    p.add_argument("--pull-hold", type=float, default=PULL_HOLD_S,
                   help="seconds an empty pull-messages answer is held while the SuperLink is asked again "
                        "(long poll; 0: off)")
    a = p.parse_args(argv)
    host, _, port = a.listen.rpartition(":")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fleet-proxy %(message)s")
    serve(listen_host=host.strip("[]"), listen_port=int(port), upstream=a.upstream, certfile=a.cert,
          keyfile=a.key, ca_cert=a.ca_cert, pull_hold=a.pull_hold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
