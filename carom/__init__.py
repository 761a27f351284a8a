"""Carom's shared core: message schemas, topic names, configuration, Pulsar glue and the CLI.

Every service imports this package; it imports no service.
"""

#: The Apache Pulsar release Carom is built and tested against (local/, compose and k8s alike).
PULSAR_VERSION = "4.0.7"
