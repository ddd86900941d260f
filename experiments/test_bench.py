"""Tests of bench.py, stability.py, plan.py and measure.py: the memory plan's arithmetic against parameters counted
by hand and by summing real models, the stability table against the chain rule's closed form, the shared clock and
memory reading against known quantities, and one --quick run's tables, JSON and figure.
Run: python -m pytest -q experiments/test_bench.py"""
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from diffusers import FluxTransformer2DModel
from PIL import Image

from experiments import bench, plan, stability
from experiments.measure import FLUX_DEV, md_table, peak, reset_peak, rope_axes, timed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("SRPO_TINY_DIR", tempfile.mkdtemp(prefix="srpo-tiny-"))
TINY = dict(FLUX_DEV, num_layers=2, num_single_layers=3, num_attention_heads=2, attention_head_dim=16,
            joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=rope_axes(16))
CPU = torch.device("cpu")


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
    assert rope_axes(128) == FLUX_DEV["axes_dims_rope"] == (16, 56, 56)
    for d in range(8, 258, 2):
        axes = rope_axes(d)
        assert sum(axes) == d and all(a > 0 and a % 2 == 0 for a in axes), d


def test_param_counts_on_meta_equal_real_models_and_the_hand_count():
    real = FluxTransformer2DModel(**TINY)
    counted = sum(p.numel() for p in real.parameters())
    assert plan.count_params(lambda: FluxTransformer2DModel(**TINY)) == counted == flux_params_by_hand(TINY)[0]
    flux_dev = plan.count_params(lambda: FluxTransformer2DModel(**FLUX_DEV))
    assert isinstance(flux_dev, int) and flux_dev == flux_params_by_hand(FLUX_DEV)[0] == 11_901_408_320


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
        fsdp, ddp = (plan.rank_memory(n, world, s, blocks, 7, acts) for s in ("fsdp", "ddp"))
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
    out = plan.saved_bytes(lambda: torch.relu(linear(x)) + linear(x), linear)
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

    assert saved(plan.CudaAutocast()) == saved(torch.autocast("cpu", torch.bfloat16))


def test_cuda_autocast_on_a_cpu_gives_cudas_dtypes():
    """PyTorch's CUDA autocast runs linear in bf16 and layer_norm and softmax in fp32, and other ops promote; the
    CPU's own autocast keeps layer_norm in bf16, which is why the plan emulates CUDA's policy."""
    linear, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    with plan.CudaAutocast() as mode:
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


def test_timer_measures_a_sleep_of_known_length():
    # time.sleep returns no earlier than asked; a busy machine may wake it later, by a scheduler's latency (well under
    # 0.1 s on a loaded 2-core box), never by a second
    assert 0.2 <= timed(lambda: time.sleep(0.2), CPU) < 0.3


def test_peak_memory_sees_a_tensor_freed_before_it_is_read():
    """A 64 MiB tensor written and freed between reset_peak and peak raises the peak by its size (the resident set
    on a CPU), and a second reset forgets it. Slack: 8 MiB of allocator and interpreter noise either way."""
    mib = 2**20
    before = reset_peak(CPU)
    x = torch.ones(64 * mib // 4)  # float32: 64 MiB, every page written
    del x
    assert 56 * mib < peak(CPU) - before < 72 * mib
    before = reset_peak(CPU)
    assert peak(CPU) - before < 8 * mib


def test_md_table_is_markdown_with_a_blank_line_after():
    assert md_table(["a", "b"], [[1, "x"], [2.5, "y"]]) == "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | y |\n"


def test_stability_gradients_follow_the_chain_rule():
    """With a linear score r = <w, x0_hat> and v = W x, the gradients are closed forms: d x0_hat / d v is -sigma for
    the one-step prediction and (sigma_to - sigma) / (1 - sigma_to) for Direct-Align, so |dr/dv| is that factor
    times |w|, and |dr/dW| the same factor times |w x^T|; each x0_hat misses x0 by its factor times |v - (noise - x0)|
    (METHOD.md §2). float64: the closed forms hold to rounding (1e-12)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 6, bias=False).double()
    w, noise, x0 = (torch.randn(1, 6, dtype=torch.float64) for _ in range(3))
    sigma, delta = 0.7, 0.05
    row, = stability.gradients(lambda x, s: linear(x), lambda x0_hat: (w * x0_hat).sum(), [(noise, x0)], [sigma],
                               list(linear.parameters()), delta)
    x = (1 - sigma) * x0 + sigma * noise
    error = (linear(x) - (noise - x0)).norm().item()
    factors = dict(one_step=sigma, direct_align=delta / (1 - sigma + delta))
    for name, factor in factors.items():
        assert row[f"grad_v_{name}"] == pytest.approx(factor * w.norm().item(), rel=1e-12)
        assert row[f"grad_w_{name}"] == pytest.approx(factor * (w.T @ x).norm().item(), rel=1e-12)
        assert row[f"x0_error_{name}"] == pytest.approx(factor * error / x0.norm().item(), rel=1e-12)
    assert row["ratio"] == pytest.approx(factors["one_step"] / factors["direct_align"], rel=1e-12)


def test_quick_run_writes_every_table_and_the_json(tmp_path):
    done = subprocess.run([sys.executable, "-m", "experiments.bench", "--quick", "--draft-k", "1", "25", "--sigmas",
                           "0.9", "0.5", "0.1", "--json", str(tmp_path / "bench.json"), "--plot",
                           str(tmp_path / "plot.png")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-8000:]
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "| method |", "| sigma |", "| part |", "| GPUs |"):
        assert heading in done.stdout
    result = json.load(open(tmp_path / "bench.json"))
    steps = {(s["method"], s["k"]): s for s in result["steps"]}
    assert list(steps) == [("direct_align", 1), ("direct_align_both", 2), ("direct_align_both_lora", 2), ("refl", 1),
                           ("draft", 1), ("draft", 25)]
    # DRaFT-25 keeps 25 transformer calls' activations for its backward, DRaFT-1 and Direct-Align's branch one: about
    # 0.7 MiB a call at this size (18 MiB more), where methods of one call differ by a few tenths of a MiB
    assert steps["draft", 25]["step_mem_mb"] > steps["draft", 1]["step_mem_mb"] + 8
    assert steps["draft", 25]["mem_ratio"] > 1.1
    # the chain rule's ratio sigma (1 - sigma_to) / delta with the release's step delta = 100 (g[5] - g[25]) / 999 of
    # the shift-3 grid g(s) = 3 s / (1 + 2 s) (METHOD.md §3: 0.0215); the reward's gradient itself differs a little
    # between the two x0_hat (under 1% on these random models), hence 5%
    g = lambda s: 3 * s / (1 + 2 * s)  # noqa: E731
    delta = 100 * (g(0.9) - g(0.5)) / 999
    assert [r["sigma"] for r in result["stability"]] == [0.9, 0.5, 0.1]
    for r in result["stability"]:
        assert r["ratio"] == pytest.approx(r["sigma"] * (1 - r["sigma"] + delta) / delta, rel=0.05)
    # the parts of section 3 timed alone: 25 transformer forwards against 2 forwards and 2 backwards (a backward
    # costs about two forwards: 6 forwards' worth), a factor of 4 that no timer noise makes up
    parts = result["overhead"]["parts_s"]
    assert parts["rollout: 25 transformer forwards, no grad"] > parts["transformer forward + backward, x2"]
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
