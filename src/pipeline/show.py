"""`bash run.sh show EXP [key=value ...] [--profile demo|none]`: the config a run of EXP would use, as YAML, with the
parent chain it came from and the keys the profile and the overrides changed at the top. Runs nothing."""
from __future__ import annotations

import argparse
from typing import Any

import yaml

from ..core.config import flatten, parent_chain, resolve_config
from ..data.geometry import unresolved
from .resolve import choose_profile


def changed(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return [f"{key}: {before.get(key)} -> {value}" for key, value in after.items() if before.get(key) != value]


def show_config(name: str, profile_arg: str, overrides: list[str]) -> str:
    profile = choose_profile(profile_arg)
    chain = parent_chain(name)
    before, profile_changes = resolve_config(name, profile)
    cfg, _ = resolve_config(name, profile, overrides)
    lines = [f"# {name}: {cfg.description}", f"# parent chain: {' -> '.join(chain)}"]
    if profile:
        lines.append(f"# profile '{profile}' (configs/profiles/{profile}.yaml) changed:")
        lines += [f"#   {key}: {old} -> {new}" for key, (old, new) in profile_changes.items()]
    else:
        lines.append("# no profile (the experiment as a GPU user runs it)")
    if overrides:
        lines.append("# the overrides changed:")
        lines += [f"#   {line}" for line in changed(flatten(before.model_dump(mode="json")),
                                                    flatten(cfg.model_dump(mode="json")))]
    if unresolved(cfg):
        lines.append(f"# 'auto' ({', '.join(unresolved(cfg))}): measured from the data's image sizes when a run "
                     "starts, and recorded in its config.yaml")
    return "\n".join(lines) + "\n" + yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def command_show(args: argparse.Namespace) -> None:
    print(show_config(args.experiment, args.profile, args.overrides), end="")
