"""Training: one Tune trial, for either family.

A trial's config holds ``family`` (the index into ``spec.models``) and that
family's parameters under ``f{index}``. A scikit-learn trial fits in the trial's
own process and reports once with a checkpoint. A torch trial is a Ray Train
driver: it launches a ``TorchTrainer`` (DDP over ``workers``), whose workers
report a validation score and a checkpoint every epoch, forwarded to Tune so
schedulers can stop it early. The Train run is named after the trial, so a
retried or resumed trial continues from its last epoch checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.evaluate import score
from training.models import TORCH_DEFAULTS, build_mlp, make_estimator

CHECKPOINT_PATH_KEY = "checkpoint_path"  # set by Ray's TuneReportCallback


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs besides its config; put in the object store once per search."""

    task: str
    metric: str
    n_classes: int  # 0 for regression
    seed: int
    models: list[dict[str, Any]]  # spec.models as plain dicts
    cpus_per_trial: float
    storage_path: str
    data_refs: dict[str, Any]  # X_train, y_train, X_valid, y_valid: ObjectRefs to arrays


GRID_KEY = "trial"  # grid search: one grid_search over whole per-family configs


def family_params(config: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The family index of a trial config and that family's own parameters."""
    config = config.get(GRID_KEY, config)
    family = int(config["family"])
    return family, dict(config.get(f"f{family}", {}))


def _where() -> dict[str, Any]:
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id()}


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Tune trainable: dispatch to the family's training."""
    family, params = family_params(config)
    model = ctx.models[family]
    if model["type"] == "sklearn":
        _sklearn_trial(model, params, ctx)
    else:
        _torch_trial(model, params, ctx, family)


def _sklearn_trial(model: dict[str, Any], params: dict[str, Any], ctx: TrialContext) -> None:
    import joblib
    import ray
    from ray import tune

    X_train, y_train, X_valid, y_valid = (
        ray.get(ctx.data_refs[k]) for k in ("X_train", "y_train", "X_valid", "y_valid")
    )
    est = make_estimator(model["estimator"], params, ctx.seed).fit(X_train, y_train)
    metrics = {ctx.metric: evaluate_native(est, X_valid, y_valid, ctx), **_where()}
    with tempfile.TemporaryDirectory() as tmp:
        # The checkpoint is for the driver that exports the winner; serving never loads it.
        joblib.dump(est, os.path.join(tmp, "estimator.joblib"))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def evaluate_native(est, X: np.ndarray, y: np.ndarray, ctx: TrialContext) -> float:
    if ctx.task == "classification":
        proba = est.predict_proba(X) if hasattr(est, "predict_proba") else None
        return score(ctx.metric, y, est.predict(X), proba)
    return score(ctx.metric, y, est.predict(X))


def _torch_trial(
    model: dict[str, Any], params: dict[str, Any], ctx: TrialContext, family: int
) -> None:
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = tune.get_context()
    gpus = float(model.get("gpus_per_worker") or 0)
    resources = {"CPU": ctx.cpus_per_trial}
    if gpus:
        resources["GPU"] = gpus
    trainer = TorchTrainer(
        torch_worker_loop,
        train_loop_config={**TORCH_DEFAULTS, **params, "_ctx": ctx},
        scaling_config=ray.train.ScalingConfig(
            num_workers=int(model.get("workers", 1)),
            use_gpu=gpus > 0,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=f"train-{trial.get_trial_id()}",
            storage_path=ctx.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def torch_worker_loop(config: dict[str, Any]) -> None:
    """Per-worker DDP loop: shard the train split, train, report valid score + checkpoint per epoch.

    Runs on every Train worker.
    """
    import ray
    import ray.train
    import ray.train.torch
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    ctx: TrialContext = config["_ctx"]
    torch.manual_seed(ctx.seed)
    torch.set_num_threads(max(1, int(ctx.cpus_per_trial)))
    X_train, y_train, X_valid, y_valid = (
        ray.get(ctx.data_refs[k]) for k in ("X_train", "y_train", "X_valid", "y_valid")
    )
    classify = ctx.task == "classification"
    y_mean, y_std = (0.0, 1.0) if classify else (float(y_train.mean()), float(y_train.std() or 1.0))
    net = build_mlp(
        X_train.shape[1],
        ctx.n_classes if classify else 1,
        config["hidden_layers"],
        config["dropout"],
    )
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, "model.pt"), weights_only=True)
        net.load_state_dict(state["model"])
        start_epoch = int(state["epoch"]) + 1
    model = ray.train.torch.prepare_model(net)
    targets = torch.as_tensor(y_train if classify else (y_train - y_mean) / y_std)
    targets = targets.long() if classify else targets.float().unsqueeze(1)
    loader = DataLoader(
        TensorDataset(torch.as_tensor(X_train), targets),
        batch_size=int(config["batch_size"]),
        shuffle=True,
        generator=torch.Generator().manual_seed(ctx.seed),
    )
    loader = ray.train.torch.prepare_data_loader(loader)
    opt = torch.optim.Adam(
        model.parameters(), lr=float(config["lr"]), weight_decay=float(config["weight_decay"])
    )
    loss_fn = torch.nn.CrossEntropyLoss() if classify else torch.nn.MSELoss()
    device = ray.train.torch.get_device()
    X_valid_t = torch.as_tensor(X_valid).to(device)
    rank = ray.train.get_context().get_world_rank()
    for epoch in range(start_epoch, int(config["epochs"])):
        if ray.train.get_context().get_world_size() > 1:
            loader.sampler.set_epoch(epoch)
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            out = model(X_valid_t).cpu()
        if classify:
            proba = torch.softmax(out, dim=1).numpy()
            value = score(ctx.metric, y_valid, proba.argmax(axis=1), proba)
        else:
            value = score(ctx.metric, y_valid, out[:, 0].numpy() * y_std + y_mean)
        metrics = {ctx.metric: value, "epoch": epoch, **_where()}
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save(
                    {"model": net.state_dict(), "epoch": epoch, "y_mean": y_mean, "y_std": y_std},
                    os.path.join(tmp, "model.pt"),
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
