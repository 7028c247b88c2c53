"""LayerNorm as an op in place of a BatchNorm, and the ops that replace LayerNorm/RMSNorm sites.

``layernorm`` at a BatchNorm site is Table 1's "LN" row of "Normalization Gradients are
Least-Squares Residuals" (ICLR 2019 submission; Ba et al. 2016): each example normalized over
all of its channels and positions, one per-channel affine after it (BatchNorm's parameter count).

At a LayerNorm or RMSNorm site over the last dim D of ``(..., D)`` (transformers), the ops that
apply are torch's ``nn.LayerNorm``/``nn.RMSNorm`` (LayerNorm against RMSNorm) and the chains
``bn_ln``/``ln_bn`` over tokens: :class:`TokenNorm` runs a BatchNorm-style op on the tokens
flattened to ``(tokens, D)``, so its BN stage normalizes each feature over all tokens of the
batch and its LN stage each token over its D features (the least-squares paper §4.1, there for
channels of images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normscope.ops.base import ChannelNorm, channel_view


class ChannelLayerNorm(ChannelNorm):
    """LayerNorm over ``(C, *)`` of each example with a per-channel affine, a drop-in for a BatchNorm.

    .. math:: y_{b,c,i} = \\gamma_c \\frac{x_{b,c,i} - \\mu_b}{\\sqrt{\\sigma_b^2 + \\epsilon}} + \\beta_c

    with ``mu_b``, ``sigma_b^2`` the mean and biased variance of example b over its channels and
    positions. There are no running statistics: train and eval mode agree, and
    ``track_running_stats`` and ``momentum`` are accepted for the BatchNorm constructor contract only.

    Args:
        num_features: C. eps: added to the variance (default 1e-5). affine: learn gamma, beta (default True).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, False, device=device, dtype=dtype)

    def _check_batch(self, x: Tensor) -> None:
        """Per-example statistics: any batch size works."""

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        z = F.layer_norm(x, x.shape[1:], None, None, self.eps)
        if self.weight is None:
            return z
        return torch.addcmul(channel_view(self.bias, x), z, channel_view(self.weight, x))


class TokenNorm(nn.Module):
    """A BatchNorm-style op over the last dim of ``(..., D)``: ``op(x.reshape(-1, D)).reshape(x.shape)``.

    With ``op`` a :class:`~normscope.ops.chain.BatchLayerNorm` this is the BN/LN chain at a
    transformer's LayerNorm site: BN over every token of the batch per feature, LN per token.
    ``weight`` and ``bias`` are the op's (state-dict keys ``op.weight``, ``op.bias``).
    """

    read_by_functional_calls = True  # its BatchLayerNorm's F.batch_norm and F.layer_norm calls are the sites

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.op = op

    @property
    def weight(self) -> Tensor | None:
        return self.op.weight

    @property
    def bias(self) -> Tensor | None:
        return self.op.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x.reshape(-1, x.shape[-1])).reshape(x.shape)
