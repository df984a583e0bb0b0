"""Sampling a chain of stages: the chain loaded from checkpoints (`chain`), a checked plan of per-stage
settings (`plan`), `CascadePipeline` and the writer of its outputs (`outputs`)."""
