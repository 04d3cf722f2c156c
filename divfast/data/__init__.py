"""Datasets (embedded digits, ImageFolder), dataset specs and ensemble members."""

from divfast.data.corrupted import CorruptedDataset
from divfast.data.datasets import build_dataset, build_train_datasets, parse_dataset_spec
from divfast.data.digits import digits_dataset
from divfast.data.members import Member, load_member, load_members, save_member

__all__ = ["CorruptedDataset", "Member", "build_dataset", "build_train_datasets", "digits_dataset", "load_member", "load_members",
           "parse_dataset_spec", "save_member"]
