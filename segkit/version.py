"""segkit's version: one place, below every stage, so that any module may say which segkit wrote a file."""

__version__ = "0.2.0"
