"""The two objectives MosRep plugs into: InfoNCE (MoCo-v2) and the BYOL cosine loss. Imports only torch.

Both take their inputs the same way:
- queries [N, D]: what the online branch makes of each view or crop (MoCo: its embedding; BYOL: its
  prediction), not normalised: each loss L2-normalises its own inputs.
- keys [K, D]: what the target branch makes of the global views. No gradient reaches them.
- positives [N]: for each query, the row of `keys` it must match: its own image for a global view,
  the image it was cut from for a crop (mosaic.Mosaic.sources, plus rank * B under DDP).
- weights [N] or None: per-query loss weights (a mosaic crop's sqrt visible area).
Both compute in fp32 whatever the autocast dtype: under fp16, logits / 0.2 and exp() overflow long
before a ResNet does. Each returns a scalar, the weighted mean over queries.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def info_nce(queries: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor,
             weights: Optional[torch.Tensor] = None, queue: Optional[torch.Tensor] = None,
             temperature: float = 0.2) -> torch.Tensor:
    """Contrastive loss of each query against all keys and the queue [Q, D] or None (negatives only): logits =
    [q @ keys.T, q @ queue.T] / temperature, [N, K+Q]; query n's positive is column positives[n] (< K). Returns
    mean(weights * cross-entropy)."""
    with torch.autocast(queries.device.type, enabled=False):   # else the matmuls run in bf16/fp16 anyway
        q = F.normalize(queries.float(), dim=1)                                 # [N, D]
        k = F.normalize(keys.detach().float(), dim=1)                           # [K, D]
        logits = q @ k.T                                                        # [N, K]
        if queue is not None:
            logits = torch.cat([logits, q @ F.normalize(queue.detach().float(), dim=1).T], dim=1)  # [N, K+Q]
        per_query = F.cross_entropy(logits / temperature, positives, reduction="none")           # [N]
        return (per_query if weights is None else weights.float() * per_query).mean()


def byol_loss(queries: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor,
              weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """BYOL's regression loss 2 - 2 cos(q_n, sg(keys[positives[n]])), weighted mean over n; in [0, 4]."""
    with torch.autocast(queries.device.type, enabled=False):
        q = F.normalize(queries.float(), dim=1)                                 # [N, D]
        k = F.normalize(keys.detach().float(), dim=1)[positives]                # [N, D]
        per_query = 2 - 2 * (q * k).sum(dim=1)                                 # [N]
        return (per_query if weights is None else weights.float() * per_query).mean()
