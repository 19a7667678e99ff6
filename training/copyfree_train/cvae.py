"""The detection CVAE (DESIGN.md §3, seed 001 §3.2) and its export head.

Owns: the encoder/decoder architecture, the VAE loss, and `DetectionKeyHead`, the
module that is exported to ONNX and turns images into embedding, first key and second
key exactly as `copyfree.codes` defines them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from copyfree.codes import EMBEDDING_DIM, FIRST_KEY_BITS, SECOND_KEY_SCALE
from copyfree.preprocess import PreprocessSpec

ARCHITECTURE = "cvae-5conv-8192-2048-64"
# Grayscale 128x128 in [0,1], no normalisation: the seed's input and the sigmoid
# decoder's target range.
PREPROCESS = PreprocessSpec(size=128, channels=1, mean=(0.0,), std=(1.0,))
INPUT_SIZE = 128
LATENT_DIM = EMBEDDING_DIM
FLAT_DIM = 128 * 8 * 8  # 8192, as in the seed
HIDDEN_DIM = 2048


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    # BatchNorm speeds up training; it is frozen (eval) for export and folded into
    # the conv by the ONNX exporter.
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.2, inplace=True),
    )


def _deconv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.2, inplace=True),
    )


class Encoder(nn.Module):
    """(n,1,128,128) -> mu, logvar, each (n,64)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv(1, 32, 2),  # 64x64
            _conv(32, 64, 2),  # 32x32
            _conv(64, 128, 2),  # 16x16
            _conv(128, 128, 2),  # 8x8
            _conv(128, 128, 1),  # 8x8 -> 8192 flat
        )
        self.dense = nn.Sequential(nn.Linear(FLAT_DIM, HIDDEN_DIM), nn.LeakyReLU(0.2))
        self.mu = nn.Linear(HIDDEN_DIM, LATENT_DIM)
        self.logvar = nn.Linear(HIDDEN_DIM, LATENT_DIM)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.dense(torch.flatten(self.features(x), 1))
        return self.mu(h), self.logvar(h)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The detection embedding: mu (every detection encoder has this method)."""
        return self.forward(x)[0]

    def fuse_for_export(self) -> None:
        """Nothing to do: the ONNX exporter folds these BatchNorms, and the fp16
        rounding of the folded weights is checked by the parity test like any other."""


class Decoder(nn.Module):
    """(n,64) -> (n,1,128,128) in (0,1)."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Sequential(
            nn.Linear(LATENT_DIM, HIDDEN_DIM),
            nn.LeakyReLU(0.2),
            nn.Linear(HIDDEN_DIM, FLAT_DIM),
            nn.LeakyReLU(0.2),
        )
        self.up = nn.Sequential(
            # Channels halve as resolution doubles, so each stage costs about the
            # same; the decoder is dropped at export, it only has to train the encoder.
            _deconv(128, 64),  # 16x16
            _deconv(64, 32),  # 32x32
            _deconv(32, 16),  # 64x64
            _deconv(16, 8),  # 128x128
            nn.Conv2d(8, 1, 3, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(z))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid output, for a numerically stable BCE."""
        return self.up(self.dense(z).view(-1, 128, 8, 8))


class CVAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def reparameterise(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        # Sample only in training; at eval the embedding is mu (deterministic keys).
        if not self.training:
            return mu
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x -> (recon in (0,1), mu, logvar)."""
        mu, logvar = self.encoder(x)
        return self.decoder(self.reparameterise(mu, logvar)), mu, logvar


@dataclass(frozen=True)
class LossParts:
    total: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor


def vae_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float,
) -> LossParts:
    """Per-image mean of (BCE summed over pixels) + beta * KL(q(z|x) || N(0,I)).

    BCE rather than MSE: the target is in [0,1] (a Bernoulli likelihood per pixel),
    and most of the corpus is clip-art on white, where BCE's steep gradient near 0/1
    keeps thin dark strokes that MSE averages into grey. Summing per image (not a
    pixel mean) keeps the usual VAE balance between 16384 pixels and 64 KL terms, so
    beta means the same as in the literature.
    """
    n = target.shape[0]
    recon = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / n
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / n
    return LossParts(recon + beta * kl, recon, kl)


class DetectionKeyHead(nn.Module):
    """Encoder + key construction, the module exported to the detection bundle.

    `encoder` is any module with `embed(images) -> (n,64)` (this CVAE's Encoder or
    copyfree_train.lite_keys.LiteKeyEncoder); with mu = that embedding:
    images -> embedding (n,64) float32 = mu,
    first_key (n,8) uint8 = bits (mu > theta) packed MSB-first,
    second_key (n,64) int16 = clamp(round(1000 mu)).
    Matches copyfree.codes.first_key/second_key bit for bit: the second key is computed
    in float64 like numpy does, so float32 rounding of 1000*mu cannot move a .5 tie.
    """

    def __init__(self, encoder: nn.Module, theta: np.ndarray | torch.Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        theta_t = torch.as_tensor(np.asarray(theta, dtype=np.float32))
        if theta_t.shape != (LATENT_DIM,):
            raise ValueError(
                f"theta must have shape ({LATENT_DIM},), got {theta_t.shape}"
            )
        self.register_buffer("theta", theta_t)
        weights = 2.0 ** torch.arange(7, -1, -1, dtype=torch.float32)  # 128 .. 1
        self.register_buffer("bit_weights", weights)

    def forward(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu = self.encoder.embed(images)
        bits = (mu > self.theta).to(torch.float32)
        packed = (bits.view(-1, FIRST_KEY_BITS // 8, 8) * self.bit_weights).sum(-1)
        first = packed.to(torch.uint8)
        scaled = torch.round(mu.to(torch.float64) * SECOND_KEY_SCALE)
        second = torch.clamp(scaled, -32768.0, 32767.0).to(torch.int16)
        return mu, first, second
