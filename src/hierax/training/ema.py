"""Model EMA: an exponential moving average of a module's weights, saved as the model (fine-tuning) or used as
the teacher (DINOv2). Its decay per step comes from `optim.ema_decay_at` unless the stage chooses."""

from __future__ import annotations

import copy

import torch
from torch import nn

from hierax.models.fastpath import release_casts


class ModelEMA:
    """An exponential moving average of a module's parameters (buffers copied): avg = d * avg + (1 - d) * param."""

    def __init__(self, module: nn.Module) -> None:
        self.module = copy.deepcopy(module)
        self.module.eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module, decay: float) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buf, buf in zip(self.module.buffers(), module.buffers(), strict=True):
            ema_buf.copy_(buf)
        release_casts(self.module)  # bf16 casts kept by the last evaluation are of the old weights

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
