"""sama: data and training system for instruction-guided video editing with SAMA."""

__version__ = "0.1.0"
