"""The 2-D PCA shape model of paper section 3.3: generalised Procrustes alignment of training shapes, then PCA.

Frame. ``mean`` (C, 2) is centred at the origin with unit RMS distance from it (``sum(mean**2) == C``). A face is

    x_j = s R(theta) (mean_j + sum_k b_k modes[k, j]) + t,   similarity = (a, c, tx, ty), a = s cos theta, c = s sin theta

i.e. ``x = [[a, -c], [c, a]] q + t``. ``modes`` (K, C, 2) are orthonormal and orthogonal to the mean, to the mean
turned by 90 degrees and to both translations (every aligned shape is projected into the tangent space of the mean),
so coefficients ``b`` and the similarity never trade off. ``stddev`` (K,) is the standard deviation of each b_k over
the training shapes (square roots of the covariance eigenvalues), in the same units as the mean.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lgc_fast._io import atomic_write_bytes
from lgc_fast.errors import LgcError

FORMAT = "lgc_fast.shape_model.v1"
_GPA_ITERATIONS = 100
_GPA_TOL = 1e-10
_IMPUTE_ITERATIONS = 25


def _normalise(mean: np.ndarray) -> np.ndarray:
    """Complex (C,) shape -> centred, unit RMS."""
    centred = mean - mean.mean()
    return centred / np.sqrt(np.mean(np.abs(centred) ** 2))


def _tangent_align(z: np.ndarray, weight: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Align complex shapes z (S, C) to `mean` (C,) with a similarity fitted on the points where weight (S, C) is 1,
    scaled into the mean's tangent space: on those points the residual z' - mean is orthogonal to mean and i*mean."""
    wsum = weight.sum(axis=1, keepdims=True)
    z_c = (weight * z).sum(axis=1, keepdims=True) / wsum
    m_c = (weight * mean).sum(axis=1, keepdims=True) / wsum
    zz, mm = z - z_c, mean - m_c
    h = (weight * np.conj(zz) * mm).sum(axis=1, keepdims=True)  # |h| e^{i theta}: Kabsch in complex form
    scale = (weight * np.abs(mm) ** 2).sum(axis=1, keepdims=True) / np.abs(h)
    return scale * (h / np.abs(h)) * zz + m_c


def _check_training_input(shapes, labelled, n_modes) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(shapes.detach().cpu() if isinstance(shapes, torch.Tensor) else shapes, dtype=np.float64)
    if x.ndim != 3 or x.shape[2] != 2 or x.shape[1] < 3:
        raise ValueError(f"shapes must have shape (S, C, 2) with C >= 3, got {x.shape}")
    if labelled is None:
        lab = np.ones(x.shape[:2], dtype=bool)
    else:
        lab = np.asarray(labelled.detach().cpu() if isinstance(labelled, torch.Tensor) else labelled)
        if lab.shape != x.shape[:2] or lab.dtype != bool:
            raise ValueError(f"labelled must be a bool array of shape (S, C) = {x.shape[:2]}, got {lab.dtype} {lab.shape}")
    if not np.isfinite(x[lab]).all():
        raise ValueError("shapes has NaN or infinite coordinates at labelled points")
    few = np.flatnonzero(lab.sum(axis=1) < 3)
    if few.size:
        raise ValueError(f"labelled: every shape needs at least 3 labelled points; shape {few[0]} has fewer")
    if not isinstance(n_modes, int) or not 1 <= n_modes <= min(x.shape[0] - 1, 2 * x.shape[1] - 4):
        raise ValueError(f"n_modes must be an int in [1, min(S - 1, 2 C - 4)] = [1, {min(x.shape[0] - 1, 2 * x.shape[1] - 4)}],"
                         f" got {n_modes!r}")
    return x, lab


@dataclass(frozen=True, eq=False)
class ShapeModel:
    """mean: (C, 2); modes: (K, C, 2) orthonormal; stddev: (K,). float64 NumPy arrays (see the module docstring)."""

    mean: np.ndarray
    modes: np.ndarray
    stddev: np.ndarray

    @property
    def n_landmarks(self) -> int:
        return self.mean.shape[0]

    @property
    def n_modes(self) -> int:
        return self.modes.shape[0]

    @classmethod
    def fit(cls, shapes, labelled=None, n_modes: int = 12) -> "ShapeModel":
        """shapes: (S, C, 2) (x, y) points; labelled: (S, C) bool or None (all labelled).

        Generalised Procrustes analysis (similarity alignment to the iterated mean, unlabelled points left out of
        each alignment), then PCA of the aligned shapes. Unlabelled coordinates are imputed by alternating PCA and
        reconstruction from the labelled coordinates.
        """
        x, lab = _check_training_input(shapes, labelled, n_modes)
        z = x[..., 0] + 1j * x[..., 1]
        w = lab.astype(np.float64)
        complete = np.flatnonzero(lab.all(axis=1))
        if complete.size:
            mean = _normalise(z[complete[0]])
        else:
            start = _tangent_align(z, w, np.ones(z.shape[1]))  # centred and scaled only
            mean = _normalise((w * start).sum(axis=0) / np.maximum(w.sum(axis=0), 1.0))
        for _ in range(_GPA_ITERATIONS):
            aligned = _tangent_align(z, w, mean)
            update = (w * aligned).sum(axis=0) / np.maximum(w.sum(axis=0), 1.0)
            update = _tangent_align(_normalise(update)[None], np.ones((1, z.shape[1])), mean)[0]  # no drift
            update = _normalise(update)
            step = np.max(np.abs(update - mean))
            mean = update
            if step < _GPA_TOL:
                break
        aligned = _tangent_align(z, w, mean)
        dev = np.stack(((aligned - mean).real, (aligned - mean).imag), axis=-1).reshape(len(z), -1)
        # Directions a similarity already covers: translations, the mean (scale) and the mean turned by 90 degrees.
        c = z.shape[1]
        gauge = np.stack([np.tile([1.0, 0.0], c), np.tile([0.0, 1.0], c),
                          np.stack((mean.real, mean.imag), -1).ravel(), np.stack((-mean.imag, mean.real), -1).ravel()])
        gauge_q, _ = np.linalg.qr(gauge.T)
        missing = ~np.repeat(lab, 2, axis=1)
        dev[missing] = 0.0
        for _ in range(_IMPUTE_ITERATIONS if missing.any() else 1):
            dev -= (dev @ gauge_q) @ gauge_q.T
            eigval, eigvec = np.linalg.eigh(dev.T @ dev / (len(z) - 1))  # ascending
            basis = eigvec[:, ::-1][:, :n_modes].T
            if not missing.any():
                break
            known = (~missing).astype(np.float64)
            gram = (basis[None] * known[:, None, :]) @ basis.T
            coef = np.linalg.solve(gram, ((known * dev) @ basis.T)[..., None])[..., 0]
            dev[missing] = (coef @ basis)[missing]
        # Deterministic signs: the largest component of every mode is positive.
        signs = np.sign(basis[np.arange(n_modes), np.abs(basis).argmax(axis=1)])
        modes = (basis * signs[:, None]).reshape(n_modes, c, 2)
        stddev = np.sqrt(np.maximum(eigval[::-1][:n_modes], 0.0))
        return cls(np.stack((mean.real, mean.imag), -1), modes, stddev)

    def save(self, path) -> None:
        """Write the model as .npz atomically (temporary file in the same folder, then rename)."""
        atomic_write_bytes(path, lambda f: np.savez(f, format=np.array(FORMAT), mean=self.mean, modes=self.modes,
                                                    stddev=self.stddev))

    @classmethod
    def load(cls, path) -> "ShapeModel":
        """Read a model written by ``save``; LgcError naming the file when it is missing or not a valid model."""
        path = Path(path)
        if not path.is_file():
            raise LgcError(f"shape model file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise LgcError(f"shape model file {path} is not a readable .npz file ({exc})") from None
        if "format" not in arrays or arrays["format"].shape != () or str(arrays["format"]) != FORMAT:
            raise LgcError(f"shape model file {path} is not an lgc_fast shape model (expected format {FORMAT!r})")
        for key in ("mean", "modes", "stddev"):
            if key not in arrays:
                raise LgcError(f"shape model file {path} lacks the array {key!r}")
            if arrays[key].dtype.kind != "f" or not np.isfinite(arrays[key]).all():
                raise LgcError(f"shape model file {path}: {key!r} must hold finite floats")
        mean, modes, stddev = (arrays[k].astype(np.float64) for k in ("mean", "modes", "stddev"))
        if mean.ndim != 2 or mean.shape[1] != 2:
            raise LgcError(f"shape model file {path}: mean must have shape (C, 2), got {mean.shape}")
        if modes.ndim != 3 or modes.shape[1:] != mean.shape or stddev.shape != modes.shape[:1]:
            raise LgcError(f"shape model file {path}: modes {modes.shape} and stddev {stddev.shape} do not match "
                           f"mean {mean.shape} (expected (K, C, 2) and (K,))")
        if (stddev < 0).any():
            raise LgcError(f"shape model file {path}: stddev must be non-negative")
        spread = np.sqrt(np.mean(np.sum((mean - mean.mean(axis=0)) ** 2, axis=1)))
        if mean.shape[0] < 3 or not spread > 1e-9 * max(1.0, float(np.abs(mean).max())):
            # the fit scales the mean onto the heatmaps' peaks: a point-like mean puts every landmark on one spot
            raise LgcError(f"shape model file {path}: mean must be a shape of at least 3 points that do not coincide")
        return cls(mean, modes, stddev)

    def tensors(self, dtype=torch.float64, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean (C, 2), modes (K, C, 2), stddev (K,)) as torch tensors."""
        return tuple(torch.as_tensor(a, dtype=dtype, device=device) for a in (self.mean, self.modes, self.stddev))

    def reconstruct(self, coeffs, similarity) -> torch.Tensor:
        """coeffs: (N, K); similarity: (N, 4) = (a, c, tx, ty) -> points (N, C, 2), x = [[a, -c], [c, a]] q + t."""
        coeffs = torch.as_tensor(coeffs)
        similarity = torch.as_tensor(similarity, device=coeffs.device)
        if coeffs.dim() != 2 or coeffs.shape[1] != self.n_modes:
            raise ValueError(f"coeffs must have shape (N, {self.n_modes}), got {tuple(coeffs.shape)}")
        if similarity.shape != (coeffs.shape[0], 4):
            raise ValueError(f"similarity must have shape (N, 4) = {(coeffs.shape[0], 4)}, got {tuple(similarity.shape)}")
        dtype = torch.promote_types(torch.promote_types(coeffs.dtype, similarity.dtype), torch.float32)
        mean, modes, _ = self.tensors(dtype, coeffs.device)
        q = mean + torch.einsum("nk,kcd->ncd", coeffs.to(dtype), modes)
        a, c, tx, ty = similarity.to(dtype).unbind(dim=1)
        x = a[:, None] * q[..., 0] - c[:, None] * q[..., 1] + tx[:, None]
        y = c[:, None] * q[..., 0] + a[:, None] * q[..., 1] + ty[:, None]
        return torch.stack((x, y), dim=-1)


def _turn(vectors: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """vectors (N, C, 2), a, c (N,) -> [[a, -c], [c, a]] v per face."""
    x, y = vectors.unbind(dim=-1)
    a, c = a[:, None], c[:, None]
    return torch.stack((a * x - c * y, c * x + a * y), dim=-1)


def mean_point_offsets(points, truth, labelled, similarity) -> np.ndarray:
    """The systematic error of fitted points in the shape model's frame -> offsets (C, 2) float64.

    points, truth: (N, C, 2) predicted and true points in one frame (e.g. crop pixels); labelled: (N, C) bool;
    similarity: (N, 4) = (a, c, tx, ty) of each face's fit in that frame. Each error is turned and scaled back into the
    model frame ([[a, -c], [c, a]]^-1 (points - truth)), so a face's size and in-plane rotation do not matter, and
    averaged over the labelled points of each landmark. ``remove_point_offsets`` subtracts it again.
    """
    points, truth, similarity = (torch.as_tensor(v, dtype=torch.float64) for v in (points, truth, similarity))
    labelled = torch.as_tensor(labelled, dtype=torch.bool)
    if points.dim() != 3 or points.shape[2] != 2 or truth.shape != points.shape:
        raise ValueError(f"points and truth must have the same shape (N, C, 2), got {tuple(points.shape)} and "
                         f"{tuple(truth.shape)}")
    if labelled.shape != points.shape[:2] or similarity.shape != (points.shape[0], 4):
        raise ValueError(f"labelled must have shape (N, C) and similarity (N, 4), got {tuple(labelled.shape)} and "
                         f"{tuple(similarity.shape)}")
    a, c = similarity[:, 0], similarity[:, 1]
    scale2 = (a * a + c * c)[:, None, None]
    errors = _turn(points - torch.nan_to_num(truth), a, -c) / scale2  # the inverse of [[a, -c], [c, a]]
    counts = labelled.sum(dim=0)
    if (counts == 0).any():
        raise ValueError(f"landmarks {torch.nonzero(counts == 0)[:, 0].tolist()} are labelled on no face")
    return ((errors * labelled[..., None]).sum(dim=0) / counts[:, None]).numpy()


def remove_point_offsets(points: torch.Tensor, similarity: torch.Tensor, offsets) -> torch.Tensor:
    """points (N, C, 2) of faces fitted with similarity (N, 4) -> points - [[a, -c], [c, a]] offsets, offsets (C, 2)
    in the model frame (``mean_point_offsets``), i.e. each face's systematic error at its size and rotation."""
    offsets = torch.as_tensor(offsets, dtype=points.dtype, device=points.device)
    similarity = similarity.to(device=points.device, dtype=points.dtype)
    return points - _turn(offsets.expand_as(points), similarity[:, 0], similarity[:, 1])
