"""Training one stage: the trainer (`trainer`) and its settings (`trainer_config`), one optimizer step (`step`),
AdamW and the LR schedule (`optimizer`), the losses of each stage kind, EMA, timestep samplers, the data stream,
the resume point, the metrics log, the sample grids, the process runtime (accelerate, seeding) and the CPU
memory-format choice."""
