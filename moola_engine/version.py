"""The version of moola-engine (one place; the package and its files read it from here)."""

__version__ = "0.1.0"
