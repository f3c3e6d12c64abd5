"""Tiny stub x402 facilitator on 127.0.0.1 (stdlib only) that logs every request.

Used by x402_facilitator_client_probe.py and x402_e2e_paid_route.py.

    stub = StubFacilitator(network="eip155:31337", signer="0x...")
    stub.start()            # picks a free port; stub.url == "http://127.0.0.1:PORT"
    stub.responses["/verify"] = (200, {...})   # override (status, json) per path
    ... stub.log -> list of {"method", "path", "headers", "body"}
    stub.stop()

Run directly to serve on a fixed port: python .scratch/x402_stub_facilitator.py 4021
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class StubFacilitator:
    def __init__(
        self,
        network: str = "eip155:31337",
        signer: str = "0x90F79bf6EB2c4f870365E785982E1f101E93b906",
        port: int = 0,
    ) -> None:
        self.network = network
        self.signer = signer
        self.log: list[dict[str, Any]] = []
        # path -> (status, json body) or a callable(request_body) -> (status, json body)
        self.responses: dict[str, Any] = {
            "/supported": (
                200,
                {
                    "kinds": [
                        {"x402Version": 2, "scheme": "exact", "network": network},
                        {"x402Version": 1, "scheme": "exact", "network": "anvil"},
                    ],
                    "extensions": [],
                    "signers": {"eip155:*": [signer]},
                },
            ),
            "/verify": self._verify_ok,
            "/settle": self._settle_ok,
        }
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                stub.log.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": body,
                    }
                )
                spec = stub.responses.get(self.path, (404, {"error": "not found"}))
                status, payload = spec(body) if callable(spec) else spec
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _reply
            do_POST = _reply

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @staticmethod
    def _payer(body: dict) -> str | None:
        try:
            return body["paymentPayload"]["payload"]["authorization"]["from"]
        except (KeyError, TypeError):
            return None

    def _verify_ok(self, body: dict) -> tuple[int, dict]:
        return 200, {"isValid": True, "payer": self._payer(body)}

    def _settle_ok(self, body: dict) -> tuple[int, dict]:
        pp = body.get("paymentPayload", {})
        network = pp.get("network") or pp.get("accepted", {}).get("network") or self.network
        return 200, {
            "success": True,
            "transaction": "0x" + "ab" * 32,
            "network": network,
            "payer": self._payer(body),
        }

    def start(self) -> StubFacilitator:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


if __name__ == "__main__":
    s = StubFacilitator(port=int(sys.argv[1]) if len(sys.argv) > 1 else 4021).start()
    print("stub facilitator at", s.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        s.stop()
