"""One GPU, FLUX.1-dev's width in bf16 at 720x720: train.py's step time and memory against the memory plan, the
benchmark's step costs and gradient stability, our rollout against FluxPipeline's loop, sample.py's seconds per
image, and from the per-block numbers an extrapolation to FLUX.1-dev's 19 + 38 blocks (METHOD.md §5, §6); then
FLUX.1-dev at its full depth with LoRA, on a bf16 and on a 4-bit base (full-depth).

Each section is a command of its own (a process of its own, so each has its own peak memory) that writes
OUT/SECTION.json; gpu_report.py gathers them into gpu.json and gpu.md. experiments/gpu.sh runs them all in order,
each under a `timeout`: about 8 minutes on an H100, minutes on a CPU with --tiny. One section on its own, once
`models` has written the models to a folder of their own (gigabytes: not in OUT):
    python -m experiments.gpu models --models /tmp/m --out OUT
    timeout 300 python -m experiments.gpu bench --models /tmp/m --out OUT
    python -m experiments.gpu_report --out OUT

The model: FLUX.1-dev's transformer config (width 3072 = 24 heads x 128, T5 width 4096, CLIP width 768) with 2
double + 4 single blocks instead of 19 + 38, so that DDP's 16 bytes per parameter, the activations, the VAE and the
reward fit an 80 GB card; FLUX.1-dev's VAE config; a ViT-H-14-sized CLIPModel as the reward; random weights in
FLUX.1-dev's folder layout (text encoders of the right widths, one layer deep: training caches their output).
full-depth writes the same with all 19 + 38 blocks (11.9B parameters, 24 GB in bf16) into a folder of its own under
--models, and runs train.py --lora-rank 64 --strategy ddp on it, with the bf16 base and with --quantize-base nf4:
    python -m experiments.gpu full-depth --models /tmp/m --out OUT      # about 4 minutes on an H200 (estimated)
"""
import argparse
import datetime
import gc
import json
import math
import os
import shutil
import statistics
import time
import types

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from torch.utils.checkpoint import checkpoint

import sample
import train
from direct_align import euler_step, sigma_schedule
from experiments import bench, stability
from experiments.measure import (CAPTION, FLUX_DEV, VIT_H_14, caption_embeds, held, load_models, memory_watch,
                                 paths, peak, pick_device, reset_peak, run_train_py, seconds, stamp, timed,
                                 write_models)
from flux import autocast, conditioning, decode, latent_noise, rollout, velocity
from srpo import srpo_step
from srpo_reward import control_prompts

GPU = dict(
    layers=2, single_layers=4,       # of FLUX.1-dev's 19 + 38: 1.3B parameters, 16 bytes each under DDP
    heads=24, head_dim=128, text_width=4096, pooled_width=768,  # FLUX.1-dev's
    vae_width=128,                   # FLUX.1-dev's VAE: 128, 256, 512, 512 channels
    reward=VIT_H_14,                 # HPSv2.1's and PickScore's architecture
    resolution=720, text_len=512,    # the release's training size and T5 length (METHOD.md §5)
    train_steps=3,                   # train.py's first step warms up: the median of the others is reported
    lora_rank=64,                    # train-lora: --lora-rank (and alpha) 64 under DDP, the LoRA recipe for one GPU
    repeats=5,                       # timed repeats of each in-process measurement, after one warm-up
    sample_flags=[],                 # sample.py's defaults: 1024 x 1024, 50 steps, guidance 3.5, 512 tokens
    sample_images=3,
    bench_flags=["--repeats", "3"],
    sigmas=[0.9, 0.7, 0.5, 0.3, 0.1],  # of the gradient-stability table
    stability_samples=2,             # noises per sigma (stability.SAMPLES: 4)
    full_depth=(FLUX_DEV["num_layers"], FLUX_DEV["num_single_layers"]),  # full-depth: FLUX.1-dev's 19 + 38 blocks
    full_depth_steps=3,              # of train.py, each base; the median of the steps after the first
)
TINY = dict(
    layers=1, single_layers=2, heads=2, head_dim=16, text_width=32, pooled_width=32, vae_width=8, reward=None,
    resolution=64, text_len=32, train_steps=3, lora_rank=4, repeats=2,
    sample_flags=["--height", "64", "--width", "64", "--num-inference-steps", "8", "--max-sequence-length", "32"],
    sample_images=1, bench_flags=["--repeats", "1"], sigmas=[0.9, 0.5, 0.1], stability_samples=1,
    full_depth=(1, 2), full_depth_steps=3)  # a CPU: FLUX.1-dev's depth at this width takes minutes a run


# ----------------------------------------------------------------------------------------- train.py itself

def train_run(cfg, root, out, name):
    """train.py on one rank for cfg.train_steps steps: name is fsdp, ddp, or lora (rank-64 adapters under DDP, the
    LoRA recipe for one GPU)."""
    flags = ["--resolution", str(cfg.resolution), "--max-sequence-length", str(cfg.text_len),
             "--strategy", "ddp" if name == "lora" else name]
    if name == "lora":
        flags += ["--lora-rank", str(cfg.lora_rank), "--lora-alpha", str(cfg.lora_rank)]
    return train_py_steps(root, out, f"train-{name}", cfg.train_steps, flags, pick_device())


def train_py_steps(root, out, name, steps, flags, device, watch=None):
    """train.py (measure.run_train_py) on the models under root, its metrics copied to OUT/name-metrics.jsonl: the
    medians of the steps after the first, which warms up (kernels, allocator), and the peaks over all steps."""
    rows = run_train_py(root, os.path.join(root, name), steps, flags, device, watch)
    with open(os.path.join(out, f"{name}-metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    median = lambda key: statistics.median(row[key] for row in rows[1:])  # noqa: E731
    top = lambda key: max(row.get(key) or 0 for row in rows) or None  # noqa: E731
    result = dict(steps=len(rows), step_time_s=median("step_time_s"), rollout_s=median("time_rollout_s"),
                  branches_s=median("time_branches_s"), max_memory_gib=top("max_memory_gib"),
                  max_reserved_gib=top("max_reserved_gib"))
    return dict(result, rest_s=result["step_time_s"] - result["rollout_s"] - result["branches_s"])


# ----------------------------------------------------------------------------------------- the step's anatomy

def set_checkpointing(transformer, on):
    (transformer.enable_gradient_checkpointing if on else transformer.disable_gradient_checkpointing)()


def block_costs(m, x, repeats):
    """Per block of each kind: its forward without gradient (a rollout step's), its forward + recomputation +
    backward under checkpointing (a branch's, timed alone on the inputs it saw in the model), and the memory a
    forward with gradient leaves held across it, checkpointing off and on (its bf16 weight copy, which autocast
    keeps for the backward, included). Times are medians over repeats and over blocks of a kind."""
    transformer, device = m.transformer, m.device
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
            total = timed(lambda: velocity(transformer, x, 0.5, m.cond, m.targs.guidance), device)
        return total, [(kind, seconds(a, b), m_b - m_a) for kind, a, m_a, b, m_b in events]

    was_checkpointing = transformer.is_gradient_checkpointing
    forward(False, False)  # warm-up
    runs = [forward(False, False) for _ in range(repeats)]
    out = {kind: dict(forward_s=statistics.median(s for _, blocks in runs for k, s, _ in blocks if k == kind))
           for kind in ("double", "single")}
    out["rest_forward_s"] = statistics.median(total - sum(s for _, s, _ in blocks) for total, blocks in runs)
    for checkpointing, key in ((False, "held"), (True, "held_checkpointed")):
        _, blocks = forward(True, checkpointing)
        for kind in ("double", "single"):
            out[kind][key] = statistics.median(b for k, _, b in blocks if k == kind)
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
        out[kind]["train_s"] = statistics.median(timed(lambda: train_block(block, *inputs[kind]), device)
                                                 for _ in range(repeats))
    transformer.zero_grad(set_to_none=True)
    return out


def fixed_costs(m, x, repeats):
    """A branch's parts besides the transformer, each alone on a leaf input, forward + backward: the VAE decode
    (checkpointed where train.py checkpoints it) and the SRP reward of the decoded image. Seconds (median) and the
    peak above what was held before (the last run)."""
    pos, neg = control_prompts(CAPTION, 0)
    with torch.no_grad():
        image = decode(m.vae, x, m.res)

    def vae_decode():
        decode(m.vae, x.detach().requires_grad_(), m.res).mean().backward()

    def srp_reward():
        with autocast(m.device):
            r = m.reward.srp(image.detach().requires_grad_(), [pos], [neg], 0.1).float()
        r.sum().backward()

    out = {}
    for name, fn in (("vae_decode", vae_decode), ("reward", srp_reward)):
        fn()  # warm-up: cuDNN picks its algorithms
        out[f"{name}_s"] = statistics.median(timed(fn, m.device) for _ in range(repeats))
        before = reset_peak(m.device)
        fn()
        out[f"{name}_peak"] = peak(m.device) - before
    return out


def step_parts(m, noise, step):
    """One train.py step on the bare model, phase by phase: seconds, the peak above what was held when the phase
    began (_peak), what it leaves held (_kept), and the absolute peak (_max)."""
    out, targs = {}, m.targs

    def phase(name, fn):
        before = reset_peak(m.device)
        start = stamp(m.device)
        result = fn()
        out[f"{name}_s"] = seconds(start, stamp(m.device))
        out.update({f"{name}_peak": peak(m.device) - before, f"{name}_kept": held(m.device) - before,
                    f"{name}_max": peak(m.device)})
        return result

    def update():
        torch.nn.utils.clip_grad_norm_(m.transformer.parameters(), targs.max_grad_norm)
        m.optimizer.step()

    x0 = phase("rollout", lambda: rollout(m.transformer, noise, m.cond, targs.rollout_steps, targs.shift,
                                          targs.rollout_guidance))
    phase("branches", lambda: srpo_step(lambda x, s: velocity(m.transformer, x, s, m.cond, targs.guidance),
                                        lambda x: decode(m.vae, x, m.res), m.reward, x0, noise, CAPTION, step,
                                        train.rng(0, "t", step), **train.step_settings(targs),
                                        autocast=lambda: autocast(m.device)))
    # METHOD.md §7: a bf16 cast made without gradient and reused by a pass with it leaves its weight no gradient
    out["weights_without_gradient"] = sum(p.grad is None or not p.grad.any().item()
                                          for p in m.transformer.parameters())
    phase("optimizer", update)
    m.optimizer.zero_grad(set_to_none=True)
    return out


def anatomy(cfg, root, out):
    """The step's parts on the bare model, loaded as train.py loads it for DDP (fp32 weights under bf16 autocast,
    transformer and VAE decoder checkpointed on CUDA): memory after each load, each phase of two steps, each block
    and each fixed part."""
    device = pick_device()
    m = load_models(root, cfg.resolution, cfg.text_len, device, checkpointing=device.type == "cuda")
    noise = latent_noise(cfg.resolution, train.rng(0, "noise", 0), device)
    return dict(weights=m.weights, frozen=m.frozen, blocks=block_costs(m, noise, cfg.repeats),
                fixed=fixed_costs(m, noise, cfg.repeats), steps=[step_parts(m, noise, step) for step in range(2)],
                weight_tensors=len(list(m.transformer.parameters())), rollout_steps=m.targs.rollout_steps,
                branches=2 if m.targs.branches == "both" else 1, checkpointing=device.type == "cuda")


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


def rollout_vs_pipeline(cfg, root, out):
    """flux.rollout against FluxPipeline's own denoising loop on the same transformer: train.py's rollout settings
    (25 steps, guidance 1), the cached embeddings given to both, latents out; interleaved runs after a warm-up.
    On a GPU also each loop in the other's precision, which tells how much of a difference autocast makes. Host
    seconds: until the loop returned with its kernels queued."""
    device = pick_device()
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # as sample.py loads the pipeline
    flux = paths(root)[0]
    targs = train.parse_args(["--model", flux, "--resolution", str(cfg.resolution)])
    embeds = caption_embeds(root, cfg.text_len, device)
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
    host_clock = torch.device("cpu")
    times, host = {key: [] for key in runs}, {key: [] for key in runs}
    for _ in range(cfg.repeats):
        for key, fn in runs.items():
            start = stamp(host_clock)
            times[key].append(timed(lambda: (fn(), host[key].append(seconds(start, stamp(host_clock)))), device))
    median = {key: statistics.median(t) for key, t in times.items()}
    ours, theirs = list(median.values())[:2]
    return dict(steps=n, resolution=cfg.resolution, seconds=median, times=times, ours_over_pipeline=ours / theirs,
                host_seconds={key: statistics.median(t) for key, t in host.items()})


def sample_speed(cfg, root, out):
    """sample.py's render on the reduced model with sample.py's defaults (1024 x 1024, 50 steps, guidance 3.5,
    512 T5 tokens, bf16): seconds per image after one warm-up image, PNG included, and the transformer's share."""
    device = pick_device()
    flux = paths(root)[0]
    args = sample.parse_args(["--model", flux, "--prompt", CAPTION, *cfg.sample_flags])
    pipe = FluxPipeline.from_pretrained(flux, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipe = pipe.to(device)  # as sample.main loads it
    pipe.set_progress_bar_config(disable=True)
    records = [dict(file=f"{i:05d}.png", prompt=CAPTION, seed=args.seed + i, **{k: getattr(args, k) for k in
                    sample.PIPE_ARGS}, model=flux, weights=None) for i in range(cfg.sample_images + 1)]
    calls = []
    hooks = [pipe.transformer.register_forward_pre_hook(lambda *_: calls.append([stamp(device)])),
             pipe.transformer.register_forward_hook(lambda *_: calls[-1].append(stamp(device)) and None)]
    sample.render(pipe, records[:1], os.path.join(root, "samples-warm-up"), 0, 1)
    calls.clear()
    total = timed(lambda: sample.render(pipe, records[1:], os.path.join(root, "samples"), 0, 1), device)
    for h in hooks:
        h.remove()
    n = cfg.sample_images
    return dict(settings={k: getattr(args, k) for k in sample.PIPE_ARGS}, images=n, image_s=total / n,
                transformer_s=sum(seconds(a, b) for a, b in calls) / n)


# ----------------------------------------------------------------------------------------- the benchmark, the plan

def saved_by_row(out, name, result, key, rows):
    """Each of rows appended to result[key] and result saved at once, so that a section stopped by its timeout
    keeps the rows it finished; returns result."""
    for row in rows:
        result[key].append(row)
        save(out, name, dict(result, status=f"stopped after {len(result[key])} rows"))
    return result


def bench_steps(cfg, root, out):
    """bench.py's section 1 on these models and sizes: the step cost of Direct-Align (one and both branches, and
    with LoRA), ReFL and DRaFT-K."""
    args = bench.parse_args(["--resolution", str(cfg.resolution), "--text-len", str(cfg.text_len), *cfg.bench_flags])
    bench.check_args(args)
    result = dict(repeats=args.repeats, draft_k=args.draft_k, rollout_steps=args.rollout_steps, steps=[])
    return saved_by_row(out, "bench", result, "steps", bench.step_costs(args, root))


def stability_rows(cfg, root, out):
    """stability.py on these models and sizes, and its figure, bench_stability.png."""
    device = pick_device()
    m = load_models(root, cfg.resolution, cfg.text_len, device, checkpointing=device.type == "cuda")
    result = dict(samples=cfg.stability_samples, rows=[])
    saved_by_row(out, "stability", result, "rows", stability.on_models(m, cfg.sigmas, cfg.stability_samples))
    stability.plot(result["rows"], os.path.join(out, "bench_stability.png"))
    return result


# ----------------------------------------------------------------------------------------- FLUX.1-dev at full depth

def forward_flops(layers, single_layers, width, text_tokens, image_tokens, text_width, pooled_width, channels=64):
    """FLOPs of one FLUX transformer call, batch 1, counted from its shapes: every nn.Linear, 2 x its weights for
    each token it sees, and attention's two products, QK^T and PV, 2 x 2 N^2 D over all N text + image tokens
    (what torch's FlopCounterMode counts). Not counted: norms, activations, rotary embedding, softmax.
      double block: each stream's q, k, v, output and 4x MLP, 12 D^2 a token; AdaLN-Zero's two D -> 6D
        modulations of the one conditioning vector;
      single block: q, k, v, the MLP's input (D -> 4D) and the output projection (5D -> D), 12 D^2 a token;
        AdaLN's D -> 3D;
      the rest: the image (channels -> D) and text (text_width -> D) embedders, the timestep and guidance
        embedders (256 -> D -> D), the pooled text's (pooled_width -> D -> D), the final AdaLN (D -> 2D) and the
        output projection (D -> channels)."""
    D, N = width, text_tokens + image_tokens
    double = 2 * 12 * D * D * N + 4 * N * N * D + 2 * 2 * 6 * D * D
    single = 2 * 12 * D * D * N + 4 * N * N * D + 2 * 3 * D * D
    rest = 2 * (2 * channels * D * image_tokens + text_width * D * text_tokens + 2 * (256 * D + D * D)
                + pooled_width * D + D * D + 2 * D * D)
    return layers * double + single_layers * single + rest


def full_depth(cfg, root, out):
    """FLUX.1-dev at full depth and width (cfg.full_depth blocks, random weights written in bf16 by save_pretrained
    under ROOT/full-depth), its VAE, a ViT-H-14-sized reward; then train.py --lora-rank cfg.lora_rank --strategy
    ddp on it, a few steps of one prompt at cfg.resolution, first on the bf16 base, then with --quantize-base nf4.
    Per run: the step's time, rollout and branches (medians after the first step), its transformer TFLOP/s
    (forward_flops: one call's FLOPs, times the rollout's calls and, per branch, a forward, its recomputation and a
    backward of 2x), torch's allocated and reserved peaks and the card's (memory_watch)."""
    device, targs = pick_device(), train.parse_args([])
    root = os.path.join(root, "full-depth")
    shutil.rmtree(root, ignore_errors=True)  # a rerun writes them again: 24 GB take about a minute (README)
    os.makedirs(root)
    models = write_models(root, *cfg.full_depth, cfg.heads, cfg.head_dim, cfg.vae_width, cfg.text_width,
                          cfg.pooled_width, cfg.reward, cfg.lora_rank)
    models["written_bytes"] = sum(os.path.getsize(os.path.join(folder, name))
                                  for folder, _, names in os.walk(root) for name in names)
    gc.collect()  # the models written on the GPU: their memory goes back to the card before train.py starts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    forward = forward_flops(*cfg.full_depth, cfg.heads * cfg.head_dim, cfg.text_len, (cfg.resolution // 16) ** 2,
                            cfg.text_width, cfg.pooled_width)
    branches = 2 if targs.branches == "both" else 1
    result = dict(models=models, forward_flops=forward, rollout_steps=targs.rollout_steps, branches=branches,
                  step_flops=forward * (targs.rollout_steps + 4 * branches), runs=[],
                  date=datetime.date.today().isoformat(), config=vars(cfg))

    def run(base):
        flags = ["--resolution", str(cfg.resolution), "--max-sequence-length", str(cfg.text_len), "--strategy", "ddp",
                 "--lora-rank", str(cfg.lora_rank), "--lora-alpha", str(cfg.lora_rank)]
        flags += ["--quantize-base", base] if base != "bf16" else []
        watch, seen = memory_watch(device)
        try:
            r = train_py_steps(root, out, f"full-depth-{base}", cfg.full_depth_steps, flags, device, watch)
        except SystemExit:  # its log's tail is printed; the other base still runs
            return dict(base=base, flags=flags, status=f"failed: train.py {' '.join(flags)} (log.txt)")
        return dict(r, base=base, flags=flags, status="ok", process_gib=seen[0] / 2**30,
                    tflops=result["step_flops"] / r["step_time_s"] / 1e12,
                    rollout_tflops=forward * targs.rollout_steps / r["rollout_s"] / 1e12,
                    branches_tflops=forward * 4 * branches / r["branches_s"] / 1e12)
    return saved_by_row(out, "full-depth", result, "runs", (run(base) for base in ("bf16", "nf4")))


def models(cfg, root, out):
    os.makedirs(root, exist_ok=True)
    return dict(write_models(root, cfg.layers, cfg.single_layers, cfg.heads, cfg.head_dim, cfg.vae_width,
                             cfg.text_width, cfg.pooled_width, cfg.reward, cfg.lora_rank),
                date=datetime.date.today().isoformat(), config=vars(cfg))


SECTIONS = {"models": models,  # in the order gpu.sh runs them
            "train-fsdp": lambda *a: train_run(*a, "fsdp"), "train-ddp": lambda *a: train_run(*a, "ddp"),
            "train-lora": lambda *a: train_run(*a, "lora"), "anatomy": anatomy, "rollout": rollout_vs_pipeline,
            "sample": sample_speed, "stability": stability_rows, "bench": bench_steps, "full-depth": full_depth}


# ----------------------------------------------------------------------------------------- the run

def save(out, name, result):
    """out/name.json, replaced at once: a reader never sees half of it."""
    with open(os.path.join(out, f"{name}.json.tmp"), "w") as f:
        json.dump(result, f, indent=1)
    os.replace(os.path.join(out, f"{name}.json.tmp"), os.path.join(out, f"{name}.json"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=SECTIONS, help="what to measure")
    p.add_argument("--models", required=True, help="folder that the models section writes and the others read")
    p.add_argument("--out", required=True, help="folder of each section's SECTION.json")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: every section on a CPU in minutes")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if os.path.isfile(os.path.join(args.out, f"{args.section}.json")):  # no stale result survives a failed rerun
        os.remove(os.path.join(args.out, f"{args.section}.json"))
    cfg = types.SimpleNamespace(**(TINY if args.tiny else GPU))
    started = time.time()
    result = SECTIONS[args.section](cfg, args.models, args.out)
    save(args.out, args.section, dict(result, status="ok", elapsed_s=time.time() - started))
    print(f"gpu {args.section}: {time.time() - started:.0f} s, {args.out}/{args.section}.json")


if __name__ == "__main__":
    main()
