"""The version of diagnet, in a module of its own.

It sits at the bottom of the layers (it imports nothing), so that any module can record the
version (checkpoints, training logs) without importing the package root, which imports
everything. ``pyproject.toml`` reads the version from here too.
"""

__version__ = "0.1.0"
