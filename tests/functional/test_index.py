"""The landscape geometry index: each documented transform, the weighting, and missing inputs."""

from __future__ import annotations

import math

import pytest

from lightning_geometry.functional.index import GeometryDescriptors, geometry_index

FULL = GeometryDescriptors(
    stability_ratio=1.5, adaptive_sharpness=0.003, displacement_cv=0.25, turning_cosine=-0.2, contour_width=2.0,
    barrier=0.3,
)


def test_parts_follow_the_documented_transforms() -> None:
    result = geometry_index(FULL)
    assert result.parts["curvature"] == pytest.approx(1 / (1 + 0.003 / 0.001))  # adaptive sharpness first
    assert result.parts["continuity"] == pytest.approx(0.5 * (1 / (1 + 0.25 / 0.5) + (1 - 0.2) / 2))
    assert result.parts["width"] == pytest.approx(2.0 / 2.5)
    assert result.parts["connectivity"] == pytest.approx(1 / (1 + 0.3 / 0.1))
    p = result.parts
    expected = (p["curvature"] + 0.5 * p["continuity"] + p["width"] + p["connectivity"]) / 3.5
    assert result.value == pytest.approx(expected)
    assert result.weights == pytest.approx({"curvature": 1 / 3.5, "continuity": 0.5 / 3.5, "width": 1 / 3.5,
                                            "connectivity": 1 / 3.5})
    assert result.missing == []


def test_weights_are_normalized_and_parts_left_out_weigh_nothing() -> None:
    result = geometry_index(FULL, weights={"curvature": 3.0, "width": 1.0})
    assert result.weights == {"curvature": 0.75, "width": 0.25}
    assert result.value == pytest.approx(0.75 * result.parts["curvature"] + 0.25 * result.parts["width"])


def test_stability_ratio_stands_in_for_adaptive_sharpness() -> None:
    d = GeometryDescriptors(stability_ratio=0.5, displacement_cv=0.0, turning_cosine=1.0, contour_width=1.0,
                            barrier=0.0)
    result = geometry_index(d)
    assert result.parts["curvature"] == pytest.approx(0.5)
    assert result.parts["continuity"] == pytest.approx(1.0)
    assert result.parts["connectivity"] == pytest.approx(1.0)


def test_each_part_is_monotone_in_its_descriptor() -> None:
    flatter = GeometryDescriptors(adaptive_sharpness=0.0001, displacement_cv=0.1, turning_cosine=0.9, contour_width=5.0,
                                  barrier=0.0)
    assert all(geometry_index(flatter).parts[p] > geometry_index(FULL).parts[p] for p in geometry_index(FULL).parts)
    assert 0 < geometry_index(FULL).value < geometry_index(flatter).value < 1


def test_missing_inputs_give_no_silent_partial_score() -> None:
    partial = GeometryDescriptors(stability_ratio=1.0, contour_width=1.0)
    result = geometry_index(partial)
    assert result.value is None
    assert result.missing == ["continuity (displacement_cv and turning_cosine)", "connectivity (barrier)"]
    explicit = geometry_index(partial, allow_partial=True)
    assert explicit.value == pytest.approx((1 / (1 + 1.0 / 0.5) + 1.0 / 1.5) / 2)
    assert explicit.missing == result.missing
    assert geometry_index(partial, weights={"curvature": 1, "width": 1}).missing == []


def test_non_finite_descriptor_gives_no_value() -> None:
    result = geometry_index(GeometryDescriptors(adaptive_sharpness=math.inf, displacement_cv=0.1, turning_cosine=0.0,
                                                contour_width=1.0, barrier=0.0))
    assert math.isnan(result.parts["curvature"]) and result.value is None


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"curvature": 0.0}, r"weights must sum to a positive number, got \{'curvature': 0.0\}"),
        ({"curvature": -1.0, "width": 2.0}, r"weights\['curvature'\] must be a finite number >= 0, got -1.0"),
        ({"sharpness": 1.0}, r"weights has unknown parts \['sharpness'\]"),
    ],
)
def test_bad_weights(weights: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        geometry_index(FULL, weights=weights)


def test_bad_scales() -> None:
    with pytest.raises(ValueError, match=r"scales\['barrier'\] must be a positive number, got 0"):
        geometry_index(FULL, scales={"barrier": 0})
    with pytest.raises(ValueError, match="scales has unknown descriptor 'lambda'"):
        geometry_index(FULL, scales={"lambda": 1.0})
