"""How Carom's clients find the ball: the one colour rule the page, the Python clients and the
simulator's background check share.

The ball is drawn in a saturated orange-red whose Cr (V, BT.601 limited range) is far above any
neutral colour. A chroma sample is *ball* when its Cr exceeds :data:`V_THRESHOLD`; its weight in
the centroid is its excess over :data:`V_NEUTRAL`. ``carom_client.centroid`` implements it in
numpy, ``live_client.html`` in JavaScript (tests/page/test_codec.py checks both against each
other), and ``carom_simulator.background`` measures how much of a video-file background would be
taken for the ball by it.
"""

from __future__ import annotations

from typing import Final

#: Cr values above this count as ball; 7 codes above neutral 128 clears encoder ringing and noise.
V_THRESHOLD: Final = 135
#: Neutral chroma; a ball sample's weight is its Cr excess over this.
V_NEUTRAL: Final = 128
