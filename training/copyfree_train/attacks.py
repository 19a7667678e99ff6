"""The attack suite: every edit a copied image is judged against (evaluation) and
trained to survive (augmentation). PIL RGB -> PIL RGB, deterministic.

Owns three groups (docs/models.md "Attack suite" lists every variant):
- weak: the 17 single attacks of seed 004 Table 1, each with every listed parameter,
  plus the seed-000 §4.3 edits (centre crops 80-95 %, rotations -15..15 by 5, Gaussian
  noise). Seed 004 calls every Table 1 attack a weak attack (WA) whatever its
  parameter, and an accumulation of several a strong attack; we keep that
  classification, so "weak" includes 90-degree rotations and noise of variance 0.2.
- hybrid: the 8 hybrid attacks of seed 004 Table 2 (H1-H8), every listed combination.
- practical: what teachers do to a file: borders/padding, grayscale, caption and
  watermark text, PNG / WebP / JPEG re-saves, downscale-then-upscale (thumbnails),
  a screenshot (border + downscale + re-encode).

Every attack is an `Attack` (family, parameter label, group); `apply(image, attack,
image_id)` seeds its randomness (noise, text placement) from (image id, attack key),
so the same image always gets the same copy. `training_view` draws seed-004 weak and
strong views from the same functions for the trainer, and `seed000_view` is the
trainer's original augmentation policy (kept so older runs stay reproducible).

Parameter conventions (the seed does not spell them out; these are the ones of the
libraries such papers use): noise parameters are variances on the [0, 1] scale
(skimage.util.random_noise: Gaussian var, speckle var, salt-and-pepper amount);
filters are k x k (Gaussian sigma from k as OpenCV does); rotation, shear and
translation keep the canvas size and fill with black; "0.1(X/Y)" in Table 2 is a shift
or shear along both axes at once.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GROUPS = ("weak", "hybrid", "practical")
# The 25 attacks seed 004 averages over (Tables 4-7): 17 single families + H1-H8.
SEED004_SINGLE = (
    "BA", "CA", "ST", "SH", "AF", "MF", "GF", "GN", "SN", "SPN",
    "JC", "PT", "RS", "RT", "FL", "SHR", "TR",
)  # fmt: skip
SEED004_HYBRID = ("H1", "H2", "H3", "H4", "H5", "H6", "H7", "H8")
SEED004_FAMILIES = SEED004_SINGLE + SEED004_HYBRID

Rng = np.random.Generator
Op = Callable[[Image.Image, Rng], Image.Image]


# ----------------------------------------------------------------- single edits


def brightness(f: float) -> Op:
    return lambda im, _: ImageEnhance.Brightness(im).enhance(f)


def contrast(f: float) -> Op:
    return lambda im, _: ImageEnhance.Contrast(im).enhance(f)


def saturation(f: float) -> Op:
    return lambda im, _: ImageEnhance.Color(im).enhance(f)


def sharpness(f: float) -> Op:
    return lambda im, _: ImageEnhance.Sharpness(im).enhance(f)


def average_filter(k: int) -> Op:
    return lambda im, _: im.filter(ImageFilter.BoxBlur((k - 1) / 2))


def median_filter(k: int) -> Op:
    return lambda im, _: im.filter(ImageFilter.MedianFilter(k))


def gaussian_filter(k: int) -> Op:
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for a k x k kernel
    return lambda im, _: im.filter(ImageFilter.GaussianBlur(sigma))


def _from_unit(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(arr * 255), 0, 255).astype(np.uint8), "RGB")


def _unit(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.float32) / 255.0


def gaussian_noise_var(var: float) -> Op:
    """Additive N(0, var) on the [0, 1] scale (skimage 'gaussian')."""

    def op(im: Image.Image, rng: Rng) -> Image.Image:
        x = _unit(im)
        return _from_unit(x + rng.normal(0, math.sqrt(var), x.shape).astype(np.float32))

    return op


def speckle_noise(var: float) -> Op:
    """x + x * N(0, var) (skimage 'speckle')."""

    def op(im: Image.Image, rng: Rng) -> Image.Image:
        x = _unit(im)
        n = rng.normal(0, math.sqrt(var), x.shape).astype(np.float32)
        return _from_unit(x + x * n)

    return op


def salt_pepper(amount: float) -> Op:
    """A share `amount` of pixels set to black or white, half each (skimage 's&p')."""

    def op(im: Image.Image, rng: Rng) -> Image.Image:
        x = np.asarray(im).copy()
        u = rng.random(x.shape[:2])
        x[u < amount / 2] = 0
        x[(u >= amount / 2) & (u < amount)] = 255
        return Image.fromarray(x, "RGB")

    return op


def encode(im: Image.Image, fmt: str, **kw: Any) -> Image.Image:
    """Save in `fmt` and decode again (what a re-saved copy goes through)."""
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    return encode(im, "JPEG", quality=quality)


def jpeg_op(quality: int) -> Op:
    return lambda im, _: jpeg(im, quality)


def posterize(bits: int) -> Op:
    return lambda im, _: ImageOps.posterize(im, bits)


def resize(f: float) -> Op:
    def op(im: Image.Image, _: Rng) -> Image.Image:
        w, h = im.size
        size = (max(1, round(w * f)), max(1, round(h * f)))
        return im.resize(size, Image.Resampling.BILINEAR)

    return op


def rotate(degrees: float, fill: tuple[int, int, int] = BLACK) -> Op:
    """Counter-clockwise for positive degrees, same canvas, corners filled."""
    return lambda im, _: im.rotate(
        degrees, resample=Image.Resampling.BILINEAR, fillcolor=fill
    )


def flip(direction: str) -> Op:
    t = (
        Image.Transpose.FLIP_LEFT_RIGHT
        if direction == "H"
        else Image.Transpose.FLIP_TOP_BOTTOM
    )
    return lambda im, _: im.transpose(t)


def shear(sx: float, sy: float) -> Op:
    """Affine shear about the centre (x' = x + sx*y, y' = y + sy*x), same canvas."""

    def op(im: Image.Image, _: Rng) -> Image.Image:
        w, h = im.size
        cx, cy = w / 2, h / 2
        # PIL maps output (x, y) to input (a x + b y + c, d x + e y + f): the inverse.
        a, b, d, e = 1.0, sx, sy, 1.0
        det = a * e - b * d
        ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
        c = cx - ia * cx - ib * cy
        f = cy - id_ * cx - ie * cy
        return im.transform(
            im.size,
            Image.Transform.AFFINE,
            (ia, ib, c, id_, ie, f),
            resample=Image.Resampling.BILINEAR,
            fillcolor=BLACK,
        )

    return op


def translate(tx: float, ty: float) -> Op:
    """Shift by (tx, ty) of the width/height, same canvas, black fill."""

    def op(im: Image.Image, _: Rng) -> Image.Image:
        w, h = im.size
        return im.transform(
            im.size,
            Image.Transform.AFFINE,
            (1, 0, -tx * w, 0, 1, -ty * h),
            resample=Image.Resampling.BILINEAR,
            fillcolor=BLACK,
        )

    return op


def crop(
    image: Image.Image, frac: float, pos: Sequence[float] | None = None
) -> Image.Image:
    """Keep `frac` of each side: centred, or at relative position pos in [0,1]^2."""
    w, h = image.size
    cw, ch = max(1, round(w * frac)), max(1, round(h * frac))
    px, py = (0.5, 0.5) if pos is None else (float(pos[0]), float(pos[1]))
    left, top = round((w - cw) * px), round((h - ch) * py)
    return image.crop((left, top, left + cw, top + ch))


def centre_crop(frac: float) -> Op:
    return lambda im, _: crop(im, frac)


def gaussian_noise(image: Image.Image, sigma: float, rng: Rng) -> Image.Image:
    """Additive N(0, sigma^2) in grey levels (seed 000's noise injection)."""
    arr = np.asarray(image, dtype=np.float32)
    noisy = arr + rng.normal(0.0, sigma, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")


def noise_sigma(sigma: float) -> Op:
    return lambda im, rng: gaussian_noise(im, sigma, rng)


def border(frac: float, colour: tuple[int, int, int] = WHITE) -> Op:
    """Pad every side by `frac` of the longer side (a frame, a slide margin)."""

    def op(im: Image.Image, _: Rng) -> Image.Image:
        pad = max(1, round(max(im.size) * frac))
        return ImageOps.expand(im, border=pad, fill=colour)

    return op


def pad_to_square(colour: tuple[int, int, int] = WHITE) -> Op:
    def op(im: Image.Image, _: Rng) -> Image.Image:
        side = max(im.size)
        out = Image.new("RGB", (side, side), colour)
        out.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
        return out

    return op


def grayscale() -> Op:
    return lambda im, _: im.convert("L").convert("RGB")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


_WORDS = ("Figure", "Source", "Chapter", "Lesson", "Exercise", "Copy", "Class", "Page")


def caption(height_frac: float = 0.12) -> Op:
    """A caption bar across the bottom, covering `height_frac` of the image."""

    def op(im: Image.Image, rng: Rng) -> Image.Image:
        im = im.copy()
        w, h = im.size
        bar = max(8, round(h * height_frac))
        draw = ImageDraw.Draw(im)
        draw.rectangle((0, h - bar, w, h), fill=WHITE)
        text = f"{_WORDS[int(rng.integers(len(_WORDS)))]} {int(rng.integers(1, 99))}"
        draw.text(
            (bar // 4, h - bar + bar // 6), text, fill=BLACK, font=_font(bar // 2)
        )
        return im

    return op


def watermark(opacity: float = 0.35) -> Op:
    """Semi-transparent text tiled diagonally over the whole image."""

    def op(im: Image.Image, rng: Rng) -> Image.Image:
        w, h = im.size
        size = max(8, min(w, h) // 8)
        layer = Image.new("L", (w * 2, h * 2), 0)
        draw = ImageDraw.Draw(layer)
        word = _WORDS[int(rng.integers(len(_WORDS)))].upper()
        font = _font(size)
        for row, y in enumerate(range(0, h * 2, size * 3)):
            for x in range(-(row % 2) * size * 2, w * 2, size * 6):
                draw.text((x, y), word, fill=255, font=font)
        layer = layer.rotate(30, resample=Image.Resampling.BILINEAR)
        layer = layer.crop((w // 2, h // 2, w // 2 + w, h // 2 + h))
        mask = layer.point(lambda v: round(v * opacity))
        out = im.copy()
        out.paste(Image.new("RGB", (w, h), WHITE), (0, 0), mask)
        return out

    return op


def reencode(fmt: str, **kw: Any) -> Op:
    return lambda im, _: encode(im, fmt, **kw)


def down_up(f: float) -> Op:
    """Downscale by f, then back to the original size (a thumbnail blown up)."""

    def op(im: Image.Image, _: Rng) -> Image.Image:
        w, h = im.size
        small = im.resize(
            (max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BILINEAR
        )
        return small.resize((w, h), Image.Resampling.BICUBIC)

    return op


def chain(*ops: Op) -> Op:
    def op(im: Image.Image, rng: Rng) -> Image.Image:
        for o in ops:
            im = o(im, rng)
        return im

    return op


# ----------------------------------------------------------------- the suite


@dataclass(frozen=True)
class Attack:
    family: str  # seed-004 code (BA, ..., H8) or our name (crop, webp, ...)
    param: str  # the parameter, as a label
    group: str  # weak / hybrid / practical
    op: Op

    @property
    def key(self) -> str:
        return f"{self.family}:{self.param}"

    @property
    def seed004(self) -> bool:
        return self.family in SEED004_FAMILIES


def _fmt(v: float) -> str:
    return f"{v:g}"


def _table1() -> list[Attack]:
    out: list[Attack] = []
    factors = (0.7, 0.8, 0.9, 1.1, 1.2, 1.3)
    for fam, make in (
        ("BA", brightness),
        ("CA", contrast),
        ("ST", saturation),
        ("SH", sharpness),
    ):
        out += [Attack(fam, _fmt(f), "weak", make(f)) for f in factors]
    for fam, make in (
        ("AF", average_filter),
        ("MF", median_filter),
        ("GF", gaussian_filter),
    ):
        out += [Attack(fam, f"{k}x{k}", "weak", make(k)) for k in (3, 5, 7, 9)]
    noise = (0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2)
    for fam, make in (
        ("GN", gaussian_noise_var),
        ("SN", speckle_noise),
        ("SPN", salt_pepper),
    ):
        out += [Attack(fam, _fmt(v), "weak", make(v)) for v in noise]
    out += [Attack("JC", str(q), "weak", jpeg_op(q)) for q in range(10, 100, 10)]
    out += [Attack("PT", str(b), "weak", posterize(b)) for b in (4, 5, 6, 7)]
    out += [
        Attack("RS", _fmt(f), "weak", resize(f))
        for f in (0.5, 0.75, 0.9, 1.1, 1.5, 2.0)
    ]
    angles = [*range(-90, 0, 10), *range(10, 100, 10)]
    out += [Attack("RT", str(a), "weak", rotate(a)) for a in angles]
    out += [Attack("FL", d, "weak", flip(d)) for d in ("H", "V")]
    shifts = (-0.3, -0.2, -0.1, 0.1, 0.2, 0.3)
    out += [Attack("SHR", f"X{_fmt(s)}", "weak", shear(s, 0)) for s in shifts]
    out += [Attack("SHR", f"Y{_fmt(s)}", "weak", shear(0, s)) for s in shifts]
    out += [Attack("TR", f"X{_fmt(s)}", "weak", translate(s, 0)) for s in shifts]
    out += [Attack("TR", f"Y{_fmt(s)}", "weak", translate(0, s)) for s in shifts]
    return out


def _table2() -> list[Attack]:
    h: list[Attack] = []

    def add(fam: str, label: str, *ops: Op) -> None:
        h.append(Attack(fam, label, "hybrid", chain(*ops)))

    for deg, q in ((30, 70), (50, 70), (50, 50)):
        add("H1", f"{deg},{q}", rotate(deg), jpeg_op(q))
    for f, b in ((0.5, 0.8), (2.0, 0.8), (0.5, 1.2), (2.0, 1.2)):
        add("H2", f"{_fmt(f)},{_fmt(b)}", resize(f), brightness(b))
    for t, v in ((0.1, 0.05), (0.2, 0.05), (0.1, 0.1)):
        add("H3", f"{_fmt(t)},{_fmt(v)}", translate(t, t), gaussian_noise_var(v))
    for d, s in (("H", 0.8), ("H", 1.2), ("V", 0.8), ("V", 1.2)):
        add("H4", f"{d},{_fmt(s)}", flip(d), sharpness(s))
    for k, b, c in ((7, 4, 1.2), (5, 8, 1.2), (9, 8, 1.1)):
        # PIL posterizes to 1-8 bits; 8 bits is the identity, as in the seed's table.
        add(
            "H5",
            f"{k}x{k},{b},{_fmt(c)}",
            gaussian_filter(k),
            posterize(b),
            contrast(c),
        )
    for s, deg, sh in ((0.7, 50, 0.2), (0.8, 50, 0.3), (0.9, 70, 0.1)):
        add(
            "H6",
            f"{_fmt(s)},{deg},{_fmt(sh)}",
            saturation(s),
            rotate(deg),
            shear(sh, sh),
        )
    for s, t, v in ((1.2, 0.1, 0.05), (1.1, 0.2, 0.05), (1.2, 0.1, 0.1)):
        add(
            "H7",
            f"{_fmt(s)},{_fmt(t)},{_fmt(v)}",
            sharpness(s),
            translate(t, t),
            speckle_noise(v),
        )
    for f, a, k in ((0.5, 0.05, 7), (0.5, 0.05, 9), (2.0, 0.05, 7), (2.0, 0.05, 9)):
        add(
            "H8",
            f"{_fmt(f)},{_fmt(a)},{k}x{k}",
            resize(f),
            salt_pepper(a),
            average_filter(k),
        )
    return h  # fmt: skip


def _seed000() -> list[Attack]:
    out = [
        Attack("crop", _fmt(f), "weak", centre_crop(f)) for f in (0.8, 0.85, 0.9, 0.95)
    ]
    out += [
        Attack("rot", str(a), "weak", rotate(a, WHITE))
        for a in (-15, -10, -5, 5, 10, 15)
    ]
    out += [Attack("noise", _fmt(s), "weak", noise_sigma(s)) for s in (5.0, 10.0, 20.0)]
    return out


def _practical() -> list[Attack]:
    out = [
        Attack("border", f"white{_fmt(f)}", "practical", border(f))
        for f in (0.05, 0.1, 0.2)
    ]
    out += [
        Attack("border", "black0.1", "practical", border(0.1, BLACK)),
        Attack("pad", "square", "practical", pad_to_square()),
        Attack("gray", "-", "practical", grayscale()),
        Attack("text", "caption", "practical", caption()),
        Attack("text", "watermark", "practical", watermark()),
        Attack("png", "-", "practical", reencode("PNG")),
        Attack("webp", "50", "practical", reencode("WEBP", quality=50)),
        Attack("webp", "80", "practical", reencode("WEBP", quality=80)),
        Attack("jpeg", "75", "practical", jpeg_op(75)),
        Attack("jpeg", "95", "practical", jpeg_op(95)),
        Attack("downup", "0.25", "practical", down_up(0.25)),
        Attack("downup", "0.5", "practical", down_up(0.5)),
        Attack(
            "screenshot", "-", "practical",
            chain(border(0.08), resize(0.75), reencode("PNG"), jpeg_op(85)),
        ),
    ]  # fmt: skip
    return out


def suite() -> list[Attack]:
    """Every attack of the suite, in a fixed order (keys are unique)."""
    return _table1() + _table2() + _seed000() + _practical()


def by_key() -> dict[str, Attack]:
    return {a.key: a for a in suite()}


def attack_seed(image_id: str, key: str) -> int:
    """The seed of one (image, attack, parameter): a hash, stable across processes."""
    digest = hashlib.blake2b(f"{image_id}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def apply(image: Image.Image, attack: Attack, image_id: str) -> Image.Image:
    """The attacked copy of `image` (RGB); the same (image_id, attack) gives the same
    copy on every call and every machine."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    rng = np.random.default_rng(attack_seed(image_id, attack.key))
    return attack.op(image, rng).convert("RGB")


# ----------------------------------------------------------------- training views


def training_attacks() -> list[Attack]:
    """What training views draw from: the weak and practical single attacks. Hybrids
    are left to evaluation; strong views are built from singles as seed 004 does."""
    return [a for a in suite() if a.group != "hybrid"]


def weak_view(image: Image.Image, rng: Rng, pool: Sequence[Attack]) -> Image.Image:
    """Seed 004 WA: one attack, picked at random from the pool."""
    attack = pool[int(rng.integers(len(pool)))]
    return attack.op(image, rng).convert("RGB")


def strong_view(
    image: Image.Image, rng: Rng, pool: Sequence[Attack], rounds: int = 5
) -> Image.Image:
    """Seed 004 SA: `rounds` times, a random weak attack, applied with p = 1/2."""
    for _ in range(rounds):
        attack = pool[int(rng.integers(len(pool)))]
        if rng.random() < 0.5:
            image = attack.op(image, rng).convert("RGB")
    return image


def training_view(
    image: Image.Image,
    rng: Rng,
    p_strong: float = 0.5,
    pool: Sequence[Attack] | None = None,
) -> Image.Image:
    """A weak view, or (probability p_strong) a strong one."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    pool = pool if pool is not None else _TRAINING_POOL
    if rng.random() < p_strong:
        return strong_view(image, rng, pool)
    return weak_view(image, rng, pool)


_TRAINING_POOL = training_attacks()
# A colour model sees grayscale in 1 of the pool's 149 weak views and then misses
# 90 % of grayscale copies (lite0, 2026-12-06); the grayscale CVAE never notices.
P_GRAY_COLOUR_MODEL = 0.15


def training_view_colour(
    image: Image.Image, rng: Rng, p_gray: float = P_GRAY_COLOUR_MODEL
) -> Image.Image:
    """training_view, then grayscale with probability p_gray: for RGB models, which
    must learn that a grayscale print of a work is still the work."""
    view = training_view(image, rng)
    if rng.random() < p_gray:
        view = view.convert("L").convert("RGB")
    return view


def training_view_gray35(image: Image.Image, rng: Rng) -> Image.Image:
    """training_view_colour with 35 % grayscale views (a fine-tune for grayscale
    prints, which the 15 % runs still missed)."""
    return training_view_colour(image, rng, p_gray=0.35)


@dataclass(frozen=True)
class Seed000Spec:
    """Probabilities and ranges of the seed-000 training policy (the first runs)."""

    p_flip: float = 0.5
    p_rotate: float = 0.5
    max_degrees: float = 15.0
    p_crop: float = 0.5
    crop_range: tuple[float, float] = (0.80, 0.95)  # side fraction kept
    p_random_crop: float = 0.5  # of crops: random position instead of centre
    p_noise: float = 0.3
    noise_sigma: tuple[float, float] = (2.0, 12.0)  # grey levels
    p_blur: float = 0.15  # the seed's "Gaussian kernel" may mean a blur
    blur_radius: tuple[float, float] = (0.3, 1.2)
    p_color: float = 0.5
    color_range: tuple[float, float] = (0.8, 1.2)  # brightness and contrast factors
    p_jpeg: float = 0.6
    jpeg_quality: tuple[int, int] = (40, 95)


def seed000_view(
    image: Image.Image, rng: Rng, spec: Seed000Spec = Seed000Spec()
) -> Image.Image:
    """Seed 000 §4.3 policy (flips, rotations ±15°, crops 80-95 %, noise, plus blur,
    brightness/contrast and JPEG), each edit with its own probability.

    Every random number is drawn whether or not its edit fires, so the number of draws
    per call is fixed and one image's choices never shift another's.
    """
    u = rng.random(8)
    image = image.convert("RGB") if image.mode != "RGB" else image
    if u[0] < spec.p_flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = float(rng.uniform(-spec.max_degrees, spec.max_degrees))
    if u[1] < spec.p_rotate:
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=WHITE)
    frac = float(rng.uniform(*spec.crop_range))
    pos = rng.random(2)
    if u[2] < spec.p_crop:
        image = crop(image, frac, pos if u[3] < spec.p_random_crop else None)
    bright, contr = rng.uniform(*spec.color_range, size=2)
    if u[4] < spec.p_color:
        image = ImageEnhance.Brightness(image).enhance(float(bright))
        image = ImageEnhance.Contrast(image).enhance(float(contr))
    radius = float(rng.uniform(*spec.blur_radius))
    if u[5] < spec.p_blur:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    sigma = float(rng.uniform(*spec.noise_sigma))
    noise_seed = int(rng.integers(2**31))
    if u[6] < spec.p_noise:
        image = gaussian_noise(image, sigma, np.random.default_rng(noise_seed))
    quality = int(rng.integers(spec.jpeg_quality[0], spec.jpeg_quality[1] + 1))
    if u[7] < spec.p_jpeg:
        image = jpeg(image, quality)
    return image


VIEWS: dict[str, Callable[[Image.Image, Rng], Image.Image]] = {
    "seed000": seed000_view,
    "suite": training_view,
    "suite-colour": training_view_colour,
    "suite-gray35": training_view_gray35,
}
