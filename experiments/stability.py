"""The paper's gradient-stability claim, sigma by sigma: the reward's gradient with respect to the velocity through
the one-step prediction x0_hat = x_sigma - sigma v against Direct-Align's one step to sigma - delta (METHOD.md §2).
By the chain rule d x0_hat / d v is -sigma for the first and (sigma_to - sigma) / (1 - sigma_to) = -delta /
(1 - sigma + delta) for the second, whatever the reward: their ratio is the predicted column. bench.py's section 2,
and a section of gpu.py."""
import torch

import plots
import train
from direct_align import default_gap, direct_align, inject_noise, predict_x0, train_window
from experiments.measure import md_table, srp_reward
from flux import latent_noise, rollout, velocity

SAMPLES = 4                  # noises (and rollouts) averaged at each sigma


def branch_gap():
    """The release's Direct-Align step in sigma, ~0.021: gap 100 of L = 1000 on the window g[5]..g[25] (METHOD.md
    §3)."""
    window = train_window()
    return float(window[0] - window[default_gap(length=len(window))])


def gradients(velocity_fn, score, samples, sigmas, params, delta):
    """A row per sigma, as each is done: for each (noise, x0) of samples one velocity v = velocity_fn(x_sigma,
    sigma), then the gradient of score(x0_hat) (a scalar) with respect to v and to params through each x0_hat, and
    how far each x0_hat is from x0; means over samples."""
    for sigma in sigmas:
        sums = {}
        for noise, x0 in samples:
            x = inject_noise(x0, noise, sigma)
            v = velocity_fn(x, sigma)
            for name, x0_hat in (("one_step", predict_x0(x, v, sigma)),
                                 ("direct_align", direct_align(lambda *_: v, x0, noise, sigma, sigma - delta))):
                grad_v, *grad_w = torch.autograd.grad(score(x0_hat), [v, *params], retain_graph=True,
                                                      allow_unused=True)
                for key, value in ((f"grad_v_{name}", grad_v.norm()),
                                   (f"grad_w_{name}", torch.stack([g.norm() for g in grad_w if g is not None]).norm()),
                                   (f"x0_error_{name}", (x0_hat - x0).norm() / x0.norm())):
                    sums[key] = sums.get(key, 0.0) + value.item() / len(samples)
        sigma_to = sigma - delta
        yield dict(sigma=sigma, sigma_to=sigma_to, **sums, ratio=sums["grad_v_one_step"] / sums["grad_v_direct_align"],
                   predicted_ratio=sigma * (1 - sigma_to) / delta)


def on_models(m, sigmas, samples=SAMPLES):
    """gradients on the models of measure.load_models: the transformer's velocity, the SRP reward of the decoded
    x0_hat, samples rollouts of the current model from their own noises, the release's branch gap."""
    pairs = []
    for i in range(samples):
        noise = latent_noise(m.res, train.rng(0, "stability", i), m.device)
        pairs.append((noise, rollout(m.transformer, noise, m.cond, m.targs.rollout_steps, m.targs.shift,
                                     m.targs.rollout_guidance)))
    return gradients(lambda x, sigma: velocity(m.transformer, x, sigma, m.cond, m.targs.guidance),
                     lambda x0_hat: srp_reward(m, x0_hat, 0).sum(), pairs, sigmas,
                     [p for p in m.transformer.parameters() if p.requires_grad], branch_gap())


def plot(rows, path):
    """The gradient and the x0 error against sigma, one-step prediction and Direct-Align, as one PNG."""
    sigmas = [r["sigma"] for r in rows]
    plots.save(path, *[plots.line_plot(sigmas, {"one-step x - sigma v": [r[f"{key}_one_step"] for r in rows],
                                                "Direct-Align": [r[f"{key}_direct_align"] for r in rows]},
                                       "sigma (1 = pure noise)", label, log_y=True)
                       for key, label in (("grad_v", "|d reward / d v|"), ("x0_error", "|x0_hat - x0| / |x0|"))])
    print(f"plot: {path}")



def table(rows):
    """The rows as markdown."""
    g = lambda x: f"{x:.3g}"  # noqa: E731
    return md_table(["sigma", "x0 error, one-step", "x0 error, DA", "|dr/dv| one-step", "|dr/dv| DA", "ratio",
                     "predicted", "|dr/dw| one-step", "|dr/dw| DA"],
                    [[f"{r['sigma']:.2f}", g(r["x0_error_one_step"]), g(r["x0_error_direct_align"]),
                      g(r["grad_v_one_step"]), g(r["grad_v_direct_align"]), f"{r['ratio']:.2f}",
                      f"{r['predicted_ratio']:.2f}", g(r["grad_w_one_step"]), g(r["grad_w_direct_align"])]
                     for r in rows])
