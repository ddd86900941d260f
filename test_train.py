"""Tests of train.py and flux.py: runs under torchrun with FSDP2 and DDP against each other and against diffusers'
FluxPipeline, exact resume, the Direct-Align step's gradient path, offline mode against diffusers' image processor,
and bad input. CPU only, tiny random models built offline."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist

import flux
import train
from srpo import srpo_step
from srpo_reward import load_reward
from tiny import tiny_model_paths

ROOT = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("SRPO_TINY_DIR", tempfile.mkdtemp(prefix="srpo-tiny-"))
torch.set_num_threads(2)
FAST = ["--rollout-steps", "3", "--resolution", "32", "--sample-every", "0", "--max-sequence-length", "32"]


def run_train(*args, nproc=1):
    # --standalone: a free port of its own, so runs beside other torchrun jobs do not collide on 29500
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *launcher, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def train_here(*args):
    """train.py on one rank in this process: the same main(), without a new process's seconds of imports. For runs
    whose point is the math; what a process prints or how it ends is tested with run_train."""
    try:
        train.main([str(a) for a in args])
    finally:  # a failed run would leave its process group to the next test
        if dist.is_initialized():
            dist.destroy_process_group()


def dcp_state(checkpoint):
    """A checkpoint's sharded training state, gathered into one dict by torch's own converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as d:
        dcp_to_torch_save(os.path.join(checkpoint, "state"), os.path.join(d, "state.pt"))
        return torch.load(os.path.join(d, "state.pt"), weights_only=False)


def close_updates(a, b, start, rtol=1e-2):
    """a and b moved from start by the same update, up to rtol of the update's size. Two runs that do the same
    math in another order (all-reduce against reduce-scatter, another CPU's SIMD width) differ in the last bits
    of each gradient; AdamW divides by the gradient's own scale, so those bits end up relative to the update
    (measured: up to 1.3e-5 of it). AdamW's first steps move each weight by about lr whatever the gradient's
    size, so a gradient that lost or doubled a prompt, or took another prompt's, changes the update by far more
    than 1e-2 of itself. The 1e-12 is below fp32's resolution of any weight here: a weight that no
    step moved must keep the same bits."""
    return bool((a - b).norm() <= rtol * (a - start).norm() + 1e-12)


# Batch 4, 2 steps, on 1, 2 and 4 ranks, FSDP2 and DDP (with activation checkpointing): (name, ranks, flags).
WORLDS = [("fsdp-1", 1, ["--strategy", "fsdp"]), ("fsdp-2", 2, ["--strategy", "fsdp", "--sample-every", "2"]),
          ("fsdp-4", 4, ["--strategy", "fsdp"]), ("ddp-2", 2, ["--strategy", "ddp", "--gradient-checkpointing"])]


@pytest.fixture(scope="module")
def batch_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    for name, ranks, flags in WORLDS:
        argv = ["--batch-size", "4", "--steps", "2", "--lr", "1e-3", *FAST, *flags, "--output-dir", str(root / name),
                "--judge", "pickscore", "--judge-path", tiny_model_paths()[1], "--eval-count", "3", "--eval-every", "1"]
        if ranks == 1:
            train_here(*argv)
        else:
            done = run_train(*argv, nproc=ranks)
            assert done.returncode == 0, (name, done.stderr[-12000:])
    return root


def test_world_size_and_strategy_are_invisible_to_the_math(batch_runs):
    from diffusers import FluxTransformer2DModel
    from tiny import tiny_model_paths
    start = FluxTransformer2DModel.from_pretrained(tiny_model_paths()[0], subfolder="transformer").state_dict()
    ref = dcp_state(batch_runs / "fsdp-1" / "checkpoint-2")
    assert set(ref["model"]) == set(start)
    assert sum((ref["model"][k] - start[k]).abs().sum() for k in start) > 0.1  # training moved the weights
    rows = lambda name: [json.loads(line) for line in open(batch_runs / name / "metrics.jsonl")]  # noqa: E731
    scale = load_reward("pickscore", tiny_model_paths()[1]).model.logit_scale.exp().item()
    for name, _, _ in WORLDS[1:]:
        state = dcp_state(batch_runs / name / "checkpoint-2")
        for key in start:  # relative to the update: ranks and CPUs sum the gradients in other orders
            assert close_updates(state["model"][key], ref["model"][key], start[key]), (name, key)
        # the batch's mean, whoever computed which prompt: a mean of relu terms, no cancellation, so relative to
        # the loss; fp32 forwards in other shapes and orders, step 2's from weights apart by rtol of an update
        # (measured 6e-9 relative, so 1e-4); a rank's prompts left out of the mean move it by ~1e-2.
        # k_denoise: a float64 mean of the same per-prompt k's, summed in another order (~1e-16 apart), so approx's
        # 1e-6 relative; a prompt that drew another t* moves it by ~1e-2 relative.
        for a, b in zip(rows(name), rows("fsdp-1"), strict=True):
            if "loss" in a:
                assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and \
                    a["k_denoise"] == pytest.approx(b["k_denoise"])
            # the judge's scores of the 3 held-out prompts, rendered by whichever rank (2 ranks: 2 and 1, 4 ranks: one
            # each and a repeat): PickScore's scale times a cosine of unit vectors, so 1e-4 of the scale; the same
            # prompt from another prompt's noise, or one image scored with another prompt, moves it by ~1e-1 of it
            assert a["eval_judge_scores"] == pytest.approx(b["eval_judge_scores"], abs=1e-4 * scale), (name, a["step"])
    row = rows("fsdp-2")[1]
    assert [r["step"] for r in rows("fsdp-2")] == [0, 1, 2] and row["reward_inversion"] is not None
    assert {"loss", "reward_denoise", "sigma_denoise", "sigma_inversion", "k_denoise", "k_inversion", "grad_norm",
            "lr", "step_time_s", "time_rollout_s", "time_branches_s", "max_memory_gib", "max_reserved_gib"} <= set(row)


def test_the_published_checkpoint_loads_into_flux_pipeline(batch_runs):
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from PIL import Image
    from safetensors.torch import load_file
    from tiny import tiny_model_paths
    assert Image.open(batch_runs / "fsdp-2" / "samples" / "step-000002.png").size == (64, 32)  # 2 ranks, 32 px
    ckpt = batch_runs / "fsdp-2" / "checkpoint-2"
    pipe = FluxPipeline.from_pretrained(tiny_model_paths()[0])
    pipe.transformer.load_state_dict(load_file(ckpt / "diffusion_pytorch_model.safetensors"), strict=True)
    image = pipe("a red car", height=32, width=32, num_inference_steps=2, max_sequence_length=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    state = dcp_state(ckpt)["model"]
    for key, value in FluxTransformer2DModel.from_pretrained(ckpt).state_dict().items():
        # the file is the fp32 state rounded to bf16 (round to nearest even, the same bits on any CPU), read back
        # exactly (bf16 -> fp32 widens): the same computation, so exact; the weights one step earlier would fail
        assert torch.equal(value.float(), state[key].to(torch.bfloat16).float()), key


def test_batch_size_must_divide_among_the_ranks():
    done = run_train("--batch-size", "3", nproc=2)
    # torchrun reports a failed rank with a traceback of its own; the ranks print one line, no traceback of theirs
    assert done.returncode != 0 and 'train.py", line' not in done.stderr
    assert done.stderr.count("error: --batch-size 3: must be a positive multiple of the 2 ranks") == 1


SHARDED_LOAD = """
import sys, torch, torch.distributed as dist
from diffusers import FluxTransformer2DModel
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from flux import fill_from_checkpoint, transformer_on_meta
dist.init_process_group("gloo")
model = transformer_on_meta(sys.argv[1])
for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
    fully_shard(block)
fully_shard(model)
fill_from_checkpoint(model.to_empty(device="cpu"), sys.argv[1])
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if dist.get_rank() == 0:
    torch.save(full, sys.argv[2])
dist.barrier()
dist.destroy_process_group()
"""


def test_sharded_loading_equals_from_pretrained_bit_for_bit(tmp_path):
    from diffusers import FluxTransformer2DModel
    from tiny import tiny_model_paths
    reference = FluxTransformer2DModel.from_pretrained(tiny_model_paths()[0], subfolder="transformer",
                                                       dtype=torch.float32)
    # bf16 shards of at most 40 kB behind an index, as FLUX.1-dev is stored
    reference.to(torch.bfloat16).save_pretrained(tmp_path / "model" / "transformer", max_shard_size="40KB")
    assert (tmp_path / "model" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    (tmp_path / "load.py").write_text(SHARDED_LOAD)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "load.py"), str(tmp_path / "model"), str(tmp_path / "full.pt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-6000:]
    loaded = torch.load(tmp_path / "full.pt")
    expected = FluxTransformer2DModel.from_pretrained(tmp_path / "model", subfolder="transformer",
                                                      dtype=torch.float32).state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():  # both widen the same bf16 values to fp32, which is exact: equal bits
        assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], value), key


def test_two_steps_resumed_for_two_more_equal_four_steps(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for args in ([a, "--steps", "4"], [b, "--steps", "2"], [b, "--steps", "4", "--resume"]):
        train_here("--output-dir", *args, "--lr", "1e-3", *FAST)
    assert "resumed from" in capsys.readouterr().out
    sa, sb = dcp_state(os.path.join(a, "checkpoint-4")), dcp_state(os.path.join(b, "checkpoint-4"))
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key  # bit for bit
    for key, state in sa["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, sb["optimizer"]["state"][key][name]), (key, name)
    rows = lambda d: [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}  # times differ  # noqa: E731
                      for line in open(os.path.join(d, "metrics.jsonl"))]
    assert rows(a) == rows(b) and len(rows(a)) == 4


def test_tiny_models_are_rebuilt_when_tiny_py_changes_and_reused_when_not(tmp_path, monkeypatch):
    """No hidden cache state: a folder built by other code (an older tiny.py, another seed) is never reused."""
    import importlib.util
    import tiny
    built = []
    spec = importlib.util.spec_from_file_location("tiny_changed", tmp_path / "tiny_changed.py")
    (tmp_path / "tiny_changed.py").write_bytes(open(tiny.__file__, "rb").read() + b"\n# one more line\n")
    changed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(changed)
    for module in (tiny, changed):  # record each build instead of building (seconds each)
        for name in ("build_tiny_flux", "build_tiny_clip"):
            monkeypatch.setattr(module, name, lambda path, seed, name=name: built.append(name))
    first = tiny.tiny_model_paths(tmp_path / "cache")
    assert tiny.tiny_model_paths(tmp_path / "cache") == first and len(built) == 2  # reused, not rebuilt
    other_code, other_seed = changed.tiny_model_paths(tmp_path / "cache"), tiny.tiny_model_paths(tmp_path / "cache", 1)
    assert len(built) == 6 and len({first, other_code, other_seed}) == 3


@pytest.fixture(scope="module")
def tiny_parts():
    """The tiny transformer, VAE and reward through train.py's own loading paths, and one prompt's conditioning."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from tiny import tiny_model_paths
    flux_dir, clip_dir = tiny_model_paths()
    vae = AutoencoderKL.from_pretrained(flux_dir, subfolder="vae").eval().requires_grad_(False)
    reward = load_reward("hps", clip_dir)
    embeds = flux.encode_prompts(flux_dir, ["a cat"], 32, tempfile.mkdtemp(), torch.device("cpu"), torch.float32)
    cond = flux.conditioning(embeds("a cat"), 32, torch.device("cpu"))
    new_transformer = lambda: FluxTransformer2DModel.from_pretrained(flux_dir, subfolder="transformer")  # noqa: E731
    return new_transformer, vae, reward, cond


def step_on(transformer, vae, reward, x0, noise, cond, step, generator, *flags):
    """srpo.srpo_step as train.py calls it, with the settings of train.py's flags at 32x32 plus flags."""
    args = train.parse_args(["--resolution", "32", *flags])
    return srpo_step(lambda x, s: flux.velocity(transformer, x, s, cond, args.guidance),
                     lambda x: flux.decode(vae, x, 32), reward, x0, noise, "a cat", step, generator,
                     **train.step_settings(args))


REALISM = ["Natural-lighting", "Detail", "Detailed", "Real"]       # the release's word lists, as its functions hold
CG_OILY = ["Concept art", "Painting", "Anime", "Flat", "Oil"]


def release_step(transformer, vae, reward, x0, noise, cond, caption, step, mid_timestep):
    """Both branches as the release's train_one_step computes them (fastvideo/SRPO.py, HPSv2.1 config), transcribed
    here with its own names and in its own order: its float32 grids, its `inversion = i % 2` loop (1 first, and 1 is
    the denoise step), its 1-based step for the control words, its discount arrays indexed by mid_timestep."""
    L = 1000
    sigma_schedule = 3 * torch.linspace(1, 0, 51) / (1 + 2 * torch.linspace(1, 0, 51))  # sd3_time_shift(3, ...)
    sigmas_l = torch.linspace(sigma_schedule[5], sigma_schedule[25], L)
    discount, discount_inversion = torch.linspace(0.1, 0.25, L), torch.linspace(0.3, 0.01, L)
    pos_caption, neg_caption = f"{REALISM[step % 4]}. {caption}", f"{CG_OILY[step % 5]}. {caption}"
    k = min(min(L - mid_timestep, int((1 - 0.9) * L) + 1), mid_timestep)
    timestep_select = mid_timestep
    for i in reversed(range(2)):
        inversion = i % 2
        mid_timestep = max(timestep_select - k, 1) if inversion == 0 else timestep_select
        start = min(mid_timestep + k, L)
        t_base, t_start = L - mid_timestep, L - start
        sigmas, sigmast = (sigmas_l[t_base], sigmas_l[t_start]) if inversion == 0 else (sigmas_l[t_start],
                                                                                         sigmas_l[t_base])
        noisy = sigmas * noise + (1.0 - sigmas) * x0
        pred = transformer(hidden_states=noisy, timestep=torch.tensor([int(sigmas * 1000) / 1000]),
                           guidance=torch.tensor([3.5]), return_dict=False, **cond)[0]
        latents = noisy + (1 if inversion else -1) * (sigmas_l[t_base] - sigmas_l[t_start]) * pred
        image = flux.decode(vae, (latents - sigmast * noise) / (1 - sigmast), 32)
        outputs = reward.srp(image, [pos_caption], [neg_caption], discount[mid_timestep].item()) if inversion else \
            reward.srp(image, [neg_caption], [pos_caption], discount_inversion[mid_timestep].item())
        torch.nn.functional.relu(-outputs + 0.7).div(2).mean().backward()


@pytest.mark.parametrize("t_star", [5, 420, 995])  # both ends, where k is clamped, and the middle
def test_srpo_step_gives_the_release_gradient(tiny_parts, monkeypatch, t_star):
    """srpo_step's gradient, on the transformer only, equals the release's computed by its own rule: which would
    fail with the branches swapped, a k schedule read by the other branch or at the other index, the control
    words counted from 0, or a sign or a sigma off."""
    import srpo
    new_transformer, vae, reward, cond = tiny_parts
    noise = flux.latent_noise(32, torch.Generator().manual_seed(0), torch.device("cpu"))
    ours, release = new_transformer(), new_transformer()
    x0 = flux.rollout(ours, noise, cond, 3, 3.0, 1.0)
    monkeypatch.setattr(srpo, "sample_t_star", lambda length, generator: t_star)
    out = step_on(ours, vae, reward, x0, noise, cond, 2, None)  # the third optimizer step: the release's step 3
    release_step(release, vae, reward, x0, noise, cond, "a cat", 3, t_star)
    grads = [(a.grad, b.grad) for a, b in zip(ours.parameters(), release.parameters())]
    # the same math, with the release's float32 window against our float64 one: sigmas differ by ~1e-8, measured up
    # to 1e-5 of the gradient's size; a swapped k, word or branch moves it by more than a percent
    assert sum((a - b).norm() ** 2 for a, b in grads) ** 0.5 <= 1e-4 * sum(b.norm() ** 2 for _, b in grads) ** 0.5
    assert out["loss"] > 0  # the threshold let some gradient through, so the comparison above says something
    assert all(p.grad is None for p in vae.parameters())
    assert all(p.grad is None for p in reward.model.parameters())


class Recorder:
    """An SRP-shaped reward that records what each branch asks: its prompts and its k."""
    def __init__(self):
        self.calls = []

    def srp(self, images, pos_prompts, neg_prompts, k):
        self.calls.append((pos_prompts[0], neg_prompts[0], k))
        return images.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("t_star", [5, 60, 500, 950, 995])
def test_each_branch_reads_its_own_k_schedule_at_its_own_index(monkeypatch, t_star):
    """The release's rule, computed here: the gap int((1 - 0.9) * 1000) + 1 clamped to min(gap, L - t*, t*); the
    denoise branch reads discount_pos at t*, the inversion branch discount_inv at max(t* - gap, 1), words swapped.
    Schedules of four distinct values, so reading the other branch's, or at the other index, shows."""
    import srpo
    monkeypatch.setattr(srpo, "sample_t_star", lambda length, generator: t_star)
    reward, x0 = Recorder(), torch.zeros(1, 3, 4, 4)
    w = torch.zeros((), requires_grad=True)  # a one-parameter model
    srpo_step(lambda x, s: x + w, lambda x: x, reward, x0, torch.ones_like(x0), "a cat", 0, None,
              k_denoise=(0.1, 0.2), k_inversion=(0.7, 0.3))
    gap = min(100, 1000 - t_star, t_star)
    assert reward.calls == [("Detail. a cat", "Painting. a cat", pytest.approx(0.1 + 0.1 * t_star / 999)),
                            ("Painting. a cat", "Detail. a cat", pytest.approx(0.7 - 0.4 * max(t_star - gap, 1) / 999))]


def test_control_words_count_optimizer_steps_from_1_as_the_release_does():
    """The release's loop runs `for step in range(init_steps + 1, ...)` and picks words[step % len(words)]: our
    first optimizer step (0) is its step 1."""
    for step in range(12):
        reward, x0, w = Recorder(), torch.zeros(1, 3, 4, 4), torch.zeros((), requires_grad=True)
        srpo_step(lambda x, s: x + w, lambda x: x, reward, x0, x0, "a cat", step, torch.Generator().manual_seed(step),
                  branches=("denoise",))
        assert reward.calls[0][:2] == (f"{REALISM[(step + 1) % 4]}. a cat", f"{CG_OILY[(step + 1) % 5]}. a cat")


SET = ("srpo.py", "direct_align.py", "srpo_reward.py")  # what README.md tells a reader to copy


def test_the_method_copies_as_a_set_and_runs_alone(tmp_path):
    """The three files, alone in an empty folder with no path to this repository: one step on a small nn.Module
    velocity and a tiny CLIP, whose gradient reaches the module. Their imports name nothing else of the project."""
    import ast
    from tiny import tiny_model_paths
    readme = open(os.path.join(ROOT, "README.md")).read()
    copy = readme[readme.index("## Copy the method"):readme.index("```python")]
    assert all(f"`{name}`" in copy for name in SET)  # the files README.md tells a reader to copy are these
    project = {os.path.splitext(f)[0] for f in os.listdir(ROOT) if f.endswith(".py")} | {"experiments"}
    for name in SET:
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
                   {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert imported & project <= {os.path.splitext(f)[0] for f in SET}, name
        imported |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not imported & {"argparse", "torch.distributed"}, name  # as `import` or `from torch import`
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    (tmp_path / "run.py").write_text(f"""
import sys, torch
from srpo import srpo_step
from srpo_reward import load_reward
model = torch.nn.Conv2d(3, 3, 3, padding=1)
reward = load_reward("clip", {tiny_model_paths()[1]!r})
noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    x0 = torch.tanh(model(noise))
out = srpo_step(lambda x, sigma: model(x) * (1 + sigma), lambda x: (x / 2 + 0.5).clamp(0, 1), reward, x0, noise,
                "a cat", 0, torch.Generator().manual_seed(1), threshold=10)
assert model.weight.grad.abs().sum() > 0 and set(out) >= {{"reward_denoise", "reward_inversion"}}
assert not {{"train", "flux", "inputs", "checkpoint", "tiny"}} & set(sys.modules)
print("ok", out["loss"])
""")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("ok "), done.stderr[-3000:]


class Wrapped(torch.nn.Module):
    """Stands in for DistributedDataParallel's wrapper: the model under .module, the forward passed on."""
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


def test_velocity_gives_guidance_only_to_a_model_that_embeds_it(tiny_parts):
    """FLUX.1-schnell has no guidance input: --guidance is then not passed to it (its forward would fail), wrapped as
    DDP wraps it too; FLUX.1-dev-style models get it. Each against the transformer called directly."""
    from diffusers import FluxTransformer2DModel
    _, _, _, cond = tiny_parts
    x = flux.latent_noise(32, torch.Generator().manual_seed(0), torch.device("cpu"))
    for embeds in (False, True):
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       pooled_projection_dim=32, guidance_embeds=embeds, axes_dims_rope=(4, 6, 6))
        with torch.no_grad():
            direct = model(hidden_states=x, timestep=torch.tensor([0.5]), return_dict=False, **cond,
                           guidance=torch.tensor([3.5]) if embeds else None)[0]
            for m in (model, Wrapped(model)):
                assert torch.equal(flux.velocity(m, x, 0.5, cond, 3.5), direct), embeds


def test_rollout_refuses_an_enclosing_autocast_region(tiny_parts):
    """METHOD.md §7: inside one autocast region, PyTorch releases before the fix of pytorch#158232 reuse a weight's
    bf16 cast made without gradient in a later pass with gradient, and the weight gets none. The rollout makes such
    casts, so it refuses to run inside a region that would outlive it (the CPU's autocast stands in for CUDA's)."""
    new_transformer, _, _, cond = tiny_parts
    noise = flux.latent_noise(32, torch.Generator().manual_seed(0), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="inside an autocast region"), torch.autocast("cpu", torch.bfloat16):
        flux.rollout(new_transformer(), noise, cond, 2, 3.0, 1.0)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # the CPU's rms_norm under autocast
def test_with_autocast_a_rollout_casts_each_weight_once_and_a_step_after_it_trains_every_weight(tiny_parts,
                                                                                                 monkeypatch):
    """The GPU path on a CPU: bf16 autocast on (the CPU's, caching as CUDA's does), fp32 weights as under DDP,
    checkpointing on. The rollout casts each weight once, not once per step; the step after it gives every weight
    a gradient (METHOD.md §7: no cast made without gradient outlives the rollout)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    new_transformer, vae, reward, cond = tiny_parts
    transformer = new_transformer()
    transformer.enable_gradient_checkpointing()
    weights = {p.untyped_storage().data_ptr() for p in transformer.parameters()}
    casts = []

    class Casts(TorchDispatchMode):  # below autograd: every copy autocast makes, and of what
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].untyped_storage().data_ptr() in weights:
                casts.append(args[0].untyped_storage().data_ptr())
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(flux, "AUTOCAST_DEVICES", ("cuda", "cpu"))
    noise = flux.latent_noise(32, torch.Generator().manual_seed(0), torch.device("cpu"))
    with Casts():
        x0 = flux.rollout(transformer, noise, cond, 4, 3.0, 1.0)
    assert x0.dtype == torch.float32 and len(casts) == len(set(casts)) > len(weights) // 2
    step_on(transformer, vae, reward, x0, noise, cond, 0, torch.Generator().manual_seed(1))
    assert all(p.grad is not None and p.grad.any() for p in transformer.parameters())


def test_offline_mode_trains_on_the_vae_encoding_of_captioned_images(tmp_path, tiny_parts):
    from diffusers import FluxPipeline
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image
    _, vae, _, _ = tiny_parts
    for i in range(2):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"a photo of a cat number {i}\n")
    train_here("--image-dir", tmp_path, "--output-dir", tmp_path / "out", "--steps", "2", *FAST)
    assert len(open(tmp_path / "out" / "metrics.jsonl").readlines()) == 2
    # x0 is the image as diffusers' own image processor prepares it, encoded, shifted, scaled and packed
    from inputs import load_image
    x0 = flux.encode_image(vae, load_image(tmp_path / "0.png", 32), torch.Generator().manual_seed(0))
    with torch.no_grad():
        latent = vae.encode(VaeImageProcessor().preprocess(Image.open(tmp_path / "0.png"))).latent_dist.sample(
            generator=torch.Generator().manual_seed(0))
    latent = (latent - vae.config.shift_factor) * vae.config.scaling_factor
    # two code paths (inputs.load_image against diffusers' processor) into one fp32 encoder: rounding, measured
    # 3e-7 of the latents' size, so 1e-5 of it; a wrong pixel range, shift, scale or packing is off by O(1) of it
    expected = FluxPipeline._pack_latents(latent, 1, 16, 4, 4)
    assert torch.allclose(x0, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_prompt_order_release_gives_each_step_the_prompts_the_releases_pipeline_gives_its_32_ranks():
    """The release's two samplers, as its code runs them: preprocessing reads the prompt file through
    DistributedSampler(shuffle=True) (seed 0) on 8 ranks and writes rank 0's prompts, then rank 1's, ...; training
    reads that list through DistributedSampler(shuffle=False) on 32 ranks, one prompt each a step. --prompt-order
    release gives each step the same set on any number of ranks; the default, shuffled, does not."""
    from torch.utils.data.distributed import DistributedSampler
    captions = [f"prompt {i}" for i in range(100)]
    written = [i for r in range(8) for i in DistributedSampler(captions, num_replicas=8, rank=r, shuffle=True)]
    release = [list(DistributedSampler(written, num_replicas=32, rank=r, shuffle=False)) for r in range(32)]
    for order, world in [("release", 1), ("release", 8), ("release", 32), ("shuffled", 8)]:
        args = train.parse_args(["--prompt-order", order, "--batch-size", "32", "--steps", "3"])
        for step in range(3):  # 3 full steps of the 104 written
            ours = []
            for rank in range(world):
                index, mine, used = train.prompt_schedule(args, captions, rank, world)
                ours += [index(step, b) for b in mine]
                assert {index(s, b) for s in range(3) for b in mine} == set(used)
            assert (sorted(ours) == sorted(written[release[r][step]] for r in range(32))) == (order == "release"), \
                (order, world, step)


class Brightness:
    """An SRP-shaped reward whose optimum is known: the mean brightness when the positive prompt carries
    "bright", minus it when the roles are swapped (as the inversion branch swaps them)."""
    def srp(self, images, pos_prompts, neg_prompts, k):
        return images.mean(dim=(1, 2, 3)) * (1 if pos_prompts[0].startswith("bright") else -1)


@pytest.mark.parametrize("branches", ["both", "denoise", "inversion"])
def test_training_on_a_brightness_reward_makes_rollouts_brighter(tiny_parts, branches):
    new_transformer, vae, _, cond = tiny_parts
    transformer = new_transformer()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=2e-3)
    noises = [flux.latent_noise(32, torch.Generator().manual_seed(100 + i), torch.device("cpu")) for i in range(4)]

    def brightness():
        with torch.no_grad():
            return torch.stack([flux.decode(vae, flux.rollout(transformer, n, cond, 3, 3.0, 1.0), 32).mean()
                                for n in noises]).mean().item()
    before = brightness()
    for step in range(8):
        noise = flux.latent_noise(32, torch.Generator().manual_seed(step), torch.device("cpu"))
        x0 = flux.rollout(transformer, noise, cond, 3, 3.0, 1.0)
        step_on(transformer, vae, Brightness(), x0, noise, cond, step, torch.Generator().manual_seed(step),
                "--branches", branches, "--pos-words", "bright", "--neg-words", "dark", "--threshold", "2")
        optimizer.step()
        optimizer.zero_grad()
    assert brightness() > before + 0.01, branches  # 1% of the [0, 1] pixels: an effect (~0.024), not rounding


# ---------------------------------------------------------------- train.py: bad input, one line each

def test_bad_inputs_end_with_one_line(tmp_path, capsys):
    def error(*argv):
        with pytest.raises(SystemExit) as e:
            train.main([*FAST, "--output-dir", str(tmp_path / "out"), *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ")
        return err[-1]
    assert "not a diffusers pipeline folder" in error("--model", str(tmp_path / "nope"))
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert "names neither a FLUX nor a Qwen-Image pipeline" in error("--model", str(tmp_path / "sd"))
    from tiny import tiny_model_paths
    (tmp_path / "p.txt").write_text("a cat\n")
    prompts = str(tmp_path / "p.txt")
    assert "--model needs --reward-path" in error("--model", tiny_model_paths()[0], "--prompts", prompts)
    assert "--prompts" in error("--prompts", str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert "no prompts" in error("--prompts", str(tmp_path / "empty.txt"))
    assert "--resolution 100: expected a multiple of 16 from 16 to 4096" in error("--resolution", "100")
    assert "--lora-rank -1: expected 0 (every weight trains) or a LoRA rank up to 3072" in error("--lora-rank", "-1")
    (tmp_path / "imgs").mkdir()
    from PIL import Image
    Image.new("RGB", (40, 40)).save(tmp_path / "imgs" / "a.png")
    assert "a.png has no caption file" in error("--image-dir", str(tmp_path / "imgs"))
    assert "HPS_v2.1_compressed.pt" in error("--reward-path", str(tmp_path / "hps.pt"))
    assert "--lr 1e+30: expected a positive learning rate below 1" in error("--lr", "1e30")
    train.main([*FAST, "--output-dir", str(tmp_path / "out"), "--steps", "1"])  # a checkpoint-1 there, then:
    assert "holds checkpoint-1: pass --resume" in error("--steps", "3")


def test_bad_input_prints_no_traceback():
    done = run_train("--resolution", "100")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "error: --resolution 100: expected a multiple of 16 from 16 to 4096 (FLUX packs " \
                                  "2x2 patches of the 8x downsampled latent; 4096 px is already 65,536 image tokens)"


# ---------------------------------------------------------------- LoRA

LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-3", "--steps", "2", *FAST]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    for strategy in ("fsdp", "ddp"):
        done = run_train(*LORA, "--strategy", strategy, "--output-dir", str(root / strategy), nproc=2)
        assert done.returncode == 0, (strategy, done.stderr[-12000:])
    return root


def test_lora_ddp_and_fsdp_train_the_same_adapters_and_nothing_else(lora_runs):
    from flux import initial_lora
    fsdp, ddp = (dcp_state(lora_runs / s / "checkpoint-2") for s in ("fsdp", "ddp"))
    assert set(fsdp["model"]) == set(ddp["model"]) and all(".lora_" in k for k in fsdp["model"])  # adapters only
    assert len(fsdp["optimizer"]["state"]) == len(fsdp["model"])  # AdamW holds the adapters, nothing else
    moved = 0
    for key, value in fsdp["model"].items():
        start = initial_lora(key, value.shape, 42)  # train.py's default --seed
        assert close_updates(value, ddp["model"][key], start), key
        # and start is where train.py started: AdamW moves a weight by at most about lr a step (|m/sqrt(v)| <= 1.0013
        # at its second step; decay 1e-4 adds 1e-7), where another start is off by about 1 / rank = 0.25 a weight
        assert (value - start).abs().max() <= 2 * 1e-3 * 1.01, key
        moved += bool((value - start).abs().max() > 0)
    assert moved >= len(fsdp["model"]) // 2  # the B matrices start at zero and moved


def test_lora_step_leaves_the_base_bit_identical(tiny_parts):
    from flux import add_lora
    new_transformer, vae, reward, cond = tiny_parts
    transformer = add_lora(new_transformer(), 4, 4.0, torch.float32, seed=0)
    base = {k: v.clone() for k, v in transformer.state_dict().items() if ".lora_" not in k}
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)  # decay would move the base if it trained
    noise = flux.latent_noise(32, torch.Generator().manual_seed(0), torch.device("cpu"))
    for step in range(2):  # B moves at step 1, then A gets a gradient too
        x0 = flux.rollout(transformer, noise, cond, 2, 3.0, 1.0)
        generator = torch.Generator().manual_seed(1)
        step_on(transformer, vae, reward, x0, noise, cond, step, generator)
        optimizer.step()
        optimizer.zero_grad()
    after = transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert all(".lora_" in n for n, p in transformer.named_parameters() if p.requires_grad)


def test_lora_file_loads_into_flux_pipeline_and_equals_a_hand_merge(lora_runs):
    from diffusers import FluxPipeline
    from safetensors.torch import load_file
    from tiny import tiny_model_paths
    path = lora_runs / "fsdp" / "checkpoint-2" / "pytorch_lora_weights.safetensors"
    render = lambda pipe: pipe("a red car", height=32, width=32, num_inference_steps=2, max_sequence_length=32,  # noqa
                               generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    base = FluxPipeline.from_pretrained(tiny_model_paths()[0])
    base_image = render(base)
    loaded = FluxPipeline.from_pretrained(tiny_model_paths()[0])
    loaded.load_lora_weights(str(path))
    # by hand: W + (alpha / rank) B @ A for every adapted layer, from the file alone
    merged = FluxPipeline.from_pretrained(tiny_model_paths()[0])
    lora = load_file(path)
    weights = merged.transformer.state_dict()
    layers = {k[len("transformer."):-len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight")}
    assert layers and all(f"{layer}.weight" in weights for layer in layers)
    with torch.no_grad():
        for layer in layers:
            a, b = lora[f"transformer.{layer}.lora_A.weight"], lora[f"transformer.{layer}.lora_B.weight"]
            weights[f"{layer}.weight"] += 8 / 4 * b @ a
    merged.transformer.load_state_dict(weights)
    lora_image, merged_image = render(loaded), render(merged)
    # the same model, two ways (x W^T + s (x A^T) B^T against x (W + s B A)^T): fp32 rounding only, measured 8e-7
    # of the pixels' size; 1e-4 of it. The LoRA's own effect (1e-2 here) must be 100x that difference; the 1e-6,
    # 1e-6 of the [0, 1] range, is there for a difference of exactly 0
    assert abs(lora_image - merged_image).max() < 1e-4 * abs(merged_image).max()
    assert abs(lora_image - base_image).max() > 100 * abs(lora_image - merged_image).max() + 1e-6


@pytest.mark.parametrize("base", [[], ["--quantize-base", "nf4", "--strategy", "ddp"]], ids=["bf16 base", "nf4 base"])
def test_lora_two_steps_resumed_for_two_more_equal_four_steps(tmp_path, base):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    flags = ["--lora-rank", "4", "--lr", "1e-3", *base, *FAST]
    for args in ([a, "--steps", "4"], [b, "--steps", "2"], [b, "--steps", "4", "--resume"]):
        train_here("--output-dir", *args, *flags)
    sa, sb = dcp_state(os.path.join(a, "checkpoint-4")), dcp_state(os.path.join(b, "checkpoint-4"))
    assert sa["model"].keys() == sb["model"].keys()
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key  # bit for bit
    for key, state in sa["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, sb["optimizer"]["state"][key][name]), (key, name)


# ---------------------------------------------------------------- LoRA on a 4-bit base (--quantize-base nf4)

def test_a_step_on_the_nf4_base_equals_a_step_on_its_dequantized_weights(tiny_parts):
    """The adapters learn through bitsandbytes' 4-bit layers exactly what they learn through plain linear layers
    holding the same, dequantized, weights; the packed base stays bit-identical."""
    import bitsandbytes as bnb
    from flux import add_lora, quantize_nf4
    new_transformer, vae, reward, cond = tiny_parts
    quantized, plain = quantize_nf4(new_transformer(), torch.device("cpu"), torch.float32), new_transformer()
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == sum(type(m) is torch.nn.Linear for m in plain.modules())  # every linear layer, as diffusers'
    with torch.no_grad():
        for name, m in plain.named_modules():
            if name in layers:
                w = layers[name].weight
                m.weight.copy_(bnb.functional.dequantize_4bit(w.data, w.quant_state))
    packed = {n: p.clone() for n, p in quantized.named_parameters() if not p.is_floating_point()}
    noise = flux.latent_noise(32, torch.Generator().manual_seed(0), torch.device("cpu"))
    x0 = flux.rollout(plain, noise, cond, 3, 3.0, 1.0)
    starts, ends = [], []
    for model in (quantized, plain):
        add_lora(model, 4, 4.0, torch.float32, seed=0)
        trainable = [p for p in model.parameters() if p.requires_grad]
        starts.append([p.detach().clone() for p in trainable])
        optimizer = torch.optim.AdamW(trainable, lr=1e-3)
        for step in range(2):  # B moves at the first step, then A gets a gradient too
            step_on(model, vae, reward, x0, noise, cond, step, torch.Generator().manual_seed(step))
            optimizer.step()
            optimizer.zero_grad()
        ends.append(trainable)
    assert len(ends[0]) == len(ends[1]) > 0
    # both models compute in fp32 with the same weights; the 4-bit layer dequantizes inside each matmul, so only the
    # order of fp32 rounding differs: close_updates' 1e-2 of the update holds (a gradient that missed the adapters,
    # or the quantization error of the weights themselves, moves them by far more)
    for a, b, start in zip(*ends, starts[1]):
        assert close_updates(a.detach(), b.detach(), start)
    assert sum(bool((b.detach() - s).abs().max() > 0) for b, s in zip(ends[1], starts[1])) == len(starts[1])
    assert all(torch.equal(p, packed[n]) for n, p in quantized.named_parameters() if n in packed)


def test_the_lora_trained_on_the_nf4_base_is_diffusers_file_and_loads_onto_the_unquantized_base(tmp_path, lora_runs):
    from diffusers import FluxPipeline
    from safetensors.torch import load_file
    from tiny import tiny_model_paths
    train_here(*LORA, "--quantize-base", "nf4", "--strategy", "ddp", "--output-dir", tmp_path)
    path = tmp_path / "checkpoint-2" / "pytorch_lora_weights.safetensors"
    lora, usual = load_file(path), load_file(lora_runs / "ddp" / "checkpoint-2" / "pytorch_lora_weights.safetensors")
    assert {k: v.shape for k, v in lora.items()} == {k: v.shape for k, v in usual.items()}  # the same layers, sizes
    trained = dcp_state(tmp_path / "checkpoint-2")["model"]  # what the adapters hold after training
    assert len(trained) == len(lora) and all(
        torch.equal(lora[f"transformer.{k.replace('.default', '')}"], v) for k, v in trained.items())
    pipe = FluxPipeline.from_pretrained(tiny_model_paths()[0])
    pipe.load_lora_weights(str(path))
    loaded = {n: p for n, p in pipe.transformer.named_parameters() if ".lora_" in n}
    assert len(loaded) == len(lora) and all(torch.equal(loaded[k.replace(".weight", ".default_0.weight")
                                                               .removeprefix("transformer.")], v)
                                            for k, v in lora.items())
