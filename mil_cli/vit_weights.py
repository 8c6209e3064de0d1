"""Vision-transformer weights published in the Hugging Face `transformers` layout (ViTModel,
Dinov2Model, Dinov2WithRegistersModel, as transformers 4 saved them on the hub or transformers 5
names them), renamed into the original DINOv2 layout that timm's own checkpoint filter reads
(registers, SwiGLU and position-embedding grids included). Why: every preset then runs through one
timm implementation (one pooling code, one precision path, `--compile`), and milcli needs no
`transformers` at run time."""

from __future__ import annotations

import re

import torch

# (pattern, replacement) applied in order to each key inside a block; transformers 4 and 5 spellings
BLOCK_RENAMES = (
    (r"attention\.attention\.(query|key|value)\.", r"attn.\1."),
    (r"attention\.q_proj\.", "attn.query."),
    (r"attention\.k_proj\.", "attn.key."),
    (r"attention\.v_proj\.", "attn.value."),
    (r"attention\.output\.dense\.|attention\.o_proj\.", "attn.proj."),
    (r"layernorm_before\.", "norm1."),
    (r"layernorm_after\.", "norm2."),
    (r"layer_scale(\d)\.lambda1", r"ls\1.gamma"),
    (r"intermediate\.dense\.", "mlp.fc1."),
    (r"^output\.dense\.", "mlp.fc2."),
    (r"mlp\.weights_in\.", "mlp.w12."),
    (r"mlp\.(weights_out|down_proj)\.", "mlp.w3."),
)
TOP_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
BLOCK_KEY = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")


PREFIX = re.compile(r"^(?:vit|dinov2|dinov2_with_registers|model)\.")  # a task model's backbone attribute


def is_transformers_layout(state: dict[str, torch.Tensor]) -> bool:
    return any(PREFIX.sub("", key).startswith("embeddings.patch_embeddings.") for key in state)


def from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` renamed to the DINOv2 layout: q/k/v joined into one qkv projection, SwiGLU
    gate and up projections joined as DINOv2's w12 (gate first), the pooler dropped."""
    state = {PREFIX.sub("", key): value for key, value in state.items()}
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("pooler."):
            continue
        if key in TOP_RENAMES:
            out[TOP_RENAMES[key]] = value
            continue
        match = BLOCK_KEY.match(key)
        if not match:
            out[key] = value  # left for the strict load to report
            continue
        rest = match[2]
        for pattern, replacement in BLOCK_RENAMES:
            rest = re.sub(pattern, replacement, rest)
        pending[f"blocks.{match[1]}.{rest}"] = value
    for key in sorted(pending):
        joined = _joined(key, pending)
        if joined is not None:
            out.update(joined)
        elif not re.search(r"attn\.(key|value)\.|mlp\.up_proj\.", key):
            out[key] = pending[key]
    if "mask_token" not in out:  # timm's filter recognises the DINOv2 layout by its mask token
        out["mask_token"] = torch.zeros_like(out["cls_token"]).flatten(1)
    return out


def _joined(key: str, pending: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The fused tensor for a query or SwiGLU gate key (its partners read from `pending`)."""
    if ".attn.query." in key:
        parts = [pending[key.replace(".query.", f".{name}.")] for name in ("query", "key", "value")]
        return {key.replace(".query.", ".qkv."): torch.cat(parts, dim=0)}
    if ".mlp.gate_proj." in key:
        return {key.replace(".gate_proj.", ".w12."): torch.cat([pending[key], pending[key.replace("gate", "up")]], 0)}
    return None
