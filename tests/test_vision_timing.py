"""VisionTiming: a step's vision time, charged to its requests in proportion to what was encoded
for each (cache hits are not encoding), once."""

from types import SimpleNamespace

import torch

from omnistream.engine.vision_timing import VisionTiming


def _req():
    return SimpleNamespace(metrics=SimpleNamespace(vision_encode_s=0.0))


def test_cpu_timing_charges_shares_once():
    a, b, hit = _req(), _req(), _req()
    t = VisionTiming.start(torch.device("cpu"))
    sum(range(10000))
    t.stop([(a, 30), (b, 10), (hit, 0)])
    assert t.seconds > 0
    assert abs(a.metrics.vision_encode_s - 0.75 * t.seconds) < 1e-12
    assert abs(b.metrics.vision_encode_s - 0.25 * t.seconds) < 1e-12
    assert hit.metrics.vision_encode_s == 0.0
    assert t.resolve() == t.seconds  # resolving again charges nothing more
    assert abs(a.metrics.vision_encode_s + b.metrics.vision_encode_s - t.seconds) < 1e-12


def test_nothing_encoded_is_no_vision_time():
    r = _req()
    t = VisionTiming.start(torch.device("cpu"))
    t.stop([(r, 0)])
    assert t.resolve() == 0.0 and r.metrics.vision_encode_s == 0.0
