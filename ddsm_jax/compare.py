"""`python -m ddsm_jax.compare --workdirs=W1,W2,... --out=DIR`: step-aware strategies side by side.

Reads each workdir's evaluation (`eval/metrics.json`, written by `--mode=evaluate` or `all`),
refuses workdirs that were not scored on the same footing (data, sampler and step count, sample
count, feature space, seed: the evaluation noise), and writes `compare.json` (every entry of
every workdir), `compare.md` (a markdown table; with `--budget=B` a second one, each workdir's
best entry at no more than B of the full U-Net's MACs) and `compare.png` (FD against MACs ratio, one
colour per workdir; the baseline a saving must beat, fewer steps of full compute (the full U-Net
where the workdir has one, else the strategy's own rule), as a dashed line). MACs ratios are all
against the full-width U-Net at every step, whatever the strategy.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import matplotlib
from absl import flags
from etils import epath

from ddsm_jax.common_types import PathLike
from ddsm_jax.layout import Workdir
from ddsm_jax.models.network import native_entry
from ddsm_jax.utils.files import as_path, read_json, write_json, write_text_atomically
from ddsm_jax.utils.plots import save_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# What must agree for two evaluations to compare: (what it is, how to read it from metrics.json).
FOOTING = (
    ("data set", lambda m: m["features"].get("dataset")),
    ("sampler", lambda m: (m["sampler"]["method"], m["sampler"]["num_steps"])),
    ("evaluation samples", lambda m: m["num_samples"]),
    ("feature space", lambda m: m["features"]["name"]),
    ("seed (the evaluation noise)", lambda m: m.get("seed")),
)


class CompareError(ValueError):
    pass


def load_evaluation(workdir: PathLike) -> dict[str, Any]:
    """A workdir's metrics.json, with its seed (from config.json) and name."""
    layout = Workdir(workdir)
    if not layout.eval_metrics.is_file():
        raise CompareError(f"{layout.root} has no evaluation ({layout.eval_metrics}): run "
                           f"--mode=evaluate (or --mode=all) on it first")
    metrics = read_json(layout.eval_metrics)
    config = read_json(layout.config) if layout.config.is_file() else {}
    metrics.setdefault("seed", config.get("seed"))
    metrics.setdefault("strategy", config.get("strategy", "ddsm"))
    metrics["workdir"] = str(workdir)  # as the user named it
    return metrics


def check_footing(evaluations: list[dict[str, Any]]) -> None:
    """One line naming the first thing two evaluations differ in."""
    first = evaluations[0]
    for other in evaluations[1:]:
        for what, read in FOOTING:
            if read(first) != read(other):
                raise CompareError(
                    f"{other['workdir']} was evaluated with {what} {read(other)!r} but "
                    f"{first['workdir']} with {read(first)!r}: evaluate every workdir with the "
                    f"same data, sampling, eval and seed settings")


def entries(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """Every scored entry of one evaluation as a flat row."""
    # A mixture's branches are named by their MACs ratio; its labels say whose branch each is.
    labels = [f" ({label})" for label in evaluation.get("branch_labels", [])]
    labels = labels or [""] * (1 + len(evaluation.get("uniform", {})))
    rows = [(native_entry(evaluation["strategy"]) + labels[0], evaluation["full"])]
    rows += [(f"uniform {w}{label}", v)
             for (w, v), label in zip(evaluation.get("uniform", {}).items(), labels[1:])]
    if "schedule" in evaluation:
        rows.append(("schedule", evaluation["schedule"]))
    rows += [(f"threshold {k}", v) for k, v in evaluation.get("thresholds", {}).items()]
    fewer_of = evaluation.get("fewer_steps_of", "full")  # the full U-Net, or the native rule
    rows += [(f"{fewer_of}, {k} steps", v) for k, v in evaluation.get("fewer_steps", {}).items()]
    training = evaluation.get("training", {})
    return [{"workdir": evaluation["workdir"], "strategy": evaluation["strategy"], "entry": name,
             "fd": value["fd"], "macs_ratio": value["macs_ratio"],
             "seconds": value.get("seconds"), "training_macs": training.get("macs"),
             "training_macs_ratio": training.get("macs_ratio")}
            for name, value in rows]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| workdir | strategy | entry | FD | MACs ratio | seconds | training MACs (x full U-Net) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        seconds = "" if row["seconds"] is None else f"{row['seconds']:.2f}"
        training = ("" if row["training_macs_ratio"] is None
                    else f"{row['training_macs']:.3g} ({row['training_macs_ratio']:.2f}x)")
        lines.append(f"| {epath.Path(row['workdir']).name} | {row['strategy']} | {row['entry']} "
                     f"| {row['fd']:.2f} | {row['macs_ratio']:.3f} | {seconds} | {training} |")
    return "\n".join(lines) + "\n"


def within_budget(rows: list[dict[str, Any]], budget: float) -> list[dict[str, Any]]:
    """Each workdir's best-FD entry at no more than `budget` of the full U-Net's MACs: every
    strategy at one price (a workdir with nothing that cheap is left out)."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["macs_ratio"] <= budget + 1e-9 and (
                row["workdir"] not in best or row["fd"] < best[row["workdir"]]["fd"]):
            best[row["workdir"]] = row
    return sorted(best.values(), key=lambda row: row["fd"])


def save_picture(rows: list[dict[str, Any]], path: PathLike,
                 budget: float | None = None) -> epath.Path:
    fig, ax = plt.subplots(figsize=(10.5, 5))
    if budget is not None:
        ax.axvline(budget, color="grey", linestyle=":", linewidth=1.2,
                   label=f"budget: {budget:g} of the full U-Net's MACs")
    workdirs = list(dict.fromkeys(row["workdir"] for row in rows))
    markers = {"full": "*", "stages": "*", "groups": "*", "schedule": "D"}
    palette = plt.cm.tab10.colors if len(workdirs) <= 10 else plt.cm.tab20.colors
    for colour, workdir in zip(itertools.cycle(palette), workdirs):
        mine = [r for r in rows if r["workdir"] == workdir]
        name = f"{epath.Path(workdir).name} ({mine[0]['strategy']})"
        fewer = sorted((r for r in mine if r["entry"].endswith(" steps")),
                       key=lambda r: r["macs_ratio"])
        if fewer:  # the baseline: full compute with fewer steps, ending at all steps
            of = fewer[0]["entry"].split(",")[0]
            line = fewer + [r for r in mine if r["entry"].split(" (")[0] == of]
            ax.plot([r["macs_ratio"] for r in line], [r["fd"] for r in line], "--x",
                    color=colour, alpha=0.7,
                    label=f"{name}: {'full width' if of == 'full' else of}, fewer steps")
        uniform = sorted((r for r in mine if r["entry"].startswith("uniform")),
                         key=lambda r: r["macs_ratio"])
        if uniform:
            ax.plot([r["macs_ratio"] for r in uniform], [r["fd"] for r in uniform], ":o",
                    color=colour, alpha=0.7, markersize=4, label=f"{name}: uniform widths")
        exits = sorted((r for r in mine if r["entry"].startswith("threshold")),
                       key=lambda r: r["macs_ratio"])
        if exits:  # AdaDiff's own rule: per-sample exits where certain, one point per threshold
            ax.plot([r["macs_ratio"] for r in exits], [r["fd"] for r in exits], "-.^",
                    color=colour, alpha=0.8, markersize=5, label=f"{name}: exit thresholds")
        for row in mine:
            entry = row["entry"].split(" (")[0]  # a mixture's label in brackets
            if entry in markers:
                ax.plot(row["macs_ratio"], row["fd"], markers[entry], color=colour,
                        markersize=8 if row["entry"] == "schedule" else 11,
                        label=f"{name}: {row['entry']}")
    ax.set_xlabel("MACs per sampling run, as a fraction of the full U-Net at every step")
    ax.set_ylabel("FD (lower is better)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside: no mark hidden
    entries = len(ax.get_legend_handles_labels()[1])
    fig.set_size_inches(10.5, max(5.0, 0.15 * entries + 0.6))  # room for every legend line
    fig.tight_layout()
    return save_figure(fig, path)


def compare(workdirs: list[str], out: PathLike, budget: float | None = None) -> dict[str, Any]:
    """`budget`: also each workdir's best entry at no more than that MACs ratio (compare.md)."""
    if not workdirs:
        raise CompareError("--workdirs is empty: give the evaluated workdirs to compare")
    if budget is not None and budget <= 0:
        raise CompareError(f"--budget={budget} must be a positive fraction of the full U-Net's "
                           f"MACs, e.g. 0.5")
    evaluations = [load_evaluation(w) for w in workdirs]
    check_footing(evaluations)
    rows = [row for evaluation in evaluations for row in entries(evaluation)]
    out = as_path(out)
    write_json(out / "compare.json", rows)
    table = markdown_table(rows)
    if budget is not None:
        table += (f"\nEach workdir's best entry at no more than {budget:g} of the full U-Net's "
                  f"MACs:\n\n" + markdown_table(within_budget(rows, budget)))
    write_text_atomically(out / "compare.md", table)
    save_picture(rows, out / "compare.png", budget)
    return {"compare": str(out / "compare.json"), "table": str(out / "compare.md"),
            "picture": str(out / "compare.png"), "entries": len(rows)}


def cli() -> None:
    """The command line; its flags are defined here, not on import, so that the library part of
    this module can be imported beside other programs' flags."""
    import sys

    from ddsm_jax.utils.cli import run_program

    workdirs = flags.DEFINE_list("workdirs", None, "Workdirs to compare, each evaluated.")
    out = flags.DEFINE_string("out", "compare", "Folder for compare.json, compare.md, compare.png.")
    budget = flags.DEFINE_float("budget", None, "Also list each workdir's best entry at no more "
                                "than this fraction of the full U-Net's MACs (compare.md).")

    def main(argv: list[str]) -> None:
        del argv
        try:
            print(json.dumps(compare(workdirs.value, out.value, budget.value)))
        except (CompareError, OSError, KeyError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)

    run_program(main, required=["workdirs"])


if __name__ == "__main__":
    cli()
