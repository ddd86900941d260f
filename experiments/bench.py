"""What Direct-Align saves, measured here, and what FLUX.1-dev needs per GPU, planned (arXiv 2509.06942).

    python -m experiments.bench --quick                  # tiny model, one repeat: under 2 minutes on a 2-core CPU
    python -m experiments.bench --json bench.json        # a small FLUX-shaped model, 3 repeats: about a minute on 2 cores
    python -m experiments.bench --device cuda --resolution 720 --layers 2 --single-layers 4 --heads 24 --head-dim 128 \
        --vae-width 128 --text-len 512       # a GPU: CUDA events and torch.cuda.max_memory_allocated
Four sections, one markdown table each:
1. one training step of Direct-Align (one branch, both), ReFL and DRaFT-K on the same FLUX-architecture model
   with random weights, each method in its own process: time and peak memory, as ratios to Direct-Align;
2. the reward's gradient through Direct-Align and through the one-step prediction x0 = x - sigma v, sigma 0.99..0.1;
3. train.py's own step against the sum of the parts it cannot avoid, each timed alone (goal: at most 1.15x);
4. FLUX.1-dev's memory per rank for 1, 8, 16, 32 GPUs under FSDP and DDP, with and without checkpointing.
Times are this machine's and vary; the ratios and the memory plan are the point.
"""
import argparse
import json
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from concurrent.futures import ProcessPoolExecutor

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

import train
from srpo import BRANCHES, srpo_step
from direct_align import (default_gap, direct_align, euler_step, inject_noise, predict_x0, sigma_schedule,
                          train_window)
from experiments import plots
from flux import add_lora, autocast, conditioning, decode, encode_prompts, latent_noise, rollout, velocity
from inputs import fail
from srpo_reward import SRPReward, control_prompts, load_reward, srpo_loss

# The models of the memory plan (section 4), as their config.json files on the hub give them.
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))  # black-forest-labs/FLUX.1-dev, transformer/
FLUX_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
                shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)  # vae/
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K, HPSv2.1's and PickScore's architecture (open_clip's ViT-H-14: embed 1024;
# vision 32 x 1280, head width 80, patch 14, 224 px; text 24 x 1024, 16 heads, 77 tokens; GELU, not QuickGELU)
VIT_H_14 = dict(
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     vocab_size=49408, max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       patch_size=14, image_size=224, hidden_act="gelu"),
    projection_dim=1024)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # FLUX.1-dev, text_encoder_2/
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77)  # FLUX.1-dev, text_encoder/
PLAN_RESOLUTION = 720       # the release's training size (METHOD.md §5): 512 text + (720 / 16)^2 = 2025 image tokens
PLAN_TEXT_TOKENS = 512
PLAN_PROMPTS = 21           # train.py keeps steps + 1 cached embeddings on the GPU; the release's 20 steps
WORLD_SIZES = (1, 8, 16, 32)
LORA_RANK = 64              # the plan's LoRA: README's one-GPU command (Flow-GRPO's FLUX LoRA uses 64 too)
LORA_WORLD_SIZES = (1, 8)
LORA_BENCH_RANK = 16        # section 1's LoRA on the small bench model (width 128)
GPU_BYTES = 80 * 2**30      # an 80 GB card (H100, A100 80GB) ...
USABLE = 0.9                # ... of which 10% go to the CUDA context, NCCL buffers and allocator fragmentation
CAPTION = "a cat sitting on a chair"
STABILITY_SAMPLES = 4       # noises (and rollouts) averaged at each sigma of section 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    a("--quick", action="store_true", help="tiny model, one repeat (explicit flags still win)")
    a("--repeats", type=int, default=3, help="timed steps per method after one warm-up; the median is reported")
    # OpenMP threads stall whenever another job takes one of their cores: steps of a tiny model then take 50x longer
    a("--threads", type=int, default=1, help="CPU threads of every process; more only on an otherwise idle machine")
    # the FLUX-architecture model of sections 1-3: FLUX.1-dev's blocks, random weights, sizes to fit the machine
    a("--resolution", type=int, default=128, help="square image size, a multiple of 16 (FLUX.1-dev: 720)")
    a("--layers", type=int, default=2, help="double-stream blocks (FLUX.1-dev: 19)")
    a("--single-layers", type=int, default=4, help="single-stream blocks (FLUX.1-dev: 38)")
    a("--heads", type=int, default=4, help="attention heads (FLUX.1-dev: 24)")
    a("--head-dim", type=int, default=32, help="even, at least 8 (FLUX.1-dev: 128)")
    a("--vae-width", type=int, default=16, help="VAE channels, x1 x2 x4 x4 by block (FLUX.1-dev: 128)")
    a("--text-len", type=int, default=128, help="T5 tokens (FLUX.1-dev: 512)")
    # the methods
    a("--rollout-steps", type=int, default=25, help="sampler steps of every method (the release: 25)")
    a("--draft-k", type=int, nargs="+", default=[1, 5, 25], help="DRaFT-K: gradient through the last K steps")
    a("--gradient-checkpointing", action=argparse.BooleanOptionalAction, help="default: on with CUDA, as train.py")
    a("--sigmas", type=float, nargs="+", default=[0.99, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    # output
    a("--json", help="write every number to this file as well")
    a("--plot", default="out/bench_stability.png", help="section 2 as a PNG")
    args = p.parse_args(argv)
    if args.quick:  # parse again so that flags given explicitly override these
        p.set_defaults(repeats=1, resolution=64, layers=1, single_layers=1, heads=2, head_dim=16, vae_width=8,
                       text_len=32)
        args = p.parse_args(argv)
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = args.device == "cuda"
    return args


def check_args(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is visible")
    if args.device == "cpu" and not os.path.isfile("/proc/self/status"):
        fail("--device cpu: peak memory is read from Linux's /proc/self/status; run on Linux or with CUDA")
    if args.resolution % 16:
        fail(f"--resolution {args.resolution}: must be a multiple of 16 (8x VAE, then 2x2 patches)")
    if args.head_dim % 2 or args.head_dim < 8:
        fail(f"--head-dim {args.head_dim}: must be even and at least 8 (rotary axes of even sizes)")
    if args.vae_width % min(32, args.vae_width) or 32 % min(32, args.vae_width):
        fail(f"--vae-width {args.vae_width}: must divide 32 or be a multiple of it (32 GroupNorm groups)")
    if args.repeats < 1 or args.threads < 1:
        fail(f"--repeats {args.repeats} --threads {args.threads}: each must be at least 1")
    if not all(1 <= k <= args.rollout_steps for k in args.draft_k):
        fail(f"--draft-k {args.draft_k}: each K must be between 1 and --rollout-steps {args.rollout_steps}")
    if not all(branch_gap() < s < 1 for s in args.sigmas):
        fail(f"--sigmas {args.sigmas}: each must lie in ({branch_gap():.3f}, 1), the branch gap below 1")


def branch_gap():
    """The release's Direct-Align step in sigma: gap 100 of L = 1000 on the window g[5]..g[25] (METHOD.md §3), ~0.021."""
    window = train_window()
    return float(window[0] - window[default_gap(length=len(window))])


def rope_axes(head_dim):
    """FLUX's rotary split (16, 56, 56) of 128 scaled to head_dim, each axis even, summing to head_dim."""
    t = max(2, head_dim // 16 * 2)
    h = (head_dim - t) // 4 * 2
    return (t, h, head_dim - t - h)


# ----------------------------------------------------------------------------------------- models

def write_models(args, root):
    """A FluxPipeline folder with the bench's transformer and VAE (random weights, FLUX.1-dev's blocks) and tiny.py's
    text encoders, and tiny.py's CLIP as the reward: every process and train.py load the same files. The text
    widths are the tiny encoders' (32); embeddings are cached in training, so only their length matters."""
    from tiny import tiny_model_paths
    tiny_flux, tiny_clip = tiny_model_paths()
    flux = os.path.join(root, "flux")
    shutil.copytree(tiny_flux, flux)
    w = args.vae_width
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        FluxTransformer2DModel(**dict(
            FLUX_DEV, num_layers=args.layers, num_single_layers=args.single_layers, num_attention_heads=args.heads,
            attention_head_dim=args.head_dim, axes_dims_rope=rope_axes(args.head_dim), joint_attention_dim=32,
            pooled_projection_dim=32)).save_pretrained(os.path.join(flux, "transformer"))
        AutoencoderKL(**dict(FLUX_VAE, block_out_channels=(w, 2 * w, 4 * w, 4 * w), norm_num_groups=min(32, w))) \
            .save_pretrained(os.path.join(flux, "vae"))
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as train.py caches them
    encode_prompts(flux, [CAPTION], args.text_len, os.path.join(root, "text_cache"), device, dtype)
    return types.SimpleNamespace(root=root, flux=flux, clip=tiny_clip)


def load(args, dirs, lora_rank=0):
    """The models as train.py loads them (fp32 transformer in train mode, or LoRA adapters of lora_rank on a frozen
    base, bf16 on a GPU; frozen VAE and reward), train.py's options (the HPS recipe), AdamW with the release's
    settings over what trains, and the caption's conditioning."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # as train.py: cuDNN attention's backward failed at this size
    targs = train.parse_args(["--resolution", str(args.resolution), "--rollout-steps", str(args.rollout_steps),
                              "--max-sequence-length", str(args.text_len)])
    base_dtype = torch.bfloat16 if lora_rank and device.type == "cuda" else torch.float32
    transformer = FluxTransformer2DModel.from_pretrained(dirs.flux, subfolder="transformer", dtype=base_dtype)
    if lora_rank:
        add_lora(transformer, lora_rank, lora_rank, base_dtype, seed=0)
    transformer = transformer.to(device).train()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    vae = AutoencoderKL.from_pretrained(dirs.flux, subfolder="vae").to(device).eval().requires_grad_(False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    embeds = encode_prompts(dirs.flux, [CAPTION], args.text_len, os.path.join(dirs.root, "text_cache"),
                                  device, dtype)
    optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=targs.lr,
                                  betas=tuple(targs.betas), weight_decay=targs.weight_decay, eps=targs.adam_eps,
                                  foreach=True)  # as train.py
    return types.SimpleNamespace(
        transformer=transformer, vae=vae, reward=load_reward("hps", dirs.clip, device=device), optimizer=optimizer,
        cond=conditioning(embeds(CAPTION), args.resolution, device), targs=targs, device=device,
        res=args.resolution)


def reward(m, x0_hat, step):
    """The SRP reward of decoded latents (METHOD.md §4), computed as srpo_step computes its denoise branch's."""
    pos, neg = control_prompts(CAPTION, step)
    with autocast(m.device):
        return m.reward.srp(decode(m.vae, x0_hat, m.res), [pos], [neg], m.targs.k_denoise[0]).float()


def sample(m, x, sigmas):
    """Euler steps of the current model along sigmas (METHOD.md §1); with gradient unless the caller turned it off."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = euler_step(x, velocity(m.transformer, x, sigma, m.cond, m.targs.rollout_guidance), sigma, sigma_next)
    return x


# ----------------------------------------------------------------------------------------- 1. cost of a step

def train_step(m, method, k, step):
    """One training step of method from its own noise, ending with clip + AdamW as train.py does.
    direct_align(_both): train.py's rollout and srpo_step (one branch, or both);
    refl: no-grad sampling to a random step of the last quarter (ImageReward's 30..39 of 40), one step with
          gradient, the one-step prediction x0 = x - sigma v;
    draft: no-grad sampling for N - K steps, the last K with gradient (DRaFT-K)."""
    noise = latent_noise(m.res, train.rng(0, "noise", step), m.device)
    n = m.targs.rollout_steps
    if method.startswith("direct_align"):
        x0 = rollout(m.transformer, noise, m.cond, n, m.targs.shift, m.targs.rollout_guidance)
        branches = BRANCHES if method.startswith("direct_align_both") else ("denoise",)
        srpo_step(lambda x, s: velocity(m.transformer, x, s, m.cond, m.targs.guidance),
                  lambda x: decode(m.vae, x, m.res), m.reward, x0, noise, CAPTION, step, train.rng(0, "t", step),
                  **dict(train.step_settings(m.targs), branches=branches), autocast=lambda: autocast(m.device))
    else:
        sigmas = sigma_schedule(n, m.targs.shift)
        start = int(torch.randint(n * 3 // 4, n, (1,), generator=train.rng(0, "refl", step))) \
            if method == "refl" else n - k
        with torch.no_grad():
            x = sample(m, noise, sigmas[:start + 1])
        if method == "refl":
            v = velocity(m.transformer, x, sigmas[start], m.cond, m.targs.guidance)
            x0_hat = predict_x0(x, v, sigmas[start])
        else:
            x0_hat = sample(m, x, sigmas[start:])
        srpo_loss(reward(m, x0_hat, step), m.targs.threshold).mean().backward()
    torch.nn.utils.clip_grad_norm_([p for p in m.transformer.parameters() if p.requires_grad], m.targs.max_grad_norm)
    m.optimizer.step()
    m.optimizer.zero_grad(set_to_none=True)


def timed(fn, device):
    """Seconds fn() takes: CUDA events on a GPU, so queued kernels count; the wall clock on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def proc_mb(field):
    """VmRSS (resident now) or VmHWM (its peak) of this process, MiB, as Linux reports them."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024


def reset_peak(device):
    """Start a new peak and return the memory held now, MiB: allocated tensors on a GPU, the resident set on a CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: VmHWM starts again from VmRSS
    return proc_mb("VmRSS")


def peak_mb(device):
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else proc_mb("VmHWM")


def measure(args, dirs, method, k):
    """Runs in a fresh process: load, one warm-up step (lazy inits), then args.repeats timed steps.
    peak_mem_mb: the process's peak over all steps; step_mem_mb: that peak above what it held before them (the
    first step's grads, AdamW states, activations: a CPU allocator keeps freed memory, so later steps show less)."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    lora_rank = LORA_BENCH_RANK if method.endswith("_lora") else 0
    m = load(args, dirs, lora_rank)
    held = reset_peak(m.device)
    train_step(m, method, k, 0)
    times = [timed(lambda: train_step(m, method, k, step), m.device) for step in range(1, args.repeats + 1)]
    peak = peak_mb(m.device)
    return dict(method=method, k=k, lora_rank=lora_rank, time_s=statistics.median(times), times_s=times,
                peak_mem_mb=peak, step_mem_mb=peak - held)


def step_costs(args, dirs):
    """Section 1, a row per method as each is done: every method in its own process. The processes fork from a
    server that imported torch and diffusers once, which saves some 6 s of imports a method, and each still has its
    own peak memory. Ratios are to the first row, Direct-Align with one branch."""
    methods = [("direct_align", 1), ("direct_align_both", 2), ("direct_align_both_lora", 2),
               ("refl", 1)] + [("draft", k) for k in args.draft_k]
    # a CUDA context does not survive a fork: spawn there, a forkserver with the imports done on a CPU
    context = multiprocessing.get_context("spawn" if args.device == "cuda" else "forkserver")
    if args.device != "cuda":
        context.set_forkserver_preload(["__main__", "train"])
    with ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1) as pool:
        base = None
        for method, k in methods:
            row = pool.submit(measure, args, dirs, method, k).result()
            base = base or row
            yield dict(row, time_ratio=row["time_s"] / base["time_s"],
                       mem_ratio=row["step_mem_mb"] / base["step_mem_mb"])


# ----------------------------------------------------------------------------------------- 2. gradient stability

def stability(args, m, samples=STABILITY_SAMPLES):
    """Section 2, a row per sigma as each is done: at each sigma, on the same noises and rollouts (samples of them),
    one velocity v = v_theta(x_sigma), then the reward gradient through the one-step prediction
    x0_hat = x_sigma - sigma v and through Direct-Align to sigma - delta (delta: the release's branch gap). By the
    chain rule d x0_hat / d v is -sigma for the first and -delta / (1 - sigma + delta) for the second
    (METHOD.md §2): their ratio is the predicted column."""
    delta = branch_gap()
    params = [p for p in m.transformer.parameters() if p.requires_grad]
    pairs = []
    for i in range(samples):
        noise = latent_noise(m.res, train.rng(0, "stability", i), m.device)
        pairs.append((noise, rollout(m.transformer, noise, m.cond, m.targs.rollout_steps, m.targs.shift,
                                     m.targs.rollout_guidance)))
    for sigma in args.sigmas:
        sums = {}
        for noise, x0 in pairs:
            x = inject_noise(x0, noise, sigma)
            v = velocity(m.transformer, x, sigma, m.cond, m.targs.guidance)
            for name, x0_hat in (("one_step", predict_x0(x, v, sigma)),
                                 ("direct_align", direct_align(lambda *_: v, x0, noise, sigma, sigma - delta))):
                grad_v, *grad_w = torch.autograd.grad(reward(m, x0_hat, 0).sum(), [v, *params], retain_graph=True,
                                                      allow_unused=True)
                for key, value in ((f"grad_v_{name}", grad_v.norm()),
                                   (f"grad_w_{name}", torch.stack([g.norm() for g in grad_w if g is not None]).norm()),
                                   (f"x0_error_{name}", (x0_hat - x0).norm() / x0.norm())):
                    sums[key] = sums.get(key, 0.0) + value.item() / samples
        sigma_to = sigma - delta
        yield dict(sigma=sigma, sigma_to=sigma_to, **sums, ratio=sums["grad_v_one_step"] / sums["grad_v_direct_align"],
                   predicted_ratio=sigma * (1 - sigma_to) / delta)


def plot(rows, path):
    """Section 2 as one PNG: the gradient and the x0 error against sigma, one-step prediction and Direct-Align."""
    sigmas = [r["sigma"] for r in rows]
    plots.save(path, *[plots.line_plot(sigmas, {"one-step x - sigma v": [r[f"{key}_one_step"] for r in rows],
                                                "Direct-Align": [r[f"{key}_direct_align"] for r in rows]},
                                       "sigma (1 = pure noise)", label, log_y=True)
                       for key, label in (("grad_v", "|d reward / d v|"), ("x0_error", "|x0_hat - x0| / |x0|"))])
    print(f"plot: {path}")


# ----------------------------------------------------------------------------------------- 3. train.py's overhead

def overhead(args, dirs, m):
    """Section 3: the median step_time_s of real train.py runs (FSDP, its default, and DDP, each on one rank, both
    branches) on the same model files, against the parts a step cannot avoid, each timed alone on the bare modules."""
    prompts = os.path.join(dirs.root, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("\n".join(train.TINY_PROMPTS) + "\n")
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}))
    train_step_s = {}
    for strategy in ("fsdp", "ddp"):
        out = os.path.join(dirs.root, f"train-{strategy}")
        command = [sys.executable, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py"),
                   "--model", dirs.flux, "--reward-path", dirs.clip, "--prompts", prompts, "--output-dir", out,
                   "--strategy", strategy, "--steps", str(args.repeats + 1), "--resolution", str(args.resolution),
                   "--max-sequence-length", str(args.text_len), "--rollout-steps", str(args.rollout_steps),
                   "--sample-every", "0", "--checkpoint-every", "0", "--batch-size", "1",
                   "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            fail(f"train.py --strategy {strategy} failed: {done.stderr.strip().splitlines()[-1]}")
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        train_step_s[strategy] = statistics.median(r["step_time_s"] for r in rows[1:])  # the first step warms up

    n, d = m.targs.rollout_steps, m.device
    x = latent_noise(m.res, train.rng(0, "parts"), d)
    t = torch.full((1,), 0.5, device=d)
    latents = torch.randn(1, 16, m.res // 8, m.res // 8, device=d, requires_grad=True)
    image = torch.rand(1, 3, m.res, m.res, device=d, requires_grad=True)
    pos, neg = control_prompts(CAPTION, 0)

    def forward():
        return m.transformer(hidden_states=x, timestep=t, guidance=torch.full_like(t, 3.5), return_dict=False,
                             **m.cond)[0]

    def backward_twice(fn):  # train.py's two branches
        for _ in range(2):
            with autocast(d):
                loss = fn().float().mean()
            loss.backward()

    def rollout_forwards():
        with torch.no_grad(), autocast(d):
            for _ in range(n):
                forward()

    def optimizer_step():
        torch.nn.utils.clip_grad_norm_(m.transformer.parameters(), m.targs.max_grad_norm)
        m.optimizer.step()

    parts = {f"rollout: {n} transformer forwards, no grad": rollout_forwards,
             "transformer forward + backward, x2": lambda: backward_twice(forward),
             "VAE decode forward + backward, x2":
                 lambda: backward_twice(lambda: m.vae.decode(latents, return_dict=False)[0]),
             "reward forward + backward, x2": lambda: backward_twice(lambda: m.reward.srp(image, [pos], [neg], 0.1)),
             "grad clip + AdamW step": optimizer_step}
    part_s = {}
    for name, fn in parts.items():
        fn()  # warm-up
        part_s[name] = statistics.median(timed(fn, d) for _ in range(args.repeats))
    m.optimizer.zero_grad(set_to_none=True)
    total = sum(part_s.values())
    return dict(train_step_s=train_step_s, parts_s=part_s, parts_sum_s=total, ratio=train_step_s["fsdp"] / total,
                ratio_ddp=train_step_s["ddp"] / total, goal=1.15)


# ----------------------------------------------------------------------------------------- 4. FLUX.1-dev memory plan

def count_params(build):
    """Exact parameter count of build(), constructed on the meta device: shapes only, no memory, no weights."""
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def empty_model(build):
    """build() on the CPU with zero weights, quickly (meta, then to_empty): for counting saved activations."""
    with torch.device("meta"):
        model = build()
    model.to_empty(device="cpu")
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data.zero_()
    return model


# CUDA's autocast op lists (PyTorch's "Autocast Op Reference"), by the names torch's Python functions carry: the ops
# that run in bf16 under bf16 autocast, and those that run in fp32. Every other op takes its inputs' dtypes.
AUTOCAST_BF16 = {"__matmul__", "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "chain_matmul", "multi_dot",
                 "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear",
                 "matmul", "mm", "mv", "prelu", "einsum", "scaled_dot_product_attention"}
AUTOCAST_FP32 = {"__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "cosh", "cosine_similarity",
                 "cumprod", "cumsum", "dist", "erfinv", "exp", "expm1", "group_norm", "layer_norm", "log",
                 "log_softmax", "log10", "log1p", "log2", "mse_loss", "norm", "normalize", "pow", "prod", "reciprocal",
                 "rsqrt", "sinh", "softmax", "softmin", "softplus", "sum", "renorm", "tan", "logsumexp", "cdist"}


class CudaAutocast(TorchFunctionMode):
    """CUDA's bf16 autocast, applied on any device above autograd: each listed op's floating inputs are cast as
    CUDA's autocast casts them; an fp32 leaf that requires grad (a weight that trains) is cast to bf16 once per
    context, as autocast caches those casts. On a CPU this gives the dtypes, and so the bytes, that autograd saves
    on a GPU (CPU's own autocast keeps norms in bf16). copies: the storages of the weights' casts (the plan counts
    them apart from the activations)."""

    def __init__(self):
        super().__init__()
        self.cache, self.copies = {}, set()

    def cast(self, t, dtype):
        if not (torch.is_tensor(t) and t.dtype in (torch.float32, torch.bfloat16) and t.dtype != dtype):
            return t
        cached = dtype == torch.bfloat16 and t.requires_grad and t.is_leaf
        copy = self.cache.get(id(t)) if cached else None
        if copy is None:
            copy = t.to(dtype)
            if cached:
                self.cache[id(t)] = copy
        if isinstance(t, torch.nn.Parameter):
            self.copies.add(copy.untyped_storage().data_ptr())
        return copy

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        dtype = torch.bfloat16 if name in AUTOCAST_BF16 else torch.float32 if name in AUTOCAST_FP32 else None
        if dtype is not None:
            args, kwargs = tree_map(lambda t: self.cast(t, dtype), (args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def saved_bytes(fn, model, blocks=()):
    """Bytes autograd saves for backward while fn() runs under CudaAutocast, each storage once, the model's
    weights and their bf16 casts excluded, attributed to the (name, module) of blocks that was running when the
    tensor was saved, else to 'other'. Also each block's input bytes (what checkpointing keeps of it), as
    input_<name>."""
    weights, autocast = {p.untyped_storage().data_ptr() for p in model.parameters()}, CudaAutocast()
    seen, out, running = set(), {"other": 0}, ["other"]

    def enter(block, args, kwargs, name):
        running.append(name)
        inputs = [t for t in [*args, *kwargs.values()] if torch.is_tensor(t)]
        out[f"input_{name}"] = sum(t.untyped_storage().nbytes() for t in inputs)

    hooks = [h for name, block in blocks for h in (
        block.register_forward_pre_hook(lambda block, args, kwargs, name=name: enter(block, args, kwargs, name),
                                        with_kwargs=True),
        block.register_forward_hook(lambda *_: running.pop() and None))]

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in weights and ptr not in autocast.copies and ptr not in seen:
            seen.add(ptr)
            out[running[-1]] = out.get(running[-1], 0) + tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        fn()
    for h in hooks:
        h.remove()
    return out


def extrapolate(fn, xs, x):
    """fn(x) from the two measurements fn(xs[0]), fn(xs[1]), for quantities linear in x (saved tensors' sizes)."""
    (x0, y0), (x1, y1) = [(xi, fn(xi)) for xi in xs]
    return {key: y0[key] + (y1[key] - y0[key]) * (x - x0) / (x1 - x0) for key in y0}


def activation_estimate():
    """Bytes of saved activations of one branch's backward at 720x720 (an estimate, not a GPU measurement).
    Each part's saved tensors (saved_bytes) are measured on the CPU under CUDA's autocast policy (CudaAutocast:
    bf16 matmuls, fp32 norms, as on a GPU) on a smaller model and extrapolated linearly:
      transformer: one double and one single block at FLUX's 512 + 2025 tokens and 24 heads, head_dim 8 and 16,
        extrapolated to 128 (every saved tensor is tokens x width or tokens x heads: flash-style attention
        keeps no tokens x tokens matrix);
      VAE decode: FLUX.1-dev's VAE at 32 and 64 pixels, extrapolated to 720^2 pixels (convolutions: per pixel);
        checkpointed (diffusers checkpoints the mid block and each up block), the blocks' inputs and the largest
        block's internals, recomputed one block at a time;
      reward: ViT-H-14's 32 layers and 16 heads at head_dim 4 and 8, extrapolated to 80 (width 1280), on a
        720x720 image through the reward's own preprocessing; plus the bf16 copy of each of the frozen vision
        tower's fp32 weights, which autocast makes and the backward keeps (the gradient flows to the image
        through them; frozen weights are cast at each use). On one H200 this term measured 1.54 GiB.
    Without checkpointing the transformer keeps every block's internals; with it (diffusers checkpoints each
    block) only each block's inputs, (512 + 2025) x 3072 bf16 values, and recomputes one block's internals at a
    time in its backward (transformer_recompute)."""
    tokens_txt, tokens_img = PLAN_TEXT_TOKENS, (PLAN_RESOLUTION // 16) ** 2
    cond = conditioning({"encoder_hidden_states": torch.randn(1, tokens_txt, FLUX_DEV["joint_attention_dim"]),
                               "pooled_projections": torch.randn(1, FLUX_DEV["pooled_projection_dim"])},
                              PLAN_RESOLUTION, torch.device("cpu"))

    def flux(head_dim):
        model = empty_model(lambda: FluxTransformer2DModel(**dict(FLUX_DEV, num_layers=1, num_single_layers=1,
                                                                   attention_head_dim=head_dim,
                                                                   axes_dims_rope=rope_axes(head_dim))))
        x = latent_noise(PLAN_RESOLUTION, torch.Generator().manual_seed(0), torch.device("cpu"))
        return saved_bytes(lambda: velocity(model, x, 0.5, cond, 3.5), model,
                           [("double", model.transformer_blocks[0]), ("single", model.single_transformer_blocks[0])])

    def vae(resolution):
        model = empty_model(lambda: AutoencoderKL(**FLUX_VAE))
        x = torch.zeros(1, (resolution // 16) ** 2, 64, requires_grad=True)
        blocks = [("mid", model.decoder.mid_block), *((f"up{i}", b) for i, b in enumerate(model.decoder.up_blocks))]
        return saved_bytes(lambda: decode(model, x, resolution), model, blocks)

    def clip(head_dim):
        vision = dict(VIT_H_14["vision_config"], hidden_size=16 * head_dim, intermediate_size=64 * head_dim)
        model = empty_model(lambda: CLIPModel(CLIPConfig(**dict(VIT_H_14, vision_config=vision))))
        image = torch.zeros(1, 3, PLAN_RESOLUTION, PLAN_RESOLUTION, requires_grad=True)
        return saved_bytes(lambda: SRPReward(model, None, "hps").embed_images(image), model)

    per_block = extrapolate(flux, (8, 16), FLUX_DEV["attention_head_dim"])
    per_block = {k: per_block[k] for k in ("double", "single", "other")}
    decoder = extrapolate(lambda pixels: vae(math.isqrt(pixels)), (32**2, 64**2), PLAN_RESOLUTION**2)
    internals = [v for k, v in decoder.items() if k != "other" and not k.startswith("input_")]
    blocks = FLUX_DEV["num_layers"] + FLUX_DEV["num_single_layers"]
    width = FLUX_DEV["num_attention_heads"] * FLUX_DEV["attention_head_dim"]
    return dict(
        per_block=per_block,
        transformer=FLUX_DEV["num_layers"] * per_block["double"] + FLUX_DEV["num_single_layers"] * per_block["single"]
        + per_block["other"],
        transformer_checkpointed=blocks * (tokens_txt + tokens_img) * width * 2 + per_block["other"],
        transformer_recompute=max(per_block["double"], per_block["single"]),
        vae_decode=decoder["other"] + sum(internals),
        vae_decode_checkpointed=decoder["other"] + sum(v for k, v in decoder.items() if k.startswith("input_"))
        + max(internals),
        reward=extrapolate(clip, (4, 8), VIT_H_14["vision_config"]["hidden_size"] // 16)["other"] + 2 * vision_params())


def vision_params():
    """ViT-H-14's image tower and projection, counted on the meta device."""
    with torch.device("meta"):
        model = CLIPModel(CLIPConfig(**VIT_H_14))
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(("vision_model", "visual_projection")))


def rank_memory(num_params, world_size, strategy, block_params, frozen_bytes, activations, lora_params=0):
    """Bytes per rank: train.memory_plan's weights, grads and AdamW states (the numbers train.py prints at start;
    with lora_params, a bf16 base and fp32 adapters), plus the larger of what the two phases of a step add on top
    (METHOD.md §5):
      training: compute copies (FSDP all-gathers bf16 weights block by block, two blocks at once (prefetch) and
        the root module's for the whole step, and holds one block's unsharded grads in bf16 and, for the
        reduce-scatter, in fp32; DDP's autocast makes a bf16 copy of every weight in the forward, which the
        backward keeps without checkpointing, and with it recasts only the block it recomputes and the root's;
        gradient_as_bucket_view spares a second copy of the grads) and activations, one branch at a time: the
        transformer's kept tensors, plus the larger of the copies at its forward's end and, in the backward, the
        copies still held and the largest of the reward's, the VAE decode's and one recomputed block's peaks (the
        backward frees each part's saved tensors before it runs the next part's);
      rollout: no activations, but every block's bf16 weights stay gathered for its 25 steps (train.rollout);
      frozen, both phases: the fp32 VAE and reward model and the cached text embeddings (no text encoder).
    A LoRA's base is already bf16: DDP makes no copies of it, FSDP still gathers it block by block."""
    lora = dict(trainable=lora_params, frozen_bytes=2) if lora_params else {}
    row = dict(world_size=world_size, strategy=strategy, lora_params=lora_params,
               **train.memory_plan(num_params, world_size, strategy, **lora))
    row["train_memory_plan_total"] = row.pop("total")
    largest, root = max(block_params), num_params - sum(block_params)
    if strategy == "fsdp":
        row["compute_copies"] = 2 * (2 * largest + root) + (2 + 4) * largest
    else:
        row["compute_copies"] = 2 * (lora_params or num_params)
    row["rollout_copies"] = 0 if lora_params and strategy == "ddp" else 2 * num_params
    row["frozen"] = frozen_bytes
    for suffix in ("", "_checkpointed"):
        backward_copies = 2 * (largest + root) if suffix and strategy == "ddp" and not lora_params \
            else row["compute_copies"]
        kept = activations[f"transformer{suffix}"]
        parts = max(activations[f"vae_decode{suffix}"], activations["reward"],
                    activations["transformer_recompute"] if suffix else 0)
        row[f"activations{suffix}"] = kept + parts
        row[f"training{suffix}"] = kept + max(row["compute_copies"], backward_copies + parts)
        row[f"total{suffix}"] = row["train_memory_plan_total"] + frozen_bytes \
            + max(row[f"training{suffix}"], row["rollout_copies"])
        row[f"fits_80gb{suffix}"] = row[f"total{suffix}"] <= USABLE * GPU_BYTES
    return row


def flux_dev_plan():
    """Section 4: FLUX.1-dev's exact parameter count from its config on the meta device, and every rank's bytes."""
    with torch.device("meta"):
        flux = FluxTransformer2DModel(**FLUX_DEV)
    params = sum(p.numel() for p in flux.parameters())
    block_params = [sum(p.numel() for p in b.parameters())
                    for b in [*flux.transformer_blocks, *flux.single_transformer_blocks]]
    vae = count_params(lambda: AutoencoderKL(**FLUX_VAE))
    reward_params = count_params(lambda: CLIPModel(CLIPConfig(**VIT_H_14)))
    text_params = count_params(lambda: T5EncoderModel(T5Config(**T5_XXL))) \
        + count_params(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)))
    embeddings = PLAN_PROMPTS * (PLAN_TEXT_TOKENS * FLUX_DEV["joint_attention_dim"]
                                 + FLUX_DEV["pooled_projection_dim"]) * 2
    frozen = 4 * (vae + reward_params) + embeddings
    activations = activation_estimate()
    plans = [rank_memory(params, w, s, block_params, frozen, activations)
             for w in WORLD_SIZES for s in ("fsdp", "ddp")]
    with torch.device("meta"):  # the adapters of --lora-rank 64 on FLUX.1-dev, exactly
        lora_params = sum(p.numel() for p in add_lora(flux, LORA_RANK, LORA_RANK, torch.bfloat16, 0).parameters()
                          if p.requires_grad)
    plans += [rank_memory(params, w, s, block_params, frozen, activations, lora_params)
              for w in LORA_WORLD_SIZES for s in ("fsdp", "ddp")]
    return dict(params=params, lora_rank=LORA_RANK, lora_params=lora_params, vae_params=vae,
                reward_params=reward_params, text_encoder_params=text_params,
                text_encoders_bf16_while_caching=2 * text_params, text_embeddings=embeddings,
                resolution=PLAN_RESOLUTION, activations=activations, gpu_bytes=GPU_BYTES, usable=USABLE, plans=plans)


# ----------------------------------------------------------------------------------------- output

def table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print()


def machine(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads, load average "
            f"{os.getloadavg()[0]:.1f} at start, torch {torch.__version__}")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the processes started below: methods, train.py
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    gib = lambda b: f"{b / 2**30:.1f}"  # noqa: E731
    started, host = time.time(), machine(device)
    root = tempfile.mkdtemp(prefix="srpo-bench-")
    try:
        dirs = write_models(args, root)
        print(f"machine: {host}\nmodel: FLUX architecture, random weights, {args.layers} double + "
              f"{args.single_layers} single blocks of {args.heads}x{args.head_dim}, VAE width {args.vae_width}, "
              f"{args.resolution}px, {args.text_len} text tokens, {args.rollout_steps} sampler steps, gradient "
              f"checkpointing {'on' if args.gradient_checkpointing else 'off'}; median of {args.repeats}\n")

        print("## 1. One training step (rollout, the steps with gradient, VAE decode, reward, AdamW)\n")
        steps = list(step_costs(args, dirs))
        names = dict(direct_align="Direct-Align, 1 branch", direct_align_both="Direct-Align, both branches",
                     direct_align_both_lora="Direct-Align, both branches, LoRA rank {lora_rank}", refl="ReFL",
                     draft="DRaFT-{k}")
        table(["method", "steps with grad", "time s", "x Direct-Align", "peak MiB", "step MiB", "x Direct-Align"],
              [[names[r["method"]].format(**r), r["k"], f"{r['time_s']:.3f}", f"{r['time_ratio']:.2f}",
                f"{r['peak_mem_mb']:.0f}", f"{r['step_mem_mb']:.0f}", f"{r['mem_ratio']:.2f}"] for r in steps])
        print("peak: the process's peak " + ("allocated GPU memory" if device.type == "cuda" else "resident memory")
              + " over its steps; step: that peak above what it held before them (grads, AdamW states, "
              "activations).\n")

        m = load(args, dirs)
        print(f"## 2. Reward gradient vs sigma, one-step prediction against Direct-Align to sigma - {branch_gap():.4f}"
              f" (mean of {STABILITY_SAMPLES} samples)\n")
        stable = list(stability(args, m))
        table(["sigma", "x0 error, one-step", "x0 error, DA", "|dr/dv| one-step", "|dr/dv| DA", "ratio",
               "predicted", "|dr/dw| one-step", "|dr/dw| DA"],
              [[f"{r['sigma']:.2f}", f"{r['x0_error_one_step']:.3g}", f"{r['x0_error_direct_align']:.3g}",
                f"{r['grad_v_one_step']:.3g}", f"{r['grad_v_direct_align']:.3g}", f"{r['ratio']:.2f}",
                f"{r['predicted_ratio']:.2f}", f"{r['grad_w_one_step']:.3g}", f"{r['grad_w_direct_align']:.3g}"]
               for r in stable])
        plot(stable, args.plot)

        print("\n## 3. train.py's step against its necessary parts, each timed alone\n")
        over = overhead(args, dirs, m)
        over["functions_s"] = steps[1]["time_s"]
        table(["part", "time s", "/ parts"], [[name, f"{s:.3f}", ""] for name, s in over["parts_s"].items()] + [
            ["**sum of the parts**", f"{over['parts_sum_s']:.3f}", "1.00"],
            ["train.py's rollout + srpo_step + AdamW, bare model (section 1)", f"{over['functions_s']:.3f}",
             f"{over['functions_s'] / over['parts_sum_s']:.2f}"],
            ["train.py step, --strategy fsdp (default)", f"{over['train_step_s']['fsdp']:.3f}", f"{over['ratio']:.2f}"],
            ["train.py step, --strategy ddp", f"{over['train_step_s']['ddp']:.3f}", f"{over['ratio_ddp']:.2f}"]])
        print(f"train.py / parts: {over['ratio']:.2f}x (goal: at most {over['goal']}x)\n")

        print("## 4. FLUX.1-dev memory per rank, GiB\n")
        plan = flux_dev_plan()
        act = plan["activations"]
        print(f"transformer: {plan['params']:,} parameters; VAE {plan['vae_params']:,}; reward (ViT-H-14) "
              f"{plan['reward_params']:,}. Text encoders: none while training (embeddings cached); T5-XXL + CLIP-L, "
              f"{gib(plan['text_encoders_bf16_while_caching'])} GiB in bf16, only while caching before step 1.\n"
              f"activations at {PLAN_RESOLUTION}x{PLAN_RESOLUTION} (estimate, see activation_estimate): transformer "
              f"{gib(act['transformer'])}, checkpointed {gib(act['transformer_checkpointed'])}; VAE decode "
              f"{gib(act['vae_decode'])}, checkpointed {gib(act['vae_decode_checkpointed'])}; reward "
              f"{gib(act['reward'])}. Fits: at most {USABLE:.0%} of 80 GiB.\n")
        print("total = weights + grads + AdamW + frozen + the larger of (bf16 copies + activations) while training "
              "and (all bf16 weights) while rolling out.\n")
        print(f"LoRA rows: rank {plan['lora_rank']} adapters on FLUX.1-dev's targets (flux.LORA_TARGETS), "
              f"{plan['lora_params']:,} parameters, trained in fp32 on a frozen bf16 base.\n")
        table(["GPUs", "strategy", "weights", "grads", "AdamW", "bf16 copies", "VAE, reward, text emb.", "activations",
               "total", "fits 80 GB", "activations, ckpt", "total, ckpt", "fits 80 GB, ckpt"],
              [[r["world_size"], r["strategy"] + (" LoRA" if r["lora_params"] else ""), gib(r["weights"]), gib(r["grads"]), gib(r["optimizer"]),
                gib(r["compute_copies"]), gib(r["frozen"]), gib(r["activations"]), gib(r["total"]),
                "yes" if r["fits_80gb"] else "no", gib(r["activations_checkpointed"]), gib(r["total_checkpointed"]),
                "yes" if r["fits_80gb_checkpointed"] else "no"] for r in plan["plans"]])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"bench: {time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=host, args=vars(args), steps=steps, stability=stable, overhead=over,
                           memory_plan=plan), f, indent=2)


if __name__ == "__main__":
    main()
