"""Downstream transfer: the ViTP ViT as the backbone of dense prediction (segmentation, change detection).

One-way flow, as the rest of vitp: ``backbone`` (a vitp ViT made dense) -> ``necks`` (multi-scale
features) -> ``heads`` (UPerNet) -> ``segmentor`` (task models) ; ``data`` and ``metrics`` beside them;
``train`` puts them together. Nothing in vitp imports this package except ``cli`` and ``demo``.
"""
