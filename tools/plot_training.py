"""Plot the demo model's training curves: its training from scratch (docs/demo_training.json ->
docs/images/demo_training.png) and its fine-tuning on three new skills (docs/demo_finetune.json
-> docs/images/demo_finetune.png).

    python tools/plot_training.py        # needs matplotlib (the [notebooks] extra)
    python tools/plot_training.py --finetune-log OUT/npvlm_finetune.json
                                         # first compact a finetune run's log into docs/demo_finetune.json
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after matplotlib.use: the backend is chosen first)

ROOT = Path(__file__).resolve().parent.parent


def compact_finetune_log(path, every=25):
    """npvlm.finetune's per-step log -> means over `every` steps, plus every evaluation."""
    record = json.loads(Path(path).read_text())
    steps = record["log"]                 # every step's entry; a check's results sit in its step's
    log = []
    for i in range(0, len(steps) - every + 1, every):
        chunk = steps[i:i + every]
        log.append({"step": chunk[-1]["step"], "loss": sum(e["loss"] for e in chunk) / every,
                    "lr": chunk[-1]["lr"]})
    evals = [{"step": e["step"], "val_loss": e.get("val_loss"), "demo_scores": e.get("demo_scores")}
             for e in record["log"] if "demo_scores" in e or "val_loss" in e]
    options = {k: v for k, v in record["options"].items() if k not in ("data", "val", "out")}
    return {"options": options, "every": every, "log": log, "evals": evals}


def plot_finetune():
    record = json.loads((ROOT / "docs" / "demo_finetune.json").read_text())
    log, evals = record["log"], record["evals"]
    fig, (ax, axv) = plt.subplots(1, 2, figsize=(11, 3.4), dpi=100)
    ax.plot([e["step"] for e in log], [e["loss"] for e in log], lw=1.2, label=f"training (mean of {record['every']} steps)")
    ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", lw=1.2, label="validation")
    ax.set_yscale("log")
    ax.set_xlabel(f"step (batch {record['options']['batch_size']})")
    ax.set_ylabel("loss (answer tokens, per example)")
    ax.set_title("fine-tuning the demo decoder on three new skills")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax2 = ax.twinx()
    ax2.plot([e["step"] for e in log], [e["lr"] for e in log], color="tab:orange", lw=0.8, alpha=0.6)
    ax2.set_ylabel("learning rate", color="tab:orange")
    first = [e for e in evals if e["demo_scores"]]
    for kind in first[0]["demo_scores"] if first else ():
        axv.plot([e["step"] for e in first], [100 * e["demo_scores"][kind] for e in first], "o-",
                 lw=1.2, ms=3, label=kind)
    axv.set_xlabel("step")
    axv.set_ylabel("% right (greedy)")
    axv.set_title(f"held-out demo scenes ({record['options'].get('demo_scores')} per check)")
    axv.set_ylim(0, 100)
    axv.grid(alpha=0.3)
    axv.legend(loc="lower right", fontsize=8, ncol=2)
    fig.tight_layout()
    out = ROOT / "docs" / "images" / "demo_finetune.png"
    fig.savefig(out)
    print(f"wrote {out}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--finetune-log", type=Path, help="a finetune run's npvlm_finetune.json to compact "
                   "into docs/demo_finetune.json before plotting")
    args = p.parse_args()
    if args.finetune_log:
        compact = compact_finetune_log(args.finetune_log)
        (ROOT / "docs" / "demo_finetune.json").write_text(json.dumps(compact, indent=1) + "\n")
    plot_training()
    plot_finetune()


def plot_training():
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
