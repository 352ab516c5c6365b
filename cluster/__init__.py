"""Wiring: the command line, and (later) the Ray aggregator and job runner."""
