"""Carom's contract: what the services, the clients and the page agree on, and nothing else.

Message schemas and topic names (``schemas``), signaling bodies (``signaling``), the
WebTransport message formats (``protocol``) and the loss accounting on result records
(``accounting``). It depends on msgspec only, does no I/O and imports nothing of Carom's
(``tests/test_architecture.py`` fails if it does); runtime helpers live in ``carom_runtime``.
"""
