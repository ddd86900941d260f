"""What a user hands to train.py, sample.py and evaluate.py, checked before any model loads: prompt files, captioned
images. A problem ends the run with one line, `error: ...`, naming the flag or file and what was expected, and exit
code 2 (`fail`), never a traceback."""
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def fail(message):
    """One line naming the problem, exit code 2, no traceback (printed once, by rank 0)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(2)


def read_prompts(path, flag="--prompts"):
    """A prompt list: a .json list of strings (HPDv2's format), else one prompt per non-blank line, UTF-8."""
    what = "a .txt file with one prompt per line, or a .json list of strings"
    if not os.path.isfile(path):
        fail(f"{flag} {path}: not found (expected {what})")
    raw = open(path, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        fail(f"{flag} {path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}; expected {what} in UTF-8)")
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
