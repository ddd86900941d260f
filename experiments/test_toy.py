"""Tests of the toy world and its demo: scenes match their captions, a world builds deterministically, loads through
the ordinary from_pretrained paths, the commands its build prints are ones the root's scripts accept, and SRPO's
control words steer it (claim 2's direction). Only the quick world is built here (seconds); the full world and the
demo's claims are `python -m experiments.toy build && python -m experiments.toy demo`."""
import os
import subprocess
import tempfile

import pytest
import torch
from diffusers import FluxPipeline
from transformers import AutoTokenizer, CLIPModel

import evaluate
import sample
import train
from experiments import toy, toy_demo, toy_world
from srpo_reward import load_reward

torch.set_num_threads(2)


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
    assert toy_world.scene_captions(scenes, [None, "adjective"]) == ["a red circle on a white background",
                                                                     "a dark blue square on a black background"]
    assert toy_world.scene_captions(scenes, ["control", None])[0] == "bright. a red circle on a white background"
    images = toy_world.render(scenes)
    assert images.shape == (2, 3, 64, 64)
    # away from edges the mask is 0 or 1, so a pixel is its palette color times the light to fp32 rounding (1e-7);
    # allclose allows 1e-5 of it; another palette color is off by 0.1 or more in some channel
    assert torch.allclose(images[0, :, 32, 32], torch.tensor(toy_world.COLORS["red"]))
    assert torch.allclose(images[0, :, 2, 2], torch.tensor(toy_world.BACKGROUNDS["white"]))
    assert torch.allclose(images[1, :, 32, 32], 0.4 * torch.tensor(toy_world.COLORS["blue"]))
    # corners of the square (half side 0.8 r) are inside it, the circle's are not
    assert torch.allclose(images[1, :, 32 + 10, 32 + 10], 0.4 * torch.tensor(toy_world.COLORS["blue"]))
    assert torch.allclose(images[0, :, 32 + 10, 32 + 10], torch.tensor(toy_world.BACKGROUNDS["white"]))
    assert toy_world.parse_caption("a red circle on a white background") == ("circle", "red", "white")
    train_prompts, held_out = toy_world.prompt_split(0)
    assert len(train_prompts) == 32 and len(held_out) == 16 and not set(train_prompts) & set(held_out)
    assert sorted(train_prompts + held_out) == sorted(toy_world.all_captions())


def test_not_built_is_none(tmp_path):
    assert toy_world.toy_model_paths(str(tmp_path)) is None
    assert toy_world.toy_model_paths(str(tmp_path), quick=True) is None


def test_same_seed_builds_the_same_world(tmp_path, monkeypatch):
    """Two builds with one seed write the same bytes. Every part trains a few steps (the quick world's sizes would
    take half a minute a build): what the seeds decide does not depend on how long each part trains."""
    monkeypatch.setitem(toy_world.BUILD, "quick", dict(vae_steps=2, flux_scenes=16, flux_steps=2, clip_steps=2))
    first, second = (files(os.path.dirname(toy_world.build(str(tmp_path / name), seed=0, quick=True)["flux"]))
                     for name in ("a", "b"))
    assert first.keys() == second.keys()
    assert any(name.endswith(".safetensors") for name in first)
    for name in first:
        if name != "world.json":  # holds the build time
            assert first[name] == second[name], name
    assert not [n for n in os.listdir(tmp_path / "a") if n.startswith(".")]  # the temporary folder was renamed


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
    assert len(prompts) == 16 and all(p in toy_world.all_captions() for p in prompts)


def test_control_words_steer_brightness_both_ways(world, tmp_path):
    """Claim 2's direction in seconds, through train.py's loop: +bright -dark makes held-out prompts' samples
    brighter than the base model's, the swapped words darker. (The quick world's reward knows bright from dark;
    lr is high so that 4 steps move it.)"""
    pipe = FluxPipeline.from_pretrained(world["flux"])
    state = {"vae": pipe.vae.eval(), "judge": toy_demo.load_clip(world["judge"]),
             "reward": load_reward("hps", world["reward"])}
    base = toy_demo.with_weights(pipe.transformer, pipe.transformer.state_dict())
    prompts = [line.strip() for line in open(world["eval_prompts"])] * 2
    truths = [toy_world.parse_caption(p) for p in prompts]
    embeds = toy_world.flux_embeds(world["flux"], prompts, tempfile.mkdtemp(dir=tmp_path))
    seeds = range(len(prompts))
    brightness = {"base": toy_demo.measure(base, state, embeds, truths, seeds)[0]["brightness"]}
    for pos, neg in (("bright", "dark"), ("dark", "bright")):
        weights, metrics = toy_demo.srpo_run(world, str(tmp_path), pos, pos, neg, "both", 4, 1e-4)
        assert len(metrics) == 4 and all(m["reward_inversion"] is not None for m in metrics)
        trained = toy_demo.with_weights(base, weights[4])
        brightness[pos] = toy_demo.measure(trained, state, embeds, truths, seeds)[0]["brightness"]
    assert brightness["bright"] > brightness["base"] + 0.05, brightness
    assert brightness["dark"] < brightness["base"] - 0.02, brightness


def test_printed_commands_run_in_bash_and_the_root_scripts_accept_them(world, tmp_path):
    """What `build` prints is what commands() returns, pasted into bash; train.py checks its inputs, evaluate.py
    loads the world's reward as hps and its judge as clip."""
    argvs = toy_world.commands(world, out=str(tmp_path / "srpo"))
    for argv in argvs:
        text = toy_world.shell(argv)
        done = subprocess.run(["bash", "-c", 'python() { printf "%s\\0" "$@"; }\n' + text], capture_output=True,
                              text=True, check=True)
        assert done.stdout.split("\0")[:-1] == argv[1:], text
    (_, _, *train_argv), (_, _, *sample_argv), (_, _, *evaluate_argv) = argvs
    args = train.parse_args(train_argv)
    train.check_inputs(args)
    assert (args.model, args.reward_path, args.resolution, args.max_sequence_length) == \
        (world["flux"], world["reward"], 64, 16)
    args = sample.parse_args(sample_argv)
    assert (args.height, args.width, args.max_sequence_length) == (64, 64, 16)
    assert args.weights.endswith(f"checkpoint-{toy_world.SRPO_STEPS}")
    args = evaluate.parse_args(evaluate_argv)
    rewards = evaluate.load_rewards(args.reward, args.reward_path, args.clip_h, "cpu")
    assert {kind: info["path"] for kind, (_, info) in rewards.items()} == {"hps": world["reward"],
                                                                           "clip": world["judge"]}


def test_the_readme_shows_the_commands_that_build_prints(world):
    """experiments/README.md's block, run in bash with its W set to this world, passes what commands() returns."""
    readme = open(os.path.join(os.path.dirname(__file__), "README.md")).read()
    block = readme[readme.index("W=~/.cache/srpo-toy/seed0\n"):]
    block = block[block.index("\n"):block.index("```")]
    done = subprocess.run(["bash", "-c", 'python() { printf "%s\\0" "$@"; printf "\\n"; }\n'
                           f'W={os.path.dirname(world["flux"])}\n{block}'], capture_output=True, text=True, check=True)
    assert [line.split("\0")[:-1] for line in done.stdout.splitlines()] == \
        [argv[1:] for argv in toy_world.commands(world)]


def test_paths_prints_the_commands_or_fails_in_one_line(world, tmp_path, capsys):
    root = os.path.dirname(os.path.dirname(world["flux"]))
    toy.main(["paths", "--root", root, "--quick"])
    out = capsys.readouterr().out
    assert all(toy_world.shell(argv) in out for argv in toy_world.commands(world))
    with pytest.raises(SystemExit) as e:
        toy.main(["paths", "--root", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: no toy world at") and "\n" not in err


def test_report_template_takes_every_number_and_each_claim_3_verdict(tmp_path):
    run = dict(brightness=0.4, judge_accuracy=0.6, judge_shape=0.5, judge_color=0.6, judge_background=0.7,
               judge_score=0.2, reward_bright=0.01)
    rows1 = [dict(sigma=s, mse_one_step=0.03, mse_direct_align=0.003, judge_one_step=0.4, judge_direct_align=0.6)
             for s in toy_demo.CLAIM1_SIGMAS]
    for denoise_only_accuracy, verdict in ((0.6, "Claim 3 is not reproduced"), (0.4, "Claim 3 is reproduced")):
        finals = {"base": run, "bright": dict(run, brightness=0.5, train_reward=0.3),
                  "dark": dict(run, brightness=0.3, train_reward=0.3)}
        for name in ("bright", "dark"):
            finals[f"{name}, denoise only"] = dict(finals[name], judge_accuracy=denoise_only_accuracy)
        curves = {name: [(0, run), (40, finals[name])] for name in toy_demo.RUNS}
        path = toy_demo.write_report(str(tmp_path), finals, curves, rows1, 0.7, 40, 1e-5, 16, 8, 150)
        report = open(path).read()
        assert verdict in report and "$" not in report, report
        assert "| 0.95 | 0.0300 | 0.0030 | 10.0x | 40% | 60% |" in report
        assert "| 40 | 0.500 / 60% | 0.300 / 60% |" in report
