"""What bf16 and fp16 do to SRPO's gradient: the reward's autocast dtype, and the transformer's parameter dtype.

    python -m experiments.precision                 # CPU: ViT-H-14-shaped CLIP, tiny FLUX (~6 min on 2 idle cores)
    python -m experiments.precision --projection    # also the final projections in fp32 (2 more reward modes)
    python -m experiments.precision --only reward --images 2 --json out/reward.json
    python -m experiments.precision --device cuda   # the same with CUDA autocast and CUDA kernels

1. The reward (METHOD.md §4). r = f_img . ((1 + k) f_pos - f_neg) is mostly f_img . (f_pos - f_neg), the difference
   of two nearly equal cosines (the prompts differ by one control word), so rounding in the towers may cancel
   badly. On a transformers CLIPModel of ViT-H-14's shape (HPSv2.1's, PickScore's and CLIP-H's architecture) with
   random weights, srpo_reward.SRPReward.srp and its gradient with respect to [0, 1] images are computed in fp32
   (the reference), under bf16 autocast (train.py) and fp16 autocast (the release), and under each autocast
   with the features cast to fp32 before normalization and dot products (the change proposed for
   srpo_reward.py); fp16 also with the gradient scaled inside the reward, which tells its underflow from its
   rounding. On a CPU, autocast keeps norm in bf16 / fp16 where CUDA's autocast runs it in fp32, so the CPU's
   plain-autocast rows are the worse case.
2. The transformer's parameter dtype (METHOD.md §5). One Direct-Align step, both branches, the SRP loss through
   the tiny VAE and tiny CLIP (both in fp32), on the tiny FLUX and on a wider FLUX-architecture model: the
   transformer's gradient with fp32 parameters and no autocast (the reference), fp32 parameters under bf16
   autocast (the release), FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) under bf16
   autocast (train.py on GPUs; its root casts every float input to bf16), and a bf16 copy of the weights fed
   fp32 inputs, under bf16 autocast. diffusers' FLUX casts its timestep and guidance to the dtype of x_embedder's
   output before multiplying them by 1000, so all three bf16 modes see t and g rounded to bf16 (t = 0.825 becomes
   824, g = 3.5 becomes 3504); an fp32 run given those rounded values separates that from the rest of bf16.
Errors are against the fp32 reference: |a - a_ref| / |a_ref| for values, ||g - g_ref|| / ||g_ref|| and
cosine(g, g_ref) for gradients; the tables give the worst over images (1) or over noises and t* (2).
"""
import argparse
import copy
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoTokenizer, CLIPConfig, CLIPModel
from tqdm import tqdm

import flux
from direct_align import branch_sigmas, default_gap, direct_align, reward_k, train_window
from experiments.measure import VIT_H_14, machine
from srpo_reward import SRPReward, control_prompts, srpo_loss
from tiny import clip_tokenizer, tiny_model_paths
from train import RECIPES, TINY_PROMPTS

# FLUX.1-dev's block layout and head size (2 heads of 128, its rope axes, its text widths), 2 + 2 blocks
WIDE_FLUX = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=128,
                 num_attention_heads=2, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56))
# name: (autocast dtype or None, head, gradient scale). head "srp": SRPReward.srp as it is; "features": the
# projected features cast to fp32 before normalize and dot products (the change proposed for srpo_reward.py);
# "projection": the pooled outputs cast before the final projections. The scale multiplies r before backward and
# divides the image's gradient after, as a GradScaler would, to tell fp16's underflow from its rounding.
REWARD_MODES = {
    "fp32 (reference)": (None, "srp", 1),
    "bf16 autocast (train.py)": (torch.bfloat16, "srp", 1),
    "bf16 autocast, fp32 normalize + dot": (torch.bfloat16, "features", 1),
    "fp16 autocast (the release)": (torch.float16, "srp", 1),
    "fp16 autocast, fp32 normalize + dot": (torch.float16, "features", 1),
    "fp16 autocast, fp32 normalize + dot, gradient x 2^16": (torch.float16, "features", 2 ** 16),
}
PROJECTION_MODES = {  # --projection: does the final projection in fp32 help too?
    "bf16 autocast, fp32 projection + normalize + dot": (torch.bfloat16, "projection", 1),
    "fp16 autocast, fp32 projection + normalize + dot": (torch.float16, "projection", 1),
}
FLUX_MODES = {  # name: how the transformer runs; "fp32": the reference, on the CPU whatever --device
    "fp32 parameters (reference)": "fp32",
    "fp32 parameters, timestep and guidance rounded as under bf16": "fp32, bf16 t",
    "fp32 parameters, bf16 autocast (the release)": "autocast",
    "FSDP2 param_dtype=bf16 (train.py)": "fsdp2",
    "bf16 weights, fp32 inputs": "bf16",
}
RESOLUTION, TEXT_TOKENS, GUIDANCE = 128, 32, 3.5


def rel(a, ref):
    return float((a - ref).norm() / ref.norm())


def cosine(a, b):
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def autocast(device, dtype):
    return torch.autocast(device.type, dtype or torch.bfloat16, enabled=dtype is not None)


# ----------------------------------------------------------------------------------------- 1. the reward

def vit_h_reward(device, seed):
    """SRPReward (kind hps) on a randomly initialized CLIPModel of ViT-H-14's shape, ~1B parameters in fp32, with
    the tiny CLIP tokenizer (its few hundred ids fit ViT-H-14's vocabulary; the prompts' words are whole tokens)."""
    tokenizer = clip_tokenizer()
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(text_config={**VIT_H_14["text_config"], **special}, vision_config=VIT_H_14["vision_config"],
                        projection_dim=VIT_H_14["projection_dim"])
    torch.manual_seed(seed)
    return SRPReward(CLIPModel(config).to(device), tokenizer, "hps")


def smooth_images(n, seed, size=256):
    """n images (n, 3, size, size) in [0, 1]: bicubically upsampled 8 x 8 noise plus a little pixel noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(size, size), mode="bicubic")
    return (0.85 * coarse + 0.15 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


def fp32_head(reward, from_projection):
    """Forward hooks on the CLIP's two final projections that make SRPReward.srp, unchanged, run its last steps in
    fp32 under any autocast. Without from_projection, the projected features are cast to fp32: the change proposed
    for srpo_reward.py (norm, mul and sum are no autocast ops, so the normalization and dot products then stay in
    fp32). With it, the projection itself is recomputed in fp32 from the pooled output. Returns the handles."""
    def hook(module, inputs, output):
        if not from_projection:
            return output.float()
        with torch.autocast(output.device.type, enabled=False):
            bias = None if module.bias is None else module.bias.float()
            return F.linear(inputs[0].float(), module.weight.float(), bias)
    return [p.register_forward_hook(hook) for p in (reward.model.visual_projection, reward.model.text_projection)]


def reward_and_grad(reward, images, pos, neg, k, dtype, head, scale):
    """r (one per image) and dr/dimage, fp32 on the CPU."""
    images = images.clone().requires_grad_(True)
    hooks = [] if head == "srp" else fp32_head(reward, head == "projection")
    with autocast(images.device, dtype):
        r = reward.srp(images, pos, neg, k)
    for h in hooks:
        h.remove()
    (r.float() * scale).sum().backward()  # the images are independent: each gets its own dr_i / dimage_i
    return r.detach().float().cpu(), images.grad.float().cpu() / scale, r.dtype


def reward_section(args, device):
    reward = vit_h_reward(device, args.seed)
    n = args.images
    images = smooth_images(n, args.seed).to(device)
    pairs = [control_prompts(TINY_PROMPTS[i % len(TINY_PROMPTS)], i + 1) for i in range(n)]  # no two-word words
    pos, neg = [p for p, _ in pairs], [q for _, q in pairs]
    with torch.no_grad():  # the reference's parts: how much cancels
        f_img, f_pos, f_neg = reward.embed_images(images), reward.embed_texts(pos), reward.embed_texts(neg)
    cos_pos, cos_neg = (f_img * f_pos).sum(-1).cpu(), (f_img * f_neg).sum(-1).cpu()
    parts = [dict(pos=p, neg=q, cos_pos=float(a), cos_neg=float(b), relative=float(a - b),
                  text_cos=float(t)) for p, q, a, b, t in zip(pos, neg, cos_pos, cos_neg, (f_pos * f_neg).sum(-1))]
    out, ref = {}, None
    modes = {**REWARD_MODES, **(PROJECTION_MODES if args.projection else {})}
    for name, (dtype, head, scale) in tqdm(modes.items(), desc="reward modes"):
        t0 = time.time()
        r, g, r_dtype = reward_and_grad(reward, images, pos, neg, args.k, dtype, head, scale)
        if ref is None:
            ref = (r, g)
        per_image = [dict(r=float(r[i]), r_rel_err=abs(float(r[i] - ref[0][i])) / abs(float(ref[0][i])),
                          r_err_over_relative=abs(float(r[i] - ref[0][i])) / abs(parts[i]["relative"]),
                          grad_rel_err=rel(g[i], ref[1][i]), grad_cos=cosine(g[i], ref[1][i])) for i in range(n)]
        out[name] = dict(r_dtype=str(r_dtype), seconds=time.time() - t0, per_image=per_image,
                         grad_norm=[float(x.norm()) for x in g],
                         **{f"max_{key}": max(p[key] for p in per_image)
                            for key in ("r_rel_err", "r_err_over_relative", "grad_rel_err")},
                         min_grad_cos=min(p["grad_cos"] for p in per_image))
        tqdm.write(f"  {name}: r rel err {out[name]['max_r_rel_err']:.2e}, grad rel err "
                   f"{out[name]['max_grad_rel_err']:.2e} ({out[name]['seconds']:.0f} s)")
    return dict(k=args.k, reference=parts, modes=out)


# ----------------------------------------------------------------------------------------- 2. the transformer

def bf16_timesteps(module, args, kwargs):
    """A forward pre-hook giving an fp32 transformer the timestep and guidance that diffusers' FLUX computes under
    bf16: its forward multiplies them by 1000 after casting them to the dtype of x_embedder's output, so under
    bf16 autocast or with bf16 weights it sees bf16(bf16(t) * 1000), e.g. 824 for t = 0.825 and 3504 for g = 3.5."""
    for key in ("timestep", "guidance"):
        if kwargs.get(key) is not None:
            kwargs[key] = (kwargs[key].bfloat16() * 1000).float() / 1000
    return args, kwargs


def prepare(model, kind, device):
    """A copy of the fp32 model run as kind says, on the device."""
    model = copy.deepcopy(model).to(device).train()
    if kind == "fp32, bf16 t":
        model.register_forward_pre_hook(bf16_timesteps, with_kwargs=True)
    elif kind == "fsdp2":  # train.py's policy on GPUs: one unit per block, then the root
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    elif kind == "bf16":
        model = model.to(torch.bfloat16)
    return model


def flux_step_grad(transformer, amp, x0, noise, cond, vae, reward, t_star, device):
    """The transformer's gradients ({name: flat fp32 CPU tensor}) after one Direct-Align step on both branches, as
    srpo.srpo_step takes it, but with the VAE and the reward in fp32 on the CPU whatever the mode, so that only
    the transformer's precision differs; and the step's loss and rewards. amp: the transformer under bf16
    autocast (flux.velocity adds it on CUDA, this function on a CPU)."""
    window = train_window(5, RECIPES["hps"]["window_end"])
    sigmas = branch_sigmas(window, t_star, default_gap(0.9, len(window)))
    pos, neg = control_prompts(TINY_PROMPTS[0], 1)
    cond = {key: value.to(device) for key, value in cond.items()}

    def v(x, sigma):
        with torch.autocast("cpu", torch.bfloat16, enabled=amp and device.type == "cpu"):
            return flux.velocity(transformer, x, sigma, cond, GUIDANCE)
    out = {"loss": 0.0}
    for name in ("denoise", "inversion"):
        sigma_from, sigma_to, m = sigmas[name]
        k = reward_k(m, RECIPES["hps"][f"k_{name}"], len(window))
        p, n = (pos, neg) if name == "denoise" else (neg, pos)
        x0_hat = direct_align(v, x0.to(device), noise.to(device), sigma_from, sigma_to)
        r = reward.srp(flux.decode(vae, x0_hat.cpu().float(), RESOLUTION), [p], [n], k)
        loss = srpo_loss(r).mean() / 2
        loss.backward()
        out["loss"] += loss.item()
        out[f"reward_{name}"] = r.item()
    grads = {}
    for key, param in transformer.named_parameters():
        g = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad  # FSDP2: DTensors
        grads[key] = g.float().cpu().flatten()
    return grads, out


def compare(grads, out, ref_grads, ref_out, t_ref_grads):
    flat, ref, t_ref = (torch.cat(list(g.values())) for g in (grads, ref_grads, t_ref_grads))
    worst = max(grads, key=lambda key: rel(grads[key], ref_grads[key]) if ref_grads[key].norm() else 0)
    return dict(**out, grad_rel_err=rel(flat, ref), grad_cos=cosine(flat, ref), grad_rel_err_t=rel(flat, t_ref),
                grad_cos_t=cosine(flat, t_ref), loss_rel_err=abs(out["loss"] - ref_out["loss"]) / abs(ref_out["loss"]),
                reward_rel_err=max(abs(out[f"reward_{b}"] - ref_out[f"reward_{b}"]) / abs(ref_out[f"reward_{b}"])
                                   for b in ("denoise", "inversion")),
                worst_tensor=worst, worst_tensor_rel_err=rel(grads[worst], ref_grads[worst]))


def flux_section(args, device):
    flux_dir, clip_dir = tiny_model_paths()
    cpu = torch.device("cpu")
    vae = AutoencoderKL.from_pretrained(flux_dir, subfolder="vae").eval().requires_grad_(False)
    reward = SRPReward(CLIPModel.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(clip_dir), "hps")
    torch.manual_seed(args.seed)
    models = {"tiny FLUX (width 32, 1 + 1 blocks)": FluxTransformer2DModel.from_pretrained(flux_dir,
                                                                                            subfolder="transformer"),
              "FLUX-shaped (width 256, 2 + 2 blocks)": FluxTransformer2DModel(**WIDE_FLUX)}
    if not dist.is_initialized():  # FSDP2 needs a process group: a world of one, as train.py without torchrun
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, device_id=device if device.type == "cuda" else None)
    results = {}
    for model_name, model in models.items():
        rows = {mode: [] for mode in FLUX_MODES}
        for seed in tqdm(range(args.flux_seeds), desc=model_name):
            g = torch.Generator().manual_seed(args.seed + seed)
            cfg = model.config
            embeds = {"encoder_hidden_states": torch.randn(1, TEXT_TOKENS, cfg.joint_attention_dim, generator=g),
                      "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g)}
            cond = flux.conditioning(embeds, RESOLUTION, cpu)
            noise = flux.latent_noise(RESOLUTION, g, cpu)
            x0 = flux.rollout(model, noise, cond, 25, 3.0, 1.0)  # the fp32 model's own sample, as online training
            t_star = int(torch.randint(5, 996, (1,), generator=g))
            runs = {}
            for mode, kind in FLUX_MODES.items():
                dev = cpu if kind.startswith("fp32") else device  # fp32 math: the CPU's is the reference
                runs[mode] = flux_step_grad(prepare(model, kind, dev), kind in ("autocast", "fsdp2", "bf16"), x0,
                                            noise, cond, vae, reward, t_star, dev)
            (ref_grads, ref_out), (t_ref_grads, _) = list(runs.values())[:2]
            for mode, (grads, out) in runs.items():
                rows[mode].append(dict(t_star=t_star, **compare(grads, out, ref_grads, ref_out, t_ref_grads)))
        keys = ("grad_rel_err", "grad_rel_err_t", "loss_rel_err", "reward_rel_err")
        results[model_name] = dict(parameters=sum(p.numel() for p in model.parameters()), modes={
            mode: dict(runs=runs, **{f"max_{key}": max(r[key] for r in runs) for key in keys},
                       min_grad_cos=min(r["grad_cos"] for r in runs), min_grad_cos_t=min(r["grad_cos_t"] for r in runs))
            for mode, runs in rows.items()})
    dist.destroy_process_group()
    return dict(resolution=RESOLUTION, seeds=args.flux_seeds, models=results)


# ----------------------------------------------------------------------------------------- tables

def reward_tables(res):
    ref = ("| pair (pos / neg) | f_img . f_pos | f_img . f_neg | difference | f_pos . f_neg |\n"
           "| --- | --- | --- | --- | --- |\n")
    ref += "".join(f"| {p['pos']} / {p['neg'].split('.')[0]} | {p['cos_pos']:.5f} | {p['cos_neg']:.5f} | "
                   f"{p['relative']:+.2e} | {p['text_cos']:.5f} |\n" for p in res["reference"])
    table = ("| reward mode | r dtype | max rel. err. of r | max err. of r / relative term | "
             "max rel. err. of dr/dimage | min cos(dr/dimage, ref) | s |\n"
             "| --- | --- | --- | --- | --- | --- | --- |\n")
    table += "".join(f"| {name} | {m['r_dtype'].replace('torch.', '')} | {m['max_r_rel_err']:.2e} | "
                     f"{m['max_r_err_over_relative']:.2e} | {m['max_grad_rel_err']:.2e} | {m['min_grad_cos']:.6f} | "
                     f"{m['seconds']:.0f} |\n" for name, m in list(res["modes"].items())[1:])
    return ref, table


def flux_table(res):
    table = ("| model | transformer | rel. err. of the gradient | cos(gradient, ref) | rel. err. against fp32 with "
             "bf16-rounded t, g | cos against it | rel. err. of the loss | rel. err. of r |\n"
             "| --- | --- | --- | --- | --- | --- | --- | --- |\n")
    for model_name, model in res["models"].items():
        for mode, m in list(model["modes"].items())[1:]:
            table += (f"| {model_name} | {mode} | {m['max_grad_rel_err']:.2e} | {m['min_grad_cos']:.6f} | "
                      f"{m['max_grad_rel_err_t']:.2e} | {m['min_grad_cos_t']:.6f} | {m['max_loss_rel_err']:.2e} | "
                      f"{m['max_reward_rel_err']:.2e} |\n")
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--only", choices=("reward", "flux"), help="run one section")
    p.add_argument("--images", type=int, default=4, help="images, each with its own prompt pair (section 1)")
    p.add_argument("--projection", action="store_true", help="also the final projections in fp32 (section 1)")
    p.add_argument("--k", type=float, default=0.25, help="SRP k (section 1)")
    p.add_argument("--flux-seeds", type=int, default=3, help="noises and t* per FLUX model (section 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="out/precision.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    t0 = time.time()
    result = dict(machine=machine(device), torch=torch.__version__, device=str(device))
    if args.only != "flux":
        result["reward"] = reward_section(args, device)
    if args.only != "reward":
        result["transformer"] = flux_section(args, device)
    result["seconds"] = time.time() - t0
    text = f"{result['machine']}, {result['seconds']:.0f} s\n\n"
    if "reward" in result:
        ref, table = reward_tables(result["reward"])
        text += (f"Reference (fp32) cosines, ViT-H-14-shaped CLIP with random weights, k = {args.k}:\n\n{ref}\n"
                 f"SRP reward r and dr/dimage against fp32:\n\n{table}\n")
    if "transformer" in result:
        text += (f"Transformer gradient of one Direct-Align step (both branches) against fp32 parameters without "
                 f"autocast, worst of {args.flux_seeds} draws of noise and t* per model:\n\n"
                 f"{flux_table(result['transformer'])}")
    print(text)
    result["tables"] = text
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
