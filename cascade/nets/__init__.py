"""Networks: the UNet and its attention, the noise-aware classifier, the preconditioning wrappers that
put a backbone under a stage's schedule, and `build` (a `StageConfig` → its network)."""
