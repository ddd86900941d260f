"""Tests of qwen.py against diffusers' QwenImagePipeline itself: its prompt encoding, its latents, its denoising loop
(with and without true CFG), its decode; the meta-device build against from_pretrained. CPU, fp32, the tiny random
Qwen-Image of tiny.py. Run: python -m pytest -q test_qwen.py"""
import math
import os
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

import flux
import qwen
from direct_align import sigma_schedule

os.environ.setdefault("SRPO_TINY_DIR", tempfile.mkdtemp(prefix="srpo-tiny-"))
torch.set_num_threads(2)
CPU = torch.device("cpu")
MAX_LEN = 32  # text tokens kept (the pipeline allows up to 1024)
# 42 tokens: longer than the template's 34-token prefix, and, with the template's 5 closing tokens, cut to MAX_LEN
LONG = ("a photo of an old man with a big black dog sitting on a chair near the window in the city at night, "
        "red blue green yellow white cloud sun moon water field road table tree flower forest mountain lake sea")
PROMPTS = ["a red cat", "", LONG]


@pytest.fixture(scope="module")
def tiny():
    """The tiny Qwen-Image folder and its QwenImagePipeline, fp32."""
    from diffusers import QwenImagePipeline
    from tiny import tiny_qwen_path
    path = tiny_qwen_path()
    pipe = QwenImagePipeline.from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return path, pipe


@pytest.fixture(scope="module")
def embeds(tiny, tmp_path_factory):
    return qwen.encode_prompts(tiny[0], PROMPTS, MAX_LEN, str(tmp_path_factory.mktemp("text")), CPU, torch.float32)


def test_cached_embeddings_are_the_pipelines_encode_prompt_and_are_read_without_the_text_encoder(tiny, tmp_path,
                                                                                                monkeypatch, capsys):
    from diffusers import QwenImagePipeline
    path, pipe = tiny
    cache = str(tmp_path / "text")
    first = qwen.encode_prompts(path, PROMPTS, MAX_LEN, cache, CPU, torch.float32)
    lengths = []
    for prompt in PROMPTS:
        expected, mask = pipe.encode_prompt(prompt, device=CPU, max_sequence_length=MAX_LEN)
        got = first(prompt)
        assert mask is None  # one prompt has no padding: the pipeline says so with None, we store ones
        assert torch.equal(got["encoder_hidden_states"], expected), prompt  # the same code on the same CPU: bits
        assert torch.equal(got["encoder_hidden_states_mask"], torch.ones(expected.shape[:2], dtype=torch.long))
        lengths.append(expected.shape[1])
    assert lengths == [8, 5, MAX_LEN]  # "" keeps the template's closing 5 tokens; LONG is cut to MAX_LEN

    monkeypatch.setattr(QwenImagePipeline, "from_pretrained", lambda *a, **k: pytest.fail("text encoder loaded"))
    again = qwen.encode_prompts(path, PROMPTS, MAX_LEN, cache, CPU, torch.float32)
    assert all(torch.equal(again(p)[k], first(p)[k]) for p in PROMPTS for k in qwen.TEXT_KEYS)
    monkeypatch.undo()

    file = os.listdir(cache)[0]
    with open(os.path.join(cache, file), "r+b") as f:  # cut short, as a full disk would
        f.truncate(100)
    repaired = qwen.encode_prompts(path, PROMPTS, MAX_LEN, cache, CPU, torch.float32)
    assert capsys.readouterr().out.count(f"{cache}: 1 damaged text embeddings computed again") == 1
    assert all(torch.equal(repaired(p)[k], first(p)[k]) for p in PROMPTS for k in qwen.TEXT_KEYS)


def test_latent_noise_is_the_pipelines_prepare_latents(tiny):
    """The same draw from the same generator in the same layout: (1, frames, 16, H/8, W/8), packed."""
    _, pipe = tiny
    expected = pipe.prepare_latents(1, 16, 32, 32, torch.float32, CPU, torch.Generator().manual_seed(3))
    got = qwen.latent_noise(32, torch.Generator().manual_seed(3), CPU)
    assert got.shape == (1, 4, 64) and torch.equal(got, expected)


@pytest.mark.parametrize("steps", [2, 4])
def test_rollout_is_the_pipelines_denoising_loop_without_and_with_true_cfg(tiny, embeds, steps, monkeypatch):
    """The pipeline's own loop from the same latents on the release's grid (shift 1: linear sigmas). Its scheduler
    normally shifts the grid by the image size and stretches its end (Qwen-Image's config); here it is told to take
    the sigmas as given. At 2 and 4 steps the sigmas 1, 0.75, 0.5, 0.25 are multiples of 1/1000, so the release's
    floored timestep that the rollout feeds is the pipeline's sigma: at 3 steps the rollout would feed 0.666 where
    the pipeline feeds 0.6667."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    path, pipe = tiny
    sigmas = sigma_schedule(steps, 1.0)[:-1].tolist()
    assert all(math.floor(s * 1000) / 1000 == s for s in sigmas)
    monkeypatch.setattr(pipe, "scheduler", FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_dynamic_shifting=False, shift_terminal=None))
    noise = qwen.latent_noise(32, torch.Generator().manual_seed(0), CPU)
    results = []
    for guidance, negative in ((1.0, None), (4.0, "")):
        expected = pipe("a red cat", negative_prompt=negative, true_cfg_scale=guidance, height=32, width=32,
                        sigmas=sigmas, num_inference_steps=steps, latents=noise.clone(), output_type="latent",
                        max_sequence_length=MAX_LEN).images
        cond = qwen.conditioning(embeds("a red cat"), 32, CPU, negative=None if negative is None else embeds(""))
        got = qwen.rollout(pipe.transformer, noise, cond, steps, 1.0, guidance)
        assert torch.equal(got, expected), guidance  # the same operations in the same order on one CPU: the same bits
        results.append(got)
    assert not torch.allclose(*results, rtol=0.1)  # true CFG changed the outcome: the comparison above says something


def test_velocity_feeds_the_floored_timestep_and_no_cfg_without_a_negative_or_at_scale_1(tiny, embeds):
    """floor(sigma * 1000) / 1000 as the release (0.6667 -> 0.666); a single forward without a negative or at
    guidance 1, whatever else is asked. Against the transformer called directly."""
    _, pipe = tiny
    x = qwen.latent_noise(32, torch.Generator().manual_seed(1), CPU)
    cond = qwen.conditioning(embeds("a red cat"), 32, CPU)
    with torch.no_grad():
        direct = pipe.transformer(hidden_states=x, timestep=torch.tensor([0.666]), return_dict=False, **cond)[0]
        assert torch.equal(qwen.velocity(pipe.transformer, x, 2 / 3, cond, 4.0), direct)
        with_negative = dict(cond, negative=qwen.conditioning(embeds(""), 32, CPU))
        assert torch.equal(qwen.velocity(pipe.transformer, x, 2 / 3, with_negative, 1.0), direct)
        assert not torch.allclose(qwen.velocity(pipe.transformer, x, 2 / 3, with_negative, 4.0), direct, rtol=0.1)


def test_decode_is_the_pipelines_decode_of_the_same_latents(tiny):
    _, pipe = tiny
    run = lambda output_type: pipe("a red cat", true_cfg_scale=1.0, height=32, width=32, num_inference_steps=2,  # noqa: E731
                                   generator=torch.Generator().manual_seed(2), output_type=output_type).images
    images = qwen.decode(pipe.vae, run("latent"), 32)
    assert images.shape == (1, 3, 32, 32) and images.std() > 0.01  # a picture, not a constant
    assert torch.equal(images, run("pt"))  # x * 0.5 and x / 2 are the same float: the same bits


def test_encode_image_is_the_vaes_latent_normalized_and_packed_as_decode_reads_it(tiny):
    """The pipeline's own image preprocessing and unpacking, and its decode's un-normalization, bring encode_image's
    output back to the VAE's sample of the image (the same generator): the layout, the frame axis and the direction
    of the normalization, each of which a mistake would scramble or scale."""
    from diffusers import QwenImagePipeline
    _, pipe = tiny
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    got = qwen.encode_image(pipe.vae, torch.from_numpy(pixels), torch.Generator().manual_seed(4))
    image = pipe.image_processor.preprocess(Image.fromarray(pixels))[:, :, None]  # (1, 3, 1, 32, 32) in [-1, 1]
    with torch.no_grad():
        expected = pipe.vae.encode(image).latent_dist.sample(generator=torch.Generator().manual_seed(4))
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, 16, 1, 1, 1)
    back = QwenImagePipeline._unpack_latents(got, 32, 32, pipe.vae_scale_factor) / (1 / std) + mean
    # the same pixels in [-1, 1] and the same sample; the normalization there and back rounds twice: measured 4e-7 on
    # latents up to 3, a few fp32 steps; a wrong layout, frame axis or direction is off by the latents' whole size
    assert back.shape == expected.shape and torch.allclose(back, expected, rtol=1e-5, atol=1e-5)


def test_transformer_on_meta_filled_from_the_checkpoint_equals_from_pretrained(tiny, embeds):
    """The RoPE tables, which a meta build leaves on meta (no checkpoint holds them), built again: the same forward."""
    from diffusers import QwenImageTransformer2DModel
    path, _ = tiny
    built = flux.fill_from_checkpoint(qwen.transformer_on_meta(path).to_empty(device="cpu"), path)
    loaded = QwenImageTransformer2DModel.from_pretrained(path, subfolder="transformer", dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), loaded.state_dict().values()))
    # from_pretrained leaves the weights in the memory-mapped file, at offsets not aligned to 64 bytes, where the
    # CPU's matmul takes another path and rounds otherwise (2e-7 here); in fresh memory, as fill_from_checkpoint's
    # are, it is the same path
    for p in loaded.parameters():
        p.data = p.data.clone()
    x = qwen.latent_noise(32, torch.Generator().manual_seed(5), CPU)
    cond = qwen.conditioning(embeds(LONG), 32, CPU)
    assert torch.equal(qwen.velocity(built, x, 0.5, cond, None), qwen.velocity(loaded, x, 0.5, cond, None))


def test_lora_targets_are_every_blocks_attention_and_mlp_linears(tiny):
    """peft wraps exactly the 8 attention and 4 MLP linears of each block, nothing else (not the modulations)."""
    from diffusers import QwenImageTransformer2DModel
    from peft import LoraConfig
    path, _ = tiny
    transformer = QwenImageTransformer2DModel.from_pretrained(path, subfolder="transformer")
    linears = {name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
               and name.startswith("transformer_blocks.") and ("attn." in name or "_mlp." in name)}
    transformer.add_adapter(LoraConfig(r=2, target_modules=list(qwen.LORA_TARGETS)))
    wrapped = {name for name, m in transformer.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == linears and len(wrapped) == 12 * transformer.config.num_layers


# ---------------------------------------------------------------- the release's Qwen-Image recipe

REALISM = ["Natural-lighting", "Detail", "Detailed", "Real"]   # SRPO_Qwen.py's word lists, as its functions hold
CG = ["Concept art", "Painting", "Anime"]


def release_qwen_draw(transformer, vae, reward, x0, noise, cond, caption, step, m):
    """One timestep draw of the release's Qwen-Image SRPO_train (fastvideo/SRPO_Qwen.py with its shell's flags),
    transcribed with its names and in its order: float32 grids at shift 1, the gap k = int((1 - 0.6) * 100) + 1
    clamped to [m, 100 - m], one denoise step fed int(sigma * 1000) / 1000, no CFG (train_cfg 1), the relative
    reward (k = 0) weighted by discount[m] = sd3_time_shift(3, u), loss -outputs, its words indexed by its step.
    The decode is qwen.decode, the pipeline's clamp, where the release min-max normalizes (README says why)."""
    L = 100
    sigma_schedule = torch.linspace(1, 0, 51)  # sd3_time_shift(1, ...) is the identity
    sigmas_l = torch.linspace(sigma_schedule[5], sigma_schedule[40], L)
    u = torch.linspace(0, 1, L + 1)
    discount = 3 * u / (1 + 2 * u)
    k = min(min(L - m, int((1 - 0.6) * L) + 1), m)
    start = min(m + k, L)
    t_base, t_start = L - m, L - start
    sigmas, sigmast = sigmas_l[t_start], sigmas_l[t_base]
    noisy = sigmas * noise + (1.0 - sigmas) * x0
    positive = {key: v for key, v in cond.items() if key != "negative"}
    pred = transformer(hidden_states=noisy, timestep=torch.tensor([int(sigmas * 1000) / 1000]), return_dict=False,
                       **positive)[0]
    latents = noisy + (sigmas_l[t_base] - sigmas_l[t_start]) * pred
    image = qwen.decode(vae, (latents - sigmast * noise) / (1 - sigmast), 32)
    outputs = reward.srp(image, [f"{REALISM[step % 4]}. {caption}"], [f"{CG[step % 3]}. {caption}"], 0.0)
    (-(outputs * discount[m])).mean().backward()


@pytest.mark.parametrize("m", [5, 41, 50])  # the gap clamped by m, the gap 41 reaching 0.9, and past it
def test_train_pys_qwen_defaults_give_the_release_qwen_scripts_gradient(tiny, embeds, monkeypatch, m):
    """train.py's defaults for a Qwen-Image --model, through srpo_step, against the release's rule computed above:
    which would fail with the FLUX window, gap or loss, a nonzero k, the inversion branch, or CFG in the step."""
    import srpo
    import train
    from diffusers import QwenImageTransformer2DModel
    from srpo_reward import load_reward
    from tiny import tiny_model_paths
    path, pipe = tiny
    args = train.parse_args(["--model", path, "--resolution", "32"])
    reward = load_reward(args.reward, tiny_model_paths()[1])
    new = lambda: QwenImageTransformer2DModel.from_pretrained(path, subfolder="transformer")  # noqa: E731
    ours, release = new(), new()
    cond = qwen.condition(embeds, "a red cat", 32, CPU)
    noise = qwen.latent_noise(32, torch.Generator().manual_seed(0), CPU)
    x0 = qwen.rollout(ours, noise, cond, 3, args.shift, args.rollout_guidance)
    monkeypatch.setattr(srpo, "sample_t_star", lambda length, generator: m)
    out = srpo.srpo_step(lambda x, s: qwen.velocity(ours, x, s, cond, args.guidance),
                         lambda x: qwen.decode(pipe.vae, x, 32), reward, x0, noise, "a red cat", 2, None,
                         **train.step_settings(args))
    # our step 2 picks words as the FLUX release counts, from 1: the Qwen script's step 3 (README)
    release_qwen_draw(release, pipe.vae, reward, x0, noise, cond, "a red cat", 3, m)
    grads = [(a.grad, b.grad) for a, b in zip(ours.parameters(), release.parameters()) if b.grad is not None]
    assert grads and all(a.grad is None for a, b in zip(ours.parameters(), release.parameters()) if b.grad is None)
    # the same math, the release's float32 grids against our float64 ones (sigmas ~1e-8 apart), as test_train's
    # FLUX comparison; a wrong gap, weight, k or word moves the gradient by more than a percent
    assert sum((a - b).norm() ** 2 for a, b in grads) ** 0.5 <= 1e-4 * sum(b.norm() ** 2 for _, b in grads) ** 0.5
    assert set(out) == {"loss", "reward_denoise", "sigma_denoise_from", "sigma_denoise_to", "k_denoise"}


# ---------------------------------------------------------------- train.py on Qwen-Image

def qwen_argv(tiny, out, *argv):
    """train.py's arguments for a quick run on the tiny Qwen-Image, with its recipe's defaults otherwise."""
    from tiny import tiny_model_paths
    (out.parent / "prompts.txt").write_text("a red cat\na blue car\na green tree\n")
    return [str(a) for a in ("--model", tiny[0], "--prompts", out.parent / "prompts.txt", "--reward-path",
                             tiny_model_paths()[1], "--resolution", "32", "--batch-size", "2", "--rollout-steps", "2",
                             "--max-sequence-length", MAX_LEN, "--sample-every", "0", "--lr", "1e-3", "--output-dir",
                             out, *argv)]


def train_qwen(tiny, out, *argv):
    from test_train import train_here
    train_here(*qwen_argv(tiny, out, *argv))


def test_train_py_takes_qwen_image_by_its_model_index_on_1_and_2_ranks_fsdp_equals_ddp_resume_is_exact(tiny, tmp_path):
    from diffusers import QwenImageTransformer2DModel
    from test_train import close_updates, dcp_state, run_train
    path, pipe = tiny
    train_qwen(tiny, tmp_path / "fsdp", "--steps", "2", "--strategy", "fsdp", "--checkpoint-every", "1")
    # checkpointing, as on a GPU by default: the transformer's blocks (the video VAE has none in diffusers 0.42)
    train_qwen(tiny, tmp_path / "ddp", "--steps", "2", "--strategy", "ddp", "--gradient-checkpointing")
    done = run_train(*qwen_argv(tiny, tmp_path / "two", "--steps", "2", "--strategy", "fsdp"), nproc=2)
    assert done.returncode == 0, done.stderr[-6000:]
    start = pipe.transformer.state_dict()
    fsdp, ddp, two = (dcp_state(tmp_path / name / "checkpoint-2")["model"] for name in ("fsdp", "ddp", "two"))
    # the last block's text stream after attention gets no gradient (qwen.frozen): not trained, not in state/
    assert not any(k.startswith("transformer_blocks.1.txt_mlp.") or "blocks.1.attn.to_add_out" in k for k in fsdp)
    assert set(fsdp) == set(ddp) and sum((fsdp[k] - start[k]).abs().sum() for k in fsdp) > 0.01  # it trained
    for key in fsdp:  # relative to the update, as test_train's FLUX comparison: sums in other orders
        assert close_updates(ddp[key], fsdp[key], start[key]), key
        assert close_updates(two[key], fsdp[key], start[key]), key  # 2 ranks, a prompt each: the same batch
    # 1 step, then --resume for the second: the same bits as 2 steps at once (every draw keyed by seed and step)
    train_qwen(tiny, tmp_path / "resumed", "--steps", "1", "--strategy", "fsdp")
    train_qwen(tiny, tmp_path / "resumed", "--steps", "2", "--strategy", "fsdp", "--resume")
    resumed = dcp_state(tmp_path / "resumed" / "checkpoint-2")["model"]
    assert all(torch.equal(resumed[k], fsdp[k]) for k in fsdp)
    # the published weights are a QwenImageTransformer2DModel folder: the trained state rounded to bf16
    published = QwenImageTransformer2DModel.from_pretrained(tmp_path / "fsdp" / "checkpoint-2").state_dict()
    assert all(torch.equal(published[k], fsdp[k].to(torch.bfloat16).float()) for k in fsdp)


def test_sample_py_on_qwen_image_is_the_pipelines_own_images_with_true_cfg(tiny, tmp_path):
    import sample
    path, pipe = tiny
    prompts = ["a red cat", "a blue car"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    sample.main(["--model", path, "--prompts", str(tmp_path / "p.txt"), "--output-dir", str(tmp_path / "out"),
                 "--height", "32", "--width", "32", "--num-inference-steps", "3",
                 "--max-sequence-length", str(MAX_LEN)])
    for i, prompt in enumerate(prompts):  # the pipeline as a user calls it: true CFG 4 on "", image i seeded 0 + i
        expected = pipe(prompt, negative_prompt="", true_cfg_scale=4.0, height=32, width=32, num_inference_steps=3,
                        max_sequence_length=MAX_LEN, generator=torch.Generator().manual_seed(i)).images[0]
        got = Image.open(tmp_path / "out" / f"{i:05d}.png")
        assert got.text["guidance_scale"] == "4.0"
        assert np.array_equal(np.asarray(got), np.asarray(expected)), prompt  # the same computation: exact
    without_cfg = pipe(prompts[0], height=32, width=32, num_inference_steps=3, max_sequence_length=MAX_LEN,
                       generator=torch.Generator().manual_seed(0)).images[0]
    assert not np.array_equal(np.asarray(without_cfg), np.asarray(Image.open(tmp_path / "out" / "00000.png")))


def test_a_lora_trained_on_qwen_image_loads_with_load_lora_weights_and_equals_a_hand_merge(tiny, tmp_path):
    from diffusers import QwenImagePipeline
    from safetensors.torch import load_file
    path = tiny[0]
    train_qwen(tiny, tmp_path / "lora", "--steps", "2", "--lora-rank", "4", "--lora-alpha", "8")
    file = tmp_path / "lora" / "checkpoint-2" / "pytorch_lora_weights.safetensors"
    render = lambda pipe: pipe("a red cat", height=32, width=32, num_inference_steps=2,  # noqa: E731
                               max_sequence_length=MAX_LEN, generator=torch.Generator().manual_seed(0),
                               output_type="np").images[0]
    base_image = render(QwenImagePipeline.from_pretrained(path))
    loaded = QwenImagePipeline.from_pretrained(path)
    loaded.load_lora_weights(str(file))
    merged = QwenImagePipeline.from_pretrained(path)  # by hand: W + (alpha / rank) B @ A, from the file alone
    lora, weights = load_file(file), merged.transformer.state_dict()
    layers = {k[len("transformer."):-len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight")}
    assert {layer.split(".", 2)[2] for layer in layers} == set(qwen.LORA_TARGETS)  # every target, in some block
    with torch.no_grad():
        for layer in layers:
            weights[f"{layer}.weight"] += 8 / 4 * lora[f"transformer.{layer}.lora_B.weight"] @ \
                lora[f"transformer.{layer}.lora_A.weight"]
    merged.transformer.load_state_dict(weights)
    lora_image, merged_image = render(loaded), render(merged)
    # as test_train's FLUX LoRA: one model two ways, fp32 rounding only (1e-4 of the pixels' size); the LoRA's own
    # effect must be 100x that difference
    assert abs(lora_image - merged_image).max() < 1e-4 * abs(merged_image).max()
    assert abs(lora_image - base_image).max() > 100 * abs(lora_image - merged_image).max() + 1e-6


def test_a_lora_on_a_4_bit_qwen_image_base_trains_and_sample_py_renders_with_it(tiny, tmp_path):
    """--quantize-base nf4 on Qwen-Image (README's one-GPU command for a 48 GB card): the adapters move from their
    start (B is zero at first), the unused text stream of the last block gets none, and sample.py renders with them
    on the same 4-bit base, unlike without them."""
    import sample
    from safetensors.torch import load_file
    train_qwen(tiny, tmp_path / "nf4", "--steps", "1", "--lora-rank", "4", "--strategy", "ddp", "--quantize-base",
               "nf4")
    lora = load_file(tmp_path / "nf4" / "checkpoint-1" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in lora.items() if k.endswith("lora_B.weight"))
    assert not any(name in k for k in lora for name in qwen.unused(tiny[1].transformer))
    common = ["--model", tiny[0], "--prompt", "a red cat", "--height", "32", "--width", "32", "--num-inference-steps",
              "2", "--max-sequence-length", str(MAX_LEN), "--quantize-base", "nf4", "--compare", "--lora",
              str(tmp_path / "nf4" / "checkpoint-1"), "--output-dir", str(tmp_path / "s")]
    sample.main(common)
    base, srpo = (np.asarray(Image.open(tmp_path / "s" / sub / "00000.png")) for sub in ("base", "srpo"))
    assert base.shape == (32, 32, 3) and not np.array_equal(base, srpo)
