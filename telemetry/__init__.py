"""What the gateway records for its operators: the Prometheus metrics (``metrics``) and the
admin API's live event stream (``events``).

Every layer records into them, so they sit low in the import order: on the kernel, under the
backends, the relay, the middleware and the app (pyproject.toml's import contract).
"""
