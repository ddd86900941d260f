r"""What Direct-Align costs per training step against ReFL and DRaFT-K, and what train.py adds to the parts a step
cannot avoid, on a FLUX-architecture model with random weights; with the gradient-stability claim and FLUX.1-dev's
memory plan (arXiv 2509.06942).

    python -m experiments.bench --quick                  # tiny model, one repeat: about a minute on a 2-core CPU
    python -m experiments.bench --json bench.json        # a small FLUX-shaped model, 3 repeats: 1.5 min on 2 cores
    python -m experiments.bench --device cuda --resolution 720 --layers 2 --single-layers 4 --heads 24 --head-dim 128 \
        --vae-width 128 --text-len 512       # a GPU: CUDA events and torch.cuda.max_memory_allocated
Four sections, one markdown table each:
1. one training step of Direct-Align (one branch, both), ReFL and DRaFT-K on the same model, each method in its own
   process: time and peak memory, as ratios to Direct-Align;
2. stability.py: the reward's gradient through Direct-Align and through the one-step prediction x0 = x - sigma v;
3. train.py's own step against the sum of the parts it cannot avoid, each timed alone (goal: at most 1.15x);
4. plan.py: FLUX.1-dev's memory per rank for 1, 8, 16, 32 GPUs under FSDP and DDP, with and without checkpointing.
Times are this machine's and vary; the ratios and the memory plan are the point.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

import train
from direct_align import euler_step, predict_x0, sigma_schedule
from experiments import plan, stability
from experiments.measure import (CAPTION, load_models, machine, md_table, peak, pick_device, reset_peak, run_train_py,
                                 srp_reward, timed, write_models)
from flux import autocast, decode, latent_noise, rollout, velocity
from inputs import fail
from srpo import BRANCHES, srpo_step
from srpo_reward import control_prompts, srpo_loss

LORA_RANK = 16              # section 1's LoRA on the small bench model (width 128)
MIB = 2**20


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
    if not all(stability.branch_gap() < s < 1 for s in args.sigmas):
        fail(f"--sigmas {args.sigmas}: each must lie in ({stability.branch_gap():.3f}, 1), the branch gap below 1")


# ----------------------------------------------------------------------------------------- 1. cost of a step

def sample(m, x, sigmas):
    """Euler steps of the current model along sigmas (METHOD.md §1); with gradient unless the caller turned it off."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = euler_step(x, velocity(m.transformer, x, sigma, m.cond, m.targs.rollout_guidance), sigma, sigma_next)
    return x


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
        srpo_loss(srp_reward(m, x0_hat, step), m.targs.threshold).mean().backward()
    torch.nn.utils.clip_grad_norm_([p for p in m.transformer.parameters() if p.requires_grad], m.targs.max_grad_norm)
    m.optimizer.step()
    m.optimizer.zero_grad(set_to_none=True)


def method_cost(args, root, method, k):
    """Runs in a fresh process: load, one warm-up step (lazy inits), then args.repeats timed steps.
    peak_mem_mb: the process's peak over all steps; step_mem_mb: that peak above what it held before them (the
    first step's grads, AdamW states, activations: a CPU allocator keeps freed memory, so later steps show less)."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    lora_rank = LORA_RANK if method.endswith("_lora") else 0
    m = load_models(root, args.resolution, args.text_len, pick_device(args.device), args.gradient_checkpointing,
                    lora_rank, args.rollout_steps)
    before = reset_peak(m.device)
    train_step(m, method, k, 0)
    times = [timed(lambda: train_step(m, method, k, step), m.device) for step in range(1, args.repeats + 1)]
    most = peak(m.device)
    return dict(method=method, k=k, lora_rank=lora_rank, time_s=statistics.median(times), times_s=times,
                peak_mem_mb=most / MIB, step_mem_mb=(most - before) / MIB)


def step_costs(args, root):
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
            row = pool.submit(method_cost, args, root, method, k).result()
            base = base or row
            yield dict(row, time_ratio=row["time_s"] / base["time_s"],
                       mem_ratio=row["step_mem_mb"] / base["step_mem_mb"])


def table(steps):
    """Section 1's rows as markdown."""
    names = dict(direct_align="Direct-Align, 1 branch", direct_align_both="Direct-Align, both branches",
                 direct_align_both_lora="Direct-Align, both branches, LoRA rank {lora_rank}", refl="ReFL",
                 draft="DRaFT-{k}")
    return md_table(["method", "steps with grad", "time s", "x Direct-Align", "peak MiB", "step MiB", "x Direct-Align"],
                    [[names[r["method"]].format(**r), r["k"], f"{r['time_s']:.3f}", f"{r['time_ratio']:.2f}",
                      f"{r['peak_mem_mb']:.0f}", f"{r['step_mem_mb']:.0f}", f"{r['mem_ratio']:.2f}"] for r in steps])


# ----------------------------------------------------------------------------------------- 3. train.py's overhead

def overhead(args, root, m):
    """Section 3: the median step_time_s of real train.py runs (FSDP, its default, and DDP, each on one rank, both
    branches) on the same model files, against the parts a step cannot avoid, each timed alone on the bare modules."""
    train_step_s = {}
    for strategy in ("fsdp", "ddp"):
        rows = run_train_py(root, os.path.join(root, f"train-{strategy}"), args.repeats + 1, [
            "--strategy", strategy, "--resolution", str(args.resolution), "--max-sequence-length", str(args.text_len),
            "--rollout-steps", str(args.rollout_steps),
            "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"], m.device)
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


# ----------------------------------------------------------------------------------------- the run

def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the processes started below: methods, train.py
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = pick_device(args.device)
    started, host = time.time(), machine(device)
    root = tempfile.mkdtemp(prefix="srpo-bench-")
    try:
        write_models(root, args.layers, args.single_layers, args.heads, args.head_dim, args.vae_width)
        print(f"machine: {host}\nmodel: FLUX architecture, random weights, {args.layers} double + "
              f"{args.single_layers} single blocks of {args.heads}x{args.head_dim}, VAE width {args.vae_width}, "
              f"{args.resolution}px, {args.text_len} text tokens, {args.rollout_steps} sampler steps, gradient "
              f"checkpointing {'on' if args.gradient_checkpointing else 'off'}; median of {args.repeats}\n")

        print("## 1. One training step (rollout, the steps with gradient, VAE decode, reward, AdamW)\n")
        steps = list(step_costs(args, root))
        print(table(steps))
        print("peak: the process's peak " + ("allocated GPU memory" if device.type == "cuda" else "resident memory")
              + " over its steps; step: that peak above what it held before them (grads, AdamW states, "
              "activations).\n")

        m = load_models(root, args.resolution, args.text_len, device, args.gradient_checkpointing,
                        rollout_steps=args.rollout_steps)
        print(f"## 2. Reward gradient vs sigma, one-step prediction against Direct-Align to sigma - "
              f"{stability.branch_gap():.4f} (mean of {stability.SAMPLES} samples)\n")
        stable = list(stability.on_models(m, args.sigmas))
        print(stability.table(stable))
        stability.plot(stable, args.plot)

        print("\n## 3. train.py's step against its necessary parts, each timed alone\n")
        over = overhead(args, root, m)
        over["functions_s"] = steps[1]["time_s"]
        parts = [[name, f"{s:.3f}", ""] for name, s in over["parts_s"].items()]
        print(md_table(["part", "time s", "/ parts"], parts + [
            ["**sum of the parts**", f"{over['parts_sum_s']:.3f}", "1.00"],
            ["train.py's rollout + srpo_step + AdamW, bare model (section 1)", f"{over['functions_s']:.3f}",
             f"{over['functions_s'] / over['parts_sum_s']:.2f}"],
            ["train.py step, --strategy fsdp (default)", f"{over['train_step_s']['fsdp']:.3f}", f"{over['ratio']:.2f}"],
            ["train.py step, --strategy ddp", f"{over['train_step_s']['ddp']:.3f}", f"{over['ratio_ddp']:.2f}"]]))
        print(f"train.py / parts: {over['ratio']:.2f}x (goal: at most {over['goal']}x)\n")

        print("## 4. FLUX.1-dev memory per rank, GiB\n")
        memory = plan.flux_dev_plan()
        print(plan.table(memory))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"bench: {time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=host, args=vars(args), steps=steps, stability=stable, overhead=over,
                           memory_plan=memory), f, indent=2)


if __name__ == "__main__":
    main()
