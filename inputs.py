"""What a user hands to train.py, sample.py and evaluate.py, checked before any model loads: prompt files, captioned
images. A problem ends the run with one line, `error: ...`, naming the flag or file and what was expected, and exit
code 2 (`fail`), never a traceback."""
import argparse
import contextlib
import ctypes
import json
import math
import os
import re
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps
from tqdm import tqdm

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def fail(message, this_rank_only=False):
    """One line naming the problem, exit code 2, no traceback: printed once, by rank 0, for what every rank finds;
    by the rank itself, named, for what only it met (a disk error, say). The other ranks then wait: torchrun stops
    every rank once one has ended, and would stop rank 0 before it prints if another ended first."""
    rank = int(os.environ.get("RANK", 0))
    if this_rank_only and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        print(f"error: rank {rank}: {message}", file=sys.stderr, flush=True)
    elif rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank and not this_rank_only and "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun
        time.sleep(60)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose own errors (a misspelled flag, a value not among the choices) are fail's one line,
    not a usage block and a second format."""

    def __init__(self, doc):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        fail(f"{message} (--help lists the flags)")


def run_command(main, after_stop):
    """Run main() as the process's command and end the process with its exit code: 0, or fail's 2. An OSError
    the disk causes (full, read-only, a size limit) is one line from the rank that met it. The process then ends
    with os._exit, skipping the interpreter's teardown: there, a rank's gloo threads can be destroyed while still
    joinable and abort the process ("terminate called without an active exception") after its work was done.
    Ctrl-C (SIGINT, which torchrun passes on to every rank), SIGTERM (a scheduler's preemption; torchrun's, once
    another rank has ended), SIGHUP (a closed terminal) and the launcher's death (the kernel's SIGUSR2 to a rank of
    torchrun) end the process at once, also by os._exit, as a kill would, so no rank waits in a collective for one
    already gone: one line from rank 0 saying which, then after_stop; exit code 128 + the signal. A rank whose peer
    has ended mid-collective says so in one line."""
    rank = int(os.environ.get("RANK", 0))
    stops = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGUSR2: "the launcher (torchrun) is gone",
             signal.SIGTERM: "stopped by SIGTERM (a scheduler, a kill, or torchrun as a rank ended)",
             signal.SIGHUP: "stopped by SIGHUP (the terminal closed; torchrun passes it on)"}

    def stop(signum, frame):
        if rank == 0:
            with contextlib.suppress(RuntimeError, OSError):  # the main thread may be inside a write to stdout
                sys.stdout.flush()
            os.write(2, f"\nerror: {stops[signum]}; {after_stop}\n".encode())  # below a progress bar
        os._exit(128 + signum)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # unless it was ignored when the process began
        signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:  # under nohup it stays ignored
        signal.signal(signal.SIGHUP, stop)
    if "TORCHELASTIC_RUN_ID" in os.environ and sys.platform == "linux":  # a rank ends with its launcher: the kernel
        signal.signal(signal.SIGUSR2, stop)                              # sends it SIGUSR2 once torchrun is gone
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGUSR2)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # gone already, before this rank got here
            stop(signal.SIGUSR2, None)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit then fails a write (an OSError), not the process
    try:
        try:
            main()
            code = 0
        except OSError as e:
            fail(disk_words(f"{e.filename or 'a file'}: {e.strerror or e}"), this_rank_only=True)
        except RuntimeError as e:  # gloo's or NCCL's, in a collective whose peer has ended
            if not (dist.is_initialized() and ("gloo" in str(e) or "NCCL" in str(e))):
                raise
            lost = re.sub(r"^\[[^\]]*\] ", "", str(e).splitlines()[0]).split(". This is")[0]
            os.write(2, f"\nerror: rank {rank}: lost another rank ({lost}); {after_stop}\n".encode())  # below a bar
            code = 1  # no teardown of a process group whose peer is gone: it can wait for it
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)  # sys.exit(): 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# What the system's words for a failed write mean for a user, as (its words, ours): an OSError's strerror, also
# inside DCP's and safetensors' messages (", os error 28").
DISK_WORDS = (("No space left on device", "the disk is full: free space on it, or write to another disk"),
              ("Disk quota exceeded", "your disk quota is used up: free space in it, or write to another disk"),
              ("File too large", "a file-size limit (ulimit -f) stopped the write"),
              ("Read-only file system", "the disk is read-only: write to another disk"))


def disk_words(message):
    """message, with what it means added where it is a full disk, a quota, a size limit or a read-only disk."""
    return next((f"{message}: {ours}" for theirs, ours in DISK_WORDS if theirs in message), message)


# Checks train.py and sample.py share, as (test, what is expected): check_ranges takes (flag, *SIZE) and the like.
SIZE = (lambda v: 16 <= v <= 4096 and v % 16 == 0,
        "a multiple of 16 from 16 to 4096 (FLUX packs 2x2 patches of the 8x downsampled latent; 4096 px is already "
        "65,536 image tokens)")
TOKENS = (lambda v: 1 <= v <= 1024, "1 to 1024 text tokens (QwenImagePipeline's limit; FluxPipeline's is 512)")
SEED = (lambda v: 0 <= v < 2**63, "0 to 2**63 - 1")


def check_ranges(args, ranges):
    """Each (flag, test, what is expected) of ranges holds for args' value, every value of a list: else one line.
    A float must also be finite (nan fails every test, inf would pass some)."""
    for name, valid, expected in ranges:
        values = getattr(args, name)
        values = values if isinstance(values, (list, tuple)) else [values]
        if not all(valid(v) and (not isinstance(v, float) or math.isfinite(v)) for v in values):
            fail(f"--{name.replace('_', '-')} {' '.join(map(str, values))}: expected {expected}")


def check_clip_h(clip_h, reward_paths):
    """--clip-h: a folder with a config.json when given, and given where a --reward-path ({kind: path}) is an
    HPSv2.1 checkpoint file, which holds weights only (its config and tokenizer are CLIP-H's)."""
    expected = "the laion/CLIP-ViT-H-14-laion2B-s32B-b79K folder: HPSv2.1's config and tokenizer"
    if clip_h is not None and not os.path.isfile(os.path.join(clip_h, "config.json")):
        fail(f"--clip-h {clip_h}: no config.json in it (expected {expected})")
    hps_file = reward_paths.get("hps")
    if clip_h is None and hps_file and os.path.isfile(hps_file):
        fail(f"--reward-path {hps_file}: an HPSv2.1 checkpoint needs --clip-h ({expected})")


def check_text_tokens(n, family):
    """--max-sequence-length n within the limit of the model family's pipeline (its module: flux or qwen)."""
    if n > family.MAX_TOKENS:
        fail(f"--max-sequence-length {n}: expected 1 to {family.MAX_TOKENS}, {family.PIPELINE.__name__}'s limit")


FAMILIES = {"Flux": "flux", "QwenImage": "qwen"}  # a pipeline class's prefix -> the module with its plumbing


def check_model_folder(model, flag="--model"):
    """A diffusers pipeline folder whose model_index.json names a FLUX or a Qwen-Image pipeline: the module's name
    (flux, qwen)."""
    index = os.path.join(model, "model_index.json")
    if not os.path.isfile(index):
        fail(f"{flag} {model}: not a diffusers pipeline folder (no model_index.json)")
    try:
        pipeline = json.load(open(index, "rb")).get("_class_name")
    except (ValueError, AttributeError):  # not JSON, or not an object
        pipeline = None
    family = next((name for prefix, name in FAMILIES.items() if str(pipeline).startswith(prefix)), None)
    if family is None:
        fail(f"{flag} {model}: model_index.json names neither a FLUX nor a Qwen-Image pipeline (expected _class_name "
             f"FluxPipeline or QwenImagePipeline)")
    return family

def read_text(path, flag, what):
    """The text of a file, UTF-8 (a leading byte-order mark dropped) or UTF-16 with its byte-order mark, or one line
    naming the flag (if any), the file, its line and the problem."""
    where = f"{flag} {path}" if flag else path
    try:
        raw = open(path, "rb").read()
    except FileNotFoundError:
        fail(f"{where}: not found (expected {what})")
    except OSError as e:  # a folder, no permission, an I/O error
        fail(f"{where}: cannot read it ({e.strerror or e}; expected {what})")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with its byte-order mark (Windows' "Unicode")
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            fail(f"{where}: not UTF-16 text after its byte-order mark (expected {what})")
    if b"\0" in raw:  # UTF-16 without a byte-order mark decodes as UTF-8, one NUL a letter
        line = raw[:raw.index(b"\0")].count(b"\n") + 1
        fail(f"{where}:{line}: a NUL byte (UTF-16 without its byte-order mark, or not text; expected {what} in "
             f"UTF-8, or UTF-16 with its mark)")
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")  # editors on Windows start UTF-8 files with a BOM
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        fail(f"{where}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}; expected {what} in UTF-8)")


def read_prompts(path, flag="--prompts"):
    """A prompt list: a .json list of strings (HPDv2's format), else one prompt per non-blank line, UTF-8."""
    what = "a .txt file with one prompt per line, or a .json list of strings"
    if path.lower().endswith(".jsonl"):  # sample.py's prompts.jsonl, say: its lines would be trained as captions
        fail(f"{flag} {path}: a .jsonl file (expected {what})")
    text = read_text(path, flag, what)
    if path.lower().endswith(".json"):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as e:
            fail(f"{flag} {path}:{e.lineno}: not valid JSON ({e.msg}; expected {what})")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            fail(f"{flag} {path}: expected a JSON list of strings")
        prompts = [p.strip() for p in prompts if p.strip()]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        fail(f"{flag} {path}: no prompts in it (expected {what})")
    return prompts


def load_image(path, resolution):
    """An image as uint8 pixels (resolution, resolution, 3): turned upright by its EXIF orientation, converted to
    8-bit RGB by its real bit depth (16-bit and float images scaled, not clipped; transparency over white), the
    shorter side resized to `resolution` (bicubic), center-cropped."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit or float gray: PIL would clip at 255
            a = np.asarray(img, dtype=np.float64)
            if img.mode == "F":
                peak = 1.0 if a.max() <= 1 else 255.0
            else:
                peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
            img = Image.fromarray(np.clip(np.round(a * 255 / peak), 0, 255).astype(np.uint8), "L")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        img = img.convert("RGB")
        scale = resolution / min(img.size)
        img = img.resize((max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))),
                         Image.BICUBIC)
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.array(img))


def read_captioned_images(folder, resolution, flag="--image-dir"):
    """(captions, paths) of every image in folder, each with a UTF-8 caption in a .txt file beside it. Every image
    is opened and converted now, so a broken one stops the run at its start, with its path, not at its step."""
    if not os.path.isdir(folder):
        fail(f"{flag} {folder}: folder not found")
    names = sorted(os.listdir(folder))
    paths = [os.path.join(folder, f) for f in names if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not paths:
        fail(f"{flag} {folder}: no {'/'.join(IMAGE_EXTENSIONS)} images")
    other = [f for f in names if not f.lower().endswith((*IMAGE_EXTENSIONS, ".txt"))]
    if other and int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(f"{flag} {folder}: not images, skipped: {', '.join(other[:5])}{', ...' if len(other) > 5 else ''}")
    captions = []
    for path in tqdm(paths, desc="checking images", leave=False, disable=len(paths) < 100):
        txt = os.path.splitext(path)[0] + ".txt"
        if not os.path.exists(txt):
            fail(f"{flag}: {path} has no caption file {txt}")
        caption = read_text(txt, flag + ":", "the image's caption").strip()
        if not caption:
            fail(f"{flag}: {txt} is empty (expected the image's caption)")
        try:
            load_image(path, resolution)
        except Exception as e:  # a damaged file: PIL's decoders raise OSError, SyntaxError, EOFError, struct.error...
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            fail(f"{flag}: {path}: cannot read it as an image ({reason})")
        captions.append(caption)
    return captions, paths
