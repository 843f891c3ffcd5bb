"""`bash run.sh board [EXP ...]`: TensorBoard over the experiments' tb/ folders."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from ..core.errors import UserError
from ..core.layout import ExperimentDir
from ..core.requirements import require


def board_command(outputs: Path, experiments: list[str], port: int) -> list[str]:
    """TensorBoard over every experiment's tb/ folder under `outputs` (or the named ones)."""
    if experiments:
        folders = {name: ExperimentDir(outputs / name).tensorboard for name in experiments}
        missing = [name for name, folder in folders.items() if not folder.is_dir()]
        if missing:
            raise UserError(f"no TensorBoard logs for {', '.join(missing)} ({folders[missing[0]]} does not "
                            "exist); run the experiment with tracking.tensorboard=true (the default)")
        logdir = ["--logdir_spec", ",".join(f"{name}:{folder}" for name, folder in folders.items())]
    else:
        logdir = ["--logdir", str(outputs)]
    return [sys.executable, "-m", "tensorboard.main", *logdir, "--port", str(port)]


def command_board(args: argparse.Namespace) -> None:
    from ..pipeline.resolve import log

    require("tensorboard", "tensorboard", "board")
    command = board_command(Path(args.outputs), args.experiments, args.port)
    log(f"TensorBoard on http://localhost:{args.port} (Ctrl+C stops it): {' '.join(command[1:])}")
    subprocess.run(command, check=False)
