"""A fault probe: hostile input and a hostile environment, as a new user or a machine would produce them, against
train.py, sample.py and evaluate.py run as a user runs them (python ..., torchrun ...), on the tiny random models.

    python -m experiments.probe --repo CLONE --out DIR [--only SUBSTRING] [--jobs 2] [--keep]

Each case is a category, a name, a command (with its setup: files written, folders prepared, a signal sent at a
chosen moment, a resource limit, another run holding the folder) and the class a careful user would want. The
outcome of its run is classified as:
    one line   exit 2 (128 + the signal for a signal case; torchrun's 1 when a rank failed; the launcher's own
               death by a signal), exactly one stderr line starting with "error: ", no traceback from our files
               (torchrun's own report after it is allowed);
    recovered  exit 0 and the case's own check of the result holds (a resume continues at the right step, ...);
    silent     exit 0, but the check fails: the result is wrong, or something the user needs was not said;
    traceback  a Python traceback from the project's files (or any, outside torchrun's own report);
    other      anything else, described (a timeout, no or several error lines, processes left running, ...).
Every case runs in a folder of its own with cwd at --repo, PYTHONPATH=--repo, OMP_NUM_THREADS=1 and one fresh
SRPO_TINY_DIR shared by all cases (the first case builds the tiny models), two at a time. The probe writes
OUT/probe.json (every case), OUT/probe.md (counts per category and class, then every case not in its expected
class) and OUT/logs/ (each case's command, exit code and whole output). Nothing of the project is imported: the
probe only starts its scripts and reads what they wrote.
"""
import argparse
import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TIMEOUT = 300  # seconds a case's command may run
FAST = "--rollout-steps 2 --resolution 32 --max-sequence-length 32 --sample-every 0"  # train.py, quick
SARGS = "--height 32 --width 48 --num-inference-steps 2 --max-sequence-length 32"      # sample.py, quick
TR = "torchrun --standalone --nproc_per_node=2"
T1 = "python train.py {FAST} --steps 1 --output-dir {d}/out"
RUN2 = "{FAST} --steps 2 --checkpoint-every 1 --lr 1e-3 --output-dir {d}/out"  # checkpoint-1 and checkpoint-2
PROMPTS = "a red car on a street\na cat sitting on a chair\na green tree near a lake\n"
WEIGHTS = "diffusion_pytorch_model.safetensors"
LORA = "pytorch_lora_weights.safetensors"
CLASSES = ("one line", "recovered", "silent", "traceback", "other")
CATEGORIES = ("launcher and signals", "inputs", "caches and checkpoints", "sample.py", "evaluate.py", "friction")

# train.py as `python train.py ARGS` runs it, every rank writing its pid to pids/RANK beside this file, one rank
# paused at a chosen moment until the probe signals it: PAUSE=step:N:RANK before the optimizer step of step N,
# PAUSE=save:N:RANK inside the save of checkpoint-N once this rank's shard is written (no manifest yet). The
# paused rank writes its pid to the file `paused`.
PAUSING_TRAIN = '''
import os, runpy, time
here = os.path.dirname(os.path.abspath(__file__))
rank = int(os.environ.get("RANK", 0))
os.makedirs(os.path.join(here, "pids"), exist_ok=True)
with open(os.path.join(here, "pids", str(rank)), "w") as f:
    f.write(str(os.getpid()))
where, step, who = os.environ.get("PAUSE", "none:0:0").split(":")

def pause():
    with open(os.path.join(here, "paused.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(here, "paused.tmp"), os.path.join(here, "paused"))
    while True:
        time.sleep(0.2)

if rank == int(who) and where == "step":
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    def before_step(optimizer, args, kwargs):
        done = next(iter(optimizer.state.values()), {}).get("step", 0)  # steps taken, resumed ones included
        if int(done) + 1 == int(step):
            pause()
    register_optimizer_step_pre_hook(before_step)
if rank == int(who) and where == "save":
    import torch.distributed.checkpoint as dcp
    real_save = dcp.save
    def save(state_dict, *, checkpoint_id, **kwargs):
        real_save(state_dict, checkpoint_id=checkpoint_id, **kwargs)
        if f"checkpoint-{step}.tmp" in str(checkpoint_id):
            pause()
    dcp.save = save
runpy.run_module("train", run_name="__main__")
'''

# Hides torchvision as a machine with requirements.txt only has it (test_faults.py's way).
NO_TORCHVISION = ("import importlib.util\nfind = importlib.util.find_spec\nimportlib.util.find_spec = "
                  "lambda name, *a, **k: None if name.split('.')[0] == 'torchvision' else find(name, *a, **k)\n")


# ----------------------------------------------------------------------------------------- helpers for setups

def write(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def flip(path, count=16):
    """count bytes in the middle of the file inverted, its size unchanged."""
    data = bytearray(Path(path).read_bytes())
    mid = len(data) // 2
    data[mid:mid + count] = bytes(255 - b for b in data[mid:mid + count])
    Path(path).write_bytes(bytes(data))


def cut(path, keep=0.5):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:int(len(data) * keep)])


def png(path, size):
    from PIL import Image
    Image.new("RGB", size).save(path)


def png_size(path):
    from PIL import Image
    with Image.open(path) as im:
        return im.size


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def intact(folder):
    """Every file of a checkpoint folder is in its manifest with its size and sha256 (hashed here anew), and no
    other file is there."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    if files != {*manifest, "manifest.json"}:
        return False
    return all((folder / n).stat().st_size == size and sha256(folder / n) == digest
               for n, (size, digest) in manifest.items())


def steps(out):
    """The steps of metrics.jsonl's lines (-1 for a line that is not JSON)."""
    result = []
    for line in Path(out, "metrics.jsonl").read_text().splitlines():
        try:
            result.append(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            result.append(-1)
    return result


def checkpoints(out):
    return sorted(p.name for p in Path(out).iterdir() if p.name.startswith("checkpoint-")) if Path(out).is_dir() \
        else []


# ----------------------------------------------------------------------------------------- checks of results

def all_of(*checks):
    def check(d, r):
        return next((problem for c in checks if (problem := c(d, r))), None)
    return check


def said(*texts):
    """The run's output says each of texts."""
    def check(d, r):
        missing = [t.format(d=d) for t in texts if t.format(d=d) not in r.text]
        return f"not said: {missing[0]!r}" if missing else None
    return check


def not_said(*texts):
    def check(d, r):
        found = [t for t in texts if t in r.text]
        if not found:
            return None
        line = next(x for x in r.text.splitlines() if found[0] in x)
        return f"said {found[0]!r}: {line.strip()[:200]}"
    return check


def trained(n, out="out"):
    """A run that ended at step n: done, metrics of steps 1..n, checkpoint-n intact."""
    def check(d, r):
        o = d / out
        if "done: weights" not in r.text:
            return "no 'done: weights' line"
        if steps(o) != list(range(1, n + 1)):
            return f"metrics.jsonl steps {steps(o)}, expected 1..{n}"
        if not intact(o / f"checkpoint-{n}"):
            return f"checkpoint-{n} not intact"
        return None
    return check


def resumed(start, n, out="out"):
    """A --resume that continued from checkpoint-start to n, every checkpoint intact, no .tmp left."""
    def check(d, r):
        o = d / out
        if f"resumed from {o}/checkpoint-{start}" not in r.text:
            return f"no 'resumed from {o}/checkpoint-{start}'"
        names = checkpoints(o)
        if any(name.endswith(".tmp") for name in names) or not all(intact(o / name) for name in names):
            return f"checkpoints {names}: not all intact"
        return trained(n, out)(d, r)
    return check


def caption(expected):
    """The sample grid of step 0 (--sample-every 1) shows the first prompt of the file, exactly."""
    def check(d, r):
        got = (d / "out" / "samples" / "step-000000.txt").read_text().splitlines()[0]
        return None if got == expected else f"trained on {got!r}, expected {expected!r}"
    return check


def unchanged(folder_name):
    """after: the folder (copied from a fixture into the case) still verifies against its manifest."""
    def check(d, r):
        return None if intact(d / folder_name) else f"{folder_name} was changed"
    return check


def no_checkpoint(step, out="out"):
    def check(d, r):
        names = [n for n in checkpoints(d / out) if n.startswith(f"checkpoint-{step}")]
        return f"left {names}" if names else None
    return check


def images(folder, n):
    def check(d, r):
        got = sorted(p.name for p in (d / folder).glob("*.png") if p.name[:5].isdigit())
        if len(got) != n:
            return f"{len(got)} images in {folder}, expected {n}"
        return None if (d / folder / "prompts.jsonl").is_file() else f"no {folder}/prompts.jsonl"
    return check


def jsonl_prompts(folder, expected):
    def check(d, r):
        got = [json.loads(x)["prompt"] for x in (d / folder / "prompts.jsonl").read_text().splitlines()]
        return None if got == expected else f"prompts {got}, expected {expected}"
    return check


def ranks_gone(d, r):
    """Every rank the pausing wrapper started has ended."""
    alive = [p.name for p in (d / "pids").glob("*") if alive_pid(int(p.read_text()))] if (d / "pids").is_dir() else []
    return f"ranks {alive} still running" if alive else None


def alive_pid(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


# ----------------------------------------------------------------------------------------- the cases

CASES = []


def case(cat, name, expect, cmd, **kw):
    """One case: cat and name, the expected class, the command (with {d} its folder, {FAST}, {SARGS}, {TR},
    {flux}, {clip}, and fixtures {run1} {run2} {lora} {compare}), and optionally: setup(d, fx), check(d, r) for an
    exit 0 (None, or what is wrong), after(d, r) for a one-line exit, signal=dict(pause=..., wait=..., sig=...,
    whom=...), holder=dict(cmd=..., wait=...), umask, fsize, env, hide_torchvision, then=[cases after it in its
    folder]."""
    c = dict(cat=cat, name=name, expect=expect, cmd=cmd, **kw)
    CASES.append(c)
    return c


def then(name, expect, cmd, **kw):
    """A case run after the one before it, in its folder (a --resume after a kill)."""
    return dict(name=name, expect=expect, cmd=cmd, **kw)


def copy_fx(name, dest="out", sub=None):
    def setup(d, fx):
        src = Path(fx(name)) / sub if sub else Path(fx(name))
        shutil.copytree(src, d / dest, symlinks=True)
    return setup


def setups(*fns):
    def setup(d, fx):
        for f in fns:
            f(d, fx)
    return setup


def files(**contents):
    """Setup writing files into the case folder: name=text or bytes (a __ in a name is a /)."""
    def setup(d, fx):
        for name, data in contents.items():
            write(d / name.replace("__", "/"), data)
    return setup


def do(fn):
    """Setup from a function of the case folder alone."""
    return lambda d, fx: fn(d)


# ---- launcher and signals --------------------------------------------------------------------------------

L = "launcher and signals"
PAUSED_TR = "{TR} {d}/pausing_train.py " + RUN2
PAUSED_PY = "python {d}/pausing_train.py " + RUN2
RESUME_TR = "{TR} train.py " + RUN2 + " --resume"
RESUME_PY = "python train.py " + RUN2 + " --resume"
KILL, TERM, INT = signal.SIGKILL, signal.SIGTERM, signal.SIGINT


def signal_case(name, launcher, pause, sig, whom, resume=True, after=None, resume_from=1):
    chain = [then(f"--resume after: {name}", "recovered", RESUME_TR if launcher == "torchrun" else RESUME_PY,
                  check=resumed(resume_from, 2))] if resume else []
    return case(L, name, "one line", PAUSED_TR if launcher == "torchrun" else PAUSED_PY,
                signal=dict(pause=pause, sig=sig, whom=whom),
                after=all_of(ranks_gone, after or (lambda d, r: None)), then=chain)


ckpt1_only = lambda d, r: None if checkpoints(d / "out") in (["checkpoint-1"], ["checkpoint-1", "checkpoint-2.tmp"]) \
    else f"checkpoints {checkpoints(d / 'out')}"  # noqa: E731
signal_case("kill -9 of torchrun mid-step", "torchrun", "step:2:0", KILL, "main", after=ckpt1_only)
signal_case("SIGTERM to torchrun mid-step", "torchrun", "step:2:0", TERM, "main", after=ckpt1_only)
signal_case("SIGTERM to rank 1 mid-step", "torchrun", "step:2:1", TERM, "paused", after=ckpt1_only)
signal_case("SIGINT to rank 0 mid-step (rank 1 waiting in a collective)", "torchrun", "step:2:0", INT, "paused",
            resume=False)
signal_case("SIGINT to rank 1 mid-step", "torchrun", "step:2:1", INT, "paused", resume=False)
signal_case("Ctrl-C in the terminal (SIGINT to torchrun's process group) mid-step", "torchrun", "step:2:1", INT,
            "group", after=ckpt1_only)
signal_case("kill -9 of rank 1 mid-step", "torchrun", "step:2:1", KILL, "paused", after=ckpt1_only)
signal_case("kill -9 of rank 0 mid-step", "torchrun", "step:2:0", KILL, "paused", after=ckpt1_only)
signal_case("kill -9 of rank 1 during the save of checkpoint-2", "torchrun", "save:2:1", KILL, "paused",
            after=ckpt1_only)
signal_case("SIGTERM to torchrun during the save of checkpoint-2", "torchrun", "save:2:0", TERM, "main",
            after=ckpt1_only)
signal_case("SIGHUP to torchrun (its terminal closed) mid-step", "torchrun", "step:2:0", signal.SIGHUP, "main",
            resume=False)
signal_case("Ctrl-C of python train.py mid-step", "python", "step:2:0", INT, "group", after=ckpt1_only)
signal_case("SIGTERM to python train.py during the save of checkpoint-2", "python", "save:2:0", TERM, "main",
            after=ckpt1_only)
case(L, "kill -9 of python train.py during the save of checkpoint-2 (nothing can speak: expected other)", "other",
     PAUSED_PY,
     signal=dict(pause="save:2:0", sig=KILL, whom="main"), codes=(-9,),
     then=[then("--resume after a kill -9 during a save (a checkpoint-2.tmp left)", "recovered", RESUME_PY,
                check=resumed(1, 2))])
case(L, "SIGTERM to torchrun while the models load", "one line", "{TR} train.py " + RUN2,
     signal=dict(wait=("text", "tiny random models:"), sig=TERM, whom="main"), after=ranks_gone)
SLOW = "python sample.py --prompts {d}/many.txt --num-inference-steps 50 --output-dir {d}/out"  # ~0.4 s an image
case(L, "Ctrl-C of sample.py mid-render", "one line", SLOW,
     setup=files(**{"many.txt": "".join(f"a cat number {i}\n" for i in range(30))}),
     signal=dict(wait=("file", "{d}/out/00002.png"), sig=INT, whom="group"),
     then=[then("sample.py rerun after Ctrl-C skips what was made", "recovered", SLOW,
                check=all_of(images("out", 30), lambda d, r: None if re.search(
                    r"(\d+) images rendered, ([1-9]\d*) already there", r.text) else "no 'N already there'",
                    lambda d, r: "a .tmp left" if list((d / "out").glob("*.tmp")) else None))])

# ---- inputs ----------------------------------------------------------------------------------------------

N = "inputs"
P = "--prompts {d}/p.txt"
PF = files(**{"p.txt": PROMPTS})
case(N, "blank --prompts \"\" (an unset shell variable)", "one line", T1 + ' --prompts ""')
case(N, "blank --pos-words \"\"", "one line", T1 + ' --pos-words ""')
case(N, "blank among --neg-words: Painting \" \"", "one line", T1 + ' --neg-words Painting " "')
case(N, "NUL bytes in a prompt file (a binary file)", "one line", T1 + " " + P,
     setup=files(**{"p.txt": b"a cat\n\x00\x01\x02\x03binary\n"}))
case(N, "UTF-16 LE with BOM (Notepad's Unicode) trains on its real prompts", "recovered",
     T1 + " " + P + " --sample-every 1",
     setup=files(**{"p.txt": "a caf\u00e9 on a street\nun chat\n".encode("utf-16")}),
     check=caption("a caf\u00e9 on a street"))
case(N, "UTF-16 BE with BOM trains on its real prompts", "recovered", T1 + " " + P + " --sample-every 1",
     setup=files(**{"p.txt": "\ufeffa red car\na dog\n".encode("utf-16-be")}), check=caption("a red car"))
case(N, "UTF-16 without BOM", "one line", T1 + " " + P, setup=files(**{"p.txt": "a cat\na dog\n".encode("utf-16-le")}))
case(N, "latin-1 prompt file", "one line", T1 + " " + P,
     setup=files(**{"p.txt": "a cat\na caf\xe9 on a street\n".encode("latin-1")}))
case(N, "UTF-8 with BOM and CRLF (Windows) trains on its real prompts", "recovered", T1 + " " + P + " --sample-every 1",
     setup=files(**{"p.txt": "\ufeffa red car on a street\r\na cat\r\n".encode()}),
     check=caption("a red car on a street"))
case(N, "emoji and CJK prompts train", "recovered", T1 + " " + P + " --sample-every 1",
     setup=files(**{"p.txt": "a cat \U0001F408 on a chair\n\u4e00\u53ea\u732b\n"}),
     check=caption("a cat \U0001F408 on a chair"))
case(N, ".jsonl given as --prompts (sample.py's prompts.jsonl)", "one line", T1 + " --prompts {d}/prompts.jsonl",
     setup=files(**{"prompts.jsonl": '{"file": "00000.png", "prompt": "a cat"}\n'}))
case(N, "JSON object, not a list", "one line", T1 + " --prompts {d}/p.json",
     setup=files(**{"p.json": '{"prompts": ["a cat", "a dog"]}'}))
case(N, "JSON list of numbers", "one line", T1 + " --prompts {d}/p.json", setup=files(**{"p.json": "[1, 2, 3]"}))
case(N, "JSON cut short", "one line", T1 + " --prompts {d}/p.json", setup=files(**{"p.json": '["a cat", "a d'}))
case(N, "JSON list of blank strings", "one line", T1 + " --prompts {d}/p.json",
     setup=files(**{"p.json": '["", "  ", "\\n"]'}))
case(N, "JSON list with a .JSON (upper-case) name trains its strings", "recovered",
     T1 + " --prompts {d}/P.JSON --sample-every 1", setup=files(**{"P.JSON": '["a red car", " a dog "]'}),
     check=caption("a red car"))
case(N, "empty prompt file", "one line", T1 + " " + P, setup=files(**{"p.txt": ""}))
case(N, "prompt file of blank lines", "one line", T1 + " " + P, setup=files(**{"p.txt": "\n  \n\t\n"}))
case(N, "a folder given as --prompts", "one line", T1 + " --prompts {d}", setup=PF)
case(N, "a 3,000-word prompt (past every tokenizer's length)", "recovered", T1 + " " + P,
     setup=files(**{"p.txt": " ".join(["a red cat on a chair"] * 600) + "\n"}),
     check=all_of(trained(1), said("truncated")))
HUGE = "99999999999999999999999"
for flag in ("--steps", "--resolution", "--seed", "--batch-size", "--rollout-steps", "--lora-rank"):
    case(N, f"huge integer {flag} {HUGE}", "one line", T1 + f" {flag} {HUGE}")
for flag, value in (("--lr", " nan"), ("--guidance", " inf"), ("--threshold", "=-inf"), ("--shift", " nan"),
                    ("--betas", " nan 0.999"), ("--k-denoise", " 0.1 nan"), ("--max-grad-norm", " inf")):
    case(N, f"non-finite {flag}{value}", "one line", T1 + f" {flag}{value}")
for flag, value in (("--resolution", "-32"), ("--batch-size", "-2"), ("--rollout-steps", "-1"), ("--seed", "-1"),
                    ("--max-sequence-length", "0"), ("--checkpoint-every", "-1")):
    case(N, f"negative or zero {flag} {value}", "one line", T1 + f" {flag} {value}")
case(N, "--batch-size 3 on 2 ranks", "one line", "{TR} train.py {FAST} --steps 1 --batch-size 3 --output-dir {d}/out")
case(N, "--window-start after --window-end", "one line", T1 + " --window-start 30 --window-end 10")
case(N, "--reward misspelled (hsp)", "one line", T1 + " --reward hsp")
case(N, "--lora_rank (underscore) instead of --lora-rank", "one line", T1 + " --lora_rank 4")
case(N, "--resume with no checkpoint yet", "recovered", T1 + " --resume",
     check=all_of(said("--resume: no checkpoint in {d}/out yet; starting at step 0"), trained(1)))
case(N, "a checkpoint folder given as --output-dir", "one line",
     "python train.py {FAST} --steps 3 --resume --output-dir {d}/out/checkpoint-2", setup=copy_fx("run1"),
     after=unchanged("out/checkpoint-2"))
case(N, "a checkpoint copied in from another run with other flags", "recovered",
     "python train.py {FAST} --steps 3 --lr 5e-4 --shift 2.5 --resume --output-dir {d}/out",
     setup=copy_fx("run1", "out/checkpoint-2", "checkpoint-2"),
     check=all_of(said("resumed with changed flags:", "--lr 0.001 -> 0.0005", "--shift 3.0 -> 2.5"),
                  lambda d, r: None if steps(d / "out") == [3] and intact(d / "out" / "checkpoint-3") else
                  f"metrics steps {steps(d / 'out')}"))
case(N, "a LoRA checkpoint resumed as a full-weights run", "one line",
     "python train.py {FAST} --steps 2 --resume --output-dir {d}/out", setup=copy_fx("lora"))
case(N, "a full checkpoint resumed with --lora-rank 4", "one line",
     "python train.py {FAST} --steps 3 --lr 1e-3 --lora-rank 4 --resume --output-dir {d}/out", setup=copy_fx("run1"))
case(N, "--resume with --steps below the newest checkpoint", "one line",
     "python train.py {FAST} --steps 1 --resume --output-dir {d}/out", setup=copy_fx("run1"))
case(N, "an output folder with checkpoints, without --resume", "one line",
     "python train.py {FAST} --steps 3 --output-dir {d}/out", setup=copy_fx("run1"),
     after=unchanged("out/checkpoint-2"))
case(N, "--lora-rank larger than the model's layers (64 on the tiny model)", "one line", T1 + " --lora-rank 64")
case(N, "--prompts with --image-dir", "one line", T1 + " " + P + " --image-dir {d}/img",
     setup=setups(PF, do(lambda d: (d / "img").mkdir())))
case(N, "--quantize-base nf4 without --lora-rank", "one line", T1 + " --quantize-base nf4 --strategy ddp")
case(N, "--quantize-base nf4 with --lora-rank under FSDP", "one line", T1 + " --quantize-base nf4 --lora-rank 4")
case(N, "--judge-path without --judge", "one line", T1 + " --judge-path {clip}")
case(N, "--judge clip without --judge-path", "one line", T1 + " --judge clip")
case(N, "--judge with --eval-count not below the prompts", "one line",
     T1 + " " + P + " --judge clip --judge-path {clip} --eval-count 3", setup=PF)
case(N, "--output-dir is a file", "one line", T1.replace("{d}/out", "{d}/afile"), setup=files(afile="x"))
MODEL = "python train.py {FAST} --steps 1 --batch-size 2 --model {d}/flux " + P + " --reward-path {clip} " \
        "--output-dir {d}/out"
case(N, "--model folder missing", "one line", MODEL.replace("{d}/flux", "{d}/nope"), setup=PF)
case(N, "--model is not FLUX (the tiny CLIP folder)", "one line", MODEL.replace("{d}/flux", "{clip}"), setup=PF)
case(N, "--model is a Stable Diffusion folder (model_index.json names another pipeline)", "one line", MODEL,
     setup=setups(PF, files(**{"flux__model_index.json": '{"_class_name": "StableDiffusionPipeline"}'})))
case(N, "--model with its transformer weights cut short (a download stopped)", "one line", MODEL,
     setup=setups(PF, lambda d, fx: shutil.copytree(fx("tiny")[0], d / "flux"),
                  do(lambda d: cut(d / "flux" / "transformer" / WEIGHTS, 0.3))))
case(N, "--model without its vae/", "one line", MODEL,
     setup=setups(PF, lambda d, fx: shutil.copytree(fx("tiny")[0], d / "flux"),
                  do(lambda d: shutil.rmtree(d / "flux" / "vae"))))
case(N, "--model without its transformer weights file", "one line", MODEL,
     setup=setups(PF, lambda d, fx: shutil.copytree(fx("tiny")[0], d / "flux"),
                  do(lambda d: os.remove(d / "flux" / "transformer" / WEIGHTS))))
case(N, "--model without --prompts", "one line", "python train.py {FAST} --steps 1 --model {flux} --reward-path {clip} "
     "--output-dir {d}/out")
case(N, "--model without --reward-path", "one line", "python train.py {FAST} --steps 1 --model {flux} " + P +
     " --output-dir {d}/out", setup=PF)
case(N, "--reward-path missing", "one line", T1 + " --reward clip --reward-path {d}/nope")
case(N, "--reward hps with a cut HPS .pt", "one line", T1 + " --reward-path {d}/hps.pt --clip-h {clip}",
     setup=files(**{"hps.pt": b"PK\x03\x04" + b"\x00" * 200}))
case(N, "--clip-h missing", "one line", T1 + " --clip-h {d}/nope")
IMG = "python train.py {FAST} --steps 1 --image-dir {d}/img --output-dir {d}/out"


def image_dir(*names, broken=None, caption_missing=None):
    def setup(d, fx):
        from PIL import Image
        (d / "img").mkdir()
        for name in names:
            Image.new("RGB", (40, 48), (200, 30, 30)).save(d / "img" / name)
            if name != caption_missing:
                write(d / "img" / (Path(name).stem + ".txt"), f"photo of {Path(name).stem}\n")
        if broken:
            cut(d / "img" / broken, 0.4)
    return setup


case(N, "--image-dir with an image without its caption", "one line", IMG,
     setup=image_dir("a.png", "b.png", caption_missing="b.png"))
case(N, "--image-dir with a truncated image", "one line", IMG, setup=image_dir("a.png", "b.png", broken="b.png"))
case(N, "--image-dir empty", "one line", IMG, setup=image_dir())
case(N, "--image-dir is a file", "one line", IMG.replace("{d}/img", "{d}/p.txt"), setup=PF)
case(N, "--image-dir with a .bmp, a .tif and a .gif beside the .png: what is skipped is named", "recovered", IMG,
     setup=image_dir("a.png", "b.bmp", "c.tif", "d.gif"), check=all_of(trained(1), said("d.gif")))


def odd_images(d, fx):
    """RGBA, 16-bit gray, palette with transparency, EXIF-rotated JPEG: each with a caption."""
    import numpy as np
    from PIL import Image
    (d / "img").mkdir()
    Image.new("RGBA", (40, 40), (0, 0, 255, 128)).save(d / "img" / "rgba.png")
    Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)).save(d / "img" / "gray16.png")
    Image.new("P", (40, 40), 3).save(d / "img" / "pal.png", transparency=3)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (48, 40), "green").save(d / "img" / "rot.jpg", exif=exif.tobytes())
    for name in ("rgba", "gray16", "pal", "rot"):
        write(d / "img" / f"{name}.txt", f"photo {name}\n")


case(N, "--image-dir with RGBA, 16-bit, palette and EXIF-rotated images trains", "recovered", IMG, setup=odd_images,
     check=trained(1))

# ---- caches and checkpoints ------------------------------------------------------------------------------

C = "caches and checkpoints"
RESUME3 = "python train.py {FAST} --steps 3 --lr 1e-3 --resume --output-dir {d}/out"


def text_cache(fn):
    def setup(d, fx):
        entries = sorted((d / "out" / "text_cache").glob("*.safetensors"))
        fn(entries[0])
    return setup


def flip_data(path):
    """Bytes of the tensors' data flipped, the safetensors header (its keys, shapes, offsets) intact."""
    data = bytearray(Path(path).read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    for i in range(start + 64, start + 128):
        data[i] ^= 0x40
    Path(path).write_bytes(bytes(data))


case(C, "a text_cache entry cut short, then --resume: recomputed with a note", "recovered", RESUME3,
     setup=setups(copy_fx("run1"), text_cache(lambda p: cut(p, 0.05))),
     check=all_of(said("text_cache: 1 damaged text embeddings computed again"), resumed(2, 3)))
case(C, "a text_cache entry emptied (0 bytes), then --resume", "recovered", RESUME3,
     setup=setups(copy_fx("run1"), text_cache(lambda p: p.write_bytes(b""))),
     check=all_of(said("damaged text embeddings computed again"), resumed(2, 3)))
case(C, "every text_cache entry's tensor bytes flipped (headers intact), then --resume into steps that use them",
     "recovered", "python train.py {FAST} --steps 4 --lr 1e-3 --resume --output-dir {d}/out",  # 4 uses 2's prompts
     setup=setups(copy_fx("run1"),
                  do(lambda d: [flip_data(p) for p in (d / "out" / "text_cache").glob("*.safetensors")])),
     check=all_of(said("damaged text embeddings computed again"), resumed(2, 4)))
case(C, "text_cache is a file, not a folder", "one line", T1,
     setup=files(**{"out__text_cache": "not a folder"}))
case(C, "text_cache deleted before --resume", "recovered", RESUME3,
     setup=setups(copy_fx("run1"), do(lambda d: shutil.rmtree(d / "out" / "text_cache"))), check=resumed(2, 3))
case(C, "the newest checkpoint's published weights truncated", "one line", RESUME3,
     setup=setups(copy_fx("run1"), do(lambda d: cut(d / "out" / "checkpoint-2" / WEIGHTS))),
     after=all_of(said("checkpoint-1"), no_checkpoint(3)))
case(C, "a bit-flipped shard in the newest checkpoint", "one line", RESUME3,
     setup=setups(copy_fx("run1"), do(lambda d: flip(d / "out" / "checkpoint-2" / "state" / "__0_0.distcp"))),
     after=no_checkpoint(3))
case(C, "a missing shard (2-rank checkpoint), --resume on 2 ranks", "one line",
     "{TR} train.py {FAST} --steps 2 --resume --output-dir {d}/out",
     setup=setups(copy_fx("run2"), do(lambda d: os.remove(d / "out" / "checkpoint-1" / "state" / "__1_0.distcp"))))
case(C, "a renamed checkpoint folder (checkpoint-2 -> checkpoint-7)", "one line",
     "python train.py {FAST} --steps 8 --resume --output-dir {d}/out",
     setup=setups(copy_fx("run1"), do(lambda d: os.rename(d / "out" / "checkpoint-2", d / "out" / "checkpoint-7"))))
case(C, "the newest checkpoint's manifest.json deleted", "one line", RESUME3,
     setup=setups(copy_fx("run1"), do(lambda d: os.remove(d / "out" / "checkpoint-2" / "manifest.json"))))
case(C, "the newest checkpoint's args.json deleted", "one line", RESUME3,
     setup=setups(copy_fx("run1"), do(lambda d: os.remove(d / "out" / "checkpoint-2" / "args.json"))))
case(C, "a notes file dropped into the newest checkpoint", "one line", RESUME3,
     setup=setups(copy_fx("run1"), files(**{"out__checkpoint-2__notes.txt": "best so far\n"})))
case(C, "the only checkpoint broken (no intact one before it)", "one line",
     "python train.py {FAST} --steps 2 --resume --output-dir {d}/out",
     setup=setups(copy_fx("run2"), do(lambda d: flip(d / "out" / "checkpoint-1" / WEIGHTS))))
case(C, "metrics.jsonl cut mid-line, then --resume", "recovered", RESUME3,
     setup=setups(copy_fx("run1"), do(lambda d: open(d / "out" / "metrics.jsonl", "a").write('{"step": 3, "lo'))),
     check=resumed(2, 3))
case(C, "a garbage line inside metrics.jsonl, then --resume", "recovered", RESUME3,
     setup=setups(copy_fx("run1"), do(lambda d: (d / "out" / "metrics.jsonl").write_text(
         (d / "out" / "metrics.jsonl").read_text().replace("\n", "\n\x00\x00garbage\n", 1)))),
     check=resumed(2, 3))
case(C, "a checkpoint-2.tmp left by a killed save, then --resume", "recovered",
     "python train.py {FAST} --steps 2 --lr 1e-3 --checkpoint-every 1 --resume --output-dir {d}/out",
     setup=setups(copy_fx("run1"), do(lambda d: (os.rename(d / "out" / "checkpoint-2", d / "out" / "checkpoint-2.tmp"),
                                                 os.remove(d / "out" / "checkpoint-2.tmp" / "manifest.json")))),
     check=resumed(1, 2))
case(C, "a 2-rank checkpoint resumed on 1 rank", "recovered", "python train.py {FAST} --steps 2 --resume "
     "--output-dir {d}/out", setup=copy_fx("run2"), check=resumed(1, 2))
case(C, "a 1-rank checkpoint resumed on 2 ranks", "recovered", "{TR} train.py {FAST} --steps 3 --lr 1e-3 --resume "
     "--output-dir {d}/out", setup=copy_fx("run1"), check=resumed(2, 3))
case(C, "an output folder in use by another run", "one line", T1 + " --seed 7",
     holder=dict(cmd="python {d}/pausing_train.py " + RUN2, pause="step:1:0"),
     after=lambda d, r: None if json.loads((d / "out" / "args.json").read_text())["seed"] == 42 else
     "the second run wrote args.json")
case(C, ".lock replaced by a folder", "one line", T1, setup=do(lambda d: (d / "out" / ".lock").mkdir(parents=True)))
case(C, "a read-only output folder (chmod 555, run as user nobody)", "one line",
     "setpriv --reuid=65534 --regid=65534 --clear-groups python train.py {FAST} --steps 1 --output-dir {d}/out",
     setup=do(lambda d: ((d / "out").mkdir(), os.chmod(d / "out", 0o555))), as_nobody=True)
case(C, "a read-only filesystem (a read-only bind mount)", "one line",
     "unshare -rm sh -c 'mount --bind {d}/out {d}/out && mount -o remount,bind,ro {d}/out && exec \"$0\" \"$@\"' "
     "python train.py {FAST} --steps 1 --output-dir {d}/out", setup=do(lambda d: (d / "out").mkdir()))
case(C, "a read-only filesystem under a finished run, then --resume", "one line",
     "unshare -rm sh -c 'mount --bind {d}/out {d}/out && mount -o remount,bind,ro {d}/out && exec \"$0\" \"$@\"' "
     + RESUME3, setup=copy_fx("run1"))
case(C, "a file-size limit (ulimit -f 100 kB) while saving the first checkpoint", "one line", T1,
     fsize=100_000, after=no_checkpoint(1))
case(C, "a file-size limit while saving, after an intact checkpoint-2", "one line", RESUME3, setup=copy_fx("run1"),
     fsize=100_000, after=all_of(no_checkpoint(3), unchanged("out/checkpoint-2"), said("checkpoint-2")))
case(C, "a file-size limit while 2 ranks save", "one line", "{TR} train.py {FAST} --steps 1 --output-dir {d}/out",
     fsize=100_000, after=no_checkpoint(1))
case(C, "an output folder whose path has spaces and accents", "recovered",
     'python train.py {FAST} --steps 1 --output-dir "{d}/my runs/caf\u00e9 1"',
     check=trained(1, "my runs/caf\u00e9 1"))

# ---- sample.py -------------------------------------------------------------------------------------------

S = "sample.py"
S1 = "python sample.py --prompt 'a cat' {SARGS} --output-dir {d}/out"
SP = "python sample.py --prompts {d}/p.txt {SARGS} --output-dir {d}/out"


def weights_with(fn, dest="w/" + WEIGHTS):
    """Setup: run1's checkpoint-2 weights changed by fn(state dict) into the case folder."""
    def setup(d, fx):
        from safetensors.torch import load_file, save_file
        state = load_file(Path(fx("run1")) / "checkpoint-2" / WEIGHTS)
        fn(state)
        (d / dest).parent.mkdir(parents=True, exist_ok=True)
        save_file(state, d / dest)
    return setup


def first_nan(state):
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")


def first_int8(state):
    key = sorted(state)[0]
    import torch
    state[key] = (state[key].float() * 100).to(torch.int8)


case(S, "non-finite weights (one NaN)", "one line", S1 + " --weights {d}/w", setup=weights_with(first_nan),
     after=lambda d, r: "images were made" if list((d / "out").glob("*.png")) else None)
case(S, "int8 weights", "one line", S1 + " --weights {d}/w", setup=weights_with(first_int8))
case(S, "weights of another model (the tiny CLIP's)", "one line", S1 + " --weights {d}/w",
     setup=lambda d, fx: (d / "w").mkdir() or shutil.copy(Path(fx("tiny")[1]) / "model.safetensors", d / "w" / WEIGHTS))
case(S, "--weights a file that is not safetensors", "one line", S1 + " --weights {d}/junk.safetensors",
     setup=files(**{"junk.safetensors": b"\x00\x01not a tensor file" * 10}))
case(S, "sample.py with --weights (a first run)", "recovered", SP + " --weights {d}/w",
     setup=setups(PF, weights_with(lambda s: None)), check=images("out", 3),
     then=[then("the weights file replaced at the same path, then rerun", "one line", SP + " --weights {d}/w",
                setup=weights_with(lambda s: s.update({k: v * 1.5 for k, v in list(s.items())[:1]})))])
case(S, "a run folder given as --weights", "one line", S1 + " --weights {run1}")
case(S, "a LoRA checkpoint folder given as --weights", "one line", S1 + " --weights {lora}/checkpoint-1")
case(S, "a full checkpoint folder given as --lora", "one line", S1 + " --lora {run1}/checkpoint-2")
case(S, "a full-weights file given as --lora", "one line", S1 + " --lora {run1}/checkpoint-2/" + WEIGHTS)
case(S, "--weights of a 2-rank training checkpoint renders", "recovered", SP + " --weights {run2}/checkpoint-1",
     setup=PF, check=all_of(images("out", 3), lambda d, r: None if all(
         json.loads(x)["weights"].endswith(WEIGHTS) for x in (d / "out" / "prompts.jsonl").read_text().splitlines())
         else "prompts.jsonl does not name the weights"))
case(S, "--lora of a LoRA training checkpoint, --compare", "recovered",
     SP + " --lora {lora}/checkpoint-1 --compare", setup=PF,
     check=all_of(images("out/base", 3), images("out/srpo", 3),
                  lambda d, r: None if (d / "out" / "compare.png").is_file() else "no compare.png"))
case(S, "two runs at once on one folder", "one line", SP,
     setup=setups(PF, files(**{"many.txt": "".join(f"a dog number {i}\n" for i in range(400))})),
     holder=dict(cmd="python sample.py --prompts {d}/many.txt --output-dir {d}/out",
                 wait=("file", "{d}/out/00000.png")))
case(S, "--compare without --weights or --lora", "one line", S1 + " --compare")
case(S, "--weights and --lora together", "one line", S1 + " --weights {run1}/checkpoint-2 --lora {lora}/checkpoint-1")
case(S, "--weights with --quantize-base nf4", "one line", S1 + " --weights {run1}/checkpoint-2 --quantize-base nf4")
case(S, "blank --prompt \"\" (an unset shell variable)", "one line", "python sample.py --prompt '' {SARGS} "
     "--output-dir {d}/out")
case(S, "--prompts .jsonl (a previous run's prompts.jsonl)", "one line",
     "python sample.py --prompts {compare}/base/prompts.jsonl {SARGS} --output-dir {d}/out")
case(S, "prompts in UTF-16 with BOM render their real prompts", "recovered", SP,
     setup=files(**{"p.txt": "a caf\u00e9\nun chat\n".encode("utf-16")}),
     check=all_of(images("out", 2), jsonl_prompts("out", ["a caf\u00e9", "un chat"])))
for flag, value in (("--height", "40"), ("--width", "0"), ("--height", "-64"), ("--num-inference-steps", "0"),
                    ("--num-inference-steps", HUGE), ("--guidance-scale", "nan"), ("--seed", HUGE),
                    ("--max-sequence-length", "-1")):
    case(S, f"bad size or number {flag} {value}", "one line", S1 + f" {flag} {value}")
case(S, "--output-dir is a file", "one line", S1.replace("{d}/out", "{d}/afile"), setup=files(afile="x"))
case(S, "a damaged PNG in the output folder, rerun", "one line", SP,
     setup=setups(PF, lambda d, fx: shutil.copytree(Path(fx("compare")) / "base", d / "out"),
                  do(lambda d: cut(d / "out" / "00001.png", 0.5))))
case(S, "--model is not FLUX (the tiny CLIP folder)", "one line", S1 + " --model {clip}")
case(S, "--model folder missing", "one line", S1 + " --model {d}/nope")
case(S, "two ranks render what one does", "recovered",
     "{TR} sample.py --prompts {d}/p.txt {SARGS} --output-dir {d}/out",
     setup=PF, check=all_of(images("out", 3), said("3 images rendered, 0 already there")))

# ---- evaluate.py -----------------------------------------------------------------------------------------

E = "evaluate.py"
CMP = copy_fx("compare", "cmp")
EV = "python evaluate.py {d}/cmp/base {d}/cmp/srpo"


def swap(a, b):
    def setup(d, fx):
        os.replace(d / a, d / "x.png")
        os.replace(d / b, d / a)
        os.replace(d / "x.png", d / b)
    return setup


case(E, "two folders scored and paired", "recovered", EV + " --reward clip --json {d}/new/scores.json", setup=CMP,
     check=all_of(said("win rate of", "95% bootstrap interval"),
                  lambda d, r: None if json.loads((d / "new" / "scores.json").read_text())["paired"][0]["n"] == 3
                  else "scores.json without 3 pairs"))
case(E, "swapped PNGs in one folder", "one line", EV,
     setup=setups(CMP, swap("cmp/base/00000.png", "cmp/base/00001.png")))
case(E, "a PNG renamed over another", "one line", EV,
     setup=setups(CMP, do(lambda d: os.replace(d / "cmp/srpo/00002.png", d / "cmp/srpo/00000.png"))))
case(E, "unequal folders (one cut short): a note, paired over the common images", "recovered", EV, setup=setups(
    CMP, do(lambda d: (d / "cmp/srpo/prompts.jsonl").write_text(
        "".join((d / "cmp/srpo/prompts.jsonl").read_text().splitlines(keepends=True)[:2])))),
    check=said("note: {d}/cmp/base has 3 images, {d}/cmp/srpo 2"))
case(E, "a --compare folder given instead of its two subfolders", "one line", "python evaluate.py {d}/cmp", setup=CMP)
case(E, "several --reward without --reward-path", "one line", EV + " --reward hps pickscore clip", setup=CMP)
case(E, "--reward-path count not matching --reward", "one line", EV + " --reward hps clip --reward-path {clip}",
     setup=CMP)
case(E, "--reward clip clip", "one line", EV + " --reward clip clip", setup=CMP)
case(E, "--reward-path missing", "one line", EV + " --reward clip --reward-path {d}/nope", setup=CMP)
case(E, "a folder without prompts.jsonl", "one line", EV,
     setup=setups(CMP, do(lambda d: os.remove(d / "cmp/srpo/prompts.jsonl"))))
case(E, "a folder that does not exist", "one line", "python evaluate.py {d}/nope")
case(E, "--json that is a folder", "one line", EV + " --json {d}/cmp", setup=CMP)
case(E, "three folders", "one line", EV + " {d}/cmp/base", setup=CMP)
case(E, "--batch-size 0", "one line", EV + " --batch-size 0", setup=CMP)
case(E, f"--batch-size {HUGE}", "one line", EV + f" --batch-size {HUGE}", setup=CMP)
case(E, "a garbage line in prompts.jsonl", "one line", EV,
     setup=setups(CMP, do(lambda d: open(d / "cmp/base/prompts.jsonl", "a").write("{not json\n"))))
case(E, "a truncated PNG", "one line", EV, setup=setups(CMP, do(lambda d: cut(d / "cmp/srpo/00001.png", 0.5))))
case(E, "a deleted PNG still listed", "one line", EV,
     setup=setups(CMP, do(lambda d: os.remove(d / "cmp/srpo/00001.png"))))
case(E, "two folders of different seeds", "one line", "python evaluate.py {d}/cmp/base {d}/other",
     setup=CMP, prep=["python sample.py --prompts {compare}/p.txt {SARGS} --seed 5 "
                                  "--output-dir {d}/other"])
case(E, "images of different sizes in one folder", "one line", "python evaluate.py {d}/cmp/base --batch-size 1",
     setup=setups(CMP, do(lambda d: png(d / "cmp/base/00002.png", (16, 16)))))
case(E, "prompts.jsonl in UTF-16 with BOM", "recovered", "python evaluate.py {d}/cmp/base", setup=setups(
    CMP, do(lambda d: (d / "cmp/base/prompts.jsonl").write_bytes(
        (d / "cmp/base/prompts.jsonl").read_text().encode("utf-16")))), check=said("cmp/base  n"))

# ---- friction --------------------------------------------------------------------------------------------

F = "friction"
HIDE = dict(hide_torchvision=True)
case(F, "the progress bar shows loss and reward (this run builds the tiny models)", "recovered", T1,
     check=all_of(trained(1), lambda d, r: None if re.search(r"loss -?\d\.\d+, reward -?\d", r.stderr) else
                  "no 'loss X, reward Y' in the progress bar"), first=True)
case(F, "train.py without torchvision: no note about it", "recovered", T1, check=all_of(
    trained(1), not_said("torchvision", "Warning", "warn(")), **HIDE)
case(F, "torchrun train.py without torchvision: no note about it", "recovered",
     "{TR} train.py {FAST} --steps 1 --output-dir {d}/out", check=all_of(trained(1), not_said("torchvision")), **HIDE)
case(F, "sample.py without torchvision: no note about it", "recovered", S1,
     check=all_of(images("out", 1), not_said("torchvision", "Warning")), **HIDE)
case(F, "evaluate.py without torchvision: no note about it", "recovered", "python evaluate.py {compare}/base",
     check=all_of(said("mean"), not_said("torchvision", "Warning")), **HIDE)
case(F, "evaluate.py prints no import-time notes (bitsandbytes' kernels)", "recovered",
     "python evaluate.py {compare}/base", check=all_of(said("mean"), not_said("Failed to load", "kernels")))
case(F, "a plain run prints no warnings", "recovered", T1, check=all_of(trained(1), not_said("Warning", "warn(")))


def modes(expected):
    def check(d, r):
        folder = d / "out" / "checkpoint-1"
        wrong = {str(p.relative_to(folder)): oct(p.stat().st_mode & 0o777) for p in folder.rglob("*")
                 if p.is_file() and p.stat().st_mode & 0o777 != expected}
        return f"modes {wrong} (expected {oct(expected)})" if wrong else None
    return check


case(F, "published checkpoint files are 0644 under umask 022", "recovered", T1, umask=0o022,
     check=all_of(trained(1), modes(0o644)))
case(F, "checkpoint files are 0600 under umask 077 (a private run stays private)", "recovered", T1, umask=0o077,
     check=all_of(trained(1), modes(0o600)))
case(F, "a full disk (1 MB tmpfs, mounted in a user namespace) while saving", "one line",
     "unshare -rm sh -c 'mount -t tmpfs -o size=1m probe {d}/disk && exec \"$0\" \"$@\"' "
     "python train.py {FAST} --steps 1 --output-dir {d}/disk/out", setup=do(lambda d: (d / "disk").mkdir()),
     after=said("the disk is full"))
case(F, "a full disk (64 kB tmpfs) while sample.py writes images", "one line",
     "unshare -rm sh -c 'mount -t tmpfs -o size=64k probe {d}/disk && exec \"$0\" \"$@\"' "
     "python sample.py --prompts {d}/many.txt --output-dir {d}/disk/out",
     setup=setups(files(**{"many.txt": "".join(f"a bird number {i}\n" for i in range(60))}),
                  do(lambda d: (d / "disk").mkdir())), after=said("the disk is full"))
case(F, "sample.py's default size on the tiny models takes seconds", "recovered",
     "python sample.py --prompt 'a cat' --output-dir {d}/out",
     check=all_of(images("out", 1), lambda d, r: None if r.seconds < 30 else f"took {r.seconds:.0f} s",
                  lambda d, r: None if png_size(d / "out" / "00000.png") == (64, 64) else "not 64x64"))
case(F, "the done line names only what exists (with --sample-every 0)", "recovered", T1, check=lambda d, r: next(
    (f"the done line names {p}, which does not exist" for p in re.findall(r"(/\S+?)[,\s]", next(
        (x + " " for x in r.stdout.splitlines() if x.startswith("done:")), "")) if not os.path.exists(p)), None))
case(F, "torchrun prints the done line once", "recovered", "{TR} train.py {FAST} --steps 1 --output-dir {d}/out",
     check=lambda d, r: None if r.stdout.count("done: weights") == 1 else
     f"{r.stdout.count('done: weights')} done lines")
case(F, "train.py --help", "recovered", "python train.py --help", check=said("usage:", "--resume"))
case(F, "metrics.png is drawn", "recovered", T1, check=lambda d, r: None if (d / "out" / "metrics.png").read_bytes()[
    :8] == b"\x89PNG\r\n\x1a\n" else "metrics.png is no PNG")


# ----------------------------------------------------------------------------------------- running a case

class Result:
    def __init__(self):
        self.rc, self.stdout, self.stderr, self.seconds, self.timed_out, self.notes = None, "", "", 0.0, False, []

    @property
    def text(self):
        return self.stdout + self.stderr


class Probe:
    def __init__(self, repo, out, keep):
        self.repo, self.out, self.keep = Path(repo).resolve(), Path(out).resolve(), keep
        self.root = Path(tempfile.mkdtemp(prefix="probe-"))
        os.chmod(self.root, 0o755)  # the case run as user nobody reads the tiny models under it
        self.tiny_dir = self.root / "tiny"
        self.tiny_dir.mkdir()
        self.bin = Path(sys.executable).parent
        self.fixtures, self.lock = {}, threading.Lock()
        self.fixture_locks = {}
        self.stopping = False  # set when the probe is stopped: no case starts anything more

    # -- commands
    def fill(self, text, d):
        def value(m):
            key = m.group(1)
            if key == "d":
                return str(d)
            if key in ("FAST", "SARGS", "TR"):
                return self.fill(globals()[key], d)
            if key in ("flux", "clip"):
                return self.fixture("tiny")[key == "clip"]
            if key in ("run1", "run2", "lora", "compare"):
                return self.fixture(key)
            return m.group(0)
        return re.sub(r"\{(\w+)\}", value, text)

    def argv(self, command):
        words = shlex.split(command)
        tools = {"python": sys.executable, "torchrun": str(self.bin / "torchrun")}
        return [tools.get(w, w) for w in words]

    def env(self, d, spec, marker):
        env = dict(os.environ, PYTHONPATH=str(self.repo), OMP_NUM_THREADS="1", SRPO_TINY_DIR=str(self.tiny_dir),
                   PROBE_CASE=marker)
        if spec.get("hide_torchvision"):
            write(d / "site" / "sitecustomize.py", NO_TORCHVISION)
            env["PYTHONPATH"] = f"{d / 'site'}:{self.repo}"
        if spec.get("as_nobody"):
            env["HOME"] = str(d)
        if spec.get("pause") or spec.get("signal", {}).get("pause"):
            env["PAUSE"] = spec.get("pause") or spec["signal"]["pause"]
        return env

    def start(self, command, d, spec, marker, sink=None):
        """The command started in a session of its own; its output to pipes, or to the file sink."""
        limits = (spec.get("umask"), spec.get("fsize"))

        def preexec():  # in the child: a umask, a file-size limit whose signal is ignored (a write then fails)
            if limits[0] is not None:
                os.umask(limits[0])
            if limits[1] is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limits[1], limits[1]))
        out = open(sink, "wb") if sink else subprocess.PIPE
        return subprocess.Popen(self.argv(command), cwd=self.repo, env=self.env(d, spec, marker),
                                stdout=out, stderr=subprocess.STDOUT if sink else subprocess.PIPE,
                                stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=preexec if any(x is not None for x in limits)
                                else None)

    def processes(self, marker, prefix=False):
        """pids of live processes started for this marker (their environment holds PROBE_CASE=marker), or for every
        marker starting with it."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    environ = open(f"/proc/{entry}/environ", "rb").read()
                except OSError:
                    continue
                if f"PROBE_CASE={marker}{'' if prefix else chr(0)}".encode() in environ + b"\0" and \
                        alive_pid(int(entry)):
                    found.append(int(entry))
        return found

    def end(self, marker, prefix=False):
        for pid in self.processes(marker, prefix):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def execute(self, command, d, spec, marker):
        """Runs command as the case says, sending its signal at its moment; the Result."""
        r = Result()
        t0 = time.time()
        if self.stopping:
            raise RuntimeError("the probe was stopped")
        p = self.start(command, d, spec, marker)
        chunks = {"stdout": [], "stderr": []}

        def read(stream, key):
            for block in iter(lambda: stream.read1(65536), b""):
                chunks[key].append(block)
        readers = [threading.Thread(target=read, args=(p.stdout, "stdout"), daemon=True),
                   threading.Thread(target=read, args=(p.stderr, "stderr"), daemon=True)]
        for t in readers:
            t.start()
        text = lambda: b"".join(chunks["stdout"] + chunks["stderr"]).decode(errors="replace")  # noqa: E731
        sig = spec.get("signal")
        if sig:
            wait = ("file", f"{d}/paused") if sig.get("pause") else tuple(self.fill(x, d) for x in sig["wait"])
            while p.poll() is None and time.time() - t0 < TIMEOUT:
                if (wait[0] == "file" and os.path.exists(wait[1])) or (wait[0] == "text" and wait[1] in text()):
                    break
                time.sleep(0.05)
            if p.poll() is None and time.time() - t0 < TIMEOUT:
                if sig.get("wait", ("",))[0] == "text":
                    time.sleep(0.5)
                whom = sig["whom"]
                try:
                    if whom == "main":
                        os.kill(p.pid, sig["sig"])
                    elif whom == "group":  # the terminal's Ctrl-C: the foreground process group
                        os.killpg(p.pid, sig["sig"])
                    else:  # the paused rank
                        os.kill(int((d / "paused").read_text()), sig["sig"])
                    r.notes.append(f"sent {signal.Signals(sig['sig']).name} to {whom} after {time.time() - t0:.1f} s")
                except (ProcessLookupError, OSError, ValueError) as e:
                    r.notes.append(f"probe: could not signal {whom}: {e}")
            else:
                r.notes.append("probe: the moment to signal never came")
        try:
            p.wait(timeout=max(1, TIMEOUT - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            r.timed_out = True
            self.end(marker)
            p.wait()
        r.seconds = time.time() - t0
        for t in readers:  # a process still holding the pipes after the command ended: a rank left behind
            t.join(timeout=60)
        left = self.processes(marker)
        if left:
            r.notes.append(f"{len(left)} process(es) still running after the command ended: {left}")
            self.end(marker)
        for t in readers:
            t.join(timeout=10)
        r.rc = p.returncode
        r.stdout = b"".join(chunks["stdout"]).decode(errors="replace")
        r.stderr = b"".join(chunks["stderr"]).decode(errors="replace")
        return r

    # -- fixtures, built once, on first use
    def fixture(self, name):
        with self.lock:
            lock = self.fixture_locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self.fixtures:
                self.fixtures[name] = self.build(name)
            return self.fixtures[name]

    def build(self, name):
        if name == "tiny":
            command = "python -c 'from tiny import tiny_model_paths; print(*tiny_model_paths(), sep=chr(10))'"
        else:
            folder = self.root / "fixtures" / name
            folder.parent.mkdir(exist_ok=True)
            write(self.root / "fixtures" / "p.txt", PROMPTS)
            command = {
                "run1": "python train.py {FAST} --steps 2 --checkpoint-every 1 --lr 1e-3 --output-dir " + str(folder),
                "run2": "{TR} train.py {FAST} --steps 1 --output-dir " + str(folder),
                "lora": "python train.py {FAST} --steps 1 --lora-rank 4 --output-dir " + str(folder),
                "compare": f"python sample.py --prompts {self.root}/fixtures/p.txt {{SARGS}} --weights {{run1}}"
                           f"/checkpoint-2 --compare --output-dir {folder}",
            }[name]
        r = self.execute(self.fill(command, self.root), self.root, {}, f"{self.root}/fixture-{name}")
        if r.rc != 0:
            raise RuntimeError(f"fixture {name} failed (exit {r.rc}): {r.stderr[-2000:]}")
        if name == "tiny":
            return r.stdout.strip().splitlines()[-2:]
        if name == "compare":
            shutil.copy(self.root / "fixtures" / "p.txt", folder / "p.txt")
        return str(folder)

    # -- one case, or a chain of them in one folder
    def run_chain(self, head):
        d = Path(tempfile.mkdtemp(prefix="case-", dir=self.root))
        os.chmod(d, 0o755)
        results = []
        for spec in [head, *head.get("then", [])]:
            spec = {**spec, "cat": head["cat"]}
            results.append(self.run_case(spec, d))
        if not self.keep:
            shutil.rmtree(d, ignore_errors=True)
        return results

    def run_case(self, spec, d):
        marker = f"{d}/{len(list(d.glob('.ran-*')))}"
        (d / f".ran-{len(list(d.glob('.ran-*')))}").touch()
        command = r = None
        setup_error = None
        holder = None
        try:
            if spec.get("signal", {}).get("pause") or spec.get("holder", {}).get("pause"):
                write(d / "pausing_train.py", PAUSING_TRAIN)
            if spec.get("as_nobody"):
                subprocess.run(["chmod", "-R", "a+rX", str(self.tiny_dir)], check=True)
                os.chmod(d, 0o777)
            if spec.get("setup"):
                spec["setup"](d, self.fixture)
            for prep in spec.get("prep", []):
                pr = self.execute(self.fill(prep, d), d, {}, marker + "-prep")
                if pr.rc != 0:
                    raise RuntimeError(f"prep {prep!r} exit {pr.rc}: {pr.stderr.strip()[-300:]}")
            command = self.fill(spec["cmd"], d)
            if spec.get("holder"):
                h = spec["holder"]
                holder = self.start(self.fill(h["cmd"], d), d, {"pause": h.get("pause")}, marker + "-holder",
                                    sink=d / "holder.log")
                wait = f"{d}/paused" if h.get("pause") else self.fill(h["wait"][1], d)
                t0 = time.time()
                while not os.path.exists(wait):
                    if holder.poll() is not None or time.time() - t0 > TIMEOUT:
                        raise RuntimeError(f"the holder ended or never got there (exit {holder.poll()}): "
                                           f"{(d / 'holder.log').read_text(errors='replace')[-300:]}")
                    time.sleep(0.05)
        except Exception as e:  # the probe's own fault: reported as such
            setup_error = f"{type(e).__name__}: {e}"
        if setup_error is None:
            r = self.execute(command, d, spec, marker)
        if holder:
            self.end(marker + "-holder")
            holder.wait()
        got, note = classify(spec, r, d, self.repo, setup_error)
        log = self.out / "logs" / (re.sub(r"[^\w.-]+", "-", f"{spec['cat']}--{spec['name']}")[:150] + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {command or spec['cmd']}\nexpected {spec['expect']}, got {got}: {note}\nexit code "
                       f"{None if r is None else r.rc}; {'; '.join([] if r is None else r.notes)}\n"
                       f"---- stdout\n{'' if r is None else r.stdout}\n---- stderr\n{'' if r is None else r.stderr}\n")
        text = "" if r is None else (r.stdout + "\n" + r.stderr)
        lines = [x.split("\r")[-1] for x in text.splitlines()]
        return dict(category=spec["cat"], name=spec["name"], command=command or spec["cmd"], expected=spec["expect"],
                    got=got, note=note, exit_code=None if r is None else r.rc, log=str(log),
                    error_lines=[] if r is None else error_lines(r.stderr),
                    tail=[x for x in lines if x.strip()][-20:], seconds=round(0 if r is None else r.seconds, 1),
                    probe_notes=[] if r is None else r.notes)


def error_lines(stderr):
    """stderr's lines (and the pieces a progress bar's \\r leaves) that start with 'error: '."""
    return [piece for line in stderr.split("\n") for piece in line.split("\r") if piece.startswith("error: ")]


def classify(spec, r, d, repo, setup_error):
    """(class, one line on what happened)."""
    if setup_error:
        return "other", f"probe setup failed: {setup_error}"
    if r.timed_out:
        return "other", f"timed out after {TIMEOUT} s"
    text = r.text
    torchrun = "torchrun" in spec["cmd"] or "{TR}" in spec["cmd"]
    ours = re.search(rf'File "({re.escape(str(repo))}|{re.escape(str(d))})/[^"]+", line', text)
    if ours or (not torchrun and "Traceback (most recent call last)" in text):
        last = next((x for x in reversed(text.splitlines()) if re.match(r"^\w[\w.]*(Error|Exception)\b", x)), "")
        return "traceback", (last or "a traceback").strip()[:300]
    left = [n for n in r.notes if "still running" in n]
    if left:
        return "other", left[0]
    errors = error_lines(r.stderr)
    if r.rc == 0:
        if spec.get("check"):
            try:
                problem = spec["check"](d, r)
            except Exception as e:  # noqa: BLE001 -- a check that cannot even read the result: the result is wrong
                problem = f"check failed: {type(e).__name__}: {e}"
            return ("silent", problem) if problem else ("recovered", "")
        return "silent", "exit 0" + (f", and said {errors[0]!r}" if errors else ": accepted without a word")
    sig = spec.get("signal", {}).get("sig")
    codes = set(spec.get("codes", ())) or {2}
    if torchrun:
        codes |= {1}
    if sig:
        codes |= {128 + sig, -sig, 1}
    if r.rc in codes and len(errors) == 1:
        if spec.get("after"):
            try:
                problem = spec["after"](d, r)
            except Exception as e:  # noqa: BLE001
                problem = f"{type(e).__name__}: {e}"
            if problem:
                return "other", f"one line ({errors[0][:160]}), but {problem}"
        return "one line", errors[0][:300]
    if spec.get("codes") and r.rc in spec["codes"]:  # a kill -9 of the process itself: nothing to say
        return "other", f"exit {r.rc} ({len(errors)} error lines), as a kill -9 ends it"
    glued = re.search(r"\S(error: [^\n]*)", r.stderr)  # our line, but after a progress bar's text on one line
    if not errors and glued:
        return "other", f"exit {r.rc}, the error line glued to the end of a progress bar's line: {glued[1][:200]}"
    last = next((x.split("\r")[-1] for x in reversed(r.stderr.splitlines()) if x.split("\r")[-1].strip()), "")
    return "other", f"exit {r.rc}, {len(errors)} 'error:' lines" + (f": {errors[0][:200]}" if errors else
                                                                    f"; last line: {last.strip()[:200]}")


# ----------------------------------------------------------------------------------------- the report

def report(results, out, header):
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(dict(header, cases=results), indent=1, ensure_ascii=False))
    lines = [f"# Fault probe: {len(results)} cases", "", *[f"- {k}: {v}" for k, v in header.items()], "",
             "| category | " + " | ".join(CLASSES) + " | as expected | cases |",
             "| --- |" + " ---: |" * (len(CLASSES) + 2)]
    for cat in [*CATEGORIES, "all"]:
        rows = [x for x in results if cat in ("all", x["category"])]
        counts = [sum(x["got"] == c for x in rows) for c in CLASSES]
        good = sum(x["got"] == x["expected"] for x in rows)
        lines.append(f"| {cat} | " + " | ".join(map(str, counts)) + f" | {good} | {len(rows)} |")
    lines += ["", "## Cases not in their expected class", ""]
    for x in results:
        if x["got"] != x["expected"]:
            lines.append(f"- **{x['category']}: {x['name']}**: expected {x['expected']}, got **{x['got']}** "
                         f"(exit {x['exit_code']}): {x['note']}  \n  `{x['command']}`")
    (out / "probe.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent), help="the clone to probe")
    p.add_argument("--out", required=True, help="where probe.json and probe.md go")
    p.add_argument("--only", help="run only the cases whose category or name contains this")
    p.add_argument("--jobs", type=int, default=2, help="cases at once (default 2)")
    p.add_argument("--keep", action="store_true", help="keep every case's folder")
    args = p.parse_args(argv)
    probe = Probe(args.repo, args.out, args.keep)
    chains = [c for c in CASES if not args.only or any(
        args.only.lower() in f"{c['cat']}: {x['name']}".lower() for x in [c, *c.get("then", [])])]
    total = sum(1 + len(c.get("then", [])) for c in chains)
    first = [c for c in chains if c.get("first")]
    rest = [c for c in chains if not c.get("first")]
    print(f"probing {probe.repo} with {total} cases, {args.jobs} at a time; tiny models in {probe.tiny_dir}",
          flush=True)
    results, done, t0 = [], [0], time.time()
    printing = threading.Lock()

    def run(chain):
        out = probe.run_chain(chain)
        with printing:
            for x in out:
                done[0] += 1
                mark = "  " if x["got"] == x["expected"] else "!!"
                print(f"[{done[0]:3d}/{total}] {mark} {x['got']:<9} (expected {x['expected']:<9}) {x['seconds']:6.1f}s "
                      f"{x['category']}: {x['name']}" + (f" -- {x['note'][:150]}" if x["got"] != x["expected"]
                                                         else ""), flush=True)
        return out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # As in a user's terminal, Ctrl-C and a hangup reach the commands: a probe started in the background (`&`,
    # nohup) ignores SIGINT, SIGQUIT or SIGHUP, and every command it starts would inherit that (and rightly keep it).
    for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGQUIT, signal.SIG_DFL),
                         (signal.SIGHUP, signal.SIG_DFL)):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, default)
    pool = ThreadPoolExecutor(args.jobs)
    try:
        for chain in first:  # builds the tiny models, alone
            results += run(chain)
        for out in pool.map(run, rest):
            results += out
    finally:  # stopped early (Ctrl-C, SIGTERM): nothing it started goes on (a paused rank would wait forever)
        probe.stopping = True
        probe.end(str(probe.root), prefix=True)
        pool.shutdown(cancel_futures=True)
        if not args.keep:
            shutil.rmtree(probe.root, ignore_errors=True)
    order = {c: i for i, c in enumerate(CATEGORIES)}
    results.sort(key=lambda x: order[x["category"]])
    commit = subprocess.run(["git", "-C", str(probe.repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    header = dict(repo=str(probe.repo), commit=commit, date=time.strftime("%Y-%m-%d %H:%M"),
                  machine=f"{cpu}, {os.cpu_count()} cores", minutes=round((time.time() - t0) / 60, 1), jobs=args.jobs)
    print(report(results, Path(args.out), header))


if __name__ == "__main__":
    main()
