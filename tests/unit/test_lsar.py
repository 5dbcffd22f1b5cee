"""LSAR: the fit recovers a planted language subspace; splitting, change and pooling."""

from __future__ import annotations

import pytest
import torch

from analysis.lsar import (
    LsarBasis,
    fit_lsar,
    language_means,
    last_token_pool,
    lsar_change,
    mean_pool,
    pool,
    split,
)
from pipeline.errors import LangpruneError

D, L = 48, 7
LANGS = ["ar", "de", "en", "es", "ru", "sw", "zh"]


def planted(seed: int = 0):
    """Language means = shared vector s + P a_k, with s orthogonal to the rank L-1 span P."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, L, generator=gen, dtype=torch.float64))
    shared, subspace = 5.0 * q[:, 0], q[:, 1:]  # orthonormal, so s is orthogonal to P
    coeffs = 2.0 * torch.randn(L - 1, L, generator=gen, dtype=torch.float64)
    return shared, subspace, shared[:, None] + subspace @ coeffs


def cos_principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    qa, _ = torch.linalg.qr(a.double())
    qb, _ = torch.linalg.qr(b.double())
    return torch.linalg.svdvals(qa.T @ qb)


def test_fit_recovers_planted_subspace_and_shared_direction():
    shared, subspace, means = planted()
    basis = fit_lsar(means, languages=LANGS)
    assert basis.rank == L - 1 and basis.basis.dtype == torch.float64
    assert torch.allclose(
        basis.basis.T @ basis.basis, torch.eye(L - 1, dtype=torch.float64), atol=1e-10
    )
    assert cos_principal_angles(basis.basis, subspace).min() > 1 - 1e-9  # angles ~ 0
    # c~ = s when s is orthogonal to P; the plain centroid (s + P mean(a_k)) is not
    assert torch.allclose(basis.shared, shared, atol=1e-8)
    assert not torch.allclose(basis.centroid, shared, atol=1e-2)
    # the agnostic part of every language mean is the shared vector
    _, agnostic = split(means.T, basis)
    assert torch.allclose(agnostic, shared.expand(L, D), atol=1e-8)


def test_fit_from_noisy_states_is_close_unlike_a_random_subspace():
    _, subspace, means = planted(1)
    gen = torch.Generator().manual_seed(2)
    states = {
        lang: means[:, k] + 0.05 * torch.randn(400, D, generator=gen, dtype=torch.float64)
        for k, lang in enumerate(LANGS)
    }
    m, langs = language_means(states)
    assert langs == sorted(LANGS) and m.shape == (D, L)
    basis = fit_lsar(m.float(), languages=langs)
    assert cos_principal_angles(basis.basis, subspace).min() > 0.99
    # a random subspace of the same rank is far from the planted one
    random = torch.randn(D, L - 1, generator=gen, dtype=torch.float64)
    assert cos_principal_angles(random, subspace).min() < 0.9


def test_split_parts_sum_and_are_orthogonal():
    _, _, means = planted()
    basis = fit_lsar(means)
    h = torch.randn(5, 3, D)
    specific, agnostic = split(h, basis)
    assert specific.dtype == torch.float32 and specific.shape == h.shape
    assert torch.allclose(specific + agnostic, h, atol=1e-5)
    assert (agnostic @ basis.basis.float()).abs().max() < 1e-4


def test_lsar_change_attributes_perturbations_to_the_right_part():
    _, subspace, means = planted()
    basis = fit_lsar(means)
    gen = torch.Generator().manual_seed(3)
    dense = torch.randn(20, D, generator=gen, dtype=torch.float64)
    in_span = subspace @ torch.randn(L - 1, 20, generator=gen, dtype=torch.float64)
    change = lsar_change(dense, dense + in_span.T, basis)
    assert change.agnostic == pytest.approx(0.0, abs=1e-9)
    assert change.specific == pytest.approx(float(in_span.norm(dim=0).mean()))
    ortho = torch.randn(20, D, generator=gen, dtype=torch.float64)
    ortho = ortho - (ortho @ subspace) @ subspace.T
    agnostic, specific = lsar_change(dense, dense - ortho, basis)
    assert specific == pytest.approx(0.0, abs=1e-9)
    assert agnostic == pytest.approx(float(ortho.norm(dim=1).mean()))


def test_fit_rejects_bad_inputs():
    with pytest.raises(LangpruneError):
        fit_lsar(torch.randn(D, 1))
    with pytest.raises(LangpruneError):
        fit_lsar(torch.randn(D, L), rank=L)
    with pytest.raises(LangpruneError):
        fit_lsar(torch.randn(D, L), languages=["en"])


def test_state_dict_round_trip():
    _, _, means = planted()
    basis = fit_lsar(means, languages=LANGS)
    again = LsarBasis.from_state_dict(
        {k: v.float() for k, v in basis.state_dict().items()}, basis.languages
    )
    assert again.languages == tuple(LANGS)
    assert torch.allclose(again.basis, basis.basis, atol=1e-6)


def test_pooling_with_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert torch.equal(last_token_pool(hidden, right), torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.equal(last_token_pool(hidden, left), hidden[:, 3])
    assert torch.equal(last_token_pool(hidden), hidden[:, -1])
    expected = torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)])
    assert torch.allclose(mean_pool(hidden, right), expected)
    assert torch.equal(pool(hidden, right, "mean"), mean_pool(hidden, right))
    with pytest.raises(LangpruneError, match="did you mean"):
        pool(hidden, right, "mea")
    with pytest.raises(ValueError):
        last_token_pool(hidden, torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_split_change_and_pooling_match_cpu():
    _, _, means = planted()
    basis = fit_lsar(means.cuda())  # the fit itself always runs on the CPU in float64
    hidden = torch.randn(4, 6, D)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]] * 2 + [[0, 0, 1, 1, 1, 1]] * 2)
    for how in ("last", "mean"):
        on_gpu = pool(hidden.cuda().bfloat16(), mask.cuda(), how)
        assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
        assert torch.allclose(on_gpu.cpu(), pool(hidden.bfloat16(), mask, how), atol=1e-5)
    dense, pruned = hidden[:, 0], hidden[:, 1]
    specific, _ = split(dense.cuda(), basis)
    assert specific.device.type == "cuda"
    gpu = lsar_change(dense.cuda(), pruned.cuda(), basis)
    cpu = lsar_change(dense, pruned, basis)
    assert gpu.agnostic == pytest.approx(cpu.agnostic, rel=1e-5)
    assert gpu.specific == pytest.approx(cpu.specific, rel=1e-5)
