"""Ball physics for the simulator: one ball, four walls, constant gravity, exact bounces.

The ball's centre is integrated analytically inside each frame instead of with a fixed-step
integrator, so the ground truth that every latency figure is measured against does not depend on
the frame rate: a wall contact is found at its exact time, the velocity is reflected there and the
rest of the frame continues from the wall. This is what keeps the ball inside the frame at any
speed (a naive ``x += vx * dt`` tunnels through walls once ``|vx| * dt`` exceeds the free width).

Coordinates are pixels with +y down (so positive ``gravity`` pulls towards the bottom edge); the
centre is confined to ``[radius, width - radius] x [radius, height - radius]``.
"""

from __future__ import annotations

import math
import numbers
import random
from dataclasses import dataclass, replace
from typing import Final

__all__ = [
    "CONSTANT_SPEED",
    "FALLING",
    "MAX_EVENTS_PER_FRAME",
    "MAX_FPS",
    "MAX_FRAME_SIDE",
    "Ball",
    "PhysicsParams",
    "constant_speed",
    "falling",
]

#: Highest frame rate accepted; the testbed's encoders and displays do not go beyond it.
MAX_FPS: Final = 240.0
#: Largest frame side, in pixels (the same bound the message schemas enforce).
MAX_FRAME_SIDE: Final = 8192
#: Upper bound on wall contacts handled in one frame. It bounds the work per frame; only absurd
#: settings (a ball a fraction of a pixel narrower than the frame at huge speed) reach it, and then
#: the rest of that frame's time is dropped: the ball stays valid, it just lags behind.
MAX_EVENTS_PER_FRAME: Final = 64
#: A ball whose rebound off the floor would stay airborne for less than this fraction of a frame
#: is put to rest there; otherwise an inelastic ball would bounce infinitely often (Zeno) as it
#: settles. The height of such a hop is far below a pixel for any sane gravity.
_REST_FLIGHT_FRACTION: Final = 1.0 / 32.0


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class PhysicsParams:
    """Everything that determines a trajectory; equal params give an identical one.

    The defaults are the constant-speed preset (see ``CONSTANT_SPEED``). ``x0``/``y0`` left as
    ``None`` are drawn uniformly from the allowed area with ``random.Random(seed)``, so a seed alone
    reproduces a run. Construction validates and raises ``ValueError`` naming the bad field.
    """

    fps: float = 60.0
    gravity: float = 0.0
    vx: float = 1000.0
    vy: float = 1000.0
    cor: float = 1.0
    radius: float = 20.0
    width: int = 640
    height: int = 480
    seed: int = 0
    x0: float | None = None
    y0: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject values that would make the simulation undefined or let the ball escape."""
        for name in ("fps", "gravity", "vx", "vy", "cor", "radius"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 < self.fps <= MAX_FPS:
            raise ValueError(f"fps must be in (0, {MAX_FPS:g}], got {self.fps!r}")
        if not 0.0 < self.cor <= 1.0:
            raise ValueError(f"cor must be in (0, 1], got {self.cor!r}")
        if not self.radius > 0.0:
            raise ValueError(f"radius must be > 0, got {self.radius!r}")
        for name in ("width", "height"):
            side = getattr(self, name)
            if not _is_int(side):
                raise ValueError(f"{name} must be an int, got {side!r}")
            if not 2.0 * self.radius < side <= MAX_FRAME_SIDE:
                raise ValueError(
                    f"{name} must be > 2 * radius ({2.0 * self.radius:g}) and <= "
                    f"{MAX_FRAME_SIDE}, got {side!r}"
                )
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        for name, side in (("x0", self.width), ("y0", self.height)):
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_real(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be None or a finite number, got {value!r}")
            if not self.radius <= value <= side - self.radius:
                raise ValueError(
                    f"{name} must be in [radius, side - radius] = "
                    f"[{self.radius:g}, {side - self.radius:g}], got {value!r}"
                )

    @property
    def dt(self) -> float:
        """Seconds per frame."""
        return 1.0 / float(self.fps)

    def initial_position(self) -> tuple[float, float]:
        """The frame-0 centre: the given ``x0``/``y0``, or a seeded uniform draw where missing."""
        rng = random.Random(self.seed)
        r = float(self.radius)
        # Draw both even when one is given, so giving x0 does not change the drawn y0.
        x_draw = rng.uniform(r, self.width - r)
        y_draw = rng.uniform(r, self.height - r)
        x = float(self.x0) if self.x0 is not None else x_draw
        y = float(self.y0) if self.y0 is not None else y_draw
        return (min(max(x, r), self.width - r), min(max(y, r), self.height - r))


#: Classic preset 1: no gravity, diagonal 1000 px/s per axis, perfectly elastic walls.
CONSTANT_SPEED: Final = PhysicsParams()
#: Classic preset 2: a ball under 980 px/s^2 gravity that slowly loses energy at each bounce.
FALLING: Final = PhysicsParams(gravity=980.0, vx=300.0, vy=0.0, cor=0.98)


def constant_speed(
    *,
    seed: int = 0,
    fps: float = 60.0,
    radius: float = 20.0,
    width: int = 640,
    height: int = 480,
    x0: float | None = None,
    y0: float | None = None,
) -> PhysicsParams:
    """The constant-speed preset, varying only what a run normally varies (seed, rate, sizes)."""
    return replace(
        CONSTANT_SPEED, seed=seed, fps=fps, radius=radius, width=width, height=height, x0=x0, y0=y0
    )


def falling(
    *,
    seed: int = 0,
    fps: float = 60.0,
    radius: float = 20.0,
    width: int = 640,
    height: int = 480,
    x0: float | None = None,
    y0: float | None = None,
) -> PhysicsParams:
    """The falling preset, varying only what a run normally varies (seed, rate, sizes)."""
    return replace(
        FALLING, seed=seed, fps=fps, radius=radius, width=width, height=height, x0=x0, y0=y0
    )


def _first_contact(p: float, v: float, a: float, wall: float, outward: float) -> float:
    """Earliest t >= 0 at which ``p + v t + a t^2 / 2`` reaches ``wall`` moving ``outward``.

    Returns ``inf`` when there is none. Only an outward crossing counts, which is what lets a ball
    sitting exactly on a wall after a bounce leave it instead of bouncing again at t = 0. The roots
    use the cancellation-free form ``q = -(v + sign(v) sqrt(disc)) / 2``, ``t = q / A, C / q``:
    the textbook formula loses every digit of the small root when ``a`` is tiny next to ``v``.
    """
    half_a = 0.5 * a
    c = p - wall
    if half_a == 0.0:
        if v == 0.0:
            return math.inf
        t = -c / v
        return t if t >= 0.0 and v * outward > 0.0 else math.inf
    disc = v * v - 4.0 * half_a * c
    if disc < 0.0:
        return math.inf
    q = -0.5 * (v + math.copysign(math.sqrt(disc), v))
    roots = (q / half_a, c / q) if q != 0.0 else (0.0,)
    best = math.inf
    for t in roots:
        if 0.0 <= t < best and (v + a * t) * outward > 0.0:
            best = t
    return best


class Ball:
    """A ball advanced one frame at a time; ``step()`` returns the centre for the new frame.

    Frame 0 is the initial position (``position`` before any ``step()``). Each ``step()`` moves the
    ball by exactly ``1 / fps`` seconds, resolving every wall contact inside that interval at its
    exact time. Not thread-safe; one instance per trajectory.
    """

    __slots__ = ("_frame", "_resting", "_vx", "_vy", "_x", "_y", "params")

    def __init__(self, params: PhysicsParams) -> None:
        self.params: Final = params
        self._x, self._y = params.initial_position()
        self._vx = float(params.vx)
        self._vy = float(params.vy)
        self._frame = 0
        self._resting = False
        self._settle_if_resting()

    def changed(
        self, params: PhysicsParams, velocity: tuple[float | None, float | None] = (None, None)
    ) -> Ball:
        """This ball from its current frame on under new parameters (a live change, issue 17).

        The new ball keeps the frame index and the position (moved inside the new frame if the
        frame shrank), and the velocity unless ``velocity`` sets a component (``None`` keeps it):
        the ball goes on from where it was, as the viewer sees it, not from a new start. A ball
        resting on the floor is lifted off it when gravity changes, so the new gravity acts.
        """
        ball = Ball(params)
        r = float(params.radius)
        ball._x = min(max(self._x, r), params.width - r)
        ball._y = min(max(self._y, r), params.height - r)
        vx, vy = velocity
        ball._vx = self._vx if vx is None else float(vx)
        ball._vy = self._vy if vy is None else float(vy)
        ball._frame = self._frame
        same_floor = params.gravity == self.params.gravity and params.height == self.params.height
        ball._resting = self._resting and same_floor and vy is None
        ball._settle_if_resting()
        return ball

    def snapshot(self) -> Ball:
        """An independent copy in the same state (the track keeps one per frame it hands out,
        so a live change goes on from the frame the viewer saw, not from frames made ahead)."""
        ball = object.__new__(Ball)
        for name in Ball.__slots__:
            object.__setattr__(ball, name, getattr(self, name))
        return ball

    @property
    def frame(self) -> int:
        """Index of the frame whose position ``position`` holds (0 before the first step)."""
        return self._frame

    @property
    def time(self) -> float:
        """Simulated seconds since frame 0."""
        return self._frame / float(self.params.fps)

    @property
    def position(self) -> tuple[float, float]:
        """The centre in pixels for the current frame."""
        return (self._x, self._y)

    @property
    def velocity(self) -> tuple[float, float]:
        """Velocity in px/s at the current frame (vy is 0 once resting on the floor)."""
        return (self._vx, self._vy)

    @property
    def resting(self) -> bool:
        """True once the ball has settled on the floor; it then only slides along it."""
        return self._resting

    def _floor(self) -> float | None:
        """The wall gravity pushes towards, where a ball can come to rest; None without gravity."""
        g = float(self.params.gravity)
        r = float(self.params.radius)
        if g > 0.0:
            return self.params.height - r
        if g < 0.0:
            return r
        return None

    def _settle_if_resting(self) -> None:
        # A ball on the floor with no vertical speed would otherwise bounce at t = 0 with the speed
        # gravity gave it during the previous sub-step, and jitter forever.
        if not self._resting and self._vy == 0.0 and self._y == self._floor():
            self._resting = True

    def step(self) -> tuple[float, float]:
        """Advance one frame and return the new centre."""
        p = self.params
        g = float(p.gravity)
        cor = float(p.cor)
        r = float(p.radius)
        x_min, x_max = r, p.width - r
        y_min, y_max = r, p.height - r
        floor = self._floor()
        dt = p.dt
        rest_speed = 0.5 * abs(g) * dt * _REST_FLIGHT_FRACTION

        x, y, vx, vy = self._x, self._y, self._vx, self._vy
        remaining = dt
        for _ in range(MAX_EVENTS_PER_FRAME):
            tx = min(
                _first_contact(x, vx, 0.0, x_max, 1.0),
                _first_contact(x, vx, 0.0, x_min, -1.0),
            )
            if self._resting:
                ty, y_wall = math.inf, y
            else:
                t_bottom = _first_contact(y, vy, g, y_max, 1.0)
                t_top = _first_contact(y, vy, g, y_min, -1.0)
                ty, y_wall = (t_bottom, y_max) if t_bottom <= t_top else (t_top, y_min)
            t = min(tx, ty)
            if t > remaining:
                t = remaining
            # Advance to the event (or to the end of the frame), clamping rounding overshoot.
            x = min(max(x + vx * t, x_min), x_max)
            if not self._resting:
                y = min(max(y + (vy + 0.5 * g * t) * t, y_min), y_max)
                vy += g * t
            remaining -= t
            if tx == t:
                x = x_max if vx > 0.0 else x_min
                vx = -cor * vx
            if ty == t:
                y = y_wall
                vy = -cor * vy
                if y_wall == floor and abs(vy) <= rest_speed:
                    vy = 0.0
                    self._resting = True
            if remaining <= 0.0:
                break
        # Reaching here with time left means the event budget ran out: drop the rest of the frame.

        self._x, self._y, self._vx, self._vy = x, y, vx, vy
        self._settle_if_resting()
        self._frame += 1
        return (x, y)
