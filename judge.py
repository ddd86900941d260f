"""The held-out judge: a reward that training never sees, scored as the run goes, so a person sees when to stop and
which checkpoint was best (METHOD.md §8). train.py --judge KIND --judge-path PATH.

Every --eval-every steps and at step 0 the current model renders the held-out prompts, each from its own fixed
noise (the same at every evaluation, on any number of ranks), without gradient. The judge scores each image with its
prompt (its plain score, METHOD.md §4); the training reward, with what training moves: its relative score between the
run's control words (relative_score). One image at a time, so the numbers do not depend on how the prompts are split
between ranks. metrics.jsonl gets both means with their 95% intervals over the
prompts and every prompt's score; eval/ keeps the images, one strip per evaluation and all of them stacked in
eval/strips.png; metrics.png draws the curves.

The alarm: the judge clearly below its best while the training reward still rises. Clearly below: over the same
prompts and noises, the 95% interval of the mean of (now - best), prompt by prompt, lies below zero. Still rises:
the training reward's mean on the same images is above its mean at the judge's best evaluation.
"""
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import plots
from srpo_reward import control_prompts


def t_quantile(dof, p=0.975):
    """Student's t quantile: bisection on the CDF, the density integrated by Simpson's rule (good to ~1e-6)."""
    c = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)
    density = lambda x: c * (1 + x * x / dof) ** (-(dof + 1) / 2)  # noqa: E731

    def cdf(t, n=2000):
        h = t / n
        return 0.5 + h / 3 * sum((1 if i in (0, n) else 4 if i % 2 else 2) * density(i * h) for i in range(n + 1))
    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(40):
        lo, hi = (lo, (lo + hi) / 2) if cdf((lo + hi) / 2) >= p else ((lo + hi) / 2, hi)
    return (lo + hi) / 2


def interval(values):
    """(mean, half-width of its two-sided 95% Student-t interval); the half-width is nan for a single value."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, t_quantile(len(values) - 1) * sd / math.sqrt(len(values))


def relative_score(reward, pos_words, neg_words):
    """The part of the training reward that training moves: the SRP reward with k = 0, f_img . (f_pos - f_neg), of
    an image with its prompt behind each pair of the run's control words, averaged over the pairs (METHOD.md §4)."""
    pairs = max(len(pos_words), len(neg_words))

    def score(images, prompt):
        pos, neg = zip(*(control_prompts(prompt, i, pos_words, neg_words) for i in range(pairs)))
        return reward.srp(images.expand(pairs, -1, -1, -1), list(pos), list(neg), 0.0).mean()
    return score


@torch.no_grad()
def evaluate(render, scorers, prompts, rank, world):
    """({name: [score of each prompt]}, the images (N, 3, H, W) on rank 0, None elsewhere). render(i) is prompt i's
    image (3, H, W) in [0, 1], the same on every rank; each rank renders every world-th prompt, padded with repeats
    to one count on all ranks (FSDP2's forwards are collective); scorers: {name: score(images (1, 3, H, W), prompt)}."""
    share = -(-len(prompts) // world)
    mine = [rank + world * j for j in range(share)]
    done = []
    for i in mine:
        image = render(min(i, len(prompts) - 1))
        if i < len(prompts):
            scores = {name: float(score(image[None], prompts[i])) for name, score in scorers.items()}
            done.append((i, (image.clamp(0, 1) * 255).round().byte().cpu(), scores))
    parts = [None] * world  # the scores to every rank (each decides the alarm), the images to rank 0 alone
    dist.all_gather_object(parts, [(i, s) for i, _, s in done])
    scores = [s for _, s in sorted(item for part in parts for item in part)]
    images = [None] * world if rank == 0 else None
    dist.gather_object([(i, image) for i, image, _ in done], images, dst=0)
    if rank == 0:
        images = torch.stack([image for _, image in sorted(item for part in images for item in part)])
    return {name: [s[name] for s in scores] for name in scorers}, images


def summary(scores):
    """metrics.jsonl's fields of an evaluation: eval_NAME (the mean), eval_NAME_ci ([low, high], 95%) and
    eval_NAME_scores (each prompt's), for each scorer."""
    row = {}
    for name, values in scores.items():
        mean, half = interval(values)
        row.update({f"eval_{name}": mean, f"eval_{name}_ci": [mean - half, mean + half],
                    f"eval_{name}_scores": values})
    return row


def best_of(rows, steps=None):
    """The evaluated row with the judge's highest mean, among steps if given; None if there is none."""
    rows = [r for r in rows if "eval_judge" in r and (steps is None or r["step"] in steps)]
    return max(rows, key=lambda r: r["eval_judge"], default=None)


def alarm(rows, row):
    """(the best row before row, the interval (mean, half) of now - best over the prompts) if the judge is clearly
    below its best while the training reward on the same images is above its value there; else None."""
    best = best_of(rows)
    if best is None or len(row["eval_judge_scores"]) != len(best["eval_judge_scores"]):
        return None
    mean, half = interval([a - b for a, b in zip(row["eval_judge_scores"], best["eval_judge_scores"])])
    if mean + half < 0 and row["eval_reward"] > best["eval_reward"]:
        return best, (mean, half)
    return None


def alarm_line(row, best, diff, judge, best_checkpoint):
    """The one line the alarm prints."""
    return (f"hacking alarm at step {row['step']}: the judge ({judge}) is at {row['eval_judge']:.4f}, below its best "
            f"{best['eval_judge']:.4f} at step {best['step']} (now - best {diff[0]:+.4f} +/- {diff[1]:.4f} over "
            f"{len(row['eval_judge_scores'])} held-out prompts), while the training reward rose "
            f"{best['eval_reward']:.4f} -> {row['eval_reward']:.4f}; best checkpoint so far: {best_checkpoint}")


def draw_metrics(path, rows):
    """metrics.png: training reward per branch, loss and gradient norm against step; the judge's and the training
    reward's means on the held-out prompts with their intervals, against the evaluated steps."""
    panels = []
    trained = [r for r in rows if "loss" in r]
    if trained:
        xs = [r["step"] for r in trained]
        branches = {f"reward, {n}": [r[f"reward_{n}"] for r in trained] for n in ("denoise", "inversion")
                    if all(r.get(f"reward_{n}") is not None for r in trained)}
        panels += [plots.line_plot(xs, branches, "step", "training reward (SRP), batch mean", size=(480, 260)),
                   plots.line_plot(xs, {"loss": [r["loss"] for r in trained]}, "step", "loss", size=(480, 260)),
                   plots.line_plot(xs, {"gradient norm": [r["grad_norm"] for r in trained]}, "step",
                                   "gradient norm (before clipping)", size=(480, 260))]
    evals = [r for r in rows if "eval_judge" in r]
    if evals:
        xs = [r["step"] for r in evals]
        for name, label in (("judge", "the judge, held-out prompts"),
                            ("reward", "training reward (SRP, k 0), held-out")):
            panels.append(plots.line_plot(xs, {name: [r[f"eval_{name}"] for r in evals]}, "step",
                                          label + ", mean and 95% interval", size=(480, 260),
                                          intervals={name: [r[f"eval_{name}_ci"] for r in evals]}))
    if panels:
        plots.save(path, *panels, columns=3)


def draw_strips(folder, rows, size=96):
    """folder/strips.png: the held-out images of every evaluation in rows, one row per step (oldest on top),
    each image shrunk to size pixels; read back from folder/step-N.png."""
    strips, labels = [], []
    for r in (r for r in rows if "eval_judge" in r):
        path = os.path.join(folder, f"step-{r['step']:06d}.png")
        if not os.path.isfile(path):
            continue
        strip = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
        n = len(r["eval_judge_scores"])
        images = strip.view(3, strip.shape[1], n, strip.shape[2] // n).permute(2, 0, 1, 3)
        strips.append(list(F.interpolate(images, size=(size, size), mode="area")))
        labels.append(f"step {r['step']}: {r['eval_judge']:.3f}")
    if strips:
        plots.image_grid(strips, labels, [f"prompt {i}" for i in range(len(strips[0]))], scale=1).save(
            os.path.join(folder, "strips.png"))


def save_strip(path, images):
    """The held-out images (N, 3, H, W) uint8 side by side, as one PNG, renamed into place when written: strips.png
    reads it back, after a crash too."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(torch.cat(list(images), dim=2).permute(1, 2, 0).numpy()).save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)
