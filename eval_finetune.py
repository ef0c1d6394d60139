"""Fine-tuning on a labelled subset, SimCLR's semi-supervised protocol, which BYOL follows (`torchrun
--nproc_per_node 8 eval_finetune.py --weights backbone.pth --data imagenet/train --label-list 10percent.txt`): the
pre-trained trunk plus a new, zero-initialised linear classifier, every weight trained; Nesterov SGD, momentum 0.9,
no weight decay, lr --lr x global batch / 256 on a cosine to 0 without warm-up; RandomResizedCrop + flip only; the
top-1 and top-5 of the last epoch on the val split, scored once (no selection). --save DIR writes, at the end,
finetuned.pth: the network as a torchvision ResNet state_dict, fc included, CPU tensors. No checkpoints: a stopped
fine-tune restarts. A script of its own, not a mode of eval_linear.py: the probe trains many heads at once on a
frozen trunk, this one network end to end (DDP, SyncBatchNorm on GPUs, AMP); both take the same label subsets and
views (eval_linear's helpers).
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn

from eval_knn import accuracy, add_common_args, build_trunk, eval_splits, extract_features, one_line_errors, \
    process_batch, shard_loader, write_json
from eval_linear import add_label_args, epoch_loader, label_subset
from runtime import default_amp, distributed, rank, world_size


def parse_args():
    parser = add_common_args(argparse.ArgumentParser(description="fine-tuning of the whole network on labelled images"))
    parser.add_argument("--lr", type=float, default=0.05, help="per 256 images: the peak lr is lr x --batch-size / 256")
    parser.add_argument("--epochs", type=int, help="default 60 when the labelled images are under 5 %% of train "
                        "(SimCLR's 1 %%), else 30 (its 10 %%)")
    parser.add_argument("--amp", choices=["bf16", "fp16", "off"], help="as train.py: CPU off; bf16 from compute "
                        "capability 8, else fp16")
    parser.add_argument("--save", help="folder for finetuned.pth (written at the end)")
    add_label_args(parser)
    args = parser.parse_args()
    if args.lr <= 0 or (args.epochs is not None and args.epochs < 1):
        parser.error("--lr and --epochs must be positive")
    if args.amp == "fp16" and not torch.cuda.is_available():
        parser.error("--amp fp16 needs a GPU; use --amp bf16 or off on CPU")
    if process_batch(args.batch_size) < 2:   # BatchNorm cannot train on one image
        parser.error(f"--batch-size {args.batch_size} leaves a process under 2 images; raise it")
    return args


def fine_tune(args, model, loader, device, amp: str):
    """Train model (the classifier, under DDP with several processes) for --epochs. Rank 0 prints progress every
    10 s."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, nesterov=True, weight_decay=0.0)
    scaler = torch.amp.GradScaler(enabled=amp == "fp16")
    autocast = torch.autocast(device.type, torch.float16 if amp == "fp16" else torch.bfloat16, enabled=amp != "off")
    peak_lr, total, begun = args.lr * args.batch_size / 256, args.epochs * len(loader), time.time()
    shown = begun
    for epoch in range(args.epochs):
        loader.sampler.set_epoch(epoch)
        model.train()
        for step, (images, labels) in enumerate(loader, epoch * len(loader) + 1):   # steps counted from 1
            optimizer.param_groups[0]["lr"] = lr = peak_lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / total))
            with autocast:
                loss = nn.functional.cross_entropy(model(images.to(device, non_blocking=True)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if rank() == 0 and (time.time() - shown > 10 or step == total):
                shown, rate = time.time(), step * args.batch_size / (time.time() - begun)
                print(f"epoch {epoch + 1}/{args.epochs} step {step}/{total} loss {loss.item():.4f} lr {lr:.4g} "
                      f"{rate:.0f} img/s eta {(total - step) * args.batch_size / rate / 60:.1f} min", flush=True)
        if not torch.isfinite(loss):
            raise SystemExit(f"error: non-finite loss in epoch {epoch + 1}; lower --lr, or use --amp bf16 or off")


def main():
    args, start = parse_args(), time.time()
    with distributed() as device, one_line_errors():
        net = build_trunk(args, device)   # torchvision's ResNet keys: with fc, the whole network
        train_set, val_set, num_classes = eval_splits(args, random_crop=True)
        labelled = label_subset(args, train_set)
        args.epochs = args.epochs or (60 if len(labelled) < 0.05 * len(train_set) else 30)
        net.fc = nn.Linear(net.out_channels, num_classes).to(device)
        for parameter in net.fc.parameters():   # SimCLR's zero_init_logits_layer
            nn.init.zeros_(parameter)
        classifier = nn.Sequential(net, nn.AdaptiveAvgPool2d(1), nn.Flatten(), net.fc)
        if world_size() > 1 and device.type == "cuda":   # the global batch's BN statistics, as in one process
            classifier = nn.SyncBatchNorm.convert_sync_batchnorm(classifier)
        model = nn.parallel.DistributedDataParallel(classifier, [device] if device.type == "cuda" else None) \
            if world_size() > 1 else classifier
        loader = epoch_loader(labelled, process_batch(args.batch_size), args, device)
        os.makedirs(args.save or ".", exist_ok=True)
        fine_tune(args, model, loader, device, args.amp or default_amp(device))
        for buffer in net.buffers() if world_size() > 1 else ():   # rank 0's BN statistics: what it exports
            torch.distributed.broadcast(buffer, 0)
        classifier.pooled, classifier.out_channels = classifier.forward, num_classes   # extract_features: logits
        logits, labels = extract_features(classifier, shard_loader(val_set, process_batch(args.batch_size),
                                                                   args.workers), device, "val")
        top1, top5 = accuracy(logits, labels)
        if rank() == 0:
            print(f"fine-tuned on {len(labelled)} labelled images, {args.epochs} epochs, peak lr "
                  f"{args.lr * args.batch_size / 256:.4g}: val top-1 {top1:.2f} %, top-5 {top5:.2f} % ({len(labels)} "
                  f"images, the last epoch, scored once), {time.time() - start:.0f} s")
            if args.save:
                torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, f"{args.save}/finetuned.pth")
            write_json(args, num_train=len(labelled), num_val=len(labels), num_classes=num_classes, top1=top1,
                       top5=top5, selection="none: the last epoch, val scored once")


if __name__ == "__main__":
    main()
