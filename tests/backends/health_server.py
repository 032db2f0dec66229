"""A server that only answers ``GET /health``: the cheapest process for the pool to start.

Run as ``python health_server.py PORT``; the simulator takes several times longer to start, and
the tests that only need a healthy process use this instead.
"""

import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
