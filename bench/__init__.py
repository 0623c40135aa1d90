"""Benchmarks of jaxdistill: ``python -m bench`` (see bench/__main__.py)."""
