"""`offramp compare`: every recipe x head at the same training budget, on digits and digits-hard.

For each run: train (model_export.recipes), take every exit's outputs on the validation and test
splits, count each stage's FLOPs as the export does, then, for the recipe's own criterion and for
max_prob:

- a curve of test accuracy against compute fraction (`server.control.calibrate.frontier` on the test
  outputs: thresholds chosen with hindsight, the best the exits can do);
- the table's figures at 30, 50 and 70 % of full-depth FLOPs: thresholds chosen on validation
  (`calibrate(..., compute_budget=b)`), then replayed on test (`simulate`), as a deployment would.

Results go between the `compare` markers of docs/recipes.md (the hand-written text around them is
kept) and the curves into docs/img/.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

BUDGETS = (0.3, 0.5, 0.7)
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"


@dataclass
class RunResult:
    dataset: str
    recipe: str
    head: str
    criterion: str
    seconds: float
    mflops: float
    exit_accuracy: list[float]
    at_budget: dict[str, dict[str, list[float] | None]] = field(default_factory=dict)
    """criterion -> {"0.3": [test accuracy, test compute] or None when the budget is out of reach}"""
    best_within: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """criterion -> {"0.3": best test accuracy on the test frontier at compute <= budget}"""
    curves: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.recipe}/{self.head}"


def grid_pairs(grid: str) -> list[tuple[str, str]]:
    """(recipe, head) pairs: `paper` = each recipe with its paper's head, plus `linear` where that
    differs and the recipe takes it, plus `joint` with every non-gated head; `full` = all pairs."""
    from model_export.recipes import RECIPES

    pairs: list[tuple[str, str]] = []
    for name, recipe in RECIPES.items():
        heads = recipe.allowed_heads()
        if grid == "full" or name == "joint":
            chosen = heads
        else:
            chosen = [recipe.default_head] + (["linear"] if "linear" in heads and recipe.default_head != "linear"
                                              and name in ("dmpo", "lgvit") else [])
        pairs += [(name, h) for h in chosen]
    return pairs


def evaluate(run, splits) -> RunResult:  # noqa: ANN001 - RecipeRun, Splits (torch-side types)
    """Curves and budget figures of one trained run."""

    from model_export.export import stage_flops, stage_outputs
    from model_export.recipes import get_recipe
    from server.bundle import LOGITS, SIMILARITY, Calibration
    from server.control.calibrate import calibrate, frontier, simulate

    model = run.model.eval()
    flops = stage_flops(model, splits.val)
    calib = {}
    for part in ("val", "test"):
        split = getattr(splits, part)
        out = stage_outputs(model, split)
        calib[part] = Calibration(labels=split.y, logits=out[LOGITS], similarity=out.get(SIMILARITY),
                                  gate=out.get("gate"))
    criterion = get_recipe(run.recipe).criterion
    res = RunResult(
        dataset=run.dataset, recipe=run.recipe, head=run.head, criterion=criterion,
        seconds=run.result.seconds, mflops=sum(flops) / 1e6,
        exit_accuracy=[float((z.argmax(-1) == splits.test.y).mean()) for z in calib["test"].logits],
    )
    for crit in dict.fromkeys([criterion, "max_prob"]):
        curve = frontier(calib["test"], flops, crit)
        res.curves[crit] = [tuple(map(float, p)) for p in curve]  # type: ignore[misc]
        res.at_budget[crit], res.best_within[crit] = {}, {}
        for b in BUDGETS:
            within = [acc for c, _, acc in curve if c <= b + 1e-9]
            res.best_within[crit][str(b)] = max(within) if within else None
            try:
                chosen = calibrate(calib["val"], flops, compute_budget=b, criterion=crit)
            except ValueError:
                res.at_budget[crit][str(b)] = None
                continue
            report = simulate(calib["test"], crit, chosen.thresholds, flops)
            res.at_budget[crit][str(b)] = [report.accuracy, report.compute_fraction]
    return res


def _cell(value: list[float] | None) -> str:
    return "—" if value is None else f"{value[0]:.3f} ({value[1]:.2f})"


def _best(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def table(results: list[RunResult]) -> str:
    head = ("| recipe / head | criterion | MFLOPs | final acc. | "
            + " | ".join(f"acc. @ {int(b * 100)} % (test compute)" for b in BUDGETS)
            + " | " + " | ".join(f"best @ ≤{int(b * 100)} %" for b in BUDGETS) + " | train s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        for crit in r.at_budget:
            lines.append(
                f"| {r.label} | {crit}{' (served)' if crit == r.criterion else ''} | {r.mflops:.2f} | "
                f"{r.exit_accuracy[-1]:.3f} | "
                + " | ".join(_cell(r.at_budget[crit][str(b)]) for b in BUDGETS) + " | "
                + " | ".join(_best(r.best_within[crit][str(b)]) for b in BUDGETS) + f" | {r.seconds:.0f} |"
            )
    return "\n".join(lines)


def dmpo_check(results: list[RunResult]) -> str:
    """The DMPO claim, checked on these runs: DMPO at 30 % of the FLOPs against the others at 70 %."""
    def acc(r: RunResult, b: float) -> float | None:
        cells = [r.at_budget[c][str(b)] for c in r.at_budget]
        vals = [c[0] for c in cells if c is not None]
        return max(vals) if vals else None

    lines = []
    for d in (r for r in results if r.recipe == "dmpo"):
        others = [r for r in results if r.recipe != "dmpo" and r.dataset == d.dataset]
        a30 = acc(d, 0.3)
        beaten = [o.label for o in others
                  if (o70 := acc(o, 0.7)) is not None and a30 is not None and a30 >= o70 - 0.005]
        total = sum(1 for o in others if acc(o, 0.7) is not None)
        lines.append(f"- {d.dataset}, {d.label}: {_best(a30)} at 30 % (best criterion, validation-chosen "
                     f"thresholds); within 0.5 points of or above {len(beaten)} of {total} other runs at 70 %"
                     + (f" ({', '.join(beaten)})" if beaten else ""))
    return "\n".join(lines)


def plot(results: list[RunResult], img_dir: Path, dataset: str) -> Path:
    from server.control.plots import plot_frontiers

    curves = {f"{r.label} ({r.criterion})": r.curves[r.criterion] for r in results}
    return plot_frontiers(curves, img_dir / f"recipes-{dataset}.png",
                          title=f"{dataset}: test agreement / accuracy against compute (served criterion, "
                                "hindsight thresholds)")


def write_markdown(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Recipes and exit heads\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + "\n\n" + BEGIN + "\n" + END + "\n"
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    path.write_text(before + BEGIN + "\n" + body.strip() + "\n" + END + after)


def report(results: list[RunResult], out: Path, img_dir: Path, *, header: str) -> str:
    """The Markdown between the compare markers (and the PNGs) for `results`."""
    sections = []
    for dataset in dict.fromkeys(r.dataset for r in results):
        per_set = [r for r in results if r.dataset == dataset]
        png = plot(per_set, img_dir, dataset)
        rel = png.relative_to(out.parent) if png.is_relative_to(out.parent) else png
        sections.append(f"### {dataset}\n\n![{dataset}]({rel.as_posix()})\n\n{table(per_set)}\n")
    return (
        header + " Cells: test accuracy with thresholds chosen on validation for that compute budget, and (in "
        "brackets) the compute the test split then really used; '—': no policy fits the budget (the first exit "
        "alone costs more). 'best @ ≤': the best test accuracy on the test frontier within the budget "
        "(hindsight thresholds).\n\n"
        + "\n".join(sections)
        + "\n### The DMPO claim (at 30 % of the FLOPs it matches others at 70 %)\n\n" + dmpo_check(results) + "\n"
    )


def load_results(path: Path) -> list[RunResult]:
    """Results saved by `run_compare` (docs/img/recipes.json), to redraw without retraining."""
    return [RunResult(**{**d, "curves": {k: [tuple(p) for p in v] for k, v in d["curves"].items()}})
            for d in json.loads(Path(path).read_text())]


def run_compare(out: Path, img_dir: Path, *, grid: str = "paper", datasets: list[str] | None = None,
                epochs: int = 20, seed: int = 0, progress: bool = True, max_steps: int | None = None,
                variant: str = "demo") -> list[RunResult]:
    """Train and evaluate every pair of the grid on every data set; write PNGs and the Markdown."""
    from model_export.data import load_splits
    from model_export.recipes import train_recipe

    datasets = datasets or ["digits", "digits-hard"]
    started = time.perf_counter()
    results: list[RunResult] = []
    for dataset in datasets:
        splits = load_splits(dataset)
        per_set = []
        for recipe, head in grid_pairs(grid):
            run, _ = train_recipe(recipe, head, dataset=dataset, variant=variant, seed=seed, progress=False,
                                  splits=splits, epochs=epochs, max_steps=max_steps, threads=1)
            res = evaluate(run, splits)
            per_set.append(res)
            if progress:
                print(f"{dataset} {res.label}: final {res.exit_accuracy[-1]:.3f}, "
                      f"{res.seconds:.0f} s", flush=True)
        results += per_set
    body = report(results, Path(out), Path(img_dir), header=(
        f"Generated by `offramp compare --grid {grid} --epochs {epochs}` (model `{variant}`, seed {seed}, "
        f"{len(results)} runs, {time.perf_counter() - started:.0f} s on this machine)."))
    write_markdown(Path(out), body)
    (Path(img_dir) / "recipes.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    return results


def summary(results: list[RunResult]) -> dict[str, float]:
    """Mean final accuracy per data set (for quick looks in tests and logs)."""
    out: dict[str, list[float]] = {}
    for r in results:
        out.setdefault(r.dataset, []).append(r.exit_accuracy[-1])
    return {k: float(np.mean(v)) for k, v in out.items()}
