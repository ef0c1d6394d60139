"""Datasets, view augmentations and loaders shared by train.py, eval_knn.py, eval_linear.py and bench.py."""
import contextlib, functools, multiprocessing, os, signal, warnings

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

DATASETS = ("imagefolder", "cifar10", "cifar100", "stl10", "fake")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # ImageNet statistics, used for every dataset
DEMO_FOLDER = os.path.join("data", "cifar10-jpg")          # the demo's CIFAR-10 as an ImageFolder tree

def add_data_args(parser):
    """The data and loader flags that train.py and both evaluation scripts share."""
    parser.add_argument("--dataset", choices=DATASETS, default="imagefolder")
    parser.add_argument("--data", help="training split: ImageFolder root, or torchvision's folder for the others")
    parser.add_argument("--val-data", help="the val split's ImageFolder (default: val/ or test/ beside --data)")
    parser.add_argument("--image-size", type=int, default=224, help="global views and evaluation (px)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader processes per process")
    parser.add_argument("--fake-size", type=int, default=512, help="images in --dataset fake")

def view_transform(framework: str, size: int, scale, blur_p: float, solarize_p: float) -> v2.Compose:
    """One augmented view, PIL image -> [3, size, size] normalised tensor, with MoCo-v2's or BYOL's colour jitter.
    The blur kernel is ~10 % of the side; views under 64 px get none (at 32 px it is a 3x3 box erasing detail)."""
    colour_jitter = (0.4, 0.4, 0.4, 0.1) if framework == "moco" else (0.4, 0.4, 0.2, 0.1)
    steps = [v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip(),
             v2.RandomApply([v2.ColorJitter(*colour_jitter)], p=0.8), v2.RandomGrayscale(p=0.2)]
    if blur_p > 0 and size >= 64:
        steps.append(v2.RandomApply([v2.GaussianBlur(2 * (size // 20) + 1, sigma=(0.1, 2.0))], p=blur_p))
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    return v2.Compose(steps + [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])

class MultiViewTransform:
    """PIL image -> (global view x1 [3, S, S], global view x2 [3, S, S], small crops [M, 3, s, s]). MoCo-v2's
    global views are alike (scale (0.2, 1), blur 0.5), BYOL's asymmetric (scale (0.08, 1), blur 1.0 / 0.1,
    solarize 0 / 0.2). The crops are RandomResizedCrop(s, scale=(0.1, 0.6)) with the framework's colour
    augmentations; with num_crops = 0 they are an empty [0, 3, s, s]: the two-view baseline pays for none."""
    def __init__(self, framework: str, image_size: int, crop_size: int, num_crops: int):
        moco = framework == "moco"
        scale, blur, solarize = ((0.2, 1.0), (0.5, 0.5), (0, 0)) if moco else ((0.08, 1.0), (1.0, 0.1), (0, 0.2))
        self.view1, self.view2 = (view_transform(framework, image_size, scale, b, s) for b, s in zip(blur, solarize))
        self.small = view_transform(framework, crop_size, (0.1, 0.6), 0.5, 0.0)
        self.num_crops, self.crop_size = num_crops, crop_size

    def __call__(self, image):
        crops = [self.small(image) for _ in range(self.num_crops)]
        crops = torch.stack(crops) if crops else torch.empty(0, 3, self.crop_size, self.crop_size)
        return self.view1(image), self.view2(image), crops

def eval_transform(image_size: int, augment: bool = False) -> v2.Compose:
    """Evaluation view: resize (to 8/7 of the size above 64 px) + centre crop; with augment RandomResizedCrop + flip."""
    resize = image_size if image_size <= 64 else round(image_size * 8 / 7)
    steps = ([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()] if augment
             else [v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)])
    return v2.Compose(steps + [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])

class SafeImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder that skips an unreadable image with a warning naming the file, instead of killing a
    multi-day run at hour 30 because of one corrupt JPEG."""
    def __getitem__(self, index):
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            try:
                return super().__getitem__(i)
            except (OSError, ValueError, SyntaxError) as error:   # what PIL raises on broken files
                warnings.warn(f"skipping unreadable image {self.samples[i][0]}: {error}")
        raise RuntimeError(f"no readable image among the {len(self.samples)} files")

def build_dataset(name: str, root: str, train: bool, transform, image_size: int = 224, fake_size: int = 512,
                  unlabeled: bool = False):
    """One split: imagefolder (`root` holds a folder per class), cifar10 / cifar100 / stl10 (torchvision's, downloaded
    into `root` when missing; unlabeled adds STL-10's 100k) or fake. SystemExit with a one-line fix if unusable."""
    if name == "fake":
        size = fake_size if train else max(fake_size // 4, 16)
        return torchvision.datasets.FakeData(size, (3, image_size, image_size), 10, transform,
                                             random_offset=0 if train else 10**6)
    if not root:
        raise SystemExit(f"error: --data is required for --dataset {name}: point it at the dataset's folder")
    if name == "imagefolder":
        if not os.path.isdir(root):
            raise SystemExit(f"error: data folder {root} does not exist; pass --data DIR with one folder per class")
        try:
            folder = SafeImageFolder(root, transform)
            folder[0]   # now, not at step 1: a folder of only corrupt files stops before any work
            return folder
        except (FileNotFoundError, RuntimeError) as error:   # no class folders, no images, none readable
            raise SystemExit(f"error: no images found under {root} ({error}); --data must hold one folder per "
                             f"class with readable .jpg/.png files inside") from None
    try:
        if name == "stl10":
            split = ("train+unlabeled" if unlabeled else "train") if train else "test"
            return torchvision.datasets.STL10(root, split=split, transform=transform, download=True)
        kind = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        return kind(root, train=train, transform=transform, download=True)
    except Exception as error:   # no internet, a partial download, a wrong folder
        raise SystemExit(f"error: could not load {name} from {root} ({type(error).__name__}); without internet, put it "
                         f"there by hand, or use an ImageFolder copy with --dataset imagefolder (--demo takes "
                         f"{DEMO_FOLDER}/{{train,test}}/<class>/*.jpg by itself)") from None

def build_splits(dataset: str, data: str, val_data, train_transform, val_transform, image_size: int, fake_size: int):
    """(train split, val split, num_classes); an ImageFolder's val split is val_data, else val/ or test/ beside data.
    One-line SystemExit when a split is missing or the splits' classes differ."""
    val_root = data
    if dataset == "imagefolder":
        beside = [os.path.join(os.path.dirname(os.path.abspath(data or ".")), name) for name in ("val", "test")]
        val_root = val_data or next((path for path in beside if os.path.isdir(path)), None)
        if val_root is None:
            raise SystemExit(f"error: no --val-data given and no val/ or test/ folder beside {data}")
    train_set = build_dataset(dataset, data, True, train_transform, image_size, fake_size)
    val_set = build_dataset(dataset, val_root, False, val_transform, image_size, fake_size)
    classes = getattr(train_set, "classes", None)
    if classes is None:                                     # FakeData
        return train_set, val_set, train_set.num_classes
    if getattr(val_set, "classes", classes) != classes:
        raise SystemExit(f"error: the val split has {len(val_set.classes)} classes, the train split {len(classes)} "
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
    # While the trainer runs, workers ignore SIGINT and SIGTERM: torchrun and schedulers signal the whole
    # process group, and a worker that died mid-step would crash the trainer before it saved. Once the
    # trainer exits, SIGTERM (what Python sends its workers at exit) ends them: no exit waits on a worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
