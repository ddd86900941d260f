"""Does the hacking alarm (judge.py, train.py --judge) tell a run that degrades from a healthy one? On the toy world.

    python -m experiments.toy alarm             # the built toy world, 3 seeds of each run: out/alarm/
    python -m experiments.toy alarm --quick     # the quick world, 1 seed, 4 steps: the mechanics (the tests)

Two runs of train.py itself from the same toy model, +bright -dark, with the world's held-out judge (a CLIP of
another seed trained on other scenes, never used in training) on the world's 16 held-out prompts every EVERY steps:
  healthy:     the toy's SRPO recipe (toy_world.SRPO_LR, SRPO_STEPS steps);
  collapsing:  the same at COLLAPSE times the learning rate, which wrecks the images within the run.
Per run: the steps at which the alarm fires (judge.alarm on the run's own metrics.jsonl, the rule train.py applies),
the judge's best step, and where the held-out images degrade on pixels, a measure neither reward sees: the step
at which their sharpness (hacking.sharpness, the share of contrast that is fine detail) first moves off step 0's by
the factor DEGRADED, up (noise, artifacts) or down (blur, flat color). And the evaluations' share of the run's time,
beside the share planned for FLUX.1-dev from the H100 measurement (planned_share). A false alarm is an alarm in a
healthy run; a missed alarm, a collapsing run without one.
Writes OUT/report.md (the table and the counts), OUT/numbers.json, OUT/alarm_strips.png and, per run, its
metrics.png and eval/strips.png.
"""
import json
import os
import shutil
import time

import numpy as np
import torch
from PIL import Image

import judge
import plots
import train
from experiments.hacking import sharpness
from experiments.toy_world import SRPO_LR, SRPO_STEPS, say, train_argv

EVERY = 4          # evaluations: step 0, then every 4 steps (11 over the 40 steps)
COLLAPSE = 30      # the collapsing run's learning rate, in multiples of the toy's
DEGRADED = 1.25    # held-out images degraded: their mean sharpness off step 0's by this factor, up or down
RUNS = {"healthy": 1, "collapsing": COLLAPSE}
FULL = dict(seeds=(0, 1, 2), steps=SRPO_STEPS, figure_seed=1)  # seed 1: an alarm in each run (experiments/README.md)
QUICK = dict(seeds=(0,), steps=4, figure_seed=0)


def strip_images(path, n):
    """The n held-out images of one eval/step-N.png, as (n, 3, H, W) in [0, 1]."""
    strip = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    return strip.view(3, strip.shape[1], n, -1).permute(2, 0, 1, 3)


def one_run(paths, out, name, seed, steps):
    """train.py's run, then what its metrics.jsonl and eval/ say: {alarms, best, degraded, judge, sharpness}."""
    run = os.path.join(out, f"{name}-seed{seed}")
    shutil.rmtree(run, ignore_errors=True)
    say(f"{name}, seed {seed}: lr {SRPO_LR * RUNS[name]:g}, {steps} steps")
    train.main(train_argv(paths, run, steps=steps, lr=SRPO_LR * RUNS[name]) + [
        "--seed", str(seed), "--judge", "clip", "--judge-path", paths["judge"], "--eval-prompts", paths["eval_prompts"],
        "--eval-every", str(EVERY), "--checkpoint-every", str(steps), "--sample-every", "0"])
    evals = [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "eval_judge" in r]
    alarms = [r["step"] for i, r in enumerate(evals) if judge.alarm(evals[:i], r)]
    sharp = [sharpness(strip_images(os.path.join(run, "eval", f"step-{r['step']:06d}.png"),
                                    len(r["eval_judge_scores"]))).mean().item() for r in evals]
    degraded = next((r["step"] for r, s in zip(evals, sharp) if not 1 / DEGRADED < s / sharp[0] < DEGRADED), None)
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    evaluating = sum(r["eval_time_s"] for r in evals)
    for sub in os.listdir(run):  # keep the pictures and the numbers; the checkpoints are 20 MB each
        if sub.startswith("checkpoint-") or sub == "text_cache":
            shutil.rmtree(os.path.join(run, sub))
    return dict(alarms=alarms, best=judge.best_of(evals)["step"], degraded=degraded,
                steps=[r["step"] for r in evals], judge=[r["eval_judge"] for r in evals],
                judge_ci=[r["eval_judge_ci"] for r in evals], reward=[r["eval_reward"] for r in evals],
                sharpness=sharp, eval_share=evaluating / (evaluating + sum(r.get("step_time_s", 0) for r in rows)))


H100 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu-h100.json")  # gpu.py's, 2026-11-26


def planned_share(prompts=16, every=5, steps=20, gpus=8, measured=H100):
    """The evaluations' share of a FLUX.1-dev run of the release's recipe (batch 32, 720 px, a 25-step rollout),
    from gpu.py's extrapolation to full depth on an H100: a held-out prompt costs a rollout and a VAE decode (a
    50-step sample's time less its transformer's), a training prompt prompt_s; evaluations at step 0 and every
    `every` steps. The two reward forwards per held-out image are not counted (224 px, beside 25 transformer
    forwards at 720 px)."""
    x = json.load(open(measured))["extrapolation"]
    evaluation = -(-prompts // gpus) * (x["rollout_s"] + x["sample_image_s"] - x["sample_transformer_s"])
    training = steps * (32 // gpus) * x["prompt_s"]
    return (steps // every + 1) * evaluation / ((steps // every + 1) * evaluation + training)


def report(results, seeds, steps, seconds):
    """report.md: one row per run, then the counts."""
    rows = ["| run | seed | alarm at steps | judge's best step | images degraded at step | judge: step 0 -> last | "
            "training reward (held-out): step 0 -> last | sharpness: step 0 -> last |", "|" + " --- |" * 8]
    for (name, seed), r in results.items():
        rows.append(f"| {name} | {seed} | {', '.join(map(str, r['alarms'])) or 'none'} | {r['best']} | "
                    f"{r['degraded'] if r['degraded'] is not None else 'not'} | {r['judge'][0]:.4f} -> "
                    f"{r['judge'][-1]:.4f} | {r['reward'][0]:.4f} -> {r['reward'][-1]:.4f} | "
                    f"{r['sharpness'][0]:.4f} -> {r['sharpness'][-1]:.4f} |")
    shares = [r["eval_share"] for r in results.values()]
    false = sum(bool(r["alarms"]) for (name, _), r in results.items() if name == "healthy")
    missed = sum(not r["alarms"] for (name, _), r in results.items() if name == "collapsing")
    early = [r["alarms"][0] - r["degraded"] for (name, _), r in results.items()
             if name == "collapsing" and r["alarms"] and r["degraded"] is not None]
    return "\n".join([
        "# The hacking alarm on the toy world", "",
        f"`python -m experiments.toy alarm` ({'quick world' if steps != FULL['steps'] else 'the built toy world'}): "
        f"seeds {', '.join(map(str, seeds))}, {steps} steps, an evaluation every {EVERY} steps, "
        f"{seconds / 60:.1f} minutes on this CPU ({os.cpu_count()} cores). healthy: lr {SRPO_LR:g}; collapsing: "
        f"lr {SRPO_LR * COLLAPSE:g}. Degraded: the held-out images' sharpness off step 0's by a factor "
        f"{DEGRADED}.", "",
        *rows, "",
        f"False alarms (healthy runs with an alarm): {false} of {len(seeds)}. Missed alarms (collapsing runs "
        f"without one): {missed} of {len(seeds)}. First alarm minus the step the images degraded, collapsing runs: "
        f"{', '.join(f'{d:+d}' for d in early) or 'none to compare'} steps.", "",
        f"Cost: the evaluations took {100 * min(shares):.0f}% to {100 * max(shares):.0f}% of these runs' time (16 "
        f"held-out prompts every {EVERY} steps, batch 1). Planned for FLUX.1-dev (the release's recipe, 16 held-out "
        f"prompts every 5 of 20 steps, extrapolated from the H100 measurement): {100 * planned_share(gpus=8):.1f}% on "
        f"8 GPUs, {100 * planned_share(gpus=1):.1f}% on one.", ""])


def figure(out, results, seed, prompts=8, size=48):
    """OUT/alarm_strips.png: the healthy and the collapsing run of one seed side by side, the first prompts of every
    evaluation, a row each, labeled with the judge's mean and ALARM where it fired."""
    panels = []
    for name in RUNS:
        r = results[name, seed]
        rows, labels = [], []
        for step, mean in zip(r["steps"], r["judge"]):
            images = strip_images(os.path.join(out, f"{name}-seed{seed}", "eval", f"step-{step:06d}.png"), 16)
            rows.append(list(torch.nn.functional.interpolate(images[:prompts], size=(size, size), mode="area")))
            labels.append(f"{step}: {mean:.2f}" + (" ALARM" if step in r["alarms"] else ""))
        panels.append(plots.image_grid(rows, labels, [f"{name}, seed {seed}"], scale=1))
    return plots.save(os.path.join(out, "alarm_strips.png"), *panels)


def comparison(paths, out, size):
    """Every run of RUNS for size's seeds and steps on the world at paths; writes OUT/report.md and numbers.json."""
    t0 = time.time()
    results = {(name, seed): one_run(paths, out, name, seed, size["steps"]) for seed in size["seeds"]
               for name in RUNS}
    text = report(results, size["seeds"], size["steps"], time.time() - t0)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "numbers.json"), "w") as f:
        json.dump({f"{name}-seed{seed}": r for (name, seed), r in results.items()}, f, indent=1)
    figure(out, results, size["figure_seed"])
    print(text)
    return results
