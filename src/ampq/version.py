"""The version of ampq, read by the package and by every file it writes."""

__version__ = "0.1.0"
