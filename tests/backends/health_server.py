"""A server that only answers ``GET /health``: the cheapest process for the pool to start.

Run as ``python health_server.py PORT [SICK_FILE]``; the simulator takes several times longer to
start, and the tests that only need a healthy process use this instead. While ``SICK_FILE``
exists, ``/health`` answers 503, as vLLM's does once its engine is dead.
"""

import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

SICK_FILE = sys.argv[2] if len(sys.argv) > 2 else None


class Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        sick = SICK_FILE is not None and os.path.exists(SICK_FILE)
        self.send_response(404 if self.path != "/health" else 503 if sick else 200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
