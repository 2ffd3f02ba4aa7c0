"""The figure of docs/results.md: val slices with ground truth, and each model's student prediction and confidence.

    python benchmarks/acdc_figure.py DATASET --model "decoupled (N=3)" RUN_A.pt \\
        --model "ConfKD (N=3)" RUN_B.pt --out docs/figures/acdc_val.png

One row per val case (``--cases``, default three patients), mid-ventricular slice (the slice with the most
foreground in the ground truth), cropped to ``--crop-mm`` around the heart. Columns: the image; the ground truth;
then for each model its student prediction (labels blended over the image: RV red, MYO green, LV blue) and its
confidence map ``1 - H / log K`` (viridis: dark purple 0, yellow 1). A caption row names the columns. Written
with Pillow; no plotting library needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

TILE = 160


def _tile(rgb: np.ndarray) -> np.ndarray:
    from PIL import Image

    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    # display: first in-plane axis left to right, second bottom to top (as the preview montages)
    img = Image.fromarray(np.ascontiguousarray(np.flipud(rgb.transpose(1, 0, 2))).astype(np.uint8))
    return np.asarray(img.resize((TILE, TILE), Image.Resampling.NEAREST))


def main(argv: list[str] | None = None) -> None:
    from PIL import Image, ImageDraw

    from confkd.data.dataset import NnUNetDataset
    from confkd.data.volume import read_volume
    from confkd.inference.predict import predict_volume
    from confkd.inference.preview import _grey, _overlay, _viridis
    from confkd.training.checkpoint import build_model_from_checkpoint, load_checkpoint
    from confkd.training.losses import confidence_from_probabilities

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--model", nargs=2, action="append", metavar=("TITLE", "CHECKPOINT"), required=True)
    parser.add_argument("--cases", default="patient074_frame01,patient080_frame01,patient083_frame08")
    parser.add_argument("--crop-mm", type=float, default=150.0, help="field of view around the heart")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    dataset = NnUNetDataset.open(args.dataset)
    models = []
    for title, path in args.model:
        model, config = build_model_from_checkpoint(load_checkpoint(path))
        models.append((title, model, config))
    rows = []
    for case_name in args.cases.split(","):
        case = dataset.case(case_name)
        image = read_volume(case.image_paths[0])
        label = np.asanyarray(read_volume(case.label_path).array).astype(np.int64)
        k = int(np.argmax((label > 0).sum(axis=(0, 1))))
        fg = np.argwhere(label[:, :, k] > 0)
        centre = fg.mean(axis=0) if len(fg) else np.array(label.shape[:2]) / 2
        half = [int(args.crop_mm / 2 / image.spacing[a]) for a in (0, 1)]
        lo = [max(0, int(centre[a]) - half[a]) for a in (0, 1)]
        box = (slice(lo[0], lo[0] + 2 * half[0]), slice(lo[1], lo[1] + 2 * half[1]), k)
        grey = _grey(image.array[box].astype(np.float32))
        tiles = [_tile(grey), _tile(_overlay(grey, label[box]))]
        for _, model, config in models:
            pred = predict_volume(model, image, config.preprocess, spacing=image.spacing, device="cpu")
            probs = pred.student
            seg = probs.argmax(0).numpy()[box]
            conf = confidence_from_probabilities(probs, class_dim=0).numpy()[box]
            tiles += [_tile(_overlay(grey, seg)), _tile(_viridis(conf))]
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    titles = ["image", "ground truth"] + [f"{t}: {w}" for t, _, _ in models for w in ("prediction", "confidence")]
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + 18), "white")
    canvas.paste(Image.fromarray(grid), (0, 18))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(titles):
        draw.text((i * TILE + 3, 3), text, fill="black")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(f"wrote {args.out} ({canvas.size[0]}x{canvas.size[1]})")


if __name__ == "__main__":
    main()
