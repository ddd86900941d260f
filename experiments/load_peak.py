"""Peak memory of a rank while it loads the transformer under FSDP2: the whole fp32 model first, then sharded
(diffusers' from_pretrained, what train.py did before), against building on the meta device and filling each
rank's shards one tensor at a time (flux.fill_from_checkpoint, what train.py does now).

    python -m experiments.load_peak                  # 2 ranks on the CPU, a ~300M-parameter FLUX: about a minute

Each way runs in its own `torchrun --nproc_per_node=2`, on a FLUX-architecture transformer of width 1536 with random
bf16 weights stored in shards behind an index, as FLUX.1-dev is. A rank reports the peak of its anonymous resident
memory (RssAnon: the tensors it allocates; not the file pages safetensors maps, which are the page cache's) above
what it held before loading, sampled every millisecond; the plan is train.memory_plan's load_peak for the model.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch

from experiments.measure import md_table

MODEL = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
             num_attention_heads=12, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
             axes_dims_rope=(16, 56, 56))  # FLUX.1-dev's head size and RoPE axes, half its width, 6 of its 57 blocks


def anon_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024  # kB


def watch_peak(stop, out):
    """Samples anon_mib() until stop is set; out[0] is the largest seen."""
    while not stop.is_set():
        out[0] = max(out[0], anon_mib())
        time.sleep(0.001)


def load(model_dir, how):
    """One rank's load, FSDP2-sharded either way; returns the peak MiB above the start."""
    import torch.distributed as dist
    from diffusers import FluxTransformer2DModel
    from torch.distributed.fsdp import fully_shard

    from flux import fill_from_checkpoint, transformer_on_meta
    dist.init_process_group("gloo")
    before, peak, stop = anon_mib(), [0.0], threading.Event()
    watcher = threading.Thread(target=watch_peak, args=(stop, peak))
    watcher.start()
    if how == "from_pretrained":
        model = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer", dtype=torch.float32)
    else:
        model = transformer_on_meta(model_dir)
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        fully_shard(block)
    fully_shard(model)
    if how == "sharded":
        fill_from_checkpoint(model.to_empty(device="cpu"), model_dir)
    stop.set()
    watcher.join()
    peak = torch.tensor([max(peak[0], anon_mib()) - before])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print(json.dumps({"how": how, "peak_mib": peak.item()}))
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--load", nargs=2, metavar=("MODEL_DIR", "HOW"), help=argparse.SUPPRESS)  # one rank's part
    args = p.parse_args(argv)
    if args.load:
        return load(*args.load)

    import train
    from diffusers import FluxTransformer2DModel
    with tempfile.TemporaryDirectory() as root:
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**MODEL)
        model = model.to(torch.bfloat16)
        model.save_pretrained(os.path.join(root, "transformer"), max_shard_size="200MB")
        n = sum(p.numel() for p in model.parameters())
        largest = max(p.numel() for p in model.parameters())
        del model
        rows = []
        for how in ("from_pretrained", "sharded"):
            done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                   "-m", "experiments.load_peak", "--load", root, how], capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode:
                sys.exit(f"error: the {how} load failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    plans = {how: train.memory_plan(n, 2, "fsdp" if how == "sharded" else "ddp", largest)["load_peak"] / 2**20
             for how in ("from_pretrained", "sharded")}
    print(f"FLUX-architecture transformer, {n / 1e6:.0f}M parameters (largest tensor {largest / 1e6:.1f}M), "
          f"2 ranks, FSDP2; peak anonymous resident memory per rank while loading, MiB:\n")
    print(md_table(["loading", "measured", "the whole fp32 model", "plan"],
                   [[r["how"], f"{r['peak_mib']:,.0f}", f"{4 * n / 2**20:,.0f}", f"{plans[r['how']]:,.0f}"]
                    for r in rows]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(params=n, largest=largest, rows=rows, plan_mib=plans), f, indent=1)


if __name__ == "__main__":
    main()
