"""Tests of plan.py's Qwen-Image plan: its counts against Qwen-Image's layer shapes by hand, its rows' arithmetic, and
the two things the Qwen activation estimate assumes of the model (a bf16 block input; a VAE that cannot checkpoint)."""
import pytest
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from experiments import plan

D, HEAD, TXT = 3072, 128, 3584  # Qwen-Image's width, head size and text width (Qwen2.5-VL's hidden size)
BLOCK = 36 * D * D + 30 * D + 4 * HEAD  # img_mod, txt_mod (D -> 6D), 8 attention projections, 2 MLPs (D -> 4D -> D)
ROOT = 3 * D * D + (256 + 64 + TXT + 64) * D + 6 * D + TXT + 64  # time embedding, img_in, txt_in, norm_out, proj_out
UNUSED = 9 * D * D + 6 * D  # the last block's to_add_out and txt_mlp (qwen.unused)
# rank r on a linear in -> out adds r (in + out): 8 attention projections D -> D, 4 MLP linears D <-> 4D; the last
# block has no adapters on its unused to_add_out (2D) and txt_mlp (2 x 5D)
LORA_PER_RANK = 60 * (8 * 2 * D + 4 * 5 * D) - (2 * D + 2 * 5 * D)


@pytest.fixture(scope="module")
def counts():
    return plan.one_gpu_counts("qwen")  # a few seconds: the 20B model on the meta device, twice


def test_qwen_image_counts_match_its_layer_shapes_by_hand(counts):
    c = counts
    assert c["params"] == 60 * BLOCK + ROOT == 20_430_401_088
    assert c["block_params"] == [BLOCK] * 60 and c["unused_params"] == UNUSED
    assert c["linear_weights"] == 60 * 36 * D * D + 3 * D * D + (256 + 64 + TXT + 64) * D
    assert c["largest_linear"] == 6 * D * D  # the modulations
    assert c["lora_params"] == {64: 64 * LORA_PER_RANK} and LORA_PER_RANK == 6_598_656


def test_qwen25_vl_7b_count_matches_its_shapes_by_hand():
    """Qwen2.5-VL-7B as plan.py counts it: the language model (GQA: 4 KV heads of 128; biases on q, k, v), an untied
    lm_head, and the vision tower (a 2 x 14 x 14 patch conv, 32 blocks with SwiGLU MLPs, the 2 x 2 patch merger)."""
    h, i, layers, vocab, kv = TXT, 18944, 28, 152064, 4 * HEAD
    language = vocab * h + layers * (2 * (h * h + h) + 2 * (h * kv + kv) - h + 3 * h * i + 2 * h) + h
    w, wi = 1280, 3420
    vision = 3 * 2 * 14 * 14 * w + 32 * (2 * w + 3 * w * w + 3 * w + w * w + w + 2 * (w * wi + wi) + wi * w + w) \
        + w + 16 * w * w + 4 * w + 4 * w * h + h
    counted = plan.count_params(lambda: Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**plan.QWEN25_VL_7B)))
    assert counted == language + vision + vocab * h == 8_292_166_656
    assert plan.count_params(plan.MODELS["qwen"]["text_encoders"]) == counted


def fake_activations():
    return dict(per_block=dict(double=5e8, other=6e7), transformer=3e10, transformer_checkpointed=8e8,
                transformer_recompute=5e8, vae_decode=1e10, vae_decode_checkpointed=1e10, vae_kept=1e10, reward=1.5e9)


@pytest.mark.parametrize("world", [1, 8, 16, 32])
def test_full_fine_tuning_rows_hold_4_bytes_a_weight_and_12_a_trained_one_over_the_world(counts, world):
    """FSDP: fp32 weights, and fp32 grads and AdamW's two states of every weight but the unused ones, all divided by
    the world; the rollout's gathered bf16 copy of all 20.4B weights, the VAE's saved tensors and the reward's
    together in the backward (the VAE cannot checkpoint)."""
    c, acts = counts, fake_activations()
    n, trained = c["params"], c["params"] - UNUSED
    row = plan.rank_memory(n, world, "fsdp", c["block_params"], 7, acts, 0, c["unused_params"], (80, 141))
    # exact (==): integer byte counts over a power of 2, below 2^53 in float64
    assert (row["weights"], row["grads"], row["optimizer"]) == (4 * n / world, 4 * trained / world, 8 * trained / world)
    compute = 2 * (2 * BLOCK + ROOT) + 6 * BLOCK
    training = 8e8 + compute + 1e10 + 1.5e9
    assert row["training_checkpointed"] == training and row["activations_checkpointed"] == 8e8 + 1e10 + 1.5e9
    assert row["total_checkpointed"] == (4 * n + 12 * trained) / world + 7 + max(training, 2 * n)
    for card in (80, 141):
        assert row[f"fits_{card}gb_checkpointed"] == (row["total_checkpointed"] <= 0.9 * card * 2**30)


def test_one_gpu_rows_match_a_sum_by_hand(counts, tmp_path):
    """Both bases at rank 64, 128 text tokens, against their terms by hand: a 4-bit base holds flux.NF4_BYTES a
    linear weight, bf16 elsewhere; the held text is two prompts' and two negatives' (5 tokens each)."""
    c, acts = counts, fake_activations()
    p = plan.one_gpu_plan(c, acts, str(tmp_path), text_tokens=128)  # no metrics there: the assumed 10% reserve
    assert p["cards"] == (24, 48, 80, 141) and [r["base"] for r in p["rows"]] == ["bf16", "nf4"]
    vision = plan.vision_params()
    for row in p["rows"]:
        nf4 = row["base"] == "nf4"
        base = (0.5 + 1 / 64 + 4 / (64 * 256)) * c["linear_weights"] + 2 * (c["params"] - c["linear_weights"]) \
            if nf4 else 2 * c["params"]
        frozen = (2 if nf4 else 4) * (c["reward_params"] + c["vae_params"])
        lora = 64 * LORA_PER_RANK
        reward = 1.5e9 - (2 * vision if nf4 else 0)  # bf16 vision weights make no bf16 copies
        activations = 8e8 + 2 * lora + max(1e10, 1e10 + reward, 5e8)
        allocated = base + 16 * lora + frozen + 2 * 2 * (128 + 5) * TXT + activations + (2 * 6 * D * D if nf4 else 0)
        assert row["allocated"] == pytest.approx(allocated, rel=1e-12)
        assert row["total"] == pytest.approx(1.1 * allocated + 2**30, rel=1e-12)


def test_qwen_block_input_is_bf16_tokens_by_width():
    """What checkpointing keeps of a block (transformer_activations: tokens x width x 2 bytes): the image and text
    streams in bf16 under autocast, and the (1, width) time embedding, on the narrow model the estimate measures."""
    tokens, width = 16 + (plan.RESOLUTION // 16) ** 2, 24 * 8
    out = plan.narrow_blocks("qwen", 16, 8)
    assert out["input_double"] == 2 * (tokens + 1) * width


def test_qwen_vae_decode_is_held_whole_through_the_rewards_backward(monkeypatch):
    """diffusers cannot checkpoint Qwen-Image's VAE: the estimate says so (checkpointed = not), and keeps all its
    saved tensors beside the reward's. The parts are stand-ins: this is the composition, not the counting."""
    monkeypatch.setattr(plan, "narrow_blocks", lambda model, tokens, head_dim: dict(
        other=head_dim * 10, input_double=0, double=head_dim * 1000, single=head_dim * 500))
    monkeypatch.setattr(plan, "decoder_estimate", lambda model: dict(other=3, input_mid=1, mid=20, input_up0=2, up0=40))
    monkeypatch.setattr(plan, "reward_estimate", lambda: 9)
    a = plan.activation_estimate("qwen", 128)
    assert a["per_block"] == dict(double=128_000, other=1280)
    assert a["transformer"] == 60 * 128_000 + 1280
    assert a["transformer_checkpointed"] == 60 * (128 + 2025) * D * 2 + 1280
    assert a["vae_decode"] == a["vae_decode_checkpointed"] == a["vae_kept"] == 3 + 20 + 40
    flux = plan.activation_estimate("flux")  # FLUX's VAE checkpoints: inputs and the largest block's internals
    assert "vae_kept" not in flux and flux["vae_decode_checkpointed"] == 3 + 1 + 2 + 40
