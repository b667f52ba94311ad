"""A study: the same training under several schedules ("arms") and seeds,
reported as mean ± sd per arm and, against the direct baseline, the paired
difference per seed with a 95% confidence interval (paired t).

    out/seed-<s>/             one run directory per seed (ctmq.engine.run): every
                              arm's stages, the shared first FP stage trained once
    out/study.json, study.csv, study.png

Arms:
    direct        FP -> target bits, the same total epochs as ctmq
    direct-final  FP -> target bits for as many epochs as ctmq's final stage
    ladder        one cycle of the ladder, the same total epochs as ctmq
    ctmq          the cyclic schedule
    <name>        a schedule of the configuration's `schedules` (Schedule.custom)
Resumable as runs are: a seed's complete stages are skipped.
"""

import dataclasses
import math
import os

from .report import save_top1_figure, write_files
from .run import RunConfig, RunConfigError, run
from .schedule import Schedule

ARMS = ("direct", "direct-final", "ladder", "ctmq")
BASELINE = "direct"

# Student's t, 97.5% quantile, for 1..30 degrees of freedom
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with df degrees of freedom (a table
    to 30, then the Cornish-Fisher expansion around the normal 1.95996)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_interval(diffs):
    """{"mean", "sd", "n", "low", "high"} of per-seed differences: a 95%
    confidence interval for the mean difference by the paired t test (sd and
    interval None with fewer than 2 seeds)."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return {"mean": mean, "sd": None, "n": n, "low": None, "high": None}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "low": mean - half, "high": mean + half}


def _mean_sd(values):
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def arm_schedules(cfg: RunConfig, arms, custom=None):
    """{arm: Schedule} for cfg's ladder settings."""
    custom = custom or {}
    ctmq = Schedule.ctmq(
        cfg.start_bits,
        cfg.target_bits,
        cfg.cycles,
        cfg.epochs_per_stage,
        cfg.resolved_fp_epochs(),
        cfg.final_epochs,
    )
    first = ctmq.stages[0]
    fp = first.epochs if first.is_fp and first.cycle == 1 else 0
    out = {}
    for arm in arms:
        if arm == "ctmq":
            out[arm] = ctmq
        elif arm == "direct":
            out[arm] = Schedule.direct_matching(ctmq)
        elif arm == "direct-final":
            out[arm] = dataclasses.replace(
                Schedule.direct(cfg.target_bits, ctmq.stages[-1].epochs, fp), name=arm
            )
        elif arm == "ladder":
            out[arm] = Schedule.ladder(cfg.start_bits, cfg.target_bits, ctmq.total_epochs - fp, fp)
        elif arm in custom:
            out[arm] = Schedule.custom(arm, custom[arm], fp)
        else:
            raise RunConfigError(
                f"arm {arm!r}: expected one of {ARMS} or a schedule of the "
                f"configuration's 'schedules' ({sorted(custom)})"
            )
    return out


def study(cfg: RunConfig, seeds, arms=ARMS, custom=None, restart=False, log=print):
    """Train every arm for every seed (one run directory per seed under
    cfg.out) and write the study report; returns it."""
    seeds, arms = list(seeds), list(dict.fromkeys(arms))
    if (
        not seeds
        or len(set(seeds)) != len(seeds)
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise RunConfigError(f"seeds must be distinct integers, at least one, got {seeds}")
    if BASELINE not in arms:
        arms.insert(0, BASELINE)  # the paired differences are against it
    schedules = arm_schedules(cfg, arms, custom)
    runs = {}
    for seed in seeds:
        seed_cfg = dataclasses.replace(cfg, seed=seed, out=os.path.join(cfg.out, f"seed-{seed}"))
        log(f"seed {seed}: {', '.join(arms)}")
        runs[seed] = run(seed_cfg, restart=restart, log=log, schedules=list(schedules.values()))
    rep = summarize(runs, schedules, cfg.flat())
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone writes
        write(cfg.out, rep)
    return rep


def summarize(runs, schedules, config):
    """The study report from the runs' reports ({seed: report}); per-seed
    values are keyed by str(seed), as in study.json."""
    runs = {str(s): r for s, r in sorted(runs.items())}
    seeds = list(runs)
    arms = {}
    for name, sched in schedules.items():
        finals = {s: runs[s]["final"][name] for s in seeds}
        rows = {s: [r for r in runs[s]["stages"] if r["schedule"] == name] for s in seeds}
        top1 = [finals[s]["top1"] for s in seeds]
        top5 = [finals[s]["top5"] for s in seeds]
        (m1, sd1), (m5, sd5) = _mean_sd(top1), _mean_sd(top5)
        arms[name] = {
            "stages": [dataclasses.asdict(st) for st in sched.stages],
            "epochs": sched.total_epochs,
            "seconds": {s: sum(r["seconds"] for r in rows[s]) for s in seeds},
            "top1": {s: finals[s]["top1"] for s in seeds},
            "top5": {s: finals[s]["top5"] for s in seeds},
            "top1_mean": m1,
            "top1_sd": sd1,
            "top5_mean": m5,
            "top5_sd": sd5,
            "curve": {s: [r["top1"] for r in rows[s]] for s in seeds},
        }
    base = arms[BASELINE]["top1"]
    for arm in arms.values():
        diffs = [arm["top1"][s] - base[s] for s in seeds]
        arm["vs_direct"] = dict(
            paired_interval(diffs),
            per_seed=dict(zip(seeds, diffs, strict=True)),
            test="paired t, 95% two-sided",
        )
    return {"config": config, "seeds": [int(s) for s in seeds], "baseline": BASELINE, "arms": arms}


CSV_COLUMNS = [
    "arm",
    "seeds",
    "epochs",
    "seconds_mean",
    "top1_mean",
    "top1_sd",
    "top5_mean",
    "top5_sd",
    "diff_vs_direct",
    "ci95_low",
    "ci95_high",
]


def _csv_rows(rep):
    for name, arm in rep["arms"].items():
        v = arm["vs_direct"]
        secs = list(arm["seconds"].values())
        yield {
            "arm": name,
            "seeds": len(rep["seeds"]),
            "epochs": arm["epochs"],
            "seconds_mean": sum(secs) / len(secs),
            "top1_mean": arm["top1_mean"],
            "top1_sd": arm["top1_sd"],
            "top5_mean": arm["top5_mean"],
            "top5_sd": arm["top5_sd"],
            "diff_vs_direct": v["mean"],
            "ci95_low": v["low"],
            "ci95_high": v["high"],
        }


def write(out_dir, rep):
    write_files(out_dir, "study", rep, CSV_COLUMNS, list(_csv_rows(rep)), _plot)


def _plot(path, rep):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, arm) in enumerate(rep["arms"].items()):
        x, epochs = [], 0
        for st in arm["stages"]:
            epochs += st["epochs"]
            x.append(epochs)
        for j, seed in enumerate(rep["seeds"]):
            ax.plot(
                x,
                arm["curve"][str(seed)],
                marker="o",
                ms=3,
                lw=1,
                alpha=0.8,
                color=colors[k % len(colors)],
                label=name if j == 0 else None,
            )
    save_top1_figure(fig, ax, path, "top-1 after each stage, one line per seed")


def format_table(rep):
    lines = [
        f"{'arm':14s} {'epochs':>6s} {'sec':>7s} {'top-1 mean ± sd':>17s} "
        f"{'top-5 mean ± sd':>17s} {'vs direct (95% CI, paired t)':>32s}"
    ]
    for row in _csv_rows(rep):

        def pm(m, sd):
            return f"{m:6.2f} ± {sd:5.2f}" if sd is not None else f"{m:6.2f}"

        ci = (
            f"{row['diff_vs_direct']:+6.2f} [{row['ci95_low']:+6.2f}, {row['ci95_high']:+6.2f}]"
            if row["ci95_low"] is not None
            else f"{row['diff_vs_direct']:+6.2f}"
        )
        lines.append(
            f"{row['arm']:14s} {row['epochs']:6d} {row['seconds_mean']:7.1f} "
            f"{pm(row['top1_mean'], row['top1_sd']):>17s} "
            f"{pm(row['top5_mean'], row['top5_sd']):>17s} {ci:>32s}"
        )
    lines.append(f"{len(rep['seeds'])} seeds: {rep['seeds']}")
    return "\n".join(lines)
