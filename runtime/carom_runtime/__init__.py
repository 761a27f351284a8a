"""What the services share at run time: the HTTP service runner, the Pulsar glue, configuration
loading and the aioice patch.

It builds on the contract (``carom``) and imports no service; the services and the clients import
it. Unlike ``carom`` it does I/O, so it lives apart from the contract.
"""
