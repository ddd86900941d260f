"""What the experiments measure with, each in one place: the device, one clock, one reading of peak memory (and one
of a train.py process's, as the card sees it), one table printer, and the reduced FLUX models (FLUX.1-dev's blocks at
any width, a few of them, random weights), written once and loaded as train.py loads them, or trained by train.py
itself for a few steps."""
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import types

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, T5EncoderModel

import train
from flux import add_lora, autocast, conditioning, decode, encode_prompts
from inputs import fail
from srpo_reward import control_prompts, load_reward
from tiny import clip_tokenizer, tiny_model_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTION = "a cat sitting on a chair"
# The real models, as their config.json files on the hub give them.
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))  # black-forest-labs/FLUX.1-dev, transformer/
FLUX_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
                shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)  # vae/
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K, HPSv2.1's and PickScore's architecture (open_clip's ViT-H-14: embed 1024;
# vision 32 x 1280, head width 80, patch 14, 224 px; text 24 x 1024, 16 heads, 77 tokens; GELU, not QuickGELU)
VIT_H_14 = dict(
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     vocab_size=49408, max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       patch_size=14, image_size=224, hidden_act="gelu"),
    projection_dim=1024)


def rope_axes(head_dim):
    """FLUX's rotary split (16, 56, 56) of 128 scaled to head_dim, each axis even, summing to head_dim."""
    t = max(2, head_dim // 16 * 2)
    h = (head_dim - t) // 4 * 2
    return (t, h, head_dim - t - h)


def pick_device(name=None):
    """torch.device(name), by default CUDA where there is one. On CUDA cuDNN's fused attention is turned off, as
    train.py turns it off: its backward failed at FLUX's width and 720x720 (H200, torch 2.11), flash attention
    computes the same."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    return device


def machine(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads, load average "
            f"{os.getloadavg()[0]:.1f} at start, torch {torch.__version__}")


# ----------------------------------------------------------------------------------------- the clock

def stamp(device):
    """A point in time: a recorded CUDA event on a GPU (the kernels queued before it count), the wall clock on a
    CPU (on the host, also beside a GPU: stamp(torch.device("cpu")))."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def seconds(start, end):
    """Seconds from one stamp to a later one; on a GPU, once the kernels queued before end have run."""
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1000


def timed(fn, device):
    """Seconds fn() takes by stamp and seconds."""
    start = stamp(device)
    fn()
    return seconds(start, stamp(device))


# ----------------------------------------------------------------------------------------- memory, bytes

def held(device):
    """Bytes held now: the tensors allocated on a GPU, this process's resident set on a CPU (Linux's VmRSS)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else status_bytes("VmRSS")


def reset_peak(device):
    """Starts a new peak (peak); returns held(device)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: VmHWM, the resident set's peak, starts again from VmRSS
    return held(device)


def peak(device):
    """The most bytes held since reset_peak: torch.cuda.max_memory_allocated, or Linux's VmHWM."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else status_bytes("VmHWM")


def status_bytes(field, pid="self"):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB


def md_table(header, rows):
    """A markdown table, a blank line after it."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]) + "\n"


# ----------------------------------------------------------------------------------------- the reduced models

def paths(root):
    """The FLUX pipeline folder, the reward's folder and the prompts file that write_models writes under root."""
    return os.path.join(root, "flux"), os.path.join(root, "reward"), os.path.join(root, "prompts.txt")


def transformer_config(layers, single_layers, heads, head_dim, text_width, pooled_width):
    return dict(FLUX_DEV, num_layers=layers, num_single_layers=single_layers, num_attention_heads=heads,
                attention_head_dim=head_dim, axes_dims_rope=rope_axes(head_dim), joint_attention_dim=text_width,
                pooled_projection_dim=pooled_width)


def write_models(root, layers, single_layers, heads, head_dim, vae_width, text_width=32, pooled_width=32,
                 reward=None, lora_rank=64):
    """Under root, FLUX.1-dev's folder layout with a transformer of its blocks at heads x head_dim (layers double,
    single_layers single), its VAE at vae_width (x1 x2 x4 x4 by block) and one-layer text encoders of the given
    widths, all random; the reward: a CLIPModel of config reward (VIT_H_14) with tiny.py's tokenizer (its ids fit
    ViT-H's vocabulary), or tiny.py's CLIP; train.py's tiny prompts. Returns the parameter counts, with those of
    FLUX.1-dev's 19 + 38 blocks at this width (target) and of rank lora_rank adapters on this transformer."""
    device = pick_device()
    started = time.time()
    tiny_flux, tiny_clip = tiny_model_paths()
    flux, reward_dir, prompts = paths(root)
    shutil.copytree(tiny_flux, flux)  # model_index.json, scheduler and tokenizers; the models are replaced below
    config = transformer_config(layers, single_layers, heads, head_dim, text_width, pooled_width)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds, where a CPU takes minutes for a ViT-H
        transformer = FluxTransformer2DModel(**config)
        vae = AutoencoderKL(**dict(FLUX_VAE, block_out_channels=(vae_width, 2 * vae_width, 4 * vae_width,
                                                                 4 * vae_width), norm_num_groups=min(32, vae_width)))
        for sub, cls, width in (("text_encoder", CLIPTextModel, pooled_width),
                                ("text_encoder_2", T5EncoderModel, text_width)):
            encoder = cls.config_class.from_pretrained(os.path.join(flux, sub))
            encoder.hidden_size = width  # T5's d_model: FLUX's joint_attention_dim; CLIP's: its pooled_projection_dim
            cls(encoder).save_pretrained(os.path.join(flux, sub))
        if reward:
            tokenizer = clip_tokenizer()
            ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
            clip = CLIPModel(CLIPConfig(**dict(reward, text_config=dict(reward["text_config"], **ids))))
    # bf16 files: half the bytes to write and read; train.py and load_reward cast them to fp32 as for the real ones
    transformer.to(torch.bfloat16).save_pretrained(os.path.join(flux, "transformer"))
    vae.save_pretrained(os.path.join(flux, "vae"))
    if reward:
        clip.to(torch.bfloat16).save_pretrained(reward_dir)
        tokenizer.save_pretrained(reward_dir)
    else:
        shutil.copytree(tiny_clip, reward_dir)
        clip = CLIPModel.from_pretrained(reward_dir)
    with open(prompts, "w") as f:
        f.write("\n".join(train.TINY_PROMPTS) + "\n")
    with torch.device("meta"):
        target = FluxTransformer2DModel(**dict(config, num_layers=FLUX_DEV["num_layers"],
                                               num_single_layers=FLUX_DEV["num_single_layers"]))
        adapted = add_lora(FluxTransformer2DModel(**config), lora_rank, lora_rank, torch.bfloat16, 0)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "CPU", torch=torch.__version__,
                params=count(transformer), target_params=count(target),
                lora_params=sum(p.numel() for p in adapted.parameters() if p.requires_grad),
                block_params=[count(b) for b in [*transformer.transformer_blocks,
                                                 *transformer.single_transformer_blocks]],
                double_params=count(transformer.transformer_blocks[0]),
                single_params=count(transformer.single_transformer_blocks[0]),
                vae_params=count(vae), reward_params=count(clip), seconds=time.time() - started)


def load_models(root, resolution, text_len, device, checkpointing, lora_rank=0, rollout_steps=25):
    """The models under root as train.py loads them for DDP: the transformer in fp32 in train mode, or rank
    lora_rank adapters on a frozen base (bf16 on a GPU); the frozen VAE and reward; with checkpointing, the
    transformer and the VAE's decoder checkpointed; AdamW with the release's settings over what trains; the
    caption's conditioning, its embeddings cached as train.py caches them; train.py's flags (targs).
    weights, frozen: the bytes (held) that loading the transformer and then everything else added."""
    flux, reward_dir, _ = paths(root)
    if not os.path.isdir(flux):
        fail(f"--models {root}: no models there; `python -m experiments.gpu models --models {root}` writes them")
    targs = train.parse_args(["--model", flux, "--reward-path", reward_dir, "--resolution", str(resolution),
                              "--rollout-steps", str(rollout_steps), "--max-sequence-length", str(text_len)])
    before = held(device)
    base_dtype = torch.bfloat16 if lora_rank and device.type == "cuda" else torch.float32
    transformer = FluxTransformer2DModel.from_pretrained(flux, subfolder="transformer", dtype=base_dtype)
    if lora_rank:
        add_lora(transformer, lora_rank, lora_rank, base_dtype, seed=0)
    transformer = transformer.to(device).train()
    weights = held(device) - before
    vae = AutoencoderKL.from_pretrained(flux, subfolder="vae").to(device).eval().requires_grad_(False)
    reward = load_reward("hps", reward_dir, device=device)
    cond = conditioning(caption_embeds(root, text_len, device), resolution, device)
    frozen = held(device) - before - weights
    if checkpointing:
        transformer.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=targs.lr,
                                  betas=tuple(targs.betas), weight_decay=targs.weight_decay, eps=targs.adam_eps,
                                  foreach=True)  # as train.py
    return types.SimpleNamespace(transformer=transformer, vae=vae, reward=reward, optimizer=optimizer, cond=cond,
                                 targs=targs, device=device, res=resolution,
                                 weights=weights, frozen=frozen)


def caption_embeds(root, text_len, device):
    """The caption's T5 and CLIP embeddings, computed once and cached under root as train.py caches them."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return encode_prompts(paths(root)[0], [CAPTION], text_len, os.path.join(root, "text_cache"), device,
                          dtype)(CAPTION)


def srp_reward(m, x0_hat, step):
    """The SRP reward of latents x0_hat (METHOD.md §4), decoded and scored as srpo_step scores its denoise
    branch's."""
    pos, neg = control_prompts(CAPTION, step)
    with autocast(m.device):
        return m.reward.srp(decode(m.vae, x0_hat, m.res), [pos], [neg], m.targs.k_denoise[0]).float()


def memory_watch(device):
    """(watch, seen) for run_train_py: seen[0] becomes the most memory train.py took as the system sees it: on a GPU
    the card's used memory (every process's, torch.cuda.mem_get_info) above its lowest while train.py ran (before
    train.py's first CUDA call, its imports take seconds; by then a process run before it has given its memory
    back), which includes what torch's allocator does not count (the CUDA context, NCCL's buffers); on a CPU the
    process's peak resident set."""
    seen = [0]
    if device.type == "cuda":
        used = []

        def watch(process):
            free, total = torch.cuda.mem_get_info(device)
            used.append(total - free)
            seen[0] = max(used) - min(used)
    else:
        def watch(process):  # a process that has just ended has no VmHWM left
            seen[0] = max(seen[0], status_bytes("VmHWM", process.pid) or 0)
    return watch, seen


def run_train_py(root, out_dir, steps, flags, device, watch=None):
    """train.py on the models under root, one prompt a step, with flags; its output in out_dir.log. It is stopped
    once its last step's metrics are written: its final checkpoint (16 bytes a parameter) is no part of a step.
    watch(process), if given, is called while it runs, five times a second and once before it is stopped.
    Returns the metrics, a dict a step."""
    flux, reward_dir, prompts = paths(root)
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--model", flux, "--reward", "hps", "--reward-path",
               reward_dir, "--prompts", prompts, "--output-dir", out_dir, "--steps", str(steps), "--batch-size", "1",
               "--sample-every", "0", "--checkpoint-every", "0", *flags]
    metrics = os.path.join(out_dir, "metrics.jsonl")
    # the lines train.py has finished writing
    written = lambda: [ln for ln in open(metrics) if ln.endswith("\n")] if os.path.isfile(metrics) else []  # noqa: E731
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="") if device.type == "cpu" else None
    with open(out_dir + ".log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        while process.poll() is None and len(written()) < steps:
            time.sleep(0.2)
            if watch:
                watch(process)
        if watch and process.poll() is None:
            watch(process)
        process.kill()
        process.wait()
    if len(written()) < steps:
        tail = open(out_dir + ".log", errors="replace").read().splitlines()[-30:]
        print("\n".join(tail), file=sys.stderr)  # a failure on a GPU is worth its traceback
        fail(f"train.py {' '.join(flags)}: {len(written())} of {steps} steps ({(tail or [''])[-1].strip()[-200:]})")
    return [json.loads(line) for line in written()]
