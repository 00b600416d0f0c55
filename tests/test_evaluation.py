"""`sslfast eval`'s pieces: labeled batches that skip corrupt files without shifting a label, the fine-tune recipe
against the linear probe, and the checks of `evaluate`'s arguments."""

import copy
import re

import numpy as np
import pytest
import torch

from sslfast.data import datasets as D
from sslfast.train import ConfigError, PretrainConfig, evaluate, extract_features, fine_tune, linear_probe
from sslfast.train.data import LabeledImages, denormalize, labeled_sets
from sslfast.train.step import build_model

COLOURS = ((230, 20, 20), (20, 230, 20), (20, 20, 230))  # class k is a solid image of colour k


def _write(path, colour, size, fmt):
    from PIL import Image

    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(path, format=fmt)


def _colour_folder(root, seed, per_class=(6, 5, 7)):
    """Class folders of solid-colour images (odd sizes, JPEG and PNG) with a corrupt .jpg (valid magic and end
    marker, garbage inside: only the decoder notices) and a corrupt .png (truncated) among them."""
    rng = np.random.default_rng(seed)
    for k, n in enumerate(per_class):
        d = root / f"class_{k}"
        d.mkdir(parents=True)
        for i in range(n):
            fmt = "PNG" if i % 2 else "JPEG"
            size = tuple(int(v) for v in rng.integers(9, 23, 2))
            _write(d / f"img_{i:02d}.{'png' if fmt == 'PNG' else 'jpg'}", COLOURS[k], size, fmt)
    (root / "class_1" / "img_00b.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(300) + b"\xff\xd9")
    png = (root / "class_2" / "img_03.png").read_bytes()
    (root / "class_2" / "img_00b.png").write_bytes(png[: len(png) // 2])
    return sum(per_class)


def _colour_class(x, preset):
    """The class whose colour an image of the batch shows (the channel that dominates it)."""
    return denormalize(x, preset).mean(dim=(2, 3)).argmax(1)


def test_corrupt_images_never_shift_labels(tmp_path, seed):
    good = _colour_folder(tmp_path, seed)
    lines = []
    images = LabeledImages(
        D.find_images(tmp_path), image_size=7, device="cpu", batch_size=5, workers=2, log=lines.append
    )
    assert len(images) == good + 2
    for shuffle, drop_last, epoch in ((False, False, 0), (True, False, seed % 97), (True, True, 3), (False, True, 1)):
        delivered = 0
        for x, y in images.batches(shuffle=shuffle, epoch=epoch, drop_last=drop_last):
            assert x.shape[0] == y.shape[0] and x.shape[1:] == (3, 7, 7)
            assert torch.equal(_colour_class(x, images.preset), y), (shuffle, drop_last, epoch, seed)
            delivered += len(y)
        # every good image once (drop_last: the last partial batch of positions is dropped, bad rows removed)
        assert delivered == good if not drop_last else good - 5 <= delivered <= good
    assert images.skipped == 2 and sorted(p.rsplit("/", 2)[-2] for p, _ in images.bad_files) == ["class_1", "class_2"]
    # each bad file reported once: in one line, or in two when the workers had decoded only one of them when the
    # first batch that lost a row came out (a race; it failed CI once)
    counts = [int(re.match(r"skipped (\d+) unreadable image\(s\)", line).group(1)) for line in lines]
    assert sum(counts) == 2 and "(2 in all)" in lines[-1], lines
    feats, labels = extract_features(torch.nn.Flatten(), images)
    assert feats.shape[0] == labels.shape[0] == good
    assert torch.equal(labels.bincount(), torch.tensor([6, 5, 7]))


def _pretrained(tmp_path):
    from sslfast.train import pretrain

    cfg = PretrainConfig(epochs=1, image_size=8, out=str(tmp_path), knn=False, progress=False)
    pretrain(cfg)
    state = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)
    cfg = PretrainConfig(**state["config"])
    method = build_model(cfg)
    method.load_state_dict(state["method"])
    return cfg, method.eval_backbone()


def test_fine_tune_not_below_linear_probe(tmp_path):
    cfg, backbone = _pretrained(tmp_path)
    train, test = labeled_sets(cfg, "cpu", max_train=300, max_test=200)  # the old recipe: 10 steps, ~40 %
    linear = linear_probe(*extract_features(backbone, train), *extract_features(backbone, test))
    tuned = fine_tune(copy.deepcopy(backbone), train, test, "cpu")
    assert tuned >= linear - 0.05, f"fine-tune {tuned:.3f} vs linear probe {linear:.3f}"


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        (dict(epochs=0), "--epochs must be a positive integer, got 0"),
        (dict(epochs=-1), "--epochs must be a positive integer, got -1"),
        (dict(epochs=2.5), "--epochs must be a positive integer"),
        (dict(epochs=True), "--epochs must be a positive integer"),
        (dict(protocols=("knn", "lineer")), "--protocol must be one or more of knn, linear, finetune, got 'lineer'"),
        (dict(protocols=()), "--protocol must be one or more of knn, linear, finetune, got none"),
        (dict(protocols=None), "--protocol must be one or more"),
    ],
)
def test_evaluate_bad_arguments(kwargs, flag, tmp_path):
    # checked before the checkpoint is read: the missing file would be the error otherwise
    with pytest.raises(ConfigError) as exc:
        evaluate(str(tmp_path / "missing.pt"), **kwargs)
    assert flag in str(exc.value) and "\n" not in str(exc.value)
