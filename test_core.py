"""Tests of the method's math against closed forms and independent references (open_clip, torchvision,
CLIPModel's own forward). CPU only, tiny random models built offline. Run: python -m pytest -q"""
import math

import pytest
import torch

from direct_align import (branch_sigmas, default_gap, direct_align, euler_step, inject_noise, predict_x0,
                          recover_x0, reward_k, sigma_schedule, time_shift, train_window)
from srpo_reward import (SRPReward, control_prompts, convert_open_clip, load_hps, load_reward, open_clip_clean,
                         preprocess, srpo_loss)

torch.set_num_threads(2)
SIGMAS = [0.0, 0.05, 0.3, 0.5, 0.75, 0.9, 0.99]


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- direct_align.py: closed forms (METHOD.md §1-§3)
# Float64 elementwise math against its closed form: each op rounds correctly (IEEE) on any CPU, so the two sides
# differ by ~1e-16 of the values (randn, size ~1), up to 2e-14 after recover_x0 divides by 1 - sigma >= 0.01
# (measured). The atol 1e-12 and 1e-10 below are 50x and more above that; a wrong formula is off by O(sigma).

def test_time_shift_and_schedule_hand_computed():
    assert time_shift(0.5, 3.0) == pytest.approx(0.75)  # 1.5 / 2
    assert time_shift(0.9, 3.0) == pytest.approx(27 / 28)  # 2.7 / 2.8
    g = sigma_schedule(2, 3.0)
    assert g.tolist() == pytest.approx([1.0, 0.75, 0.0])
    assert len(sigma_schedule(50)) == 51 and bool((sigma_schedule(50).diff() < 0).all())


def test_recover_inverts_inject():
    x0, noise = randn(2, 16, 8, seed=1), randn(2, 16, 8, seed=2)
    for s in SIGMAS:
        assert torch.allclose(recover_x0(inject_noise(x0, noise, s), noise, s), x0, atol=1e-12, rtol=0)


def test_euler_step_with_true_velocity_moves_along_the_line():
    x0, noise = randn(3, 5, seed=1), randn(3, 5, seed=2)
    x = euler_step(inject_noise(x0, noise, 0.8), noise - x0, 0.8, 0.3)
    assert torch.allclose(x, inject_noise(x0, noise, 0.3), atol=1e-12, rtol=0)


def test_direct_align_is_exact_for_true_velocity_both_branches():
    x0, noise = randn(2, 64, 4, seed=3), randn(2, 64, 4, seed=4)
    window = train_window()
    for t_star in (5, 50, 100, 101, 500, 995):
        for sigma_from, sigma_to, _ in branch_sigmas(window, t_star).values():
            x0_hat = direct_align(lambda x, s: noise - x0, x0, noise, sigma_from, sigma_to)
            assert torch.allclose(x0_hat, x0, atol=1e-10, rtol=0)
    for a in SIGMAS:  # also far outside the training window
        for b in SIGMAS:
            if b < 0.99:
                assert torch.allclose(direct_align(lambda x, s: noise - x0, x0, noise, a, b), x0, atol=1e-10, rtol=0)


def test_direct_align_error_is_scaled_by_the_step_and_one_step_prediction_by_sigma():
    x0, noise, delta = randn(4, 32, seed=5), randn(4, 32, seed=6), randn(4, 32, seed=7)
    pairs = [(0.99, 0.95), (0.9, 0.8), (0.5, 0.45), (0.6, 0.7)]
    window = [b[:2] for t in range(5, 996, 10) for b in branch_sigmas(train_window(), t).values()]
    for a, b in pairs + window:
        x0_hat = direct_align(lambda x, s: noise - x0 + delta, x0, noise, a, b)
        assert torch.allclose(x0_hat - x0, (b - a) / (1 - b) * delta, atol=1e-12, rtol=0)  # METHOD.md §2
        one_step = predict_x0(inject_noise(x0, noise, a), noise - x0 + delta, a)
        assert torch.allclose(one_step - x0, -a * delta, atol=1e-12, rtol=0)
        ratio = (one_step - x0).norm() / (x0_hat - x0).norm()  # float64 norms: measured 1e-14 relative
        assert ratio.item() == pytest.approx(a * (1 - b) / abs(b - a), rel=1e-9)
        if (a, b) in window:
            assert ratio > 2  # inside the training window Direct-Align's error is always over 2x smaller


def test_direct_align_sends_gradient_only_through_the_velocity():
    x0 = randn(2, 8, seed=8).requires_grad_()
    noise = randn(2, 8, seed=9).requires_grad_()
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    direct_align(lambda x, s: w * x, x0, noise, 0.9, 0.8).sum().backward()
    assert w.grad is not None and x0.grad is None and noise.grad is None


def test_dtype_is_kept_and_tensor_sigmas_work():
    x0, noise = randn(2, 8, dtype=torch.bfloat16), randn(2, 8, seed=1, dtype=torch.bfloat16)
    s = torch.tensor(0.7, dtype=torch.float64)
    out = direct_align(lambda x, _: noise - x0, x0, noise, s, torch.tensor(0.6))
    assert out.dtype == torch.bfloat16 and inject_noise(x0, noise, s).dtype == torch.bfloat16
    # the true velocity recovers x0 in bf16 too: each of the three steps rounds to bf16 (relative spacing 2^-8), and
    # recover divides by 1 - 0.6, so the error stays within a few spacings of the values' size; a sigma taken from
    # the wrong argument (0.7 for 0.6, say) is off by about 1
    assert torch.allclose(out.double(), x0.double(), rtol=0, atol=8 * 2**-8 * x0.double().abs().max().item())
    assert torch.equal(inject_noise(x0, noise, s), inject_noise(x0, noise, 0.7))


def test_train_window_hand_computed():
    w = train_window()  # approx's 1e-6 relative on float64 (~1e-16 apart); neighbouring entries are 2e-4 apart
    assert len(w) == 1000 and w[0].item() == pytest.approx(27 / 28) and w[-1].item() == pytest.approx(0.75)
    assert train_window(end=30)[-1].item() == pytest.approx(3 * 0.4 / 1.8)  # PickScore config, g[30]


def test_default_gap_follows_the_release_float_arithmetic():
    # int((1 - 0.9) * 1000) + 1: (1 - 0.9) * 1000 is 99.99999999999997 in float, so 100, not 101.
    assert default_gap() == 100 and default_gap(0.5) == 501


def test_branch_sigmas_hand_computed():
    g5, g25 = 27 / 28, 0.75
    W = lambda i: g5 + (g25 - g5) * i / 999  # noqa: E731  linspace(g[5], g[25], 1000)[i], by hand
    # approx's 1e-6 relative: linspace and the hand formula differ by ~1e-16 (float64), while the neighbouring
    # index is 2e-4 relative away, so an off-by-one index fails
    b = branch_sigmas(train_window(), 500, gap0=100)
    assert b["denoise"] == pytest.approx((W(400), W(500), 500))
    assert b["inversion"] == pytest.approx((W(600), W(500), 400))
    b = branch_sigmas(train_window(), 5, gap0=100)  # gap = min(100, 995, 5) = 5
    assert b["denoise"] == pytest.approx((W(990), W(995), 5))
    assert b["inversion"] == pytest.approx((W(999), W(994), 1))
    b = branch_sigmas(train_window(), 995, gap0=100)  # gap = 5
    assert b["denoise"] == pytest.approx((W(0), W(5), 995))
    assert b["inversion"] == pytest.approx((W(10), W(5), 990))


def test_branch_sigmas_directions_landing_and_edges():
    window = train_window()
    lo, hi = window[-1].item(), window[0].item()
    for t_star in [5, 6, 99, 100, 101, 102, 500, 900, 994, 995]:
        b = branch_sigmas(window, t_star)
        (d_from, d_to, d_m), (i_from, i_to, i_m) = b["denoise"], b["inversion"]
        assert d_from > d_to and i_from < i_to, t_star  # denoise goes down, inversion up
        for s in (d_from, d_to, i_from, i_to):
            assert lo <= s <= hi
        assert 0 <= d_m < 1000 and 0 <= i_m < 1000
        if t_star > default_gap():
            assert d_to == i_to  # both land on W[L - t*]


def test_reward_k_hand_computed():  # float64 linspace against the formula: approx's 1e-6 relative, as above
    assert reward_k(0, (0.1, 0.25)) == pytest.approx(0.1)
    assert reward_k(999, (0.1, 0.25)) == pytest.approx(0.25)
    assert reward_k(333, (0.3, 0.01)) == pytest.approx(0.3 - 0.29 * 333 / 999)


# ---------------------------------------------------------------- srpo_reward.py

def test_preprocess_matches_torchvision():
    from torchvision import transforms as T
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    ref = T.Compose([T.Resize(24, T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(24),
                     T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    for img in (images, images.transpose(-1, -2), images[..., :40]):
        # Two libraries over one bicubic kernel: fp32 rounding, ~1e-7 of the values' scale (0 on this CPU), so
        # 1e-5 of the largest value; bilinear instead of bicubic, or a crop off by a pixel, is ~0.1 of it.
        expected = ref(img)
        assert torch.allclose(preprocess(img, 24), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_control_prompts_cycle_and_take_user_words():
    assert control_prompts("a cat", 0) == ("Natural-lighting. a cat", "Concept art. a cat")
    assert control_prompts("a cat", 5) == ("Detail. a cat", "Concept art. a cat")  # 5 % 4, 5 % 5
    assert control_prompts("a cat", 3) == ("Real. a cat", "Flat. a cat")
    assert control_prompts("x", 1, ["bright"], ["dark", "dim"]) == ("bright. x", "dim. x")


def test_srpo_loss_is_thresholded():
    assert srpo_loss(torch.tensor([0.5, 0.9, 0.7])).tolist() == pytest.approx([0.2, 0.0, 0.0])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import AutoTokenizer, CLIPModel
    from tiny import build_tiny_clip
    path = tmp_path_factory.mktemp("clip")
    build_tiny_clip(path, seed=0)
    return CLIPModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), path


def reference_similarities(model, tokenizer, images, prompts):
    """cos(f_img, f_txt) through CLIPModel's own forward, with torchvision preprocessing."""
    from torchvision import transforms as T
    size = model.config.vision_config.image_size
    pixels = T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))(
        T.CenterCrop(size)(T.Resize(size, T.InterpolationMode.BICUBIC, antialias=True)(images)))
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
        return out.logits_per_image / model.logit_scale.exp(), model.logit_scale.exp()


def test_srp_and_score_match_clip_forward_for_each_kind(tiny_clip):
    model, tokenizer, _ = tiny_clip
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    pos = ["Real. a red circle", "Detail. a cat", "Real. a dog on grass"]
    neg = ["Painting. a red circle", "Anime. a cat", "Oil. a dog on grass"]
    cos, scale = reference_similarities(model, tokenizer, images, pos + neg)
    k = 0.25
    expected = (1 + k) * cos[range(3), range(3)] - cos[range(3), [3, 4, 5]]
    # Two code paths (CLIPModel's forward, logits by matmul) over unit embeddings: a cosine's fp32 rounding is
    # relative to |f_img| |f_txt| = 1 times the kind's factor, not to the cosine, which may be near 0. Measured
    # ~3e-8 of that; the tolerance is 1e-5 of it, while a wrong k, factor or prompt pairing is off by 1e-2 or more.
    for kind, factor in (("hps", 1.0), ("clip", scale / 20), ("pickscore", scale / 20)):
        r = SRPReward(model, tokenizer, kind).srp(images, pos, neg, k)
        assert torch.allclose(r, expected * factor, rtol=0, atol=1e-5 * float(factor)), kind
    plain = cos[range(3), range(3)]
    for kind, factor in (("hps", 1.0), ("clip", 1.0), ("pickscore", scale)):
        assert torch.allclose(SRPReward(model, tokenizer, kind).score(images, pos), plain * factor, rtol=0,
                              atol=1e-5 * float(factor)), kind


def test_srp_gradient_ascent_moves_image_toward_positive_prompt(tiny_clip):
    model, tokenizer, _ = tiny_clip
    reward = SRPReward(model, tokenizer, "hps")
    pos, neg = ["bright. a square"] * 2, ["dark. a square"] * 2
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)).requires_grad_()
    r0 = reward.srp(images, pos, neg, 0.1)
    r0.sum().backward()
    assert all(p.grad is None for p in model.parameters())  # frozen reward, gradient only to the image
    moved = (images + 0.05 * images.grad / images.grad.norm()).detach()
    gap = lambda x: reward.score(x, pos) - reward.score(x, neg)  # noqa: E731
    with torch.no_grad():  # the gains are ~1e-3, fp32 rounding of these unit-scale cosines ~1e-7
        assert (reward.srp(moved, pos, neg, 0.1) > r0).all()
        assert (gap(moved) > gap(images.detach())).all()


# ---------------------------------------------------------------- HPSv2.1: open_clip -> CLIPModel

def tiny_open_clip(vocab_size, width=32, seed=0):
    """An open_clip CLIP with ViT-H-14's structure (pre-LN ViT, class token, argmax text pooling,
    no projection bias), tiny, with every parameter randomized so that no mapping hides behind an init."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(seed)
    model = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=2, width=width, head_width=16, patch_size=8,
                                                       image_size=32),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=vocab_size, width=width, heads=2, layers=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight",
                    "ln_post.weight", "ln_final.weight")) else 0.2 * torch.randn_like(p))
        model.logit_scale.fill_(math.log(30.0))
    return model.eval()


def clip_h_like_folder(path, tokenizer, width=32):
    """What load_hps reads from a laion/CLIP-ViT-H-14 folder: a CLIPConfig and a tokenizer."""
    from transformers import CLIPConfig
    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_attention_heads=2,
                num_hidden_layers=2, max_position_embeddings=77, hidden_act="gelu", eos_token_id=2)
    vision = dict(hidden_size=width, intermediate_size=4 * width, num_attention_heads=width // 16,
                  num_hidden_layers=2, image_size=32, patch_size=8, hidden_act="gelu")
    CLIPConfig(text_config=text, vision_config=vision, projection_dim=16).save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_convert_open_clip_matches_open_clip(tiny_clip, tmp_path):
    _, tokenizer, _ = tiny_clip
    oc = tiny_open_clip(len(tokenizer))
    clip_h_like_folder(tmp_path, tokenizer)
    torch.save({"state_dict": oc.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    model, tok = load_hps(str(tmp_path / "HPS_v2.1_compressed.pt"), str(tmp_path))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(1, len(tokenizer) - 1, (2, 77), generator=torch.Generator().manual_seed(4))
    ids[0, 9], ids[0, 10:] = len(tokenizer) - 1, 0  # end-of-text (the largest id), then padding
    ids[1, 76] = len(tokenizer) - 1
    with torch.no_grad():
        for ref, got in ((oc.encode_image(images), model.get_image_features(pixel_values=images).pooler_output),
                         (oc.encode_text(ids), model.get_text_features(input_ids=ids).pooler_output)):
            # open_clip's fused in_proj against split q/k/v, another attention kernel: fp32 rounding, measured
            # ~3e-7 of the embeddings' norm; a transposed, swapped or missing weight is off by O(1) of it
            assert ((got - ref).norm() / ref.norm()).item() < 1e-4
        assert model.logit_scale.item() == pytest.approx(math.log(30.0))  # copied, fp32: 2e-8 relative
    # And through the whole reward: HPS's score is the cosine of open_clip's embeddings.
    reward = load_reward("hps", str(tmp_path / "HPS_v2.1_compressed.pt"), str(tmp_path))
    prompt = ["Real. a blue triangle"]
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = (oc.encode_image(preprocess(img, 32), normalize=True)
               * oc.encode_text(tok(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids,
                                normalize=True)).sum(-1)
        # cosines of unit vectors: atol relative to |f_img| |f_txt| = 1 (as in test_srp_and_score_match...)
        assert torch.allclose(reward.score(img, prompt), ref, rtol=0, atol=1e-5)


def test_convert_open_clip_names_every_clip_model_key(tiny_clip):
    from transformers import CLIPConfig, CLIPModel
    _, tokenizer, _ = tiny_clip
    converted = convert_open_clip(tiny_open_clip(len(tokenizer)).state_dict())
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        clip_h_like_folder(d, tokenizer)
        expected = CLIPModel(CLIPConfig.from_pretrained(d)).state_dict()
    assert set(converted) == set(expected)


# ---------------------------------------------------------------- loaders: bad input gives one clear line

def test_loader_errors_name_the_file_and_what_was_expected(tiny_clip, tmp_path):
    _, tokenizer, clip_path = tiny_clip
    with pytest.raises(FileNotFoundError, match=r"nope\.pt: not found \(expected HPS_v2.1_compressed.pt"):
        load_reward("hps", str(tmp_path / "nope.pt"), str(clip_path))
    torch.save({"state_dict": tiny_open_clip(len(tokenizer)).state_dict()}, tmp_path / "hps.pt")
    with pytest.raises(FileNotFoundError, match="laion/CLIP-ViT-H-14"):
        load_reward("hps", str(tmp_path / "hps.pt"), None)
    clip_h_like_folder(tmp_path / "cliph", tokenizer)
    torch.save({"state_dict": tiny_open_clip(len(tokenizer), width=48).state_dict()}, tmp_path / "wide.pt")
    with pytest.raises(ValueError, match=r"wide\.pt: .* is \(.*\), expected \(.*\) for the CLIP config"):
        load_reward("hps", str(tmp_path / "wide.pt"), str(tmp_path / "cliph"))
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt: expected an HPSv2.1 checkpoint"):
        load_reward("hps", str(tmp_path / "bad.pt"), str(tmp_path / "cliph"))
    with pytest.raises(FileNotFoundError, match=r"missing/config.json: not found \(expected a pickscore"):
        load_reward("pickscore", str(tmp_path / "missing"))
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ValueError, match="model_type is 't5', expected a CLIPModel folder"):
        load_reward("clip", str(tmp_path / "t5"))
    with pytest.raises(ValueError, match="reward kind 'imagereward'"):
        load_reward("imagereward", str(clip_path))


# ---------------------------------------------------------------- HPSv2.1's tokenizer: CLIP-H folder's vs open_clip's

# laion/CLIP-ViT-H-14-laion2B-s32B-b79K's tokenizer_config.json, as published
# (huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K/blob/main/tokenizer_config.json); its special_tokens_map.json
# (copies: Aixile/ and ModelsLab/CLIP-ViT-H-14-laion2B-s32B-b79K) declares the same tokens. The pad token is
# <|endoftext|>, not the "!" (id 0) of SD 2's and SDXL's exported tokenizers.
def _added_token(content):
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
            "__type": "AddedToken"}


CLIP_H_TOKENIZER_CONFIG = {
    "unk_token": _added_token("<|endoftext|>"), "bos_token": _added_token("<|startoftext|>"),
    "eos_token": _added_token("<|endoftext|>"), "pad_token": "<|endoftext|>", "add_prefix_space": False,
    "errors": "replace", "do_lower_case": True, "name_or_path": "openai/clip-vit-base-patch32",
    "model_max_length": 77, "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer"}
CLIP_H_SPECIAL_TOKENS_MAP = {k: ({x: y for x, y in v.items() if x != "__type"} if isinstance(v, dict) else v)
                             for k, v in CLIP_H_TOKENIZER_CONFIG.items() if k.endswith("_token")}


@pytest.fixture(scope="module")
def clip_h_folder(tmp_path_factory):
    """The CLIP-H folder's tokenizer rebuilt offline: a transformers CLIPTokenizer over the vocabulary and merges
    of open_clip's own bpe_simple_vocab_16e6.txt.gz (built as CLIP's vocab.json is), saved with the folder's
    declared config; a tiny CLIP config beside it and a tiny open_clip HPS checkpoint over the full vocabulary."""
    import gzip
    import json
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer
    path = tmp_path_factory.mktemp("clip_h")
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    vocab = {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    clip_h_like_folder(path, CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges]))
    (path / "tokenizer_config.json").write_text(json.dumps(CLIP_H_TOKENIZER_CONFIG))
    (path / "special_tokens_map.json").write_text(json.dumps(CLIP_H_SPECIAL_TOKENS_MAP))
    oc = tiny_open_clip(len(vocab))
    torch.save({"state_dict": oc.state_dict()}, path / "hps.pt")
    return path, oc


CAPTIONS = ["a cat sitting on a windowsill", "Portrait of an old fisherman, dramatic lighting",
            "a futuristic city at night with neon signs", "two dogs playing in the snow",
            "A bowl of ramen on a wooden table", "an astronaut riding a horse on mars",
            "watercolor painting of a lighthouse", "a close-up photo of a dew-covered spider web"]
EDGE_CAPTIONS = [  # one of each class, whatever the random draw below
    "wow!", "WOW!!!", "!", "?!?!", "what is this?", "hello, world; fine: yes", "it's a cat's toy, isn't it", "DON'T",
    "\"quoted\" and 'single'", "sci-fi, well-lit - dash", "3 cats, 1920x1080, 8k, f/1.8, 35mm, 3.14, 100%",
    "ALL CAPS CAPTION", "MiXeD cAsE CaPtIoN", "café naïve Zürich crème brûlée São Paulo", "ΟΔΟΣ ΣΑΣ", "Москва",
    "日本の桜", "中文，标点！", "🐱 cat 🌅 ❤️ 👍🏽 🇺🇸", "a   b\t\tc\nd  ", "  leading and trailing  ", "nbsp\u00a0here",
    "“curly” ‘quotes’ don’t", "ﬁsh and ﬂowers", "ＡＢＣ full-width！", "fish &amp; chips &quot;x&quot; &#39;y",
    "cafÃ© mojibake", "", "a " * 100, "!" * 200, ", ".join(CAPTIONS) * 2]


def varied_captions(n=300, seed=0):
    """EDGE_CAPTIONS and n captions drawn from CAPTIONS through 1-3 random edits: punctuation, quotes and
    apostrophes, hyphens, numbers, case, non-ASCII and emoji, ftfy's classes, runs of whitespace, length."""
    import random
    rng = random.Random(seed)
    pieces = ["!", "!!", "?", "?!", "...", ",", ";", ":", "'", '"', "-", "(a)", "&", "#1", "@", "$5", "50%", "don't",
              "it's", "x-ray", "2024", "4k", "café", "über", "Ελλάδα", "🐶", "✨", "’s", "“hi”", "ﬁ", "！", "&amp;"]
    edits = [lambda s: s + rng.choice(pieces), lambda s: rng.choice(pieces) + " " + s,
             lambda s: s + "!" * rng.randint(1, 3),
             lambda s: s.replace(" ", " " + rng.choice(pieces) + " ", 1), str.upper, str.title, str.swapcase,
             lambda s: "".join(c.upper() if rng.random() < 0.5 else c for c in s),
             lambda s: s.replace(" ", rng.choice(["  ", "\t", " \n ", "   "])),
             lambda s: ", ".join([s] + rng.choices(CAPTIONS, k=rng.randint(4, 12)))]  # often past 77 tokens
    out = list(EDGE_CAPTIONS)
    for _ in range(n):
        s = rng.choice(CAPTIONS)
        for edit in rng.sample(edits, rng.randint(1, 3)):
            s = edit(s)
        out.append(s)
    return out


def open_clip_ids_to_eot(texts):
    """open_clip's ViT-H-14 ids (the release's HPSv2.1 tokenizer), each up to and including end-of-text,
    which is also where open_clip's text tower pools (argmax of the ids)."""
    import open_clip
    tokens = open_clip.get_tokenizer("ViT-H-14")(texts)
    pooled = tokens.argmax(-1)
    return [row[:p + 1].tolist() for row, p in zip(tokens, pooled.tolist())], tokens


def test_hps_tokenizer_gives_open_clip_vit_h_14_ids_up_to_end_of_text(clip_h_folder):
    from transformers import AutoTokenizer
    path, _ = clip_h_folder
    _, tokenizer = load_hps(str(path / "hps.pt"), str(path))
    raw = AutoTokenizer.from_pretrained(path)  # the folder's tokenizer alone, as AutoTokenizer loads it
    assert (raw.pad_token, raw.bos_token_id, raw.eos_token_id, raw.model_max_length) == ("<|endoftext|>", 49406,
                                                                                        49407, 77)
    control = [p for c in CAPTIONS[:4] for step in range(20) for p in control_prompts(c, step)]  # all 4 x 5 pairs
    texts = control + varied_captions()
    expected, _ = open_clip_ids_to_eot(texts)
    assert sum("!" in t for t in texts) > 30 and sum(len(e) == 77 for e in expected) > 30  # '!' and truncation
    # what SRPReward.embed_texts feeds the tokenizer for hps: the text after open_clip's cleaning
    got = tokenizer([open_clip_clean(t) for t in texts], padding=True, truncation=True, max_length=77,
                    return_tensors="pt")
    eot = 49407
    for text, ids, mask, exp in zip(texts, got.input_ids, got.attention_mask, expected):
        n = int(mask.sum())
        assert ids[:n].tolist() == exp, text
        # pooled position: CLIPTextModel's argmax of the ids (eos_token_id 2 configs) or first end-of-text
        assert int(ids.argmax()) == int((ids == eot).int().argmax()) == n - 1 == len(exp) - 1, text
    # the captions reach what open_clip's cleaning changes: the folder's tokenizer alone differs on some
    raw_ids = raw(texts, truncation=True, max_length=77).input_ids
    assert [t for t, r, e in zip(texts, raw_ids, expected) if r != e], "no caption exercises the cleaning"
    assert raw(["wow!"]).input_ids[0] == expected[texts.index("wow!")] == [49406, 2781, 256, eot]  # '!' is 256


def test_hps_text_embeddings_equal_open_clip_encode_text(clip_h_folder):
    """Through the whole reward: a batch padded by transformers (with its mask) gives open_clip's embeddings."""
    path, oc = clip_h_folder
    reward = load_reward("hps", str(path / "hps.pt"), str(path))
    texts = ["Real. wow!", "Painting. a cat’s toy!!", "ＡＢＣ &amp; ﬁsh", "ΟΔΟΣ", "a", ", ".join(CAPTIONS) * 2,
             *control_prompts("“Portrait” of an old fisherman!", 3)]
    _, tokens = open_clip_ids_to_eot(texts)
    with torch.no_grad():
        ref = oc.encode_text(tokens, normalize=True)
        # two implementations of one text tower, unit vectors: atol is relative to their norm 1 (fp32 rounding,
        # ~1e-7 of it, 0 on this CPU); a wrong token, mask or pooled position moves an embedding by O(1)
        assert torch.allclose(reward.embed_texts(texts), ref, rtol=0, atol=1e-5)
