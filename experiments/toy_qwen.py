"""The toy world for Qwen-Image: toy_world.py's scenes and captions, a QwenImagePipeline trained on them on a CPU, and
SRPO's bright/dark steering measured on it through train.py.

    python -m experiments.toy qwen      # ~6 min to build, ~2 to steer on an idle 2-core CPU: out/toy-qwen/

Status: its VAE reconstructs the scenes at 19.8 dB (the FLUX world's: 24.8), and SRPO's words do not yet steer it
as they steer the FLUX world; what was measured and why is experiments/results/toy-qwen.md.

The world, under ~/.cache/srpo-toy/seed0-qwen (or $SRPO_TOY_DIR), saved with save_pretrained:
    qwen/    a QwenImagePipeline: a tiny AutoencoderKLQwenImage (16 latent channels, 8x down, latents_mean /
             latents_std from the data), a tiny QwenImageTransformer2DModel trained by flow matching, and tiny.py's
             random frozen Qwen2.5-VL text encoder, whose conditioning is qwen.encode_prompts', what train.py feeds
Its reward, judge and prompt split are the FLUX world's of the same seed (toy_world.build, run first if missing):
the same scenes and captions, so the same CLIPs judge both worlds.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
from safetensors.torch import load_file

import plots
import qwen
from experiments import toy_world
from experiments.toy_demo import load_clip, short, with_weights
from experiments.toy_world import (LIGHTS, RESOLUTION, VAE_BATCH, VAE_KL, VAE_LR, all_captions, attribute_accuracy,
                                   caption, fit, make_scenes, parse_caption, render, say, scene_captions)
from srpo_reward import load_reward
from tiny import build_tiny_qwen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Qwen2.5-VL tokens after the template's dropped prefix: tiny.py's tokenizer spells the toy's shape and background
# words in bytes, so the longest caption is 18 tokens, and the template's closing adds 5. Pass it to train.py.
MAX_SEQUENCE_LENGTH = 32
# Build sizes: the Qwen VAE's causal 3-D convolutions cost about as much as the FLUX world's VAE at a third of its
# width; "quick" is seconds, a barely trained world for tests.
BUILD = {"full": dict(vae_steps=1500, scenes=4000, transformer_steps=600),  # 400 VAE steps: 15 dB; 1500: 19.8 dB
         "quick": dict(vae_steps=10, scenes=64, transformer_steps=10)}
TRANSFORMER_BATCH, TRANSFORMER_LR = 64, 1e-3
DROP = 0.1                # of the captions are "" in training: true CFG's unconditional velocity must mean something
# Sampling, as the release's Qwen rollout and sample.py: a linear grid (shift 1) of 26 Euler steps, true CFG 4 on ""
SAMPLE_STEPS, SAMPLE_SHIFT, SAMPLE_GUIDANCE = 26, 1.0, qwen.SAMPLE_GUIDANCE
# SRPO on the world: train.py's Qwen-Image recipe (METHOD.md §5) and its 50 steps, but for the lr: the FLUX world's
# 1e-5 (toy_world.SRPO_LR), not the 3e-6 set for the 20B Qwen-Image
SRPO_STEPS = 50
SRPO_LR = toy_world.SRPO_LR
SEEDS_PER_PROMPT = 4      # eval images per held-out prompt


# ----------------------------------------------------------------------------------------- the models

def train_vae(steps, generator):
    """AutoencoderKLQwenImage, 3 spatial downsamplings (8x) and 16 latent channels as Qwen-Image's, at widths 8 to 32,
    trained as toy_world.train_vae's (MSE + VAE_KL * KL per latent value, 32x32 crops, fresh scenes) on one-frame
    videos (B, 3, 1, H, W). latents_mean / latents_std are then the scenes' per channel, as Qwen-Image's are set for
    its data, so normalized latents have mean 0 and std 1 in every channel."""
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                                 temperal_downsample=[False, True, True])

    def loss_fn(step):
        i, j = (8 * torch.randint(0, 5, (2,), generator=generator)).tolist()
        x = render(make_scenes(VAE_BATCH, generator))[:, :, None, i:i + 32, j:j + 32] * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        kl = 0.5 * (posterior.mean ** 2 + posterior.var - 1 - posterior.logvar).mean()
        return F.mse_loss(recon, x) + VAE_KL * kl
    fit(vae, loss_fn, steps, VAE_LR, "vae")
    with torch.no_grad():
        z = vae.encode(render(make_scenes(256, generator))[:, :, None] * 2 - 1).latent_dist.mean
    vae.register_to_config(latents_mean=z.mean((0, 2, 3, 4)).tolist(), latents_std=z.std((0, 2, 3, 4)).tolist())
    return vae


@torch.no_grad()
def encode(vae, images):
    """Images in [0, 1] -> Qwen-Image's packed latents: qwen.encode_image's normalization and packing, batched, of
    the posterior mean."""
    h = RESOLUTION // 8
    latents = torch.cat([vae.encode(x[:, :, None] * 2 - 1).latent_dist.mean for x in images.split(128)])
    mean, std = qwen.latent_stats(vae, latents.device)
    return QwenImagePipeline._pack_latents((latents - mean) / std, len(latents), 16, h, h)


def text_batch(embeds, prompts):
    """The prompts' conditioning from embeds(prompt) (qwen.encode_prompts', one prompt at a time, as train.py), stacked
    as QwenImagePipeline stacks a batch: zero-padded to the longest, the mask 0 on the padding."""
    rows = [embeds(p) for p in prompts]
    n = max(r["encoder_hidden_states"].shape[1] for r in rows)
    pad = lambda x: F.pad(x, (0, 0) * (x.dim() - 2) + (0, n - x.shape[1]))  # noqa: E731
    return {k: torch.cat([pad(r[k]) for r in rows]) for k in qwen.TEXT_KEYS}


def train_transformer(transformer, vae, text_dir, scenes, steps, generator, cache_dir):
    """Flow matching as toy_world.train_flux's (METHOD.md §1; logit-normal sigma, captions with and without their
    light word half and half), on the Qwen VAE's latents and qwen.encode_prompts' conditioning, padded batches
    masked as the pipeline masks them. DROP of the captions are "", the negative prompt of true CFG, so the model
    learns the unconditional velocity that CFG extrapolates from."""
    x0 = encode(vae, render(scenes))
    captions = [scene_captions(scenes, [None] * len(x0)), scene_captions(scenes, ["adjective"] * len(x0))]
    unique = sorted(set(captions[0] + captions[1])) + [qwen.NEGATIVE]
    text = text_batch(qwen.encode_prompts(text_dir, unique, MAX_SEQUENCE_LENGTH, cache_dir, torch.device("cpu"),
                                          torch.float32), unique)
    row = {c: i for i, c in enumerate(unique)}
    rows = torch.tensor([[row[c] for c in forms] for forms in captions])  # (2, n)
    img_shapes = [[(1, RESOLUTION // 16, RESOLUTION // 16)]] * TRANSFORMER_BATCH

    def loss_fn(step):
        i = torch.randint(len(x0), (TRANSFORMER_BATCH,), generator=generator)
        t = rows[torch.randint(2, (TRANSFORMER_BATCH,), generator=generator), i]
        t[torch.rand(TRANSFORMER_BATCH, generator=generator) < DROP] = row[qwen.NEGATIVE]
        sigma = torch.sigmoid(torch.randn(TRANSFORMER_BATCH, generator=generator)).view(-1, 1, 1)
        noise = torch.randn(x0[i].shape, generator=generator)
        x = (1 - sigma) * x0[i] + sigma * noise
        v = transformer(hidden_states=x, timestep=torch.floor(sigma.flatten() * 1000) / 1000,
                        encoder_hidden_states=text["encoder_hidden_states"][t],
                        encoder_hidden_states_mask=text["encoder_hidden_states_mask"][t], img_shapes=img_shapes,
                        return_dict=False)[0]
        return F.mse_loss(v, noise - x0[i])
    fit(transformer, loss_fn, steps, TRANSFORMER_LR, "transformer")


# ----------------------------------------------------------------------------------------- measuring

def prompt_embeds(qwen_dir, prompts, cache_dir):
    """embeds(prompt) of qwen.encode_prompts, as train.py (and its cache), for prompts and the negative ""."""
    return qwen.encode_prompts(qwen_dir, prompts, MAX_SEQUENCE_LENGTH, cache_dir, torch.device("cpu"), torch.float32)


@torch.no_grad()
def sample(transformer, vae, embeds, prompts, seeds):
    """One image per (prompt, seed) on qwen.rollout (SAMPLE_STEPS at SAMPLE_SHIFT, true CFG SAMPLE_GUIDANCE on "")
    and qwen.decode, as train.py and sample.py; image i from the noise of seeds[i]. Images in [0, 1]."""
    noise = torch.cat([qwen.latent_noise(RESOLUTION, torch.Generator().manual_seed(s), "cpu") for s in seeds])
    cond = qwen.conditioning(text_batch(embeds, prompts), RESOLUTION, "cpu",
                             negative=text_batch(embeds, [qwen.NEGATIVE] * len(prompts)))
    x0 = qwen.rollout(transformer, noise, cond, SAMPLE_STEPS, SAMPLE_SHIFT, SAMPLE_GUIDANCE)
    return qwen.decode(vae, x0, RESOLUTION)


def measure(transformer, world, embeds, prompts, seeds):
    """toy_demo.measure's numbers on this world: mean brightness of the samples, the judge's caption accuracy and
    score, and the toy-HPS preference for 'bright. {caption}' over 'dark. {caption}' (the SRP with k = 0)."""
    images = sample(transformer, world["vae"], embeds, prompts, seeds)
    judged = attribute_accuracy(*world["judge"], images, [parse_caption(p) for p in prompts])
    with torch.no_grad():
        bright = world["reward"].srp(images, [f"bright. {p}" for p in prompts], [f"dark. {p}" for p in prompts], 0.0)
    return dict(brightness=images.mean().item(), judge_accuracy=judged["mean"], judge_score=judged["score"],
                reward_bright=bright.mean().item()), images


def sanity(qwen_dir, pipe, judge, seed, cache_dir):
    """The build's sanity numbers: the VAE's reconstruction error and its normalized latents' per-channel spread, the
    base model's attributes as the judge sees them, its brightness against the data's, and whether it reads the
    light words: samples of 'a bright ...' against 'a dark ...' captions."""
    g = torch.Generator().manual_seed(seed + 3000)
    images = render(make_scenes(256, g))
    with torch.no_grad():
        latents = encode(pipe.vae, images)
        recon = qwen.decode(pipe.vae, latents, RESOLUTION)
    mse = F.mse_loss(recon, images).item()
    channels = latents.view(len(latents), -1, 16, 4).permute(2, 0, 1, 3).reshape(16, -1)  # 2x2 patches of 16
    out = dict(vae_mse=mse, vae_psnr_db=10 * math.log10(1 / mse), latent_channel_mean_max=channels.mean(1).abs().max()
               .item(), latent_channel_std_range=[channels.std(1).min().item(), channels.std(1).max().item()])
    prompts = all_captions() * 2
    lit = {w: [caption(*parse_caption(p), w) for p in all_captions()] for w in LIGHTS}
    embeds = prompt_embeds(qwen_dir, prompts + lit["bright"] + lit["dark"], cache_dir)
    images = sample(pipe.transformer, pipe.vae, embeds, prompts, range(len(prompts)))
    out["base_judge_accuracy"] = attribute_accuracy(*judge, images, [parse_caption(p) for p in prompts])
    out["base_brightness"] = images.mean().item()
    out["data_brightness"] = render(make_scenes(1024, g)).mean().item()
    for w in LIGHTS:
        out[f"base_brightness_{w}_captions"] = sample(pipe.transformer, pipe.vae, embeds, lit[w],
                                                      range(len(lit[w]))).mean().item()
    return out


def format_sanity(n):
    if n is None:
        return "  a quick world: no sanity numbers"
    pct = lambda a: f"shape {a['shape']:.0%}, color {a['color']:.0%}, background {a['background']:.0%}"  # noqa
    lo, hi = n["latent_channel_std_range"]
    return "\n".join([
        f"  VAE reconstruction: MSE {n['vae_mse']:.5f} (PSNR {n['vae_psnr_db']:.1f} dB) on held-out scenes; their "
        f"normalized latents: channel means within {n['latent_channel_mean_max']:.2f} of 0, stds {lo:.2f} to {hi:.2f}",
        f"  base model, judged by the held-out CLIP: {pct(n['base_judge_accuracy'])} (chance 33%, 25%, 25%); mean "
        f"brightness {n['base_brightness']:.3f} (data {n['data_brightness']:.3f}); 'a bright ...' captions "
        f"{n['base_brightness_bright_captions']:.3f}, 'a dark ...' {n['base_brightness_dark_captions']:.3f}"])


# ----------------------------------------------------------------------------------------- build

def world_dir(root=None, seed=0, quick=False):
    return toy_world.world_dir(root, seed, quick) + "-qwen"


def toy_qwen_paths(root=None, seed=0, quick=False):
    """The built world's folders and settings, or None if it is not built: toy_world.toy_model_paths' keys with
    qwen= in place of flux=."""
    flux_world = toy_world.toy_model_paths(root, seed, quick)
    path = world_dir(root, seed, quick)
    if flux_world is None or not os.path.isfile(os.path.join(path, "world.json")):
        return None
    paths = {k: v for k, v in flux_world.items() if k != "flux"}
    return dict(paths, qwen=os.path.join(path, "qwen"), max_sequence_length=MAX_SEQUENCE_LENGTH)


def build(root=None, seed=0, quick=False):
    """Train the world and write it under root, the FLUX world of the same seed first if missing (its CLIPs and prompt
    split serve both); written to a temporary sibling and renamed, as toy_world.build. Returns toy_qwen_paths."""
    toy_world.build(root, seed, quick)
    final = world_dir(root, seed, quick)
    if toy_qwen_paths(root, seed, quick):
        say(f"{final}: already built (delete it to rebuild)")
        say(format_sanity(json.load(open(os.path.join(final, "world.json")))["sanity"]))
        return toy_qwen_paths(root, seed, quick)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}-", dir=os.path.dirname(final))
    size, t0 = BUILD["quick" if quick else "full"], time.time()
    text_dir, cache = os.path.join(tmp, "text"), os.path.join(tmp, "text_cache")
    with torch.random.fork_rng(devices=[]):  # the caller's RNG is not moved; every draw below is seeded
        torch.manual_seed(seed)
        say(f"building the Qwen-Image toy world ({'quick' if quick else 'full'}, seed {seed}) in {final}")
        vae = train_vae(size["vae_steps"], torch.Generator().manual_seed(seed))
        # tiny.py's random Qwen2.5-VL, tokenizer and Qwen-Image scheduler; its random transformer and VAE are replaced
        build_tiny_qwen(text_dir, seed + 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 2)
            # the FLUX world's transformer width (4 heads of 32) in Qwen-Image's layout: double-stream blocks only,
            # 2x2 patches of the 16 latent channels, the text encoder's width in, rope axes summing to the head dim
            transformer = QwenImageTransformer2DModel(
                patch_size=2, in_channels=64, out_channels=16, num_layers=3, attention_head_dim=32,
                num_attention_heads=4, joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(8, 12, 12))
        scenes = make_scenes(size["scenes"], torch.Generator().manual_seed(seed + 1000))
        train_transformer(transformer, vae, text_dir, scenes, size["transformer_steps"],
                          torch.Generator().manual_seed(seed + 1001), cache)
        pipe = QwenImagePipeline.from_pretrained(text_dir, transformer=transformer, vae=vae.eval())
        pipe.save_pretrained(os.path.join(tmp, "qwen"))
        build_s = time.time() - t0
        numbers = None if quick else sanity(  # a quick world is for tests: sanity samples ~200 images
            os.path.join(tmp, "qwen"), pipe, load_clip(toy_world.toy_model_paths(root, seed, quick)["judge"]), seed,
            cache)
    shutil.rmtree(text_dir)
    shutil.rmtree(cache)
    toy_world.finish(tmp, final, dict(seed=seed, quick=quick, build_s=build_s, **size, sanity=numbers), t0,
                     format_sanity(numbers))
    return toy_qwen_paths(root, seed, quick)


# ----------------------------------------------------------------------------------------- SRPO on it

def train_argv(paths, output_dir, pos_words, neg_words, steps=SRPO_STEPS, lr=SRPO_LR, seed=42):
    """train.py's arguments for SRPO on the world at paths: its model, the FLUX world's reward as hps, the training
    prompts, the toy's sizes, the control words, steps, lr and seed; the rest is train.py's Qwen recipe."""
    return ["--model", paths["qwen"], "--reward", "hps", "--reward-path", paths["reward"],
            "--prompts", paths["train_prompts"], "--resolution", str(RESOLUTION),
            "--max-sequence-length", str(MAX_SEQUENCE_LENGTH), "--pos-words", pos_words, "--neg-words", neg_words,
            "--steps", str(steps), "--lr", str(lr), "--seed", str(seed), "--output-dir", output_dir,
            "--batch-size", "1", "--checkpoint-every", "0", "--sample-every", "0"]


def srpo_run(paths, run, pos, neg, steps, lr, seed):
    """One SRPO run: train.py in a process of its own, with the caller's thread count (toy.py's 2). Returns (final
    weights, metrics rows)."""
    shutil.rmtree(run, ignore_errors=True)
    say(f"SRPO run {run}: --pos-words {pos} --neg-words {neg} --seed {seed}")
    subprocess.run([sys.executable, "train.py", *train_argv(paths, run, pos, neg, steps, lr, seed)], cwd=ROOT,
                   check=True, env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    weights = load_file(os.path.join(run, f"checkpoint-{steps}", "diffusion_pytorch_model.safetensors"))
    return weights, [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def steering(paths, out, steps=SRPO_STEPS, lr=SRPO_LR, seeds=(42,), seeds_per_prompt=SEEDS_PER_PROMPT):
    """+bright -dark against +dark -bright (the control), each with every training seed, measured on the held-out
    prompts' samples against the base's. Writes out/numbers.json and out/steering.png (the first seed's samples of
    8 held-out prompts); returns {run name: numbers}."""
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    pipe = QwenImagePipeline.from_pretrained(paths["qwen"], text_encoder=None, tokenizer=None)
    world = dict(vae=pipe.vae.eval().requires_grad_(False), judge=load_clip(paths["judge"]),
                 reward=load_reward("hps", paths["reward"]))
    base = with_weights(pipe.transformer, pipe.transformer.state_dict())
    prompts = [line.strip() for line in open(paths["eval_prompts"]) if line.strip()] * seeds_per_prompt
    embeds = prompt_embeds(paths["qwen"], prompts, os.path.join(out, "text_cache"))
    results, images = {}, {}
    results["base"], images["base"] = measure(base, world, embeds, prompts, range(len(prompts)))
    say(f"base: {results['base']}")
    for seed in seeds:
        for pos, neg in (("bright", "dark"), ("dark", "bright")):
            name = f"+{pos} -{neg}, seed {seed}"
            weights, rows = srpo_run(paths, os.path.join(out, "runs", f"{pos}-{seed}"), pos, neg, steps, lr, seed)
            results[name], shown = measure(with_weights(base, weights), world, embeds, prompts, range(len(prompts)))
            images.setdefault(f"SRPO +{pos} -{neg}", shown)
            tail = rows[-max(1, len(rows) // 5):]
            results[name]["train_reward"] = sum(r["reward_denoise"] for r in tail) / len(tail)
            say(f"{name}: {results[name]}")
    plots.save(os.path.join(out, "steering.png"), plots.image_grid(
        [[row[i] for i in range(8)] for row in images.values()], list(images), [short(p) for p in prompts[:8]]))
    with open(os.path.join(out, "numbers.json"), "w") as f:
        json.dump(dict(steps=steps, lr=lr, seeds=list(seeds), images=len(prompts), seconds=time.time() - t0,
                       runs=results), f, indent=1)
    return results
