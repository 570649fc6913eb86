"""Applications built on the library: the ``asyncfx`` command line, the demo on the
default model, the speed/quality sweep, and the model specs the command line reads."""
