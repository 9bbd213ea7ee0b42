"""CLIP (ViT image tower + causal text tower) with OpenAI's parameter names.

Every parameter keeps the name it has in OpenAI's checkpoints (`visual.conv1.weight`,
`visual.transformer.resblocks.N.attn.in_proj_weight`, `token_embedding.weight`, ...), so an official state dict
loads with `strict=True` and no conversion. Tokens are kept batch-first, (B, N, D), throughout.

Dense work goes through explicit methods rather than hooks: `ResidualAttentionBlock.qkv` gives a block's
queries, keys and values, `ResidualAttentionBlock.attend` finishes a block from any attention output, and
`VisionTransformer.embed` / `forward_intermediates` give the token stream before and between blocks. The attention
variants in `itaclip_core.attention` are built on these.

OpenCLIP's own ViTs use the same parameter names; the architecture differences among them (GELU or QuickGELU,
layer scale `ls_1`/`ls_2`, MLP width, head count, layer-norm epsilon, normalisation constants) are fields of
`CLIPConfig`, whose defaults are OpenAI's.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from itaclip_core.model.kernels import attention, masked_attention

# OpenAI's image normalisation constants (RGB, [0, 1] scale); the default of every CLIPConfig.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = ("quick_gelu", "gelu")
# Largest hidden-activation tensor of one MLP call in CPU inference (see `ResidualAttentionBlock.feed_forward`).
_MLP_GROUP_BYTES = 8 * 2**20


@dataclass(frozen=True)
class CLIPConfig:
    """Sizes of a ViT CLIP; all of them can be read off an OpenAI-layout state dict (`config_from_state_dict`)."""

    embed_dim: int  # size of the joint image-text embedding
    image_size: int  # training resolution of the image tower (224 or 336)
    patch_size: int  # side of a square patch in pixels
    vision_width: int  # token width of the image tower
    vision_layers: int  # number of image transformer blocks
    vision_heads: int  # attention heads in the image tower (width // 64 in every OpenAI model)
    context_length: int  # text context (77)
    vocab_size: int  # text vocabulary (49408)
    text_width: int  # token width of the text tower
    text_layers: int  # number of text transformer blocks
    text_heads: int  # attention heads in the text tower (width // 64)
    # Fields OpenAI's models share and other CLIPs (OpenCLIP, MetaCLIP) may change; the defaults are OpenAI's.
    activation: str = "quick_gelu"  # MLP activation of both towers: "quick_gelu" or "gelu" (exact, erf)
    vision_mlp_width: int | None = None  # hidden width of the image MLPs (None: 4 * vision_width)
    text_mlp_width: int | None = None  # hidden width of the text MLPs (None: 4 * text_width)
    vision_layer_scale: bool = False  # image blocks scale each residual branch by a learnt vector (ls_1, ls_2)
    text_layer_scale: bool = False  # the same for the text blocks
    norm_eps: float = 1e-5  # epsilon of every layer norm
    image_mean: tuple[float, float, float] = OPENAI_MEAN  # normalisation mean of the images, RGB in [0, 1]
    image_std: tuple[float, float, float] = OPENAI_STD  # normalisation std of the images
    interpolation: str = "bicubic"  # resize interpolation of the model's own (classification) preprocessing
    name: str = ""  # architecture name when known (open_clip model name or OpenAI name), for messages

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype, as OpenAI's CLIP does for fp16.

    On the CPU a bfloat16/float16 input goes straight into PyTorch's mixed-precision kernel (float32 statistics and
    weights, the result rounded once to the input's dtype): the same arithmetic without two full-size casts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled():
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(1.702 * x)
        # Inference: one temporary instead of three, the same numbers (each product is the same correctly rounded
        # float32 operation).
        return torch.sigmoid_(x * 1.702).mul_(x)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (`gamma`, OpenCLIP's name)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.to(x.dtype)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + ls_1(attn(ln_1(x))), then x + ls_2(mlp(ln_2(x)));
    `ls_1`/`ls_2` are identities unless the model has layer scale."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_width: int | None = None,
        activation: str = "quick_gelu",
        layer_scale: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        # nn.MultiheadAttention holds the weights under OpenAI's names (in_proj_weight, out_proj); the computation
        # below is explicit so that the queries, keys and values are available to the dense attention variants.
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width, eps=norm_eps)
        hidden = mlp_width or width * 4
        act = QuickGELU() if activation == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", act), ("c_proj", nn.Linear(hidden, width))])
        )
        self.ln_2 = LayerNorm(width, eps=norm_eps)
        # Identities (no parameters) without layer scale, so OpenAI's state dicts keep their exact key set.
        self.ls_1: nn.Module = LayerScale(width) if layer_scale else nn.Identity()
        self.ls_2: nn.Module = LayerScale(width) if layer_scale else nn.Identity()
        self.heads = heads

    def in_projection(self, x: torch.Tensor) -> torch.Tensor:
        """Queries, keys and values of `ln_1(x)` side by side: (..., width) -> (..., 3 * width)."""
        return F.linear(self.ln_1(x), self.attn.in_proj_weight, self.attn.in_proj_bias)

    def split_heads(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, 3 * width) from `in_projection` -> queries, keys and values, each (B, heads, N, head_dim)."""
        batch, tokens, triple = projected.shape
        y = projected.view(batch, tokens, 3, self.heads, triple // (3 * self.heads))  # (B, N, 3, H, hd)
        q, k, v = y.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, hd)
        return q, k, v

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of `ln_1(x)`, each (B, heads, N, head_dim). x: (B, N, width)."""
        return self.split_heads(self.in_projection(x))

    def project(self, heads_out: torch.Tensor) -> torch.Tensor:
        """Merge heads, apply the output projection and the layer scale: (B, H, N, hd) -> (B, N, width).

        This is the attention branch exactly as it is added to the residual stream."""
        batch, heads, tokens, head_dim = heads_out.shape
        merged = heads_out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)  # (B, N, width)
        return self.ls_1(self.attn.out_proj(merged))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP branch as it is added to the residual stream: ls_2(mlp(ln_2(x))).

        In inference on the CPU, many tokens at once go through the MLP in row groups, so that the hidden
        activations stay in cache and no allocation is large enough to be handed back to the system after every
        block (the cost of that is re-faulting tens of MB per block). Every row is computed by the same products,
        so the result is the same."""
        rows = x.numel() // x.shape[-1]
        hidden = self.mlp.c_fc.out_features
        if x.device.type != "cpu" or torch.is_grad_enabled() or rows * hidden * x.element_size() <= _MLP_GROUP_BYTES:
            return self.ls_2(self.mlp(self.ln_2(x)))
        group = max(1, _MLP_GROUP_BYTES // (hidden * x.element_size()))
        flat = x.reshape(rows, x.shape[-1])
        out = torch.empty_like(flat)
        for start in range(0, rows, group):
            part = flat[start : start + group]
            out[start : start + group] = self.ls_2(self.mlp(self.ln_2(part)))
        return out.view(x.shape)

    def attend(
        self, x: torch.Tensor, heads_out: torch.Tensor, residual: bool = True, mlp: bool = True
    ) -> torch.Tensor:
        """Finish the block from an attention output (B, H, N, hd), optionally without residual or MLP."""
        y = self.project(heads_out)
        x = x + y if residual else y
        if mlp:
            x = x + self.feed_forward(x)
        return x

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        q, k, v = self.qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True) if causal else attention(q, k, v)
        return self.attend(x, out)


class Transformer(nn.Module):
    """A stack of residual attention blocks (`resblocks.N`)."""

    def __init__(self, width: int, layers: int, heads: int, causal: bool = False, **block_options) -> None:
        """`block_options` (mlp_width, activation, layer_scale, norm_eps) go to every block."""
        super().__init__()
        self.width = width
        self.layers = layers
        self.causal = causal
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads, **block_options) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal=self.causal)
        return x


class VisionTransformer(nn.Module):
    """CLIP's image tower: patch embedding, class token, transformer, `ln_post` and projection."""

    def __init__(
        self, image_size: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int, **block_options
    ) -> None:
        super().__init__()
        self.input_resolution = image_size
        self.patch_size = patch_size
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((image_size // patch_size) ** 2 + 1, width))
        eps = block_options.get("norm_eps", 1e-5)
        self.ln_pre = LayerNorm(width, eps=eps)
        self.transformer = Transformer(width, layers, heads, **block_options)
        self.ln_post = LayerNorm(width, eps=eps)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    @property
    def blocks(self) -> nn.Sequential:
        return self.transformer.resblocks

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, cols) of an input of this size; the convolution drops any remainder."""
        return height // self.patch_size, width // self.patch_size

    def positional_embedding_for(self, rows: int, cols: int) -> torch.Tensor:
        """Positional embedding for a rows x cols patch grid: (1 + rows * cols, width).

        The training grid's embedding is resized bicubically with the scale factors (rows + 0.1) / base and
        (cols + 0.1) / base, exactly as the published SCLIP and ITACLIP code does (the +0.1 makes the output size
        round to the grid; the scale factors themselves, not the output size, set the sampling positions).
        """
        base = int(math.sqrt(self.positional_embedding.shape[0] - 1))
        if (rows, cols) == (base, base):
            return self.positional_embedding
        cls_pos = self.positional_embedding[:1]
        grid = self.positional_embedding[1:].reshape(1, base, base, -1).permute(0, 3, 1, 2)  # (1, width, base, base)
        resized = F.interpolate(
            grid.float(), scale_factor=((rows + 0.1) / base, (cols + 0.1) / base), mode="bicubic"
        )  # (1, width, rows, cols)
        if resized.shape[-2:] != (rows, cols):
            raise RuntimeError(f"positional-embedding resize gave {tuple(resized.shape[-2:])}, expected {(rows, cols)}")
        resized = resized.to(grid.dtype).permute(0, 2, 3, 1).reshape(rows * cols, -1)  # (rows * cols, width)
        return torch.cat([cls_pos, resized], dim=0)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens entering the first block: (B, 1 + rows * cols, width), class token first, after `ln_pre`."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        rows, cols = self.grid_size(images.shape[-2], images.shape[-1])
        if rows < 1 or cols < 1:
            raise ValueError(
                f"an image of {images.shape[-2]}x{images.shape[-1]} px is smaller than one {self.patch_size}-px patch"
            )
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (B, width, rows, cols)
        x = x.flatten(2).transpose(1, 2)  # (B, rows * cols, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + rows * cols, width)
        x = x + self.positional_embedding_for(rows, cols).to(x.dtype)
        return self.ln_pre(x)

    def forward_intermediates(
        self, images: torch.Tensor, indices: Sequence[int] = (), stop: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run blocks `0 .. stop-1` (all by default); return the last tokens and the outputs of blocks `indices`.

        Indices are 0-based block numbers; tokens are (B, 1 + rows * cols, width), before `ln_post`.
        """
        x = self.embed(images)
        stop = len(self.blocks) if stop is None else stop
        wanted = set(indices)
        outputs: list[torch.Tensor] = []
        for index, block in enumerate(self.blocks[:stop]):
            x = block(x)
            if index in wanted:
                outputs.append(x)
        return x, outputs

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """`ln_post` and projection of tokens: (..., width) -> (..., output_dim)."""
        return self.ln_post(tokens) @ self.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The standard CLIP image embedding: the projected class token, (B, output_dim)."""
        tokens, _ = self.forward_intermediates(images)
        return self.head(tokens[:, 0])


class CLIP(nn.Module):
    """OpenAI's CLIP with a ViT image tower."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.context_length = config.context_length
        self.visual = VisionTransformer(
            config.image_size,
            config.patch_size,
            config.vision_width,
            config.vision_layers,
            config.vision_heads,
            config.embed_dim,
            mlp_width=config.vision_mlp_width,
            activation=config.activation,
            layer_scale=config.vision_layer_scale,
            norm_eps=config.norm_eps,
        )
        self.transformer = Transformer(
            config.text_width,
            config.text_layers,
            config.text_heads,
            causal=True,
            mlp_width=config.text_mlp_width,
            activation=config.activation,
            layer_scale=config.text_layer_scale,
            norm_eps=config.norm_eps,
        )
        self.vocab_size = config.vocab_size
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.text_width))
        self.ln_final = LayerNorm(config.text_width, eps=config.norm_eps)
        self.text_projection = nn.Parameter(torch.empty(config.text_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        # Identity of the weights (checkpoint sha256 or the random-model recipe); set by the loaders.
        self.weights_id: str = "unknown"

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the patch-embedding weights)."""
        return self.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (B, embed_dim): the projected class token, as OpenAI's `encode_image`."""
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor, trim: bool = True) -> torch.Tensor:
        """Text embeddings (B, embed_dim): final layer norm at the end-of-text token, then the projection.

        Args:
            tokens: (B, context_length) ids from `tokenize`; the end-of-text token has the largest id.
            trim: run the transformer only up to the longest end-of-text position of the batch. The causal mask
                stops any later position from reaching an end-of-text token, so this gives the same embeddings for
                a fraction of the work.
        """
        eot = tokens.argmax(dim=-1)  # (B,)
        length = int(eot.max().item()) + 1 if trim and tokens.shape[0] else tokens.shape[1]
        tokens = tokens[:, :length]
        x = self.token_embedding(tokens).to(self.dtype)  # (B, L, text_width)
        x = x + self.positional_embedding[:length].to(self.dtype)
        x = self.transformer(x)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, text_width)
        return x @ self.text_projection.to(x.dtype)

    def encode_text_shared_prefix(self, tokens: torch.Tensor, prefix_length: int) -> torch.Tensor:
        """`encode_text` for rows whose first `prefix_length` tokens are the same (prompts of one template).

        Same result as `encode_text`, for less work, using the causal mask three ways:
        - the hidden states of the shared positions do not depend on what follows, so they are computed once
          (batch of one) and their keys and values are reused by every row;
        - each row only runs its own positions up to its end-of-text token: the per-token layers (projections,
          MLP, layer norms) run on the rows' real tokens packed together, and only attention sees them padded to
          the longest row, where a position never attends to a later (padding) one;
        - in the last block only the end-of-text position is read, so only its query, output projection and MLP
          are computed there.

        Args:
            tokens: (B, context_length) ids; every row starts with the same `prefix_length` ids.
            prefix_length: length of the shared prefix; must not reach any row's end-of-text token.
        """
        eot = tokens.argmax(dim=-1)  # (B,)
        if prefix_length < 1 or prefix_length > int(eot.min()):
            return self.encode_text(tokens)
        batch, prefix, device = tokens.shape[0], prefix_length, tokens.device
        lengths = eot - prefix + 1  # (B,) own positions of each row, end-of-text token included
        suffix = int(lengths.max())
        span = prefix + suffix
        positions = self.positional_embedding.to(self.dtype)
        x = self.token_embedding(tokens[:1, :prefix]).to(self.dtype) + positions[:prefix]
        prefix_qkv: list[torch.Tensor] = []
        for block in self.transformer.resblocks:
            projected = block.in_projection(x)  # (1, prefix, 3 width)
            prefix_qkv.append(projected)
            x = block.attend(x, F.scaled_dot_product_attention(*block.split_heads(projected), is_causal=True))
        # Each row's positions laid out as (B, prefix + suffix): the prefix, then its own tokens, then padding.
        # The rows' real own tokens are kept packed, (N, width), for the per-token layers.
        own = torch.arange(suffix, device=device) < lengths[:, None]  # (B, suffix)
        layout = torch.arange(batch * span, device=device).view(batch, span)[:, prefix:]
        packed = layout[own]  # flat (B * span) indices of the real positions
        y = self.token_embedding(tokens[:, prefix:span]).to(self.dtype) + positions[prefix:span]
        y = y[own]  # (N, width)
        # Own position j sees every prefix position and own positions 0..j; padding is never seen.
        mask = torch.ones(suffix, span, dtype=torch.bool, device=device).tril(diagonal=prefix)
        last = len(self.transformer.resblocks) - 1
        for index, (block, prefix_rows) in enumerate(zip(self.transformer.resblocks, prefix_qkv)):
            projected = block.in_projection(y)  # (N, 3 width)
            grid = projected.new_zeros(batch * span, projected.shape[1])  # padding rows stay zero
            grid.view(batch, span, -1)[:, :prefix] = prefix_rows
            grid.index_copy_(0, packed, projected)
            q, k, v = block.split_heads(grid.view(batch, span, -1))
            if index == last:
                # Only the end-of-text positions are read: their queries, output projection and MLP.
                q = q[torch.arange(batch, device=device), :, prefix + lengths - 1].unsqueeze(2)  # (B, H, 1, hd)
                out = masked_attention(q, k, v, mask[lengths - 1][:, None, None])
                ends = torch.cumsum(lengths, 0) - 1  # packed index of each row's end-of-text token
                y = block.attend(y.index_select(0, ends).unsqueeze(1), out).squeeze(1)  # (B, width)
            else:
                out = masked_attention(q[:, :, prefix:], k, v, mask)  # (B, H, suffix, hd)
                y = y + block.ls_1(block.attn.out_proj(out.transpose(1, 2)[own].flatten(1)))  # (N, width)
                y = y + block.feed_forward(y)
        y = self.ln_final(y)
        return y @ self.text_projection.to(y.dtype)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled cosine-similarity logits, per image and per text, as OpenAI's `forward`."""
        image_features = F.normalize(self.encode_image(images).float(), dim=-1)
        text_features = F.normalize(self.encode_text(tokens).float(), dim=-1)
        logits_per_image = self.logit_scale.exp().float() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def cast_like_openai(model: CLIP, dtype: torch.dtype) -> CLIP:
    """Cast the weights OpenAI's `convert_weights` casts (convolutions, linear layers, attention projections,
    `proj`, `text_projection`) to `dtype`; layer norms, embeddings and `logit_scale` stay float32."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.to(dtype)
        if isinstance(module, nn.MultiheadAttention):
            module.in_proj_weight.data = module.in_proj_weight.data.to(dtype)
            module.in_proj_bias.data = module.in_proj_bias.data.to(dtype)
    model.visual.proj.data = model.visual.proj.data.to(dtype)
    model.text_projection.data = model.text_projection.data.to(dtype)
    return model
