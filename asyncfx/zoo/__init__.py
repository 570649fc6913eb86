"""Models that ship with asyncfx: tiny random-weight denoisers for tests and demos."""
from asyncfx.zoo import tiny

__all__ = ["tiny"]
