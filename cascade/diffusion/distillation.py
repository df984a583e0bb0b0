"""The mathematics of distilling a guided stage into a few-step student, as functions of model callables.

A model is called as the samplers call it, ``model(x_t, t, **model_kwargs)`` with t on the training scale; a
student also takes ``w=`` (B guidance weights). Nothing here knows networks, data or training: the training losses
(`cascade.training.distill`) draw the batch, the levels and the weights and call these.

- `guided_output`: classifier-free guidance with one weight per sample (Ho & Salimans 2022 eq. 6).
- `guidance_distillation_loss`: the student's prediction at (x_t, t, w) against the guided teacher's (Meng et al.
  2023 "On Distillation of Guided Diffusion Models" §4.1, in the stage's own prediction space).
- `distillation_grid`, `distillation_timesteps`: a student's training levels and the levels a k-step sampler visits
  (Luo et al. 2023 "Latent Consistency Models" §4.3 "skipping-step": one interval of the grid spans many training
  timesteps).
- `step_distillation_loss`: the student's one DDIM step matches k guided DDIM steps of the teacher (the target of
  Salimans & Ho 2022 "Progressive Distillation for Fast Sampling of Diffusion Models" eq. 8 and Algorithm 2, over k
  teacher steps in one round; with guidance: Meng et al. 2023 §4.2), truncated-SNR weighted.
- `consistency_distillation_loss`: guided consistency distillation (Luo et al. 2023 §4.2, eq. 9; Song et al. 2023
  "Consistency Models" eq. 7) with the teacher's DDIM step as the ODE solver, the student itself (stop-gradient) as
  the target network (Song & Dhariwal 2023 "Improved Techniques for Training Consistency Models" §3.2) and the
  pseudo-Huber distance (ibid. §3.3).
"""

from __future__ import annotations

import torch

from cascade.diffusion.gaussian import GaussianDiffusion

__all__ = ["consistency_distillation_loss", "consistency_function", "distillation_grid", "distillation_timesteps",
           "guidance_distillation_loss", "guided_output", "pseudo_huber", "step_distillation_loss"]


def _per_sample(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return w.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def guided_output(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor, channels: int) -> torch.Tensor:
    """(1 + w)·cond − w·uncond on the first ``channels`` channels (the prediction), one w per sample (B), keeping
    cond's other (variance) channels: classifier-free guidance in the model's output space (slides eq. 17; Ho &
    Salimans 2022 eq. 6; affine in ε with weights summing to 1, so valid for ε, v and x_0 outputs alike)."""
    mean = cond[:, :channels] + _per_sample(w, cond) * (cond[:, :channels] - uncond[:, :channels])
    return mean if cond.shape[1] == channels else torch.cat([mean, cond[:, channels:]], dim=1)


def _guided_teacher(teacher, x_t: torch.Tensor, t: torch.Tensor, w: torch.Tensor, null_class: int,
                    model_kwargs: dict) -> torch.Tensor:
    """The teacher's guided output at (x_t, t) for labels ``model_kwargs["y"]`` and weights w: conditional and
    null-class halves in one batched call (as `cascade.diffusion.guidance.ClassifierFreeGuidance`)."""
    batch = x_t.shape[0]
    y = model_kwargs["y"]
    doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch else v
               for k, v in model_kwargs.items() if k != "y"}
    out = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, null_class)]),
                  **doubled)
    return guided_output(out[:batch], out[batch:], w, x_t.shape[1])


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """√(‖a − b‖² + c²) − c per sample (B) over the other dimensions (Song & Dhariwal 2023 "Improved Techniques for
    Training Consistency Models" §3.3); c = 0.00054·√d for d values per sample (their choice) unless given."""
    d = a[0].numel()
    c = 0.00054 * d**0.5 if c is None else c
    sq = (a.float() - b.float()).pow(2).flatten(1).sum(dim=1)
    return torch.sqrt(sq + c * c) - c


def guidance_distillation_loss(student, teacher, diffusion: GaussianDiffusion, x_start: torch.Tensor,
                               t: torch.Tensor, w: torch.Tensor, noise: torch.Tensor, *, null_class: int,
                               model_kwargs: dict) -> torch.Tensor:
    """Per-sample (B) mean squared error between the student's output at (x_t, t, w) and the guided teacher's,
    x_t = q_sample(x_start, t, noise) (Meng et al. 2023 §4.1 stage one, in the prediction space of the stage: every
    output channel, the teacher's variance channels being its conditional ones). ``t``: B training timesteps;
    ``w``: B weights ≥ 0; ``model_kwargs``: the conditioning, with labels ``y`` (B class indices, not null)."""
    x_t = diffusion.q_sample(x_start, t, noise)
    with torch.no_grad():
        target = _guided_teacher(teacher, x_t, t, w, null_class, model_kwargs).float()
    out = student(x_t, t, w=w, **model_kwargs).float()
    return (out - target).pow(2).flatten(1).mean(dim=1)


def distillation_grid(num_timesteps: int, levels: int) -> list[int]:
    """The ``levels`` + 1 training timesteps τ_0 = 0 < τ_1 < … < τ_N = T − 1 of a student's grid, evenly spaced (N
    intervals; Luo et al. 2023 §4.3: each interval skips T/N training timesteps). A grid of N·k levels holds the grid
    of N levels at every k-th level. Raises ValueError unless 1 <= levels <= num_timesteps − 1 (distinct timesteps
    need T ≥ N + 1)."""
    if not 1 <= levels <= num_timesteps - 1:
        raise ValueError(f"levels must be in [1, {num_timesteps - 1}] for {num_timesteps} timesteps, got {levels}")
    return [round(i * (num_timesteps - 1) / levels) for i in range(levels + 1)]


def distillation_timesteps(num_timesteps: int, levels: int, steps: int) -> list[int]:
    """The training timesteps (ascending) at which a ``steps``-step sampler evaluates a student trained on
    ``distillation_grid(num_timesteps, levels)``: the top level τ_N and every (N/steps)-th level below it, never τ_0
    (the consistency function is the identity there; a step student's last step goes from τ_1 to clean data).
    Raises ValueError unless 1 <= steps <= levels."""
    if not 1 <= steps <= levels:
        raise ValueError(f"steps must be in [1, {levels}] (the student's levels), got {steps}")
    grid = distillation_grid(num_timesteps, levels)
    return sorted({grid[levels - round(j * levels / steps)] for j in range(steps)})


def consistency_function(model, diffusion: GaussianDiffusion, x_t: torch.Tensor, t: torch.Tensor, w: torch.Tensor,
                         model_kwargs: dict) -> torch.Tensor:
    """f(x_t, t) = x̂_0 of the model's prediction (ε, v or x_0) at (x_t, t, w): the consistency function of a
    student parameterised by the diffusion's own x̂_0 (at t = 0, ᾱ_0 ≈ 1 makes it the identity up to √(1 − ᾱ_0),
    the boundary condition of Song et al. 2023 eq. 3 in VP form)."""
    out = model(x_t, t, w=w, **model_kwargs)
    return diffusion.predict_xstart_eps(x_t, t, out[:, :x_t.shape[1]].float())[0]


def consistency_distillation_loss(student, teacher, diffusion: GaussianDiffusion, x_start: torch.Tensor,
                                  t_next: torch.Tensor, t_prev: torch.Tensor, w: torch.Tensor, noise: torch.Tensor, *,
                                  null_class: int, model_kwargs: dict) -> torch.Tensor:
    """Per-sample (B) guided consistency distillation loss (Luo et al. 2023 eq. 9; Song et al. 2023 eq. 7):

        x_{t_next} = √ᾱ·x_0 + √(1 − ᾱ)·ε (slides eq. 2);
        x̂_{t_prev} = DDIM step of the guided teacher from t_next to t_prev (Song et al. 2021 eq. 12, η = 0), the
                     teacher's output (1 + w)·cond − w·uncond;
        loss       = d(f_θ(x_{t_next}, t_next, w), stopgrad f_θ(x̂_{t_prev}, t_prev, w)), d pseudo-Huber,

    where at t_prev = 0 the target is x̂_{t_prev}/√ᾱ_0 itself (the boundary condition f(x, τ_0) = x). ``t_next`` >
    ``t_prev`` ≥ 0: B training timesteps (adjacent levels of `distillation_grid`); ``w``: B weights ≥ 0;
    ``model_kwargs``: the conditioning with labels ``y``.
    """
    x_t = diffusion.q_sample(x_start, t_next, noise)
    with torch.no_grad():
        guided = _guided_teacher(teacher, x_t, t_next, w, null_class, model_kwargs)
        x0_teacher, eps_teacher = diffusion.predict_xstart_eps(x_t, t_next, guided[:, :x_t.shape[1]].float())
        alpha_bar_prev = diffusion.extract("alphas_cumprod", t_prev, x0_teacher)
        # x_{τ−1} = √ᾱ_{τ−1}·x̂_0 + √(1 − ᾱ_{τ−1})·ε̂ (Song et al. 2021 'DDIM' eq. 12 with σ = 0).
        x_prev = alpha_bar_prev.sqrt() * x0_teacher + (1 - alpha_bar_prev).sqrt() * eps_teacher
        target = consistency_function(student, diffusion, x_prev.to(x_t.dtype), t_prev, w, model_kwargs)
        at_boundary = (t_prev == 0).view(-1, *([1] * (x_t.ndim - 1)))
        target = torch.where(at_boundary, x_prev / alpha_bar_prev.sqrt(), target)
    pred = consistency_function(student, diffusion, x_t, t_next, w, model_kwargs)
    return pseudo_huber(pred, target)


def _alpha_bar(diffusion: GaussianDiffusion, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ at training timesteps t (B; −1 meaning clean data, ᾱ = 1), shaped to broadcast against ``like``."""
    table = diffusion.extract("alphas_cumprod", t.clamp(min=0), like)
    return torch.where((t < 0).view(table.shape), torch.ones_like(table), table)


def step_distillation_loss(student, teacher, diffusion: GaussianDiffusion, x_start: torch.Tensor, path: torch.Tensor,
                           w: torch.Tensor, noise: torch.Tensor, *, null_class: int, model_kwargs: dict,
                           clip_denoised: bool = True) -> torch.Tensor:
    """Per-sample (B) guided step distillation loss: the student's single DDIM step over ``path`` reproduces the
    teacher's k guided DDIM steps along it.

    ``path``: B×(k + 1) training timesteps, descending, from the student's level t to the level its step ends at
    (−1: clean data, ᾱ = 1); x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε (slides eq. 2). The teacher steps x_t along the path
    with DDIM (Song et al. 2021 eq. 12, η = 0; x̂_0 clipped to [−1, 1] as the sampler does when ``clip_denoised``)
    on its guided output (1 + w)·cond − w·uncond, to x_e at the end; the target is the x̃ for which one DDIM step
    from x_t lands on x_e (Salimans & Ho 2022 eq. 8 / Algorithm 2):

        x̃ = (x_e − (σ_e/σ_t)·x_t) / (α_e − (σ_e/σ_t)·α_t),  α = √ᾱ, σ = √(1 − ᾱ)  (x̃ = x_e when σ_e = 0),

    and the loss is max(SNR(t), 1)·mean((x̂_0^student − x̃)²) ("truncated SNR" weighting, ibid. §4).
    ``w``: B weights ≥ 0; ``model_kwargs``: the conditioning with labels ``y``.
    """
    t = path[:, 0]
    x_t = diffusion.q_sample(x_start, t, noise)
    channels = x_t.shape[1]
    with torch.no_grad():
        x = x_t.float()
        for j in range(path.shape[1] - 1):
            guided = _guided_teacher(teacher, x.to(x_t.dtype), path[:, j], w, null_class, model_kwargs)
            xstart, eps = diffusion.predict_xstart_eps(x, path[:, j], guided[:, :channels].float())
            if clip_denoised:  # ε̂ re-derived from the clipped x̂_0, as the DDIM sampler does
                xstart = xstart.clamp(-1, 1)
                eps = diffusion.predict_eps_from_xstart(x, path[:, j], xstart)
            ab_next = _alpha_bar(diffusion, path[:, j + 1], x)
            # x_{τ−1} = √ᾱ_{τ−1}·x̂_0 + √(1 − ᾱ_{τ−1})·ε̂ (Song et al. 2021 'DDIM' eq. 12 with σ = 0).
            x = ab_next.sqrt() * xstart + (1 - ab_next).sqrt() * eps
        ab_t, ab_e = _alpha_bar(diffusion, t, x), _alpha_bar(diffusion, path[:, -1], x)
        ratio = ((1 - ab_e) / (1 - ab_t)).sqrt()
        # x̃ = (x_e − (σ_e/σ_t)·x_t)/(α_e − (σ_e/σ_t)·α_t) (Salimans & Ho 2022 eq. 8).
        target = (x - ratio * x_t.float()) / (ab_e.sqrt() - ratio * ab_t.sqrt())
        weight = (ab_t / (1 - ab_t)).clamp(min=1.0).flatten()  # max(SNR(t), 1) (Salimans & Ho 2022 §4)
    pred = consistency_function(student, diffusion, x_t, t, w, model_kwargs)
    return weight * (pred - target).pow(2).flatten(1).mean(dim=1)
