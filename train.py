r"""SRPO training of FLUX or Qwen-Image: online rollouts, Direct-Align, the SRP reward (arXiv 2509.06942).

CPU, tiny random models (built offline on first use, a couple of minutes at most):
    python train.py
    torchrun --nproc_per_node=2 train.py
One node, 8 GPUs, FLUX.1-dev + HPSv2.1 with the release's recipe (METHOD.md §3-§5): 32 prompts a step, each GPU
accumulating 4 of them:
    torchrun --nproc_per_node=8 train.py --model ./FLUX.1-dev --reward hps \
        --reward-path ./HPS_v2.1_compressed.pt --clip-h ./CLIP-ViT-H-14-laion2B-s32B-b79K \
        --prompts ./prompts.txt --output-dir out/srpo-hps
Four nodes, 32 GPUs, one prompt each, the same recipe: the same flags, on every node (--output-dir on a shared disk)
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$MASTER_HOST:29500 train.py ...
One GPU: LoRA adapters of rank 64 on a frozen bf16 base, a 48 GB card; on a 4-bit base, a 24 GB card (planned)
    torchrun --nproc_per_node=1 train.py --model ./FLUX.1-dev --lora-rank 64 --strategy ddp [--quantize-base nf4] ...
Qwen-Image, 8 GPUs, the release's Qwen-Image recipe (a --model folder's model_index.json picks it; RECIPES):
    torchrun --nproc_per_node=8 train.py --model ./Qwen-Image --reward-path ./PickScore_v1 \
        --clip-h ./CLIP-ViT-H-14-laion2B-s32B-b79K --prompts ./prompts.txt --output-dir out/srpo-qwen
After a crash, the same command with --resume continues from the newest checkpoint that verifies.
"""
import argparse
import hashlib
import json
import logging
import math
import os
import time
import types
import warnings
from collections import Counter
from contextlib import contextmanager, nullcontext

# Notes at import with nothing for a user to act on: bitsandbytes' (imported by diffusers and peft), on CPUs with
# AVX512-BF16, that an optional kernel download is missing; transformers', without torchvision, that two image
# processors diffusers imports fall back to PIL (nothing here uses them).
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
import torch
import torch.distributed as dist
from PIL import Image
from safetensors import SafetensorError
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import checkpoint
import flux
import judge
import qwen
from flux import NF4_BYTES, add_lora, autocast, fill_from_checkpoint, num_weights, quantize_nf4, save_weights
from inputs import (SEED, SIZE, TOKENS, Parser, check_clip_h, check_model_folder, check_ranges, check_text_tokens, fail,
                    load_image, read_captioned_images, read_prompts, run_command)
from srpo import BRANCHES, srpo_step
from srpo_reward import KINDS, NEG_WORDS, POS_WORDS, load_reward

# FLUX blocks return views (slices of one sequence). FSDP2 warns because an in-place op on such a view
# would skip its backward hook; FLUX makes none, and test_train.py shows FSDP and DDP end at equal weights.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

# The defaults that depend on the model or on another flag, each stated once here (None in argparse); a flag given
# overrides them. First the release's recipe for the --model's family (METHOD.md §5's two columns): FLUX's by
# --reward (PickScore's changes HPSv2.1's; --reward clip uses HPSv2.1's), Qwen-Image's whatever the reward. Then
# LoRA's lr; then the sizes: a real --model gets the release's size and batch, the tiny CPU models a laptop's.
RECIPES = {
    "flux": dict(reward="hps", rollout_steps=25, shift=3.0, rollout_guidance=1.0, guidance=3.5, window_end=25,
                 window_length=1000, rho=0.9, k_denoise=(0.1, 0.25), k_inversion=(0.3, 0.01), loss="threshold",
                 branches="both", neg_words=list(NEG_WORDS), max_sequence_length=512, lr=5e-6, max_grad_norm=0.1,
                 steps=20),
    "flux+pickscore": dict(window_end=30, k_denoise=(0.1, 0.5), k_inversion=(0.6, 0.01), rollout_guidance=2.0),
    "qwen": dict(reward="pickscore", rollout_steps=26, shift=1.0, rollout_guidance=4.0, guidance=1.0, window_end=40,
                 window_length=100, rho=0.6, k_denoise=(0.0, 0.0), k_inversion=(0.0, 0.0), loss="discount",
                 branches="denoise", neg_words=["Concept art", "Painting", "Anime"], max_sequence_length=1024,
                 lr=3e-6, max_grad_norm=50.0, steps=50),
    "lora": dict(lr=1e-4),                                   # --lora-rank: B starts at zero, so a larger lr
    "model": dict(resolution=720, batch_size=32,             # the release's: one prompt on each of 32 GPUs
                  eval_count=16),                            # held-out prompts: under 10% of a run (README)
    "tiny": dict(resolution=64, batch_size=2, eval_count=2),
}
FAMILIES = {"flux": flux, "qwen": qwen}  # by the --model folder's pipeline (inputs.check_model_folder)
# Prompts for the CPU run on tiny models, when no --prompts file is given.
TINY_PROMPTS = ["a red car on a street", "a cat sitting on a chair", "a green tree near a lake",
                "a portrait of an old man", "a white bird in the sky", "a small house under a dark sky"]

# Valid values, as (test, what is expected), checked before anything loads. The upper bounds keep absurd values
# from reaching the model (a step count that overflows a tensor size, a batch that never ends).
GUIDANCE = (lambda v: 0 < v <= 100, "a guidance (FLUX) or true-CFG scale (Qwen-Image) above 0, at most 100")
EVERY = (lambda v: 0 <= v <= 999_999, "0 or a number of steps, at most 999,999 (--steps' limit)")
K = (lambda v: -1 <= v <= 1, "two numbers from -1 to 1 (the positive prompt's weight 1 + k from 0 to 2; the "
                             "release's k run from 0.01 to 0.6)")
WORDS = (lambda v: v.strip(), "words that are not blank (the reward would compare the caption with itself)")


def parse_args(argv=None):
    """The flags, every default stated once (below, or in RECIPES), each range check beside its flag."""
    p = Parser(__doc__)
    checks = []
    recipe = lambda key: "; ".join(f"{r[key]} ({name})" for name, r in RECIPES.items() if key in r)  # noqa: E731

    def a(*flags, check=None, **kwargs):
        action = p.add_argument(*flags, **kwargs)
        if check:
            checks.append((action.dest, *check))
    # models and data
    a("--model", help="a diffusers FluxPipeline or QwenImagePipeline folder (FLUX.1-dev's or Qwen-Image's layout): "
                      "its model_index.json picks the recipe; default: tiny random FLUX models")
    a("--reward", choices=KINDS, help="reward model kind (METHOD.md §4): " + recipe("reward"))
    a("--reward-path", help="HPS_v2.1_compressed.pt, or a PickScore / CLIP folder; default: a tiny CLIP")
    a("--clip-h", help="laion/CLIP-ViT-H-14-laion2B-s32B-b79K folder: HPS's config and tokenizer")
    a("--prompts", help="online mode: a .txt file, one prompt per line, or a .json list of strings (HPDv2's)")
    a("--prompt-order", default="shuffled", choices=("shuffled", "release"),
      help="shuffled by --seed, or the release's order (its preprocessing's deal of the file to 8 ranks)")
    a("--image-dir", help="offline mode: images with .txt captions beside them replace the rollout")
    a("--pos-words", nargs="+", default=list(POS_WORDS), check=WORDS, help="positive control words (METHOD.md §4)")
    a("--neg-words", nargs="+", check=WORDS, help="negative control words (METHOD.md §4): " + recipe("neg_words"))
    a("--output-dir", default="out/srpo")
    # the method (METHOD.md §3-§4); None: RECIPES' value
    a("--resolution", type=int, check=SIZE, help="square training size: " + recipe("resolution"))
    a("--rollout-steps", type=int, help="Euler steps of the online rollout: " + recipe("rollout_steps"),
      check=(lambda v: 1 <= v <= 1000, "1 to 1000 Euler steps (the transformer sees the timestep "
                                       "floor(1000 sigma) / 1000: 1001 values in all)"))
    a("--rollout-guidance", type=float, check=GUIDANCE,
      help="guidance of the rollout (FLUX's embedded guidance; Qwen-Image's true-CFG scale on \"\", 1: none): "
           + recipe("rollout_guidance"))
    a("--guidance", type=float, check=GUIDANCE, help="... of the trained step: " + recipe("guidance"))
    a("--shift", type=float, check=(lambda v: 0.01 <= v <= 100, "a shift from 0.01 to 100"),
      help="constant timestep shift of every sigma grid: " + recipe("shift"))
    a("--window-start", type=int, default=5, check=(lambda v: 0 <= v < 50, "a step of the 50-step grid, 0 to 49"),
      help="training window starts at g[start] of the 50-step grid")
    a("--window-end", type=int, help="... and ends at g[end]: " + recipe("window_end"),
      check=(lambda v: 0 < v <= 50, "a step of the 50-step grid, 1 to 50, after --window-start"))
    a("--window-length", type=int, help="the window's L sigmas, t* drawn from [5, L - 5]: " + recipe("window_length"),
      check=(lambda v: 10 <= v <= 100_000, "10 to 100,000 sigmas (t* is drawn from [5, L - 5])"))
    a("--rho", type=float, check=(lambda v: 0 < v < 1, "a ratio strictly between 0 and 1"),
      help="groundtruth ratio: branch gap int((1 - rho) * L) + 1: " + recipe("rho"))
    a("--k-denoise", type=float, nargs=2, check=K, help="SRP k schedule of the denoise branch: " + recipe("k_denoise"))
    a("--k-inversion", type=float, nargs=2, check=K, help="... of the inversion branch: " + recipe("k_inversion"))
    a("--loss", choices=("threshold", "discount"), help="relu(threshold - reward), or -reward * 3u / (1 + 2u), u = "
                                                        "m / L (METHOD.md §4): " + recipe("loss"))
    a("--threshold", type=float, default=0.7, help="--loss threshold's: relu(threshold - reward)",
      check=(lambda v: -20 <= v <= 20, "-20 to 20 (an SRP reward lies within 15 of 0: at most 3 cosines, times "
                                       "100 / 20 for CLIP and PickScore)"))
    a("--branches", choices=("both", "denoise", "inversion"), help="FLUX's denoise alone shows reward hacking, the "
      "release's README suggests, for comparison: " + recipe("branches"))
    a("--max-sequence-length", type=int, check=TOKENS, help="text tokens of the conditioning (FLUX's T5 at most 512): "
                                                           + recipe("max_sequence_length"))
    # optimization (METHOD.md §5)
    a("--batch-size", type=int, help="prompts per optimizer step over all ranks, accumulated one at a time on each: "
                                     + recipe("batch_size"),
      check=(lambda v: 1 <= v <= 4096, "1 to 4096 prompts (128 times the release's 32; each costs a rollout and "
                                       "two backward passes)"))
    a("--steps", type=int, help="optimizer steps (the FLUX release's model has 19 updates: --steps 19): "
                                + recipe("steps"),
      check=(lambda v: 1 <= v <= 999_999, "1 to 999,999 optimizer steps (the release takes 20; sample grids are "
                                          "numbered with 6 digits)"))
    a("--lr", type=float, help="AdamW's: " + recipe("lr"),  # AdamW's steps overflow fp32 far above 1
      check=(lambda v: 0 < v < 1, "a positive learning rate below 1"))
    a("--betas", type=float, nargs=2, default=(0.9, 0.999), check=(lambda v: 0 <= v < 1, "two values in [0, 1)"))
    a("--weight-decay", type=float, default=1e-4,
      check=(lambda v: 0 <= v <= 1, "0 to 1 (AdamW multiplies the weights by 1 - lr * weight_decay each step)"))
    a("--adam-eps", type=float, default=1e-8, check=(lambda v: v > 0, "a positive epsilon"))
    a("--max-grad-norm", type=float, check=(lambda v: v > 0, "a positive norm"), help=recipe("max_grad_norm"))
    a("--seed", type=int, default=42, check=SEED)
    a("--strategy", default="fsdp", choices=("fsdp", "ddp"), help="FSDP2 full shard, or DDP")
    a("--gradient-checkpointing", action=argparse.BooleanOptionalAction, help="default: on with CUDA")
    a("--compile", action=argparse.BooleanOptionalAction, default=False,
      help="torch.compile each transformer block, for the rollout and the trained step; off until a GPU measures "
           "whether it pays (experiments/README.md, the step's profile); on a CPU compiling outlasts a tiny run")
    a("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank on a frozen base (0: every weight)",
      check=(lambda v: 0 <= v <= 3072, "0 (every weight trains) or a LoRA rank up to 3072, FLUX.1's width: the "
                                       "smaller side of every adapted layer"))
    a("--lora-alpha", type=float, help="LoRA scale alpha / rank; default: the rank (scale 1)",
      check=(lambda v: v >= 0, "a LoRA alpha of at least 0"))
    a("--quantize-base", choices=("nf4",), help="the frozen base under --lora-rank in 4 bits (QLoRA's NF4), its "
                                               "reward and VAE in bf16: FLUX.1-dev on one 24 GB GPU (METHOD.md §5)")
    # the held-out judge (METHOD.md §8, judge.py)
    a("--judge", choices=KINDS, help="a reward training never sees, scoring held-out prompts as the run goes "
                                     "(metrics.png, eval/) and sounding the hacking alarm; off without it")
    a("--judge-path", help="the judge's weights, as --reward-path's (--clip-h serves both)")
    a("--eval-prompts", help="held-out prompts, a file as --prompts'; default: --eval-count of the training "
                             "prompts, drawn by --seed, which training then does not use")
    a("--eval-count", type=int, help="held-out prompts drawn from --prompts: " + recipe("eval_count"),
      check=(lambda v: 1 <= v <= 4096, "1 to 4096 prompts"))
    a("--eval-every", type=int, default=5, check=EVERY, help="judge every N steps, at step 0 and at the end")
    a("--stop-when-hacking", action="store_true",
      help="end the run at the hacking alarm, with a checkpoint there (--resume continues)")
    # output
    a("--checkpoint-every", type=int, default=10, check=EVERY, help="0: only at the end")
    a("--sample-every", type=int, default=10, check=EVERY, help="save a PNG grid of samples every N steps (0: never)")
    a("--resume", action="store_true", help="continue from the newest complete checkpoint in --output-dir")
    args = p.parse_args(argv)
    family = check_model_folder(args.model) if args.model else "flux"
    reward = args.reward or RECIPES[family]["reward"]
    recipe = {**RECIPES[family], **RECIPES.get(f"{family}+{reward}", {}), **(RECIPES["lora"] if args.lora_rank else {}),
              **RECIPES["model" if args.model else "tiny"], "lora_alpha": float(args.lora_rank),
              "gradient_checkpointing": torch.cuda.is_available()}
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_ranges(args, checks)
    check_text_tokens(args.max_sequence_length, FAMILIES[family])
    return args


def check_inputs(args):
    """What one flag's range cannot say: flags that conflict, and the files named. One line each, before anything
    loads."""
    if args.window_start >= args.window_end:
        fail(f"--window-start {args.window_start} --window-end {args.window_end}: expected start before end")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size}: must be a positive multiple of the {world} ranks (each accumulates "
             f"batch-size / ranks prompts)")
    if args.lora_rank and not args.lora_alpha > 0:
        fail(f"--lora-alpha {args.lora_alpha}: expected a positive alpha with --lora-rank (0 would train nothing)")
    if args.quantize_base and not (args.lora_rank and args.strategy == "ddp"):
        fail(f"--quantize-base {args.quantize_base}: expected --lora-rank and --strategy ddp (a 4-bit base is frozen, "
             f"so only adapters train; FSDP2 cannot shard bitsandbytes' packed weights)")
    if args.prompts is not None and args.image_dir is not None:
        fail("--prompts and --image-dir: expected one of them, prompts to roll out or captioned images (offline)")
    if args.model:
        if args.prompts is None and args.image_dir is None:
            fail("--model needs --prompts FILE (online) or --image-dir DIR (offline)")
        if not args.reward_path:
            fail("--model needs --reward-path (HPS_v2.1_compressed.pt, or a PickScore / CLIP folder)")
    check_clip_h(args.clip_h, {args.reward: args.reward_path})
    if args.judge:
        if not args.judge_path:
            fail(f"--judge {args.judge}: expected --judge-path (its weights, as --reward-path's)")
        if (args.judge, os.path.realpath(args.judge_path)) == (args.reward, os.path.realpath(args.reward_path or "")):
            fail(f"--judge {args.judge} --judge-path {args.judge_path}: the training reward; expected a reward "
                 f"training never sees")
        check_clip_h(args.clip_h, {args.judge: args.judge_path})
        if args.prompt_order == "release" and not args.eval_prompts:  # a slice taken out would change the order
            fail("--judge with --prompt-order release: expected --eval-prompts FILE (held-out prompts taken from "
                 "--prompts would change the release's order)")
    elif args.judge_path or args.eval_prompts or args.stop_when_hacking:
        fail("--judge-path, --eval-prompts and --stop-when-hacking: expected --judge KIND, the held-out judge")
    if os.path.isfile(os.path.join(args.output_dir, checkpoint.MANIFEST)):  # writing in it would break it
        fail(f"--output-dir {args.output_dir}: a checkpoint, not a run's folder; expected --output-dir "
             f"{os.path.dirname(os.path.normpath(args.output_dir))}")
    complete = checkpoint.complete_steps(args.output_dir)
    if complete and not args.resume:
        fail(f"--output-dir {args.output_dir} holds checkpoint-{complete[0]}: pass --resume, or another dir")


def step_settings(args):
    """srpo.srpo_step's keyword arguments from the flags: the method's settings, nothing of the run."""
    return dict(window=(args.window_start, args.window_end), shift=args.shift, length=args.window_length, rho=args.rho,
                k_denoise=args.k_denoise, k_inversion=args.k_inversion, pos_words=args.pos_words,
                neg_words=args.neg_words, loss=args.loss, threshold=args.threshold,
                branches=BRANCHES if args.branches == "both" else (args.branches,))


def rng(*key):
    """A generator seeded by key. Every draw is keyed by (seed, step, ...): a resumed run replays what one draws."""
    return torch.Generator().manual_seed(int(hashlib.sha256(repr(key).encode()).hexdigest()[:15], 16))


def memory_plan(num_params, world_size, strategy, largest_tensor=0, trainable=None, frozen_bytes=4):
    """Bytes each rank holds for the weights (fp32 where they train, frozen_bytes each where they do not: a LoRA's
    base), fp32 gradients and AdamW's two fp32 states of the trainable ones (METHOD.md §5): FSDP full shard divides
    all three by the world size, DDP keeps full copies on every rank. And the peak while loading: FSDP fills its
    shard one tensor at a time (flux.fill_from_checkpoint), so its shard plus one full fp32 tensor; DDP loads
    the whole model."""
    shard = world_size if strategy == "fsdp" else 1
    trainable = num_params if trainable is None else trainable
    weights = (4 * trainable + frozen_bytes * (num_params - trainable)) / shard
    plan = {"weights": weights, "grads": 4 * trainable / shard, "optimizer": 8 * trainable / shard}
    plan["total"] = sum(plan.values())
    plan["load_peak"] = weights + (4 * largest_tensor if strategy == "fsdp" else 0)
    return plan


# ----------------------------------------------------------------------------------------- the run, phase by phase

def init_distributed(seed):
    """torchrun sets RANK / WORLD_SIZE; a plain `python train.py` is a world of one, the same code. (rank, world,
    device); seeds torch by rank (METHOD.md §5), though every draw that matters uses rng(...)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        # cuDNN's fused attention failed in the backward pass at FLUX's width and 720x720 (H200, torch 2.11:
        # "mha_graph.execute ... is_good()"); flash attention computes the same
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.matmul.allow_tf32 = True  # as the release: fp32 matmuls (few, outside autocast) in TF32
    torch.manual_seed(seed + rank)
    return rank, world, device


def resume_point(args, rank, world):
    """(the step to start from, the flags of the run that wrote the checkpoints): (0, {}) for a new run."""
    stranger = checkpoint.unshared(args.output_dir, world)
    if stranger:
        fail(f"--output-dir {args.output_dir}: {stranger} does not see the folder rank 0 writes; on several nodes it "
             f"must be on a filesystem they all share")
    start, broken = checkpoint.newest_intact(args.output_dir, rank, world) if args.resume else (0, None)
    if broken:
        fail(broken)
    if args.resume and not start and rank == 0:  # a first run of a job that always passes --resume; or a typo
        tqdm.write(f"--resume: no checkpoint in {args.output_dir} yet; starting at step 0")
    if not start:
        return 0, {}
    path = os.path.join(args.output_dir, f"checkpoint-{start}")
    try:  # its own flags (verified with it), so a checkpoint copied in from another run is compared with its run's
        before = json.load(open(os.path.join(path, "args.json"), "rb"))
        before = before if isinstance(before, dict) else {}
    except (OSError, ValueError):
        before = {}
    if start > args.steps:
        fail(f"--steps {args.steps}: {args.output_dir} already holds checkpoint-{start}; expected at least {start}")
    if before.get("lora_rank", args.lora_rank) != args.lora_rank:  # its state would not fit the model
        fail(f"--lora-rank {args.lora_rank}: {path} was trained with --lora-rank {before['lora_rank']}; resume with "
             f"that")
    return start, before


@contextmanager
def loading(model, part):
    """A part of --model that is missing or damaged (a download cut short, say) ends the run with one line."""
    try:
        yield
    except (OSError, ValueError, SafetensorError) as e:
        fail(f"--model {model}: cannot load its {part}/ ({str(e).splitlines()[0]})")


def load_models(args, family, device, world):
    """The frozen reward and VAE, and the transformer to train, sharded (FSDP2) or replicated (DDP). fp32 master
    weights (METHOD.md §5). FSDP2: built on the meta device, each block one all-gather unit, then the root; each rank
    then fills only its shards from the checkpoint, so no rank ever holds the full model. DDP needs the full copy
    anyway: loaded straight onto this rank's device. With LoRA the base is frozen, in bf16 on a GPU, and only the
    fp32 adapters train; --quantize-base nf4 loads it on the CPU and quantizes it onto the device layer by layer,
    and the frozen reward and VAE are bf16 on a GPU."""
    cuda = device.type == "cuda"
    base_dtype = torch.bfloat16 if args.lora_rank and cuda else torch.float32
    frozen_dtype = torch.bfloat16 if args.quantize_base and cuda else torch.float32
    try:
        reward = load_reward(args.reward, args.reward_path, args.clip_h, device, frozen_dtype)
        # the judge: on the CPU beside a 4-bit base (CLIP-H's 2 GB in bf16 would not fit the 24 GB plan)
        judge_model = args.judge and load_reward(args.judge, args.judge_path, args.clip_h, *(
            ("cpu", torch.float32) if args.quantize_base else (device, frozen_dtype)))
    except (OSError, ValueError) as e:
        fail(str(e).splitlines()[0])
    with loading(args.model, "vae"):
        vae = family.VAE.from_pretrained(args.model, subfolder="vae", dtype=frozen_dtype).to(device).eval() \
            .requires_grad_(False)
    with loading(args.model, "transformer"):
        transformer = family.transformer_on_meta(args.model) if args.strategy == "fsdp" else \
            family.TRANSFORMER.from_pretrained(args.model, subfolder="transformer", dtype=base_dtype,
                                                   device_map=None if args.quantize_base else str(device))
    if args.quantize_base:
        quantize_nf4(transformer, device, base_dtype)
    sides = [min(m.in_features, m.out_features) for n, m in transformer.named_modules()
             if n.endswith(family.LORA_TARGETS)]
    if args.lora_rank > min(sides):  # an adapter wider than its layer adds weights and changes nothing more
        fail(f"--lora-rank {args.lora_rank}: expected at most {min(sides)}, the smallest side of this --model's "
             f"adapted layers")
    unused = family.unused(transformer)  # outputs the model discards: no gradient ever, so frozen and no adapters
    if args.lora_rank:
        add_lora(transformer, args.lora_rank, args.lora_alpha, base_dtype, args.seed, family.LORA_TARGETS, unused)
    for name in unused:
        transformer.get_submodule(name).requires_grad_(False)
    transformer.train()
    num_params, largest = num_weights(transformer), max(p.numel() for p in transformer.parameters())  # unsharded
    if args.gradient_checkpointing:  # the VAE's decoder too: its activations at 720x720 are the next largest
        transformer.enable_gradient_checkpointing()
        if vae._supports_gradient_checkpointing:  # Qwen-Image's video VAE does not (diffusers 0.42)
            vae.enable_gradient_checkpointing()
    if args.compile:  # regional compilation: one graph serves every block of a class (in each grad mode): FLUX's 57
        # blocks compile 2, Qwen-Image's 60 also 2 (its last, partly frozen, its own). Dynamo traces forward only;
        # FSDP2's hooks around it and diffusers' checkpointing, which calls it, run eagerly: so the order against
        # fully_shard and checkpointing does not matter (torchtitan's, compile then shard, is kept). fullgraph: no
        # graph break in diffusers 0.42's blocks, LoRA and NF4 layers included; a new one fails at the first step.
        for block in family.blocks(transformer):
            block.compile(fullgraph=True)
    if args.strategy == "fsdp":
        # bf16 compute copies, fp32 reductions. Forward inputs are not cast: under activation checkpointing
        # torch 2.11 skips that cast when it recomputes a block, and the recomputation then differs.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
            if cuda else MixedPrecisionPolicy()
        for block in family.blocks(transformer):
            fully_shard(block, mp_policy=mp)
        fully_shard(transformer, mp_policy=mp)
        with loading(args.model, "transformer"):
            fill_from_checkpoint(transformer.to_empty(device=device), args.model, lora_seed=args.seed)
    else:
        transformer = DistributedDataParallel(transformer, device_ids=[device.index] if cuda else None,
                                              gradient_as_bucket_view=True)  # no second copy of the gradients
    trainable = [p for p in transformer.parameters() if p.requires_grad]  # after fully_shard replaced them
    plan = memory_plan(num_params, world, args.strategy, largest, sum(p.numel() for p in trainable),
                       NF4_BYTES if args.quantize_base else base_dtype.itemsize)
    return types.SimpleNamespace(family=family, transformer=transformer, vae=vae, reward=reward, judge=judge_model,
                                 trainable=trainable, plan=plan, num_params=num_params)


def prompt_schedule(args, captions, rank, world):
    """(index(step, b), this rank's b's, the prompt indices it uses): prompt b (0 <= b < batch size) of each step, in
    one order. Every random draw is keyed by (step, b), never by rank, so the world size is invisible to the math.
    The release's order: its preprocessing deals the prompts to 8 ranks, each every 8th of one seed-0 permutation
    padded to a multiple of 8 (DistributedSampler(shuffle=True)), and writes the ranks' lists one after another;
    its training walks that list, a step's 32 prompts at a time (METHOD.md §5)."""
    if args.prompt_order == "shuffled":
        order = torch.randperm(len(captions), generator=rng(args.seed, "order")).tolist()
    else:
        perm = torch.randperm(len(captions), generator=torch.Generator().manual_seed(0)).tolist()
        perm += perm[:-len(perm) % 8]
        order = [i for r in range(8) for i in perm[r::8]]
    per_rank = args.batch_size // world
    mine = range(rank * per_rank, (rank + 1) * per_rank)
    index = lambda step, b: order[(step * args.batch_size + b) % len(order)]  # noqa: E731
    # what this rank uses, each once; step s uses what step s mod len(order) uses, so no more steps need looking at
    used = dict.fromkeys(index(s, b) for s in range(min(args.steps, len(order))) for b in mine)
    return index, mine, list(used)


def write_run_files(args, before, start):
    """args.json (the flags as this run has them), and metrics.jsonl cut to the steps the checkpoint holds. A flag
    changed since the checkpoints were written is allowed (a lower --lr for the rest of a run, say), never unnoticed."""
    now = json.loads(json.dumps(vars(args)))  # as args.json holds them: tuples as lists
    changed = [k for k in now if k in before and before[k] != now[k] and k not in ("resume", "steps", "output_dir")]
    if changed:
        tqdm.write("resumed with changed flags: " + ", ".join(f"--{k.replace('_', '-')} {before[k]} -> {now[k]}"
                                                              for k in changed))
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "args.json"), "w") as f:
        json.dump(now, f, indent=2)
    path = os.path.join(args.output_dir, "metrics.jsonl")
    kept = [line.rstrip("\n") + "\n" for line in open(path, errors="replace") if 0 <= metrics_step(line) <= start] \
        if start and os.path.isfile(path) else []
    with open(path, "w") as f:  # drop lines of steps a crash lost, or cut short: they are redone
        f.writelines(kept)


def held_out_prompts(args, captions, image_paths, say):
    """(training captions, their images, the judge's held-out prompts): --eval-prompts, or --eval-count prompts
    drawn by --seed and taken out of training; all as they were without --judge."""
    if not args.judge:
        return captions, image_paths, []
    if args.eval_prompts:
        held = read_prompts(args.eval_prompts, "--eval-prompts")
        both = set(held) & set(captions)
        if both:
            say(f"--eval-prompts: {len(both)} of its {len(held)} prompts are training prompts too")
        return captions, image_paths, held
    if not args.eval_count < len(captions):
        fail(f"--eval-count {args.eval_count}: expected fewer than the {len(captions)} prompts (the rest train); or "
             f"--eval-prompts FILE")
    out = set(torch.randperm(len(captions), generator=rng(args.seed, "held-out"))[:args.eval_count].tolist())
    keep = [i for i in range(len(captions)) if i not in out]
    say(f"held out for the judge: {len(out)} of the {len(captions)} prompts (--eval-count), never trained on")
    return ([captions[i] for i in keep], image_paths and [image_paths[i] for i in keep],
            [captions[i] for i in sorted(out)])


def best_checkpoint(output_dir, rows):
    """The checkpoint (or the base model, step 0) with the judge's best mean, in words."""
    best = judge.best_of(rows, {0, *checkpoint.complete_steps(output_dir)})
    if best is None:
        return "no checkpoint evaluated yet"
    where = "the base model (step 0)" if best["step"] == 0 else os.path.join(output_dir, f"checkpoint-{best['step']}")
    overall = judge.best_of(rows)
    other = "" if overall is best else f"; step {overall['step']} scored {overall['eval_judge']:.4f}, without a " \
                                       f"checkpoint"
    return f"{where} (judge {best['eval_judge']:.4f}{other})"


def history(args, start, evaluate, master):
    """metrics.jsonl's rows so far, on every rank: a resumed run's judge compares with what it said before. With the
    judge, a new run's first row is its evaluation of the base model (step 0)."""
    path = os.path.join(args.output_dir, "metrics.jsonl")
    rows = [[json.loads(line) for line in open(path)] if master and os.path.isfile(path) else None]
    dist.broadcast_object_list(rows)
    rows = rows[0] or []
    if evaluate and start == 0:
        rows.append({"step": 0, **evaluate(0)})
        if master:
            write_row(args.output_dir, rows)
    return rows


def write_row(output_dir, rows):
    """Appends the last of rows to metrics.jsonl, then draws metrics.png and eval/strips.png from them (judge.py)."""
    with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(rows[-1]) + "\n")
    judge.draw_metrics(os.path.join(output_dir, "metrics.png"), rows)
    if "eval_judge" in rows[-1]:
        judge.draw_strips(os.path.join(output_dir, "eval"), rows)


def metrics_step(line):  # -1 for a line a crash cut short
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


def main(argv=None):
    args = parse_args(argv)
    check_inputs(args)
    captions, image_paths = (read_captioned_images(args.image_dir, args.resolution) if args.image_dir is not None else
                             (TINY_PROMPTS if args.prompts is None else read_prompts(args.prompts), None))
    if int(os.environ.get("RANK", 0)) == 0:  # one run per output folder: rank 0 holds the lock until it exits
        checkpoint.lock(args.output_dir)
    rank, world, device = init_distributed(args.seed)
    master = rank == 0
    say = lambda *a: master and tqdm.write(" ".join(map(str, a)))  # noqa: E731
    start, before = resume_point(args, rank, world)

    if not args.model:  # tiny random models, written once and loaded through the same from_pretrained
        from tiny import tiny_model_paths
        if master:
            tiny_model_paths()  # rank 0 builds, the others then find them
        dist.barrier()
        tiny_flux, tiny_clip = tiny_model_paths()
        say(f"tiny random models: {tiny_flux} (FLUX), {tiny_clip} (reward)")
        args.model, args.reward_path = tiny_flux, args.reward_path or tiny_clip
    family = FAMILIES[check_model_folder(args.model)]  # the model's plumbing: flux.py or qwen.py
    # the text embeddings first: T5-XXL (9.5 GB) and CLIP-L are freed before the transformer loads
    captions, image_paths, held = held_out_prompts(args, captions, image_paths, say)
    index, mine, used = prompt_schedule(args, captions, rank, world)
    sample_caption = captions[rank % len(captions)]
    embeds = family.encode_prompts(args.model, [captions[i] for i in used] + [sample_caption] + held,
                                   args.max_sequence_length, os.path.join(args.output_dir, "text_cache"), device,
                                   torch.bfloat16 if device.type == "cuda" else torch.float32)
    m = load_models(args, family, device, world)
    say(f"transformer: {m.num_params / 1e6:.1f}M parameters, {sum(p.numel() for p in m.trainable) / 1e6:.1f}M "
        f"trained; per rank under {args.strategy} x {world}: " +
        ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in m.plan.items()))
    # foreach: what CUDA tensors and DTensors get by default, here on CPUs too (a loop over DTensors costs as much
    # as a tiny model's step; the same bits)
    optimizer = torch.optim.AdamW(m.trainable, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay,
                                  eps=args.adam_eps, foreach=True)
    if start:
        checkpoint.load(m.transformer, optimizer, os.path.join(args.output_dir, f"checkpoint-{start}"))
        say(f"resumed from {args.output_dir}/checkpoint-{start} (verified against its manifest)")
    if master:
        write_run_files(args, before, start)
    evaluate = lambda step: evaluate_held_out(step, args, m, embeds, held, rank, world, device)  # noqa: E731
    rows = history(args, start, evaluate if args.judge else None, master)

    sample = lambda step: save_samples(  # noqa: E731
        m, family.condition(embeds, sample_caption, args.resolution, device), sample_caption,
        family.latent_noise(args.resolution, rng(args.seed, "sample", rank), device),
        os.path.join(args.output_dir, "samples", f"step-{step:06d}.png"), args, rank, world)
    if args.sample_every and start == 0:
        sample(0)
    last = train_loop(args, m, optimizer, captions, image_paths, index, mine, embeds, start, sample,
                      evaluate if args.judge else None, rows, rank, device)
    weights = "pytorch_lora_weights" if args.lora_rank else "diffusion_pytorch_model"
    say(f"done: weights {last}/{weights}.safetensors, metrics {args.output_dir}/metrics.jsonl and metrics.png"
        + (f", samples {args.output_dir}/samples/" if args.sample_every else ""))
    if args.judge:
        say(f"best by the judge ({args.judge}): {best_checkpoint(args.output_dir, rows)}; its curves in "
            f"metrics.png, the held-out images of every evaluation in {args.output_dir}/eval/strips.png")
    dist.barrier()  # no rank tears down its connections while another still sends on them (gloo aborts then)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------- the loop

def train_loop(args, m, optimizer, captions, image_paths, index, mine, embeds, start, sample, evaluate, rows, rank,
               device):
    """Steps start+1 .. --steps: each rank's prompts, srpo_step on each, then one clipped AdamW step; metrics (each
    step's row appended to rows), checkpoints, samples and the judge's evaluations (evaluate) as the flags ask; the
    hacking alarm. Returns the last checkpoint's path."""
    world, master, cuda, f = dist.get_world_size(), rank == 0, device.type == "cuda", m.family
    say = lambda text: master and tqdm.write(text)  # noqa: E731
    last = os.path.join(args.output_dir, f"checkpoint-{start}") if start else "none"

    def stop(what):  # nothing of this step is saved; the last good checkpoint stays the newest
        bar.close()
        fail(f"{what}; last good checkpoint: {last}")
    def publish(folder):  # the weights for others to load, and the flags that trained them
        save_weights(m.transformer, folder, rank, m.family.PIPELINE)
        if master:
            with open(os.path.join(folder, "args.json"), "w") as f:
                json.dump(vars(args), f, indent=2)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="srpo", disable=not master)
    for step in bar:
        t0 = time.time()
        noise = f.latent_noise(args.resolution, rng(args.seed, "noise", step), device)  # one for the whole batch
        sums, seconds = Counter(), Counter()
        for j, b in enumerate(mine):  # accumulate this rank's prompts; the gradient is the batch's mean
            if len(mine) > 1:
                bar.set_postfix_str(f"prompt {j + 1}/{len(mine)}")
            caption = captions[index(step, b)]
            cond = f.condition(embeds, caption, args.resolution, device)
            with timer(seconds, "rollout", cuda):
                if image_paths:  # offline: a real image, with the step's noise
                    x0 = f.encode_image(m.vae, load_image(image_paths[index(step, b)], args.resolution),
                                      rng(args.seed, "vae", step, b))
                else:  # online: the current model's own sample from that noise
                    x0 = f.rollout(m.transformer, noise, cond, args.rollout_steps, args.shift, args.rollout_guidance,
                                 progress=master and cuda)
            # DDP reduces once, at the last prompt's backward; FSDP2 reduce-scatters every backward into
            # sharded gradients (an unsharded copy of FLUX's gradients would not fit)
            sync = args.strategy == "fsdp" or j == len(mine) - 1
            with timer(seconds, "branches", cuda), (nullcontext() if sync else m.transformer.no_sync()):
                sums.update(srpo_step(lambda x, s: f.velocity(m.transformer, x, s, cond, args.guidance),
                                      lambda x: f.decode(m.vae, x, args.resolution), m.reward, x0, noise, caption, step,
                                      rng(args.seed, "t", step, b), **step_settings(args), loss_scale=1 / len(mine),
                                      autocast=lambda: autocast(device)))
        grad_norm = torch.nn.utils.clip_grad_norm_(m.trainable, args.max_grad_norm)
        grad_norm = (grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm).item()

        # the batch's numbers, averaged; a non-finite loss or gradient stops all ranks before the weights change
        stats = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
        dist.all_reduce(stats)
        stats = dict(zip(sums, (stats / args.batch_size).tolist()))
        if not (math.isfinite(stats["loss"]) and math.isfinite(grad_norm)):
            stop(f"loss is {stats['loss']} (gradient norm {grad_norm}) at step {step + 1}: stopped before the "
                 f"optimizer step")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not weights_finite(m.trainable):
            stop(f"the weights became non-finite at step {step + 1} (loss {stats['loss']}, gradient norm "
                 f"{grad_norm}): stopped before saving")

        bar.set_postfix_str(f"loss {stats['loss']:.4f}, reward " + " ".join(
            f"{stats[f'reward_{n}']:.4f}" for n in BRANCHES if f"reward_{n}" in stats))
        record = step_row(step + 1, stats, grad_norm, optimizer.param_groups[0]["lr"], time.time() - t0, seconds,
                          device)
        hacking = None
        if evaluate and (step + 1 == args.steps or (args.eval_every and (step + 1) % args.eval_every == 0)):
            record.update(evaluate(step + 1))
            hacking = judge.alarm(rows, record)
        rows.append(record)
        if master:
            write_row(args.output_dir, rows)
        stopping = hacking and args.stop_when_hacking
        if step + 1 == args.steps or (args.checkpoint_every and (step + 1) % args.checkpoint_every == 0) or stopping:
            path, error = checkpoint.save(m.transformer, optimizer, step + 1, args.output_dir, publish, rank, world)
            if error:
                stop(f"saving checkpoint-{step + 1} in {args.output_dir} failed ({error}); removed it")
            last = path
        if args.sample_every and ((step + 1) % args.sample_every == 0 or step + 1 == args.steps):
            sample(step + 1)
        if hacking:
            bar.clear()
            say(judge.alarm_line(record, *hacking, args.judge, best_checkpoint(args.output_dir, rows)))
            if stopping:
                bar.close()
                say(f"stopped by --stop-when-hacking at step {step + 1}; the same command with --resume continues")
                break
    return last


def step_row(step, stats, grad_norm, lr, step_time, seconds, device):
    """metrics.jsonl's row of a step: the batch's loss, each branch's reward, sigmas and k (None for a branch that
    did not train), the gradient norm before clipping, times and peak memory."""
    row = {"step": step, "loss": stats["loss"]}
    for n in BRANCHES:
        row[f"reward_{n}"] = stats.get(f"reward_{n}")
        row[f"sigma_{n}"] = [stats[f"sigma_{n}_from"], stats[f"sigma_{n}_to"]] if f"k_{n}" in stats else None
        row[f"k_{n}"] = stats.get(f"k_{n}")
    return {**row, "grad_norm": grad_norm, "lr": lr, "step_time_s": step_time, "time_rollout_s": seconds["rollout"],
            "time_branches_s": seconds["branches"], **peak_memory_gib(device)}


@contextmanager
def timer(seconds, key, cuda):
    """Adds the wall time of the block to seconds[key] (after the GPU's queued work, on CUDA)."""
    t0 = time.time()
    yield
    if cuda:
        torch.cuda.synchronize()
    seconds[key] += time.time() - t0


def peak_memory_gib(device):
    """{max_memory_gib, max_reserved_gib}: torch.cuda's peaks so far, allocated and reserved (what a card must hold:
    the allocator's cache too), the largest over ranks; None on a CPU."""
    if device.type != "cuda":
        return dict(max_memory_gib=None, max_reserved_gib=None)
    peak = torch.tensor([torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)],
                        device=device) / 2**30
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return dict(zip(("max_memory_gib", "max_reserved_gib"), peak.tolist()))


def weights_finite(trainable):
    """Whether every trained weight of every rank is finite (FSDP2: each rank checks its shards); one sync."""
    bad = torch.stack([~torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all() for p in trainable]).sum()
    dist.all_reduce(bad)
    return bad.item() == 0


# ----------------------------------------------------------------------------------------- what a run writes

def evaluate_held_out(step, args, m, embeds, held, rank, world, device):
    """judge.py's fields of metrics.jsonl at step: the held-out prompts rendered from their fixed noises (the
    samples' settings), scored by the judge and by the training reward's relative part; the images saved on rank 0."""
    t0 = time.time()
    f = m.family
    render = lambda i: f.decode(m.vae, f.rollout(  # noqa: E731
        m.transformer, f.latent_noise(args.resolution, rng(args.seed, "eval", i), device),
        f.condition(embeds, held[i], args.resolution, device), args.rollout_steps, args.shift, f.SAMPLE_GUIDANCE),
        args.resolution)[0]
    scorers = {"judge": lambda images, prompt: m.judge.score(images.to(m.judge.model.device), [prompt]),
               "reward": judge.relative_score(m.reward, args.pos_words, args.neg_words)}
    scores, images = judge.evaluate(render, scorers, held, rank, world)
    if rank == 0:
        judge.save_strip(os.path.join(args.output_dir, "eval", f"step-{step:06d}.png"), images)
    return {**judge.summary(scores), "eval_time_s": time.time() - t0}


def save_samples(m, cond, caption, noise, path, args, rank, world):
    """Every rank renders its own fixed prompt from its own fixed noise, at sample.py's guidance (FLUX 3.5, Qwen-Image's
    true CFG 4) and the rollout's steps; rank 0 saves the grid."""
    with torch.no_grad():
        image = m.family.decode(m.vae, m.family.rollout(m.transformer, noise, cond, args.rollout_steps, args.shift,
                                                        m.family.SAMPLE_GUIDANCE), args.resolution)
    images = [torch.empty_like(image) for _ in range(world)]
    dist.all_gather(images, image)
    captions = [None] * world
    dist.all_gather_object(captions, caption)
    if rank == 0:
        images = torch.cat(images)
        cols = min(len(images), 8)
        rows = -(-len(images) // cols)
        grid = torch.ones(rows * cols, *images.shape[1:], device=images.device)
        grid[:len(images)] = images
        grid = grid.view(rows, cols, 3, args.resolution, args.resolution).permute(0, 3, 1, 4, 2)
        grid = (grid.reshape(rows * args.resolution, cols * args.resolution, 3) * 255).round().byte().cpu()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(grid.numpy()).save(path)
        with open(path[:-4] + ".txt", "w") as f:
            f.write("\n".join(captions) + "\n")


if __name__ == "__main__":  # every checkpoint-N is complete: a save is renamed into place when done
    run_command(main, "the same command with --resume continues from the newest checkpoint")
