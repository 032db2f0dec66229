"""``python -m simulator``: the simulated vLLM server's command line (see simulator.server)."""

import os
import sys

from .server import main

status = main()
# Skip the interpreter's slow (~0.1 s) teardown: nothing is left to clean up.
sys.stdout.flush()
sys.stderr.flush()
os._exit(status)
