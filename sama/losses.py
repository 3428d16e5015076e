"""SAMA's training objective: rectified flow matching on the target + lambda * semantic L1.

Time convention (SAMA.md): ``t`` in ``[0, 1]`` is the fraction of *data*::

    x_t = t * x1 + (1 - t) * x0        x1 = clean latent, x0 = Gaussian noise
    v   = x1 - x0                      (the velocity SAMA.md's model predicts)
    x1  = x_t + (1 - t) * v            (clean estimate from a velocity)

diffusers' ``FlowMatchEulerDiscreteScheduler`` and Wan use ``sigma = 1 - t`` (noise at
``sigma = 1``): ``x = (1 - sigma) * x1 + sigma * noise``, a model timestep of ``sigma * 1000``, and a
model output ``u = dx/dsigma = noise - x1 = -v``. Wan's pretrained weights predict ``u``, so the
SAMA transformer keeps that output and these helpers convert: :func:`velocity_from_model_output`
gives ``v = -u``, and at inference ``u`` goes to ``scheduler.step`` unchanged.

The loss is ``L = L_FM + lambda * L_sem`` with

* ``L_FM = mean((v_hat - v)**2)`` over target latents only (source and semantic positions are not
  in it); with ``timestep_weighting="bell"`` each sample's mean squared error is weighted by
  DiffSynth's training weight of its timestep (:func:`bell_weight`) before the batch mean;
* ``L_sem = mean(|s_hat - s|)`` with ``s_hat = s_t + (1 - t) * v_hat_s``, the semantic tokens'
  clean estimate from the head's velocity (SAMA.md (choice): the head predicts a velocity;
  ``semantic_space="clean"``), or ``mean(|v_hat_s - v_s|)`` on the head's raw velocity
  (``semantic_space="velocity"``, the authors' release; the same as ``|u_hat_s - (noise - s)|`` in
  Wan's convention);
* ``lambda = 0.1`` (SAMA.md).

Knobs left None follow the model's parity profile (:mod:`sama.models.parity`); unresolved
configs behave as the ``"sama"`` profile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from sama.models.parity import resolve

__all__ = [
    "LossConfig",
    "LossOutput",
    "TimestepSamplerConfig",
    "add_noise",
    "bell_weight",
    "clean_estimate",
    "flow_matching_loss",
    "model_timestep",
    "randn",
    "sama_loss",
    "sample_timesteps",
    "semantic_loss",
    "set_scheduler_sigmas",
    "shift_time",
    "shifted_grid_sigmas",
    "velocity_from_model_output",
    "velocity_target",
]

NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class TimestepSamplerConfig:
    """How training draws ``t`` (data fraction, SAMA.md convention).

    ``kind="uniform"``: ``t ~ U(0, 1)``. ``kind="logit_normal"``: ``t = sigmoid(n)``,
    ``n ~ N(logit_mean, logit_std)`` (SD3). Then the SD3/Wan time shift is applied in the noise
    convention, ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)`` with ``sigma = 1 - t``:
    ``shift > 1`` moves samples towards noise, 1 leaves them alone. ``kind="uniform", shift=5``
    is the training counterpart of the inference scheduler's shift 5.
    ``kind="shifted_grid"`` (the authors' DiffSynth training base): ``sigma`` drawn uniformly from
    the 1000-step grid :func:`shifted_grid_sigmas` ``(shift)``. ``t`` is finally clamped to
    ``[t_min, t_max]`` so neither end is hit exactly.

    ``kind`` and ``shift`` left None follow the model's parity profile (sama: ``logit_normal``,
    1.0; authors: ``shifted_grid``, 5.0; see :mod:`sama.models.parity`).
    """

    kind: Literal["uniform", "logit_normal", "shifted_grid"] | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float | None = None
    t_min: float = 0.0
    t_max: float = 1.0

    def validate(self) -> None:
        if self.kind not in (None, "uniform", "logit_normal", "shifted_grid"):
            raise ValueError(
                f"timesteps.kind must be 'uniform', 'logit_normal' or 'shifted_grid', got {self.kind!r}"
            )
        if self.logit_std <= 0:
            raise ValueError("timesteps.logit_std must be positive")
        if self.shift is not None and self.shift <= 0:
            raise ValueError("timesteps.shift must be positive")
        if not 0.0 <= self.t_min <= self.t_max <= 1.0:
            raise ValueError("timesteps needs 0 <= t_min <= t_max <= 1")


@dataclass
class LossConfig:
    """The objective's knobs: semantic loss weight (SAMA.md lambda = 0.1), the timestep sampler,
    the flow-matching loss's timestep weighting (``"none"`` or ``"bell"``: DiffSynth's, the
    authors' training base) and the space of the semantic L1 (``"clean"``: on the clean estimate;
    ``"velocity"``: on the head's raw output, the authors'). None follows the model's parity."""

    semantic_weight: float = 0.1
    timesteps: TimestepSamplerConfig = field(default_factory=TimestepSamplerConfig)
    timestep_weighting: Literal["none", "bell"] | None = None
    semantic_space: Literal["clean", "velocity"] | None = None

    def validate(self) -> None:
        if self.semantic_weight < 0:
            raise ValueError("semantic_weight must be non-negative")
        if self.timestep_weighting not in (None, "none", "bell"):
            raise ValueError(f"timestep_weighting must be 'none' or 'bell', got {self.timestep_weighting!r}")
        if self.semantic_space not in (None, "clean", "velocity"):
            raise ValueError(f"semantic_space must be 'clean' or 'velocity', got {self.semantic_space!r}")
        self.timesteps.validate()


@dataclass
class LossOutput:
    """The loss and its parts, for the optimiser and for logging.

    ``loss`` carries the graph; ``loss_sem`` is None when the batch had no semantic branch.
    ``t`` holds the sampled timesteps (data fraction) for per-timestep diagnostics.
    """

    loss: torch.Tensor
    loss_fm: torch.Tensor
    loss_sem: torch.Tensor | None = None
    t: torch.Tensor | None = None

    def to_dict(self) -> dict[str, float]:
        """Detached float values, e.g. ``{"loss": ..., "loss_fm": ..., "loss_sem": ...}``."""
        out = {"loss": float(self.loss.detach()), "loss_fm": float(self.loss_fm.detach())}
        if self.loss_sem is not None:
            out["loss_sem"] = float(self.loss_sem.detach())
        return out


def randn(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device (reproducible across devices), moved to ``device``."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Apply the SD3/Wan time shift to data-fraction times ``t`` (see :class:`TimestepSamplerConfig`)."""
    if shift == 1.0:
        return t
    sigma = 1.0 - t
    shifted = shift * sigma / (1.0 + (shift - 1.0) * sigma)
    return 1.0 - shifted


def shifted_grid_sigmas(shift: float, steps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """``shift(linspace(1, 0, steps + 1)[:-1])`` (float64), ``shift(s) = k s / (1 + (k - 1) s)``:
    the sigmas (noise fractions) of DiffSynth's training grid and of the authors' sampler."""
    base = np.linspace(1.0, 0.0, steps + 1, dtype=np.float64)[:-1]
    return shift * base / (1.0 + (shift - 1.0) * base)


def set_scheduler_sigmas(
    scheduler, steps: int, grid: Literal["diffusers", "authors"], shift: float, device=None
) -> None:
    """Set a ``FlowMatchEulerDiscreteScheduler``'s sigmas for ``steps`` Euler steps.

    ``grid="diffusers"``: ``scheduler.set_timesteps(steps)`` (its own shifted linear grid).
    ``grid="authors"``: the authors' sampler, sigmas :func:`shifted_grid_sigmas` ``(shift, steps)``
    then a final step to sigma 0 (50 steps at shift 5: 1.0 ... ~0.093, 0). diffusers shifts custom
    sigmas with its own ``shift`` once more, so they are passed through the inverse of that shift
    (exactly the identity when the scheduler's shift equals ``shift``, as in a pipeline).
    """
    if grid == "diffusers":
        scheduler.set_timesteps(steps, device=device)
        return
    if grid != "authors":
        raise ValueError(f"sigma_grid must be 'diffusers' or 'authors', got {grid!r}")
    config = scheduler.config
    reshaping = ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas")
    if any(config.get(key) for key in (*reshaping, "use_beta_sigmas")):
        raise ValueError("the authors' sigma grid needs a scheduler with a plain (static) shift")
    own = float(getattr(scheduler, "shift", config.get("shift", 1.0)))
    sigmas = shifted_grid_sigmas(shift, steps)
    unshifted = sigmas / (own - (own - 1.0) * sigmas)
    scheduler.set_timesteps(sigmas=unshifted.tolist(), device=device)


def bell_weight(t: torch.Tensor, shift: float) -> torch.Tensor:
    """DiffSynth's training weight of data-fraction times ``t`` (float32, one per sample).

    With ``x`` the model timestep ``(1 - t) * 1000`` and ``y(x) = exp(-2 ((x - 500) / 1000)**2)``,
    the weight is ``(y(x) - min y) * 1000 / sum(y - min y)``, min and sum over the 1000-step grid
    :func:`shifted_grid_sigmas` ``(shift)``: on the grid it is DiffSynth's table exactly (mean 1),
    between grid points the same formula.
    """
    grid = shifted_grid_sigmas(shift) * NUM_TRAIN_TIMESTEPS
    y_grid = np.exp(-2.0 * ((grid - NUM_TRAIN_TIMESTEPS / 2) / NUM_TRAIN_TIMESTEPS) ** 2)
    low = float(y_grid.min())
    scale = NUM_TRAIN_TIMESTEPS / float((y_grid - low).sum())
    x = (1.0 - t.double()) * NUM_TRAIN_TIMESTEPS
    y = torch.exp(-2.0 * ((x - NUM_TRAIN_TIMESTEPS / 2) / NUM_TRAIN_TIMESTEPS) ** 2)
    return ((y - low) * scale).float()


def sample_timesteps(
    batch_size: int,
    config: TimestepSamplerConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``(batch_size,)`` float32 data-fraction times ``t`` in ``[t_min, t_max]``.

    Unset (None) knobs behave as the ``"sama"`` parity profile's.
    """
    config.validate()
    config = resolve(config, "sama", "objective", at="loss.timesteps")
    gen_device = generator.device if generator is not None else device
    if config.kind == "shifted_grid":
        sigmas = torch.from_numpy(shifted_grid_sigmas(config.shift))
        index = torch.randint(0, len(sigmas), (batch_size,), generator=generator, device=gen_device)
        t = (1.0 - sigmas[index.cpu()]).float()
        return t.clamp(config.t_min, config.t_max).to(device)
    if config.kind == "uniform":
        t = torch.rand((batch_size,), generator=generator, device=gen_device)
    else:
        normal = torch.randn((batch_size,), generator=generator, device=gen_device)
        t = torch.sigmoid(normal * config.logit_std + config.logit_mean)
    t = shift_time(t.double(), config.shift).float()
    return t.clamp(config.t_min, config.t_max).to(device)


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(device=like.device, dtype=torch.float32)


def add_noise(clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = t * x1 + (1 - t) * x0`` per sample (float32)."""
    te = _expand(t, clean)
    return te * clean.float() + (1.0 - te) * noise.float()


def velocity_target(clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``v = x1 - x0`` (float32)."""
    return clean.float() - noise.float()


def clean_estimate(noisy: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x1_hat = x_t + (1 - t) * v_hat`` (float32)."""
    te = _expand(t, noisy)
    return noisy.float() + (1.0 - te) * velocity.float()


def model_timestep(t: torch.Tensor) -> torch.Tensor:
    """The Wan/diffusers timestep for data fraction ``t``: ``(1 - t) * 1000``."""
    return (1.0 - t.float()) * NUM_TRAIN_TIMESTEPS


def velocity_from_model_output(output: torch.Tensor) -> torch.Tensor:
    """SAMA's ``v = x1 - x0`` from a Wan-convention output ``u = noise - clean`` (``v = -u``)."""
    return -output.float()


def flow_matching_loss(
    velocity_pred: torch.Tensor, velocity: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``L_FM``: mean squared error between predicted and true target velocities (float32).

    With ``weight`` (``(B,)``), each sample's mean squared error is multiplied by its weight and
    the result averaged over the batch.
    """
    squared = (velocity_pred.float() - velocity.float()) ** 2
    if weight is None:
        return torch.mean(squared)
    per_sample = squared.reshape(squared.shape[0], -1).mean(dim=1)
    return torch.mean(per_sample * weight.to(per_sample.device, torch.float32))


def semantic_loss(
    velocity_pred: torch.Tensor,
    noisy: torch.Tensor,
    clean: torch.Tensor,
    t: torch.Tensor,
    *,
    space: Literal["clean", "velocity"] = "clean",
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """``L_sem`` (float32).

    ``space="clean"``: mean ``|s_hat - s|`` with ``s_hat = s_t + (1 - t) * v_hat_s``.
    ``space="velocity"``: mean ``|v_hat_s - (s - noise)|``, the head's raw velocity against its
    target (the authors' release); needs the ``noise`` the tokens were noised with.
    """
    if space == "velocity":
        if noise is None:
            raise ValueError("the velocity-space semantic loss needs the semantic noise")
        return torch.mean(torch.abs(velocity_pred.float() - velocity_target(clean, noise)))
    if space != "clean":
        raise ValueError(f"semantic loss space must be 'clean' or 'velocity', got {space!r}")
    return torch.mean(torch.abs(clean_estimate(noisy, velocity_pred, t) - clean.float()))


def sama_loss(
    velocity_pred: torch.Tensor,
    velocity: torch.Tensor,
    t: torch.Tensor,
    *,
    semantic_velocity_pred: torch.Tensor | None = None,
    semantic_noisy: torch.Tensor | None = None,
    semantic_clean: torch.Tensor | None = None,
    semantic_weight: float = 0.1,
    semantic_noise: torch.Tensor | None = None,
    semantic_space: Literal["clean", "velocity"] = "clean",
    weight: torch.Tensor | None = None,
) -> LossOutput:
    """``L = L_FM + semantic_weight * L_sem`` with its parts.

    Args:
        velocity_pred: ``v_hat`` on the target latents (SAMA convention, ``x1 - x0``).
        velocity: the true ``v = x1 - x0`` of the target latents.
        t: ``(B,)`` data-fraction timesteps the samples were noised with.
        semantic_velocity_pred / semantic_noisy / semantic_clean: the head's ``v_hat_s``, the noisy
            tokens ``s_t`` it saw and the clean tokens ``s``; all None when the semantic branch is off.
        semantic_weight: lambda.
        semantic_noise: the noise of the semantic tokens (needed for ``semantic_space="velocity"``).
        semantic_space: ``"clean"`` or ``"velocity"`` (see :func:`semantic_loss`).
        weight: ``(B,)`` per-sample weights of ``L_FM`` (e.g. :func:`bell_weight`), or None.
    """
    loss_fm = flow_matching_loss(velocity_pred, velocity, weight)
    semantic_parts = (semantic_velocity_pred, semantic_noisy, semantic_clean)
    if all(part is None for part in semantic_parts):
        return LossOutput(loss=loss_fm, loss_fm=loss_fm, loss_sem=None, t=t.detach())
    if any(part is None for part in semantic_parts):
        raise ValueError(
            "the semantic loss needs the head's prediction, the noisy tokens and the clean tokens"
        )
    loss_sem = semantic_loss(
        semantic_velocity_pred, semantic_noisy, semantic_clean, t, space=semantic_space, noise=semantic_noise
    )
    if not math.isfinite(semantic_weight):
        raise ValueError(f"semantic_weight must be finite, got {semantic_weight}")
    return LossOutput(
        loss=loss_fm + semantic_weight * loss_sem, loss_fm=loss_fm, loss_sem=loss_sem, t=t.detach()
    )
