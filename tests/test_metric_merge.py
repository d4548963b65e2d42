"""The evaluation's metrics (imagemill.evaluation.metric) merge per-shard partials in any grouping and
order to what one pass over every image gives, and compute what the reference implementations do.

Shards are written as the actors write them (workers.stages.evaluation.write_features, with a
linear classifier head standing in for Inception's) and read back as the post-pass reads them
(`read_shards`); no model, no Ray.
"""

from __future__ import annotations

import tempfile
from itertools import combinations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from imagemill.core.evaluation_results import LabelledValues
from imagemill.core.features import JOB_WIDE, FeatureSums
from imagemill.core.inception_score import ClassSums
from imagemill.core.layout import OutputLayout
from imagemill.core.write_gate import OwnedOutput
from imagemill.evaluation.embedding_passes import LabelledSamples, SeededSample
from imagemill.evaluation.feature_metrics import FrechetDistance, InceptionScore
from imagemill.evaluation.metric import Metric, ShardEvaluation, read_shards
from imagemill.evaluation.near_duplicates import NearDuplicates
from imagemill.evaluation.reference import Reference
from imagemill.evaluation.sample_metrics import REFERENCE_SHARD, Diversity, KernelDistance
from imagemill.workers.stages.evaluation import write_features

DIM, CLASSES, SEED = 4, 5, 3
KID_SAMPLE, LABEL_SAMPLE = 7, 3  # smaller than the job, so the samples choose
HEAD = np.random.default_rng(0).normal(size=(DIM, CLASSES)).astype(np.float32)
REAL = np.random.default_rng(1).normal(size=(9, DIM)).astype(np.float32)


class _Head:
    """The classifier head write_features asks the feature model for (Inception's, in a real job)."""

    def class_logits(self, features: np.ndarray) -> np.ndarray:
        return features @ HEAD


shards_strategy = st.lists(
    st.tuples(st.integers(0, 9), st.lists(st.sampled_from(["cat", "dog", None]), min_size=0, max_size=9)),
    min_size=1,
    max_size=5,
)


def _written(
    folder: str, shards: list[tuple[int, list[str | None]]]
) -> tuple[list[ShardEvaluation], np.ndarray, list]:
    """The shards' files written as an actor writes them and read back; with every image's features
    and label in shard order."""
    output = OutputLayout(folder)
    features, labels = [], []
    for number, (seed, shard_labels) in enumerate(shards):
        shard_features = np.random.default_rng(seed + 100 * number).normal(size=(len(shard_labels), DIM))
        shard_features = shard_features.astype(np.float32)
        ids = [f"{number}-{i}" for i in range(len(shard_labels))]
        attempt = OwnedOutput.unleased(output).attempt(f"shard-{number}")
        write_features(attempt, ids, list(shard_labels), shard_features, _Head())
        attempt.publish()
        features.append(shard_features)
        labels += shard_labels
    finished = {f"shard-{number}": f"t{number}" for number in range(len(shards))}
    return list(read_shards(output, finished)), np.concatenate(features), labels


def _metrics(folder: str) -> list[Metric]:
    reference = Reference(REAL.mean(0, dtype=np.float64), np.cov(REAL.astype(np.float64), rowvar=False), REAL)
    return [
        FrechetDistance(reference),
        InceptionScore(),
        KernelDistance(reference, LabelledSamples(KID_SAMPLE, LABEL_SAMPLE, SEED)),
        Diversity(LabelledSamples(LABEL_SAMPLE, LABEL_SAMPLE, SEED)),
        NearDuplicates(OwnedOutput.unleased(OutputLayout(folder)), 0.99),
    ]


def _merged_in_a_tree(partials: list, data: st.DataObject) -> Metric:
    """The partials merged in a drawn order and grouping."""
    if len(partials) == 1:
        return partials[0]
    cut = data.draw(st.integers(1, len(partials) - 1))
    return _merged_in_a_tree(partials[:cut], data).merge(_merged_in_a_tree(partials[cut:], data))


def _in_sequence(metric: Metric, shards: list[ShardEvaluation]) -> Metric:
    for shard in shards:
        metric = metric.merge(metric.partial(shard))
    return metric


@settings(max_examples=40, deadline=None)
@given(shards=shards_strategy, data=st.data())
def test_partials_merge_in_any_grouping_to_one_pass_over_every_image(shards, data):
    with tempfile.TemporaryDirectory() as folder:
        read, features, labels = _written(folder, shards)
        for metric in _metrics(folder):
            partials = [metric.partial(shard) for shard in read]
            trees = [
                _merged_in_a_tree(data.draw(st.permutations(partials)), data) for _ in range(2)
            ]  # twice from the same partials: a merge that changed one would show
            sequential = _in_sequence(metric, read)
            for tree in trees:
                _assert_same_state(tree, sequential)
                if metric.state == "sums":  # float sums: the same up to rounding
                    _assert_close_results(tree.compute(), sequential.compute())
                else:  # a sample or a set of shards is the same whatever the order
                    assert tree.compute() == sequential.compute()
        fid, _, kid, *_ = (_in_sequence(metric, read) for metric in _metrics(folder))
        _assert_sums_of_one_pass(fid.sums, features, labels)
        # the job's sample is the one every shard offered to one sample gives
        one = SeededSample(KID_SAMPLE, SEED)
        for shard in read:
            one.offer(shard.shard_id, shard.vectors)
        np.testing.assert_array_equal(kid.samples.samples[JOB_WIDE].vectors(), one.vectors())


def _assert_close_results(got: LabelledValues | None, want: LabelledValues | None) -> None:
    assert (got is None) == (want is None)
    if got is not None:
        pairs = [
            (got.all, want.all),
            *((value, want.per_label[label]) for label, value in got.per_label.items()),
        ]
        assert got.per_label.keys() == want.per_label.keys()
        for value, wanted in pairs:  # sums added in another order differ in the last bits, and FID's
            # matrix square root of a near-singular covariance (a few images) magnifies that to ~1e-8
            assert value == wanted or value == pytest.approx(wanted, rel=1e-6)


def _assert_same_state(tree: Metric, sequential: Metric) -> None:
    if isinstance(tree, FrechetDistance):
        assert tree.sums.keys() == sequential.sums.keys()
        for label, sums in tree.sums.items():
            assert sums.count == sequential.sums[label].count
            np.testing.assert_allclose(sums.outer, sequential.sums[label].outer, rtol=1e-9, atol=1e-9)
    elif isinstance(tree, InceptionScore):
        assert tree.images == sequential.images and tree.classes.keys() == sequential.classes.keys()
        for label, classes in tree.classes.items():
            np.testing.assert_allclose(classes.probability, sequential.classes[label].probability, rtol=1e-9)
    elif isinstance(tree, KernelDistance | Diversity):
        assert tree.samples.samples.keys() == sequential.samples.samples.keys()
        for label, sample in tree.samples.samples.items():
            np.testing.assert_array_equal(sample.vectors(), sequential.samples.samples[label].vectors())
    else:
        assert tree.streamed == sequential.streamed


def _assert_sums_of_one_pass(sums: dict, features: np.ndarray, labels: list[str]) -> None:
    """The merged feature sums are one FeatureSums over every image (and each label's images)."""
    named = set(labels) - {None}
    groups = {JOB_WIDE: features, **{label: features[[v == label for v in labels]] for label in named}}
    for label, rows in groups.items():
        one_pass = FeatureSums.empty(DIM)
        one_pass.add(rows)
        assert sums[label].count == one_pass.count
        np.testing.assert_allclose(sums[label].sum, one_pass.sum, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(sums[label].outer, one_pass.outer, rtol=1e-9, atol=1e-9)
        one_pass_classes = ClassSums.of_logits(rows @ HEAD)
        # (the logits are float32 products, rounded as BLAS sums them for that many rows)
        np.testing.assert_allclose(sums[label].classes.probability, one_pass_classes.probability, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(shards=shards_strategy.filter(lambda shards: sum(len(labels) for _, labels in shards) > KID_SAMPLE))
def test_the_computed_numbers_are_the_reference_implementations(shards):
    """FID (torchmetrics' formula), IS (torchmetrics, splits=1), KID (torchmetrics' polynomial MMD on
    the seeded samples) and diversity (every pair's cosine distance) over the merged partials. More
    images than KID's sample: torchmetrics' MMD takes samples of one size, as KID's are then."""
    from torchmetrics.image.fid import _compute_fid
    from torchmetrics.image.inception import InceptionScore as TorchInceptionScore
    from torchmetrics.image.kid import poly_mmd

    with tempfile.TemporaryDirectory() as folder:
        read, features, _ = _written(folder, shards)
        fid, inception, kid, diversity, _ = (_in_sequence(metric, read) for metric in _metrics(folder))
        # FID: from the written (float32) features' mean and covariance, not from the sums
        fake = torch.from_numpy(features.astype(np.float64))
        want = _compute_fid(
            fake.mean(0),
            fake.T.cov(),
            torch.from_numpy(REAL).double().mean(0),
            torch.from_numpy(REAL).double().T.cov(),
        )
        assert fid.compute().all == pytest.approx(float(want), rel=1e-6, abs=1e-9)
        # IS over all images at once
        torch_is = TorchInceptionScore(feature=torch.nn.Identity(), splits=1)
        torch_is.update(torch.from_numpy(features @ HEAD))
        assert inception.compute().all == pytest.approx(float(torch_is.compute()[0]), rel=1e-5)
        # KID: the job's seeded sample (every shard offered to one sample) against the reference's
        job_sample = kid.samples.samples[JOB_WIDE]
        real = LabelledSamples(KID_SAMPLE, KID_SAMPLE, SEED).of_shard(
            REFERENCE_SHARD, [None] * len(REAL), REAL
        )
        want_kid = poly_mmd(
            torch.from_numpy(real.samples[JOB_WIDE].vectors()).double(),
            torch.from_numpy(job_sample.vectors()).double(),
        )
        assert kid.compute().all == pytest.approx(float(want_kid), rel=1e-6, abs=1e-9)
        # diversity: the mean over the sample's pairs of 1 - cosine
        sample = diversity.samples.samples[JOB_WIDE].vectors().astype(np.float64)
        unit = sample / np.linalg.norm(sample, axis=1, keepdims=True)
        distances = [1 - unit[i] @ unit[j] for i, j in combinations(range(len(unit)), 2)]
        assert diversity.compute().all == pytest.approx(np.mean(distances), rel=1e-9)
