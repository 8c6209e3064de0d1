"""MIL heads: padded batches of bags in, class logits and one weight per patch out.

Every head reads (B, N, D) features with a (B, N) mask (True = a real patch; bags are padded
to the batch's largest) and returns `MILOutput`. A new head is one MILHead subclass added to MODELS.
Features are scaled first with statistics of the training patches (config.SCALINGS), which
the head holds as buffers (so they travel in the model file and predict/explain apply them).
Every head also scores each patch for each class (`instance_scores`, probabilities), the
patch-level answer that localises; attention only says what the bag pooling weighed.

- `abmil`: gated attention MIL (Ilse, Tomczak & Welling, ICML 2018): patch embeddings, a
  tanh x sigmoid attention branch, a masked softmax over the bag, a linear classifier on the
  attention-weighted mean. Because the classifier is linear, each class logit splits exactly
  into per-patch contributions a_i (W_c . h_i), which `explain` draws. A patch classifier on
  the same embeddings is trained jointly through the bag's most convincing patch (weight
  `instance_loss`; max-pooling MIL as in mi-Net, Wang et al. 2018): its per-patch
  probabilities are the instance scores.
- `abmil-plain`: the same with the ungated (tanh only) attention.
- `transformer-abmil`: abmil after one self-attention layer that puts each patch in the
  context of its bag.
- `mean`, `max`: pooling baselines (mean embedding; max over per-patch class scores).
- `noisy-and`: Kraus et al. 2016: per-patch class probabilities, their bag mean passed through
  a soft AND with a learnable threshold per class.
- `clam-sb`: gated attention plus CLAM's instance-clustering loss: the k most and least
  attended patches of the bag's true class get pseudo-labels for a per-class patch classifier.
- `clam-mb`: CLAM's multi-branch form: one attention branch and bag classifier per class.
- `dsmil`: dual-stream MIL: a max-pooled patch classifier finds each class's critical patch,
  every patch attends to it, and the two streams' logits are averaged.
- `transmil`: a class token and the patches through two self-attention layers with TransMIL's
  convolutional position encoding.
- `protomil`: learned prototypes, projected onto real training patches once trained; the bag
  pools each patch's similarity to each prototype with gated attention.
- `kme`: the MI-kernel (Gärtner et al. 2002) made linear: each bag is the mean of its patches'
  random Fourier features (an RBF kernel's mean embedding, Rahimi & Recht 2007), scaled to unit
  length, read by an L2-regularised logistic regression fitted in closed form (no epochs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from mil_cli.config import AUTO_ARCHITECTURE, DEFAULT_INSTANCE_LOSS, FAMILY_JOIN, TASK_NAMES, ModelConfig
from mil_cli.errors import MilcliError


@dataclass
class MILOutput:
    logits: torch.Tensor      # (B, C) the prediction (log-probabilities where streams are averaged)
    attention: torch.Tensor   # (B, N) patch weights, 0 on padding, summing to 1 per bag
    embeddings: torch.Tensor  # (B, N, H) patch embeddings
    pooled_logits: torch.Tensor | None = None  # (B, C) the pooled classifier's own logits (default: logits)
    strongest: torch.Tensor | None = None      # (B, 1 or C) abmil, dsmil: the patch classifier's highest logits
    class_attention: torch.Tensor | None = None  # (B, N, C) clam-mb, dsmil: one attention per class

    def __post_init__(self) -> None:
        if self.pooled_logits is None:
            self.pooled_logits = self.logits


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the bag axis of (B, N) or per class of (B, N, C) scores that gives padding
    exactly zero weight."""
    return torch.softmax(without_padding(scores, mask), dim=1)


def without_padding(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N) or (B, N, C) patch values with padding at -inf: out of every softmax, max and argmax."""
    return values.masked_fill(~(mask if values.dim() == 2 else mask[..., None]), float("-inf"))


def pick_class(per_class: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(B, N, C) per-class patch values -> (B, N): those of each bag's class in `classes` (B,)."""
    return per_class.gather(2, classes[:, None, None].expand(-1, per_class.shape[1], 1)).squeeze(-1)


def whole_bag(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One bag (N, D) as a batch of one: (1, N, D) features and an all-true (1, N) mask."""
    return features[None], torch.ones(1, len(features), dtype=torch.bool, device=features.device)


class MILHead(nn.Module):
    """Shared parts: the patch embedding, the single-bag helpers and the loss."""

    additive = True  # patch_scores rows sum to the pooled classifier's logits minus its bias
    tasks: tuple[str, ...] = ("classification",)  # heads whose output is a linear readout also regress and rank
    max_instance_loss = False  # abmil-like heads: a max-pooled patch classifier whose loss share --instance-loss sets
    closed_form = False  # heads fitted in one step (fit_closed_form) instead of by epochs

    @classmethod
    def trains_patch_classifier(cls, task: str) -> bool:
        """Whether heads of this kind learning `task` have the max-pooled patch classifier
        (classification only), so that --instance-loss and the training recipes apply."""
        return cls.max_instance_loss and task == "classification"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("feature_mean", torch.zeros(config.in_dim))
        self.register_buffer("feature_std", torch.ones(config.in_dim))
        self.register_buffer("feature_clip", torch.tensor(float("inf")))
        self.embed = nn.Sequential(nn.Linear(config.in_dim, config.hidden_dim), nn.ReLU(), nn.Dropout(config.dropout))

    def set_standardisation(self, mean: torch.Tensor, std: torch.Tensor, clip: float) -> None:
        """z = (x - mean) / std, clipped to +-clip (`std` is per dimension, or one pooled sd in
        every place). Per-dimension z-scores are clipped: a rarely non-zero dimension (a sparse
        feature, a pixel that is almost always blank) has a tiny std, and its rare values
        would otherwise reach z of 100 and swamp the embedding."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)
        self.feature_clip.fill_(clip)

    def embed_patches(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(..., D) raw features -> (..., H) patch embeddings, scaled first. `mask`
        ((B, N), true on real patches) is for heads whose embedding mixes a bag's patches."""
        z = (features - self.feature_mean) / self.feature_std
        return self.embed(z.clamp(-self.feature_clip, self.feature_clip))

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> MILOutput:
        raise NotImplementedError

    def bag(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One bag (N, D) -> (C,) logits, (N,) attention."""
        out = self(*whole_bag(features))
        return out.logits[0], out.attention[0]

    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C) per-patch evidence for each class. For heads whose classifier is linear in
        the pooled embedding, rows sum to that classifier's logits (`pooled_logits`) minus its
        bias."""
        raise NotImplementedError

    def instance_scores(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C) probability of each class for each patch of one bag, judged alone (other
        tasks: the head's raw outputs for the patch alone, which the task converts)."""
        raise NotImplementedError

    def alone(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-patch output logits -> instance scores: class probabilities for classifiers."""
        return torch.softmax(logits, -1) if self.config.task == "classification" else logits

    def loss(self, out: MILOutput, targets: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(out.logits, targets, weight=weight)

    def fit_closed_form(self, bags: list, weight: torch.Tensor | None) -> None:
        """closed_form heads: fit on the training bags (training.Bag) at once, `weight` the
        per-class loss weights (None: unweighted)."""
        raise NotImplementedError

    def after_training(self, bags: list, refit: Callable[[list[nn.Parameter], int], None]) -> dict:
        """A last step once trained on `bags` (training.Bag), which may train some parameters
        again through `refit(parameters, epochs)`. Returns plain data for the model file."""
        return {}


class AttentionMIL(MILHead):
    gated = True
    max_instance_loss = True  # the jointly trained, max-pooled patch classifier (classification only)
    tasks = ("classification", "regression", "survival")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.max_instance_loss = self.trains_patch_classifier(config.task)
        self.attention_v = nn.Linear(config.hidden_dim, config.attention_dim)
        self.attention_u = nn.Linear(config.hidden_dim, config.attention_dim) if self.gated else None
        self.attention_w = nn.Linear(config.attention_dim, 1)
        self.classifier = nn.Linear(config.hidden_dim, config.n_classes)
        if self.max_instance_loss:  # binary: one logit, the positive class's; else one per class
            self.instance_classifier = nn.Linear(config.hidden_dim, 1 if config.n_classes == 2 else config.n_classes)

    def attention_scores(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, H) embeddings -> (B, N, branches) unnormalised attention."""
        branch = torch.tanh(self.attention_v(h))
        if self.attention_u is not None:
            branch = branch * torch.sigmoid(self.attention_u(h))
        return self.attention_w(branch)

    def attend(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch embeddings and pooling weights. Classes: attention, a softmax over the bag.
        Values and risks: a sigmoid gate per patch over the bag's size, a gated mean. A value
        or a risk often grows with how much of a tissue there is, and softmax attention, once
        it focuses, cannot tell a bag 5 % tumour from one 50 % tumour; the gated mean can and
        still chooses which patches count (tumour-share hazards: out-of-fold C-index 0.70 with
        softmax attention, 0.76 gated; tests/test_tasks.py)."""
        h = self.embed_patches(features, mask)
        scores = self.attention_scores(h).squeeze(-1)
        if self.config.task == "classification":
            return h, masked_softmax(scores, mask)
        return h, torch.sigmoid(scores) * mask / mask.sum(1, keepdim=True).clamp(min=1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> MILOutput:
        """With the patch classifier, the prediction averages two streams' class probabilities
        (as DSMIL does): the attention-pooled classifier's, and the one the bag's most
        convincing patch gives. The max stream is what a key-instance task needs, the
        attention stream what a diffuse one needs (benchmarks/panel.py)."""
        h, weights = self.attend(features, mask)
        pooled_logits = self.classifier(torch.einsum("bn,bnh->bh", weights, h))
        attention = weights / weights.sum(1, keepdim=True).clamp(min=1e-12)  # the gates of a gated mean, as shares
        if not self.max_instance_loss:
            return MILOutput(pooled_logits, attention, h)
        if self.config.instance_loss == 0:  # the patch classifier as a probe: it learns from the embedding
            strongest = without_padding(self.instance_classifier(h.detach()), mask).amax(dim=1)  # but shapes nothing
            return MILOutput(pooled_logits, attention, h, pooled_logits, strongest)
        strongest = without_padding(self.instance_classifier(h), mask).amax(dim=1)
        probs = (torch.softmax(pooled_logits, -1) + self.patch_probabilities(strongest)) / 2
        return MILOutput(torch.log(probs.clamp(min=1e-12)), attention, h, pooled_logits, strongest)

    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        h, attention = self.attend(*whole_bag(features))
        return attention[0, :, None] * (h[0] @ self.classifier.weight.T)

    def instance_scores(self, features: torch.Tensor) -> torch.Tensor:
        h = self.embed_patches(features)
        if not self.max_instance_loss:  # another task: the bag readout of the patch alone (gated)
            gate, bias = torch.sigmoid(self.attention_scores(h)), self.classifier.bias
            return self.alone(gate * (self.classifier(h) - bias) + bias)
        return self.patch_probabilities(self.instance_classifier(h))

    def patch_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The patch classifier's logits -> class probabilities: binary models have one
        (positive-class) logit, others one per class."""
        if self.config.n_classes == 2:
            positive = torch.sigmoid(logits)
            return torch.cat([1 - positive, positive], dim=-1)
        return torch.softmax(logits, -1)

    def loss(self, out: MILOutput, targets: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """Bag loss plus the patch classifier's, through the bag's most convincing patch. Binary
        (the MIL assumption): a bag is positive when one patch is, so the highest positive
        logit must say whether the bag is positive; negative patches in positive bags are left
        free. With more classes, the per-class maxima must name the bag's class. With
        `instance_loss` 0 the patch classifier is only a probe (trained on a detached
        embedding, out of the prediction): its patch scores still localise, while the
        embedding and the prediction are the attention stream's alone."""
        bag_loss = F.cross_entropy(out.pooled_logits, targets, weight=weight)
        w = self.config.instance_loss
        if self.config.n_classes == 2:
            per_bag = weight[targets] if weight is not None else None
            instance_loss = F.binary_cross_entropy_with_logits(out.strongest[:, 0], targets.float(), weight=per_bag)
        else:
            instance_loss = F.cross_entropy(out.strongest, targets, weight=weight)
        if w == 0:
            return bag_loss + instance_loss  # the probe's gradient reaches only the patch classifier
        return (1 - w) * bag_loss + w * instance_loss


class PlainAttentionMIL(AttentionMIL):
    gated = False


class TransformerAttentionMIL(AttentionMIL):
    """ABMIL with each patch first put in the context of its bag: one pre-norm self-attention
    layer (TransMIL's, 8 heads, with a residual) over the bag's patch embeddings, then gated
    attention pooling and the patch classifier as in abmil. Padding is masked out of the keys,
    so it cannot change a real patch's embedding. Exact attention: its cost grows with the
    square of the patches per bag (training samples at most --max-patches)."""

    heads = 8

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.context = SelfAttention(config.hidden_dim, self.heads)

    def embed_patches(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = super().embed_patches(features)
        if h.ndim == 2:  # one whole bag
            return self.context(h[None])[0][0]
        return self.context(h, mask)[0]


class MeanMIL(MILHead):
    tasks = AttentionMIL.tasks

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.classifier = nn.Linear(config.hidden_dim, config.n_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> MILOutput:
        h = self.embed_patches(features)
        weights = mask.float() / mask.sum(1, keepdim=True).clamp(min=1)
        return MILOutput(self.classifier(torch.einsum("bn,bnh->bh", weights, h)), weights, h)

    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        return (self.embed_patches(features) @ self.classifier.weight.T) / len(features)

    def instance_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.alone(self.classifier(self.embed_patches(features)))


class InstanceScoreMIL(MILHead):
    """Heads that score every patch for every class, then pool the scores."""

    additive = False  # patch_scores are the per-patch class scores that get pooled

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.instance_classifier = nn.Linear(config.hidden_dim, config.n_classes)

    def pool(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> MILOutput:
        h = self.embed_patches(features)
        scores = self.instance_classifier(h)  # (B, N, C)
        logits = self.pool(scores, mask)
        # weight of a patch: how strongly it argues for the predicted class, softmaxed over the bag
        return MILOutput(logits, masked_softmax(pick_class(scores, logits.argmax(1)), mask), h)

    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.instance_classifier(self.embed_patches(features))

    def instance_scores(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.patch_scores(features))


class MaxMIL(InstanceScoreMIL):
    def pool(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return without_padding(scores, mask).amax(dim=1)


class NoisyAndMIL(InstanceScoreMIL):
    """P_c = (s(a(m_c - b_c)) - s(-a b_c)) / (s(a(1 - b_c)) - s(-a b_c)), m_c the bag's mean
    patch probability for class c, s the sigmoid, a a fixed slope, b_c a learnt threshold."""

    slope = 10.0

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.threshold = nn.Parameter(torch.zeros(config.n_classes))  # b = sigmoid(threshold) in (0, 1)

    def pool(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.float() / mask.sum(1, keepdim=True).clamp(min=1)
        mean = torch.einsum("bn,bnc->bc", weights, torch.sigmoid(scores))
        b, a = torch.sigmoid(self.threshold), self.slope
        low, high = torch.sigmoid(-a * b), torch.sigmoid(a * (1 - b))
        probability = (torch.sigmoid(a * (mean - b)) - low) / (high - low)
        return torch.log(probability.clamp(1e-6, 1.0))  # log-probabilities serve as logits


class ClamSingleBranch(AttentionMIL):
    """Gated attention + CLAM-SB's instance loss: for the bag's true class, its k most attended
    patches are pseudo-positive and its k least attended pseudo-negative for a 2-way patch
    classifier of that class. Bags with fewer than 2 patches skip it; k shrinks to fit."""

    max_instance_loss = False  # CLAM's own instance loss instead
    tasks = MILHead.tasks      # its instance loss needs a class

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.instance_classifiers = nn.ModuleList(nn.Linear(config.hidden_dim, 2) for _ in range(config.n_classes))

    def instance_scores(self, features: torch.Tensor) -> torch.Tensor:
        h = self.embed_patches(features)
        return torch.stack([torch.softmax(c(h), -1)[:, 1] for c in self.instance_classifiers], dim=1)

    def branch_attention(self, out: MILOutput, targets: torch.Tensor) -> torch.Tensor:
        """(B, N) the attention whose extremes give the pseudo-labels: the one branch here."""
        return out.attention

    def loss(self, out: MILOutput, targets: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        bag_loss = F.cross_entropy(out.logits, targets, weight=weight)
        branch = self.branch_attention(out, targets)
        instance_losses = []
        for b in range(len(targets)):
            n = int(mask[b].sum())
            k = min(self.config.instance_k, n // 2)
            if k < 1:
                continue
            attention = branch[b, :n]
            picked = torch.cat([attention.topk(k).indices, (-attention).topk(k).indices])
            pseudo = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(targets.device)
            logits = self.instance_classifiers[int(targets[b])](out.embeddings[b, picked])
            instance_losses.append(F.cross_entropy(logits, pseudo))
        if not instance_losses:
            return bag_loss
        w = self.config.instance_weight
        return (1 - w) * bag_loss + w * torch.stack(instance_losses).mean()


class ClamMultiBranch(ClamSingleBranch):
    """CLAM-MB (Lu et al., Nat. Biomed. Eng. 2021): one gated attention branch and one bag
    classifier per class; class c's logit reads the embedding pooled with class c's attention.
    The instance loss is CLAM's in-class one, on the true class's own branch. The attention
    reported is the predicted class's."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.attention_w = nn.Linear(config.attention_dim, config.n_classes)
        # classifier.weight[c] . pooled_c + bias[c]: CLAM-MB's per-class bag classifiers in one layer

    def attend_per_class(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed_patches(features)
        return h, masked_softmax(self.attention_scores(h), mask)  # (B, N, C), each class's weights summing to 1

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> MILOutput:
        h, attention = self.attend_per_class(features, mask)
        pooled = torch.einsum("bnc,bnh->bch", attention, h)
        logits = (pooled * self.classifier.weight).sum(-1) + self.classifier.bias
        return MILOutput(logits, pick_class(attention, logits.argmax(1)), h, class_attention=attention)

    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        h, attention = self.attend_per_class(*whole_bag(features))
        return attention[0] * (h[0] @ self.classifier.weight.T)

    def branch_attention(self, out: MILOutput, targets: torch.Tensor) -> torch.Tensor:
        return pick_class(out.class_attention, targets)


class DualStreamMIL(MILHead):
    """DSMIL (Li, Li & Eliceiri, CVPR 2021). Stream one: a patch classifier, max-pooled per
    class, finds each class's critical patch. Stream two: every patch attends to the critical
    patch (softmax over the bag of <q_i, q_m> / sqrt(d), queries from a small MLP) and the
    per-class attention-pooled value vectors go through one linear bag classifier (DSMIL's
    Conv1d over classes). The prediction averages the two streams' logits, as DSMIL does; each
    stream is trained by its own cross-entropy. Contributions: the bag classifier is linear in
    the pooled values, so its logits split exactly into per-patch parts."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        c, hidden, q = config.n_classes, config.hidden_dim, config.attention_dim
        self.instance_classifier = nn.Linear(hidden, c)
        self.query = nn.Sequential(nn.Linear(hidden, q), nn.ReLU(), nn.Linear(q, q), nn.Tanh())
        self.value = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(hidden, hidden))
        self.classifier = nn.Linear(c * hidden, c)

    def streams(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Embeddings, each class's highest patch logit (B, C), attention to each class's
        critical patch (B, N, C) and values (B, N, H)."""
        h = self.embed_patches(features)
        patch_logits = without_padding(self.instance_classifier(h), mask)
        strongest, critical = patch_logits.max(dim=1)                                        # (B, C) each
        q = self.query(h)
        q_critical = q.gather(1, critical[..., None].expand(-1, -1, q.shape[-1]))            # (B, C, Q)
        scores = torch.einsum("bnq,bcq->bnc", q, q_critical) / q.shape[-1] ** 0.5
        return h, strongest, masked_softmax(scores, mask), self.value(h)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> MILOutput:
        h, strongest, attention, values = self.streams(features, mask)
        pooled = torch.einsum("bnc,bnh->bch", attention, values)
        bag_logits = self.classifier(pooled.flatten(1))
        logits = (bag_logits + strongest) / 2
        return MILOutput(logits, pick_class(attention, logits.argmax(1)), h, bag_logits, strongest, attention)

    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Patch i's part of the bag classifier's logit c: sum over classes k of
        attention_ik (W_ck . v_i)."""
        _, _, attention, values = self.streams(*whole_bag(features))
        c = self.config.n_classes
        weight = self.classifier.weight.view(c, c, -1)                     # (C out, C in, H)
        return torch.einsum("nk,ckh,nh->nc", attention[0], weight, values[0])

    def instance_scores(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.instance_classifier(self.embed_patches(features)), -1)

    def loss(self, out: MILOutput, targets: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return (F.cross_entropy(out.pooled_logits, targets, weight=weight)
                + F.cross_entropy(out.strongest, targets, weight=weight)) / 2


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with a residual, TransMIL's layer (it has no MLP).
    Exact attention through scaled_dot_product_attention, which does not hold the N x N
    matrix on backends with a memory-efficient kernel; keys at padding are left out."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, D) tokens (`mask` (B, S): true on real ones) -> the same updated, and the
        first token's attention over all tokens (B, S), averaged over heads."""
        q, k, v = self.qkv(self.norm(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        keys = None if mask is None or bool(mask.all()) else mask[:, None, None, :]
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=keys).transpose(1, 2).flatten(2)
        scores = q[:, :, :1] @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        first = torch.softmax(scores if keys is None else scores.masked_fill(~keys, float("-inf")), dim=-1)
        return x + self.out(mixed), first[:, :, 0].mean(1)


class PositionEncoding(nn.Module):
    """TransMIL's PPEG: patch tokens laid on a square grid, plus three depthwise convolutions
    (7, 5, 3) of it; the class token passes through."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        grid = x[:, 1:].transpose(1, 2).unflatten(2, (side, side))
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([x[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(MILHead):
    """TransMIL (Shao et al., NeurIPS 2021): a class token and the patch embeddings go through
    two self-attention layers with TransMIL's position encoding between them; the class token's
    output is classified. The tokens, in bag order, fill the smallest square grid (the first
    ones repeated), as TransMIL does. Exact attention replaces its Nystrom approximation.
    Attention reported: the class token's over the patches in the last layer (heads
    averaged; a repeated token's share goes to its patch). Patch scores: each patch's output
    token read by the bag classifier. The bags of a padded batch go through one by one, so
    padding cannot change an answer."""

    additive = False
    heads = 8
    tasks = AttentionMIL.tasks

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        dim = config.hidden_dim
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.layer1 = SelfAttention(dim, self.heads)
        self.position = PositionEncoding(dim)
        self.layer2 = SelfAttention(dim, self.heads)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, config.n_classes)

    def encode(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One bag's embeddings (N, H) -> class-token logits (C,), attention (N,), patch logits (N, C)."""
        n = len(h)
        side = math.ceil(math.sqrt(n))
        filled = h[torch.arange(side * side, device=h.device) % n]
        x, _ = self.layer1(torch.cat([self.class_token, filled[None]], dim=1))
        x, attention = self.layer2(self.position(x, side))
        x, attention = self.norm(x[0]), attention[0]
        on_patches = torch.zeros(n, device=h.device, dtype=attention.dtype)
        on_patches.index_add_(0, torch.arange(side * side, device=h.device) % n, attention[1:])
        return self.classifier(x[0]), on_patches / on_patches.sum(), self.classifier(x[1:n + 1])

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> MILOutput:
        h = self.embed_patches(features)
        logits, attention = [], torch.zeros(mask.shape, device=h.device, dtype=h.dtype)
        for b in range(len(h)):
            bag_logits, attention[b, mask[b]], _ = self.encode(h[b, mask[b]])
            logits.append(bag_logits)
        return MILOutput(torch.stack(logits), attention, h)

    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.encode(self.embed_patches(features))[2]

    def instance_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.alone(self.patch_scores(features))


class ProtoMIL(AttentionMIL):
    """ProtoMIL (Rymarczyk et al., WACV 2023): ProtoPNet's prototypical parts ("this looks
    like that", Chen et al. 2019) for bags. Patch embeddings go into a prototype space (a
    linear layer and a sigmoid) and are compared with `prototypes` learned prototypes per
    class by ProtoPNet's similarity log((d + 1) / (d + 1e-4)) of the squared distance d.
    Gated attention on the embeddings pools each prototype's similarities over the bag, and a
    bias-free linear layer (started at +1 from a class's own prototypes, -0.5 from the
    others') turns them into logits, so each logit splits exactly into per-patch parts.
    The loss adds ProtoPNet's cluster cost (each bag holds a patch close to a prototype of its
    class) and, for binary models, its separation cost on negative bags only: they hold no
    positive patch, so none may lie close to a positive prototype, while a positive bag's
    patches may be anything. Then L1 on the weights from other classes' prototypes.
    Once trained, each prototype is projected onto the nearest patch of the training bags of
    its class (it becomes that real patch, which explain shows) and the last layer is refitted
    with everything else frozen, as ProtoPNet does."""

    max_instance_loss = False
    tasks = MILHead.tasks
    space = 64                           # prototype space dimensions
    cluster_weight = 0.8                 # ProtoPNet's cost weights
    separation_weight = 0.08
    l1_weight = 1e-4
    last_layer_epochs = 10

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        c = config.n_classes
        self.to_space = nn.Sequential(nn.Linear(config.hidden_dim, self.space), nn.Sigmoid())
        self.prototypes = nn.Parameter(torch.rand(c * config.prototypes, self.space))
        self.register_buffer("prototype_class", torch.arange(c).repeat_interleave(config.prototypes))
        self.register_buffer("own_class", F.one_hot(self.prototype_class, c).T.float())  # (C, M)
        self.classifier = nn.Linear(c * config.prototypes, c, bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(self.own_class - 0.5 * (1 - self.own_class))

    def distances(self, h: torch.Tensor) -> torch.Tensor:
        """(..., H) embeddings -> (..., M) squared distances to the prototypes."""
        z = self.to_space(h)
        d = (z * z).sum(-1, keepdim=True) - 2 * z @ self.prototypes.T + (self.prototypes ** 2).sum(-1)
        return d.clamp(min=0)

    @staticmethod
    def similarity(d: torch.Tensor) -> torch.Tensor:
        return torch.log((d + 1) / (d + 1e-4))

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> MILOutput:
        h, attention = self.attend(features, mask)
        pooled = torch.einsum("bn,bnm->bm", attention, self.similarity(self.distances(h)))
        return MILOutput(self.classifier(pooled), attention, h)

    def similarities_and_attention(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) one bag's features -> (N, M) each patch's similarity to each prototype and
        (N,) its attention, from one embedding pass."""
        h, attention = self.attend(*whole_bag(features))
        return self.similarity(self.distances(h[0])), attention[0]

    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        similarities, attention = self.similarities_and_attention(features)
        return attention[:, None] * (similarities @ self.classifier.weight.T)

    def instance_scores(self, features: torch.Tensor) -> torch.Tensor:
        similarities = self.similarity(self.distances(self.embed_patches(features)))
        return torch.softmax(similarities @ self.classifier.weight.T, -1)

    def loss(self, out: MILOutput, targets: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        nearest = self.distances(out.embeddings).masked_fill(~mask[..., None], float("inf")).amin(1)  # (B, M)
        own = self.prototype_class[None] == targets[:, None]
        cluster = nearest.masked_fill(~own, float("inf")).amin(1).mean()
        loss = F.cross_entropy(out.logits, targets, weight=weight) + self.cluster_weight * cluster
        negative = targets == 0
        if self.config.n_classes == 2 and bool(negative.any()):
            separation = nearest[negative][:, self.prototype_class == 1].amin(1).mean()
            loss = loss - self.separation_weight * separation
        return loss + self.l1_weight * (self.classifier.weight * (1 - self.own_class)).abs().sum()

    @torch.no_grad()
    def after_training(self, bags: list, refit: Callable[[list[nn.Parameter], int], None]) -> dict:
        """Projection: each prototype becomes the prototype-space point of its nearest patch
        among the training bags of its class, no two on the same patch (the nearest
        prototypes choose first); then the last layer is refitted. Records where each came
        from: the class, the bag, and the slide and the patch's index in that slide."""
        self.eval()
        m = len(self.prototypes)
        distances, points, bag_of, patch_of = [], [], [], []  # per bag: each prototype's m nearest patches
        for b, bag in enumerate(bags):
            z = self.to_space(self.embed_patches(bag.features))
            d = torch.cdist(self.prototypes, z).pow(2)                      # (M, N)
            d[self.prototype_class != int(bag.target)] = float("inf")     # another class's bag: no candidates
            d_k, patch_k = d.topk(min(m, d.shape[1]), dim=1, largest=False)
            distances.append(d_k)
            points.append(z[patch_k])
            bag_of.append(torch.full_like(patch_k, b))
            patch_of.append(patch_k)
        d, z = torch.cat(distances, dim=1), torch.cat(points, dim=1)         # (M, C), (M, C, P)
        bag_at, patch_at = torch.cat(bag_of, dim=1).tolist(), torch.cat(patch_of, dim=1).tolist()
        taken: set[tuple[int, int]] = set()
        origins: list[dict] = [{} for _ in range(m)]
        for p in d.amin(dim=1).argsort().tolist():  # the nearest prototypes choose first
            for c in d[p].argsort().tolist():
                if not torch.isfinite(d[p, c]):
                    break  # no patch of its class left
                if (bag_at[p][c], patch_at[p][c]) not in taken:
                    taken.add((bag_at[p][c], patch_at[p][c]))
                    bag = bags[bag_at[p][c]]
                    self.prototypes[p] = z[p, c]
                    origins[p] = {"class": int(bag.target), "bag": bag.bag_id, **_part_of(bag.parts, patch_at[p][c])}
                    break
        with torch.enable_grad():
            refit(list(self.classifier.parameters()), self.last_layer_epochs)
        return {"prototypes": origins}


KME_FEATURES = 1024   # random Fourier features per patch (5 seeds of 1,024 matched 2,048 on musk2)
KME_BANDWIDTH = 2.0   # RBF exp(-gamma |x - y|^2), gamma = this / feature dim, on the scaled features
KME_C = 100.0         # inverse L2 strength of the logistic regression (scikit-learn's C)
KME_CHUNK = 16384     # patches embedded at once when fitting (bounds memory on large bags)


class RandomFourierFeatures(nn.Module):
    """x -> sqrt(2/F) cos(W x + b) with W ~ N(0, 2 gamma), b ~ U(0, 2 pi): the inner product
    of two patches' features approximates exp(-gamma |x - y|^2). W and b are drawn once (from
    torch's seeded generator) and kept as buffers, so the model file holds them."""

    def __init__(self, in_dim: int, n_features: int, gamma: float) -> None:
        super().__init__()
        self.register_buffer("weight", torch.randn(n_features, in_dim) * math.sqrt(2 * gamma))
        self.register_buffer("phase", torch.rand(n_features) * 2 * math.pi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cos(x @ self.weight.T + self.phase) * math.sqrt(2 / len(self.phase))


class KernelMeanMIL(MILHead):
    """A bag is the unit-length mean of its patches' random Fourier features, so the inner
    product of two bags approximates the normalised MI-kernel (the mean RBF similarity over
    all their patch pairs); a logistic regression with scikit-learn's objective (class-weighted
    log loss plus |W|^2 / 2C, intercept free) reads it, fitted by L-BFGS on every training
    patch, not by epochs. On molecule and image-segment descriptors (musk1, musk2, elephant)
    it beat abmil's ensemble (README); where a few patches among many carry the label (digits,
    the key-instance rows) the mean dilutes them and it loses. Patch contributions add up: the
    logit is b + sum_i W phi_i / (N |mean phi|)."""

    closed_form = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.embed = RandomFourierFeatures(config.in_dim, KME_FEATURES, KME_BANDWIDTH / config.in_dim)
        self.classifier = nn.Linear(KME_FEATURES, config.n_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> MILOutput:
        phi = self.embed_patches(features)
        weights = mask.float() / mask.sum(1, keepdim=True).clamp(min=1)
        return MILOutput(self.classifier(F.normalize(torch.einsum("bn,bnf->bf", weights, phi), dim=-1)), weights, phi)

    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        phi = self.embed_patches(features)
        return (phi @ self.classifier.weight.T) / (len(phi) * phi.mean(0).norm().clamp(min=1e-12))

    def instance_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.alone(self.classifier(F.normalize(self.embed_patches(features), dim=-1)))

    @torch.no_grad()
    def fit_closed_form(self, bags: list, weight: torch.Tensor | None) -> None:
        """The logistic regression on the training bags' (training.Bag) mean embeddings, over
        all their patches, in float64."""
        self.eval()
        means = []
        for bag in bags:
            total = sum(self.embed_patches(chunk.float()).double().sum(0) for chunk in bag.features.split(KME_CHUNK))
            means.append(total / len(bag.features))
        x = F.normalize(torch.stack(means), dim=-1).cpu()
        targets = torch.tensor([int(b.target) for b in bags])
        class_weight = (torch.ones(self.config.n_classes) if weight is None else weight.cpu()).double()
        linear = nn.Linear(x.shape[1], self.config.n_classes, dtype=torch.float64)
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        optimiser = torch.optim.LBFGS(linear.parameters(), max_iter=1000, tolerance_grad=1e-9,
                                      tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

        def objective() -> torch.Tensor:
            optimiser.zero_grad()
            log_loss = F.cross_entropy(linear(x), targets, reduction="none") * class_weight[targets]
            loss = log_loss.sum() + linear.weight.square().sum() / (2 * KME_C)
            loss.backward()
            return loss

        with torch.enable_grad():
            optimiser.step(objective)
        self.classifier.weight.copy_(linear.weight)
        self.classifier.bias.copy_(linear.bias)


def _part_of(parts: list[tuple[str, int]], index: int) -> dict:
    """Patch `index` of a bag made of `parts` (slide id, patches) -> its slide and index there
    (a bag made without parts: the index alone)."""
    if not parts:
        return {"patch": index}
    for slide_id, count in parts:
        if index < count:
            return {"slide": slide_id, "patch": index}
        index -= count
    raise IndexError(index)


MODELS: dict[str, type[MILHead]] = {
    "abmil": AttentionMIL,
    "abmil-plain": PlainAttentionMIL,
    "transformer-abmil": TransformerAttentionMIL,
    "mean": MeanMIL,
    "max": MaxMIL,
    "noisy-and": NoisyAndMIL,
    "clam-sb": ClamSingleBranch,
    "clam-mb": ClamMultiBranch,
    "dsmil": DualStreamMIL,
    "transmil": TransMIL,
    "protomil": ProtoMIL,
    "kme": KernelMeanMIL,
}


class SeedEnsemble(nn.Module):
    """Heads trained on the same bags from different seeds (recipes, head families), answering
    as one: class probabilities, attention and patch scores are the members' weighted means
    (the logits are the log of the mean probabilities; for other tasks the mean of the members'
    outputs). On small cohorts a single head's result swings with its seed; the mean of a few
    does not. `weights` (equal when None) let a mix of families weigh each family as chosen."""

    def __init__(self, members: list[MILHead], weights: list[float] | None = None) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.config = members[0].config
        self.additive = all(member.additive for member in members)  # a mix's patch scores add up if each's do
        weights = torch.ones(len(members)) if weights is None else torch.tensor(weights, dtype=torch.float32)
        # not in the state_dict: the model file records each member's weight beside its recipe
        self.register_buffer("weights", weights / weights.sum(), persistent=False)

    def mean(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The members' weighted mean of one output each (the first dimension of every output)."""
        stacked = torch.stack(outputs)
        return (self.weights.to(stacked.dtype).view(-1, *[1] * (stacked.dim() - 1)) * stacked).sum(0)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> MILOutput:
        outs = [member(features, mask) for member in self.members]
        attention = self.mean([o.attention for o in outs])
        if self.config.task != "classification":
            return MILOutput(self.mean([o.logits.float() for o in outs]), attention, outs[0].embeddings)
        probs = self.mean([torch.softmax(o.logits.float(), -1) for o in outs])
        return MILOutput(torch.log(probs.clamp(min=1e-12)), attention, outs[0].embeddings)

    bag = MILHead.bag  # one bag (N, D) -> (C,) logits, (N,) attention, through this forward

    def patch_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.mean([member.patch_scores(features) for member in self.members])

    def instance_scores(self, features: torch.Tensor) -> torch.Tensor:
        return self.mean([member.instance_scores(features) for member in self.members])


def check_architecture(name: str, task: str = "classification") -> None:
    """MilcliError unless `name` is a head in MODELS that can learn `task`, a mix of such heads
    joined by FAMILY_JOIN (`abmil+kme`), or 'auto' (which resolves to one for any task,
    training.choose_architecture)."""
    if task not in TASK_NAMES:
        raise MilcliError(f"--task {task}: expected one of {', '.join(TASK_NAMES)}")
    if name == AUTO_ARCHITECTURE:
        return
    families = name.split(FAMILY_JOIN)
    for family in families:
        if family not in MODELS:
            raise MilcliError(f"--model {name}: expected {AUTO_ARCHITECTURE}, one of {', '.join(MODELS)}, "
                              f"or heads joined by {FAMILY_JOIN} (e.g. abmil{FAMILY_JOIN}kme)")
        if task not in MODELS[family].tasks:
            able = [model for model, head in MODELS.items() if task in head.tasks]
            raise MilcliError(f"--model {family} predicts classes only; for --task {task} use {', '.join(able)}")
    if len(set(families)) < len(families):
        raise MilcliError(f"--model {name}: a head named twice (--ensemble sets how many of each)")


def build_model(config: ModelConfig) -> MILHead:
    """The head `config` describes; an instance_loss left to milcli (None) builds with the
    default share (training gives each member its recipe's, training.ensemble_recipes)."""
    check_architecture(config.architecture, config.task)
    if config.architecture not in MODELS:
        raise MilcliError(f"--model {config.architecture} names no single head (training.fit builds each member)")
    if config.instance_loss is None:
        config = replace(config, instance_loss=DEFAULT_INSTANCE_LOSS)
    return MODELS[config.architecture](config)
