"""Mult-VAE's network against the paper's dense formulation on tiny inputs (no Spark)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recsys_spark.models.multvae import MultVAENetParams, MultVAETask, padded
from recsys_spark.nn.multvae import MultVAE, gaussian_kl, kl_weight, multinomial_nll

pytestmark = pytest.mark.torch

ITEMS = torch.tensor([[0, 3, 4, -1], [2, -1, -1, -1], [1, 2, 3, 5]])  # [B, L], PAD_IDX = -1


def dense(items: torch.Tensor, n_items: int) -> torch.Tensor:
    x = torch.zeros(items.shape[0], n_items)
    for row, its in enumerate(items.tolist()):
        x[row, [i for i in its if i >= 0]] = 1.0
    return x


def test_encoder_reads_the_normalised_dense_vector():
    torch.manual_seed(0)
    net = MultVAE(6, hidden=5, latent=3).eval()
    x = F.normalize(dense(ITEMS, 6), dim=1)  # x_u / ||x_u||, as the paper's code
    h = torch.tanh(x @ net.item_in.weight + net.in_bias)  # the dense product the EmbeddingBag replaces
    mu, logvar = net.encode(ITEMS)
    expected = net.to_latent(h)
    assert torch.allclose(mu, expected[:, :3], atol=1e-6) and torch.allclose(logvar, expected[:, 3:], atol=1e-6)
    logits, mu_eval, _ = net(ITEMS)  # eval decodes μ, deterministically
    assert torch.allclose(logits, net.decode(mu), atol=1e-6) and torch.equal(net(ITEMS)[0], logits)
    wider = torch.cat([ITEMS, torch.full((3, 2), -1)], dim=1)  # more padding changes nothing
    assert torch.allclose(net.score_all(wider), logits, atol=1e-6)


def test_losses_match_their_formulas():
    logits = torch.randn(3, 6)
    expected = -(F.log_softmax(logits, dim=1) * dense(ITEMS, 6)).sum(1)
    assert torch.allclose(multinomial_nll(logits, ITEMS), expected, atol=1e-5)
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    # -1/2 Σ (1 + logvar - mu² - e^logvar) = -1/2 [(1 + 0 - 1 - 1) + (1 + 2 - 0 - e²)]
    assert gaussian_kl(mu, logvar).item() == pytest.approx(-0.5 * (-1 + 3 - torch.e ** 2), rel=1e-5)
    assert [kl_weight(s, 100, 0.2) for s in (0, 10, 20, 500)] == [0.0, 0.1, 0.2, 0.2]
    assert kl_weight(0, 0, 0.3) == 0.3


def test_training_step_anneals_beta_and_dae_has_no_kl():
    task = MultVAETask(MultVAENetParams(hidden=4, latent=2, total_anneal_steps=4), n_items=6)
    net = task.build_model().train()
    losses = [task.loss(net, {"items": ITEMS}) for _ in range(3)]
    assert int(net.anneal_steps) == 3 and all(torch.isfinite(x) for x in losses)
    dae_task = MultVAETask(MultVAENetParams(variant="dae", hidden=4, latent=2, dropout=0.0), n_items=6)
    dae = dae_task.build_model().train()
    logits, _, logvar = dae(ITEMS)
    assert logvar is None
    assert dae_task.loss(dae, {"items": ITEMS}).item() == pytest.approx(multinomial_nll(logits, ITEMS).mean().item(),
                                                                        rel=1e-5)


def test_padded_lists_and_bad_shapes():
    assert padded([[4, 2], [], [7]]).tolist() == [[4, 2], [-1, -1], [7, -1]]
    with pytest.raises(ValueError, match="variant"):
        MultVAE(6, variant="ae")
