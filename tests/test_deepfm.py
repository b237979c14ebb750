"""DeepFM: the FM term against a brute-force double loop, shapes, unseen values, save/load, a short training
that lowers BCE (through the trainer too), and cold users whose recommendations follow their features."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from recsys_spark import tables as tb
from recsys_spark.data.feature_spec import FeatureSpec
from recsys_spark.models.deepfm import DeepFMNetParams, DeepFMTask, score_candidates, score_catalogue
from recsys_spark.nn.deepfm import DeepFM
from recsys_spark.scoring import top_k_of_scores
from recsys_spark.train.distributed import LocalContext
from recsys_spark.train.task import Holdout
from recsys_spark.train.trainer import TrainConfig, fit

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("torch_one_thread")]

GROUP = "group"  # a user feature: which half of the catalogue the user likes
GENRE = "genre"  # an item feature: which half of the catalogue the item is in
USERS, ITEMS = 40, 20




def _randomised(model: DeepFM) -> DeepFM:
    """Weights away from the near-zero initialisation, so every term matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def test_fm_second_order_matches_brute_force_over_field_pairs():
    model = _randomised(DeepFM([3, 4, 5], n_numeric=2, dim=4, hidden=[8]))
    fields = torch.tensor([[0, 1, 2], [2, 3, 4], [1, 0, 0]])
    numeric = torch.tensor([[0.5, -1.0], [2.0, 0.0], [1.0, 1.0]])
    first, vectors = model.embed(fields, numeric)
    assert vectors.shape == (3, 5, 4)
    for b in range(3):
        rows = fields[b] + model.offsets
        e = [model.embedding.weight[r] for r in rows] + [numeric[b, j] * model.numeric_embedding[j] for j in range(2)]
        brute = sum(torch.dot(e[i], e[j]) for i in range(5) for j in range(i + 1, 5))
        assert torch.allclose(model.fm_second_order(vectors)[b], brute, atol=1e-5)
        w = model.weight.weight[rows, 0].sum() + (numeric[b] * model.numeric_weight).sum()
        assert torch.allclose(first[b], w, atol=1e-6)
        logit = model.bias + w + brute + model.mlp(torch.cat(e).unsqueeze(0))[0, 0]
        assert torch.allclose(model(fields[b:b + 1], numeric[b:b + 1])[0], logit, atol=1e-4)


def test_forward_shapes_unseen_values_and_item_scoring():
    model = _randomised(DeepFM([3, 4, 5], dim=4, hidden=[8, 4], dropout=0.1)).eval()
    fields = torch.tensor([[1, 2, 3], [2, 0, 4]])
    assert model(fields).shape == (2,)
    # A value past a field's cardinality (a vocabulary grown after training) reads as unknown (0).
    assert torch.equal(model(torch.tensor([[1, 9, 3]])), model(torch.tensor([[1, 0, 3]])))
    with pytest.raises(ValueError, match="expected 3 fields"):
        model(torch.tensor([[1, 2]]))
    query, items = fields[:, :1], torch.tensor([[0, 1], [3, 4], [2, 2]])  # 2 users x 3 items, Fq=1, Fi=2
    scores = model.score_items(query, items)
    assert scores.shape == (2, 3)
    expected = torch.stack([model(torch.cat([query[u].expand(3, 1), items], dim=1)) for u in range(2)])
    assert torch.allclose(scores, expected, atol=1e-6)
    per_row = model.score_items(query, items.unsqueeze(0).expand(2, 3, 2))
    assert torch.allclose(per_row, scores, atol=1e-6)
    rebuilt = DeepFM(**model.init_kwargs).eval()  # save -> load: state_dict + JSON constructor arguments
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt(fields), model(fields))


def _spec() -> FeatureSpec:
    cards = {tb.USER_IDX: USERS + 1, GROUP: 3, tb.ITEM_IDX: ITEMS + 1, GENRE: 3}
    return FeatureSpec((tb.USER_IDX, GROUP), (tb.ITEM_IDX, GENRE), (), cards)


def _item_fields() -> np.ndarray:
    """Items 0..9 are genre 1, items 10..19 genre 2; the id field is idx + 1."""
    return np.stack([np.arange(ITEMS) + 1, np.where(np.arange(ITEMS) < ITEMS // 2, 1, 2)], axis=1)


def _positives(seed: int = 0) -> dict[str, torch.Tensor]:
    """Users 0..19 are group 1 and like genre 1; users 20..39 group 2, genre 2: 6 items each."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(USERS):
        liked = np.arange(ITEMS // 2) + (0 if u < USERS // 2 else ITEMS // 2)
        for i in rng.choice(liked, size=6, replace=False):
            users.append(u)
            items.append(int(i))
    users, items = np.array(users), np.array(items)
    groups = np.where(users < USERS // 2, 1, 2)
    fields = np.concatenate([np.stack([users + 1, groups], axis=1), _item_fields()[items]], axis=1)
    return {tb.USER_IDX: torch.as_tensor(users), tb.ITEM_IDX: torch.as_tensor(items),
            tb.FIELDS: torch.as_tensor(fields)}


def _task(**overrides) -> DeepFMTask:
    params = DeepFMNetParams(**{"dim": 8, "hidden": [16], "dropout": 0.0, "n_negatives": 4, "id_dropout": 0.2,
                             "seed": 0, **overrides})
    return DeepFMTask(params, _spec(), _item_fields())


def _train(task: DeepFMTask, steps: int, batch: int = 64, lr: float = 0.01) -> tuple[torch.nn.Module, list[float]]:
    data = _positives()
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    history = []
    n = len(data[tb.ITEM_IDX])
    for _ in range(steps):
        idx = torch.randint(n, (batch,), generator=g)
        opt.zero_grad()
        loss = task.loss(model, {k: v[idx] for k, v in data.items()})
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return model.eval(), history


def test_short_training_lowers_bce():
    task = _task()
    _, history = _train(task, steps=250)
    first, last = np.mean(history[:10]), np.mean(history[-10:])
    assert first > 4 * np.log(2) * 0.9  # 1 positive + 4 negatives near logit 0: about 5 log 2
    assert last < 0.6 * first


def test_id_dropout_makes_whole_users_cold_as_serving_does():
    """A dropped user loses its id and its activity fields (not its side fields) in the positive and all
    its negatives; item ids drop row by row. That is the query a user the model never saw gets."""
    activity = f"{tb.ACTIVITY_PREFIX}view"
    cards = {tb.USER_IDX: 101, activity: 5, GROUP: 3, tb.ITEM_IDX: 51, GENRE: 3}
    spec = FeatureSpec((tb.USER_IDX, activity, GROUP), (tb.ITEM_IDX, GENRE), (), cards)
    assert spec.history_fields == (tb.USER_IDX, activity)
    items = np.stack([np.arange(50) + 1, np.ones(50, dtype=int)], axis=1)
    task = DeepFMTask(DeepFMNetParams(id_dropout=0.3, seed=0), spec, items)
    rows = torch.tensor([7, 4, 2, 9, 1]).repeat(2000, 5, 1)  # [B, 1 + n, F]: id 7, activity 4, group 2
    out = task._make_cold(rows)
    cold = out[:, :, 0] == 0  # [B, 1 + n]
    assert (cold == cold[:, :1]).all() and 0.25 < cold[:, 0].float().mean() < 0.35  # whole groups, ~30%
    assert (out[:, :, 1][cold] == 0).all() and (out[:, :, 1][~cold] == 4).all() and (out[:, :, 2] == 2).all()
    item_cold = out[:, :, 3] == 0
    assert 0.25 < item_cold.float().mean() < 0.35 and not (item_cold == item_cold[:, :1]).all()
    assert (out[:, :, 4] == 1).all() and torch.equal(rows[0, 0], torch.tensor([7, 4, 2, 9, 1]))  # input intact


def test_cold_user_recommendations_follow_the_feature_group():
    task = _task()
    model, _ = _train(task, steps=300)
    model.eval()
    table = torch.as_tensor(task.item_fields)

    def top(query: torch.Tensor, k: int, seen=None) -> list[list[int]]:
        """The serving path: the network over the whole catalogue, then the shared top-k."""
        with torch.no_grad():
            scores = score_catalogue(model, query, table).float().numpy()  # [U, ITEMS]
        recs = top_k_of_scores(np.arange(len(query)), scores, seen, np.arange(ITEMS), k)
        return [recs[recs[tb.USER_IDX] == row][tb.ITEM_IDX].tolist() for row in range(len(query))]

    cold = torch.tensor([[0, 1], [0, 2]])  # unknown user id (0), group 1 / group 2
    first, second = top(cold, 10)
    assert set(first) == set(range(10))  # group 1's taste: genre 1
    assert set(second) == set(range(10, 20))  # group 2's taste: genre 2
    # Re-ranking candidates gives the same scores as full scoring; a warm user's seen items can be excluded.
    candidates = [3, 15, 7]
    with torch.no_grad():
        full = score_catalogue(model, cold, table).float().numpy()
        reranked = score_candidates(model, cold, table, [candidates, candidates], n_items=ITEMS)
    assert np.allclose(reranked[:, candidates], full[:, candidates], atol=1e-5)
    assert np.isneginf(reranked).sum() == 2 * (ITEMS - len(candidates))  # only the candidates are scored
    warm = torch.tensor([[21, 2]])  # user 20, group 2
    (best,) = top(warm, 5, seen=[np.array([10, 11, 12])])
    assert not set(best) & {10, 11, 12} and set(best) <= set(range(10, 20))


def test_deepfm_task_through_the_trainer_with_validation():
    data = _positives()
    users = torch.arange(USERS)
    seen = [data[tb.ITEM_IDX][data[tb.USER_IDX] == u].tolist() for u in range(USERS)]
    # Hold out one unseen item of the user's own half: the target the model should rank high.
    targets = [next(i for i in range(u // (USERS // 2) * 10, u // (USERS // 2) * 10 + 10) if i not in s)
               for u, s in zip(range(USERS), seen, strict=True)]
    queries = np.stack([users.numpy() + 1, np.where(users.numpy() < USERS // 2, 1, 2)], axis=1)
    holdout = Holdout.from_lists(queries, np.array(targets), seen, k=5)
    task = DeepFMTask(DeepFMNetParams(dim=8, hidden=[16], dropout=0.0, seed=0), _spec(), _item_fields(),
                      item_counts=np.bincount(data[tb.ITEM_IDX].numpy(), minlength=ITEMS), holdout=holdout)
    task = pickle.loads(pickle.dumps(task))  # what the launcher does to ship it to a rank
    config = TrainConfig(epochs=10, batch_size=48, lr=0.03, progress=False, seed=0)
    result = fit(task, LocalContext(), data, steps_per_epoch=5, config=config)
    history = result.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["hr@5"] >= 0.9  # 4 unseen items of the right half, 14 candidates: chance is 5/14
    model = DeepFM(**result.init_kwargs)
    model.load_state_dict(result.state_dict)
    assert result.init_kwargs == task.build_model().init_kwargs


def test_candidate_scores_and_reciprocal_rank_fusion():
    """Re-ranking scores only each row's candidates; rrf sums 1/(k + rank) of DeepFM's and the list's order."""
    class ItemValue(torch.nn.Module):  # logit = the item's one field: the network's order is known
        def score_items(self, query, items):
            return items[..., 0].float() + 0 * query[:, :1].float()

    items = torch.tensor([[10], [5], [1], [3], [7]])  # item i's logit
    query = torch.zeros(2, 1, dtype=torch.long)
    candidates = [[3, 1, 2, 0], [4]]  # the candidate model's order, best first; row 2 has one candidate
    plain = score_candidates(ItemValue(), query, items, candidates, n_items=5)
    assert plain[0].tolist() == [10, 5, 1, 3, -np.inf] and plain[1].tolist() == [-np.inf] * 4 + [7]
    fused = score_candidates(ItemValue(), query, items, candidates, n_items=5, rrf_k=1.0)
    own = {0: 1, 1: 2, 3: 3, 2: 4}  # DeepFM's ranks among row 0's candidates
    listed = {3: 1, 1: 2, 2: 3, 0: 4}
    expected = [1 / (1 + own[i]) + 1 / (1 + listed[i]) for i in range(4)]
    assert np.allclose(fused[0, :4], expected) and fused[0, 4] == -np.inf
    assert np.argmax(fused[0]) == 3 and np.argmax(plain[0]) == 0  # the fusion promotes ALS's first pick
    assert np.isclose(fused[1, 4], 1 / 2 + 1 / 2)
