"""Checkpoints that prove themselves, one run per output folder, and weights files checked before sample.py uses them.

    checkpoint-N/
        diffusion_pytorch_model.safetensors, config.json   the published weights (what FluxPipeline loads)
        args.json                                          the flags that trained it (train.py's)
        state/                                             sharded fp32 model and AdamW states, for --resume
        manifest.json                                      every file above with its size and sha256, written last

A checkpoint is written as checkpoint-N.tmp and renamed when complete, so a crash never leaves a folder named
checkpoint-N; its manifest then says what complete means, and `verify` re-reads every file against it before
--resume trusts the folder (bytes flipped or cut by a disk, a copy or a hand). Every function here is called
on every rank: the work is split between ranks and the verdict is the same everywhere.
"""
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from inputs import disk_words, fail

MANIFEST = "manifest.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # what train.py and the release publish
LORA_NAME = "pytorch_lora_weights.safetensors"         # what train.py --lora-rank publishes (diffusers' LoRA format)
# state/ holds what trains: every weight, or a LoRA's adapters (its frozen base is the --model's, read again)
TRAINED = StateDictOptions(ignore_frozen_params=True, strict=False)


def trained_state(transformer):
    """The trained weights, by name. A 4-bit base (flux.quantize_nf4) is frozen, but bitsandbytes adds its
    quantization state (NAME.weight.absmax, ...) to every state dict: dropped, it is rebuilt from --model."""
    return {k: v for k, v in get_model_state_dict(transformer, options=TRAINED).items() if ".weight." not in k}


HELD = {}  # output_dir's real path -> this process's lock file


def lock(output_dir):
    """Hold output_dir/.lock for the life of this process (rank 0 calls it), or end the run naming its holder.
    The kernel releases the lock when its process dies, however it dies, so a killed run never blocks its
    resume; the file keeps who held it last, for the message. A process runs one train.main at a time, so a lock
    it still holds from an earlier one (ended by an error) is let go first."""
    key = os.path.realpath(output_dir)  # one folder, however it is spelled
    if key in HELD:
        HELD.pop(key).close()
    try:
        os.makedirs(output_dir, exist_ok=True)
        f = open(os.path.join(output_dir, ".lock"), "a+")
    except OSError as e:  # a file of that name, no permission, a read-only disk
        fail(f"--output-dir {output_dir}: cannot write in it ({e.strerror or e})")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        fail(f"--output-dir {output_dir}: in use by another run ({f.read().strip() or 'another process'}); wait for "
             f"it, or pick another dir")
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    os.fsync(f.fileno())  # other nodes read it (unshared), through a network filesystem's cache
    HELD[key] = f


def unshared(output_dir, world):
    """None if every rank sees the folder rank 0 locked, else the first rank that does not, and its host. Several
    nodes need a filesystem they share: each rank writes its shards of a checkpoint there, rank 0 its manifest."""
    try:
        with open(os.path.join(output_dir, ".lock")) as f:
            seen = f.read()  # who holds it, and since when: rank 0's words, unless this is another folder
    except OSError:
        seen = None
    views = [None] * world
    dist.all_gather_object(views, (seen, socket.gethostname()))
    return next((f"rank {r} on {host}" for r, (text, host) in enumerate(views) if text != views[0][0]), None)


def complete_steps(output_dir):
    """Steps of the folders named checkpoint-N (renamed, so complete when written), newest first."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted((int(m[1]) for n in names if (m := re.fullmatch(r"checkpoint-(\d+)", n))), reverse=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def files_of(folder):
    """Every file under folder, as paths relative to it, sorted."""
    return sorted(os.path.relpath(os.path.join(parent, name), folder)
                  for parent, _, names in os.walk(folder) for name in names)


def gather(items, rank, world):
    """The union over ranks of each rank's dict."""
    parts = [None] * world
    dist.all_gather_object(parts, items)
    return {k: v for part in parts for k, v in part.items()}


def one_line(e):
    """An exception as one line: DCP's CheckpointException carries each rank's traceback; its last line is the cause.
    A full disk says so (inputs.disk_words)."""
    lines = str(e).strip().splitlines()
    return disk_words(lines[-1] if lines else type(e).__name__)


def agree(error, world):
    """The first rank's error, or None, the same on every rank (so all take the same branch); also a barrier."""
    errors = [None] * world
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


# What a failed write raises: OSError (a full disk; a size limit, with SIGXFSZ ignored), and the same wrapped by DCP
# (CheckpointException) or by safetensors (SafetensorError).
WRITE_ERRORS = (OSError, CheckpointException, SafetensorError)


def save(transformer, optimizer, step, output_dir, publish, rank, world):
    """checkpoint-{step}/ as the module docstring shows. publish(folder) writes the published weights on rank 0.
    Returns (path, None), or (None, the error) after a failed write (a full disk, a size limit) on any rank, with
    the partial folder removed and every earlier checkpoint untouched."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # a folder a killed save left
            os.makedirs(tmp)
        except WRITE_ERRORS as e:
            error = one_line(e)
    error = agree(error, world)
    if not error:
        try:
            dcp.save({"model": trained_state(transformer),
                      "optimizer": get_optimizer_state_dict(transformer, optimizer)},
                     checkpoint_id=os.path.join(tmp, "state"))
            publish(tmp)  # collective (it gathers the full weights); rank 0 writes
            if rank == 0:
                readable(tmp)
        except WRITE_ERRORS as e:
            error = one_line(e)
        error = agree(error, world)
    if not error:  # the manifest: each rank hashes a share of the files, rank 0 writes it last, then renames
        try:
            files = files_of(tmp)
            mine = {f: [os.path.getsize(os.path.join(tmp, f)), sha256(os.path.join(tmp, f))]
                    for f in files[rank::world]}
        except OSError as e:
            mine, error = {}, one_line(e)
        manifest = gather(mine, rank, world)
        error = agree(error, world)
    if not error:
        if rank == 0:
            try:
                with open(os.path.join(tmp, MANIFEST), "w") as f:
                    json.dump({"step": step, "files": manifest}, f, indent=1)
                os.replace(tmp, final)
            except OSError as e:
                error = one_line(e)
        error = agree(error, world)
    if error and rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return (None, error) if error else (final, None)


def readable(folder):
    """Every file under folder readable as the umask allows, as a file written with open() is: safetensors writes
    its files owner-only (0600), and a published checkpoint is for others to load."""
    mask = os.umask(0)
    os.umask(mask)
    for name in files_of(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def verify(path, rank, world):
    """None if every file of the checkpoint folder matches its manifest, else what is wrong, in a few words. The
    manifest's step must be the folder's N: a checkpoint copied or renamed by hand would resume at the wrong step."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            saved = json.load(f)
        step = int(saved["step"])
        manifest = {name: (int(size), str(digest)) for name, (size, digest) in saved["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"no readable {MANIFEST}"
    if os.path.basename(os.path.normpath(path)) != f"checkpoint-{step}":
        return f"its {MANIFEST} is checkpoint-{step}'s: a copy, or renamed"
    problems = {}
    names = sorted(manifest)
    for name in names[rank::world]:
        size, digest = manifest[name]
        full = os.path.join(path, name)
        try:
            if not os.path.isfile(full):
                problems[name] = f"{name} is missing"
            elif os.path.getsize(full) != size:
                problems[name] = f"{name} has {os.path.getsize(full)} bytes, {size} were written"
            elif sha256(full) != digest:
                problems[name] = f"{name} differs from what was written (sha256)"
        except OSError as e:  # no permission, an I/O error
            problems[name] = f"{name} cannot be read ({e.strerror or e})"
    if rank == 0:
        extra = [f for f in files_of(path) if f != MANIFEST and f not in manifest]
        if extra:
            problems[extra[0]] = f"{extra[0]} was not written with it"
    problems = gather(problems, rank, world)
    return problems[min(problems)] if problems else None


def newest_intact(output_dir, rank, world):
    """(step, None) of the newest checkpoint, 0 if there is none, once it verifies; (None, message) when it is
    broken: --resume never trains from it, and the message names it and the newest intact one."""
    steps = complete_steps(output_dir)
    if not steps:
        return 0, None
    newest = os.path.join(output_dir, f"checkpoint-{steps[0]}")
    broken = verify(newest, rank, world)
    if broken is None:
        return steps[0], None
    intact = next((s for s in steps[1:] if verify(os.path.join(output_dir, f"checkpoint-{s}"), rank, world) is None),
                  None)
    fallback = f"the newest intact one is checkpoint-{intact}" if intact else "no earlier checkpoint is intact"
    return None, (f"--resume: {newest} is broken ({broken}); {fallback}. Move it aside (e.g. to "
                  f"{output_dir}/broken-checkpoint-{steps[0]}) and resume again")


def load(transformer, optimizer, path):
    """Model and AdamW states from a verified checkpoint, each rank reading its shards. A checkpoint of another
    model or LoRA rank (a tensor missing or of another shape) is one line."""
    state = {"model": trained_state(transformer),
             "optimizer": get_optimizer_state_dict(transformer, optimizer)}
    try:
        dcp.load(state, checkpoint_id=os.path.join(path, "state"))
        set_model_state_dict(transformer, state["model"], options=TRAINED)
        set_optimizer_state_dict(transformer, optimizer, state["optimizer"])
    except (CheckpointException, RuntimeError, ValueError, KeyError) as e:
        fail(f"--resume: {path} does not fit this --model and --lora-rank ({one_line(e)})")


# ----------------------------------------------------------------- weights files given by hand (sample.py)

def read_header(flag, path, name):
    """(the file, {key: shape}) of a safetensors file, checked before any image is made; a folder stands for its
    file `name`, as train.py writes it. Integer tensors would be cast to weights silently, non-finite ones render
    black images: refused."""
    folder, path = (path, os.path.join(path, name)) if os.path.isdir(path) else (None, path)
    if folder and not os.path.isfile(path):  # the folder a user meant is named
        other = {WEIGHTS_NAME: ("--lora", LORA_NAME), LORA_NAME: ("--weights", WEIGHTS_NAME)}[name]
        steps = complete_steps(folder)
        if steps:
            fail(f"{flag} {folder}: a run's folder; expected one of its checkpoints, {flag} "
                 f"{os.path.join(folder, f'checkpoint-{steps[0]}')} (its newest)")
        if os.path.isfile(os.path.join(folder, other[1])):
            fail(f"{flag} {folder}: it holds {other[1]}; expected {other[0]} {folder}")
    if not os.path.isfile(path):
        fail(f"{flag} {path}: not found (expected {name} or a folder holding it)")
    try:
        with safe_open(path, "pt") as f:
            header = {key: f.get_slice(key) for key in f.keys()}
            for key, part in header.items():
                if not part.get_dtype().startswith(("F", "BF")):  # F64 ... F8_E4M3, BF16; not I8, U8, BOOL
                    fail(f"{flag} {path}: {key} is {part.get_dtype()} (expected floating-point weights)")
            for key in header:  # one tensor at a time; NaN or inf weights would render black images
                if not torch.isfinite(f.get_tensor(key)).all():
                    fail(f"{flag} {path}: {key} has non-finite values (a run that diverged?); expected finite weights")
            return path, {key: tuple(part.get_shape()) for key, part in header.items()}
    except (SafetensorError, OSError) as e:
        fail(f"{flag} {path}: not a safetensors file ({e})")


def check_weights(path, transformer):
    """The --weights file: exactly the keys and shapes of this --model's transformer."""
    path, shapes = read_header("--weights", path, WEIGHTS_NAME)
    expected = {key: tuple(t.shape) for key, t in transformer.state_dict().items()}
    for key in sorted(expected.keys() | shapes.keys()):
        if shapes.get(key) != expected.get(key):
            what = f"is {shapes.get(key, 'missing')}, expected {expected[key]} for" if key in expected else \
                "is not a key of"
            fail(f"--weights {path}: {key} {what} this --model's transformer")
    return path


def check_lora(path, transformer):
    """The --lora file: diffusers' LoRA keys, transformer.<layer>.lora_A / lora_B.weight, each on a linear
    layer of this --model's transformer whose sizes it fits (A: rank x in, B: out x rank)."""
    path, shapes = read_header("--lora", path, LORA_NAME)
    layers = dict(transformer.named_modules())
    what = "expected a LoRA of this --model, keys transformer.<layer>.lora_A.weight / lora_B.weight"
    if not shapes:
        fail(f"--lora {path}: no tensors in it ({what})")
    for key, shape in shapes.items():
        name, a = key.removeprefix("transformer.").rsplit(".lora_", 1)[0], ".lora_A." in key
        layer = layers.get(name)
        if not key.startswith("transformer.") or not isinstance(layer, torch.nn.Linear):
            fail(f"--lora {path}: {key} is no LoRA weight of a linear layer of the transformer ({what})")
        if shape[1 if a else 0] != (layer.in_features if a else layer.out_features):
            fail(f"--lora {path}: {key} is {shape}, which does not fit {name} ({what})")
    return path
