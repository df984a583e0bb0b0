"""The demo report's text: the headline per stage, what each number means, teacher against student of every
distilled stage, and the page's blocks."""

from __future__ import annotations

from pathlib import Path

EXPLANATION = [
    ("Sample counts first: every FID carries its count n. FID is biased upwards at small n (the bias falls "
    "roughly as 1/n) and this demo evaluates on a few dozen images, far below the 2,048 FID needs, so its FIDs "
    "are marked *biased*: compare them only between rows with the same n. KID (kernel distance) is unbiased, so "
    "the compact tables lead with it; at small n it is noisy and can be slightly negative: read KID within its "
    "± std of 0 as 'indistinguishable at this n'."),
    ("FID and KID compare the distribution of generated images with the held-out val photographs at each "
    "stage's resolution, measured in the feature space named in brackets (here the demo's own classifier32, "
    "trained on the same crops: numbers are comparable only within this report, not with published "
    "Inception FIDs). Lower is better; the real val set against itself scores 0."),
    ("Precision / recall (Kynkäänniemi et al. 2019, k = 3 nearest neighbours, same feature space): precision is "
    "the fraction of samples that fall inside the real images' manifold (quality), recall the fraction of real "
    "images inside the samples' manifold (diversity / coverage). Both in [0, 1], higher is better; FID mixes "
    "the two."),
    ("Teacher-forced: an SR stage receives the real low-resolution val image (the stage judged alone). "
    "Cascaded: it receives the previous stage's sample (what a user gets). The gap between the two rows "
    "shows how much an SR stage suffers from its imperfect input; conditioning augmentation is what keeps "
    "this gap small."),
    ("CAS (Classification Accuracy Score, Ravuri & Vinyals 2019; the second headline number of the Cascaded "
    "Diffusion Models paper): a fresh small CNN trained only on generated images (a few per class here) and "
    "tested on the real val photographs, next to the same CNN trained on as many real training crops (the "
    "ceiling, 'real'). Near the ceiling: the samples carry what tells the classes apart, in real variety. "
    "With this few images per class both numbers are rough."),
    ("Memorised: the fraction of samples closer to a training crop than half the typical distance between two "
    "training crops of the same class, in the classifier's feature space and in 32² pixels; 'val' is the same "
    "test on held-out real crops (the chance rate). Well above the val rate: the generator copies training "
    "images. The closest pairs (sample left, nearest training crop right) are shown so you can look."),
    ("Patch FID [classifier32-features-patch32]: the same FID on 32×32 patches cut from each image at its own "
    "resolution (up to 4×4 patches per image). Whole-image features see every stage at 32², so they judge "
    "content and colour; patch features see the texture and detail an SR stage adds, so they tell a sharp, "
    "realistic 256² image from a blurred or noisy one."),
    ("Detail ratio (SR stages): the RMS of each image's detail above the stage's input size (the image minus "
    "its own down- and re-upsampled version) relative to the same measure on the real val photographs. About "
    "1: as much fine detail as real photographs; near the bicubic point: the stage only upsamples; well above "
    "1: noise. It says how much detail is added, not whether it is right: read it with the consistency PSNR "
    "(the plot puts the two side by side) and the FIDs."),
    ("Rows \"<stage> (bicubic)\": the real low-resolution inputs upsampled with bicubic interpolation and scored "
    "like a stage's output: the baseline an SR stage must beat. Its consistency PSNR is the ceiling for a "
    "stage that only upsamples; the small classifier's patch features hardly react to blur, so at this "
    "scale the patch FIDs of a stage and of its bicubic row are close."),
    ("Consistency PSNR: the SR output downsampled back to the input size against the input it was given, in dB. "
    "High values (≳ 25 dB) mean the stage adds detail without changing the content it was conditioned on."),
    ("Class accuracy: the fraction of generated images that classifier32 (trained on real crops) assigns to the "
    "class they were sampled for. Chance is 1 / number of classes; well above chance means the class "
    "conditioning (with classifier-free guidance) works. Unlike CAS it rewards class-typical images and says "
    "nothing about diversity."),
    ("IS (Inception Score with the classifier's logits) is high when samples are confidently classified and "
    "all classes are covered."),
]


def budget_words(budget, name: str) -> str:
    """A stage's training budget in words: "330 s, at most 5000 steps"."""
    seconds = (budget.train_seconds or {}).get(name)
    steps = f"{budget.train_steps[name]} steps"
    return f"{seconds:g} s, at most {steps}" if seconds else steps


METHOD_WORDS = {  # `cascade.training.distill`'s methods, as the report names them
    "step": "guided step distillation, Salimans & Ho 2022 with guidance as in Meng et al. 2023",
    "consistency": "guided consistency distillation, Luo et al. 2023",
    "guidance": "guidance distillation, Meng et al. 2023",
}


def and_list(names) -> str:
    """"a", "a and b", "a, b and c"."""
    names = list(names)
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def distill_words(budget, name: str) -> str:
    """A stage's distillation budget in words: "60 s, at most 5000 steps" or "4 steps"."""
    steps, seconds = budget.distill_budget(name)
    return f"{seconds:g} s, at most {steps} steps" if seconds else f"{steps} steps"


def _metric_value(r: dict) -> str:
    """A side's headline value: KID ± std, or an SR stage's detail ratio at its consistency."""
    if r["metric_std"] is None:
        return f"{r['metric']:.3f} at {r['consistency_db']:.1f} dB (n={r['num_samples']})"
    return f"{r['metric']:.5f} ± {r['metric_std']:.5f} (n={r['num_samples']})"


def distillation_blocks(rows: list[dict], budget, out: Path) -> list:
    """The report's distillation section: per distilled stage a teacher row and a student row (checkpoint, sampler,
    NFE/image, the headline metric, the seconds sampling the scored images took) and which of the two the cascade
    used (`cascade.harness.demo.compare_students`' rows, at least one)."""
    table = []
    for row in rows:
        for side in ("teacher", "student"):
            r = row[side]
            path = Path(r["checkpoint"])
            shown = path.relative_to(out).as_posix() if path.is_relative_to(out) else str(path)
            table.append([row["stage"], side, f"{shown} (step {r['step']})", r["sampler"], f"{r['nfe_per_image']:g}",
                          row["metric"], _metric_value(r),
                          f"{r['fid']:.2f}", f"{r['sample_seconds']:.2f}", "yes" if row["used"] == side else "no"])
    n, method = rows[0]["teacher"]["num_samples"], rows[0]["method"]
    return [
        ("h2", "Distillation"),
        ("p", (f"After training, {and_list(r['stage'] for r in rows)} {'were each' if len(rows) > 1 else 'was'} "
               "distilled into a few-step student "
               f"({METHOD_WORDS.get(method, method + ' distillation')}, "
               "starting from the teacher's weights; "
               + "; ".join(f"{r['stage']}: {distill_words(budget, r['stage'])}" for r in rows)
               + "). Teacher and student of a stage are scored on the same "
               f"{n} teacher-forced samples (the stage alone, on the real low-resolution val inputs, one seed) by the "
               "stage's headline metric: for the base stage KID in the whole-image features (content, colour, "
               "class; lower is better), for an SR stage the detail ratio among outputs at least 30 dB consistent "
               "with their input (the detail it adds; higher is better). A tie goes to the student (fewer network "
               "evaluations). The samples above and the metrics below use the row marked used. The choice and its "
               "scores come from the same few samples: a difference within the KID's ± std says 'no worse at this "
               "n', not 'better'. FID (biased at this n) is shown for "
               "comparison within a stage; sampling s: the seconds sampling those images took on this machine.")),
        ("table", ["stage", "weights", "checkpoint", "sampler", "NFE/image", "headline metric", "value", "FID",
                   "sampling s", "used"], table),
    ]



def trained_steps(final: Path) -> int:
    from cascade import checkpoint

    return int(checkpoint.load_training_state(final)["step"])



def _headline(results: dict, num_classes: int) -> list[str]:
    """One line per stage from its cascaded metrics: class accuracy, and for SR stages the detail ratio (next
    to that of the bicubic-upsampled input) and the consistency PSNR."""
    from cascade.evaluation.evaluate import BASELINE_SUFFIX

    lines = []
    for stage, modes in results.items():
        if stage.endswith(BASELINE_SUFFIX):
            continue
        metrics = modes.get("cascaded", modes.get("teacher-forced", {}))
        line = f"{stage}: class accuracy {metrics.get('class_accuracy', float('nan')):.0%} (chance {1 / num_classes:.0%})"
        baseline = results.get(stage + BASELINE_SUFFIX, {}).get("teacher-forced")
        if "detail_ratio" in metrics:
            line += f"; detail ratio {metrics['detail_ratio']:.2f}"
            if baseline is not None:
                line += f" (bicubic-upsampled input: {baseline['detail_ratio']:.2f}; real images: 1)"
        if "consistency_psnr" in metrics:
            line += f"; consistency {metrics['consistency_psnr']:.1f} dB"
        if "cas" in metrics:
            line += f"; CAS {metrics['cas']['top1']:.0%} (real-data ceiling {metrics['cas']['real_top1']:.0%})"
        lines.append(line)
    return lines


def report_blocks(budget, settings, class_names, grids, real_grid, curves, evaluation, result, out: Path) -> list:
    """The demo report's blocks (`cascade.evaluation.pages.write_report_pages`' format): samples, metrics,
    their meaning, training curves and timings."""
    from cascade.evaluation.tables import BASELINE_SUFFIX, SMALL_SAMPLE_NOTE, report_table, summary_table

    columns, table = report_table(evaluation.results)
    rows = [[stage] + [cells.get(c, "–") for c in columns] for stage, cells in table.items()]
    headline = _headline(evaluation.results, len(class_names))
    if result.distillation:
        headline.insert(0, "weights per stage: " + ", ".join(
            f"{n} {w}" + (f" ({result.students[n].relative_to(out).as_posix()})" if w == "student" else "")
            for n, w in result.weights.items()))
    blocks = [
        ("p", ("Everything on this page was produced by `python tools/demo.py` on this machine: shards of "
              f"{len(class_names)} built-in photographs (one class per photograph, random multi-scale crops), "
              "the five stages trained from scratch at the `tiny` preset, every class sampled through "
              "base32 → sr64 → sr128 → sr256 with classifier-free guidance, and every stage evaluated."
              + (f" {and_list(result.students)} {'were' if len(result.students) > 1 else 'was'} also distilled "
                 "into a few-step student; each stage samples with the weights that scored better (see "
                 "Distillation)." if result.distillation else ""))),
        ("list", [f"classes: {', '.join(f'{i} {n}' for i, n in enumerate(class_names))}",
                  ("sampling per stage (each stage's own settings, stored in its checkpoint): "
                   + "; ".join(f"{n}: {s.sampler} {s.steps} steps, w = {s.w:g}"
                               + (f", s = {s.aug_level:g}" if s.aug_level is not None else "")
                               for n, s in settings.items())),
                  *headline]),
        ("h2", "Samples"),
        ("p", ("Rows are classes (in the order listed above), columns are independent samples. Compare with the "
              "real val crops at the end: a sample belongs to its class when its colours and textures match "
              "that row's photograph; each SR stage should keep the previous stage's layout and add detail.")),
    ]
    for name, path in grids.items():
        blocks.append(("img", path.relative_to(out).as_posix(), f"{name}: samples per class"))
    blocks += [
        ("img", real_grid.relative_to(out).as_posix(), "real val crops at 256² (for comparison)"),
        ("img", "samples/grid.png", "the cascade per sample: columns are stages (each shown at 256²)"),
        *(distillation_blocks(result.distillation, budget, out) if result.distillation else []),
        ("h2", "Metrics"),
        ("p", (f"{evaluation.meta['num_samples']} generated images per stage and mode (n below), CAS from "
               f"{budget.cas_per_class} per class. " + SMALL_SAMPLE_NOTE)),
    ]
    for stage, by_mode in evaluation.results.items():
        if stage.endswith(BASELINE_SUFFIX):
            continue
        blocks += [("h3", stage), ("table", *summary_table(by_mode))]
    if (out / "results.png").is_file():
        blocks.append(("img", "results.png", ("detail ratio against consistency PSNR per SR stage: teacher-forced, "
                                              "cascaded and the bicubic-upsampled input; real images have detail "
                                              "ratio 1 (dashed)")))
    for stage in evaluation.pairs:
        blocks.append(("img", f"memorisation-{stage}.png",
                       f"{stage}: the samples closest to a training crop (left) next to that crop (right)"))
    blocks += [
        ("h3", "What the numbers mean"),
        ("list", EXPLANATION),
        ("h3", "Full table"),
        ("table", ["stage", *columns], rows),
        ("h2", "Training"),
        ("img", curves.relative_to(out).as_posix(),
         ("training loss per stage (each stage's own objective, stored in its checkpoint; thin lines: loss per "
          "quarter of the t range, high t on the right quarter is the easiest); classifier: cross-entropy and "
          "accuracy on noised inputs"
          + ("; <stage>-distilled: the student's distillation loss" if result.students else ""))),
        ("list", [f"{name}: {trained_steps(result.checkpoints[name])} steps at batch {budget.batch_size[name]} "
                  f"(budget: {budget_words(budget, name)}), checkpoint "
                  f"{result.checkpoints[name].relative_to(out).as_posix()}" for name in result.checkpoints]
         + [f"{name} student: {trained_steps(path)} distillation steps at batch {budget.batch_size[name]} (budget: "
            f"{distill_words(budget, name)}, lr {budget.distill_lr:g}), checkpoint {path.relative_to(out).as_posix()}"
            for name, path in result.students.items()]),
        ("h2", "Timings"),
        ("table", ["step", "seconds"], [[k, v] for k, v in result.seconds.items()]),
    ]
    return blocks
