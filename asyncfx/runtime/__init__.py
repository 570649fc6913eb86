"""Executing a StagePlan: schedule, executors and AsyncDenoiser (see the runtime issue)."""
