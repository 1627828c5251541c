"""Plot the demo model's training curve (docs/demo_training.json -> docs/images/demo_training.png).

    python tools/plot_training.py        # needs matplotlib (the [notebooks] extra)
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main():
    log = json.loads((ROOT / "docs" / "demo_training.json").read_text())["log"]
    steps = [e["step"] for e in log]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(steps, [e["loss"] for e in log], lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step (batch 48)")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title("demo model training (mean over 25 steps)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [e["lr"] for e in log], color="tab:orange", lw=0.8, alpha=0.6)
    ax2.set_ylabel("learning rate", color="tab:orange")
    fig.tight_layout()
    out = ROOT / "docs" / "images" / "demo_training.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
