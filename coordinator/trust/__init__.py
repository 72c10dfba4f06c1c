"""Trust: the federation PKI (CA, certificates, CRL), enrolment of sites and admins, access control and revocation.

Owns: who a peer is (from its certificate only), whether it may make a call, and the enrolment registry.

May import: protos, fedcommon, coordinator.{config,errors}, coordinator.rounds.store (durable writes).
"""
