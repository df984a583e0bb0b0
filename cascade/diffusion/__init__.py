"""The diffusion math every stage shares, knowing nothing of networks, data or training.

`schedules` (β schedules, respacing, the aug level ↔ ᾱ map), `parameterization` (ε / v / x_0),
`gaussian` (`GaussianDiffusion`: forward process, posterior, losses, the bound), `augment`
(conditioning augmentation), `noise` (every random draw of sampling), `samplers` (the reverse-process
loops and the guidance wrappers).
"""

from cascade.diffusion.gaussian import GaussianDiffusion, make_betas, space_timesteps
from cascade.diffusion.samplers import SAMPLERS, classifier_free_guidance, classifier_guidance

__all__ = ["SAMPLERS", "GaussianDiffusion", "classifier_free_guidance", "classifier_guidance", "make_betas",
           "space_timesteps"]
