"""Action expert: the head that turns VL + sensor features into a chunk of actions.

The expert outputs a chunk of H future actions (B, H, A) in normalised units. One
Transformer denoiser, three training objectives (``ActionExpertConfig.objective``):

- ``"diffusion"`` (DDPM, Ho et al. 2020; the guide's head): pick t, noise the true chunk
  to x_t and regress the added noise (``prediction_type`` "epsilon") or the clean chunk
  ("sample"). Inference starts from Gaussian noise and steps back to t = 0 with
  deterministic DDIM (Song et al. 2021, few steps) or full ancestral DDPM.
- ``"flow_matching"`` (Lipman et al. 2023; the head of pi0 and GR00T N1.5): the straight
  path x_t = t * noise + (1 - t) * x0 with t ~ Beta(1.5, 1) as in pi0, regress the
  velocity noise - x0; inference integrates from t = 1 to 0 in K Euler steps.
- ``"regression"``: the same network with zero action tokens and a fixed timestep,
  trained with plain MSE on the chunk: one forward pass, no sampling. The benchmark's
  ceiling of what the conditioning can tell (a regression head averages modes that a
  generative head keeps apart).

Every sampler clamps its estimate of the clean chunk to ``clip_range``: per dimension,
the range of the training data in normalised units when the policy knows it (a
dimension that never moved stays exactly still), else [-clip_sample, clip_sample].

Pieces, from the maths outwards:

- :class:`NoiseSchedule` holds the cosine schedule as float32 buffers and implements
  ``add_noise``, ``predict_x0``, ``ddim_step`` and ``ddpm_step`` as pure tensor
  functions, so the diffusion maths is tested without any network.
- :func:`run_sampler` runs a DDIM or DDPM loop around any ``denoise_fn(x_t, t)``;
  :func:`run_flow_sampler` the Euler loop around any ``velocity_fn(x_t, t)``.
- :class:`ActionExpert` is the denoiser: a pre-norm Transformer over
  ``[vl_1 .. vl_T, sensor, timestep ; action_1 .. action_H]`` tokens (one pooled VL vector,
  or the VL tokens of ``vl_conditioning`` "tokens"; ``vl_attention`` "cross": a decoder that
  cross-attends to them instead), plus ``compute_loss`` and ``sample``, which follow the
  objective.

This file imports torch only: the device and the dtype come from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_ds.errors import ConfigError
from vla_ds.models._checks import check_transformer, require_positive_int

OBJECTIVES = ("diffusion", "flow_matching", "regression")
VL_CONDITIONINGS = ("tokens", "pooled")
VL_ATTENTIONS = ("joint", "prefix", "cross")
BETA_SCHEDULES = ("cosine", "linear")
PREDICTION_TYPES = ("epsilon", "sample")
SAMPLING_METHODS = ("ddim", "ddpm")
# What a stored config without these fields (vla_ds before they existed) trained with.
LEGACY_HEAD = {"objective": "diffusion", "prediction_type": "epsilon"}
# ...and what one without ``vl_conditioning`` was conditioned on: one pooled vector.
LEGACY_CONDITIONING = {"vl_conditioning": "pooled", "vl_attention": "joint"}
# ...and what one without ``vl_normalize`` read: the backbone's features as they come.
LEGACY_VL_NORMALIZE = {"vl_normalize": False}
# Flow time t in [0, 1] enters the sinusoidal timestep embedding as t * FLOW_TIME_SCALE,
# so its frequencies span the same range as diffusion timesteps 0..1000 do.
FLOW_TIME_SCALE = 1000.0
# pi0 draws flow times as Beta(1.5, 1) * (1 - FLOW_TIME_MIN) + FLOW_TIME_MIN: never exactly 0.
FLOW_TIME_MIN = 0.001



def stored_section(section: dict) -> dict:
    """An ``action_expert`` section as stored by a run or an export (a policy's config.json, a
    checkpoint's run config), with the head it was trained with made explicit: one written
    before ``objective`` existed trained the DDPM epsilon head (``LEGACY_HEAD``), whatever
    today's defaults are, and one written before ``vl_conditioning`` existed was conditioned on
    the pooled vector (``LEGACY_CONDITIONING``), and one written before ``vl_normalize`` existed
    read the features unnormalised (``LEGACY_VL_NORMALIZE``)."""
    section = section if "objective" in section else {**section, **LEGACY_HEAD}
    return {**LEGACY_CONDITIONING, **LEGACY_VL_NORMALIZE, **section}


# A clamp for predicted clean chunks: a symmetric bound (0 = none) or per-dimension (lo, hi).
ClipRange = Union[float, tuple[Tensor, Tensor], None]


@dataclass
class ActionExpertConfig:
    """Sizes and head settings of the action expert. Defaults are the reference.

    Attributes:
        action_dim: A, values per action step ([dx, dy, dz, da, db, dr, gripper] = 7).
        horizon: H, future steps predicted per chunk.
        vl_hidden_size: size of the pooled backbone hidden state that ``vl_proj`` maps
            from. Filled from the backbone at build time (2048 for Qwen2.5-VL-3B).
        vl_feature_dim: VL feature size after ``vl_proj`` (3072 in the guide).
        sensor_feature_dim: size of the sensor encoder output (its ``out_dim``).
        d_model: Transformer width.
        num_layers: pre-norm Transformer encoder layers.
        num_heads: attention heads; must divide ``d_model``.
        dim_feedforward: hidden size of each Transformer feed-forward block.
        dropout: dropout inside the Transformer, in [0, 1).
        objective: "diffusion", "flow_matching" or "regression" (module docstring).
        prediction_type: diffusion only: what the network predicts, "sample" (the clean
            chunk; the default, best in benchmarks/bench_learning.py) or "epsilon" (the added
            noise: the guide's head).
        num_train_timesteps: T, diffusion steps in training and in full DDPM sampling.
        beta_schedule: "cosine" (Nichol & Dhariwal 2021, the reference) or "linear"
            (Ho et al. 2020, endpoints rescaled from 1000 steps to T).
        num_inference_steps: default sampling steps: DDIM steps (1..T) for diffusion,
            Euler steps for flow matching; regression ignores it.
        clip_sample: bound in normalised units (5 = five standard deviations) for the
            clean chunk estimated while sampling, when the policy does not know the
            training data's per-dimension range (it does for runs since that range is
            recorded with the normalisation statistics); 0 disables.
        clip_to_data_range: clamp sampled chunks to the training data's per-dimension
            range when known (as Diffusion Policy's min-max normalisation does); false
            leaves only ``clip_sample``.
        flow_beta_alpha, flow_beta_beta: flow matching's training times t ~ Beta(alpha,
            beta) (t = 1 is pure noise); pi0's Beta(1.5, 1) favours the noisier half.
        vl_conditioning: what of the backbone's last hidden layer the expert attends to.
            "tokens" (the default): per sample 2 + num_views * vl_grid**2 tokens, the masked
            mean over the whole prompt, the mean over the instruction's tokens, and each
            view's image tokens average-pooled to a vl_grid x vl_grid grid (where things are;
            docs/conditioning.md). "pooled": the masked mean alone, one token (the guide's
            head; policies and checkpoints written before this field existed are this).
        vl_grid: cells per side of each view's token grid ("tokens" only).
        num_views: camera views per sample; filled from the data at build time ("tokens"
            only: it sizes the per-view, per-cell token embeddings).
        vl_attention: how the action tokens read the VL tokens. "joint" (the default, and the
            guide's head): one Transformer over all tokens, every token attending to every
            other. "prefix": joint, but VL tokens attend only to VL tokens (pi0's block mask).
            "cross": a Transformer decoder over [sensor, timestep, actions] that cross-attends
            to the VL tokens in every layer (Diffusion Policy's transformer, GR00T's DiT).
            Measured in docs/conditioning.md: joint is level with or ahead of the pooled head
            on every learning task; cross learns positions faster but loses on the sensor task.
        vl_normalize: standardise each channel of the VL features with the mean and standard
            deviation of the training split's features over every token place (``vl_norm``,
            set when a fresh Stage 1 run starts and carried in every checkpoint and policy after
            it), as the action and sensor inputs are, and as a linear probe of frozen features
            is (MAE's linear probing puts a BatchNorm without affine in front). The backbone's
            channels differ in offset and spread while the change a small object makes is a
            small part of them: without it the head fits the first frames of Meta-World reach,
            where only the goal's dot says where to go, far worse (docs/conditioning.md).
            Statistics shared by a channel's places keep the per-place offsets, which tell the
            places apart. Off by default; checkpoints and policies written before this field
            existed read raw features (false).
        snr_gamma: diffusion only: Min-SNR-gamma loss weighting (Hang et al. 2023), 0 = off.
            Epsilon prediction weights the clean chunk's error by SNR(t) = alpha_bar / (1 -
            alpha_bar), so nearly all of its loss comes from the low-noise steps, where the
            chunk is almost given and the conditioning hardly matters; a weight of
            min(SNR, gamma) / SNR (sample prediction: min(SNR, gamma)) caps that. Measured in
            benchmarks/bench_learning.py: gamma 5 helps epsilon a lot and hurts sample.
    """

    action_dim: int = 7
    horizon: int = 8
    vl_hidden_size: int = 2048
    vl_feature_dim: int = 3072
    sensor_feature_dim: int = 3072
    d_model: int = 1024
    num_layers: int = 4
    num_heads: int = 8
    dim_feedforward: int = 4096
    dropout: float = 0.1
    objective: str = "diffusion"
    prediction_type: str = "sample"
    num_train_timesteps: int = 100
    beta_schedule: str = "cosine"
    num_inference_steps: int = 10
    clip_sample: float = 5.0
    clip_to_data_range: bool = True
    flow_beta_alpha: float = 1.5
    flow_beta_beta: float = 1.0
    snr_gamma: float = 0.0
    vl_conditioning: str = "tokens"
    vl_grid: int = 4
    num_views: int = 2
    vl_attention: str = "joint"
    vl_normalize: bool = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("action_dim", "horizon", "vl_hidden_size", "vl_feature_dim",
                     "sensor_feature_dim", "d_model", "num_layers", "num_heads",
                     "dim_feedforward", "num_train_timesteps", "num_inference_steps", "vl_grid", "num_views"):
            require_positive_int(owner, name, getattr(self, name))
        check_transformer(owner, self.d_model, self.num_heads, self.dropout)
        for name, allowed in (("objective", OBJECTIVES), ("beta_schedule", BETA_SCHEDULES),
                              ("prediction_type", PREDICTION_TYPES), ("vl_conditioning", VL_CONDITIONINGS),
                              ("vl_attention", VL_ATTENTIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{owner}.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.objective == "diffusion" and self.num_inference_steps > self.num_train_timesteps:
            raise ConfigError(
                f"{owner}.num_inference_steps={self.num_inference_steps} must not exceed "
                f"num_train_timesteps={self.num_train_timesteps} (DDIM steps are a subset of them)"
            )
        if isinstance(self.clip_sample, bool) or not isinstance(self.clip_sample, (int, float)) \
                or not math.isfinite(self.clip_sample) or self.clip_sample < 0:
            raise ConfigError(
                f"{owner}.clip_sample must be a finite number >= 0 (0 disables), "
                f"got {self.clip_sample!r}"
            )
        if not isinstance(self.vl_normalize, bool):
            raise ConfigError(f"{owner}.vl_normalize must be true or false, got {self.vl_normalize!r}")
        if not isinstance(self.clip_to_data_range, bool):
            raise ConfigError(f"{owner}.clip_to_data_range must be true or false, got {self.clip_to_data_range!r}")
        for name in ("flow_beta_alpha", "flow_beta_beta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{owner}.{name} must be a number > 0, got {v!r}")
        v = self.snr_gamma
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{owner}.snr_gamma must be a number >= 0 (0 disables), got {v!r}")

    @property
    def vl_grid_size(self) -> int | None:
        """The grid the backbone pools each view's image tokens to, None for one pooled vector."""
        return self.vl_grid if self.vl_conditioning == "tokens" else None

    @property
    def feature_tokens(self) -> int | None:
        """T of the (B, T, vl_hidden_size) features a tokens head reads; None for a pooled head's
        (B, vl_hidden_size)."""
        return self.num_vl_tokens if self.vl_conditioning == "tokens" else None

    @property
    def num_vl_tokens(self) -> int:
        """VL tokens per sample: 1 pooled, or whole prompt + instruction + every view's grid."""
        return 1 if self.vl_conditioning == "pooled" else vl_token_count(self.num_views, self.vl_grid)

    def check_inference_steps(self, steps: int | None) -> int:
        """``steps`` (None: ``num_inference_steps``) if this head can sample with that many,
        else a ConfigError saying the valid range (1..T for DDIM, any >= 1 for Euler)."""
        steps = self.num_inference_steps if steps is None else steps
        high = self.num_train_timesteps if self.objective == "diffusion" else None
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or (high and steps > high):
            span = f"1..{high} (num_train_timesteps)" if high else ">= 1"
            raise ConfigError(f"sampling steps must be {span} for a {self.objective} head, got {steps!r}")
        return steps

    def sampler_description(self, steps: int | None = None) -> str:
        """How chunks are sampled, for logs and plot titles: "DDIM 10 steps (diffusion, sample
        prediction)", "10 Euler steps (flow matching)", "one forward pass (regression)"."""
        steps = self.num_inference_steps if steps is None else steps
        if self.objective == "diffusion":
            return f"DDIM {steps} steps (diffusion, {self.prediction_type} prediction)"
        if self.objective == "flow_matching":
            return f"{steps} Euler steps (flow matching)"
        return "one forward pass (regression)"



def vl_token_count(num_views: int, grid: int) -> int:
    """VL tokens of the "tokens" conditioning: the prompt's mean, the instruction's mean, and
    ``grid`` x ``grid`` cells per view (the order ``VLBackbone.forward`` returns them in)."""
    return 2 + num_views * grid * grid


# --------------------------------------------------------------------------- schedule


def make_betas(num_train_timesteps: int, beta_schedule: str) -> Tensor:
    """(T,) float64 betas for the named schedule."""
    T = num_train_timesteps
    if beta_schedule == "cosine":
        # Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t) / f(0) with
        # f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2); s keeps beta_0 from being ~0.
        # The last beta is ~1 (alpha_bar(T) = 0); clip at 0.999 as in the paper to keep
        # the reverse process from dividing by ~0 near t = T.
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64, device="cpu") / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = 1 - f[1:] / f[:-1]
        return betas.clamp(max=0.999)
    if beta_schedule == "linear":
        # Ho et al. use 1e-4 .. 0.02 for T = 1000; scale so that any T spans the same
        # total noise (improved-diffusion's get_named_beta_schedule).
        scale = 1000 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64, device="cpu")
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES}")


def _schedule_tensors(num_train_timesteps: int, beta_schedule: str) -> dict[str, Tensor]:
    """All schedule tensors, (T,) float64 on CPU; computed in float64 so that the
    products and square roots near alpha_bar ~ 0 do not lose precision before the
    final rounding to float32."""
    betas = make_betas(num_train_timesteps, beta_schedule)
    alphas = 1 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    # alpha_bar_{t-1}, with alpha_bar_{-1} = 1 (no noise before the first step).
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    # Posterior q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6-7).
    posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
    return {
        "betas": betas,
        "alphas": alphas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
    }


def _per_sample(values: Tensor, t: Tensor | int, ndim: int) -> Tensor:
    """values[t] shaped to broadcast against a (B, ...) tensor of ``ndim`` dims.

    ``t`` is an int (same step for the whole batch) or a (B,) integer tensor.
    """
    return _broadcastable(values[torch.as_tensor(t, device=values.device, dtype=torch.long)], ndim)


def _broadcastable(values: Tensor, ndim: int) -> Tensor:
    """() or (B,) -> shape with trailing singleton dims up to ``ndim`` dims."""
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def clamp_x0(x0: Tensor, clip: ClipRange) -> Tensor:
    """Clamp an estimated clean chunk (..., A): to [-clip, clip] for a number > 0, to
    [lo, hi] per action dimension for a pair of (A,) tensors, not at all for 0 / None."""
    if clip is None:
        return x0
    if isinstance(clip, tuple):
        lo, hi = (bound.to(device=x0.device, dtype=x0.dtype) for bound in clip)
        return torch.maximum(torch.minimum(x0, hi), lo)
    return x0.clamp(-clip, clip) if clip > 0 else x0


class NoiseSchedule(nn.Module):
    """Diffusion noise schedule with float32 buffers and pure step functions.

    Buffers, each (T,) float32: ``betas``, ``alphas``, ``alphas_cumprod`` (alpha_bar),
    ``alphas_cumprod_prev``, ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``,
    ``posterior_variance``, ``posterior_mean_coef1``, ``posterior_mean_coef2``.

    They are buffers so that ``.to(device)`` moves them with the model, and
    non-persistent because they follow from the config: checkpoints stay free of them
    and a checkpoint never overrides the schedule the config asks for.

    All step functions compute in float32 (or float64 when given float64 inputs) and
    never in the module's dtype: in bf16, 1 - alpha_bar near t = 0 rounds to 0 and
    x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) near t = T blows up errors.
    """

    def __init__(self, num_train_timesteps: int = 100, beta_schedule: str = "cosine") -> None:
        super().__init__()
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        # torch.empty(0).device honours a `with torch.device(...)` block around the build.
        self._set_buffers(torch.empty(0).device, register=True)

    def _set_buffers(self, device: torch.device, register: bool = False) -> None:
        tensors = _schedule_tensors(self.num_train_timesteps, self.beta_schedule)
        for name, value in tensors.items():
            value = value.to(device=device, dtype=torch.float32)
            if register:
                self.register_buffer(name, value, persistent=False)
            else:
                self._buffers[name] = value

    def _apply(self, fn, recurse: bool = True):
        # DeepSpeed and users cast whole models (`model.bfloat16()`, `.to(dtype)`,
        # `.to_empty(device)` after a meta-device build); all of these reach here. A
        # schedule cast to bf16 and back is not the schedule any more (alpha_bar = 0.9994
        # rounds to 1.0, so 1 - alpha_bar = 0), so instead of casting we rebuild the
        # buffers in float64 and store them as float32 on whatever device `fn` chose.
        super()._apply(fn, recurse)
        self._set_buffers(self.betas.device)
        return self

    def _ensure_float32(self) -> None:
        # Casts that assign `buffer.data` directly bypass _apply (DeepSpeed does this
        # when its config sets a `buffer_dtype`); repair rather than compute with them.
        if self.betas.dtype != torch.float32:
            self._set_buffers(self.betas.device)

    @staticmethod
    def _compute_dtype(x: Tensor) -> torch.dtype:
        # float32 at least, float64 kept (tests use it to check the algebra exactly).
        return torch.promote_types(x.dtype, torch.float32)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """Forward process q(x_t | x_0): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise.

        Args:
            x0: (B, ...) clean samples. noise: same shape. t: (B,) long or an int.
        Returns:
            x_t, same shape, float32 (float64 for float64 inputs).
        """
        self._ensure_float32()
        dtype = self._compute_dtype(x0)
        a = _per_sample(self.sqrt_alphas_cumprod, t, x0.ndim).to(dtype)           # (B, 1, 1)
        b = _per_sample(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim).to(dtype)  # (B, 1, 1)
        return a * x0.to(dtype) + b * noise.to(dtype)

    def predict_x0(self, model_output: Tensor, t: Tensor | int, sample: Tensor,
                   clip_sample: ClipRange = 0.0, prediction_type: str = "epsilon") -> Tensor:
        """Clean sample implied by ``model_output`` at x_t = ``sample``, clamped by
        ``clip_sample`` (see :func:`clamp_x0`).

        ``prediction_type`` "epsilon": the output is the predicted noise and
        x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) (near t = T this divides by
        ~5e-4, which is why the clamp matters); "sample": the output is x0 itself.
        """
        self._ensure_float32()
        dtype = self._compute_dtype(sample)
        if prediction_type == "sample":
            return clamp_x0(model_output.to(dtype), clip_sample)
        if prediction_type != "epsilon":
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        a = _per_sample(self.sqrt_alphas_cumprod, t, sample.ndim).to(dtype)
        b = _per_sample(self.sqrt_one_minus_alphas_cumprod, t, sample.ndim).to(dtype)
        return clamp_x0((sample.to(dtype) - b * model_output.to(dtype)) / a, clip_sample)

    def ddim_step(self, model_output: Tensor, t: Tensor | int, t_prev: Tensor | int,
                  sample: Tensor, clip_sample: ClipRange = 0.0, prediction_type: str = "epsilon") -> Tensor:
        """One deterministic DDIM step (eta = 0) from x_t to x_{t_prev}.

        ``t_prev`` < 0 means "the clean sample": alpha_bar = 1 there, so the step returns
        the predicted x0. With the true noise (or the true x0) as ``model_output`` the
        result is ``add_noise(x0, noise, t_prev)`` up to rounding.
        """
        dtype = self._compute_dtype(sample)
        x0 = self.predict_x0(model_output, t, sample, clip_sample, prediction_type)
        a_t = _per_sample(self.sqrt_alphas_cumprod, t, sample.ndim).to(dtype)
        b_t = _per_sample(self.sqrt_one_minus_alphas_cumprod, t, sample.ndim).to(dtype)
        # The noise that puts x_t on the line through the (possibly clamped) x0: without
        # clamping, and for epsilon prediction, this is model_output itself.
        eps = (sample.to(dtype) - a_t * x0) / b_t

        # The same stored coefficients as add_noise, so that a true-noise step lands
        # exactly on add_noise(x0, noise, t_prev); t_prev < 0 gives (1, 0).
        t_prev = torch.as_tensor(t_prev, device=self.betas.device, dtype=torch.long)
        is_noisy = t_prev >= 0
        t_prev = t_prev.clamp(min=0)
        a_prev = torch.where(is_noisy, self.sqrt_alphas_cumprod[t_prev], 1.0)
        b_prev = torch.where(is_noisy, self.sqrt_one_minus_alphas_cumprod[t_prev], 0.0)
        a_prev = _broadcastable(a_prev, sample.ndim).to(dtype)
        b_prev = _broadcastable(b_prev, sample.ndim).to(dtype)
        return a_prev * x0 + b_prev * eps

    def ddpm_step(self, model_output: Tensor, t: Tensor | int, sample: Tensor,
                  clip_sample: ClipRange = 0.0, generator: torch.Generator | None = None,
                  noise: Tensor | None = None, prediction_type: str = "epsilon") -> Tensor:
        """One ancestral DDPM step: a draw from q(x_{t-1} | x_t, x0_pred).

        The variance is the posterior variance beta_tilde_t ("fixed small"), which is 0
        at t = 0, so the last step returns the posterior mean, i.e. the predicted x0.
        ``noise`` (same shape as ``sample``) overrides the Gaussian draw, for tests.
        """
        dtype = self._compute_dtype(sample)
        x0 = self.predict_x0(model_output, t, sample, clip_sample, prediction_type)
        c1 = _per_sample(self.posterior_mean_coef1, t, sample.ndim).to(dtype)
        c2 = _per_sample(self.posterior_mean_coef2, t, sample.ndim).to(dtype)
        var = _per_sample(self.posterior_variance, t, sample.ndim).to(dtype)
        mean = c1 * x0 + c2 * sample.to(dtype)
        if noise is None:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device,
                                dtype=dtype)
        return mean + var.sqrt() * noise.to(dtype)

    def ddim_timesteps(self, num_inference_steps: int) -> list[int]:
        """Evenly spaced DDIM timesteps, descending, ending at 0 ("leading" spacing, the
        diffusers default that Diffusion Policy samples with). For T = 100 and 10 steps:
        90, 80, ..., 0.

        Not "trailing" (99, 89, ..., 9): the clipped cosine schedule leaves
        alphas_cumprod[T-1] ~ 2e-7, so an epsilon prediction at T - 1 turns into an x0
        estimate with its error amplified ~2000x; measured on the demo policy, trailing
        spacing sampled actions with 4x the error of leading spacing.
        """
        T = self.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(
                f"num_inference_steps must be in [1, {T}] (num_train_timesteps), "
                f"got {num_inference_steps}"
            )
        stride = T // num_inference_steps
        return [i * stride for i in range(num_inference_steps)][::-1]


# --------------------------------------------------------------------------- sampling


def run_sampler(
    schedule: NoiseSchedule,
    denoise_fn: Callable[[Tensor, Tensor], Tensor],
    shape: tuple[int, ...],
    *,
    method: str = "ddim",
    num_inference_steps: int = 10,
    clip_sample: ClipRange = 0.0,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    initial_noise: Tensor | None = None,
) -> Tensor:
    """Reverse diffusion from Gaussian noise to a clean sample, in float32.

    Args:
        schedule: the noise schedule (its buffers define the device if ``device`` is None).
        denoise_fn: ``(x_t (B, ...) float32, t (B,) long) -> model output`` (the noise or
            the clean sample, as ``prediction_type`` says), any float dtype.
        shape: (B, ...) of the sample.
        method: "ddim" (deterministic, ``num_inference_steps`` steps) or "ddpm"
            (ancestral, all T steps; ``num_inference_steps`` is ignored).
        clip_sample: clamp for the predicted x0 at each step (:func:`clamp_x0`).
        generator: for the initial noise and the DDPM noise; must live on ``device``.
        initial_noise: (shape) the starting noise instead of a draw from ``generator``
            (DDIM is then fully determined by it).

    Returns:
        (shape) float32 clean sample.
    """
    if method not in SAMPLING_METHODS:
        raise ValueError(f"method must be one of {SAMPLING_METHODS}, got {method!r}")
    device = schedule.betas.device if device is None else torch.device(device)
    B = shape[0]
    x = _start_noise(shape, generator, device, initial_noise)

    if method == "ddim":
        timesteps = schedule.ddim_timesteps(num_inference_steps)
        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            t_batch = torch.full((B,), t, device=device, dtype=torch.long)
            out = denoise_fn(x, t_batch).float()
            x = schedule.ddim_step(out, t, t_prev, x, clip_sample, prediction_type)
    else:
        for t in range(schedule.num_train_timesteps - 1, -1, -1):
            t_batch = torch.full((B,), t, device=device, dtype=torch.long)
            out = denoise_fn(x, t_batch).float()
            x = schedule.ddpm_step(out, t, x, clip_sample, generator=generator, prediction_type=prediction_type)
    return x


def _start_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
                 initial_noise: Tensor | None) -> Tensor:
    """Float32 (shape) Gaussian noise on ``device``: ``initial_noise`` when given, else drawn."""
    if initial_noise is None:
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    if tuple(initial_noise.shape) != tuple(shape):
        raise ValueError(f"initial_noise has shape {tuple(initial_noise.shape)}, expected {tuple(shape)}")
    return initial_noise.to(device=device, dtype=torch.float32)


def run_flow_sampler(
    velocity_fn: Callable[[Tensor, Tensor], Tensor],
    shape: tuple[int, ...],
    *,
    num_steps: int = 10,
    clip_sample: ClipRange = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    initial_noise: Tensor | None = None,
) -> Tensor:
    """Flow matching: integrate dx/dt = v(x, t) from t = 1 (Gaussian noise) to t = 0 in
    ``num_steps`` Euler steps of dt = -1/num_steps (pi0's sampler), in float32.

    ``velocity_fn``: ``(x_t (B, ...) float32, t (B,) float32 in (0, 1]) -> velocity``
    (noise - x0 along the straight path). The result is clamped by ``clip_sample``.
    ``initial_noise`` (shape) replaces the draw from ``generator``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    device = torch.device(device)
    B = shape[0]
    x = _start_noise(shape, generator, device, initial_noise)
    dt = 1.0 / num_steps
    for i in range(num_steps):
        t = torch.full((B,), 1.0 - i * dt, device=device, dtype=torch.float32)
        x = x - dt * velocity_fn(x, t).float()
    return clamp_x0(x, clip_sample)


# --------------------------------------------------------------------------- denoiser


def check_vl_features(config: ActionExpertConfig, vl_hidden: Tensor, batch_size: int | None = None) -> None:
    """A ValueError naming both shapes when ``vl_hidden`` is not what ``config``'s conditioning
    reads: (B, vl_hidden_size) pooled, (B, num_vl_tokens, vl_hidden_size) tokens."""
    B = vl_hidden.shape[0] if batch_size is None else batch_size
    c = config
    if c.feature_tokens is None:
        expected, names = (B, c.vl_hidden_size), "batch, vl_hidden_size: one pooled vector"
    else:
        expected = (B, c.feature_tokens, c.vl_hidden_size)
        names = f"batch, tokens, vl_hidden_size: 2 + {c.num_views} views x {c.vl_grid}x{c.vl_grid} tokens"
    if tuple(vl_hidden.shape) != expected:
        raise ValueError(f"VL features must be {expected} ({names}; vl_conditioning {c.vl_conditioning!r}), "
                         f"got {tuple(vl_hidden.shape)}")



def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(B,) timesteps -> (B, dim) float32 sinusoidal embedding (Vaswani et al.).

    Always float32: in bf16, sin(t * freq) for t up to T loses the fine frequencies.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half)
    args = timesteps.float()[:, None] * freqs[None]                    # (B, dim/2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)        # (B, 2*(dim/2))
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb                                                         # (B, dim)


class FeatureNorm(nn.Module):
    """``(x - mean) / std`` per feature, with the training data's statistics as float32
    buffers (saved in every checkpoint and policy; identity until :meth:`set_stats`).

    They stay float32 whatever the module is cast to: a bf16 copy of a mean (0.004 relative
    rounding) would shift a feature that varies by a few hundredths by a large part of its
    spread, differently in a bf16 training engine and an fp32 exported policy."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    def forward(self, x: Tensor) -> Tensor:
        return (x.float() - self.mean.float()) / self.std.float()

    @torch.no_grad()
    def set_stats(self, mean, std) -> None:
        """Set the statistics (array-likes of the buffers' shape; ``std`` > 0)."""
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != self.mean.shape or std.shape != self.std.shape:
            raise ValueError(f"feature statistics must be {tuple(self.mean.shape)}, got {tuple(mean.shape)} and "
                             f"{tuple(std.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("feature statistics must be finite, with std > 0")
        self.mean.copy_(mean)
        self.std.copy_(std)

    def _apply(self, fn, recurse: bool = True):
        # Moved where ``fn`` moves them, kept float32 (a cast would round the statistics).
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            self._buffers[name] = new.float() if old.is_meta or new.is_meta else old.to(new.device, torch.float32)
        return self


class ActionExpert(nn.Module):
    """Action-chunk denoiser conditioned on VL features, sensor features and the timestep.

    ``vl_proj`` (vl_hidden_size -> vl_feature_dim) lives here and not in the backbone:
    stage 1 freezes the backbone and trains only {sensor_encoder, action_expert}, and the
    guide's stage-1 checkpoint holds exactly those two, so the projection must belong to
    one of them to be trained in stage 1 and carried into stage 2. It also lets the VL
    feature cache store the backbone's pooled hidden state, which stage 1 never changes.

    Tokens, each d_model wide:
        [ vl_1 .. vl_T | sensor | timestep | action_1 ... action_H ]
    T = 1 for the pooled conditioning; for "tokens", T = 2 + V g^2 backbone tokens (prompt
    mean, instruction mean, each view's g x g cells), each through the same projection plus
    a learned embedding of its place (``vl_embed``: which view and cell, or which summary).
    A pre-norm Transformer encoder (full attention) mixes them; a head on the H action
    tokens predicts (B, H, A): the noise or the clean chunk (diffusion), the velocity
    (flow matching) or the chunk (regression). The objective changes what the network is
    trained to output and how it is sampled, never its parameters.
    """

    def __init__(self, config: ActionExpertConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.schedule = NoiseSchedule(c.num_train_timesteps, c.beta_schedule)

        self.vl_proj = nn.Linear(c.vl_hidden_size, c.vl_feature_dim)
        self.vl_cond = nn.Linear(c.vl_feature_dim, c.d_model)
        # Which view and cell (or summary) a VL token is: a pooled head has none, so its
        # state dict is the guide's.
        self.vl_embed = nn.Parameter(torch.zeros(1, c.num_vl_tokens, c.d_model)) \
            if c.vl_conditioning == "tokens" else None
        # The training split's feature statistics (vl_normalize); absent from older heads.
        self.vl_norm = FeatureNorm((c.vl_hidden_size,) if c.feature_tokens is None
                                   else (c.feature_tokens, c.vl_hidden_size)) if c.vl_normalize else None
        self.sensor_cond = nn.Linear(c.sensor_feature_dim, c.d_model)
        self.time_mlp = nn.Sequential(
            nn.Linear(c.d_model, c.d_model),
            nn.SiLU(),
            nn.Linear(c.d_model, c.d_model),
        )
        self.action_in = nn.Linear(c.action_dim, c.d_model)
        self.action_pos = nn.Parameter(torch.zeros(1, c.horizon, c.d_model))
        if c.vl_attention == "cross":
            layer = nn.TransformerDecoderLayer(
                c.d_model, c.num_heads, c.dim_feedforward, c.dropout,
                activation="gelu", batch_first=True, norm_first=True,
            )
            self.transformer = nn.TransformerDecoder(layer, c.num_layers)
            self.memory_norm = nn.LayerNorm(c.d_model)
        else:
            layer = nn.TransformerEncoderLayer(
                c.d_model, c.num_heads, c.dim_feedforward, c.dropout,
                activation="gelu", batch_first=True, norm_first=True,
            )
            # enable_nested_tensor only helps with padding masks, which we never pass, and
            # warns with norm_first=True.
            self.transformer = nn.TransformerEncoder(layer, c.num_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(c.d_model)  # the pre-norm residual stream is un-normalised
        self.head = nn.Linear(c.d_model, c.action_dim)

        nn.init.normal_(self.action_pos, std=0.02)
        if self.vl_embed is not None:
            nn.init.normal_(self.vl_embed, std=0.02)
        # Small init: the first predictions are ~0, so the starting loss is ~E[target^2],
        # yet the output still depends on the inputs (a zero head would hide them).
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.action_in.weight.dtype

    def denoise(self, noisy_actions: Tensor, timesteps: Tensor, vl_hidden: Tensor,
                sensor_features: Tensor) -> Tensor:
        """The network: predict the objective's target for ``noisy_actions``.

        Args:
            noisy_actions: (B, H, A) x_t (zeros for regression).
            timesteps: (B,) long diffusion steps in [0, T), or float flow times in [0, 1]
                (embedded as t * FLOW_TIME_SCALE).
            vl_hidden: backbone hidden states, (B, vl_hidden_size) pooled or
                (B, num_vl_tokens, vl_hidden_size) tokens, as ``vl_conditioning`` says.
            sensor_features: (B, sensor_feature_dim) sensor encoder output.

        Returns:
            (B, H, A) in the module's dtype (float inputs are cast to it, since the engine
            may run the module in bf16 while the rest is fp32).
        """
        c = self.config
        B = noisy_actions.shape[0]
        if noisy_actions.shape[1:] != (c.horizon, c.action_dim):
            raise ValueError(
                f"noisy_actions must be (B, {c.horizon}, {c.action_dim}) (horizon, action_dim), "
                f"got {tuple(noisy_actions.shape)}"
            )
        check_vl_features(c, vl_hidden, B)
        if sensor_features.shape != (B, c.sensor_feature_dim):
            raise ValueError(
                f"sensor_features must be ({B}, {c.sensor_feature_dim}) (sensor_feature_dim), "
                f"got {tuple(sensor_features.shape)}"
            )
        dtype = self.dtype
        if timesteps.is_floating_point() and c.objective == "flow_matching":
            timesteps = timesteps.float() * FLOW_TIME_SCALE

        if self.vl_norm is not None:
            vl_hidden = self.vl_norm(vl_hidden)                               # float32, standardised
        vl = self.vl_cond(self.vl_proj(vl_hidden.to(dtype)))                 # (B, D) or (B, T, D)
        vl = vl[:, None] if self.vl_embed is None else vl + self.vl_embed    # (B, T, D)
        sensor = self.sensor_cond(sensor_features.to(dtype))                  # (B, D)
        time = self.time_mlp(timestep_embedding(timesteps, c.d_model).to(dtype))  # (B, D)
        actions = self.action_in(noisy_actions.to(dtype)) + self.action_pos   # (B, H, D)
        rest = torch.cat([sensor[:, None], time[:, None], actions], dim=1)    # (B, 2+H, D)

        if c.vl_attention == "cross":
            x = self.transformer(rest, self.memory_norm(vl))                  # (B, 2+H, D)
        else:
            x = self.transformer(torch.cat([vl, rest], dim=1),
                                 mask=self._prefix_mask(vl.shape[1], vl.device))  # (B, T+2+H, D)
        x = self.final_norm(x[:, -c.horizon:])                                # (B, H, D)
        return self.head(x)                                                   # (B, H, A)

    def _prefix_mask(self, num_vl: int, device) -> Tensor | None:
        """"prefix": (S, S) bool, True where a VL token would attend to a non-VL token; else None."""
        if self.config.vl_attention != "prefix":
            return None
        size = num_vl + 2 + self.config.horizon
        mask = torch.zeros(size, size, dtype=torch.bool, device=device)
        mask[:num_vl, num_vl:] = True
        return mask

    # -- training ---------------------------------------------------------------------

    def draw_timesteps(self, batch_size: int, device: torch.device | str) -> Tensor:
        """Training timesteps from the global RNG: (B,) long uniform in [0, T) for
        diffusion, float32 flow times from Beta(flow_beta_alpha, flow_beta_beta) scaled
        into [FLOW_TIME_MIN, 1] for flow matching, zeros for regression."""
        c = self.config
        if c.objective == "diffusion":
            return torch.randint(0, c.num_train_timesteps, (batch_size,), device=device)
        if c.objective == "flow_matching":
            beta = torch.distributions.Beta(torch.tensor(float(c.flow_beta_alpha), device=device),
                                            torch.tensor(float(c.flow_beta_beta), device=device))
            return beta.sample((batch_size,)).float() * (1 - FLOW_TIME_MIN) + FLOW_TIME_MIN
        return torch.zeros(batch_size, dtype=torch.long, device=device)

    def timesteps_from_uniform(self, u: Tensor) -> Tensor:
        """Fixed validation timesteps from uniform ``u`` (B,) in [0, 1): every diffusion
        step or flow time equally often (flow: uniform in [FLOW_TIME_MIN, 1), not the
        training Beta), so validation losses compare across evaluations."""
        c = self.config
        if c.objective == "diffusion":
            return (u * c.num_train_timesteps).long().clamp(0, c.num_train_timesteps - 1)
        if c.objective == "flow_matching":
            return u.float() * (1 - FLOW_TIME_MIN) + FLOW_TIME_MIN
        return torch.zeros_like(u, dtype=torch.long)

    def compute_loss(
        self,
        actions: Tensor,
        action_is_pad: Tensor,
        sample_weight: Tensor,
        vl_hidden: Tensor,
        sensor_features: Tensor,
        noise: Tensor | None = None,
        timesteps: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Weighted MSE of the objective's target over the non-padded action steps.

        Targets: diffusion, the added noise ("epsilon") or the clean chunk ("sample");
        flow matching, the velocity noise - x0 at x_t = t noise + (1 - t) x0; regression,
        the clean chunk from zero action tokens.

        Args:
            actions: (B, H, A) normalised action chunk.
            action_is_pad: (B, H) bool, True for steps past the episode end.
            sample_weight: (B,) per-sample weight (confidence x sensor weight).
            vl_hidden, sensor_features: conditioning, as in :meth:`denoise`.
            noise: (B, H, A) optional fixed noise (default: standard Gaussian).
            timesteps: (B,) optional fixed timesteps (default :meth:`draw_timesteps`).
                Fixing both makes validation losses comparable across evaluations.

        Returns:
            (loss, per_sample_loss): loss is the float32 scalar
            mean_b(sample_weight_b * per_sample_loss_b); per_sample_loss (B,) float32 is
            the MSE over sample b's valid elements (0 for a fully padded one), not weighted
            by ``sample_weight`` (but by Min-SNR when ``snr_gamma`` > 0).
        """
        c = self.config
        B = actions.shape[0]
        x0 = actions.float()                                                  # (B, H, A)
        pad = action_is_pad.to(device=x0.device, dtype=torch.bool)            # (B, H)
        # Padded steps hold whatever the pipeline put there; zero them so they cannot
        # reach the valid steps through attention and the loss ignores them entirely.
        x0 = x0.masked_fill(pad[..., None], 0.0)
        if timesteps is None:
            timesteps = self.draw_timesteps(B, x0.device)
        loss_weight = None  # per sample, (B,): Min-SNR weighting
        if c.objective == "regression":
            x_t, target = torch.zeros_like(x0), x0
        else:
            noise = torch.randn_like(x0) if noise is None else noise.float()
            if c.objective == "diffusion":
                x_t = self.schedule.add_noise(x0, noise, timesteps)               # (B, H, A) fp32
                target = noise if c.prediction_type == "epsilon" else x0
                if c.snr_gamma > 0:
                    alpha_bar = self.schedule.alphas_cumprod[timesteps]                    # (B,)
                    snr = alpha_bar / (1 - alpha_bar)
                    loss_weight = snr.clamp(max=c.snr_gamma) / (snr if c.prediction_type == "epsilon" else 1.0)
            else:
                t = _broadcastable(timesteps.float(), x0.ndim)                   # (B, 1, 1)
                x_t = t * noise + (1 - t) * x0
                target = noise - x0
        pred = self.denoise(x_t, timesteps, vl_hidden, sensor_features).float()  # (B, H, A)

        valid = (~pad)[..., None].expand_as(x0).float()                       # (B, H, A)
        sq_err = (pred - target) ** 2 * valid                                 # (B, H, A)
        num_valid = valid.sum(dim=(1, 2))                                     # (B,)
        # clamp: a fully padded sample gives 0 / 1 = 0 instead of 0 / 0 = NaN.
        per_sample_loss = sq_err.sum(dim=(1, 2)) / num_valid.clamp(min=1.0)  # (B,)
        if loss_weight is not None:
            per_sample_loss = per_sample_loss * loss_weight
        loss = (sample_weight.float() * per_sample_loss).mean()
        return loss, per_sample_loss

    # -- inference --------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        vl_hidden: Tensor,
        sensor_features: Tensor,
        num_inference_steps: int | None = None,
        method: str | None = None,
        generator: torch.Generator | None = None,
        clip_range: tuple[Tensor, Tensor] | None = None,
        initial_noise: Tensor | None = None,
    ) -> Tensor:
        """Sample normalised action chunks (B, H, A), float32, whatever the module dtype.

        Diffusion: ``method`` "ddim" (the default) with ``num_inference_steps`` evenly
        spaced steps (default ``config.num_inference_steps``), or "ddpm", ancestral over
        all T steps. Flow matching: ``num_inference_steps`` Euler steps. Regression: one
        forward pass. The clean-chunk estimate is clamped to ``clip_range`` ((A,) lo, hi
        in normalised units: the training data's range) when given and
        ``config.clip_to_data_range``, else to +-``config.clip_sample``.
        ``generator`` seeds the initial noise (and DDPM's noise); it must live on the
        module's device. ``initial_noise`` (B, H, A) is the starting noise instead of a draw
        (each chunk then depends only on its own noise, not on the batch it is sampled in).
        Call ``eval()`` first so dropout is off.
        """
        c = self.config
        steps = c.num_inference_steps if num_inference_steps is None else num_inference_steps
        if method is not None and c.objective != "diffusion":
            raise ValueError(f"method={method!r} is for diffusion heads; this one is {c.objective}")
        clip: ClipRange = clip_range if clip_range is not None and c.clip_to_data_range else float(c.clip_sample)
        B, device = vl_hidden.shape[0], vl_hidden.device
        shape = (B, c.horizon, c.action_dim)
        if c.objective == "regression":
            zeros = torch.zeros(shape, device=device)
            t = torch.zeros(B, dtype=torch.long, device=device)
            return clamp_x0(self.denoise(zeros, t, vl_hidden, sensor_features).float(), clip)
        if c.objective == "flow_matching":
            return run_flow_sampler(lambda x_t, t: self.denoise(x_t, t, vl_hidden, sensor_features), shape,
                                    num_steps=steps, clip_sample=clip, generator=generator, device=device,
                                    initial_noise=initial_noise)
        return run_sampler(
            self.schedule,
            lambda x_t, t: self.denoise(x_t, t, vl_hidden, sensor_features),
            shape,
            method=method or "ddim",
            num_inference_steps=steps,
            clip_sample=clip,
            prediction_type=c.prediction_type,
            generator=generator,
            device=device,
            initial_noise=initial_noise,
        )
