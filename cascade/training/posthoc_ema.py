"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2
§3.2 and Appendix C.2): the trainer's power-function EMAs (`cascade.training.ema.PowerEMA`) are saved as snapshots
during training, and an EMA of any relative width σ_rel is reconstructed from them afterwards.

Snapshots: ``<run_dir>/ema_snapshots/step-XXXXXXXX.safetensors``, one per snapshot step, written atomically,
holding every profile in float32 (``"<k>/<parameter>"`` for profile k, ``"buffers/<buffer>"`` for the copied
buffers) and in its metadata the step, the update count t, the step the count started at and the σ_rels / γs.

Reconstruction: the target profile p_{t,γ} (t the update count of the chosen snapshot, γ from σ_rel) is fitted in
least squares by the snapshot profiles p_i up to that snapshot, the normal equations A x = b with A_ij = ⟨p_i, p_j⟩
and b_i = ⟨p_i, p_target⟩ in the closed form of `cascade.ema_profiles.power_profile_dot` (EDM2 Algorithm 3,
eq. 151), solved in float64 and scaled to Σ x = 1; the EMA is Σ_i x_i θ_i. Where the target is one of the tracked
profiles, the fit is that profile alone (x = e_i) and the reconstruction equals the tracked EMA. Snapshots of an
earlier count (a run resumed from a checkpoint without power-EMA state restarts the count) are not mixed in.

Entry points: `reconstruct` (one σ_rel → a state dict), `reconstruct_many` (several, reading each snapshot once:
what scoring σ_rel values needs without writing checkpoints), `posthoc_ema` (the same with the coefficients and
the warm-up record), `write_posthoc_checkpoint` (what ``tools/posthoc_ema.py`` writes).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from cascade import checkpoint
from cascade.atomic import write_atomic
from cascade.ema_profiles import (
    WARMUP_WEIGHT_LIMIT,
    check_sigma_rels,
    gamma_from_sigma_rel,
    power_profile_dot,
    power_ready_step,
    power_warmup_weight,
)
from cascade.nets.build import build_model
from cascade.training.ema import PowerEMA
from cascade.training.runtime import warn

__all__ = [
    "SNAPSHOTS_DIR",
    "PosthocEMA",
    "Snapshot",
    "SnapshotCadence",
    "list_snapshots",
    "posthoc_ema",
    "reconstruct",
    "reconstruct_many",
    "resume_power_ema",
    "solve_coefficients",
    "write_posthoc_checkpoint",
    "write_snapshot",
]

SNAPSHOTS_DIR = "ema_snapshots"
SNAPSHOT_FORMAT = "cascade-power-ema-1"
AUTO_SNAPSHOTS = 32  # trainer.ema_snapshot_every=auto: every max_steps/32 steps (and max_seconds/32 seconds)
AUTO_MIN_GAP = 50  # ... but never closer than this many steps (the end of the run aside)
_SNAPSHOT_RE = re.compile(r"^step-(\d{8,})\.safetensors$")
_BUFFERS = "buffers"


class SnapshotCadence:
    """When the trainer writes a snapshot: ``every`` N steps, or "auto": every max(`AUTO_MIN_GAP`, max_steps // 32)
    steps and, with a time budget (``max_seconds`` > 0), also once max_seconds / 32 seconds have passed since the
    previous one (and at least `AUTO_MIN_GAP` steps), whichever comes first; always at the end of the run. The
    minimum gap keeps a short run (a smoke test of a few dozen steps) from writing a snapshot every step."""

    def __init__(self, every: int | str, max_steps: int, max_seconds: float):
        auto = every == "auto"
        self.steps = max(AUTO_MIN_GAP, max_steps // AUTO_SNAPSHOTS) if auto else int(every)
        self.seconds = max_seconds / AUTO_SNAPSHOTS if auto and max_seconds > 0 else None
        self.min_gap = AUTO_MIN_GAP if auto else 1
        self.since = time.perf_counter()
        self.last_step = 0  # the step of the last snapshot (the run's start counts as one)

    def due(self, step: int, last: bool = False) -> bool:
        now = time.perf_counter()
        gap_ok = step - self.last_step >= self.min_gap
        due = last or step % self.steps == 0 or (
            self.seconds is not None and now - self.since >= self.seconds and gap_ok)
        if due:
            self.since, self.last_step = now, step
        return due


def snapshot_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / SNAPSHOTS_DIR / f"step-{int(step):08d}.safetensors"


def write_snapshot(run_dir: str | Path, ema: PowerEMA, step: int) -> Path:
    """Write ``ema``'s profiles (float32) as the snapshot of ``step``, atomically (`cascade.atomic.write_atomic`)."""
    tensors = {f"{_BUFFERS}/{name}": b.detach().to("cpu").contiguous().clone() for name, b in ema.buffers.items()}
    for k, averages in enumerate(ema.averages):
        tensors.update({f"{k}/{name}": p.detach().to("cpu", torch.float32).contiguous().clone()
                        for name, p in averages.items()})
    metadata = {"format": SNAPSHOT_FORMAT, "step": str(int(step)), "num_updates": str(ema.num_updates),
                "start_step": str(ema.start_step), "sigma_rels": json.dumps(list(ema.sigma_rels)),
                "gammas": json.dumps(list(ema.gammas))}
    path = snapshot_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, safetensors_bytes(tensors, metadata=metadata))
    return path


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file's record: its step, update count t, the step the count started at, σ_rels and γs."""

    path: Path
    step: int
    num_updates: int
    start_step: int
    sigma_rels: tuple[float, ...]
    gammas: tuple[float, ...]


def _read_snapshot(path: Path) -> Snapshot:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {SNAPSHOT_FORMAT!r}")
        return Snapshot(path, int(meta["step"]), int(meta["num_updates"]), int(meta["start_step"]),
                        tuple(float(s) for s in json.loads(meta["sigma_rels"])),
                        tuple(float(g) for g in json.loads(meta["gammas"])))
    except Exception as err:  # noqa: BLE001 - safetensors, JSON and key errors all mean "unreadable"
        raise checkpoint.CheckpointError(f"EMA snapshot {path} is damaged or unreadable ({type(err).__name__}: "
                                         f"{err}); move it away to reconstruct from the others") from None


def list_snapshots(run_dir: str | Path) -> list[Snapshot]:
    """A run's snapshots, oldest first (CheckpointError naming a damaged one)."""
    root = Path(run_dir) / SNAPSHOTS_DIR
    files = sorted(p for p in root.glob("step-*.safetensors") if _SNAPSHOT_RE.match(p.name)) if root.is_dir() else []
    return sorted((_read_snapshot(p) for p in files), key=lambda s: s.step)


def solve_coefficients(profiles: list[tuple[float, float]], target: tuple[float, float]) -> list[float]:
    """Least-squares weights x (Σ x = 1) of the power-function profiles ``profiles`` [(t_i, γ_i)] whose mix best fits
    the profile ``target`` (t, γ): the normal equations A x = b, A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_target⟩
    (EDM2 Algorithm 3), in float64; a singular A falls back to the minimum-norm least-squares solution."""
    a = torch.tensor([[power_profile_dot(*p, *q) for q in profiles] for p in profiles], dtype=torch.float64)
    b = torch.tensor([[power_profile_dot(*p, *target)] for p in profiles], dtype=torch.float64)
    try:
        x = torch.linalg.solve(a, b)
    except RuntimeError:  # torch.linalg.LinAlgError: a singular system (e.g. two identical profiles)
        x = torch.linalg.lstsq(a, b, driver="gelsd").solution
    x = x[:, 0] / x.sum()  # EDM2 Algorithm 3: normalise the weights to sum to 1
    return [float(v) for v in x]


@dataclass
class PosthocEMA:
    """One reconstruction: its σ_rel and γ, the target snapshot's step / update count / count start, the snapshots
    used, their (snapshot index, profile index, coefficient) terms and the reconstructed state dict (float32)."""

    sigma_rel: float
    gamma: float
    step: int
    num_updates: int
    start_step: int
    snapshots: tuple[Snapshot, ...]
    terms: list[tuple[int, int, float]]
    state_dict: dict[str, torch.Tensor]

    def warmup_weight(self, warmup_steps: int) -> float:
        """Share of the reconstruction carried by the first ``warmup_steps`` steps' weights: Σ x_i · (that of
        profile i) (`cascade.ema_profiles`)."""
        w = max(0, int(warmup_steps) - self.start_step)
        return sum(x * power_warmup_weight(self.snapshots[s].num_updates, self.snapshots[s].gammas[k], w)
                   for s, k, x in self.terms)

    def record(self, warmup_steps: int) -> dict[str, Any]:
        """The checkpoint config's ``ema`` record (what `checkpoint.load_stage`'s warm-up guard reads); the ready
        step is the target profile's, (W / t)^(γ+1) ≤ 0.25."""
        w = max(0, int(warmup_steps) - self.start_step)
        return {"kind": "posthoc", "sigma_rel": self.sigma_rel, "gamma": self.gamma, "snapshots": len(self.snapshots),
                "num_updates": self.num_updates, "start_step": self.start_step, "warmup_steps": int(warmup_steps),
                "warmup_weight": self.warmup_weight(warmup_steps), "threshold": WARMUP_WEIGHT_LIMIT,
                "ready_step": self.start_step + power_ready_step(self.gamma, w)}


def _no_snapshots(run_dir: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{run_dir} holds no EMA snapshots ({SNAPSHOTS_DIR}/step-*.safetensors): trained with "
                             "trainer.ema_sigma_rels=[]? post-hoc EMA needs a run trained with power EMAs (the "
                             "default trainer.ema_sigma_rels=[0.05,0.1])")


def _select(run_dir: Path, step: int | None) -> list[Snapshot]:
    """The snapshots a reconstruction at ``step`` (None: the last snapshot) uses: those up to it of its count."""
    found = list_snapshots(run_dir)
    if not found:
        raise _no_snapshots(run_dir)
    if step is None:
        target = found[-1]
    else:
        at = [s for s in found if s.step == int(step)]
        if not at:
            steps = ", ".join(str(s.step) for s in found[-8:])
            raise ValueError(f"{run_dir} has no EMA snapshot at step {step}; its snapshots are at steps ... {steps}")
        target = at[0]
    usable = {}
    for snap in found:  # one per update count: a skipped step can give two snapshots the same profile
        if snap.step <= target.step and snap.start_step == target.start_step and snap.num_updates > 0:
            usable[snap.num_updates] = snap
    if target.num_updates not in usable:
        raise ValueError(f"the EMA snapshot {target.path} holds no update yet; reconstruct at a later step")
    return sorted(usable.values(), key=lambda s: s.step)


def posthoc_ema(run_dir: str | Path, sigma_rels: list[float] | tuple[float, ...],
                step: int | None = None) -> list[PosthocEMA]:
    """Reconstruct the EMA of each σ_rel in ``sigma_rels`` at the snapshot of ``step`` (None: the last), using the
    snapshots up to it; each snapshot is read once. Returns one `PosthocEMA` per σ_rel, in order.

    Errors (one line each): FileNotFoundError for a run without snapshots (trained with
    ``trainer.ema_sigma_rels=[]``), ValueError for a σ_rel outside (0, 0.3) or repeated, or a step without a
    snapshot; `checkpoint.CheckpointError` for a damaged snapshot."""
    run_dir = Path(run_dir)
    sigma_rels = tuple(float(s) for s in sigma_rels)
    if not sigma_rels:
        raise ValueError("give at least one sigma_rel, e.g. 0.05")
    check_sigma_rels(sigma_rels, "sigma_rel")
    snaps = _select(run_dir, step)
    target = snaps[-1]
    columns = [(s, k) for s in range(len(snaps)) for k in range(len(snaps[s].gammas))]
    column_of = {sk: i for i, sk in enumerate(columns)}
    profiles = [(float(snaps[s].num_updates), snaps[s].gammas[k]) for s, k in columns]
    gammas = [gamma_from_sigma_rel(s) for s in sigma_rels]
    weights = [solve_coefficients(profiles, (float(target.num_updates), g)) for g in gammas]
    sums: list[dict[str, torch.Tensor]] = [{} for _ in sigma_rels]
    buffers: dict[str, torch.Tensor] = {}
    for s, snap in enumerate(snaps):
        with safe_open(str(snap.path), framework="pt") as f:
            keys = list(f.keys())
            for k in range(len(snap.gammas)):
                prefix = f"{k}/"
                for key in (key for key in keys if key.startswith(prefix)):
                    tensor = f.get_tensor(key).to(torch.float64)
                    name = key[len(prefix):]
                    for out, x in zip(sums, weights):
                        c = x[column_of[(s, k)]]
                        out[name] = out[name] + c * tensor if name in out else c * tensor
            if snap is target:
                buffers = {key[len(_BUFFERS) + 1:]: f.get_tensor(key) for key in keys
                           if key.startswith(_BUFFERS + "/")}
    results = []
    for sigma_rel, gamma, x, out in zip(sigma_rels, gammas, weights, sums):
        state = {**buffers, **{name: v.to(torch.float32) for name, v in out.items()}}
        terms = [(s, k, x[i]) for i, (s, k) in enumerate(columns)]
        results.append(PosthocEMA(sigma_rel, gamma, target.step, target.num_updates, target.start_step,
                                  tuple(snaps), terms, state))
    return results


def reconstruct(run_dir: str | Path, sigma_rel: float, step: int | None = None) -> dict[str, torch.Tensor]:
    """The post-hoc EMA of width ``sigma_rel`` in (0, 0.3) at the snapshot of ``step`` (None: the last snapshot;
    later snapshots are not used), as a float32 state dict that loads into the stage's model. Errors as
    `posthoc_ema`."""
    return posthoc_ema(run_dir, [sigma_rel], step)[0].state_dict


def reconstruct_many(run_dir: str | Path, sigma_rels: list[float] | tuple[float, ...],
                     step: int | None = None) -> dict[float, dict[str, torch.Tensor]]:
    """{σ_rel: state dict} for several widths, reading every snapshot once (to score σ_rel values without writing
    checkpoints: load each into ``checkpoint.load_stage(run_dir)``'s model). Errors as `posthoc_ema`."""
    return {r.sigma_rel: r.state_dict for r in posthoc_ema(run_dir, sigma_rels, step)}


def _run_warmup_steps(record: dict[str, Any]) -> int:
    trainer = (record.get("train") or {}).get("trainer") or {}
    return int(trainer.get("warmup_steps", 0))


def posthoc_out_dir(run_dir: str | Path, sigma_rel: float) -> Path:
    """The default output folder of a reconstruction: ``<run_dir>/posthoc/sigma-0.050``."""
    return Path(run_dir) / "posthoc" / f"sigma-{sigma_rel:.3f}"


def write_posthoc_checkpoint(run_dir: str | Path, result: PosthocEMA, out_dir: str | Path) -> Path:
    """Write ``result`` as a normal checkpoint in the run folder ``out_dir`` (`checkpoint.save_checkpoint`): the
    run's checkpoint at the reconstruction's step (else its newest) with its ``ema`` weights replaced by the
    reconstruction and its config's ``ema`` record saying so (kind posthoc, σ_rel, the snapshots used, the warm-up
    weight and ready step); sampling and evaluation load it as any checkpoint. Returns the step folder."""
    run_dir = Path(run_dir)
    source = checkpoint.latest_checkpoint(run_dir)
    at_step = run_dir / checkpoint.CHECKPOINTS_DIR / checkpoint.step_dir_name(result.step)
    if (at_step / checkpoint.CONFIG_FILE).is_file():
        source = at_step
    if source is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint to take the model and its configuration from "
                                f"(expected {checkpoint.CHECKPOINTS_DIR}/step-*/config.json)")
    record = checkpoint.load_config(source)
    model_w = checkpoint.load_weights(source, "model")
    stage_model = build_model(checkpoint.load_stage_config(source))
    checkpoint.check_weights_fit(stage_model, result.state_dict, source, "ema")  # snapshots of this run's network
    stage_model.load_state_dict(result.state_dict)
    ema_w = stage_model.state_dict()  # the keys a checkpoint of this network holds (its state-dict hooks applied)
    ema = {**result.record(_run_warmup_steps(record)), "checkpoint_step": int(record["step"])}
    config = {k: v for k, v in record.items() if k not in ("format_version", "step")}
    config["ema"] = ema
    # Every checkpoint already in out_dir is kept (one of a later step must not prune this one); `latest` names this.
    kept = len(checkpoint.list_checkpoints(Path(out_dir) / checkpoint.CHECKPOINTS_DIR)) + 1
    return checkpoint.save_checkpoint(out_dir, result.step, weights={"model": model_w, "ema": ema_w},
                                      training_state=checkpoint.load_training_state(source), config=config,
                                      keep_last=kept)


def resume_power_ema(ema: PowerEMA, saved: dict[str, Any] | None, step: int, *, say: bool) -> None:
    """Continue ``ema`` from a checkpoint's power-EMA state (``training_state["power_ema"]``). Without one (a
    checkpoint written before power EMAs were tracked) or with one of other σ_rels, the EMAs start afresh at
    ``step`` with a warning (``say``: the main process); reconstructions then use the snapshots from there on."""
    if saved is not None:
        try:
            ema.load_state_dict(saved)
            return
        except (KeyError, ValueError) as err:
            reason = f"the checkpoint's power-EMA state does not fit ({err})"
    else:
        reason = "the checkpoint holds no power-EMA state"
    ema.start_step = int(step)
    if say:
        warn(f"{reason}: the power EMAs (post-hoc EMA) start afresh at step {step}; reconstructions use the "
             "snapshots from there on")
