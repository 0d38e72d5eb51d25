"""Composition root: builds the daemon from settings and runs it."""
