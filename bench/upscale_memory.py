"""Peak memory of spandrel upscaling a large image in tiles: the output held as uint8, converted tile by
tile (the stage now), against the float output converted whole at the end (the stage before).

    python bench/upscale_memory.py                          # a 2048x2048 image x2, 512 px tiles
    python bench/upscale_memory.py --side 3000 --tile 256

With `generation.resize: keep` an image may be as large as `input.max_image_pixels` (50 MP), so what a
tiled upscale holds beside its tiles' activations is the whole output. Each way runs in a fresh
process on the CPU (peak RSS from getrusage, less the RSS before the call: the device-memory analogue
on a CPU), with the tiny Compact network of imagemill.testing; the two outputs' sha256 must be equal.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = """
import hashlib, json, resource, sys
import torch
from imagemill.testing.tiny_upscaler import make_tiny_upscaler
from imagemill.workers.loading import Pretrained
from imagemill.workers.stages.upscale import SpandrelUpscaler, levels, tiled

way, side, tile, folder = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
network = Pretrained(str(make_tiny_upscaler(folder, 2)), "upscale.source")
upscaler = SpandrelUpscaler(network, "float32", tile, 16, "cpu")
seeded = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (1, side, side, 3), dtype=torch.uint8, generator=seeded)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.inference_mode():
    if way == "float":  # the stage before: the float output whole, converted at the end
        pixels = images.permute(0, 3, 1, 2).float() / 255
        out = levels(tiled(upscaler.network, pixels, 2, tile, 16)).permute(0, 2, 3, 1).contiguous()
    else:
        out = upscaler(images, [""], [0])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
digest = hashlib.sha256(out.numpy().tobytes()).hexdigest()
print(json.dumps({"way": way, "peak_mib": round((peak - before) / 1024), "sha256": digest}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=512)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for way in ("float", "levels"):
            done = subprocess.run(
                [sys.executable, "-c", CHILD, way, str(args.side), str(args.tile), folder],
                capture_output=True,
                text=True,
                check=True,
            )
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert results[0]["sha256"] == results[1]["sha256"], "the two ways wrote different pixels"
    output_mib = (2 * args.side) ** 2 * 3 / 2**20
    print(f"{args.side}x{args.side} x2, tile {args.tile}: output {output_mib:.0f} MiB as uint8")
    for result in results:
        print(f"  {result['way']:>6}: peak {result['peak_mib']} MiB over the process before the call")


if __name__ == "__main__":
    main()
