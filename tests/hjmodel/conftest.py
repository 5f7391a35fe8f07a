"""Shared fixtures of the hjmodel tests: seeded random LSE layers in float64.

Every numerical test takes a ``seed`` in 0..99 (the seed contract: any seed must pass) and draws its
problem, including N, d and eps, from it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

DTYPE = torch.float64


@dataclass
class Layer:
    W: torch.Tensor      # (N, d)
    b: torch.Tensor      # (N,)
    eps: float
    z: torch.Tensor      # (n, d) query points
    gen: torch.Generator

    @property
    def N(self) -> int:
        return self.W.shape[0]

    @property
    def d(self) -> int:
        return self.W.shape[1]


def draw_layer(seed: int, n: int = 4, N: tuple[int, int] = (2, 12), d: tuple[int, int] = (1, 5),
               log10_eps: tuple[float, float] = (-1.0, 0.5), z_scale: float = 1.5) -> Layer:
    """A random layer: N, d uniform in the closed ranges, eps log-uniform, W, b, z Gaussian."""
    gen = torch.Generator().manual_seed(10_007 * seed + 17)
    NN = int(torch.randint(N[0], N[1] + 1, (), generator=gen))
    dd = int(torch.randint(d[0], d[1] + 1, (), generator=gen))
    lo, hi = log10_eps
    eps = float(10 ** (lo + (hi - lo) * torch.rand((), generator=gen, dtype=DTYPE)))
    W = torch.randn(NN, dd, generator=gen, dtype=DTYPE)
    b = torch.randn(NN, generator=gen, dtype=DTYPE)
    z = z_scale * torch.randn(n, dd, generator=gen, dtype=DTYPE)
    return Layer(W, b, eps, z, gen)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: intra-op threads only add overhead (and oversubscribe a shared CI box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def layer():
    """Factory ``layer(seed, **kw) -> Layer`` (see :func:`draw_layer`)."""
    return draw_layer


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10,
                 scale: float | torch.Tensor | None = None, msg: str = "") -> None:
    """|actual - expected| <= rtol * scale elementwise, scale defaulting to max(1, max |expected|)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if scale is None:
        scale = max(1.0, float(expected.abs().max()) if expected.numel() else 1.0)
    err = (actual - expected).abs()
    bad = ~(err <= rtol * torch.as_tensor(scale, dtype=err.dtype))
    assert not bool(bad.any()), f"{msg} max err {float(err.max()):.3e} vs tol {rtol} * {scale}"


@pytest.fixture
def close():
    """The :func:`assert_close` helper."""
    return assert_close


@pytest.fixture(scope="module")
def memory_regression():
    """A small memory regression model (~3 s to train): its certificate takes the general
    (n, K, N) masked form, which no demo model has. One per test module (test_device moves its own
    to another device)."""
    from hjmodel import TrainConfig, train
    from hjmodel.attacks import friedman

    return train(friedman(400), TrainConfig(kind="memory", memory_size=120, progress=False))[0]
