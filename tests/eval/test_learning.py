"""What "the model learned" means (`lvm.eval.learning`), shared by make demo, make gpu-check and the convergence
test: each criterion can fail, and the recipe is a run launch/pretrain.py accepts as given."""

import pytest

from lvm.eval.learning import CPU_RECIPE, GPU_RECIPE, final_loss, generation_check, learning_checks

LEARNED = {0: 1000.0, 1: 120.0, 2: 110.0, 3: 108.0}


def failing(checks):
    return [c.what for c in checks if not c.ok]


def test_a_model_that_learned_passes_every_check():
    assert failing(learning_checks(4.4, 8.75, LEARNED)) == []
    assert failing(learning_checks(1.9, 6.9, LEARNED, min_gap=1.5, at=(1, 3))) == []
    assert generation_check(13.2, 11.8).ok


@pytest.mark.parametrize("final, curve, at, why", [
    (7.0, LEARNED, (3,), "nats below the unigram"),  # 1.75 nats below 8.75
    (4.4, {0: 1000.0, 1: 900.0, 2: 880.0, 3: 870.0}, (3,), "0.87 x that with none"),  # flat in context
    (4.4, {0: 1000.0, 1: 600.0, 2: 100.0, 3: 100.0}, (1, 3), "with 1 context frames is 0.60"),
    (4.4, {0: 1000.0, 1: 100.0, 2: 300.0, 3: 400.0}, (3,), "rises after [1, 2] frames"),
    (4.4, {0: 1000.0, 1: 100.0}, (3,), "no value at [3] frames"),
])
def test_each_criterion_can_fail(final, curve, at, why):
    fails = failing(learning_checks(final, 8.75, curve, at=at))
    assert len(fails) == 1 and why in fails[0], fails


def test_a_prompt_no_better_than_nothing_fails():
    assert not generation_check(11.0, 11.0).ok


def test_final_loss_is_the_mean_of_the_last_tenth_of_the_logged_steps():
    rows = [{"loss": float(i)} for i in range(1, 21)]
    assert final_loss(rows) == (19.5, 2)
    assert final_loss(rows[:3]) == (3.0, 1)
    with pytest.raises(ValueError):
        final_loss([])


@pytest.mark.parametrize("recipe", [CPU_RECIPE, GPU_RECIPE], ids=["cpu", "gpu"])
def test_the_recipe_is_a_run_pretrain_accepts(recipe):
    from lvm.train.options import parse_options

    opts, _ = parse_options(recipe.pretrain_flags("data/shards", "runs/x", seed=3))
    assert (opts.model, opts.seq_len, opts.micro_batch, opts.max_steps) == (recipe.model, recipe.seq_len, recipe.micro_batch,
                                                                           recipe.steps)
    assert (opts.lr, opts.min_lr, opts.warmup_steps, opts.seed) == (recipe.lr, pytest.approx(recipe.lr / 10),
                                                                     recipe.warmup_steps, 3)
    assert opts.lr_schedule == "cosine" and opts.ds_config == "ds_configs/zero2.json"


def test_the_gpu_recipe_is_the_demo_recipe_with_more_tokens():
    same = ("model", "seq_len", "lr", "final_lr_ratio")
    assert all(getattr(GPU_RECIPE, f) == getattr(CPU_RECIPE, f) for f in same)
    tokens = [r.micro_batch * r.steps for r in (CPU_RECIPE, GPU_RECIPE)]
    assert tokens[1] >= 10 * tokens[0]
    assert GPU_RECIPE.warmup_steps / GPU_RECIPE.steps == pytest.approx(CPU_RECIPE.warmup_steps / CPU_RECIPE.steps)
