"""Qwen-Image plumbing that SRPO needs around the transformer: the same functions as flux.py, with the same
signatures and meanings, for diffusers' QwenImagePipeline (text conditioning, packed latents, the velocity, the
no-gradient rollout, decoding, building the 20B transformer on the meta device).

Nothing here is SRPO: it is what QwenImagePipeline does inside its sampling loop, split into the pieces the method
calls one at a time. What is not model-specific (autocast, filling a meta transformer from its safetensors, LoRA's
initial values, NF4) stays in flux.py and serves both.
Shapes: packed latents x are (1, (H/16) * (W/16), 64), 16 VAE channels in 2x2 patches, as FLUX's; text embeddings
(1, L, 3584), Qwen2.5-VL's last hidden state, with a mask (1, L).
Where Qwen-Image differs from FLUX:
  * no guidance embedding: `guidance` is the true-CFG scale, a second forward on a negative prompt's embeddings
    combined as the pipeline does, with its rescale to the conditional velocity's norm (velocity);
  * the VAE is a video VAE: latents are 5-D (B, 16, frames = 1, H/8, W/8), normalized per channel by the VAE's
    latents_mean / latents_std, where FLUX has one shift and one scale (decode, encode_image);
  * the prompt is wrapped in a chat template whose 34-token system prefix the pipeline drops from the encoder's
    output (its closing "<|im_end|>\\n<|im_start|>assistant\\n" stays: "" gives 5 tokens); no pooled embedding;
  * the text comes with a mask, which the pipeline gives the transformer as None when every token is valid (always,
    for one prompt); no txt_ids / img_ids: the transformer's RoPE is built from img_shapes and the text length;
  * those RoPE tables are precomputed plain attributes, which a meta-device build leaves empty (transformer_on_meta).
"""
import math

import torch
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

from flux import autocast, text_cache
from flux import rollout as flux_rollout

PIPELINE, TRANSFORMER, VAE = QwenImagePipeline, QwenImageTransformer2DModel, AutoencoderKLQwenImage
NEGATIVE = ""  # true CFG's negative prompt, the release's and the pipeline's default: encoded beside every prompt
TEXT_KEYS = ("encoder_hidden_states", "encoder_hidden_states_mask")  # one cache file's tensors


def encode_prompts(model_dir, prompts, max_sequence_length, cache_dir, device, dtype):
    """Qwen-Image conditioning of each prompt, QwenImagePipeline.encode_prompt's: the template-wrapped prompt through
    Qwen2.5-VL, its system prefix dropped, cut to max_sequence_length tokens; and the mask, all ones where the
    pipeline returns None (every token valid), so every cache file holds the same keys. Cached as FLUX's are
    (flux.text_cache). NEGATIVE ("") is encoded too, for true CFG. Returns embeds(prompt)."""
    def encode(pipe, prompt):
        embeds, mask = pipe.encode_prompt(prompt, device=device, max_sequence_length=max_sequence_length)
        if mask is None:  # the pipeline's "every token valid"; its masks are int64 ones and zeros
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        return dict(zip(TEXT_KEYS, (embeds, mask)))
    return text_cache(model_dir, [*prompts, NEGATIVE], max_sequence_length, cache_dir, device, TEXT_KEYS,
                      lambda: QwenImagePipeline.from_pretrained(model_dir, transformer=None, vae=None, dtype=dtype),
                      encode)


def velocity(transformer, x, sigma, cond, guidance):
    """Qwen-Image's velocity v = noise - x0 at packed latents x. The timestep fed is floor(sigma * 1000) / 1000, a
    fraction the transformer scales by 1000 inside, as the release's Qwen script feeds int(sigma * 1000) / 1000 in
    its rollout and its trained step (METHOD.md §3; the model casts it to the latents' dtype, so under bf16 autocast
    0.899 reaches it as 0.8984375, in the release too). Qwen-Image embeds no guidance: with a negative conditioning
    in cond and guidance > 1 this is the pipeline's true CFG,
        v = v_neg + guidance * (v_pos - v_neg),   then   v *= |v_pos| / |v|   per token over its 64 channels,
    combined in fp32; else one forward."""
    t = torch.full((x.shape[0],), math.floor(float(sigma) * 1000) / 1000, device=x.device)
    positive = {k: v for k, v in cond.items() if k != "negative"}
    with autocast(x.device):
        v = transformer(hidden_states=x, timestep=t, return_dict=False, **positive)[0].float()
        if "negative" in cond and guidance is not None and guidance > 1:
            v_neg = transformer(hidden_states=x, timestep=t, return_dict=False, **cond["negative"])[0].float()
            combined = v_neg + guidance * (v - v_neg)
            v = combined * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
    return v


def latent_noise(resolution, generator, device):
    """Gaussian noise in Qwen-Image's packed layout, QwenImagePipeline.prepare_latents': (1, frames = 1, 16, H/8,
    W/8) drawn on the CPU, in 2x2 patches."""
    h = w = resolution // 8
    noise = torch.randn(1, 1, 16, h, w, generator=generator)
    return QwenImagePipeline._pack_latents(noise, 1, 16, h, w).to(device)


MAX_TOKENS = 1024  # QwenImagePipeline refuses more; the release encodes at this length
SAMPLE_GUIDANCE = 4.0  # sample.py's default: QwenImagePipeline's true_cfg_scale, the release's CFG


def sample_args(height, width, num_inference_steps, guidance_scale, max_sequence_length):
    """QwenImagePipeline's arguments for sample.py's settings: guidance_scale is the true-CFG scale, on NEGATIVE."""
    return dict(height=height, width=width, num_inference_steps=num_inference_steps, true_cfg_scale=guidance_scale,
                negative_prompt=NEGATIVE, max_sequence_length=max_sequence_length)


def condition(embeds, caption, resolution, device):
    """conditioning of caption with NEGATIVE's for true CFG, from embeds(prompt) (encode_prompts', which encodes
    NEGATIVE too): what train.py asks every model family for. Whether CFG runs is the guidance passed to velocity."""
    return conditioning(embeds(caption), resolution, device, negative=embeds(NEGATIVE))


def conditioning(embeds, resolution, device, negative=None):
    """The transformer's keyword inputs besides x and t: text embeddings, their mask (None when every token is
    valid, as the pipeline passes it: no attention mask then), img_shapes [(frames, H/16, W/16)] of the 2x2 patches.
    With negative embeds (of "", the release's negative prompt), its inputs too under "negative", for true CFG.
    The release pads its negative with zeros to the positive's length and marks them valid; we encode "" alone,
    as the pipeline does."""
    def inputs(e):
        mask = e["encoder_hidden_states_mask"].to(device)
        return dict(encoder_hidden_states=e["encoder_hidden_states"].to(device),
                    encoder_hidden_states_mask=None if mask.all() else mask,
                    img_shapes=[[(1, resolution // 16, resolution // 16)]])
    cond = inputs(embeds)
    if negative is not None:
        cond["negative"] = inputs(negative)
    return cond


# Qwen-Image's 38 GiB of bf16 weights, kept gathered through the rollout, would not fit beside the shards on 8 GPUs
# of 80 GB (experiments.plan --model qwen): its rollout gathers block by block, as training does
KEEP_GATHERED = False


def rollout(transformer, noise, cond, steps, shift, guidance, progress=False):
    """x0 of the current model: flux.rollout's Euler steps with Qwen-Image's velocity, no gradient (FSDP2 and autocast
    handled as there); the release's Qwen rollout is 26 steps at shift 1 (a linear grid) with true CFG 4 on ""."""
    return flux_rollout(transformer, noise, cond, steps, shift, guidance, progress, velocity_of=velocity,
                        keep_gathered=KEEP_GATHERED)


def latent_stats(vae, device):
    """The VAE's per-channel latents_mean and latents_std, shaped (1, 16, 1, 1, 1) for its 5-D latents."""
    return [torch.tensor(vae.config[k]).view(1, -1, 1, 1, 1).to(device) for k in ("latents_mean", "latents_std")]


def decode(vae, x, resolution):
    """Packed latents -> images (B, 3, H, W) in [0, 1]: unpack to (B, 16, 1, H/8, W/8), undo the per-channel
    normalization (x * std + mean), decode, drop the frame axis, clamp(img/2 + 0.5)."""
    latents = QwenImagePipeline._unpack_latents(x, resolution, resolution, 2 ** len(vae.config.temperal_downsample))
    mean, std = latent_stats(vae, x.device)
    latents = latents / (1 / std) + mean  # x * std + mean as the pipeline writes it: its bits exactly
    with autocast(x.device):
        image = vae.decode(latents, return_dict=False)[0][:, :, 0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode_image(vae, pixels, generator):
    """Offline mode's x0 (METHOD.md §5): uint8 pixels (H, W, 3), already at the training size, mapped to [-1, 1],
    given a frame axis (1, 3, 1, H, W), encoded by the VAE, normalized per channel (x - mean) / std, packed."""
    h, w = pixels.shape[:2]
    x = (pixels.permute(2, 0, 1)[None, :, None].float() / 127.5 - 1).to(vae.device, vae.dtype)
    latents = vae.encode(x).latent_dist.sample(generator=generator).float()
    mean, std = latent_stats(vae, latents.device)
    return QwenImagePipeline._pack_latents((latents - mean) / std, 1, 16, h // 8, w // 8)


def blocks(transformer):
    """The transformer's blocks, each one FSDP2 unit: Qwen-Image has one kind, the double-stream (MMDiT) block."""
    return list(transformer.transformer_blocks)


def unused(transformer):
    """The modules whose output the model discards, so their weights never get a gradient: the last block's text
    stream after attention (to_add_out, txt_mlp). train.py freezes them and puts no LoRA adapter there (DDP would
    wait for their gradients forever; FSDP2 leaves them None). FLUX has none: its last double block's text feeds
    the single-stream blocks."""
    last = f"transformer_blocks.{len(transformer.transformer_blocks) - 1}"
    return [f"{last}.attn.to_add_out", f"{last}.txt_mlp.net.0.proj", f"{last}.txt_mlp.net.2"]


def transformer_on_meta(model_dir):
    """QwenImageTransformer2DModel from the folder's config on the meta device: shapes only, no memory; then
    flux.fill_from_checkpoint. Its RoPE tables (pos_embed) are plain attributes, complex numbers that a buffer would
    lose: no checkpoint and no to_empty would fill them, so they are built again, on the CPU, as the model builds
    them (the transformer moves them to its device at each call)."""
    config = QwenImageTransformer2DModel.load_config(model_dir, subfolder="transformer")
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel.from_config(config)
    rope = transformer.pos_embed
    with torch.device("cpu"):
        transformer.pos_embed = type(rope)(theta=rope.theta, axes_dim=rope.axes_dim, scale_rope=rope.scale_rope)
    return transformer


# Where LoRA adapters go (train.py --lora-rank): the 12 linears of every QwenImageTransformerBlock's attention and
# MLPs, image stream and text stream, the analogue of flux.LORA_TARGETS (the model's own tensor-parallel plan lists
# the same 12). Not the modulations img_mod / txt_mod, as FLUX's norms are not; diffusers' Qwen-Image LoRA script
# defaults to the first 4 (image attention) only.
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                "txt_mlp.net.2")
