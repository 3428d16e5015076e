"""Parity profiles: this project's choices (``"sama"``) or the authors' released code (``"authors"``).

``ModelConfig.parity`` names a profile. Each part the two differ on is its own knob, defaulting to
None; a knob left None follows the profile of the model it belongs to, an explicit value wins.
:data:`PROFILES` is the single table of what each profile sets, and :func:`resolve` the single
function that fills the unset knobs of a configuration from it. Resolution happens wherever a
configuration becomes concrete (:func:`sama.models.presets.resolve_model_config`, the trainer's
``resolve_train_config``, :class:`sama.pipeline_edit.SamaEditPipeline`), so what is saved (a run's
``config.yaml``, an export's manifest) holds concrete values and reloads identically.

The ``"authors"`` profile reproduces the authors' release (SAMA.md, "What the released inference
code does"); ``sama convert`` sets it on converted official checkpoints. The ``"sama"`` profile
keeps this project's defaults exactly. Knobs, by the section of the configuration they live in:

``model`` (:class:`sama.models.config.ModelConfig`):

* ``semantic.rope``: RoPE of the semantic tokens. sama ``"grid"`` (positions aligned with the region
  each token summarises), authors ``"null"`` (cos = sin = 0: their rotated queries and keys are zero).
* ``semantic.anchor_sampling``: sama ``"random"`` (over the whole clip), authors ``"first"`` (frame 0).
* ``semantic.layernorm_eps``: of the projector's and the head's LayerNorm; sama ``1e-5`` (PyTorch's
  default), authors ``1e-6``.
* ``semantic.head_init``: sama ``"default"`` (PyTorch's Linear init), authors ``"xavier"``
  (xavier-uniform weight, N(0, 1e-3) bias).

``objective`` (:class:`sama.models.training.TrainingModuleConfig`; the release's training loop is
not public, these follow its DiffSynth training base):

* ``loss.timesteps.kind`` / ``loss.timesteps.shift``: sama ``"logit_normal"`` / ``1.0``, authors
  ``"shifted_grid"`` / ``5.0`` (uniform over a 1000-step shift-5 grid).
* ``loss.timestep_weighting``: sama ``"none"``, authors ``"bell"`` (DiffSynth's training weight).
* ``loss.semantic_space``: sama ``"clean"`` (L1 on the clean estimate), authors ``"velocity"`` (L1 on
  the head's raw output).

``inference`` (:class:`sama.pipeline_edit.PipelineConfig`):

* ``sigma_grid``: sama ``"diffusers"`` (``FlowMatchEulerDiscreteScheduler.set_timesteps(steps)``),
  authors ``"authors"`` (``shift(linspace(1, 0, steps + 1)[:-1])``).

This module imports nothing heavy; it works on any dataclass holding those dotted fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, TypeVar

__all__ = ["PARITY_PROFILES", "PROFILES", "Parity", "Scope", "profile_value", "resolve"]

T = TypeVar("T")

Parity = Literal["sama", "authors"]
Scope = Literal["model", "objective", "inference"]
PARITY_PROFILES: tuple[str, ...] = ("sama", "authors")

# What each profile sets, by configuration section, as dotted field paths within that section.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "sama": {
        "model": {
            "semantic.rope": "grid",
            "semantic.anchor_sampling": "random",
            "semantic.layernorm_eps": 1e-5,
            "semantic.head_init": "default",
        },
        "objective": {
            "loss.timesteps.kind": "logit_normal",
            "loss.timesteps.shift": 1.0,
            "loss.timestep_weighting": "none",
            "loss.semantic_space": "clean",
        },
        "inference": {
            "sigma_grid": "diffusers",
        },
    },
    "authors": {
        "model": {
            "semantic.rope": "null",
            "semantic.anchor_sampling": "first",
            "semantic.layernorm_eps": 1e-6,
            "semantic.head_init": "xavier",
        },
        "objective": {
            "loss.timesteps.kind": "shifted_grid",
            "loss.timesteps.shift": 5.0,
            "loss.timestep_weighting": "bell",
            "loss.semantic_space": "velocity",
        },
        "inference": {
            "sigma_grid": "authors",
        },
    },
}


def _check_parity(parity: str | None) -> str:
    if parity is None:
        return "sama"
    if parity not in PROFILES:
        raise ValueError(f"parity must be one of {list(PROFILES)}, got {parity!r}")
    return parity


def profile_value(parity: str | None, scope: Scope, key: str) -> Any:
    """What profile ``parity`` (None: ``"sama"``) sets knob ``key`` of section ``scope`` to."""
    return PROFILES[_check_parity(parity)][scope][key]


def resolve(
    config: T, parity: str | None = None, scope: Scope | None = None, at: str = "", *, overwrite: bool = False
) -> T:
    """A copy of ``config`` with every unset (None) knob of ``scope`` filled from profile ``parity``.

    Args:
        config: a configuration dataclass; it is not modified.
        parity: the profile; None reads ``config.parity`` when the config has one (a
            :class:`~sama.models.config.ModelConfig`), else ``"sama"``.
        scope: the section ``config`` is (``"model"``, ``"objective"``, ``"inference"``); None
            means ``"model"``.
        at: the dotted path of ``config`` within its section when it is a sub-section, e.g.
            ``"loss"`` for a :class:`~sama.losses.LossConfig` or ``"loss.timesteps"`` for a
            :class:`~sama.losses.TimestepSamplerConfig` (the objective's knobs below that path apply).
        overwrite: set every knob to the profile's, explicit ones included (re-profiling a config
            whose knobs were resolved for another profile, e.g. a converted official checkpoint
            built over a ``"sama"`` export's configuration).

    Without ``overwrite``, explicit (non-None) values are kept, so resolving twice is resolving once.
    """
    if parity is None:
        parity = getattr(config, "parity", None)
    table = PROFILES[_check_parity(parity)][scope or "model"]
    prefix = f"{at}." if at else ""
    for key, value in table.items():
        if prefix and not key.startswith(prefix):
            continue
        config = _fill(config, key[len(prefix) :].split("."), value, overwrite)
    return config


def _fill(obj: Any, path: list[str], value: Any, overwrite: bool) -> Any:
    name = path[0]
    current = getattr(obj, name)
    if len(path) == 1:
        new = value if (current is None or overwrite) else current
    else:
        if current is None:
            return obj
        new = _fill(current, path[1:], value, overwrite)
    return obj if new is current else dataclasses.replace(obj, **{name: new})
