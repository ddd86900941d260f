"""The paper's three claims measured in miniature on the toy world (toy_world.py), with train.py's own loop.

    python -m experiments.toy demo      # about 2.5 minutes on 2 cores after the build: out/toy/report.md, figures

1. Direct-Align recovers structure from a very noisy state: held-out real scenes noised to sigma 0.99 .. 0.1, the
   one-step prediction x0_hat = x - sigma v against Direct-Align's one step recovered with the known noise.
2. Control words steer the reward: SRPO with +bright -dark and +dark -bright, judged on held-out prompts by
   brightness and by the held-out judge's caption accuracy.
3. The inversion branch limits reward hacking: the same two runs with --branches denoise.
The report is toy_report.md.template filled with the numbers; every number is also in out/toy/numbers.json.
"""
import copy
import json
import os
import shutil
import string
import time

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPModel

import plots
import train
from direct_align import direct_align, inject_noise, predict_x0
from experiments.toy_world import (RESOLUTION, SRPO_LR, attribute_accuracy, caption, encode, flux_embeds,
                                   make_scenes, parse_caption, render, sample, say, scene_captions, train_argv)
from flux import conditioning, decode, velocity
from srpo_reward import load_reward

DEMO_SEEDS = 8            # eval images per held-out prompt
CLAIM1_SIGMAS = (0.99, 0.95, 0.9, 0.75, 0.5, 0.25, 0.1)
CLAIM1_STEP = 0.02        # Direct-Align's step sigma -> sigma - 0.02, about the training gap (METHOD.md §3)
JUDGE_MARGIN = 0.05       # claim 2 holds if the judge's caption accuracy falls by at most 5 points
RUNS = {  # name: (positive words, negative words, branches)
    "bright": ("bright", "dark", "both"), "dark": ("dark", "bright", "both"),
    "bright, denoise only": ("bright", "dark", "denoise"), "dark, denoise only": ("dark", "bright", "denoise")}
HERE = os.path.dirname(os.path.abspath(__file__))
REPORT = os.path.join(HERE, "toy_report.md.template")  # the report's prose, with $fields for the numbers
# the report's claim 3 line when the claim does not hold, with what the toy lacks to show it
CLAIM3_NOT_REPRODUCED = os.path.join(HERE, "toy_report_claim3_not_reproduced.md")


# ----------------------------------------------------------------------------------------- measuring

def load_clip(path):
    model = CLIPModel.from_pretrained(path).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(path)


def with_weights(transformer, state):
    """A copy of transformer holding state rounded to bf16: train.py's checkpoints are bf16, and the base is
    rounded the same way, so that base and SRPO differ only by training."""
    model = copy.deepcopy(transformer)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()})
    return model.eval().requires_grad_(False)


def measure(transformer, world, embeds, truths, seeds):
    """Samples for the held-out prompts and what they show: mean brightness, the judge's caption accuracy and
    score, and the toy-HPS preference for 'bright. {caption}' over 'dark. {caption}' (the SRP with k = 0)."""
    images, _, _ = sample(transformer, world["vae"], embeds, seeds)
    judged = attribute_accuracy(*world["judge"], images, truths)
    prompts = [caption(*t) for t in truths]
    with torch.no_grad():
        bright = world["reward"].srp(images, [f"bright. {p}" for p in prompts], [f"dark. {p}" for p in prompts], 0.0)
    numbers = dict(brightness=images.mean().item(), judge_accuracy=judged["mean"], judge_score=judged["score"],
                   reward_bright=bright.mean().item())
    numbers.update({f"judge_{k}": judged[k] for k in ("shape", "color", "background")})
    return numbers, images


def claim1(world, n, seed):
    """Recovery from high noise (METHOD.md §2) on n held-out real scenes: x0 their VAE latents, a fresh known noise,
    x = (1 - sigma) x0 + sigma noise; then the one-step prediction x - sigma v against Direct-Align's one step
    to sigma - CLAIM1_STEP recovered with the known noise. Pixel MSE against the decoded x0, and the judge's
    caption accuracy of what each recovers."""
    base, vae = world["base"], world["vae"]
    scenes = make_scenes(n, torch.Generator().manual_seed(seed + 4000))
    prompts = scene_captions(scenes, [None] * n)
    truths = [parse_caption(p) for p in prompts]
    x0 = encode(vae, render(scenes))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 4001))
    cond = conditioning(flux_embeds(world["flux_dir"], prompts, world["text_cache"]), RESOLUTION, "cpu")
    v_fn = lambda x, s: velocity(base, x, s, cond, 3.5)  # noqa: E731
    rows, pictures = [], []
    with torch.no_grad():
        clean = decode(vae, x0, RESOLUTION)
        for sigma in CLAIM1_SIGMAS:
            x = inject_noise(x0, noise, sigma)
            one_step = decode(vae, predict_x0(x, v_fn(x, sigma), sigma), RESOLUTION)
            aligned = decode(vae, direct_align(v_fn, x0, noise, sigma, sigma - CLAIM1_STEP), RESOLUTION)
            rows.append(dict(sigma=sigma, mse_one_step=F.mse_loss(one_step, clean).item(),
                             mse_direct_align=F.mse_loss(aligned, clean).item(),
                             judge_one_step=attribute_accuracy(*world["judge"], one_step, truths)["mean"],
                             judge_direct_align=attribute_accuracy(*world["judge"], aligned, truths)["mean"]))
            pictures.append((decode(vae, x, RESOLUTION), one_step, aligned))
    return rows, clean, pictures, attribute_accuracy(*world["judge"], clean, truths)["mean"]


def srpo_run(paths, out, name, pos, neg, branches, steps, lr, extra_argv=()):
    """One SRPO run through train.py's own loop, the release's recipe (METHOD.md §3-§5) but for the learning rate and
    the toy's sizes (toy_world.train_argv), then extra_argv (e.g. --seed); a checkpoint every quarter. Returns
    ({step: weights}, the metrics rows)."""
    run = os.path.join(out, "runs", name.replace(" ", "-"))
    shutil.rmtree(run, ignore_errors=True)
    every = max(1, steps // 4)
    say(f"SRPO run '{name}': --pos-words {pos} --neg-words {neg} --branches {branches}", *extra_argv)
    train.main(train_argv(paths, run, pos, neg, branches, steps, lr)
               + ["--checkpoint-every", str(every), "--sample-every", "0", *extra_argv])
    weights = {}
    for s in sorted({*range(every, steps + 1, every), steps}):
        weights[s] = load_file(os.path.join(run, f"checkpoint-{s}", "diffusion_pytorch_model.safetensors"))
        shutil.rmtree(os.path.join(run, f"checkpoint-{s}", "state"))  # --resume's optimizer state: 20 MB each
    return weights, [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def load_world(paths, out):
    """The world's models for measuring: its VAE, judge, toy-HPS reward and base transformer (bf16-rounded,
    with_weights), and where the text embeddings are cached (out/text_cache)."""
    pipe = FluxPipeline.from_pretrained(paths["flux"])
    return dict(vae=pipe.vae.eval().requires_grad_(False), judge=load_clip(paths["judge"]),
                reward=load_reward("hps", paths["reward"]), base=with_weights(pipe.transformer,
                                                                              pipe.transformer.state_dict()),
                flux_dir=paths["flux"], text_cache=os.path.join(out, "text_cache"))


def held_out(paths, world, seeds_per_prompt):
    """The evaluation set: the held-out prompts, each with seeds_per_prompt noise seeds; image i is prompt
    i % len(prompts) from seed i. (prompts, every image's prompt, seeds, (shape, color, background) truths,
    their FLUX embeddings)."""
    prompts = [line.strip() for line in open(paths["eval_prompts"]) if line.strip()]
    prompts_x = prompts * seeds_per_prompt
    truths = [parse_caption(p) for p in prompts_x]
    return prompts, prompts_x, range(len(prompts_x)), truths, flux_embeds(paths["flux"], prompts_x,
                                                                           world["text_cache"])


def demo(paths, out, steps, lr=SRPO_LR, seeds_per_prompt=DEMO_SEEDS):
    """The three claims, measured on the world at paths; writes out/report.md and its figures."""
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    world = load_world(paths, out)
    prompts, prompts_x, seeds, truths, embeds = held_out(paths, world, seeds_per_prompt)

    say("claim 1: recovery from high noise")
    rows1, clean, pictures, clean_judge = claim1(world, 64, 0)
    shown = (0, 1, 2)
    plots.save(os.path.join(out, "claim1.png"), plots.image_grid(
        [[clean[i] for i in shown for _ in range(3)]] + [[p[j][i] for i in shown for j in range(3)] for p in pictures],
        ["clean x0"] + [f"sigma {s}" for s in CLAIM1_SIGMAS], ["noisy x", "one-step", "Direct-Align"] * len(shown)))
    plots.save(os.path.join(out, "claim1_error.png"), plots.line_plot(
        [r["sigma"] for r in rows1], {"one-step x - sigma v": [r["mse_one_step"] for r in rows1],
                                      "Direct-Align": [r["mse_direct_align"] for r in rows1]},
        "sigma of the noisy state", "pixel MSE against the clean x0", ylim=(0, None)))

    say("claims 2 and 3: SRPO through train.py")
    base, base_images = measure(world["base"], world, embeds, truths, seeds)
    curves, finals, images, metrics = {}, {"base": base}, {"base": base_images}, {}
    for name, (pos, neg, branches) in RUNS.items():
        weights, metrics[name] = srpo_run(paths, out, name, pos, neg, branches, steps, lr)
        curves[name] = [(0, base)]
        for step, state in weights.items():
            numbers, images[name] = measure(with_weights(world["base"], state), world, embeds, truths, seeds)
            curves[name].append((step, numbers))
        finals[name] = curves[name][-1][1]
        tail = metrics[name][-max(1, len(metrics[name]) // 5):]
        finals[name]["train_reward"] = sum(r["reward_denoise"] for r in tail) / len(tail)
    show = list(range(8))
    labels = [short(prompts_x[i]) for i in show]
    plots.save(os.path.join(out, "claim2.png"), plots.image_grid(
        [[images[n][i] for i in show] for n in ("base", "bright", "dark")],
        ["base", "SRPO +bright -dark", "SRPO +dark -bright"], labels))
    plots.save(os.path.join(out, "claim3.png"), plots.image_grid(
        [[images[n][i] for i in show] for n in ("base", *RUNS)], ["base", *RUNS], labels))
    xs = [s for s, _ in curves["bright"]]
    plots.save(os.path.join(out, "claim2_brightness.png"), plots.line_plot(
        xs, {n: [m["brightness"] for _, m in curves[n]] for n in RUNS}, "SRPO step",
        "mean brightness of held-out samples"))
    plots.save(os.path.join(out, "claim3_judge.png"), plots.line_plot(
        xs, {n: [m["judge_accuracy"] for _, m in curves[n]] for n in RUNS}, "SRPO step",
        "judge caption accuracy (chance 0.28)", ylim=(0.25, 1)))
    report = write_report(out, finals, curves, rows1, clean_judge, steps, lr, len(prompts), seeds_per_prompt,
                          time.time() - t0)
    with open(os.path.join(out, "numbers.json"), "w") as f:
        json.dump(dict(claim1=rows1, clean_judge=clean_judge, final=finals, curves=curves, steps=steps, lr=lr), f,
                  indent=1)
    say(f"wrote {report} in {time.time() - t0:.0f} s")
    return finals, rows1


# ----------------------------------------------------------------------------------------- the report

def short(prompt):
    shape, color, background = parse_caption(prompt)
    return f"{color} {shape}/{background}"


def verdicts(finals, rows1):
    """Each claim's yes / no, by the rules the report states."""
    base = finals["base"]
    at = next(r for r in rows1 if r["sigma"] == 0.95)
    drop = lambda name: base["judge_accuracy"] - finals[name]["judge_accuracy"]  # noqa: E731
    return {
        "1": at["mse_direct_align"] < at["mse_one_step"] and at["judge_direct_align"] >= at["judge_one_step"],
        "2 direction": finals["bright"]["brightness"] > base["brightness"] > finals["dark"]["brightness"],
        "2 margin": max(drop("bright"), drop("dark")) <= JUDGE_MARGIN,
        "3": all(drop(f"{d}, denoise only") - drop(d) > JUDGE_MARGIN for d in ("bright", "dark")),
    }


def write_report(out, n, curves, rows1, clean_judge, steps, lr, n_prompts, seeds_per_prompt, seconds):
    """out/report.md: REPORT's $fields filled with the numbers, each formatted here; returns its path."""
    v = verdicts(n, rows1)
    base, at = n["base"], {r["sigma"]: r for r in rows1}
    f3 = lambda x: f"{x:.3f}"  # noqa: E731
    pct = lambda x: f"{x:.0%}"  # noqa: E731
    is_ = lambda ok: "is" if ok else "is not"  # noqa: E731
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    drop = lambda name: base["judge_accuracy"] - n[name]["judge_accuracy"]  # noqa: E731

    def moved(name):  # "-6 points (most in color)"
        worst = max(("shape", "color", "background"), key=lambda k: base[f"judge_{k}"] - n[name][f"judge_{k}"])
        return f"{round(-100 * drop(name)):+d} points" + (f" (most in {worst})" if drop(name) > 0.005 else "")

    margin = f"{100 * JUDGE_MARGIN:.0f}"
    claim3 = (f"- **Claim 3 is reproduced**: without the inversion branch the judge's accuracy falls by more than "
              f"{margin} points more, in both directions." if v["3"] else
              open(CLAIM3_NOT_REPRODUCED).read().rstrip("\n"))
    fields = dict(
        minutes=f"{seconds / 60:.1f}", n_prompts=n_prompts, seeds_per_prompt=seeds_per_prompt, steps=steps,
        lr=f"{lr:g}", n_images=n_prompts * seeds_per_prompt, margin=margin, claim1_step=CLAIM1_STEP,
        clean_judge=pct(clean_judge), claim3=claim3,
        # the claims table and its conclusions
        mse_one_step=f"{at[0.95]['mse_one_step']:.4f}", mse_direct_align=f"{at[0.95]['mse_direct_align']:.4f}",
        ratio_95=f"{at[0.95]['mse_one_step'] / at[0.95]['mse_direct_align']:.0f}",
        ratio_99=f"{at[0.99]['mse_one_step'] / at[0.99]['mse_direct_align']:.1f}",
        judge_one_step_95=pct(at[0.95]["judge_one_step"]), judge_direct_align_95=pct(at[0.95]["judge_direct_align"]),
        base_brightness=f3(base["brightness"]), bright_brightness=f3(n["bright"]["brightness"]),
        dark_brightness=f3(n["dark"]["brightness"]), base_judge=pct(base["judge_accuracy"]),
        judge_bright=pct(n["bright"]["judge_accuracy"]), judge_dark=pct(n["dark"]["judge_accuracy"]),
        judge_bright_denoise=pct(n["bright, denoise only"]["judge_accuracy"]),
        judge_dark_denoise=pct(n["dark, denoise only"]["judge_accuracy"]),
        moved_bright=moved("bright"), moved_dark=moved("dark"),
        yes_1=yes(v["1"]), yes_2_direction=yes(v["2 direction"]), yes_2_margin=yes(v["2 margin"]), yes_3=yes(v["3"]),
        is_1=is_(v["1"]), is_2_direction=is_(v["2 direction"]), is_2_margin=is_(v["2 margin"]),
        # the tables of sections 1 to 3
        claim1_rows="\n".join(
            f"| {r['sigma']} | {r['mse_one_step']:.4f} | {r['mse_direct_align']:.4f} | "
            f"{r['mse_one_step'] / r['mse_direct_align']:.1f}x | {pct(r['judge_one_step'])} | "
            f"{pct(r['judge_direct_align'])} |" for r in rows1),
        run_rows="\n".join(
            f"| {name} | {f3(r['brightness'])} | {pct(r['judge_accuracy'])} | {pct(r['judge_shape'])} | "
            f"{pct(r['judge_color'])} | {pct(r['judge_background'])} | {f3(r['judge_score'])} | "
            f"{r['reward_bright']:+.3f} | {f3(r['train_reward']) if 'train_reward' in r else ''} |"
            for name, r in n.items()),
        curve_rows="\n".join(
            ["| step | " + " | ".join(curves) + " |", "| --- |" + " --- |" * len(curves)]
            + [f"| {step} | " + " | ".join(f"{f3(curves[k][i][1]['brightness'])} / "
                                          f"{pct(curves[k][i][1]['judge_accuracy'])}" for k in curves) + " |"
               for i, (step, _) in enumerate(curves["bright"])]))
    path = os.path.join(out, "report.md")
    with open(path, "w") as fh:
        fh.write(string.Template(open(REPORT).read()).substitute(fields))
    return path
