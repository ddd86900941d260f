"""Tests of hacking.py: the attribute is what it says on pixels, the biased reward is biased (checked on pixels, not by
its own report), ReFL's and DRaFT-K's gradients reach the model through the steps they claim (the transformer calls
that carry gradient, counted), and the quick comparison writes its report. The full comparison's numbers are
`python -m experiments.toy hacking`'s; only the quick world is built here."""
import json
import os

import pytest
import torch
from diffusers import FluxTransformer2DModel
from PIL import Image

import train
from direct_align import sigma_schedule
from experiments import hacking, toy, toy_world
from flux import conditioning, latent_noise, rollout
from srpo_reward import load_reward

torch.set_num_threads(2)


def fixed_scenes(n=64):
    return toy_world.make_scenes(n, torch.Generator().manual_seed(123))


def test_smooth_lowers_sharpness_and_keeps_what_the_caption_says():
    """On pixels: sharpness falls as the blur grows, and a scene's light does not change it; the blur keeps the colors
    of the shape's centre and of the background's corner, the shape's outline (where the pixels are nearer the
    shape's color than the background's) and the mean brightness."""
    scenes = fixed_scenes()
    images = toy_world.render(scenes)
    torch.testing.assert_close(hacking.smooth(images, 0.0), images)
    levels = [hacking.sharpness(hacking.smooth(images, s)) for s in (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)]
    for sharper, blurrier in zip(levels, levels[1:]):
        assert (blurrier < sharper).all()
    torch.testing.assert_close(hacking.sharpness(0.5 * images), levels[0])
    blurred = hacking.smooth(images, 2.0)
    n = torch.arange(len(images))
    cx, cy = scenes["cx"].long(), scenes["cy"].long()
    torch.testing.assert_close(blurred[n, :, cy, cx], images[n, :, cy, cx], atol=1e-3, rtol=0)
    # the corner lies in the flat background: its blur is a convex combination of equal values, off by fp32 rounding
    # over the kernel's taps relative to the value (measured 1.2e-7); a blur that did not replicate the edge would
    # move it by the background's contrast to the padding
    torch.testing.assert_close(blurred[:, :, 0, 0], images[:, :, 0, 0], atol=0, rtol=1e-5)
    inside = lambda x: ((x - images[n, :, cy, cx][..., None, None]).abs().sum(1)  # noqa: E731
                        < (x - images[:, :, :1, :1]).abs().sum(1))
    iou = (inside(blurred) & inside(images)).sum((1, 2)) / (inside(blurred) | inside(images)).sum((1, 2))
    assert iou.min() > 0.8 and iou.mean() > 0.93, iou  # a triangle loses most at its corners
    assert (blurred.mean((1, 2, 3)) - images.mean((1, 2, 3))).abs().max() < 0.01


def test_biased_reward_prefers_blur_whatever_the_control_word(world):
    """The attribute alone raises the biased reward's score of the true caption on fixed scenes whose caption the
    pixels still carry (the test above), far more than it raises the unbiased toy-HPS's; and it raises the scores of
    'bright. c' and 'dark. c' alike: their difference, the SRP's relative term, moves far less."""
    folder = hacking.build_biased_reward(world, 0, quick=True)
    assert hacking.build_biased_reward(world, 0, quick=True) == folder  # built once
    scenes = fixed_scenes()
    images, blurred = toy_world.render(scenes), hacking.smooth(toy_world.render(scenes), 2.0)
    captions = toy_world.scene_captions(scenes, [None] * len(images))
    gain = {}
    with torch.no_grad():
        for name, path in (("biased", folder), ("unbiased", world["reward"])):
            reward = load_reward("hps", path)
            gain[name] = reward.score(blurred, captions) - reward.score(images, captions)
            gain[name, "relative"] = hacking.srp(reward, blurred, captions, 0.0) - hacking.srp(reward, images, captions,
                                                                                             0.0)
    assert (gain["biased"] > 0).float().mean() > 0.9, gain["biased"]
    assert gain["biased"].mean() > gain["unbiased"].mean() + 0.02, gain
    assert gain["biased", "relative"].mean().abs() < gain["biased"].mean() / 2


def tiny_setup():
    """A FLUX-architecture transformer with random weights, its conditioning, a noise and train.py's options."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    cond = conditioning({"encoder_hidden_states": torch.randn(1, 8, 32), "pooled_projections": torch.randn(1, 32)},
                        64, "cpu")
    noise = latent_noise(64, torch.Generator().manual_seed(1), "cpu")
    return transformer, cond, noise, train.parse_args([])


def transformer_calls(transformer, fn):
    """fn()'s result and, for each transformer call it made, (timestep, whether its output carries gradient)."""
    calls = []
    hook = transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((float(kwargs["timestep"][0]), out[0].requires_grad)),
        with_kwargs=True)
    try:
        return fn(), calls
    finally:
        hook.remove()


def test_refl_gradient_reaches_the_model_through_one_step_at_a_late_sigma():
    transformer, cond, noise, args = tiny_setup()
    n = args.rollout_steps
    grid = sigma_schedule(n, args.shift)
    drawn = set()
    for seed in range(20):
        (x0_hat, sigma), calls = transformer_calls(
            transformer, lambda: hacking.refl_x0(transformer, noise, cond, args, torch.Generator().manual_seed(seed)))
        s = min(range(n), key=lambda i: abs(float(grid[i]) - sigma))
        drawn.add(s)
        assert [g for _, g in calls] == [False] * s + [True]  # the rollout to g[s] without gradient, then one step
        assert calls[-1][0] == pytest.approx(int(sigma * 1000) / 1000) and sigma <= float(grid[n * 3 // 4]) < 0.55
    assert drawn == set(range(n * 3 // 4, n))  # the last quarter of the grid, every step of it
    transformer.zero_grad()
    x0_hat.sum().backward()
    assert all(p.grad is not None for p in transformer.parameters() if p.requires_grad)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_draft_gradient_reaches_the_model_through_exactly_the_last_k_steps(k):
    transformer, cond, noise, args = tiny_setup()
    n = args.rollout_steps
    x0_hat, calls = transformer_calls(transformer, lambda: hacking.draft_x0(transformer, noise, cond, args, k))
    assert [g for _, g in calls] == [False] * (n - k) + [True] * k
    grid = sigma_schedule(n, args.shift)
    assert [t for t, _ in calls[-k:]] == pytest.approx([int(float(s) * 1000) / 1000 for s in grid[n - k:n]])
    # DRaFT's x0 is the model's own sample: the same velocities and Euler steps, with and without gradient, so equal
    # to fp32 rounding (assert_close's default 1.3e-6 relative); a step missed or repeated moves it by O(1/n)
    with torch.no_grad():
        torch.testing.assert_close(x0_hat, rollout(transformer, noise, cond, n, args.shift, args.rollout_guidance))
    x0_hat.sum().backward()
    assert all(p.grad is not None for p in transformer.parameters() if p.requires_grad)


def test_quick_comparison_writes_report_numbers_and_figures(world, tmp_path):
    root = os.path.dirname(os.path.dirname(world["flux"]))
    out = str(tmp_path / "hacking")
    toy.main(["hacking", "--quick", "--root", root, "--out", out, "--steps", "1"])  # 12 runs: one step each
    report = open(os.path.join(out, "report.md")).read()
    assert "$" not in report and all(f"| {name} |" in report for name in hacking.RUNS)
    assert "| base |" in report and "| inversion |" in report and hacking.verdict.__doc__
    numbers = json.load(open(os.path.join(out, "numbers.json")))
    assert set(numbers["summary"]["runs"]) == set(hacking.RUNS) and numbers["seeds"] == list(hacking.QUICK["seeds"])
    assert len(numbers["bias"]) == len(hacking.BIAS_SIGMAS)
    for name in hacking.RUNS:
        for seed in hacking.QUICK["seeds"]:
            assert [s for s, _ in numbers["curves"][f"{name} | seed {seed}"]] == [0, 1]
            assert len(numbers["metrics"][f"{name} | seed {seed}"]) == 1
    for name in ("hacking_bias.png", "hacking_curves.png", "hacking_samples.png"):
        assert Image.open(os.path.join(out, name)).size[0] > 0


def test_verdict_follows_the_stated_rule():
    def summary(bias_denoise, inversion):
        return {"differences": {"bias, denoise only": {"sharpness": bias_denoise},
                                "inversion": {"sharpness": inversion}}}
    assert hacking.verdict(summary((-0.01, 0.005), (-0.01, 0.005))) == ("reproduced", "cancelled")
    assert hacking.verdict(summary((-0.01, 0.005), (-0.01, 0.02))) == ("not reproduced", "not cancelled")
    assert hacking.verdict(summary((-0.01, 0.02), (-0.01, 0.005))) == ("not reproduced", "not exploited")
