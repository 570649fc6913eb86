"""fx passes, one verb per module. Analysis passes write ``node.meta`` keys from ``meta``."""
from asyncfx.passes.batch import batch_separability
from asyncfx.passes.classify import classify
from asyncfx.passes.estimate_cost import estimate_cost
from asyncfx.passes.functionalise import functionalise
from asyncfx.passes.meta import ValueClass
from asyncfx.passes.split import split_stages

__all__ = ["ValueClass", "batch_separability", "classify", "estimate_cost", "functionalise", "split_stages"]
