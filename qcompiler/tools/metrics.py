"""Float vs quantized at the logits: the next-token measures every tool reports, computed one way.

KL is ``KL(p_float || p_quant)`` of the next-token distributions (softmax over the last dimension, in
float64); top-1 agreement is whether both models' argmax agree; the negative log-likelihood is of the
given targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_divergence(logits_ref: torch.Tensor, logits_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position (all leading dims flattened): ``KL(p_ref || p_q)`` and whether the argmaxes agree."""
    logp_f = F.log_softmax(logits_ref.double().reshape(-1, logits_ref.shape[-1]), -1)
    logp_q = F.log_softmax(logits_q.double().reshape(-1, logits_q.shape[-1]), -1)
    kl = (logp_f.exp() * (logp_f - logp_q)).sum(-1)
    agree = logp_f.argmax(-1) == logp_q.argmax(-1)
    return kl, agree


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of ``targets [T]`` under ``logits [T, V]`` (float64)."""
    logp = F.log_softmax(logits.double(), -1)
    return -logp.gather(-1, targets[:, None]).sum()
