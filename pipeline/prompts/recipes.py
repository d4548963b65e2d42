"""Dataset recipes: classes x prompt templates x slot values -> a prompts Parquet file with labels.

`imagemill prompts RECIPE.yaml OUT` turns a recipe into an ordinary prompts file (`id`, `prompt`,
`label`, `class_name`, `template`, one column per slot, and `category` when classes have one), so the
job that draws it is an ordinary job: nothing downstream knows about recipes. The classes' rows are
interleaved (seeded), so every shard of the job and every batch a loader reads in file order mixes
labels. The rows are a pure function of the recipe: ids are `<class>-<k>` and row k of a class is the
same combination whatever the other classes and the quota (a larger quota only adds rows), and the
file's bytes are the same on every write (the writer's options are pinned below), so a regenerated
prompts file resumes the job it fed instead of being refused as a changed input.

A class's combinations are, for each template in order, each word for the class (its name, then its
synonyms) times every value of each slot the template names. `cartesian` takes them in that order;
`random` takes a seeded shuffle of them. Either way no combination repeats until all are used: a quota
above the count is refused unless `allow_repeats` is set, which then starts another round (another
shuffle for `random`); the rows' images still differ, as each id gets its own seed in the job.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import string
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imagemill.core.errors import ImagemillError
from imagemill.core.spec import read_yaml_mapping
from imagemill.core.storage import filesystem, retrying, write_file_atomically

CLASS_SLOT = "class"
CATEGORY_SLOT = "category"
# Columns every recipe's Parquet has; a slot cannot take one of these names (nor `class`/`category`).
FIXED_COLUMNS = ("id", "prompt", "label", "class_name", "template")
SLOT_NAME = re.compile(r"[a-z_][a-z0-9_]*")
# Up to this many combinations a class's shuffle is a permutation of all of them; above it (a recipe
# of many long slot lists), distinct combinations are drawn one by one, so memory follows the quota.
PERMUTATION_LIMIT = 1_000_000
# Random indices are drawn this many at a time; numpy's `integers` draws below NUMPY_HIGH (int64).
DRAWS_AT_ONCE = 4096
NUMPY_HIGH = 2**63 - 1
# The rows are built in memory; a recipe asking for more is a typo or wants to be split into several.
MAX_ROWS = 10_000_000
INTERLEAVE_STREAM = 1  # the seed stream of the rows' order, apart from the classes' own (_class_rng)
# Pinned so that the same recipe writes the same bytes (pyarrow's defaults may change between releases).
WRITER_OPTIONS: dict[str, Any] = {
    "version": "2.6",
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": True,
    "write_statistics": True,
    "data_page_size": 1 << 20,
    "store_schema": True,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _text(value: str) -> str:
    if not value.strip() or any(ch in value for ch in "\n\r\t\0"):
        raise ValueError("must be non-empty text on one line")
    return value


class ClassSpec(_Strict):
    name: str = Field(description="the class; its index in `classes` is the label")
    synonyms: list[str] = Field(default_factory=list, description="other words for {class}")
    category: str | None = Field(None, description="a broader class, for {category} in templates")
    quota: int | None = Field(None, gt=0, description="rows of this class (default: the recipe's quota)")

    @field_validator("name", "category")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        return None if value is None else _text(value)

    @field_validator("synonyms")
    @classmethod
    def _distinct_words(cls, value: list[str]) -> list[str]:
        for word in value:
            _text(word)
        if len(set(value)) != len(value):
            raise ValueError("has a word twice")
        return value


class Recipe(_Strict):
    classes: list[ClassSpec] = Field(min_length=1)
    templates: list[str] = Field(min_length=1, description="prompt templates naming {class} and slots")
    slots: dict[str, list[str]] = Field(default_factory=dict, description="slot name -> its values")
    quota: int | None = Field(None, gt=0, description="rows per class; default: all its combinations")
    sampling: Literal["cartesian", "random"] = "random"
    allow_repeats: bool = Field(False, description="a quota above the combinations starts another round")
    seed: int = Field(0, ge=0)
    row_group_size: int = Field(1024, gt=0, description="rows per Parquet row group")

    @field_validator("slots")
    @classmethod
    def _slot_lists(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, values in value.items():
            if not SLOT_NAME.fullmatch(name) or name in (*FIXED_COLUMNS, CLASS_SLOT, CATEGORY_SLOT):
                raise ValueError(
                    f"slot '{name}' needs a name of lower-case letters, digits and _ that is not one of "
                    f"{', '.join((CLASS_SLOT, CATEGORY_SLOT, *FIXED_COLUMNS))}"
                )
            if not values:
                raise ValueError(f"slot '{name}' has no values")
            for text in values:
                _text(text)
            if len(set(values)) != len(values):
                raise ValueError(f"slot '{name}' has a value twice")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"class '{twice}' is listed twice")
        used: set[str] = set()
        for index, template in enumerate(self.templates):
            fields = set(template_slots(template, index))
            if CLASS_SLOT not in fields:
                raise ValueError(f"templates.{index} does not name {{{CLASS_SLOT}}}: the prompt must say it")
            for name in fields - {CLASS_SLOT, CATEGORY_SLOT}:
                if name not in self.slots:
                    raise ValueError(
                        f"templates.{index} names slot '{{{name}}}', which slots does not define"
                    )
            bare = next((c.name for c in self.classes if not c.category), None)
            if CATEGORY_SLOT in fields and bare:
                raise ValueError(f"templates.{index} names {{{CATEGORY_SLOT}}}, but class '{bare}' has none")
            used |= fields
        if unused := sorted(set(self.slots) - used):
            raise ValueError(f"slot '{unused[0]}' is defined but no template names it")
        return self


def template_slots(template: str, index: int) -> list[str]:
    """The slot names in a template, in order ("{{" and "}}" are literal braces); only plain `{name}`."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"templates.{index} is not a valid template ({exc})") from None
    fields: dict[str, None] = {}
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not SLOT_NAME.fullmatch(name) or spec or conversion:
            raise ValueError(f"templates.{index} has '{{{name}}}': a slot is a plain {{name}}")
        fields[name] = None
    return list(fields)


class _Combinations:
    """One class's combinations in their fixed order, each decoded from its index (nothing listed)."""

    def __init__(self, recipe: Recipe, cls: ClassSpec):
        self.recipe, self.cls = recipe, cls
        self.words = [cls.name, *cls.synonyms]
        self.blocks = []  # per template: (template index, its slots in order, their sizes, block size)
        for index, template in enumerate(recipe.templates):
            slots = [n for n in template_slots(template, index) if n in recipe.slots]
            sizes = [len(recipe.slots[n]) for n in slots]
            self.blocks.append((index, slots, sizes, len(self.words) * math.prod(sizes)))
        self.count = sum(block[-1] for block in self.blocks)

    def row(self, position: int) -> tuple[int, str, dict[str, str]]:
        """Combination `position`: (template index, the prompt, slot values)."""
        for index, slots, sizes, size in self.blocks:
            if position >= size:
                position -= size
                continue
            values = {}
            for name, radix in zip(reversed(slots), reversed(sizes), strict=True):
                position, digit = divmod(position, radix)
                values[name] = self.recipe.slots[name][digit]
            fill = {**values, CLASS_SLOT: self.words[position], CATEGORY_SLOT: self.cls.category}
            return index, self.recipe.templates[index].format(**fill), values
        raise IndexError(position)


def _class_rng(seed: int, name: str, round_: int) -> np.random.Generator:
    """A class's own stream, so that adding, removing or reordering classes leaves the others' rows."""
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return np.random.default_rng([seed, digest, round_])


def _draws_below(rng: np.random.Generator, count: int) -> list[int]:
    """Up to DRAWS_AT_ONCE uniform indices below `count`, a Python int of any size. numpy draws
    below 2**63 itself (the draws recipes have always made); above, each index is the top bits of
    whole 64-bit words, those not below `count` dropped (at most half), as numpy's int64 would overflow."""
    if count <= NUMPY_HIGH:
        return rng.integers(count, size=DRAWS_AT_ONCE).tolist()
    bits = count.bit_length()
    words = -(-bits // 64)
    rows = rng.integers(0, 2**64, size=(DRAWS_AT_ONCE, words), dtype=np.uint64).tolist()
    wide = (sum(word << (64 * k) for k, word in enumerate(row)) >> (64 * words - bits) for row in rows)
    return [index for index in wide if index < count]


def _distinct_draws(rng: np.random.Generator, count: int) -> Iterator[int]:
    """Distinct indices below `count` in a seeded order (for counts too large to permute)."""
    seen: set[int] = set()
    while len(seen) < count:
        for index in _draws_below(rng, count):
            if index not in seen:
                seen.add(index)
                yield index


def _positions(recipe: Recipe, name: str, count: int, quota: int) -> Iterator[int]:
    """The combination index of each of a class's `quota` rows: rounds of every combination once."""
    for round_ in range(-(-quota // count)):  # integer ceiling: counts may exceed a float's precision
        take = min(count, quota - round_ * count)
        if recipe.sampling == "cartesian":
            yield from range(take)
        elif count <= PERMUTATION_LIMIT:
            yield from _class_rng(recipe.seed, name, round_).permutation(count)[:take].tolist()
        else:
            draws = _distinct_draws(_class_rng(recipe.seed, name, round_), count)
            yield from (next(draws) for _ in range(take))


def _interleaved(labels: list[int], quotas: list[int], seed: int) -> list[int]:
    """The order of rows listed class by class that spreads every class evenly over the file: row k
    of a class of quota q goes at (k + u) / q, u seeded in [0, 1), so any run of rows (a row group, a
    shard, a loader's first batch) holds the classes in about their proportions. Row k of a class
    stays the same combination (its id and prompt); only where it sits in the file follows the recipe."""
    jitter = np.random.default_rng([seed, INTERLEAVE_STREAM]).random(len(labels))
    label = np.asarray(labels, dtype=np.int64)
    firsts = np.cumsum([0, *quotas[:-1]])
    k = np.arange(len(labels)) - firsts[label]
    return np.lexsort((label, (k + jitter) / np.asarray(quotas)[label])).tolist()


def recipe_table(recipe: Recipe) -> pa.Table:
    """The recipe's rows, the classes interleaved (seeded, `_interleaved`), `<class>-<k>` in k order
    within each class."""
    columns: dict[str, list[Any]] = {name: [] for name in (*FIXED_COLUMNS, *recipe.slots)}
    with_category = any(c.category for c in recipe.classes)
    categories: list[str | None] = []
    every = [_Combinations(recipe, cls) for cls in recipe.classes]
    quotas = [
        cls.quota or recipe.quota or each.count for cls, each in zip(recipe.classes, every, strict=True)
    ]
    if sum(quotas) > MAX_ROWS:
        raise ImagemillError(
            f"recipe: its quotas make {sum(quotas):,} rows, more than {MAX_ROWS:,}: write several files "
            "from recipes of fewer classes (a job reads them all from one folder)"
        )
    for label, (cls, combinations, quota) in enumerate(zip(recipe.classes, every, quotas, strict=True)):
        if quota > combinations.count and not recipe.allow_repeats:
            raise ImagemillError(
                f"recipe: class '{cls.name}' asks for {quota} rows but its templates, words and slots make "
                f"only {combinations.count} distinct prompts: lower the quota, add slot values or set "
                "allow_repeats: true"
            )
        for k, position in enumerate(_positions(recipe, cls.name, combinations.count, quota)):
            template, prompt, values = combinations.row(position)
            for name, value in (("id", f"{cls.name}-{k}"), ("prompt", prompt), ("label", label)):
                columns[name].append(value)
            columns["class_name"].append(cls.name)
            columns["template"].append(template)
            for slot in recipe.slots:
                columns[slot].append(values.get(slot))
            categories.append(cls.category)
    types = {"label": pa.int32(), "template": pa.int32()}
    table = pa.table(
        {name: pa.array(column, types.get(name, pa.string())) for name, column in columns.items()}
    )
    if with_category:
        table = table.add_column(4, "category", pa.array(categories, pa.string()))
    return table.take(_interleaved(columns["label"], quotas, recipe.seed))


def parquet_bytes(table: pa.Table, row_group_size: int) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size, **WRITER_OPTIONS)
    return buffer.getvalue()


def load_recipe(path: str) -> Recipe:
    """A recipe YAML file, validated; any problem is one line naming the file and the key."""
    data = read_yaml_mapping(path, "recipe", "classes and templates")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ImagemillError.invalid(f"recipe {path}", exc, Recipe) from None


def write_prompts(
    recipe_path: str, out: str, overwrite: bool = False, storage_options: dict[str, Any] | None = None
) -> pa.Table:
    """Write the recipe's prompts Parquet to `out` (a local path or URL); an existing file is kept
    unless `overwrite`. Returns the table written."""
    recipe = load_recipe(recipe_path)
    table = recipe_table(recipe)
    fs, path = filesystem(out, storage_options)
    if retrying(lambda: fs.isdir(path), f"checking {out}"):
        raise ImagemillError(f"{out} is a folder: name the Parquet file to write, e.g. {out}/prompts.parquet")
    if not overwrite and retrying(lambda: fs.exists(path), f"checking {out}"):
        raise ImagemillError(f"{out} already exists: pass --overwrite to replace it")
    parent = path.rpartition("/")[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    data = parquet_bytes(table, recipe.row_group_size)
    retrying(lambda: write_file_atomically(fs, path, data), f"writing {out}")
    return table
