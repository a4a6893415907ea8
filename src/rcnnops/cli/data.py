"""Converting other dataset formats to COCO: ``rcnnops import voc|masks``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rcnnops.cli.common import add


def cmd_import(args: argparse.Namespace) -> int:
    limit = {"max_image_pixels": args.max_image_pixels} if args.max_image_pixels else {}
    if args.format == "voc":
        from rcnnops.data.importers import parse_classes
        from rcnnops.data.importers.voc import import_voc

        result = import_voc(
            Path(args.src),
            Path(args.out),
            split=args.split,
            classes=parse_classes(args.classes) if args.classes else None,
            skip_difficult=args.skip_difficult,
            **limit,
        )
    else:
        from rcnnops.data.importers.mask_png import import_masks

        result = import_masks(
            Path(args.images),
            Path(args.masks),
            Path(args.out),
            split=args.split,
            class_name=args.class_name,
            ignore_value=args.ignore_value,
            allow_missing_masks=args.allow_missing_masks,
            mask_suffix=args.mask_suffix,
            **limit,
        )
    print(f"imported {args.format} split {args.split}: {result.summary()}")
    return 0


IMPORT_EPILOG = """\
Writes OUT/annotations/instances_SPLIT.json (no images are copied), replacing
one an earlier import wrote (whole: a failed import leaves it as it was). Point
params.yaml at it (the command prints the images folder relative to OUT):
  data:
    root: OUT
    train: {annotations: annotations/instances_train.json, images: IMAGES}
"""


def add_parsers(sub: Any) -> None:
    sp = add(sub, "import", cmd_import, "convert a Pascal VOC or instance-mask PNG dataset to COCO")
    fmt = sp.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for parser in (_voc_parser(fmt), _masks_parser(fmt)):
        parser.add_argument(
            "--max-image-pixels",
            type=int,
            metavar="N",
            help="refuse images of more pixels, as prepare does (default: 50000000, "
            "prepare.max_image_pixels' default; raise both for larger photos)",
        )


def _voc_parser(fmt: Any) -> argparse.ArgumentParser:
    v = fmt.add_parser(
        "voc",
        help="Pascal VOC folder (Annotations/*.xml, JPEGImages/*) -> COCO boxes",
        description="Convert a Pascal VOC folder to COCO boxes. VOC's 1-based inclusive\n"
        "corners become [xmin-1, ymin-1, xmax-xmin+1, ymax-ymin+1] (as detectron2 reads VOC).",
        epilog=IMPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument("src", metavar="SRC", help="VOC folder holding Annotations/ and JPEGImages/")
    v.add_argument("out", metavar="OUT", help="output folder (gets annotations/)")
    v.add_argument(
        "--split",
        default="train",
        help="split name; uses SRC/ImageSets/Main/SPLIT.txt if present, else every XML "
        "(default: train)",
    )
    v.add_argument(
        "--classes",
        metavar="A,B,...",
        help="comma-separated class names (default: the 20 VOC classes)",
    )
    v.add_argument(
        "--skip-difficult", action="store_true", help="drop (and count) difficult objects"
    )
    return v


def _masks_parser(fmt: Any) -> argparse.ArgumentParser:
    m = fmt.add_parser(
        "masks",
        help="images + instance-mask PNGs (one value per instance) -> COCO RLE masks",
        description="Convert images + instance-mask PNGs to COCO RLE masks.\n"
        "MASKS/<stem>.png belongs to IMAGES/<stem>.<ext>; each distinct non-zero value is\n"
        "one instance. One class for all (--class-name) or one subfolder per class\n"
        "(MASKS/<class>/<stem>.png).",
        epilog=IMPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("--images", required=True, metavar="DIR", help="folder of images")
    m.add_argument(
        "--masks", required=True, metavar="DIR", help="folder of mask PNGs (or of class subfolders)"
    )
    m.add_argument("out", metavar="OUT", help="output folder (gets annotations/)")
    one_class = "every instance is this class (no class subfolders)"
    m.add_argument("--class-name", metavar="NAME", help=one_class)
    void = "mask value that is not an instance, e.g. 255 for void (default: none)"
    m.add_argument("--ignore-value", type=int, metavar="N", help=void)
    m.add_argument(
        "--allow-missing-masks",
        action="store_true",
        help="keep (and count) images without a mask, with no annotations",
    )
    m.add_argument(
        "--mask-suffix",
        default="",
        metavar="SUFFIX",
        help="mask name suffix before .png, e.g. _mask for PennFudanPed (default: none)",
    )
    m.add_argument("--split", default="train", help="split name (default: train)")
    return m
