"""One SRPO training step: Direct-Align on a denoise and an inversion branch, each scored by the SRP reward
(METHOD.md §2-§4; the paper's method section, arXiv 2509.06942).

This file, direct_align.py and srpo_reward.py are the method, and copy as a set into any trainer: they import
torch, transformers (and ftfy) and each other, nothing else of this project. What is model-specific comes in as
two callables:

    velocity(x, sigma) -> v        the model's velocity v = noise - x0 at latents x (conditioning bound in)
    decode(x0_hat) -> images       latents to images in [0, 1], (B, 3, H, W), differentiable

For FLUX, train.py passes flux.velocity with the caption's conditioning and flux.decode with the VAE:

    out = srpo_step(lambda x, s: velocity(transformer, x, s, cond, 3.5), lambda x: decode(vae, x, 720),
                    reward, x0, noise, caption, step, generator)
    optimizer.step()
"""
from contextlib import nullcontext

from direct_align import branch_sigmas, default_gap, direct_align, reward_k, sample_t_star, train_window
from srpo_reward import NEG_WORDS, POS_WORDS, control_prompts, discounted_loss, srpo_loss

BRANCHES = ("denoise", "inversion")


def srpo_step(velocity, decode, reward, x0, noise, caption, step, generator, *, window=(5, 25), shift=3.0,
              length=1000, rho=0.9, k_denoise=(0.1, 0.25), k_inversion=(0.3, 0.01), pos_words=POS_WORDS,
              neg_words=NEG_WORDS, loss="threshold", threshold=0.7, branches=BRANCHES, loss_scale=1.0,
              autocast=nullcontext):
    """Backpropagate both branches of one sample (METHOD.md §2-§4); the defaults are the release's FLUX HPSv2.1
    config. Its Qwen-Image config: window=(5, 40), shift=1, length=100, rho=0.6, k_denoise=(0, 0),
    neg_words=("Concept art", "Painting", "Anime"), loss="discount", branches=("denoise",).

        t*                    ~ U[5, L - 5] from generator         window W = linspace(g[start], g[end], L)
        sigma_from, sigma_to  = branch_sigmas(W, t*, gap(rho))    each branch's m reads its own k schedule
        x0_hat                = direct_align(velocity, x0, noise, sigma_from, sigma_to)
        r                     = reward.srp(decode(x0_hat), pos, neg, k)    pos, neg swapped on the inversion branch
        loss                  = relu(threshold - r)      (loss="threshold", the FLUX release's)
                              or -r * 3u / (1 + 2u)      (loss="discount", the Qwen-Image release's; u = m / L)
                                / len(branches), times loss_scale, backpropagated at once

    x0: the clean latent (the rollout's, from this very noise, or an encoded image); step: the optimizer step
    counted from 0, which picks the control words; reward: an srpo_reward.SRPReward, or anything with its srp;
    loss_scale: 1 / the samples accumulated before the optimizer step; autocast: the context the decode and the
    reward run in (train.py: bf16 autocast on a GPU, METHOD.md §5). Gradients accumulate in the model's .grad.
    Returns the sample's numbers, unscaled: loss, and reward / sigma from, to / k of each branch."""
    W = train_window(*window, shift=shift, length=length)
    t_star = sample_t_star(len(W), generator)
    sigmas = branch_sigmas(W, t_star, default_gap(rho, len(W)))
    pos, neg = control_prompts(caption, step + 1, pos_words, neg_words)  # the release counts steps from 1
    out = {"loss": 0.0}
    for name in branches:
        sigma_from, sigma_to, m = sigmas[name]
        k = reward_k(m, k_denoise if name == "denoise" else k_inversion, len(W))
        # The inversion step enters x0_hat with the opposite sign, so it maximizes the reward with the
        # roles swapped: both branches push the model towards the positive words (METHOD.md §4).
        p, n = (pos, neg) if name == "denoise" else (neg, pos)
        x0_hat = direct_align(velocity, x0, noise, sigma_from, sigma_to)
        with autocast():
            r = reward.srp(decode(x0_hat), [p], [n], k).float()
        value = srpo_loss(r, threshold) if loss == "threshold" else discounted_loss(r, m, len(W))
        value = value.mean() / len(branches)
        (value * loss_scale).backward()
        out["loss"] += value.item()
        out.update({f"reward_{name}": r.item(), f"sigma_{name}_from": sigma_from, f"sigma_{name}_to": sigma_to,
                    f"k_{name}": k})
    return out
