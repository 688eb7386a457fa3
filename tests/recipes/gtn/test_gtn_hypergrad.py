"""gtn: the recipe's own step map gives exact hypergradients (float64 finite differences),
checkpointing changes nothing, and the shuffle test's ordering logic is right."""

from __future__ import annotations

import pytest
import torch

from bilevel import hypergrad
from bilevel.recipes.gtn import recipe as gtn
from bilevel.recipes.gtn.teacher import logit, shuffled_order, softplus_inverse
from bilevel.run import SkipOrAbortRunConfig, Unrolled


def tiny_config(curriculum: str = "learned", steps: int = 3, lr_param: str = "softplus"
                ) -> gtn.Config:
    return gtn.Config(
        run=SkipOrAbortRunConfig(max_steps=1),
        data=gtn.DataSection(name="digits", image_size=12, meta_batch=20),
        teacher=gtn.TeacherSection(curriculum=curriculum, batch_size=6, noise_dim=4, fc1_size=8,
                                   map_filters=2, map_size=3, conv1_filters=2, lr_param=lr_param),
        learner=gtn.LearnerSection(conv1_filters=2, conv2_filters=3),
        hypergrad=Unrolled(steps=steps),
    )


def problem(curriculum: str = "learned", steps: int = 3, lr_param: str = "softplus"):
    """Teacher, learner and the recipe's step / meta-loss on real digits, in float64."""
    torch.manual_seed(0)
    cfg = tiny_config(curriculum, steps, lr_param)
    data = gtn.load_images(cfg.data, torch.device("cpu"))
    x, y = data["train"][0][:20].double(), data["train"][1][:20]
    teacher = gtn.build_teacher(cfg, seed=0).double()
    learner = gtn.build_learner(cfg).double()
    drawn = teacher.sample_noise(generator=torch.Generator().manual_seed(1))
    drawn = None if drawn is None else drawn.double()
    state0 = gtn.fresh_learner(learner, seed=3)
    state0 = {k: ({n: v.double() for n, v in d.items()} if k == "params" else d)
              for k, d in state0.items()}
    state0["opt"] = state0["opt"]._replace(
        momentum_buffer={n: v.double() for n, v in state0["opt"].momentum_buffer.items()})
    p = gtn.make_problem(learner, teacher, cfg, drawn, meta=(x, y))
    return teacher, p.step, p.outer_loss, state0


def loss_at(step, meta_loss, state0, hp, steps: int) -> float:
    return float(hypergrad.unrolled(step, meta_loss, state0, hp, steps=steps).outer_loss)


@pytest.mark.parametrize(("curriculum", "lr_param", "key"), [
    ("learned", "softplus", "lr_raw"), ("random", "softplus", "lr_raw"),
    ("learned", "raw", "lr_raw"), ("learned", "raw", "momentum_raw"),
    ("learned", "capped", "lr_raw"), ("learned", "capped", "momentum_raw")])
def test_learned_lr_hypergradient_matches_finite_difference(curriculum: str, lr_param: str,
                                                            key: str) -> None:
    teacher, step, meta_loss, state0 = problem(curriculum, lr_param=lr_param)
    hp = teacher.hparams()
    g = hypergrad.unrolled(step, meta_loss, state0, hp, steps=3).hypergrad[key]
    eps = 1e-5

    def shifted(delta: float) -> float:
        moved = {k: (v.detach() + delta if k == key else v.detach()).requires_grad_()
                 for k, v in hp.items()}
        return loss_at(step, meta_loss, state0, moved, 3)

    fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
    assert abs(fd) > 1e-5  # the lr / momentum matters, so the check has teeth
    assert float(g) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_raw_lr_reaches_the_inner_step_unchanged() -> None:
    """``raw``: the inner step uses ``lr_raw`` itself; one step from zero momentum moves the
    weights by exactly ``lr_raw / η₀`` times the softplus teacher's step at its lr η₀ ≈ 0.02, and the
    capped teacher clamps a raw value above its range to the bound."""
    raw, step_raw, _, state0 = problem(lr_param="raw")
    soft, step_soft, _, _ = problem(lr_param="softplus")
    hp_raw = {k: v.detach() for k, v in raw.hparams().items()}
    assert float(hp_raw["lr_raw"]) == pytest.approx(0.02) and float(hp_raw["momentum_raw"]) == 0.5
    assert raw.learner_lr(hp_raw) is hp_raw["lr_raw"]
    hp_soft = {k: v.detach() for k, v in soft.hparams().items()}

    def delta(step, hp) -> dict[str, torch.Tensor]:
        p0 = {k: v.detach().requires_grad_() for k, v in state0["params"].items()}
        new = step({**state0, "params": p0}, hp, 0)["params"]
        return {k: (new[k] - p0[k]).detach() for k in p0}

    base, lr0 = delta(step_soft, hp_soft), float(soft.learner_lr(hp_soft))
    for lr in (0.02, 0.37, -0.01):  # raw: even a negative lr goes through as it is
        moved = delta(step_raw, {**hp_raw, "lr_raw": torch.tensor(lr, dtype=torch.float64)})
        for k in base:
            torch.testing.assert_close(moved[k], base[k] * (lr / lr0), rtol=1e-9, atol=1e-12)
    capped, _, _, _ = problem(lr_param="capped")
    hp = {"lr_raw": torch.tensor(3.0), "momentum_raw": torch.tensor(1.5)}
    assert float(capped.learner_lr(hp)) == 1.0
    assert float(capped.learner_momentum(hp)) == pytest.approx(0.99)


def test_teacher_and_curriculum_hypergradient_match_finite_difference() -> None:
    """Directional derivative along a random direction in (generator, Z, lr, momentum)."""
    teacher, step, meta_loss, state0 = problem("learned")
    hp = teacher.hparams()
    r = hypergrad.unrolled(step, meta_loss, state0, hp, steps=3)
    gen = torch.Generator().manual_seed(7)
    direction = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in hp.items()}
    analytic = sum(float((r.hypergrad[k] * direction[k]).sum()) for k in hp)
    eps = 1e-6

    def shifted(s: float) -> float:
        moved = {k: (v.detach() + s * direction[k]).requires_grad_() for k, v in hp.items()}
        return loss_at(step, meta_loss, state0, moved, 3)

    fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
    assert abs(fd) > 1e-3
    assert analytic == pytest.approx(fd, rel=1e-5)
    # every learned part receives gradient: generator weights, Z, lr, momentum
    for key in ("generator.fc1.weight", "generator.conv2.weight", "z", "lr_raw", "momentum_raw"):
        assert float(r.hypergrad[key].abs().sum()) > 0, key


def test_checkpointed_unroll_equals_plain_unroll() -> None:
    teacher, step, meta_loss, state0 = problem("learned", steps=4)
    hp = teacher.hparams()
    plain = hypergrad.unrolled(step, meta_loss, state0, hp, steps=4)
    ckpt = hypergrad.unrolled(step, meta_loss, state0, hp, steps=4, checkpoint=True)
    for k in hp:
        torch.testing.assert_close(ckpt.hypergrad[k], plain.hypergrad[k], rtol=1e-10, atol=1e-12)


def test_random_fixed_curriculum_is_frozen_and_not_a_hyperparameter() -> None:
    teacher = problem("random_fixed")[0]
    assert "z" not in teacher.hparams() and "z" in dict(teacher.named_buffers())
    z0 = teacher.z.clone()
    assert torch.equal(teacher.noise(teacher.hparams(), 1), z0[1])


def test_parametrisations_round_trip() -> None:
    teacher = problem()[0]
    hp = {"lr_raw": torch.tensor(softplus_inverse(0.02)), "momentum_raw": torch.tensor(logit(0.5))}
    assert float(teacher.learner_lr(hp)) == pytest.approx(0.02, rel=1e-6)
    assert float(teacher.learner_momentum(hp)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="> 0"):
        softplus_inverse(0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        logit(1.0)


def test_shuffled_order_is_a_non_identity_permutation() -> None:
    gen = torch.Generator().manual_seed(0)
    for steps in (2, 3, 10):
        for _ in range(50):
            order = shuffled_order(steps, generator=gen)
            assert sorted(order) == list(range(steps)) and order != list(range(steps))
    with pytest.raises(ValueError, match="at least 2"):
        shuffled_order(1, generator=gen)


def test_shuffled_training_shows_step_order_t_at_inner_step_t() -> None:
    """Training with order o equals training in order on a teacher whose Z was permuted by o;
    the identity order equals no order; a real shuffle changes the learner."""
    cfg = tiny_config("random_fixed", steps=3)
    learner = gtn.build_learner(cfg)
    teacher = gtn.build_teacher(cfg, seed=0)
    order = [2, 0, 1]
    permuted = gtn.build_teacher(cfg, seed=0)
    permuted.load_state_dict({**teacher.state_dict(), "z": teacher.z[order]})

    def params(t, o):
        return gtn.train_learner(learner, t, cfg, seed=5, drawn=None, order=o)["params"]

    in_order = params(teacher, None)
    for k, v in params(teacher, [0, 1, 2]).items():
        assert torch.equal(v, in_order[k])
    shuffled, reference = params(teacher, order), params(permuted, None)
    for k in in_order:
        torch.testing.assert_close(shuffled[k], reference[k])
    assert not torch.allclose(shuffled["fc.weight"], in_order["fc.weight"])


def test_capped_range_must_hold_the_initial_values() -> None:
    with pytest.raises(ValueError, match="lr_range"):
        gtn.Config(run=SkipOrAbortRunConfig(max_steps=1),
                   teacher=gtn.TeacherSection(lr_param="capped", lr_range=(0.05, 1.0)))
