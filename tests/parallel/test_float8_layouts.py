"""Float8 (emulated, so it runs on CPU) under data and tensor parallel trains like Float8 in one
process: the same first losses from the same seed weights, for each recipe."""

import os

import pytest

from tests.helpers import run_ranks, tiny_config

pytestmark = pytest.mark.slow

STEPS = 4
# Float8 moves these losses by 1e-5 to 4e-5 (relative); layouts match it to better than 5e-7.
TOLERANCE = 2e-6


def config(root, data_dir, seed, recipe, parallelism=None, local_batch=8, **float8):
    return tiny_config(str(root), data_dir, model={"flavor": "tiny", "converters": ["float8"]},
                       parallelism=parallelism or {},
                       training={"global_batch_size": 8, "local_batch_size": local_batch, "steps": STEPS},
                       checkpoint={"enable": False, "initial_load_path": seed, "initial_load_model_only": True},
                       **{"quantize.linear.float8": {"emulate": True, "recipe_name": recipe, **float8}})


def largest_difference(losses, expected):
    assert len(losses) == len(expected) == STEPS
    return max(abs(a - b) / b for a, b in zip(losses, expected))


def test_float8_under_fsdp_and_tensor_parallel_matches_one_process(tmp_path, data_dir):
    """Tensorwise scales of an activation depend on the rows in the microbatch, so each layout is
    compared with one process running microbatches of the same rows (data parallel: half the batch
    per rank = two microbatches of 4; tensor parallel: all 8 rows on each rank)."""
    seed_root = tmp_path / "seed"
    run_ranks(tiny_config(str(seed_root), data_dir, model={"flavor": "tiny"}, checkpoint={"create_seed_checkpoint": True}),
              1, str(tmp_path))
    seed = os.path.join(str(seed_root), "run", "checkpoint", "step-0")

    one_process = {("tensorwise", 8): None, ("tensorwise", 4): None, ("rowwise_with_gw_hp", 8): None}
    without_float8 = config(tmp_path / "one_fp32", data_dir, seed, "tensorwise")
    without_float8.model.converters = []
    *references, plain = run_ranks(
        [*(config(tmp_path / f"one_{r}_{b}", data_dir, seed, r, local_batch=b) for r, b in one_process),
         without_float8], 1, str(tmp_path))
    one_process = dict(zip(one_process, references))
    for (recipe, _), reference in one_process.items():
        assert reference["losses"][-1] < reference["losses"][0], recipe
        # Float8 shows in the losses, so a layout that lost it would not match below.
        assert largest_difference(reference["losses"], plain["losses"]) > 5 * TOLERANCE, recipe

    layouts = {  # name: (recipe, local batch, parallelism, float8 settings)
        "FSDP, float8 all-gather": ("tensorwise", 4, {}, {"enable_fsdp_float8_all_gather": True,
                                                          "precompute_float8_dynamic_scale_for_fsdp": True}),
        "TP tensorwise": ("tensorwise", 8, {"tensor_parallel_degree": 2}, {}),
        "TP rowwise_with_gw_hp": ("rowwise_with_gw_hp", 8, {"tensor_parallel_degree": 2}, {}),
    }
    results = run_ranks([config(tmp_path / name.replace(" ", "_").replace(",", ""), data_dir, seed, recipe, p,
                                local_batch=batch, **f8)
                         for name, (recipe, batch, p, f8) in layouts.items()], 2, str(tmp_path))
    for (name, (recipe, batch, _, _)), result in zip(layouts.items(), results):
        expected = one_process[recipe, batch]["losses"]
        assert largest_difference(result["losses"], expected) < TOLERANCE, (name, result["losses"], expected)
