"""One training loop for training, distillation and recovery: each trainer's losses pinned step by step.

The golden losses were recorded from the three trainers' own loops, before they shared ``course_lib.training``:
the same seed must give the same losses (a float tolerance: another CPU rounds matmuls differently), so a change in
the schedule, the clipping, the loss's reduction or the order of the random draws shows up here.
"""

import math
from dataclasses import replace

import pytest
import torch

from course_lib import pruning as P
from course_lib.cli.train import TrainConfig, train
from course_lib.distillation import DistillConfig, distill, make_student
from course_lib.training import fit, lr_schedule
from tests.conftest import make_tiny

TOL = dict(rel=1e-4)


def _data(seed: int = 0, n: int = 2000) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def test_train_losses_are_pinned(tmp_path):
    cfg = TrainConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                      num_kv_heads=2, seq_len=32, batch_size=4, steps=4, warmup_steps=2, eval_every=1,
                      eval_tokens=256, corpus_chars=20_000, lr=1e-2)
    hist = train(cfg, tmp_path / "m")["history"]
    assert [r["step"] for r in hist] == [1, 2, 3, 4]
    assert [r["train_loss"] for r in hist] == pytest.approx([5.712205, 5.662303, 5.346539, 5.125375], **TOL)
    # held-out loss scores every target of the held-out slice, the last partial window's too (see metrics.perplexity)
    assert [r["heldout_loss"] for r in hist] == pytest.approx([5.621134, 5.367364, 5.092004, 4.966996], **TOL)


MICRO = DistillConfig(temperature=2.0, alpha=0.5, steps=4, batch_size=4, seq_len=16, lr=5e-3, warmup_steps=2,
                      seed=0, eval_every=1)


@pytest.mark.parametrize("name, cfg, hidden, gold", [
    ("kd", MICRO, None, [2.434728, 2.424606, 2.443583, 2.420708]),
    ("reverse", replace(MICRO, kind="reverse", alpha=0.8), None, [0.976843, 0.972804, 0.981185, 0.976204]),
    ("hidden", replace(MICRO, hidden_weight=1.0), 32, [3.770001, 3.747085, 3.680393, 3.588987]),
    ("scratch", replace(MICRO, alpha=0.0), None, [4.850396, 4.838022, 4.871302, 4.865755]),
])
def test_distill_losses_are_pinned(name, cfg, hidden, gold):
    teacher = make_tiny(layers=2, seed=0)
    init = "random" if hidden or name == "scratch" else "teacher"
    student = make_student(teacher, 1, hidden_size=hidden, init=init, seed=3)
    res = distill(student, None if name == "scratch" else teacher, _data(), cfg, progress=False)
    assert [h["train_loss"] for h in res.history] == pytest.approx(gold, **TOL)


@pytest.mark.parametrize("alpha, gold", [(0.0, [4.855227, 4.865065, 4.755345, 4.662767]),
                                         (0.5, [2.440305, 2.445494, 2.391228, 2.345327])])
def test_recover_losses_are_pinned(alpha, gold):
    ids = torch.arange(64).repeat(20) % 128
    small, _ = P.pruned(make_tiny("llama"), P.PruneConfig(ratio=0.5))
    cfg = P.RecoveryConfig(steps=4, lr=3e-3, batch_size=2, seq_len=16, distill_alpha=alpha)
    log = P.recover_(small, ids, cfg, teacher=make_tiny("llama", seed=1) if alpha else None)
    assert list(log.losses) == pytest.approx(gold, **TOL)


# --- the loop itself ----------------------------------------------------------------------------------------

def _linear_problem(seed: int = 0):
    """A one-layer regression: the loop must drive its loss down."""
    from itertools import repeat

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    model = torch.nn.Linear(4, 1)
    return model, repeat((x, y)), lambda xb, yb: torch.nn.functional.mse_loss(model(xb), yb)


def test_fit_trains_sets_the_lr_and_calls_back():
    model, batches, loss_fn = _linear_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    lrs, seen = [], []
    res = fit(model, batches, loss_fn, opt, 100, lambda s: lrs.append(s) or 0.1,
              on_step=lambda done, loss: seen.append((done, model.training)), progress=False)
    assert res.steps_done == 100 and len(res.losses) == 100 and not res.stopped_early
    assert res.losses[-1] < res.losses[0] / 10
    assert lrs == list(range(100)) and opt.param_groups[0]["lr"] == 0.1
    assert seen == [(i, True) for i in range(1, 101)]  # in training mode during the step
    assert not model.training  # eval mode at the end


def test_fit_resumes_at_start_and_stops_on_its_time_budget():
    model, batches, loss_fn = _linear_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    res = fit(model, batches, loss_fn, opt, 10, lambda s: 0.1, start=7, on_step=lambda d, _: steps.append(d),
              progress=False)
    assert steps == [8, 9, 10] and res.steps_done == 3
    assert fit(model, batches, loss_fn, opt, 10, lambda s: 0.1, start=10, progress=False).steps_done == 0
    res = fit(model, batches, loss_fn, opt, 1000, lambda s: 0.1, max_seconds=1e-9, progress=False)
    assert res.stopped_early and res.steps_done == 1


@pytest.mark.parametrize("kwargs, match", [(dict(steps=0), "steps"), (dict(steps=True), "steps"),
                                           (dict(start=-1), "start"), (dict(start=11), "past the last step"),
                                           (dict(grad_clip=0), "grad_clip"), (dict(max_seconds=0), "max_seconds"),
                                           (dict(postfix_every=0), "postfix_every")])
def test_fit_refuses_bad_arguments(kwargs, match):
    model, batches, loss_fn = _linear_problem()
    args = {"steps": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        fit(model, batches, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1), args.pop("steps"),
            lambda s: 0.1, progress=False, **args)


# --- the one schedule -------------------------------------------------------------------------------------------

def test_one_schedule_gives_each_trainer_its_curve():
    """Cosine (training, distillation) waits for the warm-up; linear (recovery) decays from the first step."""
    cosine = [lr_schedule(s, 1.0, 10, warmup_steps=2, min_lr_frac=0.1) for s in range(10)]
    assert cosine[:3] == pytest.approx([0.5, 1.0, 1.0])  # warm-up, then the top of the cosine
    assert cosine[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(cosine[1:], cosine[2:]))
    linear = [lr_schedule(s, 1.0, 20, warmup_steps=10, decay="linear") for s in range(20)]
    assert linear[:2] == pytest.approx([0.1, 0.2 * 0.95]) and linear[10] == pytest.approx(0.5)
    assert lr_schedule(3, 2e-3, 10, decay="linear") == pytest.approx(2e-3 * 0.7)  # no warm-up
    with pytest.raises(ValueError, match="decay must be one of"):
        lr_schedule(0, 1.0, 10, decay="step")
