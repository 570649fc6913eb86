"""The runtime: runs a lowered ``asyncfx.program.Program`` (the denoiser, the call clock,
the executors); it imports nothing of the partitioner."""
