"""`evaluation.features: inception`: the FID Inception-v3 from a weights file; the job's feature sums
and Inception Score compared with the network and torchmetrics on the same images, IS merged across
shards, and wrong weights files refused.

The weights are random, made here in torch-fidelity's state-dict layout (the real file is 92 MB and
never downloaded); the images come from the no-model generator (a solid colour per seed), run by
in-process shard workers, so the cost is the network's: a handful of images at 299x299.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import merged_feature_sums, read_metadata
from test_evaluation import _prompts, _run_shards, _spec, _written_images

import imagemill
from imagemill.core.errors import ImagemillError
from imagemill.core.features import JOB_WIDE, FeatureSums, sums_from_table, sums_table
from imagemill.core.inception_score import ClassSums
from imagemill.core.layout import OutputLayout
from imagemill.core.model_source import check_source
from imagemill.core.spec import EvaluationSpec
from imagemill.core.write_gate import OwnedOutput
from imagemill.evaluation.feature_metrics import InceptionScore
from imagemill.evaluation.metric import ShardEvaluation
from imagemill.evaluation.post_pass import evaluate
from imagemill.reporting.report_dataset import dataset_tables
from imagemill.workers.stages.inception import InceptionV3, load_inception

pytestmark = pytest.mark.model  # its tests build or load a model (the tiers: tests/conftest.py)

PTH = "weights-inception-2015-12-05-6726825d.pth"
FC_SCALE = 0.003
SEEDS = [0xD03010, 0x20A0F0, 0xF0E040, 0x101010, 0x80F080, 0xC040C0, 0x406080, 0xF08000]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A folder with random FID Inception-v3 weights as torch-fidelity's .pth and as safetensors.
    At random initialisation the activations fade layer by layer and every image gets the same
    features, so the batch norms' running statistics are taken from one batch of images (as training
    would leave them) and the classifier is scaled so that colours get confident, different classes."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = InceptionV3()
    calibration = torch.tensor(SEEDS[::2])[:, None] >> torch.tensor([16, 8, 0]) & 255
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = 1.0  # the batch's statistics, as they are
        model.train().features(calibration[:, :, None, None].expand(-1, -1, 32, 32).to(torch.uint8))
        model.fc.weight.mul_(FC_SCALE)
    folder = tmp_path_factory.mktemp("inception")
    state = model.state_dict()
    torch.save(state, folder / PTH)
    (folder / "safetensors").mkdir()
    save_file(
        {key: value.contiguous() for key, value in state.items()}, folder / "safetensors" / "fid.safetensors"
    )
    return folder


def _network(weights: Path) -> InceptionV3:
    return load_inception(EvaluationSpec(features="inception", source=str(weights / "safetensors")), "cpu")


class _Features(torch.nn.Module):
    """The network as torchmetrics takes a custom feature model: (N, 3, H, W) uint8 → (N, d)."""

    def __init__(self, network: InceptionV3, output: int):
        super().__init__()
        self.network, self.output = network, output
        self.num_features = 2048 if output == 0 else 1008

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.network(images)[self.output]


def _job(
    folder: Path,
    weights_source: str,
    seeds: list[int],
    labels: list[str] | None,
    rows_per_group: int,
    **evaluation,
) -> imagemill.JobSpec:
    """A row per seed, in shards of `rows_per_group` rows (whole row groups, so no piece server)."""
    inputs = _prompts(folder, [f"colour {i}" for i in range(len(seeds))], seeds, labels)
    table = pq.read_table(inputs / "prompts.parquet")
    pq.write_table(table, inputs / "prompts.parquet", row_group_size=rows_per_group)
    spec = _spec(
        inputs,
        folder / "out",
        "unused",
        {"features": "inception", "source": weights_source, **evaluation},
        carry_columns=["label"] if labels else None,
    )
    spec.model.kind = "noop"
    spec.input.rows_per_shard = rows_per_group
    return spec


def test_a_pth_loads_the_same_network_as_its_safetensors(weights):
    """torch-fidelity's .pth (file or folder) with safetensors_only: false, read by
    torch.load(weights_only=True), is the network its safetensors copy gives."""
    pth = load_inception(
        EvaluationSpec(features="inception", source=str(weights), safetensors_only=False), "cpu"
    )
    reference = _network(weights).state_dict()
    assert pth.state_dict().keys() == reference.keys()
    assert all(torch.equal(value, reference[key]) for key, value in pth.state_dict().items())


def test_features_and_inception_score_match_torchmetrics_per_label_and_merge_across_shards(tmp_path, weights):
    """Two shards of two images on two actors, two labels; the safetensors file (the default
    safetensors_only). The job's merged feature sums are those of the network's pool features (FID
    and KID come from them; their formulas are checked against torchmetrics in test_evaluation.py),
    and its Inception Score is torchmetrics' on the network's logits, overall and per label. Few
    images: each costs a 299x299 Inception pass on the CPU."""
    from torchmetrics.image.inception import InceptionScore

    labels = ["warm", "cool"] * 2
    spec = _job(tmp_path, str(weights / "safetensors"), SEEDS[:4], labels, rows_per_group=2)
    committed = _run_shards(spec, actors=2)
    assert len(committed) == 2
    output = OutputLayout(spec.output.path)
    result = evaluate(spec, OwnedOutput.unleased(output), committed)
    images = _written_images(spec.output.path)
    written_labels = [
        row["label"] for row in sorted(read_metadata(spec.output.path).to_pylist(), key=lambda r: r["id"])
    ]
    with torch.no_grad():
        features, logits = _network(weights)(images)  # the network runs once here

    merged = merged_feature_sums(output, committed)[JOB_WIDE]
    assert merged.count == len(images)
    np.testing.assert_allclose(merged.mean_cov()[0], features.double().mean(0).numpy(), rtol=1e-4, atol=1e-6)

    def inception_score(rows: torch.Tensor) -> float:
        metric = InceptionScore(feature=torch.nn.Identity(), splits=1)
        metric.update(rows)
        return float(metric.compute()[0])

    want = inception_score(logits)
    assert want > 1.2  # confident, varied classes: not the uniform-softmax score of 1
    assert result.inception_score.splits == 1
    assert result.inception_score.all == pytest.approx(want, rel=1e-3)
    for label in ("warm", "cool"):
        got = result.inception_score.per_label[label]
        assert got == pytest.approx(
            inception_score(logits[[value == label for value in written_labels]]), rel=1e-3
        )

    # The shards' sums, merged, are one pass's over every image.
    one_pass = ClassSums.of_logits(logits.numpy())
    assert merged.classes is not None and merged.classes.count == one_pass.count == len(images)
    np.testing.assert_allclose(merged.classes.probability, one_pass.probability, rtol=1e-5)
    assert merged.classes.p_log_p == pytest.approx(one_pass.p_log_p, rel=1e-5)
    # The report shows it per label, and says how it was computed.
    table = next(rows for caption, _, rows in dataset_tables(result) if caption.startswith("Inception Score"))
    assert [label for label, _ in table] == ["all images", "cool", "warm"]


def test_wrong_weights_and_pickles_under_safetensors_only_are_refused_in_one_line(tmp_path, weights):
    state = torch.load(weights / PTH, weights_only=True)

    def refusal(source: Path, **settings) -> str:
        with pytest.raises(ImagemillError) as caught:
            load_inception(EvaluationSpec(features="inception", source=str(source), **settings), "cpu")
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert "safetensors_only: true refuses pickles" in refusal(weights / PTH)
    assert "safetensors_only: true refuses pickles" in refusal(weights)  # the folder's .pth alike
    renamed = {key.replace("Mixed_7c.", "Mixed_8c."): value for key, value in state.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    message = refusal(tmp_path / "renamed.pth", safetensors_only=False)
    assert "renamed.pth" in message and "lacks key Mixed_7c.branch1x1.bn.bias" in message
    del state["fc.bias"]
    torch.save({**state, "aux.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    assert "lacks key fc.bias" in refusal(tmp_path / "extra.pth", safetensors_only=False)
    (tmp_path / "not-weights.pth").write_bytes(b"not a pickle")
    assert "does not read as a state dict" in refusal(tmp_path / "not-weights.pth", safetensors_only=False)
    # A folder is taken only when it holds one weights file: which of several is meant is not guessed.
    several = refusal(tmp_path, safetensors_only=False)
    assert "holds several .pth files (extra.pth, not-weights.pth, renamed.pth)" in several, several
    (tmp_path / "empty").mkdir()
    assert "holds no Inception-v3 weights file" in refusal(tmp_path / "empty")
    with pytest.raises(ImagemillError, match="does not exist"):  # on the driver, before any actor starts
        check_source("evaluation", EvaluationSpec(features="inception", source=str(tmp_path / "absent.pth")))


def test_feature_stats_without_class_sums_still_read_and_give_no_partial_score():
    """A shard committed by a job without a classifier head (or before IS existed) has no class
    columns: it reads, and a job mixing it with scored shards reports no IS rather than a wrong one."""
    rng = np.random.default_rng(0)
    plain, scored = FeatureSums.empty(3), FeatureSums.empty(3)
    plain.add(rng.normal(size=(4, 3)))
    scored.add(rng.normal(size=(4, 3)))
    scored.classes = ClassSums.of_logits(rng.normal(size=(4, 5)))
    old = sums_from_table(sums_table({JOB_WIDE: plain}))
    assert "class_probability" not in sums_table({JOB_WIDE: plain}).column_names
    assert old[JOB_WIDE].classes is None and _job_score(old) is None
    new = sums_from_table(sums_table({JOB_WIDE: scored}))
    assert _job_score(new) == pytest.approx(scored.classes.inception_score())
    assert _job_score(old, new) is None
    assert _job_score(new, new) == pytest.approx(scored.classes.inception_score())


def _job_score(*shards: dict) -> float | None:
    """The job-wide IS of shards with these feature sums, as the post-pass's metric merges them."""
    metric = InceptionScore()
    for number, sums in enumerate(shards):
        metric = metric.merge(metric.partial(ShardEvaluation(f"shard-{number}", None, sums, [], None)))
    result = metric.compute()
    return None if result is None else result.all
