"""`offramp compare`: the recipes x heads at the same training budget, with statistics a reviewer
accepts.

Protocol (stated again in the generated header):

- **Objective: test accuracy at a compute budget.** For each budget b (fraction of full-depth
  FLOPs) and each exit criterion the run's stages support, per-exit thresholds are chosen on the
  **validation** split to maximise validation *accuracy* within b (`calibrate(...,
  compute_budget=b, budget_objective="accuracy")`); the criterion with the best validation
  accuracy is kept (ties: the recipe's own); that policy is replayed on the **test** split, which
  is never looked at to choose anything.
- **Seeds**: every (recipe, head) trains with several seeds (the data split is fixed); a cell is the
  mean over seeds of the test accuracy.
- **Intervals**: 95 % paired bootstrap over test samples and seeds (`BOOTSTRAP` replicates; the
  same resampled test indices and seed draws for every row of a data set, so differences are
  paired); the across-seed standard deviation is reported beside. A claim is called only where the interval of
  the difference it is about lies wholly on one side of its margin.
- **No duplicated runs**: MuE trains exactly as `joint` does (every exit's loss, one shared
  classifier), so its row is the `joint/shared` model served with the `similarity` exit (MuE's own
  signal), not a second training run.

Runs are saved one JSON line each as they finish (`--results`), and a rerun skips what is there:
the grid resumes after an interruption. `--train-limit` subsamples the training split and
`--max-steps` bounds the steps, to fit the grid into the machine's time (the header says so).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BUDGETS = (0.3, 0.5, 0.56, 0.7)  # 0.56 = 1 / 1.8: LGViT's "~1.8x speed-up"
BOOTSTRAP = 2000
MARGIN = 0.01  # non-inferiority margin: "comparable" / "competitive" = within 1 point
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"
TRAINING_KEYS = ("epochs", "max_steps", "train_limit", "variant", "freeze_backbone")
TRAINS_AS = {"mue": "joint"}  # recipe -> the recipe whose training it is (same loss, same head)
SERVED_WITH = {"mue": ("similarity",)}  # a row restricted to its paper's exit signal


def pack(correct: np.ndarray) -> str:
    """0/1 per test sample as hex (the JSON stays small and every figure recomputable)."""
    return np.packbits(np.asarray(correct, bool)).tobytes().hex()


def unpack(bits: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(bits), np.uint8))[:n].astype(bool)


@dataclass
class RunResult:
    """One trained run: per criterion and budget, the validation accuracy that chose it and what
    the policy then did on test."""

    dataset: str
    recipe: str  # the training recipe (`joint` for MuE's row)
    head: str
    seed: int
    criterion: str  # the recipe's own
    seconds: float
    mflops: float
    test_samples: int
    exit_accuracy: list[float]  # test, per exit
    full_correct: str  # packed: the final exit right on each test sample
    cells: dict[str, dict[str, dict[str, Any] | None]] = field(default_factory=dict)
    """criterion -> {str(budget): {"val": accuracy, "compute": test compute, "correct": packed} | None}"""
    settings: dict[str, Any] = field(default_factory=dict)
    """How it was trained (epochs, max_steps, train_limit, variant, freeze_backbone, train samples)."""

    @property
    def key(self) -> tuple[Any, ...]:
        """What a rerun must match to reuse this run: the row, the seed and how it was trained."""
        trained = tuple(self.settings.get(k) for k in TRAINING_KEYS)
        return (self.dataset, self.recipe, self.head, self.seed, trained)


def grid_pairs(grid: str) -> list[tuple[str, str]]:
    """(recipe, head) rows: `paper` = each recipe with its paper's head, plus `linear` for DMPO and
    LGViT (to separate head from recipe), plus `joint` with those heads; `full` = every pair."""
    from model_export.recipes import RECIPES

    paper_heads = {r.default_head for r in RECIPES.values()}
    pairs: list[tuple[str, str]] = []
    for name, recipe in RECIPES.items():
        heads = recipe.allowed_heads()
        if grid == "full":
            chosen = heads
        elif name == "joint":
            chosen = [h for h in heads if h in paper_heads | {"linear"}]
        else:
            chosen = [recipe.default_head] + (["linear"] if name in ("dmpo", "lgvit") else [])
        pairs += [(name, h) for h in chosen]
    return pairs


def training_runs(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The distinct trainings the rows need (MuE's row reuses joint's)."""
    return list(dict.fromkeys((TRAINS_AS.get(r, r), h) for r, h in pairs))


def candidate_criteria(stage_outputs: dict[str, np.ndarray], own: str) -> list[str]:
    from server.exits import CRITERIA

    have = {k for k, v in stage_outputs.items() if v is not None}
    usable = [name for name, info in CRITERIA.items() if info.reads is None or info.reads in have]
    return list(dict.fromkeys([own, *usable]))


def evaluate(run: Any, splits: Any, seed: int) -> RunResult:
    """Every usable criterion at every budget: validation-chosen thresholds replayed on test."""
    from model_export.export import stage_flops, stage_outputs
    from model_export.recipes import get_recipe
    from server.bundle import LOGITS, SIMILARITY, Calibration
    from server.control.calibrate import calibrate
    from server.replay import replay

    model = run.model.eval()
    flops = stage_flops(model, splits.val)
    cum = np.cumsum(flops)
    calib = {}
    for part in ("val", "test"):
        split = getattr(splits, part)
        out = stage_outputs(model, split)
        calib[part] = Calibration(labels=split.y, logits=out[LOGITS], similarity=out.get(SIMILARITY),
                                  gate=out.get("gate"))
    test = calib["test"]
    final = test.logits[-1].argmax(-1) == test.labels
    own = get_recipe(run.recipe).criterion
    res = RunResult(
        dataset=run.dataset, recipe=run.recipe, head=run.head, seed=seed, criterion=own,
        seconds=run.result.seconds, mflops=sum(flops) / 1e6, test_samples=len(test.labels),
        exit_accuracy=[float((z.argmax(-1) == test.labels).mean()) for z in test.logits], full_correct=pack(final),
    )
    arrays = {"similarity": test.similarity, "gate": test.gate}
    for crit in candidate_criteria(arrays, own):
        res.cells[crit] = {}
        for b in BUDGETS:
            try:
                chosen = calibrate(calib["val"], flops, compute_budget=b, criterion=crit, budget_objective="accuracy")
            except ValueError:  # out of reach (the first exit alone costs more), or the criterion cannot run
                res.cells[crit][str(b)] = None
                continue
            stage_of, answer = replay(test, crit, chosen.thresholds)
            res.cells[crit][str(b)] = {
                "val": chosen.report.accuracy, "thresholds": chosen.thresholds,
                "compute": float(cum[stage_of].sum() / (len(stage_of) * cum[-1])),
                "correct": pack(answer == test.labels)}
    return res


# -- statistics -------------------------------------------------------------------------------------


@dataclass
class Row:
    """One method (recipe / head) on one data set over its seeds."""

    dataset: str
    recipe: str
    head: str
    runs: list[RunResult]

    @property
    def label(self) -> str:
        return f"{self.recipe}/{self.head}"

    def choice(self, run: RunResult, b: float) -> tuple[str, dict[str, Any]] | None:
        """The criterion and cell validation picks for `run` at budget `b` (None: nothing fits)."""
        allowed = SERVED_WITH.get(self.recipe)
        cells = [(c, v[str(b)]) for c, v in run.cells.items()
                 if v.get(str(b)) is not None and (allowed is None or c in allowed)]
        if not cells:
            return None
        return max(cells, key=lambda cv: (round(cv[1]["val"], 12), cv[0] == run.criterion))  # type: ignore[index]

    def correct(self, b: float | None) -> np.ndarray | None:
        """[seeds, n] test correctness at budget b (None: full depth); None if a seed has no policy."""
        rows = []
        for run in self.runs:
            if b is None:
                rows.append(unpack(run.full_correct, run.test_samples))
                continue
            picked = self.choice(run, b)
            if picked is None:
                return None
            rows.append(unpack(picked[1]["correct"], run.test_samples))
        return np.stack(rows)

    def compute(self, b: float) -> float | None:
        picks = [self.choice(r, b) for r in self.runs]
        return None if any(p is None for p in picks) else float(np.mean([p[1]["compute"] for p in picks if p]))

    def criteria(self, b: float) -> str:
        picks = [p[0] for p in (self.choice(r, b) for r in self.runs) if p is not None]
        return "/".join(dict.fromkeys(picks)) or "—"


class Bootstrap:
    """Paired bootstrap over the test samples *and* the seeds of one data set: each replicate draws
    test samples and seeds with replacement, the same draws for every row (rows are paired by test
    sample and by seed number), so an interval covers both the test set's and the training's
    variation."""

    def __init__(self, n: int, replicates: int = BOOTSTRAP, seed: int = 0):
        self.seed = seed
        self.idx = np.random.default_rng(seed).integers(0, n, (replicates, n))

    def replicates(self, correct: np.ndarray) -> np.ndarray:
        """[replicates] accuracies of a [seeds, n] correctness matrix."""
        per_seed = correct[:, self.idx].mean(axis=2)  # [seeds, replicates]
        k = per_seed.shape[0]  # the seed draws depend on the seed count only: rows are paired
        pick = np.random.default_rng([self.seed, k]).integers(0, k, (len(self.idx), k))
        return per_seed[pick, np.arange(len(self.idx))[:, None]].mean(axis=1)

    def interval(self, values: np.ndarray) -> tuple[float, float]:
        lo, hi = np.percentile(values, [2.5, 97.5])
        return float(lo), float(hi)


def build_rows(results: list[RunResult], pairs: list[tuple[str, str]]) -> list[Row]:
    rows = []
    for dataset in dict.fromkeys(r.dataset for r in results):
        for recipe, head in pairs:
            trained = TRAINS_AS.get(recipe, recipe)
            runs = sorted((r for r in results if (r.dataset, r.recipe, r.head) == (dataset, trained, head)),
                          key=lambda r: r.seed)
            if runs:
                rows.append(Row(dataset, recipe, head, runs))
    return rows


def _fmt(mean: float, ci: tuple[float, float]) -> str:
    return f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def table(rows: list[Row], boot: Bootstrap) -> str:
    head = ("| recipe / head | final exit | " + " | ".join(f"@ {int(round(b * 100))} %: acc. [95 % CI] "
                                                       "(test compute; criterion)" for b in BUDGETS)
            + " | seed SD @ 50 % | train s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        full = row.correct(None)
        assert full is not None
        cells = [_fmt(float(full.mean()), boot.interval(boot.replicates(full)))]
        for b in BUDGETS:
            c = row.correct(b)
            cells.append("—" if c is None else
                         f"{_fmt(float(c.mean()), boot.interval(boot.replicates(c)))} "
                         f"({row.compute(b):.2f}; {row.criteria(b)})")
        c50 = row.correct(0.5)
        sd = "—" if c50 is None or len(c50) < 2 else f"{float(np.std(c50.mean(axis=1), ddof=1)):.3f}"
        secs = np.mean([r.seconds for r in row.runs])
        name = row.label + (" (the joint/shared model)" if row.recipe in TRAINS_AS else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {sd} | {secs:.0f} |")
    return "\n".join(lines)


def verdict(diff: np.ndarray, margin: float) -> tuple[str, tuple[float, float]]:
    """'holds' when the interval of (difference + margin) is above 0, 'fails' when below, else 'undecided'."""
    lo, hi = np.percentile(diff, [2.5, 97.5])
    if lo > -margin:
        return "holds", (float(lo), float(hi))
    if hi < -margin:
        return "fails", (float(lo), float(hi))
    return "undecided", (float(lo), float(hi))


def claims(rows: list[Row], boot: Bootstrap) -> list[str]:
    """The papers' claims on these rows, each with the interval it rests on."""
    out: list[str] = []

    def line(text: str, diff: np.ndarray, margin: float) -> None:
        v, (lo, hi) = verdict(diff, margin)
        out.append(f"- {text}: difference {float(np.mean(diff)):+.3f} [{lo:+.3f}, {hi:+.3f}] → **{v}**")

    by = {r.label: r for r in rows}
    for d in (r for r in rows if r.recipe == "dmpo"):
        d30 = d.correct(0.3)
        if d30 is None:
            out.append(f"- DMPO ({d.label}) at 30 %: no policy fits 30 % → cannot be checked")
            continue
        found: dict[str, list[str]] = {"holds": [], "fails": [], "undecided": []}
        for other in (r for r in rows if r.recipe != "dmpo"):
            o70 = other.correct(0.7)
            if o70 is not None:
                v, (lo, hi) = verdict(boot.replicates(d30) - boot.replicates(o70), MARGIN)
                found[v].append(f"{other.label} [{lo:+.3f}, {hi:+.3f}]")
        out.append(f"- DMPO \"30 % of the FLOPs comparable to others at 70 %\" (our reading of the abstract, no public "
                   f"code; {d.label} @ 30 % − other @ 70 %, "
                   f"margin {MARGIN:.2f}): " + "; ".join(f"**{v}** against {len(found[v])}: {', '.join(found[v])}"
                                                         for v in found if found[v]))
    for m in (r for r in rows if r.recipe == "mue"):
        half, full = m.correct(0.5), m.correct(None)
        if half is not None and full is not None:
            line(f"MuE \"−50 % compute at 99 % of the performance\": {m.label} @ 50 % − 0.99 × its full depth "
                 "(FLOPs, not time)", boot.replicates(half) - 0.99 * boot.replicates(full), 0.0)
    for lg in (r for r in rows if r.recipe == "lgvit"):
        fast, full = lg.correct(0.56), lg.correct(None)
        if fast is not None and full is not None:
            line(f"LGViT \"~1.8x speed-up, competitive\" (FLOPs, not time): {lg.label} @ 56 % − its full depth "
                 f"(margin {MARGIN:.2f})",
                 boot.replicates(fast) - boot.replicates(full), MARGIN)
    for met in (r for r in rows if r.recipe == "met"):
        base = by.get(f"joint/{met.head}")
        for b in BUDGETS:
            a, j = met.correct(b), None if base is None else base.correct(b)
            if a is not None and j is not None:
                line(f"MET \"better accuracy and efficiency\" than plain tuning (our reading of the abstract, "
                     f"no public code): {met.label} − joint/{met.head} "
                     f"@ {int(round(b * 100))} %", boot.replicates(a) - boot.replicates(j), 0.0)
    return out


def plot(rows: list[Row], boot: Bootstrap, path: Path, title: str) -> Path:
    from server.control.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 6))
    colours, markers = plt.get_cmap("tab20").colors, "osD^v<>ph*"
    for i, row in enumerate(rows):
        xs, ys, errs = [], [], [[], []]
        for b in (*BUDGETS, None):
            c = row.correct(b)
            if c is None:
                continue
            mean = float(c.mean())
            lo, hi = boot.interval(boot.replicates(c))
            xs.append(1.0 if b is None else row.compute(b))
            ys.append(mean)
            errs[0].append(mean - lo)
            errs[1].append(hi - mean)
        ax.errorbar(xs, ys, yerr=errs, marker=markers[i % len(markers)], color=colours[i % 20], capsize=3,
                    label=row.label, linewidth=1)
    ax.set_xlabel("test compute fraction (executed / full-depth FLOPs); thresholds chosen on validation")
    ax.set_ylabel("test accuracy (mean over seeds, 95 % bootstrap CI)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(results: list[RunResult], pairs: list[tuple[str, str]], out: Path, img_dir: Path, header: str) -> str:
    sections = []
    rows = build_rows(results, pairs)
    for dataset in dict.fromkeys(r.dataset for r in rows):
        per_set = [r for r in rows if r.dataset == dataset]
        boot = Bootstrap(per_set[0].runs[0].test_samples)
        seeds = sorted({r.seed for row in per_set for r in row.runs})
        png = plot(per_set, boot, img_dir / f"recipes-{dataset}.png", f"{dataset}: accuracy against compute")
        rel = Path("img") / png.name if img_dir.resolve() == (out.parent / "img").resolve() else png
        trained = "; ".join(sorted({", ".join(f"{k} {v}" for k, v in r.settings.items() if k != "steps")
                                    for row in per_set for r in row.runs})) or "not recorded"
        sections.append(f"### {dataset}\n\n{per_set[0].runs[0].test_samples} test samples, seeds {seeds}; "
                        f"trained with {trained}.\n\n"
                        f"![{dataset}]({rel.as_posix()})\n\n{table(per_set, boot)}\n\n"
                        "Claims, checked on these rows:\n\n" + "\n".join(claims(per_set, boot)) + "\n")
    return header + "\n\n" + "\n".join(sections)


def write_markdown(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Recipes and exit heads\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + "\n\n" + BEGIN + "\n" + END + "\n"
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    path.write_text(before + BEGIN + "\n" + body.strip() + "\n" + END + after)


def load_results(path: Path) -> list[RunResult]:
    """Runs saved by `run_compare` (one JSON object per line), to redraw without retraining."""
    path = Path(path)
    if not path.exists():
        return []
    runs: dict[tuple[Any, ...], RunResult] = {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            run = RunResult(**json.loads(line))
        except (json.JSONDecodeError, TypeError):
            if i == len(lines) - 1:  # the line an interruption cut short: that run trains again
                continue
            raise ValueError(f"{path}: line {i + 1} is not a saved run") from None
        runs[run.key] = run  # a run saved twice counts once (the later)
    return list(runs.values())


def header_text(results: list[RunResult], selection: str) -> str:
    """The report's opening paragraph; `selection`: the rows' flag (`--grid paper`, `--rows ...`)."""
    seconds = sum(r.seconds for r in results)
    return (
        f"Generated by `offramp compare {selection}` from {len(results)} training runs ({seconds / 60:.0f} min of "
        "training on this machine; each data set's settings in its section). **Objective: test accuracy "
        "within each compute budget.** Per run, budget and "
        "exit criterion, per-exit thresholds are chosen on the validation split to maximise validation "
        "accuracy within the budget; the criterion with the best validation accuracy is kept (ties: the "
        "recipe's own); that policy is replayed on the test split. Cells: mean test accuracy over the seeds "
        f"[95 % paired bootstrap interval over test samples, {BOOTSTRAP} replicates], the test compute it "
        "really used and the criteria validation chose; '—': no policy fits the budget for some seed. "
        "The intervals resample the seeds too, so they cover the training's variation as well as the test "
        "set's; no correction for the number of comparisons. The "
        "'final exit' column is full depth. Claims: 'holds' / 'fails' only where the interval of the "
        f"difference lies wholly on one side of its margin ({MARGIN:.2f} for 'comparable' and 'competitive', "
        "0 otherwise); else 'undecided'.")


def run_compare(out: Path, img_dir: Path, results_path: Path, *, grid: str = "paper",
                datasets: list[str] | None = None, seeds: tuple[int, ...] = (0, 1, 2), epochs: int = 20,
                max_steps: int | None = None, train_limit: int | None = None, variant: str = "demo",
                freeze_backbone: bool = False, progress: bool = True,
                pairs: list[tuple[str, str]] | None = None, train: bool = True) -> list[RunResult]:
    """Train what is not in `results_path` yet (one JSON line per run, so an interrupted grid
    resumes), then write the PNGs and the Markdown from every saved run of these data sets.
    `pairs`: the (recipe, head) rows (default: the grid's); `train` False: only redraw from what is saved."""
    from model_export.recipes import train_recipe

    datasets = datasets or ["digits-hard"]
    selection = f"--grid {grid}" if not pairs else "--rows " + ",".join(f"{r}/{h}" for r, h in pairs)
    pairs = pairs or grid_pairs(grid)
    saved = load_results(results_path)
    trained = (epochs, max_steps, train_limit, variant, freeze_backbone)
    if train:  # one setting per data set and file: refused before any training, not after it
        clash = sorted({r.dataset for r in saved if r.dataset in datasets and r.key[4] != trained})
        if clash:
            raise ValueError(f"{results_path}: {', '.join(clash)} were trained with other settings "
                             f"({', '.join(TRAINING_KEYS)}); use another --results file")
    done = {r.key for r in saved}
    results_path.parent.mkdir(parents=True, exist_ok=True)
    for dataset in datasets if train else []:
        splits = None
        for recipe, head in training_runs(pairs):
            for seed in seeds:
                if (dataset, recipe, head, seed, trained) in done or not fits(dataset, head):
                    continue
                if splits is None:
                    splits = _splits(dataset, train_limit)
                started = time.perf_counter()
                run, _ = train_recipe(recipe, head, dataset=dataset, variant=variant, seed=seed, progress=False,
                                      splits=splits, epochs=epochs, max_steps=max_steps, threads=1,
                                      freeze_backbone=freeze_backbone)
                res = evaluate(run, splits, seed)
                res.settings = {**dict(zip(TRAINING_KEYS, trained, strict=True)),
                                "train_samples": len(splits.train), "steps": run.result.steps}
                with results_path.open("a") as f:
                    f.write(json.dumps(asdict(res)) + "\n")
                if progress:
                    print(f"{dataset} {recipe}/{head} seed {seed}: final {res.exit_accuracy[-1]:.3f}, "
                          f"{time.perf_counter() - started:.0f} s", flush=True)
    results = [r for r in load_results(results_path) if r.dataset in datasets]
    if len({r.key[:4] for r in results}) != len(results):
        raise ValueError(f"{results_path}: some rows and seeds were trained with different settings; "
                         "keep one setting per data set in one results file")
    for dataset in datasets:  # the bootstrap pairs rows seed by seed: every row needs the same seeds
        seed_sets = {frozenset(r.seed for r in results if (r.dataset, r.recipe, r.head) == key)
                     for key in {(r.dataset, r.recipe, r.head) for r in results if r.dataset == dataset}}
        if len(seed_sets) > 1:
            raise ValueError(f"{results_path}: the rows of {dataset} were trained with different seeds "
                             f"({sorted(sorted(s) for s in seed_sets)}); train the missing ones")
    write_markdown(Path(out), report(results, pairs, Path(out), Path(img_dir), header_text(results, selection)))
    return results


def fits(dataset: str, head: str) -> bool:
    """Heads that need a patch grid (LGViT's, DMPO's) have no tokens to work on in a text model."""
    from model_export.heads import HEADS
    from model_export.recipes import TEXT_DATASETS

    return not (dataset in TEXT_DATASETS and getattr(HEADS[head], "needs_grid", False))


def _splits(dataset: str, train_limit: int | None) -> Any:
    """The data set's fixed split, its training part subsampled to `train_limit` (fixed seed)."""
    from model_export.recipes import TEXT_DATASETS

    if dataset in TEXT_DATASETS:
        from model_export.sentiment import sentiment_splits

        splits = sentiment_splits()
    else:
        from model_export.data import load_splits

        splits = load_splits(dataset, seed=0)
    if train_limit is not None and train_limit < len(splits.train):
        from dataclasses import replace

        keep = np.sort(np.random.default_rng(0).permutation(len(splits.train))[:train_limit])
        splits = replace(splits, train=splits.train.subset(keep))
    return splits
