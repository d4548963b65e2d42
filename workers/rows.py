"""A shard's rows: read from Parquet, resolved against the job's defaults, validated, and batched.

A row that cannot be generated becomes an error row with a reason; it never fails its shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from imagemill.core.carry import Carried, carried_columns
from imagemill.core.shard import Shard
from imagemill.core.spec import GenerationSpec, InputSpec, denoising_problem, generation_problem
from imagemill.workers.generators.contract import BatchKey
from imagemill.workers.pieces import read_piece, read_row_groups
from imagemill.workers.seeds import MAX_SEED, derive_seed, drawn_strength

# Optional input columns that override the job's generation defaults row by row.
PARAMETER_COLUMNS = ("negative_prompt", "seed", "num_inference_steps", "guidance_scale", "width", "height")
INTEGER_COLUMNS = ("seed", "num_inference_steps", "width", "height")
# Checked with the rule the job's defaults meet (imagemill.core.spec.generation_problem), in this order.
RULED_PARAMETERS = ("num_inference_steps", "guidance_scale", "width", "height")
MAX_UPSCALE = 8  # a row's scale (input.scale_column): x2 and x4 models, x8 ones where they exist


@dataclass
class Row:
    index: int  # position in the shard
    input_row: int  # position in the input file
    row_id: str
    prompt: Any
    negative_prompt: Any
    seed: Any
    width: Any
    height: Any
    num_inference_steps: Any
    guidance_scale: Any
    error: str | None = None
    variant_id: str = ""  # the id its prompt expansion is made for: the row id less any `_<k>` image suffix
    expanded_prompt: str | None = None  # what the language model made of `prompt`, when expansion is on
    # Image-to-image only (input.image_column; None otherwise): the column's value, the row's strength,
    # and the source at the row's size, (height, width, 3) uint8, once read (workers/source_images.py).
    source: Any = None
    strength: Any = None
    source_pixels: np.ndarray | None = None
    scale: Any = None  # upscale: the row's scale from input.scale_column; None: the upscaler's own
    # Inpainting only (input.mask_column): the column's value and the mask at the row's size, (height,
    # width) uint8, 0 where the source is kept (workers/masks.py).
    mask: Any = None
    mask_pixels: np.ndarray | None = None
    # Upscale with input.reference_column only: the column's value and the known high-resolution image
    # at the written size, (height·scale, width·scale, 3) uint8, once read (workers/source_images.py).
    reference: Any = None
    reference_pixels: np.ndarray | None = None

    @property
    def text(self) -> Any:
        """The prompt the image is drawn from: the expanded one where there is one."""
        return self.prompt if self.expanded_prompt is None else self.expanded_prompt

    @property
    def key(self) -> BatchKey:
        return BatchKey(
            self.width, self.height, self.num_inference_steps, self.guidance_scale, self.strength, self.scale
        )


def input_columns(spec: InputSpec) -> list[str]:
    """The input columns imagemill uses, where a file has them."""
    image = [spec.image_column, spec.mask_column, "strength"] if spec.image_column else []
    own = [
        name
        for name in (spec.prompt_column, spec.id_column, spec.scale_column, spec.reference_column)
        if name is not None
    ]
    return list(dict.fromkeys(filter(None, [*own, *PARAMETER_COLUMNS, *image])))


def read_shard(shard: Shard, spec: InputSpec) -> pa.Table:
    """The shard's rows, with only the columns imagemill uses: its row groups, or its piece of one
    (from the run's PieceServer; in a run without Ray, from its row group read here)."""
    if shard.row_offset is not None and shard.piece_server:
        return read_piece(shard)
    groups = range(shard.row_group_start, shard.row_group_end)
    table = read_row_groups(shard.file_url, groups, spec, input_columns(spec))
    return table if shard.row_offset is None else table.slice(shard.row_offset, shard.num_rows)


def carried_of(table: pa.Table, rows: list[Row], shard: Shard, spec: InputSpec) -> Carried:
    """The shard's carried columns (imagemill.core.carry), and for each of `rows` its input row."""
    columns = carried_columns(spec, table.column_names)
    return Carried(table.select(columns), [row.input_row - shard.first_row for row in rows])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompt_problem(prompt: Any) -> str | None:
    if prompt is None:
        return "invalid_prompt: prompt is null"
    if not isinstance(prompt, str):
        return f"invalid_prompt: prompt is a {type(prompt).__name__}, not a string"
    if not prompt.strip():
        return "invalid_prompt: prompt is empty"
    return None


def _row_error(row: Row, prompted: bool) -> str | None:
    """Why the row cannot be generated, as 'reason: detail', or None when it can. Without a prompt
    column (`prompted` false: model.kind none) a row has no prompt, and needs none."""
    problem = _prompt_problem(row.prompt) if prompted else None
    if problem:
        return problem
    if row.negative_prompt is not None and not isinstance(row.negative_prompt, str):
        return "invalid_parameter: negative_prompt is not a string"
    if not _is_int(row.seed) or not 0 <= row.seed <= MAX_SEED:
        return f"invalid_parameter: seed must be an integer in [0, 2**63-1], got {row.seed!r}"
    for name in RULED_PARAMETERS:
        problem = generation_problem(name, getattr(row, name))
        if problem:
            return f"invalid_parameter: {problem}"
    if row.scale is not None and not (_is_int(row.scale) and 2 <= row.scale <= MAX_UPSCALE):
        return f"invalid_parameter: scale must be an integer in [2, {MAX_UPSCALE}], got {row.scale!r}"
    if row.strength is not None:  # image-to-image
        problem = generation_problem("strength", row.strength) or denoising_problem(
            row.num_inference_steps, row.strength
        )
        if problem:
            return f"invalid_parameter: {problem}"
    return None


def _variant_id(base_id: str, variant: int, n_variants: int) -> str:
    return base_id if n_variants == 1 else f"{base_id}_v{variant}"


def prepare_rows(
    table: pa.Table, shard: Shard, input_spec: InputSpec, defaults: GenerationSpec, n_variants: int = 1
) -> list[Row]:
    """One Row per input row, prompt variant (n_variants, from expansion) and image
    (images_per_prompt), with the row's own parameters where given and the job's elsewhere.

    Variant v of row `id` is `id_v<v>`, and image k of a prompt is `<prompt id>_<k>`: with both,
    `id_v1_0`. Each has its own seed: the row's seed + its number among the row's images, or one
    derived from its id."""
    columns = {name: table.column(name).to_pylist() for name in table.column_names}

    def column(name: str) -> list[Any]:
        return columns.get(name) or [None] * table.num_rows

    ids, prompts = column(input_spec.id_column), column(input_spec.prompt_column)
    rows = []
    seen_ids: set[str] = set()
    images = defaults.images_per_prompt
    for index in range(table.num_rows):
        input_row = shard.first_row + index
        given_id = ids[index]
        base_id = str(given_id) if given_id is not None else f"{shard.file_key}-{input_row:08d}"

        def value(name: str, default: Any, index: int = index) -> Any:
            given = column(name)[index]
            if isinstance(given, float) and given.is_integer() and name in INTEGER_COLUMNS:
                return int(given)  # pandas writes integer columns that have nulls as floats
            return default if given is None else given

        given_seed = value("seed", None)
        for number in range(n_variants * images):
            variant_id = _variant_id(base_id, number // images, n_variants)
            row_id = variant_id if images == 1 else f"{variant_id}_{number % images}"
            if given_seed is None:
                seed = derive_seed(defaults.seed, row_id)
            elif _is_int(given_seed) and number:
                seed = (given_seed + number) % (MAX_SEED + 1)
            else:
                seed = given_seed
            row = Row(
                index=len(rows),
                input_row=input_row,
                row_id=row_id,
                prompt=prompts[index],
                negative_prompt=value("negative_prompt", defaults.negative_prompt),
                seed=seed,
                width=value("width", defaults.width),
                height=value("height", defaults.height),
                num_inference_steps=value("num_inference_steps", defaults.num_inference_steps),
                guidance_scale=value("guidance_scale", defaults.guidance_scale),
                variant_id=variant_id,
            )
            if input_spec.scale_column:
                given = value(input_spec.scale_column, None)
                row.scale = int(given) if isinstance(given, float) and given.is_integer() else given
            if input_spec.reference_column:
                row.reference = column(input_spec.reference_column)[index]
            if input_spec.image_column:
                row.source = column(input_spec.image_column)[index]
                row.strength = _strength(value("strength", None), defaults.strength, seed)
                row.mask = column(input_spec.mask_column)[index] if input_spec.mask_column else None
            row.error = _row_error(row, input_spec.prompt_column is not None)
            if row_id in seen_ids:
                row.error = (
                    f"duplicate_id: id {row_id!r} appears earlier in this shard; its first row is kept"
                )
            seen_ids.add(row_id)
            rows.append(row)
    return rows


def _strength(given: Any, default: float | list[float], seed: Any) -> Any:
    """The row's strength: its `strength` column's value, the job's, or one drawn from the job's range
    with the row's seed."""
    if given is not None or not isinstance(default, list):
        return default if given is None else given
    return drawn_strength(seed, *default) if _is_int(seed) else default[0]


def make_batches(rows: list[Row], batch_size: int) -> list[list[Row]]:
    """Batches of at most batch_size valid rows sharing a BatchKey, in shard order within each key.

    Batches depend only on the shard's rows and the batch size, never on which actor runs them.
    """
    groups: dict[BatchKey, list[Row]] = {}
    for row in rows:
        if row.error is None:
            groups.setdefault(row.key, []).append(row)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
