"""The package version (one place; ``qfv_brevitas.__version__`` and exported files read it)."""

__version__ = "0.1.0"
