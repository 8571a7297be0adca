"""The torch MLP's epoch loop, shared by both ways a torch trial trains.

- ``workers: 1``: the loop runs in the Tune trial's own process (:func:`train_in_trial`),
  reporting to Tune. Ray's docs advise this for single-worker trials: no Train run, no
  extra processes, and a reused trial actor has torch imported already.
- ``workers >= 2``: each Ray Train worker runs it under DDP (:func:`ddp_worker_loop`),
  reporting to Ray Train, which forwards rank 0's report to Tune.

Every epoch trains on the (sharded) train split, scores the valid split and reports
the score with a checkpoint (model, optimizer, epoch). A run that finds a checkpoint
continues after its epoch. Shuffling and dropout are seeded per epoch
(``seed + epoch``), so a run resumed from epoch k's checkpoint trains epoch k+1 on the
batches an uninterrupted run would have used.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from training.evaluate import score
from training.models import TORCH_DEFAULTS, build_mlp

if TYPE_CHECKING:
    from training.train import TrialContext

MODEL_FILE = "model.pt"


def train_in_trial(params: dict[str, Any], ctx: TrialContext, gpus: float = 0) -> None:
    """Train in this Tune trial's process: report and checkpoint through ``ray.tune``."""
    import torch
    from ray import tune

    device = torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")

    def report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, os.path.join(tmp, MODEL_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    _epochs(
        {**TORCH_DEFAULTS, **params},
        ctx,
        checkpoint=tune.get_checkpoint(),
        report=report,
        device=device,
    )


def ddp_worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker of a DDP run; rank 0 writes the checkpoints."""
    import ray.train
    import ray.train.torch
    import torch

    ctx: TrialContext = config["_ctx"]
    rank = ray.train.get_context().get_world_rank()

    def report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if state is not None:
                torch.save(state, os.path.join(tmp, MODEL_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)

    _epochs(
        {k: v for k, v in config.items() if k != "_ctx"},
        ctx,
        checkpoint=ray.train.get_checkpoint(),
        report=report,
        device=ray.train.torch.get_device(),
        rank=rank,
        world_size=ray.train.get_context().get_world_size(),
        wrap_model=ray.train.torch.prepare_model,
        wrap_loader=ray.train.torch.prepare_data_loader,
    )


def _epochs(
    config: dict[str, Any],
    ctx: TrialContext,
    *,
    checkpoint,
    report: Callable[[dict[str, Any], dict[str, Any] | None], None],
    device,
    rank: int = 0,
    world_size: int = 1,
    wrap_model: Callable | None = None,
    wrap_loader: Callable | None = None,
) -> None:
    """Train from the checkpoint's next epoch (or from scratch) to ``config["epochs"]``.

    ``report(metrics, state)`` gets every epoch's metrics and, on rank 0, the state to
    checkpoint (None on other ranks).
    """
    import ray
    import torch
    from torch.utils.data import DataLoader, TensorDataset

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
    opt_state, start_epoch = None, 0
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, MODEL_FILE), weights_only=True)
        net.load_state_dict(state["model"])
        opt_state = state.get("optimizer")
        start_epoch = int(state["epoch"]) + 1
    net.to(device)
    model = wrap_model(net) if wrap_model else net
    targets = torch.as_tensor(y_train if classify else (y_train - y_mean) / y_std)
    targets = targets.long() if classify else targets.float().unsqueeze(1)
    shuffle = torch.Generator()
    loader = DataLoader(
        TensorDataset(torch.as_tensor(X_train), targets),
        batch_size=int(config["batch_size"]),
        shuffle=True,
        generator=shuffle,
    )
    if wrap_loader:
        loader = wrap_loader(loader)
    opt = torch.optim.Adam(
        model.parameters(), lr=float(config["lr"]), weight_decay=float(config["weight_decay"])
    )
    if opt_state:
        opt.load_state_dict(opt_state)
    loss_fn = torch.nn.CrossEntropyLoss() if classify else torch.nn.MSELoss()
    X_valid_t = torch.as_tensor(X_valid).to(device)

    def report_epoch(epoch: int) -> None:
        metrics: dict[str, Any] = {"epoch": epoch}
        state = None
        if rank == 0:  # Ray Train forwards rank 0's metrics to Tune
            metrics[ctx.metric] = _valid_score(net, X_valid_t, y_valid, ctx, y_mean, y_std)
            metrics["node_id"] = ray.get_runtime_context().get_node_id()
            state = {
                "model": net.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": epoch,
                "y_mean": y_mean,
                "y_std": y_std,
            }
        report(metrics, state)

    epochs = int(config["epochs"])
    if checkpoint and start_epoch >= epochs:
        # Restored from a last epoch's checkpoint (PBT cloning a finished trial): report
        # that model once, so the trial's last result is the model it now holds.
        report_epoch(start_epoch - 1)
    for epoch in range(start_epoch, epochs):
        torch.manual_seed(ctx.seed + epoch)  # dropout
        shuffle.manual_seed(ctx.seed + epoch)
        if world_size > 1:
            loader.sampler.set_epoch(epoch)
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(model(xb.to(device)), yb.to(device)).backward()
            opt.step()
        report_epoch(epoch)


def _valid_score(net, X_valid_t, y_valid: np.ndarray, ctx: TrialContext, y_mean, y_std) -> float:
    """The metric on the valid split, from the bare module (a DDP forward on one rank
    could wait for the others)."""
    import torch

    net.eval()
    with torch.no_grad():
        out = net(X_valid_t).cpu()
    if ctx.task == "classification":
        proba = torch.softmax(out, dim=1).numpy()
        return score(ctx.metric, y_valid, proba.argmax(axis=1), proba)
    return score(ctx.metric, y_valid, out[:, 0].numpy() * y_std + y_mean)
