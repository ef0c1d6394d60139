"""Networks of MosRep: a torchvision ResNet trunk, the RoI head, and the MoCo-v2 and BYOL learners.

Each learner's forward takes the two global views and, optionally, the local views: a Mosaic
(MosRep), a [B, M, C, s, s] tensor of small crops (multi-crop baseline) or None (two views). It
returns a dict of scalar losses {loss, loss_global, loss_local}. The same code runs in one process
(CPU or one GPU) and under DistributedDataParallel: cross-process steps (gathering keys, shuffle-BN)
turn into no-ops when there is no process group. Imports only torch, torchvision and mosaic.Mosaic.
"""
import copy
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.ops import roi_align

from losses import byol_loss, info_nce
from mosaic import Mosaic

ARCHS = ("resnet18", "resnet34", "resnet50")


class Trunk(nn.Module):
    """A torchvision ResNet without pooling and fc: images [N, 3, H, W] -> C5 map [N, C, H/s, W/s].

    Its state_dict keys are torchvision's, so `torchvision.models.<arch>()` loads it with only fc.*
    missing (with the cifar stem, conv1 must be swapped the same way first). stem='cifar' uses a
    3x3 stride-1 conv and no max-pool, the usual stem for 32 px images: C5 keeps 4x4 cells for a
    32 px view (stride 8) instead of 1x1, so roi_align has something to align to.
    """

    def __init__(self, arch: str = "resnet50", stem: str = "imagenet"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"unknown stem {stem!r}; choose imagenet or cifar")
        # zero-init of each block's last BN makes every residual block start as the identity.
        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=True)
        if stem == "cifar":
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = net.fc.in_features
        # The real stride, read off the layers: roi_align's spatial_scale is 1 / stride.
        self.stride = self.conv1.stride[0] * (self.maxpool.stride if isinstance(self.maxpool, nn.MaxPool2d) else 1)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            self.stride *= layer[0].stride   # torchvision blocks keep their stride

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] -> globally average-pooled features [N, C] (what evaluation uses)."""
        return self(images).mean(dim=(2, 3))


def load_trunk(weights: str, arch: str, stem: str) -> Trunk:
    """A Trunk with weights from a backbone.pth (torchvision keys), a train.py checkpoint.pth, or
    'random' (random init, the baseline). Raises ValueError with a one-line explanation when the
    file is missing or holds another arch/stem."""
    trunk = Trunk(arch, stem)
    if weights == "random":
        return trunk
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"weights file {weights} does not exist; pass a backbone.pth, a checkpoint.pth or 'random'") from None
    except Exception as error:
        raise ValueError(f"cannot read {weights} as a torch file ({type(error).__name__}); is it a backbone.pth?") from None
    if isinstance(state, dict) and "model" in state and "args" in state:     # a train.py checkpoint
        saved = state["args"]
        if (saved.get("arch"), saved.get("stem")) != (arch, stem):
            raise ValueError(f"{weights} was trained with --arch {saved.get('arch')} --stem {saved.get('stem')}; "
                             f"pass those instead of --arch {arch} --stem {stem}")
        state = {k[len("online.trunk."):]: v for k, v in state["model"].items() if k.startswith("online.trunk.")}
    if not isinstance(state, dict):
        raise ValueError(f"{weights} holds no state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    mine = trunk.state_dict()
    wrong = [k for k in mine if k not in state or state[k].shape != mine[k].shape]
    if wrong:
        raise ValueError(f"{weights} does not fit a {arch} trunk with the {stem} stem ({len(wrong)} tensors missing "
                         f"or of another shape, e.g. {wrong[0]}); check --arch and --stem")
    trunk.load_state_dict(state, strict=False)
    return trunk


def mlp(in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool) -> nn.Sequential:
    """Linear -> [BN] -> ReLU -> Linear: [N, in_dim] -> [N, out_dim]."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=not batch_norm),
                         nn.BatchNorm1d(hidden_dim) if batch_norm else nn.Identity(),
                         nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class Head(nn.Module):
    """conv1x1 + BN + ReLU on a feature map -> global average pool -> MLP: [N, C, h, w] -> [N, out_dim].

    The same head takes a global view's C5 map and the roi_align features of a mosaic crop, so a
    crop and a whole image land in one embedding space. The conv before pooling gives the RoI
    features a learned spatial transform of their own (the released code's design).
    """

    def __init__(self, channels: int, hidden_dim: int, out_dim: int, mlp_batch_norm: bool):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.mlp = mlp(channels, hidden_dim, out_dim, mlp_batch_norm)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.conv(feature_map).mean(dim=(2, 3)))


class Encoder(nn.Module):
    """Trunk + Head. Calling it embeds whole images; embed_local embeds the local views."""

    def __init__(self, arch: str, stem: str, hidden_dim: int, out_dim: int, mlp_batch_norm: bool,
                 roi_size: int = 7):
        super().__init__()
        self.trunk = Trunk(arch, stem)
        channels = self.trunk.out_channels
        self.head = Head(channels, hidden_dim or channels, out_dim, mlp_batch_norm)
        self.roi_size = roi_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] -> embeddings [N, out_dim] (not normalised)."""
        return self.head(self.trunk(images))

    def embed_local(self, local):
        """Local views -> (embeddings [B*M, D], source image [B*M], loss weights [B*M] or None).

        Mosaic: one trunk pass over the B mosaics, then each crop's features are cut out of the C5
        map with roi_align at its box, so every crop is encoded with other images' crops around it.
        Tensor [B, M, C, s, s]: the multi-crop baseline, each crop a separate small image.
        """
        if isinstance(local, Mosaic):
            feature_map = self.trunk(local.images)                                   # [B, C, h, w]
            # fp32 boxes whatever the autocast dtype: bf16 holds integers only up to 256, so batch
            # indices and pixel corners beyond that would snap to the wrong mosaic or pixel.
            crop_maps = roi_align(feature_map.float(), local.rois.float(), output_size=self.roi_size,
                                  spatial_scale=1.0 / self.trunk.stride, sampling_ratio=2, aligned=True)
            return self.head(crop_maps.to(feature_map.dtype)), local.targets, local.weights   # [B*M, D]
        B, M = local.shape[:2]
        embeddings = self(local.flatten(0, 1))                                       # [B*M, D], row b*M+j
        return embeddings, torch.arange(B, device=local.device).repeat_interleave(M), None


def init_distributed() -> torch.device:
    """Join torchrun's process group when it set RANK (nccl on CUDA, gloo on CPU), else stay a
    world of one; every later code path is the same either way. Returns this process's device."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def gather_all(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a [n, ...] tensor from every process along dim 0 (no gradient): [n*world, ...]."""
    if world_size() == 1:
        return tensor
    tensor = tensor.contiguous()   # plain layout: collectives copy raw bytes, channels_last would scramble
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


class _Learner(nn.Module):
    """What both learners share: an online encoder and its EMA copy, the target."""

    def _make_target(self):
        self.target = copy.deepcopy(self.online).requires_grad_(False)

    @torch.no_grad()
    def update_target(self, momentum: float):
        """EMA step on parameters: target <- momentum * target + (1 - momentum) * online.

        BN running statistics are not averaged: the target always runs in train mode (batch stats).
        """
        torch._foreach_lerp_(list(self.target.parameters()), list(self.online.parameters()), 1.0 - momentum)

    def _losses(self, loss_global, loss_local):
        return {"loss": loss_global + loss_local, "loss_global": loss_global.detach(),
                "loss_local": loss_local.detach()}


class MoCo(_Learner):
    """MoCo-v2 with MosRep's local views (the released code's framework).

    The query encoder embeds x_q and the local views; the EMA key encoder embeds x_k. Every query
    (global or crop) is contrasted against the keys of the whole global batch plus the queue, with
    its own image's key as the positive.
    """

    def __init__(self, arch="resnet50", stem="imagenet", dim=128, queue_size=65536, temperature=0.2,
                 roi_size=7, min_shuffle_chunk=16):
        super().__init__()
        self.online = Encoder(arch, stem, hidden_dim=0, out_dim=dim, mlp_batch_norm=False, roi_size=roi_size)
        self._make_target()
        self.temperature = temperature
        self.min_shuffle_chunk = min_shuffle_chunk
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))   # [Q, D]
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def keys(self, x_k: torch.Tensor) -> torch.Tensor:
        """Key embeddings of the whole global batch, L2-normalised: [B*world, D] in rank order.

        Shuffle-BN: if a key were batch-normalised together with the other views of its own batch,
        BN statistics would leak which samples belong together and the model could find its
        positive by that leak instead of by content. So the keys are computed on a random
        permutation of the global batch, spread over the processes; in a single process the
        permuted batch is split into chunks of >= min_shuffle_chunk images, each with its own BN
        statistics, to emulate the same thing.
        """
        world, B = world_size(), x_k.shape[0]
        images = gather_all(x_k)                                                  # [B*world, ...]
        perm = torch.randperm(images.shape[0], device=x_k.device)
        if world > 1:
            dist.broadcast(perm, src=0)
        mine = images[perm[rank() * B:(rank() + 1) * B]]                          # [B, ...]
        if not x_k.is_contiguous() and x_k.is_contiguous(memory_format=torch.channels_last):
            mine = mine.contiguous(memory_format=torch.channels_last)           # keep the caller's layout
        chunks = max(1, min(8, B // self.min_shuffle_chunk)) if world == 1 else 1
        shuffled = torch.cat([self.target(c) for c in mine.chunk(chunks)])        # [B, D]
        shuffled = gather_all(F.normalize(shuffled.float(), dim=1))               # [B*world, D]
        keys = torch.empty_like(shuffled)
        keys[perm] = shuffled                                                     # undo the permutation
        return keys

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor):
        """Write keys [n, D] into the ring buffer at the pointer, wrapping around its end."""
        n, size = keys.shape[0], self.queue.shape[0]
        if size == 0:
            return
        if n > size:
            raise ValueError(f"the queue ({size}) is smaller than the global batch ({n}); raise --queue-size")
        slots = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor, local=None) -> dict:
        B = x_q.shape[0]
        queue = self.queue.clone().detach() if self.queue.shape[0] else None      # [Q, D] negatives
        own = rank() * B + torch.arange(B, device=x_q.device)                    # my images in `keys`
        q = F.normalize(self.online(x_q).float(), dim=1)                          # [B, D]
        keys = self.keys(x_k)                                                     # [B*world, D]
        # L_global = CE([q.K^T, q.queue^T] / T, own index)
        loss_global = info_nce(q, keys, own, queue, self.temperature)
        loss_local = torch.zeros((), device=x_q.device)
        if local is not None:
            # L_local = mean over crops of w * CE([z.K^T, z.queue^T] / T, index of the crop's source)
            z, sources, weights = self.online.embed_local(local)                  # [B*M, D]
            z = F.normalize(z.float(), dim=1)
            loss_local = info_nce(z, keys, rank() * B + sources, queue, self.temperature, weights)
        self.enqueue(keys)
        return self._losses(loss_global, loss_local)


class BYOL(_Learner):
    """BYOL with MosRep's local views.

    Online = trunk -> projector head -> predictor; target = EMA of trunk + head. Each global view
    predicts the other's target embedding; each crop predicts both target embeddings of its source.
    """

    def __init__(self, arch="resnet50", stem="imagenet", dim=256, hidden_dim=4096, roi_size=7):
        super().__init__()
        self.online = Encoder(arch, stem, hidden_dim, dim, mlp_batch_norm=True, roi_size=roi_size)
        self.predictor = mlp(dim, hidden_dim, dim, batch_norm=True)
        self._make_target()

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, local=None) -> dict:
        B = x1.shape[0]
        own = torch.arange(B, device=x1.device)
        p1, p2 = self.predictor(self.online(x1)), self.predictor(self.online(x2))  # [B, D] each
        with torch.no_grad():
            z1, z2 = self.target(x1), self.target(x2)                              # [B, D] each
        # L_global = l(p1, z2') + l(p2, z1'): a sum over the two views, not a mean (a mean halves
        # the gradient against the same lr, a known reproduction trap).
        loss_global = byol_loss(p1, z2, own) + byol_loss(p2, z1, own)
        loss_local = torch.zeros((), device=x1.device)
        if local is not None:
            z, sources, weights = self.online.embed_local(local)                   # [B*M, D]
            p = self.predictor(z)                                                  # [B*M, D]
            # L_local = mean over crops of w * (l(p_c, z1') + l(p_c, z2'))
            loss_local = byol_loss(p, z1, sources, weights) + byol_loss(p, z2, sources, weights)
        return self._losses(loss_global, loss_local)
