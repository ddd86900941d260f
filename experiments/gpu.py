"""One GPU, FLUX.1-dev's width in bf16 at 720x720: train.py's step time and memory against the memory plan, the
benchmark's step costs and gradient stability, our rollout against FluxPipeline's loop, sample.py's seconds per
image, and from the per-block numbers an extrapolation to FLUX.1-dev's 19 + 38 blocks (METHOD.md §5, §6).

A bare one-GPU machine with torch, transformers and accelerate; diffusers and ftfy (HPS's prompt cleaning) travel
as wheels in .whl/ (`python -m pip download --no-deps -d .whl diffusers==0.42.1 ftfy wcwidth` where there is a
network). About 8 minutes on an H100 (every section but the bench in 3.5, the bench in 3.6), never more than 9;
results are written after every section (and the bench's and the stability table's after every row):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
        export PYTHONPATH=/tmp/site && PYTHONUNBUFFERED=1 python3 -m experiments.gpu --out $OUT
Some sections only (the models are always written first), e.g. the bench, about 4.5 minutes with the start:
    ... python3 -m experiments.gpu --out $OUT --sections bench
CPU, tiny sizes, every section end to end (about 2 minutes on 2 cores; memory is read on a GPU only):
    python -m experiments.gpu --tiny --out out/gpu-tiny

The model: FLUX.1-dev's transformer config (width 3072 = 24 heads x 128, rotary axes (16, 56, 56), T5 width 4096,
CLIP width 768) with 2 double + 4 single blocks instead of 19 + 38, so that DDP's 16 bytes per parameter, the
activations, the VAE and the reward fit an 80 GB card with room to spare; FLUX.1-dev's VAE config; a ViT-H-14-sized
CLIPModel as the reward; random weights in FLUX.1-dev's folder layout (text encoders of the right widths, one
layer deep: training caches their output). Each section runs in a process of its own, so each has its own peak
memory and can be stopped when it overruns; one that would end past the time budget is skipped with a note.
Written to --out: gpu.json (every number; a failed section's last 30 lines of output), gpu.md (a table per
section), log.txt (every process's output), train.py's metrics of each run, bench_stability.png.
"""
import argparse
import datetime
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from torch.utils.checkpoint import checkpoint
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, T5EncoderModel

import sample
import train
from srpo import srpo_step
from experiments import bench
from direct_align import euler_step, sigma_schedule
from flux import add_lora, autocast, conditioning, decode, encode_prompts, latent_noise, rollout, velocity
from inputs import fail
from srpo_reward import control_prompts, load_reward
from tiny import clip_tokenizer, tiny_model_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = dict(
    layers=2, single_layers=4,       # of FLUX.1-dev's 19 + 38: 1.3B parameters, 16 bytes each under DDP
    heads=24, head_dim=128, rope=(16, 56, 56), text_width=4096, pooled_width=768,  # FLUX.1-dev's
    vae_width=128,                   # FLUX.1-dev's VAE: 128, 256, 512, 512 channels
    reward=bench.VIT_H_14,           # HPSv2.1's and PickScore's architecture
    resolution=720, text_len=512,    # the release's training size and T5 length (METHOD.md §5)
    train_steps=3,                   # train.py's first step warms up: the median of the others is reported
    lora_rank=64,                    # train-lora: --lora-rank (and alpha) 64 under DDP, the LoRA recipe for one GPU
    repeats=5,                       # timed repeats of each in-process measurement, after one warm-up
    sample_flags=[],                 # sample.py's defaults: 1024 x 1024, 50 steps, guidance 3.5, 512 tokens
    sample_images=3,
    bench_flags=["--repeats", "3", "--sigmas", "0.9", "0.7", "0.5", "0.3", "0.1"],
    stability_samples=2,             # noises per sigma of the gradient-stability table (bench.py's default: 4)
    budget_s=480, deadline_s=540,    # start no section that would end after 8 minutes; stop everything at 9:00
)
TINY = dict(
    layers=1, single_layers=2, heads=2, head_dim=16, rope=bench.rope_axes(16), text_width=32, pooled_width=32,
    vae_width=8, reward=None, resolution=64, text_len=32, train_steps=3, lora_rank=4, repeats=2,
    sample_flags=["--height", "64", "--width", "64", "--num-inference-steps", "8", "--max-sequence-length", "32"],
    sample_images=1, bench_flags=["--repeats", "1", "--sigmas", "0.9", "0.5", "0.1"], stability_samples=1,
    budget_s=900, deadline_s=1200)
# Each section's name, its seconds on an H100 (the H100 runs' in results/ rounded up; a section is skipped when it
# would end past the budget) and the seconds after which it is stopped.
# The bench, the longest, runs last.
SECTIONS = (("models", 35, 150), ("train-fsdp", 35, 150), ("train-ddp", 35, 150), ("train-lora", 35, 150),
            ("anatomy", 35, 150), ("rollout", 35, 120), ("sample", 35, 120), ("stability", 35, 150),
            ("bench", 220, 300))
CAPTION = bench.CAPTION
TOLERANCE = 0.15                     # a plan term off by more than this is flagged, to be fixed
RELEASE_BATCH, RELEASE_STEPS = 32, 19  # the release's model: saved at step 20, before that step's update
# Dense bf16 tensor TFLOP/s by NVIDIA's spec sheets: the paper's H20 against the H100 / H200 SXM.
H20_TFLOPS, H100_TFLOPS = 148, 989


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu.json, gpu.md, log.txt and the metrics")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: the whole script on a CPU in minutes")
    p.add_argument("--sections", nargs="+", choices=[name for name, *_ in SECTIONS[1:]],
                   help="only these sections (the models are always written first); default: all")
    p.add_argument("--replan", metavar="GPU_JSON", help="no measuring: a run's gpu.json against the memory plan as it "
                   "is now (computed on this machine's CPU), written to --out")
    p.add_argument("--section", help=argparse.SUPPRESS)  # the process of one section, started by the script itself
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------- clocks and memory

def stamp(device):
    """A point in time: a recorded CUDA event on a GPU (queued kernels count), the wall clock on a CPU."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def seconds(start, end):
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1000


def held(device):
    """Bytes allocated on the GPU now; None on a CPU, where nothing here reads memory."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return held(device)


def peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def minus(a, b):
    return None if a is None or b is None else a - b


# ----------------------------------------------------------------------------------------- the models

def transformer_config(cfg, layers=None, single_layers=None):
    """FLUX.1-dev's transformer at cfg's width, with cfg's blocks unless told otherwise."""
    return dict(bench.FLUX_DEV, num_layers=layers or cfg.layers, num_single_layers=single_layers or cfg.single_layers,
                num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim, axes_dims_rope=tuple(cfg.rope),
                joint_attention_dim=cfg.text_width, pooled_projection_dim=cfg.pooled_width)


def paths(work):
    return os.path.join(work, "flux"), os.path.join(work, "reward"), os.path.join(work, "prompts.txt")


def caption_embeds(cfg, work, device):
    """The caption's T5 and CLIP embeddings, computed and cached as train.py does."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return encode_prompts(paths(work)[0], [CAPTION], cfg.text_len, os.path.join(work, "text_cache"), device,
                          dtype)(CAPTION)


def write_models(cfg, work, out):
    """FLUX.1-dev's folder layout with the reduced transformer, the VAE and text encoders of cfg's widths, all
    random; the reward CLIPModel with tiny.py's tokenizer (its ids fit ViT-H's vocabulary); the prompts."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    tiny_flux, tiny_clip = tiny_model_paths(os.path.join(work, "tiny"))
    flux, reward, prompts = paths(work)
    shutil.copytree(tiny_flux, flux)  # model_index.json, scheduler and tokenizers; the models are replaced below
    w = cfg.vae_width
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds, where a CPU takes minutes for a ViT-H
        transformer = FluxTransformer2DModel(**transformer_config(cfg))
        vae = AutoencoderKL(**dict(bench.FLUX_VAE, block_out_channels=(w, 2 * w, 4 * w, 4 * w),
                                   norm_num_groups=min(32, w)))
        for sub, cls, width in (("text_encoder", CLIPTextModel, cfg.pooled_width),
                                ("text_encoder_2", T5EncoderModel, cfg.text_width)):
            config = cls.config_class.from_pretrained(os.path.join(flux, sub))
            config.hidden_size = width  # T5's d_model: FLUX's joint_attention_dim; CLIP's: its pooled_projection_dim
            cls(config).save_pretrained(os.path.join(flux, sub))
        if cfg.reward:
            tokenizer = clip_tokenizer()
            ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
            clip = CLIPModel(CLIPConfig(**dict(cfg.reward, text_config=dict(cfg.reward["text_config"], **ids))))
    # bf16 files: half the bytes to write and read; train.py and load_reward cast them to fp32 as for the real ones
    transformer.to(torch.bfloat16).save_pretrained(os.path.join(flux, "transformer"))
    vae.save_pretrained(os.path.join(flux, "vae"))
    if cfg.reward:
        clip.to(torch.bfloat16).save_pretrained(reward)
        tokenizer.save_pretrained(reward)
    else:
        shutil.copytree(tiny_clip, reward)
        clip = CLIPModel.from_pretrained(reward)
    with open(prompts, "w") as f:
        f.write("\n".join(train.TINY_PROMPTS) + "\n")
    with torch.device("meta"):
        target = FluxTransformer2DModel(**transformer_config(cfg, bench.FLUX_DEV["num_layers"],
                                                             bench.FLUX_DEV["num_single_layers"]))
        adapted = add_lora(FluxTransformer2DModel(**transformer_config(cfg)), cfg.lora_rank, cfg.lora_rank,
                           torch.bfloat16, 0)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "CPU", torch=torch.__version__,
                params=count(transformer), target_params=count(target),
                lora_params=sum(p.numel() for p in adapted.parameters() if p.requires_grad),
                block_params=[count(b) for b in [*transformer.transformer_blocks,
                                                 *transformer.single_transformer_blocks]],
                double_params=count(transformer.transformer_blocks[0]),
                single_params=count(transformer.single_transformer_blocks[0]),
                vae_params=count(vae), reward_params=count(clip), seconds=time.time() - started)


# ----------------------------------------------------------------------------------------- train.py itself

def run_train(cfg, work, out, name, timeout, log):
    """train.py on one rank for cfg.train_steps steps: name is fsdp, ddp, or lora (rank-64 adapters under DDP, the
    LoRA recipe for one GPU). It is stopped once the last step's metrics are written: its final checkpoint
    (weights and AdamW states, 16 bytes per parameter) is no part of a step."""
    flux, reward, prompts = paths(work)
    out_dir = os.path.join(work, f"train-{name}")
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--model", flux, "--reward", "hps", "--reward-path",
               reward, "--prompts", prompts, "--resolution", str(cfg.resolution), "--steps", str(cfg.train_steps),
               "--strategy", "ddp" if name == "lora" else name, "--sample-every", "0", "--checkpoint-every", "0",
               "--max-sequence-length", str(cfg.text_len), "--batch-size", "1", "--output-dir", out_dir]
    if name == "lora":
        command += ["--lora-rank", str(cfg.lora_rank), "--lora-alpha", str(cfg.lora_rank)]
    metrics = os.path.join(out_dir, "metrics.jsonl")
    lines = lambda: sum(1 for _ in open(metrics)) if os.path.isfile(metrics) else 0  # noqa: E731
    status = finish(start(command, log, cfg), timeout, done=lambda: lines() >= cfg.train_steps)
    rows = [json.loads(line) for line in open(metrics)] if os.path.isfile(metrics) else []
    if rows:
        shutil.copy(metrics, os.path.join(out, f"train-{name}-metrics.jsonl"))
    shutil.rmtree(out_dir, ignore_errors=True)
    later = rows[1:] or rows  # the first step warms up (kernels, allocator)
    median = lambda key: statistics.median(r[key] for r in later) if later and later[0].get(key) is not None \
        else None  # noqa: E731
    result = dict(status=status, steps=len(rows), step_time_s=median("step_time_s"),
                  rollout_s=median("time_rollout_s"), branches_s=median("time_branches_s"),
                  max_memory_gib=max((r.get("max_memory_gib") or 0 for r in rows), default=0) or None)
    if result["rollout_s"] is not None:
        result["rest_s"] = result["step_time_s"] - result["rollout_s"] - result["branches_s"]
    return result


# ----------------------------------------------------------------------------------------- the step's anatomy

def set_checkpointing(transformer, on):
    if on:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()


def block_costs(transformer, x, cond, targs, device, repeats):
    """Per block of each kind: its forward without gradient (a rollout step's), its forward + recomputation +
    backward under checkpointing (a branch's, timed alone on the inputs it saw in the model), and the memory a
    forward with gradient leaves allocated across it, checkpointing off and on (its bf16 weight copy, which
    autocast keeps for the backward, included). Times are medians over repeats and over blocks of a kind."""
    kinds = {b: "double" for b in transformer.transformer_blocks} | \
        {b: "single" for b in transformer.single_transformer_blocks}
    inputs, events = {}, []

    def pre(block, args, kwargs):
        inputs.setdefault(kinds[block], (args, kwargs))
        events.append((kinds[block], stamp(device), held(device)))

    def post(block, args, kwargs, output):
        events[-1] += (stamp(device), held(device))

    hooks = [h for b in kinds for h in (b.register_forward_pre_hook(pre, with_kwargs=True),
                                        b.register_forward_hook(post, with_kwargs=True))]

    def forward(grad, checkpointing):
        set_checkpointing(transformer, checkpointing)
        events.clear()
        with torch.set_grad_enabled(grad):
            t0 = stamp(device)
            velocity(transformer, x, 0.5, cond, targs.guidance)
            total = seconds(t0, stamp(device))
        return total, [(kind, seconds(a, b), minus(m_b, m_a)) for kind, a, m_a, b, m_b in events]

    was_checkpointing = transformer.is_gradient_checkpointing
    forward(False, False)  # warm-up
    runs = [forward(False, False) for _ in range(repeats)]
    out = {kind: dict(forward_s=statistics.median(s for _, blocks in runs for k, s, _ in blocks if k == kind))
           for kind in ("double", "single")}
    out["rest_forward_s"] = statistics.median(total - sum(s for _, s, _ in blocks) for total, blocks in runs)
    for checkpointing, key in ((False, "held"), (True, "held_checkpointed")):
        _, blocks = forward(True, checkpointing)
        for kind in ("double", "single"):
            values = [m for k, _, m in blocks if k == kind]
            out[kind][key] = None if None in values else statistics.median(values)
    for h in hooks:
        h.remove()
    set_checkpointing(transformer, was_checkpointing)

    def train_block(block, args, kwargs):
        leaf = lambda t: t.detach().requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t  # noqa
        args, kwargs = [leaf(a) for a in args], {k: leaf(v) for k, v in kwargs.items()}
        with autocast(device):
            outputs = checkpoint(block, *args, use_reentrant=False, **kwargs)
        sum(o.float().square().mean() for o in outputs).backward()

    for kind, block in (("double", transformer.transformer_blocks[0]),
                        ("single", transformer.single_transformer_blocks[0])):
        train_block(block, *inputs[kind])  # warm-up
        out[kind]["train_s"] = statistics.median(bench.timed(lambda: train_block(block, *inputs[kind]), device)
                                                 for _ in range(repeats))
    transformer.zero_grad(set_to_none=True)
    return out


def fixed_costs(vae, reward, x, resolution, device, repeats):
    """A branch's parts besides the transformer, each alone on a leaf input, forward + backward: the VAE decode
    (checkpointed where train.py checkpoints it) and the SRP reward of the decoded image. Seconds (median) and the
    peak allocated above what was held before (the last run)."""
    pos, neg = control_prompts(CAPTION, 0)
    with torch.no_grad():
        image = decode(vae, x, resolution)

    def vae_decode():
        decode(vae, x.detach().requires_grad_(), resolution).mean().backward()

    def srp_reward():
        with autocast(device):
            r = reward.srp(image.detach().requires_grad_(), [pos], [neg], 0.1).float()
        r.sum().backward()

    out = {}
    for name, fn in (("vae_decode", vae_decode), ("reward", srp_reward)):
        fn()  # warm-up: cuDNN picks its algorithms
        out[f"{name}_s"] = statistics.median(bench.timed(fn, device) for _ in range(repeats))
        before = reset_peak(device)
        fn()
        out[f"{name}_peak"] = minus(peak(device), before)
    return out


def step_parts(transformer, vae, reward, optimizer, noise, cond, step, targs, device):
    """One train.py step on the bare model, phase by phase: seconds, the peak allocated above what was held when
    the phase began (_peak), the memory it leaves (_kept), and the absolute peak (_max)."""
    out = dict(held_before=held(device))

    def phase(name, fn):
        before = reset_peak(device)
        t0 = stamp(device)
        result = fn()
        out[f"{name}_s"] = seconds(t0, stamp(device))
        out.update({f"{name}_peak": minus(peak(device), before), f"{name}_kept": minus(held(device), before),
                    f"{name}_max": peak(device)})
        return result

    def update():
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), targs.max_grad_norm)
        optimizer.step()

    x0 = phase("rollout", lambda: rollout(transformer, noise, cond, targs.rollout_steps, targs.shift,
                                          targs.rollout_guidance))
    phase("branches", lambda: srpo_step(lambda x, s: velocity(transformer, x, s, cond, targs.guidance),
                                        lambda x: decode(vae, x, targs.resolution), reward, x0, noise, CAPTION, step,
                                        train.rng(0, "t", step), **train.step_settings(targs),
                                        autocast=lambda: autocast(device)))
    # METHOD.md §7: a bf16 cast made without gradient and reused by a pass with it leaves its weight no gradient
    out["weights_without_gradient"] = sum(p.grad is None or not p.grad.any().item() for p in transformer.parameters())
    phase("optimizer", update)
    optimizer.zero_grad(set_to_none=True)
    return out


def anatomy(cfg, work, out):
    """The step's parts on the bare model, loaded as train.py loads it for DDP (fp32 weights under bf16 autocast,
    transformer and VAE decoder checkpointed on CUDA): memory after each load, each phase of two steps, each block
    and each fixed part."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flux, reward_dir, _ = paths(work)
    targs = train.parse_args(["--model", flux, "--reward-path", reward_dir, "--resolution", str(cfg.resolution),
                              "--max-sequence-length", str(cfg.text_len)])
    transformer = FluxTransformer2DModel.from_pretrained(flux, subfolder="transformer", dtype=torch.float32)
    transformer = transformer.to(device).train()
    weights = held(device)
    vae = AutoencoderKL.from_pretrained(flux, subfolder="vae").to(device).eval().requires_grad_(False)
    reward = load_reward("hps", reward_dir, device=device)
    cond = conditioning(caption_embeds(cfg, work, device), cfg.resolution, device)
    frozen = minus(held(device), weights)
    if device.type == "cuda":  # as train.py: --gradient-checkpointing is on by default with CUDA
        transformer.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=targs.lr, betas=tuple(targs.betas),
                                  weight_decay=targs.weight_decay, eps=targs.adam_eps, foreach=True)  # as train.py
    noise = latent_noise(cfg.resolution, train.rng(0, "noise", 0), device)
    blocks = block_costs(transformer, noise, cond, targs, device, cfg.repeats)
    fixed = fixed_costs(vae, reward, noise, cfg.resolution, device, cfg.repeats)
    steps = [step_parts(transformer, vae, reward, optimizer, noise, cond, step, targs, device) for step in range(2)]
    return dict(weights=weights, frozen=frozen, blocks=blocks, fixed=fixed, steps=steps,
                weight_tensors=len(list(transformer.parameters())),
                rollout_steps=targs.rollout_steps, branches=2 if targs.branches == "both" else 1,
                checkpointing=device.type == "cuda")


# ----------------------------------------------------------------------------------------- sampling

@torch.no_grad()
def rollout_without_autocast(transformer, noise, cond, steps, shift, guidance):
    """flux.rollout's Euler loop with the transformer run in its weights' dtype and no autocast, as FluxPipeline
    runs it (the release, and so flux.velocity, runs it under bf16 autocast: norms in fp32, a cast before each
    matmul)."""
    sigmas, x, dtype = sigma_schedule(steps, shift), noise, transformer.dtype
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((1,), math.floor(float(sigma) * 1000) / 1000, device=x.device, dtype=dtype)
        v = transformer(hidden_states=x.to(dtype), timestep=t, guidance=torch.full_like(t, guidance),
                        return_dict=False, **cond)[0]
        x = euler_step(x, v.float(), sigma, sigma_next)
    return x


def rollout_vs_pipeline(cfg, work, out):
    """flux.rollout against FluxPipeline's own denoising loop on the same transformer: train.py's rollout settings
    (25 steps, guidance 1), the cached embeddings given to both, latents out; interleaved runs after a warm-up.
    On a GPU also each loop in the other's precision, which tells how much of a difference autocast makes."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # as sample.py loads the pipeline
    flux = paths(work)[0]
    targs = train.parse_args(["--model", flux, "--resolution", str(cfg.resolution)])
    embeds = caption_embeds(cfg, work, device)
    cond = conditioning(embeds, cfg.resolution, device)
    noise = latent_noise(cfg.resolution, train.rng(0, "noise", 0), device)
    transformer = FluxTransformer2DModel.from_pretrained(flux, subfolder="transformer", dtype=dtype).to(device).eval()
    pipe = FluxPipeline.from_pretrained(flux, transformer=transformer, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    n, name = targs.rollout_steps, str(dtype).removeprefix("torch.")
    runs = {f"flux.rollout, {name} weights": lambda: rollout(transformer, noise, cond, n, targs.shift,
                                                               targs.rollout_guidance),
            f"FluxPipeline, {name} weights": lambda: pipe(
                prompt_embeds=embeds["encoder_hidden_states"], pooled_prompt_embeds=embeds["pooled_projections"],
                height=cfg.resolution, width=cfg.resolution, num_inference_steps=n,
                guidance_scale=targs.rollout_guidance, max_sequence_length=cfg.text_len, output_type="latent",
                generator=torch.Generator().manual_seed(0))}
    runs[f"flux.rollout's loop, {name} weights, no autocast (FluxPipeline's precision)"] = \
        lambda: rollout_without_autocast(transformer, noise, cond, n, targs.shift, targs.rollout_guidance)
    if cuda:
        pipeline = runs[f"FluxPipeline, {name} weights"]
        runs[f"FluxPipeline, {name} weights, under bf16 autocast (train.py's precision)"] = \
            lambda: torch.autocast("cuda", torch.bfloat16)(pipeline)()
        # what train.py's DDP rollout runs: fp32 master weights under bf16 autocast
        master = FluxTransformer2DModel.from_pretrained(flux, subfolder="transformer", dtype=torch.float32).to(device)
        runs["flux.rollout, fp32 weights under bf16 autocast (train.py, DDP)"] = \
            lambda: rollout(master, noise, cond, n, targs.shift, targs.rollout_guidance)
    for fn in runs.values():
        fn()
    times, host = {key: [] for key in runs}, {key: [] for key in runs}
    for _ in range(cfg.repeats):
        for key, fn in runs.items():
            t0 = time.perf_counter()  # and when fn returns, its kernels queued: the host's part
            times[key].append(bench.timed(lambda: (fn(), host[key].append(time.perf_counter() - t0)), device))
    median = {key: statistics.median(t) for key, t in times.items()}
    ours, theirs = list(median.values())[:2]
    return dict(steps=n, resolution=cfg.resolution, seconds=median, times=times, ours_over_pipeline=ours / theirs,
                host_seconds={key: statistics.median(t) for key, t in host.items()})


def sample_speed(cfg, work, out):
    """sample.py's render on the reduced model with sample.py's defaults (1024 x 1024, 50 steps, guidance 3.5,
    512 T5 tokens, bf16): seconds per image after one warm-up image, PNG included, and the transformer's share."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flux = paths(work)[0]
    args = sample.parse_args(["--model", flux, "--prompt", CAPTION, *cfg.sample_flags])
    pipe = FluxPipeline.from_pretrained(flux, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipe = pipe.to(device)  # as sample.main loads it
    pipe.set_progress_bar_config(disable=True)
    records = [dict(file=f"{i:05d}.png", prompt=CAPTION, seed=args.seed + i, **{k: getattr(args, k) for k in
                    sample.PIPE_ARGS}, model=flux, weights=None) for i in range(cfg.sample_images + 1)]
    calls = []
    hooks = [pipe.transformer.register_forward_pre_hook(lambda *_: calls.append([stamp(device)])),
             pipe.transformer.register_forward_hook(lambda *_: calls[-1].append(stamp(device)) and None)]
    sample.render(pipe, records[:1], os.path.join(work, "samples-warm-up"), 0, 1)
    calls.clear()
    total = bench.timed(lambda: sample.render(pipe, records[1:], os.path.join(work, "samples"), 0, 1), device)
    for h in hooks:
        h.remove()
    n = cfg.sample_images
    return dict(settings={k: getattr(args, k) for k in sample.PIPE_ARGS}, images=n, image_s=total / n,
                transformer_s=sum(seconds(a, b) for a, b in calls) / n)


# ----------------------------------------------------------------------------------------- the benchmark, the plan

def bench_args(cfg, work, out):
    flux, reward, _ = paths(work)
    args = bench.parse_args(["--resolution", str(cfg.resolution), "--text-len", str(cfg.text_len), *cfg.bench_flags,
                             "--plot", os.path.join(out, "bench_stability.png")])
    bench.check_args(args)
    dirs = types.SimpleNamespace(root=os.path.join(work, "bench"), flux=flux, clip=reward)
    os.makedirs(dirs.root, exist_ok=True)
    return args, dirs


def bench_steps(cfg, work, out):
    """experiments/bench.py's section 1 on this script's models and size: the step cost of Direct-Align (one and
    both branches, and with LoRA), ReFL and DRaFT-K; each method's row is saved as soon as it is done."""
    args, dirs = bench_args(cfg, work, out)
    result = dict(repeats=args.repeats, draft_k=args.draft_k, rollout_steps=args.rollout_steps, steps=[])
    return saved_by_row(work, "bench", result, result["steps"], bench.step_costs(args, dirs), ("method", "k"))


def stability(cfg, work, out):
    """experiments/bench.py's section 2, gradient stability against sigma, on this script's models and size; each
    sigma's row is saved as soon as it is done, so a section stopped at its time limit keeps what it measured."""
    args, dirs = bench_args(cfg, work, out)
    result = dict(samples=cfg.stability_samples, rows=[])
    rows = bench.stability(args, bench.load(args, dirs), samples=cfg.stability_samples)
    saved_by_row(work, "stability", result, result["rows"], rows, ("sigma",))
    bench.plot(result["rows"], args.plot)
    return result


def saved_by_row(work, name, result, into, rows, keys):
    """Each of rows appended to into (a list in result) and result saved at once, so that a section stopped at its
    time limit keeps the rows it finished; returns result."""
    for row in rows:
        into.append(row)
        print(f"{name}: {' '.join(f'{k} {row[k]}' for k in keys)} done", flush=True)
        dump(work, name, result)
    return result


def plan_terms(cfg, work, out):
    """bench.activation_estimate (FLUX.1-dev's width at 720 x 720, measured on a CPU): run beside the GPU sections
    on a few cores."""
    torch.set_num_threads(max(1, min(4, (os.cpu_count() or 2) // 4)))
    return bench.activation_estimate()


SECTION_FUNCTIONS = {"models": write_models, "anatomy": anatomy, "rollout": rollout_vs_pipeline,
                     "sample": sample_speed, "bench": bench_steps, "stability": stability, "plan": plan_terms}


# ----------------------------------------------------------------------------------------- plan against measurement

def frozen_bytes(cfg, m):
    """The plan's frozen term: the fp32 VAE and reward, and one prompt's cached bf16 text embeddings."""
    return 4 * (m["vae_params"] + m["reward_params"]) + 2 * (cfg.text_len * cfg.text_width + cfg.pooled_width)


def reduced_plan(cfg, r):
    """bench.rank_memory for this model on one rank, with bench.activation_estimate's per-block terms summed over
    this model's blocks (the estimate itself sums them over FLUX.1-dev's 19 + 38)."""
    m, acts = r["models"], r["plan"]
    per_block, width = acts["per_block"], cfg.heads * cfg.head_dim
    tokens = cfg.text_len + (cfg.resolution // 16) ** 2
    activations = dict(
        transformer=cfg.layers * per_block["double"] + cfg.single_layers * per_block["single"] + per_block["other"],
        transformer_checkpointed=(cfg.layers + cfg.single_layers) * tokens * width * 2 + per_block["other"],
        **{k: acts[k] for k in ("transformer_recompute", "vae_decode", "vae_decode_checkpointed", "reward")})
    frozen = frozen_bytes(cfg, m)
    plans = {s: bench.rank_memory(m["params"], 1, s, m["block_params"], frozen, activations) for s in ("fsdp", "ddp")}
    if m.get("lora_params"):
        plans["lora"] = bench.rank_memory(m["params"], 1, "ddp", m["block_params"], frozen, activations,
                                          m["lora_params"])
    return dict(activations=activations, frozen=frozen, tokens=tokens, width=width, **plans)


def memory_rows(cfg, r):
    """(term, measured bytes, planned bytes or None) for every memory term measured so far."""
    if "params" not in (r.get("models") or {}) or "per_block" not in (r.get("plan") or {}):
        return []
    plan, rows = reduced_plan(cfg, r), []
    for s, flags in (("fsdp", "--strategy fsdp"), ("ddp", "--strategy ddp"),
                     ("lora", f"--strategy ddp --lora-rank {cfg.lora_rank}")):
        if (r.get(f"train-{s}") or {}).get("max_memory_gib") and s in plan:
            rows.append((f"train.py {flags}, max_memory_allocated", r[f"train-{s}"]["max_memory_gib"] * 2**30,
                         plan[s]["total_checkpointed"]))
    a = r.get("anatomy") or {}
    if a.get("weights") is None or "steps" not in a:
        return rows
    ddp, acts, first, steady = plan["ddp"], plan["activations"], a["steps"][0], a["steps"][-1]
    suffix = "_checkpointed" if a["checkpointing"] else ""
    per_block = r["plan"]["per_block"]
    rows += [
        ("fp32 weights, after load", a["weights"], ddp["weights"]),
        ("VAE + reward (fp32) + text embeddings", a["frozen"], plan["frozen"]),
        ("rollout: peak above held (bf16 copies)", steady["rollout_peak"], ddp["rollout_copies"]),
        ("fp32 gradients, kept after the branches", first["branches_kept"], ddp["grads"]),
        ("AdamW states, kept after the first update", first["optimizer_kept"], ddp["optimizer"]),
        ("branches: peak above held (grads + bf16 copies + activations)", steady["branches_peak"],
         ddp["grads"] + ddp[f"training{suffix}"]),
        ("VAE decode, forward + backward: peak above held", a["fixed"]["vae_decode_peak"], acts[f"vae_decode{suffix}"]),
        ("reward, forward + backward: peak above held", a["fixed"]["reward_peak"], acts["reward"])]
    for kind in ("double", "single"):
        copy = 2 * r["models"][f"{kind}_params"]
        rows += [(f"{kind} block, forward with grad: held (activations + bf16 weights)", a["blocks"][kind]["held"],
                  per_block[kind] + copy),
                 (f"{kind} block, checkpointed: held (its input + bf16 weights)",
                  a["blocks"][kind]["held_checkpointed"], plan["tokens"] * plan["width"] * 2 + copy)]
    rows += [("optimizer step: peak above held (temporaries, not in the plan)", steady["optimizer_peak"], None),
             ("bare model, whole step: peak", max(steady[f"{p}_max"] for p in ("rollout", "branches", "optimizer")),
              ddp["total_checkpointed"])]
    return rows


def extrapolate(cfg, r):
    """FLUX.1-dev's step from the reduced model's: each phase measured on the bare model plus, for the 17 double and
    34 single blocks it lacks, their measured per-block cost (a rollout runs each block's forward once a step; a
    branch its forward, recomputation and backward); AdamW's time scales with the parameters a rank steps.
    EXTRAPOLATED, not measured."""
    m, a = r.get("models"), r.get("anatomy")
    if not (m and a and "steps" in a and "error" not in a):
        return None
    b, s = a["blocks"], a["steps"][-1]
    more_double = bench.FLUX_DEV["num_layers"] - cfg.layers
    more_single = bench.FLUX_DEV["num_single_layers"] - cfg.single_layers
    rollout_s = s["rollout_s"] + a["rollout_steps"] * (more_double * b["double"]["forward_s"]
                                                       + more_single * b["single"]["forward_s"])
    branches_s = s["branches_s"] + a["branches"] * (more_double * b["double"]["train_s"]
                                                    + more_single * b["single"]["train_s"])
    optimizer_s = s["optimizer_s"] * m["target_params"] / m["params"]  # one GPU holding all of it
    forward_s = b["rest_forward_s"] + cfg.layers * b["double"]["forward_s"] \
        + cfg.single_layers * b["single"]["forward_s"]
    forward_growth = 1 + (more_double * b["double"]["forward_s"] + more_single * b["single"]["forward_s"]) / forward_s
    bare_step = s["rollout_s"] + s["branches_s"] + s["optimizer_s"]
    train_py = (r.get("train-fsdp") or {}).get("step_time_s")
    out = dict(params=m["target_params"], rollout_s=rollout_s, branches_s=branches_s, prompt_s=rollout_s + branches_s,
               optimizer_one_gpu_s=optimizer_s, train_py_over_bare=train_py / bare_step if train_py else None,
               # FSDP per prompt and rank: bf16 all-gathers of the weights (rollout once; each branch's forward and
               # its backward once each) and fp32 reduce-scatters of the gradients (each branch's backward)
               communication_bytes_per_prompt=(2 * 5 + 4 * 2) * m["target_params"], gpus={})
    sampled = r.get("sample") or {}
    if "image_s" in sampled:  # sample.py: only its transformer's share grows, as a forward does at 720 x 720
        out.update(sample_transformer_s=sampled["transformer_s"] * forward_growth,
                   sample_image_s=sampled["image_s"] + sampled["transformer_s"] * (forward_growth - 1))
    frozen = frozen_bytes(cfg, m)
    blocks = [m["double_params"]] * bench.FLUX_DEV["num_layers"] \
        + [m["single_params"]] * bench.FLUX_DEV["num_single_layers"]
    for gpus in (8, 32):
        prompts = RELEASE_BATCH // gpus
        step = prompts * (rollout_s + branches_s) + optimizer_s / gpus
        memory = bench.rank_memory(m["target_params"], gpus, "fsdp", blocks, frozen, r["plan"]) \
            if isinstance(r.get("plan"), dict) and "per_block" in r["plan"] else None
        out["gpus"][gpus] = dict(prompts_per_gpu=prompts, step_s=step, minutes=RELEASE_STEPS * step / 60,
                                 memory_plan=memory and memory["total_checkpointed"])
    return out


# ----------------------------------------------------------------------------------------- the report

def md_table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def gib(b):
    return "n/a" if b is None else f"{b / 2**30:.2f}"


def num(x, fmt=".3f"):
    return "n/a" if x is None else format(x, fmt)


def ratio(measured, planned):
    if measured is None or not planned:
        return "", ""
    q = measured / planned
    return f"{q:.2f}", "" if abs(q - 1) <= TOLERANCE else f"**off by {100 * (q - 1):+.0f}%**"


def report(cfg, r):
    """gpu.md: a short table per section, from whatever sections have results."""
    m = r.get("models") or {}
    lines = [f"# SRPO on one GPU: FLUX.1-dev's width at {cfg.resolution}x{cfg.resolution}", "",
             f"{m.get('device', '?')}, torch {m.get('torch', torch.__version__)}, {r['date']}. Model: FLUX "
             f"architecture, {cfg.heads}x{cfg.head_dim} wide, rotary axes {tuple(cfg.rope)}, {cfg.layers} double + "
             f"{cfg.single_layers} single blocks ({num(m.get('params', 0) / 1e9, '.2f')}B parameters), random weights; "
             f"VAE width {cfg.vae_width}; reward {'ViT-H-14-sized CLIP' if cfg.reward else 'tiny CLIP'}; "
             f"{cfg.text_len} text tokens. Seconds per section: "
             + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()) + ".", ""]
    notes = dict(r["notes"], **({"memory": "read on a GPU only"} if m.get("device") == "CPU" else {}))
    lines += [f"- {name}: {note}" for name, note in notes.items()] + ([""] if notes else [])

    names = dict(fsdp="fsdp", ddp="ddp", lora=f"ddp, LoRA rank {cfg.lora_rank}")
    trains = [(names[s], r[f"train-{s}"]) for s in names if r.get(f"train-{s}")]
    if trains:
        lines += [f"## 1. train.py, one rank, {cfg.train_steps} steps of one prompt (median after the first)", ""]
        lines += md_table(["strategy", "status", "step s", "rollout s", "branches s", "rest s", "max allocated GiB"],
                          [[s, t["status"], num(t["step_time_s"]), num(t["rollout_s"]), num(t["branches_s"]),
                            num(t.get("rest_s")), num(t["max_memory_gib"], ".2f")] for s, t in trains])
    rows = memory_rows(cfg, r)
    if rows:
        lines += ["## 2. Memory: measured against the plan (bench.rank_memory, bench.activation_estimate)", "",
                  f"Terms from the bare model loaded as for DDP (anatomy); a term off by more than {TOLERANCE:.0%} "
                  "is flagged and the plan needs that term fixed.", ""]
        lines += md_table(["term", "measured GiB", "plan GiB", "measured / plan", ""],
                          [[t, gib(mb), gib(pb), *ratio(mb, pb)] for t, mb, pb in rows])
    a = r.get("anatomy") or {}
    if "blocks" in a:
        b, f, s = a["blocks"], a["fixed"], a["steps"][-1]
        kind = "bf16 autocast, checkpointed" if a["checkpointing"] else "fp32"
        lines += [f"## 3. The step's parts, bare model ({kind})", ""]
        lines += md_table(["part", "ms"], [
            ["double block: forward (a rollout step)", num(1e3 * b["double"]["forward_s"], ".2f")],
            ["single block: forward", num(1e3 * b["single"]["forward_s"], ".2f")],
            ["rest of the transformer: forward", num(1e3 * b["rest_forward_s"], ".2f")],
            ["double block: forward + recompute + backward (a branch)", num(1e3 * b["double"]["train_s"], ".2f")],
            ["single block: forward + recompute + backward", num(1e3 * b["single"]["train_s"], ".2f")],
            ["VAE decode: forward + backward", num(1e3 * f["vae_decode_s"], ".1f")],
            ["reward: forward + backward", num(1e3 * f["reward_s"], ".1f")],
            [f"rollout, {a['rollout_steps']} steps", num(1e3 * s["rollout_s"], ".1f")],
            [f"{a['branches']} branches", num(1e3 * s["branches_s"], ".1f")],
            ["... less their blocks (what does not grow with depth)", num(1e3 * (s["branches_s"] - a["branches"] * (
                cfg.layers * b["double"]["train_s"] + cfg.single_layers * b["single"]["train_s"])), ".1f")],
            ["... against VAE decode + reward, once per branch", num(1e3 * a["branches"] * (
                f["vae_decode_s"] + f["reward_s"]), ".1f")],
            ["clip + AdamW", num(1e3 * s["optimizer_s"], ".1f")]])
        if "weights_without_gradient" in s:
            lines += [f"Weight tensors without a gradient after the branches (autocast's cache, METHOD.md §7): "
                      f"{s['weights_without_gradient']} of {a['weight_tensors']}.", ""]
    bench_r, stable = r.get("bench") or {}, (r.get("stability") or {}).get("rows")
    if bench_r.get("steps"):
        lines += [f"## 4. bench.py: one training step per method (median of {bench_r['repeats']})", ""]
        lines += md_table(["method", "steps with grad", "time s", "x Direct-Align", "step MiB", "x Direct-Align"],
                          [[row["method"], row["k"], num(row["time_s"]),
                            num(row["time_ratio"], ".2f"), num(row["step_mem_mb"], ".0f"), num(row["mem_ratio"], ".2f")]
                           for row in bench_r["steps"]])
    if stable:
        lines += [f"## 4. bench.py: gradient stability, |d reward / d v| through the one-step prediction and through "
                  f"Direct-Align (mean of {r['stability']['samples']} samples)", ""]
        lines += md_table(["sigma", "one-step", "Direct-Align", "ratio", "predicted", "|dr/dw| one-step", "|dr/dw| DA"],
                          [[f"{x['sigma']:.2f}", f"{x['grad_v_one_step']:.3g}", f"{x['grad_v_direct_align']:.3g}",
                            f"{x['ratio']:.2f}", f"{x['predicted_ratio']:.2f}", f"{x['grad_w_one_step']:.3g}",
                            f"{x['grad_w_direct_align']:.3g}"] for x in stable])
    ro = r.get("rollout") or {}
    if "seconds" in ro:
        pipeline = list(ro["seconds"].values())[1]
        lines += [f"## 5. Rollout against FluxPipeline's loop: {ro['steps']} steps, {ro['resolution']}px, latents out",
                  ""]
        host = ro.get("host_seconds", {})
        lines += md_table(["loop", "s per rollout", "/ FluxPipeline", "host s (until queued)"],
                          [[k, num(v), num(v / pipeline, ".3f"), num(host.get(k))] for k, v in ro["seconds"].items()])
        lines += ["Host s: until the loop returned with its kernels queued; near the rollout's seconds, the loop is "
                  "bound by launching kernels, and the host's speed decides its time.", ""]
        lines += [f"flux.rollout / FluxPipeline on the same weights: {ro['ours_over_pipeline']:.3f} "
                  f"({'not slower' if ro['ours_over_pipeline'] <= 1.02 else 'SLOWER'}, 2% for noise).", ""]
        t = list(ro["seconds"].values())
        if len(t) >= 4:  # the same loops with the precisions swapped
            lines += [f"In the same precision: without autocast ours / FluxPipeline {t[2] / t[1]:.3f}; under bf16 "
                      f"autocast (the release's precision, which train.py keeps) {t[0] / t[3]:.3f}. Autocast "
                      f"costs ours {t[0] / t[2]:.3f}x and FluxPipeline {t[3] / t[1]:.3f}x.", ""]
    ex = extrapolate(cfg, r)
    sa = r.get("sample") or {}
    if "image_s" in sa:
        st = sa["settings"]
        rows = [["this model (measured)", num(sa["image_s"]), num(sa["transformer_s"])]]
        if ex:
            rows.append(["FLUX.1-dev, 19 + 38 blocks (extrapolated by the per-block forward times)",
                         num(ex["sample_image_s"]), num(ex["sample_transformer_s"])])
        lines += [f"## 6. sample.py: {st['height']}x{st['width']}, {st['num_inference_steps']} steps, guidance "
                  f"{st['guidance_scale']}, {st['max_sequence_length']} tokens (mean of {sa['images']} after one)", ""]
        lines += md_table(["model", "s per image (PNG included)", "transformer s per image"], rows)
    if ex:
        factor = ex["train_py_over_bare"]
        scaled = lambda x: num(x * factor, ".1f") if factor else "n/a"  # noqa: E731
        lines += [f"## 7. EXTRAPOLATED to FLUX.1-dev's 19 + 38 blocks at this width ({ex['params'] / 1e9:.1f}B): not "
                  "measured", "",
                  "Per-block costs above times the blocks FLUX.1-dev adds, plus this model's measured phases; the "
                  f"last column multiplies by train.py's FSDP step over the bare step measured here "
                  f"({num(factor, '.2f')}). One prompt per rollout; batch {RELEASE_BATCH}, {RELEASE_STEPS} steps "
                  "as behind the release's model (METHOD.md §5). FSDP's communication is not included (below).", ""]
        rows = [["rollout per prompt, s", num(ex["rollout_s"], ".1f"), scaled(ex["rollout_s"])],
                ["two branches per prompt, s", num(ex["branches_s"], ".1f"), scaled(ex["branches_s"])]]
        for gpus, g in ex["gpus"].items():
            rows += [[f"{gpus} GPUs, {g['prompts_per_gpu']} prompt(s) each: s per optimizer step",
                      num(g["step_s"], ".1f"), scaled(g["step_s"])],
                     [f"{gpus} GPUs: minutes for {RELEASE_STEPS} steps", num(g["minutes"], ".1f"),
                      scaled(g["minutes"])],
                     [f"{gpus} GPUs: memory per rank, plan (GiB)", gib(g["memory_plan"]), ""]]
        lines += md_table(["FLUX.1-dev, extrapolated", "bare model", "x train.py overhead"], rows)
        minutes = ex["gpus"][32]["minutes"] * (factor or 1)
        lines += [f"Press coverage of the paper: about 10 minutes on 32 H20 GPUs. An H20 is not this "
                  f"GPU: about {H20_TFLOPS} dense bf16 TFLOP/s against {H100_TFLOPS} for an H100 or H200 (NVIDIA's "
                  f"spec sheets), so compute-bound parts run up to {H100_TFLOPS / H20_TFLOPS:.1f}x longer there: "
                  f"{minutes:.1f} min here would be up to {minutes * H100_TFLOPS / H20_TFLOPS:.0f} min on H20s, "
                  f"compute alone. FSDP moves about {ex['communication_bytes_per_prompt'] / 1e9:.0f} GB per prompt "
                  "through each rank's links (bf16 all-gathers: rollout once, each branch twice; fp32 "
                  "reduce-scatters: each branch once), overlapped with compute only in part.", ""]
    return "\n".join(lines)


def dump(work, name, result):
    with open(os.path.join(work, f"{name}.json.tmp"), "w") as f:
        json.dump(result, f, indent=1)
    os.replace(os.path.join(work, f"{name}.json.tmp"), os.path.join(work, f"{name}.json"))


def save(cfg, r, out):
    r["memory"] = [dict(term=t, measured=mb, plan=pb) for t, mb, pb in memory_rows(cfg, r)]
    r["extrapolation"] = extrapolate(cfg, r)
    with open(os.path.join(out, "gpu.json"), "w") as f:
        json.dump(r, f, indent=1)
    with open(os.path.join(out, "gpu.md"), "w") as f:
        f.write(report(cfg, r))


# ----------------------------------------------------------------------------------------- the run

def start(command, log, cfg):
    """command in a process group of its own (so a stop reaches its children too), its output appended to log.
    On a CPU (--tiny) each process gets one thread: OpenMP threads stall whenever another process takes one of
    their cores, and the plan runs beside the other sections."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if cfg.tiny else {}))
    with open(log, "a") as f:
        return subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)


def finish(process, timeout, done=lambda: False):
    """Wait for process until it exits, done() holds or timeout seconds pass; stop it in the last two cases."""
    t0 = time.time()
    while process.poll() is None:
        if done() or time.time() - t0 > timeout:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return "ok" if done() else f"stopped after {timeout:.0f} s"
        time.sleep(0.2)
    return "ok" if process.returncode == 0 or done() else f"failed (exit {process.returncode})"


def section_command(name, cfg, work, out):
    return [sys.executable, "-m", "experiments.gpu", "--section", name, "--work", work, "--out", out] \
        + (["--tiny"] if cfg.tiny else [])


def saved(work, name):
    """What a section's process saved: all of it, or what it had when it stopped (bench saves as it goes)."""
    path = os.path.join(work, f"{name}.json")
    return json.load(open(path)) if os.path.isfile(path) else {}


def run_section(name, cfg, work, out, timeout, log):
    written = os.path.getsize(log) if os.path.isfile(log) else 0
    if name.startswith("train-"):
        result = run_train(cfg, work, out, name.removeprefix("train-"), timeout, log)
    else:
        status = finish(start(section_command(name, cfg, work, out), log, cfg), timeout)
        result = dict(saved(work, name), status=status)
    if result["status"] != "ok":  # the last line this section's processes wrote, most often the error
        with open(log, errors="replace") as f:
            f.seek(written)
            lines = [line.rstrip() for line in f if line.strip()]
        result["status"] += ": " + (lines or [""])[-1].strip()[-200:]
        result["log_tail"] = lines[-30:]  # a GPU-only failure is worth its traceback: the next try may be weeks away
    return result


def main(argv=None):
    args = parse_args(argv)
    cfg = types.SimpleNamespace(**(TINY if args.tiny else GPU), tiny=args.tiny)
    if args.section:  # one section's process
        torch.backends.cuda.enable_cudnn_sdp(False)  # as train.py: cuDNN attention's backward failed at this size
        dump(args.work, args.section, SECTION_FUNCTIONS[args.section](cfg, args.work, args.out))
        return
    if args.replan:
        try:
            r = json.load(open(args.replan))
        except (OSError, ValueError) as e:
            fail(f"--replan {args.replan}: cannot read it ({getattr(e, 'strerror', None) or e}; expected a gpu.json "
                 f"this script wrote)")
        if not (isinstance(r, dict) and {"date", "notes", "models"} <= r.keys()):
            fail(f"--replan {args.replan}: expected a gpu.json this script wrote")
        r["plan"] = plan_terms(cfg, None, None)
        r["notes"]["plan"] = f"the plan column recomputed on {datetime.date.today().isoformat()} on a CPU; every " \
                             f"measurement is the run's of {r['date']}"
        os.makedirs(args.out, exist_ok=True)
        save(cfg, r, args.out)
        print(open(os.path.join(args.out, "gpu.md")).read())
        return
    started = time.time()
    os.makedirs(args.out, exist_ok=True)
    work, log = tempfile.mkdtemp(prefix="srpo-gpu-"), os.path.join(args.out, "log.txt")
    r = dict(date=datetime.date.today().isoformat(), config=vars(cfg), seconds={}, notes={})
    plan = start(section_command("plan", cfg, work, args.out), log, cfg)  # CPU only: beside the GPU sections
    try:
        for name, estimate, cap in SECTIONS:
            elapsed = time.time() - started
            if args.sections and name != "models" and name not in args.sections:
                continue
            if elapsed + estimate > cfg.budget_s:
                r["notes"][name] = f"skipped: {elapsed:.0f} s gone, about {estimate} s more would pass the " \
                                   f"{cfg.budget_s} s budget"
            elif name != "models" and "params" not in (r.get("models") or {}):
                r["notes"][name] = "skipped: no models"
            else:
                t0 = time.time()
                r[name] = run_section(name, cfg, work, args.out, min(cap, cfg.deadline_s - elapsed), log)
                r["seconds"][name] = time.time() - t0
                if r[name]["status"] != "ok":
                    r["notes"][name] = r[name]["status"]
            print(f"{time.time() - started:5.0f} s  {name}: {r['notes'].get(name, 'ok')}", flush=True)
            if plan.poll() is not None:
                r["plan"] = saved(work, "plan")
            save(cfg, r, args.out)
        status = finish(plan, max(1, cfg.deadline_s - (time.time() - started)))
        r["plan"] = saved(work, "plan")
        if status != "ok":
            r["notes"]["plan"] = status
        save(cfg, r, args.out)
    finally:
        if plan.poll() is None:
            os.killpg(plan.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)
    print(open(os.path.join(args.out, "gpu.md")).read())
    print(f"gpu: {time.time() - started:.0f} s; {args.out}/gpu.json, gpu.md, log.txt")


if __name__ == "__main__":
    main()
