"""Egress: everything between a trained delta and the bytes that leave the site.

Owns: the named egress filters (clip, DP noise), the site's privacy ledger and budget, the egress guard (only
adapter tensors of the agreed spec leave), and the site's side of secure aggregation (masking).

May import: protos, fedcommon, strategies (clipping math).
"""
