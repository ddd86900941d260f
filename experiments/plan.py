"""FLUX.1-dev's memory per GPU, planned: weights, gradients, AdamW, bf16 copies, frozen models and activations
for 1, 8, 16, 32 GPUs under FSDP and DDP, with and without checkpointing, and LoRA (METHOD.md §5); and one GPU of
24, 48 or 80 GB training LoRA adapters on a bf16 or a 4-bit (--quantize-base nf4) base, term by term.

    python -m experiments.plan                   # the tables: about 15 s on a 2-core CPU (the activation estimate)
    python -m experiments.plan --json plan.json

Parameters are counted exactly on the meta device; the activations are an estimate (activation_estimate): the
tensors autograd saves, counted on smaller models on a CPU under CUDA's autocast policy, extrapolated. gpu.py holds
each term against its measurement at FLUX.1-dev's width.
"""
import argparse
import glob
import json
import math
import os

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

import train
from experiments.measure import FLUX_DEV, FLUX_VAE, VIT_H_14, md_table, rope_axes
from flux import NF4_BYTES, add_lora, conditioning, decode, latent_noise, velocity
from srpo_reward import SRPReward

# The text encoders, only counted: training caches their output (FLUX.1-dev's config.json files).
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # text_encoder_2/
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77)  # text_encoder/
RESOLUTION = 720            # the release's training size (METHOD.md §5): 512 text + (720 / 16)^2 = 2025 image tokens
TEXT_TOKENS = 512
PROMPTS = 21                # train.py keeps steps + 1 cached embeddings on the GPU; the release's 20 steps
WORLD_SIZES = (1, 8, 16, 32)
LORA_RANK = 64              # README's one-GPU command (Flow-GRPO's FLUX LoRA uses 64 too)
LORA_WORLD_SIZES = (1, 8)
GPU_BYTES = 80 * 2**30      # an 80 GB card (H100, A100 80GB) ...
USABLE = 0.9                # ... of which 10% go to the CUDA context, NCCL buffers and allocator fragmentation
# One GPU (one_gpu_row): train.py --lora-rank R --strategy ddp, with a bf16 or an nf4 base
CARDS = (24, 48, 80)        # GiB: an RTX 3090 / 4090, an RTX A6000 / L40S, an A100 / H100 80GB (nominal sizes)
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
    storages of the weights' casts (the plan counts them apart from the activations)."""

    def __init__(self):
        super().__init__()
        self.cache, self.copies = {}, set()

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
            self.copies.add(copy.untyped_storage().data_ptr())
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
    (diffusers checkpoints each block) each block's input, tokens x width bf16 values."""
    return dict(transformer=layers * per_block["double"] + single_layers * per_block["single"] + per_block["other"],
                transformer_checkpointed=(layers + single_layers) * tokens * width * 2 + per_block["other"])


def activation_estimate():
    """Bytes of saved activations of one branch's backward at 720x720 (an estimate, not a GPU measurement).
    Each part's saved tensors (saved_bytes) are measured on the CPU under CUDA's autocast policy (CudaAutocast:
    bf16 matmuls, fp32 norms, as on a GPU) on a smaller model and extrapolated linearly:
      transformer: one double and one single block at FLUX's 512 + 2025 tokens and 24 heads, head_dim 8 and 16,
        extrapolated to 128 (every saved tensor is tokens x width or tokens x heads: flash-style attention
        keeps no tokens x tokens matrix); checkpointed, it recomputes one block's internals at a time in its
        backward (transformer_recompute);
      VAE decode: FLUX.1-dev's VAE at 32 and 64 pixels, extrapolated to 720^2 pixels (convolutions: per pixel);
        checkpointed (diffusers checkpoints the mid block and each up block), the blocks' inputs and the largest
        block's internals, recomputed one block at a time;
      reward: ViT-H-14's 32 layers and 16 heads at head_dim 4 and 8, extrapolated to 80 (width 1280), on a
        720x720 image through the reward's own preprocessing; plus the bf16 copy of each of the frozen vision
        tower's fp32 weights, which autocast makes and the backward keeps (the gradient flows to the image
        through them; frozen weights are cast at each use). On one H200 this term measured 1.54 GiB."""
    tokens_txt, tokens_img = TEXT_TOKENS, (RESOLUTION // 16) ** 2
    cond = conditioning({"encoder_hidden_states": torch.randn(1, tokens_txt, FLUX_DEV["joint_attention_dim"]),
                         "pooled_projections": torch.randn(1, FLUX_DEV["pooled_projection_dim"])},
                        RESOLUTION, torch.device("cpu"))

    def flux(head_dim):
        model = empty_model(lambda: FluxTransformer2DModel(**dict(FLUX_DEV, num_layers=1, num_single_layers=1,
                                                                   attention_head_dim=head_dim,
                                                                   axes_dims_rope=rope_axes(head_dim))))
        x = latent_noise(RESOLUTION, torch.Generator().manual_seed(0), torch.device("cpu"))
        return saved_bytes(lambda: velocity(model, x, 0.5, cond, 3.5), model,
                           [("double", model.transformer_blocks[0]), ("single", model.single_transformer_blocks[0])])

    def vae(resolution):
        model = empty_model(lambda: AutoencoderKL(**FLUX_VAE))
        x = torch.zeros(1, (resolution // 16) ** 2, 64, requires_grad=True)
        blocks = [("mid", model.decoder.mid_block), *((f"up{i}", b) for i, b in enumerate(model.decoder.up_blocks))]
        return saved_bytes(lambda: decode(model, x, resolution), model, blocks)

    def clip(head_dim):
        vision = dict(VIT_H_14["vision_config"], hidden_size=16 * head_dim, intermediate_size=64 * head_dim)
        model = empty_model(lambda: CLIPModel(CLIPConfig(**dict(VIT_H_14, vision_config=vision))))
        image = torch.zeros(1, 3, RESOLUTION, RESOLUTION, requires_grad=True)
        return saved_bytes(lambda: SRPReward(model, None, "hps").embed_images(image), model)

    per_block = fit_line(flux, (8, 16), FLUX_DEV["attention_head_dim"])
    per_block = {k: per_block[k] for k in ("double", "single", "other")}
    decoder = fit_line(lambda pixels: vae(math.isqrt(pixels)), (32**2, 64**2), RESOLUTION**2)
    internals = [v for k, v in decoder.items() if k != "other" and not k.startswith("input_")]
    width = FLUX_DEV["num_attention_heads"] * FLUX_DEV["attention_head_dim"]
    return dict(
        per_block=per_block,
        **transformer_activations(per_block, FLUX_DEV["num_layers"], FLUX_DEV["num_single_layers"],
                                  tokens_txt + tokens_img, width),
        transformer_recompute=max(per_block["double"], per_block["single"]),
        vae_decode=decoder["other"] + sum(internals),
        vae_decode_checkpointed=decoder["other"] + sum(v for k, v in decoder.items() if k.startswith("input_"))
        + max(internals),
        reward=fit_line(clip, (4, 8), VIT_H_14["vision_config"]["hidden_size"] // 16)["other"] + 2 * vision_params())


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


def rank_memory(num_params, world_size, strategy, block_params, frozen, activations, lora_params=0):
    """Bytes per rank: train.memory_plan's weights, grads and AdamW states (the numbers train.py prints at start;
    with lora_params, a bf16 base and fp32 adapters), plus the larger of what the two phases of a step add on top
    (METHOD.md §5):
      training: compute copies (FSDP all-gathers bf16 weights block by block, two blocks at once (prefetch) and
        the root module's for the whole step, and holds one block's unsharded grads in bf16 and, for the
        reduce-scatter, in fp32; DDP's autocast makes a bf16 copy of every weight in the forward, which the
        backward keeps without checkpointing, and with it recasts only the block it recomputes and the root's;
        gradient_as_bucket_view spares a second copy of the grads) and activations, one branch at a time: the
        transformer's kept tensors, plus the larger of the copies at its forward's end and, in the backward, the
        copies still held and the largest of the reward's, the VAE decode's and one recomputed block's peaks (the
        backward frees each part's saved tensors before it runs the next part's);
      rollout: no activations, but every block's bf16 weights stay gathered for its 25 steps (flux.rollout);
      frozen, both phases: frozen_bytes.
    A LoRA's base is already bf16: DDP makes no copies of it, FSDP still gathers it block by block."""
    lora = dict(trainable=lora_params, frozen_bytes=2) if lora_params else {}
    row = dict(world_size=world_size, strategy=strategy, lora_params=lora_params,
               **train.memory_plan(num_params, world_size, strategy, **lora))
    row["train_memory_plan_total"] = row.pop("total")
    largest, root = max(block_params), num_params - sum(block_params)
    if strategy == "fsdp":
        row["compute_copies"] = 2 * (2 * largest + root) + (2 + 4) * largest
    else:
        row["compute_copies"] = 2 * (lora_params or num_params)
    row["rollout_copies"] = 0 if lora_params and strategy == "ddp" else 2 * num_params
    row["frozen"] = frozen
    for suffix in ("", "_checkpointed"):
        backward_copies = 2 * (largest + root) if suffix and strategy == "ddp" and not lora_params \
            else row["compute_copies"]
        kept = activations[f"transformer{suffix}"]
        parts = max(activations[f"vae_decode{suffix}"], activations["reward"],
                    activations["transformer_recompute"] if suffix else 0)
        row[f"activations{suffix}"] = kept + parts
        row[f"training{suffix}"] = kept + max(row["compute_copies"], backward_copies + parts)
        row[f"total{suffix}"] = row["train_memory_plan_total"] + frozen \
            + max(row[f"training{suffix}"], row["rollout_copies"])
        row[f"fits_80gb{suffix}"] = row[f"total{suffix}"] <= USABLE * GPU_BYTES
    return row


def flux_dev_plan():
    """FLUX.1-dev's exact parameter count from its config on the meta device, and every rank's bytes."""
    with torch.device("meta"):
        flux = FluxTransformer2DModel(**FLUX_DEV)
    c = one_gpu_counts()
    params, vae, reward_params, lora_params = c["params"], c["vae_params"], c["reward_params"], \
        c["lora_params"][LORA_RANK]  # the adapters of --lora-rank 64 on FLUX.1-dev, exactly
    block_params = [sum(p.numel() for p in b.parameters())
                    for b in [*flux.transformer_blocks, *flux.single_transformer_blocks]]
    text_params = count_params(lambda: T5EncoderModel(T5Config(**T5_XXL))) \
        + count_params(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)))
    frozen = frozen_bytes(vae, reward_params, PROMPTS, TEXT_TOKENS, FLUX_DEV["joint_attention_dim"],
                          FLUX_DEV["pooled_projection_dim"])
    activations = activation_estimate()
    plans = [rank_memory(params, w, s, block_params, frozen, activations)
             for w in WORLD_SIZES for s in ("fsdp", "ddp")]
    plans += [rank_memory(params, w, s, block_params, frozen, activations, lora_params)
              for w in LORA_WORLD_SIZES for s in ("fsdp", "ddp")]
    return dict(params=params, lora_rank=LORA_RANK, lora_params=lora_params, vae_params=vae,
                reward_params=reward_params, text_encoder_params=text_params,
                text_encoders_bf16_while_caching=2 * text_params, frozen=frozen, resolution=RESOLUTION,
                activations=activations, gpu_bytes=GPU_BYTES, usable=USABLE, plans=plans,
                one_gpu=one_gpu_plan(c, activations))


# ----------------------------------------------------------------------------------------- one GPU, LoRA

def one_gpu_counts():
    """What the one-GPU rows count, on the meta device: FLUX.1-dev's weights, those of its nn.Linear layers (what
    flux.quantize_nf4 quantizes) and the largest of them, the adapters of each rank in ONE_GPU_RANKS on
    flux.LORA_TARGETS (add_lora, as train.py adds them), the VAE, the reward and its vision tower."""
    with torch.device("meta"):
        flux = FluxTransformer2DModel(**FLUX_DEV)
        linears = [m.weight.numel() for m in flux.modules() if type(m) is torch.nn.Linear]
        lora = {rank: sum(p.numel() for p in add_lora(FluxTransformer2DModel(**FLUX_DEV), rank, rank, torch.bfloat16,
                                                      0).parameters() if p.requires_grad) for rank in ONE_GPU_RANKS}
    return dict(params=sum(p.numel() for p in flux.parameters()), linear_weights=sum(linears),
                largest_linear=max(linears), lora_params=lora,
                vae_params=count_params(lambda: AutoencoderKL(**FLUX_VAE)),
                reward_params=count_params(lambda: CLIPModel(CLIPConfig(**VIT_H_14))), vision_params=vision_params())


def one_gpu_row(c, activations, base, rank, reserve=RESERVE, context=CONTEXT):
    """Bytes on one GPU for train.py --lora-rank rank --strategy ddp on FLUX.1-dev, 720x720, one prompt at a time,
    checkpointed (METHOD.md §5), c = one_gpu_counts(); PLANNED, term by term:
      base_weights: bf16, 2 bytes a weight; nf4: flux.NF4_BYTES a weight of the nn.Linear layers, the rest bf16;
      adapters: fp32 weights, fp32 gradients, fp32 AdamW's two states: 16 bytes an adapter weight;
      reward, vae: frozen, bf16 on the nf4 path, fp32 on the bf16 base's (as train.py loads them);
      text: one prompt's cached T5 and pooled CLIP embeddings in bf16 (flux.encode_prompts reads each when used);
      activations: a branch's (activation_estimate): the blocks' checkpointed inputs, the adapters' bf16 casts
        (autocast keeps them for the backward), and the largest part's peak in the backward: the VAE decode's, the
        reward's (its bf16 copy of fp32 vision weights only where the reward is fp32) or a recomputed block's;
      dequantized: nf4 only, the largest linear layer's weight dequantized to bf16 for its matmul (one at a time,
        in the rollout and the backward alike);
    allocated, their sum; reserve, the allocator's cache above it ((reserve - 1) x allocated); context, outside
    torch's allocator. total = allocated + reserve + context; fits a card of CARDS GiB if total is at most that."""
    a, lora = activations, c["lora_params"][rank]
    frozen = 2 if base == "nf4" else 4
    reward_peak = a["reward"] - (2 * c["vision_params"] if base == "nf4" else 0)
    row = dict(base=base, rank=rank, lora_params=lora,
               base_weights=2 * c["params"] if base == "bf16" else
               NF4_BYTES * c["linear_weights"] + 2 * (c["params"] - c["linear_weights"]),
               adapters=16 * lora, reward=frozen * c["reward_params"], vae=frozen * c["vae_params"],
               text=2 * (TEXT_TOKENS * FLUX_DEV["joint_attention_dim"] + FLUX_DEV["pooled_projection_dim"]),
               activations=a["transformer_checkpointed"] + 2 * lora
               + max(a["vae_decode_checkpointed"], reward_peak, a["transformer_recompute"]),
               dequantized=2 * c["largest_linear"] if base == "nf4" else 0)
    row["allocated"] = sum(row[k] for k in ("base_weights", "adapters", "reward", "vae", "text", "activations",
                                            "dequantized"))
    row.update(reserve=(reserve - 1) * row["allocated"], context=context)
    row["total"] = row["allocated"] + row["reserve"] + context
    # 8-bit AdamW (bitsandbytes' AdamW8bit) keeps its two states in 1 byte each, not 4: 6 bytes an adapter less
    row["total_adamw_8bit"] = row["total"] - 6 * lora * reserve
    row["fits"] = {card: row["total"] <= card * 2**30 for card in CARDS}
    row["fits_adamw_8bit"] = {card: row["total_adamw_8bit"] <= card * 2**30 for card in CARDS}
    return row


def measured_reserve(results=RESULTS):
    """(the largest max_reserved_gib / max_memory_gib of any train.py run on a GPU recorded in results' metrics
    files, the file), or (None, None) where no file records both peaks."""
    rows = [(row, os.path.basename(path)) for path in sorted(glob.glob(os.path.join(results, "*metrics.jsonl")))
            for row in map(json.loads, open(path))]
    ratios = [(row["max_reserved_gib"] / row["max_memory_gib"], name) for row, name in rows
              if row.get("max_reserved_gib") and row.get("max_memory_gib")]
    return max(ratios) if ratios else (None, None)


def one_gpu_plan(c, activations, results=RESULTS):
    """Every one-GPU row (c = one_gpu_counts()): BASES x ONE_GPU_RANKS, with the reserve measured in results where a
    run records it, else RESERVE (assumed)."""
    measured, source = measured_reserve(results)
    reserve = measured or RESERVE
    return dict(counts=c, reserve=reserve, reserve_source=source or "assumed", context=CONTEXT, cards=CARDS,
                rows=[one_gpu_row(c, activations, base, rank, reserve) for base in BASES for rank in ONE_GPU_RANKS])


def one_gpu_table(p):
    """The one-GPU rows as markdown, GiB, with what needs 8-bit AdamW."""
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    yes = lambda fits: "yes" if fits else "no"  # noqa: E731
    eight = [f"{r['base']} rank {r['rank']} on {card} GB" for r in p["rows"] for card in CARDS
             if r["fits_adamw_8bit"][card] and not r["fits"][card]]
    source = "ASSUMED" if p["reserve_source"] == "assumed" else f"measured in {p['reserve_source']}"
    reserve = f"{p['reserve'] - 1:.0%} of allocated ({source})"
    return (f"PLANNED (not measured): train.py --lora-rank R --strategy ddp [--quantize-base nf4], FLUX.1-dev at "
            f"{RESOLUTION}x{RESOLUTION}, one prompt at a time, checkpointed. Reserve: {reserve}; context: "
            f"{gib(p['context'])} GiB (ASSUMED). fits: total at most the card's GiB.\n\n"
            + md_table(["base", "LoRA rank", "base weights", "adapters + grads + AdamW", "reward", "VAE", "text emb.",
                        "activations, ckpt", "dequantized layer", "allocated", "reserve", "context", "total",
                        *(f"fits {card} GB" for card in CARDS)],
                       [[r["base"], r["rank"], gib(r["base_weights"]), gib(r["adapters"]), gib(r["reward"]),
                         gib(r["vae"]), gib(r["text"]), gib(r["activations"]), gib(r["dequantized"]),
                         gib(r["allocated"]), gib(r["reserve"]), gib(r["context"]), gib(r["total"]),
                         *(yes(r["fits"][card]) for card in CARDS)] for r in p["rows"]])
            + "\n8-bit AdamW (6 bytes an adapter weight less): needed for "
            + (", ".join(eight) if eight else "none of these rows: no row fits a card only with it") + ".\n")


def table(plan):
    """The plan as markdown: what it counts, then a row per world size and strategy, GiB."""
    gib = lambda b: f"{b / 2**30:.1f}"  # noqa: E731
    yes = lambda fits: "yes" if fits else "no"  # noqa: E731
    a = plan["activations"]
    return (f"transformer: {plan['params']:,} parameters; VAE {plan['vae_params']:,}; reward (ViT-H-14) "
            f"{plan['reward_params']:,}. Text encoders: none while training (embeddings cached); T5-XXL + CLIP-L, "
            f"{gib(plan['text_encoders_bf16_while_caching'])} GiB in bf16, only while caching before step 1.\n"
            f"activations at {RESOLUTION}x{RESOLUTION} (estimate, see activation_estimate): transformer "
            f"{gib(a['transformer'])}, checkpointed {gib(a['transformer_checkpointed'])}; VAE decode "
            f"{gib(a['vae_decode'])}, checkpointed {gib(a['vae_decode_checkpointed'])}; reward {gib(a['reward'])}. "
            f"Fits: at most {USABLE:.0%} of 80 GiB.\n\n"
            "total = weights + grads + AdamW + frozen + the larger of (bf16 copies + activations) while training "
            "and (all bf16 weights) while rolling out.\n\n"
            f"LoRA rows: rank {plan['lora_rank']} adapters on FLUX.1-dev's targets (flux.LORA_TARGETS), "
            f"{plan['lora_params']:,} parameters, trained in fp32 on a frozen bf16 base.\n\n"
            + md_table(["GPUs", "strategy", "weights", "grads", "AdamW", "bf16 copies", "VAE, reward, text emb.",
                        "activations", "total", "fits 80 GB", "activations, ckpt", "total, ckpt", "fits 80 GB, ckpt"],
                       [[r["world_size"], r["strategy"] + (" LoRA" if r["lora_params"] else ""), gib(r["weights"]),
                         gib(r["grads"]), gib(r["optimizer"]), gib(r["compute_copies"]), gib(r["frozen"]),
                         gib(r["activations"]), gib(r["total"]), yes(r["fits_80gb"]),
                         gib(r["activations_checkpointed"]), gib(r["total_checkpointed"]),
                         yes(r["fits_80gb_checkpointed"])] for r in plan["plans"]]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also write every number to this file")
    args = p.parse_args(argv)
    plan = flux_dev_plan()
    print(f"## FLUX.1-dev memory per rank, GiB\n\n{table(plan)}")
    print(f"## One GPU, LoRA on a bf16 or an nf4 base, GiB\n\n{one_gpu_table(plan['one_gpu'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan, f, indent=2)


if __name__ == "__main__":
    main()
