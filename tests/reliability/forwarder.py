"""An HTTP forwarder to moto's S3, in a process of its own: the COG's "network".

The workers reach S3 through it (``AWS_ENDPOINT_URL_S3`` points here, SQS and Secrets
Manager still go straight to moto), so killing this process by its PID makes the COG
unreachable (connections refused) without touching moto, whose buckets live only in its
memory; starting it again on the same port brings S3 back.

Run: ``python tests/reliability/forwarder.py PORT UPSTREAM_URL PARENT_PID``; ready once PORT
accepts; it exits by itself when the process PARENT_PID is no longer its parent.
"""

from __future__ import annotations

import http.client
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: Headers that belong to one connection, not to the request: never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "upgrade",
        "http2-settings",
        "transfer-encoding",
        "proxy-connection",
        "te",
        "trailer",
    }
)


def handler_for(host: str, port: int) -> type[BaseHTTPRequestHandler]:
    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            upstream = http.client.HTTPConnection(host, port, timeout=30)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
            finally:
                upstream.close()
            head = self.command == "HEAD"
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in HOP_BY_HOP | {"content-length", "date", "server"}:
                    self.send_header(name, value)
            length_header = answer.getheader("Content-Length", "0") if head else str(len(data))
            self.send_header("Content-Length", str(length_header))
            self.end_headers()
            if not head:
                self.wfile.write(data)

        do_HEAD = do_GET
        do_PUT = do_GET
        do_POST = do_GET

    return Forward


def exit_with_parent(parent: int) -> None:
    """Exit once the process that started this one is gone (a test killed by its timeout
    must not leave the forwarder listening)."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def main() -> None:
    port, upstream, parent = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    host, upstream_port = upstream.removeprefix("http://").rstrip("/").split(":")
    server = ThreadingHTTPServer(("127.0.0.1", port), handler_for(host, int(upstream_port)))
    server.daemon_threads = True
    threading.Thread(target=exit_with_parent, args=(parent,), daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
