"""An experiment's output folder, defined in one place.

OUTPUTS/NAME/ holds config.yaml, oof.csv, test_probs.csv, logs/ (fold jobs), tb/ (TensorBoard), .locks/ and one
folder per fold with best.pt, last.pt (while the fold trains), history.csv, val_probs.csv, test_probs.csv, done.json
and, under distillation, teacher_probs-FINGERPRINT.csv. config.yaml comes in three shapes, all read by `read_saved`:
an experiment (its resolved config), a TTA run (`tta` and the source's config under `source_config`) and an ensemble
(`members`). Each holds its provenance under `run`. The three kinds share one namespace, the folder's name
(`check_free_for`). Also defined here: the columns of the tables a run writes beside the artists' and what an export
bundle holds, so that src/core/removal.py recognises what it may delete.
"""
from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError
from .files import write_json
from .paths import CONFIG_DIR, ENSEMBLE_DIR
from .schema import ExperimentConfig

DONE_FILE = "done.json"
FOLD_FOLDER = re.compile(r"fold\d+")
# The columns of the tables a run writes beside one column per artist (val_probs.csv, oof.csv, test_probs.csv, the
# submission): no artist may be named like one of them.
TABLE_COLUMNS = ("id", "crop", "fold", "artist", "pred")
# What an export bundle holds at its top level (src/pipeline/export.py): the models, the code and its entry point.
BUNDLE_MODELS = "models"
BUNDLE_CODE = ("src", "configs", "ensemble", "run.sh", "requirements.txt", "requirements")
BUNDLE_WHEELS = "wheels"  # wheels of core packages Kaggle's image lacks
BUNDLE_ENTRIES = (BUNDLE_MODELS, *BUNDLE_CODE, BUNDLE_WHEELS, "predict.py", "manifest.json")


def _file(name: str) -> property:
    return property(lambda self: self.path / name, doc=f"{name} in this folder")


@dataclass(frozen=True)
class FoldDir:
    """One fold's files: its checkpoints, its history and probabilities, and done.json, which marks it finished with
    the result fingerprint of its config and data."""
    path: Path
    best = _file("best.pt")
    last = _file("last.pt")
    history = _file("history.csv")
    val_probs = _file("val_probs.csv")
    test_probs = _file("test_probs.csv")
    done = _file(DONE_FILE)

    def teacher_probs(self, fingerprint: str) -> Path:
        """A teacher's probabilities of the fold's training images (distillation), cached for the run of this result
        fingerprint."""
        return self.path / f"teacher_probs-{fingerprint}.csv"

    def done_record(self) -> Optional[dict[str, Any]]:
        """What done.json holds (the fingerprint and the fold's result); None while the fold is not done, and when
        done.json is not the record a finished fold writes (`damage` says so)."""
        try:
            record = json.loads(self.done.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and "fingerprint" in record else None

    def damage(self, weights: bool = True) -> Optional[str]:
        """Why a fold that done.json marks finished cannot be used as it is, or None: done.json unreadable, or a
        file its results need missing (val_probs.csv, test_probs.csv, and best.pt when the fold has `weights`) or,
        for best.pt, not a whole checkpoint (torch's zip archive without its closing directory: cut short)."""
        if not self.done.is_file():
            return None
        if self.done_record() is None:
            return f"{DONE_FILE} is empty or damaged"
        needed = [self.val_probs, self.test_probs, *([self.best] if weights else [])]
        missing = [path.name for path in needed if not path.is_file()]
        if missing:
            return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
        if weights:
            try:
                zipfile.ZipFile(self.best).close()
            except (OSError, zipfile.BadZipFile) as error:
                return f"{self.best.name} is damaged ({error})"
        return None

    def write_done(self, fingerprint: str, result: dict[str, Any]) -> None:
        write_json({"fingerprint": fingerprint, **result}, self.done)


@dataclass(frozen=True)
class ExperimentDir:
    """An experiment's (or a TTA run's, or an ensemble's) folder under OUTPUTS."""
    path: Path
    config = _file("config.yaml")
    oof = _file("oof.csv")
    test_probs = _file("test_probs.csv")
    tensorboard = _file("tb")

    @property
    def name(self) -> str:
        return self.path.name

    def fold(self, fold: int) -> FoldDir:
        return FoldDir(self.path / f"fold{fold}")

    def fold_histories(self) -> dict[int, Path]:
        """The history.csv of every fold that has one, by fold number."""
        paths = sorted(self.path.glob("fold*/history.csv"))
        return {int(path.parent.name.removeprefix("fold")): path for path in paths}

    def log(self, fold: int) -> Path:
        """Where a fold job started by --gpus writes its output."""
        return self.path / "logs" / f"fold{fold}.log"

    def lock(self, name: str) -> Path:
        """A lock file of the experiment (src/pipeline/locks.py): fold0 ... foldK, publish, tracking."""
        return self.path / ".locks" / f"{name}.lock"

    def locks(self) -> list[Path]:
        return sorted((self.path / ".locks").glob("*.lock"))


@dataclass(frozen=True)
class SavedRun:
    """What an experiment's, a TTA run's or an ensemble's config.yaml says."""
    name: str
    raw: dict[str, Any]

    @property
    def kind(self) -> str:
        return "ensemble" if "members" in self.raw else "tta" if "tta" in self.raw else "experiment"

    @property
    def parent(self) -> Optional[str]:
        return self.raw.get("parent")

    @property
    def source(self) -> str:
        """The experiment whose fold checkpoints this run predicts with: a TTA run's parent, else itself."""
        return self.raw["parent"] if self.kind == "tta" else self.name

    @property
    def experiment(self) -> ExperimentConfig:
        """The resolved config of the experiment, or of a TTA run's source (not for an ensemble)."""
        if self.kind == "ensemble":
            raise UserError(f"{self.name} is an ensemble; an experiment or a TTA run of one is needed here")
        saved = self.raw["source_config"] if self.kind == "tta" else self.raw
        return ExperimentConfig.model_validate({key: value for key, value in saved.items() if key != "run"})

    def fine_tuned(self, needed_by: str) -> ExperimentConfig:
        """The config of an experiment (or a TTA run's source) that has fold networks to predict with; one line
        naming `needed_by` (a command, a config key) for a frozen-feature experiment, which has none."""
        cfg = self.experiment
        if cfg.frozen:
            raise UserError(f"{self.name} is a frozen-feature experiment (a {cfg.frozen.classifier} classifier, no "
                            f"fold networks); {needed_by} needs a fine-tuned experiment")
        return cfg

    @property
    def tta(self) -> str:
        return self.raw.get("tta", "none")

    @property
    def members(self) -> list[str]:
        return list(self.raw.get("members", []))

    @property
    def method(self) -> str:
        """How an ensemble combines its members: soft or hard voting."""
        return self.raw.get("method", "soft")

    def member_weights(self, fold: Optional[int] = None) -> list[float]:
        """An ensemble's member weights: when fitted, those fitted without fold `fold`'s paintings, or the test
        weights (fitted on every fold) without a fold; else the configured weights, or equal ones."""
        spec = self.raw.get("weights")
        if spec == "fit":
            fitted = self.raw["fitted"]
            weights = fitted["test_weights"] if fold is None else fitted["weights_per_fold"][fold]
        else:
            weights = spec or [1.0] * len(self.members)
        return [float(weight) for weight in weights]

    @property
    def validation(self) -> Optional[dict]:
        return self.raw.get("validation")

    @property
    def run(self) -> dict[str, Any]:
        """Provenance: git commit, packages, data root and fingerprint, precision, ..."""
        return self.raw.get("run", {})


def is_experiment_folder(path: Path) -> bool:
    """Whether `path` is an experiment's (a TTA run's, an ensemble's) folder: it holds config.yaml, the lock folder
    or a fold folder."""
    try:
        return path.is_dir() and ((path / "config.yaml").is_file() or (path / ".locks").is_dir() or any(
            FOLD_FOLDER.fullmatch(child.name) and child.is_dir() for child in path.iterdir()))
    except OSError:
        return False


def is_export_bundle(path: Path) -> bool:
    """Whether `path` is a folder `export` wrote: manifest.json and nothing but what a bundle holds."""
    try:
        return path.is_dir() and (path / "manifest.json").is_file() and all(
            child.name in BUNDLE_ENTRIES for child in path.iterdir())
    except OSError:
        return False


KINDS = {"experiment": "an experiment", "tta": "a TTA run", "ensemble": "an ensemble"}


def check_free_for(out_dir: Path, kind: str) -> None:
    """Stop with one line when the name of `out_dir` belongs to another kind of run than `kind` (a key of KINDS):
    experiments, TTA runs and ensembles share one namespace, the folders under OUTPUTS, and one would overwrite the
    other's config, OOF, test probabilities and submission. Nor may an experiment take the name of an ensemble under
    ensemble/, or an ensemble that of a config under configs/."""
    saved = read_saved(out_dir, required=False)
    name = out_dir.name
    if saved is not None and saved.kind != kind:
        raise UserError(f"{out_dir} holds {KINDS[saved.kind]} named {name}; {KINDS[kind]} of the same name would "
                        "overwrite it (experiments, TTA runs and ensembles share one namespace): name it otherwise")
    if kind not in ("experiment", "ensemble"):
        return
    other_kind, folder = ("ensemble", ENSEMBLE_DIR) if kind == "experiment" else ("experiment", CONFIG_DIR)
    other = folder / f"{name}.yaml"
    if other.is_file():
        raise UserError(f"{other} also names {name}; {KINDS[kind]} and {KINDS[other_kind]} may not share a name "
                        "(their folders under OUTPUTS would collide): rename one of them")


def read_saved(out_dir: Path, required: bool = True) -> Optional[SavedRun]:
    """The config.yaml under `out_dir`; when there is none, an error naming the command that writes it (or None
    when not `required`)."""
    path = ExperimentDir(out_dir).config
    if not path.is_file():
        if not required:
            return None
        raise UserError(f"{path} not found; run {out_dir.name} first (bash run.sh {out_dir.name}), or point --outputs "
                        "at the folder that holds it")
    return SavedRun(out_dir.name, yaml.safe_load(path.read_text(encoding="utf-8")) or {})
