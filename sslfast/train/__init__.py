"""`sslfast pretrain` and `sslfast eval`: data, method, optimizer and schedule, checkpoints, resume, NaN stop,
metrics and pictures, kNN evaluation; multi-GPU through torchrun (DDP, or FSDP2 with `strategy="fsdp"`).

Modules: `config` (the flags and their checks), `step` (model, optimizer, one training step), `loop` (epochs,
checkpoints, resume), `checkpoint` (the files), `data` (the run's images), `evaluation` (kNN, linear probe,
fine-tune), `fsdp` (sharding, the EMA on shards, whole-state gathering).

    from sslfast.train import PretrainConfig, pretrain
    result = pretrain(PretrainConfig(method="byol", epochs=10))      # -> dict written to <out>/metrics.json

Run directory `out` (one process at a time: an exclusive lock on `out/.lock`; a new run refuses an `out` that
holds one unless `overwrite=True`):
  checkpoint.pt   written after every epoch through a temporary unique to the writer + `os.replace` (atomic):
                  method state (student, EMA teacher, queue, DINO center), optimizer, scheduler, every RNG state,
                  the epoch and step reached (the loader position: checkpoints sit at epoch boundaries and each
                  epoch's order and augmentations derive from (seed, epoch, rank)), the loss history and the
                  config. Only tensors and plain data: it loads with `torch.load(weights_only=True)`.
  checkpoint.prev.pt  the checkpoint before (resume falls back to it when checkpoint.pt is unreadable).
  metrics.json    config, per-epoch loss / lr / images/s / seconds, skipped undecodable images, kNN accuracies
                  (pretrained vs random init).
  loss_curve.png  per-step loss.   reconstructions.png (MAE): images | masked | reconstructed.

`resume=True` restores all of it and continues with the checkpoint's config, so a run stopped after any epoch
and resumed ends with the weights of an uninterrupted run (on the same device and thread count); only the flags
of `config.RESUMABLE` may change on resume. A non-finite loss, or non-finite parameters / buffers / optimizer
state at an epoch's end, stops the run with `NonFiniteLossError` before anything is written, leaving the last
good checkpoint. Ctrl-C raises `RunInterrupted`, naming the checkpoint kept and the command that resumes.
"""

from .checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state
from .config import CHECKPOINT, DEFAULT_DATA, ConfigError, NonFiniteLossError, PretrainConfig, RunInterrupted, resolve
from .data import LabeledImages, data_sources, denormalize, labeled_sets, preset_for
from .evaluation import evaluate, extract_features, fine_tune, knn_accuracy, knn_compare, linear_probe
from .loop import pretrain
from .step import Run, build_model, build_optimizer, init_distributed, lr_factor, setup, train_step

__all__ = [
    "CHECKPOINT",
    "ConfigError",
    "DEFAULT_DATA",
    "LabeledImages",
    "NonFiniteLossError",
    "PretrainConfig",
    "Run",
    "RunInterrupted",
    "build_model",
    "build_optimizer",
    "data_sources",
    "denormalize",
    "evaluate",
    "extract_features",
    "fine_tune",
    "init_distributed",
    "knn_accuracy",
    "knn_compare",
    "labeled_sets",
    "linear_probe",
    "load_checkpoint",
    "lr_factor",
    "preset_for",
    "pretrain",
    "resolve",
    "rng_state",
    "save_atomic",
    "set_rng_state",
    "setup",
    "train_step",
]
