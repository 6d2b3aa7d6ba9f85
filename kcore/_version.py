"""kcore's version, in a leaf module so that provenance can name it without importing the whole package."""

__version__ = "0.1.0"
