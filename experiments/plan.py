"""FLUX.1-dev's or Qwen-Image's memory per GPU, planned: weights, gradients, AdamW, bf16 copies, frozen models and
activations for 1, 8, 16, 32 GPUs under FSDP and DDP, with and without checkpointing, and LoRA (METHOD.md §5); and
one GPU of 24, 48 or 80 GB (Qwen-Image: and 141) training LoRA adapters on a bf16 or a 4-bit (--quantize-base nf4)
base, term by term. The two models differ only in MODELS' data; the code below serves both.

    python -m experiments.plan                   # FLUX.1-dev: about 15 s on a 2-core CPU (the activation estimate)
    python -m experiments.plan --model qwen      # Qwen-Image, at a long prompt's length and at 1024 tokens: ~35 s
    python -m experiments.plan --json plan.json

Parameters are counted exactly on the meta device; the activations are an estimate (activation_estimate): the
tensors autograd saves, counted on smaller models on a CPU under CUDA's autocast policy, extrapolated. gpu.py holds
each term against its measurement at FLUX.1-dev's width; Qwen-Image's are held against no measurement yet.
"""
import argparse
import functools
import glob
import json
import math
import os

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, T5Config, T5EncoderModel)

import flux
import qwen
import train
from experiments.measure import FLUX_DEV, FLUX_VAE, VIT_H_14, md_table, rope_axes
from flux import NF4_BYTES, add_lora
from srpo_reward import SRPReward

# The text encoders, only counted: training caches their output (FLUX.1-dev's config.json files).
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # text_encoder_2/
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77)  # text_encoder/
# Qwen/Qwen-Image's config.json files: transformer/, vae/ (diffusers' defaults), text_encoder/ (Qwen2.5-VL-7B)
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
QWEN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True])
QWEN25_VL_7B = dict(
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
    tie_word_embeddings=False)
RESOLUTION = 720            # the release's training size (METHOD.md §5): 512 text + (720 / 16)^2 = 2025 image tokens
TEXT_TOKENS = 512
PROMPTS = 21                # train.py keeps steps + 1 cached embeddings on the GPU; the release's 20 steps
# Qwen-Image's text is as long as its prompt (qwen.encode_prompts keeps the pipeline's tokens, at most 1024, the
# release's padding). ASSUMED, not counted (no Qwen2.5-VL tokenizer offline): a long HPDv2 prompt, written for CLIP's
# 77-token window, is at most 128 tokens with the 5 of the chat template's end. 1024: the longest train.py allows.
QWEN_TEXT_TOKENS = (128, 1024)
QWEN_NEGATIVE_TOKENS = 5    # "" in the chat template (qwen.py): true CFG's negative, cached beside every prompt
QWEN_PROMPTS = 2            # train.py holds the step's conditioning and the sample grid's, each with the negative's
WORLD_SIZES = (1, 8, 16, 32)
LORA_RANK = 64              # README's one-GPU command (Flow-GRPO's FLUX LoRA uses 64 too)
LORA_WORLD_SIZES = (1, 8)
USABLE = 0.9                # of a card's GiB: 10% go to the CUDA context, NCCL buffers and allocator fragmentation
# One GPU (one_gpu_row): train.py --lora-rank R --strategy ddp, with a bf16 or an nf4 base
CARDS = (24, 48, 80)        # GiB: an RTX 3090 / 4090, an RTX A6000 / L40S, an A100 / H100 80GB (nominal sizes)
H200 = 141                  # GiB, nominal (nvidia-smi: 143,771 MiB), for Qwen-Image's 20B
ONE_GPU_RANKS = (16, LORA_RANK)
BASES = ("bf16", "nf4")
# ASSUMED, not measured: what a process holds outside torch's allocator (the CUDA context, which a first CUDA call
# makes, 0.3-0.7 GiB by PyTorch users' reports; NCCL's buffers for DDP's communicator), rounded up. The full-depth
# section of gpu.py measures it: the card's used memory while train.py runs, less its max_memory_reserved.
CONTEXT = 2**30
# ASSUMED, where no run in experiments/results records both peaks (measured_reserve): torch's allocator reserves
# this much over what is allocated at the peak (its cached, fragmented blocks).
RESERVE = 1.10
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# What differs between the two models, as data; every function below reads it. family: the model's plumbing
# (flux.py, qwen.py: its TRANSFORMER, VAE, conditioning, velocity, decode, blocks, unused, LORA_TARGETS); blocks:
# each kind of transformer block, its attribute and its count's key in config; embeds(L): one prompt's cached text;
# guidance: the trained step's (Qwen-Image's is 1: one forward, no CFG); held_prompts: the prompts' embeddings held
# on the GPU (full fine-tuning, one GPU), negative_tokens beside each; full_cards and cards: what "fits" counts.
MODELS = {
    "flux": dict(name="FLUX.1-dev", family=flux, config=FLUX_DEV, vae=FLUX_VAE,
                 blocks=dict(double=("transformer_blocks", "num_layers"),
                             single=("single_transformer_blocks", "num_single_layers")),
                 embeds=lambda tokens: dict(encoder_hidden_states=torch.randn(1, tokens, 4096),
                                            pooled_projections=torch.randn(1, 768)),
                 text_width=4096, pooled_width=768, guidance=3.5, text_tokens=(TEXT_TOKENS,), negative_tokens=0,
                 held_prompts=(PROMPTS, 1), text_encoder_name="T5-XXL + CLIP-L",
                 text_encoders=lambda: torch.nn.ModuleList([T5EncoderModel(T5Config(**T5_XXL)),
                                                            CLIPTextModel(CLIPTextConfig(**CLIP_L))]),
                 lora_ranks=ONE_GPU_RANKS, full_cards=(80,), cards=CARDS),
    "qwen": dict(name="Qwen-Image", family=qwen, config=QWEN_IMAGE, vae=QWEN_VAE,
                 blocks=dict(double=("transformer_blocks", "num_layers")),
                 embeds=lambda tokens: dict(encoder_hidden_states=torch.randn(1, tokens, 3584),
                                            encoder_hidden_states_mask=torch.ones(1, tokens, dtype=torch.long)),
                 text_width=3584, pooled_width=0, guidance=1.0, text_tokens=QWEN_TEXT_TOKENS,
                 negative_tokens=QWEN_NEGATIVE_TOKENS, held_prompts=(QWEN_PROMPTS, QWEN_PROMPTS),
                 text_encoder_name="Qwen2.5-VL-7B",
                 text_encoders=lambda: Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_7B)),
                 lora_ranks=(LORA_RANK,), full_cards=(80, H200), cards=(*CARDS, H200)),
}


def count_params(build):
    """Exact parameter count of build(), constructed on the meta device: shapes only, no memory, no weights."""
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def empty_model(build):
    """build() on the CPU with zero weights, quickly (meta, then to_empty): for counting saved activations."""
    with torch.device("meta"):
        model = build()
    model.to_empty(device="cpu")
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data.zero_()
    return model


# ----------------------------------------------------------------------------------------- activations

# CUDA's autocast op lists (PyTorch's "Autocast Op Reference"), by the names torch's Python functions carry: the ops
# that run in bf16 under bf16 autocast, and those that run in fp32. Every other op takes its inputs' dtypes.
AUTOCAST_BF16 = {"__matmul__", "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "chain_matmul", "multi_dot",
                 "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear",
                 "matmul", "mm", "mv", "prelu", "einsum", "scaled_dot_product_attention"}
AUTOCAST_FP32 = {"__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "cosh", "cosine_similarity",
                 "cumprod", "cumsum", "dist", "erfinv", "exp", "expm1", "group_norm", "layer_norm", "log",
                 "log_softmax", "log10", "log1p", "log2", "mse_loss", "norm", "normalize", "pow", "prod", "reciprocal",
                 "rsqrt", "sinh", "softmax", "softmin", "softplus", "sum", "renorm", "tan", "logsumexp", "cdist"}


class CudaAutocast(TorchFunctionMode):
    """CUDA's bf16 autocast, applied on any device above autograd: each listed op's floating inputs are cast as
    CUDA's autocast casts them; an fp32 leaf that requires grad (a weight that trains) is cast to bf16 once per
    context, as autocast caches those casts. On a CPU this gives the dtypes, and so the bytes, that autograd saves
    on a GPU (CPU's own autocast keeps norms in bf16). A class because torch's function modes are; copies: the
    weights' casts by their storages (the plan counts them apart from the activations), each kept until the mode
    ends: a freed cast's address, reused by an activation, would hide that activation from saved_bytes."""

    def __init__(self):
        super().__init__()
        self.cache, self.copies = {}, {}

    def cast(self, t, dtype):
        if not (torch.is_tensor(t) and t.dtype in (torch.float32, torch.bfloat16) and t.dtype != dtype):
            return t
        cached = dtype == torch.bfloat16 and t.requires_grad and t.is_leaf
        copy = self.cache.get(id(t)) if cached else None
        if copy is None:
            copy = t.to(dtype)
            if cached:
                self.cache[id(t)] = copy
        if isinstance(t, torch.nn.Parameter):
            self.copies[copy.untyped_storage().data_ptr()] = copy
        return copy

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        dtype = torch.bfloat16 if name in AUTOCAST_BF16 else torch.float32 if name in AUTOCAST_FP32 else None
        if dtype is not None:
            args, kwargs = tree_map(lambda t: self.cast(t, dtype), (args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def saved_bytes(fn, model, blocks=()):
    """Bytes autograd saves for backward while fn() runs under CudaAutocast, each storage once, the model's
    weights and their bf16 casts excluded, attributed to the (name, module) of blocks that was running when the
    tensor was saved, else to 'other'. Also each block's input bytes (what checkpointing keeps of it), as
    input_<name>."""
    weights, autocast = {p.untyped_storage().data_ptr() for p in model.parameters()}, CudaAutocast()
    seen, out, running = set(), {"other": 0}, ["other"]

    def enter(block, args, kwargs, name):
        running.append(name)
        inputs = [t for t in [*args, *kwargs.values()] if torch.is_tensor(t)]
        out[f"input_{name}"] = sum(t.untyped_storage().nbytes() for t in inputs)

    hooks = [h for name, block in blocks for h in (
        block.register_forward_pre_hook(lambda block, args, kwargs, name=name: enter(block, args, kwargs, name),
                                        with_kwargs=True),
        block.register_forward_hook(lambda *_: running.pop() and None))]

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in weights and ptr not in autocast.copies and ptr not in seen:
            seen.add(ptr)
            out[running[-1]] = out.get(running[-1], 0) + tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        fn()
    for h in hooks:
        h.remove()
    return out


def fit_line(fn, xs, x):
    """fn(x) from the two measurements fn(xs[0]), fn(xs[1]), for quantities linear in x (saved tensors' sizes)."""
    (x0, y0), (x1, y1) = [(xi, fn(xi)) for xi in xs]
    return {key: y0[key] + (y1[key] - y0[key]) * (x - x0) / (x1 - x0) for key in y0}


def transformer_activations(per_block, layers, single_layers, tokens, width):
    """A transformer's saved bytes from its blocks': without checkpointing every block's internals; with it
    (diffusers checkpoints each block) each block's input, tokens x width bf16 values. Qwen-Image has double blocks
    only (no "single" in per_block)."""
    return dict(transformer=layers * per_block["double"] + single_layers * per_block.get("single", 0)
                + per_block["other"],
                transformer_checkpointed=(layers + single_layers) * tokens * width * 2 + per_block["other"])


def activation_estimate(model="flux", text_tokens=TEXT_TOKENS):
    """Bytes of saved activations of one branch's backward at 720x720, text_tokens long text (an estimate, not a GPU
    measurement). Each part's saved tensors (saved_bytes) are measured on the CPU under CUDA's autocast policy
    (CudaAutocast: bf16 matmuls, fp32 norms, as on a GPU) on a smaller model and extrapolated linearly:
      transformer: one block of each kind at text_tokens + 2025 tokens and 24 heads, head_dim 8 and 16,
        extrapolated to 128 (every saved tensor is tokens x width or tokens x heads: flash-style attention
        keeps no tokens x tokens matrix); checkpointed, it recomputes one block's internals at a time in its
        backward (transformer_recompute);
      VAE decode: the model's VAE at 32 and 64 pixels, extrapolated to 720^2 pixels (convolutions: per pixel);
        checkpointed (diffusers checkpoints FLUX's mid block and each up block), the blocks' inputs and the largest
        block's internals, recomputed one block at a time. Qwen-Image's VAE has no checkpointing in diffusers:
        all of its saved tensors, held from the forward's end until its own backward, after the reward's
        (vae_kept);
      reward: ViT-H-14's 32 layers and 16 heads at head_dim 4 and 8, extrapolated to 80 (width 1280), on a
        720x720 image through the reward's own preprocessing; plus the bf16 copy of each of the frozen vision
        tower's fp32 weights, which autocast makes and the backward keeps (the gradient flows to the image
        through them; frozen weights are cast at each use). On one H200 this term measured 1.54 GiB (FLUX.1-dev's
        run; HPSv2.1 and PickScore are both ViT-H-14)."""
    spec = MODELS[model]
    per_block = fit_line(lambda head_dim: narrow_blocks(model, text_tokens, head_dim), (8, 16),
                         spec["config"]["attention_head_dim"])
    per_block = {k: per_block[k] for k in (*spec["blocks"], "other")}
    decoder = decoder_estimate(model)
    internals = [v for k, v in decoder.items() if k != "other" and not k.startswith("input_")]
    vae_decode = decoder["other"] + sum(internals)
    config = spec["config"]
    layers = {kind: config[count] for kind, (_, count) in spec["blocks"].items()}
    width = config["num_attention_heads"] * config["attention_head_dim"]
    checkpointed = spec["family"].VAE._supports_gradient_checkpointing
    acts = dict(
        per_block=per_block,
        **transformer_activations(per_block, layers["double"], layers.get("single", 0),
                                  text_tokens + (RESOLUTION // 16) ** 2, width),
        transformer_recompute=max(per_block[kind] for kind in spec["blocks"]),
        vae_decode=vae_decode,
        vae_decode_checkpointed=decoder["other"] + sum(v for k, v in decoder.items() if k.startswith("input_"))
        + max(internals) if checkpointed else vae_decode,
        reward=reward_estimate())
    if not checkpointed:
        acts["vae_kept"] = vae_decode
    return acts


def narrow_blocks(model, text_tokens, head_dim):
    """saved_bytes of one velocity (the trained step's forward) of the model cut to one block of each kind at
    head_dim, per block and 'other'. Built on the CPU, random weights (Qwen-Image's RoPE tables are plain
    attributes, which a meta build would leave empty; the values change no count)."""
    spec = MODELS[model]
    family = spec["family"]
    config = dict(spec["config"], attention_head_dim=head_dim, axes_dims_rope=rope_axes(head_dim),
                  **{count: 1 for _, count in spec["blocks"].values()})
    transformer = family.TRANSFORMER(**config)
    cond = family.conditioning(spec["embeds"](text_tokens), RESOLUTION, torch.device("cpu"))
    x = family.latent_noise(RESOLUTION, torch.Generator().manual_seed(0), torch.device("cpu"))
    blocks = [(kind, getattr(transformer, attr)[0]) for kind, (attr, _) in spec["blocks"].items()]
    return saved_bytes(lambda: family.velocity(transformer, x, 0.5, cond, spec["guidance"]), transformer, blocks)


@functools.cache  # counted once a run: a decode does not depend on the text's length
def decoder_estimate(model):
    """saved_bytes of the model's VAE decode at 720^2 pixels, by block (mid, up0...), fit from 32 and 64 pixels."""
    family = MODELS[model]["family"]

    def vae(resolution):
        decoder = empty_model(lambda: family.VAE(**MODELS[model]["vae"]))
        x = torch.zeros(1, (resolution // 16) ** 2, 64, requires_grad=True)
        blocks = [("mid", decoder.decoder.mid_block),
                  *((f"up{i}", b) for i, b in enumerate(decoder.decoder.up_blocks))]
        return saved_bytes(lambda: family.decode(decoder, x, resolution), decoder, blocks)
    return fit_line(lambda pixels: vae(math.isqrt(pixels)), (32**2, 64**2), RESOLUTION**2)


@functools.cache  # both models' rewards are ViT-H-14
def reward_estimate():
    """The reward's saved bytes at 720x720 (activation_estimate) plus its vision tower's bf16 weight copies."""
    def clip(head_dim):
        vision = dict(VIT_H_14["vision_config"], hidden_size=16 * head_dim, intermediate_size=64 * head_dim)
        model = empty_model(lambda: CLIPModel(CLIPConfig(**dict(VIT_H_14, vision_config=vision))))
        image = torch.zeros(1, 3, RESOLUTION, RESOLUTION, requires_grad=True)
        return saved_bytes(lambda: SRPReward(model, None, "hps").embed_images(image), model)
    return fit_line(clip, (4, 8), VIT_H_14["vision_config"]["hidden_size"] // 16)["other"] + 2 * vision_params()


def vision_params():
    """ViT-H-14's image tower and projection, counted on the meta device."""
    with torch.device("meta"):
        model = CLIPModel(CLIPConfig(**VIT_H_14))
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(("vision_model", "visual_projection")))


# ----------------------------------------------------------------------------------------- bytes per rank

def frozen_bytes(vae_params, reward_params, prompts, text_tokens, text_width, pooled_width):
    """What does not train: the fp32 VAE and reward model, and the prompts' cached bf16 text embeddings (no text
    encoder: they are freed once the embeddings are cached)."""
    return 4 * (vae_params + reward_params) + 2 * prompts * (text_tokens * text_width + pooled_width)


def rank_memory(num_params, world_size, strategy, block_params, frozen, activations, lora_params=0, unused_params=0,
                cards=(80,), keep_gathered=True):
    """Bytes per rank: train.memory_plan's weights, grads and AdamW states (the numbers train.py prints at start;
    with lora_params, a bf16 base and fp32 adapters; without, every weight but the unused_params train.py freezes),
    plus the larger of what the two phases of a step add on top (METHOD.md §5):
      training: compute copies (FSDP all-gathers bf16 weights block by block, two blocks at once (prefetch) and
        the root module's for the whole step, and holds one block's unsharded grads in bf16 and, for the
        reduce-scatter, in fp32; DDP's autocast makes a bf16 copy of every weight in the forward, which the
        backward keeps without checkpointing, and with it recasts only the block it recomputes and the root's;
        gradient_as_bucket_view spares a second copy of the grads) and activations, one branch at a time: the
        transformer's kept tensors, plus the larger of the copies at its forward's end and, in the backward, the
        copies still held and the largest of the reward's, the VAE decode's and one recomputed block's peaks (the
        backward frees each part's saved tensors before it runs the next part's; a VAE that cannot checkpoint
        still holds all of its own, vae_kept, while the reward's backward runs);
      rollout: no activations, but under FSDP every block's bf16 weights stay gathered for all its steps with
        keep_gathered (flux.rollout; qwen.KEEP_GATHERED is False: then two blocks and the root at a time);
      frozen, both phases: frozen_bytes.
    A LoRA's base is already bf16: DDP makes no copies of it, FSDP still gathers it block by block. fits_{card}gb:
    total at most USABLE of each of cards' GiB."""
    row = dict(world_size=world_size, strategy=strategy, lora_params=lora_params,
               **train.memory_plan(num_params, world_size, strategy,
                                   trainable=lora_params or num_params - unused_params,
                                   frozen_bytes=2 if lora_params else 4))
    row["train_memory_plan_total"] = row.pop("total")
    largest, root = max(block_params), num_params - sum(block_params)
    if strategy == "fsdp":
        row["compute_copies"] = 2 * (2 * largest + root) + (2 + 4) * largest
    else:
        row["compute_copies"] = 2 * (lora_params or num_params)
    row["rollout_copies"] = 0 if lora_params and strategy == "ddp" else \
        2 * (2 * largest + root) if strategy == "fsdp" and not keep_gathered else 2 * num_params
    row["frozen"] = frozen
    for suffix in ("", "_checkpointed"):
        backward_copies = 2 * (largest + root) if suffix and strategy == "ddp" and not lora_params \
            else row["compute_copies"]
        kept = activations[f"transformer{suffix}"]
        parts = max(activations[f"vae_decode{suffix}"], activations.get("vae_kept", 0) + activations["reward"],
                    activations["transformer_recompute"] if suffix else 0)
        row[f"activations{suffix}"] = kept + parts
        row[f"training{suffix}"] = kept + max(row["compute_copies"], backward_copies + parts)
        row[f"total{suffix}"] = row["train_memory_plan_total"] + frozen \
            + max(row[f"training{suffix}"], row["rollout_copies"])
        for card in cards:
            row[f"fits_{card}gb{suffix}"] = row[f"total{suffix}"] <= USABLE * card * 2**30
    return row


def model_plan(model="flux", text_tokens=TEXT_TOKENS):
    """The model's exact parameter counts from its configs on the meta device, and every rank's bytes at
    text_tokens of text."""
    spec = MODELS[model]
    c = one_gpu_counts(model)
    params, vae, reward_params, lora_params = c["params"], c["vae_params"], c["reward_params"], \
        c["lora_params"][LORA_RANK]  # the adapters of --lora-rank 64, exactly
    text_params = count_params(spec["text_encoders"])
    frozen = frozen_bytes(vae, reward_params, spec["held_prompts"][0], text_tokens + spec["negative_tokens"],
                          spec["text_width"], spec["pooled_width"])
    activations = activation_estimate(model, text_tokens)
    keep = spec["family"].KEEP_GATHERED
    plans = [rank_memory(params, w, s, c["block_params"], frozen, activations, 0, c["unused_params"],
                         spec["full_cards"], keep) for w in WORLD_SIZES for s in ("fsdp", "ddp")]
    plans += [rank_memory(params, w, s, c["block_params"], frozen, activations, lora_params, 0, spec["full_cards"],
                          keep) for w in LORA_WORLD_SIZES for s in ("fsdp", "ddp")]
    return dict(model=model, params=params, unused_params=c["unused_params"], lora_rank=LORA_RANK,
                lora_params=lora_params, vae_params=vae, reward_params=reward_params, text_encoder_params=text_params,
                text_encoders_bf16_while_caching=2 * text_params, frozen=frozen, resolution=RESOLUTION,
                text_tokens=text_tokens, activations=activations, cards=spec["full_cards"], usable=USABLE,
                plans=plans, one_gpu=one_gpu_plan(c, activations, text_tokens=text_tokens))


def flux_dev_plan():
    """FLUX.1-dev's plan (model_plan), as bench.py and gpu_report.py ask for it."""
    return model_plan("flux")


# ----------------------------------------------------------------------------------------- one GPU, LoRA

def one_gpu_counts(model="flux"):
    """What the rows count, on the meta device: the model's weights, those of its nn.Linear layers (what
    flux.quantize_nf4 quantizes) and the largest of them, each block's (FSDP's units) and the unused modules'
    (family.unused: train.py freezes them), the adapters of each of the model's LoRA ranks on family.LORA_TARGETS
    but the unused (add_lora, as train.py adds them), the VAE, the reward and its vision tower."""
    spec = MODELS[model]
    family = spec["family"]
    with torch.device("meta"):
        transformer = family.TRANSFORMER(**spec["config"])
        unused = family.unused(transformer)
        linears = [m.weight.numel() for m in transformer.modules() if type(m) is torch.nn.Linear]
        lora = {rank: sum(p.numel() for p in add_lora(family.TRANSFORMER(**spec["config"]), rank, rank, torch.bfloat16,
                                                      0, family.LORA_TARGETS, unused).parameters() if p.requires_grad)
                for rank in spec["lora_ranks"]}
    return dict(model=model, params=sum(p.numel() for p in transformer.parameters()), linear_weights=sum(linears),
                largest_linear=max(linears), lora_params=lora,
                block_params=[sum(p.numel() for p in b.parameters()) for b in family.blocks(transformer)],
                unused_params=sum(p.numel() for name in unused for p in transformer.get_submodule(name).parameters()),
                vae_params=count_params(lambda: family.VAE(**spec["vae"])),
                reward_params=count_params(lambda: CLIPModel(CLIPConfig(**VIT_H_14))), vision_params=vision_params())


def one_gpu_row(c, activations, base, rank, reserve=RESERVE, context=CONTEXT, text_tokens=TEXT_TOKENS):
    """Bytes on one GPU for train.py --lora-rank rank --strategy ddp on c's model (c = one_gpu_counts(model)),
    720x720, one prompt at a time, checkpointed (METHOD.md §5); PLANNED, term by term:
      base_weights: bf16, 2 bytes a weight; nf4: flux.NF4_BYTES a weight of the nn.Linear layers, the rest bf16;
      adapters: fp32 weights, fp32 gradients, fp32 AdamW's two states: 16 bytes an adapter weight;
      reward, vae: frozen, bf16 on the nf4 path, fp32 on the bf16 base's (as train.py loads them);
      text: the held prompts' cached embeddings in bf16 (FLUX: one prompt's T5 and pooled CLIP; Qwen-Image: the
        step's and the sample grid's, text_tokens each, with the negative's; encode_prompts reads each when used);
      activations: a branch's (activation_estimate): the blocks' checkpointed inputs, the adapters' bf16 casts
        (autocast keeps them for the backward), and the largest part's peak in the backward: the VAE decode's, the
        reward's (its bf16 copy of fp32 vision weights only where the reward is fp32; plus vae_kept where the VAE
        cannot checkpoint) or a recomputed block's;
      dequantized: nf4 only, the largest linear layer's weight dequantized to bf16 for its matmul (one at a time,
        in the rollout and the backward alike);
    allocated, their sum; reserve, the allocator's cache above it ((reserve - 1) x allocated); context, outside
    torch's allocator. total = allocated + reserve + context; fits a card of the model's cards (GiB) if total is at
    most that."""
    a, lora, spec = activations, c["lora_params"][rank], MODELS[c["model"]]
    frozen = 2 if base == "nf4" else 4
    reward_peak = a["reward"] - (2 * c["vision_params"] if base == "nf4" else 0)
    row = dict(base=base, rank=rank, lora_params=lora,
               base_weights=2 * c["params"] if base == "bf16" else
               NF4_BYTES * c["linear_weights"] + 2 * (c["params"] - c["linear_weights"]),
               adapters=16 * lora, reward=frozen * c["reward_params"], vae=frozen * c["vae_params"],
               text=2 * spec["held_prompts"][1] * ((text_tokens + spec["negative_tokens"]) * spec["text_width"]
                                                   + spec["pooled_width"]),
               activations=a["transformer_checkpointed"] + 2 * lora
               + max(a["vae_decode_checkpointed"], a.get("vae_kept", 0) + reward_peak, a["transformer_recompute"]),
               dequantized=2 * c["largest_linear"] if base == "nf4" else 0)
    row["allocated"] = sum(row[k] for k in ("base_weights", "adapters", "reward", "vae", "text", "activations",
                                            "dequantized"))
    row.update(reserve=(reserve - 1) * row["allocated"], context=context)
    row["total"] = row["allocated"] + row["reserve"] + context
    # 8-bit AdamW (bitsandbytes' AdamW8bit) keeps its two states in 1 byte each, not 4: 6 bytes an adapter less
    row["total_adamw_8bit"] = row["total"] - 6 * lora * reserve
    row["fits"] = {card: row["total"] <= card * 2**30 for card in spec["cards"]}
    row["fits_adamw_8bit"] = {card: row["total_adamw_8bit"] <= card * 2**30 for card in spec["cards"]}
    return row


def measured_reserve(results=RESULTS):
    """(the largest max_reserved_gib / max_memory_gib of any train.py run on a GPU recorded in results' metrics
    files, the file), or (None, None) where no file records both peaks."""
    rows = [(row, os.path.basename(path)) for path in sorted(glob.glob(os.path.join(results, "*metrics.jsonl")))
            for row in map(json.loads, open(path))]
    ratios = [(row["max_reserved_gib"] / row["max_memory_gib"], name) for row, name in rows
              if row.get("max_reserved_gib") and row.get("max_memory_gib")]
    return max(ratios) if ratios else (None, None)


def one_gpu_plan(c, activations, results=RESULTS, text_tokens=TEXT_TOKENS):
    """Every one-GPU row (c = one_gpu_counts(model)): BASES x the model's LoRA ranks, with the reserve measured in
    results where a run records it, else RESERVE (assumed). The runs in results are FLUX.1-dev's."""
    measured, source = measured_reserve(results)
    reserve = measured or RESERVE
    return dict(counts=c, reserve=reserve, reserve_source=source or "assumed", context=CONTEXT,
                cards=MODELS[c["model"]]["cards"], rows=[one_gpu_row(c, activations, base, rank, reserve,
                                                                     text_tokens=text_tokens)
                                                         for base in BASES for rank in c["lora_params"]])


def one_gpu_table(p):
    """The one-GPU rows as markdown, GiB, with what needs 8-bit AdamW."""
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    yes = lambda fits: "yes" if fits else "no"  # noqa: E731
    eight = [f"{r['base']} rank {r['rank']} on {card} GB" for r in p["rows"] for card in p["cards"]
             if r["fits_adamw_8bit"][card] and not r["fits"][card]]
    source = "ASSUMED" if p["reserve_source"] == "assumed" else f"measured in {p['reserve_source']}"
    reserve = f"{p['reserve'] - 1:.0%} of allocated ({source})"
    return (f"PLANNED (not measured): train.py --lora-rank R --strategy ddp [--quantize-base nf4], "
            f"{MODELS[p['counts']['model']]['name']} at {RESOLUTION}x{RESOLUTION}, one prompt at a time, checkpointed. "
            f"Reserve: {reserve}; context: {gib(p['context'])} GiB (ASSUMED). fits: total at most the card's GiB.\n\n"
            + md_table(["base", "LoRA rank", "base weights", "adapters + grads + AdamW", "reward", "VAE", "text emb.",
                        "activations, ckpt", "dequantized layer", "allocated", "reserve", "context", "total",
                        *(f"fits {card} GB" for card in p["cards"])],
                       [[r["base"], r["rank"], gib(r["base_weights"]), gib(r["adapters"]), gib(r["reward"]),
                         gib(r["vae"]), gib(r["text"]), gib(r["activations"]), gib(r["dequantized"]),
                         gib(r["allocated"]), gib(r["reserve"]), gib(r["context"]), gib(r["total"]),
                         *(yes(r["fits"][card]) for card in p["cards"])] for r in p["rows"]])
            + "\n8-bit AdamW (6 bytes an adapter weight less): needed for "
            + (", ".join(eight) if eight else "none of these rows: no row fits a card only with it") + ".\n")


def table(plan):
    """The plan as markdown: what it counts, then a row per world size and strategy, GiB."""
    gib = lambda b: f"{b / 2**30:.1f}"  # noqa: E731
    yes = lambda fits: "yes" if fits else "no"  # noqa: E731
    a, spec = plan["activations"], MODELS[plan["model"]]
    unused = f" ({plan['unused_params']:,} of them unused: frozen, as train.py freezes them)" \
        if plan["unused_params"] else ""
    vae = f"checkpointed {gib(a['vae_decode_checkpointed'])}" if "vae_kept" not in a else \
        "no checkpointing (diffusers has none for this VAE): held through the reward's backward"
    cards = " or ".join(map(str, plan["cards"]))
    return (f"transformer: {plan['params']:,} parameters{unused}; VAE {plan['vae_params']:,}; reward (ViT-H-14) "
            f"{plan['reward_params']:,}. Text encoders: none while training (embeddings cached); "
            f"{spec['text_encoder_name']} ({plan['text_encoder_params']:,} parameters), "
            f"{gib(plan['text_encoders_bf16_while_caching'])} GiB in bf16, only while caching before step 1.\n"
            f"activations at {RESOLUTION}x{RESOLUTION} (estimate, see activation_estimate): transformer "
            f"{gib(a['transformer'])}, checkpointed {gib(a['transformer_checkpointed'])}; VAE decode "
            f"{gib(a['vae_decode'])}, {vae}; reward {gib(a['reward'])}. Fits: at most {USABLE:.0%} of {cards} GiB.\n\n"
            "total = weights + grads + AdamW + frozen + the larger of (bf16 copies + activations) while training "
            "and (all bf16 weights) while rolling out.\n\n"
            f"LoRA rows: rank {plan['lora_rank']} adapters on {spec['name']}'s targets "
            f"({spec['family'].__name__}.LORA_TARGETS{', less the unused' if unused else ''}), "
            f"{plan['lora_params']:,} parameters, trained in fp32 on a frozen bf16 base.\n\n"
            + md_table(["GPUs", "strategy", "weights", "grads", "AdamW", "bf16 copies", "VAE, reward, text emb.",
                        "activations", "total", *(f"fits {card} GB" for card in plan["cards"]), "activations, ckpt",
                        "total, ckpt", *(f"fits {card} GB, ckpt" for card in plan["cards"])],
                       [[r["world_size"], r["strategy"] + (" LoRA" if r["lora_params"] else ""), gib(r["weights"]),
                         gib(r["grads"]), gib(r["optimizer"]), gib(r["compute_copies"]), gib(r["frozen"]),
                         gib(r["activations"]), gib(r["total"]), *(yes(r[f"fits_{c}gb"]) for c in plan["cards"]),
                         gib(r["activations_checkpointed"]), gib(r["total_checkpointed"]),
                         *(yes(r[f"fits_{c}gb_checkpointed"]) for c in plan["cards"])] for r in plan["plans"]]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flux", choices=MODELS, help="whose memory to plan")
    p.add_argument("--json", help="also write every number to this file (a list, one plan a text length)")
    args = p.parse_args(argv)
    spec, plans = MODELS[args.model], []
    for tokens in spec["text_tokens"]:
        plan = model_plan(args.model, tokens)
        text = f", {tokens} text tokens" if len(spec["text_tokens"]) > 1 else ""
        print(f"## {spec['name']} memory per rank{text}, GiB\n\n{table(plan)}")
        print(f"## One GPU, LoRA on a bf16 or an nf4 base{text}, GiB\n\n{one_gpu_table(plan['one_gpu'])}")
        plans.append(plan)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plans if len(plans) > 1 else plans[0], f, indent=2)


if __name__ == "__main__":
    main()
