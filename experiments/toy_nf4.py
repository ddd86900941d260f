"""LoRA trained on a 4-bit base against LoRA trained on the full-precision base, in the toy world (toy_world.py):
what train.py --quantize-base nf4 changes, measured as the demo measures (toy_demo.measure).

    python -m experiments.toy nf4       # a few minutes on 2 cores once the world is built: out/toy-nf4/report.md

Two runs of train.py's own loop (train.main) with the demo's recipe (+bright -dark, both branches, one prompt a step)
and LoRA adapters of rank RANK, the same seed and steps, --strategy ddp: one on the world's fp32 transformer, one
with --quantize-base nf4 (flux.quantize_nf4: every linear layer's weight in NF4, dequantized to fp32 for each matmul
on a CPU). Each LoRA is measured on the base it trained on (QLoRA's convention, sample.py --quantize-base nf4 --lora),
the nf4 run's also on the fp32 base, and the two bases alone; every number goes to out/numbers.json, the report
(toy_nf4_report.md.template filled in) to out/report.md.
"""
import json
import os
import shutil
import string
import time

import bitsandbytes as bnb
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file

import train
from experiments import toy_demo
from experiments.measure import machine, md_table
from experiments.toy_world import SRPO_STEPS, say, train_argv
from flux import quantize_nf4

RANK = 16                 # of the toy transformer's width 128
LR = 1e-4                 # train.py's LoRA default (RECIPES["lora"]): lora_B starts at zero
BASES = ("fp32", "nf4")
REPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_nf4_report.md.template")
CPU = torch.device("cpu")


def lora_run(paths, out, base, steps, lr):
    """train.py --lora-rank RANK --strategy ddp on the world, with --quantize-base nf4 where base is nf4, +bright
    -dark; returns (its LoRA file, its metrics, a dict a step)."""
    run = os.path.join(out, "runs", base)
    shutil.rmtree(run, ignore_errors=True)
    say(f"LoRA rank {RANK} on the {base} base: {steps} steps at lr {lr:g}")
    train.main(train_argv(paths, run, steps=steps, lr=lr) + [
        "--lora-rank", str(RANK), "--strategy", "ddp", "--checkpoint-every", "0", "--sample-every", "0",
        *(["--quantize-base", base] if base != "fp32" else [])])
    shutil.rmtree(os.path.join(run, f"checkpoint-{steps}", "state"))  # --resume's optimizer state
    return (os.path.join(run, f"checkpoint-{steps}", "pytorch_lora_weights.safetensors"),
            [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))])


def transformer(paths, base, lora=None):
    """The world's transformer as sample.py loads it on a CPU: fp32, quantized (--quantize-base nf4), with a LoRA
    file's adapters (--lora)."""
    pipe = FluxPipeline.from_pretrained(paths["flux"])
    if base == "nf4":
        quantize_nf4(pipe.transformer, CPU, torch.float32)
    if lora:
        pipe.load_lora_weights(lora)
    return pipe.transformer.eval()


def weight_error(paths):
    """||W_nf4 - W|| / ||W|| over every linear layer's weight of the world's transformer: what quantization does to
    the base."""
    model = FluxTransformer2DModel.from_pretrained(paths["flux"], subfolder="transformer")
    full = {name: m.weight.detach().clone() for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    quantize_nf4(model, CPU, torch.float32)
    error = sum((bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state) - full[name]).square().sum()
                for name, m in model.named_modules() if name in full)
    return (error / sum(w.square().sum() for w in full.values())).sqrt().item()


def lora_update(path):
    """A LoRA file's update of every adapted layer, (alpha / rank) B A with alpha = rank, flattened into one vector."""
    state = load_file(path)
    return torch.cat([(state[k.replace(".lora_A.", ".lora_B.")] @ state[k]).flatten()
                      for k in sorted(state) if ".lora_A." in k])


def paired(a, b):
    """mean(a - b) over paired images, with its 95% normal interval's half-width."""
    d = a - b
    return d.mean().item(), 1.96 * d.std().item() / len(d) ** 0.5


def comparison(paths, out, steps=SRPO_STEPS, lr=LR, seeds_per_prompt=toy_demo.DEMO_SEEDS):
    """Both runs, every model measured, the differences; writes out/numbers.json and out/report.md."""
    os.makedirs(out, exist_ok=True)
    t0, host = time.time(), machine(CPU)
    world = toy_demo.load_world(paths, out)
    prompts, _, seeds, truths, embeds = toy_demo.held_out(paths, world, seeds_per_prompt)
    loras, metrics = {}, {}
    for base in BASES:
        loras[base], metrics[base] = lora_run(paths, out, base, steps, lr)
    models = {"base, fp32": ("fp32", None), "base, nf4": ("nf4", None), "LoRA on the fp32 base": ("fp32", "fp32"),
              "LoRA on the nf4 base": ("nf4", "nf4"), "LoRA trained on nf4, on the fp32 base": ("fp32", "nf4")}
    numbers, brightness = {}, {}
    for name, (base, trained_on) in models.items():
        say(f"measuring {name}")
        numbers[name], images = toy_demo.measure(transformer(paths, base, loras.get(trained_on)), world, embeds,
                                                 truths, seeds)
        brightness[name] = images.mean((1, 2, 3))
        if trained_on:
            tail = metrics[trained_on][-max(1, steps // 5):]
            numbers[name]["train_reward"] = sum(r["reward_denoise"] for r in tail) / len(tail)
    pairs = {"LoRA on nf4 - LoRA on fp32 (the comparison)": ("LoRA on the nf4 base", "LoRA on the fp32 base"),
             "base nf4 - base fp32 (quantization alone)": ("base, nf4", "base, fp32"),
             "LoRA on fp32 - base fp32 (training, fp32)": ("LoRA on the fp32 base", "base, fp32"),
             "LoRA on nf4 - base nf4 (training, nf4)": ("LoRA on the nf4 base", "base, nf4"),
             "nf4-trained LoRA on fp32 - LoRA on fp32": ("LoRA trained on nf4, on the fp32 base",
                                                         "LoRA on the fp32 base")}
    differences = {what: dict(brightness=paired(brightness[a], brightness[b]),
                              **{k: numbers[a][k] - numbers[b][k] for k in ("judge_accuracy", "judge_score",
                                                                            "reward_bright")})
                   for what, (a, b) in pairs.items()}
    update = {base: lora_update(loras[base]) for base in BASES}
    result = dict(machine=host, date=time.strftime("%Y-%m-%d"), steps=steps, lr=lr, rank=RANK,
                  seed=train.parse_args([]).seed,
                  n_prompts=len(prompts), seeds_per_prompt=seeds_per_prompt, numbers=numbers,
                  differences=differences, weight_error=weight_error(paths),
                  lora_cosine=torch.nn.functional.cosine_similarity(*update.values(), dim=0).item(),
                  lora_norms={base: u.norm().item() for base, u in update.items()}, seconds=time.time() - t0)
    with open(os.path.join(out, "numbers.json"), "w") as f:
        json.dump(result, f, indent=1)
    report = write_report(out, result)
    say(f"wrote {report} in {result['seconds']:.0f} s")
    return result


def write_report(out, r):
    """out/report.md: REPORT filled with the numbers; returns its path."""
    train_reward = lambda n: f"{n['train_reward']:.3f}" if "train_reward" in n else ""  # noqa: E731
    fields = dict(
        minutes=f"{r['seconds'] / 60:.1f}", machine=r["machine"], date=r["date"], steps=r["steps"], lr=f"{r['lr']:g}",
        rank=r["rank"], seed=r["seed"], n_images=r["n_prompts"] * r["seeds_per_prompt"], n_prompts=r["n_prompts"],
        seeds_per_prompt=r["seeds_per_prompt"], weight_error=f"{r['weight_error']:.3f}",
        lora_cosine=f"{r['lora_cosine']:.3f}", norm_fp32=f"{r['lora_norms']['fp32']:.3f}",
        norm_nf4=f"{r['lora_norms']['nf4']:.3f}",
        table=md_table(["model", "brightness", "judge caption accuracy", "judge score", "toy-HPS bright over dark",
                        "training reward, last fifth"],
                       [[name, f"{n['brightness']:.3f}", f"{n['judge_accuracy']:.1%}", f"{n['judge_score']:.3f}",
                         f"{n['reward_bright']:+.3f}", train_reward(n)] for name, n in r["numbers"].items()]),
        differences=md_table(["difference", "brightness (paired, 95%)", "judge accuracy, points", "judge score",
                              "toy-HPS bright over dark"],
                             [[what, f"{d['brightness'][0]:+.3f} ± {d['brightness'][1]:.3f}",
                               f"{100 * d['judge_accuracy']:+.1f}", f"{d['judge_score']:+.3f}",
                               f"{d['reward_bright']:+.3f}"] for what, d in r["differences"].items()]))
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write(string.Template(open(REPORT).read()).substitute(fields))
    return path
