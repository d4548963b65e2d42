"""A contact sheet: a job's first images in one PNG grid, each with its prompt underneath.

    python -m imagemill.reporting.contact_sheet OUTPUT SHEET.png [--columns 8] [--scale 4] [--limit 64]

Made for the README's picture of the demo job (docs/demo-contact-sheet.png), from the job's output alone:
its metadata gives the ids, prompts and image paths. Small images are enlarged by whole pixels, so what
the model drew is shown as it is. Reads `output.format: files` outputs, local or at any fsspec URL.
"""

from __future__ import annotations

import argparse
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from imagemill.core.errors import ImagemillError
from imagemill.core.images import InvalidImage, decode_image
from imagemill.core.storage import filesystem, join

CHAR_WIDTH, LINE_HEIGHT, CAPTION_LINES, GAP = 6, 11, 3, 4  # PIL's default bitmap font


def _ok_rows(fs, root: str, limit: int) -> list[dict]:
    files = sorted(fs.glob(join(root, "metadata", "*.parquet")))
    if not files:
        raise ImagemillError(f"no metadata under {root}/metadata: is it a job's output?")
    columns = ["id", "prompt", "status", "path"]
    table = pa.concat_tables([pq.read_table(f, filesystem=fs, columns=columns) for f in files])
    rows = sorted((row for row in table.to_pylist() if row["status"] == "ok"), key=lambda row: row["id"])
    if any(not row["path"].startswith("images/") for row in rows):
        raise ImagemillError(
            f"{root}: a contact sheet needs one file per image: run with output.format: files"
        )
    return rows[:limit]


def _decoded(data: bytes, path: str) -> Image.Image:
    try:
        return decode_image(data).convert("RGB")
    except InvalidImage as exc:
        raise ImagemillError(f"{path}: {exc}; re-run the job to rewrite it") from None


def contact_sheet(output: str, columns: int = 8, scale: int = 4, limit: int = 64) -> Image.Image:
    """The grid: `limit` ok rows in id order, each image enlarged `scale` times over its wrapped prompt."""
    fs, root = filesystem(output)
    rows = _ok_rows(fs, root, limit)
    images = [_decoded(fs.cat_file(join(root, row["path"])), row["path"]) for row in rows]
    if not images:
        raise ImagemillError(f"{output} holds no generated image")
    width, height = (side * scale for side in images[0].size)
    cell_w, cell_h = width + GAP, height + CAPTION_LINES * LINE_HEIGHT + 2 * GAP
    grid_rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * cell_w + GAP, grid_rows * cell_h + GAP), "white")
    pen = ImageDraw.Draw(sheet)
    for i, (row, image) in enumerate(zip(rows, images, strict=True)):
        x, y = GAP + (i % columns) * cell_w, GAP + (i // columns) * cell_h
        sheet.paste(image.resize((width, height), Image.Resampling.NEAREST), (x, y))
        lines = textwrap.wrap(row["prompt"], width=max(1, width // CHAR_WIDTH))[:CAPTION_LINES]
        pen.multiline_text((x, y + height + GAP // 2), "\n".join(lines), fill="black", spacing=0)
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m imagemill.reporting.contact_sheet", description=__doc__.splitlines()[0]
    )
    parser.add_argument("output", help="the job's output (local path or URL)")
    parser.add_argument("sheet", help="where to write the PNG")
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--scale", type=int, default=4, help="whole-pixel enlargement of each image")
    parser.add_argument("--limit", type=int, default=64, help="at most this many images, in id order")
    args = parser.parse_args(argv)
    try:
        contact_sheet(args.output, args.columns, args.scale, args.limit).save(args.sheet)
    except ImagemillError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"contact sheet written to {args.sheet}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
