"""A plain Ilse-style attention-MIL reference, the yardstick of benchmarks/panel.py.

Gated attention MIL as in Ilse, Tomczak & Welling (ICML 2018) and their public recipe:
one fully connected embedding layer (128, ReLU), gated attention (64), a linear classifier
with a sigmoid, binary cross-entropy, Adam (lr 5e-4, betas 0.9/0.999, weight decay 1e-4),
one bag per step, fp32, a fixed number of epochs, no validation split, raw features (no
standardisation). Written here from the paper, deliberately independent of milcli's code.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class GatedAttentionMIL(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 128, attention: int = 64) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.v = nn.Linear(hidden, attention)
        self.u = nn.Linear(hidden, attention)
        self.w = nn.Linear(attention, 1)
        self.classifier = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) instances -> bag probability (scalar), (N,) attention."""
        h = self.embed(x)
        a = torch.softmax(self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1), dim=0)
        return torch.sigmoid(self.classifier(a @ h)).squeeze(-1), a


def fit_reference(bags: list[tuple[np.ndarray, int]], seed: int, epochs: int = 40, lr: float = 5e-4,
                  weight_decay: float = 1e-4) -> GatedAttentionMIL:
    torch.manual_seed(seed)
    model = GatedAttentionMIL(bags[0][0].shape[1])
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    tensors = [(torch.from_numpy(np.asarray(x, dtype=np.float32)), torch.tensor(float(y))) for x, y in bags]
    order = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        for i in order.permutation(len(tensors)):
            x, y = tensors[i]
            p, _ = model(x)
            loss = nn.functional.binary_cross_entropy(p.clamp(1e-5, 1 - 1e-5), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


@torch.inference_mode()
def predict_reference(model: GatedAttentionMIL, x: np.ndarray) -> tuple[float, np.ndarray]:
    """Bag probability of the positive class and the instances' attention."""
    p, a = model(torch.from_numpy(np.asarray(x, dtype=np.float32)))
    return float(p), a.numpy()
