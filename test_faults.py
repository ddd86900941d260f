"""Faults and hostile input: nothing broken is trusted, nothing is trained that the user did not mean. kill -9 of a
rank mid-step and mid-save, SIGTERM, Ctrl-C mid-save, broken checkpoints, two runs on one folder, a write failure
while saving, non-finite weights, and bad input to train.py, sample.py and evaluate.py. Each case checks what the
user sees (one `error:` line, the exit code) and what is on disk; recovery is checked bit for bit against an
uninterrupted run. CPU only, tiny random models; the runs of two ranks are marked slow (CI runs them)."""
import argparse
import errno
import gc
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import evaluate
import sample
import train
from inputs import load_image
from test_train import close_updates, dcp_state, train_here

ROOT = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("SRPO_TINY_DIR", tempfile.mkdtemp(prefix="srpo-tiny-"))
FAST = ["--rollout-steps", "2", "--resolution", "32", "--max-sequence-length", "32", "--sample-every", "0"]
RUN = [*FAST, "--steps", "6", "--checkpoint-every", "2", "--lr", "1e-3"]  # batch 2: one prompt a rank on two
WEIGHTS = "diffusion_pytorch_model.safetensors"
AFTER = "the same command with --resume continues from the newest checkpoint"

# train.py with one rank paused at a chosen moment until the test kills it: PAUSE=step:N:RANK pauses after the
# backward of step N, before its optimizer step; PAUSE=save:N:RANK inside the save of checkpoint-N, once this
# rank's shard is written (no manifest yet). The paused rank writes its pid to the file $PAUSED.
PAUSING_TRAIN = """
import os, runpy, time
import torch.distributed.checkpoint as dcp
from torch.optim.optimizer import register_optimizer_step_pre_hook
where, step, rank = os.environ["PAUSE"].split(":")

def pause():
    with open(os.environ["PAUSED"] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.environ["PAUSED"] + ".tmp", os.environ["PAUSED"])
    while True:
        time.sleep(1)

def before_optimizer_step(optimizer, args, kwargs):
    done = next(iter(optimizer.state.values()), {}).get("step", 0)  # steps taken, those resumed included
    if int(done) + 1 == int(step):
        pause()

def save(state_dict, *, checkpoint_id, **kwargs):
    real_save(state_dict, checkpoint_id=checkpoint_id, **kwargs)
    if f"checkpoint-{step}.tmp" in str(checkpoint_id):
        pause()

if int(os.environ.get("RANK", 0)) == int(rank):  # plain python: rank 0
    if where == "step":
        register_optimizer_step_pre_hook(before_optimizer_step)
    else:
        real_save, dcp.save = dcp.save, save
runpy.run_module("train", run_name="__main__")  # as `python train.py ARGS` runs it
"""


def launch(*args, nproc=1, script="train.py", env=None, cwd=ROOT, **kwargs):
    """train.py (or script) as a user starts it: python, or torchrun with nproc ranks."""
    # --standalone: a free port of its own, so runs beside other torchrun jobs do not collide on 29500
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return subprocess.Popen([sys.executable, *launcher, script, *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env or {})}, **kwargs)


def finish(p, timeout=600):
    stdout, stderr = p.communicate(timeout=timeout)
    return p.returncode, stdout + stderr


def one_error(output):
    """The message of the one `error: ...` line; no frame of ours (torchrun adds a report of its own)."""
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and 'train.py", line' not in output and 'sample.py", line' not in output, output[-6000:]
    return errors[0][len("error: "):]


def in_process_error(main, argv, capsys):
    """main(argv) in this process: exit code 2 and one `error: ...` line, its last; returns the message."""
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        code = e.value.code
    finally:  # a traceback would leave train.py's process group behind for the next case
        if dist.is_initialized():
            dist.destroy_process_group()
    del e
    gc.collect()  # the frames of the failed run, and so its lock on --output-dir (a process would have ended)
    err = capsys.readouterr().err.rstrip("\n").split("\n")
    assert code == 2 and err[-1].startswith("error: ") and sum(x.startswith("error: ") for x in err) == 1, err
    return err[-1][len("error: "):]


def checkpoints(out):
    return sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))


def intact(folder):
    """Every file of a checkpoint is in its manifest with its size and sha256, hashed here anew, and no other."""
    manifest = json.load(open(os.path.join(folder, "manifest.json")))["files"]
    files = {os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names}
    if files != {*manifest, "manifest.json"}:
        return False
    for name, (size, digest) in manifest.items():
        data = open(os.path.join(folder, name), "rb").read()
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            return False
    return True


def rows(out):
    """metrics.jsonl without the wall times, which differ between runs."""
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")} for line in open(out / "metrics.jsonl")]


def assert_same_training_state(a, b):
    """Model weights, AdamW's states and the published file, bit for bit."""
    sa, sb = dcp_state(a), dcp_state(b)
    assert sa["model"].keys() == sb["model"].keys()
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key
    for key, state in sa["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, sb["optimizer"]["state"][key][name]), (key, name)
    assert open(a / WEIGHTS, "rb").read() == open(b / WEIGHTS, "rb").read()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of two ranks: 6 steps, checkpoints 2, 4, 6."""
    out = tmp_path_factory.mktemp("reference") / "out"
    code, output = finish(launch(*RUN, "--output-dir", out, nproc=2))
    assert code == 0 and "done: weights" in output, output[-6000:]
    return out


# ---------------------------------------------------------------- kill -9, SIGTERM, then --resume

def interrupt(out, pause, sig, whom, resume):
    """A 2-rank run of RUN paused at `pause` (see PAUSING_TRAIN), then sent sig: to the paused rank, or to torchrun."""
    paused = out.parent / "paused"
    (out.parent / "pausing_train.py").write_text(PAUSING_TRAIN)
    p = launch(*RUN, "--output-dir", out, *(["--resume"] if resume else []), nproc=2,
               script=str(out.parent / "pausing_train.py"), env={"PAUSE": pause, "PAUSED": str(paused)})
    deadline = time.time() + 600
    while not paused.exists():
        assert p.poll() is None and time.time() < deadline, finish(p)[1][-6000:]
        time.sleep(0.05)
    os.kill(int(paused.read_text()) if whom == "rank" else p.pid, sig)
    paused.unlink()
    code, output = finish(p, timeout=300)
    assert code != 0 and "done: weights" not in output
    return output


@pytest.mark.slow
def test_kill_9_mid_step_and_mid_save_sigterm_and_ctrl_c_then_resume_ends_bit_identical(tmp_path, reference):
    out = tmp_path / "out"
    # kill -9 of rank 1 in step 3, after its backward: checkpoint-2 is the newest, and intact; rank 0 says what
    # happened (it lost its peer in a collective, or torchrun stopped it), and how to go on
    output = interrupt(out, "step:3:1", signal.SIGKILL, "rank", resume=False)
    assert one_error(output).endswith(f"; {AFTER}") and "rank 0: lost another rank" in output or "SIGTERM" in output
    assert checkpoints(out) == ["checkpoint-2"] and intact(out / "checkpoint-2")
    assert [r["step"] for r in rows(out)] == [1, 2]
    # the killed run's lock file names its rank 0, which is gone: it must not block the resume
    holder = int(open(out / ".lock").read().split()[1])
    with pytest.raises(ProcessLookupError):
        os.kill(holder, 0)
    # --resume, and kill -9 of rank 1 inside the save of checkpoint-4: a .tmp folder without a manifest
    interrupt(out, "save:4:1", signal.SIGKILL, "rank", resume=True)
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4.tmp"]
    assert os.listdir(out / "checkpoint-4.tmp" / "state") and not (out / "checkpoint-4.tmp" / "manifest.json").exists()
    # --resume from checkpoint-2 again, and SIGTERM to torchrun (what a scheduler sends) in step 5: one line
    output = interrupt(out, "step:5:0", signal.SIGTERM, "torchrun", resume=True)
    assert one_error(output) == f"stopped by SIGTERM (a scheduler, a kill, or torchrun as a rank ended); {AFTER}"
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"] and intact(out / "checkpoint-4")
    # --resume from checkpoint-4, and kill -9 of torchrun itself in step 5: its ranks end with it (this returns only
    # once they have closed its pipes), one line, and the folder is free for the next run
    output = interrupt(out, "step:5:0", signal.SIGKILL, "torchrun", resume=True)
    assert one_error(output) == f"the launcher (torchrun) is gone; {AFTER}"
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    # and SIGHUP to torchrun (its terminal closed), which it passes on to its ranks: one line, not torchrun's alone
    output = interrupt(out, "step:5:0", signal.SIGHUP, "torchrun", resume=True)
    assert one_error(output) == f"stopped by SIGHUP (the terminal closed; torchrun passes it on); {AFTER}"
    # --resume from checkpoint-4, and Ctrl-C (SIGINT to torchrun, which passes it on) inside the save of checkpoint-6,
    # with rank 1 paused there and rank 0 waiting for it in a collective: one line, and no checkpoint-6
    output = interrupt(out, "save:6:1", signal.SIGINT, "torchrun", resume=True)
    assert one_error(output) == f"interrupted (Ctrl-C); {AFTER}"
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6.tmp"]
    # --resume to the end: the same bits as the run that was never interrupted
    code, output = finish(launch(*RUN, "--output-dir", out, "--resume", nproc=2))
    assert code == 0 and f"resumed from {out}/checkpoint-4" in output, output[-6000:]
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert_same_training_state(out / "checkpoint-6", reference / "checkpoint-6")
    assert rows(out) == rows(reference)


# ---------------------------------------------------------------- broken checkpoints are never trusted

def resume_message(out, newest, problem, intact_step):
    return (f"--resume: {out}/checkpoint-{newest} is broken ({problem}); the newest intact one is "
            f"checkpoint-{intact_step}. Move it aside (e.g. to {out}/broken-checkpoint-{newest}) and resume again")


@pytest.mark.slow
def test_a_missing_shard_is_refused_with_one_line_from_two_ranks(tmp_path, reference):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    os.remove(out / "checkpoint-6" / "state" / "__1_0.distcp")
    code, output = finish(launch(*RUN, "--output-dir", out, "--resume", nproc=2))
    assert code != 0
    assert one_error(output) == resume_message(out, 6, "state/__1_0.distcp is missing", 4)
    assert rows(out) == rows(reference) and intact(out / "checkpoint-4")  # nothing was touched


@pytest.mark.slow
def test_corrupted_or_truncated_newest_checkpoint_is_refused_and_the_intact_one_resumes(tmp_path, reference, capsys):
    flipped, cut, garbled = tmp_path / "flipped", tmp_path / "cut", tmp_path / "garbled"
    for out in (flipped, cut, garbled):
        shutil.copytree(reference, out)
    shard = flipped / "checkpoint-6" / "state" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
    shard.write_bytes(bytes(data))  # random bytes, the size unchanged
    published = cut / "checkpoint-6" / WEIGHTS
    size = published.stat().st_size
    os.truncate(published, size // 2)
    (garbled / "checkpoint-6" / "manifest.json").write_text('{"step": 6, "files": {"config.json": 383}}')
    for out, problem in ((flipped, "state/__0_0.distcp differs from what was written (sha256)"),
                         (cut, f"{WEIGHTS} has {size // 2} bytes, {size} were written"),
                         (garbled, "no readable manifest.json")):
        assert in_process_error(train.main, [*RUN, "--output-dir", out, "--resume"], capsys) == \
            resume_message(out, 6, problem, 4)
        assert rows(out) == rows(reference)
    # moved aside as the message says, the run resumes from checkpoint-4 (on one rank now) and redoes 5 and 6
    os.rename(cut / "checkpoint-6", cut / "broken-checkpoint-6")
    train_here(*RUN, "--output-dir", cut, "--resume")
    assert checkpoints(cut) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"] and intact(cut / "checkpoint-6")
    assert [r["step"] for r in rows(cut)] == [1, 2, 3, 4, 5, 6] and rows(cut)[:4] == rows(reference)[:4]
    start, ref, got = (dcp_state(folder)["model"] for folder in (reference / "checkpoint-4",
                                                                 reference / "checkpoint-6", cut / "checkpoint-6"))
    for key in ref:  # one rank redid what two did: the same update, summed in another order (close_updates)
        assert close_updates(got[key], ref[key], start[key]), key
    for a, b in zip(rows(cut)[4:], rows(reference)[4:], strict=True):  # as in test_train: relative to the loss
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


@pytest.mark.slow
def test_a_size_limit_hit_while_saving_is_one_line_and_the_previous_checkpoint_stays(tmp_path, reference):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    shard = min(f.stat().st_size for f in (out / "checkpoint-6" / "state").glob("*.distcp"))
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (shard // 2, shard // 2))  # noqa: E731
    code, output = finish(launch(*RUN, "--steps", "7", "--output-dir", out, "--resume", nproc=2,
                                 preexec_fn=limit))
    assert code != 0
    assert one_error(output) == (f"saving checkpoint-7 in {out} failed (OSError: [Errno 27] File too large: a "
                                 f"file-size limit (ulimit -f) stopped the write); removed it; last good checkpoint: "
                                 f"{out}/checkpoint-6")
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"] and intact(out / "checkpoint-6")
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6, 7]  # step 7 is redone by a --resume


def test_a_failed_write_of_the_published_weights_is_returned_not_raised(tmp_path):
    """A full disk while rank 0 writes the safetensors file, after the collective part of the save succeeded."""
    from safetensors.torch import save_file
    import checkpoint
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(8)).sum().backward()
    optimizer.step()
    publish = lambda folder: save_file({"w": torch.zeros(50_000)}, os.path.join(folder, WEIGHTS))  # noqa: E731
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    old_handler, old_limit = signal.signal(signal.SIGXFSZ, signal.SIG_IGN), resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        assert checkpoint.save(model, optimizer, 1, str(tmp_path), publish, 0, 1) == (str(tmp_path / "checkpoint-1"),
                                                                                       None)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, old_limit[1]))  # state: a few kB; weights: 200 kB
        path, error = checkpoint.save(model, optimizer, 2, str(tmp_path), publish, 0, 1)
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)

        def full(folder):  # as a full disk fails a write
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(folder, WEIGHTS))
        _, full_error = checkpoint.save(model, optimizer, 3, str(tmp_path), full, 0, 1)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
        dist.destroy_process_group()
    assert path is None and "File too large" in error and "\n" not in error
    assert full_error == (f"[Errno 28] No space left on device: '{tmp_path}/checkpoint-3.tmp/{WEIGHTS}': the disk "
                          f"is full: free space on it, or write to another disk")
    assert checkpoints(tmp_path) == ["checkpoint-1"] and intact(tmp_path / "checkpoint-1")


def test_weights_that_become_non_finite_stop_the_run_before_saving(tmp_path, capsys):
    """A fault that turns weights to inf after an optimizer step whose loss and gradient were finite."""
    from torch.distributed.tensor import DTensor
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def poison(optimizer, args, kwargs):
        if int(next(iter(optimizer.state.values()))["step"]) == 2:
            p = optimizer.param_groups[0]["params"][0]
            with torch.no_grad():
                (p.to_local() if isinstance(p, DTensor) else p).fill_(float("inf"))
    hook = register_optimizer_step_post_hook(poison)
    try:
        message = in_process_error(train.main, [*FAST, "--steps", "3", "--checkpoint-every", "1", "--output-dir",
                                                tmp_path / "out"], capsys)
    finally:
        hook.remove()
    assert message.startswith("the weights became non-finite at step 2 (loss ")
    assert message.endswith(f"stopped before saving; last good checkpoint: {tmp_path}/out/checkpoint-1")
    assert checkpoints(tmp_path / "out") == ["checkpoint-1"] and intact(tmp_path / "out" / "checkpoint-1")
    assert [r["step"] for r in rows(tmp_path / "out")] == [1]


# ---------------------------------------------------------------- one run per output folder

def test_a_second_run_on_a_folder_in_use_is_refused_and_runs_once_the_first_has_ended(tmp_path, capsys):
    out, paused = tmp_path / "out", tmp_path / "paused"
    (tmp_path / "pausing_train.py").write_text(PAUSING_TRAIN)
    argv = [*FAST, "--steps", "3", "--checkpoint-every", "0", "--output-dir", out]
    first = launch(*argv, "--seed", "1", script=str(tmp_path / "pausing_train.py"),
                   env={"PAUSE": "step:1:0", "PAUSED": str(paused)})  # holds the folder until killed, mid-run
    deadline = time.time() + 300
    while not paused.exists():
        assert first.poll() is None and time.time() < deadline, finish(first)[1][-6000:]
        time.sleep(0.05)
    assert in_process_error(train.main, [*argv, "--seed", "2"], capsys).startswith(
        f"--output-dir {out}: in use by another run (pid {first.pid} on {socket.gethostname()}, since ")
    assert json.load(open(out / "args.json"))["seed"] == 1  # the second run wrote nothing here
    first.kill()  # however the first ends, the kernel lets go of its lock
    finish(first)
    train_here(*argv, "--seed", "2")
    assert json.load(open(out / "args.json"))["seed"] == 2
    assert [r["step"] for r in rows(out)] == [1, 2, 3] and checkpoints(out) == ["checkpoint-3"]
    assert intact(out / "checkpoint-3")


@pytest.mark.slow
def test_an_output_dir_that_a_rank_does_not_share_is_one_line(tmp_path):
    """Two nodes without a shared filesystem, played by two ranks that each chdir into a folder of their own: the
    same relative --output-dir is then two folders, as a node-local disk would make it."""
    (tmp_path / "own_folder_train.py").write_text(
        "import os, runpy\n"
        "os.makedirs(f\"rank{os.environ['RANK']}\", exist_ok=True)\n"
        "os.chdir(f\"rank{os.environ['RANK']}\")\n"
        "runpy.run_module('train', run_name='__main__')\n")
    code, output = finish(launch(*FAST, "--output-dir", "out", nproc=2, script=str(tmp_path / "own_folder_train.py"),
                                 cwd=tmp_path))
    assert code != 0 and one_error(output) == f"--output-dir out: rank 1 on {socket.gethostname()} does not see the " \
                                              f"folder rank 0 writes; on several nodes it must be on a filesystem " \
                                              f"they all share"
    assert os.listdir(tmp_path / "rank0" / "out") == [".lock"]  # found before anything was written


@pytest.mark.slow
def test_every_rank_exits_0_after_done_runs_side_by_side(tmp_path):
    """Gloo aborted a rank that tore down its connections while another still used them: three runs at once."""
    runs = [launch(*FAST, "--steps", "1", "--output-dir", tmp_path / str(i), nproc=2) for i in range(3)]
    for p in runs:
        code, output = finish(p)
        assert code == 0 and "done: weights" in output and "Traceback" not in output, output[-6000:]


# ---------------------------------------------------------------- input that would silently change what is trained

def test_bad_numbers_and_files_stop_train_py_before_anything_loads(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"

    def error(*argv):
        return in_process_error(train.main, [*FAST, "--output-dir", out, *argv], capsys)
    assert error("--resolution", "0").startswith("--resolution 0: expected a multiple of 16 from 16 to 4096 (FLUX")
    assert error("--rollout-steps", "0").startswith("--rollout-steps 0: expected 1 to 1000 Euler steps")
    assert error("--steps", "0").startswith("--steps 0: expected 1 to 999,999 optimizer steps")
    assert error("--steps", "-1").startswith("--steps -1: expected 1 to 999,999 optimizer steps")
    assert error("--lr", "-1").startswith("--lr -1.0: expected a positive learning rate")
    assert error("--k-inversion", "0.3", "1.5").startswith("--k-inversion 0.3 1.5: expected two numbers from -1 to 1")
    (tmp_path / "utf16.txt").write_bytes("a cat\na dog\n".encode("utf-16-le"))  # no byte-order mark: NULs
    assert error("--prompts", tmp_path / "utf16.txt") == (
        f"--prompts {tmp_path}/utf16.txt:1: a NUL byte (UTF-16 without its byte-order mark, or not text; expected a "
        f".txt file with one prompt per line, or a .json list of strings in UTF-8, or UTF-16 with its mark)")
    # an unset shell variable: a blank file name or word, never the built-in demo prompts or an empty comparison
    assert error("--prompts", "").startswith("--prompts : not found")
    assert error("--image-dir", "").startswith("--image-dir : folder not found")
    assert error("--pos-words", "Real", " ").startswith("--pos-words Real  : expected words that are not blank")
    assert error("--threshold", "70").startswith("--threshold 70.0: expected -20 to 20")
    (tmp_path / "a-file").write_text("")
    assert error("--output-dir", tmp_path / "a-file") == \
        f"--output-dir {tmp_path}/a-file: cannot write in it (File exists)"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert error("--batch-size", "3").startswith("--batch-size 3: must be a positive multiple of the 2 ranks")
    monkeypatch.delenv("WORLD_SIZE")
    (tmp_path / "prompts.txt").write_bytes("a cat\na caf\xe9 on a street\n".encode("latin-1"))
    assert error("--prompts", tmp_path / "prompts.txt") == (
        f"--prompts {tmp_path}/prompts.txt:2: not UTF-8 text (byte 0xe9; expected a .txt file with one prompt per "
        f"line, or a .json list of strings in UTF-8)")
    images = tmp_path / "images"
    images.mkdir()
    for name in "abc":
        Image.new("RGB", (40, 40), "red").save(images / f"{name}.png")
        (images / f"{name}.txt").write_text(f"photo {name}\n")
    (images / "b.txt").write_text(" \n")
    assert error("--image-dir", images) == f"--image-dir: {images}/b.txt is empty (expected the image's caption)"
    (images / "b.txt").write_bytes(b"a caf\xe9")
    assert error("--image-dir", images).startswith(f"--image-dir: {images}/b.txt:1: not UTF-8 text (byte 0xe9")
    (images / "b.txt").write_text("photo b")
    raw = (images / "c.png").read_bytes()  # the last image: found at the start, not at its step
    (images / "c.png").write_bytes(raw[:len(raw) // 2])
    assert error("--image-dir", images) == f"--image-dir: {images}/c.png: cannot read it as an image (OSError: " \
                                           f"image file is truncated)"
    (images / "c.png").write_bytes(raw)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the EXIF block is read at the start too
    Image.new("RGB", (40, 40), "red").save(images / "d.webp", exif=exif.tobytes())
    (images / "d.txt").write_text("photo d")
    raw = (images / "d.webp").read_bytes()
    tiff = b"MM\0*" if b"MM\0*" in raw else b"II*\0"  # the EXIF block's TIFF header, big- or little-endian
    (images / "d.webp").write_bytes(raw.replace(tiff, b"MM\0\x85", 1))  # broken
    assert error("--image-dir", images).startswith(f"--image-dir: {images}/d.webp: cannot read it as an image "
                                                   f"(SyntaxError: not a TIFF file")
    assert error("--lora_rank", "4") == "unrecognized arguments: --lora_rank 4 (--help lists the flags)"
    assert error("--reward", "hsp").startswith("argument --reward: invalid choice: 'hsp' (choose from 'hps', ")
    assert not out.exists()  # every check ran before the lock, the text cache, any model


def test_images_of_every_format_pil_reads_are_trained_and_other_files_named(tmp_path, capsys):
    from inputs import read_captioned_images
    for name, kind in (("a.bmp", "BMP"), ("b.tif", "TIFF"), ("c.png", "PNG")):
        Image.new("RGB", (40, 40), "red").save(tmp_path / name, kind)
        (tmp_path / name).with_suffix(".txt").write_text(f"photo {name}")
    (tmp_path / "notes.md").write_text("how these were made")
    captions, paths = read_captioned_images(str(tmp_path), 32)
    assert captions == ["photo a.bmp", "photo b.tif", "photo c.png"] and len(paths) == 3
    assert capsys.readouterr().out == f"--image-dir {tmp_path}: not images, skipped: notes.md\n"


def test_damaged_model_and_reward_files_and_conflicting_flags_are_one_line(tmp_path, capsys):
    from tiny import tiny_model_paths
    flux, clip = tiny_model_paths()
    (tmp_path / "p.txt").write_text("a cat\n")

    def error(*argv):
        return in_process_error(train.main, [*FAST, "--steps", "1", "--output-dir", tmp_path / "out", *argv], capsys)
    model = tmp_path / "flux"
    shutil.copytree(flux, model)
    weights = model / "transformer" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:3000])  # a download cut short: read under FSDP2, one tensor at a time
    real = ["--prompts", tmp_path / "p.txt", "--reward-path", clip]
    assert error("--model", model, *real).startswith(f"--model {model}: cannot load its transformer/ (")
    assert error("--model", model, *real, "--strategy", "ddp").startswith(f"--model {model}: cannot load its "
                                                                           f"transformer/ (")
    shutil.rmtree(model / "vae")
    assert error("--model", model, *real).startswith(f"--model {model}: cannot load its vae/ (")
    for index in ("{not json", "[1]", "{}"):
        (model / "model_index.json").write_text(index)
        assert error("--model", model, *real) == f"--model {model}: model_index.json names neither a FLUX nor a " \
                                                 f"Qwen-Image pipeline (expected _class_name FluxPipeline or " \
                                                 f"QwenImagePipeline)"
    torch.save({"state_dict": {}}, tmp_path / "hps.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "hps.pt").read_bytes()[:300])
    assert error("--reward-path", tmp_path / "cut.pt", "--clip-h", clip) == \
        f"{tmp_path}/cut.pt: not a readable torch checkpoint (RuntimeError; expected HPS_v2.1_compressed.pt)"
    assert error("--reward-path", tmp_path / "hps.pt").startswith(
        f"--reward-path {tmp_path}/hps.pt: an HPSv2.1 checkpoint needs --clip-h (the laion/CLIP-ViT-H-14")
    assert error("--reward-path", tmp_path / "hps.pt", "--clip-h", tmp_path / "nope").startswith(
        f"--clip-h {tmp_path}/nope: no config.json in it")
    assert error("--lora-rank", "4", "--lora-alpha", "0").startswith("--lora-alpha 0.0: expected a positive alpha")
    assert error("--lora-rank", "64") == "--lora-rank 64: expected at most 32, the smallest side of this --model's " \
                                         "adapted layers"  # the tiny model's width, not FLUX.1's 3072
    for flags in (["--strategy", "ddp"], ["--lora-rank", "4"]):  # a 4-bit base without adapters, or under FSDP2
        assert error("--quantize-base", "nf4", *flags).startswith("--quantize-base nf4: expected --lora-rank and "
                                                                   "--strategy ddp")
    images = tmp_path / "images"
    images.mkdir()
    assert error("--prompts", tmp_path / "p.txt", "--image-dir", images).startswith("--prompts and --image-dir:")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n')
    assert error("--prompts", tmp_path / "p.jsonl").startswith(f"--prompts {tmp_path}/p.jsonl: a .jsonl file")


def test_resume_refuses_what_cannot_continue_names_changed_flags_and_drops_cut_metrics(tmp_path, capsys):
    out = tmp_path / "out"
    train_here(*FAST, "--steps", "2", "--output-dir", out, "--lr", "1e-3", "--resume")  # nothing to resume yet: said
    said = capsys.readouterr()
    assert f"--resume: no checkpoint in {out} yet; starting at step 0\n" in said.out
    assert "loss " in said.err and "reward " in said.err  # the progress bar shows them (tqdm writes to stderr)

    def resume(*argv):
        return [*FAST, "--output-dir", out, "--resume", "--lr", "1e-3", *argv]
    assert in_process_error(train.main, resume("--steps", "1"), capsys) == \
        f"--steps 1: {out} already holds checkpoint-2; expected at least 2"
    assert in_process_error(train.main, resume("--steps", "3", "--lora-rank", "4"), capsys) == \
        f"--lora-rank 4: {out}/checkpoint-2 was trained with --lora-rank 0; resume with that"
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss"')  # a crash mid-line
    capsys.readouterr()
    train_here(*resume("--steps", "3", "--lr", "5e-4", "--output-dir", f"{out}/"))  # the same folder
    assert "resumed with changed flags: --lr 0.001 -> 0.0005\n" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]
    assert json.load(open(out / "args.json"))["lr"] == 5e-4
    # a checkpoint copied into another run's folder: compared with the flags that trained it, its own args.json
    shutil.copytree(out / "checkpoint-3", tmp_path / "copy" / "checkpoint-3")
    capsys.readouterr()
    train_here(*[*FAST, "--output-dir", tmp_path / "copy", "--resume", "--steps", "4", "--lr", "2e-4"])
    assert "resumed with changed flags: --lr 0.0005 -> 0.0002\n" in capsys.readouterr().out
    mode = lambda path: os.stat(path).st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "copy" / "checkpoint-4" / "diffusion_pytorch_model.safetensors") == \
        mode(tmp_path / "copy" / "args.json")  # safetensors' own is 0600: published files as readable as the rest
    assert in_process_error(train.main, resume("--steps", "4", "--output-dir", out / "checkpoint-3"), capsys) == \
        f"--output-dir {out}/checkpoint-3: a checkpoint, not a run's folder; expected --output-dir {out}"
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-9")  # by hand: it would resume at step 9
    assert in_process_error(train.main, resume("--steps", "10"), capsys).startswith(
        f"--resume: {out}/checkpoint-9 is broken (its manifest.json is checkpoint-2's: a copy, or renamed); the "
        f"newest intact one is checkpoint-3.")


def test_numbers_that_overflow_in_float32_or_a_seed_are_refused_before_anything_loads(tmp_path, capsys):
    def error(*argv):
        return in_process_error(train.main, [*FAST, "--output-dir", tmp_path / "out", *argv], capsys)
    assert error("--lr", "1e38").startswith("--lr 1e+38: expected")  # AdamW's first step is lr / (1 - beta1)
    assert error("--guidance", "1e40").startswith("--guidance 1e+40: expected")
    assert error("--rollout-guidance", "1e40").startswith("--rollout-guidance 1e+40: expected")
    assert error("--shift", "1e-320").startswith("--shift 1e-320: expected")
    assert error("--seed", str(2**64)).startswith(f"--seed {2**64}: expected")
    assert not (tmp_path / "out").exists()


def int_flags(script, *argv):
    """The flags script.parse_args(argv) declares with type=int, read off the parser it builds."""
    real = argparse.ArgumentParser.parse_args
    with mock.patch.object(argparse.ArgumentParser, "parse_args", autospec=True, side_effect=real) as parse:
        script.parse_args(list(argv))
    return [a.option_strings[0] for a in parse.call_args.args[0]._actions if a.type is int]


HUGE = 99999999999999999999999  # once a traceback: a C long overflowed in torch.linspace, a size in numpy
SCRIPTS = {train: [*FAST, "--steps", "1"], sample: ["--prompt", "a"], evaluate: ["a-folder"]}


@pytest.mark.parametrize("script, flag", [pytest.param(script, flag, id=f"{script.__name__} {flag}")
                                          for script, argv in SCRIPTS.items() for flag in int_flags(script, *argv)])
def test_a_huge_value_of_any_integer_flag_is_one_line_before_anything_loads(script, flag, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the scripts' default output folders would be
    assert in_process_error(script.main, [*SCRIPTS[script], flag, HUGE], capsys).startswith(f"{flag} {HUGE}: expected ")
    assert os.listdir(tmp_path) == []


def test_prompt_files_train_their_strings_in_train_py_and_sample_py(tmp_path):
    from inputs import read_prompts
    (tmp_path / "prompts.json").write_text(json.dumps(["a red car on a street", " a cat on a chair ", "  "], indent=2))
    (tmp_path / "bom.txt").write_bytes("\ufeffa red car on a street\r\na cat\r\n".encode())  # as Windows' Notepad
    assert read_prompts(str(tmp_path / "bom.txt")) == ["a red car on a street", "a cat"]
    text = "a caf\u00e9\nun chat\n"
    for raw in (text.encode("utf-16"), ("\ufeff" + text).encode("utf-16-be")):  # Notepad's "Unicode"; big-endian
        (tmp_path / "u16.txt").write_bytes(raw)
        assert read_prompts(str(tmp_path / "u16.txt")) == ["a caf\u00e9", "un chat"]
    # train.py: the caption of the first sample grid (rank 0 samples the first prompt) is the JSON's first string
    train_here(*FAST, "--steps", "1", "--sample-every", "1", "--prompts", tmp_path / "prompts.json", "--output-dir",
               tmp_path / "train")
    assert (tmp_path / "train" / "samples" / "step-000000.txt").read_text() == "a red car on a street\n"
    # sample.py: one image per string
    sample.main(["--prompts", str(tmp_path / "prompts.json"), "--output-dir", str(tmp_path / "sample"), "--height",
                 "32", "--width", "32", "--num-inference-steps", "1", "--max-sequence-length", "32"])
    assert [json.loads(line)["prompt"] for line in open(tmp_path / "sample" / "prompts.jsonl")] == [
        "a red car on a street", "a cat on a chair"]


def png16(path, pixels, color_type):
    """A 16-bit PNG written byte by byte (PIL writes 16-bit gray only): color type 0 gray, 2 RGB."""
    h, w = pixels.shape[:2]
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data)))
    scanlines = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(scanlines)) + chunk(b"IEND", b""))


def test_16_bit_pngs_are_scaled_by_their_real_range(tmp_path):
    gray = np.random.default_rng(0).integers(0, 65536, (32, 32))
    gray[0, 0], gray[0, 1] = 0, 65535
    png16(tmp_path / "gray.png", gray, 0)
    expected = ((gray + 128) // 257).astype(np.uint8)  # 65535 = 255 * 257: x / 257 rounded, in integers (no ties)
    assert np.array_equal(load_image(tmp_path / "gray.png", 32).numpy(), np.stack([expected] * 3, -1))
    dark = gray // 256  # a dark 16-bit image stays dark, not stretched to 8 bits' range
    png16(tmp_path / "dark.png", dark, 0)
    assert load_image(tmp_path / "dark.png", 32).numpy().max() <= 1
    rgb = np.random.default_rng(1).integers(0, 65536, (32, 32, 3))
    png16(tmp_path / "rgb.png", rgb, 2)
    got = load_image(tmp_path / "rgb.png", 32).numpy().astype(int)
    assert np.abs(got - rgb * 255 / 65535).max() <= 1  # PIL keeps the high byte: within one level


# ---------------------------------------------------------------- sample.py and evaluate.py

def test_bad_input_to_sample_py_and_evaluate_py_is_one_line_before_anything_loads(tmp_path, capsys):
    out = tmp_path / "out"

    def error(*argv):
        return in_process_error(sample.main, ["--prompt", "a cat", "--output-dir", out, *argv], capsys)
    assert error("--height", "0").startswith("--height 0: expected a multiple of 16 from 16 to 4096")
    assert error("--width", "-16").startswith("--width -16: expected a multiple of 16 from 16 to 4096")
    assert error("--num-inference-steps", "0").startswith("--num-inference-steps 0: expected 1 to 1000 Euler steps")
    assert error("--max-sequence-length", "0") == \
        "--max-sequence-length 0: expected 1 to 1024 text tokens (QwenImagePipeline's limit; FluxPipeline's is 512)"
    assert error("--max-sequence-length", "513") == "--max-sequence-length 513: expected 1 to 512, FluxPipeline's limit"
    assert error("--guidance-scale", "nan") == "--guidance-scale nan: expected a guidance (FLUX) or true-CFG scale " \
                                               "(Qwen-Image) from 0 to 100"
    assert error("--seed", "-1").startswith("--seed -1: expected 0 to 2**63 - 1")
    (tmp_path / "prompts.txt").write_bytes(b"a cat\n\xff\n")
    assert in_process_error(sample.main, ["--prompts", tmp_path / "prompts.txt", "--output-dir", out], capsys) == (
        f"--prompts {tmp_path}/prompts.txt:2: not UTF-8 text (byte 0xff; expected a .txt file with one prompt per "
        f"line, or a .json list of strings in UTF-8)")
    assert not out.exists()
    (tmp_path / "prompts.jsonl").write_bytes(b'{"file": "00000.png", "prompt": "a cat"}\n{"file": "00001.png", '
                                             b'"prompt": "a caf\xe9"}\n')
    assert in_process_error(evaluate.main, [tmp_path], capsys) == (
        f"{tmp_path}/prompts.jsonl:2: not UTF-8 text (byte 0xe9; expected what sample.py writes in UTF-8)")
    assert in_process_error(evaluate.main, [tmp_path, "--batch-size", "0"], capsys) == (
        "--batch-size 0: expected 1 to 1024 images per reward forward")


def test_non_utf8_prompts_from_the_command_line_are_one_line_without_traceback(tmp_path):
    (tmp_path / "prompts.txt").write_bytes(b"a cat\n\xff\n")
    # as on a machine with requirements.txt only: no torchvision (transformers then warned at every start)
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.util\nfind = importlib.util.find_spec\nimportlib.util.find_spec = lambda name, *a, **k: "
        "None if name.split('.')[0] == 'torchvision' else find(name, *a, **k)\n")
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}"}
    runs = [launch(*FAST, "--prompts", tmp_path / "prompts.txt", "--output-dir", tmp_path / "train", env=env),
            launch("--prompts", tmp_path / "prompts.txt", "--output-dir", tmp_path / "sample", script="sample.py",
                   env=env)]
    for p in runs:  # both at once: most of their time is importing torch
        code, output = finish(p)
        assert code == 2 and "Traceback" not in output
        assert output.strip() == f"error: --prompts {tmp_path}/prompts.txt:2: not UTF-8 text (byte 0xff; expected " \
                                 f"a .txt file with one prompt per line, or a .json list of strings in UTF-8)"


def test_a_full_disk_while_sample_py_writes_an_image_names_the_image(tmp_path, capsys):
    """PIL's write errors carry no file name: without sample.py's, run_command's line would say "a file"."""
    from inputs import run_command

    def full(*args, **kwargs):  # as PIL's write to a full disk fails
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    out = tmp_path / "out"
    with mock.patch.object(Image.Image, "save", full), mock.patch.object(os, "_exit", side_effect=SystemExit), \
            mock.patch.object(signal, "signal"):  # this test process keeps its own handlers
        with pytest.raises(SystemExit):
            run_command(lambda: sample.main(["--prompt", "a cat", "--output-dir", str(out)]), "")
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"error: {out}/00000.png: No space left on device: the disk is full: free space on it, or write to another disk"


def test_damaged_text_cache_entries_are_computed_again_with_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    train_here(*FAST, "--steps", "1", "--output-dir", out)
    entries = sorted((out / "text_cache").iterdir())
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # cut short: a full disk, a copy stopped halfway
    data = bytearray(entries[1].read_bytes())
    data[-1] ^= 1  # one bit of a tensor flipped, the header intact: a disk
    entries[1].write_bytes(data)
    capsys.readouterr()
    train_here(*FAST, "--steps", "2", "--output-dir", out, "--resume")
    assert f"{out}/text_cache: 2 damaged text embeddings computed again\n" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]
