"""GRU4Rec: session-parallel batching (the exact step sequence, hidden resets), the model's shapes, its
losses against hand computations, and short trainings on a sequential pattern that each loss learns."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from recsys_spark import tables as tb
from recsys_spark.data.session_batches import (
    PAD,
    SessionData,
    SessionParallelBatches,
    sessions_from_events,
    sessions_from_padded,
)
from recsys_spark.evaluate.sessions import next_item_metrics
from recsys_spark.models.gru4rec import (
    GRU4RecNetParams,
    GRU4RecScorer,
    GRU4RecTask,
    PaperSchedule,
    fit_session_parallel,
)
from recsys_spark.nn import gru4rec as g4r
from recsys_spark.nn.gru4rec import GRU4Rec
from recsys_spark.train.distributed import LocalContext
from recsys_spark.train.trainer import TrainConfig, fit

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("torch_one_thread")]

N_ITEMS = 12




# ------------------------------------------------------------------------------------ session batches

SESSIONS = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11, 12]]  # [6] has no pair and is skipped


def test_session_parallel_steps_exact_sequence():
    steps = list(SessionParallelBatches(SESSIONS, batch_size=2))
    got = [(s.inputs.tolist(), s.targets.tolist(), s.reset.tolist(), s.active.tolist()) for s in steps]
    assert got == [
        ([1, 4], [2, 5], [True, True], [True, True]),  # row 0 <- [1, 2, 3], row 1 <- [4, 5]
        ([2, 7], [3, 8], [False, True], [True, True]),  # [4, 5] ended: row 1 <- [7, 8, 9, 10]
        ([11, 8], [12, 9], [True, False], [True, True]),  # [1, 2, 3] ended: row 0 <- [11, 12]
        ([PAD, 9], [PAD, 10], [False, False], [False, True]),  # no session left: row 0 idle
    ]


def test_every_pair_once_with_more_rows_than_sessions_and_shuffled():
    data = SessionData.from_lists(SESSIONS)
    assert data.n_sessions == 4 and data.n_events == 2 + 1 + 3 + 1
    pairs = sorted((s[i], s[i + 1]) for s in SESSIONS for i in range(len(s) - 1))
    for batches in (SessionParallelBatches(SESSIONS, 8), SessionParallelBatches(SESSIONS, 3, shuffle=True, seed=1)):
        seen = [(int(x), int(y)) for st in batches for x, y in zip(st.inputs[st.active], st.targets[st.active],
                                                                       strict=True)]
        assert sorted(seen) == pairs
    first = [s.inputs.tolist() for s in SessionParallelBatches(SESSIONS, 1, shuffle=True, seed=1)]
    shuffled = SessionParallelBatches(SESSIONS, 1, shuffle=True, seed=1)
    assert [s.inputs.tolist() for s in shuffled] == first  # reproducible per (seed, pass)
    assert [s.inputs.tolist() for s in shuffled] != first  # the next pass has a new order


def test_a_stacked_pass_holds_the_same_steps():
    batches = SessionParallelBatches(SESSIONS, batch_size=2)
    stacked = batches.stacked()  # [T, 2] each
    steps = list(batches)
    assert stacked.inputs.shape == (len(steps), 2)
    for field, column in zip(stacked, zip(*steps, strict=True), strict=True):
        assert np.array_equal(field, np.stack(column))
    assert SessionParallelBatches([[6]], batch_size=3).stacked().inputs.shape == (0, 3)  # nothing to pair


def test_sessions_from_events_and_whole_user_histories():
    keys = np.array(["b", "a", "b", "a", "c"])
    items = np.array([10, 20, 11, 21, 30])
    times = np.array([5.0, 1.0, 3.0, 2.0, 0.5])
    assert [s.tolist() for s in sessions_from_events(keys, items, times)] == [[30], [20, 21], [11, 10]]
    users = np.array([7, 7, 7, 8])  # one long session per user: the history in time order
    assert [s.tolist() for s in sessions_from_events(users, np.array([1, 2, 3, 4]), np.array([3, 1, 2, 0]))] == [
        [4], [2, 3, 1]]
    padded = np.array([[3, 4, PAD, PAD], [PAD, PAD, 5, 6]])
    assert [s.tolist() for s in sessions_from_padded(padded)] == [[3, 4], [5, 6]]


def test_hidden_state_of_a_reset_row_equals_a_fresh_start():
    model = GRU4Rec(N_ITEMS + 1, hidden=6, layers=2).eval()
    hidden = None
    with torch.no_grad():
        for step in SessionParallelBatches(SESSIONS, batch_size=2):
            inputs, reset = torch.from_numpy(step.inputs), torch.from_numpy(step.reset)
            out, hidden = model.forward_step(inputs, hidden, reset)
            for row in range(2):
                if not step.active[row]:
                    continue
                fresh_out, fresh_hidden = model.forward_step(inputs[row:row + 1])
                same = torch.allclose(out[row], fresh_out[0]) and torch.allclose(hidden[:, row], fresh_hidden[:, 0])
                assert same == bool(step.reset[row])  # a reset row is a fresh start; a continuing one is not
        # Stepping a whole session equals forward() over it from a fresh state.
        seq = torch.tensor([[7, 8, 9, 10]])
        outs, h = [], None
        for t in range(4):
            o, h = model.forward_step(seq[:, t], h)
            outs.append(o)
        assert torch.allclose(model(seq), torch.stack(outs, dim=1))


# ------------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("kwargs", [{"constrained": True}, {"constrained": False, "embedding": 5},
                                    {"constrained": False, "embedding": 0, "layers": 2}])
def test_forward_shapes_and_save_load(kwargs):
    model = GRU4Rec(N_ITEMS, hidden=8, dropout_embed=0.1, dropout_hidden=0.1, **kwargs).eval()
    items = torch.tensor([0, 3, PAD])  # PAD reads item 0 (an idle row; its output is ignored)
    out, hidden = model.forward_step(items)
    assert out.shape == (3, 8) and hidden.shape == (model.layers, 3, 8)
    assert model.scores(out).shape == (3, N_ITEMS)
    candidates = torch.tensor([4, 4, 0, 11])
    assert torch.allclose(model.scores(out, candidates), model.scores(out)[:, candidates], atol=1e-6)
    assert model(torch.tensor([[1, 2, 3], [4, 5, 6]])).shape == (2, 3, 8)
    rebuilt = GRU4Rec(**model.init_kwargs).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.forward_step(items)[0], out)
    if kwargs["constrained"]:  # the input embedding is the output item embedding
        assert model.in_emb is None and model.embed(torch.tensor([2])).shape == (1, 8)


# ---------------------------------------------------------------------------------------------- losses


def test_losses_match_hand_computations_and_mask_accidental_hits():
    # 2 rows, candidates = [target of row 0, target of row 1, one sampled item]; row i's target is column i.
    r = torch.tensor([[2.0, 0.5, -1.0], [1.0, 0.0, 3.0]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    softmax = lambda xs: [math.exp(x) / sum(math.exp(y) for y in xs) for x in xs]  # noqa: E731
    # Row 0: negatives 0.5, -1.0; row 1: negatives 1.0, 3.0.
    s0, s1 = softmax([0.5, -1.0]), softmax([1.0, 3.0])
    bpr0 = -math.log(s0[0] * sig(2.0 - 0.5) + s0[1] * sig(2.0 + 1.0)) + 0.5 * (s0[0] * 0.25 + s0[1] * 1.0)
    bpr1 = -math.log(s1[0] * sig(0.0 - 1.0) + s1[1] * sig(0.0 - 3.0)) + 0.5 * (s1[0] * 1.0 + s1[1] * 9.0)
    assert g4r.bpr_max(r, reg=0.5).item() == pytest.approx((bpr0 + bpr1) / 2, rel=1e-5)
    top0 = s0[0] * (sig(0.5 - 2.0) + sig(0.25)) + s0[1] * (sig(-1.0 - 2.0) + sig(1.0))
    top1 = s1[0] * (sig(1.0 - 0.0) + sig(1.0)) + s1[1] * (sig(3.0 - 0.0) + sig(9.0))
    assert g4r.top1_max(r).item() == pytest.approx((top0 + top1) / 2, rel=1e-5)
    ce0 = -math.log(softmax([2.0, 0.5, -1.0])[0])
    ce1 = -math.log(softmax([1.0, 0.0, 3.0])[1])
    assert g4r.cross_entropy(r).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-5)
    log_q = torch.tensor([0.1, -0.2, 0.3])
    ce_q = -math.log(softmax([2.0 - 0.1, 0.5 + 0.2, -1.0 - 0.3])[0])
    assert g4r.cross_entropy(r[:1], log_q=log_q).item() == pytest.approx(ce_q, rel=1e-5)
    # An accidental hit (row 1's sampled item is its own target) is not a negative; idle rows do not count.
    mask = torch.tensor([[True, True, True], [True, True, False]])
    ce1_masked = -math.log(softmax([1.0, 0.0])[1])
    assert g4r.cross_entropy(r, mask).item() == pytest.approx((ce0 + ce1_masked) / 2, rel=1e-5)
    assert g4r.cross_entropy(r, mask, valid=torch.tensor([False, True])).item() == pytest.approx(ce1_masked, rel=1e-5)
    # Steps scored at once ([T, B, M]) sum to the steps' own sums, each with its own mask and rows.
    steps, masks = torch.stack([r, r.flip(0)]), torch.stack([mask, mask])
    valid = torch.tensor([[True, True], [False, True]])
    for loss in (g4r.cross_entropy, g4r.bpr_max, g4r.top1_max):
        each = sum(loss(steps[t], masks[t], valid=valid[t], reduction="sum") for t in range(2))
        assert loss(steps, masks, valid=valid, reduction="sum").item() == pytest.approx(each.item(), rel=1e-6)
    # A row with no usable negative adds nothing, and its gradient is finite.
    lonely = torch.tensor([[1.0]], requires_grad=True)
    for loss in (g4r.bpr_max(lonely), g4r.top1_max(lonely), g4r.cross_entropy(lonely)):
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(lonely.grad).all()


# ------------------------------------------------------------------------------ training on a pattern


def _pattern_sessions(n: int, seed: int = 0) -> list[list[int]]:
    """Sessions that walk the catalogue: the item after i is always (i + 1) mod N_ITEMS."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start, length = rng.integers(N_ITEMS), rng.integers(2, 7)
        out.append([(start + t) % N_ITEMS for t in range(length)])
    return out


def _params(loss: str, **overrides) -> GRU4RecNetParams:
    base = {"hidden": 16, "parallel": 8, "n_sample": 6, "sample_alpha": 0.5, "dropout_hidden": 0.0,
            "loss": loss, "bpreg": 0.5, "elu_param": 0.5 if loss == "bpr-max" else 0.0, "seed": 0}
    return GRU4RecNetParams(**{**base, **overrides})


@pytest.mark.parametrize("loss", ["ce", "bpr-max", "top1-max"])
def test_each_loss_lowers_and_learns_the_next_item(loss):
    train, valid = _pattern_sessions(150), _pattern_sessions(30, seed=1)
    counts = np.bincount(np.concatenate(train), minlength=N_ITEMS)
    task = GRU4RecTask(_params(loss), N_ITEMS, item_counts=counts, holdout_sessions=valid, k=1)
    before = task.validate(task.build_model())
    model, history = fit_session_parallel(task, train, PaperSchedule(lr=0.1, epochs=4))
    assert history[-1]["loss"] < history[0]["loss"]
    assert before["recall@1"] < 0.3 and history[-1]["recall@1"] >= 0.95  # the successor is ranked first
    assert history[-1]["events_per_s"] > 0
    # The trained weights as a broadcastable scorer give the same metrics.
    scorer = pickle.loads(pickle.dumps(GRU4RecScorer.from_model(model)))
    again = next_item_metrics(scorer.start(16), valid, ks=[1])
    assert again["recall@1"] == pytest.approx(history[-1]["recall@1"])


@pytest.mark.parametrize("loss", ["ce", "bpr-max", "top1-max"])
def test_idle_rows_change_no_loss_and_no_gradient(loss):
    # 3 sessions on 4 or 9 rows: the same steps, only more idle rows, whose targets must be neither
    # candidates of the active rows nor rows of the mean per event.
    sessions = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    padded = torch.full((3, 4), PAD, dtype=torch.long)
    for row, s in enumerate(sessions):
        padded[row, : len(s)] = torch.tensor(s)
    counts = np.ones(N_ITEMS)
    losses, grads = [], []
    for parallel in (4, 9):
        task = GRU4RecTask(_params(loss, parallel=parallel, n_sample=0), N_ITEMS, item_counts=counts)
        model = task.build_model()
        value = task.loss(model, {tb.ITEMS: padded})
        value.backward()
        losses.append(value.item())
        grads.append(model.out_emb.weight.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and losses[0] > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


def test_gru4rec_task_through_the_trainer():
    sessions = _pattern_sessions(200)
    L = 6
    padded = np.full((len(sessions), L), PAD, dtype=np.int64)
    for row, s in enumerate(sessions):
        padded[row, : len(s)] = s
    counts = np.bincount(np.concatenate(sessions), minlength=N_ITEMS)
    task = GRU4RecTask(_params("bpr-max"), N_ITEMS, item_counts=counts, holdout_sessions=_pattern_sessions(20, 1))
    task = pickle.loads(pickle.dumps(task))
    shard = {tb.ITEMS: torch.from_numpy(padded)}
    config = TrainConfig(epochs=8, batch_size=32, lr=0.01, optimizer="adam", schedule="constant", progress=False)
    result = fit(task, LocalContext(), shard, steps_per_epoch=6, config=config)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.history[-1]["recall@20"] == 1.0 and result.history[-1]["mrr@20"] > 0.5
    assert result.init_kwargs == task.build_model().init_kwargs
    # A batch without any session of two items still gives a (zero) loss with a gradient path.
    model = task.build_model()
    empty = task.loss(model, {tb.ITEMS: torch.tensor([[3, PAD, PAD]])})
    empty.backward()
    assert empty.item() == 0.0
