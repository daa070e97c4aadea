"""A local stand-in for GitHub's OAuth app endpoints and the REST API calls pgtally makes, spoken
over real HTTP to authlib's client: ``/login/oauth/authorize`` (approves at once as the user the
test chose, or answers ``error=access_denied``), ``/login/oauth/access_token`` (codes single use,
PKCE S256 checked), ``/user`` and ``/user/emails``."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit


class GitHubStandIn:
    def __init__(self) -> None:
        self.user: dict[str, Any] = {"id": 4242, "login": "octo", "emails": [
            {"email": "octo@example.com", "primary": True, "verified": True}]}
        self.deny = False
        self.codes: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, dict[str, Any]] = {}
        self.ids = itertools.count(1)
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/login/oauth/authorize":
                    target = query["redirect_uri"]
                    if standin.deny:
                        params = {"error": "access_denied", "error_description": "The user has denied your application access.",
                                  "state": query.get("state", "")}
                    else:
                        code = secrets.token_urlsafe(16)
                        standin.codes[code] = {"challenge": query.get("code_challenge"), "user": dict(standin.user),
                                               "client_id": query["client_id"]}
                        params = {"code": code, "state": query.get("state", "")}
                    self.send_response(302)
                    self.send_header("Location", f"{target}?{urlencode(params)}")
                    self.end_headers()
                    return
                token = self.headers.get("Authorization", "").removeprefix("Bearer ").removeprefix("token ")
                user = standin.tokens.get(token)
                if user is None:
                    return self._json(401, {"message": "Bad credentials"})
                if url.path == "/user":
                    return self._json(200, {"id": user["id"], "login": user["login"]})
                if url.path == "/user/emails":
                    return self._json(200, user["emails"])
                self._json(404, {"message": "Not Found"})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                if urlsplit(self.path).path != "/login/oauth/access_token":
                    return self._json(404, {"message": "Not Found"})
                grant = standin.codes.pop(form.get("code", ""), None)
                verifier = form.get("code_verifier", "")
                expected = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
                if grant is None or grant["challenge"] != expected:
                    return self._json(200, {"error": "bad_verification_code",
                                            "error_description": "The code passed is incorrect or expired."})
                token = f"gho_{secrets.token_urlsafe(16)}"
                standin.tokens[token] = grant["user"]
                self._json(200, {"access_token": token, "token_type": "bearer", "scope": "read:user,user:email"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> GitHubStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()


if __name__ == "__main__":
    # Try GitHub sign-in offline: PGTALLY_GITHUB_URL=PGTALLY_GITHUB_API_URL=http://127.0.0.1:12112
    import sys

    standin = GitHubStandIn()
    standin.server.server_close()
    standin.server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 12112),
                                         standin.server.RequestHandlerClass)
    print(f"GitHub stand-in on http://127.0.0.1:{standin.server.server_address[1]} (signs in as octo@example.com)",
          flush=True)
    standin.server.serve_forever()
