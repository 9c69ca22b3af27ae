"""lifelong: keep transformer models learning on Ray."""

__version__ = "0.1.0"
