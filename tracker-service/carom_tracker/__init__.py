"""Carom's tracker: joins each centroid report to the frame it came from and records the error."""
