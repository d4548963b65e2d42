"""The report's "dataset" section (`evaluation:`): what imagemill.evaluation.post_pass put in `_job.json`, as
the tables the page shows. Numbers are rounded here, for reading; report.json keeps them whole."""

from __future__ import annotations

from typing import Any

Table = tuple[str, tuple[str, ...], list[tuple[Any, ...]]]  # (caption, header, rows)


def _rounded(value: float | None, digits: int = 4) -> float | str:
    return "–" if value is None else round(value, digits)


def _labelled(values: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """("all images", job-wide value), then (label, value) per label."""
    if not values:
        return []
    return [("all images", values.get("all")), *sorted((values.get("per_label") or {}).items())]


def dataset_tables(dataset: dict[str, Any] | None) -> list[Table]:
    """The section's tables; none when the job has no evaluation."""
    if not dataset:
        return []
    kid = dict(_labelled(dataset.get("kid")))
    tables: list[Table] = []
    if "fid" in dataset:
        rows = [
            (label, _rounded(fid), _rounded(kid.get(label), 6)) for label, fid in _labelled(dataset["fid"])
        ]
        tables.append(("Distance to the reference", ("images", "FID", "KID"), rows))
    if dataset.get("inception_score"):  # features: inception only (a classifier head)
        tables.append(
            (
                "Inception Score over all images at once (splits=1; higher is more confident and varied)",
                ("images", "IS"),
                [(label, _rounded(value)) for label, value in _labelled(dataset["inception_score"])],
            )
        )
    tables.append(
        (
            "Diversity: mean pairwise cosine distance of a seeded sample (higher is more varied)",
            ("images", "diversity"),
            [(label, _rounded(value)) for label, value in _labelled(dataset.get("diversity"))],
        )
    )
    if dataset.get("clip_score"):  # scored jobs only (imagemill.evaluation.score_distribution)
        quantities = ("mean", "p10", "p50", "p90")
        tables.append(
            (
                "CLIP score (how well each image matches its prompt) per label",
                ("images", "count", *quantities),
                [
                    (label, scores["count"], *(_rounded(scores[q]) for q in quantities))
                    for label, scores in _labelled(dataset["clip_score"])
                ],
            )
        )
    duplicates = dataset.get("near_duplicates") or {}
    tables.append(
        (
            f"Near-duplicates (cosine ≥ {duplicates.get('threshold')}): {duplicates.get('images', 0)} images "
            f"in {duplicates.get('groups', 0)} groups, listed in {duplicates.get('file')}",
            ("image", "most similar image", "cosine"),
            [(pair["id"], pair["nearest"], pair["cosine"]) for pair in duplicates.get("examples", [])],
        )
    )
    return tables + _leakage_tables(dataset.get("leakage"))


def _leakage_tables(leakage: dict[str, Any] | None) -> list[Table]:
    """Generated images close to a reference image, with example pairs; none without `leakage`."""
    if leakage is None:
        return []
    caption = (
        f"Leakage (cosine ≥ {leakage['threshold']} to a reference image): {leakage['images']} images, "
        f"listed in {leakage['file']}"
    )
    rows = [
        (
            pair["id"],
            pair["reference"] + ("" if pair["reference_row"] is None else f" row {pair['reference_row']}"),
            pair["cosine"],
        )
        for pair in leakage["examples"]
    ]
    return [(caption, ("image", "reference image", "cosine"), rows)]
