"""Carom router: browser reports over WebTransport in, Apache Pulsar out."""
