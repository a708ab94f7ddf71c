import pytest
import torch

from refany3d.config import ModelSettings
from refany3d.models.flux import build_model
from refany3d.models.flux.sampler import Conditions, flux_timesteps, sample_latents

TARGET_HW, COND_HW, VIEWS = (2, 3), (2, 2), 2


def _model(**overrides):
    torch.manual_seed(0)
    model = build_model(ModelSettings(attention="grouped", gradient_checkpointing=False, **overrides))
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    text, pooled = torch.randn(1, 4, 32, generator=g), torch.randn(1, 32, generator=g)
    lc = COND_HW[0] * COND_HW[1]
    conds = Conditions(
        torch.randn(1, VIEWS, lc, 64, generator=g), torch.randn(1, VIEWS, lc, 64, generator=g), COND_HW
    )
    return text, pooled, conds


def _blank(conds: Conditions, value: float = -0.5) -> Conditions:
    """Stand-in blank references (the pipeline uses `components.blank_references`)."""
    lat = torch.full_like(conds.rgb, value)
    return Conditions(lat, lat, conds.size)


def test_flux_timesteps_run_from_one_to_zero_shifted_up():
    t = flux_timesteps(28, 1024)
    assert t.shape == (29,) and t[0] == 1.0 and t[-1] == 0.0
    assert (t[1:] < t[:-1]).all()
    linear = torch.linspace(1.0, 1 / 28, 28, dtype=torch.float64)
    assert (t[1:-1] > linear[1:]).all()  # mu > 0 keeps more steps at high noise


def test_sample_latents_seed_reproduces_and_differs_across_seeds():
    model = _model()
    text, pooled, conds = _inputs()

    def run(seed):
        return sample_latents(
            model, text, pooled, conds, TARGET_HW, steps=2, generator=torch.Generator().manual_seed(seed)
        )

    a, b, c = run(0), run(0), run(1)
    assert a.rgb.shape == (1, 6, 64) and a.point_map.shape == (1, 6, 64)
    assert torch.equal(a.rgb, b.rgb) and torch.equal(a.point_map, b.point_map)
    assert not torch.allclose(a.rgb, c.rgb)


def test_sample_latents_noise_of_image_k_does_not_depend_on_the_batch():
    model = _model()
    text, pooled, conds = _inputs()
    two = Conditions(conds.rgb.expand(2, -1, -1, -1), conds.point_map.expand(2, -1, -1, -1), COND_HW)

    def run(text, pooled, conds):
        return sample_latents(
            model, text, pooled, conds, TARGET_HW, steps=2, generator=torch.Generator().manual_seed(0)
        )

    one, batch = run(text, pooled, conds), run(text.expand(2, -1, -1), pooled.expand(2, -1), two)
    torch.testing.assert_close(batch.rgb[:1], one.rgb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.point_map[:1], one.point_map, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batch.rgb[0], batch.rgb[1])  # and image 1 has noise of its own


def test_sample_latents_cached_equals_uncached_with_independent_conditions():
    model = _model(independent_conditions=True)
    text, pooled, conds = _inputs()
    out = [
        sample_latents(
            model,
            text,
            pooled,
            conds,
            TARGET_HW,
            steps=3,
            image_guidance=2.0,  # both passes: with the references and blank
            generator=torch.Generator().manual_seed(0),
            cache_conditions=cache,
            blank=_blank(conds),
        )
        for cache in (True, False)
    ]
    torch.testing.assert_close(out[0].rgb, out[1].rgb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0].point_map, out[1].point_map, rtol=1e-5, atol=1e-5)


def test_sample_latents_image_guidance_scales_the_reference_direction():
    # one Euler step from t = 1 to 0 is x1 = noise - (v_blank + S (v_ref - v_blank)): linear in S
    model = _model()
    text, pooled, conds = _inputs()

    def run(s, blank=_blank(conds)):
        return sample_latents(
            model, text, pooled, conds, TARGET_HW, steps=1, image_guidance=s, blank=blank,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip

    off, two, three = run(1.0), run(2.0), run(3.0)
    for name in ("rgb", "point_map"):
        a, b, c = getattr(off, name), getattr(two, name), getattr(three, name)
        assert (b - a).abs().max() > 1e-3  # the scale changes the sample
        torch.testing.assert_close(c - a, 2.0 * (b - a), rtol=1e-4, atol=1e-5)
    other = run(2.0, _blank(conds, 0.5))  # the blank pass really conditions on `blank`
    assert not torch.allclose(other.rgb, two.rgb)
    with pytest.raises(ValueError, match="blank references"):
        run(2.0, None)


class _Oracle:
    """A stand-in network whose velocity is exact for the straight path to known targets:
    v(x_t, t) = (x_t - x0) / t, i.e. eps - x0 on x_t = (1 - t) x0 + t eps."""

    independent_conditions = False
    point_map_branch = True

    def __init__(self, x0_rgb, x0_pm):
        from types import SimpleNamespace

        self.flux = SimpleNamespace(
            config=SimpleNamespace(guidance_embeds=True, in_channels=x0_rgb.shape[-1], attention_head_dim=8)
        )
        self.x0 = (x0_rgb, x0_pm)
        self.seen_t = []

    def __call__(self, target_rgb, target_point_map, timestep, **_):
        from refany3d.models.flux import RefAny3DOutput

        t = timestep[:, None, None]
        self.seen_t.append(float(timestep[0]))
        return RefAny3DOutput((target_rgb - self.x0[0]) / t, (target_point_map - self.x0[1]) / t)


def test_sample_latents_euler_steps_reach_the_targets_of_an_exact_velocity():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 6, 64, generator=g), torch.randn(1, 6, 64, generator=g)
    oracle = _Oracle(*x0)
    text, pooled, _ = _inputs()
    out = sample_latents(
        oracle, text, pooled, None, TARGET_HW, steps=5, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(out.rgb, x0[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.point_map, x0[1], rtol=1e-4, atol=1e-4)
    assert oracle.seen_t == pytest.approx(flux_timesteps(5, 6)[:-1].tolist())
