"""The two objectives MosRep plugs into: InfoNCE (MoCo-v2) and the BYOL cosine loss.

Both take a `targets` index per query, so the same function serves a global view (target = its own
image) and a mosaic crop (target = the image it was cropped from), and optional per-query weights
(the mosaic's sqrt visible area). Both compute in fp32: under fp16 autocast, logits / 0.2 and
exp() overflow long before a ResNet does. Imports only torch.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def _weighted_mean(per_query: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    if weights is None:
        return per_query.mean()
    return (weights.float() * per_query).mean()


def info_nce(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor,
             queue: Optional[torch.Tensor], temperature: float,
             weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Contrastive loss of each query against all keys and the queue.

    queries [N, D] and keys [K, D] are L2-normalised; queue [Q, D] (or None) holds past keys, all
    negatives. logits = [queries @ keys.T, queries @ queue.T] / temperature, [N, K+Q]; the positive
    of query n is column targets[n] (< K). Returns mean(weights * cross-entropy), a scalar.
    """
    with torch.autocast(queries.device.type, enabled=False):   # else matmuls run in bf16/fp16 anyway
        queries, keys = queries.float(), keys.float()
        logits = queries @ keys.T                                               # [N, K]
        if queue is not None:
            logits = torch.cat([logits, queries @ queue.float().T], dim=1)      # [N, K+Q]
        per_query = F.cross_entropy(logits / temperature, targets, reduction="none")  # [N]
        return _weighted_mean(per_query, weights)


def byol_loss(predictions: torch.Tensor, target_embeddings: torch.Tensor, targets: torch.Tensor,
              weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """BYOL regression loss 2 - 2 cos(p_n, sg(z[targets[n]])), weighted mean over n.

    predictions [N, D] from the online branch, target_embeddings [K, D] from the target branch
    (no gradient reaches them), targets [N] indices into target_embeddings. Ranges over [0, 4].
    """
    with torch.autocast(predictions.device.type, enabled=False):
        p = F.normalize(predictions.float(), dim=1)                             # [N, D]
        z = F.normalize(target_embeddings.detach().float(), dim=1)[targets]     # [N, D]
        return _weighted_mean(2 - 2 * (p * z).sum(dim=1), weights)
