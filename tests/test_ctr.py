"""Wide&Deep and DCN: the cross layer against the paper's formula by hand, the wide part's hashed cross
index, the crosses' field patterns, rebuild from ``init_kwargs``, and a planted feature interaction that
each model's cross part learns and a purely additive model cannot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys_spark.data.feature_spec import FeatureSpec
from recsys_spark.models.field_base import score_candidates, score_catalogue
from recsys_spark.models.widedeep import WideDeepNetParams, resolve_crosses
from recsys_spark.nn.dcn import DCN
from recsys_spark.nn.deepfm import DeepFM
from recsys_spark.nn.widedeep import WideDeep, cross_index
from recsys_spark.train.distributed import run_one_rank

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("torch_one_thread")]


def test_cross_layers_follow_the_formula_by_hand():
    """x_{l+1} = x_0 x_l^T w_l + b_l + x_l on x_0 = [1, 2]: layer 1 has x_l = x_0, layer 2 x_l = x_1."""
    model = DCN([3], dim=2, hidden=[], cross_layers=2)  # d = 1 field x 2 = 2
    with torch.no_grad():
        model.cross_weight.copy_(torch.tensor([[0.5, -1.0], [1.0, 1.0]]))  # w_0, w_1
        model.cross_bias.copy_(torch.tensor([[0.1, 0.2], [0.0, 0.0]]))  # b_0, b_1
    x0 = torch.tensor([[1.0, 2.0]])
    # x_0^T w_0 = 0.5 - 2 = -1.5: x_1 = [1, 2](-1.5) + [0.1, 0.2] + [1, 2] = [-0.4, -0.8]
    # x_1^T w_1 = -1.2:           x_2 = [1, 2](-1.2) + [0, 0] + [-0.4, -0.8] = [-1.6, -3.2]
    assert torch.allclose(model.cross_network(x0), torch.tensor([[-1.6, -3.2]]))
    one = DCN([3], dim=2, hidden=[], cross_layers=1)
    with torch.no_grad():
        one.cross_weight.copy_(model.cross_weight[:1])
        one.cross_bias.copy_(model.cross_bias[:1])
    assert torch.allclose(one.cross_network(x0), torch.tensor([[-0.4, -0.8]]))
    matrix = DCN([3], dim=2, hidden=[], cross_layers=1, cross="matrix")  # DCN-V2: x_0 * (W x_0 + b) + x_0
    with torch.no_grad():
        matrix.cross_weight.copy_(torch.tensor([[[1.0, 0.0], [1.0, 1.0]]]))
        matrix.cross_bias.zero_()
    assert torch.allclose(matrix.cross_network(x0), torch.tensor([[1 * 1 + 1, 2 * 3 + 2]], dtype=torch.float))
    # The logit reads [x_L; h] with the deep tower beside it.
    full = DCN([3, 4], dim=2, hidden=[5], cross_layers=2)
    fields = torch.tensor([[1, 3], [2, 0]])
    x0 = full.field_vectors(full.rows(fields)).flatten(1)
    assert torch.allclose(full(fields), full.logit(torch.cat([full.cross_network(x0), full.deep(x0)], -1))[:, 0])


def test_cross_index_is_deterministic_within_buckets_and_inactive_for_unknown_values():
    cards = [50, 7, 30]
    model = WideDeep(cards, dim=2, hidden=[], crosses=[[0, 2], [1, 2]], cross_buckets=97)
    g = torch.Generator().manual_seed(0)
    fields = torch.stack([torch.randint(c, (5000,), generator=g) for c in cards], dim=1)  # [B, 3]
    index = cross_index(fields, model.crosses, model.right_sizes, model.starts, 97)  # [B, 2]
    rebuilt = WideDeep(**model.init_kwargs)
    assert torch.equal(index, cross_index(fields, rebuilt.crosses, rebuilt.right_sizes, rebuilt.starts, 97))
    assert index.shape == (5000, 2) and index.min() >= 0 and index.max() < 97
    unknown = (fields[:, [0, 1]] == 0) | (fields[:, [2, 2]] == 0)
    assert (index[unknown] == 0).all() and (index[~unknown] > 0).all()
    # Known pairs spread over the buckets: every bucket but 0 used by 50 x 30 + 7 x 30 distinct pairs.
    assert len(torch.unique(index[~unknown])) == 96
    # The same values in another cross land elsewhere (its own exact range before hashing).
    same = torch.tensor([[3, 3, 5]])
    first, second = cross_index(same, model.crosses, model.right_sizes, model.starts, 97)[0].tolist()
    assert first != second
    # Row 0 is the inactive cross: its weight stays 0 through training (no gradient).
    model.cross_weight(index).sum().backward()
    assert model.cross_weight.weight.grad[0].item() == 0 and model.cross_weight.weight[0].item() == 0


def test_cross_patterns_resolve_to_query_item_field_pairs():
    cards = {"user_idx": 5, "occupation": 4, "item_idx": 6, "genre_drama": 3, "genre_war": 3}
    spec = FeatureSpec(("user_idx", "occupation"), ("item_idx", "genre_drama", "genre_war"), (), cards)
    pairs, unmatched = resolve_crosses([["occupation", "genre_*"], ["user_idx", "genre_war"],
                                        ["occupation", "genre_drama"], ["gender", "genre_*"],
                                        ["genre_war", "occupation"]], spec)
    assert pairs == [[1, 3], [1, 4], [0, 4]]  # in pattern order, no repeat of occupation x genre_drama
    assert unmatched == [["gender", "genre_*"], ["genre_war", "occupation"]]  # no such field; wrong sides
    kwargs = WideDeepNetParams(crosses=[["occupation", "genre_*"]], cross_buckets=64).network_kwargs(spec)
    assert kwargs["crosses"] == [[1, 3], [1, 4]] and kwargs["cross_buckets"] == 64
    with pytest.raises(ValueError, match="pair"):
        WideDeepNetParams(crosses=[["occupation"]])


@pytest.mark.parametrize("network", [WideDeep, DCN])
def test_rebuild_unseen_values_and_the_ranker_api(network):
    model = network([3, 4, 5], dim=4, hidden=[8], **({"crosses": [[0, 2]]} if network is WideDeep else {}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.eval()
    fields = torch.tensor([[1, 2, 3], [2, 0, 4]])
    rebuilt = network(**model.init_kwargs).eval()  # save -> load: state_dict + JSON constructor arguments
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt(fields), model(fields))
    assert torch.equal(model(torch.tensor([[1, 9, 3]])), model(torch.tensor([[1, 0, 3]])))  # unseen -> unknown
    query, items = fields[:, :1], torch.tensor([[0, 1], [3, 4], [2, 2]])  # 2 users x 3 items
    with torch.no_grad():
        full = score_catalogue(model, query, items)
        expected = torch.stack([model(torch.cat([query[u].expand(3, 1), items], dim=1)) for u in range(2)])
        reranked = score_candidates(model, query, items, [[2, 0], [1]], n_items=3)
    assert torch.allclose(full, expected, rtol=1e-4, atol=1e-4)
    assert np.allclose(reranked[0, [2, 0]], full[0, [2, 0]].numpy(), rtol=1e-4, atol=1e-4)
    assert np.isneginf(reranked[1, [0, 2]]).all()  # only each row's candidates are scored


def _fit_parity(model: torch.nn.Module, steps: int = 100) -> float:
    """Full-batch BCE on the planted interaction: y = 1 when a + b is even (a, b in 1..4), each value pair
    once. Additively f(a) + g(b) cannot fit it: every value of a is positive with half the values of b."""
    a, b = torch.meshgrid(torch.arange(1, 5), torch.arange(1, 5), indexing="ij")
    fields = torch.stack([a.flatten(), b.flatten()], dim=1)  # [16, 2]
    y = ((fields.sum(1) % 2) == 0).float()  # [16]
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(fields), y)
        loss.backward()
        opt.step()
    return float(loss.detach())


def test_cross_parts_learn_a_planted_interaction_an_additive_model_cannot():
    torch.manual_seed(0)
    additive = _fit_parity(WideDeep([5, 5], dim=4, hidden=[]))  # linear in one-hots and embeddings
    wide = _fit_parity(WideDeep([5, 5], dim=4, hidden=[], crosses=[[0, 1]], cross_buckets=1024))
    cross = _fit_parity(DCN([5, 5], dim=4, hidden=[], cross_layers=2))  # the cross network alone
    assert additive > 0.6  # ln 2 = 0.69: no better than chance
    assert wide < 0.1 and cross < 0.1


def _ddp_steps(ctx, network):
    """Three steps of a field network with no numeric field, as a ``torch`` rank runs them (DDP)."""
    torch.manual_seed(0)
    model = network([3, 4, 5], dim=4, hidden=[8])
    step_model, opt = ctx.prepare(model, torch.optim.Adam(model.parameters(), lr=0.01))
    fields, y = torch.tensor([[1, 2, 3], [2, 0, 4]]), torch.tensor([1.0, 0.0])
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(step_model(fields), y).backward()
        opt.step()
    return type(step_model).__name__


@pytest.mark.parametrize("network", [DeepFM, WideDeep, DCN])
def test_field_networks_without_numeric_fields_train_under_ddp(network):
    # The empty numeric parameters once got no gradient, which DDP refuses from its second step on:
    # the ``torch`` backend failed for every field model on data without numeric features.
    assert run_one_rank(lambda ctx: _ddp_steps(ctx, network), "torch") == "DistributedDataParallel"
