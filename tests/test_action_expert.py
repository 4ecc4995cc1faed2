"""Diffusion maths (no network), the denoiser, its loss, sampling and config checks."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from vla_ds.errors import ConfigError
from vla_ds.models import count_parameters
from vla_ds.models.action_expert import (
    LEGACY_HEAD,
    ActionExpert,
    ActionExpertConfig,
    NoiseSchedule,
    clamp_x0,
    make_betas,
    run_flow_sampler,
    run_sampler,
    stored_section,
)

T = 20  # tiny-config timesteps; schedule tests use the reference T = 100


@pytest.fixture
def tiny_config() -> ActionExpertConfig:
    return ActionExpertConfig(
        action_dim=3, horizon=4, vl_hidden_size=8, vl_feature_dim=12, sensor_feature_dim=6,
        d_model=32, num_layers=2, num_heads=4, dim_feedforward=64, dropout=0.0,
        num_train_timesteps=T, num_inference_steps=5, prediction_type="epsilon",  # the maths tests' head
        num_views=1, vl_grid=2,  # VL tokens: prompt mean, instruction mean, 2x2 cells of one view
        vl_normalize=False,  # the toy features are standardised already
    )


@pytest.fixture
def expert(tiny_config) -> ActionExpert:
    torch.manual_seed(0)
    return ActionExpert(tiny_config).eval()


def _conditioning(config, B, seed=0):
    """VL features as the config's conditioning reads them (tokens by default, or pooled)."""
    g = torch.Generator().manual_seed(seed)
    vl_shape = (B, config.vl_hidden_size) if config.vl_conditioning == "pooled" \
        else (B, config.num_vl_tokens, config.vl_hidden_size)
    return (torch.randn(*vl_shape, generator=g),
            torch.randn(B, config.sensor_feature_dim, generator=g))


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("beta_schedule", ["cosine", "linear"])
def test_alphas_cumprod_decreases_from_one_to_zero(beta_schedule):
    s = NoiseSchedule(100, beta_schedule)
    ab = s.alphas_cumprod
    assert ab.dtype == torch.float32 and ab.shape == (100,)
    assert (ab[1:] < ab[:-1]).all()
    assert (ab > 0).all() and (ab <= 1).all()
    assert ab[0] >= 0.999 - 1e-6  # ~1: the first step adds almost no noise
    assert ab[-1] < 1e-3
    assert (s.betas <= 0.999).all()


def test_cosine_schedule_matches_the_paper_formula():
    s = NoiseSchedule(100, "cosine")
    f = lambda t: math.cos((t / 100 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # Before the final clipped beta, alpha_bar_t = f(t + 1) / f(0).
    for t in (0, 10, 50, 98):
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)


def test_schedule_buffers_follow_device_and_are_not_saved():
    s = NoiseSchedule(100).to("cpu")
    assert s.betas.device.type == "cpu"
    assert "betas" in dict(s.named_buffers())
    assert s.state_dict() == {}  # derived from the config, never from a checkpoint


def test_schedule_stays_float32_when_the_parent_is_cast(tiny_config):
    reference = NoiseSchedule(T)
    model = ActionExpert(tiny_config).bfloat16()
    assert model.head.weight.dtype == torch.bfloat16
    for name, buf in model.schedule.named_buffers():
        assert buf.dtype == torch.float32, name
        # Exactly the schedule, not a bf16-rounded copy of it.
        assert torch.equal(buf, getattr(reference, name)), name
    model.to(torch.float64)
    assert model.schedule.alphas_cumprod.dtype == torch.float32


def test_schedule_repairs_buffers_cast_behind_its_back():
    # DeepSpeed's buffer_dtype option assigns `buf.data` directly, bypassing _apply.
    s = NoiseSchedule(100)
    reference = s.alphas_cumprod.clone()
    for buf in s.buffers():
        buf.data = buf.data.bfloat16()
    x0 = torch.randn(2, 3)
    s.add_noise(x0, torch.randn(2, 3), torch.tensor([0, 99]))
    assert s.alphas_cumprod.dtype == torch.float32
    assert torch.equal(s.alphas_cumprod, reference)


def test_schedule_is_real_after_meta_build_and_to_empty(tiny_config):
    with torch.device("meta"):
        model = ActionExpert(tiny_config)
    assert model.schedule.betas.is_meta
    model.to_empty(device="cpu")
    assert torch.equal(model.schedule.alphas_cumprod, NoiseSchedule(T).alphas_cumprod)


def test_add_noise_matches_closed_form():
    s = NoiseSchedule(100)
    betas = make_betas(100, "cosine")
    x0 = torch.randn(5, 4, 3, dtype=torch.float64)
    noise = torch.randn(5, 4, 3, dtype=torch.float64)
    t = torch.tensor([0, 1, 37, 98, 99])
    got = s.add_noise(x0, noise, t)
    for i, ti in enumerate(t.tolist()):
        ab = torch.prod(1 - betas[: ti + 1])
        expected = ab.sqrt() * x0[i] + (1 - ab).sqrt() * noise[i]
        torch.testing.assert_close(got[i], expected, rtol=1e-6, atol=1e-6)
    # A scalar t applies to the whole batch; float32 in -> float32 out.
    out = s.add_noise(x0.float(), noise.float(), 37)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[2], got[2].float())


# --------------------------------------------------------------------------- steps


def test_ddim_step_with_true_noise_recovers_x0_from_any_t():
    s = NoiseSchedule(100)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 3, generator=g)
    noise = torch.randn(8, 4, 3, generator=g)
    for t in range(100):
        x_t = s.add_noise(x0, noise, t)
        # float32 rounding of x_t is divided by sqrt(alpha_bar_t) (~5e-4 at t = 99).
        atol = 1e-6 + 2e-6 / s.sqrt_alphas_cumprod[t].item()
        torch.testing.assert_close(s.ddim_step(noise, t, -1, x_t), x0, rtol=0, atol=atol)
        # To an intermediate step it lands exactly on the forward process there.
        t_prev = t // 2 - 1
        torch.testing.assert_close(s.ddim_step(noise, t, t_prev, x_t),
                                   s.add_noise(x0, noise, t_prev) if t_prev >= 0 else x0,
                                   rtol=0, atol=atol)
    # Per-sample timesteps, in float64 the algebra is exact.
    t = torch.randint(0, 100, (8,), generator=g)
    x_t = s.add_noise(x0.double(), noise.double(), t)
    torch.testing.assert_close(s.ddim_step(noise.double(), t, t - 1, x_t),
                               s.add_noise(x0.double(), noise.double(), t - 1).where(
                                   (t > 0)[:, None, None], x0.double()),
                               rtol=0, atol=1e-9)


def test_ddpm_step_is_the_posterior():
    s = NoiseSchedule(100)
    betas = make_betas(100, "cosine")
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    x0 = torch.randn(4, 3, dtype=torch.float64)
    noise = torch.randn(4, 3, dtype=torch.float64)
    t = 40
    x_t = s.add_noise(x0, noise, t)
    ab, ab_prev, beta = alphas_cumprod[t], alphas_cumprod[t - 1], betas[t]
    mean = ((ab_prev.sqrt() * beta / (1 - ab)) * x0
            + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * x_t)
    std = (beta * (1 - ab_prev) / (1 - ab)).sqrt()
    z = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(s.ddpm_step(noise, t, x_t, noise=z), mean + std * z,
                               rtol=1e-5, atol=1e-6)
    # t = 0 has zero posterior variance: the step returns x0 itself.
    x_0 = s.add_noise(x0, noise, 0)
    torch.testing.assert_close(s.ddpm_step(noise, 0, x_0, noise=z), x0, rtol=0, atol=1e-9)


def test_ddpm_step_keeps_the_forward_marginal():
    # With a true-noise oracle, x_{t-1} ~ q(x_{t-1} | x0): mean sqrt(ab) x0, var 1 - ab.
    s = NoiseSchedule(100)
    g = torch.Generator().manual_seed(0)
    n, t, x0 = 200_000, 30, 0.7
    x0s = torch.full((n,), x0)
    noise = torch.randn(n, generator=g)
    x_t = s.add_noise(x0s, noise, t)
    x_prev = s.ddpm_step(noise, t, x_t, generator=g)
    ab_prev = s.alphas_cumprod[t - 1].item()
    assert x_prev.mean().item() == pytest.approx(math.sqrt(ab_prev) * x0, abs=5e-3)
    assert x_prev.var().item() == pytest.approx(1 - ab_prev, rel=2e-2)


def test_ddpm_with_oracle_converges_to_x0():
    s = NoiseSchedule(100)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 4, 3, generator=g) * 2 - 1
    x = torch.randn(6, 4, 3, generator=g)
    errors = []
    for t in range(99, -1, -1):
        eps = (x - s.sqrt_alphas_cumprod[t] * x0) / s.sqrt_one_minus_alphas_cumprod[t]
        x = s.ddpm_step(eps, t, x, generator=g)
        errors.append((x - x0).abs().max().item())
    assert errors[-1] < 1e-5
    assert errors[-1] < errors[50] < errors[0]


def test_clip_sample_clamps_predicted_x0():
    s = NoiseSchedule(100)
    x_t = torch.full((2, 3), 50.0)
    x0 = s.predict_x0(torch.zeros(2, 3), 10, x_t, clip_sample=5.0)
    assert torch.equal(x0, torch.full((2, 3), 5.0))
    assert (s.predict_x0(torch.zeros(2, 3), 10, x_t) > 5.0).all()  # 0 disables


def test_ddim_timesteps_are_evenly_spaced_and_end_at_zero():
    s = NoiseSchedule(100)
    assert s.ddim_timesteps(10) == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
    assert s.ddim_timesteps(100) == list(range(99, -1, -1))
    for n in (3, 7, 33):
        ts = s.ddim_timesteps(n)
        assert len(set(ts)) == n and ts == sorted(ts, reverse=True) and ts[-1] == 0
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.ddim_timesteps(101)


# --------------------------------------------------------------------------- sampling


class OracleExpert(ActionExpert):
    """A perfectly trained denoiser for data that is one known chunk x0 per condition: the
    exact noise (epsilon), x0 itself (sample), or the exact velocity (flow matching)."""

    def __init__(self, config, x0):
        super().__init__(config)
        self.x0 = x0
        self.calls = 0

    def denoise(self, noisy_actions, timesteps, vl_hidden, sensor_features):
        self.calls += 1
        if self.config.objective == "flow_matching":  # x_t = t noise + (1 - t) x0
            return (noisy_actions - self.x0) / timesteps[:, None, None]
        if self.config.prediction_type == "sample":
            return self.x0.clone()
        s = self.schedule
        a = s.sqrt_alphas_cumprod[timesteps][:, None, None]
        b = s.sqrt_one_minus_alphas_cumprod[timesteps][:, None, None]
        return (noisy_actions - a * self.x0) / b


@pytest.mark.parametrize("method, calls", [("ddim", 5), ("ddpm", 100)])
def test_sampling_with_an_oracle_denoiser_returns_x0(tiny_config, method, calls):
    config = ActionExpertConfig(**{**tiny_config.__dict__, "num_train_timesteps": 100})
    x0 = torch.rand(3, 4, 3) * 2 - 1
    oracle = OracleExpert(config, x0)
    vl, sensor = _conditioning(tiny_config, 3)
    out = oracle.sample(vl, sensor, num_inference_steps=5, method=method,
                        generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
    assert oracle.calls == calls  # DDIM: the requested steps; DDPM: all T


@pytest.mark.parametrize("head", [("diffusion", "epsilon"), ("diffusion", "sample"), ("flow_matching", "epsilon")])
def test_a_perfect_denoiser_gives_the_same_chunk_at_any_number_of_steps(tiny_config, head):
    config = dataclasses.replace(tiny_config, num_train_timesteps=100, objective=head[0], prediction_type=head[1])
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 4, 3, generator=g) * 2 - 1
    x0[..., 1] = 0.25  # a dimension that never moves
    oracle = OracleExpert(config, x0)
    vl, sensor = _conditioning(tiny_config, 3)
    data_range = (x0.amin((0, 1)), x0.amax((0, 1)))
    for steps in (1, 10, 50, 100):
        for clip in (data_range, None):
            out = oracle.sample(vl, sensor, num_inference_steps=steps, generator=torch.Generator().manual_seed(steps),
                                clip_range=clip)
            torch.testing.assert_close(out, x0, rtol=0, atol=2e-5)


def _vl_input(config, signal, g):
    """The VL input that carries ``signal`` (n, vl_hidden_size): itself for a pooled head; for a
    tokens head, one cell of the last view among noise tokens, so only that token tells."""
    if config.vl_conditioning == "pooled":
        return signal
    tokens = torch.randn(signal.shape[0], config.num_vl_tokens, config.vl_hidden_size, generator=g)
    tokens[:, -3] = signal
    return tokens


def _toy_problem(config, n=64):
    """Conditions -> chunks (a fixed smooth function of the VL input), one dimension still."""
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(n, config.vl_hidden_size, generator=g)
    sensor = torch.randn(n, config.sensor_feature_dim, generator=g)
    mixing = torch.randn(config.vl_hidden_size, config.horizon * config.action_dim, generator=g)
    actions = torch.tanh(0.5 * signal @ mixing).reshape(n, config.horizon, config.action_dim)
    actions[..., -1] = 0.0  # a dimension that never moves
    return _vl_input(config, signal, g), sensor, actions


def _fit(model, vl, sensor, actions, steps=600):
    """Adam on the whole toy problem for ``steps`` steps; returns the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    pad, weight = torch.zeros(actions.shape[:2], dtype=torch.bool), torch.ones(len(actions))
    model.train()
    for _ in range(steps):
        loss, _ = model.compute_loss(actions, pad, weight, vl, sensor)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_a_trained_epsilon_model_is_not_worse_with_more_ddim_steps(tiny_config):
    """The guide's head, trained on a toy problem: with the sampled chunk clamped to the data's
    range (what policies pass), 100 DDIM steps are no worse than 10. With the old +-5 clamp
    the first steps of a long run (where sqrt(alpha_bar) ~ 5e-4 turns any noise error into a
    huge x0) pushed every trajectory to the clamp: 5x the error at 100 steps."""
    # The guide's head on the guide's conditioning (one pooled vector).
    config = dataclasses.replace(tiny_config, num_train_timesteps=100, vl_conditioning="pooled")
    vl, sensor, actions = _toy_problem(config)
    torch.manual_seed(0)
    model = _fit(ActionExpert(config), vl, sensor, actions)
    data_range = (actions.amin((0, 1)), actions.amax((0, 1)))

    def error(steps, clip):
        out = model.sample(vl, sensor, num_inference_steps=steps, generator=torch.Generator().manual_seed(1),
                           clip_range=clip)
        return ((out - actions) ** 2).mean().item(), out

    errors = {steps: error(steps, data_range)[0] for steps in (10, 50, 100)}
    assert errors[10] < 0.1 * actions.var().item()  # it did learn the problem
    assert errors[50] <= 1.1 * errors[10] and errors[100] <= 1.1 * errors[10], errors
    assert error(100, data_range)[1][..., -1].abs().max() == 0  # the still dimension stays exactly still
    assert error(100, None)[0] > 2 * errors[100]  # the +-5 clamp alone: much worse


def test_flow_sampler_integrates_a_straight_path_exactly():
    x0 = torch.tensor([[0.5, -0.25], [1.0, 2.0]])
    velocity = lambda x, t: (x - x0) / t[:, None]  # noqa: E731
    for steps in (1, 3, 10):
        out = run_flow_sampler(velocity, (2, 2), num_steps=steps, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
    clipped = run_flow_sampler(velocity, (2, 2), num_steps=4, clip_sample=(torch.tensor([0.0, 0.0]),
                                                                          torch.tensor([0.6, 0.6])))
    torch.testing.assert_close(clipped, torch.tensor([[0.5, 0.0], [0.6, 0.6]]), rtol=0, atol=1e-5)


def test_clamp_x0_per_dimension_or_symmetric():
    x = torch.tensor([[-3.0, 0.5, 9.0]])
    torch.testing.assert_close(clamp_x0(x, (torch.tensor([-1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 2.0]))),
                               torch.tensor([[-1.0, 0.0, 2.0]]))
    torch.testing.assert_close(clamp_x0(x, 2.0), torch.tensor([[-2.0, 0.5, 2.0]]))
    assert torch.equal(clamp_x0(x, 0.0), x) and torch.equal(clamp_x0(x, None), x)


@pytest.mark.parametrize("objective, prediction_type", [("diffusion", "epsilon"), ("diffusion", "sample"),
                                                        ("flow_matching", "epsilon"), ("regression", "epsilon")])
def test_every_head_learns_the_toy_problem(tiny_config, objective, prediction_type):
    """Each objective trains the same network towards its own target and samples chunks
    close to the data (a regression head in one pass, the others through their sampler)."""
    # The epsilon head (the guide's) on the guide's pooled vector: its loss hardly reads the
    # conditioning (docs/heads.md), and 600 steps do not teach it which of the tokens tells.
    guide_head = objective == "diffusion" and prediction_type == "epsilon"
    config = dataclasses.replace(tiny_config, num_train_timesteps=100, objective=objective,
                                 prediction_type=prediction_type, vl_conditioning="pooled" if guide_head else "tokens")
    vl, sensor, actions = _toy_problem(config, n=32)
    torch.manual_seed(0)
    model = ActionExpert(config).eval()
    with torch.no_grad():
        before = ((model.sample(vl, sensor, generator=torch.Generator().manual_seed(1)) - actions) ** 2).mean()
    _fit(model, vl, sensor, actions)
    out = model.sample(vl, sensor, num_inference_steps=10, generator=torch.Generator().manual_seed(1),
                       clip_range=(actions.amin((0, 1)), actions.amax((0, 1))))
    after = ((out - actions) ** 2).mean()
    assert out.shape == actions.shape and out.dtype == torch.float32
    assert after < 0.25 * before and after < 0.2 * actions.var(), (before, after)


def test_flow_and_regression_targets(tiny_config):
    """The flow loss regresses noise - x0 at x_t = t noise + (1 - t) x0; regression sees zero
    action tokens and regresses x0."""
    B = 3
    g = torch.Generator().manual_seed(0)
    vl, sensor = _conditioning(tiny_config, B)
    x0 = torch.randn(B, 4, 3, generator=g)
    noise = torch.randn(B, 4, 3, generator=g)
    pad, weight = torch.zeros(B, 4, dtype=torch.bool), torch.ones(B)
    torch.manual_seed(0)
    flow = ActionExpert(dataclasses.replace(tiny_config, objective="flow_matching")).eval()
    t = torch.tensor([0.1, 0.5, 0.9])
    _, per_sample = flow.compute_loss(x0, pad, weight, vl, sensor, noise, t)
    pred = flow.denoise(t[:, None, None] * noise + (1 - t[:, None, None]) * x0, t, vl, sensor)
    torch.testing.assert_close(per_sample, ((pred - (noise - x0)) ** 2).mean(dim=(1, 2)))
    regression = ActionExpert(dataclasses.replace(tiny_config, objective="regression")).eval()
    _, per_sample = regression.compute_loss(x0, pad, weight, vl, sensor, noise)
    pred = regression.denoise(torch.zeros_like(x0), torch.zeros(B, dtype=torch.long), vl, sensor)
    torch.testing.assert_close(per_sample, ((pred - x0) ** 2).mean(dim=(1, 2)))
    torch.testing.assert_close(regression.sample(vl, sensor), pred.clamp(-5, 5))


def test_flow_times_follow_the_beta_distribution(tiny_config):
    expert = ActionExpert(dataclasses.replace(tiny_config, objective="flow_matching"))
    torch.manual_seed(0)
    t = expert.draw_timesteps(20_000, "cpu")
    assert t.dtype == torch.float32 and t.min() >= 0.001 and t.max() <= 1.0
    # Beta(1.5, 1): mean 0.6, P(t < 0.5) = 0.5 ** 1.5
    assert t.mean().item() == pytest.approx(0.6 * 0.999 + 0.001, abs=0.01)
    assert (t < 0.5).float().mean().item() == pytest.approx(0.5 ** 1.5, abs=0.01)
    u = torch.tensor([0.0, 0.5, 0.999])
    torch.testing.assert_close(expert.timesteps_from_uniform(u), u * 0.999 + 0.001)
    diffusion = ActionExpert(tiny_config)
    assert diffusion.timesteps_from_uniform(u).tolist() == [0, T // 2, T - 1]


def test_sampling_steps_are_checked_per_head(tiny_config):
    assert tiny_config.check_inference_steps(None) == 5
    with pytest.raises(ConfigError, match=r"1..20 \(num_train_timesteps\) for a diffusion head, got 21"):
        tiny_config.check_inference_steps(21)
    flow = dataclasses.replace(tiny_config, objective="flow_matching", num_inference_steps=50)  # > T is fine
    assert flow.check_inference_steps(200) == 200
    with pytest.raises(ConfigError, match=">= 1 for a flow_matching head, got 0"):
        flow.check_inference_steps(0)
    assert "Euler" in flow.sampler_description() and "DDIM 5 steps" in tiny_config.sampler_description()
    with pytest.raises(ValueError, match="diffusion"):
        ActionExpert(flow).sample(*_conditioning(tiny_config, 1), method="ddpm")


def test_a_stored_section_without_an_objective_is_the_legacy_head(tiny_config):
    section = {k: v for k, v in dataclasses.asdict(tiny_config).items() if k not in ("objective", "prediction_type")}
    legacy = ActionExpertConfig(**stored_section(section))
    assert (legacy.objective, legacy.prediction_type) == (LEGACY_HEAD["objective"], LEGACY_HEAD["prediction_type"])
    assert ActionExpertConfig().prediction_type != LEGACY_HEAD["prediction_type"]  # not today's default
    flow = ActionExpertConfig(**stored_section({**section, "objective": "flow_matching"}))
    assert flow.objective == "flow_matching"


def test_vl_features_are_standardised_with_float32_statistics_saved_with_the_weights(tiny_config):
    tiny_config = dataclasses.replace(tiny_config, vl_normalize=True)
    model = ActionExpert(tiny_config)
    shape = (tiny_config.num_vl_tokens, tiny_config.vl_hidden_size)
    assert model.vl_norm.mean.shape == shape and not model.vl_norm.mean.any() and (model.vl_norm.std == 1).all()
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(shape, generator=g) * 10 + 0.123456789
    std = torch.rand(shape, generator=g) * 0.1 + 0.001
    model.vl_norm.set_stats(mean, std)
    z = torch.randn(5, *shape, generator=g)
    torch.testing.assert_close(model.vl_norm(mean + std * z), z, rtol=0, atol=2e-3)  # float32 rounding of mean + std z
    # A bf16 engine casts the module: the statistics stay exactly what they were.
    model.bfloat16()
    assert model.head.weight.dtype == torch.bfloat16
    assert model.vl_norm.mean.dtype == torch.float32 and torch.equal(model.vl_norm.mean, mean)
    torch.testing.assert_close(model.vl_norm((mean + std * z).bfloat16()).std(), torch.tensor(1.0), rtol=0.2, atol=0)
    state = model.state_dict()
    assert torch.equal(state["vl_norm.mean"], mean) and torch.equal(state["vl_norm.std"], std)
    fresh = ActionExpert(tiny_config)
    fresh.load_state_dict(state)  # the features a policy reads travel with its weights
    assert torch.equal(fresh.vl_norm.std, std)
    with pytest.raises(ValueError, match=r"must be \(6, 8\)"):
        fresh.vl_norm.set_stats(mean[:, :4], std[:, :4])
    with pytest.raises(ValueError, match="std > 0"):
        fresh.vl_norm.set_stats(mean, torch.zeros_like(std))
    with torch.device("meta"):
        meta = ActionExpert(dataclasses.replace(tiny_config, vl_conditioning="pooled"))
    meta.to_empty(device="cpu")
    assert meta.vl_norm.mean.shape == (tiny_config.vl_hidden_size,) and meta.vl_norm.mean.dtype == torch.float32


def test_heads_written_before_vl_normalize_read_raw_features_and_keep_their_tensors(tiny_config):
    tiny_config = dataclasses.replace(tiny_config, vl_normalize=True)
    section = {k: v for k, v in dataclasses.asdict(tiny_config).items() if k != "vl_normalize"}
    legacy = ActionExpertConfig(**stored_section(section))
    assert legacy.vl_normalize is False and tiny_config.vl_normalize is True
    old, new = ActionExpert(legacy), ActionExpert(tiny_config)
    assert set(new.state_dict()) - set(old.state_dict()) == {"vl_norm.mean", "vl_norm.std"}
    vl, sensor = _conditioning(legacy, 3)
    a = ActionExpert(legacy).eval()
    b = ActionExpert(tiny_config).eval()
    b.load_state_dict({**a.state_dict(), **{k: v for k, v in b.state_dict().items() if k.startswith("vl_norm.")}})
    # identity statistics until a run sets them: the same weights give the same outputs
    x, t = torch.randn(3, tiny_config.horizon, tiny_config.action_dim), torch.tensor([1, 5, 9])
    torch.testing.assert_close(a.denoise(x, t, vl, sensor), b.denoise(x, t, vl, sensor))
    with pytest.raises(ConfigError, match="vl_normalize must be true or false"):
        ActionExpertConfig(vl_normalize="yes")


def test_run_sampler_without_a_module():
    s = NoiseSchedule(50)
    x0 = torch.tensor([[0.5, -0.25]])

    def oracle(x, t):
        a, b = s.sqrt_alphas_cumprod[t][:, None], s.sqrt_one_minus_alphas_cumprod[t][:, None]
        return (x - a * x0) / b

    out = run_sampler(s, oracle, (1, 2), method="ddim", num_inference_steps=7)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="method"):
        run_sampler(s, oracle, (1, 2), method="euler")


def test_sample_is_seeded_and_float32_for_a_bf16_module(expert, tiny_config):
    vl, sensor = _conditioning(tiny_config, 2)
    a = expert.sample(vl, sensor, generator=torch.Generator().manual_seed(3))
    b = expert.sample(vl, sensor, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 4, 3) and torch.equal(a, b)
    expert = expert.bfloat16()
    for method in ("ddim", "ddpm"):
        out = expert.sample(vl, sensor, method=method, generator=torch.Generator().manual_seed(3))
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert out.abs().max() <= tiny_config.clip_sample


# --------------------------------------------------------------------------- denoiser


def test_denoise_shapes_and_dtypes(expert, tiny_config):
    B = 5
    vl, sensor = _conditioning(tiny_config, B)
    x = torch.randn(B, 4, 3)
    t = torch.randint(0, T, (B,))
    out = expert.denoise(x, t, vl, sensor)
    assert out.shape == (B, 4, 3) and out.dtype == torch.float32
    expert = expert.bfloat16()
    out = expert.denoise(x, t, vl, sensor)  # float32 inputs into a bf16 module
    assert out.dtype == torch.bfloat16
    actions = torch.randn(B, 4, 3)
    loss, per_sample = expert.compute_loss(actions, torch.zeros(B, 4, dtype=torch.bool),
                                           torch.ones(B), vl, sensor)
    assert loss.dtype == per_sample.dtype == torch.float32
    assert loss.shape == () and per_sample.shape == (B,)


def test_denoise_rejects_wrong_shapes(expert, tiny_config):
    vl, sensor = _conditioning(tiny_config, 2)
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(B, 4, 3\)"):
        expert.denoise(torch.randn(2, 4, 7), t, vl, sensor)
    with pytest.raises(ValueError, match="vl_hidden_size"):
        expert.denoise(torch.randn(2, 4, 3), t, torch.randn(2, tiny_config.num_vl_tokens, 9), sensor)
    with pytest.raises(ValueError, match="vl_conditioning 'tokens'"):  # a pooled vector for a tokens head
        expert.denoise(torch.randn(2, 4, 3), t, torch.randn(2, 8), sensor)
    with pytest.raises(ValueError, match="sensor_feature_dim"):
        expert.denoise(torch.randn(2, 4, 3), t, vl, torch.randn(2, 5))


def _loss_inputs(config, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    vl, sensor = _conditioning(config, B, seed)
    actions = torch.randn(B, config.horizon, config.action_dim, generator=g)
    noise = torch.randn(B, config.horizon, config.action_dim, generator=g)
    timesteps = torch.randint(0, config.num_train_timesteps, (B,), generator=g)
    pad = torch.zeros(B, config.horizon, dtype=torch.bool)
    pad[0, 2:] = True
    pad[1, 3:] = True
    return actions, pad, torch.ones(B), vl, sensor, noise, timesteps


def test_padded_steps_do_not_change_the_loss(expert, tiny_config):
    actions, pad, weight, vl, sensor, noise, t = _loss_inputs(tiny_config)
    loss, per_sample = expert.compute_loss(actions, pad, weight, vl, sensor, noise, t)

    changed = actions.clone()
    changed[0, 2:] += 10.0  # padded
    changed[1, 3] = float("nan")  # padded, and garbage
    loss2, per_sample2 = expert.compute_loss(changed, pad, weight, vl, sensor, noise, t)
    assert torch.equal(loss, loss2) and torch.equal(per_sample, per_sample2)

    changed = actions.clone()
    changed[0, 1] += 1.0  # not padded
    loss3, per_sample3 = expert.compute_loss(changed, pad, weight, vl, sensor, noise, t)
    assert loss3 != loss and per_sample3[0] != per_sample[0]


def test_per_sample_loss_is_the_mean_over_valid_elements(expert, tiny_config):
    actions, pad, weight, vl, sensor, noise, t = _loss_inputs(tiny_config)
    _, per_sample = expert.compute_loss(actions, pad, weight, vl, sensor, noise, t)
    x0 = actions.masked_fill(pad[..., None], 0.0)
    pred = expert.denoise(expert.schedule.add_noise(x0, noise, t), t, vl, sensor)
    se = (pred - noise) ** 2
    expected = torch.stack([se[0, :2].mean(), se[1, :3].mean(), se[2].mean(), se[3].mean()])
    torch.testing.assert_close(per_sample, expected)


def test_sample_weight_scales_each_sample(expert, tiny_config):
    actions, pad, weight, vl, sensor, noise, t = _loss_inputs(tiny_config)
    weight = torch.tensor([1.0, 2.0, 0.0, 0.5])
    loss, per_sample = expert.compute_loss(actions, pad, weight, vl, sensor, noise, t)
    torch.testing.assert_close(loss, (weight * per_sample).mean())
    weight2 = weight.clone()
    weight2[0] = 3.0
    loss2, per_sample2 = expert.compute_loss(actions, pad, weight2, vl, sensor, noise, t)
    torch.testing.assert_close(per_sample2, per_sample)  # unweighted
    torch.testing.assert_close(loss2 - loss, 2.0 * per_sample[0] / 4)


def test_fully_padded_sample_contributes_zero(expert, tiny_config):
    actions, pad, weight, vl, sensor, noise, t = _loss_inputs(tiny_config)
    pad[2] = True
    loss, per_sample = expert.compute_loss(actions, pad, weight, vl, sensor, noise, t)
    assert per_sample[2] == 0.0
    assert torch.isfinite(loss) and torch.isfinite(per_sample).all()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in expert.parameters() if p.grad is not None)


def test_training_reduces_the_loss(tiny_config):
    # Actions are a fixed function of the VL conditioning, so a working denoiser can
    # predict the noise far better than the ~1.0 of predicting nothing.
    torch.manual_seed(0)
    model = ActionExpert(tiny_config)
    g = torch.Generator().manual_seed(0)
    N = 16
    signal = torch.randn(N, tiny_config.vl_hidden_size, generator=g)
    sensor = torch.randn(N, tiny_config.sensor_feature_dim, generator=g)
    mixing = torch.randn(tiny_config.vl_hidden_size, 12, generator=g)
    actions = 1.5 * torch.tanh(signal @ mixing).reshape(N, 4, 3)
    vl = _vl_input(tiny_config, signal, g)
    pad = torch.zeros(N, 4, dtype=torch.bool)
    weight = torch.ones(N)
    # Fixed noise and timesteps for evaluation, as validation does.
    K = 4
    eval_noise = torch.randn(K * N, 4, 3, generator=g)
    eval_t = torch.randint(0, T, (K * N,), generator=g)

    def eval_loss():
        with torch.no_grad():
            return model.compute_loss(actions.repeat(K, 1, 1), pad.repeat(K, 1), weight.repeat(K),
                                      vl.repeat(K, *[1] * (vl.ndim - 1)), sensor.repeat(K, 1),
                                      eval_noise, eval_t)[0].item()

    start = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        loss, _ = model.compute_loss(actions.repeat(2, 1, 1), pad.repeat(2, 1), weight.repeat(2),
                                     vl.repeat(2, *[1] * (vl.ndim - 1)), sensor.repeat(2, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = eval_loss()
    assert start > 0.8
    assert end < 0.5 * start, (start, end)


# --------------------------------------------------------------------------- config, helpers


@pytest.mark.parametrize("field, value, message", [
    ("num_heads", 5, r"num_heads must divide d_model, got num_heads=5, d_model=32"),
    ("beta_schedule", "sigmoid", r"beta_schedule must be one of .*, got 'sigmoid'"),
    ("prediction_type", "v", r"prediction_type must be one of .*, got 'v'"),
    ("objective", "gan", r"objective must be one of .*, got 'gan'"),
    ("flow_beta_alpha", 0.0, r"flow_beta_alpha must be a number > 0, got 0.0"),
    ("num_inference_steps", 21, r"num_inference_steps=21 must not exceed num_train_timesteps=20"),
    ("clip_sample", -1.0, r"clip_sample must be a finite number >= 0 .*, got -1.0"),
    ("dropout", 1.0, r"dropout must be in \[0, 1\), got 1.0"),
    ("horizon", 0, r"horizon must be a positive integer, got 0"),
    ("num_layers", True, r"num_layers must be a positive integer, got True"),
])
def test_config_rejects_bad_values(tiny_config, field, value, message):
    with pytest.raises(ConfigError, match="ActionExpertConfig." + message):
        ActionExpertConfig(**{**tiny_config.__dict__, field: value})


def test_count_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))  # 16 + 10
    assert count_parameters(model) == 26
    model[0].requires_grad_(False)
    assert count_parameters(model) == 10
    assert count_parameters(model, trainable_only=False) == 26


def test_reference_size_builds_on_meta_device():
    with torch.device("meta"):
        model = ActionExpert(ActionExpertConfig())
    assert model.vl_proj.weight.shape == (3072, 2048)
    assert model.action_pos.shape == (1, 8, 1024)
    assert count_parameters(model) > 0


@pytest.mark.parametrize("vl_attention", ["joint", "prefix", "cross"])
def test_every_vl_attention_reads_the_token_that_tells(tiny_config, vl_attention):
    """The chunk is a function of one VL token among noise tokens: every way of reading the
    tokens learns it (the sample head, as shipped), and "prefix" keeps VL tokens from
    attending to the rest."""
    config = dataclasses.replace(tiny_config, num_train_timesteps=100, prediction_type="sample",
                                 vl_attention=vl_attention)
    vl, sensor, actions = _toy_problem(config, n=32)
    torch.manual_seed(0)
    model = ActionExpert(config)
    if vl_attention == "prefix":
        mask = model._prefix_mask(config.num_vl_tokens, "cpu")
        T = config.num_vl_tokens
        assert mask[:T, T:].all() and not mask[:T, :T].any() and not mask[T:].any()
    _fit(model, vl, sensor, actions)
    out = model.sample(vl, sensor, generator=torch.Generator().manual_seed(1),
                       clip_range=(actions.amin((0, 1)), actions.amax((0, 1))))
    assert ((out - actions) ** 2).mean() < 0.2 * actions.var()
