"""Tests of the Qwen-Image toy world: it loads through QwenImagePipeline.from_pretrained and its VAE's latents are
normalized by statistics of the data. Only the quick world is built here (about a minute, beside the quick FLUX
world whose CLIPs it shares); train.py on Qwen-Image is test_qwen.py's; the full world and its steering are
`python -m experiments.toy qwen`."""
import os

import pytest
import torch
from diffusers import QwenImagePipeline

from experiments import toy_qwen, toy_world

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def qwen_world(world):
    return toy_qwen.build(os.path.dirname(os.path.dirname(world["flux"])), seed=0, quick=True)


def test_world_loads_with_qwen_image_pipeline_and_its_latents_are_normalized(qwen_world):
    pipe = QwenImagePipeline.from_pretrained(qwen_world["qwen"])
    image = pipe("a red circle on a gray background", height=64, width=64, num_inference_steps=2, true_cfg_scale=4.0,
                 negative_prompt="", max_sequence_length=qwen_world["max_sequence_length"],
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    # latents_mean / latents_std are the build's scenes': on other scenes each normalized channel has mean near 0 and
    # std near 1 (Qwen-Image's own statistics, the class defaults, would leave means off by up to 1.5, stds by 3x)
    images = toy_world.render(toy_world.make_scenes(256, torch.Generator().manual_seed(7)))
    latents = toy_qwen.encode(pipe.vae, images).view(256, -1, 16, 4).permute(2, 0, 1, 3).reshape(16, -1)
    assert latents.mean(1).abs().max() < 0.15 and (latents.std(1) - 1).abs().max() < 0.15

