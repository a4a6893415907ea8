"""Datasets: safe reading, validation, the COCO dataset and masks, the generated
shapes, the prepare stage and the importers."""
