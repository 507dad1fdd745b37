"""Orthogonal matrices for rotations: Hadamard matrices of the widths language models use, random ones
where no Hadamard matrix is known here, and the fast Kronecker-product form of ``x @ H``.

A Hadamard matrix ``H`` (entries +-1, ``H H^T = n I``) exists only for n = 1, 2 and multiples of 4. Built
here: ``H_12`` and ``H_20`` (Paley's first construction, from the quadratic residues modulo 11 and 19),
powers of two (Sylvester), and their Kronecker products: every ``n = m * 2^k`` with ``m`` in {1, 12, 20,
144, 240, 400} (576 = 144 * 4, 1536 = 12 * 128, 384 = 12 * 32, 4096; 11008 = 43 * 256 is not). :func:`orthogonal` normalizes one
and multiplies its rows by random signs (the randomized Hadamard transform of QuaRot), or, for any other
width, gives a random orthogonal matrix (QR of a Gaussian matrix, signs fixed); both seeded.
"""

from __future__ import annotations

import torch

PALEY_PRIMES = (11, 19)  # q = 3 mod 4: Paley I gives Hadamard matrices of order q + 1


def _paley(q: int) -> torch.Tensor:
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in residues else -1 for i in range(1, q)], dtype=torch.float64)
    jacobsthal = torch.stack([chi.roll(i) for i in range(q)])  # Q[i, j] = chi(j - i)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _small(m: int) -> torch.Tensor:
    """The Hadamard matrix of order ``m`` in :data:`SMALL` (a Kronecker product of Paley matrices)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    for q in SMALL[m]:
        h = torch.kron(h, _paley(q))
    return h


SMALL = {1: (), 12: (11,), 20: (19,), 144: (11, 11), 240: (11, 19), 400: (19, 19)}  # order -> Paley primes


def factors(n: int) -> tuple[int, int] | None:
    """``(m, 2^k)`` with ``n = m * 2^k`` and ``m`` in :data:`SMALL` (smallest ``m`` first), else None."""
    for m in sorted(SMALL):
        if n % m == 0:
            p = n // m
            if p & (p - 1) == 0:
                return m, p
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``n`` (float64, entries +-1), or None when none is built here."""
    found = factors(n)
    if found is None:
        return None
    m, p = found
    return torch.kron(_small(m), _sylvester(p))


def orthogonal(n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """An ``n x n`` orthogonal matrix (float64) and how it was made: a Hadamard matrix over ``sqrt(n)`` with
    random row signs, or, where no Hadamard matrix of order ``n`` is known here, a random orthogonal one."""
    gen = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
        m, p = factors(n)
        return signs[:, None] * h / n**0.5, f"Hadamard {m} x {p}" if m > 1 else f"Hadamard {n}"
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :], "random orthogonal (no Hadamard matrix of this order here)"


def kron_parts(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``kron(A, B) = hadamard(n) / sqrt(n)``: ``x @ H`` is ``A^T @ x.view(m, p) @ B``. The
    Sylvester factor is split (``H_{2^(a+b)} = H_{2^a} kron H_{2^b}``) so that ``B`` is the largest power of two
    not above ``sqrt(n)``: ``m p^2 + m^2 p`` multiplies per row, near the least."""
    m, p = factors(n)
    b = 1
    while b * 2 <= p and (b * 2) ** 2 <= n:
        b *= 2
    a = torch.kron(_small(m), _sylvester(p // b))
    return a / (n // b) ** 0.5, _sylvester(b) / b**0.5


def apply_kron(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x @ kron(a, b)`` over the last dimension, in ``m*p^2 + m^2*p`` multiplies per row instead of ``(m*p)^2``."""
    m, p = a.shape[0], b.shape[0]
    y = x.reshape(*x.shape[:-1], m, p) @ b
    return (a.t() @ y).reshape(x.shape)
