"""The training objective (batch -> loss) against its definitions: CutMix on soft targets, weights and a teacher's
probabilities; the loss with per-image weights and the distillation term; gradient accumulation; and the honesty of
pseudo-labels and distillation (fold k learns only from the teacher's fold k)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from timm.data import Mixup
from torch import nn

from src.core.config import resolve_config
from src.core.distributed import SINGLE_PROCESS
from src.core.files import write_csv, write_json, write_yaml
from src.core.layout import ExperimentDir
from src.data.competition import load_competition_data
from src.data.training_set import TrainingSet
from src.inference.probabilities import probs_frame
from src.inference.voting import combine
from src.training import distill, pseudo
from src.training.distill import Distillation
from src.training.loop import Training, train_step
from src.training.objective import FoldContext, build_objective

CPU = torch.device("cpu")


def constant_images(n: int) -> torch.Tensor:
    """Image i is the constant i, so a mixed image tells how much of it is left."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 24, 40).clone()


def test_cutmix_mixes_soft_targets_weights_and_teacher_probabilities_by_the_pasted_area():
    """t_i' = kept_i t_i + (1 - kept_i) t_(N-1-i) for every per-image target, kept_i the share of image i's pixels
    left after the box of image N-1-i is pasted; the teacher's probabilities are softened at T before they mix."""
    cfg, _ = resolve_config("exp06", overrides=["train.cutmix_prob=1.0", "train.batch_size=6"])
    temperature = 2.0
    objective = build_objective(cfg, n_classes=5, terms=[Distillation(temperature, alpha=0.5)])
    generator = torch.Generator().manual_seed(0)
    soft = torch.softmax(torch.randn(6, 5, generator=generator), dim=1)
    teacher = torch.softmax(torch.randn(6, 5, generator=generator), dim=1)
    weight = torch.rand(6, generator=generator) + 0.5
    batch = {"label": torch.arange(6) % 5, "soft": soft, "weight": weight, "teacher": teacher}
    softened = teacher.pow(1 / temperature) / teacher.pow(1 / temperature).sum(dim=1, keepdim=True)
    np.random.seed(0)
    for _ in range(10):
        mixed, targets = objective.mix(constant_images(6), objective.targets(batch, CPU))
        for i in range(6):
            kept = (mixed[i] == i).float().mean().item()
            other = 5 - i
            assert ((mixed[i] == i) | (mixed[i] == other)).all()
            for got, values in ((targets.target, soft), (targets.weight, weight),
                                (targets.extras["teacher"], softened)):
                torch.testing.assert_close(got[i], kept * values[i] + (1 - kept) * values[other], rtol=0, atol=1e-6)


def test_cutmix_of_class_indices_is_timms_to_the_last_bit():
    """With class indices, the objective's CutMix gives timm's own mixed images and one-hot targets, bit for bit:
    the runs trained before the objective existed keep their results."""
    cfg, _ = resolve_config("exp06", overrides=["train.cutmix_prob=0.7", "train.batch_size=8"])
    objective = build_objective(cfg, n_classes=5)
    timm_cutmix = Mixup(mixup_alpha=0.0, cutmix_alpha=cfg.train.cutmix_alpha, prob=0.7, switch_prob=0.0,
                        mode="batch", correct_lam=True, label_smoothing=0.0, num_classes=5)
    labels = torch.tensor([0, 3, 1, 4, 4, 2, 0, 1])
    for seed in range(10):
        images = torch.randn(8, 3, 24, 40, generator=torch.Generator().manual_seed(seed))
        np.random.seed(seed)
        ours_images, ours = objective.mix(images.clone(), objective.targets(labels, CPU))
        np.random.seed(seed)
        timm_images, timm_targets = timm_cutmix(images.clone(), labels)
        assert torch.equal(ours_images, timm_images) and torch.equal(ours.target, timm_targets)


def smoothed_cross_entropy(logits: np.ndarray, target: np.ndarray, eps: float) -> np.ndarray:
    """-sum_c t'_c log p_c per image, t' = (1 - eps) t + eps / C (torch's label smoothing), in float64."""
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    smoothed = (1 - eps) * target + eps / target.shape[1]
    return -(smoothed * log_p).sum(axis=1)


def test_loss_with_weights_and_distillation_is_its_definition():
    """loss = mean_i w_i [(1 - a) l_i + a T^2 KL(q_T,i || p_T,i)], l_i the label-smoothed cross entropy of the soft
    target, p_T = softmax(z / T), q_T = softmax(log q / T); the logged parts are mean_i w_i l_i and
    T^2 mean_i w_i KL_i."""
    temperature, alpha, eps = 3.0, 0.3, 0.1
    cfg, _ = resolve_config("exp20", overrides=[f"loss.label_smoothing={eps}"])
    objective = build_objective(cfg, n_classes=4, terms=[Distillation(temperature, alpha)])
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 4, generator=generator) * 2
    soft = torch.softmax(torch.randn(5, 4, generator=generator), dim=1)
    teacher = torch.softmax(torch.randn(5, 4, generator=generator) * 3, dim=1)
    weight = torch.tensor([1.0, 0.5, 0.5, 1.0, 2.0])
    targets = objective.targets({"label": soft.argmax(1), "soft": soft, "weight": weight, "teacher": teacher}, CPU)
    loss, parts = objective.loss(logits, targets)

    z, t, q, w = (x.double().numpy() for x in (logits, soft, teacher, weight))
    labels_loss = smoothed_cross_entropy(z, t, eps)
    q_t = q ** (1 / temperature) / (q ** (1 / temperature)).sum(axis=1, keepdims=True)
    log_p_t = z / temperature - np.log(np.exp(z / temperature).sum(axis=1, keepdims=True))
    kl = (q_t * (np.log(q_t) - log_p_t)).sum(axis=1)
    expected = np.mean(w * ((1 - alpha) * labels_loss + alpha * temperature ** 2 * kl))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["labels"].item() == pytest.approx(np.mean(w * labels_loss), rel=1e-5)
    assert parts["distill"].item() == pytest.approx(temperature ** 2 * np.mean(w * kl), rel=1e-5)
    plain, plain_parts = build_objective(cfg, 4).loss(logits, build_objective(cfg, 4).targets(soft.argmax(1), CPU))
    assert plain.item() == pytest.approx(F.cross_entropy(logits, soft.argmax(1), label_smoothing=eps).item())
    assert plain_parts == {}


class CountingNet(nn.Module):
    """A model without BatchNorm that records the batch size of every forward pass."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.LayerNorm(4), nn.Linear(4, 5))
        self.batches: list[int] = []

    def forward(self, x):
        self.batches.append(len(x))
        return self.net(x)


def stepped(accumulate: int, extras: bool) -> CountingNet:
    """A CountingNet after one train_step on 16 images in `accumulate` micro-batches (SGD at lr 0: the gradients stay
    in .grad, the weights do not move)."""
    overrides = ["train.batch_size=16", f"train.accumulate_steps={accumulate}", "train.amp=false",
                 "loss.label_smoothing=0.1"]
    cfg, _ = resolve_config("exp20", overrides=overrides)
    torch.manual_seed(0)
    model = CountingNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    terms = [Distillation(2.0, 0.5)] if extras else []
    run = Training(cfg, CPU, model, model, model, (0.5,) * 3, (0.5,) * 3, 0, [], optimizer, scheduler,
                   torch.amp.GradScaler("cpu", enabled=False), build_objective(cfg, 5, terms))
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(16, 3, 12, 12, generator=generator), torch.randint(0, 5, (16,), generator=generator)
    targets = labels if not extras else {
        "label": labels, "weight": torch.rand(16, generator=generator) + 0.5,
        "teacher": torch.softmax(torch.randn(16, 5, generator=generator), dim=1)}
    train_step(run, images, targets)
    return model


@pytest.mark.parametrize("extras", [False, True], ids=["labels", "weights and distillation"])
def test_two_accumulated_micro_batches_of_8_give_the_gradients_of_one_batch_of_16(extras):
    whole, accumulated = stepped(1, extras), stepped(2, extras)
    assert whole.batches == [16] and accumulated.batches == [8, 8]
    for (name, one), (_, two) in zip(whole.named_parameters(), accumulated.named_parameters()):
        assert one.grad.abs().max() > 0, name
        torch.testing.assert_close(two.grad, one.grad, rtol=1e-5, atol=1e-7, msg=name)


# --- Honesty: fold k of a student learns only from the teacher's fold k --------------------------------------------

def fake_teacher(outputs, name: str, data, seed: int) -> dict[int, np.ndarray]:
    """A finished experiment `name` whose folds wrote distinct test probabilities (no weights: pseudo-labels read
    the fold files only). Returns them by fold."""
    cfg, _ = resolve_config("exp21", "demo")
    experiment = ExperimentDir(outputs / name)
    fingerprint = f"teacher-{name}"
    write_yaml({**cfg.model_dump(mode="json"), "run": {"result_fingerprint": fingerprint,
                                                       "data_fingerprint": data.fingerprint()}}, experiment.config)
    rng = np.random.default_rng(seed)
    per_fold = {}
    for fold in range(cfg.data.n_folds):
        probs = rng.dirichlet(np.full(len(data.classes), 0.3), size=len(data.test))
        write_csv(probs_frame(data.test["id"], probs, data.classes), experiment.fold(fold).test_probs)
        write_json({"fingerprint": fingerprint}, experiment.fold(fold).done)
        per_fold[fold] = probs
    write_csv(probs_frame(data.test["id"], np.mean(list(per_fold.values()), axis=0), data.classes),
              experiment.test_probs)
    return per_fold


def fold_context(cfg, data, fold: int, outputs) -> FoldContext:
    return FoldContext(cfg, data, fold, ExperimentDir(outputs / cfg.name).fold(fold), "student", outputs, CPU,
                       SINGLE_PROCESS, lambda _: None)


def test_the_pseudo_labels_of_fold_k_are_the_teacher_fold_k_probabilities(tiny_root, tmp_path):
    """Every fold's pseudo-labelled crops carry exactly the teacher's fold k test probabilities (not the fold
    average, not another fold's), as the crops they are (test paths, the top artist as label); an ensemble teacher
    combines its members' fold k files with the weights fitted without fold k."""
    data = load_competition_data(tiny_root, log=lambda _: None)
    outputs = tmp_path / "outputs"
    teachers = {name: fake_teacher(outputs, name, data, seed) for seed, name in enumerate(("t1", "t2"))}
    per_fold_weights = {fold: [0.25 + 0.1 * fold, 0.75 - 0.1 * fold] for fold in range(5)}
    write_yaml({"name": "ens", "members": ["t1", "t2"], "method": "soft", "weights": "fit",
                "fitted": {"weights_per_fold": per_fold_weights, "test_weights": [0.5, 0.5]}},
               ExperimentDir(outputs / "ens").config)
    for teacher, expected in (("t1", teachers["t1"]),
                              ("ens", {fold: combine(np.stack([teachers["t1"][fold], teachers["t2"][fold]]),
                                                     np.asarray(per_fold_weights[fold]), "soft")
                                       for fold in range(5)})):
        cfg, _ = resolve_config("exp21", "demo", [f"pseudo.from={teacher}", "pseudo.threshold=0.55"])
        for fold in range(5):
            paintings = data.train.sample(4, random_state=fold)
            training = pseudo.extend(TrainingSet(paintings, len(data.classes)), fold_context(cfg, data, fold, outputs))
            keep = expected[fold].max(axis=1) >= 0.55
            assert 0 < keep.sum() < len(keep)
            assert training.crops["id"].tolist() == data.test["id"][keep].tolist()
            assert training.crops["path"].tolist() == data.test["path"][keep].tolist()
            assert (training.crops["label"].to_numpy() == expected[fold][keep].argmax(axis=1)).all()
            soft = training.targets["soft"]
            np.testing.assert_allclose(soft[len(paintings):], expected[fold][keep], rtol=1e-6)
            np.testing.assert_array_equal(soft[:len(paintings)], np.eye(len(data.classes))[paintings["label"]])
            assert training.paintings is paintings


@pytest.mark.slow
def test_distillation_targets_of_fold_k_are_the_teacher_fold_k_predictions(finished_run, tmp_path):
    """The targets of fold k's paintings are the mean over each painting's validation-geometry crops of what the
    teacher's fold k best.pt predicts (not another fold's model), cached in the student's fold folder."""
    from src.core.layout import read_saved
    from src.data.geometry import validation_set
    from src.inference.predictor import Predictor
    from src.pipeline.resolve import resolve_with_data

    data = load_competition_data(finished_run["root"], log=lambda _: None)
    student = resolve_with_data(resolve_config("exp00", "demo", ["distill.from=exp00"])[0], None, data,
                                say=lambda _: None).cfg
    paintings = data.train.iloc[:6]
    crops = validation_set(student, paintings)
    predictor = Predictor.for_checkpoints(read_saved(finished_run["exp"]).experiment, len(data.classes), CPU)
    expected = {}
    for fold in (1, 3):
        predictor.load(ExperimentDir(finished_run["exp"]).fold(fold).best, data.classes)
        expected[fold] = predictor.predict(crops.paths, test=True, boxes=crops.boxes).reshape(
            len(paintings), -1, len(data.classes)).mean(axis=1)
    assert not np.allclose(expected[1], expected[3], atol=1e-4)
    for fold in (1, 3):
        context = fold_context(student, data, fold, finished_run["outputs"])
        context.fold_dir = ExperimentDir(tmp_path / "student").fold(fold)
        training = distill.extend(TrainingSet(paintings, len(data.classes)), context)
        np.testing.assert_allclose(training.targets["teacher"], expected[fold], rtol=1e-5, atol=1e-6)
        assert context.fold_dir.teacher_probs("student").is_file()


@pytest.mark.slow
def test_a_student_with_pseudo_labels_and_distillation_trains_and_logs_its_loss_parts(finished_run, tmp_path):
    """End to end: fold 2 of a student of the finished tiny exp00, with pseudo-labelled crops, distillation and two
    micro-batches a step: history.csv logs the label loss and the distillation term, the teacher's predictions are
    cached in the fold, and the run's fingerprint holds the teacher's identity."""
    import yaml

    from src.core.config import result_fingerprint
    from src.core.layout import read_saved
    from tests.conftest import TINY_RUN, run_cli

    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "exp00").symlink_to(finished_run["exp"], target_is_directory=True)
    assert run_cli("run", "exp01", "--data", finished_run["root"], "--outputs", outputs, "--submissions",
                   tmp_path / "submissions", *TINY_RUN, "train.folds=[2]", "pseudo.from=exp00",
                   "pseudo.threshold=0.2", "distill.from=exp00", "train.accumulate_steps=2") == 0
    student = ExperimentDir(outputs / "exp01")
    history = pd.read_csv(student.fold(2).history)
    assert {"train_loss_labels", "train_loss_distill"} <= set(history.columns)
    recorded = yaml.safe_load(student.config.read_text())["run"]["result_fingerprint"]
    teacher = read_saved(finished_run["exp"]).run["result_fingerprint"]
    data = load_competition_data(finished_run["root"], log=lambda _: None)
    cfg = read_saved(student.path).experiment
    assert recorded == result_fingerprint(cfg, data.fingerprint(with_style=True),
                                          {"pseudo.from": teacher, "distill.from": teacher})
    assert recorded != result_fingerprint(cfg, data.fingerprint(with_style=True))
    assert student.fold(2).teacher_probs(recorded).is_file()


def test_a_teacher_must_be_finished_another_run_with_the_same_folds_and_data(tiny_root, tmp_path):
    """One line each: a teacher not run yet, the run itself, a frozen-feature student, a teacher of other folds."""
    from src.core.errors import UserError
    from src.training.techniques import sources

    data = load_competition_data(tiny_root, log=lambda _: None)
    outputs = tmp_path / "outputs"
    fake_teacher(outputs, "t1", data, 0)
    cfg, _ = resolve_config("exp21", "demo", ["pseudo.from=t1"])
    assert sources(cfg, outputs) == {"pseudo.from": "teacher-t1"}
    for overrides, message in ((["distill.from=nothere"], "distill.from: .*nothere/config.yaml not found"),
                               (["pseudo.from=exp21"], "pseudo.from: exp21 cannot learn from itself")):
        with pytest.raises(UserError, match=message):
            sources(resolve_config("exp21", "demo", overrides)[0], outputs)
    with pytest.raises(UserError, match="frozen fits a classifier"):
        sources(resolve_config("feat01", "demo", ["pseudo.from=t1"])[0], outputs)
    other_folds = resolve_config("exp21", "demo", ["pseudo.from=t1", "data.n_folds=4"])[0]
    with pytest.raises(UserError, match="pseudo.from: t1 was trained with data.n_folds=5"):
        pseudo.extend(TrainingSet(data.train, len(data.classes)), fold_context(other_folds, data, 0, outputs))
