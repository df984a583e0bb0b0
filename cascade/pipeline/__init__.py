"""Sampling a chain of stages: the chain loaded from checkpoints (`chain`), a checked plan of per-stage
settings (`plan`), the one function that samples a stage (`stage_sampling`), `CascadePipeline` and the writer
of its outputs (`outputs`)."""
