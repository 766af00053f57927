"""A local OpenID issuer standing in for login.botframework.com: metadata document, JWKS
with ``endorsements``, and RS256 channel tokens minted here. It runs on a thread of its
own, so it answers even while the event loop under test is busy (or blocked)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ISSUER = "https://issuer.test"
METADATA_PATH = "/v1/.well-known/openidconfiguration"
KEYS_PATH = "/v1/keys"
KID = "channel-key"  # endorses the test channel
TEAMS_KID = "teams-key"  # a real key of the issuer, endorsed for another channel only


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _hs256(payload: dict[str, Any], headers: dict[str, Any], secret: bytes) -> str:
    """Signed by hand: PyJWT rightly refuses a public key as an HMAC secret."""
    signing_input = b".".join(
        _b64(json.dumps(part).encode()) for part in ({"alg": "HS256", "typ": "JWT", **headers}, payload)
    )
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + _b64(signature)).decode()


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Issuer:
    """The issuer on ``127.0.0.1``; ``metadata_url`` is what the bot is pointed at.

    ``hold()`` makes the metadata request wait until ``release()``: ``requested`` is set
    when one arrives, ``pending`` says one is waiting now."""

    def __init__(self, channel_ids: tuple[str, ...] = ("telephony",)) -> None:
        self.key = rsa_key()
        self.other_key = rsa_key()  # never published
        self.teams_key = rsa_key()
        self.channel_ids = channel_ids
        self.metadata_requests = 0
        self.requested = threading.Event()
        self._open = threading.Event()
        self._open.set()
        self.pending = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.metadata_url = self.url + METADATA_PATH
        self._thread = threading.Thread(target=self._server.serve_forever, name="issuer", daemon=True)

    def start(self) -> Issuer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def hold(self) -> None:
        self.requested.clear()
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def jwks(self) -> dict[str, Any]:
        def public(key: rsa.RSAPrivateKey, kid: str, endorsements: list[str]) -> dict[str, Any]:
            jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
            return {**jwk, "kid": kid, "use": "sig", "alg": "RS256", "endorsements": endorsements}

        return {
            "keys": [
                public(self.key, KID, list(self.channel_ids)),
                public(self.teams_key, TEAMS_KID, ["msteams"]),
            ]
        }

    def token(
        self,
        app_id: str,
        service_url: str,
        *,
        key: rsa.RSAPrivateKey | None = None,
        kid: str | None = KID,
        algorithm: str = "RS256",
        lifetime: tuple[float, float] = (-60, 600),
        **claims: Any,
    ) -> str:
        """A channel token as the Bot Connector signs it; ``claims`` overrides or adds
        (a value of None removes the claim)."""
        now = time.time()
        payload: dict[str, Any] = {
            "iss": ISSUER,
            "aud": app_id,
            "serviceurl": service_url,
            "nbf": int(now + lifetime[0]),
            "iat": int(now + lifetime[0]),
            "exp": int(now + lifetime[1]),
            **claims,
        }
        payload = {k: v for k, v in payload.items() if v is not None}
        headers = {"kid": kid} if kid is not None else {}
        signing_key: Any = key or self.key
        if algorithm == "HS256":  # the classic confusion: the public key as an HMAC secret
            return _hs256(payload, headers, json.dumps(self.jwks()["keys"][0]).encode())
        if algorithm == "none":
            signing_key = None
        return jwt.encode(payload, signing_key, algorithm=algorithm, headers=headers)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == METADATA_PATH:
                    issuer.metadata_requests += 1
                    issuer.pending = True
                    issuer.requested.set()
                    issuer._open.wait(30)
                    issuer.pending = False
                    body = {"issuer": ISSUER, "jwks_uri": issuer.url + KEYS_PATH}
                    self._json(body)
                elif self.path == KEYS_PATH:
                    self._json(issuer.jwks())
                else:
                    self.send_error(404)

            def _json(self, data: Any) -> None:
                body = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
