"""When a training run writes its sample grids and scores its quality proxy (`cascade.training.watch.Watcher`
acts on these decisions); pure functions, so the rules are tested without training.

Sample grids (``trainer.sample_every``):

- ``"auto"``: `GRID_PARTS` (4) grids over the run: the first logging step at or after each quarter of
  ``max_steps`` or of ``max_seconds`` (elapsed in this invocation), whichever is reached first
  (`grid_part`), plus one at the end. A resumed run counts its parts already passed by step as written.
- N ≥ 1: every N steps, plus one at the end; 0: no grid at all.
- The end grid is at the final checkpoint's step: max_steps, a time budget's last step or an interrupt's.

Quality proxy (``trainer.eval_every``; base and SR stages, never the classifier):

- ``"auto"``: at a logging step when `proxy_due`: the time spent on proxies so far plus two more evaluations
  (this one and the end-of-run one, each estimated at the last one's duration) stays at or under
  `PROXY_SHARE` (10 %) of the training seconds so far (the logged windows' time: no checkpoint, grid or proxy
  time). Training time only grows, so the proxies' total, end evaluation included, stays at or under 10 % of
  the training time (for evaluations of equal duration) once one evaluation has fitted; a run shorter than 20
  evaluations' worth of training gets only the end one, whatever its share. Before the first evaluation its duration is
  estimated by `first_proxy_estimate` from the training throughput.
- N ≥ 1: every N steps; 0: never. With any N ≠ 0 (and auto) the end of the run (max_steps or a time budget)
  is scored; an interrupted run is not (it stops as soon as its checkpoint is written).

The proxy's construction (the judge: trained once per shard folder, then cached) is reported in the start-up
summary but not counted in the 10 %: it is a one-off cost shared by every run on those shards.
"""

from __future__ import annotations

import math

__all__ = ["GRID_PARTS", "PROXY_SHARE", "first_proxy_estimate", "grid_part", "proxy_due", "step_due"]

GRID_PARTS = 4  # sample_every=auto: grids per run, besides the end one
PROXY_SHARE = 0.1  # eval_every=auto: the proxy's share of the training time at most


def grid_part(step: int, max_steps: int, elapsed: float = 0.0, max_seconds: float = 0.0,
              parts: int = GRID_PARTS) -> int:
    """The part of the run reached (0 … ``parts``): ⌊parts · max(step / max_steps, elapsed / max_seconds)⌋, the
    time term only with a budget (``max_seconds`` > 0). sample_every=auto writes a grid when it exceeds the part of
    the last grid (parts < ``parts``; the last part is the end grid's)."""
    fraction = step / max_steps
    if max_seconds > 0:
        fraction = max(fraction, elapsed / max_seconds)
    return min(parts, math.floor(parts * fraction))


def step_due(every: int | str, step: int) -> bool:
    """Whether a fixed cadence of ``every`` steps (an int ≥ 1) falls on ``step``; False for "auto" and 0."""
    return isinstance(every, int) and every > 0 and step % every == 0


def proxy_due(train_seconds: float, proxy_seconds: float, estimate: float, share: float = PROXY_SHARE) -> bool:
    """eval_every=auto: whether to score the proxy now. True when ``proxy_seconds`` (spent on proxies so far)
    + 2 × ``estimate`` (this evaluation and the end-of-run one, seconds each) ≤ ``share`` × ``train_seconds``
    (the training time so far). So the first one comes once the training time reaches 20 × the estimate (10 ×
    the two evaluations), and each later one once the training time has grown by 10 × the last duration."""
    return proxy_seconds + 2.0 * estimate <= share * train_seconds


def first_proxy_estimate(count: int, sampling_steps: int, guided: bool, train_images_per_s: float) -> float:
    """The first proxy's duration in seconds, before one was timed: its network evaluations (``count`` samples ×
    ``sampling_steps``, twice each with classifier-free guidance: ``guided``) at the training throughput, one
    trained image costing about three network evaluations (forward and a backward of about twice the forward's
    cost). inf when the throughput is not known (≤ 0)."""
    if train_images_per_s <= 0:
        return math.inf
    evaluations = count * sampling_steps * (2 if guided else 1)
    return evaluations / (3.0 * train_images_per_s)
