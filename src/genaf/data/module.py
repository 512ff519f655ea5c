"""DataModule, ImageSet and the dataset registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import limits
from ..errors import ConfigError, DataError, unknown
from ..utils import generator, share

# name -> raw loader(root, download) -> (train_x, train_y, test_x, test_y, classes),
# images uint8 (N, C, H, W) with C in {1, 3}; or a list of per-image tensors when sizes differ.
RawLoader = Callable[..., tuple]


def _fashion(root=None, download=False):
    from .fashion_mnist import load_fashion_mnist

    return load_fashion_mnist(root, download)


def _tv(name: str) -> RawLoader:
    def load(root=None, download=False):
        from .torchvision_sets import load_torchvision_raw

        return load_torchvision_raw(name, root, download)

    return load


def _demo(root=None, download=False):
    from .demo_subset import load_demo_subset

    return load_demo_subset(root, download)


def _digits(root=None, download=False):
    from .rendered_digits import load_rendered_digits

    return load_rendered_digits(root, download)


DATASETS: dict[str, RawLoader] = {
    "fashion-mnist": _fashion,
    "fashion-mnist-demo": _demo,
    "rendered-digits": _digits,
    "cifar10": _tv("cifar10"),
    "stl10": _tv("stl10"),
    "gtsrb": _tv("gtsrb"),
    "svhn": _tv("svhn"),
}


@dataclass
class ImageSet:
    """Images as uint8 (N, 3, H, W), integer labels, their index in the source split, the
    split's name (``train``, ``val``, ``test`` or ``surrogate``: the reserve) and the dataset."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    split: str = "train"
    dataset: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"ImageSet wants uint8 (N, C, H, W) images, got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if not (len(self.images) == len(self.labels) == len(self.indices)):
            raise DataError("ImageSet images, labels and indices differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None) -> ImageSet:
        """The first ``n`` items (they are already in a seeded random order)."""
        if n is None or n >= len(self):
            return self
        return ImageSet(self.images[:n], self.labels[:n], self.indices[:n], self.split, self.dataset)

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(
            self.images.to(device), self.labels.to(device), self.indices.to(device), self.split, self.dataset
        )

    def float_images(self) -> torch.Tensor:
        return self.images.float().div_(255.0)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        gen: torch.Generator | None = None,
        device: torch.device | str | None = None,
        drop_last: bool = False,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        part: tuple[int, int] | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (x float [0,1], y, dataset indices) batches, optionally shuffled by ``gen``.

        ``part = (rank, world)``: of every batch, only the rows that process ``rank`` of ``world``
        holds (``genaf.utils.share``); the batches themselves (order, size) are the same as
        without it, so the processes together see exactly the batches of one process."""
        if batch_size <= 0:
            raise ConfigError(f"batch size must be positive, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            if part is not None:
                lo, hi = share(len(idx), *part)
                idx = idx[lo:hi]
            x = self.images[idx.to(self.images.device)]
            if device is not None:
                x = x.to(device, non_blocking=True)
            x = x.float().div_(255.0)
            if transform is not None:
                x = transform(x)
            y = self.labels[idx.to(self.labels.device)]
            yield x, (y.to(device) if device is not None else y), self.indices[idx.to(self.indices.device)]


@dataclass
class DataModule:
    """Train / val / test splits of one downstream task, plus the disjoint surrogate pool."""

    name: str
    classes: list[str]
    train: ImageSet
    val: ImageSet
    test: ImageSet
    surrogate_pool: ImageSet
    image_size: int
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def surrogate(self, n: int | None = None) -> ImageSet:
        """The first ``n`` images of the surrogate reserve: training images that no train or
        validation split of this dataset uses, for any seed (the test split is separate).
        Exactly ``n`` images, or a DataError that says how many there are and what to do."""
        have = len(self.surrogate_pool)
        if n is None:
            n = have
        if int(n) <= 0:
            raise ConfigError(f"the number of surrogate images must be positive, got {n}")
        if have == 0 or int(n) > have:
            raise DataError(
                f"{n} surrogate images were asked for but the surrogate reserve of {self.name} holds {have} "
                f"(training images no downstream split uses); ask for at most {have} (--n-surrogate), enlarge the "
                "reserve (--surrogate-reserve N, then give genaf finetune the same value), or draw the surrogates "
                "from another dataset"
            )
        return self.surrogate_pool.subset(int(n))


def _select(x, idx: torch.Tensor):
    """Raw images ``x`` (a uint8 tensor or a list of per-image tensors) at indices ``idx``."""
    if isinstance(x, list):
        return [x[int(i)] for i in idx]
    return x[idx]


def _decode(t) -> torch.Tensor:
    """A raw image: a tensor, or a not-yet-decoded file (anything with ``load()``, e.g. an image
    folder's entries, decoded only when a split uses it)."""
    return t.load() if hasattr(t, "load") else t


# Resize in chunks of at most this many float elements (256 MB), whatever the image size.
_RESIZE_CHUNK_ELEMENTS = 1 << 26


def check_image_size(image_size: int | None) -> None:
    """A positive ``--image-size`` within the limit ``max_image_size``."""
    if image_size is None:
        return
    if int(image_size) <= 0:
        raise ConfigError(f"image size must be a positive number of pixels, got {image_size}")
    lim = limits.get("max_image_size")
    if int(image_size) > lim:
        raise limits.LimitError(
            f"image size {int(image_size)} is more than the limit max_image_size = {lim} pixels "
            f"(every image becomes {int(image_size)}x{int(image_size)}); use a smaller --image-size, or raise the "
            "limit with --limit max_image_size=N or GENAF_LIMIT_MAX_IMAGE_SIZE=N"
        )


def _to_uint8_nchw(x, image_size: int | None, what: str) -> torch.Tensor:
    """Stack/resize raw images to uint8 (N, 3, S, S); a list is decoded and resized one image at
    a time, so only one full-size image is held at once."""
    if isinstance(x, list):
        if not x:
            return torch.zeros((0, 3, image_size or 1, image_size or 1), dtype=torch.uint8)
        first = _decode(x[0])
        size = (image_size, image_size) if image_size else tuple(first.shape[-2:])
        out = torch.empty((len(x), 3, *size), dtype=torch.uint8)
        for i, t in enumerate(x):
            t = first if i == 0 else _decode(t)
            if t.dtype != torch.uint8 or t.dim() != 3 or t.shape[0] not in (1, 3):
                got = f"{t.dtype} {tuple(t.shape)}"
                raise DataError(f"{what}: raw images must be uint8 (C, H, W) with C 1 or 3, got {got}")
            if image_size:
                t = _resize(t.unsqueeze(0), image_size)[0]
            elif tuple(t.shape[-2:]) != size:
                raise DataError(
                    f"{what} has images of several sizes ({size[0]}x{size[1]}, {t.shape[-2]}x{t.shape[-1]}, ...); "
                    "pass an image size"
                )
            out[i] = t
        return out
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dtype != torch.uint8:
        raise DataError(f"{what}: raw images must be uint8, got {x.dtype}")
    if x.shape[1] not in (1, 3):
        raise DataError(f"{what}: images have {x.shape[1]} channels; expected 1 (grayscale) or 3 (RGB)")
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size) and len(x):
        per = x.shape[1] * max(image_size * image_size, x.shape[-2] * x.shape[-1])
        step = max(1, _RESIZE_CHUNK_ELEMENTS // per)
        x = torch.cat([_resize(x[i : i + step], image_size) for i in range(0, len(x), step)])
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)


class _DeferredSet(ImageSet):
    """An ImageSet whose images are decoded and resized only when read, and for ``subset(n)``
    only the first ``n``: the surrogate reserve, which most runs never touch."""

    def __init__(self, raw, labels, indices, split, dataset, make) -> None:
        self._raw, self._make, self._images = raw, make, None
        self.labels, self.indices, self.split, self.dataset = labels, indices, split, dataset

    @property
    def images(self) -> torch.Tensor:  # type: ignore[override]
        if self._images is None:
            self._images = self._make(self._raw)
            self._raw = None
        return self._images

    def subset(self, n: int | None) -> ImageSet:
        if n is None or n >= len(self) or self._images is not None:
            return ImageSet(self.images, self.labels, self.indices, self.split, self.dataset).subset(n)
        return ImageSet(self._make(self._raw[:n]), self.labels[:n], self.indices[:n], self.split, self.dataset)


# The surrogate reserve: training images that no downstream split of the dataset ever uses,
# whatever the seed, n_train or n_val. It is drawn by a permutation that depends only on the
# number of training images (not on the seed), so `genaf attack` and `genaf finetune` agree on
# it without sharing a seed; a surrogate set of n images is always the first n of the reserve's
# order, so it is the same for any reserve size that holds it.
RESERVE_CAP = 5000
RESERVE_FRACTION = 0.1
# Fewer validation images than this makes every selection decision noisy: a warning says so.
MIN_VAL_IMAGES = 100


def default_reserve(n: int) -> int:
    """The default surrogate reserve of a training split of ``n`` images: 10 %, at most 5,000."""
    return min(RESERVE_CAP, int(RESERVE_FRACTION * n))


def reserve_order(n: int) -> torch.Tensor:
    """The seed-independent order of the ``n`` training indices; the reserve is its prefix."""
    return torch.randperm(n, generator=generator(0, f"surrogate-reserve:{n}"))


def index_digest(idx: torch.Tensor) -> str:
    """A short sha256 of a list of dataset indices (recorded so that splits can be compared)."""
    import hashlib

    return hashlib.sha256(idx.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


def load_dataset(
    spec: str,
    root: str | None = None,
    image_size: int | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    val_fraction: float = 0.1,
    n_test: int | None = None,
    seed: int = 0,
    download: bool = False,
    surrogate_reserve: int | None = None,
) -> DataModule:
    """Load a downstream dataset with a seeded validation split carved from its training data.

    The training images are split three ways:

    - the *surrogate reserve* (``surrogate_reserve`` images, default 10 %, at most 5,000), drawn
      independently of ``seed``: the attacker's images, in no downstream split of any seed;
    - the validation split (``n_val``, default ``val_fraction`` of the rest) and the training
      split (``n_train``, default all that remains), drawn from the rest with ``seed``.

    Args:
        spec: dataset name or ``imagefolder:PATH``.
        root: where the dataset's files live (``--data-root``); a root that does not hold them
            is an error, never a fallback to another place.
        image_size: resize every image to this square side (None keeps the native size); only
            the images of the splits are resized.
        n_test: a seeded subset of the test split (None: all of it).
        seed: the split seed.
        surrogate_reserve: the reserve size (None: the default above; 0: none).
    """
    if not isinstance(spec, str) or not spec:
        raise unknown("dataset", str(spec), list(DATASETS) + ["imagefolder:PATH"])
    check_image_size(image_size)
    if spec.startswith("imagefolder:"):
        from .imagefolder import load_imagefolder_raw

        raw = load_imagefolder_raw(spec.split(":", 1)[1], image_size)
        name = spec
    elif spec in DATASETS:
        raw = DATASETS[spec](root=root, download=download)
        name = spec
    else:
        raise unknown("dataset", spec, list(DATASETS) + ["imagefolder:PATH"])
    train_x, train_y, test_x, test_y, classes = raw[:5]
    extra = raw[5] if len(raw) > 5 else None
    extra = extra if isinstance(extra, dict) else {"source": extra}
    source, fixed = extra.get("source"), extra.get("fixed_reserve")
    for v, what in ((n_train, "n_train"), (n_val, "n_val"), (n_test, "n_test")):
        if v is not None and int(v) <= 0:
            raise ConfigError(f"{what} must be positive, got {v}")
    if surrogate_reserve is not None and int(surrogate_reserve) < 0:
        raise ConfigError(f"surrogate_reserve must be >= 0, got {surrogate_reserve}")
    train_y = torch.as_tensor(train_y, dtype=torch.long)
    test_y = torch.as_tensor(test_y, dtype=torch.long)
    nc = len(classes)
    for y, what in ((train_y, "train"), (test_y, "test")):
        if len(y) == 0:
            raise DataError(f"{name} {what} split is empty")
        if int(y.min()) < 0 or int(y.max()) >= nc:
            raise DataError(f"{name} {what} labels span [{int(y.min())}, {int(y.max())}] but there are {nc} classes")
    n = len(train_y)
    if fixed is not None:  # a dataset whose reserve is its first images (the demo subset)
        nr = int(fixed) if surrogate_reserve is None else int(surrogate_reserve)
        if nr != int(fixed):
            raise ConfigError(f"{name} has a fixed surrogate reserve of {fixed} images; leave surrogate_reserve unset")
        order = torch.arange(n)
    else:
        nr = default_reserve(n) if surrogate_reserve is None else int(surrogate_reserve)
        order = reserve_order(n)
    if nr >= n:
        raise ConfigError(f"{name} has {n} training images; a surrogate reserve of {nr} leaves none to train on")
    reserve_idx, rest = order[:nr], order[nr:]
    m = len(rest)
    nv = int(n_val) if n_val is not None else max(1, int(round(val_fraction * m)))
    nt = int(n_train) if n_train is not None else m - nv
    if nv + nt > m:
        raise ConfigError(
            f"{name} has {n} training images, {nr} of them in the surrogate reserve; n_train={nt} + n_val={nv} "
            f"is more than the {m} left (lower them, or lower the reserve with surrogate_reserve)"
        )
    perm = rest[torch.randperm(m, generator=generator(seed, f"split:{name}"))]
    val_idx, train_idx = perm[:nv], perm[nv : nv + nt]
    test_perm = torch.randperm(len(test_y), generator=generator(seed, f"test:{name}"))
    if n_test is not None and n_test < len(test_y):
        test_idx = test_perm[: int(n_test)].sort().values
    else:
        test_idx = torch.arange(len(test_y))

    def mk(x, y, idx, split):
        images = _to_uint8_nchw(_select(x, idx), image_size, f"{name} {split} split")
        return ImageSet(images, y[idx], idx.clone(), split, name)

    # only the images a split uses are decoded and resized; the reserve when it is first read
    train, val = mk(train_x, train_y, train_idx, "train"), mk(train_x, train_y, val_idx, "val")
    test = mk(test_x, test_y, test_idx, "test")
    pool = _DeferredSet(
        _select(train_x, reserve_idx),
        train_y[reserve_idx],
        reserve_idx.clone(),
        "surrogate",
        name,
        lambda raw: _to_uint8_nchw(raw, image_size, f"{name} surrogate reserve"),
    )
    size = int(train.images.shape[-1])
    return DataModule(
        name=name,
        classes=list(classes),
        train=train,
        val=val,
        test=test,
        surrogate_pool=pool,
        image_size=size,
        info={
            "spec": spec,
            "seed": seed,
            "source": source,
            "n_train": nt,
            "n_val": nv,
            "n_test": len(test_idx),
            "image_size": size,
            "surrogate_reserve": nr,
            "train_indices_sha256": index_digest(train_idx),
            "val_indices_sha256": index_digest(val_idx),
            "test_indices_sha256": index_digest(test_idx),
        },
    )


def small_split_warning(what: str, n: int, minimum: int = MIN_VAL_IMAGES, flag: str = "--n-val") -> str | None:
    """A warning when a split that decisions are made on is too small to decide anything."""
    if n >= minimum:
        return None
    return (
        f"WARNING: the {what} holds only {n} images; every choice made on it is noisy "
        f"(one image is {100 / max(n, 1):.1f} points). Use at least {minimum} ({flag})."
    )
