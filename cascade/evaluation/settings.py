"""`MetricSettings`: which optional metrics an evaluation or a sweep computes, checked once when built.

The command lines build one from their options (`cascade.cli.metric_settings`), `evaluate` and `sweep` carry
it whole, and the scoring below them trusts it. The one check it cannot make alone needs the data:
precision / recall's k against the number of samples (`MetricSettings.check_sample_count`).
"""

from __future__ import annotations

from dataclasses import dataclass

from cascade.checks import coerce_fields, is_int_at_least
from cascade.evaluation.cas import DEFAULT_CAS, CASSettings
from cascade.evaluation.metrics import PR_K
from cascade.pipeline.cascade_pipeline import CascadeConfigError


@dataclass(frozen=True)
class MetricSettings:
    """The optional metrics, each named by the command-line option that sets it.

    - ``pr_k`` (--pr-k): k of the k-NN manifolds of precision / recall (Kynkäänniemi et al. 2019 "Improved
      Precision and Recall Metric for Assessing Generative Models", eq. 1), an integer >= 0; 0 leaves them out.
    - ``bootstrap`` (--bootstrap): B >= 2 resamplings of the generated set for a 95% interval of FID
      (`cascade.evaluation.metrics.fid_bootstrap`), or 0 for none.
    - ``cas_per_class`` (--cas): Classification Accuracy Score (Ravuri & Vinyals 2019) from N >= 1 generated
      images per class, or None for none; ``cas``: how its classifier is trained (--cas-steps).
    - ``memorisation`` (--memorisation): nearest training image of every sample (evaluations only).
    - ``baselines`` (--baselines): a row per SR stage for its real input upsampled (evaluations only).
    - ``allow_damaged_val`` (--allow-damaged-val): compare against the readable val images even when fewer than
      half of the split is readable (`cascade.evaluation.sample_lists.load_eval_data`; otherwise refused).
    - ``stats_dir`` (--stats-dir): the folder caching the real-image statistics, or None for `<data>/fid_stats`
      (`cascade.evaluation.reference_stats.stats_folder` chooses it before any sampling).

    Raises ValueError with one line naming the option, what it must be and what it got.
    """

    pr_k: int = PR_K
    bootstrap: int = 0
    cas_per_class: int | None = None
    cas: CASSettings = DEFAULT_CAS
    memorisation: bool = False
    baselines: bool = False
    allow_damaged_val: bool = False
    stats_dir: str | None = None

    def __post_init__(self) -> None:
        if not is_int_at_least(self.pr_k, 0):
            raise ValueError(f"--pr-k must be >= 0 (0 leaves precision / recall out), got {self.pr_k!r}")
        if not is_int_at_least(self.bootstrap, 0) or self.bootstrap == 1:
            raise ValueError(f"--bootstrap must be 0 (off) or >= 2 resamples, got {self.bootstrap!r}")
        if self.cas_per_class is not None and not is_int_at_least(self.cas_per_class, 1):
            raise ValueError(f"--cas: needs at least 1 generated image per class, got {self.cas_per_class!r}")
        if not isinstance(self.cas, CASSettings):
            raise ValueError(f"cas must be a CASSettings, got {type(self.cas).__name__}")  # noqa: TRY004 (a setting)
        coerce_fields(self, "metrics")  # memorisation, baselines, allow_damaged_val: booleans

    @property
    def precision_recall_k(self) -> int | None:
        """k of precision / recall, None when they are left out (`compute_fid_kid`'s pr_k)."""
        return self.pr_k or None

    def check_sample_count(self, num_samples: int) -> None:
        """Precision / recall need more samples per stage than k; raises CascadeConfigError naming the flags."""
        if self.pr_k and self.pr_k >= num_samples:
            raise CascadeConfigError(f"--pr-k: precision/recall with k={self.pr_k} needs more than {self.pr_k} "
                                     f"samples per stage, got {num_samples}; raise --num-samples or lower --pr-k")


DEFAULT_METRICS = MetricSettings()
