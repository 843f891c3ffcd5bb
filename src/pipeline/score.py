"""The ablation table, scored from OOF files: every experiment against its parent on the same images.

The change against the parent comes with a 95% paired bootstrap interval: the train images are resampled
with replacement and both experiments are scored on the same resample, so fold-to-fold noise and the luck of
which images are hard are in the interval. A change whose interval contains 0 is not a measured gain.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, f1_score, top_k_accuracy_score

from ..core.errors import UserError
from ..core.files import write_csv, write_text
from ..core.layout import ExperimentDir, read_saved
from ..core.metrics import painting_scores
from ..inference.probabilities import read_probs

BOOTSTRAP_SAMPLES = 1000


def fast_macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Macro F1 over the classes present in y_true or y_pred (scikit-learn's default), from bincounts."""
    tp = np.bincount(y_true[y_true == y_pred], minlength=n_classes)
    true_count = np.bincount(y_true, minlength=n_classes)
    pred_count = np.bincount(y_pred, minlength=n_classes)
    present = (true_count + pred_count) > 0
    f1 = 2 * tp[present] / (true_count[present] + pred_count[present])
    return float(f1.mean())


def paired_bootstrap(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, n_classes: int,
                     groups: np.ndarray | None = None, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 0) -> tuple[float, float]:
    """95% interval of macro F1(a) - macro F1(b) over resamples of the same images. With `groups` (the painting
    of each row: its validation crops), whole paintings are resampled, because a painting's crops are not
    independent of each other."""
    rng = np.random.default_rng(seed)
    groups = np.arange(len(y_true)) if groups is None else groups
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # the rows of group g are order[starts[g]:starts[g] + sizes[g]]
    sizes = np.bincount(inverse)
    starts = np.cumsum(sizes) - sizes
    diffs = np.empty(samples)
    for i in range(samples):
        lengths = sizes[chosen := rng.integers(0, len(sizes), len(sizes))]
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        idx = order[np.repeat(starts[chosen], lengths) + offsets]
        diffs[i] = (fast_macro_f1(y_true[idx], pred_a[idx], n_classes)
                    - fast_macro_f1(y_true[idx], pred_b[idx], n_classes))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), float(high)


def read_oof(out_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """An experiment's oof.csv (id, crop, fold, artist, pred, then one column per artist) and its artists."""
    path = ExperimentDir(out_dir).oof
    if not path.is_file():
        raise UserError(f"{path} not found; run the experiment's 5 folds first (bash run.sh {out_dir.name})")
    oof = read_probs(path)
    return oof, list(oof.columns[list(oof.columns).index("pred") + 1:])


def read_run_config(out_dir: Path) -> dict:
    """The config.yaml an experiment, TTA run or ensemble wrote (empty if none)."""
    saved = read_saved(out_dir, required=False)
    return saved.raw if saved is not None else {}


def validation_of(config: dict) -> dict:
    """The validation section an experiment's OOF was scored under (whole paintings when none was recorded)."""
    validation = config.get("validation") or {}
    if validation.get("mode", "whole") == "whole":
        return {"mode": "whole"}
    return {key: validation[key] for key in ("mode", "crops_per_image", "crop_area", "seed")}


def describe_validation(validation: dict) -> str:
    if validation["mode"] == "whole":
        return "whole paintings"
    low, high = validation["crop_area"]
    return f"{validation['crops_per_image']} crops of {low:.0%}-{high:.0%}"


def _test_predictions(out_dir: Path, classes: list[str], config: dict) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(true, predicted) class indices of the test images in solution.csv's order (demo data only); an artist of
    solution.csv that the experiment does not know gets index len(classes)."""
    data_root = config.get("run", {}).get("data_root")
    probs_path = ExperimentDir(out_dir).test_probs
    if not data_root or not (Path(data_root) / "solution.csv").is_file() or not probs_path.is_file():
        return None
    solution = pd.read_csv(Path(data_root) / "solution.csv", dtype=str)
    probs = pd.read_csv(probs_path, dtype={"id": str}).set_index("id").reindex(solution["id"])
    index = {name: i for i, name in enumerate(classes)}
    truth = solution["artist"].map(index).fillna(len(classes)).astype(int).to_numpy()
    return truth, probs[classes].to_numpy().argmax(axis=1)


def experiment_scores(oof: pd.DataFrame, classes: list[str]) -> dict[str, float]:
    index = {name: i for i, name in enumerate(classes)}
    y_true = oof["artist"].map(index).to_numpy()
    probs = oof[classes].to_numpy()
    y_pred = probs.argmax(axis=1)
    per_fold = [f1_score(y_true[oof["fold"] == k], y_pred[oof["fold"] == k], average="macro", zero_division=0)
                for k in sorted(oof["fold"].unique())]
    return {"oof_macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "paintings_macro_f1": painting_scores(oof["id"].to_numpy(), y_true, probs)["macro_f1"],
            "fold_f1_mean": float(np.mean(per_fold)), "fold_f1_std": float(np.std(per_fold, ddof=1))
            if len(per_fold) > 1 else 0.0,
            "accuracy": float((y_true == y_pred).mean()),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "top3_accuracy": float(top_k_accuracy_score(y_true, probs, k=min(3, len(classes)),
                                                        labels=np.arange(len(classes))))}


def ablation_table(outputs: Path, names: list[str]) -> pd.DataFrame:
    """One row per experiment: scores, and the change against its parent with a paired bootstrap interval."""
    rows, loaded, test_predictions = [], {}, {}
    for name in names:
        loaded[name] = read_oof(outputs / name)
    for name in names:
        oof, classes = loaded[name]
        config = read_run_config(outputs / name)
        parent = config.get("parent")
        validation = validation_of(config)
        test = _test_predictions(outputs / name, classes, config)
        if test is not None:
            test_predictions[name] = test
        row = {"experiment": name, "parent": parent or "", "validation": describe_validation(validation),
               **experiment_scores(oof, classes), "delta_vs_parent": np.nan, "delta_ci_low": np.nan,
               "delta_ci_high": np.nan,
               "test_macro_f1": None if test is None else fast_macro_f1(*test, len(classes) + 1)}
        if parent and ExperimentDir(outputs / parent).oof.is_file() and \
                validation_of(read_run_config(outputs / parent)) == validation:
            parent_oof, parent_classes = loaded.get(parent) or read_oof(outputs / parent)
            keys = pd.MultiIndex.from_frame(oof[["id", "crop"]])
            parent_keys = pd.MultiIndex.from_frame(parent_oof[["id", "crop"]])
            if parent_classes != classes or sorted(parent_keys) != sorted(keys):
                raise UserError(f"{name} and its parent {parent} were scored on different images or artists; "
                                "rerun one of them on the same data")
            index = {c: i for i, c in enumerate(classes)}
            parent_oof = parent_oof.set_index(["id", "crop"]).reindex(keys)
            y_true = oof["artist"].map(index).to_numpy()
            pred = oof[classes].to_numpy().argmax(axis=1)
            parent_pred = parent_oof[classes].to_numpy().argmax(axis=1)
            row["delta_vs_parent"] = (fast_macro_f1(y_true, pred, len(classes))
                                      - fast_macro_f1(y_true, parent_pred, len(classes)))
            row["delta_ci_low"], row["delta_ci_high"] = paired_bootstrap(y_true, pred, parent_pred, len(classes),
                                                                         groups=oof["id"].to_numpy())
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["test_predictions"] = test_predictions  # for rank_agreement's interval
    return table


def to_markdown(table: pd.DataFrame) -> str:
    lines = ["| experiment | parent | validated on | OOF macro F1 | paintings | fold F1 mean ± sd | accuracy | "
             "balanced acc | top-3 acc | Δ vs parent [95% CI] | test macro F1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in table.itertuples(index=False):
        delta = "" if np.isnan(row.delta_vs_parent) else \
            f"{row.delta_vs_parent:+.4f} [{row.delta_ci_low:+.4f}, {row.delta_ci_high:+.4f}]"
        test = "" if row.test_macro_f1 is None or pd.isna(row.test_macro_f1) else f"{row.test_macro_f1:.4f}"
        lines.append(f"| {row.experiment} | {row.parent} | {row.validation} | {row.oof_macro_f1:.4f} | "
                     f"{row.paintings_macro_f1:.4f} | {row.fold_f1_mean:.4f} ± {row.fold_f1_std:.4f} | "
                     f"{row.accuracy:.4f} | {row.balanced_accuracy:.4f} | {row.top3_accuracy:.4f} | {delta} | {test} |")
    ranking = rank_agreement(table)
    if ranking:
        lines += ["", ranking]
    return "\n".join(lines) + "\n"


def rank_agreement(table: pd.DataFrame) -> str:
    """How well the OOF ranks these experiments against the test: Spearman's rank correlation between OOF macro F1
    and test macro F1, over the experiments that have both (demo data: solution.csv), per validation kind. When
    the table holds the test predictions, a 95% interval over resamples of the test images says how much of the
    disagreement the test's own sampling noise could explain."""
    from scipy.stats import spearmanr

    lines = []
    scored = table.dropna(subset=["test_macro_f1"])
    predictions = table.attrs.get("test_predictions", {})
    for validation, rows in scored.groupby("validation", sort=False):
        if len(rows) >= 3 and rows["oof_macro_f1"].nunique() > 1 and rows["test_macro_f1"].nunique() > 1:
            rho = spearmanr(rows["oof_macro_f1"], rows["test_macro_f1"]).statistic
            line = (f"Spearman rank correlation of OOF and test macro F1 over the {len(rows)} experiments "
                    f"validated on {validation}: {rho:+.2f}")
            tests = [predictions.get(name) for name in rows.get("experiment", [])]
            if tests and all(test is not None and np.array_equal(test[0], tests[0][0]) for test in tests):
                low, high = resampled_rank_interval(rows["oof_macro_f1"].to_numpy(), tests)
                line += (f" (95% interval over resamples of the {len(tests[0][0])} test images: "
                         f"{low:+.2f} to {high:+.2f})")
            lines.append(line)
    return "\n".join(lines)


def resampled_rank_interval(oof_f1: np.ndarray, tests: list[tuple[np.ndarray, np.ndarray]],
                            samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% interval of Spearman(OOF F1, test F1) when the test images are resampled with replacement, the same
    resample for every experiment (`tests`: each experiment's (true, predicted) class indices, same images)."""
    from scipy.stats import spearmanr

    truth = tests[0][0]
    n_classes = int(max(max(t.max(), p.max()) for t, p in tests)) + 1
    rng = np.random.default_rng(seed)
    rhos = []
    for _ in range(samples):
        idx = rng.integers(0, len(truth), len(truth))
        test_f1 = [fast_macro_f1(truth[idx], pred[idx], n_classes) for _, pred in tests]
        if len(set(test_f1)) > 1:
            rhos.append(spearmanr(oof_f1, test_f1).statistic)
    low, high = np.percentile(rhos, [2.5, 97.5])
    return float(low), float(high)


def class_report(out_dir: Path) -> list[Path]:
    """Per-class F1 (CSV and PNG), the confusion-matrix PNG and, for trained experiments, the training curves."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from .figures import plot_confusion_matrix, plot_per_class_f1, plot_training_curves

    oof, classes = read_oof(out_dir)
    precision, recall, f1, support = precision_recall_fscore_support(oof["artist"], oof["pred"], labels=classes,
                                                                     zero_division=0)
    report = pd.DataFrame({"artist": classes, "precision": precision, "recall": recall, "f1": f1,
                           "support": support}).sort_values("f1")
    write_csv(report, out_dir / "per_class_f1.csv")
    matrix = confusion_matrix(oof["artist"], oof["pred"], labels=classes, normalize="true")
    written = [out_dir / "per_class_f1.csv",
               plot_per_class_f1(report, f"{out_dir.name}: OOF F1 per artist (macro {f1.mean():.4f})",
                                 out_dir / "per_class_f1.png"),
               plot_confusion_matrix(matrix, classes, f"{out_dir.name}: OOF confusion matrix, macro F1 {f1.mean():.4f}",
                                     out_dir / "confusion_matrix.png")]
    curves = plot_training_curves(out_dir)
    return written + ([curves] if curves else [])


def write_ablation(outputs: Path, names: list[str]) -> pd.DataFrame:
    table = ablation_table(outputs, names)
    write_csv(table, outputs / "ablation.csv")
    write_text(to_markdown(table), outputs / "ablation.md")
    return table


def command_score(args: argparse.Namespace) -> None:
    """`bash run.sh score [EXP ...] [--detail EXP]`: the ablation table from the OOF files."""
    from .resolve import log

    outputs = Path(args.outputs)
    names = args.experiments or sorted(p.parent.name for p in outputs.glob("*/oof.csv"))
    if not names:
        raise UserError(f"no experiment in {outputs} has an oof.csv yet; run one first (bash run.sh exp00)")
    table = write_ablation(outputs, names)
    print(to_markdown(table), end="")
    log(f"wrote {outputs / 'ablation.md'} and {outputs / 'ablation.csv'}")
    if args.detail:
        for path in class_report(outputs / args.detail):
            log(f"wrote {path}")
