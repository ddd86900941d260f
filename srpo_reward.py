"""Semantic Relative Preference (SRP): a text-conditioned reward, positive prompt minus negative prompt.

    r = f_img . ((1 + k) * f_pos - f_neg)                                   # METHOD.md §4

with L2-normalized CLIP-style embeddings of the image, of the caption behind a positive control word
("Real. a cat") and of the same caption behind a negative one ("Painting. a cat"). The reward models
(HPSv2.1, PickScore, CLIP) are all run as a transformers `CLIPModel`; HPSv2.1's open_clip checkpoint is
converted to it by `convert_open_clip`, so no open_clip or hpsv2 is needed at run time.
"""
import html
import json
import os

import ftfy
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

KINDS = ("hps", "pickscore", "clip")
POS_WORDS = ("Natural-lighting", "Detail", "Detailed", "Real")          # realism, METHOD.md §4
NEG_WORDS = ("Concept art", "Painting", "Anime", "Flat", "Oil")         # CG / oily look, METHOD.md §4
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images, size):
    """Differentiable CLIP preprocessing of images in [0, 1], shape (B, 3, H, W) (METHOD.md §4): resize the
    shorter side to `size` (bicubic, antialiased), center-crop size x size, normalize. Same arithmetic
    as torchvision's Resize(size, BICUBIC) + CenterCrop(size) + Normalize on tensors."""
    h, w = images.shape[-2:]
    short, long = min(h, w), max(h, w)
    long = int(size * long / short)
    new_h, new_w = (size, long) if h <= w else (long, size)
    x = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    x = x[..., top:top + size, left:left + size]
    mean = x.new_tensor(CLIP_MEAN).view(3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def control_prompts(caption, step, pos_words=POS_WORDS, neg_words=NEG_WORDS):
    """("{pos_word}. {caption}", "{neg_word}. {caption}"), the words chosen by step modulo the list
    length (METHOD.md §4). Pass your own lists to steer elsewhere, e.g. ("bright",) vs ("dark",)."""
    return f"{pos_words[step % len(pos_words)]}. {caption}", f"{neg_words[step % len(neg_words)]}. {caption}"


def open_clip_clean(text):
    """open_clip's text cleaning before its tokenizer (METHOD.md §4): ftfy, HTML unescaped twice, whitespace
    collapsed, lowercase. The transformers CLIP tokenizer alone skips the first two, so curly quotes, ligatures,
    full-width forms, HTML entities or mojibake would get other ids than in the release."""
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()


def srpo_loss(reward, threshold=0.7):
    """relu(threshold - reward): the ReFL-style thresholded loss of METHOD.md §4."""
    return F.relu(threshold - reward)


def discounted_loss(reward, m, length):
    """-reward * 3u / (1 + 2u), u = m / length: the release's Qwen-Image loss (METHOD.md §4), no threshold, each draw
    weighted by how noisy its start is (m, the window index the branch ends at; noisier as m grows)."""
    u = m / length
    return -reward * (3 * u / (1 + 2 * u))


class SRPReward:
    """A frozen CLIP-style reward. kind picks the scaling of METHOD.md §4:
        hps:        srp = f_img . ((1 + k) f_pos - f_neg)             score = f_img . f_txt
        pickscore:  srp = exp(logit_scale) / 20 * (same)              score = exp(logit_scale) * f_img . f_txt
        clip:       srp = exp(logit_scale) / 20 * (same)              score = f_img . f_txt
    Images are (B, 3, H, W) in [0, 1]; gradients flow to them, never to the model."""

    def __init__(self, model, tokenizer, kind):
        if kind not in KINDS:
            raise ValueError(f"reward kind {kind!r}: expected one of {', '.join(KINDS)}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.kind = kind
        self.image_size = model.config.vision_config.image_size
        self.max_length = model.config.text_config.max_position_embeddings

    def embed_images(self, images):
        """f_img: L2-normalized image embeddings, fp32 whatever the tower ran in (see srp)."""
        pixels = preprocess(images, self.image_size).to(self.model.dtype)
        return F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)

    def embed_texts(self, prompts):
        """f_txt: L2-normalized text embeddings (CLIP's 77-token window, truncated)."""
        if self.kind == "hps":  # the release tokenizes HPSv2.1's prompts with open_clip, which cleans them first
            prompts = [open_clip_clean(p) for p in prompts]
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.model.device)
        return F.normalize(self.model.get_text_features(**tokens).pooler_output.float(), dim=-1)

    def srp(self, images, pos_prompts, neg_prompts, k):
        """The SRP reward r = f_img . ((1 + k) f_pos - f_neg), one value per image (METHOD.md §4). The towers may
        run under autocast; the embeddings are fp32 and norm, product and sum are no autocast ops, so the difference
        of two nearly equal cosines is taken in fp32 (measured in experiments/precision.py)."""
        f_img = self.embed_images(images)
        f_pos, f_neg = self.embed_texts(pos_prompts), self.embed_texts(neg_prompts)
        r = (f_img * ((1 + k) * f_pos - f_neg)).sum(-1)
        if self.kind != "hps":  # bring CLIP / PickScore logits to HPS's range, as the release does
            r = r * self.model.logit_scale.exp() / 20
        return r

    def score(self, images, prompts):
        """The plain reward that evaluation tables report, one value per image (METHOD.md §4)."""
        r = (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)
        return r * self.model.logit_scale.exp() if self.kind == "pickscore" else r


def convert_open_clip(sd):
    """Map an open_clip CLIP state dict (OpenAI layout, e.g. HPSv2.1's ViT-H-14) to transformers
    `CLIPModel` keys: each fused attention in_proj is split into q/k/v, the projections transposed."""
    out = {
        "logit_scale": sd["logit_scale"],
        "text_projection.weight": sd["text_projection"].T.contiguous(),
        "visual_projection.weight": sd["visual.proj"].T.contiguous(),
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
    }
    norms = (("ln_final", "text_model.final_layer_norm"), ("visual.ln_pre", "vision_model.pre_layrnorm"),
             ("visual.ln_post", "vision_model.post_layernorm"))
    for src, dst in norms:
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = sd[f"{src}.{p}"]
    layer_parts = (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                   ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))
    for src, dst in (("transformer.resblocks", "text_model.encoder.layers"),
                     ("visual.transformer.resblocks", "vision_model.encoder.layers")):
        i = 0
        while f"{src}.{i}.ln_1.weight" in sd:
            a, b = f"{src}.{i}", f"{dst}.{i}"
            for p in ("weight", "bias"):
                for name, part in zip("qkv", sd[f"{a}.attn.in_proj_{p}"].chunk(3)):
                    out[f"{b}.self_attn.{name}_proj.{p}"] = part
                for s, d in layer_parts:
                    out[f"{b}.{d}.{p}"] = sd[f"{a}.{s}.{p}"]
            i += 1
    return out


def _check_path(path, what):
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found (expected {what})")


def _load_clip_folder(path, what):
    _check_path(os.path.join(path, "config.json"), what)
    model_type = json.load(open(os.path.join(path, "config.json"))).get("model_type")
    if model_type != "clip":
        raise ValueError(f"{path}: model_type is {model_type!r}, expected a CLIPModel folder ({what})")
    return CLIPModel.from_pretrained(path)


def load_hps(checkpoint, clip_h_dir):
    """HPSv2.1: `HPS_v2.1_compressed.pt` (an open_clip ViT-H-14 state dict under 'state_dict'), run as a
    transformers CLIPModel whose config and tokenizer come from a local
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K folder."""
    _check_path(checkpoint, "HPS_v2.1_compressed.pt, the HPSv2.1 checkpoint")
    _check_path(os.path.join(clip_h_dir or "", "config.json"),
                "a laion/CLIP-ViT-H-14-laion2B-s32B-b79K folder for HPS's config and tokenizer")
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or no torch file: torch.load then raises one of many kinds
        raise ValueError(f"{checkpoint}: not a readable torch checkpoint ({type(e).__name__}; expected "
                         f"HPS_v2.1_compressed.pt)") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{checkpoint}: expected an HPSv2.1 checkpoint, a dict with key 'state_dict'")
    try:
        state = convert_open_clip(ckpt["state_dict"])
    except KeyError as e:
        raise ValueError(f"{checkpoint}: not an open_clip CLIP state dict (no key {e})") from None
    config = CLIPConfig.from_pretrained(clip_h_dir)
    with torch.device("meta"):  # expected shapes, without allocating a ViT-H
        expected = CLIPModel(config).state_dict()
    for key, tensor in expected.items():
        if key not in state or state[key].shape != tensor.shape:
            got = tuple(state[key].shape) if key in state else "missing"
            raise ValueError(f"{checkpoint}: {key} is {got}, expected {tuple(tensor.shape)} "
                             f"for the CLIP config in {clip_h_dir}")
    model = CLIPModel.from_pretrained(None, config=config, state_dict=state)
    return model, AutoTokenizer.from_pretrained(clip_h_dir)


def load_reward(kind, path, clip_h_dir=None, device="cpu", dtype=torch.float32):
    """An SRPReward for kind hps (path: HPS_v2.1_compressed.pt, plus clip_h_dir; or a CLIPModel folder
    holding an already converted HPS, like the tiny stand-in), pickscore (path: a
    yuvalkirstain/PickScore_v1 folder; its tokenizer is CLIP-H's, from clip_h_dir if given) or clip
    (path: any CLIPModel folder with its tokenizer)."""
    if kind not in KINDS:
        raise ValueError(f"reward kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "hps" and not os.path.isdir(path or ""):
        model, tokenizer = load_hps(path, clip_h_dir)
    else:
        model = _load_clip_folder(path, f"a {kind} CLIPModel folder")
        tokenizer = AutoTokenizer.from_pretrained(clip_h_dir or path)
    return SRPReward(model.to(device=device, dtype=dtype), tokenizer, kind)
