"""Adapters that take the refusal sampler into other runtimes."""
