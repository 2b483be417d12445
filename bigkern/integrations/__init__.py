"""Integrations with other libraries (imported lazily: none of them is a dependency)."""
