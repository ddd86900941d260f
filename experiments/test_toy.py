"""Tests of toy.py: scenes match their captions, a world builds deterministically, loads through the ordinary
from_pretrained paths, and SRPO's control words steer it (claim 2's direction). Only the quick world is built
here (seconds); the full world and the demo's claims are `python -m experiments.toy build && python -m experiments.toy demo`."""
import os
import tempfile

import pytest
import torch
from diffusers import FluxPipeline
from transformers import AutoTokenizer, CLIPModel

from experiments import toy
from srpo_reward import load_reward

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toy.build(str(tmp_path_factory.mktemp("toy")), seed=0, quick=True)


def files(folder):
    """{relative path: bytes} of every file under folder."""
    out = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def test_scenes_are_what_their_captions_say():
    scenes = dict(shape=torch.tensor([0, 1]), color=torch.tensor([0, 2]), background=torch.tensor([0, 2]),
                  light=torch.tensor([0, 1]), level=torch.tensor([1.0, 0.4]), cx=torch.tensor([32.0, 32.0]),
                  cy=torch.tensor([32.0, 32.0]), r=torch.tensor([14.0, 14.0]))
    assert toy.scene_captions(scenes, [None, "adjective"]) == ["a red circle on a white background",
                                                               "a dark blue square on a black background"]
    assert toy.scene_captions(scenes, ["control", None])[0] == "bright. a red circle on a white background"
    images = toy.render(scenes)
    assert images.shape == (2, 3, 64, 64)
    assert torch.allclose(images[0, :, 32, 32], torch.tensor(toy.COLORS["red"]))
    assert torch.allclose(images[0, :, 2, 2], torch.tensor(toy.BACKGROUNDS["white"]))
    assert torch.allclose(images[1, :, 32, 32], 0.4 * torch.tensor(toy.COLORS["blue"]))
    # corners of the square (half side 0.8 r) are inside it, the circle's are not
    assert torch.allclose(images[1, :, 32 + 10, 32 + 10], 0.4 * torch.tensor(toy.COLORS["blue"]))
    assert torch.allclose(images[0, :, 32 + 10, 32 + 10], torch.tensor(toy.BACKGROUNDS["white"]))
    assert toy.parse_caption("a red circle on a white background") == ("circle", "red", "white")
    train, held_out = toy.prompt_split(0)
    assert len(train) == 32 and len(held_out) == 16 and not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(toy.all_captions())


def test_not_built_is_none(tmp_path):
    assert toy.toy_model_paths(str(tmp_path)) is None
    assert toy.toy_model_paths(str(tmp_path), quick=True) is None


def test_same_seed_builds_the_same_world(world, tmp_path):
    again = toy.build(str(tmp_path), seed=0, quick=True)
    first, second = files(os.path.dirname(world["flux"])), files(os.path.dirname(again["flux"]))
    assert first.keys() == second.keys()
    assert any(name.endswith(".safetensors") for name in first)
    for name in first:
        if name != "world.json":  # holds the build time
            assert first[name] == second[name], name
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # the temporary folder was renamed


def test_world_loads_with_flux_pipeline_and_clip_model(world):
    pipe = FluxPipeline.from_pretrained(world["flux"])
    vae = pipe.vae.config
    assert vae.latent_channels == 16 and pipe.vae_scale_factor == 8 and vae.scaling_factor != 0.3611
    assert pipe.transformer.config.guidance_embeds and pipe.transformer.config.in_channels == 64
    image = pipe("a red circle on a gray background", height=64, width=64, num_inference_steps=2,
                 max_sequence_length=world["max_sequence_length"], generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    for name in ("reward", "judge"):
        model = CLIPModel.from_pretrained(world[name])
        tokenizer = AutoTokenizer.from_pretrained(world[name])
        words = "bright. a red circle on a purple background".replace(".", " .").split()
        assert len(tokenizer("bright. a red circle on a purple background").input_ids) == len(words) + 2  # whole words
        reward = load_reward("hps", world[name])
        assert reward.model.config.projection_dim == model.config.projection_dim
        assert reward.srp(torch.rand(2, 3, 64, 64), ["bright. a"] * 2, ["dark. a"] * 2, 0.1).shape == (2,)
    prompts = [line.strip() for line in open(world["eval_prompts"])]
    assert len(prompts) == 16 and all(p in toy.all_captions() for p in prompts)


def test_control_words_steer_brightness_both_ways(world, tmp_path):
    """Claim 2's direction in seconds, through train.py's loop: +bright -dark makes held-out prompts' samples
    brighter than the base model's, the swapped words darker. (The quick world's reward knows bright from dark;
    lr is high so that 4 steps move it.)"""
    pipe = FluxPipeline.from_pretrained(world["flux"])
    state = {"vae": pipe.vae.eval(), "judge": toy.load_clip(world["judge"]),
             "reward": load_reward("hps", world["reward"])}
    base = toy.with_weights(pipe.transformer, pipe.transformer.state_dict())
    prompts = [line.strip() for line in open(world["eval_prompts"])] * 2
    truths = [toy.parse_caption(p) for p in prompts]
    embeds = toy.flux_embeds(world["flux"], prompts, tempfile.mkdtemp(dir=tmp_path))
    seeds = range(len(prompts))
    brightness = {"base": toy.measure(base, state, embeds, truths, seeds)[0]["brightness"]}
    for pos, neg in (("bright", "dark"), ("dark", "bright")):
        weights, metrics = toy.srpo_run(world, str(tmp_path), pos, pos, neg, "both", 4, 1e-4)
        assert len(metrics) == 4 and all(m["reward_inversion"] is not None for m in metrics)
        brightness[pos] = toy.measure(toy.with_weights(base, weights[4]), state, embeds, truths, seeds)[0]["brightness"]
    assert brightness["bright"] > brightness["base"] + 0.05, brightness
    assert brightness["dark"] < brightness["base"] - 0.02, brightness
