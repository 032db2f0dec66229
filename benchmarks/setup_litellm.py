"""Make ``benchmarks/.venv-litellm``: LiteLLM's proxy in a virtualenv of its own.

``python -m benchmarks.setup_litellm``. LiteLLM is pinned: 1.107.0 was a compromised release
(pulled from PyPI), and 1.106.2 is the version LiteLLM's incident note told users to pin to.
Its dependencies would clash with the gateway's, hence the separate virtualenv.
"""

from __future__ import annotations

import subprocess
import sys
import venv

from .systems import LITELLM_VENV

LITELLM = "litellm[proxy]==1.106.2"


def main() -> int:
    if not (LITELLM_VENV / "bin" / "python").exists():
        venv.create(LITELLM_VENV, with_pip=True)
    return subprocess.call([str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install",
                            "--quiet", LITELLM])


if __name__ == "__main__":
    sys.exit(main())
