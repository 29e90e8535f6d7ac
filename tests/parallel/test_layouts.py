"""Every parallel layout trains like one process: same first losses from the same seed weights,
checkpoints that move between layouts, and per-rank state that shrinks with the sharding."""

import json
import os
import shutil

import pytest

from raytitan.components.data.tokenizer import ByteTokenizer
from raytitan.models import get_spec
from raytitan.models.spec import build_meta, count_params
from tests.helpers import run_ranks, tiny_config

pytestmark = pytest.mark.slow

STEPS = 5
# Tiny model: 4 layers, 4 heads, 2 KV heads, dim 64. Pipelines with 4 stages need 1 layer each.
EVEN_STAGES = {"pipeline_parallel_first_stage_less_layers": 0, "pipeline_parallel_last_stage_less_layers": 0}
TWO_RANKS = {
    "TP": {"tensor_parallel_degree": 2},
    "TP, logits gathered": {"tensor_parallel_degree": 2, "disable_loss_parallel": True},
    "CP": {"context_parallel_degree": 2},
    **{f"PP {name}": {"pipeline_parallel_degree": 2, "pipeline_parallel_schedule": name,
                      "pipeline_parallel_microbatch_size": 2, **EVEN_STAGES}
       for name in ("1F1B", "GPipe", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble")},
}
FOUR_RANKS = {
    "FSDP+TP": {"tensor_parallel_degree": 2},
    "FSDP+PP": {"pipeline_parallel_degree": 2},
    "TP+PP": {"tensor_parallel_degree": 2, "pipeline_parallel_degree": 2},
    "FSDP+CP alltoall": {"context_parallel_degree": 2, "context_parallel_rotate_method": "alltoall"},
}
EIGHT_RANKS = {
    "FSDP+TP+PP": {"tensor_parallel_degree": 2, "pipeline_parallel_degree": 2},
    "FSDP+TP+CP": {"tensor_parallel_degree": 2, "context_parallel_degree": 2},
    "HSDP+TP": {"data_parallel_replicate_degree": 2, "tensor_parallel_degree": 2},
    # FSDP shards over the cp ranks here (there is no separate data-parallel dim left on 8 ranks).
    "FSDP(cp)+TP+PP+CP": {"tensor_parallel_degree": 2, "pipeline_parallel_degree": 2, "context_parallel_degree": 2},
}
# Qwen3 tiny: QK-norm, head_dim 32 over 4 heads of a 64-wide model, and the output head tied to the
# embedding (one Parameter through TP, CP and FSDP). Pipeline parallel cannot split a tied pair:
# it trains the untied twin. These ride in the Llama spawns (a spawn costs more than a run).
MODELS = {"llama3": {"flavor": "tiny"}, "qwen3": {"name": "qwen3", "flavor": "tiny"},
          "qwen3 untied": {"name": "qwen3", "flavor": "tiny_untied"}}
QWEN3_TWO_RANKS = {
    "Qwen3 FSDP": {},
    "Qwen3 TP": {"tensor_parallel_degree": 2},
    "Qwen3 CP": {"context_parallel_degree": 2},
}
QWEN3_PP = {"pipeline_parallel_degree": 2, "pipeline_parallel_schedule": "Interleaved1F1B",
            "pipeline_parallel_microbatch_size": 2, **EVEN_STAGES}


def config(root, data_dir, seed_checkpoint, parallelism=None, global_batch=8, local_batch=8, model="llama3", **sections):
    return tiny_config(str(root), data_dir, model=MODELS[model], parallelism=parallelism or {},
                       training={"global_batch_size": global_batch, "local_batch_size": local_batch, "steps": STEPS},
                       checkpoint={"enable": False, "initial_load_path": seed_checkpoint, **sections.pop("checkpoint", {})},
                       **sections)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, data_dir):
    """Each model's seed weights (one process, one spawn for all)."""
    root = tmp_path_factory.mktemp("seed")
    run_ranks([tiny_config(str(root / name.replace(" ", "_")), data_dir, model=model,
                           checkpoint={"create_seed_checkpoint": True}) for name, model in MODELS.items()], 1, str(root))
    return {name: os.path.join(str(root / name.replace(" ", "_")), "run", "checkpoint", "step-0") for name in MODELS}


@pytest.fixture(scope="module")
def seed_checkpoint(seeds):
    return seeds["llama3"]


@pytest.fixture(scope="module")
def references(tmp_path_factory, data_dir, seeds):
    """Per model: one process, the whole global batch of 8 in one microbatch, from the seed weights."""
    root = tmp_path_factory.mktemp("reference")
    results = run_ranks([config(root / name.replace(" ", "_"), data_dir, seeds[name], model=name) for name in MODELS],
                        1, str(root))
    return dict(zip(MODELS, results))


@pytest.fixture(scope="module")
def reference(references):
    return references["llama3"]


@pytest.fixture(scope="module")
def saved_plain(tmp_path_factory, data_dir, seed_checkpoint):
    """Plain FSDP on 2 ranks with checkpoints at steps 3 and 5: a checkpoint to load elsewhere."""
    root = tmp_path_factory.mktemp("plain")
    cfg = config(root, data_dir, seed_checkpoint, local_batch=4, checkpoint={"enable": True, "interval": 3})
    result = run_ranks(cfg, 2, str(root))
    return cfg, result


def data_parallel(parallelism: dict, world: int) -> int:
    block = 1
    for key in ("tensor_parallel_degree", "pipeline_parallel_degree", "context_parallel_degree"):
        block *= parallelism.get(key, 1)
    return world // block


def assert_matches(name, losses, reference_losses):
    assert len(losses) == len(reference_losses), name
    for a, b in zip(losses, reference_losses):
        assert abs(a - b) / b < 1e-4, (name, losses, reference_losses)


def resume_config(cfg, root):
    """A copy of ``cfg``'s run whose newest checkpoint is step 3, set to train on to step 5."""
    source = os.path.join(cfg.run_dir, "checkpoint")
    target = os.path.join(str(root), "run", "checkpoint")
    shutil.copytree(source, target)
    shutil.rmtree(os.path.join(target, "step-5"))
    return root


def check_state_split(name, result, sharding):
    """Each parameter element is held once per replica (tensor parallel repeats only the norm
    weights, under 1%), Adam's two moments likewise, and no rank holds much more than its share."""
    held = [r["param_bytes"] for r in result["ranks"]]
    optimizer = [r["optimizer_bytes"] for r in result["ranks"]]
    full = result["full_param_bytes"] * result["replicas"]
    assert full <= sum(held) <= 1.01 * full, (name, held, full)
    assert 2 * full <= sum(optimizer) <= 2.02 * full, (name, optimizer, full)
    assert max(held) <= 1.35 * result["full_param_bytes"] / sharding, (name, held, full, sharding)


def tied_qwen3_params() -> int:
    """Parameters of the Qwen3 tiny flavor with one weight for its embedding and output head."""
    spec = get_spec("qwen3")
    return count_params(build_meta(spec, spec.flavor("tiny").with_vocab(ByteTokenizer.vocab_size)))[0]


@pytest.fixture(scope="module")
def full_param_bytes(reference):
    return reference["ranks"][0]["param_bytes"]


def test_two_rank_layouts_match_one_process(tmp_path, data_dir, seeds, seed_checkpoint, references, reference,
                                            full_param_bytes):
    """Also context parallel inside compiled blocks (one graph each) with per-op checkpointing, and
    Qwen3 (tied head, QK-norm) under FSDP, TP with loss parallel and CP."""
    layouts = {**TWO_RANKS, "CP compiled, per-op AC": {"context_parallel_degree": 2}}
    compiled_cp = {"compile": {"enable": True, "components": ["model"]},
                   "activation_checkpoint": {"mode": "selective", "selective_ac_option": "op"}}
    qwen3 = [config(tmp_path / name.replace(" ", "_"), data_dir, seeds["qwen3"], p, local_batch=8 // data_parallel(p, 2),
                    model="qwen3") for name, p in QWEN3_TWO_RANKS.items()]
    results = run_ranks([config(tmp_path / name.replace(" ", "_").replace(",", ""), data_dir, seed_checkpoint, p,
                                **(compiled_cp if "compiled" in name else {}))
                         for name, p in layouts.items()] + qwen3, 2, str(tmp_path))
    assert reference["losses"][-1] < reference["losses"][0]
    for (name, p), result in zip(layouts.items(), results):
        assert_matches(name, result["losses"], reference["losses"])
        # TP and PP split the parameters in two; FSDP over the cp ranks shards them in two as well.
        check_state_split(name, {**result, "full_param_bytes": full_param_bytes, "replicas": 1}, 2)
    qwen3_reference = references["qwen3"]
    assert qwen3_reference["losses"][-1] < qwen3_reference["losses"][0]
    assert qwen3_reference["ranks"][0]["param_bytes"] == 4 * tied_qwen3_params()  # the head is the embedding
    for name, result in zip(QWEN3_TWO_RANKS, results[len(layouts):]):
        assert_matches(name, result["losses"], qwen3_reference["losses"])
        check_state_split(name, {**result, "full_param_bytes": qwen3_reference["ranks"][0]["param_bytes"],
                                 "replicas": 1}, 2)


def test_four_rank_layouts_match_one_process(tmp_path, data_dir, seeds, seed_checkpoint, references, reference,
                                             full_param_bytes):
    """Also Qwen3: tied under FSDP+TP, saving at step 3, then resumed from that step under plain
    FSDP (the tied pair and its optimizer state resharded from 2-D to 1-D); untied under FSDP+PP."""
    tied = config(tmp_path / "qwen3_fsdp_tp", data_dir, seeds["qwen3"], {"tensor_parallel_degree": 2}, local_batch=4,
                  model="qwen3", checkpoint={"enable": True, "interval": 3})
    resumed = config(tmp_path / "qwen3_fsdp_tp", data_dir, seeds["qwen3"], local_batch=2, model="qwen3",
                     checkpoint={"enable": True, "interval": 3, "load_step": 3})
    untied = config(tmp_path / "qwen3_fsdp_pp", data_dir, seeds["qwen3 untied"], QWEN3_PP, local_batch=4,
                    model="qwen3 untied")
    *results, tied_result, resumed_result, untied_result = run_ranks(
        [config(tmp_path / name.replace("+", "_"), data_dir, seed_checkpoint, p, local_batch=4)
         for name, p in FOUR_RANKS.items()] + [tied, resumed, untied], 4, str(tmp_path))
    for (name, p), result in zip(FOUR_RANKS.items(), results):
        assert_matches(name, result["losses"], reference["losses"])
        check_state_split(name, {**result, "full_param_bytes": full_param_bytes, "replicas": 1}, 4)
    for name, result, model in (("Qwen3 FSDP+TP", tied_result, "qwen3"), ("Qwen3 FSDP+PP", untied_result, "qwen3 untied")):
        assert_matches(name, result["losses"], references[model]["losses"])
        check_state_split(name, {**result, "full_param_bytes": references[model]["ranks"][0]["param_bytes"],
                                 "replicas": 1}, 4)
    assert_matches("Qwen3 FSDP+TP -> FSDP", resumed_result["losses"], references["qwen3"]["losses"][3:])



def test_eight_rank_layouts_match_and_checkpoints_move_between_layouts(
        tmp_path, data_dir, seed_checkpoint, reference, full_param_bytes, saved_plain):
    """All 8-rank compositions match one process. A checkpoint written by plain FSDP on 2 ranks
    resumes under FSDP+TP+PP on 8, and one written under FSDP+TP+PP resumes under plain FSDP on 2:
    the losses after the resume are those of the uninterrupted runs."""
    plain_cfg, plain = saved_plain
    assert_matches("plain FSDP", plain["losses"], reference["losses"])
    # FSDP+TP+PP runs once, saving its checkpoints (the run resumed under plain FSDP below).
    others = {name: p for name, p in EIGHT_RANKS.items() if name != "FSDP+TP+PP"}
    layouts = [config(tmp_path / name.replace("+", "_").replace("(", "").replace(")", ""), data_dir, seed_checkpoint,
                      p, local_batch=8 // data_parallel(p, 8))
               for name, p in others.items()]
    three_d = EIGHT_RANKS["FSDP+TP+PP"]
    saving = config(tmp_path / "3d_saving", data_dir, seed_checkpoint, three_d, local_batch=4,
                    checkpoint={"enable": True, "interval": 3})
    resuming = config(resume_config(plain_cfg, tmp_path / "3d_resuming"), data_dir, seed_checkpoint, three_d,
                      local_batch=4, checkpoint={"enable": True, "interval": 3})
    *results, saved, resumed = run_ranks([*layouts, saving, resuming], 8, str(tmp_path))
    for (name, p), result in zip([*others.items(), ("FSDP+TP+PP", three_d)], [*results, saved]):
        assert_matches(name, result["losses"], reference["losses"])
        replicas = 2 if "HSDP" in name else 1
        check_state_split(name, {**result, "full_param_bytes": full_param_bytes, "replicas": replicas},
                          8 // replicas)
    assert_matches("plain FSDP -> FSDP+TP+PP", resumed["losses"], plain["losses"][3:])

    back = config(resume_config(saving, tmp_path / "plain_resuming"), data_dir, seed_checkpoint, local_batch=4,
                  checkpoint={"enable": True, "interval": 3})
    assert_matches("FSDP+TP+PP -> plain FSDP", run_ranks(back, 2, str(tmp_path))["losses"], saved["losses"][3:])


def test_elastic_tensor_parallel_run_shrinks_to_one_tp_group(tmp_path, data_dir, seed_checkpoint, reference):
    """TP=2 on 4 ranks (dp 2) checkpoints at step 3; restarted on 3 ranks it keeps TP=2 with dp 1
    (local batch 4 x accumulation 2), idles the third rank, and trains on exactly as one process."""
    elastic = config(tmp_path, data_dir, seed_checkpoint, {"tensor_parallel_degree": 2}, local_batch=4,
                     ray={"min_workers": 2, "max_workers": 4}, checkpoint={"enable": True, "interval": 3})
    four = run_ranks(elastic, 4, str(tmp_path))
    shutil.rmtree(os.path.join(elastic.run_dir, "checkpoint", "step-5"))
    three = run_ranks(elastic, 3, str(tmp_path))
    assert_matches("TP=2 on 4 ranks", four["losses"], reference["losses"])
    assert_matches("TP=2 on 3 ranks after the loss of one", three["losses"], reference["losses"][3:])
    starts = [json.loads(line) for line in open(os.path.join(elastic.run_dir, "restarts.jsonl"))]
    assert [(s["world"], s["active"], s["dp"], s["local_batch"], s["accumulation"]) for s in starts] == \
        [(4, 4, 2, 4, 1), (3, 2, 1, 4, 2)]
    assert three["ranks"][2]["ledger"] == [] and three["ranks"][2]["param_bytes"] == 0  # the idle rank trained nothing
