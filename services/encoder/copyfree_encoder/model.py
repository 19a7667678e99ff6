"""Model bundles under ONNX Runtime: load and check them, encode images in batches, and
merge concurrent requests into shared model runs (micro-batching)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from copyfree.background import BackgroundBank
from copyfree.bundle import (
    DETECTION_OUTPUTS,
    INPUT_NAME,
    MANIFEST_FILE,
    MODEL_FILE,
    RETRIEVAL_OUTPUTS,
    Kind,
    Manifest,
    read_manifest,
)
from copyfree.codes import EMBEDDING_DIM, FIRST_KEY_BITS, SUPPORTED_CODE_BITS
from copyfree.errors import CopyfreeError, FailedPrecondition, InvalidInput, Unavailable
from copyfree.preprocess import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_PIXELS,
    PreprocessSpec,
    decode,
    to_input,
    trim_border,
)
from copyfree.serving.metrics import ENCODER_BATCH_SIZE, MODEL_INFO
from copyfree_encoder.settings import EncoderSettings, Providers

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
KINDS: tuple[Kind, ...] = ("detection", "retrieval")
WARMUP_BATCH = 2  # > 1, so a graph with a fixed batch dimension is refused at start

# ONNX tensor type per output name (the bundle contract, copyfree.bundle).
_OUTPUT_TYPES = {
    "embedding": "tensor(float)",
    "first_key": "tensor(uint8)",
    "second_key": "tensor(int16)",
    "code": "tensor(uint8)",
    "fine": "tensor(int8)",
}
_NUMPY_TYPES = {
    "embedding": np.float32,
    "first_key": np.uint8,
    "second_key": np.int16,
    "code": np.uint8,
    "fine": np.int8,
}
_dlls_preloaded = False


class BundleError(RuntimeError):
    """A model bundle cannot be served as it is; the encoder refuses to start."""


def resolve_providers(choice: Providers) -> list[str]:
    """ENCODER_PROVIDERS -> ONNX Runtime provider list (CPU last, as the fallback)."""
    available = ort.get_available_providers()
    if choice == "cpu":
        return [CPU_PROVIDER]
    if CUDA_PROVIDER in available:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    if choice == "cuda":
        raise BundleError(
            f"ENCODER_PROVIDERS=cuda but this onnxruntime offers only {available}; "
            "install onnxruntime-gpu (requirements-gpu.txt) instead of onnxruntime"
        )
    return [CPU_PROVIDER]


def _preload_cuda_dlls() -> None:
    """Load CUDA/cuDNN from the nvidia-* pip packages (onnxruntime-gpu >= 1.21)."""
    global _dlls_preloaded
    if _dlls_preloaded or not hasattr(ort, "preload_dlls"):
        return
    _dlls_preloaded = True
    try:
        ort.preload_dlls()
    except Exception as e:  # system CUDA may still be found by the loader
        log.warning("onnxruntime.preload_dlls() failed: %s", e)


@dataclass
class RunStats:
    """Model runs and their batch sizes (tests observe micro-batching through this)."""

    runs: int = 0
    images: int = 0
    largest_batch: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, n: int) -> None:
        with self._lock:
            self.runs += 1
            self.images += n
            self.largest_batch = max(self.largest_batch, n)
            self.batch_sizes[n] += 1


class BundleModel:
    """One bundle (model.onnx + manifest.json) in an ONNX Runtime session.

    The constructor checks the graph against the manifest's kind (input "images"
    (n, channels, size, size) float32; the kind's outputs with their dtypes and widths)
    and runs a warm-up batch; any mismatch raises BundleError naming the bundle.
    """

    def __init__(
        self,
        bundle_dir: Path | str,
        *,
        providers: Providers = "auto",
        intra_op_threads: int = 0,
    ) -> None:
        self.path = Path(bundle_dir)
        model_path = self.path / MODEL_FILE
        try:
            self.manifest: Manifest = read_manifest(self.path)
            self.manifest_json = (self.path / MANIFEST_FILE).read_text()
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BundleError(f"bundle {self.path}: bad {MANIFEST_FILE}: {e}") from e
        if not model_path.is_file():
            raise BundleError(f"bundle {self.path}: no {MODEL_FILE}")
        self._check_manifest()
        chosen = resolve_providers(providers)
        if CUDA_PROVIDER in chosen:
            _preload_cuda_dlls()
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=chosen
            )
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
            raise BundleError(
                f"bundle {self.path}: onnxruntime cannot load it: {e}"
            ) from e
        self.execution_provider: str = self._session.get_providers()[0]
        if providers == "cuda" and self.execution_provider != CUDA_PROVIDER:
            raise BundleError(
                f"bundle {self.path}: ENCODER_PROVIDERS=cuda but the CUDA provider did "
                f"not initialise (session uses {self._session.get_providers()})"
            )
        if CUDA_PROVIDER in chosen and self.execution_provider != CUDA_PROVIDER:
            log.warning(
                "Bundle[%s] CUDA is available but the session fell back to %s",
                self.kind,
                self.execution_provider,
            )
        self.output_names: tuple[str, ...] = (
            DETECTION_OUTPUTS if self.kind == "detection" else RETRIEVAL_OUTPUTS
        )
        self.stats = RunStats()
        try:
            self.background = (
                BackgroundBank.load(self.path, self.manifest)
                if self.kind == "detection"
                else None
            )
        except (OSError, ValueError) as e:
            raise BundleError(f"bundle {self.path}: bad background bank: {e}") from e
        self._check_graph()
        self._warm_up()

    @property
    def kind(self) -> Kind:
        return self.manifest.kind

    @property
    def spec(self) -> PreprocessSpec:
        return self.manifest.preprocess

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.spec.channels, self.spec.size, self.spec.size)

    def expected_widths(self) -> dict[str, int]:
        """Last dimension of every output, from the manifest."""
        m = self.manifest
        if m.kind == "detection":
            return {
                "embedding": EMBEDDING_DIM,
                "first_key": FIRST_KEY_BITS // 8,
                "second_key": EMBEDDING_DIM,
            }
        return {"code": m.code_bits // 8, "fine": m.fine_dim}

    def run(self, inputs: NDArray[np.float32]) -> dict[str, NDArray[Any]]:
        """(n, channels, size, size) float32 -> {output name: (n, width) array}."""
        if inputs.ndim != 4 or inputs.shape[1:] != self.input_shape:
            raise ValueError(
                f"{self.kind} model wants (n, {', '.join(map(str, self.input_shape))}) "
                f"inputs, got {inputs.shape}"
            )
        n = int(inputs.shape[0])
        values = self._session.run(list(self.output_names), {INPUT_NAME: inputs})
        self.stats.record(n)
        ENCODER_BATCH_SIZE.observe(n)
        return dict(zip(self.output_names, values, strict=True))

    def _fail(self, problem: str) -> BundleError:
        return BundleError(f"bundle {self.path} ({self.manifest.kind}): {problem}")

    def _check_manifest(self) -> None:
        m = self.manifest
        if m.kind == "detection" and m.code_bits != FIRST_KEY_BITS:
            raise self._fail(
                f"detection code_bits must be {FIRST_KEY_BITS}, got {m.code_bits}"
            )
        if m.kind == "retrieval":
            if m.code_bits not in SUPPORTED_CODE_BITS:
                raise self._fail(
                    f"code_bits must be a multiple of 8 in [8, 256], got {m.code_bits}"
                )
            if m.fine_dim < 1:
                raise self._fail(f"retrieval fine_dim must be >= 1, got {m.fine_dim}")

    def _check_graph(self) -> None:
        inputs = self._session.get_inputs()
        if [i.name for i in inputs] != [INPUT_NAME]:
            raise self._fail(
                f"the graph must have exactly one input {INPUT_NAME!r}, "
                f"has {[i.name for i in inputs]}"
            )
        (image_input,) = inputs
        if image_input.type != "tensor(float)":
            raise self._fail(
                f"input {INPUT_NAME!r} must be float32, is {image_input.type}"
            )
        shape = list(image_input.shape)
        if len(shape) != 4:
            raise self._fail(
                f"input {INPUT_NAME!r} must have rank 4, has shape {shape}"
            )
        for dim, want, what in zip(
            shape[1:], self.input_shape, ("channels", "height", "width"), strict=True
        ):
            if isinstance(dim, int) and dim != want:
                raise self._fail(
                    f"input {what} is {dim} but the manifest's preprocess gives {want} "
                    f"(shape {shape}, preprocess {self.spec.to_dict()})"
                )
        outputs = {o.name: o for o in self._session.get_outputs()}
        missing = [name for name in self.output_names if name not in outputs]
        if missing:
            raise self._fail(
                f"a {self.kind} graph must output {list(self.output_names)}; "
                f"missing {missing} (has {sorted(outputs)})"
            )
        for name, width in self.expected_widths().items():
            out = outputs[name]
            if out.type != _OUTPUT_TYPES[name]:
                raise self._fail(
                    f"output {name!r} must be {_OUTPUT_TYPES[name]}, is {out.type}"
                )
            if len(out.shape) != 2:
                raise self._fail(
                    f"output {name!r} must have rank 2, has shape {out.shape}"
                )
            if isinstance(out.shape[1], int) and out.shape[1] != width:
                raise self._fail(
                    f"output {name!r} has width {out.shape[1]}, "
                    f"the manifest implies {width}"
                )

    def _warm_up(self) -> None:
        """Run a zero batch: checks real output shapes, pays ORT's first-run cost."""
        batch = np.zeros((WARMUP_BATCH, *self.input_shape), dtype=np.float32)
        try:
            values = self._session.run(list(self.output_names), {INPUT_NAME: batch})
        except Exception as e:
            raise self._fail(f"warm-up run failed: {e}") from e
        for name, value in zip(self.output_names, values, strict=True):
            want = (WARMUP_BATCH, self.expected_widths()[name])
            if value.shape != want or value.dtype != _NUMPY_TYPES[name]:
                raise self._fail(
                    f"warm-up output {name!r} is {value.dtype}{list(value.shape)}, "
                    f"want {np.dtype(_NUMPY_TYPES[name])}{list(want)}"
                )

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"BundleModel({m.kind} {m.name} {m.version} on {self.execution_provider})"
        )


@dataclass(frozen=True)
class Prepared:
    """One decoded image, preprocessed for each model it is to be run through."""

    width: int
    height: int
    inputs: Mapping[Kind, NDArray[np.float32]]  # kind -> (channels, size, size)
    # The image without its uniform border, for detection only (None: not asked for,
    # or the image has no such border).
    trimmed: Prepared | None = None


@dataclass(frozen=True)
class EncodedImage:
    """Model outputs for one image; the fields of a kind not requested are None."""

    width: int
    height: int
    embedding: NDArray[np.float32] | None = None  # (64,)
    first_key: bytes | None = None  # 8 bytes, MSB-first
    second_key: NDArray[np.int16] | None = None  # (64,)
    background: float | None = None  # copyfree.background; None: the bundle has no bank
    code: bytes | None = None  # code_bits / 8 bytes, MSB-first
    fine: bytes | None = None  # fine_dim int8 values


class Encoder:
    """Detection and/or retrieval models plus the one decode -> preprocess pipeline."""

    def __init__(
        self,
        detection: BundleModel | None,
        retrieval: BundleModel | None,
        *,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_batch: int = 32,
    ) -> None:
        if detection is None and retrieval is None:
            raise BundleError("the encoder needs a detection or a retrieval bundle")
        for model, kind in ((detection, "detection"), (retrieval, "retrieval")):
            if model is not None and model.kind != kind:
                raise BundleError(
                    f"bundle {model.path} is a {model.kind} bundle, "
                    f"given as the {kind} one"
                )
        self.detection, self.retrieval = detection, retrieval
        self.max_image_bytes, self.max_pixels = max_image_bytes, max_pixels
        self.max_batch = max_batch

    @classmethod
    def load(cls, settings: EncoderSettings) -> Encoder:
        """Load the configured bundles (blocking: call it in a thread)."""
        models: dict[str, BundleModel | None] = {}
        for kind, path in (
            ("detection", settings.detection_bundle),
            ("retrieval", settings.retrieval_bundle),
        ):
            if path is None:
                models[kind] = None
                continue
            start = time.perf_counter()
            model = BundleModel(
                path,
                providers=settings.providers,
                intra_op_threads=settings.intra_op_threads,
            )
            m = model.manifest
            log.info(
                "Encoder[%s] loaded %s %s from %s on %s in %.2fs",
                kind,
                m.name,
                m.version,
                path,
                model.execution_provider,
                time.perf_counter() - start,
            )
            MODEL_INFO.labels(kind, m.name, m.version).set(1)
            models[kind] = model
        return cls(
            models["detection"],
            models["retrieval"],
            max_image_bytes=settings.max_image_bytes,
            max_pixels=settings.max_pixels,
            max_batch=settings.max_batch,
        )

    @property
    def models(self) -> list[BundleModel]:
        return [m for m in (self.detection, self.retrieval) if m is not None]

    def model(self, kind: Kind) -> BundleModel:
        model = self.detection if kind == "detection" else self.retrieval
        if model is None:
            env = f"ENCODER_{kind.upper()}_BUNDLE"
            raise FailedPrecondition(f"this encoder has no {kind} model loaded ({env})")
        return model

    def resolve_outputs(self, requested: Iterable[Kind] = ()) -> frozenset[Kind]:
        """Requested kinds (empty = all loaded models); FailedPrecondition if absent."""
        kinds = frozenset(requested)
        if not kinds:
            return frozenset(m.kind for m in self.models)
        for kind in kinds:
            self.model(kind)
        return kinds

    def prepare(
        self, data: bytes, outputs: frozenset[Kind], *, trimmed: bool = False
    ) -> Prepared:
        """Decode (limits, EXIF, alpha on white), preprocess for each requested model;
        with `trimmed`, also the detection input of the image without its uniform
        border (copyfree.preprocess.trim_border), when it has one. (The detection
        model must be loaded for that: Outputs checks it.)

        Raises InvalidInput for anything wrong with the bytes."""
        try:
            image = decode(
                data, max_bytes=self.max_image_bytes, max_pixels=self.max_pixels
            )
        except (CopyfreeError, MemoryError, RecursionError):
            raise
        except Exception as e:  # Pillow plugins raise odd types on hostile input
            log.warning(
                "decoder raised %s on %d bytes: %s", type(e).__name__, len(data), e
            )
            raise InvalidInput(
                f"image could not be decoded ({type(e).__name__}: {e})"
            ) from None
        inputs = {
            kind: to_input(image, self.model(kind).spec) for kind in sorted(outputs)
        }
        inner = trim_border(image) if trimmed else None
        return Prepared(
            width=image.width,
            height=image.height,
            inputs=inputs,
            trimmed=None
            if inner is None
            else Prepared(
                width=inner.width,
                height=inner.height,
                inputs={"detection": to_input(inner, self.model("detection").spec)},
            ),
        )

    def run_batch(self, items: Sequence[Prepared]) -> list[EncodedImage]:
        """Run each model once over the items that asked for it (blocking)."""
        columns: dict[str, list[Any]] = {}
        for kind in KINDS:
            rows = [i for i, item in enumerate(items) if kind in item.inputs]
            if not rows:
                continue
            batch = np.stack([items[i].inputs[kind] for i in rows])
            model = self.model(kind)
            values = model.run(batch)
            if model.background is not None:
                values["background"] = model.background.similarity(values["second_key"])
            for name, array in values.items():
                column: list[Any] = [None] * len(items)
                for row, value in zip(rows, array, strict=True):
                    column[row] = value
                columns[name] = column

        def cell(name: str, i: int) -> Any:
            return columns[name][i] if name in columns else None

        results = []
        for i, item in enumerate(items):
            first_key, code, fine, background = (
                cell("first_key", i),
                cell("code", i),
                cell("fine", i),
                cell("background", i),
            )
            results.append(
                EncodedImage(
                    width=item.width,
                    height=item.height,
                    embedding=cell("embedding", i),
                    first_key=None if first_key is None else first_key.tobytes(),
                    second_key=cell("second_key", i),
                    background=(None if background is None else float(background)),
                    code=None if code is None else code.tobytes(),
                    fine=None if fine is None else fine.tobytes(),
                )
            )
        return results

    def encode_images(
        self, images: Sequence[bytes], outputs: Iterable[Kind] = ()
    ) -> list[EncodedImage | InvalidInput]:
        """Blocking batch encode: per-item InvalidInput for bad images, model runs of
        at most max_batch images. Servers use MicroBatcher; this is for tools/tests."""
        kinds = self.resolve_outputs(outputs)
        results: dict[int, EncodedImage | InvalidInput] = {}
        prepared: list[tuple[int, Prepared]] = []
        for i, data in enumerate(images):
            try:
                prepared.append((i, self.prepare(data, kinds)))
            except InvalidInput as e:
                results[i] = e
        for start in range(0, len(prepared), self.max_batch):
            chunk = prepared[start : start + self.max_batch]
            encoded = self.run_batch([item for _, item in chunk])
            results.update(zip((i for i, _ in chunk), encoded, strict=True))
        return [results[i] for i in range(len(images))]


@dataclass
class _Pending:
    item: Prepared
    future: asyncio.Future[EncodedImage]


class MicroBatcher:
    """Merges concurrent encode requests into shared model runs.

    One worker task takes the first waiting item, then gathers more for up to
    `wait_s` (or until `max_batch`), and runs the models in a thread (ONNX Runtime
    releases the GIL, so the event loop keeps serving). Items arriving while a run is in
    progress form the next batch, so under load batches fill without waiting.

    Model runs get their own thread rather than asyncio.to_thread's shared pool, so a
    burst of large images being decoded in that pool never delays a ready batch.
    """

    def __init__(self, encoder: Encoder, *, max_batch: int, wait_s: float) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._encoder, self._max_batch, self._wait_s = encoder, max_batch, wait_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="encoder-model")

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(
                self._run(), name="encoder-micro-batcher"
            )

    async def aclose(self) -> None:
        """Stop the worker; requests still queued fail with UNAVAILABLE."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(
                    Unavailable("the encoder is shutting down")
                )
        self._executor.shutdown(wait=False)

    async def submit(self, item: Prepared) -> EncodedImage:
        return await self._enqueue(item)

    async def submit_many(self, items: Sequence[Prepared]) -> list[EncodedImage]:
        futures = [self._enqueue(item) for item in items]
        return list(await asyncio.gather(*futures))

    def _enqueue(self, item: Prepared) -> asyncio.Future[EncodedImage]:
        if self._closed or self._worker is None or self._worker.done():
            raise Unavailable("the encoder is not running (starting or shutting down)")
        future: asyncio.Future[EncodedImage] = (
            asyncio.get_running_loop().create_future()
        )
        self._queue.put_nowait(_Pending(item, future))
        return future

    async def _next_batch(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        while len(batch) < self._max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = [p for p in await self._next_batch() if not p.future.done()]
            if not batch:
                continue  # every caller went away (cancelled) while waiting
            try:
                encoded = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._encoder.run_batch, [p.item for p in batch]
                )
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(
                            Unavailable("the encoder is shutting down")
                        )
                raise
            except Exception as e:
                log.exception("model run over %d images failed", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            for p, result in zip(batch, encoded, strict=True):
                if not p.future.done():
                    p.future.set_result(result)
