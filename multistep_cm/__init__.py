"""Multistep Consistency Models in JAX/Flax."""

import importlib.metadata

try:
  # setup.py's version as installed: one copy, which cannot drift.
  __version__ = importlib.metadata.version('multistep_cm')
except importlib.metadata.PackageNotFoundError:
  __version__ = '0+unknown'  # A checkout on PYTHONPATH, never installed.
