"""The request's way to its model server and the answer's way back: the upstream client
(``upstream``), the streaming passthrough at the end of the middleware chain (``passthrough``)
and the client watch that every wait shares (``disconnect``).

In the import order it sits on the backends and under the middleware: it imports kernel and
backends only, and the layers above it import it (pyproject.toml's import contract).
"""
