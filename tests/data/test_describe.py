from __future__ import annotations

import numpy as np
import pytest

from confkd.data.describe import obliquity_degrees


@pytest.mark.parametrize("angle", [0.0, 10.0, 30.0, 44.0])
def test_obliquity_of_a_rotation_about_z(angle: float) -> None:
    t = np.radians(angle)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) @ np.diag(
        [0.7, 0.7, 5.0]
    )
    assert obliquity_degrees(affine) == pytest.approx(angle, abs=1e-9)


def test_flips_are_not_oblique() -> None:
    assert obliquity_degrees(np.diag([-1.0, -2.0, 3.0, 1.0])) == 0.0
