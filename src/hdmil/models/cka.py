"""CKA: the Chebyshev Kolmogorov–Arnold layer DMIN uses as its classifier (docs/method.md §3).

    u = tanh(x)                              squashes inputs into [-1, 1], where T_k is defined
    T_0 = 1,  T_1 = u,  T_k = 2u·T_{k-1} − T_{k-2}
    y[o] = Σ_i Σ_{k=0..K} Ω[i, o, k] · T_k(u_i)     no bias (T_0 = 1 already gives one per input)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChebyKANLayer", "chebyshev_basis"]


def chebyshev_basis(u: torch.Tensor, degree: int) -> torch.Tensor:
    """Chebyshev polynomials of the first kind T_0..T_K at ``u``.

    u: [..., in] (values in [-1, 1]) -> [..., in, K+1]
    """
    terms = [torch.ones_like(u)]
    if degree >= 1:
        terms.append(u)
    for _ in range(2, degree + 1):
        terms.append(2.0 * u * terms[-1] - terms[-2])
    return torch.stack(terms, dim=-1)


class ChebyKANLayer(nn.Module):
    """Kolmogorov–Arnold layer with a degree-K Chebyshev expansion on every input-output edge.

    Args:
        in_features: input width (512 for DMIN's bag embedding).
        out_features: output width (1 for a class logit, 2 for an instance classifier).
        degree: K, the highest polynomial degree (12 in the reference; 16 for TCGA-NSCLC).

    Shapes: x [B, in] -> [B, out]; x [in] -> [out] (any leading dims work).
    Parameter ``omega`` is Ω [in, out, K+1], Xavier-normal initialised (torch's fan rules for a
    3-D tensor: fan_in = out·(K+1), fan_out = in·(K+1)).
    """

    def __init__(self, in_features: int, out_features: int, degree: int = 12) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"ChebyKANLayer needs positive widths, got {in_features} -> {out_features}")
        if degree < 0:
            raise ValueError(f"ChebyKANLayer degree must be >= 0, got {degree}")
        self.in_features = in_features
        self.out_features = out_features
        self.degree = degree
        self.omega = nn.Parameter(torch.empty(in_features, out_features, degree + 1))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        nn.init.xavier_normal_(self.omega, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"ChebyKANLayer expects {self.in_features} input features, got {x.shape[-1]}")
        basis = chebyshev_basis(torch.tanh(x), self.degree)  # [..., in, K+1]
        return torch.einsum("...ik,iok->...o", basis, self.omega)  # [..., out]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, degree={self.degree}"
