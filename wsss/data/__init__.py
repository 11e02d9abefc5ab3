"""Data layer: datasets (VOC folders, CSV manifests), the synthetic generator, paired transforms, checks."""

from wsss.data.dataset import Dataset, Sample, load_csv, load_dataset, load_voc

__all__ = ["Dataset", "Sample", "load_csv", "load_dataset", "load_voc"]
