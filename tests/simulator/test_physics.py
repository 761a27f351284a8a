"""Tests for the simulator's ball physics: exact bounces, containment, energy, determinism."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from carom_simulator.physics import (
    CONSTANT_SPEED,
    FALLING,
    MAX_FPS,
    Ball,
    PhysicsParams,
    constant_speed,
    falling,
)


def _triangle(p0: float, v: float, t: float, lo: float, hi: float) -> float:
    """Position of a point bouncing elastically between lo and hi: a triangle wave."""
    span = hi - lo
    u = (p0 - lo + v * t) % (2.0 * span)
    return lo + (u if u <= span else 2.0 * span - u)


def _run(params: PhysicsParams, frames: int) -> list[tuple[float, float]]:
    ball = Ball(params)
    return [ball.position] + [ball.step() for _ in range(frames)]


def test_presets() -> None:
    assert (CONSTANT_SPEED.fps, CONSTANT_SPEED.gravity, CONSTANT_SPEED.cor) == (60.0, 0.0, 1.0)
    assert (CONSTANT_SPEED.vx, CONSTANT_SPEED.vy) == (1000.0, 1000.0)
    assert (FALLING.gravity, FALLING.cor) == (980.0, 0.98)
    assert constant_speed(seed=7, width=320, height=240).seed == 7
    assert falling(radius=5.0).gravity == 980.0
    assert falling(radius=5.0).radius == 5.0
    field = "fps"
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(CONSTANT_SPEED, field, 30.0)


def test_frame_zero_is_initial_position() -> None:
    params = constant_speed(x0=100.25, y0=200.5)
    ball = Ball(params)
    assert ball.frame == 0
    assert ball.position == (100.25, 200.5)
    ball.step()
    assert ball.frame == 1
    assert ball.time == pytest.approx(1.0 / 60.0)


def test_random_initial_position_is_seeded_and_inside() -> None:
    seen = set()
    for seed in range(50):
        params = constant_speed(seed=seed)
        x, y = params.initial_position()
        assert params.radius <= x <= params.width - params.radius
        assert params.radius <= y <= params.height - params.radius
        assert Ball(constant_speed(seed=seed)).position == (x, y)
        seen.add((x, y))
    assert len(seen) == 50
    # Fixing one coordinate leaves the other's draw unchanged.
    assert constant_speed(seed=3, x0=50.0).initial_position()[1] == pytest.approx(
        constant_speed(seed=3).initial_position()[1]
    )


@pytest.mark.parametrize(("fps", "vx", "vy"), [(60.0, 1000.0, 1000.0), (10.0, -5000.0, 3700.0)])
def test_constant_speed_is_a_triangle_wave(fps: float, vx: float, vy: float) -> None:
    params = PhysicsParams(fps=fps, vx=vx, vy=vy, x0=123.456, y0=321.0)
    lo = params.radius
    for n, (x, y) in enumerate(_run(params, 3000)):
        t = n / fps
        assert x == pytest.approx(_triangle(123.456, vx, t, lo, params.width - lo), abs=1e-6)
        assert y == pytest.approx(_triangle(321.0, vy, t, lo, params.height - lo), abs=1e-6)


@pytest.mark.parametrize("cor", [1.0, 0.5])
def test_drop_from_rest_hits_floor_at_sqrt_2h_over_g(cor: float) -> None:
    g, y0, fps = 980.0, 100.0, 240.0
    params = PhysicsParams(fps=fps, gravity=g, vx=0.0, vy=0.0, cor=cor, x0=300.0, y0=y0)
    floor = params.height - params.radius
    t_contact = math.sqrt(2.0 * (floor - y0) / g)
    v_rebound = cor * g * t_contact
    t_next = t_contact + 2.0 * v_rebound / g
    ball = Ball(params)
    first_rising = None
    for n in range(1, int(t_next * fps)):
        _, y = ball.step()
        t = n / fps
        if t < t_contact:
            expected = y0 + 0.5 * g * t * t
        else:
            s = t - t_contact
            expected = floor - v_rebound * s + 0.5 * g * s * s
        assert y == pytest.approx(expected, abs=1e-6)
        if first_rising is None and ball.velocity[1] < 0.0:
            first_rising = n
    assert first_rising == math.ceil(t_contact * fps)


def test_energy_is_conserved_with_gravity_and_cor_one() -> None:
    params = PhysicsParams(gravity=980.0, vx=733.0, vy=-420.0, cor=1.0, seed=5)
    ball = Ball(params)

    def energy() -> float:
        vx, vy = ball.velocity
        return float(0.5 * (vx * vx + vy * vy) - params.gravity * ball.position[1])

    e0 = energy()
    floor_hits = 0
    for _ in range(20_000):
        vy_before = ball.velocity[1]
        ball.step()
        floor_hits += vy_before > 0.0 and ball.velocity[1] < 0.0
        assert energy() == pytest.approx(e0, rel=1e-9, abs=1e-6)
    assert floor_hits > 100


def test_energy_never_grows_with_cor_below_one() -> None:
    params = falling(seed=11)
    ball = Ball(params)
    previous = math.inf
    for _ in range(10_000):
        ball.step()
        vx, vy = ball.velocity
        e = 0.5 * (vx * vx + vy * vy) - params.gravity * ball.position[1]
        assert e <= previous + 1e-6
        previous = e


def test_wall_bounce_scales_normal_velocity_by_cor() -> None:
    params = PhysicsParams(vx=600.0, vy=50.0, cor=0.5, x0=612.0, y0=240.0)
    ball = Ball(params)
    x, _ = ball.step()  # reaches x = 620 after 1/75 s, then 1/300 s back at 300 px/s
    assert ball.velocity == (-300.0, 50.0)
    assert x == pytest.approx(619.0, abs=1e-9)


@pytest.mark.parametrize(
    ("fps", "speed"), [(10.0, 5_000.0), (60.0, 20_000.0), (10.0, 20_000.0), (240.0, 20_000.0)]
)
@pytest.mark.parametrize("gravity", [0.0, 980.0, -2000.0])
@pytest.mark.parametrize("cor", [1.0, 0.7])
def test_never_escapes_at_extreme_speed(
    fps: float, speed: float, gravity: float, cor: float
) -> None:
    for seed in range(4):
        angle = 0.3 + seed
        params = PhysicsParams(
            fps=fps,
            gravity=gravity,
            vx=speed * math.cos(angle),
            vy=speed * math.sin(angle),
            cor=cor,
            radius=7.5 + seed,
            seed=seed,
        )
        lo = params.radius
        x_hi, y_hi = params.width - lo, params.height - lo
        for x, y in _run(params, 1500):
            assert lo <= x <= x_hi
            assert lo <= y <= y_hi


def test_never_escapes_a_frame_barely_wider_than_the_ball() -> None:
    params = PhysicsParams(
        fps=10.0, gravity=980.0, vx=20_000.0, vy=-17_000.0, radius=20.9, width=42, height=42
    )
    for x, y in _run(params, 2000):
        assert 20.9 <= x <= 21.1
        assert 20.9 <= y <= 21.1


@pytest.mark.parametrize("gravity", [980.0, -980.0])
def test_inelastic_ball_comes_to_rest_on_the_floor(gravity: float) -> None:
    params = dataclasses.replace(FALLING, gravity=gravity, seed=2)
    floor = params.height - params.radius if gravity > 0 else params.radius
    ball = Ball(params)
    for _ in range(60 * 120):
        ball.step()
    assert ball.resting
    assert ball.position[1] == floor
    assert ball.velocity[1] == 0.0
    x_before = ball.position[0]
    for _ in range(10):
        _, y = ball.step()
        assert y == floor
    assert ball.position[0] != x_before  # still slides along the floor


def test_ball_starting_on_the_floor_without_speed_stays_there() -> None:
    params = PhysicsParams(gravity=980.0, vx=100.0, vy=0.0, x0=300.0, y0=460.0)
    ball = Ball(params)
    assert ball.resting
    for _ in range(100):
        assert ball.step()[1] == 460.0


def test_same_params_give_identical_trajectories() -> None:
    for params in (constant_speed(seed=9), falling(seed=9), PhysicsParams(fps=10.0, seed=4)):
        assert _run(params, 2000) == _run(dataclasses.replace(params), 2000)
    assert _run(falling(seed=1), 10) != _run(falling(seed=2), 10)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("fps", 0.0),
        ("fps", -60.0),
        ("fps", MAX_FPS + 1.0),
        ("fps", math.nan),
        ("fps", math.inf),
        ("fps", "60"),
        ("gravity", math.nan),
        ("gravity", -math.inf),
        ("vx", math.inf),
        ("vy", math.nan),
        ("vx", True),
        ("cor", 0.0),
        ("cor", 1.01),
        ("cor", math.nan),
        ("radius", 0.0),
        ("radius", -3.0),
        ("radius", math.inf),
        ("width", 40),
        ("width", 8194),
        ("width", 640.0),
        ("height", 0),
        ("height", math.nan),
        ("height", False),
        ("seed", 1.5),
        ("seed", None),
        ("x0", 5.0),
        ("x0", 630.0),
        ("x0", math.nan),
        ("y0", -1.0),
        ("y0", math.inf),
        ("y0", "200"),
    ],
)
def test_bad_params_raise_naming_the_field(field: str, value: object) -> None:
    changes: dict[str, Any] = {field: value}  # deliberately ill-typed values
    with pytest.raises(ValueError, match=rf"^{field} "):
        dataclasses.replace(CONSTANT_SPEED, **changes)


def test_validate_accepts_edge_values() -> None:
    PhysicsParams(fps=MAX_FPS, cor=1.0, gravity=-1e4, width=8192, height=41, radius=20.0)
    PhysicsParams(x0=20.0, y0=460.0)
    PhysicsParams(x0=620, y0=20)


def test_a_changed_ball_goes_on_from_where_it_was() -> None:
    ball = Ball(PhysicsParams(seed=3))
    for _ in range(10):
        ball.step()
    copy = ball.snapshot()
    ball.step()
    assert copy.frame == 10 and ball.frame == 11 and copy.position != ball.position
    # Smaller frame: the ball is moved inside it; vy set, vx kept; frame index kept.
    small = PhysicsParams(width=100, height=80, fps=30.0, gravity=980.0)
    changed = copy.changed(small, (None, -50.0))
    x, y = changed.position
    assert 20.0 <= x <= 80.0 and 20.0 <= y <= 60.0
    assert changed.velocity == (copy.velocity[0], -50.0) and changed.frame == 10
    changed.step()  # one frame at the new rate, under the new gravity
    assert changed.frame == 11 and changed.velocity[1] == pytest.approx(-50.0 + 980.0 / 30)


def test_a_resting_ball_is_lifted_when_gravity_changes() -> None:
    ball = Ball(PhysicsParams(gravity=980.0, vx=0.0, vy=0.0, cor=0.5, y0=460.0, height=480))
    for _ in range(600):
        ball.step()
    assert ball.resting
    assert ball.changed(ball.params).resting
    flipped = ball.changed(PhysicsParams(gravity=-980.0, vx=0.0, vy=0.0, cor=0.5))
    assert not flipped.resting
    flipped.step()
    assert flipped.position[1] < ball.position[1]
