"""Datasets, view augmentations and loaders shared by train.py, eval_knn.py, eval_linear.py and bench.py."""
import os
import signal
import warnings

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

DATASETS = ("imagefolder", "cifar10", "cifar100", "stl10", "fake")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # ImageNet statistics, used for every dataset


def _to_normalised_tensor():
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]


def view_transform(framework: str, size: int, scale, blur_p: float, solarize_p: float) -> v2.Compose:
    """One augmented view (PIL image -> [3, size, size] normalised float tensor).

    MoCo-v2: colour jitter (0.4, 0.4, 0.4, 0.1); BYOL: (0.4, 0.4, 0.2, 0.1) and solarisation. Images
    under 64 px get no blur: a blur kernel of 10 % of 32 px is a 3x3 box and only erases detail.
    """
    hue_jitter = (0.4, 0.4, 0.4, 0.1) if framework == "moco" else (0.4, 0.4, 0.2, 0.1)
    steps = [v2.RandomResizedCrop(size, scale=scale, antialias=True),
             v2.RandomHorizontalFlip(),
             v2.RandomApply([v2.ColorJitter(*hue_jitter)], p=0.8),
             v2.RandomGrayscale(p=0.2)]
    if blur_p > 0 and size >= 64:
        kernel = 2 * (size // 20) + 1                                       # ~10 % of the side, odd
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    return v2.Compose(steps + _to_normalised_tensor())


class MultiViewTransform:
    """PIL image -> (global view 1 [3, S, S], global view 2 [3, S, S], small crops [M, 3, s, s]).

    The two global views follow the framework's recipe (BYOL's is asymmetric: blur 1.0 / 0.1,
    solarize 0 / 0.2); the M small crops are RandomResizedCrop(s, scale=(0.1, 0.6)) with the same
    photometric augmentations. With num_crops = 0 only the two global views are made (and an empty
    crops tensor), so the two-view baseline does not pay for crops it never uses.
    """

    def __init__(self, framework: str, image_size: int, crop_size: int, num_crops: int):
        global_scale = (0.2, 1.0) if framework == "moco" else (0.08, 1.0)
        if framework == "moco":
            self.view1 = self.view2 = view_transform("moco", image_size, global_scale, 0.5, 0.0)
        else:
            self.view1 = view_transform("byol", image_size, global_scale, 1.0, 0.0)
            self.view2 = view_transform("byol", image_size, global_scale, 0.1, 0.2)
        self.small = view_transform(framework, crop_size, (0.1, 0.6), 0.5, 0.0)
        self.num_crops, self.crop_size = num_crops, crop_size

    def __call__(self, image):
        crops = [self.small(image) for _ in range(self.num_crops)]
        crops = torch.stack(crops) if crops else torch.empty(0, 3, self.crop_size, self.crop_size)
        return self.view1(image), self.view2(image), crops


def eval_transform(image_size: int, augment: bool = False) -> v2.Compose:
    """Evaluation view: resize + centre crop (ImageNet: resize to 8/7 of the size first), or for
    the augmented linear probe RandomResizedCrop + flip."""
    if augment:
        steps = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        resize = image_size if image_size <= 64 else round(image_size * 8 / 7)
        steps = [v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose(steps + _to_normalised_tensor())


class SafeImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder that skips an unreadable image with a warning naming the file, instead of
    killing a multi-day run at hour 30 because of one corrupt JPEG."""

    def __getitem__(self, index):
        for attempt in range(len(self.samples)):
            path = self.samples[(index + attempt) % len(self.samples)][0]
            try:
                return super().__getitem__((index + attempt) % len(self.samples))
            except (OSError, ValueError, SyntaxError) as error:   # what PIL raises on broken files
                warnings.warn(f"skipping unreadable image {path}: {error}")
        raise RuntimeError("no readable image in the dataset")


def build_dataset(name: str, root: str, train: bool, transform, image_size: int = 224, fake_size: int = 512,
                  unlabeled: bool = False):
    """A torchvision dataset for one split.

    imagefolder: `root` is the split's folder of class folders (e.g. imagenet/train). cifar10,
    cifar100, stl10: torchvision's classes under `root` (downloaded there when missing and the
    internet can be reached; unlabeled=True adds STL-10's 100k unlabeled images, for pre-training). fake: random images.
    Raises SystemExit with a one-line fix when the data is missing.
    """
    if name not in DATASETS:
        raise SystemExit(f"error: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "fake":
        return torchvision.datasets.FakeData(fake_size if train else max(fake_size // 4, 16),
                                             (3, image_size, image_size), 10, transform,
                                             random_offset=0 if train else 10**6)
    if not root:
        raise SystemExit(f"error: --data is required for dataset {name}: point it at the dataset's folder")
    if name == "imagefolder":
        if not os.path.isdir(root):
            raise SystemExit(f"error: data folder {root} does not exist; pass --data DIR with one folder per class")
        try:
            return SafeImageFolder(root, transform)
        except (FileNotFoundError, RuntimeError) as error:   # no class folders or no images
            raise SystemExit(f"error: no images found under {root} ({error}); --data must hold one folder "
                             f"per class with .jpg/.png files inside") from None
    kind = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
            "stl10": torchvision.datasets.STL10}[name]
    try:
        if name == "stl10":
            return kind(root, split=("train+unlabeled" if unlabeled else "train") if train else "test", transform=transform, download=True)
        return kind(root, train=train, transform=transform, download=True)
    except Exception as error:   # no internet, partial download, wrong folder
        raise SystemExit(f"error: could not load {name} from {root} ({type(error).__name__}: {error}); download it "
                         f"there, or extract an image-folder copy and use --dataset imagefolder") from None


class EpochSampler(Sampler):
    """Training order for one process: shuffled by (seed, epoch), sharded across processes, whole
    batches only. It yields epoch * N + index rather than index, so that SeededViews can give each
    sample augmentations that depend only on (seed, epoch, index): a resumed run then sees the very
    views an uninterrupted one would, whatever the number of workers."""

    def __init__(self, dataset_size: int, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        self.size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.batches_per_epoch = dataset_size // (batch_size * num_replicas)
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0):
        """Select the epoch's order; skip_batches > 0 resumes in the middle of it."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        used = self.batches_per_epoch * self.batch_size * self.num_replicas
        mine = order[self.rank:used:self.num_replicas][self.skip_batches * self.batch_size:]
        return iter((mine + self.epoch * self.size).tolist())

    def __len__(self):
        return (self.batches_per_epoch - self.skip_batches) * self.batch_size


class SeededViews(Dataset):
    """Wraps a dataset whose keys come from EpochSampler: seeds torch's RNG from (seed, epoch, index)
    before the transform runs, so augmentations are reproducible per sample."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key: int):
        epoch, index = divmod(key, len(self.dataset))
        torch.manual_seed((self.seed * 1_000_003 + epoch) * 1_000_000_007 + index)
        return self.dataset[index]


def _ignore_stop_signals(worker_id: int):
    """Loader workers ignore SIGTERM/SIGINT: torchrun and schedulers signal the whole process group,
    and a worker killed mid-step would crash the trainer before it can write its checkpoint."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_train_loader(dataset, batch_size: int, workers: int, seed: int) -> DataLoader:
    """Per-process training loader over equal, full batches (drop_last) with reproducible views.
    Call loader.sampler.set_epoch(epoch) before each epoch."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if distributed else (1, 0)
    sampler = EpochSampler(len(dataset), batch_size, seed, world, rank)
    return DataLoader(SeededViews(dataset, seed), batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True, worker_init_fn=_ignore_stop_signals,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
