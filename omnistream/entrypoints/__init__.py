"""Entry points: the Python API (Engine), the CLI, the server."""
