"""CKA layer (docs/method.md §3) against numpy's Chebyshev series."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.polynomial import chebyshev

from hdmil.models.cka import ChebyKANLayer, chebyshev_basis


def _reference(x: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """y[b, o] = Σ_i chebval(tanh(x[b, i]), Ω[i, o, :])."""
    u = np.tanh(x)
    n_in, n_out, _ = omega.shape
    y = np.zeros((x.shape[0], n_out))
    for i in range(n_in):
        for o in range(n_out):
            y[:, o] += chebyshev.chebval(u[:, i], omega[i, o])
    return y


@pytest.mark.parametrize("degree", [0, 1, 2, 5, 12])
def test_matches_chebval(degree: int) -> None:
    rng = np.random.default_rng(degree)
    layer = ChebyKANLayer(7, 3, degree).double()
    omega = rng.normal(size=(7, 3, degree + 1))
    with torch.no_grad():
        layer.omega.copy_(torch.from_numpy(omega))
    x = rng.normal(scale=2.0, size=(11, 7))
    y = layer(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(y, _reference(x, omega), rtol=1e-10, atol=1e-10)


def test_basis_is_cos_k_arccos() -> None:
    u = torch.linspace(-1, 1, 41, dtype=torch.float64)
    basis = chebyshev_basis(u, 12)
    expected = torch.cos(torch.arange(13, dtype=torch.float64) * torch.arccos(u)[:, None])
    torch.testing.assert_close(basis, expected)


def test_single_vector_and_batch_agree() -> None:
    torch.manual_seed(0)
    layer = ChebyKANLayer(16, 2, 12)
    x = torch.randn(5, 16)
    batch = layer(x)
    assert batch.shape == (5, 2)
    for j in range(5):
        single = layer(x[j])
        assert single.shape == (2,)
        torch.testing.assert_close(single, batch[j])


def test_no_bias_and_xavier_normal_init() -> None:
    torch.manual_seed(0)
    layer = ChebyKANLayer(256, 64, 12)
    assert [name for name, _ in layer.named_parameters()] == ["omega"]
    assert layer.omega.shape == (256, 64, 13)
    # torch's Xavier fans for [in, out, K+1]: fan_in = out·(K+1), fan_out = in·(K+1)
    expected_std = (2.0 / ((256 + 64) * 13)) ** 0.5
    assert abs(layer.omega.std().item() / expected_std - 1) < 0.02
    assert abs(layer.omega.mean().item()) < 0.1 * expected_std


def test_gradcheck() -> None:
    torch.manual_seed(0)
    layer = ChebyKANLayer(3, 2, 4).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_wrong_width_raises() -> None:
    with pytest.raises(ValueError, match="expects 4 input features"):
        ChebyKANLayer(4, 1)(torch.zeros(2, 5))
