"""(Helper module, no tests.) A small PyTorch re-creation of the authors' GRAIN modules (clip/custom_models.py,
model/tfm.py) with their exact state-dict names, for the converter parity tests.

Written from the reference's description, not copied:
the image tower is timm's VisionTransformer with ``qk_norm=True`` (same keys and maths
as the reference's rebuilt blocks), the text tower is OpenAI-CLIP style, the decoder is
DETR's pre-norm decoder (self-attention first) without encoder, and the dead weights
(``class_embed``, ``pos_embed``, ``temporal_embed``, backbone ``image_projection``) exist.
"""
from __future__ import annotations

import collections
import functools

import numpy as np
import timm
import torch
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class TextBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(collections.OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width)))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x, mask):  # x [L, N, W]
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList([TextBlock(width, heads) for _ in range(layers)])

    def forward(self, x, mask):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class Backbone(nn.Module):
    """clip/custom_models.py ``CLIP`` with a timm qk-norm ViT as ``visual``."""

    def __init__(self, *, image_size, patch_size, vision_width, vision_layers, vision_heads,
                 embed_dim, context_length, vocab_size, text_width, text_layers, text_heads):
        super().__init__()
        self.visual = timm.models.vision_transformer.VisionTransformer(
            img_size=image_size, patch_size=patch_size, embed_dim=vision_width, depth=vision_layers,
            num_heads=vision_heads, mlp_ratio=4, qkv_bias=True, qk_norm=True, num_classes=0,
            norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
        self.transformer = TextTransformer(text_width, text_layers, text_heads)
        self.token_embedding = nn.Embedding(vocab_size, text_width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, text_width) * 0.01)
        self.ln_final = nn.LayerNorm(text_width)
        self.image_projection = nn.Parameter(torch.randn(vision_width, embed_dim) * vision_width ** -0.5)
        self.text_projection = nn.Parameter(torch.randn(text_width, embed_dim) * text_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.register_buffer("causal_mask", torch.full((context_length, context_length), float("-inf")).triu(1),
                             persistent=False)

    def image_tokens(self, images):  # [B, 3, H, W] -> [B, 1 + N, W] after the final LN
        return self.visual.forward_features(images)

    def encode_text(self, tokens):
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2), self.causal_mask).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection


class DecoderLayer(nn.Module):
    def __init__(self, d_model, heads, ffn):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, heads)
        self.self_attn = nn.MultiheadAttention(d_model, heads)
        self.linear1 = nn.Linear(d_model, ffn)
        self.linear2 = nn.Linear(ffn, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def forward(self, tgt, memory, query_pos):  # pre-norm, self-attention first
        h = self.norm1(tgt)
        tgt = tgt + self.self_attn(h + query_pos, h + query_pos, h)[0]
        h = self.norm2(tgt)
        tgt = tgt + self.multihead_attn(h + query_pos, memory, memory)[0]
        return tgt + self.linear2(torch.relu(self.linear1(self.norm3(tgt))))


class DecoderStack(nn.Module):
    def __init__(self, d_model, heads, ffn, layers):
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(d_model, heads, ffn) for _ in range(layers)])
        self.norm = nn.LayerNorm(d_model)


class CrossAttention(nn.Module):
    def __init__(self, d_model, heads, ffn, layers):
        super().__init__()
        self.pre_norm = nn.LayerNorm(d_model)
        self.decoder = DecoderStack(d_model, heads, ffn, layers)


class BoxMLP(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d_model, d_model), nn.Linear(d_model, d_model), nn.Linear(d_model, 4)])

    def forward(self, x):
        x = torch.relu(self.layers[0](x))
        return self.layers[2](torch.relu(self.layers[1](x)))


class ObjDecoder(nn.Module):
    """model/tfm.py ``ObjDecoder(Cross_Attention(normalize_before=True, return_intermediate_dec=True))``."""

    def __init__(self, *, feature_dim, d_model, heads, ffn, layers, num_queries, embed_dim, num_classes=7):
        super().__init__()
        self.transformer = CrossAttention(d_model, heads, ffn, layers)
        self.class_embed = nn.Linear(d_model, num_classes + 1)
        self.bbox_embed = BoxMLP(d_model)
        self.query_embed = nn.Embedding(num_queries + 1, d_model)  # + the global image query (last)
        self.pos_embed = nn.Parameter(torch.randn(1, 9, d_model) * 0.02)
        self.temporal_embed = nn.Parameter(torch.randn(1, 4, d_model) * 0.02)
        self.proj = nn.Linear(feature_dim, d_model, bias=False)
        self.obj_proj = nn.Parameter(torch.randn(d_model, embed_dim) * d_model ** -0.5)
        self.img_proj = nn.Parameter(torch.randn(d_model, embed_dim) * d_model ** -0.5)

    def forward(self, tokens):
        """tokens [B, N, F] -> boxes per layer [L, B, Q, 4], region [B, Q, E], image [B, E]."""
        memory = self.transformer.pre_norm(self.proj(tokens)).permute(1, 0, 2)
        query_pos = self.query_embed.weight[:, None].repeat(1, tokens.shape[0], 1)
        tgt, hidden = torch.zeros_like(query_pos), []
        for layer in self.transformer.decoder.layers:
            tgt = layer(tgt, memory, query_pos)
            hidden.append(self.transformer.decoder.norm(tgt))
        hs = torch.stack(hidden).transpose(1, 2)  # [L, B, Q + 1, D]
        boxes = self.bbox_embed(hs[:, :, :-1]).sigmoid()
        return boxes, hs[-1, :, :-1] @ self.obj_proj, hs[-1, :, -1] @ self.img_proj


def randomize_(module: nn.Module, seed: int, scale: float = 0.2) -> None:
    """Every parameter random (LayerNorm scales around 1, so a wrong eps or a missing
    norm shows), so no mapping error can hide behind ones/zeros."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            is_norm_scale = name.endswith("weight") and p.ndim == 1
            p.copy_(1.0 + noise if is_norm_scale else noise)


def build_reference(model, seed: int = 0) -> tuple[Backbone, ObjDecoder]:
    """Reference modules with the dimensions of a grain_jax GrainModel, random weights."""
    from grain_jax.models.vit import decode_variant

    vit = decode_variant(model.vit_variant)
    backbone = Backbone(image_size=model.image_size, patch_size=vit["patch_size"], vision_width=vit["width"],
                        vision_layers=vit["depth"], vision_heads=vit["num_heads"], embed_dim=model.embed_dim,
                        context_length=model.context_length, vocab_size=model.vocab_size,
                        text_width=model.text_width, text_layers=model.text_layers, text_heads=model.text_heads)
    decoder = ObjDecoder(feature_dim=vit["width"], d_model=model.decoder_width, heads=model.decoder_heads,
                         ffn=model.decoder_mlp_dim, layers=model.decoder_layers, num_queries=model.num_queries,
                         embed_dim=model.embed_dim)
    randomize_(backbone, seed)
    randomize_(decoder, seed + 1)
    return backbone.eval(), decoder.eval()
