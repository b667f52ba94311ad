"""Run reports: report.json, report.csv, report.png (CTMQ vs direct per stage)."""

import csv
import io
import json
import os

from ..files import atomic_open

COLUMNS = [
    "schedule",
    "index",
    "key",
    "cycle",
    "label",
    "w_bits",
    "a_bits",
    "epochs",
    "top1",
    "top5",
    "train_loss",
    "seconds",
]


def build(schedules, rows, config):
    """The report dict: config, schedules, per-stage rows, final result per schedule."""
    final = {}
    for s in schedules:
        mine = [r for r in rows if r["schedule"] == s.name]
        if len(mine) == len(s.stages):
            last = mine[-1]
            final[s.name] = {k: last[k] for k in ("label", "top1", "top5")}
    return {
        "config": config,
        "schedules": [s.to_dict() for s in schedules],
        "stages": rows,
        "final": final,
    }


def write(out_dir, report):
    write_files(out_dir, "report", report, COLUMNS, report["stages"], _plot)


def write_files(out_dir, stem, report, columns, rows, plot):
    """<stem>.json (the report), <stem>.csv (rows, these columns) and <stem>.png
    (plot(path, report)) in out_dir, each all or nothing: the one writer of
    the run reports and the study reports."""
    os.makedirs(out_dir, exist_ok=True)
    with atomic_open(os.path.join(out_dir, f"{stem}.json")) as f:
        json.dump(report, f, indent=1)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    with atomic_open(os.path.join(out_dir, f"{stem}.csv")) as f:
        f.write(buf.getvalue())
    plot(os.path.join(out_dir, f"{stem}.png"), report)


def _plot(path, report):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    styles = {"ctmq": ("tab:blue", "o"), "direct": ("tab:orange", "s")}
    for sched in report["schedules"]:
        rows = [r for r in report["stages"] if r["schedule"] == sched["name"]]
        if not rows:
            continue
        x, epochs = [], 0
        for r in rows:
            epochs += r["epochs"]
            x.append(epochs)
        color, marker = styles.get(sched["name"], ("tab:gray", "^"))
        ax.plot(x, [r["top1"] for r in rows], marker=marker, color=color, label=sched["name"])
        for xi, r in zip(x, rows, strict=True):
            ax.annotate(
                r["label"],
                (xi, r["top1"]),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=7,
                color=color,
            )
    cfg = report.get("config", {})
    save_top1_figure(
        fig, ax, path, f"{cfg.get('dataset', '')} {cfg.get('model', '')}: top-1 after each stage"
    )


def save_top1_figure(fig, ax, path, title):
    """Title, axes of top-1 against epochs, legend; written as a PNG, all or nothing."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.set_xlabel("epochs trained")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def format_table(report):
    lines = [
        f"{'schedule':8s} {'#':>2s} {'cycle':>5s} {'stage':6s} {'epochs':>6s} "
        f"{'top1':>6s} {'top5':>6s} {'loss':>7s} {'sec':>6s}"
    ]
    for r in report["stages"]:
        lines.append(
            f"{r['schedule']:8s} {r['index']:2d} {r['cycle']:5d} {r['label']:6s} "
            f"{r['epochs']:6d} {r['top1']:6.2f} {r['top5']:6.2f} "
            f"{r['train_loss']:7.4f} {r['seconds']:6.1f}"
        )
    for name, f in report["final"].items():
        lines.append(
            f"final {name:6s} {f['label']}: top-1 {f['top1']:.2f}%  top-5 {f['top5']:.2f}%"
        )
    return "\n".join(lines)
