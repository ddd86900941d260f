"""The toy world: a FLUX pipeline, a reward CLIP and a judge CLIP trained from scratch on a CPU, on scenes drawn in
code, in FLUX.1-dev's exact layout, so that train.py, sample.py and evaluate.py run on it unchanged.

    python -m experiments.toy build     # once, about 5.5 minutes on 2 cores: ~/.cache/srpo-toy (or $SRPO_TOY_DIR)
    python -m experiments.toy paths     # print again the train.py, sample.py and evaluate.py commands that use it

The world: 64x64 scenes, a colored shape on a background, lit bright or dark, captioned
"a red circle on a purple background", "a bright red circle on a purple background" or "bright. a red ...".
Saved with save_pretrained under the world's folder:
    flux/    a FluxPipeline: a tiny AutoencoderKL (16 latent channels, 8x down, shift/scale from the data),
             a tiny FluxTransformer2DModel trained by flow matching, frozen random CLIP-L / T5 stand-ins
    reward/  a tiny CLIPModel trained contrastively on the scenes: "toy-HPS", the reward SRPO trains on
    judge/   a second CLIPModel, another seed and other scenes: the held-out judge, never used in training
The root's scripts never look for it: they load these folders when given them by flag, and `build` ends by
printing the commands that do (commands()). A world is deterministic in its seed (on one machine and thread count).
"""
import json
import math
import os
import shlex
import shutil
import tempfile
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from flux import conditioning, decode, encode_prompts, latent_noise, rollout
from srpo_reward import preprocess
from tiny import clip_text_config, clip_tokenizer, t5_tokenizer

SHAPES = ("circle", "square", "triangle")
# Shapes and backgrounds have separate palettes, so each color word names its role: random frozen text
# encoders tell a tiny model little about word order ("a red circle on a green background" or the reverse).
COLORS = {"red": (0.9, 0.15, 0.15), "green": (0.15, 0.75, 0.25), "blue": (0.2, 0.3, 0.95),
          "yellow": (0.95, 0.85, 0.15)}
BACKGROUNDS = {"white": (0.95, 0.95, 0.95), "gray": (0.5, 0.5, 0.5), "black": (0.08, 0.08, 0.08),
               "purple": (0.6, 0.25, 0.75)}
LIGHTS = {"bright": (0.85, 1.0), "dark": (0.3, 0.45)}  # the whole scene is scaled by a factor in this range
RESOLUTION = 64           # latents 16 x 8 x 8, packed into 16 tokens of 64 values
MAX_SEQUENCE_LENGTH = 16  # T5 tokens: the longest caption is 11. Pass it to train.py / sample.py (default 512)
EVAL_FRACTION = 1 / 3     # of the 48 (shape, color, background) captions, held out of SRPO's training prompts
# Build sizes: full takes about 5.5 minutes on 2 cores; quick about 20 s, for tests (a barely trained world).
BUILD = {"full": dict(vae_steps=1500, flux_scenes=4000, flux_steps=1500, clip_steps=400),
         "quick": dict(vae_steps=40, flux_scenes=128, flux_steps=20, clip_steps=60)}
VAE_BATCH, FLUX_BATCH, CLIP_BATCH = 16, 64, 128
VAE_LR, FLUX_LR, CLIP_LR = 2e-3, 1e-3, 1e-3  # AdamW, warmup then cosine to zero
VAE_KL = 1e-6             # KL weight per latent value, small as in Stable Diffusion's VAE
# SRPO on the world (the demo's runs and the printed train.py command): the release's recipe but for the lr,
# which the demo's report explains (METHOD.md §5's 5e-6 is for the 12B FLUX.1-dev)
SRPO_STEPS = 40
SRPO_LR = 1e-5


def say(*args):
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------- scenes

def make_scenes(n, generator):
    """n random scenes as attribute indices (shape, color, background, light) and placement: centre (cx, cy)
    and size r in pixels, and the brightness factor `level` drawn in the light word's range."""
    g = generator
    rand = lambda: torch.rand(n, generator=g)  # noqa: E731
    light = torch.randint(len(LIGHTS), (n,), generator=g)
    lo, hi = torch.tensor(list(LIGHTS.values())).T
    return dict(shape=torch.randint(len(SHAPES), (n,), generator=g),
                color=torch.randint(len(COLORS), (n,), generator=g),
                background=torch.randint(len(BACKGROUNDS), (n,), generator=g),
                light=light, level=lo[light] + (hi - lo)[light] * rand(),
                cx=26 + 12 * rand(), cy=26 + 12 * rand(), r=13 + 4 * rand())


def render(scenes):
    """Scenes -> images (n, 3, 64, 64) in [0, 1], anti-aliased: drawn at twice the size, averaged 2x2."""
    c = (torch.arange(2 * RESOLUTION) + 0.5) / 2
    dx = c.view(1, 1, -1) - scenes["cx"].view(-1, 1, 1)
    dy = c.view(1, -1, 1) - scenes["cy"].view(-1, 1, 1)
    r = scenes["r"].view(-1, 1, 1)
    masks = torch.stack([dx ** 2 + dy ** 2 <= r ** 2,                          # circle
                         torch.maximum(dx.abs(), dy.abs()) <= 0.8 * r,         # square
                         (dy <= 0.7 * r) & (dx.abs() <= 0.6 * (dy + r))], 1)  # triangle, apex up
    mask = F.avg_pool2d(masks[torch.arange(len(r)), scenes["shape"]][:, None].float(), 2)
    color = torch.tensor(list(COLORS.values()))[scenes["color"], :, None, None]
    background = torch.tensor(list(BACKGROUNDS.values()))[scenes["background"], :, None, None]
    image = mask * color + (1 - mask) * background
    return image * scenes["level"].view(-1, 1, 1, 1)


def caption(shape, color, background, light=None, form="adjective"):
    """'a red circle on a purple background'; with a light word, 'a bright red circle ...' (adjective) or
    'bright. a red circle ...' (control: the form SRPO's prompts take, METHOD.md §4)."""
    text = f"a {color} {shape} on a {background} background"
    if light is None:
        return text
    return f"a {light} {text[2:]}" if form == "adjective" else f"{light}. {text}"


def scene_captions(scenes, forms):
    """One caption per scene; forms[i] is None (no light word), 'adjective' or 'control'."""
    names = lambda key, values: [values[i] for i in scenes[key].tolist()]  # noqa: E731
    return [caption(s, c, b, light if form else None, form) for s, c, b, light, form in
            zip(names("shape", SHAPES), names("color", list(COLORS)), names("background", list(BACKGROUNDS)),
                names("light", list(LIGHTS)), forms)]


def all_captions():
    """The 48 light-free captions, one per (shape, color, background)."""
    return [caption(s, c, b) for s in SHAPES for c in COLORS for b in BACKGROUNDS]


def prompt_split(seed):
    """(train, eval) prompts for SRPO: a seeded two-thirds / one-third split of all_captions()."""
    prompts = all_captions()
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = round(len(prompts) * EVAL_FRACTION)
    return [prompts[i] for i in sorted(order[n_eval:])], [prompts[i] for i in sorted(order[:n_eval])]


def parse_caption(text):
    """(shape, color, background) of a light-free caption."""
    words = text.split()
    return words[2], words[1], words[5]


def tokenizers():
    """tiny.py's CLIP and T5 tokenizers with the toy's words added whole. Added ids come after CLIP's
    <|endoftext|>, so CLIPTextModel must pool at the first eos_token_id, which clip_text_config selects."""
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    for tokenizer in (clip, t5):
        tokenizer.add_tokens([*SHAPES, "background", "gray", "purple"])
    return clip, t5


# ----------------------------------------------------------------------------------------- training

def fit(model, loss_fn, steps, lr, what):
    """AdamW on loss_fn(step) for steps steps; lr warms up over the first 5%, then decays to zero (cosine), so
    a short run ends settled."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    t0, warmup = time.time(), max(1, steps // 20)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = loss_fn(step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            say(f"  {what} step {step + 1}/{steps}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    return model.eval().requires_grad_(False)


def train_vae(steps, generator):
    """AutoencoderKL with FLUX's 16 latent channels and 8x downsampling (4 blocks), no quant convs as FLUX.1-dev,
    trained on fresh scenes every step: MSE + VAE_KL * KL, on 32x32 crops at latent-grid offsets (a convolutional
    autoencoder does not care, and crops cost a quarter). shift_factor / scaling_factor are then set so that the
    latents of the scenes have mean 0 and std 1, as FLUX.1-dev's are set for its data."""
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=16,
                        norm_num_groups=8, sample_size=RESOLUTION, use_quant_conv=False, use_post_quant_conv=False)

    def loss_fn(step):
        i, j = (8 * torch.randint(0, 5, (2,), generator=generator)).tolist()
        x = render(make_scenes(VAE_BATCH, generator))[..., i:i + 32, j:j + 32] * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        return F.mse_loss(recon, x) + VAE_KL * posterior.kl().mean() / posterior.mean[0].numel()
    fit(vae, loss_fn, steps, VAE_LR, "vae")
    with torch.no_grad():
        z = vae.encode(render(make_scenes(256, generator)) * 2 - 1).latent_dist.mean
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1 / z.std().item())
    return vae


@torch.no_grad()
def encode(vae, images):
    """Images in [0, 1] -> FLUX's packed latents: the VAE's posterior mean, shifted, scaled, packed 2x2."""
    h = RESOLUTION // 8
    latents = torch.cat([vae.encode(x * 2 - 1).latent_dist.mean for x in images.split(128)])
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    return FluxPipeline._pack_latents(latents, len(latents), 16, h, h)


def text_encoders(generator_seed):
    """FLUX's two text encoders as frozen random stand-ins of CLIP-L (pooled) and T5 (sequence), like
    tiny.py's: the transformer learns to read their (distinct) embeddings of each caption."""
    clip_tok, t5_tok = tokenizers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        clip = CLIPTextModel(CLIPTextConfig(**clip_text_config(clip_tok)))
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=64, d_kv=16, d_ff=128, num_layers=1,
                                     num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    return clip, clip_tok, t5, t5_tok


def train_flux(pipe, scenes, steps, generator):
    """Flow matching (METHOD.md §1) on the VAE latents of `scenes`, the text encoders frozen: x = (1 - sigma) x0 +
    sigma noise, target velocity noise - x0, sigma = sigmoid(N(0, 1)) (SD3's logit-normal, which weights the
    middle noise levels, where shapes form). Each scene is captioned with or without its light word (half and
    half), so a light-free caption renders bright and dark scenes alike; guidance is drawn in [1, 5], so the toy
    model accepts any FLUX guidance and ignores it."""
    x0 = encode(pipe.vae, render(scenes))
    captions = [scene_captions(scenes, [None] * len(x0)), scene_captions(scenes, ["adjective"] * len(x0))]
    unique = sorted(set(captions[0] + captions[1]))
    with torch.no_grad():
        t5, pooled, _ = pipe.encode_prompt(unique, prompt_2=None, max_sequence_length=MAX_SEQUENCE_LENGTH)
    row = {c: i for i, c in enumerate(unique)}
    rows = torch.tensor([[row[c] for c in forms] for forms in captions])  # (2, n)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, RESOLUTION // 16, RESOLUTION // 16, "cpu", torch.float32)
    txt_ids = torch.zeros(MAX_SEQUENCE_LENGTH, 3)
    transformer = pipe.transformer

    def loss_fn(step):
        i = torch.randint(len(x0), (FLUX_BATCH,), generator=generator)
        text = rows[torch.randint(2, (FLUX_BATCH,), generator=generator), i]
        sigma = torch.sigmoid(torch.randn(FLUX_BATCH, generator=generator)).view(-1, 1, 1)
        noise = torch.randn(x0[i].shape, generator=generator)
        x = (1 - sigma) * x0[i] + sigma * noise
        v = transformer(hidden_states=x, timestep=torch.floor(sigma.flatten() * 1000) / 1000,
                        guidance=1 + 4 * torch.rand(FLUX_BATCH, generator=generator),
                        encoder_hidden_states=t5[text], pooled_projections=pooled[text], txt_ids=txt_ids,
                        img_ids=img_ids, return_dict=False)[0]
        return F.mse_loss(v, noise - x0[i])
    fit(transformer, loss_fn, steps, FLUX_LR, "flux")


def new_clip(seed):
    """A tiny CLIPModel for 64x64 images (8x8 patches), width 64, 32-d embeddings, with tiny.py's text tower
    layout at width 64."""
    tokenizer = tokenizers()[0]
    text = dict(clip_text_config(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4)
    vision = dict(image_size=RESOLUTION, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)), tokenizer


def embed(model, tokenizer, images=None, texts=None):
    """L2-normalized CLIP embeddings, through srpo_reward's own preprocessing, so training sees what SRPO sees."""
    if images is not None:
        pixels = preprocess(images, model.config.vision_config.image_size)
        return F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    tokens = tokenizer(list(texts), padding=True, return_tensors="pt")
    return F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)


def train_clip(seed, steps, generator):
    """Contrastive training (CLIP's symmetric InfoNCE) on fresh captioned scenes every step. A third of the
    captions carry no light word, a third the adjective, a third the control form "bright. a ...": the reward
    must tie the words bright / dark to brightness for SRPO's control words to mean anything. Half the batch
    are twins of the other half with another shape, as hard negatives: shape is the attribute color-heavy
    batches teach least. Identical captions in a batch are all positives (the soft target spreads over them)."""
    model, tokenizer = new_clip(seed)
    return fit(model, lambda step: contrastive_loss(model, tokenizer, generator), steps, CLIP_LR,
               f"clip seed {seed}"), tokenizer


def contrastive_loss(model, tokenizer, generator):
    """train_clip's loss on one fresh batch of CLIP_BATCH captioned scenes (half of them shape twins)."""
    forms = (None, "adjective", "control")
    scenes = make_scenes(CLIP_BATCH // 2, generator)
    twins = dict(scenes, shape=(scenes["shape"] + torch.randint(1, len(SHAPES), (CLIP_BATCH // 2,),
                                                                 generator=generator)) % len(SHAPES))
    scenes = {k: torch.cat([scenes[k], twins[k]]) for k in scenes}
    form = [forms[i] for i in torch.randint(3, (CLIP_BATCH // 2,), generator=generator)]
    captions = scene_captions(scenes, form * 2)
    logits = model.logit_scale.exp() * embed(model, tokenizer, images=render(scenes)) @ \
        embed(model, tokenizer, texts=captions).T
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    target = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# ----------------------------------------------------------------------------------------- measuring

def flux_embeds(flux_dir, prompts, cache_dir):
    """FLUX conditioning of prompts, batched, through flux.encode_prompts, as train.py (and its cache)."""
    e = encode_prompts(flux_dir, prompts, MAX_SEQUENCE_LENGTH, cache_dir, torch.device("cpu"), torch.float32)
    return {k: torch.cat([e(p)[k] for p in prompts]) for k in ("encoder_hidden_states", "pooled_projections")}


@torch.no_grad()
def sample(transformer, vae, embeds, seeds, guidance=3.5, steps=25):
    """One image per (prompt, seed) row, on flux.rollout (25 Euler steps, shift-3 grid) and flux.decode, as train.py;
    image i starts from the noise of seeds[i]. Returns (images in [0, 1], x0 latents, noise)."""
    noise = torch.cat([latent_noise(RESOLUTION, torch.Generator().manual_seed(s), "cpu") for s in seeds])
    cond = conditioning(embeds, RESOLUTION, "cpu")
    x0 = rollout(transformer, noise, cond, steps, 3.0, guidance)
    return decode(vae, x0, RESOLUTION), x0, noise


@torch.no_grad()
def attribute_accuracy(model, tokenizer, images, truths):
    """Zero-shot accuracy of a CLIP on (shape, color, background): for each attribute, is the true caption
    the best of the captions that change only that attribute? truths: (shape, color, background) names.
    Also the mean cosine of each image with its true caption (the judge's caption score), and the caption margin:
    that cosine minus the best of the captions that change one attribute, averaged over the three attributes."""
    grid = all_captions()
    sims = (embed(model, tokenizer, images=images) @ embed(model, tokenizer, texts=grid).T)
    sims = sims.view(len(images), len(SHAPES), len(COLORS), len(BACKGROUNDS))
    hits = {"shape": [], "color": [], "background": []}
    score, margin = [], []
    for sim, (s, c, b) in zip(sims, truths):
        s, c, b = SHAPES.index(s), list(COLORS).index(c), list(BACKGROUNDS).index(b)
        for key, row, true in (("shape", sim[:, c, b], s), ("color", sim[s, :, b], c),
                               ("background", sim[s, c, :], b)):
            hits[key].append(row.argmax() == true)
            margin.append(row[true] - torch.cat([row[:true], row[true + 1:]]).max())
        score.append(sim[s, c, b])
    out = {k: torch.stack(v).float().mean().item() for k, v in hits.items()}
    out["mean"] = sum(out.values()) / 3
    out["score"] = torch.stack(score).mean().item()
    out["margin"] = torch.stack(margin).mean().item()
    return out


@torch.no_grad()
def light_accuracy(model, tokenizer, images, captions, lights):
    """How often a CLIP prefers the control prompt with the true light word: 'bright. {caption}' vs
    'dark. {caption}', the pair SRPO's reward compares."""
    f = embed(model, tokenizer, images=images)
    pos = embed(model, tokenizer, texts=[f"{w}. {c}" for w, c in zip(lights, captions)])
    other = {"bright": "dark", "dark": "bright"}
    neg = embed(model, tokenizer, texts=[f"{other[w]}. {c}" for w, c in zip(lights, captions)])
    return ((f * pos).sum(-1) > (f * neg).sum(-1)).float().mean().item()


def sanity(flux_dir, pipe, reward, judge, seed):
    """The build's sanity numbers: the VAE's reconstruction error, the base model's attributes as the judge
    sees them, and both CLIPs' accuracy on held-out scenes."""
    g = torch.Generator().manual_seed(seed + 3000)
    scenes = make_scenes(256, g)
    images = render(scenes)
    with torch.no_grad():
        recon = decode(pipe.vae, encode(pipe.vae, images), RESOLUTION)
    mse = F.mse_loss(recon, images).item()
    truths = [parse_caption(c) for c in scene_captions(scenes, [None] * len(images))]
    lights = [list(LIGHTS)[i] for i in scenes["light"].tolist()]
    out = {"vae_mse": mse, "vae_psnr_db": 10 * math.log10(1 / mse)}
    for name, (model, tok) in (("reward", reward), ("judge", judge)):
        out[f"{name}_accuracy_heldout"] = attribute_accuracy(model, tok, images, truths)
        out[f"{name}_light_pairs_heldout"] = light_accuracy(model, tok, images, [caption(*t) for t in truths],
                                                            lights)
    prompts = all_captions()
    with tempfile.TemporaryDirectory() as cache:
        embeds = flux_embeds(flux_dir, prompts, cache)
    embeds = {k: v.repeat(2, 1, *([1] * (v.dim() - 2))) for k, v in embeds.items()}
    images, _, _ = sample(pipe.transformer, pipe.vae, embeds, range(2 * len(prompts)))
    out["base_judge_accuracy"] = attribute_accuracy(*judge, images, [parse_caption(p) for p in prompts] * 2)
    out["base_brightness"] = images.mean().item()
    out["data_brightness"] = render(make_scenes(1024, g)).mean().item()
    return out


# ----------------------------------------------------------------------------------------- build

def world_dir(root=None, seed=0, quick=False):
    root = root or os.environ.get("SRPO_TOY_DIR") or os.path.expanduser("~/.cache/srpo-toy")
    return os.path.join(root, f"seed{seed}" + ("-quick" if quick else ""))


def toy_model_paths(root=None, seed=0, quick=False):
    """The built world's folders and settings, or None if it is not built (python -m experiments.toy build):
    dict(flux=, reward=, judge=, train_prompts=, eval_prompts=, resolution=, max_sequence_length=)."""
    path = world_dir(root, seed, quick)
    if not os.path.isfile(os.path.join(path, "world.json")):
        return None
    return dict(flux=os.path.join(path, "flux"), reward=os.path.join(path, "reward"),
                judge=os.path.join(path, "judge"), train_prompts=os.path.join(path, "train_prompts.txt"),
                eval_prompts=os.path.join(path, "eval_prompts.txt"), resolution=RESOLUTION,
                max_sequence_length=MAX_SEQUENCE_LENGTH)


def build(root=None, seed=0, quick=False):
    """Train the world and write it under root; written to a temporary sibling and renamed, so a half-built
    world is never found. Returns toy_model_paths(root, seed, quick)."""
    final = world_dir(root, seed, quick)
    if toy_model_paths(root, seed, quick):
        say(f"{final}: already built (delete it to rebuild)")
        say(format_sanity(json.load(open(os.path.join(final, "world.json")))["sanity"]))
        return toy_model_paths(root, seed, quick)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}-", dir=os.path.dirname(final))
    size, t0 = BUILD["quick" if quick else "full"], time.time()
    with torch.random.fork_rng(devices=[]):  # the caller's RNG is not moved; every draw below is seeded
        torch.manual_seed(seed)
        say(f"building the toy world ({'quick' if quick else 'full'}, seed {seed}) in {final}")
        vae = train_vae(size["vae_steps"], torch.Generator().manual_seed(seed))
        clip, clip_tok, t5, t5_tok = text_encoders(seed + 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 2)
            # FLUX.1-dev's layout at width 128: 2 double-stream and 2 single-stream blocks, rope axes summing to
            # the head dim, guidance embedding, T5 width for the text stream, CLIP width for the pooled vector
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32,
                num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                axes_dims_rope=(8, 12, 12))
        scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's, as tiny.py
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok,
                            text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
        scenes = make_scenes(size["flux_scenes"], torch.Generator().manual_seed(seed + 1000))
        train_flux(pipe, scenes, size["flux_steps"], torch.Generator().manual_seed(seed + 1001))
        pipe.save_pretrained(os.path.join(tmp, "flux"))
        # the judge: another initialization and other scenes (its own data seed), never trained on
        reward = train_clip(seed + 10, size["clip_steps"], torch.Generator().manual_seed(seed + 2000))
        judge = train_clip(seed + 20, size["clip_steps"], torch.Generator().manual_seed(seed + 2500))
        for name, (model, tokenizer) in (("reward", reward), ("judge", judge)):
            model.save_pretrained(os.path.join(tmp, name))
            tokenizer.save_pretrained(os.path.join(tmp, name))
        train_prompts, eval_prompts = prompt_split(seed)
        for name, prompts in (("train_prompts", train_prompts), ("eval_prompts", eval_prompts)):
            with open(os.path.join(tmp, f"{name}.txt"), "w") as f:
                f.write("\n".join(prompts) + "\n")
        build_s = time.time() - t0
        numbers = sanity(os.path.join(tmp, "flux"), pipe, reward, judge, seed)
    finish(tmp, final, dict(seed=seed, quick=quick, build_s=build_s, **size, sanity=numbers), t0,
           format_sanity(numbers))
    return toy_model_paths(root, seed, quick)


def finish(tmp, final, record, t0, sanity_text):
    """A built world: record as its world.json, the folder renamed from tmp into place (another process that
    finished the same world first keeps its copy), and the build's times and sanity said."""
    with open(os.path.join(tmp, "world.json"), "w") as f:
        json.dump(record, f, indent=1)
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp)
    say(f"built in {record['build_s']:.0f} s (+{time.time() - t0 - record['build_s']:.0f} s of sanity checks):")
    say(sanity_text)


def format_sanity(n):
    pct = lambda a: f"shape {a['shape']:.0%}, color {a['color']:.0%}, background {a['background']:.0%}"  # noqa
    return "\n".join([
        f"  VAE reconstruction: MSE {n['vae_mse']:.5f} (PSNR {n['vae_psnr_db']:.1f} dB) on held-out scenes",
        f"  base model, judged by the held-out CLIP: {pct(n['base_judge_accuracy'])} "
        f"(chance 33%, 25%, 25%); mean brightness {n['base_brightness']:.3f} (data {n['data_brightness']:.3f})",
        f"  reward on held-out scenes: {pct(n['reward_accuracy_heldout'])}, bright/dark pairs "
        f"{n['reward_light_pairs_heldout']:.0%}",
        f"  judge on held-out scenes: {pct(n['judge_accuracy_heldout'])}, bright/dark pairs "
        f"{n['judge_light_pairs_heldout']:.0%}"])


# ----------------------------------------------------------------------------------------- the commands that use it

def train_argv(paths, output_dir, pos_words="bright", neg_words="dark", branches="both", steps=SRPO_STEPS,
               lr=SRPO_LR):
    """train.py's arguments for SRPO on the world at paths: its model, its reward as hps, its training prompts and
    sizes, the control words and the toy's lr. The demo's runs and the printed command both start from this list."""
    return ["--model", paths["flux"], "--reward", "hps", "--reward-path", paths["reward"],
            "--prompts", paths["train_prompts"], "--resolution", str(RESOLUTION),
            "--max-sequence-length", str(MAX_SEQUENCE_LENGTH), "--pos-words", pos_words, "--neg-words", neg_words,
            "--branches", branches, "--steps", str(steps), "--lr", str(lr), "--output-dir", output_dir,
            "--batch-size", "1"]  # one prompt per step: the toy's recipe, on one CPU process


def commands(paths, out="out/toy-srpo"):
    """The argv of three root commands on the world at paths: SRPO with +bright -dark; base and SRPO samples of the
    held-out prompts side by side; their scores by the toy-HPS (as hps) and by the held-out judge (as clip)."""
    run, compare = os.path.join(out, "train"), os.path.join(out, "compare")
    weights = os.path.join(run, f"checkpoint-{SRPO_STEPS}")
    return [["python", "train.py", *train_argv(paths, run)],
            ["python", "sample.py", "--model", paths["flux"], "--weights", weights, "--compare",
             "--prompts", paths["eval_prompts"], "--height", str(RESOLUTION), "--width", str(RESOLUTION),
             "--max-sequence-length", str(MAX_SEQUENCE_LENGTH), "--output-dir", compare],
            ["python", "evaluate.py", os.path.join(compare, "base"), os.path.join(compare, "srpo"),
             "--reward", "hps", "clip", "--reward-path", paths["reward"], paths["judge"],
             "--json", os.path.join(compare, "scores.json")]]


def shell(argv, width=100):
    """argv as a copy-pasteable shell command: a flag and its values stay on one line, lines are broken with a
    backslash before a flag that would pass width."""
    groups = [[]]
    for arg in argv:
        if arg.startswith("--"):
            groups.append([])
        groups[-1].append(shlex.quote(arg))
    lines = [" ".join(groups[0])]
    for group in map(" ".join, groups[1:]):
        if len(lines[-1]) + 1 + len(group) > width:
            lines.append("   ")
        lines[-1] += " " + group
    return " \\\n".join(lines)


def print_commands(paths):
    say("\nrun from the repository root, to use this world (python -m experiments.toy paths prints these again):")
    for argv in commands(paths):
        say(shell(argv))
