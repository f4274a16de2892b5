"""Shared machinery of the dataset plugins: decoding (``images``), records, splits and ``on_error``
(``records``), the options every loader shares (``options``), the preprocessed cache (``cache``) and records → ``DatasetBundle`` (``dataset``)."""

from cxr_automl.data.dataset import RecordSplit, build_bundle
from cxr_automl.data.images import Geometry, ImageReadError, decode_image
from cxr_automl.data.options import TASKS, LoaderOptions, loader
from cxr_automl.data.records import DataError, FileIndex, Problems, Record, parse_label, read_csv, seeded_rank

__all__ = ["TASKS", "DataError", "FileIndex", "Geometry", "ImageReadError", "LoaderOptions", "Problems", "Record",
           "RecordSplit", "build_bundle", "decode_image", "loader", "parse_label", "read_csv",
           "seeded_rank"]
