"""MIL heads: a bag of patch features in, class logits and one attention weight per patch out.

`abmil` is the gated attention MIL of Ilse, Tomczak & Welling (ICML 2018): patch features are
embedded, a gated attention branch (tanh x sigmoid) scores each patch, a softmax over the bag
turns scores into weights that sum to 1, and a linear classifier reads the weighted mean
embedding. Because that classifier is linear, each class logit splits exactly into a sum of
per-patch contributions (see `contributions`), which `explain` draws.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    architecture: str = "abmil"
    in_dim: int = 1280
    n_classes: int = 2
    hidden_dim: int = 256
    attention_dim: int = 128
    dropout: float = 0.25

    def to_dict(self) -> dict:
        return asdict(self)


class GatedAttentionMIL(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(config.in_dim, config.hidden_dim), nn.ReLU(), nn.Dropout(config.dropout))
        self.attention_v = nn.Linear(config.hidden_dim, config.attention_dim)
        self.attention_u = nn.Linear(config.hidden_dim, config.attention_dim)
        self.attention_w = nn.Linear(config.attention_dim, 1)
        self.classifier = nn.Linear(config.hidden_dim, config.n_classes)

    def attend(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) features -> (N, H) patch embeddings and (N,) attention weights summing to 1."""
        h = self.embed(features)
        scores = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))).squeeze(-1)
        return h, torch.softmax(scores, dim=0)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) -> (C,) logits, (N,) attention."""
        h, attention = self.attend(features)
        return self.classifier(attention @ h), attention

    def contributions(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C): patch i's share a_i * (W_c . h_i) of class c's logit; rows sum to logit - bias."""
        h, attention = self.attend(features)
        return attention[:, None] * (h @ self.classifier.weight.T)


MODELS: dict[str, type[nn.Module]] = {"abmil": GatedAttentionMIL}


def build_model(config: ModelConfig) -> nn.Module:
    return MODELS[config.architecture](config)
