"""The consumer CLI: ``carom-consume`` and ``carom-produce`` (also ``python -m carom_cli``).

It reads and writes Carom's Pulsar topics with the contract's schemas; it imports no service.
"""
