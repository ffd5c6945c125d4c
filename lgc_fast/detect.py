"""Landmarks for faces in images: the ``Detector`` API.

``Detector.landmarks(images, boxes)`` crops each given face box exactly as training does (the box's square, scaled to
S x S grey levels, S the training crop size: 96 in the paper, a checkpoint's ``image_size``), runs one batched forward
pass, turns heatmaps into points (PCA shape fit and/or a decoder) and maps them back into image pixels.

``Detector.detect(image)`` needs no boxes and no face detector (paper section 4.3):

1. Pyramid: the image, then halved again and again; the first level whose short side is below S px is the last.
2. The fully convolutional network runs on every level (tiled, so memory stays bounded on large images).
3. Combination: every level's heatmaps (omega) are upsampled bilinearly to the original resolution and combined by a
   pixel-wise maximum, remembering which level won each pixel.
4. Candidates: per-channel local maxima of the combined maps above ``threshold``.
5. Hypotheses: a face seen at level l is about S * 2^l px wide (the training crop size), so a candidate of landmark j
   at level l votes for a face centre at its position minus 2^l times landmark j's offset from the centre in the
   mean shape placed in a training crop. Votes are clustered by weighted mean shift with a radius proportional to
   the vote's scale (votes of adjacent levels may join: a face between two scales shows up at both). A cluster with
   enough distinct landmarks becomes a hypothesis: a similarity (position, scale, rotation) fitted from the mean
   shape to its candidates.
6. Verification: the combined heatmaps are resampled into the hypothesis' S x S crop frame and the PCA shape model
   is fitted there (windows global, 20 px, 7 px at S = 96, as for single faces). Only the levels within a factor of
   two of the hypothesis' scale enter its crop, and each landmark's map only within 0.4 S px of its mean-shape
   position, so
   that neighbouring faces of other or equal scale do not pull the fit. A hypothesis is kept when enough fitted
   points sit on activations above ``threshold``, the shape coefficients' Mahalanobis distance is bounded, and the
   fitted scale agrees with the crop's. Overlapping survivors are suppressed by score.

Memory: the forward passes are tiled within ``max_memory_bytes``; the omega maps of all levels (C x H x W x 4 bytes x
~4/3, e.g. 0.75 GB for a 1080p image) are kept on the GPU when they take at most half of its free memory, so steps 3-6
run there too, else on the CPU; the combination runs a few channels at a time.
Coordinates are 0-based pixels with pixel centres at integers (OpenCV's convention) throughout.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from lgc_fast._backend import native_bf16_cpu
from lgc_fast.data.dataset import read_gray
from lgc_fast.data.geometry import (MIRROR_68, box_to_square, crop_transform, face_box, invert_affine, square_to_box,
                                    transform_points, warp_image)
from lgc_fast.decode import DECODERS, blend, decode
from lgc_fast.detector_settings import DEFAULT_DECODE, FIT_THRESHOLD, pipeline_settings, read_metadata
from lgc_fast.errors import LgcError
from lgc_fast.model import LGCN, mirror_averaged_omega
from lgc_fast.multiface import (CROP, ENLARGE, MAX_MAHALANOBIS, MAX_OVERLAP, MIN_LANDMARKS, MIN_SUPPORT, PYRAMID_STEP,
                                SCALE_TOLERANCE, THRESHOLD, Face, Hypothesis, build_pyramid, canonical_mean,
                                cluster_votes, crop_maps, face_hypotheses, face_votes, find_candidates, select_faces)
from lgc_fast.shape import remove_point_offsets
from lgc_fast.tiling import MEMORY_HEADROOM, bytes_per_pixel, iter_tiles

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
WEIGHTS_FILE = "lgcn.pt"
SHAPE_FILE = "shape_model.npz"
METADATA_FILE = "metadata.json"
FIT_WINDOWS = (None, 20, 7)  # paper section 3.3: global, 20 px, 7 px in a 96 px crop (scaled with the crop)
DEFAULT_MEMORY = 1 << 30
# Decoders that refine around given seeds (the fitted points): every local decoder, not argmax.
SEEDED_DECODERS = tuple(name for name, fn in DECODERS.items() if "seeds" in inspect.signature(fn).parameters)


def load_gray(image) -> np.ndarray:
    """A path, or an array (H, W) / (H, W, 3) RGB / (H, W, 4) RGBA, uint8 or float in [0, 255] -> (H, W) float32.

    Paths are decoded to grey by OpenCV exactly as the training data is.
    """
    if isinstance(image, (str, os.PathLike)):
        gray = read_gray(image)
        if gray is None:
            raise LgcError(f"{image}: cannot read or decode the image")
        return gray.astype(np.float32)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype.kind not in "uif":
        raise LgcError(f"image must be a path or a numeric array, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = cv2.cvtColor(arr.astype(np.float32), cv2.COLOR_RGB2GRAY if arr.shape[2] == 3 else cv2.COLOR_RGBA2GRAY)
    elif arr.ndim != 2:
        raise LgcError(f"image must be (H, W), (H, W, 3) RGB, (H, W, 4) RGBA or a path, got shape {arr.shape}")
    if arr.size == 0:
        raise LgcError(f"image is empty (shape {arr.shape})")
    return np.ascontiguousarray(arr, dtype=np.float32)


def sample_maps(heatmaps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of heatmaps (N, C, H, W) at points (N, C, 2) (x, y map pixels) -> (N, C); 0 outside."""
    n, c, h, w = heatmaps.shape
    pts = points.to(heatmaps.dtype)
    grid = torch.stack(((2 * pts[..., 0] + 1) / w - 1, (2 * pts[..., 1] + 1) / h - 1), dim=-1)
    out = F.grid_sample(heatmaps.reshape(n * c, 1, h, w), grid.reshape(n * c, 1, 1, 2), mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out.reshape(n, c)


def square_hull(affine, crop: int = CROP) -> tuple[float, float, float, float]:
    """The axis-aligned box around the image region that a (2, 3) image -> crop affine maps onto the crop x crop
    crop."""
    corners = np.array([[-0.5, -0.5], [crop - 0.5, -0.5], [crop - 0.5, crop - 0.5], [-0.5, crop - 0.5]])
    img = transform_points(corners, invert_affine(affine))
    return (*(float(v) for v in img.min(axis=0)), *(float(v) for v in img.max(axis=0)))


# ---- the API ----


def _bundled(name: str, what: str, argument: str) -> Path:
    path = ASSETS_DIR / name
    if not path.is_file():
        raise LgcError(f"bundled {what} {path} not found (this installation ships without trained assets): "
                       f"pass {argument}=PATH (--{argument.replace('_', '-')} PATH on the command line)")
    return path


def _check_boxes(boxes, where: str) -> np.ndarray:
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise LgcError(f"{where}: boxes must be numbers (x0, y0, x1, y1), got {boxes!r}") from None
    if arr.ndim == 1:
        arr = arr[None]
    if arr.size == 0:
        return np.zeros((0, 4))
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise LgcError(f"{where}: boxes must be (x0, y0, x1, y1) or a (K, 4) array, got shape {arr.shape}")
    if not np.isfinite(arr).all() or not ((arr[:, 2] > arr[:, 0]) & (arr[:, 3] > arr[:, 1])).all():
        raise LgcError(f"{where}: every box needs finite x0 < x1 and y0 < y1, got {arr.tolist()}")
    return arr


PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PRECISION_CHOICES = ("auto", *PRECISIONS)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The network's arithmetic for `precision` on `device`: "auto" is bfloat16 on a CPU that multiplies bfloat16 in
    hardware (``lgc_fast._backend.native_bf16_cpu``: about twice float32's speed there, the same accuracy), else
    float32 (CUDA included); any other name is itself."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, not {precision!r}")
    if precision != "auto":
        return precision
    return "bfloat16" if torch.device(device).type == "cpu" and native_bf16_cpu()[0] else "float32"


def _inference_network(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """What a Detector runs: an LGCN folded for inference (``LGCN.folded``), channels_last (oneDNN's CPU convolutions
    run faster on it: 1.16x and 1.22x on ``Detector.landmarks`` at batch 1 and 16, bundled model, 2 threads; cuDNN's
    take NHWC without transposing), its weights in `dtype`; any other module as it is, in `dtype`."""
    if not isinstance(model, LGCN):
        return model.to(dtype)
    return model.folded().to(dtype=dtype, memory_format=torch.channels_last)


class Detector:
    """Facial landmarks from a trained Local-Global Context Network.

    weights: a checkpoint / exported weights path, an ``LGCN`` module, or None for the bundled ``assets/lgcn.pt``;
    shape_model: a ``ShapeModel``, a path to one, or None for the bundled ``assets/shape_model.npz`` (loaded only when
    needed: ``fit=True`` or ``detect``); device: torch device, default CUDA when available; decode: a decoder of
    ``lgc_fast.decode.DECODERS``; fit: fit the PCA shape model (paper section 3.3). With fit and a local decoder
    (anything but argmax) the points are the release's: the fit, then the regional maximum nearest to each fitted
    point refined by the decoder, blended with the fit by heatmap value (``lgc_fast.decode.blend``); with fit and
    argmax, the fit alone; without fit, the decoder alone. max_memory_bytes: working-memory budget of a forward pass
    (batch size in ``landmarks``, tile size in ``detect``). image_size: the crop size the network was trained on
    (default: the checkpoint's ``image_size``, else the bundled metadata's, else 96). decode=None: for the bundled
    weights its metadata's ``"pipeline"`` choice (``pipeline_settings``: the settings measured best on the training
    split and reported on the validation split), else ``DEFAULT_DECODE``. mirror: ``landmarks`` averages each crop's
    heatmaps with those of its mirror image (``model.mirror_averaged_omega``; twice the network time). fit_threshold:
    pixels above this share of their channel's maximum enter the shape fit (``fit_shape``'s threshold); None: the
    bundled metadata's for the bundled weights, else ``FIT_THRESHOLD`` (1 %, the release's). point_offsets: (C, 2)
    systematic error of the fitted points in the shape model's frame (``lgc_fast.shape.mean_point_offsets``, measured
    on training faces), removed from every fitted face at its size and rotation; None: the bundled metadata's for
    the bundled weights, else no correction. precision: the network's arithmetic, "float32", "float16", "bfloat16"
    (weights and activations; the heatmaps come back as float32 and everything after the network runs in
    float32/float64) or "auto" (default; ``resolve_precision``: bfloat16 on a CPU with hardware bfloat16, else
    float32); ``self.precision`` is the one chosen.

    The forward passes run ``self.network``: ``model.folded()`` (every BatchNorm and activation scale folded into its
    convolution: the same outputs with fewer passes over the activations), channels_last, in ``precision``, made once
    when the Detector is built; ``self.model`` is the network as given.
    """

    def __init__(self, weights=None, shape_model=None, device=None, decode: str | None = None, fit: bool = True,
                 max_memory_bytes: int = DEFAULT_MEMORY, image_size: int | None = None, mirror: bool = False,
                 fit_threshold: float | None = None, point_offsets=None, precision: str = "auto"):
        metadata = read_metadata(ASSETS_DIR / METADATA_FILE) if weights is None else {}
        pipeline = pipeline_settings(metadata, ASSETS_DIR / METADATA_FILE)
        point_offsets = pipeline.get("point_offsets") if point_offsets is None else point_offsets
        decode = pipeline.get("decode", DEFAULT_DECODE) if decode is None else decode
        fit_threshold = pipeline.get("fit_threshold", FIT_THRESHOLD) if fit_threshold is None else fit_threshold
        if decode not in DECODERS:
            raise ValueError(f"decode must be one of {', '.join(DECODERS)}, not {decode!r}")
        if not 0 <= fit_threshold < 1:
            raise ValueError(f"fit_threshold must be in [0, 1), got {fit_threshold!r}")
        if not max_memory_bytes > 0:
            raise ValueError(f"max_memory_bytes must be positive, got {max_memory_bytes!r}")
        try:
            self.device = torch.device(device if device is not None else
                                       "cuda" if torch.cuda.is_available() else "cpu")
        except (RuntimeError, TypeError) as exc:
            raise LgcError(f"device {device!r} is not a torch device ({exc})") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise LgcError(f"device {device!r}: CUDA is not available here")
        self.precision = resolve_precision(precision, self.device)  # checked before any weights are read
        trained_size = None
        if isinstance(weights, torch.nn.Module):
            model = weights
        else:
            from lgc_fast.checkpoint import load_checkpoint, model_from_state

            path = _bundled(WEIGHTS_FILE, "weights", "weights") if weights is None else weights
            state = load_checkpoint(path)
            model = model_from_state(state, path)
            trained_size = state.get("image_size", metadata.get("image_size"))
        self.crop = int(image_size or trained_size or CROP)
        if self.crop < 8:
            raise LgcError(f"image_size must be at least 8 px, got {self.crop}")
        self.model = model.to(self.device).eval()
        self.dtype = PRECISIONS[self.precision]  # the network's weights and inputs
        self.network = _inference_network(self.model, self.dtype)
        self.n_landmarks = int(getattr(model, "n_landmarks", 68))
        self.decode = decode
        self.fit = bool(fit)
        self.fit_threshold = float(fit_threshold)
        self.mirror = bool(mirror)
        self.point_offsets = None if point_offsets is None else np.asarray(point_offsets, dtype=np.float64)
        if self.point_offsets is not None and (self.point_offsets.shape != (self.n_landmarks, 2)
                                               or not np.isfinite(self.point_offsets).all()):
            raise LgcError(f"point_offsets must have shape ({self.n_landmarks}, 2) and be finite, got shape "
                           f"{self.point_offsets.shape}")
        if self.mirror and self.n_landmarks != len(MIRROR_68):
            raise LgcError(f"mirror needs a network with {len(MIRROR_68)} landmarks, this one has {self.n_landmarks}")
        self.max_memory_bytes = int(max_memory_bytes)
        self._shape_source = shape_model
        self._shape = None

    @property
    def shape_model(self):
        """The PCA shape model (loaded on first use)."""
        if self._shape is None:
            from lgc_fast.shape import ShapeModel

            source = self._shape_source
            if isinstance(source, ShapeModel):
                self._shape = source
            else:
                self._shape = ShapeModel.load(_bundled(SHAPE_FILE, "shape model", "shape_model")
                                              if source is None else source)
            if self._shape.n_landmarks != self.n_landmarks:
                raise LgcError(f"the shape model has {self._shape.n_landmarks} landmarks but the network "
                               f"{self.n_landmarks}")
        return self._shape

    def heatmaps(self, crops: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """crops (N, 1, h, w) grey levels in [0, 255] -> omega (N, C, h, w) float32 on `device`, in memory-bounded
        batches (mirror-averaged with ``mirror``)."""
        per_crop = bytes_per_pixel(self.network, self.dtype) * crops.shape[2] * crops.shape[3]
        batch = max(1, int(MEMORY_HEADROOM * self.max_memory_bytes // per_crop))
        out = []
        with torch.inference_mode():
            for start in range(0, crops.shape[0], batch):
                images = crops[start:start + batch].to(self.device, self.dtype)
                omega = mirror_averaged_omega(self.network, images) if self.mirror else self.network(images)[1]
                out.append(omega.float().to(device))
        return torch.cat(out) if out else torch.zeros((0, self.n_landmarks, *crops.shape[2:]), device=device)

    def points_from_heatmaps(self, heatmaps: torch.Tensor, fit: bool | None = None):
        """heatmaps (N, C, h, w) -> (points (N, C, 2) map pixels, confidence (N, C) in [0, 1], fitted (N,) bool,
        the ShapeFit of the fitted faces or None). fit: default ``self.fit``.

        Faces whose maps hold no positive value cannot be fitted; they keep the decoder's points."""
        points, _ = decode(heatmaps, self.decode)
        points = points.double()
        shape_fit = None
        alive = torch.zeros(len(heatmaps), dtype=torch.bool, device=heatmaps.device)
        if (self.fit if fit is None else fit) and len(heatmaps):
            from lgc_fast.ops.fit_shape import fit_shape

            alive = (heatmaps.amax(dim=(1, 2, 3)) > 0) & torch.isfinite(heatmaps).all(dim=(1, 2, 3))
            if alive.any():
                windows = tuple(None if r is None else r * heatmaps.shape[-1] / CROP for r in FIT_WINDOWS)
                shape_fit = fit_shape(heatmaps[alive], self.shape_model, windows=windows, threshold=self.fit_threshold)
                fitted = shape_fit.points.double()
                if self.decode in SEEDED_DECODERS:
                    # The release's refinement: the regional maximum nearest to each fitted point, refined locally
                    # and blended with the fit by its heatmap value (low values trust the shape model).
                    local, local_conf = DECODERS[self.decode](heatmaps[alive], seeds=fitted.float())
                    fitted = blend(local.double(), local_conf, fitted)
                if self.point_offsets is not None:
                    fitted = remove_point_offsets(fitted, shape_fit.similarity.double(), self.point_offsets)
                points[alive] = fitted
        conf = sample_maps(heatmaps.double(), points).clamp(0.0, 1.0)
        return points, conf, alive, shape_fit

    def landmarks(self, images, boxes):
        """Landmarks of the faces in the given boxes.

        images: one image or a list of them (paths, or arrays (H, W) / (H, W, 3) RGB, uint8 or float in [0, 255]);
        boxes: for one image, (x0, y0, x1, y1) or (K, 4); for a list, one such entry per image. Each box's square
        (its centre, its longer side) is the crop the network sees, like the training crops (the tight box around
        the 68 points enlarged by 17 %). Returns list[Face] for one image, list[list[Face]] for a list.
        """
        single = isinstance(images, (str, os.PathLike, np.ndarray, torch.Tensor))
        image_list = [images] if single else list(images)
        box_list = [boxes] if single else list(boxes)
        if len(box_list) != len(image_list):
            raise LgcError(f"boxes must have one entry per image: {len(image_list)} images, {len(box_list)} entries")
        crops, affines, owner = [], [], []
        for index, (image, image_boxes) in enumerate(zip(image_list, box_list)):
            where = str(image) if isinstance(image, (str, os.PathLike)) else f"image {index}"
            gray = load_gray(image)
            for box in _check_boxes(image_boxes, where):
                cx, cy, size = box_to_square(box)
                affine = crop_transform((cx, cy), size, self.crop)
                crops.append(warp_image(gray, affine, self.crop))
                affines.append(affine)
                owner.append(index)
        results: list[list[Face]] = [[] for _ in image_list]
        if crops:
            # On a GPU the maps stay there when they fit, so decoding and the shape fit run there too.
            heat = self.heatmaps(torch.from_numpy(np.stack(crops))[:, None],
                                 self.maps_device([(self.crop, self.crop)] * len(crops)))
            points, conf, _, _ = self.points_from_heatmaps(heat)
            points, conf = points.cpu(), conf.cpu()
            for i, affine in enumerate(affines):
                pts = transform_points(points[i].numpy(), invert_affine(affine))
                c = conf[i].numpy()
                results[owner[i]].append(Face(pts, c, float(c.mean()), square_hull(affine, self.crop)))
        return results[0] if single else results

    def maps_device(self, shapes) -> torch.device:
        """Where ``detect`` keeps the omega maps of pyramid levels (``landmarks``: of crops) of these (h, w) shapes,
        and so runs the steps after the network: on the GPU when the maps take at most half of its free memory, else
        on the CPU."""
        if self.device.type != "cuda":
            return torch.device("cpu")
        needed = 4 * self.n_landmarks * sum(h * w for h, w in shapes)
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if 2 * needed <= free else torch.device("cpu")

    def pyramid_heatmaps(self, gray: np.ndarray, step: float = PYRAMID_STEP) -> list[torch.Tensor]:
        """omega (C, h_l, w_l) float32 for every pyramid level of gray (H, W), tiled within the memory budget, on
        ``maps_device``."""
        levels = build_pyramid(gray, self.crop, step)
        device = self.maps_device([level.shape for level in levels])
        maps = []
        for level in levels:
            image = torch.from_numpy(np.ascontiguousarray(level))[None, None].to(self.device, self.dtype)
            # only omega is kept: half of tiled_forward's memory
            omega = torch.empty((self.n_landmarks, *level.shape), device=device)
            for t, _, tile_omega in iter_tiles(self.network, image, tile=None, max_memory_bytes=self.max_memory_bytes):
                omega[:, t.y0:t.y1, t.x0:t.x1] = tile_omega[0].float().to(device)
            maps.append(omega)
        return maps

    def detect(self, image, threshold: float = THRESHOLD, min_landmarks: int = MIN_LANDMARKS,
               min_support: int = MIN_SUPPORT, max_mahalanobis: float = MAX_MAHALANOBIS,
               scale_tolerance: float = SCALE_TOLERANCE, max_overlap: float = MAX_OVERLAP,
               pyramid_step: float = PYRAMID_STEP) -> list[Face]:
        """All faces in one image without boxes (paper section 4.3; algorithm in the module docstring).

        threshold: heatmap value for a candidate and for a supporting fitted point; min_landmarks: distinct
        landmarks a vote cluster needs to become a hypothesis; min_support: fitted points on activations above
        threshold needed to keep a face; max_mahalanobis: bound on sqrt(sum (b_k / stddev_k)^2) of the shape
        coefficients (the 99.9 % chi-square quantile for 12 modes is 5.75; fits on real heatmaps spread wider);
        scale_tolerance: allowed factor between the fitted face size and the training crop's; max_overlap: box IoU
        above which the weaker face is dropped; pyramid_step: size factor between pyramid levels (the paper's 2,
        at least MIN_PYRAMID_STEP; smaller steps cost more forward passes and leave the network smaller gaps between
        the face sizes it was trained on).
        """
        gray = load_gray(image)
        return self.faces_from_levels(self.pyramid_heatmaps(gray, pyramid_step), gray.shape, threshold, min_landmarks,
                                      min_support, max_mahalanobis, scale_tolerance, max_overlap)

    def faces_from_levels(self, levels: list[torch.Tensor], image_shape, threshold: float = THRESHOLD,
                          min_landmarks: int = MIN_LANDMARKS, min_support: int = MIN_SUPPORT,
                          max_mahalanobis: float = MAX_MAHALANOBIS, scale_tolerance: float = SCALE_TOLERANCE,
                          max_overlap: float = MAX_OVERLAP) -> list[Face]:
        """Steps 3-6 of ``detect`` on given pyramid heatmaps: levels (C, h_l, w_l) of an image of image_shape (H, W)."""
        hypotheses = self.hypotheses_from_levels(levels, image_shape, threshold, min_landmarks)
        return select_faces(hypotheses, min_support, max_mahalanobis, scale_tolerance, max_overlap)

    def hypotheses_from_levels(self, levels: list[torch.Tensor], image_shape, threshold: float = THRESHOLD,
                               min_landmarks: int = MIN_LANDMARKS) -> list[Hypothesis]:
        """Steps 3-6 of ``detect`` up to the shape fit, before its filters: every fitted hypothesis."""
        height, width = int(image_shape[0]), int(image_shape[1])
        scales = np.array([(width / lv.shape[2] + height / lv.shape[1]) / 2 for lv in levels])
        mean_crop, canonical_scale = canonical_mean(self.shape_model, self.crop)
        candidates = find_candidates(levels, height, width, threshold)
        if len(candidates) == 0:
            return []
        votes = face_votes(candidates, mean_crop, scales, self.crop)
        labels = cluster_votes(votes, candidates[:, 3], scales[candidates[:, 4].astype(np.int64)], crop=self.crop)
        affines = face_hypotheses(candidates, labels, mean_crop, scales, min_landmarks)
        if not affines:
            return []
        heat = crop_maps(levels, scales, height, width, affines, mean_crop, crop=self.crop)
        points, conf, fitted, shape_fit = self.points_from_heatmaps(heat, fit=True)
        if shape_fit is None:
            return []
        stddev = torch.as_tensor(self.shape_model.stddev)
        mahalanobis = torch.sqrt(((shape_fit.coeffs.double().cpu() / stddev) ** 2).sum(dim=1))
        fitted_scale = torch.hypot(shape_fit.similarity[:, 0], shape_fit.similarity[:, 1]).double().cpu()
        points, conf, fitted = points.cpu(), conf.cpu(), fitted.cpu()
        hypotheses = []
        for row, i in enumerate(torch.nonzero(fitted)[:, 0].tolist()):
            pts = transform_points(points[i].numpy(), invert_affine(affines[i]))
            c = conf[i].numpy()  # the maps at the fitted points, clipped to [0, 1]
            face = Face(pts, c, float(c.mean()), square_to_box(*face_box(pts, enlarge=ENLARGE)))  # its training box
            hypotheses.append(Hypothesis(face, int((c > threshold).sum()), float(mahalanobis[row]),
                                         float(fitted_scale[row]) / canonical_scale))
        return hypotheses
