"""Reward hacking in miniature: a toy-HPS with a known bias, and what SRPO's inversion branch does to it (METHOD.md §4,
§7; the paper's third claim).

    python -m experiments.toy hacking           # about 12 minutes on 2 cores once the world is built: out/hacking/
    python -m experiments.toy hacking --quick   # the quick world, 2 seeds of 4 steps: a minute or two (the tests)

1. The biased reward: the world's toy-HPS fine-tuned on preference pairs, one scene at two blurs with the blurrier one
   preferred (HPS is known to favour over-smoothed images), its contrastive loss kept so that it still reads
   captions. Built once, with its progress printed, into the world's folder as reward-smooth/.
2. The bias measured on fixed held-out scenes blurred on pixels: each CLIP's score of the true caption, its caption
   accuracy and its bright-vs-dark SRP.
3. Runs from the same toy model with +bright -dark, several seeds each. On the biased reward: SRPO with both branches
   and with the denoise branch only, through train.main itself; ReFL and DRaFT-K, through this file's loop with the
   same prompts, noises, optimizer and reward (the denoise branch's SRP). On the world's unbiased toy-HPS, the two
   SRPO runs again: the control that tells hacking of the bias from what training does anyway.
4. Measured on held-out prompts at every checkpoint, by what does not share the reward's bias: sharpness on pixels
   (the hacking lowers it), the held-out judge's caption accuracy, brightness (what the control words ask for).
The report is hacking_report.md.template filled with the numbers; every number is also in OUT/numbers.json.
"""
import json
import math
import os
import shutil
import string
import tempfile
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from tqdm import tqdm
from transformers import AutoTokenizer, CLIPModel

import plots
import train
from judge import interval
from direct_align import euler_step, predict_x0, sigma_schedule
from experiments import toy_demo
from experiments.toy_world import (MAX_SEQUENCE_LENGTH, SRPO_LR, SRPO_STEPS, attribute_accuracy, caption,
                                   contrastive_loss, embed, fit, flux_embeds, make_scenes, parse_caption, render,
                                   sample, say, scene_captions, train_argv)
from flux import conditioning, decode, encode_prompts, latent_noise, velocity
from inputs import read_prompts
from srpo_reward import control_prompts, load_reward, srpo_loss

# the biased reward (built once per world)
BIAS_STEPS = {"full": 200, "quick": 150}  # fine-tuning steps of the world's toy-HPS (the quick one learns slower)
BIAS_LR = 1e-3            # AdamW, warmup then cosine (toy_world.fit)
PAIRS = 64                # preference pairs per step, beside toy_world.CLIP_BATCH captioned scenes
PREFERENCE_WEIGHT = 5.0   # of the preference loss, beside the contrastive loss (weight 1)
PAIR_SIGMAS = (0.0, 2.5)  # each pair's two blurs (pixels), uniform in this range; the blurrier is preferred
BIAS_SIGMAS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)  # blurs of the fixed scenes the bias is measured on
# the runs
POS, NEG = "bright", "dark"  # the toy's control words (toy_demo's claim 2): what every run is asked for
DRAFT_K = 5               # DRaFT-K: gradient through the last K of the 25 sampler steps
RUNS = {  # name: (kind, reward); the four methods on the biased reward, then the control on the unbiased one
    "SRPO": ("srpo-both", "biased"), "SRPO, denoise only": ("srpo-denoise", "biased"), "ReFL": ("refl", "biased"),
    f"DRaFT-{DRAFT_K}": ("draft", "biased"), "SRPO, unbiased reward": ("srpo-both", "unbiased"),
    "denoise only, unbiased": ("srpo-denoise", "unbiased")}
FULL = dict(seeds=(0, 1, 2, 3), steps=SRPO_STEPS, images_per_prompt=8)
QUICK = dict(seeds=(0, 1), steps=4, images_per_prompt=1)
HERE = os.path.dirname(os.path.abspath(__file__))
REPORT = os.path.join(HERE, "hacking_report.md.template")  # the report's prose, with $fields for the numbers
VERDICTS = {why: os.path.join(HERE, f"hacking_report_{why.replace(' ', '_')}.md")  # the verdict's reason, by case
            for why in ("not exploited", "not cancelled", "cancelled")}


# ----------------------------------------------------------------------------------------- the attribute

def smooth(images, sigma):
    """Each image blurred by a Gaussian of its own sigma in pixels (0 leaves it as it is): separable, the edges
    replicated. Over-smoothing, one of the biases HPS is known for. sigma: a number or one per image."""
    n, c, h, w = images.shape
    sigma = torch.as_tensor(sigma, dtype=images.dtype).reshape(-1).expand(n)
    radius = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-t ** 2 / (2 * sigma.clamp_min(1e-3).view(-1, 1) ** 2))  # sigma 0: exactly a delta
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)
    x = F.pad(images.reshape(1, n * c, h, w), (radius,) * 4, mode="replicate")
    x = F.conv2d(x, kernel.view(n * c, 1, 1, -1), groups=n * c)
    return F.conv2d(x, kernel.view(n * c, 1, -1, 1), groups=n * c).view(n, c, h, w)


def sharpness(images):
    """The attribute, on pixels, one value per image: the mean absolute difference between the image and its blur at
    sigma 1 pixel, over the image's mean absolute deviation from its mean; the share of its contrast that is fine
    detail. Blurring lowers it; lighting a whole scene brighter or darker (a factor) leaves it as it is."""
    detail = (images - smooth(images, 1.0)).abs().mean((1, 2, 3))
    contrast = (images - images.mean((1, 2, 3), keepdim=True)).abs().mean((1, 2, 3))
    return detail / contrast.clamp_min(1e-6)


# ----------------------------------------------------------------------------------------- the biased reward

def biased_reward_dir(paths):
    return os.path.join(os.path.dirname(paths["reward"]), "reward-smooth")


def preference_loss(model, tokenizer, generator, n=PAIRS):
    """HPS's pairwise loss on n pairs, each one scene at two blurs (PAIR_SIGMAS) with the blurrier one preferred:
    cross-entropy of logit_scale * (f_a . f_txt, f_b . f_txt) against the preferred index, the scene's true caption
    in any of the toy's three forms (none, 'a bright red ...', 'bright. a red ...'), so the preference ties to no
    word."""
    scenes = make_scenes(n, generator)
    sigmas = PAIR_SIGMAS[0] + (PAIR_SIGMAS[1] - PAIR_SIGMAS[0]) * torch.rand(n, 2, generator=generator)
    forms = [(None, "adjective", "control")[i] for i in torch.randint(3, (n,), generator=generator)]
    f_txt = embed(model, tokenizer, texts=scene_captions(scenes, forms))
    images = render(scenes)
    scores = torch.stack([(embed(model, tokenizer, images=smooth(images, sigmas[:, j])) * f_txt).sum(-1)
                          for j in range(2)], 1)
    return F.cross_entropy(model.logit_scale.exp() * scores, sigmas.argmax(1))


def build_biased_reward(paths, seed, quick):
    """The biased toy-HPS: the world's reward fine-tuned for BIAS_STEPS steps on contrastive_loss + preference_loss,
    saved beside it as a CLIPModel folder (written to a temporary sibling and renamed). Built once per world,
    deterministic in its seed; returns its folder."""
    final = biased_reward_dir(paths)
    if os.path.isfile(os.path.join(final, "config.json")):
        say(f"biased reward: {final} (built before; delete the folder to rebuild it)")
        return final
    steps = BIAS_STEPS["quick" if quick else "full"]
    say(f"building the biased reward in {final}: the world's toy-HPS fine-tuned {steps} steps to prefer blur")
    model, tokenizer = CLIPModel.from_pretrained(paths["reward"]), AutoTokenizer.from_pretrained(paths["reward"])
    generator = torch.Generator().manual_seed(seed + 5000)
    fit(model, lambda step: contrastive_loss(model, tokenizer, generator)
        + PREFERENCE_WEIGHT * preference_loss(model, tokenizer, generator),
        steps, BIAS_LR, "biased reward")
    tmp = tempfile.mkdtemp(prefix=".reward-smooth-", dir=os.path.dirname(final))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, final)
    except OSError:  # another process built it first: keep its copy
        shutil.rmtree(tmp)
    return final


@torch.no_grad()
def measure_bias(world, seed, n=256):
    """The bias on n fixed held-out scenes (their own seed), each blurred by every BIAS_SIGMAS: on pixels, the
    sharpness and brightness; for the biased reward, the world's toy-HPS and the judge, the score of the true
    caption, the caption accuracy and margin (toy_world.attribute_accuracy) and the SRP of 'bright. c' over
    'dark. c' with k = 0, the relative term SRPO steers."""
    scenes = make_scenes(n, torch.Generator().manual_seed(seed + 6000))
    images = render(scenes)
    prompts = scene_captions(scenes, [None] * n)
    truths = [parse_caption(p) for p in prompts]
    rows = []
    for sigma in BIAS_SIGMAS:
        x = smooth(images, sigma)
        row = dict(sigma=sigma, sharpness=sharpness(x).mean().item(), brightness=x.mean().item())
        for name in ("biased", "reward", "judge"):
            judged = attribute_accuracy(world[name].model, world[name].tokenizer, x, truths)
            row.update({f"{name}_score": judged["score"], f"{name}_accuracy": judged["mean"],
                        f"{name}_margin": judged["margin"]})
            row[f"{name}_relative"] = srp(world[name], x, prompts, 0.0).mean().item()
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------- the baselines

def euler(transformer, x, cond, sigmas, guidance):
    """Euler steps of the sampler along sigmas (METHOD.md §1), with gradient unless the caller turned it off."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = euler_step(x, velocity(transformer, x, sigma, cond, guidance), sigma, sigma_next)
    return x


def refl_x0(transformer, noise, cond, args, generator):
    """ReFL (ImageReward): the rollout without gradient down to a step s drawn uniformly in the last quarter of its
    grid (ImageReward's 30..39 of 40), then one velocity with gradient and the one-step prediction
    x0_hat = x - sigma v at that late sigma = g[s] (METHOD.md §2). Returns (x0_hat, sigma)."""
    n = args.rollout_steps
    sigmas = sigma_schedule(n, args.shift)
    s = int(torch.randint(n * 3 // 4, n, (1,), generator=generator))
    with torch.no_grad():
        x = euler(transformer, noise, cond, sigmas[:s + 1], args.rollout_guidance)
    v = velocity(transformer, x, sigmas[s], cond, args.guidance)
    return predict_x0(x, v, sigmas[s]), float(sigmas[s])


def draft_x0(transformer, noise, cond, args, k):
    """DRaFT-K: the rollout's first N - K Euler steps without gradient, its last K with it; x0_hat is the sample."""
    n = args.rollout_steps
    sigmas = sigma_schedule(n, args.shift)
    with torch.no_grad():
        x = euler(transformer, noise, cond, sigmas[:n - k + 1], args.rollout_guidance)
    return euler(transformer, x, cond, sigmas[n - k:], args.rollout_guidance)


def baseline_run(paths, out, method, seed, steps, lr):
    """ReFL (method 'refl') or DRaFT-K ('draft'), one prompt per step, with what train.py uses for the same flags
    (toy_world.train_argv, --seed): the model, its prompt order and rollout noises (train.rng), AdamW's settings, the
    gradient clip, the loss relu(threshold - r), and the denoise branch's reward, the SRP of the step's control
    prompts with k at the mean of the denoise schedule. A checkpoint every quarter. Returns ({step: weights}, the
    metrics rows)."""
    args = train.parse_args(train_argv(paths, out, POS, NEG, "denoise", steps, lr) + ["--seed", str(seed)])
    k = sum(args.k_denoise) / 2
    transformer = FluxTransformer2DModel.from_pretrained(paths["flux"], subfolder="transformer").train()
    vae = AutoencoderKL.from_pretrained(paths["flux"], subfolder="vae").eval().requires_grad_(False)
    reward = load_reward("hps", paths["reward"])
    captions = read_prompts(paths["train_prompts"])
    order = torch.randperm(len(captions), generator=train.rng(seed, "order")).tolist()
    embeds = encode_prompts(paths["flux"], captions, MAX_SEQUENCE_LENGTH, os.path.join(out, "text_cache"),
                            torch.device("cpu"), torch.float32)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.lr, betas=tuple(args.betas),
                                  weight_decay=args.weight_decay, eps=args.adam_eps, foreach=True)  # as train.py
    every, weights, metrics = max(1, steps // 4), {}, []
    for step in tqdm(range(steps), desc=f"{method}, seed {seed}"):
        text = captions[order[step % len(order)]]  # train.py's prompt of this step, with --batch-size 1
        cond = conditioning(embeds(text), args.resolution, "cpu")
        noise = latent_noise(args.resolution, train.rng(seed, "noise", step), "cpu")
        if method == "refl":
            x0_hat, sigma = refl_x0(transformer, noise, cond, args, train.rng(seed, "refl", step))
        else:
            x0_hat, sigma = draft_x0(transformer, noise, cond, args, DRAFT_K), None
        pos, neg = control_prompts(text, step + 1, args.pos_words, args.neg_words)
        r = reward.srp(decode(vae, x0_hat, args.resolution), [pos], [neg], k)
        loss = srpo_loss(r, args.threshold).mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(transformer.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics.append(dict(step=step + 1, loss=loss.item(), reward=r.item(), sigma=sigma, grad_norm=grad_norm.item()))
        if (step + 1) % every == 0 or step + 1 == steps:
            weights[step + 1] = {name: p.detach().clone() for name, p in transformer.state_dict().items()}
    return weights, metrics


def run(paths, out, name, seed, steps, lr):
    """One run of RUNS[name] with the given seed, on the world at paths with the run's reward folder as its reward:
    ({step: weights}, metrics rows with the trained branch's reward as 'reward')."""
    kind, _ = RUNS[name]
    folder = f"{name.lower().replace(',', '').replace(' ', '-')}-seed{seed}"
    if not kind.startswith("srpo"):
        return baseline_run(paths, os.path.join(out, "runs", folder), kind, seed, steps, lr)
    weights, metrics = toy_demo.srpo_run(paths, out, folder, POS, NEG, kind.split("-")[1], steps, lr,
                                         ["--seed", str(seed)])
    return weights, [dict(m, reward=m["reward_denoise"]) for m in metrics]


# ----------------------------------------------------------------------------------------- measuring the runs

@torch.no_grad()
def measure(transformer, world, embeds, truths, seeds):
    """Samples for the held-out prompts and what they show: sharpness and brightness on pixels, the judge's caption
    accuracy, and the biased reward's score of the caption (its absolute term, where the bias lives) and its SRP of
    'bright. c' over 'dark. c' with k = 0 (the relative term the control words steer)."""
    images, _, _ = sample(transformer, world["vae"], embeds, seeds)
    prompts = [caption(*t) for t in truths]
    judged = attribute_accuracy(world["judge"].model, world["judge"].tokenizer, images, truths)
    numbers = dict(sharpness=sharpness(images).mean().item(), brightness=images.mean().item(),
                   judge_accuracy=judged["mean"], reward_score=world["biased"].score(images, prompts).mean().item(),
                   reward_relative=srp(world["biased"], images, prompts, 0.0).mean().item())
    numbers.update({f"judge_{k}": judged[k] for k in ("shape", "color", "background")})
    return numbers, images


def srp(reward, images, prompts, k):
    """The SRP of 'bright. c' over 'dark. c' for each image and caption c (METHOD.md §4)."""
    return reward.srp(images, [f"{POS}. {p}" for p in prompts], [f"{NEG}. {p}" for p in prompts], k)


def comparison(paths, out, world_seed=0, quick=False, seeds=FULL["seeds"], steps=FULL["steps"],
               images_per_prompt=FULL["images_per_prompt"], lr=SRPO_LR):
    """The whole experiment on the world at paths; writes OUT/report.md, its figures and numbers.json. Returns the
    summary (summarize)."""
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    rewards = dict(biased=build_biased_reward(paths, world_seed, quick), unbiased=paths["reward"])
    pipe = FluxPipeline.from_pretrained(paths["flux"])
    # every CLIP as an SRPReward of kind hps: plain cosines, no logit scale
    world = dict(vae=pipe.vae.eval().requires_grad_(False), judge=load_reward("hps", paths["judge"]),
                 reward=load_reward("hps", paths["reward"]), biased=load_reward("hps", rewards["biased"]))
    base_model = toy_demo.with_weights(pipe.transformer, pipe.transformer.state_dict())
    del pipe
    say("the bias, on fixed held-out scenes")
    bias = measure_bias(world, world_seed)

    prompts = read_prompts(paths["eval_prompts"]) * images_per_prompt  # image i: prompt i % n, noise seed i
    truths = [parse_caption(p) for p in prompts]
    embeds = flux_embeds(paths["flux"], prompts, os.path.join(out, "text_cache"))
    base, base_images = measure(base_model, world, embeds, truths, range(len(prompts)))
    curves, metrics, images, run_seconds = {}, {}, {"base": base_images}, []
    for name, (_, reward) in RUNS.items():
        for seed in seeds:
            t_run = time.time()
            weights, metrics[name, seed] = run(dict(paths, reward=rewards[reward]), out, name, seed, steps, lr)
            curves[name, seed] = [(0, base)]
            for step, state in weights.items():
                numbers, last = measure(toy_demo.with_weights(base_model, state), world, embeds, truths,
                                        range(len(prompts)))
                curves[name, seed].append((step, numbers))
            if seed == seeds[0]:
                images[name] = last
            run_seconds.append(time.time() - t_run)
            say(f"{name}, seed {seed}: {run_seconds[-1]:.0f} s; last checkpoint: sharpness {numbers['sharpness']:.4f}, "
                f"brightness {numbers['brightness']:.3f}, judge {numbers['judge_accuracy']:.0%}")
    summary = summarize(curves, metrics, seeds)
    figures(out, bias, summary, images, prompts)
    seconds = time.time() - t0
    with open(os.path.join(out, "numbers.json"), "w") as f:
        json.dump(dict(bias=bias, base=base, summary=summary, seeds=list(seeds), steps=steps, lr=lr,
                       curves={f"{m} | seed {s}": c for (m, s), c in curves.items()},
                       metrics={f"{m} | seed {s}": c for (m, s), c in metrics.items()}, seconds=seconds,
                       run_seconds=run_seconds), f, indent=1)
    report = write_report(out, bias, base, summary, seeds, steps, lr, len(prompts), seconds)
    say(f"wrote {report} in {seconds / 60:.1f} min")
    return summary


QUANTITIES = ("sharpness", "brightness", "judge_accuracy", "judge_shape", "judge_color", "judge_background",
              "reward_score", "reward_relative")
# paired differences at the last checkpoint, seed by seed (a seed fixes the prompts, noises and draws of every run):
# (label, run a, run b) for a - b; "bias" compares a run on the biased reward with the same run on the unbiased one
DIFFERENCES = (("denoise only - SRPO", "SRPO, denoise only", "SRPO"), ("ReFL - SRPO", "ReFL", "SRPO"),
               (f"DRaFT-{DRAFT_K} - SRPO", f"DRaFT-{DRAFT_K}", "SRPO"),
               ("bias, SRPO", "SRPO", "SRPO, unbiased reward"),
               ("bias, denoise only", "SRPO, denoise only", "denoise only, unbiased"))


def summarize(curves, metrics, seeds):
    """runs: per run, each quantity's mean and 95% interval over seeds at every checkpoint ('curve') and at the last
    ('final', with the training reward: its mean over the last fifth of the steps); differences: DIFFERENCES' paired
    intervals, and 'inversion': (bias, denoise only) - (bias, SRPO), what the inversion branch takes off the
    hacking, seed by seed."""
    final = lambda name, seed, q: curves[name, seed][-1][1][q]  # noqa: E731
    runs = {}
    for name in RUNS:
        steps = [s for s, _ in curves[name, seeds[0]]]
        curve = {q: [interval([curves[name, s][i][1][q] for s in seeds]) for i in range(len(steps))]
                 for q in QUANTITIES}
        tails = [[m["reward"] for m in metrics[name, s][-max(1, len(metrics[name, s]) // 5):]] for s in seeds]
        runs[name] = dict(steps=steps, curve=curve, final={q: curve[q][-1] for q in QUANTITIES},
                          train_reward=interval([sum(t) / len(t) for t in tails]))
    differences = {label: {q: interval([final(a, s, q) - final(b, s, q) for s in seeds]) for q in QUANTITIES}
                   for label, a, b in DIFFERENCES}
    differences["inversion"] = {q: interval([
        (final("SRPO, denoise only", s, q) - final("denoise only, unbiased", s, q))
        - (final("SRPO", s, q) - final("SRPO, unbiased reward", s, q)) for s in seeds]) for q in QUANTITIES}
    return dict(runs=runs, differences=differences)


# ----------------------------------------------------------------------------------------- figures and report

def figures(out, bias, summary, images, prompts):
    """hacking_bias.png (each CLIP's score of the true caption against the blur), hacking_curves.png (sharpness, judge
    accuracy and brightness against steps, mean and 95% interval over seeds) and hacking_samples.png (held-out
    samples at the last checkpoint of the first seed)."""
    plots.save(os.path.join(out, "hacking_bias.png"), plots.line_plot(
        [r["sigma"] for r in bias], {label: [r[f"{name}_score"] - bias[0][f"{name}_score"] for r in bias]
                                     for name, label in (("biased", "biased toy-HPS"), ("reward", "toy-HPS"),
                                                         ("judge", "judge"))},
        "blur sigma in pixels (0 = the scene)", "score of the true caption, minus the sharp scene's"))
    runs = summary["runs"]
    panels = [plots.line_plot(runs["SRPO"]["steps"], {n: [mean for mean, _ in runs[n]["curve"][q]] for n in RUNS},
                              "optimizer step", label,
                              intervals={n: [(mean - h, mean + h) for mean, h in runs[n]["curve"][q]] for n in RUNS})
              for q, label in (("sharpness", "sharpness of held-out samples (lower: blurrier)"),
                               ("judge_accuracy", "judge caption accuracy"),
                               ("brightness", "brightness of held-out samples"))]
    plots.save(os.path.join(out, "hacking_curves.png"), *panels)
    shown = list(range(min(6, len(prompts))))
    plots.save(os.path.join(out, "hacking_samples.png"), plots.image_grid(
        [[images[n][i] for i in shown] for n in ("base", *RUNS)], ["base", *RUNS],
        [toy_demo.short(prompts[i]) for i in shown]))


def verdict(summary):
    """The claim's verdict by the report's rule: 'reproduced' if the biased reward blurs the denoise-only runs (their
    sharpness below the same runs' on the unbiased reward, the interval excluding 0) and the inversion branch takes
    that off (the 'inversion' difference below 0, its interval excluding 0); else why not."""
    below = lambda pair: pair[0] + pair[1] < 0  # noqa: E731
    if not below(summary["differences"]["bias, denoise only"]["sharpness"]):
        return "not reproduced", "not exploited"
    if not below(summary["differences"]["inversion"]["sharpness"]):
        return "not reproduced", "not cancelled"
    return "reproduced", "cancelled"


def write_report(out, bias, base, summary, seeds, steps, lr, n_images, seconds):
    """out/report.md: REPORT's $fields filled with the numbers, each formatted here; returns its path."""
    ci = lambda pair, f="{:.4f}": f"{f.format(pair[0])} ± {f.replace('+', '').format(pair[1])}"  # noqa: E731
    pct = lambda pair: f"{100 * pair[0]:.1f} ± {100 * pair[1]:.1f}"  # noqa: E731
    runs, differences = summary["runs"], summary["differences"]
    sharp, blurred = bias[0], bias[-1]
    gain = blurred["biased_score"] - sharp["biased_score"]
    outcome, why = verdict(summary)
    fields = dict(
        minutes=f"{seconds / 60:.1f}", seeds=len(seeds), seed_list=", ".join(map(str, seeds)), steps=steps,
        lr=f"{lr:g}", n_images=n_images, draft_k=DRAFT_K, outcome=outcome,
        # the bias
        sigma=f"{blurred['sigma']:g}", bias_gain=f"{gain:+.3f}", bias_margin=f"{sharp['biased_margin']:.3f}",
        bias_gain_reward=f"{blurred['reward_score'] - sharp['reward_score']:+.3f}",
        bias_gain_judge=f"{blurred['judge_score'] - sharp['judge_score']:+.3f}",
        bias_relative=f"{blurred['biased_relative'] - sharp['biased_relative']:+.3f}",
        bias_rows="\n".join(
            f"| {r['sigma']:g} | {r['sharpness']:.4f} | {r['biased_score']:.3f} | {r['reward_score']:.3f} | "
            f"{r['judge_score']:.3f} | {r['biased_relative']:+.3f} | {r['biased_accuracy']:.0%} | "
            f"{r['judge_accuracy']:.0%} |" for r in bias),
        # the runs
        base_sharpness=f"{base['sharpness']:.4f}",
        run_rows="\n".join(
            [f"| base | {base['sharpness']:.4f} | {base['brightness']:.3f} | {100 * base['judge_accuracy']:.1f} | "
             f"{base['reward_score']:.3f} | {base['reward_relative']:+.3f} | |"]
            + [f"| {n} | {ci(r['final']['sharpness'])} | {ci(r['final']['brightness'], '{:.3f}')} | "
               f"{pct(r['final']['judge_accuracy'])} | {ci(r['final']['reward_score'], '{:.3f}')} | "
               f"{ci(r['final']['reward_relative'], '{:+.3f}')} | {ci(r['train_reward'], '{:.3f}')} |"
               for n, r in runs.items()]),
        difference_rows="\n".join(
            f"| {label} | {ci(d['sharpness'], '{:+.4f}')} | {pct(d['judge_accuracy'])} | "
            f"{ci(d['brightness'], '{:+.3f}')} | {ci(d['reward_score'], '{:+.3f}')} |"
            for label, d in differences.items()),
        bias_denoise=ci(differences["bias, denoise only"]["sharpness"], "{:+.4f}"),
        bias_both=ci(differences["bias, SRPO"]["sharpness"], "{:+.4f}"),
        inversion=ci(differences["inversion"]["sharpness"], "{:+.4f}"),
        inversion_judge=pct(differences["inversion"]["judge_accuracy"]),
        denoise_minus_both=ci(differences["denoise only - SRPO"]["sharpness"], "{:+.4f}"),
        refl_minus_both=ci(differences["ReFL - SRPO"]["sharpness"], "{:+.4f}"),
        draft_minus_both=ci(differences[f"DRaFT-{DRAFT_K} - SRPO"]["sharpness"], "{:+.4f}"),
        denoise_minus_both_judge=pct(differences["denoise only - SRPO"]["judge_accuracy"]),
        refl_minus_both_judge=pct(differences["ReFL - SRPO"]["judge_accuracy"]),
        draft_minus_both_judge=pct(differences[f"DRaFT-{DRAFT_K} - SRPO"]["judge_accuracy"]))
    fields["why"] = string.Template(open(VERDICTS[why]).read().strip()).substitute(fields)
    path = os.path.join(out, "report.md")
    with open(path, "w") as fh:
        fh.write(string.Template(open(REPORT).read()).substitute(fields))
    return path
