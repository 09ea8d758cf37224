"""OptG from trained weights: start modes, score warm-up, magnitude prior, swap bound, guard."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import optg
from optg.criteria import LearnedScores
from optg.patterns import global_masks
from optg.sparsifier import bound_swaps
from optg.targets import LayerPlan


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 4))


def data(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def train(model, sp, epochs, steps, watch=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = data(epochs * steps)
    for e in range(epochs):
        sp.start_epoch(e)
        for x, y in batches[e * steps:(e + 1) * steps]:
            if watch is not None:
                watch(sp)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sp.step(lr=0.05)


def test_nothing_is_pruned_before_the_warmup_step_count():
    model = net()
    sp = optg.create("optg", model, target=0.8, epochs=4, steps_per_epoch=5, update_every_steps=1,
                     score_warmup_steps=7, score_lr_coupled=False).attach()
    seen = []

    def watch(s):  # before each step: global_step steps done so far, the mask in force now
        seen.append((s.global_step, float(s.sparsity())))

    train(model, sp, 4, 5, watch)
    assert [p for step, p in seen if step < 7] == [0.0] * 7
    assert min(step for step, p in seen if p > 0) >= 7
    assert sp.sparsity() == pytest.approx(0.8, abs=1e-3)


@pytest.mark.parametrize("epochs,warmup", [(2, 4), (3, 9), (5, 2)])
def test_with_a_warmup_the_last_epoch_still_holds_the_exact_pattern(epochs, warmup):
    model = net()
    sp = optg.create("optg", model, pattern="2:4", epochs=epochs, steps_per_epoch=5,
                     score_warmup_steps=warmup, score_lr_coupled=False).attach()
    train(model, sp, epochs, 5)
    assert sp.fraction == 1.0 and sp.sparsity() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="before the last epoch"):
        optg.create("optg", net(), pattern="2:4", epochs=2, steps_per_epoch=5, score_warmup_steps=5)


def test_scores_learn_during_the_warmup_with_the_lr_decoupled_from_the_schedule():
    model = net()
    sp = optg.create("optg", model, target=0.8, epochs=4, steps_per_epoch=5,
                     score_warmup_steps=5, score_lr_coupled=False).attach()
    train(model, sp, 1, 5)
    assert sp.fraction == 0.0 and all(float(l.scores.detach().abs().sum()) > 0 for l in sp.layers)
    coupled = optg.create("optg", net(), target=0.8, epochs=4, steps_per_epoch=5).attach()
    train(coupled.model, coupled, 1, 5)  # the authors' lr: p(0)/p_target is tiny, scores barely move
    assert sum(float(l.scores.detach().abs().sum()) for l in coupled.layers) < 1e-3 * sum(
        float(l.scores.detach().abs().sum()) for l in sp.layers)


def test_magnitude_prior_is_scale_times_abs_w_over_the_mean_of_all_targets():
    w = torch.tensor([[1.0, -2.0, 0.0, 5.0], [-4.0, 0.5, 3.0, -0.5]])
    v = torch.tensor([[2.0, -2.0]])  # mean |w| over both layers: 20 / 10 = 2
    criterion = LearnedScores(init="magnitude", scale=3.0)
    criterion.setup({"a": w, "b": v}, seed=0)
    s = criterion.scores("a", w)
    assert torch.equal(s.detach(), torch.tensor([[1.5, 3.0, 0.0, 7.5], [6.0, 0.75, 4.5, 0.75]]))
    assert torch.equal(criterion.scores("b", v).detach(), torch.tensor([[3.0, 3.0]]))
    assert s.requires_grad
    assert torch.equal(s.argsort(), w.abs().argsort())  # ranks exactly as |w|
    assert torch.equal(criterion.ranking("a", w * 0), s.detach())  # fixed at attach
    criterion = LearnedScores()
    criterion.setup({"a": w}, seed=0)
    assert torch.equal(criterion.scores("a", w).detach(), torch.zeros_like(w))


def test_live_prior_ranks_learned_scores_plus_the_current_magnitude():
    w = torch.tensor([[1.0, -2.0, 0.0, 5.0], [-4.0, 0.5, 3.0, -0.5]])  # mean |w| = 2
    criterion = LearnedScores(init="live", scale=2.0)
    criterion.setup({"a": w}, seed=0)
    assert torch.equal(criterion.scores("a", w).detach(), torch.zeros_like(w))  # learned part starts at 0
    with torch.no_grad():
        criterion.scores("a", w).add_(1.0)
    moved = w * 2  # the prior follows the weights; its unit stays the mean at attach
    assert torch.equal(criterion.ranking("a", moved), 1.0 + 2.0 * moved.abs() / 2.0)


def test_swap_bound_is_honoured_exactly():
    plan = LayerPlan("fc", optg.Pattern.parse("unstructured", 0.4))
    scores = [torch.arange(10.0)]                      # new evidence: higher index, more important
    before = [torch.arange(10) < 6]                   # kept 0..5, pruned 6..9
    unbounded = global_masks([plan], scores, 1.0)
    assert int((unbounded[0] & ~before[0]).sum()) == 4  # would revive all of 6..9
    keep = bound_swaps(global_masks, [plan], scores, 1.0, before, unbounded, 2 / 6)  # floor(2) revivals
    assert torch.equal(keep[0], torch.tensor([False, False, True, True, True, True, False, False, True, True]))
    none = bound_swaps(global_masks, [plan], scores, 1.0, before, unbounded, 0.0)
    assert torch.equal(none[0], before[0])
    assert bound_swaps(global_masks, [plan], scores, 1.0, before, unbounded, 1.0) is unbounded


def test_swap_bound_in_training_never_revives_more_than_allowed():
    model = net()
    sp = optg.create("optg", model, pattern="2:4", epochs=4, steps_per_epoch=5, update_every_steps=1,
                     max_swap_fraction=0.01, score_lr_coupled=False).attach()
    revived = []
    sp.add_mask_hook(lambda s, before, _: revived.append(
        (sum(int((l.mask.bool() & ~before[l.plan.name]).sum()) for l in s.layers),
         sum(int(b.sum()) for b in before.values()))))
    train(model, sp, 4, 5)
    assert revived and all(r <= int(0.01 * kept) for r, kept in revived)
    assert all(r == 0 for r, kept in revived if kept < 100)


def trained_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(200):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, [(x[:128], y[:128]), (x[128:], y[128:])]


@pytest.mark.parametrize("bad", [True, False])
def test_guard_fires_on_a_planted_bad_mask_and_stays_silent_on_a_good_one(bad):
    model, batches = trained_mlp()
    sp = optg.create("gmp", model, target=0.5, epochs=4).attach()
    guard = optg.LossGuard(batches, optg.supervised(F.cross_entropy), threshold=0.3)
    sp.add_mask_hook(guard)
    layer = {l.plan.name: l for l in sp.layers}["0"]
    before = {l.plan.name: l.mask.clone() for l in sp.layers}
    w = layer.weight.detach().abs()
    planted = torch.ones_like(w)
    if bad:  # the 32 largest weights from the two inputs that decide the label
        order = w[:, :2].reshape(-1).argsort(descending=True)[:32]
        planted[order // 2, order % 2] = 0.0
    else:    # the 32 smallest weights from the six inputs that do not matter
        order = w[:, 2:].reshape(-1).argsort()[:32]
        planted[order // 6, 2 + order % 6] = 0.0
    layer.mask.copy_(planted)
    guard(sp, before, 1.0)
    event = guard.events[-1]
    assert torch.equal(layer.mask, planted)  # the guard leaves the new masks in force
    if bad:
        assert event.warning and event.delta > 0.3 and event.layer == "0"
        assert event.layer_delta == pytest.approx(event.delta)  # only that layer changed
        assert "0" in event.message()
    else:
        assert not event.warning and event.delta < 0.3 and event.layer is None


def test_guard_does_not_change_training():
    def run(with_guard):
        model = net()
        sp = optg.create("optg", model, target=0.8, epochs=3).attach()
        guard = optg.LossGuard(data(2, seed=9), optg.supervised(F.cross_entropy), threshold=1e-6)
        if with_guard:
            sp.add_mask_hook(guard)
        train(model, sp, 3, 4)
        return model.state_dict(), guard.events
    plain, _ = run(False)
    guarded, events = run(True)
    assert len(events) == 2 and all(torch.equal(plain[k], guarded[k]) for k in plain)


def test_auto_start_resolves_from_whether_training_starts_from_trained_weights():
    spec = optg.SparsitySpec(method="optg", pattern="2:4", epochs=10)
    assert spec.resolved_start(True) == "pretrained" and spec.resolved_start(False) == "scratch"
    assert spec.for_start(False) is spec
    pre = spec.for_start(True, steps_per_epoch=20)
    assert pre.start == "pretrained"
    assert {k: getattr(pre, k) for k in optg.PRETRAINED if k != "guard"} == \
        {k: v for k, v in optg.PRETRAINED.items() if k != "guard"}
    assert pre.score_warmup_steps == optg.warmup_steps(200)
    scratch = optg.SparsitySpec(method="optg", pattern="2:4", epochs=10, start="scratch")
    assert scratch.for_start(True) is scratch
    mine = optg.SparsitySpec(method="optg", pattern="2:4", epochs=10, score_init_scale=0.5, start="pretrained")
    assert mine.for_start(False).score_init_scale == 0.5  # what the user set wins over the preset
    gmp = optg.SparsitySpec(method="gmp", target=0.9, epochs=10).for_start(True, steps_per_epoch=20)
    assert gmp.score_init == "zeros" and gmp.guard is not None  # no learned scores: guard only


def test_pretrained_preset_depends_on_the_pattern_kind():
    # N:M (the quickstart's 2:4 fix): the live prior at 0.01; unstructured: the authors' scores + guard
    nm = optg.SparsitySpec(method="optg", pattern="2:4", epochs=12).for_start(True, steps_per_epoch=20)
    un = optg.SparsitySpec(method="optg", target=0.98, epochs=12).for_start(True, steps_per_epoch=20)
    authors = optg.SparsitySpec(method="optg", target=0.98, epochs=12)
    assert optg.PRETRAINED_UNSTRUCTURED == {"guard": optg.PRETRAINED["guard"]}
    assert optg.pretrained_settings("2:4") == optg.PRETRAINED
    assert optg.pretrained_settings("unstructured") == optg.PRETRAINED_UNSTRUCTURED
    assert (nm.score_init, nm.score_lr_coupled, nm.score_warmup_steps, nm.score_init_scale) == ("live", False, 24, 0.01)
    assert (un.score_init, un.score_lr_coupled, un.score_warmup_steps, un.score_init_scale) == \
        (authors.score_init, authors.score_lr_coupled, authors.score_warmup_steps, authors.score_init_scale)
    for spec in (nm, un):
        assert spec.guard == optg.GuardSpec(batches=2, threshold=0.5)
    mine = optg.SparsitySpec(method="optg", target=0.9, epochs=12, score_init_scale=0.3)
    assert mine.for_start(True, steps_per_epoch=20).score_init_scale == 0.3  # the user's value wins
    # the built criterion ranks N:M with the prior: s + 0.01 * |w| / mean|w0| (s = 0 at attach);
    # unstructured from trained weights ranks by the learned scores alone, as the authors do
    def attached(**kw):
        model = nn.Sequential(nn.Linear(4, 2, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(torch.tensor([[1.0, -2.0, 3.0, 0.0], [0.5, 0.5, -1.0, 2.0]]))
        return model[0].weight, optg.create("optg", model, epochs=12, steps_per_epoch=20, from_trained=True,
                                            **kw).attach()
    w, sp = attached(pattern="2:4")
    assert torch.allclose(sp.criterion.ranking("0", w), 0.01 * w.abs() / w.abs().mean())
    w, sp = attached(target=0.5)
    assert torch.equal(sp.criterion.ranking("0", w), torch.zeros_like(w))


def test_warmup_rule_in_steps():
    assert optg.warmup_steps(12 * 20) == 24        # digits quickstart: ~1 epoch of 20 steps
    assert optg.warmup_steps(30 * 5000) == 500     # ImageNet-sized epochs: a tenth of one
    assert optg.warmup_steps(5) == 0


@pytest.mark.parametrize("kw", [{"target": 0.8}, {"pattern": "2:4"}, {"target": 0.7, "update_every_steps": 2}])
def test_scratch_is_bit_identical_to_the_authors_path(kw):
    def run(**extra):
        model = net()
        sp = optg.create("optg", model, epochs=4, steps_per_epoch=5, **kw, **extra).attach()
        train(model, sp, 4, 5)
        return copy.deepcopy(model.state_dict()), {k: v.clone() for k, v in sp.masks().items()}
    base_w, base_m = run()
    for extra in ({"start": "scratch", "from_trained": True}, {"start": "auto", "from_trained": False}):
        w, m = run(**extra)
        assert all(torch.equal(base_w[k], w[k]) for k in base_w)
        assert all(torch.equal(base_m[k], m[k]) for k in base_m)


def test_pretrained_ramp_reaches_the_target_early_and_only_replaces_an_unset_sigmoid():
    # unstructured: centre 0.2 E, last round(0.6 E) epochs at the target; N:M: 0.1 E, round(0.75 E)
    assert optg.pretrained_ramp("unstructured", 12) == {"center": 2.4, "final_epochs": 7}
    assert optg.pretrained_ramp("2:4", 12) == {"center": 1.2, "final_epochs": 9}
    assert optg.pretrained_ramp("unstructured", 100) == {"center": 20.0, "final_epochs": 60}
    assert optg.pretrained_ramp("1:4", 1) == {"center": 0.1, "final_epochs": 1}
    un = optg.SparsitySpec(method="optg", target=0.9, epochs=12).for_start(True, steps_per_epoch=20)
    sched = un.resolve().schedule
    assert sched.describe() == {"beta": 20 / 12, "center": 2.4, "final_epochs": 7}
    assert sched.fraction(4.99) < 1.0 and sched.fraction(5.0) == 1.0  # 12 - 7: the target from epoch 5
    # scratch, a user's schedule setting, an instance or another schedule: untouched
    scratch = optg.SparsitySpec(method="optg", target=0.9, epochs=12)
    assert scratch.for_start(False).resolve().schedule.describe() == {"beta": 20 / 12, "center": 0.4 * 12, "final_epochs": 3}
    mine = optg.SparsitySpec(method="optg", target=0.9, epochs=12, schedule={"beta": 1.0}).for_start(True, 20)
    assert mine.resolve().schedule.describe() == {"beta": 1.0, "center": 0.4 * 12, "final_epochs": 3}
    cubic = optg.SparsitySpec(method="optg", target=0.9, epochs=12, schedule="cubic").for_start(True, 20)
    assert cubic.resolve().schedule.describe() == {"start": 0.0, "end": 9.0}
    instance = optg.SigmoidSchedule(12, beta=1.0)
    given = optg.SparsitySpec(method="optg", target=0.9, epochs=12, schedule=instance).for_start(True, 20)
    assert given.schedule is instance
    gmp = optg.SparsitySpec(method="gmp", target=0.9, epochs=12).for_start(True, 20)  # no learned scores
    assert gmp.resolve().schedule.describe() == {"start": 0.0, "end": 9.0}
    named = optg.SparsitySpec(method="optg", pattern="2:4", epochs=12, schedule="sigmoid").for_start(True, 20)
    assert named.resolve().schedule.describe()["center"] == 1.2  # named but no settings: the ramp
    assert named.for_start(True, 20).schedule == named.schedule  # applying it again changes nothing
