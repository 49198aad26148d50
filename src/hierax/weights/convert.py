"""SAM 2 and timm state dicts to hierax names, so their Hiera trunks load into HieraDet. Checkpoints in hierax's
(the reference's) own names pass through unchanged."""

from __future__ import annotations

import re

import torch

_SAM2_PREFIXES = ("image_encoder.trunk.", "trunk.", "module.")
_FLAT_RENAMES = [
    (r"^pos_embed_window$", "pos_embed_win"),
    (r"^patch_embed\.proj\.", "stem.proj."),
    (r"\.mlp\.layers\.0\.", ".mlp.0."),
    (r"\.mlp\.layers\.1\.", ".mlp.3."),
    (r"\.mlp\.fc1\.", ".mlp.0."),
    (r"\.mlp\.fc2\.", ".mlp.3."),
    (r"^head\.norm\.", "features.0."),
    (r"^head\.fc\.", "classifier."),
]


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map SAM 2 (`image_encoder.trunk.*`, `mlp.layers.0/1`) and timm `sam2_hiera_*` (`mlp.fc1/fc2`,
    `head.fc`) state dicts to hierax names; hierax/reference dicts pass through unchanged. Other SAM 2 parts
    (neck, decoders) are dropped; SAM 2 has no final LayerNorm, so an identity one is added. Flat `blocks.{i}` are split
    into stages where a block has a `proj` (the first block of stages 2-4)."""
    if any(k.startswith("body.") for k in state):
        return state
    trunk = {}
    for key, value in state.items():
        for prefix in _SAM2_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key.startswith(("pos_embed", "patch_embed.", "blocks.", "head.")):
            trunk[key] = value
    if not any(k.startswith("blocks.") for k in trunk):
        return state
    block_ids = sorted({int(k.split(".")[1]) for k in trunk if k.startswith("blocks.")})
    stage_of, stage, index = {}, 1, 0
    for b in block_ids:
        if f"blocks.{b}.proj.weight" in trunk and b != block_ids[0]:
            stage, index = stage + 1, 0
        stage_of[b] = f"body.stage{stage}.{index}"
        index += 1
    out = {}
    for key, value in trunk.items():
        if key.startswith("blocks."):
            _, b, rest = key.split(".", 2)
            key = f"{stage_of[int(b)]}.{rest}"
        for pattern, repl in _FLAT_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    if "features.0.weight" not in out:
        width = out[f"{stage_of[block_ids[-1]]}.mlp.3.weight"].shape[0]
        out["features.0.weight"], out["features.0.bias"] = torch.ones(width), torch.zeros(width)
    return out
