"""Carom's recorder: every channel topic to files per session, each message once, with latency."""
