"""The diffusion math every stage shares, knowing nothing of networks, data or training.

`schedules` (β schedules, respacing, the aug level ↔ ᾱ map), `parameterization` (ε / v / x_0),
`gaussian` (`GaussianDiffusion`: forward process, posterior, reverse process, respacing), `objectives`
(the variational bound and the training losses), `augment` (conditioning augmentation), `noise` (every
normal draw: one generator or one per sample), `samplers` (the reverse-process loops) and `guidance`
(classifier-free guidance, autoguidance and classifier guidance as model wrappers).
"""

from cascade.diffusion.gaussian import GaussianDiffusion, build_diffusion, make_betas, space_timesteps
from cascade.diffusion.guidance import autoguidance, classifier_free_guidance, classifier_guidance
from cascade.diffusion.samplers import (
    SAMPLERS,
    sample_consistency,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp2m,
    sample_heun,
)

__all__ = ["SAMPLERS", "GaussianDiffusion", "autoguidance", "build_diffusion", "classifier_free_guidance",
           "classifier_guidance", "make_betas", "sample_consistency", "sample_ddim", "sample_ddpm", "sample_dpmpp2m",
           "sample_heun", "space_timesteps"]
