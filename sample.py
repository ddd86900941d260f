r"""Generate images with SRPO weights: diffusers' FluxPipeline (or QwenImagePipeline, by the --model folder's
model_index.json) with the release's inference settings, 1-N GPUs.

CPU, the tiny random pipeline (no download; the settings only make it quick):
    python sample.py --prompt "a cat on a red chair"
One GPU, FLUX.1-dev with the SRPO transformer (a file train.py wrote, or the release's):
    python sample.py --model black-forest-labs/FLUX.1-dev --weights srpo/diffusion_pytorch_model.safetensors \
        --prompts prompts.txt --output-dir out/srpo
8 GPUs, base and SRPO side by side (writes out/compare/base, out/compare/srpo and out/compare/compare.png):
    torchrun --nproc_per_node=8 sample.py --model black-forest-labs/FLUX.1-dev --weights srpo/ \
        --prompts prompts.txt --output-dir out/compare --compare

Image i of the prompt list is made by the pipeline with a CPU torch.Generator seeded with seed + i, so it is
the same whichever rank makes it and however many ranks there are. A rerun skips images already written, so a
killed job resumes. Each folder gets NNNNN.png (prompt, seed and settings in the PNG text), prompts.jsonl
(the same, one object per image, written when the folder is complete) and contact_sheet.png.
"""
import json
import logging
import os

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # notes at import with nothing to act on (train.py's)
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
import torch
import torch.distributed as dist
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load_file
from tqdm import tqdm

import checkpoint
from checkpoint import LORA_NAME, WEIGHTS_NAME, check_lora, check_weights
import flux
import qwen
from flux import quantize_nf4
from inputs import (SEED, SIZE, TOKENS, Parser, check_model_folder, check_ranges, check_text_tokens, fail, read_prompts,
                    run_command)

PIPE_ARGS = ("height", "width", "num_inference_steps", "guidance_scale", "max_sequence_length")
SHEET_IMAGES = 16  # contact sheet: the first 16 images, 4 per row
COMPARE_ROWS = 8   # compare.png: the first 8 prompts, base left, SRPO right
THUMB = 512        # grid cells are shrunk to at most 512 px, so a grid of 1024 px images stays viewable
RELEASE = dict(height=1024, width=1024, num_inference_steps=50)  # the release's inference settings (METHOD.md §5)
TINY = dict(height=64, width=64, num_inference_steps=8)          # without --model, the tiny random pipeline


# Each numeric flag's valid values, checked before anything loads: (flag, test, what is expected).
RANGES = [("height", *SIZE), ("width", *SIZE),
          ("num_inference_steps", lambda v: 1 <= v <= 1000,
           "1 to 1000 Euler steps (the scheduler's 1000 training timesteps; the release samples with 50)"),
          ("guidance_scale", lambda v: 0 <= v <= 100, "a guidance (FLUX) or true-CFG scale (Qwen-Image) from 0 to "
                                                       "100"),  # nan fails too
          ("max_sequence_length", *TOKENS), ("seed", *SEED)]


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--model", help="a FluxPipeline or QwenImagePipeline folder, or a FLUX hub id (default: the tiny "
                                   "random FLUX pipeline of tiny.py)")
    p.add_argument("--weights", help=f"SRPO transformer: {WEIGHTS_NAME}, or a folder holding it")
    p.add_argument("--lora", help=f"SRPO LoRA: {LORA_NAME}, or a folder holding it")
    p.add_argument("--quantize-base", choices=("nf4",), help="the transformer in 4 bits, as train.py --quantize-base "
                                                             "trains against: FLUX.1-dev on a 24 GB GPU")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompts", help="a .txt file, one prompt per line, or a .json list of strings (HPDv2's)")
    p.add_argument("--output-dir", default="out/samples", help="default: out/samples")
    p.add_argument("--compare", action="store_true", help="base and SRPO, same seeds: DIR/base, DIR/srpo, compare.png")
    # The release's inference settings (METHOD.md §5), named after FluxPipeline's arguments.
    p.add_argument("--guidance-scale", type=float, help=f"FLUX's guidance, default {flux.SAMPLE_GUIDANCE}; "
                                                         f"Qwen-Image's true-CFG scale, default {qwen.SAMPLE_GUIDANCE}")
    p.add_argument("--num-inference-steps", type=int,
                   help=f"default {RELEASE['num_inference_steps']} ({TINY['num_inference_steps']} tiny)")
    p.add_argument("--height", type=int, help=f"a multiple of 16, default {RELEASE['height']} ({TINY['height']} tiny)")
    p.add_argument("--width", type=int, help=f"a multiple of 16, default {RELEASE['width']} ({TINY['width']} tiny)")
    p.add_argument("--max-sequence-length", type=int, default=512,
                   help="text tokens, default 512 (FLUX's T5: at most 512; Qwen-Image's at most 1024)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i; default 0")
    args = p.parse_args(argv)
    for key, value in (RELEASE if args.model is not None else TINY).items():  # tiny random pipeline: seconds an image
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    return args


def render(pipe, sample_args, records, out_dir, rank, world_size):
    """Make this rank's share of the images (i = rank, rank + world_size, ...) not on disk yet, each with its record
    as PNG text; returns (rendered, skipped). Every rank first checks every image already there against its
    record: the same answer on all ranks, so a mismatch stops them all with one line."""
    os.makedirs(out_dir, exist_ok=True)
    done = set()
    for r in records:
        path = os.path.join(out_dir, r["file"])
        if os.path.exists(path):  # complete: an image is only ever renamed into place
            try:
                with Image.open(path) as im:  # im.text decodes the whole file: a damaged one fails here
                    key = next((k for k in {**r, **im.text} if im.text.get(k) != (str(r[k]) if k in r else None)),
                               None)
            except (OSError, SyntaxError, ValueError) as e:  # damaged since: a disk, a copy, a hand
                fail(f"{path}: cannot read it as an image ({e}); remove it and rerun to make it again")
            if key:
                fail(f"{path}: already made with {key}={im.text.get(key)!r}, this run has {r.get(key)!r}; use "
                     f"another --output-dir for other settings")
            done.add(r["file"])
    mine = records[rank::world_size]
    todo = [r for r in mine if r["file"] not in done]
    for r in tqdm(todo, desc=out_dir, disable=rank != 0):
        # a CPU generator: the same noise whatever the device (diffusers draws it on the CPU, then moves it)
        generator = torch.Generator().manual_seed(r["seed"])
        image = pipe(r["prompt"], generator=generator, **sample_args(**{k: r[k] for k in PIPE_ARGS})).images[0]
        info = PngInfo()
        for key, value in r.items():
            info.add_text(key, str(value))
        path = os.path.join(out_dir, r["file"])
        try:
            image.save(path + ".tmp", format="PNG", pnginfo=info)
        except OSError as e:  # PIL's write errors (a full disk) name no file: the line names the image
            raise OSError(e.errno, e.strerror, path) from e
        os.replace(path + ".tmp", path)
    return len(todo), len(mine) - len(todo)


def grid(paths, cols, out):
    """The images at paths pasted in rows of cols, each shrunk to at most THUMB px, saved as out."""
    images = [Image.open(p).convert("RGB") for p in paths]
    for im in images:
        im.thumbnail((THUMB, THUMB))
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, -(-len(images) // cols) * h), "white")
    for j, im in enumerate(images):
        sheet.paste(im, ((j % cols) * w, (j // cols) * h))
    sheet.save(out)


def check_inputs(args):
    """(the model family's module, the prompts): every flag checked, one line each, before anything loads."""
    family = {"flux": flux, "qwen": qwen}[check_model_folder(args.model)] if args.model and \
        os.path.isdir(args.model) else flux  # the pipeline folder's family; a hub id is FLUX's
    args.guidance_scale = family.SAMPLE_GUIDANCE if args.guidance_scale is None else args.guidance_scale
    check_ranges(args, RANGES)
    check_text_tokens(args.max_sequence_length, family)
    if args.prompt is not None and not args.prompt.strip():  # an unset shell variable: never an image of nothing
        fail(f"--prompt {args.prompt!r}: expected a prompt that is not blank")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
    if args.compare and not (args.weights or args.lora):
        fail("--compare: needs --weights or --lora, the SRPO weights to set beside the base model")
    if args.weights and args.lora:
        fail("--weights and --lora: expected one of them, a full transformer or a LoRA")
    if args.weights and args.quantize_base:
        fail(f"--weights and --quantize-base {args.quantize_base}: expected --lora (a full transformer's weights are "
             f"its own, not a 4-bit base's adapters)")
    if args.model is None:  # the tiny random pipeline, built offline on first use
        from tiny import tiny_model_paths
        args.model = tiny_model_paths()[0]
    return family, prompts


def load_pipeline(args, family, device):
    """The pipeline in bf16 on a GPU, fp32 on a CPU; with --quantize-base, loaded on the CPU and its transformer
    quantized onto the device a layer at a time."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        pipe = family.PIPELINE.from_pretrained(args.model, dtype=dtype)
    except (OSError, ValueError) as e:
        fail(f"--model {args.model}: cannot load a {family.PIPELINE.__name__} ({str(e).splitlines()[0]})")
    if args.quantize_base:
        quantize_nf4(pipe.transformer, device, dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # ours is over prompts
    return pipe


def finish_folder(out_dir, records, rendered, skipped):
    """prompts.jsonl (renamed into place: a folder with one is complete) and contact_sheet.png, on rank 0."""
    jsonl = os.path.join(out_dir, "prompts.jsonl")
    with open(jsonl + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(jsonl + ".tmp", jsonl)
    files = [os.path.join(out_dir, r["file"]) for r in records[:SHEET_IMAGES]]
    grid(files, min(4, len(files)), os.path.join(out_dir, "contact_sheet.png"))
    print(f"{out_dir}: {rendered} images rendered, {skipped} already there; prompts.jsonl, contact_sheet.png written")


def main(argv=None):
    args = parse_args(argv)
    family, prompts = check_inputs(args)
    # torchrun sets these; a plain `python sample.py` is rank 0 of 1
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1:  # only so rank 0 can wait for the others before it writes prompts.jsonl and grids
        dist.init_process_group("nccl" if cuda else "gloo")
    pipe = load_pipeline(args, family, device)
    weights = check_weights(args.weights, pipe.transformer) if args.weights else None
    lora = check_lora(args.lora, pipe.transformer) if args.lora else None
    if rank == 0:  # one run per output folder: two would write each other's images
        checkpoint.lock(args.output_dir)

    passes = [("base", None, None), ("srpo", weights, lora)] if args.compare else [("", weights, lora)]
    for sub, w, lora_file in passes:
        out_dir = os.path.join(args.output_dir, sub) if sub else args.output_dir
        if w:  # strict, cast to the pipe's dtype on copy; read straight onto the GPU, not 24 GB of CPU memory a rank
            pipe.transformer.load_state_dict(load_file(w, device=str(device)), strict=True)
        if lora_file:
            pipe.load_lora_weights(lora_file)
        made_by = {"weights": w, "lora": lora_file}  # each file by its content too: one replaced in place makes anew
        made_by.update({f"{k}_sha256": checkpoint.sha256(f) for k, f in list(made_by.items()) if f})
        if args.quantize_base:
            made_by["quantize_base"] = args.quantize_base
        records = [dict(file=f"{i:05d}.png", prompt=p, seed=args.seed + i, **{k: getattr(args, k) for k in PIPE_ARGS},
                        model=args.model, **made_by) for i, p in enumerate(prompts)]
        counts = torch.tensor(render(pipe, family.sample_args, records, out_dir, rank, world_size), device=device)
        if world_size > 1:
            dist.all_reduce(counts)  # also waits until every rank has written its images
        if rank == 0:
            finish_folder(out_dir, records, *counts.tolist())
    if args.compare and rank == 0:
        pairs = [os.path.join(args.output_dir, sub, f"{i:05d}.png")
                 for i in range(min(COMPARE_ROWS, len(prompts))) for sub in ("base", "srpo")]
        grid(pairs, 2, os.path.join(args.output_dir, "compare.png"))
        print(f"{os.path.join(args.output_dir, 'compare.png')}: base (left) and SRPO (right), same seeds")
    if world_size > 1:
        dist.barrier()  # no rank tears down its connections while another still sends on them (gloo aborts then)
        dist.destroy_process_group()


if __name__ == "__main__":  # every image is complete: each is renamed into place when written
    run_command(main, "the same command continues, skipping the images already made")
