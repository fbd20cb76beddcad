"""The test Internet's servers (tests/internet.py runs them in its network namespace):
a real SMTP receiver (aiosmtpd) with STARTTLS that keeps every message it accepts as
DIR/N.eml, with DIR/N.json saying who sent it, to whom, and over which TLS; and HTTPS
on port 443 serving the files under WWW (MTA-STS policies), same certificate.

    python3 -m tests.receiver DIR ADDRESS CERT KEY WWW
"""
from __future__ import annotations

import asyncio
import functools
import http.server
import itertools
import json
import os
import ssl
import sys
import threading
from pathlib import Path

from aiosmtpd.controller import Controller


# A mailbox that does not exist here: the receiver refuses it at RCPT.
REFUSED = "nobody-here"


class Keep:
    def __init__(self, directory: Path):
        self.directory = directory
        self.count = itertools.count(1)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:
        if address.split("@")[0] == REFUSED:
            return "550 5.1.1 no such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:
        tls = session.ssl["ssl_object"] if session.ssl else None
        n = next(self.count)
        meta = {"helo": session.host_name, "peer": session.peer[0], "mail_from": envelope.mail_from,
                "rcpt_tos": envelope.rcpt_tos, "tls": tls.version() if tls else None,
                "cipher": tls.cipher()[0] if tls else None}
        # The message first, then what announces it: a reader that sees N.json finds N.eml whole.
        (self.directory / f"{n}.eml").write_bytes(envelope.original_content)
        tmp = self.directory / f".{n}.json"
        tmp.write_text(json.dumps(meta))
        tmp.replace(self.directory / f"{n}.json")
        return "250 2.0.0 kept"


def serve_https(address: str, www: str, ctx: ssl.SSLContext) -> None:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=www)
    httpd = http.server.ThreadingHTTPServer((address, 443), handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()


def main() -> None:
    directory, address, cert, key, www = sys.argv[1:6]
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    serve_https(address, www, ctx)
    controller = Controller(Keep(Path(directory)), hostname=address, port=25, tls_context=ctx,
                            server_hostname="mx.example.net", ready_timeout=30)
    controller.start()
    (Path(directory) / "ready").write_text(str(os.getpid()))
    try:
        asyncio.run(asyncio.Event().wait())  # until killed
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
