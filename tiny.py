"""Tiny random stand-ins for FLUX.1-dev, Qwen-Image and the CLIP-style reward models, so every file runs on a CPU.

build_tiny_flux writes a FluxPipeline folder with FLUX.1-dev's layout, scheduler and VAE constants;
build_tiny_qwen a QwenImagePipeline folder with Qwen-Image's; build_tiny_clip writes a CLIPModel + tokenizer
standing in for HPSv2.1 / PickScore / CLIP. All are written with save_pretrained, so the other files load them
through the same from_pretrained paths they use for the real checkpoints: only the sizes and the (random) weights
differ. Nothing is downloaded: the models are built from configs and the tokenizers from the small caption
vocabulary below.

    flux_dir, clip_dir = tiny_model_paths()   # built once under $SRPO_TINY_DIR or ~/.cache/srpo-tiny,
    qwen_dir = tiny_qwen_path()               # in folders keyed by this file's code (cache_key)
"""
import hashlib
import os
import re
import shutil
import string
import tempfile
from collections import Counter

import torch
from diffusers import (AutoencoderKL, AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, QwenImagePipeline, QwenImageTransformer2DModel)
from tokenizers import pre_tokenizers
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer,
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, T5Config,
                          T5EncoderModel, T5Tokenizer)

# Words the tokenizers keep whole: caption words and the SRPO control words (METHOD.md §4). Other text is
# still tokenized: spelled in bytes (CLIP, Qwen) or characters (T5), with <unk> for non-ASCII in T5.
CORPUS = """
a an the of in on at with and under near photo picture portrait image close up view
cat dog bird horse man woman girl boy people car house city street tree flower forest mountain lake
sea beach sky cloud sun moon night water field road table chair window room
red blue green yellow white black old young small big beautiful sitting standing running
Natural-lighting Detail Detailed Real Concept art Painting Anime Flat Oil bright dark
"""
# The words of QwenImagePipeline's prompt template, kept whole by the Qwen tokenizer so that the template's system
# prefix is the 34 tokens the pipeline drops (prompt_template_encode_start_idx), as with Qwen's own tokenizer.
QWEN_TEMPLATE_WORDS = """system user assistant Describe the image by detailing color shape size texture quantity
text spatial relationships of objects and background"""


def bpe_merges(words, end_of_word="</w>"):
    """Train a byte-pair encoding (Sennrich et al. 2016) until each word is one token: repeatedly join the
    pair of symbols found in the most words. Ties go alphabetically, so the merge ranks are reproducible
    (tokenizers' BpeTrainer breaks ties differently from run to run)."""
    words = [" ".join(word) + end_of_word for word in words]  # "c a t</w>": CLIP marks the end of each word
    merges = []
    while True:
        pairs = Counter(pair for w in words for pair in set(zip(w.split(), w.split()[1:])))
        if not pairs:
            return merges
        a, b = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append((a, b))
        words = [re.sub(rf"(?<!\S){re.escape(a)} {re.escape(b)}(?!\S)", a + b, w) for w in words]


def clip_tokenizer():
    """CLIP's byte-level BPE over a tiny vocabulary: the 256 byte symbols with and without the end-of-word
    mark </w> (so no text is ever unknown), the merged symbols, and <|startoftext|> <|endoftext|> last as
    in CLIP, so end-of-text has the largest id and both of CLIPTextModel's poolings (argmax of the ids, or
    the first eos_token_id) pick it."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = sorted(set(re.findall(r"[a-z]+", CORPUS.lower())))  # CLIP lowercases and splits off non-letters
    merges = bpe_merges(words)
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}  # two merges may make one symbol
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer():
    """T5's SentencePiece-style Unigram: each corpus word is one piece "▁word", other words are spelled
    with printable ASCII characters, anything else is <unk>. Ids 0, 1, 2 are <pad>, </s>, <unk> as in T5."""
    chars = sorted(set(string.printable) - set(string.whitespace))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in sorted(set(CORPUS.split()))] + [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def qwen_tokenizer():
    """Qwen2.5-VL's byte-level BPE over a tiny vocabulary: the 256 byte symbols (so no text is ever unknown),
    merges that make each corpus and template word one token both bare and after a space ("Ġcat", as Qwen's
    pre-tokenizer splits " cat"; byte-level BPE has no end-of-word mark), then Qwen's <|endoftext|> <|im_start|>
    <|im_end|>. As in Qwen2.5-VL: eos <|im_end|>, pad <|endoftext|>, no bos."""
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # " cat" -> "Ġcat"
    words = sorted(set(re.findall(r"[A-Za-z]+", CORPUS + QWEN_TEMPLATE_WORDS)))
    pieces = sorted({to_bytes.pre_tokenize_str(s)[0][0] for w in words for s in (w, " " + w)})
    merges = bpe_merges(pieces, end_of_word="")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in merges] + specials
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          unk_token=None, model_max_length=131072, additional_special_tokens=specials[1:])


def clip_text_config(tokenizer):
    """A 2-layer CLIP text tower of width 32 whose special ids match the tokenizer (77 positions as CLIP)."""
    return dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_tiny_flux(path, seed=0):
    """Write a FLUX.1-dev-layout FluxPipeline folder with tiny random weights (same seed, same files)."""
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    # fork_rng: building must not move the caller's RNG, which seeds its own run
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**clip_text_config(tokenizer)))
        # T5 v1.1 (gated-gelu) like FLUX's T5-XXL; relative positions fit any max_sequence_length
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False))
        # joint_attention_dim = T5 width, pooled_projection_dim = CLIP width; rope axes sum to the head dim
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
        # 4 blocks: 8x downsampling; 16 latent channels, FLUX.1-dev's shift/scale, no quant convs (METHOD.md §5)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=16, norm_num_groups=4,
            sample_size=32, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
            use_post_quant_conv=False)
    # FLUX.1-dev's scheduler config verbatim: the shift-3 grid, resolution-dependent when sampling
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(path)


def build_tiny_qwen(path, seed=0):
    """Write a Qwen-Image-layout QwenImagePipeline folder with tiny random weights (same seed, same files)."""
    tokenizer = qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Qwen2.5-VL; the pipeline uses only its text tower, but the model always builds (and saves) a vision tower:
        # the smallest that builds, its output as wide as the text. head_dim 32 / 2 = 16, and M-RoPE's three
        # sections (time, height, width) sum to head_dim / 2 as Qwen2.5-VL-7B's [16, 24, 24] do for 128. The
        # vision token ids lie past the vocabulary, so no text token is taken for one.
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                             rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3],
                                                                      rope_theta=1e6),
                             bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                               fullatt_block_indexes=[0], tokens_per_second=2),
            image_token_id=len(tokenizer), video_token_id=len(tokenizer) + 1,
            vision_start_token_id=len(tokenizer) + 2, vision_end_token_id=len(tokenizer) + 3))
        # joint_attention_dim = the text encoder's width; in_channels 4 x 16: 2x2 patches of the 16 VAE channels;
        # the rope axes (each even) sum to the head dim; no guidance embedding, as Qwen-Image
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
        # 3 downsamplings (temperal_downsample has len(dim_mult) - 1 entries): 8x as the pipeline assumes; 16 latent
        # channels with Qwen-Image's per-channel latents_mean / latents_std (the class defaults are its values)
        vae = AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                                     temperal_downsample=[False, True, True])
    # Qwen-Image's scheduler config verbatim: exponential resolution-dependent shift, last sigma stretched to 0.02
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx, "the tokens dropped != prefix"
    pipe.save_pretrained(path)


def build_tiny_clip(path, seed=0):
    """Write a tiny CLIPModel (32x32 images, 8x8 patches, width 32, 16-d embeddings) and its tokenizer."""
    tokenizer = clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(
            text_config=clip_text_config(tokenizer), projection_dim=16,
            vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def cache_key(seed):
    """What builds the models: this file's code, the seed and the library versions that write them. A changed
    tiny.py, seed or library gets a folder of its own; nothing built by other code is ever reused."""
    import diffusers
    import tokenizers
    import transformers
    code = open(__file__, "rb").read()
    key = f"{seed}|{torch.__version__}|{diffusers.__version__}|{transformers.__version__}|{tokenizers.__version__}"
    return f"seed{seed}-{hashlib.sha256(code + key.encode()).hexdigest()[:12]}"


def tiny_paths(models, root, seed):
    """The folders of models [(name, build)] under root (default $SRPO_TINY_DIR, else ~/.cache/srpo-tiny), each
    built if missing, named by cache_key."""
    root = root or os.environ.get("SRPO_TINY_DIR") or os.path.expanduser("~/.cache/srpo-tiny")
    os.makedirs(root, exist_ok=True)
    paths = []
    for name, build in models:
        path = os.path.join(root, f"{name}-{cache_key(seed)}")
        if not os.path.isdir(path):
            # build beside it, then rename: a crash or racing torchrun ranks never leave a half folder
            tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=root)
            build(tmp, seed)
            try:
                os.rename(tmp, path)
            except OSError:  # another rank renamed its complete copy first: use that one
                shutil.rmtree(tmp)
                if not os.path.isdir(path):
                    raise
        paths.append(path)
    return tuple(paths)


def tiny_model_paths(root=None, seed=0):
    """(flux_dir, clip_dir), each built once (tiny_paths)."""
    return tiny_paths([("flux", build_tiny_flux), ("clip", build_tiny_clip)], root, seed)


def tiny_qwen_path(root=None, seed=0):
    """The tiny Qwen-Image folder, built once (tiny_paths)."""
    return tiny_paths([("qwen", build_tiny_qwen)], root, seed)[0]
