"""Draw a run's per-layer telemetry as a dashboard shows it: one chart per kind, a line per layer, read back from the
TensorBoard event files that the run wrote (--report_to tensorboard).

    python train_loop.py --report_to tensorboard --telemetry_steps 10 --output_dir output/charts ...
    python bench/telemetry_charts.py output/charts/tensorboard docs/telemetry.png
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.telemetry.layer_stats import KINDS, LOGIT  # noqa: E402

TITLES = {KINDS[0]: "gradient norm (before clipping)", KINDS[1]: "update norm", KINDS[2]: "update / weights",
          KINDS[3]: "weight norm", LOGIT: "largest attention logit q.k/sqrt(d)"}


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of every event file under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for run in sorted({path.parent for path in folder.rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
        for tag in events.Tags()["scalars"]:
            series.setdefault(tag, []).extend((event.step, event.value) for event in events.Scalars(tag))
    return series


def line_style(part: str) -> dict[str, str]:
    """A colour per layer, a dash per kind of part (attention solid, MLP dashed, norms dotted)."""
    import matplotlib

    found = re.match(r"layers\.(\d+)(?:\.(\w+))?", part)
    if not found:
        return {"color": "black", "linestyle": "-" if part == "embed" else "-."}
    dashes = {"attn": "-", "mlp": "--", "norms": ":", None: "-"}
    return {"color": matplotlib.colormaps["tab10"](int(found.group(1)) % 10), "linestyle": dashes[found.group(2)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("events", type=Path, help="the run's tensorboard folder")
    parser.add_argument("png", type=Path)
    options = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_scalars(options.events)
    kinds = [kind for kind in TITLES if any(tag.startswith(f"{kind}/") for tag in series)]
    if not kinds:
        raise SystemExit(f"no per-layer telemetry under {options.events}: run with --report_to tensorboard")
    figure, axes = plt.subplots(2, 3, figsize=(13, 7.2))
    for axis, kind in zip(axes.flat, kinds):
        for tag in sorted(tag for tag in series if tag.startswith(f"{kind}/")):
            steps, values = zip(*sorted(series[tag]))
            axis.plot(steps, values, label=tag.split("/", 1)[1], linewidth=1.2, **line_style(tag.split("/", 1)[1]))
        axis.set_title(f"{kind}: {TITLES[kind]}", fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
        if kind in (KINDS[0], KINDS[2]):
            axis.set_yscale("log")
        axis.legend(fontsize=6, ncol=2 if kind != LOGIT else 1)
    for axis in axes.flat[len(kinds):]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(options.png, dpi=110)
    print(f"wrote {options.png}: {', '.join(kinds)}")


if __name__ == "__main__":
    main()
