"""How layers are split into pipeline stages and stages placed on ranks."""

import pytest

from raytitan.config.job import JobConfig
from raytitan.distributed.pipeline import PipelineError, num_stages, rank_stages, stage_layers


def parallelism(**keys):
    return JobConfig.from_dict({"parallelism": keys}).parallelism


def test_first_and_last_stage_hold_fewer_layers_for_embedding_and_head():
    # 6 layers + 1 + 1 allowances = 8 units over 2 stages: 3 blocks each.
    assert stage_layers(6, 2, 1, 1) == [[0, 1, 2], [3, 4, 5]]
    # 16 layers over 4 stages: 18 units -> 5, 5, 4, 4 -> first 4, last 3.
    assert stage_layers(16, 4, 1, 1) == [list(range(0, 4)), list(range(4, 9)), list(range(9, 13)), list(range(13, 16))]
    assert stage_layers(4, 4, 0, 0) == [[0], [1], [2], [3]]
    with pytest.raises(PipelineError, match="4 layers cannot fill 4 pipeline stages"):
        stage_layers(4, 4, 1, 1)


def test_stage_counts_follow_the_schedule():
    assert num_stages(parallelism(), 6, 2) == 2
    assert num_stages(parallelism(pipeline_parallel_schedule="Interleaved1F1B"), 6, 2) == 4
    assert num_stages(parallelism(pipeline_parallel_schedule="interleaved1f1b",
                                  pipeline_parallel_layers_per_stage=1), 6, 2) == 8
    with pytest.raises(PipelineError, match="one stage per rank"):
        num_stages(parallelism(pipeline_parallel_layers_per_stage=2), 6, 2)


def test_ranks_hold_looped_or_v_shaped_stages():
    assert [rank_stages(r, 2, 4, "Interleaved1F1B") for r in range(2)] == [[0, 2], [1, 3]]
    assert [rank_stages(r, 2, 4, "ZBVZeroBubble") for r in range(2)] == [[0, 3], [1, 2]]
    assert [rank_stages(r, 4, 4, "1F1B") for r in range(4)] == [[0], [1], [2], [3]]


def test_torch_still_infers_stage_shapes_through_the_method_stage_overrides():
    """raytitan.distributed.pipeline_schedule.Stage overrides the private
    ``PipelineStage._forward_metadata_inference`` (torch 2.13) so that the shape-inference forward
    leaves an MoE layer's token counts alone; a torch that stopped calling it would count again
    (EP x PP parity in tests/parallel/test_expert_parallel.py would drift by about 1e-4)."""
    import inspect

    from torch.distributed.pipelining import PipelineStage

    from raytitan.distributed.pipeline_schedule import Stage

    assert "_forward_metadata_inference" in inspect.getsource(PipelineStage._prepare_forward_infra)
    assert Stage._forward_metadata_inference is not PipelineStage._forward_metadata_inference
