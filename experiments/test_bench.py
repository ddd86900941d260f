"""Tests of bench.py: the memory plan's arithmetic against parameters counted by hand and by summing real models,
and one --quick run's tables, JSON and figure (not its speed). Run: python -m pytest -q experiments/test_bench.py"""
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from diffusers import FluxTransformer2DModel
from PIL import Image

from experiments import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("SRPO_TINY_DIR", tempfile.mkdtemp(prefix="srpo-tiny-"))
TINY = dict(bench.FLUX_DEV, num_layers=2, num_single_layers=3, num_attention_heads=2, attention_head_dim=16,
            joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=bench.rope_axes(16))


def flux_params_by_hand(c):
    """FLUX's parameters from its config, layer by layer (width D, 64 input channels, patch 1):
    double block: AdaLN-Zero x2 (6D^2+6D each), q k v + added q k v + two outputs (8 (D^2+D)), four RMSNorms of
    head_dim, two MLPs D->4D->D (8D^2+5D each); single block: AdaLN (3D^2+3D), q k v (3D^2+3D), MLP in (4D^2+4D),
    out (5D^2+D), two RMSNorms; the rest: x, context, timestep, guidance, pooled-text embedders, the final AdaLN
    (2D^2+2D) and the output projection (64D+64)."""
    D, d = c["num_attention_heads"] * c["attention_head_dim"], c["attention_head_dim"]
    double = 36 * D * D + 30 * D + 4 * d
    single = 15 * D * D + 11 * D + 2 * d
    rest = 5 * D * D + (650 + c["joint_attention_dim"] + c["pooled_projection_dim"]) * D + 64
    return c["num_layers"] * double + c["num_single_layers"] * single + rest, double, single


def test_rope_axes_give_flux_dev_split_and_sum_to_the_head_dim():
    assert bench.rope_axes(128) == bench.FLUX_DEV["axes_dims_rope"] == (16, 56, 56)
    for d in range(8, 258, 2):
        axes = bench.rope_axes(d)
        assert sum(axes) == d and all(a > 0 and a % 2 == 0 for a in axes), d


def test_param_counts_on_meta_equal_real_models_and_the_hand_count():
    real = FluxTransformer2DModel(**TINY)
    counted = sum(p.numel() for p in real.parameters())
    assert bench.count_params(lambda: FluxTransformer2DModel(**TINY)) == counted == flux_params_by_hand(TINY)[0]
    flux_dev = bench.count_params(lambda: FluxTransformer2DModel(**bench.FLUX_DEV))
    assert isinstance(flux_dev, int) and flux_dev == flux_params_by_hand(bench.FLUX_DEV)[0] == 11_901_408_320


def test_memory_plan_arithmetic_on_a_tiny_config():
    model = FluxTransformer2DModel(**TINY)
    n = sum(p.numel() for p in model.parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for b in [*model.transformer_blocks,
                                                                  *model.single_transformer_blocks]]
    _, double, single = flux_params_by_hand(TINY)
    assert blocks == [double] * 2 + [single] * 3
    acts = dict(transformer=1000, transformer_checkpointed=100, transformer_recompute=20, vae_decode=10,
                vae_decode_checkpointed=5, reward=1)
    # A branch holds the transformer's saved tensors plus the largest peak of what runs its backward after it:
    # 1000 + max(10, 1) without checkpointing, 100 + max(5, 1, 20) with it.
    # exact (==): integer byte counts divided by powers of 2, all far below 2^53, are exact in float64 in any order
    for world in (1, 8, 32):
        fsdp, ddp = (bench.rank_memory(n, world, s, blocks, 7, acts) for s in ("fsdp", "ddp"))
        assert fsdp["weights"] == fsdp["grads"] == 4 * n / world and fsdp["optimizer"] == 8 * n / world
        assert ddp["weights"] == ddp["grads"] == 4 * n and ddp["optimizer"] == 8 * n  # DDP: full copies everywhere
        assert fsdp["train_memory_plan_total"] == 16 * n / world  # what train.py prints: weights, grads, AdamW
        rest = n - 2 * double - 3 * single
        assert fsdp["compute_copies"] == 2 * (2 * double + rest) + 6 * double and ddp["compute_copies"] == 2 * n
        rollout = 2 * n  # every block's bf16 weights, gathered for the whole rollout
        assert fsdp["total"] == 16 * n / world + 7 + max(fsdp["compute_copies"] + 1010, rollout)
        assert fsdp["total_checkpointed"] == 16 * n / world + 7 + max(fsdp["compute_copies"] + 120, rollout)
        assert ddp["total"] == 16 * n + 7 + max(2 * n + 1010, rollout) and fsdp["fits_80gb"]
        # checkpointed DDP: every weight's bf16 copy at the forward's end (2n) outweighs the backward's moment, the
        # recomputed block's and the root's copies plus the largest part (2 (double + rest) + 20)
        assert 2 * n > 2 * (double + rest) + 20 and ddp["total_checkpointed"] == 16 * n + 7 + 100 + 2 * n
        assert ddp["fits_80gb_checkpointed"]


def test_saved_bytes_counts_each_activation_once_and_no_weights():
    linear = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    # each addmm keeps x (for the weight's gradient) and a view of the weight (skipped); relu keeps its 3x4
    # output: x is saved twice and counted once, the weight never.
    out = bench.saved_bytes(lambda: torch.relu(linear(x)) + linear(x), linear)
    # under CUDA's autocast both linears take one cached bf16 cast of the leaf x, and relu keeps a bf16 output
    assert out == {"other": (3 * 8 + 3 * 4) * 2}


def test_cuda_autocast_saves_what_torchs_own_autocast_saves_where_their_policies_agree():
    """Linear layers and GELU: bf16 for linear, no cast for GELU, under the CPU's autocast and CUDA's alike. The
    emulation must then save the same tensors, in the same dtypes, as torch.autocast itself (weight casts included,
    each once: autocast caches the casts of weights that train)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4), torch.nn.GELU(),
                                torch.nn.Linear(4, 4))
    x = torch.randn(3, 8, requires_grad=True)

    def saved(context):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = (t.dtype, t.untyped_storage().nbytes())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
            model(x).sum() + model(x).sum()  # twice: the second pass reuses the cached weight casts
        return sorted(seen.values(), key=str)

    assert saved(bench.CudaAutocast()) == saved(torch.autocast("cpu", torch.bfloat16))


def test_cuda_autocast_on_a_cpu_gives_cudas_dtypes():
    """PyTorch's CUDA autocast runs linear in bf16 and layer_norm and softmax in fp32, and other ops promote; the
    CPU's own autocast keeps layer_norm in bf16, which is why the plan emulates CUDA's policy."""
    linear, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    with bench.CudaAutocast() as mode:
        h = linear(x)
        normed = torch.nn.functional.layer_norm(h, (8,))
        mixed = normed * h
        p = torch.softmax(h, -1)
    assert (h.dtype, normed.dtype, mixed.dtype, p.dtype) == (torch.bfloat16, torch.float32, torch.float32,
                                                             torch.float32)
    assert len(mode.copies) == 2  # the weight's and the bias's casts, once each
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.nn.functional.layer_norm(linear(x), (8,)).dtype == torch.bfloat16


def test_flags_are_checked_in_one_line(capsys):
    for argv, flag in ((["--resolution", "30"], "--resolution"), (["--draft-k", "30"], "--draft-k"),
                       (["--threads", "0"], "--repeats"),
                       (["--sigmas", "1.0"], "--sigmas"), (["--head-dim", "7"], "--head-dim")):
        with pytest.raises(SystemExit) as e:
            bench.check_args(bench.parse_args(argv))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith(f"error: {flag}") and "\n" not in err


def test_quick_run_writes_every_table_and_the_json(tmp_path):
    done = subprocess.run([sys.executable, "-m", "experiments.bench", "--quick", "--draft-k", "1", "3", "--json",
                           str(tmp_path / "bench.json"), "--plot", str(tmp_path / "plot.png")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-8000:]
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "| method |", "| sigma |", "| part |", "| GPUs |"):
        assert heading in done.stdout
    result = json.load(open(tmp_path / "bench.json"))
    steps = result["steps"]
    assert [(s["method"], s["k"]) for s in steps] == [("direct_align", 1), ("direct_align_both", 2),
                                                      ("direct_align_both_lora", 2), ("refl", 1),
                                                      ("draft", 1), ("draft", 3)]
    assert all(s["time_s"] > 0 and s["peak_mem_mb"] > 0 and len(s["times_s"]) == 1 for s in steps)
    assert steps[0]["time_ratio"] == 1  # its time over itself: x / x is exactly 1
    # every row against the first (rows arrive one by one): the same one division, so exactly equal
    assert all(s["time_ratio"] == s["time_s"] / steps[0]["time_s"] and
               s["mem_ratio"] == s["step_mem_mb"] / steps[0]["step_mem_mb"] for s in steps)
    assert len(result["stability"]) == 10 and all(r["grad_v_one_step"] > 0 for r in result["stability"])
    assert result["overhead"]["ratio"] > 0 and len(result["overhead"]["parts_s"]) == 5
    assert Image.open(tmp_path / "plot.png").size == (2 * 640, 300)  # section 2's two panels, through plots.py
    plan = result["memory_plan"]
    assert plan["params"] == 11_901_408_320
    # LoRA on FLUX.1-dev by hand: rank r on a linear in -> out adds r (in + out). Width D = 3072; a double block
    # adapts 8 D -> D attention projections (16 r D) and two feed-forwards D -> 4D -> D (20 r D); a single block
    # its q, k, v (6 r D): 19 * 36 + 38 * 6 = 912 r D.
    assert plan["lora_params"] == 912 * plan["lora_rank"] * 3072
    full = [p for p in plan["plans"] if not p["lora_params"]]
    lora = [p for p in plan["plans"] if p["lora_params"]]
    assert {(p["world_size"], p["strategy"]) for p in full} == {(w, s) for w in (1, 8, 16, 32) for s in ("fsdp", "ddp")}
    assert {(p["world_size"], p["strategy"]) for p in lora} == {(w, s) for w in (1, 8) for s in ("fsdp", "ddp")}
    for p in plan["plans"]:  # exact (==): integer byte counts over a power of 2 (1 to 32), below 2^53 in float64
        shard = p["world_size"] if p["strategy"] == "fsdp" else 1
        trained = p["lora_params"] or plan["params"]
        assert p["weights"] == (4 * trained + (2 if p["lora_params"] else 4) * (plan["params"] - trained)) / shard
        assert p["optimizer"] == 8 * trained / shard
        assert p["total_checkpointed"] < p["total"]
    one_gpu = next(p for p in lora if p["world_size"] == 1 and p["strategy"] == "ddp")
    assert one_gpu["total_checkpointed"] < 48e9  # the goal: the release's recipe with LoRA on one 48 GB GPU
