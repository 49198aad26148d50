"""HieraDet: the hierarchical ViT of SAM 2's image encoder (Hiera without the MAE-specific parts).

Tokens stay a channels-last 2-D grid (B, H, W, C) through four stages of strides 4, 8, 16 and 32. The first
block of stages 2-4 max-pools its queries by 2x2, doubling width and heads. Blocks attend inside
non-overlapping windows or globally. The head is LayerNorm over the stage-4 map, a spatial mean (the
embedding) and a Linear classifier.

State-dict names are those of the reference implementation, so published checkpoints load with strict=True.
Unlike the reference, any input size works: windows are zero-padded, the tiled window position embedding is
extended past the edge and cropped, and pooled windows are cropped to the pooled grid. Sizes that are
multiples of 32 give exactly the reference's outputs.

The hyper-parameters and network names live in `configs` (torch-free); `Linear`, `Mlp` and `attention` come
from `fastpath`: nn.Linear, an MLP and scaled dot-product attention with CPU inference fast paths, holding the
same parameters under the same names.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from hierax.models.configs import HieraDetConfig
from hierax.models.fastpath import Linear, Mlp, attention, fast_path_enabled


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nWin, window, window, C), zero-padding H and W up to multiples of `window`."""
    b, h, w, c = x.shape
    pad_h, pad_w = -h % window, -w % window
    if torch.compiler.is_exporting() or pad_h or pad_w:  # exported graphs must pad for every size
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: torch.Tensor, window: int, padded_hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of window_partition, returning the padded (B, Hp, Wp, C) grid (callers crop)."""
    hp, wp = padded_hw
    c = windows.shape[-1]
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)


def max_pool_nhwc(x: torch.Tensor, stride: int) -> torch.Tensor:
    """2-D max pooling of a channels-last grid (floor on odd sides)."""
    return F.max_pool2d(x.permute(0, 3, 1, 2), kernel_size=stride, stride=stride).permute(0, 2, 3, 1)


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid, with optional max-pooled queries."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_stride: int = 0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_stride = q_stride
        self.qkv = Linear(dim, dim_out * 3)
        self.proj = Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1)
        q, k, v = qkv.unbind(2)
        if self.q_stride:
            q = max_pool_nhwc(q.reshape(b, h, w, -1), self.q_stride)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)
        x = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(x)


class MultiScaleBlock(nn.Module):
    """Pre-norm transformer block; windowed (window > 0) or global, optionally pooling by q_stride."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        window: int,
        q_stride: int = 0,
        mlp_ratio: float = 4.0,
        mlp_dropout: float = 0.0,
        drop_path: float = 0.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.window = window
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.proj = Linear(dim, dim_out) if dim != dim_out else None
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_stride)
        self.drop_path = StochasticDepth(drop_path, mode="row")
        self.norm2 = nn.LayerNorm(dim_out, eps=eps)
        hidden = int(dim_out * mlp_ratio)
        self.mlp = Mlp(dim_out, hidden, mlp_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.proj is not None:
            shortcut = self.proj(x)
        if self.q_stride:
            shortcut = max_pool_nhwc(shortcut, self.q_stride)
        out_h, out_w = shortcut.shape[1:3]
        if self.window > 0:
            x, (hp, wp) = window_partition(x, self.window)
            x = self.attn(x)
            stride = self.q_stride or 1
            x = window_unpartition(x, self.window // stride, (hp // stride, wp // stride))
            x = x[:, :out_h, :out_w]
        else:
            x = self.attn(x)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchStem(nn.Module):
    """7x7 stride-4 convolution, returning a channels-last grid.

    The convolution runs in channels-last memory, so the (B, H, W, C) grid it returns is contiguous: a permuted
    NCHW output would carry its strides through the first stage's adds, LayerNorms and window reshapes."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)


class SpatialMean(nn.Module):
    """Mean over the H and W axes of a (B, H, W, C) grid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2))


def _init_trunc_normal(linear: nn.Linear, std: float = 0.02) -> None:
    """Truncated N(0, std) weights and zero bias."""
    nn.init.trunc_normal_(linear.weight, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class HieraDet(nn.Module):
    """The HieraDet family. `num_classes=0` gives a backbone without a classifier."""

    def __init__(self, config: HieraDetConfig, num_classes: int = 0) -> None:
        super().__init__()
        self.config = config
        dim, heads = config.embed_dim, config.num_heads
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *config.pos_embed_size))
        self.pos_embed_win = nn.Parameter(torch.zeros(1, dim, *config.pos_embed_win_size))
        self.stem = PatchStem(dim)

        depth = sum(config.depths)
        drop_rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        stages: dict[str, nn.Sequential] = {}
        block_idx = 0
        window = config.window_spec[0]
        for s, stage_depth in enumerate(config.depths):
            blocks = []
            for j in range(stage_depth):
                first_pooled = s > 0 and j == 0
                dim_out = dim * 2 if first_pooled else dim
                heads = heads * 2 if first_pooled else heads
                block_window = 0 if block_idx in config.global_blocks else window
                blocks.append(
                    MultiScaleBlock(
                        dim,
                        dim_out,
                        heads,
                        window=block_window,
                        q_stride=config.q_stride if first_pooled else 0,
                        mlp_ratio=config.mlp_ratio,
                        mlp_dropout=config.mlp_dropout,
                        drop_path=drop_rates[block_idx],
                        eps=config.layer_norm_eps,
                    )
                )
                dim = dim_out
                block_idx += 1
                window = config.window_spec[s]
            stages[f"stage{s + 1}"] = nn.Sequential(*blocks)
        self.body = nn.Sequential(OrderedDict(stages))
        self.embedding_size = dim
        # "features" is the reference's name for the head's LayerNorm and mean: checkpoints load by it
        self.features = nn.Sequential(nn.LayerNorm(dim, eps=config.layer_norm_eps), SpatialMean())
        self.num_classes = num_classes
        self.classifier = self._make_classifier(num_classes)
        self.grad_checkpointing = False
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self._init_weights()

    def _make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.embedding_size, num_classes) if num_classes > 0 else nn.Identity()

    def _init_weights(self) -> None:
        """Position embeddings and the classifier get N(0, 0.02); the blocks keep PyTorch's fan-in scaled default,
        as in SAM 2 and the reference (a fixed 0.02 starves narrow networks trained from scratch)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.pos_embed_win, std=0.02)
        self._init_classifier()

    def _init_classifier(self) -> None:
        if isinstance(self.classifier, nn.Linear):
            _init_trunc_normal(self.classifier)

    def init_linear_layers(self, std: float = 0.02) -> None:
        """Re-initialise every Linear layer with a truncated N(0, std) and zero bias: the ViT/DINOv2 scheme that
        self-supervised pretraining from scratch is tuned for (on a tiny network, a 160-step DINOv2 run reaches
        k-NN 0.775 from it against 0.717 from the fan-in default)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _init_trunc_normal(module, std)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a freshly initialised one with `num_classes` outputs (0: none)."""
        self.num_classes = num_classes
        device = self.features[0].weight.device
        self.classifier = self._make_classifier(num_classes).to(device)
        self._init_classifier()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward, trading compute for memory."""
        self.grad_checkpointing = enable

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """The (1, h, w, C) position embedding for a stem grid of h x w tokens.

        In inference (eval mode, no autograd, not being traced or compiled, fast paths on) the result is cached
        per grid size, keyed by the parameters' identity and version so that loading new weights invalidates it:
        the bicubic resize otherwise runs on every forward pass."""
        if (
            self.training
            or torch.is_grad_enabled()
            or torch.jit.is_tracing()
            or torch.compiler.is_compiling()
            or self.pos_embed.is_inference()  # created under inference_mode: no version counter to key on
            or not fast_path_enabled()
        ):
            return self._compute_position_embedding(h, w)
        key = (h, w, *((p.data_ptr(), p._version, p.dtype) for p in (self.pos_embed, self.pos_embed_win)))
        pos = self._pos_cache.get(key)
        if pos is None:
            if len(self._pos_cache) >= 8:
                self._pos_cache.pop(next(iter(self._pos_cache)))
            pos = self._pos_cache[key] = self._compute_position_embedding(h, w)
        return pos

    def _compute_position_embedding(self, h: int, w: int) -> torch.Tensor:
        pos = F.interpolate(self.pos_embed, size=(h, w), mode="bicubic", align_corners=False)
        wh, ww = self.pos_embed_win.shape[-2:]
        win = self.pos_embed_win.tile(1, 1, (h + wh - 1) // wh, (w + ww - 1) // ww)[:, :, :h, :w]
        return (pos + win).permute(0, 2, 3, 1)

    def patch_embed(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Stem and position embedding: (B, 3, H, W) -> (B, ceil(H/4), ceil(W/4), C).

        `token_mask` (B, h, w) bool marks stem tokens to replace by `mask_token` (C,) before the position
        embedding is added (masked-image modelling in DINOv2/iBOT pretraining)."""
        x = self.stem(x)
        if token_mask is not None:
            x = torch.where(token_mask.unsqueeze(-1), mask_token.to(x.dtype), x)
        return x + self.position_embedding(x.shape[1], x.shape[2])

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for block in stage:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_stages(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """The raw output of every stage, channels-last (B, H, W, C), strides 4, 8, 16 and 32; `token_mask` and
        `mask_token` as in `patch_embed`."""
        x = self.patch_embed(x, token_mask, mask_token)
        outs = []
        for stage in self.body:
            x = self._run_stage(stage, x)
            outs.append(x)
        return outs

    def forward_features(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The stage-4 map, channels-last (B, H/32, W/32, C), before the final LayerNorm; `token_mask` and
        `mask_token` as in `patch_embed`."""
        x = self.patch_embed(x, token_mask, mask_token)
        for stage in self.body:
            x = self._run_stage(stage, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """LayerNorm, spatial mean and (unless pre_logits) the classifier, on a forward_features map."""
        x = self.features(x)
        return x if pre_logits else self.classifier(x)

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, C) image embedding: LayerNorm of the stage-4 map, then its spatial mean."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """Logits from an embedding."""
        return self.classifier(embedding)

    def detection_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw stage outputs as NCHW maps keyed stage1..stage4 (strides 4, 8, 16, 32)."""
        return {f"stage{i + 1}": out.permute(0, 3, 1, 2).contiguous() for i, out in enumerate(self.forward_stages(x))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
