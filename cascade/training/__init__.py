"""Training one stage: the trainer and its settings, the losses of each stage kind, EMA, timestep
samplers, the process runtime (accelerate, seeding) and the CPU memory-format choice."""
