"""Tests of the speed levers of issue #28 on the CPU, tiny random models: a lever changes how fast a step runs, not
what it computes. torch.compile runs here through inductor's C++ backend. Compiling the tiny FLUX's two block
kinds, without and with gradient, is most of this file's time: about a minute on 2 cores (g++ builds each of its 56
fused kernels), seconds when torch's own cache (/tmp/torchinductor_$USER) already holds them."""
import json

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

import flux
from direct_align import sigma_schedule
from test_train import FAST, close_updates, dcp_state, train_here
from tiny import tiny_model_paths


def test_compiled_blocks_train_as_eager_ones_and_resume_bit_for_bit(tmp_path):
    """--compile against --no-compile, 2 steps each, FSDP and DDP with checkpointing. Inductor fuses the blocks'
    float operations and reorders their sums, so each forward and gradient differs from eager in its last bits;
    AdamW divides the gradient by its own scale, so what is left is relative to the update, as close_updates
    measures it (rtol 1e-2): measured 1.6e-4 of it (FSDP; DDP 7.5e-5), where FSDP against DDP, both eager, differ
    by 1.7e-5. A gradient lost, doubled or taken at other weights moves the update by far more than 1e-2 of itself
    (close_updates). Within compile mode the same kernels run in the same order: resume is bit for bit."""
    def run(name, *flags):
        train_here("--output-dir", tmp_path / name, "--lr", "1e-3", *FAST, *flags)
        return dcp_state(tmp_path / name / "checkpoint-2")
    eager = run("eager", "--steps", "2", "--no-compile")
    compiled = run("compiled", "--steps", "2", "--compile")
    ddp = run("ddp", "--steps", "2", "--compile", "--strategy", "ddp", "--gradient-checkpointing")
    train_here("--output-dir", tmp_path / "resumed", "--lr", "1e-3", *FAST, "--steps", "1", "--compile")
    torch._dynamo.reset()  # a resumed run is a new process: it compiles again (from torch's cache, if it has them)
    resumed = run("resumed", "--steps", "2", "--compile", "--resume")

    start = FluxTransformer2DModel.from_pretrained(tiny_model_paths()[0], subfolder="transformer").state_dict()
    for key in start:
        assert close_updates(compiled["model"][key], eager["model"][key], start[key]), key
        assert close_updates(ddp["model"][key], eager["model"][key], start[key]), key  # both differences at once
    assert any(not torch.equal(compiled["model"][k], eager["model"][k]) for k in start)  # it ran compiled code
    for key in start:
        assert torch.equal(resumed["model"][key], compiled["model"][key]), key
    for key, state in compiled["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, resumed["optimizer"]["state"][key][name]), (key, name)
    rows = lambda name: [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}  # noqa: E731
                         for line in open(tmp_path / name / "metrics.jsonl")]
    assert rows("resumed") == rows("compiled") and len(rows("compiled")) == 2


def test_the_compiled_rollout_is_flux_pipelines_loop():
    """flux.rollout with compiled blocks against FluxPipeline's own loop on the same transformer (eager), fp32 on
    the CPU. Eager, the two are the same operations in the same order: the same bits. Compiled, each forward's
    fused operations round differently, by float32's epsilons (1.2e-7) of its output, and 4 Euler steps add them
    up: measured 6e-8 of x0's norm, asserted 1e-5. Weights of one block off by 1e-3 of themselves move x0 by
    1.5e-4 of it, a shift of 1.01 for 1 by 5e-3, guidance 3 for 3.5 by 2e-2."""
    pipe = FluxPipeline.from_pretrained(tiny_model_paths()[0])
    # 4 steps on the unshifted grid: sigmas 1, 0.75, 0.5, 0.25, multiples of 1/1000 that flux.velocity's floor keeps;
    # the scheduler takes them as given (FLUX.1-dev's would shift them by the image's size)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False,
                                                                 shift=1.0)
    sigmas = sigma_schedule(4, 1.0)[:-1].tolist()
    g = torch.Generator().manual_seed(0)
    embeds = dict(encoder_hidden_states=torch.randn(1, 32, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g))
    noise = flux.latent_noise(32, g, "cpu")
    expected = pipe(prompt_embeds=embeds["encoder_hidden_states"], pooled_prompt_embeds=embeds["pooled_projections"],
                    height=32, width=32, sigmas=sigmas, num_inference_steps=4, guidance_scale=3.5,
                    latents=noise.clone(), output_type="latent").images
    cond = flux.conditioning(embeds, 32, torch.device("cpu"))
    assert torch.equal(flux.rollout(pipe.transformer, noise, cond, 4, 1.0, 3.5), expected)
    for block in flux.blocks(pipe.transformer):
        block.compile(fullgraph=True)  # as train.py --compile
    got = flux.rollout(pipe.transformer, noise, cond, 4, 1.0, 3.5)
    assert (got - expected).norm() <= 1e-5 * expected.norm()
