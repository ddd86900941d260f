"""FLUX plumbing that SRPO needs around the transformer: text conditioning, packed latents, the velocity, the
no-gradient rollout, decoding, and loading the 12B transformer one shard per rank (METHOD.md §5).

Nothing here is SRPO: it is what diffusers' FluxPipeline does inside its sampling loop, split into the pieces the
method calls one at a time. A second model family would plug in by providing the same functions.
Shapes: packed latents x are (1, (H/16) * (W/16), 64), 16 VAE channels in 2x2 patches.
"""
import hashlib
import json
import math
import os
import socket
from contextlib import nullcontext

import bitsandbytes as bnb
import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm import tqdm

from direct_align import euler_step, sigma_schedule

PIPELINE, TRANSFORMER, VAE = FluxPipeline, FluxTransformer2DModel, AutoencoderKL  # what a --model folder holds
AUTOCAST_DEVICES = ("cuda",)  # where the release's bf16 autocast runs; a CPU computes in fp32 (tests compare there)


def autocast(device):
    """The release's bf16 autocast on a GPU (METHOD.md §5); nothing on a CPU."""
    device = torch.device(device)
    return torch.autocast(device.type, torch.bfloat16) if device.type in AUTOCAST_DEVICES else nullcontext()


def encode_prompts(model_dir, prompts, max_sequence_length, cache_dir, device, dtype):
    """FLUX conditioning of each prompt: T5 sequence and CLIP pooled embeddings (METHOD.md §5), cached (text_cache).
    Returns embeds(prompt)."""
    def encode(pipe, prompt):
        embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, device=device,
                                               max_sequence_length=max_sequence_length)
        return dict(encoder_hidden_states=embeds, pooled_projections=pooled)
    return text_cache(model_dir, prompts, max_sequence_length, cache_dir, device, TEXT_KEYS,
                      lambda: FluxPipeline.from_pretrained(model_dir, transformer=None, vae=None, dtype=dtype), encode)


TEXT_KEYS = ("encoder_hidden_states", "pooled_projections")  # one FLUX text_cache file's tensors


def text_cache(model_dir, prompts, max_sequence_length, cache_dir, device, keys, load_encoder, encode):
    """A model's text embeddings of each prompt, encode(pipeline, prompt) -> {key: tensor} for each of keys. They
    depend only on the caption, so they are computed once with the pipeline load_encoder() returns (its text encoders
    only), cached as safetensors with the sha256 of their bytes, and the encoders freed. A file whose tensors no
    longer match it (cut short, or bytes flipped by a disk) is computed again, with one line. Returns
    embeds(prompt), which reads one prompt's tensors from the cache onto the device (a few MB each: read when used
    rather than all kept on the GPU)."""
    stamp = os.path.getmtime(os.path.join(model_dir, "model_index.json"))  # a model rebuilt in place: new keys

    def path(prompt):
        key = f"{os.path.abspath(model_dir)}|{stamp}|{max_sequence_length}|{prompt}"
        return os.path.join(cache_dir, hashlib.sha1(key.encode()).hexdigest() + ".safetensors")

    def digest(tensors):  # of the raw bytes, key by key: a flipped bit anywhere changes it
        h = hashlib.sha256()
        for key in keys:
            h.update(tensors[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def intact(file):  # written whole and renamed; a disk or a hand may still cut or garble it
        try:
            with safe_open(file, "pt") as f:
                return set(f.keys()) == set(keys) and (f.metadata() or {}).get("sha256") == \
                    digest({k: f.get_tensor(k) for k in keys})
        except (SafetensorError, OSError):
            return False
    todo = [p for p in dict.fromkeys(prompts) if not intact(path(p))]
    damaged = sum(os.path.isfile(path(p)) for p in todo)
    if damaged:
        tqdm.write(f"{cache_dir}: {damaged} damaged text embeddings computed again")
    if todo:
        os.makedirs(cache_dir, exist_ok=True)
        pipe = load_encoder().to(device)
        for prompt in tqdm(todo, desc="text embeddings", leave=False, disable=len(todo) < 50):
            with torch.no_grad():
                tensors = encode(pipe, prompt)
            tmp = f"{path(prompt)}.{socket.gethostname()}.{os.getpid()}.tmp"  # ranks of all nodes may write it
            tensors = {k: v.cpu() for k, v in tensors.items()}
            save_file(tensors, tmp, metadata={"sha256": digest(tensors)})
            os.replace(tmp, path(prompt))
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return lambda prompt: load_file(path(prompt), device=str(device))


def velocity(transformer, x, sigma, cond, guidance):
    """FLUX's velocity v = noise - x0 at packed latents x. The release feeds the timestep
    floor(sigma * 1000) / 1000 (METHOD.md §3); guidance only where the model embeds it (FLUX.1-dev does,
    FLUX.1-schnell does not)."""
    t = torch.full((x.shape[0],), math.floor(float(sigma) * 1000) / 1000, device=x.device)
    embeds_guidance = getattr(transformer, "module", transformer).config.guidance_embeds  # DDP wraps the model
    g = torch.full_like(t, guidance) if guidance is not None and embeds_guidance else None
    with autocast(x.device):
        v = transformer(hidden_states=x, timestep=t, guidance=g, return_dict=False, **cond)[0]
    return v.float()


def latent_noise(resolution, generator, device):
    """Gaussian noise in FLUX's packed layout: 16 channels at H/8 x W/8, in 2x2 patches (METHOD.md §5)."""
    h = w = resolution // 8
    noise = torch.randn(1, 16, h, w, generator=generator)
    return FluxPipeline._pack_latents(noise, 1, 16, h, w).to(device)


MAX_TOKENS = 512  # T5's tokens: FluxPipeline refuses more
SAMPLE_GUIDANCE = 3.5  # sample.py's default guidance_scale: the release's, FLUX.1-dev's embedded guidance


def sample_args(height, width, num_inference_steps, guidance_scale, max_sequence_length):
    """FluxPipeline's arguments for sample.py's settings: guidance_scale is the guidance FLUX.1-dev embeds."""
    return dict(height=height, width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                max_sequence_length=max_sequence_length)


def condition(embeds, caption, resolution, device):
    """conditioning of caption, from embeds(prompt) (encode_prompts'): what train.py asks every model family for."""
    return conditioning(embeds(caption), resolution, device)


def conditioning(embeds, resolution, device):
    """The transformer's keyword inputs besides x and t: text embeddings, text ids zeros(L, 3), image ids
    [0, row, col] of the 2x2 patches."""
    ids = FluxPipeline._prepare_latent_image_ids(1, resolution // 16, resolution // 16, device, torch.float32)
    txt_ids = torch.zeros(embeds["encoder_hidden_states"].shape[1], 3, device=device)
    return dict(embeds, txt_ids=txt_ids, img_ids=ids)


KEEP_GATHERED = True  # rollout's FSDP2 choice for FLUX: its 24 GB of gathered bf16 weights fit beside the shards


@torch.no_grad()
def rollout(transformer, noise, cond, steps, shift, guidance, progress=False, velocity_of=velocity,
            keep_gathered=KEEP_GATHERED):
    """x0 of the current model: Euler steps on the shift-3 grid from pure noise (METHOD.md §5), no gradient.
    Under FSDP2 with keep_gathered each block keeps its gathered weights for all the steps (one all-gather per
    rollout, not one per step; FLUX's bf16 copy fits beside the shards from 8 GPUs on) and frees them at the end;
    without, each forward gathers block by block as in training (FSDP2 prefetches the next block). Under DDP
    the fp32 weights are cast to bf16 once per rollout, not once per step: autocast keeps its casts of weights
    until its outermost context ends, and one context here holds velocity's for all the steps. velocity_of: the
    model family's velocity (qwen.velocity for Qwen-Image)."""
    if torch.is_autocast_enabled(noise.device.type):  # METHOD.md §7
        raise RuntimeError("rollout inside an autocast region: its bf16 casts of the weights, made without "
                           "gradient, would be reused by later passes until that region ends, and give no gradient")
    blocks = [m for m in transformer.modules() if isinstance(m, FSDPModule) and m is not transformer] \
        if keep_gathered else []
    for block in blocks:
        block.set_reshard_after_forward(False)
    sigmas = sigma_schedule(steps, shift)
    x = noise
    with autocast(noise.device):
        for sigma, sigma_next in tqdm(list(zip(sigmas[:-1], sigmas[1:])), desc="rollout", leave=False,
                                      disable=not progress):
            x = euler_step(x, velocity_of(transformer, x, sigma, cond, guidance), sigma, sigma_next)
    for block in blocks:
        block.reshard()
        block.set_reshard_after_forward(True)
    return x


def decode(vae, x, resolution):
    """Packed latents -> images in [0, 1]: unpack, undo the VAE's shift/scale, decode, clamp(img/2 + 0.5)."""
    latents = FluxPipeline._unpack_latents(x, resolution, resolution, 2 ** (len(vae.config.block_out_channels) - 1))
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    with autocast(x.device):
        image = vae.decode(latents, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode_image(vae, pixels, generator):
    """Offline mode's x0 (METHOD.md §5): uint8 pixels (H, W, 3), already at the training size, mapped to [-1, 1],
    encoded by the VAE, shifted and scaled, packed."""
    h, w = pixels.shape[:2]
    x = (pixels.permute(2, 0, 1)[None].float() / 127.5 - 1).to(vae.device, vae.dtype)
    latents = vae.encode(x).latent_dist.sample(generator=generator)
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    return FluxPipeline._pack_latents(latents.float(), 1, 16, h // 8, w // 8)


def checkpoint_files(model_dir):
    """{tensor name: safetensors file} of a diffusers transformer folder, one file or an index of shards."""
    folder = os.path.join(model_dir, "transformer")
    index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    if os.path.isfile(index):
        return {k: os.path.join(folder, f) for k, f in json.load(open(index))["weight_map"].items()}
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    with safe_open(path, "pt") as f:
        return {k: path for k in f.keys()}


@torch.no_grad()
def fill_from_checkpoint(transformer, model_dir, lora_seed=0):
    """Fill a transformer built on the meta device (and sharded, or not) from its safetensors, one tensor at a
    time: each full tensor is read lazily, cast to the parameter's dtype, and this rank keeps only its own
    shard. A rank's peak is then its shard plus the largest single tensor, never the whole model. LoRA adapters
    (not in the checkpoint) start from initial_lora."""
    files = checkpoint_files(model_dir)
    params = {name.replace(".base_layer.", "."): (name, p) for name, p in transformer.named_parameters()}
    base = {k for k, (name, _) in params.items() if ".lora_" not in name}
    if files.keys() != base:
        missing = sorted(base - files.keys()) or sorted(files.keys() - base)
        raise ValueError(f"{model_dir}/transformer: {len(missing)} tensors differ from the config, e.g. {missing[0]}")
    handles = {}
    for key, (name, param) in params.items():
        if key not in files:
            full = initial_lora(name, param.shape, lora_seed).to(device=param.device, dtype=param.dtype)
        else:
            f = handles.get(files[key]) or handles.setdefault(files[key], safe_open(files[key], "pt", device="cpu"))
            full = f.get_tensor(key).to(device=param.device, dtype=param.dtype)
        if isinstance(param, DTensor):  # keep this rank's piece; every rank read the same tensor: no communication
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param = param.to_local()
        param.copy_(full)
        del full
    return transformer


def blocks(transformer):
    """The transformer's blocks, each one FSDP2 unit: FLUX's double-stream blocks, then its single-stream ones."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def unused(transformer):
    """The modules whose weights never get a gradient (qwen.unused's): none in FLUX, where every output is used."""
    return []


def transformer_on_meta(model_dir):
    """FluxTransformer2DModel from the folder's config on the meta device: shapes only, no memory."""
    config = FluxTransformer2DModel.load_config(model_dir, subfolder="transformer")
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(config)


# Where LoRA adapters go (train.py --lora-rank): the attention projections of both kinds of block and the double
# blocks' feed-forwards, the default set of diffusers' FLUX LoRA training script (train_dreambooth_lora_flux.py),
# which Flow-GRPO's FLUX LoRA uses too. "attn.to_q/k/v" match in the single blocks as well.
LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2")


def initial_lora(name, shape, seed):
    """An adapter's start, the same on every rank and strategy: lora_A normal with standard deviation 1 / rank
    (peft's "gaussian"), from a generator seeded by the parameter's name; lora_B = 0, so training starts from the
    base model."""
    if ".lora_B." in name:
        return torch.zeros(shape)
    digest = int(hashlib.sha256(f"{seed}|{name}".encode()).hexdigest()[:15], 16)
    return torch.randn(shape, generator=torch.Generator().manual_seed(digest)) / shape[0]


@torch.no_grad()
def add_lora(transformer, rank, alpha, base_dtype, seed, targets=None, exclude=()):
    """peft LoRA adapters of `rank` on targets (default LORA_TARGETS) but the modules named in exclude, scaled by
    alpha / rank (diffusers' add_adapter). The base is frozen in base_dtype (never updated: bf16 on a GPU); the
    adapters are fp32 and start from initial_lora (small updates at these learning rates vanish in bf16, METHOD.md
    §7). On the meta device only the dtypes are set: fill_from_checkpoint gives the values."""
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=list(targets or LORA_TARGETS),
                                       exclude_modules=list(exclude) or None))
    for name, p in transformer.named_parameters():
        if not p.is_floating_point():  # a 4-bit base's packed weights (quantize_nf4) stay as they are
            continue
        p.data = p.data.to(torch.float32 if p.requires_grad else base_dtype)
        if p.requires_grad and p.device.type != "meta":
            p.copy_(initial_lora(name, p.shape, seed))
    return transformer


# Bytes a weight of a 4-bit base takes in bitsandbytes' NF4 with QLoRA's double quantization: 4 bits, an absmax scale
# for each block of 64 weights in 8 bits, and an fp32 scale for each block of 256 of those.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# On CPUs with AVX512-BF16, bitsandbytes runs inference (eval mode, no gradient) through a packed bf16 kernel: bf16
# where the rest of a CPU run is fp32, so results depend on the CPU, and it fails on layers narrower than its blocks
# of 64 (the tiny models'). Turned off, every CPU dequantizes to compute_dtype and multiplies, as a GPU does.


@torch.no_grad()
def quantize_nf4(model, device, compute_dtype):
    """Every nn.Linear of model in NF4, QLoRA's 4-bit NormalFloat with its double quantization, as diffusers'
    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True) quantizes FLUX:
    bitsandbytes' Linear4bit, each weight quantized on `device` as its layer is replaced, so only one layer is ever
    there unquantized; biases and the other weights are moved there as they are. Linear4bit dequantizes a block to
    compute_dtype for each matmul (bf16 on a GPU). The base is frozen: LoRA adapters (add_lora, after this) train
    around it (train.py --quantize-base nf4, METHOD.md §5)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                q.support_avx512bf16_for_cpu = False  # see NF4_BYTES' comment
                setattr(module, name, q.to(device))
    return model.to(device).requires_grad_(False)


def num_weights(model):
    """The model's parameter count, a 4-bit weight counted as the weights it packs."""
    return sum(p.quant_state.shape.numel() if isinstance(p, bnb.nn.Params4bit) else p.numel()
               for p in model.parameters())


def save_weights(transformer, folder, rank, pipeline=FluxPipeline):
    """The published weights of a checkpoint (train.py), written by rank 0, every rank gathering. Every weight trained:
    the full transformer in diffusers naming (what FluxPipeline's transformer loads) and its config, in bf16 (half
    the release's fp32 file; FLUX.1-dev runs in bf16; the exact fp32 weights stay in state/). LoRA:
    pytorch_lora_weights.safetensors in diffusers' format, with its rank and alpha, what
    FluxPipeline.load_lora_weights takes (pipeline: the model family's, whose save_lora_weights names the file's
    keys)."""
    model = getattr(transformer, "module", transformer)
    lora = getattr(model, "peft_config", None)
    full = get_model_state_dict(transformer, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                     ignore_frozen_params=bool(lora)))
    if rank == 0 and lora:
        layers = get_peft_model_state_dict(model, full)
        # the config names the adapted layers themselves, so a loader finds what it names (with exclude_modules, it
        # would warn that nothing was excluded; with the suffixes alone, that some targets have no weights)
        config = {**lora["default"].to_dict(), "exclude_modules": None,
                  "target_modules": sorted({k.rsplit(".lora_", 1)[0] for k in layers})}
        pipeline.save_lora_weights(folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config)
    elif rank == 0:
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in full.items()},
                  os.path.join(folder, "diffusion_pytorch_model.safetensors"))
        model.save_config(folder)
