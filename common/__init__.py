"""The base layer that both the gateway (router/) and the inference node (inference/) import:
ASGI glue, errors, logging, timers, background tasks, validation messages, server options.

It imports neither router nor inference (checked in CI by import-linter, see pyproject.toml);
the top layer `cborg` (the CLI and process wiring) imports all three.
"""
