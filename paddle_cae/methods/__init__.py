"""One file per pretraining method (see :mod:`paddle_cae.methods.base` for the contract)."""
from .base import (Method, classifier_method, classifier_name, get_method, method_for, method_names,
                   method_of_classifier, pretrain_only_prefixes, register_method)

__all__ = ["Method", "classifier_method", "classifier_name", "get_method", "method_for",
           "method_names", "method_of_classifier", "pretrain_only_prefixes", "register_method"]
