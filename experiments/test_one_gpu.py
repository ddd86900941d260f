"""Tests of SRPO on one GPU with LoRA on a bf16 or a 4-bit base: the memory plan's one-GPU rows against a count by
hand, the full-depth section's FLOP count against torch's FlopCounterMode, the section's bookkeeping and its report on
numbers made up here (the section itself needs a GPU at full size; `bash experiments/gpu.sh OUT --tiny` runs it end to
end on a CPU), and the toy world's nf4-against-fp32 comparison on the quick world.
Run: python -m pytest -q experiments/test_one_gpu.py"""
import json
import os
import types

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import flux
from experiments import gpu, gpu_report, plan, toy_nf4
from experiments.measure import FLUX_DEV, rope_axes

D, HEAD = 3072, 128  # FLUX.1-dev's width and head size
GIB = 2**30
# plan.activation_estimate's terms as an H100 run of gpu.py recorded them (experiments/results/gpu-h100.json), and a
# set in which the reward's backward is the largest part (so that its bf16 weight copy shows)
H100_ACTS = dict(per_block=dict(double=533455024.0, single=468401512.0, other=66729416.0), transformer=28.0e9,
                 transformer_checkpointed=955207112.0, transformer_recompute=533455024.0, vae_decode=9951505680.0,
                 vae_decode_checkpointed=6028216192.0, reward=1519786296.0)
REWARD_ACTS = dict(H100_ACTS, reward=8e9)


def vit_h_14_by_hand():
    """(vision tower + projection, whole CLIPModel) of ViT-H-14, layer by layer: a tower of L layers at width W has
    q k v o (4 (W^2 + W)), two LayerNorms (4W), an MLP W -> 4W -> W (8 W^2 + 5W); vision: class token, 14x14 patch
    conv without bias, 257 positions, LayerNorms before and after, projection 1280 -> 1024 without bias; text: 49408
    tokens, 77 positions, final LayerNorm, projection 1024 -> 1024; and the logit scale."""
    layer = lambda w: 4 * (w * w + w) + 4 * w + 8 * w * w + 5 * w  # noqa: E731
    vision = 1280 + 3 * 14 * 14 * 1280 + 257 * 1280 + 2 * 1280 + 32 * layer(1280) + 2 * 1280 + 1280 * 1024
    text = 49408 * 1024 + 77 * 1024 + 24 * layer(1024) + 2 * 1024 + 1024 * 1024
    return vision, vision + text + 1


def test_one_gpu_rows_match_a_count_by_hand(tmp_path):
    """Every row of the one-GPU plan against the same terms counted by hand from FLUX.1-dev's shapes (the block
    formulas of test_bench.flux_params_by_hand; of them, what is an nn.Linear's weight; the adapters r (in + out) on
    each targeted layer), for both activation sets."""
    params = 19 * (36 * D * D + 30 * D + 4 * HEAD) + 38 * (15 * D * D + 11 * D + 2 * HEAD) + 5 * D * D + 5514 * D + 64
    # linear weights: a double block's 36 D^2, a single block's 15 D^2; the rest's embedders 64, 4096, 256 (twice),
    # 768 -> D, three D -> D, the final AdaLN D -> 2D, the output D -> 64
    linear = 19 * 36 * D * D + 38 * 15 * D * D + 5 * D * D + (64 + 4096 + 2 * 256 + 768 + 64) * D
    # adapters: a double block's q k v, added q k v, two outputs (8 layers of D -> D) and two MLPs (D -> 4D -> D),
    # 36 D r in all; a single block's q k v, 6 D r
    adapters = {r: r * D * (19 * 36 + 38 * 6) for r in (16, 64)}
    assert adapters[64] == 179_306_496  # train.py's count at rank 64
    vision, reward = vit_h_14_by_hand()
    vae = 83_819_683  # FLUX.1-dev's AutoencoderKL, encoder and decoder
    nf4_bytes = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits; an 8-bit absmax a block of 64; an fp32 scale per 256 blocks
    c = plan.one_gpu_counts()
    assert (c["params"], c["linear_weights"], c["largest_linear"], c["lora_params"], c["vision_params"],
            c["reward_params"], c["vae_params"]) == (params, linear, 6 * D * D, adapters, vision, reward, vae)
    for acts in (H100_ACTS, REWARD_ACTS):
        p = plan.one_gpu_plan(c, acts, str(tmp_path))  # no metrics there: the assumed reserve
        assert p["reserve"] == 1.10 and p["reserve_source"] == "assumed" and len(p["rows"]) == 4
        for row in p["rows"]:
            a, f = adapters[row["rank"]], 2 if row["base"] == "nf4" else 4
            base = nf4_bytes * linear + 2 * (params - linear) if row["base"] == "nf4" else 2 * params
            reward_peak = acts["reward"] - (2 * vision if row["base"] == "nf4" else 0)  # bf16 weights: no copy
            allocated = base + 16 * a + f * (reward + vae) + 2 * (512 * 4096 + 768) + acts["transformer_checkpointed"] \
                + 2 * a + max(acts["vae_decode_checkpointed"], reward_peak, acts["transformer_recompute"]) \
                + (2 * 6 * D * D if row["base"] == "nf4" else 0)
            total = 1.10 * allocated + GIB
            # approx's 1e-12 relative: float sums of ~1e10 bytes in another order; one term left out moves it by 1e-3
            assert row["allocated"] == pytest.approx(allocated, rel=1e-12)
            assert row["total"] == pytest.approx(total, rel=1e-12)
            assert row["fits"] == {card: total <= card * GIB for card in (24, 48, 80)}
    rows = {(r["base"], r["rank"]): r for r in plan.one_gpu_plan(c, H100_ACTS, str(tmp_path))["rows"]}
    # the claim, by the plan: FLUX.1-dev's LoRA fits a 24 GB card only on the 4-bit base, a 48 GB one on bf16
    assert all(rows["nf4", r]["fits"][24] and not rows["bf16", r]["fits"][24] and rows["bf16", r]["fits"][48]
               for r in (16, 64))
    assert "needed for none of these rows" in plan.one_gpu_table(plan.one_gpu_plan(c, H100_ACTS, str(tmp_path)))


def test_a_run_that_records_both_peaks_sets_the_reserve(tmp_path):
    (tmp_path / "gpu-x-train-lora-metrics.jsonl").write_text(
        json.dumps(dict(step=1, max_memory_gib=10.0, max_reserved_gib=11.0)) + "\n"
        + json.dumps(dict(step=2, max_memory_gib=10.0, max_reserved_gib=12.5)) + "\n")
    (tmp_path / "gpu-y-train-ddp-metrics.jsonl").write_text(json.dumps(dict(step=1, max_memory_gib=10.0)) + "\n")
    assert plan.measured_reserve(str(tmp_path)) == (1.25, "gpu-x-train-lora-metrics.jsonl")
    assert plan.measured_reserve(str(tmp_path / "none")) == (None, None)


@pytest.mark.parametrize("layers, single, heads, head_dim, text_tokens, resolution",
                         [(1, 1, 2, 16, 8, 64), (2, 3, 3, 8, 5, 32)])
def test_forward_flops_equal_torch_flop_counter(layers, single, heads, head_dim, text_tokens, resolution):
    """The closed form against FlopCounterMode (its matmuls, and attention's two products through SDPA's math
    backend, which it counts; the CPU's flash kernel it does not): exactly, on two FLUX shapes."""
    config = dict(FLUX_DEV, num_layers=layers, num_single_layers=single, num_attention_heads=heads,
                  attention_head_dim=head_dim, joint_attention_dim=32, pooled_projection_dim=24,
                  axes_dims_rope=rope_axes(head_dim))
    model = FluxTransformer2DModel(**config)
    embeds = dict(encoder_hidden_states=torch.randn(1, text_tokens, 32), pooled_projections=torch.randn(1, 24))
    cond, x = flux.conditioning(embeds, resolution, "cpu"), flux.latent_noise(resolution, None, "cpu")
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        flux.velocity(model, x, 0.5, cond, 3.5)
    assert gpu.forward_flops(layers, single, heads * head_dim, text_tokens, (resolution // 16) ** 2, 32, 24) \
        == counter.get_total_flops()


def test_full_depth_section_takes_medians_after_the_first_step_and_survives_a_failed_run(tmp_path, monkeypatch):
    """The section on made-up train.py metrics (train.py is the root's, tested there): the bf16 run's medians of the
    steps after the first and its TFLOP/s from the counted FLOPs; the nf4 run fails and is recorded so."""
    cfg = types.SimpleNamespace(**gpu.TINY)
    monkeypatch.setattr(gpu, "write_models", lambda *a: dict(params=123, seconds=1.0, device="CPU"))
    steps = [dict(step_time_s=t, time_rollout_s=t / 2, time_branches_s=t / 4, max_memory_gib=None,
                  max_reserved_gib=None) for t in (9.0, 2.0, 4.0)]

    def fake_train_py(root, out_dir, n, flags, device, watch):
        watch(types.SimpleNamespace(pid=os.getpid()))
        if "--quantize-base" in flags:
            raise SystemExit(2)
        assert n == cfg.full_depth_steps and flags[flags.index("--lora-rank") + 1] == str(cfg.lora_rank)
        return steps
    monkeypatch.setattr(gpu, "run_train_py", fake_train_py)
    r = gpu.full_depth(cfg, str(tmp_path / "m"), str(tmp_path))
    bf16, nf4 = r["runs"]
    assert (bf16["status"], bf16["step_time_s"], bf16["rollout_s"], bf16["branches_s"]) == ("ok", 3.0, 1.5, 0.75)
    flops = gpu.forward_flops(*cfg.full_depth, cfg.heads * cfg.head_dim, cfg.text_len, (cfg.resolution // 16) ** 2,
                              cfg.text_width, cfg.pooled_width)
    assert r["step_flops"] == flops * (25 + 2 * 4)  # 25 rollout calls; per branch forward, recompute, backward 2x
    assert bf16["tflops"] == pytest.approx(r["step_flops"] / 3.0 / 1e12, rel=1e-12)
    assert bf16["process_gib"] > 0 and nf4["status"].startswith("failed") and "--quantize-base nf4" in nf4["status"]
    assert json.load(open(tmp_path / "full-depth.json"))["runs"][1]["base"] == "nf4"


def test_full_depth_report_holds_the_runs_against_the_plan_and_the_extrapolation():
    """A full-depth run made up from the plan's own rows (bf16 exactly the plan; nf4 20% over it and over its
    goal): the report flags exactly the nf4 terms, states the goals, the ratio to the extrapolation and the
    release's hours by hand."""
    cfg = types.SimpleNamespace(**gpu.GPU)
    one_gpu = plan.one_gpu_plan(plan.one_gpu_counts(), H100_ACTS, os.devnull)
    rows = {row["base"]: row for row in one_gpu["rows"] if row["rank"] == 64}

    def run(base, over):
        p = rows[base]
        return dict(base=base, status="ok", steps=3, step_time_s=6.0, rollout_s=4.0, branches_s=1.5, rest_s=0.5,
                    tflops=200.0, rollout_tflops=230.0, branches_tflops=190.0,
                    max_memory_gib=over * p["allocated"] / GIB, max_reserved_gib=over * (p["allocated"] + p["reserve"])
                    / GIB, process_gib=over * p["total"] / GIB)
    assert 1.2 * (rows["nf4"]["allocated"] + rows["nf4"]["reserve"]) > 22 * GIB  # so its goal is not met
    r = dict(date="today", seconds={"full-depth": 300.0}, notes={}, plan=H100_ACTS, one_gpu_plan=one_gpu,
             full_depth_extrapolation=dict(rollout_s=3.6, branches_s=1.8, lora_rollout_s=4.0, lora_branches_s=1.0,
                                           source="an earlier run"))
    r["full-depth"] = dict(models=dict(params=11_901_408_320, written_bytes=26e9, seconds=60.0, device="GPU",
                                       torch="2"), forward_flops=37e12, step_flops=33 * 37e12, rollout_steps=25,
                           branches=2, runs=[run("bf16", 1.0), run("nf4", 1.2)])
    text = gpu_report.report(cfg, r)
    assert "## 9. Full depth" in text and "$" not in text and "## 1." not in text
    # the nf4 run's allocated, reserved and card's terms (its context too, and its reserved / allocated is not flagged)
    assert text.count("**off by +20%**") == 4 and all(line.startswith("| nf4") for line in text.splitlines()
                                                        if "**off by" in line)
    goals = text.split("Goals (the issue's, reserved peak): ")[1].splitlines()[0]
    assert goals.startswith("bf16 base") and "(goal: under 44): met; nf4 base" in goals
    assert goals.endswith("(goal: under 22): **not met**.")
    assert "rollout 1.00x, branches 1.50x; **outside** the 15% tolerance" in text
    hours = 20 * (32 * (4.0 + 1.5) + 0.5) / 3600  # 20 updates of 32 prompts, one rollout and the branches each
    assert f"| {hours:.2f} |" in text.split("| bf16 | ")[-1]


def test_toy_nf4_comparison_writes_every_number_and_its_differences(world, tmp_path):
    """The toy comparison on the quick world, 2 steps, one seed a prompt: both LoRA runs, the five models measured;
    each difference is its two models' numbers subtracted, the nf4 base's weights are NF4's error away from the
    fp32 ones (about 0.1 relative for bell-shaped weights), and the report has every number."""
    r = toy_nf4.comparison(world, str(tmp_path), steps=2, seeds_per_prompt=1)
    n, d = r["numbers"], r["differences"]
    assert len(n) == 5 and all("train_reward" in n[name] for name in n if name.startswith("LoRA"))
    the = d["LoRA on nf4 - LoRA on fp32 (the comparison)"]
    assert the["judge_score"] == n["LoRA on the nf4 base"]["judge_score"] - n["LoRA on the fp32 base"]["judge_score"]
    assert d["base nf4 - base fp32 (quantization alone)"]["brightness"][0] == pytest.approx(
        n["base, nf4"]["brightness"] - n["base, fp32"]["brightness"], abs=1e-6)  # a mean of differences, in fp32
    assert 0.02 < r["weight_error"] < 0.2 and -1 <= r["lora_cosine"] <= 1
    report = (tmp_path / "report.md").read_text()
    assert "$" not in report and "| LoRA on the nf4 base | " in report
    assert json.load(open(tmp_path / "numbers.json"))["steps"] == 2
