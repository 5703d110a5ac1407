"""One training step and one evaluation, shared by every caller of the engine."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainers.layers import clip_binary_weights
from trainers.threads import governor


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> float:
    """Forward, backward, update, clip latent weights; returns the batch's mean loss.
    Between steps `trainers.threads.governor` drops torch to one thread while the process
    waits for CPU (other busy processes on the cores)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    optimizer.step()
    clip_binary_weights(model)
    value = loss.item()
    governor.after_step()
    return value


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500
             ) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (fraction) over (x, y), in evaluation mode."""
    model.eval()
    total_loss, correct = 0.0, 0
    for s in range(0, x.shape[0], batch_size):
        logits = model(x[s:s + batch_size]).float()
        target = y[s:s + batch_size]
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    n = max(1, x.shape[0])
    return total_loss / n, correct / n
