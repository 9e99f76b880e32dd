"""A stand-in for vLLM's OpenAI server where only the node's handling of processes is under test
(swaps, unloads): it takes vLLM's arguments, answers GET /health and an empty GET /metrics, and
nothing else. A real engine takes tens of seconds and a gigabyte to load; this, a fraction of one."""
from __future__ import annotations

import argparse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = b"ok" if self.path == "/health" else b""
        self.send_response(200 if self.path in ("/health", "/metrics") else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args, _ = ap.parse_known_args()           # the rest of vLLM's flags mean nothing here
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
