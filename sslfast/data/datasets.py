"""Image sources for `SSLLoader`: JPEG/PNG folders (ImageFolder layout or flat), file lists, in-memory arrays,
and the project's embedded default data set (scikit-learn's bundled digits, upscaled: no download).

A source is an indexable collection of samples. `FileSource` items are paths (read as encoded bytes and
decoded by the backend); `ArraySource` items are decoded uint8 [H, W, 3] images. `resolve_source` turns
whatever the user passed into one of the two.

Bad files: scanning never opens images (a folder of a million files must list fast). Files with an image
extension are checked when read: `looks_like_image` tests the magic bytes and, for JPEG and PNG, the end
marker (which a truncated download lacks). Whatever still fails to decode is skipped and counted by the
loader.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp")

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"P5", "pnm"),
    (b"P6", "pnm"),
    (b"P4", "pnm"),
    (b"P2", "pnm"),
    (b"P3", "pnm"),
)


def image_format(data: bytes) -> str | None:
    """The format of encoded bytes `data` (12 leading bytes suffice) from their magic bytes.

    Returns:
        'jpeg', 'png', 'bmp', 'tiff', 'pnm' or 'webp'; None for anything else.
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def looks_like_image(data: bytes) -> bool:
    """Cheap validity check before bytes reach a decoder: known magic bytes, and for JPEG the EOI marker
    (FF D9) within the last bytes (cameras pad after it), for PNG the IEND chunk.

    Returns:
        False for unknown or truncated `data` (a whole encoded file); a decoder may still reject what passes.
    """
    fmt = image_format(data)
    if fmt is None:
        return False
    if fmt == "jpeg":
        return len(data) > 4 and b"\xff\xd9" in data[-64:]
    if fmt == "png":
        return b"IEND" in data[-32:]
    return True


def is_jpeg(data: bytes) -> bool:
    """Whether `data` starts with the JPEG magic bytes (FF D8 FF)."""
    return data[:3] == b"\xff\xd8\xff"


class FileSource:
    """Image files, read as encoded bytes.

    Args:
        paths: the files (any path-like; kept as str).
        labels: an integer label per file (default: all 0).
        classes: class names, indexed by label.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | None = None, classes: Sequence[str] = ()):
        self.paths = [str(p) for p in paths]
        self.labels = list(labels) if labels is not None else [0] * len(self.paths)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> bytes:
        """The encoded bytes of file `i` (OSError when it cannot be read)."""
        with open(self.paths[i], "rb") as f:
            return f.read()

    def __repr__(self) -> str:
        return f"FileSource({len(self)} files, {len(self.classes)} classes)"


class ArraySource:
    """Decoded uint8 images in memory (grayscale repeated to 3 channels).

    Args:
        images: a uint8 [N, H, W, 3] or [N, H, W] array / tensor, or a list of [H, W, 3] / [H, W] arrays or
            tensors of any sizes.
        labels: an integer label per image (default: all 0).

    Raises:
        ValueError: an image of another dtype or shape, or a label count other than the image count.
    """

    def __init__(self, images, labels: Sequence[int] | None = None):
        import torch

        if isinstance(images, torch.Tensor):
            images = images.cpu().numpy()
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
                raise ValueError(
                    "images must be a uint8 [N, H, W, 3] or [N, H, W] array, got "
                    f"{images.dtype} of shape {images.shape}"
                )
            if images.ndim == 3:
                images = np.repeat(images[..., None], 3, axis=-1)
            self.batch = np.ascontiguousarray(images)
            self.images = None
        else:
            items = [np.asarray(im.cpu().numpy() if isinstance(im, torch.Tensor) else im) for im in images]
            for i, im in enumerate(items):
                if im.dtype != np.uint8 or im.ndim not in (2, 3) or (im.ndim == 3 and im.shape[-1] != 3):
                    raise ValueError(
                        f"images[{i}] must be a uint8 [H, W, 3] or [H, W] array, got {im.dtype} of shape {im.shape}"
                    )
            self.batch = None
            self.images = [
                np.ascontiguousarray(np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im) for im in items
            ]
        n = len(self)
        self.labels = list(labels) if labels is not None else [0] * n
        if len(self.labels) != n:
            raise ValueError(f"labels must have one entry per image ({n}), got {len(self.labels)}")

    def __len__(self) -> int:
        return len(self.batch) if self.batch is not None else len(self.images)

    def get(self, i: int) -> np.ndarray:
        """Image `i`, uint8 [H, W, 3] (a view, not a copy)."""
        return self.batch[i] if self.batch is not None else self.images[i]

    @property
    def uniform_size(self) -> bool:
        """Whether every image has one size (the images came as one array)."""
        return self.batch is not None

    def __repr__(self) -> str:
        shape = self.batch.shape[1:] if self.batch is not None else "mixed sizes"
        return f"ArraySource({len(self)} images, {shape})"


def _folder_key(path: str):
    """(st_dev, st_ino) of the folder `path` names (links followed), or None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _scan_images(folder: str) -> tuple[list[tuple[str, str]], list[str]]:
    """One folder: its image files as (path, identity) and its subfolders' paths, both sorted by name, links
    followed. A file's identity is its real path: the folder's real path plus the name for a plain file (no
    system call per file), `os.path.realpath` for a link. An unreadable folder gives nothing (as `os.walk`)."""
    try:
        real = os.path.realpath(folder)
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return [], []
    images, subfolders = [], []
    for e in entries:
        try:
            is_dir = e.is_dir()
        except OSError:
            is_dir = False
        if is_dir:
            subfolders.append(e.path)
        elif e.name.lower().endswith(IMG_EXTENSIONS):
            images.append((e.path, os.path.realpath(e.path) if e.is_symlink() else os.path.join(real, e.name)))
    return images, subfolders


def _walk_images(top: str, visited: set) -> list[tuple[str, str]]:
    """(path, identity) of the image files under `top` (see `_scan_images`), links followed, in the order of
    `sorted(os.walk(top))` (by folder path, then name). A folder whose (st_dev, st_ino) is in `visited` is not
    entered (and every folder entered is added), so a link back up the tree (`a/self -> ..`) or a second link
    to one folder neither loops nor lists its files again. Folders are entered depth first in sorted order, so
    which of two paths to one folder is kept does not depend on the file system's listing order."""
    found, stack = [], [top]
    while stack:
        folder = stack.pop()
        images, subfolders = _scan_images(folder)
        found.append((folder, images))
        fresh = []
        for sub in subfolders:
            key = _folder_key(sub)
            if key is not None and key not in visited:
                visited.add(key)
                fresh.append(sub)
        stack.extend(reversed(fresh))
    return [item for _, images in sorted(found, key=lambda f: f[0]) for item in images]


def find_images(root: str | os.PathLike) -> FileSource:
    """A folder in ImageFolder layout (root/class_x/*.jpg → label = sorted class index), or a flat folder of
    images (label 0). Files are sorted; only image extensions are listed (torchvision's ImageFolder rule).

    Symbolic links to files and folders are followed (inside the tree or out of it), but every real file is
    listed once (by its real path; the first path in sorted order wins, so a file linked from two classes is
    one sample, of the first class) and every real folder is entered once (by (st_dev, st_ino)), so a link
    cycle such as `a/self -> ..` neither loops nor multiplies the data set; the root and the class folders are
    never re-entered through a link inside a class.

    Args:
        root: the folder.

    Returns:
        A `FileSource` with labels and class names (none for a flat folder).

    Raises:
        FileNotFoundError: `root` does not exist.
        NotADirectoryError: `root` is not a folder.
        ValueError: no image file was found.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"source folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"source {str(root)!r} is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    visited = {_folder_key(str(root)), *(_folder_key(str(root / cls)) for cls in classes)}
    seen: set = set()
    paths, labels = [], []

    def add(images: list[tuple[str, str]], label: int) -> None:
        for path, identity in images:
            if identity not in seen:
                seen.add(identity)
                paths.append(path)
                labels.append(label)

    for label, cls in enumerate(classes):
        add(_walk_images(str(root / cls), visited), label)
    if not paths:  # a flat folder: the images at the top level, label 0
        classes = []
        add(_scan_images(str(root))[0], 0)
    if not paths:
        raise ValueError(
            f"no images found in {str(root)!r} (looked for {', '.join(IMG_EXTENSIONS)} files, in "
            "class subfolders or at the top level)"
        )
    return FileSource(paths, labels, classes)


def file_list(paths: Sequence[str | os.PathLike], labels: Sequence[int] | None = None) -> FileSource:
    """An explicit list of image files (any names; a missing file is an error here, a corrupt one a counted
    skip at read time).

    Args:
        paths: the files.
        labels: an integer label per file (default: all 0).

    Returns:
        A `FileSource`.

    Raises:
        ValueError: an empty list, or a label count other than the file count.
        FileNotFoundError: a listed file does not exist.
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("the file list is empty")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"file {missing[0]!r} in the file list does not exist{more}")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"labels must have one entry per file ({len(paths)}), got {len(labels)}")
    return FileSource(paths, labels)


def resolve_source(source):
    """The source `SSLLoader` reads, from what the user passed.

    Args:
        source: a folder (`find_images`); a .txt file listing one path per line (relative to the file's
            folder; blank lines and lines starting with '#' skipped); a list of paths (`file_list`); a uint8
            array or tensor [N, H, W, 3], or a list of uint8 arrays (`ArraySource`); a FileSource / ArraySource.

    Returns:
        A non-empty `FileSource` or `ArraySource`.

    Raises:
        TypeError: any other type.
        ValueError: an empty source (or the errors of `find_images`, `file_list`, `ArraySource`).
        FileNotFoundError: a missing folder or listed file.
    """
    import torch

    if isinstance(source, (FileSource, ArraySource)):
        if len(source) == 0:
            raise ValueError("source is empty")
        return source
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_file() and p.suffix.lower() == ".txt":
            lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
            return file_list([ln if os.path.isabs(ln) else str(p.parent / ln) for ln in lines])
        return find_images(p)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return ArraySource(source)
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("source is an empty list")
        if all(isinstance(s, (str, os.PathLike)) for s in source):
            return file_list(source)
        return ArraySource(source)
    raise TypeError(
        "source must be a folder, a .txt file list, a list of paths, a uint8 array [N, H, W, 3] or a "
        f"list of arrays, got {type(source).__name__}"
    )


# ------------------------------------------------------------------------------------- embedded default
def load_digits(image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits (1797 images, 8×8, 0..16, shipped inside the package: no
    download), as uint8 RGB [1797, image_size, image_size, 3] (bilinearly upscaled, gray → 3 channels) and
    int64 labels [1797]. The project's embedded default data set.

    Args:
        image_size: the side of the returned images (8 keeps the originals).

    Returns:
        (images uint8 [1797, image_size, image_size, 3], labels int64 [1797]).

    Raises:
        ImportError: scikit-learn is not installed.
    """
    import torch
    import torch.nn.functional as F

    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as err:  # pragma: no cover - scikit-learn is a test dependency
        raise ImportError("the embedded default data set needs scikit-learn (pip install scikit-learn)") from err
    d = _load()
    x = torch.from_numpy(d.images.astype(np.float32) * (255.0 / 16.0))[:, None]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    img = x.round().clamp(0, 255).to(torch.uint8)[:, 0, :, :, None].expand(-1, -1, -1, 3)
    return img.contiguous().numpy(), d.target.astype(np.int64)


def digits(image_size: int = 32) -> ArraySource:
    """The embedded default data set (`load_digits(image_size)`) as an `ArraySource` with its labels, ready for
    `SSLLoader`.

    Args:
        image_size: the side of the images.

    Returns:
        An `ArraySource` of the 1797 images and their labels.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    images, labels = load_digits(image_size)
    return ArraySource(images, labels.tolist())
