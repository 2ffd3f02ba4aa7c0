"""Write a compact copy of an nnU-Net raw dataset, small enough to ship to a remote GPU machine.

    python benchmarks/compact_dataset.py ../shared/data/acdc .devdata/acdc

Images of the cases in ``--quantize-split`` (default ``train``) are stored as 8-bit NIfTI: clipped to the same
percentiles as ``preprocess.clip_percentiles`` (0.5, 99.5) and mapped linearly to 0..255. Training clips at
those percentiles and z-scores the result, so the network sees the same image up to a quantisation step of 1/255
of the clipped range (about 0.01 standard deviations). Images of every other split (``val``) are copied as they
are, so validation is scored on the original scans. Labels, scribbles, ``dataset.json`` and ``splits.json`` are
copied unchanged; the geometry (affine, qform, sform, pixdim) of every file is kept.

``--uncompressed`` writes ``.nii`` files (and sets ``file_ending`` in ``dataset.json``) for an archive compressed as
a whole, which xz packs far tighter than per-file gzip: ACDC's 113 MB become a 55 MB ``.tar.xz``::

    python benchmarks/compact_dataset.py ../shared/data/acdc .devdata/acdc --uncompressed
    tar -C .devdata -cJf .devdata/acdc.tar.xz acdc

The copy holds medical data: keep it out of version control (the ACDC licence forbids redistribution).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np


def quantize(image: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Clip ``image`` to its ``percentiles`` and map the range linearly to 0..255 (uint8)."""
    lo, hi = np.percentile(image, percentiles)
    scaled = (np.clip(image, lo, hi) - lo) / max(float(hi - lo), 1e-6) * 255.0
    return np.round(scaled).astype(np.uint8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--quantize-split", default="train")
    parser.add_argument("--percentiles", type=float, nargs=2, default=(0.5, 99.5))
    parser.add_argument("--uncompressed", action="store_true", help="write .nii (compress the folder as a whole)")
    args = parser.parse_args(argv)
    src, dst = args.src, args.dst
    meta = json.loads((src / "dataset.json").read_text())
    ending = meta.get("file_ending", ".nii.gz")
    new_ending = ".nii" if args.uncompressed else ending
    splits = json.loads((src / "splits.json").read_text())
    quantized = set(splits.get(args.quantize_split, []))
    keep = set().union(*splits.values())
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "dataset.json").write_text(json.dumps({**meta, "file_ending": new_ending}, indent=2))
    shutil.copy2(src / "splits.json", dst / "splits.json")
    for folder in ("labelsTr", "scribblesTr", "imagesTr"):
        if not (src / folder).is_dir():
            continue
        (dst / folder).mkdir(exist_ok=True)
        for path in sorted((src / folder).glob(f"*{ending}")):
            patient = path.name.split("_")[0]
            if patient not in keep:
                continue
            out = dst / folder / (path.name[: -len(ending)] + new_ending)
            quantise = folder == "imagesTr" and patient in quantized
            if not quantise and new_ending == ending:
                shutil.copy2(path, out)
                continue
            img = nib.load(path)
            data = np.asanyarray(img.dataobj)
            header = img.header.copy()
            if quantise:
                data = quantize(data, tuple(args.percentiles))
                header.set_data_dtype(np.uint8)
                header.set_slope_inter(1.0, 0.0)
            nib.save(nib.Nifti1Image(data, img.affine, header), out)
    size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    print(f"{dst}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
