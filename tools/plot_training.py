"""Plot the demo model's training curve (docs/demo_training.json -> docs/images/demo_training.png).

    python tools/plot_training.py        # needs matplotlib (the [notebooks] extra)
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after matplotlib.use: the backend is chosen first)

ROOT = Path(__file__).resolve().parent.parent


def main():
    record = json.loads((ROOT / "docs" / "demo_training.json").read_text())
    full = record["log"]
    log = [e for e in full if "loss" in e]
    val = [e for e in full if "val" in e]
    steps = [e["step"] for e in log]
    fig, (ax, axv) = plt.subplots(1, 2, figsize=(11, 3.4), dpi=100)
    ax.plot(steps, [e["loss"] for e in log], lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step (batch 48)")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title("demo model training (mean over 25 steps)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [e["lr"] for e in log], color="tab:orange", lw=0.8, alpha=0.6)
    ax2.set_ylabel("learning rate", color="tab:orange")
    switch = record.get("args", {}).get("warmup_tasks")
    if switch:
        ax.axvline(switch, color="gray", lw=0.8, ls=":")
        ax.annotate("all four tasks from here", (switch, ax.get_ylim()[1]), fontsize=7, color="gray",
                    xytext=(4, -10), textcoords="offset points")
    stage1 = record.get("args", {}).get("steps")
    if stage1 and stage1 < steps[-1]:
        ax.axvline(stage1, color="gray", lw=0.8, ls=":")
        ax.annotate("detection stage", (stage1, ax.get_ylim()[1]), fontsize=7, color="gray",
                    xytext=(4, -10), textcoords="offset points")
    # Run 5 (the first stage) logged detection by strict token match, which stays ~0 (one bin off
    # is wrong); from the second stage on, the script scores the teacher-forced boxes by IoU.
    for kind in (val[0]["val"] if val else {}):
        if kind == "detect":
            pts = [e for e in val if not stage1 or e["step"] > stage1]
            label = "detect (IoU >= 0.5)"
        else:
            pts, label = val, kind
        axv.plot([e["step"] for e in pts], [100 * e["val"][kind] for e in pts], lw=1.2, label=label)
    axv.set_xlabel("step")
    axv.set_ylabel("% right (teacher-forced)")
    axv.set_title("held-out validation, 128 items per task")
    axv.set_ylim(0, 100)
    axv.grid(alpha=0.3)
    axv.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = ROOT / "docs" / "images" / "demo_training.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
