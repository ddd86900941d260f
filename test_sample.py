"""Tests of sample.py and evaluate.py on the tiny random models: images against FluxPipeline called directly,
1 rank against 2, scores against CLIPModel's own forward, the paired statistics against hand computation,
and every bad input's one-line message. CPU only. Run: python -m pytest -q test_sample.py"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import sample

PROMPTS = ["a red cat on a chair", "the sea at night — un café", "an old man with a dog"]  # non-Latin-1 too
H, W, STEPS, MAX_LEN, SEED = 32, 48, 2, 32, 7  # not square, so a height/width swap shows
ARGS = ["--height", str(H), "--width", str(W), "--num-inference-steps", str(STEPS), "--max-sequence-length",
        str(MAX_LEN), "--seed", str(SEED)]
HERE = os.path.dirname(os.path.abspath(__file__))


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def start(script, *args):
    """Start a script as a user would."""
    return subprocess.Popen([sys.executable, script, *args], cwd=HERE, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(flux_dir, clip_dir), built once; sample.py and evaluate.py find them through $SRPO_TINY_DIR."""
    from tiny import tiny_model_paths
    old = os.environ.get("SRPO_TINY_DIR")
    os.environ["SRPO_TINY_DIR"] = old or str(tmp_path_factory.mktemp("tiny"))
    yield tiny_model_paths()
    if old is None:
        del os.environ["SRPO_TINY_DIR"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")  # a trailing blank line is no prompt
    return str(path)


@pytest.fixture(scope="module")
def samples(tiny, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples")
    sample.main(["--prompts", prompts_file, "--output-dir", str(out), *ARGS])
    return out


@pytest.fixture(scope="module")
def weights(tiny, tmp_path_factory):
    """A checkpoint folder as train.py writes it: the tiny transformer, perturbed, stored bf16."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file
    state = FluxTransformer2DModel.from_pretrained(os.path.join(tiny[0], "transformer")).state_dict()
    g = torch.Generator().manual_seed(1)
    state = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in state.items()}
    folder = tmp_path_factory.mktemp("run") / "checkpoint-1"
    folder.mkdir()
    save_file(state, str(folder / sample.WEIGHTS_NAME))
    return folder


@pytest.fixture(scope="module")
def compare(tiny, prompts_file, weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    sample.main(["--prompts", prompts_file, "--output-dir", str(out), "--weights", str(weights), "--compare",
                 *ARGS])
    return out


@pytest.fixture(scope="module")
def lora(tiny, tmp_path_factory):
    """A LoRA as train.py --lora-rank writes it: rank-4 adapters on the tiny transformer, B made non-zero."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft.utils import get_peft_model_state_dict
    from flux import add_lora
    transformer = add_lora(FluxTransformer2DModel.from_pretrained(os.path.join(tiny[0], "transformer")), 4, 8.0,
                           torch.float32, seed=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("lora") / "checkpoint-1"
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                   transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    return folder


def test_lora_images_equal_flux_pipeline_with_load_lora_weights(tiny, lora, prompts_file, tmp_path):
    from diffusers import FluxPipeline
    sample.main(["--prompts", prompts_file, "--output-dir", str(tmp_path), "--lora", str(lora), "--compare", *ARGS])
    pipe = FluxPipeline.from_pretrained(tiny[0])
    pipe.load_lora_weights(str(lora / sample.LORA_NAME))
    # exact: sample.py makes this very call (load_lora_weights, then pipe with these arguments and generator),
    # on the same CPU and threads, so the pixels are the same computation, not two code paths
    for i, p in enumerate(PROMPTS):
        expected = np.asarray(pipe(p, height=H, width=W, num_inference_steps=STEPS, guidance_scale=3.5,
                                   max_sequence_length=MAX_LEN, generator=torch.Generator().manual_seed(SEED + i)
                                   ).images[0])
        assert np.array_equal(pixels(tmp_path / "srpo" / f"{i:05d}.png"), expected), i
        assert not np.array_equal(pixels(tmp_path / "base" / f"{i:05d}.png"), expected), i  # the LoRA changed it


def test_nf4_lora_images_equal_diffusers_own_4_bit_pipeline(tiny, lora, prompts_file, tmp_path):
    """sample.py --quantize-base nf4 against diffusers' own path to a 4-bit FLUX: from_pretrained with
    BitsAndBytesConfig (nf4, double quantization), then load_lora_weights. That loader refuses to start without a
    GPU (an environment check: bitsandbytes itself quantizes and computes on a CPU), so it is told there is one."""
    from unittest import mock
    from diffusers import BitsAndBytesConfig, FluxPipeline, FluxTransformer2DModel
    sample.main(["--prompts", prompts_file, "--output-dir", str(tmp_path), "--lora", str(lora), "--compare",
                 "--quantize-base", "nf4", *ARGS])
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    with mock.patch.object(torch.cuda, "is_available", lambda: True):
        transformer = FluxTransformer2DModel.from_pretrained(tiny[0], subfolder="transformer", dtype=torch.float32,
                                                             quantization_config=config, device_map="cpu")
    for m in transformer.modules():  # the fp32 math on every CPU, as flux.quantize_nf4 sets it (see its comment)
        m.support_avx512bf16_for_cpu = False
    pipe = FluxPipeline.from_pretrained(tiny[0], transformer=transformer)
    images = {}
    for name, path in (("base", None), ("srpo", lora / sample.LORA_NAME)):
        if path:
            pipe.load_lora_weights(str(path))
        for i, p in enumerate(PROMPTS):
            images[name, i] = np.asarray(pipe(p, height=H, width=W, num_inference_steps=STEPS, guidance_scale=3.5,
                                              max_sequence_length=MAX_LEN,
                                              generator=torch.Generator().manual_seed(SEED + i)).images[0])
            # the same 4-bit weights (both quantize the fp32 file with bitsandbytes' defaults) in the same fp32 math
            assert np.array_equal(pixels(tmp_path / name / f"{i:05d}.png"), images[name, i]), (name, i)
    assert all(not np.array_equal(images["base", i], images["srpo", i]) for i in range(len(PROMPTS)))


def test_lora_that_is_not_a_flux_lora_of_the_model_is_one_line(tiny, weights, lora, tmp_path, capsys):
    def error(*argv):
        return one_line_error(sample.main, [*ARGS, "--prompt", "a", "--output-dir", str(tmp_path / "out"), *argv],
                              capsys)
    assert "is no LoRA weight of a linear layer" in error("--lora", str(weights / sample.WEIGHTS_NAME))
    from safetensors.torch import load_file, save_file
    state = load_file(lora / sample.LORA_NAME)
    key = next(k for k in state if ".lora_A." in k)
    save_file({**state, key: torch.zeros(4, 7)}, tmp_path / "narrow.safetensors")
    assert f"{key} is (4, 7), which does not fit" in error("--lora", str(tmp_path / "narrow.safetensors"))
    assert error("--lora", str(lora), "--weights", str(weights)).startswith("--weights and --lora: expected one")
    # the folder meant is named: the other flag for what a checkpoint holds, a checkpoint for a run's folder
    assert error("--lora", str(weights)) == f"--lora {weights}: it holds {sample.WEIGHTS_NAME}; expected --weights " \
                                            f"{weights}"
    assert error("--weights", str(lora)) == f"--weights {lora}: it holds {sample.LORA_NAME}; expected --lora {lora}"
    for step in (2, 10):  # the newest by number, not by name
        shutil.copytree(lora, tmp_path / "run" / f"checkpoint-{step}")
    assert error("--lora", str(tmp_path / "run")) == (f"--lora {tmp_path}/run: a run's folder; expected one of its "
                                                     f"checkpoints, --lora {tmp_path}/run/checkpoint-10 (its newest)")
    assert not (tmp_path / "out").exists()


def flux_images(flux_dir, weights=None):
    """The pictures of FluxPipeline called directly: prompt i, a generator seeded SEED + i, the same arguments.
    These are the calls sample.py makes, in this process, so its PNGs must equal them bit for bit."""
    from diffusers import FluxPipeline
    from safetensors.torch import load_file
    pipe = FluxPipeline.from_pretrained(flux_dir)
    if weights:
        pipe.transformer.load_state_dict(load_file(weights))
    return [np.asarray(pipe(p, height=H, width=W, num_inference_steps=STEPS, guidance_scale=3.5,
                            max_sequence_length=MAX_LEN,
                            generator=torch.Generator().manual_seed(SEED + i)).images[0])
            for i, p in enumerate(PROMPTS)]


# ---------------------------------------------------------------- sample.py

def test_images_are_bit_identical_to_flux_pipeline(tiny, samples):
    for i, expected in enumerate(flux_images(tiny[0])):
        got = pixels(samples / f"{i:05d}.png")
        assert got.shape == (H, W, 3) and np.array_equal(got, expected), i


def test_png_text_and_prompts_jsonl_record_each_image(tiny, samples):
    records = [json.loads(line) for line in (samples / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["file"] for r in records] == ["00000.png", "00001.png", "00002.png"]
    for i, r in enumerate(records):
        assert r == dict(file=f"{i:05d}.png", prompt=PROMPTS[i], seed=SEED + i, height=H, width=W,
                         num_inference_steps=STEPS, guidance_scale=3.5, max_sequence_length=MAX_LEN, model=tiny[0],
                         weights=None, lora=None)
        assert Image.open(samples / r["file"]).text == {k: str(v) for k, v in r.items()}
    assert Image.open(samples / "contact_sheet.png").size == (3 * W, H)


def test_two_ranks_make_the_same_images_as_one(tiny, samples, prompts_file, tmp_path):
    out = tmp_path / "two"
    # as many threads per rank as this process uses, so only the split of the prompts differs between the runs
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "sample.py", "--prompts", prompts_file, "--output-dir", str(out), *ARGS],
                       capture_output=True, text=True, env=env, cwd=HERE, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "3 images rendered, 0 already there" in p.stdout  # summed over the ranks: each image made once
    for name in ("00000.png", "00001.png", "00002.png", "contact_sheet.png"):
        assert np.array_equal(pixels(out / name), pixels(samples / name)), name
    assert (out / "prompts.jsonl").read_text() == (samples / "prompts.jsonl").read_text()


def test_rerun_skips_existing_images_and_redoes_missing_ones(samples, prompts_file, tmp_path, capsys):
    out = shutil.copytree(samples, tmp_path / "samples")  # the fixture's folder stays whole for the other tests
    before = {name: os.stat(out / name).st_mtime_ns for name in ("00000.png", "00002.png")}
    os.remove(out / "00001.png")
    (out / "00001.png.tmp").write_bytes(b"half an image from a killed job")
    capsys.readouterr()
    sample.main(["--prompts", prompts_file, "--output-dir", str(out), *ARGS])
    assert "1 images rendered, 2 already there" in capsys.readouterr().out
    assert {name: os.stat(out / name).st_mtime_ns for name in before} == before
    assert np.array_equal(pixels(out / "00001.png"), pixels(samples / "00001.png"))
    assert not (out / "00001.png.tmp").exists()


def test_a_rerun_after_the_weights_file_changed_in_place_is_refused_and_nan_weights_never_render(
        tiny, weights, prompts_file, tmp_path, capsys):
    """The finished-image check covers the weights' content, not only their path; non-finite weights are refused
    before any image (they would render black ones that a rerun then keeps)."""
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "run"
    shutil.copytree(weights, folder)
    argv = ["--prompt", "a cat", "--weights", str(folder), "--output-dir", str(tmp_path / "out"), *ARGS]
    sample.main(argv)
    state = load_file(folder / sample.WEIGHTS_NAME)
    key = next(iter(state))
    state[key] = state[key] * 1.5  # a later checkpoint written over the same file
    save_file(state, folder / sample.WEIGHTS_NAME)
    assert one_line_error(sample.main, argv, capsys).startswith(
        f"{tmp_path}/out/00000.png: already made with weights_sha256=")
    state[key][0] = float("nan")
    save_file(state, folder / sample.WEIGHTS_NAME)
    assert one_line_error(sample.main, [*argv[:-len(ARGS) - 1], str(tmp_path / "new"), *ARGS], capsys) == (
        f"--weights {folder}/{sample.WEIGHTS_NAME}: {key} has non-finite values (a run that diverged?); expected "
        f"finite weights")
    assert not list((tmp_path / "new").glob("*.png"))


def test_a_second_sample_py_on_a_folder_in_use_is_refused(tiny, tmp_path, capsys):
    """Two runs on one folder would write each other's images: the second is one line (the first holds the lock
    that checkpoint.py's runs hold, for its whole life)."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, checkpoint; checkpoint.lock(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(60)", str(tmp_path / "out")], cwd=HERE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        message = one_line_error(sample.main, ["--prompt", "a", "--output-dir", str(tmp_path / "out"), *ARGS], capsys)
        assert message.startswith(f"--output-dir {tmp_path}/out: in use by another run (pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()


def test_compare_renders_base_and_srpo_with_the_same_seeds_side_by_side(tiny, samples, weights, compare):
    srpo = flux_images(tiny[0], weights / sample.WEIGHTS_NAME)
    grid = pixels(compare / "compare.png")
    assert grid.shape == (len(PROMPTS) * H, 2 * W, 3)
    for i in range(len(PROMPTS)):
        base = pixels(compare / "base" / f"{i:05d}.png")
        assert np.array_equal(base, pixels(samples / f"{i:05d}.png"))  # the base pass is the plain run
        assert np.array_equal(pixels(compare / "srpo" / f"{i:05d}.png"), srpo[i])
        assert not np.array_equal(srpo[i], base)
        assert np.array_equal(grid[i * H:(i + 1) * H, :W], base)
        assert np.array_equal(grid[i * H:(i + 1) * H, W:], srpo[i])
    weights_used = {json.loads(line)["weights"] for line in (compare / "srpo" / "prompts.jsonl").open()}
    assert weights_used == {str(weights / sample.WEIGHTS_NAME)}


# ---------------------------------------------------------------- evaluate.py

def reference_scores(clip_dir, folder):
    """cos(f_img, f_txt) of each image of folder with its prompt, and exp(logit_scale), through CLIPModel's own
    forward, with torchvision's loading and preprocessing."""
    from torchvision import transforms as T
    from torchvision.transforms.functional import pil_to_tensor
    from transformers import AutoTokenizer, CLIPModel
    model, tokenizer = CLIPModel.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(clip_dir)
    size = model.config.vision_config.image_size
    prep = T.Compose([T.Resize(size, T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(size),
                      T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    images = torch.stack([prep(pil_to_tensor(Image.open(folder / f"{i:05d}.png")) / 255.0)
                          for i in range(len(PROMPTS))])
    tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=images)
        scale = model.logit_scale.exp()
        return (out.logits_per_image / scale).diagonal(), scale


def test_scores_equal_clip_forward_and_pairs_are_by_file(tiny, compare, tmp_path):
    base, srpo = compare / "base", compare / "srpo"
    out = tmp_path / "new" / "scores.json"  # its folder is made before the scoring
    evaluate.main([str(base), str(srpo), "--reward", "hps", "pickscore", "clip", "--reward-path", *[tiny[1]] * 3,
                   "--json", str(out)])
    result = json.loads(out.read_text())
    # Two code paths (srpo_reward against CLIPModel's forward) over unit embeddings: a score's fp32 rounding is
    # relative to |f_img| |f_txt| = 1 times the kind's factor, not to the cosine, which may be near 0. tol is 1e-5
    # of that (measured ~1e-8); another image's or prompt's score is off by ~1e-2 of it.
    expected, tol = {}, {}
    for folder in (base, srpo):
        cos, scale = reference_scores(tiny[1], folder)
        for kind, factor in (("hps", 1.0), ("pickscore", scale), ("clip", 1.0)):
            expected[kind, str(folder)], tol[kind] = cos * factor, 1e-5 * float(factor)
    for kind, folder in expected:
        got = torch.tensor([r["score"] for r in result["per_image"]
                            if (r["reward"], r["folder"]) == (kind, folder)])
        assert torch.allclose(got, expected[kind, folder], rtol=0, atol=tol[kind]), kind
        s = [s for s in result["summary"] if (s["reward"], s["folder"]) == (kind, folder)]
        # got holds evaluate's own fp32 scores: its mean is the same fp32 reduction; its std is evaluate's fp32 one
        # against float64 here, apart by fp32 rounding of the values' size (~6e-8 of it), so 1e-5 of that size
        size = got.abs().max().item()
        assert s[0]["n"] == 3 and s[0]["mean"] == pytest.approx(got.mean().item(), abs=1e-5 * size)
        assert s[0]["std"] == pytest.approx(got.double().std(correction=0).item(), abs=1e-5 * size)
    for p in result["paired"]:
        d = expected[p["reward"], str(srpo)] - expected[p["reward"], str(base)]
        # a difference of two scores, each within tol of the reference
        assert p["n"] == 3 and p["mean_diff"] == pytest.approx(d.mean().item(), abs=2 * tol[p["reward"]])
        assert p["win_rate"] == pytest.approx((d > 0).float().mean().item())
        assert p["ci95"][0] <= p["mean_diff"] <= p["ci95"][1]
    assert result["reward_paths"]["hps"]["path"] == tiny[1]
    # The same numbers through srpo_reward.load_reward when the path is given.
    evaluate.main([str(base), "--reward", "clip", "pickscore", "--reward-path", tiny[1], tiny[1],
                   "--json", str(out)])
    for r in json.loads(out.read_text())["per_image"]:
        assert r["score"] == pytest.approx(expected[r["reward"], str(base)][int(r["file"][:5])].item(),
                                           abs=tol[r["reward"]])


def test_evaluate_refuses_swapped_images_and_names_unequal_folders(tiny, compare, tmp_path, capsys):
    base, srpo = (shutil.copytree(compare / name, tmp_path / name) for name in ("base", "srpo"))
    os.replace(base / "00000.png", tmp_path / "x.png")  # two images swapped: each scored with the other's prompt
    os.replace(base / "00001.png", base / "00000.png")
    os.replace(tmp_path / "x.png", base / "00001.png")
    assert one_line_error(evaluate.main, [str(base)], capsys) == (
        f"{base}/00000.png: made with prompt {PROMPTS[1]!r}, its prompts.jsonl line says {PROMPTS[0]!r} (a file "
        f"renamed or swapped?); expected sample.py's folder as it wrote it")
    shutil.rmtree(base)
    shutil.copytree(compare / "base", base)
    lines = (srpo / "prompts.jsonl").read_text().splitlines()
    (srpo / "prompts.jsonl").write_text("\n".join(lines[:2]) + "\n")  # a run cut short: 2 of the 3 prompts
    capsys.readouterr()
    evaluate.main([str(base), str(srpo), "--reward", "clip"])
    assert f"note: {base} has 3 images, {srpo} 2; each folder's mean is over its own, the paired numbers over the 2 " \
           f"in both\n" in capsys.readouterr().out


def test_paired_stats_on_hand_made_numbers():
    win_rate, mean_diff, _ = evaluate.paired_stats([1.0, -1.0, 2.0, 0.0])
    assert win_rate == 0.625 and mean_diff == 0.5  # (2 wins + half a tie) / 4
    assert evaluate.paired_stats([0.3] * 5)[2] == pytest.approx((0.3, 0.3))  # no spread, no interval
    # d = (0, 1): a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the 2.5% and 97.5%
    # percentiles are exactly 0 and 1.
    assert evaluate.paired_stats([0.0, 1.0]) == (0.75, 0.5, (0.0, 1.0))  # win rate: (1 win + half a tie) / 2
    # Many normal differences: the interval is mean +- 1.96 sd / sqrt(n), to within Monte Carlo error.
    d = 1 + torch.randn(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, mean_diff, (lo, hi) = evaluate.paired_stats(d)
    half = 1.96 * d.std().item() / 20
    assert lo == pytest.approx(mean_diff - half, abs=0.1 * half)
    assert hi == pytest.approx(mean_diff + half, abs=0.1 * half)
    # the resamples come from a generator of their own: the global RNG's state does not move the interval, the seed does
    torch.manual_seed(1)
    first = evaluate.paired_stats(d)
    torch.manual_seed(2)
    assert evaluate.paired_stats(d) == first and evaluate.paired_stats(d, seed=1)[2] != first[2]


# ---------------------------------------------------------------- bad input: one line naming the flag or file

def one_line_error(main, argv, capsys):
    """The message of `error: ...`, the last line main printed (after any loading bars) before it exited with 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.rstrip("\n").split("\n")
    assert e.value.code == 2 and err[-1].startswith("error: ") and sum("error" in x for x in err) == 1, err
    return err[-1][len("error: "):]


def test_sample_bad_inputs_give_one_line_errors(tiny, samples, weights, prompts_file, tmp_path, capsys):
    def error(*argv):  # argv after ARGS, so it may override them
        return one_line_error(sample.main, [*ARGS, *argv], capsys)
    out = ["--output-dir", str(tmp_path / "out")]
    assert error("--prompt", " ", *out) == "--prompt ' ': expected a prompt that is not blank"
    assert error("--prompts", str(tmp_path / "nope.txt"), *out).startswith(
        f"--prompts {tmp_path}/nope.txt: not found")
    (tmp_path / "dict.json").write_text('{"a": "a cat"}')
    assert "expected a JSON list of strings" in error("--prompts", str(tmp_path / "dict.json"), *out)
    (tmp_path / "broken.json").write_text('["a cat"')
    assert "not valid JSON" in error("--prompts", str(tmp_path / "broken.json"), *out)
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "no prompts in it" in error("--prompts", str(tmp_path / "empty.txt"), *out)
    assert error("--prompt", "a cat", "--compare", *out).startswith("--compare: needs --weights")
    assert error("--prompt", "a", "--weights", str(weights), "--quantize-base", "nf4", *out).startswith(
        "--weights and --quantize-base nf4: expected --lora")
    assert error("--prompt", "a cat", "--model", str(tmp_path), *out) == \
        f"--model {tmp_path}: not a diffusers pipeline folder (no model_index.json)"
    assert error("--prompt", "a cat", "--height", "40", *out).startswith("--height 40: expected a multiple of 16")
    assert error("--prompt", "a", "--weights", str(tmp_path), *out) == (
        f"--weights {tmp_path}/{sample.WEIGHTS_NAME}: not found (expected {sample.WEIGHTS_NAME} or a folder "
        "holding it)")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    assert "not a safetensors file" in error("--prompt", "a", "--weights", str(tmp_path / "junk.safetensors"), *out)
    from safetensors.torch import load_file, save_file
    state = load_file(str(weights / sample.WEIGHTS_NAME))
    key = sorted(state)[0]
    for change, expected in ((lambda s: s.pop(key), f"{key} is missing, expected"),
                             (lambda s: s.update({key: s[key][:1]}),
                              f"{key} is {tuple(state[key][:1].shape)}, expected {tuple(state[key].shape)}"),
                             (lambda s: s.update({"extra.weight": torch.zeros(2)}), "extra.weight is not a key"),
                             (lambda s: s.update({key: (100 * s[key]).to(torch.int8)}),  # would be cast silently
                              f"{key} is I8 (expected floating-point weights)")):
        bad = dict(state)
        change(bad)
        save_file(bad, str(tmp_path / "bad.safetensors"))
        msg = error("--prompt", "a", "--weights", str(tmp_path / "bad.safetensors"), *out)
        assert msg.startswith(f"--weights {tmp_path}/bad.safetensors: {expected}"), msg
    assert not (tmp_path / "out").exists()  # every check ran before any image was made
    msg = error("--prompts", prompts_file, "--output-dir", str(samples), "--seed", "8")
    assert msg == f"{samples}/00000.png: already made with seed='7', this run has 8; use another --output-dir " \
                  "for other settings"
    shutil.copytree(samples, tmp_path / "cut")
    png = tmp_path / "cut" / "00001.png"
    png.write_bytes(png.read_bytes()[:len(png.read_bytes()) // 2])  # damaged after it was made: a disk, a copy
    assert error("--prompts", prompts_file, "--output-dir", str(tmp_path / "cut")).startswith(
        f"{png}: cannot read it as an image (")


def test_evaluate_bad_inputs_give_one_line_errors(tiny, samples, compare, tmp_path, capsys):
    def error(*argv):
        return one_line_error(evaluate.main, list(argv), capsys)
    assert error(str(tmp_path)) == (f"{tmp_path}/prompts.jsonl: not found (expected the prompts.jsonl that "
                                    f"sample.py writes beside its images)")
    (tmp_path / "prompts.jsonl").write_text('{"file": "00000.png", "prompt": "a cat"}\n["not", "an object"]\n')
    assert error(str(tmp_path)) == f"{tmp_path}/prompts.jsonl:2: expected a JSON object with 'file' and 'prompt'"
    (tmp_path / "prompts.jsonl").write_text('{"file": "00000.png", "prompt": "a cat"}\n')
    (tmp_path / "00000.png").write_bytes(b"\x89PNG but cut short")
    assert error(str(tmp_path)).startswith(f"{tmp_path}/00000.png: cannot open as an image")
    assert error(str(samples), "--reward", "hps", "--reward-path", str(tmp_path / "HPS_v2.1_compressed.pt")) == \
        f"--reward-path for hps: {tmp_path}/HPS_v2.1_compressed.pt: not found (expected HPS_v2.1_compressed.pt, " \
        "the HPSv2.1 checkpoint)"
    torch.save({"state_dict": {}}, tmp_path / "hps.pt")
    assert error(str(samples), "--reward-path", str(tmp_path / "hps.pt")).startswith(
        f"--reward-path {tmp_path}/hps.pt: an HPSv2.1 checkpoint needs --clip-h")
    assert error(str(samples), "--json", str(tmp_path)) == \
        f"--json {tmp_path}: a folder (expected a file name to write the numbers to)"
    assert error(str(samples), "--reward", "hps", "clip", "--reward-path", tiny[1]).startswith(
        "--reward-path: got 1 for --reward hps clip; expected one per --reward in the same order")
    assert error(str(samples), "--reward", "clip", "clip") == "--reward clip clip: each reward at most once"
    assert error(str(samples), "--reward", "hps", "clip") == ("--reward hps clip without --reward-path: each would be "
                                                              "the tiny random CLIP; expected a --reward-path for "
                                                              "each, or one --reward")
    assert error(str(compare)) == f"{compare}: a sample.py --compare folder; expected its two folders, " \
                                  f"{compare}/base {compare}/srpo"
    (tmp_path / "prompts.jsonl").write_text('{"file": "99999.png", "prompt": "a cat"}\n')
    assert error(str(samples), str(tmp_path)).startswith(f"{samples} and {tmp_path}: no image file name in both")
    (tmp_path / "prompts.jsonl").write_text('{"file": "00000.png", "prompt": "a dog"}\n')
    assert error(str(samples), str(tmp_path)).startswith(f"00000.png: its prompt differs between {samples} and")
    records = [json.loads(line) for line in open(samples / "prompts.jsonl")]
    (tmp_path / "prompts.jsonl").write_text(json.dumps(dict(records[0], height=128)) + "\n")
    assert error(str(samples), str(tmp_path)).startswith(f"00000.png: its height differs between {samples} and")
    shutil.copytree(samples, tmp_path / "mixed")
    Image.new("RGB", (32, 32)).save(tmp_path / "mixed" / records[-1]["file"])  # not in the first batch of 1
    assert error(str(tmp_path / "mixed"), "--batch-size", "1") == \
        f"{tmp_path}/mixed: images of different sizes; expected one sample.py run"
    assert error(str(samples), str(samples), str(samples)).startswith("DIR: got 3 folders")


def test_evaluate_py_prints_its_table_and_nothing_else_without_torchvision(tiny, samples, tmp_path):
    """As on a machine with requirements.txt only: no torchvision, bitsandbytes without its optional kernels. Their
    notes at import (transformers' fallback to PIL, bitsandbytes' missing kernel) have nothing for a user to act on."""
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.util\nfind = importlib.util.find_spec\nimportlib.util.find_spec = lambda name, *a, **k: "
        "None if name.split('.')[0] == 'torchvision' else find(name, *a, **k)\n")
    done = subprocess.run([sys.executable, "evaluate.py", str(samples), "--reward", "clip"], cwd=HERE, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": f"{tmp_path}:{HERE}"}, timeout=300)
    notes = [line for line in done.stderr.replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith("Loading weights")]  # transformers' own progress bar stays
    assert done.returncode == 0 and notes == [], done.stderr
    assert done.stdout.splitlines()[1].startswith(f"{samples}  mean")


def test_errors_from_the_command_line_are_one_line_without_traceback(tiny, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    procs = [start("sample.py", "--prompt", "a cat", "--weights", str(tmp_path / "junk.safetensors"),
                   "--output-dir", str(tmp_path / "out"), *ARGS),
             start("evaluate.py", str(tmp_path))]  # both at once: most of their time is importing torch
    for p, expected in zip(procs, (f"--weights {tmp_path}/junk.safetensors: not a safetensors file",
                                   f"{tmp_path}/prompts.jsonl: not found")):
        _, stderr = p.communicate(timeout=300)
        assert p.returncode == 2 and "Traceback" not in stderr
        assert stderr.strip().splitlines()[-1].startswith("error: " + expected), stderr
