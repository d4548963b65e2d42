"""The job spec: one YAML file, validated by pydantic, every field overridable with `--set key=value`.

The spec is the whole contract of a job: the driver, the actors and the job record all read it, so a
field added to a section is the one place a new setting needs to be declared; its markers
(markers.py) decide whether it is fingerprinted and redacted, its description is the reference page's
text (reference.py writes docs/spec.md).

    sections.py     each section's fields and checks (PretrainedSection: the shared base of weights)
    job.py          JobSpec: the sections together and the rules across them
    markers.py      field markers (StorageOptions, NOT_FINGERPRINTED, REDACTED) and the walks over them
    fingerprint.py  what must not change under a resume
    rules.py        limits the spec and each row share (generation parameters, the watermark payload)
    loading.py      YAML, `--set` overrides, {date}, absolute paths
    reference.py    docs/spec.md from the models
"""

from imagemill.core.spec.job import JobSpec
from imagemill.core.spec.loading import build_spec, load_spec, parse_overrides, read_yaml_mapping
from imagemill.core.spec.rules import (
    ALLOWED_BIT_ERRORS_PER,
    denoising_problem,
    generation_problem,
    payload_bits,
    watermark_size_problem,
)
from imagemill.core.spec.sections import (
    IMAGE_EXTENSIONS,
    C2paSpec,
    CacheSpec,
    CostSpec,
    EmulationSpec,
    EvaluationSpec,
    ExpansionSpec,
    GenerationSpec,
    InputSpec,
    LoraSpec,
    ModelSpec,
    OutputSpec,
    PretrainedSection,
    SafetyRetrySpec,
    SafetySpec,
    SchedulerSpec,
    ScoringSpec,
    SpeedSpec,
    StageSections,
    UpscaleSpec,
    WatermarkSpec,
    WorkersSpec,
)

__all__ = [
    "ALLOWED_BIT_ERRORS_PER",
    "IMAGE_EXTENSIONS",
    "C2paSpec",
    "CostSpec",
    "CacheSpec",
    "EvaluationSpec",
    "ExpansionSpec",
    "GenerationSpec",
    "InputSpec",
    "JobSpec",
    "LoraSpec",
    "EmulationSpec",
    "ModelSpec",
    "OutputSpec",
    "PretrainedSection",
    "SafetySpec",
    "SafetyRetrySpec",
    "SchedulerSpec",
    "SpeedSpec",
    "StageSections",
    "UpscaleSpec",
    "ScoringSpec",
    "WorkersSpec",
    "WatermarkSpec",
    "build_spec",
    "denoising_problem",
    "generation_problem",
    "load_spec",
    "parse_overrides",
    "payload_bits",
    "read_yaml_mapping",
    "watermark_size_problem",
]
