"""Tests of gpu_report.py's arithmetic and report on GPU-shaped numbers made up here (its sections need a GPU for their
memory terms; `bash experiments/gpu.sh OUT --tiny` runs every section end to end on a CPU). Run:
python -m pytest -q experiments/test_gpu.py"""
import copy
import json
import types

import pytest
import torch
from diffusers import FluxTransformer2DModel

import flux
from experiments import gpu, gpu_report
from tiny import tiny_model_paths

CFG = types.SimpleNamespace(**gpu.GPU)
DOUBLE, SINGLE = 339_831_296, 141_591_808  # FLUX.1-dev's blocks: 36 D^2 + 30 D + 4 d and 15 D^2 + 11 D + 2 d
REST = 11_901_408_320 - 19 * DOUBLE - 38 * SINGLE


def results():
    """A run in which every measured memory term is exactly the plan's and the times are round numbers."""
    params = CFG.layers * DOUBLE + CFG.single_layers * SINGLE + REST
    r = dict(date="today", seconds={"models": 1.0}, notes={},
             models=dict(device="GPU", torch="2", params=params, target_params=11_901_408_320, double_params=DOUBLE,
                         single_params=SINGLE, block_params=[DOUBLE] * CFG.layers + [SINGLE] * CFG.single_layers,
                         vae_params=83_819_683, reward_params=986_109_184,
                         lora_params=18_874_368),  # rank-64 adapters on 2 + 4 blocks (add_lora on the meta device)
             plan=dict(per_block=dict(double=533e6, single=468e6, other=67e6), transformer=28.0e9,
                       transformer_checkpointed=0.9e9, transformer_recompute=533e6, vae_decode=9.9e9,
                       vae_decode_checkpointed=6.0e9, reward=1.6e9))
    plan = gpu_report.reduced_plan(CFG, r)
    ddp, acts = plan["ddp"], plan["activations"]
    # in the backward of a checkpointed branch: the recomputed double block's and the root's bf16 copies and the
    # largest part, the VAE's peak (above the reward's or one block's); more than all copies at the forward's end
    branch_peak = ddp["grads"] + acts["transformer_checkpointed"] + 2 * (DOUBLE + REST) \
        + acts["vae_decode_checkpointed"]
    assert 2 * (DOUBLE + REST) + acts["vae_decode_checkpointed"] > 2 * params
    step = dict(rollout_s=2.0, branches_s=1.0, optimizer_s=0.1, rollout_peak=ddp["rollout_copies"],
                branches_peak=branch_peak, optimizer_peak=1e9, branches_kept=ddp["grads"],
                optimizer_kept=ddp["optimizer"], rollout_max=0, optimizer_max=0, branches_max=ddp["total_checkpointed"])
    blocks = {kind: dict(forward_s=f, train_s=4 * f, held=r["plan"]["per_block"][kind] + 2 * n,
                         held_checkpointed=plan["tokens"] * plan["width"] * 2 + 2 * n)
              for kind, f, n in (("double", 0.01, DOUBLE), ("single", 0.005, SINGLE))}
    r["anatomy"] = dict(weights=ddp["weights"], frozen=plan["frozen"], blocks=dict(blocks, rest_forward_s=0.002),
                        fixed=dict(vae_decode_s=0.05, reward_s=0.02, vae_decode_peak=acts["vae_decode_checkpointed"],
                                   reward_peak=acts["reward"]),
                        steps=[step, step], rollout_steps=25, branches=2, checkpointing=True)
    for s in ("fsdp", "ddp", "lora"):
        r[f"train-{s}"] = dict(status="ok", steps=3, step_time_s=3.3, rollout_s=2.0, branches_s=1.1, rest_s=0.2,
                               max_memory_gib=plan[s]["total_checkpointed"] / 2**30)
    return r


def test_extrapolation_adds_each_missing_block_at_its_measured_cost():
    ex = gpu_report.flux_dev_extrapolation(CFG, results())
    more_double, more_single = 19 - CFG.layers, 38 - CFG.single_layers
    # approx's 1e-6 relative: float64 sums in another order than gpu_report.py's (~1e-16 apart); one block more or less
    # changes these times by 1% or more
    assert ex["rollout_s"] == pytest.approx(2.0 + 25 * (more_double * 0.01 + more_single * 0.005))
    assert ex["branches_s"] == pytest.approx(1.0 + 2 * (more_double * 0.04 + more_single * 0.02))
    params = CFG.layers * DOUBLE + CFG.single_layers * SINGLE + REST
    assert ex["optimizer_one_gpu_s"] == pytest.approx(0.1 * 11_901_408_320 / params)
    assert ex["train_py_over_bare"] == pytest.approx(3.3 / 3.1)
    for gpus, prompts in ((8, 4), (32, 1)):
        g = ex["gpus"][gpus]
        assert g["step_s"] == pytest.approx(prompts * ex["prompt_s"] + ex["optimizer_one_gpu_s"] / gpus)
        assert g["minutes"] == pytest.approx(19 * g["step_s"] / 60)  # the release's 19 updates
        # by hand, as test_bench checks rank_memory: the sharded 16 bytes a parameter, the frozen models, and the
        # larger of a checkpointed branch's moment (two double blocks' and the root's bf16 copies, a double block's
        # gradients, the kept inputs, the largest part) and the rollout's bf16 copy of every weight (the larger here)
        acts = results()["plan"]
        frozen = 4 * (83_819_683 + 986_109_184) + 2 * (512 * 4096 + 768)  # fp32 VAE, reward; one prompt's text
        branch = 2 * (2 * DOUBLE + REST) + 6 * DOUBLE + acts["transformer_checkpointed"] \
            + max(acts["vae_decode_checkpointed"], acts["reward"], acts["transformer_recompute"])
        # approx's 1e-6 relative: float64 sums of ~1e10 in another order; a term left out moves it by 1% or more
        assert g["memory_plan"] == pytest.approx(16 * 11_901_408_320 / gpus + frozen + max(branch, 2 * 11_901_408_320))


def test_a_model_with_all_of_flux_dev_blocks_extrapolates_to_itself():
    cfg = types.SimpleNamespace(**dict(vars(CFG), layers=19, single_layers=38))
    r = results()
    r["models"]["params"] = r["models"]["target_params"]
    ex = gpu_report.flux_dev_extrapolation(cfg, r)
    # nothing added, but 0.1 * params / params rounds twice in float64: 1e-12 relative
    assert (ex["rollout_s"], ex["branches_s"], ex["optimizer_one_gpu_s"]) == pytest.approx((2.0, 1.0, 0.1), rel=1e-12)


def test_report_flags_exactly_the_terms_off_by_more_than_15_percent():
    r = results()
    assert "**off by" not in gpu_report.report(CFG, r)
    r["anatomy"]["weights"] *= 1.2   # flagged
    r["anatomy"]["frozen"] *= 1.1    # within the tolerance
    text = gpu_report.report(CFG, r)
    assert text.count("**off by") == 1 and "fp32 weights, after load | " in text and "**off by +20%**" in text


def test_the_lora_run_is_held_against_the_lora_plan():
    r = results()
    plan = gpu_report.reduced_plan(CFG, r)
    # a bf16 base with fp32 adapters under DDP: far below the full model's plan, and the run is compared with it
    assert plan["lora"]["total_checkpointed"] < 0.5 * plan["ddp"]["total_checkpointed"]
    r["train-lora"]["max_memory_gib"] *= 1.3
    text = gpu_report.report(CFG, r)
    assert "| ddp, LoRA rank 64 | ok |" in text
    assert text.count("**off by") == 1 and "--lora-rank 64, max_memory_allocated | " in text and "+30%" in text


def test_rollout_without_autocast_is_flux_rollout_on_a_cpu():
    """On a CPU flux.velocity runs no autocast either, and the weights are fp32: the two loops are then the same
    computation, so they must agree bit for bit (gpu.py times the first against flux.rollout on a GPU)."""
    flux_dir, _ = tiny_model_paths()
    transformer = FluxTransformer2DModel.from_pretrained(flux_dir, subfolder="transformer").eval()
    config = transformer.config
    embeds = dict(encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim),
                  pooled_projections=torch.randn(1, config.pooled_projection_dim))
    cond, noise = flux.conditioning(embeds, 32, torch.device("cpu")), flux.latent_noise(32, None, "cpu")
    ours = flux.rollout(transformer, noise, cond, 4, 3.0, 3.5)
    assert torch.equal(gpu.rollout_without_autocast(transformer, noise, cond, 4, 3.0, 3.5), ours)
    assert not torch.equal(ours, noise)


def test_report_of_a_run_cut_short_has_its_notes_and_no_later_tables():
    r = copy.deepcopy(results())
    for key in ("plan", "anatomy", "train-fsdp", "train-ddp"):
        del r[key]
    r["notes"]["bench"] = "stopped after 2 rows"
    text = gpu_report.report(CFG, r)
    assert "- bench: stopped after 2 rows" in text and "## 2." not in text and "EXTRAPOLATED" not in text
    assert "## 1. train.py" in text and "| ddp, LoRA rank 64 | ok |" in text


def test_replan_keeps_every_measurement_and_recomputes_only_the_plan(tmp_path, monkeypatch):
    r = results()
    r["plan"] = dict(r["plan"], reward=0.3e9)  # the plan of the day the run was made
    (tmp_path / "gpu.json").write_text(json.dumps(r))
    monkeypatch.setattr(gpu_report.plan, "activation_estimate", lambda: results()["plan"])  # today's
    gpu_report.main(["--replan", str(tmp_path / "gpu.json"), "--out", str(tmp_path / "out")])
    again = json.load(open(tmp_path / "out" / "gpu.json"))
    assert again["plan"]["reward"] == 1.6e9 and "recomputed" in again["notes"]["plan"]
    assert all(again[k] == r[k] for k in ("anatomy", "train-fsdp", "train-ddp", "train-lora", "models", "date"))
    assert "**off by" not in (tmp_path / "out" / "gpu.md").read_text()


def test_report_gathers_the_sections_files_and_notes_what_is_missing(tmp_path, monkeypatch):
    """What gpu.sh leaves in OUT: each section's file (the bench cut short by its timeout after 2 rows, no anatomy
    nor rollout). The report takes each section's result and seconds, the run's date and sizes from the models'
    file, and notes the cut-short bench and every section without a file."""
    r = results()
    r["bench"] = dict(repeats=3, draft_k=[1], rollout_steps=25, status="stopped after 2 rows", steps=[
        dict(method=method, k=k, lora_rank=0, time_s=t, time_ratio=t / 0.5, peak_mem_mb=2000, step_mem_mb=1000,
             mem_ratio=1.0) for method, k, t in (("direct_align", 1, 0.5), ("direct_align_both", 2, 0.75))])
    r["models"].update(date="2026-01-02", config=dict(gpu.GPU, lora_rank=8))
    for name in ("models", "train-lora"):
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(r[name], status="ok", elapsed_s=12.0)))
    (tmp_path / "bench.json").write_text(json.dumps(r["bench"]))  # as saved after its second row: no elapsed_s
    monkeypatch.setattr(gpu_report.plan, "activation_estimate", lambda: results()["plan"])  # 15 s of counting otherwise
    gpu_report.main(["--out", str(tmp_path)])
    out = json.load(open(tmp_path / "gpu.json"))
    assert out["date"] == "2026-01-02" and out["config"]["lora_rank"] == 8 and "date" not in out["models"]
    assert out["seconds"] == {"models": 12.0, "train-lora": 12.0, "bench": None} and out["plan"] == results()["plan"]
    assert out["notes"]["bench"] == "stopped after 2 rows"
    assert {k for k, v in out["notes"].items() if v.startswith("no result")} == {
        "train-fsdp", "train-ddp", "anatomy", "rollout", "sample", "stability", "full-depth"}
    text = (tmp_path / "gpu.md").read_text()
    assert "| ddp, LoRA rank 8 | ok |" in text and "| Direct-Align, both branches | 2 | 0.750 | 1.50 |" in text
    assert "## 3." not in text and "## 6." not in text and "$" not in text
