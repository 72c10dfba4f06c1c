"""Release: what happens to a global adapter after aggregation.

Owns: shared evaluation (EvalScope), the release gate, streaming merges into the base, publishing (registry folder,
Hugging Face Hub, ModelScope), the model card and provenance, site withdrawal, and the GDPR Art. 30 record.

May import: protos, fedcommon, strategies, coordinator.{config,errors}, coordinator.rounds (store, adapter),
coordinator.trust (registry, for records), coordinator.privacy (accounting names).
"""
