"""Experiments and demos built on the library; the CLI runs them."""
