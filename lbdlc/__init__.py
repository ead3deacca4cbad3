"""lbdlc: a compiler for deep-learning models written as YAML specs."""

__version__ = "0.1.0"
