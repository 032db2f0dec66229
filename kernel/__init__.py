"""The gateway's kernel: the config model, the error envelope and the ASGI types that every
layer shares. It imports nothing of the gateway above it."""
