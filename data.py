"""Datasets, the loader's half of the views (decode, crop, flip, uint8) and the loaders, shared by train.py and
the evaluation scripts."""
import contextlib
import functools
import multiprocessing
import os
import signal
import warnings

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

import augment
import runtime
from augment import MEAN, STD

DATASETS = ("imagefolder", "imagenet100", "cifar10", "cifar100", "stl10", "fake")
DEMO_FOLDER = os.path.join("data", "cifar10-jpg")          # the demo's CIFAR-10 as an ImageFolder tree
IMAGENET100 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet100.txt")   # CMC's 100 classes


def default_workers() -> int:
    """Loader processes per training process: the cores this process may run on (its CPU affinity) shared among
    the LOCAL_WORLD_SIZE processes that torchrun starts on this machine; at least 1, at most 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def add_data_args(parser):
    """The data and loader flags that train.py and both evaluation scripts share."""
    parser.add_argument("--dataset", choices=DATASETS, default="imagefolder")
    parser.add_argument("--data", help="training split: ImageFolder root, or torchvision's folder for the others")
    parser.add_argument("--val-data", help="the val split's ImageFolder (default: val/ or test/ beside --data)")
    parser.add_argument("--image-size", type=int, default=224, help="global views and evaluation (px)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="loader processes per process (default: its cores, at most 16)")
    parser.add_argument("--fake-size", type=int, default=512, help="images in --dataset fake")


def load_image(path: str) -> torch.Tensor:
    """An image file -> uint8 [3, H, W], RGB. torchvision.io decodes JPEG (decode_jpeg, libjpeg-turbo), PNG and
    the other formats it knows straight to a tensor, greyscale and CMYK as RGB; anything else (or a 16-bit PNG)
    goes through PIL, whose OSError on an unreadable file SafeImageFolder turns into a warning."""
    try:
        with warnings.catch_warnings():   # torchvision >= 0.29 deprecates its decoders for TorchCodec, on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            image = torchvision.io.decode_image(torchvision.io.read_file(path), mode=torchvision.io.ImageReadMode.RGB)
        if image.dtype == torch.uint8:
            return image
    except (RuntimeError, AttributeError):   # a format it does not read, a broken file, or decoders gone: PIL
        pass
    return v2.functional.pil_to_tensor(torchvision.datasets.folder.pil_loader(path))


def view_transform(size: int, scale) -> v2.Compose:
    """The loader's half of a view, on the tensor: uint8 [3, H, W] -> RandomResizedCrop(size, scale) + flip ->
    uint8 [3, size, size]. The photometric half (colour, blur, solarize, normalisation) runs batched on the device:
    augment.py."""
    return v2.Compose([v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip()])


class MultiViewTransform:
    """uint8 [3, H, W] (load_image's) or a PIL image (torchvision's CIFAR, STL-10, FakeData) -> uint8 (global view
    x1 [3, S, S], global view x2 [3, S, S], small crops [M, 3, s, s]), cropped with the scale ranges of
    augment.VIEW_RECIPES[framework]; train.py's step finishes them with augment.augment. With num_crops = 0 the crops
    are an empty [0, 3, s, s]: the two-view baseline pays for none."""
    def __init__(self, framework: str, image_size: int, crop_size: int, num_crops: int):
        recipe = augment.VIEW_RECIPES[framework]
        self.view1, self.view2 = (view_transform(image_size, recipe[view].scale) for view in ("x1", "x2"))
        self.small = view_transform(crop_size, recipe["crops"].scale)
        self.num_crops, self.crop_size = num_crops, crop_size

    def __call__(self, image):
        image = image if isinstance(image, torch.Tensor) else v2.functional.pil_to_tensor(image)
        crops = [self.small(image) for _ in range(self.num_crops)]
        crops = torch.stack(crops) if crops else torch.empty(0, 3, self.crop_size, self.crop_size, dtype=torch.uint8)
        return self.view1(image), self.view2(image), crops


def eval_transform(image_size: int, random_crop: bool = False) -> v2.Compose:
    """Evaluation view: resize (to 8/7 of the size above 64 px) + centre crop; with random_crop, RandomResizedCrop +
    flip instead (the linear probe's training view).
    Takes load_image's tensors or PIL images and resizes on PIL: torchvision's tensor resize downscales to within
    1 grey level of PIL's only, and evaluation figures stay those of the PIL loader (docs/loader.md)."""
    resize = image_size if image_size <= 64 else round(image_size * 8 / 7)
    steps = ([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()] if random_crop
             else [v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)])
    return v2.Compose([v2.ToPILImage()] + steps + [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                                                   v2.Normalize(MEAN, STD)])


class SafeImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder of load_image's uint8 [3, H, W] tensors that skips an unreadable image with a warning naming
    the file, instead of killing a multi-day run at hour 30 because of one corrupt JPEG."""
    def __init__(self, root: str, transform=None):
        super().__init__(root, transform, loader=load_image)

    def __getitem__(self, index):
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            try:
                return super().__getitem__(i)
            except (OSError, ValueError, SyntaxError) as error:   # what PIL raises on broken files
                warnings.warn(f"skipping unreadable image {self.samples[i][0]}: {error}")
        raise RuntimeError(f"no readable image among the {len(self.samples)} files")


class ImageNet100(SafeImageFolder):
    """ImageNet's train or val folder restricted to the 100 classes of imagenet100.txt, indexed in sorted synset
    order as ImageFolder would. Only those 100 folders are looked at: the other 900 are never listed or opened
    (ImageFolder walks only the classes find_classes returns), so start-up stays fast on a network file system."""
    def find_classes(self, directory):
        with open(IMAGENET100) as file:
            classes = sorted(line.strip() for line in file if line.strip() and not line.startswith("#"))
        missing = [name for name in classes if not os.path.isdir(os.path.join(directory, name))]
        if missing:
            raise ValueError(f"{len(missing)} of the 100 ImageNet-100 classes are missing under {directory}, "
                             f"e.g. {missing[0]}; point --data (or --val-data) at ImageNet's train (or val) folder, "
                             f"one folder per synset")
        return classes, {name: index for index, name in enumerate(classes)}


def build_dataset(name: str, root: str, train: bool, transform, image_size: int = 224, fake_size: int = 512,
                  unlabeled: bool = False):
    """One split: imagefolder (`root` holds a folder per class), imagenet100 (ImageNet100 of `root`), cifar10 /
    cifar100 / stl10 (torchvision's, downloaded into `root` when missing; unlabeled adds STL-10's 100k) or fake.
    ValueError with a one-line fix if unusable."""
    if name == "fake":
        size = fake_size if train else max(fake_size // 4, 16)
        return torchvision.datasets.FakeData(size, (3, image_size, image_size), 10, transform,
                                             random_offset=0 if train else 10**6)
    if not root:
        raise ValueError(f"--data is required for --dataset {name}: point it at the dataset's folder")
    if name in ("imagefolder", "imagenet100"):
        if not os.path.isdir(root):
            raise ValueError(f"data folder {root} does not exist; pass --data DIR with one folder per class")
        try:
            folder = (ImageNet100 if name == "imagenet100" else SafeImageFolder)(root, transform)
            folder[0]   # now, not at step 1: a folder of only corrupt files stops before any work
            return folder
        except (FileNotFoundError, RuntimeError) as error:   # no class folders, no images, none readable
            raise ValueError(f"no images found under {root} ({error}); --data must hold one folder per "
                             f"class with readable .jpg/.png files inside") from None
    try:   # one process of the machine at a time: the first downloads, the others then find the files
        with runtime.download_lock(root):
            if name == "stl10":
                split = ("train+unlabeled" if unlabeled else "train") if train else "test"
                return torchvision.datasets.STL10(root, split=split, transform=transform, download=True)
            kind = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            return kind(root, train=train, transform=transform, download=True)
    except Exception as error:   # no internet, a partial download, a wrong folder
        raise ValueError(f"could not load {name} from {root} ({type(error).__name__}); without internet, put it "
                         f"there by hand, or use an ImageFolder copy with --dataset imagefolder (--demo takes "
                         f"{DEMO_FOLDER}/{{train,test}}/<class>/*.jpg by itself)") from None


def build_splits(dataset: str, data: str, val_data, train_transform, val_transform, image_size: int, fake_size: int):
    """(train split, val split, num_classes); an ImageFolder's val split is val_data, else val/ or test/ beside data.
    ValueError (one line) when a split is missing or the splits' classes differ."""
    val_root = data
    if dataset in ("imagefolder", "imagenet100"):
        beside = [os.path.join(os.path.dirname(os.path.abspath(data or ".")), name) for name in ("val", "test")]
        val_root = val_data or next((path for path in beside if os.path.isdir(path)), None)
        if val_root is None:
            raise ValueError(f"no --val-data given and no val/ or test/ folder beside {data}")
    train_set = build_dataset(dataset, data, True, train_transform, image_size, fake_size)
    val_set = build_dataset(dataset, val_root, False, val_transform, image_size, fake_size)
    classes = getattr(train_set, "classes", None)
    if classes is None:                                     # FakeData
        return train_set, val_set, train_set.num_classes
    if getattr(val_set, "classes", classes) != classes:
        raise ValueError(f"the val split has {len(val_set.classes)} classes, the train split {len(classes)} "
                         f"(or other names): both need the same class folders")
    return train_set, val_set, len(classes)


class EpochSampler(DistributedSampler):
    """torch's DistributedSampler (shuffled by seed + epoch, sharded over processes, drop_last) in whole batches,
    yielding epoch * N + index instead of index, so that SeededViews can seed each sample's views from (seed,
    epoch, index): a resumed run sees the views an uninterrupted one would, whatever the number of workers.
    set_epoch(epoch, skip_batches) selects an epoch and resumes inside it."""
    def __init__(self, dataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size, self.batches_per_epoch, self.skip_batches = batch_size, self.num_samples // batch_size, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0):
        super().set_epoch(epoch)
        self.skip_batches = skip_batches

    def __iter__(self):
        keys = [self.epoch * len(self.dataset) + index for index in super().__iter__()]
        return iter(keys[self.skip_batches * self.batch_size:self.batches_per_epoch * self.batch_size])

    def __len__(self):
        return (self.batches_per_epoch - self.skip_batches) * self.batch_size


class SeededViews(Dataset):
    """Wraps a dataset for keys from EpochSampler: seeds torch's RNG from (seed, epoch, index) before the
    transform runs, so that each sample's augmentations are reproducible."""
    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __getitem__(self, key: int):
        epoch, index = divmod(key, len(self.dataset))
        torch.manual_seed((self.seed * 1_000_003 + epoch) * 1_000_000_007 + index)
        return self.dataset[index]


def _worker_init(exiting, worker_id: int):
    # While the trainer runs, workers ignore SIGINT, SIGUSR1 and SIGTERM: torchrun and schedulers signal the whole
    # process group, and a worker that died mid-step would crash the trainer before it saved. Once the
    # trainer exits, SIGTERM (what Python sends its workers at exit) ends them: no exit waits on a worker.
    for sig in (getattr(signal, name) for name in ("SIGINT", "SIGUSR1") if hasattr(signal, name)):   # not on Windows
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0) if exiting.is_set() else None)


@contextlib.contextmanager
def train_loader(dataset, batch_size: int, workers: int, seed: int, world: int = 1, rank: int = 0):
    """Yields process `rank`'s training loader: full batches of reproducible views; call
    loader.sampler.set_epoch(epoch) before each epoch. Leaving the block, however, lets the workers end."""
    exiting, sampler = multiprocessing.Event(), EpochSampler(dataset, batch_size, seed, world, rank)
    try:
        yield DataLoader(SeededViews(dataset, seed), batch_size, sampler=sampler,
                         num_workers=workers, pin_memory=torch.cuda.is_available(), drop_last=True,
                         worker_init_fn=functools.partial(_worker_init, exiting),
                         persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    finally:
        exiting.set()
