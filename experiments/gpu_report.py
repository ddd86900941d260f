"""gpu.py's sections gathered into one run and held against the memory plan: OUT/gpu.json (every number) and
OUT/gpu.md (gpu_report.md.template filled in), with the plan's terms computed on this machine's CPU (plan.py).

    python -m experiments.gpu_report --out OUT          # after gpu.py's sections: the last line of experiments/gpu.sh
    python -m experiments.gpu_report --replan experiments/results/gpu-h200.json --out OUT   # against today's plan
    python -m experiments.gpu_report --out OUT --extrapolation experiments/results/gpu-h100.json
        # the full-depth section alone, held against an earlier run's extrapolation from 2 + 4 blocks
"""
import argparse
import datetime
import json
import os
import string
import types

from experiments import bench, plan, stability
from experiments.gpu import GPU, SECTIONS, save
from experiments.measure import FLUX_DEV, md_table, rope_axes
from inputs import fail

TOLERANCE = 0.15                     # a plan term off by more than this is flagged, to be fixed
RELEASE_BATCH, RELEASE_STEPS = 32, 19  # the release's model: saved at step 20, before that step's update
# Dense bf16 tensor TFLOP/s by NVIDIA's spec sheets: the paper's H20 against the H100 / H200 SXM; a 24 GB RTX 4090
# (fp32 accumulation, NVIDIA's Ada whitepaper)
H20_TFLOPS, H100_TFLOPS, RTX_4090_TFLOPS = 148, 989, 165
GOALS_GIB = dict(nf4=22, bf16=44)    # the issue's: the reserved peak of train.py --lora-rank 64 on FLUX.1-dev
REPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_report.md.template")


# ----------------------------------------------------------------------------------------- plan against measurement

def frozen(cfg, m):
    """The plan's frozen term for this run: the fp32 VAE and reward, one prompt's cached text embeddings."""
    return plan.frozen_bytes(m["vae_params"], m["reward_params"], 1, cfg.text_len, cfg.text_width, cfg.pooled_width)


def reduced_plan(cfg, r):
    """plan.rank_memory for this model on one rank, with the activation estimate's per-block terms summed over this
    model's blocks (the estimate itself sums them over FLUX.1-dev's 19 + 38)."""
    m, acts = r["models"], r["plan"]
    tokens, width = cfg.text_len + (cfg.resolution // 16) ** 2, cfg.heads * cfg.head_dim
    activations = dict(acts, **plan.transformer_activations(acts["per_block"], cfg.layers, cfg.single_layers,
                                                            tokens, width))
    plans = {s: plan.rank_memory(m["params"], 1, s, m["block_params"], frozen(cfg, m), activations)
             for s in ("fsdp", "ddp")}
    if m.get("lora_params"):
        plans["lora"] = plan.rank_memory(m["params"], 1, "ddp", m["block_params"], frozen(cfg, m), activations,
                                         m["lora_params"])
    return dict(activations=activations, frozen=frozen(cfg, m), tokens=tokens, width=width, **plans)


def memory_rows(cfg, r):
    """(term, measured bytes, planned bytes or None) for every memory term measured so far."""
    if "params" not in (r.get("models") or {}) or "per_block" not in (r.get("plan") or {}):
        return []
    p, rows = reduced_plan(cfg, r), []
    for s, flags in (("fsdp", "--strategy fsdp"), ("ddp", "--strategy ddp"),
                     ("lora", f"--strategy ddp --lora-rank {cfg.lora_rank}")):
        if (r.get(f"train-{s}") or {}).get("max_memory_gib") and s in p:
            rows.append((f"train.py {flags}, max_memory_allocated", r[f"train-{s}"]["max_memory_gib"] * 2**30,
                         p[s]["total_checkpointed"]))
    a = r.get("anatomy") or {}
    if a.get("weights") is None or "steps" not in a:
        return rows
    ddp, acts, first, steady = p["ddp"], p["activations"], a["steps"][0], a["steps"][-1]
    suffix = "_checkpointed" if a["checkpointing"] else ""
    per_block = r["plan"]["per_block"]
    rows += [
        ("fp32 weights, after load", a["weights"], ddp["weights"]),
        ("VAE + reward (fp32) + text embeddings", a["frozen"], p["frozen"]),
        ("rollout: peak above held (bf16 copies)", steady["rollout_peak"], ddp["rollout_copies"]),
        ("fp32 gradients, kept after the branches", first["branches_kept"], ddp["grads"]),
        ("AdamW states, kept after the first update", first["optimizer_kept"], ddp["optimizer"]),
        ("branches: peak above held (grads + bf16 copies + activations)", steady["branches_peak"],
         ddp["grads"] + ddp[f"training{suffix}"]),
        ("VAE decode, forward + backward: peak above held", a["fixed"]["vae_decode_peak"], acts[f"vae_decode{suffix}"]),
        ("reward, forward + backward: peak above held", a["fixed"]["reward_peak"], acts["reward"])]
    for kind in ("double", "single"):
        copy = 2 * r["models"][f"{kind}_params"]
        rows += [(f"{kind} block, forward with grad: held (activations + bf16 weights)", a["blocks"][kind]["held"],
                  per_block[kind] + copy),
                 (f"{kind} block, checkpointed: held (its input + bf16 weights)",
                  a["blocks"][kind]["held_checkpointed"], p["tokens"] * p["width"] * 2 + copy)]
    rows += [("optimizer step: peak above held (temporaries, not in the plan)", steady["optimizer_peak"], None),
             ("bare model, whole step: peak", max(steady[f"{q}_max"] for q in ("rollout", "branches", "optimizer")),
              ddp["total_checkpointed"])]
    return rows


def flux_dev_extrapolation(cfg, r):
    """FLUX.1-dev's step from the reduced model's: each phase measured on the bare model plus, for the 17 double and
    34 single blocks it lacks, their measured per-block cost (a rollout runs each block's forward once a step; a
    branch its forward, recomputation and backward); AdamW's time scales with the parameters a rank steps.
    EXTRAPOLATED, not measured."""
    m, a = r.get("models"), r.get("anatomy")
    if not (m and a and "steps" in a):
        return None
    b, s = a["blocks"], a["steps"][-1]
    more_double = FLUX_DEV["num_layers"] - cfg.layers
    more_single = FLUX_DEV["num_single_layers"] - cfg.single_layers
    rollout_s = s["rollout_s"] + a["rollout_steps"] * (more_double * b["double"]["forward_s"]
                                                       + more_single * b["single"]["forward_s"])
    branches_s = s["branches_s"] + a["branches"] * (more_double * b["double"]["train_s"]
                                                    + more_single * b["single"]["train_s"])
    optimizer_s = s["optimizer_s"] * m["target_params"] / m["params"]  # one GPU holding all of it
    forward_s = b["rest_forward_s"] + cfg.layers * b["double"]["forward_s"] \
        + cfg.single_layers * b["single"]["forward_s"]
    forward_growth = 1 + (more_double * b["double"]["forward_s"] + more_single * b["single"]["forward_s"]) / forward_s
    bare_step = s["rollout_s"] + s["branches_s"] + s["optimizer_s"]
    train_py = (r.get("train-fsdp") or {}).get("step_time_s")
    out = dict(params=m["target_params"], rollout_s=rollout_s, branches_s=branches_s, prompt_s=rollout_s + branches_s,
               optimizer_one_gpu_s=optimizer_s, train_py_over_bare=train_py / bare_step if train_py else None,
               # FSDP per prompt and rank: bf16 all-gathers of the weights (rollout once; each branch's forward and
               # its backward once each) and fp32 reduce-scatters of the gradients (each branch's backward)
               communication_bytes_per_prompt=(2 * 5 + 4 * 2) * m["target_params"], gpus={})
    lora = r.get("train-lora") or {}
    if "rollout_s" in lora:  # train.py's LoRA step on this model, plus the blocks it lacks at full fine-tuning's cost
        out.update(lora_rollout_s=lora["rollout_s"] + rollout_s - s["rollout_s"],
                   lora_branches_s=lora["branches_s"] + branches_s - s["branches_s"])
        out["one_gpu_hours"] = release_hours(out["lora_rollout_s"], out["lora_branches_s"], lora["rest_s"])
    sampled = r.get("sample") or {}
    if "image_s" in sampled:  # sample.py: only its transformer's share grows, as a forward does at 720 x 720
        out.update(sample_transformer_s=sampled["transformer_s"] * forward_growth,
                   sample_image_s=sampled["image_s"] + sampled["transformer_s"] * (forward_growth - 1))
    blocks = [m["double_params"]] * FLUX_DEV["num_layers"] + [m["single_params"]] * FLUX_DEV["num_single_layers"]
    for gpus in (8, 32):
        prompts = RELEASE_BATCH // gpus
        step = prompts * (rollout_s + branches_s) + optimizer_s / gpus
        memory = plan.rank_memory(m["target_params"], gpus, "fsdp", blocks, frozen(cfg, m), r["plan"]) \
            if "per_block" in (r.get("plan") or {}) else None
        out["gpus"][gpus] = dict(prompts_per_gpu=prompts, step_s=step, minutes=RELEASE_STEPS * step / 60,
                                 memory_plan=memory and memory["total_checkpointed"])
    return out


def release_hours(rollout_s, branches_s, rest_s):
    """{updates: hours} of the release's recipe on one GPU, for its 19 updates and the 20 steps it runs: each update
    RELEASE_BATCH prompts one at a time (a rollout and the branches each) and the rest of a step once."""
    return {updates: updates * (RELEASE_BATCH * (rollout_s + branches_s) + rest_s) / 3600
            for updates in (RELEASE_STEPS, RELEASE_STEPS + 1)}


# ----------------------------------------------------------------------------------------- the report

def gib(b):
    return "n/a" if b is None else f"{b / 2**30:.2f}"


def num(x, fmt=".3f"):
    return "n/a" if x is None else format(x, fmt)


def flop(flops):
    """TFLOP, three digits below 100 (a tiny model's), whole ones above."""
    return format(flops / 1e12, ".3g" if flops < 1e14 else ",.0f")


def ratio(measured, planned):
    if measured is None or not planned:
        return "", ""
    q = measured / planned
    return f"{q:.2f}", "" if abs(q - 1) <= TOLERANCE else f"**off by {100 * (q - 1):+.0f}%**"


def report(cfg, r):
    """gpu.md: the template filled with the run's numbers (fill), without the sections it has none for."""
    m = r.get("models") or (r.get("full-depth") or {}).get("models") or {}
    notes = dict(r["notes"], **({"memory": "on a CPU the process's resident set, not the plan's terms"}
                                if m.get("device") == "CPU" else {}))
    f = dict(resolution=cfg.resolution, device=m.get("device", "?"), torch=m.get("torch", "?"), date=r["date"],
             heads=cfg.heads, head_dim=cfg.head_dim, rope=rope_axes(cfg.head_dim), vae_width=cfg.vae_width,
             reward="ViT-H-14-sized CLIP" if cfg.reward else "tiny CLIP", text_len=cfg.text_len,
             lora_rank=cfg.lora_rank,
             seconds=", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items() if v is not None),
             notes="".join(f"- {name}: {note}\n" for name, note in notes.items()))
    if r.get("models"):
        f.update(layers=cfg.layers, single_layers=cfg.single_layers, params=num(m.get("params", 0) / 1e9, ".2f"))
    names = dict(fsdp="fsdp", ddp="ddp", lora=f"ddp, LoRA rank {cfg.lora_rank}")
    trains = [(names[s], r[f"train-{s}"]) for s in names if r.get(f"train-{s}")]
    if trains:
        f["train_steps"], f["train_table"] = cfg.train_steps, md_table(
            ["strategy", "status", "step s", "rollout s", "branches s", "rest s", "max allocated GiB"],
            [[s, t["status"], num(t["step_time_s"]), num(t["rollout_s"]), num(t["branches_s"]), num(t.get("rest_s")),
              num(t["max_memory_gib"], ".2f")] for s, t in trains])
    rows = memory_rows(cfg, r)
    if rows:
        f["tolerance"], f["memory_table"] = f"{TOLERANCE:.0%}", md_table(
            ["term", "measured GiB", "plan GiB", "measured / plan", ""],
            [[t, gib(mb), gib(pb), *ratio(mb, pb)] for t, mb, pb in rows])
    a = r.get("anatomy") or {}
    if "blocks" in a:
        b, fixed, s = a["blocks"], a["fixed"], a["steps"][-1]
        ms = lambda seconds, fmt=".1f": num(1e3 * seconds, fmt)  # noqa: E731
        if "weights_without_gradient" in s:  # older runs did not count them
            f.update(weights_without_gradient=s["weights_without_gradient"], weight_tensors=a["weight_tensors"])
        f["precision"] = "bf16 autocast, checkpointed" if a["checkpointing"] else "fp32"
        f["parts_table"] = md_table(["part", "ms"], [
            ["double block: forward (a rollout step)", ms(b["double"]["forward_s"], ".2f")],
            ["single block: forward", ms(b["single"]["forward_s"], ".2f")],
            ["rest of the transformer: forward", ms(b["rest_forward_s"], ".2f")],
            ["double block: forward + recompute + backward (a branch)", ms(b["double"]["train_s"], ".2f")],
            ["single block: forward + recompute + backward", ms(b["single"]["train_s"], ".2f")],
            ["VAE decode: forward + backward", ms(fixed["vae_decode_s"])],
            ["reward: forward + backward", ms(fixed["reward_s"])],
            [f"rollout, {a['rollout_steps']} steps", ms(s["rollout_s"])],
            [f"{a['branches']} branches", ms(s["branches_s"])],
            ["... less their blocks (what does not grow with depth)", ms(s["branches_s"] - a["branches"] * (
                cfg.layers * b["double"]["train_s"] + cfg.single_layers * b["single"]["train_s"]))],
            ["... against VAE decode + reward, once per branch",
             ms(a["branches"] * (fixed["vae_decode_s"] + fixed["reward_s"]))],
            ["clip + AdamW", ms(s["optimizer_s"])]])
    if (r.get("bench") or {}).get("steps"):
        f.update(bench_repeats=r["bench"]["repeats"], bench_table=bench.table(r["bench"]["steps"]))
    if (r.get("stability") or {}).get("rows"):
        f.update(stability_samples=r["stability"]["samples"], stability_table=stability.table(r["stability"]["rows"]))
    ro = r.get("rollout") or {}
    if "seconds" in ro:
        t, host = list(ro["seconds"].values()), ro.get("host_seconds", {})
        if len(t) >= 4 and "no autocast" in list(ro["seconds"])[2]:  # on a GPU: the loops with precisions swapped
            f.update(same_precision_off=num(t[2] / t[1]), same_precision_on=num(t[0] / t[3]),
                     autocast_ours=num(t[0] / t[2]), autocast_pipeline=num(t[3] / t[1]))
        f.update(rollout_steps=ro["steps"], ours_over_pipeline=num(ro["ours_over_pipeline"]),
                 slower="not slower" if ro["ours_over_pipeline"] <= 1.02 else "SLOWER",
                 rollout_table=md_table(["loop", "s per rollout", "/ FluxPipeline", "host s (until queued)"],
                                        [[k, num(v), num(v / t[1]), num(host.get(k))]
                                         for k, v in ro["seconds"].items()]))
    ex = r.get("extrapolation")
    sa = r.get("sample") or {}
    if "image_s" in sa:
        st = sa["settings"]
        rows = [["this model (measured)", num(sa["image_s"]), num(sa["transformer_s"])]]
        if ex:
            rows.append(["FLUX.1-dev, 19 + 38 blocks (extrapolated by the per-block forward times)",
                         num(ex["sample_image_s"]), num(ex["sample_transformer_s"])])
        f.update(sample_settings=f"{st['height']}x{st['width']}, {st['num_inference_steps']} steps, guidance "
                                 f"{st['guidance_scale']}, {st['max_sequence_length']} tokens",
                 sample_images=sa["images"],
                 sample_table=md_table(["model", "s per image (PNG included)", "transformer s per image"], rows))
    if ex:
        factor = ex["train_py_over_bare"]
        scaled = lambda x: num(x * factor, ".1f") if factor else "n/a"  # noqa: E731
        rows = [["rollout per prompt, s", num(ex["rollout_s"], ".1f"), scaled(ex["rollout_s"])],
                ["two branches per prompt, s", num(ex["branches_s"], ".1f"), scaled(ex["branches_s"])]]
        for gpus, g in ex["gpus"].items():
            rows += [[f"{gpus} GPUs, {g['prompts_per_gpu']} prompt(s) each: s per optimizer step",
                      num(g["step_s"], ".1f"), scaled(g["step_s"])],
                     [f"{gpus} GPUs: minutes for {RELEASE_STEPS} steps", num(g["minutes"], ".1f"),
                      scaled(g["minutes"])],
                     [f"{gpus} GPUs: memory per rank, plan (GiB)", gib(g["memory_plan"]), ""]]
        if "one_gpu_hours" in ex:  # already train.py's step: its column
            rows += [[f"1 GPU, --lora-rank {cfg.lora_rank} (bf16 base): s a prompt", "",
                      num(ex["lora_rollout_s"] + ex["lora_branches_s"], ".1f")]]
            rows += [[f"1 GPU, --lora-rank {cfg.lora_rank}: hours for {updates} updates", "", num(hours, ".2f")]
                     for updates, hours in ex["one_gpu_hours"].items()]
        minutes = ex["gpus"][32]["minutes"] * (factor or 1)
        f.update(target_params=f"{ex['params'] / 1e9:.1f}", factor=num(factor, ".2f"), release_batch=RELEASE_BATCH,
                 release_steps=RELEASE_STEPS, h20_tflops=H20_TFLOPS, h100_tflops=H100_TFLOPS,
                 slowdown=f"{H100_TFLOPS / H20_TFLOPS:.1f}", minutes=f"{minutes:.1f}",
                 h20_minutes=f"{minutes * H100_TFLOPS / H20_TFLOPS:.0f}",
                 communication_gb=f"{ex['communication_bytes_per_prompt'] / 1e9:.0f}",
                 extrapolation_table=md_table(["FLUX.1-dev, extrapolated", "bare model", "x train.py overhead"], rows))
    if (r.get("full-depth") or {}).get("runs"):
        f.update(full_depth_fields(cfg, r))
    return fill(open(REPORT).read(), f)


def flux_dev_sized(cfg):
    """Whether the full-depth section ran FLUX.1-dev's size, the one the one-GPU plan is for."""
    return (tuple(cfg.full_depth) == (FLUX_DEV["num_layers"], FLUX_DEV["num_single_layers"])
            and (cfg.heads, cfg.head_dim) == (FLUX_DEV["num_attention_heads"], FLUX_DEV["attention_head_dim"])
            and (cfg.resolution, cfg.text_len) == (plan.RESOLUTION, plan.TEXT_TOKENS) and cfg.reward is not None
            and cfg.vae_width == 128 and cfg.lora_rank in plan.ONE_GPU_RANKS)


def full_depth_fields(cfg, r):
    """Section 9's fields: the full-depth runs, held against the one-GPU plan (plan.one_gpu_plan; where the run was
    FLUX.1-dev's size) and against the extrapolation from 2 + 4 blocks (full_depth_extrapolation)."""
    fd, ex = r["full-depth"], r.get("full_depth_extrapolation")
    ok = {run["base"]: run for run in fd["runs"] if run["status"] == "ok"}
    planned = {row["base"]: row for row in (r.get("one_gpu_plan") or {}).get("rows", [])
               if row["rank"] == cfg.lora_rank}
    models = fd["models"]
    f = dict(full_layers=cfg.full_depth[0], full_single_layers=cfg.full_depth[1], full_steps=cfg.full_depth_steps,
             full_params=num(models["params"] / 1e9, ".3g"), written_gb=num(models["written_bytes"] / 1e9, ".3g"),
             write_s=num(models["seconds"], ".0f"), forward_tflop=flop(fd["forward_flops"]),
             step_tflop=flop(fd["step_flops"]), full_rollout_steps=fd["rollout_steps"],
             full_branches=fd["branches"])
    f["full_depth_table"] = md_table(
        ["base", "status", "step s", "rollout s", "branches s", "rest s", "TFLOP/s, step", "TFLOP/s, rollout",
         "TFLOP/s, branches", "max allocated GiB", "max reserved GiB", "card's used GiB"],
        [[run["base"], run["status"], *(num(run.get(k)) for k in ("step_time_s", "rollout_s", "branches_s", "rest_s")),
          *(num(run.get(k), ".3g") for k in ("tflops", "rollout_tflops", "branches_tflops")),
          *(num(run.get(k), ".2f") for k in ("max_memory_gib", "max_reserved_gib", "process_gib"))]
         for run in fd["runs"]])
    gpu = [base for base, run in ok.items() if run.get("max_reserved_gib")]
    if gpu:
        rows, source = [], (r.get("one_gpu_plan") or {}).get("reserve_source", "n/a")
        for base in gpu:
            run, p = ok[base], planned.get(base)
            allocated, reserved, card = (run[k] * 2**30 for k in ("max_memory_gib", "max_reserved_gib", "process_gib"))
            planned_reserved = p and p["allocated"] + p["reserve"]
            rows += [[f"{base}: max allocated", gib(allocated), gib(p and p["allocated"]),
                      *ratio(allocated, p and p["allocated"])],
                     [f"{base}: max reserved (allocated + the allocator's reserve)", gib(reserved),
                      gib(planned_reserved), *ratio(reserved, planned_reserved)],
                     [f"{base}: the card's used (reserved + what torch does not see)", gib(card),
                      gib(p and p["total"]), *ratio(card, p and p["total"])],
                     [f"{base}: card's used - reserved (the context; plan: assumed)", gib(card - reserved),
                      gib(p and p["context"]), *ratio(card - reserved, p and p["context"])],
                     [f"{base}: reserved / allocated (plan: {source})", num(reserved / allocated, ".2f"),
                      num(p and planned_reserved / p["allocated"], ".2f"), "", ""]]
        f["full_memory_table"] = ("Memory against the one-GPU plan (plan.one_gpu_row, PLANNED for FLUX.1-dev at "
                                  f"rank {cfg.lora_rank}), GiB:\n\n" + md_table(
                                      ["term", "measured", "plan", "measured / plan", ""], rows))
        f["goals"] = "; ".join(f"{base} base {ok[base]['max_reserved_gib']:.2f} GiB (goal: under {GOALS_GIB[base]}): "
                               + ("met" if ok[base]["max_reserved_gib"] < GOALS_GIB[base] else "**not met**")
                               for base in gpu if base in GOALS_GIB)
    if ex and tuple(cfg.full_depth) == (FLUX_DEV["num_layers"], FLUX_DEV["num_single_layers"]):  # its target
        measured = lambda base, key: num(ok[base][key]) if base in ok else "n/a"  # noqa: E731
        f["extrapolation_source"] = ex["source"]
        f["full_extrapolation_table"] = md_table(
            ["a prompt", "bare model + blocks", "train.py LoRA + blocks", "measured, bf16 base", "measured, nf4 base"],
            [[f"{phase} s", num(ex[f"{phase}_s"]), num(ex.get(f"lora_{phase}_s")), measured("bf16", f"{phase}_s"),
              measured("nf4", f"{phase}_s")] for phase in ("rollout", "branches")])
        if "bf16" in ok and "lora_rollout_s" in ex:
            q = {phase: ok["bf16"][f"{phase}_s"] / ex[f"lora_{phase}_s"] for phase in ("rollout", "branches")}
            f["full_extrapolation_verdict"] = (
                "Measured on the bf16 base over the LoRA extrapolation: "
                + ", ".join(f"{phase} {x:.2f}x" for phase, x in q.items()) + "; "
                + ("within" if all(abs(x - 1) <= TOLERANCE for x in q.values()) else "**outside**")
                + f" the {TOLERANCE:.0%} tolerance.")
    hours = {base: release_hours(run["rollout_s"], run["branches_s"], run["rest_s"]) for base, run in ok.items()}
    if hours and models["device"] != "CPU":
        f.update(hours_batch=RELEASE_BATCH, hours_updates=RELEASE_STEPS, hours_steps=RELEASE_STEPS + 1)
        f["full_hours_table"] = md_table(
            ["base", *(f"hours, {updates} updates" for updates in (RELEASE_STEPS, RELEASE_STEPS + 1)),
             f"... up to, on an RTX 4090 ({RTX_4090_TFLOPS} against {H100_TFLOPS} dense bf16 TFLOP/s, compute alone)"],
            [[base, *(num(h, ".2f") for h in hs.values()), num(hs[RELEASE_STEPS + 1] * H100_TFLOPS / RTX_4090_TFLOPS,
                                                               ".1f")] for base, hs in hours.items()])
    return f


def fill(template, fields):
    """template's sections (at each ## heading) filled in, each with those of its paragraphs whose fields are all
    known; a section whose heading has an unknown field is left out: the run has no numbers for it."""
    sections = []
    for section in template.split("\n## "):
        paragraphs = []
        for paragraph in section.split("\n\n"):
            try:
                paragraphs.append(string.Template(paragraph).substitute(fields).strip("\n"))
            except KeyError:
                if not paragraphs:
                    break
        sections.append("\n\n".join(p for p in paragraphs if p))
    return "\n\n## ".join(s for s in sections if s) + "\n"


# ----------------------------------------------------------------------------------------- the run

def gathered(out):
    """The sections' files in out as one run: each section's result, its seconds, and a note for each that did not
    finish or left no file."""
    r = dict(seconds={}, notes={})
    for name in SECTIONS:
        path = os.path.join(out, f"{name}.json")
        if not os.path.isfile(path):
            r["notes"][name] = "no result: not run, or failed (log.txt)"
            continue
        r[name] = json.load(open(path))
        r["seconds"][name] = r[name].pop("elapsed_s", None)
        if r[name]["status"] != "ok":
            r["notes"][name] = r[name]["status"]
    first = r.get("models") or r.get("full-depth") or {}  # full-depth alone: its own date and sizes
    r["date"] = first.pop("date", datetime.date.today().isoformat())
    r["config"] = first.pop("config", {})
    return r


def earlier_run(path):
    """A run's gpu.json, to be held against the plan as it is now."""
    try:
        r = json.load(open(path))
    except (OSError, ValueError) as e:
        fail(f"--replan {path}: cannot read it ({getattr(e, 'strerror', None) or e}; expected a gpu.json this script "
             f"wrote)")
    if not (isinstance(r, dict) and {"date", "notes", "models"} <= r.keys()):
        fail(f"--replan {path}: expected a gpu.json this script wrote")
    r["notes"]["plan"] = f"the plan column recomputed on {datetime.date.today().isoformat()} on a CPU; every " \
                         f"measurement is the run's of {r['date']}"
    return r


def full_depth_extrapolation(path, r):
    """The extrapolation from 2 + 4 blocks that the full-depth runs are held against: that of the run at path (a
    gpu.json), or the run's own; with its source named."""
    if not path:
        return r["extrapolation"] and dict(r["extrapolation"], source="this run's sections 3 and 1")
    earlier = earlier_run(path)
    ex = flux_dev_extrapolation(types.SimpleNamespace(**dict(GPU, **earlier.get("config", {}))), earlier)
    if ex is None:
        fail(f"--extrapolation {path}: the run has no anatomy section to extrapolate from")
    return dict(ex, source=f"{path}: {earlier['models']['device']}, {earlier['date']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of gpu.py's SECTION.json files; gpu.json and gpu.md go there")
    p.add_argument("--replan", metavar="GPU_JSON", help="a run's gpu.json instead of --out's sections")
    p.add_argument("--extrapolation", metavar="GPU_JSON", help="hold the full-depth runs against this run's "
                   "extrapolation from 2 + 4 blocks (a gpu.json this script wrote); default: the run's own")
    args = p.parse_args(argv)
    r = earlier_run(args.replan) if args.replan else gathered(args.out)
    r["plan"] = plan.activation_estimate()  # FLUX.1-dev's width, counted on this machine's CPU: 15 s on 2 cores
    cfg = types.SimpleNamespace(**dict(GPU, **r.get("config", {})))  # the run's own sizes; older runs lack some
    r["memory"] = [dict(term=t, measured=mb, plan=pb) for t, mb, pb in memory_rows(cfg, r)]
    r["extrapolation"] = flux_dev_extrapolation(cfg, r)
    if r.get("full-depth"):
        r["one_gpu_plan"] = plan.one_gpu_plan(plan.one_gpu_counts(), r["plan"]) if flux_dev_sized(cfg) else None
        r["full_depth_extrapolation"] = full_depth_extrapolation(args.extrapolation, r)
    os.makedirs(args.out, exist_ok=True)
    save(args.out, "gpu", r)
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write(report(cfg, r))
    print(open(os.path.join(args.out, "gpu.md")).read())


if __name__ == "__main__":
    main()
