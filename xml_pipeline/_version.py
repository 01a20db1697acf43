"""The package version (one place; pyproject.toml says the same)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
