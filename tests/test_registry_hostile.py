"""pull against a hostile registry (a small HTTP server on 127.0.0.1 playing one): it
stops reading at the declared size, caps manifests, and never sends the registry
credentials to another origin on a redirect."""
from __future__ import annotations

import hashlib
import http.server
import json
import threading

import pytest

from appliance import registry

SUMS = b"0" * 64 + b"  x\n"
SUMS_DIGEST = "sha256:" + hashlib.sha256(SUMS).hexdigest()


class Hostile(http.server.BaseHTTPRequestHandler):
    """Declares SHA256SUMS as 10 bytes, then streams without end; or answers a
    manifest of 5 MiB; or asks for a login and redirects the manifest elsewhere."""
    mode = "stream"
    sent = 0
    seen_auth: list = []
    other = ""

    def log_message(self, *a):
        pass

    def do_GET(self):
        cls = type(self)
        if self.path == "/v2/":
            return self._answer(200, b"{}")
        if "/manifests/" in self.path:
            if cls.mode == "big-manifest":
                return self._answer(200, b"{" + b" " * (5 << 20) + b"}", registry.MANIFEST)
            if cls.mode == "redirect":
                if self.headers.get("Authorization") is None:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="test"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(307)
                self.send_header("Location", cls.other + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            layers = [{"mediaType": "text/plain", "digest": SUMS_DIGEST, "size": 10,
                       "annotations": {registry.TITLE: n}} for n in ("SHA256SUMS", "SHA256SUMS.asc")]
            body = json.dumps({"schemaVersion": 2, "mediaType": registry.MANIFEST, "layers": layers}).encode()
            return self._answer(200, body, registry.MANIFEST)
        if "/blobs/" in self.path:
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(300):  # 300 MiB, whatever the manifest said
                    self.wfile.write(b"\0" * (1 << 20))
                    cls.sent += 1 << 20
            except OSError:
                pass
            return
        self._answer(404, b"{}")

    def _answer(self, code, body, ctype="application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Recorder(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        type(self).seen.append(self.headers.get("Authorization"))
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def serve():
    servers = []

    def start(handler):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"127.0.0.1:{srv.server_address[1]}"
    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_a_layer_longer_than_declared_is_refused_after_the_declared_bytes(serve, tmp_path):
    Hostile.mode, Hostile.sent = "stream", 0
    host = serve(Hostile)
    with pytest.raises(registry.RegistryError, match="not the declared 10 bytes long"):
        registry.pull(registry.Ref.parse(f"{host}/mail/appliance:1"), "frontend", tmp_path / "k.asc",
                      tmp_path / "out" / "frontend", log=lambda m: None)
    # socket buffers let a few MiB through before the server notices; never the 300
    assert Hostile.sent < 64 << 20
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_a_manifest_above_the_cap_is_refused(serve, tmp_path):
    Hostile.mode = "big-manifest"
    host = serve(Hostile)
    with pytest.raises(registry.RegistryError, match=f"more than {registry.MAX_MANIFEST} bytes"):
        registry.pull(registry.Ref.parse(f"{host}/mail/appliance:1"), "frontend", tmp_path / "k.asc",
                      tmp_path / "out" / "frontend", log=lambda m: None)


def test_credentials_do_not_follow_a_redirect_to_another_origin(serve, tmp_path, monkeypatch):
    monkeypatch.setenv("MAILCLUSTER_REGISTRY_USERNAME", "publisher")
    monkeypatch.setenv("MAILCLUSTER_REGISTRY_PASSWORD", "s3cret")
    Recorder.seen = []
    Hostile.mode = "redirect"
    Hostile.other = "http://" + serve(Recorder)
    host = serve(Hostile)
    with pytest.raises(registry.RegistryError):
        registry.pull(registry.Ref.parse(f"{host}/mail/appliance:1"), "frontend", tmp_path / "k.asc",
                      tmp_path / "out" / "frontend", log=lambda m: None)
    assert Recorder.seen == [None]  # the redirect was followed, without the credentials
