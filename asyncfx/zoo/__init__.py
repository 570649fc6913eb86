"""Models that ship with asyncfx: the trained default (``digits()``) and tiny
random-weight denoisers for tests and benchmarks (``tiny``)."""
from asyncfx.zoo import tiny
from asyncfx.zoo.digits_model import Digits, digits, digits_classifier, sample_digits

__all__ = ["Digits", "digits", "digits_classifier", "sample_digits", "tiny"]
