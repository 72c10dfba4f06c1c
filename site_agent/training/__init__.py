"""Training at the site: data loading and validation, the TRL/PEFT trainers (SFT, QLoRA, DPO, KTO, ORPO, SimPO,
DeepSpeed), and held-out scoring.

May import: protos, fedcommon, strategies (types). Never the network: the agent hands data and a task in, and gets
a delta and metrics back.
"""
