"""Direct-Align: inject a known noise, take one model step, recover the image (arXiv 2509.06942).

Noise convention, used everywhere in this project (FLUX / rectified flow, METHOD.md §1):
    sigma = 1 is pure noise, sigma = 0 is the clean latent
    x_sigma = (1 - sigma) * x0 + sigma * noise
    velocity v = noise - x0
An Euler step from sigma to sigma_next is x + (sigma_next - sigma) * v: denoising when
sigma_next < sigma, inversion when sigma_next > sigma.

Everything here is pure tensor math, model-agnostic. Sigmas may be Python floats or 0-d tensors;
x0 / noise may have any shape; the dtype of x is kept.
"""
import torch

def time_shift(sigma, shift=3.0):
    """SD3-style shift: shift(sigma) = s * sigma / (1 + (s - 1) * sigma).   # METHOD.md §1"""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_schedule(num_steps, shift=3.0):
    """The sampling grid g = shift(linspace(1, 0, N + 1)), float64, from 1 down to 0.   # METHOD.md §1"""
    return time_shift(torch.linspace(1, 0, num_steps + 1, dtype=torch.float64), shift)


def inject_noise(x0, noise, sigma):
    """x_sigma = (1 - sigma) * x0 + sigma * noise.   # METHOD.md §2 step 2"""
    sigma = float(sigma)
    return (1 - sigma) * x0 + sigma * noise


def recover_x0(x, noise, sigma):
    """x0_hat = (x - sigma * noise) / (1 - sigma): undo inject_noise with the known noise.   # METHOD.md §2 step 4"""
    sigma = float(sigma)
    return (x - sigma * noise) / (1 - sigma)


def euler_step(x, velocity, sigma, sigma_next):
    """x_sigma_next = x_sigma + (sigma_next - sigma) * velocity.   # METHOD.md §1"""
    return x + (float(sigma_next) - float(sigma)) * velocity


def predict_x0(x, velocity, sigma):
    """The usual one-step prediction x0_hat = x - sigma * velocity (ReFL); error scaled by sigma.   # METHOD.md §2"""
    return x - float(sigma) * velocity


def direct_align(velocity_fn, x0, noise, sigma_from, sigma_to):
    """One Direct-Align branch (METHOD.md §2):
        x_from = (1 - sigma_from) * x0 + sigma_from * noise                      # inject, no gradient
        x_to   = x_from + (sigma_to - sigma_from) * velocity_fn(x_from, sigma_from)  # gradient flows here only
        x0_hat = (x_to - sigma_to * noise) / (1 - sigma_to)                      # recover with the known noise
    Denoise branch: sigma_to < sigma_from; inversion branch: sigma_to > sigma_from.
    If velocity_fn returns noise - x0 exactly, x0_hat == x0; otherwise
        x0_hat - x0 = (sigma_to - sigma_from) / (1 - sigma_to) * (v - (noise - x0)).
    """
    x0, noise = x0.detach(), noise.detach()
    x = inject_noise(x0, noise, sigma_from)
    x = euler_step(x, velocity_fn(x, sigma_from), sigma_from, sigma_to)
    return recover_x0(x, noise, sigma_to)


def train_window(start=5, end=25, num_steps=50, shift=3.0, length=1000):
    """The training sigmas W = linspace(g[start], g[end], L), decreasing, with g = sigma_schedule(50, 3).
    HPSv2.1 config: start=5, end=25; PickScore config: end=30.   # METHOD.md §3"""
    g = sigma_schedule(num_steps, shift)
    return torch.linspace(float(g[start]), float(g[end]), length, dtype=torch.float64)


def default_gap(rho=0.9, length=1000):
    """The gap gap0 = int((1 - rho) * L) + 1 between the two sigmas of a branch (METHOD.md §3).
    The release evaluates this in float, where (1 - 0.9) * 1000 = 99.99999999999997, so its gap is
    100, not the 101 of exact arithmetic. We follow the release."""
    return int((1 - rho) * length) + 1


def sample_t_star(length=1000, generator=None):
    """t* uniform in [5, L - 5] (METHOD.md §3)."""
    return int(torch.randint(5, length - 4, (1,), generator=generator))


def branch_sigmas(window, t_star, gap0=default_gap()):
    """Sigmas of both branches for one training step (METHOD.md §3), each as (sigma_from, sigma_to, m):
        gap = min(gap0, L - t*, t*)                      (the release calls it k)
        denoise:   m = t*,                 s = min(m + gap, L), from W[L - s] (noisier) to W[L - m]
        inversion: m = max(t* - gap, 1),   s = min(m + gap, L), from W[L - m] (cleaner) to W[L - s]
    m is the index the reward's k-schedules are read at (reward_k). When t* > gap both branches end
    at the same sigma W[L - t*]."""
    L = len(window)
    gap = min(gap0, L - t_star, t_star)
    m = t_star
    s = min(m + gap, L)
    denoise = (float(window[L - s]), float(window[L - m]), m)
    m = max(t_star - gap, 1)
    s = min(m + gap, L)
    inversion = (float(window[L - m]), float(window[L - s]), m)
    return {"denoise": denoise, "inversion": inversion}


def reward_k(m, k_range, length=1000):
    """The SRP weight k = linspace(k_range[0], k_range[1], L)[m].   # METHOD.md §4
    HPS config: denoise (0.1, 0.25), inversion (0.3, 0.01); PickScore: (0.1, 0.5), (0.6, 0.01)."""
    return float(torch.linspace(k_range[0], k_range[1], length, dtype=torch.float64)[m])
