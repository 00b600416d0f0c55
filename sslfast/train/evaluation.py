"""Evaluation of a pretrained backbone: kNN, linear probe and fine-tune (`sslfast eval`), and the kNN comparison
against random initialization at the end of `sslfast pretrain`."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from typing import Callable

import torch
from torch import nn

from ..methods import Method
from .checkpoint import load_checkpoint, saved_config
from .config import CHECKPOINT, ConfigError, PretrainConfig
from .data import LabeledImages, labeled_sets
from .step import build_model, lr_factor


@torch.no_grad()
def extract_features(backbone: nn.Module, images: "LabeledImages") -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D] fp32 on the CPU, labels [N]) of the backbone in eval mode."""
    was = backbone.training
    backbone.eval()
    feats, labels = [], []
    for x, y in images.batches():
        feats.append(backbone(x).float().cpu())
        labels.append(y.cpu())
    backbone.train(was)
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Weighted kNN on cosine similarity (Wu et al. 2018, as DINO's eval_knn): each of the k nearest training
    features votes for its class with weight exp(sim/T)."""
    train_f, test_f = nn.functional.normalize(train_f, dim=1), nn.functional.normalize(test_f, dim=1)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_f))
    correct = 0
    for i in range(0, len(test_f), 256):
        sim = test_f[i : i + 256] @ train_f.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top), num_classes).scatter_add_(1, train_y[idx], (top / temperature).exp())
        correct += (votes.argmax(1) == test_y[i : i + 256]).sum().item()
    return correct / len(test_f)


def linear_probe(
    train_f, train_y, test_f, test_y, epochs: int = 100, lr: float = 1e-2, batch: int = 1024, seed: int = 0
) -> float:
    """Logistic regression on frozen features (standardized by the training set's statistics, as the
    affine-free BatchNorm of MAE's linear probe), AdamW with a cosine lr; returns test accuracy."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    torch.manual_seed(seed)
    head = nn.Linear(train_f.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(train_f) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, 0))
    for _ in range(epochs):
        perm = torch.randperm(len(train_f), generator=g)
        for i in range(0, len(perm), batch):
            idx = perm[i : i + batch]
            loss = nn.functional.cross_entropy(head(train_f[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (head(test_f).argmax(1) == test_y).float().mean().item()


FINETUNE_EPOCHS = 10


def _decay_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups of a module: weights decayed, biases and norm parameters not (MAE's fine-tune)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        g
        for g in (
            dict(params=[p for p in params if p.ndim > 1], lr=lr, weight_decay=weight_decay),
            dict(params=[p for p in params if p.ndim <= 1], lr=lr, weight_decay=0.0),
        )
        if g["params"]
    ]


def _shuffled_batches(train: "LabeledImages", cached, batch_size: int, epoch: int):
    """One epoch of shuffled batches (the last partial one dropped when there is more than one): from the
    in-memory `cached` (images, labels) when the set fits, else streamed by the loader."""
    if cached is None:
        yield from train.batches(shuffle=True, epoch=epoch, drop_last=len(train) > batch_size, batch_size=batch_size)
        return
    x, y = cached
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch)).to(y.device)
    end = len(perm) - len(perm) % batch_size if len(perm) > batch_size else len(perm)
    for i in range(0, end, batch_size):
        idx = perm[i : i + batch_size]
        yield x[idx], y[idx]


def fine_tune(
    backbone: nn.Module,
    train: "LabeledImages",
    test: "LabeledImages",
    device,
    epochs: int = FINETUNE_EPOCHS,
    lr: float = 3e-3,
    batch_size: int = 64,
    backbone_lr_scale: float = 0.1,
    weight_decay: float = 0.05,
    seed: int = 0,
) -> float:
    """Backbone + linear head trained end to end; returns test accuracy. `backbone` is trained in place (pass a
    copy).

    Recipe (MAE's fine-tune, sized for a few thousand images): AdamW, weight decay on weights only, linear
    warm-up over the first tenth then cosine to 0, the backbone at `backbone_lr_scale` × the head's lr, its
    BatchNorms in train mode (SimCLR's fine-tune). The head is an affine-free BatchNorm of the features (as the
    linear probe's standardization: the lr does not depend on the backbone's feature scale) and a zero-initialized
    linear layer (MAE's head init); no augmentation. Batches of `batch_size` (64: ~22 steps an epoch on 1400
    images; a batch of 256 gave 5, and 10 epochs of them left the head underfitted far below the linear probe).
    """
    torch.manual_seed(seed)
    classes = max(train.num_classes, test.num_classes)
    head = nn.Sequential(
        nn.BatchNorm1d(backbone.num_features, affine=False), nn.Linear(backbone.num_features, classes)
    ).to(device)
    nn.init.zeros_(head[1].weight)
    nn.init.zeros_(head[1].bias)
    opt = torch.optim.AdamW(
        _decay_groups(backbone, lr * backbone_lr_scale, weight_decay) + _decay_groups(head, lr, weight_decay), lr=lr
    )
    cached = train.tensors()
    n = len(train) if cached is None else len(cached[1])
    batch_size = min(batch_size, n)
    steps = epochs * max(1, n // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, steps // 10))
    model = nn.Sequential(backbone, head).train()
    for epoch in range(epochs):
        for x, y in _shuffled_batches(train, cached, batch_size, epoch=seed * 1000 + epoch):
            if len(y) < 2:  # a batch emptied by skipped files: no batch statistics
                continue
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    feats, labels = extract_features(backbone, test)
    head.eval()
    with torch.no_grad():
        return (head(feats.to(device)).argmax(1).cpu() == labels).float().mean().item()


def knn_compare(cfg: PretrainConfig, method: Method, device, say=print) -> dict:
    """kNN accuracy of the pretrained backbone and of the same backbone at its random initialization
    (at most 20000 training and 5000 test images)."""
    train, test = labeled_sets(cfg, device, max_train=20000, max_test=5000, log=say)
    out = {}
    random_init = build_model(cfg).to(device).eval_backbone()
    for name, net in (("pretrained", method.eval_backbone()), ("random_init", random_init)):
        (ftr, ytr), (fte, yte) = extract_features(net, train), extract_features(net, test)
        out[name] = knn_accuracy(ftr, ytr, fte, yte)
    out["train_images"], out["test_images"] = len(train), len(test)
    say(
        f"kNN accuracy (k=20, {len(test)} held-out images): pretrained {100 * out['pretrained']:.1f}%  vs  "
        f"random init {100 * out['random_init']:.1f}%"
    )
    return out


PROTOCOLS = ("knn", "linear", "finetune")


def _check_eval_args(protocols, epochs) -> tuple[str, ...]:
    """The protocols as a tuple without repeats; ConfigError naming the flag for a bad one or a bad epochs."""
    if isinstance(protocols, str):
        protocols = (protocols,)
    try:
        protocols = tuple(dict.fromkeys(protocols))
    except TypeError:
        raise ConfigError(f"--protocol must be one or more of {', '.join(PROTOCOLS)}, got {protocols!r}") from None
    bad = [p for p in protocols if p not in PROTOCOLS]
    if not protocols or bad:
        got = repr(bad[0]) if bad else "none"
        raise ConfigError(f"--protocol must be one or more of {', '.join(PROTOCOLS)}, got {got}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ConfigError(f"--epochs must be a positive integer, got {epochs!r}")
    return protocols


def evaluate(
    checkpoint: str,
    protocols=PROTOCOLS,
    *,
    data: str | None = None,
    epochs: int | None = None,
    device: str | None = None,
    random_init: bool = False,
    out: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """`sslfast eval`: rebuilds the method of a `sslfast pretrain` checkpoint and reports the accuracy of its
    evaluated backbone (and optionally of its random initialization) under each protocol. `epochs`: of the
    linear probe and of the fine-tune (default: 100 and `FINETUNE_EPOCHS`). A checkpoint of a `--strategy fsdp`
    run holds the whole model and loads the same way.

    Args:
        checkpoint: a checkpoint.pt, or its run directory.
        protocols: some of "knn", "linear", "finetune".
        data: labeled data (default: the pretraining data).
        epochs: of the linear probe / fine-tune.
        device: default cuda when available.
        random_init: also evaluate the randomly initialized backbone.
        out: write the accuracies to this JSON file.
        log: where the result lines go.

    Returns:
        {"pretrained": {protocol: accuracy}, ["random_init": {...}]}.

    Raises:
        ConfigError: a bad argument, an unreadable checkpoint or one of another model.
    """
    protocols = _check_eval_args(protocols, epochs)
    path = os.path.join(checkpoint, CHECKPOINT) if os.path.isdir(checkpoint) else checkpoint
    state = load_checkpoint(path, what="--checkpoint")
    cfg = saved_config(state)
    if data is not None:
        cfg.data = data
        if not cfg.embedded and not os.path.isdir(data):
            raise ConfigError(f"--data: {data!r} is not a folder of images (or 'digits')")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    method = build_model(cfg)
    try:
        method.load_state_dict(state["method"])
    except (RuntimeError, KeyError, ValueError) as err:  # a checkpoint of another model or version
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"--checkpoint: {path} does not match the {cfg.method} / {cfg.backbone} model it names ({first[:200]})"
        ) from None
    nets = {"pretrained": method.eval_backbone()}
    if random_init:
        nets["random_init"] = build_model(cfg).eval_backbone()
    train, test = labeled_sets(cfg, dev, log=log)
    log(
        f"sslfast eval: {cfg.method} / {cfg.backbone} from {path} (epoch {state['epoch']}/{cfg.epochs}) on "
        f"{cfg.data}: {len(train)} train, {len(test)} test images"
    )
    results: dict = {}
    for name, net in nets.items():
        net = net.to(dev)
        res = results[name] = {}
        if "knn" in protocols or "linear" in protocols:
            (ftr, ytr), (fte, yte) = extract_features(net, train), extract_features(net, test)
            if "knn" in protocols:
                res["knn"] = knn_accuracy(ftr, ytr, fte, yte)
            if "linear" in protocols:
                res["linear"] = linear_probe(ftr, ytr, fte, yte, epochs=epochs or 100)
        if "finetune" in protocols:
            res["finetune"] = fine_tune(copy.deepcopy(net), train, test, dev, epochs=epochs or FINETUNE_EPOCHS)
        log(f"{name:>11}: " + "  ".join(f"{k} {100 * v:.1f}%" for k, v in res.items()))
    if train.skipped or test.skipped:
        log(
            f"skipped unreadable images: {train.skipped} of {len(train)} train, {test.skipped} of {len(test)} "
            "test (dropped with their labels)"
        )
    if out:
        with open(out, "w") as f:
            json.dump(
                {
                    "checkpoint": path,
                    "config": dataclasses.asdict(cfg),
                    "accuracy": results,
                    "skipped": {"train": train.skipped, "test": test.skipped},
                },
                f,
                indent=1,
            )
    return results
