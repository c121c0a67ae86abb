"""A third-party plugin package, written from docs/writing-plugins.md alone."""
