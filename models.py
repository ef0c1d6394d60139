"""Networks of MosRep: a torchvision ResNet trunk, the RoI head, the MoCo-v2 and BYOL learners, and their
checkpoints. Imports only torch, torchvision, mixture.py, losses.py, the Mosaic type and runtime.py's process-group
helpers. A learner's forward takes the global views x1, x2 [B, 3, S, S] and the local views: a Mosaic (MosRep),
crops [B, M, 3, s, s] (the multi-crop baseline) or None (two views); it returns the scalars {loss, loss_global,
loss_local, loss_mix, target_std}. `mix` adds one of the image mixtures of mixture.py inside the forward: "flatten"
(Un-Mix) mixes the online branch's global views, "cutmix" (mix-ssl, MoCo only) adds loss_mix. The same code runs in
one process and under DDP: the cross-process steps (gathering keys, shuffle-BN) do nothing without a process group.
"""
import copy
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.ops import roi_align

import mixture
from losses import byol_loss, info_nce
from mosaic import Mosaic
from runtime import gather_all, rank, world_size

ARCHS = ("resnet18", "resnet34", "resnet50")
STEMS = ("imagenet", "cifar")


class Trunk(nn.Module):
    """A torchvision ResNet without pooling and fc: images [N, 3, H, W] -> C5 map [N, C, H/stride, W/stride]. Its
    state_dict keys are torchvision's: `torchvision.models.<arch>()` loads it with only fc.* missing (with the
    cifar stem, swap conv1 and maxpool the same way first). The cifar stem (3x3 stride-1 conv, no max-pool)
    leaves a 32 px view a 4x4 C5 map (stride 8) instead of 1x1, so that roi_align has cells to align to."""
    def __init__(self, arch: str = "resnet50", stem: str = "imagenet"):
        super().__init__()
        if arch not in ARCHS or stem not in STEMS:
            raise ValueError(f"unknown arch {arch!r} or stem {stem!r}; choose from {ARCHS} and {STEMS}")
        # zero-init of each block's last BN makes every residual block start as the identity.
        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=True)
        if stem == "cifar":
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = net.fc.in_features
        # roi_align's scale is 1 / stride: conv1 and maxpool halve (imagenet stem), as do layer2, layer3, layer4.
        self.stride = 8 if stem == "cifar" else 32

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Inputs follow the weights' layout (train.py makes them channels_last), else every conv converts them.
        if self.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            images = images.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def pooled(self, images: torch.Tensor) -> torch.Tensor:   # [N, 3, H, W] -> [N, C]: what evaluation uses
        return self(images).mean(dim=(2, 3))


def save_checkpoint(folder: str, learner: "_Learner", args: dict, **training_state):
    """Write folder/checkpoint.pth ({learner, backbone, args} and training_state) and folder/backbone.pth
    (the backbone's torchvision-keyed state_dict), each atomically (temp file, then rename): a crash or a
    full disk mid-write leaves the previous file intact. The tensors are copied to the CPU, so that a bare torch.load
    reads them on a machine without the training's GPU; the backbone's are the learner's own (saved once).
    Raises OSError when a write fails."""
    state = {key: value.cpu() for key, value in learner.state_dict().items()}
    prefix = next(name for name, module in learner.named_modules() if module is learner.backbone) + "."
    backbone = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
    checkpoint = dict(learner=state, backbone=backbone, args=args, **training_state)
    for name, content in (("checkpoint.pth", checkpoint), ("backbone.pth", backbone)):
        path = os.path.join(folder, name)
        try:
            torch.save(content, path + ".tmp")
            os.replace(path + ".tmp", path)
        finally:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")


def read_checkpoint(path: str):
    """torch.load(path) onto the CPU, tensors only; ValueError with a one-line reason when it can't."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except Exception as error:
        raise ValueError(f"{path} is not a readable torch file ({type(error).__name__})") from None


def load_trunk(weights: str, arch: str, stem: str) -> Trunk:
    """A Trunk with weights from a backbone.pth (torchvision keys), a train.py checkpoint.pth, or
    'random' (the random-init baseline). ValueError with a one-line fix when the file is missing,
    unreadable or holds another arch/stem."""
    trunk = Trunk(arch, stem)
    if weights == "random":
        return trunk
    state = read_checkpoint(weights)
    if isinstance(state, dict) and "backbone" in state and "args" in state:   # a train.py checkpoint
        saved = state["args"]
        if (saved.get("arch"), saved.get("stem")) != (arch, stem):
            raise ValueError(f"{weights} was trained with --arch {saved.get('arch')} --stem {saved.get('stem')}; "
                             f"pass those instead of --arch {arch} --stem {stem}")
        state = state["backbone"]
    if not isinstance(state, dict):
        raise ValueError(f"{weights} holds no state_dict; pass a backbone.pth, a checkpoint.pth or 'random'")
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
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def head(channels: int, hidden_dim: int, out_dim: int, mlp_batch_norm: bool) -> nn.Sequential:
    """conv1x1 + BN + ReLU -> global average pool -> MLP: feature map [N, C, h, w] -> [N, out_dim]. The same head
    takes a global view's C5 map and a crop's roi_align map, so that crops and whole images land in one
    embedding space; the conv gives the RoI features a learned spatial transform (the released code's design)."""
    return nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), mlp(channels, hidden_dim, out_dim, mlp_batch_norm))


class Encoder(nn.Module):
    """Trunk + Head. Calling it embeds whole images; embed_local embeds the local views."""
    def __init__(self, trunk: Trunk, hidden_dim: int, out_dim: int, mlp_batch_norm: bool, roi_size: int = 7):
        super().__init__()
        self.trunk, self.roi_size = trunk, roi_size
        self.head = head(trunk.out_channels, hidden_dim, out_dim, mlp_batch_norm)

    def forward(self, images: torch.Tensor) -> torch.Tensor:   # [N, 3, H, W] -> [N, out_dim], not normalised
        return self.head(self.trunk(images))

    def embed_local(self, local):
        """Local views -> (embeddings [B*M, D], source image [B*M], loss weights [B*M] or None). A Mosaic: one trunk
        pass over the mosaics, then roi_align cuts each crop's features out of the C5 map at its box, so that every
        crop is encoded among other images' crops. Crops [B, M, C, s, s] (multi-crop): each encoded alone."""
        if isinstance(local, Mosaic):
            feature_map = self.trunk(local.images)                                   # [B, C, h, w]
            # fp32 rois and map whatever the autocast dtype (see the contract in mosaic.py).
            crop_maps = roi_align(feature_map.float(), local.rois.float(), output_size=self.roi_size,
                                  spatial_scale=1.0 / self.trunk.stride, sampling_ratio=2, aligned=True)
            return self.head(crop_maps.to(feature_map.dtype)), local.sources, local.weights   # [B*M, D]
        B, M = local.shape[:2]
        embeddings = self(local.flatten(0, 1))                                       # [B*M, D], row b*M+j
        return embeddings, torch.arange(B, device=local.device).repeat_interleave(M), None

    def embed_boxes(self, images: torch.Tensor, boxes: torch.Tensor):
        """Images [N, 3, H, W] and boxes [N, 4] (image px) -> (whole, inside, outside) embeddings [N, D] each, from one
        trunk pass: the head's conv-BN-ReLU map pooled over all cells, over the box and outside it (box_means). The
        three share one MLP call, the same as three calls for an MLP without BN (MoCo's)."""
        feature_map = self.head[:3](self.trunk(images))                              # [N, C, h, w]
        inside, outside = mixture.box_means(feature_map, boxes, self.trunk.stride)    # [N, C] each
        return self.head[-1](torch.cat([feature_map.mean(dim=(2, 3)), inside, outside])).chunk(3)


class _Learner(nn.Module):
    """What both learners share: an online encoder, its EMA copy (the target), the exported backbone."""
    mixes = ("off", "flatten")

    def __init__(self, online: Encoder, mix="off", mix_global_p=0.5, mix_region_p=0.25, mix_weight=0.5):
        """mix: "off", "flatten" (mixture.flatten of the online views, a row mixed globally with probability
        mix_global_p or by regions with mix_region_p) or, for MoCo, "cutmix" (MoCo.cutmix_loss, lambda = mix_weight)."""
        super().__init__()
        if mix not in self.mixes:
            raise ValueError(f"{type(self).__name__} takes mix in {self.mixes}, not {mix!r}")
        self.online, self.target = online, copy.deepcopy(online).requires_grad_(False)
        self.mix, self.mix_p, self.mix_weight = mix, (mix_global_p, mix_region_p), mix_weight

    def online_view(self, images: torch.Tensor) -> torch.Tensor:
        """The online branch's view [B, 3, S, S]: Un-Mix's flattened images when mix == "flatten", else unchanged."""
        return mixture.flatten(images, *self.mix_p) if self.mix == "flatten" else images

    @property
    def backbone(self) -> Trunk:   # the online trunk: what training exports and evaluation measures
        return self.online.trunk

    @torch.no_grad()
    def update_target(self, ema: float):
        """target <- ema * target + (1 - ema) * online, on parameters (MoCo's m, BYOL's tau). BN running
        statistics are not averaged: the target always runs in train mode, on batch statistics."""
        torch._foreach_lerp_(list(self.target.parameters()), list(self.online.parameters()), 1.0 - ema)

    @staticmethod
    def _report(loss_global, loss_local, loss_mix, keys):
        """The loss, and detached figures to log. target_std (per-dimension std of the L2-normalised target embeddings,
        times sqrt(D)) is ~1 when they spread over the sphere, 0 when they collapse to one point."""
        keys = F.normalize(keys.detach().float(), dim=1)
        return {"loss": loss_global + loss_local + loss_mix, "loss_global": loss_global.detach(),
                "loss_local": loss_local.detach(), "loss_mix": loss_mix.detach(),
                "target_std": keys.std(dim=0).mean() * keys.shape[1] ** 0.5}


class MoCo(_Learner):
    """MoCo-v2 with MosRep's local views (the released code's framework). The query encoder embeds x1 and the
    local views, the EMA key encoder x2. Every query (global view or crop) is contrasted with the keys of the
    whole global batch and the queue; its own image's key is the positive. mix="cutmix" adds mix-ssl's loss
    (cutmix_loss) and its two queues of local and global keys."""
    mixes, queues = ("off", "flatten", "cutmix"), ("queue", "queue_local", "queue_global")

    def __init__(self, arch="resnet50", stem="imagenet", dim=128, queue_size=65536, temperature=0.2,
                 roi_size=7, min_shuffle_chunk=16, **mixing):   # mixing: mix, mix_global_p... (_Learner)
        trunk = Trunk(arch, stem)
        super().__init__(Encoder(trunk, trunk.out_channels, dim, mlp_batch_norm=False, roi_size=roi_size), **mixing)
        self.temperature, self.min_shuffle_chunk = temperature, min_shuffle_chunk
        for name in self.queues[:3 if self.mix == "cutmix" else 1]:
            self.register_buffer(name, F.normalize(torch.randn(queue_size, dim), dim=1))   # [Q, D]
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))   # one pointer: the queues fill in step

    @torch.no_grad()
    def keys(self, x2: torch.Tensor, boxes=None) -> torch.Tensor:
        """Key embeddings of the whole global batch, L2-normalised: [B*world, D] in rank order. With boxes [B, 4]
        (cutmix), the target's (inside, outside) box embeddings instead (Encoder.embed_boxes): [B*world, 2D].

        Shuffle-BN: a key batch-normalised with the other views of its own batch would let BN statistics leak
        which samples belong together, and the model could find its positive by that leak instead of by
        content. So keys are computed on a random permutation of the global batch spread over the processes;
        in one process, the permuted batch is split into chunks of >= min_shuffle_chunk images."""
        world, B = world_size(), x2.shape[0]
        images, boxes = gather_all(x2), None if boxes is None else gather_all(boxes)   # [B*world, ...]
        perm = torch.randperm(images.shape[0], device=x2.device)
        if world > 1:
            dist.broadcast(perm, src=0)
        mine = perm[rank() * B:(rank() + 1) * B]                                  # [B] rows of the global batch
        chunks = max(1, min(8, B // self.min_shuffle_chunk)) if world == 1 else 1
        encode = lambda rows: (self.target(images[rows])[:, None] if boxes is None                 # [n, 1, D]
                               else torch.stack(self.target.embed_boxes(images[rows], boxes[rows])[1:], dim=1))
        shuffled = torch.cat([encode(rows) for rows in mine.chunk(chunks)])       # [B, 1 or 2, D]
        shuffled = gather_all(F.normalize(shuffled.float(), dim=2).flatten(1))    # [B*world, D or 2D]
        keys = torch.empty_like(shuffled)
        keys[perm] = shuffled                                                     # undo the permutation
        return keys

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, *more):
        """Write keys [n, D] into the ring buffer at the pointer, wrapping around its end; more (cutmix's local and
        global keys, [n, D] each) into queue_local and queue_global at the same slots."""
        n, size = keys.shape[0], self.queue.shape[0]
        if size == 0:
            return
        if n > size:
            raise ValueError(f"the queue ({size}) is smaller than the global batch ({n}); raise --queue-size")
        slots = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        for name, rows in zip(self.queues, (keys, *more)):
            getattr(self, name)[slots] = rows.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, local=None) -> dict:
        """x1: query view, x2: key view [B, 3, S, S]; local: Mosaic, crops or None. mix="flatten" flattens x1 (drawn
        first; the keys stay unmixed, the positives unchanged); "cutmix" adds loss_mix (cutmix_loss)."""
        B, T = x1.shape[0], self.temperature
        queue = self.queue if self.queue.shape[0] else None   # [Q, D]; info_nce reads a normalised copy
        own = rank() * B + torch.arange(B, device=x1.device)                     # my images' rows in `keys`
        query = self.online_view(x1)
        keys = self.keys(x2)                                                      # [B*world, D]
        # L_global = CE([q.K^T, q.queue^T] / T, own index), q = online(x1), K = keys of the global batch
        loss_global = info_nce(self.online(query), keys, own, queue=queue, temperature=T)
        loss_local = torch.zeros((), device=x1.device)
        loss_mix, more_keys = self.cutmix_loss(x1, x2, keys, own) if self.mix == "cutmix" else (loss_local, ())
        if local is not None:
            # L_local = mean over crops c of w_c * CE([z_c.K^T, z_c.queue^T] / T, index of c's source image)
            z, sources, weights = self.online.embed_local(local)                  # [B*M, D]
            loss_local = info_nce(z, keys, rank() * B + sources, weights, queue=queue, temperature=T)
        self.enqueue(keys, *more_keys)
        return self._report(loss_global, loss_local, loss_mix, keys)

    def cutmix_loss(self, x1: torch.Tensor, x2: torch.Tensor, keys: torch.Tensor, own: torch.Tensor):
        """mix-ssl's Approach 1 (eq. 3-7) beside L_original: x1 and x2 [B, 3, S, S] swap one random box each
        (area U[0.25, 0.75]). q^M, q^L, q^G: online(x1m) pooled whole / inside / outside (one pass); k^L, k^G:
        target(x2m) inside / outside (one pass, keys() handling). Returns (lam L_mixed + (1 - lam)(L_L<->G + L_L<->L
        + L_G<->G), (k^L, k^G) to enqueue), each term an InfoNCE with the own image positive: L_mixed (q^M, keys of
        x2, queue), L_L<->L (q^L, k^L, queue_local), L_G<->G (q^G, k^G, queue_global), L_L<->G (q^L, k^G,
        queue_global)."""
        boxes = mixture.random_boxes(x1.shape[0], *x1.shape[2:], 0.25, 0.75, x1.device)
        x1m, x2m = mixture.cutmix(x1, x2, boxes)
        q_mixed, q_local, q_global = self.online.embed_boxes(x1m, boxes)
        k_local, k_global = self.keys(x2m, boxes).chunk(2, dim=1)
        queue, local_queue, global_queue = (getattr(self, name) if len(self.queue) else None for name in self.queues)
        nce = lambda q, k, negatives: info_nce(q, k, own, queue=negatives, temperature=self.temperature)
        return (self.mix_weight * nce(q_mixed, keys, queue) + (1 - self.mix_weight) * (
            nce(q_local, k_global, global_queue) + nce(q_local, k_local, local_queue)
            + nce(q_global, k_global, global_queue)), (k_local, k_global))


class BYOL(_Learner):
    """BYOL with MosRep's local views. Online = trunk -> projector head -> predictor; target = EMA of trunk +
    head (no predictor). Each global view predicts the other's target embedding; each crop predicts both
    target embeddings of its source image."""
    def __init__(self, arch="resnet50", stem="imagenet", dim=256, hidden_dim=4096, roi_size=7, **mixing):
        super().__init__(Encoder(Trunk(arch, stem), hidden_dim, dim, mlp_batch_norm=True, roi_size=roi_size), **mixing)
        self.predictor = mlp(dim, hidden_dim, dim, batch_norm=True)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, local=None) -> dict:
        """x1, x2: the two global views [B, 3, S, S]; local: Mosaic, crops or None. mix="flatten" flattens both online
        views; the targets encode the unmixed x1, x2, and the positives are unchanged."""
        own = torch.arange(x1.shape[0], device=x1.device)
        p1, p2 = (self.predictor(self.online(self.online_view(x))) for x in (x1, x2))  # [B, D] each
        with torch.no_grad():
            z1, z2 = self.target(x1), self.target(x2)                              # [B, D] each
        # L_global = l(p1, z2) + l(p2, z1) with l(p, z) = 2 - 2 cos(p, sg(z)): a sum over the two views,
        # not a mean (a mean halves the gradient at the same lr, a known reproduction trap).
        loss_global = byol_loss(p1, z2, own) + byol_loss(p2, z1, own)
        loss_local = torch.zeros((), device=x1.device)
        if local is not None:
            z, sources, weights = self.online.embed_local(local)                   # [B*M, D]
            p = self.predictor(z)                                                  # [B*M, D]
            # L_local = mean over crops c of w_c * (l(p_c, z1[src_c]) + l(p_c, z2[src_c]))
            loss_local = byol_loss(p, z1, sources, weights) + byol_loss(p, z2, sources, weights)
        return self._report(loss_global, loss_local, torch.zeros_like(loss_global), torch.cat([z1, z2]))
