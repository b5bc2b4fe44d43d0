"""Tiny random diffusers pipelines built on the spot (no download): a Stable Diffusion
text-to-image pipeline and an InstructPix2Pix edit pipeline, ~600 KB each, 32x32 pixel images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

#: Side of the images the tiny pipelines make by default, in pixels (its VAE halves each side).
SIDE = 32
#: Denoising steps per image in the tests.
STEPS = 2


def _clip_tokenizer(out: Path):
    """A CLIP tokenizer with bytes only (no merges)."""
    from transformers import CLIPTokenizer
    out.mkdir(parents=True, exist_ok=True)
    from aquilachat.tokenizer import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=32)


def make_tiny_pipeline(out: Path, *, edit: bool = False, seed: int = 0) -> Path:
    """Save a random Stable Diffusion (``edit``: InstructPix2Pix) pipeline directory at ``out``."""
    pytest.importorskip("diffusers")
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionInstructPix2PixPipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=SIDE // 2, in_channels=8 if edit else 4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, norm_num_groups=4,
        attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=SIDE)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=520, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                max_position_embeddings=32, bos_token_id=512, eos_token_id=513,
                                                pad_token_id=513))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    cls = StableDiffusionInstructPix2PixPipeline if edit else StableDiffusionPipeline
    pipe = cls(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=_clip_tokenizer(out / "_tokenizer"),
               scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out
